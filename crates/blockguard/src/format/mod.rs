//! The on-disk format, version 3 (documented byte by byte in `docs/FORMAT.md`).
//!
//! A volume is: a superblock region at offset 0, then groups of
//! `[brother 0][brother 1][data block × N]`, and a backup superblock in the backend's last
//! 4 KiB. Each brother is a row of 512-byte metadata sectors that validate on their own
//! (`meta.rs`). All integers are little-endian.

mod geometry;
pub mod journal;
mod map;
mod meta;
mod mirror;
mod superblock;

pub use geometry::{BlockLocation, Geometry, GeometryError, MIN_JOURNAL_LEN};
pub use map::{
    decode_map_sector, empty_map_sector, groups_in_map_sector, map_bit, map_checksum, seal_map_sector,
    MapDamage, MapKind, MapParse, GROUPS_PER_MAP_SECTOR, MAP_MAGIC,
};
pub use meta::{
    decode_sector, encode_sector, header_check, sector_checksum, sector_tag, slot_of_generation,
    tags_per_sector, SectorDamage, SectorId, SectorParse, SECTOR_HEADER_SIZE, SECTOR_SIZE,
};
pub use mirror::{
    member_record_offset, MemberInfo, MemberRecord, MirrorInfo, INCOMPAT_MIRROR, MAX_MEMBERS,
    MAX_MEMBER_PATH, MEMBER_MAGIC,
};
pub use superblock::{
    profile_incompat, tags_incompat, validate_label, ErrorPolicy, Mode, Retag, Superblock, SuperblockError,
    VolumeState, FORMAT_VERSION, INCOMPAT_JOURNAL, INCOMPAT_META_DEVICE, INCOMPAT_REBUILD, INCOMPAT_RETAG,
    INCOMPAT_TAG_PROFILE, INCOMPAT_TAG_ROOM, SB_MAGIC, SB_REGION, SB_STRUCT_SIZE, SUPPORTED_INCOMPAT,
    SUPPORTED_RO_COMPAT, TAG_SLOT_SIZES,
};

/// Reads a little-endian `u16` at `at`. Callers pass in-bounds offsets of fixed layouts.
pub(crate) fn le16(b: &[u8], at: usize) -> u16 {
    u16::from_le_bytes([b[at], b[at + 1]])
}

/// Reads a little-endian `u32` at `at`.
pub(crate) fn le32(b: &[u8], at: usize) -> u32 {
    u32::from_le_bytes([b[at], b[at + 1], b[at + 2], b[at + 3]])
}

/// Reads a little-endian `u64` at `at`.
pub(crate) fn le64(b: &[u8], at: usize) -> u64 {
    let mut x = [0u8; 8];
    x.copy_from_slice(&b[at..at + 8]);
    u64::from_le_bytes(x)
}
