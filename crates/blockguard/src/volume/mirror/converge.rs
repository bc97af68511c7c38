//! Making the members of a set agree after a crash.

use crate::error::Result;
use crate::volume::group::Accept;
use crate::volume::Inner;
use blockguard_backend::Backend;

impl Inner {
    /// After a crash, makes the members in sync agree: the group bitmaps and the groups the
    /// dirty map marks (the only ones whose writes a crash may have cut short, invariant M)
    /// are copied from the first member in sync to the others, then flushed. One exception: a
    /// data block whose copy there fails verification against that member's metadata (read
    /// by the after-crash rules, so its data was torn by the crash) while another member's
    /// copy passes it. That copy is a version the crash may leave, and it is the one kept:
    /// the others get it, and the first member too, last. So the first member is only read
    /// until the others agree, and nothing written to it fails its own metadata: a crash in
    /// the middle leaves the same work, or less, for the next open.
    pub(crate) fn converge_after_crash(&self) -> Result<()> {
        let live = self.backend.live();
        let Some((&source, others)) = live.split_first() else {
            return Ok(());
        };
        if others.is_empty() {
            return Ok(());
        }
        let mut copied = 0u64;
        for (at, len) in self.bitmap_ranges() {
            copied += self.copy_to_others(source, others, at, len, None)?;
        }
        // Blocks whose copy on the first member is torn, taken from another: (offset, data).
        let mut kept: Vec<(u64, Vec<u8>)> = Vec::new();
        let mut source_written = false;
        let bs = u64::from(self.geo.block_size);
        for g in self.dirty_groups_after_crash()? {
            let meta_at = self.geo.meta_offset(g, 0);
            let mut meta =
                crate::volume::aligned(crate::cast::usize_of(2 * bs), self.backend.alignment().max(1));
            self.read_member_confirmed(
                source,
                meta.as_mut(),
                meta_at,
                "reading a mirror member to converge",
            )?;
            let healed = self.intact_sectors_of_others(g, others, meta.as_mut())?;
            for &i in others {
                if self.backend.in_sync(i) {
                    // A failure drops the member; it is recorded below.
                    let _ = self.backend.write_to(i, meta.as_ref(), meta_at);
                }
            }
            if healed {
                // The first member last, as for the data below.
                let _ = self.backend.write_to(source, meta.as_ref(), meta_at);
                source_written = true;
            }
            copied += 2 * bs;
            let state = self.parse_loaded(g, meta.as_ref().into(), false)?;
            let first = self.geo.first_block(g);
            let at = self.geo.data_offset(first);
            let len = u64::from(self.geo.blocks_in_group(g)) * bs;
            let mut check = |block: u64, data: &mut [u8]| {
                let accept = state.accept(crate::cast::usize_of(block - first));
                if self.verifies(block, data, &accept) {
                    return;
                }
                if let Some(good) = self.verified_copy(others, block, &accept) {
                    data.copy_from_slice(&good);
                    kept.push((self.geo.data_offset(block), good));
                }
            };
            copied += self.copy_to_others(source, others, at, len, Some((first, &mut check)))?;
        }
        let mut flush = others.to_vec();
        if source_written || !kept.is_empty() {
            flush.push(source);
        }
        if !kept.is_empty() {
            for (at, data) in &kept {
                let mut buf = crate::volume::aligned(data.len(), self.backend.alignment().max(1));
                buf.as_mut().copy_from_slice(data);
                // A failure drops the member; it is recorded below.
                let _ = self.backend.write_to(source, buf.as_ref(), *at);
            }
            tracing::warn!(volume = %self.name, blocks = kept.len(), "the crash tore blocks on mirror member {source}: kept other members' complete copies");
        }
        for i in flush {
            if self.backend.in_sync(i) {
                let _ = self.backend.flush_one(i);
            }
        }
        self.record_member_failures()?;
        self.cache.clear();
        self.clear_map_cache();
        tracing::info!(volume = %self.name, bytes = copied, "mirror members made to agree after a crash");
        Ok(())
    }

    /// Copies `len` bytes at `off` from member `source` to the members `to` in sync, in
    /// pieces of at most 1 MiB; with `blocks` (the first data block at `off`, and a check),
    /// every block of each piece goes through the check, which may replace it, before the
    /// piece is written. A member whose write fails is dropped. Returns the bytes copied.
    #[allow(clippy::type_complexity)] // An optional (first block, callback) pair.
    fn copy_to_others(
        &self,
        source: usize,
        to: &[usize],
        off: u64,
        len: u64,
        mut blocks: Option<(u64, &mut dyn FnMut(u64, &mut [u8]))>,
    ) -> Result<u64> {
        let bs = u64::from(self.geo.block_size);
        let mut done = 0;
        while done < len {
            let n = (len - done).min(1 << 20);
            let mut buf = crate::volume::aligned(crate::cast::usize_of(n), self.backend.alignment().max(1));
            self.read_member_confirmed(
                source,
                buf.as_mut(),
                off + done,
                "reading a mirror member to converge",
            )?;
            if let Some((first, check)) = blocks.as_mut() {
                for (k, data) in buf
                    .as_mut()
                    .chunks_exact_mut(crate::cast::usize_of(bs))
                    .enumerate()
                {
                    check(*first + done / bs + k as u64, data);
                }
            }
            for &i in to {
                if self.backend.in_sync(i) {
                    // A failure drops the member; it is recorded by the caller.
                    let _ = self.backend.write_to(i, buf.as_ref(), off + done);
                }
            }
            done += n;
        }
        Ok(len)
    }

    /// Replaces in `meta` (the first member's metadata of `group`, about to be copied to the
    /// others) every scarred sector with the same sector of another member in sync where that
    /// one is intact and of the same generation — the same sector, without the bit rot.
    /// Copied as it was, the scar would spread to every member, and recovery would then mark
    /// torn a block whose only matching tag the scar hit, though another member's metadata
    /// proves it (the second outside review of the torn tag found this). Only equal
    /// generations: after a crash a member may legitimately hold an older sector in a slot,
    /// which must not replace a newer one. Returns true if `meta` changed.
    fn intact_sectors_of_others(&self, group: u64, others: &[usize], meta: &mut [u8]) -> Result<bool> {
        let state = self.parse_loaded(group, (&*meta).into(), false)?;
        let scarred: Vec<(usize, usize)> = (0..state.pairs())
            .flat_map(|k| (0..2).map(move |slot| (k, slot)))
            .filter(|&(k, slot)| state.scars(k)[slot])
            .collect();
        if scarred.is_empty() {
            return Ok(false);
        }
        let bs = self.geo.block_size as usize;
        let mut theirs = crate::volume::aligned(2 * bs, self.backend.alignment().max(1));
        let mut changed = false;
        for &i in others.iter().filter(|&&i| self.backend.in_sync(i)) {
            let at = self.geo.meta_offset(group, 0);
            if self
                .read_member_confirmed(
                    i,
                    theirs.as_mut(),
                    at,
                    "reading a mirror member's metadata to converge",
                )
                .is_err()
            {
                continue;
            }
            let other = self.parse_loaded(group, theirs.as_ref().into(), false)?;
            for &(k, slot) in &scarred {
                let mine = state.pair(k)[slot].header_generation();
                if other.pair(k)[slot].generation().is_some() && other.pair(k)[slot].generation() == mine {
                    let range = slot * bs + k * crate::format::SECTOR_SIZE..;
                    let range = range.start..range.start + crate::format::SECTOR_SIZE;
                    changed |= meta[range.clone()] != theirs.as_ref()[range.clone()];
                    meta[range.clone()].copy_from_slice(&theirs.as_ref()[range]);
                }
            }
        }
        if changed {
            tracing::warn!(volume = %self.name, group, "a scarred metadata sector of the first mirror member was taken intact from another member before converging");
        }
        Ok(changed)
    }

    /// The first copy of `block` among `members` (in sync) that verifies against `accept`.
    fn verified_copy(&self, members: &[usize], block: u64, accept: &Accept) -> Option<Vec<u8>> {
        let mut buf = crate::volume::aligned(self.geo.block_size as usize, self.backend.alignment().max(1));
        let at = self.geo.data_offset(block);
        members.iter().find_map(|&i| {
            let ok = self.backend.in_sync(i)
                && self.backend.read_from(i, buf.as_mut(), at).is_ok()
                && self.verifies(block, buf.as_ref(), accept);
            ok.then(|| buf.as_ref().to_vec())
        })
    }
}
