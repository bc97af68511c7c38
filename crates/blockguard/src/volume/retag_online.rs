//! Online re-tag: switching a volume to another tag profile while it is in use.
//!
//! (Not to be confused with `retag.rs`, which recomputes tags from data to settle a `rebuild`
//! volume after a crash.)
//!
//! The layout of the metadata depends on the size of its tag slots, fixed at format (the
//! profile's tag size, or more with `--tag-room`), so only a profile whose tags fit the slots
//! can replace the volume's in place: a smaller tag is stored followed by zeros. A larger one
//! is refused before anything is written.
//! The switch goes group by group, in order, with a cursor: the groups before it carry the
//! target profile's tags, the others the old profile's (see `tags.rs` for what a read
//! accepts where). The superblock records the switch (target, its key-check value, the
//! cursor, and an incompat feature bit) before the first tag of the target is written, and
//! the cursor as it advances — always behind the groups whose new tags are durable.
//!
//! One step re-tags a few groups (about [`STEP_BYTES`] of data) with the stripes of their
//! blocks locked (no write to them can be staged with a tag computed before the step) and
//! under [`Maintenance`] (the commit lock, everything staged committed and flushed): every
//! block is read and verified against its stored tag, and a block that verifies gets the
//! target's tag of the same data; one that does not, after a careful second read, keeps its
//! old tag (so it keeps failing) and is reported. The new tags go where a commit would put
//! them: in `dual` mode a new sector one generation up in the older slot of each pair (the
//! data it describes is durable: maintenance flushed), in the single-copy modes slot 0 in
//! place. Then a flush — the new sectors are durable before any commit may write the other
//! slot of their pairs — and only then does the cursor advance in memory; writes to those
//! groups are tagged by the target from then on. The superblock's cursor follows at most
//! every [`RECORD_EVERY`] and when the re-tag stops or ends.
//!
//! A crash at any point leaves every sector whole, with the old or the new profile's tags of
//! the same data: the groups before the recorded cursor have only new tags, the others are
//! verified by either profile. The re-tag of a group is idempotent, so resuming from the
//! recorded cursor redoes at most the groups since, and finishes the job.

use super::commit::maintenance::Maintenance;
use super::group::PairView;
use super::{BlockProblem, Inner, Volume};
use crate::cast::u32_of_small;
use crate::error::{Error, Result};
use crate::format::VolumeState;
use crate::tag::{Profile, Tag, TagKey, Tagger};
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

/// Data re-tagged per step by default (at least one group): large enough that a step's flush
/// is cheap next to its reads, small enough that clients wait for the commit lock only
/// briefly.
pub(crate) const STEP_BYTES: u64 = 4 << 20;

/// How often the cursor is written to the superblock while a re-tag runs, by default.
pub(crate) const RECORD_EVERY: Duration = Duration::from_secs(1);

/// How to re-tag: to which profile, with which key, how much at a time, and when to stop.
#[derive(Clone, Copy, Debug)]
pub struct RetagOptions<'a> {
    /// The profile to switch to: another whose tags fit the volume's tag slots.
    pub profile: Profile,
    /// Its key, when it is keyed.
    pub key: Option<&'a TagKey>,
    /// Checked between steps: once it is true the re-tag records its cursor and returns a
    /// report with `complete: false`.
    pub stop: Option<&'a AtomicBool>,
    /// Data re-tagged per step (rounded to whole groups, at least one).
    pub step_bytes: u64,
    /// How often the cursor is written to the superblock (also at a stop and at the end).
    pub record_every: Duration,
    /// Most bytes of the volume passed per second (every group a step covers counts, written
    /// or not); `None`: as fast as it goes. For a re-tag that should leave the disk to the
    /// clients; a stop is noticed while it waits.
    pub rate: Option<u64>,
}

impl RetagOptions<'_> {
    /// A re-tag to `profile` with the default step and recording interval, no key, no stop.
    pub fn new(profile: Profile) -> RetagOptions<'static> {
        RetagOptions {
            profile,
            key: None,
            stop: None,
            step_bytes: STEP_BYTES,
            record_every: RECORD_EVERY,
            rate: None,
        }
    }
}

/// What a re-tag did.
#[derive(Clone, Debug, Default, PartialEq, Eq, serde::Serialize)]
#[non_exhaustive]
pub struct RetagReport {
    /// The profile switched from.
    pub from: String,
    /// The profile switched to.
    pub to: String,
    /// Groups of the volume.
    pub groups: u64,
    /// The cursor when this run started: 0 for a new re-tag, else where a stopped or crashed
    /// one had got to.
    pub started_at: u64,
    /// The cursor when it ended (`groups` when complete).
    pub cursor: u64,
    /// Groups this run rewrote the tags of.
    pub groups_retagged: u64,
    /// Blocks given the target's tag by this run.
    pub blocks_retagged: u64,
    /// Blocks that failed verification: they keep their old tag (and keep failing), listed.
    pub bad_blocks: Vec<BlockProblem>,
    /// Metadata sectors whose tags cannot be trusted: left as they are, listed.
    pub damaged: Vec<super::MetadataProblem>,
    /// Mirror sets: block copies that failed verification on one copy and were rewritten from
    /// a good copy before their re-tag.
    pub repaired: u64,
    /// Every group is re-tagged and the volume's profile is now the target.
    pub complete: bool,
}

/// Where a re-tag in progress stands.
#[derive(Clone, Copy, Debug, PartialEq, Eq, serde::Serialize)]
pub struct RetagStatus {
    /// The volume's profile, being switched from.
    pub from: Profile,
    /// The profile being switched to.
    pub to: Profile,
    /// Groups re-tagged (in order, from group 0).
    pub cursor: u64,
    /// Groups of the volume.
    pub groups: u64,
}

impl Volume {
    /// The volume's tag profile now: the superblock's at open, until a re-tag completes
    /// (during one, the profile being switched from).
    pub fn profile(&self) -> Profile {
        self.inner.tagger.current().profile()
    }

    /// The re-tag in progress, if any.
    pub fn retag_status(&self) -> Option<RetagStatus> {
        let groups = self.inner.geo.groups;
        self.inner.tagger.switch().map(|s| RetagStatus {
            from: s.from,
            to: s.to,
            cursor: s.cursor,
            groups,
        })
    }

    /// Switches the volume to tag profile `opts.profile` while it stays in use: every written
    /// block is verified under its present tag and re-tagged under the target, group by
    /// group, with the progress recorded in the superblock, so a stop or a crash loses nothing
    /// (call it again with the same target to resume). `opts.key` is the target's key when it
    /// is keyed. `progress(done, total)` counts groups; `opts.stop` is checked between steps
    /// (the report then says `complete: false`).
    ///
    /// A mirror set is re-tagged on every copy (each copy's blocks verified against its own
    /// metadata, and repaired from a good copy first where they fail); it must have every copy
    /// in sync, and a copy that falls out of sync stops the re-tag at the next step.
    ///
    /// Refused before anything is written: a read-only or failed volume, a mirror set with a
    /// copy out of sync, a target that is the volume's profile or of another tag size (the
    /// metadata layout depends on it), a missing, wrong or superfluous key, a re-tag in
    /// progress to another target, one already running.
    pub fn retag(&self, opts: &RetagOptions<'_>, progress: &mut dyn FnMut(u64, u64)) -> Result<RetagReport> {
        let inner = &self.inner;
        if inner.retag_running.swap(true, Ordering::AcqRel) {
            return Err(Error::Busy {
                volume: inner.name.clone(),
                what: "a re-tag is already running".into(),
            });
        }
        // Cleared however the re-tag ends, a panic included.
        let _running = Running(&inner.retag_running);
        inner.retag(opts, progress)
    }
}

/// Clears the "a re-tag is running" flag when dropped.
struct Running<'a>(&'a AtomicBool);

impl Drop for Running<'_> {
    fn drop(&mut self) {
        self.0.store(false, Ordering::Release);
    }
}

impl Inner {
    /// See [`Volume::retag`].
    fn retag(&self, opts: &RetagOptions<'_>, progress: &mut dyn FnMut(u64, u64)) -> Result<RetagReport> {
        let (target, key) = (opts.profile, opts.key);
        self.writable()?;
        self.retag_needs_every_copy()?;
        let from = self.tagger.current().profile();
        let started_at = if let Some(s) = self.tagger.switch() {
            self.check_resume(s.to, target, key)?;
            if let Some(k) = key {
                self.with_keys(|held| held.target = Some(k.clone()));
            }
            s.cursor
        } else {
            let t = self.check_new_target(from, target, key)?;
            self.begin_retag(t)?;
            self.with_keys(|held| held.target = key.cloned());
            0
        };
        let mut report = RetagReport {
            from: from.name().into(),
            to: target.name().into(),
            groups: self.geo.groups,
            started_at,
            cursor: started_at,
            ..RetagReport::default()
        };
        let mut recorded = Instant::now();
        let mut pacer = opts.rate.map(super::scrub::Pacer::new);
        let stopped = || opts.stop.is_some_and(|s| s.load(Ordering::Acquire));
        progress(report.cursor, self.geo.groups);
        while report.cursor < self.geo.groups {
            // A failure or the `read-only` policy's suspension since the start stops it here
            // (the cursor on disk stays where it was recorded: behind, which is safe).
            self.writable()?;
            if stopped() {
                self.record_retag("recording where the re-tag stopped")?;
                return Ok(report);
            }
            if let Err(e) = self.retag_needs_every_copy() {
                // A copy fell out of sync: record how far the set got, for the resume.
                self.record_retag("recording where the re-tag stopped")?;
                return Err(e);
            }
            let before = report.cursor;
            report.cursor = self.retag_step(report.cursor, opts.step_bytes, &mut report)?;
            progress(report.cursor, self.geo.groups);
            if let Some(p) = &mut pacer {
                p.after(self.groups_bytes(before..report.cursor), &stopped);
            }
            self.writable()?;
            if recorded.elapsed() >= opts.record_every && report.cursor < self.geo.groups {
                self.record_retag("recording the re-tag's progress")?;
                recorded = Instant::now();
            }
        }
        let _m = self.maintenance("finishing the re-tag")?;
        self.tagger.finish();
        self.with_keys(|held| held.current = held.target.take());
        self.write_superblocks(self.disk_state(), "recording the re-tagged profile")?;
        tracing::info!(volume = %self.name, from = %from, to = %target, "re-tag complete");
        report.complete = true;
        Ok(report)
    }

    /// Bytes of data in `groups`.
    fn groups_bytes(&self, groups: std::ops::Range<u64>) -> u64 {
        let first = self.geo.first_block(groups.start);
        let end = if groups.end >= self.geo.groups {
            self.geo.data_blocks
        } else {
            self.geo.first_block(groups.end)
        };
        (end - first) * u64::from(self.geo.block_size)
    }

    /// The superblocks' state on disk now.
    fn disk_state(&self) -> VolumeState {
        if self.disk_in_use.load(Ordering::Acquire) {
            VolumeState::InUse
        } else {
            VolumeState::Clean
        }
    }

    /// Writes the superblocks with the cursor of now (the groups before it are durable:
    /// every step flushes before it advances the cursor).
    fn record_retag(&self, during: &'static str) -> Result<()> {
        let _m = self.maintenance(during)?;
        self.write_superblocks(self.disk_state(), during)
    }

    /// A re-tag to `target`, with `key`, may start on this volume of profile `from`: returns
    /// the target's tagger. Nothing is written.
    fn check_new_target(&self, from: Profile, target: Profile, key: Option<&TagKey>) -> Result<Tagger> {
        if target == from {
            return Err(super::invalid(
                &self.name,
                format!("the volume already uses tag profile {from}: nothing to re-tag"),
            ));
        }
        if target.tag_size() > self.geo.tag_size as usize {
            return Err(Error::Unsupported {
                volume: self.name.clone(),
                detail: no_room(from, target, self.geo.tag_size as usize, self.geo.group_blocks),
            });
        }
        super::open::mode_fits_profile(&self.name, self.sb.mode, target)?;
        target.tagger(&self.sb.uuid, key).map_err(|problem| Error::Key {
            volume: self.name.clone(),
            problem: problem.for_retag(),
        })
    }

    /// A re-tag in progress to `to` may be resumed with `target` and `key`: the same target,
    /// and if a key is given, the one recorded (the engine holds the target's key since the
    /// open, checked then). Nothing is written.
    fn check_resume(&self, to: Profile, target: Profile, key: Option<&TagKey>) -> Result<()> {
        if target != to {
            let s = self.tagger.switch();
            return Err(super::invalid(
                &self.name,
                format!(
                    "a re-tag to tag profile {to} is in progress ({} of {} groups done): resume it with \
                     --profile {to}; another target can be chosen once it is complete",
                    s.map_or(0, |s| s.cursor),
                    self.geo.groups
                ),
            ));
        }
        let key_err = |problem: crate::tag::KeyError| Error::Key {
            volume: self.name.clone(),
            problem: problem.for_retag(),
        };
        if let Some(k) = key {
            let given = to.tagger(&self.sb.uuid, Some(k)).map_err(key_err)?;
            let held = self.tagger.target().map(|t| t.key_check());
            if held != Some(given.key_check()) {
                return Err(key_err(crate::tag::KeyError::Wrong { profile: to.name() }));
            }
        }
        Ok(())
    }

    /// Records a new re-tag to `target` at cursor 0: durable in both superblocks before any
    /// tag of `target` is written.
    fn begin_retag(&self, target: Tagger) -> Result<()> {
        let _m = self.maintenance("starting a re-tag")?;
        let to = target.profile();
        self.tagger.begin(target);
        if let Err(e) = self.write_superblocks(self.disk_state(), "recording a new re-tag") {
            // Nothing of the target was written: in memory the volume stays as it was (a
            // superblock that did reach the disk says cursor 0, where either profile is
            // accepted).
            self.tagger.abort();
            return Err(e);
        }
        tracing::info!(volume = %self.name, to = %to, "re-tag started");
        Ok(())
    }

    /// Re-tags the groups from `from` on, about `step_bytes` of data, and returns the new
    /// cursor (durable tags for every group before it).
    fn retag_step(&self, from: u64, step_bytes: u64, report: &mut RetagReport) -> Result<u64> {
        let group_bytes = u64::from(self.geo.group_blocks) * u64::from(self.geo.block_size);
        let end = (from + (step_bytes / group_bytes).max(1)).min(self.geo.groups);
        let first = self.geo.first_block(from);
        let last = self.geo.first_block(end - 1) + u64::from(self.geo.blocks_in_group(end - 1));
        // No write to these blocks is staged from here on with a tag computed before the
        // cursor moves past them.
        let _stripes = self.lock_stripes(first, last - first);
        let mut m = self.maintenance("re-tagging")?;
        let target = self.tagger.target().ok_or_else(|| Error::Stopped {
            volume: self.name.clone(),
            what: "the re-tag".into(),
        })?;
        self.retag_marks(&mut m, from..end)?;
        for group in from..end {
            self.retag_group_to(&m, group, &target, report)?;
        }
        // Durable before the cursor moves: a commit may rewrite the other slot of these pairs
        // as soon as it does, and the superblock may record it.
        m.make_durable("flushing re-tagged metadata")?;
        // No journal segment of before (tags of the old profile) may be replayed over them
        // after a crash, once the superblock says these groups are re-tagged.
        m.pass_journal()?;
        self.tagger.advance(end);
        Ok(end)
    }

    /// Writes `target`'s tags for every block of `group` that verifies under its present tag.
    fn retag_group_to(
        &self,
        m: &Maintenance<'_>,
        group: u64,
        target: &Tagger,
        report: &mut RetagReport,
    ) -> Result<()> {
        let mut state = self.confirmed_group(group)?;
        if !state.any_written() {
            return Ok(());
        }
        if self.retag_settle_copies(group, report)? {
            // A copy was repaired: what the step re-tags from is read again.
            state = self.confirmed_group(group)?;
        }
        let (bs, ts, per) = self.tag_layout();
        let (first, mut data) = self.group_buffer(group);
        self.backend_read(
            data.as_mut(),
            self.geo.data_offset(first),
            "reading data to re-tag it",
        )?;
        let single = self.sb.mode.single_copy_tags();
        let mut w = state.writer(&self.sb.uuid, group);
        for k in 0..state.pairs() {
            let view = state.view(k);
            let newest = match view {
                PairView::Unwritten => continue,
                PairView::Brothers { .. } | PairView::Known { .. } => state.newest_for_write(k),
                PairView::TornFirst { .. } | PairView::Damaged(_) => None,
            };
            let Some((slot, generation)) = newest else {
                report.damaged.push(self.metadata_problem(group, k, &view, false));
                continue;
            };
            let count = self.geo.tags_in_sector(group, u32_of_small(k));
            let mut tags = w.tags_of(Some(slot), k, count);
            for j in 0..count {
                let i = k * per + j;
                let block = first + i as u64;
                let chunk = &data.as_ref()[i * bs..(i + 1) * bs];
                let stored = &mut tags[j * ts..(j + 1) * ts];
                if let Some(new) = self.retag_block(block, chunk, stored, target, report)? {
                    stored.copy_from_slice(&new.to_bytes(ts)[..ts]);
                }
            }
            if single {
                w.put(0, k, 1, &tags);
                w.set_known(k, 0);
            } else {
                w.put(1 - slot, k, generation + 1, &tags);
                w.set_known(k, 1 - slot);
            }
        }
        let (new, slots) = w.finish_loaded(&self.geo, false);
        if slots != [false, false] {
            // Under the `read-only` error policy nothing new reaches the disk once a block with
            // no good copy was found — by a client's read or by this very step.
            self.suspended()?;
            let update = self.meta_update(group, new, slots);
            m.write_metadata(std::slice::from_ref(&update))?;
            // What the cache holds is what commits copy forward and reads verify against.
            self.install(std::slice::from_ref(&update));
            report.groups_retagged += 1;
        }
        Ok(())
    }

    /// The target's tag for `block`, whose data read as `chunk` and whose stored tag is
    /// `stored`: `None` to keep the stored tag — the unwritten tag of a block of zeros, or
    /// the tag of a block that fails verification (it stays failing, and is reported).
    fn retag_block(
        &self,
        block: u64,
        chunk: &[u8],
        stored: &[u8],
        target: &Tagger,
        report: &mut RetagReport,
    ) -> Result<Option<Tag>> {
        let tag = Tag::from_bytes(stored);
        let mut retagged = |data: &[u8]| {
            if tag.is_unwritten() {
                return None;
            }
            report.blocks_retagged += 1;
            Some(target.generate(block, data))
        };
        if self.tagger.verify(block, chunk, &tag) {
            return Ok(retagged(chunk));
        }
        // A careful second look before a block is called bad: the read may have returned
        // wrong bytes once. Only data that verifies is ever given a new tag.
        let mut again = vec![0u8; chunk.len()];
        self.read_confirmed(
            &mut again,
            self.geo.data_offset(block),
            "re-reading a block that failed verification",
        )?;
        if self.tagger.verify(block, &again, &tag) {
            return Ok(retagged(&again));
        }
        let detail = if tag.is_unwritten() {
            "metadata says the block was never written, but it holds data".to_string()
        } else {
            format!(
                "expected tag {tag}, data has {} (left with its old tag: it keeps failing)",
                self.tagger.generate(block, &again)
            )
        };
        tracing::warn!(volume = %self.name, block, "re-tag: block failed verification: {detail}");
        // A bad block the re-tag finds is one with no good copy (on a mirror set the copies
        // were checked, and repaired where a good one exists, before the step read it), as if
        // a read had found it: the error policy applies.
        let kind = if tag.is_unwritten() {
            crate::CorruptionKind::UnwrittenNotZero
        } else if tag.is_torn() {
            crate::CorruptionKind::Torn
        } else {
            crate::CorruptionKind::TagMismatch
        };
        self.unrepairable(
            block,
            &Error::Corrupt {
                volume: self.name.clone(),
                block,
                kind,
                detail: detail.clone(),
            },
        );
        report.bad_blocks.push(BlockProblem { block, detail });
        Ok(None)
    }
}

/// Why a re-tag from `from` to `target`, whose tags are larger than the volume's `slot`-byte
/// tag slots, is refused, and what to do.
fn no_room(from: Profile, target: Profile, slot: usize, group_blocks: u32) -> String {
    let fit: Vec<&str> = Profile::ALL
        .iter()
        .filter(|p| p.tag_size() <= slot && **p != from)
        .map(|p| p.name())
        .collect();
    format!(
        "cannot re-tag from {from} to {target} in place: {target} has {}-byte tags, and this volume \
         was formatted with room for {slot}-byte tags (its metadata sectors hold {} tags each, and its \
         groups of {group_blocks} blocks were laid out for them). Profiles this volume can switch \
         to: {}. For {target}, copy the data to a new volume: `blockguard format NEW --profile \
         {target}` (same size; `--tag-room 32` there leaves room for any profile later), then \
         `blockguard export VOLUME IMAGE` and `blockguard import IMAGE NEW`",
        target.tag_size(),
        496 / slot,
        fit.join(", ")
    )
}
