#!/usr/bin/env bash
# Runs every test of blockguard: unit, property, crash-simulation, corruption and the
# integration tests that drive the real binary with real NBD and FUSE clients.
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/install-deps.sh
# Release mode: the crash simulator and the NBD/FUSE tests move real amounts of data.
cargo test --workspace --release "$@"
