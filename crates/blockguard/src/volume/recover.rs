//! Recovery after an unclean shutdown: settle every group against the disk, then mark the
//! volume clean.
//!
//! After a crash every group is *unsettled*: where its two brothers disagree, reads accept
//! either tag, because either version of the block may be the one that reached the disk. That
//! keeps G1 but weakens G4: a lost or misdirected write of a group's last batch before the
//! crash goes unnoticed as long as the older version is still on disk. Recovery reads every
//! such block once, rewrites the group's metadata where the newest brother does not describe
//! what the disk holds (a new brother, one generation up, with the tags the data actually
//! matches), flushes, and marks the volume clean — from then on only the newest tags are
//! accepted, in this session and after every clean reopen.
//!
//! Crash safety of recovery itself: it changes no data, and a group's new brother goes to the
//! slot of the older one, so a crash during recovery leaves, for each group, either the old
//! pair or (old newest, new) with consecutive generations — both accepted exactly as before.
//! The volume is marked clean only after the final flush.

use super::commit::MetaUpdate;
use super::stage::Batch;
use super::{group::GroupState, lock, Inner};
use crate::error::{Error, Result};
use crate::format::{MetaParse, Mode, VolumeState};
use std::sync::atomic::Ordering;
use std::sync::Arc;

/// What [`crate::Volume::recover`] did.
#[derive(Clone, Debug, Default, PartialEq, Eq, serde::Serialize)]
pub struct RecoveryReport {
    /// The volume was closed cleanly (or already recovered): nothing to do.
    pub already_clean: bool,
    /// Groups whose metadata was examined.
    pub groups_examined: u64,
    /// Groups given a new metadata brother.
    pub groups_rewritten: u64,
    /// Blocks whose newest tag described a version that never reached the disk: their tag
    /// now describes the version that did.
    pub blocks_reverted: u64,
    /// Groups whose two metadata copies are both unreadable (left as they are; `check`
    /// reports their blocks).
    pub groups_damaged: u64,
}

impl Inner {
    /// Settles every group against the disk and marks the volume clean; see the module docs.
    /// `progress` is called with the number of groups done so far.
    pub(crate) fn recover(&self, mut progress: impl FnMut(u64)) -> Result<RecoveryReport> {
        if self.read_only {
            return Err(Error::ReadOnly {
                volume: self.name.clone(),
            });
        }
        let mut state = lock(&self.commit);
        self.failed()?;
        // What recovery reads must be what the disk holds, not pages the kernel has yet to
        // write (a killed process leaves those behind): stage out, then flush unconditionally.
        self.commit_locked(&mut state)?;
        self.flush_or_fail("flushing before recovery")?;
        let epoch = state.epoch;
        self.flushed(&mut state, epoch);
        let mut report = RecoveryReport::default();
        if self.trusted.load(Ordering::Acquire) {
            report.already_clean = true;
            return Ok(report);
        }
        let ts = self.geo.tag_size as usize;
        let bs = self.geo.block_size as usize;
        let none = Batch::new();
        let mut rewritten: Vec<MetaUpdate> = Vec::new();
        for group in 0..self.geo.groups {
            report.groups_examined += 1;
            let old = self.group(group)?;
            // Groups rewritten in this session were resolved before their rewrite, and the
            // flush above made their data durable.
            if old.written_epoch.is_some() || self.sb.mode != Mode::Dual {
                continue;
            }
            let Some((_, newest)) = old.newest() else {
                if old.slots.iter().all(|s| matches!(s, MetaParse::Invalid(_))) {
                    report.groups_damaged += 1;
                }
                continue;
            };
            let count = self.geo.blocks_in_group(group);
            let Some(mut next) = old.next(count, ts) else {
                report.groups_damaged += 1;
                continue;
            };
            self.resolve_unsettled(group, &old, &mut next.base, &none)?;
            let reverted = (0..count as usize)
                .filter(|&i| next.base.tag_bytes(i) != newest.tag_bytes(i))
                .count() as u64;
            if reverted == 0 {
                continue;
            }
            let mut bytes = vec![0u8; bs];
            next.base.encode(&mut bytes, &self.sb.uuid, group, next.slot, ts);
            let mut slots = old.slots.clone();
            slots[next.slot] = MetaParse::Valid(next.base);
            let state = Arc::new(GroupState {
                slots,
                written_epoch: Some(0),
            });
            let update = (group, next.slot, state, bytes);
            self.write_metadata(std::slice::from_ref(&update))?;
            // Only the state is kept, to install after the flush; not the encoded block.
            rewritten.push((update.0, update.1, update.2, Vec::new()));
            report.groups_rewritten += 1;
            report.blocks_reverted += reverted;
            if group % 64 == 0 {
                progress(group);
            }
        }
        progress(self.geo.groups);
        self.flush_or_fail("flushing recovered metadata")?;
        // Every group now describes what the disk holds: trust the newest tags from here on,
        // for groups loaded later too.
        self.trusted.store(true, Ordering::Release);
        self.cache.clear();
        self.install(&rewritten);
        self.write_superblocks(VolumeState::Clean, "marking the volume clean after recovery")?;
        state.marked_in_use = false;
        tracing::info!(volume = %self.name, ?report, "recovered");
        Ok(report)
    }
}
