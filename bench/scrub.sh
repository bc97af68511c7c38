#!/usr/bin/env bash
# Scrub benchmark: `blockguard scrub` of a fully written volume against a raw sequential read of
# the same file (`dd bs=1M`), with the page cache equalized: cold (the file's cached pages dropped
# before every run with `dd iflag=nocache count=0`, which drops this file's pages only, not the
# whole machine's cache) and warm (the file read once beforehand, so both read from memory).
# Best and median of RUNS for each, and the median ratio of back-to-back pairs; the two
# commands alternate order between runs.
#
#   bench/scrub.sh [DIR]                 # DIR defaults to /var/tmp
#   SIZE_MIB=1024 RUNS=5 bench/scrub.sh /var/tmp
#
# Throughput is bytes per second of wall time: the whole volume file for dd, the volume's
# logical size for the scrub (which also reads the metadata, about 0.4 % more), so the ratio
# slightly favours dd. Uses SIZE_MIB MiB of disk for the volume and as much for its source.
set -euo pipefail
cd "$(dirname "$0")/.."
dir="${1:-/var/tmp}"
mib="${SIZE_MIB:-1024}"
runs="${RUNS:-5}"
bin="${BLOCKGUARD:-${CARGO_TARGET_DIR:-target}/release/blockguard}"
[ -x "$bin" ] || cargo build --release -q -p blockguard-cli
work="$(mktemp -d "$dir/bg-scrub.XXXXXX")"
trap 'rm -rf "$work"' EXIT
vol="$work/v.bgv"

head -c "$((mib << 20))" /dev/urandom >"$work/src.raw"
"$bin" format "$vol" --size "${mib}M" >/dev/null
"$bin" import "$work/src.raw" "$vol" --force >/dev/null
rm -f "$work/src.raw"
sync
file_bytes=$(stat -c %s "$vol")
vol_bytes=$((mib << 20))

drop() { dd if="$vol" iflag=nocache count=0 status=none; }
warm() { cat "$vol" >/dev/null; }
# Prints the wall seconds of one command.
timed() {
    local start end
    start=$(date +%s.%N)
    "$@" >/dev/null 2>&1
    end=$(date +%s.%N)
    echo "$end - $start" | bc
}
raw() { timed dd if="$vol" of=/dev/null bs=1M; }
scrub() { timed "$bin" scrub "$vol"; }
best() { printf '%s\n' "$@" | sort -g | head -1; }

for cache in cold warm; do
    prep=drop
    [ "$cache" = warm ] && prep=warm
    raws=()
    scrubs=()
    for i in $(seq "$runs"); do
        if [ $((i % 2)) = 1 ]; then
            $prep; raws+=("$(raw)")
            $prep; scrubs+=("$(scrub)")
        else
            $prep; scrubs+=("$(scrub)")
            $prep; raws+=("$(raw)")
        fi
    done
    r=$(best "${raws[@]}")
    s=$(best "${scrubs[@]}")
    python3 - "$cache" "$r" "$s" "$file_bytes" "$vol_bytes" "${raws[*]}" "${scrubs[*]}" <<'EOF'
import sys
cache, r, s, fb, vb, rs, ss = sys.argv[1:]
import statistics
rm = statistics.median(float(x) for x in rs.split())
sm = statistics.median(float(x) for x in ss.split())
raw, scrub = int(fb) / float(r) / 1e6, int(vb) / float(s) / 1e6
raw_m, scrub_m = int(fb) / rm / 1e6, int(vb) / sm / 1e6
print(f"{cache:>4} best:   dd {raw:6.0f} MB/s, scrub {scrub:6.0f} MB/s, scrub/raw {scrub / raw:.2f}")
print(f"{cache:>4} median: dd {raw_m:6.0f} MB/s, scrub {scrub_m:6.0f} MB/s, scrub/raw {scrub_m / raw_m:.2f}")
# Each run pairs a dd and a scrub taken back to back: the median of their ratios is the figure
# least moved by other load on a shared machine, which drifts between runs.
pairs = [(int(vb) / float(b)) / (int(fb) / float(a)) for a, b in zip(rs.split(), ss.split())]
print(f"{cache:>4} median of back-to-back pairs: scrub/raw {statistics.median(pairs):.2f}")
print(f"     seconds: dd {rs}; scrub {ss}")
EOF
done
