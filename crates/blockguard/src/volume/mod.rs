//! The volume engine: verified reads, crash-consistent writes, flush and discard over a
//! [`Backend`]. Synchronous and thread-safe: share a `Volume` between threads with `Arc`.
//!
//! Writes are staged in memory (bounded) and committed in batches; see `commit/dual.rs` for
//! the `dual` protocol and `docs/CONSISTENCY.md` for why it keeps G1 and G2. The engine's
//! parts: `open` (format, open, recovery at open), `read` (verified reads), `write`
//! (staging), `commit` (the commit machinery, one `Protocol` per consistency mode, and
//! `Maintenance`, the only way outside a commit to write metadata), `recover` (settling after
//! a crash, through `Maintenance`), `inspect` (extents, check, dump), `group` (what a group's
//! metadata accepts), `meta_io` (loading and confirming metadata), `bitmaps`, `cache`,
//! `stage`, `policy` (the error policy for blocks with no good copy) and `health` (failure,
//! suspension and what an operator can clear; resuming after a write-back failure is in
//! `commit/resume.rs`).

mod bitmaps;
mod cache;
mod commit;
mod device;
mod dix;
mod group;
mod group_commit;
mod heal;
mod health;
mod inspect;
mod membership;
mod meta_io;
mod mirror;
mod open;
mod policy;
mod read;
mod recover;
mod resync;
mod retag;
mod retag_mirror;
mod retag_online;
mod scrub;
mod stage;
mod tags;
mod two_devices;
mod verify_copies;
mod write;

pub use commit::journal::{limits as journal_limits, JournalLimits, JournalStatus, ReplayReport};
pub use commit::ResumeReport;
pub use dix::PiProfiles;
pub use health::{ClearedErrors, VolumeFailure, VolumeHealth};
pub use mirror::{member_records, CopyState, CopyStatus};
pub use policy::Suspension;
pub use recover::{MapProblem, MetadataProblem, RecoverOptions, RecoveryReport};
pub use resync::ResyncReport;
pub use retag_online::{RetagOptions, RetagReport, RetagStatus};
pub use scrub::{
    ScrubOptions, ScrubProblem, ScrubProblemKind, ScrubProgress, ScrubReport, DEFAULT_SCRUB_CHUNK,
    DEFAULT_SCRUB_LISTED,
};
pub use verify_copies::CopiesReport;

use crate::error::{Error, Result};
use crate::format::{ErrorPolicy, Geometry, Mode, Superblock};
use crate::tag::{Profile, Tag, TagKey};
use cache::MetaCache;
use stage::{SharedBuf, Stage};
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Condvar, Mutex, MutexGuard};

/// How to format a volume.
#[derive(Clone, Debug)]
pub struct FormatOptions {
    /// Logical size in bytes (a multiple of the block size); `None` uses all of the backend.
    pub size: Option<u64>,
    /// Logical block size: 4096 (default) or 512 (any power of two 512..=65536 works).
    pub block_size: u32,
    /// Consistency mode.
    pub mode: Mode,
    /// Tag profile.
    pub profile: Profile,
    /// The key of a keyed profile (never stored: the superblock keeps only a key-check
    /// value); `None` for the others.
    pub key: Option<TagKey>,
    /// Volume UUID; random when `None`.
    pub uuid: Option<[u8; 16]>,
    /// Free-form label (up to 64 bytes are kept).
    pub label: String,
    /// Data blocks per group; `None` for as many as a metadata block holds (496 with 4 KiB
    /// blocks). Smaller groups cost more metadata space; the tests use them to get volumes of
    /// many groups.
    pub group_blocks: Option<u32>,
    /// The backend is known to read as all zeros (a freshly created sparse file), so format
    /// writes only the superblocks. Otherwise the whole backend is zeroed first, because
    /// unwritten blocks must read as zeros.
    pub assume_zeroed: bool,
    /// What the volume does about a block with no good copy (stored in the superblock;
    /// [`OpenOptions::error_policy`] overrides it for one open).
    pub error_policy: ErrorPolicy,
    /// `journal` mode: bytes of the journal area (a multiple of 4 KiB and of the block size,
    /// at least [`crate::format::MIN_JOURNAL_LEN`]); `None` for the default, a sixteenth of
    /// the volume between 1 MiB and 64 MiB. Refused for the other modes.
    pub journal_size: Option<u64>,
    /// Bytes of each tag slot: 8, 16 or 32, at least the profile's tag size; `None` for the
    /// profile's tag size. Wider slots leave room for a later online re-tag
    /// ([`Volume::retag`]) to a profile with larger tags — `crc32c` in 32-byte slots can
    /// become `blake3-keyed` in place — at the cost of smaller groups (more metadata: 1.67 %
    /// of the data instead of 0.40 % for 32 against 8 bytes with 4 KiB blocks).
    pub tag_room: Option<usize>,
}

impl FormatOptions {
    /// Defaults (4096-byte blocks, `dual`, `crc32c`) for a volume of `size` bytes on a
    /// zero-filled backend.
    pub fn with_size(size: u64) -> FormatOptions {
        FormatOptions {
            size: Some(size),
            block_size: 4096,
            mode: Mode::Dual,
            profile: Profile::Crc32c,
            key: None,
            uuid: None,
            label: String::new(),
            group_blocks: None,
            assume_zeroed: true,
            error_policy: ErrorPolicy::Eio,
            journal_size: None,
            tag_room: None,
        }
    }

    /// Bytes of each tag slot of a volume formatted with these options: `tag_room`, checked,
    /// or the profile's tag size.
    pub fn tag_slot(&self) -> Result<usize> {
        let need = self.profile.tag_size();
        match self.tag_room {
            None => Ok(need),
            Some(room) if crate::format::TAG_SLOT_SIZES.contains(&room) && room >= need => Ok(room),
            Some(room) => Err(invalid(
                "new volume",
                format!(
                    "a tag room of {room} bytes does not fit tag profile {} ({need}-byte tags): \
                     give 8, 16 or 32, at least {need}",
                    self.profile
                ),
            )),
        }
    }

    /// Bytes of journal for a volume of about `size` bytes with these options: zero unless in
    /// `journal` mode.
    pub(crate) fn journal_len(&self, size: u64) -> Result<u64> {
        let unit = u64::from(self.block_size).max(crate::format::SB_REGION);
        match (self.mode, self.journal_size) {
            (Mode::Journal, Some(0)) => Err(invalid(
                "new volume",
                "journal mode needs a journal: a journal size of 0 is not one".into(),
            )),
            (Mode::Journal, Some(n)) => Ok(n),
            (Mode::Journal, None) => Ok((size / 16).clamp(1 << 20, 64 << 20).next_multiple_of(unit)),
            (mode, Some(_)) => Err(invalid(
                "new volume",
                format!(
                    "a journal size was given, but {} mode keeps no journal",
                    mode.name()
                ),
            )),
            (_, None) => Ok(0),
        }
    }

    /// Bytes of backend a volume with these options needs (`size` must be set).
    pub fn backing_len(&self) -> Result<u64> {
        Ok(self.geometry_for_size()?.backing_len)
    }

    fn geometry_for_size(&self) -> Result<Geometry> {
        let size = self
            .size
            .ok_or_else(|| invalid("new volume", "no size given".into()))?;
        let g = Geometry::for_size_with_groups(size, self.block_size, self.tag_slot()?, self.group_blocks)
            .map_err(|e| invalid("new volume", e.to_string()))?;
        match self.journal_len(size)? {
            0 => Ok(g),
            j => g
                .with_journal(j, None)
                .map_err(|e| invalid("new volume", e.to_string())),
        }
    }
}

/// How to open a volume.
#[derive(Clone, Debug)]
pub struct OpenOptions {
    /// Refuse writes.
    pub read_only: bool,
    /// Bytes of metadata to cache (bounded; independent of volume size).
    pub cache_bytes: usize,
    /// Bytes of written data staged before a commit is started.
    pub stage_bytes: usize,
    /// Commit full stages on a background thread, so writers keep going while the commit's
    /// writes and flushes run. Off makes the order of backend I/O deterministic (tests).
    pub background_commit: bool,
    /// How long the groups written since the last clearing stay marked dirty at the most
    /// (cleared at the first flush after that): after a crash only groups written in about
    /// this window before it are read leniently and recovered. Shorter costs one more flush
    /// whenever a commit first touches a clean group again.
    pub dirty_clear_interval: std::time::Duration,
    /// The error policy for this open; `None` keeps the one stored in the superblock.
    pub error_policy: Option<ErrorPolicy>,
    /// The key of a volume with a keyed tag profile. Checked against the superblock's
    /// key-check value before anything is written; refused for unkeyed profiles.
    pub key: Option<TagKey>,
    /// The key of the profile an online re-tag in progress switches to, when that profile is
    /// keyed: checked against the re-tag's key-check value like `key`. Used only when the
    /// superblock records a re-tag in progress (a new re-tag takes its key as an argument of
    /// [`Volume::retag`]); refused with one to an unkeyed profile.
    pub retag_key: Option<TagKey>,
    /// The profile of the re-tag in progress the opener knows of. Needed only when the
    /// superblock records a re-tag of a keyed volume to an unkeyed profile: such a record is
    /// sealed with the volume's key, but one its holder made once could be put back by
    /// someone who can write the disk (after the volume was re-tagged back to the same key),
    /// and it would make the unkeyed profile's tags — which anyone can compute — acceptable.
    /// Without it such a volume is refused (`KeyError::RetagUnconfirmed`), so a replayed
    /// record is noticed. Ignored when no such re-tag is recorded.
    pub retag_to: Option<Profile>,
}

impl Default for OpenOptions {
    fn default() -> Self {
        OpenOptions {
            read_only: false,
            cache_bytes: 64 << 20,
            stage_bytes: 32 << 20,
            background_commit: true,
            dirty_clear_interval: std::time::Duration::from_secs(2),
            error_policy: None,
            key: None,
            retag_key: None,
            retag_to: None,
        }
    }
}

/// The keys an open volume holds for its own reopens.
#[derive(Default)]
struct HeldKeys {
    /// The volume's profile's key.
    current: Option<TagKey>,
    /// The key of a re-tag's target profile, while one is in progress.
    target: Option<TagKey>,
}

/// A run of blocks that are all allocated or all unwritten.
#[derive(Clone, Copy, Debug, PartialEq, Eq, serde::Serialize)]
pub struct Extent {
    /// Byte offset.
    pub offset: u64,
    /// Length in bytes.
    pub len: u64,
    /// False for a hole: unwritten blocks that read as zeros.
    pub allocated: bool,
}

/// Where a block lives and what its metadata says, for `dump`.
#[derive(Clone, Debug, serde::Serialize)]
pub struct BlockReport {
    /// Byte offsets of the data block and its two metadata blocks.
    pub location: crate::format::BlockLocation,
    /// The metadata sector (pair of brothers) holding the block's tag.
    pub sector: u32,
    /// For each brother: its sector's state (`empty`, `valid`, or why it is invalid),
    /// generation and the block's tag in it (hex, or `unwritten`).
    pub slots: Vec<SlotReport>,
    /// The tags a read of the block accepts now (hex or `unwritten`), or why none is.
    pub accepted: Vec<String>,
    /// True if a newer version waits in the write-back stage.
    pub staged: bool,
}

/// One brother's sector as seen by [`Volume::inspect_block`].
#[derive(Clone, Debug, serde::Serialize)]
pub struct SlotReport {
    /// `empty`, `valid`, or `invalid: reason`.
    pub state: String,
    /// Generation, for valid blocks.
    pub generation: Option<u64>,
    /// The block's tag in this copy, for valid blocks.
    pub tag: Option<String>,
}

/// A block that failed verification during [`Volume::check_blocks`].
#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize)]
pub struct BlockProblem {
    /// Data block number.
    pub block: u64,
    /// What was wrong.
    pub detail: String,
}

/// Enough stripes that concurrent 1 MiB writes to different places rarely share one.
const LOCK_STRIPES: usize = 1024;

/// The engine's state, shared by the [`Volume`] handle and its background committer.
pub(crate) struct Inner {
    /// The copies the volume lives on (one for a plain volume).
    backend: Arc<crate::copies::CopySet>,
    name: String,
    sb: Superblock,
    /// Generates and verifies tags: the superblock's profile bound to the volume's UUID and,
    /// for keyed profiles, the key given at open (kept here, never in `sb`); during an online
    /// re-tag also the target profile and the cursor that says which covers a block.
    tagger: tags::Tags,
    /// The keys of the profiles in play (the volume's, and a re-tag's target's), for the
    /// engine's own reopens (mirror membership changes): they change with a re-tag.
    keys: Mutex<HeldKeys>,
    geo: Geometry,
    read_only: bool,
    warnings: Vec<String>,
    cache: MetaCache,
    /// The group bitmaps: the written-groups map, cached, and this session's dirty groups.
    maps: bitmaps::Bitmaps,
    dirty_clear_interval: std::time::Duration,
    stage: Mutex<Stage>,
    stage_limit: usize,
    /// `journal` mode: what staged blocks cost in the log; a batch never costs more than a
    /// segment may take (writers commit first), so every batch is one segment.
    segment_cost: Option<commit::journal::SegmentCost>,
    /// Serializes commits and flushes; holds what the commit protocol must remember.
    commit: Mutex<commit::CommitState>,
    /// The mirror set's current description (`None`: a plain volume); its health changes
    /// when a member is dropped.
    mirror: Mutex<Option<crate::format::MirrorInfo>>,
    /// Member records (index, sector) kept in every superblock region of a mirror member.
    records: Vec<(usize, [u8; 512])>,
    /// The superblocks on disk say "in use".
    disk_in_use: AtomicBool,
    /// The consistency mode's protocol (from the superblock).
    protocol: &'static dyn commit::protocol::Protocol,
    /// Groups loaded from disk are settled (their newest metadata describes durable data):
    /// the volume was closed cleanly before this open, or has been recovered since.
    trusted: AtomicBool,
    /// Why writes and flushes are refused, once a write-back failed or a thread panicked
    /// (see `Inner::fail`); a write-back failure is cleared by `Volume::resume`.
    failure: Mutex<Option<VolumeFailure>>,
    /// `failure` is set: the writers' lock-free check.
    failed: AtomicBool,
    /// The error policy for blocks with no good copy, and what it has seen.
    policy: policy::PolicyState,
    /// Acknowledged block writes known lost (flushes fail while any is left), for `health`.
    lost_writes: AtomicU64,
    /// Set by writers when the stage is full, to wake the committer thread.
    kick: Mutex<bool>,
    kick_cv: Condvar,
    /// Concurrent flushes share one commit and backend flush.
    flushes: group_commit::FlushSequence,
    stopping: AtomicBool,
    /// A committer thread runs (read-write volumes with `background_commit`).
    background: bool,
    /// Serialize read-modify-write and staging of the same block across threads.
    stripes: Vec<Mutex<()>>,
    /// Reads in progress: a large read is split over two threads only when it runs alone.
    reads_active: AtomicUsize,
    /// A re-tag ([`Volume::retag`]) is running.
    retag_running: AtomicBool,
    /// What recovery at open did (a read-write open of a volume left in use).
    recovered_at_open: Option<RecoveryReport>,
    stats: Stats,
}

/// Counters of what the engine had to do beyond the ordinary (see [`Volume::stats`]).
#[derive(Debug, Default)]
pub(crate) struct Stats {
    /// Metadata reads that returned different bytes than the read before.
    metadata_rereads: AtomicU64,
    /// Reads whose first verification failed but a careful second look passed.
    reads_retried: AtomicU64,
    /// Calls of `flush` on a writable volume.
    flush_calls: AtomicU64,
    /// Commit-and-flush rounds run for them.
    flush_rounds: AtomicU64,
    /// Blocks read from the backend and verified.
    blocks_verified: AtomicU64,
    /// Blocks whose copy as read failed verification for good (after the careful re-read).
    corruption_detected: AtomicU64,
    /// Blocks rewritten on a mirror member from a good copy (read repair).
    repairs: AtomicU64,
    /// Blocks no mirror member held a good copy of.
    unrepairable: AtomicU64,
    /// Mirror members dropped for failing.
    members_failed: AtomicU64,
}

/// A snapshot of the engine's counters.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, serde::Serialize)]
#[non_exhaustive]
pub struct VolumeStats {
    /// Metadata reads that returned different bytes than the read before (transient read
    /// faults caught before they were trusted).
    pub metadata_rereads: u64,
    /// Reads whose first verification failed but passed when looked at again with commits
    /// excluded (a commit racing the read, or a transient read fault).
    pub reads_retried: u64,
    /// Calls of [`Volume::flush`] on a writable volume.
    pub flush_calls: u64,
    /// Commit-and-flush rounds run for those calls: fewer when concurrent callers shared one
    /// (group commit).
    pub flush_rounds: u64,
    /// Blocks read from the medium and verified by client reads (staged blocks, served from
    /// memory, are not counted).
    pub blocks_verified: u64,
    /// Blocks a client read found bad (their copy failed verification, also when looked at
    /// again with commits excluded): each was then repaired from another mirror member or
    /// reported unrepairable.
    pub corruption_detected: u64,
    /// Block copies on a mirror member that failed verification (or could not be read) and
    /// were rewritten from a member whose copy verified (read repair).
    pub repairs: u64,
    /// Blocks that failed verification on every mirror member in sync.
    pub unrepairable: u64,
    /// Mirror members dropped from the set for failing writes, flushes or repairs.
    pub members_failed: u64,
}

impl std::fmt::Debug for Volume {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Volume")
            .field("name", &self.inner.name)
            .field("geometry", &self.inner.geo)
            .finish_non_exhaustive()
    }
}

fn invalid(volume: &str, detail: String) -> Error {
    Error::InvalidArgument {
        volume: volume.to_string(),
        detail,
    }
}

impl Inner {
    /// Locks `m`. A poisoned lock means a thread panicked while holding it: an invariant of
    /// the engine may be broken, so the volume is failed (writes and flushes refuse, reads go
    /// on) instead of carrying on as if nothing happened.
    pub(crate) fn lock<'a, T>(&self, m: &'a Mutex<T>) -> MutexGuard<'a, T> {
        m.lock().unwrap_or_else(|poisoned| {
            self.fail_poisoned::<T>();
            poisoned.into_inner()
        })
    }

    /// Waits on `cv`, failing the volume like [`Inner::lock`] if the lock comes back poisoned.
    pub(crate) fn wait<'a, T>(&self, cv: &Condvar, guard: MutexGuard<'a, T>) -> MutexGuard<'a, T> {
        cv.wait(guard).unwrap_or_else(|poisoned| {
            self.fail_poisoned::<T>();
            poisoned.into_inner()
        })
    }

    fn fail_poisoned<T>(&self) {
        let what = std::any::type_name::<T>();
        if self.failure().is_none_or(|f| f.resumable) {
            tracing::error!(volume = %self.name, lock = what, "a thread panicked while holding a lock of the engine: failing the volume");
        }
        self.fail_for_good(format!(
            "a thread panicked while holding a lock of the engine ({what}): its state may be inconsistent"
        ));
    }
}

impl Inner {
    /// Options to reopen this volume with after closing it: the defaults, and its key.
    fn reopen_options(&self) -> OpenOptions {
        let keys = self
            .keys
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        OpenOptions {
            key: keys.current.clone(),
            retag_key: keys.target.clone(),
            retag_to: self.tagger.target().map(|t| t.profile()),
            ..OpenOptions::default()
        }
    }

    /// Runs `f` on the keys held for reopens.
    fn with_keys(&self, f: impl FnOnce(&mut HeldKeys)) {
        f(&mut self
            .keys
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner));
    }

    fn size(&self) -> u64 {
        self.geo.size()
    }

    fn check_range(&self, offset: u64, len: u64) -> Result<()> {
        match offset.checked_add(len) {
            Some(end) if end <= self.size() => Ok(()),
            _ => Err(Error::OutOfRange {
                volume: self.name.clone(),
                offset,
                len,
                size: self.size(),
            }),
        }
    }

    fn io_err(&self, during: &'static str, offset: u64) -> impl FnOnce(std::io::Error) -> Error + '_ {
        move |source| Error::Io {
            volume: self.name.clone(),
            during,
            offset,
            source,
        }
    }

    /// The background committer: commits whenever a writer reports a full stage.
    fn run_committer(&self) {
        loop {
            {
                let mut kick = self.lock(&self.kick);
                while !*kick {
                    kick = self.wait(&self.kick_cv, kick);
                }
                *kick = false;
            }
            if self.stopping.load(Ordering::Acquire) {
                return;
            }
            let mut state = self.lock(&self.commit);
            // Under the `read-only` policy's suspension nothing new is committed (flushes
            // refuse to, and close leaves it unwritten).
            if self.lock(&self.stage).active_bytes >= self.stage_limit && !self.policy.is_suspended() {
                // A failure is recorded in the commit state and reported by the next write
                // or flush.
                let _ = self.commit_locked(&mut state);
            }
        }
    }

    fn shutdown(&self) -> Result<()> {
        if self.read_only {
            return Ok(());
        }
        // Under the `read-only` error policy's suspension nothing new reaches the disk, also
        // at close: what is staged is left unwritten (and reported).
        let unwritten = self.drop_suspended_stage();
        let mut m = self.maintenance("flushing")?;
        // Nothing is unsettled: the dirty map is cleared (it does not need to be durable before
        // the clean marking — a clean volume ignores it — nor after: a stale dirty bit only
        // makes a group read leniently after a crash).
        self.clear_session_if_due(std::time::Duration::ZERO, true)?;
        // Clean: every pair's newest sector describes durable data. Blocks that could not be
        // kept do not change that (neither their data nor their tags were written), so their
        // loss is reported after the marking.
        if m.marked_in_use() && self.trusted.load(Ordering::Acquire) {
            m.mark_clean("marking the volume clean")?;
        }
        self.lost_writes(m.state())?;
        unwritten.map_or(Ok(()), Err)
    }
}

/// An open blockguard volume: verified reads, crash-consistent writes. Share it between
/// threads with `Arc`; every method takes `&self`.
pub struct Volume {
    inner: Arc<Inner>,
    committer: Option<std::thread::JoinHandle<()>>,
}

impl Volume {
    fn start(inner: Inner) -> Volume {
        let inner = Arc::new(inner);
        let committer = if inner.background {
            let i = inner.clone();
            std::thread::Builder::new()
                .name("blockguard-commit".into())
                .spawn(move || i.run_committer())
                .ok()
        } else {
            None
        };
        Volume { inner, committer }
    }

    /// The volume's name (the backend's, usually its path).
    pub fn name(&self) -> &str {
        &self.inner.name
    }
    /// Logical size in bytes.
    pub fn size(&self) -> u64 {
        self.inner.geo.size()
    }
    /// Logical block size in bytes.
    pub fn block_size(&self) -> u32 {
        self.inner.geo.block_size
    }
    /// True if writes are refused.
    pub fn is_read_only(&self) -> bool {
        self.inner.read_only
    }
    /// The superblock in use (as read at open).
    pub fn superblock(&self) -> &Superblock {
        &self.inner.sb
    }
    /// The layout.
    pub fn geometry(&self) -> &Geometry {
        &self.inner.geo
    }
    /// Problems found while opening that did not prevent it (e.g. a damaged superblock copy).
    pub fn warnings(&self) -> &[String] {
        &self.inner.warnings
    }

    /// Reads `buf.len()` bytes at `offset`. Every block touched is verified first; a block
    /// that fails returns [`Error::Corrupt`] and no data.
    pub fn read_at(&self, buf: &mut [u8], offset: u64) -> Result<()> {
        self.inner.read_at(buf, offset)
    }

    /// Writes `buf` at `offset` (any alignment: partial blocks are read, verified, merged).
    /// The write is visible to reads at once and durable after the next [`Volume::flush`].
    pub fn write_at(&self, buf: &[u8], offset: u64) -> Result<()> {
        self.inner.write_at(buf, offset)
    }

    /// [`Volume::write_at`] that takes ownership of the bytes instead of copying them: the
    /// whole blocks of the write stay in `data` until they reach the backend, then `data`
    /// is dropped (a buffer pool can take it back in its `Drop`). Saves one copy per write
    /// for callers that already own their buffer, such as a network server.
    ///
    /// ```
    /// # use std::sync::Arc;
    /// # use blockguard::{Volume, FormatOptions, OpenOptions};
    /// # use blockguard::blockguard_backend::MemoryBackend;
    /// # let backend = Arc::new(MemoryBackend::new(8 << 20).unwrap());
    /// # Volume::format(backend.clone(), &FormatOptions::with_size(4 << 20)).unwrap();
    /// # let volume = Volume::open(backend, &OpenOptions::default()).unwrap();
    /// volume.write_owned(vec![7u8; 8192], 4096)?;
    /// let mut back = vec![0u8; 8192];
    /// volume.read_at(&mut back, 4096)?;
    /// assert_eq!(back, vec![7u8; 8192]);
    /// # Ok::<(), blockguard::Error>(())
    /// ```
    pub fn write_owned<B: AsRef<[u8]> + Send + Sync + 'static>(&self, data: B, offset: u64) -> Result<()> {
        let data: SharedBuf = Arc::new(data);
        self.inner
            .write_impl(stage::bytes(&data), Some(data.clone()), offset, None)
    }

    /// Makes the range read as zeros. Whole blocks become unwritten (their space is
    /// released); partial blocks at the edges are zero-filled.
    pub fn write_zeroes(&self, offset: u64, len: u64) -> Result<()> {
        self.inner.write_zeroes(offset, len)
    }

    /// Discards the range: afterwards it reads as zeros (like [`Volume::write_zeroes`], which
    /// already releases the space of whole blocks).
    pub fn discard(&self, offset: u64, len: u64) -> Result<()> {
        self.inner.write_zeroes(offset, len)
    }

    /// Makes every write that completed before this call durable.
    pub fn flush(&self) -> Result<()> {
        self.inner.flush()
    }

    /// `journal` mode: the journal's sizes (with the largest atomic write) and fill; `None`
    /// in the other modes.
    pub fn journal(&self) -> Option<JournalStatus> {
        self.inner.journal_status()
    }

    /// Allocation status of a byte range, as runs of allocated and unwritten blocks.
    pub fn extents(&self, offset: u64, len: u64) -> Result<Vec<Extent>> {
        self.inner.extents(offset, len)
    }

    /// Verifies `count` blocks from `first` without stopping at the first failure: the
    /// engine of `check` and scrubbing. I/O errors still abort.
    pub fn check_blocks(&self, first: u64, count: u64) -> Result<Vec<BlockProblem>> {
        self.inner.check_blocks(first, count)
    }

    /// Where `block` lives and what both metadata copies say about it.
    pub fn inspect_block(&self, block: u64) -> Result<BlockReport> {
        self.inner.inspect_block(block)
    }

    /// Settles the volume against the disk and, with [`RecoverOptions::rebuild_damaged`],
    /// rewrites every damaged metadata brother from its valid partner.
    ///
    /// A read-write open of a volume left in use already settles it (see
    /// [`Volume::open_with_progress`]), so without `rebuild_damaged` this flushes and does
    /// nothing else. What is and is not detected afterwards:
    /// - settled groups accept only their newest tags, so a lost, misdirected or rolled-back
    ///   write of any block is reported when the block is read (G3, G4);
    /// - before recovery could run, a write lost in the crash window itself cannot be told
    ///   from one the crash legitimately discarded: both leave the older version, which is
    ///   then accepted (nothing else is);
    /// - damaged metadata (an invalid sector, or a blank one where no crash explains it)
    ///   makes the blocks it covers fail as [`crate::CorruptionKind::MetadataDamaged`]; a
    ///   rebuild makes them readable again under the valid brother's tags, which may describe
    ///   an older version of some of them than the lost brother did — the report lists every
    ///   such sector.
    ///
    /// `progress(groups_done, groups_total)` reports progress.
    pub fn recover(
        &self,
        opts: RecoverOptions,
        mut progress: impl FnMut(u64, u64),
    ) -> Result<RecoveryReport> {
        self.inner.recover(opts, &mut progress)
    }

    /// The first block at or after `from` that the metadata says was written (and not
    /// discarded since), or whose metadata cannot be trusted; `None` if every block from
    /// `from` on is unwritten. Reads metadata only, skipping regions the backend proves never
    /// written: what `import` asks before it overwrites a volume.
    pub fn first_written_block(&self, from: u64) -> Result<Option<u64>> {
        self.inner.first_written_block(from)
    }

    /// Every metadata sector of groups `first..first + count` whose tags cannot be trusted:
    /// the metadata half of `check`.
    pub fn check_metadata(&self, first: u64, count: u64) -> Result<Vec<MetadataProblem>> {
        self.inner.check_metadata(first, count)
    }

    /// Problems of the written-groups map (the record of which groups were ever written, which
    /// lets a wiped group be told from a never-written one): the map half of `check`.
    pub fn check_map(&self) -> Result<Vec<MapProblem>> {
        self.inner.check_map()
    }

    /// What the recovery run by this open did, if the volume was left in use and opened
    /// read-write.
    pub fn recovery_at_open(&self) -> Option<&RecoveryReport> {
        self.inner.recovered_at_open.as_ref()
    }

    /// Counters of faults the engine met and got around.
    pub fn stats(&self) -> VolumeStats {
        VolumeStats {
            metadata_rereads: self.inner.stats.metadata_rereads.load(Ordering::Relaxed),
            reads_retried: self.inner.stats.reads_retried.load(Ordering::Relaxed),
            flush_calls: self.inner.stats.flush_calls.load(Ordering::Relaxed),
            flush_rounds: self.inner.stats.flush_rounds.load(Ordering::Relaxed),
            blocks_verified: self.inner.stats.blocks_verified.load(Ordering::Relaxed),
            corruption_detected: self.inner.stats.corruption_detected.load(Ordering::Relaxed),
            repairs: self.inner.stats.repairs.load(Ordering::Relaxed),
            unrepairable: self.inner.stats.unrepairable.load(Ordering::Relaxed),
            members_failed: self.inner.stats.members_failed.load(Ordering::Relaxed),
        }
    }

    /// Flushes and closes the volume, marking it clean when that is safe.
    pub fn close(mut self) -> Result<()> {
        self.stop_committer();
        self.inner.shutdown()
    }

    fn stop_committer(&mut self) {
        if let Some(handle) = self.committer.take() {
            self.inner.stopping.store(true, Ordering::Release);
            *self.inner.lock(&self.inner.kick) = true;
            self.inner.kick_cv.notify_one();
            if handle.join().is_err() {
                // The committer panicked: whatever it was doing may be half done.
                self.inner
                    .fail_for_good("the background committer thread panicked".into());
            }
        }
    }
}

impl Drop for Volume {
    fn drop(&mut self) {
        self.stop_committer();
        if let Err(e) = self.inner.shutdown() {
            // The whole chain: an I/O error's message leaves its cause to `source()`.
            let mut msg = e.to_string();
            let mut cause = std::error::Error::source(&e);
            while let Some(c) = cause {
                msg.push_str(": ");
                msg.push_str(&c.to_string());
                cause = c.source();
            }
            tracing::error!(volume = %self.inner.name, "flush on close failed: {msg}");
        }
    }
}

fn relabel(e: Error, name: &str) -> Error {
    match e {
        Error::InvalidArgument { detail, .. } => invalid(name, detail),
        other => other,
    }
}

/// A buffer whose start is aligned to `align` (for `O_DIRECT` backends), built without
/// unsafe code by over-allocating and slicing.
pub(crate) struct Aligned {
    buf: Vec<u8>,
    start: usize,
    len: usize,
}

fn aligned(len: usize, align: usize) -> Aligned {
    let buf = vec![0u8; len + align];
    let start = (align - buf.as_ptr() as usize % align) % align;
    Aligned { buf, start, len }
}

impl AsRef<[u8]> for Aligned {
    fn as_ref(&self) -> &[u8] {
        &self.buf[self.start..self.start + self.len]
    }
}

impl AsMut<[u8]> for Aligned {
    fn as_mut(&mut self) -> &mut [u8] {
        &mut self.buf[self.start..self.start + self.len]
    }
}

#[allow(dead_code)] // A compile-time check: it only has to type-check, never to run.
fn _assert_send_sync() {
    fn is<T: Send + Sync>() {}
    is::<Volume>();
    let _ = Tag::from_bytes;
}
