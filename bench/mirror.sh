#!/usr/bin/env bash
# Mirror benchmark: what a second copy costs and buys. Not a test: it prints figures and ratios.
#
#   bench/mirror.sh [WORKDIR]
#
# Serves, over Unix sockets and in the same run, a plain volume and a set of two copies
# (`format --mirror`), both in WORKDIR (so, here, on the same disk: a mirror's read gain
# needs copies on separate disks; on one disk it shows what the engine adds), and runs:
#   seq write 1 GiB, 1 MiB blocks, QD 8, then fsync       plain vs two copies (target: the
#                                                         copies are written in parallel)
#   seq read, 1 MiB blocks, QD 8 x 4 jobs                 two copies vs plain (target >= 1.5x
#                                                         on separate disks)
#   verify every copy (Volume::verify_copies via `check`) not timed here; see bench/scrub.sh
# Each read run starts from the same cache state (DROP_CACHES=1 drops the page cache, as
# root; default: every file read into the cache first).
#
# Environment: BLOCKGUARD (binary; default the release build), SIZE_MIB (default 1024),
# REPEAT (rounds, best kept; default 2), DROP_CACHES (default 0).
set -euo pipefail

here=$(cd "$(dirname "$0")/.." && pwd)
SIZE_MIB=${SIZE_MIB:-1024}
REPEAT=${REPEAT:-2}
DROP_CACHES=${DROP_CACHES:-0}
for tool in fio python3; do
    command -v "$tool" >/dev/null || {
        echo "bench/mirror.sh: $tool is missing; run scripts/install-deps.sh" >&2
        exit 2
    }
done
if [[ -z "${BLOCKGUARD:-}" ]]; then
    BLOCKGUARD=${CARGO_TARGET_DIR:-$here/target}/release/blockguard
    [[ -x $BLOCKGUARD ]] || (cd "$here" && cargo build --release -p blockguard-cli)
fi
work=${1:-$(mktemp -d -p "${TMPDIR:-/var/tmp}" mirror-bench.XXXXXX)}
mkdir -p "$work"
pids=()
cleanup() {
    for p in "${pids[@]}"; do kill -TERM "$p" 2>/dev/null || true; done
    wait 2>/dev/null || true
}
trap cleanup EXIT

rm -f "$work"/plain.bgv "$work"/a.bgv "$work"/b.bgv
"$BLOCKGUARD" format "$work/plain.bgv" --size "${SIZE_MIB}M" >/dev/null
"$BLOCKGUARD" format "$work/a.bgv" --size "${SIZE_MIB}M" --mirror "$work/b.bgv" >/dev/null

serve() { # name volume
    rm -f "$work/$1.sock"
    "$BLOCKGUARD" serve "$2" --socket "$work/$1.sock" 2>"$work/$1.log" &
    pids+=($!)
    for _ in $(seq 200); do
        [[ -S $work/$1.sock ]] && return 0
        sleep 0.05
    done
    echo "bench/mirror.sh: $1 did not start" >&2
    exit 1
}
serve plain "$work/plain.bgv"
serve mirror "$work/a.bgv"

fio_mibs() { # name rw jobs [extra]
    local name=$1 rw=$2 jobs=$3
    shift 3
    local out=$work/fio-$name-$rw.json
    # fio's nbd engine prints to stdout: the JSON goes to a file.
    fio --output-format=json --output="$out" --name=m --ioengine=nbd \
        --uri="nbd+unix:///?socket=$work/$name.sock" --rw="$rw" --bs=1m --iodepth=8 \
        --numjobs="$jobs" --size="$((SIZE_MIB / jobs))m" --offset_increment="$((SIZE_MIB / jobs))m" \
        --group_reporting "$@" >/dev/null
    python3 -c "import json,sys; j=json.load(open(sys.argv[1]))['jobs'][0]; s=j['write' if 'write' in sys.argv[2] else 'read']; print(f\"{s['bw']/1024:.1f}\")" "$out" "$rw"
}

prepare_read() {
    sync
    if [[ $DROP_CACHES == 1 ]]; then
        echo 3 >/proc/sys/vm/drop_caches
    else
        cat "$work"/plain.bgv "$work"/a.bgv "$work"/b.bgv >/dev/null
    fi
}

best() { python3 -c "import sys; print(max(float(x) for x in sys.argv[1:]))" "$@"; }
declare -A w r
for name in plain mirror; do w[$name]=""; r[$name]=""; done
for round in $(seq "$REPEAT"); do
    for name in plain mirror; do
        sync
        w[$name]+=" $(fio_mibs "$name" write 1 --end_fsync=1)"
    done
    for name in plain mirror; do
        prepare_read
        r[$name]+=" $(fio_mibs "$name" read 4)"
    done
done

echo "workdir $work; ${SIZE_MIB} MiB; $REPEAT round(s); $(nproc) cores; page cache: $([[ $DROP_CACHES == 1 ]] && echo dropped || echo warm)"
printf '%-28s %12s %12s %8s\n' test plain "two copies" ratio
for t in write read; do
    if [[ $t == write ]]; then
        p=$(best ${w[plain]}) m=$(best ${w[mirror]}) label="seq write 1M QD8 (MiB/s)"
    else
        p=$(best ${r[plain]}) m=$(best ${r[mirror]}) label="seq read 1M QD8x4 (MiB/s)"
    fi
    printf '%-28s %12s %12s %7.2fx\n' "$label" "$p" "$m" "$(python3 -c "print($m / $p)")"
done
