//! Looking at a volume without changing it: allocation status (`extents`, NBD block status),
//! verification of every block (`check`), metadata damage, and where a block lives (`dump`).

use super::bitmaps::MapBit;
use super::group::{Accept, PairView};
use super::recover::{covered, MapProblem, MetadataProblem};
use super::stage::Staged;
use super::{BlockProblem, BlockReport, Extent, Inner, SlotReport};
use crate::cast::{u32_of_small, usize_of};
use crate::error::{Error, Result};
use crate::format::SectorParse;
use crate::format::{MapDamage, MapKind};
use blockguard_backend::Backend as _;

/// Groups whose allocation `extents` works out from one look at the stage and one query of
/// the backend's holes.
const EXTENT_CHUNK_GROUPS: u64 = 256;

impl Inner {
    /// Allocation status of a byte range, as runs of allocated and unwritten blocks.
    ///
    /// A block is reported unwritten (a hole that reads as zeros) only when that is proven:
    /// its metadata accepts nothing but "never written" (confirmed by a second read if it
    /// came from one), **and** the backend knows its data reads as zeros (a hole of a sparse
    /// file). Damaged metadata, ambiguous states and data the backend cannot vouch for are
    /// reported allocated, so a client copying the volume reads them — and sees an error where
    /// there is one — instead of copying zeros. A group whose whole region is a hole is
    /// reported unwritten without reading its metadata.
    pub(crate) fn extents(&self, offset: u64, len: u64) -> Result<Vec<Extent>> {
        self.check_range(offset, len)?;
        let mut out: Vec<Extent> = Vec::new();
        if len == 0 {
            return Ok(out);
        }
        let bs = u64::from(self.geo.block_size);
        let first = offset / bs;
        let last = (offset + len - 1) / bs;
        let mut push = |b: u64, allocated: bool| {
            let start = (b * bs).max(offset);
            let end = ((b + 1) * bs).min(offset + len);
            match out.last_mut() {
                Some(e) if e.allocated == allocated => e.len += end - start,
                _ => out.push(Extent {
                    offset: start,
                    len: end - start,
                    allocated,
                }),
            }
        };
        let mut block = first;
        while block <= last {
            let (group, _) = self.geo.group_of(block);
            let chunk_end = (group + EXTENT_CHUNK_GROUPS).min(self.geo.groups);
            let chunk_last = (self.geo.first_block(chunk_end - 1)
                + u64::from(self.geo.blocks_in_group(chunk_end - 1))
                - 1)
            .min(last);
            // In this order: the stage, then the backend's holes, then the metadata. A block
            // leaves the stage only once its data is written, so a block not staged at the first
            // look either had its data on disk before the second (no hole) or was not written
            // at all then; the answer is true at the moment of the first look.
            let chunk_first = block;
            let staged: Vec<Option<bool>> = {
                let stage = self.lock(&self.stage);
                (block..=chunk_last)
                    .map(|b| stage.get(b).map(|e| matches!(e, Staged::Data { .. })))
                    .collect()
            };
            let span_lo = self.geo.meta_offset(group, 0);
            let span_hi = self.geo.data_offset(chunk_last) + bs;
            let zeros = self
                .backend
                .zero_ranges(span_lo, span_hi - span_lo)
                .map_err(self.io_err("looking for unwritten regions", span_lo))?;
            while block <= chunk_last {
                let (group, _) = self.geo.group_of(block);
                let group_first = self.geo.first_block(group);
                let group_last = (group_first + u64::from(self.geo.blocks_in_group(group)) - 1).min(last);
                let mine = &staged[usize_of(block - chunk_first)..=usize_of(group_last - chunk_first)];
                self.group_extents(group, block, group_last, mine, &zeros, &mut push)?;
                block = group_last + 1;
            }
        }
        Ok(out)
    }

    /// The allocation of blocks `block..=group_last` of `group`, given what the stage held and
    /// the backend's holes (both looked at before the metadata).
    fn group_extents(
        &self,
        group: u64,
        block: u64,
        group_last: u64,
        staged: &[Option<bool>],
        zeros: &[std::ops::Range<u64>],
        push: &mut impl FnMut(u64, bool),
    ) -> Result<()> {
        let bs = u64::from(self.geo.block_size);
        let group_first = self.geo.first_block(group);
        let region = self.geo.meta_offset(group, 0)..self.geo.data_offset(group_last) + bs;
        if staged.iter().all(Option::is_none)
            && self.cached_group(group).is_none()
            && covered(zeros, region.start, region.end)
            && self.map_bit(group, true)? == MapBit::Clear
        {
            // Metadata and data are holes and the map does not remember a write: never
            // written, and every read returns zeros.
            (block..=group_last).for_each(|b| push(b, false));
            return Ok(());
        }
        let mut state = self.group(group)?;
        let data_zero = |b: u64| {
            let at = self.geo.data_offset(b);
            covered(zeros, at, at + bs)
        };
        let candidate = |state: &super::group::GroupState, b: u64| {
            state.accept(usize_of(b - group_first)).only_unwritten() && data_zero(b)
        };
        if state.unconfirmed()
            && (block..=group_last)
                .zip(staged)
                .any(|(b, s)| s.is_none() && candidate(&state, b))
        {
            // A hole is claimed on the metadata's word: never on a single read's.
            state = self.confirm(group, state)?;
        }
        for (b, staged) in (block..=group_last).zip(staged) {
            let allocated = match staged {
                Some(data) => *data,
                None => !candidate(&state, b),
            };
            push(b, allocated);
        }
        Ok(())
    }

    /// The first block at or after `from` that the metadata says was written (and not
    /// discarded since), or whose metadata cannot be trusted; `None` if there is none. Reads
    /// metadata only (no data), skipping groups the backend proves never written.
    pub(crate) fn first_written_block(&self, from: u64) -> Result<Option<u64>> {
        if from >= self.geo.data_blocks {
            return Ok(None);
        }
        let staged = {
            let stage = self.lock(&self.stage);
            stage
                .active
                .range(from..)
                .chain(stage.committing.iter().flat_map(|c| c.range(from..)))
                .filter(|(_, e)| matches!(e, Staged::Data { .. }))
                .map(|(b, _)| *b)
                .min()
        };
        let mut group = self.geo.group_of(from).0;
        while group < self.geo.groups {
            let end = (group + EXTENT_CHUNK_GROUPS).min(self.geo.groups);
            let lo = self.geo.meta_offset(group, 0);
            let hi = self.geo.meta_offset(end - 1, 1) + u64::from(self.geo.block_size);
            let zeros = self
                .backend
                .zero_ranges(lo, hi - lo)
                .map_err(self.io_err("looking for unwritten regions", lo))?;
            for g in group..end {
                let at = self.geo.meta_offset(g, 0);
                let first = self.geo.first_block(g).max(from);
                if staged.is_some_and(|s| s < first + u64::from(self.geo.blocks_in_group(g))) {
                    return Ok(staged);
                }
                // A hole is a never-written group only where the written map agrees: a wiped
                // group holds data that could not be trusted, not nothing.
                if self.cached_group(g).is_none()
                    && covered(&zeros, at, at + 2 * u64::from(self.geo.block_size))
                    && self.map_bit(g, true)? == MapBit::Clear
                {
                    continue;
                }
                let state = self.confirmed_group(g)?;
                let written =
                    (first..self.geo.first_block(g) + u64::from(self.geo.blocks_in_group(g))).find(|&b| {
                        !state
                            .accept(usize_of(b - self.geo.first_block(g)))
                            .only_unwritten()
                    });
                if written.is_some() {
                    return Ok(written);
                }
            }
            group = end;
        }
        Ok(staged)
    }

    /// Verifies `count` blocks from `first` without stopping at the first failure: the
    /// engine of `check` and scrubbing. I/O errors still abort.
    pub(crate) fn check_blocks(&self, first: u64, count: u64) -> Result<Vec<BlockProblem>> {
        let end = first
            .checked_add(count)
            .filter(|&e| e <= self.geo.data_blocks)
            .ok_or_else(|| Error::OutOfRange {
                volume: self.name.clone(),
                offset: first.saturating_mul(u64::from(self.geo.block_size)),
                len: count.saturating_mul(u64::from(self.geo.block_size)),
                size: self.size(),
            })?;
        let bs = self.geo.block_size as usize;
        let mut problems = Vec::new();
        let mut block = first;
        let mut buf = Vec::new();
        while block < end {
            let (group, _) = self.geo.group_of(block);
            let n =
                (self.geo.first_block(group) + u64::from(self.geo.blocks_in_group(group))).min(end) - block;
            buf.resize(usize_of(n) * bs, 0);
            match self.read_blocks(block, &mut buf) {
                Ok(()) => {}
                Err(e) if e.is_corruption() => {
                    // Narrow down block by block so every bad block is listed.
                    for b in block..block + n {
                        if let Err(e) = self.read_blocks(b, &mut buf[..bs]) {
                            match e {
                                Error::Corrupt { block, detail, .. } => {
                                    problems.push(BlockProblem { block, detail });
                                }
                                other => return Err(other),
                            }
                        }
                    }
                }
                Err(e) => return Err(e),
            }
            block += n;
        }
        Ok(problems)
    }

    /// Every metadata sector of groups `first..first+count` whose tags cannot be trusted
    /// (confirmed by a second read). Groups whose metadata the backend proves blank are not
    /// read.
    pub(crate) fn check_metadata(&self, first: u64, count: u64) -> Result<Vec<MetadataProblem>> {
        let end = first
            .checked_add(count)
            .filter(|&e| e <= self.geo.groups)
            .ok_or_else(|| Error::InvalidArgument {
                volume: self.name.clone(),
                detail: format!(
                    "groups {first}..{} lie outside the volume's {} groups",
                    first.saturating_add(count),
                    self.geo.groups
                ),
            })?;
        let per = u64::from(self.geo.tags_per_sector());
        let mut problems = Vec::new();
        for group in first..end {
            let region = self.geo.meta_offset(group, 0);
            let two = 2 * u64::from(self.geo.block_size);
            let zeros = self
                .backend
                .zero_ranges(region, two)
                .map_err(self.io_err("looking for unwritten regions", region))?;
            if self.cached_group(group).is_none()
                && covered(&zeros, region, region + two)
                && self.map_bit(group, true)? == MapBit::Clear
            {
                continue;
            }
            let state = self.confirmed_group(group)?;
            for k in 0..state.pairs() {
                let (detail, scarred) = match state.view(k) {
                    PairView::Damaged(d) => (Some(d.to_string()), false),
                    _ => (state.scar_note(k), true),
                };
                if let Some(detail) = detail {
                    problems.push(MetadataProblem {
                        group,
                        sector: u32_of_small(k),
                        first_block: self.geo.first_block(group) + k as u64 * per,
                        blocks: u32_of_small(self.geo.tags_in_sector(group, u32_of_small(k))),
                        detail,
                        rebuilt: false,
                        scarred,
                    });
                }
            }
        }
        Ok(problems)
    }

    /// Problems of the group bitmaps: damaged copies of any map's sectors, written-map copies
    /// behind the other, and (on a volume that is settled) written groups the written map does
    /// not mark — the map could then no longer tell a wiped group from a never-written one.
    /// `recover` repairs them.
    pub(crate) fn check_map(&self) -> Result<Vec<MapProblem>> {
        let per = crate::format::GROUPS_PER_MAP_SECTOR;
        // Commits write both copies of a sector one after the other: read none in between.
        let commit = self.lock(&self.commit);
        let trusted = self.trusted.load(std::sync::atomic::Ordering::Acquire);
        let where_ = |copy: usize| {
            if copy == 0 {
                "after the superblock"
            } else {
                "before the backup superblock"
            }
        };
        let written = self
            .damaged_map_sectors()?
            .into_iter()
            // After a crash a copy may legitimately lag behind; recovery catches it up.
            .filter(|&(_, _, why)| trusted || why != MapDamage::Behind)
            .map(|(sector, copy, why)| (MapKind::Written, sector, copy, why));
        let session = self.damaged_session_sectors()?;
        drop(commit);
        let mut problems: Vec<MapProblem> = written
            .chain(session)
            .map(|(kind, sector, copy, why)| MapProblem {
                sector,
                first_group: u64::from(sector) * per,
                groups: crate::format::groups_in_map_sector(sector, self.geo.groups),
                detail: format!(
                    "{} map sector, copy {copy} ({}), damaged: {why}",
                    map_name(kind),
                    where_(copy)
                ),
            })
            .collect();
        if !trusted {
            // After a crash the map may legitimately lag behind; recovery catches it up.
            return Ok(problems);
        }
        let mut group = 0;
        while group < self.geo.groups {
            let end = (group + EXTENT_CHUNK_GROUPS).min(self.geo.groups);
            let lo = self.geo.meta_offset(group, 0);
            let hi = self.geo.meta_offset(end - 1, 1) + u64::from(self.geo.block_size);
            let zeros = self
                .backend
                .zero_ranges(lo, hi - lo)
                .map_err(self.io_err("looking for unwritten regions", lo))?;
            for g in group..end {
                let at = self.geo.meta_offset(g, 0);
                if self.cached_group(g).is_none()
                    && covered(&zeros, at, at + 2 * u64::from(self.geo.block_size))
                {
                    continue;
                }
                if self.confirmed_group(g)?.any_written() && self.map_bit(g, true)? == MapBit::Clear {
                    let (sector, _) = self.geo.map_position(g);
                    problems.push(MapProblem {
                        sector,
                        first_group: g,
                        groups: 1,
                        detail: format!("group {g} is written but the written-groups map does not mark it"),
                    });
                }
            }
            group = end;
        }
        Ok(problems)
    }

    /// Where `block` lives and what both metadata copies say about it.
    pub(crate) fn inspect_block(&self, block: u64) -> Result<BlockReport> {
        let location = self.geo.locate(block).ok_or_else(|| Error::OutOfRange {
            volume: self.name.clone(),
            offset: block.saturating_mul(u64::from(self.geo.block_size)),
            len: u64::from(self.geo.block_size),
            size: self.size(),
        })?;
        let state = self.group(location.group)?;
        let (k, j) = state.locate(location.index as usize);
        let slots = state
            .pair(k)
            .iter()
            .zip(0u8..)
            .map(|(s, slot)| match s {
                SectorParse::Empty => SlotReport {
                    state: "empty".into(),
                    generation: None,
                    tag: None,
                },
                SectorParse::Valid { generation } => SlotReport {
                    state: "valid".into(),
                    generation: Some(*generation),
                    tag: Some(crate::tag::Tag::from_bytes(state.tag_bytes(slot, k, j)).to_string()),
                },
                SectorParse::Scarred { generation, why } => SlotReport {
                    state: format!("scarred (header intact, body damaged): {why}"),
                    generation: Some(*generation),
                    tag: Some(crate::tag::Tag::from_bytes(state.tag_bytes(slot, k, j)).to_string()),
                },
                SectorParse::Invalid(why) => SlotReport {
                    state: format!("invalid: {why}"),
                    generation: None,
                    tag: None,
                },
            })
            .collect();
        let accepted = match state.accept(location.index as usize) {
            Accept::One(t) => vec![t.to_string()],
            Accept::Either(a, b) => vec![a.to_string(), b.to_string()],
            Accept::Salvaged { newest, older, .. } => std::iter::once(newest)
                .chain(older)
                .map(|t| format!("{t} (from a scarred sector: only if the data matches)"))
                .collect(),
            Accept::Damaged(d) => vec![format!("none: {d}")],
        };
        let staged = self.lock(&self.stage).get(block).is_some();
        Ok(BlockReport {
            location,
            sector: u32_of_small(k),
            slots,
            accepted,
            staged,
        })
    }
}

/// How `check` names a group bitmap.
fn map_name(kind: MapKind) -> &'static str {
    match kind {
        MapKind::Written => "written-groups",
        MapKind::Dirty => "dirty-groups",
        MapKind::FirstWrite => "first-write",
    }
}
