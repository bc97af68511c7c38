//! Adversarial review of `journal` mode (commit ed74de9), written from the outside: only the
//! implementation and the claims of docs/CONSISTENCY.md ("`journal` mode") and docs/FORMAT.md
//! ("Journal") were read, not the project's own journal tests.
//!
//! Every test asserts a documented claim. Tests named `bug_*` fail on ed74de9 (each shows a
//! finding of review_journal/README.md); the others passed there and stay as regression tests.
//! Seeds: `BLOCKGUARD_SEED=<n>` replays one seed of the seeded tests.

use blockguard::blockguard_backend::{Backend, FaultBackend, MemoryBackend, ReadFault};
use blockguard::tag::TagKey;
use blockguard::{FormatOptions, Mode, OpenOptions, Profile, Volume};
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;
use std::sync::Arc;

// ---------------------------------------------------------------------------------------------
// Helpers

#[derive(Clone)]
struct Cfg {
    bs: u64,
    blocks: u64,
    journal: u64,
    profile: Profile,
    key: Option<[u8; 32]>,
    group_blocks: Option<u32>,
}

impl Cfg {
    fn new(bs: u64, blocks: u64, journal: u64) -> Cfg {
        Cfg {
            bs,
            blocks,
            journal,
            profile: Profile::Crc32c,
            key: None,
            group_blocks: None,
        }
    }
    fn size(&self) -> u64 {
        self.bs * self.blocks
    }
    fn format_opts(&self) -> FormatOptions {
        let mut o = FormatOptions::with_size(self.size());
        o.block_size = self.bs as u32;
        o.mode = Mode::Journal;
        o.journal_size = Some(self.journal);
        o.profile = self.profile;
        o.group_blocks = self.group_blocks;
        o.key = self.key.map(|k| TagKey::from_bytes(&k).expect("key"));
        o
    }
    fn open_opts(&self) -> OpenOptions {
        OpenOptions {
            background_commit: false,
            key: self.key.map(|k| TagKey::from_bytes(&k).expect("key")),
            ..OpenOptions::default()
        }
    }
    fn backing_len(&self) -> u64 {
        self.format_opts().backing_len().expect("geometry")
    }
    /// A formatted, closed volume on a fault backend (history forgotten).
    fn fresh(&self) -> Arc<FaultBackend> {
        let fb = Arc::new(FaultBackend::new(self.backing_len()).expect("memory"));
        Volume::format(fb.clone(), &self.format_opts())
            .expect("format")
            .close()
            .expect("close");
        fb.forget_history();
        fb
    }
    fn open(&self, b: Arc<dyn Backend>) -> blockguard::Result<Volume> {
        Volume::open(b, &self.open_opts())
    }
}

fn seeds(n: u64) -> Vec<u64> {
    match std::env::var("BLOCKGUARD_SEED") {
        Ok(s) => vec![s.parse().expect("seed")],
        Err(_) => (0..n).collect(),
    }
}

/// Whole volume contents.
fn read_all(vol: &Volume, size: u64) -> blockguard::Result<Vec<u8>> {
    let mut v = vec![0u8; size as usize];
    vol.read_at(&mut v, 0)?;
    Ok(v)
}

/// Bytes unique to (request, position).
fn fill(req: u32, len: usize) -> Vec<u8> {
    (0..len)
        .map(|i| {
            let x = (i as u32)
                .wrapping_mul(2_654_435_761)
                .wrapping_add(req.wrapping_mul(40503));
            (x >> 13) as u8 | 1
        })
        .collect()
}

fn first_diff(a: &[u8], b: &[u8], bs: u64) -> String {
    match a.iter().zip(b).position(|(x, y)| x != y) {
        Some(i) => format!("first difference at byte {i} (block {})", i as u64 / bs),
        None => "equal".into(),
    }
}

/// A workload of random requests; `snaps[k]` is the volume after the first `k` requests,
/// `started[k]` the history length when request `k` began, `flushes` (history length when a
/// flush returned, requests it covered).
struct Workload {
    snaps: Vec<Vec<u8>>,
    started: Vec<usize>,
    flushes: Vec<(usize, usize)>,
}

impl Workload {
    /// The prefixes a crash after `n` events may leave: at least what the last completed flush
    /// covered, at most the requests begun.
    fn allowed(&self, n: usize) -> std::ops::RangeInclusive<usize> {
        let lo = self
            .flushes
            .iter()
            .filter(|&&(e, _)| e <= n)
            .map(|&(_, k)| k)
            .max()
            .unwrap_or(0);
        let hi = self.started.iter().filter(|&&e| e < n).count();
        lo..=hi.max(lo)
    }
}

#[derive(Clone, Copy)]
struct Mix {
    /// Requests may be unaligned.
    unaligned: bool,
    /// Aligned zeroing requests.
    zeroes: bool,
    /// Unaligned zeroing requests (claimed atomic too: a write request).
    unaligned_zeroes: bool,
}

#[allow(clippy::too_many_arguments)] // A test driver: each knob is a workload parameter.
fn run_workload(
    vol: &Volume,
    fb: &FaultBackend,
    start: Vec<u8>,
    rng: &mut ChaCha8Rng,
    n: usize,
    max: u64,
    bs: u64,
    mix: Mix,
    req_base: u32,
) -> Workload {
    let size = start.len() as u64;
    let mut cur = start;
    let mut w = Workload {
        snaps: vec![cur.clone()],
        started: Vec::new(),
        flushes: Vec::new(),
    };
    for k in 0..n {
        w.started.push(fb.events().len());
        let kind = rng.random_range(0..10);
        let (off, len) = if mix.unaligned && rng.random_bool(0.5) {
            let len = rng.random_range(1..=max);
            (rng.random_range(0..=size - len), len)
        } else {
            let nb = rng.random_range(1..=(max / bs).max(1));
            let b = rng.random_range(0..=size / bs - nb);
            (b * bs, nb * bs)
        };
        let zero = (kind == 0 && mix.zeroes && off % bs == 0 && len % bs == 0)
            || (kind == 1 && mix.unaligned_zeroes);
        if zero {
            vol.write_zeroes(off, len).expect("write_zeroes");
            cur[off as usize..(off + len) as usize].fill(0);
        } else {
            let data = fill(req_base + k as u32, len as usize);
            vol.write_at(&data, off).expect("write");
            cur[off as usize..(off + len) as usize].copy_from_slice(&data);
        }
        w.snaps.push(cur.clone());
        if rng.random_bool(0.2) {
            vol.flush().expect("flush");
            w.flushes.push((fb.events().len(), k + 1));
        }
    }
    w
}

/// Checks one crash image: opens it (replaying), every block must read, and the volume must be
/// one of the allowed prefixes. Returns the index of the prefix found.
fn check_image(
    cfg: &Cfg,
    image: Vec<u8>,
    w: &Workload,
    allowed: std::ops::RangeInclusive<usize>,
    what: &str,
) -> usize {
    let vol = cfg
        .open(Arc::new(MemoryBackend::from_vec(image)))
        .unwrap_or_else(|e| panic!("{what}: open after crash: {e}"));
    let got = read_all(&vol, cfg.size()).unwrap_or_else(|e| panic!("{what}: read after crash: {e}"));
    assert_clean_check(&vol, cfg, what);
    if let Some(k) = allowed.clone().rev().find(|&k| w.snaps[k] == got) {
        return k;
    }
    let near = *allowed.start();
    panic!(
        "{what}: the volume after replay is no allowed prefix {allowed:?} of the requests (vs \
         prefix {near}: {}; vs {}: {})",
        first_diff(&got, &w.snaps[near], cfg.bs),
        allowed.end(),
        first_diff(&got, &w.snaps[*allowed.end()], cfg.bs)
    );
}

/// `check` after a crash and replay finds nothing: no block, metadata sector or map sector is
/// reported because of a crash.
fn assert_clean_check(vol: &Volume, cfg: &Cfg, what: &str) {
    let blocks = vol
        .check_blocks(0, cfg.blocks)
        .unwrap_or_else(|e| panic!("{what}: check: {e}"));
    assert!(
        blocks.is_empty(),
        "{what}: check reports blocks after a crash: {blocks:?}"
    );
    let groups = vol.geometry().groups;
    let meta = vol
        .check_metadata(0, groups)
        .unwrap_or_else(|e| panic!("{what}: check: {e}"));
    assert!(
        meta.is_empty(),
        "{what}: check reports metadata after a crash: {meta:?}"
    );
    // The written-groups map is left out here: FINDING 4 (`bug_crash_leaves_written_map_short`).
}

fn max_atomic(vol: &Volume) -> u64 {
    vol.journal().expect("journal mode").limits.max_atomic
}

// ---------------------------------------------------------------------------------------------
// Findings: these fail on ed74de9.

/// FINDING 1 (high). A failed flush that drops the unflushed writes (Linux after a failed
/// fsync; `fail_next_flush_dropping_writes`), then `Volume::resume`: the failed batch is written
/// again as a NEW segment (next sequence number) after the lost one, which the ring still
/// counts as on disk. The chain replay follows from the durable checkpoint now has a hole, so
/// after a later crash replay stops at the lost segment and every later segment — including
/// ones acknowledged by completed flushes after the resume — is "dropped". Claim broken:
/// "nothing acknowledged by a completed flush is lost" (G2) across resume.
#[test]
fn bug_resume_after_dropped_flush_leaves_a_hole_in_the_chain() {
    let cfg = Cfg::new(4096, 256, 1 << 20);
    let fb = cfg.fresh();
    let vol = cfg.open(fb.clone()).expect("open");
    let bs = cfg.bs as usize;
    vol.write_at(&fill(1, bs), 0).expect("write");
    vol.flush().expect("flush");
    fb.fail_next_flush_dropping_writes();
    vol.write_at(&fill(2, bs), 4096).expect("write");
    assert!(vol.flush().is_err(), "the injected flush failure is reported");
    let report = vol.resume().expect("resume");
    assert!(
        report.lost.is_empty(),
        "nothing lost: the batch was still in memory"
    );
    vol.write_at(&fill(3, bs), 2 * 4096).expect("write");
    vol.flush().expect("flush after resume");
    vol.write_at(&fill(4, bs), 3 * 4096).expect("write");
    vol.flush().expect("flush after resume");
    // Power loss now: the disk is the durable image.
    let image = fb.durable_image();
    drop(vol);
    let vol = cfg
        .open(Arc::new(MemoryBackend::from_vec(image)))
        .expect("open after crash");
    let rep = vol.recovery_at_open().and_then(|r| r.journal.clone());
    for (b, req) in [(0u64, 1u32), (1, 2), (2, 3), (3, 4)] {
        let mut got = vec![0u8; bs];
        let r = vol.read_at(&mut got, b * cfg.bs);
        assert!(
            r.is_ok() && got == fill(req, bs),
            "block {b}, acknowledged by a completed flush, reads {} after the crash (replay: {rep:?})",
            match r {
                Err(e) => format!("an error: {e}"),
                Ok(()) if got.iter().all(|&x| x == 0) => "zeros".into(),
                Ok(()) => "other data".into(),
            }
        );
    }
}

/// FINDING 2 (medium). A zeroing request (`write_zeroes`, NBD WRITE_ZEROES / TRIM) far below the
/// atomic size but not block-aligned is staged in three independent steps (head partial
/// block, tail partial block, whole blocks), each able to end up in a different batch. A commit
/// between them (a full stage, another client's flush) and a crash leave it half applied.
/// Claim broken: "every write request up to the atomic size is entirely old or entirely new".
#[test]
fn bug_unaligned_write_zeroes_is_not_atomic() {
    let cfg = Cfg::new(4096, 64, 1 << 20);
    let fb = cfg.fresh();
    // A stage of one block: what a busy volume's stage does at its bound.
    let opts = OpenOptions {
        stage_bytes: 4096,
        ..cfg.open_opts()
    };
    let vol = Volume::open(fb.clone(), &opts).expect("open");
    let old = fill(7, 3 * 4096);
    vol.write_at(&old, 0).expect("write");
    vol.flush().expect("flush");
    // 8 KiB of zeroes at 2 KiB: well under the atomic size.
    assert!(8192 <= max_atomic(&vol));
    vol.write_zeroes(2048, 8192).expect("write_zeroes");
    let image = fb.durable_image();
    drop(vol);
    let vol = cfg
        .open(Arc::new(MemoryBackend::from_vec(image)))
        .expect("open after crash");
    let mut got = vec![0u8; 3 * 4096];
    vol.read_at(&mut got, 0).expect("read");
    let mut new = old.clone();
    new[2048..2048 + 8192].fill(0);
    assert!(
        got == old || got == new,
        "an 8 KiB write_zeroes is half applied after a crash: {} vs old, {} vs new",
        first_diff(&got, &old, 4096),
        first_diff(&got, &new, 4096)
    );
}

/// FINDING 2 again, in the random crash model with the default stage (its bound is half a
/// segment on a small journal, so commits fall between a zeroing request's steps on their own):
/// unaligned `write_zeroes` up to the atomic size among the workload's requests.
#[test]
fn bug_unaligned_write_zeroes_in_the_crash_model() {
    let mix = Mix {
        unaligned: true,
        zeroes: true,
        // (With this false, the same seeds pass.)
        unaligned_zeroes: true,
    };
    for seed in seeds(3) {
        double_crash(&Cfg::new(4096, 48, 128 << 10), seed, mix, 40);
    }
}

/// FINDING 7 (low). After an ordinary crash — no fault but the power loss — the last segment
/// is often torn: its header sector landed, its payload did not. Replay rightly stops there, but
/// `find_dropped` counts every header of the session with a sequence number at or past the stop
/// as a "dropped" segment, without requiring it to be whole, so the torn last segment itself is
/// reported: `dropped_segments: 1`, and the open logs at ERROR level that durable writes were
/// dropped ("replay stopped at a damaged or missing segment … later segments were dropped") —
/// the alarm meant for real damage in the middle of the log, raised by a plain crash. Claim
/// broken: "no block is ever reported corrupt because of a crash" / dropped segments are
/// "writes that were made durable but could not be replayed".
#[test]
fn bug_torn_last_segment_reported_as_dropped() {
    let cfg = Cfg::new(4096, 64, 1 << 20);
    let fb = cfg.fresh();
    let vol = cfg.open(fb.clone()).expect("open");
    let geo = *vol.geometry();
    let log = geo.journal_offset() + 8192;
    vol.write_at(&fill(1, 4096), 0).expect("write");
    vol.flush().expect("flush");
    vol.write_at(&fill(2, 4 * 4096), 8 * 4096).expect("write");
    // The commit of this batch: crash with only its segment's first sector (the header) kept.
    fb.fail_next_flush();
    let _ = vol.flush();
    let cs = fb.crash_state();
    let pending = cs.unflushed();
    let seg = (0..pending.len())
        .find(|&i| pending[i].offset >= log && pending[i].offset < log + geo.journal_len - 8192)
        .expect("the segment write is unflushed");
    let mut mask = vec![false; pending[seg].sector_count()];
    mask[0] = true;
    let image = cs.crash_image_torn(&[(seg, mask)]);
    drop(vol);
    let vol = cfg
        .open(Arc::new(MemoryBackend::from_vec(image)))
        .expect("open after crash");
    let rep = vol
        .recovery_at_open()
        .and_then(|r| r.journal.clone())
        .expect("replay");
    assert_eq!(
        rep.dropped_segments, 0,
        "an ordinary crash tearing the last segment is reported as a dropped durable segment: {rep:?}"
    );
}

/// FINDING 3 (high). With 64 KiB blocks, journal sizes `format` accepts (the minimum, 576 KiB,
/// up to 768 KiB) give an atomic size of ZERO: the segment cost model cannot fit one block.
/// `write_impl` then splits every write into pieces larger than 0 bytes — pieces of one byte,
/// each again larger than 0 — recursing without end (the process dies of a stack overflow on
/// its first write; see `bug_64k_blocks_minimum_journal_write_overflows_the_stack`). Claim
/// broken: the journal size check (FORMAT.md: at least 8 blocks of log, "a segment needs two
/// blocks") admits a volume that cannot take any write.
///
/// The same holds at the minimum journal for 8, 16 and 32 KiB blocks (73728, 147456 and 294912
/// bytes: the smallest multiple of the block size with 8 blocks of log).
#[test]
fn bug_64k_blocks_minimum_journal_has_zero_atomic_size() {
    let cases = [
        (65536u64, 9u64 << 16),
        (65536, 10 << 16),
        (65536, 11 << 16),
        (65536, 12 << 16),
        (32768, 9 << 15),
        (16384, 9 << 14),
        (8192, 9 << 13),
    ];
    for (bs, journal) in cases {
        let cfg = Cfg::new(bs, 32, journal);
        let fb = Arc::new(FaultBackend::new(cfg.backing_len()).expect("memory"));
        let vol = match Volume::format(fb.clone(), &cfg.format_opts()) {
            Ok(v) => v,
            // Refusing the size would be fine too.
            Err(_) => continue,
        };
        let m = max_atomic(&vol);
        assert!(
            m >= bs,
            "a {journal}-byte journal with {bs}-byte blocks is accepted but its atomic size is {m}: \
             every write recurses forever"
        );
    }
}

/// FINDING 3, the consequence: the first write to such a volume. Ignored because it aborts the
/// whole test process (stack overflow); run it alone with `--ignored`.
#[test]
fn bug_64k_blocks_minimum_journal_write_overflows_the_stack() {
    let cfg = Cfg::new(65536, 32, 9 << 16);
    let fb = Arc::new(FaultBackend::new(cfg.backing_len()).expect("memory"));
    let vol = Volume::format(fb.clone(), &cfg.format_opts()).expect("format");
    vol.write_at(&fill(1, 65536), 0).expect("a one-block write");
    vol.flush().expect("flush");
}

/// FINDING 4 (medium). A group's first write puts its metadata and the written-groups map
/// bits (both copies) home with no order among them. A crash that keeps the metadata but not
/// (all of) the map writes: replay plans the segment again, but the group now reads as already
/// written, so the map bits are not rewritten, and nothing else repairs them (dual's recovery
/// sets missed bits; journal's open only replays). `check` then reports map damage ("group N
/// is written but the written-groups map does not mark it", or a copy "damaged: lacks groups
/// the other copy marks") and exits 1 — until an explicit `recover`. The missed bit also
/// weakens G3: the map is what tells a wiped group from a never-written one. Claim broken:
/// "no block is ever reported corrupt because of a crash" (`check` reports damage that only a
/// crash caused). Also seen by the random crash harness below once the map is checked. The
/// report survives a clean close and reopen, and plain `recover` does not fix it (it sets no
/// map bit in journal mode); only `recover --rebuild` does. (`extents` still reports the
/// block allocated: no hole is invented.)
#[test]
fn bug_crash_leaves_written_map_short() {
    use blockguard::format::MapKind;
    let cfg = Cfg::new(4096, 64, 1 << 20);
    for lost_copies in [vec![0usize, 1], vec![0], vec![1]] {
        let fb = cfg.fresh();
        let vol = cfg.open(fb.clone()).expect("open");
        let geo = *vol.geometry();
        vol.write_at(&fill(1, 4096), 0).expect("write");
        vol.flush().expect("flush");
        let cs = fb.crash_state();
        let maps: Vec<u64> = lost_copies
            .iter()
            .map(|&c| geo.map_offset(MapKind::Written, c))
            .collect();
        let pending = cs.unflushed();
        let keep: Vec<usize> = (0..pending.len())
            .filter(|&i| {
                let w = &pending[i];
                !maps
                    .iter()
                    .any(|&m| w.offset <= m && m < w.offset + w.data.len() as u64)
            })
            .collect();
        assert!(
            keep.len() < pending.len(),
            "the map write is among the unflushed writes"
        );
        let image = cs.crash_image(&keep);
        drop(vol);
        let vol = cfg
            .open(Arc::new(MemoryBackend::from_vec(image)))
            .expect("open after crash");
        let mut got = vec![0u8; 4096];
        vol.read_at(&mut got, 0).expect("read");
        assert_eq!(got, fill(1, 4096));
        let map = vol.check_map().expect("check");
        assert!(
            map.is_empty(),
            "map copies {lost_copies:?} lost in a crash: check reports {map:?}"
        );
    }
}

/// FINDING 5 (low). `journal_size: Some(0)` with `Mode::Journal` (CLI: `format --mode journal
/// --journal-size 0`) is not refused as bad input: it is taken as "no journal", the volume is
/// zeroed and superblocks of mode journal with a zero journal length are written, and only the
/// read-back fails ("both superblock copies are damaged"). With `--force` over an existing
/// volume this leaves a file no command opens, with a message pointing at damage rather than
/// at the option. Every other bad size (1, 63K, 65K, in dual/rebuild mode) is refused up front.
#[test]
fn bug_journal_size_zero_is_not_refused_up_front() {
    let cfg = Cfg::new(4096, 64, 64 << 10);
    let b = Arc::new(MemoryBackend::new(cfg.backing_len() + (1 << 20)).unwrap());
    Volume::format(b.clone(), &cfg.format_opts())
        .expect("format")
        .close()
        .expect("close");
    let mut o = cfg.format_opts();
    o.journal_size = Some(0);
    let r = Volume::format(b.clone(), &o);
    assert!(r.is_err(), "a zero-length journal in journal mode is refused");
    let err = r.err().unwrap().to_string();
    let still = cfg.open(b.clone());
    assert!(
        still.is_ok(),
        "the refused format wrote over the volume anyway: it no longer opens ({}); format said: {err}",
        still.err().unwrap()
    );
}

/// FINDING 8 (medium; inherited from `rebuild`). A wiped group — zeros over both metadata
/// blocks and its data, e.g. one misdirected large zeroing — on a cleanly closed journal volume
/// whose written-groups map marks the group: its blocks read as zeros with no error. Dual mode
/// reports them ("the group's metadata is blank although the written-groups map says it was
/// written (wiped?)"); journal mode (`blank_metadata_means_no_data` false, as in rebuild)
/// takes the blank metadata for never-written and the zeros for a hole. Claim broken:
/// CONSISTENCY.md "Damage (G3)": "A wiped group … its blocks fail as `MetadataDamaged`";
/// "Outside that window a wiped group is reported". (Rebuild mode behaves the same on ed74de9.)
#[test]
fn bug_wiped_group_reads_zeros_in_journal_mode() {
    let cfg = Cfg::new(4096, 64, 1 << 20);
    let b = Arc::new(MemoryBackend::new(cfg.backing_len()).unwrap());
    Volume::format(b.clone(), &cfg.format_opts())
        .expect("format")
        .close()
        .expect("close");
    let vol = cfg.open(b.clone()).expect("open");
    let geo = *vol.geometry();
    vol.write_at(&fill(1, 4096), 0).expect("write");
    vol.close().expect("close");
    let mut img = vec![0u8; b.len() as usize];
    b.read_at(&mut img, 0).expect("read");
    for slot in 0..2 {
        let at = geo.meta_offset(0, slot) as usize;
        img[at..at + 4096].fill(0);
    }
    let d = geo.data_offset(0) as usize;
    img[d..d + 4096].fill(0);
    let vol = cfg.open(Arc::new(MemoryBackend::from_vec(img))).expect("open");
    let mut buf = vec![0u8; 4096];
    let r = vol.read_at(&mut buf, 0);
    assert!(
        r.is_err(),
        "block 0 of a wiped group (written, flushed, closed) reads as zeros without an error"
    );
}

// ---------------------------------------------------------------------------------------------
// Claims that held on ed74de9 (regression tests).

/// Crash at every point of a session (torn, reordered, subsets), then a SECOND crash at every
/// point of the session after the replay — during the open's replay, before the first new
/// commit, during it (session start: new checkpoint copies), and later. Always an allowed prefix,
/// nothing reported corrupt. Aligned and unaligned writes up to the atomic size, zeroing.
fn double_crash(cfg: &Cfg, seed: u64, mix: Mix, first_points: usize) {
    let mut rng = ChaCha8Rng::seed_from_u64(seed);
    let fb = cfg.fresh();
    let vol = cfg.open(fb.clone()).expect("open");
    let max = max_atomic(&vol);
    assert!(max >= cfg.bs, "atomic size {max}");
    let start = read_all(&vol, cfg.size()).expect("read");
    let w = run_workload(&vol, &fb, start, &mut rng, 40, max, cfg.bs, mix, 1000);
    drop(vol);
    let mut points = Vec::new();
    fb.for_each_history_point(|n, cs| points.push((n, cs.clone())));
    let total = points.len();
    let picks: Vec<usize> = if total <= first_points {
        (0..total).collect()
    } else {
        (0..first_points)
            .map(|i| i * (total - 1) / (first_points - 1))
            .collect()
    };
    for (i, &p) in picks.iter().enumerate() {
        let (n, cs) = &points[p];
        let image = cs.random_crash_image(&mut rng, true);
        let what = format!("seed {seed}, first crash at event {n}");
        let k = check_image(cfg, image.clone(), &w, w.allowed(*n), &what);
        // Every other pick: crash again, all along the next session.
        if i % 2 == 1 {
            continue;
        }
        let fb2 = Arc::new(FaultBackend::from_image(image));
        let vol2 = cfg.open(fb2.clone()).expect("open after first crash");
        let s = read_all(&vol2, cfg.size()).expect("read");
        assert_eq!(s, w.snaps[k], "{what}: replayed twice differently");
        let opened = fb2.events().len();
        let w2 = run_workload(
            &vol2,
            &fb2,
            s,
            &mut rng,
            6,
            max,
            cfg.bs,
            mix,
            5000 + 100 * i as u32,
        );
        drop(vol2);
        let mut seen = 0;
        fb2.for_each_history_point(|n2, cs2| {
            seen += 1;
            let image = cs2.random_crash_image(&mut rng, true);
            let what = format!("{what}, second crash at event {n2} (open done at {opened})");
            let allowed = if n2 <= opened { 0..=0 } else { w2.allowed(n2) };
            check_image(cfg, image, &w2, allowed, &what);
        });
        assert!(seen > 2);
    }
}

const PLAIN: Mix = Mix {
    unaligned: true,
    zeroes: true,
    unaligned_zeroes: false,
};

#[test]
fn double_crash_4k_blocks_small_journal() {
    for seed in seeds(3) {
        double_crash(&Cfg::new(4096, 48, 128 << 10), seed, PLAIN, 30);
    }
}

#[test]
fn double_crash_512_byte_blocks_minimum_journal() {
    for seed in seeds(3) {
        double_crash(&Cfg::new(512, 256, 64 << 10), seed, PLAIN, 30);
    }
}

#[test]
fn double_crash_64k_blocks_default_journal() {
    for seed in seeds(2) {
        double_crash(&Cfg::new(65536, 16, 1 << 20), seed, PLAIN, 16);
    }
}

#[test]
fn double_crash_keyed_32_byte_tags() {
    for seed in seeds(3) {
        let mut cfg = Cfg::new(4096, 48, 128 << 10);
        cfg.profile = Profile::Blake3Keyed;
        cfg.key = Some([0x5a; 32]);
        double_crash(&cfg, seed, PLAIN, 30);
    }
}

/// One bad read (zeros, a stale read, a read one block off) at ANY single read of the open
/// that replays a crash image, of the reads after it, and of the first commit of the next
/// session (its generation reading): the open succeeds, the volume reads exactly what a
/// faultless replay gives, and the next session's flushed write survives another crash.
fn one_bad_read(cfg: &Cfg, seed: u64) {
    use std::sync::atomic::{AtomicUsize, Ordering};
    let mut rng = ChaCha8Rng::seed_from_u64(seed);
    let fb = cfg.fresh();
    let vol = cfg.open(fb.clone()).expect("open");
    let max = max_atomic(&vol);
    let start = read_all(&vol, cfg.size()).expect("read");
    let w = run_workload(&vol, &fb, start, &mut rng, 30, max, cfg.bs, PLAIN, 1);
    drop(vol);
    let n = fb.events().len();
    let cs = fb.state_at(n * 3 / 4);
    let image = cs.random_crash_image(&mut rng, true);
    // What stale reads return: the disk as it was earlier.
    let earlier = fb.state_at(n / 3).random_crash_image(&mut rng, false);
    let expected = {
        let vol = cfg
            .open(Arc::new(MemoryBackend::from_vec(image.clone())))
            .expect("open");
        read_all(&vol, cfg.size()).expect("read")
    };
    assert!(
        w.snaps.contains(&expected),
        "seed {seed}: faultless replay gives no prefix"
    );
    let bs = cfg.bs as usize;
    let extra = fill(777_777, bs);
    let mut after = expected.clone();
    after[bs..2 * bs].copy_from_slice(&extra);
    let make = || {
        let b = Arc::new(FaultBackend::new(image.len() as u64).expect("memory"));
        b.write_at(&earlier, 0).expect("write");
        b.flush().expect("flush");
        b.write_at(&image, 0).expect("write");
        b.flush().expect("flush");
        b
    };
    // Count the reads of a faultless run.
    let count = Arc::new(AtomicUsize::new(0));
    let run = |b: &Arc<FaultBackend>| -> Result<(), String> {
        let vol = cfg.open(b.clone()).map_err(|e| format!("open: {e}"))?;
        let got = read_all(&vol, cfg.size()).map_err(|e| format!("read: {e}"))?;
        if got != expected {
            return Err(format!("reads differ: {}", first_diff(&got, &expected, cfg.bs)));
        }
        vol.write_at(&extra, cfg.bs).map_err(|e| format!("write: {e}"))?;
        vol.flush().map_err(|e| format!("flush: {e}"))?;
        let crash = b.durable_image();
        drop(vol);
        let vol = cfg
            .open(Arc::new(MemoryBackend::from_vec(crash)))
            .map_err(|e| format!("reopen: {e}"))?;
        let got = read_all(&vol, cfg.size()).map_err(|e| format!("read after 2nd crash: {e}"))?;
        if got != after {
            return Err(format!(
                "after the 2nd crash: {}",
                first_diff(&got, &after, cfg.bs)
            ));
        }
        Ok(())
    };
    {
        let b = make();
        let c = count.clone();
        b.read_faults_with(move |_, _| {
            c.fetch_add(1, Ordering::SeqCst);
            None
        });
        run(&b).unwrap_or_else(|e| panic!("seed {seed}, no fault: {e}"));
    }
    let reads = count.load(Ordering::SeqCst);
    assert!(reads > 5);
    for k in 0..reads {
        for kind in 0..3 {
            let b = make();
            let c = Arc::new(AtomicUsize::new(0));
            let bs64 = cfg.bs;
            b.read_faults_with(move |off, _| {
                (c.fetch_add(1, Ordering::SeqCst) == k).then_some(match kind {
                    0 => ReadFault::Zeros,
                    1 => ReadFault::Stale,
                    _ => ReadFault::From(off + bs64),
                })
            });
            run(&b).unwrap_or_else(|e| {
                panic!("seed {seed}: one bad read (kind {kind}) at read {k} of {reads}: {e}")
            });
        }
    }
}

#[test]
fn one_bad_read_during_replay_and_session_start_4k() {
    for seed in seeds(2) {
        one_bad_read(&Cfg::new(4096, 32, 128 << 10), seed);
    }
}

#[test]
fn one_bad_read_during_replay_and_session_start_512() {
    for seed in seeds(2) {
        one_bad_read(&Cfg::new(512, 128, 64 << 10), seed);
    }
}

/// A mirror set in journal mode, each member crashing differently (its own subset, order and
/// tearing of its unflushed writes) after every request: the set reopens to an allowed prefix,
/// nothing reported; then a second, different crash of each member right after that open's
/// replay and one more flushed write.
fn mirror_crash(members: usize) {
    for seed in seeds(3) {
        let mut rng = ChaCha8Rng::seed_from_u64(seed);
        let cfg = Cfg::new(4096, 48, 128 << 10);
        let len = cfg.backing_len();
        let m: Vec<Arc<FaultBackend>> = (0..members)
            .map(|_| Arc::new(FaultBackend::new(len).expect("memory")))
            .collect();
        let dyns = |m: &[Arc<FaultBackend>]| {
            m.iter()
                .map(|b| b.clone() as Arc<dyn Backend>)
                .collect::<Vec<_>>()
        };
        let vol = Volume::format_members(dyns(&m), &cfg.format_opts()).expect("format");
        vol.close().expect("close");
        let vol = Volume::open_members(dyns(&m), &cfg.open_opts()).expect("open");
        let max = max_atomic(&vol);
        let mut cur = read_all(&vol, cfg.size()).expect("read");
        let mut snaps = vec![cur.clone()];
        let mut flushed = 0;
        for k in 0..30usize {
            let nb = rng.random_range(1..=max / cfg.bs);
            let off = if rng.random_bool(0.5) {
                rng.random_range(0..=cfg.size() - nb * cfg.bs)
            } else {
                rng.random_range(0..=cfg.blocks - nb) * cfg.bs
            };
            let data = fill(k as u32 + 1, (nb * cfg.bs) as usize);
            vol.write_at(&data, off).expect("write");
            cur[off as usize..off as usize + data.len()].copy_from_slice(&data);
            snaps.push(cur.clone());
            if rng.random_bool(0.3) {
                vol.flush().expect("flush");
                flushed = k + 1;
            }
            let images: Vec<Vec<u8>> = m
                .iter()
                .map(|b| b.crash_state().random_crash_image(&mut rng, true))
                .collect();
            let what = format!("seed {seed}, crash after request {k}");
            // Each member alone (the other lost with the crash): its own journal replayed.
            for (i, img) in images.iter().enumerate() {
                let v = Volume::open_members(
                    vec![Arc::new(MemoryBackend::from_vec(img.clone())) as Arc<dyn Backend>],
                    &cfg.open_opts(),
                )
                .unwrap_or_else(|e| panic!("{what}: member {i} alone: open: {e}"));
                let got = read_all(&v, cfg.size())
                    .unwrap_or_else(|e| panic!("{what}: member {i} alone: read: {e}"));
                assert!(
                    (flushed..=k + 1).any(|p| snaps[p] == got),
                    "{what}: member {i} alone: no allowed prefix"
                );
            }
            let fbs: Vec<Arc<FaultBackend>> = images
                .into_iter()
                .map(|i| Arc::new(FaultBackend::from_image(i)))
                .collect();
            let v2 = Volume::open_members(dyns(&fbs), &cfg.open_opts())
                .unwrap_or_else(|e| panic!("{what}: open: {e}"));
            let got = read_all(&v2, cfg.size()).unwrap_or_else(|e| panic!("{what}: read: {e}"));
            let Some(p) = (flushed..=k + 1).find(|&p| snaps[p] == got) else {
                panic!(
                    "{what}: no allowed prefix {flushed}..={} ({})",
                    k + 1,
                    first_diff(&got, &snaps[flushed], cfg.bs)
                );
            };
            // Second crash: right after the replay, and after one flushed write.
            let extra = fill(90_000 + k as u32, cfg.bs as usize);
            let crash0: Vec<Vec<u8>> = fbs
                .iter()
                .map(|b| b.crash_state().random_crash_image(&mut rng, true))
                .collect();
            v2.write_at(&extra, 0).expect("write");
            v2.flush().expect("flush");
            let crash1: Vec<Vec<u8>> = fbs
                .iter()
                .map(|b| b.crash_state().random_crash_image(&mut rng, true))
                .collect();
            drop(v2);
            let mut want1 = snaps[p].clone();
            want1[..cfg.bs as usize].copy_from_slice(&extra);
            for (imgs, want, when) in [
                (crash0, &snaps[p], "right after the replay"),
                (crash1, &want1, "after a flushed write"),
            ] {
                let v3 = Volume::open_members(
                    imgs.into_iter()
                        .map(|i| Arc::new(MemoryBackend::from_vec(i)) as Arc<dyn Backend>)
                        .collect(),
                    &cfg.open_opts(),
                )
                .unwrap_or_else(|e| panic!("{what}, second crash {when}: open: {e}"));
                let got = read_all(&v3, cfg.size())
                    .unwrap_or_else(|e| panic!("{what}, second crash {when}: read: {e}"));
                assert!(
                    &got == want,
                    "{what}, second crash {when}: {}",
                    first_diff(&got, want, cfg.bs)
                );
            }
        }
    }
}

#[test]
fn mirror_members_crash_differently() {
    mirror_crash(2);
}

#[test]
fn mirror_three_members_crash_differently() {
    mirror_crash(3);
}

/// Concurrent writers (aligned and unaligned, up to the atomic size) and flushes on the
/// smallest journal: never an error (a full journal makes writers wait), and everything reads
/// back after close and reopen.
fn concurrent_tiny_journal(cfg: &Cfg) {
    let fb = cfg.fresh();
    let opts = OpenOptions {
        background_commit: true,
        ..cfg.open_opts()
    };
    let vol = Arc::new(Volume::open(fb.clone(), &opts).expect("open"));
    let max = max_atomic(&vol);
    let threads = 4u64;
    let region = cfg.size() / threads;
    let handles: Vec<_> = (0..threads)
        .map(|t| {
            let vol = vol.clone();
            std::thread::spawn(move || {
                let mut rng = ChaCha8Rng::seed_from_u64(t);
                let base = t * region;
                let mut cur = vec![0u8; region as usize];
                for k in 0..300u32 {
                    let len = rng.random_range(1..=max.min(region));
                    let off = rng.random_range(0..=region - len);
                    if rng.random_bool(0.1) {
                        vol.write_zeroes(base + off, len).expect("write_zeroes");
                        cur[off as usize..(off + len) as usize].fill(0);
                    } else {
                        let d = fill(t as u32 * 100_000 + k, len as usize);
                        vol.write_at(&d, base + off).expect("write");
                        cur[off as usize..(off + len) as usize].copy_from_slice(&d);
                    }
                    if rng.random_bool(0.2) {
                        vol.flush().expect("flush");
                    }
                }
                cur
            })
        })
        .collect();
    let mut want = Vec::new();
    for h in handles {
        want.extend(h.join().expect("writer"));
    }
    want.resize(cfg.size() as usize, 0);
    let vol = Arc::into_inner(vol).expect("last");
    vol.close().expect("close");
    let vol = cfg.open(fb.clone()).expect("reopen");
    let got = read_all(&vol, cfg.size()).expect("read");
    assert!(got == want, "{}", first_diff(&got, &want, cfg.bs));
}

#[test]
fn concurrent_writers_minimum_journal_4k() {
    concurrent_tiny_journal(&Cfg::new(4096, 64, 64 << 10));
}

#[test]
fn concurrent_writers_minimum_journal_512_keyed() {
    let mut cfg = Cfg::new(512, 512, 64 << 10);
    cfg.profile = Profile::Blake3Keyed;
    cfg.key = Some([7; 32]);
    concurrent_tiny_journal(&cfg);
}

/// A write of exactly the atomic size at an unaligned offset (it spans one block more than
/// the atomic size), after a staged write filling most of the batch, and one byte over the
/// atomic size (split): crash at every point, torn — each request (each piece) whole or not.
#[test]
fn requests_at_and_just_over_the_atomic_size() {
    for seed in seeds(3) {
        let mut rng = ChaCha8Rng::seed_from_u64(seed);
        let cfg = Cfg::new(4096, 32, 128 << 10);
        let fb = cfg.fresh();
        let vol = cfg.open(fb.clone()).expect("open");
        let m = max_atomic(&vol);
        let mut cur = read_all(&vol, cfg.size()).expect("read");
        let mut w = Workload {
            snaps: vec![cur.clone()],
            started: Vec::new(),
            flushes: Vec::new(),
        };
        let reqs: Vec<(u64, u64)> = vec![
            (0, m - cfg.bs),      // fills most of a batch
            (512, m),             // spans m/bs + 1 blocks
            (20 * 4096 + 100, m), // again, elsewhere
            (8 * 4096, m + 1),    // split: two requests
            (2048, m),
        ];
        for (k, &(off, len)) in reqs.iter().enumerate() {
            w.started.push(fb.events().len());
            let d = fill(k as u32 + 1, len as usize);
            vol.write_at(&d, off).expect("write");
            if len > m {
                // Split at the atomic size: the pieces are separate requests.
                let cut = ((off + m) / cfg.bs * cfg.bs - off) as usize;
                cur[off as usize..off as usize + cut].copy_from_slice(&d[..cut]);
                w.snaps.push(cur.clone());
                w.started.push(fb.events().len());
            }
            cur[off as usize..(off + len) as usize].copy_from_slice(&d);
            w.snaps.push(cur.clone());
        }
        vol.flush().expect("flush");
        w.flushes.push((fb.events().len(), w.snaps.len() - 1));
        drop(vol);
        fb.for_each_history_point(|n, cs| {
            for _ in 0..3 {
                let image = cs.random_crash_image(&mut rng, true);
                check_image(
                    &cfg,
                    image,
                    &w,
                    w.allowed(n),
                    &format!("seed {seed}, crash at {n}"),
                );
            }
        });
    }
}

/// One segment write misdirected one block further (it lands over the next free block) in the
/// middle of a run of flushed single-block batches: replay stops at it and reports the later
/// segments; every block that does not read its flushed content is among the reported blocks.
#[test]
fn misdirected_segment_write_is_reported() {
    let cfg = Cfg::new(4096, 64, 1 << 20);
    let fb = cfg.fresh();
    let vol = cfg.open(fb.clone()).expect("open");
    let geo = *vol.geometry();
    let log = geo.journal_offset() + 8192;
    let bs = cfg.bs as usize;
    for b in 0..8u64 {
        if b == 3 {
            // Single-block batches: segments of 4096 (descriptor) + 4096 (data), from log offset 0.
            fb.misdirect_next_write(log + 3 * 8192 + 4096);
        }
        vol.write_at(&fill(b as u32 + 1, bs), b * cfg.bs).expect("write");
        vol.flush().expect("flush");
    }
    let image = fb.durable_image();
    drop(vol);
    let vol = cfg
        .open(Arc::new(MemoryBackend::from_vec(image)))
        .expect("open after crash");
    let rep = vol
        .recovery_at_open()
        .and_then(|r| r.journal.clone())
        .expect("a replay");
    assert_eq!(rep.segments_replayed, 3, "{rep:?}");
    assert!(
        rep.dropped_segments >= 1,
        "the later segments are reported: {rep:?}"
    );
    for b in 0..8u64 {
        let mut got = vec![0u8; bs];
        let ok = vol.read_at(&mut got, b * cfg.bs).is_ok() && got == fill(b as u32 + 1, bs);
        assert!(
            ok || rep.dropped_blocks.contains(&b),
            "block {b} reads wrong but is not reported dropped: {rep:?}"
        );
    }
}

/// Every write of checkpoint copy 0 misdirected onto copy 1 (copy 0 never changes again: a
/// lost copy, every time): with a small journal that wraps and checkpoints often, crashes all
/// along still give an allowed prefix.
#[test]
fn checkpoint_copy_0_never_written() {
    for seed in seeds(2) {
        let mut rng = ChaCha8Rng::seed_from_u64(seed);
        let cfg = Cfg::new(4096, 48, 64 << 10);
        let fb = cfg.fresh();
        let vol = cfg.open(fb.clone()).expect("open");
        let j = vol.geometry().journal_offset();
        fb.misdirect_writes_with(move |off, len| (off == j && len <= 4096).then_some(j + 4096));
        let max = max_atomic(&vol);
        let start = read_all(&vol, cfg.size()).expect("read");
        let w = run_workload(&vol, &fb, start, &mut rng, 40, max, cfg.bs, PLAIN, 1);
        drop(vol);
        fb.for_each_history_point(|n, cs| {
            let image = cs.random_crash_image(&mut rng, true);
            check_image(
                &cfg,
                image,
                &w,
                w.allowed(n),
                &format!("seed {seed}, crash at {n}"),
            );
        });
    }
}

/// Bad `journal_size` values: refused at format, or (0) a volume that works.
#[test]
fn bad_journal_sizes_are_refused_or_work() {
    for (size, mode) in [
        (1u64, Mode::Journal),
        (63 << 10, Mode::Journal),
        ((64 << 10) + 512, Mode::Journal),
        (64 << 10, Mode::Dual),
        (64 << 10, Mode::Rebuild),
    ] {
        let mut cfg = Cfg::new(4096, 64, size);
        let mut o = cfg.format_opts();
        o.mode = mode;
        cfg.journal = size;
        assert!(
            o.backing_len().is_err()
                || Volume::format(Arc::new(MemoryBackend::new(1 << 22).unwrap()), &o).is_err(),
            "journal size {size} in {mode:?} accepted"
        );
    }
    // Zero with --mode journal: refused, or a working journal volume.
    let cfg = Cfg::new(4096, 64, 0);
    let o = cfg.format_opts();
    if let Ok(len) = o.backing_len() {
        let b = Arc::new(MemoryBackend::new(len).unwrap());
        if let Ok(v) = Volume::format(b.clone(), &o) {
            v.close().expect("close");
            let v = cfg.open(b.clone()).expect("a volume format accepted opens");
            v.write_at(&fill(1, 4096), 0).expect("write");
            v.close().expect("close");
            cfg.open(b).expect("reopen");
        }
    }
}

/// Segments of an earlier session are never replayed: session 1 rewrites one block many
/// times (the log wraps, checkpoints move), crashes, and is replayed at the next open; session
/// 2 then writes once and crashes at every point of its history, every combination of its
/// unflushed writes (its first segment lands at log offset 0, inside session 1's chain, which
/// the checkpoint on disk may still name). The rewritten block must keep its newest version.
#[test]
fn earlier_session_never_replayed_after_a_second_crash() {
    let cfg = Cfg::new(4096, 16, 128 << 10);
    let bs = cfg.bs as usize;
    for k in 1..=40u32 {
        let fb = cfg.fresh();
        let vol = cfg.open(fb.clone()).expect("open");
        for v in 1..=k {
            vol.write_at(&fill(v, bs), 0).expect("write");
            // Another block in most batches, so segments differ in size.
            if v % 3 != 0 {
                vol.write_at(&fill(1000 + v, bs), (1 + u64::from(v) % 7) * cfg.bs)
                    .expect("write");
            }
            vol.flush().expect("flush");
        }
        let crash1 = fb.durable_image();
        drop(vol);
        let fb2 = Arc::new(FaultBackend::from_image(crash1));
        let vol = cfg.open(fb2.clone()).expect("open after crash 1");
        let mut x = vec![0u8; bs];
        vol.read_at(&mut x, 0).expect("read");
        assert_eq!(x, fill(k, bs), "k {k}: replay after crash 1");
        let state1 = read_all(&vol, cfg.size()).expect("read");
        vol.write_at(&fill(5555, bs), 10 * cfg.bs).expect("write");
        vol.flush().expect("flush");
        drop(vol);
        fb2.for_each_history_point(|n, cs| {
            cs.for_each_crash_image(1 << 12, |image| {
                let what = format!("k {k}, crash 2 at event {n}");
                let vol = cfg
                    .open(Arc::new(MemoryBackend::from_vec(image)))
                    .unwrap_or_else(|e| panic!("{what}: open: {e}"));
                let got = read_all(&vol, cfg.size()).unwrap_or_else(|e| panic!("{what}: read: {e}"));
                let mut with = state1.clone();
                with[10 * bs..11 * bs].copy_from_slice(&fill(5555, bs));
                assert!(
                    got == state1 || got == with,
                    "{what}: {} (block 0 reads version {:?} of {k})",
                    first_diff(&got, &state1, cfg.bs),
                    (1..=k).find(|&v| got[..bs] == fill(v, bs)[..])
                );
            })
            .expect("few states");
        });
    }
}

/// A flush that fails (plain: the writes stay unflushed, as after a transient error) at
/// different points of a workload, then `resume`, then more writes and flushes; a crash at the
/// end (every unflushed write lost) keeps everything acknowledged by a completed flush. Same
/// with several failures in a row. (With the failure dropping the writes, FINDING 1.)
#[test]
fn resume_after_plain_flush_failure_keeps_flushed_writes() {
    let cfg = Cfg::new(4096, 64, 128 << 10);
    let bs = cfg.bs as usize;
    for fail_at in 0..12u32 {
        for repeat in 1..=2u32 {
            let fb = cfg.fresh();
            let vol = cfg.open(fb.clone()).expect("open");
            let mut want = vec![0u8; cfg.size() as usize];
            let mut acked = want.clone();
            for k in 0..16u32 {
                let b = u64::from((k * 5) % 64);
                let d = fill(k + 1, bs);
                vol.write_at(&d, b * cfg.bs).expect("write");
                want[b as usize * bs..(b as usize + 1) * bs].copy_from_slice(&d);
                if k == fail_at {
                    for r in 0..repeat {
                        if r > 0 {
                            // Something to commit, so that the flush reaches the backend.
                            let d = fill(50_000 + k, bs);
                            vol.write_at(&d, 63 * cfg.bs).expect("write");
                            want[63 * bs..].copy_from_slice(&d);
                        }
                        fb.fail_next_flush();
                        assert!(vol.flush().is_err(), "injected");
                        vol.resume().expect("resume");
                    }
                }
                if k % 2 == 1 || k == fail_at {
                    vol.flush().expect("flush");
                    acked.clone_from(&want);
                }
            }
            let image = fb.durable_image();
            drop(vol);
            let vol = cfg
                .open(Arc::new(MemoryBackend::from_vec(image)))
                .expect("open after crash");
            let got = read_all(&vol, cfg.size()).expect("read");
            assert!(
                got == acked,
                "failure at {fail_at} x{repeat}: {}",
                first_diff(&got, &acked, cfg.bs)
            );
            assert_clean_check(&vol, &cfg, "after resume and crash");
        }
    }
}

/// FINDING 6 (critical). Journal mode keeps no write-intent (dirty-groups) map — its commits
/// never call `mark_session` — yet `resync` of a member that missed writes copies only the
/// groups that map names (`Extent::Dirty`, unless the member needs a full copy). After a
/// degraded session on member 0, `resync` copies zero groups (only the bitmaps and the
/// journal), declares member 1 in sync, and from then on the set returns member 1's OLD data
/// for blocks written while it was away — silently: member 1's old tags match its old data.
/// Member 1 alone reads the old data too. Claims broken: "mirrors keep all of this" (and G1/G2,
/// G3: stale data returned without an error). Dual mode, same sequence: correct.
#[test]
fn bug_mirror_resync_after_degraded_session_copies_nothing() {
    let mut cfg = Cfg::new(4096, 2048, 128 << 10);
    cfg.group_blocks = Some(64);
    let m: Vec<Arc<FaultBackend>> = (0..2)
        .map(|_| Arc::new(FaultBackend::new(cfg.backing_len()).expect("memory")))
        .collect();
    let dyns = |m: &[Arc<FaultBackend>]| {
        m.iter()
            .map(|b| b.clone() as Arc<dyn Backend>)
            .collect::<Vec<_>>()
    };
    let vol = Volume::format_members(dyns(&m), &cfg.format_opts()).expect("format");
    vol.write_at(&[1u8; 4096], 257 * 4096).expect("write");
    vol.close().expect("close");
    // Member 1 is away for a session.
    let vol =
        Volume::open_members(vec![m[0].clone() as Arc<dyn Backend>], &cfg.open_opts()).expect("degraded");
    vol.write_at(&[2u8; 4096], 257 * 4096).expect("write");
    vol.close().expect("close");
    let vol = Volume::open_members(dyns(&m), &cfg.open_opts()).expect("both");
    assert!(!vol.members()[1].1, "member 1 is out of sync");
    let report = vol.resync(&mut |_, _| {}).expect("resync");
    let mut b = vec![0u8; 4096];
    let mut stale = Vec::new();
    // Reads of the set (whichever member serves them).
    for _ in 0..4 {
        vol.read_at(&mut b, 257 * 4096).expect("read");
        if b[0] != 2 {
            stale.push(format!("the set read version {}", b[0]));
        }
    }
    vol.close().expect("close");
    let alone = Volume::open_members(vec![m[1].clone() as Arc<dyn Backend>], &cfg.open_opts())
        .expect("member 1 alone");
    alone.read_at(&mut b, 257 * 4096).expect("read");
    if b[0] != 2 {
        stale.push(format!("member 1 alone read version {}", b[0]));
    }
    assert!(
        stale.is_empty(),
        "after resync ({report:?}) block 257 reads its old version without an error: {stale:?}"
    );
}

/// Journal mode on a mirror set: member 1 misses writes (degraded session), then an online
/// resync with clients writing and flushing; each member crashes on its own all along the
/// resync and after it (and after more flushed writes past its end). Reopened, the set reads
/// every flushed write, `check` finds nothing; past the end member 1 alone reads it all too
/// (its journal, copied last, is the live one: no earlier session's segments replayed).
/// Fails on ed74de9 because of FINDING 6 (stale blocks after the resync); meant as the
/// regression test for the resync + crash claims once that is fixed.
#[test]
fn bug_mirror_resync_then_crash() {
    for seed in seeds(3) {
        let mut rng = ChaCha8Rng::seed_from_u64(seed);
        let mut cfg = Cfg::new(4096, 2048, 128 << 10);
        cfg.group_blocks = Some(64);
        let bs = cfg.bs as usize;
        let len = cfg.backing_len();
        let m: Vec<Arc<FaultBackend>> = (0..2)
            .map(|_| Arc::new(FaultBackend::new(len).expect("memory")))
            .collect();
        let dyns = |m: &[Arc<FaultBackend>]| {
            m.iter()
                .map(|b| b.clone() as Arc<dyn Backend>)
                .collect::<Vec<_>>()
        };
        let mut model = vec![0u8; cfg.size() as usize];
        let put = |model: &mut Vec<u8>, vol: &Volume, b: u64, tag: u32| {
            let d = fill(tag, bs);
            vol.write_at(&d, b * cfg.bs).expect("write");
            model[b as usize * bs..(b as usize + 1) * bs].copy_from_slice(&d);
        };
        let vol = Volume::format_members(dyns(&m), &cfg.format_opts()).expect("format");
        for b in (0..cfg.blocks).step_by(5) {
            put(&mut model, &vol, b, 1_000 + b as u32);
        }
        vol.close().expect("close");
        let vol =
            Volume::open_members(vec![m[0].clone() as Arc<dyn Backend>], &cfg.open_opts()).expect("degraded");
        for i in 0..300u32 {
            put(&mut model, &vol, rng.random_range(0..cfg.blocks), 2_000 + i);
            if i % 7 == 0 {
                vol.flush().expect("flush");
            }
        }
        vol.close().expect("close");
        for f in &m {
            f.forget_history();
        }
        let vol = Volume::open_members(dyns(&m), &cfg.open_opts()).expect("both");
        let mut points: Vec<(Vec<Vec<u8>>, Vec<u8>, bool)> = Vec::new();
        let model_c = std::cell::RefCell::new(model);
        let mut tag = 3_000u32;
        vol.resync(&mut |done, total| {
            if done == total {
                return;
            }
            let mut model = model_c.borrow_mut();
            for _ in 0..3 {
                let b = rng.random_range(0..cfg.blocks);
                put(&mut model, &vol, b, tag);
                tag += 1;
            }
            vol.flush().expect("flush during resync");
            let imgs = m
                .iter()
                .map(|f| f.crash_state().random_crash_image(&mut rng, true))
                .collect();
            points.push((imgs, model.clone(), false));
        })
        .expect("resync");
        let mut model = model_c.into_inner();
        for _ in 0..4 {
            for _ in 0..5 {
                let b = rng.random_range(0..cfg.blocks);
                put(&mut model, &vol, b, tag);
                tag += 1;
            }
            vol.flush().expect("flush");
            let imgs = m
                .iter()
                .map(|f| f.crash_state().random_crash_image(&mut rng, true))
                .collect();
            points.push((imgs, model.clone(), true));
        }
        drop(vol);
        assert!(points.len() >= 4);
        for (k, (imgs, model, past_end)) in points.into_iter().enumerate() {
            let what = format!("seed {seed}, crash {k}");
            let fbs: Vec<Arc<FaultBackend>> = imgs
                .into_iter()
                .map(|i| Arc::new(FaultBackend::from_image(i)))
                .collect();
            let v = Volume::open_members(dyns(&fbs), &cfg.open_opts())
                .unwrap_or_else(|e| panic!("{what}: open: {e}"));
            let got = read_all(&v, cfg.size()).unwrap_or_else(|e| panic!("{what}: read: {e}"));
            assert!(got == model, "{what}: {}", first_diff(&got, &model, cfg.bs));
            assert_clean_check(&v, &cfg, &what);
            v.close().unwrap_or_else(|e| panic!("{what}: close: {e}"));
            if past_end {
                let alone = Volume::open_members(vec![fbs[1].clone() as Arc<dyn Backend>], &cfg.open_opts())
                    .unwrap_or_else(|e| panic!("{what}: member 1 alone: {e}"));
                let got = read_all(&alone, cfg.size())
                    .unwrap_or_else(|e| panic!("{what}: member 1 alone: read: {e}"));
                assert!(
                    got == model,
                    "{what}: member 1 alone: {}",
                    first_diff(&got, &model, cfg.bs)
                );
            }
        }
    }
}

/// Reads and `check_blocks` (the engine of `check` and scrubbing) racing commits: a writer
/// rewrites blocks (whole-block versions numbered in the data) with flushes on a small journal,
/// while readers read every block and a checker verifies the whole volume over and over. A
/// read must return a version that was written (never an error, never a torn mix), and the
/// checker must report nothing — a commit publishes tags before its home writes, so a check
/// that reads the backend under the new tag would report a block that is fine.
fn racing_reads(cfg: &Cfg) {
    use std::sync::atomic::{AtomicBool, Ordering};
    let fb = cfg.fresh();
    let opts = OpenOptions {
        background_commit: true,
        ..cfg.open_opts()
    };
    let vol = Arc::new(Volume::open(fb.clone(), &opts).expect("open"));
    let bs = cfg.bs as usize;
    let version = move |b: u64, v: u32| -> Vec<u8> {
        let mut d = fill(v.wrapping_mul(7919).wrapping_add(b as u32), bs);
        d[..8].copy_from_slice(&b.to_le_bytes());
        d[8..12].copy_from_slice(&v.to_le_bytes());
        d
    };
    let stop = Arc::new(AtomicBool::new(false));
    let n = cfg.blocks;
    let writer = {
        let (vol, stop) = (vol.clone(), stop.clone());
        std::thread::spawn(move || {
            let mut rng = ChaCha8Rng::seed_from_u64(1);
            let mut v = 1u32;
            while !stop.load(Ordering::Relaxed) {
                let first = rng.random_range(0..n);
                let count = rng.random_range(1..=3.min(n - first));
                let mut d = Vec::new();
                for b in first..first + count {
                    d.extend(version(b, v));
                }
                vol.write_at(&d, first * bs as u64).expect("write");
                v += 1;
                if rng.random_bool(0.3) {
                    vol.flush().expect("flush");
                }
            }
        })
    };
    let reader = {
        let (vol, stop) = (vol.clone(), stop.clone());
        std::thread::spawn(move || {
            let mut buf = vec![0u8; bs];
            let mut reads = 0u64;
            while !stop.load(Ordering::Relaxed) {
                for b in 0..n {
                    vol.read_at(&mut buf, b * bs as u64)
                        .unwrap_or_else(|e| panic!("read of block {b} racing commits: {e}"));
                    reads += 1;
                    if buf.iter().all(|&x| x == 0) {
                        continue;
                    }
                    let v = u32::from_le_bytes(buf[8..12].try_into().unwrap());
                    assert!(buf == version(b, v), "block {b} reads a mix (claims version {v})");
                }
            }
            reads
        })
    };
    let mut problems = Vec::new();
    let t0 = std::time::Instant::now();
    let mut checks = 0;
    while t0.elapsed() < std::time::Duration::from_secs(3) {
        problems.extend(vol.check_blocks(0, n).expect("check"));
        checks += 1;
    }
    stop.store(true, Ordering::Relaxed);
    writer.join().expect("writer");
    let reads = reader.join().expect("reader");
    assert!(reads > 0 && checks > 0);
    assert!(
        problems.is_empty(),
        "check_blocks racing commits reported {} problems, e.g. {:?}",
        problems.len(),
        &problems[..problems.len().min(3)]
    );
}

#[test]
fn reads_and_checks_racing_commits_4k() {
    racing_reads(&Cfg::new(4096, 32, 64 << 10));
}

#[test]
fn reads_and_checks_racing_commits_512() {
    racing_reads(&Cfg::new(512, 64, 64 << 10));
}

/// A copy added to a journal-mode volume (`add_member`: every written group copied, the
/// journal last), each member crashing on its own all along the copy and after later flushed
/// writes to the set: the set reads every flushed write and `check` finds nothing; once the
/// copy is complete the new member alone does too (its journal is the live one).
#[test]
fn mirror_add_member_then_crash() {
    for seed in seeds(2) {
        let mut rng = ChaCha8Rng::seed_from_u64(seed);
        let mut cfg = Cfg::new(4096, 2048, 128 << 10);
        cfg.group_blocks = Some(64);
        let bs = cfg.bs as usize;
        let len = cfg.backing_len();
        let m: Vec<Arc<FaultBackend>> = (0..2)
            .map(|_| Arc::new(FaultBackend::new(len).expect("memory")))
            .collect();
        let mut model = vec![0u8; cfg.size() as usize];
        let put = |model: &mut Vec<u8>, vol: &Volume, b: u64, tag: u32| {
            let d = fill(tag, bs);
            vol.write_at(&d, b * cfg.bs).expect("write");
            model[b as usize * bs..(b as usize + 1) * bs].copy_from_slice(&d);
        };
        Volume::format(m[0].clone(), &cfg.format_opts())
            .expect("format")
            .close()
            .expect("close");
        let vol = cfg.open(m[0].clone()).expect("open");
        for i in 0..400u32 {
            put(&mut model, &vol, rng.random_range(0..cfg.blocks), 1 + i);
            if i % 9 == 0 {
                vol.flush().expect("flush");
            }
        }
        // Unflushed writes left for the add (it closes the volume first).
        let mut points: Vec<(Vec<Vec<u8>>, Vec<u8>, bool)> = Vec::new();
        let (vol, _report) = vol
            .add_member(m[1].clone(), &mut |done, total| {
                if done < total {
                    let imgs = m
                        .iter()
                        .map(|f| f.crash_state().random_crash_image(&mut rng, true))
                        .collect();
                    points.push((imgs, model.clone(), false));
                }
            })
            .expect("add");
        let mut tag = 10_000u32;
        for _ in 0..4 {
            for _ in 0..6 {
                put(&mut model, &vol, rng.random_range(0..cfg.blocks), tag);
                tag += 1;
            }
            vol.flush().expect("flush");
            let imgs = m
                .iter()
                .map(|f| f.crash_state().random_crash_image(&mut rng, true))
                .collect();
            points.push((imgs, model.clone(), true));
        }
        drop(vol);
        assert!(points.len() >= 6, "crashes along the copy: {}", points.len());
        for (k, (imgs, model, done)) in points.into_iter().enumerate() {
            let what = format!("seed {seed}, crash {k}");
            let fbs: Vec<Arc<dyn Backend>> = imgs
                .into_iter()
                .map(|i| Arc::new(FaultBackend::from_image(i)) as Arc<dyn Backend>)
                .collect();
            let v = Volume::open_members(fbs.clone(), &cfg.open_opts())
                .unwrap_or_else(|e| panic!("{what}: open: {e}"));
            let got = read_all(&v, cfg.size()).unwrap_or_else(|e| panic!("{what}: read: {e}"));
            assert!(got == model, "{what}: {}", first_diff(&got, &model, cfg.bs));
            assert_clean_check(&v, &cfg, &what);
            v.close().unwrap_or_else(|e| panic!("{what}: close: {e}"));
            if done {
                let alone = Volume::open_members(vec![fbs[1].clone()], &cfg.open_opts())
                    .unwrap_or_else(|e| panic!("{what}: new member alone: {e}"));
                let got = read_all(&alone, cfg.size())
                    .unwrap_or_else(|e| panic!("{what}: new member alone: read: {e}"));
                assert!(
                    got == model,
                    "{what}: new member alone: {}",
                    first_diff(&got, &model, cfg.bs)
                );
            }
        }
    }
}

/// A write error on a home write (after the segment's barrier), on a segment write, or on a
/// checkpoint write, then `resume` (the fault gone), more flushed writes, and a crash: every
/// flushed write is there.
#[test]
fn resume_after_write_errors_keeps_flushed_writes() {
    let cfg = Cfg::new(4096, 64, 128 << 10);
    let bs = cfg.bs as usize;
    for target in 0..3 {
        let fb = cfg.fresh();
        let vol = cfg.open(fb.clone()).expect("open");
        let geo = *vol.geometry();
        let j = geo.journal_offset();
        let range = match target {
            0 => {
                let d = geo.data_offset(5);
                d..d + 4096
            }
            1 => j + 8192..j + geo.journal_len,
            _ => j..j + 8192,
        };
        let mut want = vec![0u8; cfg.size() as usize];
        for b in 0..4u64 {
            let d = fill(b as u32 + 1, bs);
            vol.write_at(&d, b * cfg.bs).expect("write");
            want[b as usize * bs..(b as usize + 1) * bs].copy_from_slice(&d);
            vol.flush().expect("flush");
        }
        fb.fail_writes_at(range);
        // Enough batches that a checkpoint is written too (the log fills).
        let mut failed = false;
        for k in 0..40u32 {
            let b = 4 + u64::from(k % 20);
            let d = fill(100 + k, bs);
            if vol.write_at(&d, b * cfg.bs).is_err() {
                failed = true;
                break;
            }
            want[b as usize * bs..(b as usize + 1) * bs].copy_from_slice(&d);
            if vol.flush().is_err() {
                failed = true;
                break;
            }
        }
        assert!(failed, "target {target}: the injected write error was hit");
        fb.clear_faults();
        let r = vol.resume().expect("resume");
        assert!(r.lost.is_empty(), "target {target}: {r:?}");
        // The write whose commit failed was staged: resume keeps it. Re-write it anyway (idempotent)
        // so the model is exact whatever the failing call was.
        let cur = read_all(&vol, cfg.size()).expect("read");
        want.clone_from(&cur);
        for k in 0..6u32 {
            let b = 30 + u64::from(k);
            let d = fill(500 + k, bs);
            vol.write_at(&d, b * cfg.bs).expect("write after resume");
            want[b as usize * bs..(b as usize + 1) * bs].copy_from_slice(&d);
            vol.flush().expect("flush after resume");
        }
        let image = fb.durable_image();
        drop(vol);
        let vol = cfg
            .open(Arc::new(MemoryBackend::from_vec(image)))
            .expect("open after crash");
        let got = read_all(&vol, cfg.size()).expect("read");
        assert!(
            got == want,
            "target {target}: {}",
            first_diff(&got, &want, cfg.bs)
        );
        assert_clean_check(&vol, &cfg, "after resume and crash");
    }
}

/// FINDING 6, second trigger: member 1 fails in the middle of a session (write errors), the set
/// goes on with member 0, member 1 comes back and is resynchronized: the blocks written while
/// it was failed read their old contents from it, without an error.
#[test]
fn bug_mirror_resync_after_member_failure_copies_nothing() {
    let mut cfg = Cfg::new(4096, 2048, 128 << 10);
    cfg.group_blocks = Some(64);
    let m: Vec<Arc<FaultBackend>> = (0..2)
        .map(|_| Arc::new(FaultBackend::new(cfg.backing_len()).expect("memory")))
        .collect();
    let dyns = |m: &[Arc<FaultBackend>]| {
        m.iter()
            .map(|b| b.clone() as Arc<dyn Backend>)
            .collect::<Vec<_>>()
    };
    let vol = Volume::format_members(dyns(&m), &cfg.format_opts()).expect("format");
    vol.write_at(&[1u8; 4096], 700 * 4096).expect("write");
    vol.flush().expect("flush");
    m[1].fail_writes_at(0..cfg.backing_len());
    vol.write_at(&[2u8; 4096], 700 * 4096).expect("write");
    vol.flush().expect("flush: member 1 is dropped, member 0 goes on");
    vol.write_at(&[3u8; 4096], 900 * 4096).expect("write");
    vol.flush().expect("flush");
    assert!(!vol.members()[1].1, "member 1 dropped");
    vol.close().expect("close");
    m[1].clear_faults();
    let vol = Volume::open_members(dyns(&m), &cfg.open_opts()).expect("both");
    let report = vol.resync(&mut |_, _| {}).expect("resync");
    vol.close().expect("close");
    let alone = Volume::open_members(vec![m[1].clone() as Arc<dyn Backend>], &cfg.open_opts())
        .expect("member 1 alone");
    let mut b = vec![0u8; 4096];
    let mut stale = Vec::new();
    for (block, want) in [(700u64, 2u8), (900, 3)] {
        match alone.read_at(&mut b, block * 4096) {
            Ok(()) if b[0] == want => {}
            Ok(()) => stale.push(format!("block {block} reads version {} (want {want})", b[0])),
            Err(e) => stale.push(format!("block {block}: {e}")),
        }
    }
    assert!(stale.is_empty(), "after resync ({report:?}): {stale:?}");
}

/// A mirror set in journal mode: a writer with flushes on a small journal, a reader, and
/// repairing scrubs looping meanwhile. No read error, no scrub problem (a scrub must not take
/// a block whose commit is between its barrier and its home writes for a bad copy, nor
/// "repair" it with an older version); afterwards each member alone reads the final contents.
#[test]
fn mirror_scrub_racing_commits() {
    use blockguard::ScrubOptions;
    use std::sync::atomic::{AtomicBool, Ordering};
    let cfg = Cfg::new(4096, 48, 64 << 10);
    let bs = cfg.bs as usize;
    let len = cfg.backing_len();
    let m: Vec<Arc<FaultBackend>> = (0..2)
        .map(|_| Arc::new(FaultBackend::new(len).expect("memory")))
        .collect();
    let dyns = |m: &[Arc<FaultBackend>]| {
        m.iter()
            .map(|b| b.clone() as Arc<dyn Backend>)
            .collect::<Vec<_>>()
    };
    Volume::format_members(dyns(&m), &cfg.format_opts())
        .expect("format")
        .close()
        .expect("close");
    let opts = OpenOptions {
        background_commit: true,
        ..cfg.open_opts()
    };
    let vol = Arc::new(Volume::open_members(dyns(&m), &opts).expect("open"));
    let stop = Arc::new(AtomicBool::new(false));
    let n = cfg.blocks;
    let writer = {
        let (vol, stop) = (vol.clone(), stop.clone());
        std::thread::spawn(move || {
            let mut rng = ChaCha8Rng::seed_from_u64(9);
            let mut model = vec![0u8; (n * 4096) as usize];
            let mut v = 1u32;
            while !stop.load(Ordering::Relaxed) {
                let first = rng.random_range(0..n);
                let count = rng.random_range(1..=2.min(n - first));
                let d = fill(v, (count * 4096) as usize);
                vol.write_at(&d, first * 4096).expect("write");
                model[(first * 4096) as usize..((first + count) * 4096) as usize].copy_from_slice(&d);
                v += 1;
                if rng.random_bool(0.3) {
                    vol.flush().expect("flush");
                }
            }
            vol.flush().expect("flush");
            model
        })
    };
    let reader = {
        let (vol, stop) = (vol.clone(), stop.clone());
        std::thread::spawn(move || {
            let mut buf = vec![0u8; bs];
            while !stop.load(Ordering::Relaxed) {
                for b in 0..n {
                    vol.read_at(&mut buf, b * bs as u64)
                        .unwrap_or_else(|e| panic!("read of block {b} racing commits and scrubs: {e}"));
                }
            }
        })
    };
    let mut problems = Vec::new();
    let t0 = std::time::Instant::now();
    while t0.elapsed() < std::time::Duration::from_secs(3) {
        let r = vol
            .scrub(
                ScrubOptions {
                    repair: true,
                    ..ScrubOptions::default()
                },
                &mut |_| {},
            )
            .expect("scrub");
        problems.extend(r.problems);
    }
    stop.store(true, Ordering::Relaxed);
    let model = writer.join().expect("writer");
    reader.join().expect("reader");
    assert!(problems.is_empty(), "scrubs racing commits reported {problems:?}");
    let vol = Arc::into_inner(vol).expect("last");
    vol.close().expect("close");
    for (i, member) in m.iter().take(2).enumerate() {
        let alone = Volume::open_members(vec![member.clone() as Arc<dyn Backend>], &cfg.open_opts())
            .expect("member alone");
        let got = read_all(&alone, cfg.size()).unwrap_or_else(|e| panic!("member {i} alone: {e}"));
        assert!(
            got == model,
            "member {i} alone: {}",
            first_diff(&got, &model, cfg.bs)
        );
    }
}
