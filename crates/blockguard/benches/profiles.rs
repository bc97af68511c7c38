//! Tag profile benchmark: GB/s (10^9 bytes per second) of generating and of verifying the tags
//! of 4 KiB blocks, per profile, on one core. Figures: `docs/PERFORMANCE.md`, "Tag profiles".
//!
//! ```sh
//! cargo bench -p blockguard --bench profiles
//! ```
//!
//! The blocks are 256 distinct 4 KiB buffers (1 MiB, resident in the L2 cache), tagged at
//! increasing block numbers, so the figure is the tag computation itself, not memory
//! bandwidth. Each figure is the best of `BENCH_RUNS` (default 7) trials of about 0.2 s. Run
//! without `--bench` (as `cargo test --benches` does) it is a quick smoke test.
//!
//! The last line, `crc32c direct`, computes the `crc32c` tag without the [`Tagger`]'s
//! indirect call, as the engine did before profiles became pluggable: the cost of the
//! abstraction is the difference to the `crc32c` line.

use blockguard::tag::{crc32c_seeded, Tag, TagKey, Tagger};
use blockguard::Profile;
use std::hint::black_box;
use std::time::{Duration, Instant};

const BLOCK: usize = 4096;
const BUFFERS: usize = 256;

/// The best throughput of `runs` trials of `f` over `blocks` blocks, in GB/s.
fn best_gbps(runs: usize, blocks: u64, mut f: impl FnMut(u64)) -> f64 {
    let mut best = Duration::MAX;
    for _ in 0..runs {
        let t = Instant::now();
        for b in 0..blocks {
            f(b);
        }
        best = best.min(t.elapsed());
    }
    #[allow(clippy::cast_precision_loss)] // Block counts far below 2^52.
    let bytes = (blocks * BLOCK as u64) as f64;
    bytes / best.as_secs_f64() / 1e9
}

/// Blocks one trial of `tagger` takes: about 0.2 s at its speed (measured on a short run).
fn blocks_for(tagger: &Tagger, data: &[Vec<u8>], smoke: bool) -> u64 {
    if smoke {
        return 64;
    }
    let probe = 2048u64;
    let t = Instant::now();
    for b in 0..probe {
        black_box(tagger.generate(b, &data[usize::try_from(b).unwrap_or(0) % BUFFERS]));
    }
    let per_block = t.elapsed().as_secs_f64() / 2048.0;
    // At least the probe; at most what 0.2 s holds.
    #[allow(clippy::cast_possible_truncation, clippy::cast_sign_loss)] // Positive, small.
    let n = (0.2 / per_block.max(1e-9)) as u64;
    n.max(probe)
}

fn main() {
    let smoke = !std::env::args().any(|a| a == "--bench");
    let runs = std::env::var("BENCH_RUNS")
        .ok()
        .and_then(|s| s.trim().parse().ok())
        .unwrap_or(if smoke { 1 } else { 7 })
        .max(1);
    let mut seed = 0x9E37_79B9_7F4A_7C15u64;
    let data: Vec<Vec<u8>> = (0..BUFFERS)
        .map(|_| {
            (0..BLOCK)
                .map(|_| {
                    // xorshift: incompressible, reproducible data.
                    seed ^= seed << 13;
                    seed ^= seed >> 7;
                    seed ^= seed << 17;
                    seed.to_le_bytes()[0]
                })
                .collect()
        })
        .collect();
    let uuid = [0x42u8; 16];
    let key = TagKey::from_bytes(&[0x5A; 32]).unwrap_or_else(|_| unreachable!("32 bytes"));
    println!("tag profiles, 4 KiB blocks, one core, best of {runs} (GB/s = 10^9 bytes/s)");
    println!("{:<14} {:>4} {:>11} {:>11}", "profile", "T", "generate", "verify");
    for profile in Profile::ALL {
        let tagger = profile
            .tagger(&uuid, profile.is_keyed().then_some(&key))
            .unwrap_or_else(|e| unreachable!("{profile}: {e}"));
        let blocks = blocks_for(&tagger, &data, smoke);
        let buf = |b: u64| &data[usize::try_from(b).unwrap_or(0) % BUFFERS];
        let generate = best_gbps(runs, blocks, |b| {
            black_box(tagger.generate(b, black_box(buf(b))));
        });
        let tags: Vec<_> = (0..blocks).map(|b| tagger.generate(b, buf(b))).collect();
        let verify = best_gbps(runs, blocks, |b| {
            let ok = tagger.verify(b, black_box(buf(b)), &tags[usize::try_from(b).unwrap_or(0)]);
            assert!(ok, "{profile}: block {b} does not verify");
        });
        println!(
            "{:<14} {:>4} {:>11.2} {:>11.2}",
            profile.name(),
            profile.tag_size(),
            generate,
            verify
        );
    }
    let tagger = Profile::Crc32c
        .tagger(&uuid, None)
        .unwrap_or_else(|e| unreachable!("{e}"));
    let blocks = blocks_for(&tagger, &data, smoke);
    let direct = best_gbps(runs, blocks, |b| {
        let t = crc32c_direct(
            &uuid,
            b,
            black_box(&data[usize::try_from(b).unwrap_or(0) % BUFFERS]),
        );
        debug_assert_eq!(
            t,
            tagger.generate(b, &data[usize::try_from(b).unwrap_or(0) % BUFFERS])
        );
        black_box(t);
    });
    println!("{:<14} {:>4} {direct:>11.2}", "crc32c direct", 8);
}

/// The `crc32c` tag computed inline, as the engine did before the [`Tagger`].
fn crc32c_direct(uuid: &[u8; 16], block: u64, data: &[u8]) -> Tag {
    let mut seed = [0u8; 24];
    seed[..16].copy_from_slice(uuid);
    seed[16..].copy_from_slice(&block.to_le_bytes());
    let guard = crc32c_seeded(&seed, data);
    let mut b = [0u8; 8];
    b[0..4].copy_from_slice(&guard.to_le_bytes());
    b[4..6].copy_from_slice(&0x4742u16.to_le_bytes());
    b[6..8].copy_from_slice(&block.to_le_bytes()[..2]);
    Tag::from_bytes(&b)
}
