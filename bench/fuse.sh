#!/usr/bin/env bash
# FUSE export overhead: fio with direct I/O on a loop device over the file that
# `blockguard mount` exports, against a loop device over a raw file of the same size on the
# same filesystem, in the same run. Prints MiB/s (or IOPS) of both and the ratio.
#
# Usage (as root):  bench/fuse.sh [DIR]
#   DIR           where the raw file and the volume are created (default /var/tmp)
# Environment:
#   SIZE=1G       size of both devices
#   RUNTIME=10    seconds per random-I/O fio job (sequential jobs make one pass)
#   LOOP_DIO=on   losetup --direct-io for both loop devices (on: the loop driver does
#                 O_DIRECT, asynchronous I/O to its file; off: buffered, one request at a time)
#   THREADS=8     FUSE worker threads (blockguard mount --threads)
#   BLOCKGUARD=   path of the blockguard binary (default: target/release/blockguard, built
#                 with cargo build --release -p blockguard-cli if missing)
set -euo pipefail

DIR=${1:-/var/tmp}
SIZE=${SIZE:-1G}
RUNTIME=${RUNTIME:-10}
LOOP_DIO=${LOOP_DIO:-on}
THREADS=${THREADS:-8}
ROOT=$(cd "$(dirname "$0")/.." && pwd)

[ "$(id -u)" = 0 ] || { echo "bench/fuse.sh: needs root (mount, losetup)" >&2; exit 2; }
for tool in fio losetup truncate; do
    command -v "$tool" >/dev/null || { echo "bench/fuse.sh: needs $tool" >&2; exit 2; }
done

BG=${BLOCKGUARD:-}
if [ -z "$BG" ]; then
    BG="${CARGO_TARGET_DIR:-$ROOT/target}/release/blockguard"
    [ -x "$BG" ] || (cd "$ROOT" && cargo build --release -p blockguard-cli >&2)
fi

WORK=$(mktemp -d "$DIR/blockguard-fuse-bench.XXXXXX")
RAW_LOOP= FUSE_LOOP=
cleanup() {
    [ -n "$FUSE_LOOP" ] && losetup -d "$FUSE_LOOP" 2>/dev/null || true
    [ -n "$RAW_LOOP" ] && losetup -d "$RAW_LOOP" 2>/dev/null || true
    if mountpoint -q "$WORK/mnt" 2>/dev/null; then
        "$BG" umount "$WORK/mnt" >/dev/null 2>&1 || umount -l "$WORK/mnt" || true
    fi
    rm -rf "$WORK"
}
trap cleanup EXIT

# Both backing files fully written first, so neither side reads holes.
truncate -s "$SIZE" "$WORK/raw.img"
"$BG" format "$WORK/vol.bgv" --size "$SIZE" >/dev/null
mkdir "$WORK/mnt"
FILE=$("$BG" mount "$WORK/vol.bgv" "$WORK/mnt" --threads "$THREADS" --log-file "$WORK/server.log" 2>/dev/null)
RAW_LOOP=$(losetup -f --show --direct-io="$LOOP_DIO" "$WORK/raw.img")
FUSE_LOOP=$(losetup -f --show --direct-io="$LOOP_DIO" "$FILE")

# fio --minimal (terse v3): field 7 read KiB/s, 8 read IOPS, 48 write KiB/s, 49 write IOPS.
# Sequential jobs make one pass over the device, so that neither side re-reads data a cache
# below it kept from earlier in the job; random jobs run for RUNTIME seconds.
run_fio() { # device rw bs iodepth -> "KiB/s IOPS"
    local out limit=()
    case "$2" in rand*) limit=(--runtime="$RUNTIME" --time_based) ;; esac
    out=$(fio --minimal --name=b --filename="$1" --rw="$2" --bs="$3" --iodepth="$4" \
        --direct=1 --ioengine=libaio --size="$SIZE" "${limit[@]}" --group_reporting)
    case "$2" in
        *write) echo "$out" | awk -F';' '{print $48, $49}' ;;
        *) echo "$out" | awk -F';' '{print $7, $8}' ;;
    esac
}

fill() { # device
    fio --minimal --name=fill --filename="$1" --rw=write --bs=1M --iodepth=8 --direct=1 \
        --ioengine=libaio --size="$SIZE" >/dev/null
}
fill "$RAW_LOOP"
fill "$FUSE_LOOP"

echo "blockguard FUSE export vs raw file, both via loop (direct-io=$LOOP_DIO), size $SIZE"
echo "kernel $(uname -r), $(nproc) CPUs, FUSE threads $THREADS, data dir $DIR"
printf '%-22s %14s %14s %7s\n' job raw fuse ratio
for job in "write 1M 16" "read 1M 16" "randwrite 4k 32" "randread 4k 32" "randread 4k 1"; do
    set -- $job
    sync; echo 3 > /proc/sys/vm/drop_caches
    read -r raw_bw raw_iops < <(run_fio "$RAW_LOOP" "$1" "$2" "$3")
    sync; echo 3 > /proc/sys/vm/drop_caches
    read -r fuse_bw fuse_iops < <(run_fio "$FUSE_LOOP" "$1" "$2" "$3")
    if [ "$2" = 1M ]; then
        raw=$(awk -v v="$raw_bw" 'BEGIN{printf "%.0f MiB/s", v/1024}')
        fuse=$(awk -v v="$fuse_bw" 'BEGIN{printf "%.0f MiB/s", v/1024}')
        ratio=$(awk -v a="$fuse_bw" -v b="$raw_bw" 'BEGIN{printf "%.2f", b ? a/b : 0}')
    else
        raw="$raw_iops IOPS"
        fuse="$fuse_iops IOPS"
        ratio=$(awk -v a="$fuse_iops" -v b="$raw_iops" 'BEGIN{printf "%.2f", b ? a/b : 0}')
    fi
    printf '%-22s %14s %14s %7s\n' "$1 bs=$2 qd=$3" "$raw" "$fuse" "$ratio"
done
