//! Consistency modes against raw file I/O, in one run: sequential 1 MiB writes and 4 KiB
//! random writes, each with a flush every 256 writes and with a flush after every write, on a
//! raw file and on a `dual`, `journal`, `rebuild` and `none` volume in the same directory;
//! then the time to open a 1 TiB sparse volume after a crash that left 64 MiB written in the
//! last window (recovery, replay or retag), per mode. Figures: `docs/PERFORMANCE.md`.
//!
//! ```sh
//! cargo bench -p blockguard --bench modes
//! BENCH_SIZE=256M cargo bench -p blockguard --bench modes     # quicker
//! ```
//!
//! `BENCH_SIZE` (default 1G): bytes written by the sequential tests with sparse flushes, and the
//! size of the volumes; the flush-after-every-write tests write a sixteenth of it;
//! `BENCH_DIR` (default `target/bench-modes.PID`). Without `--bench` (as `cargo test
//! --benches` runs it) it is a smoke test: 16 MiB, no 1 TiB recovery.

use blockguard::blockguard_backend::{FileBackend, FileOptions, LockMode};
use blockguard::{FormatOptions, Mode, OpenOptions, Volume};
use std::fs::File;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Instant;

const MIB: u64 = 1 << 20;
const KIB4: u64 = 4096;

type Res<T> = Result<T, Box<dyn std::error::Error>>;

/// What a test writes.
#[derive(Clone, Copy)]
struct Test {
    name: &'static str,
    io: u64,
    /// Flush after this many writes.
    flush_every: u64,
    /// Bytes written in all.
    total: u64,
    random: bool,
}

/// Something the tests write to: the raw file or a volume.
trait Target {
    fn write(&self, buf: &[u8], off: u64) -> Res<()>;
    fn flush(&self) -> Res<()>;
}

impl Target for File {
    fn write(&self, buf: &[u8], off: u64) -> Res<()> {
        Ok(self.write_all_at(buf, off)?)
    }
    fn flush(&self) -> Res<()> {
        Ok(self.sync_data()?)
    }
}

impl Target for Volume {
    fn write(&self, buf: &[u8], off: u64) -> Res<()> {
        Ok(self.write_at(buf, off)?)
    }
    fn flush(&self) -> Res<()> {
        Ok(Volume::flush(self)?)
    }
}

/// Offsets of a test, from a fixed xorshift sequence (the same for every target).
fn offsets(t: &Test, size: u64) -> Vec<u64> {
    let n = t.total / t.io;
    let mut x = 0x9E37_79B9_7F4A_7C15u64;
    (0..n)
        .map(|i| {
            if t.random {
                x ^= x << 13;
                x ^= x >> 7;
                x ^= x << 17;
                (x % (size / t.io)) * t.io
            } else {
                (i * t.io) % size
            }
        })
        .collect()
}

fn run(target: &dyn Target, t: &Test, offs: &[u64]) -> Res<f64> {
    let buf: Vec<u8> = (0..t.io).map(|i| (i * 31 % 251) as u8).collect();
    let start = Instant::now();
    for (i, &off) in offs.iter().enumerate() {
        target.write(&buf, off)?;
        if (i as u64 + 1).is_multiple_of(t.flush_every) {
            target.flush()?;
        }
    }
    target.flush()?;
    Ok(start.elapsed().as_secs_f64())
}

fn volume(dir: &Path, mode: Mode, size: u64) -> Res<Volume> {
    let path = dir.join(format!("{}.bgv", mode.name()));
    let _ = std::fs::remove_file(&path);
    let mut o = FormatOptions::with_size(size);
    o.mode = mode;
    let backend = FileBackend::create(&path, o.backing_len()?, &FileOptions::default())?;
    Ok(Volume::format(Arc::new(backend), &o)?)
}

fn throughput(dir: &Path, size: u64, tests: &[Test]) -> Res<()> {
    let modes = [Mode::Dual, Mode::Journal, Mode::Rebuild, Mode::None];
    println!(
        "{:<40} {:>12} {:>20} {:>20} {:>20} {:>20}",
        "test", "raw", "dual", "journal", "rebuild", "none"
    );
    for t in tests {
        let offs = offsets(t, size);
        let unit = |secs: f64| {
            if t.random {
                offs.len() as f64 / secs
            } else {
                t.total as f64 / secs / 1e6
            }
        };
        let raw_path = dir.join("raw.img");
        let _ = std::fs::remove_file(&raw_path);
        let raw = std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(true)
            .open(&raw_path)?;
        raw.set_len(size)?;
        let raw_rate = unit(run(&raw, t, &offs)?);
        drop(raw);
        std::fs::remove_file(&raw_path)?;
        let mut line = format!("{:<40} {:>12.1}", t.name, raw_rate);
        for mode in modes {
            let vol = volume(dir, mode, size)?;
            let rate = unit(run(&vol, t, &offs)?);
            vol.close()?;
            std::fs::remove_file(dir.join(format!("{}.bgv", mode.name())))?;
            line.push_str(&format!(" {:>12.1} ({:>4.2}x)", rate, rate / raw_rate));
        }
        println!("{line}   [{}]", if t.random { "IOPS" } else { "MB/s" });
    }
    Ok(())
}

/// Opening a 1 TiB sparse volume after a crash that left 64 MiB written (in 1 MiB requests at
/// scattered places, flushed) in the last window.
fn recovery(dir: &Path) -> Res<()> {
    println!();
    println!("open after a crash: 1 TiB sparse volume, 64 MiB written in 1 MiB requests in the last window");
    for mode in [Mode::Dual, Mode::Journal, Mode::Rebuild] {
        let size = 1u64 << 40;
        let path = dir.join("big.bgv");
        let _ = std::fs::remove_file(&path);
        let mut o = FormatOptions::with_size(size);
        o.mode = mode;
        // No lock: the crash below leaves this process holding the volume, which a real
        // crash would not (the kernel drops a dead process's locks).
        let unlocked = FileOptions {
            lock: LockMode::None,
            ..FileOptions::default()
        };
        let backend = FileBackend::create(&path, o.backing_len()?, &unlocked)?;
        let vol = Volume::format(Arc::new(backend), &o)?;
        let buf = vec![0x5Au8; MIB as usize];
        for i in 0..64u64 {
            vol.write_at(&buf, (i * 16_381 * MIB) % (size - MIB))?;
        }
        vol.flush()?;
        // The crash: the process goes away without closing (the page cache keeps every write).
        std::mem::forget(vol);
        let start = Instant::now();
        let backend = FileBackend::open(&path, &unlocked)?;
        let vol = Volume::open(Arc::new(backend), &OpenOptions::default())?;
        let secs = start.elapsed().as_secs_f64();
        let what = match vol.recovery_at_open() {
            Some(r) => match &r.journal {
                Some(j) => format!(
                    "{} segments replayed, {} blocks",
                    j.segments_replayed, j.blocks_replayed
                ),
                None => format!(
                    "{} groups examined, {} blocks retagged",
                    r.groups_examined - r.groups_skipped,
                    r.blocks_retagged
                ),
            },
            None => "no recovery".into(),
        };
        println!("{:<10} {:>8.3} s   ({what})", mode.name(), secs);
        vol.close()?;
        std::fs::remove_file(&path)?;
    }
    Ok(())
}

/// "256M", "1G", "4096": binary units.
fn parse_size(s: &str) -> Option<u64> {
    let (num, shift) = match s.as_bytes().last()? {
        b'K' | b'k' => (&s[..s.len() - 1], 10),
        b'M' | b'm' => (&s[..s.len() - 1], 20),
        b'G' | b'g' => (&s[..s.len() - 1], 30),
        _ => (s, 0),
    };
    num.parse::<u64>().ok()?.checked_mul(1 << shift)
}

fn main() -> Res<()> {
    let bench = std::env::args().any(|a| a == "--bench");
    let size = match std::env::var("BENCH_SIZE") {
        Ok(s) => parse_size(s.trim()).ok_or_else(|| format!("BENCH_SIZE={s:?}: expected e.g. 256M or 1G"))?,
        Err(_) if bench => 1 << 30,
        Err(_) => 16 * MIB,
    };
    let dir: PathBuf = std::env::var_os("BENCH_DIR").map_or_else(
        || {
            PathBuf::from(env!("CARGO_MANIFEST_DIR"))
                .join(format!("../../target/bench-modes.{}", std::process::id()))
        },
        PathBuf::from,
    );
    std::fs::create_dir_all(&dir)?;
    let tests = [
        Test {
            name: "seq 1 MiB writes, flush every 256",
            io: MIB,
            flush_every: 256,
            total: size,
            random: false,
        },
        Test {
            name: "seq 1 MiB writes, flush after each",
            io: MIB,
            flush_every: 1,
            total: size / 16,
            random: false,
        },
        Test {
            name: "4 KiB random writes, flush every 256",
            io: KIB4,
            flush_every: 256,
            total: size / 16,
            random: true,
        },
        Test {
            name: "4 KiB random writes, flush after each",
            io: KIB4,
            flush_every: 1,
            total: (size / 256).max(64 * KIB4),
            random: true,
        },
    ];
    println!(
        "modes vs raw file in {} ({} MiB volumes)",
        dir.display(),
        size / MIB
    );
    let result = throughput(&dir, size, &tests).and_then(|()| if bench { recovery(&dir) } else { Ok(()) });
    let _ = std::fs::remove_dir_all(&dir);
    result
}
