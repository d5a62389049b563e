#!/usr/bin/env bash
# Sets up a fresh machine, builds sfunnel and runs its built-in demo in
# throwaway namespaces (which it removes again).  Runs as root: started as
# a user, it runs itself again with sudo (scripts/need-root-and-cargo.sh).
set -euo pipefail
cd "$(dirname "$0")/.."
. scripts/need-root-and-cargo.sh
need_root_and_cargo "$PWD/scripts/demo.sh" "$@"

scripts/setup.sh
cargo build --release --locked
exec "${CARGO_TARGET_DIR:-target}/release/sfunnel" demo
