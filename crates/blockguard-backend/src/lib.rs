// Lint policy, the same in every crate of the workspace: clippy's pedantic group on, minus a
// short list that would add noise without catching bugs here.
#![warn(missing_docs, unreachable_pub, clippy::pedantic)]
#![allow(
    // Pure getters are obvious; what must not be ignored is already a `Result` or `#[must_use]` type.
    clippy::must_use_candidate,
    // Errors are typed enums whose variants document themselves.
    clippy::missing_errors_doc,
    // `volume::VolumeStats` and the like read better at use sites outside the module.
    clippy::module_name_repetitions,
)]

//! Block storage backends: the lowest layer of blockguard.
//!
//! A [`Backend`] is a byte-addressed, fixed-length store with positioned reads and writes,
//! a durability barrier ([`Backend::flush`]) and a way to zero a range cheaply. Everything
//! above (tag profiles, the on-disk format, the volume engine) talks to storage only through
//! this trait, so the same engine runs on a regular file, a block device, memory, or the
//! fault-injecting simulator used by the crash and corruption tests.

pub mod fault;
pub mod file;
mod memory;
pub mod nbd;
pub mod stack;
#[cfg(test)]
mod testdev;
pub mod tls;

pub use fault::{
    CrashState, Event, FaultBackend, FaultStats, InjectedFault, InvalidProbability, PendingWrite, ReadFault,
    TooManyCrashStates, SECTOR_SIZE,
};
pub use file::{AlignedBuf, FileBackend, FileOptions, LockMode, OpenError};
pub use memory::MemoryBackend;
pub use nbd::{NbdBackend, NbdError, NbdOptions};
pub use stack::share_data;

use std::fmt;
use std::io;
use std::ops::Range;

/// Positioned, fixed-length storage.
///
/// Contract every implementation keeps:
/// - `read_at`/`write_at` transfer exactly `buf.len()` bytes or fail; a range that does not lie
///   entirely inside `0..len()` fails with [`io::ErrorKind::InvalidInput`] and touches nothing.
/// - A write is visible to later reads as soon as it returns, but is only *durable* (survives
///   power loss) once a later [`Backend::flush`] has returned `Ok`.
/// - `zero_range` makes the range read as zeros (deallocating it where the medium allows);
///   it is ordered and made durable like a write.
/// - All methods may be called concurrently from many threads.
pub trait Backend: Send + Sync + fmt::Debug {
    /// Length in bytes. Fixed for the lifetime of the backend.
    fn len(&self) -> u64;

    /// True when the backend has length zero.
    fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Reads exactly `buf.len()` bytes at `offset`.
    fn read_at(&self, buf: &mut [u8], offset: u64) -> io::Result<()>;

    /// Writes all of `buf` at `offset`.
    fn write_at(&self, buf: &[u8], offset: u64) -> io::Result<()>;

    /// Writes the concatenation of `bufs` at `offset`, as one request where the medium allows.
    fn write_vectored_at(&self, bufs: &[&[u8]], offset: u64) -> io::Result<()> {
        let mut pos = offset;
        for buf in bufs {
            self.write_at(buf, pos)?;
            pos += buf.len() as u64;
        }
        Ok(())
    }

    /// Makes every write that completed before this call durable.
    fn flush(&self) -> io::Result<()>;

    /// Hints that `len` bytes at `offset`, just written, should start on their way to the
    /// medium now instead of at the next [`Backend::flush`], so that flush finds less to do.
    /// Guarantees nothing: durability still takes a flush. The default does nothing.
    fn start_writeback(&self, offset: u64, len: u64) -> io::Result<()> {
        let _ = (offset, len);
        Ok(())
    }

    /// Drops any cached copy of `len` bytes at `offset` (the page cache of a buffered file or
    /// device), so later reads come from the medium. Meant for after a flush, to read back
    /// what the medium really holds: after a failed flush the kernel may keep pages whose
    /// writeback failed, showing data the medium never got. A hint: data not yet flushed may
    /// stay cached. The default does nothing (no cache).
    fn drop_cached(&self, offset: u64, len: u64) -> io::Result<()> {
        let _ = (offset, len);
        Ok(())
    }

    /// Makes `len` bytes at `offset` read as zeros.
    fn zero_range(&self, offset: u64, len: u64) -> io::Result<()>;

    /// Sub-ranges of `offset..offset + len` that the medium knows read as all zeros without
    /// reading them (holes of a sparse file, ...): ascending, non-overlapping, inside the range,
    /// adjacent ones merged. A range not listed may still read as zeros; the default knows
    /// nothing.
    ///
    /// A range that does not lie inside `0..len()` fails with [`io::ErrorKind::InvalidInput`].
    /// The answer describes one moment: a write racing with the call may or may not be
    /// reflected in it.
    fn zero_ranges(&self, offset: u64, len: u64) -> io::Result<Vec<Range<u64>>> {
        check_range(offset, len, self.len())?;
        Ok(Vec::new())
    }

    /// Buffer address and length alignment the backend needs for I/O (1 when any is fine).
    fn alignment(&self) -> usize {
        1
    }

    /// True if writes are refused.
    fn is_read_only(&self) -> bool {
        false
    }

    /// A human-readable name for error messages (usually the path).
    fn name(&self) -> String;
}

/// Checks that `len` bytes at `offset` lie inside a store of `size` bytes.
///
/// Backends call this before touching anything, so an out-of-range request can never write
/// outside the store.
pub fn check_range(offset: u64, len: u64, size: u64) -> io::Result<()> {
    match offset.checked_add(len) {
        Some(end) if end <= size => Ok(()),
        _ => Err(io::Error::new(
            io::ErrorKind::InvalidInput,
            format!("range {offset}+{len} lies outside the backend's {size} bytes"),
        )),
    }
}

// The workspace builds for 64-bit targets only, where a `usize` holds every `u64`.
const _: () = assert!(usize::BITS == 64);

/// `x` as a `usize`: an offset or length inside an in-memory image or buffer, which the caller
/// has already checked against that image's length (a `usize`).
#[allow(clippy::cast_possible_truncation)] // Lossless: `usize` is 64 bits wide (asserted above).
pub(crate) const fn usize_of(x: u64) -> usize {
    x as usize
}

#[cfg(test)]
// Expected answers of `zero_ranges` are often a single range.
#[allow(clippy::single_range_in_vec_init)]
mod tests {
    use super::*;

    /// A backend that overrides nothing optional, to check the defaults.
    #[derive(Debug)]
    struct Minimal;

    impl Backend for Minimal {
        fn len(&self) -> u64 {
            4096
        }
        fn read_at(&self, buf: &mut [u8], _: u64) -> io::Result<()> {
            buf.fill(0);
            Ok(())
        }
        fn write_at(&self, _: &[u8], _: u64) -> io::Result<()> {
            Ok(())
        }
        fn flush(&self) -> io::Result<()> {
            Ok(())
        }
        fn zero_range(&self, _: u64, _: u64) -> io::Result<()> {
            Ok(())
        }
        fn name(&self) -> String {
            "minimal".to_string()
        }
    }

    #[test]
    fn default_zero_ranges_knows_nothing_but_checks_the_range() {
        assert_eq!(Minimal.zero_ranges(0, 4096).unwrap(), []);
        let e = Minimal.zero_ranges(4000, 100).unwrap_err();
        assert_eq!(e.kind(), io::ErrorKind::InvalidInput);
    }

    #[test]
    fn check_range_rejects_overflow_and_past_end() {
        assert!(check_range(0, 10, 10).is_ok());
        assert!(check_range(10, 0, 10).is_ok());
        assert!(check_range(1, 10, 10).is_err());
        assert!(check_range(u64::MAX, 2, 10).is_err());
    }
}
