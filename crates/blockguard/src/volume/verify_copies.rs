//! Verifying every copy of a mirrored volume: what a scrub needs beyond the read path, which
//! reads each block from one member only.
//!
//! Per group and member, the group's metadata is read once and the range's data in one run;
//! every block is checked against *that member's own* metadata. A block that fails on a
//! member goes through read repair (`Inner::repair_block`), which picks the newest copy that
//! verifies and rewrites the others — or, if no copy verifies, counts it unrepairable.
//!
//! Safe on a volume being written: a block is judged bad only after read repair — which holds
//! the commit lock, so no commit moves data or tags under it — has looked again; a block a
//! commit rewrote meanwhile verifies there. Staged blocks are skipped: their commit will write
//! every member.

use super::mirror::MemberCopy;
use super::{Inner, Volume};
use crate::error::Result;
use std::sync::atomic::Ordering;

/// What [`Volume::verify_copies`] found.
#[derive(Clone, Debug, Default, PartialEq, Eq, serde::Serialize)]
#[non_exhaustive]
pub struct CopiesReport {
    /// Blocks checked (on every member in sync).
    pub blocks: u64,
    /// Bytes read, all members together (data and metadata).
    pub bytes_read: u64,
    /// Copies found bad: (member, block).
    pub bad: Vec<(usize, u64)>,
    /// Block copies rewritten from a good one.
    pub repaired: u64,
    /// Blocks no member holds a good copy of.
    pub unrepairable: Vec<u64>,
}

impl Volume {
    /// Checks `count` blocks from `first` on every member in sync (a plain volume: its one
    /// copy), repairing bad copies from good ones when `repair` is set (and the volume is
    /// writable). Bad copies stay bad without `repair`; blocks bad everywhere are listed.
    pub fn verify_copies(&self, first: u64, count: u64, repair: bool) -> Result<CopiesReport> {
        self.inner.verify_copies(first, count, repair)
    }
}

impl Inner {
    fn verify_copies(&self, first: u64, count: u64, repair: bool) -> Result<CopiesReport> {
        let bs = u64::from(self.geo.block_size);
        self.check_range(first.saturating_mul(bs), count.saturating_mul(bs))?;
        let mut report = CopiesReport::default();
        let end = first + count;
        let mut block = first;
        while block < end {
            let (group, index) = self.geo.group_of(block);
            let group_end = self.geo.first_block(group) + u64::from(self.geo.blocks_in_group(group));
            let n = group_end.min(end) - block;
            let mut suspects = Vec::new();
            for member in self.backend.live() {
                suspects.extend(self.check_member_run(member, group, index, block, n, &mut report)?);
            }
            report.blocks += n;
            suspects.sort_unstable();
            suspects.dedup();
            for b in suspects {
                self.settle_suspect(b, repair, &mut report)?;
            }
            block += n;
        }
        Ok(report)
    }

    /// Reads member `member`'s metadata of `group` and its data of blocks `block..block+n`
    /// (starting at `index` in the group) and returns the blocks that do not verify there.
    pub(super) fn check_member_run(
        &self,
        member: usize,
        group: u64,
        index: u32,
        block: u64,
        n: u64,
        report: &mut CopiesReport,
    ) -> Result<Vec<u64>> {
        let bs = self.geo.block_size as usize;
        let MemberCopy {
            readable, meta, data, ..
        } = self.read_member_run(member, block, n);
        report.bytes_read += (2 * bs + data.as_ref().len()) as u64;
        if !readable {
            return Ok((block..block + n).collect());
        }
        let state = self.parse_loaded(group, meta.as_ref().into(), true)?;
        let per = self.geo.tags_per_sector() as usize;
        let mut bad = Vec::new();
        for (k, chunk) in data.as_ref().chunks_exact(bs).enumerate() {
            let b = block + k as u64;
            let i = index as usize + k;
            let accept = state.accept(i);
            // A scar in the block's pair is this member's damage too, even where it does not
            // stop the block verifying (an older brother's): read repair rewrites the pair.
            if !self.verifies_strictly(b, chunk, &accept) || state.scars(i / per).contains(&true) {
                bad.push(b);
            }
        }
        Ok(bad)
    }

    /// A block that failed on some member: look again at every copy under the commit lock
    /// (a transient bad read, or a commit that moved the block, is not damage), and repair.
    fn settle_suspect(&self, block: u64, repair: bool, report: &mut CopiesReport) -> Result<()> {
        let _commit = self.lock(&self.commit);
        if self.lock(&self.stage).get(block).is_some() {
            return Ok(());
        }
        let found = self.examine_block(block, repair)?;
        report.bad.extend(found.bad.iter().map(|&m| (m, block)));
        report.repaired += found.repaired;
        if !found.good {
            self.stats.unrepairable.fetch_add(1, Ordering::Relaxed);
            report.unrepairable.push(block);
        }
        Ok(())
    }
}
