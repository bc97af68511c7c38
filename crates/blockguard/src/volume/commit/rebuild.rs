//! `rebuild` mode: data and tags written without ordering between them (one tag copy,
//! rewritten in place), so a commit costs no barrier of its own. What makes a crash harmless is
//! the write-intent map: every group a batch touches is marked dirty, durably, before any of its
//! data or tags is written (the mark is flushed once per group, and cleared lazily after a
//! flush that made everything durable). After a crash, the tags of every marked group are
//! recomputed from the data on disk, so nothing a crash cut short is reported as corrupt.
//!
//! The price, stated by `info`: damage inside those groups during the crash window — a torn
//! block, a lost or misdirected write of the last seconds — is taken as the data, not detected.
//! Outside the crash window (every group not marked, and every group once settled) G3 and G4
//! hold as in every mode.

use super::super::recover::{RecoverOptions, RecoveryReport};
use super::super::stage::Batch;
use super::super::Inner;
use super::maintenance::Maintenance;
use super::protocol::{GroupBatch, Plan, Planned, Protocol};
use super::{CommitState, Dropped};
use crate::error::Result;

/// The `rebuild` protocol.
pub(crate) struct Rebuild;

impl Protocol for Rebuild {
    fn plan_group(&self, vol: &Inner, b: &GroupBatch<'_>, dropped: &mut Dropped) -> Result<Planned> {
        Ok(super::unordered::plan_in_place(vol, b, Some(dropped)))
    }

    fn write(&self, vol: &Inner, state: &mut CommitState, plan: &Plan, batch: &Batch) -> Result<()> {
        // Write intent first: after a crash only marked groups may hold data and tags that
        // disagree, and each is rebuilt from its data.
        super::mark_session(vol, state, &plan.updates, &[], false)?;
        super::unordered::write_in_place(vol, plan, batch)?;
        state
            .unflushed_groups
            .extend(plan.updates.iter().map(|u| u.group));
        Ok(())
    }

    fn refuses_writes_into_damage(&self) -> bool {
        // The in-place plan keeps no damaged tags: a write into a damaged sector would turn the
        // other blocks' damage into "unwritten" (still reported, but no longer as damage).
        true
    }

    fn settle_after_crash(
        &self,
        vol: &Inner,
        progress: &mut dyn FnMut(u64, u64),
    ) -> Result<Option<RecoveryReport>> {
        super::protocol::recover(vol, progress)
    }

    fn settle_group(
        &self,
        vol: &Inner,
        m: &mut Maintenance<'_>,
        group: u64,
        opts: RecoverOptions,
        report: &mut RecoveryReport,
    ) -> Result<bool> {
        vol.retag_group(m, group, opts, report)
    }

    fn blank_metadata_means_no_data(&self) -> bool {
        // Data may land before its tags: a blank group may hold data.
        false
    }

    fn readable_before_recovery(&self) -> bool {
        false
    }
}
