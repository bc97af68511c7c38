//! The one interface between the engine and its frontends.
//!
//! The NBD server, the FUSE file and programs using the library serve a [`BlockDevice`]: a
//! fixed-size, byte-addressed store whose reads are verified. [`crate::Volume`] is one; the
//! mirror sets and dm-integrity volumes still to come will be others, and every frontend
//! serves them without change. Frontends hold `Arc<dyn BlockDevice>` and translate
//! [`Error::class`] into their protocol's error codes, so no frontend knows which engine it
//! talks to.

use crate::error::{Error, Result};
use crate::volume::Extent;
use std::sync::Arc;

/// A buffer handed over with a write: kept, not copied, until its bytes reach the medium.
pub type OwnedBuf = Arc<dyn AsRef<[u8]> + Send + Sync>;

/// A fixed-size, byte-addressed device with verified reads, shared by many threads.
///
/// Contract every implementation keeps:
/// - A read returns the bytes last written or an error; a block that fails verification is an
///   error whose [`Error::class`] is [`ErrorClass::Corruption`], never wrong data.
/// - A write is visible to later reads when it returns and durable after the next successful
///   [`BlockDevice::flush`], which covers every write that completed before the flush began,
///   whichever thread issued it.
/// - A range outside `0..size()` fails with [`ErrorClass::OutOfRange`] and touches nothing.
///
/// ```
/// use blockguard::{BlockDevice, FormatOptions, Volume};
/// use blockguard::blockguard_backend::MemoryBackend;
/// use std::sync::Arc;
///
/// let opts = FormatOptions::with_size(1 << 20);
/// let backend = Arc::new(MemoryBackend::new(opts.backing_len()?).unwrap());
/// let device: Arc<dyn BlockDevice> = Arc::new(Volume::format(backend, &opts)?);
/// device.write_at(b"served", 4096)?;
/// device.flush()?;
/// let mut back = [0u8; 6];
/// device.read_at(&mut back, 4096)?;
/// assert_eq!(&back, b"served");
/// # Ok::<(), blockguard::Error>(())
/// ```
pub trait BlockDevice: Send + Sync {
    /// A name for logs and error messages (usually the path of the volume).
    fn name(&self) -> &str;
    /// Size in bytes; fixed while the device is open.
    fn size(&self) -> u64;
    /// The natural I/O unit in bytes: smaller or unaligned writes cost a read-modify-write.
    fn block_size(&self) -> u32;
    /// True if writes are refused.
    fn is_read_only(&self) -> bool;
    /// Reads `buf.len()` bytes at `offset`, verified.
    fn read_at(&self, buf: &mut [u8], offset: u64) -> Result<()>;
    /// Writes `buf` at `offset`.
    fn write_at(&self, buf: &[u8], offset: u64) -> Result<()>;
    /// [`BlockDevice::write_at`] that keeps `data` instead of copying it (a network server's
    /// request buffer goes back to its pool when the device drops it).
    fn write_owned(&self, data: OwnedBuf, offset: u64) -> Result<()>;
    /// Makes the range read as zeros.
    fn write_zeroes(&self, offset: u64, len: u64) -> Result<()>;
    /// Discards the range: it reads as zeros afterwards and its space may be released.
    fn discard(&self, offset: u64, len: u64) -> Result<()>;
    /// Makes every write that completed before the call durable.
    fn flush(&self) -> Result<()>;
    /// Allocation status of a range, as consecutive runs starting at `offset`.
    fn extents(&self, offset: u64, len: u64) -> Result<Vec<Extent>>;
    /// True if [`BlockDevice::write_zeroes`] costs metadata only (no data blocks written), so
    /// a client asking for fast zeroing can be promised it.
    fn zeroing_is_cheap(&self) -> bool;
}

/// What kind of failure an [`Error`] is, for a frontend choosing an error code.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub enum ErrorClass {
    /// Stored data or metadata failed verification: the client gets `EIO`, the server goes on.
    Corruption,
    /// The request reaches outside the device.
    OutOfRange,
    /// The device refuses writes (opened read-only, or writes suspended by the `read-only`
    /// error policy).
    ReadOnly,
    /// The medium is full (ENOSPC, EFBIG or EDQUOT somewhere in the cause chain).
    NoSpace,
    /// Anything else: an I/O error, a failed volume.
    Io,
}

impl Error {
    /// Classifies the error for a frontend.
    pub fn class(&self) -> ErrorClass {
        match self {
            Error::Corrupt { .. } => ErrorClass::Corruption,
            Error::OutOfRange { .. } => ErrorClass::OutOfRange,
            Error::ReadOnly { .. } | Error::WritesSuspended { .. } => ErrorClass::ReadOnly,
            _ if no_space(self) => ErrorClass::NoSpace,
            _ => ErrorClass::Io,
        }
    }
}

fn no_space(e: &(dyn std::error::Error + 'static)) -> bool {
    const NO_ROOM: [i32; 3] = [libc_errno::ENOSPC, libc_errno::EFBIG, libc_errno::EDQUOT];
    let mut cur: Option<&(dyn std::error::Error + 'static)> = Some(e);
    while let Some(err) = cur {
        if let Some(io) = err.downcast_ref::<std::io::Error>() {
            if io.raw_os_error().is_some_and(|c| NO_ROOM.contains(&c))
                || io.kind() == std::io::ErrorKind::StorageFull
            {
                return true;
            }
        }
        cur = err.source();
    }
    false
}

/// The Linux errno values that mean "no room" (stable ABI numbers).
mod libc_errno {
    pub(crate) const EFBIG: i32 = 27;
    pub(crate) const ENOSPC: i32 = 28;
    pub(crate) const EDQUOT: i32 = 122;
}

#[cfg(test)]
mod tests {
    use super::*;

    fn io(code: i32) -> Error {
        Error::Io {
            volume: "v".into(),
            during: "writing data",
            offset: 0,
            source: std::io::Error::from_raw_os_error(code),
        }
    }

    #[test]
    fn errors_are_classified_for_frontends() {
        assert_eq!(io(28).class(), ErrorClass::NoSpace);
        assert_eq!(io(27).class(), ErrorClass::NoSpace);
        assert_eq!(io(122).class(), ErrorClass::NoSpace);
        assert_eq!(io(5).class(), ErrorClass::Io);
        let corrupt = Error::Corrupt {
            volume: "v".into(),
            block: 3,
            kind: crate::CorruptionKind::TagMismatch,
            detail: String::new(),
        };
        assert_eq!(corrupt.class(), ErrorClass::Corruption);
        assert_eq!(
            Error::ReadOnly { volume: "v".into() }.class(),
            ErrorClass::ReadOnly
        );
        let out = Error::OutOfRange {
            volume: "v".into(),
            offset: 1,
            len: 2,
            size: 1,
        };
        assert_eq!(out.class(), ErrorClass::OutOfRange);
        let failed = Error::Failed {
            volume: "v".into(),
            detail: "x".into(),
            resumable: true,
        };
        assert_eq!(failed.class(), ErrorClass::Io);
        let suspended = Error::WritesSuspended {
            volume: "v".into(),
            block: 7,
            detail: "x".into(),
        };
        assert_eq!(suspended.class(), ErrorClass::ReadOnly);
    }
}
