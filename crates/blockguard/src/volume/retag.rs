//! Recomputing tags from data: how `rebuild` mode settles a group after a crash.
//!
//! In `rebuild` mode data and tags reach the disk in no particular order, so after a crash a
//! group the write-intent map marks may hold data its tags do not describe (or tags of data
//! that never landed). Its tags are recomputed from what the disk holds: a block of zeros
//! gets the unwritten tag (it matches only zeros), any other block the tag of its content.
//! That is exactly the mode's promise: no false alarms after a crash, and no detection of
//! damage inside the crash window. Outside the crash window (`recover --rebuild` on a group
//! the map does not mark) only the sectors that are damaged are recomputed, and reported.

use super::commit::maintenance::Maintenance;
use super::group::PairView;
use super::recover::{MetadataProblem, RecoverOptions, RecoveryReport};
use super::Inner;
use crate::cast::u32_of_small;
use crate::error::Result;
use crate::tag::is_zero;
use blockguard_backend::Backend as _;
use std::sync::atomic::Ordering;

impl Inner {
    /// Settles `group` by recomputing tags from its data: every pair if the write-intent map
    /// marks it after a crash, else (with `opts.rebuild_damaged`) the damaged pairs only.
    /// Returns whether the group holds written tags afterwards. Under maintenance.
    pub(crate) fn retag_group(
        &self,
        m: &mut Maintenance<'_>,
        group: u64,
        opts: RecoverOptions,
        report: &mut RecoveryReport,
    ) -> Result<bool> {
        let after_crash = !self.trusted.load(Ordering::Acquire) && self.dirty_after_crash(group)?;
        let old = self.confirmed_group(group)?;
        let damaged: Vec<usize> = (0..old.pairs())
            // A scarred sector (the only copy here) counts too: `--rebuild` recomputes it.
            .filter(|&k| old.write_blocker(k).is_some() || old.scars(k)[0])
            .collect();
        let rebuild_damage = opts.rebuild_damaged && !damaged.is_empty();
        if !after_crash && !rebuild_damage {
            for &k in &damaged {
                report
                    .damaged
                    .push(self.metadata_problem(group, k, &old.view(k), false));
            }
            return Ok(old.any_written());
        }
        let (bs, ts, per) = self.tag_layout();
        let (first, mut data) = self.group_buffer(group);
        // Read until two reads agree: one bad read would be written down as the tags.
        self.read_confirmed(
            data.as_mut(),
            self.geo.data_offset(first),
            "reading data to rebuild its tags",
        )?;
        let mut w = old.writer(&self.sb.uuid, group);
        let mut any_written = false;
        for k in 0..old.pairs() {
            let is_damaged = damaged.contains(&k);
            if !after_crash && !is_damaged {
                continue;
            }
            if is_damaged {
                report
                    .damaged
                    .push(self.metadata_problem(group, k, &old.view(k), true));
            }
            let count = self.geo.tags_in_sector(group, u32_of_small(k));
            let mut tags = vec![0u8; count * ts];
            for j in 0..count {
                let i = k * per + j;
                let block = first + i as u64;
                let chunk = &data.as_ref()[i * bs..(i + 1) * bs];
                if !is_zero(chunk) {
                    let tag = self.tagger.generate(block, chunk);
                    tags[j * ts..(j + 1) * ts].copy_from_slice(&tag.to_bytes(ts)[..ts]);
                    any_written = true;
                }
            }
            w.put(0, k, 1, &tags);
            w.set_known(k, 0);
            report.blocks_retagged += count as u64;
        }
        let (new, slots) = w.finish_loaded(&self.geo, false);
        let update = self.meta_update(group, new, slots);
        m.write_metadata(std::slice::from_ref(&update))?;
        report.groups_rewritten += 1;
        Ok(any_written || old.any_written())
    }

    /// Block size, tag size and tags per sector, as `usize`.
    pub(super) fn tag_layout(&self) -> (usize, usize, usize) {
        (
            self.geo.block_size as usize,
            self.geo.tag_size as usize,
            self.geo.tags_per_sector() as usize,
        )
    }

    /// The first block of `group`, and a buffer (aligned for the backend) for its data.
    pub(super) fn group_buffer(&self, group: u64) -> (u64, super::Aligned) {
        let n = self.geo.blocks_in_group(group) as usize;
        let buf = super::aligned(n * self.geo.block_size as usize, self.backend.alignment().max(1));
        (self.geo.first_block(group), buf)
    }

    /// The report entry of damaged pair `k` of `group`.
    pub(super) fn metadata_problem(
        &self,
        group: u64,
        k: usize,
        view: &PairView,
        rebuilt: bool,
    ) -> MetadataProblem {
        let per = self.geo.tags_per_sector() as usize;
        let (detail, scarred) = match view {
            PairView::Damaged(d) => (d.to_string(), false),
            _ => (
                "a scarred sector (header intact, body damaged) holds the newest tags".into(),
                true,
            ),
        };
        MetadataProblem {
            group,
            sector: u32_of_small(k),
            first_block: self.geo.first_block(group) + (k * per) as u64,
            blocks: u32_of_small(self.geo.tags_in_sector(group, u32_of_small(k))),
            detail,
            rebuilt,
            scarred,
        }
    }
}
