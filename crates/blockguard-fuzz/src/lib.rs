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

//! The fuzz targets of blockguard, as plain functions of the input bytes.
//!
//! Each target is a [`Target`]: `run(data)` checks the target's properties on one input and
//! panics when one is violated (it must never panic otherwise, whatever the bytes), and
//! `seeds()` builds the meaningful inputs of its seed corpus with the real encoders. The same
//! functions are driven by:
//! - the libFuzzer binaries under `fuzz/fuzz_targets/` (coverage-guided; built on stable Rust
//!   by `scripts/fuzz.sh`, or with `cargo fuzz`), which CI runs for a bounded time;
//! - the stable driver in [`harness`] (`blockguard-fuzz run`), which needs no instrumentation:
//!   it replays the committed corpus and mutates it from a printed seed;
//! - `cargo test`, which replays the committed corpus (`tests/corpus.rs`).
//!
//! The committed seed corpus lives in `fuzz/corpus-seed/<target>/`; see `fuzz/README.md`.

pub mod engine;
pub mod harness;
pub mod journal;
pub mod metablock;
pub mod nbd;
pub mod nbd_reply;
pub mod nbd_uri;
pub mod superblock;

use std::fmt::Write as _;
use std::path::PathBuf;

/// One fuzz target.
pub struct Target {
    /// Its name: the libFuzzer binary's and the corpus directory's.
    pub name: &'static str,
    /// Checks one input; panics on a violated property. Returns a short label of how far the
    /// input got (reported per label by the stable driver, which also keeps inputs reaching a
    /// label it had not seen).
    pub run: fn(&[u8]) -> &'static str,
    /// The generated part of the seed corpus: `(file name, bytes)`.
    pub seeds: fn() -> Vec<(String, Vec<u8>)>,
    /// Longest input worth trying.
    pub max_len: usize,
    /// Share of a fuzzing time budget split over all targets.
    pub weight: u32,
}

/// Every fuzz target.
pub const TARGETS: &[Target] = &[
    Target {
        name: "format_superblock",
        run: superblock::run,
        seeds: superblock::seeds,
        max_len: superblock::MAX_LEN,
        weight: 1,
    },
    Target {
        name: "format_metablock",
        run: metablock::run,
        seeds: metablock::seeds,
        max_len: metablock::MAX_LEN,
        weight: 1,
    },
    Target {
        name: "format_journal",
        run: journal::run,
        seeds: journal::seeds,
        max_len: journal::MAX_LEN,
        weight: 1,
    },
    Target {
        name: "nbd_request",
        run: nbd::run,
        seeds: nbd::seeds,
        max_len: nbd::MAX_LEN,
        weight: 2,
    },
    Target {
        name: "nbd_reply",
        run: nbd_reply::run,
        seeds: nbd_reply::seeds,
        max_len: nbd_reply::MAX_LEN,
        weight: 1,
    },
    Target {
        name: "nbd_uri",
        run: nbd_uri::run,
        seeds: nbd_uri::seeds,
        max_len: nbd_uri::MAX_LEN,
        weight: 1,
    },
    Target {
        name: "engine_model",
        run: engine::run,
        seeds: engine::seeds,
        max_len: engine::MAX_LEN,
        weight: 6,
    },
];

/// The target called `name`.
pub fn target(name: &str) -> Option<&'static Target> {
    TARGETS.iter().find(|t| t.name == name)
}

/// `fuzz/corpus-seed/<name>` of the source tree this crate was built from.
pub fn corpus_dir(name: &str) -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("../../fuzz/corpus-seed")
        .join(name)
}

/// Every file of a target's committed corpus, sorted by name: `(file name, bytes)`. An absent
/// directory is an empty corpus.
pub fn committed_corpus(name: &str) -> std::io::Result<Vec<(String, Vec<u8>)>> {
    let dir = corpus_dir(name);
    let mut files = Vec::new();
    let entries = match std::fs::read_dir(&dir) {
        Ok(e) => e,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(files),
        Err(e) => return Err(e),
    };
    for entry in entries {
        let entry = entry?;
        if entry.file_type()?.is_file() {
            let name = entry.file_name().to_string_lossy().into_owned();
            files.push((name, std::fs::read(entry.path())?));
        }
    }
    files.sort();
    Ok(files)
}

/// `x` as a `usize`, for offsets and lengths inside buffers the targets hold in memory (a
/// volume's byte model, a superblock region, a crash image), which they compute in `u64` like
/// the engine. Lossless: blockguard builds for 64-bit targets only, and this conversion does
/// not compile where a `usize` is narrower than a `u64`, so nothing is ever truncated.
pub(crate) const fn usize_of(x: u64) -> usize {
    usize::from_le_bytes(x.to_le_bytes())
}

/// Lower-case hex of `data`.
pub fn hex(data: &[u8]) -> String {
    data.iter()
        .fold(String::with_capacity(2 * data.len()), |mut hex, b| {
            // Writing to a `String` cannot fail.
            let _ = write!(hex, "{b:02x}");
            hex
        })
}

/// Parses [`hex`] output (whitespace ignored).
pub fn unhex(s: &str) -> Option<Vec<u8>> {
    let digits: Vec<u8> = s.bytes().filter(|b| !b.is_ascii_whitespace()).collect();
    if !digits.len().is_multiple_of(2) {
        return None;
    }
    digits
        .chunks(2)
        .map(|p| u8::from_str_radix(std::str::from_utf8(p).ok()?, 16).ok())
        .collect()
}
