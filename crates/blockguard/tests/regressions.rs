//! The four ways an adversarial review broke format v1's `dual` mode with ordinary faults, each
//! replayed step by step. Every test here failed on v1 (issue 8); they pin the fixes.

use blockguard::blockguard_backend::{Backend, CrashState, Event, FaultBackend, MemoryBackend};
use blockguard::{CorruptionKind, Error, FormatOptions, Geometry, OpenOptions, Volume};
use std::sync::Arc;

fn options() -> OpenOptions {
    OpenOptions {
        background_commit: false,
        cache_bytes: 0,
        dirty_clear_interval: std::time::Duration::ZERO,
        ..OpenOptions::default()
    }
}

fn read_only() -> OpenOptions {
    OpenOptions {
        read_only: true,
        ..options()
    }
}

fn format(block_size: u32, blocks: u64) -> (Arc<FaultBackend>, Geometry) {
    let mut opts = FormatOptions::with_size(block_size as u64 * blocks);
    opts.block_size = block_size;
    opts.uuid = Some([0x42; 16]);
    let backend = Arc::new(FaultBackend::new(opts.backing_len().unwrap()).unwrap());
    let vol = Volume::format(backend.clone(), &opts).unwrap();
    let geo = *vol.geometry();
    vol.close().unwrap();
    (backend, geo)
}

fn block(fill: u8, bs: u32) -> Vec<u8> {
    (0..bs).map(|i| fill ^ (i as u8)).collect()
}

fn read(vol: &Volume, b: u64) -> Result<Vec<u8>, Error> {
    let mut buf = vec![0u8; vol.block_size() as usize];
    vol.read_at(&mut buf, b * vol.block_size() as u64).map(|()| buf)
}

fn is_meta(geo: &Geometry, off: u64) -> bool {
    off >= geo.first_group_offset
        && off < geo.backup_sb_offset
        && (off - geo.first_group_offset) % geo.group_len() < 2 * geo.block_size as u64
}

/// The crash state right after the barrier that follows the first metadata write of the
/// history: the new tags are durable, none of the batch's data has been issued.
fn after_metadata_barrier(backend: &FaultBackend, geo: &Geometry) -> CrashState {
    let events = backend.events();
    let meta = events
        .iter()
        .position(|e| matches!(e, Event::Write { write, .. } if is_meta(geo, write.offset)))
        .expect("a metadata write");
    let barrier = meta
        + events[meta..]
            .iter()
            .position(|e| matches!(e, Event::Flush { .. }))
            .expect("the barrier after it");
    let state = backend.state_at(barrier + 1);
    assert!(
        state.unflushed().is_empty(),
        "nothing is issued between the barrier and the data"
    );
    state
}

/// v1: block 1 holds A, flushed; B is written and the crash lands after B's metadata barrier,
/// before B's data. The next session rewrites block 1 with C and a second crash hits before
/// C's data lands. Block 1 still holds A, but v1's brothers accepted only B or C, for good.
/// Now the second session recovers before it writes, so the brothers keep describing A.
#[test]
fn regression_1_a_crash_in_the_session_after_a_crash_keeps_a_flushed_block() {
    for bs in [512u32, 4096] {
        let (backend, geo) = format(bs, 200);
        let (a, b, c) = (block(0xA, bs), block(0xB, bs), block(0xC, bs));
        let vol = Volume::open(backend.clone(), &options()).unwrap();
        vol.write_at(&a, bs as u64).unwrap();
        vol.flush().unwrap();
        backend.forget_history();
        vol.write_at(&b, bs as u64).unwrap();
        vol.flush().unwrap();
        drop(vol);
        let first = after_metadata_barrier(&backend, &geo).crash_image(&[]);

        // The session after the crash: open read-write (recovery), rewrite block 1, crash
        // again after C's metadata barrier.
        let again = Arc::new(FaultBackend::from_image(first));
        let vol = Volume::open(again.clone(), &options()).unwrap();
        assert_eq!(read(&vol, 1).unwrap(), a, "{bs}: block 1 after the first crash");
        again.forget_history();
        vol.write_at(&c, bs as u64).unwrap();
        vol.flush().unwrap();
        drop(vol);
        let second = after_metadata_barrier(&again, &geo).crash_image(&[]);

        for opts in [read_only(), options()] {
            let vol = Volume::open(Arc::new(MemoryBackend::from_vec(second.clone())), &opts).unwrap();
            assert_eq!(
                read(&vol, 1).expect("block 1 holds A on disk and must verify"),
                a,
                "{bs}-byte blocks, read_only {}",
                opts.read_only
            );
        }
    }
}

/// v1: recovery wrote a resolved brother over the older slot in one 4 KiB write; torn at
/// 512 bytes, the slot was invalid, the table accepted only the newest brother's tag, and every
/// block whose disk held the older version failed. Now every 512-byte sector validates on its
/// own: every one of the 256 tears of the resolution write leaves every block readable.
#[test]
fn regression_2_a_torn_resolution_brother_loses_nothing() {
    let bs = 4096u32;
    let (backend, geo) = format(bs, 1000);
    let vol = Volume::open(backend.clone(), &options()).unwrap();
    // Blocks in four different sectors of group 0's brothers; first versions flushed.
    let blocks = [3u64, 70, 200, 400];
    for (i, &b) in blocks.iter().enumerate() {
        vol.write_at(&block(i as u8, bs), b * bs as u64).unwrap();
    }
    vol.flush().unwrap();
    backend.forget_history();
    // Second versions in one batch: the crash keeps the data of two of them, not the others,
    // so the brothers disagree and both are needed.
    for (i, &b) in blocks.iter().enumerate() {
        vol.write_at(&block(0x80 | i as u8, bs), b * bs as u64).unwrap();
    }
    vol.flush().unwrap();
    drop(vol);
    let state = after_metadata_barrier(&backend, &geo);
    let events = backend.events();
    let barrier_at = events
        .iter()
        .position(|e| matches!(e, Event::Flush { .. }))
        .unwrap();
    // The data writes issued after the barrier; keep those of blocks 3 and 200.
    let mut image = state.crash_image(&[]);
    for e in &events[barrier_at + 1..] {
        if let Event::Write { write, .. } = e {
            for &b in &[3u64, 200] {
                if write.offset == geo.data_offset(b) {
                    let at = write.offset as usize;
                    image[at..at + write.data.len()].copy_from_slice(&write.data);
                }
            }
        }
    }
    let expected: Vec<(u64, Vec<u8>)> = vec![
        (3, block(0x80, bs)),
        (70, block(1, bs)),
        (200, block(0x82, bs)),
        (400, block(3, bs)),
    ];

    // Recovery at open writes the resolved brother: crash it with every tear.
    let recovering = Arc::new(FaultBackend::from_image(image));
    drop(Volume::open(recovering.clone(), &options()).unwrap());
    let history = recovering.events();
    let mut tried = 0;
    recovering.for_each_history_point(|n, st| {
        for (i, w) in st.unflushed().iter().enumerate() {
            if !is_meta(&geo, w.offset) {
                continue;
            }
            let sectors = w.sector_count();
            for mask in 0..1u32 << sectors.min(8) {
                let bits: Vec<bool> = (0..sectors).map(|s| mask >> (s % 32) & 1 == 1).collect();
                let img = st.crash_image_torn(&[(i, bits)]);
                tried += 1;
                let vol = Volume::open(Arc::new(MemoryBackend::from_vec(img)), &read_only()).unwrap();
                for (b, want) in &expected {
                    let got = read(&vol, *b).unwrap_or_else(|e| {
                        panic!(
                            "crash after event {n} of {}, tear {mask:#b}: block {b}: {e}",
                            history.len()
                        )
                    });
                    assert_eq!(&got, want, "crash after event {n}, tear {mask:#b}: block {b}");
                }
            }
        }
    });
    assert!(
        tried >= 256,
        "the resolution write was torn every way ({tried} images)"
    );
}

/// v1: a block's data write landing on its own group's newest brother left, after a flush and
/// a clean close, (valid older, invalid newest); the table fell back to the older brother,
/// whose tag matches the stale data: the read returned the previous version, `check` said
/// clean. Now a pair whose valid brother cannot be proven the newest is damaged.
#[test]
fn regression_3_a_write_misdirected_onto_the_newest_brother_is_not_silent() {
    for discard in [false, true] {
        let bs = 4096u32;
        let (backend, geo) = format(bs, 1000);
        let vol = Volume::open(backend.clone(), &options()).unwrap();
        let b = 5u64;
        let old = block(0x11, bs);
        vol.write_at(&old, b * bs as u64).unwrap();
        vol.flush().unwrap();
        // The next commit writes slot 1 (generation 2): the newest brother. Its data write
        // (or the discard's zeroing) lands there instead of on block 5.
        let (from, to) = (geo.data_offset(b), geo.meta_offset(0, 1));
        backend.misdirect_writes_with(move |off, _| (off == from).then_some(to));
        if discard {
            vol.discard(b * bs as u64, bs as u64).unwrap();
        } else {
            vol.write_at(&block(0x22, bs), b * bs as u64).unwrap();
        }
        vol.flush().unwrap();
        backend.clear_faults();
        vol.close().unwrap();

        let vol = Volume::open(backend.clone(), &read_only()).unwrap();
        match read(&vol, b) {
            Ok(data) => panic!(
                "discard {discard}: block {b} returned {} instead of an error",
                if data == old {
                    "the previous version"
                } else {
                    "data"
                }
            ),
            Err(Error::Corrupt { block, kind, .. }) => {
                assert_eq!(block, b);
                assert_eq!(kind, CorruptionKind::MetadataDamaged);
            }
            Err(e) => panic!("unexpected error {e}"),
        }
        // The 4 KiB write wiped all eight sectors of slot 1.
        let damaged = vol.check_metadata(0, geo.groups).unwrap();
        assert_eq!(
            damaged.len() as u32,
            geo.sectors_per_meta(),
            "discard {discard}: {damaged:?}"
        );
        assert!(damaged.iter().all(|d| d.group == 0));
        let problems = vol.check_blocks(0, geo.data_blocks).unwrap();
        assert!(problems.iter().any(|p| p.block == b), "check lists block {b}");
        assert!(
            vol.extents(0, vol.size())
                .unwrap()
                .iter()
                .filter(|e| !e.allocated)
                .all(|e| e.offset >= geo.group_blocks as u64 * bs as u64),
            "no block of the damaged group is reported as a hole"
        );
    }
}

/// v1: one flipped bit in slot 0 of a group written once (slot 1 blank) made `extents` report
/// the whole group as a hole, the next write started the group over and forgot every other
/// tag, and a single transient all-zero read of the metadata was cached and written back over
/// both valid brothers. Now: allocated, refused unless re-established, confirmed first.
#[test]
fn regression_4_damaged_metadata_never_turns_written_blocks_into_holes() {
    let bs = 4096u32;
    let (backend, geo) = format(bs, 1000);
    let vol = Volume::open(backend.clone(), &options()).unwrap();
    let n = geo.group_blocks as u64;
    let data: Vec<Vec<u8>> = (0..n).map(|b| block(b as u8 ^ 0x5c, bs)).collect();
    for (b, d) in data.iter().enumerate() {
        vol.write_at(d, b as u64 * bs as u64).unwrap();
    }
    vol.close().unwrap();

    // One bit of slot 0's first sector, in its generation (since format v4 a flip in the
    // body leaves a scar whose generation is still proven, which costs only the hit tag).
    backend.flip_bit(geo.meta_offset(0, 0) + 9, 3).unwrap();
    let vol = Volume::open(backend.clone(), &options()).unwrap();
    let per = geo.tags_per_sector() as u64;
    assert!(read(&vol, 0).is_err(), "a block of the damaged sector fails");
    assert_eq!(
        read(&vol, per).unwrap(),
        data[per as usize],
        "other sectors still read"
    );
    let extents = vol.extents(0, n * bs as u64).unwrap();
    assert!(
        extents.iter().all(|e| e.allocated),
        "every written block is reported allocated: {extents:?}"
    );
    // A write into the damaged sector that does not cover it is refused...
    let err = vol.write_at(&block(1, bs), bs as u64).unwrap_err();
    assert!(matches!(
        err,
        Error::Corrupt {
            kind: CorruptionKind::MetadataDamaged,
            ..
        }
    ));
    // ...a write elsewhere in the group forgets nothing...
    vol.write_at(&block(2, bs), (per + 1) * bs as u64).unwrap();
    vol.flush().unwrap();
    // ...and a write covering the whole sector re-establishes it.
    let fresh: Vec<u8> = (0..per * bs as u64).map(|i| (i % 251) as u8).collect();
    vol.write_at(&fresh, 0).unwrap();
    vol.close().unwrap();
    let vol = Volume::open(backend.clone(), &read_only()).unwrap();
    for b in 0..n {
        let want = if b < per {
            fresh[(b * bs as u64) as usize..((b + 1) * bs as u64) as usize].to_vec()
        } else if b == per + 1 {
            block(2, bs)
        } else {
            data[b as usize].clone()
        };
        assert_eq!(read(&vol, b).unwrap(), want, "block {b}");
    }
    assert!(vol.check_metadata(0, geo.groups).unwrap().is_empty());
    drop(vol);

    // A single transient all-zero read of the group's metadata is never written back.
    let vol = Volume::open(backend.clone(), &options()).unwrap();
    let meta = geo.meta_offset(0, 0);
    let hit = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let once = hit.clone();
    backend.read_faults_with(move |off, _| {
        (off == meta && !once.swap(true, std::sync::atomic::Ordering::SeqCst))
            .then_some(blockguard::blockguard_backend::ReadFault::Zeros)
    });
    vol.write_at(&block(3, bs), 300 * bs as u64).unwrap();
    vol.flush().unwrap();
    assert!(hit.load(std::sync::atomic::Ordering::SeqCst), "the fault was hit");
    backend.clear_faults();
    vol.close().unwrap();
    let vol = Volume::open(backend.clone(), &read_only()).unwrap();
    assert_eq!(read(&vol, 300).unwrap(), block(3, bs));
    assert!(vol.check_blocks(0, geo.data_blocks).unwrap().is_empty());
    assert!(vol.check_metadata(0, geo.groups).unwrap().is_empty());
}

// ---------------------------------------------------------------------------------------------
// Found by the adversarial review of format v2 (before the dirty-groups and first-write maps,
// and the second copy of the written map).
// ---------------------------------------------------------------------------------------------

/// Options of a production session: the default dirty-map interval (2 s), so groups written
/// in a short session stay marked until it ends.
fn production() -> OpenOptions {
    OpenOptions {
        background_commit: false,
        ..OpenOptions::default()
    }
}

/// A session that writes `block` (in another group than the damaged one), flushes, and is
/// killed: the volume is left in use with every write on disk.
fn unrelated_session_then_kill(backend: &Arc<FaultBackend>, block: u64, bs: u32) {
    let vol = Volume::open(backend.clone(), &production()).unwrap();
    vol.write_at(&block_data(block, 9, bs), block * bs as u64)
        .unwrap();
    vol.flush().unwrap();
    std::mem::forget(vol);
}

fn block_data(b: u64, v: u8, bs: u32) -> Vec<u8> {
    (0..bs)
        .map(|i| (b as u8).wrapping_mul(31) ^ v ^ (i as u8) | 1)
        .collect()
}

/// F1: a block zeroed (or rolled back) while the volume was closed cleanly must not become
/// acceptable because a later, unrelated session crashed: only groups written in the crash's
/// window are read leniently.
#[test]
fn regression_5_old_damage_is_not_accepted_after_an_unrelated_crash() {
    let bs = 4096u32;
    for rollback in [false, true] {
        let (backend, geo) = format(bs, 2000);
        let vol = Volume::open(backend.clone(), &production()).unwrap();
        let old = block_data(5, 1, bs);
        let new = block_data(5, 2, bs);
        vol.write_at(&old, 5 * bs as u64).unwrap();
        vol.flush().unwrap();
        if rollback {
            // The second version's data write is lost: the disk keeps the first.
            let at = geo.data_offset(5);
            backend.misdirect_writes_with(move |off, _| (off == at).then_some(u64::MAX / 2));
            vol.write_at(&new, 5 * bs as u64).unwrap();
        }
        vol.close().unwrap();
        backend.clear_faults();
        if !rollback {
            let at = geo.data_offset(5);
            backend.zero_range(at, bs as u64).unwrap();
        }
        // Detected on the clean volume...
        let vol = Volume::open(backend.clone(), &read_only()).unwrap();
        assert!(read(&vol, 5).is_err(), "rollback {rollback}: clean volume");
        drop(vol);
        // ...and still after a crash of a session that never touched that group.
        unrelated_session_then_kill(&backend, 3 * geo.group_blocks as u64, bs);
        let vol = Volume::open(backend.clone(), &read_only()).unwrap();
        assert!(
            read(&vol, 5).is_err(),
            "rollback {rollback}: read-only after the crash accepted the old version"
        );
        drop(vol);
        let vol = Volume::open(backend.clone(), &production()).unwrap();
        let report = vol.recovery_at_open().cloned().unwrap();
        assert_eq!(report.blocks_reverted, 0, "rollback {rollback}: {report:?}");
        assert!(
            report.groups_examined < geo.groups,
            "recovery visits only the dirty groups: {report:?}"
        );
        assert!(read(&vol, 5).is_err(), "rollback {rollback}: after recovery");
        assert!(vol
            .check_blocks(0, geo.data_blocks)
            .unwrap()
            .iter()
            .any(|p| p.block == 5));
    }
}

/// F2: a group written once (generations 1 and 0, what `import` leaves) and then wiped, before
/// a later unrelated crash, must be reported — not taken for a first write the crash cut short.
#[test]
fn regression_6_a_wiped_group_is_not_a_torn_first_write_after_an_unrelated_crash() {
    let bs = 4096u32;
    let (backend, geo) = format(bs, 2000);
    let vol = Volume::open(backend.clone(), &production()).unwrap();
    let n = geo.group_blocks as u64;
    for b in n..2 * n {
        vol.write_at(&block_data(b, 1, bs), b * bs as u64).unwrap();
    }
    vol.close().unwrap();
    // Group 1 wiped, metadata and data (a misdirected discard).
    let start = geo.meta_offset(1, 0);
    let end = geo.data_offset(2 * n - 1) + bs as u64;
    backend.zero_range(start, end - start).unwrap();
    unrelated_session_then_kill(&backend, 3 * n, bs);
    for opts in [read_only(), production()] {
        let vol = Volume::open(backend.clone(), &opts).unwrap();
        for b in [n, n + 7, 2 * n - 1] {
            match read(&vol, b) {
                Err(Error::Corrupt {
                    kind: CorruptionKind::MetadataDamaged,
                    ..
                }) => {}
                other => panic!("read_only {}: block {b}: {other:?}", opts.read_only),
            }
        }
        assert!(vol
            .extents(n * bs as u64, n * bs as u64)
            .unwrap()
            .iter()
            .all(|e| e.allocated));
        assert!(!vol.check_metadata(0, geo.groups).unwrap().is_empty());
    }
}

/// F3: one misdirected discard landing on the start of the volume zeroes the written map's
/// first copy, the other maps, and group 0's metadata and first blocks. The second copy of the
/// written map still says group 0 was written.
#[test]
fn regression_7_a_discard_over_the_map_and_group_0_is_reported() {
    for bs in [512u32, 4096] {
        let (backend, geo) = format(bs, 2000);
        let vol = Volume::open(backend.clone(), &production()).unwrap();
        for b in 0..4 {
            vol.write_at(&block_data(b, 1, bs), b * bs as u64).unwrap();
        }
        vol.flush().unwrap();
        let far = 1000u64;
        let (from, to) = (
            geo.data_offset(far),
            geo.map_offset(blockguard::format::MapKind::Written, 0),
        );
        backend.misdirect_writes_with(move |off, _| (off == from).then_some(to));
        // Long enough to cover the maps, both slots of group 0 and its first data blocks.
        let len = geo.data_offset(3) + bs as u64 - to;
        vol.discard(far * bs as u64, len.div_ceil(bs as u64) * bs as u64)
            .unwrap();
        vol.flush().unwrap();
        backend.clear_faults();
        drop(vol);
        let vol = Volume::open(backend.clone(), &read_only()).unwrap();
        for b in 0..4 {
            assert!(
                read(&vol, b).is_err(),
                "{bs}: block {b} of the wiped group 0 reads"
            );
        }
        assert!(vol.extents(0, 4 * bs as u64).unwrap().iter().all(|e| e.allocated));
        assert!(
            !vol.check_map().unwrap().is_empty(),
            "{bs}: the wiped map copy is reported"
        );
        assert!(!vol.check_metadata(0, geo.groups).unwrap().is_empty());
    }
}

/// F5: a direct-I/O file backend (4 KiB aligned I/O) formats, opens, writes and reads a volume.
#[test]
fn regression_8_direct_io_volumes_work() {
    use blockguard::blockguard_backend::{FileBackend, FileOptions};
    let dir = tempfile::tempdir_in("/var/tmp").unwrap();
    let path = dir.path().join("direct.bgv");
    let opts = FormatOptions::with_size(64 << 20);
    let file = FileOptions {
        direct: true,
        ..FileOptions::default()
    };
    let backend = match FileBackend::create(&path, opts.backing_len().unwrap(), &file) {
        Ok(b) => b,
        Err(e) => {
            eprintln!("skipped: direct I/O not available here ({e})");
            return;
        }
    };
    let vol = Volume::format(Arc::new(backend), &opts).unwrap();
    let data = block_data(7, 3, 4096);
    vol.write_at(&data, 7 * 4096).unwrap();
    vol.write_at(b"unaligned", 100_000).unwrap();
    vol.close().unwrap();
    let backend = FileBackend::open(&path, &file).unwrap();
    let vol = Volume::open(Arc::new(backend), &OpenOptions::default()).unwrap();
    assert_eq!(read(&vol, 7).unwrap(), data);
    let mut buf = [0u8; 9];
    vol.read_at(&mut buf, 100_000).unwrap();
    assert_eq!(&buf, b"unaligned");
    assert!(vol
        .check_blocks(0, vol.geometry().data_blocks)
        .unwrap()
        .is_empty());
}

// ---- Third review (format v3) ---------------------------------------------------------------

/// Block 3 written (twice when `twice`), flushed, then the power fails with nothing
/// unflushed, inside the dirty map's window: a read-only open reads group 0 by the lenient
/// after-crash rules. Returns the backend (its history knows every version) and the volume.
fn flushed_then_crash(twice: bool) -> (Arc<FaultBackend>, Volume, Vec<u8>) {
    let (backend, _) = format(4096, 64);
    let opts = OpenOptions {
        dirty_clear_interval: std::time::Duration::from_secs(3600),
        ..options()
    };
    let vol = Volume::open(backend.clone(), &opts).unwrap();
    if twice {
        vol.write_at(&block_data(3, 1, 4096), 3 * 4096).unwrap();
        vol.flush().unwrap();
    }
    let newest = block_data(3, 2, 4096);
    vol.write_at(&newest, 3 * 4096).unwrap();
    vol.flush().unwrap();
    std::mem::forget(vol);
    let vol = Volume::open(backend.clone(), &read_only()).unwrap();
    // Metadata loaded: the next backend read of the block is its data.
    vol.inspect_block(3).unwrap();
    (backend, vol, newest)
}

/// Review 3, F1: after a crash, a read-only open accepted a block's older tag (or "never
/// written") on a single data read, so one transient zero or stale read returned flushed
/// data's previous version — or zeros — without an error. Data that matches only the older
/// tag is now read again, and returned only if the disk says so twice.
#[test]
fn regression_9_one_bad_read_after_a_crash_never_returns_an_older_version() {
    for (twice, fault) in [(false, "zero"), (true, "zero"), (true, "stale")] {
        let (backend, vol, newest) = flushed_then_crash(twice);
        match fault {
            "zero" => backend.zero_next_read(),
            _ => backend.stale_next_read(),
        }
        let got = read(&vol, 3);
        assert!(
            got.as_ref().is_ok_and(|d| *d == newest),
            "{fault} read of a block written {} time(s) and flushed: {:?}",
            if twice { 2 } else { 1 },
            got.map(|d| d[..8].to_vec())
        );
    }
}

/// Review 3, F2: `first_written_block` skipped a group whose metadata reads as a hole without
/// asking the written map, so `import` without `--force` took a volume whose only data was a
/// wiped group for an empty one.
#[test]
fn regression_10_first_written_block_sees_a_wiped_group() {
    let mut f = FormatOptions::with_size(64 * 4096);
    f.uuid = Some([0x42; 16]);
    f.group_blocks = Some(16);
    let backend = Arc::new(MemoryBackend::new(f.backing_len().unwrap()).unwrap());
    let vol = Volume::format(backend.clone(), &f).unwrap();
    let geo = *vol.geometry();
    let g1 = geo.first_block(1);
    vol.write_at(&block_data(g1, 1, 4096), g1 * 4096).unwrap();
    vol.close().unwrap();
    backend
        .zero_range(geo.meta_offset(1, 0), 2 * u64::from(geo.block_size))
        .unwrap();
    let vol = Volume::open(backend, &options()).unwrap();
    assert_eq!(vol.first_written_block(0).unwrap(), Some(g1));
    assert!(read(&vol, g1).is_err());
}

/// Review 3, F3: in the session that last wrote a written-map sector, `check_map` answered
/// from the cache, so a copy damaged since (a write of the last data block misdirected one
/// block further lands on the tail copy) went unreported until the volume was reopened.
#[test]
fn regression_11_check_map_reads_the_disk_not_its_cache() {
    let (backend, geo) = format(4096, 64);
    let vol = Volume::open(backend.clone(), &options()).unwrap();
    vol.write_at(&block_data(0, 1, 4096), 0).unwrap();
    vol.flush().unwrap();
    let last = geo.data_blocks - 1;
    let (from, to) = (geo.data_offset(last), geo.data_offset(last) + 4096);
    assert_eq!(
        to,
        geo.map_offset(blockguard::format::MapKind::Written, 1),
        "the tail copy follows the last block"
    );
    backend.misdirect_writes_with(move |off, len| (off == from && len == 4096).then_some(to));
    vol.write_at(&block_data(last, 1, 4096), last * 4096).unwrap();
    vol.flush().unwrap();
    backend.clear_faults();
    let problems = vol.check_map().unwrap();
    assert!(
        problems
            .iter()
            .any(|p| p.detail.contains("written-groups map sector, copy 1")),
        "{problems:?}"
    );
}

// ---- Found by the engine model fuzzer in CI ------------------------------------------------

/// The crash image right after `block`'s last data write was issued (its tags durable, as
/// the commit protocol orders them), with only the 512-byte sectors `landed` of that write
/// on disk.
fn torn_data_write(backend: &FaultBackend, geo: &Geometry, block: u64, landed: &[usize]) -> Vec<u8> {
    let at = geo.data_offset(block);
    let events = backend.events();
    let issued = events
        .iter()
        .rposition(|e| matches!(e, Event::Write { write, .. } if write.offset == at))
        .expect("the block's data write");
    let state = backend.state_at(issued + 1);
    let i = state
        .unflushed()
        .iter()
        .position(|w| w.offset == at)
        .expect("the data write is unflushed");
    let mask = (0..state.unflushed()[i].sector_count())
        .map(|s| landed.contains(&s))
        .collect();
    state.crash_image_torn(&[(i, mask)])
}

/// Engine model fuzzer (CI, 2026-12-03; its input is also an engine seed): block 1 holds A,
/// flushed. B (A with sectors 2..=5 zeroed) is written and a crash tears it: only sectors 2
/// and 3 land, so the block matches neither tag and fails, rightly. Recovery left B's tag
/// in place as the newest, although no B was ever on disk. The block is rewritten with C
/// (other bytes, but zeros in sectors 2..=5 too) and a second crash tears that write with
/// only sectors 4 and 5 landing: the block then held exactly B, which the older brother
/// still described — and B, neither durable nor written since, was returned without an
/// error. Recovery now gives a block that matches neither brother the torn tag, which
/// matches no data: the block fails until it is written whole again.
#[test]
fn regression_12_a_torn_write_never_completes_an_older_torn_write() {
    let bs = 4096u32;
    let (backend, geo) = format(bs, 64);
    let zeroed = |mut v: Vec<u8>| {
        v[2 * 512..6 * 512].fill(0);
        v
    };
    let (a, c) = (block(0xA, bs), block(0xC, bs));
    let b = zeroed(a.clone());
    let vol = Volume::open(backend.clone(), &options()).unwrap();
    vol.write_at(&a, u64::from(bs)).unwrap();
    vol.flush().unwrap();
    backend.forget_history();
    vol.write_at(&b, u64::from(bs)).unwrap();
    vol.flush().unwrap();
    drop(vol);
    let first = torn_data_write(&backend, &geo, 1, &[2, 3]);

    let again = Arc::new(FaultBackend::from_image(first));
    let vol = Volume::open(again.clone(), &options()).unwrap();
    let report = vol.recovery_at_open().expect("the open recovered");
    assert_eq!(report.blocks_torn, 1, "{report:?}");
    assert!(report.damaged.is_empty(), "{report:?}");
    match read(&vol, 1) {
        Err(Error::Corrupt { block: 1, kind, .. }) => assert_eq!(kind, CorruptionKind::Torn),
        other => panic!(
            "block 1, torn by the first crash: {:?}",
            other.map(|d| d[..8].to_vec())
        ),
    }
    again.forget_history();
    vol.write_at(&zeroed(c), u64::from(bs)).unwrap();
    vol.flush().unwrap();
    drop(vol);
    let second = torn_data_write(&again, &geo, 1, &[4, 5]);
    assert_eq!(
        &second[geo.data_offset(1) as usize..][..bs as usize],
        &b[..],
        "the second tear leaves exactly B on disk"
    );

    for opts in [read_only(), options()] {
        let vol = Volume::open(Arc::new(MemoryBackend::from_vec(second.clone())), &opts).unwrap();
        match read(&vol, 1) {
            Err(e) if e.is_corruption() => {}
            other => panic!(
                "read_only {}: block 1 must fail (neither durable nor written since): {:?}",
                opts.read_only,
                other.map(|d| d == b)
            ),
        }
        let problems = vol.check_blocks(0, geo.data_blocks).unwrap();
        assert_eq!(problems.iter().map(|p| p.block).collect::<Vec<_>>(), [1]);
    }
}

/// Regression 12 every way, in `dual` and `journal` mode: each of the 16 tears of B over the
/// four sectors where it differs from A, then each of the 256 tears of C, which equals B in
/// those four sectors and differs from both everywhere else. After the second crash block 1
/// reads as what it read as after the first (A, B, or nothing if that crash tore it), as C,
/// or fails — never anything else, opened read-only (`dual`) or read-write.
#[test]
fn regression_12_every_pair_of_tears() {
    let bs = 4096u32;
    let four = 2 * 512..6 * 512;
    for mode in [blockguard::Mode::Dual, blockguard::Mode::Journal] {
        let mut f = FormatOptions::with_size(u64::from(bs) * 64);
        f.block_size = bs;
        f.uuid = Some([0x42; 16]);
        f.mode = mode;
        let backend = Arc::new(FaultBackend::new(f.backing_len().unwrap()).unwrap());
        let vol = Volume::format(backend.clone(), &f).unwrap();
        let geo = *vol.geometry();
        let a = block(0xA, bs);
        let mut b = a.clone();
        b[four.clone()].fill(0x5B);
        let mut c = block(0xC, bs);
        c[four.clone()].copy_from_slice(&b[four.clone()]);
        vol.write_at(&a, u64::from(bs)).unwrap();
        vol.flush().unwrap();
        backend.forget_history();
        vol.write_at(&b, u64::from(bs)).unwrap();
        vol.flush().unwrap();
        drop(vol);
        let mut outcomes = std::collections::BTreeMap::new();
        for m1 in 0..16usize {
            let landed: Vec<usize> = (0..4).filter(|s| m1 >> s & 1 == 1).map(|s| s + 2).collect();
            let first = torn_data_write(&backend, &geo, 1, &landed);
            let again = Arc::new(FaultBackend::from_image(first));
            let vol = Volume::open(again.clone(), &options()).unwrap();
            let before = match read(&vol, 1) {
                Ok(d) if d == a => Some(a.clone()),
                Ok(d) if d == b => Some(b.clone()),
                Ok(_) => panic!("{mode:?}, first tear {landed:?}: block 1 reads as neither A nor B"),
                Err(e) if e.is_corruption() => None,
                Err(e) => panic!("{mode:?}, first tear {landed:?}: {e}"),
            };
            *outcomes
                .entry(
                    before
                        .as_ref()
                        .map_or("failed", |d| if *d == a { "A" } else { "B" }),
                )
                .or_insert(0) += 1;
            again.forget_history();
            vol.write_at(&c, u64::from(bs)).unwrap();
            vol.flush().unwrap();
            drop(vol);
            for m2 in 0..256usize {
                let landed2: Vec<usize> = (0..8).filter(|s| m2 >> s & 1 == 1).collect();
                let second = torn_data_write(&again, &geo, 1, &landed2);
                // A journal volume left in use opens read-write only (its replay is needed).
                let opens = if mode == blockguard::Mode::Journal {
                    vec![options()]
                } else {
                    vec![read_only(), options()]
                };
                for opts in opens {
                    let vol = Volume::open(Arc::new(MemoryBackend::from_vec(second.clone())), &opts).unwrap();
                    match read(&vol, 1) {
                        Ok(d) if d == c || Some(&d) == before.as_ref() => {}
                        Ok(d) => panic!(
                            "{mode:?}, tears {landed:?} then {landed2:?}, read_only {}: block 1 reads \
                             as {} after {}",
                            opts.read_only,
                            if d == b {
                                "B"
                            } else if d == a {
                                "A"
                            } else {
                                "other bytes"
                            },
                            before
                                .as_ref()
                                .map_or("failing", |d| if *d == a { "A" } else { "B" })
                        ),
                        Err(e) if e.is_corruption() => {}
                        Err(e) => panic!("{mode:?}, tears {landed:?} then {landed2:?}: {e}"),
                    }
                }
            }
        }
        println!("{mode:?}: after the first tear block 1 read as {outcomes:?}");
        if mode == blockguard::Mode::Dual {
            assert!(outcomes.contains_key("failed"), "no first tear left a torn block");
        }
    }
}
