#!/usr/bin/env bash
# The main job on an embedded default: creates a small volume (demo.bgv, 256 MiB, sparse)
# if it is not there yet and serves it over NBD on 127.0.0.1:10809 until Ctrl-C.
set -euo pipefail
cd "$(dirname "$0")/.."
cargo build --release --quiet
exec "${CARGO_TARGET_DIR:-target}/release/blockguard" serve demo.bgv --create 256M --listen 127.0.0.1:10809 "$@"
