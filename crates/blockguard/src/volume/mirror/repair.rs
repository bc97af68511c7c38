//! Read repair: serving a block from a member whose copy verifies and rewriting the bad
//! copies; examining every copy of a block for `check` and scrub.

use crate::error::Result;
use crate::volume::group::GroupState;
use crate::volume::Inner;
use blockguard_backend::Backend;
use std::sync::atomic::Ordering;
use std::sync::Arc;

impl Inner {
    /// Read repair: `block` failed verification as read. Looks for a member in sync whose
    /// copy of the block verifies against that member's own metadata; if one does, every
    /// other member in sync whose data or metadata differs is rewritten from it (and read
    /// back), and its data is returned in `out`. Returns whether a good copy was found.
    /// Caller holds the commit lock (no commit moves data or tags meanwhile).
    pub(crate) fn repair_block(&self, block: u64, out: &mut [u8]) -> Result<bool> {
        if self.backend.count() < 2 {
            return Ok(false);
        }
        let copies = self.member_copies(block);
        let Some((source, state)) = self.best_copy(block, &copies)? else {
            return Ok(false);
        };
        let good = &copies[source];
        out.copy_from_slice(good.data.as_ref());
        if self.read_only {
            // Nothing may be written: serve the good copy, leave the bad ones to a
            // read-write open or a scrub.
            tracing::warn!(volume = %self.name, block, "block {block} is bad on a mirror member; served from member {} (read-only: not repaired)", good.member);
            return Ok(true);
        }
        for bad in copies.iter().filter(|c| c.member != good.member) {
            self.heal(block, bad, good);
        }
        self.record_member_failures()?;
        // The cache may hold the damaged member's view of the group: replace it.
        let (group, _) = self.geo.group_of(block);
        self.cache.lock(group).put(group, Arc::new(state));
        Ok(true)
    }

    /// A mirror set's group whose cached metadata has a scarred sector in the pair of `block`:
    /// read repair of that block (under the commit lock) rewrites the scarred member's pair
    /// from a member whose sector is intact, and caches that member's view. Returns the
    /// group's state afterwards (still scarred if every member is).
    pub(crate) fn repair_scarred_pair(&self, group: u64, block: u64) -> Result<Arc<GroupState>> {
        {
            let _commit = self.lock(&self.commit);
            if !self.read_only {
                self.examine_block(block, true)?;
            }
        }
        self.group(group)
    }

    /// Before a rebuild (`recover --rebuild`) on a mirror set: every pair of `groups` that is
    /// damaged as reads see it (on the member they go to) but intact on another member is
    /// taken from there by read repair of its first block, so that the rebuild never
    /// rebuilds from a brother — nor writes over an intact member's newer sector — what
    /// another member still holds whole (the second outside review of the torn tag found a
    /// durable block lost that way). The caller holds the commit lock.
    pub(crate) fn repair_damaged_pairs_from_members(&self, groups: &[u64]) -> Result<()> {
        if self.backend.live().len() < 2 {
            return Ok(());
        }
        let per = self.geo.tags_per_sector() as usize;
        for &group in groups {
            let state = self.confirmed_group(group)?;
            for k in 0..state.pairs() {
                let damaged = matches!(state.view(k), crate::volume::group::PairView::Damaged(_));
                if damaged && self.geo.tags_in_sector(group, crate::cast::u32_of_small(k)) > 0 {
                    self.examine_block(self.geo.first_block(group) + (k * per) as u64, true)?;
                }
            }
        }
        self.cache.clear();
        Ok(())
    }

    /// Looks at every member's copy of `block` (caller holds the commit lock): which members'
    /// copies do not verify against their own metadata, and whether some copy does. With
    /// `repair` (on a writable volume) the bad copies are rewritten from the best good one.
    pub(crate) fn examine_block(&self, block: u64, repair: bool) -> Result<Examined> {
        let (group, index) = self.geo.group_of(block);
        let copies = self.member_copies(block);
        let mut bad = Vec::new();
        for c in &copies {
            let ok = c.readable && {
                let state = self.parse_loaded(group, c.meta.as_ref().into(), true)?;
                // A scar in the block's pair (even in the older brother, which reads never
                // use) is damage of this member's copy that another member can repair.
                let k = index as usize / self.geo.tags_per_sector() as usize;
                !state.scars(k).contains(&true)
                    && self.verifies_strictly(block, c.data.as_ref(), &state.accept(index as usize))
            };
            if !ok {
                bad.push(c.member);
            }
        }
        let best = self.best_copy(block, &copies)?;
        let mut repaired = 0;
        if let (Some((source, state)), true) = (&best, repair && !self.read_only && !bad.is_empty()) {
            let before = self.stats.repairs.load(Ordering::Relaxed);
            for c in copies.iter().filter(|c| c.member != copies[*source].member) {
                self.heal(block, c, &copies[*source]);
            }
            self.record_member_failures()?;
            self.cache.lock(group).put(group, Arc::new(state.clone()));
            repaired = self.stats.repairs.load(Ordering::Relaxed) - before;
        }
        Ok(Examined {
            bad,
            good: best.is_some(),
            repaired,
        })
    }

    /// Every member in sync's copy of `block` and of its group's metadata.
    fn member_copies(&self, block: u64) -> Vec<MemberCopy> {
        self.backend
            .live()
            .into_iter()
            .map(|member| self.read_member_run(member, block, 1))
            .collect()
    }

    /// Member `member`'s metadata of `block`'s group and its data of `n` blocks from `block`
    /// (all in one group), read from that member alone.
    pub(crate) fn read_member_run(&self, member: usize, block: u64, n: u64) -> MemberCopy {
        let (group, _) = self.geo.group_of(block);
        let bs = self.geo.block_size as usize;
        let align = self.backend.alignment().max(1);
        let mut meta = crate::volume::aligned(2 * bs, align);
        let mut data = crate::volume::aligned(crate::cast::usize_of(n) * bs, align);
        let read = self
            .backend
            .read_from(member, meta.as_mut(), self.geo.meta_offset(group, 0))
            .and_then(|()| {
                self.backend
                    .read_from(member, data.as_mut(), self.geo.data_offset(block))
            });
        MemberCopy {
            member,
            readable: read.is_ok(),
            meta,
            data,
        }
    }

    /// The index in `copies` of the copy to repair from, with its group state: of the copies
    /// that verify against their own member's metadata, the one with the newest generation
    /// for the block's sector. A member whose disk silently dropped both the data and the
    /// metadata of a write is consistent but stale: it must be repaired, never the source.
    fn best_copy(&self, block: u64, copies: &[MemberCopy]) -> Result<Option<(usize, GroupState)>> {
        let (group, index) = self.geo.group_of(block);
        let k = index as usize / self.geo.tags_per_sector() as usize;
        let mut best: Option<(usize, GroupState, u64)> = None;
        for (n, c) in copies.iter().enumerate().filter(|(_, c)| c.readable) {
            let state = self.parse_loaded(group, c.meta.as_ref().into(), true)?;
            if !self.verifies_strictly(block, c.data.as_ref(), &state.accept(index as usize)) {
                continue;
            }
            let newest = state
                .pair(k)
                .iter()
                .filter_map(crate::format::SectorParse::generation)
                .max()
                .unwrap_or(0);
            if best.as_ref().is_none_or(|b| newest > b.2) {
                best = Some((n, state, newest));
            }
        }
        Ok(best.map(|(n, state, _)| (n, state)))
    }

    /// Rewrites what differs of `bad`'s copy of `block` from `good`'s: the block's data, and
    /// the two sectors of the block's own metadata pair — each only where `good`'s sector is
    /// valid and `bad`'s is not a newer valid one. The rest of `bad`'s metadata is left as it
    /// is: copying whole metadata blocks would spread damage of another pair on `good`, or roll
    /// back another pair that `good` holds an older version of (a write `good` lost). A member
    /// that cannot be repaired is dropped.
    fn heal(&self, block: u64, bad: &MemberCopy, good: &MemberCopy) {
        let (group, index) = self.geo.group_of(block);
        let k = index as usize / self.geo.tags_per_sector() as usize;
        let data_bad = !bad.readable || bad.data.as_ref() != good.data.as_ref();
        let meta = match self.merged_pair(group, k, bad, good) {
            Ok(m) => m,
            Err(e) => {
                tracing::warn!(volume = %self.name, member = bad.member, block, "read repair: cannot parse the metadata to merge: {e}");
                None
            }
        };
        if !data_bad && meta.is_none() {
            return;
        }
        let mut result = Ok(());
        if let Some(meta) = &meta {
            result = self.rewrite_member(bad.member, self.geo.meta_offset(group, 0), meta);
        }
        if data_bad && result.is_ok() {
            result = self.rewrite_member(bad.member, self.geo.data_offset(block), good.data.as_ref());
        }
        let what = match (meta.is_some(), data_bad) {
            (true, true) => "data and metadata",
            (true, false) => "metadata",
            _ => "data",
        };
        match result {
            Ok(()) => {
                self.stats.repairs.fetch_add(1, Ordering::Relaxed);
                tracing::warn!(volume = %self.name, member = bad.member, block, "read repair: rewrote the {what} of block {block} from member {}", good.member);
            }
            Err(e) => {
                self.backend
                    .drop_member(bad.member, format!("read repair of block {block} failed: {e}"));
            }
        }
    }

    /// `bad`'s metadata of `group` (both slots) with the sectors of pair `k` taken from
    /// `good` where that is an improvement: `good`'s sector valid, and `bad`'s different and
    /// not a valid sector of a newer generation. `None` if nothing changes.
    fn merged_pair(
        &self,
        group: u64,
        k: usize,
        bad: &MemberCopy,
        good: &MemberCopy,
    ) -> Result<Option<Vec<u8>>> {
        let good_state = self.parse_loaded(group, good.meta.as_ref().into(), true)?;
        let bad_pair = if bad.readable {
            Some(self.parse_loaded(group, bad.meta.as_ref().into(), true)?.pair(k))
        } else {
            None
        };
        let bs = self.geo.block_size as usize;
        let mut merged = if bad.readable {
            bad.meta.as_ref().to_vec()
        } else {
            // Unreadable: rebuilt from `good`'s pair only, the rest blank (unknown, reported).
            vec![0u8; 2 * bs]
        };
        let mut changed = false;
        for slot in 0..2 {
            let Some(good_gen) = good_state.pair(k)[slot].generation() else {
                continue;
            };
            if let Some(pair) = &bad_pair {
                if pair[slot].generation().is_some_and(|g| g > good_gen) {
                    continue;
                }
            }
            let at = slot * bs + k * crate::format::SECTOR_SIZE;
            let range = at..at + crate::format::SECTOR_SIZE;
            if merged[range.clone()] != good.meta.as_ref()[range.clone()] {
                merged[range.clone()].copy_from_slice(&good.meta.as_ref()[range]);
                changed = true;
            }
        }
        Ok(changed.then_some(merged))
    }

    /// Rewrites, on the members they failed on, the ranges whose reads failed there and were
    /// served by another member: every block (and group metadata) they cover goes through
    /// read repair, under the commit lock. Read-only volumes only log them.
    pub(crate) fn repair_read_errors(&self) -> Result<()> {
        let errors = self.backend.take_read_errors();
        if errors.is_empty() {
            return Ok(());
        }
        if self.read_only {
            tracing::warn!(volume = %self.name, ranges = errors.len(), "reads failed on a mirror member and were served by another (read-only: not rewritten)");
            return Ok(());
        }
        let mut blocks = std::collections::BTreeSet::new();
        for (_, offset, len) in &errors {
            blocks.extend(self.blocks_at(*offset, *len as u64));
        }
        let _commit = self.lock(&self.commit);
        let mut buf = vec![0u8; self.geo.block_size as usize];
        for block in blocks {
            if self.lock(&self.stage).get(block).is_some() {
                // Staged: its commit will write every member anyway.
                continue;
            }
            if !self.repair_block(block, &mut buf)? {
                tracing::error!(volume = %self.name, block, "a read failed on a mirror member and no member holds a copy that verifies");
            }
        }
        Ok(())
    }

    /// The blocks whose data or group metadata overlap `len` bytes at `offset` (metadata:
    /// the group's first block, whose repair rewrites the group's metadata).
    fn blocks_at(&self, offset: u64, len: u64) -> Vec<u64> {
        let g = &self.geo;
        let start = g.first_group_offset;
        let end = start + g.groups * g.group_len();
        let (lo, hi) = (offset.max(start), (offset + len).min(end));
        let bs = u64::from(g.block_size);
        let mut out = Vec::new();
        let mut at = lo;
        while at < hi {
            let group = (at - start) / g.group_len();
            let within = (at - start) % g.group_len();
            let block = if within < 2 * bs {
                g.first_block(group)
            } else {
                g.first_block(group) + (within - 2 * bs) / bs
            };
            if block < g.data_blocks && out.last() != Some(&block) {
                out.push(block);
            }
            at = (at / bs + 1) * bs;
        }
        out
    }

    /// Writes `bytes` to member `i` at `offset` (through an aligned buffer), flushes it and
    /// reads it back: a repair is done only when the member returns what was written.
    fn rewrite_member(&self, i: usize, offset: u64, bytes: &[u8]) -> std::io::Result<()> {
        let align = self.backend.alignment().max(1);
        let len = bytes.len();
        let mut buf = crate::volume::aligned(len, align);
        buf.as_mut().copy_from_slice(bytes);
        self.backend.write_to(i, buf.as_ref(), offset)?;
        self.backend.flush_one(i)?;
        let mut back = crate::volume::aligned(len, align);
        self.backend.read_from(i, back.as_mut(), offset)?;
        if back.as_ref() == bytes {
            Ok(())
        } else {
            Err(std::io::Error::other(
                "the member read back different bytes after the repair",
            ))
        }
    }
}

/// What [`Inner::examine_block`] found.
pub(crate) struct Examined {
    /// Members whose copy does not verify (or cannot be read).
    pub bad: Vec<usize>,
    /// Some member's copy verifies.
    pub good: bool,
    /// Copies rewritten.
    pub repaired: u64,
}

/// One member's copy of blocks and of their group's metadata, as read for a repair or a
/// check.
pub(crate) struct MemberCopy {
    pub member: usize,
    /// Both reads succeeded.
    pub readable: bool,
    pub meta: crate::volume::Aligned,
    pub data: crate::volume::Aligned,
}
