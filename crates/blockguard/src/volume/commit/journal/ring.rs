//! Space in the journal's log: where the next segment may go, and when space comes back.
//!
//! Pure bookkeeping, no I/O. A segment is *needed* while a crash could require replaying it:
//! from when it is written until a durable checkpoint names a later starting point. A
//! checkpoint may name a point past a segment only once that segment's home writes are
//! durable (issued before a completed barrier). New segments go only where no needed segment
//! is, so replay from the durable checkpoint always finds an intact chain; the space past a
//! checkpoint written but not yet flushed stays needed, because a crash may leave the older
//! checkpoint.
//!
//! Placement follows one rule replay can follow without knowing lengths in advance: a
//! segment goes right after the previous one, or at log offset 0 when it does not fit before
//! the end.

use crate::format::journal::Checkpoint;
use std::collections::VecDeque;

/// Where one written segment's home writes stand.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Home {
    /// Its blocks are not yet written home.
    Pending,
    /// Written home, not yet covered by a completed barrier.
    Issued,
    /// Home writes durable: the segment may be checkpointed past.
    Durable,
}

#[derive(Clone, Copy, Debug)]
struct Segment {
    seq: u64,
    off: u64,
    home: Home,
}

/// The log of one journal session.
#[derive(Debug)]
pub(crate) struct Ring {
    log_len: u64,
    session: u64,
    next_seq: u64,
    /// Where the segment after the last one would go (before wrapping).
    head: u64,
    /// Segments written since the durable checkpoint, oldest first.
    needed: VecDeque<Segment>,
    /// The checkpoint known durable.
    durable: Checkpoint,
    /// A checkpoint written but not yet covered by a barrier.
    written: Option<Checkpoint>,
    /// Segments written in this session.
    pub(crate) segments_written: u64,
}

impl Ring {
    /// A new session over an empty log: its first checkpoint (to be written and flushed
    /// before any segment) starts at offset 0.
    pub(crate) fn new(log_len: u64, session: u64, generation: u64) -> Ring {
        Ring {
            log_len,
            session,
            next_seq: 0,
            head: 0,
            needed: VecDeque::new(),
            durable: Checkpoint {
                session,
                seq: 0,
                tail: 0,
                generation,
            },
            written: None,
            segments_written: 0,
        }
    }

    /// The session's first checkpoint.
    pub(crate) fn start(&self) -> Checkpoint {
        self.durable
    }

    /// The session.
    pub(crate) fn session(&self) -> u64 {
        self.session
    }

    /// Sequence number of the next segment.
    pub(crate) fn next_seq(&self) -> u64 {
        self.next_seq
    }

    /// Log offset for a segment of `len` bytes, or `None` while needed segments are in the
    /// way (make room: a barrier, a checkpoint, a barrier).
    pub(crate) fn place(&self, len: u64) -> Option<u64> {
        if len > self.log_len {
            return None;
        }
        let fits_at_head = self.head + len <= self.log_len;
        let Some(first) = self.needed.front() else {
            return Some(if fits_at_head { self.head } else { 0 });
        };
        let start = first.off;
        if self.head > start {
            // Needed: [start, head).
            if fits_at_head {
                Some(self.head)
            } else if len <= start {
                Some(0)
            } else {
                None
            }
        } else {
            // Needed: [start, end) and [0, head) — or the whole log when head == start.
            (self.head + len <= start).then_some(self.head)
        }
    }

    /// Records a segment written at `off` (by [`Ring::place`]); its home writes are pending.
    pub(crate) fn append(&mut self, off: u64, len: u64) -> u64 {
        debug_assert_eq!(self.place(len), Some(off));
        let seq = self.next_seq;
        self.needed.push_back(Segment {
            seq,
            off,
            home: Home::Pending,
        });
        self.next_seq += 1;
        self.head = off + len;
        if self.head == self.log_len {
            self.head = 0;
        }
        self.segments_written += 1;
        seq
    }

    /// Every segment's home writes have been issued.
    pub(crate) fn home_issued(&mut self) {
        for s in &mut self.needed {
            if s.home == Home::Pending {
                s.home = Home::Issued;
            }
        }
    }

    /// A barrier completed: home writes issued before it are durable, and so is the
    /// checkpoint written before it (the segments it passes are no longer needed).
    pub(crate) fn barrier_done(&mut self) {
        for s in &mut self.needed {
            if s.home == Home::Issued {
                s.home = Home::Durable;
            }
        }
        if let Some(c) = self.written.take() {
            self.durable = c;
            while self.needed.front().is_some_and(|s| s.seq < c.seq) {
                self.needed.pop_front();
            }
        }
    }

    /// Some segment's home writes are issued but not yet durable.
    pub(crate) fn has_issued(&self) -> bool {
        self.needed.iter().any(|s| s.home == Home::Issued)
    }

    /// A checkpoint past every segment whose home writes are durable, if that passes more
    /// than the durable (or written) one does. The caller writes it, then calls
    /// [`Ring::checkpoint_written`].
    pub(crate) fn next_checkpoint(&self) -> Option<Checkpoint> {
        let (seq, tail) = match self.needed.iter().find(|s| s.home != Home::Durable) {
            Some(s) => (s.seq, s.off),
            None => (self.next_seq, self.head),
        };
        let current = self.written.unwrap_or(self.durable);
        (seq > current.seq).then_some(Checkpoint {
            session: self.session,
            seq,
            tail,
            generation: current.generation + 1,
        })
    }

    /// `c` has been written (both copies), not yet flushed.
    pub(crate) fn checkpoint_written(&mut self, c: Checkpoint) {
        self.written = Some(c);
    }

    /// Bytes of log the needed segments occupy (with the space skipped by a wrap).
    pub(crate) fn used(&self) -> u64 {
        let Some(first) = self.needed.front() else {
            return 0;
        };
        if self.head > first.off {
            self.head - first.off
        } else {
            self.log_len - first.off + self.head
        }
    }

    /// Needed segments.
    pub(crate) fn needed_segments(&self) -> usize {
        self.needed.len()
    }

    /// The log is more than half full: worth a checkpoint before the next segment.
    pub(crate) fn filling(&self) -> bool {
        self.used() > self.log_len / 2
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use rand::{Rng, SeedableRng};
    use rand_chacha::ChaCha8Rng;

    /// Model check: random segment sizes, barriers and checkpoints; a new segment never
    /// overlaps a segment still needed by the durable checkpoint, and the chain from the
    /// durable checkpoint, followed by the placement rule, reaches every needed segment.
    #[test]
    fn placement_never_overwrites_a_needed_segment() {
        for seed in 0..200u64 {
            let mut rng = ChaCha8Rng::seed_from_u64(seed);
            let log = 64 * 4096;
            let mut r = Ring::new(log, 9, 1);
            // (seq, off, len) of every segment on "disk", newest overwriting.
            let mut disk: Vec<(u64, u64, u64)> = Vec::new();
            for _ in 0..400 {
                let len = 4096 * rng.random_range(1..=16u64);
                let off = loop {
                    if let Some(off) = r.place(len) {
                        break off;
                    }
                    // Make room as the journal protocol does.
                    if r.has_issued() {
                        r.barrier_done();
                    }
                    let c = r.next_checkpoint().expect("room can always be made");
                    r.checkpoint_written(c);
                    r.barrier_done();
                };
                for s in &r.needed {
                    let (_, _, l) = disk.iter().find(|d| d.0 == s.seq).copied().unwrap();
                    let overlap = off < s.off + l && s.off < off + len;
                    assert!(
                        !overlap,
                        "seed {seed}: segment at {off}+{len} overlaps needed {s:?}"
                    );
                }
                disk.retain(|&(_, o, l)| !(off < o + l && o < off + len));
                let seq = r.append(off, len);
                disk.push((seq, off, len));
                if rng.random_bool(0.3) {
                    if let Some(c) = r.next_checkpoint().filter(|_| rng.random_bool(0.5)) {
                        r.checkpoint_written(c);
                    }
                }
                // The segment is durable (barrier), then its blocks go home.
                r.barrier_done();
                r.home_issued();
                // Replay from the durable checkpoint reaches every needed segment.
                let d = r.durable;
                let (mut off, mut seq) = (d.tail, d.seq);
                let find = |o: u64, q: u64| disk.iter().find(|&&(s, at, _)| s == q && at == o).copied();
                while seq < r.next_seq {
                    let hit = find(off, seq).or_else(|| find(0, seq));
                    let (_, at, l) = hit.unwrap_or_else(|| panic!("seed {seed}: replay lost seq {seq}"));
                    off = at + l;
                    seq += 1;
                }
            }
        }
    }

    #[test]
    fn an_empty_ring_wraps_and_a_full_one_refuses() {
        let mut r = Ring::new(10, 1, 0);
        assert_eq!(r.place(11), None);
        let a = r.append(r.place(6).unwrap(), 6);
        assert_eq!(a, 0);
        assert_eq!(
            r.place(5),
            None,
            "needed [0, 6): 4 left at the end, nothing before"
        );
        assert_eq!(r.place(4), Some(6));
        r.append(6, 4);
        assert_eq!(r.used(), 10);
        assert_eq!(r.place(1), None);
        r.home_issued();
        r.barrier_done();
        let c = r.next_checkpoint().unwrap();
        assert_eq!((c.seq, c.tail), (2, 0));
        r.checkpoint_written(c);
        assert_eq!(r.place(1), None, "the checkpoint is not durable yet");
        r.barrier_done();
        assert_eq!(r.used(), 0);
        assert_eq!(r.place(10), Some(0));
    }
}
