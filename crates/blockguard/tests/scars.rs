//! Metadata repair without a mirror: a metadata sector whose header is intact but whose body
//! is damaged (*scarred*) no longer takes its blocks down. Its header proves its generation, so
//! the newest brother is still known: a scarred older brother costs nothing and is rewritten by
//! the next write or a scrub's repair; a scarred newest brother still serves every block whose
//! data matches its tag, and is healed when every block proves its tag. Damage that does not
//! leave the header intact — zeros, a misdirected write, another sector's bytes — stays
//! unprovable and is reported as before, never answered with an older version.

use blockguard::blockguard_backend::MemoryBackend;
use blockguard::tag::TagKey;
use blockguard::{CorruptionKind, Error, FormatOptions, Mode, OpenOptions, Profile, ScrubOptions, Volume};
use std::sync::Arc;

const BS: u64 = 512;
/// Two groups of 62 blocks (8-byte tags) or more, smaller groups with larger tags.
const BLOCKS: u64 = 124;

fn key(profile: Profile) -> Option<TagKey> {
    profile
        .is_keyed()
        .then(|| TagKey::from_bytes(&[0x5a; 32]).unwrap())
}

fn format_opts(mode: Mode, profile: Profile) -> FormatOptions {
    let mut o = FormatOptions::with_size(BS * BLOCKS);
    o.block_size = BS as u32;
    o.uuid = Some([0x21; 16]);
    o.mode = mode;
    o.profile = profile;
    o.key = key(profile);
    if mode == Mode::Journal {
        o.journal_size = Some(64 << 10);
    }
    o
}

fn rw(profile: Profile) -> OpenOptions {
    OpenOptions {
        key: key(profile),
        ..OpenOptions::default()
    }
}

fn ro(profile: Profile) -> OpenOptions {
    OpenOptions {
        read_only: true,
        ..rw(profile)
    }
}

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

/// A closed volume whose every block was written twice with a flush in between (round 0, then
/// round 1): in `dual`, slot 1 holds the newest brother of every pair (generation 2) and slot
/// 0 the older (generation 1).
fn image(mode: Mode, profile: Profile) -> (Vec<u8>, blockguard::format::Geometry) {
    let backend = Arc::new(MemoryBackend::new(format_opts(mode, profile).backing_len().unwrap()).unwrap());
    let vol = Volume::format(backend.clone(), &format_opts(mode, profile)).unwrap();
    write_two_rounds(&vol);
    let geo = *vol.geometry();
    vol.close().unwrap();
    (backend.snapshot(), geo)
}

/// Every block written with round 0's content, flushed, then with round 1's, flushed.
fn write_two_rounds(vol: &Volume) {
    for round in 0..2u8 {
        let all: Vec<u8> = (0..BLOCKS).flat_map(|b| content(b, round)).collect();
        vol.write_at(&all, 0).unwrap();
        vol.flush().unwrap();
    }
}

/// Reads every block: the blocks that fail (each must fail as damaged metadata naming
/// itself); every block that reads must hold round 1's content.
fn failing_blocks(vol: &Volume, what: &str) -> Vec<u64> {
    let mut failed = Vec::new();
    let mut buf = vec![0u8; BS as usize];
    for b in 0..BLOCKS {
        match vol.read_at(&mut buf, b * BS) {
            Ok(()) => assert!(buf == content(b, 1), "{what}: block {b} returned wrong data"),
            Err(Error::Corrupt { block, kind, .. }) => {
                assert_eq!(block, b, "{what}");
                assert_eq!(kind, CorruptionKind::MetadataDamaged, "{what}: block {b}");
                failed.push(b);
            }
            Err(e) => panic!("{what}: block {b}: {e}"),
        }
    }
    failed
}

fn scrub(vol: &Volume, repair: bool) -> blockguard::ScrubReport {
    vol.scrub(
        ScrubOptions {
            repair,
            ..ScrubOptions::default()
        },
        &mut |_| {},
    )
    .unwrap()
}

/// Reopened read-only, the volume checks clean and every block reads round 1's content.
fn assert_clean(
    backend: Arc<MemoryBackend>,
    profile: Profile,
    geo: &blockguard::format::Geometry,
    what: &str,
) {
    let vol = Volume::open(backend, &ro(profile)).unwrap();
    assert!(vol.check_metadata(0, geo.groups).unwrap().is_empty(), "{what}");
    assert!(failing_blocks(&vol, what).is_empty(), "{what}");
}

/// Offset of the byte `at` of sector 0 of `slot` of group 0.
fn sector0(geo: &blockguard::format::Geometry, slot: u8, at: usize) -> usize {
    geo.meta_offset(0, usize::from(slot)) as usize + at
}

/// Byte offset inside a sector of tag `j`'s first byte.
fn tag_at(j: usize, tag_size: usize) -> usize {
    16 + j * tag_size
}

const PROFILES: [Profile; 3] = [Profile::Crc32c, Profile::NvmePi64, Profile::HmacSha256];

#[test]
fn a_scarred_older_brother_costs_no_block_and_is_healed() {
    for profile in PROFILES {
        let (img, geo) = image(Mode::Dual, profile);
        let per = geo.tags_per_sector() as u64;
        for heal_by_write in [false, true] {
            let what = format!(
                "{profile}, healed by {}",
                if heal_by_write { "a write" } else { "scrub" }
            );
            let mut d = img.clone();
            // A flip inside a tag of the older brother (slot 0, generation 1).
            d[sector0(&geo, 0, tag_at(3, geo.tag_size as usize) + 1)] ^= 0x20;
            let backend = Arc::new(MemoryBackend::from_vec(d));
            let vol = Volume::open(backend.clone(), &ro(profile)).unwrap();
            assert!(failing_blocks(&vol, &what).is_empty(), "{what}: no block fails");
            let problems = vol.check_metadata(0, geo.groups).unwrap();
            assert_eq!(problems.len(), 1, "{what}: {problems:?}");
            assert_eq!((problems[0].group, problems[0].sector), (0, 0), "{what}");
            assert!(
                problems[0].detail.contains("scarred") && problems[0].detail.contains("older"),
                "{what}: {}",
                problems[0].detail
            );
            // Never a hole on a damaged sector's word, and never a hole over written data.
            assert!(
                vol.extents(0, BS * BLOCKS).unwrap().iter().all(|e| e.allocated),
                "{what}"
            );
            drop(vol);

            let vol = Volume::open(backend.clone(), &rw(profile)).unwrap();
            if heal_by_write {
                // The group's next commit writes the older slot: the scar is gone with it.
                vol.write_at(&content(5, 1), 5 * BS).unwrap();
                vol.flush().unwrap();
            } else {
                let found = scrub(&vol, false);
                assert_eq!((found.scarred_sectors, found.sectors_healed), (1, 0), "{what}");
                assert!(!found.is_clean() && found.problem_count == 0, "{what}: {found:?}");
                let fixed = scrub(&vol, true);
                assert_eq!((fixed.scarred_sectors, fixed.sectors_healed), (1, 1), "{what}");
                assert_eq!(fixed.unrepaired(), 0, "{what}");
                assert!(scrub(&vol, false).is_clean(), "{what}: healed in this session");
            }
            vol.close().unwrap();
            let vol = Volume::open(backend, &ro(profile)).unwrap();
            assert!(vol.check_metadata(0, geo.groups).unwrap().is_empty(), "{what}");
            assert!(failing_blocks(&vol, &what).is_empty(), "{what}");
            assert!(per > 0);
        }
    }
}

#[test]
fn a_scarred_newest_brother_fails_only_the_block_whose_tag_it_hit() {
    for profile in PROFILES {
        let (img, geo) = image(Mode::Dual, profile);
        let ts = geo.tag_size as usize;
        let per = geo.tags_per_sector() as u64;
        let what = format!("{profile}");
        let mut d = img.clone();
        d[sector0(&geo, 1, tag_at(4, ts) + ts - 1)] ^= 0x01;
        let backend = Arc::new(MemoryBackend::from_vec(d));
        let vol = Volume::open(backend.clone(), &ro(profile)).unwrap();
        assert_eq!(failing_blocks(&vol, &what), vec![4], "{what}");
        let mut buf = vec![0u8; BS as usize];
        let e = vol.read_at(&mut buf, 4 * BS).unwrap_err().to_string();
        assert!(
            e.contains("scarred") || e.contains("header is intact"),
            "{what}: {e}"
        );
        assert_eq!(vol.check_metadata(0, geo.groups).unwrap().len(), 1, "{what}");
        drop(vol);

        let vol = Volume::open(backend.clone(), &rw(profile)).unwrap();
        // A scrub cannot heal a pair one of whose blocks proves nothing...
        let report = scrub(&vol, true);
        assert_eq!((report.scarred_sectors, report.sectors_healed), (1, 0), "{what}");
        assert_eq!(
            report.problems.iter().map(|p| p.block).collect::<Vec<_>>(),
            vec![4],
            "{what}"
        );
        assert!(report.unrepaired() > 0, "{what}");
        // ... a write into the pair is taken, its tags copied forward: the hit one still
        // fails its block (now as a plain mismatch: the sector holding it is valid again) ...
        vol.write_at(&content(2, 7), 2 * BS).unwrap();
        vol.flush().unwrap();
        let mut buf = vec![0u8; BS as usize];
        vol.read_at(&mut buf, 2 * BS).unwrap();
        assert!(buf == content(2, 7), "{what}");
        assert!(
            matches!(
                vol.read_at(&mut buf, 4 * BS),
                Err(Error::Corrupt { block: 4, .. })
            ),
            "{what}: the hit tag must keep failing its block"
        );
        for b in (0..BLOCKS).filter(|&b| b != 2 && b != 4) {
            vol.read_at(&mut buf, b * BS).unwrap();
            assert!(buf == content(b, 1), "{what}: block {b}");
        }
        // ... and a write covering the whole sector re-establishes it.
        let fresh: Vec<u8> = (0..per).flat_map(|b| content(b, 1)).collect();
        vol.write_at(&fresh, 0).unwrap();
        vol.close().unwrap();
        let vol = Volume::open(backend, &ro(profile)).unwrap();
        assert!(failing_blocks(&vol, &what).is_empty(), "{what}");
        assert!(vol.check_metadata(0, geo.groups).unwrap().is_empty(), "{what}");
    }
}

#[test]
fn a_scarred_newest_brother_whose_tags_all_prove_themselves_is_healed() {
    for profile in PROFILES {
        let (img, geo) = image(Mode::Dual, profile);
        let what = format!("{profile}");
        let mut d = img.clone();
        // The sector checksum itself (bytes 4..8) is hit: every tag is intact.
        d[sector0(&geo, 1, 5)] ^= 0x40;
        let backend = Arc::new(MemoryBackend::from_vec(d));
        let vol = Volume::open(backend.clone(), &rw(profile)).unwrap();
        assert!(failing_blocks(&vol, &what).is_empty(), "{what}");
        let report = scrub(&vol, true);
        assert_eq!(
            (report.scarred_sectors, report.sectors_healed),
            (1, 1),
            "{what}: {report:?}"
        );
        // Healed: writes into the pair work again.
        vol.write_at(&content(2, 1), 2 * BS).unwrap();
        vol.close().unwrap();
        assert_clean(backend, profile, &geo, &what);
    }
}

/// The case the brothers' rule exists for: the data write of the newest version lands on the
/// newest brother instead of its block, which keeps the older version — exactly what the older
/// brother describes. Arbitrary bytes fail the header check, so the pair stays damaged and the
/// older version is never returned. The same for zeros, and for another sector's bytes.
#[test]
fn damage_that_leaves_no_header_is_never_answered_with_the_older_version() {
    for block_size in [512u32, 4096] {
        let mut o = format_opts(Mode::Dual, Profile::Crc32c);
        o.block_size = block_size;
        let bs = u64::from(block_size);
        let blocks = 2 * 496;
        o.size = Some(bs * blocks);
        let backend = Arc::new(MemoryBackend::new(o.backing_len().unwrap()).unwrap());
        let vol = Volume::format(backend.clone(), &o).unwrap();
        let old: Vec<u8> = vec![0x11; block_size as usize];
        let new: Vec<u8> = vec![0x22; block_size as usize];
        vol.write_at(&old, 3 * bs).unwrap();
        vol.flush().unwrap();
        vol.write_at(&new, 3 * bs).unwrap();
        vol.flush().unwrap();
        let geo = *vol.geometry();
        vol.close().unwrap();
        let img = backend.snapshot();
        let newest = geo.meta_offset(0, 1) as usize;
        let data = geo.data_offset(3) as usize;
        let sector1 = geo.meta_offset(0, 1) as usize + if block_size > 512 { 512 } else { 0 };
        for how in ["misdirected data", "zeros", "another sector"] {
            let mut d = img.clone();
            match how {
                "misdirected data" => d[newest..newest + block_size as usize].copy_from_slice(&new),
                "zeros" => d[newest..newest + 512].fill(0),
                _ => {
                    let other = img[geo.meta_offset(0, 0) as usize..][..512].to_vec();
                    d[newest..newest + 512].copy_from_slice(&other);
                }
            }
            // The block itself kept the older version (the write went elsewhere).
            d[data..data + block_size as usize].copy_from_slice(&old);
            let vol = Volume::open(Arc::new(MemoryBackend::from_vec(d)), &ro(Profile::Crc32c)).unwrap();
            let mut buf = vec![0u8; block_size as usize];
            match vol.read_at(&mut buf, 3 * bs) {
                Err(Error::Corrupt { kind, .. }) => {
                    assert_eq!(kind, CorruptionKind::MetadataDamaged, "{block_size} {how}")
                }
                Ok(()) => panic!("{block_size} {how}: returned {:#x}..", buf[0]),
                Err(e) => panic!("{block_size} {how}: {e}"),
            }
            assert!(sector1 >= newest);
        }
    }
}

/// With one copy of the tags (`journal`, `rebuild`) a scarred sector is the newest by
/// definition: its blocks read where they prove their tag, and a scrub rewrites it in place
/// when all of them do.
#[test]
fn single_copy_modes_read_through_a_scar_and_heal_it_in_place() {
    for mode in [Mode::Journal, Mode::Rebuild] {
        let profile = Profile::Crc32c;
        let (img, geo) = image(mode, profile);
        let what = mode.name().to_string();
        let mut d = img.clone();
        d[sector0(&geo, 0, tag_at(7, 8) + 2)] ^= 0x08;
        let vol = Volume::open(Arc::new(MemoryBackend::from_vec(d)), &ro(profile)).unwrap();
        assert_eq!(failing_blocks(&vol, &what), vec![7], "{what}");
        drop(vol);

        let mut d = img.clone();
        d[sector0(&geo, 0, 4)] ^= 0x02;
        let backend = Arc::new(MemoryBackend::from_vec(d));
        let vol = Volume::open(backend.clone(), &rw(profile)).unwrap();
        assert!(failing_blocks(&vol, &what).is_empty(), "{what}");
        let report = scrub(&vol, true);
        assert_eq!(
            (report.scarred_sectors, report.sectors_healed),
            (1, 1),
            "{what}: {report:?}"
        );
        vol.close().unwrap();
        assert_clean(backend, profile, &geo, &what);
    }
}

/// Recovery after a crash heals a scar in a group it settles: the newest brother's checksum
/// is hit (its tags intact), and the volume was left in use with the group marked dirty.
#[test]
fn recovery_heals_the_scars_of_the_groups_it_settles() {
    let profile = Profile::Crc32c;
    let o = format_opts(Mode::Dual, profile);
    let backend = Arc::new(MemoryBackend::new(o.backing_len().unwrap()).unwrap());
    let vol = Volume::format(backend.clone(), &o).unwrap();
    write_two_rounds(&vol);
    let geo = *vol.geometry();
    // A crash now: the superblock says in use, the dirty map marks the groups.
    let mut d = backend.snapshot();
    drop(vol);
    for (slot, at) in [(1u8, 6usize), (0, tag_at(9, 8))] {
        let mut d = d.clone();
        d[sector0(&geo, slot, at)] ^= 0x10;
        let backend = Arc::new(MemoryBackend::from_vec(d));
        let vol = Volume::open(backend.clone(), &rw(profile)).unwrap();
        let report = vol.recovery_at_open().cloned().expect("recovered at open");
        assert_eq!(report.sectors_healed, 1, "slot {slot}: {report:?}");
        assert!(report.damaged.is_empty(), "slot {slot}: {report:?}");
        vol.close().unwrap();
        let vol = Volume::open(backend, &ro(profile)).unwrap();
        assert!(
            vol.check_metadata(0, geo.groups).unwrap().is_empty(),
            "slot {slot}"
        );
        assert!(failing_blocks(&vol, &format!("slot {slot}")).is_empty());
    }
    d.clear();
}

/// A two-member mirror set written with two rounds, closed.
fn written_mirror_set() -> (Vec<Arc<MemoryBackend>>, blockguard::format::Geometry) {
    use blockguard::blockguard_backend::Backend;
    let o = format_opts(Mode::Dual, Profile::Crc32c);
    let len = o.backing_len().unwrap();
    let m: Vec<Arc<MemoryBackend>> = (0..2)
        .map(|_| Arc::new(MemoryBackend::new(len).unwrap()))
        .collect();
    let dyns: Vec<Arc<dyn Backend>> = m.iter().map(|b| b.clone() as Arc<dyn Backend>).collect();
    let vol = Volume::format_members(dyns, &o).unwrap();
    write_two_rounds(&vol);
    let geo = *vol.geometry();
    vol.close().unwrap();
    (m, geo)
}

/// Scars the newest brother of pair 0 on one member, in block 4's tag.
fn scar_newest_on(member: &MemoryBackend, geo: &blockguard::format::Geometry) {
    use blockguard::blockguard_backend::Backend;
    let at = sector0(geo, 1, tag_at(4, 8) + 3) as u64;
    let mut byte = [0u8; 1];
    member.read_at(&mut byte, at).unwrap();
    member.write_at(&[byte[0] ^ 0x80], at).unwrap();
}

/// The members as the library opens them.
fn as_dyn(m: &[Arc<MemoryBackend>]) -> Vec<Arc<dyn blockguard::blockguard_backend::Backend>> {
    m.iter()
        .map(|b| b.clone() as Arc<dyn blockguard::blockguard_backend::Backend>)
        .collect()
}

/// Both members hold the same metadata of group 0 again, and the set checks and scrubs clean.
fn assert_members_agree_and_clean(m: &[Arc<MemoryBackend>], geo: &blockguard::format::Geometry, what: &str) {
    use blockguard::blockguard_backend::Backend;
    let meta = |b: &MemoryBackend| {
        let mut out = vec![0u8; 2 * BS as usize];
        b.read_at(&mut out, geo.meta_offset(0, 0)).unwrap();
        out
    };
    assert!(meta(&m[0]) == meta(&m[1]), "{what}: members differ");
    let vol = Volume::open_members(as_dyn(m), &ro(Profile::Crc32c)).unwrap();
    assert!(vol.check_metadata(0, geo.groups).unwrap().is_empty(), "{what}");
    assert!(scrub(&vol, false).is_clean(), "{what}");
}

/// A mirror set: a scar on one member costs no read (that member still serves every block
/// whose data matches), and a scrub counts that member's copies bad and rewrites its scarred
/// sector from the other member's intact one: the members hold the same metadata again.
#[test]
fn a_scar_on_one_mirror_member_is_repaired_from_the_other() {
    let (m, geo) = written_mirror_set();
    let dyns = || as_dyn(&m);
    for member in 0..2 {
        scar_newest_on(&m[member], &geo);
        let what = format!("scar on member {member}");
        let vol = Volume::open_members(dyns(), &OpenOptions::default()).unwrap();
        // Block 4 on the scarred member fails its tag there: read repair serves the other.
        assert!(failing_blocks(&vol, &what).is_empty(), "{what}");
        let report = scrub(&vol, true);
        assert_eq!(report.unrepaired(), 0, "{what}: {report:?}");
        vol.close().unwrap();
        // The scarred sector was rewritten from the other member.
        assert_members_agree_and_clean(&m, &geo, &what);
    }
}

/// A mirror set with one member's newest brother scarred on block 4's tag: a write into the
/// pair first repairs that member's sector from the other member, so the commit never copies
/// the hit tag to every member — block 4 still reads, on each member.
#[test]
fn a_write_on_a_mirror_set_never_spreads_one_members_scar() {
    let (m, geo) = written_mirror_set();
    let dyns = || as_dyn(&m);
    for member in 0..2 {
        scar_newest_on(&m[member], &geo);
        let what = format!("scar on member {member}");
        let vol = Volume::open_members(dyns(), &OpenOptions::default()).unwrap();
        vol.write_at(&content(9, 1), 9 * BS).unwrap();
        vol.flush().unwrap();
        vol.close().unwrap();
        assert_members_agree_and_clean(&m, &geo, &what);
        let vol = Volume::open_members(dyns(), &ro(Profile::Crc32c)).unwrap();
        assert!(failing_blocks(&vol, &what).is_empty(), "{what}");
    }
}
