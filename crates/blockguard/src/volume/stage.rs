//! The write-back stage: blocks written since the last commit, held in memory so that the
//! metadata flush that must precede their data is paid once per batch, not once per write.

use crate::tag::Tag;
use std::collections::BTreeMap;
use std::sync::Arc;

/// A write request's bytes, shared by all of its staged blocks. Buffers handed over with
/// `Volume::write_owned` are kept as they are (no copy); the engine drops its reference once
/// the blocks' data has reached the backend.
pub(crate) type SharedBuf = Arc<dyn AsRef<[u8]> + Send + Sync>;

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
    pub active_bytes: usize,
    pub committing: Option<Arc<Batch>>,
}

impl Staged {
    /// The block's content, or `None` for a zeroed block.
    pub fn data(&self, block_size: usize) -> Option<&[u8]> {
        match self {
            Staged::Data { buf, at, .. } => Some(&bytes(buf)[*at..*at + block_size]),
            Staged::Zero => None,
        }
    }
}

impl Stage {
    /// The newest staged version of `block`, if any.
    pub fn get(&self, block: u64) -> Option<&Staged> {
        self.active
            .get(&block)
            .or_else(|| self.committing.as_ref().and_then(|c| c.get(&block)))
    }

    /// True if nothing is staged (the common case for read-mostly loads: skips lookups).
    pub fn is_empty(&self) -> bool {
        self.active.is_empty() && self.committing.is_none()
    }

    /// Stages `entry` for `block`, replacing any older staged version (within a batch a block
    /// has exactly one new version, which is what the two brothers can describe).
    pub fn put(&mut self, block: u64, entry: Staged, block_size: usize) {
        let added = match entry {
            Staged::Data { .. } => block_size,
            Staged::Zero => 0,
        };
        if let Some(Staged::Data { .. }) = self.active.insert(block, entry) {
            self.active_bytes -= block_size;
        }
        self.active_bytes += added;
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
        s.put(3, data(1), 8);
        s.put(3, data(2), 8);
        assert_eq!(s.active_bytes, 8);
        assert!(s.get(3).and_then(|e| e.data(8)) == Some(&[2u8; 8][..]));
        s.put(3, Staged::Zero, 8);
        assert_eq!(s.active_bytes, 0);
        let batch = std::mem::take(&mut s.active);
        s.committing = Some(Arc::new(batch));
        assert!(matches!(s.get(3), Some(Staged::Zero)));
        s.put(3, data(4), 8);
        assert!(s.get(3).and_then(|e| e.data(8)) == Some(&[4u8; 8][..]));
    }
}
