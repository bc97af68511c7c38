//! Corruption (G3, G4): damage to data, tags or superblocks is reported as a typed error
//! naming the block, or survived through the other copy; wrong data is never returned. Every
//! test runs for every tag profile (the two slowest for one profile per tag size and kind).

use blockguard::blockguard_backend::{FaultBackend, MemoryBackend};
use blockguard::tag::TagKey;
use blockguard::{CorruptionKind, Error, FormatOptions, Mode, OpenOptions, Profile, Volume};
use std::cell::Cell;
use std::sync::Arc;

const BS: u64 = 512;
const BLOCKS: u64 = 150;

thread_local! {
    /// The tag profile the current test runs with (each test runs on its own thread).
    static PROFILE: Cell<Profile> = const { Cell::new(Profile::Crc32c) };
    /// The consistency mode it runs with.
    static MODE: Cell<Mode> = const { Cell::new(Mode::Dual) };
    /// The tag slots it formats with (`None`: the profile's tag size).
    static ROOM: Cell<Option<usize>> = const { Cell::new(None) };
}

/// Runs `body` once per profile of `profiles`: the suite holds for every tag profile.
fn for_profiles(profiles: &[Profile], body: fn()) {
    for &p in profiles {
        PROFILE.with(|c| c.set(p));
        // Printed (and shown on failure): which profile a failure is about.
        println!("tag profile {p}");
        body();
    }
}

/// One profile per tag size and kind (checksum, T10 PI, hash, keyed MAC), for the tests that
/// are too slow to repeat for all ten.
const REPRESENTATIVE: [Profile; 4] = [
    Profile::Crc32c,
    Profile::T10Dif,
    Profile::NvmePi64,
    Profile::HmacSha256,
];

fn profile() -> Profile {
    PROFILE.with(Cell::get)
}

fn key() -> Option<TagKey> {
    profile()
        .is_keyed()
        .then(|| TagKey::from_bytes(&[0x77; 32]).unwrap())
}

fn opts() -> FormatOptions {
    let mut o = FormatOptions::with_size(BS * BLOCKS);
    o.block_size = BS as u32;
    o.uuid = Some([0x11; 16]);
    o.profile = profile();
    o.key = key();
    o.mode = MODE.with(Cell::get);
    o.tag_room = ROOM.with(Cell::get);
    if o.mode == Mode::Journal {
        o.journal_size = Some(64 << 10);
    }
    o
}

/// Block `b`'s content in version `round`: pseudo-random bytes (xorshift). Not a ramp: the
/// versions of a ramp `b·7 + i + round` are the same bytes shifted by `round` positions, which
/// the weak IP-checksum guard of `t10-dif-ip` cannot tell apart (its sum of 16-bit words does
/// not see their order), and every test here runs with every profile.
fn content(b: u64, round: u8) -> Vec<u8> {
    let mut x = (b << 8 | u64::from(round)).wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
    (0..BS)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            x.to_le_bytes()[0]
        })
        .collect()
}

/// A volume image where: blocks 0..100 were written twice with a flush in between (so the
/// brothers of groups 0 and 1 differ), blocks 100..120 once, 120..130 written then zeroed,
/// the rest never written. Returns the image and the expected content of every block.
fn image() -> (Vec<u8>, Vec<Vec<u8>>) {
    let backend = Arc::new(MemoryBackend::new(opts().backing_len().unwrap()).unwrap());
    let vol = Volume::format(backend.clone(), &opts()).unwrap();
    let mut expected = vec![vec![0u8; BS as usize]; BLOCKS as usize];
    for round in 0..2u8 {
        for b in 0..100 {
            vol.write_at(&content(b, round), b * BS).unwrap();
            expected[b as usize] = content(b, round);
        }
        vol.flush().unwrap();
    }
    for b in 100..130 {
        vol.write_at(&content(b, 9), b * BS).unwrap();
        expected[b as usize] = content(b, 9);
    }
    vol.flush().unwrap();
    vol.write_zeroes(120 * BS, 10 * BS).unwrap();
    for e in &mut expected[120..130] {
        e.fill(0);
    }
    vol.close().unwrap();
    (backend.snapshot(), expected)
}

fn rw() -> OpenOptions {
    OpenOptions {
        key: key(),
        ..OpenOptions::default()
    }
}

fn ro() -> OpenOptions {
    OpenOptions {
        read_only: true,
        key: key(),
        ..OpenOptions::default()
    }
}

/// Every block reads back correctly or fails with a corruption error naming it.
fn assert_never_wrong(vol: &Volume, expected: &[Vec<u8>], context: &str) -> Vec<u64> {
    let mut failed = Vec::new();
    let mut buf = vec![0u8; BS as usize];
    for b in 0..BLOCKS {
        match vol.read_at(&mut buf, b * BS) {
            Ok(()) => assert!(
                buf == expected[b as usize],
                "{context}: block {b} returned wrong data"
            ),
            Err(e) => {
                assert!(
                    e.is_corruption(),
                    "{context}: block {b}: unexpected error kind: {e}"
                );
                assert_eq!(
                    e.corrupt_block(),
                    Some(b),
                    "{context}: error names the wrong block: {e}"
                );
                failed.push(b);
            }
        }
    }
    failed
}

#[test]
fn every_single_byte_flip_is_caught_or_harmless() {
    for_profiles(&REPRESENTATIVE, every_single_byte_flip_is_caught_or_harmless_with);
}

fn every_single_byte_flip_is_caught_or_harmless_with() {
    let (img, expected) = image();
    let vol = Volume::open(Arc::new(MemoryBackend::from_vec(img.clone())), &ro()).unwrap();
    assert!(assert_never_wrong(&vol, &expected, "pristine").is_empty());
    let geo = *vol.geometry();
    drop(vol);
    let data_block_at =
        |off: u64| (0..BLOCKS).find(|&b| (geo.data_offset(b)..geo.data_offset(b) + BS).contains(&off));
    let mut detected = 0;
    for off in 0..img.len() {
        for mask in [0x01u8, 0x80] {
            let mut damaged = img.clone();
            damaged[off] ^= mask;
            let vol = match Volume::open(Arc::new(MemoryBackend::from_vec(damaged)), &ro()) {
                Ok(v) => v,
                Err(e) => panic!("a single flip at byte {off} made the volume unopenable: {e}"),
            };
            let failed = assert_never_wrong(&vol, &expected, &format!("flip {mask:#x} at byte {off}"));
            // A flip inside a data block must be detected on exactly that block.
            if let Some(b) = data_block_at(off as u64) {
                assert_eq!(
                    failed,
                    vec![b],
                    "flip at byte {off} (block {b}) not pinned to its block"
                );
                detected += 1;
            }
        }
    }
    assert!(detected as u64 >= 2 * BLOCKS * BS);
}

#[test]
fn damaged_metadata_never_turns_data_into_zeros() {
    for_profiles(&Profile::ALL, damaged_metadata_never_turns_data_into_zeros_with);
}

fn damaged_metadata_never_turns_data_into_zeros_with() {
    let (img, expected) = image();
    let vol = Volume::open(Arc::new(MemoryBackend::from_vec(img.clone())), &ro()).unwrap();
    let geo = *vol.geometry();
    drop(vol);
    // Wipe both brothers of group 0 (zeros look like "never written", but the written-groups
    // map remembers the group was written).
    let mut wiped = img.clone();
    for slot in 0..2 {
        let at = geo.meta_offset(0, slot) as usize;
        wiped[at..at + BS as usize].fill(0);
    }
    let vol = Volume::open(Arc::new(MemoryBackend::from_vec(wiped)), &ro()).unwrap();
    let failed = assert_never_wrong(&vol, &expected, "both brothers wiped");
    assert_eq!(
        failed,
        (0..geo.group_blocks as u64).collect::<Vec<_>>(),
        "every written block of group 0 must fail"
    );
    let mut buf = vec![0u8; BS as usize];
    match vol.read_at(&mut buf, 0) {
        Err(Error::Corrupt { kind, .. }) => assert_eq!(kind, CorruptionKind::MetadataDamaged),
        other => panic!("expected MetadataDamaged, got {other:?}"),
    }
    // Wipe only the newest brother: the older one holds stale tags for group 0, which
    // the current data does not match: errors, never stale acceptance.
    for slot in 0..2 {
        let mut one = img.clone();
        let at = geo.meta_offset(0, slot) as usize;
        one[at..at + BS as usize].fill(0);
        let vol = Volume::open(Arc::new(MemoryBackend::from_vec(one)), &ro()).unwrap();
        assert_never_wrong(&vol, &expected, &format!("slot {slot} wiped"));
    }
    // check_blocks lists every bad block without stopping.
    let mut wiped = img.clone();
    let at = geo.data_offset(7) as usize;
    wiped[at] ^= 0xff;
    let at = geo.data_offset(140) as usize;
    wiped[at] ^= 0xff; // never written: must read as zeros, so this is caught too
    let vol = Volume::open(Arc::new(MemoryBackend::from_vec(wiped)), &ro()).unwrap();
    let problems = vol.check_blocks(0, BLOCKS).unwrap();
    assert_eq!(problems.iter().map(|p| p.block).collect::<Vec<_>>(), vec![7, 140]);
}

fn fault_volume() -> (Arc<FaultBackend>, Volume) {
    let backend = Arc::new(
        FaultBackend::new(opts().backing_len().unwrap())
            .unwrap()
            .with_seed(7),
    );
    let vol = Volume::format(backend.clone(), &opts()).unwrap();
    for b in 0..BLOCKS {
        vol.write_at(&content(b, 0), b * BS).unwrap();
    }
    vol.flush().unwrap();
    (backend, vol)
}

#[test]
fn misdirected_write_is_detected_at_both_addresses() {
    for_profiles(
        &Profile::ALL,
        misdirected_write_is_detected_at_both_addresses_with,
    );
}

fn misdirected_write_is_detected_at_both_addresses_with() {
    let (backend, vol) = fault_volume();
    let geo = *vol.geometry();
    let (from, to) = (geo.data_offset(10), geo.data_offset(20));
    backend.misdirect_writes_with(move |off, _| (off == from).then_some(to));
    vol.write_at(&content(10, 1), 10 * BS).unwrap();
    vol.flush().unwrap();
    let mut buf = vec![0u8; BS as usize];
    // Block 20 now holds block 10's data: the tag binds the address, so it fails (G4).
    assert!(vol.read_at(&mut buf, 20 * BS).unwrap_err().is_corruption());
    // Block 10 still holds its old data, but the flush proved the new data durable: only the
    // new tag is accepted, so the lost update is caught too.
    assert!(vol.read_at(&mut buf, 10 * BS).unwrap_err().is_corruption());
    drop(vol);
    let vol = Volume::open(backend.clone(), &ro()).unwrap();
    assert!(vol.read_at(&mut buf, 20 * BS).unwrap_err().is_corruption());
}

#[test]
fn lost_data_write_is_detected_after_flush() {
    for_profiles(&Profile::ALL, lost_data_write_is_detected_after_flush_with);
}

fn lost_data_write_is_detected_after_flush_with() {
    let (backend, vol) = fault_volume();
    let geo = *vol.geometry();
    let target = geo.data_offset(33);
    let lost = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let l = lost.clone();
    // Model a lost write as a write "misdirected" nowhere: redirect it outside the store.
    backend.misdirect_writes_with(move |off, _| {
        (off == target && !l.swap(true, std::sync::atomic::Ordering::SeqCst)).then_some(u64::MAX / 2)
    });
    vol.write_at(&content(33, 5), 33 * BS).unwrap();
    vol.flush().unwrap();
    assert!(lost.load(std::sync::atomic::Ordering::SeqCst));
    let mut buf = vec![0u8; BS as usize];
    let e = vol.read_at(&mut buf, 33 * BS).unwrap_err();
    assert!(e.is_corruption() && e.to_string().contains("block 33"), "{e}");
}

#[test]
fn lost_metadata_write_never_yields_wrong_data() {
    for_profiles(&Profile::ALL, lost_metadata_write_never_yields_wrong_data_with);
}

fn lost_metadata_write_never_yields_wrong_data_with() {
    let (backend, vol) = fault_volume();
    let geo = *vol.geometry();
    let meta = [geo.meta_offset(0, 0), geo.meta_offset(0, 1)];
    backend.misdirect_writes_with(move |off, _| meta.contains(&off).then_some(u64::MAX / 2));
    vol.write_at(&content(3, 8), 3 * BS).unwrap();
    vol.flush().unwrap();
    drop(vol);
    let vol = Volume::open(backend.clone(), &ro()).unwrap();
    let mut buf = vec![0u8; BS as usize];
    // The data landed but its tag did not: an error, not the data unverified.
    assert!(vol.read_at(&mut buf, 3 * BS).unwrap_err().is_corruption());
    vol.read_at(&mut buf, 4 * BS).unwrap();
    assert_eq!(buf, content(4, 0));
}

#[test]
fn io_errors_are_io_errors_and_a_failed_write_back_poisons_flush() {
    for_profiles(
        &Profile::ALL,
        io_errors_are_io_errors_and_a_failed_write_back_poisons_flush_with,
    );
}

fn io_errors_are_io_errors_and_a_failed_write_back_poisons_flush_with() {
    let (backend, vol) = fault_volume();
    let geo = *vol.geometry();
    let mut buf = vec![0u8; BS as usize];
    backend.fail_reads_at(geo.data_offset(5)..geo.data_offset(5) + 1);
    let e = vol.read_at(&mut buf, 5 * BS).unwrap_err();
    assert!(matches!(e, Error::Io { .. }), "{e}");
    backend.clear_faults();
    vol.read_at(&mut buf, 5 * BS).unwrap();
    backend.fail_writes_at(geo.data_offset(6)..geo.data_offset(6) + 1);
    vol.write_at(&content(6, 3), 6 * BS).unwrap();
    assert!(vol.flush().is_err());
    backend.clear_faults();
    // Durability was lost once: later flushes must not pretend otherwise.
    assert!(matches!(vol.flush(), Err(Error::Failed { .. })));
    assert!(vol.write_at(&content(7, 3), 7 * BS).is_err());
    // The acknowledged write is still readable in this session.
    vol.read_at(&mut buf, 6 * BS).unwrap();
    assert_eq!(buf, content(6, 3));
    backend.fail_next_flush();
    drop(vol);
}

#[test]
fn superblock_damage() {
    for_profiles(&Profile::ALL, superblock_damage_with);
}

fn superblock_damage_with() {
    let (img, expected) = image();
    let len = img.len();
    // Primary damaged: opens from the backup with a warning, and a read-write open repairs it.
    let mut d = img.clone();
    d[100] ^= 1;
    let backend = Arc::new(MemoryBackend::from_vec(d));
    let vol = Volume::open(backend.clone(), &rw()).unwrap();
    assert_eq!(vol.warnings().len(), 1, "{:?}", vol.warnings());
    assert!(vol.warnings()[0].contains("primary"));
    assert_never_wrong(&vol, &expected, "primary damaged");
    drop(vol);
    assert_eq!(backend.snapshot(), img, "repair restores the exact superblock");
    // Backup damaged.
    let mut d = img.clone();
    d[len - 4096 + 64] ^= 1;
    let vol = Volume::open(Arc::new(MemoryBackend::from_vec(d)), &ro()).unwrap();
    assert!(vol.warnings()[0].contains("backup"));
    // Both damaged: refused.
    let mut d = img.clone();
    d[100] ^= 1;
    d[len - 4096 + 64] ^= 1;
    assert!(matches!(
        Volume::open(Arc::new(MemoryBackend::from_vec(d)), &ro()),
        Err(Error::SuperblockDamaged { .. })
    ));
    // Not a volume, truncated, too small.
    assert!(matches!(
        Volume::open(Arc::new(MemoryBackend::new(1 << 20).unwrap()), &ro()),
        Err(Error::NotAVolume { .. })
    ));
    assert!(matches!(
        Volume::open(Arc::new(MemoryBackend::from_vec(img[..len / 2].to_vec())), &ro()),
        Err(Error::Truncated { .. })
    ));
    assert!(matches!(
        Volume::open(Arc::new(MemoryBackend::new(100).unwrap()), &ro()),
        Err(Error::NotAVolume { .. })
    ));
}

#[test]
fn large_batches_land_whole_and_fail_whole() {
    for_profiles(&Profile::ALL, large_batches_land_whole_and_fail_whole_with);
}

fn large_batches_land_whole_and_fail_whole_with() {
    // 24 MiB in one batch of many runs, with zeroed ranges among the data; then the same with
    // a write error near its start and near its end.
    let mut opts = FormatOptions::with_size(32 << 20);
    opts.uuid = Some([9; 16]);
    opts.profile = profile();
    opts.key = key();
    for fail_at in [None, Some(1u64 << 20), Some(22u64 << 20)] {
        let backend = Arc::new(FaultBackend::new(opts.backing_len().unwrap()).unwrap());
        drop(Volume::format(backend.clone(), &opts).unwrap());
        let vol = Volume::open(backend.clone(), &rw()).unwrap();
        let mut model = vec![0u8; 24 << 20];
        for (i, chunk) in model.chunks_mut(1 << 20).enumerate() {
            for (j, b) in chunk.iter_mut().enumerate() {
                *b = (i * 7 + j / 4096) as u8 | 1;
            }
        }
        for i in 0..24u64 {
            let c = &model[(i << 20) as usize..((i + 1) << 20) as usize];
            vol.write_owned(c.to_vec(), i << 20).unwrap();
        }
        for z in [3u64, 12, 20] {
            vol.write_zeroes(z << 20, 256 << 10).unwrap();
            model[(z << 20) as usize..((z << 20) + (256 << 10)) as usize].fill(0);
        }
        let geo = *vol.geometry();
        if let Some(at) = fail_at {
            let off = geo.data_offset(at / u64::from(geo.block_size));
            backend.fail_writes_at(off..off + 1);
            assert!(vol.flush().is_err(), "a failed run fails the commit");
            assert!(matches!(vol.flush(), Err(Error::Failed { .. })));
            backend.clear_faults();
            continue;
        }
        vol.flush().unwrap();
        drop(vol);
        let vol = Volume::open(backend, &rw()).unwrap();
        let mut back = vec![0xEEu8; 24 << 20];
        vol.read_at(&mut back, 0).unwrap();
        assert!(back == model, "large batch read back differs");
    }
}

/// One brother of one group damaged (a flipped bit, or wiped to zeros where no crash explains a
/// blank), on a cleanly closed volume, for each slot of each group: the group's blocks fail as
/// `MetadataDamaged` (the other brother cannot be proven the newest), none is reported as a
/// hole, `check` lists the sector, writes that would need the lost tags are refused while a
/// write covering the whole sector re-establishes it, and `recover` rebuilds it on request.
#[test]
fn one_damaged_brother_is_reported_never_hidden() {
    for_profiles(&REPRESENTATIVE, one_damaged_brother_is_reported_never_hidden_with);
}

fn one_damaged_brother_is_reported_never_hidden_with() {
    let (img, expected) = image();
    let geo = *Volume::open(Arc::new(MemoryBackend::from_vec(img.clone())), &ro())
        .unwrap()
        .geometry();
    // Groups holding written blocks (0..130): with 32-byte tags the last group of this image
    // was never written, and a blank metadata sector's brother cannot be rebuilt from.
    for group in (0..geo.groups).filter(|&g| geo.first_block(g) < 130) {
        let first = geo.first_block(group);
        let blocks: Vec<u64> = (first..first + geo.blocks_in_group(group) as u64).collect();
        for slot in 0..2 {
            for wipe in [false, true] {
                let what = format!(
                    "group {group} slot {slot} {}",
                    // A flip in the header's generation: the header check fails, so nothing
                    // proves which brother is the newest (a flip in the body leaves a scar
                    // whose generation is known: tests/scars.rs).
                    if wipe { "wiped" } else { "header bit-flipped" }
                );
                let mut d = img.clone();
                let at = geo.meta_offset(group, slot) as usize;
                if wipe {
                    d[at..at + BS as usize].fill(0);
                } else {
                    d[at + 9] ^= 0x10;
                }
                let backend = Arc::new(MemoryBackend::from_vec(d));
                let vol = Volume::open(backend.clone(), &ro()).unwrap();
                let failed = assert_never_wrong(&vol, &expected, &what);
                assert_eq!(failed, blocks, "{what}: every block of the sector fails");
                let mut buf = vec![0u8; BS as usize];
                match vol.read_at(&mut buf, first * BS) {
                    Err(Error::Corrupt { kind, .. }) => {
                        assert_eq!(kind, CorruptionKind::MetadataDamaged, "{what}")
                    }
                    other => panic!("{what}: {other:?}"),
                }
                let holes: Vec<_> = vol
                    .extents(0, BS * BLOCKS)
                    .unwrap()
                    .into_iter()
                    .filter(|e| !e.allocated)
                    .collect();
                for e in &holes {
                    let (lo, hi) = (e.offset / BS, (e.offset + e.len).div_ceil(BS));
                    assert!(
                        hi <= first || lo >= first + blocks.len() as u64,
                        "{what}: a block of the damaged group reported as a hole: {e:?}"
                    );
                }
                let damaged = vol.check_metadata(0, geo.groups).unwrap();
                assert_eq!(damaged.len(), 1, "{what}: {damaged:?}");
                assert_eq!((damaged[0].group, damaged[0].sector), (group, 0), "{what}");
                assert_eq!(
                    vol.check_blocks(0, BLOCKS)
                        .unwrap()
                        .iter()
                        .map(|p| p.block)
                        .collect::<Vec<_>>(),
                    blocks,
                    "{what}"
                );
                drop(vol);

                // Writes after the damage.
                let vol = Volume::open(backend.clone(), &rw()).unwrap();
                let e = vol.write_at(&content(first, 40), first * BS).unwrap_err();
                assert!(
                    matches!(
                        e,
                        Error::Corrupt {
                            kind: CorruptionKind::MetadataDamaged,
                            ..
                        }
                    ),
                    "{what}: a partial write into the damaged sector is refused: {e}"
                );
                let other = (first + blocks.len() as u64) % BLOCKS;
                vol.write_at(&content(other, 41), other * BS).unwrap();
                vol.flush().unwrap();
                vol.close().unwrap();
                let vol = Volume::open(backend.clone(), &ro()).unwrap();
                let mut now = expected.clone();
                now[other as usize] = content(other, 41);
                let failed = assert_never_wrong(&vol, &now, &format!("{what}, then a write elsewhere"));
                assert_eq!(failed, blocks, "{what}: nothing else was forgotten");
                drop(vol);

                // `recover` rebuilds the damaged brother from the other: the blocks that match it
                // read again (here all of them: the damaged copy was the older, or equal).
                let vol = Volume::open(backend.clone(), &rw()).unwrap();
                let report = vol
                    .recover(blockguard::RecoverOptions::rebuild(), |_, _| {})
                    .unwrap();
                assert_eq!(report.damaged.len(), 1, "{what}: {report:?}");
                assert!(report.damaged[0].rebuilt, "{what}");
                vol.close().unwrap();
                let vol = Volume::open(backend.clone(), &ro()).unwrap();
                assert!(vol.check_metadata(0, geo.groups).unwrap().is_empty(), "{what}");
                let failed = assert_never_wrong(&vol, &now, &format!("{what}, rebuilt"));
                // A block rewritten by the newest brother's batch fails when the newest was lost.
                for b in &failed {
                    assert!(blocks.contains(b), "{what}: block {b} outside the group fails");
                }
                drop(vol);

                // A write covering every block of the damaged sector re-establishes it.
                let mut d = img.clone();
                if wipe {
                    d[at..at + BS as usize].fill(0);
                } else {
                    d[at + 9] ^= 0x10;
                }
                let backend = Arc::new(MemoryBackend::from_vec(d));
                let vol = Volume::open(backend.clone(), &rw()).unwrap();
                let fresh: Vec<u8> = blocks.iter().flat_map(|&b| content(b, 42)).collect();
                vol.write_at(&fresh, first * BS).unwrap();
                vol.close().unwrap();
                let vol = Volume::open(backend, &ro()).unwrap();
                let mut now = expected.clone();
                for &b in &blocks {
                    now[b as usize] = content(b, 42);
                }
                assert!(
                    assert_never_wrong(&vol, &now, &format!("{what}, overwritten whole")).is_empty(),
                    "{what}"
                );
                assert!(vol.check_metadata(0, geo.groups).unwrap().is_empty(), "{what}");
            }
        }
    }
}

/// The suite in the single-copy modes: `journal` (a 64 KiB journal, so every byte of it is
/// flipped too) and `rebuild`, with `crc32c` (the brother-specific test stays `dual`-only).
#[test]
fn the_suite_holds_in_journal_and_rebuild_modes() {
    for mode in [Mode::Journal, Mode::Rebuild] {
        MODE.with(|c| c.set(mode));
        println!("mode {}", mode.name());
        every_single_byte_flip_is_caught_or_harmless_with();
        damaged_metadata_never_turns_data_into_zeros_with();
        misdirected_write_is_detected_at_both_addresses_with();
        lost_data_write_is_detected_after_flush_with();
        lost_metadata_write_never_yields_wrong_data_with();
        io_errors_are_io_errors_and_a_failed_write_back_poisons_flush_with();
        superblock_damage_with();
        large_batches_land_whole_and_fail_whole_with();
    }
}

/// The suite in tag slots wider than the profile's tags (`tag_room`, room left for a re-tag
/// to larger ones): a flip in the zeros after a tag is damage like any other, and the
/// smaller tags in their wide slots catch what they catch in their own.
#[test]
fn the_suite_holds_in_wide_tag_slots() {
    ROOM.with(|c| c.set(Some(32)));
    for_profiles(&[Profile::Crc32c, Profile::NvmePi64], || {
        every_single_byte_flip_is_caught_or_harmless_with();
        damaged_metadata_never_turns_data_into_zeros_with();
        misdirected_write_is_detected_at_both_addresses_with();
        lost_data_write_is_detected_after_flush_with();
        lost_metadata_write_never_yields_wrong_data_with();
        superblock_damage_with();
        one_damaged_brother_is_reported_never_hidden_with();
    });
}
