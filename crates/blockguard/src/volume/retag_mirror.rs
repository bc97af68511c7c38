//! What an online re-tag (`retag_online.rs`) adds for a mirror set.
//!
//! Every write of a step goes to every copy in sync (the copy layer), so the set is re-tagged
//! as one volume, with three additions:
//!
//! - **Only a whole set.** A copy out of sync would miss the new tags and come back (resync
//!   copies only the groups the write-intent map marks) with the old profile's tags in groups
//!   the superblock calls re-tagged. So a re-tag starts or resumes only with every copy in
//!   sync, and one that falls out meanwhile stops it at the next step, with the cursor
//!   recorded; the step it fell out in had marked its groups (below), so a resync brings the
//!   copy onto the right profile, and the same command then resumes the re-tag.
//! - **Marked like a commit.** A step's groups are marked in the dirty-groups map, durably,
//!   before any of their metadata is written, as a commit marks its groups: after a crash the
//!   copies of those groups may differ (each disk keeps its own subset of the unflushed
//!   writes), and convergence at the next open copies exactly the marked groups from one copy
//!   to the others; a copy dropped during the step gets them at its resync.
//! - **Every copy verified.** The step reads and verifies the data of one copy (the one reads
//!   go to). Before that, each copy's blocks of the group are checked against that copy's own
//!   metadata, and a copy that fails is repaired from a good one by read repair's rules
//!   (`Inner::examine_block`: the newest copy that verifies is the source) — so the tags
//!   written to every copy describe data every copy holds. A block no copy holds a good
//!   version of is left to the step, which finds it bad, keeps its old tag and reports it.

use super::commit::maintenance::Maintenance;
use super::retag_online::RetagReport;
use super::{invalid, Inner};
use crate::error::Result;
use crate::format::MapKind;
use crate::CopiesReport;

impl Inner {
    /// Refuses a re-tag (start, resume or next step) while a copy of the set is out of sync.
    pub(super) fn retag_needs_every_copy(&self) -> Result<()> {
        if !self.degraded() {
            return Ok(());
        }
        let out: Vec<String> = (0..self.backend.count())
            .filter(|&i| !self.backend.in_sync(i))
            .map(|i| format!("copy {i} ({})", self.backend.backend(i).name()))
            .collect();
        Err(invalid(
            &self.name,
            format!(
                "{} of this mirror set {} out of sync: a re-tag changes the tags on every copy, and one \
                 that missed it would come back with the old profile's tags; resync it first \
                 (`blockguard mirror resync`) or remove it (`blockguard mirror remove`), then run the \
                 re-tag (a re-tag in progress resumes from where it stopped)",
                out.join(", "),
                if out.len() == 1 { "is" } else { "are" }
            ),
        ))
    }

    /// On a mirror set: marks `groups` in the dirty-groups map, durably, before the step
    /// writes any of their metadata (see the module documentation). Nothing on one copy.
    pub(super) fn retag_marks(&self, m: &mut Maintenance<'_>, groups: std::ops::Range<u64>) -> Result<()> {
        if self.backend.count() < 2 {
            return Ok(());
        }
        let marks = self.session_updates(MapKind::Dirty, &groups.collect::<Vec<_>>());
        if marks.is_empty() {
            return Ok(());
        }
        // Under the `read-only` error policy nothing new reaches the disk.
        self.suspended()?;
        m.write_map(&marks)?;
        m.make_durable("flushing the re-tag's dirty-group marks")?;
        self.adopt_session(&marks);
        Ok(())
    }

    /// On a mirror set: checks every block of `group` on every copy in sync against that
    /// copy's own metadata and repairs the copies that fail from a good one. Returns whether
    /// anything was rewritten (the group's state must then be read again). Under maintenance
    /// (the commit lock: no commit moves data or tags meanwhile).
    pub(super) fn retag_settle_copies(&self, group: u64, report: &mut RetagReport) -> Result<bool> {
        if self.backend.count() < 2 {
            return Ok(false);
        }
        let first = self.geo.first_block(group);
        let n = u64::from(self.geo.blocks_in_group(group));
        let mut read = CopiesReport::default();
        let mut suspects = Vec::new();
        for member in self.backend.live() {
            suspects.extend(self.check_member_run(member, group, 0, first, n, &mut read)?);
        }
        suspects.sort_unstable();
        suspects.dedup();
        let mut repaired = 0;
        for block in suspects {
            // Read repair's rules; a block with no good copy is left as it is (the step
            // reports it).
            self.suspended()?;
            repaired += self.examine_block(block, true)?.repaired;
        }
        report.repaired += repaired;
        Ok(repaired > 0)
    }
}
