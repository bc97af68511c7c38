//! What keeps a volume from working normally, for `status`, and what an operator can clear:
//! the `read-only` error policy's suspension of writes, and blocks found with no good copy.

use super::policy::Suspension;
use super::Volume;
use crate::error::Result;
use crate::format::ErrorPolicy;

/// Unrepairable blocks listed in [`VolumeHealth::unrepairable_blocks`] at the most.
const LISTED: usize = 64;

/// A volume's health: what [`Volume::health`] reports.
#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize)]
#[non_exhaustive]
pub struct VolumeHealth {
    /// The error policy in force (the superblock's, or the open's override).
    pub error_policy: ErrorPolicy,
    /// Set while the `read-only` error policy suspends writes.
    pub suspension: Option<Suspension>,
    /// Blocks found with no good copy this session and not written since (an upper bound
    /// past 65536 such blocks).
    pub unrepairable: u64,
    /// The first of them, ascending (at most 64).
    pub unrepairable_blocks: Vec<u64>,
}

impl VolumeHealth {
    /// True when writes work and no block is known bad.
    pub fn is_healthy(&self) -> bool {
        self.suspension.is_none() && self.unrepairable == 0
    }

    /// A word for it: `suspended`, `degraded` (bad blocks known, writes accepted), or
    /// `healthy`.
    pub fn state(&self) -> &'static str {
        if self.suspension.is_some() {
            "suspended"
        } else if self.is_healthy() {
            "healthy"
        } else {
            "degraded"
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
}

impl Volume {
    /// The error policy in force: the superblock's, or [`crate::OpenOptions::error_policy`].
    pub fn error_policy(&self) -> ErrorPolicy {
        self.inner.policy.policy
    }

    /// The volume's health: whether writes are suspended, which blocks were found with no
    /// good copy. Cheap; does not wait for a commit in progress.
    pub fn health(&self) -> VolumeHealth {
        let (unrepairable, unrepairable_blocks) = self.inner.policy.unrepairable(LISTED);
        VolumeHealth {
            error_policy: self.inner.policy.policy,
            suspension: self.inner.policy.suspension(),
            unrepairable,
            unrepairable_blocks,
        }
    }

    /// The operator has dealt with the errors the volume holds: lifts the `read-only` error
    /// policy's suspension of writes (what is staged is kept, for the next flush) and forgets
    /// the blocks found with no good copy.
    pub fn clear_error_state(&self) -> Result<ClearedErrors> {
        let forgotten = self.inner.policy.forget();
        if forgotten.suspension.is_some() || forgotten.blocks > 0 {
            tracing::warn!(
                volume = %self.inner.name,
                suspension = ?forgotten.suspension.as_ref().map(|s| s.block),
                unrepairable = forgotten.blocks,
                "error state cleared"
            );
        }
        Ok(ClearedErrors {
            suspension: forgotten.suspension,
            unrepairable_forgotten: forgotten.blocks,
        })
    }
}
