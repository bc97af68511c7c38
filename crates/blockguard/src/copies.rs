//! A set of copies: the layer between the backends and the volume engine.
//!
//! The engine always works on a [`CopySet`]: one member for a plain volume, two or three for
//! a mirrored one. As a [`Backend`] it writes every byte to every member still in sync (in
//! parallel when there are several and the write is large), flushes all of them, and reads
//! from one (spread over the members by offset, so parallel sequential reads use every
//! disk). What only the engine can judge — whether bytes read from one member are right —
//! it asks through [`CopySet::read_from`] and [`CopySet::write_to`]: read repair and resync
//! are the engine's, not this layer's.
//!
//! A member whose write or flush fails is dropped from the set at once (never read or written
//! again in this session) and reported by [`CopySet::take_new_failures`], so the engine can
//! record it in the surviving superblocks before the flush that follows reports success. An
//! operation fails only when no member in sync is left to take it.

use blockguard_backend::Backend;
use std::io;
use std::ops::Range;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, PoisonError};

/// Reads are spread over the members in stripes of this many bytes.
const READ_STRIPE: u64 = 1 << 20;

/// Writes at least this long go to the members on parallel threads.
const PARALLEL_WRITE_MIN: usize = 256 << 10;

/// One member of a set.
#[derive(Debug)]
struct Member {
    backend: Arc<dyn Backend>,
    /// Holds the volume's current contents: read and written.
    in_sync: AtomicBool,
    /// Being resynchronized while the volume is in use: written (so that what the resync
    /// has copied stays current) but never read, and never counted as holding a write.
    catching_up: AtomicBool,
    /// Its backend is the member itself (false: the member is missing and `backend` is a
    /// stand-in that is never read or written).
    present: bool,
}

/// How a member joins a [`CopySet`].
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum MemberState {
    /// Holds the current contents: read and written.
    InSync,
    /// Present but behind (it missed writes): neither read nor written until resynchronized.
    OutOfSync,
    /// Missing: the backend given is a stand-in, never used.
    Absent,
}

/// The members of a volume, written together and read one at a time.
#[derive(Debug)]
pub struct CopySet {
    members: Vec<Member>,
    /// Members dropped since the engine last asked, with why.
    new_failures: Mutex<Vec<(usize, String)>>,
    /// Members in sync (kept beside the flags so the common single-member path is cheap).
    live: AtomicUsize,
    /// Reads that failed on one member and were served by another: (member, offset, length),
    /// for the engine to rewrite on the failing member.
    read_errors: Mutex<Vec<(usize, u64, usize)>>,
    /// `read_errors` is not empty (checked on every read without taking the lock).
    read_errors_pending: AtomicBool,
}

impl CopySet {
    /// A set of one: a plain volume.
    pub fn single(backend: Arc<dyn Backend>) -> CopySet {
        CopySet::new(vec![(backend, MemberState::InSync)])
    }

    /// A set of `members`, each with whether it is in sync.
    ///
    /// # Panics
    ///
    /// If `members` is empty: a volume lives on at least one backend.
    pub fn new(members: Vec<(Arc<dyn Backend>, MemberState)>) -> CopySet {
        assert!(!members.is_empty(), "a copy set needs a member");
        let live = members.iter().filter(|(_, s)| *s == MemberState::InSync).count();
        CopySet {
            members: members
                .into_iter()
                .map(|(backend, s)| Member {
                    backend,
                    in_sync: AtomicBool::new(s == MemberState::InSync),
                    catching_up: AtomicBool::new(false),
                    present: s != MemberState::Absent,
                })
                .collect(),
            new_failures: Mutex::new(Vec::new()),
            live: AtomicUsize::new(live),
            read_errors: Mutex::new(Vec::new()),
            read_errors_pending: AtomicBool::new(false),
        }
    }

    /// Number of members, in sync or not.
    pub fn count(&self) -> usize {
        self.members.len()
    }

    /// Whether member `i` is in sync.
    pub fn in_sync(&self, i: usize) -> bool {
        self.members[i].in_sync.load(Ordering::Acquire)
    }

    /// Whether member `i` is present (not a stand-in for a missing one).
    pub fn present(&self, i: usize) -> bool {
        self.members[i].present
    }

    /// Puts member `i` (present, resynchronized by the engine) back in sync: from now on it
    /// is read and written.
    ///
    /// # Panics
    ///
    /// If the member is absent: a stand-in can never hold the volume's contents.
    pub fn rejoin(&self, i: usize) {
        assert!(self.members[i].present, "an absent member cannot rejoin");
        if !self.members[i].in_sync.swap(true, Ordering::AcqRel) {
            self.live.fetch_add(1, Ordering::AcqRel);
        }
        self.members[i].catching_up.store(false, Ordering::Release);
    }

    /// Starts writing member `i` (present, out of sync) again without reading it: an online
    /// resync copies what it missed while every new write reaches it too. Returns false if
    /// it is catching up already (another resync owns it).
    ///
    /// # Panics
    ///
    /// If the member is absent or in sync: only a present member that fell behind can catch
    /// up, and writing a stand-in would lose the writes.
    pub fn begin_catch_up(&self, i: usize) -> bool {
        let m = &self.members[i];
        assert!(
            m.present && !m.in_sync.load(Ordering::Acquire),
            "only a present member out of sync can catch up"
        );
        !m.catching_up.swap(true, Ordering::AcqRel)
    }

    /// Stops writing member `i` that was catching up (its resync ended without finishing):
    /// it is out of sync again, neither read nor written.
    pub fn end_catch_up(&self, i: usize) {
        self.members[i].catching_up.store(false, Ordering::Release);
    }

    /// Whether member `i` is catching up (written, not read).
    pub fn catching_up(&self, i: usize) -> bool {
        self.members[i].catching_up.load(Ordering::Acquire)
    }

    /// The members every write goes to: those in sync and those catching up, in index order.
    pub fn writers(&self) -> Vec<usize> {
        (0..self.count())
            .filter(|&i| self.in_sync(i) || self.catching_up(i))
            .collect()
    }

    /// The members in sync, in index order.
    pub fn live(&self) -> Vec<usize> {
        (0..self.count()).filter(|&i| self.in_sync(i)).collect()
    }

    /// Member `i`'s backend.
    pub fn backend(&self, i: usize) -> &Arc<dyn Backend> {
        &self.members[i].backend
    }

    /// The member reads at `offset` go to first: members in sync take turns by stripe.
    pub fn pick(&self, offset: u64) -> usize {
        if self.members.len() == 1 {
            return 0;
        }
        // No allocation: this runs for every read.
        let n = self.live.load(Ordering::Acquire).max(1) as u64;
        let k = usize::try_from((offset / READ_STRIPE) % n).unwrap_or(0);
        self.members
            .iter()
            .enumerate()
            .filter(|(_, m)| m.in_sync.load(Ordering::Acquire))
            .nth(k)
            .map_or(0, |(i, _)| i)
    }

    /// Reads from member `i` only (in sync or not: resync and repair read where they must).
    pub fn read_from(&self, i: usize, buf: &mut [u8], offset: u64) -> io::Result<()> {
        self.members[i].backend.read_at(buf, offset)
    }

    /// Writes to member `i` only; a failure drops it from the set.
    pub fn write_to(&self, i: usize, buf: &[u8], offset: u64) -> io::Result<()> {
        self.members[i].backend.write_at(buf, offset).inspect_err(|e| {
            self.drop_member(i, format!("write at {offset} failed: {e}"));
        })
    }

    /// Flushes member `i` only; a failure drops it from the set.
    pub fn flush_one(&self, i: usize) -> io::Result<()> {
        self.members[i].backend.flush().inspect_err(|e| {
            self.drop_member(i, format!("flush failed: {e}"));
        })
    }

    /// Takes member `i` out of the set for this session (its failure is reported once by
    /// [`CopySet::take_new_failures`]). Returns whether it was in sync until now.
    pub fn drop_member(&self, i: usize, why: String) -> bool {
        let was_in_sync = self.members[i].in_sync.swap(false, Ordering::AcqRel);
        let was_catching_up = self.members[i].catching_up.swap(false, Ordering::AcqRel);
        if !was_in_sync && !was_catching_up {
            return false;
        }
        if was_in_sync {
            self.live.fetch_sub(1, Ordering::AcqRel);
        }
        tracing::error!(member = %self.members[i].backend.name(), "mirror member dropped: {why}");
        self.new_failures
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .push((i, why));
        was_in_sync
    }

    /// Whether reads failed on a member and were served by another since the last
    /// [`CopySet::take_read_errors`]. Cheap: one atomic load.
    pub fn has_read_errors(&self) -> bool {
        self.read_errors_pending.load(Ordering::Acquire)
    }

    /// The reads that failed on one member and were served by another since the last call:
    /// (member, offset, length).
    pub fn take_read_errors(&self) -> Vec<(usize, u64, usize)> {
        let mut errors = self.read_errors.lock().unwrap_or_else(PoisonError::into_inner);
        self.read_errors_pending.store(false, Ordering::Release);
        std::mem::take(&mut *errors)
    }

    /// Members dropped since the last call, with why.
    pub fn take_new_failures(&self) -> Vec<(usize, String)> {
        std::mem::take(&mut *self.new_failures.lock().unwrap_or_else(PoisonError::into_inner))
    }

    /// Runs `op` on every member written (in sync or catching up); members it fails on are
    /// dropped. Succeeds if it succeeded on at least one member in sync (a member catching up
    /// holds only part of the volume: it alone never carries a write); else returns the
    /// first error.
    fn on_all(
        &self,
        large: bool,
        what: &str,
        op: impl Fn(&dyn Backend) -> io::Result<()> + Sync,
    ) -> io::Result<()> {
        if self.members.len() == 1 {
            // A plain volume: its backend's error is the error, and it is never dropped.
            return op(&*self.members[0].backend);
        }
        let live = self.writers();
        let results: Vec<io::Result<()>> = if large && live.len() > 1 {
            std::thread::scope(|s| {
                let handles: Vec<_> = live
                    .iter()
                    .map(|&i| {
                        let op = &op;
                        let backend = &*self.members[i].backend;
                        s.spawn(move || op(backend))
                    })
                    .collect();
                handles
                    .into_iter()
                    .map(|h| {
                        h.join()
                            .unwrap_or_else(|_| Err(io::Error::other("a mirror write thread panicked")))
                    })
                    .collect()
            })
        } else {
            live.iter().map(|&i| op(&*self.members[i].backend)).collect()
        };
        let ok = live
            .iter()
            .zip(&results)
            .any(|(&i, r)| r.is_ok() && self.in_sync(i));
        let mut first_err = None;
        for (&i, r) in live.iter().zip(results) {
            if let Err(e) = r {
                // When no member in sync took the operation, the failure is the volume's, not
                // a member's: dropping them all would leave nothing to resume from (a full
                // filesystem under every copy is as transient for a set as for one volume).
                // Members catching up are dropped either way.
                if ok || !self.in_sync(i) {
                    self.drop_member(i, format!("{what} failed: {e}"));
                }
                first_err.get_or_insert(e);
            }
        }
        match (ok, first_err) {
            (true, _) => Ok(()),
            (false, Some(e)) => Err(e),
            (false, None) => Err(io::Error::other("no mirror member is left in sync")),
        }
    }
}

impl Backend for CopySet {
    fn len(&self) -> u64 {
        self.members.iter().map(|m| m.backend.len()).min().unwrap_or(0)
    }

    fn read_at(&self, buf: &mut [u8], offset: u64) -> io::Result<()> {
        let first = self.pick(offset);
        match self.members[first].backend.read_at(buf, offset) {
            Ok(()) => Ok(()),
            Err(e) if self.members.len() == 1 => Err(e),
            Err(e) => {
                // An I/O error on one member: the others may still answer. (Wrong bytes are
                // the engine's to catch: it verifies and repairs through `read_from`.)
                for i in self.live().into_iter().filter(|&i| i != first) {
                    if self.members[i].backend.read_at(buf, offset).is_ok() {
                        tracing::warn!(member = %self.members[first].backend.name(), offset, "read failed, served by another member: {e}");
                        let mut errors = self.read_errors.lock().unwrap_or_else(PoisonError::into_inner);
                        // Bounded: a member failing every read is not remembered forever.
                        if errors.len() < 4096 {
                            errors.push((first, offset, buf.len()));
                        }
                        self.read_errors_pending.store(true, Ordering::Release);
                        return Ok(());
                    }
                }
                Err(e)
            }
        }
    }

    fn write_at(&self, buf: &[u8], offset: u64) -> io::Result<()> {
        self.on_all(buf.len() >= PARALLEL_WRITE_MIN, "write", |b| {
            b.write_at(buf, offset)
        })
    }

    fn write_vectored_at(&self, bufs: &[&[u8]], offset: u64) -> io::Result<()> {
        let len: usize = bufs.iter().map(|b| b.len()).sum();
        self.on_all(len >= PARALLEL_WRITE_MIN, "write", |b| {
            b.write_vectored_at(bufs, offset)
        })
    }

    fn flush(&self) -> io::Result<()> {
        self.on_all(true, "flush", |b| b.flush())
    }

    fn start_writeback(&self, offset: u64, len: u64) -> io::Result<()> {
        for i in self.writers() {
            self.members[i].backend.start_writeback(offset, len)?;
        }
        Ok(())
    }

    fn zero_range(&self, offset: u64, len: u64) -> io::Result<()> {
        self.on_all(false, "zeroing", |b| b.zero_range(offset, len))
    }

    fn zero_ranges(&self, offset: u64, len: u64) -> io::Result<Vec<Range<u64>>> {
        // Every member in sync received the same writes: any one's holes are the set's. A
        // hole only one member has would make a group look unwritten; ask them all and keep
        // what they agree on.
        let live = self.live();
        let Some((&first, rest)) = live.split_first() else {
            return self.members[0].backend.zero_ranges(offset, len);
        };
        let mut holes = self.members[first].backend.zero_ranges(offset, len)?;
        for &i in rest {
            let theirs = self.members[i].backend.zero_ranges(offset, len)?;
            holes = intersect(&holes, &theirs);
        }
        Ok(holes)
    }

    fn alignment(&self) -> usize {
        self.members
            .iter()
            .map(|m| m.backend.alignment())
            .max()
            .unwrap_or(1)
    }

    fn is_read_only(&self) -> bool {
        self.members.iter().any(|m| m.backend.is_read_only())
    }

    fn name(&self) -> String {
        self.members[0].backend.name()
    }
}

/// The intersection of two sorted lists of disjoint ranges.
fn intersect(a: &[Range<u64>], b: &[Range<u64>]) -> Vec<Range<u64>> {
    let (mut i, mut j, mut out) = (0, 0, Vec::new());
    while i < a.len() && j < b.len() {
        let lo = a[i].start.max(b[j].start);
        let hi = a[i].end.min(b[j].end);
        if lo < hi {
            out.push(lo..hi);
        }
        if a[i].end < b[j].end {
            i += 1;
        } else {
            j += 1;
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use blockguard_backend::{FaultBackend, MemoryBackend};

    #[test]
    #[allow(clippy::single_range_in_vec_init)] // Lists of ranges, some of one range.
    fn intersect_keeps_what_both_call_holes() {
        assert_eq!(intersect(&[0..10, 20..30], &[5..25]), vec![5..10, 20..25]);
        assert_eq!(intersect(&[0..10], &[]), Vec::<Range<u64>>::new());
        assert_eq!(intersect(&[0..100], &[0..100]), vec![0..100]);
    }

    #[test]
    fn writes_reach_every_member_and_a_failing_one_is_dropped() {
        let a: Arc<dyn Backend> = Arc::new(MemoryBackend::new(1 << 20).expect("memory"));
        let faulty = Arc::new(FaultBackend::new(1 << 20).expect("memory"));
        let set = CopySet::new(vec![
            (a.clone(), MemberState::InSync),
            (faulty.clone() as Arc<dyn Backend>, MemberState::InSync),
        ]);
        set.write_at(&[7u8; 4096], 8192).expect("both take it");
        let mut buf = [0u8; 4096];
        set.read_from(1, &mut buf, 8192).expect("read member 1");
        assert_eq!(buf, [7u8; 4096]);
        faulty.fail_writes_at(0..1 << 20);
        set.write_at(&[9u8; 4096], 0).expect("one member is enough");
        assert_eq!(set.live(), vec![0]);
        let failures = set.take_new_failures();
        assert_eq!(failures.len(), 1);
        assert_eq!(failures[0].0, 1);
        assert!(set.take_new_failures().is_empty(), "reported once");
        a.read_at(&mut buf, 0).expect("read");
        assert_eq!(buf, [9u8; 4096]);
        // Reads go only to members in sync.
        for off in (0..8).map(|k| k * READ_STRIPE) {
            assert_eq!(set.pick(off), 0);
        }
    }

    #[test]
    fn a_member_catching_up_is_written_never_read_and_never_carries_a_write_alone() {
        let a = Arc::new(FaultBackend::new(1 << 20).expect("memory"));
        let b: Arc<dyn Backend> = Arc::new(MemoryBackend::new(1 << 20).expect("memory"));
        let set = CopySet::new(vec![
            (a.clone() as Arc<dyn Backend>, MemberState::InSync),
            (b.clone(), MemberState::OutOfSync),
        ]);
        set.write_at(&[1u8; 512], 0).expect("write");
        let mut buf = [0u8; 512];
        b.read_at(&mut buf, 0).expect("read");
        assert_eq!(buf, [0u8; 512], "out of sync: not written");
        assert!(set.begin_catch_up(1));
        assert!(!set.begin_catch_up(1), "one resync at a time");
        assert_eq!(set.writers(), vec![0, 1]);
        set.write_at(&[2u8; 512], 512).expect("write");
        b.read_at(&mut buf, 512).expect("read");
        assert_eq!(buf, [2u8; 512], "catching up: written");
        for off in (0..8).map(|k| k * READ_STRIPE) {
            assert_eq!(set.pick(off), 0, "catching up: never read");
        }
        // The only member in sync fails: the member catching up alone cannot take the write.
        // The failure is the volume's: the member in sync is kept (to resume from), and the
        // resync of the one catching up stops on the volume's failure.
        a.fail_writes_at(0..1 << 20);
        set.write_at(&[3u8; 512], 0)
            .expect_err("no member in sync took it");
        assert_eq!(set.live(), vec![0]);
        set.end_catch_up(1);
        assert_eq!(set.writers(), vec![0]);
    }
}
