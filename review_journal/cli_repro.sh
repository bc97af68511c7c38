#!/usr/bin/env bash
# CLI repros for the journal-mode review (see README.md). Usage:
#   BG=/path/to/blockguard review_journal/cli_repro.sh
# Needs qemu-io and nbdcopy. Every server started here is stopped by its own PID.
# Prints "FINDING n: REPRODUCED" / "HELD: ..." lines; exits 1 if any finding reproduced.
set -u
BG=${BG:-blockguard}
D=$(mktemp -d /tmp/bg-review-journal.XXXX)
cd "$D" || exit 2
found=0
say() { printf '%s\n' "$*"; }

# --- FINDING 3: 64 KiB blocks with a journal size format accepts (576K..768K): atomic size 0,
# and the first client write kills the server (stack overflow, SIGABRT).
"$BG" format v64 --size 16M --block-size 64K --mode journal --journal-size 576K >/dev/null 2>&1
"$BG" info v64 | grep -i 'atomic'
"$BG" serve v64 --socket "$D/s64.sock" --no-control >serve64.log 2>&1 &
SP=$!
sleep 1
timeout 20 qemu-io -f raw "nbd+unix:///?socket=$D/s64.sock" -c "write -P 0xab 0 4k" >/dev/null 2>&1
sleep 1
if kill -0 "$SP" 2>/dev/null; then
    say "HELD: 64K-block server survived a write"
    kill "$SP"; wait "$SP"
else
    wait "$SP"; rc=$?
    say "FINDING 3: REPRODUCED (serve exited with $rc on the first 4 KiB write: $(grep -o 'overflowed its stack' serve64.log | head -1))"
    found=1
fi

# --- FINDING 5: --journal-size 0 in journal mode, with --force over a good volume.
"$BG" format keep --size 16M --mode journal >/dev/null 2>&1
"$BG" format keep --size 16M --mode journal --journal-size 0 --force 2>&1 | sed 's/^/  format: /'
if "$BG" check keep >/dev/null 2>&1; then
    say "HELD: the volume still opens"
else
    say "FINDING 5: REPRODUCED (the file no longer opens: $("$BG" check keep 2>&1 | head -c 120)...)"
    found=1
fi

# --- FINDING 6: a journal-mode mirror copy that missed a session is "resynchronized" with
# 0 groups copied; with the good copy removed, the remaining copy serves the old data.
"$BG" format ma --size 16M --mode journal --mirror mb >/dev/null 2>&1
"$BG" serve ma --socket "$D/m.sock" --no-control >sm1.log 2>&1 &
SP=$!; sleep 1
qemu-io -f raw "nbd+unix:///?socket=$D/m.sock" -c "write -P 0x01 1M 64k" -c flush >/dev/null 2>&1
kill "$SP"; wait "$SP"
mv mb mb.away                                   # copy 1 away for a session
"$BG" serve ma --socket "$D/m.sock" --no-control >sm2.log 2>&1 &
SP=$!; sleep 1
qemu-io -f raw "nbd+unix:///?socket=$D/m.sock" -c "write -P 0x02 1M 64k" -c flush >/dev/null 2>&1
kill "$SP"; wait "$SP"
mv mb.away mb
"$BG" mirror resync ma 2>&1 | grep -o 'resynchronized copies.*' | sed 's/^/  /'
"$BG" mirror list ma 2>&1 | sed 's/^/  /'
"$BG" mirror remove ma ma >/dev/null 2>&1      # keep only the "in sync" copy 1
"$BG" serve mb --socket "$D/b.sock" --no-control >sb.log 2>&1 &
SP=$!; sleep 1
out=$(qemu-io -f raw "nbd+unix:///?socket=$D/b.sock" -c "read -P 0x02 1M 4k" 2>&1)
kill "$SP"; wait "$SP"
if grep -q 'Pattern verification failed' <<<"$out"; then
    say "FINDING 6: REPRODUCED (block 256 of the resynchronized copy reads its OLD contents, no error; check: $("$BG" check mb 2>&1 | tail -1))"
    found=1
else
    say "HELD: the resynchronized copy holds the new data"
fi

# --- Bad input that is refused (held).
for js in 1 63K 65K; do
    if "$BG" format "bad.$js" --size 16M --mode journal --journal-size "$js" >/dev/null 2>&1; then
        say "NOT REFUSED: --journal-size $js"; found=1
    else
        say "HELD: --journal-size $js refused"
    fi
done
if "$BG" format bad.dual --size 16M --mode dual --journal-size 64K >/dev/null 2>&1; then
    say "NOT REFUSED: --journal-size with --mode dual"; found=1
else
    say "HELD: --journal-size with --mode dual refused"
fi

# --- kill -9 while nbdcopy and qemu-io write (flushed and unflushed, zeroing, unaligned),
# recover, check, compare (held: kill -9 keeps the page cache, so everything written reads).
"$BG" format j.vol --size 64M --mode journal --journal-size 256K >/dev/null 2>&1
head -c 48M /dev/urandom >src.raw
"$BG" serve j.vol --socket "$D/j.sock" --no-control >servej.log 2>&1 &
SP=$!
sleep 1
nbdcopy src.raw "nbd+unix:///?socket=$D/j.sock" --flush >/dev/null 2>&1 &
CP=$!
timeout 30 qemu-io -f raw "nbd+unix:///?socket=$D/j.sock" -c "write -P 0x11 50M 1M" -c flush \
    -c "write -P 0x22 50M 4k" -c "write -z 52M 3000" -c "write -P 0x33 53M 70k" >/dev/null 2>&1
sleep 0.5
kill -9 "$SP"; wait "$SP" 2>/dev/null
kill "$CP" 2>/dev/null; wait "$CP" 2>/dev/null
"$BG" recover j.vol 2>&1 | grep -E 'replayed|stopped' | head -2 | sed 's/^/  /'
if "$BG" check j.vol >/dev/null 2>&1; then say "HELD: check clean after kill -9 + recover"; else say "check FAILED after kill -9 + recover"; found=1; fi
"$BG" serve j.vol --socket "$D/j.sock" --no-control >servej2.log 2>&1 &
SP=$!
sleep 1
out=$(timeout 30 qemu-io -f raw "nbd+unix:///?socket=$D/j.sock" -c "read -P 0x22 50M 4k" \
    -c "read -P 0x11 52432896 1044480" -c "read -P 0 52M 3000" -c "read -P 0x33 53M 70k" 2>&1)
if grep -qi 'mismatch\|fail\|error' <<<"$out"; then say "kill -9: data differs: $out"; found=1; else say "HELD: every write read back after kill -9"; fi
kill "$SP"; wait "$SP"

rm -rf "$D"
exit $found
