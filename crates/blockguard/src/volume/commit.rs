//! Committing a batch of staged writes: the `dual` consistency protocol.
//!
//! For each batch (see `docs/CONSISTENCY.md` for the argument):
//! 1. If a group of this batch had data written since the last completed flush, flush
//!    first: the brother about to be overwritten may still hold the only tag of data that is
//!    not yet durable. (Groups without such data need no flush: a sequential writer's
//!    batches touch different groups, so it pays one flush per batch, not two.)
//! 2. For every group the batch touches, write the *older* brother with the newest tags plus
//!    the batch's new tags, under the next generation.
//! 3. Flush: the new tags are durable before any data they describe is issued.
//! 4. Write the data (neighbouring blocks coalesced into one vectored write).
//!
//! After a crash each block's content is its old version (matching the now-older brother),
//! its new version (matching the newer one), or torn. Reads accept either brother's tag until
//! a flush proves the data durable; then only the newest, so lost writes are caught.
//!
//! In `none` mode the flushes are skipped and data goes before metadata: the comparison case
//! the crash simulator must catch.

use super::stage::{bytes, Batch, SharedBuf, Staged};
use super::{aligned, group::GroupState, lock, Inner};
use crate::error::{Error, Result};
use crate::format::{MetaParse, Mode, VolumeState};
use std::collections::HashSet;
use std::sync::atomic::Ordering;
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

/// A group's new metadata: (group, slot, the state to install, the encoded block).
pub(crate) type MetaUpdate = (u64, usize, Arc<GroupState>, Vec<u8>);

/// Data runs at least this long get an early writeback hint (smaller ones are left to the
/// next flush: hinting every 4 KiB block of a random batch would cost more than it saves).
const WRITEBACK_MIN: usize = 256 << 10;

/// A run of neighbouring blocks of one group to write: their bytes, or `None` to zero them.
struct Run<'a> {
    off: u64,
    len: usize,
    data: Option<Vec<&'a [u8]>>,
}

/// Most iovecs per vectored write (the kernel's IOV_MAX).
const MAX_IOV: usize = 1024;

impl Inner {
    /// Records that a write-back failed: acknowledged writes may be lost, so no later write or
    /// flush may report success. Kept outside the commit lock so writers can check it without
    /// waiting for a commit in progress.
    pub(crate) fn fail(&self, detail: String) {
        let _ = self.failure.set(detail);
    }

    /// The error to return once a write-back has failed.
    pub(crate) fn failed(&self) -> Result<()> {
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
        if lock(&self.stage).active.is_empty() {
            return Ok(());
        }
        if !state.marked_in_use {
            // Before anything changes: from now on a crash may leave older brothers needed.
            self.write_superblocks(VolumeState::InUse, "marking the volume in use")
                .inspect_err(|e| self.fail(e.to_string()))?;
            state.marked_in_use = true;
        }
        let batch = {
            let mut stage = lock(&self.stage);
            if stage.active.is_empty() {
                return Ok(());
            }
            debug_assert!(stage.committing.is_none(), "commits are serialized");
            let batch = Arc::new(stage.take_active());
            stage.committing = Some(batch.clone());
            batch
        };
        let result = self.commit_batch(state, &batch);
        if let Err(e) = &result {
            // The batch stays readable in `committing`; durability is no longer promised.
            self.fail(e.to_string());
            tracing::error!(volume = %self.name, "write-back failed: {e}");
        } else {
            lock(&self.stage).committing = None;
        }
        result
    }

    fn commit_batch(&self, state: &mut CommitState, batch: &Batch) -> Result<()> {
        let dual = self.sb.mode == Mode::Dual;
        let t0 = std::time::Instant::now();
        let overlap = dual
            && state.data_unflushed
            && batch
                .keys()
                .any(|&b| state.unflushed_groups.contains(&self.geo.group_of(b).0));
        if overlap {
            self.flush_locked(state)?;
        }
        let t_flush = t0.elapsed();
        state.epoch += 1;
        let epoch = state.epoch;
        let bs = self.geo.block_size as usize;
        let ts = self.geo.tag_size as usize;

        // Build the new metadata of every touched group.
        let mut updates: Vec<MetaUpdate> = Vec::new();
        let mut entries = batch.iter().peekable();
        while let Some((&block, _)) = entries.peek() {
            let (group, _) = self.geo.group_of(block);
            let count = self.geo.blocks_in_group(group);
            let old = self.group(group)?;
            let Some(mut next) = old.next(count, ts) else {
                return Err(Error::Corrupt {
                    volume: self.name.clone(),
                    block,
                    kind: crate::CorruptionKind::MetadataDamaged,
                    detail: format!(
                        "both metadata copies of group {group} are damaged; refusing to write over tags that cannot be read"
                    ),
                });
            };
            if old.written_epoch.is_none() && dual {
                self.resolve_unsettled(group, &old, &mut next.base, batch)?;
            }
            let group_end = self.geo.first_block(group) + count as u64;
            while let Some((&b, entry)) = entries.peek() {
                if b >= group_end {
                    break;
                }
                let tag = match entry {
                    Staged::Data { tag, .. } => *tag,
                    Staged::Zero => crate::tag::UNWRITTEN,
                };
                next.base
                    .set_tag((b - self.geo.first_block(group)) as usize, &tag);
                entries.next();
            }
            if !dual {
                // No brothers in `none` mode: always rewrite slot 0 in place.
                next.slot = 0;
                next.base.generation = 1;
            }
            let mut buf = aligned(bs, self.backend.alignment().max(1));
            next.base
                .encode(buf.as_mut(), &self.sb.uuid, group, next.slot, ts);
            let mut slots = old.slots.clone();
            slots[next.slot] = MetaParse::Valid(next.base);
            let new_state = Arc::new(GroupState {
                slots,
                written_epoch: Some(epoch),
            });
            let mut bytes = buf.as_ref().to_vec();
            if next.slot == 0 && old.slots[1] == MetaParse::Empty {
                // The group's first metadata write also writes slot 1 (as zeros: still empty),
                // so the file has no one-block hole between data extents; such holes send
                // reads down the filesystem's slow per-block path.
                bytes.resize(2 * bs, 0);
            }
            updates.push((group, next.slot, new_state, bytes));
        }

        if dual {
            self.write_metadata(&updates)?;
            let t_meta = t0.elapsed();
            self.backend
                .flush()
                .map_err(self.io_err("flushing metadata", 0))?;
            // That flush also made durable every data write that completed before it: those
            // of all earlier batches.
            self.flushed(state, epoch - 1);
            let t_meta_flush = t0.elapsed();
            self.install(&updates);
            self.write_data(batch)?;
            state
                .unflushed_groups
                .extend(updates.iter().map(|(group, ..)| *group));
            tracing::debug!(
                volume = %self.name,
                epoch,
                blocks = batch.len(),
                groups = updates.len(),
                flushed_first = overlap,
                "committed: flush {:?}, metadata {:?}, metadata flush {:?}, data {:?}",
                t_flush,
                t_meta - t_flush,
                t_meta_flush - t_meta,
                t0.elapsed() - t_meta_flush,
            );
        } else {
            self.write_data(batch)?;
            self.write_metadata(&updates)?;
            self.install(&updates);
        }
        state.data_unflushed = true;
        Ok(())
    }

    /// Before the first rewrite of a group whose state after an unclean shutdown is
    /// ambiguous, settle it against the disk: for every block whose two brothers disagree and
    /// that this batch does not overwrite, keep the tag its on-disk data actually matches.
    /// Otherwise the new brother (a copy of the newest) would replace the only tag describing
    /// data whose newer version never landed.
    pub(crate) fn resolve_unsettled(
        &self,
        group: u64,
        state: &GroupState,
        base: &mut crate::format::MetaBlock,
        batch: &Batch,
    ) -> Result<()> {
        use super::group::Accept;
        let first = self.geo.first_block(group);
        let bs = self.geo.block_size as usize;
        let mut buf = aligned(bs, self.backend.alignment().max(1));
        for i in 0..self.geo.blocks_in_group(group) as usize {
            let block = first + i as u64;
            let Accept::Either(newest, older) = state.accept(i, false) else {
                continue;
            };
            if newest == older || batch.contains_key(&block) {
                continue;
            }
            let off = self.geo.data_offset(block);
            self.backend
                .read_at(buf.as_mut(), off)
                .map_err(self.io_err("reading data to settle a group", off))?;
            let p = self.sb.profile;
            if !p.verify(&self.sb.uuid, block, buf.as_ref(), &newest)
                && p.verify(&self.sb.uuid, block, buf.as_ref(), &older)
            {
                base.set_tag(i, &older);
            }
        }
        Ok(())
    }

    pub(crate) fn write_metadata(&self, updates: &[MetaUpdate]) -> Result<()> {
        let align = self.backend.alignment().max(1);
        for (group, slot, _, bytes) in updates {
            let off = self.geo.meta_offset(*group, *slot);
            let mut buf = aligned(bytes.len(), align);
            buf.as_mut().copy_from_slice(bytes);
            self.backend
                .write_at(buf.as_ref(), off)
                .map_err(self.io_err("writing metadata", off))?;
        }
        Ok(())
    }

    /// Publishes the new metadata to readers. Done after the metadata is on the backend and
    /// before the data, so a reader that sees new data also sees the tag that covers it.
    pub(crate) fn install(&self, updates: &[MetaUpdate]) {
        for (group, _, new_state, _) in updates {
            self.cache.lock(*group).put(*group, new_state.clone());
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
            let group_end = self.geo.first_block(group) + self.geo.blocks_in_group(group) as u64;
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
            let len = (end - start) as usize * bs;
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
        self.flushed(state, state.epoch);
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

    /// Records a completed flush that covered the data of every batch up to `epoch`.
    pub(crate) fn flushed(&self, state: &mut CommitState, epoch: u64) {
        debug_assert!(epoch <= state.epoch);
        state.data_unflushed = false;
        state.unflushed_groups.clear();
        self.durable_epoch.fetch_max(epoch, Ordering::AcqRel);
    }
}
