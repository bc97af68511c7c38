#!/usr/bin/env bash
# Online re-tag benchmark: how fast `blockguard retag` switches a fully written volume to
# another profile of the same tag size, next to a plain sequential read of the same file.
# Formats a volume (default 1 GiB, crc32c), imports random data into all of it, then times
#   - a raw read of the volume file (`dd` to /dev/null, 1 MiB reads), and
#   - `blockguard retag VOL --profile TO` (default xxh3): every block read, verified under
#     the old profile, re-tagged under the new one, the metadata rewritten and flushed,
# each with the file in the page cache (read once before) and with its pages dropped
# (`dd iflag=nocache count=0`). Throughput: the volume's logical size over wall time.
#
#   bench/retag.sh [DIR]                  # DIR defaults to /var/tmp
#   SIZE=1G FROM=crc32c TO=xxh3 bench/retag.sh /var/tmp
#   ROOM=32 TO=blake3-keyed bench/retag.sh   # across tag sizes: format --tag-room 32; keyed
#                                             # profiles get a key file made here
set -euo pipefail
cd "$(dirname "$0")/.."
dir="${1:-/var/tmp}"
size="${SIZE:-1G}"
from="${FROM:-crc32c}"
to="${TO:-xxh3}"
bin="${BLOCKGUARD:-${CARGO_TARGET_DIR:-target}/release/blockguard}"
[ -x "$bin" ] || cargo build --release -q -p blockguard-cli
work="$(mktemp -d "$dir/bg-retag.XXXXXX")"
trap 'rm -rf "$work"' EXIT
vol="$work/v.bgv"
raw="$work/src.raw"

key="$work/key"
head -c 32 /dev/urandom >"$key"
keyed() { case "$1" in hmac-sha256|blake3-keyed) return 0;; esac; return 1; }
# The key arguments of a command on a volume of profile $1 (re-tagged to $2, if given).
keys() {
    if keyed "$1"; then printf -- '--key-file\n%s\n' "$key"; fi
    if [ -n "${2:-}" ] && keyed "$2"; then printf -- '--new-key-file\n%s\n' "$key"; fi
}
room=()
[ -n "${ROOM:-}" ] && room=(--tag-room "$ROOM")
mapfile -t k < <(keys "$from")
"$bin" format "$vol" --size "$size" --profile "$from" "${room[@]}" "${k[@]}" >/dev/null
bytes=$("$bin" info "$vol" --json | python3 -c 'import json,sys; print(json.load(sys.stdin)["size"])')
head -c "$bytes" /dev/urandom >"$raw"
"$bin" import "$raw" "$vol" --force "${k[@]}" >/dev/null
rm -f "$raw"
mib=$((bytes >> 20))

now() { date +%s.%N; }
rate() { python3 -c "import sys; a, b = float(sys.argv[1]), float(sys.argv[2]); print(f'{$bytes / 1e6 / (b - a):.0f} MB/s ({b - a:.2f} s)')" "$1" "$2"; }
# This file's cached pages dropped (no root needed), or read once so everything is cached.
cold() { dd if="$vol" iflag=nocache count=0 status=none; }
warm() { dd if="$vol" of=/dev/null bs=1M status=none; }

echo "volume: $mib MiB, $("$bin" info "$vol" --json | python3 -c 'import json,sys; j=json.load(sys.stdin); print(j["geometry"]["groups"], "groups of", j["geometry"]["group_blocks"], "blocks")')"
a="$from"; b="$to"
for cache in warm cold; do
    "$cache"; t0=$(now); dd if="$vol" of=/dev/null bs=1M status=none; t1=$(now)
    mapfile -t k < <(keys "$a" "$b")
    "$cache"; t2=$(now); "$bin" retag "$vol" --profile "$b" "${k[@]}" >/dev/null; t3=$(now)
    echo "$cache  raw read (dd bs=1M):  $(rate "$t0" "$t1")"
    echo "$cache  retag $a -> $b:  $(rate "$t2" "$t3")"
    a="$b"; b="$from"
done
mapfile -t k < <(keys "$from")
"$bin" check "$vol" "${k[@]}" >/dev/null && echo "check: clean"
