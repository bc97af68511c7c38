//! Verified reads: every block is checked against the tags its metadata accepts before a
//! byte of it is returned.
//!
//! A failed check is not reported at once: the data is read again with commits excluded (a
//! commit may have moved data and tags under the lock-free fast path), and metadata that came
//! from a single read is confirmed first (a transient bad read of the metadata must not turn
//! into a corruption report, nor a bad read of the data). Only a failure that survives both is
//! real.

use super::group::Accept;
use super::stage::Staged;
use super::Inner;
use crate::cast::usize_of;
use crate::error::{CorruptionKind, Error, Result};
use std::sync::atomic::{AtomicUsize, Ordering};

/// Reads of at least this many whole-block bytes are verified on two threads.
const PARALLEL_READ_MIN: usize = 256 << 10;

/// Counts a read in progress for as long as it lives.
struct ActiveRead<'a>(&'a AtomicUsize);

impl<'a> ActiveRead<'a> {
    /// Enters; returns the guard and whether no other read was in progress.
    fn enter(count: &'a AtomicUsize) -> (Self, bool) {
        let before = count.fetch_add(1, Ordering::Relaxed);
        (Self(count), before == 0)
    }
}

impl Drop for ActiveRead<'_> {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::Relaxed);
    }
}

/// Copies a staged block's content (zeros for a zeroed block) into `out`.
pub(crate) fn copy_staged(entry: &Staged, out: &mut [u8]) {
    match entry.data(out.len()) {
        Some(d) => out.copy_from_slice(d),
        None => out.fill(0),
    }
}

impl Inner {
    /// Verifies `data` as the content of `block`, telling which tag matched: [`Match::Fallback`] when only the older
    /// (or "never written") tag of a pair read with the after-crash rules did. Such data must be
    /// read again before it is returned: a bad read that returns zeros or an older version
    /// looks exactly like it.
    fn verify_match(&self, block: u64, data: &[u8], accept: &Accept) -> Result<Match> {
        let tagger = &self.tagger;
        let matches = |t: &crate::tag::Tag| tagger.verify(block, data, t);
        match accept {
            Accept::One(t) if matches(t) => return Ok(Match::Newest),
            Accept::Either(newest, _) if matches(newest) => return Ok(Match::Newest),
            Accept::Either(_, older) if matches(older) => return Ok(Match::Fallback),
            Accept::Salvaged { newest, .. } if matches(newest) => return Ok(Match::Newest),
            Accept::Salvaged { older: Some(o), .. } if matches(o) => return Ok(Match::Fallback),
            _ => {}
        }
        let (kind, detail) = match accept {
            Accept::Damaged(why) | Accept::Salvaged { why, .. } => (
                CorruptionKind::MetadataDamaged,
                format!("its tags cannot be trusted: {why}"),
            ),
            Accept::One(t) if t.is_unwritten() => (
                CorruptionKind::UnwrittenNotZero,
                "metadata says the block was never written, but it holds data".to_string(),
            ),
            Accept::One(t) if t.is_torn() => (
                CorruptionKind::Torn,
                "a crash cut its last write short and no complete version of it survived \
                 (recovery, or a rebuild of damaged metadata, found data matching none of its \
                 tags and marked it torn); it reads again once it is written"
                    .to_string(),
            ),
            Accept::One(t) | Accept::Either(t, _) => {
                let computed = tagger.generate(block, data);
                let expected = match accept {
                    Accept::Either(a, b) => format!("{a} or {b}"),
                    _ => t.to_string(),
                };
                (
                    CorruptionKind::TagMismatch,
                    format!("expected tag {expected}, data has {computed}"),
                )
            }
        };
        Err(Error::Corrupt {
            volume: self.name.clone(),
            block,
            kind,
            detail,
        })
    }

    /// Whether `data` verifies as `block` against `accept` (any tag it accepts).
    pub(crate) fn verifies(&self, block: u64, data: &[u8], accept: &Accept) -> bool {
        self.verify_match(block, data, accept).is_ok()
    }

    /// Like [`Inner::verifies`], but a tag read from a scarred sector does not count: for a
    /// mirror member's copy, which another member's intact metadata can do better than. (Its
    /// data would be right, but a copy is a repair source only with metadata worth copying,
    /// and a scarred copy must itself be repaired.)
    pub(crate) fn verifies_strictly(&self, block: u64, data: &[u8], accept: &Accept) -> bool {
        !matches!(accept, Accept::Salvaged { .. }) && self.verifies(block, data, accept)
    }

    /// Reads `buf.len()` bytes at `offset`. Every block touched is verified first; a block
    /// that fails returns [`Error::Corrupt`] and no data.
    pub(crate) fn read_at(&self, buf: &mut [u8], offset: u64) -> Result<()> {
        self.check_range(offset, buf.len() as u64)?;
        let bs = u64::from(self.geo.block_size);
        let end = offset + buf.len() as u64;
        let (full_first, full_end) = (offset.div_ceil(bs), end / bs);
        if full_first >= full_end {
            return self.read_partial(buf, offset);
        }
        let head = usize_of(full_first * bs - offset);
        let tail = usize_of(end - full_end * bs);
        let (head_buf, rest) = buf.split_at_mut(head);
        let mid_len = rest.len() - tail;
        let (mid, tail_buf) = rest.split_at_mut(mid_len);
        if head > 0 {
            self.read_partial(head_buf, offset)?;
        }
        if tail > 0 {
            self.read_partial(tail_buf, full_end * bs)?;
        }
        // A large read running alone is split in two halves verified on two cores:
        // checksumming runs at about the speed of the page-cache copy, so one thread alone
        // would halve hot-read throughput. Concurrent reads already keep the cores busy; for
        // them the hand-off would only add context switches.
        let (_active, alone) = ActiveRead::enter(&self.reads_active);
        let parallel = alone && mid_len >= PARALLEL_READ_MIN && rayon::current_num_threads() > 1;
        let total = full_end - full_first;
        let max_piece = if parallel { total.div_ceil(2) } else { total };
        let mut pieces: Vec<(u64, &mut [u8])> = Vec::new();
        let (mut block, mut rest) = (full_first, mid);
        while !rest.is_empty() {
            let (group, _) = self.geo.group_of(block);
            let group_end = self.geo.first_block(group) + u64::from(self.geo.blocks_in_group(group));
            let n = (group_end - block).min(max_piece).min(rest.len() as u64 / bs);
            let (piece, r) = std::mem::take(&mut rest).split_at_mut(usize_of(n * bs));
            pieces.push((block, piece));
            rest = r;
            block += n;
        }
        if !parallel || pieces.len() < 2 {
            return pieces.into_iter().try_for_each(|(b, p)| self.read_blocks(b, p));
        }
        let midpoint = full_first + max_piece;
        let split = pieces
            .iter()
            .position(|(b, _)| *b >= midpoint)
            .unwrap_or(pieces.len());
        let second = pieces.split_off(split);
        let mut theirs = Ok(());
        let mut mine = Ok(());
        rayon::in_place_scope(|scope| {
            scope.spawn(|_| theirs = second.into_iter().try_for_each(|(b, p)| self.read_blocks(b, p)));
            mine = pieces.into_iter().try_for_each(|(b, p)| self.read_blocks(b, p));
        });
        mine.and(theirs)
    }

    /// Reads a range inside one block, or straddling two, through a block-sized buffer.
    fn read_partial(&self, buf: &mut [u8], offset: u64) -> Result<()> {
        let bs = u64::from(self.geo.block_size);
        let mut tmp = vec![0u8; usize_of(bs)];
        let mut done = 0usize;
        while done < buf.len() {
            let pos = offset + done as u64;
            let in_block = usize_of(pos % bs);
            let n = (usize_of(bs) - in_block).min(buf.len() - done);
            self.read_blocks(pos / bs, &mut tmp)?;
            buf[done..done + n].copy_from_slice(&tmp[in_block..in_block + n]);
            done += n;
        }
        Ok(())
    }

    /// Reads and verifies consecutive whole blocks of one group into `out`.
    pub(crate) fn read_blocks(&self, first: u64, out: &mut [u8]) -> Result<()> {
        let bs = self.geo.block_size as usize;
        let count = out.len() / bs;
        debug_assert_eq!(out.len() % bs, 0);
        debug_assert_eq!(
            self.geo.group_of(first).0,
            self.geo.group_of(first + count as u64 - 1).0
        );
        // Staged blocks are served from memory; the rest in runs from the backend.
        let mut staged = Vec::new();
        {
            let stage = self.lock(&self.stage);
            if stage.is_empty() {
                drop(stage);
                return self.read_run(first, out);
            }
            staged.resize(count, false);
            for (i, is_staged) in staged.iter_mut().enumerate() {
                if let Some(entry) = stage.get(first + i as u64) {
                    copy_staged(entry, &mut out[i * bs..(i + 1) * bs]);
                    *is_staged = true;
                }
            }
        }
        let mut i = 0;
        while i < count {
            if staged[i] {
                i += 1;
                continue;
            }
            let mut j = i;
            while j < count && !staged[j] {
                j += 1;
            }
            self.read_run(first + i as u64, &mut out[i * bs..j * bs])?;
            i = j;
        }
        Ok(())
    }

    /// Reads unstaged consecutive blocks of one group from the backend and verifies them.
    fn read_run(&self, first: u64, dst: &mut [u8]) -> Result<()> {
        self.backend_read(dst, self.geo.data_offset(first), "reading data")?;
        if self.backend.has_read_errors() {
            // A member failed a read another served: rewrite it while the good copy is at hand.
            self.repair_read_errors()?;
        }
        let blocks = (dst.len() / self.geo.block_size as usize) as u64;
        self.stats.blocks_verified.fetch_add(blocks, Ordering::Relaxed);
        let why = match self.verify_run(first, dst) {
            Ok(Match::Newest) => return Ok(()),
            Ok(Match::Fallback) => "matched only an older tag".to_string(),
            Err(e) => e.to_string(),
        };
        self.reread_settled(first, dst).map_err(|again| match again {
            // Report what the careful second look found; it names the real reason.
            Error::Corrupt { .. } => again,
            other => {
                tracing::debug!(volume = %self.name, block = first, "re-read failed after {why}: {other}");
                other
            }
        })
    }

    /// Verifies a run read from the backend; [`Match::Fallback`] if any block of it matched
    /// only an older tag.
    fn verify_run(&self, first: u64, data: &[u8]) -> Result<Match> {
        let mut found = Match::Newest;
        let bs = self.geo.block_size as usize;
        let (group, index) = self.geo.group_of(first);
        let state = self.group(group)?;
        let tagger = &self.tagger;
        for (k, chunk) in data.chunks_exact(bs).enumerate() {
            let block = first + k as u64;
            let i = index as usize + k;
            // Fast path: a tag every state of the pair accepts needs no further look-up.
            if let Some(stored) = state.fast_tag(i) {
                if stored.iter().any(|&b| b != 0) && tagger.generate(block, chunk).matches_slot(stored) {
                    continue;
                }
            }
            if self.verify_match(block, chunk, &state.accept(i))? == Match::Fallback {
                found = Match::Fallback;
            }
        }
        Ok(found)
    }

    /// Slow path after a failed verification: a commit may have moved data and tags under
    /// the lock-free fast path, a read of the data may have returned wrong bytes once, and the
    /// metadata may come from a single bad read. With commits excluded, confirm the metadata,
    /// read the data again and verify once more; only a failure now is real.
    fn reread_settled(&self, first: u64, out: &mut [u8]) -> Result<()> {
        let _commit = self.lock(&self.commit);
        let bs = self.geo.block_size as usize;
        for (k, chunk) in out.chunks_exact_mut(bs).enumerate() {
            let block = first + k as u64;
            if let Some(entry) = self.lock(&self.stage).get(block) {
                copy_staged(entry, chunk);
                continue;
            }
            self.backend_read(chunk, self.geo.data_offset(block), "reading data")?;
            let (group, index) = self.geo.group_of(block);
            let state = self.confirmed_group(group)?;
            let accept = state.accept(index as usize);
            let mut found = self.verify_match(block, chunk, &accept);
            if matches!(found, Ok(Match::Fallback)) {
                // The older version is returned only if the disk says so twice in a row.
                self.read_confirmed(chunk, self.geo.data_offset(block), "confirming data")?;
                found = self.verify_match(block, chunk, &accept);
            }
            if let Err(e) = found {
                self.stats.corruption_detected.fetch_add(1, Ordering::Relaxed);
                // Another mirror member may hold a good copy: return it and heal the others.
                if self.repair_block(block, chunk)? {
                    continue;
                }
                if self.backend.count() > 1 {
                    self.stats.unrepairable.fetch_add(1, Ordering::Relaxed);
                }
                // No good copy anywhere: the error policy decides what else happens. The error
                // is returned, not logged here: the caller reports it (the servers log it
                // with the request, `check` lists it, `export` stops with it).
                self.unrepairable(block, &e);
                return Err(e);
            }
        }
        self.stats.reads_retried.fetch_add(1, Ordering::Relaxed);
        Ok(())
    }
}

/// Which of the tags a block's data matched.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Match {
    /// The newest tag (or the only one accepted).
    Newest,
    /// Only the older tag of a pair read with the after-crash rules (or "never written" for a
    /// first write a crash may have cut short).
    Fallback,
}
