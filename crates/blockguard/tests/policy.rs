//! The error policy for blocks with no good copy (no mirror, or bad on every member):
//! stored in the superblock, overridable at open; `eio` fails the read and nothing else,
//! `read-only` also suspends writes (and flushes that would commit staged writes) until the
//! error state is cleared or the volume reopened, `continue` fails the read and logs each
//! block once. Under every policy the read fails with the typed error naming the block.

use blockguard::blockguard_backend::{Backend, MemoryBackend};
use blockguard::{CorruptionKind, Error, ErrorClass, ErrorPolicy, FormatOptions, OpenOptions, Volume};
use std::sync::{Arc, Mutex};

const BS: u64 = 4096;
const BLOCKS: u64 = 64;

fn content(b: u64, round: u8) -> Vec<u8> {
    (0..BS)
        .map(|i| {
            (b as u8)
                .wrapping_mul(7)
                .wrapping_add(i as u8)
                .wrapping_add(round)
        })
        .collect()
}

fn format_opts(policy: ErrorPolicy) -> FormatOptions {
    let mut o = FormatOptions::with_size(BS * BLOCKS);
    o.error_policy = policy;
    o
}

fn open_opts(policy: Option<ErrorPolicy>) -> OpenOptions {
    OpenOptions {
        background_commit: false,
        error_policy: policy,
        ..OpenOptions::default()
    }
}

/// A volume formatted with `policy`, every block written with `content(b, 0)`, closed; then
/// the data of each block of `bad` overwritten on the backend behind the engine's back.
fn damaged_volume(policy: ErrorPolicy, bad: &[u64]) -> Arc<MemoryBackend> {
    let opts = format_opts(policy);
    let mem = Arc::new(MemoryBackend::new(opts.backing_len().unwrap()).unwrap());
    let vol = Volume::format(mem.clone(), &opts).unwrap();
    for b in 0..BLOCKS {
        vol.write_at(&content(b, 0), b * BS).unwrap();
    }
    let at: Vec<u64> = bad
        .iter()
        .map(|&b| vol.inspect_block(b).unwrap().location.data_offset)
        .collect();
    vol.close().unwrap();
    for off in at {
        mem.write_at(&[0xA5; 100], off + 1000).unwrap();
    }
    mem
}

#[track_caller]
fn read_fails_naming(vol: &Volume, block: u64) {
    let mut buf = vec![0u8; BS as usize];
    match vol.read_at(&mut buf, block * BS) {
        Err(Error::Corrupt {
            block: b,
            kind: CorruptionKind::TagMismatch,
            ..
        }) => assert_eq!(b, block),
        other => panic!("read of damaged block {block}: {other:?}"),
    }
}

#[track_caller]
fn reads_back(vol: &Volume, block: u64, round: u8) {
    let mut buf = vec![0u8; BS as usize];
    vol.read_at(&mut buf, block * BS)
        .unwrap_or_else(|e| panic!("block {block}: {e}"));
    assert_eq!(buf, content(block, round), "block {block}");
}

#[track_caller]
fn suspended(r: Result<(), Error>, block: u64) {
    match r {
        Err(e @ Error::WritesSuspended { .. }) => {
            let msg = e.to_string();
            assert!(
                msg.contains(&format!("block {block}"))
                    && msg.contains("read-only")
                    && msg.contains("resume"),
                "the error names the block, the policy and the way out: {msg}"
            );
            assert_eq!(e.class(), ErrorClass::ReadOnly);
        }
        other => panic!("expected writes to be suspended by block {block}: {other:?}"),
    }
}

#[test]
fn the_policy_is_stored_in_the_superblock_and_an_open_can_override_it() {
    for policy in ErrorPolicy::ALL {
        let mem = damaged_volume(policy, &[]);
        let mut byte = [0u8; 1];
        mem.read_at(&mut byte, 288).unwrap();
        assert_eq!(
            byte[0],
            policy.id(),
            "{policy:?}: byte 288 of the primary superblock"
        );
        let vol = Volume::open(mem.clone(), &open_opts(None)).unwrap();
        assert_eq!(vol.superblock().error_policy, policy);
        assert_eq!(vol.error_policy(), policy);
        assert_eq!(vol.health().error_policy, policy);
        vol.close().unwrap();
        for other in ErrorPolicy::ALL {
            let vol = Volume::open(mem.clone(), &open_opts(Some(other))).unwrap();
            assert_eq!(vol.error_policy(), other, "the override wins for this open");
            assert_eq!(vol.superblock().error_policy, policy, "and is not stored");
            vol.close().unwrap();
        }
        let vol = Volume::open(mem, &open_opts(None)).unwrap();
        assert_eq!(vol.error_policy(), policy, "closing did not store the override");
    }
}

#[test]
fn eio_fails_the_read_and_changes_nothing_else() {
    let mem = damaged_volume(ErrorPolicy::Eio, &[5]);
    let vol = Volume::open(mem, &open_opts(None)).unwrap();
    for _ in 0..3 {
        read_fails_naming(&vol, 5);
    }
    reads_back(&vol, 6, 0);
    // A partial write needs the block's old content: it fails like the read.
    match vol.write_at(&[0u8; 100], 5 * BS + 10) {
        Err(e) => assert_eq!(e.corrupt_block(), Some(5), "{e}"),
        Ok(()) => panic!("a partial write into a damaged block was accepted"),
    }
    vol.write_at(&content(9, 1), 9 * BS).unwrap();
    vol.flush().unwrap();
    let h = vol.health();
    assert_eq!((h.unrepairable, h.unrepairable_blocks.clone()), (1, vec![5]));
    assert_eq!(h.suspension, None);
    assert_eq!(h.state(), "degraded");
    // Writing the block whole replaces it: it reads again, and is no longer counted.
    vol.write_at(&content(5, 2), 5 * BS).unwrap();
    reads_back(&vol, 5, 2);
    assert!(vol.health().is_healthy(), "{:?}", vol.health());
    vol.close().unwrap();
}

#[test]
fn read_only_suspends_writes_after_the_first_unrepairable_block_until_the_error_state_is_cleared() {
    let mem = damaged_volume(ErrorPolicy::ReadOnly, &[5, 40]);
    let vol = Volume::open(mem.clone(), &open_opts(None)).unwrap();
    // Writes go on until a read meets the block.
    vol.write_at(&content(1, 1), BS).unwrap();
    vol.flush().unwrap();
    // Acknowledged, staged, not yet committed when the suspension begins.
    vol.write_at(&content(2, 1), 2 * BS).unwrap();
    read_fails_naming(&vol, 5);
    let h = vol.health();
    assert_eq!(h.suspension.as_ref().map(|s| s.block), Some(5));
    assert_eq!(h.state(), "suspended");
    suspended(vol.write_at(&content(3, 1), 3 * BS), 5);
    suspended(vol.write_zeroes(3 * BS, BS), 5);
    suspended(vol.discard(3 * BS, BS), 5);
    // The flush would commit the staged write: refused too. Nothing was written.
    suspended(vol.flush(), 5);
    // Reads go on, the staged write included; a second bad block does not move the blame.
    reads_back(&vol, 2, 1);
    reads_back(&vol, 6, 0);
    read_fails_naming(&vol, 40);
    suspended(vol.write_at(&content(3, 1), 3 * BS), 5);

    // The operator acts.
    let cleared = vol.clear_error_state().unwrap();
    assert_eq!(cleared.suspension.map(|s| s.block), Some(5));
    assert_eq!(cleared.unrepairable_forgotten, 2);
    assert!(vol.health().is_healthy());
    vol.flush().unwrap();
    vol.write_at(&content(5, 3), 5 * BS).unwrap();
    reads_back(&vol, 5, 3);
    vol.flush().unwrap();
    // Block 40 is still bad: reading it suspends writes again.
    read_fails_naming(&vol, 40);
    suspended(vol.write_at(&content(3, 1), 3 * BS), 40);
    vol.close().unwrap();

    // Reopening ends the suspension; everything acknowledged before it is there.
    let vol = Volume::open(mem, &open_opts(None)).unwrap();
    assert_eq!(vol.health().suspension, None);
    for (b, round) in [(1, 1), (2, 1), (5, 3), (6, 0)] {
        reads_back(&vol, b, round);
    }
    vol.write_at(&content(3, 4), 3 * BS).unwrap();
    vol.close().unwrap();
}

/// While writes are suspended nothing new reaches the disk: a flush with nothing staged
/// still makes earlier commits durable, but what is staged is not committed — not by a flush,
/// not in the background, not at close (which reports it, and still closes cleanly). The
/// operator keeps it by clearing the error state first.
#[test]
fn read_only_commits_nothing_new_while_suspended_not_even_at_close() {
    let mem = damaged_volume(ErrorPolicy::ReadOnly, &[5]);
    let vol = Volume::open(mem.clone(), &open_opts(None)).unwrap();
    // The read half of a partial write finds the block: that suspends writes too.
    assert_eq!(
        vol.write_at(&[1u8; 10], 5 * BS).unwrap_err().corrupt_block(),
        Some(5)
    );
    suspended(vol.write_at(&[1u8; 1], 0), 5);
    vol.flush().unwrap();
    vol.close().unwrap();

    // A write acknowledged (not flushed) before the suspension is left unwritten at close.
    let vol = Volume::open(mem.clone(), &open_opts(None)).unwrap();
    vol.write_at(&content(7, 9), 7 * BS).unwrap();
    vol.write_at(&content(8, 9), 8 * BS).unwrap();
    vol.flush().unwrap();
    vol.write_at(&content(7, 10), 7 * BS).unwrap();
    read_fails_naming(&vol, 5);
    suspended(vol.flush(), 5);
    reads_back(&vol, 7, 10);
    let e = vol.close().unwrap_err();
    assert!(matches!(e, Error::WritesSuspended { block: 5, .. }), "{e}");
    assert!(
        e.to_string()
            .contains("left 1 acknowledged, unflushed block writes unwritten (blocks 7)"),
        "{e}"
    );
    let vol = Volume::open(mem.clone(), &open_opts(None)).unwrap();
    assert_eq!(vol.superblock().state, blockguard::format::VolumeState::Clean);
    reads_back(&vol, 7, 9);
    reads_back(&vol, 8, 9);

    // Clearing the error state first keeps it.
    vol.write_at(&content(7, 11), 7 * BS).unwrap();
    read_fails_naming(&vol, 5);
    suspended(vol.flush(), 5);
    assert!(vol.clear_error_state().unwrap().suspension.is_some());
    vol.close().unwrap();
    let vol = Volume::open(mem, &open_opts(None)).unwrap();
    reads_back(&vol, 7, 11);
}

#[test]
fn an_override_decides_what_the_session_does() {
    // Stored eio, opened read-only: suspends.
    let mem = damaged_volume(ErrorPolicy::Eio, &[5]);
    let vol = Volume::open(mem.clone(), &open_opts(Some(ErrorPolicy::ReadOnly))).unwrap();
    read_fails_naming(&vol, 5);
    suspended(vol.write_at(&content(3, 1), 3 * BS), 5);
    vol.close().unwrap();
    // Stored read-only, opened eio: does not.
    let mem = damaged_volume(ErrorPolicy::ReadOnly, &[5]);
    let vol = Volume::open(mem, &open_opts(Some(ErrorPolicy::Eio))).unwrap();
    read_fails_naming(&vol, 5);
    vol.write_at(&content(3, 1), 3 * BS).unwrap();
    vol.flush().unwrap();
    vol.close().unwrap();
}

/// Log lines captured from the thread that runs the closure.
fn logged(f: impl FnOnce()) -> String {
    #[derive(Clone)]
    struct Capture(Arc<Mutex<Vec<u8>>>);
    impl std::io::Write for Capture {
        fn write(&mut self, b: &[u8]) -> std::io::Result<usize> {
            self.0.lock().unwrap().write_all(b)?;
            Ok(b.len())
        }
        fn flush(&mut self) -> std::io::Result<()> {
            Ok(())
        }
    }
    let buf = Arc::new(Mutex::new(Vec::new()));
    let out = Capture(buf.clone());
    let subscriber = tracing_subscriber::fmt()
        .with_writer(move || out.clone())
        .with_ansi(false)
        .finish();
    tracing::subscriber::with_default(subscriber, f);
    let text = String::from_utf8_lossy(&buf.lock().unwrap()).into_owned();
    text
}

#[test]
fn continue_fails_every_read_but_logs_each_block_once() {
    let mem = damaged_volume(ErrorPolicy::Continue, &[5, 9]);
    let vol = Volume::open(mem.clone(), &open_opts(None)).unwrap();
    let log = logged(|| {
        for _ in 0..5 {
            read_fails_naming(&vol, 5);
        }
        read_fails_naming(&vol, 9);
    });
    let errors = |b: u64| {
        log.lines()
            .filter(|l| l.contains("ERROR") && l.contains(&format!("block {b} failed verification")))
            .count()
    };
    assert_eq!((errors(5), errors(9)), (1, 1), "once per block:\n{log}");
    assert!(
        log.contains("more reads failed on"),
        "repeats are summed up:\n{log}"
    );
    let h = vol.health();
    assert_eq!((h.unrepairable, h.unrepairable_blocks.clone()), (2, vec![5, 9]));
    assert_eq!(h.suspension, None);
    vol.write_at(&content(3, 1), 3 * BS).unwrap();
    vol.flush().unwrap();
    vol.close().unwrap();

    // Under eio the engine logs nothing itself: every failure is returned, and its caller
    // reports it once (the servers log it with the request; `check` and `export` print it).
    let vol = Volume::open(mem, &open_opts(Some(ErrorPolicy::Eio))).unwrap();
    let log = logged(|| {
        for _ in 0..3 {
            read_fails_naming(&vol, 5);
        }
    });
    let n = log
        .lines()
        .filter(|l| l.contains("ERROR") && l.contains("block 5 failed verification"))
        .count();
    assert_eq!(n, 0, "{log}");
}

/// With mirrors: a block bad on one member is repaired and triggers nothing; only a block
/// bad on every member does.
#[test]
fn read_only_on_a_mirror_set_waits_for_a_block_bad_on_every_member() {
    let opts = format_opts(ErrorPolicy::ReadOnly);
    let len = opts.backing_len().unwrap();
    let m: Vec<Arc<MemoryBackend>> = (0..2)
        .map(|_| Arc::new(MemoryBackend::new(len).unwrap()))
        .collect();
    let dyns = || {
        m.iter()
            .map(|b| b.clone() as Arc<dyn Backend>)
            .collect::<Vec<_>>()
    };
    let vol = Volume::format_members(dyns(), &opts).unwrap();
    for b in 0..BLOCKS {
        vol.write_at(&content(b, 0), b * BS).unwrap();
    }
    let at = |b: u64| vol.inspect_block(b).unwrap().location.data_offset;
    let (one, both) = (at(10), at(20));
    vol.close().unwrap();
    m[0].write_at(&[1; 64], one).unwrap();
    for member in &m {
        member.write_at(&[2; 64], both).unwrap();
    }
    let vol = Volume::open_members(dyns(), &open_opts(None)).unwrap();
    reads_back(&vol, 10, 0);
    assert_eq!(vol.stats().repairs, 1);
    vol.write_at(&content(11, 1), 11 * BS).unwrap();
    read_fails_naming(&vol, 20);
    assert_eq!(vol.stats().unrepairable, 1);
    suspended(vol.write_at(&content(11, 2), 11 * BS), 20);
    vol.clear_error_state().unwrap();
    vol.write_at(&content(20, 3), 20 * BS).unwrap();
    vol.flush().unwrap();
    reads_back(&vol, 20, 3);
    vol.close().unwrap();
}
