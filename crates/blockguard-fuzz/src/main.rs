// Lint policy, the same in every crate of the workspace: clippy's pedantic group on, minus a
// short list that would add noise without catching bugs here.
#![warn(missing_docs, unreachable_pub, clippy::pedantic)]
#![allow(
    // Pure getters are obvious; what must not be ignored is already a `Result` or `#[must_use]` type.
    clippy::must_use_candidate,
    // Errors are typed enums whose variants document themselves.
    clippy::missing_errors_doc,
    // `volume::VolumeStats` and the like read better at use sites outside the module.
    clippy::module_name_repetitions,
)]

//! `blockguard-fuzz`: the fuzz targets without libFuzzer (see `fuzz/README.md`).
//!
//! ```text
//! blockguard-fuzz run [TARGET...]        replay the corpus, then mutate for a time budget
//! blockguard-fuzz replay TARGET INPUT... files, directories, or --hex HEX
//! blockguard-fuzz write-corpus           (re)write the generated seeds of every target
//! blockguard-fuzz list                   name, weight and longest input of every target
//! ```
//!
//! `run` reads `BLOCKGUARD_FUZZ_SECS` (total seconds, split over the targets by weight;
//! default 60), `BLOCKGUARD_FUZZ_SEED` (default: a fresh one, printed) and
//! `BLOCKGUARD_FUZZ_INPUTS` (at most this many mutated inputs per target).

use blockguard_fuzz::harness::{self, Budget, Failure};
use blockguard_fuzz::{hex, target, unhex, Target, TARGETS};
use std::fmt::Write as _;
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::time::Duration;

fn main() -> ExitCode {
    // A failure's report carries the panic message; the hook only says where it was raised.
    std::panic::set_hook(Box::new(|info| {
        if let Some(at) = info.location() {
            eprintln!("panicked at {at}");
        }
    }));
    let args: Vec<String> = std::env::args().skip(1).collect();
    let result = match args.first().map(String::as_str) {
        Some("run") => run(&args[1..]),
        Some("replay") => replay(&args[1..]),
        Some("write-corpus") => write_corpus(),
        Some("list") => {
            for t in TARGETS {
                println!("{} {} {}", t.name, t.weight, t.max_len);
            }
            Ok(())
        }
        _ => Err("usage: blockguard-fuzz run [TARGET...] | replay TARGET (FILE|DIR|--hex HEX)... | write-corpus | list".into()),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("{e}");
            ExitCode::FAILURE
        }
    }
}

fn env_number(name: &str) -> Result<Option<u64>, String> {
    match std::env::var(name) {
        Ok(s) => s
            .trim()
            .parse()
            .map(Some)
            .map_err(|_| format!("{name} must be a number, not {s:?}")),
        Err(_) => Ok(None),
    }
}

fn targets(names: &[String]) -> Result<Vec<&'static Target>, String> {
    if names.is_empty() {
        return Ok(TARGETS.iter().collect());
    }
    names
        .iter()
        .map(|n| target(n).ok_or_else(|| format!("no target {n:?}; `blockguard-fuzz list` lists them")))
        .collect()
}

fn run(names: &[String]) -> Result<(), String> {
    let chosen = targets(names)?;
    let secs = env_number("BLOCKGUARD_FUZZ_SECS")?.unwrap_or(60);
    let seed = env_number("BLOCKGUARD_FUZZ_SEED")?.unwrap_or_else(|| rand::random::<u64>() >> 1);
    let max_inputs = env_number("BLOCKGUARD_FUZZ_INPUTS")?;
    let weights: u32 = chosen.iter().map(|t| t.weight).sum();
    println!(
        "blockguard-fuzz: seed {seed} (replay with BLOCKGUARD_FUZZ_SEED={seed}), {secs} s over {} targets",
        chosen.len()
    );
    let mut total = 0;
    for t in chosen {
        let budget = Budget {
            time: Duration::from_secs(secs).mul_f64(f64::from(t.weight) / f64::from(weights)),
            max_inputs,
        };
        match harness::fuzz(t, seed, budget) {
            Ok(r) => {
                total += r.corpus as u64 + r.mutated;
                let labels: Vec<String> = r.labels.iter().map(|(l, n)| format!("{l}: {n}")).collect();
                println!(
                    "fuzz {}: {} corpus + {} mutated inputs in {:.1} s, no failure; pool {} ({})",
                    t.name,
                    r.corpus,
                    r.mutated,
                    r.elapsed.as_secs_f64(),
                    r.pool,
                    labels.join(", ")
                );
            }
            Err(f) => return Err(report_failure(t, Some(seed), &f)),
        }
    }
    println!("blockguard-fuzz: every target clean, {total} inputs, seed {seed}");
    Ok(())
}

/// Saves the failing input and describes how to replay it.
fn report_failure(t: &Target, seed: Option<u64>, f: &Failure) -> String {
    let dir = PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("../../fuzz/artifacts")
        .join(t.name);
    let name = format!("crash-{:016x}", fnv(&f.input));
    let saved = std::fs::create_dir_all(&dir)
        .and_then(|()| std::fs::write(dir.join(&name), &f.input))
        .map_or_else(
            |e| format!("(not saved: {e})"),
            |()| dir.join(&name).display().to_string(),
        );
    let hx = hex(&f.input);
    let mut s = format!(
        "FAILED: target {}, {}\n{}\ninput ({} bytes): {hx}\nsaved to {saved}\nreplay:\n  cargo run --profile ci -p blockguard-fuzz -- replay {} --hex {hx}",
        t.name,
        f.origin,
        f.message,
        f.input.len(),
        t.name
    );
    if let Some(seed) = seed {
        // Writing to a `String` cannot fail.
        let _ = write!(
            s,
            "\n  BLOCKGUARD_FUZZ_SEED={seed} cargo run --profile ci -p blockguard-fuzz -- run {}",
            t.name
        );
    }
    s
}

/// FNV-1a: names a saved input after its content.
fn fnv(data: &[u8]) -> u64 {
    data.iter().fold(0xcbf2_9ce4_8422_2325u64, |h, &b| {
        (h ^ u64::from(b)).wrapping_mul(0x100_0000_01b3)
    })
}

fn replay(args: &[String]) -> Result<(), String> {
    let (name, inputs) = args
        .split_first()
        .ok_or("usage: blockguard-fuzz replay TARGET (FILE|DIR|--hex HEX)...")?;
    let t = targets(std::slice::from_ref(name))?[0];
    let mut list: Vec<(String, Vec<u8>)> = Vec::new();
    let mut it = inputs.iter();
    while let Some(a) = it.next() {
        if a == "--hex" {
            let h = it.next().ok_or("--hex needs a value")?;
            list.push(("hex input".into(), unhex(h).ok_or("not hex")?));
        } else if Path::new(a).is_dir() {
            let mut files: Vec<PathBuf> = std::fs::read_dir(a)
                .map_err(|e| format!("{a}: {e}"))?
                .filter_map(|e| e.ok().map(|e| e.path()))
                .filter(|p| p.is_file())
                .collect();
            files.sort();
            for p in files {
                let data = std::fs::read(&p).map_err(|e| format!("{}: {e}", p.display()))?;
                list.push((p.display().to_string(), data));
            }
        } else {
            list.push((a.clone(), std::fs::read(a).map_err(|e| format!("{a}: {e}"))?));
        }
    }
    for (origin, input) in list {
        match harness::run_one(t, &input) {
            Ok(label) => println!("{origin}: {label}"),
            Err(message) => {
                return Err(report_failure(
                    t,
                    None,
                    &Failure {
                        origin,
                        input,
                        message,
                    },
                ))
            }
        }
    }
    Ok(())
}

fn write_corpus() -> Result<(), String> {
    for t in TARGETS {
        let dir = blockguard_fuzz::corpus_dir(t.name);
        std::fs::create_dir_all(&dir).map_err(|e| format!("{}: {e}", dir.display()))?;
        let seeds = (t.seeds)();
        // Generated files no longer generated go; other files (found by fuzzing) stay.
        for entry in std::fs::read_dir(&dir).map_err(|e| e.to_string())? {
            let entry = entry.map_err(|e| e.to_string())?;
            let file = entry.file_name().to_string_lossy().into_owned();
            if file.starts_with("gen-") && !seeds.iter().any(|(n, _)| *n == file) {
                std::fs::remove_file(entry.path()).map_err(|e| e.to_string())?;
            }
        }
        for (file, data) in &seeds {
            std::fs::write(dir.join(file), data).map_err(|e| format!("{file}: {e}"))?;
        }
        println!("{}: {} generated seeds in {}", t.name, seeds.len(), dir.display());
    }
    Ok(())
}
