//! Outside review of the online re-tag (`Volume::retag`). Findings are `bug_*` (they fail on
//! the code they were found on), claims that held are `held_*`. See `review_retag/README.md`.

use blockguard::blockguard_backend::{FaultBackend, MemoryBackend, ReadFault};
use blockguard::tag::TagKey;
use blockguard::{FormatOptions, Mode, OpenOptions, Profile, RetagOptions, Volume};
use rand::SeedableRng;
use rand_chacha::ChaCha8Rng;
use std::collections::BTreeMap;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

const BS: usize = 4096;
/// Groups of 16 blocks: a re-tag of a few groups has a short I/O history.
const GB: u32 = 16;
const GROUPS: u64 = 4;
const SIZE: u64 = GROUPS * GB as u64 * BS as u64;

fn fmt(mode: Mode, profile: Profile, key: Option<TagKey>) -> FormatOptions {
    let mut f = FormatOptions::with_size(SIZE);
    f.mode = mode;
    f.profile = profile;
    f.key = key;
    f.group_blocks = Some(GB);
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

fn keyed_opts(key: &TagKey, retag_key: Option<&TagKey>) -> OpenOptions {
    OpenOptions {
        key: Some(key.clone()),
        retag_key: retag_key.cloned(),
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
    k: Option<TagKey>,
    opts: &OpenOptions,
) -> (Arc<FaultBackend>, Volume, BTreeMap<u64, Vec<u8>>) {
    let f = fmt(mode, profile, k);
    let fb = Arc::new(FaultBackend::new(f.backing_len().unwrap()).unwrap());
    Volume::format(fb.clone(), &f).unwrap().close().unwrap();
    let vol = Volume::open(fb.clone(), opts).unwrap();
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

/// Opens with `opts`, or, once the re-tag has finished on disk, with the target's key alone.
fn open_either(
    backend: Arc<dyn blockguard::blockguard_backend::Backend>,
    opts: &OpenOptions,
) -> blockguard::Result<Volume> {
    match Volume::open(backend.clone(), opts) {
        Err(blockguard::Error::Key { .. }) if opts.retag_key.is_some() => {
            let o = OpenOptions {
                key: opts.retag_key.clone(),
                retag_key: None,
                ..opts.clone()
            };
            Volume::open(backend, &o)
        }
        r => r,
    }
}

fn one_group_steps(profile: Profile, k: Option<&TagKey>) -> RetagOptions<'_> {
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

/// One read fault, of `kind`, on the `n`-th read the backend sees (counting from when it is
/// installed) that matches `pred(offset, len)`.
fn fault_nth_read(
    fb: &FaultBackend,
    n: usize,
    kind: ReadFault,
    pred: impl Fn(u64, usize) -> bool + Send + Sync + 'static,
) {
    let seen = AtomicUsize::new(0);
    fb.read_faults_with(move |off, len| {
        if pred(off, len) && seen.fetch_add(1, Ordering::SeqCst) == n {
            Some(kind)
        } else {
            None
        }
    });
}

/// G3/G1: a read returning zeros (or stale or misdirected bytes) once, at any of the first
/// reads the re-tag makes (data or metadata), neither gets a block re-tagged from bad data nor
/// reports a good block bad: the re-tag completes or fails cleanly, every block reads its data,
/// and a resumed re-tag ends with a clean check.
#[test]
fn held_one_bad_read_during_retag_step() {
    for mode in [Mode::Dual, Mode::Rebuild, Mode::Journal] {
        for kind in [ReadFault::Zeros, ReadFault::Stale, ReadFault::From(0)] {
            for n in 0..14 {
                let (fb, vol, data) = populated(mode, Profile::Crc32c, None, &sync_opts());
                fault_nth_read(&fb, n, kind, |_, _| true);
                let r = vol.retag(&one_group_steps(Profile::Xxh3, None), &mut |_, _| {});
                fb.clear_faults();
                if let Ok(rep) = &r {
                    assert!(
                        rep.bad_blocks.is_empty(),
                        "{mode:?} {kind:?} n={n}: good block reported bad: {rep:?}"
                    );
                    assert!(
                        rep.damaged.is_empty(),
                        "{mode:?} {kind:?} n={n}: damaged: {rep:?}"
                    );
                }
                all_read(&vol, &data).unwrap_or_else(|e| panic!("{mode:?} {kind:?} n={n} ({r:?}): {e}"));
                vol.close().unwrap();
                let vol = Volume::open(fb.clone(), &sync_opts()).unwrap();
                if vol.profile() != Profile::Xxh3 {
                    let rep = vol
                        .retag(&one_group_steps(Profile::Xxh3, None), &mut |_, _| {})
                        .unwrap();
                    assert!(
                        rep.complete && rep.bad_blocks.is_empty(),
                        "{mode:?} {kind:?} n={n}: {rep:?}"
                    );
                }
                all_read(&vol, &data).unwrap_or_else(|e| panic!("{mode:?} {kind:?} n={n} after: {e}"));
                check_clean(&vol).unwrap_or_else(|e| panic!("{mode:?} {kind:?} n={n}: {e}"));
                assert_eq!(vol.profile(), Profile::Xxh3);
                vol.close().unwrap();
            }
        }
    }
}

/// G3: a block corrupted on disk before the re-tag is not laundered: it is reported, keeps
/// failing during and after the re-tag, and its neighbours are re-tagged.
#[test]
fn held_corrupt_block_is_not_laundered() {
    for mode in [Mode::Dual, Mode::Rebuild, Mode::Journal] {
        let (fb, vol, data) = populated(mode, Profile::Xxh3, None, &sync_opts());
        vol.close().unwrap();
        // Find block 3's data on disk by its content and flip a bit in it.
        let img = fb.live_image();
        let needle = &data[&3][..64];
        // Every copy (journal mode may hold one in its log too).
        let offs: Vec<usize> = (0..img.len() - 64)
            .step_by(512)
            .filter(|&o| &img[o..o + 64] == needle)
            .collect();
        assert!(!offs.is_empty());
        for off in offs {
            fb.flip_bit(off as u64 + 100, 2).unwrap();
        }
        let vol = Volume::open(fb.clone(), &sync_opts()).unwrap();
        let rep = vol
            .retag(&one_group_steps(Profile::Crc64Nvme, None), &mut |_, _| {})
            .unwrap();
        assert!(rep.complete);
        assert_eq!(
            rep.bad_blocks.iter().map(|p| p.block).collect::<Vec<_>>(),
            vec![3],
            "{mode:?}"
        );
        assert!(
            read_block(&vol, 3).is_err(),
            "{mode:?}: corrupt block read after re-tag"
        );
        vol.close().unwrap();
        let vol = Volume::open(fb.clone(), &sync_opts()).unwrap();
        assert!(
            read_block(&vol, 3).is_err(),
            "{mode:?}: corrupt block read after reopen"
        );
        let mut rest = data.clone();
        rest.remove(&3);
        all_read(&vol, &rest).unwrap();
        vol.close().unwrap();
    }
}

/// Crash anywhere during a re-tag (every history point, sampled images, some torn at 512
/// bytes), then a second crash anywhere during the resumed re-tag: every block reads its data
/// and a third run finishes with a clean check.
#[test]
fn held_crash_then_crash_again_during_resume() {
    let mut rng = ChaCha8Rng::seed_from_u64(7);
    for (mode, from, to, k1, k2) in [
        (Mode::Dual, Profile::Crc32c, Profile::Xxh3, None, None),
        (Mode::Rebuild, Profile::Xxh3, Profile::T10Dif, None, None),
        (
            Mode::Journal,
            Profile::HmacSha256,
            Profile::Blake3Keyed,
            Some(key(1)),
            Some(key(2)),
        ),
    ] {
        let opts = OpenOptions {
            key: k1.clone(),
            retag_key: k2.clone(),
            ..sync_opts()
        };
        let (fb, vol, data) = populated(mode, from, k1.clone(), &opts);
        fb.forget_history();
        let rep = vol
            .retag(&one_group_steps(to, k2.as_ref()), &mut |_, _| {})
            .unwrap();
        assert!(rep.complete);
        vol.close().unwrap();
        let mut points = Vec::new();
        fb.for_each_history_point(|n, st| {
            for torn in [false, true] {
                points.push((n, torn, st.random_crash_image(&mut rng, torn)));
            }
        });
        for (i, (n, torn, image)) in points.into_iter().enumerate() {
            let ctx = format!("{mode:?} point {n} torn {torn}");
            let fb2 = Arc::new(FaultBackend::from_image(image));
            let vol = open_either(fb2.clone(), &opts).unwrap_or_else(|e| panic!("{ctx}: open: {e}"));
            all_read(&vol, &data).unwrap_or_else(|e| panic!("{ctx}: {e}"));
            // The second crash: only for every third point (time), at every point of the resume.
            if i % 3 == 0 && vol.retag_status().is_some() {
                fb2.forget_history();
                let r = vol
                    .retag(&one_group_steps(to, k2.as_ref()), &mut |_, _| {})
                    .unwrap();
                assert!(r.complete && r.bad_blocks.is_empty(), "{ctx}: {r:?}");
                vol.close().unwrap();
                let mut second = Vec::new();
                fb2.for_each_history_point(|m, st| second.push((m, st.random_crash_image(&mut rng, true))));
                for (m, img) in second {
                    let ctx = format!("{ctx} then point {m}");
                    let mb = Arc::new(MemoryBackend::from_vec(img));
                    let vol = open_either(mb, &opts).unwrap_or_else(|e| panic!("{ctx}: open: {e}"));
                    all_read(&vol, &data).unwrap_or_else(|e| panic!("{ctx}: {e}"));
                    let r = vol.retag(&one_group_steps(to, k2.as_ref()), &mut |_, _| {});
                    if vol.profile() != to {
                        panic!("{ctx}: {r:?}");
                    }
                    check_clean(&vol).unwrap_or_else(|e| panic!("{ctx}: {e}"));
                    vol.close().unwrap();
                }
                continue;
            }
            if vol.profile() != to {
                let r = vol
                    .retag(&one_group_steps(to, k2.as_ref()), &mut |_, _| {})
                    .unwrap();
                assert!(r.complete && r.bad_blocks.is_empty(), "{ctx}: {r:?}");
            }
            all_read(&vol, &data).unwrap_or_else(|e| panic!("{ctx}: after: {e}"));
            check_clean(&vol).unwrap_or_else(|e| panic!("{ctx}: {e}"));
            vol.close().unwrap();
        }
    }
}

/// G6 and the refusals: a re-tag between keyed profiles cannot be opened without, or with a
/// wrong, target key (read-only included), cannot be resumed to another target or with a
/// wrong key, and nothing is accepted without a key.
#[test]
fn held_keyed_retag_needs_both_keys() {
    let (k1, k2) = (key(1), key(2));
    let (fb, vol, data) = populated(
        Mode::Dual,
        Profile::HmacSha256,
        Some(k1.clone()),
        &keyed_opts(&k1, None),
    );
    let stop = AtomicBool::new(false);
    let mut o = one_group_steps(Profile::Blake3Keyed, Some(&k2));
    o.stop = Some(&stop);
    let rep = vol
        .retag(&o, &mut |done, _| {
            if done >= 2 {
                stop.store(true, Ordering::SeqCst);
            }
        })
        .unwrap();
    assert!(!rep.complete && rep.cursor == 2, "{rep:?}");
    // Resume to another target, or with a wrong key: refused.
    assert!(vol
        .retag(&one_group_steps(Profile::HmacSha256, None), &mut |_, _| {})
        .is_err());
    assert!(vol
        .retag(
            &one_group_steps(Profile::Blake3Keyed, Some(&key(9))),
            &mut |_, _| {}
        )
        .is_err());
    vol.close().unwrap();
    for ro in [false, true] {
        for (a, b) in [
            (Some(k1.clone()), None),
            (Some(k1.clone()), Some(key(9))),
            (None, Some(k2.clone())),
            (Some(k2.clone()), Some(k1.clone())),
        ] {
            let o = OpenOptions {
                read_only: ro,
                key: a.clone(),
                retag_key: b.clone(),
                ..sync_opts()
            };
            assert!(
                Volume::open(fb.clone(), &o).is_err(),
                "opened with {:?} {:?} ro={ro}",
                a.is_some(),
                b.is_some()
            );
        }
    }
    let vol = Volume::open(fb.clone(), &keyed_opts(&k1, Some(&k2))).unwrap();
    all_read(&vol, &data).unwrap();
    let rep = vol
        .retag(&one_group_steps(Profile::Blake3Keyed, Some(&k2)), &mut |_, _| {})
        .unwrap();
    assert!(rep.complete && rep.started_at == 2, "{rep:?}");
    vol.close().unwrap();
    // After: only the new key opens it.
    assert!(Volume::open(fb.clone(), &keyed_opts(&k1, None)).is_err());
    let vol = Volume::open(fb.clone(), &keyed_opts(&k2, None)).unwrap();
    all_read(&vol, &data).unwrap();
    check_clean(&vol).unwrap();
    vol.close().unwrap();
}

/// G2: a client writing, zeroing and discarding the blocks being re-tagged, from another
/// thread, with background commits: after the re-tag and a reopen every block holds its last
/// write and the check is clean.
#[test]
fn held_concurrent_writes_discards_during_retag() {
    for mode in [Mode::Dual, Mode::Rebuild, Mode::Journal] {
        let opts = OpenOptions {
            background_commit: true,
            ..sync_opts()
        };
        let (fb, vol, mut data) = populated(mode, Profile::Crc32c, None, &opts);
        let vol = Arc::new(vol);
        let done = Arc::new(AtomicBool::new(false));
        let writer = {
            let (vol, done) = (vol.clone(), done.clone());
            std::thread::spawn(move || {
                let mut last = BTreeMap::new();
                let mut v = 2u32;
                while !done.load(Ordering::SeqCst) || v < 40 {
                    for g in 0..GROUPS {
                        let b = g * GB as u64 + (v as u64 % GB as u64);
                        match v % 5 {
                            0 => {
                                vol.discard(b * BS as u64, BS as u64).unwrap();
                                last.insert(b, vec![0u8; BS]);
                            }
                            1 => {
                                vol.write_zeroes(b * BS as u64, BS as u64).unwrap();
                                last.insert(b, vec![0u8; BS]);
                            }
                            _ => {
                                let d = pattern(b, v);
                                vol.write_at(&d, b * BS as u64).unwrap();
                                last.insert(b, d);
                            }
                        }
                    }
                    if v.is_multiple_of(3) {
                        vol.flush().unwrap();
                    }
                    v += 1;
                }
                vol.flush().unwrap();
                last
            })
        };
        let rep = vol
            .retag(&one_group_steps(Profile::Xxh3, None), &mut |_, _| {
                std::thread::yield_now()
            })
            .unwrap();
        done.store(true, Ordering::SeqCst);
        let last = writer.join().unwrap();
        assert!(rep.complete && rep.bad_blocks.is_empty(), "{mode:?}: {rep:?}");
        data.extend(last);
        all_read(&vol, &data).unwrap_or_else(|e| panic!("{mode:?}: {e}"));
        Arc::try_unwrap(vol).ok().unwrap().close().unwrap();
        let vol = Volume::open(fb.clone(), &sync_opts()).unwrap();
        assert_eq!(vol.profile(), Profile::Xxh3);
        all_read(&vol, &data).unwrap_or_else(|e| panic!("{mode:?} reopened: {e}"));
        check_clean(&vol).unwrap_or_else(|e| panic!("{mode:?}: {e}"));
        vol.close().unwrap();
    }
}

/// Split volumes (data and metadata on two devices): the re-tag reads the data where it lives,
/// a one-time zero read of it is not taken for corruption, and a reopen checks clean.
#[test]
fn held_split_volume_retag() {
    for mode in [Mode::Dual, Mode::Journal] {
        for n in 0..6 {
            let f = fmt(mode, Profile::Crc32c, None);
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
            fault_nth_read(&data_dev, n, ReadFault::Zeros, |_, _| true);
            let rep = vol.retag(&one_group_steps(Profile::Crc64Nvme, None), &mut |_, _| {});
            data_dev.clear_faults();
            let rep = rep.unwrap();
            assert!(
                rep.complete && rep.bad_blocks.is_empty(),
                "{mode:?} n={n}: {rep:?}"
            );
            all_read(&vol, &data).unwrap();
            vol.close().unwrap();
            let vol = Volume::open_split(data_dev.clone(), meta_dev.clone(), &sync_opts()).unwrap();
            assert_eq!(vol.profile(), Profile::Crc64Nvme);
            all_read(&vol, &data).unwrap();
            check_clean(&vol).unwrap_or_else(|e| panic!("{mode:?}: {e}"));
            vol.close().unwrap();
        }
    }
}

/// G1/G2 with a client between steps: after every step the client writes (some flushed, some
/// not) blocks behind, at and ahead of the cursor, zeroes one and discards one; a crash at every
/// history point (all crash images where there are at most 16, else samples, torn included)
/// must leave every block with its last flushed content or a later write, and a resumed
/// re-tag must finish clean.
#[test]
fn held_crash_with_client_between_steps() {
    let mut rng = ChaCha8Rng::seed_from_u64(11);
    for (mode, from, to) in [
        (Mode::Dual, Profile::Xxh3, Profile::Crc32c),
        (Mode::Rebuild, Profile::Sha256, Profile::Blake3),
        (Mode::Journal, Profile::Blake3, Profile::NvmePi64),
    ] {
        let (fb, vol, base) = populated(mode, from, None, &sync_opts());
        fb.forget_history();
        // Per block: every content it may hold after a crash at the current point (the last
        // flushed one and anything written after it).
        let allowed = std::cell::RefCell::new(
            base.iter()
                .map(|(&b, d)| (b, vec![d.clone()]))
                .collect::<BTreeMap<u64, Vec<Vec<u8>>>>(),
        );
        // Snapshot of `allowed` after each backend event count, taken at each client action.
        let snaps = std::cell::RefCell::new(vec![(0usize, allowed.borrow().clone())]);
        let mut v = 10u32;
        let rep = vol
            .retag(&one_group_steps(to, None), &mut |done, _| {
                if done == 0 || done >= GROUPS {
                    return;
                }
                let write = |b: u64, d: Vec<u8>, how: u32| {
                    match how {
                        0 => vol.write_zeroes(b * BS as u64, BS as u64).unwrap(),
                        1 => vol.discard(b * BS as u64, BS as u64).unwrap(),
                        _ => vol.write_at(&d, b * BS as u64).unwrap(),
                    }
                    allowed
                        .borrow_mut()
                        .entry(b)
                        .or_insert_with(|| vec![vec![0u8; BS]])
                        .push(d);
                };
                let g = done * GB as u64;
                let before = fb.events().len();
                v += 1;
                write(g - 1, pattern(g - 1, v), 2); // behind the cursor
                write(g + 3, pattern(g + 3, v), 2); // at it
                write(g - GB as u64 + 3, vec![0u8; BS], 0); // zeroed, behind
                if done + 1 < GROUPS {
                    write(g + GB as u64 + 15, vec![0u8; BS], 1); // discarded, ahead
                }
                // From `before` on, these writes may be reaching the disk.
                snaps.borrow_mut().push((before, allowed.borrow().clone()));
                if !done.is_multiple_of(2) {
                    vol.flush().unwrap();
                    let mut a = allowed.borrow_mut();
                    for vs in a.values_mut() {
                        let last = vs.pop().unwrap();
                        *vs = vec![last];
                    }
                }
                snaps
                    .borrow_mut()
                    .push((fb.events().len(), allowed.borrow().clone()));
            })
            .unwrap();
        assert!(rep.complete, "{rep:?}");
        vol.flush().unwrap();
        let final_state: BTreeMap<u64, Vec<u8>> = allowed
            .borrow()
            .iter()
            .map(|(&b, vs)| (b, vs.last().unwrap().clone()))
            .collect();
        vol.close().unwrap();
        let snaps = snaps.into_inner();
        let mut images = Vec::new();
        fb.for_each_history_point(|n, st| {
            // What was allowed at the last client action at or before event n.
            let a = snaps
                .iter()
                .rev()
                .find(|(e, _)| *e <= n)
                .map(|(_, a)| a.clone())
                .unwrap();
            let mut imgs = Vec::new();
            if st.for_each_crash_image(16, |i| imgs.push((false, i))).is_err() {
                imgs.clear();
                for _ in 0..4 {
                    imgs.push((false, st.random_crash_image(&mut rng, false)));
                }
            }
            imgs.push((true, st.random_crash_image(&mut rng, true)));
            for (torn, i) in imgs {
                images.push((n, torn, a.clone(), i));
            }
        });
        let total = images.len();
        for (n, torn, a, image) in images {
            let ctx = format!("{mode:?} point {n} torn {torn}");
            let vol = Volume::open(Arc::new(MemoryBackend::from_vec(image)), &sync_opts())
                .unwrap_or_else(|e| panic!("{ctx}: open: {e}"));
            for (&b, vs) in &a {
                // A block the client touched after the last action may hold a later write too.
                // A block whose own unflushed write was torn may fail (G1 excepts it).
                let may_be_torn = torn && vs.len() > 1;
                let got = match read_block(&vol, b) {
                    // (`rebuild` re-tags whatever a torn write left: any mix is possible.)
                    Ok(_) if may_be_torn => continue,
                    Ok(got) => got,
                    Err(_) if may_be_torn => continue,
                    Err(e) => panic!("{ctx}: block {b}: {e}"),
                };
                let later = final_state.get(&b) == Some(&got);
                assert!(
                    vs.contains(&got)
                        || later
                        || got == vec![0u8; BS] && vs.iter().any(|x| x == &vec![0u8; BS])
                        || {
                            // Writes after the snapshot (unflushed at the crash) are allowed as well.
                            (10..=v).any(|w| got == pattern(b, w))
                        },
                    "{ctx}: block {b} holds data it should not"
                );
            }
            let torn_ok: Vec<u64> = a
                .iter()
                .filter(|(_, vs)| torn && vs.len() > 1)
                .map(|(&b, _)| b)
                .collect();
            if vol.profile() != to {
                let r = vol.retag(&one_group_steps(to, None), &mut |_, _| {}).unwrap();
                assert!(
                    r.complete && r.bad_blocks.iter().all(|p| torn_ok.contains(&p.block)),
                    "{ctx}: {r:?}"
                );
            }
            let p = vol.check_blocks(0, GROUPS * GB as u64).unwrap();
            assert!(p.iter().all(|p| torn_ok.contains(&p.block)), "{ctx}: {p:?}");
            assert!(vol.check_metadata(0, GROUPS).unwrap().is_empty(), "{ctx}");
            vol.close().unwrap();
        }
        eprintln!("{mode:?}: {total} images");
    }
}

/// G3/G4 (single faults, as `tests/faults.rs` holds the engine to): the n-th write of a re-tag
/// (metadata, superblock) is misdirected onto a never-written data block — so it is lost where
/// it belonged and lands where it did not. Every read, before and after a reopen and a resumed
/// re-tag, returns the block's content or an error, never other data, and `check_blocks` lists
/// exactly the blocks that fail to read.
#[test]
fn held_misdirected_write_during_retag_never_wrong_data() {
    for mode in [Mode::Dual, Mode::Rebuild, Mode::Journal] {
        for n in 0..40 {
            let (fb, vol, mut data) = populated(mode, Profile::Crc32c, None, &sync_opts());
            let scratch = vol.geometry().data_offset(62);
            data.insert(62, vec![0u8; BS]);
            let seen = AtomicUsize::new(0);
            let hit = Arc::new(AtomicBool::new(false));
            let h = hit.clone();
            fb.misdirect_writes_with(move |_, len| {
                if seen.fetch_add(1, Ordering::SeqCst) == n && len <= BS {
                    h.store(true, Ordering::SeqCst);
                    Some(scratch)
                } else {
                    None
                }
            });
            let r = vol.retag(&one_group_steps(Profile::Xxh3, None), &mut |_, _| {});
            fb.clear_faults();
            let ctx = format!("{mode:?} write {n} ({r:?})");
            let verify = |vol: &Volume, ctx: &str| {
                let mut failing = Vec::new();
                for (&b, d) in &data {
                    match read_block(vol, b) {
                        Ok(got) => assert!(&got == d, "{ctx}: block {b}: WRONG DATA"),
                        Err(_) => failing.push(b),
                    }
                }
                let listed: Vec<u64> = vol
                    .check_blocks(0, GROUPS * GB as u64)
                    .unwrap()
                    .iter()
                    .map(|p| p.block)
                    .filter(|b| data.contains_key(b))
                    .collect();
                assert_eq!(listed, failing, "{ctx}: check lists other blocks than fail");
            };
            verify(&vol, &ctx);
            let _ = vol.close();
            let Ok(vol) = Volume::open(fb.clone(), &sync_opts()) else {
                continue;
            };
            verify(&vol, &format!("{ctx} reopened"));
            if vol.profile() != Profile::Xxh3 {
                let _ = vol.retag(&one_group_steps(Profile::Xxh3, None), &mut |_, _| {});
            }
            verify(&vol, &format!("{ctx} resumed"));
            if std::env::var_os("RR_VERBOSE").is_some() {
                eprintln!(
                    "{mode:?} n={n}: failing after resume: {:?}",
                    vol.check_blocks(0, GROUPS * GB as u64)
                        .unwrap()
                        .iter()
                        .map(|p| p.block)
                        .collect::<Vec<_>>()
                );
            }
            vol.close().unwrap();
            if !hit.load(Ordering::SeqCst) {
                break;
            }
        }
    }
}

/// The two superblock copies disagree (a crash between their writes, in either order): one
/// says the re-tag is at cursor 2, the other that it finished (or another cursor), over the
/// metadata of the finished re-tag. Whichever copy is used, every block reads its data, and a
/// resumed re-tag (if one is still recorded) finishes with a clean check.
#[test]
fn held_superblock_copies_disagree() {
    for mode in [Mode::Dual, Mode::Rebuild, Mode::Journal] {
        let (fb, vol, data) = populated(mode, Profile::Crc32c, None, &sync_opts());
        let stop = AtomicBool::new(false);
        let mut o = one_group_steps(Profile::Xxh3, None);
        o.stop = Some(&stop);
        let mut images = Vec::new();
        let rep = vol
            .retag(&o, &mut |done, _| {
                if done == 1 {
                    images.push(fb.live_image());
                }
                if done == 2 {
                    stop.store(true, Ordering::SeqCst);
                }
            })
            .unwrap();
        assert!(!rep.complete);
        images.push(fb.live_image()); // cursor 2 recorded
        let rep = vol
            .retag(&one_group_steps(Profile::Xxh3, None), &mut |_, _| {})
            .unwrap();
        assert!(rep.complete);
        vol.close().unwrap();
        let done = fb.live_image();
        let len = done.len();
        let backup = (len / 4096) * 4096 - 4096;
        for (i, a) in images.iter().enumerate() {
            for primary_from_a in [false, true] {
                let mut img = done.clone();
                let r = if primary_from_a {
                    0..4096
                } else {
                    backup..backup + 4096
                };
                img[r.clone()].copy_from_slice(&a[r]);
                let ctx = format!("{mode:?} image {i} primary_from_a {primary_from_a}");
                let vol = Volume::open(Arc::new(MemoryBackend::from_vec(img)), &sync_opts())
                    .unwrap_or_else(|e| panic!("{ctx}: {e}"));
                all_read(&vol, &data).unwrap_or_else(|e| panic!("{ctx}: {e}"));
                if vol.profile() != Profile::Xxh3 {
                    let r = vol
                        .retag(&one_group_steps(Profile::Xxh3, None), &mut |_, _| {})
                        .unwrap();
                    assert!(r.complete && r.bad_blocks.is_empty(), "{ctx}: {r:?}");
                }
                check_clean(&vol).unwrap_or_else(|e| panic!("{ctx}: {e}"));
                vol.close().unwrap();
            }
        }
    }
}

/// Finding 1: a DIX write (`write_with_pi`) whose tuples were computed with
/// `Volume::tagger_for` (the profile covering the block then) is refused with
/// `ProtectionMismatch` — "the data or the tuple changed after the caller computed it" — when a
/// re-tag step passes the block between the tuple's computation and the write. The data and
/// the tuple are intact: a false integrity alarm for a client writing while the re-tag runs.
#[test]
fn bug_dix_write_refused_when_step_passes_between_tuple_and_write() {
    let (_fb, vol, _) = populated(Mode::Dual, Profile::Crc32c, None, &sync_opts());
    let block = 20u64; // group 1
    let d = pattern(block, 7);
    // The client computes the tuple where the data is made, as documented.
    let pi = vol.tagger_for(block).generate(block, &d).as_bytes().to_vec();
    // Meanwhile a re-tag passes group 1 (stopped after it: the volume stays mid-re-tag).
    let stop = AtomicBool::new(false);
    let mut o = one_group_steps(Profile::Xxh3, None);
    o.stop = Some(&stop);
    vol.retag(&o, &mut |done, _| stop.store(done >= 2, Ordering::SeqCst))
        .unwrap();
    assert_eq!(vol.retag_status().unwrap().cursor, 2);
    // The write arrives: data and tuple as computed, nothing changed on the way.
    vol.write_with_pi(&d, &pi, block * BS as u64)
        .expect("an intact DIX write is refused as a protection mismatch");
    assert_eq!(read_block(&vol, block).unwrap(), d);
}

/// The documented recipe (`write_with_pi`: tuples "computed by the caller with
/// `Volume::tagger`") holds for blocks the re-tag has not reached, and for re-tagged ones the
/// caller must use `tagger_for`: held as documented for `tagger_for` computed after the step.
#[test]
fn held_dix_write_with_tagger_for_after_step() {
    let (_fb, vol, _) = populated(Mode::Dual, Profile::Crc32c, None, &sync_opts());
    let stop = AtomicBool::new(false);
    let mut o = one_group_steps(Profile::Xxh3, None);
    o.stop = Some(&stop);
    vol.retag(&o, &mut |done, _| stop.store(done >= 2, Ordering::SeqCst))
        .unwrap();
    for block in [5u64, 20, 40] {
        let d = pattern(block, 8);
        let pi = vol.tagger_for(block).generate(block, &d).as_bytes().to_vec();
        vol.write_with_pi(&d, &pi, block * BS as u64).unwrap();
        let mut back = vec![0u8; BS];
        let mut tuple = vec![0u8; pi.len()];
        vol.read_with_pi(&mut back, &mut tuple, block * BS as u64)
            .unwrap();
        assert_eq!((back, tuple), (d, pi));
    }
}

/// A superblock write that fails (I/O error) at the start, at a cursor record or at the end of
/// a re-tag, for either copy: the re-tag fails or completes, the client keeps reading its data,
/// and after a close (or a crash: the durable image) and a reopen every block reads, a resumed
/// re-tag finishes, the check is clean.
#[test]
fn held_failed_superblock_write() {
    for mode in [Mode::Dual, Mode::Journal] {
        for copy in [0usize, 1] {
            for at_done in [0u64, 2, GROUPS] {
                let (fb, vol, data) = populated(mode, Profile::Crc32c, None, &sync_opts());
                let len = fb.live_image().len() as u64;
                let sb = if copy == 0 {
                    0..4096
                } else {
                    (len / 4096) * 4096 - 4096..(len / 4096) * 4096
                };
                if at_done == 0 {
                    fb.fail_writes_at(sb.clone());
                }
                let r = vol.retag(&one_group_steps(Profile::Xxh3, None), &mut |done, _| {
                    if done == at_done && done != 0 {
                        fb.fail_writes_at(sb.clone());
                    }
                });
                fb.clear_faults();
                let ctx = format!("{mode:?} copy {copy} at {at_done}: {r:?}");
                all_read(&vol, &data).unwrap_or_else(|e| panic!("{ctx}: {e}"));
                let crashed = fb.durable_image();
                let _ = vol.close();
                for (what, img) in [("closed", fb.live_image()), ("crashed", crashed)] {
                    let vol = Volume::open(Arc::new(MemoryBackend::from_vec(img)), &sync_opts())
                        .unwrap_or_else(|e| panic!("{ctx} {what}: {e}"));
                    all_read(&vol, &data).unwrap_or_else(|e| panic!("{ctx} {what}: {e}"));
                    if vol.profile() != Profile::Xxh3 {
                        let r = vol
                            .retag(&one_group_steps(Profile::Xxh3, None), &mut |_, _| {})
                            .unwrap();
                        assert!(r.complete && r.bad_blocks.is_empty(), "{ctx} {what}: {r:?}");
                    }
                    check_clean(&vol).unwrap_or_else(|e| panic!("{ctx} {what}: {e}"));
                    vol.close().unwrap();
                }
            }
        }
    }
}

/// Under the `read-only` error policy, a client read that finds a block with no good copy
/// while a re-tag runs suspends writes: "nothing new reaches the disk until an operator acts".
/// Returns the backend writes the re-tag issued after the suspension, and its result.
fn retag_after_suspension(mode: Mode) -> (usize, String) {
    let mut f = fmt(mode, Profile::Crc32c, None);
    f.error_policy = blockguard::ErrorPolicy::ReadOnly;
    let fb = Arc::new(FaultBackend::new(f.backing_len().unwrap()).unwrap());
    Volume::format(fb.clone(), &f).unwrap().close().unwrap();
    let vol = Volume::open(fb.clone(), &sync_opts()).unwrap();
    for b in [0u64, 20, 40, 50] {
        vol.write_at(&pattern(b, 1), b * BS as u64).unwrap();
    }
    vol.flush().unwrap();
    vol.close().unwrap();
    let off = Volume::open(fb.clone(), &sync_opts())
        .unwrap()
        .geometry()
        .data_offset(50);
    fb.flip_bit(off + 7, 1).unwrap();
    let vol = Volume::open(fb.clone(), &sync_opts()).unwrap();
    let mut at_suspension = None;
    let r = vol.retag(&one_group_steps(Profile::Xxh3, None), &mut |done, _| {
        if done == 1 {
            assert!(read_block(&vol, 50).is_err());
            assert!(
                vol.write_at(&pattern(41, 2), 41 * BS as u64).is_err(),
                "writes not suspended"
            );
            at_suspension = Some(fb.events().len());
        }
    });
    let after = fb.events()[at_suspension.unwrap()..]
        .iter()
        .filter(|e| format!("{e:?}").starts_with("Write"))
        .count();
    (after, format!("{r:?}"))
}

/// Finding 2 (see `retag_after_suspension`).
#[test]
fn bug_retag_writes_after_read_only_suspension() {
    let got: Vec<(Mode, usize, String)> = [Mode::Dual, Mode::Rebuild, Mode::Journal]
        .into_iter()
        .map(|m| {
            let (w, r) = retag_after_suspension(m);
            (m, w, r)
        })
        .collect();
    assert!(
        got.iter().all(|(_, w, _)| *w == 0),
        "writes reached the backend after the suspension: {got:?}"
    );
}

/// Refusals before anything is written: a second re-tag while one runs (Busy), a read-only
/// open, another tag size, the volume's own profile; a stopped re-tag survives a read-only
/// open (reads accept both profiles) and resumes read-write.
#[test]
fn held_refusals_and_read_only_open_mid_retag() {
    let (fb, vol, data) = populated(Mode::Dual, Profile::Crc32c, None, &sync_opts());
    assert!(vol
        .retag(&one_group_steps(Profile::Sha256, None), &mut |_, _| {})
        .is_err());
    assert!(vol
        .retag(&one_group_steps(Profile::Crc32c, None), &mut |_, _| {})
        .is_err());
    let stop = AtomicBool::new(false);
    let mut o = one_group_steps(Profile::T10DifIp, None);
    o.stop = Some(&stop);
    let mut nested = None;
    vol.retag(&o, &mut |done, _| {
        if done == 1 {
            nested = Some(vol.retag(&one_group_steps(Profile::T10DifIp, None), &mut |_, _| {}));
        }
        stop.store(done >= 2, Ordering::SeqCst);
    })
    .unwrap();
    assert!(
        matches!(nested, Some(Err(blockguard::Error::Busy { .. }))),
        "{nested:?}"
    );
    vol.close().unwrap();
    let ro = OpenOptions {
        read_only: true,
        ..sync_opts()
    };
    let vol = Volume::open(fb.clone(), &ro).unwrap();
    assert_eq!(vol.retag_status().unwrap().cursor, 2);
    all_read(&vol, &data).unwrap();
    assert!(vol
        .retag(&one_group_steps(Profile::T10DifIp, None), &mut |_, _| {})
        .is_err());
    vol.close().unwrap();
    let vol = Volume::open(fb.clone(), &sync_opts()).unwrap();
    let r = vol
        .retag(&one_group_steps(Profile::T10DifIp, None), &mut |_, _| {})
        .unwrap();
    assert!(r.complete && r.started_at == 2, "{r:?}");
    check_clean(&vol).unwrap();
    vol.close().unwrap();
}

/// Finding 2, second half: the re-tag itself finds a block with no good copy (it lists it in
/// `bad_blocks`) on a `read-only` volume, yet writes stay allowed — whereas `check_blocks`
/// finding the same block suspends them.
#[test]
fn bug_retag_found_bad_block_does_not_suspend() {
    let vol = read_only_policy_with_bad_block_50();
    // Fixed: the re-tag applies the policy to the block it found, and stops before writing.
    let r = vol.retag(&one_group_steps(Profile::Xxh3, None), &mut |_, _| {});
    assert!(
        matches!(r, Err(blockguard::Error::WritesSuspended { block: 50, .. })),
        "{r:?}"
    );
    assert!(
        vol.write_at(&pattern(41, 2), 41 * BS as u64).is_err(),
        "a write is accepted after the re-tag found a block with no good copy"
    );
}

/// The comparison for finding 2: `check_blocks` finding the bad block suspends writes.
#[test]
fn held_check_finding_bad_block_suspends_writes() {
    let vol = read_only_policy_with_bad_block_50();
    assert_eq!(vol.check_blocks(0, GROUPS * GB as u64).unwrap().len(), 1);
    assert!(vol.write_at(&pattern(41, 2), 41 * BS as u64).is_err());
}

/// A `dual` volume with the `read-only` error policy whose block 50 was written and then had a
/// bit flipped on disk (no good copy), open.
fn read_only_policy_with_bad_block_50() -> Volume {
    let mut f = fmt(Mode::Dual, Profile::Crc32c, None);
    f.error_policy = blockguard::ErrorPolicy::ReadOnly;
    let fb = Arc::new(FaultBackend::new(f.backing_len().unwrap()).unwrap());
    Volume::format(fb.clone(), &f).unwrap().close().unwrap();
    let vol = Volume::open(fb.clone(), &sync_opts()).unwrap();
    vol.write_at(&pattern(50, 1), 50 * BS as u64).unwrap();
    vol.flush().unwrap();
    let off = vol.geometry().data_offset(50);
    vol.close().unwrap();
    fb.flip_bit(off + 7, 1).unwrap();
    Volume::open(fb, &sync_opts()).unwrap()
}
