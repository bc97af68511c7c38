//! Where every block and tag lives: pure arithmetic over the superblock's sizes.

use super::map::MapKind;
use super::superblock::SB_REGION;
use crate::cast::{u32_of, u32_of_small, usize_of};
use serde::Serialize;

/// Why a requested layout cannot exist.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum GeometryError {
    /// Block size not a power of two in 512..=65536.
    #[error("block size {0} is not a power of two between 512 and 65536")]
    BlockSize(u32),
    /// Size zero or not a multiple of the block size.
    #[error("volume size {size} is not a positive multiple of the block size {block_size}")]
    Size {
        /// The requested size in bytes.
        size: u64,
        /// The block size it must be a multiple of.
        block_size: u32,
    },
    /// The layout would exceed what 64-bit offsets can address.
    #[error("volume size {0} is too large")]
    TooLarge(u64),
    /// Not even one data block fits in the backend.
    #[error("{len} bytes are too small for a volume with {block_size}-byte blocks")]
    TooSmall {
        /// The backend's length in bytes.
        len: u64,
        /// The requested block size.
        block_size: u32,
    },
    /// A requested group size outside 1 ..= the tags a metadata block holds.
    #[error("{group_blocks} blocks per group: a metadata block holds 1 to {max} tags")]
    GroupBlocks {
        /// The requested blocks per group.
        group_blocks: u32,
        /// The most a metadata block can cover.
        max: u32,
    },
    /// A journal length that is not a multiple of 4 KiB and of the block size, or too
    /// small to hold its two checkpoints and one segment of one block.
    #[error("journal size {len}: {why}")]
    Journal {
        /// The requested journal length in bytes.
        len: u64,
        /// What is wrong with it.
        why: String,
    },
    /// The tag does not leave room for at least one tag per metadata block.
    #[error("tag size {tag_size} does not fit a {block_size}-byte metadata block")]
    TagSize {
        /// The profile's tag size in bytes.
        tag_size: usize,
        /// The block size, which is also the metadata block's.
        block_size: u32,
    },
}

/// The layout of a volume, derived from the superblock.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
pub struct Geometry {
    /// Logical block size in bytes (data and metadata blocks alike).
    pub block_size: u32,
    /// Bytes per stored tag.
    pub tag_size: u32,
    /// Data blocks covered by one group's metadata block.
    pub group_blocks: u32,
    /// Number of data blocks in the volume.
    pub data_blocks: u64,
    /// Number of groups (the last one may hold fewer than `group_blocks`).
    pub groups: u64,
    /// Byte offset of group 0.
    pub first_group_offset: u64,
    /// Byte offset of the backup superblock region.
    pub backup_sb_offset: u64,
    /// Length of the backend the layout needs, in bytes.
    pub backing_len: u64,
    /// Bytes of the journal area (`journal` mode; zero otherwise), between the head copies
    /// of the group bitmaps and group 0.
    pub journal_len: u64,
}

/// Where one data block and its tags live on the backend.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
pub struct BlockLocation {
    /// Data block number.
    pub block: u64,
    /// Group holding it.
    pub group: u64,
    /// Index of its tag inside the group's metadata blocks.
    pub index: u32,
    /// Byte offset of the data block.
    pub data_offset: u64,
    /// Byte offsets of the two brother metadata blocks.
    pub meta_offsets: [u64; 2],
    /// Byte offset of its tag inside each metadata block.
    pub tag_offset_in_meta: u32,
}

/// Metadata blocks per group: the two brothers.
pub(crate) const META_PER_GROUP: u64 = 2;

/// Sectors of each group bitmap for `groups` groups.
fn map_sectors(groups: u64) -> u64 {
    groups.div_ceil(super::GROUPS_PER_MAP_SECTOR)
}

/// The group bitmaps (written, dirty, first-write).
const MAP_KINDS: u64 = 3;

/// Bytes of one copy's region of one bitmap: its sectors rounded up to 4 KiB.
fn map_region_len(groups: u64) -> Option<u64> {
    align_up(
        map_sectors(groups).checked_mul(super::SECTOR_SIZE as u64)?,
        SB_REGION,
    )
}

/// The largest block count below `limit` that `fits` lays out (`fits` is monotone in it:
/// the layout's end grows with the count), by bisection.
fn largest_fitting(limit: u64, fits: &dyn Fn(u64) -> Option<Geometry>) -> Option<Geometry> {
    fits(1)?;
    let (mut lo, mut hi) = (1u64, limit.max(2));
    // Invariant: fits(lo); !fits(hi) (or hi is past anything that could fit).
    while hi - lo > 1 {
        let mid = lo + (hi - lo) / 2;
        if fits(mid).is_some() {
            lo = mid;
        } else {
            hi = mid;
        }
    }
    fits(lo)
}

/// Smallest journal: two 4 KiB checkpoint regions and room for several segments.
pub const MIN_JOURNAL_LEN: u64 = 64 * 1024;

/// A journal length is zero (no journal) or a multiple of 4 KiB and of the block size, at
/// least [`MIN_JOURNAL_LEN`], and with a log whose quarter (a segment's most, rounded down to
/// whole blocks) holds a descriptor of one entry of the largest tag and one data block: every
/// journal admits a one-block write.
fn check_journal_len(len: u64, block_size: u32) -> Result<(), GeometryError> {
    let bs = u64::from(block_size);
    let one_block =
        (super::SECTOR_SIZE as u64 + 16 + crate::tag::MAX_TAG_SIZE as u64).next_multiple_of(bs) + bs;
    // The smallest log whose quarter, in whole blocks, holds `one_block`.
    let min_log = 4 * one_block;
    let min = MIN_JOURNAL_LEN.max((2 * SB_REGION + min_log).next_multiple_of(bs.max(SB_REGION)));
    let why = if len == 0 {
        return Ok(());
    } else if !len.is_multiple_of(SB_REGION) || !len.is_multiple_of(bs) {
        format!("not a multiple of 4096 and of the block size {block_size}")
    } else if len < min {
        format!("smaller than the minimum of {min} bytes for {block_size}-byte blocks")
    } else {
        return Ok(());
    };
    Err(GeometryError::Journal { len, why })
}

fn align_up(x: u64, a: u64) -> Option<u64> {
    Some(x.checked_add(a - 1)? / a * a)
}

impl Geometry {
    /// Tags that fit in one metadata block of `block_size` bytes: a row of 512-byte sectors,
    /// each holding [`super::tags_per_sector`] tags after its own header.
    pub fn tags_per_meta(block_size: u32, tag_size: usize) -> Result<u32, GeometryError> {
        if tag_size == 0 || tag_size > crate::tag::MAX_TAG_SIZE {
            return Err(GeometryError::TagSize { tag_size, block_size });
        }
        let sectors = block_size as usize / super::SECTOR_SIZE;
        let n = sectors * super::tags_per_sector(tag_size);
        if n == 0 {
            return Err(GeometryError::TagSize { tag_size, block_size });
        }
        u32::try_from(n).map_err(|_| GeometryError::TagSize { tag_size, block_size })
    }

    /// The layout for a volume of `size` logical bytes, stored in a backend whose length is
    /// then exactly `backing_len` (used when formatting a file).
    pub fn for_size(size: u64, block_size: u32, tag_size: usize) -> Result<Geometry, GeometryError> {
        Self::for_size_with_groups(size, block_size, tag_size, None)
    }

    /// [`Geometry::for_size`] with `group_blocks` data blocks per group instead of as many as
    /// a metadata block holds (smaller groups: more metadata, more groups).
    pub fn for_size_with_groups(
        size: u64,
        block_size: u32,
        tag_size: usize,
        group_blocks: Option<u32>,
    ) -> Result<Geometry, GeometryError> {
        Self::check_block_size(block_size)?;
        if size == 0 || !size.is_multiple_of(u64::from(block_size)) {
            return Err(GeometryError::Size { size, block_size });
        }
        let max = Self::tags_per_meta(block_size, tag_size)?;
        let group_blocks = match group_blocks {
            None => max,
            Some(n) if (1..=max).contains(&n) => n,
            Some(n) => return Err(GeometryError::GroupBlocks { group_blocks: n, max }),
        };
        let data_blocks = size / u64::from(block_size);
        let g = Self::build(block_size, tag_size, group_blocks, data_blocks, None, 0)
            .ok_or(GeometryError::TooLarge(size))?;
        Ok(g)
    }

    /// This layout with a journal area of `journal_len` bytes (zero: none) inserted before
    /// group 0, for `size` logical bytes (the backend grows by the journal) or, when
    /// `fixed_len` is given, for as many blocks as still fit that backend length with the
    /// journal in it.
    pub fn with_journal(&self, journal_len: u64, fixed_len: Option<u64>) -> Result<Geometry, GeometryError> {
        check_journal_len(journal_len, self.block_size)?;
        let build = |d: u64| {
            Self::build(
                self.block_size,
                self.tag_size as usize,
                self.group_blocks,
                d,
                fixed_len,
                journal_len,
            )
        };
        match fixed_len {
            None => build(self.data_blocks).ok_or(GeometryError::TooLarge(self.size())),
            Some(len) => {
                let too_small = GeometryError::TooSmall {
                    len,
                    block_size: self.block_size,
                };
                largest_fitting(self.data_blocks + 1, &build).ok_or(too_small)
            }
        }
    }

    /// The largest layout that fits a backend of fixed length `len` (a block device).
    pub fn for_backing_len(len: u64, block_size: u32, tag_size: usize) -> Result<Geometry, GeometryError> {
        Self::check_block_size(block_size)?;
        let group_blocks = Self::tags_per_meta(block_size, tag_size)?;
        let too_small = GeometryError::TooSmall { len, block_size };
        // The layout's end grows with the number of blocks (the written-groups map before group
        // 0 grows with the groups), so the largest count that fits is found by bisection:
        // `build` is monotone in it.
        let fits = |d: u64| Self::build(block_size, tag_size, group_blocks, d, Some(len), 0);
        largest_fitting(len / u64::from(block_size) + 1, &fits).ok_or(too_small)
    }

    /// Rebuilds the layout recorded in a superblock; `None` if the numbers are inconsistent.
    pub fn from_parts(
        block_size: u32,
        tag_size: usize,
        group_blocks: u32,
        data_blocks: u64,
        backing_len: u64,
        journal_len: u64,
    ) -> Option<Geometry> {
        Self::check_block_size(block_size).ok()?;
        if group_blocks == 0 || group_blocks > Self::tags_per_meta(block_size, tag_size).ok()? {
            return None;
        }
        check_journal_len(journal_len, block_size).ok()?;
        Self::build(
            block_size,
            tag_size,
            group_blocks,
            data_blocks,
            Some(backing_len),
            journal_len,
        )
    }

    fn check_block_size(block_size: u32) -> Result<(), GeometryError> {
        if !block_size.is_power_of_two() || !(512..=65536).contains(&block_size) {
            return Err(GeometryError::BlockSize(block_size));
        }
        Ok(())
    }

    /// Lays out `data_blocks`; with `fixed_len`, the backup superblock sits in the last 4 KiB
    /// of that length and the data must end before it. A journal of `journal_len` bytes
    /// (already checked) sits between the head map copies and group 0.
    fn build(
        block_size: u32,
        tag_size: usize,
        group_blocks: u32,
        data_blocks: u64,
        fixed_len: Option<u64>,
        journal_len: u64,
    ) -> Option<Geometry> {
        if data_blocks == 0 {
            return None;
        }
        let bs = u64::from(block_size);
        let n = u64::from(group_blocks);
        let groups = data_blocks.div_ceil(n);
        // Map sectors are numbered with a `u32` (it seeds their checksums).
        u32::try_from(map_sectors(groups)).ok()?;
        // Each of the three group bitmaps has two copies, one in the head (after the primary
        // superblock) and one in the tail (before the backup superblock); every copy has a
        // 4 KiB-aligned region of its own, so no single 4 KiB write, torn or misdirected, can
        // reach two copies of one map or two maps' copies at once.
        let region = map_region_len(groups)?;
        let maps = region.checked_mul(MAP_KINDS)?;
        let journal_at = align_up(SB_REGION.checked_add(maps)?, bs)?;
        let first = align_up(journal_at.checked_add(journal_len)?, bs)?;
        let group_len = (META_PER_GROUP + n).checked_mul(bs)?;
        let last_blocks = data_blocks - (groups - 1) * n;
        let data_end = first
            .checked_add((groups - 1).checked_mul(group_len)?)?
            .checked_add((META_PER_GROUP + last_blocks).checked_mul(bs)?)?;
        // Files are addressed with signed 64-bit offsets.
        let max_len = i64::MAX as u64;
        let (backup, backing_len) = match fixed_len {
            None => {
                let backup = align_up(data_end, SB_REGION)?.checked_add(maps)?;
                (backup, backup.checked_add(SB_REGION)?)
            }
            Some(len) => {
                let backup = (len / SB_REGION * SB_REGION).checked_sub(SB_REGION)?;
                if data_end.checked_add(maps)? > backup {
                    return None;
                }
                (backup, len)
            }
        };
        if backing_len > max_len {
            return None;
        }
        Some(Geometry {
            block_size,
            tag_size: u32_of_small(tag_size),
            group_blocks,
            data_blocks,
            groups,
            first_group_offset: first,
            backup_sb_offset: backup,
            backing_len,
            journal_len,
        })
    }

    /// Byte offset of copy `copy` (0 or 1) of group bitmap `kind`. The head copies follow the
    /// primary superblock in the order written, dirty, first-write; the tail copies end right
    /// before the backup superblock in the same order. Each copy starts on a 4 KiB boundary
    /// and owns [`Geometry::map_region_len`] bytes.
    pub fn map_offset(&self, kind: MapKind, copy: usize) -> u64 {
        debug_assert!(copy < 2);
        let region = self.map_region_len();
        let k = kind.ordinal();
        if copy == 0 {
            SB_REGION + k * region
        } else {
            self.backup_sb_offset - (MAP_KINDS - k) * region
        }
    }

    /// Bytes reserved for one copy of one group bitmap: its sectors, rounded up to 4 KiB.
    pub fn map_region_len(&self) -> u64 {
        (map_sectors(self.groups) * super::SECTOR_SIZE as u64).next_multiple_of(SB_REGION)
    }

    /// 512-byte sectors of each group bitmap.
    pub fn map_sectors(&self) -> u64 {
        map_sectors(self.groups)
    }

    /// Map sector holding `group`'s bit, and the bit's position in it.
    pub fn map_position(&self, group: u64) -> (u32, u64) {
        let per = super::GROUPS_PER_MAP_SECTOR;
        (u32_of(group / per), group % per)
    }

    /// Byte offset of the journal area (meaningful when `journal_len` is not zero): right
    /// after the head copies of the group bitmaps, block-aligned; group 0 follows it.
    pub fn journal_offset(&self) -> u64 {
        self.first_group_offset - self.journal_len
    }

    /// Logical size in bytes.
    pub fn size(&self) -> u64 {
        self.data_blocks * u64::from(self.block_size)
    }

    /// Bytes one group occupies (metadata and data).
    pub fn group_len(&self) -> u64 {
        (META_PER_GROUP + u64::from(self.group_blocks)) * u64::from(self.block_size)
    }

    /// Data blocks in group `group` (all but the last are full).
    pub fn blocks_in_group(&self, group: u64) -> u32 {
        debug_assert!(group < self.groups);
        if group + 1 < self.groups {
            self.group_blocks
        } else {
            u32_of(self.data_blocks - group * u64::from(self.group_blocks))
        }
    }

    /// Byte offset of brother `slot` (0 or 1) of `group`.
    pub fn meta_offset(&self, group: u64, slot: usize) -> u64 {
        debug_assert!(group < self.groups && slot < 2);
        self.first_group_offset + group * self.group_len() + slot as u64 * u64::from(self.block_size)
    }

    /// Byte offset of data block `block`.
    pub fn data_offset(&self, block: u64) -> u64 {
        debug_assert!(block < self.data_blocks);
        let n = u64::from(self.group_blocks);
        let (g, i) = (block / n, block % n);
        self.first_group_offset + g * self.group_len() + (META_PER_GROUP + i) * u64::from(self.block_size)
    }

    /// Group of data block `block` and the block's index in it.
    pub fn group_of(&self, block: u64) -> (u64, u32) {
        let n = u64::from(self.group_blocks);
        (block / n, u32_of(block % n))
    }

    /// First data block of `group`.
    pub fn first_block(&self, group: u64) -> u64 {
        group * u64::from(self.group_blocks)
    }

    /// Everything about where `block` lives, for `dump` and the tests.
    pub fn locate(&self, block: u64) -> Option<BlockLocation> {
        if block >= self.data_blocks {
            return None;
        }
        let (group, index) = self.group_of(block);
        Some(BlockLocation {
            block,
            group,
            index,
            data_offset: self.data_offset(block),
            meta_offsets: [self.meta_offset(group, 0), self.meta_offset(group, 1)],
            tag_offset_in_meta: self.tag_offset(index),
        })
    }

    /// Tags per 512-byte metadata sector.
    pub fn tags_per_sector(&self) -> u32 {
        u32_of_small(super::tags_per_sector(self.tag_size as usize))
    }

    /// 512-byte sectors per metadata block: the number of brother pairs of a group.
    pub fn sectors_per_meta(&self) -> u32 {
        self.block_size / u32_of_small(super::SECTOR_SIZE)
    }

    /// Tags held by sector `sector` of `group`'s metadata blocks (0 for sectors past the
    /// group's last block).
    pub fn tags_in_sector(&self, group: u64, sector: u32) -> usize {
        let per = u64::from(self.tags_per_sector());
        let blocks = u64::from(self.blocks_in_group(group));
        usize_of(blocks.saturating_sub(u64::from(sector) * per).min(per))
    }

    /// Byte offset of the tag of the block with `index` in its group, inside a metadata block.
    pub fn tag_offset(&self, index: u32) -> u32 {
        let per = self.tags_per_sector();
        (index / per) * u32_of_small(super::SECTOR_SIZE)
            + u32_of_small(super::SECTOR_HEADER_SIZE)
            + (index % per) * self.tag_size
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn default_geometry_has_496_blocks_per_group() {
        let g = Geometry::for_size(1 << 30, 4096, 8).unwrap();
        assert_eq!(g.group_blocks, 496, "8 sectors of 62 tags");
        assert_eq!(g.data_blocks, 262_144);
        assert_eq!(g.groups, 262_144u64.div_ceil(496));
        // The superblock region, then a 4 KiB region per map (one sector used in each).
        assert_eq!(g.map_sectors(), 1);
        assert_eq!(g.map_region_len(), 4096);
        assert_eq!(g.map_offset(MapKind::Written, 0), 4096);
        assert_eq!(g.map_offset(MapKind::Dirty, 0), 8192);
        assert_eq!(g.map_offset(MapKind::FirstWrite, 0), 12288);
        assert_eq!(g.map_offset(MapKind::FirstWrite, 1), g.backup_sb_offset - 4096);
        assert_eq!(g.map_offset(MapKind::Written, 1), g.backup_sb_offset - 3 * 4096);
        assert!(g.data_offset(g.data_blocks - 1) + 4096 <= g.map_offset(MapKind::Written, 1));
        assert_eq!(g.first_group_offset, 16384);
        assert_eq!(g.data_offset(0), 16384 + 2 * 4096);
        assert_eq!(g.data_offset(496), 16384 + 498 * 4096 + 2 * 4096);
        assert_eq!(g.tag_offset(0), 16);
        assert_eq!(g.tag_offset(61), 16 + 61 * 8);
        assert_eq!(g.tag_offset(62), 512 + 16);
        assert_eq!(g.tag_offset(495), 7 * 512 + 16 + 61 * 8);
        assert_eq!(g.tags_in_sector(0, 7), 62);
        let last = g.groups - 1;
        let in_last = g.blocks_in_group(last) as usize;
        let total: usize = (0..8).map(|k| g.tags_in_sector(last, k)).sum();
        assert_eq!(total, in_last);
        let small = Geometry::for_size(512 * 100, 512, 8).unwrap();
        assert_eq!(small.group_blocks, 62);
        assert_eq!(g.backing_len, g.backup_sb_offset + 4096);
        assert!(g.data_offset(g.data_blocks - 1) + 4096 <= g.backup_sb_offset);
    }

    #[test]
    fn blocks_never_overlap_metadata_or_superblocks() {
        for bs in [512u32, 4096] {
            let g = Geometry::for_size(u64::from(bs) * 1000, bs, 8).unwrap();
            let mut regions: Vec<(u64, u64)> = vec![(0, SB_REGION), (g.backup_sb_offset, g.backing_len)];
            for kind in [MapKind::Written, MapKind::Dirty, MapKind::FirstWrite] {
                for copy in 0..2 {
                    let at = g.map_offset(kind, copy);
                    assert_eq!(at % 4096, 0, "{kind:?} copy {copy} is not 4 KiB-aligned");
                    assert!(g.map_sectors() * 512 <= g.map_region_len());
                    regions.push((at, at + g.map_region_len()));
                }
            }
            for gr in 0..g.groups {
                for s in 0..2 {
                    regions.push((g.meta_offset(gr, s), g.meta_offset(gr, s) + u64::from(bs)));
                }
            }
            for b in 0..g.data_blocks {
                regions.push((g.data_offset(b), g.data_offset(b) + u64::from(bs)));
            }
            regions.sort_unstable();
            for w in regions.windows(2) {
                assert!(w[0].1 <= w[1].0, "overlap {w:?}");
            }
        }
    }

    #[test]
    fn backing_len_layout_fits_and_is_maximal() {
        for len in [64 * 1024u64, 1 << 20, (1 << 30) + 12345, 10 * 4096 + 511] {
            for bs in [512u32, 4096] {
                let Ok(g) = Geometry::for_backing_len(len, bs, 8) else {
                    continue;
                };
                assert!(g.backing_len == len);
                assert!(
                    g.data_offset(g.data_blocks - 1) + u64::from(bs) <= g.map_offset(MapKind::Written, 1)
                );
                assert!(Geometry::build(bs, 8, g.group_blocks, g.data_blocks + 1, Some(len), 0).is_none());
            }
        }
        assert!(Geometry::for_backing_len(8192, 4096, 8).is_err());
    }

    #[test]
    fn map_sector_numbers_fit_a_u32() {
        // One 512-byte block per group: a map sector covers that many blocks.
        let per = crate::format::GROUPS_PER_MAP_SECTOR;
        let fits = u64::from(u32::MAX) * per * 512;
        assert_eq!(
            Geometry::for_size_with_groups(fits, 512, 8, Some(1)).map(|g| g.map_sectors()),
            Ok(u64::from(u32::MAX))
        );
        let size = fits + 512;
        assert_eq!(
            Geometry::for_size_with_groups(size, 512, 8, Some(1)),
            Err(GeometryError::TooLarge(size))
        );
    }

    #[test]
    fn bad_sizes_are_refused() {
        assert!(Geometry::for_size(0, 4096, 8).is_err());
        assert!(Geometry::for_size(4097, 4096, 8).is_err());
        assert!(Geometry::for_size(4096, 1000, 8).is_err());
        assert!(Geometry::for_size(u64::MAX / 4096 * 4096, 4096, 8).is_err());
    }
}
