//! Golden volume images, committed under `tests/golden/`: every build must open, verify and
//! read each format version it supports byte for byte, and refuse each it does not with a
//! message that says what to do — so the format can never drift unnoticed.
//!
//! The images were made with the `blockguard` command line of their version: `format` (the
//! label below), then `import` of the deterministic pattern `pattern` generates (40 blocks of
//! 512 bytes, or 20 blocks of 4096). Byte-identical copies are read through the library, so
//! nothing here writes to the committed files.

use blockguard::blockguard_backend::MemoryBackend;
use blockguard::format::VolumeState;
use blockguard::{Error, Mode, OpenOptions, Profile, Volume};
use std::sync::Arc;

/// The bytes `import` put at the start of a golden volume (an LCG, high byte of each step).
fn pattern(len: usize, seed: u64) -> Vec<u8> {
    let mut x = seed;
    (0..len)
        .map(|_| {
            x = x
                .wrapping_mul(6_364_136_223_846_793_005)
                .wrapping_add(1_442_695_040_888_963_407);
            (x >> 56) as u8
        })
        .collect()
}

fn image(name: &str) -> Vec<u8> {
    let path = format!("{}/tests/golden/{name}", env!("CARGO_MANIFEST_DIR"));
    std::fs::read(&path).unwrap_or_else(|e| panic!("{path}: {e}"))
}

fn read_only() -> OpenOptions {
    OpenOptions {
        read_only: true,
        ..OpenOptions::default()
    }
}

fn uuid(s: &str) -> [u8; 16] {
    let hex: String = s.chars().filter(|&c| c != '-').collect();
    std::array::from_fn(|i| u8::from_str_radix(&hex[2 * i..2 * i + 2], 16).unwrap())
}

struct Golden {
    file: &'static str,
    label: &'static str,
    uuid: &'static str,
    block_size: u32,
    size: u64,
    written: usize,
}

const V4: [Golden; 2] = [
    Golden {
        file: "v4-512.bgv",
        label: "golden-v4-512",
        uuid: "520e61df-9506-adbe-eff2-7dbf0c029e09",
        block_size: 512,
        size: 64 << 10,
        written: 40 * 512,
    },
    Golden {
        file: "v4-4096.bgv",
        label: "golden-v4-4096",
        uuid: "70eae16c-5051-7f7a-92c3-acc95bf9d0f6",
        block_size: 4096,
        size: 256 << 10,
        written: 20 * 4096,
    },
];

#[test]
fn version_4_images_open_verify_and_read_byte_for_byte() {
    for g in &V4 {
        let img = image(g.file);
        let vol = Volume::open(Arc::new(MemoryBackend::from_vec(img.clone())), &read_only())
            .unwrap_or_else(|e| panic!("{}: {e}", g.file));
        let sb = vol.superblock();
        assert_eq!(sb.version, 4, "{}", g.file);
        assert_eq!(sb.label, g.label);
        assert_eq!(sb.uuid, uuid(g.uuid));
        assert_eq!((sb.mode, sb.profile), (Mode::Dual, Profile::Crc32c));
        assert_eq!(sb.state, VolumeState::Clean);
        assert_eq!((vol.block_size(), vol.size()), (g.block_size, g.size));
        assert!(vol.warnings().is_empty(), "{}: {:?}", g.file, vol.warnings());
        let mut all = vec![0u8; g.size as usize];
        vol.read_at(&mut all, 0).unwrap();
        let mut want = pattern(g.written, g.block_size as u64);
        want.resize(g.size as usize, 0);
        assert!(all == want, "{}: contents differ", g.file);
        let geo = *vol.geometry();
        assert!(vol.check_blocks(0, geo.data_blocks).unwrap().is_empty());
        assert!(vol.check_metadata(0, geo.groups).unwrap().is_empty());
        assert!(vol.check_map().unwrap().is_empty());
        // Written blocks are allocated, the rest a hole (the memory backend proves zeros).
        let extents = vol.extents(0, g.size).unwrap();
        assert_eq!(extents[0].len, g.written as u64, "{}: {extents:?}", g.file);
        assert!(extents[0].allocated && !extents[1].allocated);
        // And a read-write session on a copy works: write, close, read back.
        let backend = Arc::new(MemoryBackend::from_vec(img));
        let rw = Volume::open(backend.clone(), &OpenOptions::default()).unwrap();
        rw.write_at(b"golden", g.size - 6).unwrap();
        rw.close().unwrap();
        let again = Volume::open(backend, &read_only()).unwrap();
        let mut tail = [0u8; 6];
        again.read_at(&mut tail, g.size - 6).unwrap();
        assert_eq!(&tail, b"golden");
    }
}

#[test]
fn version_1_2_and_3_images_are_refused_with_the_way_out() {
    for (file, version) in [
        ("v1-512.bgv", 1),
        ("v2-512.bgv", 2),
        ("v2-4096.bgv", 2),
        ("v3-512.bgv", 3),
        ("v3-4096.bgv", 3),
    ] {
        let img = image(file);
        let before = img.clone();
        let backend = Arc::new(MemoryBackend::from_vec(img));
        for opts in [read_only(), OpenOptions::default()] {
            match Volume::open(backend.clone(), &opts) {
                Err(Error::Unsupported { detail, .. }) => {
                    let says = format!("format version {version} is not supported");
                    assert!(detail.contains(&says), "{file}: {detail}");
                    assert!(
                        detail.contains("export") && detail.contains("import"),
                        "{file}: {detail}"
                    );
                }
                Err(e) => panic!("{file}: {e}"),
                Ok(_) => panic!("{file} opened"),
            }
        }
        assert!(backend.snapshot() == before, "refusing {file} changed it");
    }
}

/// Golden images of non-default tag profiles, made like the others (`format --profile`,
/// `import` of `pattern`) by the first build of format v4: `nvme-pi64` (16-byte tags, 31
/// blocks per group) and the keyed `hmac-sha256` (32-byte tags, key bytes 00..1f, given as
/// 64 hex digits). Both carry the `TAG_PROFILE` incompat bit.
#[test]
fn tag_profile_images_open_verify_and_keep_their_tuples() {
    let key = blockguard::tag::TagKey::from_bytes(&std::array::from_fn::<u8, 32, _>(|i| i as u8)).unwrap();
    let cases = [
        (
            "v4-512-nvme-pi64.bgv",
            Profile::NvmePi64,
            "51eacad2-1fce-59c9-68a9-9b3ea494370f",
            None,
        ),
        (
            "v4-512-hmac-sha256.bgv",
            Profile::HmacSha256,
            "67c1673e-6d29-6d4d-a6b4-daa18c444c2d",
            Some(key),
        ),
    ];
    for (file, profile, id, key) in cases {
        let img = image(file);
        let opts = OpenOptions {
            key: key.clone(),
            ..read_only()
        };
        let vol = Volume::open(Arc::new(MemoryBackend::from_vec(img.clone())), &opts)
            .unwrap_or_else(|e| panic!("{file}: {e}"));
        let sb = vol.superblock();
        assert_eq!((sb.profile, sb.uuid), (profile, uuid(id)), "{file}");
        assert_eq!(sb.label, format!("golden-{}", file.trim_end_matches(".bgv")));
        assert_eq!(sb.incompat, blockguard::format::INCOMPAT_TAG_PROFILE, "{file}");
        assert_eq!(vol.geometry().tag_size as usize, profile.tag_size());
        let mut all = vec![0u8; 64 << 10];
        vol.read_at(&mut all, 0).unwrap();
        let mut want = pattern(40 * 512, 512);
        want.resize(64 << 10, 0);
        assert!(all == want, "{file}: contents differ");
        let geo = *vol.geometry();
        assert!(vol.check_blocks(0, geo.data_blocks).unwrap().is_empty(), "{file}");
        assert!(vol.check_metadata(0, geo.groups).unwrap().is_empty(), "{file}");
        // The stored tag of block 5 is what the profile computes, byte for byte; for the NVMe
        // tuple: CRC-64/NVME guard, application tag and 48-bit reference tag 5, big-endian.
        let tagger = profile.tagger(&sb.uuid, key.as_ref()).unwrap();
        let block5 = &want[5 * 512..6 * 512];
        let report = vol.inspect_block(5).unwrap();
        let stored: Vec<&str> = report.slots.iter().filter_map(|s| s.tag.as_deref()).collect();
        assert!(
            stored.contains(&tagger.generate(5, block5).to_string().as_str()),
            "{file}: {stored:?}"
        );
        if profile == Profile::NvmePi64 {
            let app = blockguard::tag::pi_app_tag(&sb.uuid);
            let tuple = format!(
                "{:016x}{app:04x}000000000005",
                blockguard::tag::crc64_nvme(block5)
            );
            assert!(
                stored.contains(&tuple.as_str()),
                "{file}: {stored:?} lacks {tuple}"
            );
        }
        // The keyed image refuses to open without its key, or with another, unchanged.
        if key.is_some() {
            let backend = Arc::new(MemoryBackend::from_vec(img.clone()));
            for k in [None, Some(blockguard::tag::TagKey::from_bytes(&[1; 32]).unwrap())] {
                let o = OpenOptions {
                    key: k,
                    ..OpenOptions::default()
                };
                assert!(
                    matches!(Volume::open(backend.clone(), &o), Err(Error::Key { .. })),
                    "{file}"
                );
            }
            assert!(backend.snapshot() == img, "{file}: a refused open wrote");
        }
    }
}

/// A golden image with room in its tag slots (`format --block-size 512 --size 64K --tag-room
/// 32`, then `import` of `pattern`): `crc32c` tags stored in 32-byte slots, 15 blocks per
/// group, the `TAG_ROOM` incompat bit (and no `TAG_PROFILE`). The slot of block 5 holds its
/// crc32c tag followed by 24 zeros, at the offset FORMAT.md gives.
#[test]
fn a_tag_room_image_opens_verifies_and_keeps_its_padded_tags() {
    let file = "v4-512-crc32c-room32.bgv";
    let img = image(file);
    let vol = Volume::open(Arc::new(MemoryBackend::from_vec(img.clone())), &read_only())
        .unwrap_or_else(|e| panic!("{file}: {e}"));
    let sb = vol.superblock();
    assert_eq!(sb.uuid, uuid("2c7c105b-1401-2310-7ebc-8aef83eb7aba"));
    assert_eq!(sb.label, "golden-v4-512-crc32c-room32");
    assert_eq!(
        (sb.profile, sb.incompat),
        (Profile::Crc32c, blockguard::format::INCOMPAT_TAG_ROOM)
    );
    let geo = *vol.geometry();
    assert_eq!((geo.tag_size, geo.group_blocks, geo.groups), (32, 15, 9));
    let mut all = vec![0u8; 64 << 10];
    vol.read_at(&mut all, 0).unwrap();
    let mut want = pattern(40 * 512, 512);
    want.resize(64 << 10, 0);
    assert!(all == want, "{file}: contents differ");
    assert!(vol.check_blocks(0, geo.data_blocks).unwrap().is_empty());
    assert!(vol.check_metadata(0, geo.groups).unwrap().is_empty());
    // Block 5: group 0, sector 0, tag bytes 16 + 5·32 .. + 32 of the newest metadata block.
    let tag = Profile::Crc32c
        .tagger(&sb.uuid, None)
        .unwrap()
        .generate(5, &want[5 * 512..6 * 512]);
    let mut slot = tag.as_bytes().to_vec();
    slot.resize(32, 0);
    let found = (0..2).any(|s| {
        let at = usize::try_from(geo.meta_offset(0, s)).unwrap() + 16 + 5 * 32;
        img[at..at + 32] == slot[..]
    });
    assert!(found, "{file}: no metadata block holds block 5's padded tag");
}
