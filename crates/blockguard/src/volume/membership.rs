//! Changing a mirror set's membership: adding a copy (built from the others with a progress
//! report), removing one. Both work on a volume no one else has open: they close it, rewrite
//! the members' superblocks with the new description (event + 1), and reopen it.
//!
//! Crash safety: a new member is written whole (bitmaps, then its superblock, out of sync)
//! before any existing member names it; then the existing members are rewritten one by one.
//! A crash between two of them leaves superblocks with different events: the highest wins
//! at the next open (it names the new member out of sync, or the old set without it, which
//! the older superblocks describe too), so the set opens either way and a resync finishes the
//! job. A removal rewrites only the remaining members; the removed copy is left as it was (a
//! complete copy as of its removal), and is refused as a member of the set from then on.

use super::open::{read_member, write_empty_maps};
use super::resync::{Extent, ResyncReport};
use super::{invalid, Volume};
use crate::error::Result;
use crate::format::{
    member_record_offset, MemberInfo, MemberRecord, MirrorInfo, Superblock, INCOMPAT_MIRROR, MAX_MEMBERS,
};
use blockguard_backend::Backend;
use std::sync::Arc;

impl Volume {
    /// Adds `backend` (a new, zeroed file or device at least as large as the others need) as a
    /// copy of this volume, which may be a plain volume (it becomes a set of two) or a set of
    /// two. Closes the volume, lays the new member out, names it in every member's superblock
    /// (out of sync), reopens the set and copies every written group to it; returns the open
    /// set and what the copy did. `progress(done, total)` counts groups.
    pub fn add_member(
        self,
        backend: Arc<dyn Backend>,
        progress: &mut dyn FnMut(u64, u64),
    ) -> Result<(Volume, ResyncReport)> {
        // The reopened engine is the same session's: DIX tuples of the profile a re-tag left
        // are still taken (`Volume::write_with_pi`).
        let previous = self.inner.tagger.previous();
        let (vol, report) = self.add_and_resync(backend, progress)?;
        vol.inner.tagger.keep_previous(previous);
        Ok((vol, report))
    }

    /// [`Volume::add_member`], but for what the session carries over.
    fn add_and_resync(
        self,
        backend: Arc<dyn Backend>,
        progress: &mut dyn FnMut(u64, u64),
    ) -> Result<(Volume, ResyncReport)> {
        let name = self.inner.name.clone();
        let members = self.member_backends();
        let sb = self.inner.tagger.apply(self.superblock());
        if let Some(r) = &sb.retag {
            // Kept out while a re-tag is in progress: the copy is built by copying every written
            // group, which a step may rewrite meanwhile; finishing the re-tag first is cheap.
            return Err(invalid(
                &name,
                format!(
                    "a re-tag to tag profile {} is in progress: finish it first (`blockguard retag VOL \
                     --profile {}`), then add the copy",
                    r.target, r.target
                ),
            ));
        }
        let set = &self.inner.backend;
        if let Some(absent) = (0..set.count()).find(|&i| !set.present(i)) {
            // Its slot is held by a stand-in: nothing may be written there, and a set with a
            // hole is not grown around it.
            return Err(invalid(
                &name,
                format!(
                    "copy {absent} of the set is missing: replace it (`blockguard mirror replace VOL \
                     {absent} NEW`) or remove it (`blockguard mirror remove VOL {absent}`) first"
                ),
            ));
        }
        if members.len() >= MAX_MEMBERS {
            return Err(invalid(
                &name,
                format!("the set already has {MAX_MEMBERS} copies, the most there can be"),
            ));
        }
        let geo = sb.geometry;
        if backend.len() < geo.backing_len {
            return Err(invalid(
                &backend.name(),
                format!(
                    "holds {} bytes; a copy of this volume needs {}",
                    backend.len(),
                    geo.backing_len
                ),
            ));
        }
        let reopen = self.inner.reopen_options();
        let inner = self.inner.clone();
        self.close()?;
        // The set as it is now, closed (a resync or a failure since the open, or at the close,
        // may have changed it).
        let current = inner.lock(&inner.mirror).clone();
        drop(inner);
        let mut info = current.unwrap_or_else(|| MirrorInfo {
            set: rand::random(),
            role: 0,
            members: vec![MemberInfo {
                id: rand::random(),
                in_sync: true,
                full_copy: false,
            }],
            event: 0,
        });
        // Built by the resync below; if that is cut short, the next resync copies everything.
        info.members.push(MemberInfo {
            id: rand::random(),
            in_sync: false,
            full_copy: true,
        });
        info.event += 1;
        let mut all = members;
        all.push(backend);
        let records = records_for(&info, &all);
        let (new, old) = all.split_last().unwrap_or_else(|| unreachable!("just pushed"));
        // The new member first, whole, out of sync: no existing member names it before it is
        // a valid (behind) copy.
        let align = new.alignment().max(1);
        write_empty_maps(&**new, &new.name(), &geo, &sb.uuid, align)?;
        let role = u8::try_from(old.len()).unwrap_or(u8::MAX);
        rewrite_member(&**new, &sb, &info, role, &records)?;
        for (role, b) in (0u8..).zip(old) {
            rewrite_member(&**b, &sb, &info, role, &records)?;
        }
        let vol = Volume::open_members(all, &reopen)?;
        let report = vol.inner.resync(
            Extent::Written,
            progress,
            &std::sync::atomic::AtomicBool::new(false),
        )?;
        Ok((vol, report))
    }

    /// Removes member `role` from this mirror set. Closes the volume, rewrites the remaining
    /// members' superblocks (the last one left becomes a plain volume) and reopens it. The
    /// removed copy is not written. Refused if no member in sync would remain.
    pub fn remove_member(self, role: usize) -> Result<Volume> {
        // The reopened engine is the same session's: DIX tuples of the profile a re-tag left
        // are still taken (`Volume::write_with_pi`).
        let previous = self.inner.tagger.previous();
        let vol = self.remove_and_reopen(role)?;
        vol.inner.tagger.keep_previous(previous);
        Ok(vol)
    }

    /// [`Volume::remove_member`], but for what the session carries over.
    fn remove_and_reopen(self, role: usize) -> Result<Volume> {
        let name = self.inner.name.clone();
        let sb = self.inner.tagger.apply(self.superblock());
        let count = self.inner.backend.count();
        if sb.mirror.is_none() {
            return Err(invalid(
                &name,
                "not a mirror set: there is no copy to remove".into(),
            ));
        }
        if role >= count {
            return Err(invalid(
                &name,
                format!("the set has no copy {role} (copies 0 to {})", count - 1),
            ));
        }
        if self.inner.backend.live().iter().all(|&i| i == role) {
            return Err(invalid(
                &name,
                format!("copy {role} is the only one in sync: removing it would lose the volume"),
            ));
        }
        let mut members = self.member_backends();
        let mut present: Vec<bool> = (0..count).map(|i| self.inner.backend.present(i)).collect();
        // Where the set last saw each member: a missing member keeps its recorded path (its
        // slot's backend is a stand-in, whose name is another member's).
        let mut paths: Vec<Option<String>> = (0..count)
            .map(|i| {
                self.inner
                    .records
                    .iter()
                    .find(|(k, _)| *k == i)
                    .and_then(|(_, r)| MemberRecord::decode(r))
                    .map(|r| r.path)
            })
            .collect();
        let reopen = self.inner.reopen_options();
        let inner = self.inner.clone();
        self.close()?;
        // The set as it is now, closed.
        let current = inner.lock(&inner.mirror).clone();
        drop(inner);
        let Some(mut info) = current else {
            return Err(invalid(
                &name,
                "not a mirror set: there is no copy to remove".into(),
            ));
        };
        members.remove(role);
        present.remove(role);
        paths.remove(role);
        info.members.remove(role);
        info.event += 1;
        if info.members.len() == 1 {
            let mut plain = sb;
            plain.mirror = None;
            plain.incompat &= !INCOMPAT_MIRROR;
            rewrite_plain(&*members[0], &plain)?;
            return Volume::open(members.swap_remove(0), &reopen);
        }
        let mut records = records_for(&info, &members);
        for ((r, here), path) in records.iter_mut().zip(&present).zip(paths) {
            if let (false, Some(path)) = (here, path) {
                r.path = path;
            }
        }
        for ((role, b), here) in (0u8..).zip(&members).zip(&present) {
            if *here {
                rewrite_member(&**b, &sb, &info, role, &records)?;
            }
        }
        let members: Vec<Arc<dyn Backend>> = members
            .into_iter()
            .zip(present)
            .filter_map(|(b, p)| p.then_some(b))
            .collect();
        Volume::open_members(members, &reopen)
    }

    /// The backends of every member, by role (a missing member's slot holds a stand-in).
    fn member_backends(&self) -> Vec<Arc<dyn Backend>> {
        let set = &self.inner.backend;
        (0..set.count()).map(|i| set.backend(i).clone()).collect()
    }
}

/// The member records of `info`'s members, whose backends are `backends` (by role).
pub(super) fn records_for(info: &MirrorInfo, backends: &[Arc<dyn Backend>]) -> Vec<MemberRecord> {
    info.members
        .iter()
        .zip(backends)
        .zip(0u8..)
        .map(|((m, b), index)| MemberRecord {
            set: info.set,
            id: m.id,
            index,
            path: b.name(),
        })
        .collect()
}

/// Rewrites both superblock regions of a member: `base` (the volume's superblock) with
/// `info` as its mirror description, role `role`, and the member records.
fn rewrite_member(
    backend: &dyn Backend,
    base: &Superblock,
    info: &MirrorInfo,
    role: u8,
    records: &[MemberRecord],
) -> Result<()> {
    let name = backend.name();
    // The member's own state (clean or in use) is kept.
    let state = read_member(backend).map_or(base.state, |(sb, _)| sb.state);
    let sb = Superblock {
        incompat: base.incompat | INCOMPAT_MIRROR,
        mirror: Some(MirrorInfo { role, ..info.clone() }),
        state,
        ..base.clone()
    };
    write_regions(backend, &sb, records).map_err(super::open::io_error(
        &name,
        "rewriting a mirror member's superblocks",
        0,
    ))
}

/// Rewrites a last remaining member as a plain volume (no mirror fields, no records).
fn rewrite_plain(backend: &dyn Backend, sb: &Superblock) -> Result<()> {
    let name = backend.name();
    write_regions(backend, sb, &[]).map_err(super::open::io_error(
        &name,
        "rewriting the last copy as a plain volume",
        0,
    ))
}

/// Writes both superblock regions (backup first) with `records`, flushing after each.
pub(super) fn write_regions(
    backend: &dyn Backend,
    sb: &Superblock,
    records: &[MemberRecord],
) -> std::io::Result<()> {
    let align = backend.alignment().max(1);
    for (copy, offset) in [(1u8, sb.geometry.backup_sb_offset), (0, 0)] {
        let mut region = sb.encode(copy);
        assert_eq!(
            Superblock::decode(&region),
            Ok((sb.clone(), copy)),
            "an encoded superblock does not decode"
        );
        for r in records {
            let at = member_record_offset(usize::from(r.index));
            region[at..at + 512].copy_from_slice(&r.encode().map_err(std::io::Error::other)?);
        }
        let mut buf = super::aligned(region.len(), align);
        buf.as_mut().copy_from_slice(&region);
        backend.write_at(buf.as_ref(), offset)?;
        backend.flush()?;
    }
    Ok(())
}
