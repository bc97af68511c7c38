//! The three group bitmaps, one bit per group each, kept in 512-byte sectors that validate on
//! their own and are rewritten in place (a sector is written atomically). Each map has two
//! copies, one after the primary superblock and one before the backup, each in a 4 KiB-aligned
//! region of its own (see [`super::Geometry::map_offset`]); a reader merges the bits of the
//! valid copies.
//!
//! - the **written-groups map**: a group's bit is set, durably before any of its data, when
//!   the group is first written, and never cleared. A group that was never written has
//!   all-zero metadata; a write of zeros misdirected onto a written group's metadata (and its
//!   data) would make it look exactly like that. The map, kept apart from the groups,
//!   remembers, so such a group is reported damaged instead.
//! - the **dirty-groups map**: a group's bit is set, and flushed, before a commit first writes
//!   the group's metadata, and cleared once everything written to it is durable. After a crash
//!   only the groups it marks may hold a brother describing data that never landed; every
//!   other group is read with the strict rules, and recovery visits only them.
//! - the **first-write map**: like the dirty map, for the groups whose *first* write happened
//!   since the last clearing. Only they may have blank sectors a crash explains; a blank sector
//!   anywhere else is damage, even in a dirty group.
//!
//! Format writes every sector of every copy (all bits clear), so an all-zero sector is damage.

use super::le32;
use super::meta::{SECTOR_HEADER_SIZE, SECTOR_SIZE};
use std::fmt;

/// Which bitmap a sector belongs to.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum MapKind {
    /// The written-groups map.
    Written,
    /// The dirty-groups map.
    Dirty,
    /// The first-write map.
    FirstWrite,
}

impl MapKind {
    /// Magic at byte 0 of the map's sectors: `"BGWM"` or `"BGDM"`.
    pub const fn magic(self) -> [u8; 4] {
        match self {
            MapKind::Written => *b"BGWM",
            MapKind::Dirty => *b"BGDM",
            MapKind::FirstWrite => *b"BGFM",
        }
    }

    /// The map's place in the layout's order (written, dirty, first-write).
    pub const fn ordinal(self) -> u64 {
        match self {
            MapKind::Written => 0,
            MapKind::Dirty => 1,
            MapKind::FirstWrite => 2,
        }
    }

    /// The four bytes that name the map in its sectors' checksum seed.
    const fn seed(self) -> [u8; 4] {
        match self {
            MapKind::Written => *b"WMAP",
            MapKind::Dirty => *b"DMAP",
            MapKind::FirstWrite => *b"FMAP",
        }
    }
}

/// Magic of the written-groups map's sectors.
pub const MAP_MAGIC: [u8; 4] = MapKind::Written.magic();
/// Groups one map sector covers: one bit each after the 16-byte header.
pub const GROUPS_PER_MAP_SECTOR: u64 = ((SECTOR_SIZE - SECTOR_HEADER_SIZE) * 8) as u64;
const CRC_AT: usize = 4;

/// Why a map sector is not valid (never a crash's doing: sectors are written whole).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[non_exhaustive]
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
    /// All zero: format writes every map sector, so a blank one was wiped.
    Wiped,
    /// Valid, but lacks groups the other copy marks (both copies get every bit before anything
    /// depends on it, so this copy missed a write).
    Behind,
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
            MapDamage::Wiped => f.write_str("blank (wiped)"),
            MapDamage::Behind => f.write_str("valid, but lacks groups the other copy marks"),
        }
    }
}

/// What a map sector on disk turned out to be.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum MapParse {
    /// All zero. Format writes every map sector, so this is damage (wiped), not "nothing set".
    Empty,
    /// Valid; its bits are at bytes 16.. of the sector.
    Valid,
    /// Damaged, misplaced or foreign.
    Invalid(MapDamage),
}

/// The checksum of sector `index` of map `kind`: crc32c seeded with
/// `uuid ‖ "WMAP" or "DMAP" ‖ u32le(index)`, over the sector with its checksum field read as zero.
pub fn map_checksum(s: &[u8], uuid: &[u8; 16], kind: MapKind, index: u32) -> u32 {
    debug_assert_eq!(s.len(), SECTOR_SIZE);
    let mut seed = [0u8; 24];
    seed[..16].copy_from_slice(uuid);
    seed[16..20].copy_from_slice(&kind.seed());
    seed[20..24].copy_from_slice(&index.to_le_bytes());
    let c = crc32c::crc32c_append(crc32c::crc32c(&seed), &s[..CRC_AT]);
    let c = crc32c::crc32c_append(c, &[0u8; 4]);
    crc32c::crc32c_append(c, &s[CRC_AT + 4..])
}

/// Groups covered by map sector `index` of a volume of `groups` groups.
pub fn groups_in_map_sector(index: u32, groups: u64) -> u64 {
    groups
        .saturating_sub(u64::from(index) * GROUPS_PER_MAP_SECTOR)
        .min(GROUPS_PER_MAP_SECTOR)
}

/// Parses sector `index` of map `kind` of a volume of `groups` groups. Never panics.
pub fn decode_map_sector(s: &[u8], uuid: &[u8; 16], kind: MapKind, index: u32, groups: u64) -> MapParse {
    if s.len() != SECTOR_SIZE {
        return MapParse::Invalid(MapDamage::BadMagic);
    }
    if crate::tag::is_zero(s) {
        return MapParse::Empty;
    }
    if s[..CRC_AT] != kind.magic() {
        return MapParse::Invalid(MapDamage::BadMagic);
    }
    let stored = le32(s, CRC_AT);
    let computed = map_checksum(s, uuid, kind, index);
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

/// A sealed sector of map `kind` with no bit set (what format writes).
pub fn empty_map_sector(uuid: &[u8; 16], kind: MapKind, index: u32) -> Vec<u8> {
    let mut s = vec![0u8; SECTOR_SIZE];
    seal_map_sector(&mut s, uuid, kind, index, &[]);
    s
}

/// Bit `i` (the `i`-th group the sector covers) of a map sector.
pub fn map_bit(s: &[u8], i: u64) -> bool {
    let byte = SECTOR_HEADER_SIZE + (i / 8) as usize;
    s[byte] & (1 << (i % 8)) != 0
}

/// Encodes sector `index` of map `kind` in place: sets the bits `set` (group positions inside
/// the sector), keeps the bits already in `s` (a valid or zeroed sector), and seals it.
///
/// # Panics
/// If `s` is not one sector or a position lies outside the sector: writing such a sector would
/// corrupt the map.
pub fn seal_map_sector(s: &mut [u8], uuid: &[u8; 16], kind: MapKind, index: u32, set: &[u64]) {
    assert_eq!(s.len(), SECTOR_SIZE, "a map sector is {SECTOR_SIZE} bytes");
    for &i in set {
        assert!(i < GROUPS_PER_MAP_SECTOR, "map bit {i} outside the sector");
        s[SECTOR_HEADER_SIZE + (i / 8) as usize] |= 1 << (i % 8);
    }
    s[..CRC_AT].copy_from_slice(&kind.magic());
    s[8..SECTOR_HEADER_SIZE].fill(0);
    let crc = map_checksum(s, uuid, kind, index);
    s[CRC_AT..CRC_AT + 4].copy_from_slice(&crc.to_le_bytes());
}

#[cfg(test)]
mod tests {
    use super::*;

    const U: [u8; 16] = [9; 16];

    #[test]
    fn roundtrip_bits_and_binding() {
        let w = MapKind::Written;
        let mut s = vec![0u8; SECTOR_SIZE];
        assert_eq!(decode_map_sector(&s, &U, w, 0, 100), MapParse::Empty);
        seal_map_sector(&mut s, &U, w, 2, &[0, 7, 99]);
        assert_eq!(
            decode_map_sector(&s, &U, w, 2, 2 * GROUPS_PER_MAP_SECTOR + 100),
            MapParse::Valid
        );
        // The other map's sector with the same bits is not this one's.
        assert!(matches!(
            decode_map_sector(&s, &U, MapKind::Dirty, 2, 3 * GROUPS_PER_MAP_SECTOR),
            MapParse::Invalid(MapDamage::BadMagic)
        ));
        assert!(map_bit(&s, 0) && map_bit(&s, 7) && map_bit(&s, 99) && !map_bit(&s, 1));
        // Another index or volume: refused.
        assert!(matches!(
            decode_map_sector(&s, &U, w, 3, 4 * GROUPS_PER_MAP_SECTOR),
            MapParse::Invalid(MapDamage::Checksum { .. })
        ));
        assert!(matches!(
            decode_map_sector(&s, &[1; 16], w, 2, 3 * GROUPS_PER_MAP_SECTOR),
            MapParse::Invalid(_)
        ));
        // A bit for a group the volume does not have.
        assert_eq!(
            decode_map_sector(&s, &U, w, 2, 2 * GROUPS_PER_MAP_SECTOR + 50),
            MapParse::Invalid(MapDamage::StrayBits)
        );
        // Setting more keeps the old bits.
        seal_map_sector(&mut s, &U, w, 2, &[1]);
        assert!(map_bit(&s, 0) && map_bit(&s, 1) && map_bit(&s, 99));
        assert_eq!(GROUPS_PER_MAP_SECTOR, 3968);
    }

    #[test]
    fn every_bit_flip_is_detected() {
        let mut s = vec![0u8; SECTOR_SIZE];
        seal_map_sector(&mut s, &U, MapKind::Dirty, 0, &[3, 4, 5]);
        for byte in 0..SECTOR_SIZE {
            for bit in 0..8 {
                let mut c = s.clone();
                c[byte] ^= 1 << bit;
                assert!(
                    matches!(
                        decode_map_sector(&c, &U, MapKind::Dirty, 0, GROUPS_PER_MAP_SECTOR),
                        MapParse::Invalid(_)
                    ),
                    "flip of byte {byte} bit {bit} accepted"
                );
            }
        }
    }
}
