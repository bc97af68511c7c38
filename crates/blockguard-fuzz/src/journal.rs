//! Target `format_journal`: the parsers of the journal area and of a split volume's data
//! device (`docs/FORMAT.md`, "Journal" and "Metadata device"): `SegmentHeader::decode`,
//! `parse_entries`, `Checkpoint::decode` and `DataTrailer::decode`.
//!
//! Properties: arbitrary bytes never make them panic; a header that decodes describes a
//! segment that fits the room it was given and whose entries, when the payload checks, name
//! data blocks inside the segment; what decodes re-encodes to bytes that decode the same.
//!
//! Input layout: byte 0 selects the tag size (8, 16 or 32 bytes) and, bit 2, whether the
//! segment's checksums are fixed up (so the fuzzer reaches the field and entry checks);
//! byte 1 the block size (512 << (b % 4)); the rest is a segment (also tried as a checkpoint
//! and as a trailer).

use blockguard::format::journal::{
    encode_segment, parse_entries, Checkpoint, Entry, EntryKind, SegmentHeader, SegmentIdentity,
};
use blockguard::split::DataTrailer;

/// A segment of a few 4 KiB blocks is enough to reach every check.
pub const MAX_LEN: usize = 2 + 6 * 4096;

const UUID: [u8; 16] = [0x42; 16];

/// Overwrites the header's payload hash and crc so that they match the bytes.
fn fix_up(seg: &mut [u8]) {
    if seg.len() < 512 {
        return;
    }
    let hash = xxhash_rust::xxh3::xxh3_64(&seg[512..]);
    seg[0..8].copy_from_slice(b"BGJSEG01");
    seg[8..24].copy_from_slice(&UUID);
    let len = seg.len() as u64;
    seg[40..48].copy_from_slice(&len.to_le_bytes());
    seg[56..64].copy_from_slice(&hash.to_le_bytes());
    let crc = crc32c::crc32c(&seg[..508]);
    seg[508..512].copy_from_slice(&crc.to_le_bytes());
}

/// The target; see the module documentation.
///
/// # Panics
///
/// When a property is violated.
pub fn run(data: &[u8]) -> &'static str {
    let [sel, bsel, rest @ ..] = data else {
        return "short";
    };
    let tag_size = [8usize, 16, 32, 8][usize::from(sel & 3)];
    let block_size = 512u32 << (bsel % 4);
    let mut seg = rest.to_vec();
    if sel & 4 != 0 {
        fix_up(&mut seg);
    }
    if let Ok(c) = Checkpoint::decode(&seg, &UUID, 1 << 20) {
        assert_eq!(Checkpoint::decode(&c.encode(&UUID), &UUID, 1 << 20), Ok(c));
    }
    if let Ok(t) = DataTrailer::decode(&seg) {
        assert_eq!(DataTrailer::decode(&t.encode()), Ok(t));
    }
    let room = seg.len() as u64;
    let Ok(h) = SegmentHeader::decode(&seg, &UUID, tag_size, block_size, room) else {
        return "header refused";
    };
    assert!(h.len <= room && h.data_blocks <= h.entries);
    let Ok(entries) = parse_entries(
        &h,
        &seg[..usize::try_from(h.len).unwrap_or(usize::MAX)],
        tag_size,
        block_size,
    ) else {
        return "payload refused";
    };
    let bs = block_size as usize;
    let mut blocks: Vec<&[u8]> = Vec::new();
    let mut plain: Vec<Entry> = Vec::new();
    for (e, at) in &entries {
        match (e.kind, at) {
            (EntryKind::Data, Some(at)) => {
                assert!(
                    at + bs <= seg.len(),
                    "a data entry's block lies inside the segment"
                );
                blocks.push(&seg[*at..at + bs]);
            }
            (EntryKind::Zero, None) => {}
            other => panic!("entry kind and data disagree: {other:?}"),
        }
        plain.push(e.clone());
    }
    let id = SegmentIdentity {
        uuid: &UUID,
        session: h.session,
        seq: h.seq,
    };
    let again = encode_segment(&id, &plain, &blocks.concat(), tag_size, block_size);
    let h2 = SegmentHeader::decode(&again, &UUID, tag_size, block_size, again.len() as u64)
        .expect("a re-encoded segment decodes");
    let back = parse_entries(&h2, &again, tag_size, block_size).expect("a re-encoded segment parses");
    assert_eq!(back.len(), entries.len());
    "segment parsed"
}

/// Seeds (named `gen-*`, as the corpus expects of generated files): valid segments of every
/// tag size and several block sizes and shapes, each also with one byte damaged in its header,
/// entries and data; a checkpoint and a trailer.
#[must_use]
pub fn seeds() -> Vec<(String, Vec<u8>)> {
    let mut out = Vec::new();
    for (k, ts) in [8usize, 16, 32].into_iter().enumerate() {
        for (bsel, bs) in [(0u8, 512usize), (3, 4096)] {
            for shape in 0..2u64 {
                let entries: Vec<Entry> = (0..2 + shape * 3)
                    .map(|i| Entry {
                        block: 3 + i * 5,
                        kind: if i % 3 == 1 {
                            EntryKind::Zero
                        } else {
                            EntryKind::Data
                        },
                        tag: if i % 3 == 1 {
                            vec![0; ts]
                        } else {
                            vec![0xA5 ^ u8::try_from(i).unwrap_or(0); ts]
                        },
                    })
                    .collect();
                let data_blocks = entries.iter().filter(|e| e.kind == EntryKind::Data).count();
                let id = SegmentIdentity {
                    uuid: &UUID,
                    session: 7 + shape,
                    seq: shape,
                };
                let bsize = u32::try_from(bs).unwrap_or(4096);
                let seg = encode_segment(&id, &entries, &vec![0x5A; data_blocks * bs], ts, bsize);
                let mut input = vec![u8::try_from(k).unwrap_or(0), bsel];
                input.extend(&seg);
                out.push((format!("gen-segment-tag{ts}-bs{bs}-{shape}"), input.clone()));
                // The same with a byte damaged in the entries (checksums fixed up: reaches
                // the entry checks) and in the data (not fixed up: the payload hash).
                let mut damaged = input.clone();
                damaged[2 + 512 + 8] = 7;
                damaged[0] |= 4;
                out.push((format!("gen-segment-tag{ts}-bs{bs}-{shape}-bad-kind"), damaged));
                let mut torn = input;
                let last = torn.len() - 1;
                torn[last] ^= 0xFF;
                out.push((format!("gen-segment-tag{ts}-bs{bs}-{shape}-torn"), torn));
            }
        }
    }
    let ck = Checkpoint {
        session: 7,
        seq: 1,
        tail: 4096,
        generation: 3,
    };
    let mut input = vec![0u8, 3];
    input.extend(ck.encode(&UUID));
    out.push(("gen-checkpoint".into(), input));
    let t = DataTrailer {
        uuid: UUID,
        pair: [9; 16],
        size: 1 << 20,
        meta_hint: "/meta".into(),
    };
    let mut input = vec![0u8, 0];
    input.extend(t.encode());
    out.push(("gen-trailer".into(), input));
    out
}
