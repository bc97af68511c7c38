//! `dual` mode: brother metadata sectors. For each batch (see `docs/CONSISTENCY.md` for the
//! argument):
//! 1. The groups about to get new brothers are marked dirty (and first writes marked in the
//!    first-write map), durably. If a group of this batch had data written since the last
//!    completed flush, that flush is paid even without new marks: the sector about to be
//!    overwritten may still hold the only tag of data that is not yet durable. (Groups
//!    without such data need no flush: a sequential writer's batches touch different groups,
//!    so it pays one flush per batch, not two.)
//! 2. For every group the batch touches (its metadata confirmed by a second read if it came
//!    from one), every brother pair gets a new sector in its *older* slot: the newest tags
//!    plus the batch's, one generation up. A group's first write fills both slots.
//! 3. Flush: the new tags are durable before any data they describe is issued.
//! 4. Write the data.
//!
//! After a crash each block's content is its old version (matching the now-older sector), its
//! new version (matching the newer one), or torn. Reads accept either tag until recovery or a
//! flush proves the data durable; then only the newest, so lost writes are caught. Commits run
//! only on settled groups: a read-write open recovers a volume left in use first.

use super::super::group::Origin;
use super::super::recover::{RecoverOptions, RecoveryReport};
use super::super::stage::Batch;
use super::super::Inner;
use super::maintenance::Maintenance;
use super::protocol::{GroupBatch, Plan, Planned, Protocol};
use super::{CommitState, Dropped};
use crate::cast::u32_of_small;
use crate::error::Result;
use crate::format::SectorParse;

/// The `dual` protocol.
pub(crate) struct Dual;

impl Protocol for Dual {
    /// Every pair's older brother gets the newest tags plus the batch's, one generation up; a
    /// group's first write fills both slots (the new tags under generation 1, all unwritten
    /// under generation 0), so no written group ever has a blank sector.
    fn plan_group(&self, vol: &Inner, b: &GroupBatch<'_>, dropped: &mut Dropped) -> Result<Planned> {
        let (group, old, tags, epoch) = (b.group, b.old, b.tags, b.epoch);
        // Commits only follow recovery: a state that may hide a crash's older brothers would
        // make the copy-forward below overwrite the only tag of data on disk.
        assert!(
            !matches!(
                old.origin,
                Origin::Loaded {
                    after_crash: true,
                    ..
                }
            ),
            "{}: group {group} committed before the volume was recovered",
            vol.name
        );
        let ts = vol.geo.tag_size as usize;
        let per = vol.geo.tags_per_sector() as usize;
        let mut w = old.writer(&vol.sb.uuid, group);
        let mut rest = tags;
        for k in 0..old.pairs() {
            let count = vol.geo.tags_in_sector(group, u32_of_small(k));
            let end = k * per + count;
            let split = rest.partition_point(|(i, _)| *i < end);
            let (mine, after) = rest.split_at(split);
            rest = after;
            let with_batch = |mut base: Vec<u8>| {
                for (i, t) in mine {
                    let at = (i - k * per) * ts;
                    base[at..at + ts].copy_from_slice(&t.to_bytes(ts)[..ts]);
                }
                base
            };
            if old.never_written() {
                let new = with_batch(w.tags_of(None, k, count));
                w.put(0, k, 1, &new);
                let unwritten = w.tags_of(None, k, count);
                w.put(1, k, 0, &unwritten);
                w.set_known(k, 0);
            } else if let Some((newest, generation)) = old.newest_for_write(k) {
                let older = 1 - newest;
                let new = with_batch(w.tags_of(Some(newest), k, count));
                w.put(older, k, generation + 1, &new);
                w.set_known(k, older);
            } else if mine.len() == count {
                // A damaged pair the batch overwrites whole: its old tags are not needed, so
                // it starts over with both brothers describing the new data — above every
                // generation a header proves, or a scarred brother left by a torn write of
                // the two would still read as the newest.
                let top = old
                    .pair(k)
                    .iter()
                    .filter_map(SectorParse::header_generation)
                    .max()
                    .unwrap_or(0);
                let g0 = (top.saturating_add(1) | 1).max(3);
                if g0 == u64::MAX {
                    return Err(vol.damaged_write(group, k * per, old));
                }
                let new = with_batch(w.tags_of(None, k, count));
                w.put(0, k, g0, &new);
                w.put(1, k, g0 - 1, &new);
                w.set_known(k, 0);
                tracing::warn!(volume = %vol.name, group, sector = k, "damaged metadata re-established by a write covering all its blocks");
            } else if !mine.is_empty() {
                // Accepted against a cached state that has since been evicted, and the disk no
                // longer agrees: these blocks cannot be given tags. Their data is not written
                // either; the pair stays as it is, and reads of it keep failing.
                let why = old
                    .write_blocker(k)
                    .map_or_else(|| "metadata damaged".to_string(), |d| d.to_string());
                let first = vol.geo.first_block(group);
                dropped.extend(mine.iter().map(|(i, _)| (first + *i as u64, why.clone())));
            }
            // Otherwise a damaged pair the batch does not touch stays as it is.
        }
        Ok(w.finish(&vol.geo, epoch))
    }

    fn write(&self, vol: &Inner, state: &mut CommitState, plan: &Plan, batch: &Batch) -> Result<()> {
        let t0 = std::time::Instant::now();
        let epoch = plan.epoch;
        let overlap = state.data_unflushed
            && batch
                .keys()
                .any(|&b| state.unflushed_groups.contains(&vol.geo.group_of(b).0));
        super::mark_session(vol, state, &plan.updates, &plan.first_writes, overlap)?;
        let t_flush = t0.elapsed();
        vol.write_metadata(&plan.updates)?;
        vol.write_map(&plan.map)?;
        let t_meta = t0.elapsed();
        vol.flush_or_fail("flushing metadata")?;
        // That flush also made durable every data write that completed before it: those of
        // all earlier batches.
        state.flushed(epoch - 1);
        let t_meta_flush = t0.elapsed();
        vol.install(&plan.updates);
        vol.install_map(super::protocol::copy_map(&plan.map));
        vol.write_data(batch)?;
        state
            .unflushed_groups
            .extend(plan.updates.iter().map(|u| u.group));
        tracing::debug!(
            volume = %vol.name,
            epoch,
            blocks = batch.len(),
            groups = plan.updates.len(),
            flushed_first = overlap,
            "committed: flush {:?}, metadata {:?}, metadata flush {:?}, data {:?}",
            t_flush,
            t_meta.saturating_sub(t_flush),
            t_meta_flush.saturating_sub(t_meta),
            t0.elapsed().saturating_sub(t_meta_flush),
        );
        Ok(())
    }

    fn refuses_writes_into_damage(&self) -> bool {
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
        vol.recover_group(m, group, opts, report)
    }

    fn blank_metadata_means_no_data(&self) -> bool {
        true
    }

    fn readable_before_recovery(&self) -> bool {
        true
    }
}
