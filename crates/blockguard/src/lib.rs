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
//! blockguard: per-block end-to-end integrity for files and block devices.
//!
//! Layers, each depending only on those below it:
//! - [`blockguard_backend`]: where bytes live (file, block device, memory, fault simulator);
//! - [`tag`]: tag profiles that generate and verify a block's tag;
//! - [`mod@format`]: the on-disk layout (superblocks, geometry, metadata blocks);
//! - [`Volume`]: the engine — verified reads, crash-consistent writes, flush, discard;
//! - [`BlockDevice`]: what the frontends (NBD server, FUSE file) serve.
//!
//! ```
//! use blockguard::{FormatOptions, Volume};
//! use blockguard_backend::MemoryBackend;
//! use std::sync::Arc;
//!
//! let opts = FormatOptions::with_size(1 << 20);
//! let len = opts.backing_len().unwrap();
//! let vol = Volume::format(Arc::new(MemoryBackend::new(len).unwrap()), &opts).unwrap();
//! vol.write_at(b"hello", 10_000).unwrap();
//! vol.flush().unwrap();
//! let mut buf = [0u8; 5];
//! vol.read_at(&mut buf, 10_000).unwrap();
//! assert_eq!(&buf, b"hello");
//! ```

mod cast;
pub mod copies;
pub mod device;
pub mod error;
pub mod format;
pub mod split;
pub mod tag;
mod volume;

pub use blockguard_backend;
pub use device::{BlockDevice, ErrorClass, OwnedBuf};
pub use error::{CorruptionKind, Error, Result};
pub use format::{ErrorPolicy, Geometry, Mode, Superblock};
pub use tag::Profile;
pub use volume::{
    journal_limits, member_records, BlockProblem, BlockReport, ClearedErrors, CopiesReport, CopyState,
    CopyStatus, Extent, FormatOptions, JournalLimits, JournalStatus, MapProblem, MetadataProblem,
    OpenOptions, PiProfiles, RecoverOptions, RecoveryReport, ReplayReport, ResumeReport, ResyncReport,
    RetagOptions, RetagReport, RetagStatus, ScrubOptions, ScrubProblem, ScrubProblemKind, ScrubProgress,
    ScrubReport, SlotReport, Suspension, Volume, VolumeFailure, VolumeHealth, VolumeStats,
    DEFAULT_SCRUB_CHUNK, DEFAULT_SCRUB_LISTED,
};
