//! Metadata sectors: the unit in which tags are stored (since format version 2).
//!
//! Each group has two metadata blocks, the *brothers* (slot 0 and slot 1), each `B` bytes. A
//! metadata block is a row of 512-byte **sectors**, and every sector validates on its own: a
//! 16-byte header (header check, checksum, generation) and the tags of `tags_per_sector` data
//! blocks.
//! Sector `k` of slot 0 and sector `k` of slot 1 form a **pair**: the two brothers of the
//! tags they hold. Disks write 512-byte sectors atomically, so a metadata write torn by a
//! crash leaves every sector either entirely old or entirely new — each still valid — and a
//! sector that fails its checksum can never be explained by a crash: it is damage.
//!
//! Since format version 4 the header carries its own check, bound to the sector's place, next
//! to the checksum of the whole sector. A sector whose header checks but whose body does not
//! is *scarred*: its generation is known for certain, so the engine can still tell which
//! brother is the newest, and its tags are only ever matched against data (a damaged tag
//! matches nothing). Bit rot lands in the 496-byte body far more often than in the 16-byte
//! header; a misdirected write, a zeroed sector or another sector's bytes fail the header check
//! (see `docs/FORMAT.md`, "Metadata sectors").

use super::{le32, le64};
use crate::tag::MAX_TAG_SIZE;
use std::fmt;

/// Bytes per metadata sector: the unit a disk writes atomically.
pub const SECTOR_SIZE: usize = 512;
/// Bytes before the first tag of a sector.
pub const SECTOR_HEADER_SIZE: usize = 16;
/// Where the header check (`u32`) sits.
const HEAD_AT: usize = 0;
const CRC_AT: usize = 4;
const GEN_AT: usize = 8;
/// Prefix of the header check's seed, so it never equals the sector checksum's.
const HEAD_SEED: [u8; 4] = *b"BGTH";

// The header fields must tile the header exactly.
const _: () = assert!(HEAD_AT + 4 == CRC_AT);
const _: () = assert!(CRC_AT + 4 == GEN_AT);
const _: () = assert!(GEN_AT + 8 == SECTOR_HEADER_SIZE);
// Even the largest tag leaves room for several per sector.
const _: () = assert!((SECTOR_SIZE - SECTOR_HEADER_SIZE) / MAX_TAG_SIZE >= 8);

/// Tags of `tag_size` bytes that fit in one sector (62 for 8-byte tags).
pub const fn tags_per_sector(tag_size: usize) -> usize {
    (SECTOR_SIZE - SECTOR_HEADER_SIZE) / tag_size
}

/// Where a sector lives; bound into its checksum so a sector written to, or read from, the
/// wrong place (or another volume) fails.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct SectorId {
    /// Group number.
    pub group: u64,
    /// Sector index inside the metadata block (0 ..= B/512 - 1): the pair number.
    pub index: u32,
    /// Brother slot, 0 or 1.
    pub slot: u8,
}

/// Why a metadata sector is not valid. Never explainable by a crash (sectors are written
/// atomically): always damage, a misplaced write, or bytes from another volume.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[non_exhaustive]
pub enum SectorDamage {
    /// Not one sector long (a caller's mistake, never read from disk).
    WrongLength,
    /// Not zero, and the header check fails: not a header of this volume's sector at this
    /// place (damaged header, a misdirected write, another sector's bytes, another volume's).
    BadHeader {
        /// Header check stored in the sector.
        stored: u32,
        /// Header check computed over it.
        computed: u32,
    },
    /// The checksum does not match (damaged, misplaced, or of another volume).
    Checksum {
        /// Checksum stored in the sector.
        stored: u32,
        /// Checksum computed over it.
        computed: u32,
    },
    /// The generation's parity does not belong in this slot.
    Parity {
        /// Generation found.
        generation: u64,
    },
    /// Generation 0 (the all-unwritten brother of a group's first write) holding a tag.
    TagInGenerationZero,
    /// Bytes after the sector's last tag are not zero.
    TrailingBytes,
    /// The expected tags do not fit a sector (a caller's mistake, never written by blockguard).
    TagsDoNotFit,
}

impl fmt::Display for SectorDamage {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            SectorDamage::WrongLength => f.write_str("not one sector long"),
            SectorDamage::BadHeader { stored, computed } => write!(
                f,
                "header check mismatch (stored {stored:#010x}, computed {computed:#010x}): not this place's metadata sector"
            ),
            SectorDamage::Checksum { stored, computed } => write!(
                f,
                "checksum mismatch (stored {stored:#010x}, computed {computed:#010x}): damaged, misplaced or foreign"
            ),
            SectorDamage::Parity { generation } => {
                write!(f, "generation {generation} does not belong in this slot")
            }
            SectorDamage::TagInGenerationZero => f.write_str("generation 0 holds a tag"),
            SectorDamage::TrailingBytes => f.write_str("non-zero bytes after the last tag"),
            SectorDamage::TagsDoNotFit => f.write_str("the expected tags do not fit a sector"),
        }
    }
}

/// What a metadata sector on disk turned out to be.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum SectorParse {
    /// All 512 bytes zero: never written.
    Empty,
    /// A valid sector of this generation; its tags are at bytes 16.. of the sector.
    Valid {
        /// Generation: odd in slot 0, even in slot 1 (0 only for the all-unwritten brother a
        /// group's first write puts in slot 1).
        generation: u64,
    },
    /// *Scarred*: the header checks (so `generation` is this place's, for certain) but the
    /// sector's checksum does not — its body is damaged. Its tags may be wrong; one that is
    /// wrong matches no data.
    Scarred {
        /// Generation, from the intact header.
        generation: u64,
        /// What is wrong with the body.
        why: SectorDamage,
    },
    /// Damaged, misplaced or foreign.
    Invalid(SectorDamage),
}

impl SectorParse {
    /// The generation of a valid sector.
    pub fn generation(&self) -> Option<u64> {
        match self {
            SectorParse::Valid { generation } => Some(*generation),
            _ => None,
        }
    }

    /// The generation of a sector whose header is intact: valid or scarred.
    pub fn header_generation(&self) -> Option<u64> {
        match self {
            SectorParse::Valid { generation } | SectorParse::Scarred { generation, .. } => Some(*generation),
            _ => None,
        }
    }

    /// True for a scarred sector (intact header, damaged body).
    pub fn is_scarred(&self) -> bool {
        matches!(self, SectorParse::Scarred { .. })
    }
}

/// The slot a generation belongs in: odd generations in slot 0, even ones in slot 1.
pub const fn slot_of_generation(generation: u64) -> u8 {
    if generation % 2 == 1 {
        0
    } else {
        1
    }
}

/// The 29 bytes `uuid ‖ u64le(group) ‖ u32le(index) ‖ u8(slot)` that bind a sector to its place.
fn place(uuid: &[u8; 16], id: SectorId) -> [u8; 29] {
    let mut seed = [0u8; 29];
    seed[..16].copy_from_slice(uuid);
    seed[16..24].copy_from_slice(&id.group.to_le_bytes());
    seed[24..28].copy_from_slice(&id.index.to_le_bytes());
    seed[28] = id.slot;
    seed
}

/// The header check of sector `s` at `id`: crc32c of `"BGTH" ‖ place ‖ s[8..16]` (the
/// generation), where place is `uuid ‖ u64le(group) ‖ u32le(index) ‖ u8(slot)`.
pub fn header_check(s: &[u8], uuid: &[u8; 16], id: SectorId) -> u32 {
    debug_assert!(s.len() >= SECTOR_HEADER_SIZE);
    let c = crc32c::crc32c_append(crc32c::crc32c(&HEAD_SEED), &place(uuid, id));
    crc32c::crc32c_append(c, &s[GEN_AT..GEN_AT + 8])
}

/// The checksum of sector `s` (512 bytes) at `id`: crc32c seeded with
/// `uuid ‖ u64le(group) ‖ u32le(index) ‖ u8(slot)`, over the sector with its checksum field
/// read as zero (the header check included).
pub fn sector_checksum(s: &[u8], uuid: &[u8; 16], id: SectorId) -> u32 {
    debug_assert_eq!(s.len(), SECTOR_SIZE);
    let c = crc32c::crc32c_append(crc32c::crc32c(&place(uuid, id)), &s[..CRC_AT]);
    let c = crc32c::crc32c_append(c, &[0u8; 4]);
    crc32c::crc32c_append(c, &s[CRC_AT + 4..])
}

/// Encodes a sector: `tags` (`count × tag_size` bytes, all-zero tags meaning unwritten) under
/// `generation`, for the place `id`.
///
/// # Panics
/// If `out` is not one sector, the tags do not fit, or the generation's parity does not match
/// the slot: writing such a sector would corrupt the volume.
pub fn encode_sector(out: &mut [u8], uuid: &[u8; 16], id: SectorId, generation: u64, tags: &[u8]) {
    assert_eq!(out.len(), SECTOR_SIZE, "a metadata sector is {SECTOR_SIZE} bytes");
    assert!(
        SECTOR_HEADER_SIZE + tags.len() <= SECTOR_SIZE,
        "{} bytes of tags do not fit a sector",
        tags.len()
    );
    assert_eq!(
        slot_of_generation(generation),
        id.slot,
        "generation {generation} does not belong in slot {}",
        id.slot
    );
    assert!(
        generation != 0 || tags.iter().all(|&b| b == 0),
        "generation 0 holds only unwritten tags"
    );
    out.fill(0);
    out[GEN_AT..GEN_AT + 8].copy_from_slice(&generation.to_le_bytes());
    let head = header_check(out, uuid, id);
    out[HEAD_AT..HEAD_AT + 4].copy_from_slice(&head.to_le_bytes());
    out[SECTOR_HEADER_SIZE..SECTOR_HEADER_SIZE + tags.len()].copy_from_slice(tags);
    let crc = sector_checksum(out, uuid, id);
    out[CRC_AT..CRC_AT + 4].copy_from_slice(&crc.to_le_bytes());
}

/// Parses the sector `s` read from `id`, which holds `count` tags of `tag_size` bytes.
/// Never panics, whatever the bytes (a `s` that is not 512 bytes long is invalid).
///
/// Only a sector whose header check passes and whose generation belongs in the slot can be
/// [`SectorParse::Scarred`]: a checksum mismatch there is damage to the body. A sector whose
/// checksum passes but which breaks a rule the writer never breaks (bytes after the last tag,
/// a tag in generation 0) was not written by blockguard: invalid.
pub fn decode_sector(s: &[u8], uuid: &[u8; 16], id: SectorId, count: usize, tag_size: usize) -> SectorParse {
    if s.len() != SECTOR_SIZE {
        return SectorParse::Invalid(SectorDamage::WrongLength);
    }
    if crate::tag::is_zero(s) {
        return SectorParse::Empty;
    }
    let (stored, computed) = (le32(s, HEAD_AT), header_check(s, uuid, id));
    if stored != computed {
        return SectorParse::Invalid(SectorDamage::BadHeader { stored, computed });
    }
    let generation = le64(s, GEN_AT);
    if slot_of_generation(generation) != id.slot {
        return SectorParse::Invalid(SectorDamage::Parity { generation });
    }
    let end = match count.checked_mul(tag_size) {
        Some(n) if n <= SECTOR_SIZE - SECTOR_HEADER_SIZE && (tag_size > 0 || count == 0) => {
            SECTOR_HEADER_SIZE + n
        }
        _ => return SectorParse::Invalid(SectorDamage::TagsDoNotFit),
    };
    let stored = le32(s, CRC_AT);
    let computed = sector_checksum(s, uuid, id);
    if stored != computed {
        let why = SectorDamage::Checksum { stored, computed };
        return SectorParse::Scarred { generation, why };
    }
    if !crate::tag::is_zero(&s[end..]) {
        return SectorParse::Invalid(SectorDamage::TrailingBytes);
    }
    if generation == 0 && !crate::tag::is_zero(&s[SECTOR_HEADER_SIZE..end]) {
        return SectorParse::Invalid(SectorDamage::TagInGenerationZero);
    }
    SectorParse::Valid { generation }
}

/// The bytes of tag `j` inside a sector.
pub fn sector_tag(s: &[u8], j: usize, tag_size: usize) -> &[u8] {
    let at = SECTOR_HEADER_SIZE + j * tag_size;
    &s[at..at + tag_size]
}

#[cfg(test)]
mod tests {
    use super::*;

    const U: [u8; 16] = [7; 16];

    fn id(group: u64, index: u32, slot: u8) -> SectorId {
        SectorId { group, index, slot }
    }

    #[allow(clippy::cast_possible_truncation)] // Wrapping is the point: any byte pattern will do.
    fn tags(n: usize, fill: u8) -> Vec<u8> {
        (0..n * 8).map(|i| fill.wrapping_add(i as u8) | 1).collect()
    }

    #[test]
    fn roundtrip_and_binding() {
        let t = tags(62, 3);
        let mut s = vec![0u8; SECTOR_SIZE];
        encode_sector(&mut s, &U, id(5, 2, 0), 7, &t);
        assert_eq!(
            decode_sector(&s, &U, id(5, 2, 0), 62, 8),
            SectorParse::Valid { generation: 7 }
        );
        assert_eq!(sector_tag(&s, 1, 8), &t[8..16]);
        for other in [id(6, 2, 0), id(5, 3, 0), id(5, 2, 1)] {
            assert!(matches!(
                decode_sector(&s, &U, other, 62, 8),
                SectorParse::Invalid(SectorDamage::BadHeader { .. })
            ));
        }
        assert!(matches!(
            decode_sector(&s, &[8; 16], id(5, 2, 0), 62, 8),
            SectorParse::Invalid(_)
        ));
        assert_eq!(
            decode_sector(&[0u8; SECTOR_SIZE], &U, id(5, 2, 0), 62, 8),
            SectorParse::Empty
        );
    }

    #[test]
    fn every_bit_flip_is_detected_and_only_body_flips_keep_the_generation() {
        let mut s = vec![0u8; SECTOR_SIZE];
        encode_sector(&mut s, &U, id(1, 0, 1), 4, &tags(40, 9));
        for byte in 0..SECTOR_SIZE {
            for bit in 0..8 {
                let mut c = s.clone();
                c[byte] ^= 1 << bit;
                let parsed = decode_sector(&c, &U, id(1, 0, 1), 40, 8);
                let in_header = byte < CRC_AT || (GEN_AT..SECTOR_HEADER_SIZE).contains(&byte);
                if in_header {
                    assert!(
                        matches!(parsed, SectorParse::Invalid(SectorDamage::BadHeader { .. })),
                        "flip of header byte {byte} bit {bit}: {parsed:?}"
                    );
                } else {
                    assert!(
                        matches!(
                            parsed,
                            SectorParse::Scarred {
                                generation: 4,
                                why: SectorDamage::Checksum { .. }
                            }
                        ),
                        "flip of body byte {byte} bit {bit}: {parsed:?}"
                    );
                }
            }
        }
    }

    #[test]
    fn a_header_moved_to_another_place_fails_its_header_check() {
        let mut s = vec![0u8; SECTOR_SIZE];
        encode_sector(&mut s, &U, id(5, 2, 0), 7, &tags(62, 1));
        // A body flip keeps the generation at the right place only.
        s[200] ^= 4;
        assert!(matches!(
            decode_sector(&s, &U, id(5, 2, 0), 62, 8),
            SectorParse::Scarred { generation: 7, .. }
        ));
        for other in [id(6, 2, 0), id(5, 3, 0), id(5, 2, 1)] {
            assert!(matches!(
                decode_sector(&s, &U, other, 62, 8),
                SectorParse::Invalid(SectorDamage::BadHeader { .. })
            ));
        }
        assert!(matches!(
            decode_sector(&s, &[8; 16], id(5, 2, 0), 62, 8),
            SectorParse::Invalid(SectorDamage::BadHeader { .. })
        ));
        // Arbitrary data (a misdirected data write) has no header of this place.
        let data: Vec<u8> = (0..SECTOR_SIZE).map(|i| (i * 7 + 3).to_le_bytes()[0]).collect();
        assert!(matches!(
            decode_sector(&data, &U, id(5, 2, 0), 62, 8),
            SectorParse::Invalid(SectorDamage::BadHeader { .. })
        ));
    }

    #[test]
    fn generation_zero_is_the_unwritten_brother_only() {
        let mut s = vec![0u8; SECTOR_SIZE];
        encode_sector(&mut s, &U, id(0, 0, 1), 0, &[0u8; 62 * 8]);
        assert_eq!(
            decode_sector(&s, &U, id(0, 0, 1), 62, 8),
            SectorParse::Valid { generation: 0 }
        );
        // A tag forged into a generation-0 sector (checksum recomputed) is refused.
        s[SECTOR_HEADER_SIZE] = 1;
        let crc = sector_checksum(&s, &U, id(0, 0, 1));
        s[CRC_AT..CRC_AT + 4].copy_from_slice(&crc.to_le_bytes());
        assert_eq!(
            decode_sector(&s, &U, id(0, 0, 1), 62, 8),
            SectorParse::Invalid(SectorDamage::TagInGenerationZero)
        );
    }

    #[test]
    fn wrong_parity_and_trailing_bytes_are_refused() {
        let mut s = vec![0u8; SECTOR_SIZE];
        encode_sector(&mut s, &U, id(0, 0, 0), 3, &tags(10, 1));
        // Re-seal as if written to slot 1: both checks match, the parity does not.
        let head = header_check(&s, &U, id(0, 0, 1));
        s[HEAD_AT..HEAD_AT + 4].copy_from_slice(&head.to_le_bytes());
        let crc = sector_checksum(&s, &U, id(0, 0, 1));
        s[CRC_AT..CRC_AT + 4].copy_from_slice(&crc.to_le_bytes());
        assert_eq!(
            decode_sector(&s, &U, id(0, 0, 1), 10, 8),
            SectorParse::Invalid(SectorDamage::Parity { generation: 3 })
        );
        let mut s = vec![0u8; SECTOR_SIZE];
        encode_sector(&mut s, &U, id(0, 0, 0), 3, &tags(10, 1));
        // Fewer tags expected than stored: the extra ones are trailing bytes.
        assert_eq!(
            decode_sector(&s, &U, id(0, 0, 0), 9, 8),
            SectorParse::Invalid(SectorDamage::TrailingBytes)
        );
    }

    #[test]
    fn tags_per_sector_by_size() {
        assert_eq!(tags_per_sector(8), 62);
        assert_eq!(tags_per_sector(16), 31);
        assert_eq!(tags_per_sector(32), 15);
    }

    #[test]
    #[should_panic(expected = "does not belong in slot")]
    fn encoding_a_generation_into_the_wrong_slot_is_a_bug() {
        let mut s = vec![0u8; SECTOR_SIZE];
        encode_sector(&mut s, &U, id(0, 0, 1), 3, &[]);
    }
}
