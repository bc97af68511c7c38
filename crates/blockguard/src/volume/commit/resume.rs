//! Resuming after a write-back failure (`docs/CONSISTENCY.md`, "Resuming after a write-back
//! failure").
//!
//! A write-back that fails (an I/O error, a full disk) fails the volume: writes and flushes
//! are refused, because acknowledged writes may be lost. Two things may have been lost:
//! - what was staged and not yet on the backend: the batch whose commit failed (still held,
//!   with its plan, in `CommitState::in_flight` and the stage's `committing`) and the active
//!   stage. It is still in memory; resume writes it;
//! - data written to the backend since the last completed flush: after a failed `fsync` the
//!   kernel may drop the pages it could not write, and a later `fsync` succeeds without them.
//!   That data is gone from memory. The engine tracks every block written since the last
//!   completed flush (`CommitState::written`); resume reads each back from the medium (the
//!   page cache dropped first) and verifies it against its newest tag.
//!
//! The batch whose commit failed is written again with the same plan: the same metadata
//! bytes in the same slots, the same barriers, then the data — whatever part of it the
//! failed attempt wrote is overwritten with the same bytes, so a crash at any point of the
//! retry leaves what a crash during the original commit could have (the protocol's crash
//! argument covers it unchanged). Blocks that do not verify afterwards are the lost writes:
//! their newest tag describes data the medium does not hold, so their reads fail (never
//! wrong data), and flushes fail naming them until each is written again or the loss is
//! accepted (`Volume::clear_error_state`, or a later `resume`): a flush must not report
//! success while an acknowledged write is known lost (G2).
//!
//! A failure caused by a panic (a poisoned lock) is not resumable: an invariant may be broken.

use super::{CommitState, Inner};
use crate::error::{Error, Result};
use crate::format::VolumeState;
use crate::volume::health::ClearedErrors;
use crate::volume::Volume;
use blockguard_backend::Backend as _;
use std::collections::BTreeSet;
use std::sync::atomic::Ordering;

/// What [`Volume::resume`] did.
#[derive(Clone, Debug, Default, PartialEq, Eq, serde::Serialize)]
#[non_exhaustive]
pub struct ResumeReport {
    /// The write-back failure resumed from; `None` if the volume had not failed (then only
    /// the error state was cleared).
    pub failure: Option<String>,
    /// Staged blocks written by the retry: the batch whose commit failed and the stage.
    pub blocks_retried: u64,
    /// Blocks read back from the medium and verified: every block written since the last
    /// flush that completed before the failure, and every block the retry wrote.
    pub blocks_verified: u64,
    /// Of those, blocks bad on one mirror member and rewritten from another.
    pub blocks_repaired: u64,
    /// Acknowledged block writes that did not survive the failure, ascending: their reads
    /// fail, and flushes fail naming them until each is written again or the loss is
    /// accepted ([`Volume::clear_error_state`], or `resume` once more).
    pub lost: Vec<u64>,
    /// The error state cleared first (suspension, bad blocks, losses reported earlier).
    pub cleared: ClearedErrors,
}

impl Volume {
    /// Resumes after a write-back failure (an I/O error or a full disk that failed the
    /// volume), once its cause is dealt with: writes again what was still staged (the batch
    /// whose commit failed, then the stage), makes it durable, reads back from the medium
    /// every block written since the last flush that completed before the failure and every
    /// block just written, and verifies each against its tag. Reports exactly which
    /// acknowledged writes were lost (blocks that do not verify); they fail reads, and
    /// flushes fail naming them until they are written again or the loss is accepted
    /// ([`Volume::clear_error_state`], or `resume` once more). Writes and flushes work again
    /// afterwards.
    ///
    /// Also clears the error state first ([`Volume::clear_error_state`]): on a volume that
    /// has not failed, that is all it does.
    ///
    /// If the retry fails, the volume stays failed (the error says why) and `resume` may be
    /// called again. A volume failed by a panic inside the engine cannot be resumed (its
    /// in-memory state may be inconsistent): [`Error::Failed`] with `resumable: false`;
    /// reopen it.
    pub fn resume(&self) -> Result<ResumeReport> {
        self.inner.resume()
    }
}

impl Inner {
    /// Lifts the suspension, forgets bad blocks and accepts losses reported by `resume`.
    pub(crate) fn clear_errors(&self, state: &mut CommitState) -> ClearedErrors {
        let forgotten = self.policy.forget();
        let accepted: Vec<u64> = std::mem::take(&mut state.lost_in_failure).into_iter().collect();
        self.lost_writes.store(state.lost_count(), Ordering::Relaxed);
        if forgotten.suspension.is_some() || forgotten.blocks > 0 || !accepted.is_empty() {
            tracing::warn!(
                volume = %self.name,
                suspension = ?forgotten.suspension.as_ref().map(|s| s.block),
                unrepairable = forgotten.blocks,
                lost_writes_accepted = accepted.len(),
                "error state cleared"
            );
        }
        ClearedErrors {
            suspension: forgotten.suspension,
            unrepairable_forgotten: forgotten.blocks,
            lost_writes_accepted: accepted,
        }
    }

    fn resume(&self) -> Result<ResumeReport> {
        let mut state = self.lock(&self.commit);
        // A poisoned stage lock fails the volume for good here too.
        drop(self.lock(&self.stage));
        let failure = self.failure();
        if let Some(f) = failure.as_ref().filter(|f| !f.resumable) {
            return Err(Error::Failed {
                volume: self.name.clone(),
                detail: f.detail.clone(),
                resumable: false,
            });
        }
        let mut report = ResumeReport {
            cleared: self.clear_errors(&mut state),
            ..ResumeReport::default()
        };
        let Some(failure) = failure else {
            return Ok(report);
        };
        tracing::warn!(volume = %self.name, "resuming after a write-back failure: {}", failure.detail);
        report.failure = Some(failure.detail);
        let repairs = self.stats.repairs.load(Ordering::Relaxed);
        if let Err(e) = self.retry(&mut state, &mut report) {
            tracing::error!(volume = %self.name, "resume failed: {e}");
            return Err(e);
        }
        report.blocks_repaired = self.stats.repairs.load(Ordering::Relaxed) - repairs;
        state.lost_in_failure.extend(report.lost.iter().copied());
        self.lost_writes.store(state.lost_count(), Ordering::Relaxed);
        self.clear_failure();
        if report.lost.is_empty() {
            tracing::warn!(
                volume = %self.name,
                retried = report.blocks_retried,
                verified = report.blocks_verified,
                "resumed: no acknowledged write was lost"
            );
        } else {
            tracing::error!(
                volume = %self.name,
                retried = report.blocks_retried,
                verified = report.blocks_verified,
                "resumed, but {}",
                self.lost_in_failure_error(report.lost[0], &state.lost_in_failure)
            );
        }
        Ok(report)
    }

    /// Writes again what was staged, makes it durable and verifies what may have been lost.
    fn retry(&self, state: &mut CommitState, report: &mut ResumeReport) -> Result<()> {
        // Taken before anything is flushed: a flush that succeeds now does not bring back
        // pages an earlier failed one dropped.
        let mut suspects = state.written_since_flush();
        // The backend must take a flush again; the superblocks are rewritten (a failure may
        // have cut short the "in use" marking or the recording of a failed mirror member).
        self.backend
            .flush()
            .map_err(self.io_err("resuming: flushing", 0))?;
        self.record_member_failures()?;
        let in_use = state.marked_in_use || self.disk_in_use.load(Ordering::Acquire);
        let sb_state = if in_use {
            VolumeState::InUse
        } else {
            VolumeState::Clean
        };
        self.write_superblocks(sb_state, "resuming: rewriting the superblocks")?;
        state.marked_in_use = in_use;
        self.protocol.before_retry(self, state)?;
        // The batch whose commit failed: as planned if it got that far, else afresh.
        let committing = self.lock(&self.stage).committing.clone();
        if let Some(f) = state.in_flight.take() {
            report.blocks_retried += f.batch.len() as u64;
            suspects.extend(f.batch.keys());
            let result = self.put_batch(state, f);
            self.committed(result)?;
        } else if let Some(batch) = committing {
            report.blocks_retried += batch.len() as u64;
            suspects.extend(batch.keys());
            let result = self.commit_batch(state, &batch);
            self.committed(result)?;
        }
        let active: Vec<u64> = self.lock(&self.stage).active.keys().copied().collect();
        report.blocks_retried += active.len() as u64;
        suspects.extend(active);
        self.commit_active(state)?;
        self.flush_or_fail("resuming: flushing")?;
        let epoch = state.epoch;
        state.flushed(epoch);
        // Everything committed is durable: the groups leave the dirty map, durably, so after
        // a crash a lost block is read strictly (it fails) rather than settled back onto its
        // older version by recovery.
        self.clear_session_if_due(std::time::Duration::ZERO, true)?;
        self.flush_or_fail("resuming: flushing the cleared dirty-groups map")?;
        self.verify_suspects(&suspects, report)
    }

    /// Reads every block of `suspects` back from the medium of every mirror member in sync
    /// (each member's cached copy dropped first) and verifies it against its newest tag. A
    /// block bad on some members but good on one is repaired from it; one good on none is
    /// lost. Caller holds the commit lock.
    fn verify_suspects(&self, suspects: &BTreeSet<u64>, report: &mut ResumeReport) -> Result<()> {
        let bs = u64::from(self.geo.block_size);
        let members = self.backend.live();
        for run in group_runs(suspects, |b| self.geo.group_of(b).0) {
            let (off, len) = (self.geo.data_offset(run.start), (run.end - run.start) * bs);
            for &m in &members {
                if let Err(e) = self.backend.backend(m).drop_cached(off, len) {
                    tracing::warn!(volume = %self.name, member = m, offset = off, "cannot drop cached data before verifying it: {e}");
                }
            }
        }
        let align = self.backend.alignment().max(1);
        let mut buf = super::super::aligned(crate::cast::usize_of(bs), align);
        for &block in suspects {
            let (group, index) = self.geo.group_of(block);
            let accept = self.group(group)?.accept(index as usize);
            let (mut good, mut bad) = (false, false);
            for &m in &members {
                let read = self
                    .backend
                    .read_from(m, buf.as_mut(), self.geo.data_offset(block));
                match read {
                    Ok(()) if self.verifies(block, buf.as_ref(), &accept) => good = true,
                    // A single copy that cannot be read cannot be judged: resume fails.
                    Err(e) if members.len() == 1 => {
                        let at = self.geo.data_offset(block);
                        return Err(self.io_err("resuming: reading back data", at)(e));
                    }
                    // A copy that does not verify, or (with mirrors) cannot be read.
                    Ok(()) | Err(_) => bad = true,
                }
            }
            report.blocks_verified += 1;
            if good && bad {
                let mut out = vec![0u8; crate::cast::usize_of(bs)];
                if self.repair_block(block, &mut out)? {
                    continue;
                }
            }
            if !good {
                report.lost.push(block);
            }
        }
        Ok(())
    }

    /// The error flushes return while writes a write-back failure lost are known.
    pub(crate) fn lost_in_failure_error(&self, first: u64, lost: &BTreeSet<u64>) -> Error {
        let shown: Vec<String> = lost.iter().take(16).map(ToString::to_string).collect();
        let more = if lost.len() > 16 { ", …" } else { "" };
        Error::Corrupt {
            volume: self.name.clone(),
            block: first,
            kind: crate::CorruptionKind::TagMismatch,
            detail: format!(
                "{} acknowledged block writes were lost in a write-back failure (blocks {}{more}): the medium \
                 does not hold them, and their reads fail. Flushes fail until each is written again, or the \
                 loss is accepted (`blockguard resume` once more, `Volume::clear_error_state`)",
                lost.len(),
                shown.join(", "),
            ),
        }
    }
}

/// The blocks of `blocks` (ascending) as runs of consecutive blocks of one group each.
fn group_runs(blocks: &BTreeSet<u64>, group_of: impl Fn(u64) -> u64) -> Vec<std::ops::Range<u64>> {
    let mut runs: Vec<std::ops::Range<u64>> = Vec::new();
    for &b in blocks {
        match runs.last_mut() {
            Some(r) if r.end == b && group_of(r.start) == group_of(b) => r.end += 1,
            _ => runs.push(b..b + 1),
        }
    }
    runs
}

#[cfg(test)]
mod tests {
    use super::group_runs;
    use std::collections::BTreeSet;

    #[test]
    fn runs_stop_at_gaps_and_group_ends() {
        let blocks: BTreeSet<u64> = [1, 2, 3, 4, 5, 9, 10, 11, 12].into_iter().collect();
        assert_eq!(group_runs(&blocks, |b| b / 4), vec![1..4, 4..6, 9..12, 12..13]);
        assert!(group_runs(&BTreeSet::new(), |b| b).is_empty());
    }
}
