#!/usr/bin/env bash
# The kernel matrix: builds every test binary on the host, then boots each
# kernel of vmtest/vmtest.toml (under TCG) and runs them all inside it (see
# guest.sh).  Prints one summary line per kernel, then
#
#   vmtest: N passed, M failed
#
# and exits non-zero if any test failed in any guest, or a guest did not
# boot or finish.  Run vmtest/setup.sh first (scripts/test.sh does).
#
# Every integration test binary (tests/*.rs) is run, so a new one is picked
# up without a change here, except those in HOST_ONLY: tests that never
# touch the kernel and would only cost guest CPU time.
#
#   VMTEST_FILTER=REGEX          only the targets whose name matches
#   VMTEST_TIMEOUT=SECONDS       per kernel, boot included (default 1800)
#   SFUNNEL_PROP_CASES, SFUNNEL_RANDOM_INPUTS, SFUNNEL_FUZZ_CASES
#                                random-case counts in the guests (guest.sh
#                                has smaller defaults than the host's)
set -euo pipefail
cd "$(dirname "$0")/.."
REPO=$PWD
VMDIR=$REPO/vmtest
RUN=$VMDIR/cache/run
export PATH=$HOME/.cargo/bin:$PATH
HOST_ONLY=" rules "
FILTER=${VMTEST_FILTER:-.}
TIMEOUT=${VMTEST_TIMEOUT:-1800}

if [ ! -x "$VMDIR/cache/qemu-tcg" ] || ! command -v vmtest >/dev/null; then
  echo "vmtest/run.sh: run vmtest/setup.sh first" >&2
  exit 1
fi
mkdir -p "$RUN"

# --- build on the host --------------------------------------------------------
echo "vmtest: building the test binaries on the host"
cargo test --locked --no-run --message-format=json >"$RUN/build.json"
# One JSON object per line; the integration tests are kind "test".
: >"$RUN/tests.list"
while IFS=$'\t' read -r name exe; do
  case "$HOST_ONLY" in *" $name "*) continue ;; esac
  printf '%s\t%s\n' "$name" "$exe" >>"$RUN/tests.list"
done < <(grep '"reason":"compiler-artifact"' "$RUN/build.json" | grep '"kind":\["test"\]' |
  sed -n 's/.*"target":{[^}]*"name":"\([^"]*\)".*"executable":"\([^"]*\)".*/\1\t\2/p' | sort)
if [ ! -s "$RUN/tests.list" ]; then
  echo "vmtest/run.sh: found no test binaries in cargo's output" >&2
  exit 1
fi
echo "vmtest: test binaries: $(cut -f1 "$RUN/tests.list" | tr '\n' ' ')(host only: ${HOST_ONLY# })"

# The host's own attach path, for the table (tests/attach_path.rs; the host's
# `cargo test` has already run it in full).
host_line=
attach_bin=$(awk -F'\t' '$1 == "attach_path" {print $2}' "$RUN/tests.list")
if [ -n "$attach_bin" ] && [ "$(id -u)" -eq 0 ]; then
  host_attach=$("$attach_bin" --exact load_uses_the_kernels_attach_path 2>&1 | sed -nE 's/^attach path: ([a-z]+) .*/\1/p' || true)
  host_line=$(printf '%-12s kernel %-24s attach path %-7s (host, cargo test)' host "$(uname -r)" "${host_attach:-unknown}")
fi

# --- one guest per kernel -------------------------------------------------------
# vmtest resolves the kernel paths against the config's directory and runs
# qemu_command (./cache/qemu-tcg) from its working directory: run it from here.
cd "$VMDIR"
targets=$(sed -nE 's/^name = "([^"]+)"/\1/p' vmtest.toml | grep -E -- "$FILTER" || true)
if [ -z "$targets" ]; then
  echo "vmtest/run.sh: no target of vmtest.toml matches $FILTER" >&2
  exit 1
fi
total_passed=0
total_failed=0
lines=()
crashes=()
retries=()
t_all=$(date +%s)
for t in $targets; do
  echo
  echo "vmtest: ===== $t ====="
  t0=$(date +%s)
  for attempt in 1 2; do
    set +e
    VMTEST_NO_UI=1 timeout -k 30 "$TIMEOUT" vmtest -c "$VMDIR/vmtest.toml" -f "^$t\$" 2>&1 | tee "$RUN/$t.log"
    rc=${PIPESTATUS[0]}
    set -e
    # Kernel text patching (jump labels) under TCG has gone wrong twice in
    # many guest runs: an int3 Oops while booting, and a CPU that stayed at
    # a patched jump label's int3 (an RCU stall, which guest.sh turns into
    # a panic) while tests ran.  A guest that ended so, without its
    # summary, is run once more from the start, and the table says so;
    # the first log is kept.  A second one fails the kernel.
    if [ "$attempt" = 1 ] && ! grep -aqE "^SUMMARY $t " "$RUN/$t.log"; then
      again=
      if ! grep -aq '===> Running command' "$RUN/$t.log" && grep -aqE 'Oops|Kernel panic' "$RUN/$t.log"; then
        again="crashed while booting ($(grep -aoE 'Oops: [^[]*|Kernel panic[^\r]*' "$RUN/$t.log" | head -1 | tr -d '\r'))"
      elif grep -aqE 'rcu: INFO: rcu_[a-z]+ (self-)?detected stall' "$RUN/$t.log"; then
        again="stalled in the kernel while tests ran (a CPU at $(grep -aoE 'RIP: 0010:[^ ]+' "$RUN/$t.log" | head -1 | cut -d: -f3 | tr -d '\r'))"
      fi
      if [ -n "$again" ]; then
        cp "$RUN/$t.log" "$RUN/$t.attempt1.log"
        echo "vmtest: $t: the guest kernel $again; running it again (log: vmtest/cache/run/$t.attempt1.log)"
        retries+=("$t: $again")
        continue
      fi
    fi
    break
  done
  secs=$(($(date +%s) - t0))
  s=$(grep -aE "^SUMMARY $t " "$RUN/$t.log" | tail -1 | tr -d '\r' || true)
  if [ -z "$s" ]; then
    why="did not finish (vmtest status $rc$([ "$rc" -eq 124 ] && echo ", timed out after ${TIMEOUT}s"))"
    crash=$(grep -aoE 'BUG: soft lockup - CPU#[0-9]+ stuck for [0-9]+s! \[[^]]*\]|rcu: INFO: rcu_[a-z]+ (self-)?detected stall[^\r]*|Kernel panic - not syncing: .*' "$RUN/$t.log" | head -1 | tr -d '\r' || true)
    if [ -n "$crash" ]; then
      why="$why: the guest kernel said \"$crash\""
      # The first stack the kernel printed, repeated after the table (a CI
      # log is often read from its end).
      crashes+=("$t: $(grep -anE 'BUG: soft lockup|rcu: INFO: rcu_[a-z]+ (self-)?detected stall|Kernel panic' "$RUN/$t.log" | head -1 | cut -d: -f1)")
    fi
    why="$why; see vmtest/cache/run/$t.log"
    lines+=("$(printf '%-12s %s' "$t" "$why")")
    total_failed=$((total_failed + 1))
    continue
  fi
  field() { sed -nE "s/.* $1=([^ ]*).*/\1/p" <<<"$s"; }
  p=$(field passed)
  f=$(field failed)
  i=$(field ignored)
  if [ "$rc" -ne 0 ] && [ "$f" -eq 0 ]; then
    f=1 # the guest said all passed, but vmtest did not: count it
  fi
  total_passed=$((total_passed + p))
  total_failed=$((total_failed + f))
  lines+=("$(printf '%-12s kernel %-24s attach path %-7s %3d passed, %d failed, %d ignored  (%d s, tests %d s)' \
    "$t" "$(field kernel)" "$(field attach)" "$p" "$f" "$i" "$secs" "$(field seconds)")")
done
all_secs=$(($(date +%s) - t_all))

echo
echo "vmtest: ===== kernel matrix ====="
[ -z "$host_line" ] || echo "$host_line"
printf '%s\n' "${lines[@]}"
echo "vmtest: kernels: $(wc -w <<<"$targets"), ${all_secs} s"
for r in "${retries[@]}"; do echo "vmtest: run again after the guest kernel ${r#*: } (${r%%:*})"; done
for c in "${crashes[@]}"; do
  t=${c%%:*} n=${c##* }
  echo
  echo "vmtest: $t: the kernel's report (vmtest/cache/run/$t.log, from line $n):"
  tail -n +"$n" "$RUN/$t.log" | tr -d '\r' | grep -avE '^\s*$' | head -150
done
echo "vmtest: $total_passed passed, $total_failed failed"
[ "$total_failed" -eq 0 ]
