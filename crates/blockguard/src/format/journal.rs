//! The journal area of a `journal`-mode volume (`docs/FORMAT.md`, "Journal").
//!
//! The area starts with two checkpoint regions of 4 KiB, each holding the same 512-byte
//! checkpoint (where replay starts), followed by the log: a ring of segments, each starting
//! on a block boundary. A segment is a descriptor — a 512-byte header sector then one entry
//! per block, padded to whole blocks — followed by the data of its data entries, in entry
//! order. The header's own crc32c covers the header; an XXH3-64 of everything after the
//! header sector (entries, padding and data) detects a segment that a crash left partly
//! written. All integers are little-endian.

use super::{le32, le64, SB_REGION, SECTOR_SIZE};
use crate::cast::usize_of;
use xxhash_rust::xxh3::xxh3_64;

/// Magic at byte 0 of a segment header.
pub const SEGMENT_MAGIC: [u8; 8] = *b"BGJSEG01";
/// Magic at byte 0 of a checkpoint.
pub const CHECKPOINT_MAGIC: [u8; 8] = *b"BGJCKP01";
/// Bytes before the log: two checkpoint regions of 4 KiB.
pub const CHECKPOINT_AREA: u64 = 2 * SB_REGION;
/// Byte offset, in the header sector, of the header's crc32c (its last four bytes).
const HEADER_CRC_AT: usize = SECTOR_SIZE - 4;

/// Bytes of one entry for tags of `tag_size` bytes: block number (u64), kind (u8), seven
/// reserved bytes, then the tag padded to a multiple of 8.
pub fn entry_size(tag_size: usize) -> usize {
    16 + tag_size.next_multiple_of(8)
}

/// What an entry does to its block.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum EntryKind {
    /// New content: one data block of the segment, in entry order, with its tag.
    Data,
    /// The block becomes unwritten (reads as zeros); no data block, tag all zero.
    Zero,
}

impl EntryKind {
    fn id(self) -> u8 {
        match self {
            EntryKind::Data => 1,
            EntryKind::Zero => 2,
        }
    }
}

/// One block of a segment.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Entry {
    /// Data block number.
    pub block: u64,
    /// What happens to it.
    pub kind: EntryKind,
    /// Its tag as stored in metadata (`tag_size` bytes; zero for [`EntryKind::Zero`]).
    pub tag: Vec<u8>,
}

/// A segment header: the identity and size of one segment.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct SegmentHeader {
    /// The volume's UUID: a segment of another volume (an image stored inside this one) is
    /// never taken for one of ours.
    pub uuid: [u8; 16],
    /// The journal session: random, new at every read-write open, so segments of earlier
    /// sessions left in the ring are never replayed.
    pub session: u64,
    /// Sequence number within the session, from 0, one per segment.
    pub seq: u64,
    /// Bytes of the whole segment (descriptor and data), a multiple of the block size.
    pub len: u64,
    /// Number of entries.
    pub entries: u32,
    /// Number of data entries (data blocks after the descriptor).
    pub data_blocks: u32,
    /// XXH3-64 of the segment's bytes after the header sector.
    pub payload_hash: u64,
}

/// Why bytes are not a valid segment or checkpoint.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum JournalParseError {
    /// All zero: never written.
    #[error("never written (all zero)")]
    Blank,
    /// Not the expected magic.
    #[error("bad magic")]
    BadMagic,
    /// The header's own checksum does not match.
    #[error("header checksum mismatch (stored {stored:#010x}, computed {computed:#010x})")]
    BadChecksum {
        /// Stored value.
        stored: u32,
        /// Computed value.
        computed: u32,
    },
    /// Another volume's.
    #[error("belongs to another volume")]
    ForeignVolume,
    /// A field that cannot be valid.
    #[error("{0}")]
    Field(String),
    /// The payload does not hash to the header's value: the segment was cut short.
    #[error("payload hash mismatch (header says {stored:#018x}, payload hashes to {computed:#018x})")]
    BadPayload {
        /// Stored value.
        stored: u64,
        /// Computed value.
        computed: u64,
    },
}

/// Bytes of a segment's descriptor: header sector and entries, padded to whole blocks.
pub fn descriptor_len(entries: usize, tag_size: usize, block_size: u32) -> u64 {
    let bytes = SECTOR_SIZE + entries * entry_size(tag_size);
    (bytes as u64).next_multiple_of(u64::from(block_size))
}

/// Bytes of a segment with `entries` entries of which `data_blocks` carry data.
pub fn segment_len(entries: usize, data_blocks: usize, tag_size: usize, block_size: u32) -> u64 {
    descriptor_len(entries, tag_size, block_size) + data_blocks as u64 * u64::from(block_size)
}

/// Who a segment belongs to and where it stands in its session.
#[derive(Clone, Copy, Debug)]
pub struct SegmentIdentity<'a> {
    /// The volume's UUID.
    pub uuid: &'a [u8; 16],
    /// The journal session.
    pub session: u64,
    /// The segment's sequence number.
    pub seq: u64,
}

/// Encodes a whole segment into `out` (exactly [`segment_len`] bytes): descriptor, then the
/// data entries' blocks (`data`, one `block_size` slice per data entry, in entry order).
///
/// # Panics
/// If `out` is not exactly the segment's length (a caller's arithmetic error: the segment
/// would be cut short or carry stale bytes).
pub fn encode_segment_into(
    out: &mut [u8],
    id: &SegmentIdentity<'_>,
    entries: &[Entry],
    data: &[&[u8]],
    tag_size: usize,
    block_size: u32,
) {
    let bs = block_size as usize;
    debug_assert_eq!(
        data.len(),
        entries.iter().filter(|e| e.kind == EntryKind::Data).count()
    );
    let desc = usize_of(descriptor_len(entries.len(), tag_size, block_size));
    assert_eq!(
        out.len(),
        desc + data.len() * bs,
        "segment buffer of the wrong length"
    );
    out[..desc].fill(0);
    let es = entry_size(tag_size);
    for (i, e) in entries.iter().enumerate() {
        let at = SECTOR_SIZE + i * es;
        out[at..at + 8].copy_from_slice(&e.block.to_le_bytes());
        out[at + 8] = e.kind.id();
        out[at + 16..at + 16 + tag_size].copy_from_slice(&e.tag[..tag_size]);
    }
    for (k, d) in data.iter().enumerate() {
        out[desc + k * bs..desc + (k + 1) * bs].copy_from_slice(&d[..bs]);
    }
    let header = SegmentHeader {
        uuid: *id.uuid,
        session: id.session,
        seq: id.seq,
        len: out.len() as u64,
        entries: u32::try_from(entries.len()).unwrap_or(u32::MAX),
        data_blocks: u32::try_from(data.len()).unwrap_or(u32::MAX),
        payload_hash: xxh3_64(&out[SECTOR_SIZE..]),
    };
    out[..SECTOR_SIZE].copy_from_slice(&header.encode());
}

/// [`encode_segment_into`] a new buffer, with `data` the data blocks back to back.
pub fn encode_segment(
    id: &SegmentIdentity<'_>,
    entries: &[Entry],
    data: &[u8],
    tag_size: usize,
    block_size: u32,
) -> Vec<u8> {
    let blocks: Vec<&[u8]> = data.chunks(block_size as usize).collect();
    let len = segment_len(entries.len(), blocks.len(), tag_size, block_size);
    let mut out = vec![0u8; usize_of(len)];
    encode_segment_into(&mut out, id, entries, &blocks, tag_size, block_size);
    out
}

impl SegmentHeader {
    /// The 512-byte header sector.
    pub fn encode(&self) -> [u8; SECTOR_SIZE] {
        let mut b = [0u8; SECTOR_SIZE];
        b[0..8].copy_from_slice(&SEGMENT_MAGIC);
        b[8..24].copy_from_slice(&self.uuid);
        b[24..32].copy_from_slice(&self.session.to_le_bytes());
        b[32..40].copy_from_slice(&self.seq.to_le_bytes());
        b[40..48].copy_from_slice(&self.len.to_le_bytes());
        b[48..52].copy_from_slice(&self.entries.to_le_bytes());
        b[52..56].copy_from_slice(&self.data_blocks.to_le_bytes());
        b[56..64].copy_from_slice(&self.payload_hash.to_le_bytes());
        let crc = crc32c::crc32c(&b[..HEADER_CRC_AT]);
        b[HEADER_CRC_AT..].copy_from_slice(&crc.to_le_bytes());
        b
    }

    /// Decodes a header sector of volume `uuid` whose segment must fit `room` bytes and use
    /// `tag_size`-byte tags and `block_size`-byte blocks. The payload is checked separately
    /// ([`parse_entries`]).
    pub fn decode(
        b: &[u8],
        uuid: &[u8; 16],
        tag_size: usize,
        block_size: u32,
        room: u64,
    ) -> Result<SegmentHeader, JournalParseError> {
        let b = sealed_sector(b, SEGMENT_MAGIC)?;
        if b[8..24] != uuid[..] {
            return Err(JournalParseError::ForeignVolume);
        }
        let h = SegmentHeader {
            uuid: *uuid,
            session: le64(b, 24),
            seq: le64(b, 32),
            len: le64(b, 40),
            entries: le32(b, 48),
            data_blocks: le32(b, 52),
            payload_hash: le64(b, 56),
        };
        if h.data_blocks > h.entries {
            return Err(JournalParseError::Field(format!(
                "{} data blocks but {} entries",
                h.data_blocks, h.entries
            )));
        }
        let want = segment_len(
            usize_of(u64::from(h.entries)),
            usize_of(u64::from(h.data_blocks)),
            tag_size,
            block_size,
        );
        if h.len != want || h.len > room {
            return Err(JournalParseError::Field(format!(
                "segment length {} (its entries need {want}, {room} bytes of log remain)",
                h.len
            )));
        }
        if b[64..HEADER_CRC_AT].iter().any(|&x| x != 0) {
            return Err(JournalParseError::Field("reserved header bytes not zero".into()));
        }
        Ok(h)
    }
}

/// Checks a sealed 512-byte sector: not blank, the magic, the trailing crc32c.
fn sealed_sector(b: &[u8], magic: [u8; 8]) -> Result<&[u8], JournalParseError> {
    let b = b.get(..SECTOR_SIZE).ok_or(JournalParseError::Blank)?;
    if b.iter().all(|&x| x == 0) {
        return Err(JournalParseError::Blank);
    }
    if b[0..8] != magic[..] {
        return Err(JournalParseError::BadMagic);
    }
    let stored = le32(b, HEADER_CRC_AT);
    let computed = crc32c::crc32c(&b[..HEADER_CRC_AT]);
    if stored != computed {
        return Err(JournalParseError::BadChecksum { stored, computed });
    }
    Ok(b)
}

/// Checks a whole segment's payload against its header and returns its entries, each data
/// entry with the byte offset of its block inside `seg`.
pub fn parse_entries(
    h: &SegmentHeader,
    seg: &[u8],
    tag_size: usize,
    block_size: u32,
) -> Result<Vec<(Entry, Option<usize>)>, JournalParseError> {
    if seg.len() as u64 != h.len {
        return Err(JournalParseError::Field(format!(
            "segment of {} bytes, header says {}",
            seg.len(),
            h.len
        )));
    }
    let computed = xxh3_64(&seg[SECTOR_SIZE..]);
    if computed != h.payload_hash {
        return Err(JournalParseError::BadPayload {
            stored: h.payload_hash,
            computed,
        });
    }
    let es = entry_size(tag_size);
    let n = usize_of(u64::from(h.entries));
    let mut data_at = usize_of(descriptor_len(n, tag_size, block_size));
    let mut out = Vec::with_capacity(n);
    for i in 0..n {
        let at = SECTOR_SIZE + i * es;
        let e = &seg[at..at + es];
        let block = le64(e, 0);
        let (kind, place) = match e[8] {
            1 => {
                let p = data_at;
                data_at += block_size as usize;
                (EntryKind::Data, Some(p))
            }
            2 => (EntryKind::Zero, None),
            other => {
                return Err(JournalParseError::Field(format!(
                    "entry {i}: unknown kind {other}"
                )))
            }
        };
        out.push((
            Entry {
                block,
                kind,
                tag: e[16..16 + tag_size].to_vec(),
            },
            place,
        ));
    }
    if data_at != seg.len() {
        return Err(JournalParseError::Field(format!(
            "{} data entries for {} data blocks",
            out.iter().filter(|(e, _)| e.kind == EntryKind::Data).count(),
            h.data_blocks
        )));
    }
    Ok(out)
}

/// A checkpoint: where replay starts. Both copies are written with the same content; the one
/// with the higher `generation` wins when they differ.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Checkpoint {
    /// The session whose segments are live.
    pub session: u64,
    /// Sequence number of the first live segment.
    pub seq: u64,
    /// Log offset where that segment is, or where the log wrapped to 0 before it.
    pub tail: u64,
    /// Incremented at every checkpoint written.
    pub generation: u64,
}

impl Checkpoint {
    /// The 512-byte checkpoint sector of volume `uuid`.
    pub fn encode(&self, uuid: &[u8; 16]) -> [u8; SECTOR_SIZE] {
        let mut b = [0u8; SECTOR_SIZE];
        b[0..8].copy_from_slice(&CHECKPOINT_MAGIC);
        b[8..24].copy_from_slice(uuid);
        b[24..32].copy_from_slice(&self.session.to_le_bytes());
        b[32..40].copy_from_slice(&self.seq.to_le_bytes());
        b[40..48].copy_from_slice(&self.tail.to_le_bytes());
        b[48..56].copy_from_slice(&self.generation.to_le_bytes());
        let crc = crc32c::crc32c(&b[..HEADER_CRC_AT]);
        b[HEADER_CRC_AT..].copy_from_slice(&crc.to_le_bytes());
        b
    }

    /// Decodes a checkpoint sector of volume `uuid` whose log is `log_len` bytes.
    pub fn decode(b: &[u8], uuid: &[u8; 16], log_len: u64) -> Result<Checkpoint, JournalParseError> {
        let b = sealed_sector(b, CHECKPOINT_MAGIC)?;
        if b[8..24] != uuid[..] {
            return Err(JournalParseError::ForeignVolume);
        }
        let c = Checkpoint {
            session: le64(b, 24),
            seq: le64(b, 32),
            tail: le64(b, 40),
            generation: le64(b, 48),
        };
        if c.tail >= log_len {
            return Err(JournalParseError::Field(format!(
                "tail {} past the {log_len}-byte log",
                c.tail
            )));
        }
        if b[56..HEADER_CRC_AT].iter().any(|&x| x != 0) {
            return Err(JournalParseError::Field(
                "reserved checkpoint bytes not zero".into(),
            ));
        }
        Ok(c)
    }
}

/// Of two decoded checkpoint copies, the one replay uses: the valid one with the higher
/// generation; `Ok(None)` when both are blank (a journal never used); an error when neither
/// is valid and not both blank.
pub fn choose_checkpoint(
    copies: [Result<Checkpoint, JournalParseError>; 2],
) -> Result<Option<Checkpoint>, [JournalParseError; 2]> {
    match copies {
        [Ok(a), Ok(b)] => Ok(Some(if b.generation > a.generation { b } else { a })),
        [Ok(a), Err(_)] | [Err(_), Ok(a)] => Ok(Some(a)),
        [Err(JournalParseError::Blank), Err(JournalParseError::Blank)] => Ok(None),
        [Err(a), Err(b)] => Err([a, b]),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const UUID: [u8; 16] = [7; 16];

    fn id(session: u64, seq: u64) -> SegmentIdentity<'static> {
        SegmentIdentity {
            uuid: &UUID,
            session,
            seq,
        }
    }

    fn sample() -> (Vec<Entry>, Vec<u8>) {
        let entries = vec![
            Entry {
                block: 5,
                kind: EntryKind::Data,
                tag: vec![1; 8],
            },
            Entry {
                block: 9,
                kind: EntryKind::Zero,
                tag: vec![0; 8],
            },
            Entry {
                block: 6,
                kind: EntryKind::Data,
                tag: vec![2; 8],
            },
        ];
        let mut data = vec![0xAA; 4096];
        data.extend(vec![0xBB; 4096]);
        (entries, data)
    }

    #[test]
    fn segment_round_trips_and_lays_out_as_documented() {
        let (entries, data) = sample();
        let seg = encode_segment(&id(42, 3), &entries, &data, 8, 4096);
        assert_eq!(seg.len(), 3 * 4096, "one descriptor block, two data blocks");
        assert_eq!(&seg[0..8], b"BGJSEG01");
        assert_eq!(le64(&seg, 24), 42);
        assert_eq!(le64(&seg, 32), 3);
        assert_eq!(le64(&seg, 40), 3 * 4096);
        assert_eq!(le64(&seg, 512), 5, "first entry right after the header sector");
        assert_eq!(seg[512 + 8], 1);
        assert_eq!(le64(&seg, 512 + 24), 9, "24-byte entries for 8-byte tags");
        let h = SegmentHeader::decode(&seg, &UUID, 8, 4096, 1 << 20).unwrap();
        assert_eq!((h.session, h.seq, h.entries, h.data_blocks), (42, 3, 3, 2));
        let parsed = parse_entries(&h, &seg, 8, 4096).unwrap();
        assert_eq!(parsed.len(), 3);
        assert_eq!(parsed[0].1, Some(4096));
        assert_eq!(parsed[1].1, None);
        assert_eq!(parsed[2].1, Some(8192));
        assert_eq!(parsed[2].0, entries[2]);
    }

    #[test]
    fn a_torn_or_foreign_segment_is_rejected() {
        let (entries, data) = sample();
        let seg = encode_segment(&id(42, 3), &entries, &data, 8, 4096);
        let h = SegmentHeader::decode(&seg, &UUID, 8, 4096, 1 << 20).unwrap();
        // Any 512-byte sector of the payload left old: the payload hash catches it.
        for sector in 1..seg.len() / 512 {
            let mut torn = seg.clone();
            torn[sector * 512..(sector + 1) * 512].fill(0xEE);
            assert!(
                matches!(
                    parse_entries(&h, &torn, 8, 4096),
                    Err(JournalParseError::BadPayload { .. })
                ),
                "sector {sector}"
            );
        }
        assert_eq!(
            SegmentHeader::decode(&seg, &[8; 16], 8, 4096, 1 << 20),
            Err(JournalParseError::ForeignVolume)
        );
        assert!(
            SegmentHeader::decode(&seg, &UUID, 8, 4096, 8192).is_err(),
            "longer than the room"
        );
        let mut flipped = seg.clone();
        flipped[30] ^= 1;
        assert!(matches!(
            SegmentHeader::decode(&flipped, &UUID, 8, 4096, 1 << 20),
            Err(JournalParseError::BadChecksum { .. })
        ));
        assert_eq!(
            SegmentHeader::decode(&[0u8; 512], &UUID, 8, 4096, 1 << 20),
            Err(JournalParseError::Blank)
        );
    }

    #[test]
    fn checkpoints_choose_the_newest_valid_copy() {
        let a = Checkpoint {
            session: 1,
            seq: 4,
            tail: 8192,
            generation: 10,
        };
        let b = Checkpoint { generation: 11, ..a };
        let ea = a.encode(&UUID);
        assert_eq!(Checkpoint::decode(&ea, &UUID, 1 << 20), Ok(a));
        assert!(Checkpoint::decode(&ea, &UUID, 8192).is_err(), "tail past the log");
        assert_eq!(choose_checkpoint([Ok(a), Ok(b)]), Ok(Some(b)));
        assert_eq!(
            choose_checkpoint([Ok(a), Err(JournalParseError::BadMagic)]),
            Ok(Some(a))
        );
        assert_eq!(
            choose_checkpoint([Err(JournalParseError::Blank), Err(JournalParseError::Blank)]),
            Ok(None)
        );
        assert!(
            choose_checkpoint([Err(JournalParseError::Blank), Err(JournalParseError::BadMagic)]).is_err()
        );
    }
}
