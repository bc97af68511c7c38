//! Crash simulation for mirror sets (G1, G2 with 2 and 3 members): a seeded random workload
//! (or an online re-tag with a client operation between its steps, `a_retag_of_two_members_…`)
//! runs on a set of fault-injecting members; then every member's disk crashes **on its own**
//! — each keeps its own subset of its unflushed writes, in its own order, whole or torn at
//! 512 bytes — at points all along the set's history: between the members' copies of one
//! write, between their flushes, inside a flush, during close. The set is reopened
//! read-write from the members' crash images (convergence and recovery at open) and checked:
//!
//! - **G1**: a block reads without error unless no member in sync held a complete version of
//!   it (a copy torn on every member is G1's allowance);
//! - **G2, no stale data**: every block reads as the version the last completed flush made
//!   durable or as a version written after it, never anything else;
//! - **agreement**: after close, the members in sync hold the same bytes everywhere but in
//!   their superblock regions, their superblocks say "clean", and each of them alone (opened
//!   read-only) reads every block as the set did;
//! - **a dropped member** (its writes failing mid-workload) is out of sync once a step that
//!   flushed the survivors after its failure has returned; it is then neither read nor
//!   written, and the survivors' superblocks say so.
//!
//! Some images are first opened read-only (no convergence: reads mix the members), some get
//! new writes after the open. **Second crashes**: the members of a reopened set crash again,
//! independently, at every point of the reopen (convergence, recovery) and of a short
//! session after it; reopened, the same checks hold, and once the first reopen has returned
//! every block keeps the version it read then until it is rewritten.
//!
//! The global timeline is kept by a tap in front of each member: it numbers every operation
//! that changes a member's crash state. Parallel flushes (one thread per member) are put in
//! member order, so a seed replays the same history. A failing case prints its seed; replay
//! with `BLOCKGUARD_SEED=<seed>`; `BLOCKGUARD_SEED=random` runs one fresh seed per test.

use blockguard::blockguard_backend::{Backend, CrashState, FaultBackend, InjectedFault, MemoryBackend};
use blockguard::format::{MapKind, Superblock, VolumeState, SB_REGION, SB_STRUCT_SIZE};
use blockguard::{FormatOptions, Geometry, OpenOptions, Profile, RetagOptions, Volume};
use rand::seq::SliceRandom;
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;
use std::collections::HashSet;
use std::io;
use std::ops::Range;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

/// A content fingerprint (CRC-64/NVME: fast, and two versions of a block colliding is a
/// 2^-64 event).
fn h(data: &[u8]) -> u64 {
    crc_fast::checksum(crc_fast::CrcAlgorithm::Crc64Nvme, data)
}

// ---- The set's timeline -------------------------------------------------------------------

/// What an operation recorded in a member's history.
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
enum Op {
    Write,
    Flush,
    /// A write or flush refused with an injected error (a `WriteFailed` event).
    Failed,
}

/// Numbers the operations of every member of a set, in the order they completed.
#[derive(Debug)]
struct Clock {
    /// The thread driving the workload: operations on other threads are the set's parallel
    /// flushes, whose order among members is up to the scheduler.
    driver: std::thread::ThreadId,
    log: Mutex<Vec<(usize, Op, bool)>>,
}

impl Clock {
    fn new() -> Arc<Clock> {
        Arc::new(Clock {
            driver: std::thread::current().id(),
            log: Mutex::new(Vec::new()),
        })
    }

    fn tick(&self, member: usize, op: Op) {
        let parallel = std::thread::current().id() != self.driver;
        self.log.lock().unwrap().push((member, op, parallel));
    }

    /// Operations so far: the point a step starts or ends at.
    fn now(&self) -> usize {
        self.log.lock().unwrap().len()
    }

    /// The history with each parallel operation's members in member order. One parallel
    /// operation touches each member once and is joined before the driver goes on, so a run
    /// of parallel ticks splits into operations where a member repeats.
    fn timeline(&self, members: usize) -> Timeline {
        let log = self.log.lock().unwrap().clone();
        let mut ops: Vec<(usize, Op)> = Vec::with_capacity(log.len());
        let mut group: Vec<(usize, Op)> = Vec::new();
        for (member, op, parallel) in log {
            if !parallel || group.iter().any(|g| g.0 == member) {
                group.sort_by_key(|g| g.0);
                ops.append(&mut group);
            }
            if parallel {
                group.push((member, op));
            } else {
                ops.push((member, op));
            }
        }
        group.sort_by_key(|g| g.0);
        ops.append(&mut group);
        let mut points = vec![vec![0; members]];
        for &(m, _) in &ops {
            let mut next = points.last().unwrap().clone();
            next[m] += 1;
            points.push(next);
        }
        Timeline { ops, points }
    }
}

/// A run's history: `points[p]` is how many events each member's history held after the
/// first `p` operations of `ops`.
struct Timeline {
    ops: Vec<(usize, Op)>,
    points: Vec<Vec<usize>>,
}

/// A member's backend behind a tap: counts what the engine asks of it and ticks the clock
/// for every operation that adds an event to a [`FaultBackend`]'s history.
#[derive(Debug)]
struct Tap {
    inner: Arc<dyn Backend>,
    member: usize,
    clock: Option<Arc<Clock>>,
    reads: AtomicU64,
    changes: AtomicU64,
}

impl Tap {
    fn new(inner: Arc<dyn Backend>, member: usize, clock: Option<Arc<Clock>>) -> Arc<Tap> {
        Arc::new(Tap {
            inner,
            member,
            clock,
            reads: AtomicU64::new(0),
            changes: AtomicU64::new(0),
        })
    }

    /// Records an operation of `len` bytes (1 for a flush) that returned `r`.
    fn done(&self, len: u64, flush: bool, r: io::Result<()>) -> io::Result<()> {
        self.changes.fetch_add(1, Ordering::Relaxed);
        let op = match &r {
            Ok(()) if flush => Op::Flush,
            Ok(()) => Op::Write,
            Err(e) if InjectedFault::of(e).is_some() => Op::Failed,
            Err(_) => return r,
        };
        // Empty writes store nothing and record nothing.
        if let (Some(clock), true) = (&self.clock, len > 0) {
            clock.tick(self.member, op);
        }
        r
    }

    fn counters(&self) -> (u64, u64) {
        (
            self.reads.load(Ordering::Relaxed),
            self.changes.load(Ordering::Relaxed),
        )
    }

    fn image(&self) -> Vec<u8> {
        let mut out = vec![0u8; usize::try_from(self.inner.len()).unwrap()];
        self.inner.read_at(&mut out, 0).unwrap();
        out
    }
}

impl Backend for Tap {
    fn len(&self) -> u64 {
        self.inner.len()
    }
    fn read_at(&self, buf: &mut [u8], offset: u64) -> io::Result<()> {
        self.reads.fetch_add(1, Ordering::Relaxed);
        self.inner.read_at(buf, offset)
    }
    fn write_at(&self, buf: &[u8], offset: u64) -> io::Result<()> {
        self.done(buf.len() as u64, false, self.inner.write_at(buf, offset))
    }
    fn write_vectored_at(&self, bufs: &[&[u8]], offset: u64) -> io::Result<()> {
        let len = bufs.iter().map(|b| b.len() as u64).sum();
        self.done(len, false, self.inner.write_vectored_at(bufs, offset))
    }
    fn flush(&self) -> io::Result<()> {
        self.done(1, true, self.inner.flush())
    }
    fn start_writeback(&self, offset: u64, len: u64) -> io::Result<()> {
        self.inner.start_writeback(offset, len)
    }
    fn zero_range(&self, offset: u64, len: u64) -> io::Result<()> {
        self.done(len, false, self.inner.zero_range(offset, len))
    }
    fn zero_ranges(&self, offset: u64, len: u64) -> io::Result<Vec<Range<u64>>> {
        self.reads.fetch_add(1, Ordering::Relaxed);
        self.inner.zero_ranges(offset, len)
    }
    fn alignment(&self) -> usize {
        self.inner.alignment()
    }
    fn is_read_only(&self) -> bool {
        self.inner.is_read_only()
    }
    fn name(&self) -> String {
        format!("member{}", self.member)
    }
}

fn dyns(taps: &[Arc<Tap>], order: &[usize]) -> Vec<Arc<dyn Backend>> {
    order
        .iter()
        .map(|&m| taps[m].clone() as Arc<dyn Backend>)
        .collect()
}

// ---- Workloads ----------------------------------------------------------------------------

/// The shape of a simulated set and its workload.
#[derive(Clone, Copy, Debug)]
struct Config {
    members: usize,
    block_size: u32,
    blocks: u64,
    group_blocks: Option<u32>,
    ops: usize,
    /// Tag slots of the set (`FormatOptions::tag_room`; `None`: crc32c's 8 bytes).
    tag_room: Option<usize>,
}

/// Where a member made to fail refuses writes.
#[derive(Clone, Copy, Debug)]
enum Failing {
    Everywhere,
    /// Metadata and data of the groups.
    Groups,
    /// The head copies of the group bitmaps.
    Maps,
    /// The primary superblock region.
    Superblock,
}

impl Failing {
    fn range(self, geo: &Geometry) -> Range<u64> {
        match self {
            Failing::Everywhere => 0..geo.backing_len,
            Failing::Groups => geo.first_group_offset..geo.map_offset(MapKind::Written, 1),
            Failing::Maps => SB_REGION..geo.first_group_offset,
            Failing::Superblock => 0..SB_REGION,
        }
    }
}

/// One operation of a workload: the points it started and ended at, and the content hash
/// of every block it changed, after it.
struct Step {
    start: usize,
    end: usize,
    flush: bool,
    touched: Vec<(u64, u64)>,
}

struct Run {
    fbs: Vec<Arc<FaultBackend>>,
    tl: Timeline,
    geo: Geometry,
    /// Per block, the versions it may hold before the first step.
    initial: Vec<HashSet<u64>>,
    /// Per block, every version written before this run (by an earlier run).
    earlier: Vec<HashSet<u64>>,
    steps: Vec<Step>,
    /// The member made to fail, and the point just after its first failed write.
    dropped: Option<(usize, usize)>,
}

fn session_options(rng: &mut ChaCha8Rng, cfg: &Config) -> OpenOptions {
    OpenOptions {
        // A few blocks per batch: commits in the middle of the workload too.
        stage_bytes: cfg.block_size as usize * rng.random_range(1..6),
        // One group: groups are evicted and reloaded all the time.
        cache_bytes: 0,
        // One thread issues all I/O: a seed replays the same history.
        background_commit: false,
        // Dirty bits cleared at every flush: the clearing is in the history too.
        dirty_clear_interval: std::time::Duration::ZERO,
        ..OpenOptions::default()
    }
}

/// Formats a set of fresh fault-injecting members and closes it; their histories start
/// after the format.
fn formatted_set(cfg: &Config) -> Vec<Arc<FaultBackend>> {
    let mut opts = FormatOptions::with_size(u64::from(cfg.block_size) * cfg.blocks);
    opts.block_size = cfg.block_size;
    opts.group_blocks = cfg.group_blocks;
    opts.tag_room = cfg.tag_room;
    opts.uuid = Some([0x3c; 16]);
    let len = opts.backing_len().unwrap();
    let fbs: Vec<Arc<FaultBackend>> = (0..cfg.members)
        .map(|_| Arc::new(FaultBackend::new(len).unwrap()))
        .collect();
    let members = fbs.iter().map(|b| b.clone() as Arc<dyn Backend>).collect();
    Volume::format_members(members, &opts).unwrap().close().unwrap();
    for fb in &fbs {
        assert!(fb.unflushed().is_empty(), "close left writes unflushed");
        fb.forget_history();
    }
    fbs
}

/// Runs one random operation on `vol`; `model` holds what every byte should read as.
/// `unaligned`: also partial-block writes and zeroing (read-modify-write).
fn random_op(
    rng: &mut ChaCha8Rng,
    vol: &Volume,
    clock: &Clock,
    model: &mut [u8],
    bs: u64,
    unaligned: bool,
) -> Step {
    let blocks = model.len() as u64 / bs;
    let start = clock.now();
    // A third of the writes go to a few hot blocks, so versions pile up on them.
    let hot = blocks.min(2 * bs.min(24));
    let pick_block = |rng: &mut ChaCha8Rng| {
        if rng.random_bool(0.35) {
            rng.random_range(0..hot)
        } else {
            rng.random_range(0..blocks)
        }
    };
    let range = |rng: &mut ChaCha8Rng, max_blocks: u64| -> (u64, u64) {
        if unaligned && rng.random_bool(0.3) {
            let off = rng.random_range(0..blocks * bs);
            (
                off,
                rng.random_range(1..=(blocks * bs - off).min(max_blocks * bs)),
            )
        } else {
            let b = pick_block(rng);
            (b * bs, rng.random_range(1..=(blocks - b).min(max_blocks)) * bs)
        }
    };
    let roll: f64 = rng.random();
    let changed = if roll < 0.15 {
        vol.flush().unwrap();
        None
    } else if roll < 0.27 {
        let (off, len) = range(rng, 3);
        if rng.random_bool(0.5) {
            vol.write_zeroes(off, len).unwrap();
        } else {
            vol.discard(off, len).unwrap();
        }
        model[off as usize..(off + len) as usize].fill(0);
        Some((off, len))
    } else {
        let (off, len) = range(rng, 4);
        let data: Vec<u8> = (0..len).map(|_| rng.random()).collect();
        model[off as usize..(off + len) as usize].copy_from_slice(&data);
        if rng.random_bool(0.5) {
            vol.write_owned(data, off).unwrap();
        } else {
            vol.write_at(&data, off).unwrap();
        }
        Some((off, len))
    };
    let touched = changed.map_or_else(Vec::new, |(off, len)| {
        (off / bs..(off + len).div_ceil(bs))
            .map(|b| (b, h(&model[(b * bs) as usize..((b + 1) * bs) as usize])))
            .collect()
    });
    Step {
        start,
        end: clock.now(),
        flush: roll < 0.15,
        touched,
    }
}

/// Closes `vol` as the last step of a run (close flushes, then marks the members clean).
fn close_step(vol: Volume, clock: &Clock) -> Step {
    let start = clock.now();
    vol.close().unwrap();
    Step {
        start,
        end: clock.now(),
        flush: true,
        touched: Vec::new(),
    }
}

/// The timeline of a finished run, checked against the members' own histories.
fn finish(clock: &Clock, fbs: &[Arc<FaultBackend>]) -> Timeline {
    let tl = clock.timeline(fbs.len());
    for (m, fb) in fbs.iter().enumerate() {
        assert_eq!(
            tl.points.last().unwrap()[m],
            fb.events().len(),
            "member {m}: the tap's count of events disagrees with the member's history"
        );
    }
    tl
}

/// A member made to fail: where it refuses writes, from when, which one.
#[derive(Clone, Copy, Debug)]
struct FailPlan {
    what: Failing,
    /// From the close on (else from a random operation midway).
    at_close: bool,
    member: usize,
}

/// A fresh set of `cfg` behind taps of one clock, opened for a run of seed `seed`: the
/// run's random generator, the members, the clock and the open set.
fn start_run(seed: u64, cfg: &Config) -> (ChaCha8Rng, Vec<Arc<FaultBackend>>, Arc<Clock>, Volume) {
    let mut rng = ChaCha8Rng::seed_from_u64(seed);
    let fbs = formatted_set(cfg);
    let clock = Clock::new();
    let taps: Vec<Arc<Tap>> = (0..cfg.members)
        .map(|m| Tap::new(fbs[m].clone(), m, Some(clock.clone())))
        .collect();
    let all: Vec<usize> = (0..cfg.members).collect();
    let vol = Volume::open_members(dyns(&taps, &all), &session_options(&mut rng, cfg)).unwrap();
    (rng, fbs, clock, vol)
}

/// The run of a fresh set (every block zeros before it) that went through `steps`.
fn fresh_run(
    fbs: Vec<Arc<FaultBackend>>,
    tl: Timeline,
    geo: Geometry,
    steps: Vec<Step>,
    dropped: Option<(usize, usize)>,
) -> Run {
    let zeros = HashSet::from([h(&vec![0u8; geo.block_size as usize])]);
    Run {
        fbs,
        tl,
        geo,
        initial: vec![zeros.clone(); geo.data_blocks as usize],
        earlier: vec![zeros; geo.data_blocks as usize],
        steps,
        dropped,
    }
}

/// A first run: a fresh set, `cfg.ops` random operations, close, with `failing` injected.
fn first_run(seed: u64, cfg: Config, failing: Option<FailPlan>) -> Run {
    let (mut rng, fbs, clock, vol) = start_run(seed, &cfg);
    let geo = *vol.geometry();
    let bs = u64::from(cfg.block_size);
    let mut model = vec![0u8; (bs * cfg.blocks) as usize];
    let fail = failing.map(|d| {
        let at = if d.at_close {
            cfg.ops
        } else {
            rng.random_range(cfg.ops / 4..cfg.ops * 3 / 4)
        };
        (at, d.member, d.what)
    });
    let mut steps = Vec::new();
    for i in 0..=cfg.ops {
        if let Some((at, m, what)) = fail {
            if at == i {
                fbs[m].fail_writes_at(what.range(&geo));
            }
        }
        if i < cfg.ops {
            steps.push(random_op(&mut rng, &vol, &clock, &mut model, bs, true));
        }
    }
    steps.push(close_step(vol, &clock));
    let tl = finish(&clock, &fbs);
    let dropped = fail.and_then(|(_, m, _)| {
        let i = tl.ops.iter().position(|&(x, op)| x == m && op == Op::Failed)?;
        Some((m, i + 1))
    });
    fresh_run(fbs, tl, geo, steps, dropped)
}

/// Reads every block of `vol`: its content hash, or the error. Whole groups at a time,
/// block by block where a group fails.
fn read_all(vol: &Volume, geo: &Geometry) -> Vec<Result<u64, String>> {
    let bs = u64::from(geo.block_size);
    let mut out = Vec::with_capacity(geo.data_blocks as usize);
    let mut b = 0;
    while b < geo.data_blocks {
        let (g, _) = geo.group_of(b);
        let end = geo.first_block(g) + u64::from(geo.blocks_in_group(g));
        let mut buf = vec![0u8; ((end - b) * bs) as usize];
        if vol.read_at(&mut buf, b * bs).is_ok() {
            out.extend(buf.chunks(bs as usize).map(|c| Ok(h(c))));
        } else {
            for x in b..end {
                let mut one = vec![0u8; bs as usize];
                out.push(
                    vol.read_at(&mut one, x * bs)
                        .map(|()| h(&one))
                        .map_err(|e| e.to_string()),
                );
            }
        }
        b = end;
    }
    out
}

/// What a member's bytes at `offset` are, for messages.
fn place(geo: &Geometry, offset: u64) -> String {
    let bs = u64::from(geo.block_size);
    if offset < geo.first_group_offset {
        return format!("byte {offset} (head group bitmaps)");
    }
    if offset >= geo.map_offset(MapKind::Written, 1) {
        return format!("byte {offset} (tail group bitmaps)");
    }
    let g = (offset - geo.first_group_offset) / geo.group_len();
    let within = (offset - geo.first_group_offset) % geo.group_len();
    if within < 2 * bs {
        format!("byte {offset} (group {g}, metadata slot {})", within / bs)
    } else {
        let block = geo.first_block(g) + (within - 2 * bs) / bs;
        format!("byte {offset} (data of block {block})")
    }
}

/// What a check expects of the members' sync state.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
struct Expect {
    /// The member that failed writes before the crash, if any: it may be out of sync.
    failed: Option<usize>,
    /// ... and it must be: a step that flushed the survivors after its failure returned.
    recorded: bool,
}

/// How a crash image set is taken through a session before the final checks.
#[derive(Clone, Debug)]
struct Plan {
    /// Opened read-only first (no convergence: reads are spread over the members as found).
    read_only_first: bool,
    /// The read-write session writes two blocks (first and last: both read stripes with
    /// large volumes) and flushes before closing.
    markers: bool,
    /// The order the members are handed to `open_members` in.
    order: Vec<usize>,
}

fn marker(block: u64, bs: usize) -> Vec<u8> {
    (0..bs)
        .map(|i| (block as u8).wrapping_mul(31) ^ (i as u8) ^ 0xA5)
        .collect()
}

impl Run {
    /// For a crash at point `p`: per block, the versions it may read as — the one the last
    /// completed flush made durable (before any: `initial`), and every one written by a step
    /// that had begun issuing I/O.
    fn allowed(&self, p: usize) -> Vec<HashSet<u64>> {
        let cut = self
            .steps
            .iter()
            .rposition(|s| s.flush && s.end <= p)
            .map_or(0, |i| i + 1);
        let mut allowed = self.initial.clone();
        for s in &self.steps[..cut] {
            for &(b, v) in &s.touched {
                allowed[b as usize] = HashSet::from([v]);
            }
        }
        for s in self.steps[cut..].iter().take_while(|s| s.start < p) {
            for &(b, v) in &s.touched {
                allowed[b as usize].insert(v);
            }
        }
        allowed
    }

    /// Every version of every block, this run's and earlier ones'.
    fn versions(&self) -> Vec<HashSet<u64>> {
        let mut all = self.earlier.clone();
        for (b, set) in self.initial.iter().enumerate() {
            all[b].extend(set);
        }
        for s in &self.steps {
            for &(b, v) in &s.touched {
                all[b as usize].insert(v);
            }
        }
        all
    }

    /// What the members' sync state must be after a crash at point `p`.
    fn expect(&self, p: usize) -> Expect {
        let Some((d, f)) = self.dropped.filter(|&(_, f)| f <= p) else {
            return Expect::default();
        };
        // Every flush of the engine's write path records dropped members before its caller
        // goes on: a step that flushed a survivor after the failure, and returned, did.
        let recorded = self.steps.iter().any(|s| {
            s.end <= p
                && self.tl.ops[f.max(s.start)..s.end.max(f)]
                    .iter()
                    .any(|&(m, op)| m != d && op == Op::Flush)
        });
        Expect {
            failed: Some(d),
            recorded,
        }
    }

    /// Opens the set the crash `images` make up as `plan` says, checks it, and returns every
    /// violation found.
    #[allow(clippy::too_many_lines)] // One check, in the order the set goes through it.
    fn check_set(
        &self,
        images: Vec<Vec<u8>>,
        allowed: &[HashSet<u64>],
        versions: &[HashSet<u64>],
        expect: Expect,
        plan: &Plan,
    ) -> Verdict {
        let geo = self.geo;
        let bs = geo.block_size as usize;
        let n = images.len();
        let mut bad = Vec::new();
        // Which blocks each member holds a complete version of, as the crash left them.
        let intact: Vec<Vec<bool>> = images
            .iter()
            .map(|img| {
                (0..geo.data_blocks)
                    .map(|b| {
                        let at = geo.data_offset(b) as usize;
                        versions[b as usize].contains(&h(&img[at..at + bs]))
                    })
                    .collect()
            })
            .collect();
        let found: Vec<u64> = images.iter().map(|i| h(i)).collect();
        let groups = geo.first_group_offset as usize..geo.map_offset(MapKind::Written, 1) as usize;
        let mut seen = Seen {
            diverged: u64::from(
                images
                    .iter()
                    .any(|i| i[groups.clone()] != images[0][groups.clone()]),
            ),
            ..Seen::default()
        };
        // Each member's own set event (the newer of its two superblock copies): a crash between
        // two members' superblock writes leaves one behind, and the set then takes it for a
        // stale copy (out of sync, to be copied whole) — costly, never wrong.
        let events: Vec<u64> = images
            .iter()
            .map(|img| {
                [0, geo.backup_sb_offset as usize]
                    .iter()
                    .filter_map(|&at| Superblock::decode(&img[at..at + SB_STRUCT_SIZE]).ok())
                    .filter_map(|(sb, _)| sb.mirror.map(|m| m.event))
                    .max()
                    .unwrap_or(0)
            })
            .collect();
        let newest_event = events.iter().copied().max().unwrap_or(0);
        // Either superblock copy of any member saying "in use" makes the set in use.
        let in_use = images.iter().any(|img| {
            [0, geo.backup_sb_offset as usize].iter().any(|&at| {
                Superblock::decode(&img[at..at + SB_STRUCT_SIZE])
                    .is_ok_and(|(sb, _)| sb.state == VolumeState::InUse)
            })
        });
        let copies = |b: usize| -> String {
            intact
                .iter()
                .map(|i| if i[b] { "complete" } else { "torn" })
                .collect::<Vec<_>>()
                .join("/")
        };
        let taps: Vec<Arc<Tap>> = images
            .into_iter()
            .enumerate()
            .map(|(m, img)| Tap::new(Arc::new(MemoryBackend::from_vec(img)), m, None))
            .collect();
        let tiny = OpenOptions {
            cache_bytes: 0,
            background_commit: false,
            ..OpenOptions::default()
        };
        let read_only = OpenOptions {
            read_only: true,
            ..tiny.clone()
        };
        // Returns the violations, and how many blocks torn on the first member in sync were
        // read from another's complete copy.
        let judge = |what: &str, got: &[Result<u64, String>], sync: &[bool]| {
            let (mut bad, mut saved) = (Vec::new(), 0);
            let source = (0..n).find(|&m| sync[m]);
            for (b, r) in got.iter().enumerate() {
                let complete = (0..n).find(|&m| sync[m] && intact[m][b]);
                match r {
                    Ok(v) if !allowed[b].contains(v) => bad.push(format!(
                        "{what}: block {b} reads as neither its last flushed version nor one written \
                         after it (G2)"
                    )),
                    Ok(_) => saved += u64::from(complete.is_some() && source.is_some_and(|s| !intact[s][b])),
                    // Torn on every member in sync: G1's allowance.
                    Err(_) if complete.is_none() => {}
                    Err(e) => bad.push(format!(
                        "{what}: block {b} fails though a member in sync held a complete version of \
                         it (G1; copies as found: {}): {e}",
                        copies(b)
                    )),
                }
            }
            (bad, saved)
        };
        let sync_of = |vol: &Volume| -> Vec<bool> { vol.members().iter().map(|(_, s)| *s).collect() };

        if plan.read_only_first {
            match Volume::open_members(dyns(&taps, &plan.order), &read_only) {
                Ok(vol) => bad.extend(judge("read-only", &read_all(&vol, &geo), &sync_of(&vol)).0),
                Err(e) => bad.push(format!("the set does not open read-only: {e}")),
            }
        }
        let vol = match Volume::open_members(dyns(&taps, &plan.order), &tiny) {
            Ok(v) => v,
            Err(e) => {
                bad.push(format!("the set does not open read-write: {e}"));
                return Verdict { bad, seen };
            }
        };
        let sync = sync_of(&vol);
        seen.member_out = u64::from(sync.contains(&false));
        seen.reverted = vol.recovery_at_open().map_or(0, |r| r.blocks_reverted);
        for (m, &s) in sync.iter().enumerate() {
            let failed = expect.failed == Some(m);
            if !s && !failed && events[m] == newest_event {
                bad.push(format!("member {m} is out of sync, yet it never failed"));
            }
            if s && failed && expect.recorded {
                bad.push(format!(
                    "member {m} failed writes, a step that flushed after that returned, yet the \
                     reopened set counts it in sync"
                ));
            }
        }
        let out: Vec<usize> = (0..n).filter(|&m| !sync[m]).collect();
        let counters: Vec<(u64, u64)> = out.iter().map(|&m| taps[m].counters()).collect();
        let got = read_all(&vol, &geo);
        let (more, saved) = judge("read-write", &got, &sync);
        bad.extend(more);
        seen.torn_first = saved;
        bad.extend(resume_retag(&vol, &got));
        let mut last: Vec<Option<u64>> = got.iter().map(|r| r.as_ref().ok().copied()).collect();
        if plan.markers {
            for b in [0, geo.data_blocks - 1] {
                let data = marker(b, bs);
                match vol.write_at(&data, b * bs as u64) {
                    Ok(()) => last[b as usize] = Some(h(&data)),
                    Err(e) => bad.push(format!("writing block {b} after the reopen fails: {e}")),
                }
            }
            if let Err(e) = vol.flush() {
                bad.push(format!("a flush after the reopen fails: {e}"));
            }
        }
        let profile = vol.profile();
        if let Err(e) = vol.close() {
            bad.push(format!("close fails: {e}"));
        }
        for (&m, &before) in out.iter().zip(&counters) {
            if taps[m].counters() != before {
                bad.push(format!(
                    "member {m} is out of sync, yet the set read or wrote it: (reads, writes) {before:?} \
                     -> {:?}",
                    taps[m].counters()
                ));
            }
            if h(&taps[m].image()) != found[m] {
                bad.push(format!("member {m} is out of sync, yet its image changed"));
            }
        }

        // The members in sync agree: groups and written-groups map always. The session maps
        // (dirty, first-write) only if the set was found in use: their clearing need not be
        // durable before "clean" (a clean volume ignores them), so a crash can leave stale
        // bits on some members of a clean set; an open in use copies them all from one.
        let live: Vec<(usize, Vec<u8>)> = (0..n)
            .filter(|&m| sync[m])
            .map(|m| (m, taps[m].image()))
            .collect();
        // Each copy of the maps: written, dirty, first-write, one after the other.
        let maps = geo.map_region_len() * if in_use { 3 } else { 1 };
        let regions: Vec<Range<usize>> = std::iter::once(groups)
            .chain((0..2).map(|copy| {
                let at = geo.map_offset(MapKind::Written, copy);
                at as usize..(at + maps) as usize
            }))
            .collect();
        for (m, img) in &live[1..] {
            let (m0, first) = &live[0];
            let differ = regions
                .iter()
                .find(|r| img[(*r).clone()] != first[(*r).clone()])
                .and_then(|r| r.clone().find(|&i| img[i] != first[i]));
            if let Some(i) = differ {
                bad.push(format!(
                    "after close, members {m0} and {m} differ at {}",
                    place(&geo, i as u64)
                ));
            }
        }
        for (m, img) in &live {
            match Superblock::decode(&img[..SB_STRUCT_SIZE]) {
                Ok((sb, _)) => {
                    if sb.state != VolumeState::Clean {
                        bad.push(format!(
                            "after close, member {m}'s superblock says {:?}",
                            sb.state
                        ));
                    }
                    let members = sb.mirror.map(|i| i.members).unwrap_or_default();
                    for &d in &out {
                        if members.get(d).is_none_or(|x| x.in_sync) {
                            bad.push(format!(
                                "after close, member {m}'s superblock counts out-of-sync member {d} in sync"
                            ));
                        }
                    }
                }
                Err(e) => bad.push(format!("after close, member {m}'s superblock is unusable: {e}")),
            }
        }
        // Each member in sync alone reads every block as the set did.
        for (m, _) in &live {
            let vol = match Volume::open_members(dyns(&taps, &[*m]), &read_only) {
                Ok(v) => v,
                Err(e) => {
                    bad.push(format!("member {m} alone does not open read-only: {e}"));
                    continue;
                }
            };
            if (vol.profile(), vol.retag_status()) != (profile, None) {
                bad.push(format!(
                    "member {m} alone has tag profile {} (re-tag {:?}), the set {profile}",
                    vol.profile(),
                    vol.retag_status()
                ));
            }
            for (b, r) in read_all(&vol, &geo).into_iter().enumerate() {
                match (last[b], r) {
                    (Some(want), Ok(v)) if v != want => bad.push(format!(
                        "member {m} alone reads block {b} as another version than the set"
                    )),
                    (Some(_), Err(e)) => bad.push(format!(
                        "member {m} alone fails block {b}, which the set read (G1): {e}"
                    )),
                    (None, Ok(v)) if !allowed[b].contains(&v) => bad.push(format!(
                        "member {m} alone reads block {b} as a version not allowed (G2)"
                    )),
                    _ => {}
                }
            }
        }
        Verdict { bad, seen }
    }
}

/// What one check found.
struct Verdict {
    bad: Vec<String>,
    seen: Seen,
}

/// What the checks met, to show the simulation reaches the cases it is about.
#[derive(Clone, Copy, Debug, Default)]
struct Seen {
    /// Image sets whose members' groups differed as the crash left them.
    diverged: u64,
    /// Image sets reopened with a member out of sync.
    member_out: u64,
    /// Blocks recovery at open settled back onto their older version.
    reverted: u64,
    /// Blocks torn on the first member in sync that the reopened set read from another's
    /// complete copy.
    torn_first: u64,
}

impl std::ops::AddAssign for Seen {
    fn add_assign(&mut self, o: Seen) {
        self.diverged += o.diverged;
        self.member_out += o.member_out;
        self.reverted += o.reverted;
        self.torn_first += o.torn_first;
    }
}

// ---- Crash images -------------------------------------------------------------------------

/// Which of its unflushed writes a member's disk keeps in a crash.
#[derive(Clone, Copy, PartialEq, Eq, Hash, Debug)]
enum Keep {
    Nothing,
    Everything,
    /// A random subset in a random order (torn when the search says so).
    Random,
}

fn crash_image(state: &CrashState, keep: Keep, rng: &mut ChaCha8Rng, torn: bool) -> Vec<u8> {
    match keep {
        Keep::Nothing => state.crash_image(&[]),
        Keep::Everything => state.crash_image(&(0..state.unflushed().len()).collect::<Vec<_>>()),
        Keep::Random => state.random_crash_image(rng, torn),
    }
}

/// How hard to look at each point of a history.
#[derive(Clone, Copy, Debug)]
struct Search {
    /// Every point of the history; otherwise this many random ones.
    points: Option<usize>,
    /// Random image sets per point (besides the all/nothing combinations).
    samples: usize,
    /// Random images are torn at 512 bytes.
    torn: bool,
    /// Per member, every crash image of its own (when it has at most this many), the other
    /// members' random.
    exhaustive: usize,
    /// Per member, every 512-byte tear mask of each metadata write in flight (up to 16).
    tear_masks: bool,
    /// Second runs from crash images of this run, each crashed again all along its history.
    second_runs: usize,
    /// Operations of a second run after its reopen.
    second_ops: usize,
}

#[derive(Default)]
struct Totals {
    states: usize,
    violations: Vec<String>,
    seen: Seen,
}

/// Checks crash image sets of `run` at the points `search` asks for; stops at the first
/// violating one.
struct Sim<'a> {
    run: &'a Run,
    seed: u64,
    search: Search,
    versions: Vec<HashSet<u64>>,
    seen: HashSet<(Vec<u64>, u64, Expect)>,
    totals: Totals,
}

impl<'a> Sim<'a> {
    fn new(run: &'a Run, seed: u64, search: Search) -> Sim<'a> {
        Sim {
            run,
            seed,
            search,
            versions: run.versions(),
            seen: HashSet::new(),
            totals: Totals::default(),
        }
    }

    fn state(&self, m: usize, count: usize) -> CrashState {
        self.run.fbs[m].state_at(count)
    }

    fn is_metadata(&self, offset: u64) -> bool {
        let g = &self.run.geo;
        offset >= g.first_group_offset
            && offset < g.map_offset(MapKind::Written, 1)
            && (offset - g.first_group_offset) % g.group_len() < 2 * u64::from(g.block_size)
    }

    fn points(&self, rng: &mut ChaCha8Rng) -> Vec<usize> {
        let all = self.run.tl.points.len();
        match self.search.points {
            None => (0..all).collect(),
            Some(k) => {
                let mut ps: Vec<usize> = (0..all).collect();
                ps.shuffle(rng);
                ps.truncate(k);
                ps.sort_unstable();
                ps
            }
        }
    }

    fn simulate(&mut self) {
        let mut rng = ChaCha8Rng::seed_from_u64(self.seed ^ 0x5EED_C0DE);
        let mut states: Vec<Option<(usize, CrashState)>> = vec![None; self.run.fbs.len()];
        for p in self.points(&mut rng) {
            if !self.totals.violations.is_empty() {
                return;
            }
            let counts = self.run.tl.points[p].clone();
            for (m, slot) in states.iter_mut().enumerate() {
                if slot.as_ref().is_none_or(|(c, _)| *c != counts[m]) {
                    *slot = Some((counts[m], self.state(m, counts[m])));
                }
            }
            let st: Vec<&CrashState> = states.iter().map(|s| &s.as_ref().unwrap().1).collect();
            self.point(p, &counts, &st);
        }
    }

    /// Checks the image sets of one point.
    fn point(&mut self, p: usize, counts: &[usize], st: &[&CrashState]) {
        let n = st.len();
        let torn = self.search.torn;
        let counts_bytes: Vec<u8> = counts.iter().flat_map(|c| c.to_le_bytes()).collect();
        let mut rng = ChaCha8Rng::seed_from_u64(self.seed ^ h(&counts_bytes));
        let allowed = self.run.allowed(p);
        let mut fingerprint: Vec<u8> = Vec::new();
        for set in &allowed {
            let mut v: Vec<u64> = set.iter().copied().collect();
            v.sort_unstable();
            fingerprint.extend(v.iter().flat_map(|x| x.to_le_bytes()));
            fingerprint.push(0xFF);
        }
        let ctx = Ctx {
            p,
            counts,
            allowed: &allowed,
            allowed_hash: h(&fingerprint),
            expect: self.run.expect(p),
        };
        let mut combos: Vec<Vec<Keep>> = vec![vec![Keep::Nothing; n], vec![Keep::Everything; n]];
        for m in 0..n {
            for (mine, others) in [
                (Keep::Everything, Keep::Nothing),
                (Keep::Nothing, Keep::Everything),
            ] {
                let mut c = vec![others; n];
                c[m] = mine;
                if !combos.contains(&c) {
                    combos.push(c);
                }
            }
        }
        combos.extend((0..self.search.samples).map(|_| vec![Keep::Random; n]));
        for combo in combos {
            let images = combo
                .iter()
                .zip(st)
                .map(|(&k, s)| crash_image(s, k, &mut rng, torn))
                .collect();
            self.check(&ctx, images, &format!("{combo:?}"), &mut rng);
        }
        // One member's every image (or every tear of its metadata writes), the others random.
        for m in 0..n {
            if st[m].unflushed().is_empty() {
                continue;
            }
            let mut own: Vec<(String, Vec<u8>)> = Vec::new();
            if self.search.exhaustive > 0 {
                let _ = st[m].for_each_crash_order(self.search.exhaustive, |order| {
                    own.push((format!("member {m} keeps {order:?}"), st[m].crash_image(order)));
                });
            }
            if self.search.tear_masks {
                own.extend(self.tears(st[m], m, &mut rng));
            }
            for (how, img) in own {
                let mut images: Vec<Vec<u8>> = st
                    .iter()
                    .map(|s| crash_image(s, Keep::Random, &mut rng, torn))
                    .collect();
                images[m] = img;
                self.check(&ctx, images, &how, &mut rng);
            }
        }
    }

    /// Member `m`'s images with one metadata write in flight torn by each mask (all of them
    /// for up to 4 sectors, 16 random ones above), its other writes kept at random.
    fn tears(&self, state: &CrashState, m: usize, rng: &mut ChaCha8Rng) -> Vec<(String, Vec<u8>)> {
        let pending = state.unflushed();
        let mut out = Vec::new();
        for (i, w) in pending.iter().enumerate() {
            if !self.is_metadata(w.offset) {
                continue;
            }
            let sectors = w.sector_count();
            let masks: Vec<u64> = if sectors <= 4 {
                (0..1u64 << sectors).collect()
            } else {
                (0..16).map(|_| rng.random()).collect()
            };
            let others: Vec<usize> = (0..pending.len())
                .filter(|&j| j != i && rng.random_bool(0.5))
                .collect();
            for mask in masks {
                let mut keep: Vec<(usize, Vec<bool>)> = others
                    .iter()
                    .map(|&j| (j, vec![true; pending[j].sector_count()]))
                    .collect();
                keep.push((i, (0..sectors).map(|s| (mask >> (s % 64)) & 1 == 1).collect()));
                out.push((
                    format!("member {m}: write {i} torn by mask {mask:#x}, with {others:?}"),
                    state.crash_image_torn(&keep),
                ));
            }
        }
        out
    }

    fn check(&mut self, ctx: &Ctx<'_>, images: Vec<Vec<u8>>, how: &str, rng: &mut ChaCha8Rng) {
        let key = (
            images.iter().map(|i| h(i)).collect(),
            ctx.allowed_hash,
            ctx.expect,
        );
        if !self.totals.violations.is_empty() || !self.seen.insert(key) {
            return;
        }
        self.totals.states += 1;
        let mut order: Vec<usize> = (0..images.len()).collect();
        order.shuffle(rng);
        let plan = Plan {
            read_only_first: self.totals.states % 3 == 1,
            markers: !self.totals.states.is_multiple_of(3),
            order,
        };
        let verdict = self
            .run
            .check_set(images, ctx.allowed, &self.versions, ctx.expect, &plan);
        self.totals.seen += verdict.seen;
        for v in verdict.bad {
            self.totals.violations.push(format!(
                "seed {}: crash at point {} (member events {:?}; {how}; {plan:?}; {:?}): {v}",
                self.seed, ctx.p, ctx.counts, ctx.expect
            ));
        }
    }
}

/// What every image set of one point is checked against.
struct Ctx<'a> {
    p: usize,
    counts: &'a [usize],
    allowed: &'a [HashSet<u64>],
    allowed_hash: u64,
    expect: Expect,
}

/// A second run on crash images of `first` taken at point `p`: reopen (convergence and
/// recovery), read every block, `ops` aligned operations, close — all of it in the second
/// run's own history.
fn second_run(first: &Run, p: usize, images: Vec<Vec<u8>>, seed: u64, ops: usize) -> Result<Run, String> {
    let mut rng = ChaCha8Rng::seed_from_u64(seed);
    let n = images.len();
    let geo = first.geo;
    let bs = u64::from(geo.block_size);
    let fbs: Vec<Arc<FaultBackend>> = images
        .into_iter()
        .map(|img| Arc::new(FaultBackend::from_image(img)))
        .collect();
    let clock = Clock::new();
    let taps: Vec<Arc<Tap>> = (0..n)
        .map(|m| Tap::new(fbs[m].clone(), m, Some(clock.clone())))
        .collect();
    let cfg = Config {
        members: n,
        block_size: geo.block_size,
        blocks: geo.data_blocks,
        group_blocks: Some(geo.group_blocks),
        ops,
        // The set exists already: only the session options are taken from here.
        tag_room: None,
    };
    let all: Vec<usize> = (0..n).collect();
    let vol = Volume::open_members(dyns(&taps, &all), &session_options(&mut rng, &cfg))
        .map_err(|e| format!("the set does not reopen read-write: {e}"))?;
    // Once the reopen has returned, what it settled is durable: every block keeps the
    // version it reads as now until it is rewritten.
    let opened = clock.now();
    let pinned = read_all(&vol, &geo)
        .into_iter()
        .enumerate()
        .filter_map(|(b, r)| r.ok().map(|v| (b as u64, v)))
        .collect();
    let mut steps = vec![Step {
        start: 0,
        end: opened,
        flush: true,
        touched: pinned,
    }];
    // Whole blocks only: the model need not know the blocks' contents.
    let mut model = vec![0u8; (bs * geo.data_blocks) as usize];
    for _ in 0..ops {
        steps.push(random_op(&mut rng, &vol, &clock, &mut model, bs, false));
    }
    steps.push(close_step(vol, &clock));
    let tl = finish(&clock, &fbs);
    Ok(Run {
        fbs,
        tl,
        geo,
        initial: first.allowed(p),
        earlier: first.versions(),
        steps,
        dropped: None,
    })
}

/// A first run simulated, then (without a member dropped) `search.second_runs` second runs
/// from random crash image sets of it, each simulated at every point.
fn simulate_twice(seed: u64, cfg: Config, failing: Option<FailPlan>, search: Search) -> Totals {
    let run = first_run(seed, cfg, failing);
    assert!(
        failing.is_none() || run.dropped.is_some(),
        "seed {seed}: {failing:?} never made the member fail"
    );
    let mut sim = Sim::new(&run, seed, search);
    sim.simulate();
    let mut totals = sim.totals;
    if !totals.violations.is_empty() || run.dropped.is_some() {
        return totals;
    }
    let mut rng = ChaCha8Rng::seed_from_u64(seed ^ 0x2ECD);
    // Start from points where some member has writes in flight: recovery has work then.
    let mut points = Vec::new();
    let mut in_flight = vec![false; cfg.members];
    for (i, &(m, op)) in run.tl.ops.iter().enumerate() {
        in_flight[m] = match op {
            Op::Write => true,
            Op::Flush => false,
            Op::Failed => in_flight[m],
        };
        if in_flight.iter().any(|&w| w) {
            points.push(i + 1);
        }
    }
    points.shuffle(&mut rng);
    for (k, &p) in points.iter().take(search.second_runs).enumerate() {
        let torn = search.torn && rng.random_bool(0.5);
        let images: Vec<Vec<u8>> = run.tl.points[p]
            .iter()
            .enumerate()
            .map(|(m, &c)| run.fbs[m].state_at(c).random_crash_image(&mut rng, torn))
            .collect();
        let second_seed = seed.wrapping_mul(1000).wrapping_add(k as u64);
        let again = match second_run(&run, p, images, second_seed, search.second_ops) {
            Ok(r) => r,
            Err(e) => {
                totals
                    .violations
                    .push(format!("seed {seed}: second run from point {p}: {e}"));
                return totals;
            }
        };
        let mut sim = Sim::new(
            &again,
            second_seed,
            Search {
                points: None,
                second_runs: 0,
                ..search
            },
        );
        sim.simulate();
        totals.states += sim.totals.states;
        totals.seen += sim.totals.seen;
        totals.violations.extend(
            sim.totals
                .violations
                .into_iter()
                .map(|v| format!("second crash, after a first one at point {p} of seed {seed}: {v}")),
        );
        if !totals.violations.is_empty() {
            break;
        }
    }
    totals
}

/// The seeds to run: `default`, or what `BLOCKGUARD_SEED` says (a number, or `random`).
fn seeds(default: Range<u64>) -> Vec<u64> {
    let Ok(var) = std::env::var("BLOCKGUARD_SEED") else {
        return default.collect();
    };
    if var == "random" {
        let seed = rand::random::<u64>() >> 1;
        println!("BLOCKGUARD_SEED=random picked {seed}");
        return vec![seed];
    }
    vec![var.parse().expect("BLOCKGUARD_SEED is a number or \"random\"")]
}

/// Runs `f` on every seed; panics with the first violations and the seed to replay.
fn no_violation(label: &str, seeds: &[u64], f: impl Fn(u64) -> Totals) {
    let (mut states, mut seen) = (0, Seen::default());
    for &seed in seeds {
        let t = f(seed);
        seen += t.seen;
        assert!(
            t.violations.is_empty(),
            "{label}: violations under seed {seed} (replay with BLOCKGUARD_SEED={seed}):\n{}",
            t.violations[..t.violations.len().min(8)].join("\n")
        );
        states += t.states;
    }
    assert!(states > 0, "{label}: nothing was checked");
    println!(
        "{label}: {states} crash image sets over {} seeds, no violation ({seen:?})",
        seeds.len()
    );
}

// ---- Re-tags ------------------------------------------------------------------------------

/// After a crash during a re-tag (the set reopened read-write, every block read as `got`):
/// the same re-tag, resumed, completes, and finds bad only blocks the read found bad (torn on
/// every member: G1's allowance). Nothing when no re-tag is in progress.
fn resume_retag(vol: &Volume, got: &[Result<u64, String>]) -> Vec<String> {
    let Some(status) = vol.retag_status() else {
        return Vec::new();
    };
    let opts = RetagOptions {
        step_bytes: 1,
        ..RetagOptions::new(status.to)
    };
    match vol.retag(&opts, &mut |_, _| {}) {
        Ok(r) if !r.complete => vec![format!("the resumed re-tag did not complete: {r:?}")],
        Ok(r) => r
            .bad_blocks
            .iter()
            .filter(|p| got.get(p.block as usize).is_some_and(Result::is_ok))
            .map(|p| {
                format!(
                    "the resumed re-tag (from group {} of {}) finds block {} bad, which read: {}",
                    status.cursor, status.groups, p.block, p.detail
                )
            })
            .collect(),
        Err(e) => vec![format!("the resumed re-tag fails: {e}")],
    }
}

/// A re-tag run: a fresh set, `cfg.ops` random operations and a flush, then a re-tag to `to`
/// one group per step (the cursor recorded after each), with a random client operation after
/// every step; then close. Each re-tag step is a step of the run that flushes (it starts with
/// everything staged committed and flushed on every member and ends with its own flush).
fn retag_run(seed: u64, cfg: Config, to: Profile) -> Run {
    let (mut rng, fbs, clock, vol) = start_run(seed, &cfg);
    let geo = *vol.geometry();
    let bs = u64::from(cfg.block_size);
    let mut model = vec![0u8; (bs * cfg.blocks) as usize];
    let mut steps: Vec<Step> = (0..cfg.ops)
        .map(|_| random_op(&mut rng, &vol, &clock, &mut model, bs, true))
        .collect();
    let start = clock.now();
    vol.flush().unwrap();
    steps.push(Step {
        start,
        end: clock.now(),
        flush: true,
        touched: Vec::new(),
    });
    let opts = RetagOptions {
        step_bytes: 1,
        record_every: std::time::Duration::ZERO,
        ..RetagOptions::new(to)
    };
    let mut since = clock.now();
    let report = vol
        .retag(&opts, &mut |done, _| {
            if done == 0 {
                return;
            }
            steps.push(Step {
                start: since,
                end: clock.now(),
                flush: true,
                touched: Vec::new(),
            });
            steps.push(random_op(&mut rng, &vol, &clock, &mut model, bs, true));
            since = clock.now();
        })
        .unwrap();
    assert!(report.complete && report.bad_blocks.is_empty(), "{report:?}");
    steps.push(close_step(vol, &clock));
    let tl = finish(&clock, &fbs);
    fresh_run(fbs, tl, geo, steps, None)
}

/// Crashes of the members of a 2-member set, each on its own, at every point of a re-tag
/// with a client writing between its steps: G1, G2 and the members' agreement hold with both
/// profiles in play, and the re-tag resumed after the reopen completes (`resume_retag`), each
/// member alone then having the target's profile.
fn retag_crashes(search: Search, seeds: &[u64]) {
    retag_crashes_of(SMALL, Profile::Xxh3, search, seeds);
}

/// [`retag_crashes`] for a set made as `cfg` says, re-tagged to `to`.
fn retag_crashes_of(cfg: Config, to: Profile, search: Search, seeds: &[u64]) {
    let label = format!("re-tag to {to}, {} members", cfg.members);
    no_violation(&label, seeds, |seed| {
        let run = retag_run(seed, cfg, to);
        let mut sim = Sim::new(&run, seed, search);
        sim.simulate();
        sim.totals
    });
}

#[test]
fn a_retag_of_two_members_survives_independent_crashes_at_every_point() {
    retag_crashes(
        Search {
            exhaustive: 8,
            second_runs: 0,
            ..EVERY_POINT
        },
        &seeds(0..2),
    );
}

/// Three members, each crashing on its own at every point of a re-tag.
#[test]
fn a_retag_of_three_members_survives_independent_crashes_at_every_point() {
    retag_crashes_of(
        Config { members: 3, ..SMALL },
        Profile::Xxh3,
        Search {
            exhaustive: 4,
            second_runs: 0,
            ..EVERY_POINT
        },
        &seeds(300..301),
    );
}

/// Every point of a re-tag's history, three random image sets per point with writes torn at
/// 512 bytes and every tear mask of the metadata writes in flight; no second runs.
const TORN_RETAG: Search = Search {
    samples: 3,
    torn: true,
    tear_masks: true,
    second_runs: 0,
    ..EVERY_POINT
};

/// Across tag sizes: crc32c in 16-byte slots re-tagged to sha256 (16-byte tags), two
/// members, torn crashes at every point.
#[test]
fn a_retag_of_two_members_to_larger_tags_survives_torn_independent_crashes() {
    retag_crashes_of(
        Config {
            tag_room: Some(16),
            ..SMALL
        },
        Profile::Sha256,
        TORN_RETAG,
        &seeds(400..401),
    );
}

#[test]
fn a_retag_of_two_members_survives_torn_independent_crashes() {
    retag_crashes(TORN_RETAG, &seeds(200..202));
}

// ---- The tests ----------------------------------------------------------------------------

/// 512-byte blocks in 13 groups of 12: metadata sectors are single sectors, and a one-group
/// cache evicts all the time.
const SMALL: Config = Config {
    members: 2,
    block_size: 512,
    blocks: 150,
    group_blocks: Some(12),
    ops: 24,
    tag_room: None,
};

/// 4 KiB blocks, 6 groups of 70: 1.7 MiB of volume, so reads go to both members (1 MiB
/// stripes) and a metadata write spans 8 sectors.
const STRIPED: Config = Config {
    members: 2,
    block_size: 4096,
    blocks: 420,
    group_blocks: Some(70),
    ops: 14,
    tag_room: None,
};

/// Every point of the history, two random image sets per point besides the all/nothing
/// combinations, whole writes, two second runs.
const EVERY_POINT: Search = Search {
    points: None,
    samples: 2,
    torn: false,
    exhaustive: 0,
    tear_masks: false,
    second_runs: 2,
    second_ops: 5,
};

#[test]
fn two_members_survive_independent_crashes_at_every_point() {
    let search = Search {
        exhaustive: 8,
        ..EVERY_POINT
    };
    no_violation("2 members", &seeds(0..4), |seed| {
        simulate_twice(seed, SMALL, None, search)
    });
}

#[test]
fn two_members_survive_torn_independent_crashes() {
    let search = Search {
        samples: 3,
        torn: true,
        tear_masks: true,
        ..EVERY_POINT
    };
    no_violation("2 members, torn", &seeds(100..103), |seed| {
        simulate_twice(seed, SMALL, None, search)
    });
}

#[test]
fn three_members_survive_independent_crashes() {
    let cfg = Config {
        members: 3,
        ops: 16,
        ..SMALL
    };
    no_violation("3 members", &seeds(200..202), |seed| {
        let search = Search {
            torn: seed % 2 == 1,
            exhaustive: 4,
            second_runs: 1,
            second_ops: 4,
            ..EVERY_POINT
        };
        simulate_twice(seed, cfg, None, search)
    });
}

#[test]
fn striped_reads_survive_independent_crashes_4k() {
    // Torn 4 KiB writes: a data block can be torn on one member and complete on another.
    no_violation("4 KiB, striped, torn", &seeds(300..302), |seed| {
        let cfg = Config {
            members: 2 + (seed % 2) as usize,
            ..STRIPED
        };
        let search = Search {
            points: Some(40),
            torn: true,
            tear_masks: true,
            second_runs: 1,
            second_ops: 4,
            ..EVERY_POINT
        };
        simulate_twice(seed, cfg, None, search)
    });
}

#[test]
fn a_member_dropped_midway_stays_out_after_a_crash() {
    use Failing::{Everywhere, Groups, Maps, Superblock};
    // Per seed (mod 10): where the member fails, whether from the close on (else midway),
    // which member, and the set's size.
    let cases = [
        (Everywhere, false, 1, 2),
        (Groups, false, 0, 3),
        (Maps, false, 0, 2),
        (Superblock, false, 1, 3),
        (Everywhere, false, 2, 3),
        (Groups, false, 1, 2),
        (Superblock, true, 0, 2),
        (Superblock, true, 2, 3),
        (Everywhere, true, 1, 3),
        (Everywhere, true, 0, 2),
    ];
    no_violation("dropped member", &seeds(400..410), |seed| {
        let (what, at_close, member, members) = cases[(seed % 10) as usize];
        let cfg = Config {
            members,
            ops: 16,
            ..SMALL
        };
        let search = Search {
            torn: seed % 3 == 0,
            second_runs: 0,
            ..EVERY_POINT
        };
        let failing = FailPlan {
            what,
            at_close,
            member,
        };
        simulate_twice(seed, cfg, Some(failing), search)
    });
}

/// The checks are not blind: a member whose disk lost writes a completed flush made durable
/// (an impossible crash: its image is from before that flush) is caught.
#[test]
fn the_simulator_sees_a_member_that_lost_flushed_writes() {
    let run = first_run(7, SMALL, None);
    let last = run.tl.points.len() - 1;
    // Member 1 as it was before the last completed flush of the workload proper.
    let flush = run.steps[..run.steps.len() - 1]
        .iter()
        .rposition(|s| s.flush && s.touched.is_empty() && s.end > s.start)
        .expect("the workload flushed");
    let before = run.steps[flush].start;
    let plan = Plan {
        read_only_first: false,
        markers: false,
        order: vec![0, 1],
    };
    let images = vec![
        run.fbs[0].state_at(run.tl.points[last][0]).crash_image(&[]),
        run.fbs[1].state_at(run.tl.points[before][1]).crash_image(&[]),
    ];
    let found = run.check_set(
        images,
        &run.allowed(last),
        &run.versions(),
        Expect::default(),
        &plan,
    );
    assert!(
        !found.bad.is_empty(),
        "a member missing flushed writes went unnoticed"
    );
    println!("a stale member is seen: {}", found.bad[0]);
}

/// A crash tears member 0's copy of a data block in flight while member 1's copy landed
/// whole. Both versions are ones the crash may leave; a read-only open serves member 1's
/// through read repair, and the read-write open, which makes the members agree by copying
/// member 0's dirty groups over the others, must keep member 1's complete copy rather than
/// spread the torn one (it did, before: found by seed 300 of
/// `striped_reads_survive_independent_crashes_4k`).
#[test]
fn convergence_keeps_a_complete_copy_over_a_torn_one() {
    let cfg = Config {
        members: 2,
        block_size: 4096,
        blocks: 64,
        group_blocks: Some(16),
        ops: 0,
        tag_room: None,
    };
    let bs = 4096usize;
    let fbs = formatted_set(&cfg);
    let all: Vec<Arc<dyn Backend>> = fbs.iter().map(|b| b.clone() as Arc<dyn Backend>).collect();
    let opts = OpenOptions {
        stage_bytes: bs,
        background_commit: false,
        ..OpenOptions::default()
    };
    let vol = Volume::open_members(all, &opts).unwrap();
    let geo = *vol.geometry();
    let (old, new) = (vec![0x11u8; bs], vec![0x22u8; bs]);
    vol.write_at(&old, 5 * bs as u64).unwrap();
    vol.flush().unwrap();
    // The new version is committed (its tags durable on both members) and its data written,
    // not flushed: the stage holds one block, so the write commits at once.
    vol.write_at(&new, 5 * bs as u64).unwrap();
    let at = geo.data_offset(5);
    let images: Vec<Vec<u8>> = fbs
        .iter()
        .enumerate()
        .map(|(m, fb)| {
            let state = fb.crash_state();
            let keep: Vec<(usize, Vec<bool>)> = state
                .unflushed()
                .iter()
                .enumerate()
                .map(|(i, w)| {
                    let whole = vec![true; w.sector_count()];
                    // Member 0's write of block 5 lands in every other sector.
                    let mask = if m == 0 && w.offset == at {
                        (0..w.sector_count()).map(|s| s % 2 == 0).collect()
                    } else {
                        whole
                    };
                    (i, mask)
                })
                .collect();
            assert!(
                state.unflushed().iter().any(|w| w.offset == at),
                "member {m}: block 5's data write is in flight"
            );
            state.crash_image_torn(&keep)
        })
        .collect();
    drop(vol);
    let reopen = |read_only: bool| {
        let set: Vec<Arc<dyn Backend>> = images
            .iter()
            .map(|i| Arc::new(MemoryBackend::from_vec(i.clone())) as Arc<dyn Backend>)
            .collect();
        let vol = Volume::open_members(
            set,
            &OpenOptions {
                read_only,
                ..OpenOptions::default()
            },
        )
        .unwrap();
        let mut buf = vec![0u8; bs];
        let got = vol.read_at(&mut buf, 5 * bs as u64).map(|()| buf);
        (got, vol)
    };
    let (got, _) = reopen(true);
    assert_eq!(got.expect("read-only: member 1's complete copy is served"), new);
    let (got, vol) = reopen(false);
    match got {
        Ok(data) => assert!(data == new || data == old, "block 5 reads as neither version"),
        Err(e) => panic!(
            "read-write: block 5 fails after convergence (member 1 held its new version \
             complete): {e}"
        ),
    }
    vol.close().unwrap();
}
