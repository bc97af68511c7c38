#!/usr/bin/env bash
# NBD benchmark: `blockguard serve` (every read verified) against two peers serving a raw
# file on the same disk — qemu-nbd and nbdkit's file plugin — in the same run, over Unix
# sockets. Not a test: it prints figures and ratios.
#
#   bench/nbd.sh [WORKDIR]
#
# Lines, each run against the three servers back to back (so they share the machine's
# conditions: other load, page cache), in an order rotated every round, each run after a
# `sync` so no server's writeback spills into another's run:
#   seq write 1 GiB, 1 MiB blocks, QD 8, then fsync         fio (nbd engine)
#   seq read  1 GiB, 1 MiB blocks, QD 8                     fio (nbd engine)
#   nbdcopy in / out 1 GiB (random data; multi-conn)        nbdcopy
#   4 KiB random read / write, QD 32 x 4 connections        fio, RUNTIME seconds each
#   4 KiB random read / write, QD 1, 1 connection           fio, RUNTIME seconds each
# then blockguard's ratio to the faster peer on each line (target: >= 1.0 everywhere), and
# each server's CPU time per GiB moved on each line (user + system time of the server
# process, all its threads, from /proc/PID/stat, over the bytes the client moved).
#
# Environment:
#   BLOCKGUARD   binary to use (default: the release build, built if missing)
#   BG_ARGS      extra arguments for `blockguard serve` (e.g. "--workers 8", "--poll-us 0")
#   SIZE_MIB     data size in MiB (default 1024)
#   RUNTIME      seconds per random-I/O run (default 10)
#   REPEAT       rounds; each line reports its best round (default 1)
#   DROP_CACHES  1: drop the page cache before each read run (root); default 0: read the
#                backing file into the page cache first, the same for every server
# Needs fio (with the nbd engine, as in Debian), nbdcopy (libnbd-bin), qemu-nbd
# (qemu-utils), nbdkit and python3; scripts/install-deps.sh installs them.
set -euo pipefail

here=$(cd "$(dirname "$0")/.." && pwd)
SIZE_MIB=${SIZE_MIB:-1024}
RUNTIME=${RUNTIME:-10}
REPEAT=${REPEAT:-1}
DROP_CACHES=${DROP_CACHES:-0}

for tool in fio nbdcopy qemu-nbd nbdkit python3; do
    command -v "$tool" >/dev/null || {
        echo "bench/nbd.sh: $tool is missing; run scripts/install-deps.sh" >&2
        exit 2
    }
done
fio --enghelp=nbd >/dev/null 2>&1 || {
    echo "bench/nbd.sh: this fio has no nbd engine" >&2
    exit 2
}

if [[ -z "${BLOCKGUARD:-}" ]]; then
    BLOCKGUARD=${CARGO_TARGET_DIR:-$here/target}/release/blockguard
    if [[ ! -x $BLOCKGUARD ]]; then
        (cd "$here" && cargo build --release -p blockguard-cli)
    fi
fi

work=${1:-$(mktemp -d -p "${TMPDIR:-/var/tmp}" nbd-bench.XXXXXX)}
mkdir -p "$work"
results=$work/results.tsv
: >"$results"
pids=()
cleanup() {
    for p in "${pids[@]}"; do
        kill -TERM "$p" 2>/dev/null || true
    done
    wait 2>/dev/null || true
}
trap cleanup EXIT

echo "workdir $work; ${SIZE_MIB} MiB; ${RUNTIME}s per random run; $REPEAT round(s); $(nproc) cores"
echo "blockguard: $BLOCKGUARD ${BG_ARGS:-}"

# Source data for nbdcopy in: incompressible, made once.
src=$work/source.raw
if [[ ! -s $src ]] || (($(stat -c %s "$src") != SIZE_MIB << 20)); then
    head -c "$((SIZE_MIB << 20))" /dev/urandom >"$src"
fi

servers=(blockguard qemu-nbd nbdkit)
declare -A pid_of
ticks_per_s=$(getconf CLK_TCK)

cpu_ticks() { # pid: user + system ticks of the process (all threads)
    # Fields after the command name, which is in parentheses and may hold spaces.
    sed 's/.*) //' "/proc/$1/stat" | awk '{print $12 + $13}'
}

sock_of() { echo "$work/$1.sock"; }
uri_of() { echo "nbd+unix:///?socket=$(sock_of "$1")"; }
backing_of() {
    case $1 in
    blockguard) echo "$work/vol.bgv" ;;
    qemu-nbd) echo "$work/qemu.raw" ;;
    nbdkit) echo "$work/nbdkit.raw" ;;
    esac
}

start_server() { # name: serves a new SIZE_MIB file or volume on its socket
    local name=$1 sock
    sock=$(sock_of "$1")
    rm -f "$sock" "$(backing_of "$name")"
    case $name in
    blockguard)
        # shellcheck disable=SC2086 # BG_ARGS is a list of arguments
        "$BLOCKGUARD" serve "$(backing_of "$name")" --create "${SIZE_MIB}M" --socket "$sock" \
            ${BG_ARGS:-} 2>"$work/blockguard.log" &
        ;;
    qemu-nbd)
        truncate -s "${SIZE_MIB}M" "$(backing_of "$name")"
        # --shared: allow several connections; -t: keep serving between clients.
        qemu-nbd -f raw -t --shared=16 --cache=writeback --aio=threads --discard=unmap \
            --socket="$sock" "$(backing_of "$name")" 2>"$work/qemu-nbd.log" &
        ;;
    nbdkit)
        truncate -s "${SIZE_MIB}M" "$(backing_of "$name")"
        nbdkit -f -U "$sock" file "$(backing_of "$name")" 2>"$work/nbdkit.log" &
        ;;
    esac
    pids+=($!)
    pid_of[$name]=$!
    for _ in $(seq 200); do
        [[ -S $sock ]] && return 0
        sleep 0.05
    done
    echo "bench/nbd.sh: $name did not create $sock" >&2
    exit 1
}

# Before a read run, give every server the same cache state.
prepare_read() {
    sync
    if [[ $DROP_CACHES == 1 ]]; then
        echo 3 >/proc/sys/vm/drop_caches
    else
        cat "$(backing_of "$1")" >/dev/null
    fi
}

record() { # server test value unit cpu-seconds-per-GiB
    printf '%s\t%s\t%s\t%s\t%s\n' "$1" "$2" "$3" "$4" "$5" >>"$results"
}

cpu_per_gib() { # ticks-before ticks-after bytes
    python3 -c "print(f'{($2 - $1) / $ticks_per_s / ($3 / 2**30):.3f}')"
}

fio_run() { # server test rw bs iodepth numjobs [extra fio args...]
    local server=$1 test=$2 rw=$3 bs=$4 qd=$5 jobs=$6
    shift 6
    local out=$work/fio-$server-${test// /_}.json c0 c1
    c0=$(cpu_ticks "${pid_of[$server]}")
    fio --output-format=json --output="$out" --name="${test// /_}" --ioengine=nbd \
        --uri="$(uri_of "$server")" --rw="$rw" --bs="$bs" --iodepth="$qd" --numjobs="$jobs" \
        --size="${SIZE_MIB}m" --group_reporting "$@" >/dev/null
    c1=$(cpu_ticks "${pid_of[$server]}")
    python3 - "$out" "$server" "$test" "$rw" "$c0" "$c1" "$ticks_per_s" >>"$results" <<'PY'
import json, sys
path, server, test, rw, c0, c1, hz = sys.argv[1:]
job = json.load(open(path))["jobs"][0]
side = job["write" if "write" in rw else "read"]
cpu = (int(c1) - int(c0)) / int(hz) / (side["io_bytes"] / 2**30)
if "rand" in rw:
    print(f"{server}\t{test}\t{side['iops']:.0f}\tIOPS\t{cpu:.3f}")
else:
    print(f"{server}\t{test}\t{side['bw'] / 1024:.1f}\tMiB/s\t{cpu:.3f}")
PY
}

timed_mibs() { # server test command...
    local server=$1 test=$2
    shift 2
    local t0 t1 c0 c1
    c0=$(cpu_ticks "${pid_of[$server]}")
    t0=$(date +%s.%N)
    "$@"
    t1=$(date +%s.%N)
    c1=$(cpu_ticks "${pid_of[$server]}")
    record "$server" "$test" "$(python3 -c "print(f'{$SIZE_MIB / ($t1 - $t0):.1f}')")" "MiB/s" \
        "$(cpu_per_gib "$c0" "$c1" "$((SIZE_MIB << 20))")"
}

for s in "${servers[@]}"; do
    start_server "$s"
done

# Before a write run: no dirty pages of an earlier run (any server's) still being written
# back, so no server pays for another's writes.
prepare_write() {
    sync
}

for round in $(seq "$REPEAT"); do
    # Rotate the order every round so no server always runs first (right after another
    # server's test) or last.
    shift_by=$(((round - 1) % ${#servers[@]}))
    order=("${servers[@]:shift_by}" "${servers[@]:0:shift_by}")
    echo "== round $round (order: ${order[*]})"
    for s in "${order[@]}"; do
        prepare_write
        fio_run "$s" "seq write 1M QD8" write 1m 8 1 --end_fsync=1
    done
    for s in "${order[@]}"; do
        prepare_read "$s"
        fio_run "$s" "seq read 1M QD8" read 1m 8 1
    done
    for s in "${order[@]}"; do
        prepare_write
        timed_mibs "$s" "nbdcopy in" nbdcopy --flush "$src" "$(uri_of "$s")"
    done
    for s in "${order[@]}"; do
        prepare_read "$s"
        timed_mibs "$s" "nbdcopy out" nbdcopy "$(uri_of "$s")" null:
    done
    for s in "${order[@]}"; do
        prepare_read "$s"
        fio_run "$s" "4k randread QD32x4" randread 4k 32 4 --time_based --runtime="$RUNTIME"
    done
    for s in "${order[@]}"; do
        prepare_write
        fio_run "$s" "4k randwrite QD32x4" randwrite 4k 32 4 --time_based --runtime="$RUNTIME"
    done
    for s in "${order[@]}"; do
        prepare_read "$s"
        fio_run "$s" "4k randread QD1" randread 4k 1 1 --time_based --runtime="$RUNTIME"
    done
    for s in "${order[@]}"; do
        prepare_write
        fio_run "$s" "4k randwrite QD1" randwrite 4k 1 1 --time_based --runtime="$RUNTIME"
    done
done

python3 - "$results" <<'PY'
import sys
rows = [l.rstrip("\n").split("\t") for l in open(sys.argv[1]) if l.strip()]
tests, data, cpu = [], {}, {}
for server, test, value, unit, cpu_s in rows:
    if test not in tests:
        tests.append(test)
    best = data.get((server, test), (0.0, unit))[0]
    if float(value) >= best:  # best of the rounds, with that round's CPU time
        data[(server, test)] = (float(value), unit)
        cpu[(server, test)] = float(cpu_s)
print()
print(f"{'test':<22} {'unit':>6} {'blockguard':>11} {'qemu-nbd':>11} {'nbdkit':>11} {'bg/best peer':>13}")
worst = None
for t in tests:
    bg, unit = data[("blockguard", t)]
    q = data[("qemu-nbd", t)][0]
    k = data[("nbdkit", t)][0]
    ratio = bg / max(q, k)
    worst = ratio if worst is None else min(worst, ratio)
    print(f"{t:<22} {unit:>6} {bg:>11.1f} {q:>11.1f} {k:>11.1f} {ratio:>12.2f}x")
print(f"\nworst ratio: {worst:.2f}x (target >= 1.00x)")
print()
print("server CPU seconds per GiB moved (user + system, all threads), same runs:")
print(f"{'test':<22} {'blockguard':>11} {'qemu-nbd':>11} {'nbdkit':>11}")
for t in tests:
    print(f"{t:<22} {cpu[('blockguard', t)]:>11.3f} {cpu[('qemu-nbd', t)]:>11.3f} {cpu[('nbdkit', t)]:>11.3f}")
PY
