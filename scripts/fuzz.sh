#!/usr/bin/env bash
# Fuzzes every target (or the ones named) for a bounded time, starting from the committed
# seed corpus fuzz/corpus-seed/<target>. See fuzz/README.md.
#
# By default with libFuzzer, coverage-guided: the binaries of fuzz/ built on the stable
# toolchain with the instrumentation `cargo fuzz build -s none` uses (no sanitizer, so no
# nightly and no cargo-fuzz needed). BLOCKGUARD_FUZZ_DRIVER=stable runs the stable driver
# instead (`blockguard-fuzz run`: no instrumentation, no C++ compiler).
#
#   BLOCKGUARD_FUZZ_SECS  total seconds, split over the targets by weight (default 100)
#   BLOCKGUARD_FUZZ_SEED  the random seed (default: a fresh one; printed either way)
#
# A failure prints the panic, the input in hex, where it is saved and how to replay it.
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/install-deps.sh
secs=${BLOCKGUARD_FUZZ_SECS:-100}
seed=${BLOCKGUARD_FUZZ_SEED:-$(((RANDOM << 15 | RANDOM) + 1))}
driver=${BLOCKGUARD_FUZZ_DRIVER:-libfuzzer}

# The stable driver also lists the targets, their weights and longest inputs.
cargo build --profile ci --quiet -p blockguard-fuzz
harness="${CARGO_TARGET_DIR:-target}/ci/blockguard-fuzz"
if [ "$driver" = stable ]; then
    BLOCKGUARD_FUZZ_SECS=$secs BLOCKGUARD_FUZZ_SEED=$seed exec "$harness" run "$@"
fi

triple=$(rustc -vV | sed -n 's/^host: //p')
flags="-Cpasses=sancov-module -Cllvm-args=-sanitizer-coverage-level=4"
flags+=" -Cllvm-args=-sanitizer-coverage-inline-8bit-counters -Cllvm-args=-sanitizer-coverage-pc-table"
flags+=" -Cllvm-args=-sanitizer-coverage-trace-compares -Cllvm-args=-sanitizer-coverage-stack-depth"
flags+=" -Cllvm-args=-simplifycfg-branch-fold-threshold=0 -Ccodegen-units=1 --cfg fuzzing"
# The engine's invariants (debug assertions) and overflow checks stay on, as in the tests.
flags+=" -Cdebug-assertions -Coverflow-checks"
# --target: the flags then skip build scripts and proc macros, as with cargo fuzz.
RUSTFLAGS="$flags" cargo build --quiet --manifest-path fuzz/Cargo.toml --locked --release \
    --config 'profile.release.debug="line-tables-only"' --target "$triple" --bins
bins="${CARGO_TARGET_DIR:-fuzz/target}/$triple/release"

work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
selected() { [ $# -eq 1 ] || [[ " ${*:2} " == *" $1 "* ]]; }
weights=0
while read -r name weight _; do
    if selected "$name" "$@"; then weights=$((weights + weight)); fi
done < <("$harness" list)
[ "$weights" -gt 0 ] || { echo "no such target: $*" >&2; exit 2; }

echo "fuzz: libFuzzer, seed $seed (replay with BLOCKGUARD_FUZZ_SEED=$seed), $secs s over the targets"
status=0
while read -r name weight max_len; do
    selected "$name" "$@" || continue
    t=$((secs * weight / weights))
    [ "$t" -ge 1 ] || t=1
    mkdir -p "$work/$name/corpus" "$work/$name/artifacts"
    log="$work/$name/log"
    # New inputs go to the scratch corpus (first directory); the committed one is only read.
    set +e
    "$bins/$name" "$work/$name/corpus" "fuzz/corpus-seed/$name" -seed="$seed" \
        -max_total_time="$t" -max_len="$max_len" -len_control=0 -timeout=30 -rss_limit_mb=4096 \
        -artifact_prefix="$work/$name/artifacts/" -print_final_stats=1 >"$log" 2>&1
    rc=$?
    set -e
    runs=$(sed -n 's/^stat::number_of_executed_units: *//p' "$log")
    cov=$(grep -Eo 'cov: [0-9]+ ft: [0-9]+ corp: [0-9]+' "$log" | tail -n 1 || true)
    if [ "$rc" -eq 0 ]; then
        echo "fuzz $name: ${runs:-?} runs in $t s, no failure ($cov)"
        continue
    fi
    status=1
    echo "FAILED: fuzz target $name (libFuzzer, seed $seed, exit $rc) after ${runs:-?} runs:"
    # The panic and the start of its backtrace, or else the end of libFuzzer's report.
    if grep -q 'panicked at' "$log"; then
        sed -n '/panicked at/,$p' "$log" | grep -v '^#' | head -n 50
    else
        grep -v '^#' "$log" | tail -n 30
    fi
    mkdir -p "fuzz/artifacts/$name"
    for f in "$work/$name/artifacts/"*; do
        [ -f "$f" ] || continue
        cp "$f" "fuzz/artifacts/$name/"
        saved="fuzz/artifacts/$name/$(basename "$f")"
        hex=$(od -An -tx1 -v "$f" | tr -d ' \n')
        echo "input ($(wc -c <"$f") bytes): $hex"
        echo "saved to $saved; replay with"
        echo "  cargo run --profile ci -p blockguard-fuzz -- replay $name $saved"
        echo "  cargo run --profile ci -p blockguard-fuzz -- replay $name --hex $hex"
        echo "  $bins/$name $saved"
    done
done < <("$harness" list)
exit "$status"
