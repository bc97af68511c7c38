//! `rebuild` mode beyond the crash simulator (`tests/crash.rs` checks G1 and G2 after every
//! crash): recovery at open recomputes the tags of exactly the groups written in the last
//! window and reads nothing else; a crashed volume refuses a read-only open with a clear error
//! instead of crying wolf; damage outside the crash window is still detected (G3, G4).

use blockguard::blockguard_backend::{Backend, FaultBackend, MemoryBackend};
use blockguard::{Error, FormatOptions, Mode, OpenOptions, Volume};
use std::sync::Arc;

const BS: u64 = 4096;
const BLOCKS: u64 = 4096;

fn opts() -> FormatOptions {
    let mut o = FormatOptions::with_size(BS * BLOCKS);
    o.mode = Mode::Rebuild;
    o
}

fn content(b: u64, round: u8) -> Vec<u8> {
    let mut v = vec![round; BS as usize];
    v[..8].copy_from_slice(&b.to_le_bytes());
    v
}

/// A rebuild volume written everywhere and closed, then a session that writes blocks of two
/// groups and crashes keeping every write (data and tags in whatever order they went).
fn crashed() -> (Vec<u8>, Vec<u64>) {
    let len = opts().backing_len().expect("geometry");
    let fb = Arc::new(FaultBackend::new(len).expect("memory"));
    let vol = Volume::format(fb.clone(), &opts()).expect("format");
    for b in (0..BLOCKS).step_by(3) {
        vol.write_at(&content(b, 1), b * BS).expect("write");
    }
    vol.close().expect("close");
    let vol = Volume::open(fb.clone(), &OpenOptions::default()).expect("open");
    let per = u64::from(vol.geometry().group_blocks);
    let touched = vec![5, 6, 2 * per + 1];
    for &b in &touched {
        vol.write_at(&content(b, 2), b * BS).expect("write");
    }
    vol.flush().expect("flush");
    // The crash: everything written so far reached the disk.
    let image = fb.live_image();
    std::mem::forget(vol);
    (image, touched)
}

#[test]
fn recovery_retags_only_the_groups_of_the_last_window() {
    let (image, _) = crashed();
    let mem = Arc::new(MemoryBackend::from_vec(image));
    let vol = Volume::open(mem.clone(), &OpenOptions::default()).expect("open recovers");
    let r = vol.recovery_at_open().expect("recovered at open").clone();
    let per = u64::from(vol.geometry().group_blocks);
    assert!(r.groups_dirty <= 2 && r.groups_dirty >= 1, "{r:?}");
    assert_eq!(r.blocks_retagged, r.groups_dirty * per, "{r:?}");
    assert!(r.damaged.is_empty(), "{r:?}");
    let mut buf = vec![0u8; BS as usize];
    for b in 0..BLOCKS {
        vol.read_at(&mut buf, b * BS)
            .unwrap_or_else(|e| panic!("block {b}: {e}"));
    }
    vol.read_at(&mut buf, 5 * BS).expect("read");
    assert!(buf == content(5, 2), "a flushed write reads back (G2)");
    vol.close().expect("close");
}

#[test]
fn a_crashed_rebuild_volume_refuses_a_read_only_open_until_rebuilt() {
    let (image, _) = crashed();
    let mem = Arc::new(MemoryBackend::from_vec(image));
    let ro = OpenOptions {
        read_only: true,
        ..OpenOptions::default()
    };
    let err = Volume::open(mem.clone(), &ro).expect_err("tags not rebuilt yet");
    assert!(matches!(err, Error::Unsupported { .. }), "{err}");
    assert!(err.to_string().contains("read-write once"), "{err}");
    Volume::open(mem.clone(), &OpenOptions::default())
        .expect("rebuilds")
        .close()
        .expect("close");
    Volume::open(mem, &ro).expect("now it opens read-only");
}

#[test]
fn damage_outside_the_crash_window_is_still_detected() {
    let len = opts().backing_len().expect("geometry");
    let mem = Arc::new(MemoryBackend::new(len).expect("memory"));
    let vol = Volume::format(mem.clone(), &opts()).expect("format");
    for b in 0..64 {
        vol.write_at(&content(b, 1), b * BS).expect("write");
    }
    vol.close().expect("close");
    let vol = Volume::open(mem.clone(), &OpenOptions::default()).expect("open");
    let data_at = vol.inspect_block(10).expect("inspect").location.data_offset;
    vol.close().expect("close");
    // A bit flip, and block 20's content misdirected onto block 11.
    let mut one = [0u8; 1];
    mem.read_at(&mut one, data_at + 100).expect("read");
    mem.write_at(&[one[0] ^ 4], data_at + 100).expect("write");
    let mut twenty = vec![0u8; BS as usize];
    mem.read_at(&mut twenty, data_at + 10 * BS).expect("read");
    mem.write_at(&twenty, data_at + BS).expect("write");
    let vol = Volume::open(mem, &OpenOptions::default()).expect("open");
    let mut buf = vec![0u8; BS as usize];
    for (b, what) in [(10, "bit flip"), (11, "misdirected")] {
        let err = vol.read_at(&mut buf, b * BS).expect_err(what);
        assert_eq!(err.corrupt_block(), Some(b), "{what}: {err}");
    }
    vol.read_at(&mut buf, 12 * BS).expect("an intact block");
}
