//! The group bitmaps under attack (second adversarial review of `dual` mode, format v2): a
//! damaged or wiped copy of the written, dirty-groups or first-write map must neither widen
//! the crash window, nor make a written group read as never written, nor stay invisible to
//! `check`. Every test here failed on format v2, where the dirty and first-write maps had one
//! copy each and the written map's second copy was never read while the first was valid.

use blockguard::blockguard_backend::{FaultBackend, MemoryBackend};
use blockguard::format::MapKind;
use blockguard::{Error, FormatOptions, Geometry, OpenOptions, RecoverOptions, Volume};
use std::sync::Arc;

const BS: u32 = 4096;

fn options() -> OpenOptions {
    OpenOptions {
        background_commit: false,
        cache_bytes: 1,
        stage_bytes: 1,
        dirty_clear_interval: std::time::Duration::ZERO,
        ..OpenOptions::default()
    }
}

fn read_only() -> OpenOptions {
    OpenOptions {
        read_only: true,
        ..options()
    }
}

fn fault_volume() -> (Arc<FaultBackend>, Geometry) {
    let mut f = FormatOptions::with_size(4 << 20);
    f.block_size = BS;
    f.uuid = Some([7; 16]);
    let backend = Arc::new(FaultBackend::new(f.backing_len().unwrap()).unwrap());
    let vol = Volume::format(backend.clone(), &f).unwrap();
    let geo = *vol.geometry();
    vol.close().unwrap();
    (backend, geo)
}

fn pattern(b: u64, version: u8) -> Vec<u8> {
    (0..BS as usize)
        .map(|i| (b as u8).wrapping_mul(31) ^ version.wrapping_mul(7) ^ (i / 64) as u8 | 1)
        .collect()
}

fn read(vol: &Volume, b: u64) -> Result<Vec<u8>, Error> {
    let mut buf = vec![0u8; BS as usize];
    vol.read_at(&mut buf, b * BS as u64).map(|()| buf)
}

fn open(img: Vec<u8>, opts: &OpenOptions) -> (Arc<MemoryBackend>, Volume) {
    let backend = Arc::new(MemoryBackend::from_vec(img));
    let vol = Volume::open(backend.clone(), opts).unwrap();
    (backend, vol)
}

fn zero(img: &mut [u8], lo: u64, hi: u64) {
    img[lo as usize..hi as usize].fill(0);
}

/// Asserts that block `b` never reads as anything but `want` or an error — read-only, after
/// the read-write open that recovers, and after a clean close and reopen.
fn never_wrong(img: Vec<u8>, b: u64, want: &[u8], what: &str) {
    let (_, vol) = open(img.clone(), &read_only());
    if let Ok(got) = read(&vol, b) {
        assert!(
            got == want,
            "{what}: read-only open returns wrong data for block {b}"
        );
    }
    let extents = vol.extents(b * BS as u64, BS as u64).unwrap();
    if read(&vol, b).is_err() {
        assert!(
            extents.iter().all(|e| e.allocated),
            "{what}: a damaged block is a hole: {extents:?}"
        );
    }
    drop(vol);
    let (backend, vol) = open(img, &options());
    if let Ok(got) = read(&vol, b) {
        assert!(got == want, "{what}: after recovery block {b} reads wrong data");
    }
    vol.close().unwrap();
    let (_, vol) = open(backend.snapshot(), &read_only());
    if let Ok(got) = read(&vol, b) {
        assert!(
            got == want,
            "{what}: after recovery and a clean close block {b} reads wrong data"
        );
    }
}

/// Groups 0 and 1 written long ago (their first writes settled and the maps cleared), then a
/// session keeps writing group 2 and the power fails: the volume is in use and the session
/// maps mark group 2 only.
fn in_use_image() -> (Vec<u8>, Geometry, Vec<u8>) {
    let (backend, geo) = fault_volume();
    let vol = Volume::open(backend.clone(), &options()).unwrap();
    let d0 = pattern(0, 1);
    vol.write_at(&d0, 0).unwrap();
    vol.write_at(&pattern(496, 1), 496 * BS as u64).unwrap();
    vol.flush().unwrap();
    vol.write_at(&pattern(992, 1), 992 * BS as u64).unwrap();
    vol.write_at(&pattern(992, 2), 992 * BS as u64).unwrap();
    vol.flush().unwrap();
    vol.write_at(&pattern(993, 2), 993 * BS as u64).unwrap();
    std::mem::forget(vol);
    (backend.durable_image(), geo, d0)
}

/// F1: a misdirected discard wipes the head copies of the dirty and first-write maps and all of
/// group 0, then the power fails. On v2 the wiped map sectors counted as "every group marked",
/// so group 0 passed for a first write cut short: zeros, and recovery "completed" it with
/// unwritten tags — permanent silent loss. The tail copies now say group 0 was settled.
#[test]
fn a_wiped_head_of_the_session_maps_and_group_0_is_reported_not_zeros() {
    let (mut img, geo, d0) = in_use_image();
    let end = geo.data_offset(geo.group_blocks as u64 - 1) + BS as u64;
    zero(&mut img, geo.map_offset(MapKind::Dirty, 0), end);
    let (_, vol) = open(img.clone(), &read_only());
    assert!(
        read(&vol, 0).is_err(),
        "group 0 was wiped: its block must fail, not read zeros"
    );
    drop(vol);
    never_wrong(img.clone(), 0, &d0, "session maps' head copies wiped");
    // The whole head, the written map's first copy and the primary superblock included.
    zero(&mut img, 0, end);
    never_wrong(img, 0, &d0, "whole head wiped");
}

/// F1, only the first-write map's head copy and group 0 wiped: the group is not dirty, so it
/// is read by the strict rules and reported.
#[test]
fn a_wiped_first_write_sector_and_group_0_is_reported() {
    let (mut img, geo, d0) = in_use_image();
    let fw = geo.map_offset(MapKind::FirstWrite, 0);
    zero(&mut img, fw, fw + 512);
    let end = geo.data_offset(geo.group_blocks as u64 - 1) + BS as u64;
    zero(&mut img, geo.meta_offset(0, 0), end);
    never_wrong(img, 0, &d0, "first-write head copy and group 0 wiped");
}

/// Block 5 written twice long ago (v1, then v2, the maps cleared since), then a session writes
/// group 2 and the power fails; on the medium block 5 is then rolled back to v1. Returns the
/// image, the geometry and both versions.
fn rolled_back_image() -> (Vec<u8>, Geometry, Vec<u8>, Vec<u8>) {
    let (backend, geo) = fault_volume();
    let vol = Volume::open(backend.clone(), &options()).unwrap();
    let (v1, v2) = (pattern(5, 1), pattern(5, 2));
    vol.write_at(&v1, 5 * BS as u64).unwrap();
    vol.flush().unwrap();
    vol.write_at(&v2, 5 * BS as u64).unwrap();
    vol.flush().unwrap();
    vol.write_at(&pattern(992, 1), 992 * BS as u64).unwrap();
    vol.flush().unwrap();
    vol.write_at(&pattern(993, 1), 993 * BS as u64).unwrap();
    std::mem::forget(vol);
    let mut img = backend.durable_image();
    let at = geo.data_offset(5) as usize;
    img[at..at + BS as usize].copy_from_slice(&v1);
    (img, geo, v1, v2)
}

/// F2: one flipped bit in the dirty map's head copy plus a block rolled back on the medium
/// (outside any crash window), then a power failure. On v2 the damaged sector marked every
/// group dirty, so the rollback was accepted as the older brother's version. And `check`
/// now reports the damaged copy.
#[test]
fn a_flipped_bit_in_the_dirty_map_does_not_widen_the_crash_window() {
    let (mut img, geo, _, v2) = rolled_back_image();
    let dirty = geo.map_offset(MapKind::Dirty, 0) as usize;
    img[dirty + 300] ^= 0x10;
    let (_, vol) = open(img.clone(), &read_only());
    assert!(
        read(&vol, 5).is_err(),
        "the rolled-back block 5 must fail verification"
    );
    let problems = vol.check_map().unwrap();
    assert!(
        problems
            .iter()
            .any(|p| p.detail.contains("dirty-groups map") && p.detail.contains("copy 0")),
        "check does not report the damaged dirty-map copy: {problems:?}"
    );
    drop(vol);
    never_wrong(img, 5, &v2, "dirty-map bit flip + rollback");
}

/// Both copies of a session-map sector damaged: no evidence of a crash window, so nothing is
/// read leniently (a rollback is still caught) — and the next recovery rewrites both copies.
#[test]
fn both_copies_of_a_dirty_map_sector_damaged_mark_nothing() {
    let (mut img, geo, _, v2) = rolled_back_image();
    for copy in 0..2 {
        let d = geo.map_offset(MapKind::Dirty, copy) as usize;
        img[d + 100] ^= 0x01;
    }
    never_wrong(img.clone(), 5, &v2, "both dirty-map copies damaged + rollback");
    let (backend, vol) = open(img, &options());
    vol.close().unwrap();
    let (_, vol) = open(backend.snapshot(), &read_only());
    assert_eq!(
        vol.check_map().unwrap(),
        vec![],
        "recovery rewrites both copies of the session maps"
    );
}

/// `check` on a clean volume reports damage to the session maps (v2 never looked at them).
#[test]
fn check_reports_damaged_session_map_copies() {
    let (backend, geo) = fault_volume();
    let vol = Volume::open(backend.clone(), &options()).unwrap();
    vol.write_at(&pattern(5, 1), 5 * BS as u64).unwrap();
    vol.close().unwrap();
    let mut img = backend.durable_image();
    img[geo.map_offset(MapKind::Dirty, 1) as usize + 300] ^= 0x10;
    let fw = geo.map_offset(MapKind::FirstWrite, 0);
    zero(&mut img, fw, fw + 512);
    let (_, vol) = open(img, &read_only());
    let details: Vec<String> = vol.check_map().unwrap().into_iter().map(|p| p.detail).collect();
    assert_eq!(details.len(), 2, "{details:?}");
    assert!(details[0].contains("dirty-groups map sector, copy 1") && details[0].contains("checksum"));
    assert!(details[1].contains("first-write map sector, copy 0") && details[1].contains("wiped"));
}

/// F3: damage to the written map's second copy was invisible while the first was valid; a
/// later wipe of the head then made group 0 read as never written. Now `check` reports the
/// first damage, and with both copies gone a blank group is reported, not zeros.
#[test]
fn a_damaged_second_written_map_copy_is_reported_and_never_yields_zeros() {
    let mut f = FormatOptions::with_size(4 << 20);
    f.uuid = Some([7; 16]);
    let backend = Arc::new(MemoryBackend::new(f.backing_len().unwrap()).unwrap());
    let vol = Volume::format(backend.clone(), &f).unwrap();
    let geo = *vol.geometry();
    let data = pattern(0, 1);
    vol.write_at(&data, 0).unwrap();
    vol.close().unwrap();
    let mut img = backend.snapshot();
    img[geo.map_offset(MapKind::Written, 1) as usize + 100] ^= 0x40;
    let (_, vol) = open(img.clone(), &read_only());
    let problems = vol.check_map().unwrap();
    assert!(
        problems
            .iter()
            .any(|p| p.detail.contains("written-groups map sector, copy 1")),
        "{problems:?}"
    );
    drop(vol);
    let end = geo.data_offset(geo.group_blocks as u64 - 1) + BS as u64;
    zero(&mut img, 0, end);
    let (_, vol) = open(img.clone(), &read_only());
    let err = read(&vol, 0).expect_err("a wiped written group must not read as zeros");
    assert!(err.to_string().contains("written-groups map"), "{err}");
    assert!(vol.extents(0, BS as u64).unwrap()[0].allocated);
    drop(vol);
    never_wrong(img.clone(), 0, &data, "written map copy 1 damaged, head wiped");
    // `recover --rebuild` is the way out: it rebuilds the sector from the groups' metadata,
    // after which the wiped group is reported as what it is.
    let (backend, vol) = open(img, &options());
    let report = vol.recover(RecoverOptions::rebuild(), |_, _| {}).unwrap();
    assert!(report.map_sectors_rebuilt >= 1, "{report:?}");
    vol.close().unwrap();
    let (_, vol) = open(backend.snapshot(), &read_only());
    assert!(
        read(&vol, 100).is_ok(),
        "the rebuilt map lets unwritten groups read again"
    );
}

/// F3: a crash between the two copies' writes of a group's first write leaves one copy with
/// the bit and one without. Reads merge the copies, recovery rewrites the one behind, and a
/// clean volume's `check` then finds nothing.
#[test]
fn a_written_map_copy_left_behind_by_a_crash_is_merged_and_repaired() {
    let (backend, geo) = fault_volume();
    let before = backend.events().len();
    let vol = Volume::open(backend.clone(), &options()).unwrap();
    vol.write_at(&pattern(0, 1), 0).unwrap();
    vol.flush().unwrap();
    drop(vol);
    let (c0, c1) = (
        geo.map_offset(MapKind::Written, 0),
        geo.map_offset(MapKind::Written, 1),
    );
    for keep_copy in [c0, c1] {
        let mut image = None;
        backend.for_each_history_point(|n, state| {
            let pending = state.unflushed();
            if n < before || image.is_some() {
                return;
            }
            if pending.iter().any(|w| w.offset == c0) && pending.iter().any(|w| w.offset == c1) {
                let keep: Vec<usize> = (0..pending.len())
                    .filter(|&i| pending[i].offset == keep_copy || ![c0, c1].contains(&pending[i].offset))
                    .collect();
                image = Some(state.crash_image(&keep));
            }
        });
        let image = image.expect("a point with both copies' writes pending");
        let (_, vol) = open(image.clone(), &read_only());
        assert!(
            read(&vol, 0).is_ok_and(|d| d.iter().all(|&x| x == 0)),
            "nothing was flushed"
        );
        drop(vol);
        let (backend, vol) = open(image, &options());
        vol.close().unwrap();
        let img = backend.snapshot();
        assert_eq!(
            img[c0 as usize + 16] & 1,
            img[c1 as usize + 16] & 1,
            "copies still disagree"
        );
        let (_, vol) = open(img, &read_only());
        assert_eq!(vol.check_map().unwrap(), vec![]);
    }
}
