#!/usr/bin/env bash
# Recovery benchmark: how long a read-write open takes to settle a large sparse volume left in
# use by a killed server. Formats a sparse volume (default 1 TiB), serves it, writes
# WRITTEN_MIB MiB over NBD as 1 MiB writes spread evenly across the whole volume (so as many
# groups as possible are written), kills the server with SIGKILL before any flush, then times
# `blockguard recover` (recovery at open) and `recover --rebuild` of the clean volume (the
# damage scan of every written group).
#
#   bench/recovery.sh [DIR]            # DIR defaults to /var/tmp
#   SIZE=1T WRITTEN_MIB=1024 bench/recovery.sh /var/tmp
#
# Needs qemu-io (scripts/install-deps.sh). Uses little real disk space: the volume is sparse.
set -euo pipefail
cd "$(dirname "$0")/.."
dir="${1:-/var/tmp}"
size="${SIZE:-1T}"
mib="${WRITTEN_MIB:-1024}"
bin="${BLOCKGUARD:-${CARGO_TARGET_DIR:-target}/release/blockguard}"
[ -x "$bin" ] || cargo build --release -q -p blockguard-cli
work="$(mktemp -d "$dir/bg-recovery.XXXXXX")"
trap 'kill -9 "${srv:-0}" 2>/dev/null || true; rm -rf "$work"' EXIT
vol="$work/v.bgv"
sock="$work/s"

"$bin" format "$vol" --size "$size" >/dev/null
bytes=$("$bin" info "$vol" --json | python3 -c 'import json,sys; print(json.load(sys.stdin)["size"])')
"$bin" serve "$vol" --socket "$sock" 2>"$work/serve.log" &
srv=$!
for _ in $(seq 100); do [ -S "$sock" ] && break; sleep 0.05; done
step=$(( bytes / mib / 1048576 * 1048576 ))
cmds=()
for i in $(seq 0 $((mib - 1))); do
    cmds+=(-c "write -P $((i % 250 + 1)) $((i * step)) 1M")
done
start=$(date +%s.%N)
qemu-io -f raw "${cmds[@]}" "nbd+unix:///?socket=$sock" >/dev/null
echo "wrote $mib MiB in 1 MiB writes every $((step >> 20)) MiB: $(echo "$(date +%s.%N) - $start" | bc) s"
kill -9 "$srv"
wait "$srv" 2>/dev/null || true
srv=0
sync
echo "state: $("$bin" info "$vol" | sed -n 's/^state: *//p')"
echo "allocated on disk: $(du -h "$vol" | cut -f1) of a $size volume"

start=$(date +%s.%N)
"$bin" recover "$vol" --json >"$work/recover.json"
t1=$(echo "$(date +%s.%N) - $start" | bc)
start=$(date +%s.%N)
"$bin" recover "$vol" --rebuild >/dev/null
t2=$(echo "$(date +%s.%N) - $start" | bc)
python3 - "$work/recover.json" "$t1" "$t2" <<'EOF'
import json, sys
r = json.load(open(sys.argv[1]))
a = r["after_crash"]
print(f"recover after the kill: {float(sys.argv[2]):.2f} s "
      f"({a['groups_examined']} groups, {a['groups_skipped']} skipped as never written, "
      f"{a['groups_examined'] - a['groups_skipped']} read, {a['groups_rewritten']} rewritten, "
      f"{a['blocks_reverted']} blocks reverted, {a['pairs_completed']} first writes completed)")
print(f"recover --rebuild of the clean volume (damage scan of every written group): {float(sys.argv[3]):.2f} s")
EOF
