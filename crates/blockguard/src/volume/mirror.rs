//! Mirror sets in the engine: forming a set, opening one from its members, recording a
//! member's failure in the survivors' superblocks, making copies agree after a crash, and
//! read repair. The set itself — writing to every member, reading from one — is the
//! [`CopySet`] layer below; this module is what only the engine can judge.
//!
//! Invariant M: every member in sync received every write and flush since it was last in
//! sync, so outside the groups the dirty map marks after a crash, all of them hold the same
//! bytes. A member that misses a write is dropped, and its failure is durable in the
//! survivors' superblocks before the flush that would make that write durable reports
//! success (`Inner::record_member_failures`, called by every flush of the commit path).

use super::group::{Accept, GroupState};
use super::open::read_member;
use super::{invalid, FormatOptions, Inner, OpenOptions, Volume};
use crate::copies::{CopySet, MemberState};
use crate::error::Result;
use crate::format::{
    member_record_offset, MemberInfo, MemberRecord, MirrorInfo, Superblock, INCOMPAT_MIRROR, MAX_MEMBERS,
    SB_REGION,
};
use blockguard_backend::Backend;
use std::sync::atomic::Ordering;
use std::sync::Arc;

impl Volume {
    /// Formats `members` (2 or 3 backends of the same size class) as one mirrored volume:
    /// every member gets the full layout, the same volume UUID and a superblock naming the
    /// set, its role and every member; each member's path (its backend's name) is recorded
    /// next to every superblock so that any member finds the others. Opens the set.
    pub fn format_members(members: Vec<Arc<dyn Backend>>, opts: &FormatOptions) -> Result<Volume> {
        let first = members
            .first()
            .map_or_else(|| "mirror set".to_string(), |b| b.name());
        if !(2..=MAX_MEMBERS).contains(&members.len()) {
            return Err(invalid(
                &first,
                format!(
                    "a mirror set has 2 to {MAX_MEMBERS} members, not {}",
                    members.len()
                ),
            ));
        }
        // Every member must hold the same layout: the smallest decides it.
        let smallest = members.iter().map(|b| b.len()).min().unwrap_or(0);
        let size = match opts.size {
            Some(s) => s,
            None => {
                crate::format::Geometry::for_backing_len(smallest, opts.block_size, opts.profile.tag_size())
                    .map_err(|e| invalid(&first, e.to_string()))?
                    .size()
            }
        };
        let mut opts = opts.clone();
        opts.size = Some(size);
        opts.uuid = Some(opts.uuid.unwrap_or_else(rand::random));
        let info = MirrorInfo {
            set: rand::random(),
            role: 0,
            members: members
                .iter()
                .map(|_| MemberInfo {
                    id: rand::random(),
                    in_sync: true,
                    full_copy: false,
                })
                .collect(),
            event: 1,
        };
        let records = super::membership::records_for(&info, &members);
        for (role, backend) in (0u8..).zip(&members) {
            let vol = Volume::format(backend.clone(), &opts)?;
            let geo = *vol.geometry();
            vol.close()?;
            let name = backend.name();
            if geo.size() != size {
                return Err(invalid(
                    &name,
                    format!("holds {} bytes of volume, the set {size}", geo.size()),
                ));
            }
            let mut sb = read_member(&**backend)?.0;
            sb.incompat |= INCOMPAT_MIRROR;
            sb.mirror = Some(MirrorInfo { role, ..info.clone() });
            super::membership::write_regions(&**backend, &sb, &records).map_err(super::open::io_error(
                &name,
                "writing a mirror member's superblocks",
                0,
            ))?;
        }
        let open = OpenOptions {
            key: opts.key.clone(),
            ..OpenOptions::default()
        };
        Volume::open_members(members, &open)
    }

    /// Opens a mirror set from its members' backends, in any order; members may be missing.
    /// The member superblock with the highest event describes the set; members it marks out
    /// of sync, and members absent, are left out (a read-write open records the absent ones
    /// as out of sync in the others' superblocks). A backend that belongs to another set, to
    /// another volume, or repeats a role is refused.
    pub fn open_members(members: Vec<Arc<dyn Backend>>, opts: &OpenOptions) -> Result<Volume> {
        Self::open_members_with_progress(members, opts, &mut |_, _| {})
    }

    /// [`Volume::open_members`], reporting recovery progress like
    /// [`Volume::open_with_progress`].
    pub fn open_members_with_progress(
        members: Vec<Arc<dyn Backend>>,
        opts: &OpenOptions,
        progress: &mut dyn FnMut(u64, u64),
    ) -> Result<Volume> {
        let (found, mut left_out) = read_members(members)?;
        let Some(authority) = found
            .iter()
            .filter_map(|(_, sb, _)| sb.mirror.as_ref())
            .max_by_key(|m| m.event)
            .cloned()
        else {
            let name = found
                .first()
                .map_or_else(|| "mirror set".into(), |(b, _, _)| b.name());
            return Err(invalid(&name, "no member of a mirror set given".into()));
        };
        let reference = found
            .iter()
            .find(|(_, sb, _)| sb.mirror.as_ref().is_some_and(|m| m.event == authority.event))
            .map(|(_, sb, _)| sb.clone())
            .ok_or_else(|| invalid("mirror set", "no authoritative member".into()))?;
        let (slots, views, in_use) = assign_roles(found, &reference, &authority, &mut left_out)?;
        let Some(stand_in) = slots.iter().flatten().map(|(b, _)| b.clone()).next() else {
            return Err(invalid("mirror set", "no member given".into()));
        };
        refuse_split_brain(&views, &slots)?;
        let mut info = authority.clone();
        let mut warnings = left_out;
        mark_stale_members(&mut info, &views, &slots, &mut warnings);
        let mut set_members = Vec::new();
        for (role, slot) in slots.into_iter().enumerate() {
            if let Some((b, w)) = slot {
                warnings.extend(w);
                let state = if info.members[role].in_sync {
                    MemberState::InSync
                } else {
                    MemberState::OutOfSync
                };
                set_members.push((b, state));
                continue;
            }
            // A missing member cannot be written: it is out of sync from now on. It is
            // represented by a stand-in that is never read or written.
            if info.members[role].in_sync {
                warnings.push(format!(
                    "mirror member {role} is missing: the volume runs degraded"
                ));
                info.members[role].in_sync = false;
                info.event += 1;
            }
            set_members.push((stand_in.clone(), MemberState::Absent));
        }
        if !set_members.iter().any(|(_, s)| *s == MemberState::InSync) {
            return Err(invalid(
                &stand_in.name(),
                "no member of the mirror set given holds the current contents (every one present is out of sync)"
                    .into(),
            ));
        }
        let mut sb = reference;
        sb.mirror = Some(info.clone());
        if in_use {
            sb.state = crate::format::VolumeState::InUse;
        }
        let changed = info.event != authority.event;
        let set = CopySet::new(set_members);
        let vol = Self::assemble_member_set(set, sb, warnings, opts, changed, progress)?;
        Ok(vol)
    }

    /// Builds the engine over a member set; `changed`: the set's description changed at
    /// open (a member missing) and must be written to the survivors first.
    fn assemble_member_set(
        set: CopySet,
        sb: Superblock,
        mut warnings: Vec<String>,
        opts: &OpenOptions,
        changed: bool,
        progress: &mut dyn FnMut(u64, u64),
    ) -> Result<Volume> {
        if changed && !opts.read_only {
            // Repairing superblocks writes the current description to every member in sync.
            warnings.push("the mirror set's description changed: rewriting the members' superblocks".into());
        }
        Self::assemble(set, sb, warnings, opts, progress)
    }

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

/// A member's backend with its superblock and the warnings about its copies.
type Read = (Arc<dyn Backend>, Superblock, Vec<String>);

/// Reads the superblocks of the backends given to open a set. The first is the one the
/// caller named: what is wrong with it is an error. The others were found through member
/// records (hints): one that is not a usable member of the first one's set is left out, with
/// a warning (the second result), and the set opens without it.
fn read_members(members: Vec<Arc<dyn Backend>>) -> Result<(Vec<Read>, Vec<String>)> {
    let mut found: Vec<Read> = Vec::new();
    let mut left_out: Vec<String> = Vec::new();
    for (i, b) in members.into_iter().enumerate() {
        match read_member(&*b) {
            Ok((sb, warnings)) => {
                let ours = found.first().is_none_or(|(_, first, _)| {
                    first.uuid == sb.uuid
                        && first.mirror.as_ref().map(|m| m.set) == sb.mirror.as_ref().map(|m| m.set)
                });
                if ours {
                    found.push((b, sb, warnings));
                } else {
                    left_out.push(format!(
                        "{}: not a copy of this mirror set (another volume or set): left out",
                        b.name()
                    ));
                }
            }
            Err(e) if i > 0 => left_out.push(format!(
                "{}: not usable as a mirror copy ({e}): left out",
                b.name()
            )),
            Err(e) => return Err(e),
        }
    }
    Ok((found, left_out))
}

/// A member backend found at open, with the warnings about its superblock copies.
type Found = (Arc<dyn Backend>, Vec<String>);

/// The roles of the members read: by role, each member's backend (with its warnings) and its
/// own view of the set, and whether any says "in use". The first member (named by the caller)
/// must fit the set's description; another that does not is left out with a warning.
#[allow(clippy::type_complexity)] // Three results of one walk, each named above.
fn assign_roles(
    found: Vec<Read>,
    reference: &Superblock,
    authority: &MirrorInfo,
    left_out: &mut Vec<String>,
) -> Result<(Vec<Option<Found>>, Vec<Option<MirrorInfo>>, bool)> {
    let mut slots: Vec<Option<Found>> = vec![None; authority.members.len()];
    let mut views: Vec<Option<MirrorInfo>> = vec![None; authority.members.len()];
    let mut in_use = false;
    for (i, (b, sb, warnings)) in found.into_iter().enumerate() {
        let name = b.name();
        let checked = check_member(&name, &sb, reference, authority).and_then(|role| {
            if slots[role].is_some() {
                return Err(invalid(
                    &name,
                    format!("a second backend for member {role} of the set"),
                ));
            }
            Ok(role)
        });
        let role = match checked {
            Ok(role) => role,
            Err(e) if i > 0 => {
                left_out.push(format!("{e}: left out"));
                continue;
            }
            Err(e) => return Err(e),
        };
        in_use |= sb.state == crate::format::VolumeState::InUse;
        views[role].clone_from(&sb.mirror);
        slots[role] = Some((b, warnings));
    }
    Ok((slots, views, in_use))
}

/// Refuses a set whose present members each ran without the other: member `a`'s own
/// superblock marks `b` out of sync, and `b`'s marks `a` — both wrote data the other lacks
/// (a split brain). Neither description can be preferred without losing writes the other
/// acknowledged; the operator chooses.
fn refuse_split_brain(views: &[Option<MirrorInfo>], slots: &[Option<Found>]) -> Result<()> {
    for (a, va) in views.iter().enumerate() {
        for (b, vb) in views.iter().enumerate().skip(a + 1) {
            let (Some(va), Some(vb)) = (va, vb) else {
                continue;
            };
            let a_without_b = va.members[a].in_sync && !va.members[b].in_sync;
            let b_without_a = vb.members[b].in_sync && !vb.members[a].in_sync;
            if a_without_b && b_without_a {
                let name = |i: usize| slots[i].as_ref().map_or_else(String::new, |(x, _)| x.name());
                return Err(invalid(
                    &name(a),
                    format!(
                        "split brain: copies {a} ({}) and {b} ({}) of the mirror set each ran without \
                         the other, so each holds writes the other lacks; blockguard will not choose. \
                         Move the copy whose writes you give up out of the way (the other then opens \
                         degraded, that copy missing), then `blockguard mirror replace` it",
                        name(a),
                        name(b)
                    ),
                ));
            }
        }
    }
    Ok(())
}

/// Marks out of sync, needing a full copy, every present member whose own superblock is older
/// than the set's description (a lower event) while the set calls it in sync: it missed
/// superblock writes of the set, so it may be a copy saved earlier and put back, holding
/// older data than the write-intent map can tell. (A crash between two members' superblock
/// writes makes one look older too: a full resync then costs time, never data.)
fn mark_stale_members(
    info: &mut MirrorInfo,
    views: &[Option<MirrorInfo>],
    slots: &[Option<Found>],
    warnings: &mut Vec<String>,
) {
    let newest = info.event;
    for (role, view) in views.iter().enumerate() {
        let Some(view) = view else {
            continue;
        };
        if view.event < newest && info.members[role].in_sync {
            let name = slots[role].as_ref().map_or_else(String::new, |(b, _)| b.name());
            warnings.push(format!(
                "mirror copy {role} ({name}) is older than the set (event {} < {newest}): it is not \
                 read, and `blockguard mirror resync` copies every written group to it",
                view.event
            ));
            info.members[role].in_sync = false;
            info.members[role].full_copy = true;
            info.event += 1;
        }
    }
}

/// Checks a member's superblock against the set's reference; returns its role.
fn check_member(
    name: &str,
    sb: &Superblock,
    reference: &Superblock,
    authority: &MirrorInfo,
) -> Result<usize> {
    let Some(m) = &sb.mirror else {
        return Err(invalid(
            name,
            "not a member of a mirror set (a plain volume)".into(),
        ));
    };
    if m.set != authority.set || sb.uuid != reference.uuid {
        return Err(invalid(name, "a member of another mirror set".into()));
    }
    if sb.geometry != reference.geometry || sb.profile != reference.profile || sb.mode != reference.mode {
        return Err(invalid(name, "its layout differs from the set's".into()));
    }
    let role = usize::from(m.role);
    if authority.members.get(role).map(|x| x.id) != Some(m.me().id) {
        return Err(invalid(
            name,
            format!("member {role} was replaced in the set: this copy is not part of it any more"),
        ));
    }
    Ok(role)
}

/// The member records kept next to the superblocks of `backend` (a mirror member): where the
/// other members were last seen. Records that are damaged are left out; the primary region's
/// records win over the backup's.
pub fn member_records(backend: &dyn Backend) -> Result<Vec<MemberRecord>> {
    let (sb, _) = read_member(backend)?;
    let name = backend.name();
    let mut out: Vec<MemberRecord> = Vec::new();
    for offset in [0, sb.geometry.backup_sb_offset] {
        let mut region = super::aligned(crate::cast::usize_of(SB_REGION), backend.alignment().max(1));
        backend
            .read_at(region.as_mut(), offset)
            .map_err(super::open::io_error(&name, "reading member records", offset))?;
        for i in 0..MAX_MEMBERS {
            let at = member_record_offset(i);
            if let Some(r) = MemberRecord::decode(&region.as_ref()[at..at + 512]) {
                let ours = sb.mirror.as_ref().is_some_and(|m| m.set == r.set);
                if ours && !out.iter().any(|o| o.index == r.index) {
                    out.push(r);
                }
            }
        }
    }
    out.sort_by_key(|r| r.index);
    Ok(out)
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
        let bs = u64::from(self.geo.block_size);
        for g in self.dirty_groups_after_crash()? {
            let meta_at = self.geo.meta_offset(g, 0);
            let mut meta = super::aligned(crate::cast::usize_of(2 * bs), self.backend.alignment().max(1));
            self.read_member_confirmed(
                source,
                meta.as_mut(),
                meta_at,
                "reading a mirror member to converge",
            )?;
            for &i in others {
                if self.backend.in_sync(i) {
                    // A failure drops the member; it is recorded below.
                    let _ = self.backend.write_to(i, meta.as_ref(), meta_at);
                }
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
        if !kept.is_empty() {
            for (at, data) in &kept {
                let mut buf = super::aligned(data.len(), self.backend.alignment().max(1));
                buf.as_mut().copy_from_slice(data);
                // A failure drops the member; it is recorded below.
                let _ = self.backend.write_to(source, buf.as_ref(), *at);
            }
            flush.push(source);
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
            let mut buf = super::aligned(crate::cast::usize_of(n), self.backend.alignment().max(1));
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

    /// The first copy of `block` among `members` (in sync) that verifies against `accept`.
    fn verified_copy(&self, members: &[usize], block: u64, accept: &Accept) -> Option<Vec<u8>> {
        let mut buf = super::aligned(self.geo.block_size as usize, self.backend.alignment().max(1));
        let at = self.geo.data_offset(block);
        members.iter().find_map(|&i| {
            let ok = self.backend.in_sync(i)
                && self.backend.read_from(i, buf.as_mut(), at).is_ok()
                && self.verifies(block, buf.as_ref(), accept);
            ok.then(|| buf.as_ref().to_vec())
        })
    }

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
                self.verifies(block, c.data.as_ref(), &state.accept(index as usize))
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
        let mut meta = super::aligned(2 * bs, align);
        let mut data = super::aligned(crate::cast::usize_of(n) * bs, align);
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
            if !self.verifies(block, c.data.as_ref(), &state.accept(index as usize)) {
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
        let mut buf = super::aligned(len, align);
        buf.as_mut().copy_from_slice(bytes);
        self.backend.write_to(i, buf.as_ref(), offset)?;
        self.backend.flush_one(i)?;
        let mut back = super::aligned(len, align);
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
    pub meta: super::Aligned,
    pub data: super::Aligned,
}

/// The encoded member records of a member's superblock region (read at open), each with
/// its member index.
pub(crate) fn encoded_records(backend: &dyn Backend) -> Vec<(usize, [u8; 512])> {
    member_records(backend)
        .unwrap_or_default()
        .iter()
        .filter_map(|r| r.encode().ok().map(|b| (usize::from(r.index), b)))
        .collect()
}
