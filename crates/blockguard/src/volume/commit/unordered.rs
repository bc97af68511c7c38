//! `none` mode: tags rewritten in place (slot 0 only), data before metadata, no flushes.
//! It promises nothing after a crash; it exists as the comparison case the crash simulator
//! must catch.

use super::super::recover::{RecoverOptions, RecoveryReport};
use super::super::stage::Batch;
use super::super::Inner;
use super::maintenance::Maintenance;
use super::protocol::{GroupBatch, Plan, Planned, Protocol};
use super::{CommitState, Dropped};
use crate::cast::u32_of_small;
use crate::error::Result;
use crate::format::VolumeState;
use std::sync::atomic::Ordering;

/// The `none` protocol.
pub(crate) struct Unordered;

/// Tags rewritten in place: slot 0 of every pair gets the pair's current tags plus the
/// batch's (the `none`, `rebuild` and `journal` modes).
///
/// With `keep_damaged`, a damaged sector (one that fails its checks, or a blank one in a group
/// that was written) is left as it is unless the batch
/// covers every block of it: rewriting it would give its other blocks the unwritten tag and
/// erase the damage (they would read as "unwritten but not zero", or as zeros, instead of
/// as damaged). The batch's blocks in such a sector are pushed to `keep_damaged` (they cannot
/// be kept). A sector is written whole and atomically, so no crash leaves one invalid, and a
/// blank one counts as damage only where no crash can explain it: this only ever applies to
/// real damage. (Normal writes into damage are refused before they are
/// staged; this guards replay and damage found between staging and commit.)
pub(super) fn plan_in_place(
    vol: &Inner,
    b: &GroupBatch<'_>,
    mut keep_damaged: Option<&mut Dropped>,
) -> Planned {
    let (group, old, tags, epoch) = (b.group, b.old, b.tags, b.epoch);
    let ts = vol.geo.tag_size as usize;
    let per = vol.geo.tags_per_sector() as usize;
    let mut w = old.writer(&vol.sb.uuid, group);
    for k in 0..old.pairs() {
        let count = vol.geo.tags_in_sector(group, u32_of_small(k));
        if let (Some(dropped), Some(why)) = (keep_damaged.as_deref_mut(), old.write_blocker(k)) {
            let inside: Vec<usize> = tags
                .iter()
                .map(|(i, _)| *i)
                .filter(|i| (k * per..k * per + count).contains(i))
                .collect();
            if inside.len() < count {
                let first = vol.geo.first_block(group);
                dropped.extend(inside.iter().map(|i| {
                    (
                        first + *i as u64,
                        format!("metadata sector {k} of group {group} is damaged ({why}) and the write does not cover all of it"),
                    )
                }));
                continue;
            }
        }
        // A scarred sector reaches here only in `none` (which writes into damage as asked) or
        // when the batch covers all of it: its header is intact, its tags mostly right.
        let valid = old.pair(k)[0].header_generation().is_some();
        let mut base = w.tags_of(valid.then_some(0), k, count);
        for (i, t) in tags
            .iter()
            .filter(|(i, _)| (k * per..k * per + count).contains(i))
        {
            let at = (i - k * per) * ts;
            base[at..at + ts].copy_from_slice(&t.to_bytes(ts)[..ts]);
        }
        w.put(0, k, 1, &base);
        w.set_known(k, 0);
    }
    w.finish(&vol.geo, epoch)
}

/// Puts a batch planned in place on the backend — data, tags, map sectors, in no order that
/// matters to a crash — and only then makes its new tags and map bits the cached state.
///
/// Installing first would open a window for a false alarm: the cache may evict the new state
/// before its sectors reach the disk (it is small, and evictions come from other threads'
/// loads), and a reload would then read the old sectors — a first write's blank metadata under
/// a map bit already installed reads as damage (a write into the group refused as "metadata
/// damaged"), and old tags reloaded after the new data landed read as a tag mismatch until
/// evicted again. Installed after the writes, any reload reads what the writes left, and the
/// batch's own blocks are served from the stage until the commit ends.
pub(super) fn write_in_place(vol: &Inner, plan: &Plan, batch: &Batch) -> Result<()> {
    vol.write_data(batch)?;
    vol.write_metadata(&plan.updates)?;
    vol.write_map(&plan.map)?;
    vol.install(&plan.updates);
    vol.install_map(super::protocol::copy_map(&plan.map));
    Ok(())
}

/// Recovery's answer for a group of a mode with one tag copy: nothing to rebuild from; the
/// group holds written metadata or not.
pub(super) fn group_written(vol: &Inner, group: u64) -> Result<bool> {
    Ok(vol.confirmed_group(group)?.any_written())
}

impl Protocol for Unordered {
    fn plan_group(&self, vol: &Inner, b: &GroupBatch<'_>, _dropped: &mut Dropped) -> Result<Planned> {
        // `none` writes into damage as asked (it promises nothing).
        Ok(plan_in_place(vol, b, None))
    }

    fn write(&self, vol: &Inner, _state: &mut CommitState, plan: &Plan, batch: &Batch) -> Result<()> {
        write_in_place(vol, plan, batch)
    }

    fn refuses_writes_into_damage(&self) -> bool {
        false
    }

    fn settle_after_crash(
        &self,
        vol: &Inner,
        _progress: &mut dyn FnMut(u64, u64),
    ) -> Result<Option<super::super::recover::RecoveryReport>> {
        // No brothers, nothing to settle.
        vol.trusted.store(true, Ordering::Release);
        vol.write_superblocks(VolumeState::Clean, "marking the volume clean")?;
        Ok(None)
    }

    fn settle_group(
        &self,
        vol: &Inner,
        _m: &mut Maintenance<'_>,
        group: u64,
        _opts: RecoverOptions,
        _report: &mut RecoveryReport,
    ) -> Result<bool> {
        // `recover --rebuild` on a `none` volume: one copy, nothing to rebuild from.
        group_written(vol, group)
    }

    fn blank_metadata_means_no_data(&self) -> bool {
        false
    }

    fn readable_before_recovery(&self) -> bool {
        true
    }
}
