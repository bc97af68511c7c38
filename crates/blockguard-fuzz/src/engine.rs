//! Target `engine_model`: a model-based test of the volume engine through crashes.
//!
//! The input decodes (see [`Setup`] and [`Op`]) to a small `dual` volume (512 or 4096-byte
//! blocks, groups of a few blocks, a tiny stage so commits happen mid-sequence) on the
//! fault-injecting backend, and a sequence of operations: aligned and unaligned writes,
//! zeroing, discards, reads, flushes, `recover`, clean close-and-reopen (read-write or
//! read-only), and crashes. A crash picks a point of the backend's history since the last
//! crash (now, or earlier: in the middle of a commit, of a close, or of the recovery that
//! the last reopen ran), builds a disk image a power loss there could leave (the durable
//! image alone, every unflushed write, a seeded random subset in random order, or that torn
//! at 512-byte granularity), and reopens it read-write (recovery at open), read-only, or
//! read-write followed by `recover`.
//!
//! Checked against a byte model of the volume:
//! - within a session, every read returns exactly the model's bytes, and every operation
//!   succeeds (a write to a read-only volume is refused as such);
//! - after a clean close and reopen, every byte equals the model;
//! - after a crash, every block reads as the version the last completed flush before the
//!   crash point made durable or a version written after that flush by an operation that had
//!   started (never anything else: G2), and a block fails verification only if it was written
//!   since that flush and its data on disk is neither that durable version nor a complete
//!   version written since (G1; see `docs/CONSISTENCY.md`) — an older version a torn write
//!   completed must fail; no metadata sector or map sector is damaged; recovery finds no
//!   damage;
//! - a block that failed verification after a crash keeps failing until it is rewritten (the
//!   model rewrites such blocks whole as soon as a session is read-write), and at the end
//!   `check_blocks` reports exactly those blocks.
//!
//! The same properties in long, exhaustive form are `crates/blockguard/tests/crash.rs`; this
//! target explores sequences (crash after crash, read-only sessions, reopen cycles, crashes
//! inside recovery) that a fuzzer chooses.

use arbitrary::{Arbitrary, Unstructured};
use blockguard::blockguard_backend::{Backend, CrashState, FaultBackend};
use blockguard::{Error, FormatOptions, Geometry, Mode, OpenOptions, RecoverOptions, Volume};
use rand::SeedableRng;
use rand_chacha::ChaCha8Rng;
use std::collections::HashSet;
use std::hash::{DefaultHasher, Hasher};
use std::sync::Arc;
use std::time::Duration;

use crate::usize_of;

/// Longest input worth decoding (more operations than [`MAX_OPS`] are ignored).
pub const MAX_LEN: usize = 1024;

/// Operations per input at most: keeps one input to a few milliseconds.
pub const MAX_OPS: usize = 64;

/// The volume and how it is opened. Encoded as 4 bytes.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Setup {
    /// 4096-byte blocks (else 512).
    pub large_blocks: bool,
    /// No metadata cache: groups are evicted and reloaded all the time.
    pub tiny_cache: bool,
    /// Clear the dirty-groups map at every flush (else after 2 s: never, in a run).
    pub clear_dirty_at_flush: bool,
    /// Data blocks: 1 + this modulo 64 (512-byte blocks) or 40 (4096-byte blocks).
    pub blocks: u8,
    /// Blocks per group: 1 + this modulo 80, capped by what a metadata block holds.
    pub group_blocks: u8,
    /// Stage size in blocks: 1 + this modulo 8.
    pub stage_blocks: u8,
}

/// What a crash leaves on disk, of the writes issued since the last completed flush.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Image {
    /// None of them.
    Durable,
    /// All of them, in issue order.
    All,
    /// A random subset in a random order, drawn from a seed.
    Subset(u32),
    /// A random subset in a random order, each possibly torn at 512-byte granularity.
    Torn(u32),
}

/// How the crash image is opened.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum After {
    /// Read-write: recovery at open.
    ReadWrite,
    /// Read-only: no recovery, lenient reads.
    ReadOnly,
    /// Read-write, then `Volume::recover`.
    Recover,
}

/// One operation. Offsets and lengths are reduced modulo the volume, so every value of a
/// field names a range inside it: no input is spent on ranges the engine refuses.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Op {
    /// Whole blocks, with a pattern.
    Write {
        /// First block: this modulo the number of blocks.
        block: u16,
        /// Blocks written: 1 + this modulo 4, or modulo the blocks left from `block` if fewer.
        count: u8,
        /// Varies the written pattern (mixed with the write's serial number and position).
        fill: u8,
        /// Hands the buffer over with `write_owned` rather than `write_at`: the engine's two
        /// write paths.
        owned: bool,
    },
    /// Any byte range, up to three blocks long.
    WriteAt {
        /// First byte: this modulo the volume's size.
        offset: u32,
        /// Bytes: 1 + this modulo the rest of the volume, or modulo three blocks if less.
        len: u16,
        /// Varies the written pattern, as for [`Op::Write`].
        fill: u8,
    },
    /// `write_zeroes` of any byte range.
    Zero {
        /// First byte: this modulo the volume's size.
        offset: u32,
        /// Bytes: 1 + this modulo the rest of the volume, or modulo four blocks if less.
        len: u16,
    },
    /// `discard` of any byte range.
    Discard {
        /// First byte: this modulo the volume's size.
        offset: u32,
        /// Bytes: 1 + this modulo the rest of the volume, or modulo four blocks if less.
        len: u16,
    },
    /// A read, compared with the model.
    Read {
        /// First byte: this modulo the volume's size.
        offset: u32,
        /// Bytes: 1 + this modulo the rest of the volume, or modulo eight blocks if less.
        len: u16,
    },
    /// `flush`.
    Flush,
    /// Power loss, then the volume opened again from what is left on disk.
    Crash {
        /// The crash point: after this many events of the backend's history since the last
        /// crash, modulo its length + 1 (so mid-commit, mid-close or mid-recovery); `None`:
        /// now, after all of them.
        at: Option<u16>,
        /// What the writes not yet flushed at that point leave on disk.
        image: Image,
        /// How the crash image is opened.
        after: After,
    },
    /// Clean close, then open again.
    Reopen {
        /// Open read-only (writes are then refused) rather than read-write.
        read_only: bool,
    },
    /// `Volume::recover` (read-write sessions only).
    Recover,
}

/// Operation kinds by tag byte modulo the table's length: the repeats are weights.
const KINDS: [u8; 16] = [0, 0, 0, 1, 1, 2, 3, 4, 4, 5, 5, 6, 6, 6, 7, 8];

fn byte(u: &mut Unstructured<'_>) -> arbitrary::Result<u8> {
    u8::arbitrary(u)
}

impl<'a> Arbitrary<'a> for Setup {
    fn arbitrary(u: &mut Unstructured<'a>) -> arbitrary::Result<Self> {
        let flags = byte(u)?;
        Ok(Setup {
            large_blocks: flags & 1 != 0,
            tiny_cache: flags & 2 != 0,
            clear_dirty_at_flush: flags & 4 != 0,
            blocks: byte(u)?,
            group_blocks: byte(u)?,
            stage_blocks: byte(u)?,
        })
    }
}

impl<'a> Arbitrary<'a> for Op {
    fn arbitrary(u: &mut Unstructured<'a>) -> arbitrary::Result<Self> {
        let kind = KINDS[usize::from(byte(u)?) % KINDS.len()];
        Ok(match kind {
            0 => Op::Write {
                block: u.arbitrary()?,
                count: byte(u)?,
                fill: byte(u)?,
                owned: byte(u)? & 1 != 0,
            },
            1 => Op::WriteAt {
                offset: u.arbitrary()?,
                len: u.arbitrary()?,
                fill: byte(u)?,
            },
            2 => Op::Zero {
                offset: u.arbitrary()?,
                len: u.arbitrary()?,
            },
            3 => Op::Discard {
                offset: u.arbitrary()?,
                len: u.arbitrary()?,
            },
            4 => Op::Read {
                offset: u.arbitrary()?,
                len: u.arbitrary()?,
            },
            5 => Op::Flush,
            6 => {
                let how = byte(u)?;
                let at: u16 = u.arbitrary()?;
                let seed: u32 = u.arbitrary()?;
                Op::Crash {
                    at: (how & 1 != 0).then_some(at),
                    image: match (how >> 1) % 4 {
                        0 => Image::Durable,
                        1 => Image::All,
                        2 => Image::Subset(seed),
                        _ => Image::Torn(seed),
                    },
                    after: match (how >> 3) % 3 {
                        0 => After::ReadWrite,
                        1 => After::ReadOnly,
                        _ => After::Recover,
                    },
                }
            }
            7 => Op::Reopen {
                read_only: byte(u)? & 1 != 0,
            },
            _ => Op::Recover,
        })
    }
}

impl Setup {
    /// The bytes that decode to `self`.
    pub fn encode(self, out: &mut Vec<u8>) {
        out.push(
            u8::from(self.large_blocks)
                | u8::from(self.tiny_cache) << 1
                | u8::from(self.clear_dirty_at_flush) << 2,
        );
        out.extend([self.blocks, self.group_blocks, self.stage_blocks]);
    }
}

/// The tag byte that decodes to operation kind `k`: its first entry in [`KINDS`].
fn tag_of(k: u8) -> u8 {
    let tag = KINDS.iter().position(|&x| x == k).expect("every kind has a tag");
    u8::try_from(tag).expect("KINDS has fewer than 256 entries")
}

impl Op {
    /// The bytes that decode to `self`.
    pub fn encode(&self, out: &mut Vec<u8>) {
        match *self {
            Op::Write {
                block,
                count,
                fill,
                owned,
            } => {
                out.push(tag_of(0));
                out.extend(block.to_le_bytes());
                out.extend([count, fill, u8::from(owned)]);
            }
            Op::WriteAt { offset, len, fill } => {
                out.push(tag_of(1));
                out.extend(offset.to_le_bytes());
                out.extend(len.to_le_bytes());
                out.push(fill);
            }
            Op::Zero { offset, len } | Op::Discard { offset, len } | Op::Read { offset, len } => {
                out.push(tag_of(match self {
                    Op::Zero { .. } => 2,
                    Op::Discard { .. } => 3,
                    _ => 4,
                }));
                out.extend(offset.to_le_bytes());
                out.extend(len.to_le_bytes());
            }
            Op::Flush => out.push(tag_of(5)),
            Op::Crash { at, image, after } => {
                let (i, seed) = match image {
                    Image::Durable => (0, 0),
                    Image::All => (1, 0),
                    Image::Subset(s) => (2, s),
                    Image::Torn(s) => (3, s),
                };
                let a = match after {
                    After::ReadWrite => 0,
                    After::ReadOnly => 1,
                    After::Recover => 2,
                };
                out.push(tag_of(6));
                out.push(u8::from(at.is_some()) | i << 1 | a << 3);
                out.extend(at.unwrap_or(0).to_le_bytes());
                out.extend(seed.to_le_bytes());
            }
            Op::Reopen { read_only } => out.extend([tag_of(7), u8::from(read_only)]),
            Op::Recover => out.push(tag_of(8)),
        }
    }
}

/// Decodes an input: the setup, then operations until the bytes run out (at most
/// [`MAX_OPS`]).
///
/// # Panics
///
/// Never: every field has a fixed size, and reading past the end of the input yields zeros
/// rather than an error.
pub fn decode(data: &[u8]) -> (Setup, Vec<Op>) {
    let mut u = Unstructured::new(data);
    // Reading past the end yields zeros, never an error, for these fixed-size fields.
    let setup = Setup::arbitrary(&mut u).expect("fixed-size fields always decode");
    let mut ops = Vec::new();
    while !u.is_empty() && ops.len() < MAX_OPS {
        ops.push(Op::arbitrary(&mut u).expect("fixed-size fields always decode"));
    }
    (setup, ops)
}

/// The bytes that decode to `setup` and `ops`.
pub fn encode(setup: Setup, ops: &[Op]) -> Vec<u8> {
    let mut out = Vec::new();
    setup.encode(&mut out);
    for op in ops {
        op.encode(&mut out);
    }
    out
}

/// The target: the engine in `dual` mode must pass every check.
///
/// # Panics
///
/// When the engine violates a property (see the module doc): that is what the fuzzer looks
/// for. The message names the property, the operation and the whole decoded input.
pub fn run(data: &[u8]) -> &'static str {
    match simulate(data, Mode::Dual) {
        Ok(label) => label,
        Err(violation) => panic!("engine_model: {violation}"),
    }
}

/// Runs the input against a volume in `mode`; `Err` describes the first violated property.
/// (`none` mode has no crash protection: there the checks are expected to fail, which shows
/// they can.)
pub fn simulate(data: &[u8], mode: Mode) -> Result<&'static str, String> {
    let (setup, ops) = decode(data);
    let context = |i: usize, e: String| {
        format!(
            "{e}\n  at operation {i} of {}: {:?}\n  {setup:?}\n  operations: {ops:?}",
            ops.len(),
            ops.get(i)
        )
    };
    let mut sim = Sim::new(setup, mode).map_err(|e| format!("{e}\n  setting up {setup:?}"))?;
    for (i, op) in ops.iter().enumerate() {
        let seen = sim.events();
        if sim.trace {
            eprintln!("op {i}: {op:?}");
        }
        let result = sim.apply(op);
        if sim.trace && !matches!(op, Op::Crash { .. }) {
            sim.trace_events(seen);
        }
        result.map_err(|e| context(i, e))?;
    }
    sim.finish().map_err(|e| context(ops.len(), e))?;
    Ok(if sim.torn_blocks > 0 {
        "crashed: a block torn"
    } else if sim.crashes > 0 {
        "crashed"
    } else if ops.is_empty() {
        "no operation"
    } else {
        "no crash"
    })
}

/// A content fingerprint of a block version.
fn h(data: &[u8]) -> u64 {
    let mut s = DefaultHasher::new();
    s.write(data);
    s.finish()
}

/// Content of a write: varies with the position and the write, so a misplaced, stale or
/// mixed-up block is told apart from the right one.
fn pattern(fill: u8, serial: u32, offset: u64, len: u64) -> Vec<u8> {
    let [serial0, serial1, ..] = serial.to_le_bytes();
    let salt = fill ^ serial0.wrapping_mul(29) ^ serial1;
    (0..len)
        .map(|i| u8::try_from((offset + i) % 251).expect("below 251") ^ salt)
        .collect()
}

/// One operation, as the crash model needs it.
struct Step {
    /// Backend events when it started and when it returned.
    start: usize,
    end: usize,
    /// It made every earlier write durable (flush, clean close, recover).
    flush: bool,
    /// `(block, fingerprint)` of every block it changed, after the change.
    touched: Vec<(u64, u64)>,
}

/// What a block may read as after a crash.
struct Allowed {
    /// The version the last completed flush made durable (`None`: the block failed
    /// verification before this backend's history began and was not rewritten since).
    durable: Option<u64>,
    /// Versions written after that flush by operations started before the crash.
    since: Vec<u64>,
}

/// What a write does.
#[derive(Clone, Copy)]
enum Write {
    Data { fill: u8, owned: bool },
    Zeroes,
    Discard,
}

struct Sim {
    bs: u64,
    blocks: u64,
    geometry: Geometry,
    open: OpenOptions,
    backend: Arc<FaultBackend>,
    vol: Option<Volume>,
    read_only: bool,
    /// The volume's bytes, as far as known.
    model: Vec<u8>,
    /// Blocks that failed verification after a crash and were not rewritten since (their
    /// bytes in `model` are meaningless).
    poisoned: Vec<bool>,
    /// Fingerprints of every version of every block that reached a backend whole (in one
    /// write covering the block) or was found on disk: what "complete" means for G1. A torn
    /// write can leave bytes equal to a version that only ever existed in memory (a block
    /// written twice before a commit); such bytes are torn, not a complete version.
    ever: Vec<HashSet<u64>>,
    /// Each block's fingerprint when the current backend's history began.
    base: Vec<Option<u64>>,
    steps: Vec<Step>,
    serial: u32,
    crashes: u32,
    torn_blocks: u32,
    /// Print every operation and the I/O it did (`BLOCKGUARD_FUZZ_TRACE` set).
    trace: bool,
}

impl Sim {
    fn new(setup: Setup, mode: Mode) -> Result<Sim, String> {
        let bs: u32 = if setup.large_blocks { 4096 } else { 512 };
        let blocks = 1 + u64::from(setup.blocks) % if setup.large_blocks { 40 } else { 64 };
        let max_group = Geometry::tags_per_meta(bs, 8).map_err(|e| e.to_string())?;
        let group_blocks = 1 + u32::from(setup.group_blocks) % max_group.min(80);
        let mut opts = FormatOptions::with_size(u64::from(bs) * blocks);
        opts.block_size = bs;
        opts.mode = mode;
        opts.group_blocks = Some(group_blocks);
        opts.uuid = Some([0x5a; 16]);
        let len = opts.backing_len().map_err(|e| e.to_string())?;
        let backend = Arc::new(FaultBackend::new(len).map_err(|e| e.to_string())?);
        let vol = Volume::format(backend.clone(), &opts).map_err(|e| format!("format: {e}"))?;
        let geometry = *vol.geometry();
        vol.close().map_err(|e| format!("close after format: {e}"))?;
        backend.flush().map_err(|e| e.to_string())?;
        backend.forget_history();
        let open = OpenOptions {
            read_only: false,
            cache_bytes: if setup.tiny_cache { 0 } else { 1 << 20 },
            stage_bytes: bs as usize * (1 + usize::from(setup.stage_blocks) % 8),
            // Deterministic I/O order: a crash point names the same state on every run.
            background_commit: false,
            error_policy: None,
            key: None,
            retag_key: None,
            retag_to: None,
            dirty_clear_interval: if setup.clear_dirty_at_flush {
                Duration::ZERO
            } else {
                OpenOptions::default().dirty_clear_interval
            },
        };
        let zeros = h(&vec![0; bs as usize]);
        let mut sim = Sim {
            bs: u64::from(bs),
            blocks,
            geometry,
            open,
            backend,
            vol: None,
            read_only: false,
            model: vec![0; usize_of(u64::from(bs) * blocks)],
            poisoned: vec![false; usize_of(blocks)],
            ever: vec![HashSet::from([zeros]); usize_of(blocks)],
            base: vec![Some(zeros); usize_of(blocks)],
            steps: Vec::new(),
            serial: 0,
            crashes: 0,
            torn_blocks: 0,
            trace: std::env::var_os("BLOCKGUARD_FUZZ_TRACE").is_some(),
        };
        sim.open(false)?;
        Ok(sim)
    }

    fn vol(&self) -> &Volume {
        self.vol.as_ref().expect("a volume is open between operations")
    }

    fn events(&self) -> usize {
        self.backend.events().len()
    }

    fn size(&self) -> u64 {
        self.bs * self.blocks
    }

    /// A byte range from fuzzed numbers: inside the volume, 1 to `max` bytes long.
    fn range(&self, offset: u32, len: u16, max: u64) -> (u64, u64) {
        let off = u64::from(offset) % self.size();
        (off, 1 + u64::from(len) % (self.size() - off).min(max))
    }

    fn block(&self, b: u64) -> &[u8] {
        &self.model[usize_of(b * self.bs)..usize_of((b + 1) * self.bs)]
    }

    /// Where a backend offset lies, in words.
    fn describe(&self, offset: u64) -> String {
        let g = &self.geometry;
        if offset < g.first_group_offset {
            return format!("head region +{offset}");
        }
        if offset >= g.backup_sb_offset {
            return format!("tail region +{}", offset - g.backup_sb_offset);
        }
        let group = (offset - g.first_group_offset) / g.group_len();
        let rel = (offset - g.first_group_offset) % g.group_len();
        if rel < 2 * self.bs {
            let slot = rel / self.bs;
            format!("group {group} slot {slot} sector {}", rel % self.bs / 512)
        } else {
            let block = group * u64::from(g.group_blocks) + (rel - 2 * self.bs) / self.bs;
            format!("data block {block} +{}", (rel - 2 * self.bs) % self.bs)
        }
    }

    /// Prints the backend events from `from` on.
    fn trace_events(&self, from: usize) {
        use blockguard::blockguard_backend::Event;
        for (i, e) in self.backend.events().iter().enumerate().skip(from) {
            match e {
                Event::Write {
                    write, zero_range, ..
                } => eprintln!(
                    "    event {i}: {} {} bytes at {}",
                    if *zero_range { "zero" } else { "write" },
                    write.data.len(),
                    self.describe(write.offset)
                ),
                other => eprintln!("    event {i}: {other:?}"),
            }
        }
    }

    fn apply(&mut self, op: &Op) -> Result<(), String> {
        let bs = self.bs;
        match *op {
            Op::Write {
                block,
                count,
                fill,
                owned,
            } => {
                let b = u64::from(block) % self.blocks;
                let n = 1 + u64::from(count) % (self.blocks - b).min(4);
                self.write(b * bs, n * bs, Write::Data { fill, owned })
            }
            Op::WriteAt { offset, len, fill } => {
                let (off, len) = self.range(offset, len, 3 * bs);
                self.write(off, len, Write::Data { fill, owned: false })
            }
            Op::Zero { offset, len } => {
                let (off, len) = self.range(offset, len, 4 * bs);
                self.write(off, len, Write::Zeroes)
            }
            Op::Discard { offset, len } => {
                let (off, len) = self.range(offset, len, 4 * bs);
                self.write(off, len, Write::Discard)
            }
            Op::Read { offset, len } => {
                let (off, len) = self.range(offset, len, 8 * bs);
                self.read(off, len)
            }
            Op::Flush => self.flush(),
            Op::Crash { at, image, after } => self.crash(at, image, after),
            Op::Reopen { read_only } => self.reopen(read_only),
            Op::Recover => self.recover(),
        }
    }

    fn open(&mut self, read_only: bool) -> Result<(), String> {
        let opts = OpenOptions {
            read_only,
            ..self.open.clone()
        };
        let vol = Volume::open(self.backend.clone(), &opts)
            .map_err(|e| format!("open (read-only: {read_only}) failed: {e}"))?;
        if let Some(report) = vol.recovery_at_open() {
            if !report.damaged.is_empty() {
                return Err(format!("recovery at open found damage: {:?}", report.damaged));
            }
        }
        self.vol = Some(vol);
        self.read_only = read_only;
        Ok(())
    }

    /// Records a step that began at `start` events.
    fn step(&mut self, start: usize, flush: bool, touched: Vec<(u64, u64)>) {
        let end = self.events();
        self.steps.push(Step {
            start,
            end,
            flush,
            touched,
        });
    }

    fn write(&mut self, off: u64, len: u64, what: Write) -> Result<(), String> {
        let start = self.events();
        self.serial += 1;
        let data = match what {
            Write::Data { fill, .. } => pattern(fill, self.serial, off, len),
            Write::Zeroes | Write::Discard => vec![0; usize_of(len)],
        };
        let vol = self.vol();
        let result = match what {
            Write::Data { owned: true, .. } => vol.write_owned(data.clone(), off),
            Write::Data { owned: false, .. } => vol.write_at(&data, off),
            Write::Zeroes => vol.write_zeroes(off, len),
            Write::Discard => vol.discard(off, len),
        };
        if self.read_only {
            return match result {
                Err(Error::ReadOnly { .. }) => Ok(()),
                other => Err(format!(
                    "a write of {off}+{len} to a read-only volume returned {other:?}"
                )),
            };
        }
        result.map_err(|e| format!("write of {off}+{len} failed: {e}"))?;
        self.model[usize_of(off)..usize_of(off + len)].copy_from_slice(&data);
        let mut touched = Vec::new();
        for b in off / self.bs..(off + len).div_ceil(self.bs) {
            let v = h(self.block(b));
            self.poisoned[usize_of(b)] = false;
            touched.push((b, v));
        }
        self.step(start, false, touched);
        Ok(())
    }

    fn read(&mut self, off: u64, len: u64) -> Result<(), String> {
        let mut buf = vec![0u8; usize_of(len)];
        let result = self.vol().read_at(&mut buf, off);
        let poisoned = (off / self.bs..(off + len).div_ceil(self.bs)).any(|b| self.poisoned[usize_of(b)]);
        match result {
            Ok(()) if poisoned => Err(format!(
                "read of {off}+{len} succeeded over a block that failed verification after the crash"
            )),
            Ok(()) => match buf
                .iter()
                .zip(&self.model[usize_of(off)..])
                .position(|(a, b)| a != b)
            {
                None => Ok(()),
                Some(i) => Err(format!(
                    "read of {off}+{len} returned other bytes than written, from byte {}",
                    off + i as u64
                )),
            },
            Err(e) if poisoned && e.is_corruption() => Ok(()),
            Err(e) => Err(format!("read of {off}+{len} failed: {e}")),
        }
    }

    fn flush(&mut self) -> Result<(), String> {
        let start = self.events();
        self.vol().flush().map_err(|e| format!("flush failed: {e}"))?;
        self.step(start, true, Vec::new());
        Ok(())
    }

    fn recover(&mut self) -> Result<(), String> {
        if self.read_only {
            return Ok(());
        }
        let start = self.events();
        let report = self
            .vol()
            .recover(RecoverOptions::default(), |_, _| {})
            .map_err(|e| format!("recover failed: {e}"))?;
        if !report.damaged.is_empty() {
            return Err(format!("recover found damage: {:?}", report.damaged));
        }
        self.step(start, true, Vec::new());
        self.check_all("after recover")
    }

    fn reopen(&mut self, read_only: bool) -> Result<(), String> {
        let start = self.events();
        let vol = self.vol.take().expect("a volume is open");
        vol.close().map_err(|e| format!("close failed: {e}"))?;
        self.step(start, true, Vec::new());
        self.open(read_only)?;
        self.check_all("after a clean close and reopen")?;
        self.repair()
    }

    /// Every block against the model: equal, or failing verification if poisoned.
    fn check_all(&self, when: &str) -> Result<(), String> {
        let mut buf = vec![0u8; usize_of(self.bs)];
        for b in 0..self.blocks {
            let result = self.vol().read_at(&mut buf, b * self.bs);
            match (result, self.poisoned[usize_of(b)]) {
                (Ok(()), false) if buf == self.block(b) => {}
                (Ok(()), false) => return Err(format!("{when}: block {b} holds other bytes than written")),
                (Ok(()), true) => {
                    return Err(format!(
                        "{when}: block {b}, which failed verification after the crash, reads"
                    ))
                }
                (Err(e), true) if e.is_corruption() => {}
                (Err(e), _) => return Err(format!("{when}: block {b} fails: {e}")),
            }
        }
        Ok(())
    }

    /// Rewrites, whole, every block that failed verification after a crash (read-write
    /// sessions only), as a user would; the model then knows every byte again.
    fn repair(&mut self) -> Result<(), String> {
        if self.read_only {
            return Ok(());
        }
        for b in 0..self.blocks {
            if self.poisoned[usize_of(b)] {
                self.write(
                    b * self.bs,
                    self.bs,
                    Write::Data {
                        fill: 0xC3,
                        owned: false,
                    },
                )?;
            }
        }
        Ok(())
    }

    /// Adds to `ever` every block version written whole to the backend in its first `n`
    /// events.
    fn note_issued(&mut self, n: usize) {
        use blockguard::blockguard_backend::Event;
        for e in self.backend.events().iter().take(n) {
            let Event::Write { write, .. } = e else {
                continue;
            };
            for b in 0..self.blocks {
                let at = self.geometry.data_offset(b);
                if at >= write.offset && at + self.bs <= write.end() {
                    let from = usize_of(at - write.offset);
                    self.ever[usize_of(b)].insert(h(&write.data[from..from + usize_of(self.bs)]));
                }
            }
        }
    }

    /// Per block, what a crash after the first `n` events of the current history may leave.
    fn allowed(&self, n: usize) -> Vec<Allowed> {
        let cut = self
            .steps
            .iter()
            .rposition(|s| s.flush && s.end <= n)
            .map_or(0, |i| i + 1);
        let mut allowed: Vec<Allowed> = self
            .base
            .iter()
            .map(|&durable| Allowed {
                durable,
                since: Vec::new(),
            })
            .collect();
        for s in &self.steps[..cut] {
            for &(b, v) in &s.touched {
                allowed[usize_of(b)].durable = Some(v);
            }
        }
        for s in self.steps[cut..].iter().take_while(|s| s.start < n) {
            for &(b, v) in &s.touched {
                allowed[usize_of(b)].since.push(v);
            }
        }
        allowed
    }

    /// Power loss at the point `at` names (see [`Op::Crash`]), the crash image `image` of that
    /// point opened as `after`, and the volume checked: no metadata damage, every block as the
    /// crash may leave it (G1, G2).
    fn crash(&mut self, at: Option<u16>, image: Image, after: After) -> Result<(), String> {
        let total = self.events();
        let n = at.map_or(total, |x| usize::from(x) % (total + 1));
        let state = self.backend.state_at(n);
        let disk = match image {
            Image::Durable => state.durable_image().to_vec(),
            Image::All => state.crash_image(&(0..state.unflushed().len()).collect::<Vec<_>>()),
            Image::Subset(seed) => {
                state.random_crash_image(&mut ChaCha8Rng::seed_from_u64(seed.into()), false)
            }
            Image::Torn(seed) => state.random_crash_image(&mut ChaCha8Rng::seed_from_u64(seed.into()), true),
        };
        if self.trace {
            self.trace_crash(&state, &disk, n, total);
        }
        self.note_issued(n);
        let allowed = self.allowed(n);
        // Power off: nothing the old volume does from here on reaches any disk we look at.
        self.backend.crash_now();
        drop(self.vol.take());
        self.crashes += 1;
        self.backend = Arc::new(FaultBackend::from_image(disk));
        let what = format!("after a crash at event {n} of {total} ({image:?}, then {after:?})");
        self.open(after == After::ReadOnly)?;
        if after == After::Recover {
            let report = self
                .vol()
                .recover(RecoverOptions::default(), |_, _| {})
                .map_err(|e| format!("{what}: recover failed: {e}"))?;
            if !report.damaged.is_empty() {
                return Err(format!("{what}: recover found damage: {:?}", report.damaged));
            }
        }
        let groups = self.geometry.groups;
        let meta = self.vol().check_metadata(0, groups);
        if !matches!(&meta, Ok(p) if p.is_empty()) {
            return Err(format!("{what}: metadata damaged: {meta:?}"));
        }
        let map = self.vol().check_map();
        if !matches!(&map, Ok(p) if p.is_empty()) {
            return Err(format!("{what}: written-groups map damaged: {map:?}"));
        }
        self.base = self.check_blocks_after_crash(&what, &allowed)?;
        self.steps.clear();
        self.repair()
    }

    /// Prints, for a crash after `n` of `total` events, where each write then unflushed went
    /// and whether it reached the crash image `disk`.
    fn trace_crash(&self, state: &CrashState, disk: &[u8], n: usize, total: usize) {
        eprintln!("    crash after event {n} of {total}; unflushed writes then:");
        for w in state.unflushed() {
            let (lo, hi) = (usize_of(w.offset), usize_of(w.end()));
            let landed = disk[lo..hi] == w.data[..];
            let kept = disk[lo..hi] != state.durable_image()[lo..hi];
            eprintln!(
                "      {} bytes at {}: {}",
                w.data.len(),
                self.describe(w.offset),
                if landed {
                    "on disk"
                } else if kept {
                    "partly on disk"
                } else {
                    "not on disk"
                }
            );
        }
    }

    /// Reads every block of the volume just opened after a crash and checks it against what
    /// the crash may have left (`allowed`, per block): a version durable at the last flush or
    /// written since (G2), and a verification failure only for a block written since and
    /// not complete on disk (G1). Brings the model up to date, poisons the blocks that fail,
    /// and returns each block's fingerprint (`None`: poisoned) as the new history's base.
    fn check_blocks_after_crash(
        &mut self,
        what: &str,
        allowed: &[Allowed],
    ) -> Result<Vec<Option<u64>>, String> {
        let mut base = Vec::with_capacity(usize_of(self.blocks));
        let mut buf = vec![0u8; usize_of(self.bs)];
        for (b, allow) in (0..self.blocks).zip(allowed) {
            match self.vol().read_at(&mut buf, b * self.bs) {
                Ok(()) => {
                    let v = h(&buf);
                    if allow.durable != Some(v) && !allow.since.contains(&v) {
                        return Err(format!(
                            "{what}: block {b} reads as a version neither durable at the last \
                             flush nor written since (G2: stale or foreign data)"
                        ));
                    }
                    let at = usize_of(b * self.bs);
                    self.model[at..at + buf.len()].copy_from_slice(&buf);
                    self.poisoned[usize_of(b)] = false;
                    self.ever[usize_of(b)].insert(v);
                    base.push(Some(v));
                }
                Err(e) => {
                    if !e.is_corruption() {
                        return Err(format!(
                            "{what}: block {b} fails with an error that is not a verification failure: {e}"
                        ));
                    }
                    if allow.durable.is_some() && allow.since.is_empty() {
                        return Err(format!(
                            "{what}: block {b}, not written since the last flush, fails verification (G2): {e}"
                        ));
                    }
                    let mut raw = vec![0u8; usize_of(self.bs)];
                    self.backend
                        .read_at(&mut raw, self.geometry.data_offset(b))
                        .map_err(|e| e.to_string())?;
                    let v = h(&raw);
                    // A complete version that is neither durable nor written since must
                    // fail: one older than the last flush, say, that a torn write completed
                    // by rewriting the sectors it lacked.
                    let which = if allow.durable == Some(v) {
                        Some("the version durable at the last flush")
                    } else if allow.since.contains(&v) {
                        Some("a version written after the last flush")
                    } else {
                        None
                    };
                    if let (Some(which), true) = (which, self.ever[usize_of(b)].contains(&v)) {
                        return Err(format!(
                            "{what}: block {b} holds {which}, complete, on disk but fails verification (G1): {e}\n  \
                             its metadata: {:?}",
                            self.vol().inspect_block(b)
                        ));
                    }
                    self.poisoned[usize_of(b)] = true;
                    self.torn_blocks += 1;
                    base.push(None);
                }
            }
        }
        Ok(base)
    }

    /// Closes, reopens read-write (recovering if the last session crashed or was
    /// read-only), and checks every block and `check_blocks` against the model.
    fn finish(&mut self) -> Result<(), String> {
        let vol = self.vol.take().expect("a volume is open");
        vol.close().map_err(|e| format!("final close failed: {e}"))?;
        self.open(false)?;
        self.check_all("at the end")?;
        let problems = self
            .vol()
            .check_blocks(0, self.blocks)
            .map_err(|e| format!("check_blocks failed: {e}"))?;
        let reported: Vec<u64> = problems.iter().map(|p| p.block).collect();
        let expected: Vec<u64> = (0..self.blocks).filter(|&b| self.poisoned[usize_of(b)]).collect();
        if reported != expected {
            return Err(format!(
                "check_blocks reports blocks {reported:?}, expected {expected:?}"
            ));
        }
        let vol = self.vol.take().expect("a volume is open");
        vol.close().map_err(|e| format!("close failed: {e}"))?;
        Ok(())
    }
}

/// Inputs that exercise each operation and each kind of crash, on both block sizes.
pub fn seeds() -> Vec<(String, Vec<u8>)> {
    let small = Setup {
        large_blocks: false,
        tiny_cache: true,
        clear_dirty_at_flush: true,
        blocks: 39,      // 40 blocks
        group_blocks: 7, // groups of 8
        stage_blocks: 2, // 3 blocks staged
    };
    let large = Setup {
        large_blocks: true,
        tiny_cache: false,
        clear_dirty_at_flush: false,
        blocks: 23,
        group_blocks: 69, // 70: tags in two metadata sectors
        stage_blocks: 5,
    };
    let mut out = Vec::new();
    for setup in [small, large] {
        let size = if setup.large_blocks { "4096" } else { "512" };
        for (name, ops) in seed_sequences() {
            out.push((format!("gen-{name}-{size}"), encode(setup, &ops)));
        }
    }
    // Found by CI's fuzzing: a block torn by a crash, rewritten, and torn again so that the
    // second tear completed the first torn version (`tests/regressions.rs`, regression 12).
    let (setup, ops) = decode(&TORN_TWICE);
    out.push((
        "found-torn-write-completes-older-torn-write".to_string(),
        encode(setup, &ops),
    ));
    out
}

/// The input of the first failure above, as the fuzzer found it.
const TORN_TWICE: [u8; 138] = [
    0x01, 0x17, 0x45, 0x05, 0x00, 0x00, 0x00, 0x03, 0x01, 0x00, 0x03, 0xbc, 0x02, 0x00, 0x00, 0x84, 0x03,
    0x02, 0x09, 0x00, 0x09, 0x00, 0x02, 0x03, 0x00, 0x05, 0x00, 0x08, 0x00, 0x00, 0xe8, 0x03, 0x06, 0x88,
    0x13, 0x00, 0x00, 0xb8, 0x0b, 0x07, 0x00, 0x00, 0x00, 0x00, 0x70, 0x17, 0x00, 0x1e, 0x00, 0x01, 0x04,
    0x01, 0x0b, 0x0e, 0x00, 0x00, 0x17, 0x45, 0x05, 0x00, 0x00, 0x00, 0x03, 0x01, 0x00, 0x03, 0xbc, 0x02,
    0x00, 0x00, 0x84, 0x03, 0x02, 0x09, 0x00, 0x09, 0x00, 0x02, 0x03, 0x00, 0x05, 0x00, 0x08, 0x00, 0x00,
    0xe8, 0x03, 0x06, 0x88, 0x13, 0x00, 0x00, 0xb8, 0x0b, 0x07, 0x00, 0x00, 0x00, 0x00, 0x70, 0x17, 0x00,
    0x1e, 0x00, 0x01, 0x04, 0x01, 0x0b, 0x0e, 0x00, 0x00, 0x0b, 0x00, 0x00, 0x00, 0x00, 0x02, 0x00, 0x00,
    0x05, 0x00, 0x0b, 0x00, 0x00, 0x00, 0x00, 0x02, 0x00, 0x00, 0x05, 0x00, 0x07, 0x00, 0x00, 0x00, 0x00,
    0x00, 0x10,
];

/// A write of whole blocks in the seeds, handed over with `write_owned` when `fill` is even.
fn seed_write(block: u16, count: u8, fill: u8) -> Op {
    Op::Write {
        block,
        count,
        fill,
        owned: fill.is_multiple_of(2),
    }
}

/// The start of most seeds: writes (whole blocks and not, owned and not), zeroing, discard,
/// a flush and a read.
fn seed_mix() -> Vec<Op> {
    let w = seed_write;
    vec![
        w(0, 3, 1),
        Op::WriteAt {
            offset: 700,
            len: 900,
            fill: 2,
        },
        Op::Flush,
        w(9, 2, 3),
        Op::Zero {
            offset: 2048,
            len: 1000,
        },
        Op::Discard {
            offset: 5000,
            len: 3000,
        },
        Op::Read { offset: 0, len: 6000 },
        w(30, 1, 4),
    ]
}

/// The operation sequences of the seeds, by name (each runs on both setups): most start with
/// [`seed_mix`] and go on with reopens and crashes.
fn seed_sequences() -> Vec<(String, Vec<Op>)> {
    let w = seed_write;
    let crash = |at: Option<u16>, image: Image, after: After| Op::Crash { at, image, after };
    let mixed = seed_mix();
    let then = |more: &[Op]| [&mixed[..], more].concat();
    let mut out = vec![
        ("empty".to_string(), Vec::new()),
        ("writes-reads".to_string(), mixed.clone()),
        (
            "reopen".to_string(),
            then(&[Op::Reopen { read_only: false }, Op::Read { offset: 0, len: 9000 }]),
        ),
        (
            "reopen-read-only".to_string(),
            then(&[
                Op::Reopen { read_only: true },
                w(1, 1, 9),
                Op::Reopen { read_only: false },
            ]),
        ),
    ];
    for (name, image) in [
        ("durable", Image::Durable),
        ("all", Image::All),
        ("subset", Image::Subset(7)),
        ("torn", Image::Torn(11)),
    ] {
        for after in [After::ReadWrite, After::ReadOnly, After::Recover] {
            let ops = then(&[
                crash(None, image, after),
                w(2, 0, 5),
                Op::Read { offset: 0, len: 4096 },
            ]);
            out.push((format!("crash-{name}-{after:?}"), ops));
        }
    }
    // Crashes in the past: mid-commit, mid-close, mid-recovery; crash after crash.
    out.push((
        "crash-mid-history".to_string(),
        then(&[crash(Some(5), Image::Torn(3), After::ReadWrite)]),
    ));
    out.push((
        "crash-after-reopen".to_string(),
        then(&[
            Op::Reopen { read_only: false },
            w(4, 3, 6),
            crash(Some(9), Image::Subset(5), After::ReadWrite),
        ]),
    ));
    out.push((
        "double-crash-in-recovery".to_string(),
        then(&[
            crash(None, Image::Torn(1), After::ReadWrite),
            crash(Some(3), Image::Torn(2), After::ReadWrite),
            w(0, 3, 8),
            crash(None, Image::Subset(4), After::ReadOnly),
            Op::Reopen { read_only: false },
            Op::Recover,
        ]),
    ));
    let mut ops = Vec::new();
    for i in 0..12u8 {
        ops.push(w(u16::from(i) * 3, 2, i));
        if i % 4 == 3 {
            ops.push(Op::Flush);
        }
    }
    ops.push(crash(None, Image::Torn(99), After::Recover));
    out.push(("many-writes-torn".to_string(), ops));
    out
}
