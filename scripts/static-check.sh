#!/usr/bin/env bash
# Builds the static binary and shows that it loads, attaches and unloads
# with nothing else on the filesystem: a chroot holding only the binary,
# /proc, /sys and /sys/fs/bpf, entered into a throwaway namespace.
# Prints `ldd` and `file`, and ends with a `N passed, N failed` line.
set -euo pipefail
cd "$(dirname "$0")/.."

TARGET=x86_64-unknown-linux-gnu
RUSTFLAGS='-C target-feature=+crt-static' LIBBPF_SYS_LIBRARY_PATH=/usr/lib/$(gcc -print-multiarch) \
  cargo build --release --locked --features static --target "$TARGET" >/dev/null
BIN=target/$TARGET/release/sfunnel

passed=0
failed=0
check() { # description, then a command that must succeed
  local what=$1; shift
  if "$@"; then echo "ok: $what"; passed=$((passed + 1)); else echo "FAILED: $what"; failed=$((failed + 1)); fi
}

echo "file: $(file -b "$BIN")"
echo "ldd:  $(ldd "$BIN" 2>&1 | tr -d '\t')"
check "ldd says it is not dynamic" bash -c "ldd '$BIN' 2>&1 | grep -Eq 'not a dynamic executable|statically linked'"
check "file says it is statically linked" bash -c "file -b '$BIN' | grep -q 'static'"

NS=sfstatic-$$
ROOT=$(mktemp -d /tmp/sfstatic.XXXXXX)
cleanup() {
  umount "$ROOT/sys/fs/bpf" 2>/dev/null || true
  umount "$ROOT/sys" 2>/dev/null || true
  umount "$ROOT/proc" 2>/dev/null || true
  ip netns del "$NS" 2>/dev/null || true
  rm -rf "$ROOT"
}
trap cleanup EXIT

mkdir -p "$ROOT/proc" "$ROOT/sys"
cp "$BIN" "$ROOT/sfunnel"
mount -t proc proc "$ROOT/proc"
mount -t sysfs sysfs "$ROOT/sys"
mount --bind /sys/fs/bpf "$ROOT/sys/fs/bpf"
ip netns add "$NS"
ip -n "$NS" link add sfstatic0 type veth peer name sfstatic1
ip -n "$NS" link set sfstatic0 up
echo "chroot holds: $(cd "$ROOT" && find . -maxdepth 1 -mindepth 1 | sort | tr '\n' ' ')"

in_chroot() { nsenter --net="/var/run/netns/$NS" chroot "$ROOT" /sfunnel "$@"; }
# No tree yet (nothing has loaded on this machine) is no pins, not an error.
pins() { if [ -d /sys/fs/bpf/sfunnel ]; then find /sys/fs/bpf/sfunnel -type f | sort; fi; }
pins_before=$(pins)
check "loads and attaches inside the chroot" \
  in_chroot load -i sfstatic0 -d both 'udp dport 4739 actions funnel tcp sport 540 dport 80'
# The detour's far ends steer their segments to the online CPUs: the mask
# is written through a sysfs of the namespace mounted nowhere, which needs
# no mount point (a chroot has none to spare).
steered() {
  local idx d m
  idx=$(ip -n "$NS" -o link show sfstatic0 | cut -d: -f1)
  for d in "sfes$idx" "sfis$idx"; do
    m=$(ip netns exec "$NS" cat "/sys/class/net/$d/queues/rx-0/rps_cpus") || return 1
    echo "  $d rps_cpus $m"
    [ -n "${m//[0,]/}" ] || return 1
  done
}
check "steers the detour's segments from inside the chroot" steered
check "reruns in place inside the chroot" \
  in_chroot load -i sfstatic0 -d both 'udp dport 4739 actions funnel udp sport 541 dport 81'
check "status sees both hooks" bash -c "'$BIN' status | grep -c 'sfstatic0' | grep -qx 2"
check "unloads inside the chroot" in_chroot unload -i sfstatic0 -d both
check "nothing of it left: no status entry, no new pin" \
  bash -c "! '$BIN' status | grep -q sfstatic0 && [ \"\$(find /sys/fs/bpf/sfunnel -type f 2>/dev/null | sort)\" = '$pins_before' ]"

echo "static-binary: $passed passed, $failed failed"
[ "$failed" -eq 0 ]
