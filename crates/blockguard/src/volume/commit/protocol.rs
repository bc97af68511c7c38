//! The seam between the commit machinery and a consistency mode.
//!
//! A mode decides two things: what new metadata a batch gives each group it touches, and in
//! what order metadata, maps and data go to the backend (with which flushes between them).
//! Everything else — staging, batching, failure latching, lost-write bookkeeping, the data
//! writes themselves — is shared. Each mode is one [`Protocol`], chosen once from the
//! superblock by [`for_mode`]; nothing outside this module asks which mode a volume is in.

use super::super::group::GroupState;
use super::super::meta_io::MetaUpdate;
use super::super::recover::{RecoverOptions, RecoveryReport};
use super::super::stage::Batch;
use super::super::Inner;
use super::maintenance::Maintenance;
use super::{CommitState, Dropped};
use crate::error::Result;
use crate::format::Mode;
use crate::tag::Tag;

/// A batch's new metadata, planned before anything is written.
pub(crate) struct Plan {
    /// The commit's epoch.
    pub epoch: u64,
    /// New sectors of every group the batch touches (only groups that change).
    pub updates: Vec<MetaUpdate>,
    /// Groups written for the first time.
    pub first_writes: Vec<u64>,
    /// Written-groups map sectors that mark the first writes.
    pub map: Vec<super::super::bitmaps::MapUpdate>,
}

/// What a batch brings one group: the input of [`Protocol::plan_group`].
pub(crate) struct GroupBatch<'a> {
    /// The group.
    pub group: u64,
    /// Its current state, confirmed by a second read if it came from one.
    pub old: &'a GroupState,
    /// The batch's tags for it: (index in the group, tag), ascending.
    pub tags: &'a [(usize, Tag)],
    /// The commit's epoch.
    pub epoch: u64,
}

/// A group's planned state and which of its two slots it rewrites.
pub(crate) type Planned = (GroupState, [bool; 2]);

/// One consistency mode: how a batch becomes durable metadata and data.
pub(crate) trait Protocol: Send + Sync {
    /// New metadata for one group of a batch. Returns the new state and which of the two
    /// slots it rewrites; blocks that cannot be kept go to `dropped`.
    fn plan_group(&self, vol: &Inner, b: &GroupBatch<'_>, dropped: &mut Dropped) -> Result<Planned>;

    /// Puts a planned batch on the backend — metadata, maps and data, with the flushes this
    /// mode's crash argument needs — and publishes the new metadata to readers before any
    /// data it describes is written.
    ///
    /// Writing the same plan again after a failure must be safe: it rewrites the same bytes
    /// in the same order with the same barriers (`Volume::resume` relies on it).
    fn write(&self, vol: &Inner, state: &mut CommitState, plan: &Plan, batch: &Batch) -> Result<()>;

    /// A batch [`Protocol::write`] put on the backend is already durable (the mode's own
    /// barrier made it so): a flush right after costs no second barrier.
    fn durable_at_commit(&self) -> bool {
        false
    }

    /// `Volume::resume`, after the backend took a flush again and before the failed batch is
    /// written again: whatever the mode must restore first. Caller holds the commit lock.
    fn before_retry(&self, vol: &Inner, state: &mut CommitState) -> Result<()> {
        let _ = (vol, state);
        Ok(())
    }

    /// Whether a write into a metadata sector whose tags cannot be read must be refused when
    /// it arrives (the commit would have to carry those tags forward).
    fn refuses_writes_into_damage(&self) -> bool;

    /// Brings a volume left in use (not closed cleanly) to a state commits may build on.
    /// Returns what recovery did, for modes that recover.
    fn settle_after_crash(
        &self,
        vol: &Inner,
        progress: &mut dyn FnMut(u64, u64),
    ) -> Result<Option<RecoveryReport>>;

    /// Recovery's work on one group it visits (under maintenance): settles what a crash may
    /// have left unsettled and, if asked, rebuilds damage. Returns whether the group holds
    /// written metadata afterwards. Only modes that recover are asked.
    fn settle_group(
        &self,
        vol: &Inner,
        m: &mut Maintenance<'_>,
        group: u64,
        opts: RecoverOptions,
        report: &mut RecoveryReport,
    ) -> Result<bool>;

    /// A group whose metadata is blank (a hole) and not marked written never had data: the
    /// mode writes metadata before data. Recovery then skips it without reading it.
    fn blank_metadata_means_no_data(&self) -> bool;

    /// A volume left in use can be read, before it is recovered, with the after-crash rules
    /// (read-only opens, `check`). False for a mode whose tags must be rebuilt first.
    fn readable_before_recovery(&self) -> bool;

    /// What recovery must do before a volume left in use can be read, for the error of a
    /// read-only open (modes not [`Protocol::readable_before_recovery`]).
    fn recovery_before_reading(&self) -> &'static str {
        "its tags are recomputed from the data"
    }
}

/// The protocol of `mode`.
pub(crate) fn for_mode(mode: Mode) -> &'static dyn Protocol {
    match mode {
        Mode::Dual => &super::dual::Dual,
        Mode::None => &super::unordered::Unordered,
        Mode::Rebuild => &super::rebuild::Rebuild,
        Mode::Journal => &super::journal::Journal,
    }
}

/// A copy of map sector updates (the cache takes its own when they are installed; the plan
/// keeps its copy in case the commit must be written again).
pub(super) fn copy_map(
    updates: &[super::super::bitmaps::MapUpdate],
) -> Vec<super::super::bitmaps::MapUpdate> {
    updates
        .iter()
        .map(|u| super::super::bitmaps::MapUpdate {
            kind: u.kind,
            index: u.index,
            bytes: u.bytes.clone(),
        })
        .collect()
}

/// Recovery as every mode with brothers does it (see `recover.rs`).
pub(super) fn recover(vol: &Inner, progress: &mut dyn FnMut(u64, u64)) -> Result<Option<RecoveryReport>> {
    tracing::info!(volume = %vol.name, "the volume was not closed cleanly: recovering");
    vol.recover(RecoverOptions::default(), progress).map(Some)
}
