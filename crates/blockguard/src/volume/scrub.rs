//! Scrubbing: verify every written block of a volume, in the background of its normal use.
//!
//! A scrub reads the volume through [`Volume::read_at`], the very path clients read through,
//! instead of a private one: every guarantee of that path comes with it. It verifies against
//! the tags a read accepts, and re-reads with commits excluded before it calls a block corrupt,
//! so a block that a client rewrites while the scrub reads it is never reported (see
//! `docs/CONSISTENCY.md`, "Scrubbing a volume in use"). On a mirror set it checks every copy
//! ([`Volume::verify_copies`]: each member's copy against its own metadata, suspects looked
//! at again under the commit lock) and repairs through the same read repair reads use.
//!
//! It reads in bounded chunks ([`ScrubOptions::chunk_bytes`]) and holds no lock between two
//! chunks, so the clients of a served volume keep going; between chunks it checks the stop
//! flag and paces itself to [`ScrubOptions::rate`]. Unwritten regions cost nothing: each
//! window of the volume is first asked for its allocation ([`Volume::extents`], which proves a
//! hole from the metadata and the backend's holes), and only allocated runs are read. Windows
//! are one group's worth where there is data (so metadata is read right before its data, in
//! disk order) and grow up to 1 GiB across empty regions.

use super::Volume;
use crate::cast::usize_of;
use crate::error::{Error, Result};
use std::ops::Range;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

/// Bytes read per chunk by default: large enough for sequential throughput (the verified read
/// path splits it over two cores when nothing else reads), small enough that a stop or a
/// client's request never waits long behind it.
pub const DEFAULT_SCRUB_CHUNK: usize = 1 << 20;

/// Problems listed in a [`ScrubReport`] by default; beyond it they are only counted.
pub const DEFAULT_SCRUB_LISTED: usize = 1000;

/// Logical bytes whose allocation one [`Volume::extents`] call finds out, at first and after
/// every window that held data. Small, because `extents` reads the metadata of every written
/// group of its window: with 1 GiB windows those 512 small reads ran ahead of the data reads,
/// split the kernel's readahead around the pages they cached, and a cold scrub issued 7 times
/// as many, smaller, disk reads as `dd` (1913 against 274 for 1 GiB); with 2 MiB windows (one
/// group) each group's metadata is read just before its data, and the counts match.
const MIN_WINDOW: u64 = 2 << 20;

/// The largest window: windows that hold no data double up to it, so a mostly empty volume
/// costs a few `extents` calls per GiB (they read no metadata of never-written groups).
const MAX_WINDOW: u64 = 1 << 30;

/// Longest single sleep of the pacing, so a stop is noticed quickly even at a low rate.
const PACE_SLICE: Duration = Duration::from_millis(50);

/// A scrub that falls this far behind its rate (because the disk or the machine was busy) does
/// not try to catch up in a burst: pacing restarts from the present.
const PACE_MAX_DEBT: Duration = Duration::from_secs(1);

/// How to scrub: where, how fast, and when to stop.
#[derive(Clone, Copy, Debug)]
pub struct ScrubOptions<'a> {
    /// Byte offset to start at: a multiple of the block size (0, or a previous report's
    /// [`ScrubReport::position`] to resume).
    pub start: u64,
    /// Byte offset to stop at (exclusive), a multiple of the block size; `None`: the end of
    /// the volume.
    pub end: Option<u64>,
    /// Most bytes read per second; `None`: as fast as the volume reads. Holes skipped do not
    /// count.
    pub rate: Option<u64>,
    /// Bytes read at a time (rounded down to whole blocks, at least one).
    pub chunk_bytes: usize,
    /// Problems listed in the report; beyond that they are counted only.
    pub max_listed: usize,
    /// Ask for bad copies to be rewritten from a good one (mirror sets; a plain volume has
    /// nothing to repair from, and its bad blocks are reported unrepaired).
    pub repair: bool,
    /// Checked between chunks: once it is true the scrub returns its report with
    /// [`ScrubReport::stopped`] set and the position reached.
    pub stop: Option<&'a AtomicBool>,
}

impl Default for ScrubOptions<'_> {
    fn default() -> Self {
        ScrubOptions {
            start: 0,
            end: None,
            rate: None,
            chunk_bytes: DEFAULT_SCRUB_CHUNK,
            max_listed: DEFAULT_SCRUB_LISTED,
            repair: false,
            stop: None,
        }
    }
}

/// Why a block failed the scrub.
#[derive(Clone, Copy, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum ScrubProblemKind {
    /// It failed verification (its data, or the metadata holding its tag, is damaged).
    Corrupt,
    /// The backend could not read it (or its metadata).
    Unreadable,
}

/// A block the scrub found bad.
#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct ScrubProblem {
    /// The data block.
    pub block: u64,
    /// Corrupt or unreadable.
    pub kind: ScrubProblemKind,
    /// The engine's error: the volume, the block, what was expected and what was found.
    pub detail: String,
    /// On a mirror set: the copy (member number) whose copy of the block is bad; every copy
    /// is checked. `None` on a plain volume.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub copy: Option<usize>,
}

/// Where a running scrub is, passed to the progress callback after every chunk.
#[derive(Clone, Debug, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct ScrubProgress {
    /// Where the scrub started (bytes).
    pub start: u64,
    /// Where it will end (bytes, exclusive).
    pub end: u64,
    /// Everything before this byte offset (from `start`) has been verified or proven unwritten.
    pub position: u64,
    /// Blocks verified so far.
    pub blocks_checked: u64,
    /// Bytes read so far.
    pub bytes_read: u64,
    /// Bad blocks found so far.
    pub problems: u64,
    /// Blocks repaired so far (see [`ScrubReport::repaired`]).
    pub repaired: u64,
    /// Seconds since the scrub started.
    pub elapsed_secs: f64,
    /// The blocks the latest chunk verified (empty after a hole was skipped).
    pub last_checked: Range<u64>,
}

/// What a scrub did and found.
#[derive(Clone, Debug, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct ScrubReport {
    /// The volume's name.
    pub volume: String,
    /// Where the scrub started (bytes).
    pub start: u64,
    /// Where it was to end (bytes, exclusive).
    pub end: u64,
    /// Everything from `start` to here has been scrubbed: `end` when it finished, where it
    /// stopped otherwise — the `start` that resumes it.
    pub position: u64,
    /// It stopped (the stop flag) before reaching `end`.
    pub stopped: bool,
    /// Written blocks verified (unwritten ones are skipped and not counted).
    pub blocks_checked: u64,
    /// Bytes read.
    pub bytes_read: u64,
    /// Bad blocks found (on a mirror set: bad copies, each with its member), in block order;
    /// at most [`ScrubOptions::max_listed`] of them.
    pub problems: Vec<ScrubProblem>,
    /// How many bad blocks (bad copies) were found, listed or not.
    pub problem_count: u64,
    /// Bad copies rewritten from a good one while the scrub ran (by it, or by a client's read
    /// of a bad block meanwhile): the engine's repair counter over the scrub.
    pub repaired: u64,
    /// Repair was asked for ([`ScrubOptions::repair`]).
    pub repair_requested: bool,
    /// Scarred metadata sectors found in the groups scrubbed: the header intact (so the
    /// newest brother is known), the body damaged. Their blocks still read where the data
    /// proves its tag; a bad one is also among [`ScrubReport::problems`].
    #[serde(default)]
    pub scarred_sectors: u64,
    /// Scarred sectors rewritten from what their headers and the data prove (with repair).
    #[serde(default)]
    pub sectors_healed: u64,
    /// Seconds the scrub took.
    pub elapsed_secs: f64,
}

impl ScrubReport {
    /// Bad blocks found that were not repaired, and scarred metadata sectors not healed.
    pub fn unrepaired(&self) -> u64 {
        self.problem_count.saturating_sub(self.repaired)
            + self.scarred_sectors.saturating_sub(self.sectors_healed)
    }

    /// True if the scrub found no bad block and no damaged metadata (it may have been stopped
    /// before the end).
    pub fn is_clean(&self) -> bool {
        self.problem_count == 0 && self.scarred_sectors == 0
    }
}

/// Keeps a scrub (or a re-tag, `retag_online.rs`) at its rate by sleeping after each chunk.
pub(super) struct Pacer {
    rate: u64,
    since: Instant,
    bytes: u64,
}

impl Pacer {
    /// Paces to `rate` bytes per second from now.
    pub(super) fn new(rate: u64) -> Pacer {
        Pacer {
            rate,
            since: Instant::now(),
            bytes: 0,
        }
    }

    /// Sleeps until `n` more bytes are due at the rate, or until `stopped()`.
    pub(super) fn after(&mut self, n: u64, stopped: &dyn Fn() -> bool) {
        self.bytes += n;
        let due = Duration::from_nanos(
            u64::try_from(u128::from(self.bytes) * 1_000_000_000 / u128::from(self.rate.max(1)))
                .unwrap_or(u64::MAX),
        );
        loop {
            let elapsed = self.since.elapsed();
            if elapsed > due + PACE_MAX_DEBT {
                self.since = Instant::now();
                self.bytes = 0;
                return;
            }
            if elapsed >= due || stopped() {
                return;
            }
            std::thread::sleep(due.saturating_sub(elapsed).min(PACE_SLICE));
        }
    }
}

/// A scrub in progress: options, counters and the report being built.
struct Run<'a, 'p> {
    vol: &'a Volume,
    opts: ScrubOptions<'a>,
    progress: &'p mut dyn FnMut(ScrubProgress),
    report: ScrubReport,
    repairs_before: u64,
    started: Instant,
    pacer: Option<Pacer>,
    /// Page-aligned: the kernel copies into an aligned buffer about twice as fast (a warm 1 GiB
    /// scrub took 0.29-0.33 s with a `Vec`'s 16-byte-aligned buffer, 0.16-0.19 s with this).
    buf: super::Aligned,
    /// The volume has mirror copies: every copy is checked, not only the one reads go to.
    mirrored: bool,
    /// The last group whose metadata was looked at for scars.
    last_group: Option<u64>,
}

impl Volume {
    /// Verifies every written block from `opts.start` to `opts.end` through the normal
    /// verified read path, chunk by chunk, without holding any lock between chunks; reports
    /// progress after every chunk. A bad block (corrupt or unreadable) is recorded and the
    /// scrub goes on; only a request outside the volume fails it.
    ///
    /// Safe while the volume is in use: a block written during the scrub is checked as either
    /// its old or its new version, never reported corrupt because of the write (the read path
    /// re-reads a failed block with commits excluded before it reports it).
    ///
    /// ```
    /// # use std::sync::Arc;
    /// # use blockguard::{FormatOptions, ScrubOptions, Volume};
    /// # use blockguard::blockguard_backend::MemoryBackend;
    /// # let opts = FormatOptions::with_size(4 << 20);
    /// # let vol = Volume::format(Arc::new(MemoryBackend::new(opts.backing_len()?)?), &opts)?;
    /// vol.write_at(&[7u8; 8192], 0)?;
    /// let report = vol.scrub(ScrubOptions::default(), &mut |_| {})?;
    /// assert!(report.is_clean() && !report.stopped);
    /// # Ok::<(), Box<dyn std::error::Error>>(())
    /// ```
    pub fn scrub(
        &self,
        opts: ScrubOptions<'_>,
        progress: &mut dyn FnMut(ScrubProgress),
    ) -> Result<ScrubReport> {
        let bs = u64::from(self.block_size());
        let end = opts.end.unwrap_or_else(|| self.size());
        if !opts.start.is_multiple_of(bs) || !end.is_multiple_of(bs) || opts.start > end || end > self.size()
        {
            return Err(Error::InvalidArgument {
                volume: self.name().to_string(),
                detail: format!(
                    "cannot scrub bytes {}..{end}: start and end must be multiples of the block size \
                     ({bs}) with start <= end <= the volume's size ({})",
                    opts.start,
                    self.size()
                ),
            });
        }
        let chunk = (opts.chunk_bytes as u64 / bs).max(1) * bs;
        let mut run = Run {
            vol: self,
            progress,
            report: ScrubReport {
                volume: self.name().to_string(),
                start: opts.start,
                end,
                position: opts.start,
                stopped: false,
                blocks_checked: 0,
                bytes_read: 0,
                problems: Vec::new(),
                problem_count: 0,
                repaired: 0,
                repair_requested: opts.repair,
                scarred_sectors: 0,
                sectors_healed: 0,
                elapsed_secs: 0.0,
            },
            repairs_before: self.repairs_so_far(),
            started: Instant::now(),
            pacer: opts.rate.map(Pacer::new),
            buf: super::aligned(usize_of(chunk), 4096),
            mirrored: self.members().len() > 1,
            last_group: None,
            opts,
        };
        run.all()?;
        Ok(run.finish())
    }

    /// Block copies the engine has repaired from another copy since it was opened: what
    /// [`ScrubReport::repaired`] is the difference of.
    fn repairs_so_far(&self) -> u64 {
        self.stats().repairs
    }

    /// Why the volume has failed, if it has: an earlier write-back failed, or a thread
    /// panicked inside the engine. Reads (and scrubs) go on; writes and flushes are refused
    /// until the volume is reopened. For status reports.
    pub fn failure(&self) -> Option<String> {
        self.inner.failure().map(|f| f.detail)
    }
}

impl Run<'_, '_> {
    fn stopped(&self) -> bool {
        self.opts.stop.is_some_and(|s| s.load(Ordering::Relaxed))
    }

    /// Scrubs window after window until the end or a stop.
    fn all(&mut self) -> Result<()> {
        let end = self.report.end;
        let mut window = MIN_WINDOW;
        while self.report.position < end {
            if self.stopped() {
                self.report.stopped = true;
                return Ok(());
            }
            let from = self.report.position;
            let to = end.min(from.saturating_add(window));
            let runs = self.allocated(from, to);
            window = if runs.is_empty() {
                (window * 2).min(MAX_WINDOW)
            } else {
                MIN_WINDOW
            };
            for run in runs {
                if !self.scrub_run(run.clone())? {
                    self.report.stopped = true;
                    return Ok(());
                }
                self.metadata_of(&run)?;
            }
            // The rest of the window is unwritten: done without reading it.
            self.report.position = to;
            self.tell(0..0);
        }
        Ok(())
    }

    /// The allocated runs of `from..to` (byte ranges). If the allocation cannot be worked out
    /// (its metadata is unreadable), all of it: reading it then names every bad block.
    fn allocated(&self, from: u64, to: u64) -> Vec<Range<u64>> {
        match self.vol.extents(from, to - from) {
            Ok(extents) => extents
                .into_iter()
                .filter(|e| e.allocated)
                .map(|e| e.offset..e.offset + e.len)
                .collect(),
            Err(e) => {
                tracing::debug!(volume = %self.vol.name(), from, to, "allocation unknown, reading everything: {e}");
                std::iter::once(from..to).collect()
            }
        }
    }

    /// Scrubs one allocated run chunk by chunk; false if stopped before its end.
    fn scrub_run(&mut self, run: Range<u64>) -> Result<bool> {
        let bs = u64::from(self.vol.block_size());
        let mut at = run.start;
        while at < run.end {
            if self.stopped() {
                return Ok(false);
            }
            let n = (self.buf.as_ref().len() as u64).min(run.end - at);
            self.scrub_chunk(at, n)?;
            at += n;
            self.report.position = at;
            if let Some(pacer) = &mut self.pacer {
                let stop = self.opts.stop;
                pacer.after(n, &|| stop.is_some_and(|s| s.load(Ordering::Relaxed)));
            }
            self.tell((at - n) / bs..at / bs);
        }
        Ok(true)
    }

    /// Looks for scarred metadata sectors in the groups of the allocated `run` (each group
    /// once), and heals them when asked. A scar the data reads cannot see (the older brother,
    /// or a newest one whose tags all still match) is found only this way.
    fn metadata_of(&mut self, run: &Range<u64>) -> Result<()> {
        if run.is_empty() {
            return Ok(());
        }
        // On a mirror set `verify_copies` already repaired a member's scar from another
        // member's intact sector; what is left is a scar every member shares (its sectors are
        // written to all of them alike), healed here from what the headers and data prove.
        let bs = u64::from(self.vol.block_size());
        let inner = &self.vol.inner;
        let (first, _) = inner.geo.group_of(run.start / bs);
        let (last, _) = inner.geo.group_of((run.end - 1) / bs);
        for group in first..=last {
            if self.last_group.is_some_and(|g| g >= group) {
                continue;
            }
            self.last_group = Some(group);
            let scars = inner.scarred_sectors(group)?;
            if scars == 0 {
                continue;
            }
            self.report.scarred_sectors += scars;
            tracing::warn!(volume = %self.vol.name(), group, sectors = scars, "scrub: scarred metadata sectors");
            if self.opts.repair {
                let (healed, left) = inner.heal_scars(group)?;
                self.report.sectors_healed += healed;
                for (block, why) in left {
                    tracing::warn!(volume = %self.vol.name(), block, "scrub: cannot heal: {why}");
                }
            }
        }
        Ok(())
    }

    /// Reads `n` bytes at `offset` through the verified read path; on a failure, block by
    /// block, so every bad block is named (and a block rewritten meanwhile reads fine).
    fn scrub_chunk(&mut self, offset: u64, n: u64) -> Result<()> {
        let bs = u64::from(self.vol.block_size());
        if self.mirrored {
            return self.scrub_copies(offset / bs, n / bs);
        }
        let buf = &mut self.buf.as_mut()[..usize_of(n)];
        self.report.bytes_read += n;
        self.report.blocks_checked += n / bs;
        match self.vol.read_at(buf, offset) {
            Ok(()) => return Ok(()),
            Err(e) if is_block_problem(&e) => {}
            Err(e) => return Err(e),
        }
        let block_buf = &mut buf[..usize_of(bs)];
        let mut found = Vec::new();
        for block in offset / bs..(offset + n) / bs {
            self.report.bytes_read += bs;
            match self.vol.read_at(block_buf, block * bs) {
                Ok(()) => {}
                Err(e @ Error::Corrupt { .. }) => found.push((block, ScrubProblemKind::Corrupt, e)),
                Err(e @ Error::Io { .. }) => found.push((block, ScrubProblemKind::Unreadable, e)),
                Err(e) => return Err(e),
            }
        }
        for (block, kind, e) in found {
            self.record(block, kind, &e);
        }
        Ok(())
    }

    /// A mirror set: every copy of `count` blocks from `first` checked against its own
    /// member's metadata, bad copies repaired from a good one when asked (through the same
    /// read repair reads use).
    fn scrub_copies(&mut self, first: u64, count: u64) -> Result<()> {
        let r = self.vol.verify_copies(first, count, self.opts.repair)?;
        self.report.bytes_read += r.bytes_read;
        self.report.blocks_checked += r.blocks;
        for &(copy, block) in &r.bad {
            let detail = if r.unrepairable.contains(&block) {
                format!("block {block}: no copy of it verifies")
            } else {
                format!("block {block}: the copy on member {copy} does not verify (a good copy exists)")
            };
            tracing::warn!(volume = %self.vol.name(), block, copy, "scrub: {detail}");
            self.push(ScrubProblem {
                block,
                kind: ScrubProblemKind::Corrupt,
                detail,
                copy: Some(copy),
            });
        }
        Ok(())
    }

    fn record(&mut self, block: u64, kind: ScrubProblemKind, e: &Error) {
        tracing::warn!(volume = %self.vol.name(), block, "scrub: {}", error_chain(e));
        self.push(ScrubProblem {
            block,
            kind,
            detail: error_chain(e),
            copy: None,
        });
    }

    fn push(&mut self, problem: ScrubProblem) {
        self.report.problem_count += 1;
        if self.report.problems.len() < self.opts.max_listed {
            self.report.problems.push(problem);
        }
    }

    fn tell(&mut self, last_checked: Range<u64>) {
        let p = ScrubProgress {
            start: self.report.start,
            end: self.report.end,
            position: self.report.position,
            blocks_checked: self.report.blocks_checked,
            bytes_read: self.report.bytes_read,
            problems: self.report.problem_count,
            repaired: self.vol.repairs_so_far().saturating_sub(self.repairs_before),
            elapsed_secs: self.started.elapsed().as_secs_f64(),
            last_checked,
        };
        (self.progress)(p);
    }

    fn finish(mut self) -> ScrubReport {
        self.report.repaired = self.vol.repairs_so_far().saturating_sub(self.repairs_before);
        self.report.elapsed_secs = self.started.elapsed().as_secs_f64();
        self.report
    }
}

/// Errors that condemn the blocks read, not the scrub: corruption and I/O errors.
fn is_block_problem(e: &Error) -> bool {
    matches!(e, Error::Corrupt { .. } | Error::Io { .. })
}

/// An error and its causes on one line (an I/O error's message leaves its cause to `source()`).
fn error_chain(e: &Error) -> String {
    let mut msg = e.to_string();
    let mut cause = std::error::Error::source(e);
    while let Some(c) = cause {
        msg.push_str(": ");
        msg.push_str(&c.to_string());
        cause = c.source();
    }
    msg
}
