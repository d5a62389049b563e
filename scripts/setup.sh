#!/usr/bin/env bash
# Installs what building and testing sfunnel needs on a fresh Debian/Ubuntu
# machine with a Rust toolchain.  Safe to run again: it skips what is there.
set -euo pipefail

PACKAGES=(
  clang llvm            # compiles bpf/*.bpf.c at build time (never at run time)
  libelf-dev zlib1g-dev pkg-config   # libbpf-sys
  iproute2 iptables ethtool iperf3 tcpdump bpftool conntrack   # system tests and demo
  socat                 # the README's host quick start (tests/readme.rs)
  python3 python3-venv   # scripts/validate-k8s.sh: kubernetes-validate, hadolint (from PyPI, in a venv)
)

"$(dirname "$0")/apt-ensure.sh" "${PACKAGES[@]}"

if ! command -v cargo >/dev/null; then
  echo "scripts/setup.sh: cargo not found: install a Rust toolchain (1.82 or newer) first" >&2
  exit 1
fi

# The BPF filesystem, where sfunnel pins its programs and maps.
if [ "$(id -u)" -eq 0 ] && ! mountpoint -q /sys/fs/bpf; then
  mount -t bpf bpf /sys/fs/bpf
fi

# promtool, the Prometheus project's checker, validates `sfunnel metrics` in
# the tests (tests/metrics.rs).  It comes from Debian's prometheus package,
# of which only the tool is unpacked: installing the package would start a
# Prometheus server.
PROMTOOL="$(cd "$(dirname "$0")/.." && pwd)/target/tools/promtool"
if [ ! -x "$PROMTOOL" ]; then
  tmp=$(mktemp -d)
  chmod 755 "$tmp"   # apt's download user writes there
  if (cd "$tmp" &&
    { apt-get download -qq prometheus 2>/dev/null || { apt-get update -qq && apt-get download -qq prometheus; }; } &&
    dpkg-deb --fsys-tarfile prometheus_*.deb | tar -x ./usr/bin/promtool); then
    mkdir -p "$(dirname "$PROMTOOL")"
    mv "$tmp/usr/bin/promtool" "$PROMTOOL"
    echo "setup.sh: promtool unpacked to $PROMTOOL"
  else
    # Only tests/metrics.rs needs it, and it fails loudly without it.
    echo "setup.sh: WARNING: could not fetch Debian's prometheus package for promtool; tests/metrics.rs will fail" >&2
  fi
  rm -rf "$tmp"
fi
