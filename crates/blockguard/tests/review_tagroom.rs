//! Outside review of tag slots (`--tag-room`, `FormatOptions::tag_room`) and the re-tag across
//! tag sizes (c484286, a96a4d2). Findings are `bug_*` (they fail on the code they were found
//! on); the other tests are claims that held.

use blockguard::blockguard_backend::{Backend, FaultBackend, MemoryBackend};
use blockguard::format::{decode_sector, encode_sector, SectorId, SectorParse};
use blockguard::format::{tags_incompat, Retag, Superblock, INCOMPAT_RETAG, SB_REGION};
use blockguard::tag::{Tag, TagKey};
use blockguard::{Error, FormatOptions, Mode, OpenOptions, Profile, RetagOptions, Volume};
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;
use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;

const BS: usize = 4096;
/// Groups of 16 blocks: a re-tag of a few groups has a short I/O history.
const GB: u32 = 16;
const GROUPS: u64 = 4;
const SIZE: u64 = GROUPS * GB as u64 * BS as u64;

fn fmt(mode: Mode, profile: Profile, key: Option<TagKey>, room: Option<usize>) -> FormatOptions {
    let mut f = FormatOptions::with_size(SIZE);
    f.mode = mode;
    f.profile = profile;
    f.key = key;
    f.group_blocks = Some(GB);
    f.tag_room = room;
    if mode == Mode::Journal {
        f.journal_size = Some(1 << 20);
    }
    f
}

fn sync_opts() -> OpenOptions {
    OpenOptions {
        background_commit: false,
        stage_bytes: 3 * BS,
        cache_bytes: 2 * 2 * BS,
        dirty_clear_interval: Duration::from_secs(3600),
        ..OpenOptions::default()
    }
}

fn opts_with(k: Option<&TagKey>, rk: Option<&TagKey>) -> OpenOptions {
    OpenOptions {
        key: k.cloned(),
        retag_key: rk.cloned(),
        // Every re-tag away from a key here goes to crc32c: confirmed, as its owner would
        // (added after the review, with `OpenOptions::retag_to`).
        retag_to: Some(Profile::Crc32c),
        ..sync_opts()
    }
}

fn pattern(block: u64, version: u32) -> Vec<u8> {
    let mut b = vec![0u8; BS];
    for (i, x) in b.iter_mut().enumerate() {
        *x = (block as u8) ^ (version as u8).wrapping_mul(31) ^ (i as u8).wrapping_mul(7) ^ 0x5a;
    }
    b[..8].copy_from_slice(&block.to_le_bytes());
    b[8..12].copy_from_slice(&version.to_le_bytes());
    b
}

fn read_block(vol: &Volume, block: u64) -> blockguard::Result<Vec<u8>> {
    let mut b = vec![0u8; BS];
    vol.read_at(&mut b, block * BS as u64)?;
    Ok(b)
}

fn key(b: u8) -> TagKey {
    TagKey::from_bytes(&[b; 32]).unwrap()
}

/// Formats a volume on a fault backend and writes a few blocks in every group (flushed).
fn populated(
    mode: Mode,
    profile: Profile,
    k: Option<&TagKey>,
    room: Option<usize>,
) -> (Arc<FaultBackend>, Volume, BTreeMap<u64, Vec<u8>>) {
    let f = fmt(mode, profile, k.cloned(), room);
    let fb = Arc::new(FaultBackend::new(f.backing_len().unwrap()).unwrap());
    Volume::format(fb.clone(), &f).unwrap().close().unwrap();
    let vol = Volume::open(fb.clone(), &opts_with(k, None)).unwrap();
    let mut data = BTreeMap::new();
    for g in 0..GROUPS {
        for j in [0u64, 3, 15] {
            let b = g * GB as u64 + j;
            let d = pattern(b, 1);
            vol.write_at(&d, b * BS as u64).unwrap();
            data.insert(b, d);
        }
    }
    vol.flush().unwrap();
    (fb, vol, data)
}

/// Runs the re-tag `opts` asks for on `vol` and stops it after `after` steps (the cursor
/// recorded, the re-tag left in progress).
fn retag_stopped_after(vol: &Volume, opts: &RetagOptions<'_>, after: u32) {
    let stop = std::sync::atomic::AtomicBool::new(false);
    let o = RetagOptions {
        stop: Some(&stop),
        ..*opts
    };
    let mut n = 0;
    vol.retag(&o, &mut |_, _| {
        n += 1;
        if n == after {
            stop.store(true, std::sync::atomic::Ordering::Release);
        }
    })
    .unwrap();
}

fn steps(profile: Profile, k: Option<&TagKey>) -> RetagOptions<'_> {
    let mut o = RetagOptions::new(profile);
    o.key = k;
    o.step_bytes = 1;
    o.record_every = Duration::ZERO;
    o
}

fn all_read(vol: &Volume, data: &BTreeMap<u64, Vec<u8>>) -> Result<(), String> {
    for (&b, d) in data {
        match read_block(vol, b) {
            Ok(got) if &got == d => {}
            Ok(_) => return Err(format!("block {b}: WRONG DATA")),
            Err(e) => return Err(format!("block {b}: {e}")),
        }
    }
    Ok(())
}

fn check_clean(vol: &Volume) -> Result<(), String> {
    let total = GROUPS * GB as u64;
    let p = vol.check_blocks(0, total).map_err(|e| e.to_string())?;
    if !p.is_empty() {
        return Err(format!("check_blocks: {p:?}"));
    }
    let m = vol.check_metadata(0, GROUPS).map_err(|e| e.to_string())?;
    if !m.is_empty() {
        return Err(format!("check_metadata: {m:?}"));
    }
    Ok(())
}

/// The newest superblock of an image (copy 0 at 0, copy 1 at its backup offset).
fn superblock_of(img: &[u8]) -> Superblock {
    let (sb, _) = Superblock::decode(&img[..SB_REGION as usize]).unwrap();
    sb
}

/// Writes `sb` as both superblock copies of `backend` (an attacker with raw disk access).
fn put_superblocks(backend: &dyn Backend, sb: &Superblock) {
    backend.write_at(&sb.encode(0), 0).unwrap();
    backend
        .write_at(&sb.encode(1), sb.geometry.backup_sb_offset)
        .unwrap();
    backend.flush().unwrap();
}

/// `sb` relabelled as an unkeyed crc32c volume with no re-tag (same slots).
fn as_crc32c(sb: &Superblock) -> Superblock {
    let mut s = sb.clone();
    s.profile = Profile::Crc32c;
    s.key_check = [0; 32];
    s.retag = None;
    s.incompat &=
        !(INCOMPAT_RETAG | blockguard::format::INCOMPAT_TAG_PROFILE | blockguard::format::INCOMPAT_TAG_ROOM);
    s.incompat |= blockguard::format::profile_incompat(Profile::Crc32c, s.geometry.tag_size);
    s
}

/// The attacker writes `forged` at `block` with valid crc32c tags, using the library on the
/// raw image relabelled as crc32c, and then puts `final_sb` back as the superblocks.
fn forge_block_as_crc32c(img: Vec<u8>, block: u64, forged: &[u8], final_sb: &Superblock) -> Vec<u8> {
    let mb = Arc::new(MemoryBackend::from_vec(img));
    let sb = superblock_of(&mb.snapshot());
    put_superblocks(&*mb, &as_crc32c(&sb));
    let v = Volume::open(mb.clone(), &sync_opts()).unwrap();
    v.write_at(forged, block * BS as u64).unwrap();
    v.close().unwrap();
    put_superblocks(&*mb, final_sb);
    mb.snapshot()
}

// ---------------------------------------------------------------------------------------------
// G6: the re-tag seal
// ---------------------------------------------------------------------------------------------

/// G6: a keyed volume that once went keyed -> crc32c -> keyed again (same key: the operator's
/// one key file) carries a seal that is a pure function of (key, uuid, target). An attacker
/// who saw the superblock during the first re-tag replays "re-tag to crc32c, cursor 0" with
/// that seal: the owner opened with the right key and got data the attacker wrote with a
/// crc32c tag (finding 1). Fixed: a re-tag away from a key is refused at open unless the
/// opener confirms it (`OpenOptions::retag_to`, `--retag-to`), so the owner, who started
/// none, is told of it instead of reading the forgery.
#[test]
fn retag_seal_replayed_after_round_trip_is_refused_unconfirmed() {
    let k = key(7);
    let (fb, vol, data) = populated(Mode::Dual, Profile::Blake3Keyed, Some(&k), None);
    // Down to crc32c: one step, then a stop; the attacker reads the superblock.
    let stop = std::sync::atomic::AtomicBool::new(false);
    let mut o = steps(Profile::Crc32c, None);
    o.stop = Some(&stop);
    let mut n = 0;
    let rep = vol
        .retag(&o, &mut |_, _| {
            n += 1;
            if n == 2 {
                stop.store(true, std::sync::atomic::Ordering::Release);
            }
        })
        .unwrap();
    assert!(!rep.complete);
    let seen = superblock_of(&fb.live_image());
    let seal = seen.retag.expect("re-tag recorded").key_check;
    assert_ne!(seal, [0; 32]);
    let rep = vol.retag(&steps(Profile::Crc32c, None), &mut |_, _| {}).unwrap();
    assert!(rep.complete);
    // ... and back up to blake3-keyed with the same key.
    let rep = vol
        .retag(&steps(Profile::Blake3Keyed, Some(&k)), &mut |_, _| {})
        .unwrap();
    assert!(rep.complete);
    vol.close().unwrap();
    let now = superblock_of(&fb.live_image());
    assert_eq!(now.profile, Profile::Blake3Keyed);
    assert!(now.retag.is_none());

    // The attack: forge block 5 and replay the seal.
    let victim_block = 5u64;
    let forged = vec![0xEE; BS];
    let mut replay = now.clone();
    replay.retag = Some(Retag {
        target: Profile::Crc32c,
        cursor: 0,
        key_check: seal,
    });
    // Every feature bit as this build sets it (the tag-room bit for a target of
    // another tag size than the slots).
    replay.incompat |=
        INCOMPAT_RETAG | tags_incompat(replay.profile, replay.geometry.tag_size, replay.retag.as_ref());
    let img = forge_block_as_crc32c(fb.live_image(), victim_block, &forged, &replay);
    let mb = Arc::new(MemoryBackend::from_vec(img));
    // The owner opens with the key and nothing else: no re-tag is under way as far as they know.
    let owner = OpenOptions {
        retag_to: None,
        ..opts_with(Some(&k), None)
    };
    match Volume::open(mb, &owner) {
        Err(e) => {
            // Fixed after the review: a re-tag away from the key must be confirmed.
            assert!(
                matches!(
                    &e,
                    Error::Key {
                        problem: blockguard::tag::KeyError::RetagUnconfirmed { .. },
                        ..
                    }
                ),
                "{e}"
            );
            eprintln!("refused at open (held): {e}");
        }
        Ok(v) => {
            let got = read_block(&v, victim_block);
            let others = all_read(&v, &data);
            assert!(
                !matches!(&got, Ok(d) if *d == forged),
                "G6: the owner, opening with the right key, reads the attacker's block {victim_block} \
                 (replayed seal {:02x?}..; others: {others:?})",
                &seal[..4]
            );
        }
    }
}

/// G6: without a seal made by the key, a forged "re-tag to an unkeyed profile" is refused:
/// no seal, a random one, the key-check value itself, the seal of another target profile, and
/// the seal of another volume with the same key.
#[test]
fn forged_downgrade_records_are_refused() {
    let k = key(3);
    let (fb, vol, _data) = populated(Mode::Dual, Profile::Blake3Keyed, Some(&k), None);
    vol.close().unwrap();
    // Another volume with the same key, which did re-tag to crc32c: its seal.
    let (fb2, vol2, _) = populated(Mode::Dual, Profile::Blake3Keyed, Some(&k), None);
    let stop = std::sync::atomic::AtomicBool::new(true);
    let mut o = steps(Profile::Crc32c, None);
    o.stop = Some(&stop);
    vol2.retag(&o, &mut |_, _| {}).unwrap();
    let other_seal = superblock_of(&fb2.live_image()).retag.unwrap().key_check;
    vol2.close().unwrap();
    // This volume's seal for xxh3 (a legit re-tag to xxh3 started then abandoned? not possible:
    // compute it with the key, as only a holder could).
    let tagger = Profile::Blake3Keyed
        .tagger(&superblock_of(&fb.live_image()).uuid, Some(&k))
        .unwrap();
    let xxh3_seal = tagger.retag_seal(Profile::Xxh3).unwrap();
    let sb = superblock_of(&fb.live_image());
    let mut rng = ChaCha8Rng::seed_from_u64(11);
    let random: [u8; 32] = rng.random();
    for (what, seal) in [
        ("random", random),
        ("key check", sb.key_check),
        ("seal of xxh3", xxh3_seal),
        ("other volume's seal", other_seal),
    ] {
        let mut forged = sb.clone();
        forged.retag = Some(Retag {
            target: Profile::Crc32c,
            cursor: GROUPS,
            key_check: seal,
        });
        // Every feature bit as this build sets it (the tag-room bit for a target of
        // another tag size than the slots).
        forged.incompat |=
            INCOMPAT_RETAG | tags_incompat(forged.profile, forged.geometry.tag_size, forged.retag.as_ref());
        let mb = Arc::new(MemoryBackend::from_vec(fb.live_image()));
        put_superblocks(&*mb, &forged);
        for o in [
            opts_with(Some(&k), None),
            OpenOptions {
                read_only: true,
                ..opts_with(Some(&k), None)
            },
        ] {
            match Volume::open(mb.clone(), &o) {
                Err(Error::Key { .. }) => {}
                Err(e) => panic!("{what}: refused, but not as a key error: {e}"),
                Ok(_) => panic!("{what}: a forged downgrade record was accepted"),
            }
        }
    }
    // No seal at all is damage to the superblock (decode refuses it).
    let mut forged = sb.clone();
    forged.retag = Some(Retag {
        target: Profile::Crc32c,
        cursor: 0,
        key_check: [0; 32],
    });
    // Every feature bit as this build sets it (the tag-room bit for a target of
    // another tag size than the slots).
    forged.incompat |=
        INCOMPAT_RETAG | tags_incompat(forged.profile, forged.geometry.tag_size, forged.retag.as_ref());
    let mb = Arc::new(MemoryBackend::from_vec(fb.live_image()));
    put_superblocks(&*mb, &forged);
    assert!(Volume::open(mb, &opts_with(Some(&k), None)).is_err());
}

/// G6: after crc32c (room 32) -> blake3-keyed completes, an attacker relabels the volume as
/// "crc32c, re-tag to blake3-keyed at cursor 0" (the key check is public) and forges a block
/// with a crc32c tag: the owner's open with the key is refused (crc32c takes no key), it is
/// not silently accepted.
#[test]
fn rollback_of_finished_upgrade_is_not_opened_with_the_key() {
    let k = key(9);
    let (fb, vol, _data) = populated(Mode::Dual, Profile::Crc32c, None, Some(32));
    let rep = vol
        .retag(&steps(Profile::Blake3Keyed, Some(&k)), &mut |_, _| {})
        .unwrap();
    assert!(rep.complete);
    vol.close().unwrap();
    let sb = superblock_of(&fb.live_image());
    assert_eq!(sb.profile, Profile::Blake3Keyed);
    let mut rolled = as_crc32c(&sb);
    rolled.retag = Some(Retag {
        target: Profile::Blake3Keyed,
        cursor: 0,
        key_check: sb.key_check,
    });
    // Every feature bit as this build sets it (the tag-room bit for a target of
    // another tag size than the slots).
    rolled.incompat |=
        INCOMPAT_RETAG | tags_incompat(rolled.profile, rolled.geometry.tag_size, rolled.retag.as_ref());
    let forged = vec![0xAB; BS];
    let img = forge_block_as_crc32c(fb.live_image(), 2, &forged, &rolled);
    let mb = Arc::new(MemoryBackend::from_vec(img));
    let r = Volume::open(mb.clone(), &opts_with(Some(&k), None));
    assert!(
        r.is_err(),
        "the owner's usual open (key) accepted a crc32c volume"
    );
    // Also plain relabel without a re-tag record.
    let mb2 = Arc::new(MemoryBackend::from_vec(mb.snapshot()));
    put_superblocks(&*mb2, &as_crc32c(&sb));
    assert!(Volume::open(mb2, &opts_with(Some(&k), None)).is_err());
}

// ---------------------------------------------------------------------------------------------
// Slot padding
// ---------------------------------------------------------------------------------------------

/// Finds every metadata sector (offset, id) of group `g`, both slots.
fn sectors_of(sb: &Superblock, g: u64) -> Vec<(u64, SectorId)> {
    let geo = &sb.geometry;
    let mut v = Vec::new();
    for slot in 0..2usize {
        let base = geo.meta_offset(g, slot);
        for i in 0..geo.sectors_per_meta() {
            v.push((
                base + u64::from(i) * 512,
                SectorId {
                    group: g,
                    index: i,
                    slot: u8::try_from(slot).unwrap(),
                },
            ));
        }
    }
    v
}

/// G3: a bit set in the zero padding of a slot, with the sector's checksums made valid again
/// (a buggy or hostile writer), makes the block fail as a typed error naming it: never
/// accepted, never read as unwritten zeros.
#[test]
fn padding_bit_in_resealed_sector_is_reported() {
    for (mode, profile, room) in [
        (Mode::Dual, Profile::Crc32c, 32),
        (Mode::Journal, Profile::Xxh3, 16),
        (Mode::Rebuild, Profile::Sha256, 32),
        (Mode::Dual, Profile::T10Dif, 16),
    ] {
        let (fb, vol, data) = populated(mode, profile, None, Some(room));
        vol.close().unwrap();
        let mut img = fb.live_image();
        let sb = superblock_of(&img);
        let ts = sb.geometry.tag_size as usize;
        assert_eq!(ts, room);
        let tsize = profile.tag_size();
        let block = GB as u64 + 3; // group 1, index 3
        let mut patched = 0;
        for (off, id) in sectors_of(&sb, 1) {
            let o = off as usize;
            let sector = img[o..o + 512].to_vec();
            let count = (496 / ts).min(GB as usize);
            let SectorParse::Valid { generation, .. } = decode_sector(&sector, &sb.uuid, id, count, ts)
            else {
                continue;
            };
            if id.index != 0 {
                continue;
            }
            let mut tags = sector[16..16 + count * ts].to_vec();
            let slot = &mut tags[3 * ts..4 * ts];
            if slot.iter().all(|&b| b == 0) {
                continue;
            }
            assert!(slot[tsize..].iter().all(|&b| b == 0), "padding not zero on disk");
            slot[ts - 1] ^= 0x40;
            let mut out = vec![0u8; 512];
            encode_sector(&mut out, &sb.uuid, id, generation, &tags);
            img[o..o + 512].copy_from_slice(&out);
            patched += 1;
        }
        assert!(patched > 0, "{mode:?}: found no sector to patch");
        let mb = Arc::new(MemoryBackend::from_vec(img));
        let vol = Volume::open(mb, &sync_opts()).unwrap();
        match read_block(&vol, block) {
            Err(Error::Corrupt { block: b, .. }) => assert_eq!(b, block, "{mode:?}"),
            Err(e) => panic!("{mode:?} {profile}: not a typed corruption error: {e}"),
            Ok(d) => panic!(
                "{mode:?} {profile}: a slot with nonzero padding was accepted (data {})",
                if d == data[&block] { "right" } else { "WRONG" }
            ),
        }
        let p = vol.check_blocks(0, GROUPS * GB as u64).unwrap();
        assert!(
            p.iter().any(|p| p.block == block),
            "{mode:?}: check missed it: {p:?}"
        );
        // The neighbours are fine.
        let mut rest = data.clone();
        rest.remove(&block);
        all_read(&vol, &rest).unwrap_or_else(|e| panic!("{mode:?}: {e}"));
        // A re-tag does not launder it.
        let target = if profile == Profile::Crc32c {
            Profile::Blake3
        } else {
            Profile::Crc32c
        };
        let rep = vol.retag(&steps(target, None), &mut |_, _| {}).unwrap();
        assert!(
            rep.bad_blocks.iter().any(|p| p.block == block),
            "{mode:?}: {rep:?}"
        );
        assert!(
            read_block(&vol, block).is_err(),
            "{mode:?}: laundered by the re-tag"
        );
        vol.close().unwrap();
    }
}

/// G3: random bit flips anywhere in the padding of written slots of a wide-slot volume (not
/// resealed: bit rot) never give wrong data or zeros for a written block.
#[test]
fn padding_bit_rot_never_wrong_data() {
    let seed: u64 = rand::random();
    eprintln!("padding_bit_rot_never_wrong_data seed {seed}");
    let mut rng = ChaCha8Rng::seed_from_u64(seed);
    for round in 0..12 {
        let mode = [Mode::Dual, Mode::Journal, Mode::Rebuild][round % 3];
        let (fb, vol, data) = populated(mode, Profile::Crc32c, None, Some(32));
        vol.close().unwrap();
        let sb = superblock_of(&fb.live_image());
        let g = rng.random_range(0..GROUPS);
        let secs = sectors_of(&sb, g);
        let (off, _) = secs[rng.random_range(0..secs.len())];
        // A padding byte of a random slot.
        let slot = rng.random_range(0..14u64);
        let at = off + 16 + slot * 32 + rng.random_range(8..32);
        fb.flip_bit(at, rng.random_range(0..8)).unwrap();
        let vol = match Volume::open(fb.clone(), &sync_opts()) {
            Ok(v) => v,
            Err(e) => panic!("seed {seed} round {round}: open: {e}"),
        };
        for (&b, d) in &data {
            match read_block(&vol, b) {
                Ok(got) => assert!(
                    &got == d,
                    "seed {seed} round {round} {mode:?}: block {b} WRONG DATA"
                ),
                Err(Error::Corrupt { block, .. }) => assert_eq!(block, b),
                Err(e) => eprintln!("round {round} block {b}: {e}"),
            }
        }
        vol.close().unwrap();
    }
}

// ---------------------------------------------------------------------------------------------
// DIX
// ---------------------------------------------------------------------------------------------

/// DIX on wide slots: tuples are slot-wide; a short tuple buffer, nonzero padding in a tuple,
/// or a tuple of another profile are refused without a panic; a good one round-trips.
#[test]
fn dix_tuples_are_slot_wide_and_padding_is_checked() {
    let (_fb, vol, _data) = populated(Mode::Dual, Profile::Crc32c, None, Some(32));
    assert_eq!(vol.pi_size(), 32);
    let data = pattern(40, 9);
    let tagger = vol.tagger_for(40);
    let tag = tagger.generate(40, &data);
    let mut pi = vec![0u8; 32];
    pi[..8].copy_from_slice(tag.as_bytes());
    // Profile-sized tuples: refused (size).
    assert!(vol.write_with_pi(&data, &pi[..8], 40 * BS as u64).is_err());
    // Nonzero padding: refused.
    for at in [8usize, 20, 31] {
        let mut bad = pi.clone();
        bad[at] = 1;
        let r = vol.write_with_pi(&data, &bad, 40 * BS as u64);
        assert!(r.is_err(), "padding byte {at} nonzero accepted");
    }
    // A blake3 (16-byte) tuple of the same data: not this volume's profile.
    let b3 = Profile::Blake3
        .tagger(&vol.superblock().uuid, None)
        .unwrap()
        .generate(40, &data);
    let mut other = vec![0u8; 32];
    other[..16].copy_from_slice(b3.as_bytes());
    assert!(vol.write_with_pi(&data, &other, 40 * BS as u64).is_err());
    // Long buffer, empty buffer.
    assert!(vol.write_with_pi(&data, &[0u8; 64], 40 * BS as u64).is_err());
    assert!(vol.write_with_pi(&data, &[], 40 * BS as u64).is_err());
    let mut d = vec![0u8; BS];
    assert!(vol.read_with_pi(&mut d, &mut [0u8; 8], 40 * BS as u64).is_err());
    // The good one.
    vol.write_with_pi(&data, &pi, 40 * BS as u64).unwrap();
    let mut back = vec![0u8; BS];
    let mut bpi = vec![0xFFu8; 32];
    let made = vol.read_with_pi(&mut back, &mut bpi, 40 * BS as u64).unwrap();
    assert_eq!(back, data);
    assert_eq!(bpi, pi);
    assert_eq!(made.profile(40), Profile::Crc32c);
    // The block verifies with the slot's tuple, not with a padded tag.
    assert!(made.tagger(40).verify(40, &back, &Tag::from_bytes(&bpi)));
}

/// DIX during a cross-size re-tag: blocks behind the cursor get 32-byte blake3-keyed tuples,
/// the others 8-byte crc32c tuples padded to 32; each verifies with the profile named; a
/// crc32c tuple is refused behind the cursor.
#[test]
fn dix_during_cross_size_retag() {
    let k = key(4);
    let (_fb, vol, data) = populated(Mode::Journal, Profile::Crc32c, None, Some(32));
    retag_stopped_after(&vol, &steps(Profile::Blake3Keyed, Some(&k)), 3);
    let st = vol.retag_status().unwrap();
    assert!(st.cursor > 0 && st.cursor < GROUPS, "{st:?}");
    let blocks = GROUPS * GB as u64;
    let mut d = vec![0u8; blocks as usize * BS];
    let mut pi = vec![0u8; blocks as usize * 32];
    let made = vol.read_with_pi(&mut d, &mut pi, 0).unwrap();
    for b in 0..blocks {
        let tuple = &pi[b as usize * 32..(b as usize + 1) * 32];
        let chunk = &d[b as usize * BS..(b as usize + 1) * BS];
        if let Some(x) = data.get(&b) {
            assert_eq!(chunk, &x[..]);
            let p = made.profile(b);
            let want = if b / GB as u64 >= st.cursor {
                Profile::Crc32c
            } else {
                Profile::Blake3Keyed
            };
            assert_eq!(p, want, "block {b}");
            assert!(
                made.tagger(b).verify(b, chunk, &Tag::from_bytes(tuple)),
                "block {b}"
            );
            if p == Profile::Crc32c {
                assert!(tuple[8..].iter().all(|&x| x == 0));
            }
        } else {
            assert!(tuple.iter().all(|&x| x == 0));
        }
    }
    // A crc32c tuple for a block behind the cursor is accepted as a check of the data (a tuple
    // computed before a step passed), but the block is stored with the target's tag.
    let crc = Profile::Crc32c.tagger(&vol.superblock().uuid, None).unwrap();
    let nd = pattern(1, 5);
    let mut t = vec![0u8; 32];
    t[..8].copy_from_slice(crc.generate(1, &nd).as_bytes());
    vol.write_with_pi(&nd, &t, BS as u64).unwrap();
    let mut bad = t.clone();
    bad[30] = 1;
    assert!(
        vol.write_with_pi(&nd, &bad, BS as u64).is_err(),
        "padding nonzero accepted"
    );
    let (mut back, mut bpi) = (vec![0u8; BS], vec![0u8; 32]);
    let made = vol.read_with_pi(&mut back, &mut bpi, BS as u64).unwrap();
    assert_eq!(back, nd);
    assert_eq!(made.profile(1), Profile::Blake3Keyed);
    assert!(made.tagger(1).verify(1, &back, &Tag::from_bytes(&bpi)));
}

// ---------------------------------------------------------------------------------------------
// Crashes during a re-tag across tag sizes
// ---------------------------------------------------------------------------------------------

/// One version of a block written during the run, and the event count once a flush after it
/// completed (the write is acknowledged-and-flushed from that history point on).
#[derive(Clone)]
struct Version {
    data: Vec<u8>,
    flushed_at: Option<usize>,
}

/// Which versions a read of each block may return after a crash at history point `n`: the
/// newest version flushed by `n`, or any later one.
fn allowed_at(history: &BTreeMap<u64, Vec<Version>>, n: usize) -> BTreeMap<u64, Vec<Vec<u8>>> {
    history
        .iter()
        .map(|(&b, vs)| {
            let from = vs
                .iter()
                .rposition(|v| v.flushed_at.is_some_and(|f| f <= n))
                .unwrap_or(0);
            (b, vs[from..].iter().map(|v| v.data.clone()).collect())
        })
        .collect()
}

/// Blocks whose data on `image` is torn: a 512-byte mix of allowed versions that is none of
/// them. Such a block may fail verification in `dual` mode and read back torn in `rebuild`
/// mode (docs/CONSISTENCY.md); no other may.
fn torn_blocks(image: &[u8], allowed: &BTreeMap<u64, Vec<Vec<u8>>>) -> BTreeMap<u64, Vec<u8>> {
    let sb = superblock_of(image);
    let mut torn = BTreeMap::new();
    for (&b, vs) in allowed {
        let at = usize::try_from(sb.geometry.data_offset(b)).unwrap();
        let raw = &image[at..at + BS];
        if vs.iter().any(|v| v == raw) {
            continue;
        }
        let mix = (0..BS / 512).all(|s| {
            vs.iter()
                .any(|v| v[s * 512..(s + 1) * 512] == raw[s * 512..(s + 1) * 512])
        });
        if mix {
            torn.insert(b, raw.to_vec());
        }
    }
    torn
}

fn check_allowed(
    vol: &Volume,
    allowed: &BTreeMap<u64, Vec<Vec<u8>>>,
    torn: &BTreeMap<u64, Vec<u8>>,
) -> Result<(), String> {
    for (&b, vs) in allowed {
        match read_block(vol, b) {
            Ok(got) if vs.contains(&got) => {}
            Ok(got) if torn.get(&b) == Some(&got) && vol.superblock().mode == Mode::Rebuild => {}
            Err(Error::Corrupt { block, .. })
                if block == b && torn.contains_key(&b) && vol.superblock().mode == Mode::Dual => {}
            Ok(got) if got.iter().all(|&x| x == 0) => return Err(format!("block {b}: reads as ZEROS")),
            Ok(_) => {
                return Err(format!(
                    "block {b}: WRONG DATA (torn on disk: {})",
                    torn.contains_key(&b)
                ))
            }
            Err(e) => {
                return Err(format!(
                    "block {b}: {e} (torn on disk: {})",
                    torn.contains_key(&b)
                ))
            }
        }
    }
    Ok(())
}

/// Opens with the first of `candidates` the volume accepts (before, during or after the
/// re-tag the keys differ).
fn open_any(backend: Arc<dyn Backend>, candidates: &[OpenOptions]) -> Result<Volume, String> {
    let mut errs = Vec::new();
    for o in candidates {
        match Volume::open(backend.clone(), o) {
            Ok(v) => return Ok(v),
            Err(e) => errs.push(e.to_string()),
        }
    }
    Err(errs.join(" | "))
}

struct Case {
    mode: Mode,
    from: Profile,
    from_key: Option<TagKey>,
    to: Profile,
    to_key: Option<TagKey>,
    room: Option<usize>,
}

fn cases() -> Vec<Case> {
    if std::env::var("REVIEW_CONTROL").is_ok() {
        return vec![
            Case {
                mode: Mode::Dual,
                from: Profile::Crc32c,
                from_key: None,
                to: Profile::Xxh3,
                to_key: None,
                room: None,
            },
            Case {
                mode: Mode::Dual,
                from: Profile::Blake3,
                from_key: None,
                to: Profile::Sha256,
                to_key: None,
                room: None,
            },
            Case {
                mode: Mode::Rebuild,
                from: Profile::Xxh3,
                from_key: None,
                to: Profile::Crc32c,
                to_key: None,
                room: None,
            },
        ];
    }
    vec![
        Case {
            mode: Mode::Dual,
            from: Profile::Crc32c,
            from_key: None,
            to: Profile::Blake3Keyed,
            to_key: Some(key(1)),
            room: Some(32),
        },
        Case {
            mode: Mode::Journal,
            from: Profile::HmacSha256,
            from_key: Some(key(2)),
            to: Profile::Crc32c,
            to_key: None,
            room: None,
        },
        Case {
            mode: Mode::Rebuild,
            from: Profile::Xxh3,
            from_key: None,
            to: Profile::Sha256,
            to_key: None,
            room: Some(16),
        },
        Case {
            mode: Mode::Journal,
            from: Profile::T10Dif,
            from_key: None,
            to: Profile::HmacSha256,
            to_key: Some(key(5)),
            room: Some(32),
        },
        Case {
            mode: Mode::Dual,
            from: Profile::Blake3,
            from_key: None,
            to: Profile::Crc64Nvme,
            to_key: None,
            room: Some(32),
        },
    ]
}

/// Runs the re-tag of `c` on a populated volume with a client writing (and sometimes
/// flushing) a new version of one block per group between steps. Returns the backend (its
/// history starts at the re-tag) and every version of every block.
fn retag_with_client(c: &Case, seed: u64) -> (Arc<FaultBackend>, BTreeMap<u64, Vec<Version>>) {
    let mut rng = ChaCha8Rng::seed_from_u64(seed);
    let (fb, vol, data) = populated(c.mode, c.from, c.from_key.as_ref(), c.room);
    let mut history: BTreeMap<u64, Vec<Version>> = data
        .into_iter()
        .map(|(b, d)| {
            (
                b,
                vec![Version {
                    data: d,
                    flushed_at: Some(0),
                }],
            )
        })
        .collect();
    fb.forget_history();
    let mut version = 2u32;
    let mut pending: Vec<u64> = Vec::new();
    let mut client = |vol: &Volume, history: &mut BTreeMap<u64, Vec<Version>>| {
        for _ in 0..2 {
            let b = rng.random_range(0..GROUPS * GB as u64);
            let d = pattern(b, version);
            version += 1;
            vol.write_at(&d, b * BS as u64).unwrap();
            // A block first written now may read as never written until a flush.
            history
                .entry(b)
                .or_insert_with(|| {
                    vec![Version {
                        data: vec![0; BS],
                        flushed_at: Some(0),
                    }]
                })
                .push(Version {
                    data: d,
                    flushed_at: None,
                });
            pending.push(b);
        }
        if rng.random_bool(0.5) {
            vol.flush().unwrap();
            let at = fb.events().len();
            for b in pending.drain(..) {
                for v in history.get_mut(&b).unwrap().iter_mut() {
                    v.flushed_at.get_or_insert(at);
                }
            }
        }
    };
    let vol_ref = &vol;
    let hist = std::cell::RefCell::new(&mut history);
    let rep = vol
        .retag(&steps(c.to, c.to_key.as_ref()), &mut |_, _| {
            client(vol_ref, &mut hist.borrow_mut());
        })
        .unwrap();
    assert!(rep.complete && rep.bad_blocks.is_empty(), "{rep:?}");
    client(vol_ref, &mut hist.borrow_mut());
    vol.flush().unwrap();
    let at = fb.events().len();
    for vs in history.values_mut() {
        for v in vs.iter_mut() {
            v.flushed_at.get_or_insert(at);
        }
    }
    vol.close().unwrap();
    (fb, history)
}

fn candidates(c: &Case) -> Vec<OpenOptions> {
    vec![
        opts_with(c.from_key.as_ref(), c.to_key.as_ref()),
        opts_with(c.from_key.as_ref(), None),
        opts_with(c.to_key.as_ref(), None),
    ]
}

/// After a crash image: opens, every block reads an allowed version, resumes the re-tag (to
/// the end), every block still reads, and the check is clean (torn blocks aside).
fn after_crash(
    c: &Case,
    image: Vec<u8>,
    allowed: &BTreeMap<u64, Vec<Vec<u8>>>,
    ctx: &str,
) -> Result<(), String> {
    let torn = torn_blocks(&image, allowed);
    let mb = Arc::new(MemoryBackend::from_vec(image));
    let vol = open_any(mb, &candidates(c)).map_err(|e| format!("{ctx}: open: {e}"))?;
    check_allowed(&vol, allowed, &torn).map_err(|e| format!("{ctx}: {e}"))?;
    if vol.profile() != c.to {
        let r = vol
            .retag(&steps(c.to, c.to_key.as_ref()), &mut |_, _| {})
            .map_err(|e| format!("{ctx}: resume: {e}"))?;
        if !r.complete || r.bad_blocks.iter().any(|p| !torn.contains_key(&p.block)) || !r.damaged.is_empty() {
            return Err(format!("{ctx}: resume: {r:?}"));
        }
    }
    check_allowed(&vol, allowed, &torn).map_err(|e| format!("{ctx}: after resume: {e}"))?;
    let p = vol
        .check_blocks(0, GROUPS * GB as u64)
        .map_err(|e| format!("{ctx}: {e}"))?;
    if p.iter().any(|p| !torn.contains_key(&p.block)) {
        return Err(format!("{ctx}: check_blocks: {p:?}"));
    }
    let m = vol.check_metadata(0, GROUPS).map_err(|e| format!("{ctx}: {e}"))?;
    if !m.is_empty() {
        return Err(format!("{ctx}: check_metadata: {m:?}"));
    }
    vol.close().map_err(|e| format!("{ctx}: close: {e}"))?;
    Ok(())
}

/// G1/G2 across tag sizes: a crash at every history point of a re-tag (dual, journal,
/// rebuild; up, down, keyed and not), with a client writing and flushing between steps; crash
/// images sampled, some torn at 512 bytes.
#[test]
fn crash_at_every_point_of_cross_size_retag_with_client() {
    let seed: u64 = rand::random();
    eprintln!("crash_at_every_point_of_cross_size_retag_with_client seed {seed}");
    let mut rng = ChaCha8Rng::seed_from_u64(seed);
    let mut failures = Vec::new();
    for (ci, c) in cases().iter().enumerate() {
        let (fb, history) = retag_with_client(c, seed ^ ci as u64);
        let mut points = Vec::new();
        fb.for_each_history_point(|n, st| {
            // Every crash image where there are few (all orders of the unflushed writes that
            // matter), else a sample; and a torn sample.
            let mut all = Vec::new();
            if st.for_each_crash_image(8, |img| all.push(img)).is_ok() {
                points.extend(all.into_iter().map(|img| (n, false, img)));
            } else {
                points.push((n, false, st.random_crash_image(&mut rng, false)));
            }
            points.push((n, true, st.random_crash_image(&mut rng, true)));
        });
        for (n, torn, image) in points {
            let ctx = format!(
                "seed {seed} {:?} {} -> {} (room {:?}) point {n} torn {torn}",
                c.mode, c.from, c.to, c.room
            );
            if let Err(e) = after_crash(c, image, &allowed_at(&history, n), &ctx) {
                failures.push(e);
            }
        }
    }
    assert!(
        failures.is_empty(),
        "{} failures:\n{}",
        failures.len(),
        failures.join("\n")
    );
}

/// A second crash, anywhere during the recovery and the resumed re-tag after a first crash
/// anywhere (sampled), across tag sizes.
#[test]
fn second_crash_during_resumed_cross_size_retag() {
    let seed: u64 = rand::random();
    eprintln!("second_crash_during_resumed_cross_size_retag seed {seed}");
    let mut rng = ChaCha8Rng::seed_from_u64(seed);
    let mut failures = Vec::new();
    for (ci, c) in cases().iter().enumerate() {
        let (fb, history) = retag_with_client(c, seed ^ (ci as u64) << 8);
        let mut points = Vec::new();
        fb.for_each_history_point(|n, st| points.push((n, st.random_crash_image(&mut rng, true))));
        // A few first-crash points.
        for _ in 0..4 {
            let (n, image) = points[rng.random_range(0..points.len())].clone();
            let allowed = allowed_at(&history, n);
            let ctx = format!("seed {seed} {:?} {} -> {} point {n}", c.mode, c.from, c.to);
            let fb2 = Arc::new(FaultBackend::from_image(image));
            let vol = match open_any(fb2.clone(), &candidates(c)) {
                Ok(v) => v,
                Err(e) => {
                    failures.push(format!("{ctx}: open: {e}"));
                    continue;
                }
            };
            // The history of fb2 starts at the image: the recovery at open is in it too.
            if vol.profile() != c.to {
                if let Err(e) = vol.retag(&steps(c.to, c.to_key.as_ref()), &mut |_, _| {}) {
                    failures.push(format!("{ctx}: resume: {e}"));
                    continue;
                }
            }
            vol.close().unwrap();
            fb2.for_each_history_point(|m, st| {
                let img = st.random_crash_image(&mut rng, true);
                if let Err(e) = after_crash(c, img, &allowed, &format!("{ctx} then {m}")) {
                    failures.push(e);
                }
            });
        }
    }
    assert!(
        failures.is_empty(),
        "{} failures:\n{}",
        failures.len(),
        failures.join("\n")
    );
}

// ---------------------------------------------------------------------------------------------
// Mirror sets and split volumes across tag sizes
// ---------------------------------------------------------------------------------------------

fn mirror_set(
    n: usize,
    profile: Profile,
    k: Option<&TagKey>,
    room: Option<usize>,
) -> (Vec<Arc<FaultBackend>>, Volume, BTreeMap<u64, Vec<u8>>) {
    let f = fmt(Mode::Dual, profile, k.cloned(), room);
    let len = f.backing_len().unwrap();
    let fbs: Vec<Arc<FaultBackend>> = (0..n)
        .map(|_| Arc::new(FaultBackend::new(len).unwrap()))
        .collect();
    let dyns: Vec<Arc<dyn Backend>> = fbs.iter().map(|b| b.clone() as Arc<dyn Backend>).collect();
    let vol = Volume::format_members(dyns, &f).unwrap();
    let mut data = BTreeMap::new();
    for b in [0u64, 7, 16, 33, 50, 63] {
        let d = pattern(b, 4);
        vol.write_at(&d, b * BS as u64).unwrap();
        data.insert(b, d);
    }
    vol.flush().unwrap();
    vol.close().unwrap();
    let dyns: Vec<Arc<dyn Backend>> = fbs.iter().map(|b| b.clone() as Arc<dyn Backend>).collect();
    let vol = Volume::open_members(dyns, &opts_with(k, None)).unwrap();
    (fbs, vol, data)
}

/// A mirror set in 32-byte slots re-tagged crc32c -> blake3-keyed with one copy of a block
/// damaged: the copy is repaired from the good one before its re-tag, every copy agrees after,
/// `add_member` is refused during the re-tag and works after, and the set re-tags back down
/// to crc32c (sealed) and reopens without a key.
#[test]
fn mirror_set_retags_across_sizes_and_grows() {
    let k = key(6);
    let (fbs, vol, data) = mirror_set(2, Profile::Crc32c, None, Some(32));
    // Damage member 1's copy of block 33 (data).
    let geo = *vol.geometry();
    fbs[1].flip_bit(geo.data_offset(33) + 77, 3).unwrap();
    let stop = std::sync::atomic::AtomicBool::new(false);
    let mut o = steps(Profile::Blake3Keyed, Some(&k));
    o.stop = Some(&stop);
    let mut n = 0;
    let rep = vol
        .retag(&o, &mut |_, _| {
            n += 1;
            if n == 2 {
                stop.store(true, std::sync::atomic::Ordering::Release);
            }
        })
        .unwrap();
    assert!(!rep.complete);
    // Grow during the re-tag: refused, and the set is not harmed.
    let extra = Arc::new(FaultBackend::new(geo.backing_len).unwrap());
    let vol = match vol.add_member(extra.clone(), &mut |_, _| {}) {
        Err(e) => {
            eprintln!("add_member during re-tag refused (held): {e}");
            let dyns: Vec<Arc<dyn Backend>> = fbs.iter().map(|b| b.clone() as Arc<dyn Backend>).collect();
            Volume::open_members(dyns, &opts_with(None, Some(&k))).unwrap()
        }
        Ok(_) => panic!("add_member accepted during a re-tag"),
    };
    let rep = vol
        .retag(&steps(Profile::Blake3Keyed, Some(&k)), &mut |_, _| {})
        .unwrap();
    assert!(rep.complete && rep.bad_blocks.is_empty(), "{rep:?}");
    all_read(&vol, &data).unwrap();
    let c = vol.verify_copies(0, GROUPS * GB as u64, false).unwrap();
    assert!(c.bad.is_empty() && c.unrepairable.is_empty(), "{c:?}");
    // (Reopened with the new key first: see bug_add_member_after_retag_reopens_with_the_old_key.)
    vol.close().unwrap();
    let dyns: Vec<Arc<dyn Backend>> = fbs.iter().map(|b| b.clone() as Arc<dyn Backend>).collect();
    let vol = Volume::open_members(dyns, &opts_with(Some(&k), None)).unwrap();
    let (vol, r) = vol.add_member(extra.clone(), &mut |_, _| {}).unwrap();
    eprintln!("add_member: {r:?}");
    all_read(&vol, &data).unwrap();
    let c = vol.verify_copies(0, GROUPS * GB as u64, false).unwrap();
    assert!(c.bad.is_empty() && c.unrepairable.is_empty(), "{c:?}");
    // Down again, to crc32c: sealed; reopens without a key.
    let rep = vol.retag(&steps(Profile::Crc32c, None), &mut |_, _| {}).unwrap();
    assert!(rep.complete && rep.bad_blocks.is_empty(), "{rep:?}");
    vol.close().unwrap();
    let mut dyns: Vec<Arc<dyn Backend>> = fbs.iter().map(|b| b.clone() as Arc<dyn Backend>).collect();
    dyns.push(extra.clone());
    let vol = Volume::open_members(dyns, &sync_opts()).unwrap();
    assert_eq!(vol.profile(), Profile::Crc32c);
    all_read(&vol, &data).unwrap();
    let c = vol.verify_copies(0, GROUPS * GB as u64, false).unwrap();
    assert!(c.bad.is_empty() && c.unrepairable.is_empty(), "{c:?}");
    // Each member alone, too.
    vol.close().unwrap();
    for (i, m) in fbs
        .iter()
        .map(|b| b.clone() as Arc<dyn Backend>)
        .chain([extra as Arc<dyn Backend>])
        .enumerate()
    {
        let sb = superblock_of(&{
            let mut v = vec![0u8; SB_REGION as usize];
            m.read_at(&mut v, 0).unwrap();
            v
        });
        assert_eq!(sb.profile, Profile::Crc32c, "member {i}");
        assert_eq!(sb.geometry.tag_size, 32, "member {i}");
        assert!(sb.retag.is_none(), "member {i}");
    }
}

/// A split volume (metadata device) in 32-byte slots: crc32c -> blake3-keyed -> sha256, each
/// stopped halfway and resumed after a reopen, every block reads throughout.
#[test]
fn split_volume_retags_across_sizes() {
    let k = key(8);
    for mode in [Mode::Dual, Mode::Journal] {
        let f = fmt(mode, Profile::Crc32c, None, Some(32));
        let (dl, ml) = Volume::split_lengths(&f).unwrap();
        let data_dev = Arc::new(FaultBackend::new(dl).unwrap());
        let meta_dev = Arc::new(FaultBackend::new(ml).unwrap());
        Volume::format_split(data_dev.clone(), meta_dev.clone(), &f, "meta")
            .unwrap()
            .close()
            .unwrap();
        let vol = Volume::open_split(data_dev.clone(), meta_dev.clone(), &sync_opts()).unwrap();
        let mut data = BTreeMap::new();
        for b in [0u64, 5, 17, 40, 63] {
            let d = pattern(b, 3);
            vol.write_at(&d, b * BS as u64).unwrap();
            data.insert(b, d);
        }
        vol.flush().unwrap();
        let mut vol = vol;
        for (to, tk, from_key) in [
            (Profile::Blake3Keyed, Some(&k), None),
            (Profile::Sha256, None, Some(&k)),
        ] {
            retag_stopped_after(&vol, &steps(to, tk), 2);
            all_read(&vol, &data).unwrap();
            vol.close().unwrap();
            let o = OpenOptions {
                retag_to: Some(to),
                ..opts_with(from_key, tk)
            };
            vol = Volume::open_split(data_dev.clone(), meta_dev.clone(), &o).unwrap();
            all_read(&vol, &data).unwrap();
            let rep = vol.retag(&steps(to, tk), &mut |_, _| {}).unwrap();
            assert!(
                rep.complete && rep.bad_blocks.is_empty(),
                "{mode:?} {to}: {rep:?}"
            );
            vol.close().unwrap();
            vol = Volume::open_split(data_dev.clone(), meta_dev.clone(), &opts_with(tk, None)).unwrap();
            assert_eq!(vol.profile(), to);
            all_read(&vol, &data).unwrap();
            check_clean(&vol).unwrap_or_else(|e| panic!("{mode:?} {to}: {e}"));
        }
        vol.close().unwrap();
    }
}

/// Library: after an online re-tag that changes the key (crc32c -> blake3-keyed in 32-byte
/// slots, or blake3-keyed -> crc32c), `add_member` on the same open volume closes it, rewrites
/// every member's superblock to name the new copy, and then fails to reopen the set: it
/// reopens with the key given at the original open, which no longer fits the profile. The
/// caller is left with no volume and a set that names a copy never built (finding 4). Fixed:
/// the engine keeps the keys of the profiles in play and hands the new ones to its reopens.
#[test]
fn add_member_after_retag_reopens_with_the_new_key() {
    let k = key(12);
    for (from, fk, to, tk) in [
        (Profile::Crc32c, None, Profile::Blake3Keyed, Some(&k)),
        (Profile::Blake3Keyed, Some(&k), Profile::Crc32c, None),
    ] {
        let (fbs, vol, data) = mirror_set(2, from, fk, Some(32));
        let rep = vol.retag(&steps(to, tk), &mut |_, _| {}).unwrap();
        assert!(rep.complete);
        let extra = Arc::new(FaultBackend::new(vol.geometry().backing_len).unwrap());
        let r = vol.add_member(extra.clone(), &mut |_, _| {});
        let err = r.as_ref().err().map(|e| e.to_string());
        // What is left on disk: can the owner still open it?
        drop(r);
        let mut dyns: Vec<Arc<dyn Backend>> = fbs.iter().map(|b| b.clone() as Arc<dyn Backend>).collect();
        dyns.push(extra);
        let reopened = Volume::open_members(dyns, &opts_with(tk, None)).map(|v| {
            let ok = all_read(&v, &data);
            let copies = v.copies().len();
            v.close().unwrap();
            (ok, copies)
        });
        assert!(
            err.is_none(),
            "{from} -> {to}: add_member after the re-tag failed: {err:?} (reopened by hand: {reopened:?})"
        );
    }
}

// ---------------------------------------------------------------------------------------------
// Misdirected and lost writes during a cross-size re-tag
// ---------------------------------------------------------------------------------------------

/// G3/G4: the n-th write of a cross-size re-tag (crc32c -> blake3-keyed in 32-byte slots, and
/// hmac-sha256 -> crc32c) misdirected to another group's metadata, or lost: no block ever reads
/// wrong data or zeros; failures are typed errors naming the block; a reopen agrees.
#[test]
fn misdirected_or_lost_write_during_cross_size_retag() {
    let k = key(21);
    let cases = [
        (
            Mode::Dual,
            Profile::Crc32c,
            None,
            Profile::Blake3Keyed,
            Some(&k),
            Some(32),
        ),
        (
            Mode::Journal,
            Profile::HmacSha256,
            Some(&k),
            Profile::Crc32c,
            None,
            None,
        ),
    ];
    let mut typed = 0;
    for (mode, from, fk, to, tk, room) in cases {
        for lose in [false, true] {
            for n in 0..24usize {
                let (fb, vol, data) = populated(mode, from, fk, room);
                let geo = *vol.geometry();
                let seen = Arc::new(std::sync::atomic::AtomicUsize::new(0));
                let s2 = seen.clone();
                if lose {
                    fb.tear_writes_with(move |_, len| {
                        (s2.fetch_add(1, std::sync::atomic::Ordering::SeqCst) == n)
                            .then(|| vec![false; len.div_ceil(512)])
                    });
                } else {
                    let other = geo.meta_offset(GROUPS - 1, 1);
                    fb.misdirect_writes_with(move |off, _| {
                        (s2.fetch_add(1, std::sync::atomic::Ordering::SeqCst) == n && off != other)
                            .then_some(other)
                    });
                }
                let r = vol.retag(&steps(to, tk), &mut |_, _| {});
                fb.clear_faults();
                let ctx = format!(
                    "{mode:?} {from}->{to} lose {lose} n {n} ({:?})",
                    r.as_ref().map(|r| r.complete)
                );
                let check = |vol: &Volume, typed: &mut usize| {
                    for (&b, d) in &data {
                        match read_block(vol, b) {
                            Ok(got) => assert!(
                                &got == d,
                                "{ctx}: block {b}: WRONG DATA (zeros: {})",
                                got.iter().all(|&x| x == 0)
                            ),
                            Err(Error::Corrupt { block, .. }) => {
                                assert_eq!(block, b, "{ctx}");
                                *typed += 1;
                            }
                            Err(e) => eprintln!("{ctx}: block {b}: {e}"),
                        }
                    }
                };
                check(&vol, &mut typed);
                let _ = vol.close();
                for o in [opts_with(fk, tk), opts_with(tk, None), opts_with(fk, None)] {
                    if let Ok(v) = Volume::open(fb.clone(), &o) {
                        check(&v, &mut typed);
                        let _ = v.close();
                        break;
                    }
                }
            }
        }
    }
    eprintln!("typed errors seen: {typed}");
}

/// Stopping a cross-size re-tag and resuming it with no key, a wrong key, another target, or
/// a key where none belongs: refused (nothing written), and the right resume finishes.
#[test]
fn resume_of_cross_size_retag_refuses_wrong_keys_and_targets() {
    let (k, k2) = (key(31), key(32));
    // Up: crc32c (32-byte slots) -> blake3-keyed.
    let (fb, vol, data) = populated(Mode::Dual, Profile::Crc32c, None, Some(32));
    retag_stopped_after(&vol, &steps(Profile::Blake3Keyed, Some(&k)), 2);
    vol.close().unwrap();
    let before = fb.live_image();
    for (what, o) in [
        ("no key", opts_with(None, None)),
        ("wrong new key", opts_with(None, Some(&k2))),
        ("new key as the volume's", opts_with(Some(&k), None)),
        ("both", opts_with(Some(&k), Some(&k))),
    ] {
        for ro in [false, true] {
            let r = Volume::open(
                fb.clone(),
                &OpenOptions {
                    read_only: ro,
                    ..o.clone()
                },
            );
            assert!(r.is_err(), "up: {what} (read-only {ro}): opened");
        }
    }
    assert!(fb.live_image() == before, "a refused open wrote");
    let vol = Volume::open(fb.clone(), &opts_with(None, Some(&k))).unwrap();
    all_read(&vol, &data).unwrap();
    assert!(vol
        .retag(&steps(Profile::HmacSha256, Some(&k)), &mut |_, _| {})
        .is_err());
    assert!(vol
        .retag(&steps(Profile::Blake3Keyed, Some(&k2)), &mut |_, _| {})
        .is_err());
    assert!(vol.retag(&steps(Profile::Sha256, None), &mut |_, _| {}).is_err());
    let rep = vol
        .retag(&steps(Profile::Blake3Keyed, None), &mut |_, _| {})
        .unwrap();
    assert!(rep.complete && rep.bad_blocks.is_empty(), "{rep:?}");
    vol.close().unwrap();
    let vol = Volume::open(fb.clone(), &opts_with(Some(&k), None)).unwrap();
    check_clean(&vol).unwrap();
    all_read(&vol, &data).unwrap();

    // Down: blake3-keyed -> crc32c, stopped.
    retag_stopped_after(&vol, &steps(Profile::Crc32c, None), 3);
    assert!(vol.retag_status().is_some());
    vol.close().unwrap();
    for (what, o) in [
        ("no key", opts_with(None, None)),
        ("wrong key", opts_with(Some(&k2), None)),
        ("key as the new one", opts_with(None, Some(&k))),
        ("both", opts_with(Some(&k), Some(&k))),
    ] {
        assert!(Volume::open(fb.clone(), &o).is_err(), "down: {what}: opened");
    }
    let vol = Volume::open(fb.clone(), &opts_with(Some(&k), None)).unwrap();
    assert!(vol.retag(&steps(Profile::Xxh3, None), &mut |_, _| {}).is_err());
    assert!(vol
        .retag(&steps(Profile::Crc32c, Some(&k)), &mut |_, _| {})
        .is_err());
    let rep = vol.retag(&steps(Profile::Crc32c, None), &mut |_, _| {}).unwrap();
    assert!(rep.complete && rep.bad_blocks.is_empty(), "{rep:?}");
    vol.close().unwrap();
    let vol = Volume::open(fb.clone(), &sync_opts()).unwrap();
    assert_eq!(vol.profile(), Profile::Crc32c);
    assert_eq!(vol.geometry().tag_size, 32);
    check_clean(&vol).unwrap();
    all_read(&vol, &data).unwrap();
    vol.close().unwrap();
}

// ---------------------------------------------------------------------------------------------
// Superblock forgery, field by field
// ---------------------------------------------------------------------------------------------

/// Random, resealed combinations of the fields tag slots and the re-tag touch (profile, tag
/// size, the incompat bits 1, 5, 6, the key check, the re-tag target, cursor and key check) on
/// volumes mid re-tag across sizes: opening never panics, and an open volume never returns
/// wrong data or zeros for a written block (typed errors only).
#[test]
fn forged_superblock_fields_never_panic_or_give_wrong_data() {
    let seed: u64 = rand::random();
    eprintln!("forged_superblock_fields_never_panic_or_give_wrong_data seed {seed}");
    let mut rng = ChaCha8Rng::seed_from_u64(seed);
    let k = key(41);
    let mut bases = Vec::new();
    for (from, fk, to, tk) in [
        (Profile::Crc32c, None, Profile::Blake3Keyed, Some(&k)),
        (Profile::Blake3Keyed, Some(&k), Profile::Crc32c, None),
    ] {
        let (fb, vol, data) = populated(Mode::Dual, from, fk, Some(32));
        retag_stopped_after(&vol, &steps(to, tk), 2);
        vol.close().unwrap();
        bases.push((fb.live_image(), data));
    }
    let all = Profile::ALL;
    let mut opened = 0;
    for i in 0..600 {
        let (img, data) = &bases[i % 2];
        let mut b = img[..512].to_vec();
        let n_mut = rng.random_range(1..4);
        for _ in 0..n_mut {
            match rng.random_range(0..7) {
                0 => b[56..58].copy_from_slice(&all[rng.random_range(0..all.len())].id().to_le_bytes()),
                1 => b[58..60].copy_from_slice(&[8u16, 16, 32][rng.random_range(0..3)].to_le_bytes()),
                2 => b[32] ^= [2u8, 32, 64][rng.random_range(0..3)],
                3 => {
                    let id = if rng.random_bool(0.2) {
                        0
                    } else {
                        all[rng.random_range(0..all.len())].id()
                    };
                    b[336..338].copy_from_slice(&id.to_le_bytes());
                }
                4 => b[344..352]
                    .copy_from_slice(&[0u64, 1, 2, 3, 4, 5, u64::MAX][rng.random_range(0..7)].to_le_bytes()),
                5 => {
                    // The key check and the re-tag key check swapped, zeroed or random.
                    match rng.random_range(0..3) {
                        0 => {
                            let (a, c) = (b[296..328].to_vec(), b[352..384].to_vec());
                            b[296..328].copy_from_slice(&c);
                            b[352..384].copy_from_slice(&a);
                        }
                        1 => b[352..384].fill(0),
                        _ => rng.fill(&mut b[352..384]),
                    }
                }
                _ => b[296..328].fill(0),
            }
        }
        let crc = crc32c::crc32c(&b[..508]);
        b[508..512].copy_from_slice(&crc.to_le_bytes());
        let mut image = img.clone();
        image[..512].copy_from_slice(&b);
        let backup = superblock_of(img).geometry.backup_sb_offset as usize;
        image[backup..backup + 512].copy_from_slice(&b);
        // The backup copy carries copy index 1.
        image[backup + 65] = 1;
        let crc = crc32c::crc32c(&image[backup..backup + 508]);
        image[backup + 508..backup + 512].copy_from_slice(&crc.to_le_bytes());
        for o in [
            opts_with(None, None),
            opts_with(Some(&k), None),
            opts_with(None, Some(&k)),
            opts_with(Some(&k), Some(&k)),
        ] {
            let mb = Arc::new(MemoryBackend::from_vec(image.clone()));
            let r = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
                let Ok(vol) = Volume::open(mb.clone(), &o) else {
                    return None;
                };
                let mut bad = None;
                for (&blk, d) in data {
                    match read_block(&vol, blk) {
                        Ok(got) if &got == d => {}
                        Ok(got) => {
                            bad = Some(format!(
                                "block {blk}: WRONG DATA (zeros: {})",
                                got.iter().all(|&x| x == 0)
                            ))
                        }
                        Err(_) => {}
                    }
                }
                drop(vol);
                Some(bad)
            }));
            match r {
                Err(_) => panic!("seed {seed} sample {i}: open/read panicked"),
                Ok(Some(Some(bad))) => panic!(
                    "seed {seed} sample {i}: {bad}; sb {:?}",
                    Superblock::decode(&b).map(|s| (
                        s.0.profile,
                        s.0.geometry.tag_size,
                        s.0.retag.map(|r| (r.target, r.cursor))
                    ))
                ),
                Ok(Some(None)) => opened += 1,
                Ok(None) => {}
            }
        }
    }
    eprintln!("opened {opened} forged superblocks");
}

/// A mirror set in 32-byte slots with a bit flipped in the padding of one copy's slot (body
/// scar): reads return the good copy's data, `verify_copies` names the bad copy and repairs it,
/// and afterwards every copy is clean; then a re-tag down to 16-byte tags keeps them clean.
#[test]
fn mirror_padding_damage_is_repaired_from_the_good_copy() {
    let (fbs, vol, data) = mirror_set(2, Profile::Crc32c, None, Some(32));
    let geo = *vol.geometry();
    vol.close().unwrap();
    // Block 16 is group 1, index 0: its tag in slot 0, sector 0, bytes 16..48.
    fbs[1].flip_bit(geo.meta_offset(1, 0) + 16 + 21, 5).unwrap();
    let dyns: Vec<Arc<dyn Backend>> = fbs.iter().map(|b| b.clone() as Arc<dyn Backend>).collect();
    let vol = Volume::open_members(dyns, &sync_opts()).unwrap();
    all_read(&vol, &data).unwrap();
    let c = vol.verify_copies(0, GROUPS * GB as u64, false).unwrap();
    assert!(c.bad.contains(&(1, 16)), "{c:?}");
    let c = vol.verify_copies(0, GROUPS * GB as u64, true).unwrap();
    assert!(c.repaired >= 1 && c.unrepairable.is_empty(), "{c:?}");
    let c = vol.verify_copies(0, GROUPS * GB as u64, false).unwrap();
    assert!(c.bad.is_empty(), "{c:?}");
    let rep = vol.retag(&steps(Profile::Blake3, None), &mut |_, _| {}).unwrap();
    assert!(rep.complete && rep.bad_blocks.is_empty(), "{rep:?}");
    let c = vol.verify_copies(0, GROUPS * GB as u64, false).unwrap();
    assert!(c.bad.is_empty() && c.unrepairable.is_empty(), "{c:?}");
    all_read(&vol, &data).unwrap();
    vol.close().unwrap();
}

/// Clients writing, reading back and writing with DIX tuples on other threads (background
/// commits) while the volume is re-tagged up to blake3-keyed and back down to crc32c: every
/// read returns the thread's last write, and after a reopen every block holds it.
#[test]
fn concurrent_clients_during_up_and_down_retag() {
    let k = key(51);
    for mode in [Mode::Dual, Mode::Journal] {
        let f = fmt(mode, Profile::Crc32c, None, Some(32));
        let fb = Arc::new(MemoryBackend::new(f.backing_len().unwrap()).unwrap());
        Volume::format(fb.clone(), &f).unwrap().close().unwrap();
        let o = OpenOptions {
            stage_bytes: 8 * BS,
            ..OpenOptions::default()
        };
        let vol = Arc::new(Volume::open(fb.clone(), &o).unwrap());
        let done = Arc::new(std::sync::atomic::AtomicBool::new(false));
        let mut handles = Vec::new();
        for t in 0..2u64 {
            let (vol, done) = (vol.clone(), done.clone());
            handles.push(std::thread::spawn(move || {
                let mut last: BTreeMap<u64, Vec<u8>> = BTreeMap::new();
                let mut v = 10u32;
                let mut i = 0u64;
                while !done.load(std::sync::atomic::Ordering::Acquire) || i < 50 {
                    let b = (i * 2 + t) % (GROUPS * GB as u64);
                    let d = pattern(b, v);
                    v += 1;
                    if i.is_multiple_of(3) {
                        // DIX: a tuple by the profile that covers the block now (it may be
                        // passed by a step before the write: either profile's tuple is taken).
                        let tag = vol.tagger_for(b).generate(b, &d);
                        let mut pi = vec![0u8; vol.pi_size()];
                        pi[..tag.as_bytes().len()].copy_from_slice(tag.as_bytes());
                        vol.write_with_pi(&d, &pi, b * BS as u64)
                            .unwrap_or_else(|e| panic!("{mode:?} dix write {b}: {e}"));
                    } else {
                        vol.write_at(&d, b * BS as u64).unwrap();
                    }
                    last.insert(b, d.clone());
                    let got = read_block(&vol, b).unwrap_or_else(|e| panic!("{mode:?} read {b}: {e}"));
                    assert!(got == d, "{mode:?} block {b}: read back something else");
                    if i.is_multiple_of(7) {
                        vol.flush().unwrap();
                    }
                    i += 1;
                }
                last
            }));
        }
        let rep = vol
            .retag(&steps(Profile::Blake3Keyed, Some(&k)), &mut |_, _| {
                std::thread::sleep(Duration::from_millis(2))
            })
            .unwrap();
        assert!(rep.complete && rep.bad_blocks.is_empty(), "{mode:?} up: {rep:?}");
        let rep = vol
            .retag(&steps(Profile::Crc32c, None), &mut |_, _| {
                std::thread::sleep(Duration::from_millis(2))
            })
            .unwrap();
        assert!(
            rep.complete && rep.bad_blocks.is_empty(),
            "{mode:?} down: {rep:?}"
        );
        done.store(true, std::sync::atomic::Ordering::Release);
        let mut last = BTreeMap::new();
        for h in handles {
            last.extend(h.join().unwrap());
        }
        let vol = Arc::try_unwrap(vol).ok().unwrap();
        vol.close().unwrap();
        let vol = Volume::open(fb.clone(), &sync_opts()).unwrap();
        assert_eq!(vol.profile(), Profile::Crc32c);
        all_read(&vol, &last).unwrap_or_else(|e| panic!("{mode:?}: {e}"));
        check_clean(&vol).unwrap_or_else(|e| panic!("{mode:?}: {e}"));
        vol.close().unwrap();
    }
}

/// G6 during an unkeyed -> keyed re-tag (crc32c in 32-byte slots -> blake3-keyed): the groups
/// before the cursor are said to accept only the keyed profile, but the cursor in the
/// superblock is not authenticated. An attacker sets it back to 0 and writes a block of an
/// already re-tagged group with a crc32c tag; the owner's next open (with the new key, as
/// during any re-tag) accepts it, and the resumed re-tag gives it a blake3-keyed tag: after
/// the re-tag the forged block passes as keyed.
///
/// Kept as a known limit (CONSISTENCY.md, "Keys (G6)"): everything on the disk, the cursor
/// with it, can be put back by whoever writes it, and until the re-tag is complete the volume
/// accepts unkeyed tags somewhere anyway (the groups at the cursor and after it), which the
/// re-tag then gives keyed tags. The documented claim is therefore G6 from the re-tag's end,
/// for data no one wrote on the disk behind the engine's back while it ran.
#[test]
#[ignore = "known limit: an upgrade to a key protects from its completion on, not group by group (CONSISTENCY.md, Keys (G6))"]
fn bug_unkeyed_to_keyed_retag_cursor_rollback_launders_forged_block() {
    let k = key(61);
    let (fb, vol, data) = populated(Mode::Dual, Profile::Crc32c, None, Some(32));
    retag_stopped_after(&vol, &steps(Profile::Blake3Keyed, Some(&k)), 3);
    let st = vol.retag_status().unwrap();
    assert!(st.cursor >= 1, "{st:?}");
    vol.close().unwrap();
    let sb = superblock_of(&fb.live_image());
    let mut rolled = sb.clone();
    rolled.retag.as_mut().unwrap().cursor = 0;
    let victim = 3u64; // group 0: re-tagged
    let forged = vec![0x66; BS];
    let img = forge_block_as_crc32c(fb.live_image(), victim, &forged, &rolled);
    let mb = Arc::new(MemoryBackend::from_vec(img));
    let vol = Volume::open(mb.clone(), &opts_with(None, Some(&k))).unwrap();
    let mut rest = data.clone();
    rest.remove(&victim);
    all_read(&vol, &rest).unwrap();
    let during = read_block(&vol, victim);
    let rep = vol
        .retag(&steps(Profile::Blake3Keyed, Some(&k)), &mut |_, _| {})
        .unwrap();
    vol.close().unwrap();
    let vol = Volume::open(mb, &opts_with(Some(&k), None)).unwrap();
    let after = read_block(&vol, victim);
    assert!(
        !matches!(&after, Ok(d) if *d == forged),
        "block {victim} of a group already re-tagged to blake3-keyed was forged with a crc32c tag \
         after a cursor rollback: read during the re-tag {:?}, re-tag report bad blocks {:?}, \
         and after the re-tag it reads as the forged data under the keyed profile",
        during.as_ref().map(|d| d == &forged),
        rep.bad_blocks
    );
}

/// G6: `rebuild` mode (tags recomputed from whatever data a crash left) is refused for keyed
/// profiles at format, at open and as a re-tag target — but at open only the volume's own
/// profile is checked, not a re-tag's target. An attacker sets the mode of a volume in the
/// middle of crc32c -> blake3-keyed to `rebuild`: it opens (with the new key, as during any
/// re-tag), so a crash recovery would give data nobody tagged a blake3-keyed tag (finding 3).
/// Fixed: the open checks the mode against the target too.
#[test]
fn open_refuses_rebuild_mode_with_a_keyed_retag_target() {
    let k = key(71);
    let (fb, vol, _data) = populated(Mode::Dual, Profile::Crc32c, None, Some(32));
    retag_stopped_after(&vol, &steps(Profile::Blake3Keyed, Some(&k)), 2);
    // The engine itself never starts such a re-tag:
    vol.close().unwrap();
    let (fb2, v2, _) = populated(Mode::Rebuild, Profile::Crc32c, None, Some(32));
    assert!(v2
        .retag(&steps(Profile::Blake3Keyed, Some(&k)), &mut |_, _| {})
        .is_err());
    drop(fb2);
    v2.close().unwrap();
    // ... but opens one.
    let mut sb = superblock_of(&fb.live_image());
    sb.mode = Mode::Rebuild;
    sb.incompat |= blockguard::format::INCOMPAT_REBUILD;
    let mb = Arc::new(MemoryBackend::from_vec(fb.live_image()));
    put_superblocks(&*mb, &sb);
    assert!(
        Superblock::decode(&mb.snapshot()[..512]).is_ok(),
        "the forged superblock does not even decode"
    );
    // The attacker's data for block 3 (group 0, already re-tagged): written through a
    // crc32c rebuild-mode relabel of the disk, left "in use" (as after a crash), then the
    // superblock put back with the re-tag record and the rebuild mode.
    let victim = 3u64;
    let forged = vec![0x77; BS];
    let mut relabel = as_crc32c(&sb);
    relabel.mode = Mode::Rebuild;
    put_superblocks(&*mb, &relabel);
    let v = Volume::open(mb.clone(), &sync_opts()).unwrap();
    v.write_at(&forged, victim * BS as u64).unwrap();
    v.flush().unwrap();
    let img = mb.snapshot();
    drop(v);
    let mb = Arc::new(MemoryBackend::from_vec(img));
    let mut in_use = sb.clone();
    in_use.state = blockguard::format::VolumeState::InUse;
    put_superblocks(&*mb, &in_use);
    let r = Volume::open(mb.clone(), &opts_with(None, Some(&k)));
    let laundered = r.as_ref().ok().map(|v| {
        let rep = v.retag(&steps(Profile::Blake3Keyed, Some(&k)), &mut |_, _| {});
        (
            read_block(v, victim).map(|d| d == forged).ok(),
            rep.map(|r| r.complete).ok(),
        )
    });
    assert!(
        r.is_err(),
        "a rebuild-mode volume re-tagging to the keyed blake3-keyed was opened; the attacker's block \
         {victim} (read == forged, re-tag complete): {laundered:?}"
    );
}
