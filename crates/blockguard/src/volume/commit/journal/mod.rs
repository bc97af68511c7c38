//! `journal` mode: every batch is first written to the journal's log as one checksummed
//! segment and made durable with one barrier; only then are its blocks and tags written home,
//! without ordering between them. After a crash the log is replayed from the durable
//! checkpoint, in sequence order, up to the first segment that is stale or fails its
//! checksum: every segment whose barrier completed is found whole, every block it carries
//! is written home again with its tag, so a batch — and every write request in it — is
//! entirely old or entirely new, torn writes included (`docs/CONSISTENCY.md`, "journal").
//!
//! Tags are kept in one copy, rewritten in place (as in `rebuild`): the journal, not a
//! brother, holds the new version until home is durable.

mod replay;
mod ring;

pub use replay::ReplayReport;
pub(crate) use ring::Ring;

use super::super::recover::{RecoverOptions, RecoveryReport};
use super::super::stage::{bytes, Batch, Staged};
use super::super::{aligned, Inner};
use super::maintenance::Maintenance;
use super::protocol::{GroupBatch, Plan, Planned, Protocol};
use super::{CommitState, Dropped};
use crate::cast::usize_of;
use crate::error::{Error, Result};
use crate::format::journal::{self as codec, Checkpoint, Entry, EntryKind, CHECKPOINT_AREA};
use crate::format::{Geometry, VolumeState, SB_REGION, SECTOR_SIZE};
use blockguard_backend::Backend as _;
use std::sync::atomic::Ordering;

/// The `journal` protocol.
pub(crate) struct Journal;

/// Where the journal's parts are on the backend.
#[derive(Clone, Copy, Debug)]
pub(crate) struct Layout {
    /// Byte offsets of the two checkpoint copies.
    pub checkpoints: [u64; 2],
    /// Byte offset of the log.
    pub log: u64,
    /// Bytes of log.
    pub log_len: u64,
}

impl Layout {
    /// The journal of `geo` (which must have one).
    pub(crate) fn of(geo: &Geometry) -> Layout {
        debug_assert!(geo.journal_len > CHECKPOINT_AREA);
        let at = geo.journal_offset();
        Layout {
            checkpoints: [at, at + SB_REGION],
            log: at + CHECKPOINT_AREA,
            log_len: geo.journal_len - CHECKPOINT_AREA,
        }
    }

    /// Bytes a batch's segment may take: a quarter of the log, so that a segment always fits
    /// once the log is checkpointed, and replay reads a bounded amount per segment.
    pub(crate) fn segment_cap(&self, block_size: u32) -> u64 {
        (self.log_len / 4) / u64::from(block_size) * u64::from(block_size)
    }
}

/// The journal's limits, as `info` states them.
#[derive(Clone, Copy, Debug, PartialEq, Eq, serde::Serialize)]
pub struct JournalLimits {
    /// Bytes of the journal area (checkpoints and log).
    pub journal_len: u64,
    /// Bytes of the log.
    pub log_len: u64,
    /// The largest write request guaranteed atomic across a crash: larger requests are split
    /// into requests of this size, each atomic on its own.
    pub max_atomic: u64,
}

/// The journal's limits for a volume of geometry `geo` (`None` without a journal).
pub fn limits(geo: &Geometry) -> Option<JournalLimits> {
    if geo.journal_len == 0 {
        return None;
    }
    let l = Layout::of(geo);
    let cap = l.segment_cap(geo.block_size);
    let bs = u64::from(geo.block_size);
    let ts = geo.tag_size as usize;
    let es = codec::entry_size(ts) as u64;
    // The most blocks a segment of at most `cap` bytes carries: a lower bound that ignores the
    // descriptor's rounding, then up while the exact length still fits.
    let fits = |n: u64| codec::segment_len(usize_of(n), usize_of(n), ts, geo.block_size) <= cap;
    let mut blocks = cap.saturating_sub(SECTOR_SIZE as u64 + bs) / (bs + es);
    while fits(blocks + 1) {
        blocks += 1;
    }
    Some(JournalLimits {
        journal_len: geo.journal_len,
        log_len: l.log_len,
        max_atomic: blocks * bs,
    })
}

/// What a staged batch costs in the log, for the stage's bound: per block its entry, and its
/// data unless zeroed; plus one descriptor's rounding.
#[derive(Clone, Copy, Debug)]
pub(crate) struct SegmentCost {
    pub entry: usize,
    pub block: usize,
    /// The most a batch may cost: [`Layout::segment_cap`] less the rounding.
    pub cap: usize,
}

impl SegmentCost {
    pub(crate) fn of(geo: &Geometry) -> Option<SegmentCost> {
        limits(geo)?;
        let bs = geo.block_size as usize;
        Some(SegmentCost {
            entry: codec::entry_size(geo.tag_size as usize),
            block: bs,
            cap: usize_of(Layout::of(geo).segment_cap(geo.block_size)).saturating_sub(SECTOR_SIZE + bs),
        })
    }

    /// The cost of `data` blocks with data and `zero` zeroed ones.
    pub(crate) fn of_counts(&self, (data, zero): (usize, usize)) -> usize {
        data * (self.entry + self.block) + zero * self.entry
    }
}

impl Protocol for Journal {
    fn plan_group(&self, vol: &Inner, b: &GroupBatch<'_>, dropped: &mut Dropped) -> Result<Planned> {
        Ok(super::unordered::plan_in_place(vol, b, Some(dropped)))
    }

    fn write(&self, vol: &Inner, state: &mut CommitState, plan: &Plan, batch: &Batch) -> Result<()> {
        let layout = Layout::of(&vol.geo);
        if vol.backend.count() > 1 {
            // A mirror set: the groups a commit touches are marked in the write-intent map
            // first, as in every mode, so that a copy that misses writes (absent, or dropped
            // mid-commit) is resynchronized with exactly those groups.
            super::mark_session(vol, state, &plan.updates, &[], false)?;
        }
        if state.journal.is_none() {
            state.journal = Some(start_session(vol, &layout)?);
        }
        let Some(ring) = state.journal.as_mut() else {
            unreachable!("started above");
        };
        let seg = encode_batch(vol, ring, batch);
        let len = seg.as_ref().len() as u64;
        let off = make_room(vol, &layout, ring, len)?;
        // Passing segments whose blocks are home and durable costs two sector writes, and
        // this segment's barrier makes it durable.
        if ring.filling() {
            if let Some(c) = ring.next_checkpoint() {
                write_checkpoint(vol, &layout, &c)?;
                ring.checkpoint_written(c);
            }
        }
        vol.backend
            .write_at(seg.as_ref(), layout.log + off)
            .map_err(vol.io_err("writing a journal segment", layout.log + off))?;
        ring.append(off, len);
        // The one barrier of a commit: from here on the batch survives a crash.
        vol.flush_or_fail("flushing the journal")?;
        ring.barrier_done();
        write_home(vol, plan, batch, Some(ring))?;
        ring.home_issued();
        Ok(())
    }

    fn durable_at_commit(&self) -> bool {
        true
    }

    fn before_retry(&self, vol: &Inner, state: &mut CommitState) -> Result<()> {
        // A failed flush may have dropped home writes of segments acknowledged before it, and
        // the segment of the failed commit may be missing or torn: the journal on disk is
        // replayed (writing every needed segment's blocks home again), and the retried batch
        // starts a new session, so no later segment is chained behind a hole.
        replay::replay_locked(vol, state, &mut |_, _| {})?;
        state.journal = None;
        Ok(())
    }

    fn refuses_writes_into_damage(&self) -> bool {
        // As in `rebuild`: the in-place plan keeps no damaged tags.
        true
    }

    fn settle_after_crash(
        &self,
        vol: &Inner,
        progress: &mut dyn FnMut(u64, u64),
    ) -> Result<Option<RecoveryReport>> {
        let report = replay::replay(vol, progress)?;
        vol.trusted.store(true, Ordering::Release);
        vol.write_superblocks(
            VolumeState::Clean,
            "marking the volume clean after replaying the journal",
        )?;
        Ok(Some(RecoveryReport {
            journal: Some(report),
            ..RecoveryReport::default()
        }))
    }

    fn settle_group(
        &self,
        vol: &Inner,
        _m: &mut Maintenance<'_>,
        group: u64,
        _opts: RecoverOptions,
        _report: &mut RecoveryReport,
    ) -> Result<bool> {
        // One tag copy: nothing to rebuild from (the journal was replayed at open).
        super::unordered::group_written(vol, group)
    }

    fn blank_metadata_means_no_data(&self) -> bool {
        // Home data may land before its tags (both are replayed from the journal).
        false
    }

    fn readable_before_recovery(&self) -> bool {
        // The newest version of recent writes may be only in the journal.
        false
    }

    fn recovery_before_reading(&self) -> &'static str {
        "the newest version of the last writes may be only in the journal, which is replayed"
    }
}

/// Puts a planned batch home: data and tags in place, with no ordering between them (the
/// journal holds the batch until a later barrier makes them durable); then the written-groups
/// map bits of the groups it writes for the first time, **after a barrier**: a bit on disk
/// then always means that the group's metadata is durable, so a blank sector in a group whose
/// bit is set is damage (a wiped group), never the trace of a first write a crash cut short —
/// which replay could not tell apart otherwise, and would rewrite as unwritten. The barrier
/// is paid once per group, by the commit that writes it first. Tags are installed in the cache
/// last (the reason is at [`super::unordered::write_in_place`]). `ring`: the session, told of
/// the barrier.
pub(super) fn write_home(vol: &Inner, plan: &Plan, batch: &Batch, ring: Option<&mut Ring>) -> Result<()> {
    vol.write_data(batch)?;
    vol.write_metadata(&plan.updates)?;
    if !plan.map.is_empty() {
        vol.flush_or_fail("flushing a first write's metadata before its written-map bit")?;
        if let Some(ring) = ring {
            ring.barrier_done();
        }
        vol.write_map(&plan.map)?;
    }
    vol.install(&plan.updates);
    vol.install_map(super::protocol::copy_map(&plan.map));
    Ok(())
}

/// A new session: a random session number and a checkpoint at log offset 0 with a
/// generation above any on disk, written to both copies and flushed before any segment of the
/// session. Segments of earlier sessions can then never be replayed, wherever the new ones
/// overwrite them (a crash that leaves one copy old still picks the new one).
fn start_session(vol: &Inner, layout: &Layout) -> Result<Ring> {
    let generation = replay::read_checkpoints(vol, layout)?
        .iter()
        .filter_map(|c| c.as_ref().ok().map(|c| c.generation))
        .max()
        .unwrap_or(0);
    let ring = Ring::new(layout.log_len, rand::random(), generation + 1);
    write_checkpoint(vol, layout, &ring.start())?;
    vol.flush_or_fail("flushing the journal's new checkpoint")?;
    Ok(ring)
}

/// Makes a durable checkpoint pass every segment written so far (starting this session's log
/// first if no commit has: its first checkpoint passes the segments of earlier sessions), so
/// that no segment written before now is ever replayed. For maintenance that changes what tags
/// a block must carry (an online re-tag): a replayed older segment would write back the tags
/// of before. Everything committed has had its home writes issued (the commit lock is held).
pub(crate) fn pass_all(vol: &Inner, state: &mut CommitState) -> Result<()> {
    let layout = Layout::of(&vol.geo);
    if state.journal.is_none() {
        state.journal = Some(start_session(vol, &layout)?);
    }
    let Some(ring) = state.journal.as_mut() else {
        unreachable!("started above");
    };
    vol.flush_or_fail("flushing home writes before a journal checkpoint")?;
    ring.barrier_done();
    if let Some(c) = ring.next_checkpoint() {
        write_checkpoint(vol, &layout, &c)?;
        ring.checkpoint_written(c);
    }
    vol.flush_or_fail("flushing a journal checkpoint")?;
    ring.barrier_done();
    Ok(())
}

/// Writes both checkpoint copies (each one 512-byte sector in its own 4 KiB region).
fn write_checkpoint(vol: &Inner, layout: &Layout, c: &Checkpoint) -> Result<()> {
    let align = vol.backend.alignment().max(1);
    let n = SECTOR_SIZE.max(align);
    let mut buf = aligned(n, align);
    buf.as_mut()[..SECTOR_SIZE].copy_from_slice(&c.encode(&vol.sb.uuid));
    for at in layout.checkpoints {
        vol.backend
            .write_at(buf.as_ref(), at)
            .map_err(vol.io_err("writing a journal checkpoint", at))?;
    }
    Ok(())
}

/// Waits, if need be, until the log has room for `len` bytes, and returns where they go:
/// home writes are made durable (a barrier), a checkpoint passes them (and a barrier).
fn make_room(vol: &Inner, layout: &Layout, ring: &mut Ring, len: u64) -> Result<u64> {
    for _ in 0..3 {
        if let Some(off) = ring.place(len) {
            return Ok(off);
        }
        if ring.has_issued() {
            vol.flush_or_fail("flushing home writes to make room in the journal")?;
            ring.barrier_done();
        }
        if let Some(c) = ring.next_checkpoint() {
            write_checkpoint(vol, layout, &c)?;
            ring.checkpoint_written(c);
            vol.flush_or_fail("flushing a journal checkpoint")?;
            ring.barrier_done();
        }
    }
    // Every segment's home writes are durable and checkpointed past after one round: only a
    // segment longer than the log stays without room, which the stage's bound prevents.
    Err(Error::Unsupported {
        volume: vol.name.clone(),
        detail: format!(
            "a journal segment of {len} bytes does not fit the {}-byte log",
            layout.log_len
        ),
    })
}

/// The segment of `batch`, in an aligned buffer: its entries in block order, then the data
/// blocks.
fn encode_batch(vol: &Inner, ring: &Ring, batch: &Batch) -> super::super::Aligned {
    let ts = vol.geo.tag_size as usize;
    let bs = vol.geo.block_size as usize;
    let mut entries = Vec::with_capacity(batch.len());
    let mut data: Vec<&[u8]> = Vec::with_capacity(batch.len());
    for (&block, e) in batch {
        match e {
            Staged::Data { buf, at, tag } => {
                entries.push(Entry {
                    block,
                    kind: EntryKind::Data,
                    tag: tag.to_bytes(ts)[..ts].to_vec(),
                });
                data.push(&bytes(buf)[*at..*at + bs]);
            }
            Staged::Zero => entries.push(Entry {
                block,
                kind: EntryKind::Zero,
                tag: vec![0; ts],
            }),
        }
    }
    let len = codec::segment_len(entries.len(), data.len(), ts, vol.geo.block_size);
    let mut out = aligned(usize_of(len), vol.backend.alignment().max(1));
    codec::encode_segment_into(
        out.as_mut(),
        &codec::SegmentIdentity {
            uuid: &vol.sb.uuid,
            session: ring.session(),
            seq: ring.next_seq(),
        },
        &entries,
        &data,
        ts,
        vol.geo.block_size,
    );
    out
}

/// The journal of an open volume, for `status`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, serde::Serialize)]
#[non_exhaustive]
pub struct JournalStatus {
    /// Its sizes.
    pub limits: JournalLimits,
    /// Bytes of log holding segments a crash could still need.
    pub used: u64,
    /// Those segments.
    pub segments_needed: u64,
    /// Segments written since the volume was opened.
    pub segments_written: u64,
}

impl Inner {
    /// The journal's state (`None` without a journal).
    pub(crate) fn journal_status(&self) -> Option<JournalStatus> {
        let limits = limits(&self.geo)?;
        let state = self.lock(&self.commit);
        let ring = state.journal.as_ref();
        Some(JournalStatus {
            limits,
            used: ring.map_or(0, Ring::used),
            segments_needed: ring.map_or(0, |r| r.needed_segments() as u64),
            segments_written: ring.map_or(0, |r| r.segments_written),
        })
    }
}
