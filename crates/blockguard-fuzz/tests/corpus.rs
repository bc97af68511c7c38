//! The committed seed corpus, replayed through every target on every `cargo test`; the
//! generated seeds kept in sync with the encoders; the libFuzzer binaries kept in sync with
//! the targets; and the engine target shown able to fail (on `none` mode, which has no crash
//! protection).

use blockguard::Mode;
use blockguard_fuzz::harness::{self, Budget};
use blockguard_fuzz::{committed_corpus, engine, hex, TARGETS};
use std::path::Path;
use std::time::Duration;

const REGENERATE: &str = "cargo run -p blockguard-fuzz -- write-corpus";

#[test]
fn every_target_has_a_libfuzzer_binary_and_a_corpus() {
    let fuzz = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../fuzz");
    let manifest = std::fs::read_to_string(fuzz.join("Cargo.toml")).unwrap();
    for t in TARGETS {
        let source = fuzz.join(format!("fuzz_targets/{}.rs", t.name));
        let body = std::fs::read_to_string(&source).unwrap_or_else(|e| panic!("{}: {e}", source.display()));
        assert!(
            body.contains(&format!("blockguard_fuzz::{}", module_of(t.name))),
            "{} does not call the shared target",
            source.display()
        );
        assert!(
            manifest.contains(&format!("name = \"{}\"", t.name)),
            "fuzz/Cargo.toml has no [[bin]] {}",
            t.name
        );
        let n = committed_corpus(t.name).unwrap().len();
        assert!(n >= 20, "{}: only {n} committed seeds", t.name);
    }
    let sources = std::fs::read_dir(fuzz.join("fuzz_targets")).unwrap().count();
    assert_eq!(sources, TARGETS.len(), "a libFuzzer target missing from TARGETS");
}

/// The module of `blockguard_fuzz` each libFuzzer binary calls.
fn module_of(name: &str) -> &'static str {
    match name {
        "format_superblock" => "superblock",
        "format_metablock" => "metablock",
        "nbd_request" => "nbd",
        "nbd_uri" => "nbd_uri",
        "nbd_reply" => "nbd_reply",
        "format_journal" => "journal",
        "engine_model" => "engine",
        other => panic!("unknown target {other}"),
    }
}

#[test]
fn generated_seeds_are_committed() {
    for t in TARGETS {
        let committed = committed_corpus(t.name).unwrap();
        for (name, data) in (t.seeds)() {
            let found = committed.iter().find(|(n, _)| *n == name);
            assert!(
                found.is_some_and(|(_, d)| *d == data),
                "{}: seed {name} is missing or stale in fuzz/corpus-seed; run `{REGENERATE}`",
                t.name
            );
        }
    }
}

#[test]
fn committed_corpus_passes_every_target() {
    for t in TARGETS {
        for (name, data) in committed_corpus(t.name).unwrap() {
            if let Err(message) = harness::run_one(t, &data) {
                panic!(
                    "{} fails on fuzz/corpus-seed/{}/{name}:\n{message}",
                    t.name, t.name
                );
            }
        }
    }
}

#[test]
fn engine_seeds_round_trip_and_reach_torn_blocks() {
    let mut labels = std::collections::BTreeSet::new();
    for (name, data) in engine::seeds() {
        let (setup, ops) = engine::decode(&data);
        assert_eq!(
            engine::encode(setup, &ops),
            data,
            "seed {name} does not round-trip"
        );
        labels.insert(engine::simulate(&data, Mode::Dual).unwrap());
    }
    assert!(
        labels.contains("crashed: a block torn"),
        "no seed leaves a torn block after a crash: {labels:?}"
    );
}

/// Seed and budget of the short mutation runs below: `BLOCKGUARD_FUZZ_SEED` overrides the
/// seed (printed).
fn seed() -> u64 {
    let seed = std::env::var("BLOCKGUARD_FUZZ_SEED")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(42);
    println!("BLOCKGUARD_FUZZ_SEED={seed}");
    seed
}

#[test]
fn short_mutation_runs_are_clean() {
    let seed = seed();
    for t in TARGETS {
        let inputs = if t.name == "engine_model" { 300 } else { 3000 };
        let budget = Budget {
            time: Duration::from_secs(30),
            max_inputs: Some(inputs),
        };
        match harness::fuzz(t, seed, budget) {
            Ok(r) => println!(
                "{}: {} corpus + {} mutated inputs, {:?}",
                t.name, r.corpus, r.mutated, r.labels
            ),
            Err(f) => panic!(
                "{} failed on {} (seed {seed}):\n{}\ninput: {}",
                t.name,
                f.origin,
                f.message,
                hex(&f.input)
            ),
        }
    }
}

#[test]
fn engine_checks_catch_none_mode() {
    // `none` mode writes data and tags without ordering: a crash leaves intact data whose tag
    // never landed. The same inputs must make the checks fail there, or they see nothing.
    let (mut failed, mut g1) = (0, 0);
    for (_, data) in engine::seeds() {
        if let Err(v) = engine::simulate(&data, Mode::None) {
            failed += 1;
            g1 += v.contains("(G1)") as usize;
        }
    }
    println!("none mode: {failed} of the engine seeds fail, {g1} of them with G1");
    assert!(g1 > 0, "no engine seed catches none mode violating G1");
}
