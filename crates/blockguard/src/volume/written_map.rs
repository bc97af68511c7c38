//! The written-groups map as the engine uses it (format in `format/map.rs`): which groups were
//! ever written, so a group whose metadata reads blank is called never written only when the
//! map agrees.
//!
//! Sectors are cached (bounded) and, like group metadata, confirmed by a second read before
//! anything is written on their word or a hole is claimed on it. A damaged map sector is
//! reported by `check` and rebuilt by `recover`; meanwhile the groups it covers fall back to
//! what their own metadata says (a written group's metadata never reads blank unless it is
//! itself damaged, so one fault alone never hides data).

use super::Inner;
use crate::error::Result;
use crate::format::{decode_map_sector, map_bit, seal_map_sector, MapDamage, MapParse, SECTOR_SIZE};
use std::collections::HashMap;
use std::sync::{Arc, Mutex};

/// Map sectors cached at most: 1024 cover four million groups (8 TiB at 4 KiB blocks).
const CACHED_SECTORS: usize = 1024;

/// What the map says about one group.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum MapBit {
    /// Never written.
    Clear,
    /// Written at least once.
    Set,
    /// The map sector is damaged: unknown.
    Damaged(MapDamage),
}

#[derive(Debug)]
struct MapSector {
    raw: Box<[u8]>,
    parse: MapParse,
    confirmed: bool,
}

/// Cached map sectors.
#[derive(Debug, Default)]
pub(crate) struct WrittenMap {
    sectors: Mutex<HashMap<u32, Arc<MapSector>>>,
}

/// A map sector to write: its index and new bytes.
pub(crate) struct MapUpdate {
    pub index: u32,
    pub bytes: Box<[u8]>,
}

impl Inner {
    fn map_sector(&self, index: u32, confirmed: bool) -> Result<Arc<MapSector>> {
        let mut cache = super::lock(&self.map.sectors);
        if let Some(s) = cache.get(&index) {
            if s.confirmed || !confirmed {
                return Ok(s.clone());
            }
        }
        let offset = self.geo.map_offset() + index as u64 * SECTOR_SIZE as u64;
        let mut raw = vec![0u8; SECTOR_SIZE].into_boxed_slice();
        let confirmed = if confirmed {
            self.read_confirmed(&mut raw, offset, "reading the written-groups map")?;
            true
        } else {
            self.backend_read(&mut raw, offset, "reading the written-groups map")?;
            false
        };
        let parse = decode_map_sector(&raw, &self.sb.uuid, index, self.geo.groups);
        if let MapParse::Invalid(why) = parse {
            tracing::warn!(volume = %self.name, sector = index, "written-groups map sector unusable: {why}");
        }
        let sector = Arc::new(MapSector {
            raw,
            parse,
            confirmed,
        });
        if cache.len() >= CACHED_SECTORS {
            cache.clear();
        }
        cache.insert(index, sector.clone());
        Ok(sector)
    }

    /// What the map says about `group`; `confirmed` reads the sector twice first if it came
    /// from a single read.
    pub(crate) fn map_bit(&self, group: u64, confirmed: bool) -> Result<MapBit> {
        let (index, i) = self.geo.map_position(group);
        let s = self.map_sector(index, confirmed)?;
        Ok(match s.parse {
            MapParse::Empty => MapBit::Clear,
            MapParse::Valid if map_bit(&s.raw, i) => MapBit::Set,
            MapParse::Valid => MapBit::Clear,
            MapParse::Invalid(why) => MapBit::Damaged(why),
        })
    }

    /// The map sectors to write so that every group of `groups` is marked written (sectors
    /// already saying so are left alone; damaged ones too — `recover` rebuilds them).
    pub(crate) fn map_updates(&self, groups: &[u64]) -> Result<Vec<MapUpdate>> {
        let mut by_sector: HashMap<u32, Vec<u64>> = HashMap::new();
        for &g in groups {
            let (index, i) = self.geo.map_position(g);
            by_sector.entry(index).or_default().push(i);
        }
        let mut updates = Vec::new();
        let mut indices: Vec<u32> = by_sector.keys().copied().collect();
        indices.sort_unstable();
        for index in indices {
            // Built on confirmed bytes only: a bad read written back would clear other bits.
            let s = self.map_sector(index, true)?;
            let bits = &by_sector[&index];
            match s.parse {
                MapParse::Invalid(why) => {
                    tracing::warn!(volume = %self.name, sector = index, "not marking groups written in a damaged map sector ({why}); `blockguard recover` rebuilds it");
                }
                MapParse::Valid if bits.iter().all(|&i| map_bit(&s.raw, i)) => {}
                MapParse::Empty | MapParse::Valid => {
                    let mut bytes = s.raw.clone();
                    seal_map_sector(&mut bytes, &self.sb.uuid, index, bits);
                    updates.push(MapUpdate { index, bytes });
                }
            }
        }
        Ok(updates)
    }

    /// A map sector rebuilt from scratch with exactly the bits `set` (recovery).
    pub(crate) fn map_rebuild(&self, index: u32, set: &[u64]) -> MapUpdate {
        let mut bytes = vec![0u8; SECTOR_SIZE].into_boxed_slice();
        seal_map_sector(&mut bytes, &self.sb.uuid, index, set);
        MapUpdate { index, bytes }
    }

    /// Writes map sectors (not flushed).
    pub(crate) fn write_map(&self, updates: &[MapUpdate]) -> Result<()> {
        let align = self.backend.alignment().max(1);
        for u in updates {
            let offset = self.geo.map_offset() + u.index as u64 * SECTOR_SIZE as u64;
            if align > SECTOR_SIZE {
                // The backend writes whole aligned blocks only: rewrite the block around the
                // sector, its other sectors as confirmed on disk.
                let block = offset / align as u64 * align as u64;
                let mut buf = super::aligned(align, align);
                self.read_confirmed(buf.as_mut(), block, "reading the written-groups map")?;
                let at = (offset - block) as usize;
                buf.as_mut()[at..at + SECTOR_SIZE].copy_from_slice(&u.bytes);
                self.backend
                    .write_at(buf.as_ref(), block)
                    .map_err(self.io_err("writing the written-groups map", block))?;
            } else {
                self.backend
                    .write_at(&u.bytes, offset)
                    .map_err(self.io_err("writing the written-groups map", offset))?;
            }
        }
        Ok(())
    }

    /// Publishes written map sectors.
    pub(crate) fn install_map(&self, updates: Vec<MapUpdate>) {
        let mut cache = super::lock(&self.map.sectors);
        for u in updates {
            let parse = decode_map_sector(&u.bytes, &self.sb.uuid, u.index, self.geo.groups);
            debug_assert_eq!(parse, MapParse::Valid);
            let sector = MapSector {
                raw: u.bytes,
                parse,
                confirmed: true,
            };
            if cache.len() >= CACHED_SECTORS {
                cache.clear();
            }
            cache.insert(u.index, Arc::new(sector));
        }
    }

    /// Forgets the cached map (recovery works from the disk).
    pub(crate) fn clear_map(&self) {
        super::lock(&self.map.sectors).clear();
    }

    /// Damaged map sectors (for `check`), confirmed by a second read.
    pub(crate) fn damaged_map_sectors(&self) -> Result<Vec<(u32, MapDamage)>> {
        let mut out = Vec::new();
        for index in 0..self.geo.map_sectors() as u32 {
            if let MapParse::Invalid(why) = self.map_sector(index, true)?.parse {
                out.push((index, why));
            }
        }
        Ok(out)
    }
}
