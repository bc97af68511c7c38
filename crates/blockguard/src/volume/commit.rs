//! Committing a batch of staged writes: the `dual` consistency protocol.
//!
//! For each batch (see `docs/CONSISTENCY.md` for the argument):
//! 1. If a group of this batch had data written since the last completed flush, flush
//!    first: the sector about to be overwritten may still hold the only tag of data that is
//!    not yet durable. (Groups without such data need no flush: a sequential writer's
//!    batches touch different groups, so it pays one flush per batch, not two.)
//! 2. For every group the batch touches (its metadata confirmed by a second read if it came
//!    from one), give every brother pair a new sector in its *older* slot: the newest tags plus
//!    the batch's, one generation up. A group's first write fills both slots.
//! 3. Flush: the new tags are durable before any data they describe is issued.
//! 4. Write the data (neighbouring blocks coalesced into one vectored write).
//!
//! After a crash each block's content is its old version (matching the now-older sector), its
//! new version (matching the newer one), or torn. Reads accept either tag until recovery or a
//! flush proves the data durable; then only the newest, so lost writes are caught. Commits run
//! only on settled groups: a read-write open recovers a volume left in use first.
//!
//! In `none` mode the flushes are skipped and data goes before metadata: the comparison case
//! the crash simulator must catch.

use super::group::{GroupState, Origin};
use super::meta_io::MetaUpdate;
use super::stage::{bytes, Batch, SharedBuf, Staged};
use super::{aligned, Inner};
use crate::cast::{u32_of_small, usize_of};
use crate::error::{Error, Result};
use crate::format::{MapKind, Mode, VolumeState};
use crate::tag::{Tag, UNWRITTEN};
use std::collections::HashSet;
use std::sync::Arc;

/// What the protocol remembers between commits (guarded by the volume's commit mutex).
#[derive(Default)]
pub(crate) struct CommitState {
    /// Epoch of the last commit.
    pub(crate) epoch: u64,
    /// Data was written to the backend since the last completed flush.
    data_unflushed: bool,
    /// The groups that data was written to since the last completed flush (a subset of the
    /// groups of the batches since then, so bounded by the stage).
    unflushed_groups: HashSet<u64>,
    /// The superblocks say "in use" (written before the first commit of this session).
    pub(crate) marked_in_use: bool,
    /// Acknowledged block writes that could not be kept (their metadata turned out damaged
    /// after they were accepted), with the first reason. Flushes fail while any is left; a
    /// later write of the block that is kept takes it off.
    lost: std::collections::BTreeSet<u64>,
    lost_why: String,
}

/// Appends a staged block to a run of (buffer, start, end) pieces, extending the last piece
/// when the block directly follows it in the same buffer.
fn push_block<'a>(run: &mut Vec<(&'a SharedBuf, usize, usize)>, e: &'a Staged, bs: usize) {
    if let Staged::Data { buf, at, .. } = e {
        if let Some(last) = run.last_mut() {
            if Arc::ptr_eq(last.0, buf) && last.2 == *at {
                last.2 += bs;
                return;
            }
        }
        run.push((buf, *at, *at + bs));
    }
}

/// Data runs at least this long get an early writeback hint (smaller ones are left to the
/// next flush: hinting every 4 KiB block of a random batch would cost more than it saves).
const WRITEBACK_MIN: usize = 256 << 10;

/// A run of neighbouring blocks of one group to write: their bytes, or `None` to zero them.
struct Run<'a> {
    off: u64,
    len: usize,
    data: Option<Vec<&'a [u8]>>,
}

/// Most iovecs per vectored write (the kernel's `IOV_MAX`).
const MAX_IOV: usize = 1024;

impl Inner {
    /// Records that a write-back failed: acknowledged writes may be lost, so no later write or
    /// flush may report success. Kept outside the commit lock so writers can check it without
    /// waiting for a commit in progress.
    pub(crate) fn fail(&self, detail: String) {
        let _ = self.failure.set(detail);
    }

    /// The error to return once a write-back has failed (or a thread panicked holding the
    /// commit or stage lock: seen here without waiting for someone to take the lock).
    pub(crate) fn failed(&self) -> Result<()> {
        if self.failure.get().is_none() && (self.commit.is_poisoned() || self.stage.is_poisoned()) {
            tracing::error!(volume = %self.name, "a thread panicked while holding a lock of the engine: failing the volume");
            self.fail(
                "a thread panicked while holding a lock of the engine: its state may be inconsistent".into(),
            );
        }
        match self.failure.get() {
            Some(detail) => Err(Error::Failed {
                volume: self.name.clone(),
                detail: detail.clone(),
            }),
            None => Ok(()),
        }
    }

    /// Commits the active batch. Caller holds the commit lock (`state`).
    pub(crate) fn commit_locked(&self, state: &mut CommitState) -> Result<()> {
        self.failed()?;
        if self.lock(&self.stage).active.is_empty() {
            return Ok(());
        }
        if !state.marked_in_use {
            // Before anything changes: from now on a crash may leave older brothers needed.
            self.write_superblocks(VolumeState::InUse, "marking the volume in use")
                .inspect_err(|e| self.fail(e.to_string()))?;
            state.marked_in_use = true;
        }
        let batch = {
            let mut staging = self.lock(&self.stage);
            if staging.active.is_empty() {
                return Ok(());
            }
            debug_assert!(staging.committing.is_none(), "commits are serialized");
            let batch = Arc::new(staging.take_active());
            staging.committing = Some(batch.clone());
            batch
        };
        match self.commit_batch(state, &batch) {
            Err(e) => {
                // The batch stays readable in `committing`; durability is no longer promised.
                self.fail(e.to_string());
                tracing::error!(volume = %self.name, "write-back failed: {e}");
                Err(e)
            }
            Ok(None) => {
                self.lock(&self.stage).committing = None;
                Ok(())
            }
            Ok(Some(lost)) => {
                // Blocks of damaged metadata sectors could not be kept; everything else was.
                // The volume goes on; flushes report the loss until the blocks are rewritten.
                self.lock(&self.stage).committing = None;
                tracing::error!(volume = %self.name, "{lost}");
                Ok(())
            }
        }
    }

    /// The error flushes return while acknowledged writes are known lost.
    pub(crate) fn lost_writes(&self, state: &CommitState) -> Result<()> {
        let Some(&first) = state.lost.iter().next() else {
            return Ok(());
        };
        let list: Vec<String> = state.lost.iter().take(16).map(ToString::to_string).collect();
        let more = if state.lost.len() > 16 { ", …" } else { "" };
        Err(Error::Corrupt {
            volume: self.name.clone(),
            block: first,
            kind: crate::CorruptionKind::MetadataDamaged,
            detail: format!(
                "{} acknowledged block writes could not be kept (blocks {}{more}): {}; they keep their previous \
                 contents. Flushes fail until they are written again (a write must cover each damaged metadata \
                 sector whole) or `blockguard recover --rebuild` rebuilds the metadata",
                state.lost.len(),
                list.join(", "),
                state.lost_why
            ),
        })
    }

    /// Commits `batch`. `Ok(Some(e))`: committed except blocks whose metadata turned out
    /// damaged after they were accepted (the cached state they were checked against was
    /// evicted and the disk no longer agrees); `e` names them, and they are remembered as
    /// lost.
    fn commit_batch(&self, state: &mut CommitState, batch: &Batch) -> Result<Option<Error>> {
        let dual = self.sb.mode == Mode::Dual;
        let t0 = std::time::Instant::now();
        let overlap = dual
            && state.data_unflushed
            && batch
                .keys()
                .any(|&b| state.unflushed_groups.contains(&self.geo.group_of(b).0));
        state.epoch += 1;
        let epoch = state.epoch;
        let (updates, first_writes, dropped) = self.plan_batch(batch, epoch)?;
        if dual {
            self.mark_session(state, &updates, &first_writes, overlap)?;
        }
        let t_flush = t0.elapsed();
        let kept: Batch;
        let batch = if dropped.is_empty() {
            batch
        } else {
            kept = batch
                .iter()
                .filter(|(b, _)| !dropped.iter().any(|(d, _)| d == *b))
                .map(|(b, e)| (*b, e.clone()))
                .collect();
            &kept
        };
        // Groups written for the first time are marked in the written-groups map, durable by
        // the same barrier as their metadata (so before any of their data).
        let map = self.map_updates(&first_writes)?;

        if dual {
            self.write_metadata(&updates)?;
            self.write_map(&map)?;
            let t_meta = t0.elapsed();
            self.backend
                .flush()
                .map_err(self.io_err("flushing metadata", 0))?;
            // That flush also made durable every data write that completed before it: those
            // of all earlier batches.
            state.flushed(epoch - 1);
            let t_meta_flush = t0.elapsed();
            self.install(&updates);
            self.install_map(map);
            self.write_data(batch)?;
            state.unflushed_groups.extend(updates.iter().map(|u| u.group));
            tracing::debug!(
                volume = %self.name,
                epoch,
                blocks = batch.len(),
                groups = updates.len(),
                flushed_first = overlap,
                "committed: flush {:?}, metadata {:?}, metadata flush {:?}, data {:?}",
                t_flush,
                t_meta.saturating_sub(t_flush),
                t_meta_flush.saturating_sub(t_meta),
                t0.elapsed().saturating_sub(t_meta_flush),
            );
        } else {
            self.write_data(batch)?;
            self.write_metadata(&updates)?;
            self.write_map(&map)?;
            self.install(&updates);
            self.install_map(map);
        }
        state.data_unflushed = true;
        Ok(self.record_lost(state, batch, &dropped))
    }

    /// Step 1 of a commit (`dual` mode): the groups about to get new brothers are marked dirty,
    /// durably, before any of their metadata is written (after a crash only dirty groups are
    /// read leniently); the same flush settles earlier batches' data in these groups, and is
    /// paid even without new marks when the batch `overlap`s groups with unflushed data.
    /// Groups written for the first time are also marked in the first-write map: only they
    /// may show blank sectors after a crash.
    fn mark_session(
        &self,
        state: &mut CommitState,
        updates: &[MetaUpdate],
        first_writes: &[u64],
        overlap: bool,
    ) -> Result<()> {
        let mut session = self.session_updates(
            MapKind::Dirty,
            &updates.iter().map(|u| u.group).collect::<Vec<_>>(),
        );
        session.extend(self.session_updates(MapKind::FirstWrite, first_writes));
        if overlap || !session.is_empty() {
            self.write_map(&session)?;
            self.flush_or_fail("flushing before new metadata")?;
            state.flushed(state.epoch - 1);
            self.adopt_session(&session);
        }
        Ok(())
    }

    /// After a commit: the blocks of `batch` are kept (no longer lost), those of `dropped` are
    /// lost from now on, with the first reason; returns the error that names the dropped ones.
    fn record_lost(
        &self,
        state: &mut CommitState,
        batch: &Batch,
        dropped: &[(u64, String)],
    ) -> Option<Error> {
        for b in batch.keys() {
            state.lost.remove(b);
        }
        if let Some((_, why)) = dropped.first() {
            if state.lost.is_empty() {
                state.lost_why.clone_from(why);
            }
        }
        state.lost.extend(dropped.iter().map(|(b, _)| *b));
        dropped.first().map(|(block, why)| Error::Corrupt {
            volume: self.name.clone(),
            block: *block,
            kind: crate::CorruptionKind::MetadataDamaged,
            detail: format!(
                "{} acknowledged block writes could not be kept (blocks {}): {why}",
                dropped.len(),
                dropped
                    .iter()
                    .map(|(b, _)| b.to_string())
                    .collect::<Vec<_>>()
                    .join(", ")
            ),
        })
    }

    /// The new metadata of every group the batch touches, the groups written for the first
    /// time, and the blocks that cannot be kept (with why).
    #[allow(clippy::type_complexity)] // Three results of one walk, each named in the doc above.
    fn plan_batch(
        &self,
        batch: &Batch,
        epoch: u64,
    ) -> Result<(Vec<MetaUpdate>, Vec<u64>, Vec<(u64, String)>)> {
        let mut updates = Vec::new();
        let mut first_writes = Vec::new();
        let mut dropped = Vec::new();
        let mut entries = batch.iter().peekable();
        while let Some((&block, _)) = entries.peek() {
            let (group, _) = self.geo.group_of(block);
            let first = self.geo.first_block(group);
            let end = first + u64::from(self.geo.blocks_in_group(group));
            let mut tags: Vec<(usize, Tag)> = Vec::new();
            while let Some((&b, entry)) = entries.next_if(|(&b, _)| b < end) {
                let tag = match entry {
                    Staged::Data { tag, .. } => *tag,
                    Staged::Zero => UNWRITTEN,
                };
                tags.push((usize_of(b - first), tag));
            }
            // Never build on a single read: a transient bad one would be written back.
            let old = self.confirmed_group(group)?;
            if old.never_written() {
                first_writes.push(group);
            }
            let (new, slots) = match self.sb.mode {
                Mode::Dual => self.plan_dual(group, &old, &tags, epoch, &mut dropped)?,
                Mode::None => self.plan_none(group, &old, &tags, epoch),
            };
            if slots != [false, false] {
                updates.push(self.meta_update(group, new, slots));
            }
        }
        Ok((updates, first_writes, dropped))
    }

    /// `dual`: every pair's older brother gets the newest tags plus the batch's, one
    /// generation up; a group's first write fills both slots (the new tags under generation
    /// 1, all unwritten under generation 0), so no written group ever has a blank sector.
    fn plan_dual(
        &self,
        group: u64,
        old: &GroupState,
        tags: &[(usize, Tag)],
        epoch: u64,
        dropped: &mut Vec<(u64, String)>,
    ) -> Result<(GroupState, [bool; 2])> {
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
            self.name
        );
        let ts = self.geo.tag_size as usize;
        let per = self.geo.tags_per_sector() as usize;
        let mut w = old.writer(&self.sb.uuid, group);
        let mut rest = tags;
        for k in 0..old.pairs() {
            let count = self.geo.tags_in_sector(group, u32_of_small(k));
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
                // it starts over with both brothers describing the new data.
                let top = old
                    .pair(k)
                    .iter()
                    .filter_map(crate::format::SectorParse::generation)
                    .max()
                    .unwrap_or(0);
                let g0 = (top.saturating_add(1) | 1).max(3);
                if g0 == u64::MAX {
                    return Err(self.damaged_write(group, k * per, old));
                }
                let new = with_batch(w.tags_of(None, k, count));
                w.put(0, k, g0, &new);
                w.put(1, k, g0 - 1, &new);
                w.set_known(k, 0);
                tracing::warn!(volume = %self.name, group, sector = k, "damaged metadata re-established by a write covering all its blocks");
            } else if !mine.is_empty() {
                // Accepted against a cached state that has since been evicted, and the disk no
                // longer agrees: these blocks cannot be given tags. Their data is not written
                // either; the pair stays as it is, and reads of it keep failing.
                let why = match old.view(k) {
                    super::group::PairView::Damaged(d) => d.to_string(),
                    _ => "metadata damaged".to_string(),
                };
                let first = self.geo.first_block(group);
                dropped.extend(mine.iter().map(|(i, _)| (first + *i as u64, why.clone())));
            }
            // Otherwise a damaged pair the batch does not touch stays as it is.
        }
        Ok(w.finish(&self.geo, epoch))
    }

    /// `none`: slot 0 only, rewritten in place.
    fn plan_none(
        &self,
        group: u64,
        old: &GroupState,
        tags: &[(usize, Tag)],
        epoch: u64,
    ) -> (GroupState, [bool; 2]) {
        let ts = self.geo.tag_size as usize;
        let per = self.geo.tags_per_sector() as usize;
        let mut w = old.writer(&self.sb.uuid, group);
        for k in 0..old.pairs() {
            let count = self.geo.tags_in_sector(group, u32_of_small(k));
            let valid = matches!(old.pair(k)[0], crate::format::SectorParse::Valid { .. });
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
        w.finish(&self.geo, epoch)
    }

    /// The error for a write into a pair whose tags cannot be trusted.
    pub(crate) fn damaged_write(&self, group: u64, index: usize, state: &GroupState) -> Error {
        let block = self.geo.first_block(group) + index as u64;
        let why = match state.accept(index) {
            super::group::Accept::Damaged(d) => d.to_string(),
            _ => "metadata damaged".to_string(),
        };
        Error::Corrupt {
            volume: self.name.clone(),
            block,
            kind: crate::CorruptionKind::MetadataDamaged,
            detail: format!(
                "refusing to write: {why}; a write covering all {} blocks of this metadata sector, or `blockguard recover --rebuild`, re-establishes it",
                self.geo.tags_per_sector()
            ),
        }
    }

    /// Writes the batch's data: runs of neighbouring data blocks become one vectored write,
    /// runs of zeroed blocks one `zero_range`.
    fn write_data(&self, batch: &Batch) -> Result<()> {
        let bs = self.geo.block_size as usize;
        let mut runs: Vec<Run<'_>> = Vec::new();
        let mut iter = batch.iter().peekable();
        while let Some((&start, entry)) = iter.next() {
            let zero = matches!(entry, Staged::Zero);
            let (group, _) = self.geo.group_of(start);
            let group_end = self.geo.first_block(group) + u64::from(self.geo.blocks_in_group(group));
            // Neighbouring blocks staged by one request sit side by side in one buffer: they
            // become a single iovec.
            let mut pieces: Vec<(&SharedBuf, usize, usize)> = Vec::new();
            push_block(&mut pieces, entry, bs);
            let mut end = start + 1;
            while let Some((&b, e)) = iter.peek() {
                let same_kind = matches!(e, Staged::Zero) == zero;
                if b != end || b >= group_end || !same_kind || pieces.len() >= MAX_IOV {
                    break;
                }
                push_block(&mut pieces, e, bs);
                end += 1;
                iter.next();
            }
            let len = usize_of(end - start) * bs;
            let data: Vec<&[u8]> = pieces.iter().map(|(b, lo, hi)| &bytes(b)[*lo..*hi]).collect();
            debug_assert!(zero || data.iter().map(|r| r.len()).sum::<usize>() == len);
            runs.push(Run {
                off: self.geo.data_offset(start),
                len,
                data: (!zero).then_some(data),
            });
        }
        // One thread: buffered writes to one file serialize on its inode lock, so a second
        // writer thread only spins on that lock (tried: more CPU, no gain).
        runs.iter().try_for_each(|r| self.write_run(r))
    }

    /// Writes one run of neighbouring blocks (or zeroes it) and hints its writeback.
    fn write_run(&self, run: &Run<'_>) -> Result<()> {
        let (off, len) = (run.off, run.len);
        let Some(data) = &run.data else {
            return self
                .backend
                .zero_range(off, len as u64)
                .map_err(self.io_err("zeroing data", off));
        };
        let align = self.backend.alignment().max(1);
        if align > 1 {
            let mut buf = aligned(len, align);
            let mut at = 0;
            for d in data {
                buf.as_mut()[at..at + d.len()].copy_from_slice(d);
                at += d.len();
            }
            self.backend
                .write_at(buf.as_ref(), off)
                .map_err(self.io_err("writing data", off))?;
        } else {
            self.backend
                .write_vectored_at(data, off)
                .map_err(self.io_err("writing data", off))?;
        }
        if len >= WRITEBACK_MIN {
            // Let the disk start on this run while the next batch is staged, so the flush
            // that must precede the next metadata write finds it mostly done. A failure here
            // also shows at that flush, which is where it counts.
            if let Err(e) = self.backend.start_writeback(off, len as u64) {
                tracing::debug!(volume = %self.name, offset = off, "writeback hint failed: {e}");
            }
        }
        Ok(())
    }

    /// Flushes the backend and marks every committed batch durable. Caller holds the commit lock.
    pub(crate) fn flush_locked(&self, state: &mut CommitState) -> Result<()> {
        if !state.data_unflushed {
            return Ok(());
        }
        self.flush_or_fail("flushing")?;
        state.flushed(state.epoch);
        Ok(())
    }

    /// Flushes the backend; a failure fails the volume: the kernel may have dropped the dirty
    /// pages it could not write, so a later flush succeeding would not mean our data is there.
    pub(crate) fn flush_or_fail(&self, during: &'static str) -> Result<()> {
        self.backend.flush().map_err(|e| {
            self.fail(format!("flush failed: {e}"));
            self.io_err(during, 0)(e)
        })
    }
}

impl CommitState {
    /// Records a completed flush that covered the data of every batch up to `epoch`.
    pub(crate) fn flushed(&mut self, epoch: u64) {
        debug_assert!(epoch <= self.epoch);
        self.data_unflushed = false;
        self.unflushed_groups.clear();
    }
}
