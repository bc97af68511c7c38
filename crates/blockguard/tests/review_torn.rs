//! Outside review of commit 5dd9893: recovery marks a block that matches neither brother
//! after a crash TORN (every slot byte 0xFF), so a later torn write can never complete the
//! first torn write's version (G2).
//!
//! The review's three findings are fixed; their tests keep their scenarios:
//! - `scarred_older_brother_does_not_stop_the_torn_mark_and_b_never_comes_back` (was a
//!   `bug_` test): a torn block in a pair whose older brother is scarred (and no other block
//!   reverted) was left with the torn write's tag as the newest (`reverted_tags` returned
//!   `Err`, the pair was left as it was); the fuzzer's double crash then brought B back (G2).
//!   Recovery now marks it torn and reports it as suspected metadata damage.
//! - `rebuild_of_a_damaged_newest_keeps_the_torn_mark` (was a `bug_` test): `recover
//!   --rebuild` of a pair whose newest brother (holding TORN) is destroyed copied the older
//!   brother — B's tag — back as the newest; same double crash, same result. A rebuild now
//!   marks torn every block whose data does not match the tag it copies.
//! - (CLI, `crates/blockguard-cli/tests/review_torn_cli.rs`) `recover`'s summary never said
//!   that blocks were marked torn; it does now.
//!
//! Every other test is an attack that held. Randomized tests print their seed.

mod scar_support;

use blockguard::blockguard_backend::{Backend, Event, FaultBackend, MemoryBackend};
use blockguard::tag::Tag;
use blockguard::{CorruptionKind, FormatOptions, Mode, OpenOptions, Profile, RecoverOptions, Volume};
use scar_support::{corrupt_kind, dyns, mirror_torn_write, Layout, BS};
use std::sync::Arc;
use std::time::Duration;

fn opts() -> OpenOptions {
    OpenOptions {
        background_commit: false,
        stage_bytes: 3 * BS,
        dirty_clear_interval: Duration::from_secs(3600),
        ..OpenOptions::default()
    }
}

fn ro() -> OpenOptions {
    OpenOptions {
        read_only: true,
        ..opts()
    }
}

fn fmt(mode: Mode, profile: Profile, tag_room: Option<usize>) -> FormatOptions {
    let mut f = FormatOptions::with_size(2 * 496 * BS as u64);
    f.mode = mode;
    f.profile = profile;
    f.tag_room = tag_room;
    f.uuid = Some([0x42; 16]);
    f.key = profile.is_keyed().then(scar_support::key);
    f
}

fn opts_for(p: Profile) -> OpenOptions {
    OpenOptions {
        key: p.is_keyed().then(scar_support::key),
        ..opts()
    }
}

/// A formatted, closed volume on a fault backend whose history starts now.
fn formatted(f: &FormatOptions) -> Arc<FaultBackend> {
    let fb = Arc::new(FaultBackend::new(f.backing_len().unwrap()).unwrap());
    Volume::format(fb.clone(), f).unwrap().close().unwrap();
    fb.flush().unwrap();
    fb.forget_history();
    fb
}

/// Eight 512-byte sectors, each filled with one byte of `sectors` (a small alphabet, so one
/// version's sectors can complete another's).
fn ver(sectors: [u8; 8]) -> Vec<u8> {
    let mut b = vec![0u8; BS];
    for (i, s) in sectors.iter().enumerate() {
        b[i * 512..(i + 1) * 512].fill(*s);
    }
    b
}

fn read(vol: &Volume, block: u64) -> blockguard::Result<Vec<u8>> {
    let mut b = vec![0u8; BS];
    vol.read_at(&mut b, block * BS as u64)?;
    Ok(b)
}

fn kind(r: &blockguard::Result<Vec<u8>>) -> Option<CorruptionKind> {
    r.as_ref().err().and_then(corrupt_kind)
}

/// Writes `data` to `block` through `vol` (on `fb`) and flushes, tearing the block's data
/// write with `mask` (one flag per 512-byte sector). Returns the disk a power loss leaves
/// right after that torn write, before the flush that follows it: everything issued until
/// then kept (the metadata is durable by then, the data write is in flight).
fn torn_write(fb: &FaultBackend, vol: &Volume, block: u64, data: &[u8], mask: Vec<bool>) -> Vec<u8> {
    let at = vol.geometry().data_offset(block);
    let len = data.len() as u64;
    let start = fb.events().len();
    fb.tear_writes_with(move |off, l| (off == at && l as u64 == len).then(|| mask.clone()));
    vol.write_at(data, block * BS as u64).unwrap();
    vol.flush().unwrap();
    fb.clear_faults();
    let events = fb.events();
    let torn = (start..events.len())
        .find(|&i| matches!(&events[i], Event::TornWrite { offset, .. } if *offset == at))
        .expect("the data write was torn");
    let mut end = torn + 1;
    while end < events.len()
        && matches!(&events[end], Event::Write { write, .. } if write.offset >= at && write.end() <= at + len)
    {
        end += 1;
    }
    let st = fb.state_at(end);
    let all: Vec<usize> = (0..st.unflushed().len()).collect();
    st.crash_image(&all)
}

const FIRST_HALF: [bool; 8] = [true, true, true, true, false, false, false, false];
const SECOND_HALF: [bool; 8] = [false, false, false, false, true, true, true, true];

// The versions of the fuzzer's case: A durable; B torn (its first half lands); C agrees with
// B in B's second half, and its torn write lands only that half: together B exactly.
fn a() -> Vec<u8> {
    ver([1, 1, 1, 1, 1, 1, 1, 1])
}
fn b() -> Vec<u8> {
    ver([2, 2, 2, 2, 3, 3, 3, 3])
}
fn c() -> Vec<u8> {
    ver([4, 4, 4, 4, 3, 3, 3, 3])
}

/// A volume whose block 0 holds A (flushed, with block 1 written after it so both brothers of
/// pair 0 hold A's tag), then B torn by a crash: the crash image.
fn a_then_b_torn(f: &FormatOptions, o: &OpenOptions) -> Vec<u8> {
    let fb = formatted(f);
    let vol = Volume::open(fb.clone(), o).unwrap();
    vol.write_at(&a(), 0).unwrap();
    vol.flush().unwrap();
    vol.write_at(&ver([9; 8]), BS as u64).unwrap();
    vol.flush().unwrap();
    let img = torn_write(&fb, &vol, 0, &b(), FIRST_HALF.to_vec());
    drop(vol);
    img
}

/// After crash 1 (B torn) and recovery on `img`: writes C, torn so that only its second half
/// lands, and returns the crash image of that.
fn then_c_torn(img: Vec<u8>, o: &OpenOptions) -> Vec<u8> {
    let fb = Arc::new(FaultBackend::from_image(img));
    let vol = Volume::open(fb.clone(), o).unwrap();
    let img = torn_write(&fb, &vol, 0, &c(), SECOND_HALF.to_vec());
    drop(vol);
    img
}

/// Block 0 after crash 2 must be C or fail: never B (never durable) nor A (replaced).
fn assert_not_resurrected(r: &blockguard::Result<Vec<u8>>, what: &str) {
    if let Ok(d) = r {
        assert!(
            *d == c(),
            "{what}: block 0 read back a version that is neither durable nor written since (B: {}, A: {})",
            *d == b(),
            *d == a()
        );
    }
}

#[test]
fn torn_write_completing_an_older_torn_write_fails_after_every_kind_of_open() {
    for p in [Profile::Crc32c, Profile::NvmePi64, Profile::HmacSha256] {
        let o = opts_for(p);
        let img1 = a_then_b_torn(&fmt(Mode::Dual, p, None), &o);
        let mb = Arc::new(MemoryBackend::from_vec(img1.clone()));
        let vol = Volume::open(mb, &o).unwrap();
        let rep = vol.recovery_at_open().unwrap().clone();
        assert_eq!(rep.blocks_torn, 1, "{p}: {rep:?}");
        assert_eq!(kind(&read(&vol, 0)), Some(CorruptionKind::Torn), "{p}");
        assert_eq!(read(&vol, 1).unwrap(), ver([9; 8]));
        vol.close().unwrap();
        let img2 = then_c_torn(img1, &o);
        // Read-only, before any recovery.
        let vol = Volume::open(
            Arc::new(MemoryBackend::from_vec(img2.clone())),
            &OpenOptions {
                read_only: true,
                ..o.clone()
            },
        )
        .unwrap();
        assert_not_resurrected(&read(&vol, 0), &format!("{p} read-only"));
        drop(vol);
        // Read-write (recovery at open), then again after a clean close.
        let mb = Arc::new(MemoryBackend::from_vec(img2.clone()));
        let vol = Volume::open(mb.clone(), &o).unwrap();
        assert_eq!(vol.recovery_at_open().unwrap().blocks_torn, 1, "{p}");
        let r = read(&vol, 0);
        assert_not_resurrected(&r, &format!("{p} recovered"));
        assert_eq!(kind(&r), Some(CorruptionKind::Torn), "{p}");
        vol.close().unwrap();
        let vol = Volume::open(mb, &o).unwrap();
        assert_eq!(kind(&read(&vol, 0)), Some(CorruptionKind::Torn), "{p}");
        // A third crash with nothing written: still torn, nothing re-counted.
        drop(vol);
        // Volume::recover explicitly on a read-write open of the crash image.
        let vol = Volume::open(Arc::new(MemoryBackend::from_vec(img2)), &o).unwrap();
        let rep = vol.recover(RecoverOptions::default(), &mut |_, _| {}).unwrap();
        assert!(rep.already_clean, "{p}: {rep:?}");
        assert_eq!(kind(&read(&vol, 0)), Some(CorruptionKind::Torn), "{p}");
    }
}

/// Flips one bit in the body of a metadata sector (a tag byte of block `j`): a scar (header
/// intact, checksum wrong).
fn scar(img: &mut [u8], lay: &Layout, slot: usize, k: usize, j: usize) {
    img[lay.tag(slot, k, j)] ^= 0x10;
}

/// FINDING (fixed): the older brother of block 0's pair is scarred when the crash tears B, and no
/// other block of the pair needs reverting: recovery reports the pair (`Unprovable`) and
/// leaves it as it is — B's tag stays the newest, not TORN. The next write's commit then keeps
/// B's tag as the older brother, exactly the state commit 5dd9893 exists to prevent, and a torn
/// C completing B brings B back: a version that was never durable.
#[test]
fn scarred_older_brother_does_not_stop_the_torn_mark_and_b_never_comes_back() {
    let o = opts();
    let f = fmt(Mode::Dual, Profile::Crc32c, None);
    let mut img1 = a_then_b_torn(&f, &o);
    let lay = {
        let v = Volume::open(Arc::new(MemoryBackend::from_vec(img1.clone())), &ro()).unwrap();
        Layout::of(&v, 0)
    };
    let older = 1 - lay.newest(&img1, 0);
    // The scar hits the tag of an unrelated block (5) in the older brother.
    scar(&mut img1, &lay, older, 0, 5);
    let vol = Volume::open(Arc::new(MemoryBackend::from_vec(img1.clone())), &o).unwrap();
    let rep = vol.recovery_at_open().unwrap().clone();
    // (What recovery does today: reports the scarred pair, marks nothing torn.)
    eprintln!(
        "recovery 1: blocks_torn {} damaged {:?}",
        rep.blocks_torn, rep.damaged
    );
    assert!(read(&vol, 0).is_err());
    drop(vol);
    // The session after crash 1 writes C; crash 2 tears it.
    let fb = Arc::new(FaultBackend::from_image(img1));
    let vol = Volume::open(fb.clone(), &o).unwrap();
    let img2 = torn_write(&fb, &vol, 0, &c(), SECOND_HALF.to_vec());
    drop(vol);
    let r_ro = read(
        &Volume::open(Arc::new(MemoryBackend::from_vec(img2.clone())), &ro()).unwrap(),
        0,
    );
    let r_rw = read(
        &Volume::open(Arc::new(MemoryBackend::from_vec(img2)), &o).unwrap(),
        0,
    );
    eprintln!(
        "after crash 2: read-only open returns B: {}; recovered returns B: {}",
        r_ro.as_ref().is_ok_and(|d| *d == b()),
        r_rw.as_ref().is_ok_and(|d| *d == b())
    );
    assert_not_resurrected(&r_ro, "read-only open after crash 2");
    assert_not_resurrected(&r_rw, "recovered after crash 2");
}

/// Same, but another block of the pair needs its older tag back: the pair is rewritten and
/// the suspect block gets TORN (what the docs promise). Held.
#[test]
fn scarred_older_brother_with_a_reverted_block_marks_the_torn_block() {
    let o = opts();
    let f = fmt(Mode::Dual, Profile::Crc32c, None);
    let fb = formatted(&f);
    let vol = Volume::open(fb.clone(), &o).unwrap();
    vol.write_at(&a(), 0).unwrap();
    vol.write_at(&ver([7; 8]), 2 * BS as u64).unwrap();
    vol.flush().unwrap();
    vol.write_at(&ver([9; 8]), BS as u64).unwrap();
    vol.flush().unwrap();
    // One batch writes B to block 0 (torn) and a new version to block 2 (whose data write
    // never lands: it must be reverted).
    let at0 = vol.geometry().data_offset(0);
    let at2 = vol.geometry().data_offset(2);
    let start = fb.events().len();
    fb.tear_writes_with(move |off, _| (off == at0).then(|| FIRST_HALF.to_vec()));
    vol.write_at(&b(), 0).unwrap();
    vol.write_at(&ver([8; 8]), 2 * BS as u64).unwrap();
    vol.flush().unwrap();
    fb.clear_faults();
    let events = fb.events();
    let last_data = (start..events.len())
        .rev()
        .find(|&i| matches!(&events[i], Event::Write { write, .. } if write.offset >= at0 && write.offset < at2 + BS as u64))
        .unwrap();
    let st = fb.state_at(last_data + 1);
    // Keep everything but the data write of block 2.
    let keep: Vec<usize> = (0..st.unflushed().len())
        .filter(|&i| {
            let w = &st.unflushed()[i];
            !(w.offset <= at2 && at2 < w.end())
        })
        .collect();
    let mut img = st.crash_image(&keep);
    drop(vol);
    let lay = {
        let v = Volume::open(Arc::new(MemoryBackend::from_vec(img.clone())), &ro()).unwrap();
        Layout::of(&v, 0)
    };
    let older = 1 - lay.newest(&img, 0);
    scar(&mut img, &lay, older, 0, 5);
    let vol = Volume::open(Arc::new(MemoryBackend::from_vec(img)), &o).unwrap();
    let rep = vol.recovery_at_open().unwrap().clone();
    assert_eq!((rep.blocks_reverted, rep.blocks_torn), (1, 1), "{rep:?}");
    assert_eq!(kind(&read(&vol, 0)), Some(CorruptionKind::Torn));
    assert_eq!(read(&vol, 2).unwrap(), ver([7; 8]));
}

// ---------------------------------------------------------------------------------------
// Randomized: sessions of rewrites of a few blocks of one pair, versions made of a small
// alphabet of sector contents (so a torn write can complete another version), each session
// crashed at a random point of its history — recovery at its open included — with unflushed
// writes dropped, reordered and torn at 512 bytes. After every crash, read-only and
// recovered: a block reads as the version durable at the last completed flush, one written
// since, or fails (G2); a block with nothing written since whose durable version is on disk
// whole reads (G1).

use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;

const MODEL_BLOCKS: u64 = 5;

/// The volume blocks the model's blocks 0..MODEL_BLOCKS are: two in pair 0, one in pair 1 of
/// group 0, two in group 1.
fn model_block(i: u64) -> u64 {
    [0, 1, 62, 496, 497][i as usize]
}

struct Op {
    /// Backend event count when the operation started and when it returned.
    start: usize,
    end: usize,
    /// Some((block, version)) for a write, None for a flush.
    write: Option<(u64, Vec<u8>)>,
}

fn random_version(rng: &mut ChaCha8Rng, like: Option<&Vec<u8>>) -> Vec<u8> {
    let mut s = [0u8; 8];
    for (i, x) in s.iter_mut().enumerate() {
        *x = match like {
            // Mostly the sectors of an earlier version, so tears can complete versions.
            Some(v) if rng.random_bool(0.6) => v[i * 512],
            _ => rng.random_range(1..4u8),
        };
    }
    if rng.random_ratio(1, 12) {
        return vec![0u8; BS];
    }
    ver(s)
}

/// Per model block: its durable version (`None`: none, it may fail), and the versions written
/// since.
type Allowed = (Vec<Option<Vec<u8>>>, Vec<Vec<Vec<u8>>>);

/// The versions of each block a crash after `n` events may leave readable.
fn allowed(durable0: &[Option<Vec<u8>>], ops: &[Op], n: usize) -> Allowed {
    let mut durable = durable0.to_vec();
    let mut current = durable0.to_vec();
    let mut since: Vec<Vec<Vec<u8>>> = vec![Vec::new(); MODEL_BLOCKS as usize];
    for op in ops.iter().filter(|op| op.start < n) {
        match &op.write {
            Some((b, v)) => {
                current[*b as usize] = Some(v.clone());
                since[*b as usize].push(v.clone());
            }
            None if op.end <= n => {
                durable.clone_from(&current);
                for s in &mut since {
                    s.clear();
                }
            }
            None => {}
        }
    }
    (durable, since)
}

fn check_image(
    img: &[u8],
    durable: &[Option<Vec<u8>>],
    since: &[Vec<Vec<u8>>],
    what: &str,
) -> Vec<Option<Vec<u8>>> {
    let mut seen = Vec::new();
    for read_only in [true, false] {
        let mb = Arc::new(MemoryBackend::from_vec(img.to_vec()));
        let o = if read_only { ro() } else { opts() };
        let vol = Volume::open(mb, &o).unwrap();
        seen.clear();
        for blk in 0..MODEL_BLOCKS {
            let r = read(&vol, model_block(blk));
            let at = vol.geometry().data_offset(model_block(blk)) as usize;
            let on_disk = &img[at..at + BS];
            let i = blk as usize;
            match &r {
                Ok(d) => assert!(
                    durable[i].as_ref() == Some(d) || since[i].contains(d),
                    "{what} (read_only {read_only}): block {blk} read back a version neither durable nor written since: {:?}",
                    d.chunks(512).map(|s| s[0]).collect::<Vec<_>>()
                ),
                Err(e) => assert!(
                    !(since[i].is_empty() && durable[i].as_deref() == Some(on_disk)),
                    "{what} (read_only {read_only}): block {blk} holds its durable version whole, nothing written since, and fails: {e}"
                ),
            }
            seen.push(r.ok());
        }
    }
    seen
}

fn chains() -> usize {
    std::env::var("REVIEW_TORN_CHAINS")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(150)
}

#[test]
fn random_multi_crash_sessions_keep_g1_and_g2() {
    let seed: u64 = std::env::var("BLOCKGUARD_SEED")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(0x70_52_4E);
    println!("seed {seed}");
    let mut rng = ChaCha8Rng::seed_from_u64(seed);
    let f = fmt(Mode::Dual, Profile::Crc32c, None);
    let mut runs = 0;
    let mut torn_seen = 0u64;
    for chain in 0..chains() {
        let fb = formatted(&f);
        let mut img = fb.durable_image();
        let mut durable0: Vec<Option<Vec<u8>>> = vec![Some(vec![0u8; BS]); MODEL_BLOCKS as usize];
        let mut last: Vec<Vec<u8>> = vec![vec![0u8; BS]; MODEL_BLOCKS as usize];
        for session in 0..6 {
            let what = format!("seed {seed} chain {chain} session {session}");
            let fb = Arc::new(FaultBackend::from_image(img.clone()));
            // Odd chains: dirty bits cleared at every flush, no metadata cache to speak of.
            let session = if chain % 2 == 1 {
                OpenOptions {
                    dirty_clear_interval: Duration::ZERO,
                    cache_bytes: 0,
                    ..opts()
                }
            } else {
                opts()
            };
            let vol = Volume::open(fb.clone(), &session).unwrap();
            if let Some(r) = vol.recovery_at_open() {
                torn_seen += r.blocks_torn;
            }
            let mut ops = Vec::new();
            for _ in 0..rng.random_range(1..7) {
                let start = fb.events().len();
                if rng.random_ratio(1, 3) {
                    vol.flush().unwrap();
                    ops.push(Op {
                        start,
                        end: fb.events().len(),
                        write: None,
                    });
                } else {
                    let blk = rng.random_range(0..MODEL_BLOCKS);
                    let v = random_version(&mut rng, Some(&last[blk as usize]));
                    last[blk as usize].clone_from(&v);
                    if v.iter().all(|&x| x == 0) && rng.random_bool(0.5) {
                        vol.write_zeroes(model_block(blk) * BS as u64, BS as u64).unwrap();
                    } else {
                        vol.write_at(&v, model_block(blk) * BS as u64).unwrap();
                    }
                    ops.push(Op {
                        start,
                        end: fb.events().len(),
                        write: Some((blk, v)),
                    });
                }
            }
            let start = fb.events().len();
            vol.flush().unwrap();
            ops.push(Op {
                start,
                end: fb.events().len(),
                write: None,
            });
            drop(vol);
            let total = fb.events().len();
            // Mostly right after a write (something in flight), else anywhere.
            let events = fb.events();
            let writes: Vec<usize> = (0..total)
                .filter(|&i| matches!(events[i], Event::Write { .. }))
                .collect();
            let n = if !writes.is_empty() && rng.random_bool(0.8) {
                writes[rng.random_range(0..writes.len())] + 1
            } else {
                rng.random_range(0..=total)
            };
            let st = fb.state_at(n);
            let crash = st.random_crash_image(&mut rng, true);
            let (durable, since) = allowed(&durable0, &ops, n);
            let seen = check_image(
                &crash,
                &durable,
                &since,
                &format!("{what} crash at event {n}/{total}"),
            );
            runs += 1;
            // The next session starts from this crash; what it reads now is its durable state.
            img = crash;
            durable0 = seen;
        }
    }
    println!("{runs} crashes, {torn_seen} blocks marked torn");
    assert!(torn_seen > 0, "the workload never tore a block");
}

/// A recovered volume whose block 0 is TORN (A, then B torn; block 1 written after A).
fn torn_volume(f: &FormatOptions, o: &OpenOptions) -> (Arc<MemoryBackend>, Volume) {
    let img = a_then_b_torn(f, o);
    let mb = Arc::new(MemoryBackend::from_vec(img));
    let vol = Volume::open(mb.clone(), o).unwrap();
    assert_eq!(vol.recovery_at_open().unwrap().blocks_torn, 1);
    (mb, vol)
}

#[test]
fn torn_block_surfaces_report_it_as_torn_and_allocated() {
    let o = opts();
    let (_mb, vol) = torn_volume(&fmt(Mode::Dual, Profile::Crc32c, None), &o);
    // Partial writes read, verify and merge: refused, as torn, nothing staged.
    let e = vol.write_at(&[7u8; 100], 10).unwrap_err();
    assert_eq!(corrupt_kind(&e), Some(CorruptionKind::Torn), "{e}");
    assert_eq!(kind(&read(&vol, 0)), Some(CorruptionKind::Torn));
    // A sub-block read fails too.
    let mut small = [0u8; 100];
    assert_eq!(
        corrupt_kind(&vol.read_at(&mut small, 512).unwrap_err()),
        Some(CorruptionKind::Torn)
    );
    // Not a hole.
    let ext = vol.extents(0, BS as u64).unwrap();
    assert!(ext.iter().all(|e| e.allocated), "{ext:?}");
    // check_blocks, scrub, inspect_block list it.
    let probs = vol.check_blocks(0, 4).unwrap();
    assert_eq!(
        probs.iter().map(|p| p.block).collect::<Vec<_>>(),
        vec![0],
        "{probs:?}"
    );
    assert!(probs[0].detail.contains("torn"), "{probs:?}");
    let s = scar_support::scrub(&vol, true);
    assert_eq!(
        s.problems.iter().map(|p| p.block).collect::<Vec<_>>(),
        vec![0],
        "{s:?}"
    );
    assert_eq!(s.repaired, 0);
    let ins = vol.inspect_block(0).unwrap();
    assert!(
        ins.slots.iter().any(|s| s.tag.as_deref() == Some("torn")),
        "{ins:?}"
    );
    // DIX: the reserved value is refused as a caller's tuple; a read fails as torn.
    let mut pi = vec![0u8; vol.pi_size()];
    let mut data = vec![0u8; BS];
    let e = vol.read_with_pi(&mut data, &mut pi, 0).unwrap_err();
    assert_eq!(corrupt_kind(&e), Some(CorruptionKind::Torn), "{e}");
    assert!(vol.write_with_pi(&c(), &[0xFF; 8], 0).is_err());
    assert_eq!(kind(&read(&vol, 0)), Some(CorruptionKind::Torn));
    // A whole write with the right tuple reads again.
    let t = vol.tagger().generate(0, &c());
    vol.write_with_pi(&c(), &t.to_bytes(8)[..8], 0).unwrap();
    assert_eq!(read(&vol, 0).unwrap(), c());
    vol.flush().unwrap();
    vol.close().unwrap();
}

#[test]
fn zeroing_or_discarding_a_torn_block_and_crashing_in_the_middle() {
    let o = opts();
    for discard in [false, true] {
        let (mb, vol) = torn_volume(&fmt(Mode::Dual, Profile::Crc32c, None), &o);
        vol.close().unwrap();
        let fb = Arc::new(FaultBackend::from_image(mb.snapshot()));
        fb.forget_history();
        let vol = Volume::open(fb.clone(), &o).unwrap();
        if discard {
            vol.discard(0, BS as u64).unwrap();
        } else {
            vol.write_zeroes(0, BS as u64).unwrap();
        }
        assert_eq!(read(&vol, 0).unwrap(), vec![0u8; BS]);
        vol.flush().unwrap();
        drop(vol);
        // Every crash point, every order, plus tears of each pending write.
        let mut checked = 0;
        fb.for_each_history_point(|n, st| {
            let mut images = Vec::new();
            st.for_each_crash_image(4096, |img| images.push(img)).unwrap();
            for (i, w) in st.unflushed().iter().enumerate() {
                let k = w.sector_count();
                if k > 1 {
                    let mut m = vec![false; k];
                    m[..k / 2].fill(true);
                    let all: Vec<(usize, Vec<bool>)> = (0..st.unflushed().len())
                        .map(|j| {
                            (
                                j,
                                if j == i {
                                    m.clone()
                                } else {
                                    vec![true; st.unflushed()[j].sector_count()]
                                },
                            )
                        })
                        .collect();
                    images.push(st.crash_image_torn(&all));
                }
            }
            for img in images {
                let vol = Volume::open(Arc::new(MemoryBackend::from_vec(img)), &o).unwrap();
                match read(&vol, 0) {
                    Ok(d) => assert_eq!(d, vec![0u8; BS], "discard {discard}, point {n}: read back data"),
                    Err(e) => assert!(
                        matches!(corrupt_kind(&e), Some(CorruptionKind::Torn)),
                        "discard {discard}, point {n}: {e}"
                    ),
                }
                assert_eq!(read(&vol, 1).unwrap(), ver([9; 8]));
                checked += 1;
            }
        });
        assert!(checked > 5);
    }
}

#[test]
fn torn_is_slot_wide_in_wider_slots_and_survives_a_retag() {
    for (room, from, to) in [
        (16, Profile::Crc32c, Profile::Sha256),
        (32, Profile::Crc32c, Profile::Blake3Keyed),
        (32, Profile::Sha256, Profile::Xxh3),
        (16, Profile::NvmePi64, Profile::T10Dif),
    ] {
        let f = fmt(Mode::Dual, from, Some(room));
        let o = opts_for(from);
        let (mb, vol) = torn_volume(&f, &o);
        assert_eq!(
            kind(&read(&vol, 0)),
            Some(CorruptionKind::Torn),
            "{from} in {room}"
        );
        let ins = vol.inspect_block(0).unwrap();
        assert!(
            ins.slots.iter().any(|s| s.tag.as_deref() == Some("torn")),
            "{ins:?}"
        );
        let key = scar_support::key();
        let mut ro = blockguard::RetagOptions::new(to);
        if to.is_keyed() {
            ro.key = Some(&key);
        }
        let rep = vol.retag(&ro, &mut |_, _| {}).unwrap();
        assert_eq!(
            rep.bad_blocks.iter().map(|p| p.block).collect::<Vec<_>>(),
            vec![0],
            "{rep:?}"
        );
        let r = read(&vol, 0);
        assert_eq!(
            kind(&r),
            Some(CorruptionKind::Torn),
            "{from}->{to} in {room}: {r:?}"
        );
        assert_eq!(read(&vol, 1).unwrap(), ver([9; 8]));
        vol.close().unwrap();
        // The slot bytes of block 0's newest tag are all 0xFF.
        let img = mb.snapshot();
        let o2 = OpenOptions {
            key: to.is_keyed().then(scar_support::key),
            ..opts()
        };
        let v = Volume::open(Arc::new(MemoryBackend::from_vec(img.clone())), &o2).unwrap();
        let lay = Layout::of(&v, 0);
        let at = lay.tag(lay.newest(&img, 0), 0, 0);
        assert_eq!(
            &img[at..at + room],
            &vec![0xFF; room][..],
            "{from}->{to} in {room}"
        );
        assert!(Tag::from_bytes(&img[at..at + room]).is_torn());
        // And the fuzzer's second step still fails after the re-tag.
        drop(v);
        let img2 = then_c_torn(img, &o2);
        let v = Volume::open(Arc::new(MemoryBackend::from_vec(img2)), &o2).unwrap();
        assert_not_resurrected(&read(&v, 0), &format!("{from}->{to} in {room}"));
    }
}

/// Images a power loss can leave at history point `st`: every subset and order of the
/// unflushed writes (when few), and each unflushed write torn at 512 bytes (first half /
/// second half / every other sector) with the others kept.
fn images_at(st: &blockguard::blockguard_backend::CrashState) -> Vec<Vec<u8>> {
    let mut images = Vec::new();
    if st.for_each_crash_image(512, |img| images.push(img)).is_err() {
        let all: Vec<usize> = (0..st.unflushed().len()).collect();
        images.push(st.crash_image(&all));
        images.push(st.crash_image(&[]));
    }
    let n = st.unflushed().len();
    for i in 0..n {
        let k = st.unflushed()[i].sector_count();
        if k < 2 {
            continue;
        }
        let masks: [Vec<bool>; 3] = [
            (0..k).map(|s| s < k / 2).collect(),
            (0..k).map(|s| s >= k / 2).collect(),
            (0..k).map(|s| s % 2 == 0).collect(),
        ];
        for m in masks {
            let keep: Vec<(usize, Vec<bool>)> = (0..n)
                .map(|j| {
                    let kj = st.unflushed()[j].sector_count();
                    (j, if j == i { m.clone() } else { vec![true; kj] })
                })
                .collect();
            images.push(st.crash_image_torn(&keep));
        }
    }
    images
}

#[test]
fn crash_during_recovery_then_a_torn_rewrite_never_brings_b_back() {
    let o = opts();
    let img1 = a_then_b_torn(&fmt(Mode::Dual, Profile::Crc32c, None), &o);
    let fb = Arc::new(FaultBackend::from_image(img1));
    fb.forget_history();
    let vol = Volume::open(fb.clone(), &o).unwrap();
    assert_eq!(vol.recovery_at_open().unwrap().blocks_torn, 1);
    vol.close().unwrap();
    let mut checked = 0;
    let mut points = Vec::new();
    fb.for_each_history_point(|n, st| points.push((n, images_at(st))));
    for (n, images) in points {
        for img in images {
            // The crash during recovery left `img`: every open must reject B ...
            let v = Volume::open(Arc::new(MemoryBackend::from_vec(img.clone())), &ro()).unwrap();
            let r = read(&v, 0);
            assert!(
                r.as_ref().map_or(true, |d| *d != b()),
                "point {n}: read-only open returned B"
            );
            assert_eq!(read(&v, 1).unwrap(), ver([9; 8]), "point {n}");
            drop(v);
            // ... and after the next session's torn C, nothing but C or an error.
            let img2 = then_c_torn(img, &o);
            for o2 in [ro(), o.clone()] {
                let v = Volume::open(Arc::new(MemoryBackend::from_vec(img2.clone())), &o2).unwrap();
                assert_not_resurrected(&read(&v, 0), &format!("crash during recovery at point {n}"));
                assert_eq!(read(&v, 1).unwrap(), ver([9; 8]), "point {n}");
            }
            checked += 1;
        }
    }
    println!("{checked} crash images during recovery");
    assert!(checked > 10);
}

// ---------------------------------------------------------------------------------------
// Mirror sets.

fn mirror_a_then_b(members: usize, masks: &[Vec<bool>]) -> Vec<Vec<u8>> {
    let f = fmt(Mode::Dual, Profile::Crc32c, None);
    let fbs: Vec<Arc<FaultBackend>> = (0..members)
        .map(|_| Arc::new(FaultBackend::new(f.backing_len().unwrap()).unwrap()))
        .collect();
    Volume::format_members(dyns(&fbs), &f).unwrap().close().unwrap();
    let vol = Volume::open_members(dyns(&fbs), &opts()).unwrap();
    vol.write_at(&a(), 0).unwrap();
    vol.flush().unwrap();
    vol.write_at(&ver([9; 8]), BS as u64).unwrap();
    vol.flush().unwrap();
    for fb in &fbs {
        fb.forget_history();
    }
    let imgs = mirror_torn_write(&fbs, &vol, &b(), masks);
    drop(vol);
    imgs
}

fn mem_set(imgs: &[Vec<u8>]) -> Vec<Arc<MemoryBackend>> {
    imgs.iter()
        .map(|i| Arc::new(MemoryBackend::from_vec(i.clone())))
        .collect()
}

#[test]
fn mirror_torn_on_every_member_is_torn_everywhere_and_b_never_comes_back() {
    let none = vec![false; 8];
    for (members, masks) in [
        (2, vec![FIRST_HALF.to_vec(), FIRST_HALF.to_vec()]),
        (2, vec![FIRST_HALF.to_vec(), none.clone()]),
        (3, vec![FIRST_HALF.to_vec(), none.clone(), FIRST_HALF.to_vec()]),
    ] {
        let imgs = mirror_a_then_b(members, &masks);
        let set = mem_set(&imgs);
        let vol = Volume::open_members(dyns(&set), &opts()).unwrap();
        let r = read(&vol, 0);
        let expect_a = masks.iter().any(|m| m == &none);
        if expect_a {
            // A member still holds A whole (its write of B never landed): G1 keeps it.
            assert_eq!(r.unwrap(), a(), "{members} members {masks:?}");
        } else {
            assert_eq!(kind(&r), Some(CorruptionKind::Torn), "{members} members");
            let v = vol.verify_copies(0, 1, true).unwrap();
            assert_eq!(v.unrepairable, vec![0], "{v:?}");
        }
        vol.close().unwrap();
        // Second session: C torn on every member so that its landed half completes B.
        let snaps: Vec<Vec<u8>> = set.iter().map(|m| m.snapshot()).collect();
        let fbs: Vec<Arc<FaultBackend>> = snaps
            .iter()
            .map(|s| Arc::new(FaultBackend::from_image(s.clone())))
            .collect();
        let vol = Volume::open_members(dyns(&fbs), &opts()).unwrap();
        let half = vec![SECOND_HALF.to_vec(); members];
        let imgs2 = mirror_torn_write(&fbs, &vol, &c(), &half);
        drop(vol);
        let vol = Volume::open_members(dyns(&mem_set(&imgs2)), &ro()).unwrap();
        assert_not_resurrected(&read(&vol, 0), &format!("{members} members read-only"));
        drop(vol);
        let vol = Volume::open_members(dyns(&mem_set(&imgs2)), &opts()).unwrap();
        let r = read(&vol, 0);
        assert_not_resurrected(&r, &format!("{members} members"));
    }
}

/// FINDING (explicit repair; fixed: the rebuild marks such blocks torn): after recovery marked block 0 TORN, the pair is (newest: TORN,
/// older: B's tag). If the newest sector is then destroyed (header damage: invalid, not a
/// scar) and the user runs `recover --rebuild`, the pair is rebuilt from the older brother —
/// B's tag becomes the newest again, for data that never matched it. The next write keeps it
/// as the older brother and a torn C that completes B brings B back, a version never
/// durable. The rebuild could give every block whose data matches neither the valid brother
/// nor anything else TORN (it fails either way).
#[test]
fn rebuild_of_a_damaged_newest_keeps_the_torn_mark() {
    let o = opts();
    let (mb, vol) = torn_volume(&fmt(Mode::Dual, Profile::Crc32c, None), &o);
    let lay = Layout::of(&vol, 0);
    vol.close().unwrap();
    let mut img = mb.snapshot();
    // Header damage to the newest sector of pair 0 (TORN for block 0): invalid, not a scar.
    let at = lay.sector(lay.newest(&img, 0), 0);
    img[at] ^= 0x01;
    let fb = Arc::new(FaultBackend::from_image(img));
    let vol = Volume::open(fb.clone(), &o).unwrap();
    assert_eq!(kind(&read(&vol, 0)), Some(CorruptionKind::MetadataDamaged));
    let rep = vol.recover(RecoverOptions::rebuild(), &mut |_, _| {}).unwrap();
    assert!(rep.damaged.iter().any(|d| d.rebuilt), "{rep:?}");
    assert_eq!(read(&vol, 1).unwrap(), ver([9; 8]));
    assert!(read(&vol, 0).is_err());
    // The next session's C, torn so that the half that lands completes B.
    let img2 = torn_write(&fb, &vol, 0, &c(), SECOND_HALF.to_vec());
    drop(vol);
    let vol = Volume::open(Arc::new(MemoryBackend::from_vec(img2)), &ro()).unwrap();
    assert_not_resurrected(&read(&vol, 0), "after recover --rebuild and a torn C");
}

/// The newest brother scarred when the crash tears B: recovery proves every block's tag
/// against its data and writes TORN for block 0 into both slots. Held.
#[test]
fn scarred_newest_brother_and_a_torn_block_is_torn_in_both_slots() {
    let o = opts();
    let mut img1 = a_then_b_torn(&fmt(Mode::Dual, Profile::Crc32c, None), &o);
    let lay = {
        let v = Volume::open(Arc::new(MemoryBackend::from_vec(img1.clone())), &ro()).unwrap();
        Layout::of(&v, 0)
    };
    let newest = lay.newest(&img1, 0);
    scar(&mut img1, &lay, newest, 0, 5);
    let vol = Volume::open(Arc::new(MemoryBackend::from_vec(img1.clone())), &o).unwrap();
    let rep = vol.recovery_at_open().unwrap().clone();
    assert!(rep.blocks_torn >= 1, "{rep:?}");
    assert_eq!(kind(&read(&vol, 0)), Some(CorruptionKind::Torn));
    assert_eq!(read(&vol, 1).unwrap(), ver([9; 8]));
    drop(vol);
    let img2 = then_c_torn(img1, &o);
    for o2 in [ro(), o.clone()] {
        let v = Volume::open(Arc::new(MemoryBackend::from_vec(img2.clone())), &o2).unwrap();
        assert_not_resurrected(&read(&v, 0), "scarred newest");
    }
}

/// No profile's tag, in any slot width, equals TORN or UNWRITTEN; TORN and UNWRITTEN are
/// told apart by every predicate; a slot of 0xFF shorter than the slot is not TORN.
#[test]
fn no_profile_generates_torn_and_torn_is_not_unwritten() {
    let uuids = [[0u8; 16], [0xFF; 16], [0x42; 16]];
    for p in Profile::ALL {
        for uuid in uuids {
            let key = scar_support::key();
            let t = p.tagger(&uuid, p.is_keyed().then_some(&key)).unwrap();
            for data in [vec![0u8; BS], vec![0xFFu8; BS], vec![0xFFu8; 512], a()] {
                for block in [0, 0xFFFF, 0xFFFF_FFFF, (1 << 48) - 1, u64::MAX] {
                    let tag = t.generate(block, &data);
                    assert!(!tag.is_torn() && !tag.is_unwritten(), "{p}: {tag}");
                    for slot in [8, 16, 32].into_iter().filter(|&s| s >= p.tag_size()) {
                        assert!(!Tag::from_bytes(&tag.to_bytes(slot)[..slot]).is_torn());
                        assert!(!t.verify(block, &data, &Tag::torn(slot)));
                    }
                }
            }
        }
    }
    for slot in [8, 16, 32] {
        let torn = Tag::torn(slot);
        assert!(!torn.is_unwritten() && torn.is_torn());
        assert!(!Tag::from_bytes(&vec![0u8; slot]).is_torn());
        let mut almost = vec![0xFFu8; slot];
        almost[slot - 1] = 0xFE;
        assert!(!Tag::from_bytes(&almost).is_torn());
    }
    // T10's escape value (application tag 0xFFFF) is never generated: the tuple is never TORN.
    assert_ne!(blockguard::tag::pi_app_tag(&[0xFF; 16]), 0xFFFF);
}

/// The fuzzer's double crash in `journal` mode: the journal rolls the torn home writes
/// forward, so nothing is ever TORN and every read is a version written. Held.
#[test]
fn journal_mode_rolls_both_torn_writes_forward() {
    let mut f = fmt(Mode::Journal, Profile::Crc32c, None);
    f.journal_size = Some(1 << 20);
    let o = opts();
    let img1 = a_then_b_torn(&f, &o);
    let vol = Volume::open(Arc::new(MemoryBackend::from_vec(img1.clone())), &o).unwrap();
    assert_eq!(vol.recovery_at_open().unwrap().blocks_torn, 0);
    let first = read(&vol, 0).unwrap();
    assert!(first == a() || first == b());
    drop(vol);
    let img2 = then_c_torn(img1, &o);
    let vol = Volume::open(Arc::new(MemoryBackend::from_vec(img2)), &o).unwrap();
    let d = read(&vol, 0).unwrap();
    assert!(
        d == first || d == c(),
        "journal: block 0 neither the durable version nor C"
    );
}
