#!/usr/bin/env bash
# TLS benchmark: `blockguard serve` with TLS (--tls required) against
# the same binary without TLS, both on loopback TCP, in the same run. Not a test: it prints
# figures and the TLS/plain ratio (target: >= 0.8 on 1 MiB sequential reads).
#
#   bench/tls.sh [WORKDIR]
#
# Lines, each run against both servers back to back, the order alternating every round:
#   seq read  1 GiB, 1 MiB blocks, QD 8      fio (nbd engine)
#   seq write 1 GiB, 1 MiB blocks, QD 8      fio (nbd engine), then fsync
# with each server's CPU time per GiB moved (user + system, all threads, /proc/PID/stat)
# and the client's (fio's own usr + sys figures): on a small machine the client's TLS work
# competes with the server's for the same cores, which bounds the ratio as much as the
# server does.
#
# Environment: BLOCKGUARD (binary; default the release build), BG_ARGS (extra `serve`
# arguments), SIZE_MIB (default 1024), REPEAT (rounds, each line reports its best; default 3).
# Needs fio with the nbd engine, openssl and python3 (scripts/install-deps.sh).
set -euo pipefail

here=$(cd "$(dirname "$0")/.." && pwd)
SIZE_MIB=${SIZE_MIB:-1024}
REPEAT=${REPEAT:-3}
for tool in fio openssl python3; do
    command -v "$tool" >/dev/null || {
        echo "bench/tls.sh: $tool is missing; run scripts/install-deps.sh" >&2
        exit 2
    }
done
if [[ -z "${BLOCKGUARD:-}" ]]; then
    BLOCKGUARD=${CARGO_TARGET_DIR:-$here/target}/release/blockguard
    [[ -x $BLOCKGUARD ]] || (cd "$here" && cargo build --release -p blockguard-cli)
fi
work=${1:-$(mktemp -d -p "${TMPDIR:-/var/tmp}" tls-bench.XXXXXX)}
mkdir -p "$work"
declare -A pid_of uri_of
# The two servers stop (and flush) on SIGTERM, however the script ends.
trap 'kill -TERM "${pid_of[@]}" 2>/dev/null; wait' EXIT
echo "workdir $work; ${SIZE_MIB} MiB; $REPEAT round(s); $(nproc) cores; $BLOCKGUARD ${BG_ARGS:-}"

# Certificates: a CA and the server's (localhost). fio's nbd engine cannot give libnbd a
# credentials directory (libnbd refuses local files in its URIs), so the client does not
# verify the server (tls-verify-peer=false) and presents no certificate: neither changes
# what the bulk data costs, which is what is measured.
pki=$work/pki
mkdir -p "$pki"
(
    cd "$pki"
    openssl req -x509 -newkey rsa:2048 -nodes -keyout ca-key.pem -out ca-cert.pem -days 2 \
        -subj "/CN=bench CA" 2>/dev/null
    for who in server; do
        openssl req -newkey rsa:2048 -nodes -keyout "$who-key.pem" -out "$who.csr" \
            -subj "/CN=localhost" 2>/dev/null
        printf 'subjectAltName=DNS:localhost\n' >"$who.ext"
        openssl x509 -req -in "$who.csr" -CA ca-cert.pem -CAkey ca-key.pem -CAcreateserial \
            -out "$who-cert.pem" -days 2 -extfile "$who.ext" 2>/dev/null
    done
)

free_port() { python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])'; }
ticks_per_s=$(getconf CLK_TCK)
cpu_ticks() { sed 's/.*) //' "/proc/$1/stat" | awk '{print $12 + $13}'; }

start() { # name [serve args...]
    local name=$1 port
    shift
    port=$(free_port)
    rm -f "$work/$name.bgv"
    # shellcheck disable=SC2086 # BG_ARGS is a list of arguments
    "$BLOCKGUARD" serve "$work/$name.bgv" --create "${SIZE_MIB}M" --listen "127.0.0.1:$port" \
        --no-control ${BG_ARGS:-} "$@" 2>"$work/$name.log" &
    pid_of[$name]=$!
    for _ in $(seq 200); do
        grep -q "serving" "$work/$name.log" 2>/dev/null && break
        sleep 0.05
    done
    if [[ $name == tls ]]; then
        uri_of[$name]="nbds://localhost:$port/?tls-verify-peer=false"
    else
        uri_of[$name]="nbd://localhost:$port/"
    fi
}
start plain
start tls --tls-cert "$pki/server-cert.pem" --tls-key "$pki/server-key.pem"

results=$work/results.tsv
: >"$results"
fio_run() { # server test rw
    local s=$1 test=$2 rw=$3 out=$work/fio-$1-$3.json c0 c1
    shift 3
    c0=$(cpu_ticks "${pid_of[$s]}")
    fio --output-format=json --output="$out" --name="$rw" --ioengine=nbd \
        --uri="${uri_of[$s]}" --rw="$rw" --bs=1m --iodepth=8 --size="${SIZE_MIB}m" "$@" >/dev/null
    c1=$(cpu_ticks "${pid_of[$s]}")
    python3 - "$out" "$s" "$test" "$rw" "$c0" "$c1" "$ticks_per_s" >>"$results" <<'PY'
import json, sys
path, server, test, rw, c0, c1, hz = sys.argv[1:]
job = json.load(open(path))["jobs"][0]
side = job[rw]
gib = side["io_bytes"] / 2**30
cpu = (int(c1) - int(c0)) / int(hz) / gib
client = (job["usr_cpu"] + job["sys_cpu"]) / 100 * side["runtime"] / 1000 / gib
print(f"{server}\t{test}\t{side['bw'] / 1024:.1f}\t{cpu:.3f}\t{client:.3f}")
PY
}

# Data to read: both volumes written once (also the write line of round 1).
for round in $(seq "$REPEAT"); do
    order=(plain tls)
    ((round % 2 == 0)) && order=(tls plain)
    echo "== round $round (order: ${order[*]})"
    for s in "${order[@]}"; do
        sync
        fio_run "$s" "seq write 1M QD8" write --end_fsync=1
    done
    for s in "${order[@]}"; do
        fio_run "$s" "seq read 1M QD8" read
    done
done

python3 - "$results" <<'PY'
import sys
best, cpu = {}, {}
for line in open(sys.argv[1]):
    server, test, mibs, c, client = line.rstrip("\n").split("\t")
    if float(mibs) > best.get((server, test), -1):
        best[(server, test)], cpu[(server, test)] = float(mibs), (float(c), float(client))
print(f"{'line':<18}{'plain MiB/s':>12}{'TLS MiB/s':>10}{'TLS/plain':>10}"
      f"   CPU s/GiB server plain / TLS, client plain / TLS")
for test in sorted({t for _, t in best}, reverse=True):
    p, t = best[("plain", test)], best[("tls", test)]
    (sp, cp), (st, ct) = cpu[("plain", test)], cpu[("tls", test)]
    print(f"{test:<18}{p:>12.1f}{t:>10.1f}{t / p:>9.2f}x   {sp:.2f} / {st:.2f}, {cp:.2f} / {ct:.2f}")
PY
