//! An in-memory [`BlockFile`] with injectable corruption, for tests of the FUSE layer that do
//! not need a real volume.

use std::collections::BTreeSet;
use std::error::Error as StdError;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Mutex, MutexGuard, PoisonError, RwLock};

use crate::file::BlockFile;

/// Errors of [`MemoryFile`].
#[derive(Debug, thiserror::Error)]
pub enum MemoryError {
    /// A block marked with [`MemoryFile::corrupt`] was read.
    #[error("block {block} failed verification")]
    Corrupt {
        /// Index of the block (offset / block size).
        block: u64,
    },
    /// A write reached a read-only file.
    #[error("the file is read-only")]
    ReadOnly,
    /// A range outside the file was requested (the FUSE layer must never do this).
    #[error("range {offset}+{len} is outside the file of {size} bytes")]
    OutOfRange {
        /// Start of the range.
        offset: u64,
        /// Length of the range.
        len: u64,
        /// Size of the file.
        size: u64,
    },
    /// An injected failure of the underlying storage.
    #[error("backend failure")]
    Backend(#[source] Box<dyn StdError + Send + Sync>),
}

/// A fixed-size file held in memory.
///
/// Besides the [`BlockFile`] operations it counts flushes and lets a test mark blocks as
/// corrupt, so that the error path can be exercised through a real mount.
#[derive(Debug)]
pub struct MemoryFile {
    data: RwLock<Vec<u8>>,
    block_size: u32,
    read_only: bool,
    corrupt: Mutex<BTreeSet<u64>>,
    flushes: AtomicU64,
    largest_request: AtomicU64,
}

impl MemoryFile {
    /// A zero-filled file of `size` bytes. `block_size` must not be zero.
    pub fn new(size: usize, block_size: u32, read_only: bool) -> Self {
        Self {
            data: RwLock::new(vec![0; size]),
            block_size: block_size.max(1),
            read_only,
            corrupt: Mutex::new(BTreeSet::new()),
            flushes: AtomicU64::new(0),
            largest_request: AtomicU64::new(0),
        }
    }

    /// Makes every later read that touches `block` fail verification.
    pub fn corrupt(&self, block: u64) {
        lock(&self.corrupt).insert(block);
    }

    /// How many times [`BlockFile::flush`] has been called.
    pub fn flush_count(&self) -> u64 {
        self.flushes.load(Ordering::SeqCst)
    }

    /// The length of the largest single read or write seen, to check how large the kernel's
    /// requests are.
    pub fn largest_request(&self) -> u64 {
        self.largest_request.load(Ordering::SeqCst)
    }

    /// A copy of `len` bytes at `offset`, bypassing corruption checks (for test assertions).
    pub fn snapshot(&self, offset: usize, len: usize) -> Vec<u8> {
        let data = self.data.read().unwrap_or_else(PoisonError::into_inner);
        let end = offset.saturating_add(len).min(data.len());
        data.get(offset.min(end)..end).unwrap_or_default().to_vec()
    }

    /// The byte range as `usize` indices, or `OutOfRange`.
    fn range(offset: u64, len: u64, size: usize) -> Result<(usize, usize), MemoryError> {
        let err = || MemoryError::OutOfRange {
            offset,
            len,
            size: size as u64,
        };
        let end = offset.checked_add(len).ok_or_else(err)?;
        if end > size as u64 {
            return Err(err());
        }
        let start = usize::try_from(offset).map_err(|_| err())?;
        let end = usize::try_from(end).map_err(|_| err())?;
        Ok((start, end))
    }

    fn fill(&self, offset: u64, len: u64, byte: u8) -> Result<(), MemoryError> {
        if self.read_only {
            return Err(MemoryError::ReadOnly);
        }
        let mut data = self.data.write().unwrap_or_else(PoisonError::into_inner);
        let (start, end) = Self::range(offset, len, data.len())?;
        data[start..end].fill(byte);
        Ok(())
    }
}

/// Locks a mutex, ignoring poisoning: every update of the protected set is a single call, so a
/// panic elsewhere cannot leave it half-changed.
fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(PoisonError::into_inner)
}

impl BlockFile for MemoryFile {
    type Error = MemoryError;

    fn size(&self) -> u64 {
        self.data.read().unwrap_or_else(PoisonError::into_inner).len() as u64
    }

    fn block_size(&self) -> u32 {
        self.block_size
    }

    fn is_read_only(&self) -> bool {
        self.read_only
    }

    fn read_at(&self, buf: &mut [u8], offset: u64) -> Result<(), MemoryError> {
        self.largest_request.fetch_max(buf.len() as u64, Ordering::SeqCst);
        let data = self.data.read().unwrap_or_else(PoisonError::into_inner);
        let (start, end) = Self::range(offset, buf.len() as u64, data.len())?;
        if end > start {
            let bs = u64::from(self.block_size);
            let first = start as u64 / bs;
            let last = (end as u64 - 1) / bs;
            if let Some(&block) = lock(&self.corrupt).range(first..=last).next() {
                return Err(MemoryError::Corrupt { block });
            }
        }
        buf.copy_from_slice(&data[start..end]);
        Ok(())
    }

    fn write_at(&self, buf: &[u8], offset: u64) -> Result<(), MemoryError> {
        self.largest_request.fetch_max(buf.len() as u64, Ordering::SeqCst);
        if self.read_only {
            return Err(MemoryError::ReadOnly);
        }
        let mut data = self.data.write().unwrap_or_else(PoisonError::into_inner);
        let (start, end) = Self::range(offset, buf.len() as u64, data.len())?;
        data[start..end].copy_from_slice(buf);
        Ok(())
    }

    fn flush(&self) -> Result<(), MemoryError> {
        self.flushes.fetch_add(1, Ordering::SeqCst);
        Ok(())
    }

    fn punch_hole(&self, offset: u64, len: u64) -> Result<(), MemoryError> {
        self.fill(offset, len, 0)
    }

    fn write_zeroes(&self, offset: u64, len: u64) -> Result<(), MemoryError> {
        self.fill(offset, len, 0)
    }

    fn is_corruption(error: &MemoryError) -> bool {
        matches!(error, MemoryError::Corrupt { .. })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn read_write_round_trip() {
        let f = MemoryFile::new(8192, 4096, false);
        f.write_at(b"hello", 4094).unwrap();
        let mut buf = [0u8; 5];
        f.read_at(&mut buf, 4094).unwrap();
        assert_eq!(&buf, b"hello");
    }

    #[test]
    fn corrupt_block_fails_only_reads_touching_it() {
        let f = MemoryFile::new(3 * 4096, 4096, false);
        f.corrupt(1);
        let mut buf = [0u8; 4096];
        f.read_at(&mut buf, 0).unwrap();
        f.read_at(&mut buf, 8192).unwrap();
        assert!(matches!(
            f.read_at(&mut buf, 4095),
            Err(MemoryError::Corrupt { block: 1 })
        ));
    }

    #[test]
    fn out_of_range_is_an_error_not_a_panic() {
        let f = MemoryFile::new(100, 4096, false);
        let mut buf = [0u8; 10];
        assert!(f.read_at(&mut buf, 95).is_err());
        assert!(f.write_at(&buf, u64::MAX).is_err());
        assert!(f.punch_hole(u64::MAX, 2).is_err());
    }

    #[test]
    fn read_only_refuses_writes() {
        let f = MemoryFile::new(100, 4096, true);
        assert!(matches!(f.write_at(b"x", 0), Err(MemoryError::ReadOnly)));
        assert!(matches!(f.write_zeroes(0, 1), Err(MemoryError::ReadOnly)));
    }
}
