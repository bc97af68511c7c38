#!/usr/bin/env bash
# Engine benchmark: the blockguard volume engine against raw pread/pwrite on a plain file in the
# same directory, in the same run. Prints the machine, then MB/s or IOPS per test, the ratio
# engine/raw and the targets. Results and analysis: docs/PERFORMANCE.md.
#
#   bench/engine.sh                          # 1 GiB, best of 3 (about 1-2 minutes)
#   BENCH_SIZE=128M BENCH_RUNS=1 bench/engine.sh   # quick look
#
# Environment: BENCH_SIZE (default 1G), BENCH_RUNS (3), BENCH_RAND_OPS (16384), BENCH_DIR (where
# the files go; default target/bench-engine.PID in the repository), BENCH_COLD (drop | fadvise |
# off), BENCH_NICE (scheduling priority of the run; -10 as root, else 0); see
# crates/blockguard/benches/engine.rs. CARGO_TARGET_DIR is honoured.
# Needs 3 x BENCH_SIZE of free space in the bench directory. Cold-cache tests use
# /proc/sys/vm/drop_caches when run as root (this drops the page cache of the whole machine).
set -euo pipefail
cd "$(dirname "$0")/.."

dir="${BENCH_DIR:-$PWD/target}"
mkdir -p "$dir"

echo "== machine"
echo "date:    $(date -u '+%Y-%m-%d %H:%M UTC')"
echo "kernel:  $(uname -sr)"
echo "cpu:     $(nproc) online, $(grep -m1 'model name' /proc/cpuinfo | cut -d: -f2- | sed 's/^ *//')"
echo "load:    $(cut -d' ' -f1-3 /proc/loadavg) (1/5/15 min)"
echo "commit:  $(git rev-parse --short HEAD 2>/dev/null || echo unknown)$(git diff --quiet HEAD 2>/dev/null || echo ' (+ uncommitted changes)')"
echo "bench dir: $dir"
if command -v findmnt >/dev/null; then
    findmnt -T "$dir" -o TARGET,SOURCE,FSTYPE,OPTIONS | sed 's/^/  /'
fi
df -h "$dir" | sed 's/^/  /'
free -h | sed 's/^/  /'
echo

echo "== build"
cargo bench -p blockguard --bench engine --no-run 2>&1 | tail -n 2
echo

# On a shared machine other users' compile jobs steal the CPU from the benchmark thread and
# scatter the figures; as root the run gets a higher scheduling priority (BENCH_NICE=0 disables).
nice_level="${BENCH_NICE:-$([ "$(id -u)" = 0 ] && echo -10 || echo 0)}"
echo "== run: BENCH_SIZE=${BENCH_SIZE:-1G} BENCH_RUNS=${BENCH_RUNS:-3} nice -n $nice_level cargo bench -p blockguard --bench engine"
# Per-run figures go to stderr as they are measured; the summary table to stdout.
nice -n "$nice_level" cargo bench -q -p blockguard --bench engine
