//! Every tag profile through the engine: a volume formatted with it is written, closed,
//! reopened and read back; one damaged block is caught and named; the geometry follows the
//! tag size. Keyed profiles: a missing, superfluous or wrong key is refused at open before
//! anything is written (the backend's bytes are compared).

use blockguard::blockguard_backend::MemoryBackend;
use blockguard::tag::{KeyError, TagKey};
use blockguard::{Error, FormatOptions, OpenOptions, Profile, Volume};
use std::sync::Arc;

const BLOCKS: u64 = 300;

fn key(b: u8) -> TagKey {
    TagKey::from_bytes(&[b; 32]).unwrap()
}

fn opts(profile: Profile, bs: u32) -> FormatOptions {
    FormatOptions {
        block_size: bs,
        profile,
        key: profile.is_keyed().then(|| key(0x33)),
        uuid: Some([0x42; 16]),
        ..FormatOptions::with_size(u64::from(bs) * BLOCKS)
    }
}

fn open_opts(profile: Profile) -> OpenOptions {
    OpenOptions {
        key: profile.is_keyed().then(|| key(0x33)),
        ..OpenOptions::default()
    }
}

fn content(block: u64, bs: u32) -> Vec<u8> {
    let seed = block.to_le_bytes()[0];
    (0..bs)
        .map(|i| seed.wrapping_mul(31).wrapping_add(i.to_le_bytes()[0]))
        .collect()
}

/// A closed volume of `profile` with every third block written (block 0 with zeros).
fn written(profile: Profile, bs: u32) -> Arc<MemoryBackend> {
    let o = opts(profile, bs);
    let backend = Arc::new(MemoryBackend::new(o.backing_len().unwrap()).unwrap());
    let vol = Volume::format(backend.clone(), &o).unwrap();
    assert_eq!(vol.superblock().profile, profile);
    assert_eq!(vol.geometry().tag_size as usize, profile.tag_size());
    vol.write_at(&vec![0; bs as usize], 0).unwrap();
    for b in (3..BLOCKS).step_by(3) {
        vol.write_at(&content(b, bs), b * u64::from(bs)).unwrap();
    }
    vol.close().unwrap();
    backend
}

fn expected(block: u64, bs: u32) -> Vec<u8> {
    if block > 0 && block.is_multiple_of(3) {
        content(block, bs)
    } else {
        vec![0; bs as usize]
    }
}

#[test]
fn every_profile_round_trips_and_catches_a_damaged_block() {
    for profile in Profile::ALL {
        for bs in [512u32, 4096] {
            let backend = written(profile, bs);
            let vol = Volume::open(backend.clone(), &open_opts(profile)).unwrap();
            assert_eq!(vol.superblock().profile, profile, "{profile}");
            let mut buf = vec![0u8; bs as usize];
            for b in 0..BLOCKS {
                vol.read_at(&mut buf, b * u64::from(bs)).unwrap();
                assert_eq!(buf, expected(b, bs), "{profile} {bs}: block {b}");
            }
            let damaged = 9u64;
            let at = vol.geometry().data_offset(damaged);
            vol.close().unwrap();
            let mut image = backend.snapshot();
            image[usize::try_from(at).unwrap() + 17] ^= 0x04;
            let vol = Volume::open(Arc::new(MemoryBackend::from_vec(image)), &open_opts(profile)).unwrap();
            let err = vol.read_at(&mut buf, damaged * u64::from(bs)).unwrap_err();
            assert!(err.is_corruption(), "{profile} {bs}: {err}");
            assert_eq!(err.corrupt_block(), Some(damaged), "{profile}");
            vol.read_at(&mut buf, (damaged + 3) * u64::from(bs)).unwrap();
            assert_eq!(
                buf,
                expected(damaged + 3, bs),
                "{profile}: its neighbour still reads"
            );
        }
    }
}

#[test]
fn metadata_geometry_follows_the_tag_size() {
    // Tags per 512-byte metadata sector: (512 - 16) / T.
    for (t, per_sector) in [(8usize, 62u32), (16, 31), (32, 15)] {
        assert_eq!(blockguard::Geometry::tags_per_meta(512, t).unwrap(), per_sector);
        assert_eq!(
            blockguard::Geometry::tags_per_meta(4096, t).unwrap(),
            8 * per_sector
        );
        assert_eq!(
            blockguard::Geometry::tags_per_meta(65536, t).unwrap(),
            128 * per_sector
        );
        let g = blockguard::Geometry::for_size(1 << 30, 4096, t).unwrap();
        assert_eq!(g.group_blocks, 8 * per_sector);
        assert_eq!(g.groups, (1u64 << 18).div_ceil(u64::from(8 * per_sector)));
    }
    // A tag that does not fit a metadata sector is refused, naming the sizes.
    let err = blockguard::Geometry::tags_per_meta(512, 600).unwrap_err();
    assert!(err.to_string().contains("tag size 600"), "{err}");
    assert!(blockguard::Geometry::tags_per_meta(512, 0).is_err());
}

/// Opens `image` with `key` and expects the key error `want`, and the image untouched.
fn refused(profile: Profile, image: &[u8], key: Option<TagKey>, want: &KeyError) {
    let backend = Arc::new(MemoryBackend::from_vec(image.to_vec()));
    let o = OpenOptions {
        key,
        ..OpenOptions::default()
    };
    match Volume::open(backend.clone(), &o) {
        Err(Error::Key { problem, volume }) => {
            assert_eq!(&problem, want, "{profile}");
            assert!(!volume.is_empty());
        }
        other => panic!("{profile}: expected {want}, got {other:?}"),
    }
    assert!(
        backend.snapshot() == image,
        "{profile}: a refused open wrote to the volume"
    );
}

#[test]
fn keys_are_checked_at_open_before_anything_is_written() {
    for profile in Profile::ALL {
        let o = opts(profile, 512);
        let backend = Arc::new(MemoryBackend::new(o.backing_len().unwrap()).unwrap());
        let vol = Volume::format(backend.clone(), &o).unwrap();
        vol.write_at(&[7; 512], 512).unwrap();
        vol.flush().unwrap();
        // Left in use (not closed): an accepted read-write open would recover, and write.
        let image = backend.snapshot();
        drop(vol);
        let name = profile.name();
        if profile.is_keyed() {
            assert_ne!(&image[296..328], &[0u8; 32], "{profile}: key check stored");
            assert!(
                !image.windows(32).any(|w| w == [0x33; 32]),
                "{profile}: the key itself is nowhere on the volume"
            );
            refused(profile, &image, None, &KeyError::Missing { profile: name });
            refused(
                profile,
                &image,
                Some(key(0x34)),
                &KeyError::Wrong { profile: name },
            );
            // The right key opens it, and the data verifies.
            let vol = Volume::open(Arc::new(MemoryBackend::from_vec(image)), &open_opts(profile)).unwrap();
            let mut buf = [0u8; 512];
            vol.read_at(&mut buf, 512).unwrap();
            assert_eq!(buf, [7; 512]);
        } else {
            assert_eq!(&image[296..328], &[0u8; 32], "{profile}");
            refused(
                profile,
                &image,
                Some(key(0x33)),
                &KeyError::NotKeyed { profile: name },
            );
        }
    }
}

#[test]
fn format_refuses_a_missing_or_superfluous_key_and_writes_nothing() {
    for (profile, key) in [(Profile::HmacSha256, None), (Profile::Xxh3, Some(key(1)))] {
        let o = FormatOptions {
            key,
            ..opts(profile, 4096)
        };
        let backend = Arc::new(MemoryBackend::new(o.backing_len().unwrap()).unwrap());
        let err = Volume::format(backend.clone(), &o).unwrap_err();
        assert!(matches!(err, Error::Key { .. }), "{profile}: {err}");
        assert!(
            backend.snapshot().iter().all(|&b| b == 0),
            "{profile}: format wrote"
        );
    }
}

/// A block written with one key does not verify under another: with the key-check value
/// forged to match (an attacker with raw disk access), reads still fail.
#[test]
fn a_forged_key_check_does_not_make_blocks_verify() {
    let profile = Profile::Blake3Keyed;
    let backend = written(profile, 4096);
    let mut image = backend.snapshot();
    let other = profile.tagger(&[0x42; 16], Some(&key(0x99))).unwrap().key_check();
    image[296..328].copy_from_slice(&other);
    let crc = crc32c::crc32c(&image[..508]);
    image[508..512].copy_from_slice(&crc.to_le_bytes());
    let o = OpenOptions {
        key: Some(key(0x99)),
        read_only: true,
        ..OpenOptions::default()
    };
    let vol = Volume::open(Arc::new(MemoryBackend::from_vec(image)), &o).unwrap();
    let mut buf = [0u8; 4096];
    assert!(vol.read_at(&mut buf, 3 * 4096).unwrap_err().is_corruption());
}
