#!/usr/bin/env bash
# NBD client over TLS: what `nbds://` costs the client backend against `nbd://`, both on
# nbdkit (memory plugin) on loopback TCP, in the same run. Not a test: it prints figures and
# the TLS/plain ratio.
#
#   bench/nbds.sh [WORKDIR]
#
# Line, run against both exports back to back, the order alternating every round:
#   seq read SIZE_MIB of a volume whose only copy is on nbdkit: `blockguard export` (every
#   block read through the client backend and verified), into a file in WORKDIR
# Each volume is formatted on its export and filled with random data by `import` first.
#
# Environment: BLOCKGUARD (binary; default the release build), SIZE_MIB (default 512),
# REPEAT (rounds; the line reports the best; default 3). Needs nbdkit, openssl, python3.
set -euo pipefail

here=$(cd "$(dirname "$0")/.." && pwd)
SIZE_MIB=${SIZE_MIB:-512}
REPEAT=${REPEAT:-3}
for tool in nbdkit openssl python3; do
    command -v "$tool" >/dev/null || {
        echo "bench/nbds.sh: $tool is missing; run scripts/install-deps.sh" >&2
        exit 2
    }
done
if [[ -z "${BLOCKGUARD:-}" ]]; then
    BLOCKGUARD=${CARGO_TARGET_DIR:-$here/target}/release/blockguard
    [[ -x $BLOCKGUARD ]] || (cd "$here" && cargo build --release -p blockguard-cli)
fi
work=${1:-$(mktemp -d -p "${TMPDIR:-/var/tmp}" nbds-bench.XXXXXX)}
mkdir -p "$work"
pids=()
trap 'kill "${pids[@]}" 2>/dev/null; wait' EXIT
echo "workdir $work; ${SIZE_MIB} MiB; $REPEAT round(s); $(nproc) cores; $BLOCKGUARD"

# nbdkit's --tls-certificates layout (ca-cert.pem, server-cert.pem, server-key.pem); the
# client takes the same directory (ca-cert.pem; no client certificate in it).
pki=$work/pki
mkdir -p "$pki"
(
    cd "$pki"
    openssl req -x509 -newkey rsa:2048 -nodes -keyout ca-key.pem -out ca-cert.pem -days 2 \
        -subj "/CN=bench CA" 2>/dev/null
    openssl req -newkey rsa:2048 -nodes -keyout server-key.pem -out server.csr \
        -subj "/CN=localhost" 2>/dev/null
    printf 'subjectAltName=DNS:localhost\n' >server.ext
    openssl x509 -req -in server.csr -CA ca-cert.pem -CAkey ca-key.pem -CAcreateserial \
        -out server-cert.pem -days 2 -extfile server.ext 2>/dev/null
)

free_port() { python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])'; }
wait_port() { for _ in $(seq 100); do (exec 3<>"/dev/tcp/127.0.0.1/$1") 2>/dev/null && return; sleep 0.1; done; exit 1; }

declare -A uri_of
export_size=$((SIZE_MIB + 64))M
for kind in plain tls; do
    port=$(free_port)
    tls_args=()
    [[ $kind == tls ]] && tls_args=(--tls=require "--tls-certificates=$pki")
    nbdkit --foreground --exit-with-parent -i 127.0.0.1 -p "$port" "${tls_args[@]}" memory "$export_size" &
    pids+=($!)
    wait_port "$port"
    if [[ $kind == tls ]]; then
        uri_of[$kind]="nbds://localhost:$port/?tls-certificates=$pki"
    else
        uri_of[$kind]="nbd://localhost:$port/"
    fi
done

head -c $((SIZE_MIB << 20)) /dev/urandom >"$work/data.raw"
for kind in plain tls; do
    "$BLOCKGUARD" format "${uri_of[$kind]}" --size "${SIZE_MIB}M" >/dev/null
    "$BLOCKGUARD" import "$work/data.raw" "${uri_of[$kind]}" >/dev/null
done

declare -A best
for round in $(seq "$REPEAT"); do
    order=(plain tls)
    ((round % 2 == 0)) && order=(tls plain)
    for kind in "${order[@]}"; do
        rm -f "$work/out.raw"
        start=$(date +%s.%N)
        "$BLOCKGUARD" export "${uri_of[$kind]}" "$work/out.raw" >/dev/null
        end=$(date +%s.%N)
        mbs=$(python3 -c "print(round($SIZE_MIB * 1.048576 / ($end - $start)))")
        if [[ -z ${best[$kind]:-} ]] || ((mbs > best[$kind])); then best[$kind]=$mbs; fi
        echo "round $round $kind: $mbs MB/s"
    done
done
rm -f "$work/out.raw" "$work/data.raw"
ratio=$(python3 -c "print(f'{${best[tls]} / ${best[plain]}:.2f}')")
echo "seq read ${SIZE_MIB} MiB via export: nbd:// ${best[plain]} MB/s, nbds:// ${best[tls]} MB/s, TLS/plain $ratio"
