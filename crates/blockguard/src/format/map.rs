//! The written-groups map: one bit per group, set (durably, before the group's first data) when
//! the group is first written and never cleared.
//!
//! Why: a group that was never written has all-zero metadata and reads as zeros. A single write
//! of zeros misdirected onto a group's two metadata blocks (and the data blocks after them)
//! would make a written group look exactly like that — its data silently gone. The map, kept
//! apart from the groups, remembers that the group was written, so such a group is reported
//! damaged instead. The map is kept in 512-byte sectors that validate on their own, rewritten
//! in place (a sector is written atomically; bits only ever go from 0 to 1).

use super::le32;
use super::meta::{SECTOR_HEADER_SIZE, SECTOR_SIZE};
use std::fmt;

/// Magic at byte 0 of every map sector: `"BGWM"` (blockguard written map).
pub const MAP_MAGIC: [u8; 4] = *b"BGWM";
/// Groups one map sector covers: one bit each after the 16-byte header.
pub const GROUPS_PER_MAP_SECTOR: u64 = ((SECTOR_SIZE - SECTOR_HEADER_SIZE) * 8) as u64;
const CRC_AT: usize = 4;

/// Why a map sector is not valid (never a crash's doing: sectors are written whole).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum MapDamage {
    /// Not zero, and no map magic.
    BadMagic,
    /// The checksum does not match.
    Checksum {
        /// Stored.
        stored: u32,
        /// Computed.
        computed: u32,
    },
    /// Reserved header bytes, or bits past the volume's last group, are set.
    StrayBits,
}

impl fmt::Display for MapDamage {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            MapDamage::BadMagic => f.write_str("not a map sector (no magic)"),
            MapDamage::Checksum { stored, computed } => write!(
                f,
                "checksum mismatch (stored {stored:#010x}, computed {computed:#010x})"
            ),
            MapDamage::StrayBits => f.write_str("bits set outside the volume's groups"),
        }
    }
}

/// What a map sector on disk turned out to be.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum MapParse {
    /// All zero: no group it covers was ever written (format does not write the map).
    Empty,
    /// Valid; its bits are at bytes 16.. of the sector.
    Valid,
    /// Damaged, misplaced or foreign.
    Invalid(MapDamage),
}

/// The checksum of map sector `index`: crc32c seeded with `uuid ‖ "WMAP" ‖ u32le(index)`, over
/// the sector with its checksum field read as zero.
pub fn map_checksum(s: &[u8], uuid: &[u8; 16], index: u32) -> u32 {
    debug_assert_eq!(s.len(), SECTOR_SIZE);
    let mut seed = [0u8; 24];
    seed[..16].copy_from_slice(uuid);
    seed[16..20].copy_from_slice(b"WMAP");
    seed[20..24].copy_from_slice(&index.to_le_bytes());
    let c = crc32c::crc32c_append(crc32c::crc32c(&seed), &s[..CRC_AT]);
    let c = crc32c::crc32c_append(c, &[0u8; 4]);
    crc32c::crc32c_append(c, &s[CRC_AT + 4..])
}

/// Groups covered by map sector `index` of a volume of `groups` groups.
pub fn groups_in_map_sector(index: u32, groups: u64) -> u64 {
    groups
        .saturating_sub(index as u64 * GROUPS_PER_MAP_SECTOR)
        .min(GROUPS_PER_MAP_SECTOR)
}

/// Parses map sector `index` of a volume of `groups` groups. Never panics.
pub fn decode_map_sector(s: &[u8], uuid: &[u8; 16], index: u32, groups: u64) -> MapParse {
    if s.len() != SECTOR_SIZE {
        return MapParse::Invalid(MapDamage::BadMagic);
    }
    if crate::tag::is_zero(s) {
        return MapParse::Empty;
    }
    if s[..CRC_AT] != MAP_MAGIC {
        return MapParse::Invalid(MapDamage::BadMagic);
    }
    let stored = le32(s, CRC_AT);
    let computed = map_checksum(s, uuid, index);
    if stored != computed {
        return MapParse::Invalid(MapDamage::Checksum { stored, computed });
    }
    let n = groups_in_map_sector(index, groups);
    let stray_header = !crate::tag::is_zero(&s[8..SECTOR_HEADER_SIZE]);
    let stray_bits = (n..GROUPS_PER_MAP_SECTOR).any(|i| map_bit(s, i));
    if stray_header || stray_bits {
        return MapParse::Invalid(MapDamage::StrayBits);
    }
    MapParse::Valid
}

/// Bit `i` (the `i`-th group the sector covers) of a map sector.
pub fn map_bit(s: &[u8], i: u64) -> bool {
    let byte = SECTOR_HEADER_SIZE + (i / 8) as usize;
    s[byte] & (1 << (i % 8)) != 0
}

/// Encodes map sector `index` in place: sets the bits `set` (group positions inside the
/// sector), keeps the bits already in `s` (which must be a valid or empty sector), and seals it.
///
/// # Panics
/// If `s` is not one sector or a position lies outside the sector: writing such a sector would
/// corrupt the map.
pub fn seal_map_sector(s: &mut [u8], uuid: &[u8; 16], index: u32, set: &[u64]) {
    assert_eq!(s.len(), SECTOR_SIZE, "a map sector is {SECTOR_SIZE} bytes");
    for &i in set {
        assert!(i < GROUPS_PER_MAP_SECTOR, "map bit {i} outside the sector");
        s[SECTOR_HEADER_SIZE + (i / 8) as usize] |= 1 << (i % 8);
    }
    s[..CRC_AT].copy_from_slice(&MAP_MAGIC);
    s[8..SECTOR_HEADER_SIZE].fill(0);
    let crc = map_checksum(s, uuid, index);
    s[CRC_AT..CRC_AT + 4].copy_from_slice(&crc.to_le_bytes());
}

#[cfg(test)]
mod tests {
    use super::*;

    const U: [u8; 16] = [9; 16];

    #[test]
    fn roundtrip_bits_and_binding() {
        let mut s = vec![0u8; SECTOR_SIZE];
        assert_eq!(decode_map_sector(&s, &U, 0, 100), MapParse::Empty);
        seal_map_sector(&mut s, &U, 2, &[0, 7, 99]);
        assert_eq!(
            decode_map_sector(&s, &U, 2, 2 * GROUPS_PER_MAP_SECTOR + 100),
            MapParse::Valid
        );
        assert!(map_bit(&s, 0) && map_bit(&s, 7) && map_bit(&s, 99) && !map_bit(&s, 1));
        // Another index or volume: refused.
        assert!(matches!(
            decode_map_sector(&s, &U, 3, 4 * GROUPS_PER_MAP_SECTOR),
            MapParse::Invalid(MapDamage::Checksum { .. })
        ));
        assert!(matches!(
            decode_map_sector(&s, &[1; 16], 2, 3 * GROUPS_PER_MAP_SECTOR),
            MapParse::Invalid(_)
        ));
        // A bit for a group the volume does not have.
        assert_eq!(
            decode_map_sector(&s, &U, 2, 2 * GROUPS_PER_MAP_SECTOR + 50),
            MapParse::Invalid(MapDamage::StrayBits)
        );
        // Setting more keeps the old bits.
        seal_map_sector(&mut s, &U, 2, &[1]);
        assert!(map_bit(&s, 0) && map_bit(&s, 1) && map_bit(&s, 99));
        assert_eq!(GROUPS_PER_MAP_SECTOR, 3968);
    }

    #[test]
    fn every_bit_flip_is_detected() {
        let mut s = vec![0u8; SECTOR_SIZE];
        seal_map_sector(&mut s, &U, 0, &[3, 4, 5]);
        for byte in 0..SECTOR_SIZE {
            for bit in 0..8 {
                let mut c = s.clone();
                c[byte] ^= 1 << bit;
                assert!(
                    matches!(
                        decode_map_sector(&c, &U, 0, GROUPS_PER_MAP_SECTOR),
                        MapParse::Invalid(_)
                    ),
                    "flip of byte {byte} bit {bit} accepted"
                );
            }
        }
    }
}
