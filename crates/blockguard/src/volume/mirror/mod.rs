//! Mirror sets in the engine: forming a set, opening one from its members, recording a
//! member's failure in the survivors' superblocks, making copies agree after a crash, and
//! read repair. The set itself — writing to every member, reading from one — is the
//! [`crate::copies::CopySet`] layer below; this module is what only the engine can judge.
//!
//! Invariant M: every member in sync received every write and flush since it was last in
//! sync, so outside the groups the dirty map marks after a crash, all of them hold the same
//! bytes. A member that misses a write is dropped, and its failure is durable in the
//! survivors' superblocks before the flush that would make that write durable reports
//! success (`Inner::record_member_failures`, called by every flush of the commit path).
//!
//! The parts: `open` (forming and opening sets, telling members that are not what the set
//! says), `converge` (making copies agree after a crash), `repair` (read repair and the
//! examination of every copy of a block); this file: what the set looks like, and recording
//! failures.

mod converge;
mod open;
mod repair;

pub(crate) use open::encoded_records;
pub use open::member_records;
pub(crate) use repair::MemberCopy;

use crate::error::Result;
use crate::format::member_record_offset;
use crate::volume::{Inner, Volume};
use std::sync::atomic::Ordering;

impl Volume {
    /// The members of this volume's mirror set and whether each is in sync; empty for a
    /// plain volume.
    pub fn members(&self) -> Vec<(String, bool)> {
        let set = &self.inner.backend;
        if self.inner.lock(&self.inner.mirror).is_none() {
            return Vec::new();
        }
        (0..set.count())
            .map(|i| (set.backend(i).name(), set.in_sync(i)))
            .collect()
    }
}

/// Where a mirror member stands, for [`Volume::copies`].
#[derive(Clone, Copy, Debug, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "kebab-case")]
#[non_exhaustive]
pub enum CopyState {
    /// Holds the volume's current contents: read and written.
    InSync,
    /// Being resynchronized: written with every commit, not read until its copy is complete.
    CatchingUp,
    /// Present but behind (it failed, or missed writes): neither read nor written until a
    /// resync.
    OutOfSync,
    /// Missing at open: the set runs without it.
    Absent,
}

/// One copy of a volume, for [`Volume::copies`].
#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize)]
#[non_exhaustive]
pub struct CopyStatus {
    /// Its number in the set (its role).
    pub copy: usize,
    /// Its backend's name (a path), or the path the set's records last knew for a missing one.
    pub path: String,
    /// Where it stands.
    pub state: CopyState,
}

impl Volume {
    /// Every copy of the volume with where it stands; empty for a plain volume.
    pub fn copies(&self) -> Vec<CopyStatus> {
        let set = &self.inner.backend;
        if self.inner.lock(&self.inner.mirror).is_none() {
            return Vec::new();
        }
        (0..set.count())
            .map(|i| CopyStatus {
                copy: i,
                path: set.backend(i).name(),
                state: if set.in_sync(i) {
                    CopyState::InSync
                } else if set.catching_up(i) {
                    CopyState::CatchingUp
                } else if set.present(i) {
                    CopyState::OutOfSync
                } else {
                    CopyState::Absent
                },
            })
            .collect()
    }

    /// Groups (regions of `Geometry::group_blocks` blocks) the write-intent map marks now:
    /// those with writes not yet known durable on every copy, and, while a copy is out of
    /// sync, every group written since it fell behind (what a resync will copy).
    pub fn dirty_regions(&self) -> u64 {
        self.inner.dirty_groups().len() as u64
    }
}

impl Inner {
    /// Some member of the set is out of sync (or missing): writes are recorded in the dirty
    /// map until it is resynchronized.
    pub(crate) fn degraded(&self) -> bool {
        self.backend.live().len() < self.backend.count()
    }

    /// Puts the member records into a superblock region about to be written, so a
    /// superblock update never erases them.
    pub(crate) fn put_member_records(&self, region: &mut [u8]) {
        for (i, r) in &self.records {
            let at = member_record_offset(*i);
            region[at..at + 512].copy_from_slice(r);
        }
    }

    /// Records members the copy layer dropped since the last call as out of sync in the
    /// survivors' superblocks (durably). Called after every flush of the commit path, so a
    /// flush never reports success while a dropped member still claims to be in sync.
    pub(crate) fn record_member_failures(&self) -> Result<()> {
        loop {
            let failures = self.backend.take_new_failures();
            if failures.is_empty() {
                return Ok(());
            }
            {
                let mut mirror = self.lock(&self.mirror);
                let Some(m) = mirror.as_mut() else {
                    return Ok(());
                };
                for (i, why) in &failures {
                    tracing::error!(volume = %self.name, member = i, "mirror member out of sync: {why}");
                    m.members[*i].in_sync = false;
                }
                m.event += 1;
            }
            self.stats
                .members_failed
                .fetch_add(failures.len() as u64, Ordering::Relaxed);
            if self.read_only {
                return Ok(());
            }
            let state = if self.disk_in_use.load(Ordering::Acquire) {
                crate::format::VolumeState::InUse
            } else {
                crate::format::VolumeState::Clean
            };
            self.write_superblocks(state, "recording a failed mirror member")?;
        }
    }
}
