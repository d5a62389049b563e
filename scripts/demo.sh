#!/usr/bin/env bash
# Sets up a fresh machine, builds sfunnel and runs its built-in demo in
# throwaway namespaces (which it removes again).  Needs root.
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/setup.sh
cargo build --release --locked
exec target/release/sfunnel demo
