//! Fuzzes `Superblock::decode` (format v1, see `docs/FORMAT.md`).
//!
//! Properties: decoding arbitrary bytes never panics; whatever decodes re-encodes to a region
//! that decodes to the same superblock and copy index, and that re-encoding is canonical
//! (encoding it again gives the same bytes); an accepted geometry never overlaps the
//! superblock regions.
//!
//! Input layout: byte 0 selects how the rest is used.
//! - bit 1 clear: the rest is the superblock region, used as is;
//! - bit 1 set: a valid superblock is built from the next bytes (block size, block count,
//!   mode, copy) and the remaining bytes are applied as `(offset, value)` edits;
//! - bit 0 set: magic and crc32c are fixed up before decoding, so the fuzzer gets past the
//!   checksum and reaches the field checks.
#![no_main]

use blockguard::format::{
    Geometry, Mode, Superblock, VolumeState, FORMAT_VERSION, SB_MAGIC, SB_REGION, SB_STRUCT_SIZE,
};
use blockguard::Profile;
use crc32c::crc32c_append;
use libfuzzer_sys::fuzz_target;

fn template(p: &[u8]) -> Option<Vec<u8>> {
    let get = |i: usize| p.get(i).copied().unwrap_or(0);
    let block_size = 512u32 << (get(0) % 8);
    let blocks = u32::from_le_bytes([get(1), get(2), get(3), 0]) as u64 + 1;
    let geometry = if get(4) & 1 == 0 {
        Geometry::for_size(blocks * block_size as u64, block_size, 8).ok()?
    } else {
        Geometry::for_backing_len(
            blocks * block_size as u64 + 3 * SB_REGION + get(5) as u64,
            block_size,
            8,
        )
        .ok()?
    };
    let sb = Superblock {
        version: FORMAT_VERSION,
        compat: 0,
        ro_compat: 0,
        incompat: 0,
        uuid: [get(6); 16],
        profile: Profile::Crc32c,
        mode: if get(4) & 2 == 0 { Mode::Dual } else { Mode::None },
        geometry,
        created: get(7) as u64,
        mirror_set: [0; 16],
        mirror_role: 0,
        meta_device: [0; 16],
        label: "fuzz".into(),
        state: if get(4) & 4 == 0 {
            VolumeState::Clean
        } else {
            VolumeState::InUse
        },
    };
    Some(sb.encode(get(4) >> 7))
}

fuzz_target!(|data: &[u8]| {
    let Some((&how, rest)) = data.split_first() else {
        return;
    };
    let mut b = if how & 2 == 0 {
        rest.to_vec()
    } else {
        let (params, edits) = rest.split_at(rest.len().min(8));
        let Some(mut b) = template(params) else {
            return;
        };
        for e in edits.chunks_exact(3) {
            let at = u16::from_le_bytes([e[0], e[1]]) as usize % b.len();
            b[at] = e[2];
        }
        b
    };
    if how & 1 == 1 && b.len() >= SB_STRUCT_SIZE {
        b[..8].copy_from_slice(&SB_MAGIC);
        let crc = crc32c_append(0, &b[..SB_STRUCT_SIZE - 4]);
        b[SB_STRUCT_SIZE - 4..SB_STRUCT_SIZE].copy_from_slice(&crc.to_le_bytes());
    }
    let Ok((sb, copy)) = Superblock::decode(&b) else {
        return;
    };
    assert!(copy <= 1);
    // The layout an accepted superblock describes fits its backend and never overlaps the
    // superblock regions.
    let g = sb.geometry;
    let bs = g.block_size as u64;
    assert!(g.first_group_offset >= SB_REGION);
    assert_eq!(g.groups, g.data_blocks.div_ceil(g.group_blocks as u64));
    let last = g.data_offset(g.data_blocks - 1);
    assert!(last + bs <= g.backup_sb_offset);
    assert!(g.meta_offset(g.groups - 1, 1) + bs <= g.backup_sb_offset);
    assert_eq!(g.backup_sb_offset % SB_REGION, 0);
    assert!(g.backup_sb_offset + SB_REGION <= g.backing_len);
    // Round trip.
    let enc = sb.encode(copy);
    assert_eq!(enc.len(), SB_REGION as usize);
    let again = Superblock::decode(&enc).expect("a re-encoded superblock must decode");
    assert_eq!(again, (sb, copy), "decode(encode(sb)) != sb");
    assert_eq!(again.0.encode(copy), enc, "encoding is not canonical");
});
