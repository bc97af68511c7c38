//! Resynchronizing mirror members that fell behind.
//!
//! A member that missed writes (it failed, or was missing at open) is out of sync: never read,
//! never written. Every group written since it fell behind is marked in the dirty map (kept,
//! durably, while the set is degraded: the write-intent bitmap), so resync copies exactly
//! those groups — their two metadata blocks and their data — and the three group bitmaps from
//! a member in sync, reads every copied range back, flushes the member, and only then records
//! it in sync in every member's superblock. A member that was never part of the volume's
//! history (added to the set) gets every group the written-groups map marks instead.
//!
//! Resync works while the volume is in use. It starts with everything staged committed and
//! flushed, and from then on the targets are *catching up* (see [`crate::copies::CopySet`]):
//! every commit writes them as well, but nothing reads them. Each group is then copied under
//! the commit lock, so no commit interleaves with a group's copy: before the copy, a commit's
//! writes to the group are overwritten by the copy of the same (newer) state; after it, they
//! land on the target as on the source. Clients wait at most for one group's copy. Groups not
//! in the list were not written while the target was behind, and every write since reached it.
//! At the end, under the maintenance guard (everything flushed, no commit), the group bitmaps
//! are copied, the targets flushed and read back, and only then recorded in sync.
//!
//! Crash safety: the source is only read; the target is recorded in sync only after its copy
//! is durable. A crash in the middle leaves the target out of sync and the dirty map intact
//! (the set is still degraded, so nothing clears it): the next resync starts over.

use super::{Inner, Volume};
use crate::error::{Error, Result};
use blockguard_backend::Backend as _;
use std::sync::atomic::{AtomicBool, Ordering};

/// Bytes copied per read and write.
const CHUNK: u64 = 1 << 20;

/// What a resync did.
#[derive(Clone, Debug, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[non_exhaustive]
pub struct ResyncReport {
    /// Members brought back in sync.
    pub members: Vec<usize>,
    /// Groups copied.
    pub groups: u64,
    /// Bytes copied to each member (metadata, data and bitmaps).
    pub bytes_copied: u64,
    /// The member the copies were made from.
    pub source: Option<usize>,
    /// Members whose resync failed (they stay out of sync), with why.
    #[serde(default)]
    pub failed: Vec<(usize, String)>,
}

/// Which groups a resync copies.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Extent {
    /// The groups the dirty map marks (a member that fell behind).
    Dirty,
    /// Every group ever written (a member new to the set).
    Written,
}

impl Volume {
    /// Copies to every member that is present but out of sync the groups written since it
    /// fell behind, then records it in sync. `progress(done, total)` counts groups.
    pub fn resync(&self, progress: &mut dyn FnMut(u64, u64)) -> Result<ResyncReport> {
        self.inner
            .resync(Extent::Dirty, progress, &AtomicBool::new(false))
    }

    /// [`Volume::resync`] that gives up with [`Error::Stopped`] once `stop` is set (checked
    /// between groups): the copies stay out of sync, and a later resync starts over.
    pub fn resync_until(
        &self,
        progress: &mut dyn FnMut(u64, u64),
        stop: &AtomicBool,
    ) -> Result<ResyncReport> {
        self.inner.resync(Extent::Dirty, progress, stop)
    }
}

impl Inner {
    /// See [`Volume::resync`]; `extent` says which groups to copy.
    pub(crate) fn resync(
        &self,
        extent: Extent,
        progress: &mut dyn FnMut(u64, u64),
        stop: &AtomicBool,
    ) -> Result<ResyncReport> {
        if self.read_only {
            return Err(Error::ReadOnly {
                volume: self.name.clone(),
            });
        }
        let (source, targets, groups) = {
            // Everything staged committed and flushed: the groups to copy are fixed from here,
            // and every later commit reaches the targets too.
            let _m = self.maintenance("flushing before resync")?;
            let targets: Vec<usize> = (0..self.backend.count())
                .filter(|&i| self.backend.present(i) && !self.backend.in_sync(i))
                .collect();
            if targets.is_empty() {
                return Ok(ResyncReport::default());
            }
            let source = *self.backend.live().first().ok_or_else(|| Error::Failed {
                volume: self.name.clone(),
                detail: "no mirror member is in sync to resynchronize from".into(),
                resumable: false,
            })?;
            // A target that never completed a copy (an interrupted add, a stale copy put back)
            // missed more than the write-intent map records: it gets every written group.
            let full = self
                .lock(&self.mirror)
                .as_ref()
                .is_some_and(|m| targets.iter().any(|&t| m.members[t].full_copy));
            let groups = match extent {
                Extent::Dirty if !full => self.dirty_groups(),
                _ => self.written_groups()?,
            };
            for (n, &t) in targets.iter().enumerate() {
                if !self.backend.begin_catch_up(t) {
                    for &earlier in &targets[..n] {
                        self.backend.end_catch_up(earlier);
                    }
                    return Err(Error::Busy {
                        volume: self.name.clone(),
                        what: format!("mirror member {t} is being resynchronized already"),
                    });
                }
            }
            (source, targets, groups)
        };
        let result = self.copy_groups(source, &targets, &groups, progress, stop);
        if result.is_err() {
            for &t in &targets {
                self.backend.end_catch_up(t);
            }
        }
        result
    }

    /// The online part of a resync: the targets are catching up (every commit writes them),
    /// and `groups` are copied from `source` one at a time under the commit lock, so no
    /// commit interleaves with a group's copy and clients wait for one group at most. Then,
    /// with everything flushed, the group bitmaps are copied and the targets recorded in sync.
    fn copy_groups(
        &self,
        source: usize,
        targets: &[usize],
        groups: &[u64],
        progress: &mut dyn FnMut(u64, u64),
        stop: &AtomicBool,
    ) -> Result<ResyncReport> {
        let total = groups.len() as u64;
        let mut per_target = 0;
        // A target that fails is given up (it stays out of sync); the others go on.
        let mut active: Vec<usize> = targets.to_vec();
        let mut failed: Vec<(usize, String)> = Vec::new();
        for (n, &g) in groups.iter().enumerate() {
            if n % 16 == 0 {
                progress(n as u64, total);
            }
            if stop.load(Ordering::Acquire) {
                return Err(Error::Stopped {
                    volume: self.name.clone(),
                    what: "resync".into(),
                });
            }
            let (off, len) = self.group_range(g);
            let _commit = self.lock(&self.commit);
            self.failed()?;
            self.source_still_in_sync(source)?;
            for &t in &active {
                if let Err(e) = self
                    .still_catching_up(t)
                    .and_then(|()| self.copy_range(source, t, off, len))
                {
                    failed.push((t, e.describe()));
                }
            }
            self.give_up_failed(&mut active, &failed)?;
            per_target += len;
        }
        let mut m = self.maintenance("flushing at the end of a resync")?;
        for &t in &active {
            let copied = self.still_catching_up(t).and_then(|()| {
                for (off, len) in self.bitmap_ranges() {
                    self.copy_range(source, t, off, len)?;
                }
                self.backend
                    .flush_one(t)
                    .map_err(self.io_err("flushing a resynchronized member", 0))?;
                self.still_catching_up(t)
            });
            if let Err(e) = copied {
                failed.push((t, e.describe()));
            }
        }
        self.give_up_failed(&mut active, &failed)?;
        per_target += self.bitmap_ranges().iter().map(|(_, len)| len).sum::<u64>();
        // What was copied came from a member still in sync at the end (a source dropped by a
        // failure meanwhile stopped receiving writes: its copy would be stale).
        self.source_still_in_sync(source)?;
        let targets = &active[..];
        // Durable on every target: now they may be read.
        {
            let mut mirror = self.lock(&self.mirror);
            if let Some(info) = mirror.as_mut() {
                for &t in targets {
                    info.members[t].in_sync = true;
                    info.members[t].full_copy = false;
                }
                info.event += 1;
            }
        }
        for &t in targets {
            self.backend.rejoin(t);
        }
        let state = if self.disk_in_use.load(Ordering::Acquire) {
            crate::format::VolumeState::InUse
        } else {
            crate::format::VolumeState::Clean
        };
        self.write_superblocks(state, "recording resynchronized mirror members")?;
        m.make_durable("flushing after resync")?;
        let report = ResyncReport {
            members: targets.to_vec(),
            groups: total,
            bytes_copied: per_target,
            source: Some(source),
            failed,
        };
        progress(total, total);
        tracing::info!(volume = %self.name, ?report, "mirror members resynchronized");
        Ok(report)
    }

    /// Fails if the member copied from was dropped (a failure meanwhile): it no longer
    /// receives writes, so what it holds may be older than what clients were told is written.
    fn source_still_in_sync(&self, source: usize) -> Result<()> {
        if self.backend.in_sync(source) {
            return Ok(());
        }
        Err(Error::Failed {
            volume: self.name.clone(),
            detail: format!(
                "mirror member {source}, the resync's source, failed meanwhile; the copies being \
                 resynchronized stay out of sync (run the resync again: it copies from a member still in sync)"
            ),
            resumable: false,
        })
    }

    /// Stops catching up the targets of `failed` (they stay out of sync) and removes them
    /// from `active`; fails when none is left.
    fn give_up_failed(&self, active: &mut Vec<usize>, failed: &[(usize, String)]) -> Result<()> {
        for (t, why) in failed {
            if active.contains(t) {
                tracing::error!(volume = %self.name, member = t, "resync of mirror member {t} given up: {why}");
                self.backend.end_catch_up(*t);
            }
        }
        active.retain(|t| !failed.iter().any(|(f, _)| f == t));
        if active.is_empty() {
            let why = failed
                .first()
                .map_or_else(String::new, |(t, e)| format!("member {t}: {e}"));
            return Err(Error::Failed {
                volume: self.name.clone(),
                detail: format!("every member being resynchronized failed ({why}); they stay out of sync"),
                resumable: false,
            });
        }
        Ok(())
    }

    /// Fails if member `t` stopped catching up (a write to it failed meanwhile).
    fn still_catching_up(&self, t: usize) -> Result<()> {
        if self.backend.catching_up(t) {
            return Ok(());
        }
        Err(Error::Failed {
            volume: self.name.clone(),
            detail: format!(
                "mirror member {t} failed while it was being resynchronized; it stays out of sync"
            ),
            resumable: false,
        })
    }

    /// Every group the written-groups map marks.
    fn written_groups(&self) -> Result<Vec<u64>> {
        let mut out = Vec::new();
        for g in 0..self.geo.groups {
            if self.map_bit(g, true)? != super::bitmaps::MapBit::Clear {
                out.push(g);
            }
        }
        Ok(out)
    }

    /// Both copies of the three group bitmaps (one contiguous run each) and, in `journal`
    /// mode, the journal: copied last, with everything flushed and no commit running, so the
    /// target's checkpoints and log are the source's (a target left with older ones could,
    /// used alone after a crash, replay segments of an earlier session over newer data).
    pub(crate) fn bitmap_ranges(&self) -> Vec<(u64, u64)> {
        let mut ranges: Vec<(u64, u64)> = (0..2)
            .map(|copy| {
                (
                    self.geo.map_offset(crate::format::MapKind::Written, copy),
                    3 * self.geo.map_region_len(),
                )
            })
            .collect();
        if self.geo.journal_len > 0 {
            ranges.push((self.geo.journal_offset(), self.geo.journal_len));
        }
        ranges
    }

    /// A group's metadata blocks and data, one contiguous run.
    pub(crate) fn group_range(&self, g: u64) -> (u64, u64) {
        let start = self.geo.meta_offset(g, 0);
        let end = self.geo.data_offset(self.geo.first_block(g))
            + u64::from(self.geo.blocks_in_group(g)) * u64::from(self.geo.block_size);
        (start, end - start)
    }

    /// Copies `len` bytes at `off` from member `from` to member `to` and reads them back.
    /// Caller holds the commit lock: no commit writes the range meanwhile.
    fn copy_range(&self, from: usize, to: usize, off: u64, len: u64) -> Result<()> {
        let align = self.backend.alignment().max(1);
        let mut done = 0;
        while done < len {
            let n = crate::cast::usize_of((len - done).min(CHUNK));
            let at = off + done;
            let mut buf = super::aligned(n, align);
            self.read_member_confirmed(
                from,
                buf.as_mut(),
                at,
                "reading a mirror member to resynchronize another",
            )?;
            self.backend
                .write_to(to, buf.as_ref(), at)
                .map_err(self.io_err("writing a mirror member being resynchronized", at))?;
            let mut back = super::aligned(n, align);
            self.backend
                .read_from(to, back.as_mut(), at)
                .map_err(self.io_err("reading back a resynchronized range", at))?;
            if back.as_ref() != buf.as_ref() {
                return Err(Error::Io {
                    volume: self.name.clone(),
                    during: "verifying a resynchronized range",
                    offset: at,
                    source: std::io::Error::other(format!(
                        "member {to} read back different bytes than were written"
                    )),
                });
            }
            done += n as u64;
        }
        Ok(())
    }
}
