//! What keeps a volume from working normally, for `status`, and what an operator can clear:
//! a failure of the write path (see `commit/resume.rs` for getting past one), the `read-only`
//! error policy's suspension of writes, blocks found with no good copy, and acknowledged
//! writes known lost.

use super::policy::Suspension;
use super::Volume;
use crate::error::Result;
use crate::format::ErrorPolicy;
use std::sync::atomic::Ordering;

/// Unrepairable blocks listed in [`VolumeHealth::unrepairable_blocks`] at the most.
const LISTED: usize = 64;

/// Why a volume's writes and flushes are refused after its write path failed.
#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize)]
pub struct VolumeFailure {
    /// What failed.
    pub detail: String,
    /// A write-back failure (an I/O error, a full disk), which [`Volume::resume`] may get
    /// past; false after a panic inside the engine (only reopening helps).
    pub resumable: bool,
}

/// A volume's health: what [`Volume::health`] reports.
#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize)]
#[non_exhaustive]
pub struct VolumeHealth {
    /// The error policy in force (the superblock's, or the open's override).
    pub error_policy: ErrorPolicy,
    /// Set when the write path failed: writes and flushes are refused, reads go on.
    pub failure: Option<VolumeFailure>,
    /// Set while the `read-only` error policy suspends writes.
    pub suspension: Option<Suspension>,
    /// Blocks found with no good copy this session and not written since (an upper bound
    /// past 65536 such blocks).
    pub unrepairable: u64,
    /// The first of them, ascending (at most 64).
    pub unrepairable_blocks: Vec<u64>,
    /// Acknowledged block writes known lost and not written again: flushes fail while any is
    /// left.
    pub lost_writes: u64,
}

impl VolumeHealth {
    /// True when writes and flushes work and nothing is known lost or bad.
    pub fn is_healthy(&self) -> bool {
        self.failure.is_none() && self.suspension.is_none() && self.unrepairable == 0 && self.lost_writes == 0
    }

    /// A word for it: `failed` (write path failed; `resumable` or not), `suspended`,
    /// `degraded` (bad blocks or lost writes known, writes accepted), or `healthy`.
    pub fn state(&self) -> &'static str {
        match (&self.failure, &self.suspension) {
            (Some(f), _) if f.resumable => "failed",
            (Some(_), _) => "failed-for-good",
            (None, Some(_)) => "suspended",
            (None, None) if !self.is_healthy() => "degraded",
            (None, None) => "healthy",
        }
    }
}

/// What [`Volume::clear_error_state`] cleared.
#[derive(Clone, Debug, Default, PartialEq, Eq, serde::Serialize)]
#[non_exhaustive]
pub struct ClearedErrors {
    /// The `read-only` error policy's suspension that was lifted.
    pub suspension: Option<Suspension>,
    /// Blocks found with no good copy that were forgotten (they are found, logged and, under
    /// `read-only`, suspend writes again if read again before they are written).
    pub unrepairable_forgotten: u64,
    /// Blocks whose acknowledged writes a write-back failure lost (reported by an earlier
    /// [`Volume::resume`]): the loss is accepted, flushes no longer fail for them. Their reads
    /// still fail until they are written again.
    pub lost_writes_accepted: Vec<u64>,
}

impl Volume {
    /// The error policy in force: the superblock's, or [`crate::OpenOptions::error_policy`].
    pub fn error_policy(&self) -> ErrorPolicy {
        self.inner.policy.policy
    }

    /// The volume's health: whether the write path failed, whether writes are suspended,
    /// which blocks were found with no good copy, how many acknowledged writes are known
    /// lost. Cheap; does not wait for a commit in progress.
    pub fn health(&self) -> VolumeHealth {
        let (unrepairable, unrepairable_blocks) = self.inner.policy.unrepairable(LISTED);
        VolumeHealth {
            error_policy: self.inner.policy.policy,
            failure: self.inner.failure(),
            suspension: self.inner.policy.suspension(),
            unrepairable,
            unrepairable_blocks,
            lost_writes: self.inner.lost_writes.load(Ordering::Relaxed),
        }
    }

    /// The operator has dealt with the errors the volume holds: lifts the `read-only` error
    /// policy's suspension of writes, forgets the blocks found with no good copy, and accepts
    /// the loss of acknowledged writes an earlier [`Volume::resume`] reported (flushes stop
    /// failing for them; the blocks still fail reads until written). A failure of the write
    /// path is not cleared: that takes [`Volume::resume`] (which also does all this).
    /// Waits for a commit in progress.
    pub fn clear_error_state(&self) -> Result<ClearedErrors> {
        let mut state = self.inner.lock(&self.inner.commit);
        Ok(self.inner.clear_errors(&mut state))
    }
}
