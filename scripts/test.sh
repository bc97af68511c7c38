#!/usr/bin/env bash
# Runs every test of blockguard: unit, property, crash-simulation, corruption and the
# integration tests that drive the real binary with real NBD and FUSE clients.
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/install-deps.sh
log=$(mktemp)
trap 'rm -f "$log"' EXIT
# The `ci` profile (Cargo.toml): optimized, with debug assertions and overflow checks on.
set +e
cargo test --workspace --profile ci "$@" 2>&1 | tee "$log"
status=${PIPESTATUS[0]}
set -e
# One closing line for the whole run (cargo prints one per test binary).
passed=$(grep -Eo 'test result: [a-zA-Z]+\. [0-9]+ passed' "$log" | awk '{s+=$4} END {print s+0}')
failed=$(grep -Eo '[0-9]+ failed;' "$log" | awk '{s+=$1} END {print s+0}')
echo "blockguard: $passed passed, $failed failed"
exit "$status"
