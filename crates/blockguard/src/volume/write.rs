//! Writes: staging (with read-modify-write of partial blocks), zeroing, and handing full
//! stages to the committer.

use super::stage::{self, SharedBuf, Staged};
use super::{Inner, LOCK_STRIPES};
use crate::cast::usize_of;
use crate::error::{Error, Result};
use std::sync::{Arc, MutexGuard};

impl Inner {
    pub(super) fn writable(&self) -> Result<()> {
        if self.read_only {
            return Err(Error::ReadOnly {
                volume: self.name.clone(),
            });
        }
        self.failed()?;
        self.suspended()
    }

    /// Locks the stripes covering blocks `first..first+count`, in ascending order so two
    /// writers can never deadlock.
    pub(super) fn lock_stripes(&self, first: u64, count: u64) -> Vec<MutexGuard<'_, ()>> {
        let n = LOCK_STRIPES as u64;
        let mut idx: Vec<usize> = if count >= n {
            (0..LOCK_STRIPES).collect()
        } else {
            (first..first + count).map(|b| usize_of(b % n)).collect()
        };
        idx.sort_unstable();
        idx.dedup();
        idx.into_iter().map(|i| self.lock(&self.stripes[i])).collect()
    }

    /// Refuses a write of blocks `first..=last`, of which `whole` are overwritten entirely,
    /// when it lands in a metadata sector whose tags cannot be trusted (the commit would have
    /// to copy tags it cannot read) — unless it overwrites every block that sector covers.
    /// Checked when the write arrives, so a write that cannot be kept is refused, not
    /// acknowledged and lost.
    fn check_metadata_writable(&self, first: u64, last: u64, whole: std::ops::Range<u64>) -> Result<()> {
        if !self.protocol.refuses_writes_into_damage() {
            return Ok(());
        }
        let per = u64::from(self.geo.tags_per_sector());
        let mut block = first;
        while block <= last {
            let (group, index) = self.geo.group_of(block);
            let group_first = self.geo.first_block(group);
            let group_end = group_first + u64::from(self.geo.blocks_in_group(group));
            let mut state = self.group(group)?;
            let k = u64::from(index) / per;
            let pair_first = group_first + k * per;
            let pair_end = (pair_first + per).min(group_end);
            if self.backend.live().len() > 1 && state.scars(usize_of(k)).contains(&true) {
                // A mirror set: the commit would write this member's scarred tags to every
                // member, a tag the scar hit included — over another member's intact one.
                // Repair the pair from a member whose sector is intact first.
                state = self.repair_scarred_pair(group, pair_first)?;
            }
            if !state.never_written() && state.newest_for_write(usize_of(k)).is_none() {
                let covered = whole.start <= pair_first && pair_end <= whole.end;
                if !covered {
                    // Damage seen in a single read may be a transient fault: look again.
                    let state = self.confirm(group, state)?;
                    if state.newest_for_write(usize_of(k)).is_none() {
                        return Err(self.damaged_write(group, usize_of(block - group_first), &state));
                    }
                }
            }
            block = pair_end.min(last + 1).max(block + 1);
        }
        Ok(())
    }

    /// Writes `buf` at `offset` (any alignment: partial blocks are read, verified, merged).
    /// The write is visible to reads at once and durable after the next flush.
    pub(crate) fn write_at(&self, buf: &[u8], offset: u64) -> Result<()> {
        self.write_impl(buf, None, offset, None)
    }

    /// [`Inner::write_at`] keeping `owned` (whose bytes are `buf`) for the whole blocks
    /// instead of copying them. With `pi` (block-aligned writes only: checked by the caller),
    /// the tag computed over each block's staged copy must equal the caller's tuple for it
    /// (`pi` holds one tuple per block, in order), or the write is refused with nothing staged.
    pub(crate) fn write_impl(
        &self,
        buf: &[u8],
        owned: Option<SharedBuf>,
        offset: u64,
        pi: Option<&[u8]>,
    ) -> Result<()> {
        self.check_range(offset, buf.len() as u64)?;
        self.writable()?;
        if buf.is_empty() {
            return Ok(());
        }
        let bs = u64::from(self.geo.block_size);
        // (A journal always admits one block: the geometry guarantees it; the guard keeps a
        // broken limit from recursing forever.)
        if let Some(max) = self.max_request().filter(|&m| m >= bs && buf.len() as u64 > m) {
            return self.write_split(buf, offset, pi, max);
        }
        let first = offset / bs;
        let last = (offset + buf.len() as u64 - 1) / bs;
        let end = offset + buf.len() as u64;
        let full_first = offset.div_ceil(bs);
        let full_end = end / bs;
        self.check_metadata_writable(first, last, full_first..full_end.max(full_first))?;
        // Whole blocks share one buffer: the caller's own when handed over, else one copy;
        // `base` is the volume offset of that buffer's first byte. Partial edge blocks are
        // read, merged and get their own.
        let shared: Option<(SharedBuf, u64)> = match owned {
            _ if full_first >= full_end => None,
            Some(o) => Some((o, offset)),
            None => {
                let whole =
                    buf[usize_of(full_first * bs - offset)..usize_of(full_end * bs - offset)].to_vec();
                Some((Arc::new(whole), full_first * bs))
            }
        };
        let guards = self.lock_stripes(first, last - first + 1);
        let mut entries = Vec::with_capacity(usize_of(last - first + 1));
        for block in first..=last {
            let (data, at) = match &shared {
                Some((s, base)) if (full_first..full_end).contains(&block) => {
                    (s.clone(), usize_of(block * bs - base))
                }
                _ => {
                    let start = block * bs;
                    let (lo, hi) = (offset.max(start), end.min(start + bs));
                    let mut cur = vec![0u8; usize_of(bs)];
                    self.read_blocks(block, &mut cur)?;
                    cur[usize_of(lo - start)..usize_of(hi - start)]
                        .copy_from_slice(&buf[usize_of(lo - offset)..usize_of(hi - offset)]);
                    (Arc::new(cur) as SharedBuf, 0)
                }
            };
            let tag = self
                .tagger
                .generate(block, &stage::bytes(&data)[at..at + usize_of(bs)]);
            if let Some(pi) = pi {
                // The tag of the copy the engine will write, against the caller's: a mismatch
                // means the data or the tuple changed after the caller computed it.
                let t = self.geo.tag_size as usize;
                let k = usize_of(block - first);
                let supplied = &pi[k * t..(k + 1) * t];
                if !tag.matches_slot(supplied)
                    && !self.tuple_of_other_profile(
                        block,
                        &stage::bytes(&data)[at..at + usize_of(bs)],
                        supplied,
                    )
                {
                    return Err(Error::ProtectionMismatch {
                        volume: self.name.clone(),
                        block,
                        supplied: crate::tag::Tag::from_bytes(supplied).to_string(),
                        computed: tag.to_string(),
                    });
                }
            }
            entries.push((block, Staged::Data { buf: data, at, tag }));
        }
        self.stage_entries(entries)?;
        drop(guards);
        self.policy.rewritten(first, last);
        self.commit_if_full()
    }

    /// During an online re-tag, or after one completed in this session, `supplied` is the
    /// tuple a profile *not* covering `block` now gives `data`: the caller computed it before
    /// a re-tag step passed the block, or before the re-tag ended, which it cannot avoid. It
    /// proves the data intact in transit as well as the covering profile's would; the covering
    /// profile's tag is what is stored.
    fn tuple_of_other_profile(&self, block: u64, data: &[u8], supplied: &[u8]) -> bool {
        let covering = self.tagger.tagger_for(block);
        [
            Some(self.tagger.current()),
            self.tagger.target(),
            self.tagger.previous(),
        ]
        .into_iter()
        .flatten()
        .filter(|t| !Arc::ptr_eq(t, &covering))
        .any(|t| t.generate(block, data).matches_slot(supplied))
    }

    /// The largest request staged as one (`journal` mode: the atomic size).
    fn max_request(&self) -> Option<u64> {
        super::commit::journal::limits(&self.geo).map(|l| l.max_atomic)
    }

    /// A request larger than [`Inner::max_request`], written as requests of at most `max`
    /// bytes ending on block boundaries (each atomic on its own).
    fn write_split(&self, buf: &[u8], offset: u64, pi: Option<&[u8]>, max: u64) -> Result<()> {
        let bs = u64::from(self.geo.block_size);
        let t = self.geo.tag_size as usize;
        let end = offset + buf.len() as u64;
        let mut at = offset;
        while at < end {
            let next = ((at + max) / bs * bs).min(end).max(at + 1);
            let piece = &buf[usize_of(at - offset)..usize_of(next - offset)];
            // Tuples only come with block-aligned writes: one per block of the piece.
            let tuples = pi.map(|p| &p[usize_of((at - offset) / bs) * t..usize_of((next - offset) / bs) * t]);
            self.write_impl(piece, None, at, tuples)?;
            at = next;
        }
        Ok(())
    }

    /// Stages a request's blocks as one. In `journal` mode a batch must fit one segment: when
    /// this request would overflow the active batch, that batch is committed first.
    fn stage_entries(&self, entries: Vec<(u64, Staged)>) -> Result<()> {
        let data = entries
            .iter()
            .filter(|(_, e)| matches!(e, Staged::Data { .. }))
            .count();
        let zero = entries.len() - data;
        loop {
            {
                let mut stage = self.lock(&self.stage);
                let fits = self.segment_cost.is_none_or(|c| {
                    stage.active.is_empty()
                        || c.of_counts((stage.counts.0 + data, stage.counts.1 + zero)) <= c.cap
                });
                if fits {
                    for (block, entry) in entries {
                        stage.put(block, entry);
                    }
                    return Ok(());
                }
            }
            let mut state = self.lock(&self.commit);
            self.commit_locked(&mut state)?;
        }
    }

    fn commit_if_full(&self) -> Result<()> {
        let staged = self.lock(&self.stage).active_bytes;
        if staged >= self.stage_limit && self.background && staged < 2 * self.stage_limit {
            // Hand the batch to the committer thread and keep going: its writes and flushes
            // overlap with this thread's copying and checksumming. Past twice the limit the
            // writer commits itself, which bounds memory.
            *self.lock(&self.kick) = true;
            self.kick_cv.notify_one();
            return Ok(());
        }
        if staged >= self.stage_limit {
            let mut state = self.lock(&self.commit);
            // Another writer may have committed while this one waited for the lock.
            if self.lock(&self.stage).active_bytes >= self.stage_limit {
                self.commit_locked(&mut state)?;
            }
        }
        Ok(())
    }

    /// Blocks zeroed per staging step: bounded so a huge zeroing cannot hold the stripes for
    /// long and, in `journal` mode, so one step fits a segment.
    fn zero_slice(&self) -> u64 {
        self.segment_cost
            .map_or(1 << 16, |c| (c.cap / c.entry).clamp(1, 1 << 16) as u64)
    }

    /// Makes the range read as zeros. Whole blocks become unwritten (their space is
    /// released); partial blocks at the edges are zero-filled.
    pub(crate) fn write_zeroes(&self, offset: u64, len: u64) -> Result<()> {
        self.check_range(offset, len)?;
        self.writable()?;
        if len == 0 {
            return Ok(());
        }
        let bs = u64::from(self.geo.block_size);
        let end = offset + len;
        let first_full = offset.div_ceil(bs);
        let end_full = end / bs;
        let unaligned = !offset.is_multiple_of(bs) || !end.is_multiple_of(bs);
        // In `journal` mode a request up to the atomic size is one request: an unaligned one
        // is written as zeros (edges and middle staged together) instead of in three steps.
        let atomic = unaligned && self.max_request().is_some_and(|m| len <= m);
        if first_full >= end_full || atomic {
            return self.write_at(&vec![0u8; usize_of(len)], offset);
        }
        if offset < first_full * bs {
            self.write_at(&vec![0u8; usize_of(first_full * bs - offset)], offset)?;
        }
        if end > end_full * bs {
            self.write_at(&vec![0u8; usize_of(end - end_full * bs)], end_full * bs)?;
        }
        // Staged in bounded slices so a huge zeroing cannot hold the stripes for long.
        let mut b = first_full;
        while b < end_full {
            let n = (end_full - b).min(self.zero_slice());
            self.check_metadata_writable(b, b + n - 1, first_full..end_full)?;
            let guards = self.lock_stripes(b, n);
            self.stage_entries((b..b + n).map(|x| (x, Staged::Zero)).collect())?;
            drop(guards);
            self.policy.rewritten(b, b + n - 1);
            b += n;
            let pending = self.lock(&self.stage).active.len();
            if pending >= 1 << 18 {
                let mut state = self.lock(&self.commit);
                self.commit_locked(&mut state)?;
            }
        }
        self.commit_if_full()
    }
}
