//! The group bitmaps as the engine uses them (format in `format/map.rs`).
//!
//! Every map has two copies, far apart (head and tail of the volume), and every sector is
//! read from both: the bits of the valid copies are merged (a bit is set if any valid copy sets
//! it). Bits are only ever set by writes that reach both copies before the flush that lets
//! anything depend on them, so a valid copy never has a bit the truth lacks — except for a
//! session map's clearing a crash cut short, which only leaves a group marked, the safe side.
//!
//! **Written-groups map**: which groups were ever written, so a group whose metadata reads
//! blank is called never written only when the map agrees. Sectors are cached (bounded) and
//! confirmed by a second read before anything is written on their word or a hole is claimed
//! on it. A copy that is damaged or lacks bits the other has is reported by `check` and
//! rewritten by recovery and by the next update of the sector.
//!
//! **Dirty-groups map** and **first-write map**: which groups may have a commit whose data is
//! not durable, and which of them had their *first* write in that window. During a session
//! their truth is in memory — only this session sets bits, after recovery at open cleared them
//! all — so they are written, never read; they are read only after a crash, to know which
//! groups a crash may have left unsettled (read leniently and recovered) and which may be a
//! first write cut short (blank sectors explained). A sector with no valid copy marks nothing:
//! leniency needs evidence, and damage to both copies is not a crash's doing.

use super::commit::maintenance::Maintenance;
use super::Inner;
use crate::cast::{u32_of, usize_of};
use crate::error::Result;
use crate::format::{
    decode_map_sector, empty_map_sector, map_bit, seal_map_sector, MapDamage, MapKind, MapParse,
    GROUPS_PER_MAP_SECTOR, SECTOR_HEADER_SIZE, SECTOR_SIZE,
};
use blockguard_backend::Backend as _;
use std::collections::{BTreeMap, HashMap};
use std::sync::{Arc, Mutex};
use std::time::Instant;

/// Map sectors cached at most per map: 1024 cover four million groups (8 TiB at 4 KiB blocks).
const CACHED_SECTORS: usize = 1024;

/// Dirty-map sectors with bits set before they are all cleared at the next flush regardless of
/// the interval: bounds memory (496 bytes each) and recovery.
const MAX_DIRTY_SECTORS: usize = 1024;

/// What a map says about one group.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum MapBit {
    /// Not set.
    Clear,
    /// Set.
    Set,
    /// Every copy of the sector is damaged: unknown.
    Damaged(MapDamage),
}

#[derive(Debug)]
struct MapSector {
    /// The bits of every valid copy merged, sealed; all zero if no copy is valid.
    raw: Box<[u8]>,
    parse: MapParse,
    confirmed: bool,
    /// Copies found damaged or behind the other (for `check` and repair).
    damaged_copies: Vec<(usize, MapDamage)>,
}

/// The engine's view of both bitmaps.
#[derive(Debug, Default)]
pub(crate) struct Bitmaps {
    written: Mutex<HashMap<u32, Arc<MapSector>>>,
    /// The dirty-groups map.
    dirty: SessionMap,
    /// The first-write map: groups whose first write is not yet known durable.
    first_write: SessionMap,
}

/// A map whose truth during a session is in memory (only this session sets its bits, after
/// recovery at open cleared them all), read from disk only after a crash.
#[derive(Debug, Default)]
struct SessionMap {
    /// After a crash: the sectors as found (read once, confirmed).
    found: Mutex<HashMap<u32, Arc<MapSector>>>,
    /// This session's bits, per sector: the bytes of each sector with any bit set.
    bits: Mutex<SessionBits>,
}

#[derive(Debug, Default)]
struct SessionBits {
    sectors: BTreeMap<u32, Box<[u8]>>,
    last_clear: Option<Instant>,
}

impl Bitmaps {
    fn session(&self, kind: MapKind) -> &SessionMap {
        match kind {
            MapKind::FirstWrite => &self.first_write,
            _ => &self.dirty,
        }
    }
}

/// A map sector to write: which map, which sector, its new bytes.
pub(crate) struct MapUpdate {
    pub kind: MapKind,
    pub index: u32,
    pub bytes: Box<[u8]>,
}

fn damage_of(p: MapParse) -> Option<MapDamage> {
    match p {
        MapParse::Valid => None,
        MapParse::Empty => Some(MapDamage::Wiped),
        MapParse::Invalid(d) => Some(d),
    }
}

impl Inner {
    fn map_offset(&self, kind: MapKind, copy: usize, index: u32) -> u64 {
        self.geo.map_offset(kind, copy) + u64::from(index) * SECTOR_SIZE as u64
    }

    fn read_map_copy(
        &self,
        kind: MapKind,
        copy: usize,
        index: u32,
        confirmed: bool,
    ) -> Result<(Box<[u8]>, MapParse)> {
        let offset = self.map_offset(kind, copy, index);
        let mut raw = vec![0u8; SECTOR_SIZE].into_boxed_slice();
        if confirmed {
            self.read_confirmed(&mut raw, offset, "reading a group bitmap")?;
        } else {
            self.backend_read(&mut raw, offset, "reading a group bitmap")?;
        }
        let parse = decode_map_sector(&raw, &self.sb.uuid, kind, index, self.geo.groups);
        Ok((raw, parse))
    }

    /// Sector `index` of map `kind`, from both copies: the valid copies' bits merged.
    fn read_map_sector(&self, kind: MapKind, index: u32, confirmed: bool) -> Result<MapSector> {
        let mut damaged = Vec::new();
        let mut valid: Vec<(usize, Box<[u8]>)> = Vec::with_capacity(2);
        for copy in 0..2 {
            let (raw, parse) = self.read_map_copy(kind, copy, index, confirmed)?;
            match damage_of(parse) {
                None => valid.push((copy, raw)),
                Some(why) => {
                    tracing::warn!(volume = %self.name, map = ?kind, sector = index, copy, "group bitmap sector unusable: {why}");
                    damaged.push((copy, why));
                }
            }
        }
        let Some(first) = valid.first() else {
            return Ok(MapSector {
                raw: vec![0u8; SECTOR_SIZE].into_boxed_slice(),
                parse: MapParse::Invalid(damaged[0].1),
                confirmed,
                damaged_copies: damaged,
            });
        };
        let mut merged = first.1.clone();
        for (_, raw) in &valid[1..] {
            for (m, b) in merged[SECTOR_HEADER_SIZE..]
                .iter_mut()
                .zip(&raw[SECTOR_HEADER_SIZE..])
            {
                *m |= b;
            }
        }
        seal_map_sector(&mut merged, &self.sb.uuid, kind, index, &[]);
        for (copy, raw) in &valid {
            if raw[SECTOR_HEADER_SIZE..] != merged[SECTOR_HEADER_SIZE..] {
                damaged.push((*copy, MapDamage::Behind));
            }
        }
        Ok(MapSector {
            raw: merged,
            parse: MapParse::Valid,
            confirmed,
            damaged_copies: damaged,
        })
    }

    /// Sector `index` of the written map (cached).
    fn written_sector(&self, index: u32, confirmed: bool) -> Result<Arc<MapSector>> {
        let mut cache = self.lock(&self.maps.written);
        if let Some(s) = cache.get(&index) {
            if s.confirmed || !confirmed {
                return Ok(s.clone());
            }
        }
        let sector = Arc::new(self.read_map_sector(MapKind::Written, index, confirmed)?);
        if cache.len() >= CACHED_SECTORS {
            cache.clear();
        }
        cache.insert(index, sector.clone());
        Ok(sector)
    }

    /// What the written map says about `group`; `confirmed` reads the sector twice first if it
    /// came from a single read.
    pub(crate) fn map_bit(&self, group: u64, confirmed: bool) -> Result<MapBit> {
        let (index, i) = self.geo.map_position(group);
        let s = self.written_sector(index, confirmed)?;
        Ok(match s.parse {
            MapParse::Valid if map_bit(&s.raw, i) => MapBit::Set,
            MapParse::Valid => MapBit::Clear,
            other => MapBit::Damaged(damage_of(other).unwrap_or(MapDamage::Wiped)),
        })
    }

    /// The written-map sectors to write (both copies each) so that every group of `groups` is
    /// marked written. Sectors already saying so are left alone; sectors with no valid copy too
    /// (`recover` rebuilds them from the groups' metadata).
    pub(crate) fn map_updates(&self, groups: &[u64]) -> Result<Vec<MapUpdate>> {
        let mut by_sector: BTreeMap<u32, Vec<u64>> = BTreeMap::new();
        for &g in groups {
            let (index, i) = self.geo.map_position(g);
            by_sector.entry(index).or_default().push(i);
        }
        let mut updates = Vec::new();
        for (index, bits) in by_sector {
            // Built on confirmed bytes only: a bad read written back would clear other bits.
            let s = self.written_sector(index, true)?;
            if s.parse != MapParse::Valid {
                tracing::warn!(volume = %self.name, sector = index, "not marking groups written in a map sector with no valid copy; `blockguard recover --rebuild` rebuilds it");
                continue;
            }
            if bits.iter().all(|&i| map_bit(&s.raw, i)) && s.damaged_copies.is_empty() {
                continue;
            }
            let mut bytes = s.raw.clone();
            seal_map_sector(&mut bytes, &self.sb.uuid, MapKind::Written, index, &bits);
            self.assert_map_sector(MapKind::Written, index, &bytes, &bits);
            updates.push(MapUpdate {
                kind: MapKind::Written,
                index,
                bytes,
            });
        }
        Ok(updates)
    }

    /// Both copies of written-map sector `index` rewritten from its valid copy (recovery, when
    /// one copy is damaged); `None` if it has no valid copy.
    pub(crate) fn map_repair(&self, index: u32) -> Result<Option<MapUpdate>> {
        let s = self.written_sector(index, true)?;
        if s.parse != MapParse::Valid {
            return Ok(None);
        }
        let mut bytes = s.raw.clone();
        seal_map_sector(&mut bytes, &self.sb.uuid, MapKind::Written, index, &[]);
        Ok(Some(MapUpdate {
            kind: MapKind::Written,
            index,
            bytes,
        }))
    }

    /// A written-map sector rebuilt from scratch with exactly the bits `set` (recovery).
    pub(crate) fn map_rebuild(&self, index: u32, set: &[u64]) -> MapUpdate {
        let mut bytes = vec![0u8; SECTOR_SIZE].into_boxed_slice();
        seal_map_sector(&mut bytes, &self.sb.uuid, MapKind::Written, index, set);
        self.assert_map_sector(MapKind::Written, index, &bytes, set);
        MapUpdate {
            kind: MapKind::Written,
            index,
            bytes,
        }
    }

    /// A map sector about to be written reads back valid with the bits it must hold: writing
    /// one that did not would lose the record of the groups.
    fn assert_map_sector(&self, kind: MapKind, index: u32, bytes: &[u8], set: &[u64]) {
        assert_eq!(
            decode_map_sector(bytes, &self.sb.uuid, kind, index, self.geo.groups),
            MapParse::Valid,
            "{kind:?} map sector {index}: an encoded sector does not decode"
        );
        assert!(
            set.iter().all(|&i| map_bit(bytes, i)),
            "{kind:?} map sector {index}: a bit to set is not set"
        );
    }

    /// Writes map sectors, both copies of each (not flushed).
    pub(crate) fn write_map(&self, updates: &[MapUpdate]) -> Result<()> {
        for u in updates {
            for copy in 0..2 {
                self.write_sector(self.map_offset(u.kind, copy, u.index), &u.bytes)?;
            }
        }
        Ok(())
    }

    /// Writes one 512-byte sector in place (a whole aligned block around it when the backend
    /// needs that, its other sectors as confirmed on disk).
    fn write_sector(&self, offset: u64, bytes: &[u8]) -> Result<()> {
        let align = self.backend.alignment().max(1);
        if align <= SECTOR_SIZE {
            return self
                .backend
                .write_at(bytes, offset)
                .map_err(self.io_err("writing a group bitmap", offset));
        }
        let block = offset / align as u64 * align as u64;
        let mut buf = super::aligned(align, align);
        self.read_confirmed(buf.as_mut(), block, "reading a group bitmap")?;
        let at = usize_of(offset - block);
        buf.as_mut()[at..at + SECTOR_SIZE].copy_from_slice(bytes);
        self.backend
            .write_at(buf.as_ref(), block)
            .map_err(self.io_err("writing a group bitmap", block))
    }

    /// Publishes written-map sectors this process wrote.
    pub(crate) fn install_map(&self, updates: Vec<MapUpdate>) {
        let mut cache = self.lock(&self.maps.written);
        for u in updates.into_iter().filter(|u| u.kind == MapKind::Written) {
            let sector = MapSector {
                raw: u.bytes,
                parse: MapParse::Valid,
                confirmed: true,
                damaged_copies: Vec::new(),
            };
            if cache.len() >= CACHED_SECTORS {
                cache.clear();
            }
            cache.insert(u.index, Arc::new(sector));
        }
    }

    /// Forgets the cached maps (recovery works from the disk).
    pub(crate) fn clear_map_cache(&self) {
        self.lock(&self.maps.written).clear();
        self.lock(&self.maps.dirty.found).clear();
        self.lock(&self.maps.first_write.found).clear();
    }

    /// Written-map sectors with a damaged copy or one behind the other, and what is wrong.
    /// Read from the disk now, not the cache: a sector this session wrote is cached as it
    /// was meant, and a copy damaged since (a misdirected write, say) must still show.
    pub(crate) fn damaged_map_sectors(&self) -> Result<Vec<(u32, usize, MapDamage)>> {
        let mut out = Vec::new();
        for index in 0..u32_of(self.geo.map_sectors()) {
            let s = self.read_map_sector(MapKind::Written, index, true)?;
            out.extend(s.damaged_copies.iter().map(|&(copy, why)| (index, copy, why)));
        }
        Ok(out)
    }

    /// Session-map (dirty, first-write) sectors with a damaged copy, read from the disk now
    /// (for `check`). A copy behind the other is what a crash during a clearing leaves, and
    /// not reported.
    pub(crate) fn damaged_session_sectors(&self) -> Result<Vec<(MapKind, u32, usize, MapDamage)>> {
        let mut out = Vec::new();
        for kind in [MapKind::Dirty, MapKind::FirstWrite] {
            for index in 0..u32_of(self.geo.map_sectors()) {
                let s = self.read_map_sector(kind, index, true)?;
                out.extend(
                    s.damaged_copies
                        .iter()
                        .filter(|(_, why)| *why != MapDamage::Behind)
                        .map(|&(copy, why)| (kind, index, copy, why)),
                );
            }
        }
        Ok(out)
    }

    // ---- The session maps: dirty groups, and groups whose first write is pending ----------

    /// After a crash: whether map `kind` (a session map) marks `group`. A sector with no valid
    /// copy marks nothing (see the module documentation).
    pub(crate) fn marked_after_crash(&self, kind: MapKind, group: u64) -> Result<bool> {
        let (index, i) = self.geo.map_position(group);
        let found = &self.maps.session(kind).found;
        let s = {
            let mut cache = self.lock(found);
            if let Some(s) = cache.get(&index) {
                s.clone()
            } else {
                let s = Arc::new(self.read_map_sector(kind, index, true)?);
                if s.parse != MapParse::Valid {
                    tracing::warn!(volume = %self.name, map = ?kind, sector = index, "no valid copy of a group bitmap sector: the groups it covers are read by the strict rules");
                }
                if cache.len() >= CACHED_SECTORS {
                    cache.clear();
                }
                cache.insert(index, s.clone());
                s
            }
        };
        Ok(s.parse == MapParse::Valid && map_bit(&s.raw, i))
    }

    /// After a crash: whether `group` may have been left unsettled.
    pub(crate) fn dirty_after_crash(&self, group: u64) -> Result<bool> {
        self.marked_after_crash(MapKind::Dirty, group)
    }

    /// After a crash: every group the dirty map may mark, in order.
    pub(crate) fn dirty_groups_after_crash(&self) -> Result<Vec<u64>> {
        let mut out = Vec::new();
        for index in 0..u32_of(self.geo.map_sectors()) {
            let first = u64::from(index) * GROUPS_PER_MAP_SECTOR;
            let n = crate::format::groups_in_map_sector(index, self.geo.groups);
            for g in first..first + n {
                if self.dirty_after_crash(g)? {
                    out.push(g);
                }
            }
        }
        Ok(out)
    }

    /// The sectors of session map `kind` to write so that `groups` are marked (bits this
    /// session already set are not written again); adopt them once they are durable.
    pub(crate) fn session_updates(&self, kind: MapKind, groups: &[u64]) -> Vec<MapUpdate> {
        let state = self.lock(&self.maps.session(kind).bits);
        let mut by_sector: BTreeMap<u32, Vec<u64>> = BTreeMap::new();
        for &g in groups {
            let (index, i) = self.geo.map_position(g);
            if !state.sectors.get(&index).is_some_and(|bits| map_bit(bits, i)) {
                by_sector.entry(index).or_default().push(i);
            }
        }
        by_sector
            .into_iter()
            .map(|(index, bits)| {
                let mut bytes = match state.sectors.get(&index) {
                    Some(b) => b.clone(),
                    None => vec![0u8; SECTOR_SIZE].into_boxed_slice(),
                };
                seal_map_sector(&mut bytes, &self.sb.uuid, kind, index, &bits);
                self.assert_map_sector(kind, index, &bytes, &bits);
                MapUpdate { kind, index, bytes }
            })
            .collect()
    }

    /// Records session-map sectors written and made durable.
    pub(crate) fn adopt_session(&self, updates: &[MapUpdate]) {
        for u in updates {
            if u.kind != MapKind::Written {
                self.lock(&self.maps.session(u.kind).bits)
                    .sectors
                    .insert(u.index, u.bytes.clone());
            }
        }
    }

    /// After a flush that made everything committed durable: clears every bit of both session
    /// maps if the last clearing is `interval` ago (or the maps grew large), by rewriting the
    /// sectors with no bit set — unflushed: a lost clearing only leaves a group marked after a
    /// crash, which is safe, and a later setting is flushed before it matters.
    pub(crate) fn clear_session_if_due(&self, interval: std::time::Duration, force: bool) -> Result<()> {
        let due = {
            let mut dirty = self.lock(&self.maps.dirty.bits);
            let now = Instant::now();
            let last = *dirty.last_clear.get_or_insert(now);
            let due = !dirty.sectors.is_empty()
                && (force || now.duration_since(last) >= interval || dirty.sectors.len() > MAX_DIRTY_SECTORS);
            if due {
                dirty.last_clear = Some(now);
            }
            due
        };
        if !due {
            return Ok(());
        }
        for kind in self.clearable_session_maps() {
            let sectors = std::mem::take(&mut self.lock(&self.maps.session(kind).bits).sectors);
            for index in sectors.keys() {
                let bytes = empty_map_sector(&self.sb.uuid, kind, *index);
                for copy in 0..2 {
                    self.write_sector(self.map_offset(kind, copy, *index), &bytes)?;
                }
            }
        }
        Ok(())
    }

    /// Clears both session maps whole on disk (after recovery: nothing is unsettled any more).
    /// Only under maintenance: no commit may mark a group meanwhile.
    pub(crate) fn clear_all_session(&self, _under: &Maintenance<'_>) -> Result<()> {
        for kind in self.clearable_session_maps() {
            for index in 0..u32_of(self.geo.map_sectors()) {
                let bytes = empty_map_sector(&self.sb.uuid, kind, index);
                for copy in 0..2 {
                    self.write_sector(self.map_offset(kind, copy, index), &bytes)?;
                }
            }
            let map = self.maps.session(kind);
            self.lock(&map.bits).sectors.clear();
            self.lock(&map.found).clear();
        }
        Ok(())
    }

    /// The session maps whose bits may be cleared now. While a mirror member is out of sync
    /// the dirty map is also the set's write-intent bitmap: every group written since the
    /// member fell behind stays marked, durably, so `resync` copies only those.
    fn clearable_session_maps(&self) -> Vec<MapKind> {
        if self.degraded() {
            vec![MapKind::FirstWrite]
        } else {
            vec![MapKind::Dirty, MapKind::FirstWrite]
        }
    }

    /// Takes the dirty map as it is on disk as this session's own (at a read-write open of a
    /// degraded set: the marks of earlier degraded sessions must be kept, and a session map
    /// sector is always rewritten whole from what the session holds).
    pub(crate) fn adopt_dirty_from_disk(&self) -> Result<()> {
        for index in 0..u32_of(self.geo.map_sectors()) {
            let s = self.read_map_sector(MapKind::Dirty, index, true)?;
            if s.parse != MapParse::Valid {
                // No valid copy: every group it covers is taken as written while degraded.
                let n = crate::format::groups_in_map_sector(index, self.geo.groups);
                let first = u64::from(index) * GROUPS_PER_MAP_SECTOR;
                let all: Vec<u64> = (first..first + n).collect();
                let mut bytes = vec![0u8; SECTOR_SIZE].into_boxed_slice();
                let bits: Vec<u64> = all.iter().map(|&g| self.geo.map_position(g).1).collect();
                seal_map_sector(&mut bytes, &self.sb.uuid, MapKind::Dirty, index, &bits);
                self.lock(&self.maps.dirty.bits).sectors.insert(index, bytes);
                continue;
            }
            let n = crate::format::groups_in_map_sector(index, self.geo.groups);
            if (0..n).any(|i| map_bit(&s.raw, i)) {
                self.lock(&self.maps.dirty.bits)
                    .sectors
                    .insert(index, s.raw.clone());
            }
        }
        Ok(())
    }

    /// Every group the dirty map marks, from this session's view (which, at a degraded open,
    /// includes the earlier sessions' marks).
    pub(crate) fn dirty_groups(&self) -> Vec<u64> {
        let bits = self.lock(&self.maps.dirty.bits);
        let mut out = Vec::new();
        for (&index, bytes) in &bits.sectors {
            let first = u64::from(index) * GROUPS_PER_MAP_SECTOR;
            let n = crate::format::groups_in_map_sector(index, self.geo.groups);
            out.extend((0..n).filter(|&i| map_bit(bytes, i)).map(|i| first + i));
        }
        out
    }
}
