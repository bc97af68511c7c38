//! A volume on two devices: data on one, everything else on the other.
//!
//! With `format --metadata-device`, the **data device** holds block `b` at byte `b·B`, exactly
//! where a raw image of the volume would (its first `size` bytes *are* the plain image), and a
//! 4 KiB trailer in its last 4 KiB that names the volume and the metadata device. The
//! **metadata device** holds the superblocks, group bitmaps, journal and the groups' metadata
//! blocks, packed: a small fast device in front of a large one.
//!
//! The engine does not know: [`SplitBackend`] presents the single-device layout of the
//! volume's [`Geometry`] (its *virtual* address space) and routes every byte to where it lives.
//! A flush flushes both devices, so every ordering the commit protocols rely on ("durable
//! before") holds for the pair: each write is on one device, and a barrier covers both.

use crate::cast::usize_of;
use crate::format::{le64, Geometry, SB_REGION, SECTOR_SIZE};
use blockguard_backend::Backend;
use std::io;
use std::ops::Range;
use std::sync::Arc;

/// Magic at byte 0 of the data device's trailer.
pub const TRAILER_MAGIC: [u8; 8] = *b"BGDATA01";
/// Bytes of the metadata device's path kept in the trailer (a hint for finding it).
pub const MAX_HINT: usize = 400;

/// The data device's trailer: which volume and which metadata device it belongs to.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct DataTrailer {
    /// The volume's UUID.
    pub uuid: [u8; 16],
    /// The pair's identity, also in the metadata device's superblock (`meta_device`).
    pub pair: [u8; 16],
    /// The volume's logical size: the plain image is the device's first `size` bytes.
    pub size: u64,
    /// Where the metadata device was at format (absolute path), to find it again.
    pub meta_hint: String,
}

/// Why a data device's last 4 KiB are not a trailer.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum TrailerError {
    /// Not a trailer at all (the device is not a blockguard data device).
    #[error("no blockguard data-device trailer in its last 4 KiB")]
    Missing,
    /// A trailer whose checksum or fields are wrong.
    #[error("damaged data-device trailer: {0}")]
    Damaged(String),
}

impl DataTrailer {
    /// The 512-byte trailer sector.
    pub fn encode(&self) -> [u8; SECTOR_SIZE] {
        let mut b = [0u8; SECTOR_SIZE];
        b[0..8].copy_from_slice(&TRAILER_MAGIC);
        b[8..24].copy_from_slice(&self.uuid);
        b[24..40].copy_from_slice(&self.pair);
        b[40..48].copy_from_slice(&self.size.to_le_bytes());
        let hint = self.meta_hint.as_bytes();
        let n = hint.len().min(MAX_HINT);
        b[48..50].copy_from_slice(&u16::try_from(n).unwrap_or(0).to_le_bytes());
        b[50..50 + n].copy_from_slice(&hint[..n]);
        let crc = crc32c::crc32c(&b[..SECTOR_SIZE - 4]);
        b[SECTOR_SIZE - 4..].copy_from_slice(&crc.to_le_bytes());
        b
    }

    /// Decodes a trailer sector.
    pub fn decode(b: &[u8]) -> Result<DataTrailer, TrailerError> {
        let b = b.get(..SECTOR_SIZE).ok_or(TrailerError::Missing)?;
        if b[0..8] != TRAILER_MAGIC {
            return Err(TrailerError::Missing);
        }
        let stored = u32::from_le_bytes([b[508], b[509], b[510], b[511]]);
        if stored != crc32c::crc32c(&b[..SECTOR_SIZE - 4]) {
            return Err(TrailerError::Damaged("checksum mismatch".into()));
        }
        let n = usize::from(u16::from_le_bytes([b[48], b[49]]));
        if n > MAX_HINT {
            return Err(TrailerError::Damaged(format!("path hint of {n} bytes")));
        }
        let meta_hint = std::str::from_utf8(&b[50..50 + n])
            .map_err(|_| TrailerError::Damaged("path hint is not UTF-8".into()))?
            .to_string();
        let mut uuid = [0u8; 16];
        uuid.copy_from_slice(&b[8..24]);
        let mut pair = [0u8; 16];
        pair.copy_from_slice(&b[24..40]);
        if pair == [0; 16] {
            return Err(TrailerError::Damaged("pair identity all zero".into()));
        }
        Ok(DataTrailer {
            uuid,
            pair,
            size: le64(b, 40),
            meta_hint,
        })
    }
}

/// Byte offset of the trailer on a data device of `len` bytes: its last whole 4 KiB.
pub fn trailer_offset(len: u64) -> Option<u64> {
    (len / SB_REGION * SB_REGION).checked_sub(SB_REGION)
}

/// Bytes a data device needs for a volume of `size` bytes: the image, then the trailer.
pub fn data_device_len(size: u64) -> u64 {
    size + SB_REGION
}

/// Reads the trailer of a data device.
///
/// # Errors
/// I/O errors, and [`TrailerError`] (as `InvalidData`) when there is no valid trailer.
pub fn read_trailer(data: &dyn Backend) -> io::Result<Result<DataTrailer, TrailerError>> {
    let Some(at) = trailer_offset(data.len()) else {
        return Ok(Err(TrailerError::Missing));
    };
    let align = data.alignment().max(1);
    let mut buf = vec![0u8; usize_of(SB_REGION) + align];
    let start = (align - buf.as_ptr() as usize % align) % align;
    let region = &mut buf[start..start + usize_of(SB_REGION)];
    data.read_at(region, at)?;
    Ok(DataTrailer::decode(region))
}

/// Where the virtual layout's parts live on the two devices.
#[derive(Clone, Copy, Debug)]
pub struct SplitLayout {
    geo: Geometry,
    /// Virtual offset where the tail (bitmaps' second copies, backup superblock) starts.
    tail: u64,
    /// Metadata-device offset of the tail.
    meta_tail: u64,
}

/// Which device a piece of a request goes to.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Dev {
    Meta,
    Data,
    /// Padding of the virtual layout that holds nothing (reads as zeros, never written).
    Nowhere,
}

impl SplitLayout {
    /// The layout of `geo` over two devices.
    pub fn new(geo: Geometry) -> SplitLayout {
        let tail = geo.backup_sb_offset - 3 * geo.map_region_len();
        let meta_tail = geo.first_group_offset + geo.groups * 2 * u64::from(geo.block_size);
        SplitLayout { geo, tail, meta_tail }
    }

    /// Bytes the metadata device needs.
    pub fn meta_len(&self) -> u64 {
        self.meta_tail + (self.geo.backing_len - self.tail)
    }

    /// Where virtual byte `x` lives, and how many bytes from there stay on the same device
    /// contiguously.
    fn locate(&self, x: u64) -> (Dev, u64, u64) {
        let g = &self.geo;
        let bs = u64::from(g.block_size);
        let first = g.first_group_offset;
        if x < first {
            return (Dev::Meta, x, first - x);
        }
        if x >= self.tail {
            return (Dev::Meta, self.meta_tail + (x - self.tail), g.backing_len - x);
        }
        let group = (x - first) / g.group_len();
        if group >= g.groups {
            return (Dev::Nowhere, 0, self.tail - x);
        }
        let r = x - first - group * g.group_len();
        if r < 2 * bs {
            return (Dev::Meta, first + group * 2 * bs + r, 2 * bs - r);
        }
        let index = (r - 2 * bs) / bs;
        let blocks = u64::from(g.blocks_in_group(group));
        if index >= blocks {
            return (
                Dev::Nowhere,
                0,
                self.tail.min(first + (group + 1) * g.group_len()) - x,
            );
        }
        let block = g.first_block(group) + index;
        let within = (r - 2 * bs) % bs;
        (Dev::Data, block * bs + within, (blocks - index) * bs - within)
    }

    /// The pieces of virtual range `offset..offset + len`: (device, device offset, offset in
    /// the request, length).
    fn pieces(&self, offset: u64, len: u64) -> Vec<(Dev, u64, usize, usize)> {
        let mut out = Vec::new();
        let mut done = 0u64;
        while done < len {
            let (dev, at, run) = self.locate(offset + done);
            let n = run.min(len - done);
            out.push((dev, at, usize_of(done), usize_of(n)));
            done += n;
        }
        out
    }
}

/// The two devices of a split volume, seen as the single-device layout the engine uses.
#[derive(Debug)]
pub struct SplitBackend {
    data: Arc<dyn Backend>,
    meta: Arc<dyn Backend>,
    layout: SplitLayout,
}

impl SplitBackend {
    /// `data` and `meta` as one backend of `layout`'s virtual length. Both must be long
    /// enough (checked).
    ///
    /// # Errors
    /// `InvalidInput` naming the device that is too short.
    pub fn new(
        data: Arc<dyn Backend>,
        meta: Arc<dyn Backend>,
        layout: SplitLayout,
    ) -> io::Result<SplitBackend> {
        let need_data = data_device_len(layout.geo.size());
        if data.len() < need_data {
            return Err(io::Error::new(
                io::ErrorKind::InvalidInput,
                format!(
                    "data device {} has {} bytes, the volume needs {need_data}",
                    data.name(),
                    data.len()
                ),
            ));
        }
        if meta.len() < layout.meta_len() {
            return Err(io::Error::new(
                io::ErrorKind::InvalidInput,
                format!(
                    "metadata device {} has {} bytes, the volume needs {}",
                    meta.name(),
                    meta.len(),
                    layout.meta_len()
                ),
            ));
        }
        Ok(SplitBackend { data, meta, layout })
    }

    fn dev(&self, d: Dev) -> &dyn Backend {
        match d {
            Dev::Data => &*self.data,
            _ => &*self.meta,
        }
    }

    fn nowhere_write() -> io::Error {
        io::Error::new(
            io::ErrorKind::InvalidInput,
            "a write into the layout's padding, which neither device holds",
        )
    }
}

impl Backend for SplitBackend {
    fn len(&self) -> u64 {
        self.layout.geo.backing_len
    }

    fn read_at(&self, buf: &mut [u8], offset: u64) -> io::Result<()> {
        blockguard_backend::check_range(offset, buf.len() as u64, self.len())?;
        for (dev, at, from, n) in self.layout.pieces(offset, buf.len() as u64) {
            match dev {
                Dev::Nowhere => buf[from..from + n].fill(0),
                d => self.dev(d).read_at(&mut buf[from..from + n], at)?,
            }
        }
        Ok(())
    }

    fn write_at(&self, buf: &[u8], offset: u64) -> io::Result<()> {
        blockguard_backend::check_range(offset, buf.len() as u64, self.len())?;
        let pieces = self.layout.pieces(offset, buf.len() as u64);
        if pieces.iter().any(|p| p.0 == Dev::Nowhere) {
            return Err(Self::nowhere_write());
        }
        for (dev, at, from, n) in pieces {
            self.dev(dev).write_at(&buf[from..from + n], at)?;
        }
        Ok(())
    }

    fn write_vectored_at(&self, bufs: &[&[u8]], offset: u64) -> io::Result<()> {
        let total: u64 = bufs.iter().map(|b| b.len() as u64).sum();
        blockguard_backend::check_range(offset, total, self.len())?;
        // The engine's vectored writes are runs of data blocks inside one group: one piece.
        if let [(dev @ (Dev::Data | Dev::Meta), at, _, _)] = self.layout.pieces(offset, total)[..] {
            return self.dev(dev).write_vectored_at(bufs, at);
        }
        let mut pos = offset;
        for b in bufs {
            self.write_at(b, pos)?;
            pos += b.len() as u64;
        }
        Ok(())
    }

    fn flush(&self) -> io::Result<()> {
        // Both, whatever the first says: the commit protocols' barriers cover the pair.
        let d = self.data.flush();
        let m = self.meta.flush();
        d.and(m)
    }

    fn start_writeback(&self, offset: u64, len: u64) -> io::Result<()> {
        for (dev, at, _, n) in self.layout.pieces(offset, len) {
            if dev != Dev::Nowhere {
                self.dev(dev).start_writeback(at, n as u64)?;
            }
        }
        Ok(())
    }

    fn drop_cached(&self, offset: u64, len: u64) -> io::Result<()> {
        for (dev, at, _, n) in self.layout.pieces(offset, len) {
            if dev != Dev::Nowhere {
                self.dev(dev).drop_cached(at, n as u64)?;
            }
        }
        Ok(())
    }

    fn zero_range(&self, offset: u64, len: u64) -> io::Result<()> {
        blockguard_backend::check_range(offset, len, self.len())?;
        for (dev, at, _, n) in self.layout.pieces(offset, len) {
            if dev != Dev::Nowhere {
                self.dev(dev).zero_range(at, n as u64)?;
            }
        }
        Ok(())
    }

    fn zero_ranges(&self, offset: u64, len: u64) -> io::Result<Vec<Range<u64>>> {
        blockguard_backend::check_range(offset, len, self.len())?;
        let mut out: Vec<Range<u64>> = Vec::new();
        for (dev, at, from, n) in self.layout.pieces(offset, len) {
            let base = offset + from as u64;
            let holes: Vec<Range<u64>> = match dev {
                Dev::Nowhere => std::iter::once(0..n as u64).collect(),
                d => self
                    .dev(d)
                    .zero_ranges(at, n as u64)?
                    .into_iter()
                    .map(|r| r.start - at..r.end - at)
                    .collect(),
            };
            for h in holes {
                let r = base + h.start..base + h.end;
                match out.last_mut() {
                    Some(last) if last.end == r.start => last.end = r.end,
                    _ => out.push(r),
                }
            }
        }
        Ok(out)
    }

    fn alignment(&self) -> usize {
        self.data.alignment().max(self.meta.alignment())
    }

    fn is_read_only(&self) -> bool {
        self.data.is_read_only() || self.meta.is_read_only()
    }

    fn name(&self) -> String {
        self.data.name()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use blockguard_backend::MemoryBackend;

    fn layout() -> SplitLayout {
        let g = Geometry::for_size_with_groups(4096 * 50, 4096, 8, Some(8)).unwrap();
        SplitLayout::new(g)
    }

    #[test]
    fn every_virtual_byte_maps_once_and_data_blocks_land_at_raw_offsets() {
        let l = layout();
        let g = l.geo;
        for b in 0..g.data_blocks {
            let (dev, at, run) = l.locate(g.data_offset(b));
            assert_eq!((dev, at), (Dev::Data, b * 4096), "block {b}");
            assert!(run >= 4096);
        }
        let mut meta_seen = std::collections::BTreeSet::new();
        let mut x = 0;
        while x < g.backing_len {
            let (dev, at, run) = l.locate(x);
            assert!(run > 0);
            if dev == Dev::Meta {
                for k in 0..run / 512 {
                    assert!(
                        meta_seen.insert(at + k * 512),
                        "meta byte {} mapped twice",
                        at + k * 512
                    );
                }
                assert!(at + run <= l.meta_len());
            }
            x += run;
        }
        assert_eq!(
            meta_seen.len() as u64 * 512,
            l.meta_len(),
            "the metadata device is packed"
        );
    }

    #[test]
    fn reads_and_writes_across_devices_round_trip() {
        let l = layout();
        let data: Arc<dyn Backend> = Arc::new(MemoryBackend::new(data_device_len(l.geo.size())).unwrap());
        let meta: Arc<dyn Backend> = Arc::new(MemoryBackend::new(l.meta_len()).unwrap());
        let s = SplitBackend::new(data.clone(), meta, l).unwrap();
        // A range spanning a group's metadata and data blocks (as a resync copies it).
        let at = l.geo.meta_offset(1, 0);
        let len = 10 * 4096;
        let bytes: Vec<u8> = (0..len).map(|i| u8::try_from(i % 251).unwrap()).collect();
        s.write_at(&bytes, at).unwrap();
        let mut back = vec![0u8; len];
        s.read_at(&mut back, at).unwrap();
        assert_eq!(back, bytes);
        let mut raw = vec![0u8; 4096];
        data.read_at(&mut raw, 8 * 4096).unwrap();
        assert_eq!(raw[..], bytes[2 * 4096..3 * 4096], "block 8 at its raw offset");
    }

    #[test]
    fn trailer_round_trips_and_rejects_damage() {
        let t = DataTrailer {
            uuid: [1; 16],
            pair: [2; 16],
            size: 1 << 30,
            meta_hint: "/dev/nvme0n1p3".into(),
        };
        let b = t.encode();
        assert_eq!(DataTrailer::decode(&b), Ok(t));
        let mut d = b;
        d[30] ^= 1;
        assert!(matches!(DataTrailer::decode(&d), Err(TrailerError::Damaged(_))));
        assert_eq!(DataTrailer::decode(&[0u8; 512]), Err(TrailerError::Missing));
    }
}
