//! Fuzzes `MetaBlock::decode` (format v1, see `docs/FORMAT.md`) with arbitrary bytes and
//! arbitrary parameters (volume UUID, group, slot, expected tag count and tag size).
//!
//! Properties: decoding never panics; an all-zero block is `Empty`; a `Valid` block holds
//! exactly the expected number of tags, its generation's parity matches the slot, and it
//! re-encodes (into a block of the same length) to bytes that decode to the same block and
//! are canonical.
//!
//! Input layout: `how` (1 byte), uuid (16), group (8), slot (1), count (4), tag size (2),
//! then the metadata block itself.
//! - `how` bit 1: write magic, group, uuid, count and tag size into the header first;
//! - `how` bit 0: then recompute the block's checksum (seeded with uuid ‖ group ‖ slot, the
//!   checksum field counted as zero), so the fuzzer reaches the checks behind it.
#![no_main]

use blockguard::format::{MetaBlock, MetaParse, META_HEADER_SIZE, META_MAGIC};
use crc32c::crc32c_append;
use libfuzzer_sys::fuzz_target;

/// The metadata block checksum as `docs/FORMAT.md` specifies it.
fn checksum(b: &[u8], uuid: &[u8; 16], group: u64, slot: u8) -> u32 {
    let mut c = crc32c_append(0, uuid);
    c = crc32c_append(c, &group.to_le_bytes());
    c = crc32c_append(c, &[slot]);
    c = crc32c_append(c, &b[..8]);
    c = crc32c_append(c, &[0; 4]);
    crc32c_append(c, &b[12..])
}

const PARAMS: usize = 1 + 16 + 8 + 1 + 4 + 2;

fuzz_target!(|data: &[u8]| {
    if data.len() < PARAMS {
        return;
    }
    let (p, block) = data.split_at(PARAMS);
    let how = p[0];
    let uuid: [u8; 16] = p[1..17].try_into().unwrap();
    let group = u64::from_le_bytes(p[17..25].try_into().unwrap());
    let slot = p[25] as usize;
    let count = u32::from_le_bytes(p[26..30].try_into().unwrap());
    let tag_size = u16::from_le_bytes([p[30], p[31]]) as usize;
    let mut b = block.to_vec();
    if how & 2 != 0 && b.len() >= META_HEADER_SIZE {
        b[0..8].copy_from_slice(&META_MAGIC);
        b[24..32].copy_from_slice(&group.to_le_bytes());
        b[32..48].copy_from_slice(&uuid);
        b[48..52].copy_from_slice(&count.to_le_bytes());
        b[52..54].copy_from_slice(&(tag_size as u16).to_le_bytes());
    }
    if how & 1 != 0 && b.len() >= META_HEADER_SIZE {
        let crc = checksum(&b, &uuid, group, slot as u8);
        b[8..12].copy_from_slice(&crc.to_le_bytes());
    }
    match MetaBlock::decode(&b, &uuid, group, slot, count, tag_size) {
        MetaParse::Empty => assert!(b.iter().all(|&x| x == 0), "non-zero block parsed as empty"),
        MetaParse::Invalid(why) => assert!(!why.is_empty()),
        MetaParse::Valid(m) => {
            assert!(b.iter().any(|&x| x != 0));
            assert!(m.generation >= 1);
            assert_eq!(
                (m.generation % 2 == 0) as usize,
                slot,
                "generation parity must pick the slot"
            );
            assert_eq!(m.len(), count as usize);
            for i in 0..m.len() {
                let t = m.tag(i);
                assert_eq!(
                    &b[META_HEADER_SIZE + i * tag_size..][..tag_size],
                    &t.to_bytes(tag_size)[..tag_size]
                );
            }
            let mut out = vec![0xA5; b.len()];
            m.encode(&mut out, &uuid, group, slot, tag_size);
            let again = MetaBlock::decode(&out, &uuid, group, slot, count, tag_size);
            assert_eq!(again, MetaParse::Valid(m.clone()), "decode(encode(m)) != m");
            let mut twice = vec![0x5A; b.len()];
            m.encode(&mut twice, &uuid, group, slot, tag_size);
            assert_eq!(out, twice, "encoding depends on the buffer's previous content");
        }
    }
});
