//! Target `format_superblock`: `Superblock::decode` (see `docs/FORMAT.md`, "Superblock").
//!
//! Properties: decoding arbitrary bytes never panics; whatever decodes re-encodes to a region
//! that decodes to the same superblock and copy index, and that re-encoding is canonical
//! (encoding it again gives the same bytes); an accepted geometry never overlaps the
//! superblock regions.
//!
//! Input layout: byte 0 selects how the rest is used.
//! - bit 1 clear: the rest is the superblock region, used as is;
//! - bit 1 set: a valid superblock is built from the next bytes (block size, block count,
//!   mode, copy, tag profile — with its tag size, feature bit and, keyed, a key-check value —
//!   and, flag bit 3, a mirror member with its member records) and the remaining bytes are
//!   applied as `(offset, value)` edits;
//! - bit 0 set: magic and crc32c are fixed up before decoding, so the fuzzer gets past the
//!   checksum and reaches the field checks.

use blockguard::format::{
    member_record_offset, Geometry, MemberInfo, MemberRecord, MirrorInfo, Mode, Superblock, SuperblockError,
    VolumeState, INCOMPAT_MIRROR, MAX_MEMBERS, SB_MAGIC, SB_REGION, SB_STRUCT_SIZE,
};
use blockguard::Profile;

use crate::usize_of;

/// A superblock region and the selector byte.
pub const MAX_LEN: usize = 1 + usize_of(SB_REGION);

/// Bytes of the template parameters (block size, block count ×3, flags, slack, uuid,
/// profile and created).
const PARAMS: usize = 8;

/// A valid superblock of `profile` (a keyed one with a made-up key-check value).
fn superblock(
    geometry: Geometry,
    profile: Profile,
    mode: Mode,
    state: VolumeState,
    uuid: u8,
    label: &str,
) -> Superblock {
    Superblock {
        state,
        key_check: if profile.is_keyed() {
            [uuid | 1; 32]
        } else {
            [0; 32]
        },
        ..Superblock::new(geometry, [uuid; 16], profile, mode, label, 1_700_000_000)
    }
}

/// The profile a template parameter byte selects.
fn profile_of(p: u8) -> Profile {
    Profile::ALL[usize::from(p) % Profile::ALL.len()]
}

fn template(p: &[u8]) -> Option<Vec<u8>> {
    let get = |i: usize| p.get(i).copied().unwrap_or(0);
    let block_size = 512u32 << (get(0) % 8);
    let blocks = u64::from(u32::from_le_bytes([get(1), get(2), get(3), 0])) + 1;
    let profile = profile_of(get(7));
    // Bit 0x20: tag slots with room for 32-byte tags (`--tag-room 32`).
    let t = if get(4) & 0x20 == 0 {
        profile.tag_size()
    } else {
        32
    };
    let geometry = if get(4) & 1 == 0 {
        Geometry::for_size(blocks * u64::from(block_size), block_size, t).ok()?
    } else {
        Geometry::for_backing_len(
            blocks * u64::from(block_size) + 3 * SB_REGION + u64::from(get(5)),
            block_size,
            t,
        )
        .ok()?
    };
    let mode = match (get(4) & 2, get(4) & 0x10) {
        (0, _) => Mode::Dual,
        (_, 0) => Mode::None,
        _ => Mode::Rebuild,
    };
    let state = if get(4) & 4 == 0 {
        VolumeState::Clean
    } else {
        VolumeState::InUse
    };
    let mut sb = superblock(geometry, profile, mode, state, get(6), "fuzz");
    sb.created = u64::from(get(7));
    if get(4) & 8 == 0 {
        return Some(sb.encode(get(4) >> 7));
    }
    let info = mirror_info(get(5), get(6));
    let records = mirror_records(&info);
    sb.incompat |= INCOMPAT_MIRROR;
    sb.mirror = Some(info);
    let mut region = sb.encode(get(4) >> 7);
    for r in &records {
        let at = member_record_offset(usize::from(r.index));
        region[at..at + 512].copy_from_slice(&r.encode().ok()?);
    }
    Some(region)
}

/// A mirror set description: 2 or 3 members (`shape` picks the count, the role and which
/// members are out of sync), identities derived from `seed`.
fn mirror_info(shape: u8, seed: u8) -> MirrorInfo {
    let count = 2 + usize::from(shape & 1);
    MirrorInfo {
        set: [seed | 1; 16],
        role: (shape >> 1) % u8::try_from(count).unwrap_or(2),
        members: (0..count)
            .map(|i| MemberInfo {
                id: [seed.wrapping_add(u8::try_from(i).unwrap_or(0)).wrapping_mul(3) | 0x80; 16],
                in_sync: shape >> (3 + i) & 1 == 0,
                full_copy: shape >> (3 + i) & 1 == 1 && seed & 1 == 1,
            })
            .collect(),
        event: u64::from(shape),
    }
}

/// The member records of `info`'s members.
fn mirror_records(info: &MirrorInfo) -> Vec<MemberRecord> {
    (0u8..)
        .zip(&info.members)
        .map(|(index, m)| MemberRecord {
            set: info.set,
            id: m.id,
            index,
            path: format!("/dev/disk/by-id/member-{index}"),
        })
        .collect()
}

/// Decodes every member record slot of a region: never panics, and a record that decodes
/// encodes back to the same 512 bytes.
fn check_records(b: &[u8]) {
    for i in 0..MAX_MEMBERS {
        let at = member_record_offset(i);
        let Some(sector) = b.get(at..at + 512) else {
            return;
        };
        if let Some(r) = MemberRecord::decode(sector) {
            let again = r.encode().expect("a decoded record re-encodes");
            assert_eq!(&again[..], sector, "member record encoding is not canonical");
        }
    }
}

/// Rewrites magic and checksum so that the field checks are reached.
fn fix_up(b: &mut [u8]) {
    if b.len() >= SB_STRUCT_SIZE {
        b[..8].copy_from_slice(&SB_MAGIC);
        let crc = crc32c::crc32c(&b[..SB_STRUCT_SIZE - 4]);
        b[SB_STRUCT_SIZE - 4..SB_STRUCT_SIZE].copy_from_slice(&crc.to_le_bytes());
    }
}

/// The target: decodes the input as described in the module doc and checks the properties
/// listed there.
///
/// # Panics
///
/// When a property is violated (a re-encoded superblock that does not decode, or decodes to
/// something else, an accepted layout that overlaps a superblock region or exceeds its
/// backend): that is what the fuzzer looks for. Never otherwise, whatever the bytes.
pub fn run(data: &[u8]) -> &'static str {
    let Some((&how, rest)) = data.split_first() else {
        return "empty";
    };
    let mut b = if how & 2 == 0 {
        rest.to_vec()
    } else {
        let (params, edits) = rest.split_at(rest.len().min(PARAMS));
        let Some(mut b) = template(params) else {
            return "template: no geometry";
        };
        for e in edits.chunks_exact(3) {
            let at = usize::from(u16::from_le_bytes([e[0], e[1]])) % b.len();
            b[at] = e[2];
        }
        b
    };
    if how & 1 == 1 {
        fix_up(&mut b);
    }
    check_records(&b);
    let (sb, copy) = match Superblock::decode(&b) {
        Ok(d) => d,
        Err(e) => return rejected(&e),
    };
    assert!(copy <= 1);
    // The layout an accepted superblock describes fits its backend and never overlaps the
    // superblock regions.
    let g = sb.geometry;
    let bs = u64::from(g.block_size);
    assert!(g.first_group_offset >= SB_REGION);
    assert_eq!(g.groups, g.data_blocks.div_ceil(u64::from(g.group_blocks)));
    let last = g.data_offset(g.data_blocks - 1);
    assert!(last + bs <= g.backup_sb_offset);
    assert!(g.meta_offset(g.groups - 1, 1) + bs <= g.backup_sb_offset);
    assert_eq!(g.backup_sb_offset % SB_REGION, 0);
    assert!(g.backup_sb_offset + SB_REGION <= g.backing_len);
    // Round trip.
    let enc = sb.encode(copy);
    assert_eq!(enc.len(), usize_of(SB_REGION));
    let again = Superblock::decode(&enc).expect("a re-encoded superblock must decode");
    assert_eq!(again, (sb, copy), "decode(encode(sb)) != sb");
    assert_eq!(again.0.encode(copy), enc, "encoding is not canonical");
    "accepted"
}

fn rejected(e: &SuperblockError) -> &'static str {
    match e {
        SuperblockError::BadMagic { .. } => "rejected: magic",
        SuperblockError::BadChecksum { .. } => "rejected: checksum",
        SuperblockError::Version { .. } => "rejected: version",
        SuperblockError::Incompat(_) => "rejected: incompat",
        SuperblockError::Profile { .. } => "rejected: profile",
        SuperblockError::Field { .. } => "rejected: field",
        _ => "rejected: other",
    }
}

/// Valid superblocks of assorted layouts from the real encoder, as raw regions and through
/// the template; then each with one byte of its first 256 changed and the checksum fixed, so
/// every field check has an input that reaches it.
///
/// # Panics
///
/// If one of the fixed seed layouts here is not a valid geometry: a bug in this list, which
/// the corpus test would report.
pub fn seeds() -> Vec<(String, Vec<u8>)> {
    let mut out = Vec::new();
    let layouts = [
        (512u32, 1u64, None, Mode::Dual, VolumeState::Clean, ""),
        (512, 150, Some(12), Mode::Dual, VolumeState::InUse, "small groups"),
        (4096, 256, None, Mode::Dual, VolumeState::Clean, "vol"),
        (4096, 2000, Some(70), Mode::None, VolumeState::InUse, "none"),
        (65536, 3, None, Mode::Dual, VolumeState::Clean, "big blocks"),
    ];
    let mut regions = Vec::new();
    for (i, &(bs, blocks, groups, mode, state, label)) in (0u8..).zip(&layouts) {
        let g = Geometry::for_size_with_groups(blocks * u64::from(bs), bs, 8, groups).expect("seed layout");
        let sb = superblock(g, Profile::Crc32c, mode, state, 0x11 * i, label);
        for copy in 0..2u8 {
            let mut input = vec![0u8];
            input.extend(sb.encode(copy));
            out.push((format!("gen-valid-{bs}-{blocks}-copy{copy}"), input.clone()));
            regions.push(input);
        }
    }
    // Every other profile: its tag size, feature bit and (keyed) key-check value.
    for profile in Profile::ALL.into_iter().skip(1) {
        let g = Geometry::for_size(256 * 4096, 4096, profile.tag_size()).expect("seed layout");
        let sb = superblock(g, profile, Mode::Dual, VolumeState::Clean, 0x21, "profile");
        let mut input = vec![0u8];
        input.extend(sb.encode(0));
        out.push((format!("gen-valid-profile-{}", profile.name()), input));
    }
    // Tag slots wider than the profile's tags (`--tag-room`): the tag-room feature bit.
    for (profile, slot) in [
        (Profile::Crc32c, 32),
        (Profile::NvmePi64, 32),
        (Profile::Xxh3, 16),
    ] {
        let g = Geometry::for_size(256 * 4096, 4096, slot).expect("seed layout");
        let sb = superblock(g, profile, Mode::Dual, VolumeState::Clean, 0x31, "room");
        let mut input = vec![0u8];
        input.extend(sb.encode(0));
        out.push((format!("gen-valid-room-{}-{slot}", profile.name()), input));
    }
    // A backend of fixed length (a block device) rather than a size.
    let g = Geometry::for_backing_len(1 << 20, 4096, 8).expect("seed layout");
    let mut input = vec![0u8];
    input.extend(superblock(g, Profile::Crc32c, Mode::Dual, VolumeState::Clean, 7, "device").encode(0));
    out.push(("gen-valid-device-1m".into(), input));
    // Templates, plain and with edits (the last two: mirror members of 3 and of 2).
    for (name, params) in [
        ("512-dual", [0u8, 10, 0, 0, 0, 0, 1, 2]),
        ("4096-backing-none-inuse-copy1", [3, 200, 1, 0, 0x87, 9, 2, 3]),
        ("64k", [7, 2, 0, 0, 0, 0, 3, 4]),
        ("4096-room-32", [3, 80, 0, 0, 0x20, 0, 1, 6]),
        ("mirror-3-role-2", [3, 100, 0, 0, 0x08, 0b0001_0101, 5, 6]),
        ("mirror-2-out-of-sync", [0, 50, 0, 0, 0x0c, 0b0001_0000, 9, 1]),
    ] {
        let mut input = vec![2u8];
        input.extend(params);
        out.push((format!("gen-template-{name}"), input.clone()));
        input[0] = 3;
        input.extend([8, 0, 2, 144, 0, 5]); // version byte and a state byte
        out.push((format!("gen-template-{name}-edited"), input));
    }
    // One byte changed, checksum fixed: reaches each field's check (the key check and the
    // padding before it included).
    let base = &regions[2];
    for at in (8..336).step_by(4) {
        let mut input = base.clone();
        input[0] = 1;
        input[1 + at] ^= 0x81;
        out.push((format!("gen-field-{at:03}"), input));
    }
    // Damaged: checksum, magic, truncated.
    let mut bad = base.clone();
    bad[100] ^= 1;
    out.push(("gen-bad-checksum".into(), bad));
    let mut bad = base.clone();
    bad[1] = b'X';
    out.push(("gen-bad-magic".into(), bad));
    out.push(("gen-truncated".into(), base[..300].to_vec()));
    out
}
