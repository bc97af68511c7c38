//! Resuming after a write-back failure (`Volume::resume`): what was staged is written again
//! and verified, exactly the acknowledged writes the failure lost are reported (their reads
//! fail, flushes fail until the loss is accepted), everything else reads back; a crash during
//! the resume loses nothing the failure did not; a panic is not resumable; and a real full
//! disk (a small tmpfs) is resumed from once space is freed.
//!
//! The fault-injecting backend's `fail_next_flush_dropping_writes` plays Linux after a failed
//! `fsync`: the pages it could not write are gone from the disk, yet reads return them until
//! they are dropped from the page cache. A failing case prints its seed and fault position.

use blockguard::blockguard_backend::{
    Backend, FaultBackend, FileBackend, FileOptions, MemoryBackend, PendingWrite,
};
use blockguard::{CorruptionKind, Error, FormatOptions, OpenOptions, Volume};
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;
use std::collections::{BTreeMap, BTreeSet, HashSet};
use std::io;
use std::ops::Range;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};

const BS: u64 = 4096;
const BLOCKS: u64 = 64;

fn content(b: u64, round: u64) -> Vec<u8> {
    let mut v = vec![0u8; BS as usize];
    for (i, x) in v.iter_mut().enumerate() {
        *x = (b as u8).wrapping_mul(31) ^ (round as u8).wrapping_mul(7) ^ (i as u8);
    }
    v[..8].copy_from_slice(&b.to_le_bytes());
    v[8..16].copy_from_slice(&round.to_le_bytes());
    v
}

fn format_opts() -> FormatOptions {
    let mut o = FormatOptions::with_size(BS * BLOCKS);
    // Small groups: batches span several groups, first writes of groups happen throughout.
    o.group_blocks = Some(8);
    o.uuid = Some([7; 16]);
    o
}

fn session() -> OpenOptions {
    OpenOptions {
        background_commit: false,
        // Commits happen during writes, so data is written between flushes.
        stage_bytes: 4 * BS as usize,
        dirty_clear_interval: std::time::Duration::ZERO,
        ..OpenOptions::default()
    }
}

/// The fault backend with one failure injected at a chosen mutating operation (a write, a
/// zeroing or a flush; counted once armed), after which it works again.
#[derive(Debug)]
struct OneFault {
    fault: Arc<FaultBackend>,
    /// Mutating operations to let through before the one that fails; `None`: none fails.
    countdown: Mutex<Option<usize>>,
    /// The failing operation, if a flush, also loses the writes it should make durable.
    dropping: bool,
    /// Mutating operations seen while armed or counting.
    ops: Mutex<usize>,
    counting: AtomicBool,
    /// The writes the failed flush lost.
    dropped: Mutex<Vec<PendingWrite>>,
}

impl OneFault {
    fn new(fault: Arc<FaultBackend>, dropping: bool) -> Arc<OneFault> {
        Arc::new(OneFault {
            fault,
            countdown: Mutex::new(None),
            dropping,
            ops: Mutex::new(0),
            counting: AtomicBool::new(false),
            dropped: Mutex::new(Vec::new()),
        })
    }

    fn arm(&self, at: Option<usize>) {
        *self.countdown.lock().unwrap() = at;
        *self.ops.lock().unwrap() = 0;
        self.counting.store(true, Ordering::SeqCst);
    }

    /// True if this operation is the one that fails.
    fn tick(&self) -> bool {
        if self.counting.load(Ordering::SeqCst) {
            *self.ops.lock().unwrap() += 1;
        }
        let mut c = self.countdown.lock().unwrap();
        match *c {
            Some(0) => {
                *c = None;
                true
            }
            Some(n) => {
                *c = Some(n - 1);
                false
            }
            None => false,
        }
    }

    fn injected() -> io::Error {
        io::Error::other("injected write-back failure")
    }
}

impl Backend for OneFault {
    fn len(&self) -> u64 {
        self.fault.len()
    }
    fn read_at(&self, buf: &mut [u8], offset: u64) -> io::Result<()> {
        self.fault.read_at(buf, offset)
    }
    fn write_at(&self, buf: &[u8], offset: u64) -> io::Result<()> {
        if self.tick() {
            return Err(Self::injected());
        }
        self.fault.write_at(buf, offset)
    }
    fn write_vectored_at(&self, bufs: &[&[u8]], offset: u64) -> io::Result<()> {
        if self.tick() {
            return Err(Self::injected());
        }
        self.fault.write_vectored_at(bufs, offset)
    }
    fn flush(&self) -> io::Result<()> {
        if self.tick() {
            if self.dropping {
                *self.dropped.lock().unwrap() = self.fault.unflushed();
                self.fault.fail_next_flush_dropping_writes();
            } else {
                self.fault.fail_next_flush();
            }
        }
        self.fault.flush()
    }
    fn zero_range(&self, offset: u64, len: u64) -> io::Result<()> {
        if self.tick() {
            return Err(Self::injected());
        }
        self.fault.zero_range(offset, len)
    }
    fn zero_ranges(&self, offset: u64, len: u64) -> io::Result<Vec<Range<u64>>> {
        self.fault.zero_ranges(offset, len)
    }
    fn drop_cached(&self, offset: u64, len: u64) -> io::Result<()> {
        self.fault.drop_cached(offset, len)
    }
    fn name(&self) -> String {
        "one-fault".into()
    }
}

/// What the model expects of a block: its last acknowledged content (`None`: never written),
/// whether a failure lost it, and every content it ever held (what a crash image may show).
#[derive(Clone, Default)]
struct Expect {
    now: Option<u64>,
    lost: bool,
    ever: HashSet<u64>,
}

struct Run {
    seed: u64,
    fault_at: Option<usize>,
    dropping: bool,
    backend: Arc<OneFault>,
    vol: Option<Volume>,
    model: BTreeMap<u64, Expect>,
    data_at: BTreeMap<u64, u64>,
    /// Blocks whose data a dropping flush lost.
    dropped_blocks: BTreeSet<u64>,
    /// Fault backend events before the resume, and after it.
    resume_events: Option<Range<usize>>,
    lost: Vec<u64>,
    rng: ChaCha8Rng,
}

impl Run {
    fn new(seed: u64, fault_at: Option<usize>, dropping: bool) -> Run {
        let opts = format_opts();
        let fault = Arc::new(
            FaultBackend::new(opts.backing_len().unwrap())
                .unwrap()
                .with_seed(seed),
        );
        let backend = OneFault::new(fault, dropping);
        let vol = Volume::format(backend.clone(), &opts).unwrap();
        let data_at = (0..BLOCKS)
            .map(|b| (b, vol.inspect_block(b).unwrap().location.data_offset))
            .collect();
        vol.close().unwrap();
        let vol = Volume::open(backend.clone(), &session()).unwrap();
        backend.arm(fault_at);
        Run {
            seed,
            fault_at,
            dropping,
            backend,
            vol: Some(vol),
            model: (0..BLOCKS).map(|b| (b, Expect::default())).collect(),
            data_at,
            dropped_blocks: BTreeSet::new(),
            resume_events: None,
            lost: Vec::new(),
            rng: ChaCha8Rng::seed_from_u64(seed),
        }
    }

    fn vol(&self) -> &Volume {
        self.vol.as_ref().unwrap()
    }

    fn what(&self) -> String {
        format!(
            "seed {}, fault at operation {:?}{}",
            self.seed,
            self.fault_at,
            if self.dropping { " (dropping)" } else { "" }
        )
    }

    /// Runs `ops` operations; on the first failure, resumes. Returns whether one failed.
    fn workload(&mut self, ops: u64, round0: u64) -> bool {
        let mut failed = false;
        for i in 0..ops {
            let round = round0 + i;
            let r = if self.rng.random_bool(0.2) {
                self.vol().flush()
            } else {
                let n = self.rng.random_range(1..=6u64);
                let first = self.rng.random_range(0..=BLOCKS - n);
                let zero = self.rng.random_bool(0.1);
                let r = if zero {
                    self.vol().write_zeroes(first * BS, n * BS)
                } else {
                    let buf: Vec<u8> = (first..first + n).flat_map(|b| content(b, round)).collect();
                    self.vol().write_at(&buf, first * BS)
                };
                // Refused up front if failed; otherwise staged, even if the commit it started
                // then failed.
                if !matches!(r, Err(Error::Failed { .. })) {
                    for b in first..first + n {
                        let e = self.model.get_mut(&b).unwrap();
                        e.now = (!zero).then_some(round);
                        e.lost = false;
                        e.ever.insert(round);
                    }
                }
                r
            };
            if let Err(e) = r {
                if self.vol().health().failure.is_none() {
                    // A flush whose clearing of the dirty-groups map failed: the flush itself
                    // completed and the volume goes on (a lost clearing is safe).
                    assert!(matches!(e, Error::Io { .. }), "{}: {e}", self.what());
                    assert!(self.vol().health().is_healthy(), "{}", self.what());
                    failed = true;
                    continue;
                }
                assert!(!failed, "{}: a second failure: {e}", self.what());
                failed = true;
                self.after_failure(&e);
            }
        }
        failed
    }

    fn after_failure(&mut self, e: &Error) {
        let what = self.what();
        // Failed: writes and flushes refused, naming the way out; reads go on.
        let refused = self.vol().write_at(&content(0, 999), 0).unwrap_err();
        match &refused {
            Error::Failed { resumable, .. } => assert!(*resumable, "{what}: {refused}"),
            other => panic!("{what}: a write after the failure ({e}): {other:?}"),
        }
        assert!(refused.to_string().contains("resume"), "{what}: {refused}");
        assert!(matches!(self.vol().flush(), Err(Error::Failed { .. })));
        let h = self.vol().health();
        assert_eq!(h.state(), "failed", "{what}: {h:?}");
        // Until resumed, reads show every acknowledged write (from memory or the cache).
        self.check_reads("before resume", false);
        self.dropped_blocks = self
            .backend
            .dropped
            .lock()
            .unwrap()
            .iter()
            .flat_map(|w| {
                self.data_at
                    .iter()
                    .filter(|(_, &at)| at < w.end() && w.offset < at + BS)
                    .map(|(&b, _)| b)
                    .collect::<Vec<_>>()
            })
            .collect();
        let before = self.backend.fault.events().len();
        let report = self
            .vol()
            .resume()
            .unwrap_or_else(|e| panic!("{what}: resume: {e}"));
        self.resume_events = Some(before..self.backend.fault.events().len());
        assert!(report.failure.is_some(), "{what}: {report:?}");
        let lost: BTreeSet<u64> = report.lost.iter().copied().collect();
        assert!(
            lost.is_subset(&self.dropped_blocks),
            "{what}: reported lost {lost:?}, but only {:?} were dropped",
            self.dropped_blocks
        );
        if !self.dropping {
            assert!(report.lost.is_empty(), "{what}: nothing was dropped: {report:?}");
        }
        assert!(
            report.blocks_verified >= report.blocks_retried,
            "{what}: {report:?}"
        );
        for b in &report.lost {
            self.model.get_mut(b).unwrap().lost = true;
        }
        self.check_reads("after resume", false);
        if report.lost.is_empty() {
            self.vol()
                .flush()
                .unwrap_or_else(|e| panic!("{what}: flush after resume: {e}"));
        } else {
            // G2: no flush succeeds while an acknowledged write is known lost.
            let e = self.vol().flush().unwrap_err();
            assert_eq!(e.corrupt_block(), report.lost.first().copied(), "{what}: {e}");
            assert!(
                e.to_string().contains("lost in a write-back failure"),
                "{what}: {e}"
            );
            assert_eq!(self.vol().health().lost_writes, report.lost.len() as u64);
            let cleared = self.vol().clear_error_state().unwrap();
            assert_eq!(cleared.lost_writes_accepted, report.lost, "{what}");
            self.vol()
                .flush()
                .unwrap_or_else(|e| panic!("{what}: flush after clearing: {e}"));
        }
        assert!(
            self.vol().health().failure.is_none(),
            "{what}: {:?}",
            self.vol().health()
        );
        self.lost = report.lost;
    }

    /// Every block reads its last acknowledged content; a block lost by the failure fails.
    fn check_reads(&self, when: &str, allow_old_for_lost: bool) {
        let mut buf = vec![0u8; BS as usize];
        for (&b, e) in &self.model {
            let r = self.vol().read_at(&mut buf, b * BS);
            match (r, e.now) {
                (Err(Error::Corrupt { block, .. }), _) if e.lost && block == b => {}
                (Ok(()), _) if e.lost && allow_old_for_lost => {}
                (Ok(()), Some(round)) if !e.lost => {
                    assert!(buf == content(b, round), "{}, {when}: block {b}", self.what());
                }
                (Ok(()), None) if !e.lost => {
                    assert!(buf.iter().all(|&x| x == 0), "{}, {when}: block {b}", self.what());
                }
                (r, _) => panic!("{}, {when}: block {b} (lost: {}): {r:?}", self.what(), e.lost),
            }
        }
    }

    /// Closes, drops every cached page (what reads see now is what the medium holds),
    /// reopens and checks every block again.
    fn close_and_check(&mut self) {
        let vol = self.vol.take().unwrap();
        vol.close()
            .unwrap_or_else(|e| panic!("{}: close: {e}", self.what()));
        let len = self.backend.len();
        self.backend.fault.drop_cached(0, len).unwrap();
        self.vol = Some(Volume::open(self.backend.clone(), &session()).unwrap());
        self.check_reads("after reopening", false);
    }
}

/// How many mutating backend operations the workload makes without a failure.
fn operations(seed: u64) -> usize {
    let mut run = Run::new(seed, None, false);
    assert!(!run.workload(60, 1));
    let ops = *run.backend.ops.lock().unwrap();
    ops
}

/// A failure at every mutating operation of a workload (writes of data, metadata, maps and
/// superblocks; zeroings; flushes), plain or losing what the flush should have made durable:
/// resume succeeds, reports as lost only blocks whose data was dropped (none for a plain
/// failure), and afterwards every block reads its last acknowledged content, or fails if it
/// was reported lost — also after closing, dropping the page cache and reopening.
#[test]
fn resume_after_a_failure_at_every_step_loses_only_what_the_failure_dropped() {
    let seeds: Vec<u64> = match std::env::var("BLOCKGUARD_SEED") {
        Ok(s) => vec![s.parse().expect("BLOCKGUARD_SEED is a number")],
        Err(_) => vec![1, 2],
    };
    let mut lost_seen = 0;
    for seed in seeds {
        let total = operations(seed);
        for at in 0..total {
            for dropping in [false, true] {
                let mut run = Run::new(seed, Some(at), dropping);
                let failed = run.workload(60, 1);
                assert!(failed, "{}: no failure (of {total} operations)", run.what());
                lost_seen += run.lost.len();
                // The volume works on: more writes and flushes, then a clean reopen.
                assert!(!run.workload(20, 1000), "{}", run.what());
                run.close_and_check();
            }
        }
    }
    assert!(lost_seen > 0, "some dropping failure lost acknowledged writes");
}

/// A flush that lost written pages: resume reports exactly the blocks whose acknowledged
/// writes are gone — those written since the last flush that completed and not written again
/// by the retry — even though reads still returned them before the resume (the page cache).
#[test]
fn a_flush_that_lost_written_pages_reports_exactly_the_writes_lost() {
    let opts = format_opts();
    let fault = Arc::new(FaultBackend::new(opts.backing_len().unwrap()).unwrap());
    drop(Volume::format(fault.clone(), &opts).unwrap());
    let vol = Volume::open(fault.clone(), &session()).unwrap();
    // Blocks 0..4 are written and flushed; 8..12 committed (data on the backend, unflushed).
    for (first, round) in [(0u64, 1u64), (8, 2)] {
        let buf: Vec<u8> = (first..first + 4).flat_map(|b| content(b, round)).collect();
        vol.write_at(&buf, first * BS).unwrap();
        if first == 0 {
            vol.flush().unwrap();
        }
    }
    // The next commit's first flush fails and loses the unflushed data of 8..12.
    fault.fail_next_flush_dropping_writes();
    let buf: Vec<u8> = (40..44).flat_map(|b| content(b, 3)).collect();
    assert!(vol.write_at(&buf, 40 * BS).is_err());
    let mut back = vec![0u8; BS as usize];
    vol.read_at(&mut back, 9 * BS).unwrap();
    assert_eq!(back, content(9, 2), "still in the page cache");
    // Block 10 written again while failed: refused (it stays lost).
    assert!(matches!(
        vol.write_at(&content(10, 4), 10 * BS),
        Err(Error::Failed { .. })
    ));
    let report = vol.resume().unwrap();
    assert_eq!(report.lost, vec![8, 9, 10, 11], "{report:?}");
    assert_eq!(report.blocks_retried, 4);
    assert_eq!(report.blocks_verified, 8);
    for b in 8..12 {
        match vol.read_at(&mut back, b * BS) {
            Err(Error::Corrupt {
                block,
                kind: CorruptionKind::TagMismatch,
                ..
            }) => assert_eq!(block, b),
            other => panic!("lost block {b}: {other:?}"),
        }
    }
    for (b, round) in [(0, 1), (3, 1), (40, 3), (43, 3)] {
        vol.read_at(&mut back, b * BS).unwrap();
        assert_eq!(back, content(b, round));
    }
    // Flushes fail naming the loss until the blocks are written again or the loss accepted.
    let e = vol.flush().unwrap_err();
    assert!(
        e.to_string().contains("blocks 8, 9, 10, 11"),
        "the error lists the lost blocks: {e}"
    );
    vol.write_at(&content(8, 5), 8 * BS).unwrap();
    let e = vol.flush().unwrap_err();
    assert_eq!(e.corrupt_block(), Some(9), "{e}");
    let h = vol.health();
    assert_eq!(h.lost_writes, 3);
    let cleared = vol.clear_error_state().unwrap();
    assert_eq!(cleared.lost_writes_accepted, vec![9, 10, 11]);
    vol.flush().unwrap();
    assert!(vol.health().failure.is_none());
    vol.close().unwrap();
    fault.drop_cached(0, fault.len()).unwrap();
    let vol = Volume::open(fault, &session()).unwrap();
    vol.read_at(&mut back, 8 * BS).unwrap();
    assert_eq!(back, content(8, 5));
    assert!(vol.read_at(&mut back, 9 * BS).is_err(), "never wrong data");
}

/// Without dropping the page cache first, the verification would read the lost pages back
/// from memory and report nothing lost: the failure is invisible until they are evicted.
/// (What `drop_cached` is for; this checks the simulator models it.)
#[test]
fn the_simulated_page_cache_hides_lost_pages_until_dropped() {
    let fault = FaultBackend::new(1 << 16).unwrap();
    fault.write_at(&[9; 4096], 4096).unwrap();
    fault.fail_next_flush_dropping_writes();
    fault.flush().unwrap_err();
    fault.flush().unwrap();
    let mut b = [0u8; 4096];
    fault.read_at(&mut b, 4096).unwrap();
    assert_eq!(b, [9; 4096]);
    fault.drop_cached(4096, 4096).unwrap();
    fault.read_at(&mut b, 4096).unwrap();
    assert_eq!(b, [0; 4096]);
}

/// A failed data write, then a resume that fails again while the cause is still there, then
/// one that succeeds: nothing is lost, and the volume works on.
#[test]
fn a_resume_that_fails_again_can_be_retried() {
    let opts = format_opts();
    let fault = Arc::new(FaultBackend::new(opts.backing_len().unwrap()).unwrap());
    drop(Volume::format(fault.clone(), &opts).unwrap());
    let vol = Volume::open(
        fault.clone(),
        &OpenOptions {
            stage_bytes: 64 * BS as usize,
            ..session()
        },
    )
    .unwrap();
    let data_at = vol.inspect_block(20).unwrap().location.data_offset;
    let buf: Vec<u8> = (16..24).flat_map(|b| content(b, 1)).collect();
    vol.write_at(&buf, 16 * BS).unwrap();
    fault.fail_writes_at(data_at..data_at + 1);
    let e = vol.flush().unwrap_err();
    assert!(matches!(e, Error::Io { .. }), "{e}");
    let h = vol.health();
    let f = h.failure.expect("failed");
    assert!(f.resumable && f.detail.contains("writing data"), "{f:?}");
    // Still failing: resume says so, and the volume stays failed.
    let e = vol.resume().unwrap_err();
    assert!(matches!(e, Error::Io { .. }), "{e}");
    assert!(matches!(vol.flush(), Err(Error::Failed { .. })));
    fault.clear_faults();
    let report = vol.resume().unwrap();
    assert!(report.lost.is_empty(), "{report:?}");
    assert_eq!(report.blocks_retried, 8);
    // Resuming a healthy volume does nothing.
    let again = vol.resume().unwrap();
    assert_eq!(again.failure, None);
    vol.write_at(&content(1, 2), BS).unwrap();
    vol.flush().unwrap();
    vol.close().unwrap();
    fault.drop_cached(0, fault.len()).unwrap();
    let vol = Volume::open(fault, &session()).unwrap();
    let mut back = vec![0u8; BS as usize];
    for b in 16..24 {
        vol.read_at(&mut back, b * BS).unwrap();
        assert_eq!(back, content(b, 1));
    }
}

/// A panic inside the engine fails the volume for good: resume refuses, saying so.
#[test]
fn a_panic_latched_failure_is_not_resumable() {
    struct Treacherous {
        data: Vec<u8>,
        armed: Arc<AtomicBool>,
    }
    impl AsRef<[u8]> for Treacherous {
        fn as_ref(&self) -> &[u8] {
            assert!(!self.armed.load(Ordering::SeqCst), "injected panic");
            &self.data
        }
    }
    let opts = format_opts();
    let mem = Arc::new(MemoryBackend::new(opts.backing_len().unwrap()).unwrap());
    drop(Volume::format(mem.clone(), &opts).unwrap());
    let vol = Volume::open(mem, &session()).unwrap();
    let armed = Arc::new(AtomicBool::new(false));
    vol.write_owned(
        Treacherous {
            data: vec![1; BS as usize],
            armed: armed.clone(),
        },
        0,
    )
    .unwrap();
    armed.store(true, Ordering::SeqCst);
    assert!(std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| vol.flush())).is_err());
    match vol.resume() {
        Err(e @ Error::Failed { resumable: false, .. }) => {
            let msg = e.to_string();
            assert!(
                msg.contains("panicked") && msg.contains("cannot be resumed"),
                "{msg}"
            );
        }
        other => panic!("resume after a panic: {other:?}"),
    }
    let h = vol.health();
    assert_eq!(h.state(), "failed-for-good", "{h:?}");
    assert!(matches!(
        vol.write_at(&[0; 10], 0),
        Err(Error::Failed { resumable: false, .. })
    ));
}

/// A crash at any point of a resume (after a flush that lost pages) leaves nothing worse than
/// the failure did: after recovery every block the failure did not drop verifies and holds a
/// version written to it; a dropped block verifies with one, or fails — never wrong data.
#[test]
fn a_crash_during_resume_loses_nothing_the_failure_did_not() {
    let mut points = 0;
    for seed in [3u64, 4] {
        let total = operations(seed);
        for at in (0..total).step_by(3) {
            let mut run = Run::new(seed, Some(at), true);
            assert!(run.workload(60, 1));
            let Some(window) = run.resume_events.clone() else {
                continue;
            };
            let fault = run.backend.fault.clone();
            let mut rng = ChaCha8Rng::seed_from_u64(seed ^ at as u64);
            fault.for_each_history_point(|n, state| {
                if !window.contains(&n) {
                    return;
                }
                points += 1;
                for _ in 0..3 {
                    let image = state.random_crash_image(&mut rng, false);
                    check_crash_image(&run, image, n);
                }
            });
        }
    }
    assert!(points > 0);
}

fn check_crash_image(run: &Run, image: Vec<u8>, point: usize) {
    let mem = Arc::new(MemoryBackend::from_vec(image));
    let vol = Volume::open(mem, &session())
        .unwrap_or_else(|e| panic!("{}, crash at event {point}: open: {e}", run.what()));
    let mut buf = vec![0u8; BS as usize];
    for (&b, e) in &run.model {
        match vol.read_at(&mut buf, b * BS) {
            Ok(()) => {
                let ok = if buf.iter().all(|&x| x == 0) {
                    true
                } else {
                    let round = u64::from_le_bytes(buf[8..16].try_into().unwrap());
                    e.ever.contains(&round) && buf == content(b, round)
                };
                assert!(
                    ok,
                    "{}, crash at event {point}: block {b} holds data never written to it",
                    run.what()
                );
            }
            Err(err) => assert!(
                run.dropped_blocks.contains(&b),
                "{}, crash at event {point}: block {b}, not dropped by the failure: {err}",
                run.what()
            ),
        }
    }
}

/// A real full disk: a volume file on a 6 MiB tmpfs, most of it taken by another file, fails
/// with ENOSPC while data is written; once the other file is removed, resume writes what was
/// staged and nothing is lost. Needs root (to mount the tmpfs); skipped otherwise.
#[test]
fn a_full_disk_is_resumed_from_once_space_is_freed() {
    let Some(mnt) = Tmpfs::mount(6 << 20) else {
        eprintln!("skipped: cannot mount a tmpfs (not root?)");
        return;
    };
    let path = mnt.dir.join("vol.bgv");
    let filler = mnt.dir.join("filler");
    let opts = FormatOptions::with_size(16 << 20);
    let backend = FileBackend::create(&path, opts.backing_len().unwrap(), &FileOptions::default()).unwrap();
    let vol = Volume::format(Arc::new(backend), &opts).unwrap();
    vol.close().unwrap();
    // Leave about 2 MiB free.
    std::fs::write(&filler, vec![1u8; 4 << 20]).unwrap();
    let backend = Arc::new(FileBackend::open(&path, &FileOptions::default()).unwrap());
    let vol = Volume::open(
        backend.clone(),
        &OpenOptions {
            background_commit: false,
            stage_bytes: 1 << 20,
            ..OpenOptions::default()
        },
    )
    .unwrap();
    let chunk = |i: u64| -> Vec<u8> { (0..1u64 << 20).map(|j| (i * 7 + j / 4096) as u8).collect() };
    let mut written = 0;
    let mut failure = None;
    for i in 0..8u64 {
        match vol.write_at(&chunk(i), i << 20) {
            Ok(()) => written = i + 1,
            Err(e) => {
                // Staged, then its commit failed.
                written = i + 1;
                failure = Some(e);
                break;
            }
        }
    }
    let failure = failure.or_else(|| vol.flush().err()).expect("the disk filled up");
    assert_eq!(
        failure.class(),
        blockguard::ErrorClass::NoSpace,
        "a full disk: {failure}"
    );
    assert!(matches!(vol.write_at(&[0; 4096], 0), Err(Error::Failed { .. })));
    assert!(vol.resume().is_err(), "still full");
    std::fs::remove_file(&filler).unwrap();
    let report = vol.resume().unwrap();
    assert!(report.lost.is_empty(), "{report:?}");
    assert!(report.blocks_retried > 0, "{report:?}");
    vol.write_at(&chunk(9), 9 << 20).unwrap();
    vol.flush().unwrap();
    vol.close().unwrap();
    backend.drop_cached(0, backend.len()).unwrap();
    drop(backend);
    let vol = Volume::open(
        Arc::new(FileBackend::open(&path, &FileOptions::default()).unwrap()),
        &OpenOptions::default(),
    )
    .unwrap();
    let mut back = vec![0u8; 1 << 20];
    for i in (0..written).chain([9]) {
        vol.read_at(&mut back, i << 20).unwrap();
        assert!(back == chunk(i), "MiB {i}");
    }
    vol.close().unwrap();
}

/// A tmpfs mounted under /var/tmp for one test, unmounted and removed on drop.
struct Tmpfs {
    dir: std::path::PathBuf,
}

impl Tmpfs {
    fn mount(size: u64) -> Option<Tmpfs> {
        let dir = std::path::PathBuf::from(format!("/var/tmp/blockguard-enospc-{}", std::process::id()));
        std::fs::create_dir_all(&dir).ok()?;
        let ok = std::process::Command::new("mount")
            .args(["-t", "tmpfs", "-o", &format!("size={size}"), "tmpfs"])
            .arg(&dir)
            .stderr(std::process::Stdio::null())
            .status()
            .is_ok_and(|s| s.success());
        if !ok {
            let _ = std::fs::remove_dir(&dir);
            return None;
        }
        Some(Tmpfs { dir })
    }
}

impl Drop for Tmpfs {
    fn drop(&mut self) {
        let _ = std::process::Command::new("umount").arg(&self.dir).status();
        let _ = std::fs::remove_dir(&self.dir);
    }
}
