//! Single faults while the process runs (G3/G4): lost, misdirected and torn writes, transient
//! read faults, bit rot — no crash involved. Every test is deterministic and seeded; a failing
//! randomized test prints its seed, and `BLOCKGUARD_SEED=<n>` replays it.
//!
//! What every test holds the engine to, block by block, against a model of the writes:
//! - a read returns exactly the model's content, or an error (`Error::Corrupt` naming a block
//!   of the request, or an I/O error) — never other data;
//! - `extents` reports a hole only for a block that reads back as zeros, and whose model
//!   content is zeros;
//! - `check_blocks` lists exactly the blocks whose read fails; a clean check means every block
//!   reads back correct;
//! - a fault whose bytes end up nowhere (the block's data and its group's metadata are
//!   byte-for-byte what a fault-free run leaves) makes no block fail.
//!
//! `BLOCKGUARD_FULL_SWEEP=1` runs every variant of the single-write-fault sweep instead of a
//! seeded sample (minutes instead of seconds); `BLOCKGUARD_VERBOSE=1` prints every operation of
//! the random read-fault workloads with the faults it met; `BLOCKGUARD_ALL_ERRORS=1` shows every
//! engine error of a failing case instead of the first two.

use blockguard::blockguard_backend::{Backend, FaultBackend, FaultStats, MemoryBackend, ReadFault};
use blockguard::format::VolumeState;
use blockguard::{CorruptionKind, Error, FormatOptions, Geometry, OpenOptions, RecoverOptions, Volume};
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;
use std::collections::{BTreeMap, BTreeSet};
use std::fmt;
use std::io;
use std::ops::Range;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Instant;

const UUID: [u8; 16] = *b"faults-test-uuid";

// ---------------------------------------------------------------------------------------------
// Seeds
// ---------------------------------------------------------------------------------------------

/// The seed of a randomized test: `BLOCKGUARD_SEED` if set, else the test's default.
fn seed(default: u64) -> u64 {
    match std::env::var("BLOCKGUARD_SEED") {
        Ok(s) => s
            .trim()
            .parse()
            .unwrap_or_else(|_| panic!("BLOCKGUARD_SEED={s:?} is not a u64")),
        Err(_) => default,
    }
}

/// Prints how to replay a failing randomized test.
struct SeedGuard {
    test: &'static str,
    seed: u64,
}

impl Drop for SeedGuard {
    fn drop(&mut self) {
        if std::thread::panicking() {
            eprintln!(
                "{} failed with seed {}: replay with BLOCKGUARD_SEED={} cargo test --release -p blockguard --test faults {}",
                self.test, self.seed, self.seed, self.test
            );
        }
    }
}

// ---------------------------------------------------------------------------------------------
// Content, layout
// ---------------------------------------------------------------------------------------------

/// Bytes for version `version` written at `off`: every byte depends on both, so a block's
/// versions differ from each other and from every other block's.
fn pattern(version: u64, off: u64, len: usize) -> Vec<u8> {
    let v = version.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
    let word = |w: u64| {
        let x = v ^ w.wrapping_mul(0xD1B5_4A32_D192_ED03);
        let x = (x ^ (x >> 31)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        x ^ (x >> 29)
    };
    // Byte i is byte (off + i) % 8 of the word numbered (off + i) / 8: a function of the
    // absolute position, so misplaced bytes never match.
    let mut out = Vec::with_capacity(len);
    let mut pos = off;
    while out.len() < len {
        let w = word(pos / 8).to_le_bytes();
        let from = (pos % 8) as usize;
        let n = (8 - from).min(len - out.len());
        out.extend_from_slice(&w[from..from + n]);
        pos += n as u64;
    }
    out
}

fn is_zero(b: &[u8]) -> bool {
    b.iter().all(|&x| x == 0)
}

/// A short fingerprint of a block's content for messages.
fn fp(b: &[u8]) -> String {
    if is_zero(b) {
        return "zeros".into();
    }
    let h = b.iter().fold(0xcbf2_9ce4_8422_2325u64, |h, &x| {
        (h ^ x as u64).wrapping_mul(0x100_0000_01b3)
    });
    format!("{:02x?}..#{:08x}", &b[..4.min(b.len())], h as u32)
}

fn format_opts(bs: u32, blocks: u64) -> FormatOptions {
    let mut f = FormatOptions::with_size(bs as u64 * blocks);
    f.block_size = bs;
    f.uuid = Some(UUID);
    f
}

/// A freshly formatted volume's image and geometry.
fn formatted_image(bs: u32, blocks: u64) -> (Vec<u8>, Geometry) {
    let f = format_opts(bs, blocks);
    let mem = Arc::new(MemoryBackend::new(f.backing_len().unwrap()).unwrap());
    let vol = Volume::format(mem.clone(), &f).unwrap();
    let geo = *vol.geometry();
    vol.close().unwrap();
    (mem.snapshot(), geo)
}

fn session_opts(bs: u32, cache_groups: usize, stage_blocks: usize) -> OpenOptions {
    OpenOptions {
        read_only: false,
        // A group costs 2·B + 256 bytes of cache; 0 still caches one group.
        cache_bytes: cache_groups * (2 * bs as usize + 256),
        stage_bytes: stage_blocks * bs as usize,
        background_commit: false,
        // Dirty bits cleared at every flush: deterministic, and the clearing is exercised.
        dirty_clear_interval: std::time::Duration::ZERO,
        error_policy: None,
        key: None,
        retag_key: None,
        retag_to: None,
    }
}

/// What a backend write touched.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum WriteKind {
    Superblock,
    /// A metadata write starting at `slot` of `group`, `slots` blocks long.
    Meta {
        group: u64,
        slot: usize,
        slots: u64,
    },
    /// Data of blocks `first..first + count` (a zero range if `zero`).
    Data {
        first: u64,
        count: u64,
        zero: bool,
    },
    Other,
}

fn classify(geo: &Geometry, off: u64, len: u64, zero: bool) -> WriteKind {
    let bs = geo.block_size as u64;
    if off < geo.first_group_offset || off >= geo.backup_sb_offset {
        return WriteKind::Superblock;
    }
    let rel = off - geo.first_group_offset;
    let group = rel / geo.group_len();
    let in_group = rel % geo.group_len();
    if !in_group.is_multiple_of(bs) {
        return WriteKind::Other;
    }
    let idx = in_group / bs;
    if idx < 2 {
        return WriteKind::Meta {
            group,
            slot: idx as usize,
            slots: len / bs,
        };
    }
    WriteKind::Data {
        first: group * geo.group_blocks as u64 + idx - 2,
        count: len / bs,
        zero,
    }
}

/// The group whose metadata or data `off` lies in (group 0 for the superblocks).
fn group_at(geo: &Geometry, off: u64) -> u64 {
    if off < geo.first_group_offset {
        return 0;
    }
    ((off - geo.first_group_offset) / geo.group_len()).min(geo.groups - 1)
}

// ---------------------------------------------------------------------------------------------
// A backend wrapper that counts writes and faults exactly one of them
// ---------------------------------------------------------------------------------------------

/// A fault to inject into one write.
#[derive(Clone, Debug, PartialEq, Eq)]
enum WriteFault {
    Lost,
    Misdirect { to: u64, why: String },
    Tear { mask: Vec<bool>, why: String },
}

impl fmt::Display for WriteFault {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            WriteFault::Lost => f.write_str("lost"),
            WriteFault::Misdirect { to, why } => write!(f, "misdirected to {to} ({why})"),
            WriteFault::Tear { mask, why } => {
                let m: String = mask.iter().map(|&k| if k { '1' } else { '0' }).collect();
                write!(f, "torn, sectors kept {m} ({why})")
            }
        }
    }
}

/// One write as issued by the engine: offset, length, zero range or not.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
struct IssuedWrite {
    off: u64,
    len: u64,
    /// A `zero_range`.
    zero: bool,
    /// The bytes written are all zeros (a zero range, or zeros written as data).
    zeros: bool,
}

/// Forwards to a [`FaultBackend`], counting the writes (`write_at`, `write_vectored_at`,
/// `zero_range`) and arming the fault just before write number `at.0`.
#[derive(Debug)]
struct Trigger {
    inner: Arc<FaultBackend>,
    at: Option<(usize, WriteFault)>,
    count: AtomicUsize,
    fired: AtomicBool,
    log: Mutex<Vec<IssuedWrite>>,
}

impl Trigger {
    fn new(inner: Arc<FaultBackend>, at: Option<(usize, WriteFault)>) -> Trigger {
        Trigger {
            inner,
            at,
            count: AtomicUsize::new(0),
            fired: AtomicBool::new(false),
            log: Mutex::new(Vec::new()),
        }
    }

    fn before_write(&self, off: u64, len: u64, zero: bool, zeros: bool) {
        let n = self.count.fetch_add(1, Ordering::SeqCst);
        self.log.lock().unwrap().push(IssuedWrite {
            off,
            len,
            zero,
            zeros,
        });
        if let Some((i, fault)) = &self.at {
            if *i == n {
                self.fired.store(true, Ordering::SeqCst);
                match fault {
                    WriteFault::Lost => self.inner.lose_next_write(),
                    WriteFault::Misdirect { to, .. } => self.inner.misdirect_next_write(*to),
                    WriteFault::Tear { mask, .. } => self.inner.tear_next_write(mask.clone()),
                }
            }
        }
    }

    fn writes(&self) -> Vec<IssuedWrite> {
        self.log.lock().unwrap().clone()
    }
}

impl Backend for Trigger {
    fn len(&self) -> u64 {
        self.inner.len()
    }
    fn read_at(&self, buf: &mut [u8], offset: u64) -> io::Result<()> {
        self.inner.read_at(buf, offset)
    }
    fn write_at(&self, buf: &[u8], offset: u64) -> io::Result<()> {
        self.before_write(offset, buf.len() as u64, false, is_zero(buf));
        self.inner.write_at(buf, offset)
    }
    fn write_vectored_at(&self, bufs: &[&[u8]], offset: u64) -> io::Result<()> {
        let len = bufs.iter().map(|b| b.len() as u64).sum();
        self.before_write(offset, len, false, bufs.iter().all(|b| is_zero(b)));
        self.inner.write_vectored_at(bufs, offset)
    }
    fn flush(&self) -> io::Result<()> {
        self.inner.flush()
    }
    fn start_writeback(&self, offset: u64, len: u64) -> io::Result<()> {
        self.inner.start_writeback(offset, len)
    }
    fn zero_range(&self, offset: u64, len: u64) -> io::Result<()> {
        self.before_write(offset, len, true, true);
        self.inner.zero_range(offset, len)
    }
    fn zero_ranges(&self, offset: u64, len: u64) -> io::Result<Vec<Range<u64>>> {
        self.inner.zero_ranges(offset, len)
    }
    fn alignment(&self) -> usize {
        self.inner.alignment()
    }
    fn name(&self) -> String {
        "faulty".into()
    }
}

// ---------------------------------------------------------------------------------------------
// The model
// ---------------------------------------------------------------------------------------------

type Content = Arc<Vec<u8>>;

/// What every block may hold, per the writes the engine acknowledged.
#[derive(Clone)]
struct Model {
    bs: usize,
    /// Contents an in-session read of the block may return: one, unless an error left it
    /// open whether the last write of the block took effect.
    now: Vec<Vec<Content>>,
    /// Contents the block may hold after a reopen if a flush failed: those at the last
    /// successful flush and every one placed in `now` since.
    hist: Vec<Vec<Content>>,
    /// A flush or close failed: durability of everything since the last good flush is open.
    flush_failed: bool,
    /// Checking a live session: every acknowledged write must read back, failed flush or not.
    session: bool,
}

fn push_unique(v: &mut Vec<Content>, c: Content) {
    if !v.iter().any(|x| **x == *c) {
        v.push(c);
    }
}

impl Model {
    fn new(bs: u32, blocks: u64) -> Model {
        let zero: Content = Arc::new(vec![0; bs as usize]);
        Model {
            bs: bs as usize,
            now: vec![vec![zero.clone()]; blocks as usize],
            hist: vec![vec![zero]; blocks as usize],
            flush_failed: false,
            session: false,
        }
    }

    /// Records a write of `data` at `off`; `ok` false if the engine refused it with an error
    /// that leaves open whether it took effect.
    fn write(&mut self, data: &[u8], off: u64, ok: bool) {
        let bs = self.bs as u64;
        let end = off + data.len() as u64;
        let mut b = off / bs;
        while b * bs < end {
            let start = b * bs;
            let lo = off.max(start);
            let hi = end.min(start + bs);
            let piece = &data[(lo - off) as usize..(hi - off) as usize];
            let mut next = Vec::new();
            for c in &self.now[b as usize] {
                let mut v = (**c).clone();
                v[(lo - start) as usize..(hi - start) as usize].copy_from_slice(piece);
                push_unique(&mut next, Arc::new(v));
            }
            let slot = &mut self.now[b as usize];
            if ok {
                *slot = next.clone();
            } else {
                for c in next.iter().cloned() {
                    push_unique(slot, c);
                }
            }
            for c in next {
                push_unique(&mut self.hist[b as usize], c);
            }
            b += 1;
        }
    }

    fn flushed(&mut self, ok: bool) {
        if ok {
            self.hist = self.now.clone();
        } else {
            self.flush_failed = true;
        }
    }

    /// Contents block `b` may hold after a reopen (or now, in a session).
    fn after_reopen(&self, b: u64) -> &[Content] {
        if self.flush_failed && !self.session {
            &self.hist[b as usize]
        } else {
            &self.now[b as usize]
        }
    }
}

fn describe(cands: &[Content]) -> String {
    let v: Vec<String> = cands.iter().map(|c| fp(c)).collect();
    v.join(" or ")
}

// ---------------------------------------------------------------------------------------------
// Workloads
// ---------------------------------------------------------------------------------------------

#[derive(Clone, Debug)]
enum Op {
    Write { off: u64, len: u64, version: u64 },
    ZeroData { off: u64, len: u64 },
    WriteZeroes { off: u64, len: u64 },
    Read { off: u64, len: u64 },
    Flush,
}

/// Blocks where faults do the most harm: next to metadata, at sector-pair and group edges.
fn hot_blocks(geo: &Geometry) -> Vec<u64> {
    let per = geo.tags_per_sector() as u64;
    let mut v = BTreeSet::new();
    for g in 0..geo.groups {
        let first = geo.first_block(g);
        let n = geo.blocks_in_group(g) as u64;
        for i in [0, 1, 2, n.saturating_sub(2), n - 1] {
            v.insert(first + i.min(n - 1));
        }
        let mut k = per;
        while k < n {
            v.insert(first + k - 1);
            v.insert(first + k);
            k += per;
        }
    }
    v.into_iter().collect()
}

fn gen_workload(rng: &mut ChaCha8Rng, geo: &Geometry, n_ops: usize) -> Vec<Op> {
    let bs = geo.block_size as u64;
    let blocks = geo.data_blocks;
    let size = blocks * bs;
    let hot = hot_blocks(geo);
    let per = geo.tags_per_sector() as u64;
    let mut ops = Vec::new();
    let mut version = 1u64;
    let pick = |rng: &mut ChaCha8Rng| -> u64 {
        if rng.random_bool(0.5) {
            hot[rng.random_range(0..hot.len())]
        } else {
            rng.random_range(0..blocks)
        }
    };
    // Start with data in every group, so later faults have something to destroy.
    for g in 0..geo.groups {
        let first = geo.first_block(g);
        let n = (geo.blocks_in_group(g) as u64).min(8);
        ops.push(Op::Write {
            off: first * bs,
            len: n * bs,
            version,
        });
        version += 1;
    }
    while ops.len() < n_ops {
        let r = rng.random_range(0..100);
        let b = pick(rng);
        let op = match r {
            // Aligned writes, now and then long ones crossing pairs and groups.
            0..=29 => {
                let n = if rng.random_bool(0.1) {
                    rng.random_range(1..=2 * per)
                } else {
                    rng.random_range(1..=6)
                };
                let n = n.min(blocks - b);
                Op::Write {
                    off: b * bs,
                    len: n * bs,
                    version,
                }
            }
            // Unaligned writes: read-modify-write of the edge blocks.
            30..=49 => {
                let off = (b * bs + rng.random_range(1..bs)).min(size - 1);
                let len = rng.random_range(1..=2 * bs + 7).min(size - off);
                Op::Write { off, len, version }
            }
            // Zeros written as data (not discarded).
            50..=54 => {
                let n = rng.random_range(1..=4).min(blocks - b);
                Op::ZeroData {
                    off: b * bs,
                    len: n * bs,
                }
            }
            // Whole-block zeroing (the blocks become unwritten), runs of 1 to 6.
            55..=66 => {
                let n = rng.random_range(1..=6).min(blocks - b);
                Op::WriteZeroes {
                    off: b * bs,
                    len: n * bs,
                }
            }
            // Zeroing with partial edges.
            67..=71 => {
                let off = (b * bs + rng.random_range(0..bs)).min(size - 1);
                let len = rng.random_range(1..=3 * bs).min(size - off);
                Op::WriteZeroes { off, len }
            }
            72..=91 => {
                let off = (b * bs + rng.random_range(0..bs)).min(size - 1);
                let len = rng.random_range(1..=3 * bs).min(size - off);
                Op::Read { off, len }
            }
            _ => Op::Flush,
        };
        version += 1;
        ops.push(op);
    }
    ops
}

/// What a workload's session saw.
struct SessionOutcome {
    model: Model,
    /// Engine errors, in order (allowed, but listed in failure messages).
    errors: Vec<String>,
    /// Broken promises seen during the session (wrong data, hole over data, ...).
    failures: Vec<String>,
}

/// Checks a read's result against the model: `Ok` must match, an error must be a corruption
/// error naming a block of the request, or an I/O error.
fn check_read(model: &Model, off: u64, buf: &[u8], res: &Result<(), Error>, what: &str) -> Option<String> {
    let bs = model.bs as u64;
    let end = off + buf.len() as u64;
    match res {
        Ok(()) => {
            let mut b = off / bs;
            while b * bs < end {
                let start = b * bs;
                let (lo, hi) = (off.max(start), end.min(start + bs));
                let got = &buf[(lo - off) as usize..(hi - off) as usize];
                let cands = &model.now[b as usize];
                let ok = cands
                    .iter()
                    .any(|c| &c[(lo - start) as usize..(hi - start) as usize] == got);
                if !ok {
                    return Some(format!(
                        "{what}: read of {off}+{} returned wrong data for block {b} (bytes {}..{}): \
                         expected {}, got {}",
                        buf.len(),
                        lo - start,
                        hi - start,
                        describe(cands),
                        fp(got)
                    ));
                }
                b += 1;
            }
            None
        }
        Err(Error::Corrupt { block, .. }) if (off / bs..end.div_ceil(bs)).contains(block) => None,
        Err(Error::Io { .. }) => None,
        Err(e) => Some(format!("{what}: read of {off}+{} failed oddly: {e}", buf.len())),
    }
}

/// Runs `ops` on `backend` (opened with `opts`), then flushes, reads every block in session
/// and closes.
fn run_session(backend: Arc<dyn Backend>, geo: &Geometry, ops: &[Op], opts: &OpenOptions) -> SessionOutcome {
    let bs = geo.block_size;
    let mut model = Model::new(bs, geo.data_blocks);
    let mut errors = Vec::new();
    let mut failures = Vec::new();
    let vol = match Volume::open(backend, opts) {
        Ok(v) => v,
        Err(e) => {
            failures.push(format!("open for the workload failed: {e}"));
            return SessionOutcome {
                model,
                errors,
                failures,
            };
        }
    };
    for (n, op) in ops.iter().enumerate() {
        match *op {
            Op::Write { off, len, version } => {
                let data = pattern(version, off, len as usize);
                let r = vol.write_at(&data, off);
                note_write(&mut model, &mut errors, &data, off, r, n, "write");
            }
            Op::ZeroData { off, len } => {
                let data = vec![0u8; len as usize];
                let r = vol.write_at(&data, off);
                note_write(&mut model, &mut errors, &data, off, r, n, "write of zeros");
            }
            Op::WriteZeroes { off, len } => {
                let data = vec![0u8; len as usize];
                let r = vol.write_zeroes(off, len);
                note_write(&mut model, &mut errors, &data, off, r, n, "write_zeroes");
            }
            Op::Read { off, len } => {
                let mut buf = vec![0u8; len as usize];
                let r = vol.read_at(&mut buf, off);
                if let Err(e) = &r {
                    errors.push(format!("op {n} read {off}+{len}: {e}"));
                }
                if let Some(f) = check_read(&model, off, &buf, &r, &format!("op {n} (in session)")) {
                    failures.push(f);
                }
            }
            Op::Flush => {
                let r = vol.flush();
                if let Err(e) = &r {
                    errors.push(format!("op {n} flush: {e}"));
                }
                model.flushed(r.is_ok());
            }
        }
    }
    let r = vol.flush();
    if let Err(e) = &r {
        errors.push(format!("final flush: {e}"));
    }
    model.flushed(r.is_ok());
    // Every promise, in session before close (the metadata cache has long been evicted).
    let mut v = Verdict::default();
    let in_session = Model {
        session: true,
        ..model.clone()
    };
    check_volume(
        &vol,
        geo,
        &in_session,
        "in session, before close",
        &BTreeSet::new(),
        &mut v,
    );
    failures.extend(v.failures);
    if let Err(e) = vol.close() {
        errors.push(format!("close: {e}"));
        model.flushed(false);
    }
    SessionOutcome {
        model,
        errors,
        failures,
    }
}

fn note_write(
    model: &mut Model,
    errors: &mut Vec<String>,
    data: &[u8],
    off: u64,
    r: Result<(), Error>,
    n: usize,
    what: &str,
) {
    match r {
        Ok(()) => model.write(data, off, true),
        Err(e) => {
            errors.push(format!("op {n} {what} {off}+{}: {e}", data.len()));
            // A refusal before anything was staged changes nothing; other errors may come
            // after the write was staged.
            if !matches!(
                e,
                Error::Failed { .. } | Error::ReadOnly { .. } | Error::OutOfRange { .. }
            ) {
                model.write(data, off, false);
            }
        }
    }
}

// ---------------------------------------------------------------------------------------------
// Verification after reopen
// ---------------------------------------------------------------------------------------------

/// What one reopen found.
#[derive(Default)]
struct Verdict {
    failures: Vec<String>,
    /// Blocks whose read failed.
    failing: BTreeSet<u64>,
    /// A read-write open would do more than a read-only one: warnings, or left in use.
    open_differs: bool,
}

/// Opens `image` (read-only or read-write) and checks every promise for every block.
/// `untouched`: blocks whose data and group metadata are byte-identical to a fault-free run's,
/// which must read back correct.
fn verify_image(
    image: &[u8],
    geo: &Geometry,
    model: &Model,
    read_only: bool,
    untouched: &BTreeSet<u64>,
) -> Verdict {
    let mode = if read_only { "read-only" } else { "read-write" };
    let mut v = Verdict::default();
    let mem = Arc::new(MemoryBackend::from_vec(image.to_vec()));
    let opts = OpenOptions {
        read_only,
        ..session_opts(geo.block_size, 1, 4)
    };
    let vol = match Volume::open(mem, &opts) {
        Ok(vol) => vol,
        Err(e) => {
            v.failures.push(format!("{mode} reopen failed: {e}"));
            return v;
        }
    };
    v.open_differs = !vol.warnings().is_empty() || vol.superblock().state != VolumeState::Clean;
    check_volume(&vol, geo, model, mode, untouched, &mut v);
    v
}

/// [`verify_image`] read-only, then read-write where that open does more than a read-only one
/// (recovery of a volume left in use, repair of a superblock).
fn verify_reopened(image: &[u8], geo: &Geometry, model: &Model, untouched: &BTreeSet<u64>) -> Vec<String> {
    let ro = verify_image(image, geo, model, true, untouched);
    let mut out = ro.failures;
    if ro.open_differs || out.iter().any(|f| f.contains("reopen failed")) {
        out.extend(verify_image(image, geo, model, false, untouched).failures);
    }
    out
}

/// The per-block promises on an open volume (see the module documentation), group by group:
/// each group's blocks are read, then its extents and its check are taken right away, so all
/// of them see the same metadata (the engine may evict its cached metadata between groups,
/// and in a session a cached state can differ from the disk's after a write fault).
fn check_volume(
    vol: &Volume,
    geo: &Geometry,
    model: &Model,
    mode: &str,
    untouched: &BTreeSet<u64>,
    v: &mut Verdict,
) {
    for g in 0..geo.groups {
        check_group(vol, geo, model, mode, untouched, g, v);
    }
}

fn check_group(
    vol: &Volume,
    geo: &Geometry,
    model: &Model,
    mode: &str,
    untouched: &BTreeSet<u64>,
    g: u64,
    v: &mut Verdict,
) {
    let bs = geo.block_size as u64;
    let first = geo.first_block(g);
    let end = first + geo.blocks_in_group(g) as u64;
    let mut buf = vec![0u8; bs as usize];
    let mut read_ok: BTreeMap<u64, bool> = BTreeMap::new();
    let mut failing = BTreeSet::new();
    let mut meta_damaged = BTreeSet::new();
    for b in first..end {
        let cands = model.after_reopen(b);
        match vol.read_at(&mut buf, b * bs) {
            Ok(()) => {
                read_ok.insert(b, is_zero(&buf));
                if !cands.iter().any(|c| **c == buf) {
                    v.failures.push(format!(
                        "{mode}: block {b} read back WRONG DATA: expected {}, got {}",
                        describe(cands),
                        fp(&buf)
                    ));
                }
            }
            Err(e) => {
                failing.insert(b);
                match &e {
                    Error::Corrupt { block, kind, .. } if *block == b => {
                        if *kind == CorruptionKind::MetadataDamaged {
                            meta_damaged.insert(b);
                        }
                    }
                    Error::Io { .. } => {}
                    other => v.failures.push(format!(
                        "{mode}: read of block {b} failed with an odd error: {other}"
                    )),
                }
                if untouched.contains(&b) {
                    v.failures.push(format!(
                        "{mode}: block {b} fails although its data and its group's metadata are \
                         byte-identical to a fault-free run's: {e}"
                    ));
                }
            }
        }
    }
    match vol.extents(first * bs, (end - first) * bs) {
        Ok(extents) => {
            for e in extents.iter().filter(|e| !e.allocated) {
                for b in e.offset / bs..(e.offset + e.len).div_ceil(bs) {
                    let cands = model.after_reopen(b);
                    let model_zero = cands.iter().any(|c| is_zero(c));
                    match read_ok.get(&b) {
                        Some(true) if model_zero => {}
                        Some(true) => v.failures.push(format!(
                            "{mode}: extents reports block {b} as a hole and it reads as zeros, but \
                             it was written with {}",
                            describe(cands)
                        )),
                        Some(false) => v.failures.push(format!(
                            "{mode}: extents reports block {b} as a hole, but it reads as data"
                        )),
                        None => v.failures.push(format!(
                            "{mode}: extents reports block {b} as a hole (reads as zeros), but its \
                             read fails; model says {}",
                            describe(cands)
                        )),
                    }
                }
            }
        }
        Err(e) => v
            .failures
            .push(format!("{mode}: extents of group {g} failed: {e}")),
    }
    let problems = match vol.check_blocks(first, end - first) {
        Ok(p) => p,
        Err(e) => {
            v.failures
                .push(format!("{mode}: check_blocks of group {g} failed: {e}"));
            v.failing.extend(failing);
            return;
        }
    };
    let listed: BTreeSet<u64> = problems.iter().map(|p| p.block).collect();
    if listed != failing {
        let missed: Vec<_> = failing.difference(&listed).collect();
        let extra: Vec<_> = listed.difference(&failing).collect();
        v.failures.push(format!(
            "{mode}: check_blocks disagrees with reads: failing reads it does not list {missed:?}, \
             listed blocks that read fine {extra:?}"
        ));
    }
    match vol.check_metadata(g, 1) {
        Ok(meta) => {
            // A scar (a damaged sector whose header proves its generation) covers blocks that
            // still read where their data matches their tag: it counts for the blocks that
            // fail, not against the ones that read.
            let mut covered = BTreeSet::new();
            let mut untrusted = BTreeSet::new();
            for p in &meta {
                covered.extend(p.first_block..p.first_block + p.blocks as u64);
                if !p.scarred {
                    untrusted.extend(p.first_block..p.first_block + p.blocks as u64);
                }
            }
            // In a session whose volume failed, blocks of the failed commit are served from
            // its stage, whatever the metadata says.
            if !model.flush_failed {
                let uncovered: Vec<_> = meta_damaged.difference(&covered).collect();
                if !uncovered.is_empty() {
                    v.failures.push(format!(
                        "{mode}: blocks {uncovered:?} fail as MetadataDamaged but check_metadata \
                         lists no problem covering them"
                    ));
                }
                let readable: Vec<_> = untrusted.iter().filter(|b| read_ok.contains_key(b)).collect();
                if !readable.is_empty() {
                    v.failures.push(format!(
                        "{mode}: check_metadata calls the tags of blocks {readable:?} untrustworthy, \
                         yet they read fine"
                    ));
                }
            }
            if meta.is_empty() && problems.is_empty() && !failing.is_empty() {
                v.failures
                    .push(format!("{mode}: check is clean but blocks {failing:?} fail"));
            }
        }
        Err(e) => v
            .failures
            .push(format!("{mode}: check_metadata of group {g} failed: {e}")),
    }
    v.failing.extend(failing);
}

/// Blocks whose data and whose group's two metadata blocks are identical in both images.
fn untouched_blocks(geo: &Geometry, a: &[u8], b: &[u8]) -> BTreeSet<u64> {
    let bs = geo.block_size as usize;
    let mut out = BTreeSet::new();
    for g in 0..geo.groups {
        let m = geo.meta_offset(g, 0) as usize;
        if a[m..m + 2 * bs] != b[m..m + 2 * bs] {
            continue;
        }
        let first = geo.first_block(g);
        for blk in first..first + geo.blocks_in_group(g) as u64 {
            let d = geo.data_offset(blk) as usize;
            if a[d..d + bs] == b[d..d + bs] {
                out.insert(blk);
            }
        }
    }
    out
}

// ---------------------------------------------------------------------------------------------
// 1. The single-write-fault sweep
// ---------------------------------------------------------------------------------------------

/// A workload and the volume it runs on.
struct Scenario {
    geo: Geometry,
    image: Vec<u8>,
    ops: Vec<Op>,
    opts: OpenOptions,
}

fn scenario(seed: u64, bs: u32, blocks: u64, n_ops: usize) -> Scenario {
    let mut rng = ChaCha8Rng::seed_from_u64(seed);
    let (image, geo) = formatted_image(bs, blocks);
    let ops = gen_workload(&mut rng, &geo, n_ops);
    let cache_groups = rng.random_range(0..=2usize);
    let stage_blocks = rng.random_range(2..=6usize);
    Scenario {
        geo,
        image,
        ops,
        opts: session_opts(bs, cache_groups, stage_blocks),
    }
}

/// Every fault variant of write `w`.
fn variants(geo: &Geometry, w: &IssuedWrite, rng: &mut ChaCha8Rng) -> Vec<WriteFault> {
    let bs = geo.block_size as u64;
    let mut v = vec![WriteFault::Lost];
    let kind = classify(geo, w.off, w.len, w.zero);
    let g = group_at(geo, w.off);
    let mut targets: Vec<(u64, String)> = vec![
        (geo.meta_offset(g, 0), format!("slot 0 of its group {g}")),
        (geo.meta_offset(g, 1), format!("slot 1 of its group {g}")),
        (w.off + bs, "one block further".into()),
    ];
    if w.off >= bs {
        targets.push((w.off - bs, "one block earlier".into()));
    }
    if geo.groups > 1 {
        let h = (g + 1 + rng.random_range(0..geo.groups - 1)) % geo.groups;
        let slot = rng.random_range(0..2);
        targets.push((
            geo.meta_offset(h, slot),
            format!("slot {slot} of another group {h}"),
        ));
    }
    for (to, why) in targets {
        if to != w.off && to + w.len <= geo.backing_len {
            v.push(WriteFault::Misdirect { to, why });
        }
    }
    let sectors = (w.len as usize).div_ceil(512);
    if sectors > 1 {
        match kind {
            WriteKind::Meta { .. } | WriteKind::Superblock => {
                for k in 0..sectors {
                    let mut mask = vec![false; sectors];
                    mask[k] = true;
                    v.push(WriteFault::Tear {
                        mask,
                        why: format!("only sector {k} kept"),
                    });
                    if sectors > 2 {
                        let mut mask = vec![true; sectors];
                        mask[k] = false;
                        v.push(WriteFault::Tear {
                            mask,
                            why: format!("all but sector {k} kept"),
                        });
                    }
                }
            }
            _ => {
                for _ in 0..2 {
                    let mut mask: Vec<bool> = (0..sectors).map(|_| rng.random_bool(0.5)).collect();
                    if mask.iter().all(|&k| k) {
                        mask[rng.random_range(0..sectors)] = false;
                    }
                    v.push(WriteFault::Tear {
                        mask,
                        why: "random sectors".into(),
                    });
                }
            }
        }
    }
    v
}

struct RunResult {
    outcome: SessionOutcome,
    image: Vec<u8>,
    writes: Vec<IssuedWrite>,
    fired: bool,
}

fn run_variant(s: &Scenario, fault: Option<(usize, WriteFault)>) -> RunResult {
    let fb = Arc::new(FaultBackend::from_image(s.image.clone()));
    let trigger = Arc::new(Trigger::new(fb.clone(), fault));
    let outcome = run_session(trigger.clone(), &s.geo, &s.ops, &s.opts);
    RunResult {
        outcome,
        image: fb.live_image(),
        writes: trigger.writes(),
        fired: trigger.fired.load(Ordering::SeqCst),
    }
}

/// Runs the fault-free workload, then the workload once per sampled single-write fault, and
/// checks every promise after each. Returns the failures, one line each.
fn sweep(test: &'static str, s: &Scenario, seed: u64, budget: usize) -> Vec<Failure> {
    let t0 = Instant::now();
    let clean = run_variant(s, None);
    let none = BTreeSet::new();
    let mut failures = Vec::new();
    let mut baseline = clean.outcome.failures.clone();
    baseline.extend(clean.outcome.errors.iter().map(|e| format!("engine error: {e}")));
    baseline.extend(verify_reopened(&clean.image, &s.geo, &clean.outcome.model, &none));
    assert!(
        baseline.is_empty(),
        "{test} (seed {seed}): the fault-free run already fails:\n{}",
        baseline.join("\n")
    );
    let mut rng = ChaCha8Rng::seed_from_u64(seed ^ 0x5eed);
    let mut all: Vec<(usize, WriteFault)> = Vec::new();
    for (i, w) in clean.writes.iter().enumerate() {
        for f in variants(&s.geo, w, &mut rng) {
            all.push((i, f));
        }
    }
    let total = all.len();
    let full = std::env::var_os("BLOCKGUARD_FULL_SWEEP").is_some();
    if !full && all.len() > budget {
        // Stratified: every (kind of write, kind of fault) gets its share, round-robin over
        // the strata, each stratum's variants in seeded random order.
        use rand::seq::SliceRandom;
        let mut strata: BTreeMap<String, Vec<(usize, WriteFault)>> = BTreeMap::new();
        for (i, f) in all {
            let w = &clean.writes[i];
            let kind = classify(&s.geo, w.off, w.len, w.zero);
            let key = format!("{} | {}", write_class(&kind, w), fault_class(&f));
            strata.entry(key).or_default().push((i, f));
        }
        let mut strata: Vec<Vec<(usize, WriteFault)>> = strata.into_values().collect();
        for v in &mut strata {
            v.shuffle(&mut rng);
        }
        all = Vec::new();
        while all.len() < budget {
            for v in &mut strata {
                if let Some(x) = v.pop() {
                    all.push(x);
                }
            }
        }
        all.truncate(budget);
        all.sort_by_key(|(i, _)| *i);
    }
    let ran = all.len();
    for (i, fault) in all {
        let w = clean.writes[i];
        let kind = classify(&s.geo, w.off, w.len, w.zero);
        let r = run_variant(s, Some((i, fault.clone())));
        let label = format!("write #{i} ({kind:?} at {}+{}) {fault}", w.off, w.len);
        if r.writes.get(..i) != clean.writes.get(..i) || !r.fired {
            failures.push(Failure {
                class: "harness | nondeterministic run".into(),
                text: format!(
                    "{label}: the engine's writes before the fault differ from the fault-free run's"
                ),
            });
            continue;
        }
        let untouched = untouched_blocks(&s.geo, &clean.image, &r.image);
        let mut found: Vec<String> = r.outcome.failures.clone();
        found.extend(verify_reopened(&r.image, &s.geo, &r.outcome.model, &untouched));
        let class_of_fault = format!("{} | {}", fault_class(&fault), write_class(&kind, &w));
        for f in found {
            let errs = summarize_errors(&r.outcome.errors);
            failures.push(Failure {
                class: format!("{class_of_fault} | {}", symptom(&f)),
                text: format!("{label}: {f}{errs}"),
            });
        }
    }
    eprintln!(
        "{test} (seed {seed}): {} writes, {ran} of {total} fault variants run in {:.1?}, {} failures",
        clean.writes.len(),
        t0.elapsed(),
        failures.len()
    );
    failures
}

/// The first engine errors of a session, shortened, for a failure message.
fn summarize_errors(errors: &[String]) -> String {
    if errors.is_empty() {
        return String::new();
    }
    let n = if std::env::var("BLOCKGUARD_ALL_ERRORS").is_ok() {
        usize::MAX
    } else {
        2
    };
    let short: Vec<String> = errors
        .iter()
        .take(n)
        .map(|e| e.chars().take(200).collect())
        .collect();
    format!(
        " [{} engine errors in session, first: {}]",
        errors.len(),
        short.join("; ")
    )
}

/// One broken promise: a class to group it by, and the whole story.
struct Failure {
    class: String,
    text: String,
}

fn fault_class(f: &WriteFault) -> String {
    let strip = |s: &str| -> String { s.chars().filter(|c| !c.is_ascii_digit()).collect() };
    match f {
        WriteFault::Lost => "lost".into(),
        WriteFault::Misdirect { why, .. } => format!("misdirected to {}", strip(why).replace("  ", " ")),
        WriteFault::Tear { why, .. } => format!("torn ({})", strip(why).replace("  ", " ")),
    }
}

fn write_class(kind: &WriteKind, w: &IssuedWrite) -> &'static str {
    match kind {
        WriteKind::Superblock => "superblock write",
        WriteKind::Meta { slots: 2, .. } => "metadata write (both slots)",
        WriteKind::Meta { .. } => "metadata write (one slot)",
        WriteKind::Data { zero: true, .. } => "zero_range of data",
        WriteKind::Data { .. } if w.zeros => "data write of zeros",
        WriteKind::Data { .. } => "data write",
        WriteKind::Other => "other write",
    }
}

fn symptom(f: &str) -> String {
    let when = if f.contains("in session") {
        "in session"
    } else {
        "after reopen"
    };
    let what = if f.contains("byte-identical") {
        "a block untouched by the fault fails"
    } else if f.contains("WRONG DATA") || f.contains("wrong data") {
        "WRONG DATA"
    } else if f.contains("extents reports") {
        "extents reports a hole where data was written"
    } else if f.contains("check_blocks disagrees") {
        "check_blocks disagrees with reads"
    } else if f.contains("check is clean") {
        "clean check although blocks fail"
    } else if f.contains("check_metadata") {
        "check_metadata disagrees with reads"
    } else if f.contains("reopen failed") {
        "reopen fails"
    } else if f.contains("odd") {
        "unexpected kind of error"
    } else {
        "other"
    };
    format!("{what} ({when})")
}

/// Panics with a summary of `failures`: each class with its count and first example, then
/// the first few failures in full.
fn report(test: &str, seed: u64, failures: &[Failure]) {
    if failures.is_empty() {
        return;
    }
    let mut classes: BTreeMap<&str, (usize, &str)> = BTreeMap::new();
    for f in failures {
        classes.entry(&f.class).or_insert((0, &f.text)).0 += 1;
    }
    let mut msg = format!(
        "{test} (seed {seed}): {} failures in {} classes (fault | write | symptom):\n",
        failures.len(),
        classes.len()
    );
    for (class, (n, example)) in &classes {
        let example: String = example
            .chars()
            .take(if std::env::var("BLOCKGUARD_ALL_ERRORS").is_ok() {
                100_000
            } else {
                600
            })
            .collect();
        msg += &format!("\n  {n:4} × {class}\n         e.g. {example}\n");
    }
    panic!("{msg}");
}

/// The single-write-fault sweep: a seeded workload (aligned and unaligned writes, zeros written
/// and discarded, reads, flushes; a tiny metadata cache and a stage of a few blocks, so commits
/// happen mid-workload and metadata is reloaded), replayed once per write the engine issues
/// with exactly that write lost, misdirected (to its group's slot 0 or 1, one block either
/// way, another group's slot) or torn (every single-sector-kept and single-sector-dropped
/// mask of a metadata or superblock write, random masks of a data write). After each: every
/// promise in session, then after a read-only (and, if it differs, read-write) reopen.
#[test]
fn single_write_fault_sweep_512() {
    let seed = seed(512);
    let _g = SeedGuard {
        test: "single_write_fault_sweep_512",
        seed,
    };
    // Five groups of 62 blocks (one sector pair each), the last one partial; three workloads
    // (each with its own cache and stage size), every fault variant of every write.
    let mut failures = Vec::new();
    for k in 0..3 {
        let s = scenario(seed + k, 512, 62 * 4 + 20, 70);
        failures.extend(
            sweep("single_write_fault_sweep_512", &s, seed + k, 1500)
                .into_iter()
                .map(|f| Failure {
                    text: format!("[seed {}] {}", seed + k, f.text),
                    ..f
                }),
        );
    }
    report("single_write_fault_sweep_512", seed, &failures);
}

/// The sweep of [`single_write_fault_sweep_512`] with 4096-byte blocks: eight sector pairs per
/// group, so torn metadata writes leave some pairs new and others old.
#[test]
fn single_write_fault_sweep_4096() {
    let seed = seed(4096);
    let _g = SeedGuard {
        test: "single_write_fault_sweep_4096",
        seed,
    };
    // Two full groups of 496 blocks (8 sector pairs each) and a partial third of 70: a seeded
    // sample of the variants, stratified by kind of write and kind of fault.
    let s = scenario(seed, 4096, 496 * 2 + 70, 70);
    let failures = sweep("single_write_fault_sweep_4096", &s, seed, 400);
    report("single_write_fault_sweep_4096", seed, &failures);
}

// ---------------------------------------------------------------------------------------------
// Minimal reproductions of what the sweep finds
// ---------------------------------------------------------------------------------------------

/// Makes the first write starting at `at` vanish (misdirected past the end of the store, which
/// stores nothing); the flag says whether it happened.
fn lose_write_at(fb: &FaultBackend, at: u64) -> Arc<AtomicBool> {
    let fired = Arc::new(AtomicBool::new(false));
    let f = fired.clone();
    let nowhere = fb.len() + (1 << 40);
    fb.misdirect_writes_with(move |off, _| (off == at && !f.swap(true, Ordering::SeqCst)).then_some(nowhere));
    fired
}

/// Misdirects the first write starting at `at` to `to`.
fn misdirect_write_at(fb: &FaultBackend, at: u64, to: u64) -> Arc<AtomicBool> {
    let fired = Arc::new(AtomicBool::new(false));
    let f = fired.clone();
    fb.misdirect_writes_with(move |off, _| (off == at && !f.swap(true, Ordering::SeqCst)).then_some(to));
    fired
}

/// Gives the `nth` read (0 = the first) overlapping `range` the fault `fault(offset)`; the
/// counter says how many overlapping reads there were, the flag whether the fault was given.
fn read_fault_at(
    fb: &FaultBackend,
    range: Range<u64>,
    nth: usize,
    fault: impl Fn(u64, usize) -> ReadFault + Send + Sync + 'static,
) -> (Arc<AtomicUsize>, Arc<AtomicBool>) {
    let seen = Arc::new(AtomicUsize::new(0));
    let fired = Arc::new(AtomicBool::new(false));
    let (s, f) = (seen.clone(), fired.clone());
    fb.read_faults_with(move |off, len| {
        if off < range.end && range.start < off + len as u64 && s.fetch_add(1, Ordering::SeqCst) == nth {
            f.store(true, Ordering::SeqCst);
            return Some(fault(off, len));
        }
        None
    });
    (seen, fired)
}

/// A formatted volume on a fault backend, and its geometry.
fn fresh_fault_volume(bs: u32, blocks: u64) -> (Arc<FaultBackend>, Geometry) {
    let f = format_opts(bs, blocks);
    let fb = Arc::new(FaultBackend::new(f.backing_len().unwrap()).unwrap());
    let vol = Volume::format(fb.clone(), &f).unwrap();
    let geo = *vol.geometry();
    vol.close().unwrap();
    (fb, geo)
}

fn read_block(vol: &Volume, geo: &Geometry, b: u64) -> Result<Vec<u8>, Error> {
    let bs = geo.block_size as u64;
    let mut buf = vec![0u8; bs as usize];
    vol.read_at(&mut buf, b * bs).map(|()| buf)
}

/// Bug reproduction: a data write lost by the disk is read back, in the same session and
/// before the next flush, as the block's previous version — no error. The engine accepts the
/// older brother's tag for blocks of a commit not yet flushed, which only a crash needs.
#[test]
fn lost_data_write_is_not_read_back_as_the_previous_version() {
    let (fb, geo) = fresh_fault_volume(4096, 64);
    let bs = 4096u64;
    // One block of stage: every write commits at once (metadata, flush, data), no flush after.
    let vol = Volume::open(fb.clone(), &session_opts(4096, 1, 1)).unwrap();
    let b = 5;
    let v1 = pattern(1, b * bs, bs as usize);
    let v2 = pattern(2, b * bs, bs as usize);
    vol.write_at(&v1, b * bs).unwrap();
    vol.flush().unwrap();
    let lost = lose_write_at(&fb, geo.data_offset(b));
    vol.write_at(&v2, b * bs).unwrap();
    assert!(lost.load(Ordering::SeqCst), "the data write of v2 was not issued");
    match read_block(&vol, &geo, b) {
        Ok(got) if got == v2 => {}
        Ok(got) if got == v1 => panic!(
            "block {b}: the write of v2 was lost by the disk, and the read returned the previous \
             version v1 without an error"
        ),
        Ok(got) => panic!("block {b}: read returned unknown data {}", fp(&got)),
        Err(e) => assert_eq!(e.corrupt_block(), Some(b), "{e}"),
    }
}

/// Bug reproduction: the stale version read after a lost data write is merged into a partial
/// write, which then commits under a fresh, valid tag: the corruption becomes permanent and
/// undetectable (reads and `check` are clean after reopen).
#[test]
fn lost_data_write_then_partial_write_never_persists_wrong_data() {
    let (fb, geo) = fresh_fault_volume(4096, 64);
    let bs = 4096u64;
    let vol = Volume::open(fb.clone(), &session_opts(4096, 1, 1)).unwrap();
    let b = 5;
    let v1 = pattern(1, b * bs, bs as usize);
    let mut v2 = pattern(2, b * bs, bs as usize);
    vol.write_at(&v1, b * bs).unwrap();
    vol.flush().unwrap();
    let lost = lose_write_at(&fb, geo.data_offset(b));
    vol.write_at(&v2, b * bs).unwrap();
    assert!(lost.load(Ordering::SeqCst));
    fb.clear_faults();
    // Ten bytes into the middle of the block: read-modify-write.
    let patch = [0xAAu8; 10];
    let rmw = vol.write_at(&patch, b * bs + 100);
    v2[100..110].copy_from_slice(&patch);
    let mut v1_patched = v1.clone();
    v1_patched[100..110].copy_from_slice(&patch);
    vol.flush().unwrap();
    vol.close().unwrap();
    let vol = Volume::open(fb.clone(), &session_opts(4096, 1, 1)).unwrap();
    let got = read_block(&vol, &geo, b);
    let problems = vol.check_blocks(0, geo.data_blocks).unwrap();
    match got {
        Ok(got) if got == v2 => {}
        Ok(got) => panic!(
            "block {b} reads back {} after reopen (check_blocks: {problems:?}); the partial write \
             returned {rmw:?}; expected v2+patch or an error",
            if got == v1_patched {
                "v1+patch: the lost write's previous version, merged and committed under a valid tag"
                    .to_string()
            } else {
                fp(&got)
            }
        ),
        Err(e) => assert!(
            problems.iter().any(|p| p.block == b),
            "{e}, yet check_blocks does not list block {b}"
        ),
    }
}

/// Bug reproduction: one transient stale read of a block written by a commit not yet flushed
/// returns the block's previous version (the older brother's tag matches it), without an
/// error and without the re-read that a failed verification triggers.
#[test]
fn stale_data_read_before_flush_is_not_returned() {
    let (fb, geo) = fresh_fault_volume(4096, 64);
    let bs = 4096u64;
    let vol = Volume::open(fb.clone(), &session_opts(4096, 1, 1)).unwrap();
    let b = 9;
    let v1 = pattern(1, b * bs, bs as usize);
    let v2 = pattern(2, b * bs, bs as usize);
    vol.write_at(&v1, b * bs).unwrap();
    vol.flush().unwrap();
    vol.write_at(&v2, b * bs).unwrap(); // committed, data written, not flushed
    let at = geo.data_offset(b);
    let (_, fired) = read_fault_at(&fb, at..at + bs, 0, |_, _| ReadFault::Stale);
    let got = read_block(&vol, &geo, b);
    assert!(fired.load(Ordering::SeqCst), "the read did not reach the backend");
    match got {
        Ok(got) if got == v2 => {}
        Ok(got) => panic!(
            "block {b}: a single transient stale read returned {} instead of v2, without an error",
            if got == v1 {
                "the previous version v1".into()
            } else {
                fp(&got)
            }
        ),
        Err(e) => panic!("block {b}: a single transient read fault made the read fail: {e}"),
    }
}

/// Bug reproduction: zeros (a zero range or zeros written as data) misdirected onto a group's
/// two metadata blocks make the group look never written: every block of it whose data the same
/// write zeroed reads back as zeros without an error and `extents` calls it a hole; when those
/// were all the group's written blocks (as here), `check` is clean too — written data silently
/// gone. (Any other bytes there are caught: a sector must carry its checksum.)
#[test]
fn zeros_misdirected_onto_both_metadata_blocks_do_not_erase_a_group_silently() {
    let mut failures = Vec::new();
    for as_data in [false, true] {
        let (fb, geo) = fresh_fault_volume(512, 62 * 2);
        let bs = 512u64;
        let vol = Volume::open(fb.clone(), &session_opts(512, 1, 64)).unwrap();
        // Group 0 holds data in its first four blocks.
        let data = pattern(7, 0, 4 * bs as usize);
        vol.write_at(&data, 0).unwrap();
        vol.flush().unwrap();
        // Six blocks of zeros for group 1, landing on group 0's slot 0 instead: slot 0, slot 1
        // and data blocks 0..4 of group 0 become zeros.
        let first = geo.first_block(1);
        let fired = misdirect_write_at(&fb, geo.data_offset(first), geo.meta_offset(0, 0));
        if as_data {
            vol.write_at(&vec![0u8; 6 * bs as usize], first * bs).unwrap();
        } else {
            vol.write_zeroes(first * bs, 6 * bs).unwrap();
        }
        vol.flush().unwrap();
        assert!(fired.load(Ordering::SeqCst));
        vol.close().unwrap();
        let how = if as_data {
            "zeros written as data"
        } else {
            "a zero range"
        };
        let vol = Volume::open(fb.clone(), &session_opts(512, 1, 64)).unwrap();
        let problems = vol.check_blocks(0, geo.data_blocks).unwrap();
        let meta = vol.check_metadata(0, geo.groups).unwrap();
        let holes = vol.extents(0, 4 * bs).unwrap();
        for b in 0..4 {
            let want = &data[(b * bs) as usize..((b + 1) * bs) as usize];
            match read_block(&vol, &geo, b) {
                Ok(got) if got == want => {}
                Ok(got) => failures.push(format!(
                    "{how} misdirected onto group 0's metadata: block {b} reads back as {} without \
                     an error; check_blocks lists {problems:?}, check_metadata {meta:?}, extents \
                     say {holes:?}",
                    fp(&got)
                )),
                Err(_) if problems.iter().any(|p| p.block == b) => {}
                Err(e) => failures.push(format!("{how}: block {b} fails ({e}) but check_blocks misses it")),
            }
        }
    }
    assert!(failures.is_empty(), "{}", failures.join("\n"));
}

/// Bug reproduction: recovery after a killed process (the volume left in use, every write
/// on the disk) trusts a single read of each block it settles. One transient stale read makes
/// it revert a block's tag to the older brother's, so the block — intact on disk — fails every
/// read from then on: a transient fault written back as permanent damage.
#[test]
fn recovery_does_not_write_back_a_transient_data_read_fault() {
    let mut failures = Vec::new();
    for (fault, name) in [(ReadFault::Stale, "stale"), (ReadFault::Zeros, "zeros")] {
        let (fb, geo) = fresh_fault_volume(4096, 64);
        let bs = 4096u64;
        // Dirty bits kept until close: the killed session leaves group 0 marked unsettled, so
        // recovery reads its blocks (cleared at each flush, it would have nothing to settle).
        let keep_dirty = OpenOptions {
            dirty_clear_interval: std::time::Duration::MAX,
            ..session_opts(4096, 1, 64)
        };
        let vol = Volume::open(fb.clone(), &keep_dirty).unwrap();
        // Block 3 is written twice (a stale read returns v1), block 4 once (zeros match the
        // older brother's "unwritten").
        let b3 = pattern(1, 3 * bs, bs as usize);
        vol.write_at(&b3, 3 * bs).unwrap();
        vol.flush().unwrap();
        let b3 = pattern(2, 3 * bs, bs as usize);
        let b4 = pattern(3, 4 * bs, bs as usize);
        vol.write_at(&b3, 3 * bs).unwrap();
        vol.write_at(&b4, 4 * bs).unwrap();
        vol.flush().unwrap();
        // The process dies: everything is on the disk, the volume is left in use.
        std::mem::forget(vol);
        let target = if fault == ReadFault::Stale { 3 } else { 4 };
        let at = geo.data_offset(target);
        let (_, fired) = read_fault_at(&fb, at..at + bs, 0, move |_, _| fault);
        let vol = Volume::open(fb.clone(), &session_opts(4096, 1, 64)).unwrap();
        let report = vol.recovery_at_open().cloned();
        assert!(
            fired.load(Ordering::SeqCst),
            "recovery did not read block {target}"
        );
        vol.close().unwrap();
        fb.clear_faults();
        let vol = Volume::open(fb.clone(), &session_opts(4096, 1, 64)).unwrap();
        for (b, want) in [(3, &b3), (4, &b4)] {
            match read_block(&vol, &geo, b) {
                Ok(got) if &got == want => {}
                Ok(got) => failures.push(format!("{name}: block {b} reads wrong data {}", fp(&got))),
                Err(e) => failures.push(format!(
                    "{name} read fault during recovery: block {b}, intact on disk, now fails: \
                     {e} (recovery report: {report:?})"
                )),
            }
        }
    }
    assert!(failures.is_empty(), "{}", failures.join("\n"));
}

// ---------------------------------------------------------------------------------------------
// 2. Transient read faults
// ---------------------------------------------------------------------------------------------

/// A volume with history on a fault backend (so stale reads return real older versions):
/// group 0's metadata written once (its last write covered both slots), group 1's twice (last
/// write: slot 1), group 2's three times (last write: slot 0); the data of most written blocks
/// has several versions.
struct Populated {
    fb: Arc<FaultBackend>,
    geo: Geometry,
    model: Model,
}

fn populate(bs: u32, blocks: u64, seed: u64) -> Populated {
    let f = format_opts(bs, blocks);
    let fb = Arc::new(
        FaultBackend::new(f.backing_len().unwrap())
            .unwrap()
            .with_seed(seed),
    );
    let vol = Volume::format(fb.clone(), &f).unwrap();
    let geo = *vol.geometry();
    vol.close().unwrap();
    assert!(geo.groups >= 3);
    let bsz = bs as u64;
    let per = geo.tags_per_sector() as u64;
    let mut model = Model::new(bs, geo.data_blocks);
    // A stage larger than a round: one commit per round, at its flush.
    let vol = Volume::open(fb.clone(), &session_opts(bs, 1, 1024)).unwrap();
    let mut version = 100;
    for round in 0..3u64 {
        for g in round..3 {
            let first = geo.first_block(g);
            let n = geo.blocks_in_group(g) as u64;
            let mut runs = vec![(first, 6), (first + 10 + round, 1)];
            if per + 2 < n {
                runs.push((first + per - 1, 3)); // across the first pair boundary
            }
            for (b, count) in runs {
                let data = pattern(version, b * bsz, (count * bsz) as usize);
                vol.write_at(&data, b * bsz).unwrap();
                model.write(&data, b * bsz, true);
                version += 1;
            }
        }
        vol.flush().unwrap();
        model.flushed(true);
    }
    vol.close().unwrap();
    Populated { fb, geo, model }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Target {
    /// A data block written three times.
    Data(u64),
    /// Both metadata blocks of a group (a metadata read covers both).
    Meta(u64),
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum FaultKind {
    Zeros,
    /// The bytes one group further (or back): another block's data, another group's metadata.
    Misdirected,
    Stale,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum During {
    Read,
    /// An unaligned write into the block (read-modify-write), then flush.
    Rmw,
    /// A whole-block write into the group, then flush (the commit reads the metadata).
    Commit,
    Extents,
    CheckBlocks,
    CheckMetadata,
}

/// Runs `during` on a fresh open of `p` with one transient read fault of `kind` on the `nth`
/// read of `target`. Returns `None` if there was no such read (nothing tested), else the
/// broken promises.
fn read_fault_case(
    p: &mut Populated,
    target: Target,
    kind: FaultKind,
    during: During,
    nth: usize,
) -> Option<Vec<String>> {
    let geo = p.geo;
    let bs = geo.block_size as u64;
    let glen = geo.group_len();
    let (range, group) = match target {
        Target::Data(b) => (geo.data_offset(b)..geo.data_offset(b) + bs, geo.group_of(b).0),
        Target::Meta(g) => (geo.meta_offset(g, 0)..geo.meta_offset(g, 0) + 2 * bs, g),
    };
    let backing = geo.backing_len;
    let fault = move |off: u64, len: usize| match kind {
        FaultKind::Zeros => ReadFault::Zeros,
        FaultKind::Stale => ReadFault::Stale,
        FaultKind::Misdirected if off + glen + len as u64 <= backing => ReadFault::From(off + glen),
        FaultKind::Misdirected => ReadFault::From(off - glen),
    };
    let vol = Volume::open(p.fb.clone(), &session_opts(geo.block_size, 1, 1024)).unwrap();
    let (seen, fired) = read_fault_at(&p.fb, range, nth, fault);
    let mut out = Vec::new();
    let first = geo.first_block(group);
    let n = geo.blocks_in_group(group) as u64;
    let victim = match target {
        Target::Data(b) => b,
        Target::Meta(_) => first + 1,
    };
    match during {
        During::Read => {
            let (off, len) = match target {
                Target::Data(b) => (b * bs, bs),
                Target::Meta(_) => (first * bs, n * bs),
            };
            let mut buf = vec![0u8; len as usize];
            let r = vol.read_at(&mut buf, off);
            if let Err(e) = &r {
                out.push(format!("read of {off}+{len} failed: {e}"));
            } else if let Some(f) = check_read(&p.model, off, &buf, &r, "read") {
                out.push(f);
            }
        }
        During::Rmw => {
            let data = pattern(7000 + nth as u64, victim * bs + 50, 100);
            match vol.write_at(&data, victim * bs + 50).and_then(|()| vol.flush()) {
                Ok(()) => p.model.write(&data, victim * bs + 50, true),
                Err(e) => {
                    out.push(format!("partial write + flush failed: {e}"));
                    p.model.write(&data, victim * bs + 50, false);
                }
            }
        }
        During::Commit => {
            let b = first + 3;
            let data = pattern(8000 + nth as u64, b * bs, bs as usize);
            match vol.write_at(&data, b * bs).and_then(|()| vol.flush()) {
                Ok(()) => p.model.write(&data, b * bs, true),
                Err(e) => {
                    out.push(format!("write + flush failed: {e}"));
                    p.model.write(&data, b * bs, false);
                }
            }
        }
        During::Extents => match vol.extents(0, geo.data_blocks * bs) {
            Ok(extents) => {
                for e in extents.iter().filter(|e| !e.allocated) {
                    for b in e.offset / bs..(e.offset + e.len) / bs {
                        if !p.model.now[b as usize].iter().any(|c| is_zero(c)) {
                            out.push(format!("extents reports written block {b} as a hole"));
                        }
                    }
                }
            }
            Err(e) => out.push(format!("extents failed: {e}")),
        },
        During::CheckBlocks => match vol.check_blocks(0, geo.data_blocks) {
            Ok(p) if p.is_empty() => {}
            Ok(p) => out.push(format!(
                "check_blocks reports problems on an intact volume: {p:?}"
            )),
            Err(e) => out.push(format!("check_blocks failed: {e}")),
        },
        During::CheckMetadata => match vol.check_metadata(0, geo.groups) {
            Ok(p) if p.is_empty() => {}
            Ok(p) => out.push(format!(
                "check_metadata reports problems on an intact volume: {p:?}"
            )),
            Err(e) => out.push(format!("check_metadata failed: {e}")),
        },
    }
    let fired = fired.load(Ordering::SeqCst);
    if !fired {
        drop(vol);
        p.fb.clear_faults();
        if nth == 0 {
            return Some(vec![format!(
                "the operation never read the target ({} overlapping reads): the case tests nothing",
                seen.load(Ordering::SeqCst)
            )]);
        }
        return None;
    }
    if let Err(e) = vol.close() {
        out.push(format!("close failed: {e}"));
    }
    p.fb.clear_faults();
    // The fault is gone: a fresh open must find every block as written and nothing to report.
    let vol = Volume::open(p.fb.clone(), &session_opts(geo.block_size, 1, 8)).unwrap();
    let mut v = Verdict::default();
    check_volume(
        &vol,
        &geo,
        &p.model,
        "reopened without faults",
        &BTreeSet::new(),
        &mut v,
    );
    out.extend(v.failures);
    if !v.failing.is_empty() {
        out.push(format!(
            "after the transient fault, blocks {:?} fail on a fresh open: the fault was written back",
            v.failing
        ));
    }
    match vol.check_metadata(0, geo.groups) {
        Ok(m) if m.is_empty() => {}
        Ok(m) => out.push(format!("after the transient fault, check_metadata reports {m:?}")),
        Err(e) => out.push(format!("check_metadata failed: {e}")),
    }
    vol.close().unwrap();
    Some(out)
}

fn read_fault_matrix(bs: u32, blocks: u64) {
    let seed = seed(7);
    let _g = SeedGuard {
        test: "transient_read_fault_matrix",
        seed,
    };
    let geo = populate(bs, blocks, seed).geo;
    let mut failures = Vec::new();
    let mut cases = 0;
    let targets = [
        Target::Data(geo.first_block(2) + 1),
        Target::Meta(0),
        Target::Meta(1),
        Target::Meta(2),
    ];
    for target in targets {
        for kind in [FaultKind::Zeros, FaultKind::Misdirected, FaultKind::Stale] {
            let ops: &[During] = match target {
                Target::Data(_) => &[During::Read, During::Rmw, During::CheckBlocks],
                Target::Meta(_) => &[
                    During::Read,
                    During::Rmw,
                    During::Commit,
                    During::Extents,
                    During::CheckBlocks,
                    During::CheckMetadata,
                ],
            };
            for &during in ops {
                for nth in 0..3 {
                    // A fresh volume for every case: the case changes it.
                    let mut p = populate(bs, blocks, seed);
                    if let Some(found) = read_fault_case(&mut p, target, kind, during, nth) {
                        cases += 1;
                        for f in found {
                            failures.push(Failure {
                                class: format!(
                                    "{kind:?} read of {target:?} | during {during:?} | read #{nth}"
                                ),
                                text: format!(
                                    "{bs}-byte blocks, {kind:?} read fault on read #{nth} of {target:?} \
                                     during {during:?}: {f}"
                                ),
                            });
                        }
                    }
                }
            }
        }
    }
    eprintln!(
        "transient read faults, {bs}-byte blocks: {cases} cases, {} failures",
        failures.len()
    );
    report("transient_read_fault_matrix", seed, &failures);
}

/// One transient read fault (zeros, another place's bytes, an older version) on a data block
/// or a group's metadata, during a read, a read-modify-write, a commit, `extents` and `check`:
/// the operation succeeds with correct results, and a fresh open afterwards finds every block
/// intact (nothing bad was written back).
#[test]
fn transient_read_fault_matrix_512() {
    read_fault_matrix(512, 62 * 3 + 20);
}

#[test]
fn transient_read_fault_matrix_4096() {
    read_fault_matrix(4096, 496 * 2 + 70);
}

/// Faults injected per read in a workload: never wrong data; an operation may fail only if
/// at least two faults hit it; afterwards, with the faults gone, every block is intact.
fn random_read_faults(bs: u32, blocks: u64, seed: u64, p_fault: f64) -> Vec<Failure> {
    let mut rng = ChaCha8Rng::seed_from_u64(seed);
    let p = populate(bs, blocks, seed);
    let geo = p.geo;
    let ops = gen_workload(&mut rng, &geo, 120);
    let mut model = p.model.clone();
    let opts = session_opts(bs, rng.random_range(0..=2), rng.random_range(2..=6));
    let vol = Volume::open(p.fb.clone(), &opts).unwrap();
    p.fb.set_read_fault_rate(p_fault).unwrap();
    let injected = |s: FaultStats| s.zeroed_reads + s.misdirected_reads + s.stale_reads;
    let mut out = Vec::new();
    let mut fail = |class: &str, text: String| {
        out.push(Failure {
            class: format!("random read faults | {class}"),
            text: format!("{bs}-byte blocks, fault rate {p_fault}, workload seed {seed}: {text}"),
        })
    };
    let mut total = 0;
    let mut op_failed = false;
    for (n, op) in ops.iter().enumerate() {
        let before = injected(p.fb.stats());
        let (res, what): (Result<(), Error>, String) = match *op {
            Op::Write { off, len, version } => {
                let data = pattern(version, off, len as usize);
                let r = vol.write_at(&data, off);
                let ok = r.is_ok();
                if ok || !matches!(r, Err(Error::Failed { .. })) {
                    model.write(&data, off, ok);
                }
                (r, format!("write {off}+{len}"))
            }
            Op::ZeroData { off, len } => {
                let data = vec![0u8; len as usize];
                let r = vol.write_at(&data, off);
                let ok = r.is_ok();
                if ok || !matches!(r, Err(Error::Failed { .. })) {
                    model.write(&data, off, ok);
                }
                (r, format!("write of zeros {off}+{len}"))
            }
            Op::WriteZeroes { off, len } => {
                let r = vol.write_zeroes(off, len);
                let ok = r.is_ok();
                if ok || !matches!(r, Err(Error::Failed { .. })) {
                    model.write(&vec![0u8; len as usize], off, ok);
                }
                (r, format!("write_zeroes {off}+{len}"))
            }
            Op::Read { off, len } => {
                let mut buf = vec![0u8; len as usize];
                let r = vol.read_at(&mut buf, off);
                let faults = injected(p.fb.stats()) - before;
                if let Some(f) = check_read(&model, off, &buf, &r, &format!("op {n}")) {
                    fail(
                        "wrong data",
                        format!("{f} ({faults} read faults injected during the read)"),
                    );
                }
                (r, format!("read {off}+{len}"))
            }
            Op::Flush => {
                let r = vol.flush();
                model.flushed(r.is_ok());
                (r, "flush".into())
            }
        };
        let faults = injected(p.fb.stats()) - before;
        total += faults;
        if std::env::var_os("BLOCKGUARD_VERBOSE").is_some() {
            eprintln!("op {n} {what}: {faults} faults -> {res:?}");
        }
        if let Err(e) = res {
            op_failed = true;
            if faults <= 1 && !matches!(e, Error::Failed { .. }) {
                fail(
                    "an operation failed under at most one transient fault",
                    format!("op {n} ({what}) failed with {faults} read faults injected during it: {e}"),
                );
            }
        }
    }
    p.fb.clear_faults();
    let r = vol.flush();
    model.flushed(r.is_ok());
    if let Err(e) = vol.close() {
        if !op_failed {
            fail(
                "close failed",
                format!("close failed after a session without errors: {e}"),
            );
        }
        model.flushed(false);
    }
    let reopened = Volume::open(p.fb.clone(), &session_opts(bs, 1, 8)).unwrap();
    let mut v = Verdict::default();
    check_volume(
        &reopened,
        &geo,
        &model,
        "reopened without faults",
        &BTreeSet::new(),
        &mut v,
    );
    for f in v.failures {
        fail(&symptom(&f), f);
    }
    if !v.failing.is_empty() {
        fail(
            "transient faults written back",
            format!(
                "after {total} transient read faults, blocks {:?} fail on a fresh open",
                v.failing
            ),
        );
    }
    out
}

/// Transient read faults at random (rate 2 %, 5 %, 10 %) during seeded workloads on 512- and
/// 4096-byte volumes: never wrong data, no error from an operation that met at most one fault,
/// and, once the faults stop, every block intact after a reopen.
#[test]
fn random_read_faults_during_a_workload() {
    let seed = seed(99);
    let _g = SeedGuard {
        test: "random_read_faults_during_a_workload",
        seed,
    };
    let mut failures = Vec::new();
    for k in 0..6 {
        let (bs, blocks) = if k % 2 == 0 {
            (512, 62 * 3 + 20)
        } else {
            (4096, 496 * 2 + 70)
        };
        let p = [0.02, 0.05, 0.1][k as usize % 3];
        failures.extend(random_read_faults(bs, blocks, seed + k, p));
    }
    report("random_read_faults_during_a_workload", seed, &failures);
}

// ---------------------------------------------------------------------------------------------
// 3. Damage: bit rot in metadata and data, writes after damage, rebuild, superblock reads
// ---------------------------------------------------------------------------------------------

/// A clean volume image where sector pair `pair` of group 1 holds tags of two commits: v1 of
/// six blocks (first commit: slot 0 generation 1, slot 1 generation 0), then v2 of three of
/// them (slot 1, generation 2: the newest brother). Other pairs and groups hold data too.
struct Fixture {
    image: Vec<u8>,
    geo: Geometry,
    model: Model,
    /// The pair under test: group 1, sector `pair`, blocks `first..first + count`.
    pair: u32,
    first: u64,
    count: u64,
}

fn damage_fixture(bs: u32) -> Fixture {
    let blocks = if bs == 512 { 62 * 3 } else { 496 * 2 + 70 };
    let f = format_opts(bs, blocks);
    let mem = Arc::new(MemoryBackend::new(f.backing_len().unwrap()).unwrap());
    let vol = Volume::format(mem.clone(), &f).unwrap();
    let geo = *vol.geometry();
    vol.close().unwrap();
    let per = geo.tags_per_sector() as u64;
    let pair = if bs == 512 { 0 } else { 1 };
    let first = geo.first_block(1) + pair as u64 * per;
    let count = geo.tags_in_sector(1, pair) as u64;
    let b = bs as u64;
    let mut model = Model::new(bs, geo.data_blocks);
    let vol = Volume::open(mem.clone(), &session_opts(bs, 1, 4096)).unwrap();
    let put = |vol: &Volume, model: &mut Model, block: u64, n: u64, version: u64| {
        let data = pattern(version, block * b, (n * b) as usize);
        vol.write_at(&data, block * b).unwrap();
        model.write(&data, block * b, true);
    };
    put(&vol, &mut model, 0, 6, 1);
    put(&vol, &mut model, first, 6, 2);
    put(&vol, &mut model, geo.first_block(1), 2, 3); // pair 0 of group 1 (the same pair at 512)
    put(&vol, &mut model, geo.first_block(2), 3, 4);
    vol.flush().unwrap();
    put(&vol, &mut model, first + 1, 3, 5);
    put(&vol, &mut model, 2, 1, 6);
    vol.flush().unwrap();
    model.flushed(true);
    vol.close().unwrap();
    Fixture {
        image: mem.snapshot(),
        geo,
        model,
        pair,
        first,
        count,
    }
}

/// Blocks outside `first..first + count`.
fn all_but(geo: &Geometry, first: u64, count: u64) -> BTreeSet<u64> {
    (0..geo.data_blocks)
        .filter(|b| !(first..first + count).contains(b))
        .collect()
}

/// Opens `image` read-only on a fault backend, checks it, and asserts the open wrote nothing.
fn check_read_only(
    image: &[u8],
    geo: &Geometry,
    model: &Model,
    untouched: &BTreeSet<u64>,
    what: &str,
) -> Verdict {
    let fb = Arc::new(FaultBackend::from_image(image.to_vec()));
    let vol = Volume::open(
        fb.clone(),
        &OpenOptions {
            read_only: true,
            ..session_opts(geo.block_size, 1, 8)
        },
    )
    .unwrap();
    let mut v = Verdict::default();
    check_volume(&vol, geo, model, what, untouched, &mut v);
    drop(vol);
    assert!(
        fb.events().is_empty(),
        "{what}: a read-only session wrote: {:?}",
        fb.events()
    );
    v
}

/// A bit flipped in one metadata sector — the newest brother or the older one: exactly the
/// blocks of that sector pair fail (as `MetadataDamaged`), every other block reads correct,
/// `check_metadata` names exactly that sector. Writes into the pair are refused unless they
/// cover every block of it, and a refused write changes nothing and fails nothing else; a
/// covering write re-establishes the pair. Alternatively `recover --rebuild` re-establishes it
/// from the intact brother, without ever returning wrong data.
#[test]
fn metadata_bit_flip_in_one_sector() {
    for bs in [512u32, 4096] {
        for (slot, which) in [(1usize, "newest"), (0, "older")] {
            let fx = damage_fixture(bs);
            let geo = fx.geo;
            let b = bs as u64;
            let what = format!(
                "{bs}-byte blocks, bit flipped in the {which} brother (slot {slot}) of pair {}",
                fx.pair
            );
            let mut image = fx.image.clone();
            // A byte of the sector's generation: its header check fails, so nothing proves
            // which brother is the newest. (A flip in the body leaves a scar whose generation
            // is proven: tests/scars.rs.)
            let at = geo.meta_offset(1, slot) as usize + fx.pair as usize * 512 + 9;
            image[at] ^= 0x10;
            let others = all_but(&geo, fx.first, fx.count);
            let v = check_read_only(&image, &geo, &fx.model, &others, &what);
            assert!(v.failures.is_empty(), "{what}:\n{}", v.failures.join("\n"));
            let expected: BTreeSet<u64> = (fx.first..fx.first + fx.count).collect();
            assert_eq!(
                v.failing, expected,
                "{what}: the failing blocks should be exactly the pair's"
            );
            {
                let mem = Arc::new(MemoryBackend::from_vec(image.clone()));
                let vol = Volume::open(
                    mem,
                    &OpenOptions {
                        read_only: true,
                        ..session_opts(bs, 1, 8)
                    },
                )
                .unwrap();
                for blk in [fx.first, fx.first + 1, fx.first + fx.count - 1] {
                    match read_block(&vol, &geo, blk) {
                        Err(Error::Corrupt { block, kind, .. }) => {
                            assert_eq!((block, kind), (blk, CorruptionKind::MetadataDamaged), "{what}")
                        }
                        other => panic!("{what}: block {blk}: {other:?}"),
                    }
                }
                let meta = vol.check_metadata(0, geo.groups).unwrap();
                assert_eq!(meta.len(), 1, "{what}: {meta:?}");
                assert_eq!(
                    (
                        meta[0].group,
                        meta[0].sector,
                        meta[0].first_block,
                        meta[0].blocks as u64
                    ),
                    (1, fx.pair, fx.first, fx.count),
                    "{what}"
                );
            }

            // Writes after the damage.
            let mut model = fx.model.clone();
            let fb = Arc::new(FaultBackend::from_image(image.clone()));
            let vol = Volume::open(fb.clone(), &session_opts(bs, 1, 4)).unwrap();
            let refused = |r: Result<(), Error>, op: &str| match r {
                Err(Error::Corrupt { block, kind, .. }) => {
                    assert_eq!(kind, CorruptionKind::MetadataDamaged, "{what}: {op}");
                    assert!(
                        (fx.first..fx.first + fx.count).contains(&block),
                        "{what}: {op} refused naming block {block}, outside the damaged pair"
                    );
                }
                other => panic!("{what}: {op} into the damaged pair was not refused: {other:?}"),
            };
            let one = pattern(50, (fx.first + 2) * b, b as usize);
            refused(vol.write_at(&one, (fx.first + 2) * b), "a one-block write");
            refused(
                vol.write_zeroes((fx.first + 3) * b, 2 * b),
                "write_zeroes of two blocks",
            );
            refused(
                vol.write_at(&vec![9u8; b as usize], fx.first * b - b / 2),
                "a write straddling the pair's first block",
            );
            refused(
                vol.write_at(&vec![9u8; (fx.count * b - 1) as usize], fx.first * b + 1),
                "a write covering all but one byte of the pair",
            );
            // Nothing of the refused writes took effect, nothing else fails, and the volume
            // keeps working.
            assert_eq!(
                read_block(&vol, &geo, fx.first - 1).unwrap(),
                *model.now[(fx.first - 1) as usize][0],
                "{what}: the block before the pair changed"
            );
            let elsewhere = pattern(51, 3 * b, b as usize);
            vol.write_at(&elsewhere, 3 * b).unwrap();
            model.write(&elsewhere, 3 * b, true);
            vol.flush()
                .unwrap_or_else(|e| panic!("{what}: flush after refused writes: {e}"));
            // An unaligned write covering every block of the pair (and parts of its neighbours)
            // re-establishes it.
            let lo = fx.first * b - 100;
            let cover = pattern(52, lo, (fx.count * b + 200) as usize);
            vol.write_at(&cover, lo).unwrap_or_else(|e| {
                panic!("{what}: a write covering the whole damaged pair was refused: {e}")
            });
            model.write(&cover, lo, true);
            vol.flush().unwrap();
            model.flushed(true);
            vol.close().unwrap();
            let all: BTreeSet<u64> = (0..geo.data_blocks).collect();
            let v = check_read_only(
                &fb.live_image(),
                &geo,
                &model,
                &all,
                &format!("{what}, after a covering write"),
            );
            assert!(v.failures.is_empty(), "{}", v.failures.join("\n"));

            // Or: rebuild from the intact brother.
            let mem = Arc::new(MemoryBackend::from_vec(image.clone()));
            let vol = Volume::open(mem.clone(), &session_opts(bs, 1, 4)).unwrap();
            let report = vol.recover(RecoverOptions::rebuild(), |_, _| {}).unwrap();
            assert_eq!(report.damaged.len(), 1, "{what}: {report:?}");
            assert!(report.damaged[0].rebuilt, "{what}: {report:?}");
            vol.close().unwrap();
            let rebuilt = mem.snapshot();
            let v = check_read_only(&rebuilt, &geo, &fx.model, &others, &format!("{what}, rebuilt"));
            assert!(v.failures.is_empty(), "{}", v.failures.join("\n"));
            // The older brother's loss costs nothing; the newest brother's costs the blocks
            // its commit changed (they now fail, never read old data).
            let lost: BTreeSet<u64> = if which == "older" {
                BTreeSet::new()
            } else {
                (fx.first + 1..fx.first + 4).collect()
            };
            assert_eq!(v.failing, lost, "{what}: blocks failing after the rebuild");
        }
    }
}

/// A bit flipped in one data block: that block alone fails, `check` names it; a partial write
/// into it is refused (its old content cannot be verified), a whole-block write heals it.
#[test]
fn data_bit_flip_fails_only_that_block() {
    for bs in [512u32, 4096] {
        let fx = damage_fixture(bs);
        let geo = fx.geo;
        let b = bs as u64;
        let victim = fx.first + 4;
        let mut image = fx.image.clone();
        image[geo.data_offset(victim) as usize + 77] ^= 0x04;
        let what = format!("{bs}-byte blocks, bit flipped in block {victim}");
        let others: BTreeSet<u64> = (0..geo.data_blocks).filter(|&x| x != victim).collect();
        let v = check_read_only(&image, &geo, &fx.model, &others, &what);
        assert!(v.failures.is_empty(), "{}", v.failures.join("\n"));
        assert_eq!(v.failing, BTreeSet::from([victim]), "{what}");
        let mut model = fx.model.clone();
        let fb = Arc::new(FaultBackend::from_image(image));
        let vol = Volume::open(fb.clone(), &session_opts(bs, 1, 4)).unwrap();
        match vol.write_at(&[1, 2, 3], victim * b + 10) {
            Err(e) => assert_eq!(e.corrupt_block(), Some(victim), "{what}: {e}"),
            Ok(()) => panic!("{what}: a partial write into the damaged block was accepted"),
        }
        let whole = pattern(60, victim * b, b as usize);
        vol.write_at(&whole, victim * b).unwrap();
        model.write(&whole, victim * b, true);
        vol.flush().unwrap();
        model.flushed(true);
        vol.close().unwrap();
        let all: BTreeSet<u64> = (0..geo.data_blocks).collect();
        let v = check_read_only(
            &fb.live_image(),
            &geo,
            &model,
            &all,
            &format!("{what}, rewritten"),
        );
        assert!(v.failures.is_empty(), "{}", v.failures.join("\n"));
    }
}

/// One transient fault on a superblock read at open — zeros, an older version, the other
/// copy's bytes — on the primary or the backup, of a volume closed cleanly or left in use by a
/// killed process: the open succeeds, a volume left in use is recovered, every block reads
/// correct, and the superblocks the open may rewrite are sound.
#[test]
fn transient_superblock_read_fault_at_open() {
    for in_use in [false, true] {
        for copy in [0usize, 1] {
            for kind in [FaultKind::Zeros, FaultKind::Stale, FaultKind::Misdirected] {
                let (fb, geo) = fresh_fault_volume(4096, 200);
                let b = 4096u64;
                let mut model = Model::new(4096, geo.data_blocks);
                let vol = Volume::open(fb.clone(), &session_opts(4096, 1, 64)).unwrap();
                for v in 1..=2 {
                    let data = pattern(v, 8 * b, (4 * b) as usize);
                    vol.write_at(&data, 8 * b).unwrap();
                    model.write(&data, 8 * b, true);
                    vol.flush().unwrap();
                }
                model.flushed(true);
                if in_use {
                    std::mem::forget(vol);
                } else {
                    vol.close().unwrap();
                }
                let what = format!(
                    "{kind:?} read of the {} superblock at the open of a volume {}",
                    ["primary", "backup"][copy],
                    if in_use { "left in use" } else { "closed cleanly" }
                );
                let (at, other) = if copy == 0 {
                    (0, geo.backup_sb_offset)
                } else {
                    (geo.backup_sb_offset, 0)
                };
                let (_, fired) = read_fault_at(&fb, at..at + 512, 0, move |_, _| match kind {
                    FaultKind::Zeros => ReadFault::Zeros,
                    FaultKind::Stale => ReadFault::Stale,
                    FaultKind::Misdirected => ReadFault::From(other),
                });
                let vol = Volume::open(fb.clone(), &session_opts(4096, 1, 64))
                    .unwrap_or_else(|e| panic!("{what}: open failed: {e}"));
                assert!(fired.load(Ordering::SeqCst), "{what}: the open did not read it");
                fb.clear_faults();
                if in_use {
                    assert!(
                        vol.recovery_at_open().is_some(),
                        "{what}: the volume was not recovered"
                    );
                }
                let mut v = Verdict::default();
                let all: BTreeSet<u64> = (0..geo.data_blocks).collect();
                check_volume(&vol, &geo, &model, &what, &all, &mut v);
                assert!(v.failures.is_empty(), "{}", v.failures.join("\n"));
                vol.close().unwrap();
                let vol = Volume::open(fb.clone(), &session_opts(4096, 1, 64)).unwrap();
                assert!(
                    vol.warnings().is_empty(),
                    "{what}: superblocks after the session: {:?}",
                    vol.warnings()
                );
                assert!(
                    vol.recovery_at_open().is_none(),
                    "{what}: not closed cleanly afterwards"
                );
                vol.close().unwrap();
            }
        }
    }
}
