//! Recovery: settling a volume after an unclean shutdown, and rebuilding damaged metadata on
//! request.
//!
//! After a crash a pair of brothers may be *unsettled*: its older brother may still describe
//! the data on disk (the last commit's data had not all landed), or a group's first write may
//! have left a blank sector. Reads of such a volume must accept either tag, which hides a lost
//! write of the last batch. Recovery ends that: for every pair whose brothers disagree it reads
//! the blocks in question once, and where the newest brother describes a version that never
//! reached the disk it writes a new brother — the tags the data actually matches, one
//! generation up — into the *older* slot; blanks of a torn first write are filled in. Then it
//! flushes and marks the volume clean: from then on only the newest tags are accepted.
//!
//! Crash safety: recovery writes no data, and every sector it writes is written atomically
//! (512 bytes) over a sector no accepted state needs any more — the older brother, whose tags
//! for the blocks it must still describe are copied into the new one — so a crash during
//! recovery leaves pairs the lenient rules accept, and the next open recovers again.
//!
//! A *scarred* sector (intact header, damaged body) is healed where that is provable
//! (`volume/heal.rs`): its header still says which brother is the newest. Other damage (an
//! invalid sector, or a blank one where no crash explains it) is reported and, unless asked,
//! left alone: a read-write open never turns damage into silently accepted
//! tags. [`RecoverOptions::rebuild_damaged`] (the `recover` command) rebuilds a damaged
//! brother from its valid partner: that re-establishes the group, but blocks whose data matches
//! the partner may be a version older than the lost brother described; the report lists them.

use super::bitmaps::MapBit;
use super::commit::maintenance::Maintenance;
use super::group::{GroupState, PairView};
use super::heal::{PairAt, PairHeal};
use super::Inner;
use crate::cast::u32_of_small;
use crate::error::{Error, Result};
use crate::format::SectorParse;
use crate::tag::UNWRITTEN;
use blockguard_backend::Backend as _;
use std::collections::BTreeMap;
use std::sync::atomic::Ordering;

/// What recovery should do besides settling crash state.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
#[non_exhaustive]
pub struct RecoverOptions {
    /// Rewrite every damaged brother from its valid partner (when it has one). Blocks whose
    /// data matches the partner are accepted from then on, even if the damaged brother held a
    /// newer version of them: an explicit decision to accept what the disk holds.
    pub rebuild_damaged: bool,
}

impl RecoverOptions {
    /// Settle crash state and rebuild damaged brothers.
    pub fn rebuild() -> RecoverOptions {
        RecoverOptions {
            rebuild_damaged: true,
        }
    }
}

/// A metadata sector whose tags cannot be trusted, as found by recovery or `check`.
#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize)]
pub struct MetadataProblem {
    /// Group number.
    pub group: u64,
    /// Sector (pair) number inside the group's metadata blocks.
    pub sector: u32,
    /// First data block the sector covers.
    pub first_block: u64,
    /// Number of data blocks it covers.
    pub blocks: u32,
    /// What is wrong.
    pub detail: String,
    /// True if recovery rebuilt it from its valid brother.
    pub rebuilt: bool,
    /// True if the damage is a scar (format v4: the sector's header, with its generation, is
    /// intact): the pair's blocks still read where their data matches their tag, so not
    /// every block the problem covers fails.
    #[serde(default)]
    pub scarred: bool,
}

/// A problem of the written-groups map, as found by `check`.
#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize)]
pub struct MapProblem {
    /// Map sector number.
    pub sector: u32,
    /// First group it covers.
    pub first_group: u64,
    /// Groups it covers.
    pub groups: u64,
    /// What is wrong.
    pub detail: String,
}

/// What recovery did.
#[derive(Clone, Debug, Default, PartialEq, Eq, serde::Serialize)]
pub struct RecoveryReport {
    /// The volume was closed cleanly (or already recovered): no crash state to settle.
    pub already_clean: bool,
    /// Groups whose metadata was examined.
    pub groups_examined: u64,
    /// Groups the backend proved never written (their metadata is a hole), not read at all.
    pub groups_skipped: u64,
    /// After a crash: groups the dirty-groups map marked (the only ones a crash may have left
    /// unsettled, and the only ones visited).
    pub groups_dirty: u64,
    /// Groups given new metadata.
    pub groups_rewritten: u64,
    /// Blocks whose newest tag described a version that never reached the disk: their tag
    /// now describes the version that did.
    pub blocks_reverted: u64,
    /// Blocks of which no version survived the crash whole (a write cut short mid-block):
    /// their tag is now the torn tag, so they fail every read, as torn, until written again.
    pub blocks_torn: u64,
    /// Brother pairs of a group's first write cut short by the crash, completed.
    pub pairs_completed: u64,
    /// `rebuild` mode: blocks whose tags were recomputed from their data (every block of the
    /// groups the write-intent map marked).
    pub blocks_retagged: u64,
    /// Damaged metadata sectors found (rebuilt or left as they are).
    pub damaged: Vec<MetadataProblem>,
    /// Scarred metadata sectors (intact header, damaged body) rewritten from what their
    /// headers and the data prove (see `volume/heal.rs`).
    pub sectors_healed: u64,
    /// Groups marked written in the written-groups map where it had missed them (a crash
    /// between the map's write and the group's metadata, or map damage).
    pub map_bits_set: u64,
    /// Damaged sectors of the written-groups map rebuilt from the groups' metadata.
    pub map_sectors_rebuilt: u64,
    /// `journal` mode: what replaying the journal did.
    pub journal: Option<super::commit::journal::ReplayReport>,
}

/// Sectors of the written-groups map to rebuild, each with the groups found written in it.
type RebuiltBits = BTreeMap<u32, Vec<u64>>;

/// Groups whose metadata is examined per call of the backend's hole query.
const HOLE_QUERY_GROUPS: usize = 4096;

impl Inner {
    /// Settles every group (after a crash) and, if asked, rebuilds damaged brothers; then
    /// flushes and marks the volume clean. `progress(done, total)` reports groups.
    pub(crate) fn recover(
        &self,
        opts: RecoverOptions,
        progress: &mut dyn FnMut(u64, u64),
    ) -> Result<RecoveryReport> {
        if self.read_only {
            return Err(Error::ReadOnly {
                volume: self.name.clone(),
            });
        }
        // What recovery reads must be what the disk holds: everything staged goes out first,
        // and no commit runs until recovery is done.
        let mut m = self.maintenance("flushing before recovery")?;
        let after_crash = !self.trusted.load(Ordering::Acquire);
        let mut report = RecoveryReport {
            already_clean: !after_crash,
            ..RecoveryReport::default()
        };
        if !after_crash && !opts.rebuild_damaged {
            return Ok(report);
        }
        // Everything is durable now: work from the disk, not from what this session cached.
        self.cache.clear();
        self.clear_map_cache();
        // Which groups to visit: after a crash, those the dirty-groups map marks (every other
        // group was settled before the crash); for a damage scan, all of them.
        let visit: Vec<u64> = if opts.rebuild_damaged {
            (0..self.geo.groups).collect()
        } else {
            self.dirty_groups_after_crash()?
        };
        report.groups_dirty = if after_crash && !opts.rebuild_damaged {
            visit.len() as u64
        } else {
            0
        };
        if opts.rebuild_damaged {
            self.repair_damaged_pairs_from_members(&visit)?;
        }
        // Written-map sectors with no valid copy are rebuilt from the groups' metadata.
        let (mut rebuilt_bits, repaired_copies) = self.plan_map_repairs(opts)?;
        let mut missing_bits = Vec::new();
        let total = visit.len() as u64;
        for (n, chunk) in visit.chunks(HOLE_QUERY_GROUPS).enumerate() {
            let holes = self.meta_holes(chunk)?;
            for (k, &g) in chunk.iter().enumerate() {
                report.groups_examined += 1;
                let map = self.map_bit(g, true)?;
                let (index, i) = self.geo.map_position(g);
                // Rebuilding a map sector no copy of which is valid: a blank group in it is
                // taken as never written (that is what the user asked `--rebuild` for).
                let rebuilding = rebuilt_bits.contains_key(&index);
                let blank_is_empty = self.protocol.blank_metadata_means_no_data();
                let written = if (blank_is_empty && holes[k] && map == MapBit::Clear)
                    || (blank_is_empty && rebuilding && !self.confirmed_group(g)?.any_written())
                {
                    report.groups_skipped += 1;
                    false
                } else {
                    // A bit once set is never cleared, not even when the group's metadata
                    // reads blank: that is the damage the map exists to report.
                    self.protocol.settle_group(self, &mut m, g, opts, &mut report)? || map == MapBit::Set
                };
                if let Some(bits) = rebuilt_bits.get_mut(&index) {
                    if written {
                        bits.push(i);
                    }
                } else if written && map == MapBit::Clear {
                    missing_bits.push(g);
                }
                let done = (n * HOLE_QUERY_GROUPS + k) as u64;
                if done.is_multiple_of(64) {
                    progress(done, total);
                }
            }
        }
        self.write_recovered_map(&m, &missing_bits, repaired_copies, rebuilt_bits, &mut report)?;
        m.make_durable("flushing recovered metadata")?;
        self.settled(&mut m, after_crash)?;
        progress(total.max(1), total.max(1));
        if report.damaged.is_empty() {
            tracing::info!(volume = %self.name, ?report, "recovered");
        } else {
            tracing::warn!(volume = %self.name, ?report, "recovered; damaged metadata found");
        }
        Ok(report)
    }

    /// The end of a recovery whose resolutions are durable: nothing is unsettled any more, so
    /// the newest tags are trusted from now on and, `after_crash`, the session maps are
    /// cleared and the volume is marked clean.
    fn settled(&self, m: &mut Maintenance<'_>, after_crash: bool) -> Result<()> {
        if after_crash {
            // Nothing is unsettled any more — but only once the resolutions above are durable:
            // cleared first, a crash could leave a group read strictly before it was settled.
            self.clear_all_session(m)?;
        }
        // Every group now describes what the disk holds: trust the newest tags from here on,
        // for groups loaded later too.
        self.trusted.store(true, Ordering::Release);
        self.cache.clear();
        self.clear_map_cache();
        if after_crash {
            m.mark_clean("marking the volume clean after recovery")?;
        }
        Ok(())
    }

    /// The damaged sectors of the written-groups map and what recovery does with them: those
    /// with no valid copy get rebuilt from the groups' metadata (keys of the first result, to
    /// be filled with the written groups while visiting) when asked to rebuild; those with a
    /// valid copy get both copies rewritten (the second result).
    fn plan_map_repairs(&self, opts: RecoverOptions) -> Result<(RebuiltBits, Vec<u32>)> {
        let mut rebuilt_bits = RebuiltBits::new();
        let mut repaired_copies = Vec::new();
        for (index, _, _) in self.damaged_map_sectors()? {
            match self.map_bit(u64::from(index) * crate::format::GROUPS_PER_MAP_SECTOR, true)? {
                // Only a scan of every group can say what such a sector must hold.
                MapBit::Damaged(_) if opts.rebuild_damaged => {
                    rebuilt_bits.entry(index).or_default();
                }
                MapBit::Damaged(_) => {}
                // A copy is valid: both are rewritten with the merged bits (a crash between
                // the two copies' writes leaves one behind, and it must not stay so).
                _ => {
                    if !repaired_copies.contains(&index) {
                        repaired_copies.push(index);
                    }
                }
            }
        }
        Ok((rebuilt_bits, repaired_copies))
    }

    /// Writes what recovery changes in the written-groups map: the bits of `missing_bits` set,
    /// the `repaired_copies` sectors rewritten from their valid copy, the `rebuilt_bits`
    /// sectors rebuilt with the groups found written. Not flushed.
    fn write_recovered_map(
        &self,
        m: &Maintenance<'_>,
        missing_bits: &[u64],
        repaired_copies: Vec<u32>,
        rebuilt_bits: RebuiltBits,
        report: &mut RecoveryReport,
    ) -> Result<()> {
        let mut map = self.map_updates(missing_bits)?;
        report.map_bits_set = missing_bits.len() as u64;
        for index in repaired_copies {
            // A sector map_updates already rewrites (both copies) needs nothing more.
            if !map.iter().any(|u| u.index == index) {
                map.extend(self.map_repair(index)?);
            }
            report.map_sectors_rebuilt += 1;
        }
        for (index, bits) in rebuilt_bits {
            tracing::warn!(volume = %self.name, sector = index, groups = bits.len(), "rebuilt a damaged written-groups map sector from the groups' metadata");
            map.push(self.map_rebuild(index, &bits));
            report.map_sectors_rebuilt += 1;
        }
        m.write_map(&map)
    }

    /// For each group of `groups` (ascending), whether the backend proves its metadata blank
    /// (a hole): such a group was never written, unless the written map says otherwise.
    fn meta_holes(&self, groups: &[u64]) -> Result<Vec<bool>> {
        let (Some(&first), Some(&last)) = (groups.first(), groups.last()) else {
            return Ok(Vec::new());
        };
        let lo = self.geo.meta_offset(first, 0);
        let hi = self.geo.meta_offset(last, 1) + u64::from(self.geo.block_size);
        let zeros = self
            .backend
            .zero_ranges(lo, hi - lo)
            .map_err(self.io_err("looking for unwritten regions", lo))?;
        Ok(groups
            .iter()
            .map(|&g| {
                let at = self.geo.meta_offset(g, 0);
                covered(&zeros, at, at + 2 * u64::from(self.geo.block_size))
            })
            .collect())
    }

    /// Settles one group (see the module documentation); returns whether it holds written
    /// metadata afterwards.
    pub(crate) fn recover_group(
        &self,
        m: &mut Maintenance<'_>,
        group: u64,
        opts: RecoverOptions,
        report: &mut RecoveryReport,
    ) -> Result<bool> {
        let mut old = self.confirmed_group(group)?;
        if old.never_written() {
            return Ok(false);
        }
        if let Some(completed) = self.complete_first_write(m, group, &old, report)? {
            old = completed;
        }
        let per = self.geo.tags_per_sector() as usize;
        let mut w = old.writer(&self.sb.uuid, group);
        let mut changed = false;
        for k in 0..old.pairs() {
            let count = self.geo.tags_in_sector(group, u32_of_small(k));
            match old.view(k) {
                PairView::Brothers { newest, older_ok } if older_ok || old.scars(k).contains(&true) => {
                    let at = PairAt {
                        old: &old,
                        group,
                        k,
                        newest,
                        older_ok,
                        count,
                    };
                    changed |= self.settle_brothers(&mut w, &at, report)?;
                }
                PairView::TornFirst { .. } => {
                    debug_assert!(
                        false,
                        "pair {k} of group {group}: the first write was completed above"
                    );
                }
                PairView::Damaged(damage) => {
                    let mut problem = MetadataProblem {
                        group,
                        sector: u32_of_small(k),
                        first_block: self.geo.first_block(group) + (k * per) as u64,
                        blocks: u32_of_small(count),
                        detail: damage.to_string(),
                        rebuilt: false,
                        scarred: false,
                    };
                    if opts.rebuild_damaged {
                        if let Some(valid) = rebuildable(&old, k) {
                            let generation = generation_of(&old, k, valid);
                            let mut tags = w.tags_of(Some(valid), k, count);
                            report.blocks_torn += self.torn_where_unmatched(group, k, &mut tags)?;
                            w.put(1 - valid, k, generation + 1, &tags);
                            w.set_known(k, 1 - valid);
                            problem.rebuilt = true;
                            changed = true;
                            tracing::warn!(
                                volume = %self.name, group, sector = k,
                                "rebuilt a damaged metadata sector from its brother ({damage}); \
                                 blocks {}..{} now read as that brother describes them, which may be older",
                                problem.first_block, problem.first_block + count as u64
                            );
                        }
                    }
                    report.damaged.push(problem);
                }
                PairView::Brothers { .. } | PairView::Known { .. } | PairView::Unwritten => {}
            }
        }
        if changed {
            let (new, slots) = w.finish_loaded(&self.geo, false);
            let update = self.meta_update(group, new, slots);
            m.write_metadata(std::slice::from_ref(&update))?;
            report.groups_rewritten += 1;
            return Ok(true);
        }
        Ok(old.any_written())
    }

    /// Settles one pair of brothers (see `heal.rs`) and reports what it did; true if new
    /// sectors went into `w`.
    fn settle_brothers(
        &self,
        w: &mut super::group::GroupWriter<'_>,
        at: &PairAt<'_>,
        report: &mut RecoveryReport,
    ) -> Result<bool> {
        match self.settle_pair(w, at)? {
            PairHeal::Rewritten {
                reverted,
                torn,
                healed,
                suspect,
            } => {
                report.blocks_reverted += reverted;
                report.blocks_torn += torn;
                report.sectors_healed += healed;
                if let Some(block) = suspect {
                    report.damaged.push(self.scar_problem(
                        at,
                        format!(
                            "block {block} matched neither brother after the crash while the older \
                         brother was scarred: the tag of its rolled-back version may have been \
                         what the scar hit (the pair was rewritten for the blocks it reverted, so \
                         the block now fails as torn)"
                        ),
                    ));
                }
                Ok(true)
            }
            PairHeal::Unprovable { block } => {
                let detail = format!(
                    "{}; block {block} matches none of its tags, so the sector is left as it is",
                    at.old.scar_note(at.k).unwrap_or_default()
                );
                report.damaged.push(self.scar_problem(at, detail));
                Ok(false)
            }
            PairHeal::Unchanged => Ok(false),
        }
    }

    /// The report entry of a scarred pair recovery could not settle cleanly.
    fn scar_problem(&self, at: &PairAt<'_>, detail: String) -> MetadataProblem {
        let per = self.geo.tags_per_sector() as usize;
        MetadataProblem {
            group: at.group,
            sector: u32_of_small(at.k),
            first_block: self.geo.first_block(at.group) + (at.k * per) as u64,
            blocks: u32_of_small(at.count),
            detail,
            rebuilt: false,
            scarred: true,
        }
    }

    /// First stage of settling a group whose first write a crash cut short: fill its blank
    /// sectors with what the first write would have put there (slot 0: generation 1; slot 1:
    /// generation 0; every tag unwritten where the slot had none), then flush. No generation
    /// ≥ 2 is written before every blank is gone — such a generation would mark the first
    /// write complete, and a crash in the middle would leave blanks that then read as damage.
    /// The pairs this fills are resolved against the data by the second stage like any other.
    /// Returns the group's state afterwards, if anything was written.
    fn complete_first_write(
        &self,
        m: &mut Maintenance<'_>,
        group: u64,
        old: &GroupState,
        report: &mut RecoveryReport,
    ) -> Result<Option<std::sync::Arc<GroupState>>> {
        let torn: Vec<usize> = (0..old.pairs())
            .filter(|&k| matches!(old.view(k), PairView::TornFirst { .. }))
            .collect();
        if torn.is_empty() {
            return Ok(None);
        }
        let mut w = old.writer(&self.sb.uuid, group);
        for &k in &torn {
            let count = self.geo.tags_in_sector(group, u32_of_small(k));
            let unwritten = w.tags_of(None, k, count);
            let [s0, s1] = old.pair(k);
            if s0 == SectorParse::Empty {
                w.put(0, k, 1, &unwritten);
            }
            if s1 == SectorParse::Empty {
                w.put(1, k, 0, &unwritten);
            }
        }
        let (new, slots) = w.finish_loaded(&self.geo, true);
        let update = self.meta_update(group, new, slots);
        m.write_metadata(std::slice::from_ref(&update))?;
        m.make_durable("flushing a completed first write")?;
        report.pairs_completed += torn.len() as u64;
        Ok(Some(update.state))
    }

    /// Which brother's version block `j` of pair `k` holds (read until two reads agree).
    pub(crate) fn which_version(
        &self,
        group: u64,
        state: &GroupState,
        k: usize,
        j: usize,
        newest: u8,
    ) -> Result<Version> {
        let per = self.geo.tags_per_sector() as usize;
        let block = self.geo.first_block(group) + (k * per + j) as u64;
        let mut buf = vec![0u8; self.geo.block_size as usize];
        // What this read decides is written down: one bad read must not become permanent.
        self.read_confirmed(
            &mut buf,
            self.geo.data_offset(block),
            "reading data to settle a group",
        )?;
        // As a read takes them (generation 0's tags are unwritten whatever a scar did).
        let newest_tag = state.tag(newest, k, j);
        let older_tag = match state.view(k) {
            PairView::Brothers { .. } => state.tag(1 - newest, k, j),
            _ => UNWRITTEN,
        };
        let t = &self.tagger;
        Ok(if t.verify(block, &buf, &newest_tag) {
            Version::Newest
        } else if t.verify(block, &buf, &older_tag) {
            Version::Older
        } else {
            Version::Neither
        })
    }
}

/// Which version of a block the disk holds, after a crash.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Version {
    /// The one the newest brother describes.
    Newest,
    /// The one the older brother describes (the newest never landed).
    Older,
    /// Neither (damaged, or torn).
    Neither,
}

/// The generation of slot `slot` of pair `k`, known valid.
fn generation_of(state: &GroupState, k: usize, slot: u8) -> u64 {
    let g = state.pair(k)[slot as usize].generation();
    assert!(g.is_some(), "pair {k}: slot {slot} is not valid");
    g.unwrap_or_default()
}

/// The valid slot a damaged pair can be rebuilt from: exactly one valid brother, whose
/// generation can still be followed.
fn rebuildable(state: &GroupState, k: usize) -> Option<u8> {
    let [a, b] = state.pair(k);
    let slot = match (a.generation(), b.generation()) {
        (Some(_), None) => 0,
        (None, Some(_)) => 1,
        _ => return None,
    };
    let g = state.pair(k)[slot as usize].generation()?;
    // The rebuilt brother takes generation g + 1, which must belong in the other slot (it
    // does, by parity) and must not be the all-unwritten generation 0.
    (g < u64::MAX - 2).then_some(slot)
}

/// True if `lo..hi` lies inside one of the sorted, merged `ranges`.
pub(crate) fn covered(ranges: &[std::ops::Range<u64>], lo: u64, hi: u64) -> bool {
    let i = ranges.partition_point(|r| r.end <= lo);
    ranges.get(i).is_some_and(|r| r.start <= lo && hi <= r.end)
}
