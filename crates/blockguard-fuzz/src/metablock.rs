//! Target `format_metablock`: `decode_sector` (metadata sectors, see `docs/FORMAT.md`) with
//! arbitrary bytes and arbitrary parameters (volume UUID, group, sector index, slot, expected
//! tag count and tag size).
//!
//! Properties: decoding never panics; an all-zero sector is `Empty`; a `Valid` sector's
//! generation parity matches the slot, generation 0 holds no tag, and re-encoding its tags
//! gives back exactly its bytes (the format is canonical); a `Scarred` sector's header check
//! is the documented one and its generation's parity matches the slot, while its checksum
//! is not.
//!
//! Input layout: `how` (1 byte), uuid (16), group (8), index (4), slot (1), count (2),
//! tag size (1), then the sector itself.
//! - `how` bit 1: write the documented header check first (over the sector's generation);
//! - `how` bit 0: then recompute the sector's checksum (seeded with
//!   uuid ‖ group ‖ index ‖ slot, the checksum field counted as zero), so the fuzzer reaches
//!   the checks behind it.

use blockguard::format::{
    decode_sector, encode_sector, sector_tag, tags_per_sector, SectorDamage, SectorId, SectorParse,
    SECTOR_HEADER_SIZE, SECTOR_SIZE,
};
use crc32c::crc32c_append;

const PARAMS: usize = 1 + 16 + 8 + 4 + 1 + 2 + 1;

/// The parameters and one sector.
pub const MAX_LEN: usize = PARAMS + SECTOR_SIZE;

/// The sector checksum as `docs/FORMAT.md` specifies it (recomputed here, not taken from the
/// library, so the target also pins the documented formula).
fn checksum(s: &[u8], uuid: &[u8; 16], id: SectorId) -> u32 {
    let mut c = crc32c_append(0, uuid);
    c = crc32c_append(c, &id.group.to_le_bytes());
    c = crc32c_append(c, &id.index.to_le_bytes());
    c = crc32c_append(c, &[id.slot]);
    c = crc32c_append(c, &s[..4]);
    c = crc32c_append(c, &[0; 4]);
    crc32c_append(c, &s[8..])
}

/// The header check as `docs/FORMAT.md` specifies it: crc32c("BGTH" ‖ uuid ‖ group ‖ index ‖
/// slot ‖ sector bytes 8..16).
fn header_check(s: &[u8], uuid: &[u8; 16], id: SectorId) -> u32 {
    let mut c = crc32c_append(0, b"BGTH");
    c = crc32c_append(c, uuid);
    c = crc32c_append(c, &id.group.to_le_bytes());
    c = crc32c_append(c, &id.index.to_le_bytes());
    c = crc32c_append(c, &[id.slot]);
    crc32c_append(c, &s[8..16])
}

/// The target: decodes the input as described in the module doc and checks the properties
/// listed there.
///
/// # Panics
///
/// When a property is violated (a non-zero sector taken as empty, a valid sector in the wrong
/// slot or that does not re-encode to its own bytes, tags in generation 0): that is what the
/// fuzzer looks for. Never otherwise, whatever the bytes.
pub fn run(data: &[u8]) -> &'static str {
    if data.len() < PARAMS {
        return "short";
    }
    let (p, sector) = data.split_at(PARAMS);
    let how = p[0];
    let uuid: [u8; 16] = p[1..17].try_into().unwrap();
    let id = SectorId {
        group: u64::from_le_bytes(p[17..25].try_into().unwrap()),
        index: u32::from_le_bytes(p[25..29].try_into().unwrap()),
        slot: p[29],
    };
    let count = usize::from(u16::from_le_bytes([p[30], p[31]]));
    let tag_size = usize::from(p[32]);
    let mut s = sector.to_vec();
    if how & 2 != 0 && s.len() >= 16 {
        let head = header_check(&s, &uuid, id);
        s[..4].copy_from_slice(&head.to_le_bytes());
    }
    if how & 1 != 0 && s.len() == SECTOR_SIZE {
        let crc = checksum(&s, &uuid, id);
        s[4..8].copy_from_slice(&crc.to_le_bytes());
    }
    match decode_sector(&s, &uuid, id, count, tag_size) {
        SectorParse::Empty => {
            assert!(s.len() == SECTOR_SIZE && s.iter().all(|&x| x == 0));
            "empty"
        }
        SectorParse::Invalid(why) => {
            assert!(!why.to_string().is_empty());
            match why {
                SectorDamage::BadHeader { .. } => "invalid: header",
                SectorDamage::WrongLength => "invalid: length",
                SectorDamage::Checksum { .. } => "invalid: checksum",
                SectorDamage::Parity { .. } => "invalid: parity",
                SectorDamage::TagInGenerationZero => "invalid: tag in generation 0",
                SectorDamage::TrailingBytes => "invalid: trailing bytes",
                SectorDamage::TagsDoNotFit => "invalid: tags do not fit",
                _ => "invalid: other",
            }
        }
        SectorParse::Scarred { generation, .. } => check_scarred(&s, &uuid, id, generation),
        SectorParse::Valid { generation } => check_valid(&s, &uuid, id, generation, count, tag_size),
    }
}

/// A scarred sector: its header checks, its generation's parity picks the slot, its
/// checksum does not match.
fn check_scarred(s: &[u8], uuid: &[u8; 16], id: SectorId, generation: u64) -> &'static str {
    assert_eq!(s.len(), SECTOR_SIZE);
    assert_eq!(
        u8::from(generation.is_multiple_of(2)),
        id.slot,
        "scarred: parity must pick the slot"
    );
    assert_eq!(
        le32(s, 0),
        header_check(s, uuid, id),
        "scarred: the header checks"
    );
    assert_ne!(
        le32(s, 4),
        checksum(s, uuid, id),
        "scarred: the checksum does not"
    );
    "scarred"
}

/// A valid sector: parity, fit, generation 0 unwritten, and canonical.
fn check_valid(
    s: &[u8],
    uuid: &[u8; 16],
    id: SectorId,
    generation: u64,
    count: usize,
    tag_size: usize,
) -> &'static str {
    assert_eq!(s.len(), SECTOR_SIZE);
    assert_eq!(
        u8::from(generation.is_multiple_of(2)),
        id.slot,
        "generation parity must pick the slot"
    );
    assert!(
        16 + count * tag_size <= SECTOR_SIZE,
        "tags that do not fit were accepted"
    );
    let tags: Vec<u8> = (0..count)
        .flat_map(|j| sector_tag(s, j, tag_size).to_vec())
        .collect();
    assert!(
        generation != 0 || tags.iter().all(|&x| x == 0),
        "generation 0 holds a tag"
    );
    let mut out = vec![0xA5; SECTOR_SIZE];
    encode_sector(&mut out, uuid, id, generation, &tags);
    assert_eq!(out, s, "decode then encode is not the identity");
    "valid"
}

fn le32(s: &[u8], at: usize) -> u32 {
    u32::from_le_bytes([s[at], s[at + 1], s[at + 2], s[at + 3]])
}

fn input(how: u8, uuid: [u8; 16], id: SectorId, count: u16, tag_size: u8, sector: &[u8]) -> Vec<u8> {
    let mut v = vec![how];
    v.extend(uuid);
    v.extend(id.group.to_le_bytes());
    v.extend(id.index.to_le_bytes());
    v.push(id.slot);
    v.extend(count.to_le_bytes());
    v.push(tag_size);
    v.extend(sector);
    v
}

/// Valid sectors from the real encoder (first-write brothers, full and partial sectors, odd
/// and even generations, big group numbers), the empty sector, and each valid one damaged in
/// the ways the decoder tells apart.
///
/// # Panics
///
/// If a metadata sector held 2^16 tags or more, more than the input's tag count field can
/// say (it holds 62 tags of 8 bytes).
pub fn seeds() -> Vec<(String, Vec<u8>)> {
    // Name, uuid, group, sector index, generation, tag count.
    type Case = (&'static str, [u8; 16], u64, u32, u64, u16);
    let mut out = Vec::new();
    let full = u16::try_from(tags_per_sector(8)).expect("a sector holds fewer than 2^16 tags");
    let cases: [Case; 7] = [
        ("first-write-slot1-gen0", [1; 16], 0, 0, 0, full),
        ("first-write-slot0-gen1", [1; 16], 0, 0, 1, full),
        ("full-gen2", [2; 16], 5, 0, 2, full),
        ("partial-gen7", [3; 16], 12, 3, 7, 12),
        ("one-tag-gen1000", [4; 16], u64::MAX / 3, 7, 1000, 1),
        ("no-tags-gen3", [5; 16], 1, 1, 3, 0),
        ("big-gen", [6; 16], 1 << 40, 2, u64::MAX - 1, 30),
    ];
    for (name, uuid, group, index, generation, count) in cases {
        let id = SectorId {
            group,
            index,
            slot: u8::from(generation % 2 == 0),
        };
        // Tags: "written" ones look like crc32c tags (non-zero), with a few unwritten.
        let tag_bytes = usize::from(count) * 8;
        let tags: Vec<u8> = if generation == 0 {
            vec![0; tag_bytes]
        } else {
            (0..tag_bytes)
                .map(|i| {
                    if (i / 8) % 5 == 4 {
                        0
                    } else {
                        // The low byte: any pattern will do.
                        (i * 37 + 11).to_le_bytes()[0] | 1
                    }
                })
                .collect()
        };
        let mut s = vec![0u8; SECTOR_SIZE];
        encode_sector(&mut s, &uuid, id, generation, &tags);
        let seed = |how: u8, s: &[u8]| input(how, uuid, id, count, 8, s);
        out.push((format!("gen-valid-{name}"), seed(0, &s)));
        // The same bytes read where they do not belong: the other slot, another group.
        let mut other = input(0, uuid, id, count, 8, &s);
        other[29] ^= 1;
        out.push((format!("gen-other-slot-{name}"), other));
        // A tag changed, checksum fixed (reaches the checks behind it).
        let mut t = s.clone();
        t[SECTOR_HEADER_SIZE + 3] ^= 0x40;
        out.push((format!("gen-tag-changed-fixed-{name}"), seed(1, &t)));
        // A tag changed, checksum not fixed: scarred (the header still checks).
        let mut t = s.clone();
        t[SECTOR_HEADER_SIZE + 5] ^= 0x02;
        out.push((format!("gen-scarred-{name}"), seed(0, &t)));
        // Trailing garbage after the last tag, checksum fixed.
        let mut t = s.clone();
        t[SECTOR_SIZE - 1] = 0x55;
        out.push((format!("gen-trailing-fixed-{name}"), seed(3, &t)));
        // Expecting one tag more than the sector holds.
        out.push((
            format!("gen-count-plus-one-{name}"),
            input(0, uuid, id, count + 1, 8, &s),
        ));
    }
    let zero_id = SectorId {
        group: 0,
        index: 0,
        slot: 0,
    };
    out.push((
        "gen-empty".into(),
        input(0, [0; 16], zero_id, 62, 8, &[0; SECTOR_SIZE]),
    ));
    out.push((
        "gen-header-only".into(),
        input(2, [9; 16], zero_id, 62, 8, &[0; SECTOR_SIZE]),
    ));
    out.push((
        "gen-short-sector".into(),
        input(3, [9; 16], zero_id, 1, 8, &[0xAB; 100]),
    ));
    out.push((
        "gen-huge-count".into(),
        input(3, [9; 16], zero_id, u16::MAX, 255, &[1; SECTOR_SIZE]),
    ));
    out
}
