//! A deterministic fault-injecting backend: the storage simulator behind the crash and
//! corruption tests (in the spirit of TigerBeetle's and redb's simulated disks).
//!
//! [`FaultBackend`] keeps two images of an in-memory disk:
//! - the **live image**, what reads see (the page cache, in effect), and
//! - the **durable image**, the disk as of the last completed [`Backend::flush`],
//!
//! plus the writes issued since that flush, in issue order ([`FaultBackend::unflushed`]).
//! `zero_range` is treated as a write of zeros everywhere.
//!
//! # Crash model
//! After a power loss, the disk holds the durable image plus **any subset of the unflushed
//! writes, applied in any order** (the device may reorder writes freely until a flush). In the
//! torn-write model each kept write may also land only partly, at 512-byte sector granularity
//! ([`SECTOR_SIZE`]). [`CrashState`] builds such disk images: a chosen one
//! ([`CrashState::crash_image`], [`CrashState::crash_image_torn`]), a random one
//! ([`CrashState::random_crash_image`]), or all of them ([`CrashState::for_each_crash_image`]).
//!
//! Every operation is also appended to a history ([`FaultBackend::events`]), so a test can run a
//! workload once and afterwards examine a crash at *every* point of it
//! ([`FaultBackend::for_each_history_point`], [`FaultBackend::state_at`]) and reopen each crash
//! image on a [`MemoryBackend`](crate::MemoryBackend).
//!
//! # Injected faults
//! Bit rot ([`FaultBackend::flip_bit`]), misdirected writes, lost writes, I/O errors on reads,
//! writes and flushes, and a crash that freezes the backend ([`FaultBackend::crash_now`]).
//! Probabilistic faults draw from a `ChaCha8Rng` seeded by [`FaultBackend::with_seed`], so a
//! given seed and a given sequence of calls always produce the same faults. (Calls racing from
//! several threads reach the generator in an unspecified order, so determinism needs a
//! single-threaded workload.) An injected error is an [`io::Error`] of kind
//! [`io::ErrorKind::Other`] carrying an [`InjectedFault`]; its message is `"injected fault"`.

use crate::{check_range, Backend};
use rand::seq::SliceRandom;
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;
use std::fmt;
use std::io;
use std::ops::Range;
use std::sync::{Arc, Mutex, MutexGuard};

/// Granularity of torn writes: a write may reach the disk partially, but each 512-byte sector it
/// touches is either entirely old or entirely new (what disks guarantee for a sector).
pub const SECTOR_SIZE: usize = 512;

/// Largest alignment a randomly misdirected write keeps (see [`FaultBackend::set_misdirect_rate`]).
const MISDIRECT_GRANULE: u64 = 4096;

/// A write (or a zero range, as zeros) issued but not yet made durable by a flush.
#[derive(Clone, PartialEq, Eq)]
pub struct PendingWrite {
    /// Where the data landed (for a misdirected write, the wrong address).
    pub offset: u64,
    /// The bytes written. Shared, so snapshots of the history are cheap.
    pub data: Arc<[u8]>,
}

impl PendingWrite {
    /// One past the last byte written.
    pub fn end(&self) -> u64 {
        self.offset + self.data.len() as u64
    }

    /// Number of 512-byte sectors the write touches; a partial first or last sector counts.
    /// This is the length of the mask [`CrashState::crash_image_torn`] expects.
    pub fn sector_count(&self) -> usize {
        if self.data.is_empty() {
            return 0;
        }
        let s = SECTOR_SIZE as u64;
        ((self.end() - 1) / s - self.offset / s + 1) as usize
    }

    fn overlaps(&self, other: &PendingWrite) -> bool {
        self.offset < other.end() && other.offset < self.end()
    }

    fn apply(&self, image: &mut [u8]) {
        let start = self.offset as usize;
        image[start..start + self.data.len()].copy_from_slice(&self.data);
    }

    /// Applies only the sectors whose flag in `mask` is true.
    fn apply_torn(&self, image: &mut [u8], mask: &[bool]) {
        let s = SECTOR_SIZE as u64;
        let first = self.offset / s;
        for (i, _) in mask.iter().enumerate().filter(|(_, &keep)| keep) {
            let lo = ((first + i as u64) * s).max(self.offset);
            let hi = ((first + i as u64 + 1) * s).min(self.end());
            let d = (lo - self.offset) as usize..(hi - self.offset) as usize;
            image[lo as usize..hi as usize].copy_from_slice(&self.data[d]);
        }
    }
}

impl fmt::Debug for PendingWrite {
    // The data can be megabytes; its length is what helps when reading a failing test.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("PendingWrite")
            .field("offset", &self.offset)
            .field("len", &self.data.len())
            .finish()
    }
}

/// One entry of the history [`FaultBackend::events`] returns.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Event {
    /// A write that reached the live image (and is pending until the next flush).
    Write {
        /// What was stored, at the address where it landed.
        write: PendingWrite,
        /// The address the caller asked for; differs from `write.offset` when misdirected.
        intended_offset: u64,
        /// True if this came from `zero_range` (then the data is zeros).
        zero_range: bool,
    },
    /// A write that was acknowledged but never stored (a lost write, or a misdirected write
    /// whose target lies wholly outside the store).
    LostWrite {
        /// The address the caller asked for.
        offset: u64,
        /// Its length.
        len: u64,
    },
    /// A write refused with an injected error; nothing was stored.
    WriteFailed {
        /// The address the caller asked for.
        offset: u64,
        /// Its length.
        len: u64,
    },
    /// A completed flush: every earlier write is now durable.
    Flush {
        /// 1 for the first completed flush, 2 for the second, …
        seq: u64,
    },
    /// A flush refused with an injected error; the pending writes stay pending.
    FlushFailed,
    /// A bit flipped by [`FaultBackend::flip_bit`].
    BitFlip {
        /// Byte address.
        offset: u64,
        /// Bit within the byte, 0 = least significant.
        bit: u8,
    },
    /// [`FaultBackend::crash_now`] was called; nothing after it succeeds.
    Crash,
}

impl Event {
    /// True if the event changes what a crash at this point could leave on disk.
    fn changes_crash_state(&self) -> bool {
        matches!(
            self,
            Event::Write { .. } | Event::Flush { .. } | Event::BitFlip { .. }
        )
    }
}

/// The kind of fault an injected [`io::Error`] carries; see [`InjectedFault::of`].
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum InjectedFault {
    /// An error injected by a fault rule (range or probability).
    #[error("injected fault")]
    Error,
    /// The operation came after [`FaultBackend::crash_now`].
    #[error("injected fault: backend crashed")]
    Crashed,
}

impl InjectedFault {
    /// The injected fault behind `err`, or `None` if it is a genuine error (for example an
    /// out-of-range request), so tests can tell the two apart.
    pub fn of(err: &io::Error) -> Option<InjectedFault> {
        err.get_ref()
            .and_then(|e| e.downcast_ref::<InjectedFault>())
            .copied()
    }

    fn into_io(self) -> io::Error {
        io::Error::other(self)
    }
}

/// [`CrashState::for_each_crash_image`] would visit more states than allowed.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
#[error(
    "more than {max_states} distinct crash states from {pending_writes} unflushed writes; \
     sample with random_crash_image instead"
)]
pub struct TooManyCrashStates {
    /// The limit that was exceeded.
    pub max_states: usize,
    /// How many unflushed writes there were.
    pub pending_writes: usize,
}

/// A fault probability outside `0.0..=1.0` (or NaN).
#[derive(Debug, Clone, Copy, PartialEq, thiserror::Error)]
#[error("fault probability {0} is not between 0 and 1")]
pub struct InvalidProbability(pub f64);

fn check_p(p: f64) -> Result<f64, InvalidProbability> {
    if (0.0..=1.0).contains(&p) {
        Ok(p)
    } else {
        Err(InvalidProbability(p))
    }
}

/// Operation and fault counters of a [`FaultBackend`].
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct FaultStats {
    /// `read_at` calls.
    pub reads: u64,
    /// `write_at` and `write_vectored_at` calls.
    pub writes: u64,
    /// `zero_range` calls.
    pub zero_ranges: u64,
    /// `flush` calls.
    pub flushes: u64,
    /// Total faults injected (the sum of the counters below).
    pub injected_faults: u64,
    /// Reads failed with an injected error (crash included).
    pub failed_reads: u64,
    /// Writes and zero ranges failed with an injected error (crash included).
    pub failed_writes: u64,
    /// Flushes failed with an injected error (crash included).
    pub failed_flushes: u64,
    /// Writes acknowledged but not stored.
    pub lost_writes: u64,
    /// Writes stored at the wrong address.
    pub misdirected_writes: u64,
    /// Bits flipped.
    pub bit_flips: u64,
}

/// The possible disk contents after a power loss at one point in time: the durable image and
/// the writes issued since the last completed flush.
#[derive(Clone, PartialEq, Eq)]
pub struct CrashState {
    durable: Vec<u8>,
    pending: Vec<PendingWrite>,
}

impl fmt::Debug for CrashState {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("CrashState")
            .field("len", &self.durable.len())
            .field("pending", &self.pending)
            .finish()
    }
}

impl CrashState {
    /// The disk as of the last completed flush.
    pub fn durable_image(&self) -> &[u8] {
        &self.durable
    }

    /// The writes issued since the last completed flush, in issue order. Indices into this
    /// slice are what the `crash_image*` methods take.
    pub fn unflushed(&self) -> &[PendingWrite] {
        &self.pending
    }

    fn write(&self, i: usize) -> &PendingWrite {
        self.pending.get(i).unwrap_or_else(|| {
            panic!(
                "unflushed write index {i} out of range ({} pending)",
                self.pending.len()
            )
        })
    }

    /// The durable image plus the unflushed writes listed in `keep`, applied in the listed
    /// order (later ones win where they overlap), so any subset in any order is expressible.
    ///
    /// # Panics
    /// If an index is out of range of [`CrashState::unflushed`].
    pub fn crash_image(&self, keep: &[usize]) -> Vec<u8> {
        let mut image = self.durable.clone();
        for &i in keep {
            self.write(i).apply(&mut image);
        }
        image
    }

    /// Like [`CrashState::crash_image`], but each kept write applies only the 512-byte sectors
    /// whose flag is true (`mask.len()` must be the write's
    /// [`sector_count`](PendingWrite::sector_count); sector `k` of the mask is the write's
    /// `k`-th sector counted from the sector holding its first byte).
    ///
    /// # Panics
    /// If an index is out of range or a mask has the wrong length.
    pub fn crash_image_torn(&self, keep: &[(usize, Vec<bool>)]) -> Vec<u8> {
        let mut image = self.durable.clone();
        for (i, mask) in keep {
            let w = self.write(*i);
            assert_eq!(
                mask.len(),
                w.sector_count(),
                "torn mask for unflushed write {i} must have one flag per sector"
            );
            w.apply_torn(&mut image, mask);
        }
        image
    }

    /// A random crash image: each unflushed write is kept with probability 1/2, the kept ones
    /// are applied in a random order, and if `torn`, each kept write lands whole with
    /// probability 1/2 and otherwise with each sector kept with probability 1/2 (a mask of
    /// independent flags alone would almost never keep a long write whole).
    pub fn random_crash_image<R: Rng + ?Sized>(&self, rng: &mut R, torn: bool) -> Vec<u8> {
        let mut keep: Vec<usize> = (0..self.pending.len()).filter(|_| rng.random_bool(0.5)).collect();
        keep.shuffle(rng);
        if !torn {
            return self.crash_image(&keep);
        }
        let torn_keep: Vec<(usize, Vec<bool>)> = keep
            .into_iter()
            .map(|i| {
                let n = self.pending[i].sector_count();
                let mask = if rng.random_bool(0.5) {
                    vec![true; n]
                } else {
                    (0..n).map(|_| rng.random_bool(0.5)).collect()
                };
                (i, mask)
            })
            .collect();
        self.crash_image_torn(&torn_keep)
    }

    /// Calls `f` with every crash image, unless there are more than `max_states` of them, in
    /// which case it calls nothing and fails (so the caller can sample instead). Returns how
    /// many images were visited.
    ///
    /// Every image that any subset of the unflushed writes in any order can produce is visited
    /// at least once, without tearing. Orders that cannot produce anything new are skipped:
    /// - only the relative order of *overlapping* writes matters, so of all orders that agree
    ///   on it, only one (the lexicographically smallest, a Mazurkiewicz-trace normal form) is
    ///   visited;
    /// - a kept write wholly overwritten by writes kept after it changes nothing, so such
    ///   states are skipped (the same image comes from the state without it).
    ///
    /// Ten rewrites of the same block thus give 11 states, not the ≈10 million orders of all
    /// subsets, while ten writes to distinct blocks give 2¹⁰.
    pub fn for_each_crash_image(
        &self,
        max_states: usize,
        mut f: impl FnMut(Vec<u8>),
    ) -> Result<usize, TooManyCrashStates> {
        self.for_each_crash_order(max_states, |order| f(self.crash_image(order)))
    }

    /// The orders behind [`CrashState::for_each_crash_image`]: calls `f` with each list of
    /// unflushed-write indices (in application order) that the enumeration visits, so a failing
    /// test can report which writes made up the image. Same limit and result.
    pub fn for_each_crash_order(
        &self,
        max_states: usize,
        mut f: impl FnMut(&[usize]),
    ) -> Result<usize, TooManyCrashStates> {
        let too_many = TooManyCrashStates {
            max_states,
            pending_writes: self.pending.len(),
        };
        // Any set of pairwise disjoint writes can be kept in every combination, so 2^m states
        // exist for m such writes: a cheap early refusal for large independent batches.
        let m = self.max_disjoint_writes();
        if m >= usize::BITS as usize || (1usize << m) > max_states {
            return Err(too_many);
        }
        // Count first, so that nothing is visited when the limit is exceeded.
        let mut count = 0usize;
        self.walk_orders(|_| {
            count += 1;
            count <= max_states
        });
        if count > max_states {
            return Err(too_many);
        }
        let mut visited = 0usize;
        self.walk_orders(|order| {
            f(order);
            visited += 1;
            true
        });
        Ok(visited)
    }

    /// Size of a largest set of pairwise disjoint unflushed writes (greedy by end address,
    /// which is optimal for intervals).
    fn max_disjoint_writes(&self) -> usize {
        let mut by_end: Vec<(u64, u64)> = self
            .pending
            .iter()
            .filter(|w| !w.data.is_empty())
            .map(|w| (w.end(), w.offset))
            .collect();
        by_end.sort_unstable();
        let (mut count, mut free_from) = (0usize, 0u64);
        for (end, start) in by_end {
            if start >= free_from {
                count += 1;
                free_from = end;
            }
        }
        count
    }

    /// Depth-first walk over the canonical orders (see `for_each_crash_image`); stops early
    /// when `visit` returns false.
    ///
    /// Iterative rather than recursive, because a chain of writes can make the walk as deep as
    /// the number of pending writes. Alongside the order it keeps, for each write in it, the
    /// byte ranges not yet overwritten by writes after it, so the redundancy test is O(1) per
    /// earlier write.
    fn walk_orders(&self, mut visit: impl FnMut(&[usize]) -> bool) {
        let k = self.pending.len();
        let mut seq: Vec<usize> = Vec::new();
        // uncovered[i]: the parts of write seq[i] no later write in `seq` overwrites; never
        // empty, since such orders are not canonical.
        let mut uncovered: Vec<Ranges> = Vec::new();
        // undo[i]: what appending seq[i] changed in `uncovered`, to restore on backtracking.
        let mut undo: Vec<Vec<(usize, Ranges)>> = Vec::new();
        let mut used = vec![false; k];
        // next[d]: the next candidate to try for position d of `seq`.
        let mut next: Vec<usize> = vec![0];
        if !visit(&seq) {
            return;
        }
        while let Some(&start) = next.last() {
            let cand = (start..k).find(|&x| !used[x] && self.may_append(&seq, &uncovered, x));
            let Some(x) = cand else {
                next.pop();
                if let Some(y) = seq.pop() {
                    used[y] = false;
                    uncovered.pop();
                    for (pos, old) in undo.pop().unwrap_or_default() {
                        uncovered[pos] = old;
                    }
                }
                continue;
            };
            if let Some(n) = next.last_mut() {
                *n = x + 1;
            }
            let (lo, hi) = (self.pending[x].offset, self.pending[x].end());
            let mut log = Vec::new();
            for (pos, ranges) in uncovered.iter_mut().enumerate() {
                if ranges.iter().any(|&(a, b)| a < hi && lo < b) {
                    let rest = subtract(ranges, lo, hi);
                    log.push((pos, std::mem::replace(ranges, rest)));
                }
            }
            undo.push(log);
            uncovered.push(vec![(lo, hi)]);
            used[x] = true;
            seq.push(x);
            if !visit(&seq) {
                return;
            }
            next.push(0);
        }
    }

    /// Whether `seq` followed by `x` is a canonical order (see `for_each_crash_image`).
    fn may_append(&self, seq: &[usize], uncovered: &[Ranges], x: usize) -> bool {
        let w = &self.pending[x];
        if w.data.is_empty() {
            return false;
        }
        // Trace normal form (Anisimov–Knuth): `x` commutes with every write after the last one
        // it overlaps, so it could move in front of them; the order is canonical only if none
        // of them has a larger index than `x`.
        let last_dep = seq.iter().rposition(|&y| self.pending[y].overlaps(w));
        let after = last_dep.map_or(0, |j| j + 1);
        if seq[after..].iter().any(|&y| y > x) {
            return false;
        }
        // Redundancy: `x` must not overwrite everything still visible of an earlier write.
        !uncovered.iter().any(|r| match (r.first(), r.last()) {
            (Some(&(first, _)), Some(&(_, last))) => first >= w.offset && last <= w.end(),
            _ => false,
        })
    }

    /// Advances the state past one history event.
    fn replay(&mut self, event: &Event) {
        match event {
            Event::Write { write, .. } => self.pending.push(write.clone()),
            Event::Flush { .. } => {
                for w in self.pending.drain(..) {
                    w.apply(&mut self.durable);
                }
            }
            Event::BitFlip { offset, bit } => flip(&mut self.durable, &mut self.pending, *offset, *bit),
            Event::LostWrite { .. } | Event::WriteFailed { .. } | Event::FlushFailed | Event::Crash => {}
        }
    }
}

/// Flips a bit in an image and in every pending write covering it, so that the bit reads
/// flipped in the live image and in every crash image alike.
fn flip(image: &mut [u8], pending: &mut [PendingWrite], offset: u64, bit: u8) {
    let mask = 1u8 << bit;
    image[offset as usize] ^= mask;
    for w in pending.iter_mut() {
        if w.offset <= offset && offset < w.end() {
            // Copy on write: the history shares this data and must keep what was issued.
            let mut data = w.data.to_vec();
            data[(offset - w.offset) as usize] ^= mask;
            w.data = data.into();
        }
    }
}

/// Sorted, disjoint byte ranges `(start, end)`.
type Ranges = Vec<(u64, u64)>;

/// `ranges` (sorted, disjoint) minus `lo..hi`.
fn subtract(ranges: &[(u64, u64)], lo: u64, hi: u64) -> Ranges {
    let mut out = Vec::with_capacity(ranges.len() + 1);
    for &(a, b) in ranges {
        if b <= lo || a >= hi {
            out.push((a, b));
            continue;
        }
        if a < lo {
            out.push((a, lo));
        }
        if hi < b {
            out.push((hi, b));
        }
    }
    out
}

/// Chooses where a misdirected write lands, if anywhere.
type MisdirectFn = dyn Fn(u64, usize) -> Option<u64> + Send + Sync;

/// Everything behind the lock.
struct Inner {
    live: Vec<u8>,
    /// Durable image and pending writes as of now.
    state: CrashState,
    /// Durable image at the start of the history, for replay.
    initial: Arc<Vec<u8>>,
    events: Vec<Event>,
    flush_seq: u64,
    rng: ChaCha8Rng,
    crashed: bool,
    stats: FaultStats,
    // Fault configuration.
    read_fail_ranges: Vec<Range<u64>>,
    write_fail_ranges: Vec<Range<u64>>,
    fail_next_flush: bool,
    read_error_p: f64,
    write_error_p: f64,
    flush_error_p: f64,
    lose_next: bool,
    lost_p: f64,
    misdirect_next: Option<u64>,
    misdirect_fn: Option<Box<MisdirectFn>>,
    misdirect_p: f64,
}

impl Inner {
    /// Draws from the generator only when the fault is enabled, so enabling one fault does not
    /// shift the random sequence of another that was already configured.
    fn chance(&mut self, p: f64) -> bool {
        p > 0.0 && self.rng.random_bool(p)
    }

    fn inject(&mut self, counter: fn(&mut FaultStats) -> &mut u64, f: InjectedFault) -> io::Error {
        *counter(&mut self.stats) += 1;
        self.stats.injected_faults += 1;
        f.into_io()
    }

    fn random_target(&mut self, offset: u64, len: usize) -> u64 {
        // Keep the write's alignment (up to 4 KiB): a real misdirected write hits another
        // sector or block address, it does not shift the data by a few bytes.
        let granule = if offset == 0 {
            MISDIRECT_GRANULE
        } else {
            (1u64 << offset.trailing_zeros()).min(MISDIRECT_GRANULE)
        };
        let slots = (self.live.len() as u64 - len as u64) / granule + 1;
        if slots <= 1 {
            return offset;
        }
        let mut slot = self.rng.random_range(0..slots);
        if slot * granule == offset {
            slot = (slot + 1) % slots;
        }
        slot * granule
    }

    /// The write path shared by `write_at`, `write_vectored_at` and `zero_range`.
    fn write(&mut self, data: Arc<[u8]>, offset: u64, zero_range: bool) -> io::Result<()> {
        if zero_range {
            self.stats.zero_ranges += 1;
        } else {
            self.stats.writes += 1;
        }
        if self.crashed {
            return Err(self.inject(|s| &mut s.failed_writes, InjectedFault::Crashed));
        }
        let len = data.len() as u64;
        check_range(offset, len, self.live.len() as u64)?;
        if len == 0 {
            // Nothing to store, and an empty pending write would only add crash states.
            return Ok(());
        }
        let hits = |r: &Range<u64>| r.start < offset + len && offset < r.end;
        let p = self.write_error_p;
        if self.write_fail_ranges.iter().any(hits) || self.chance(p) {
            self.events.push(Event::WriteFailed { offset, len });
            return Err(self.inject(|s| &mut s.failed_writes, InjectedFault::Error));
        }
        let p = self.lost_p;
        if std::mem::take(&mut self.lose_next) || self.chance(p) {
            self.stats.lost_writes += 1;
            self.stats.injected_faults += 1;
            self.events.push(Event::LostWrite { offset, len });
            return Ok(());
        }
        let p = self.misdirect_p;
        let target = if let Some(t) = self.misdirect_next.take() {
            Some(t)
        } else if let Some(f) = &self.misdirect_fn {
            f(offset, data.len())
        } else if self.chance(p) {
            Some(self.random_target(offset, data.len()))
        } else {
            None
        };
        let (landed, data) = match target {
            None => (offset, data),
            Some(t) => {
                self.stats.misdirected_writes += 1;
                self.stats.injected_faults += 1;
                let size = self.live.len() as u64;
                if t >= size {
                    self.events.push(Event::LostWrite { offset, len });
                    return Ok(());
                }
                // Truncated at the end of the store, as a drive writing past its last sector
                // would be.
                let fit = (size - t).min(len) as usize;
                let data = if fit == data.len() {
                    data
                } else {
                    Arc::from(&data[..fit])
                };
                (t, data)
            }
        };
        let write = PendingWrite { offset: landed, data };
        write.apply(&mut self.live);
        self.state.pending.push(write.clone());
        self.events.push(Event::Write {
            write,
            intended_offset: offset,
            zero_range,
        });
        Ok(())
    }
}

/// The fault-injecting simulated disk. See the [module documentation](self).
pub struct FaultBackend {
    inner: Mutex<Inner>,
}

impl fmt::Debug for FaultBackend {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let inner = self.lock();
        f.debug_struct("FaultBackend")
            .field("len", &inner.live.len())
            .field("pending", &inner.state.pending.len())
            .field("events", &inner.events.len())
            .field("crashed", &inner.crashed)
            .finish()
    }
}

impl FaultBackend {
    /// A zero-filled simulated disk of `len` bytes, seeded with 0.
    pub fn new(len: u64) -> io::Result<Self> {
        let len = usize::try_from(len)
            .map_err(|_| io::Error::new(io::ErrorKind::InvalidInput, "length exceeds memory"))?;
        Ok(Self::from_image(vec![0; len]))
    }

    /// A simulated disk holding `image`, all of it durable (for example a crash image, to
    /// crash again during recovery), seeded with 0.
    pub fn from_image(image: Vec<u8>) -> Self {
        let inner = Inner {
            live: image.clone(),
            initial: Arc::new(image.clone()),
            state: CrashState {
                durable: image,
                pending: Vec::new(),
            },
            events: Vec::new(),
            flush_seq: 0,
            rng: ChaCha8Rng::seed_from_u64(0),
            crashed: false,
            stats: FaultStats::default(),
            read_fail_ranges: Vec::new(),
            write_fail_ranges: Vec::new(),
            fail_next_flush: false,
            read_error_p: 0.0,
            write_error_p: 0.0,
            flush_error_p: 0.0,
            lose_next: false,
            lost_p: 0.0,
            misdirect_next: None,
            misdirect_fn: None,
            misdirect_p: 0.0,
        };
        Self {
            inner: Mutex::new(inner),
        }
    }

    /// Reseeds the generator behind the probabilistic faults.
    pub fn with_seed(self, seed: u64) -> Self {
        self.lock().rng = ChaCha8Rng::seed_from_u64(seed);
        self
    }

    fn lock(&self) -> MutexGuard<'_, Inner> {
        // A test that panicked while holding the lock leaves consistent data behind (every
        // mutation completes before the guard drops), so poisoning is ignored.
        self.inner.lock().unwrap_or_else(|e| e.into_inner())
    }

    // ---- Crash images -------------------------------------------------------------------

    /// The writes issued since the last completed flush, in issue order.
    pub fn unflushed(&self) -> Vec<PendingWrite> {
        self.lock().state.pending.clone()
    }

    /// The disk as of the last completed flush.
    pub fn durable_image(&self) -> Vec<u8> {
        self.lock().state.durable.clone()
    }

    /// What reads currently see.
    pub fn live_image(&self) -> Vec<u8> {
        self.lock().live.clone()
    }

    /// A snapshot of the current durable image and unflushed writes, to build crash images
    /// from without holding the backend.
    pub fn crash_state(&self) -> CrashState {
        self.lock().state.clone()
    }

    /// See [`CrashState::crash_image`].
    ///
    /// # Panics
    /// If an index is out of range of [`FaultBackend::unflushed`].
    pub fn crash_image(&self, keep: &[usize]) -> Vec<u8> {
        self.lock().state.crash_image(keep)
    }

    /// See [`CrashState::crash_image_torn`].
    ///
    /// # Panics
    /// If an index is out of range or a mask has the wrong length.
    pub fn crash_image_torn(&self, keep: &[(usize, Vec<bool>)]) -> Vec<u8> {
        self.lock().state.crash_image_torn(keep)
    }

    /// See [`CrashState::random_crash_image`].
    pub fn random_crash_image<R: Rng + ?Sized>(&self, rng: &mut R, torn: bool) -> Vec<u8> {
        self.lock().state.random_crash_image(rng, torn)
    }

    /// See [`CrashState::for_each_crash_image`]. Works on a snapshot, so `f` may use the
    /// backend.
    pub fn for_each_crash_image(
        &self,
        max_states: usize,
        f: impl FnMut(Vec<u8>),
    ) -> Result<usize, TooManyCrashStates> {
        self.crash_state().for_each_crash_image(max_states, f)
    }

    // ---- History ------------------------------------------------------------------------

    /// Every operation so far that changed or tried to change the disk, in order.
    pub fn events(&self) -> Vec<Event> {
        self.lock().events.clone()
    }

    /// The crash state right after the first `n_events` events of [`FaultBackend::events`]
    /// (`0` is the start of the history, `events().len()` is now).
    ///
    /// Replays the history from its start: O(image size + bytes written). To visit every
    /// point, [`FaultBackend::for_each_history_point`] is much cheaper.
    ///
    /// # Panics
    /// If `n_events` exceeds the number of events.
    pub fn state_at(&self, n_events: usize) -> CrashState {
        let (initial, events) = self.history();
        assert!(
            n_events <= events.len(),
            "state_at({n_events}) past the {} recorded events",
            events.len()
        );
        let mut state = CrashState {
            durable: initial.as_ref().clone(),
            pending: Vec::new(),
        };
        for e in &events[..n_events] {
            state.replay(e);
        }
        state
    }

    /// Calls `f(n, state)` with the crash state after the first `n` events, for `n = 0` and for
    /// every `n` whose last event changed the possible crash images (writes, flushes, bit
    /// flips; failed and lost operations change nothing). One replay pass in total.
    ///
    /// Typical use: for each point, enumerate or sample crash images, reopen the volume on a
    /// [`MemoryBackend`](crate::MemoryBackend) holding each, and check the invariants.
    pub fn for_each_history_point(&self, mut f: impl FnMut(usize, &CrashState)) {
        let (initial, events) = self.history();
        let mut state = CrashState {
            durable: initial.as_ref().clone(),
            pending: Vec::new(),
        };
        f(0, &state);
        for (i, e) in events.iter().enumerate() {
            if e.changes_crash_state() {
                state.replay(e);
                f(i + 1, &state);
            }
        }
    }

    /// Restarts the history at the present, to bound its memory in long workloads: the start
    /// image becomes the current durable image and the history the current unflushed writes.
    pub fn forget_history(&self) {
        let mut inner = self.lock();
        inner.initial = Arc::new(inner.state.durable.clone());
        inner.events = inner
            .state
            .pending
            .iter()
            .map(|w| Event::Write {
                write: w.clone(),
                intended_offset: w.offset,
                zero_range: false,
            })
            .collect();
    }

    fn history(&self) -> (Arc<Vec<u8>>, Vec<Event>) {
        let inner = self.lock();
        (inner.initial.clone(), inner.events.clone())
    }

    // ---- Injected faults ----------------------------------------------------------------

    /// Flips bit `bit` (0–7) of the byte at `offset` on the medium: in the live and durable
    /// images and in every unflushed write covering it, so it reads flipped now and after any
    /// crash (bit rot).
    pub fn flip_bit(&self, offset: u64, bit: u8) -> io::Result<()> {
        if bit > 7 {
            return Err(io::Error::new(
                io::ErrorKind::InvalidInput,
                format!("bit {bit} is not in 0..8"),
            ));
        }
        let mut inner = self.lock();
        check_range(offset, 1, inner.live.len() as u64)?;
        let Inner { live, state, .. } = &mut *inner;
        flip(live, &mut [], offset, bit);
        flip(&mut state.durable, &mut state.pending, offset, bit);
        inner.stats.bit_flips += 1;
        inner.stats.injected_faults += 1;
        inner.events.push(Event::BitFlip { offset, bit });
        Ok(())
    }

    /// Makes the next write (or zero range) land at `to_offset` instead of its own address, in
    /// the live image and in the crash accounting alike. Data running past the end of the
    /// store is cut off; if `to_offset` lies past the end, nothing is stored at all.
    pub fn misdirect_next_write(&self, to_offset: u64) {
        self.lock().misdirect_next = Some(to_offset);
    }

    /// Misdirects each write with probability `p` to a random address with the same
    /// alignment as the intended one (up to 4 KiB), never the intended one itself unless the
    /// store has room for nothing else.
    pub fn set_misdirect_rate(&self, p: f64) -> Result<(), InvalidProbability> {
        self.lock().misdirect_p = check_p(p)?;
        Ok(())
    }

    /// Misdirects writes as `f(intended_offset, len)` decides: `Some(target)` lands the write
    /// there, `None` leaves it alone. Replaces any earlier rule; takes precedence over
    /// [`FaultBackend::set_misdirect_rate`]. The rule runs with the backend locked, so it must
    /// not call the backend.
    pub fn misdirect_writes_with(&self, f: impl Fn(u64, usize) -> Option<u64> + Send + Sync + 'static) {
        self.lock().misdirect_fn = Some(Box::new(f));
    }

    /// Makes the next write (or zero range) succeed without storing anything, in neither the
    /// live nor the durable image. (A real lost write may stay visible in the page cache until
    /// evicted; modelling it as never stored makes it detectable on the very next read.)
    pub fn lose_next_write(&self) {
        self.lock().lose_next = true;
    }

    /// Loses each write with probability `p` (see [`FaultBackend::lose_next_write`]).
    pub fn set_lost_write_rate(&self, p: f64) -> Result<(), InvalidProbability> {
        self.lock().lost_p = check_p(p)?;
        Ok(())
    }

    /// Fails every read overlapping `range` (a latent sector error), until
    /// [`FaultBackend::clear_faults`].
    pub fn fail_reads_at(&self, range: Range<u64>) {
        self.lock().read_fail_ranges.push(range);
    }

    /// Fails every write or zero range overlapping `range`, storing nothing, until
    /// [`FaultBackend::clear_faults`].
    pub fn fail_writes_at(&self, range: Range<u64>) {
        self.lock().write_fail_ranges.push(range);
    }

    /// Fails the next flush; the writes it would have made durable stay unflushed.
    pub fn fail_next_flush(&self) {
        self.lock().fail_next_flush = true;
    }

    /// Fails each read, write and flush with the given probabilities.
    pub fn set_error_rate(&self, read_p: f64, write_p: f64, flush_p: f64) -> Result<(), InvalidProbability> {
        let (r, w, f) = (check_p(read_p)?, check_p(write_p)?, check_p(flush_p)?);
        let mut inner = self.lock();
        inner.read_error_p = r;
        inner.write_error_p = w;
        inner.flush_error_p = f;
        Ok(())
    }

    /// Removes every configured fault (rates, ranges, one-shot faults, misdirection rule). Does
    /// not undo a crash or a flipped bit.
    pub fn clear_faults(&self) {
        let mut inner = self.lock();
        inner.read_fail_ranges.clear();
        inner.write_fail_ranges.clear();
        inner.fail_next_flush = false;
        inner.read_error_p = 0.0;
        inner.write_error_p = 0.0;
        inner.flush_error_p = 0.0;
        inner.lose_next = false;
        inner.lost_p = 0.0;
        inner.misdirect_next = None;
        inner.misdirect_fn = None;
        inner.misdirect_p = 0.0;
    }

    /// Simulates power loss now: every later operation fails with [`InjectedFault::Crashed`],
    /// so a test can stop a workload midway. The crash images stay available.
    pub fn crash_now(&self) {
        let mut inner = self.lock();
        if !inner.crashed {
            inner.crashed = true;
            inner.events.push(Event::Crash);
        }
    }

    /// True after [`FaultBackend::crash_now`].
    pub fn is_crashed(&self) -> bool {
        self.lock().crashed
    }

    /// Operation and fault counters so far.
    pub fn stats(&self) -> FaultStats {
        self.lock().stats
    }
}

impl Backend for FaultBackend {
    fn len(&self) -> u64 {
        self.lock().live.len() as u64
    }

    fn read_at(&self, buf: &mut [u8], offset: u64) -> io::Result<()> {
        let mut inner = self.lock();
        inner.stats.reads += 1;
        if inner.crashed {
            return Err(inner.inject(|s| &mut s.failed_reads, InjectedFault::Crashed));
        }
        let len = buf.len() as u64;
        check_range(offset, len, inner.live.len() as u64)?;
        let hits = |r: &Range<u64>| r.start < offset + len && offset < r.end;
        let p = inner.read_error_p;
        if inner.read_fail_ranges.iter().any(hits) || inner.chance(p) {
            return Err(inner.inject(|s| &mut s.failed_reads, InjectedFault::Error));
        }
        let start = offset as usize;
        buf.copy_from_slice(&inner.live[start..start + buf.len()]);
        Ok(())
    }

    fn write_at(&self, buf: &[u8], offset: u64) -> io::Result<()> {
        self.lock().write(Arc::from(buf), offset, false)
    }

    fn write_vectored_at(&self, bufs: &[&[u8]], offset: u64) -> io::Result<()> {
        // One request, so one event: a vectored write can be torn or lost as a unit, like the
        // single pwritev it stands for.
        self.lock().write(Arc::from(bufs.concat()), offset, false)
    }

    fn flush(&self) -> io::Result<()> {
        let mut inner = self.lock();
        inner.stats.flushes += 1;
        if inner.crashed {
            return Err(inner.inject(|s| &mut s.failed_flushes, InjectedFault::Crashed));
        }
        let p = inner.flush_error_p;
        if std::mem::take(&mut inner.fail_next_flush) || inner.chance(p) {
            inner.events.push(Event::FlushFailed);
            return Err(inner.inject(|s| &mut s.failed_flushes, InjectedFault::Error));
        }
        let Inner { state, .. } = &mut *inner;
        for w in state.pending.drain(..) {
            w.apply(&mut state.durable);
        }
        inner.flush_seq += 1;
        let seq = inner.flush_seq;
        inner.events.push(Event::Flush { seq });
        Ok(())
    }

    fn zero_range(&self, offset: u64, len: u64) -> io::Result<()> {
        let mut inner = self.lock();
        // Check before allocating the zeros, so an absurd length is an error, not an abort.
        if !inner.crashed {
            check_range(offset, len, inner.live.len() as u64)?;
        }
        let zeros: Arc<[u8]> = vec![0u8; len.min(inner.live.len() as u64) as usize].into();
        inner.write(zeros, offset, true)
    }

    fn name(&self) -> String {
        "fault".to_string()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;
    use std::collections::BTreeSet;

    fn assert_send_sync<T: Send + Sync>() {}

    #[test]
    fn is_send_and_sync() {
        assert_send_sync::<FaultBackend>();
        assert_send_sync::<CrashState>();
    }

    fn read(b: &FaultBackend, off: u64, len: usize) -> Vec<u8> {
        let mut v = vec![0; len];
        b.read_at(&mut v, off).unwrap();
        v
    }

    /// All permutations of all subsets of `0..k`, for brute-force comparison.
    fn all_orders(k: usize) -> Vec<Vec<usize>> {
        fn rec(k: usize, cur: &mut Vec<usize>, out: &mut Vec<Vec<usize>>) {
            out.push(cur.clone());
            for x in 0..k {
                if !cur.contains(&x) {
                    cur.push(x);
                    rec(k, cur, out);
                    cur.pop();
                }
            }
        }
        let mut out = Vec::new();
        rec(k, &mut Vec::new(), &mut out);
        out
    }

    fn brute_force_images(s: &CrashState) -> BTreeSet<Vec<u8>> {
        all_orders(s.unflushed().len())
            .iter()
            .map(|o| s.crash_image(o))
            .collect()
    }

    #[test]
    fn durable_and_live_images() {
        let b = FaultBackend::new(4096).unwrap();
        b.write_at(b"abc", 10).unwrap();
        assert_eq!(read(&b, 10, 3), b"abc");
        assert_eq!(&b.live_image()[10..13], b"abc");
        assert_eq!(b.durable_image(), vec![0; 4096], "not durable before a flush");
        assert_eq!(b.unflushed().len(), 1);
        assert_eq!(b.unflushed()[0].offset, 10);

        b.flush().unwrap();
        assert!(b.unflushed().is_empty());
        assert_eq!(&b.durable_image()[10..13], b"abc");

        b.zero_range(11, 1).unwrap();
        assert_eq!(read(&b, 10, 3), b"a\0c");
        assert_eq!(&b.durable_image()[10..13], b"abc");
        let pending = b.unflushed();
        assert_eq!(pending.len(), 1);
        assert_eq!((pending[0].offset, &pending[0].data[..]), (11, &[0u8][..]));
        assert_eq!(&b.crash_image(&[])[10..13], b"abc");
        assert_eq!(&b.crash_image(&[0])[10..13], b"a\0c");

        b.write_vectored_at(&[b"xy", b"z"], 100).unwrap();
        assert_eq!(read(&b, 100, 3), b"xyz");
        assert_eq!(b.unflushed().len(), 2, "a vectored write is one request");
        b.flush().unwrap();
        assert_eq!(b.durable_image(), b.live_image());
        let seqs: Vec<u64> = b
            .events()
            .iter()
            .filter_map(|e| match e {
                Event::Flush { seq } => Some(*seq),
                _ => None,
            })
            .collect();
        assert_eq!(seqs, [1, 2]);
    }

    #[test]
    fn out_of_range_requests_are_refused_and_not_recorded() {
        let b = FaultBackend::new(1024).unwrap();
        for e in [
            b.write_at(&[1; 2], 1023).unwrap_err(),
            b.write_vectored_at(&[&[1][..], &[2][..]], 1023).unwrap_err(),
            b.zero_range(1000, u64::MAX).unwrap_err(),
            b.read_at(&mut [0; 2], 1023).unwrap_err(),
            b.flip_bit(1024, 0).unwrap_err(),
            b.flip_bit(0, 8).unwrap_err(),
        ] {
            assert_eq!(e.kind(), io::ErrorKind::InvalidInput);
            assert_eq!(InjectedFault::of(&e), None);
        }
        assert!(b.events().is_empty());
        assert_eq!(b.live_image(), vec![0; 1024]);
        b.write_at(&[], 1024).unwrap();
        assert!(b.unflushed().is_empty(), "empty writes add no crash states");
    }

    /// Tiny image of three sectors: A = sector 0, B = sectors 0–1, C = sector 2.
    fn abc() -> FaultBackend {
        let b = FaultBackend::new(3 * 512).unwrap();
        b.write_at(&[b'a'; 512], 0).unwrap();
        b.write_at(&[b'b'; 1024], 0).unwrap();
        b.write_at(&[b'c'; 512], 1024).unwrap();
        b
    }

    fn sectors(img: &[u8]) -> String {
        img.chunks(512)
            .map(|s| if s[0] == 0 { '0' } else { s[0] as char })
            .collect()
    }

    #[test]
    fn exhaustive_enumeration_visits_exactly_the_possible_images() {
        let b = abc();
        let mut seen = Vec::new();
        let n = b.for_each_crash_image(100, |img| seen.push(img)).unwrap();
        assert_eq!(n, seen.len());
        let seen_set: BTreeSet<Vec<u8>> = seen.iter().cloned().collect();
        assert_eq!(seen_set.len(), seen.len(), "no image visited twice here");
        assert_eq!(seen_set, brute_force_images(&b.crash_state()));
        let mut names: Vec<String> = seen.iter().map(|i| sectors(i)).collect();
        names.sort();
        // Sector 0/1 can be 00 (neither), a0 (A), bb (B, or A then B), ab (B then A); sector 2
        // independently 0 or c.
        assert_eq!(names, ["000", "00c", "a00", "a0c", "ab0", "abc", "bb0", "bbc"]);

        // The orders: only B-before-A is kept of the two A/B orders (A-then-B equals B alone),
        // and C's position relative to A and B is never varied.
        let mut orders = Vec::new();
        b.crash_state()
            .for_each_crash_order(100, |o| orders.push(o.to_vec()))
            .unwrap();
        assert_eq!(orders.len(), 8);
        assert!(orders.contains(&vec![1, 0]));
        assert!(!orders.contains(&vec![0, 1]));
    }

    #[test]
    fn too_many_states_visits_nothing() {
        let b = FaultBackend::new(20 * 512).unwrap();
        for i in 0..20u64 {
            b.write_at(&[1; 512], i * 512).unwrap();
        }
        let mut called = 0;
        let err = b.for_each_crash_image(1000, |_| called += 1).unwrap_err();
        assert_eq!(called, 0);
        assert_eq!(err.pending_writes, 20);
        assert!(err.to_string().contains("random_crash_image"));
        // 2^10 subsets of 10 independent writes fit exactly.
        let s = FaultBackend::new(10 * 512).unwrap();
        for i in 0..10u64 {
            s.write_at(&[1; 512], i * 512).unwrap();
        }
        assert_eq!(s.for_each_crash_image(1024, |_| {}), Ok(1024));
        assert!(s.for_each_crash_image(1023, |_| {}).is_err());
    }

    #[test]
    fn rewrites_of_one_block_give_linear_state_count() {
        let b = FaultBackend::new(4096).unwrap();
        for i in 0..10u8 {
            b.write_at(&[i + 1; 4096], 0).unwrap();
        }
        let mut seen = BTreeSet::new();
        let n = b.for_each_crash_image(1000, |img| {
            seen.insert(img[0]);
        });
        assert_eq!(n, Ok(11));
        assert_eq!(seen, (0..=10).collect());
    }

    #[test]
    fn deep_enumeration_does_not_overflow_the_stack() {
        // 3000 nested writes, each leaving its edges visible under the next: the walk goes 3000
        // deep before the limit stops it.
        let n = 3000u64;
        let b = FaultBackend::new(2 * n).unwrap();
        for i in 0..n {
            b.write_at(&vec![1; (2 * (n - i)) as usize], i).unwrap();
        }
        assert!(b.crash_state().for_each_crash_order(3500, |_| {}).is_err());
    }

    #[test]
    fn subtract_ranges() {
        assert_eq!(subtract(&[(0, 10)], 3, 5), [(0, 3), (5, 10)]);
        assert_eq!(subtract(&[(0, 2), (4, 6)], 1, 5), [(0, 1), (5, 6)]);
        assert_eq!(subtract(&[(0, 2)], 0, 2), []);
        assert_eq!(subtract(&[(0, 2)], 2, 4), [(0, 2)]);
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(200))]
        #[test]
        fn enumeration_matches_brute_force(
            writes in prop::collection::vec((0u64..1800, 1usize..600, 1u8..255), 0..6)
        ) {
            let b = FaultBackend::new(2048).unwrap();
            for (off, len, fill) in writes {
                let len = len.min(2048 - off as usize);
                b.write_at(&vec![fill; len], off).unwrap();
            }
            let state = b.crash_state();
            let mut seen = Vec::new();
            let n = state.for_each_crash_image(100_000, |img| seen.push(img)).unwrap();
            let set: BTreeSet<Vec<u8>> = seen.into_iter().collect();
            let brute = brute_force_images(&state);
            prop_assert_eq!(&set, &brute);
            prop_assert!(n <= all_orders(state.unflushed().len()).len());
            let mut orders = BTreeSet::new();
            state.for_each_crash_order(100_000, |o| { orders.insert(o.to_vec()); }).unwrap();
            prop_assert_eq!(orders.len(), n, "no order visited twice");
        }
    }

    #[test]
    fn torn_writes_apply_only_selected_sectors() {
        let b = FaultBackend::new(4 * 512).unwrap();
        // Bytes 100..1300: a partial sector 0, full sector 1, partial sector 2.
        b.write_at(&[7; 1200], 100).unwrap();
        let w = &b.unflushed()[0];
        assert_eq!(w.sector_count(), 3);
        let img = b.crash_image_torn(&[(0, vec![true, false, true])]);
        for (i, &x) in img.iter().enumerate() {
            let expect = (100..512).contains(&i) || (1024..1300).contains(&i);
            assert_eq!(x, if expect { 7 } else { 0 }, "byte {i}");
        }
        assert_eq!(b.crash_image_torn(&[(0, vec![true; 3])]), b.crash_image(&[0]));
        assert_eq!(b.crash_image_torn(&[(0, vec![false; 3])]), vec![0; 2048]);
        let one = FaultBackend::new(1024).unwrap();
        one.write_at(&[1; 10], 600).unwrap();
        assert_eq!(one.unflushed()[0].sector_count(), 1);
    }

    #[test]
    #[should_panic(expected = "one flag per sector")]
    fn torn_mask_of_wrong_length_panics() {
        let b = abc();
        b.crash_image_torn(&[(1, vec![true])]);
    }

    #[test]
    #[should_panic(expected = "out of range")]
    fn crash_image_with_bad_index_panics() {
        abc().crash_image(&[3]);
    }

    #[test]
    fn random_crash_images_are_reproducible_and_possible() {
        let b = abc();
        let possible = brute_force_images(&b.crash_state());
        let draw = |seed, torn| {
            let mut rng = ChaCha8Rng::seed_from_u64(seed);
            (0..50)
                .map(|_| b.random_crash_image(&mut rng, torn))
                .collect::<Vec<_>>()
        };
        let plain = draw(7, false);
        assert_eq!(plain, draw(7, false));
        assert!(plain.iter().all(|i| possible.contains(i)));
        let distinct: BTreeSet<_> = plain.iter().collect();
        assert!(distinct.len() > 4, "sampling explores several states");

        let torn = draw(7, true);
        assert_eq!(torn, draw(7, true));
        // Torn images are made of whole sectors of some write or of the durable image.
        for img in &torn {
            for s in img.chunks(512) {
                assert!(s.iter().all(|&x| x == s[0]));
            }
        }
    }

    fn workload(b: &FaultBackend) -> Vec<bool> {
        let mut results = Vec::new();
        for i in 0..200u64 {
            let off = (i * 4096) % (64 * 4096);
            results.push(b.write_at(&[i as u8; 4096], off).is_ok());
            results.push(b.read_at(&mut [0; 4096], off).is_ok());
            if i % 10 == 0 {
                results.push(b.flush().is_ok());
            }
        }
        results
    }

    fn faulty(seed: u64) -> FaultBackend {
        let b = FaultBackend::new(64 * 4096).unwrap().with_seed(seed);
        b.set_error_rate(0.05, 0.05, 0.2).unwrap();
        b.set_lost_write_rate(0.05).unwrap();
        b.set_misdirect_rate(0.05).unwrap();
        b
    }

    #[test]
    fn same_seed_same_faults() {
        let (a, b) = (faulty(42), faulty(42));
        assert_eq!(workload(&a), workload(&b));
        assert_eq!(a.events(), b.events());
        assert_eq!(a.live_image(), b.live_image());
        assert_eq!(a.stats(), b.stats());
        let s = a.stats();
        assert!(s.failed_reads > 0 && s.failed_writes > 0 && s.failed_flushes > 0);
        assert!(s.lost_writes > 0 && s.misdirected_writes > 0);
        assert_eq!(
            s.injected_faults,
            s.failed_reads + s.failed_writes + s.failed_flushes + s.lost_writes + s.misdirected_writes
        );
        assert_eq!((s.reads, s.writes, s.flushes), (200, 200, 20));

        let c = faulty(43);
        workload(&c);
        assert_ne!(a.events(), c.events(), "another seed, other faults");
    }

    #[test]
    fn flip_bit_reaches_live_durable_and_pending() {
        let b = FaultBackend::new(1024).unwrap();
        b.write_at(&[0xf0; 4], 0).unwrap();
        b.flush().unwrap();
        b.write_at(&[0x0f; 4], 2).unwrap();
        b.flip_bit(3, 0).unwrap();
        b.flip_bit(0, 7).unwrap();
        assert_eq!(read(&b, 0, 6), [0x70, 0xf0, 0x0f, 0x0e, 0x0f, 0x0f]);
        assert_eq!(&b.durable_image()[..4], [0x70, 0xf0, 0xf0, 0xf1]);
        assert_eq!(&b.crash_image(&[0])[..6], [0x70, 0xf0, 0x0f, 0x0e, 0x0f, 0x0f]);
        // The history keeps what was issued.
        assert!(b.events().contains(&Event::Write {
            write: PendingWrite {
                offset: 2,
                data: Arc::from(&[0x0f; 4][..])
            },
            intended_offset: 2,
            zero_range: false,
        }));
        assert_eq!(b.stats().bit_flips, 2);
    }

    #[test]
    fn misdirected_writes_land_elsewhere() {
        let b = FaultBackend::new(8192).unwrap();
        b.misdirect_next_write(4096);
        b.write_at(&[9; 512], 0).unwrap();
        assert_eq!(read(&b, 0, 512), vec![0; 512]);
        assert_eq!(read(&b, 4096, 512), vec![9; 512]);
        assert_eq!(b.unflushed()[0].offset, 4096);
        b.flush().unwrap();
        assert_eq!(&b.durable_image()[4096..4608], &[9; 512][..]);
        assert!(matches!(
            b.events()[0],
            Event::Write {
                intended_offset: 0,
                write: PendingWrite { offset: 4096, .. },
                ..
            }
        ));
        // Only the next one.
        b.write_at(&[8; 4], 0).unwrap();
        assert_eq!(read(&b, 0, 4), [8; 4]);

        // Past the end: cut off; wholly outside: stored nowhere.
        b.misdirect_next_write(8190);
        b.write_at(&[5; 4], 0).unwrap();
        assert_eq!(read(&b, 8188, 4), [0, 0, 5, 5]);
        b.misdirect_next_write(10_000);
        b.write_at(&[6; 4], 0).unwrap();
        assert!(!b.live_image().contains(&6));

        // A rule.
        let r = FaultBackend::new(8192).unwrap();
        r.misdirect_writes_with(|off, _| (off == 512).then_some(1024));
        r.write_at(&[b'1'; 512], 512).unwrap();
        r.write_at(&[b'2'; 512], 0).unwrap();
        assert_eq!(sectors(&r.live_image())[..4], *"2010");

        // Random: same alignment, another address.
        let p = FaultBackend::new(1 << 20).unwrap().with_seed(1);
        p.set_misdirect_rate(1.0).unwrap();
        for i in 1..50u64 {
            p.write_at(&[1; 4096], i * 4096).unwrap();
            let w = p.unflushed().pop().unwrap();
            assert_ne!(w.offset, i * 4096);
            assert_eq!(w.offset % 4096, 0);
        }
        assert_eq!(p.stats().misdirected_writes, 49);
    }

    #[test]
    fn lost_writes_are_acknowledged_but_never_stored() {
        let b = FaultBackend::new(4096).unwrap();
        b.lose_next_write();
        b.write_at(&[1; 16], 0).unwrap();
        assert_eq!(read(&b, 0, 16), vec![0; 16]);
        assert!(b.unflushed().is_empty());
        b.flush().unwrap();
        assert_eq!(b.durable_image(), vec![0; 4096]);
        assert_eq!(b.events()[0], Event::LostWrite { offset: 0, len: 16 });
        b.write_at(&[2; 16], 0).unwrap();
        assert_eq!(read(&b, 0, 16), vec![2; 16], "only the next one");

        let all = FaultBackend::new(4096).unwrap();
        all.set_lost_write_rate(1.0).unwrap();
        all.zero_range(0, 10).unwrap();
        all.write_at(&[1], 0).unwrap();
        assert_eq!(all.stats().lost_writes, 2);
        assert_eq!(all.live_image(), vec![0; 4096]);
    }

    #[test]
    fn io_errors_in_ranges_and_on_flush() {
        let b = FaultBackend::new(8192).unwrap();
        b.write_at(&[3; 8192], 0).unwrap();
        b.fail_reads_at(1000..1001);
        b.fail_writes_at(4096..4097);
        let e = b.read_at(&mut [0; 10], 995).unwrap_err();
        assert_eq!(e.kind(), io::ErrorKind::Other);
        assert_eq!(e.to_string(), "injected fault");
        assert_eq!(InjectedFault::of(&e), Some(InjectedFault::Error));
        read(&b, 1001, 10);
        read(&b, 990, 10);
        let e = b.write_at(&[4; 2], 4095).unwrap_err();
        assert_eq!(InjectedFault::of(&e), Some(InjectedFault::Error));
        assert!(b.zero_range(4000, 200).is_err());
        assert_eq!(read(&b, 4000, 200), vec![3; 200], "failed writes store nothing");
        assert_eq!(b.unflushed().len(), 1);
        b.write_at(&[4; 2], 4097).unwrap();

        b.fail_next_flush();
        assert!(b.flush().is_err());
        assert_eq!(b.unflushed().len(), 2, "a failed flush leaves writes unflushed");
        assert_eq!(b.durable_image(), vec![0; 8192]);
        b.flush().unwrap();
        assert!(b.unflushed().is_empty());

        b.clear_faults();
        read(&b, 995, 10);
        b.write_at(&[4; 2], 4095).unwrap();

        b.set_error_rate(1.0, 1.0, 1.0).unwrap();
        assert!(b.read_at(&mut [0], 0).is_err());
        assert!(b.write_at(&[0], 0).is_err());
        assert!(b.flush().is_err());
        assert_eq!(b.unflushed().len(), 1);
        let s = b.stats();
        assert_eq!((s.failed_reads, s.failed_writes, s.failed_flushes), (2, 3, 2));

        assert_eq!(b.set_error_rate(0.5, 1.5, 0.0), Err(InvalidProbability(1.5)));
        assert!(b.set_lost_write_rate(f64::NAN).is_err());
        assert!(b.set_misdirect_rate(-0.1).is_err());
    }

    #[test]
    fn crash_freezes_the_backend_but_keeps_crash_images() {
        let b = FaultBackend::new(4096).unwrap();
        b.write_at(&[1; 8], 0).unwrap();
        b.crash_now();
        assert!(b.is_crashed());
        for e in [
            b.read_at(&mut [0; 1], 0).unwrap_err(),
            b.write_at(&[2], 0).unwrap_err(),
            b.zero_range(0, u64::MAX).unwrap_err(),
            b.flush().unwrap_err(),
        ] {
            assert_eq!(InjectedFault::of(&e), Some(InjectedFault::Crashed));
            assert_eq!(e.kind(), io::ErrorKind::Other);
        }
        assert_eq!(b.unflushed().len(), 1);
        assert_eq!(&b.crash_image(&[0])[..8], [1; 8]);
        assert_eq!(b.events().last(), Some(&Event::Crash));
        assert_eq!(b.stats().injected_faults, 4);
    }

    #[test]
    fn history_points_replay_every_state() {
        let b = FaultBackend::from_image(vec![5; 2048]).with_seed(3);
        b.write_at(&[1; 512], 0).unwrap();
        b.flush().unwrap();
        b.write_at(&[2; 512], 512).unwrap();
        b.lose_next_write();
        b.write_at(&[9; 512], 0).unwrap();
        b.flip_bit(512, 1).unwrap();
        b.zero_range(1024, 512).unwrap();
        b.fail_next_flush();
        let _ = b.flush();
        b.flush().unwrap();
        b.write_at(&[3; 512], 1536).unwrap();

        let events = b.events();
        assert_eq!(events.len(), 9);
        assert_eq!(b.state_at(events.len()), b.crash_state());
        assert_eq!(b.state_at(0).durable_image(), &[5; 2048][..]);
        assert!(b.state_at(0).unflushed().is_empty());
        let s3 = b.state_at(3);
        assert_eq!(&s3.durable_image()[..512], &[1; 512][..]);
        assert_eq!(s3.unflushed().len(), 1);

        let mut points = Vec::new();
        b.for_each_history_point(|n, s| {
            assert_eq!(s, &b.state_at(n), "point {n}");
            points.push(n);
        });
        // Lost writes and failed flushes change nothing, so they are skipped.
        assert_eq!(points, [0, 1, 2, 3, 5, 6, 8, 9]);

        // The flipped bit is in the pending write at point 5 (write of 2s at 512).
        assert_eq!(b.state_at(5).crash_image(&[0])[512], 2 ^ 2);

        b.forget_history();
        assert_eq!(b.state_at(b.events().len()), b.crash_state());
        assert_eq!(b.events().len(), 1);
        assert_eq!(b.state_at(0).durable_image(), b.durable_image());
    }

    #[test]
    #[should_panic(expected = "past the")]
    fn state_past_the_history_panics() {
        abc().state_at(4);
    }

    #[test]
    fn crash_images_reopen_on_memory_backend() {
        let b = abc();
        b.for_each_crash_image(100, |img| {
            let m = crate::MemoryBackend::from_vec(img);
            assert_eq!(m.len(), 1536);
        })
        .unwrap();
    }
}
