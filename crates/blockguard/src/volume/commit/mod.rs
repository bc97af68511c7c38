//! Committing a batch of staged writes: the machinery every consistency mode shares.
//!
//! A batch (the blocks staged since the last commit) is committed under the volume's commit
//! lock: the mode's [`Protocol`](protocol::Protocol) plans each touched group's new metadata
//! and puts metadata, maps and data on the backend in its order; this module owns what is
//! around that — the "in use" marking before the first change, failure latching, the blocks
//! that could not be kept, flushes — and the only ways to write metadata: commits, and
//! [`Maintenance`](maintenance::Maintenance) for recovery and repairs.

mod data;
mod dual;
pub(crate) mod journal;
pub(crate) mod maintenance;
pub(crate) mod protocol;
mod rebuild;
mod resume;
mod unordered;

pub use resume::ResumeReport;

use super::group::GroupState;
use super::health::VolumeFailure;
use super::meta_io::MetaUpdate;
use super::stage::{Batch, Staged};
use super::{aligned, Inner};
use crate::cast::usize_of;
use crate::error::{Error, Result};
use crate::format::VolumeState;
use crate::tag::{Tag, UNWRITTEN};
use blockguard_backend::Backend as _;
use protocol::Plan;
use std::collections::{BTreeSet, HashSet};
use std::ops::Range;
use std::sync::atomic::Ordering;
use std::sync::Arc;

/// Blocks of a batch that cannot be kept, each with why.
pub(crate) type Dropped = Vec<(u64, String)>;

/// What the protocol remembers between commits (guarded by the volume's commit mutex).
#[derive(Default)]
pub(crate) struct CommitState {
    /// Epoch of the last commit.
    pub(crate) epoch: u64,
    /// Data was written to the backend since the last completed flush.
    data_unflushed: bool,
    /// The groups that data was written to since the last completed flush (a subset of the
    /// groups of the batches since then, so bounded by the stage).
    unflushed_groups: HashSet<u64>,
    /// The superblocks say "in use" (written before the first commit of this session).
    pub(crate) marked_in_use: bool,
    /// Acknowledged block writes that could not be kept (their metadata turned out damaged
    /// after they were accepted), with the first reason. Flushes fail while any is left; a
    /// later write of the block that is kept takes it off.
    lost: BTreeSet<u64>,
    lost_why: String,
    /// Acknowledged block writes that a write-back failure lost (found by `Volume::resume`):
    /// their blocks fail verification. Flushes fail while any is left; a later write of the
    /// block that is kept takes it off, and so does `Volume::clear_error_state` (the operator
    /// accepts the loss).
    lost_in_failure: BTreeSet<u64>,
    /// The runs of blocks each commit since the last completed flush wrote to the backend,
    /// by epoch: what a failed flush may have lost (after a failed `fsync` the kernel may
    /// drop the pages it could not write, and a later `fsync` succeeds without them).
    /// Bounded by what is written between two flushes: in `dual`, every commit's metadata
    /// flush settles the batches before it, so at most the last batch or two.
    written: Vec<(u64, Vec<Range<u64>>)>,
    /// The batch whose commit failed after it was planned, kept for `Volume::resume` to put
    /// on the backend again exactly as planned.
    in_flight: Option<InFlight>,
    /// `journal` mode: the log of this session (started by the first commit).
    pub(crate) journal: Option<journal::Ring>,
}

/// A planned batch whose commit failed: the same plan is written again on resume, so the
/// metadata written (maybe partly) by the failed attempt is overwritten with the same bytes,
/// in the same order and with the same barriers — as if the commit had never stopped.
pub(crate) struct InFlight {
    plan: Plan,
    /// The blocks the plan keeps (the batch without those it dropped).
    batch: Arc<Batch>,
    dropped: Dropped,
}

impl CommitState {
    /// Records that the commit of `epoch` is about to write `batch`'s blocks.
    fn track(&mut self, epoch: u64, batch: &Batch) {
        let mut runs: Vec<Range<u64>> = Vec::new();
        for &b in batch.keys() {
            match runs.last_mut() {
                Some(r) if r.end == b => r.end += 1,
                _ => runs.push(b..b + 1),
            }
        }
        self.written.retain(|(e, _)| *e != epoch);
        self.written.push((epoch, runs));
    }

    /// Every block written since the last completed flush.
    fn written_since_flush(&self) -> BTreeSet<u64> {
        self.written
            .iter()
            .flat_map(|(_, runs)| runs.iter().cloned().flatten())
            .collect()
    }

    /// Acknowledged writes known lost, of both kinds.
    fn lost_count(&self) -> u64 {
        (self.lost.len() + self.lost_in_failure.len()) as u64
    }
}

impl Inner {
    /// Records that a write-back failed: acknowledged writes may be lost, so no later write or
    /// flush may report success until `Volume::resume` has written again what was staged and
    /// verified what may have been lost. Kept outside the commit lock so writers can check it
    /// without waiting for a commit in progress. The first failure's reason is kept.
    pub(crate) fn fail(&self, detail: String) {
        self.set_failure(detail, true);
    }

    /// Records a failure that cannot be resumed: a thread panicked inside the engine, so an
    /// invariant may be broken. It replaces a write-back failure recorded before.
    pub(crate) fn fail_for_good(&self, detail: String) {
        self.set_failure(detail, false);
    }

    fn set_failure(&self, detail: String, resumable: bool) {
        let mut f = self.failure_slot();
        if f.as_ref().is_none_or(|old| old.resumable && !resumable) {
            *f = Some(VolumeFailure { detail, resumable });
        }
        self.failed.store(true, Ordering::Release);
    }

    /// The failure slot. Its lock never guards more than one assignment, so a poisoned lock
    /// still holds a whole value (and must not fail the volume again: [`Inner::lock`] would).
    fn failure_slot(&self) -> std::sync::MutexGuard<'_, Option<VolumeFailure>> {
        self.failure
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// Why the volume has failed, if it has.
    pub(crate) fn failure(&self) -> Option<VolumeFailure> {
        if !self.failed.load(Ordering::Acquire) {
            return None;
        }
        self.failure_slot().clone()
    }

    /// Forgets a write-back failure (resume succeeded). A failure for good stays.
    fn clear_failure(&self) {
        let mut f = self.failure_slot();
        if f.as_ref().is_some_and(|old| old.resumable) {
            *f = None;
            self.failed.store(false, Ordering::Release);
        }
    }

    /// The error to return once a write-back has failed (or a thread panicked holding the
    /// commit or stage lock: seen here without waiting for someone to take the lock).
    pub(crate) fn failed(&self) -> Result<()> {
        if self.failure().is_none_or(|f| f.resumable)
            && (self.commit.is_poisoned() || self.stage.is_poisoned())
        {
            tracing::error!(volume = %self.name, "a thread panicked while holding a lock of the engine: failing the volume");
            self.fail_for_good(
                "a thread panicked while holding a lock of the engine: its state may be inconsistent".into(),
            );
        }
        match self.failure() {
            Some(f) => Err(Error::Failed {
                volume: self.name.clone(),
                detail: f.detail,
                resumable: f.resumable,
            }),
            None => Ok(()),
        }
    }

    /// Commits the active batch. Caller holds the commit lock (`state`).
    pub(crate) fn commit_locked(&self, state: &mut CommitState) -> Result<()> {
        self.failed()?;
        self.commit_active(state)
    }

    /// [`Inner::commit_locked`] without the failure check: for resume, which runs while the
    /// volume is still failed.
    fn commit_active(&self, state: &mut CommitState) -> Result<()> {
        if self.lock(&self.stage).active.is_empty() {
            return Ok(());
        }
        if !state.marked_in_use {
            // Before anything changes: from now on a crash may leave older brothers needed.
            self.write_superblocks(VolumeState::InUse, "marking the volume in use")
                .inspect_err(|e| self.fail(e.to_string()))?;
            state.marked_in_use = true;
        }
        let batch = {
            let mut staging = self.lock(&self.stage);
            if staging.active.is_empty() {
                return Ok(());
            }
            debug_assert!(staging.committing.is_none(), "commits are serialized");
            let batch = Arc::new(staging.take_active());
            staging.committing = Some(batch.clone());
            batch
        };
        let result = self.commit_batch(state, &batch);
        self.committed(result)
    }

    /// After a batch's commit: the batch leaves `committing` if it succeeded, the volume fails
    /// if it did not.
    fn committed(&self, result: Result<Option<Error>>) -> Result<()> {
        match result {
            Err(e) => {
                // The batch stays readable in `committing`; durability is no longer promised.
                self.fail(e.to_string());
                tracing::error!(volume = %self.name, "write-back failed: {e}");
                Err(e)
            }
            Ok(None) => {
                self.lock(&self.stage).committing = None;
                Ok(())
            }
            Ok(Some(lost)) => {
                // Blocks of damaged metadata sectors could not be kept; everything else was.
                // The volume goes on; flushes report the loss until the blocks are rewritten.
                self.lock(&self.stage).committing = None;
                tracing::error!(volume = %self.name, "{lost}");
                Ok(())
            }
        }
    }

    /// The error flushes return while acknowledged writes are known lost.
    pub(crate) fn lost_writes(&self, state: &CommitState) -> Result<()> {
        if let Some(&first) = state.lost_in_failure.iter().next() {
            return Err(self.lost_in_failure_error(first, &state.lost_in_failure));
        }
        let Some(&first) = state.lost.iter().next() else {
            return Ok(());
        };
        let list: Vec<String> = state.lost.iter().take(16).map(ToString::to_string).collect();
        let more = if state.lost.len() > 16 { ", …" } else { "" };
        Err(Error::Corrupt {
            volume: self.name.clone(),
            block: first,
            kind: crate::CorruptionKind::MetadataDamaged,
            detail: format!(
                "{} acknowledged block writes could not be kept (blocks {}{more}): {}; they keep their previous \
                 contents. Flushes fail until they are written again (a write must cover each damaged metadata \
                 sector whole) or `blockguard recover --rebuild` rebuilds the metadata",
                state.lost.len(),
                list.join(", "),
                state.lost_why
            ),
        })
    }

    /// Commits `batch`. `Ok(Some(e))`: committed except blocks whose metadata turned out
    /// damaged after they were accepted (the cached state they were checked against was
    /// evicted and the disk no longer agrees); `e` names them, and they are remembered as
    /// lost.
    fn commit_batch(&self, state: &mut CommitState, batch: &Arc<Batch>) -> Result<Option<Error>> {
        state.epoch += 1;
        let (plan, dropped) = self.plan(batch, state.epoch)?;
        let batch = if dropped.is_empty() {
            batch.clone()
        } else {
            Arc::new(
                batch
                    .iter()
                    .filter(|(b, _)| !dropped.iter().any(|(d, _)| d == *b))
                    .map(|(b, e)| (*b, e.clone()))
                    .collect(),
            )
        };
        self.put_batch(state, InFlight { plan, batch, dropped })
    }

    /// The plan of `batch` as commit `epoch`, and the blocks that cannot be kept. Groups
    /// written for the first time are marked in the written-groups map, made durable with
    /// their metadata (so, in `dual`, before any of their data).
    fn plan(&self, batch: &Batch, epoch: u64) -> Result<(Plan, Dropped)> {
        let (updates, first_writes, dropped) = self.plan_batch(batch, epoch)?;
        let map = self.map_updates(&first_writes)?;
        let plan = Plan {
            epoch,
            updates,
            first_writes,
            map,
        };
        Ok((plan, dropped))
    }

    /// Puts a planned batch on the backend. If that fails, the batch and its plan are kept
    /// for `Volume::resume`.
    fn put_batch(&self, state: &mut CommitState, f: InFlight) -> Result<Option<Error>> {
        state.track(f.plan.epoch, &f.batch);
        if let Err(e) = self.protocol.write(self, state, &f.plan, &f.batch) {
            state.in_flight = Some(f);
            return Err(e);
        }
        if self.protocol.durable_at_commit() {
            state.flushed(f.plan.epoch);
        } else {
            state.data_unflushed = true;
        }
        Ok(self.record_lost(state, &f.batch, &f.dropped))
    }

    /// After a commit: the blocks of `batch` are kept (no longer lost), those of `dropped` are
    /// lost from now on, with the first reason; returns the error that names the dropped ones.
    fn record_lost(
        &self,
        state: &mut CommitState,
        batch: &Batch,
        dropped: &[(u64, String)],
    ) -> Option<Error> {
        for b in batch.keys() {
            state.lost.remove(b);
            state.lost_in_failure.remove(b);
        }
        if let Some((_, why)) = dropped.first() {
            if state.lost.is_empty() {
                state.lost_why.clone_from(why);
            }
        }
        state.lost.extend(dropped.iter().map(|(b, _)| *b));
        self.lost_writes.store(state.lost_count(), Ordering::Relaxed);
        dropped.first().map(|(block, why)| Error::Corrupt {
            volume: self.name.clone(),
            block: *block,
            kind: crate::CorruptionKind::MetadataDamaged,
            detail: format!(
                "{} acknowledged block writes could not be kept (blocks {}): {why}",
                dropped.len(),
                dropped
                    .iter()
                    .map(|(b, _)| b.to_string())
                    .collect::<Vec<_>>()
                    .join(", ")
            ),
        })
    }

    /// The new metadata of every group the batch touches, the groups written for the first
    /// time, and the blocks that cannot be kept (with why).
    #[allow(clippy::type_complexity)] // Three results of one walk, each named in the doc above.
    fn plan_batch(&self, batch: &Batch, epoch: u64) -> Result<(Vec<MetaUpdate>, Vec<u64>, Dropped)> {
        let mut updates = Vec::new();
        let mut first_writes = Vec::new();
        let mut dropped = Vec::new();
        let mut entries = batch.iter().peekable();
        while let Some((&block, _)) = entries.peek() {
            let (group, _) = self.geo.group_of(block);
            let first = self.geo.first_block(group);
            let end = first + u64::from(self.geo.blocks_in_group(group));
            let mut tags: Vec<(usize, Tag)> = Vec::new();
            while let Some((&b, entry)) = entries.next_if(|(&b, _)| b < end) {
                let tag = match entry {
                    Staged::Data { tag, .. } => *tag,
                    Staged::Zero => UNWRITTEN,
                };
                tags.push((usize_of(b - first), tag));
            }
            // Never build on a single read: a transient bad one would be written back.
            let old = self.confirmed_group(group)?;
            if old.never_written() {
                first_writes.push(group);
            }
            let (new, slots) = self.protocol.plan_group(
                self,
                &protocol::GroupBatch {
                    group,
                    old: &old,
                    tags: &tags,
                    epoch,
                },
                &mut dropped,
            )?;
            if slots != [false, false] {
                updates.push(self.meta_update(group, new, slots));
            }
        }
        Ok((updates, first_writes, dropped))
    }

    /// The error for a write into a pair whose tags cannot be trusted.
    pub(crate) fn damaged_write(&self, group: u64, index: usize, state: &GroupState) -> Error {
        let block = self.geo.first_block(group) + index as u64;
        let why = match state.accept(index) {
            super::group::Accept::Damaged(d) | super::group::Accept::Salvaged { why: d, .. } => d.to_string(),
            _ => "metadata damaged".to_string(),
        };
        Error::Corrupt {
            volume: self.name.clone(),
            block,
            kind: crate::CorruptionKind::MetadataDamaged,
            detail: format!(
                "refusing to write: {why}; a write covering all {} blocks of this metadata sector, or `blockguard recover --rebuild`, re-establishes it",
                self.geo.tags_per_sector()
            ),
        }
    }

    /// Writes the metadata of `updates` (not flushed). Only the commit protocols and
    /// [`maintenance::Maintenance`] write metadata: both keep the ordering rules.
    fn write_metadata(&self, updates: &[MetaUpdate]) -> Result<()> {
        let align = self.backend.alignment().max(1);
        for u in updates {
            let mut buf = aligned(u.bytes.len(), align);
            buf.as_mut().copy_from_slice(&u.bytes);
            self.backend
                .write_at(buf.as_ref(), u.offset)
                .map_err(self.io_err("writing metadata", u.offset))?;
        }
        Ok(())
    }

    /// Flushes the backend and marks every committed batch durable. Caller holds the commit lock.
    pub(crate) fn flush_locked(&self, state: &mut CommitState) -> Result<()> {
        if !state.data_unflushed {
            return Ok(());
        }
        self.flush_or_fail("flushing")?;
        state.flushed(state.epoch);
        Ok(())
    }

    /// Flushes the backend; a failure fails the volume: the kernel may have dropped the dirty
    /// pages it could not write, so a later flush succeeding would not mean our data is there.
    /// With mirrors, a member dropped since the last flush is recorded as out of sync in the
    /// survivors' superblocks before this reports success.
    pub(crate) fn flush_or_fail(&self, during: &'static str) -> Result<()> {
        self.backend.flush().map_err(|e| {
            self.fail(format!("flush failed: {e}"));
            self.io_err(during, 0)(e)
        })?;
        self.record_member_failures()
            .inspect_err(|e| self.fail(format!("recording a failed mirror member: {e}")))
    }
}

impl CommitState {
    /// Records a completed flush that covered the data of every batch up to `epoch`.
    pub(crate) fn flushed(&mut self, epoch: u64) {
        debug_assert!(epoch <= self.epoch);
        self.data_unflushed = false;
        self.unflushed_groups.clear();
        self.written.retain(|(e, _)| *e > epoch);
    }
}

/// Step 1 of a commit in the modes that keep a write-intent map (`dual`, `rebuild`): the groups
/// about to get new metadata are marked dirty, durably, before any of their metadata (or, in
/// `rebuild`, data) is written (after a crash only dirty groups are read leniently); the
/// same flush settles earlier batches' data in these groups, and is paid even without new
/// marks when the batch `overlap`s groups with unflushed data. Groups written for the first
/// time are also marked in the first-write map: only they may show blank sectors after a
/// crash.
pub(super) fn mark_session(
    vol: &Inner,
    state: &mut CommitState,
    updates: &[MetaUpdate],
    first_writes: &[u64],
    overlap: bool,
) -> Result<()> {
    let mut session = vol.session_updates(
        crate::format::MapKind::Dirty,
        &updates.iter().map(|u| u.group).collect::<Vec<_>>(),
    );
    session.extend(vol.session_updates(crate::format::MapKind::FirstWrite, first_writes));
    if overlap || !session.is_empty() {
        vol.write_map(&session)?;
        vol.flush_or_fail("flushing before new metadata")?;
        state.flushed(state.epoch - 1);
        vol.adopt_session(&session);
    }
    Ok(())
}
