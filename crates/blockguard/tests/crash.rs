//! Crash simulation (G1, G2): run a workload on the fault-injecting backend, then at every
//! point of its I/O history build the disk states a power loss could leave — every subset and
//! order of the unflushed writes where that is feasible, seeded random samples (also torn at
//! 512-byte granularity) above that, and every 512-byte tear mask of each metadata write in
//! flight — reopen the volume on each, and check every block:
//!
//! - G1: a block whose on-disk data is a complete version (not torn) verifies;
//! - every block that verifies holds one of the versions written to it since the last
//!   completed flush before the crash, or the version that flush made durable;
//! - G2: nothing older than the last completed flush ever comes back.
//!
//! A third of the images go through a read-write session (recovery at open, a write, close)
//! before the check, a third through `recover`. **Double crashes**: crash images of a first
//! run seed a second run — open read-write (recovery), aligned writes and flushes, close — which
//! is itself crashed at every point of its history (during recovery and after it) and checked
//! the same way against what the first crash left plus its own writes.
//!
//! Volumes of many small groups read through a one-group metadata cache, so groups are evicted
//! and reloaded throughout. `none` mode must violate G1 under the same simulator: proof that the
//! simulator catches it. A failing case prints its seed; replay with `BLOCKGUARD_SEED=<seed>`;
//! `BLOCKGUARD_SEED=random` runs one fresh seed (printed) per test.

use blockguard::blockguard_backend::{Backend, CrashState, FaultBackend, MemoryBackend};
use blockguard::format::VolumeState;
use blockguard::tag::TagKey;
use blockguard::{FormatOptions, Geometry, Mode, OpenOptions, Profile, Volume};
use rand::seq::SliceRandom;
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;
use std::collections::{HashMap, HashSet};
use std::sync::Arc;

/// A content fingerprint: CRC-64/NVME, folded with carry-less multiplication (the simulator
/// hashes hundreds of gigabytes; a cryptographic hash would dominate its run time, and the
/// odds of two versions of one block colliding are 2^-64).
fn h(data: &[u8]) -> u64 {
    crc_fast::checksum(crc_fast::CrcAlgorithm::Crc64Nvme, data)
}

/// The shape of a simulated volume and workload.
#[derive(Clone, Copy, Debug)]
struct Config {
    block_size: u32,
    blocks: u64,
    /// Data blocks per group (`None`: as many as a metadata block holds).
    group_blocks: Option<u32>,
    mode: Mode,
    ops: usize,
    /// Commit on the background thread (the I/O order then depends on scheduling).
    background: bool,
    /// The volume's tag profile (keyed ones get a fixed key).
    profile: Profile,
}

/// The key the simulated volumes of a keyed profile use.
fn key_for(profile: Profile) -> Option<TagKey> {
    profile
        .is_keyed()
        .then(|| TagKey::from_bytes(&[0x6B; 32]).unwrap())
}

/// One engine operation of the workload, with the backend's event count when it started and
/// when it returned.
struct Step {
    start: usize,
    end: usize,
    flush: bool,
    /// Content hash of every block after the step, for the blocks the step touched.
    touched: Vec<(u64, u64)>,
}

struct Run {
    backend: Arc<FaultBackend>,
    /// `rebuild` mode: a crash image must be opened read-write (its tags are rebuilt) before it
    /// can be read, and a torn block reads back as torn (the mode's stated allowance).
    mode: Mode,
    profile: Profile,
    geo: Geometry,
    block_size: usize,
    blocks: u64,
    /// Block contents on disk when the run began.
    initial: Vec<u64>,
    steps: Vec<Step>,
}

fn open_options(rng: &mut ChaCha8Rng, cfg: &Config) -> OpenOptions {
    OpenOptions {
        // A few blocks per batch: commits happen in the middle of the workload too.
        stage_bytes: cfg.block_size as usize * rng.random_range(1..6),
        // One group: every switch between groups evicts and reloads metadata.
        cache_bytes: 0,
        // Deterministic I/O order, so a printed seed replays exactly.
        background_commit: cfg.background,
        // Dirty bits cleared at every flush: deterministic, and the clearing is exercised.
        dirty_clear_interval: std::time::Duration::ZERO,
        key: key_for(cfg.profile),
        ..OpenOptions::default()
    }
}

/// A first run: format, then a random workload of aligned and unaligned writes, zeroing and
/// flushes.
fn workload(seed: u64, cfg: Config) -> Run {
    let mut rng = ChaCha8Rng::seed_from_u64(seed);
    let mut opts = FormatOptions::with_size(cfg.block_size as u64 * cfg.blocks);
    opts.block_size = cfg.block_size;
    opts.mode = cfg.mode;
    opts.group_blocks = cfg.group_blocks;
    opts.uuid = Some([0x5a; 16]);
    opts.profile = cfg.profile;
    opts.key = key_for(cfg.profile);
    let len = opts.backing_len().unwrap();
    let backend = Arc::new(FaultBackend::new(len).unwrap());
    drop(Volume::format(backend.clone(), &opts).unwrap());
    backend.flush().unwrap();
    backend.forget_history();
    let vol = Volume::open(backend.clone(), &open_options(&mut rng, &cfg)).unwrap();
    let geo = *vol.geometry();
    let initial = vec![h(&vec![0u8; cfg.block_size as usize]); cfg.blocks as usize];
    let model = vec![0u8; (cfg.block_size as u64 * cfg.blocks) as usize];
    drive(&mut rng, &backend, vol, geo, initial, model, cfg, true)
}

/// A second run on the disk a first run's crash left: a read-write open (which recovers the
/// volume), aligned writes, zeroing and flushes (no read-modify-write: a torn block may fail),
/// then close.
fn second_run(seed: u64, image: Vec<u8>, cfg: Config) -> Run {
    let mut rng = ChaCha8Rng::seed_from_u64(seed ^ 0x5EC0_D5E5);
    let backend = Arc::new(FaultBackend::from_image(image.clone()));
    let opts = open_options(&mut rng, &cfg);
    let vol = Volume::open(backend.clone(), &opts).expect("the crash image opens read-write");
    let geo = *vol.geometry();
    let bs = cfg.block_size as usize;
    let mut model = vec![0u8; bs * cfg.blocks as usize];
    let mut initial = Vec::new();
    for b in 0..cfg.blocks {
        let at = geo.data_offset(b) as usize;
        model[b as usize * bs..(b as usize + 1) * bs].copy_from_slice(&image[at..at + bs]);
        initial.push(h(&image[at..at + bs]));
    }
    drive(&mut rng, &backend, vol, geo, initial, model, cfg, false)
}

/// Runs `cfg.ops` random operations on `vol`, recording what each did to the model.
#[allow(clippy::too_many_arguments)]
fn drive(
    rng: &mut ChaCha8Rng,
    backend: &Arc<FaultBackend>,
    vol: Volume,
    geo: Geometry,
    initial: Vec<u64>,
    mut model: Vec<u8>,
    cfg: Config,
    unaligned: bool,
) -> Run {
    let bs = cfg.block_size as u64;
    let blocks = cfg.blocks;
    let size = bs * blocks;
    let mut steps = Vec::new();
    let events = |b: &FaultBackend| b.events().len();
    // Recovery at open already wrote: its history belongs to the run (crashing during it is
    // the point of a second run).
    let mut last = 0;
    for _ in 0..cfg.ops {
        let start = events(backend).max(last);
        let r: f64 = rng.random();
        let (flush, range) = if r < 0.15 {
            vol.flush().unwrap();
            (true, None)
        } else if r < 0.25 {
            let (off, len) = if unaligned {
                let off = rng.random_range(0..size);
                (off, rng.random_range(1..=(size - off).min(3 * bs)))
            } else {
                let b = rng.random_range(0..blocks);
                (b * bs, rng.random_range(1..=(blocks - b).min(3)) * bs)
            };
            vol.write_zeroes(off, len).unwrap();
            model[off as usize..(off + len) as usize].fill(0);
            (false, Some((off, len)))
        } else {
            let (off, len) = if !unaligned || rng.random_bool(0.6) {
                let b = rng.random_range(0..blocks);
                let n = rng.random_range(1..=(blocks - b).min(4));
                (b * bs, n * bs)
            } else {
                let off = rng.random_range(0..size);
                (off, rng.random_range(1..=(size - off).min(2 * bs)))
            };
            let data: Vec<u8> = (0..len).map(|_| rng.random()).collect();
            if rng.random_bool(0.5) {
                vol.write_owned(data.clone(), off).unwrap();
            } else {
                vol.write_at(&data, off).unwrap();
            }
            model[off as usize..(off + len) as usize].copy_from_slice(&data);
            (false, Some((off, len)))
        };
        let touched = match range {
            None => Vec::new(),
            Some((off, len)) => (off / bs..(off + len).div_ceil(bs))
                .map(|b| (b, h(&model[(b * bs) as usize..((b + 1) * bs) as usize])))
                .collect(),
        };
        last = events(backend);
        steps.push(Step {
            start,
            end: last,
            flush,
            touched,
        });
    }
    vol.flush().unwrap();
    steps.push(Step {
        start: last,
        end: events(backend),
        flush: true,
        touched: Vec::new(),
    });
    drop(vol);
    Run {
        backend: backend.clone(),
        mode: cfg.mode,
        profile: cfg.profile,
        geo,
        block_size: bs as usize,
        blocks,
        initial,
        steps,
    }
}

impl Run {
    /// For a crash after `n` backend events: per block, the content hashes that may be found
    /// (the version the last completed flush made durable, and every version written after
    /// it by an operation that had started).
    fn allowed(&self, n: usize) -> Vec<HashSet<u64>> {
        let mut durable = self.initial.clone();
        let mut last_flush_idx = None;
        for (i, s) in self.steps.iter().enumerate() {
            if s.flush && s.end <= n {
                last_flush_idx = Some(i);
            }
        }
        let cut = last_flush_idx.map_or(0, |i| i + 1);
        for s in &self.steps[..cut] {
            for &(b, v) in &s.touched {
                durable[b as usize] = v;
            }
        }
        let mut allowed: Vec<HashSet<u64>> = durable.iter().map(|d| HashSet::from([*d])).collect();
        for s in &self.steps[cut..] {
            if s.start > n {
                break;
            }
            for &(b, v) in &s.touched {
                allowed[b as usize].insert(v);
            }
        }
        allowed
    }

    /// Every version of every block this run (or `base`, an earlier run) wrote.
    fn versions(&self, base: Option<&[HashSet<u64>]>) -> Vec<HashSet<u64>> {
        let mut all: Vec<HashSet<u64>> = match base {
            Some(b) => b.to_vec(),
            None => self.initial.iter().map(|&v| HashSet::from([v])).collect(),
        };
        for s in &self.steps {
            for &(b, v) in &s.touched {
                all[b as usize].insert(v);
            }
        }
        all
    }

    /// `rebuild` mode's stated allowance: a block torn by the crash (its data on disk is no
    /// version ever written) reads back as the torn data, undetected. Nothing else.
    fn torn_allowance(
        &self,
        backend: &MemoryBackend,
        b: u64,
        got: u64,
        all_versions: &[HashSet<u64>],
    ) -> bool {
        if self.mode != Mode::Rebuild {
            return false;
        }
        let mut raw = vec![0u8; self.block_size];
        backend.read_at(&mut raw, self.geo.data_offset(b)).unwrap();
        let on_disk = h(&raw);
        on_disk == got && !all_versions[b as usize].contains(&on_disk)
    }

    /// True if `offset` lies in a group's metadata (either slot).
    fn is_metadata(&self, offset: u64) -> bool {
        let g = &self.geo;
        if offset < g.first_group_offset || offset >= g.backup_sb_offset {
            return false;
        }
        (offset - g.first_group_offset) % g.group_len() < 2 * g.block_size as u64
    }

    /// Reopens `image` and checks every block. Returns violations as text.
    fn check_image(
        &self,
        image: Vec<u8>,
        allowed: &[HashSet<u64>],
        all_versions: &[HashSet<u64>],
        session: Session,
    ) -> Vec<String> {
        let mut bad = Vec::new();
        let backend = Arc::new(MemoryBackend::from_vec(image));
        // The block a read-write session overwrites, and with what.
        let mut marker_hash: Option<u64> = None;
        let tiny = OpenOptions {
            cache_bytes: 0,
            key: key_for(self.profile),
            ..OpenOptions::default()
        };
        match session {
            Session::None => {}
            Session::Recover => match Volume::open(backend.clone(), &tiny) {
                Ok(v) => {
                    if let Err(e) = v.recover(Default::default(), |_, _| {}).and_then(|_| v.close()) {
                        return vec![format!("recovery failed: {e}")];
                    }
                }
                Err(e) => return vec![format!("volume does not open read-write (recovering): {e}")],
            },
            Session::Cycle => {
                // Recovery at open, then a write: it must not settle anything wrongly.
                let marker = vec![0xA5u8; self.block_size];
                match Volume::open(backend.clone(), &tiny) {
                    Ok(v) => {
                        if let Err(e) = v.write_at(&marker, 0).and_then(|_| v.close()) {
                            return vec![format!("second session failed: {e}")];
                        }
                    }
                    Err(e) => return vec![format!("volume does not open read-write: {e}")],
                }
                marker_hash = Some(h(&marker));
            }
        }
        let vol = match Volume::open(
            backend.clone(),
            &OpenOptions {
                read_only: true,
                ..tiny
            },
        ) {
            Ok(v) => v,
            Err(e) => return vec![format!("volume does not open: {e}")],
        };
        if session != Session::None && vol.superblock().state != VolumeState::Clean {
            bad.push(format!("not marked clean after {session:?}"));
        }
        let bs = self.block_size;
        let mut buf = vec![0u8; bs];
        let mut raw = vec![0u8; bs];
        for b in 0..self.blocks {
            let rewritten = if b == 0 { marker_hash } else { None };
            match vol.read_at(&mut buf, b * bs as u64) {
                Ok(()) => {
                    let got = h(&buf);
                    let ok = match rewritten {
                        Some(m) => got == m,
                        None => {
                            allowed[b as usize].contains(&got)
                                || self.torn_allowance(&backend, b, got, all_versions)
                        }
                    };
                    if !ok {
                        bad.push(format!(
                            "block {b}: returned a version that is not allowed (G2/stale)"
                        ));
                    }
                }
                Err(e) => {
                    // Not torn: the on-disk data is exactly some version ever written to it.
                    backend.read_at(&mut raw, self.geo.data_offset(b)).unwrap();
                    let got = h(&raw);
                    let intact = all_versions[b as usize].contains(&got) || rewritten == Some(got);
                    if intact {
                        bad.push(format!("block {b}: intact data fails verification (G1): {e}"));
                    }
                }
            }
        }
        bad
    }
}

/// What happens to a crash image between the crash and the check.
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
enum Session {
    /// Nothing: checked as found, read-only (lenient after a crash).
    None,
    /// A read-write session (recovering at open) rewrites block 0 and closes.
    Cycle,
    /// `Volume::recover`, then close.
    Recover,
}

#[derive(Default)]
struct Totals {
    states: usize,
    violations: Vec<String>,
}

/// How hard to look at each history point.
#[derive(Clone, Copy)]
struct Search {
    /// Enumerate every crash image when there are at most this many.
    exhaustive: usize,
    /// Random images per point (torn ones when `torn`).
    samples: usize,
    torn: bool,
    /// Every 512-byte tear mask (up to 256 per write) of each metadata write in flight.
    tear_masks: bool,
    /// Second runs seeded per first run (double crashes).
    second_runs: usize,
}

/// Builds, for every metadata write in flight in `state`, the images where it is torn by each
/// mask (all 2^n for a write of n ≤ 8 sectors, 256 sampled above), the other unflushed writes
/// kept in a seeded random subset, in issue order.
fn tear_images(run: &Run, state: &CrashState, rng: &mut ChaCha8Rng, mut f: impl FnMut(Vec<u8>)) {
    let pending = state.unflushed();
    for (i, w) in pending.iter().enumerate() {
        if !run.is_metadata(w.offset) {
            continue;
        }
        let n = w.sector_count();
        let masks: Vec<u64> = if n <= 8 {
            (0..1u64 << n).collect()
        } else {
            (0..256).map(|_| rng.random::<u64>()).collect()
        };
        let others: HashSet<usize> = (0..pending.len())
            .filter(|&j| j != i && rng.random_bool(0.5))
            .collect();
        for m in masks {
            let keep: Vec<(usize, Vec<bool>)> = (0..pending.len())
                .filter_map(|j| {
                    if j == i {
                        let bits = (0..n).map(|s| (m >> (s % 64)) & 1 == 1).collect();
                        Some((j, bits))
                    } else if others.contains(&j) {
                        Some((j, vec![true; pending[j].sector_count()]))
                    } else {
                        None
                    }
                })
                .collect();
            f(state.crash_image_torn(&keep));
        }
    }
}

/// Visits every history point of `run` with `search`; `base` are the versions of an earlier
/// run whose crash this run started from.
fn simulate(
    run: &Run,
    seed: u64,
    search: Search,
    base: Option<&[HashSet<u64>]>,
    stop_at_first: bool,
) -> Totals {
    let mut rng = ChaCha8Rng::seed_from_u64(seed ^ 0xC0FFEE);
    let all_versions = run.versions(base);
    let mut totals = Totals::default();
    let mut cache: HashMap<usize, Vec<HashSet<u64>>> = HashMap::new();
    run.backend.for_each_history_point(|n, state| {
        if stop_at_first && !totals.violations.is_empty() {
            return;
        }
        let allowed = cache.entry(n).or_insert_with(|| run.allowed(n)).clone();
        let mut check = |image: Vec<u8>, how: &str| {
            totals.states += 1;
            let session = match totals.states % 3 {
                0 => Session::Cycle,
                1 => Session::Recover,
                // A `rebuild` volume left in use refuses read-only opens until rebuilt.
                _ if run.mode == Mode::Rebuild => Session::Cycle,
                _ => Session::None,
            };
            for v in run.check_image(image, &allowed, &all_versions, session) {
                totals.violations.push(format!(
                    "seed {seed}, crash after event {n} ({how}, then {session:?}): {v}"
                ));
            }
        };
        let exhausted = !search.torn
            && state
                .for_each_crash_image(search.exhaustive, |img| check(img, "exhaustive"))
                .is_ok();
        if !exhausted {
            for _ in 0..search.samples {
                check(
                    state.random_crash_image(&mut rng, search.torn),
                    if search.torn { "sampled, torn" } else { "sampled" },
                );
            }
        }
        if search.tear_masks {
            tear_images(run, state, &mut rng, |img| check(img, "metadata write torn"));
        }
    });
    totals
}

/// A first run simulated, plus `search.second_runs` second runs from its crash images, each
/// simulated too (double crashes).
fn simulate_twice(seed: u64, cfg: Config, search: Search, second: Config) -> Totals {
    let run = workload(seed, cfg);
    let mut totals = simulate(&run, seed, search, None, true);
    if !totals.violations.is_empty() || search.second_runs == 0 {
        return totals;
    }
    let versions = run.versions(None);
    // Crash images to start second runs from: random history points, torn or whole, biased to
    // points with unflushed writes (where recovery has something to settle).
    let mut rng = ChaCha8Rng::seed_from_u64(seed ^ 0xD0B1E);
    let mut points: Vec<(usize, CrashState)> = Vec::new();
    run.backend.for_each_history_point(|n, state| {
        if !state.unflushed().is_empty() {
            points.push((n, state.clone()));
        }
    });
    points.shuffle(&mut rng);
    for (k, (n, state)) in points.into_iter().take(search.second_runs).enumerate() {
        let torn = rng.random_bool(0.5);
        let image = state.random_crash_image(&mut rng, torn);
        let second_seed = seed.wrapping_mul(1000).wrapping_add(k as u64);
        let again = second_run(second_seed, image, second);
        let t = simulate(
            &again,
            second_seed,
            Search {
                second_runs: 0,
                ..search
            },
            Some(&versions),
            true,
        );
        totals.states += t.states;
        totals.violations.extend(
            t.violations
                .into_iter()
                .map(|v| format!("second crash after a first crash at event {n} of seed {seed}: {v}")),
        );
        if !totals.violations.is_empty() {
            break;
        }
    }
    totals
}

fn seeds(default: std::ops::Range<u64>) -> Vec<u64> {
    match std::env::var("BLOCKGUARD_SEED") {
        Ok(s) if s == "random" => {
            let seed = rand::random::<u64>() >> 1;
            println!("BLOCKGUARD_SEED=random: seed {seed}");
            vec![seed]
        }
        Ok(s) => vec![s.parse().expect("BLOCKGUARD_SEED must be a number or \"random\"")],
        Err(_) => default.collect(),
    }
}

fn assert_clean(label: &str, seeds: &[u64], f: impl Fn(u64) -> Totals) -> usize {
    let mut states = 0;
    for &seed in seeds {
        let t = f(seed);
        states += t.states;
        if !t.violations.is_empty() {
            panic!(
                "{label}: {} violations (replay with BLOCKGUARD_SEED={seed}); first ones:\n{}",
                t.violations.len(),
                t.violations
                    .iter()
                    .take(10)
                    .cloned()
                    .collect::<Vec<_>>()
                    .join("\n")
            );
        }
    }
    println!(
        "{label}: {states} crash states over {} seeds, no violation",
        seeds.len()
    );
    assert!(states > 0);
    states
}

const SMALL: Config = Config {
    block_size: 512,
    blocks: 150,
    group_blocks: Some(12),
    mode: Mode::Dual,
    ops: 40,
    background: false,
    profile: Profile::Crc32c,
};

const SECOND_SMALL: Config = Config { ops: 10, ..SMALL };

const BIG: Config = Config {
    block_size: 4096,
    blocks: 600,
    group_blocks: None,
    mode: Mode::Dual,
    ops: 30,
    background: false,
    profile: Profile::Crc32c,
};

/// 4 KiB blocks in groups of 70: sectors 0 and 1 hold tags, six groups.
const BIG_SMALL_GROUPS: Config = Config {
    blocks: 420,
    group_blocks: Some(70),
    ..BIG
};

#[test]
fn dual_mode_survives_every_crash_small_blocks() {
    // 512-byte blocks, 13 groups of 12 blocks, a one-group cache: metadata sectors are single
    // sectors and groups are evicted constantly.
    let search = Search {
        exhaustive: 256,
        samples: 6,
        torn: false,
        tear_masks: true,
        second_runs: 3,
    };
    assert_clean("dual/512", &seeds(0..30), |seed| {
        simulate_twice(seed, SMALL, search, SECOND_SMALL)
    });
}

#[test]
fn dual_mode_survives_torn_writes_small_blocks() {
    let search = Search {
        exhaustive: 0,
        samples: 8,
        torn: true,
        tear_masks: true,
        second_runs: 3,
    };
    assert_clean("dual/512/torn", &seeds(100..130), |seed| {
        simulate_twice(seed, SMALL, search, SECOND_SMALL)
    });
}

#[test]
fn dual_mode_survives_every_tear_of_4k_metadata() {
    // 4096-byte blocks: a metadata block spans 8 sectors, each torn independently; every one of
    // the 256 masks of every metadata write in flight is tried, after a first crash too.
    let search = Search {
        exhaustive: 0,
        samples: 2,
        torn: true,
        tear_masks: true,
        second_runs: 2,
    };
    assert_clean("dual/4096/tear-masks", &seeds(200..203), |seed| {
        simulate_twice(seed, BIG, search, Config { ops: 6, ..BIG })
    });
    assert_clean("dual/4096/small-groups/tear-masks", &seeds(210..213), |seed| {
        simulate_twice(
            seed,
            BIG_SMALL_GROUPS,
            search,
            Config {
                ops: 6,
                ..BIG_SMALL_GROUPS
            },
        )
    });
}

#[test]
fn dual_mode_survives_every_crash_4k_blocks() {
    let search = Search {
        exhaustive: 64,
        samples: 3,
        torn: false,
        tear_masks: false,
        second_runs: 2,
    };
    assert_clean("dual/4096", &seeds(300..308), |seed| {
        simulate_twice(
            seed,
            BIG_SMALL_GROUPS,
            search,
            Config {
                ops: 8,
                ..BIG_SMALL_GROUPS
            },
        )
    });
}

/// Every tag profile under the crash simulator (G1, G2 at every crash point of a short
/// workload, torn writes included): the protocol does not depend on the profile, but the tag
/// sizes change the metadata layout (16- and 32-byte tags: 31 and 15 to a sector) and keyed
/// profiles go through recovery with their key.
#[test]
fn dual_mode_survives_crashes_with_every_profile() {
    for (i, profile) in (0u64..).zip(Profile::ALL) {
        let search = Search {
            exhaustive: 48,
            samples: 4,
            torn: i % 2 == 1,
            tear_masks: true,
            second_runs: 1,
        };
        // 512-byte blocks in groups of 12: with 32-byte tags the group still fits one sector.
        let cfg = Config {
            profile,
            ops: 20,
            ..SMALL
        };
        let label = format!("dual/512/{profile}");
        assert_clean(&label, &seeds(500 + 10 * i..503 + 10 * i), |seed| {
            simulate_twice(seed, cfg, search, Config { ops: 6, ..cfg })
        });
    }
}

#[test]
fn dual_mode_survives_crashes_with_background_commits() {
    // The committer thread makes the I/O order depend on scheduling: a seed replays the
    // workload, not necessarily the same history. The invariants must hold for every order.
    assert_clean("dual/512/background", &seeds(400..412), |seed| {
        let search = Search {
            exhaustive: 128,
            samples: 6,
            torn: seed % 2 == 0,
            tear_masks: true,
            second_runs: 1,
        };
        let cfg = Config {
            background: true,
            ..SMALL
        };
        simulate_twice(seed, cfg, search, Config { ops: 10, ..cfg })
    });
}

#[test]
fn rebuild_mode_survives_every_crash_small_blocks() {
    let cfg = Config {
        mode: Mode::Rebuild,
        ..SMALL
    };
    let search = Search {
        exhaustive: 256,
        samples: 6,
        torn: false,
        tear_masks: true,
        second_runs: 3,
    };
    assert_clean("rebuild/512", &seeds(500..506), |seed| {
        simulate_twice(seed, cfg, search, Config { ops: 10, ..cfg })
    });
}

#[test]
fn rebuild_mode_survives_torn_writes_4k_blocks() {
    // 4 KiB blocks torn at 512 bytes: a torn data block reads back torn (the mode's allowance,
    // checked to be exactly that), every other block as G1 and G2 say.
    let cfg = Config {
        mode: Mode::Rebuild,
        ops: 10,
        ..BIG_SMALL_GROUPS
    };
    let search = Search {
        exhaustive: 0,
        samples: 6,
        torn: true,
        tear_masks: true,
        second_runs: 2,
    };
    assert_clean("rebuild/4096/torn", &seeds(530..533), |seed| {
        simulate_twice(seed, cfg, search, Config { ops: 6, ..cfg })
    });
}

#[test]
fn none_mode_violates_g1_and_the_simulator_sees_it() {
    let mut found = 0;
    let cfg = Config {
        mode: Mode::None,
        ..SMALL
    };
    let search = Search {
        exhaustive: 64,
        samples: 6,
        torn: false,
        tear_masks: false,
        second_runs: 0,
    };
    for seed in seeds(0..6) {
        let run = workload(seed, cfg);
        let t = simulate(&run, seed, search, None, true);
        if t.violations.iter().any(|v| v.contains("(G1)")) {
            found += 1;
        }
    }
    assert!(
        found > 0,
        "none mode never lost a tag/data race: the simulator is blind"
    );
    println!("none mode: G1 violated under {found} of the seeds, as expected");
}
