#!/usr/bin/env bash
# Mirror benchmark: what a second copy costs and buys. Not a test: it prints figures and ratios.
#
#   bench/mirror.sh [WORKDIR]                        copies as files on one disk (any user)
#   sudo DISKS=throttled bench/mirror.sh [WORKDIR]   each copy on its own emulated disk (root)
#
# Serves, over Unix sockets and in the same run, a plain volume and a set of two copies
# (`format --mirror`), and runs against each:
#   seq write 1 GiB, 1 MiB blocks, QD 8, then fsync       plain vs two copies (target: the
#                                                         copies are written in parallel)
#   seq read, 1 MiB blocks, QD 8 x READ_JOBS (default 4)  two copies vs plain (target >= 1.5x
#                                                         on separate disks)
#   verify every copy (Volume::verify_copies via `check`) not timed here; see bench/scrub.sh
# and reports for each line the best round, the server's CPU time per GiB moved (user +
# system of the server process, from /proc/PID/stat) and, with DISKS=throttled, how many
# bytes the server's I/O moved on each disk per byte the client moved.
#
# Where the copies live (DISKS):
#   files      (default) plain.bgv, a.bgv and b.bgv in WORKDIR, so on the disk WORKDIR is on:
#              a mirror's read gain needs copies on separate disks, so this shows only what
#              the engine adds. Each read run starts from the same cache state (DROP_CACHES=1
#              drops the page cache, as root; default: every file read into the cache first).
#   throttled  needs root, losetup, blockdev and the cgroup v1 blkio controller. Emulates
#              separate disks of DISK_MBPS MB/s each: the plain volume and each copy get a
#              backing file in WORKDIR attached to a loop device of its own (direct I/O, so
#              the host's page cache does not serve the loop device's reads), and the servers
#              run in a blkio cgroup of their own that throttles every loop device separately
#              to DISK_MBPS * 10^6 bytes/s for reads and for writes. Before each read run the
#              page cache is dropped and the loop devices' buffers flushed (`blockdev
#              --flushbufs`). Models: a bandwidth limit per disk, disks that work in parallel.
#              Does not model: seek or rotational latency, per-disk queue depth limits, a
#              device cache, the real disk under the files (it must be faster than two
#              throttled devices together, else the copies share its bandwidth), nor write-
#              back the kernel's flusher threads do on their own (cgroup v1 charges it to no
#              cgroup: only I/O the server itself submits is throttled; the per-disk byte
#              counts below show how much that was).
#
# Environment: BLOCKGUARD (binary; default the release build), BG_ARGS (extra arguments for
# `blockguard serve`, e.g. "--workers 16"), SIZE_MIB (default 1024), REPEAT (rounds, best
# kept; default 2), READ_JOBS (default 4), DROP_CACHES (files mode; default 0), DISKS (files or throttled),
# DISK_MBPS (throttled mode: each disk's read and write limit in MB/s; default 200),
# READ_AHEAD_KB (throttled mode: set the loop devices' read-ahead; default: the kernel's),
# KEEP=1 (keep the volumes and logs; by default the script removes what it created, also
# on failure or Ctrl-C, and keeps WORKDIR's logs only when the run fails).
set -euo pipefail

here=$(cd "$(dirname "$0")/.." && pwd)
SIZE_MIB=${SIZE_MIB:-1024}
REPEAT=${REPEAT:-2}
READ_JOBS=${READ_JOBS:-4}
DROP_CACHES=${DROP_CACHES:-0}
DISKS=${DISKS:-files}
DISK_MBPS=${DISK_MBPS:-200}
READ_AHEAD_KB=${READ_AHEAD_KB:-}
KEEP=${KEEP:-0}
read -r -a bg_args <<<"${BG_ARGS:-}"
me=bench/mirror.sh
die() {
    echo "$me: $*" >&2
    exit 2
}

for tool in fio python3; do
    command -v "$tool" >/dev/null || die "$tool is missing; run scripts/install-deps.sh"
done
blkio=/sys/fs/cgroup/blkio
case $DISKS in
files) ;;
throttled)
    ((EUID == 0)) || die "DISKS=throttled needs root (loop devices, a blkio cgroup, drop_caches); run it with sudo"
    for tool in losetup blockdev; do
        command -v "$tool" >/dev/null || die "$tool is missing (util-linux)"
    done
    [[ -w $blkio/blkio.throttle.read_bps_device ]] ||
        die "DISKS=throttled needs the cgroup v1 blkio controller with throttling at $blkio (not found; cgroup v2's io.max is not supported here)"
    [[ $DISK_MBPS =~ ^[1-9][0-9]*$ ]] || die "DISK_MBPS must be a positive whole number of MB/s"
    ;;
*) die "DISKS must be files or throttled, not '$DISKS'" ;;
esac
[[ -z $READ_AHEAD_KB || $DISKS == throttled ]] || die "READ_AHEAD_KB needs DISKS=throttled"

if [[ -z "${BLOCKGUARD:-}" ]]; then
    BLOCKGUARD=${CARGO_TARGET_DIR:-$here/target}/release/blockguard
    [[ -x $BLOCKGUARD ]] || (cd "$here" && cargo build --release -p blockguard-cli)
fi

made_work=0
if [[ -n ${1:-} ]]; then
    work=$1
    [[ -d $work ]] || made_work=1
else
    work=$(mktemp -d -p "${TMPDIR:-/var/tmp}" mirror-bench.XXXXXX)
    made_work=1
fi
mkdir -p "$work"
work=$(cd "$work" && pwd)

# Everything created is recorded here and undone by `cleanup`, whatever way the script ends.
pids=()   # servers
loops=()  # loop devices
cg=""     # the blkio cgroup
files=()  # files in WORKDIR: removed at the end
logs=()   # logs and results in WORKDIR: kept if the run fails
cleanup() {
    local rc=$? p dev
    trap - EXIT INT TERM
    for p in "${pids[@]}"; do kill -TERM "$p" 2>/dev/null || true; done
    for p in "${pids[@]}"; do
        # A server exits once its last write-back is on disk; a throttled disk can make that
        # take a while, but not forever.
        for _ in $(seq 600); do
            kill -0 "$p" 2>/dev/null || break
            sleep 0.1
        done
        kill -KILL "$p" 2>/dev/null || true
        wait "$p" 2>/dev/null || true
    done
    for dev in "${loops[@]}"; do
        losetup -d "$dev" 2>/dev/null || echo "$me: could not detach $dev" >&2
    done
    if [[ -n $cg ]]; then
        rmdir "$cg" 2>/dev/null || echo "$me: could not remove the cgroup $cg" >&2
    fi
    if [[ $KEEP == 1 ]]; then
        echo "$me: kept $work" >&2
    elif [[ $rc == 0 && $made_work == 1 ]]; then
        rm -rf "$work"
    elif [[ $rc == 0 ]]; then
        rm -f "${files[@]}" "${logs[@]}"
    else
        rm -f "${files[@]}"
        echo "$me: failed (status $rc); logs in $work" >&2
    fi
    exit "$rc"
}
trap cleanup EXIT
trap 'exit 130' INT
trap 'exit 143' TERM

names=(plain mirror)
declare -A vol     # name -> the volume `serve` opens
declare -A devs    # name -> the loop devices of its disks (throttled mode)
declare -A pid_of  # name -> server PID
if [[ $DISKS == files ]]; then
    files+=("$work"/plain.bgv "$work"/a.bgv "$work"/b.bgv)
    rm -f "${files[@]}"
    "$BLOCKGUARD" format "$work/plain.bgv" --size "${SIZE_MIB}M" >/dev/null
    "$BLOCKGUARD" format "$work/a.bgv" --size "${SIZE_MIB}M" --mirror "$work/b.bgv" >/dev/null
    vol[plain]=$work/plain.bgv
    vol[mirror]=$work/a.bgv
else
    # One backing file per disk, large enough for a volume of SIZE_MIB MiB with its metadata
    # (tags: 2 blocks per group of ~500; maps; superblocks), written once with zeros: neither
    # sparse nor preallocated, so that no round pays for allocating blocks or converting
    # unwritten extents in the filesystem under the loop device (a real disk does neither).
    disk_mib=$((SIZE_MIB + SIZE_MIB / 64 + 16))
    declare -A loop_of
    for d in plain a b; do
        f=$work/disk-$d.img
        files+=("$f")
        rm -f "$f"
        dd if=/dev/zero of="$f" bs=1M count="$disk_mib" oflag=direct conv=fsync status=none
        dev=$(losetup --find --show --direct-io=on "$f") ||
            die "losetup --direct-io=on $f failed (does the filesystem of $work support O_DIRECT?)"
        loops+=("$dev")
        loop_of[$d]=$dev
        [[ -z $READ_AHEAD_KB ]] || blockdev --setra "$((READ_AHEAD_KB * 2))" "$dev"
    done
    cg=$blkio/blockguard-mirror-bench.$$
    mkdir "$cg"
    bps=$((DISK_MBPS * 1000000))
    for dev in "${loops[@]}"; do
        mm=$(lsblk -dno MAJ:MIN "$dev" | tr -d ' ')
        echo "$mm $bps" >"$cg/blkio.throttle.read_bps_device"
        echo "$mm $bps" >"$cg/blkio.throttle.write_bps_device"
    done
    "$BLOCKGUARD" format "${loop_of[plain]}" --size "${SIZE_MIB}M" --force >/dev/null
    "$BLOCKGUARD" format "${loop_of[a]}" --size "${SIZE_MIB}M" --force --mirror "${loop_of[b]}" >/dev/null
    vol[plain]=${loop_of[plain]}
    vol[mirror]=${loop_of[a]}
    devs[plain]=${loop_of[plain]}
    devs[mirror]="${loop_of[a]} ${loop_of[b]}"
fi

serve() { # name
    local name=$1 sock=$work/$1.sock
    files+=("$sock" "$work/$name.ctl")
    logs+=("$work/$name.log")
    rm -f "$sock"
    if [[ -n $cg ]]; then
        # The shell joins the throttled cgroup, then becomes the server: all its I/O, from the
        # first, is throttled, and $! is the server's PID.
        sh -c 'echo $$ >"$1/cgroup.procs" && shift && exec "$@"' sh "$cg" \
            "$BLOCKGUARD" serve "${vol[$name]}" --socket "$sock" --control "$work/$name.ctl" \
            "${bg_args[@]}" 2>"$work/$name.log" &
    else
        "$BLOCKGUARD" serve "${vol[$name]}" --socket "$sock" --control "$work/$name.ctl" \
            "${bg_args[@]}" 2>"$work/$name.log" &
    fi
    pids+=($!)
    pid_of[$name]=$!
    for _ in $(seq 200); do
        [[ -S $sock ]] && return 0
        kill -0 "${pid_of[$name]}" 2>/dev/null || break
        sleep 0.05
    done
    echo "$me: the $name server did not start:" >&2
    cat "$work/$name.log" >&2
    exit 1
}
for name in "${names[@]}"; do serve "$name"; done

ticks_per_s=$(getconf CLK_TCK)
cpu_ticks() { # pid: user + system ticks of all its threads
    awk '{print $14 + $15}' "/proc/$1/stat"
}
dev_bytes() { # op (Read or Write) device...: bytes the cgroup moved on each, space-separated
    local op=$1 dev mm counts=()
    shift
    for dev in "$@"; do
        mm=$(lsblk -dno MAJ:MIN "$dev" | tr -d ' ')
        counts+=("$(awk -v d="$mm" -v op="$op" '$1 == d && $2 == op {n = $3} END {printf "%.0f\n", n}' \
            "$cg/blkio.throttle.io_service_bytes")")
    done
    echo "${counts[*]}"
}

results=$work/results.tsv
logs+=("$results")
: >"$results"
run() { # round name rw jobs [fio args]: one fio run, appended to the results
    local round=$1 name=$2 rw=$3 jobs=$4
    shift 4
    local out=$work/fio-$name-$rw.json op t0 t1 before="" after=""
    logs+=("$out")
    op=$([[ $rw == write ]] && echo Write || echo Read)
    # shellcheck disable=SC2086 # devs[] is a space-separated list
    [[ -z $cg ]] || before=$(dev_bytes "$op" ${devs[$name]})
    t0=$(cpu_ticks "${pid_of[$name]}")
    # fio's nbd engine prints to stdout: the JSON goes to a file.
    fio --output-format=json --output="$out" --name=m --ioengine=nbd \
        --uri="nbd+unix:///?socket=$work/$name.sock" --rw="$rw" --bs=1m --iodepth=8 \
        --numjobs="$jobs" --size="$((SIZE_MIB / jobs))m" --offset_increment="$((SIZE_MIB / jobs))m" \
        --group_reporting "$@" >/dev/null
    t1=$(cpu_ticks "${pid_of[$name]}")
    # shellcheck disable=SC2086
    [[ -z $cg ]] || after=$(dev_bytes "$op" ${devs[$name]})
    python3 - "$out" "$rw" "$round" "$name" "$((t1 - t0))" "$ticks_per_s" "$before" "$after" >>"$results" <<'EOF'
import json, sys
out, rw, rnd, name, ticks, hz, before, after = sys.argv[1:]
j = json.load(open(out))["jobs"][0][rw]
moved = j["io_bytes"]
cpu = int(ticks) / int(hz) / (moved / 2**30)
disk = [int(a) - int(b) for a, b in zip(after.split(), before.split())]
per_disk = "/".join(f"{d / moved:.2f}" for d in disk) if disk else "-"
print(f"{rw}\t{rnd}\t{name}\t{j['bw'] / 1024:.1f}\t{cpu:.2f}\t{per_disk}")
EOF
}

prepare_read() {
    sync
    if [[ $DISKS == throttled ]]; then
        echo 3 >/proc/sys/vm/drop_caches
        for dev in "${loops[@]}"; do blockdev --flushbufs "$dev"; done
    elif [[ $DROP_CACHES == 1 ]]; then
        echo 3 >/proc/sys/vm/drop_caches
    else
        cat "${vol[@]}" "$work"/b.bgv >/dev/null
    fi
}

load_before=$(cut -d' ' -f1-3 /proc/loadavg)
for round in $(seq "$REPEAT"); do
    for name in "${names[@]}"; do
        sync
        run "$round" "$name" write 1 --end_fsync=1
    done
    for name in "${names[@]}"; do
        prepare_read
        run "$round" "$name" read "$READ_JOBS"
    done
done
load_after=$(cut -d' ' -f1-3 /proc/loadavg)

echo "blockguard at $(git -C "$here" rev-parse --short HEAD 2>/dev/null || echo "?") ${bg_args[*]}; ${SIZE_MIB} MiB; $REPEAT round(s); $(nproc) cores; load $load_before before, $load_after after"
if [[ $DISKS == throttled ]]; then
    echo "disks: loop devices (direct I/O) on files in $work, each throttled to $DISK_MBPS MB/s read and write;" \
        "read-ahead $(blockdev --getra "${loops[0]}" | awk '{print $1 / 2}') KiB; page cache dropped before reads"
else
    echo "disks: files in $work (one disk); page cache: $([[ $DROP_CACHES == 1 ]] && echo dropped || echo warm)"
fi
python3 - "$results" "$DISKS" "$READ_JOBS" <<'EOF'
import sys
rows = [l.rstrip("\n").split("\t") for l in open(sys.argv[1])]
throttled = sys.argv[2] == "throttled"
print("each round (MiB/s, server CPU s/GiB" + (", disk bytes per client byte" if throttled else "") + "):")
for rw, rnd, name, bw, cpu, disk in rows:
    print(f"  {rw:5} round {rnd} {name:6} {bw:>8} MiB/s  cpu {cpu}" + (f"  disk {disk}" if throttled else ""))
def best(rw, name):
    return max((r for r in rows if r[0] == rw and r[2] == name), key=lambda r: float(r[3]))
labels = {"write": "seq write 1M QD8 (MiB/s)", "read": f"seq read 1M QD8x{sys.argv[3]} (MiB/s)"}
print(f"{'best round':28} {'plain':>9} {'two copies':>11} {'ratio':>7}   {'CPU s/GiB':>11}" + ("   disk bytes/byte" if throttled else ""))
for rw in ("write", "read"):
    p, m = best(rw, "plain"), best(rw, "mirror")
    line = f"{labels[rw]:28} {p[3]:>9} {m[3]:>11} {float(m[3]) / float(p[3]):6.2f}x   {p[4]:>5} / {m[4]:<5}"
    if throttled:
        line += f"   {p[5]} / {m[5]}"
    print(line)
EOF
