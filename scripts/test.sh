#!/usr/bin/env bash
# Sets up a fresh machine and runs every test.  Runs as root: started as a
# user, it runs itself again with sudo (scripts/need-root-and-cargo.sh).
# The root tests (PROG_TEST_RUN, namespaces, the static binary in a
# chroot) fail loudly without root, never skip silently.
#
# Then the kernel matrix: every root test again inside Debian's 6.1 (clsact)
# and 6.12 (TCX) kernels under vmtest (vmtest/setup.sh, vmtest/run.sh).
# SFUNNEL_SKIP_VMTEST=1 skips the matrix locally; where CI is set it always
# runs.
set -euo pipefail
cd "$(dirname "$0")/.."
. scripts/need-root-and-cargo.sh
need_root_and_cargo "$PWD/scripts/test.sh" "$@"

t_start=$(date +%s)
t_host=
t_vm_setup=
t_vm_run=
timing() {
  local now
  now=$(date +%s)
  echo
  echo "test.sh: wall time $((now - t_start)) s: host tests ${t_host:-?} s," \
    "kernel matrix $([ -n "$t_vm_run" ] && echo "$((t_vm_setup + t_vm_run)) s (setup $t_vm_setup s, guests $t_vm_run s)" || echo "${vm_state:-not run}")"
}
trap timing EXIT

scripts/setup.sh
cargo test --locked
scripts/static-check.sh
scripts/validate-k8s.sh
t_host=$(($(date +%s) - t_start))

if [ "${SFUNNEL_SKIP_VMTEST:-0}" = 1 ] && [ -z "${CI:-}" ]; then
  echo "test.sh: SFUNNEL_SKIP_VMTEST=1: the kernel matrix (vmtest/run.sh) is SKIPPED"
  vm_state=skipped
  exit 0
fi
[ "${SFUNNEL_SKIP_VMTEST:-0}" != 1 ] || echo "test.sh: CI is set: SFUNNEL_SKIP_VMTEST ignored"
vm_state="failed in setup"
t=$(date +%s)
vmtest/setup.sh
t_vm_setup=$(($(date +%s) - t))
vm_state="did not finish"
t=$(date +%s)
trap 't_vm_run=$(($(date +%s) - t)); timing' EXIT
vmtest/run.sh
