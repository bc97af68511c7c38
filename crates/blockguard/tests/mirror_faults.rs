//! Mirror sets under the faults of the outside review 10 (`review10/` in branch `attack10`):
//! transient bad reads during convergence and resync, second crashes during convergence and
//! recovery, a member failing at every point of a session, flush failures on every member
//! (resumable), a repair that must not roll another block back, a lost superblock write.
//! Kept as the reviewer wrote them, as regression tests.

use blockguard::blockguard_backend::{Backend, FaultBackend, ReadFault};
use blockguard::{FormatOptions, OpenOptions, Volume};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;

const BS: usize = 4096;
const GROUP: u32 = 16;
const BLOCKS: u64 = 16 * 12; // 12 groups

fn fopts() -> FormatOptions {
    let mut o = FormatOptions::with_size(BLOCKS * BS as u64);
    o.group_blocks = Some(GROUP);
    o
}

fn geo() -> blockguard::Geometry {
    static G: std::sync::OnceLock<blockguard::Geometry> = std::sync::OnceLock::new();
    *G.get_or_init(|| {
        let len = fopts().backing_len().unwrap();
        let v = Volume::format(Arc::new(FaultBackend::new(len).unwrap()), &fopts()).unwrap();
        *v.geometry()
    })
}

fn oopts() -> OpenOptions {
    OpenOptions {
        background_commit: false,
        ..OpenOptions::default()
    }
}

/// Block `b`'s content at version `v` (v = 0: never written, zeros).
fn content(b: u64, v: u8) -> Vec<u8> {
    if v == 0 {
        return vec![0; BS];
    }
    let mut d = vec![0u8; BS];
    for (i, x) in d.iter_mut().enumerate() {
        *x = (b as u8).wrapping_mul(31) ^ v.wrapping_mul(7) ^ (i as u8);
    }
    d[0] = v;
    d[1] = b as u8;
    d
}

/// A crashed mirror set: images of both members, and for every block the versions a read may
/// return (the flushed one and, if rewritten since, the unflushed one).
struct Crashed {
    images: Vec<Vec<u8>>,
    allowed: Vec<Vec<u8>>,
}

/// Formats a 2-member set, writes v1 everywhere, flushes; v2 on odd blocks, flush; v3 on
/// blocks divisible by 3 without flush. Crash: member 0 keeps every write it received,
/// member 1 only what was flushed (both legal crash states of their own).
fn crashed_set() -> Crashed {
    let len = fopts().backing_len().unwrap();
    let m: Vec<Arc<FaultBackend>> = (0..2)
        .map(|_| Arc::new(FaultBackend::new(len).unwrap()))
        .collect();
    let vol = Volume::format_members(
        m.iter().map(|b| b.clone() as Arc<dyn Backend>).collect(),
        &fopts(),
    )
    .unwrap();
    vol.close().unwrap();
    let small = OpenOptions {
        stage_bytes: 8 * BS,
        ..oopts()
    };
    let vol =
        Volume::open_members(m.iter().map(|b| b.clone() as Arc<dyn Backend>).collect(), &small).unwrap();
    let mut allowed = vec![vec![1u8]; BLOCKS as usize];
    for b in 0..BLOCKS {
        vol.write_at(&content(b, 1), b * BS as u64).unwrap();
    }
    vol.flush().unwrap();
    for b in (1..BLOCKS).step_by(2) {
        vol.write_at(&content(b, 2), b * BS as u64).unwrap();
        allowed[b as usize] = vec![2];
    }
    vol.flush().unwrap();
    for b in (0..BLOCKS).step_by(3) {
        vol.write_at(&content(b, 3), b * BS as u64).unwrap();
        allowed[b as usize].push(3);
    }
    // Get the v3 writes to the backends (commit) without a flush completing: a small stage is
    // not available after open, so rely on a flush of a *different* kind: none. Instead take
    // the images now: member 0 = everything it received (live), member 1 = durable only.
    let images = vec![m[0].live_image(), m[1].durable_image()];
    for b in &m {
        b.crash_now();
    }
    drop(vol);
    Crashed { images, allowed }
}

/// A read fault to inject: (offset, length) -> the fault, if any.
type ReadFaultFn = Arc<dyn Fn(u64, usize) -> Option<ReadFault> + Send + Sync>;

/// Opens the crashed set read-write with `fault` applied to member `who`'s reads, then reads
/// every block twice (and again after a clean close and reopen). Returns the problems.
fn open_and_check(c: &Crashed, who: usize, fault: Option<ReadFaultFn>) -> Vec<String> {
    let m: Vec<Arc<FaultBackend>> = c
        .images
        .iter()
        .map(|i| Arc::new(FaultBackend::from_image(i.clone())))
        .collect();
    if let Some(f) = fault {
        m[who].read_faults_with(move |o, l| f(o, l));
    }
    let mut problems = Vec::new();
    let vol = match Volume::open_members(
        m.iter().map(|b| b.clone() as Arc<dyn Backend>).collect(),
        &oopts(),
    ) {
        Ok(v) => v,
        Err(e) => return vec![format!("open failed: {e}")],
    };
    for b in &m {
        b.clear_faults();
    }
    let check = |vol: &Volume, what: &str, problems: &mut Vec<String>| {
        for b in 0..BLOCKS {
            let mut buf = vec![0u8; BS];
            match vol.read_at(&mut buf, b * BS as u64) {
                Ok(()) => {
                    if !c.allowed[b as usize].iter().any(|&v| content(b, v) == buf) {
                        problems.push(format!(
                            "{what}: block {b}: WRONG DATA (first bytes {:?}, allowed versions {:?})",
                            &buf[..2],
                            c.allowed[b as usize]
                        ));
                    }
                }
                Err(e) => {
                    let intact = c
                        .images
                        .iter()
                        .enumerate()
                        .filter(|(_, img)| {
                            let at = geo().data_offset(b) as usize;
                            c.allowed[b as usize]
                                .iter()
                                .any(|&v| content(b, v) == img[at..at + BS])
                        })
                        .map(|(i, _)| i)
                        .collect::<Vec<_>>();
                    if intact.is_empty() {
                        // torn on every member: G1 allows it to fail
                    } else {
                        problems.push(format!("{what}: block {b}: read error although member(s) {intact:?} hold an intact allowed version in the crash image: {e}"));
                    }
                }
            }
        }
    };
    check(&vol, "after open", &mut problems);
    if let Err(e) = vol.close() {
        problems.push(format!("close: {e}"));
    }
    // Reopen each member alone as well as together (a member must hold the set's contents).
    match Volume::open_members(
        m.iter().map(|b| b.clone() as Arc<dyn Backend>).collect(),
        &oopts(),
    ) {
        Ok(v) => {
            check(&v, "reopened", &mut problems);
            let _ = v.close();
        }
        Err(e) => problems.push(format!("reopen failed: {e}")),
    }
    for (i, b) in m.iter().enumerate() {
        let alone = FaultBackend::from_image(b.live_image());
        let ro = OpenOptions {
            read_only: true,
            ..oopts()
        };
        match Volume::open_members(vec![Arc::new(alone) as Arc<dyn Backend>], &ro) {
            Ok(v) => {
                let mut p = Vec::new();
                check(&v, &format!("member {i} alone"), &mut p);
                problems.extend(p);
            }
            Err(e) => problems.push(format!("member {i} alone: open failed: {e}")),
        }
    }
    problems
}

fn report(name: &str, problems: &[String]) -> usize {
    if !problems.is_empty() {
        println!("== {name}: {} problems, e.g.:", problems.len());
        for p in problems.iter().take(4) {
            println!("   {p}");
        }
    }
    problems.len()
}

/// Baseline: no read fault. Must be clean.
#[test]
fn baseline_crash_convergence() {
    let c = crashed_set();
    let p = open_and_check(&c, 0, None);
    assert_eq!(report("baseline", &p), 0);
}

/// One read of member `who` (the n-th read at open, any offset) returns zeros (or stale or
/// misdirected data) once. The docs: "A single bad read therefore never becomes wrong data,
/// an error, a false hole, or a permanent loss."
#[test]
fn one_bad_read_during_open_of_a_crashed_set() {
    let c = crashed_set();
    let mut bad_cases = 0;
    for who in 0..2 {
        for kind in 0..3 {
            for n in 0..400usize {
                let count = Arc::new(AtomicUsize::new(0));
                let fired = Arc::new(AtomicUsize::new(0));
                let (count2, fired2) = (count.clone(), fired.clone());
                let f: Arc<dyn Fn(u64, usize) -> Option<ReadFault> + Send + Sync> =
                    Arc::new(move |_o, _l| {
                        if count2.fetch_add(1, Ordering::SeqCst) == n {
                            fired2.store(1, Ordering::SeqCst);
                            Some(match kind {
                                0 => ReadFault::Zeros,
                                1 => ReadFault::Stale,
                                _ => ReadFault::From(0),
                            })
                        } else {
                            None
                        }
                    });
                let p = open_and_check(&c, who, Some(f));
                if fired.load(Ordering::SeqCst) == 0 {
                    break; // fewer than n reads at open
                }
                let kname = ["zeros", "stale", "misdirected(from 0)"][kind];
                if report(&format!("member {who}, read #{n} at open returns {kname}"), &p) > 0 {
                    bad_cases += 1;
                }
            }
        }
    }
    assert_eq!(bad_cases, 0, "cases where one bad read at open caused problems");
}

/// A member backend that logs, after every operation that changes the disk, how many events
/// its fault backend has recorded: a global order of the two members' histories.
#[derive(Debug)]
struct Logged {
    inner: Arc<FaultBackend>,
    idx: usize,
    log: Arc<std::sync::Mutex<Vec<(usize, usize)>>>,
}

impl Logged {
    fn note(&self) {
        let n = self.inner.events().len();
        self.log.lock().unwrap().push((self.idx, n));
    }
}

impl Backend for Logged {
    fn len(&self) -> u64 {
        self.inner.len()
    }
    fn read_at(&self, buf: &mut [u8], offset: u64) -> std::io::Result<()> {
        self.inner.read_at(buf, offset)
    }
    fn write_at(&self, buf: &[u8], offset: u64) -> std::io::Result<()> {
        let r = self.inner.write_at(buf, offset);
        self.note();
        r
    }
    fn write_vectored_at(&self, bufs: &[&[u8]], offset: u64) -> std::io::Result<()> {
        let r = self.inner.write_vectored_at(bufs, offset);
        self.note();
        r
    }
    fn flush(&self) -> std::io::Result<()> {
        let r = self.inner.flush();
        self.note();
        r
    }
    fn zero_range(&self, offset: u64, len: u64) -> std::io::Result<()> {
        let r = self.inner.zero_range(offset, len);
        self.note();
        r
    }
    fn zero_ranges(&self, offset: u64, len: u64) -> std::io::Result<Vec<std::ops::Range<u64>>> {
        let r = self.inner.zero_ranges(offset, len);
        self.note();
        r
    }
    fn name(&self) -> String {
        format!("member{}", self.idx)
    }
}

/// Second crash: the crashed set is opened (convergence, then recovery) and crashed again at
/// every point of that open, each member keeping its own unflushed writes or not (and torn
/// samples) independently. Every image pair is opened and every block read: no read error
/// (never cry wolf), no wrong data, each member alone holding the contents too.
#[test]
fn second_crash_during_convergence_and_recovery() {
    use rand::SeedableRng;
    let c = crashed_set();
    let fb: Vec<Arc<FaultBackend>> = c
        .images
        .iter()
        .map(|i| Arc::new(FaultBackend::from_image(i.clone())))
        .collect();
    let log = Arc::new(std::sync::Mutex::new(Vec::new()));
    let members: Vec<Arc<dyn Backend>> = fb
        .iter()
        .enumerate()
        .map(|(idx, b)| {
            Arc::new(Logged {
                inner: b.clone(),
                idx,
                log: log.clone(),
            }) as Arc<dyn Backend>
        })
        .collect();
    let vol = Volume::open_members(members, &oopts()).unwrap();
    // Write after the open too (first session after the crash), then crash for good.
    for b in (0..BLOCKS).step_by(5) {
        vol.write_at(&content(b, 4), b * BS as u64).unwrap();
    }
    vol.flush().unwrap();
    let points: Vec<(usize, usize)> = {
        let l = log.lock().unwrap();
        let mut n = [0usize; 2];
        let mut v = vec![(0, 0)];
        for &(i, e) in l.iter() {
            n[i] = e;
            v.push((n[0], n[1]));
        }
        v
    };
    for b in &fb {
        b.crash_now();
    }
    drop(vol);
    // After the session's flush, blocks written with v4 may read v4 or (before it) anything allowed.
    let mut allowed = c.allowed.clone();
    for b in (0..BLOCKS).step_by(5) {
        allowed[b as usize].push(4);
    }
    println!("{} global points", points.len());
    let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(10);
    let mut bad = 0;
    let mut seen = std::collections::HashSet::new();
    for (k, &(n0, n1)) in points.iter().enumerate() {
        if !seen.insert((n0, n1)) {
            continue;
        }
        let s0 = fb[0].state_at(n0);
        let s1 = fb[1].state_at(n1);
        let pick = |s: &blockguard::blockguard_backend::CrashState,
                    how: usize,
                    rng: &mut rand_chacha::ChaCha8Rng|
         -> Vec<u8> {
            match how {
                0 => s.durable_image().to_vec(),
                1 => s.crash_image(&(0..s.unflushed().len()).collect::<Vec<_>>()),
                _ => s.random_crash_image(rng, true),
            }
        };
        for (h0, h1) in [
            (0, 0),
            (1, 1),
            (0, 1),
            (1, 0),
            (2, 2),
            (2, 0),
            (0, 2),
            (2, 1),
            (1, 2),
        ] {
            let images = vec![pick(&s0, h0, &mut rng), pick(&s1, h1, &mut rng)];
            let cc = Crashed {
                images,
                allowed: allowed.clone(),
            };
            let p = open_and_check(&cc, 0, None);
            if report(&format!("point {k} (member0 event {n0}, member1 event {n1}), images {h0}/{h1} (0 durable, 1 all, 2 random torn)"), &p) > 0 {
                bad += 1;
            }
        }
    }
    assert_eq!(bad, 0, "second-crash images with problems");
}

/// Member 1's disk silently loses both the data write and the metadata write of one block
/// (no error: a lost write). Member 1 is then "consistent but stale" for that block. The docs
/// (read repair) say such a member "must be the one repaired, never the source". After a
/// reopen (cold cache), every read of the block must return the new version.
#[test]
#[ignore = "known limit (docs/CONSISTENCY.md, \"What a mirror does not protect against\"): a member that silently lost both a block's data write and its metadata write is consistent and stale; a read striped to it returns the old version"]
fn lost_data_and_metadata_write_on_one_member() {
    const NB: u64 = 16 * 40;
    let fo = {
        let mut o = FormatOptions::with_size(NB * BS as u64);
        o.group_blocks = Some(GROUP);
        o
    };
    let len = fo.backing_len().unwrap();
    let g = {
        let v = Volume::format(Arc::new(FaultBackend::new(len).unwrap()), &fo).unwrap();
        *v.geometry()
    };
    // blocks whose data (and metadata) lie in member 1's read stripe (1..2 MiB), and mixed
    let stripe = |o: u64| (o >> 20) % 2;
    let mut xs = Vec::new();
    for b in 0..NB {
        let (grp, _) = g.group_of(b);
        let key = (stripe(g.data_offset(b)), stripe(g.meta_offset(grp, 0)));
        if !xs.iter().any(|(_, k)| *k == key) {
            xs.push((b + 3, key));
        }
    }
    println!("blocks (data stripe member, meta stripe member): {xs:?}");
    let mut wrong_total = 0;
    for (x, _) in xs.clone() {
        let m: Vec<Arc<FaultBackend>> = (0..2)
            .map(|_| Arc::new(FaultBackend::new(len).unwrap()))
            .collect();
        let dynm = |m: &Vec<Arc<FaultBackend>>| {
            m.iter()
                .map(|b| b.clone() as Arc<dyn Backend>)
                .collect::<Vec<_>>()
        };
        Volume::format_members(dynm(&m), &fo).unwrap().close().unwrap();
        let vol = Volume::open_members(dynm(&m), &oopts()).unwrap();
        for b in 0..NB {
            vol.write_at(&content(b, 1), b * BS as u64).unwrap();
        }
        vol.close().unwrap();
        let (group, _) = g.group_of(x);
        let meta = g.meta_offset(group, 0)..g.meta_offset(group, 0) + 2 * BS as u64;
        let data = g.data_offset(x)..g.data_offset(x) + BS as u64;
        let vol = Volume::open_members(dynm(&m), &oopts()).unwrap();
        m[1].misdirect_writes_with(move |o, l| {
            let r = o..o + l as u64;
            let hit = |t: &std::ops::Range<u64>| r.start < t.end && t.start < r.end;
            (hit(&meta) || hit(&data)).then_some(u64::MAX / 2)
        });
        vol.write_at(&content(x, 2), x * BS as u64).unwrap();
        vol.flush().unwrap();
        m[1].clear_faults();
        vol.close().unwrap();
        // Reopen from the disks (cold caches) several times; read x alone, and after its
        // group's other blocks (metadata read by either member first).
        let mut wrong = 0;
        let mut errs = 0;
        for first in [None, Some(x ^ 1), Some(g.first_block(group))] {
            let vol = Volume::open_members(dynm(&m), &oopts()).unwrap();
            let mut buf = vec![0u8; BS];
            if let Some(f) = first {
                let _ = vol.read_at(&mut buf, f * BS as u64);
            }
            for _ in 0..3 {
                match vol.read_at(&mut buf, x * BS as u64) {
                    Ok(()) if buf == content(x, 2) => {}
                    Ok(()) if buf == content(x, 1) => wrong += 1,
                    Ok(()) => wrong += 1,
                    Err(_) => errs += 1,
                }
            }
            let st = vol.stats();
            vol.close().unwrap();
            println!("block {x}: first read {first:?}: wrong so far {wrong}, errors {errs}, stats {st:?}");
        }
        // And through the set's check of every copy.
        wrong_total += wrong;
    }
    assert_eq!(
        wrong_total, 0,
        "reads that returned the OLD version (member 1 lost the write)"
    );
}

/// Compound: member 1 silently lost the write of block Y (data + its metadata sector; reads of
/// Y are served from member 0 and correct). Later block X of the same group (another tag
/// sector) is damaged on member 0. Repairing X copies member 1's whole group metadata onto
/// member 0 -- including Y's stale sector. Y then fails on member 0, and its repair takes
/// member 1's consistent old copy as the source: the flushed write of Y is gone everywhere.
#[test]
fn repair_of_one_block_rolls_back_another() {
    const NB: u64 = 16 * 40;
    let mut fo = FormatOptions::with_size(NB * BS as u64);
    fo.group_blocks = Some(64); // two tag sectors per group (62 tags per 512-byte sector)
    let len = fo.backing_len().unwrap();
    let m: Vec<Arc<FaultBackend>> = (0..2)
        .map(|_| Arc::new(FaultBackend::new(len).unwrap()))
        .collect();
    let dynm = |m: &Vec<Arc<FaultBackend>>| {
        m.iter()
            .map(|b| b.clone() as Arc<dyn Backend>)
            .collect::<Vec<_>>()
    };
    let vol = Volume::format_members(dynm(&m), &fo).unwrap();
    let g = *vol.geometry();
    vol.close().unwrap();
    let (x, y) = (1u64, 63u64); // group 0: sector 0 and sector 1; all in member 0's stripe
    assert_eq!(g.group_of(x).0, g.group_of(y).0);
    let vol = Volume::open_members(dynm(&m), &oopts()).unwrap();
    for b in 0..NB {
        vol.write_at(&content(b, 1), b * BS as u64).unwrap();
    }
    vol.close().unwrap();
    let (group, _) = g.group_of(y);
    let meta = g.meta_offset(group, 0)..g.meta_offset(group, 0) + 2 * BS as u64;
    let data = g.data_offset(y)..g.data_offset(y) + BS as u64;
    let vol = Volume::open_members(dynm(&m), &oopts()).unwrap();
    m[1].misdirect_writes_with(move |o, l| {
        let r = o..o + l as u64;
        let hit = |t: &std::ops::Range<u64>| r.start < t.end && t.start < r.end;
        (hit(&meta) || hit(&data)).then_some(u64::MAX / 2)
    });
    vol.write_at(&content(y, 2), y * BS as u64).unwrap();
    vol.flush().unwrap();
    m[1].clear_faults();
    vol.close().unwrap();
    let vol = Volume::open_members(dynm(&m), &oopts()).unwrap();
    let mut buf = vec![0u8; BS];
    vol.read_at(&mut buf, y * BS as u64).unwrap();
    let before = buf == content(y, 2);
    println!("before damaging X: Y reads v2: {before}");
    vol.close().unwrap();
    // Bit rot in X's data on member 0.
    m[0].flip_bit(g.data_offset(x) + 100, 3).unwrap();
    let vol = Volume::open_members(dynm(&m), &oopts()).unwrap();
    let rx = vol
        .read_at(&mut buf, x * BS as u64)
        .map(|()| buf == content(x, 1));
    println!("read X: {rx:?} (true = correct)");
    let ry = vol.read_at(&mut buf, y * BS as u64).map(|()| {
        if buf == content(y, 2) {
            "v2 (correct)"
        } else if buf == content(y, 1) {
            "v1 (OLD: the flushed write is gone)"
        } else {
            "garbage"
        }
    });
    println!("read Y after X's repair: {ry:?}; stats {:?}", vol.stats());
    vol.close().unwrap();
    // Each member alone.
    for (i, b) in m.iter().enumerate() {
        let alone = FaultBackend::from_image(b.live_image());
        let ro = OpenOptions {
            read_only: true,
            ..oopts()
        };
        let v = Volume::open_members(vec![Arc::new(alone) as Arc<dyn Backend>], &ro).unwrap();
        let r = v.read_at(&mut buf, y * BS as u64).map(|()| buf[0]);
        println!("member {i} alone: Y reads version {r:?}");
    }
    assert!(before);
    assert_eq!(ry.ok(), Some("v2 (correct)"));
}

/// Write-back failure on a mirror set: flushes fail (dropping unflushed writes) on both
/// members at once, or on member 1 first and later on member 0. After `resume`: every block
/// reads its last acknowledged version or fails if reported lost; never an older version.
#[test]
fn resume_after_flush_failures_on_members() {
    let mut total = 0;
    for scenario in 0..3 {
        let len = fopts().backing_len().unwrap();
        let m: Vec<Arc<FaultBackend>> = (0..2)
            .map(|_| Arc::new(FaultBackend::new(len).unwrap()))
            .collect();
        let dynm = |m: &Vec<Arc<FaultBackend>>| {
            m.iter()
                .map(|b| b.clone() as Arc<dyn Backend>)
                .collect::<Vec<_>>()
        };
        Volume::format_members(dynm(&m), &fopts())
            .unwrap()
            .close()
            .unwrap();
        let small = OpenOptions {
            stage_bytes: 8 * BS,
            ..oopts()
        };
        let vol = Volume::open_members(dynm(&m), &small).unwrap();
        let mut latest = vec![1u8; BLOCKS as usize];
        for b in 0..BLOCKS {
            vol.write_at(&content(b, 1), b * BS as u64).unwrap();
        }
        vol.flush().unwrap();
        match scenario {
            0 => {
                m[0].fail_next_flush_dropping_writes();
                m[1].fail_next_flush_dropping_writes();
            }
            1 => m[1].fail_next_flush_dropping_writes(),
            _ => m[0].fail_next_flush_dropping_writes(),
        }
        let mut errors = Vec::new();
        let mut either: Vec<u64> = Vec::new();
        for b in (0..BLOCKS).step_by(2) {
            match vol.write_at(&content(b, 2), b * BS as u64) {
                Ok(()) => latest[b as usize] = 2,
                Err(e) => {
                    errors.push(format!("write {b}: {e}"));
                    either.push(b);
                    break;
                }
            }
            if b == 40 && scenario == 1 {
                m[0].fail_next_flush_dropping_writes();
            }
        }
        let f = vol.flush();
        println!(
            "scenario {scenario}: write errors {:?}, flush: {:?}",
            errors.first(),
            f.as_ref().err().map(|e| e.to_string())
        );
        let rep = vol.resume();
        let resumed = rep.is_ok();
        let lost: Vec<u64> = match &rep {
            Ok(r) => {
                println!(
                    "  resume: retried {}, verified {}, repaired {}, lost {:?}",
                    r.blocks_retried, r.blocks_verified, r.blocks_repaired, r.lost
                );
                r.lost.clone()
            }
            Err(e) => {
                println!("  resume failed: {e}");
                vec![]
            }
        };
        let mut bad = 0;
        let mut buf = vec![0u8; BS];
        let check = |vol: &Volume, what: &str, bad: &mut usize, buf: &mut Vec<u8>| {
            for b in 0..BLOCKS {
                match vol.read_at(buf, b * BS as u64) {
                    Ok(()) if *buf == content(b, latest[b as usize]) => {}
                    Ok(()) if either.contains(&b) && *buf == content(b, 2) => {}
                    // A write reported lost was never flushed: once the loss is accepted and
                    // the volume reopened, the block reads as the version a crash would have
                    // left (its previous one), never anything else.
                    Ok(()) if lost.contains(&b) && *buf == content(b, 1) && what == "reopened" => {}
                    Ok(()) => {
                        *bad += 1;
                        if *bad < 5 {
                            println!("  {what}: block {b}: WRONG DATA (version byte {}, latest {}, reported lost: {})", buf[0], latest[b as usize], lost.contains(&b));
                        }
                    }
                    Err(e) if lost.contains(&b) => {
                        let _ = e;
                    }
                    Err(e) => {
                        *bad += 1;
                        if *bad < 5 {
                            println!("  {what}: block {b}: error, not reported lost: {e}");
                        }
                    }
                }
            }
        };
        if resumed {
            check(&vol, "after resume", &mut bad, &mut buf);
        } else {
            bad += 1;
            println!(
                "  RESUME FAILED: the volume cannot be resumed (members {:?})",
                vol.members()
            );
        }
        println!("  members {:?}, stats {:?}", vol.members(), vol.stats());
        let _ = vol.clear_error_state();
        let c = vol.close();
        println!("  close: {:?}", c.err().map(|e| e.to_string()));
        let vol = Volume::open_members(dynm(&m), &oopts()).unwrap();
        if resumed {
            check(&vol, "reopened", &mut bad, &mut buf);
        }
        vol.close().unwrap();
        println!("  scenario {scenario}: {bad} problems");
        total += bad;
    }
    assert_eq!(total, 0);
}

/// A member backend that fails every write/flush from the `k`-th mutating operation on.
#[derive(Debug)]
struct FailFrom {
    inner: Arc<FaultBackend>,
    k: usize,
    n: AtomicUsize,
}

impl FailFrom {
    fn tick(&self) -> std::io::Result<()> {
        if self.n.fetch_add(1, Ordering::SeqCst) >= self.k {
            Err(std::io::Error::other("member 1 gone"))
        } else {
            Ok(())
        }
    }
}

impl Backend for FailFrom {
    fn len(&self) -> u64 {
        self.inner.len()
    }
    fn read_at(&self, buf: &mut [u8], offset: u64) -> std::io::Result<()> {
        self.inner.read_at(buf, offset)
    }
    fn write_at(&self, buf: &[u8], offset: u64) -> std::io::Result<()> {
        self.tick()?;
        self.inner.write_at(buf, offset)
    }
    fn write_vectored_at(&self, bufs: &[&[u8]], offset: u64) -> std::io::Result<()> {
        self.tick()?;
        self.inner.write_vectored_at(bufs, offset)
    }
    fn flush(&self) -> std::io::Result<()> {
        self.tick()?;
        self.inner.flush()
    }
    fn zero_range(&self, offset: u64, len: u64) -> std::io::Result<()> {
        self.tick()?;
        self.inner.zero_range(offset, len)
    }
    fn name(&self) -> String {
        "member1".into()
    }
}

/// Member 1 fails at every possible point of a session (writes, zeroing, flushes, with the
/// dirty map cleared at every flush); the session goes on degraded and closes; member 1 comes
/// back, `resync`; member 1 ALONE must then hold exactly the latest contents ("resync copies
/// exactly the marked groups" must not miss one).
#[test]
fn member_fails_at_every_point_then_resync() {
    let len = fopts().backing_len().unwrap();
    let mut bad_points = 0;
    let mut k = 0;
    loop {
        let m: Vec<Arc<FaultBackend>> = (0..2)
            .map(|_| Arc::new(FaultBackend::new(len).unwrap()))
            .collect();
        Volume::format_members(
            m.iter().map(|b| b.clone() as Arc<dyn Backend>).collect(),
            &fopts(),
        )
        .unwrap()
        .close()
        .unwrap();
        // Session 0: everything v1, closed cleanly.
        let v = Volume::open_members(
            m.iter().map(|b| b.clone() as Arc<dyn Backend>).collect(),
            &oopts(),
        )
        .unwrap();
        for b in 0..BLOCKS {
            v.write_at(&content(b, 1), b * BS as u64).unwrap();
        }
        v.close().unwrap();
        let f1 = Arc::new(FailFrom {
            inner: m[1].clone(),
            k,
            n: AtomicUsize::new(0),
        });
        let opts = OpenOptions {
            stage_bytes: 4 * BS,
            dirty_clear_interval: std::time::Duration::ZERO,
            ..oopts()
        };
        let v = Volume::open_members(
            vec![m[0].clone() as Arc<dyn Backend>, f1.clone() as Arc<dyn Backend>],
            &opts,
        )
        .unwrap();
        let mut latest = vec![1u8; BLOCKS as usize];
        let mut step = 0u64;
        for round in 2..5u8 {
            for b in (0..BLOCKS).filter(|b| (b * 7 + u64::from(round)) % 5 == 0) {
                step += 1;
                if step.is_multiple_of(9) {
                    v.write_zeroes(b * BS as u64, BS as u64).unwrap();
                    latest[b as usize] = 0;
                } else {
                    v.write_at(&content(b, round), b * BS as u64).unwrap();
                    latest[b as usize] = round;
                }
                if step.is_multiple_of(4) {
                    v.flush().unwrap();
                }
            }
            v.flush().unwrap();
        }
        let dropped = !v.members()[1].1;
        v.close().unwrap();
        let ops = f1.n.load(Ordering::SeqCst);
        if !dropped {
            println!("member 1 never failed with k = {k} (session had {ops} ops): done");
            break;
        }
        // Member 1 back; resync; member 1 alone.
        let v = Volume::open_members(
            m.iter().map(|b| b.clone() as Arc<dyn Backend>).collect(),
            &oopts(),
        )
        .unwrap();
        let r = v.resync(&mut |_, _| {});
        v.close().unwrap();
        let alone = FaultBackend::from_image(m[1].live_image());
        let ro = OpenOptions {
            read_only: true,
            ..oopts()
        };
        let v1 = Volume::open_members(vec![Arc::new(alone) as Arc<dyn Backend>], &ro).unwrap();
        let mut wrong = Vec::new();
        let mut buf = vec![0u8; BS];
        for b in 0..BLOCKS {
            match v1.read_at(&mut buf, b * BS as u64) {
                Ok(()) if buf == content(b, latest[b as usize]) => {}
                Ok(()) => wrong.push((b, buf[0], latest[b as usize])),
                Err(_) => wrong.push((b, 255, latest[b as usize])),
            }
        }
        if !wrong.is_empty() {
            bad_points += 1;
            println!(
                "k = {k}: resync {:?}; member 1 alone: {} blocks wrong, e.g. (block, got, want) {:?}",
                r.as_ref().map(|r| r.groups),
                wrong.len(),
                &wrong[..wrong.len().min(5)]
            );
        }
        k += 1;
    }
    assert_eq!(bad_points, 0);
}

/// Crash at every point of a `resync` (each member's unflushed writes kept or dropped
/// independently, torn samples): reopened, the set must read the latest contents, and member 1
/// alone, if the reopened set calls it in sync, must hold them too.
#[test]
fn crash_during_resync() {
    use rand::SeedableRng;
    let len = fopts().backing_len().unwrap();
    let m: Vec<Arc<FaultBackend>> = (0..2)
        .map(|_| Arc::new(FaultBackend::new(len).unwrap()))
        .collect();
    let dynm = |m: &Vec<Arc<FaultBackend>>| {
        m.iter()
            .map(|b| b.clone() as Arc<dyn Backend>)
            .collect::<Vec<_>>()
    };
    Volume::format_members(dynm(&m), &fopts())
        .unwrap()
        .close()
        .unwrap();
    let v = Volume::open_members(dynm(&m), &oopts()).unwrap();
    for b in 0..BLOCKS {
        v.write_at(&content(b, 1), b * BS as u64).unwrap();
    }
    v.close().unwrap();
    // Session with member 1 missing: rewrite a third of the blocks.
    let v = Volume::open_members(vec![m[0].clone() as Arc<dyn Backend>], &oopts()).unwrap();
    let mut latest = vec![1u8; BLOCKS as usize];
    for b in (0..BLOCKS).step_by(3) {
        v.write_at(&content(b, 2), b * BS as u64).unwrap();
        latest[b as usize] = 2;
    }
    v.close().unwrap();
    // Resync, logged.
    let fb: Vec<Arc<FaultBackend>> = m
        .iter()
        .map(|b| Arc::new(FaultBackend::from_image(b.live_image())))
        .collect();
    let log = Arc::new(std::sync::Mutex::new(Vec::new()));
    let members: Vec<Arc<dyn Backend>> = fb
        .iter()
        .enumerate()
        .map(|(idx, b)| {
            Arc::new(Logged {
                inner: b.clone(),
                idx,
                log: log.clone(),
            }) as Arc<dyn Backend>
        })
        .collect();
    let v = Volume::open_members(members, &oopts()).unwrap();
    let r = v.resync(&mut |_, _| {}).unwrap();
    println!("resync: {r:?}");
    v.close().unwrap();
    let points: Vec<(usize, usize)> = {
        let l = log.lock().unwrap();
        let mut n = [0usize; 2];
        let mut pts = vec![(0, 0)];
        for &(i, e) in l.iter() {
            n[i] = e;
            pts.push((n[0], n[1]));
        }
        pts
    };
    println!("{} points", points.len());
    let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(11);
    let mut bad = 0;
    for (k, &(n0, n1)) in points.iter().enumerate() {
        let s0 = fb[0].state_at(n0);
        let s1 = fb[1].state_at(n1);
        for (h0, h1) in [(0, 0), (1, 1), (0, 1), (1, 0), (2, 2), (1, 2), (2, 1)] {
            let pick = |s: &blockguard::blockguard_backend::CrashState,
                        how: usize,
                        rng: &mut rand_chacha::ChaCha8Rng| match how {
                0 => s.durable_image().to_vec(),
                1 => s.crash_image(&(0..s.unflushed().len()).collect::<Vec<_>>()),
                _ => s.random_crash_image(rng, true),
            };
            let imgs = [pick(&s0, h0, &mut rng), pick(&s1, h1, &mut rng)];
            let mm: Vec<Arc<FaultBackend>> = imgs
                .iter()
                .map(|i| Arc::new(FaultBackend::from_image(i.clone())))
                .collect();
            let mut problems = Vec::new();
            match Volume::open_members(dynm(&mm), &oopts()) {
                Err(e) => problems.push(format!("open: {e}")),
                Ok(v) => {
                    let in_sync1 = v.members()[1].1;
                    let mut buf = vec![0u8; BS];
                    for b in 0..BLOCKS {
                        match v.read_at(&mut buf, b * BS as u64) {
                            Ok(()) if buf == content(b, latest[b as usize]) => {}
                            Ok(()) => problems.push(format!("set: block {b} wrong (got v{})", buf[0])),
                            Err(e) => problems.push(format!("set: block {b}: {e}")),
                        }
                    }
                    let _ = v.close();
                    if in_sync1 {
                        let ro = OpenOptions {
                            read_only: true,
                            ..oopts()
                        };
                        let alone =
                            Arc::new(FaultBackend::from_image(mm[1].live_image())) as Arc<dyn Backend>;
                        match Volume::open_members(vec![alone], &ro) {
                            Err(e) => problems.push(format!("member 1 alone (in sync): open {e}")),
                            Ok(v1) => {
                                for b in 0..BLOCKS {
                                    match v1.read_at(&mut buf, b * BS as u64) {
                                        Ok(()) if buf == content(b, latest[b as usize]) => {}
                                        Ok(()) => problems.push(format!(
                                            "member 1 alone (in sync): block {b} wrong (got v{})",
                                            buf[0]
                                        )),
                                        Err(e) => {
                                            problems.push(format!("member 1 alone (in sync): block {b}: {e}"))
                                        }
                                    }
                                }
                            }
                        }
                    }
                }
            }
            if report(
                &format!("resync crash point {k} ({n0},{n1}) images {h0}/{h1}"),
                &problems,
            ) > 0
            {
                bad += 1;
            }
        }
    }
    assert_eq!(bad, 0);
}

/// One bad read (zeros, or another offset's bytes) of the source member during `resync`. The
/// copy is read back and compared with what was written -- not with the source -- so the bad
/// bytes land on the target, which is then recorded in sync.
#[test]
fn one_bad_read_during_resync() {
    let len = fopts().backing_len().unwrap();
    let m: Vec<Arc<FaultBackend>> = (0..2)
        .map(|_| Arc::new(FaultBackend::new(len).unwrap()))
        .collect();
    let dynm = |m: &Vec<Arc<FaultBackend>>| {
        m.iter()
            .map(|b| b.clone() as Arc<dyn Backend>)
            .collect::<Vec<_>>()
    };
    Volume::format_members(dynm(&m), &fopts())
        .unwrap()
        .close()
        .unwrap();
    let v = Volume::open_members(dynm(&m), &oopts()).unwrap();
    for b in 0..BLOCKS {
        v.write_at(&content(b, 1), b * BS as u64).unwrap();
    }
    v.close().unwrap();
    let mut latest = vec![1u8; BLOCKS as usize];
    for b in (0..BLOCKS).step_by(3) {
        latest[b as usize] = 2;
    }
    let base: Vec<Vec<u8>> = m.iter().map(|b| b.live_image()).collect();
    let mut bad_cases = 0;
    for kind in 0..3 {
        for n in 0..200usize {
            let mm: Vec<Arc<FaultBackend>> = base
                .iter()
                .map(|i| Arc::new(FaultBackend::from_image(i.clone())))
                .collect();
            // Member 1 missing while v2 is written (on this backend, so stale reads see v1).
            let v = Volume::open_members(vec![mm[0].clone() as Arc<dyn Backend>], &oopts()).unwrap();
            for b in (0..BLOCKS).step_by(3) {
                v.write_at(&content(b, 2), b * BS as u64).unwrap();
            }
            v.close().unwrap();
            let v = Volume::open_members(dynm(&mm), &oopts()).unwrap();
            let count = Arc::new(AtomicUsize::new(0));
            let c2 = count.clone();
            let fired = Arc::new(AtomicUsize::new(0));
            let f2 = fired.clone();
            mm[0].read_faults_with(move |_o, _l| {
                if c2.fetch_add(1, Ordering::SeqCst) == n {
                    f2.store(1, Ordering::SeqCst);
                    Some(match kind {
                        0 => ReadFault::Zeros,
                        1 => ReadFault::From(0),
                        _ => ReadFault::Stale,
                    })
                } else {
                    None
                }
            });
            let r = v.resync(&mut |_, _| {});
            mm[0].clear_faults();
            let _ = v.close();
            if fired.load(Ordering::SeqCst) == 0 {
                break;
            }
            let mut problems = Vec::new();
            if let Err(e) = &r {
                problems.push(format!("resync failed: {e}"));
            }
            let ro = OpenOptions {
                read_only: true,
                ..oopts()
            };
            let alone = Arc::new(FaultBackend::from_image(mm[1].live_image())) as Arc<dyn Backend>;
            match Volume::open_members(vec![alone], &ro) {
                Err(e) => problems.push(format!("member 1 alone: open: {e}")),
                Ok(v1) => {
                    let mut buf = vec![0u8; BS];
                    for b in 0..BLOCKS {
                        match v1.read_at(&mut buf, b * BS as u64) {
                            Ok(()) if buf == content(b, latest[b as usize]) => {}
                            Ok(()) => {
                                problems.push(format!("member 1 alone: block {b} WRONG DATA (v{})", buf[0]))
                            }
                            Err(e) => problems.push(format!("member 1 alone: block {b}: {e}")),
                        }
                    }
                }
            }
            let kname = ["zeros", "misdirected", "stale"][kind];
            if report(
                &format!(
                    "source read #{n} during resync returns {kname} (resync {:?})",
                    r.as_ref().map(|r| r.groups)
                ),
                &problems,
            ) > 0
            {
                bad_cases += 1;
            }
        }
    }
    assert_eq!(bad_cases, 0);
}

/// A crashed set (members stopped at different points) scrubbed/checked read-only before any
/// read-write open: "never cry wolf after a crash" -- no copy may be called bad when it is a
/// version the crash may leave.
#[test]
fn read_only_scrub_of_a_crashed_set() {
    let c = crashed_set();
    let m: Vec<Arc<dyn Backend>> = c
        .images
        .iter()
        .map(|i| Arc::new(FaultBackend::from_image(i.clone())) as Arc<dyn Backend>)
        .collect();
    let ro = OpenOptions {
        read_only: true,
        ..oopts()
    };
    let v = Volume::open_members(m, &ro).unwrap();
    let r = v.verify_copies(0, BLOCKS, false).unwrap();
    println!(
        "verify_copies on the crashed set (read-only): bad {:?}, unrepairable {:?}",
        &r.bad[..r.bad.len().min(8)],
        r.unrepairable
    );
    let probs = v.check_blocks(0, BLOCKS).unwrap();
    println!("check_blocks: {} problems", probs.len());
    assert!(r.bad.is_empty() && r.unrepairable.is_empty() && probs.is_empty());
}

/// Member 1 fails (write errors) in the middle of a session; member 0's disk silently loses
/// the superblock writes that record the failure (a lost/misdirected write of one sector
/// region). Member 1 comes back for the next open: nothing says it is behind.
#[test]
fn lost_superblock_write_recording_a_failure() {
    const NB: u64 = 16 * 40; // > 2 MiB: member 1 serves the odd 1 MiB stripes
    let fo = {
        let mut o = FormatOptions::with_size(NB * BS as u64);
        o.group_blocks = Some(GROUP);
        o
    };
    let len = fo.backing_len().unwrap();
    let m: Vec<Arc<FaultBackend>> = (0..2)
        .map(|_| Arc::new(FaultBackend::new(len).unwrap()))
        .collect();
    Volume::format_members(m.iter().map(|b| b.clone() as Arc<dyn Backend>).collect(), &fo)
        .unwrap()
        .close()
        .unwrap();
    let v = Volume::open_members(
        m.iter().map(|b| b.clone() as Arc<dyn Backend>).collect(),
        &oopts(),
    )
    .unwrap();
    for b in 0..NB {
        v.write_at(&content(b, 1), b * BS as u64).unwrap();
    }
    v.close().unwrap();
    let backup = {
        let v = Volume::format(Arc::new(FaultBackend::new(len).unwrap()), &fo).unwrap();
        v.geometry().backup_sb_offset
    };
    let f1 = Arc::new(FailFrom {
        inner: m[1].clone(),
        k: 10,
        n: AtomicUsize::new(0),
    });
    let v = Volume::open_members(
        vec![m[0].clone() as Arc<dyn Backend>, f1 as Arc<dyn Backend>],
        &oopts(),
    )
    .unwrap();
    // From now on member 0 loses writes to its superblock regions.
    m[0].misdirect_writes_with(move |o, _l| (o < 4096 || o >= backup).then_some(u64::MAX / 2));
    for b in 0..NB {
        v.write_at(&content(b, 2), b * BS as u64).unwrap();
        if b % 16 == 0 {
            v.flush().unwrap();
        }
    }
    v.flush().unwrap();
    println!("members after the session: {:?}", v.members());
    v.close().unwrap();
    m[0].clear_faults();
    let v = Volume::open_members(
        m.iter().map(|b| b.clone() as Arc<dyn Backend>).collect(),
        &oopts(),
    )
    .unwrap();
    println!("members at reopen: {:?}", v.members());
    let mut old = 0;
    let mut buf = vec![0u8; BS];
    for b in 0..NB {
        match v.read_at(&mut buf, b * BS as u64) {
            Ok(()) if buf == content(b, 2) => {}
            Ok(()) => old += 1,
            Err(_) => {}
        }
    }
    println!(
        "blocks returning the old version after reopen: {old} of {NB}; stats {:?}",
        v.stats()
    );
    assert_eq!(old, 0);
}
