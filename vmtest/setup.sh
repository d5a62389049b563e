#!/usr/bin/env bash
# Prepares the kernel test matrix of vmtest/vmtest.toml.  Safe to run again:
# it skips what is already there.
#
#  - apt packages: qemu-system-x86, qemu-guest-agent (the guest runs the
#    host's qemu-ga over the 9p root), busybox-static, cpio, kmod, xz-utils;
#  - vmtest 0.18 (cargo install --locked), unless one is on PATH;
#  - for each kernel of KERNELS below: Debian's kernel package fetched with
#    `apt-get download` (a meta-package is followed to the real image) and
#    unpacked with `dpkg -x` into vmtest/cache/<name>/root;
#  - a busybox initramfs per kernel: Debian builds 9p, virtio and the
#    networking the tests need as modules, so /init insmods them from the
#    same package, mounts the 9p root that vmtest shares and switch_roots
#    into vmtest's own init;
#  - vmtest/cache/qemu-tcg, the qemu_command: /dev/kvm here (kvm_pvm) cannot
#    run ordinary guests, so it drops -enable-kvm and maps `-cpu host` to
#    `-cpu max` (TCG), and adds the kernel's initramfs.
#
# Nothing here is committed: vmtest/cache/ is git-ignored.
# VMTEST_REFRESH=1 fetches the kernel packages again (for new Debian updates).
set -euo pipefail
SELF=$(readlink -f "$0")
cd "$(dirname "$SELF")"
VMDIR=$PWD
CACHE=$VMDIR/cache

# name (the cache directory and vmtest target suffix) = Debian package.
KERNELS=(
  "6.1=linux-image-amd64"        # Debian 12's default kernel: no TCX, clsact path
  "6.12=linux-image-6.12-amd64"  # Debian 12's 6.12 (security updates): TCX path
)

# Loaded by the initramfs in this order (with their dependencies, which
# modprobe resolves).  Anything else a test asks for later is loaded on
# demand through cache/<name>/modprobe (see guest.sh).
MODULES_BOOT=(virtio_pci virtio_console 9pnet_virtio 9p)
MODULES_NET=(veth dummy sch_ingress cls_bpf af_packet)
MODULES_NAT_COMMON=(nf_conntrack nf_nat nf_defrag_ipv4 x_tables xt_nat xt_MASQUERADE xt_tcpudp xt_conntrack)
MODULES_NAT_NFT=(nf_tables nft_compat nft_chain_nat nft_nat nft_masq nft_ct)
MODULES_NAT_LEGACY=(ip_tables iptable_nat iptable_filter)

log() { echo "vmtest/setup: $*"; }

need_root() {
  if [ "$(id -u)" -ne 0 ]; then
    echo "vmtest/setup.sh: run as root (it installs packages and makes device nodes)" >&2
    exit 1
  fi
}

# --- apt packages -----------------------------------------------------------
PACKAGES=(qemu-system-x86 qemu-guest-agent busybox-static cpio kmod xz-utils zstd)
"$VMDIR/../scripts/apt-ensure.sh" "${PACKAGES[@]}"

# --- vmtest -------------------------------------------------------------------
export PATH=$HOME/.cargo/bin:$PATH
if ! vmtest --version 2>/dev/null | grep -q '^vmtest 0\.18\.'; then
  log "installing vmtest 0.18 (cargo install --locked, about 2 minutes)"
  cargo install --locked --quiet vmtest --version '~0.18'
fi

# --- which iptables the guests will run ----------------------------------------
# The guests run the host's userspace (9p root), so the host's iptables
# alternative decides which kernel modules NAT needs.
ipt=$(readlink -f "$(command -v iptables 2>/dev/null || echo /usr/sbin/iptables)" 2>/dev/null || true)
case "$ipt" in
  *legacy*) MODULES_NAT=("${MODULES_NAT_COMMON[@]}" "${MODULES_NAT_LEGACY[@]}"); ipt_backend=legacy ;;
  *) MODULES_NAT=("${MODULES_NAT_COMMON[@]}" "${MODULES_NAT_NFT[@]}"); ipt_backend=nft ;;
esac
MODULES=("${MODULES_BOOT[@]}" "${MODULES_NET[@]}" "${MODULES_NAT[@]}")

mkdir -p "$CACHE/debs"

# Follows meta-packages (linux-image-amd64 → linux-image-6.1.0-N-amd64) to
# the package that ships /boot/vmlinuz-*.
resolve_image() {
  local pkg=$1 dep i
  for i in 1 2 3 4; do
    dep=$(apt-cache depends "$pkg" 2>/dev/null | awk '/^ *Depends: linux-image-/{print $2; exit}')
    [ -n "$dep" ] || { echo "$pkg"; return; }
    pkg=$dep
  done
  echo "$pkg"
}

fetch_kernel() { # name package
  local name=$1 meta=$2 dir=$CACHE/$1 pkg deb
  if [ -s "$dir/release" ] && [ -e "$dir/vmlinuz" ] && [ "${VMTEST_REFRESH:-0}" != 1 ]; then
    return
  fi
  need_root
  if ! apt-cache show "$meta" >/dev/null 2>&1; then
    apt-get update -qq
  fi
  pkg=$(resolve_image "$meta")
  log "$name: fetching $pkg (from $meta)"
  (cd "$CACHE/debs" && apt-get download -q -o APT::Sandbox::User=root "$pkg" >/dev/null)
  deb=$(ls -t "$CACHE/debs/${pkg}_"*.deb | head -1)
  rm -rf "$dir.tmp"
  mkdir -p "$dir.tmp/root"
  dpkg -x "$deb" "$dir.tmp/root"
  local vmlinuz
  vmlinuz=$(ls "$dir.tmp/root/boot/"vmlinuz-* | head -1)
  local release=${vmlinuz##*/vmlinuz-}
  # Modules go where `modprobe -d ROOT` looks: ROOT/lib/modules/RELEASE.
  if [ ! -d "$dir.tmp/root/lib/modules/$release" ] && [ -d "$dir.tmp/root/usr/lib/modules/$release" ]; then
    mkdir -p "$dir.tmp/root/lib/modules"
    ln -s "../../usr/lib/modules/$release" "$dir.tmp/root/lib/modules/$release"
  fi
  depmod -b "$dir.tmp/root" "$release"
  ln -s "root/boot/vmlinuz-$release" "$dir.tmp/vmlinuz"
  echo "$release" >"$dir.tmp/release"
  echo "${deb##*/}" >"$dir.tmp/package"
  rm -f "$deb" # unpacked: the package itself is not needed again
  rm -rf "$dir"
  mv "$dir.tmp" "$dir"
}

# The initramfs's /init: busybox sh.  Loads the modules listed in
# /modules.order, mounts the 9p root the way vmtest's kernel command line
# asks for (rootfstype=9p rootflags=... with tag /dev/root), and hands over
# to vmtest's init (init=...).
write_init() {
  cat >"$1" <<'EOF'
#!/bin/sh
export PATH=/bin
mount -t proc proc /proc
mount -t sysfs sysfs /sys
mount -t devtmpfs devtmpfs /dev
echo "initramfs: kernel $(uname -r), loading modules"
failed=
while read -r m; do
  insmod "/modules/$m" 2>/dev/null || failed="$failed ${m%.ko}"
done </modules.order
[ -z "$failed" ] || echo "initramfs: insmod failed:$failed"
init=/sbin/init
flags=trans=virtio
for arg in $(cat /proc/cmdline); do
  case "$arg" in
    init=*) init=${arg#init=} ;;
    rootflags=*) flags=${arg#rootflags=} ;;
  esac
done
mkdir -p /newroot
if ! mount -t 9p -o "$flags" /dev/root /newroot; then
  echo "initramfs: cannot mount the 9p root; modules:"; cat /proc/modules
  sleep 2; poweroff -f
fi
umount /sys
umount /proc
mount --move /dev /newroot/dev
exec switch_root /newroot "$init"
EOF
  chmod 755 "$1"
}

build_initramfs() { # name
  local name=$1 dir=$CACHE/$1 release staging m line ko sum
  release=$(cat "$dir/release")
  staging=$(mktemp -d)
  mkdir -p "$staging"/{bin,dev,proc,sys,modules,newroot}
  cp /bin/busybox "$staging/bin/busybox"
  for a in sh mount umount insmod mkdir cat echo sleep switch_root poweroff uname; do
    ln -s busybox "$staging/bin/$a"
  done
  write_init "$staging/init"
  : >"$staging/modules.order"
  local seen=" " absent=()
  for m in "${MODULES[@]}"; do
    if ! line=$(modprobe -d "$dir/root" -S "$release" --show-depends "$m" 2>/dev/null); then
      absent+=("$m")
      continue
    fi
    while read -r kind ko _; do
      [ "$kind" = insmod ] || continue # "builtin x": nothing to load
      local base=${ko##*/}
      base=${base%.xz}
      base=${base%.zst}
      base=${base%.gz}
      case "$seen" in *" $base "*) continue ;; esac
      seen="$seen$base "
      # Decompressed here, so that neither busybox nor the kernel needs to.
      case "$ko" in
        *.xz) xz -dc "$ko" >"$staging/modules/$base" ;;
        *.zst) zstd -qdc "$ko" >"$staging/modules/$base" ;;
        *.gz) gzip -dc "$ko" >"$staging/modules/$base" ;;
        *) cp "$ko" "$staging/modules/$base" ;;
      esac
      echo "$base" >>"$staging/modules.order"
    done <<<"$line"
  done
  mknod -m 600 "$staging/dev/console" c 5 1
  mknod -m 666 "$staging/dev/null" c 1 3
  (cd "$staging" && find . | LC_ALL=C sort | cpio -o -H newc --quiet --reproducible) | gzip -n -1 >"$dir/initramfs.cpio.gz.tmp"
  mv "$dir/initramfs.cpio.gz.tmp" "$dir/initramfs.cpio.gz"
  log "$name: kernel $release: initramfs with $(wc -l <"$staging/modules.order") modules" \
    "(iptables backend: $ipt_backend)${absent[*]:+; not in this kernel: ${absent[*]}}"
  rm -rf "$staging"
}

# The on-demand module loader for the guest (the kernel's
# /proc/sys/kernel/modprobe): the host's kmod, pointed at this kernel's tree.
write_modprobe() { # name
  local dir=$CACHE/$1
  cat >"$dir/modprobe.tmp" <<'EOF'
#!/bin/sh
# Set as /proc/sys/kernel/modprobe in the guest by vmtest/guest.sh.
exec /sbin/modprobe -d "${0%/*}/root" "$@"
EOF
  chmod 755 "$dir/modprobe.tmp"
  mv "$dir/modprobe.tmp" "$dir/modprobe"
}

write_qemu_wrapper() {
  cat >"$CACHE/qemu-tcg.tmp" <<'EOF'
#!/bin/bash
# vmtest's qemu_command (written by vmtest/setup.sh).  /dev/kvm on this
# machine kind cannot run ordinary guests, so run under TCG: drop
# -enable-kvm, turn `-cpu host` into `-cpu max`, and boot the kernel with the
# initramfs that setup.sh built next to it.
args=()
initrd=
while [ $# -gt 0 ]; do
  case "$1" in
    -enable-kvm) ;;
    -cpu)
      shift
      if [ "$1" = host ]; then args+=(-cpu max); else args+=(-cpu "$1"); fi
      ;;
    -kernel)
      shift
      args+=(-kernel "$1")
      d=$(dirname "$(readlink -f "$1")")
      for f in "$d/initramfs.cpio.gz" "$d/../../initramfs.cpio.gz"; do
        [ -e "$f" ] && initrd=$(readlink -f "$f") && break
      done
      ;;
    *) args+=("$1") ;;
  esac
  shift
done
[ -n "$initrd" ] && args+=(-initrd "$initrd")
exec qemu-system-x86_64 "${args[@]}"
EOF
  chmod 755 "$CACHE/qemu-tcg.tmp"
  mv "$CACHE/qemu-tcg.tmp" "$CACHE/qemu-tcg"
}

for k in "${KERNELS[@]}"; do
  name=${k%%=*}
  pkg=${k#*=}
  fetch_kernel "$name" "$pkg"
  # Rebuilt when this script or the kernel changed (cheap: a few seconds).
  stamp="$(sha256sum "$SELF" | cut -d' ' -f1) $(cat "$CACHE/$name/package") $ipt_backend"
  if [ ! -s "$CACHE/$name/initramfs.cpio.gz" ] || [ "$(cat "$CACHE/$name/initramfs.stamp" 2>/dev/null)" != "$stamp" ]; then
    need_root
    build_initramfs "$name"
    echo "$stamp" >"$CACHE/$name/initramfs.stamp"
  fi
  write_modprobe "$name"
done
write_qemu_wrapper
for k in "${KERNELS[@]}"; do
  name=${k%%=*}
  log "$name: ready: $(cat "$CACHE/$name/package") (kernel $(cat "$CACHE/$name/release"))"
done
