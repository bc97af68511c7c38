//! A stable driver for the targets: no instrumentation, no nightly toolchain, no libFuzzer.
//!
//! It runs a target's committed corpus (and its generated seeds, so a missing corpus still
//! gives something to mutate), then mutates inputs drawn from that pool with a generator
//! seeded by a number it is given, for a time or input budget. It has no coverage feedback;
//! as a stand-in, an input whose label (see [`crate::Target::run`]) is new joins the pool.
//! Everything but the time budget is deterministic: the same seed tries the same inputs in
//! the same order, so a failure found at input `i` is found again by the same seed with a
//! budget of at least `i` inputs.

use crate::Target;
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;
use std::collections::BTreeMap;
use std::panic::{catch_unwind, AssertUnwindSafe};
use std::time::{Duration, Instant};

/// How long to fuzz one target.
#[derive(Clone, Copy, Debug)]
pub struct Budget {
    /// Stop mutating after this long.
    pub time: Duration,
    /// Stop after this many mutated inputs (if set).
    pub max_inputs: Option<u64>,
}

/// What a clean run did.
#[derive(Debug, Default)]
pub struct Report {
    /// Corpus inputs run (committed files and generated seeds).
    pub corpus: usize,
    /// Mutated inputs run.
    pub mutated: u64,
    /// Inputs in the pool at the end.
    pub pool: usize,
    /// How many inputs reached each label.
    pub labels: BTreeMap<&'static str, u64>,
    /// Time spent.
    pub elapsed: Duration,
}

/// An input that made the target panic.
#[derive(Debug)]
pub struct Failure {
    /// Where the input came from: a corpus file, or the mutated input's number.
    pub origin: String,
    /// The input.
    pub input: Vec<u8>,
    /// The panic message.
    pub message: String,
}

/// Runs `target` on `input`, turning a panic into its message.
pub fn run_one(target: &Target, input: &[u8]) -> Result<&'static str, String> {
    catch_unwind(AssertUnwindSafe(|| (target.run)(input))).map_err(|payload| {
        payload
            .downcast_ref::<&str>()
            .map(ToString::to_string)
            .or_else(|| payload.downcast_ref::<String>().cloned())
            .unwrap_or_else(|| "a panic without a message".into())
    })
}

/// Fuzzes `target`: its corpus first, then mutations from `seed` within `budget`.
pub fn fuzz(target: &Target, seed: u64, budget: Budget) -> Result<Report, Failure> {
    let begin = Instant::now();
    let mut report = Report::default();
    let mut corpus = crate::committed_corpus(target.name).unwrap_or_default();
    let committed: std::collections::HashSet<Vec<u8>> = corpus.iter().map(|(_, d)| d.clone()).collect();
    corpus.extend(
        (target.seeds)()
            .into_iter()
            .filter(|(_, d)| !committed.contains(d)),
    );
    let mut pool: Vec<Vec<u8>> = Vec::new();
    for (name, input) in corpus {
        let label = run_one(target, &input).map_err(|message| Failure {
            origin: format!("corpus file {name}"),
            input: input.clone(),
            message,
        })?;
        *report.labels.entry(label).or_default() += 1;
        report.corpus += 1;
        pool.push(input);
    }
    if pool.is_empty() {
        pool.push(Vec::new());
    }
    let mut rng = ChaCha8Rng::seed_from_u64(seed);
    while begin.elapsed() < budget.time && budget.max_inputs.is_none_or(|m| report.mutated < m) {
        let mut input = pool[rng.random_range(0..pool.len())].clone();
        let other = &pool[rng.random_range(0..pool.len())];
        mutate(&mut rng, &mut input, other, target.max_len);
        report.mutated += 1;
        let label = run_one(target, &input).map_err(|message| Failure {
            origin: format!("mutated input #{}", report.mutated),
            input: input.clone(),
            message,
        })?;
        let count = report.labels.entry(label).or_default();
        *count += 1;
        if *count == 1 {
            pool.push(input);
        }
    }
    report.pool = pool.len();
    report.elapsed = begin.elapsed();
    Ok(report)
}

/// Values that sit on boundaries, for integer fields of any width.
const INTERESTING: [u64; 14] = [
    0,
    1,
    2,
    7,
    0x7f,
    0x80,
    0xff,
    0x100,
    0x1000,
    0x7fff,
    0xffff,
    0x8000_0000,
    0xffff_ffff,
    u64::MAX,
];

/// Applies one to four random edits to `input` (bit flips, boundary values, arithmetic,
/// insertions, deletions, copies, a splice with `other`), keeping it at most `max_len` long.
pub fn mutate(rng: &mut ChaCha8Rng, input: &mut Vec<u8>, other: &[u8], max_len: usize) {
    for _ in 0..rng.random_range(1..=4) {
        let len = input.len();
        let pos = |rng: &mut ChaCha8Rng| rng.random_range(0..len.max(1));
        match rng.random_range(0..10) {
            0 if len > 0 => {
                let i = pos(rng);
                input[i] ^= 1 << rng.random_range(0..8);
            }
            1 if len > 0 => {
                let i = pos(rng);
                input[i] = rng.random();
            }
            2 if len > 0 => {
                let i = pos(rng);
                input[i] = input[i].wrapping_add(rng.random_range(1..=16u8).wrapping_mul(if rng.random() {
                    1
                } else {
                    255
                }));
            }
            3 if len > 0 => {
                // A boundary value as a little-endian integer of 1, 2, 4 or 8 bytes.
                let width = 1 << rng.random_range(0..4);
                let i = pos(rng);
                let v = INTERESTING[rng.random_range(0..INTERESTING.len())].to_le_bytes();
                let n = width.min(len - i);
                input[i..i + n].copy_from_slice(&v[..n]);
            }
            4 => {
                let at = rng.random_range(0..=len);
                let n = rng.random_range(1..=16);
                let bytes: Vec<u8> = (0..n).map(|_| rng.random()).collect();
                input.splice(at..at, bytes);
            }
            5 if len > 0 => {
                let at = pos(rng);
                let n = rng.random_range(1..=(len - at).min(16));
                input.drain(at..at + n);
            }
            6 if len > 1 => {
                // Copy a chunk over another place of the input.
                let from = pos(rng);
                let to = pos(rng);
                let n = rng.random_range(1..=(len - from).min(len - to).min(32));
                input.copy_within(from..from + n, to);
            }
            7 if !other.is_empty() => {
                // Splice: a prefix of this input, a suffix of the other.
                let cut = rng.random_range(0..=len);
                let from = rng.random_range(0..other.len());
                input.truncate(cut);
                input.extend_from_slice(&other[from..]);
            }
            8 if len > 0 => input.truncate(pos(rng)),
            _ => {
                let n = rng.random_range(1..=8);
                input.extend((0..n).map(|_| rng.random::<u8>()));
            }
        }
    }
    input.truncate(max_len);
}
