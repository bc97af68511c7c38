//! Outside review of the single-copy modes (`rebuild`, `journal`) and of `dual`'s bounded
//! recovery through the write-intent map. Findings are `bug_*` (they failed on the code
//! they were found on), claims that held are `held_*`. See `review_modes/README.md`.

use blockguard::blockguard_backend::{FaultBackend, MemoryBackend, ReadFault};
use blockguard::{CorruptionKind, Error, FormatOptions, Mode, OpenOptions, Volume};
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;
use std::collections::{BTreeMap, BTreeSet};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

const BS: usize = 4096;
/// Four groups of 496 blocks, and a few blocks more.
const SIZE: u64 = 4 * 496 * 4096;

fn format_opts(mode: Mode) -> FormatOptions {
    let mut f = FormatOptions::with_size(SIZE);
    f.mode = mode;
    if mode == Mode::Journal {
        f.journal_size = Some(1 << 20);
    }
    f
}

/// Commits on the writing thread, a tiny stage and cache: deterministic backend I/O.
fn sync_opts() -> OpenOptions {
    OpenOptions {
        background_commit: false,
        stage_bytes: 3 * BS,
        cache_bytes: 2 * 2 * BS,
        dirty_clear_interval: Duration::from_secs(3600),
        ..OpenOptions::default()
    }
}

fn fault_volume(mode: Mode, opts: &OpenOptions) -> (Arc<FaultBackend>, Volume) {
    let f = format_opts(mode);
    let fb = Arc::new(FaultBackend::new(f.backing_len().unwrap()).unwrap());
    Volume::format(fb.clone(), &f).unwrap().close().unwrap();
    let vol = Volume::open(fb.clone(), opts).unwrap();
    (fb, vol)
}

fn pattern(block: u64, version: u32) -> Vec<u8> {
    let mut b = vec![0u8; BS];
    for (i, x) in b.iter_mut().enumerate() {
        *x = (block as u8) ^ (version as u8).wrapping_mul(31) ^ (i as u8).wrapping_mul(7) ^ 0x5a;
    }
    b[..8].copy_from_slice(&block.to_le_bytes());
    b[8..12].copy_from_slice(&version.to_le_bytes());
    b
}

fn read_block(vol: &Volume, block: u64) -> blockguard::Result<Vec<u8>> {
    let mut b = vec![0u8; BS];
    vol.read_at(&mut b, block * BS as u64)?;
    Ok(b)
}

fn corrupt_kind(e: &Error) -> Option<CorruptionKind> {
    match e {
        Error::Corrupt { kind, .. } => Some(*kind),
        _ => None,
    }
}

/// Every version a block ever held (zeros included), for "never data that was not written".
#[derive(Default, Clone)]
struct Versions(BTreeMap<u64, BTreeSet<Vec<u8>>>);

impl Versions {
    fn add(&mut self, block: u64, data: Vec<u8>) {
        self.0
            .entry(block)
            .or_insert_with(|| [vec![0u8; BS]].into())
            .insert(data);
    }
    fn allows(&self, block: u64, data: &[u8]) -> bool {
        match self.0.get(&block) {
            Some(s) => s.contains(data),
            None => data.iter().all(|&x| x == 0),
        }
    }
}

/// A random workload over blocks of groups 0..=2 mixing full writes, partial writes, discards
/// and zeroing, with flushes; records every version in `versions`.
fn workload(
    vol: &Volume,
    rng: &mut ChaCha8Rng,
    ops: usize,
    versions: &mut Versions,
    model: &mut BTreeMap<u64, Vec<u8>>,
) {
    let blocks: Vec<u64> = (0..12u64)
        .map(|i| [0, 1, 61, 62, 63, 130, 495, 496, 497, 600, 991, 992][i as usize])
        .collect();
    let mut v = 1000 + rng.random_range(0..1000u32);
    for _ in 0..ops {
        let b = blocks[rng.random_range(0..blocks.len())];
        v += 1;
        match rng.random_range(0..10) {
            0..=4 => {
                let d = pattern(b, v);
                vol.write_at(&d, b * BS as u64).unwrap();
                versions.add(b, d.clone());
                model.insert(b, d);
            }
            5 => {
                // A partial write: 512 bytes in the middle of the block (read-modify-write).
                let mut d = model.get(&b).cloned().unwrap_or_else(|| vec![0; BS]);
                let at = 512 * rng.random_range(0..8usize);
                d[at..at + 512].fill((v as u8) | 1);
                vol.write_at(&d[at..at + 512], b * BS as u64 + at as u64).unwrap();
                versions.add(b, d.clone());
                model.insert(b, d);
            }
            6 => {
                vol.discard(b * BS as u64, BS as u64).unwrap();
                versions.add(b, vec![0; BS]);
                model.insert(b, vec![0; BS]);
            }
            7 => {
                vol.write_zeroes(b * BS as u64, 2 * BS as u64).unwrap();
                for x in [b, b + 1] {
                    versions.add(x, vec![0; BS]);
                    model.insert(x, vec![0; BS]);
                }
            }
            _ => vol.flush().unwrap(),
        }
    }
}

/// Opens `image` read-write (recovery/retag/replay at open) and checks every block of
/// `blocks`: it reads without error and holds a version written to it. Returns a description
/// of the first problem.
fn check_image(image: Vec<u8>, versions: &Versions, blocks: &BTreeSet<u64>) -> Result<(), String> {
    let mb = Arc::new(MemoryBackend::from_vec(image));
    let vol = Volume::open(mb, &sync_opts()).map_err(|e| format!("open: {e}"))?;
    for &b in blocks {
        match read_block(&vol, b) {
            Ok(d) if versions.allows(b, &d) => {}
            Ok(_) => return Err(format!("block {b}: data never written to it")),
            Err(e) => return Err(format!("block {b}: {e}")),
        }
    }
    vol.close().map_err(|e| format!("close: {e}"))?;
    Ok(())
}

fn touched_blocks() -> BTreeSet<u64> {
    [
        0u64, 1, 2, 61, 62, 63, 64, 130, 131, 495, 496, 497, 498, 600, 601, 991, 992, 993, 1500,
    ]
    .into()
}

/// Crash at every point of a workload's history (random subsets and orders of the unflushed
/// writes, some torn at 512 bytes), reopen read-write, and require that every block reads
/// without error a version that was written to it. `torn_data_ok`: rebuild mode may return a
/// torn block (its documented allowance), so torn images are only checked for errors there.
fn crash_every_point(mode: Mode, seed: u64, ops: usize, samples: usize) -> Vec<String> {
    let (fb, vol) = fault_volume(mode, &sync_opts());
    let mut rng = ChaCha8Rng::seed_from_u64(seed);
    let mut versions = Versions::default();
    let mut model = BTreeMap::new();
    fb.forget_history();
    workload(&vol, &mut rng, ops, &mut versions, &mut model);
    let blocks = touched_blocks();
    let mut problems = Vec::new();
    let mut points = 0;
    fb.for_each_history_point(|n, st| {
        points += 1;
        for i in 0..samples {
            let torn = i % 2 == 1;
            let image = st.random_crash_image(&mut rng, torn);
            let r = if torn && mode == Mode::Rebuild {
                // Only "no error" for torn images in rebuild mode (a torn block reads torn).
                let mb = Arc::new(MemoryBackend::from_vec(image));
                Volume::open(mb, &sync_opts())
                    .map_err(|e| e.to_string())
                    .and_then(|v| {
                        blocks.iter().try_for_each(|&b| {
                            read_block(&v, b)
                                .map(|_| ())
                                .map_err(|e| format!("block {b}: {e}"))
                        })
                    })
            } else {
                check_image(image, &versions, &blocks)
            };
            if let Err(e) = r {
                problems.push(format!("seed {seed} point {n} torn {torn}: {e}"));
            }
        }
    });
    drop(vol);
    assert!(points > 10, "the workload made too few history points");
    problems
}

#[test]
fn held_rebuild_crash_at_every_point_no_false_alarm() {
    let seed = 0x5eed_0001;
    println!("seed {seed}");
    let p = crash_every_point(Mode::Rebuild, seed, 60, 4);
    assert!(p.is_empty(), "{} problems, first: {:?}", p.len(), p.first());
}

#[test]
fn held_journal_crash_at_every_point_no_false_alarm() {
    let seed = 0x5eed_0002;
    println!("seed {seed}");
    let p = crash_every_point(Mode::Journal, seed, 60, 4);
    assert!(p.is_empty(), "{} problems, first: {:?}", p.len(), p.first());
}

/// Byte offsets of `group`'s metadata (both slots) and data.
fn group_span(vol: &Volume, group: u64) -> std::ops::Range<usize> {
    let g = vol.geometry();
    let lo = g.meta_offset(group, 0);
    let hi = g.data_offset(g.first_block(group) + u64::from(g.blocks_in_group(group)) - 1) + BS as u64;
    lo as usize..hi as usize
}

/// Expects every block of `blocks` to fail as `MetadataDamaged` (never zeros).
fn expect_damaged(vol: &Volume, blocks: &[u64]) -> Result<(), String> {
    for &b in blocks {
        match read_block(vol, b) {
            Err(e) if corrupt_kind(&e) == Some(CorruptionKind::MetadataDamaged) => {}
            Err(e) => return Err(format!("block {b}: unexpected error {e}")),
            Ok(d) => {
                return Err(format!(
                    "block {b} of a wiped group read without error ({})",
                    if d.iter().all(|&x| x == 0) {
                        "zeros"
                    } else {
                        "data"
                    }
                ))
            }
        }
    }
    Ok(())
}

/// Group 1 (blocks 496..992) written in three ways, closed cleanly, then wiped (metadata and
/// data zeroed): every mode must report it, whichever way it was written.
#[test]
fn held_wiped_group_after_clean_close_is_reported() {
    for mode in [Mode::Rebuild, Mode::Journal, Mode::Dual] {
        for how in ["data", "discarded", "zeroed"] {
            let (fb, vol) = fault_volume(mode, &sync_opts());
            match how {
                "data" => {
                    for b in [496u64, 500, 600, 991] {
                        vol.write_at(&pattern(b, 1), b * BS as u64).unwrap();
                    }
                }
                "discarded" => {
                    for b in [496u64, 600] {
                        vol.write_at(&pattern(b, 1), b * BS as u64).unwrap();
                    }
                    vol.flush().unwrap();
                    vol.discard(496 * BS as u64, 496 * BS as u64).unwrap();
                }
                _ => vol.write_zeroes(496 * BS as u64, 8 * BS as u64).unwrap(),
            }
            let span = group_span(&vol, 1);
            vol.close().unwrap();
            let mut image = fb.live_image();
            image[span].fill(0);
            let vol = Volume::open(Arc::new(MemoryBackend::from_vec(image)), &sync_opts()).unwrap();
            let r = expect_damaged(&vol, &[496, 600, 991]);
            assert!(r.is_ok(), "{mode:?}/{how}: {r:?}");
            assert!(
                !vol.check_metadata(1, 1).unwrap().is_empty(),
                "{mode:?}/{how}: check_metadata finds nothing"
            );
        }
    }
}

/// Finding 1: a journal volume that crashes replays every segment since the session began
/// (checkpoints move on only when the log fills). Replay plans each segment's groups in place
/// from their metadata on disk, with no regard for damage: a group wiped after its writes were
/// flushed, then any crash, comes back from replay as a group of unwritten blocks (plus the
/// replayed ones) — every other block of it reads as zeros without an error. Without the crash
/// (a clean close) the same wipe is reported.
///
/// Earlier session's blocks of group 1, closed cleanly; this session writes one block of it and
/// flushes; power loss with everything landed; then the group is wiped (metadata and data).
fn wipe_after_crash(mode: Mode) -> Result<(), String> {
    let (fb, vol) = fault_volume(mode, &sync_opts());
    // Written and closed cleanly in an earlier session.
    for b in [500u64, 600, 991] {
        vol.write_at(&pattern(b, 1), b * BS as u64).unwrap();
    }
    vol.close().unwrap();
    let vol = Volume::open(fb.clone(), &sync_opts()).unwrap();
    // This session: one block of the group, flushed (in journal mode its segment stays on
    // the chain replay follows).
    vol.write_at(&pattern(520, 2), 520 * BS as u64).unwrap();
    vol.flush().unwrap();
    let span = group_span(&vol, 1);
    let mut image = fb.live_image();
    drop(vol);
    image[span].fill(0);
    let vol = Volume::open(Arc::new(MemoryBackend::from_vec(image)), &sync_opts()).unwrap();
    expect_damaged(&vol, &[500, 600, 991])
}

/// Finding 1: see [`wipe_after_crash`]; journal replay plans each segment's groups in place
/// from their metadata on disk, whatever it holds, so the wiped group comes back as unwritten
/// blocks plus the replayed one: blocks 500, 600, 991 read as zeros without an error. Without
/// the crash (a clean close) the same wipe is reported (`held_wiped_group_after_clean_close_is_reported`).
#[test]
fn bug_journal_replay_turns_a_wiped_group_into_zeros() {
    let r = wipe_after_crash(Mode::Journal);
    assert!(r.is_ok(), "after replay: {r:?}");
}

/// The same sequence in `dual`: the group is marked dirty but its first write was long ago,
/// so recovery reads its blank metadata as damage and reports it.
#[test]
fn held_dual_wiped_group_after_crash_is_reported() {
    let r = wipe_after_crash(Mode::Dual);
    assert!(r.is_ok(), "after recovery: {r:?}");
}

/// Finding 1, second symptom: a metadata sector damaged (one flipped bit) after its writes,
/// then a crash: replay rewrites it with unwritten tags for every block the journal does not
/// hold. The damage disappears from `check_metadata`; those blocks fail as
/// `UnwrittenNotZero` instead of `MetadataDamaged`, and writes into the pair are accepted.
/// (Since format v4 a flip in a sector's body leaves it *scarred*: its generation is proven,
/// its tags only matched. Replay copies its tags forward like a valid sector's — dropping the
/// journal's write instead read the previous version back (review_scars finding 1) — so the
/// tags are never erased: the block whose tag the flip hit keeps failing, an intact tag still
/// serves its block, and the replayed write is there.)
#[test]
fn bug_journal_replay_erases_metadata_damage() {
    let (fb, vol) = fault_volume(Mode::Journal, &sync_opts());
    vol.write_at(&pattern(510, 1), 510 * BS as u64).unwrap();
    vol.close().unwrap();
    let vol = Volume::open(fb.clone(), &sync_opts()).unwrap();
    vol.write_at(&pattern(520, 2), 520 * BS as u64).unwrap();
    vol.flush().unwrap();
    let meta = vol.geometry().meta_offset(1, 0) as usize;
    let mut image = fb.live_image();
    drop(vol);
    image[meta + 100] ^= 4; // sector 0 of group 1, slot 0: blocks 496..558
    let vol = Volume::open(Arc::new(MemoryBackend::from_vec(image)), &sync_opts()).unwrap();
    // Byte 100 of the sector is in tag 10: block 496 + 10. Never unwritten, never returned.
    let kind = read_block(&vol, 506).err().and_then(|e| corrupt_kind(&e));
    assert!(
        matches!(
            kind,
            Some(CorruptionKind::MetadataDamaged | CorruptionKind::TagMismatch)
        ),
        "after replay: block 506 {kind:?}"
    );
    assert_eq!(
        read_block(&vol, 520).unwrap(),
        pattern(520, 2),
        "the replayed write"
    );
    assert_eq!(
        read_block(&vol, 510).unwrap(),
        pattern(510, 1),
        "an intact tag serves its block"
    );
}

/// A crash image of a workload, then a second session on it (recovery, retag or replay at
/// open; writes; flushes) crashed at every point of its history — during recovery and during
/// the session after. Every block must read without error a version written to it.
fn double_crash(mode: Mode, seed: u64) -> Vec<String> {
    let (fb, vol) = fault_volume(mode, &sync_opts());
    let mut rng = ChaCha8Rng::seed_from_u64(seed);
    let mut versions = Versions::default();
    let mut model = BTreeMap::new();
    workload(&vol, &mut rng, 40, &mut versions, &mut model);
    let blocks = touched_blocks();
    let mut problems = Vec::new();
    for first in 0..4 {
        // A torn first crash in rebuild mode may leave torn blocks: not torn there.
        let torn = mode != Mode::Rebuild && first % 2 == 1;
        let image = fb.random_crash_image(&mut rng, torn);
        let fb2 = Arc::new(FaultBackend::from_image(image));
        let mut v2 = versions.clone();
        let vol2 = match Volume::open(fb2.clone(), &sync_opts()) {
            Ok(v) => v,
            Err(e) => {
                problems.push(format!("seed {seed} first crash {first}: open: {e}"));
                continue;
            }
        };
        // The partial writes build on what the block holds after the first crash.
        let mut m2: BTreeMap<u64, Vec<u8>> = blocks
            .iter()
            .map(|&b| (b, read_block(&vol2, b).unwrap()))
            .collect();
        for (b, d) in &m2 {
            v2.add(*b, d.clone());
        }
        workload(&vol2, &mut rng, 12, &mut v2, &mut m2);
        vol2.flush().unwrap();
        fb2.for_each_history_point(|n, st| {
            for i in 0..2 {
                let image = st.random_crash_image(&mut rng, mode == Mode::Journal && i == 1);
                if let Err(e) = check_image(image, &v2, &blocks) {
                    problems.push(format!("seed {seed} first crash {first} second point {n}: {e}"));
                }
            }
        });
        drop(vol2);
    }
    drop(vol);
    problems
}

#[test]
fn held_second_crash_during_recovery_and_after() {
    for (mode, seed) in [
        (Mode::Rebuild, 0x2c01u64),
        (Mode::Journal, 0x2c02),
        (Mode::Dual, 0x2c03),
    ] {
        println!("{mode:?} seed {seed}");
        let p = double_crash(mode, seed);
        assert!(
            p.is_empty(),
            "{mode:?}: {} problems, first: {:?}",
            p.len(),
            p.first()
        );
    }
}

/// `dual` after a crash, the group still marked in the dirty map: a data write that landed
/// one block off, onto its neighbour, is found after the automatic recovery (the neighbour's
/// tag was not rewritten by the last commit, so it is read strictly), and a flushed block
/// whose data write was lost is found once a later commit rewrote its pair.
#[test]
fn held_dual_misdirected_and_lost_writes_detected_after_recovery() {
    let (fb, vol) = fault_volume(Mode::Dual, &sync_opts());
    for b in [10u64, 11, 12, 13] {
        vol.write_at(&pattern(b, 1), b * BS as u64).unwrap();
    }
    vol.flush().unwrap();
    // Block 10's new data lands on block 11.
    let (from, to) = (vol.geometry().data_offset(10), vol.geometry().data_offset(11));
    fb.misdirect_writes_with(move |off, _| (off == from).then_some(to));
    vol.write_at(&pattern(10, 2), 10 * BS as u64).unwrap();
    vol.flush().unwrap();
    fb.clear_faults();
    // Block 12's new data is lost (put back below); then block 13, same pair, is rewritten.
    let off12 = vol.geometry().data_offset(12);
    let old12 = fb.live_image()[off12 as usize..off12 as usize + BS].to_vec();
    vol.write_at(&pattern(12, 2), 12 * BS as u64).unwrap();
    vol.flush().unwrap();
    vol.write_at(&pattern(13, 2), 13 * BS as u64).unwrap();
    vol.flush().unwrap();
    let mut image = fb.live_image();
    drop(vol);
    // The lost write: block 12 holds its previous version on the medium.
    image[off12 as usize..off12 as usize + BS].copy_from_slice(&old12);
    let vol = Volume::open(Arc::new(MemoryBackend::from_vec(image)), &sync_opts()).unwrap();
    assert!(
        vol.recovery_at_open().is_some_and(|r| !r.already_clean),
        "recovered at open"
    );
    for b in [11u64, 12] {
        let r = read_block(&vol, b);
        assert!(
            matches!(
                r.as_ref().map_err(corrupt_kind),
                Err(Some(CorruptionKind::TagMismatch))
            ),
            "block {b}: {:?}",
            r.map(|d| d[8..12].to_vec())
        );
    }
    assert_eq!(read_block(&vol, 13).unwrap(), pattern(13, 2));
}

/// One read returning zeros (or a stale version) at each read of a recovery in turn — retag,
/// replay, dual's resolution — must not become a false alarm, wrong data or a lost write.
fn bad_read_during_recovery(mode: Mode, seed: u64, fault: ReadFault) -> Vec<String> {
    let (fb, vol) = fault_volume(mode, &sync_opts());
    let mut rng = ChaCha8Rng::seed_from_u64(seed);
    let mut versions = Versions::default();
    let mut model = BTreeMap::new();
    workload(&vol, &mut rng, 30, &mut versions, &mut model);
    vol.flush().unwrap();
    workload(&vol, &mut rng, 6, &mut versions, &mut model);
    vol.flush().unwrap();
    // Everything flushed, the volume not closed: recovery at open, which reads the blocks the
    // last commits changed (a bad read there looks like their older version).
    let image = fb.live_image();
    drop(vol);
    let blocks = touched_blocks();
    // How many reads an open makes.
    let count = Arc::new(AtomicUsize::new(0));
    let probe = Arc::new(FaultBackend::from_image(image.clone()));
    let c = count.clone();
    probe.read_faults_with(move |_, _| {
        c.fetch_add(1, Ordering::Relaxed);
        None
    });
    Volume::open(probe, &sync_opts()).unwrap().close().unwrap();
    let reads = count.load(Ordering::Relaxed);
    let mut problems = Vec::new();
    for nth in (0..reads).chain([usize::MAX]) {
        let fb = Arc::new(FaultBackend::from_image(image.clone()));
        let seen = Arc::new(AtomicUsize::new(0));
        let s = seen.clone();
        fb.read_faults_with(move |_, _| (s.fetch_add(1, Ordering::Relaxed) == nth).then_some(fault));
        let vol = match Volume::open(fb.clone(), &sync_opts()) {
            Ok(v) => v,
            Err(e) => {
                problems.push(format!("{mode:?} read {nth}: open: {e}"));
                continue;
            }
        };
        fb.clear_faults();
        for &b in &blocks {
            match read_block(&vol, b) {
                Ok(d) if model.get(&b).is_none_or(|m| *m == d) && versions.allows(b, &d) => {}
                Ok(_) => problems.push(format!("{mode:?} read {nth}: block {b}: not its last version")),
                Err(e) => problems.push(format!("{mode:?} read {nth}: block {b}: {e}")),
            }
        }
        drop(vol);
    }
    assert!(reads > 5, "{mode:?}: only {reads} reads at open");
    problems
}

#[test]
fn held_one_bad_read_during_recovery() {
    for (mode, seed) in [
        (Mode::Rebuild, 0xbad1u64),
        (Mode::Journal, 0xbad2),
        (Mode::Dual, 0xbad3),
    ] {
        for fault in [ReadFault::Zeros, ReadFault::Stale] {
            println!("{mode:?} {fault:?} seed {seed}");
            let p = bad_read_during_recovery(mode, seed, fault);
            assert!(
                p.is_empty(),
                "{mode:?} {fault:?}: {} problems, first: {:?} last {:?}",
                p.len(),
                p.first(),
                p.last()
            );
        }
    }
}

/// Writers, discards, zeroing and partial writes from several threads into the same groups,
/// with readers, the background committer, a one-group metadata cache, a tiny stage and the
/// dirty map cleared every few milliseconds: no false `MetadataDamaged`, `TagMismatch` or
/// `UnwrittenNotZero`, no refused write, and every block holds its last write after a reopen.
fn concurrent_mixed(mode: Mode, seed: u64, millis: u64) {
    let f = format_opts(mode);
    let mb = Arc::new(MemoryBackend::new(f.backing_len().unwrap()).unwrap());
    Volume::format(mb.clone(), &f).unwrap().close().unwrap();
    let opts = OpenOptions {
        background_commit: true,
        stage_bytes: 2 * BS,
        cache_bytes: 2 * BS,
        dirty_clear_interval: Duration::from_millis(3),
        ..OpenOptions::default()
    };
    let vol = Arc::new(Volume::open(mb.clone(), &opts).unwrap());
    const WRITERS: u64 = 3;
    // Blocks around group and sector boundaries of groups 0..=2; writer w owns those ≡ w.
    let blocks: Vec<u64> = (0..60u64)
        .map(|i| [0u64, 60, 124, 490, 496, 560, 985, 992][(i % 8) as usize] + i / 8)
        .collect();
    let stop = Arc::new(AtomicBool::new(false));
    let errors = Arc::new(std::sync::Mutex::new(Vec::<String>::new()));
    let mut handles = Vec::new();
    for w in 0..WRITERS {
        let (vol, stop, errors, blocks) = (vol.clone(), stop.clone(), errors.clone(), blocks.clone());
        handles.push(std::thread::spawn(move || {
            let mut rng = ChaCha8Rng::seed_from_u64(seed ^ w);
            let mine: Vec<u64> = blocks.iter().copied().filter(|b| b % WRITERS == w).collect();
            let mut model: BTreeMap<u64, Vec<u8>> = BTreeMap::new();
            let mut v = 0u32;
            let deadline = Instant::now() + Duration::from_millis(millis);
            while Instant::now() < deadline && !stop.load(Ordering::Relaxed) {
                let b = mine[rng.random_range(0..mine.len())];
                v += 1;
                let off = b * BS as u64;
                let r = match rng.random_range(0..10) {
                    0..=3 => {
                        let d = pattern(b, v);
                        model.insert(b, d.clone());
                        vol.write_at(&d, off)
                    }
                    4 | 5 => {
                        let mut d = model.get(&b).cloned().unwrap_or_else(|| vec![0; BS]);
                        let at = 512 * rng.random_range(0..8usize);
                        d[at..at + 512].fill((v as u8) | 1);
                        let r = vol.write_at(&d[at..at + 512], off + at as u64);
                        model.insert(b, d);
                        r
                    }
                    6 => {
                        model.insert(b, vec![0; BS]);
                        vol.discard(off, BS as u64)
                    }
                    7 => {
                        model.insert(b, vec![0; BS]);
                        vol.write_zeroes(off, BS as u64)
                    }
                    8 => vol.flush(),
                    _ => read_block(&vol, b).map(|d| {
                        let want = model.get(&b).cloned().unwrap_or_else(|| vec![0; BS]);
                        if d != want {
                            errors
                                .lock()
                                .unwrap()
                                .push(format!("writer {w}: block {b} read a wrong version"));
                        }
                    }),
                };
                if let Err(e) = r {
                    errors.lock().unwrap().push(format!("writer {w}: block {b}: {e}"));
                    stop.store(true, Ordering::Relaxed);
                }
            }
            model
        }));
    }
    for r in 0..2u64 {
        let (vol, stop, errors, blocks) = (vol.clone(), stop.clone(), errors.clone(), blocks.clone());
        handles.push(std::thread::spawn(move || {
            let mut rng = ChaCha8Rng::seed_from_u64(seed ^ (100 + r));
            let deadline = Instant::now() + Duration::from_millis(millis);
            while Instant::now() < deadline && !stop.load(Ordering::Relaxed) {
                // Readers roam the groups, loading and evicting metadata.
                let b = if rng.random_bool(0.5) {
                    blocks[rng.random_range(0..blocks.len())]
                } else {
                    rng.random_range(0..1500u64)
                };
                if let Err(e) = read_block(&vol, b) {
                    errors.lock().unwrap().push(format!("reader {r}: block {b}: {e}"));
                    stop.store(true, Ordering::Relaxed);
                }
            }
            BTreeMap::new()
        }));
    }
    let mut model = BTreeMap::new();
    for h in handles {
        model.extend(h.join().unwrap());
    }
    let vol = no_errors_and_model_after_reopen(mode, seed, &errors, vol, mb, model);
    assert!(vol.check_metadata(0, 4).unwrap().is_empty());
}

#[test]
fn held_concurrent_writes_discards_zeroing_under_cache_pressure() {
    let seed = std::env::var("REVIEW_SEED")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(0xc0c0u64);
    let millis = std::env::var("REVIEW_MILLIS")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(1500);
    for mode in [Mode::Rebuild, Mode::Journal] {
        println!("{mode:?} seed {seed} for {millis} ms");
        concurrent_mixed(mode, seed, millis);
    }
}

/// A data write landing one block off — forward from a group's last block onto the next
/// group's metadata, or onto the neighbouring data block — in the single-copy modes, no crash:
/// both the lost block and the overwritten neighbour (or the neighbour group's tags) are
/// reported after a clean reopen, never returned.
#[test]
fn held_single_copy_write_one_block_off_is_reported() {
    for mode in [Mode::Rebuild, Mode::Journal] {
        for onto_meta in [true, false] {
            let (fb, vol) = fault_volume(mode, &sync_opts());
            for b in [494u64, 495, 496, 497, 530] {
                vol.write_at(&pattern(b, 1), b * BS as u64).unwrap();
            }
            vol.flush().unwrap();
            let g = *vol.geometry();
            let (src, dst) = if onto_meta {
                (495, g.meta_offset(1, 0))
            } else {
                (494, g.data_offset(495))
            };
            let from = g.data_offset(src);
            fb.misdirect_writes_with(move |off, _| (off == from).then_some(dst));
            vol.write_at(&pattern(src, 2), src * BS as u64).unwrap();
            vol.flush().unwrap();
            fb.clear_faults();
            vol.close().unwrap();
            let vol = Volume::open(fb.clone(), &sync_opts()).unwrap();
            let victims: &[u64] = if onto_meta {
                &[495, 496, 497, 530]
            } else {
                &[494, 495]
            };
            for &b in victims {
                let r = read_block(&vol, b);
                assert!(
                    r.is_err(),
                    "{mode:?} onto_meta {onto_meta}: block {b} read without error"
                );
            }
            // Blocks of the neighbour group outside the damaged sector still read.
            vol.close().unwrap();
        }
    }
}

/// Groups' first writes (tiny groups, so most writes are one) from several threads with the
/// background committer, and readers evicting the one-entry-per-shard metadata cache: no write
/// refused as "metadata damaged", no false error on a read, everything read back after reopen.
/// (With a commit's tags installed in the cache before they are written, this fails.)
fn concurrent_first_writes(mode: Mode, seed: u64, millis: u64) {
    let mut f = format_opts(mode);
    f.group_blocks = Some(4);
    f.size = Some(SIZE * 2);
    let mb = Arc::new(MemoryBackend::new(f.backing_len().unwrap()).unwrap());
    Volume::format(mb.clone(), &f).unwrap().close().unwrap();
    let opts = OpenOptions {
        background_commit: true,
        stage_bytes: BS,
        cache_bytes: 2 * BS,
        ..OpenOptions::default()
    };
    let vol = Arc::new(Volume::open(mb.clone(), &opts).unwrap());
    let blocks = vol.geometry().data_blocks;
    let stop = Arc::new(AtomicBool::new(false));
    let errors = Arc::new(std::sync::Mutex::new(Vec::<String>::new()));
    let mut handles = Vec::new();
    for w in 0..3u64 {
        let (vol, stop, errors) = (vol.clone(), stop.clone(), errors.clone());
        handles.push(std::thread::spawn(move || {
            let mut rng = ChaCha8Rng::seed_from_u64(seed ^ w);
            let mut model = BTreeMap::new();
            let deadline = Instant::now() + Duration::from_millis(millis);
            let mut next = w;
            while Instant::now() < deadline && !stop.load(Ordering::Relaxed) && next < blocks {
                // Mostly the next fresh block; sometimes one written before (into its group).
                let b = if rng.random_bool(0.7) || model.is_empty() {
                    next += 3;
                    next - 3
                } else {
                    *model.keys().nth(rng.random_range(0..model.len())).unwrap()
                };
                let v = rng.random_range(0..u32::MAX);
                let d = pattern(b, v);
                let r = if rng.random_bool(0.2) {
                    model.insert(b, vec![0; BS]);
                    vol.discard(b * BS as u64, BS as u64)
                } else {
                    model.insert(b, d.clone());
                    vol.write_at(&d, b * BS as u64)
                };
                if let Err(e) = r {
                    errors.lock().unwrap().push(format!("writer {w}: block {b}: {e}"));
                    stop.store(true, Ordering::Relaxed);
                }
            }
            model
        }));
    }
    for r in 0..2u64 {
        let (vol, stop, errors) = (vol.clone(), stop.clone(), errors.clone());
        handles.push(std::thread::spawn(move || {
            let mut rng = ChaCha8Rng::seed_from_u64(seed ^ (100 + r));
            let deadline = Instant::now() + Duration::from_millis(millis);
            while Instant::now() < deadline && !stop.load(Ordering::Relaxed) {
                let b = rng.random_range(0..blocks);
                if let Err(e) = read_block(&vol, b) {
                    errors.lock().unwrap().push(format!("reader {r}: block {b}: {e}"));
                    stop.store(true, Ordering::Relaxed);
                }
            }
            BTreeMap::new()
        }));
    }
    let mut model = BTreeMap::new();
    let mut handles = handles.into_iter();
    for h in handles.by_ref().take(3) {
        model.extend(h.join().unwrap());
    }
    // The writers ran out of fresh blocks: the round is over.
    stop.store(true, Ordering::Relaxed);
    for h in handles {
        h.join().unwrap();
    }
    drop(no_errors_and_model_after_reopen(
        mode, seed, &errors, vol, mb, model,
    ));
}

#[test]
fn held_concurrent_first_writes_under_cache_pressure() {
    let seed = std::env::var("REVIEW_SEED")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(0xf1f1u64);
    let millis = std::env::var("REVIEW_MILLIS")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(1500);
    for mode in [Mode::Rebuild, Mode::Journal] {
        let start = Instant::now();
        let mut round = 0;
        while start.elapsed() < Duration::from_millis(millis) {
            println!("{mode:?} seed {} for up to {millis} ms", seed + round);
            concurrent_first_writes(mode, seed + round, millis);
            round += 1;
        }
    }
}

/// A group's first write cut by a crash with its metadata write torn at every one of the 256
/// 512-byte masks (the other unflushed writes all kept, or all lost): never a false alarm,
/// never data that was not written — the blank sectors a torn first write leaves are settled
/// by retag (rebuild) or replay (journal), not reported as a wiped group.
#[test]
fn held_torn_first_metadata_write_every_mask() {
    for mode in [Mode::Rebuild, Mode::Journal] {
        let (fb, vol) = fault_volume(mode, &sync_opts());
        let mut versions = Versions::default();
        // The history starts before the writes: the stage (three blocks) may commit the group's
        // first write before the flush, and journal mode makes its metadata durable at once.
        fb.forget_history();
        for b in [496u64, 600, 991] {
            let d = pattern(b, 1);
            vol.write_at(&d, b * BS as u64).unwrap();
            versions.add(b, d);
        }
        let meta = vol.geometry().meta_offset(1, 0);
        vol.flush().unwrap();
        let blocks: BTreeSet<u64> = [495u64, 496, 497, 600, 991].into();
        let mut tried = 0;
        let mut problems = Vec::new();
        fb.for_each_history_point(|n, st| {
            let pending = st.unflushed();
            // The point right after the metadata write was issued (data issued before it).
            let Some(m) = pending.iter().position(|w| w.offset == meta) else {
                return;
            };
            if tried > 0 {
                return;
            }
            let sectors = pending[m].sector_count();
            assert_eq!(sectors, 8);
            for mask in 0..256u32 {
                for others in [false, true] {
                    let keep: Vec<(usize, Vec<bool>)> = (0..pending.len())
                        .filter_map(|i| {
                            if i == m {
                                Some((i, (0..8).map(|s| mask & (1 << s) != 0).collect()))
                            } else {
                                others.then(|| (i, vec![true; pending[i].sector_count()]))
                            }
                        })
                        .collect();
                    tried += 1;
                    if let Err(e) = check_image(st.crash_image_torn(&keep), &versions, &blocks) {
                        problems.push(format!("{mode:?} point {n} mask {mask:08b} others {others}: {e}"));
                    }
                }
            }
        });
        drop(vol);
        assert!(
            tried >= 512,
            "{mode:?}: the metadata write was never pending ({tried})"
        );
        assert!(
            problems.is_empty(),
            "{} problems, first {:?}",
            problems.len(),
            problems.first()
        );
    }
}

/// The end of a concurrent round: no thread saw an error, and after a close and reopen every
/// block of `model` reads what was last written to it. Returns the reopened volume.
fn no_errors_and_model_after_reopen(
    mode: Mode,
    seed: u64,
    errors: &std::sync::Mutex<Vec<String>>,
    vol: Arc<Volume>,
    mb: Arc<MemoryBackend>,
    model: BTreeMap<u64, Vec<u8>>,
) -> Volume {
    let errors = errors.lock().unwrap().clone();
    assert!(
        errors.is_empty(),
        "{mode:?} seed {seed}: {} errors, first {:?}",
        errors.len(),
        errors.first()
    );
    Arc::into_inner(vol).unwrap().close().unwrap();
    let vol = Volume::open(mb, &sync_opts()).unwrap();
    for (b, d) in model {
        assert_eq!(
            read_block(&vol, b).unwrap(),
            d,
            "{mode:?} seed {seed}: block {b} after reopen"
        );
    }
    vol
}
