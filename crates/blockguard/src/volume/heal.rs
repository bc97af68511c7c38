//! Healing scarred metadata sectors: a sector whose header is intact but whose body is
//! damaged (see `format::meta`) is rewritten from what is provably right, with no mirror.
//!
//! The header proves the scarred sector's generation, so the pair still knows which brother
//! is the newest (`docs/CONSISTENCY.md`, "Damage"):
//! - **the older brother is scarred**: settled reads never use it, so it is rewritten with the
//!   newest tags one generation up — exactly what the group's next commit would write there;
//! - **the newest brother is scarred**: its tags may be wrong where the damage hit, and a tag
//!   is right only if the block's data matches it. A scrub rewrites the pair only when *every*
//!   block proves its tag that way; then both slots get those tags, two generations up. One
//!   block that matches none of its tags leaves the pair as it is for a scrub: which of the tag
//!   and the data the damage hit cannot be told, and a rewrite would report the block as a
//!   data mismatch from then on instead of damaged metadata. Recovery after a crash must
//!   settle the pair anyway (left as it is, its blocks the crash legitimately rolled back
//!   would fail once the volume is marked clean): a block that proves neither brother's tag
//!   gets the torn tag, which matches no data — it keeps failing, as torn.
//!
//! Either way nothing a read accepts changes, and every sector written replaces one no
//! accepted state needs: a crash at any point leaves the old sector or the new one, and both
//! read the same.

use super::group::{GroupState, GroupWriter, PairView};
use super::recover::Version;
use super::Inner;
use crate::error::Result;
use crate::tag::Tag;

/// What settling one pair did.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum PairHeal {
    /// Nothing to write.
    Unchanged,
    /// New sectors were put into the writer: `reverted` blocks got their older tag back (after
    /// a crash), `torn` blocks that matched neither brother got the torn tag, `healed`
    /// scarred sectors were replaced. `suspect`: a block that matched neither brother while
    /// the older was scarred — its rolled-back tag may have been in the sector this rewrite
    /// replaced; it is marked torn like the others, and reported.
    Rewritten {
        reverted: u64,
        torn: u64,
        healed: u64,
        suspect: Option<u64>,
    },
    /// The newest brother is scarred and `block`'s data matches none of the tags it may have:
    /// the pair is left as it is.
    Unprovable { block: u64 },
}

/// One pair being settled: pair `k` (of `count` blocks) of `group`, as `old` holds it, whose
/// newest brother is `newest`; `older_ok` after a crash (the older brother may still describe
/// the data).
pub(crate) struct PairAt<'s> {
    pub old: &'s GroupState,
    pub group: u64,
    pub k: usize,
    pub newest: u8,
    pub older_ok: bool,
    pub count: usize,
}

/// The new tags of a pair being settled, and what they change.
struct Settled {
    tags: Vec<u8>,
    /// Blocks given their older brother's tag back.
    reverted: u64,
    /// Blocks given the torn tag ([`Tag::torn`]).
    torn: u64,
    /// See [`PairHeal::Rewritten`].
    suspect: Option<u64>,
}

/// What settling a pair found, or the block that makes the pair unsettleable.
type Reverted = std::result::Result<Settled, u64>;

impl Inner {
    /// Settles a pair: with `older_ok` every block whose data is the older brother's version
    /// gets that tag back; every scarred sector of the pair is replaced (see the module
    /// documentation). The new sectors go into `w`; the caller writes and flushes them.
    pub(crate) fn settle_pair(&self, w: &mut GroupWriter<'_>, p: &PairAt<'_>) -> Result<PairHeal> {
        let PairAt { old, k, newest, .. } = *p;
        let scars = old.scars(k);
        let older = 1 - newest;
        let Some(generation) = old.pair(k)[newest as usize].header_generation() else {
            return Ok(PairHeal::Unchanged);
        };
        if generation >= u64::MAX - 3 {
            return Ok(PairHeal::Unchanged);
        }
        let found = if scars[newest as usize] {
            self.proven_tags(p)?
        } else {
            Ok(self.reverted_tags(w, p)?)
        };
        let Settled {
            tags,
            reverted,
            torn,
            suspect,
        } = match found {
            Ok(settled) => settled,
            Err(block) => return Ok(PairHeal::Unprovable { block }),
        };
        let healed = scars.iter().filter(|&&s| s).count() as u64;
        if reverted == 0 && torn == 0 && healed == 0 {
            return Ok(PairHeal::Unchanged);
        }
        if self.sb.mode.single_copy_tags() {
            // One copy, rewritten in place (a sector is written atomically).
            w.put(0, k, generation, &tags);
            w.set_known(k, 0);
        } else {
            w.put(older, k, generation + 1, &tags);
            w.set_known(k, older);
            if scars[newest as usize] {
                // Both slots hold the proven tags: whichever of the two writes lands, the
                // pair reads the same.
                w.put(newest, k, generation + 2, &tags);
                w.set_known(k, newest);
            }
        }
        Ok(PairHeal::Rewritten {
            reverted,
            torn,
            healed,
            suspect,
        })
    }

    /// The newest tags of pair `k`, with the older brother's tag back for every block whose
    /// data is the older version (only `older_ok`, after a crash), and the torn tag for every
    /// block whose data is neither version: no version of it survived the crash whole, and
    /// the newest tag, left in place, would describe one that never reached the disk. It
    /// would then stay acceptable as the older brother of the block's next write, and a torn
    /// next write could complete that version's missing sectors (the engine model fuzzer
    /// found exactly this: a block written, torn, rewritten and torn again read back as the
    /// first torn write's version).
    ///
    /// When the older brother is scarred, the first block that matches neither tag is
    /// returned as the suspect, for the report: its older tag, which the crash may have left
    /// it matching, may be what the scar hit. It gets the torn tag all the same.
    fn reverted_tags(&self, w: &GroupWriter<'_>, p: &PairAt<'_>) -> Result<Settled> {
        let PairAt {
            old,
            group,
            k,
            newest,
            older_ok,
            count,
        } = *p;
        let mut tags = w.tags_of(Some(newest), k, count);
        let (mut reverted, mut torn) = (0, 0);
        if !older_ok {
            return Ok(Settled {
                tags,
                reverted,
                torn,
                suspect: None,
            });
        }
        let older_scarred = old.scars(k)[1 - newest as usize];
        let mut unmatched = None;
        let ts = self.geo.tag_size as usize;
        let torn_tag = Tag::torn(ts);
        for j in 0..count {
            // As a read takes them: generation 0's tags are unwritten whatever its bytes say.
            let older = old.tag(1 - newest, k, j);
            if old.tag(newest, k, j) == older {
                continue;
            }
            match self.which_version(group, old, k, j, newest)? {
                Version::Older => {
                    tags[j * ts..(j + 1) * ts].copy_from_slice(&older.to_bytes(ts)[..ts]);
                    reverted += 1;
                }
                Version::Neither => {
                    if older_scarred {
                        let per = self.geo.tags_per_sector() as usize;
                        unmatched.get_or_insert(self.geo.first_block(group) + (k * per + j) as u64);
                    }
                    if !old.tag(newest, k, j).is_torn() {
                        tags[j * ts..(j + 1) * ts].copy_from_slice(&torn_tag.to_bytes(ts)[..ts]);
                        torn += 1;
                    }
                }
                Version::Newest => {}
            }
        }
        // A block that matched neither while the older brother is scarred gets the torn tag
        // like any other (its rolled-back version's tag may be what the scar hit, so it is
        // also reported): left as it was, the newest tag would describe a version the crash
        // may have torn, and a torn next write could complete it (the outside review of the
        // torn tag showed exactly that).
        Ok(Settled {
            tags,
            reverted,
            torn,
            suspect: unmatched,
        })
    }

    /// For a pair whose newest brother is scarred: the tag every block's data proves (the
    /// newest brother's, or with `older_ok` the older's) and how many are the older's, or
    /// `Err(block)` for the first block whose data matches none. After a crash (`older_ok`)
    /// such a block gets the torn tag instead: whether the crash tore it or the scar hit its
    /// tag, no tag can vouch for what it holds.
    fn proven_tags(&self, p: &PairAt<'_>) -> Result<Reverted> {
        let (old, k, newest, count) = (p.old, p.k, p.newest, p.count);
        let mut settled = Settled {
            tags: Vec::new(),
            reverted: 0,
            torn: 0,
            suspect: None,
        };
        if count == 0 {
            // A sector past the end of a short last group: no tag to prove.
            return Ok(Ok(settled));
        }
        let bs = self.geo.block_size as usize;
        let ts = self.geo.tag_size as usize;
        let per = self.geo.tags_per_sector() as usize;
        let first = self.geo.first_block(p.group) + (k * per) as u64;
        let mut data = vec![0u8; count * bs];
        // What this read decides is written down: one bad read must not become permanent.
        self.read_confirmed(
            &mut data,
            self.geo.data_offset(first),
            "reading data to heal a metadata sector",
        )?;
        settled.tags = vec![0u8; count * ts];
        let tags = &mut settled.tags;
        for (j, block_data) in data.chunks_exact(bs).enumerate() {
            let block = first + j as u64;
            let candidates = [Some(newest), p.older_ok.then_some(1 - newest)];
            let matched = candidates
                .into_iter()
                .flatten()
                .find(|&slot| self.tagger.verify(block, block_data, &old.tag(slot, k, j)));
            match matched {
                Some(slot) => {
                    tags[j * ts..(j + 1) * ts].copy_from_slice(&old.tag(slot, k, j).to_bytes(ts)[..ts]);
                    settled.reverted += u64::from(slot != newest);
                }
                // Recovery settles the pair regardless (see the module documentation).
                None if p.older_ok => {
                    tags[j * ts..(j + 1) * ts].copy_from_slice(&Tag::torn(ts).to_bytes(ts)[..ts]);
                    settled.torn += 1;
                }
                None => return Ok(Err(block)),
            }
        }
        Ok(Ok(settled))
    }

    /// Gives the torn tag to every block of pair `k` of `group` whose data does not match its
    /// tag in `tags` (the pair's `tags.len() / T` blocks), and returns how many. For a
    /// damaged pair rebuilt from its one valid brother: such a block fails either way, and
    /// the brother's tag may describe a version a crash tore, which a torn next write could
    /// complete.
    pub(crate) fn torn_where_unmatched(&self, group: u64, k: usize, tags: &mut [u8]) -> Result<u64> {
        let ts = self.geo.tag_size as usize;
        let count = tags.len() / ts;
        if count == 0 {
            return Ok(0);
        }
        let bs = self.geo.block_size as usize;
        let first = self.geo.first_block(group) + (k * self.geo.tags_per_sector() as usize) as u64;
        let mut data = vec![0u8; count * bs];
        // What this read decides is written down: one bad read must not become permanent.
        self.read_confirmed(
            &mut data,
            self.geo.data_offset(first),
            "reading data to rebuild a metadata sector",
        )?;
        let torn = Tag::torn(ts);
        let mut marked = 0;
        for ((j, block_data), tag) in data.chunks_exact(bs).enumerate().zip(tags.chunks_exact_mut(ts)) {
            let block = first + j as u64;
            let stored = Tag::from_bytes(tag);
            if stored.is_torn()
                || self.tagger.verify(block, block_data, &stored)
                || self.some_member_matches(block, &stored)?
            {
                continue;
            }
            tag.copy_from_slice(&torn.to_bytes(ts)[..ts]);
            marked += 1;
        }
        Ok(marked)
    }

    /// True if some member in sync holds a copy of `block` that matches `tag` (read from
    /// that member alone): on a mirror set, the read above went to one member, whose copy
    /// may be the damaged one while another's is intact — read repair serves and repairs it
    /// later, so the tag must stay. (One member: its copy was just read; read again.)
    fn some_member_matches(&self, block: u64, tag: &Tag) -> Result<bool> {
        let bs = self.geo.block_size as usize;
        let mut buf = super::aligned(bs, blockguard_backend::Backend::alignment(&*self.backend).max(1));
        for member in self.backend.live() {
            self.read_member_confirmed(
                member,
                buf.as_mut(),
                self.geo.data_offset(block),
                "reading a mirror member's copy to rebuild a metadata sector",
            )?;
            if self.tagger.verify(block, buf.as_ref(), tag) {
                return Ok(true);
            }
        }
        Ok(false)
    }

    /// How many scarred sectors `group`'s metadata holds, as the engine sees it.
    pub(crate) fn scarred_sectors(&self, group: u64) -> Result<u64> {
        let state = self.confirmed_group(group)?;
        Ok((0..state.pairs())
            .map(|k| state.scars(k).iter().filter(|&&s| s).count() as u64)
            .sum())
    }

    /// Heals the scarred sectors of `group` on a settled volume (a scrub's repair): takes
    /// the commit lock for maintenance, looks at the group as the disk holds it, rewrites what
    /// [`Inner::settle_pair`] can prove, and makes it durable. Returns the sectors healed and
    /// the blocks whose pairs could not be (each with the reason).
    pub(crate) fn heal_scars(&self, group: u64) -> Result<(u64, Vec<(u64, String)>)> {
        if self.read_only || self.suspended().is_err() {
            // Nothing may be written (read-only open, or writes suspended by the error policy).
            return Ok((0, Vec::new()));
        }
        let mut m = self.maintenance("flushing before healing metadata")?;
        if !self.trusted.load(std::sync::atomic::Ordering::Acquire) {
            // Crash state is recovery's to settle, not a scrub's.
            return Ok((0, Vec::new()));
        }
        // A state this process wrote shows no scar (it is what was written); one loaded from
        // the disk shows what the disk holds.
        let old = self.confirmed_group(group)?;
        let mut w = old.writer(&self.sb.uuid, group);
        let (mut healed, mut left) = (0, Vec::new());
        for k in 0..old.pairs() {
            if !old.scars(k).contains(&true) {
                continue;
            }
            let (PairView::Brothers { newest, .. } | PairView::Known { newest }) = old.view(k) else {
                continue;
            };
            let count = self.geo.tags_in_sector(group, crate::cast::u32_of_small(k));
            let at = PairAt {
                old: &old,
                group,
                k,
                newest,
                older_ok: false,
                count,
            };
            match self.settle_pair(&mut w, &at)? {
                PairHeal::Rewritten { healed: h, .. } => healed += h,
                PairHeal::Unprovable { block } => left.push((
                    block,
                    format!("metadata sector {k} of group {group}: its newest brother is scarred and block {block} matches none of its tags"),
                )),
                PairHeal::Unchanged => {}
            }
        }
        if healed > 0 {
            let (new, slots) = w.finish_loaded(&self.geo, false);
            let update = self.meta_update(group, new, slots);
            m.write_metadata(std::slice::from_ref(&update))?;
            m.make_durable("flushing healed metadata")?;
            // Written first, installed after: a reload in between reads what was written.
            self.install(std::slice::from_ref(&update));
            tracing::warn!(volume = %self.name, group, sectors = healed, "healed scarred metadata sectors from what their headers and the data prove");
        }
        Ok((healed, left))
    }
}
