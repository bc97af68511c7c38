//! One group's metadata as the engine sees it: two brother blocks, each a row of 512-byte
//! sectors that validate on their own, and the rules for which tags a read may accept.
//!
//! Sector `k` of slot 0 and sector `k` of slot 1 form *pair* `k`, the two brothers of the
//! tags of blocks `k·P .. k·P + P` (P tags per sector). Every rule below is per pair.
//!
//! What can explain a pair's state (see `docs/CONSISTENCY.md` for the argument):
//! - a crash never makes a sector invalid (sectors are written atomically) and never blanks a
//!   written one; the only blank sectors a crash leaves are those of a group's first write;
//! - so an invalid sector, or a blank one once the group's first write is known complete, is
//!   *damage*, and a read of the pair's blocks fails unless this process itself wrote the
//!   pair's newest brother (then it knows which one is the newest);
//! - a *scarred* sector (intact header, damaged body) is damage too, but its header proves its
//!   generation: the pair still knows its newest brother. A scarred older brother costs
//!   nothing (settled reads never use it); a scarred newest one still serves every block whose
//!   data matches its tag — a tag the damage hit matches no data, so it fails that block alone.

use super::bitmaps::MapBit;
use crate::cast::u32_of_small;
use crate::format::{
    decode_sector, encode_sector, sector_tag, Geometry, Mode, SectorDamage, SectorId, SectorParse,
    SECTOR_SIZE,
};
use crate::tag::{Tag, UNWRITTEN};
use std::fmt;

/// Where a group's state came from, which decides what a pair's state can mean.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(crate) enum Origin {
    /// Read from disk.
    Loaded {
        /// The volume was not closed cleanly and has not been recovered since, and the
        /// dirty-groups map marks this group: a crash may have left a pair whose older
        /// brother still describes the data on disk.
        after_crash: bool,
        /// Also the first-write map marks it: the group's first write happened in the window
        /// the crash cut, so blank sectors may be that write's halves that never landed.
        first_write: bool,
        /// A second read returned the same bytes, so no transient bad read is in them.
        confirmed: bool,
    },
    /// Written by this process in commit `epoch`: `known[k]` is the slot it made the newest of
    /// pair `k` (`None` for a damaged pair it left alone).
    Written { epoch: u64, known: Box<[Option<u8>]> },
}

/// Why a pair's tags cannot be trusted.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Damage {
    /// One sector fails its checks and the other cannot be proven to be the newest.
    Invalid { slot: u8, why: SectorDamage },
    /// Both sectors fail their checks.
    BothInvalid { why: SectorDamage },
    /// A blank sector beside a written one, where no crash can explain it.
    Blank { slot: u8 },
    /// Both sectors blank although the group has been written.
    BothBlank,
    /// Every metadata sector of the group blank, although the written-groups map says the
    /// group was written (wiped metadata: its data may be gone with it).
    WrittenGroupBlank,
    /// Every metadata sector of the group blank, and both copies of the written-groups map
    /// sector that would say whether it was written are damaged: unknown, so not zeros.
    BlankMapUnknown,
    /// A generation too large to ever be followed (only a forged sector holds one).
    Exhausted,
    /// The newest brother is scarred (its header intact, its body damaged): its tags are used
    /// only where the data matches them, and this block's data does not match.
    Scarred { slot: u8, why: SectorDamage },
    /// After a crash: the older brother is scarred and the block matches no tag offered; if
    /// the crash rolled the block back, the tag it matches was in that damaged sector.
    ScarredOlder { slot: u8, why: SectorDamage },
}

impl fmt::Display for Damage {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Damage::Invalid { slot, why } => write!(
                f,
                "metadata slot {slot} is damaged ({why}); slot {} cannot be proven to hold the newest tags",
                1 - slot
            ),
            Damage::BothInvalid { why } => write!(f, "both metadata copies are damaged ({why})"),
            Damage::Blank { slot } => write!(
                f,
                "metadata slot {slot} is blank although the group was written; slot {} cannot be proven to hold the newest tags",
                1 - slot
            ),
            Damage::BothBlank => f.write_str("both metadata copies are blank although the group was written"),
            Damage::WrittenGroupBlank => f.write_str(
                "the group's metadata is blank although the written-groups map says it was written (wiped?)",
            ),
            Damage::BlankMapUnknown => f.write_str(
                "the group's metadata is blank and both copies of its written-groups map sector are \
                 damaged, so whether it was ever written is unknown (`blockguard recover --rebuild` \
                 rebuilds the map)",
            ),
            Damage::Exhausted => f.write_str("metadata generation counter exhausted (forged metadata)"),
            Damage::Scarred { slot, why } => write!(
                f,
                "metadata slot {slot} holds the newest tags but its sector is damaged ({why}); its \
                 header is intact, so the blocks whose data matches their tag still read, and this \
                 block's data does not match (the damage hit its tag, or its data)"
            ),
            Damage::ScarredOlder { slot, why } => write!(
                f,
                "the block does not match its tag; if a crash rolled it back to the version the \
                 older brother (slot {slot}) describes, that tag is in a damaged sector ({why}; \
                 its header is intact)"
            ),
        }
    }
}

/// The tags a block's data may match.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Accept {
    /// Exactly this tag.
    One(Tag),
    /// Either tag: the newest brother's, or the older one kept until the data is durable.
    Either(Tag, Tag),
    /// The newest brother is scarred: its tag (or, after a crash, the older brother's) is
    /// accepted only as any tag is — by matching the data — and a mismatch is reported as
    /// damaged metadata (`why`), since the tag may be what the damage hit.
    Salvaged {
        newest: Tag,
        older: Option<Tag>,
        why: Damage,
    },
    /// No trustworthy metadata: the reason is reported, the data never returned.
    Damaged(Damage),
}

impl Accept {
    /// True when the only accepted state is "never written" (reads as zeros).
    pub(crate) fn only_unwritten(&self) -> bool {
        match self {
            Accept::One(t) => t.is_unwritten(),
            Accept::Either(a, b) => a.is_unwritten() && b.is_unwritten(),
            // Never a hole on the word of a damaged sector.
            Accept::Salvaged { .. } | Accept::Damaged(_) => false,
        }
    }
}

/// How one pair reads, before a block index picks a tag out of it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum PairView {
    /// Both brothers valid; `newest` is the slot with the higher generation. `older_ok`: the
    /// older brother may still describe the data (a crash may have cut the last commit short).
    Brothers { newest: u8, older_ok: bool },
    /// Only the newest brother is trusted: this process wrote it (whatever the other holds), or
    /// the mode keeps one copy.
    Known { newest: u8 },
    /// A group's first write cut short by a crash: slot 0 (generation 1, the new tags) may
    /// have landed, slot 1 (generation 0, all unwritten) may have; either describes the disk.
    TornFirst { slot0: bool },
    /// Never written: every block reads as zeros.
    Unwritten,
    /// Not trustworthy.
    Damaged(Damage),
}

/// A group's metadata: both slots' bytes as on disk, their parsed sectors, and what this
/// process knows about them.
#[derive(Clone, Debug)]
pub(crate) struct GroupState {
    /// Both slots' bytes, slot 0 then slot 1 (`2·B`), exactly as read or written.
    raw: Box<[u8]>,
    /// Per pair: the parsed sector of slot 0 and of slot 1.
    sectors: Box<[[SectorParse; 2]]>,
    /// Some sector is not blank: the group has been written (its first write at least began).
    any_written: bool,
    /// Some valid sector has generation ≥ 2: the group's first write completed (a second
    /// write happened, which only follows a completed first one), so no sector of it may
    /// be blank any more.
    initialized: bool,
    /// What the written-groups map says, for a group whose metadata is all blank.
    map: MapBit,
    pub origin: Origin,
    /// Per pair, a slot whose tag every state of the pair accepts (the read fast path).
    fast: Box<[Option<u8>]>,
    mode: Mode,
    block_size: usize,
    tag_size: usize,
    per: usize,
}

/// A group's new metadata being built by a commit or by recovery.
pub(crate) struct GroupWriter<'a> {
    base: &'a GroupState,
    uuid: &'a [u8; 16],
    group: u64,
    raw: Box<[u8]>,
    sectors: Box<[[SectorParse; 2]]>,
    known: Box<[Option<u8>]>,
    slots_written: [bool; 2],
}

impl GroupState {
    /// Parses both slots of `group` from `raw` (`2·B` bytes, slot 0 then slot 1); `map` is
    /// what the written-groups map says about the group (consulted only when every sector is
    /// blank).
    pub(crate) fn parse(
        geo: &Geometry,
        mode: Mode,
        uuid: &[u8; 16],
        group: u64,
        raw: Box<[u8]>,
        origin: Origin,
        map: MapBit,
    ) -> Self {
        let bs = geo.block_size as usize;
        debug_assert_eq!(raw.len(), 2 * bs);
        let ts = geo.tag_size as usize;
        let pairs = geo.sectors_per_meta();
        let sectors: Box<[[SectorParse; 2]]> = (0..pairs)
            .map(|k| {
                let count = geo.tags_in_sector(group, k);
                [0u8, 1].map(|slot| {
                    let at = slot as usize * bs + k as usize * SECTOR_SIZE;
                    let id = SectorId {
                        group,
                        index: k,
                        slot,
                    };
                    decode_sector(&raw[at..at + SECTOR_SIZE], uuid, id, count, ts)
                })
            })
            .collect();
        Self::assemble(geo, mode, raw, sectors, origin, map)
    }

    fn assemble(
        geo: &Geometry,
        mode: Mode,
        raw: Box<[u8]>,
        sectors: Box<[[SectorParse; 2]]>,
        origin: Origin,
        map: MapBit,
    ) -> Self {
        debug_assert!(
            sectors.iter().all(|pair| (0..2u8).all(|slot| pair[slot as usize]
                .header_generation()
                .is_none_or(|g| crate::format::slot_of_generation(g) == slot))),
            "a valid or scarred sector's generation belongs in its slot"
        );
        let any_written = sectors.iter().flatten().any(|s| *s != SectorParse::Empty);
        // A scarred sector's generation is as certain as a valid one's.
        let initialized = sectors
            .iter()
            .flatten()
            .any(|s| s.header_generation().is_some_and(|g| g >= 2));
        let mut state = GroupState {
            raw,
            fast: vec![None; sectors.len()].into(),
            sectors,
            any_written,
            initialized,
            map,
            origin,
            mode,
            block_size: geo.block_size as usize,
            tag_size: geo.tag_size as usize,
            per: geo.tags_per_sector() as usize,
        };
        state.fast = (0..state.sectors.len()).map(|k| state.fast_slot(k)).collect();
        state
    }

    /// The bytes of both slots, as on disk.
    pub(crate) fn raw(&self) -> &[u8] {
        &self.raw
    }

    /// Number of pairs (sectors per metadata block).
    pub(crate) fn pairs(&self) -> usize {
        self.sectors.len()
    }

    /// The parsed sectors of pair `k`.
    pub(crate) fn pair(&self, k: usize) -> [SectorParse; 2] {
        self.sectors[k]
    }

    /// True if any sector of the group is not blank.
    pub(crate) fn any_written(&self) -> bool {
        self.any_written
    }

    /// True if the group was never written: every sector blank, and the written-groups map
    /// says so. A map sector with no valid copy cannot: both of its copies and the group
    /// would have to be damaged, but returning zeros for a wiped group would be wrong data
    /// returned silently, so such a group is reported instead (until `recover --rebuild`).
    pub(crate) fn never_written(&self) -> bool {
        !self.any_written && self.map == MapBit::Clear
    }

    /// True when the state came from a disk read not yet confirmed by a second one.
    pub(crate) fn unconfirmed(&self) -> bool {
        matches!(self.origin, Origin::Loaded { confirmed: false, .. })
    }

    /// The bytes of tag `j` in sector `k` of `slot`.
    pub(crate) fn tag_bytes(&self, slot: u8, k: usize, j: usize) -> &[u8] {
        let at = slot as usize * self.block_size + k * SECTOR_SIZE;
        sector_tag(&self.raw[at..at + SECTOR_SIZE], j, self.tag_size)
    }

    /// The tag of block `j` of pair `k` in `slot`, as a read takes it.
    pub(crate) fn tag(&self, slot: u8, k: usize, j: usize) -> Tag {
        // Generation 0 holds only unwritten tags by definition, whatever a scar did to them.
        if self.sectors[k][slot as usize].header_generation() == Some(0) {
            return UNWRITTEN;
        }
        Tag::from_bytes(self.tag_bytes(slot, k, j))
    }

    /// Which slots of pair `k` are scarred (intact header, damaged body).
    pub(crate) fn scars(&self, k: usize) -> [bool; 2] {
        self.sectors[k].map(|s| s.is_scarred())
    }

    /// The damage of pair `k`'s newest brother when it is scarred, as the pair reads.
    fn scarred_newest(&self, k: usize, newest: u8) -> Option<Damage> {
        match self.sectors[k][newest as usize] {
            SectorParse::Scarred { why, .. } => Some(Damage::Scarred { slot: newest, why }),
            _ => None,
        }
    }

    /// What is scarred in pair `k`, for a pair that still reads (its newest brother known);
    /// `None` when nothing is.
    pub(crate) fn scar_note(&self, k: usize) -> Option<String> {
        let (PairView::Brothers { newest, .. } | PairView::Known { newest }) = self.view(k) else {
            return None;
        };
        let notes: Vec<String> = (0..2u8)
            .filter_map(|slot| match self.sectors[k][slot as usize] {
                SectorParse::Scarred { generation, why } => Some(if slot == newest {
                    format!(
                        "metadata slot {slot} is scarred ({why}; its header is intact, generation \
                         {generation}) and holds the newest tags: blocks whose data matches their \
                         tag still read, the others fail; `blockguard scrub --repair` rewrites it \
                         once every block proves its tag"
                    )
                } else {
                    format!(
                        "metadata slot {slot} is scarred ({why}; its header is intact, generation \
                         {generation}); it is the older brother, which reads do not need: the \
                         group's next write or `blockguard scrub --repair` rewrites it"
                    )
                }),
                _ => None,
            })
            .collect();
        (!notes.is_empty()).then(|| notes.join("; "))
    }

    /// Why a write may not copy pair `k`'s tags forward: its tags cannot be trusted (damaged).
    /// `None`: the pair can be written. A scarred newest brother can: a tag the damage hit
    /// matches no data, copied forward or not, so its block keeps failing (as a tag mismatch
    /// once the sector holding it is valid again). Refusing the write instead would lose it —
    /// or, in a journal's replay, drop a flushed write whose block then reads back as the
    /// previous version, which its intact old tag still describes (the review found both).
    pub(crate) fn write_blocker(&self, k: usize) -> Option<Damage> {
        match self.view(k) {
            PairView::Damaged(d) => Some(d),
            _ => None,
        }
    }

    /// Pair and position inside it of the block with `index` in the group.
    pub(crate) fn locate(&self, index: usize) -> (usize, usize) {
        (index / self.per, index % self.per)
    }

    /// Lenient rules (a crash may explain blanks and older brothers) apply to states loaded
    /// from a volume that was not closed cleanly and not recovered since.
    fn after_crash(&self) -> bool {
        matches!(
            self.origin,
            Origin::Loaded {
                after_crash: true,
                ..
            }
        )
    }

    /// Blank sectors may be a first write cut short by a crash: after a crash, in a group whose
    /// first write was in the crash's window and not yet followed by a second one.
    fn torn_first_possible(&self) -> bool {
        !self.initialized
            && matches!(
                self.origin,
                Origin::Loaded {
                    after_crash: true,
                    first_write: true,
                    ..
                }
            )
    }

    /// How pair `k` reads.
    pub(crate) fn view(&self, k: usize) -> PairView {
        use SectorParse::{Empty, Invalid, Scarred, Valid};
        let [s0, s1] = self.sectors[k];
        if self.mode.single_copy_tags() {
            // One copy, rewritten in place: no brothers (its crash promises, if any, come
            // from rebuilding the tags of the groups a crash may have cut short).
            return match s0 {
                Valid { .. } | Scarred { .. } => PairView::Known { newest: 0 },
                // Every write of a group rewrites all of its sectors, a discard included (its
                // tags become the unwritten tag under a valid header): a blank one in a group
                // that was written is damage (a wiped group), unless a crash may have cut the
                // group's first write short — in `rebuild` the write-intent map says so, in
                // `journal` the written-groups map (a first write's bit reaches the disk only
                // after the group's metadata is durable, so while it is clear a torn first
                // write may have left blank sectors).
                Empty if self.map == MapBit::Clear || self.after_crash() => PairView::Unwritten,
                Empty if !self.any_written && matches!(self.map, MapBit::Damaged(_)) => {
                    PairView::Damaged(Damage::BlankMapUnknown)
                }
                Empty if !self.any_written => PairView::Damaged(Damage::WrittenGroupBlank),
                Empty => PairView::Damaged(Damage::Blank { slot: 0 }),
                Invalid(why) => PairView::Damaged(Damage::Invalid { slot: 0, why }),
            };
        }
        if let Origin::Written { known, .. } = &self.origin {
            if let Some(newest) = known[k] {
                // This process wrote the newest sector and serves every block of its batch from
                // the stage until the block's data is written: no state of this session ever
                // needs the older tag. Accepting it would let a lost, misdirected or torn data
                // write — or one stale read — return the previous version without an error.
                return PairView::Known { newest };
            }
        }
        let lenient = self.after_crash();
        match (s0, s1) {
            (
                Valid { generation: g0 } | Scarred { generation: g0, .. },
                Valid { generation: g1 } | Scarred { generation: g1, .. },
            ) => {
                // Valid or scarred alike: both generations are certain, so is the newest.
                let (newest, n, o) = if g0 > g1 { (0, g0, g1) } else { (1, g1, g0) };
                if n == u64::MAX {
                    return PairView::Damaged(Damage::Exhausted);
                }
                PairView::Brothers {
                    newest,
                    older_ok: lenient && o + 1 == n,
                }
            }
            (Valid { .. }, Empty) | (Empty, Valid { .. }) => {
                if self.torn_first_possible() {
                    // Without a generation ≥ 2 the valid one is slot 0's generation 1 or
                    // slot 1's generation 0 (parity): the first write's two halves.
                    PairView::TornFirst { slot0: s0 != Empty }
                } else {
                    let blank = u8::from(s0 != Empty);
                    PairView::Damaged(Damage::Blank { slot: blank })
                }
            }
            (Empty, Empty) => {
                if self.never_written() {
                    PairView::Unwritten
                } else if self.torn_first_possible() {
                    // A first write cut short: the map (or another pair) landed, this pair not.
                    PairView::TornFirst { slot0: false }
                } else if !self.any_written && matches!(self.map, MapBit::Damaged(_)) {
                    PairView::Damaged(Damage::BlankMapUnknown)
                } else if !self.any_written {
                    PairView::Damaged(Damage::WrittenGroupBlank)
                } else {
                    PairView::Damaged(Damage::BothBlank)
                }
            }
            (Invalid(a) | Scarred { why: a, .. }, Invalid(_) | Scarred { .. }) => {
                PairView::Damaged(Damage::BothInvalid { why: a })
            }
            // A scar beside a blank: the blank's generation is unknown, so is the newest.
            (Invalid(why) | Scarred { why, .. }, _) => PairView::Damaged(Damage::Invalid { slot: 0, why }),
            (_, Invalid(why) | Scarred { why, .. }) => PairView::Damaged(Damage::Invalid { slot: 1, why }),
        }
    }

    /// Which tags data block `index` of this group may match.
    pub(crate) fn accept(&self, index: usize) -> Accept {
        let (k, j) = self.locate(index);
        match self.view(k) {
            PairView::Brothers { newest, older_ok } => {
                let n = self.tag(newest, k, j);
                let older = older_ok.then(|| self.tag(1 - newest, k, j));
                // A scarred older brother: its tags are offered after a crash like any older
                // brother's, a block matching neither reported as damaged metadata (its
                // rolled-back version's tag may be what the scar hit). Settled, it is not
                // offered and costs nothing.
                let scarred_older = match self.sectors[k][1 - newest as usize] {
                    SectorParse::Scarred { why, .. } if older_ok => Some(Damage::ScarredOlder {
                        slot: 1 - newest,
                        why,
                    }),
                    _ => None,
                };
                match (self.scarred_newest(k, newest).or(scarred_older), older) {
                    (Some(why), older) => Accept::Salvaged {
                        newest: n,
                        older,
                        why,
                    },
                    (None, Some(o)) => Accept::Either(n, o),
                    (None, None) => Accept::One(n),
                }
            }
            PairView::Known { newest } => {
                let n = self.tag(newest, k, j);
                // A sector this process wrote is never scarred in its cache, but a single-copy
                // mode's only sector can be (also one a commit left alone as damaged).
                match self.scarred_newest(k, newest) {
                    Some(why) => Accept::Salvaged {
                        newest: n,
                        older: None,
                        why,
                    },
                    None => Accept::One(n),
                }
            }
            PairView::TornFirst { slot0: true } => Accept::Either(self.tag(0, k, j), UNWRITTEN),
            PairView::TornFirst { slot0: false } | PairView::Unwritten => Accept::One(UNWRITTEN),
            PairView::Damaged(d) => Accept::Damaged(d),
        }
    }

    /// A slot whose tag for any block of pair `k` is accepted in every state (settled or
    /// not), so a match needs no further look-up.
    fn fast_slot(&self, k: usize) -> Option<u8> {
        match self.view(k) {
            PairView::Brothers { newest, .. } | PairView::Known { newest } => Some(newest),
            PairView::TornFirst { slot0: true } => Some(0),
            _ => None,
        }
    }

    /// The stored bytes of block `index`'s tag in a brother that every state accepts, if any.
    pub(crate) fn fast_tag(&self, index: usize) -> Option<&[u8]> {
        let (k, j) = self.locate(index);
        self.fast[k].map(|slot| self.tag_bytes(slot, k, j))
    }

    /// The slot and generation the next write of pair `k` starts from: the newest brother,
    /// when it can be told. Only for settled groups of read-write sessions.
    pub(crate) fn newest_for_write(&self, k: usize) -> Option<(u8, u64)> {
        let (PairView::Brothers { newest, .. } | PairView::Known { newest }) = self.view(k) else {
            return None;
        };
        // A scarred newest brother's generation is proven by its header: its tags are copied
        // forward like any (see `write_blocker`).
        let generation = self.sectors[k][newest as usize].header_generation()?;
        (generation < u64::MAX - 2).then_some((newest, generation))
    }

    /// Starts building this group's next metadata.
    pub(crate) fn writer<'a>(&'a self, uuid: &'a [u8; 16], group: u64) -> GroupWriter<'a> {
        GroupWriter {
            base: self,
            uuid,
            group,
            raw: self.raw.clone(),
            sectors: self.sectors.clone(),
            known: vec![None; self.sectors.len()].into(),
            slots_written: [false; 2],
        }
    }
}

impl GroupWriter<'_> {
    /// The tags pair `k` starts from in its next version: those of `slot`, or all unwritten.
    pub(crate) fn tags_of(&self, slot: Option<u8>, k: usize, count: usize) -> Vec<u8> {
        let ts = self.base.tag_size;
        match slot {
            Some(s) => {
                // The tags of a sector lie side by side after its header.
                let at =
                    s as usize * self.base.block_size + k * SECTOR_SIZE + crate::format::SECTOR_HEADER_SIZE;
                self.base.raw[at..at + count * ts].to_vec()
            }
            None => vec![0; count * ts],
        }
    }

    /// Puts a new sector `k` into `slot` with `generation` and `tags`.
    pub(crate) fn put(&mut self, slot: u8, k: usize, generation: u64, tags: &[u8]) {
        let bs = self.base.block_size;
        let at = slot as usize * bs + k * SECTOR_SIZE;
        let id = SectorId {
            group: self.group,
            index: u32_of_small(k),
            slot,
        };
        let sector = &mut self.raw[at..at + SECTOR_SIZE];
        encode_sector(sector, self.uuid, id, generation, tags);
        // What is about to be written must read back as written: a sector that did not would
        // be damage this process made itself.
        let count = tags.len() / self.base.tag_size;
        assert_eq!(
            decode_sector(sector, self.uuid, id, count, self.base.tag_size),
            SectorParse::Valid { generation },
            "group {} sector {k} slot {slot}: an encoded metadata sector does not decode",
            self.group
        );
        self.sectors[k][slot as usize] = SectorParse::Valid { generation };
        self.slots_written[slot as usize] = true;
    }

    /// Records that this process made `slot` the newest brother of pair `k`.
    pub(crate) fn set_known(&mut self, k: usize, slot: u8) {
        self.known[k] = Some(slot);
    }

    /// The finished state (origin `Written` at `epoch`), and which slots changed.
    pub(crate) fn finish(self, geo: &Geometry, epoch: u64) -> (GroupState, [bool; 2]) {
        for (k, known) in self.known.iter().enumerate() {
            if let Some(slot) = known {
                // Whatever this process calls the newest brother must be one it can read back.
                assert!(
                    matches!(self.sectors[k][*slot as usize], SectorParse::Valid { .. }),
                    "pair {k} of group {}: the newest brother is not valid",
                    self.group
                );
            }
        }
        let origin = Origin::Written {
            epoch,
            known: self.known,
        };
        let state = GroupState::assemble(geo, self.base.mode, self.raw, self.sectors, origin, MapBit::Set);
        (state, self.slots_written)
    }

    /// Like [`GroupWriter::finish`], for recovery: the result is a loaded state, read with the
    /// after-crash rules while recovery is still going (`after_crash`).
    pub(crate) fn finish_loaded(self, geo: &Geometry, after_crash: bool) -> (GroupState, [bool; 2]) {
        let origin = Origin::Loaded {
            after_crash,
            first_write: after_crash,
            confirmed: true,
        };
        let state = GroupState::assemble(geo, self.base.mode, self.raw, self.sectors, origin, MapBit::Set);
        (state, self.slots_written)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::format::{encode_sector, SECTOR_SIZE};
    use crate::tag::Profile;

    const U: [u8; 16] = [3; 16];

    fn geo() -> Geometry {
        // 512-byte blocks: one pair per group, 62 blocks.
        Geometry::for_size(512 * 62 * 2, 512, 8).unwrap()
    }

    fn t(fill: u8) -> Tag {
        Profile::Crc32c
            .tagger(&U, None)
            .unwrap()
            .generate(0, &[fill; 512])
    }

    /// A sector for pair 0 of group 0 holding `tag` for block 0.
    fn sector(slot: u8, generation: u64, tag: Tag) -> Vec<u8> {
        let mut tags = vec![0u8; 62 * 8];
        if generation != 0 {
            tags[..8].copy_from_slice(&tag.to_bytes(8)[..8]);
        }
        let mut s = vec![0u8; SECTOR_SIZE];
        let id = SectorId {
            group: 0,
            index: 0,
            slot,
        };
        encode_sector(&mut s, &U, id, generation, &tags);
        s
    }

    fn state(s0: Option<Vec<u8>>, s1: Option<Vec<u8>>, after_crash: bool) -> GroupState {
        let mut raw = vec![0u8; 1024];
        if let Some(s) = s0 {
            raw[..512].copy_from_slice(&s);
        }
        if let Some(s) = s1 {
            raw[512..].copy_from_slice(&s);
        }
        let origin = Origin::Loaded {
            after_crash,
            first_write: after_crash,
            confirmed: true,
        };
        let map = if raw.iter().all(|&b| b == 0) {
            MapBit::Clear
        } else {
            MapBit::Set
        };
        GroupState::parse(&geo(), Mode::Dual, &U, 0, raw.into(), origin, map)
    }

    /// A sector of slot 0 whose header is damaged: its generation is unknown.
    fn garbage() -> Vec<u8> {
        let mut s = sector(0, 1, t(1));
        s[9] ^= 1;
        s
    }

    /// `sector(slot, generation, tag)` with its body damaged (`at` ≥ 16, or the checksum).
    fn scarred(slot: u8, generation: u64, tag: Tag, at: usize) -> Vec<u8> {
        let mut s = sector(slot, generation, tag);
        s[at] ^= 0x40;
        s
    }

    #[test]
    fn settled_volumes_accept_only_the_newest_and_call_blanks_damage() {
        let (a, b) = (t(1), t(2));
        let s = state(Some(sector(0, 3, b)), Some(sector(1, 2, a)), false);
        assert_eq!(s.accept(0), Accept::One(b));
        assert_eq!(s.accept(1), Accept::One(UNWRITTEN));
        // The first write leaves (1, 0): settled, only generation 1's tags.
        let s = state(Some(sector(0, 1, a)), Some(sector(1, 0, a)), false);
        assert_eq!(s.accept(0), Accept::One(a));
        // A blank or damaged brother next to a valid one: the valid one may be the older.
        let s = state(Some(sector(0, 3, a)), None, false);
        assert_eq!(s.accept(0), Accept::Damaged(Damage::Blank { slot: 1 }));
        let s = state(Some(sector(0, 1, a)), None, false);
        assert!(matches!(s.accept(0), Accept::Damaged(Damage::Blank { slot: 1 })));
        let s = state(Some(garbage()), Some(sector(1, 2, a)), false);
        assert!(matches!(
            s.accept(0),
            Accept::Damaged(Damage::Invalid { slot: 0, .. })
        ));
        let s = state(Some(garbage()), Some(garbage()), false);
        assert!(matches!(s.accept(0), Accept::Damaged(Damage::BothInvalid { .. })));
        assert_eq!(state(None, None, false).accept(0), Accept::One(UNWRITTEN));
    }

    #[test]
    fn after_a_crash_older_brothers_and_torn_first_writes_are_accepted() {
        let (a, b) = (t(1), t(2));
        let s = state(Some(sector(0, 3, b)), Some(sector(1, 2, a)), true);
        assert_eq!(s.accept(0), Accept::Either(b, a));
        // Generations further apart: only the newest ever describes the disk.
        let s = state(Some(sector(0, 5, b)), Some(sector(1, 2, a)), true);
        assert_eq!(s.accept(0), Accept::One(b));
        // The first write's halves: slot 0 landed, slot 1 not, and the other way round.
        let s = state(Some(sector(0, 1, a)), None, true);
        assert_eq!(s.accept(0), Accept::Either(a, UNWRITTEN));
        let s = state(None, Some(sector(1, 0, a)), true);
        assert_eq!(s.accept(0), Accept::One(UNWRITTEN));
        // Generation 3 proves the first write completed: a blank is damage even now.
        let s = state(Some(sector(0, 3, a)), None, true);
        assert!(matches!(s.accept(0), Accept::Damaged(Damage::Blank { slot: 1 })));
        // An invalid sector is never a crash's doing.
        let s = state(Some(garbage()), None, true);
        assert!(matches!(
            s.accept(0),
            Accept::Damaged(Damage::Invalid { slot: 0, .. })
        ));
    }

    #[test]
    fn this_process_knows_its_newest_brother() {
        let a = t(1);
        let g = geo();
        let base = state(Some(sector(0, 3, a)), Some(sector(1, 2, a)), false);
        let mut w = base.writer(&U, 0);
        let tags = w.tags_of(Some(0), 0, 62);
        w.put(1, 0, 4, &tags);
        w.set_known(0, 1);
        let (s, written) = w.finish(&g, 7);
        assert_eq!(written, [false, true]);
        // Before and after the flush alike: only the tag this process wrote.
        assert_eq!(s.accept(0), Accept::One(a));
        assert_eq!(s.accept(0), Accept::One(a));
        assert_eq!(s.newest_for_write(0), Some((1, 4)));
        assert_eq!(s.fast_tag(0), Some(&a.to_bytes(8)[..8]));
    }

    #[test]
    fn a_scar_keeps_the_newest_known_and_its_tags_only_matchable() {
        let (a, b) = (t(1), t(2));
        // The older brother scarred: settled reads never use it.
        let s = state(Some(scarred(0, 1, a, 300)), Some(sector(1, 2, b)), false);
        assert_eq!(s.accept(0), Accept::One(b));
        assert_eq!(s.scars(0), [true, false]);
        assert_eq!(s.newest_for_write(0), Some((1, 2)));
        assert!(s.write_blocker(0).is_none());
        assert!(s.scar_note(0).is_some_and(|n| n.contains("older")));
        // After a crash its tags are offered like any older brother's, a mismatch of both
        // reported as metadata damage (the older tag may be what the scar hit).
        let s = state(Some(scarred(0, 1, a, 300)), Some(sector(1, 2, b)), true);
        assert!(matches!(
            s.accept(0),
            Accept::Salvaged { newest, older: Some(o), why: Damage::ScarredOlder { slot: 0, .. } }
                if newest == b && o == a
        ));
        // The newest scarred: its tag, only by matching; a write copies its tags forward (a
        // damaged one keeps failing its block).
        let s = state(Some(sector(0, 1, a)), Some(scarred(1, 2, b, 5)), false);
        assert!(matches!(
            s.accept(0),
            Accept::Salvaged { newest, older: None, why: Damage::Scarred { slot: 1, .. } } if newest == b
        ));
        assert!(!s.accept(1).only_unwritten(), "never a hole on a scar's word");
        assert_eq!(s.newest_for_write(0), Some((1, 2)));
        assert!(s.write_blocker(0).is_none());
        // Generation 0's tags are unwritten whatever the scar did to them.
        let s = state(Some(sector(0, 1, a)), Some(scarred(1, 0, a, 20)), true);
        assert!(matches!(
            s.accept(0),
            Accept::Salvaged { newest, older: Some(o), .. } if newest == a && o == UNWRITTEN
        ));
        // A scar beside a blank proves nothing: the blank's generation is unknown.
        let s = state(Some(scarred(0, 3, a, 40)), None, false);
        assert!(matches!(
            s.accept(0),
            Accept::Damaged(Damage::Invalid { slot: 0, .. })
        ));
    }

    #[test]
    fn only_unwritten() {
        assert!(Accept::One(UNWRITTEN).only_unwritten());
        assert!(!Accept::Either(t(1), UNWRITTEN).only_unwritten());
        assert!(!Accept::Damaged(Damage::BothBlank).only_unwritten());
    }
}
