//! Forming a mirror set and opening one from its members.

use crate::copies::{CopySet, MemberState};
use crate::error::Result;
use crate::format::{
    member_record_offset, MemberInfo, MemberRecord, MirrorInfo, Superblock, INCOMPAT_MIRROR, MAX_MEMBERS,
    SB_REGION,
};
use crate::volume::open::read_member;
use crate::volume::{invalid, FormatOptions, OpenOptions, Volume};
use blockguard_backend::Backend;
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
            None => crate::format::Geometry::for_backing_len(smallest, opts.block_size, opts.tag_slot()?)
                .map_err(|e| invalid(&first, e.to_string()))?
                .size(),
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
        let records = crate::volume::membership::records_for(&info, &members);
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
            crate::volume::membership::write_regions(&**backend, &sb, &records).map_err(
                crate::volume::open::io_error(&name, "writing a mirror member's superblocks", 0),
            )?;
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
            .filter(|(_, sb, _)| sb.mirror.as_ref().is_some_and(|m| m.event == authority.event))
            .max_by_key(|(_, sb, _)| retag_stage(sb, &found))
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

/// Refuses a set of two whose members each ran without the other: member `a`'s own
/// superblock marks `b` out of sync, and `b`'s marks `a` — both wrote data the other lacks
/// (a split brain). Neither description can be preferred without losing writes the other
/// acknowledged; the operator chooses.
fn refuse_split_brain(views: &[Option<MirrorInfo>], slots: &[Option<Found>]) -> Result<()> {
    // Only a set of two can tell: with a third member, `b` may have recorded `a`'s failure
    // before failing itself while the third resynchronized `a` — the same two views without
    // either having run alone (review 11, F8).
    if views.len() != 2 {
        return Ok(());
    }
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

/// How far a member's superblock is along an online re-tag, to pick the set's reference among
/// the members of the newest event. The re-tag's superblock writes (its start, its cursor, its
/// end) do not raise the event, and a crash between two members' writes leaves them saying
/// different things — each safe to open with, since every member's groups are durable before
/// any superblock says they are re-tagged (CONSISTENCY.md, "Re-tagging a volume in use",
/// mirror sets); the one furthest along is taken: the re-tag complete (its target is the
/// member's profile and another member is still on the way to it), then in progress with the
/// highest cursor, then none.
fn retag_stage(sb: &Superblock, all: &[Read]) -> (u8, u64) {
    match &sb.retag {
        Some(r) => (1, r.cursor),
        None if all
            .iter()
            .any(|(_, o, _)| o.retag.as_ref().is_some_and(|r| r.target == sb.profile)) =>
        {
            (2, 0)
        }
        None => (0, 0),
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
    // A member still on the way to the reference's profile (a crash between the members'
    // superblock writes at the end of a re-tag) is of the set: its groups are the same.
    let profile_fits =
        sb.profile == reference.profile || sb.retag.as_ref().is_some_and(|r| r.target == reference.profile);
    if sb.geometry != reference.geometry || !profile_fits || sb.mode != reference.mode {
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
        let mut region = crate::volume::aligned(crate::cast::usize_of(SB_REGION), backend.alignment().max(1));
        backend
            .read_at(region.as_mut(), offset)
            .map_err(crate::volume::open::io_error(
                &name,
                "reading member records",
                offset,
            ))?;
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

/// The encoded member records of a member's superblock region (read at open), each with
/// its member index.
pub(crate) fn encoded_records(backend: &dyn Backend) -> Vec<(usize, [u8; 512])> {
    member_records(backend)
        .unwrap_or_default()
        .iter()
        .filter_map(|r| r.encode().ok().map(|b| (usize::from(r.index), b)))
        .collect()
}
