//! Engine benchmark: the volume engine against raw `pread`/`pwrite` on a plain file in the same
//! directory, in the same run. Prints throughput (MB/s, 10^6 bytes) or IOPS for every test, the
//! ratio engine / raw and the targets of the brief. Figures and analysis: `docs/PERFORMANCE.md`.
//!
//! ```sh
//! cargo bench -p blockguard --bench engine          # or: bench/engine.sh
//! BENCH_SIZE=256M BENCH_RUNS=1 bench/engine.sh      # quick
//! ```
//!
//! Environment (sizes take binary units: `64M` = 64 MiB, `1G` = 1 GiB):
//! - `BENCH_SIZE`      bytes of the file and of the volume (default 1G; a multiple of 1 MiB).
//! - `BENCH_RUNS`      repetitions; the best of them is reported (default 3).
//! - `BENCH_RAND_OPS`  4 KiB random writes, and cold random reads (default 16384 = 64 MiB);
//!   hot random reads do four times as many (they are fast, so more are needed for a stable figure).
//! - `BENCH_DIR`       where the files go (default: `target/bench-engine.PID` in the repository);
//!   a private sub-directory is created there and removed afterwards.
//! - `BENCH_PROFILE`   the volume's tag profile (default `crc32c`; keyed profiles get a fixed
//!   benchmark key).
//! - `BENCH_TAG_ROOM`  bytes of each tag slot (8, 16 or 32; default: the profile's tag size), as
//!   `format --tag-room`: what room for a later re-tag to larger tags costs.
//! - `BENCH_COLD`      how to make the cache cold: `drop` (`echo 3 > /proc/sys/vm/drop_caches`,
//!   root only), `fadvise` (`posix_fadvise(POSIX_FADV_DONTNEED)` on the file, issued by GNU
//!   `dd iflag=nocache count=0`), or `off` (skip the cold tests). Default: `drop` when
//!   permitted, else `fadvise` when GNU dd is there, else `off`.
//!
//! Run without `--bench` (as `cargo test --benches` does) it is a quick smoke test: 8 MiB, one
//! run, no cold tests, unless the environment says otherwise.

use blockguard::blockguard_backend::{Backend, FileBackend, FileOptions};
use blockguard::tag::TagKey;
use blockguard::{FormatOptions, Mode, OpenOptions, Profile, Volume};
use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::fs::File;
use std::hint::black_box;
use std::io;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::atomic::{AtomicU64, Ordering::Relaxed};
use std::sync::Arc;
use std::time::Instant;

const KIB: u64 = 1 << 10;
const MIB: u64 = 1 << 20;
const GIB: u64 = 1 << 30;
/// Sequential request size.
const SEQ_CHUNK: u64 = MIB;
/// Sequential writes are made durable every this many bytes, and at the end.
const SEQ_SYNC_EVERY: u64 = 64 * MIB;
/// Random request size.
const RAND_IO: u64 = 4 * KIB;
/// Random writes are made durable every this many writes, and at the end.
const RAND_SYNC_EVERY: usize = 256;

type Res<T> = Result<T, Box<dyn std::error::Error>>;

// ---------------------------------------------------------------------------------------------
// Configuration

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Cold {
    DropCaches,
    Fadvise,
    Off,
}

impl Cold {
    fn describe(self) -> &'static str {
        match self {
            Cold::DropCaches => "echo 3 > /proc/sys/vm/drop_caches (root)",
            Cold::Fadvise => "posix_fadvise(DONTNEED) on the file, via `dd iflag=nocache count=0`",
            Cold::Off => "off (cold tests skipped)",
        }
    }
}

struct Config {
    /// The volume's tag profile (`BENCH_PROFILE`).
    profile: Profile,
    /// Its tag slots (`BENCH_TAG_ROOM`; `None`: the profile's tag size).
    tag_room: Option<usize>,
    size: u64,
    runs: usize,
    rand_ops: usize,
    hot_rand_ops: usize,
    cold: Cold,
    /// Private directory holding the files; removed at the end.
    dir: PathBuf,
    smoke: bool,
}

fn parse_size(s: &str) -> Option<u64> {
    let s = s.trim();
    let digits = s.find(|c: char| !c.is_ascii_digit()).unwrap_or(s.len());
    let n: u64 = s[..digits].parse().ok()?;
    let unit = match s[digits..].trim().to_ascii_lowercase().as_str() {
        "" | "b" => 1,
        "k" | "kb" | "kib" => KIB,
        "m" | "mb" | "mib" => MIB,
        "g" | "gb" | "gib" => GIB,
        "t" | "tb" | "tib" => GIB << 10,
        _ => return None,
    };
    n.checked_mul(unit)
}

fn env_or<T>(name: &str, default: T, parse: impl Fn(&str) -> Option<T>) -> Res<T> {
    match std::env::var(name) {
        Ok(v) if !v.trim().is_empty() => {
            parse(&v).ok_or_else(|| format!("{name}={v:?}: cannot parse").into())
        }
        _ => Ok(default),
    }
}

fn can_drop_caches() -> bool {
    std::fs::OpenOptions::new()
        .write(true)
        .open("/proc/sys/vm/drop_caches")
        .is_ok()
}

fn have_gnu_dd() -> bool {
    Command::new("dd")
        .arg("--version")
        .output()
        .map(|o| o.status.success() && String::from_utf8_lossy(&o.stdout).contains("coreutils"))
        .unwrap_or(false)
}

impl Config {
    fn from_env() -> Res<Config> {
        let smoke = !std::env::args().any(|a| a == "--bench");
        let size = env_or("BENCH_SIZE", if smoke { 8 * MIB } else { GIB }, parse_size)?;
        if size == 0 || size % SEQ_CHUNK != 0 {
            return Err(format!("BENCH_SIZE={size}: must be a positive multiple of 1 MiB").into());
        }
        let runs = env_or("BENCH_RUNS", if smoke { 1 } else { 3 }, |s| s.trim().parse().ok())?.max(1);
        let rand_ops = env_or("BENCH_RAND_OPS", if smoke { 512 } else { 16384 }, |s| {
            s.trim().parse().ok()
        })?
        .max(1);
        let cold = match std::env::var("BENCH_COLD").ok().as_deref().map(str::trim) {
            Some("drop") => Cold::DropCaches,
            Some("fadvise") => Cold::Fadvise,
            Some("off") => Cold::Off,
            Some("") | None if smoke => Cold::Off,
            Some("") | None if can_drop_caches() => Cold::DropCaches,
            Some("") | None if have_gnu_dd() => Cold::Fadvise,
            Some("") | None => Cold::Off,
            Some(other) => return Err(format!("BENCH_COLD={other:?}: expected drop, fadvise or off").into()),
        };
        let profile = match std::env::var("BENCH_PROFILE").ok().as_deref().map(str::trim) {
            None | Some("") => Profile::Crc32c,
            Some(name) => Profile::from_name(name)
                .ok_or_else(|| format!("BENCH_PROFILE={name:?}: no such tag profile"))?,
        };
        let tag_room = match std::env::var("BENCH_TAG_ROOM").ok().as_deref().map(str::trim) {
            None | Some("") => None,
            Some(n) => Some(
                n.parse::<usize>()
                    .map_err(|_| format!("BENCH_TAG_ROOM={n:?}: expected 8, 16 or 32"))?,
            ),
        };
        let parent = match std::env::var_os("BENCH_DIR") {
            Some(d) if !d.is_empty() => PathBuf::from(d),
            _ => Path::new(env!("CARGO_MANIFEST_DIR")).join("../../target"),
        };
        std::fs::create_dir_all(&parent)?;
        let dir = parent
            .canonicalize()?
            .join(format!("bench-engine.{}", std::process::id()));
        std::fs::create_dir(&dir)?;
        Ok(Config {
            profile,
            tag_room,
            size,
            runs,
            rand_ops,
            hot_rand_ops: rand_ops * 4,
            cold,
            dir,
            smoke,
        })
    }
}

/// Removes the private directory when the benchmark ends, however it ends.
struct DirGuard(PathBuf);

impl Drop for DirGuard {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

// ---------------------------------------------------------------------------------------------
// Measurement helpers

/// CPU time of the calling thread in seconds (user + system), from the scheduler's accounting.
fn thread_cpu() -> f64 {
    std::fs::read_to_string("/proc/thread-self/schedstat")
        .ok()
        .and_then(|s| s.split_whitespace().next().and_then(|n| n.parse::<u64>().ok()))
        .map_or(0.0, |ns| ns as f64 / 1e9)
}

/// Backend I/O counted by [`Counting`].
#[derive(Debug, Default)]
struct IoStats {
    reads: AtomicU64,
    read_bytes: AtomicU64,
    writes: AtomicU64,
    write_bytes: AtomicU64,
    flushes: AtomicU64,
    flush_ns: AtomicU64,
}

#[derive(Clone, Copy, Debug, Default)]
struct IoSnap {
    reads: u64,
    read_bytes: u64,
    writes: u64,
    write_bytes: u64,
    flushes: u64,
    flush_secs: f64,
}

impl IoStats {
    fn snap(&self) -> IoSnap {
        IoSnap {
            reads: self.reads.load(Relaxed),
            read_bytes: self.read_bytes.load(Relaxed),
            writes: self.writes.load(Relaxed),
            write_bytes: self.write_bytes.load(Relaxed),
            flushes: self.flushes.load(Relaxed),
            flush_secs: self.flush_ns.load(Relaxed) as f64 / 1e9,
        }
    }
}

impl IoSnap {
    fn since(self, before: IoSnap) -> IoSnap {
        IoSnap {
            reads: self.reads - before.reads,
            read_bytes: self.read_bytes - before.read_bytes,
            writes: self.writes - before.writes,
            write_bytes: self.write_bytes - before.write_bytes,
            flushes: self.flushes - before.flushes,
            flush_secs: self.flush_secs - before.flush_secs,
        }
    }
}

/// A [`FileBackend`] that counts the engine's system calls and the time spent in `fdatasync`
/// (a few relaxed atomic adds per call: noise next to a system call).
#[derive(Debug)]
struct Counting {
    inner: FileBackend,
    stats: Arc<IoStats>,
}

impl Backend for Counting {
    fn len(&self) -> u64 {
        self.inner.len()
    }
    fn read_at(&self, buf: &mut [u8], offset: u64) -> io::Result<()> {
        self.stats.reads.fetch_add(1, Relaxed);
        self.stats.read_bytes.fetch_add(buf.len() as u64, Relaxed);
        self.inner.read_at(buf, offset)
    }
    fn write_at(&self, buf: &[u8], offset: u64) -> io::Result<()> {
        self.stats.writes.fetch_add(1, Relaxed);
        self.stats.write_bytes.fetch_add(buf.len() as u64, Relaxed);
        self.inner.write_at(buf, offset)
    }
    fn start_writeback(&self, offset: u64, len: u64) -> io::Result<()> {
        self.inner.start_writeback(offset, len)
    }
    fn write_vectored_at(&self, bufs: &[&[u8]], offset: u64) -> io::Result<()> {
        let bytes: u64 = bufs.iter().map(|b| b.len() as u64).sum();
        self.stats.writes.fetch_add(1, Relaxed);
        self.stats.write_bytes.fetch_add(bytes, Relaxed);
        self.inner.write_vectored_at(bufs, offset)
    }
    fn flush(&self) -> io::Result<()> {
        let t = Instant::now();
        let r = self.inner.flush();
        self.stats.flushes.fetch_add(1, Relaxed);
        self.stats
            .flush_ns
            .fetch_add(t.elapsed().as_nanos() as u64, Relaxed);
        r
    }
    fn zero_range(&self, offset: u64, len: u64) -> io::Result<()> {
        self.inner.zero_range(offset, len)
    }
    fn zero_ranges(&self, offset: u64, len: u64) -> io::Result<Vec<std::ops::Range<u64>>> {
        self.inner.zero_ranges(offset, len)
    }
    fn alignment(&self) -> usize {
        self.inner.alignment()
    }
    fn is_read_only(&self) -> bool {
        self.inner.is_read_only()
    }
    fn name(&self) -> String {
        self.inner.name()
    }
}

/// One timed execution of one test.
#[derive(Clone, Copy, Debug)]
struct Sample {
    secs: f64,
    cpu: f64,
    bytes: u64,
    ops: u64,
    /// Backend calls of the engine (none for raw tests).
    io: Option<IoSnap>,
}

impl Sample {
    fn mbps(&self) -> f64 {
        self.bytes as f64 / self.secs / 1e6
    }
    fn iops(&self) -> f64 {
        self.ops as f64 / self.secs
    }
}

#[derive(Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Debug)]
enum Side {
    Raw,
    Dual,
    None,
}

#[derive(Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Debug)]
enum Test {
    SeqWrite,
    SeqReadHot,
    SeqReadCold,
    RandWrite,
    RandReadHot,
    RandReadCold,
}

impl Test {
    fn is_iops(self) -> bool {
        matches!(self, Test::RandWrite | Test::RandReadHot | Test::RandReadCold)
    }
}

#[derive(Default)]
struct Results(BTreeMap<(Side, Test), Vec<Sample>>);

impl Results {
    fn add(&mut self, side: Side, test: Test, s: Sample) {
        let rate = if test.is_iops() {
            format!("{:>10.0} IOPS", s.iops())
        } else {
            format!("{:>10.1} MB/s", s.mbps())
        };
        let mut line = format!(
            "  {:<5} {:<14} {rate}  {:>7.3} s  cpu {:>6.3} s",
            format!("{side:?}").to_lowercase(),
            format!("{test:?}"),
            s.secs,
            s.cpu
        );
        if let Some(io) = s.io {
            let _ = write!(
                line,
                "  [backend: {} reads, {} writes, {:.1} MB written, {} fdatasync = {:.3} s]",
                io.reads,
                io.writes,
                io.write_bytes as f64 / 1e6,
                io.flushes,
                io.flush_secs
            );
        }
        eprintln!("{line}");
        self.0.entry((side, test)).or_default().push(s);
    }

    /// Engine / raw ratio of each run (both sides of one run are measured minutes apart at
    /// most, so this pairing cancels part of the machine's drift): (min, max).
    fn ratio_range(&self, side: Side, test: Test) -> Option<(f64, f64)> {
        let rate = |s: &Sample| if test.is_iops() { s.iops() } else { s.mbps() };
        let raw = self.0.get(&(Side::Raw, test))?;
        let eng = self.0.get(&(side, test))?;
        raw.iter()
            .zip(eng)
            .map(|(r, e)| rate(e) / rate(r))
            .fold(None, |acc: Option<(f64, f64)>, x| {
                Some(acc.map_or((x, x), |(lo, hi)| (lo.min(x), hi.max(x))))
            })
    }

    /// The best run (highest rate) of a test.
    fn best(&self, side: Side, test: Test) -> Option<Sample> {
        let rate = |s: &Sample| if test.is_iops() { s.iops() } else { s.mbps() };
        self.0
            .get(&(side, test))?
            .iter()
            .copied()
            .max_by(|a, b| rate(a).total_cmp(&rate(b)))
    }
}

/// Deterministic pseudo-random numbers (splitmix64): the same offsets for raw and engine.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }

    /// `n` random 4 KiB-aligned offsets inside `size` bytes.
    fn offsets(seed: u64, n: usize, size: u64) -> Vec<u64> {
        let mut r = Rng(seed);
        let blocks = size / RAND_IO;
        (0..n).map(|_| r.next() % blocks * RAND_IO).collect()
    }
}

/// 1 MiB of incompressible data; each sequential chunk carries its index in its first 8 bytes
/// so reads can check they got the right chunk.
fn pattern() -> Vec<u8> {
    let mut r = Rng(0x5eed);
    let mut v = Vec::with_capacity(SEQ_CHUNK as usize);
    while v.len() < SEQ_CHUNK as usize {
        v.extend_from_slice(&r.next().to_le_bytes());
    }
    v
}

fn stamp(buf: &mut [u8], chunk: u64) {
    buf[..8].copy_from_slice(&chunk.to_le_bytes());
}

fn check_stamp(buf: &[u8], chunk: u64, what: &str) -> Res<()> {
    if buf[..8] != chunk.to_le_bytes() {
        return Err(format!("{what}: chunk {chunk} read back wrong data").into());
    }
    Ok(())
}

/// Commits the directory (and with it unlinks and their discards) so the next test starts clean.
fn sync_dir(dir: &Path) -> Res<()> {
    File::open(dir)?.sync_all()?;
    Ok(())
}

// ---------------------------------------------------------------------------------------------
// The tests

struct Bench {
    cfg: Config,
    data: Vec<u8>,
    rand_w: Vec<u64>,
    rand_r_hot: Vec<u64>,
    rand_r_cold: Vec<u64>,
    results: Results,
    load_start: String,
}

impl Bench {
    fn make_cold(&self, path: &Path) -> Res<()> {
        match self.cfg.cold {
            Cold::DropCaches => std::fs::write("/proc/sys/vm/drop_caches", "3")?,
            Cold::Fadvise => {
                let st = Command::new("dd")
                    .arg(format!("if={}", path.display()))
                    .args(["iflag=nocache", "count=0", "status=none"])
                    .status()?;
                if !st.success() {
                    return Err(format!("dd iflag=nocache on {} failed: {st}", path.display()).into());
                }
            }
            Cold::Off => {}
        }
        Ok(())
    }

    /// Puts the file of a test in the state the test assumes: evicted from the page cache for
    /// the cold tests (and the sequential writes), entirely cached for the others (a `drop_caches` for the other side's
    /// cold test evicts this side's file too). Not timed.
    fn prepare_cache(&self, test: Test, path: &Path) -> Res<()> {
        match test {
            // Every writer starts from the same, emptied page cache (with `drop`; the files
            // are new anyway).
            Test::SeqWrite if self.cfg.cold == Cold::DropCaches => self.make_cold(path),
            Test::SeqWrite => Ok(()),
            Test::SeqReadCold | Test::RandReadCold => self.make_cold(path),
            Test::SeqReadHot | Test::RandWrite | Test::RandReadHot => {
                let f = File::open(path)?;
                let mut buf = vec![0u8; SEQ_CHUNK as usize];
                let mut off = 0;
                loop {
                    let n = f.read_at(&mut buf, off)?;
                    if n == 0 {
                        return Ok(());
                    }
                    off += n as u64;
                }
            }
        }
    }

    /// Times `f`, which returns (bytes, ops) moved.
    fn time(&self, stats: Option<&IoStats>, f: impl FnOnce() -> Res<(u64, u64)>) -> Res<Sample> {
        let io0 = stats.map(IoStats::snap);
        let cpu0 = thread_cpu();
        let t = Instant::now();
        let (bytes, ops) = f()?;
        let secs = t.elapsed().as_secs_f64();
        let cpu = thread_cpu() - cpu0;
        let io = stats.zip(io0).map(|(s, before)| s.snap().since(before));
        Ok(Sample {
            secs,
            cpu,
            bytes,
            ops,
            io,
        })
    }

    // --- raw file ------------------------------------------------------------------------

    /// One raw test on `raw.img` (created afresh, sparse, by the sequential write).
    fn raw_test(&self, test: Test) -> Res<Sample> {
        let path = self.cfg.dir.join("raw.img");
        let size = self.cfg.size;
        let file = if test == Test::SeqWrite {
            let _ = std::fs::remove_file(&path);
            let f = std::fs::OpenOptions::new()
                .read(true)
                .write(true)
                .create_new(true)
                .open(&path)?;
            f.set_len(size)?; // sparse, like a freshly formatted volume file
            f
        } else {
            std::fs::OpenOptions::new().read(true).write(true).open(&path)?
        };
        let stats = IoStats::default();
        let file = RawFile { file, stats: &stats };
        let st = Some(&stats);
        self.prepare_cache(test, &path)?;
        let mut buf = self.data.clone();
        let mut small = vec![0u8; RAND_IO as usize];
        match test {
            Test::SeqWrite => self.time(st, || {
                let mut off = 0;
                while off < size {
                    stamp(&mut buf, off / SEQ_CHUNK);
                    file.write_at(&buf, off)?;
                    off += SEQ_CHUNK;
                    if off % SEQ_SYNC_EVERY == 0 || off == size {
                        file.sync()?;
                    }
                }
                Ok((size, size / SEQ_CHUNK))
            }),
            Test::SeqReadHot | Test::SeqReadCold => self.time(st, || raw_seq_read(&file, size, &mut buf)),
            Test::RandWrite => self.time(st, || {
                let block = &self.data[..RAND_IO as usize];
                for (i, &off) in self.rand_w.iter().enumerate() {
                    file.write_at(block, off)?;
                    if (i + 1) % RAND_SYNC_EVERY == 0 {
                        file.sync()?;
                    }
                }
                file.sync()?;
                Ok((self.rand_w.len() as u64 * RAND_IO, self.rand_w.len() as u64))
            }),
            Test::RandReadHot => self.time(st, || raw_rand_read(&file, &self.rand_r_hot, &mut small)),
            Test::RandReadCold => self.time(st, || raw_rand_read(&file, &self.rand_r_cold, &mut small)),
        }
    }

    // --- engine ----------------------------------------------------------------------------

    fn open_volume(&self, path: &Path, stats: &Arc<IoStats>) -> Res<Volume> {
        let inner = FileBackend::open(path, &FileOptions::default())?;
        let backend = Arc::new(Counting {
            inner,
            stats: stats.clone(),
        });
        let opts = OpenOptions {
            key: self.key(),
            ..OpenOptions::default()
        };
        Ok(Volume::open(backend, &opts)?)
    }

    /// The key of a keyed profile: fixed, it protects nothing here.
    fn key(&self) -> Option<TagKey> {
        self.cfg
            .profile
            .is_keyed()
            .then(|| TagKey::from_bytes(&[0x5A; 32]).unwrap_or_else(|_| unreachable!("32 bytes")))
    }

    fn format_volume(&self, path: &Path, mode: Mode, stats: &Arc<IoStats>) -> Res<Volume> {
        let _ = std::fs::remove_file(path);
        let mut opts = FormatOptions::with_size(self.cfg.size);
        opts.mode = mode;
        opts.profile = self.cfg.profile;
        opts.tag_room = self.cfg.tag_room;
        opts.key = self.key();
        let inner = FileBackend::create(path, opts.backing_len()?, &FileOptions::default())?;
        let backend = Arc::new(Counting {
            inner,
            stats: stats.clone(),
        });
        Ok(Volume::format(backend, &opts)?)
    }

    /// One engine test. The sequential write formats `MODE.bgv` afresh (format is not timed);
    /// every other test opens the volume again, so its metadata cache starts empty, as the raw
    /// test's view of its file does.
    fn engine_test(&self, mode: Mode, test: Test) -> Res<Sample> {
        let name = match mode {
            Mode::Dual => "dual.bgv",
            _ => "none.bgv",
        };
        let path = self.cfg.dir.join(name);
        let size = self.cfg.size;
        let stats = Arc::new(IoStats::default());
        self.prepare_cache(test, &path)?;
        let vol = if test == Test::SeqWrite {
            self.format_volume(&path, mode, &stats)?
        } else {
            self.open_volume(&path, &stats)?
        };
        let st = Some(&*stats);
        let mut buf = self.data.clone();
        let mut small = vec![0u8; RAND_IO as usize];
        let sample = match test {
            Test::SeqWrite => self.time(st, || {
                let mut off = 0;
                while off < size {
                    stamp(&mut buf, off / SEQ_CHUNK);
                    vol.write_at(&buf, off)?;
                    off += SEQ_CHUNK;
                    if off % SEQ_SYNC_EVERY == 0 || off == size {
                        vol.flush()?;
                    }
                }
                Ok((size, size / SEQ_CHUNK))
            }),
            Test::SeqReadHot | Test::SeqReadCold => self.time(st, || {
                let mut off = 0;
                while off < size {
                    vol.read_at(&mut buf, off)?;
                    check_stamp(&buf, off / SEQ_CHUNK, "engine sequential read")?;
                    off += SEQ_CHUNK;
                }
                black_box(&buf);
                Ok((size, size / SEQ_CHUNK))
            }),
            Test::RandWrite => self.time(st, || {
                let block = &self.data[..RAND_IO as usize];
                for (i, &off) in self.rand_w.iter().enumerate() {
                    vol.write_at(block, off)?;
                    if (i + 1) % RAND_SYNC_EVERY == 0 {
                        vol.flush()?;
                    }
                }
                vol.flush()?;
                Ok((self.rand_w.len() as u64 * RAND_IO, self.rand_w.len() as u64))
            }),
            Test::RandReadHot | Test::RandReadCold => {
                let offsets = if test == Test::RandReadHot {
                    &self.rand_r_hot
                } else {
                    &self.rand_r_cold
                };
                self.time(st, || {
                    for &off in offsets {
                        vol.read_at(&mut small, off)?;
                        black_box(&small);
                    }
                    Ok((offsets.len() as u64 * RAND_IO, offsets.len() as u64))
                })
            }
        }?;
        vol.close()?;
        Ok(sample)
    }

    /// One run: every test, each measured on the raw file and on the `dual` volume back to
    /// back (in alternating order from run to run), so both see the same state of the shared
    /// machine; the sequential write also on a `none` volume, the three in rotating order.
    fn run(&mut self, run: usize) -> Res<()> {
        let order = if run.is_multiple_of(2) {
            vec![Side::Raw, Side::Dual]
        } else {
            vec![Side::Dual, Side::Raw]
        };
        // The three sequential writes take turns at going first: on this VM, writing into page
        // cache memory the guest has not touched recently is markedly slower, which otherwise
        // penalises whichever side writes last.
        let mut writers = vec![Side::Raw, Side::Dual, Side::None];
        writers.rotate_left(run % 3);
        let tests = [
            Test::SeqWrite,
            Test::SeqReadHot,
            Test::SeqReadCold,
            Test::RandWrite,
            Test::RandReadHot,
            Test::RandReadCold,
        ];
        for test in tests {
            if matches!(test, Test::SeqReadCold | Test::RandReadCold) && self.cfg.cold == Cold::Off {
                continue;
            }
            let sides = if test == Test::SeqWrite { &writers } else { &order };
            for &side in sides {
                let s = match side {
                    Side::Raw => self.raw_test(test)?,
                    Side::Dual => self.engine_test(Mode::Dual, test)?,
                    Side::None => self.engine_test(Mode::None, test)?,
                };
                self.results.add(side, test, s);
            }
            if test == Test::SeqWrite {
                std::fs::remove_file(self.cfg.dir.join("none.bgv"))?;
                sync_dir(&self.cfg.dir)?;
            }
        }
        std::fs::remove_file(self.cfg.dir.join("raw.img"))?;
        std::fs::remove_file(self.cfg.dir.join("dual.bgv"))?;
        sync_dir(&self.cfg.dir)
    }

    // --- report ----------------------------------------------------------------------------

    fn report(&self) -> String {
        let r = &self.results;
        let mut out = String::new();
        let size = self.cfg.size;
        let _ = writeln!(
            out,
            "blockguard engine vs raw file, best of {} run(s)",
            self.cfg.runs
        );
        let _ = writeln!(
            out,
            "dir {} ({}), size {} MiB, random I/O {} x 4 KiB (hot reads {}), cold cache: {}",
            self.cfg.dir.display(),
            fs_type(&self.cfg.dir),
            size / MIB,
            self.cfg.rand_ops,
            self.cfg.hot_rand_ops,
            self.cfg.cold.describe()
        );
        let _ = writeln!(
            out,
            "engine: FormatOptions::with_size (4096-byte blocks, {}{}), OpenOptions::default (stage {} MiB)",
            self.cfg.profile,
            self.cfg
                .tag_room
                .map_or(String::new(), |r| format!(" in {r}-byte tag slots")),
            OpenOptions::default().stage_bytes as u64 / MIB
        );
        let _ = writeln!(out);
        let _ = writeln!(
            out,
            "load average (1/5/15 min): {} at start, {} at end",
            self.load_start,
            load_average()
        );
        let _ = writeln!(out);
        let _ = writeln!(
            out,
            "{:<38} {:>14} {:>14} {:>7} {:>13} {:>8}  verdict",
            "test (best of runs)", "raw", "engine", "ratio", "run ratios", "target"
        );
        let rows: [(&str, Side, Test, Option<f64>); 7] = [
            (
                "seq write 1M, sync/64M   (dual)",
                Side::Dual,
                Test::SeqWrite,
                Some(0.9),
            ),
            (
                "seq write 1M, sync/64M   (none)",
                Side::None,
                Test::SeqWrite,
                None,
            ),
            (
                "seq read 1M, hot cache   (verified)",
                Side::Dual,
                Test::SeqReadHot,
                Some(0.95),
            ),
            (
                "seq read 1M, cold cache  (verified)",
                Side::Dual,
                Test::SeqReadCold,
                Some(0.95),
            ),
            (
                "rand write 4K, sync/256  (dual)",
                Side::Dual,
                Test::RandWrite,
                Some(0.7),
            ),
            (
                "rand read 4K, hot cache  (verified)",
                Side::Dual,
                Test::RandReadHot,
                None,
            ),
            (
                "rand read 4K, cold cache (verified)",
                Side::Dual,
                Test::RandReadCold,
                None,
            ),
        ];
        for (name, side, test, target) in rows {
            let (Some(raw), Some(eng)) = (r.best(Side::Raw, test), r.best(side, test)) else {
                let _ = writeln!(out, "{name:<38} {:>14} {:>14}", "skipped", "skipped");
                continue;
            };
            let (rv, ev, unit) = if test.is_iops() {
                (raw.iops(), eng.iops(), "IOPS")
            } else {
                (raw.mbps(), eng.mbps(), "MB/s")
            };
            let ratio = ev / rv;
            let (t, verdict) = match target {
                Some(t) if ratio >= t => (format!(">= {t:.2}"), "ok"),
                Some(t) => (format!(">= {t:.2}"), "BELOW TARGET"),
                None => ("-".to_string(), ""),
            };
            let fmt = |v: f64| {
                if unit == "IOPS" {
                    format!("{v:.0} {unit}")
                } else {
                    format!("{v:.1} {unit}")
                }
            };
            let range = r
                .ratio_range(side, test)
                .map_or_else(String::new, |(lo, hi)| format!("{lo:.2}-{hi:.2}"));
            let _ = writeln!(
                out,
                "{name:<38} {:>14} {:>14} {ratio:>7.3} {range:>13} {t:>8}  {verdict}",
                fmt(rv),
                fmt(ev)
            );
        }
        let _ = writeln!(out);
        let _ = writeln!(
            out,
            "best runs in detail (cpu: user+system time of the benchmark thread; system calls counted at the backend):"
        );
        for (side, test) in [
            (Side::Dual, Test::SeqWrite),
            (Side::None, Test::SeqWrite),
            (Side::Dual, Test::SeqReadHot),
            (Side::Dual, Test::SeqReadCold),
            (Side::Dual, Test::RandWrite),
            (Side::Dual, Test::RandReadHot),
            (Side::Dual, Test::RandReadCold),
        ] {
            let (Some(s), Some(raw)) = (r.best(side, test), r.best(Side::Raw, test)) else {
                continue;
            };
            let (Some(io), Some(rio)) = (s.io, raw.io) else {
                continue;
            };
            let _ = writeln!(
                out,
                "  {:<4} {:<12} wall {:>6.3} s (raw {:>6.3}), cpu {:>6.3} s (raw {:>6.3}), fdatasync {:>3} = {:>6.3} s \
                 (raw {:>3} = {:>6.3} s); {:>6} reads {:>7.1} MB, {:>6} writes {:>7.1} MB (raw {} / {})",
                format!("{side:?}").to_lowercase(),
                format!("{test:?}"),
                s.secs,
                raw.secs,
                s.cpu,
                raw.cpu,
                io.flushes,
                io.flush_secs,
                rio.flushes,
                rio.flush_secs,
                io.reads,
                io.read_bytes as f64 / 1e6,
                io.writes,
                io.write_bytes as f64 / 1e6,
                rio.reads,
                rio.writes,
            );
        }
        out
    }
}

/// The 1, 5 and 15 minute load averages: how busy the shared machine was.
fn load_average() -> String {
    std::fs::read_to_string("/proc/loadavg")
        .map(|s| s.split_whitespace().take(3).collect::<Vec<_>>().join(" "))
        .unwrap_or_else(|_| "unknown".into())
}

/// The raw side: a plain file, `pread`/`pwrite`/`fdatasync`, counted like the engine's backend.
struct RawFile<'a> {
    file: File,
    stats: &'a IoStats,
}

impl RawFile<'_> {
    fn read_at(&self, buf: &mut [u8], off: u64) -> io::Result<()> {
        self.stats.reads.fetch_add(1, Relaxed);
        self.stats.read_bytes.fetch_add(buf.len() as u64, Relaxed);
        self.file.read_exact_at(buf, off)
    }
    fn write_at(&self, buf: &[u8], off: u64) -> io::Result<()> {
        self.stats.writes.fetch_add(1, Relaxed);
        self.stats.write_bytes.fetch_add(buf.len() as u64, Relaxed);
        self.file.write_all_at(buf, off)
    }
    fn sync(&self) -> io::Result<()> {
        let t = Instant::now();
        let r = self.file.sync_data();
        self.stats.flushes.fetch_add(1, Relaxed);
        self.stats
            .flush_ns
            .fetch_add(t.elapsed().as_nanos() as u64, Relaxed);
        r
    }
}

fn raw_seq_read(file: &RawFile<'_>, size: u64, buf: &mut [u8]) -> Res<(u64, u64)> {
    let mut off = 0;
    while off < size {
        file.read_at(buf, off)?;
        check_stamp(buf, off / SEQ_CHUNK, "raw sequential read")?;
        off += SEQ_CHUNK;
    }
    black_box(&buf);
    Ok((size, size / SEQ_CHUNK))
}

fn raw_rand_read(file: &RawFile<'_>, offsets: &[u64], buf: &mut [u8]) -> Res<(u64, u64)> {
    for &off in offsets {
        file.read_at(buf, off)?;
        black_box(&buf);
    }
    Ok((offsets.len() as u64 * RAND_IO, offsets.len() as u64))
}

/// Filesystem type of the mount holding `dir`, from /proc/self/mountinfo.
fn fs_type(dir: &Path) -> String {
    let Ok(info) = std::fs::read_to_string("/proc/self/mountinfo") else {
        return "unknown fs".into();
    };
    let unescape = |s: &str| {
        s.replace("\\040", " ")
            .replace("\\011", "\t")
            .replace("\\134", "\\")
    };
    let mut best: Option<(usize, String)> = None;
    for line in info.lines() {
        let f: Vec<&str> = line.split(' ').collect();
        let Some(sep) = f.iter().position(|&x| x == "-") else {
            continue;
        };
        let (Some(mp), Some(fstype), Some(src)) = (f.get(4), f.get(sep + 1), f.get(sep + 2)) else {
            continue;
        };
        let mp = unescape(mp);
        if dir.starts_with(&mp) && best.as_ref().is_none_or(|(l, _)| mp.len() >= *l) {
            best = Some((mp.len(), format!("{fstype} on {src}, mounted at {mp}")));
        }
    }
    best.map_or_else(|| "unknown fs".into(), |(_, s)| s)
}

fn main() -> Res<()> {
    let cfg = Config::from_env()?;
    let _guard = DirGuard(cfg.dir.clone());
    if cfg.smoke {
        eprintln!("engine bench: smoke mode (run with `cargo bench` for real figures)");
    }
    eprintln!(
        "engine bench: {} MiB in {} ({}), {} run(s), cold cache: {}",
        cfg.size / MIB,
        cfg.dir.display(),
        fs_type(&cfg.dir),
        cfg.runs,
        cfg.cold.describe()
    );
    let mut bench = Bench {
        data: pattern(),
        rand_w: Rng::offsets(1, cfg.rand_ops, cfg.size),
        rand_r_hot: Rng::offsets(2, cfg.hot_rand_ops, cfg.size),
        rand_r_cold: Rng::offsets(3, cfg.rand_ops, cfg.size),
        results: Results::default(),
        load_start: load_average(),
        cfg,
    };
    for run in 0..bench.cfg.runs {
        eprintln!("run {}/{}", run + 1, bench.cfg.runs);
        bench.run(run)?;
    }
    println!();
    print!("{}", bench.report());
    Ok(())
}
