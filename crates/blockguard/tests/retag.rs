//! `Volume::retag`: switching a volume to another tag profile while it is in use.
//!
//! - every mode (`dual`, `rebuild`, `journal`), 8-, 16- and 32-byte pairs, keyed targets,
//!   and pairs of different tag sizes in slots with room for the larger (`tag_room`), to a key
//!   and away from one:
//!   after the re-tag every block reads back verified, `check` is clean, the stored tags are
//!   the target's (compared with the profile's own `generate`), and the volume reopens with the
//!   target profile; writes during the re-tag keep their data;
//! - a crash at every point of a re-tag's I/O history (every subset and order of the unflushed
//!   writes where there are few, samples torn at 512 bytes otherwise): the volume opens, every
//!   block reads its data verified, and resuming completes the re-tag;
//! - a stop persists the cursor, and the same call resumes from there;
//! - a corrupted block is reported and left failing, never re-tagged as good;
//! - bad input is refused with a clear error and nothing written; a re-tag away from a key
//!   that was not sealed with it (a forged superblock) is refused at open;
//! - mirror sets (2 and 3 copies): every copy re-tagged and verified, bad copies repaired
//!   first, degraded sets refused, a copy dropping out midway resynced onto the target.

use blockguard::blockguard_backend::{Backend, FaultBackend};
use blockguard::tag::{KeyError, TagKey};
use blockguard::{Error, FormatOptions, Mode, OpenOptions, Profile, RetagOptions, RetagReport, Volume};
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;
use std::collections::BTreeMap;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

const BS: u64 = 4096;
/// Blocks per group: small, so a small volume has many groups (and a re-tag many steps).
const GROUP: u32 = 8;
const GROUPS: u64 = 12;
const BLOCKS: u64 = GROUPS * GROUP as u64 - 3;
const UUID: [u8; 16] = [0x5a; 16];

fn key(b: u8) -> TagKey {
    TagKey::from_bytes(&[b; 32]).unwrap()
}

/// The key of `profile` in these tests: `old` for the profile formatted with, else the new one.
fn key_for(profile: Profile, byte: u8) -> Option<TagKey> {
    profile.is_keyed().then(|| key(byte))
}

fn content(block: u64, round: u32) -> Vec<u8> {
    let mut x = (block + 1).wrapping_mul(0x9e37_79b9_7f4a_7c15) ^ u64::from(round);
    (0..BS)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            x.to_le_bytes()[0]
        })
        .collect()
}

fn format_opts(mode: Mode, profile: Profile) -> FormatOptions {
    format_opts_in(mode, profile, None)
}

/// [`format_opts`] with tag slots of `room` bytes.
fn format_opts_in(mode: Mode, profile: Profile, room: Option<usize>) -> FormatOptions {
    FormatOptions {
        tag_room: room,
        mode,
        profile,
        key: key_for(profile, 0x11),
        uuid: Some(UUID),
        group_blocks: Some(GROUP),
        journal_size: (mode == Mode::Journal).then_some(256 << 10),
        ..FormatOptions::with_size(BS * BLOCKS)
    }
}

fn open_opts(from: Profile, to: Profile) -> OpenOptions {
    OpenOptions {
        key: key_for(from, 0x11),
        retag_key: key_for(to, 0x22),
        // Confirms a re-tag away from a key, which is refused unconfirmed.
        retag_to: Some(to),
        background_commit: false,
        ..OpenOptions::default()
    }
}

/// Writes the pattern: most blocks, some left unwritten, one written with zeros, one group
/// never written; returns the model (block → content).
fn write_pattern(vol: &Volume) -> BTreeMap<u64, Vec<u8>> {
    let mut model = BTreeMap::new();
    for b in 0..BLOCKS {
        let group = b / u64::from(GROUP);
        if group == 5 || b % 7 == 3 {
            continue;
        }
        let data = if b == 10 {
            vec![0; BS as usize]
        } else {
            content(b, 0)
        };
        vol.write_at(&data, b * BS).unwrap();
        model.insert(b, data);
    }
    vol.flush().unwrap();
    model
}

/// Every block reads back as the model says (zeros where it has nothing), verified.
fn check_reads(vol: &Volume, model: &BTreeMap<u64, Vec<u8>>, what: &str) {
    let mut buf = vec![0u8; BS as usize];
    for b in 0..BLOCKS {
        vol.read_at(&mut buf, b * BS)
            .unwrap_or_else(|e| panic!("{what}: block {b}: {e}"));
        let want = model.get(&b).cloned().unwrap_or_else(|| vec![0; BS as usize]);
        assert!(buf == want, "{what}: block {b} reads other data");
    }
}

/// `check` is clean: every block and every metadata sector.
fn check_clean(vol: &Volume, what: &str) {
    let bad = vol.check_blocks(0, BLOCKS).unwrap();
    assert!(bad.is_empty(), "{what}: check finds {bad:?}");
    let meta = vol.check_metadata(0, GROUPS).unwrap();
    assert!(meta.is_empty(), "{what}: check finds metadata problems {meta:?}");
}

/// The tag a read of each written block accepts is `profile`'s tag of its data.
/// (Every block of the model was written: its tag is a real one, except that a block of zeros
/// may have the unwritten tag where a `rebuild` recovery recomputed it.)
fn check_tags(vol: &Volume, profile: Profile, model: &BTreeMap<u64, Vec<u8>>, what: &str) {
    let tagger = profile.tagger(&UUID, key_for(profile, 0x22).as_ref()).unwrap();
    for (&b, data) in model {
        let report = vol.inspect_block(b).unwrap();
        let want = tagger.generate(b, data).to_string();
        let zero_ok = data.iter().all(|&x| x == 0) && report.accepted == ["unwritten"];
        assert!(
            report.accepted == [want.clone()] || zero_ok,
            "{what}: block {b}'s stored tag is {:?}, the target's is {want}",
            report.accepted
        );
    }
}

fn retag(vol: &Volume, to: Profile, progress: &mut dyn FnMut(u64, u64)) -> blockguard::Result<RetagReport> {
    let key = key_for(to, 0x22);
    let opts = RetagOptions {
        key: key.as_ref(),
        step_bytes: 1,
        record_every: Duration::ZERO,
        ..RetagOptions::new(to)
    };
    vol.retag(&opts, progress)
}

/// What a client does between steps of a re-tag at cursor `done`: writes block `at` of the
/// group just re-tagged and block 2 of the next one (new content of `round`), then flushes.
fn client_round(vol: &Volume, done: u64, at: u64, round: &mut u32, model: &mut BTreeMap<u64, Vec<u8>>) {
    for b in [
        (done - 1) * u64::from(GROUP) + at,
        (done * u64::from(GROUP) + 2).min(BLOCKS - 1),
    ] {
        let data = content(b, *round);
        vol.write_at(&data, b * BS).unwrap();
        model.insert(b, data);
    }
    *round += 1;
    vol.flush().unwrap();
}

/// One re-tag from `from` to `to` in `mode`, with a client writing and flushing between
/// steps, in re-tagged groups and in the others.
fn retag_and_check(mode: Mode, from: Profile, to: Profile, room: Option<usize>) {
    let what = format!("{} {from} → {to} in slots of {room:?}", mode.name());
    let fo = format_opts_in(mode, from, room);
    let backend = Arc::new(FaultBackend::new(fo.backing_len().unwrap()).unwrap());
    let vol = Volume::format(backend.clone(), &fo).unwrap();
    let mut model = write_pattern(&vol);
    let mut round = 1;
    let mut steps = 0;
    let report = retag(&vol, to, &mut |done, total| {
        assert_eq!(total, GROUPS);
        if done == 0 || done == total {
            return;
        }
        steps += 1;
        client_round(&vol, done, 1, &mut round, &mut model);
    })
    .unwrap_or_else(|e| panic!("{what}: {e}"));
    assert!(report.complete, "{what}: {report:?}");
    assert_eq!(
        (report.started_at, report.cursor, report.groups),
        (0, GROUPS, GROUPS)
    );
    assert!(steps >= GROUPS - 1, "{what}: {steps} steps");
    assert!(
        report.bad_blocks.is_empty() && report.damaged.is_empty(),
        "{what}: {report:?}"
    );
    assert!(report.blocks_retagged > 0, "{what}");
    assert_eq!(vol.retag_status(), None);
    check_reads(&vol, &model, &what);
    check_clean(&vol, &what);
    check_tags(&vol, to, &model, &what);
    vol.close().unwrap();
    // Reopened: the target is the volume's profile, with its key alone.
    let again = Volume::open(
        backend.clone(),
        &OpenOptions {
            key: key_for(to, 0x22),
            ..OpenOptions::default()
        },
    )
    .unwrap_or_else(|e| panic!("{what}: reopen: {e}"));
    assert_eq!(again.superblock().profile, to, "{what}");
    assert_eq!(again.superblock().retag, None, "{what}");
    check_reads(&again, &model, &format!("{what}, reopened"));
    check_clean(&again, &format!("{what}, reopened"));
    check_tags(&again, to, &model, &format!("{what}, reopened"));
    again.close().unwrap();
    if from.is_keyed() {
        // The old key no longer opens it.
        let old = Volume::open(backend, &open_opts(from, from));
        assert!(matches!(old, Err(Error::Key { .. })), "{what}: old key accepted");
    }
}

/// Every mode; 8-, 16- and 32-byte pairs; keyed targets.
#[test]
fn every_mode_and_tag_size() {
    for (mode, from, to) in [
        (Mode::Dual, Profile::Crc32c, Profile::Xxh3),
        (Mode::Rebuild, Profile::Crc32c, Profile::T10Dif),
        (Mode::Journal, Profile::Crc64Nvme, Profile::Crc32c),
        (Mode::Dual, Profile::Sha256, Profile::Blake3),
        (Mode::Dual, Profile::HmacSha256, Profile::Blake3Keyed),
        (Mode::Journal, Profile::Blake3Keyed, Profile::HmacSha256),
    ] {
        retag_and_check(mode, from, to, None);
    }
}

/// Tags of another size: to larger ones in slots formatted with room for them, to smaller
/// ones in any volume (they are stored followed by zeros); to a key and away from one.
#[test]
fn across_tag_sizes_where_the_slots_have_room() {
    for (mode, from, to, room) in [
        (Mode::Dual, Profile::Crc32c, Profile::Blake3Keyed, Some(32)),
        (Mode::Journal, Profile::T10Dif, Profile::HmacSha256, Some(32)),
        (Mode::Rebuild, Profile::Xxh3, Profile::Sha256, Some(16)),
        (Mode::Dual, Profile::NvmePi64, Profile::T10Dif, None),
        (Mode::Journal, Profile::Blake3Keyed, Profile::Crc32c, None),
        (Mode::Dual, Profile::HmacSha256, Profile::Blake3, None),
    ] {
        retag_and_check(mode, from, to, room);
    }
}

/// What the blocks hold at each flush of a workload: the event count of the backend's history
/// after the flush, and the content of every written block.
type Snapshots = Vec<(usize, BTreeMap<u64, Vec<u8>>)>;

/// A volume of `mode` and `from` with the pattern written and closed, its history forgotten,
/// then re-tagged to `to` (one group per step, the cursor recorded after each) while a client
/// writes, after each step, a block of the group just re-tagged and one of the next, and
/// flushes: the backend with the history, and the snapshots at each flush.
fn retagged_with_history(
    mode: Mode,
    (from, to): (Profile, Profile),
    room: Option<usize>,
) -> (Arc<FaultBackend>, Snapshots) {
    let fo = format_opts_in(mode, from, room);
    let backend = Arc::new(FaultBackend::new(fo.backing_len().unwrap()).unwrap());
    let vol = Volume::format(backend.clone(), &fo).unwrap();
    let mut model = write_pattern(&vol);
    vol.close().unwrap();
    backend.forget_history();
    let mut snapshots = vec![(0, model.clone())];
    let vol = Volume::open(backend.clone(), &open_opts(from, to)).unwrap();
    let mut round = 1;
    let report = retag(&vol, to, &mut |done, total| {
        if done == 0 || done == total {
            return;
        }
        // The group just re-tagged was written before its step too (the previous round):
        // marked dirty, and rewritten now without a flush of its own before the commit.
        client_round(&vol, done, 2, &mut round, &mut model);
        snapshots.push((backend.events().len(), model.clone()));
    })
    .unwrap();
    assert!(report.complete);
    vol.close().unwrap();
    (backend, snapshots)
}

/// After a crash image taken at a point between flushes `before` and `after` (if any): the
/// volume opens (recovering), every written block reads one of the two versions, verified;
/// resuming the re-tag (if it was recorded) or starting it completes it, and then `check` is
/// clean and every block has the target's tag of what it holds.
fn check_crash_image(
    image: Vec<u8>,
    (from, to): (Profile, Profile),
    before: &BTreeMap<u64, Vec<u8>>,
    after: Option<&BTreeMap<u64, Vec<u8>>>,
    what: &str,
) {
    let backend = Arc::new(FaultBackend::from_image(image));
    // The superblock in use says which profile the volume has now, hence which key opens it.
    let (sb, _) = Volume::read_superblock(&*backend).unwrap_or_else(|e| panic!("{what}: superblock: {e}"));
    let opts = if sb.profile == to {
        OpenOptions {
            key: key_for(to, 0x22),
            background_commit: false,
            ..OpenOptions::default()
        }
    } else {
        open_opts(from, to)
    };
    let vol = Volume::open(backend.clone(), &opts).unwrap_or_else(|e| panic!("{what}: open: {e}"));
    let zeros = vec![0u8; BS as usize];
    let mut held = BTreeMap::new();
    let mut buf = vec![0u8; BS as usize];
    for b in 0..BLOCKS {
        vol.read_at(&mut buf, b * BS)
            .unwrap_or_else(|e| panic!("{what}: block {b}: {e}"));
        let old = before.get(&b).unwrap_or(&zeros);
        let new = after.and_then(|m| m.get(&b)).unwrap_or(old);
        assert!(
            buf == *old || buf == *new,
            "{what}: block {b} reads data never written to it"
        );
        if before.contains_key(&b) || after.is_some_and(|m| m.contains_key(&b)) {
            held.insert(b, buf.clone());
        }
    }
    let done = vol.superblock().profile == to && vol.retag_status().is_none();
    if !done {
        let report = retag(&vol, to, &mut |_, _| {}).unwrap_or_else(|e| panic!("{what}: resume: {e}"));
        assert!(
            report.complete && report.bad_blocks.is_empty(),
            "{what}: {report:?}"
        );
    }
    check_reads(&vol, &held, &format!("{what}, resumed"));
    check_clean(&vol, &format!("{what}, resumed"));
    check_tags(&vol, to, &held, &format!("{what}, resumed"));
    vol.close().unwrap_or_else(|e| panic!("{what}: close: {e}"));
}

/// A random crash image of `state`: each unflushed write kept with probability 1/2, in a
/// random order, and every kept write that touches no data block torn at 512 bytes with
/// probability 1/2 (a torn data block may fail verification: G1's allowance; metadata and
/// superblock writes must survive any tear).
fn torn_image(
    state: &blockguard::blockguard_backend::CrashState,
    data: &[std::ops::Range<u64>],
    rng: &mut ChaCha8Rng,
) -> Vec<u8> {
    use rand::seq::SliceRandom;
    let mut keep: Vec<(usize, Vec<bool>)> = Vec::new();
    for (i, w) in state.unflushed().iter().enumerate() {
        if !rng.random_bool(0.5) {
            continue;
        }
        let n = w.sector_count();
        let touches_data = data.iter().any(|r| w.offset < r.end && r.start < w.end());
        let mask = if touches_data || rng.random_bool(0.5) {
            vec![true; n]
        } else {
            (0..n).map(|_| rng.random_bool(0.5)).collect()
        };
        keep.push((i, mask));
    }
    keep.shuffle(rng);
    state.crash_image_torn(&keep)
}

/// Crashes at every point of a re-tag's history, a client writing and flushing meanwhile.
fn crash_everywhere(mode: Mode, from: Profile, to: Profile, seed: u64) {
    crash_everywhere_in(mode, (from, to), None, seed);
}

/// [`crash_everywhere`] on a volume with tag slots of `room` bytes.
fn crash_everywhere_in(mode: Mode, (from, to): (Profile, Profile), room: Option<usize>, seed: u64) {
    println!("seed {seed}");
    let mut rng = ChaCha8Rng::seed_from_u64(seed);
    let (backend, snapshots) = retagged_with_history(mode, (from, to), room);
    let (sb, _) = Volume::read_superblock(&*backend).unwrap();
    let data: Vec<std::ops::Range<u64>> = (0..BLOCKS)
        .map(|b| sb.geometry.data_offset(b)..sb.geometry.data_offset(b) + BS)
        .collect();
    let mut points = 0;
    let mut images = 0;
    backend.for_each_history_point(|n, state| {
        points += 1;
        let k = snapshots.iter().rposition(|(at, _)| *at <= n).unwrap_or(0);
        let before = &snapshots[k].1;
        let after = snapshots.get(k + 1).map(|s| &s.1);
        let what = format!("{} {from} → {to}, seed {seed}, history point {n}", mode.name());
        let check =
            |image, how: &str| check_crash_image(image, (from, to), before, after, &format!("{what}, {how}"));
        let enumerated = state.for_each_crash_image(16, |image| {
            images += 1;
            check(image, "enumerated");
        });
        if enumerated.is_err() {
            for _ in 0..4 {
                images += 1;
                check(state.random_crash_image(&mut rng, false), "sampled");
            }
        }
        if !state.unflushed().is_empty() {
            images += 1;
            check(torn_image(state, &data, &mut rng), "torn");
        }
    });
    assert!(points > 2 * GROUPS as usize, "{points} history points");
    assert!(
        snapshots.len() > GROUPS as usize / 2,
        "{} flushes",
        snapshots.len()
    );
    println!(
        "{points} history points, {images} crash images, {} client flushes",
        snapshots.len() - 1
    );
}

#[test]
fn crash_at_every_step_dual() {
    crash_everywhere(Mode::Dual, Profile::Crc32c, Profile::Xxh3, rand::rng().random());
}

#[test]
fn crash_at_every_step_rebuild() {
    crash_everywhere(
        Mode::Rebuild,
        Profile::Xxh3,
        Profile::Crc64Nvme,
        rand::rng().random(),
    );
}

/// To a key across tag sizes: crc32c in 32-byte slots becomes blake3-keyed.
#[test]
fn crash_at_every_step_dual_to_a_larger_keyed_tag() {
    crash_everywhere_in(
        Mode::Dual,
        (Profile::Crc32c, Profile::Blake3Keyed),
        Some(32),
        rand::rng().random(),
    );
}

/// To larger tags in rebuild mode, whose recovery recomputes the tags of the marked groups
/// with the profile covering each (crc32c in 16-byte slots becomes blake3).
#[test]
fn crash_at_every_step_rebuild_to_a_larger_tag() {
    crash_everywhere_in(
        Mode::Rebuild,
        (Profile::Crc32c, Profile::Blake3),
        Some(16),
        rand::rng().random(),
    );
}

/// Away from a key, to smaller tags (the seal recorded), in journal mode.
#[test]
fn crash_at_every_step_journal_away_from_a_key() {
    crash_everywhere_in(
        Mode::Journal,
        (Profile::HmacSha256, Profile::Xxh3),
        None,
        rand::rng().random(),
    );
}

#[test]
fn crash_at_every_step_journal_keyed() {
    crash_everywhere(
        Mode::Journal,
        Profile::HmacSha256,
        Profile::Blake3Keyed,
        rand::rng().random(),
    );
}

#[test]
fn a_stop_persists_the_cursor_and_the_same_call_resumes() {
    let (from, to) = (Profile::Crc32c, Profile::Crc64Nvme);
    let fo = format_opts(Mode::Dual, from);
    let backend = Arc::new(FaultBackend::new(fo.backing_len().unwrap()).unwrap());
    let vol = Volume::format(backend.clone(), &fo).unwrap();
    let model = write_pattern(&vol);
    let stop = AtomicBool::new(false);
    let opts = RetagOptions {
        stop: Some(&stop),
        step_bytes: 1,
        // Never on its own: only the stop records the cursor.
        record_every: Duration::from_secs(3600),
        ..RetagOptions::new(to)
    };
    let report = vol
        .retag(&opts, &mut |done, _| {
            if done == 4 {
                stop.store(true, Ordering::SeqCst);
            }
        })
        .unwrap();
    assert!(!report.complete);
    assert_eq!(report.cursor, 4);
    // The stop wrote the cursor (not only the close).
    let (sb, _) = Volume::read_superblock(&*backend).unwrap();
    assert_eq!(sb.retag.map(|r| (r.target, r.cursor)), Some((to, 4)));
    check_reads(&vol, &model, "stopped");
    vol.close().unwrap();
    let vol = Volume::open(backend.clone(), &open_opts(from, to)).unwrap();
    let status = vol.retag_status().expect("a re-tag in progress");
    assert_eq!(
        (status.from, status.to, status.cursor, status.groups),
        (from, to, 4, GROUPS)
    );
    assert_eq!(vol.superblock().retag.map(|r| r.cursor), Some(4));
    check_reads(&vol, &model, "reopened");
    let mut seen = Vec::new();
    let report = retag(&vol, to, &mut |done, _| seen.push(done)).unwrap();
    assert!(report.complete);
    assert_eq!(report.started_at, 4);
    assert_eq!(seen.first(), Some(&4), "resumed where it stopped");
    check_reads(&vol, &model, "resumed");
    check_clean(&vol, "resumed");
    check_tags(&vol, to, &model, "resumed");
    vol.close().unwrap();
}

#[test]
fn a_corrupted_block_is_reported_and_left_failing() {
    let (from, to) = (Profile::Crc32c, Profile::Xxh3);
    let fo = format_opts(Mode::Dual, from);
    let backend = Arc::new(FaultBackend::new(fo.backing_len().unwrap()).unwrap());
    let vol = Volume::format(backend.clone(), &fo).unwrap();
    let mut model = write_pattern(&vol);
    vol.close().unwrap();
    let bad = 20;
    let offset = vol_data_offset(&backend, bad);
    backend.flip_bit(offset + 100, 3).unwrap();
    let vol = Volume::open(backend.clone(), &open_opts(from, to)).unwrap();
    let report = retag(&vol, to, &mut |_, _| {}).unwrap();
    assert!(report.complete);
    assert_eq!(
        report.bad_blocks.iter().map(|p| p.block).collect::<Vec<_>>(),
        vec![bad],
        "{report:?}"
    );
    // Still failing, under the new profile too: not re-tagged as good.
    let mut buf = vec![0u8; BS as usize];
    assert!(matches!(vol.read_at(&mut buf, bad * BS), Err(Error::Corrupt { block, .. }) if block == bad));
    let found = vol.check_blocks(0, BLOCKS).unwrap();
    assert_eq!(found.iter().map(|p| p.block).collect::<Vec<_>>(), vec![bad]);
    let mut corrupted = model[&bad].clone();
    corrupted[100] ^= 1 << 3;
    let target = to.tagger(&UUID, None).unwrap();
    let stored = vol.inspect_block(bad).unwrap().accepted;
    assert_ne!(stored, vec![target.generate(bad, &corrupted).to_string()]);
    model.remove(&bad);
    vol.close().unwrap();
    let vol = Volume::open(backend, &OpenOptions::default()).unwrap();
    for (&b, data) in &model {
        vol.read_at(&mut buf, b * BS).unwrap();
        assert!(buf == *data, "block {b}");
    }
    assert!(vol.read_at(&mut buf, bad * BS).is_err());
}

/// The byte offset of data block `block` of the volume on `backend`.
fn vol_data_offset(backend: &Arc<FaultBackend>, block: u64) -> u64 {
    let (sb, _) = Volume::read_superblock(&**backend).unwrap();
    sb.geometry.data_offset(block)
}

/// `f` fails as `check` says, and the backend holds the same bytes afterwards.
fn refused(
    backend: &FaultBackend,
    what: &str,
    f: impl FnOnce() -> blockguard::Result<RetagReport>,
    check: impl FnOnce(&Error) -> bool,
) {
    let before = backend.live_image();
    match f() {
        Ok(r) => panic!("{what}: accepted: {r:?}"),
        Err(e) => {
            assert!(check(&e), "{what}: {e}");
            println!("{what}: {e}");
        }
    }
    assert!(backend.live_image() == before, "{what}: something was written");
}

#[test]
fn bad_input_is_refused_and_nothing_is_written() {
    let fo = format_opts(Mode::Dual, Profile::Crc32c);
    let backend = Arc::new(FaultBackend::new(fo.backing_len().unwrap()).unwrap());
    let vol = Volume::format(backend.clone(), &fo).unwrap();
    write_pattern(&vol);
    let go = |opts: RetagOptions<'_>| vol.retag(&opts, &mut |_, _| {});
    refused(
        &backend,
        "same profile",
        || go(RetagOptions::new(Profile::Crc32c)),
        |e| matches!(e, Error::InvalidArgument { detail, .. } if detail.contains("already uses")),
    );
    refused(
        &backend,
        "larger tags than the slots",
        || go(RetagOptions::new(Profile::Sha256)),
        |e| {
            matches!(e, Error::Unsupported { detail, .. } if detail.contains("in place")
                && detail.contains("xxh3") && detail.contains("--tag-room 32"))
        },
    );
    let k = key(0x22);
    refused(
        &backend,
        "a key for an unkeyed target",
        || {
            go(RetagOptions {
                key: Some(&k),
                ..RetagOptions::new(Profile::Xxh3)
            })
        },
        |e| {
            matches!(
                e,
                Error::Key {
                    problem: KeyError::RetagNotKeyed { .. },
                    ..
                }
            )
        },
    );
    // A re-tag in progress to xxh3: another target is refused.
    let stop = AtomicBool::new(true);
    let stopped = go(RetagOptions {
        stop: Some(&stop),
        ..RetagOptions::new(Profile::Xxh3)
    })
    .unwrap();
    assert!(!stopped.complete);
    refused(
        &backend,
        "another target while one is in progress",
        || go(RetagOptions::new(Profile::T10Dif)),
        |e| matches!(e, Error::InvalidArgument { detail, .. } if detail.contains("in progress") && detail.contains("xxh3")),
    );
    vol.close().unwrap();
    let ro = Volume::open(
        backend.clone(),
        &OpenOptions {
            read_only: true,
            ..OpenOptions::default()
        },
    )
    .unwrap();
    refused(
        &backend,
        "read-only",
        || ro.retag(&RetagOptions::new(Profile::Xxh3), &mut |_, _| {}),
        |e| matches!(e, Error::ReadOnly { .. }),
    );
    drop(ro);
}

#[test]
fn keys_of_a_keyed_retag_are_checked_before_anything_is_written() {
    let (from, to) = (Profile::HmacSha256, Profile::Blake3Keyed);
    let fo = format_opts(Mode::Dual, from);
    let backend = Arc::new(FaultBackend::new(fo.backing_len().unwrap()).unwrap());
    let vol = Volume::format(backend.clone(), &fo).unwrap();
    write_pattern(&vol);
    let go = |opts: RetagOptions<'_>| vol.retag(&opts, &mut |_, _| {});
    refused(
        &backend,
        "keyed target without its key",
        || go(RetagOptions::new(to)),
        |e| {
            matches!(
                e,
                Error::Key {
                    problem: KeyError::RetagMissing { .. },
                    ..
                }
            )
        },
    );
    // Started with key 0x22, stopped at once.
    let (k, wrong) = (key(0x22), key(0x23));
    let stop = AtomicBool::new(true);
    go(RetagOptions {
        key: Some(&k),
        stop: Some(&stop),
        ..RetagOptions::new(to)
    })
    .unwrap();
    refused(
        &backend,
        "resumed with a wrong key",
        || {
            go(RetagOptions {
                key: Some(&wrong),
                ..RetagOptions::new(to)
            })
        },
        |e| {
            matches!(
                e,
                Error::Key {
                    problem: KeyError::RetagWrong { .. },
                    ..
                }
            )
        },
    );
    vol.close().unwrap();
    // While it is in progress, opening needs both keys, each right.
    let image = backend.live_image();
    for (retag_key, want) in [(None, "missing"), (Some(wrong), "wrong")] {
        let r = Volume::open(
            backend.clone(),
            &OpenOptions {
                key: Some(key(0x11)),
                retag_key,
                ..OpenOptions::default()
            },
        );
        match r {
            Err(Error::Key { problem, .. }) => {
                let text = problem.to_string();
                assert!(
                    text.contains("re-tag target") && text.contains("--new-key-file"),
                    "{want}: {text}"
                );
            }
            Err(e) => panic!("{want}: {e}"),
            Ok(_) => panic!("{want}: opened"),
        }
        assert!(backend.live_image() == image, "{want}: something was written");
    }
    let vol = Volume::open(backend.clone(), &open_opts(from, to)).unwrap();
    let report = retag(&vol, to, &mut |_, _| {}).unwrap();
    assert!(report.complete);
    vol.close().unwrap();
}

#[test]
fn a_second_retag_in_one_session_goes_back() {
    // The engine's state after a completed re-tag is the target's: a second one (back) works
    // in the same session, and the volume reopens with the original profile.
    let fo = format_opts(Mode::Dual, Profile::Crc32c);
    let backend = Arc::new(FaultBackend::new(fo.backing_len().unwrap()).unwrap());
    let vol = Volume::format(backend.clone(), &fo).unwrap();
    let model = write_pattern(&vol);
    assert!(retag(&vol, Profile::Xxh3, &mut |_, _| {}).unwrap().complete);
    assert!(retag(&vol, Profile::Crc32c, &mut |_, _| {}).unwrap().complete);
    check_reads(&vol, &model, "back");
    vol.close().unwrap();
    let vol = Volume::open(backend as Arc<dyn Backend>, &OpenOptions::default()).unwrap();
    assert_eq!(vol.superblock().profile, Profile::Crc32c);
    check_reads(&vol, &model, "back, reopened");
    check_tags(&vol, Profile::Crc32c, &model, "back, reopened");
}

/// Groups re-tagged now, for a re-tag from `from` to `to`: the cursor while it runs, 0 before
/// it starts, every group once it is complete.
fn cursor_now(vol: &Volume, to: Profile) -> u64 {
    match vol.retag_status() {
        Some(s) => s.cursor,
        None if vol.profile() == to => GROUPS,
        None => 0,
    }
}

/// One `read_with_pi` of `count` blocks from `first` during a re-tag from `from` to `to`,
/// checked: the data is the model's; every tuple is the tag of that data under the profile
/// `PiProfiles` names for its block (the all-zero tuple for a block never written); that
/// profile is the target for blocks re-tagged before the read began and the old one for blocks
/// not re-tagged when it ended. Returns the profiles named.
fn checked_read_with_pi(
    vol: &Volume,
    (from, to): (Profile, Profile),
    model: &BTreeMap<u64, Vec<u8>>,
    first: u64,
    count: u64,
) -> Vec<Profile> {
    let t = vol.pi_size();
    let (mut data, mut pi) = (vec![0u8; (count * BS) as usize], vec![0u8; count as usize * t]);
    let before = cursor_now(vol, to);
    let made = vol
        .read_with_pi(&mut data, &mut pi, first * BS)
        .unwrap_or_else(|e| panic!("read_with_pi of {count} blocks at {first}: {e}"));
    let after = cursor_now(vol, to);
    let mut named = Vec::new();
    for k in 0..count {
        let b = first + k;
        let chunk = &data[(k * BS) as usize..((k + 1) * BS) as usize];
        let tuple = &pi[k as usize * t..(k as usize + 1) * t];
        let ctx = format!("block {b} (cursor {before}..{after}), {made:?}");
        let want = model.get(&b).cloned().unwrap_or_else(|| vec![0; BS as usize]);
        assert!(chunk == want, "{ctx}: other data");
        let profile = made.profile(b);
        let group = b / u64::from(GROUP);
        if group < before {
            assert_eq!(profile, to, "{ctx}: re-tagged before the read");
        } else if group >= after {
            assert_eq!(profile, from, "{ctx}: not re-tagged after the read");
        }
        if !model.contains_key(&b) {
            assert!(tuple.iter().all(|&x| x == 0), "{ctx}: never written");
            continue;
        }
        let tag = blockguard::tag::Tag::from_bytes(tuple);
        assert!(
            made.tagger(b).verify(b, chunk, &tag),
            "{ctx}: tuple {tag} does not verify the data under {profile}"
        );
        named.push(profile);
    }
    named
}

/// `read_with_pi` while a re-tag runs (a reader thread reading continuously, and at least once
/// between any two steps): every tuple verifies the data returned with it under the profile
/// the read names for its block, and that profile is the one covering the block during the
/// read (see `checked_read_with_pi`). Before the fix the tuple was computed with the profile
/// covering the block after the read, which the caller could not know: a step passing the
/// block in between gave it a tuple of the target for data read under the old profile.
#[test]
fn reads_with_pi_during_a_retag_name_the_profile_of_each_tuple() {
    for (mode, from, to) in [
        (Mode::Dual, Profile::Crc32c, Profile::Xxh3),
        (Mode::Journal, Profile::HmacSha256, Profile::Blake3Keyed),
    ] {
        let fo = format_opts(mode, from);
        let backend = Arc::new(FaultBackend::new(fo.backing_len().unwrap()).unwrap());
        let vol = Volume::format(backend, &fo).unwrap();
        let model = write_pattern(&vol);
        let reads = AtomicU64::new(0);
        let done = AtomicBool::new(false);
        let mut mixed = 0;
        std::thread::scope(|scope| {
            let reader = scope.spawn(|| {
                let (mut seen, mut i) = (0, 0u64);
                while !done.load(Ordering::SeqCst) {
                    // The whole volume, and short reads across group boundaries.
                    let (first, count) = if i % 3 == 0 {
                        (0, BLOCKS)
                    } else {
                        ((i * 5) % (BLOCKS - 4), 4)
                    };
                    let named = checked_read_with_pi(&vol, (from, to), &model, first, count);
                    if named.contains(&from) && named.contains(&to) {
                        seen += 1;
                    }
                    i += 1;
                    reads.fetch_add(1, Ordering::SeqCst);
                }
                seen
            });
            let report = retag(&vol, to, &mut |_, _| {
                // Let the reader read at least once (from start to end) at this cursor.
                let at = reads.load(Ordering::SeqCst);
                while reads.load(Ordering::SeqCst) < at + 2 && !reader.is_finished() {
                    std::thread::yield_now();
                }
            });
            done.store(true, Ordering::SeqCst);
            let report = report.unwrap_or_else(|e| panic!("{mode:?} {from} → {to}: {e}"));
            assert!(report.complete && report.bad_blocks.is_empty(), "{report:?}");
            mixed = reader.join().unwrap();
        });
        assert!(mixed > 0, "{mode:?}: no read saw both profiles");
        eprintln!(
            "{mode:?} {from} → {to}: {} reads with PI, {mixed} named both profiles",
            reads.load(Ordering::SeqCst)
        );
        let named = checked_read_with_pi(&vol, (from, to), &model, 0, BLOCKS);
        assert!(named.iter().all(|&p| p == to));
        check_clean(&vol, "after the re-tag");
        vol.close().unwrap();
    }
}

// ---- Mirror sets ----------------------------------------------------------------------------
//
// Every copy ends with the target's tags (the set and each copy alone read every block
// verified under the target, the copies identical outside their superblocks); a block bad on
// one copy is repaired from a good copy before its re-tag, one bad on every copy keeps its old
// tag, is reported and keeps failing; a degraded set is refused with the copy named and
// nothing written; a copy that fails during the re-tag stops it with the cursor recorded, a
// resync brings the copy onto the target's tags (the step's groups were marked), and the same
// call then completes it. Crashes of the copies, each on its own: `tests/mirror_crash.rs`.

fn dyns(fbs: &[Arc<FaultBackend>], which: &[usize]) -> Vec<Arc<dyn Backend>> {
    which
        .iter()
        .map(|&m| fbs[m].clone() as Arc<dyn Backend>)
        .collect()
}

/// A set of `n` fault-injecting copies, formatted with `mode` and `from`, the pattern written
/// (`write_pattern`): the copies, the open set and the model.
fn written_set(
    n: usize,
    mode: Mode,
    from: Profile,
    to: Profile,
) -> (Vec<Arc<FaultBackend>>, Volume, BTreeMap<u64, Vec<u8>>) {
    let fo = format_opts(mode, from);
    let len = fo.backing_len().unwrap();
    let fbs: Vec<Arc<FaultBackend>> = (0..n)
        .map(|_| Arc::new(FaultBackend::new(len).unwrap()))
        .collect();
    let all: Vec<usize> = (0..n).collect();
    Volume::format_members(dyns(&fbs, &all), &fo)
        .unwrap()
        .close()
        .unwrap();
    let vol = Volume::open_members(dyns(&fbs, &all), &open_opts(from, to)).unwrap();
    let model = write_pattern(&vol);
    (fbs, vol, model)
}

/// Every block of `vol` reads as the model says (zeros where it has nothing), verified, and
/// `check` finds nothing — except the blocks `bad`, which must fail.
fn check_volume(vol: &Volume, model: &BTreeMap<u64, Vec<u8>>, bad: &[u64], what: &str) {
    let mut buf = vec![0u8; BS as usize];
    for b in 0..BLOCKS {
        let r = vol.read_at(&mut buf, b * BS);
        if bad.contains(&b) {
            assert!(
                matches!(r, Err(Error::Corrupt { .. })),
                "{what}: block {b}: {r:?}"
            );
            continue;
        }
        r.unwrap_or_else(|e| panic!("{what}: block {b}: {e}"));
        let want = model.get(&b).cloned().unwrap_or_else(|| vec![0; BS as usize]);
        assert!(buf == want, "{what}: block {b} reads other data");
    }
    let found: Vec<u64> = vol
        .check_blocks(0, BLOCKS)
        .unwrap()
        .iter()
        .map(|p| p.block)
        .collect();
    assert_eq!(found, bad, "{what}: check");
}

/// After the set is closed: each copy alone opens with profile `to` (its key alone), reads as
/// the model says and has `to`'s tags; the copies are identical outside their superblock
/// regions.
fn check_copies(fbs: &[Arc<FaultBackend>], to: Profile, model: &BTreeMap<u64, Vec<u8>>, what: &str) {
    let opts = OpenOptions {
        key: key_for(to, 0x22),
        read_only: true,
        ..OpenOptions::default()
    };
    for m in 0..fbs.len() {
        let alone = Volume::open_members(dyns(fbs, &[m]), &opts)
            .unwrap_or_else(|e| panic!("{what}: copy {m} alone: {e}"));
        assert_eq!(
            (alone.profile(), alone.retag_status()),
            (to, None),
            "{what}: copy {m}"
        );
        check_volume(&alone, model, &[], &format!("{what}, copy {m} alone"));
        check_tags(&alone, to, model, &format!("{what}, copy {m} alone"));
    }
    let first = fbs[0].live_image();
    let end = first.len() - 4096;
    for (m, fb) in fbs.iter().enumerate().skip(1) {
        let img = fb.live_image();
        let differ = (4096..end).find(|&i| img[i] != first[i]);
        assert_eq!(differ, None, "{what}: copies 0 and {m} differ at byte {differ:?}");
    }
}

#[test]
fn every_copy_of_a_mirror_set_is_retagged_while_a_client_writes() {
    for (n, mode, from, to) in [
        (2, Mode::Dual, Profile::Crc32c, Profile::Xxh3),
        (3, Mode::Journal, Profile::HmacSha256, Profile::Blake3Keyed),
        (2, Mode::Rebuild, Profile::Xxh3, Profile::T10Dif),
    ] {
        let what = format!("{n} copies, {} {from} → {to}", mode.name());
        let (fbs, vol, mut model) = written_set(n, mode, from, to);
        let mut round = 1;
        let report = retag(&vol, to, &mut |done, total| {
            if done > 0 && done < total {
                client_round(&vol, done, 1, &mut round, &mut model);
            }
        })
        .unwrap_or_else(|e| panic!("{what}: {e}"));
        assert!(report.complete, "{what}: {report:?}");
        assert!(
            report.bad_blocks.is_empty() && report.damaged.is_empty() && report.repaired == 0,
            "{what}: {report:?}"
        );
        assert_eq!(vol.profile(), to);
        check_volume(&vol, &model, &[], &what);
        vol.close().unwrap();
        check_copies(&fbs, to, &model, &what);
    }
}

/// A re-tag of a 2-copy set with the block copies `bad_copies` (copy, block) damaged: `bad`
/// reported (and failing), `repaired` copies rewritten first, the rest reads everywhere.
fn retag_with_bad_copies(bad_copies: &[(usize, u64)], bad: &[u64], repaired: u64) {
    let (from, to) = (Profile::Crc32c, Profile::Crc64Nvme);
    let (fbs, vol, model) = written_set(2, Mode::Dual, from, to);
    for &(m, b) in bad_copies {
        fbs[m].flip_bit(vol.geometry().data_offset(b) + 77, 3).unwrap();
    }
    let report = retag(&vol, to, &mut |_, _| {}).unwrap();
    let what = format!("bad copies {bad_copies:?}: {report:?}");
    assert!(report.complete, "{what}");
    let found: Vec<u64> = report.bad_blocks.iter().map(|p| p.block).collect();
    assert_eq!((found.as_slice(), report.repaired), (bad, repaired), "{what}");
    check_volume(&vol, &model, bad, &what);
    vol.close().unwrap();
    if bad.is_empty() {
        check_copies(&fbs, to, &model, &what);
    }
}

#[test]
fn a_block_bad_on_one_copy_is_repaired_before_its_retag() {
    // Block 9 bad on copy 1, block 30 on copy 0: whichever copy a step reads from, one of
    // them is read from its bad copy.
    retag_with_bad_copies(&[(1, 9), (0, 30)], &[], 2);
}

#[test]
fn a_block_bad_on_every_copy_is_reported_and_keeps_failing() {
    retag_with_bad_copies(&[(0, 20), (1, 20)], &[20], 0);
}

/// The re-tag is refused naming copy `m` as out of sync, with the way out.
fn refused_naming_copy(r: &blockguard::Result<RetagReport>, m: usize) {
    match r {
        Err(e @ Error::InvalidArgument { .. }) => {
            let s = e.to_string();
            assert!(
                s.contains(&format!("copy {m} ("))
                    && s.contains("out of sync")
                    && s.contains("mirror resync"),
                "{s}"
            );
        }
        other => panic!("not refused: {other:?}"),
    }
}

/// A degraded set is refused, naming the copy, writing nothing; a copy failing during a
/// re-tag stops it, and after a resync the same call completes it. `groups_only`: the copy
/// fails writes to the groups (metadata and data) only, so it drops out inside a step, at the
/// step's metadata writes (the step completes on the other copy, and the group it re-tagged
/// reaches the dropped copy at the resync because the step marked it first); else it fails
/// everywhere and drops out at the record of the cursor after the step.
fn refused_then_dropped_midway(groups_only: bool) {
    let (from, to) = (Profile::Crc32c, Profile::Xxh3);
    let what = if groups_only {
        "failing in the groups"
    } else {
        "failing everywhere"
    };
    let (fbs, vol, mut model) = written_set(2, Mode::Dual, from, to);
    let geo = *vol.geometry();
    // Copy 1 drops out at a flush; the set is degraded.
    fbs[1].fail_writes_at(0..geo.backing_len);
    vol.write_at(&content(0, 9), 0).unwrap();
    model.insert(0, content(0, 9));
    vol.flush().unwrap();
    assert!(!vol.members()[1].1, "copy 1 is still in sync");
    let before = fbs[0].live_image();
    refused_naming_copy(&retag(&vol, to, &mut |_, _| {}), 1);
    assert!(fbs[0].live_image() == before, "a refused re-tag wrote");
    assert_eq!(vol.retag_status(), None);
    fbs[1].clear_faults();
    vol.resync(&mut |_, _| {}).unwrap();

    let failing = if groups_only {
        geo.first_group_offset..geo.map_offset(blockguard::format::MapKind::Written, 1)
    } else {
        0..geo.backing_len
    };
    let r = retag(&vol, to, &mut |done, _| {
        if done == 3 {
            fbs[1].fail_writes_at(failing.clone());
        }
    });
    refused_naming_copy(&r, 1);
    let cursor = vol.retag_status().unwrap().cursor;
    assert_eq!(cursor, if groups_only { 4 } else { 3 }, "{what}");
    let (sb, _) = Volume::read_superblock(&*fbs[0]).unwrap();
    assert_eq!(
        sb.retag.map(|r| (r.target, r.cursor)),
        Some((to, cursor)),
        "{what}"
    );
    // Still refused until the copy is back; the data reads meanwhile.
    refused_naming_copy(&retag(&vol, to, &mut |_, _| {}), 1);
    check_volume(&vol, &model, &[], &format!("{what}: degraded, mid-re-tag"));
    fbs[1].clear_faults();
    let resync = vol.resync(&mut |_, _| {}).unwrap();
    assert!(resync.groups >= 1, "{what}: {resync:?}");
    let report = retag(&vol, to, &mut |_, _| {}).unwrap();
    assert!(
        report.complete && report.bad_blocks.is_empty(),
        "{what}: {report:?}"
    );
    assert_eq!(report.started_at, cursor, "{what}");
    check_volume(&vol, &model, &[], &format!("{what}: resumed"));
    vol.close().unwrap();
    check_copies(&fbs, to, &model, &format!("{what}: resynced and resumed"));
}

#[test]
fn a_degraded_set_is_refused_and_a_copy_dropped_midway_is_resynced_onto_the_target() {
    refused_then_dropped_midway(false);
    refused_then_dropped_midway(true);
}

/// A keyed volume whose superblocks someone without the key rewrote to say "re-tag to
/// crc32c, every group done" — so that forged crc32c tags would verify — is refused at open
/// with nothing written: with a made-up seal as a re-tag not sealed with the volume's key,
/// with none as a damaged superblock.
#[test]
fn a_forged_retag_away_from_the_key_is_refused_at_open() {
    use blockguard::format::{tags_incompat, Retag, Superblock, INCOMPAT_RETAG};
    let from = Profile::Blake3Keyed;
    let fo = format_opts(Mode::Dual, from);
    let backend = Arc::new(FaultBackend::new(fo.backing_len().unwrap()).unwrap());
    let vol = Volume::format(backend.clone(), &fo).unwrap();
    write_pattern(&vol);
    vol.close().unwrap();
    let (sb, _) = Volume::read_superblock(&*backend).unwrap();
    for (seal, what) in [([0x5c; 32], "a made-up seal"), ([0; 32], "no seal")] {
        let retag = Retag {
            target: Profile::Crc32c,
            cursor: sb.geometry.groups,
            key_check: seal,
        };
        // Every feature bit as this build would set it: only the seal is wrong.
        let forged = Superblock {
            incompat: sb.incompat | INCOMPAT_RETAG | tags_incompat(from, sb.geometry.tag_size, Some(&retag)),
            retag: Some(retag),
            ..sb.clone()
        };
        backend.write_at(&forged.encode(0), 0).unwrap();
        backend
            .write_at(&forged.encode(1), sb.geometry.backup_sb_offset)
            .unwrap();
        let image = backend.live_image();
        let opts = OpenOptions {
            key: key_for(from, 0x11),
            ..OpenOptions::default()
        };
        match Volume::open(backend.clone(), &opts) {
            Ok(_) => panic!("{what}: opened"),
            Err(e) => {
                println!("{what}: {e}");
                if what == "a made-up seal" {
                    assert!(
                        matches!(
                            &e,
                            Error::Key {
                                problem: KeyError::RetagUnsealed { .. },
                                ..
                            }
                        ),
                        "{what}: {e}"
                    );
                    assert!(e.to_string().contains("not sealed"), "{e}");
                }
            }
        }
        assert!(backend.live_image() == image, "{what}: something was written");
    }
}

/// Protection information of a volume with room in its tag slots is slot-wide: the profile's
/// tuple followed by zeros, which a write must supply as such; after a re-tag to a profile of
/// the slot's size it is that profile's whole tuple.
#[test]
fn protection_information_is_as_wide_as_the_tag_slots() {
    let fo = format_opts_in(Mode::Dual, Profile::T10Dif, Some(32));
    let backend = Arc::new(FaultBackend::new(fo.backing_len().unwrap()).unwrap());
    let vol = Volume::format(backend.clone(), &fo).unwrap();
    assert_eq!(vol.pi_size(), 32);
    let data = content(3, 0);
    let mut pi = vec![0u8; 32];
    pi[..8].copy_from_slice(vol.tagger().generate(3, &data).as_bytes());
    assert_eq!(&pi[4..8], &[0, 0, 0, 3], "the T10 reference tag");
    vol.write_with_pi(&data, &pi, 3 * BS).unwrap();
    let (mut back, mut back_pi) = (vec![0u8; BS as usize], vec![0u8; 32]);
    vol.read_with_pi(&mut back, &mut back_pi, 3 * BS).unwrap();
    assert!(back == data && back_pi == pi);
    // The right tuple with a byte of its padding set is not the block's: refused.
    let other = content(3, 1);
    let mut bad = vec![0u8; 32];
    bad[..8].copy_from_slice(vol.tagger().generate(3, &other).as_bytes());
    bad[31] = 1;
    assert!(matches!(
        vol.write_with_pi(&other, &bad, 3 * BS),
        Err(Error::ProtectionMismatch { block: 3, .. })
    ));
    // A tuple of the wrong length (the profile's 8 bytes alone): refused.
    assert!(vol.write_with_pi(&other, &bad[..8], 3 * BS).is_err());
    vol.read_at(&mut back, 3 * BS).unwrap();
    assert!(back == data, "a refused write changed the block");
    // Re-tagged to a 32-byte profile, the tuples are its own.
    let key = key(0x22);
    let opts = RetagOptions {
        key: Some(&key),
        ..RetagOptions::new(Profile::HmacSha256)
    };
    assert!(vol.retag(&opts, &mut |_, _| {}).unwrap().complete);
    let made_by = vol.read_with_pi(&mut back, &mut back_pi, 3 * BS).unwrap();
    assert_eq!(made_by.profile(3), Profile::HmacSha256);
    assert_eq!(back_pi, vol.tagger().generate(3, &data).as_bytes());
    vol.close().unwrap();
}

/// A re-tag away from a key, stopped, is refused at the next open unless the opener confirms
/// it by naming its target (`OpenOptions::retag_to`): nothing on the disk tells a record the
/// owner made from one put back later. Refused with nothing written; confirmed, it opens and
/// resumes; once complete the confirmation is no longer needed.
#[test]
fn a_stopped_retag_away_from_a_key_opens_only_confirmed() {
    let (from, to) = (Profile::HmacSha256, Profile::Crc32c);
    let fo = format_opts(Mode::Dual, from);
    let backend = Arc::new(FaultBackend::new(fo.backing_len().unwrap()).unwrap());
    let vol = Volume::format(backend.clone(), &fo).unwrap();
    let model = write_pattern(&vol);
    let stop = AtomicBool::new(true);
    let stopped = vol
        .retag(
            &RetagOptions {
                stop: Some(&stop),
                ..RetagOptions::new(to)
            },
            &mut |_, _| {},
        )
        .unwrap();
    assert!(!stopped.complete);
    vol.close().unwrap();
    let image = backend.live_image();
    for (retag_to, what) in [(None, "unconfirmed"), (Some(Profile::Xxh3), "another target")] {
        let opts = OpenOptions {
            retag_to,
            ..open_opts(from, to)
        };
        match Volume::open(backend.clone(), &opts) {
            Ok(_) => panic!("{what}: opened"),
            Err(e) => {
                assert!(
                    matches!(
                        &e,
                        Error::Key {
                            problem: KeyError::RetagUnconfirmed { .. },
                            ..
                        }
                    ),
                    "{what}: {e}"
                );
                assert!(e.to_string().contains("--retag-to crc32c"), "{e}");
            }
        }
        assert!(backend.live_image() == image, "{what}: something was written");
    }
    let vol = Volume::open(backend.clone(), &open_opts(from, to)).unwrap();
    check_reads(&vol, &model, "confirmed");
    assert!(retag(&vol, to, &mut |_, _| {}).unwrap().complete);
    vol.close().unwrap();
    let vol = Volume::open(backend, &OpenOptions::default()).unwrap();
    check_reads(&vol, &model, "complete, unconfirmed");
    vol.close().unwrap();
}
