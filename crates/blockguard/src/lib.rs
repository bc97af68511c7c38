//! blockguard: per-block end-to-end integrity for files and block devices.
//!
//! Layers, each depending only on those below it:
//! - [`blockguard_backend`]: where bytes live (file, block device, memory, fault simulator);
//! - [`tag`]: tag profiles that generate and verify a block's tag;
//! - [`format`]: the on-disk layout (superblocks, geometry, metadata blocks);
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

pub mod device;
pub mod error;
pub mod format;
pub mod tag;
mod volume;

pub use blockguard_backend;
pub use device::{BlockDevice, ErrorClass, OwnedBuf};
pub use error::{CorruptionKind, Error, Result};
pub use format::{Geometry, Mode, Superblock};
pub use tag::Profile;
pub use volume::{
    BlockProblem, BlockReport, Extent, FormatOptions, MapProblem, MetadataProblem, OpenOptions,
    RecoverOptions, RecoveryReport, SlotReport, Volume, VolumeStats,
};
