//! The write-back stage: blocks written since the last commit, held in memory so that the
//! metadata flush that must precede their data is paid once per batch, not once per write.

use crate::tag::Tag;
use std::collections::{BTreeMap, HashMap};
use std::sync::Arc;

/// A write request's bytes, shared by all of its staged blocks. Buffers handed over with
/// `Volume::write_owned` are kept as they are (no copy); the engine drops its reference once
/// the blocks' data has reached the backend.
pub(crate) type SharedBuf = crate::device::OwnedBuf;

/// The bytes of a shared buffer.
pub(crate) fn bytes(buf: &SharedBuf) -> &[u8] {
    (**buf).as_ref()
}

/// One staged block.
#[derive(Clone)]
pub(crate) enum Staged {
    /// New content — one block at byte `at` of a buffer shared by all blocks of the write
    /// request (at most one allocation and one copy per request, none for owned buffers) —
    /// and its tag.
    Data { buf: SharedBuf, at: usize, tag: Tag },
    /// The block becomes unwritten (discard / write zeroes): reads as zeros.
    Zero,
}

/// Blocks waiting for a commit, keyed by block number (sorted, so a commit walks groups in
/// order and coalesces neighbours into large writes).
pub(crate) type Batch = BTreeMap<u64, Staged>;

/// The active batch being filled and the batch being committed (still readable until its
/// data has reached the backend).
#[derive(Default)]
pub(crate) struct Stage {
    pub active: Batch,
    /// Memory the active batch keeps alive: the whole length of every distinct buffer its
    /// entries point into. A request's buffer counts once for all its blocks, and in full for
    /// as long as any one of them is staged — so rewriting all but one block of a large write
    /// cannot pin far more memory than the stage limit allows.
    pub active_bytes: usize,
    /// The active batch's buffers, by address: (length, entries pointing into it).
    buffers: HashMap<usize, (usize, usize)>,
    /// Entries of the active batch with data, and zeroed ones (what a journal segment of the
    /// batch costs).
    pub counts: (usize, usize),
    pub committing: Option<Arc<Batch>>,
}

/// Identifies a buffer while any entry holds it (its address cannot be reused meanwhile).
fn key(buf: &SharedBuf) -> usize {
    Arc::as_ptr(buf).cast::<()>() as usize
}

impl Staged {
    /// The block's content, or `None` for a zeroed block.
    pub(crate) fn data(&self, block_size: usize) -> Option<&[u8]> {
        match self {
            Staged::Data { buf, at, .. } => Some(&bytes(buf)[*at..*at + block_size]),
            Staged::Zero => None,
        }
    }
}

impl Stage {
    /// The newest staged version of `block`, if any.
    pub(crate) fn get(&self, block: u64) -> Option<&Staged> {
        self.active
            .get(&block)
            .or_else(|| self.committing.as_ref().and_then(|c| c.get(&block)))
    }

    /// True if nothing is staged (the common case for read-mostly loads: skips lookups).
    pub(crate) fn is_empty(&self) -> bool {
        self.active.is_empty() && self.committing.is_none()
    }

    /// Stages `entry` for `block`, replacing any older staged version (within a batch a block
    /// has exactly one new version, which is what the two brothers can describe).
    pub(crate) fn put(&mut self, block: u64, entry: Staged) {
        let count = |counts: &mut (usize, usize), e: &Staged, add: bool| {
            let c = match e {
                Staged::Data { .. } => &mut counts.0,
                Staged::Zero => &mut counts.1,
            };
            if add {
                *c += 1;
            } else {
                *c -= 1;
            }
        };
        count(&mut self.counts, &entry, true);
        if let Some(old) = self.active.get(&block) {
            count(&mut self.counts, old, false);
        }
        if let Staged::Data { buf, .. } = &entry {
            let (len, refs) = self.buffers.entry(key(buf)).or_insert((bytes(buf).len(), 0));
            if *refs == 0 {
                self.active_bytes += *len;
            }
            *refs += 1;
        }
        if let Some(Staged::Data { buf, .. }) = self.active.insert(block, entry) {
            let k = key(&buf);
            if let Some((len, refs)) = self.buffers.get_mut(&k) {
                *refs -= 1;
                if *refs == 0 {
                    self.active_bytes -= *len;
                    self.buffers.remove(&k);
                }
            } else {
                debug_assert!(false, "a staged buffer was not counted");
            }
        }
    }

    /// Takes the active batch (to commit it), leaving an empty one.
    pub(crate) fn take_active(&mut self) -> Batch {
        self.buffers.clear();
        self.active_bytes = 0;
        self.counts = (0, 0);
        std::mem::take(&mut self.active)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::tag::UNWRITTEN;

    fn data(fill: u8) -> Staged {
        Staged::Data {
            buf: Arc::new(vec![fill; 8]),
            at: 0,
            tag: UNWRITTEN,
        }
    }

    #[test]
    fn newest_version_wins_and_bytes_are_counted() {
        let mut s = Stage::default();
        assert!(s.is_empty());
        s.put(3, data(1));
        s.put(3, data(2));
        assert_eq!(s.active_bytes, 8);
        assert!(s.get(3).and_then(|e| e.data(8)) == Some(&[2u8; 8][..]));
        s.put(3, Staged::Zero);
        assert_eq!(s.active_bytes, 0);
        let batch = s.take_active();
        s.committing = Some(Arc::new(batch));
        assert!(matches!(s.get(3), Some(Staged::Zero)));
        s.put(3, data(4));
        assert!(s.get(3).and_then(|e| e.data(8)) == Some(&[4u8; 8][..]));
    }

    #[test]
    fn a_shared_buffer_counts_once_and_whole_until_its_last_block_leaves() {
        let mut s = Stage::default();
        let big: SharedBuf = Arc::new(vec![7u8; 4 * 8]);
        for (i, b) in (10..14).enumerate() {
            s.put(
                b,
                Staged::Data {
                    buf: big.clone(),
                    at: i * 8,
                    tag: UNWRITTEN,
                },
            );
        }
        assert_eq!(s.active_bytes, 32, "four blocks of one buffer: counted once");
        for b in 10..13 {
            s.put(b, data(1));
        }
        assert_eq!(
            s.active_bytes,
            32 + 3 * 8,
            "one block still pins the whole buffer"
        );
        s.put(13, Staged::Zero);
        assert_eq!(s.active_bytes, 3 * 8, "released with its last block");
        assert_eq!(s.take_active().len(), 4);
        assert_eq!(s.active_bytes, 0);
        s.put(1, data(2));
        assert_eq!(s.active_bytes, 8);
    }
}
