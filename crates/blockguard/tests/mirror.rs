//! Mirror sets: every read returns the right data while one member's copy of a block or of
//! its metadata is damaged, the bad copy is healed, the counters match the faults injected;
//! a block bad on every member is an error naming it; a member that fails writes is dropped
//! and the volume goes on; members from elsewhere are refused.

use blockguard::blockguard_backend::{Backend, FaultBackend, MemoryBackend};
use blockguard::{CorruptionKind, Error, FormatOptions, OpenOptions, Volume};
use rand::{Rng, SeedableRng};
use std::sync::Arc;

const BS: u64 = 512;
const BLOCKS: u64 = 600;

fn opts() -> FormatOptions {
    let mut o = FormatOptions::with_size(BS * BLOCKS);
    o.block_size = BS as u32;
    o
}

fn content(b: u64, round: u8) -> Vec<u8> {
    (0..BS)
        .map(|i| {
            (b as u8)
                .wrapping_mul(13)
                .wrapping_add(i as u8)
                .wrapping_add(round.wrapping_mul(31))
        })
        .collect()
}

fn members(n: usize) -> Vec<Arc<MemoryBackend>> {
    let len = opts().backing_len().expect("geometry");
    (0..n)
        .map(|_| Arc::new(MemoryBackend::new(len).expect("memory")))
        .collect()
}

fn dyns(m: &[Arc<MemoryBackend>]) -> Vec<Arc<dyn Backend>> {
    m.iter().map(|b| b.clone() as Arc<dyn Backend>).collect()
}

/// A set of `n` members holding `content(b, 0)` in every block, closed cleanly.
fn written_set(n: usize) -> Vec<Arc<MemoryBackend>> {
    let m = members(n);
    let vol = Volume::format_members(dyns(&m), &opts()).expect("format the set");
    for b in 0..BLOCKS {
        vol.write_at(&content(b, 0), b * BS).expect("write");
    }
    vol.close().expect("close");
    m
}

fn image(b: &MemoryBackend) -> Vec<u8> {
    let mut out = vec![0u8; b.len() as usize];
    b.read_at(&mut out, 0).expect("read image");
    out
}

/// The data offset of `block` and its group's metadata offset, from `dump`.
fn offsets(vol: &Volume, block: u64) -> (u64, u64) {
    let r = vol.inspect_block(block).expect("inspect");
    (r.location.data_offset, r.location.meta_offsets[0])
}

#[test]
fn damaged_copies_are_read_from_another_member_and_healed() {
    for n in [2, 3] {
        let seed: u64 = rand::random();
        let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
        let m = written_set(n);
        let vol = Volume::open_members(dyns(&m), &OpenOptions::default()).expect("open");
        // Damage one member's copy of some blocks, each block on one member only. Reads of
        // this small volume all go to member 0 (members take turns by 1 MiB stripe): its
        // damage is met and healed by reading; the others' waits for a scrub.
        let mut damaged = std::collections::BTreeMap::new();
        while damaged.len() < 20 {
            damaged.insert(rng.random_range(0..BLOCKS), rng.random_range(0..n));
        }
        for (&b, &member) in &damaged {
            let (data_at, _) = offsets(&vol, b);
            m[member].write_at(&[0xEE; 7], data_at + 100).expect("corrupt");
        }
        for b in 0..BLOCKS {
            let mut buf = vec![0u8; BS as usize];
            vol.read_at(&mut buf, b * BS)
                .unwrap_or_else(|e| panic!("seed {seed}, {n} members: block {b}: {e}"));
            assert_eq!(buf, content(b, 0), "seed {seed}: block {b}");
        }
        let on_first = damaged.values().filter(|&&k| k == 0).count() as u64;
        let stats = vol.stats();
        assert_eq!(
            stats.repairs, on_first,
            "seed {seed}: one repair per damaged copy read: {stats:?}"
        );
        assert_eq!(stats.unrepairable, 0);
        let at: Vec<u64> = damaged.keys().map(|&b| offsets(&vol, b).0).collect();
        vol.close().expect("close");
        // Member 0, which served the reads, now holds the good data of every block.
        let first = image(&m[0]);
        for (&b, &data_at) in damaged.keys().zip(&at) {
            let r = data_at as usize..(data_at + BS) as usize;
            assert_eq!(first[r], content(b, 0)[..], "seed {seed}: block {b} on member 0");
        }
    }
}

#[test]
fn a_block_bad_on_every_member_is_an_error_naming_it() {
    let m = written_set(2);
    let vol = Volume::open_members(dyns(&m), &OpenOptions::default()).expect("open");
    let (data_at, _) = offsets(&vol, 77);
    for b in &m {
        b.write_at(&[0x55; 16], data_at).expect("corrupt");
    }
    let mut buf = vec![0u8; BS as usize];
    match vol.read_at(&mut buf, 77 * BS) {
        Err(Error::Corrupt { block, kind, .. }) => {
            assert_eq!(block, 77);
            assert_eq!(kind, CorruptionKind::TagMismatch);
        }
        other => panic!("expected corruption of block 77, got {other:?}"),
    }
    assert_eq!(vol.stats().unrepairable, 1);
    assert_eq!(vol.stats().repairs, 0);
}

#[test]
fn damaged_metadata_on_one_member_is_repaired_from_another() {
    let m = written_set(2);
    let vol = Volume::open_members(dyns(&m), &OpenOptions::default()).expect("open");
    let (_, meta_at) = offsets(&vol, 3);
    vol.close().expect("close");
    // Both brothers of group 0 on member 0: its tags cannot be read there at all.
    m[0].write_at(&[0u8; 2 * BS as usize], meta_at)
        .expect("wipe metadata");
    let vol = Volume::open_members(dyns(&m), &OpenOptions::default()).expect("open");
    for b in 0..BLOCKS {
        let mut buf = vec![0u8; BS as usize];
        vol.read_at(&mut buf, b * BS)
            .unwrap_or_else(|e| panic!("block {b}: {e}"));
        assert_eq!(buf, content(b, 0), "block {b}");
    }
    assert!(vol.stats().repairs >= 1, "{:?}", vol.stats());
    vol.close().expect("close");
    assert_eq!(
        image(&m[0])[meta_at as usize..meta_at as usize + 2 * BS as usize],
        image(&m[1])[meta_at as usize..meta_at as usize + 2 * BS as usize],
        "member 0's metadata rewritten from member 1"
    );
}

#[test]
fn a_member_failing_writes_is_dropped_and_the_volume_goes_on() {
    let len = opts().backing_len().expect("geometry");
    let good = Arc::new(MemoryBackend::new(len).expect("memory"));
    let bad = Arc::new(FaultBackend::new(len).expect("memory"));
    let set: Vec<Arc<dyn Backend>> = vec![good.clone(), bad.clone()];
    let vol = Volume::format_members(set.clone(), &opts()).expect("format");
    for b in 0..BLOCKS / 2 {
        vol.write_at(&content(b, 1), b * BS).expect("write");
    }
    vol.flush().expect("flush");
    bad.fail_writes_at(0..len);
    for b in BLOCKS / 2..BLOCKS {
        vol.write_at(&content(b, 1), b * BS)
            .expect("write while degraded");
    }
    vol.flush().expect("a flush succeeds with one member left");
    let members = vol.members();
    assert_eq!(members.len(), 2);
    assert!(members[0].1 && !members[1].1, "{members:?}");
    assert_eq!(vol.stats().members_failed, 1);
    for b in 0..BLOCKS {
        let mut buf = vec![0u8; BS as usize];
        vol.read_at(&mut buf, b * BS).expect("read");
        assert_eq!(buf, content(b, 1), "block {b}");
    }
    vol.close().expect("close");
    // The survivor's superblock says the failed member is out of sync: reopened with both,
    // the set never reads the stale member.
    bad.clear_faults();
    let vol = Volume::open_members(set, &OpenOptions::default()).expect("reopen");
    assert!(!vol.members()[1].1, "the failed member stays out of sync");
    for b in 0..BLOCKS {
        let mut buf = vec![0u8; BS as usize];
        vol.read_at(&mut buf, b * BS).expect("read");
        assert_eq!(buf, content(b, 1), "block {b}");
    }
}

#[test]
fn a_missing_member_leaves_the_set_degraded_and_recorded() {
    let m = written_set(2);
    let vol = Volume::open_members(vec![m[0].clone()], &OpenOptions::default()).expect("open degraded");
    assert!(vol.members()[0].1 && !vol.members()[1].1);
    vol.write_at(&content(5, 9), 5 * BS).expect("write");
    vol.close().expect("close");
    let vol = Volume::open_members(dyns(&m), &OpenOptions::default()).expect("open both");
    assert!(
        !vol.members()[1].1,
        "the member that missed writes is out of sync"
    );
    let mut buf = vec![0u8; BS as usize];
    vol.read_at(&mut buf, 5 * BS).expect("read");
    assert_eq!(buf, content(5, 9));
}

#[test]
fn foreign_and_plain_volumes_are_left_out_or_refused() {
    let a = written_set(2);
    let b = written_set(2);
    // Review 10, #6/#7: a file found at a member's recorded path that is not a copy of the set
    // (another set's member, a plain volume, the same member twice) is left out with a
    // warning: the set opens degraded instead of not at all.
    let ro = OpenOptions {
        read_only: true,
        ..OpenOptions::default()
    };
    let plain = Arc::new(MemoryBackend::new(opts().backing_len().unwrap()).unwrap());
    Volume::format(plain.clone(), &opts()).unwrap().close().unwrap();
    let blank = Arc::new(MemoryBackend::new(opts().backing_len().unwrap()).unwrap());
    for (other, what) in [
        (b[1].clone(), "not a copy of this mirror set"),
        (plain.clone(), "not a copy of this mirror set"),
        (blank.clone(), "not usable as a mirror copy"),
        (a[0].clone(), "second backend"),
    ] {
        let vol = Volume::open_members(vec![a[0].clone(), other], &ro).expect("opens without it");
        assert!(
            vol.warnings().iter().any(|w| w.contains(what)),
            "{what}: {:?}",
            vol.warnings()
        );
        assert!(
            vol.warnings().iter().any(|w| w.contains("missing")),
            "{:?}",
            vol.warnings()
        );
        let mut buf = vec![0u8; BS as usize];
        vol.read_at(&mut buf, 7 * BS).expect("read");
        assert!(buf == content(7, 0));
    }
    // What the caller named is checked strictly.
    let err = Volume::open_members(vec![plain.clone(), a[0].clone()], &OpenOptions::default())
        .expect_err("a plain volume named first");
    assert!(err.to_string().contains("mirror set"), "{err}");
    let err = Volume::open(a[0].clone(), &OpenOptions::default()).expect_err("a member alone");
    assert!(err.to_string().contains("member of a mirror set"), "{err}");
}

#[test]
fn any_member_names_the_others() {
    let m = written_set(3);
    for b in &m {
        let records = blockguard::member_records(&**b).expect("records");
        assert_eq!(records.len(), 3);
        for (i, r) in records.iter().enumerate() {
            assert_eq!(usize::from(r.index), i);
            assert_eq!(r.path, m[i].name());
        }
    }
}

/// Bytes a resync of `groups` copies: both copies of the three bitmaps, plus each group's two
/// metadata blocks and its data blocks.
fn resync_bytes(vol: &Volume, groups: &[u64]) -> u64 {
    let g = vol.geometry();
    let bs = u64::from(g.block_size);
    2 * 3 * g.map_region_len()
        + groups
            .iter()
            .map(|&k| (2 + u64::from(g.blocks_in_group(k))) * bs)
            .sum::<u64>()
}

/// The data and metadata regions of two members are identical (superblock regions differ by
/// role, the bitmaps are compared too).
fn assert_same_contents(a: &MemoryBackend, b: &MemoryBackend, what: &str) {
    let (ia, ib) = (image(a), image(b));
    let end = ia.len() - 4096;
    assert!(ia[4096..end] == ib[4096..end], "{what}: members differ");
}

#[test]
fn resync_copies_only_the_groups_written_while_a_member_was_out() {
    let m = written_set(2);
    // Session 1 without member 1: writes to groups of blocks 0 and 5.
    let vol = Volume::open_members(vec![m[0].clone()], &OpenOptions::default()).expect("open degraded");
    let per_group = u64::from(vol.geometry().group_blocks);
    assert!(BLOCKS >= 3 * per_group, "the volume spans at least three groups");
    vol.write_at(&content(5, 2), 5 * BS).expect("write");
    vol.close().expect("close");
    // Session 2, still without it: a write to the last group. The marks of session 1 stay.
    let vol = Volume::open_members(vec![m[0].clone()], &OpenOptions::default()).expect("open degraded again");
    let last = BLOCKS - 1;
    vol.write_at(&content(last, 2), last * BS).expect("write");
    vol.close().expect("close");
    // Both present: member 1 is out of sync until resync, which copies exactly two groups.
    let vol = Volume::open_members(dyns(&m), &OpenOptions::default()).expect("open both");
    assert!(!vol.members()[1].1);
    let report = vol.resync(&mut |_, _| {}).expect("resync");
    assert_eq!(report.members, vec![1]);
    assert_eq!(report.groups, 2, "{report:?}");
    let groups = [0, vol.geometry().group_of(last).0];
    assert_eq!(report.bytes_copied, resync_bytes(&vol, &groups), "{report:?}");
    assert!(vol.members().iter().all(|(_, s)| *s), "{:?}", vol.members());
    vol.close().expect("close");
    assert_same_contents(&m[0], &m[1], "after resync");
    // In sync and recorded so: reopened, both are read and written; nothing left to copy.
    let vol = Volume::open_members(dyns(&m), &OpenOptions::default()).expect("reopen");
    assert!(vol.members().iter().all(|(_, s)| *s));
    assert_eq!(vol.resync(&mut |_, _| {}).expect("resync").groups, 0);
    for b in 0..BLOCKS {
        let mut buf = vec![0u8; BS as usize];
        vol.read_at(&mut buf, b * BS).expect("read");
        let want = if b == 5 || b == last {
            content(b, 2)
        } else {
            content(b, 0)
        };
        assert_eq!(buf, want, "block {b}");
    }
}

#[test]
fn a_member_dropped_mid_workload_is_resynced_and_identical() {
    let len = opts().backing_len().expect("geometry");
    let good = Arc::new(MemoryBackend::new(len).expect("memory"));
    let bad = Arc::new(FaultBackend::new(len).expect("memory"));
    let set: Vec<Arc<dyn Backend>> = vec![good.clone(), bad.clone()];
    Volume::format_members(set.clone(), &opts())
        .expect("format")
        .close()
        .expect("close");
    // Marks of groups whose writes are durable everywhere are cleared at every flush (not
    // every 2 s), so what stays marked is exactly what member 1 missed.
    let eager = OpenOptions {
        dirty_clear_interval: std::time::Duration::ZERO,
        ..OpenOptions::default()
    };
    let vol = Volume::open_members(set.clone(), &eager).expect("open");
    for b in 0..BLOCKS {
        vol.write_at(&content(b, 1), b * BS).expect("write");
    }
    vol.flush().expect("flush");
    vol.flush().expect("a second flush clears the marks of the first");
    bad.fail_writes_at(0..len);
    // Only the first group is written while member 1 is out.
    for b in 0..4 {
        vol.write_at(&content(b, 3), b * BS).expect("write");
    }
    vol.flush().expect("flush");
    vol.close().expect("close");
    bad.clear_faults();
    let vol = Volume::open_members(set, &OpenOptions::default()).expect("reopen");
    let report = vol.resync(&mut |_, _| {}).expect("resync");
    assert_eq!(report.groups, 1, "{report:?}");
    assert_eq!(report.bytes_copied, resync_bytes(&vol, &[0]));
    vol.close().expect("close");
    let mut bad_image = vec![0u8; len as usize];
    bad.read_at(&mut bad_image, 0).expect("read");
    let good_image = image(&good);
    let end = good_image.len() - 4096;
    assert!(
        good_image[4096..end] == bad_image[4096..end],
        "members identical after resync"
    );
}

#[test]
fn a_copy_added_to_a_plain_volume_is_built_from_it_and_can_be_removed_again() {
    let len = opts().backing_len().expect("geometry");
    let a = Arc::new(MemoryBackend::new(len).expect("memory"));
    let vol = Volume::format(a.clone(), &opts()).expect("format");
    for b in (0..BLOCKS).step_by(3) {
        vol.write_at(&content(b, 4), b * BS).expect("write");
    }
    let written_groups: std::collections::BTreeSet<u64> = (0..BLOCKS)
        .step_by(3)
        .map(|b| vol.geometry().group_of(b).0)
        .collect();
    let b = Arc::new(MemoryBackend::new(len).expect("memory"));
    let mut calls = 0;
    let (vol, report) = vol
        .add_member(b.clone(), &mut |_, _| calls += 1)
        .expect("add a copy");
    assert!(calls > 0, "progress is reported");
    assert_eq!(report.members, vec![1]);
    assert_eq!(
        report.groups,
        written_groups.len() as u64,
        "every written group copied, nothing else"
    );
    assert_eq!(vol.members().len(), 2);
    assert!(vol.members().iter().all(|(_, s)| *s), "{:?}", vol.members());
    vol.close().expect("close");
    assert_same_contents(&a, &b, "after add");
    // A third copy.
    let vol = Volume::open_members(vec![b.clone(), a.clone()], &OpenOptions::default()).expect("open");
    let c = Arc::new(MemoryBackend::new(len).expect("memory"));
    let (vol, _) = vol
        .add_member(c.clone(), &mut |_, _| {})
        .expect("add a third copy");
    assert_eq!(vol.members().len(), 3);
    let err = {
        let d = Arc::new(MemoryBackend::new(len).expect("memory"));
        vol.add_member(d, &mut |_, _| {}).expect_err("a fourth copy")
    };
    assert!(err.to_string().contains("already has 3"), "{err}");
    // Remove two copies: the last one is a plain volume again, holding everything.
    let vol = Volume::open_members(dyns(&[a.clone(), b.clone(), c.clone()]), &OpenOptions::default())
        .expect("open");
    let vol = vol.remove_member(0).expect("remove copy 0");
    assert_eq!(vol.members().len(), 2);
    let vol = vol.remove_member(1).expect("remove copy 1");
    assert!(vol.members().is_empty(), "a plain volume");
    vol.close().expect("close");
    let vol = Volume::open(b.clone(), &OpenOptions::default()).expect("the last copy opens alone");
    for blk in 0..BLOCKS {
        let mut buf = vec![0u8; BS as usize];
        vol.read_at(&mut buf, blk * BS).expect("read");
        let want = if blk % 3 == 0 {
            content(blk, 4)
        } else {
            vec![0u8; BS as usize]
        };
        assert_eq!(buf, want, "block {blk}");
    }
    vol.close().expect("close");
    // The removed copies are not members of anything the set knows any more.
    let err = Volume::open_members(
        vec![b.clone() as Arc<dyn Backend>, a.clone()],
        &OpenOptions::default(),
    )
    .expect_err("a removed copy");
    assert!(
        err.to_string().contains("not a member")
            || err.to_string().contains("replaced")
            || err.to_string().contains("no member of a mirror set"),
        "{err}"
    );
}

#[test]
fn a_read_error_on_one_member_is_served_by_another_and_the_sector_rewritten() {
    let len = opts().backing_len().expect("geometry");
    let flaky = Arc::new(FaultBackend::new(len).expect("memory"));
    let other = Arc::new(MemoryBackend::new(len).expect("memory"));
    let set: Vec<Arc<dyn Backend>> = vec![flaky.clone(), other.clone()];
    let vol = Volume::format_members(set.clone(), &opts()).expect("format");
    for b in 0..BLOCKS {
        vol.write_at(&content(b, 6), b * BS).expect("write");
    }
    let geo = *vol.geometry();
    vol.close().expect("close");
    // A latent sector error under block 7's data, and one under group 1's metadata, on the
    // member reads go to.
    let data_at = geo.data_offset(7);
    let meta_at = geo.meta_offset(1, 0);
    flaky.fail_reads_until_rewritten(data_at..data_at + BS);
    flaky.fail_reads_until_rewritten(meta_at..meta_at + BS);
    let vol = Volume::open_members(set, &OpenOptions::default()).expect("open");
    for b in 0..BLOCKS {
        let mut buf = vec![0u8; BS as usize];
        vol.read_at(&mut buf, b * BS)
            .unwrap_or_else(|e| panic!("block {b}: {e}"));
        assert_eq!(buf, content(b, 6), "block {b}");
    }
    let stats = vol.stats();
    assert_eq!(
        stats.repairs, 2,
        "the data sector and the metadata sector rewritten: {stats:?}"
    );
    assert_eq!(stats.members_failed, 0);
    assert!(vol.members().iter().all(|(_, s)| *s));
    // Rewritten: member 0 reads there again.
    let mut buf = vec![0u8; BS as usize];
    flaky
        .read_at(&mut buf, data_at)
        .expect("the data sector reads again");
    assert_eq!(buf, content(7, 6));
    flaky
        .read_at(&mut buf, meta_at)
        .expect("the metadata sector reads again");
}

#[test]
fn verify_copies_finds_every_bad_copy_and_repairs_it_exactly() {
    let m = written_set(3);
    let vol = Volume::open_members(dyns(&m), &OpenOptions::default()).expect("open");
    let geo = *vol.geometry();
    vol.close().expect("close");
    // Damaged copies: block 3 on member 1, block 200 on member 2, block 401 on members 0 and
    // 2, and block 77 on all three (unrepairable).
    let damage: &[(usize, u64)] = &[(1, 3), (2, 200), (0, 401), (2, 401), (0, 77), (1, 77), (2, 77)];
    for &(member, b) in damage {
        m[member]
            .write_at(&[0xAB; 5], geo.data_offset(b) + 17)
            .expect("corrupt");
    }
    let vol = Volume::open_members(dyns(&m), &OpenOptions::default()).expect("open");
    let report = vol.verify_copies(0, BLOCKS, false).expect("verify");
    let mut bad = report.bad.clone();
    bad.sort_by_key(|&(member, b)| (b, member));
    let mut want: Vec<(usize, u64)> = damage.to_vec();
    want.sort_by_key(|&(member, b)| (b, member));
    assert_eq!(bad, want, "{report:?}");
    assert_eq!(report.unrepairable, vec![77]);
    assert_eq!(report.repaired, 0, "nothing written without repair");
    assert_eq!(report.blocks, BLOCKS);
    let report = vol.verify_copies(0, BLOCKS, true).expect("verify and repair");
    assert_eq!(
        report.repaired, 4,
        "every bad copy of a block with a good copy: {report:?}"
    );
    assert_eq!(report.unrepairable, vec![77]);
    let report = vol.verify_copies(0, BLOCKS, false).expect("verify again");
    assert_eq!(
        report.bad.len(),
        3,
        "only block 77's copies are still bad: {report:?}"
    );
    assert_eq!(vol.stats().unrepairable, 3, "counted once per pass that met it");
}

#[test]
fn scrub_of_a_mirror_set_checks_every_copy_and_repairs_on_request() {
    let m = written_set(2);
    let vol = Volume::open_members(dyns(&m), &OpenOptions::default()).expect("open");
    let geo = *vol.geometry();
    vol.close().expect("close");
    for &(member, b) in &[(1usize, 9u64), (0, 250), (1, 250), (0, 500)] {
        m[member]
            .write_at(&[0x42; 9], geo.data_offset(b) + 3)
            .expect("corrupt");
    }
    let vol = Volume::open_members(dyns(&m), &OpenOptions::default()).expect("open");
    let report = vol
        .scrub(blockguard::ScrubOptions::default(), &mut |_| {})
        .expect("scrub");
    let found: Vec<(Option<usize>, u64)> = report.problems.iter().map(|p| (p.copy, p.block)).collect();
    assert_eq!(
        found,
        vec![(Some(1), 9), (Some(0), 250), (Some(1), 250), (Some(0), 500)],
        "{report:?}"
    );
    assert_eq!(report.repaired, 0);
    let repair = blockguard::ScrubOptions {
        repair: true,
        ..blockguard::ScrubOptions::default()
    };
    let report = vol.scrub(repair, &mut |_| {}).expect("scrub --repair");
    assert_eq!(report.problem_count, 4);
    assert_eq!(report.repaired, 2, "blocks 9 and 500 had a good copy: {report:?}");
    assert_eq!(report.unrepaired(), 2, "block 250 is bad on both copies");
    let report = vol
        .scrub(blockguard::ScrubOptions::default(), &mut |_| {})
        .expect("scrub again");
    let left: Vec<u64> = report.problems.iter().map(|p| p.block).collect();
    assert_eq!(left, vec![250, 250]);
}

/// A resync runs while clients write: writes that land before a group's copy, during the
/// resync of other groups, and after it all reach the resynchronized member, which ends
/// identical to the source and holds every acknowledged write on its own.
#[test]
fn resync_while_clients_write_leaves_identical_members() {
    const N: u64 = 12_000;
    let mut o = FormatOptions::with_size(BS * N);
    o.block_size = BS as u32;
    let len = o.backing_len().expect("geometry");
    let m: Vec<Arc<MemoryBackend>> = (0..2)
        .map(|_| Arc::new(MemoryBackend::new(len).expect("memory")))
        .collect();
    let vol = Volume::format_members(dyns(&m), &o).expect("format");
    for b in (0..N).step_by(7) {
        vol.write_at(&content(b, 0), b * BS).expect("write");
    }
    vol.close().expect("close");
    // Member 1 misses writes all over the volume.
    let vol = Volume::open_members(vec![m[0].clone()], &OpenOptions::default()).expect("open degraded");
    for b in (0..N).step_by(5) {
        vol.write_at(&content(b, 1), b * BS).expect("write");
    }
    vol.close().expect("close");
    let vol = Arc::new(Volume::open_members(dyns(&m), &OpenOptions::default()).expect("open both"));
    let groups = vol.geometry().groups;
    assert!(groups >= 10, "enough groups for writes to interleave: {groups}");
    let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
    // Two writers, each owning the blocks of its parity, keep their model of the last round.
    let writers: Vec<_> = (0..2u64)
        .map(|w| {
            let (vol, stop) = (vol.clone(), stop.clone());
            std::thread::spawn(move || {
                let mut rng = rand::rngs::StdRng::seed_from_u64(w);
                let mut model = std::collections::HashMap::new();
                let mut round = 2u8;
                while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                    let b = rng.random_range(0..N / 2) * 2 + w;
                    round = round.wrapping_add(1).max(2);
                    vol.write_at(&content(b, round), b * BS)
                        .expect("write during resync");
                    model.insert(b, round);
                    if rng.random_range(0..50) == 0 {
                        vol.flush().expect("flush during resync");
                    }
                }
                model
            })
        })
        .collect();
    let mut calls = 0;
    let report = vol.resync(&mut |_, _| calls += 1).expect("resync");
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    let models: Vec<_> = writers.into_iter().map(|t| t.join().expect("writer")).collect();
    assert_eq!(report.members, vec![1]);
    assert_eq!(
        report.groups, groups,
        "every group was written while member 1 was out"
    );
    assert!(calls > 1, "progress reported");
    // Writes after the resync reach both members too.
    vol.write_at(&content(1, 9), BS).expect("write after resync");
    let vol = Arc::try_unwrap(vol).unwrap_or_else(|_| panic!("writers are done"));
    vol.close().expect("close");
    assert_same_contents(&m[0], &m[1], "after a resync under load");
    // Member 1 alone holds every acknowledged write.
    let alone =
        Volume::open_members(vec![m[1].clone()], &OpenOptions::default()).expect("open member 1 alone");
    let mut buf = vec![0u8; BS as usize];
    for b in 0..N {
        let want = if b == 1 {
            content(1, 9)
        } else if let Some(&r) = models[(b % 2) as usize].get(&b) {
            content(b, r)
        } else if b % 5 == 0 {
            content(b, 1)
        } else if b % 7 == 0 {
            content(b, 0)
        } else {
            vec![0u8; BS as usize]
        };
        alone.read_at(&mut buf, b * BS).expect("read");
        assert!(buf == want, "block {b} on member 1 after an online resync");
    }
}

/// A member that fails while it catches up is dropped again: the resync fails naming it,
/// the volume goes on writing, and the member stays out of sync for a later resync.
#[test]
fn a_member_failing_during_resync_stays_out_of_sync() {
    let len = opts().backing_len().expect("geometry");
    let good = Arc::new(MemoryBackend::new(len).expect("memory"));
    let bad = Arc::new(FaultBackend::new(len).expect("memory"));
    let set: Vec<Arc<dyn Backend>> = vec![good.clone(), bad.clone()];
    Volume::format_members(set.clone(), &opts())
        .expect("format")
        .close()
        .expect("close");
    let vol = Volume::open_members(vec![good.clone()], &OpenOptions::default()).expect("open degraded");
    for b in 0..BLOCKS {
        vol.write_at(&content(b, 1), b * BS).expect("write");
    }
    vol.close().expect("close");
    let vol = Volume::open_members(set.clone(), &OpenOptions::default()).expect("open both");
    bad.fail_writes_at(0..len);
    let err = vol.resync(&mut |_, _| {}).expect_err("the target fails");
    assert!(
        err.to_string().contains("member 1") || err.to_string().contains("resynchroniz"),
        "{err}"
    );
    assert!(!vol.members()[1].1, "still out of sync");
    vol.write_at(&content(3, 4), 3 * BS).expect("the volume goes on");
    vol.flush().expect("flush");
    bad.clear_faults();
    vol.close().expect("close");
    let vol = Volume::open_members(set, &OpenOptions::default()).expect("reopen");
    assert!(!vol.members()[1].1, "recorded out of sync");
    vol.resync(&mut |_, _| {}).expect("a later resync");
    vol.close().expect("close");
    assert_same_contents(&good, &bad_image_backend(&bad), "after the second resync");
}

/// A memory copy of a fault backend's image, to compare with `assert_same_contents`.
fn bad_image_backend(b: &FaultBackend) -> MemoryBackend {
    let mut img = vec![0u8; b.len() as usize];
    b.read_at(&mut img, 0).expect("read");
    let m = MemoryBackend::new(b.len()).expect("memory");
    m.write_at(&img, 0).expect("write");
    m
}

/// Review 10, #3: repairing one block must not copy another pair's damage from the member
/// it repairs from. 4 KiB blocks: a group's metadata block holds eight pairs.
#[test]
fn repairing_a_block_never_spreads_damage_of_another_pair() {
    const B4: u64 = 4096;
    let mut o = FormatOptions::with_size(B4 * 1024);
    o.block_size = B4 as u32;
    let len = o.backing_len().expect("geometry");
    let m: Vec<Arc<MemoryBackend>> = (0..2)
        .map(|_| Arc::new(MemoryBackend::new(len).expect("memory")))
        .collect();
    let vol = Volume::format_members(dyns(&m), &o).expect("format");
    let data = |b: u64| vec![(b % 251) as u8 + 1; B4 as usize];
    for b in 0..200 {
        vol.write_at(&data(b), b * B4).expect("write");
    }
    vol.close().expect("close");
    let vol = Volume::open_members(dyns(&m), &OpenOptions::default()).expect("open");
    let r = vol.inspect_block(0).expect("inspect");
    let (data0, meta0) = (r.location.data_offset, r.location.meta_offsets[0]);
    vol.close().expect("close");
    // Block 0's data damaged on member 0; on member 1, the newest (slot 0, first write)
    // sector of pair 1 (blocks 62..123) damaged.
    let mut byte = [0u8; 1];
    m[0].read_at(&mut byte, data0 + 5).expect("read");
    m[0].write_at(&[byte[0] ^ 0x40], data0 + 5).expect("write");
    m[1].read_at(&mut byte, meta0 + 512 + 100).expect("read");
    m[1].write_at(&[byte[0] ^ 0x40], meta0 + 512 + 100)
        .expect("write");
    let vol = Volume::open_members(dyns(&m), &OpenOptions::default()).expect("open");
    let mut buf = vec![0u8; B4 as usize];
    vol.read_at(&mut buf, 0).expect("block 0 from member 1");
    assert!(buf == data(0));
    for b in 0..200 {
        vol.read_at(&mut buf, b * B4)
            .unwrap_or_else(|e| panic!("block {b}: {e}"));
        assert!(buf == data(b), "block {b}");
    }
    vol.close().expect("close");
    // Member 0 alone holds every block: block 0 was healed, and pair 1 was left as it was.
    let alone = Volume::open_members(
        vec![m[0].clone() as Arc<dyn Backend>],
        &OpenOptions {
            read_only: true,
            ..OpenOptions::default()
        },
    )
    .expect("member 0 alone");
    for b in 0..200 {
        alone
            .read_at(&mut buf, b * B4)
            .unwrap_or_else(|e| panic!("member 0 alone, block {b}: {e}"));
    }
}

/// Review 10, #1: a copy of a member saved earlier and put back, older than the set's
/// description (a health change since), is not read, and its resync copies every written
/// group (the write-intent map knows nothing of what it missed).
#[test]
fn a_stale_copy_of_a_member_put_back_is_never_read_and_fully_resynced() {
    let m = written_set(2);
    let saved = image(&m[1]);
    // A session without member 1 (recorded missing), then a resync: the set's description
    // moved on twice since the copy was saved.
    let vol =
        Volume::open_members(vec![m[0].clone() as Arc<dyn Backend>], &OpenOptions::default()).expect("open");
    for b in 0..BLOCKS {
        vol.write_at(&content(b, 5), b * BS).expect("write");
    }
    vol.close().expect("close");
    let vol = Volume::open_members(dyns(&m), &OpenOptions::default()).expect("open");
    vol.resync(&mut |_, _| {}).expect("resync");
    vol.close().expect("close");
    m[1].write_at(&saved, 0).expect("put the old copy back");
    let vol = Volume::open_members(dyns(&m), &OpenOptions::default()).expect("open");
    assert!(!vol.members()[1].1, "the stale copy is out of sync");
    assert!(
        vol.warnings().iter().any(|w| w.contains("older than the set")),
        "{:?}",
        vol.warnings()
    );
    let mut buf = vec![0u8; BS as usize];
    for b in 0..BLOCKS {
        vol.read_at(&mut buf, b * BS).expect("read");
        assert!(buf == content(b, 5), "block {b} read from the stale copy");
    }
    let report = vol.resync(&mut |_, _| {}).expect("resync");
    assert_eq!(
        report.groups,
        vol.geometry().groups,
        "every written group copied: {report:?}"
    );
    vol.close().expect("close");
    let alone =
        Volume::open_members(vec![m[1].clone() as Arc<dyn Backend>], &OpenOptions::default()).expect("alone");
    for b in 0..BLOCKS {
        alone.read_at(&mut buf, b * BS).expect("read");
        assert!(buf == content(b, 5), "block {b} on the resynchronized copy");
    }
}

/// Review 10, #1b: two members that each ran without the other are refused together, naming
/// both; each still opens alone.
#[test]
fn members_that_each_ran_alone_are_refused_as_a_split_brain() {
    let m = written_set(2);
    for (alone, round) in [(0usize, 6u8), (1, 7)] {
        let vol = Volume::open_members(
            vec![m[alone].clone() as Arc<dyn Backend>],
            &OpenOptions::default(),
        )
        .expect("open one member alone");
        vol.write_at(&content(3, round), 3 * BS).expect("write");
        vol.close().expect("close");
    }
    let err = Volume::open_members(dyns(&m), &OpenOptions::default()).expect_err("split brain");
    assert!(err.to_string().contains("split brain"), "{err}");
    let err = Volume::open_members(
        vec![m[1].clone(), m[0].clone()]
            .into_iter()
            .map(|b| b as Arc<dyn Backend>)
            .collect(),
        &OpenOptions::default(),
    )
    .expect_err("in either order");
    assert!(err.to_string().contains("split brain"), "{err}");
}

/// Review 10, #4b: an add cut short leaves a copy that a later resync must build whole.
#[test]
fn a_copy_whose_add_was_cut_short_is_built_whole_by_the_next_resync() {
    let m = written_set(2);
    let vol = Volume::open_members(dyns(&m), &OpenOptions::default()).expect("open");
    let groups = vol.geometry().groups;
    vol.close().expect("close");
    // As if `mirror add` had died during its copy: member 1 wiped back to the superblocks
    // only, and recorded as being built.
    let len = m[1].len();
    let mut img = image(&m[1]);
    img[4096..len as usize - 4096].fill(0);
    m[1].write_at(&img, 0).expect("write");
    let vol = Volume::open_members(dyns(&m), &OpenOptions::default()).expect("open");
    assert!(
        vol.members()[1].1,
        "still recorded in sync: nothing but the superblocks says otherwise"
    );
    vol.close().expect("close");
    // The real case: set the health byte of member 1 to "being built" in both members.
    for b in &m {
        let mut sb = image(b);
        for base in [0usize, len as usize - 4096] {
            let (mut s, copy) = blockguard::Superblock::decode(&sb[base..base + 512]).expect("sb");
            let info = s.mirror.as_mut().expect("mirror");
            info.members[1].in_sync = false;
            info.members[1].full_copy = true;
            let enc = s.encode(copy);
            sb[base..base + 512].copy_from_slice(&enc[..512]);
        }
        b.write_at(&sb[..4096], 0).expect("write");
        b.write_at(&sb[len as usize - 4096..], len - 4096).expect("write");
    }
    let vol = Volume::open_members(dyns(&m), &OpenOptions::default()).expect("open");
    assert!(!vol.members()[1].1);
    let report = vol.resync(&mut |_, _| {}).expect("resync");
    assert_eq!(report.groups, groups, "every written group: {report:?}");
    vol.close().expect("close");
    let alone =
        Volume::open_members(vec![m[1].clone() as Arc<dyn Backend>], &OpenOptions::default()).expect("alone");
    let mut buf = vec![0u8; BS as usize];
    for b in 0..BLOCKS {
        alone.read_at(&mut buf, b * BS).expect("read");
        assert!(buf == content(b, 0), "block {b}");
    }
}

/// Review 10, #0: a set with a missing member is not grown around the hole (the missing slot's
/// stand-in is another member's backend): the add is refused before anything is written.
#[test]
fn adding_to_a_set_with_a_missing_member_is_refused_and_writes_nothing() {
    let m = written_set(3);
    let vol = Volume::open_members(
        vec![m[0].clone(), m[2].clone()]
            .into_iter()
            .map(|b| b as Arc<dyn Backend>)
            .collect(),
        &OpenOptions {
            read_only: false,
            ..OpenOptions::default()
        },
    )
    .expect("open without member 1");
    let fresh = Arc::new(MemoryBackend::new(opts().backing_len().unwrap()).unwrap());
    let err = vol
        .add_member(fresh.clone(), &mut |_, _| {})
        .expect_err("a copy is missing");
    assert!(err.to_string().contains("copy 1 of the set is missing"), "{err}");
    assert!(
        image(&fresh).iter().all(|&b| b == 0),
        "nothing written to the new copy"
    );
    // Reopen: still a set with member 1 missing, both present members readable.
    let vol = Volume::open_members(
        vec![m[0].clone(), m[2].clone()]
            .into_iter()
            .map(|b| b as Arc<dyn Backend>)
            .collect(),
        &OpenOptions::default(),
    )
    .expect("the set still opens");
    let mut buf = vec![0u8; BS as usize];
    vol.read_at(&mut buf, 3 * BS).expect("read");
    assert!(buf == content(3, 0));
    vol.close().expect("close");
}
