//! The storage the FUSE file is backed by, and how its errors become errno values.

use std::error::Error as StdError;
use std::io;

use fuser::Errno;

/// A fixed-size, byte-addressable store that the FUSE file exposes.
///
/// [`blockguard::Volume`] is the production implementation; [`crate::MemoryFile`] backs the
/// tests. Implementations are shared between the FUSE worker threads, so every method takes
/// `&self` and must be internally synchronized.
///
/// Callers (the filesystem in this crate) only ever pass ranges that lie entirely inside
/// `0..size()`; they clamp requests at the end of the file first.
pub trait BlockFile: Send + Sync + 'static {
    /// The error type of the operations.
    type Error: StdError + Send + Sync + 'static;

    /// Size of the file in bytes; never changes while mounted.
    fn size(&self) -> u64;

    /// The natural I/O unit, reported to `stat` as `st_blksize`.
    fn block_size(&self) -> u32;

    /// Whether writes are refused.
    fn is_read_only(&self) -> bool;

    /// Fills `buf` from `offset`, verifying what is read. A block that fails verification must
    /// be an error for which [`BlockFile::is_corruption`] is true: wrong data is never returned.
    fn read_at(&self, buf: &mut [u8], offset: u64) -> Result<(), Self::Error>;

    /// Writes `buf` at `offset`; durable after the next successful [`BlockFile::flush`].
    fn write_at(&self, buf: &[u8], offset: u64) -> Result<(), Self::Error>;

    /// Makes every acknowledged write durable.
    fn flush(&self) -> Result<(), Self::Error>;

    /// Deallocates `offset..offset + len` if possible; afterwards the range reads as zeros
    /// (the contract of `fallocate(FALLOC_FL_PUNCH_HOLE)`).
    fn punch_hole(&self, offset: u64, len: u64) -> Result<(), Self::Error>;

    /// Makes `offset..offset + len` read as zeros, keeping it allocated if the store can
    /// (the contract of `fallocate(FALLOC_FL_ZERO_RANGE)`).
    fn write_zeroes(&self, offset: u64, len: u64) -> Result<(), Self::Error>;

    /// Whether `error` reports data that failed verification (as opposed to an I/O failure).
    fn is_corruption(error: &Self::Error) -> bool;
}

/// The errno the kernel receives for a failed operation.
///
/// Corruption is always `EIO` — the one error every filesystem and the loop driver treat as
/// "this block is unreadable". Otherwise the first [`io::Error`] found in the error's source
/// chain decides (so a full backing disk is `ENOSPC`, not a generic failure); anything else is
/// `EIO` as well.
pub(crate) fn errno_for<F: BlockFile>(error: &F::Error) -> Errno {
    if F::is_corruption(error) {
        return Errno::EIO;
    }
    let mut cause: Option<&(dyn StdError + 'static)> = Some(error);
    while let Some(e) = cause {
        if let Some(io) = e.downcast_ref::<io::Error>() {
            return errno_for_io(io);
        }
        cause = e.source();
    }
    Errno::EIO
}

/// Maps an [`io::Error`], keeping the OS error code when there is one.
pub(crate) fn errno_for_io(error: &io::Error) -> Errno {
    match error.raw_os_error() {
        Some(code) => Errno::from_i32(code),
        None => match error.kind() {
            io::ErrorKind::NotFound => Errno::ENOENT,
            io::ErrorKind::PermissionDenied => Errno::EACCES,
            io::ErrorKind::InvalidInput => Errno::EINVAL,
            io::ErrorKind::ReadOnlyFilesystem => Errno::EROFS,
            io::ErrorKind::StorageFull => Errno::ENOSPC,
            io::ErrorKind::Unsupported => Errno::EOPNOTSUPP,
            _ => Errno::EIO,
        },
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::memory::{MemoryError, MemoryFile};

    #[derive(Debug, thiserror::Error)]
    #[error("wrapped")]
    struct Wrapped(#[source] io::Error);

    #[test]
    fn corruption_is_eio() {
        let e = MemoryError::Corrupt { block: 7 };
        assert_eq!(errno_for::<MemoryFile>(&e), Errno::EIO);
    }

    #[test]
    fn os_error_code_survives_wrapping() {
        let e = MemoryError::Backend(Box::new(Wrapped(io::Error::from_raw_os_error(28))));
        assert_eq!(errno_for::<MemoryFile>(&e), Errno::ENOSPC);
    }

    #[test]
    fn io_kind_without_code_is_mapped() {
        let e = MemoryError::Backend(Box::new(io::Error::from(io::ErrorKind::ReadOnlyFilesystem)));
        assert_eq!(errno_for::<MemoryFile>(&e), Errno::EROFS);
    }

    #[test]
    fn unknown_error_is_eio() {
        let e = MemoryError::Backend("opaque".into());
        assert_eq!(errno_for::<MemoryFile>(&e), Errno::EIO);
    }
}
