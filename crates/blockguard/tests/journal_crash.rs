//! Crash simulation of `journal` mode in the torn-write model: a random workload of write
//! requests (aligned and not, up to the journal's atomic size), zeroing and flushes runs on
//! the fault-injecting backend; at every point of its I/O history, disk states a power loss
//! could leave — subsets and orders of the unflushed writes, and seeded samples with every
//! unflushed write torn at 512-byte granularity — are reopened (the journal is replayed) and
//! the whole volume is read. The check is stronger than G1/G2: the volume must hold exactly
//! the state after some prefix of the requests, no shorter than what the last completed
//! flush made durable — so every request is entirely old or entirely new, and no block is
//! ever reported corrupt.
//!
//! Replay idempotence: sampled crash images are replayed on the fault-injecting backend, and
//! that replay is itself crashed at every point of its history (torn too) and replayed again,
//! with the same check.
//!
//! A failing case prints its seed; replay with `BLOCKGUARD_SEED=<seed>`.

use blockguard::blockguard_backend::{Backend, FaultBackend, MemoryBackend};
use blockguard::{FormatOptions, Mode, OpenOptions, Volume};
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;
use std::sync::Arc;

const BS: u64 = 4096;

fn h(data: &[u8]) -> u64 {
    crc_fast::checksum(crc_fast::CrcAlgorithm::Crc64Nvme, data)
}

#[derive(Clone, Copy, Debug)]
struct Config {
    blocks: u64,
    group_blocks: u32,
    journal: u64,
    ops: usize,
}

struct Request {
    start: usize,
    end: usize,
    flush: bool,
}

struct Run {
    backend: Arc<FaultBackend>,
    /// `states[i]`: the hash of every block after the first `i` requests.
    states: Vec<Vec<u64>>,
    requests: Vec<Request>,
    blocks: u64,
}

fn format_opts(cfg: Config) -> FormatOptions {
    let mut o = FormatOptions::with_size(BS * cfg.blocks);
    o.mode = Mode::Journal;
    o.group_blocks = Some(cfg.group_blocks);
    o.journal_size = Some(cfg.journal);
    o.uuid = Some([0x4a; 16]);
    o
}

fn open_opts(rng: &mut ChaCha8Rng) -> OpenOptions {
    OpenOptions {
        stage_bytes: BS as usize * rng.random_range(1..8),
        cache_bytes: 0,
        background_commit: false,
        dirty_clear_interval: std::time::Duration::ZERO,
        ..OpenOptions::default()
    }
}

fn hashes(model: &[u8]) -> Vec<u64> {
    model.chunks(BS as usize).map(h).collect()
}

/// Runs a random workload on a freshly formatted journal volume.
fn workload(seed: u64, cfg: Config) -> Run {
    let mut rng = ChaCha8Rng::seed_from_u64(seed);
    let opts = format_opts(cfg);
    let len = opts.backing_len().unwrap();
    let backend = Arc::new(FaultBackend::new(len).unwrap());
    drop(Volume::format(backend.clone(), &opts).unwrap());
    backend.flush().unwrap();
    backend.forget_history();
    let vol = Volume::open(backend.clone(), &open_opts(&mut rng)).unwrap();
    let max_blocks = vol.journal().unwrap().limits.max_atomic / BS;
    assert!(
        max_blocks >= 2,
        "the test journal allows multi-block atomic writes"
    );
    let size = BS * cfg.blocks;
    let mut model = vec![0u8; size as usize];
    let mut states = vec![hashes(&model)];
    let mut requests = Vec::new();
    let events = |b: &FaultBackend| b.events().len();
    for _ in 0..cfg.ops {
        let start = events(&backend);
        let r: f64 = rng.random();
        let flush = r < 0.15;
        if flush {
            vol.flush().unwrap();
        } else if r < 0.25 {
            let b = rng.random_range(0..cfg.blocks);
            let n = rng.random_range(1..=(cfg.blocks - b).min(3));
            vol.write_zeroes(b * BS, n * BS).unwrap();
            model[(b * BS) as usize..((b + n) * BS) as usize].fill(0);
        } else {
            let (off, len) = if rng.random_bool(0.7) {
                let b = rng.random_range(0..cfg.blocks);
                let n = rng.random_range(1..=(cfg.blocks - b).min(max_blocks));
                (b * BS, n * BS)
            } else {
                // Unaligned: read-modify-write of the edge blocks, staged with the rest.
                let off = rng.random_range(0..size - 1);
                let most = (max_blocks - 1) * BS;
                (off, rng.random_range(1..=(size - off).min(most)))
            };
            let data: Vec<u8> = (0..len).map(|_| rng.random()).collect();
            vol.write_at(&data, off).unwrap();
            model[off as usize..(off + len) as usize].copy_from_slice(&data);
        }
        requests.push(Request {
            start,
            end: events(&backend),
            flush,
        });
        states.push(hashes(&model));
    }
    vol.flush().unwrap();
    requests.push(Request {
        start: requests.last().map_or(0, |r| r.end),
        end: events(&backend),
        flush: true,
    });
    states.push(hashes(&model));
    drop(vol);
    Run {
        backend,
        states,
        requests,
        blocks: cfg.blocks,
    }
}

impl Run {
    /// For a crash after `n` events: the range of request prefixes the volume may show.
    fn allowed(&self, n: usize) -> (usize, usize) {
        let durable = self
            .requests
            .iter()
            .enumerate()
            .filter(|(_, r)| r.flush && r.end <= n)
            .map(|(i, _)| i + 1)
            .max()
            .unwrap_or(0);
        let started = self.requests.iter().filter(|r| r.start < n).count();
        (durable, started.max(durable))
    }

    /// Opens `image` (replaying the journal) and checks it shows one allowed prefix.
    fn check(&self, image: Vec<u8>, (lo, hi): (usize, usize)) -> Result<(), String> {
        let mem = Arc::new(MemoryBackend::from_vec(image));
        let vol = Volume::open(mem, &OpenOptions::default()).map_err(|e| format!("open failed: {e}"))?;
        let got = self.read_all(&vol)?;
        vol.close().map_err(|e| format!("close failed: {e}"))?;
        if (lo..=hi).any(|k| self.states[k] == got) {
            return Ok(());
        }
        let nearest = (lo..=hi)
            .map(|k| (k, got.iter().zip(&self.states[k]).filter(|(a, b)| a != b).count()))
            .min_by_key(|x| x.1);
        Err(format!(
            "the volume is no prefix of requests {lo}..={hi} (nearest: {nearest:?} blocks differ)"
        ))
    }

    fn read_all(&self, vol: &Volume) -> Result<Vec<u64>, String> {
        let mut out = Vec::new();
        let mut buf = vec![0u8; BS as usize];
        for b in 0..self.blocks {
            vol.read_at(&mut buf, b * BS)
                .map_err(|e| format!("block {b} reported after the crash: {e}"))?;
            out.push(h(&buf));
        }
        Ok(out)
    }
}

fn seeds(default: std::ops::Range<u64>) -> Vec<u64> {
    match std::env::var("BLOCKGUARD_SEED") {
        Ok(s) if s == "random" => {
            let seed = rand::random::<u64>();
            println!("BLOCKGUARD_SEED={seed}");
            vec![seed]
        }
        Ok(s) => vec![s.parse().expect("BLOCKGUARD_SEED is a number")],
        Err(_) => default.collect(),
    }
}

const SMALL: Config = Config {
    blocks: 40,
    group_blocks: 8,
    // 120 KiB of log: segments of up to 30 KiB, so the workload wraps the log many times.
    journal: 128 * 1024,
    ops: 60,
};

#[test]
fn every_request_is_atomic_after_any_crash_torn_writes_included() {
    let mut states = 0;
    for seed in seeds(0..6) {
        let run = workload(seed, SMALL);
        let mut rng = ChaCha8Rng::seed_from_u64(seed ^ 0x70A1);
        run.backend.for_each_history_point(|n, state| {
            let allowed = run.allowed(n);
            let _ = state.for_each_crash_image(64, |img| {
                states += 1;
                if let Err(e) = run.check(img, allowed) {
                    panic!("seed {seed}, crash after event {n} (exhaustive): {e}");
                }
            });
            for _ in 0..6 {
                states += 1;
                let img = state.random_crash_image(&mut rng, true);
                if let Err(e) = run.check(img, allowed) {
                    panic!("seed {seed}, crash after event {n} (torn at 512 bytes): {e}");
                }
            }
        });
    }
    println!("{states} crash states checked");
}

#[test]
fn a_crash_at_any_point_of_a_replay_is_followed_by_the_same_result() {
    for seed in seeds(10..13) {
        let run = workload(seed, SMALL);
        let mut rng = ChaCha8Rng::seed_from_u64(seed ^ 0x1DE);
        let mut points = Vec::new();
        run.backend.for_each_history_point(|n, state| {
            if state.unflushed().len() > 2 {
                points.push((n, state.clone()));
            }
        });
        for _ in 0..4 {
            let (n, state) = &points[rng.random_range(0..points.len())];
            let image = state.random_crash_image(&mut rng, true);
            let allowed = run.allowed(*n);
            // The replay itself, recorded.
            let fb = Arc::new(FaultBackend::from_image(image));
            let vol = Volume::open(fb.clone(), &OpenOptions::default())
                .unwrap_or_else(|e| panic!("seed {seed}: first replay failed: {e}"));
            let first = run.read_all(&vol).unwrap();
            drop(vol);
            let mut replays = 0;
            fb.for_each_history_point(|m, again| {
                let mut check = |img: Vec<u8>| {
                    replays += 1;
                    // Replaying again gives exactly what the uninterrupted replay gave.
                    let vol = Volume::open(Arc::new(MemoryBackend::from_vec(img)), &OpenOptions::default())
                        .unwrap_or_else(|e| panic!("seed {seed}: crash after event {n}, then at event {m} of the replay: open failed: {e}"));
                    let again = run.read_all(&vol).unwrap_or_else(|e| panic!("seed {seed}: event {n}, replay event {m}: {e}"));
                    assert!(again == first, "seed {seed}: crash after event {n}, then at event {m} of the replay: another result");
                };
                for _ in 0..3 {
                    check(again.random_crash_image(&mut rng, true));
                }
                check(again.crash_image(&[]));
            });
            assert!(replays > 3, "the replay wrote something");
            assert!(
                (allowed.0..=allowed.1).any(|k| run.states[k] == first),
                "seed {seed}: the replay gave no allowed prefix"
            );
        }
    }
}
