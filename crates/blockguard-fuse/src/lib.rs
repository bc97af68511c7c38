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

//! FUSE export of a blockguard volume as a single file.
//!
//! [`mount`] shows a [`BlockFile`] — in production a [`DeviceFile`] over a
//! [`blockguard::Volume`] — as a directory
//! holding exactly one regular file, named after the volume and as large as it. `losetup`
//! turns that file into a block device, so any filesystem can live on a verified volume
//! without a kernel module:
//!
//! ```text
//! blockguard mount vol.bgv /mnt/bg          # /mnt/bg/vol.bgv appears
//! losetup -f --show /mnt/bg/vol.bgv         # /dev/loopN
//! mkfs.ext4 /dev/loopN && mount /dev/loopN /mnt/data
//! ```
//!
//! What the kernel's requests become:
//!
//! | request | engine call | notes |
//! |---|---|---|
//! | `read` | [`BlockFile::read_at`] | verified; a failed check is `EIO` plus an error log naming the block |
//! | `write` | [`BlockFile::write_at`] | past the end: shortened, or `ENOSPC` |
//! | `fsync`, `flush` (every `close`) | [`BlockFile::flush`] | |
//! | `fallocate(PUNCH_HOLE\|KEEP_SIZE)` | [`BlockFile::punch_hole`] | the loop driver's discard |
//! | `fallocate(ZERO_RANGE)` | [`BlockFile::write_zeroes`] | the loop driver's write-zeroes |
//! | other `fallocate` modes | — | `EOPNOTSUPP` |
//! | `truncate`, `chmod`, `chown` | — | `EPERM` unless unchanged; times are ignored |
//!
//! The file is opened in direct-I/O mode (see the comment in `fs.rs` for why), requests are
//! as large as the kernel allows (1 MiB by default) and are served by several threads.
//! [`Mounted::serve`] returns once the filesystem is unmounted, by [`unmount`] from any process
//! or by SIGTERM/SIGINT in this one, after flushing.

mod daemon;
mod device;
mod file;
mod fs;
mod memory;
mod mounts;
mod session;

use std::ffi::OsString;
use std::io;
use std::path::PathBuf;
use std::time::Duration;

pub use daemon::detach_output;
pub use device::DeviceFile;
pub use file::BlockFile;
pub use memory::{MemoryError, MemoryFile};
pub use mounts::{find_mount, unmount, wait_released, MountEntry};
pub use session::{mount, MountConfig, Mounted, DEFAULT_THREADS, SUBTYPE};

/// Errors of mounting, serving and unmounting.
#[derive(Debug, thiserror::Error)]
pub enum FuseError {
    /// The file name cannot be a directory entry.
    #[error("{0:?} is not usable as a file name (empty, '.', '..', contains '/' or NUL, or longer than 255 bytes)")]
    InvalidFileName(OsString),
    /// The mount system call or the FUSE handshake failed.
    #[error("cannot mount on {}", mountpoint.display())]
    Mount {
        /// The requested mount point.
        mountpoint: PathBuf,
        /// Why.
        #[source]
        source: io::Error,
    },
    /// The request loop ended with an error.
    #[error("FUSE session failed")]
    Session(#[source] io::Error),
    /// Signal handlers could not be installed.
    #[error("cannot install signal handlers")]
    Signals(#[source] io::Error),
    /// The final flush after unmounting failed: recent writes may not be durable.
    #[error("flushing the volume after unmount failed")]
    Flush(#[source] Box<dyn std::error::Error + Send + Sync>),
    /// `/proc/self/mountinfo` could not be read.
    #[error("cannot read the mount table")]
    MountTable(#[source] io::Error),
    /// Nothing is mounted at the path.
    #[error("{} is not a mount point", .0.display())]
    NotMounted(PathBuf),
    /// Something other than a blockguard export is mounted at the path.
    #[error("{} is not a blockguard mount (it is {fstype})", mountpoint.display())]
    NotBlockguard {
        /// The path given.
        mountpoint: PathBuf,
        /// What is mounted there.
        fstype: String,
    },
    /// The exported file is still open, usually by a loop device.
    #[error("{} is busy: its file is still open (detach the loop device with `losetup -d` first)", .0.display())]
    Busy(PathBuf),
    /// umount(2) failed for another reason.
    #[error("cannot unmount {}", mountpoint.display())]
    Unmount {
        /// The mount point.
        mountpoint: PathBuf,
        /// Why.
        #[source]
        source: io::Error,
    },
    /// Checking whether the server released the volume failed.
    #[error("cannot check whether {} is still open", volume.display())]
    Wait {
        /// The volume.
        volume: PathBuf,
        /// Why.
        #[source]
        source: io::Error,
    },
    /// The server did not release the volume in time.
    #[error("{} is still held by its server {timeout:?} after unmounting", volume.display())]
    StillOpen {
        /// The volume.
        volume: PathBuf,
        /// How long we waited.
        timeout: Duration,
    },
}
