//! What the server serves: the [`Export`] trait, its error type, and an in-memory export.
//!
//! The protocol code only talks to an [`Export`], so it can be unit-tested and fuzzed against
//! [`MemoryExport`] and served in production from a `blockguard::Volume` (see `volume.rs`).

use crate::buffers::Payload;
use crate::usize_of;
use std::collections::BTreeSet;
use std::fmt;
use std::sync::{PoisonError, RwLock};

/// Why an export operation failed; decides the NBD error code sent to the client.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ExportErrorKind {
    /// Stored data failed verification (→ `NBD_EIO`). The message names the block.
    Corruption,
    /// The range lies outside the export (→ `NBD_EINVAL`, `NBD_ENOSPC` for writes).
    OutOfRange,
    /// The export refuses writes (→ `NBD_EPERM`).
    ReadOnly,
    /// The backing store is full (→ `NBD_ENOSPC`).
    NoSpace,
    /// The operation is not supported (→ `NBD_ENOTSUP`).
    Unsupported,
    /// Any other I/O failure (→ `NBD_EIO`).
    Io,
}

/// A failed export operation.
#[derive(Debug, Clone, thiserror::Error)]
#[error("{message}")]
pub struct ExportError {
    /// The class of failure.
    pub kind: ExportErrorKind,
    /// Human-readable detail (names the volume and block for corruption).
    pub message: String,
}

impl ExportError {
    /// An error of `kind` with `message`.
    pub fn new(kind: ExportErrorKind, message: impl Into<String>) -> Self {
        Self {
            kind,
            message: message.into(),
        }
    }

    /// True if stored data failed verification.
    pub fn is_corruption(&self) -> bool {
        self.kind == ExportErrorKind::Corruption
    }
}

/// A run of bytes with one allocation status, as reported by [`Export::extents`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Extent {
    /// Start of the run in bytes.
    pub offset: u64,
    /// Length of the run in bytes.
    pub len: u64,
    /// False for a hole that reads as zeroes.
    pub allocated: bool,
}

/// A byte-addressed device the NBD server can serve.
///
/// Implementations must be callable from many threads at once. Ranges passed in are always
/// inside `0..size()` (the protocol layer checks them first), but implementations must still
/// reject bad ranges rather than misbehave.
pub trait Export: Send + Sync {
    /// Size in bytes.
    fn size(&self) -> u64;
    /// Natural block size in bytes (advertised as the preferred block size).
    fn block_size(&self) -> u32;
    /// True if writes are refused.
    fn is_read_only(&self) -> bool;
    /// Reads `buf.len()` bytes at `offset`, verified.
    fn read_at(&self, buf: &mut [u8], offset: u64) -> Result<(), ExportError>;
    /// Writes `buf` at `offset` (durable after the next [`Export::flush`]).
    fn write_at(&self, buf: &[u8], offset: u64) -> Result<(), ExportError>;
    /// [`Export::write_at`] handing over the request's buffer, for exports that can keep it
    /// instead of copying (the engine's write-back stage). The default copies.
    fn write_owned(&self, buf: Payload, offset: u64) -> Result<(), ExportError> {
        self.write_at(&buf, offset)
    }
    /// Makes every write completed before the call durable, whichever connection issued it.
    fn flush(&self) -> Result<(), ExportError>;
    /// Discards a range; it reads as zeroes afterwards.
    fn trim(&self, offset: u64, len: u64) -> Result<(), ExportError>;
    /// Makes a range read as zeroes (may deallocate it).
    fn write_zeroes(&self, offset: u64, len: u64) -> Result<(), ExportError>;
    /// Allocation map of a range: consecutive extents starting at `offset`.
    fn extents(&self, offset: u64, len: u64) -> Result<Vec<Extent>, ExportError>;
    /// True if [`Export::write_zeroes`] is cheaper than writing zeroes (metadata only), so
    /// `NBD_CMD_FLAG_FAST_ZERO` requests can be honoured.
    fn can_fast_zero(&self) -> bool {
        false
    }
    /// A prefetch hint for a range. The default does nothing.
    fn cache(&self, _offset: u64, _len: u64) -> Result<(), ExportError> {
        Ok(())
    }
    /// A description for logs and `NBD_INFO_DESCRIPTION`.
    fn description(&self) -> String {
        String::from("blockguard volume")
    }
}

/// An export held in memory, with per-block allocation tracking and injectable corruption.
///
/// Used by the unit tests, the fuzz target and the in-process server tests. Blocks start
/// unallocated (reading as zeroes); a block marked corrupt fails every read touching it.
pub struct MemoryExport {
    block_size: u32,
    read_only: bool,
    state: RwLock<MemState>,
}

struct MemState {
    data: Vec<u8>,
    allocated: Vec<bool>,
    corrupt: BTreeSet<u64>,
    flushes: u64,
}

impl fmt::Debug for MemoryExport {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("MemoryExport")
            .field("size", &self.size())
            .field("block_size", &self.block_size)
            .field("read_only", &self.read_only)
            .finish_non_exhaustive()
    }
}

impl MemoryExport {
    /// A zero-filled, unallocated export of `size` bytes (rounded down to whole blocks).
    pub fn new(size: u64, block_size: u32) -> Self {
        let bs = u64::from(block_size.max(1));
        let blocks = usize_of(size / bs);
        Self {
            block_size: block_size.max(1),
            read_only: false,
            state: RwLock::new(MemState {
                data: vec![0; blocks * usize_of(bs)],
                allocated: vec![false; blocks],
                corrupt: BTreeSet::new(),
                flushes: 0,
            }),
        }
    }

    /// The same export, read-only.
    #[must_use]
    pub fn read_only(mut self) -> Self {
        self.read_only = true;
        self
    }

    /// Makes every read touching block `block` fail verification.
    pub fn corrupt_block(&self, block: u64) {
        self.write_state().corrupt.insert(block);
    }

    /// A copy of the contents.
    pub fn contents(&self) -> Vec<u8> {
        self.read_state().data.clone()
    }

    /// How many flushes have completed.
    pub fn flush_count(&self) -> u64 {
        self.read_state().flushes
    }

    fn read_state(&self) -> std::sync::RwLockReadGuard<'_, MemState> {
        self.state.read().unwrap_or_else(PoisonError::into_inner)
    }

    fn write_state(&self) -> std::sync::RwLockWriteGuard<'_, MemState> {
        self.state.write().unwrap_or_else(PoisonError::into_inner)
    }

    fn range(&self, offset: u64, len: u64) -> Result<std::ops::Range<usize>, ExportError> {
        let size = self.size();
        match offset.checked_add(len) {
            Some(end) if end <= size => Ok(usize_of(offset)..usize_of(end)),
            _ => Err(ExportError::new(
                ExportErrorKind::OutOfRange,
                format!("range {offset}+{len} outside {size} bytes"),
            )),
        }
    }

    fn blocks(&self, r: &std::ops::Range<usize>) -> std::ops::Range<usize> {
        let bs = self.block_size as usize;
        if r.is_empty() {
            return 0..0;
        }
        r.start / bs..(r.end - 1) / bs + 1
    }

    fn check_writable(&self) -> Result<(), ExportError> {
        if self.read_only {
            return Err(ExportError::new(ExportErrorKind::ReadOnly, "read-only export"));
        }
        Ok(())
    }
}

impl Export for MemoryExport {
    fn size(&self) -> u64 {
        self.read_state().data.len() as u64
    }

    fn block_size(&self) -> u32 {
        self.block_size
    }

    fn is_read_only(&self) -> bool {
        self.read_only
    }

    fn read_at(&self, buf: &mut [u8], offset: u64) -> Result<(), ExportError> {
        let r = self.range(offset, buf.len() as u64)?;
        let st = self.read_state();
        if let Some(b) = self.blocks(&r).find(|b| st.corrupt.contains(&(*b as u64))) {
            return Err(ExportError::new(
                ExportErrorKind::Corruption,
                format!("memory export: block {b} failed verification"),
            ));
        }
        buf.copy_from_slice(&st.data[r]);
        Ok(())
    }

    fn write_at(&self, buf: &[u8], offset: u64) -> Result<(), ExportError> {
        self.check_writable()?;
        let r = self.range(offset, buf.len() as u64)?;
        let blocks = self.blocks(&r);
        let mut st = self.write_state();
        st.data[r].copy_from_slice(buf);
        for b in blocks {
            st.allocated[b] = true;
            // A rewrite replaces the bad copy, as in the real engine.
            st.corrupt.remove(&(b as u64));
        }
        Ok(())
    }

    fn flush(&self) -> Result<(), ExportError> {
        self.write_state().flushes += 1;
        Ok(())
    }

    fn trim(&self, offset: u64, len: u64) -> Result<(), ExportError> {
        self.write_zeroes(offset, len)
    }

    fn write_zeroes(&self, offset: u64, len: u64) -> Result<(), ExportError> {
        self.check_writable()?;
        let r = self.range(offset, len)?;
        let bs = self.block_size as usize;
        let mut st = self.write_state();
        st.data[r.clone()].fill(0);
        // Only whole blocks become holes; partial blocks stay allocated (holding zeroes).
        let first = r.start.div_ceil(bs);
        let end = r.end / bs;
        for b in first..end.max(first) {
            st.allocated[b] = false;
            st.corrupt.remove(&(b as u64));
        }
        Ok(())
    }

    fn extents(&self, offset: u64, len: u64) -> Result<Vec<Extent>, ExportError> {
        let r = self.range(offset, len)?;
        let bs = u64::from(self.block_size);
        let st = self.read_state();
        let mut out: Vec<Extent> = Vec::new();
        let (mut pos, end) = (r.start as u64, r.end as u64);
        while pos < end {
            let b = pos / bs;
            let next = ((b + 1) * bs).min(end);
            let allocated = st.allocated[usize_of(b)];
            match out.last_mut() {
                Some(last) if last.allocated == allocated => last.len += next - pos,
                _ => out.push(Extent {
                    offset: pos,
                    len: next - pos,
                    allocated,
                }),
            }
            pos = next;
        }
        Ok(out)
    }

    fn can_fast_zero(&self) -> bool {
        true
    }

    fn description(&self) -> String {
        String::from("in-memory export")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn memory_export_tracks_allocation_and_corruption() {
        let e = MemoryExport::new(16 * 512, 512);
        assert_eq!(e.extents(0, 8192).unwrap().len(), 1);
        e.write_at(&[1; 600], 100).unwrap();
        let ext = e.extents(0, 8192).unwrap();
        assert_eq!(
            ext,
            vec![
                Extent {
                    offset: 0,
                    len: 1024,
                    allocated: true
                },
                Extent {
                    offset: 1024,
                    len: 7168,
                    allocated: false
                },
            ]
        );
        e.corrupt_block(1);
        let mut buf = [0u8; 10];
        assert!(e.read_at(&mut buf, 0).is_ok());
        assert!(e.read_at(&mut buf, 510).unwrap_err().is_corruption());
        e.write_zeroes(0, 8192).unwrap();
        assert!(e.read_at(&mut buf, 510).is_ok());
        assert!(!e.extents(0, 8192).unwrap()[0].allocated);
        assert_eq!(
            e.read_at(&mut buf, 8190).unwrap_err().kind,
            ExportErrorKind::OutOfRange
        );
    }
}
