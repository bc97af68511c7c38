//! Fuzzes `decode_sector` (format v2 metadata sectors, see `docs/FORMAT.md`) with arbitrary
//! bytes and arbitrary parameters (volume UUID, group, sector index, slot, expected tag count
//! and tag size).
//!
//! Properties: decoding never panics; an all-zero sector is `Empty`; a `Valid` sector's
//! generation parity matches the slot, generation 0 holds no tag, and re-encoding its tags
//! gives back exactly its bytes (the format is canonical).
//!
//! Input layout: `how` (1 byte), uuid (16), group (8), index (4), slot (1), count (2),
//! tag size (1), then the sector itself.
//! - `how` bit 1: write the magic first;
//! - `how` bit 0: then recompute the sector's checksum (seeded with
//!   uuid ‖ group ‖ index ‖ slot, the checksum field counted as zero), so the fuzzer reaches
//!   the checks behind it.
#![no_main]

use blockguard::format::{decode_sector, encode_sector, sector_tag, SectorId, SectorParse, SECTOR_MAGIC, SECTOR_SIZE};
use crc32c::crc32c_append;
use libfuzzer_sys::fuzz_target;

/// The sector checksum as `docs/FORMAT.md` specifies it.
fn checksum(s: &[u8], uuid: &[u8; 16], id: SectorId) -> u32 {
    let mut c = crc32c_append(0, uuid);
    c = crc32c_append(c, &id.group.to_le_bytes());
    c = crc32c_append(c, &id.index.to_le_bytes());
    c = crc32c_append(c, &[id.slot]);
    c = crc32c_append(c, &s[..4]);
    c = crc32c_append(c, &[0; 4]);
    crc32c_append(c, &s[8..])
}

const PARAMS: usize = 1 + 16 + 8 + 4 + 1 + 2 + 1;

fuzz_target!(|data: &[u8]| {
    if data.len() < PARAMS {
        return;
    }
    let (p, sector) = data.split_at(PARAMS);
    let how = p[0];
    let uuid: [u8; 16] = p[1..17].try_into().unwrap();
    let id = SectorId {
        group: u64::from_le_bytes(p[17..25].try_into().unwrap()),
        index: u32::from_le_bytes(p[25..29].try_into().unwrap()),
        slot: p[29],
    };
    let count = u16::from_le_bytes([p[30], p[31]]) as usize;
    let tag_size = p[32] as usize;
    let mut s = sector.to_vec();
    if how & 2 != 0 && s.len() >= 8 {
        s[..4].copy_from_slice(&SECTOR_MAGIC);
    }
    if how & 1 != 0 && s.len() == SECTOR_SIZE {
        let crc = checksum(&s, &uuid, id);
        s[4..8].copy_from_slice(&crc.to_le_bytes());
    }
    match decode_sector(&s, &uuid, id, count, tag_size) {
        SectorParse::Empty => assert!(s.len() == SECTOR_SIZE && s.iter().all(|&x| x == 0)),
        SectorParse::Invalid(why) => assert!(!why.to_string().is_empty()),
        SectorParse::Valid { generation } => {
            assert_eq!(s.len(), SECTOR_SIZE);
            assert_eq!((generation % 2 == 0) as u8, id.slot, "generation parity must pick the slot");
            assert!(16 + count * tag_size <= SECTOR_SIZE, "tags that do not fit were accepted");
            {
                let tags: Vec<u8> = (0..count).flat_map(|j| sector_tag(&s, j, tag_size).to_vec()).collect();
                assert!(generation != 0 || tags.iter().all(|&x| x == 0), "generation 0 holds a tag");
                let mut out = vec![0xA5; SECTOR_SIZE];
                encode_sector(&mut out, &uuid, id, generation, &tags);
                assert_eq!(out, s, "decode then encode is not the identity");
            }
        }
    }
});
