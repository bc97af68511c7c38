//! Replaying the journal after a crash.
//!
//! From the durable checkpoint, segments are read in sequence order, following the placement
//! rule (right after the previous segment, else at log offset 0), and each one that is whole —
//! its header valid, of this volume, session and the expected sequence number, its payload
//! hash matching, every data block matching its entry's tag — has its blocks written home
//! again with their tags. Replay stops at the first segment that is not; segments of the same
//! session found further on are reported as dropped. Replay changes nothing in the journal
//! itself, so a crash during replay is followed by the same replay (it is idempotent: it
//! writes the same bytes to the same places).

use super::super::super::stage::{Batch, Staged};
use super::super::super::{aligned, Inner};
use super::Layout;
use crate::cast::usize_of;
use crate::error::{Error, Result};
use crate::format::journal::{
    choose_checkpoint, parse_entries, Checkpoint, Entry, EntryKind, JournalParseError, SegmentHeader,
    SEGMENT_MAGIC,
};
use crate::format::SECTOR_SIZE;
use crate::tag::Tag;
use blockguard_backend::Backend as _;
use std::sync::Arc;

/// What replaying the journal did (part of [`crate::RecoveryReport`]).
#[derive(Clone, Debug, Default, PartialEq, Eq, serde::Serialize)]
#[non_exhaustive]
pub struct ReplayReport {
    /// Segments replayed.
    pub segments_replayed: u64,
    /// Blocks written home from them.
    pub blocks_replayed: u64,
    /// Bytes of journal read.
    pub bytes_read: u64,
    /// Why replay stopped where it did (the segment after the last replayed one was missing,
    /// stale or damaged): normal after a crash, the last segment's barrier had not completed.
    pub stopped: String,
    /// Segments of the same session found past that point: writes that were made durable
    /// but could not be replayed because a segment before them is damaged or was lost.
    pub dropped_segments: u64,
    /// The blocks those segments carried (their home copy may be older than acknowledged).
    pub dropped_blocks: Vec<u64>,
}

/// Reads `len` bytes at `off` and checks them with `check`; a failed check is read again (a
/// transient bad read must not end a replay early) until two reads agree, four reads at most.
fn read_checked<T, E>(
    vol: &Inner,
    off: u64,
    len: usize,
    check: &dyn Fn(&[u8]) -> std::result::Result<T, E>,
) -> Result<std::result::Result<(T, Vec<u8>), E>> {
    let align = vol.backend.alignment().max(1);
    let n = len.next_multiple_of(align);
    let mut previous: Option<Vec<u8>> = None;
    for attempt in 0.. {
        let mut buf = aligned(n, align);
        vol.backend
            .read_at(buf.as_mut(), off)
            .map_err(vol.io_err("reading the journal", off))?;
        let bytes = &buf.as_ref()[..len];
        match check(bytes) {
            Ok(t) => return Ok(Ok((t, bytes.to_vec()))),
            Err(why) => {
                if attempt >= 3 || previous.as_deref() == Some(bytes) {
                    return Ok(Err(why));
                }
                previous = Some(bytes.to_vec());
            }
        }
    }
    unreachable!("the loop returns by its fourth read")
}

/// Both checkpoint copies, decoded (each confirmed by a second read when it does not decode).
pub(super) fn read_checkpoints(
    vol: &Inner,
    layout: &Layout,
) -> Result<[std::result::Result<Checkpoint, JournalParseError>; 2]> {
    let decode = |b: &[u8]| Checkpoint::decode(b, &vol.sb.uuid, layout.log_len);
    let read = |at: u64| -> Result<std::result::Result<Checkpoint, JournalParseError>> {
        Ok(read_checked(vol, at, SECTOR_SIZE, &decode)?.map(|(c, _)| c))
    };
    Ok([read(layout.checkpoints[0])?, read(layout.checkpoints[1])?])
}

/// A whole segment read back: its header, bytes and entries (data entries with the offset of
/// their block in the bytes).
struct ReadSegment {
    at: u64,
    header: SegmentHeader,
    bytes: Arc<Vec<u8>>,
    entries: Vec<(Entry, Option<usize>)>,
}

/// The segment `seq` of `session` at log offset `at`, if it is there and whole.
fn segment_at(
    vol: &Inner,
    layout: &Layout,
    at: u64,
    session: u64,
    seq: u64,
) -> Result<std::result::Result<ReadSegment, String>> {
    if at >= layout.log_len {
        return Ok(Err("end of the log".into()));
    }
    let (ts, bs) = (vol.geo.tag_size as usize, vol.geo.block_size);
    let room = layout.log_len - at;
    let header = |b: &[u8]| -> std::result::Result<SegmentHeader, String> {
        let h = SegmentHeader::decode(b, &vol.sb.uuid, ts, bs, room).map_err(|e| e.to_string())?;
        if h.session != session {
            return Err("a segment of an earlier session".into());
        }
        if h.seq != seq {
            return Err(format!("segment {} where {seq} was expected", h.seq));
        }
        Ok(h)
    };
    let h = match read_checked(vol, layout.log + at, SECTOR_SIZE, &header)? {
        Ok((h, _)) => h,
        Err(why) => return Ok(Err(why)),
    };
    let whole = |b: &[u8]| -> std::result::Result<Vec<(Entry, Option<usize>)>, String> {
        let entries = parse_entries(&h, b, ts, bs).map_err(|e| e.to_string())?;
        check_entries(vol, &entries, b)?;
        Ok(entries)
    };
    Ok(
        match read_checked(vol, layout.log + at, usize_of(h.len), &whole)? {
            Ok((entries, bytes)) => Ok(ReadSegment {
                at,
                header: h,
                bytes: Arc::new(bytes),
                entries,
            }),
            Err(why) => Err(format!("segment {seq} at log offset {at}: {why}")),
        },
    )
}

/// Every entry names a block of the volume, and every data block matches its entry's tag
/// (the payload hash already matched: a mismatch here is a segment written by a build with
/// another tag computation, or a forged one).
fn check_entries(
    vol: &Inner,
    entries: &[(Entry, Option<usize>)],
    seg: &[u8],
) -> std::result::Result<(), String> {
    let bs = vol.geo.block_size as usize;
    for (e, at) in entries {
        if e.block >= vol.geo.data_blocks {
            return Err(format!("entry for block {} past the volume's end", e.block));
        }
        if let (EntryKind::Data, Some(at)) = (e.kind, at) {
            // `verify`, not a comparison with a tag generated here: during an online re-tag
            // a block may have been written with the target profile's tag, which the profile
            // covering it at this open (from the recorded cursor) need not generate.
            let tag = crate::tag::Tag::from_bytes(&e.tag[..]);
            if tag.is_unwritten() || !vol.tagger.verify(e.block, &seg[*at..*at + bs], &tag) {
                return Err(format!("block {}'s data does not match its entry's tag", e.block));
            }
        }
    }
    Ok(())
}

/// Replays the journal of a volume left in use; then makes what it wrote durable.
pub(crate) fn replay(vol: &Inner, progress: &mut dyn FnMut(u64, u64)) -> Result<ReplayReport> {
    let mut state = vol.lock(&vol.commit);
    replay_locked(vol, &mut state, progress)
}

/// [`replay`] with the commit lock held (`state`).
pub(crate) fn replay_locked(
    vol: &Inner,
    state: &mut super::super::CommitState,
    progress: &mut dyn FnMut(u64, u64),
) -> Result<ReplayReport> {
    let layout = Layout::of(&vol.geo);
    let mut report = ReplayReport::default();
    let ck = match choose_checkpoint(read_checkpoints(vol, &layout)?) {
        Ok(Some(c)) => c,
        Ok(None) => {
            "the journal was never used".clone_into(&mut report.stopped);
            return Ok(report);
        }
        Err([a, b]) => {
            return Err(Error::JournalDamaged {
                volume: vol.name.clone(),
                detail: format!(
                    "both journal checkpoints are unusable (first: {a}; second: {b}); the volume cannot \
                     be opened read-write without losing the writes the journal holds"
                ),
            })
        }
    };
    tracing::info!(volume = %vol.name, session = ck.session, seq = ck.seq, "replaying the journal");
    let (mut at, mut seq) = (ck.tail, ck.seq);
    let mut groups = std::collections::BTreeSet::new();
    loop {
        let found = match segment_at(vol, &layout, at, ck.session, seq)? {
            Ok(s) => Ok(s),
            Err(why) if at != 0 => segment_at(vol, &layout, 0, ck.session, seq)?.map_err(|_| why),
            Err(why) => Err(why),
        };
        let seg = match found {
            Ok(seg) => seg,
            Err(why) => {
                report.stopped = why;
                break;
            }
        };
        state.epoch += 1;
        groups.extend(apply(vol, state.epoch, &seg)?);
        report.segments_replayed += 1;
        report.blocks_replayed += seg.entries.len() as u64;
        report.bytes_read += seg.header.len;
        progress(report.bytes_read.min(layout.log_len), layout.log_len);
        at = seg.at + seg.header.len;
        seq += 1;
    }
    vol.flush_or_fail("flushing the replayed journal")?;
    // Every group a segment touched is marked written, not only those whose metadata was
    // blank: a crash may have kept a group's first metadata write and lost its map bit. The
    // bits go out after the barrier above, as in a commit (`write_home`), so that a second
    // crash never leaves a bit set over metadata that is not durable.
    let groups: Vec<u64> = groups.into_iter().collect();
    let map = vol.map_updates(&groups)?;
    if !map.is_empty() {
        vol.write_map(&map)?;
        vol.install_map(super::super::protocol::copy_map(&map));
        vol.flush_or_fail("flushing the written-groups map after replay")?;
    }
    let epoch = state.epoch;
    state.flushed(epoch);
    find_dropped(vol, &layout, ck.session, seq, &mut report)?;
    if report.dropped_segments > 0 {
        tracing::error!(
            volume = %vol.name,
            segments = report.dropped_segments,
            blocks = ?report.dropped_blocks,
            "journal replay stopped at a damaged or missing segment ({}); later segments were dropped and their blocks may read older contents",
            report.stopped
        );
    }
    tracing::info!(volume = %vol.name, segments = report.segments_replayed, blocks = report.blocks_replayed, "journal replayed");
    Ok(report)
}

/// Writes one segment's blocks home with their tags (through the same planning as a commit);
/// returns the groups it touched, whose written-map bits the caller sets after a barrier.
fn apply(vol: &Inner, epoch: u64, seg: &ReadSegment) -> Result<Vec<u64>> {
    let ts = vol.geo.tag_size as usize;
    let mut batch = Batch::new();
    for (e, at) in &seg.entries {
        let staged = match (e.kind, at) {
            (EntryKind::Data, Some(at)) => Staged::Data {
                buf: seg.bytes.clone(),
                at: *at,
                tag: Tag::from_bytes(&e.tag[..ts]),
            },
            _ => Staged::Zero,
        };
        batch.insert(e.block, staged);
    }
    // Blocks whose metadata sector is damaged (and not wholly rewritten by the segment) keep
    // it damaged: replay must not turn real damage into "unwritten". They go unreplayed, and
    // read as damaged.
    let (mut plan, dropped) = vol.plan(&batch, epoch)?;
    if !dropped.is_empty() {
        tracing::error!(
            volume = %vol.name,
            blocks = ?dropped.iter().map(|(b, _)| *b).collect::<Vec<_>>(),
            "journal replay: {}; these blocks stay unreadable until rewritten or `blockguard recover --rebuild`",
            dropped[0].1
        );
        for (b, _) in &dropped {
            batch.remove(b);
        }
    }
    let groups: Vec<u64> = plan.updates.iter().map(|u| u.group).collect();
    plan.map.clear();
    super::write_home(vol, &plan, &batch, None)?;
    Ok(groups)
}

/// Looks through the whole log for whole segments of `session` numbered after `from` (the
/// one replay stopped at): made durable, yet cut off from replay by the segment that stopped
/// it. (The stopping segment itself is normal after a crash: the last one, cut short.)
fn find_dropped(
    vol: &Inner,
    layout: &Layout,
    session: u64,
    from: u64,
    report: &mut ReplayReport,
) -> Result<()> {
    let bs = u64::from(vol.geo.block_size);
    let chunk = (4u64 << 20).min(layout.log_len);
    let mut pos = 0;
    while pos < layout.log_len {
        let n = chunk.min(layout.log_len - pos);
        let align = vol.backend.alignment().max(1);
        let mut buf = aligned(usize_of(n), align);
        vol.backend
            .read_at(buf.as_mut(), layout.log + pos)
            .map_err(vol.io_err("reading the journal", layout.log + pos))?;
        for k in 0..n / bs {
            let b = &buf.as_ref()[usize_of(k * bs)..];
            if b[..8] != SEGMENT_MAGIC {
                continue;
            }
            let room = layout.log_len - pos - k * bs;
            let Ok(h) = SegmentHeader::decode(
                b,
                &vol.sb.uuid,
                vol.geo.tag_size as usize,
                vol.geo.block_size,
                room,
            ) else {
                continue;
            };
            if h.session != session || h.seq <= from {
                continue;
            }
            report.dropped_segments += 1;
            if let Ok(seg) = segment_at(vol, layout, pos + k * bs, session, h.seq)? {
                report
                    .dropped_blocks
                    .extend(seg.entries.iter().map(|(e, _)| e.block));
            }
        }
        pos += n;
    }
    report.dropped_blocks.sort_unstable();
    report.dropped_blocks.dedup();
    Ok(())
}
