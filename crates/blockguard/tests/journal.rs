//! `journal` mode beyond the crash simulator (`tests/journal_crash.rs`): the log wraps around
//! and a full log makes writers wait, never fail; a damaged segment in the middle of the log
//! stops replay there and the report names what was dropped; a torn block write is reported
//! in `dual` mode and invisible in `journal` mode; requests larger than the atomic size are
//! split and still read back; and the mode runs the model workload with reopens.

use blockguard::blockguard_backend::{Backend, FaultBackend, MemoryBackend};
use blockguard::{Error, FormatOptions, Mode, OpenOptions, Volume};
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;
use std::sync::Arc;

const BS: u64 = 4096;

fn opts(blocks: u64, journal: u64) -> FormatOptions {
    let mut o = FormatOptions::with_size(BS * blocks);
    o.mode = Mode::Journal;
    o.journal_size = Some(journal);
    o
}

fn content(b: u64, round: u64) -> Vec<u8> {
    let mut v = vec![(round % 251) as u8 + 1; BS as usize];
    v[..8].copy_from_slice(&b.to_le_bytes());
    v[8..16].copy_from_slice(&round.to_le_bytes());
    v
}

fn read(vol: &Volume, b: u64) -> Vec<u8> {
    let mut buf = vec![0u8; BS as usize];
    vol.read_at(&mut buf, b * BS)
        .unwrap_or_else(|e| panic!("block {b}: {e}"));
    buf
}

#[test]
fn the_log_wraps_and_a_full_log_makes_writers_wait_not_fail() {
    // A 64 KiB journal: 56 KiB of log, segments of at most 14 KiB.
    let o = opts(256, 64 * 1024);
    let mem = Arc::new(MemoryBackend::new(o.backing_len().unwrap()).unwrap());
    let vol = Volume::format(mem.clone(), &o).unwrap();
    let limits = vol.journal().unwrap().limits;
    assert_eq!(limits.log_len, 56 * 1024);
    // Sustained writes, with and without flushes, many times the log's size.
    for round in 0..40u64 {
        for b in 0..256 {
            if (b + round) % 5 == 0 {
                vol.write_at(&content(b, round), b * BS).unwrap();
            }
        }
        if round % 3 == 0 {
            vol.flush().unwrap();
        }
        let j = vol.journal().unwrap();
        assert!(j.used <= j.limits.log_len, "{j:?}");
    }
    let j = vol.journal().unwrap();
    assert!(
        j.segments_written * 4096 > 10 * limits.log_len,
        "the log wrapped many times: {j:?}"
    );
    vol.close().unwrap();
    let vol = Volume::open(mem, &OpenOptions::default()).unwrap();
    for b in 0..256u64 {
        let last = (0..40u64).rev().find(|r| (b + r) % 5 == 0).unwrap();
        assert_eq!(read(&vol, b), content(b, last), "block {b}");
    }
}

#[test]
fn concurrent_writers_into_a_full_journal_all_succeed() {
    let o = opts(512, 64 * 1024);
    let mem = Arc::new(MemoryBackend::new(o.backing_len().unwrap()).unwrap());
    let vol = Arc::new(Volume::format(mem.clone(), &o).unwrap());
    let threads: Vec<_> = (0..4u64)
        .map(|t| {
            let vol = vol.clone();
            std::thread::spawn(move || {
                for round in 0..30u64 {
                    for b in (t * 128..(t + 1) * 128).step_by(7) {
                        vol.write_at(&content(b, round), b * BS).unwrap();
                    }
                    if round % 4 == t {
                        vol.flush().unwrap();
                    }
                }
            })
        })
        .collect();
    for t in threads {
        t.join().unwrap();
    }
    vol.flush().unwrap();
    for b in (0..512u64).filter(|b| (b % 128) % 7 == 0) {
        assert_eq!(read(&vol, b), content(b, 29), "block {b}");
    }
}

/// A session that writes `rounds` flushed batches and crashes with everything it wrote on the
/// disk but never checkpointed: the log then holds every batch.
fn crashed_after(rounds: u64) -> (Vec<u8>, FormatOptions) {
    let o = opts(64, 1024 * 1024);
    let fb = Arc::new(FaultBackend::new(o.backing_len().unwrap()).unwrap());
    drop(Volume::format(fb.clone(), &o).unwrap());
    let vol = Volume::open(fb.clone(), &OpenOptions::default()).unwrap();
    for round in 0..rounds {
        for b in 0..4 {
            vol.write_at(&content(b + 4 * round, round), (b + 4 * round) * BS)
                .unwrap();
        }
        vol.flush().unwrap();
    }
    let image = fb.live_image();
    std::mem::forget(vol);
    (image, o)
}

#[test]
fn replay_restores_every_flushed_batch() {
    let (image, _) = crashed_after(6);
    let vol = Volume::open(Arc::new(MemoryBackend::from_vec(image)), &OpenOptions::default()).unwrap();
    let r = vol.recovery_at_open().unwrap().journal.clone().unwrap();
    assert_eq!(r.segments_replayed, 6, "{r:?}");
    assert_eq!(r.blocks_replayed, 24, "{r:?}");
    assert_eq!(r.dropped_segments, 0, "{r:?}");
    for b in 0..24 {
        assert_eq!(read(&vol, b), content(b, b / 4));
    }
}

#[test]
fn a_damaged_segment_in_the_middle_stops_replay_and_is_reported() {
    let (mut image, o) = crashed_after(6);
    let geo = blockguard::Geometry::for_size(BS * 64, 4096, 8)
        .unwrap()
        .with_journal(o.journal_size.unwrap(), None)
        .unwrap();
    assert_eq!(geo.backing_len, o.backing_len().unwrap());
    // Segments are one descriptor block and four data blocks, back to back from log offset
    // 0: damage one data block of the third.
    let log = geo.journal_offset() + 8192;
    let third = log + 2 * 5 * BS;
    image[(third + 2 * BS + 100) as usize] ^= 0x40;
    let vol = Volume::open(Arc::new(MemoryBackend::from_vec(image)), &OpenOptions::default()).unwrap();
    let r = vol.recovery_at_open().unwrap().journal.clone().unwrap();
    assert_eq!(r.segments_replayed, 2, "{r:?}");
    assert!(r.stopped.contains("segment 2"), "{r:?}");
    assert!(r.stopped.contains("hash mismatch"), "{r:?}");
    assert_eq!(
        r.dropped_segments, 3,
        "segments 3, 4 and 5 are whole but cut off by the damaged segment 2: {r:?}"
    );
    assert_eq!(r.dropped_blocks, (12..24).collect::<Vec<_>>(), "{r:?}");
    for b in 0..8 {
        assert_eq!(read(&vol, b), content(b, b / 4));
    }
}

#[test]
fn a_transient_bad_read_of_the_journal_does_not_end_replay_early() {
    let (image, o) = crashed_after(5);
    let geo = blockguard::Geometry::for_size(BS * 64, 4096, 8)
        .unwrap()
        .with_journal(o.journal_size.unwrap(), None)
        .unwrap();
    let journal = geo.journal_offset()..geo.first_group_offset;
    let fb = Arc::new(FaultBackend::from_image(image));
    // Every read of the journal returns zeros once, then the truth.
    let fired = Arc::new(std::sync::Mutex::new(std::collections::HashSet::new()));
    let f = fired.clone();
    fb.read_faults_with(move |off, _len| {
        (journal.contains(&off) && f.lock().unwrap().insert(off))
            .then_some(blockguard::blockguard_backend::ReadFault::Zeros)
    });
    let vol = Volume::open(fb, &OpenOptions::default()).unwrap();
    let r = vol.recovery_at_open().unwrap().journal.clone().unwrap();
    assert_eq!(r.segments_replayed, 5, "{r:?}");
}

#[test]
fn a_torn_block_write_is_reported_in_dual_mode_and_invisible_in_journal_mode() {
    for mode in [Mode::Dual, Mode::Journal] {
        let mut o = FormatOptions::with_size(BS * 16);
        o.mode = mode;
        let fb = Arc::new(FaultBackend::new(o.backing_len().unwrap()).unwrap());
        let vol = Volume::format(fb.clone(), &o).unwrap();
        vol.write_at(&content(3, 1), 3 * BS).unwrap();
        vol.close().unwrap();
        let vol = Volume::open(fb.clone(), &OpenOptions::default()).unwrap();
        fb.flush().unwrap();
        let geo = *vol.geometry();
        // The 4 KiB home write of block 3 is torn: only its first four sectors land.
        let data_at = geo.data_offset(3);
        fb.tear_writes_with(move |off, len| {
            (off == data_at && len == 4096).then(|| (0..8).map(|s| s < 4).collect())
        });
        vol.write_at(&content(3, 2), 3 * BS).unwrap();
        vol.flush().unwrap();
        // The crash: everything written is on the disk, the torn block included.
        let image = fb.live_image();
        std::mem::forget(vol);
        let vol = Volume::open(Arc::new(MemoryBackend::from_vec(image)), &OpenOptions::default()).unwrap();
        let mut buf = vec![0u8; BS as usize];
        let got = vol.read_at(&mut buf, 3 * BS);
        match mode {
            Mode::Dual => assert!(
                matches!(got, Err(Error::Corrupt { block: 3, .. })),
                "dual reports the torn block: {got:?}"
            ),
            _ => {
                got.unwrap();
                assert_eq!(buf, content(3, 2), "journal replays the block whole");
            }
        }
    }
}

#[test]
fn requests_larger_than_the_atomic_size_are_split_and_read_back() {
    let o = opts(512, 128 * 1024);
    let mem = Arc::new(MemoryBackend::new(o.backing_len().unwrap()).unwrap());
    let vol = Volume::format(mem.clone(), &o).unwrap();
    let max = vol.journal().unwrap().limits.max_atomic;
    assert!(max > 0 && max.is_multiple_of(BS));
    let big: Vec<u8> = (0..(max * 5 + 1000)).map(|i| (i % 253) as u8).collect();
    vol.write_at(&big, 777).unwrap();
    vol.write_zeroes(100 * BS, 300 * BS).unwrap();
    vol.close().unwrap();
    let vol = Volume::open(mem, &OpenOptions::default()).unwrap();
    let mut back = vec![0u8; big.len()];
    vol.read_at(&mut back, 777).unwrap();
    let mut expect = big.clone();
    let z0 = (100 * BS - 777) as usize;
    let z1 = ((400 * BS - 777) as usize).min(expect.len());
    if z0 < expect.len() {
        expect[z0..z1].fill(0);
    }
    assert!(back == expect);
}

#[test]
fn model_workload_with_reopens_and_crashes() {
    let seed: u64 = std::env::var("BLOCKGUARD_SEED")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(7);
    let mut rng = ChaCha8Rng::seed_from_u64(seed);
    let o = opts(128, 128 * 1024);
    let mut fb = Arc::new(FaultBackend::new(o.backing_len().unwrap()).unwrap());
    drop(Volume::format(fb.clone(), &o).unwrap());
    let mut model = vec![0u8; (128 * BS) as usize];
    for session in 0..6 {
        let vol = Volume::open(fb.clone(), &OpenOptions::default()).unwrap();
        for _ in 0..150 {
            let off = rng.random_range(0..128 * BS - 1);
            let len = rng.random_range(1..=(128 * BS - off).min(40_000));
            if rng.random_bool(0.2) {
                vol.write_zeroes(off, len).unwrap();
                model[off as usize..(off + len) as usize].fill(0);
            } else {
                let data: Vec<u8> = (0..len).map(|_| rng.random()).collect();
                vol.write_at(&data, off).unwrap();
                model[off as usize..(off + len) as usize].copy_from_slice(&data);
            }
            if rng.random_bool(0.1) {
                let at = rng.random_range(0..128 * BS - 4096);
                let mut buf = vec![0u8; 4096];
                vol.read_at(&mut buf, at).unwrap();
                assert!(buf[..] == model[at as usize..at as usize + 4096], "seed {seed}");
            }
        }
        vol.flush().unwrap();
        if session % 2 == 0 {
            vol.close().unwrap();
        } else {
            // A crash right after the flush: the journal holds what home may not.
            let image = fb.live_image();
            std::mem::forget(vol);
            let fresh = Arc::new(FaultBackend::from_image(image));
            let vol = Volume::open(fresh.clone(), &OpenOptions::default()).unwrap();
            let mut all = vec![0u8; model.len()];
            vol.read_at(&mut all, 0).unwrap();
            assert!(all == model, "seed {seed}: session {session} after replay");
            vol.close().unwrap();
            // Carry on with the replayed disk.
            fb = Arc::new(FaultBackend::from_image(fresh.live_image()));
        }
    }
    finish(fb, &model, seed);
}

fn finish(fb: Arc<FaultBackend>, model: &[u8], seed: u64) {
    let vol = Volume::open(fb, &OpenOptions::default()).unwrap();
    let mut all = vec![0u8; model.len()];
    vol.read_at(&mut all, 0).unwrap();
    assert!(all == model, "seed {seed}");
    let report = vol.check_blocks(0, 128).unwrap();
    assert!(report.is_empty(), "seed {seed}: {report:?}");
}

#[test]
fn a_mirror_set_in_journal_mode_replays_after_a_crash_onto_every_copy() {
    let o = opts(64, 128 * 1024);
    let len = o.backing_len().unwrap();
    let a = Arc::new(FaultBackend::new(len).unwrap());
    let b = Arc::new(FaultBackend::new(len).unwrap());
    let vol = Volume::format_members(vec![a.clone(), b.clone()], &o).unwrap();
    for blk in 0..32 {
        vol.write_at(&content(blk, 1), blk * BS).unwrap();
    }
    vol.flush().unwrap();
    // The crash: member a kept everything, member b lost its unflushed writes (its home
    // writes of the last batches), torn or not.
    let ia = a.live_image();
    let ib = b.crash_image_torn(&[]);
    std::mem::forget(vol);
    let (ma, mb) = (
        Arc::new(MemoryBackend::from_vec(ia)),
        Arc::new(MemoryBackend::from_vec(ib)),
    );
    let vol = Volume::open_members(vec![ma.clone(), mb.clone()], &OpenOptions::default()).unwrap();
    assert!(vol.recovery_at_open().unwrap().journal.is_some());
    for blk in 0..32 {
        assert_eq!(read(&vol, blk), content(blk, 1), "block {blk}");
    }
    // Each copy alone holds every block.
    let report = vol.verify_copies(0, 64, false).unwrap();
    assert!(
        report.bad.is_empty() && report.unrepairable.is_empty(),
        "{report:?}"
    );
}
