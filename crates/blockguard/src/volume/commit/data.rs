//! Writing a committed batch's data: neighbouring blocks coalesced into vectored writes,
//! zeroed runs as one `zero_range`, long runs hinted for early writeback. The same for every
//! consistency mode; only when it runs differs.

use super::super::stage::{bytes, Batch, SharedBuf, Staged};
use super::super::{aligned, Inner};
use crate::cast::usize_of;
use crate::error::Result;
use blockguard_backend::Backend as _;
use std::sync::Arc;

/// Appends a staged block to a run of (buffer, start, end) pieces, extending the last piece
/// when the block directly follows it in the same buffer.
fn push_block<'a>(run: &mut Vec<(&'a SharedBuf, usize, usize)>, e: &'a Staged, bs: usize) {
    if let Staged::Data { buf, at, .. } = e {
        if let Some(last) = run.last_mut() {
            if Arc::ptr_eq(last.0, buf) && last.2 == *at {
                last.2 += bs;
                return;
            }
        }
        run.push((buf, *at, *at + bs));
    }
}

/// Data runs at least this long get an early writeback hint (smaller ones are left to the
/// next flush: hinting every 4 KiB block of a random batch would cost more than it saves).
const WRITEBACK_MIN: usize = 256 << 10;

/// A run of neighbouring blocks of one group to write: their bytes, or `None` to zero them.
struct Run<'a> {
    off: u64,
    len: usize,
    data: Option<Vec<&'a [u8]>>,
}

/// Most iovecs per vectored write (the kernel's `IOV_MAX`).
const MAX_IOV: usize = 1024;

impl Inner {
    /// Writes the batch's data: runs of neighbouring data blocks become one vectored write,
    /// runs of zeroed blocks one `zero_range`.
    pub(super) fn write_data(&self, batch: &Batch) -> Result<()> {
        let bs = self.geo.block_size as usize;
        let mut runs: Vec<Run<'_>> = Vec::new();
        let mut iter = batch.iter().peekable();
        while let Some((&start, entry)) = iter.next() {
            let zero = matches!(entry, Staged::Zero);
            let (group, _) = self.geo.group_of(start);
            let group_end = self.geo.first_block(group) + u64::from(self.geo.blocks_in_group(group));
            // Neighbouring blocks staged by one request sit side by side in one buffer: they
            // become a single iovec.
            let mut pieces: Vec<(&SharedBuf, usize, usize)> = Vec::new();
            push_block(&mut pieces, entry, bs);
            let mut end = start + 1;
            while let Some((&b, e)) = iter.peek() {
                let same_kind = matches!(e, Staged::Zero) == zero;
                if b != end || b >= group_end || !same_kind || pieces.len() >= MAX_IOV {
                    break;
                }
                push_block(&mut pieces, e, bs);
                end += 1;
                iter.next();
            }
            let len = usize_of(end - start) * bs;
            let data: Vec<&[u8]> = pieces.iter().map(|(b, lo, hi)| &bytes(b)[*lo..*hi]).collect();
            debug_assert!(zero || data.iter().map(|r| r.len()).sum::<usize>() == len);
            runs.push(Run {
                off: self.geo.data_offset(start),
                len,
                data: (!zero).then_some(data),
            });
        }
        // One thread: buffered writes to one file serialize on its inode lock, so a second
        // writer thread only spins on that lock (tried: more CPU, no gain).
        runs.iter().try_for_each(|r| self.write_run(r))
    }

    /// Writes one run of neighbouring blocks (or zeroes it) and hints its writeback.
    fn write_run(&self, run: &Run<'_>) -> Result<()> {
        let (off, len) = (run.off, run.len);
        let Some(data) = &run.data else {
            return self
                .backend
                .zero_range(off, len as u64)
                .map_err(self.io_err("zeroing data", off));
        };
        let align = self.backend.alignment().max(1);
        if align > 1 {
            let mut buf = aligned(len, align);
            let mut at = 0;
            for d in data {
                buf.as_mut()[at..at + d.len()].copy_from_slice(d);
                at += d.len();
            }
            self.backend
                .write_at(buf.as_ref(), off)
                .map_err(self.io_err("writing data", off))?;
        } else {
            self.backend
                .write_vectored_at(data, off)
                .map_err(self.io_err("writing data", off))?;
        }
        if len >= WRITEBACK_MIN {
            // Let the disk start on this run while the next batch is staged, so the flush
            // that must precede the next metadata write finds it mostly done. A failure here
            // also shows at that flush, which is where it counts.
            if let Err(e) = self.backend.start_writeback(off, len as u64) {
                tracing::debug!(volume = %self.name, offset = off, "writeback hint failed: {e}");
            }
        }
        Ok(())
    }
}
