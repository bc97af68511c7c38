//! Metadata sectors: the unit in which tags are stored (since format version 2).
//!
//! Each group has two metadata blocks, the *brothers* (slot 0 and slot 1), each `B` bytes. A
//! metadata block is a row of 512-byte **sectors**, and every sector validates on its own: a
//! 16-byte header (magic, checksum, generation) and the tags of `tags_per_sector` data blocks.
//! Sector `k` of slot 0 and sector `k` of slot 1 form a **pair**: the two brothers of the
//! tags they hold. Disks write 512-byte sectors atomically, so a metadata write torn by a
//! crash leaves every sector either entirely old or entirely new — each still valid — and a
//! sector that fails its checksum can never be explained by a crash: it is damage.

use super::{le32, le64};
use crate::tag::MAX_TAG_SIZE;
use std::fmt;

/// Bytes per metadata sector: the unit a disk writes atomically.
pub const SECTOR_SIZE: usize = 512;
/// Magic at byte 0 of every metadata sector: `"BGTS"` (blockguard tag sector).
pub const SECTOR_MAGIC: [u8; 4] = *b"BGTS";
/// Bytes before the first tag of a sector.
pub const SECTOR_HEADER_SIZE: usize = 16;
const CRC_AT: usize = 4;
const GEN_AT: usize = 8;

// The header fields must tile the header exactly.
const _: () = assert!(SECTOR_MAGIC.len() == CRC_AT);
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
    /// Not zero, and no sector magic.
    BadMagic,
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
            SectorDamage::BadMagic => f.write_str("not a metadata sector (no magic)"),
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
}

/// The slot a generation belongs in: odd generations in slot 0, even ones in slot 1.
pub const fn slot_of_generation(generation: u64) -> u8 {
    if generation % 2 == 1 {
        0
    } else {
        1
    }
}

/// The checksum of sector `s` (512 bytes) at `id`: crc32c seeded with
/// `uuid ‖ u64le(group) ‖ u32le(index) ‖ u8(slot)`, over the sector with its checksum field
/// read as zero.
pub fn sector_checksum(s: &[u8], uuid: &[u8; 16], id: SectorId) -> u32 {
    debug_assert_eq!(s.len(), SECTOR_SIZE);
    let mut seed = [0u8; 29];
    seed[..16].copy_from_slice(uuid);
    seed[16..24].copy_from_slice(&id.group.to_le_bytes());
    seed[24..28].copy_from_slice(&id.index.to_le_bytes());
    seed[28] = id.slot;
    let c = crc32c::crc32c_append(crc32c::crc32c(&seed), &s[..CRC_AT]);
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
    out[..CRC_AT].copy_from_slice(&SECTOR_MAGIC);
    out[GEN_AT..GEN_AT + 8].copy_from_slice(&generation.to_le_bytes());
    out[SECTOR_HEADER_SIZE..SECTOR_HEADER_SIZE + tags.len()].copy_from_slice(tags);
    let crc = sector_checksum(out, uuid, id);
    out[CRC_AT..CRC_AT + 4].copy_from_slice(&crc.to_le_bytes());
}

/// Parses the sector `s` read from `id`, which holds `count` tags of `tag_size` bytes.
/// Never panics, whatever the bytes (a `s` that is not 512 bytes long is invalid).
pub fn decode_sector(s: &[u8], uuid: &[u8; 16], id: SectorId, count: usize, tag_size: usize) -> SectorParse {
    if s.len() != SECTOR_SIZE {
        return SectorParse::Invalid(SectorDamage::BadMagic);
    }
    if crate::tag::is_zero(s) {
        return SectorParse::Empty;
    }
    if s[..CRC_AT] != SECTOR_MAGIC {
        return SectorParse::Invalid(SectorDamage::BadMagic);
    }
    let stored = le32(s, CRC_AT);
    let computed = sector_checksum(s, uuid, id);
    if stored != computed {
        return SectorParse::Invalid(SectorDamage::Checksum { stored, computed });
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
                SectorParse::Invalid(SectorDamage::Checksum { .. })
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
    fn every_bit_flip_is_detected() {
        let mut s = vec![0u8; SECTOR_SIZE];
        encode_sector(&mut s, &U, id(1, 0, 1), 4, &tags(40, 9));
        for byte in 0..SECTOR_SIZE {
            for bit in 0..8 {
                let mut c = s.clone();
                c[byte] ^= 1 << bit;
                assert!(
                    matches!(decode_sector(&c, &U, id(1, 0, 1), 40, 8), SectorParse::Invalid(_)),
                    "flip of byte {byte} bit {bit} accepted"
                );
            }
        }
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
        // Re-seal as if written to slot 1: the checksum matches, the parity does not.
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
