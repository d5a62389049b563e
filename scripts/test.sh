#!/usr/bin/env bash
# Sets up a fresh machine and runs every test.  Root tests (PROG_TEST_RUN,
# namespaces, the static binary in a chroot) need root; without it they
# fail loudly, never skip silently.
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/setup.sh
cargo test --locked
scripts/static-check.sh
