//! Second outside review of tag slots / cross-size online re-tag: attacks on the fixes of
//! 48cff53 (re-tag confirmation, held keys for reopens, mode check against the target, tag-room
//! bit for a target of another size, DIX tuples of the previous profile). Findings are
//! `bug_*` (they fail on the code they were found on); the other tests are claims that held.

use blockguard::blockguard_backend::{Backend, FaultBackend, MemoryBackend};
use blockguard::format::{tags_incompat, Retag, Superblock, INCOMPAT_RETAG, INCOMPAT_TAG_ROOM, SB_REGION};
use blockguard::tag::{KeyError, TagKey};
use blockguard::{Error, FormatOptions, Mode, OpenOptions, Profile, RetagOptions, Volume};
use std::collections::BTreeMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

const BS: usize = 4096;
const GB: u32 = 16;
const GROUPS: u64 = 4;
const SIZE: u64 = GROUPS * GB as u64 * BS as u64;

fn fmt(profile: Profile, key: Option<TagKey>, room: Option<usize>) -> FormatOptions {
    let mut f = FormatOptions::with_size(SIZE);
    f.mode = Mode::Dual;
    f.profile = profile;
    f.key = key;
    f.group_blocks = Some(GB);
    f.tag_room = room;
    f
}

fn opts(k: Option<&TagKey>, rk: Option<&TagKey>, to: Option<Profile>) -> OpenOptions {
    OpenOptions {
        key: k.cloned(),
        retag_key: rk.cloned(),
        retag_to: to,
        background_commit: false,
        stage_bytes: 3 * BS,
        cache_bytes: 4 * BS,
        dirty_clear_interval: Duration::from_secs(3600),
        ..OpenOptions::default()
    }
}

fn key(b: u8) -> TagKey {
    TagKey::from_bytes(&[b; 32]).unwrap()
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

fn steps(profile: Profile, k: Option<&TagKey>) -> RetagOptions<'_> {
    let mut o = RetagOptions::new(profile);
    o.key = k;
    o.step_bytes = 1;
    o.record_every = Duration::ZERO;
    o
}

/// Runs a re-tag to `to` and stops it after `n` progress reports.
fn retag_partly(vol: &Volume, to: Profile, k: Option<&TagKey>, n: usize) {
    let stop = AtomicBool::new(false);
    let mut o = steps(to, k);
    o.stop = Some(&stop);
    let mut seen = 0;
    let rep = vol
        .retag(&o, &mut |_, _| {
            seen += 1;
            if seen == n {
                stop.store(true, Ordering::Release);
            }
        })
        .unwrap();
    assert!(!rep.complete);
}

fn superblock_of(img: &[u8]) -> Superblock {
    Superblock::decode(&img[..SB_REGION as usize]).unwrap().0
}

fn put_superblocks(backend: &dyn Backend, sb: &Superblock) {
    backend.write_at(&sb.encode(0), 0).unwrap();
    backend
        .write_at(&sb.encode(1), sb.geometry.backup_sb_offset)
        .unwrap();
    backend.flush().unwrap();
}

fn mirror_set(
    n: usize,
    profile: Profile,
    k: Option<&TagKey>,
    room: Option<usize>,
) -> (Vec<Arc<FaultBackend>>, Volume, BTreeMap<u64, Vec<u8>>) {
    let f = fmt(profile, k.cloned(), room);
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
    let vol = Volume::open_members(dyns, &opts(k, None, None)).unwrap();
    (fbs, vol, data)
}

fn dyns(fbs: &[Arc<FaultBackend>]) -> Vec<Arc<dyn Backend>> {
    fbs.iter().map(|b| b.clone() as Arc<dyn Backend>).collect()
}

fn is_unconfirmed(e: &Error) -> bool {
    matches!(
        e,
        Error::Key {
            problem: KeyError::RetagUnconfirmed { .. },
            ..
        }
    )
}

/// Fix 3: `remove_member` in the middle of a re-tag (keyed -> unkeyed, keyed -> keyed with a
/// new key, unkeyed -> keyed) reopens the set with the keys in play and the confirmation; the
/// re-tag then resumes and completes, and the owner reopens with the new profile's key.
#[test]
fn remove_member_mid_retag_reopens_and_resumes() {
    let (k1, k2) = (key(21), key(22));
    for (from, fk, to, tk) in [
        (Profile::HmacSha256, Some(&k1), Profile::Crc32c, None),
        (Profile::HmacSha256, Some(&k1), Profile::Blake3Keyed, Some(&k2)),
        (Profile::Crc32c, None, Profile::HmacSha256, Some(&k2)),
    ] {
        let (fbs, vol, data) = mirror_set(3, from, fk, Some(32));
        retag_partly(&vol, to, tk, 2);
        let vol = vol
            .remove_member(2)
            .unwrap_or_else(|e| panic!("{from} -> {to}: remove_member mid re-tag: {e}"));
        all_read(&vol, &data).unwrap_or_else(|e| panic!("{from} -> {to} after remove: {e}"));
        let rep = vol.retag(&steps(to, None), &mut |_, _| {}).unwrap();
        assert!(rep.complete);
        // A second membership change after the completed re-tag, with the new key.
        let vol = vol
            .remove_member(1)
            .unwrap_or_else(|e| panic!("{from} -> {to}: remove_member after re-tag: {e}"));
        all_read(&vol, &data).unwrap();
        vol.close().unwrap();
        // The last member left is a plain volume.
        let v = Volume::open(fbs[0].clone(), &opts(tk, None, None))
            .unwrap_or_else(|e| panic!("{from} -> {to}: reopen: {e}"));
        assert_eq!(v.superblock().profile, to);
        all_read(&v, &data).unwrap();
        v.close().unwrap();
    }
}

/// Fix 1 on a mirror set: one member carries a replayed sealed "re-tag to crc32c" record, the
/// other none (members disagree). The owner's open (read-write, read-only, with either
/// member order, or one member alone) never accepts it unconfirmed.
#[test]
fn mirror_member_with_replayed_downgrade_record_is_refused_unconfirmed() {
    let k = key(31);
    let (fbs, vol, _data) = mirror_set(2, Profile::HmacSha256, Some(&k), None);
    retag_partly(&vol, Profile::Crc32c, None, 2);
    let recorded = superblock_of(&fbs[0].live_image());
    let seal = recorded.retag.expect("recorded").key_check;
    let rep = vol.retag(&steps(Profile::Crc32c, None), &mut |_, _| {}).unwrap();
    assert!(rep.complete);
    let rep = vol
        .retag(&steps(Profile::HmacSha256, Some(&k)), &mut |_, _| {})
        .unwrap();
    assert!(rep.complete);
    vol.close().unwrap();
    // The attacker replays the record on member 0 only, same event.
    let now = superblock_of(&fbs[0].live_image());
    let mut replay = now.clone();
    replay.retag = Some(Retag {
        target: Profile::Crc32c,
        cursor: 0,
        key_check: seal,
    });
    replay.incompat |=
        INCOMPAT_RETAG | tags_incompat(replay.profile, replay.geometry.tag_size, replay.retag.as_ref());
    put_superblocks(&*fbs[0], &replay);
    for (members, ro) in [
        (vec![fbs[0].clone(), fbs[1].clone()], false),
        (vec![fbs[1].clone(), fbs[0].clone()], false),
        (vec![fbs[0].clone(), fbs[1].clone()], true),
        (vec![fbs[0].clone()], true),
    ] {
        let o = OpenOptions {
            read_only: ro,
            ..opts(Some(&k), None, None)
        };
        match Volume::open_members(dyns(&members), &o) {
            Err(e) => assert!(is_unconfirmed(&e), "{e}"),
            Ok(v) => {
                let s = v.superblock();
                assert!(
                    s.retag.is_none(),
                    "opened unconfirmed with the replayed re-tag in force: {:?}",
                    s.retag
                );
                v.close().unwrap();
            }
        }
    }
    // A confirmation of another target is no confirmation.
    for to in [Profile::Xxh3, Profile::HmacSha256, Profile::Blake3Keyed] {
        let e = Volume::open_members(dyns(&fbs), &opts(Some(&k), None, Some(to)))
            .err()
            .unwrap_or_else(|| panic!("retag_to {to} accepted a crc32c re-tag"));
        assert!(is_unconfirmed(&e), "{to}: {e}");
    }
}

/// Fix 5: after a completed re-tag, a tuple of the previous profile is taken only for the
/// data it describes; the tag stored is the covering profile's, and a reopen without the old
/// key reads it. A tuple of the previous profile made for other data, or for the same data
/// at another block, is refused.
#[test]
fn previous_profile_tuples_check_the_data() {
    let k = key(41);
    let f = fmt(Profile::HmacSha256, Some(k.clone()), None);
    let mb = Arc::new(MemoryBackend::new(f.backing_len().unwrap()).unwrap());
    Volume::format(mb.clone(), &f).unwrap().close().unwrap();
    let vol = Volume::open(mb.clone(), &opts(Some(&k), None, None)).unwrap();
    let old = vol.tagger();
    let rep = vol.retag(&steps(Profile::Crc32c, None), &mut |_, _| {}).unwrap();
    assert!(rep.complete);
    let t = vol.pi_size();
    let tuple = |tagger: &blockguard::tag::Tagger, block: u64, d: &[u8]| {
        let mut v = vec![0u8; t];
        let g = tagger.generate(block, d);
        v[..g.as_bytes().len()].copy_from_slice(g.as_bytes());
        v
    };
    let (b, d) = (9u64, pattern(9, 2));
    let other = pattern(9, 3);
    assert!(vol
        .write_with_pi(&d, &tuple(&old, b, &other), b * BS as u64)
        .is_err());
    assert!(vol
        .write_with_pi(&d, &tuple(&old, b + 1, &d), b * BS as u64)
        .is_err());
    vol.write_with_pi(&d, &tuple(&old, b, &d), b * BS as u64).unwrap();
    // A second re-tag (crc32c -> blake3-keyed): hmac's tuples are not "the previous" any more.
    let k2 = key(42);
    let rep = vol
        .retag(&steps(Profile::Blake3Keyed, Some(&k2)), &mut |_, _| {})
        .unwrap();
    assert!(rep.complete);
    let (b2, d2) = (20u64, pattern(20, 5));
    let r = vol.write_with_pi(&d2, &tuple(&old, b2, &d2), b2 * BS as u64);
    assert!(r.is_err(), "a tuple of a profile two re-tags back accepted");
    vol.close().unwrap();
    let v = Volume::open(mb, &opts(Some(&k2), None, None)).unwrap();
    assert_eq!(read_block(&v, b).unwrap(), d);
    let mut pi = vec![0u8; t];
    let mut back = vec![0u8; BS];
    let made = v.read_with_pi(&mut back, &mut pi, b * BS as u64).unwrap();
    assert_eq!(made.profile(b), Profile::Blake3Keyed);
    v.close().unwrap();
}

/// Fix 4: the superblock of a re-tag to a narrower profile carries the tag-room bit; without
/// it the superblock is refused, and a re-tag to a profile of the slots' size does not carry
/// it.
#[test]
fn tag_room_bit_follows_the_target() {
    let k = key(51);
    let f = fmt(Profile::HmacSha256, Some(k.clone()), None);
    let fb = Arc::new(FaultBackend::new(f.backing_len().unwrap()).unwrap());
    Volume::format(fb.clone(), &f).unwrap().close().unwrap();
    let vol = Volume::open(fb.clone(), &opts(Some(&k), None, None)).unwrap();
    retag_partly(&vol, Profile::Blake3, None, 2);
    let sb = superblock_of(&fb.live_image());
    assert_eq!(
        sb.incompat & INCOMPAT_TAG_ROOM,
        INCOMPAT_TAG_ROOM,
        "blake3 is 16 bytes in 32"
    );
    let mut no_room = sb.clone();
    no_room.incompat &= !INCOMPAT_TAG_ROOM;
    assert!(Superblock::decode(&no_room.encode(0)[..SB_REGION as usize]).is_err());
    // Confirmed, the resumed re-tag completes; a reopen without a key reads.
    drop(vol);
    let vol = Volume::open(fb.clone(), &opts(Some(&k), None, Some(Profile::Blake3))).unwrap();
    let rep = vol.retag(&steps(Profile::Blake3, None), &mut |_, _| {}).unwrap();
    assert!(rep.complete);
    vol.close().unwrap();
    let v = Volume::open(fb.clone(), &opts(None, None, None)).unwrap();
    assert_eq!(v.superblock().incompat & INCOMPAT_TAG_ROOM, INCOMPAT_TAG_ROOM);
    v.close().unwrap();
}

/// Fix 3 for a re-tag begun in an earlier session: the set is opened in the middle of it (with
/// the target's key, or the confirmation), the re-tag resumes without a key argument and
/// completes, and then `add_member` and `remove_member` reopen with the new profile's key.
#[test]
fn membership_changes_after_a_retag_resumed_from_open() {
    let (k1, k2) = (key(61), key(62));
    for (from, fk, to, tk) in [
        (Profile::HmacSha256, Some(&k1), Profile::Blake3Keyed, Some(&k2)),
        (Profile::Blake3Keyed, Some(&k1), Profile::Crc32c, None),
        (Profile::Crc32c, None, Profile::HmacSha256, Some(&k2)),
    ] {
        let (fbs, vol, data) = mirror_set(2, from, fk, Some(32));
        retag_partly(&vol, to, tk, 2);
        vol.close().unwrap();
        let vol = Volume::open_members(dyns(&fbs), &opts(fk, tk, Some(to)))
            .unwrap_or_else(|e| panic!("{from} -> {to}: open mid re-tag: {e}"));
        let rep = vol.retag(&steps(to, None), &mut |_, _| {}).unwrap();
        assert!(rep.complete);
        let extra = Arc::new(FaultBackend::new(vol.geometry().backing_len).unwrap());
        let (vol, _) = vol
            .add_member(extra.clone(), &mut |_, _| {})
            .unwrap_or_else(|e| panic!("{from} -> {to}: add_member: {e}"));
        all_read(&vol, &data).unwrap();
        let vol = vol
            .remove_member(0)
            .unwrap_or_else(|e| panic!("{from} -> {to}: remove_member: {e}"));
        all_read(&vol, &data).unwrap();
        vol.close().unwrap();
        let v = Volume::open_members(
            vec![fbs[1].clone() as Arc<dyn Backend>, extra as Arc<dyn Backend>],
            &opts(tk, None, None),
        )
        .unwrap_or_else(|e| panic!("{from} -> {to}: reopen: {e}"));
        all_read(&v, &data).unwrap();
        assert_eq!(v.superblock().profile, to);
        v.close().unwrap();
    }
}

/// `retag_to` is ignored when no re-tag away from a key is recorded: no re-tag, a re-tag
/// between keyed profiles, a re-tag between unkeyed ones.
#[test]
fn retag_to_is_ignored_without_a_downgrade() {
    let (k1, k2) = (key(71), key(72));
    for (from, fk, to, tk) in [
        (Profile::HmacSha256, Some(&k1), Profile::Blake3Keyed, Some(&k2)),
        (Profile::Crc32c, None, Profile::Blake3, None),
    ] {
        let f = fmt(from, fk.cloned(), Some(32));
        let mb = Arc::new(MemoryBackend::new(f.backing_len().unwrap()).unwrap());
        Volume::format(mb.clone(), &f).unwrap().close().unwrap();
        for confirm in [None, Some(Profile::Crc32c), Some(to), Some(from)] {
            Volume::open(mb.clone(), &opts(fk, None, confirm))
                .unwrap_or_else(|e| panic!("{from}, retag_to {confirm:?}: {e}"))
                .close()
                .unwrap();
        }
        let vol = Volume::open(mb.clone(), &opts(fk, None, None)).unwrap();
        retag_partly(&vol, to, tk, 2);
        vol.close().unwrap();
        for confirm in [None, Some(Profile::Crc32c), Some(to), Some(from)] {
            Volume::open(mb.clone(), &opts(fk, tk, confirm))
                .unwrap_or_else(|e| panic!("{from} -> {to}, retag_to {confirm:?}: {e}"))
                .close()
                .unwrap();
        }
    }
}

/// Finding (low): fix 5 takes a tuple of the profile a re-tag just left "after one completed in
/// this session", but `remove_member` (and `add_member`), which reopen the volume inside the
/// same handle chain, forget it (`Tags::previous` lives in the `Inner` they rebuild): a DIX
/// client's tuple computed just before the re-tag ended, taken a moment earlier, is refused
/// with `ProtectionMismatch` after the membership change. No wrong data, no wrong tag; an
/// inconsistency with what the fix promises (or the doc should say "until a reopen").
/// Fixed: `add_member` and `remove_member` carry the previous profile over.
#[test]
fn dix_previous_profile_survives_a_membership_change() {
    let k = key(81);
    let (_fbs, vol, _data) = mirror_set(3, Profile::HmacSha256, Some(&k), None);
    let old = vol.tagger();
    let rep = vol.retag(&steps(Profile::Crc32c, None), &mut |_, _| {}).unwrap();
    assert!(rep.complete);
    let t = vol.pi_size();
    let (b, d) = (12u64, pattern(12, 7));
    let mut pi = vec![0u8; t];
    pi.copy_from_slice(old.generate(b, &d).as_bytes());
    // Before the membership change: taken.
    vol.write_with_pi(&d, &pi, b * BS as u64).unwrap();
    let vol = vol.remove_member(2).unwrap();
    let r = vol.write_with_pi(&d, &pi, b * BS as u64);
    vol.close().unwrap();
    assert!(
        r.is_ok(),
        "the previous profile's tuple, taken just before, is refused after remove_member: {r:?}"
    );
}

/// Fix 1 against forged superblocks: a keyed volume whose superblocks an attacker rewrote with
/// the replayed seal in every combination of cursor, tag-room bit, only one copy, or a mirror
/// member claiming the downgrade finished. The owner's open (key, no confirmation) never
/// succeeds with a re-tag or an unkeyed profile in force, never panics, and never reads the
/// attacker's block.
#[test]
fn forged_downgrade_superblocks_never_open_unconfirmed() {
    let k = key(91);
    let (fbs, vol, data) = mirror_set(2, Profile::HmacSha256, Some(&k), None);
    retag_partly(&vol, Profile::Crc32c, None, 2);
    let seal = superblock_of(&fbs[0].live_image()).retag.unwrap().key_check;
    assert!(
        vol.retag(&steps(Profile::Crc32c, None), &mut |_, _| {})
            .unwrap()
            .complete
    );
    assert!(
        vol.retag(&steps(Profile::HmacSha256, Some(&k)), &mut |_, _| {})
            .unwrap()
            .complete
    );
    vol.close().unwrap();
    let clean: Vec<Vec<u8>> = fbs.iter().map(|b| b.live_image()).collect();
    let now = superblock_of(&clean[0]);
    let groups = now.geometry.groups;
    let owner = opts(Some(&k), None, None);
    let mut forgeries: Vec<(String, Vec<Option<Superblock>>, bool)> = Vec::new();
    for cursor in [0, 1, groups] {
        for room in [false, true] {
            let mut r = now.clone();
            r.retag = Some(Retag {
                target: Profile::Crc32c,
                cursor,
                key_check: seal,
            });
            r.incompat |= INCOMPAT_RETAG;
            if room {
                r.incompat |= INCOMPAT_TAG_ROOM;
            } else {
                r.incompat &= !INCOMPAT_TAG_ROOM;
            }
            forgeries.push((
                format!("cursor {cursor} room {room}, both"),
                vec![Some(r.clone()), Some(r.clone())],
                false,
            ));
            forgeries.push((
                format!("cursor {cursor} room {room}, member 1"),
                vec![None, Some(r.clone())],
                false,
            ));
            forgeries.push((
                format!("cursor {cursor} room {room}, primary copy only"),
                vec![Some(r.clone()), None],
                true,
            ));
        }
    }
    // Member 0 "finished" (crc32c, no re-tag), member 1 mid-way with the seal.
    let mut done = now.clone();
    done.profile = Profile::Crc32c;
    done.key_check = [0; 32];
    done.retag = None;
    done.incompat = (done.incompat
        & !(INCOMPAT_RETAG | blockguard::format::INCOMPAT_TAG_PROFILE | INCOMPAT_TAG_ROOM))
        | tags_incompat(Profile::Crc32c, done.geometry.tag_size, None);
    let mut mid = now.clone();
    mid.retag = Some(Retag {
        target: Profile::Crc32c,
        cursor: groups,
        key_check: seal,
    });
    mid.incompat |= INCOMPAT_RETAG | tags_incompat(mid.profile, mid.geometry.tag_size, mid.retag.as_ref());
    forgeries.push((
        "member 0 finished, member 1 mid-way".into(),
        vec![Some(done.clone()), Some(mid)],
        false,
    ));
    forgeries.push(("member 0 finished".into(), vec![Some(done), None], false));
    for (what, sbs, primary_only) in forgeries {
        let members: Vec<Arc<MemoryBackend>> = clean
            .iter()
            .map(|img| Arc::new(MemoryBackend::from_vec(img.clone())))
            .collect();
        for (m, sb) in members.iter().zip(&sbs) {
            let Some(sb) = sb else { continue };
            // The victim block 7 gets the attacker's data (its tag left as it was).
            m.write_at(&[0xE7u8; BS], sb.geometry.data_offset(7)).unwrap();
            if primary_only {
                m.write_at(&sb.encode(0), 0).unwrap();
            } else {
                put_superblocks(&**m, sb);
            }
        }
        let ds: Vec<Arc<dyn Backend>> = members.iter().map(|b| b.clone() as Arc<dyn Backend>).collect();
        let r = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| Volume::open_members(ds, &owner)));
        match r {
            Err(_) => panic!("{what}: open panicked"),
            Ok(Err(_)) => {}
            Ok(Ok(v)) => {
                let s = v.superblock();
                assert!(
                    s.retag.is_none() && s.profile == Profile::HmacSha256,
                    "{what}: opened unconfirmed as {} with {:?}",
                    s.profile,
                    s.retag
                );
                if let Ok(got) = read_block(&v, 7) {
                    assert_eq!(got, data[&7], "{what}: block 7 read the attacker's data");
                }
                v.close().unwrap();
            }
        }
    }
}

/// Fix 1 through a split volume and read-only opens: a stopped re-tag away from a key is
/// refused unconfirmed (read-write and read-only), opens confirmed, and completes.
#[test]
fn split_volume_downgrade_needs_confirmation() {
    let k = key(95);
    let f = fmt(Profile::Blake3Keyed, Some(k.clone()), None);
    let (dl, ml) = Volume::split_lengths(&f).unwrap();
    let data_dev = Arc::new(FaultBackend::new(dl).unwrap());
    let meta_dev = Arc::new(FaultBackend::new(ml).unwrap());
    Volume::format_split(data_dev.clone(), meta_dev.clone(), &f, "meta")
        .unwrap()
        .close()
        .unwrap();
    let vol = Volume::open_split(data_dev.clone(), meta_dev.clone(), &opts(Some(&k), None, None)).unwrap();
    let mut data = BTreeMap::new();
    for b in [0u64, 5, 17, 40, 63] {
        let d = pattern(b, 3);
        vol.write_at(&d, b * BS as u64).unwrap();
        data.insert(b, d);
    }
    vol.flush().unwrap();
    retag_partly(&vol, Profile::Sha256, None, 2);
    vol.close().unwrap();
    for ro in [false, true] {
        let o = OpenOptions {
            read_only: ro,
            ..opts(Some(&k), None, None)
        };
        let Err(e) = Volume::open_split(data_dev.clone(), meta_dev.clone(), &o) else {
            panic!("opened unconfirmed");
        };
        assert!(is_unconfirmed(&e), "read_only {ro}: {e}");
        let o = OpenOptions {
            read_only: ro,
            ..opts(Some(&k), None, Some(Profile::Crc32c))
        };
        let Err(e) = Volume::open_split(data_dev.clone(), meta_dev.clone(), &o) else {
            panic!("opened with the wrong confirmation");
        };
        assert!(is_unconfirmed(&e), "read_only {ro}: {e}");
    }
    let vol = Volume::open_split(
        data_dev.clone(),
        meta_dev.clone(),
        &opts(Some(&k), None, Some(Profile::Sha256)),
    )
    .unwrap();
    all_read(&vol, &data).unwrap();
    assert!(
        vol.retag(&steps(Profile::Sha256, None), &mut |_, _| {})
            .unwrap()
            .complete
    );
    vol.close().unwrap();
    let v = Volume::open_split(data_dev, meta_dev, &opts(None, None, None)).unwrap();
    all_read(&v, &data).unwrap();
    v.close().unwrap();
}
