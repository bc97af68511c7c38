//! A deterministic fault-injecting backend: the storage simulator behind the crash and
//! corruption tests (in the spirit of `TigerBeetle`'s and redb's simulated disks).
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
//! On the medium (persistent, recorded in the history):
//! - bit rot ([`FaultBackend::flip_bit`]);
//! - misdirected writes ([`FaultBackend::misdirect_next_write`], a rule, a rate);
//! - lost writes ([`FaultBackend::lose_next_write`], a rate);
//! - torn writes without a crash ([`FaultBackend::tear_next_write`],
//!   [`FaultBackend::tear_writes_with`]): only the flagged 512-byte sectors of the write are
//!   stored, and the crash accounting holds exactly those (one unflushed write per run of
//!   stored sectors, after an [`Event::TornWrite`]);
//! - I/O errors on reads, writes and flushes, and a crash that freezes the backend
//!   ([`FaultBackend::crash_now`]).
//!
//! Transient read faults ([`ReadFault`]), which corrupt what one read returns but leave the
//! medium, the crash states and the history untouched, so the next read is correct:
//! - zeros ([`FaultBackend::zero_next_read`]);
//! - a misdirected read returning another range's bytes
//!   ([`FaultBackend::misdirect_next_read`]);
//! - a stale read returning the range as it was before its most recent write(s)
//!   ([`FaultBackend::stale_next_read`]; see [`ReadFault::Stale`] for the exact definition);
//! - each of them by rule ([`FaultBackend::read_faults_with`]) or at random
//!   ([`FaultBackend::set_read_fault_rate`]).
//!
//! [`Backend::zero_ranges`] answers from the live image (whole 512-byte sectors of zeros) and
//! is subject to no fault except a crash.
//!
//! Probabilistic faults draw from a `ChaCha8Rng` seeded by [`FaultBackend::with_seed`], so a
//! given seed and a given sequence of calls always produce the same faults. A fault whose rate
//! is zero draws nothing, so a workload that leaves a fault off (read faults, say) gets the
//! same faults from a seed as before that fault existed. (Calls racing from several threads
//! reach the generator in an unspecified order, so determinism needs a single-threaded
//! workload.) An injected error is an [`io::Error`] of kind [`io::ErrorKind::Other`] carrying
//! an [`InjectedFault`]; its message is `"injected fault"`.

use crate::memory::zero_sectors;
use crate::{check_range, usize_of, Backend};
use rand::seq::SliceRandom;
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;
use std::collections::BTreeMap;
use std::fmt;
use std::io;
use std::ops::Range;
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};

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
    /// This is the length of the mask [`CrashState::crash_image_torn`] and
    /// [`FaultBackend::tear_next_write`] expect.
    pub fn sector_count(&self) -> usize {
        sector_count(self.offset, self.data.len())
    }

    fn overlaps(&self, other: &PendingWrite) -> bool {
        self.offset < other.end() && other.offset < self.end()
    }

    fn apply(&self, image: &mut [u8]) {
        let start = usize_of(self.offset);
        image[start..start + self.data.len()].copy_from_slice(&self.data);
    }

    /// Applies only the sectors whose flag in `mask` is true.
    fn apply_torn(&self, image: &mut [u8], mask: &[bool]) {
        let s = SECTOR_SIZE as u64;
        let first = self.offset / s;
        for (i, _) in mask.iter().enumerate().filter(|(_, &keep)| keep) {
            let lo = ((first + i as u64) * s).max(self.offset);
            let hi = ((first + i as u64 + 1) * s).min(self.end());
            let d = usize_of(lo - self.offset)..usize_of(hi - self.offset);
            image[usize_of(lo)..usize_of(hi)].copy_from_slice(&self.data[d]);
        }
    }
}

/// Number of 512-byte sectors `len` bytes at `offset` touch (see [`PendingWrite::sector_count`]).
fn sector_count(offset: u64, len: usize) -> usize {
    if len == 0 {
        return 0;
    }
    let s = SECTOR_SIZE as u64;
    usize_of((offset + len as u64 - 1) / s - offset / s + 1)
}

/// The byte ranges, relative to the start of a write of `len` bytes issued at `offset`, of the
/// sectors whose flag in `mask` is true, adjacent sectors merged. `mask` has one flag per
/// sector the write touches (checked by the caller).
fn kept_runs(offset: u64, len: usize, mask: &[bool]) -> Vec<Range<usize>> {
    let s = SECTOR_SIZE as u64;
    let first = offset / s;
    let mut runs: Vec<Range<usize>> = Vec::new();
    for (k, _) in mask.iter().enumerate().filter(|(_, &keep)| keep) {
        let lo = ((first + k as u64) * s).max(offset) - offset;
        let hi = ((first + k as u64 + 1) * s - offset).min(len as u64);
        let (lo, hi) = (usize_of(lo), usize_of(hi));
        match runs.last_mut() {
            Some(last) if last.end == lo => last.end = hi,
            _ => runs.push(lo..hi),
        }
    }
    runs
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
    /// A write torn by [`FaultBackend::tear_next_write`] or [`FaultBackend::tear_writes_with`]:
    /// only the sectors flagged in `mask` were stored. The [`Event::Write`]s that follow it
    /// right away, one per run of adjacent stored sectors, are what landed (none if no flag is
    /// set).
    TornWrite {
        /// The address the caller asked for.
        offset: u64,
        /// Its length.
        len: u64,
        /// One flag per sector of the write as issued (see [`PendingWrite::sector_count`]).
        mask: Vec<bool>,
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
    /// A flush refused with an injected error that also lost every pending write
    /// ([`FaultBackend::fail_next_flush_dropping_writes`]): no crash image holds them any more.
    FlushFailedDroppingWrites,
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
            Event::Write { .. }
                | Event::Flush { .. }
                | Event::BitFlip { .. }
                | Event::FlushFailedDroppingWrites
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

/// What a faulty read returns instead of the data (see [`FaultBackend::read_faults_with`]).
///
/// Read faults are transient: they affect only the read they hit; the medium is unchanged and
/// the next read of the same range is correct (unless it is hit too).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ReadFault {
    /// All zeros.
    Zeros,
    /// The bytes at this other offset (same length): a misdirected read. The part of it that
    /// lies outside the store reads as zeros.
    From(u64),
    /// Old data: the range as it was before its most recent write(s). If an unflushed write
    /// overlaps the range, the range's content in the durable image (the disk as of the last
    /// completed flush); otherwise the range as it reads now, with the bytes stored by the last
    /// write overlapping it replaced by what that write overwrote. A range never written since
    /// the backend was made reads as it is.
    Stale,
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
    /// Reads failed with an injected error (crash included), and
    /// [`zero_ranges`](Backend::zero_ranges) queries refused after a crash.
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
    /// Reads that returned zeros instead of the data ([`ReadFault::Zeros`]).
    pub zeroed_reads: u64,
    /// Reads that returned another range's bytes ([`ReadFault::From`]).
    pub misdirected_reads: u64,
    /// Reads that returned old data ([`ReadFault::Stale`]).
    pub stale_reads: u64,
    /// Writes and zero ranges that landed only partly (an all-false mask, storing nothing,
    /// included); see [`FaultBackend::tear_next_write`].
    pub torn_writes: u64,
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
            Event::FlushFailedDroppingWrites => self.pending.clear(),
            Event::LostWrite { .. }
            | Event::TornWrite { .. }
            | Event::WriteFailed { .. }
            | Event::FlushFailed
            | Event::Crash => {}
        }
    }
}

/// Flips a bit in an image and in every pending write covering it, so that the bit reads
/// flipped in the live image and in every crash image alike.
fn flip(image: &mut [u8], pending: &mut [PendingWrite], offset: u64, bit: u8) {
    let mask = 1u8 << bit;
    image[usize_of(offset)] ^= mask;
    for w in pending.iter_mut() {
        if w.offset <= offset && offset < w.end() {
            // Copy on write: the history shares this data and must keep what was issued.
            let mut data = w.data.to_vec();
            data[usize_of(offset - w.offset)] ^= mask;
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

/// Chooses the fault a read suffers, if any.
type ReadFaultFn = dyn Fn(u64, usize) -> Option<ReadFault> + Send + Sync;

/// Chooses the sectors a torn write stores, if it is torn.
type TearFn = dyn Fn(u64, usize) -> Option<Vec<bool>> + Send + Sync;

/// What some bytes of the live image held before the write that last stored them (for
/// [`ReadFault::Stale`]).
struct Overwritten {
    /// One past the last byte (the first is the map key).
    end: u64,
    /// Which write stored them: the write counter at that write.
    seq: u64,
    /// The bytes before that write.
    old: Vec<u8>,
}

/// What the next flush does (one-shot flush faults).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum NextFlush {
    /// Flushes (or fails at the configured rate).
    Flush,
    /// Fails; the pending writes stay pending.
    Fail,
    /// Fails and loses the pending writes.
    FailDropping,
}

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
    /// Latent sector errors: reads fail until a write covers the range.
    pending_ranges: Vec<Range<u64>>,
    write_fail_ranges: Vec<Range<u64>>,
    /// What the next flush does: fail, or fail and lose the pending writes (see `ghosts`).
    next_flush: NextFlush,
    /// Ranges whose writes a failed flush lost while reads still return them, like pages of
    /// the page cache whose writeback failed: they read as written until
    /// [`Backend::drop_cached`] drops them (then they read as the durable image) or a new
    /// write covers them.
    ghosts: Ranges,
    read_error_p: f64,
    write_error_p: f64,
    flush_error_p: f64,
    lose_next: bool,
    lost_p: f64,
    misdirect_next: Option<u64>,
    misdirect_fn: Option<Box<MisdirectFn>>,
    misdirect_p: f64,
    read_fault_next: Option<ReadFault>,
    read_fault_fn: Option<Box<ReadFaultFn>>,
    read_fault_p: f64,
    tear_next: Option<Vec<bool>>,
    tear_fn: Option<Box<TearFn>>,
    /// Writes that stored something, counted; identifies the writes in `overwritten`.
    write_seq: u64,
    /// For every byte ever written, what it held before the last write that stored it, keyed
    /// by the first byte of each piece; pieces are disjoint. Bounded by the image size: a write
    /// drops what it overwrites from earlier pieces, since only the last write overlapping a
    /// range matters for a stale read.
    overwritten: BTreeMap<u64, Overwritten>,
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

    /// Remembers what `lo..hi` holds in the live image, as overwritten by write `seq` (called
    /// just before that write stores its bytes there).
    fn record_overwrite(&mut self, lo: u64, hi: u64, seq: u64) {
        // Pieces overlapping lo..hi: possibly one starting before `lo`, and those inside.
        let before = self
            .overwritten
            .range(..lo)
            .next_back()
            .filter(|(_, p)| p.end > lo)
            .map(|(&start, _)| start);
        let inside: Vec<u64> = self.overwritten.range(lo..hi).map(|(&start, _)| start).collect();
        for start in before.into_iter().chain(inside) {
            let Some(p) = self.overwritten.remove(&start) else {
                continue;
            };
            if start < lo {
                let old = p.old[..usize_of(lo - start)].to_vec();
                let head = Overwritten {
                    end: lo,
                    seq: p.seq,
                    old,
                };
                self.overwritten.insert(start, head);
            }
            if p.end > hi {
                let old = p.old[usize_of(hi - start)..].to_vec();
                let tail = Overwritten {
                    end: p.end,
                    seq: p.seq,
                    old,
                };
                self.overwritten.insert(hi, tail);
            }
        }
        let old = self.live[usize_of(lo)..usize_of(hi)].to_vec();
        self.overwritten.insert(lo, Overwritten { end: hi, seq, old });
    }

    /// Stores `write` (write number `seq`) in the live image and the crash accounting, and
    /// records it in the history.
    fn land(&mut self, write: PendingWrite, seq: u64, intended_offset: u64, zero_range: bool) {
        self.record_overwrite(write.offset, write.end(), seq);
        if !self.ghosts.is_empty() {
            self.ghosts = subtract(&self.ghosts, write.offset, write.end());
        }
        write.apply(&mut self.live);
        self.state.pending.push(write.clone());
        self.events.push(Event::Write {
            write,
            intended_offset,
            zero_range,
        });
    }

    /// Fills `buf` with what a stale read at `offset` returns (see [`ReadFault::Stale`]).
    fn stale_into(&self, buf: &mut [u8], offset: u64) {
        let (lo, hi) = (offset, offset + buf.len() as u64);
        let (start, end) = (usize_of(lo), usize_of(hi));
        if self.state.pending.iter().any(|w| w.offset < hi && lo < w.end()) {
            buf.copy_from_slice(&self.state.durable[start..end]);
            return;
        }
        buf.copy_from_slice(&self.live[start..end]);
        let before = self
            .overwritten
            .range(..lo)
            .next_back()
            .filter(|(_, p)| p.end > lo);
        let pieces: Vec<(u64, &Overwritten)> = before
            .into_iter()
            .chain(self.overwritten.range(lo..hi))
            .map(|(&s, p)| (s, p))
            .collect();
        // The last write overlapping the range has the largest number among the pieces
        // overlapping it, and its pieces cover all it stored there: any later write to those
        // bytes would overlap the range too.
        let Some(last) = pieces.iter().map(|(_, p)| p.seq).max() else {
            return;
        };
        for (s, p) in pieces.into_iter().filter(|(_, p)| p.seq == last) {
            let (a, b) = (s.max(lo), p.end.min(hi));
            let src = &p.old[usize_of(a - s)..usize_of(b - s)];
            buf[usize_of(a - lo)..usize_of(b - lo)].copy_from_slice(src);
        }
    }

    /// Fills `buf` with the bytes at `from` in the live image, zeros where that lies outside.
    fn misdirected_into(&self, buf: &mut [u8], from: u64) {
        buf.fill(0);
        let size = self.live.len() as u64;
        if from >= size {
            return;
        }
        let n = usize_of((size - from).min(buf.len() as u64));
        buf[..n].copy_from_slice(&self.live[usize_of(from)..usize_of(from) + n]);
    }

    /// The read fault for a read of `len` bytes at `offset`, if any: the one-shot fault, else
    /// the rule, else the probabilistic fault.
    fn read_fault(&mut self, offset: u64, len: usize) -> Option<ReadFault> {
        if let Some(f) = self.read_fault_next.take() {
            return Some(f);
        }
        if let Some(f) = &self.read_fault_fn {
            return f(offset, len);
        }
        let p = self.read_fault_p;
        if !self.chance(p) {
            return None;
        }
        Some(match self.rng.random_range(0..3u8) {
            0 => ReadFault::Zeros,
            1 => ReadFault::From(self.random_target(offset, len)),
            _ => ReadFault::Stale,
        })
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
        if let Some(outcome) = self.fail_or_lose(offset, len) {
            return outcome;
        }
        let tear = self.tear_mask(offset, data.len())?;
        let Some((landed, data)) = self.misdirect(offset, data) else {
            return Ok(());
        };
        self.write_seq += 1;
        let seq = self.write_seq;
        let Some(mask) = tear else {
            self.land(PendingWrite { offset: landed, data }, seq, offset, zero_range);
            return Ok(());
        };
        self.stats.torn_writes += 1;
        self.stats.injected_faults += 1;
        // The flags follow the data: flag k keeps the bytes of the write's k-th sector as
        // issued, wherever the write landed (and as far as it fit).
        let runs = kept_runs(offset, usize_of(len), &mask);
        self.events.push(Event::TornWrite { offset, len, mask });
        for run in runs {
            let run = run.start..run.end.min(data.len());
            if run.is_empty() {
                continue;
            }
            let piece = PendingWrite {
                offset: landed + run.start as u64,
                data: Arc::from(&data[run.clone()]),
            };
            self.land(piece, seq, offset + run.start as u64, zero_range);
        }
        Ok(())
    }

    /// The write faults that store nothing: an injected error (by range or rate), or a lost
    /// write (one-shot or rate). `Some` with the outcome of the write if one of them strikes,
    /// recorded in the history and the counters; `None` if the write goes ahead.
    fn fail_or_lose(&mut self, offset: u64, len: u64) -> Option<io::Result<()>> {
        let hits = |r: &Range<u64>| r.start < offset + len && offset < r.end;
        let p = self.write_error_p;
        if self.write_fail_ranges.iter().any(hits) || self.chance(p) {
            self.events.push(Event::WriteFailed { offset, len });
            return Some(Err(self.inject(|s| &mut s.failed_writes, InjectedFault::Error)));
        }
        // A write over a pending sector remaps it, as a disk does: it reads again.
        self.pending_ranges
            .retain(|r| !(offset <= r.start && r.end <= offset + len));
        let p = self.lost_p;
        if std::mem::take(&mut self.lose_next) || self.chance(p) {
            self.stats.lost_writes += 1;
            self.stats.injected_faults += 1;
            self.events.push(Event::LostWrite { offset, len });
            return Some(Ok(()));
        }
        None
    }

    /// The torn-write mask for a write of `len` bytes at `offset`, if it is torn: the one-shot
    /// mask, else the rule's. A mask whose length is not the write's sector count is refused.
    fn tear_mask(&mut self, offset: u64, len: usize) -> io::Result<Option<Vec<bool>>> {
        let tear = if let Some(mask) = self.tear_next.take() {
            Some(mask)
        } else if let Some(f) = &self.tear_fn {
            f(offset, len)
        } else {
            None
        };
        if let Some(mask) = &tear {
            let want = sector_count(offset, len);
            if mask.len() != want {
                return Err(io::Error::new(
                    io::ErrorKind::InvalidInput,
                    format!(
                        "torn-write mask of {} flags for a write of {len} bytes at {offset}, \
                         which touches {want} sectors",
                        mask.len()
                    ),
                ));
            }
        }
        Ok(tear)
    }

    /// Where a write of `data` issued at `offset` lands, and what of it: at `offset` whole,
    /// or, misdirected (one-shot, rule or rate), at the target and truncated at the end of the
    /// store. `None` if the target lies past the end, which loses the write (recorded).
    fn misdirect(&mut self, offset: u64, data: Arc<[u8]>) -> Option<(u64, Arc<[u8]>)> {
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
        let Some(t) = target else {
            return Some((offset, data));
        };
        self.stats.misdirected_writes += 1;
        self.stats.injected_faults += 1;
        let size = self.live.len() as u64;
        let len = data.len() as u64;
        if t >= size {
            self.events.push(Event::LostWrite { offset, len });
            return None;
        }
        // Truncated at the end of the store, as a drive writing past its last sector would be.
        let fit = usize_of((size - t).min(len));
        let data = if fit == data.len() {
            data
        } else {
            Arc::from(&data[..fit])
        };
        Some((t, data))
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
            pending_ranges: Vec::new(),
            write_fail_ranges: Vec::new(),
            next_flush: NextFlush::Flush,
            ghosts: Vec::new(),
            read_error_p: 0.0,
            write_error_p: 0.0,
            flush_error_p: 0.0,
            lose_next: false,
            lost_p: 0.0,
            misdirect_next: None,
            misdirect_fn: None,
            misdirect_p: 0.0,
            read_fault_next: None,
            read_fault_fn: None,
            read_fault_p: 0.0,
            tear_next: None,
            tear_fn: None,
            write_seq: 0,
            overwritten: BTreeMap::new(),
        };
        Self {
            inner: Mutex::new(inner),
        }
    }

    /// Reseeds the generator behind the probabilistic faults.
    #[must_use]
    pub fn with_seed(self, seed: u64) -> Self {
        self.lock().rng = ChaCha8Rng::seed_from_u64(seed);
        self
    }

    fn lock(&self) -> MutexGuard<'_, Inner> {
        // A test that panicked while holding the lock leaves consistent data behind (every
        // mutation completes before the guard drops), so poisoning is ignored.
        self.inner.lock().unwrap_or_else(PoisonError::into_inner)
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

    /// Fails every read overlapping `range` until a write covers the whole range (a pending
    /// sector the disk remaps when it is rewritten), or [`FaultBackend::clear_faults`].
    pub fn fail_reads_until_rewritten(&self, range: Range<u64>) {
        self.lock().pending_ranges.push(range);
    }

    /// Fails every write or zero range overlapping `range`, storing nothing, until
    /// [`FaultBackend::clear_faults`].
    pub fn fail_writes_at(&self, range: Range<u64>) {
        self.lock().write_fail_ranges.push(range);
    }

    /// Fails the next flush; the writes it would have made durable stay unflushed.
    pub fn fail_next_flush(&self) {
        self.lock().next_flush = NextFlush::Fail;
    }

    /// Fails the next flush and loses every write it would have made durable, as Linux does
    /// with the dirty pages whose writeback failed: the medium keeps its durable image, and
    /// no crash image holds those writes any more, but reads go on returning them (the pages
    /// stay in the page cache, marked clean) until [`Backend::drop_cached`] drops them or a
    /// later write covers them. A later flush succeeds without them.
    pub fn fail_next_flush_dropping_writes(&self) {
        self.lock().next_flush = NextFlush::FailDropping;
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

    /// Makes the next read return zeros instead of the data (once; the medium is unchanged).
    /// Replaces any other one-shot read fault not yet used. See
    /// [`FaultBackend::read_faults_with`] for which read counts as the next one.
    pub fn zero_next_read(&self) {
        self.lock().read_fault_next = Some(ReadFault::Zeros);
    }

    /// Makes the next read return the bytes at `from_offset` instead (same length; zeros for the
    /// part outside the store), once. Replaces any other one-shot read fault not yet used.
    pub fn misdirect_next_read(&self, from_offset: u64) {
        self.lock().read_fault_next = Some(ReadFault::From(from_offset));
    }

    /// Makes the next read return old data (see [`ReadFault::Stale`]), once. Replaces any other
    /// one-shot read fault not yet used.
    pub fn stale_next_read(&self) {
        self.lock().read_fault_next = Some(ReadFault::Stale);
    }

    /// Corrupts reads as `f(offset, len)` decides: `Some(fault)` returns the faulty data
    /// instead of the real one, for that read only; `None` reads correctly. Replaces any
    /// earlier rule; takes precedence over [`FaultBackend::set_read_fault_rate`], while a
    /// one-shot read fault (`*_next_read`) takes precedence over the rule. The rule runs with
    /// the backend locked, so it must not call the backend.
    ///
    /// Read faults apply only to reads that would otherwise succeed: a read failing with an
    /// injected error, or of zero bytes, neither suffers nor consumes one. They change nothing
    /// on the medium and record nothing in the history (crash states do not depend on reads).
    pub fn read_faults_with(&self, f: impl Fn(u64, usize) -> Option<ReadFault> + Send + Sync + 'static) {
        self.lock().read_fault_fn = Some(Box::new(f));
    }

    /// Corrupts each read with probability `p`, with one of the three [`ReadFault`]s chosen
    /// uniformly: zeros, old data, or the bytes at a random other offset with the read's
    /// alignment (up to 4 KiB, like [`FaultBackend::set_misdirect_rate`] for writes).
    pub fn set_read_fault_rate(&self, p: f64) -> Result<(), InvalidProbability> {
        self.lock().read_fault_p = check_p(p)?;
        Ok(())
    }

    /// Tears the next write (or zero range): it stores only the 512-byte sectors whose flag in
    /// `mask` is true, in the live image and in the crash accounting alike, and is acknowledged
    /// as if whole (a torn write without a crash).
    ///
    /// `mask` needs one flag per sector the write touches (its
    /// [`sector_count`](PendingWrite::sector_count); a partial first or last sector counts);
    /// otherwise that write fails with [`io::ErrorKind::InvalidInput`] and stores nothing (the
    /// mask is used up all the same). Each run of adjacent stored sectors becomes one unflushed
    /// write and one [`Event::Write`], after an [`Event::TornWrite`] naming the whole write, so
    /// every crash image agrees with what reads show. A write that is also misdirected keeps
    /// the sectors of its data the flags select, wherever it lands. The mask is used by the
    /// next write that is neither refused with an injected error nor lost.
    pub fn tear_next_write(&self, mask: Vec<bool>) {
        self.lock().tear_next = Some(mask);
    }

    /// Tears writes as `f(offset, len)` decides: `Some(mask)` stores only the sectors flagged
    /// true (see [`FaultBackend::tear_next_write`], which takes precedence), `None` stores the
    /// whole write. Replaces any earlier rule. The rule runs with the backend locked, so it
    /// must not call the backend.
    pub fn tear_writes_with(&self, f: impl Fn(u64, usize) -> Option<Vec<bool>> + Send + Sync + 'static) {
        self.lock().tear_fn = Some(Box::new(f));
    }

    /// Removes every configured fault (rates, ranges, one-shot faults, misdirection, read-fault
    /// and tearing rules). Does not undo a crash or a flipped bit.
    pub fn clear_faults(&self) {
        let mut inner = self.lock();
        inner.read_fail_ranges.clear();
        inner.pending_ranges.clear();
        inner.write_fail_ranges.clear();
        inner.next_flush = NextFlush::Flush;
        inner.read_error_p = 0.0;
        inner.write_error_p = 0.0;
        inner.flush_error_p = 0.0;
        inner.lose_next = false;
        inner.lost_p = 0.0;
        inner.misdirect_next = None;
        inner.misdirect_fn = None;
        inner.misdirect_p = 0.0;
        inner.read_fault_next = None;
        inner.read_fault_fn = None;
        inner.read_fault_p = 0.0;
        inner.tear_next = None;
        inner.tear_fn = None;
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
        if inner.read_fail_ranges.iter().any(hits) || inner.pending_ranges.iter().any(hits) || inner.chance(p)
        {
            return Err(inner.inject(|s| &mut s.failed_reads, InjectedFault::Error));
        }
        if buf.is_empty() {
            return Ok(());
        }
        match inner.read_fault(offset, buf.len()) {
            None => {
                let start = usize_of(offset);
                buf.copy_from_slice(&inner.live[start..start + buf.len()]);
            }
            Some(ReadFault::Zeros) => {
                buf.fill(0);
                inner.stats.zeroed_reads += 1;
                inner.stats.injected_faults += 1;
            }
            Some(ReadFault::From(from)) => {
                inner.misdirected_into(buf, from);
                inner.stats.misdirected_reads += 1;
                inner.stats.injected_faults += 1;
            }
            Some(ReadFault::Stale) => {
                inner.stale_into(buf, offset);
                inner.stats.stale_reads += 1;
                inner.stats.injected_faults += 1;
            }
        }
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
        let next = std::mem::replace(&mut inner.next_flush, NextFlush::Flush);
        if next == NextFlush::FailDropping {
            let Inner { state, ghosts, .. } = &mut *inner;
            for w in state.pending.drain(..) {
                *ghosts = subtract(ghosts, w.offset, w.end());
                let at = ghosts.partition_point(|&(a, _)| a < w.offset);
                ghosts.insert(at, (w.offset, w.end()));
            }
            inner.events.push(Event::FlushFailedDroppingWrites);
            return Err(inner.inject(|s| &mut s.failed_flushes, InjectedFault::Error));
        }
        let p = inner.flush_error_p;
        if next == NextFlush::Fail || inner.chance(p) {
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

    /// Does nothing (the simulated disk has no writeback to start), but refuses a range outside
    /// the store like [`FileBackend`](crate::FileBackend) does. Not a fault target, and
    /// accepted after a crash too: a hint guarantees nothing.
    fn start_writeback(&self, offset: u64, len: u64) -> io::Result<()> {
        if len == 0 {
            return Ok(());
        }
        check_range(offset, len, self.len())
    }

    /// The all-zero 512-byte-aligned sectors wholly inside the range in the live image (what
    /// reads see), merged. No fault applies to it, but after
    /// [`crash_now`](FaultBackend::crash_now) it fails like everything else.
    fn zero_ranges(&self, offset: u64, len: u64) -> io::Result<Vec<Range<u64>>> {
        let mut inner = self.lock();
        if inner.crashed {
            return Err(inner.inject(|s| &mut s.failed_reads, InjectedFault::Crashed));
        }
        check_range(offset, len, inner.live.len() as u64)?;
        Ok(zero_sectors(&inner.live, offset, len))
    }

    /// Makes the range of writes a failed flush lost ([`FaultBackend::fail_next_flush_dropping_writes`])
    /// read as the medium holds it. No fault applies; refuses a range outside the store.
    fn drop_cached(&self, offset: u64, len: u64) -> io::Result<()> {
        let mut inner = self.lock();
        check_range(offset, len, inner.live.len() as u64)?;
        if len == 0 || inner.ghosts.is_empty() {
            return Ok(());
        }
        let end = offset + len;
        let Inner {
            live, state, ghosts, ..
        } = &mut *inner;
        for &(a, b) in ghosts.iter() {
            let (lo, hi) = (a.max(offset), b.min(end));
            if lo < hi {
                let (lo, hi) = (usize_of(lo), usize_of(hi));
                live[lo..hi].copy_from_slice(&state.durable[lo..hi]);
            }
        }
        *ghosts = subtract(ghosts, offset, end);
        Ok(())
    }

    fn zero_range(&self, offset: u64, len: u64) -> io::Result<()> {
        let mut inner = self.lock();
        // Check before allocating the zeros, so an absurd length is an error, not an abort.
        if !inner.crashed {
            check_range(offset, len, inner.live.len() as u64)?;
        }
        let zeros: Arc<[u8]> = vec![0u8; usize_of(len.min(inner.live.len() as u64))].into();
        inner.write(zeros, offset, true)
    }

    fn name(&self) -> String {
        "fault".to_string()
    }
}

#[cfg(test)]
// Expected answers of `zero_ranges` are often a single range.
#[allow(clippy::single_range_in_vec_init)]
mod tests {
    use super::*;
    use proptest::prelude::*;
    // Named, so it wins over the older `Rng` the proptest prelude brings in.
    use rand::Rng;
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
            b.write_at(&vec![1; usize_of(2 * (n - i))], i).unwrap();
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
                let len = len.min(2048 - usize_of(off));
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
            results.push(b.write_at(&[u8::try_from(i).unwrap(); 4096], off).is_ok());
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
    fn a_flush_dropping_writes_loses_them_but_reads_see_them_until_dropped_from_the_cache() {
        let b = FaultBackend::new(8192).unwrap();
        b.write_at(&[1; 1024], 0).unwrap();
        b.flush().unwrap();
        b.write_at(&[2; 1024], 0).unwrap();
        b.write_at(&[3; 1024], 4096).unwrap();
        b.fail_next_flush_dropping_writes();
        let e = b.flush().unwrap_err();
        assert_eq!(InjectedFault::of(&e), Some(InjectedFault::Error));
        assert!(
            b.unflushed().is_empty(),
            "no crash image holds the dropped writes"
        );
        assert_eq!(b.events().last(), Some(&Event::FlushFailedDroppingWrites));
        assert_eq!(b.state_at(b.events().len()), b.crash_state());
        // Still visible, like pages whose writeback failed; a later flush succeeds without them.
        assert_eq!(read(&b, 0, 1024), vec![2; 1024]);
        b.flush().unwrap();
        assert_eq!(&b.durable_image()[..1024], &[1; 1024][..]);
        // A new write over part of a lost range is real again; dropping the cache shows the
        // medium everywhere else.
        b.write_at(&[4; 512], 4096).unwrap();
        assert!(b.drop_cached(0, 100_000).is_err(), "outside the store");
        b.drop_cached(0, 8192).unwrap();
        assert_eq!(read(&b, 0, 1024), vec![1; 1024]);
        assert_eq!(read(&b, 4096, 512), vec![4; 512]);
        assert_eq!(read(&b, 4608, 512), vec![0; 512]);
        b.drop_cached(0, 8192).unwrap();
        assert_eq!(
            read(&b, 4096, 512),
            vec![4; 512],
            "dropping twice changes nothing"
        );
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
    fn zero_ranges_reflect_the_live_image_and_suffer_no_faults() {
        let b = FaultBackend::new(8 * 512).unwrap().with_seed(9);
        assert_eq!(b.zero_ranges(0, 4096).unwrap(), [0..4096]);
        b.write_at(&[1; 10], 600).unwrap();
        assert_eq!(
            b.zero_ranges(0, 4096).unwrap(),
            [0..512, 1024..4096],
            "unflushed counts"
        );
        b.flush().unwrap();
        b.write_at(&[2; 512], 3072).unwrap();
        assert_eq!(b.zero_ranges(0, 4096).unwrap(), [0..512, 1024..3072, 3584..4096]);
        // Only sectors wholly inside the range.
        assert_eq!(b.zero_ranges(100, 1500).unwrap(), [1024..1536]);
        assert_eq!(b.zero_ranges(1100, 400).unwrap(), []);
        b.zero_range(600, 10).unwrap();
        assert_eq!(b.zero_ranges(0, 4096).unwrap(), [0..3072, 3584..4096]);
        for (off, len) in [(4096, 1), (1, 4096), (u64::MAX, 1)] {
            let e = b.zero_ranges(off, len).unwrap_err();
            assert_eq!(e.kind(), io::ErrorKind::InvalidInput);
            assert_eq!(InjectedFault::of(&e), None);
        }

        // No fault applies: errors, read faults and the generator are left alone.
        let twin = FaultBackend::from_image(b.live_image()).with_seed(9);
        for x in [&b, &twin] {
            x.set_read_fault_rate(0.5).unwrap();
            x.set_error_rate(0.5, 0.0, 0.0).unwrap();
        }
        b.fail_reads_at(0..4096);
        b.zero_next_read();
        let (events, stats) = (b.events(), b.stats());
        for _ in 0..20 {
            assert_eq!(b.zero_ranges(0, 4096).unwrap(), [0..3072, 3584..4096]);
        }
        assert_eq!((b.events(), b.stats()), (events, stats));
        b.clear_faults();
        b.set_read_fault_rate(0.5).unwrap();
        b.set_error_rate(0.5, 0.0, 0.0).unwrap();
        let outcome = |x: &FaultBackend| {
            (0..20)
                .map(|i| {
                    let mut buf = [0u8; 512];
                    x.read_at(&mut buf, (i % 8) * 512).map(|()| buf.to_vec()).ok()
                })
                .collect::<Vec<_>>()
        };
        assert_eq!(
            outcome(&b),
            outcome(&twin),
            "zero_ranges drew nothing from the generator"
        );

        b.crash_now();
        let e = b.zero_ranges(0, 512).unwrap_err();
        assert_eq!(InjectedFault::of(&e), Some(InjectedFault::Crashed));
    }

    #[test]
    fn start_writeback_checks_its_range_only() {
        let b = FaultBackend::new(4096).unwrap();
        b.write_at(&[1; 4096], 0).unwrap();
        b.start_writeback(0, 4096).unwrap();
        b.start_writeback(9999, 0).unwrap();
        let e = b.start_writeback(4000, 97).unwrap_err();
        assert_eq!(e.kind(), io::ErrorKind::InvalidInput);
        assert_eq!(b.unflushed().len(), 1, "a hint makes nothing durable");
        assert_eq!(b.events().len(), 1);
    }

    /// Blocks of 4 KiB, block `i` filled with `i + 1`, all flushed.
    fn numbered_blocks(n: u64) -> FaultBackend {
        let b = FaultBackend::new(n * 4096).unwrap();
        for i in 0..n {
            b.write_at(&[u8::try_from(i + 1).unwrap(); 4096], i * 4096)
                .unwrap();
        }
        b.flush().unwrap();
        b
    }

    #[test]
    fn one_shot_read_faults_hit_one_read_and_change_nothing() {
        let b = numbered_blocks(4);
        b.write_at(&[9; 100], 4 * 4096 - 100).unwrap();
        let (events, live, state) = (b.events(), b.live_image(), b.crash_state());

        b.zero_next_read();
        assert_eq!(read(&b, 0, 4096), [0; 4096]);
        assert_eq!(read(&b, 0, 4096), [1; 4096], "transient");

        b.misdirect_next_read(4096);
        assert_eq!(read(&b, 0, 4096), [2; 4096]);
        assert_eq!(read(&b, 0, 4096), [1; 4096]);

        // Partly outside the store: zeros for that part; wholly outside: zeros.
        b.misdirect_next_read(4 * 4096 - 100);
        let got = read(&b, 0, 200);
        assert_eq!((&got[..100], &got[100..]), (&[9; 100][..], &[0; 100][..]));
        b.misdirect_next_read(u64::MAX);
        assert_eq!(read(&b, 4096, 10), [0; 10]);
        assert_eq!(read(&b, 4096, 10), [2; 10]);

        // A stale read of a range an unflushed write overlaps returns the durable data.
        b.stale_next_read();
        assert_eq!(read(&b, 4 * 4096 - 200, 200), [4; 200]);
        assert_eq!(read(&b, 4 * 4096 - 200, 200)[150..], [9; 50]);

        // Another one-shot replaces the one not yet used.
        b.zero_next_read();
        b.misdirect_next_read(8192);
        assert_eq!(read(&b, 0, 8), [3; 8]);
        assert_eq!(read(&b, 0, 8), [1; 8]);

        // Failing and empty reads neither suffer nor use it.
        b.fail_reads_at(8192..8193);
        b.zero_next_read();
        assert!(b.read_at(&mut [0; 8], 8190).is_err());
        b.read_at(&mut [], 0).unwrap();
        assert_eq!(read(&b, 8193, 8), [0; 8]);
        assert_eq!(read(&b, 8193, 8), [3; 8]);

        assert_eq!(b.events(), events, "reads record nothing");
        assert_eq!(b.live_image(), live, "the medium is unchanged");
        assert_eq!(b.crash_state(), state);
        let s = b.stats();
        assert_eq!((s.zeroed_reads, s.misdirected_reads, s.stale_reads), (2, 4, 1));
        assert_eq!(s.failed_reads, 1);
        assert_eq!(s.injected_faults, 8);
    }

    #[test]
    fn stale_reads_return_the_data_before_the_last_write() {
        let b = FaultBackend::new(4 * 512).unwrap();
        let stale = |off: u64, len: usize| {
            b.stale_next_read();
            read(&b, off, len)
        };
        assert_eq!(stale(0, 512), [0; 512], "never written: as it is");
        b.write_at(&[b'a'; 1024], 0).unwrap();
        assert_eq!(stale(0, 1024), [0; 1024], "unflushed: the durable image");
        b.flush().unwrap();
        assert_eq!(stale(0, 1024), [0; 1024], "flushed: before the write");
        assert_eq!(stale(1024, 1024), [0; 1024]);
        b.write_at(&[b'b'; 512], 512).unwrap();
        b.flush().unwrap();
        // 512..1024 was last written by the b's; before them it held a's. 0..512 was last
        // written by the a's.
        assert_eq!(stale(0, 1024), [b'a'; 1024]);
        assert_eq!(stale(256, 512), [b'a'; 512]);
        assert_eq!(stale(512, 512), [b'a'; 512]);
        assert_eq!(stale(0, 512), [0; 512]);
        assert_eq!(
            read(&b, 0, 1024)[512..],
            [b'b'; 512],
            "and the medium is unchanged"
        );

        // Only the range's own writes matter: an unflushed write elsewhere changes nothing.
        b.write_at(&[b'c'; 512], 1536).unwrap();
        assert_eq!(stale(0, 1024), [b'a'; 1024]);
        let mut durable = vec![b'a'; 512];
        durable.extend([b'b'; 512]);
        durable.extend([0; 1024]);
        assert_eq!(
            stale(0, 2048),
            durable,
            "an unflushed write overlaps: durable image"
        );
        // Two unflushed writes: the durable image, not the state between them.
        b.write_at(&[b'x'; 100], 1600).unwrap();
        assert_eq!(stale(1536, 512), [0; 512]);
        assert_eq!(
            stale(1500, 100),
            [0; 100],
            "overlaps only the first unflushed write"
        );

        // A misdirected write is remembered where it landed.
        b.flush().unwrap();
        b.misdirect_next_write(1024);
        b.write_at(&[b'd'; 512], 0).unwrap();
        b.flush().unwrap();
        assert_eq!(stale(1024, 512), [0; 512]);
        assert_eq!(
            stale(0, 512),
            [0; 512],
            "0..512 untouched by the misdirected write"
        );

        // Several writes, several flushes: always the state before the last one.
        for i in 1..=5u8 {
            b.write_at(&[i; 100], 1100).unwrap();
            b.flush().unwrap();
            let before = if i == 1 { b'd' } else { i - 1 };
            assert_eq!(stale(1100, 100), [before; 100]);
            let got = stale(1050, 200);
            assert_eq!(got[..50], [b'd'; 50]);
            assert_eq!(got[50..150], [before; 100]);
            assert_eq!(got[150..], [b'd'; 50]);
        }
        assert_eq!(b.stats().stale_reads, 24);
    }

    /// The answers of stale reads of `queries`, from the history alone: the replayed durable
    /// image if an unflushed write overlaps the range, else the image before the last write
    /// (all landed pieces of a torn write count as one) overlapping the range, else the image
    /// itself.
    fn stale_reference(initial: &[u8], events: &[Event], queries: &[Range<u64>]) -> Vec<Vec<u8>> {
        /// The pieces a write landed, and the image before it.
        type Landed = (Vec<(u64, u64)>, Vec<u8>);
        let mut cur = initial.to_vec();
        let mut durable = cur.clone();
        let mut pending: Vec<(u64, u64)> = Vec::new();
        let mut writes: Vec<Landed> = Vec::new();
        let mut torn_pieces_left = 0usize;
        for e in events {
            match e {
                Event::TornWrite { offset, len, mask } => {
                    torn_pieces_left = kept_runs(*offset, usize_of(*len), mask).len();
                    writes.push((Vec::new(), cur.clone()));
                }
                Event::Write { write, .. } => {
                    let piece = (write.offset, write.end());
                    if torn_pieces_left > 0 {
                        torn_pieces_left -= 1;
                        if let Some(last) = writes.last_mut() {
                            last.0.push(piece);
                        }
                    } else {
                        writes.push((vec![piece], cur.clone()));
                    }
                    write.apply(&mut cur);
                    pending.push(piece);
                }
                Event::Flush { .. } => {
                    durable = cur.clone();
                    pending.clear();
                }
                _ => {}
            }
        }
        queries
            .iter()
            .map(|q| {
                let hits = |&(lo, hi): &(u64, u64)| lo < q.end && q.start < hi;
                let (a, b) = (usize_of(q.start), usize_of(q.end));
                if pending.iter().any(hits) {
                    return durable[a..b].to_vec();
                }
                match writes.iter().rev().find(|(pieces, _)| pieces.iter().any(hits)) {
                    Some((_, before)) => before[a..b].to_vec(),
                    None => cur[a..b].to_vec(),
                }
            })
            .collect()
    }

    #[test]
    fn stale_reads_match_a_replay_of_the_history() {
        let seed: u64 = rand::random();
        println!("seed {seed}");
        let mut rng = ChaCha8Rng::seed_from_u64(seed);
        let size = 4096u64;
        let b = FaultBackend::from_image((0..size).map(|i| (i % 251) as u8).collect());
        let initial = b.live_image();
        for step in 0..400 {
            let off = rng.random_range(0..size);
            let len = rng.random_range(1..=1500u64).min(size - off);
            let fill = rng.random_range(1..=255u8);
            match rng.random_range(0..10) {
                0 | 1 => b.flush().unwrap(),
                2 => b.zero_range(off, len).unwrap(),
                3 => {
                    b.misdirect_next_write(rng.random_range(0..size));
                    b.write_at(&vec![fill; usize_of(len)], off).unwrap();
                }
                4 => {
                    b.lose_next_write();
                    b.write_at(&vec![fill; usize_of(len)], off).unwrap();
                }
                5 => {
                    let n = sector_count(off, usize_of(len));
                    b.tear_next_write((0..n).map(|_| rng.random_bool(0.5)).collect());
                    let half = usize_of(len / 2);
                    let data = vec![fill; usize_of(len)];
                    b.write_vectored_at(&[&data[..half], &data[half..]], off).unwrap();
                }
                _ => b.write_at(&vec![fill; usize_of(len)], off).unwrap(),
            }
            let queries: Vec<Range<u64>> = (0..4)
                .map(|_| {
                    let qo = rng.random_range(0..size);
                    qo..qo + rng.random_range(1..=2000u64).min(size - qo)
                })
                .collect();
            let expected = stale_reference(&initial, &b.events(), &queries);
            let live = b.live_image();
            for (q, expect) in queries.into_iter().zip(expected) {
                let (qo, ql) = (q.start, usize_of(q.end - q.start));
                b.stale_next_read();
                assert_eq!(read(&b, qo, ql), expect, "seed {seed} step {step} {q:?}");
                assert_eq!(read(&b, qo, ql), live[usize_of(q.start)..usize_of(q.end)]);
            }
        }
        let st = b.stats();
        assert_eq!(st.stale_reads, 1600);
        assert!(st.torn_writes > 0 && st.misdirected_writes > 0 && st.lost_writes > 0);
    }

    #[test]
    fn read_fault_rules_and_precedence() {
        let b = numbered_blocks(4);
        b.write_at(&[7; 4096], 8192).unwrap();
        b.flush().unwrap();
        b.read_faults_with(|off, len| match (off, len) {
            (0, _) => Some(ReadFault::Zeros),
            (4096, 4096) => Some(ReadFault::From(3 * 4096)),
            (8192, _) => Some(ReadFault::Stale),
            _ => None,
        });
        for _ in 0..3 {
            assert_eq!(read(&b, 0, 4096), [0; 4096]);
            assert_eq!(read(&b, 4096, 4096), [4; 4096]);
            assert_eq!(read(&b, 4096, 100), [2; 100], "the rule sees the length");
            assert_eq!(read(&b, 8192, 4096), [3; 4096]);
            assert_eq!(read(&b, 12288, 4096), [4; 4096]);
        }
        // A one-shot fault comes first; the rule takes precedence over the rate.
        b.misdirect_next_read(4096);
        assert_eq!(read(&b, 0, 4), [2; 4]);
        b.set_read_fault_rate(1.0).unwrap();
        assert_eq!(read(&b, 12288, 4), [4; 4]);
        let s = b.stats();
        assert_eq!((s.zeroed_reads, s.misdirected_reads, s.stale_reads), (3, 4, 3));

        b.clear_faults();
        b.zero_next_read();
        b.stale_next_read();
        b.clear_faults();
        for off in [0, 4096, 8192] {
            assert_eq!(read(&b, off, 4)[0], [1, 2, 7][usize_of(off / 4096)]);
        }
        assert_eq!(b.stats().injected_faults, 10);
    }

    /// `n` reads of 4 KiB blocks of a backend with distinct block contents and read faults at
    /// rate `p`, as (block read, bytes returned).
    fn read_fault_workload(seed: u64, p: f64) -> (Vec<(u64, Vec<u8>)>, FaultStats) {
        let b = numbered_blocks(16).with_seed(seed);
        b.write_at(&[0xee; 4096], 0).unwrap(); // unflushed: block 0 reads stale as 1s
        b.set_read_fault_rate(p).unwrap();
        let out = (0..300u64)
            .map(|i| {
                let blk = (i * 7) % 16;
                (blk, read(&b, blk * 4096, 4096))
            })
            .collect();
        (out, b.stats())
    }

    #[test]
    fn random_read_faults_are_reproducible_and_of_every_kind() {
        let (a, sa) = read_fault_workload(11, 1.0);
        assert_eq!((a.clone(), sa), read_fault_workload(11, 1.0));
        assert_ne!(read_fault_workload(12, 1.0).0, a, "another seed, other faults");
        // Block 0 reads stale as its durable 1s; the other blocks read stale as the zeros they
        // held before being written, indistinguishable from zeroed reads; a misdirected read
        // returns another block (every block is non-zero and unique).
        let (mut zeros, mut moved, mut stale_block0) = (0u64, 0u64, 0u64);
        for (blk, data) in &a {
            let own = if *blk == 0 {
                0xee
            } else {
                u8::try_from(*blk + 1).unwrap()
            };
            assert!(
                data.iter().all(|&x| x == data[0]),
                "whole blocks: aligned misdirection"
            );
            match data[0] {
                x if x == own => panic!("block {blk} read correctly at rate 1"),
                0 => zeros += 1,
                1 if *blk == 0 => stale_block0 += 1,
                _ => moved += 1,
            }
        }
        assert_eq!(moved, sa.misdirected_reads);
        assert_eq!(zeros + stale_block0, sa.zeroed_reads + sa.stale_reads);
        assert!(stale_block0 > 0);
        assert_eq!(sa.zeroed_reads + sa.misdirected_reads + sa.stale_reads, 300);
        assert_eq!(sa.injected_faults, 300);
        assert!(
            sa.zeroed_reads > 60 && sa.misdirected_reads > 60 && sa.stale_reads > 60,
            "{sa:?}"
        );

        let (half, sh) = read_fault_workload(11, 0.3);
        let faulty = sh.zeroed_reads + sh.misdirected_reads + sh.stale_reads;
        assert!((40..140).contains(&faulty), "{faulty} of 300 at rate 0.3");
        let correct = half
            .iter()
            .filter(|(blk, d)| {
                d[0] == if *blk == 0 {
                    0xee
                } else {
                    u8::try_from(*blk + 1).unwrap()
                }
            })
            .count();
        assert!(correct >= 300 - usize_of(faulty));

        let b = FaultBackend::new(4096).unwrap();
        assert_eq!(b.set_read_fault_rate(1.5), Err(InvalidProbability(1.5)));
        assert!(b.set_read_fault_rate(f64::NAN).is_err());
    }

    #[test]
    fn read_faults_at_rate_zero_leave_seeded_faults_unchanged() {
        let (a, b) = (faulty(42), faulty(42));
        b.set_read_fault_rate(0.0).unwrap();
        assert_eq!(workload(&a), workload(&b));
        assert_eq!(a.events(), b.events());
        assert_eq!(a.stats(), b.stats());
        let s = b.stats();
        assert_eq!(
            s.zeroed_reads + s.misdirected_reads + s.stale_reads + s.torn_writes,
            0
        );
    }

    #[test]
    fn reads_draw_nothing_when_read_faults_are_off() {
        // Write faults only: interleaving reads must not shift the write faults a seed gives,
        // with the read-fault rate never set or set to zero.
        let run = |reads: bool, read_rate: Option<f64>| {
            let b = FaultBackend::new(64 * 4096).unwrap().with_seed(5);
            b.set_error_rate(0.0, 0.1, 0.1).unwrap();
            b.set_lost_write_rate(0.1).unwrap();
            b.set_misdirect_rate(0.1).unwrap();
            if let Some(p) = read_rate {
                b.set_read_fault_rate(p).unwrap();
            }
            for i in 0..200u64 {
                let _ = b.write_at(&[u8::try_from(i).unwrap(); 4096], (i % 64) * 4096);
                if reads {
                    b.read_at(&mut [0; 4096], (i * 3 % 64) * 4096).unwrap();
                }
                if i % 10 == 0 {
                    let _ = b.flush();
                }
            }
            b.events()
        };
        let quiet = run(false, None);
        assert_eq!(run(true, None), quiet);
        assert_eq!(run(true, Some(0.0)), quiet);
        assert_ne!(run(true, Some(0.1)), quiet, "a non-zero rate does draw");
    }

    #[test]
    fn torn_write_stores_only_flagged_sectors() {
        let b = FaultBackend::from_image(vec![9; 4 * 512]);
        b.tear_next_write(vec![true, false, true]);
        // Bytes 100..1300: a partial sector 0, full sector 1, partial sector 2.
        b.write_at(&[7; 1200], 100).unwrap();
        let live = b.live_image();
        for (i, &x) in live.iter().enumerate() {
            let landed = (100..512).contains(&i) || (1024..1300).contains(&i);
            assert_eq!(x, if landed { 7 } else { 9 }, "byte {i}");
        }
        let pending = b.unflushed();
        assert_eq!(
            pending.iter().map(|w| (w.offset, w.end())).collect::<Vec<_>>(),
            [(100, 512), (1024, 1300)]
        );
        let events = b.events();
        assert_eq!(
            events[0],
            Event::TornWrite {
                offset: 100,
                len: 1200,
                mask: vec![true, false, true]
            }
        );
        assert!(matches!(
            events[2],
            Event::Write {
                intended_offset: 1024,
                write: PendingWrite { offset: 1024, .. },
                zero_range: false
            }
        ));
        assert_eq!(events.len(), 3);
        // Crash images agree with the live image: the skipped sector is old in all of them.
        assert_eq!(b.crash_image(&[0, 1]), live);
        assert_eq!(b.crash_image(&[]), vec![9; 2048]);
        let n = b
            .for_each_crash_image(100, |img| assert_eq!(img[512..1024], [9; 512]))
            .unwrap();
        assert_eq!(n, 4);
        let s = b.stats();
        assert_eq!((s.writes, s.torn_writes, s.injected_faults), (1, 1, 1));

        // Only the next write; then whole again.
        b.write_at(&[6; 1200], 100).unwrap();
        assert_eq!(read(&b, 100, 1200), [6; 1200]);
        b.flush().unwrap();
        assert_eq!(b.durable_image(), b.live_image());

        // History points replay the torn write like any other.
        b.for_each_history_point(|n, st| assert_eq!(st, &b.state_at(n), "point {n}"));
        assert_eq!(b.state_at(3).unflushed().len(), 2);
    }

    #[test]
    fn torn_write_with_a_mask_of_the_wrong_length_stores_nothing() {
        let b = FaultBackend::new(2048).unwrap();
        b.tear_next_write(vec![true; 2]);
        let e = b.write_at(&[1; 1200], 100).unwrap_err();
        assert_eq!(e.kind(), io::ErrorKind::InvalidInput);
        assert_eq!(InjectedFault::of(&e), None);
        assert!(e.to_string().contains("3 sectors"), "{e}");
        assert_eq!(b.live_image(), vec![0; 2048]);
        assert!(b.events().is_empty() && b.unflushed().is_empty());
        assert_eq!(b.stats().torn_writes, 0);
        b.write_at(&[1; 1200], 100).unwrap();
        assert_eq!(read(&b, 100, 1200), [1; 1200], "the mask was used up");

        // A rule answering with a wrong length fails every write it tears.
        b.tear_writes_with(|_, _| Some(vec![true]));
        assert!(b.zero_range(0, 1024).is_err());
        assert!(b.write_at(&[2; 10], 510).is_err(), "two sectors");
        b.write_at(&[2; 10], 0).unwrap();
        assert_eq!(read(&b, 0, 11), [2, 2, 2, 2, 2, 2, 2, 2, 2, 2, 0]);
        // Out-of-range and empty writes are refused or ignored before any tearing.
        b.tear_next_write(vec![]);
        assert_eq!(
            b.write_at(&[1], 2048).unwrap_err().kind(),
            io::ErrorKind::InvalidInput
        );
        b.write_at(&[], 0).unwrap();
        b.clear_faults();
        b.write_at(&[3; 1024], 0).unwrap();
        assert_eq!(read(&b, 0, 1024), [3; 1024], "cleared: mask and rule");
    }

    #[test]
    fn torn_writes_by_rule_with_zero_ranges_misdirection_and_all_false_masks() {
        let b = FaultBackend::from_image(vec![1; 8 * 512]);
        b.tear_writes_with(|off, len| (off == 0 && len == 2048).then(|| vec![true, false, true, false]));
        b.zero_range(0, 2048).unwrap();
        assert_eq!(sectors(&b.live_image()), "0\u{1}0\u{1}\u{1}\u{1}\u{1}\u{1}");
        assert!(b.unflushed().iter().all(|w| w.data.iter().all(|&x| x == 0)));
        assert!(matches!(b.events()[1], Event::Write { zero_range: true, .. }));
        b.write_at(&[5; 2048], 2048).unwrap();
        assert_eq!(
            read(&b, 2048, 2048),
            [5; 2048],
            "the rule tears only what it selects"
        );

        // All false: acknowledged, nothing stored, nothing pending.
        b.flush().unwrap();
        b.tear_next_write(vec![false; 2]);
        b.write_at(&[8; 600], 0).unwrap();
        assert_eq!(read(&b, 0, 600), b.durable_image()[..600]);
        assert!(b.unflushed().is_empty());
        assert!(matches!(
            b.events().last(),
            Some(Event::TornWrite { len: 600, .. })
        ));

        // Torn and misdirected: the flags pick the data's sectors, which land elsewhere.
        b.misdirect_next_write(3072);
        b.tear_next_write(vec![false, true]);
        b.write_vectored_at(&[&[6; 512][..], &[7; 512][..]], 0).unwrap();
        assert_eq!(read(&b, 3072, 1024)[..512], [5; 512]);
        assert_eq!(read(&b, 3584, 512), [7; 512]);
        assert_eq!(b.unflushed()[0].offset, 3584);
        let s = b.stats();
        assert_eq!(
            (s.torn_writes, s.misdirected_writes, s.injected_faults),
            (3, 1, 4)
        );

        // A stale read of a torn write's range sees the old data only where it landed.
        b.flush().unwrap();
        b.stale_next_read();
        assert_eq!(read(&b, 3072, 1024)[512..], [5; 512]);
    }

    #[test]
    fn a_pending_sector_reads_again_once_rewritten_whole() {
        let b = FaultBackend::new(8192).unwrap();
        b.fail_reads_until_rewritten(512..1024);
        let mut buf = [0u8; 512];
        assert!(b.read_at(&mut buf, 512).is_err());
        assert!(b.read_at(&mut buf, 0).is_ok(), "only the pending sector fails");
        b.write_at(&[1u8; 256], 512).unwrap();
        assert!(
            b.read_at(&mut buf, 512).is_err(),
            "a partial write does not remap it"
        );
        b.write_at(&[2u8; 1024], 0).unwrap();
        b.read_at(&mut buf, 512).unwrap();
        assert_eq!(buf, [2u8; 512]);
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
