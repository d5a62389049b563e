#!/bin/bash
# Runs inside a vmtest guest: vmtest.toml's `command`, with vmtest/ as the
# working directory and the host's / as the guest's root (9p).  Runs every
# test binary listed in cache/run/tests.list (written by run.sh on the host:
# "name<TAB>path" per line) from the repository root, as `cargo test` would,
# and ends with one line that run.sh collects:
#
#   SUMMARY debian-6.1 kernel=6.1.0-56-amd64 attach=clsact passed=27 failed=0 ignored=1 seconds=190
#
# Exits non-zero if any test failed or any binary did not finish.
set -uo pipefail
target=${1:-guest}
vmdir=$PWD
repo=$(cd .. && pwd)
release=$(uname -r)
start=$(date +%s)

# Kernel messages (veth up/down, ...) would interleave with the test output
# on the console; warnings and worse still show, with the stack traces that
# come with them (printed at the default level, 4).
echo 5 >/proc/sys/kernel/printk
# A CPU stuck in the kernel for a minute ends the guest at once, with every
# CPU's stack on the console, rather than a silent wait for vmtest's
# timeout.  (A minute: TCG guests can be starved by a busy host for a while.)
echo 30 >/proc/sys/kernel/watchdog_thresh
echo 1 >/proc/sys/kernel/softlockup_panic
echo 1 >/proc/sys/kernel/softlockup_all_cpu_backtrace
# So does an RCU stall (a CPU that has not passed a quiescent state for a
# minute, say looping in softirq with interrupts on, which the soft lockup
# detector does not see).
echo 60 >/sys/module/rcupdate/parameters/rcu_cpu_stall_timeout 2>/dev/null || true
[ ! -e /proc/sys/kernel/panic_on_rcu_stall ] || echo 1 >/proc/sys/kernel/panic_on_rcu_stall

# Modules a test needs beyond those the initramfs loaded (an nft expression,
# a qdisc) are loaded on demand from this kernel's own package.
for d in "$vmdir"/cache/*/; do
  if [ "$(cat "$d/release" 2>/dev/null)" = "$release" ]; then
    echo "${d%/}/modprobe" >/proc/sys/kernel/modprobe
  fi
done
mountpoint -q /sys/fs/bpf || mount -t bpf bpf /sys/fs/bpf

# Under TCG a CPU can stay stuck at the int3 of a jump label that another
# CPU patched: seen once, a 6.1 guest's CPU 0 looped at
# ip_local_deliver+0x5d (the NF_HOOK static branch, asm_exc_int3 in its
# trace) for the rest of the run, while other tests' iptables rules came
# and went.  The tests switch some static keys on and off many times: a
# netfilter hook registered or not (iptables, conntrack), a tc hook on any
# interface or none (clsact, TCX), RPS on some receive queue or none (the
# detour's helpers).  Each holds for the whole guest here, so that none is
# patched while the tests run: no-op mangle rules on every hook for IPv4
# and IPv6 in the guest's own namespace, and a veth with a
# clsact qdisc and an RPS mask.  The tests' namespaces see none of it.
keep_keys() {
  local ipt c
  for ipt in iptables ip6tables; do
    for c in PREROUTING INPUT FORWARD OUTPUT POSTROUTING; do
      "$ipt" -t mangle -A "$c" || return 1
    done
  done
  ip link add sfvmkeep0 type veth peer name sfvmkeep1 && ip link set sfvmkeep0 up &&
    tc qdisc add dev sfvmkeep0 clsact &&
    echo 1 >/sys/class/net/sfvmkeep0/queues/rx-0/rps_cpus
}
keep_keys || echo "=== $target: WARNING: could not hold the static keys on (see above); a TCG text-patching hang is more likely"
modules_before=$(cut -d' ' -f1 /proc/modules | sort)

# The host's /tmp is 9p here: keep scratch files in guest memory.
mkdir -p /mnt/tmp
export TMPDIR=/mnt/tmp

# The guest's CPU is about 18x slower (TCG): smaller random-case counts for
# the tests that have a knob (tests/datapath.rs, tests/rules.rs; bulk size in tests/gso.rs; pod cycles in
# tests/lifecycle.rs).  Values set
# on the host win (vmtest passes its environment into the guest).
export SFUNNEL_PROP_CASES=${SFUNNEL_PROP_CASES:-4096}
export SFUNNEL_LOOKUP_RULESETS=${SFUNNEL_LOOKUP_RULESETS:-40}
export SFUNNEL_RANDOM_INPUTS=${SFUNNEL_RANDOM_INPUTS:-40000}
export SFUNNEL_FUZZ_CASES=${SFUNNEL_FUZZ_CASES:-2000}
export SFUNNEL_BULK_MIB=${SFUNNEL_BULK_MIB:-8}
# Pods that come and go in tests/lifecycle.rs (100 on the host): every
# kind of step each cycle, fewer cycles.
export SFUNNEL_CHURN_CYCLES=${SFUNNEL_CHURN_CYCLES:-12}
# A binary that runs longer than this is killed and counted as failed.
bin_timeout=${SFUNNEL_VMTEST_BIN_TIMEOUT:-900}

echo "=== $target: kernel $release ($(nproc) CPUs, TCG), btf: $([ -e /sys/kernel/btf/vmlinux ] && echo yes || echo NO)"
echo "=== $target: random cases: SFUNNEL_PROP_CASES=$SFUNNEL_PROP_CASES SFUNNEL_RANDOM_INPUTS=$SFUNNEL_RANDOM_INPUTS SFUNNEL_LOOKUP_RULESETS=$SFUNNEL_LOOKUP_RULESETS"

passed=0
failed=0
ignored=0
attach=unknown
failed_bins=()
list=$vmdir/cache/run/tests.list
if [ ! -s "$list" ]; then
  echo "=== $target: no test list at $list (run vmtest/run.sh)"
  failed=1
  failed_bins+=("(no tests)")
fi
while IFS=$'\t' read -r name bin; do
  [ -n "$name" ] || continue
  echo "=== $target: $name"
  out=$TMPDIR/$name.out
  t0=$(date +%s)
  (cd "$repo" && timeout -k 10 "$bin_timeout" "$bin" 2>&1) | tee "$out"
  rc=${PIPESTATUS[0]}
  # libtest: "test result: ok. 6 passed; 0 failed; 1 ignored; ..."
  result=$(grep -E '^test result: ' "$out" | tail -1)
  p=$(sed -nE 's/.* ([0-9]+) passed;.*/\1/p' <<<"$result")
  f=$(sed -nE 's/.* ([0-9]+) failed;.*/\1/p' <<<"$result")
  i=$(sed -nE 's/.* ([0-9]+) ignored;.*/\1/p' <<<"$result")
  passed=$((passed + ${p:-0}))
  failed=$((failed + ${f:-0}))
  ignored=$((ignored + ${i:-0}))
  if [ "$rc" -ne 0 ] && [ "${f:-0}" -eq 0 ]; then
    # Crashed, timed out or never got to its summary: one failure.
    echo "=== $target: $name exited with status $rc before reporting a failed test"
    failed=$((failed + 1))
  fi
  [ "$rc" -eq 0 ] || failed_bins+=("$name")
  a=$(sed -nE 's/^attach path: ([a-z]+) .*/\1/p' "$out" | tail -1)
  [ -z "$a" ] || attach=$a
  echo "=== $target: $name: ${p:-0} passed, ${f:-0} failed, ${i:-0} ignored, $(($(date +%s) - t0)) s"
done <"$list"

loaded=$(comm -13 <(echo "$modules_before") <(cut -d' ' -f1 /proc/modules | sort) | tr '\n' ' ')
echo "=== $target: modules loaded on demand: ${loaded:-none}"
[ ${#failed_bins[@]} -eq 0 ] || echo "=== $target: FAILED: ${failed_bins[*]}"
echo "SUMMARY $target kernel=$release attach=$attach passed=$passed failed=$failed ignored=$ignored seconds=$(($(date +%s) - start))"
[ "$failed" -eq 0 ]
