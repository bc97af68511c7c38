//! Typed errors of the volume engine. Every message names the volume; integrity errors name
//! the block and what was expected.

use std::io;

/// What a failed verification found.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub enum CorruptionKind {
    /// The block's content matches neither stored tag.
    TagMismatch,
    /// The metadata says the block holds no data, yet it is not all zeros.
    UnwrittenNotZero,
    /// Neither metadata copy of the block's group can be trusted.
    MetadataDamaged,
    /// A crash cut the block's last write short and no complete version of it survived:
    /// recovery marked it torn (`docs/FORMAT.md`, "Tags"). It reads again once written.
    Torn,
}

/// Errors of the blockguard library.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum Error {
    /// The backend failed.
    #[error("{volume}: I/O error while {during} at byte {offset}")]
    Io {
        /// The volume's name.
        volume: String,
        /// What the engine was doing ("writing data", "flushing metadata", ...).
        during: &'static str,
        /// Byte offset on the backend where it failed.
        offset: u64,
        /// The backend's error.
        #[source]
        source: io::Error,
    },
    /// A block failed verification; its data is not returned.
    #[error("{volume}: block {block} failed verification: {detail}")]
    Corrupt {
        /// The volume's name.
        volume: String,
        /// The data block that failed.
        block: u64,
        /// What the verification found.
        kind: CorruptionKind,
        /// What was expected and what was found, for the log.
        detail: String,
    },
    /// A request reaches outside the volume.
    #[error("{volume}: request of {len} bytes at offset {offset} lies outside the volume ({size} bytes)")]
    OutOfRange {
        /// The volume's name.
        volume: String,
        /// Start of the request in bytes.
        offset: u64,
        /// Length of the request in bytes.
        len: u64,
        /// The volume's logical size in bytes.
        size: u64,
    },
    /// A write to a read-only volume.
    #[error("{volume}: the volume is open read-only")]
    ReadOnly {
        /// The volume's name.
        volume: String,
    },
    /// The backend holds no blockguard volume.
    #[error("{volume}: not a blockguard volume ({detail})")]
    NotAVolume {
        /// The volume's name.
        volume: String,
        /// Why neither superblock copy was recognized.
        detail: String,
    },
    /// Both superblock copies are damaged.
    #[error("{volume}: both superblock copies are damaged (primary: {primary}; backup: {backup})")]
    SuperblockDamaged {
        /// The volume's name.
        volume: String,
        /// What is wrong with the primary copy.
        primary: String,
        /// What is wrong with the backup copy.
        backup: String,
    },
    /// Written by a newer version or with features this build lacks.
    #[error("{volume}: {detail}")]
    Unsupported {
        /// The volume's name.
        volume: String,
        /// The version or features, and what the user can do.
        detail: String,
    },
    /// The backend is shorter than the volume's layout.
    #[error("{volume}: truncated: the layout needs {expected} bytes but the backend has {actual}")]
    Truncated {
        /// The volume's name.
        volume: String,
        /// Bytes the layout needs.
        expected: u64,
        /// Bytes the backend has.
        actual: u64,
    },
    /// Options or sizes that cannot work.
    #[error("{volume}: {detail}")]
    InvalidArgument {
        /// The volume's name (or what was being created).
        volume: String,
        /// What is wrong with the request.
        detail: String,
    },
    /// The key of a keyed tag profile is missing or wrong, or a key was given for a profile
    /// that takes none. Nothing was written.
    #[error("{volume}: {problem}")]
    Key {
        /// The volume's name.
        volume: String,
        /// What is wrong with the key (displayed, not chained: said once).
        problem: crate::tag::KeyError,
    },
    /// A write with caller-supplied protection information ([`crate::Volume::write_with_pi`])
    /// whose tuple for a block does not match the block's data: the data or the tuple was
    /// corrupted between the caller and the volume. Nothing of the write was staged or
    /// written.
    #[error(
        "{volume}: block {block}: the protection information supplied with the write ({supplied}) \
         does not match its data (which has {computed}): corrupted in transit; nothing was written"
    )]
    ProtectionMismatch {
        /// The volume's name.
        volume: String,
        /// The first block whose tuple did not match.
        block: u64,
        /// The tuple the caller supplied, in hex.
        supplied: String,
        /// The tuple of the data as received, in hex.
        computed: String,
    },
    /// The volume failed: an earlier write-back failed (durability can no longer be
    /// promised), or a thread panicked inside the engine (its state may be inconsistent).
    /// Reads go on; writes and flushes are refused until [`crate::Volume::resume`] succeeds
    /// (after a write-back failure) or the volume is reopened.
    #[error(
        "{volume}: the volume has failed ({detail}); writes and flushes are refused {}",
        if *resumable {
            "until it is resumed (`blockguard resume`, `Volume::resume`) or reopened"
        } else {
            "until it is reopened (it cannot be resumed: its in-memory state may be inconsistent)"
        }
    )]
    Failed {
        /// The volume's name.
        volume: String,
        /// The failure that stopped it.
        detail: String,
        /// A write-back failure, which [`crate::Volume::resume`] may get past; false after a
        /// panic inside the engine.
        resumable: bool,
    },
    /// The journal cannot be replayed.
    #[error("{volume}: journal damaged: {detail}")]
    JournalDamaged {
        /// The volume.
        volume: String,
        /// What is wrong and what it means.
        detail: String,
    },
    /// An operation that may run only once at a time is running already (a resync).
    #[error("{volume}: busy: {what}")]
    Busy {
        /// The volume's name.
        volume: String,
        /// What is running.
        what: String,
    },
    /// A long operation was stopped on request before it finished (what it did so far is
    /// safe; running it again finishes the job).
    #[error("{volume}: {what} stopped before it finished")]
    Stopped {
        /// The volume's name.
        volume: String,
        /// The operation.
        what: String,
    },
    /// Writes are suspended: a read found a block with no good copy (no mirror member holds
    /// one that verifies) and the volume's error policy is `read-only`. Reads go on.
    #[error(
        "{volume}: writes are suspended: block {block} has no good copy ({detail}) and the volume's \
         error policy is read-only; once the block is dealt with, clear the error state \
         (`blockguard resume`, `Volume::clear_error_state`) or reopen the volume"
    )]
    WritesSuspended {
        /// The volume's name.
        volume: String,
        /// The first block found with no good copy.
        block: u64,
        /// What its read found.
        detail: String,
    },
}

impl Error {
    /// True if the error reports corrupted data or metadata (as opposed to an I/O failure or
    /// a bad request): a frontend answers it with `EIO` and keeps serving.
    pub fn is_corruption(&self) -> bool {
        matches!(self, Error::Corrupt { .. })
    }

    /// The error with its causes, each said once ("…: I/O error while … at byte N: No space
    /// left on device"), for messages that travel without the error itself (a control-socket
    /// reply, a report).
    pub fn describe(&self) -> String {
        let mut out = self.to_string();
        let mut cause = std::error::Error::source(self);
        while let Some(c) = cause {
            let text = c.to_string();
            if !out.contains(&text) {
                out.push_str(": ");
                out.push_str(&text);
            }
            cause = c.source();
        }
        out
    }

    /// The block number of a corruption error.
    pub fn corrupt_block(&self) -> Option<u64> {
        match self {
            Error::Corrupt { block, .. } => Some(*block),
            _ => None,
        }
    }
}

/// Result with [`Error`].
pub type Result<T, E = Error> = std::result::Result<T, E>;

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn describe_says_each_cause_once() {
        let e = Error::Io {
            volume: "v".into(),
            during: "writing a mirror member being resynchronized",
            offset: 4096,
            source: std::io::Error::from_raw_os_error(28),
        };
        let text = e.describe();
        assert!(
            text.starts_with("v: I/O error while writing a mirror member"),
            "{text}"
        );
        assert_eq!(text.matches("No space left on device").count(), 1, "{text}");
        let plain = Error::ReadOnly { volume: "v".into() };
        assert_eq!(plain.describe(), plain.to_string());
    }
}
