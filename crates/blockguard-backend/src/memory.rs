//! An in-memory backend: the reference store for unit and property tests.

use crate::{check_range, usize_of, Backend, SECTOR_SIZE};
use std::io;
use std::ops::Range;
use std::sync::{PoisonError, RwLock};

/// The 512-byte-aligned sectors lying wholly inside `offset..offset + len` whose bytes in
/// `image` are all zero, adjacent ones merged into one range: the answer of
/// [`Backend::zero_ranges`] for the in-memory stores. The range must lie inside `image`
/// (checked by the caller with [`check_range`]).
/// True if every byte is zero: sixteen bytes at a time (a byte loop that stops at the first
/// non-zero byte does not vectorize, and the simulator scans whole images with this).
fn is_zero(data: &[u8]) -> bool {
    let mut chunks = data.chunks_exact(16);
    chunks
        .by_ref()
        .all(|c| c.iter().fold(0u8, |acc, &b| acc | b) == 0)
        && chunks.remainder().iter().all(|&b| b == 0)
}

pub(crate) fn zero_sectors(image: &[u8], offset: u64, len: u64) -> Vec<Range<u64>> {
    let s = SECTOR_SIZE as u64;
    let end = offset.saturating_add(len).min(image.len() as u64);
    let mut out: Vec<Range<u64>> = Vec::new();
    let mut at = offset.div_ceil(s).saturating_mul(s);
    while at.saturating_add(s) <= end {
        let sector = &image[usize_of(at)..usize_of(at + s)];
        if is_zero(sector) {
            match out.last_mut() {
                Some(last) if last.end == at => last.end = at + s,
                _ => out.push(at..at + s),
            }
        }
        at += s;
    }
    out
}

/// A fixed-size store held in memory. `flush` is a no-op: nothing here survives the process.
#[derive(Debug)]
pub struct MemoryBackend {
    data: RwLock<Vec<u8>>,
    name: String,
}

impl MemoryBackend {
    /// A zero-filled store of `len` bytes.
    pub fn new(len: u64) -> io::Result<Self> {
        let len = usize::try_from(len)
            .map_err(|_| io::Error::new(io::ErrorKind::InvalidInput, "length exceeds memory"))?;
        Ok(Self::from_vec(vec![0; len]))
    }

    /// A store holding `data` (for example a crash image produced by the fault backend).
    pub fn from_vec(data: Vec<u8>) -> Self {
        Self {
            data: RwLock::new(data),
            name: "memory".to_string(),
        }
    }

    /// A copy of the whole store.
    pub fn snapshot(&self) -> Vec<u8> {
        self.data.read().unwrap_or_else(PoisonError::into_inner).clone()
    }
}

impl Backend for MemoryBackend {
    fn len(&self) -> u64 {
        self.data.read().unwrap_or_else(PoisonError::into_inner).len() as u64
    }

    fn read_at(&self, buf: &mut [u8], offset: u64) -> io::Result<()> {
        let data = self.data.read().unwrap_or_else(PoisonError::into_inner);
        check_range(offset, buf.len() as u64, data.len() as u64)?;
        let start = usize_of(offset);
        buf.copy_from_slice(&data[start..start + buf.len()]);
        Ok(())
    }

    fn write_at(&self, buf: &[u8], offset: u64) -> io::Result<()> {
        let mut data = self.data.write().unwrap_or_else(PoisonError::into_inner);
        check_range(offset, buf.len() as u64, data.len() as u64)?;
        let start = usize_of(offset);
        data[start..start + buf.len()].copy_from_slice(buf);
        Ok(())
    }

    fn flush(&self) -> io::Result<()> {
        Ok(())
    }

    /// Does nothing (memory has no writeback), but refuses a range outside the store like
    /// [`FileBackend`](crate::FileBackend) does.
    fn start_writeback(&self, offset: u64, len: u64) -> io::Result<()> {
        if len == 0 {
            return Ok(());
        }
        check_range(offset, len, self.len())
    }

    /// The all-zero 512-byte-aligned sectors wholly inside the range, merged.
    fn zero_ranges(&self, offset: u64, len: u64) -> io::Result<Vec<Range<u64>>> {
        let data = self.data.read().unwrap_or_else(PoisonError::into_inner);
        check_range(offset, len, data.len() as u64)?;
        Ok(zero_sectors(&data, offset, len))
    }

    fn zero_range(&self, offset: u64, len: u64) -> io::Result<()> {
        let mut data = self.data.write().unwrap_or_else(PoisonError::into_inner);
        check_range(offset, len, data.len() as u64)?;
        data[usize_of(offset)..usize_of(offset + len)].fill(0);
        Ok(())
    }

    fn name(&self) -> String {
        self.name.clone()
    }
}

#[cfg(test)]
// Expected answers of `zero_ranges` are often a single range.
#[allow(clippy::single_range_in_vec_init)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    /// Brute force: every aligned sector inside the range, tested byte by byte, then merged.
    fn zero_sectors_reference(image: &[u8], offset: u64, len: u64) -> Vec<Range<u64>> {
        let mut out: Vec<Range<u64>> = Vec::new();
        for sector in 0..image.len() as u64 / 512 {
            let (lo, hi) = (sector * 512, sector * 512 + 512);
            if lo < offset || hi > offset + len {
                continue;
            }
            if (lo..hi).all(|i| image[usize_of(i)] == 0) {
                if let Some(last) = out.last_mut().filter(|l| l.end == lo) {
                    last.end = hi;
                } else {
                    out.push(lo..hi);
                }
            }
        }
        out
    }

    #[test]
    fn zero_ranges_lists_whole_zero_sectors_merged() {
        let m = MemoryBackend::new(8 * 512).unwrap();
        assert_eq!(m.zero_ranges(0, 4096).unwrap(), [0..4096]);
        m.write_at(&[1], 1000).unwrap(); // sector 1
        m.write_at(&[1], 5 * 512).unwrap(); // sector 5
        assert_eq!(m.zero_ranges(0, 4096).unwrap(), [0..512, 1024..2560, 3072..4096]);
        // Only sectors wholly inside the range count; a partial one is left out.
        assert_eq!(m.zero_ranges(100, 2000).unwrap(), [1024..2048]);
        assert_eq!(m.zero_ranges(1024, 511).unwrap(), []);
        assert_eq!(m.zero_ranges(4096, 0).unwrap(), []);
        // Zeroing makes a sector count again.
        m.zero_range(1000, 1).unwrap();
        assert_eq!(m.zero_ranges(0, 4096).unwrap(), [0..2560, 3072..4096]);
        for (off, len) in [(4096, 1), (0, 4097), (u64::MAX, 2)] {
            let e = m.zero_ranges(off, len).unwrap_err();
            assert_eq!(e.kind(), io::ErrorKind::InvalidInput);
        }
        // A store whose length is not a multiple of 512: its partial last sector never counts.
        let odd = MemoryBackend::new(1000).unwrap();
        assert_eq!(odd.zero_ranges(0, 1000).unwrap(), [0..512]);
    }

    #[test]
    fn start_writeback_checks_its_range() {
        let m = MemoryBackend::new(1024).unwrap();
        m.start_writeback(0, 1024).unwrap();
        m.start_writeback(5000, 0).unwrap();
        let e = m.start_writeback(1000, 25).unwrap_err();
        assert_eq!(e.kind(), io::ErrorKind::InvalidInput);
    }

    proptest! {
        #[test]
        fn zero_sectors_match_brute_force(
            writes in prop::collection::vec((0usize..4096, 1u8..=255), 0..12),
            offset in 0u64..4096,
            len in 0u64..4096,
        ) {
            let mut image = vec![0u8; 4096];
            for (at, v) in writes {
                image[at] = v;
            }
            let len = len.min(4096 - offset);
            let got = zero_sectors(&image, offset, len);
            prop_assert_eq!(&got, &zero_sectors_reference(&image, offset, len));
        }
    }

    #[test]
    fn reads_back_writes_and_refuses_out_of_range() {
        let m = MemoryBackend::new(4096).unwrap();
        m.write_at(b"hello", 100).unwrap();
        let mut buf = [0u8; 5];
        m.read_at(&mut buf, 100).unwrap();
        assert_eq!(&buf, b"hello");
        assert!(m.write_at(b"x", 4096).is_err());
        assert!(m.read_at(&mut buf, 4092).is_err());
        m.zero_range(100, 5).unwrap();
        m.read_at(&mut buf, 100).unwrap();
        assert_eq!(buf, [0; 5]);
    }
}
