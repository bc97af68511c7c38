//! The volume engine: verified reads, crash-consistent writes, flush and discard over a
//! [`Backend`]. Synchronous and thread-safe: share a `Volume` between threads with `Arc`.
//!
//! Writes are staged in memory (bounded) and committed in batches; see `commit.rs` for the
//! `dual` protocol and `docs/CONSISTENCY.md` for why it keeps G1 and G2.

mod cache;
mod commit;
mod group;
mod recover;
mod stage;

pub use recover::RecoveryReport;

use crate::error::{CorruptionKind, Error, Result};
use crate::format::{
    validate_label, Geometry, MetaBlock, MetaParse, Mode, Superblock, SuperblockError, VolumeState,
    FORMAT_VERSION, SB_REGION, SB_STRUCT_SIZE, SUPPORTED_RO_COMPAT,
};
use crate::tag::{Profile, Tag};
use blockguard_backend::Backend;
use cache::MetaCache;
use group::{Accept, GroupState};
use stage::{SharedBuf, Stage, Staged};
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
    /// Volume UUID; random when `None`.
    pub uuid: Option<[u8; 16]>,
    /// Free-form label (up to 64 bytes are kept).
    pub label: String,
    /// The backend is known to read as all zeros (a freshly created sparse file), so format
    /// writes only the superblocks. Otherwise the whole backend is zeroed first, because
    /// unwritten blocks must read as zeros.
    pub assume_zeroed: bool,
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
            uuid: None,
            label: String::new(),
            assume_zeroed: true,
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
        Geometry::for_size(size, self.block_size, self.profile.tag_size())
            .map_err(|e| invalid("new volume", e.to_string()))
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
}

impl Default for OpenOptions {
    fn default() -> Self {
        OpenOptions {
            read_only: false,
            cache_bytes: 64 << 20,
            stage_bytes: 32 << 20,
            background_commit: true,
        }
    }
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
    /// For each brother: its state (`empty`, `valid`, or why it is invalid), generation and
    /// the block's tag in it (hex, or `unwritten`).
    pub slots: Vec<SlotReport>,
    /// True if a newer version waits in the write-back stage.
    pub staged: bool,
}

/// One brother metadata block as seen by [`Volume::inspect_block`].
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

/// Reads of at least this many whole-block bytes are verified on two threads.
const PARALLEL_READ_MIN: usize = 256 << 10;

/// The engine's state, shared by the [`Volume`] handle and its background committer.
pub(crate) struct Inner {
    backend: Arc<dyn Backend>,
    name: String,
    sb: Superblock,
    geo: Geometry,
    read_only: bool,
    warnings: Vec<String>,
    cache: MetaCache,
    stage: Mutex<Stage>,
    stage_limit: usize,
    /// Serializes commits and flushes; holds what the commit protocol must remember.
    commit: Mutex<commit::CommitState>,
    /// Highest commit epoch whose data is known durable.
    durable_epoch: AtomicU64,
    /// Groups loaded from disk are settled (their newest metadata describes durable data):
    /// the volume was closed cleanly before this open, or has been recovered since.
    trusted: AtomicBool,
    /// Set once when a write-back fails (see `Inner::fail`).
    failure: std::sync::OnceLock<String>,
    /// Set by writers when the stage is full, to wake the committer thread.
    kick: Mutex<bool>,
    kick_cv: Condvar,
    stopping: AtomicBool,
    /// A committer thread runs (read-write volumes with `background_commit`).
    background: bool,
    /// Serialize read-modify-write and staging of the same block across threads.
    stripes: Vec<Mutex<()>>,
    /// Reads in progress: a large read is split over two threads only when it runs alone.
    reads_active: AtomicUsize,
}

/// Counts a read in progress for as long as it lives.
struct ActiveRead<'a>(&'a AtomicUsize);

impl<'a> ActiveRead<'a> {
    /// Enters; returns the guard and whether no other read was in progress.
    fn enter(count: &'a AtomicUsize) -> (Self, bool) {
        let before = count.fetch_add(1, Ordering::Relaxed);
        (Self(count), before == 0)
    }
}

impl Drop for ActiveRead<'_> {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::Relaxed);
    }
}

impl std::fmt::Debug for Volume {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Volume")
            .field("name", &self.inner.name)
            .field("geometry", &self.inner.geo)
            .finish()
    }
}

fn invalid(volume: &str, detail: String) -> Error {
    Error::InvalidArgument {
        volume: volume.to_string(),
        detail,
    }
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

impl Volume {
    /// Formats `backend` as a new volume and opens it read-write.
    ///
    /// Writes the two superblock copies (and, unless `assume_zeroed`, zeroes the backend
    /// first): O(1) on a fresh sparse file whatever its size.
    pub fn format(backend: Arc<dyn Backend>, opts: &FormatOptions) -> Result<Volume> {
        Self::format_with_progress(backend, opts, &mut |_, _| {})
    }

    /// [`Volume::format`] reporting `(bytes_done, bytes_total)` while zeroing.
    pub fn format_with_progress(
        backend: Arc<dyn Backend>,
        opts: &FormatOptions,
        progress: &mut dyn FnMut(u64, u64),
    ) -> Result<Volume> {
        let name = backend.name();
        let len = backend.len();
        validate_label(&opts.label).map_err(|e| invalid(&name, e))?;
        let tag_size = opts.profile.tag_size();
        let geo = match opts.size {
            Some(size) => {
                let g = opts.geometry_for_size().map_err(|e| relabel(e, &name))?;
                if g.backing_len > len {
                    return Err(invalid(
                        &name,
                        format!(
                            "a {size}-byte volume needs {} bytes of backend, it has {len}",
                            g.backing_len
                        ),
                    ));
                }
                // On a larger backend (a device) the backup superblock goes to its end.
                Geometry::from_parts(opts.block_size, tag_size, g.group_blocks, g.data_blocks, len)
                    .ok_or_else(|| invalid(&name, format!("a {size}-byte volume does not fit {len} bytes")))?
            }
            None => Geometry::for_backing_len(len, opts.block_size, tag_size)
                .map_err(|e| invalid(&name, e.to_string()))?,
        };
        let uuid = opts.uuid.unwrap_or_else(rand::random);
        let created = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_secs())
            .unwrap_or(0);
        let sb = Superblock {
            version: FORMAT_VERSION,
            compat: 0,
            ro_compat: 0,
            incompat: 0,
            uuid,
            profile: opts.profile,
            mode: opts.mode,
            geometry: geo,
            created,
            mirror_set: [0; 16],
            mirror_role: 0,
            meta_device: [0; 16],
            label: opts.label.clone(),
            state: VolumeState::Clean,
        };
        let io = |during: &'static str, offset: u64| {
            let name = name.clone();
            move |source| Error::Io {
                volume: name,
                during,
                offset,
                source,
            }
        };
        if !opts.assume_zeroed {
            const CHUNK: u64 = 1 << 30;
            let mut off = 0;
            while off < len {
                let n = CHUNK.min(len - off);
                backend
                    .zero_range(off, n)
                    .map_err(io("zeroing the backend", off))?;
                off += n;
                progress(off, len);
            }
        }
        // Backup first: a crash before the primary lands leaves no volume rather than half of one.
        backend
            .write_at(&sb.encode(1), geo.backup_sb_offset)
            .map_err(io("writing the backup superblock", geo.backup_sb_offset))?;
        backend.flush().map_err(io("flushing", 0))?;
        backend
            .write_at(&sb.encode(0), 0)
            .map_err(io("writing the primary superblock", 0))?;
        backend.flush().map_err(io("flushing", 0))?;
        Self::open(backend, &OpenOptions::default())
    }

    /// Opens an existing volume. A damaged superblock copy is reported in
    /// [`Volume::warnings`] (and rewritten from the good copy when opened read-write).
    pub fn open(backend: Arc<dyn Backend>, opts: &OpenOptions) -> Result<Volume> {
        let name = backend.name();
        let len = backend.len();
        let read_sb = |offset: u64| -> Result<std::result::Result<Superblock, SuperblockError>> {
            let mut b = vec![0u8; SB_STRUCT_SIZE];
            backend.read_at(&mut b, offset).map_err(|source| Error::Io {
                volume: name.clone(),
                during: "reading a superblock",
                offset,
                source,
            })?;
            Ok(Superblock::decode(&b).map(|(sb, _)| sb))
        };
        if len < 2 * SB_REGION {
            return Err(Error::NotAVolume {
                volume: name,
                detail: format!("only {len} bytes, too small to hold a volume"),
            });
        }
        let primary = read_sb(0)?;
        // The backup lives in the last 4 KiB of the backend as it was at format; the primary
        // records where that is, which matters if the file or device has grown since.
        let end_backup = len / SB_REGION * SB_REGION - SB_REGION;
        let backup_at = match &primary {
            Ok(p) if p.geometry.backup_sb_offset + SB_REGION <= len => p.geometry.backup_sb_offset,
            _ => end_backup,
        };
        let backup = read_sb(backup_at)?;
        // A copy from a newer version is not damage: never open (or "repair") from the other.
        for e in [&primary, &backup].into_iter().filter_map(|r| r.as_ref().err()) {
            if e.is_unsupported() {
                return Err(Error::Unsupported {
                    volume: name,
                    detail: e.to_string(),
                });
            }
        }
        let mut warnings = Vec::new();
        let sb = match (primary, backup) {
            (Ok(p), Ok(b)) => {
                let same = Superblock {
                    state: p.state,
                    ..b.clone()
                } == p;
                if !same {
                    warnings.push(format!("{name}: superblock copies differ; using the primary"));
                }
                // A crash between updating the two copies: either saying "in use" wins.
                let mut p = p;
                if b.state == VolumeState::InUse {
                    p.state = VolumeState::InUse;
                }
                p
            }
            (Ok(p), Err(e)) => {
                warnings.push(format!(
                    "{name}: backup superblock unusable ({e}); opened from the primary"
                ));
                p
            }
            (Err(e), Ok(b)) => {
                warnings.push(format!(
                    "{name}: primary superblock unusable ({e}); opened from the backup"
                ));
                b
            }
            (Err(p), Err(b)) => {
                let magic = |e: &SuperblockError| matches!(e, SuperblockError::BadMagic { .. });
                return Err(if magic(&p) && magic(&b) {
                    Error::NotAVolume {
                        volume: name,
                        detail: "no superblock at the start or the end".into(),
                    }
                } else {
                    Error::SuperblockDamaged {
                        volume: name,
                        primary: p.to_string(),
                        backup: b.to_string(),
                    }
                });
            }
        };
        // With one copy unusable the other's state is still trustworthy: both markings write
        // the primary first, so a readable copy saying "clean" was never followed by a commit.
        let geo = sb.geometry;
        if len < geo.backing_len {
            return Err(Error::Truncated {
                volume: name,
                expected: geo.backing_len,
                actual: len,
            });
        }
        if backend.alignment() > geo.block_size as usize {
            return Err(invalid(
                &name,
                format!(
                    "the backend needs {}-byte aligned I/O, larger than the volume's {}-byte blocks",
                    backend.alignment(),
                    geo.block_size
                ),
            ));
        }
        // Unknown read-only-compatible features: reading is safe, writing could break them.
        let read_only = opts.read_only || backend.is_read_only() || sb.ro_compat & !SUPPORTED_RO_COMPAT != 0;
        let group_bytes = 2 * geo.block_size as usize + 256;
        let vol = Inner {
            failure: std::sync::OnceLock::new(),
            kick: Mutex::new(false),
            kick_cv: Condvar::new(),
            stopping: AtomicBool::new(false),
            background: opts.background_commit && !read_only,
            cache: MetaCache::new((opts.cache_bytes / group_bytes).max(16)),
            stage: Mutex::new(Stage::default()),
            stage_limit: opts.stage_bytes.max(geo.block_size as usize),
            commit: Mutex::new(commit::CommitState::default()),
            durable_epoch: AtomicU64::new(0),
            trusted: AtomicBool::new(sb.state == VolumeState::Clean),
            stripes: (0..LOCK_STRIPES).map(|_| Mutex::new(())).collect(),
            reads_active: AtomicUsize::new(0),
            backend,
            name,
            sb,
            geo,
            read_only,
            warnings,
        };
        if !vol.read_only && !vol.warnings.is_empty() {
            vol.repair_superblocks()?;
        }
        Ok(Volume::start(vol))
    }
}

impl Inner {
    /// Rewrites both superblock copies from the one in use (self-healing after damage).
    fn repair_superblocks(&self) -> Result<()> {
        self.write_superblocks(self.sb.state, "repairing a superblock")?;
        tracing::warn!(volume = %self.name, "rewrote damaged superblock copy");
        Ok(())
    }

    /// Writes both superblock copies with `state`, then flushes.
    pub(crate) fn write_superblocks(&self, state: VolumeState, during: &'static str) -> Result<()> {
        let sb = Superblock {
            state,
            ..self.sb.clone()
        };
        let backup_at = self.geo.backup_sb_offset;
        self.backend
            .write_at(&sb.encode(0), 0)
            .map_err(self.io_err(during, 0))?;
        self.backend
            .write_at(&sb.encode(1), backup_at)
            .map_err(self.io_err(during, backup_at))?;
        self.backend.flush().map_err(self.io_err(during, 0))
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

    /// The metadata state of `group`, loading it from disk on a miss.
    fn group(&self, group: u64) -> Result<Arc<GroupState>> {
        let mut shard = self.cache.lock(group);
        if let Some(s) = shard.get(group) {
            return Ok(s);
        }
        let state = Arc::new(self.load_group(group)?);
        shard.put(group, state.clone());
        Ok(state)
    }

    fn load_group(&self, group: u64) -> Result<GroupState> {
        let bs = self.geo.block_size as usize;
        let mut buf = vec![0u8; 2 * bs];
        let off = self.geo.meta_offset(group, 0);
        self.backend_read(&mut buf, off, "reading metadata")?;
        let count = self.geo.blocks_in_group(group);
        let ts = self.geo.tag_size as usize;
        let parse =
            |s: usize| MetaBlock::decode(&buf[s * bs..(s + 1) * bs], &self.sb.uuid, group, s, count, ts);
        let slots = [parse(0), parse(1)];
        for (s, p) in slots.iter().enumerate() {
            if let MetaParse::Invalid(why) = p {
                tracing::warn!(volume = %self.name, group, slot = s, "metadata block unusable: {why}");
            }
        }
        Ok(GroupState {
            slots,
            // Epoch 0 is settled from the start; `None` never is.
            written_epoch: self.trusted.load(Ordering::Acquire).then_some(0),
        })
    }

    /// Reads from the backend, through an aligned bounce buffer when the backend needs one.
    fn backend_read(&self, buf: &mut [u8], offset: u64, during: &'static str) -> Result<()> {
        let align = self.backend.alignment();
        if align <= 1 || ((buf.as_ptr() as usize).is_multiple_of(align) && buf.len().is_multiple_of(align)) {
            return self
                .backend
                .read_at(buf, offset)
                .map_err(self.io_err(during, offset));
        }
        let mut bounce = aligned(buf.len(), align);
        self.backend
            .read_at(bounce.as_mut(), offset)
            .map_err(self.io_err(during, offset))?;
        buf.copy_from_slice(bounce.as_ref());
        Ok(())
    }

    fn settled(&self, state: &GroupState) -> bool {
        state
            .written_epoch
            .is_some_and(|e| e <= self.durable_epoch.load(Ordering::Acquire))
    }

    /// Verifies `data` as the content of `block`.
    fn verify(&self, block: u64, data: &[u8], accept: &Accept) -> Result<()> {
        let profile = self.sb.profile;
        if accept.any(|t| profile.verify(&self.sb.uuid, block, data, t)) {
            return Ok(());
        }
        let (kind, detail) = match accept {
            Accept::Damaged(why) => (
                CorruptionKind::MetadataDamaged,
                format!("its tags cannot be trusted: {why}"),
            ),
            Accept::One(t) if t.is_unwritten() => (
                CorruptionKind::UnwrittenNotZero,
                "metadata says the block was never written, but it holds data".to_string(),
            ),
            Accept::One(t) | Accept::Either(t, _) => {
                let computed = profile.generate(&self.sb.uuid, block, data);
                let expected = match accept {
                    Accept::Either(a, b) => format!("{a} or {b}"),
                    _ => t.to_string(),
                };
                (
                    CorruptionKind::TagMismatch,
                    format!("expected tag {expected}, data has {computed}"),
                )
            }
        };
        Err(Error::Corrupt {
            volume: self.name.clone(),
            block,
            kind,
            detail,
        })
    }

    /// Reads `buf.len()` bytes at `offset`. Every block touched is verified first; a block
    /// that fails returns [`Error::Corrupt`] and no data.
    pub fn read_at(&self, buf: &mut [u8], offset: u64) -> Result<()> {
        self.check_range(offset, buf.len() as u64)?;
        let bs = self.geo.block_size as u64;
        let end = offset + buf.len() as u64;
        let (full_first, full_end) = (offset.div_ceil(bs), end / bs);
        if full_first >= full_end {
            return self.read_partial(buf, offset);
        }
        let head = (full_first * bs - offset) as usize;
        let tail = (end - full_end * bs) as usize;
        let (head_buf, rest) = buf.split_at_mut(head);
        let mid_len = rest.len() - tail;
        let (mid, tail_buf) = rest.split_at_mut(mid_len);
        if head > 0 {
            self.read_partial(head_buf, offset)?;
        }
        if tail > 0 {
            self.read_partial(tail_buf, full_end * bs)?;
        }
        // A large read running alone is split in two halves verified on two cores:
        // checksumming runs at about the speed of the page-cache copy, so one thread alone
        // would halve hot-read throughput. Concurrent reads already keep the cores busy; for
        // them the hand-off would only add context switches.
        let (_active, alone) = ActiveRead::enter(&self.reads_active);
        let parallel = alone && mid_len >= PARALLEL_READ_MIN && rayon::current_num_threads() > 1;
        let total = full_end - full_first;
        let max_piece = if parallel { total.div_ceil(2) } else { total };
        let mut pieces: Vec<(u64, &mut [u8])> = Vec::new();
        let (mut block, mut rest) = (full_first, mid);
        while !rest.is_empty() {
            let (group, _) = self.geo.group_of(block);
            let group_end = self.geo.first_block(group) + self.geo.blocks_in_group(group) as u64;
            let n = (group_end - block).min(max_piece).min(rest.len() as u64 / bs);
            let (piece, r) = std::mem::take(&mut rest).split_at_mut((n * bs) as usize);
            pieces.push((block, piece));
            rest = r;
            block += n;
        }
        if !parallel || pieces.len() < 2 {
            return pieces.into_iter().try_for_each(|(b, p)| self.read_blocks(b, p));
        }
        let midpoint = full_first + max_piece;
        let split = pieces
            .iter()
            .position(|(b, _)| *b >= midpoint)
            .unwrap_or(pieces.len());
        let second = pieces.split_off(split);
        let mut theirs = Ok(());
        let mut mine = Ok(());
        rayon::in_place_scope(|scope| {
            scope.spawn(|_| theirs = second.into_iter().try_for_each(|(b, p)| self.read_blocks(b, p)));
            mine = pieces.into_iter().try_for_each(|(b, p)| self.read_blocks(b, p));
        });
        mine.and(theirs)
    }

    /// Reads a range inside one block, or straddling two, through a block-sized buffer.
    fn read_partial(&self, buf: &mut [u8], offset: u64) -> Result<()> {
        let bs = self.geo.block_size as u64;
        let mut tmp = vec![0u8; bs as usize];
        let mut done = 0usize;
        while done < buf.len() {
            let pos = offset + done as u64;
            let in_block = (pos % bs) as usize;
            let n = (bs as usize - in_block).min(buf.len() - done);
            self.read_blocks(pos / bs, &mut tmp)?;
            buf[done..done + n].copy_from_slice(&tmp[in_block..in_block + n]);
            done += n;
        }
        Ok(())
    }

    /// Reads and verifies consecutive whole blocks of one group into `out`.
    fn read_blocks(&self, first: u64, out: &mut [u8]) -> Result<()> {
        let bs = self.geo.block_size as usize;
        let count = out.len() / bs;
        debug_assert_eq!(out.len() % bs, 0);
        debug_assert_eq!(
            self.geo.group_of(first).0,
            self.geo.group_of(first + count as u64 - 1).0
        );
        // Staged blocks are served from memory; the rest in runs from the backend.
        let mut staged = Vec::new();
        {
            let stage = lock(&self.stage);
            if stage.is_empty() {
                drop(stage);
                return self.read_run(first, out);
            }
            staged.resize(count, false);
            for (i, is_staged) in staged.iter_mut().enumerate() {
                if let Some(entry) = stage.get(first + i as u64) {
                    copy_staged(entry, &mut out[i * bs..(i + 1) * bs]);
                    *is_staged = true;
                }
            }
        }
        let mut i = 0;
        while i < count {
            if staged[i] {
                i += 1;
                continue;
            }
            let mut j = i;
            while j < count && !staged[j] {
                j += 1;
            }
            self.read_run(first + i as u64, &mut out[i * bs..j * bs])?;
            i = j;
        }
        Ok(())
    }

    /// Reads unstaged consecutive blocks of one group from the backend and verifies them.
    fn read_run(&self, first: u64, dst: &mut [u8]) -> Result<()> {
        self.backend_read(dst, self.geo.data_offset(first), "reading data")?;
        if let Err(e) = self.verify_run(first, dst) {
            self.reread_settled(first, dst).map_err(|_| e)?;
        }
        Ok(())
    }

    fn verify_run(&self, first: u64, data: &[u8]) -> Result<()> {
        let bs = self.geo.block_size as usize;
        let (group, index) = self.geo.group_of(first);
        let state = self.group(group)?;
        let settled = self.settled(&state);
        let newest = state.newest().map(|(_, m)| m);
        let profile = self.sb.profile;
        for (k, chunk) in data.chunks_exact(bs).enumerate() {
            let block = first + k as u64;
            let i = index as usize + k;
            // Fast path: the newest brother's tag is accepted in every state of the group, so
            // a match needs no further look-up.
            if let Some(m) = newest {
                let stored = m.tag_bytes(i);
                if stored.iter().any(|&b| b != 0)
                    && profile.generate(&self.sb.uuid, block, chunk).as_bytes() == stored
                {
                    continue;
                }
            }
            self.verify(block, chunk, &state.accept(i, settled))?;
        }
        Ok(())
    }

    /// Slow path after a failed verification: a commit may have moved data and tags under
    /// the lock-free fast path. With commits excluded, read and verify once more; only a
    /// failure now is real.
    fn reread_settled(&self, first: u64, out: &mut [u8]) -> Result<()> {
        let _commit = lock(&self.commit);
        let bs = self.geo.block_size as usize;
        for (k, chunk) in out.chunks_exact_mut(bs).enumerate() {
            let block = first + k as u64;
            if let Some(entry) = lock(&self.stage).get(block) {
                copy_staged(entry, chunk);
                continue;
            }
            self.backend_read(chunk, self.geo.data_offset(block), "reading data")?;
            let (group, index) = self.geo.group_of(block);
            let state = self.group(group)?;
            let accept = state.accept(index as usize, self.settled(&state));
            if let Err(e) = self.verify(block, chunk, &accept) {
                tracing::error!(volume = %self.name, block, "{e}");
                return Err(e);
            }
        }
        Ok(())
    }

    /// The current content of one block, verified (for read-modify-write).
    fn read_block(&self, block: u64, out: &mut [u8]) -> Result<()> {
        self.read_blocks(block, out)
    }

    fn writable(&self) -> Result<()> {
        if self.read_only {
            return Err(Error::ReadOnly {
                volume: self.name.clone(),
            });
        }
        self.failed()
    }

    /// Locks the stripes covering blocks `first..first+count`, in ascending order so two
    /// writers can never deadlock.
    fn lock_stripes(&self, first: u64, count: u64) -> Vec<MutexGuard<'_, ()>> {
        let n = LOCK_STRIPES as u64;
        let mut idx: Vec<usize> = if count >= n {
            (0..LOCK_STRIPES).collect()
        } else {
            (first..first + count).map(|b| (b % n) as usize).collect()
        };
        idx.sort_unstable();
        idx.dedup();
        idx.into_iter().map(|i| lock(&self.stripes[i])).collect()
    }

    /// Writes `buf` at `offset` (any alignment: partial blocks are read, verified, merged).
    /// The write is visible to reads at once and durable after the next [`Volume::flush`].
    pub fn write_at(&self, buf: &[u8], offset: u64) -> Result<()> {
        self.write_impl(buf, None, offset)
    }

    /// [`Inner::write_at`] keeping `owned` (whose bytes are `buf`) for the whole blocks
    /// instead of copying them.
    fn write_impl(&self, buf: &[u8], owned: Option<SharedBuf>, offset: u64) -> Result<()> {
        self.check_range(offset, buf.len() as u64)?;
        self.writable()?;
        if buf.is_empty() {
            return Ok(());
        }
        let bs = self.geo.block_size as u64;
        let first = offset / bs;
        let last = (offset + buf.len() as u64 - 1) / bs;
        let end = offset + buf.len() as u64;
        let full_first = offset.div_ceil(bs);
        let full_end = end / bs;
        // Whole blocks share one buffer: the caller's own when handed over, else one copy;
        // `base` is the volume offset of that buffer's first byte. Partial edge blocks are
        // read, merged and get their own.
        let shared: Option<(SharedBuf, u64)> = match owned {
            _ if full_first >= full_end => None,
            Some(o) => Some((o, offset)),
            None => {
                let whole =
                    buf[(full_first * bs - offset) as usize..(full_end * bs - offset) as usize].to_vec();
                Some((Arc::new(whole), full_first * bs))
            }
        };
        let guards = self.lock_stripes(first, last - first + 1);
        let mut entries = Vec::with_capacity((last - first + 1) as usize);
        for block in first..=last {
            let (data, at) = match &shared {
                Some((s, base)) if (full_first..full_end).contains(&block) => {
                    (s.clone(), (block * bs - base) as usize)
                }
                _ => {
                    let start = block * bs;
                    let (lo, hi) = (offset.max(start), end.min(start + bs));
                    let mut cur = vec![0u8; bs as usize];
                    self.read_block(block, &mut cur)?;
                    cur[(lo - start) as usize..(hi - start) as usize]
                        .copy_from_slice(&buf[(lo - offset) as usize..(hi - offset) as usize]);
                    (Arc::new(cur) as SharedBuf, 0)
                }
            };
            let tag =
                self.sb
                    .profile
                    .generate(&self.sb.uuid, block, &stage::bytes(&data)[at..at + bs as usize]);
            entries.push((block, Staged::Data { buf: data, at, tag }));
        }
        self.stage_entries(entries);
        drop(guards);
        self.commit_if_full()
    }

    fn stage_entries(&self, entries: Vec<(u64, Staged)>) {
        let mut stage = lock(&self.stage);
        for (block, entry) in entries {
            stage.put(block, entry);
        }
    }

    fn commit_if_full(&self) -> Result<()> {
        let staged = lock(&self.stage).active_bytes;
        if staged >= self.stage_limit && self.background && staged < 2 * self.stage_limit {
            // Hand the batch to the committer thread and keep going: its writes and flushes
            // overlap with this thread's copying and checksumming. Past twice the limit the
            // writer commits itself, which bounds memory.
            *lock(&self.kick) = true;
            self.kick_cv.notify_one();
            return Ok(());
        }
        if staged >= self.stage_limit {
            let mut state = lock(&self.commit);
            // Another writer may have committed while this one waited for the lock.
            if lock(&self.stage).active_bytes >= self.stage_limit {
                self.commit_locked(&mut state)?;
            }
        }
        Ok(())
    }

    /// Makes the range read as zeros. Whole blocks become unwritten (their space is
    /// released); partial blocks at the edges are zero-filled.
    pub fn write_zeroes(&self, offset: u64, len: u64) -> Result<()> {
        self.check_range(offset, len)?;
        self.writable()?;
        if len == 0 {
            return Ok(());
        }
        let bs = self.geo.block_size as u64;
        let end = offset + len;
        let first_full = offset.div_ceil(bs);
        let end_full = end / bs;
        if first_full >= end_full {
            return self.write_at(&vec![0u8; len as usize], offset);
        }
        if offset < first_full * bs {
            self.write_at(&vec![0u8; (first_full * bs - offset) as usize], offset)?;
        }
        if end > end_full * bs {
            self.write_at(&vec![0u8; (end - end_full * bs) as usize], end_full * bs)?;
        }
        // Staged in bounded slices so a huge zeroing cannot hold the stripes for long.
        let mut b = first_full;
        while b < end_full {
            let n = (end_full - b).min(1 << 16);
            let guards = self.lock_stripes(b, n);
            self.stage_entries((b..b + n).map(|x| (x, Staged::Zero)).collect());
            drop(guards);
            b += n;
            let pending = lock(&self.stage).active.len();
            if pending >= 1 << 18 {
                let mut state = lock(&self.commit);
                self.commit_locked(&mut state)?;
            }
        }
        self.commit_if_full()
    }

    /// Makes every write that completed before this call durable.
    pub fn flush(&self) -> Result<()> {
        if self.read_only {
            return Ok(());
        }
        let mut state = lock(&self.commit);
        self.failed()?;
        self.commit_locked(&mut state)?;
        self.flush_locked(&mut state)
    }

    /// Allocation status of a byte range, as runs of allocated and unwritten blocks.
    pub fn extents(&self, offset: u64, len: u64) -> Result<Vec<Extent>> {
        self.check_range(offset, len)?;
        let mut out: Vec<Extent> = Vec::new();
        if len == 0 {
            return Ok(out);
        }
        let bs = self.geo.block_size as u64;
        let first = offset / bs;
        let last = (offset + len - 1) / bs;
        let mut block = first;
        while block <= last {
            let (group, _) = self.geo.group_of(block);
            let group_last =
                (self.geo.first_block(group) + self.geo.blocks_in_group(group) as u64 - 1).min(last);
            // The stage first, then the metadata: a block that leaves the stage has had its new
            // tags installed already, so it can never be missed by both look-ups. The stage lock
            // is not held while metadata may be loaded from disk.
            let staged: Vec<Option<bool>> = {
                let stage = lock(&self.stage);
                (block..=group_last)
                    .map(|b| stage.get(b).map(|e| matches!(e, Staged::Data { .. })))
                    .collect()
            };
            let state = self.group(group)?;
            let settled = self.settled(&state);
            for (b, staged) in (block..=group_last).zip(staged) {
                let allocated = match staged {
                    Some(data) => data,
                    None => {
                        let idx = self.geo.group_of(b).1 as usize;
                        // Damaged metadata reports allocated: the client must read (and see the error).
                        state
                            .accept(idx, settled)
                            .newest()
                            .is_none_or(|t| !t.is_unwritten())
                    }
                };
                let start = (b * bs).max(offset);
                let end = ((b + 1) * bs).min(offset + len);
                match out.last_mut() {
                    Some(e) if e.allocated == allocated => e.len += end - start,
                    _ => out.push(Extent {
                        offset: start,
                        len: end - start,
                        allocated,
                    }),
                }
            }
            block = group_last + 1;
        }
        Ok(out)
    }

    /// Verifies `count` blocks from `first` without stopping at the first failure: the
    /// engine of `check` and scrubbing. I/O errors still abort.
    pub fn check_blocks(&self, first: u64, count: u64) -> Result<Vec<BlockProblem>> {
        let end = first
            .checked_add(count)
            .filter(|&e| e <= self.geo.data_blocks)
            .ok_or_else(|| Error::OutOfRange {
                volume: self.name.clone(),
                offset: first.saturating_mul(self.geo.block_size as u64),
                len: count.saturating_mul(self.geo.block_size as u64),
                size: self.size(),
            })?;
        let bs = self.geo.block_size as usize;
        let mut problems = Vec::new();
        let mut block = first;
        let mut buf = Vec::new();
        while block < end {
            let (group, _) = self.geo.group_of(block);
            let n = (self.geo.first_block(group) + self.geo.blocks_in_group(group) as u64).min(end) - block;
            buf.resize(n as usize * bs, 0);
            match self.read_blocks(block, &mut buf) {
                Ok(()) => {}
                Err(e) if e.is_corruption() => {
                    // Narrow down block by block so every bad block is listed.
                    for b in block..block + n {
                        if let Err(e) = self.read_blocks(b, &mut buf[..bs]) {
                            match e {
                                Error::Corrupt { block, detail, .. } => {
                                    problems.push(BlockProblem { block, detail })
                                }
                                other => return Err(other),
                            }
                        }
                    }
                }
                Err(e) => return Err(e),
            }
            block += n;
        }
        Ok(problems)
    }

    /// Where `block` lives and what both metadata copies say about it.
    pub fn inspect_block(&self, block: u64) -> Result<BlockReport> {
        let location = self.geo.locate(block).ok_or_else(|| Error::OutOfRange {
            volume: self.name.clone(),
            offset: block.saturating_mul(self.geo.block_size as u64),
            len: self.geo.block_size as u64,
            size: self.size(),
        })?;
        let state = self.group(location.group)?;
        let slots = state
            .slots
            .iter()
            .map(|s| match s {
                MetaParse::Empty => SlotReport {
                    state: "empty".into(),
                    generation: None,
                    tag: None,
                },
                MetaParse::Valid(m) => SlotReport {
                    state: "valid".into(),
                    generation: Some(m.generation),
                    tag: Some(m.tag(location.index as usize).to_string()),
                },
                MetaParse::Invalid(why) => SlotReport {
                    state: format!("invalid: {why}"),
                    generation: None,
                    tag: None,
                },
            })
            .collect();
        let staged = lock(&self.stage).get(block).is_some();
        Ok(BlockReport {
            location,
            slots,
            staged,
        })
    }

    /// The background committer: commits whenever a writer reports a full stage.
    fn run_committer(&self) {
        loop {
            {
                let mut kick = lock(&self.kick);
                while !*kick {
                    kick = self.kick_cv.wait(kick).unwrap_or_else(|e| e.into_inner());
                }
                *kick = false;
            }
            if self.stopping.load(Ordering::Acquire) {
                return;
            }
            let mut state = lock(&self.commit);
            if lock(&self.stage).active_bytes >= self.stage_limit {
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
        let mut state = lock(&self.commit);
        self.failed()?;
        self.commit_locked(&mut state)?;
        self.flush_locked(&mut state)?;
        // Clean only if this session started clean or recovered: after a crash, groups this
        // session never rewrote may still need their older brother's tags.
        if state.marked_in_use && self.trusted.load(Ordering::Acquire) {
            self.write_superblocks(VolumeState::Clean, "marking the volume clean")?;
            state.marked_in_use = false;
        }
        Ok(())
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
            .write_impl(stage::bytes(&data), Some(data.clone()), offset)
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

    /// After an unclean shutdown: settles every group against the disk (one read of each
    /// block whose two metadata copies disagree, a new metadata copy where the newest one
    /// describes a version that never landed) and marks the volume clean, so only the newest
    /// tags are accepted from then on and lost or misdirected writes of the last batch
    /// before the crash are caught. Does nothing on a volume that was closed cleanly. Safe to
    /// interrupt (a crash during recovery leaves the volume as recoverable as before).
    /// `progress` is called with the number of groups done.
    pub fn recover(&self, progress: impl FnMut(u64)) -> Result<RecoveryReport> {
        self.inner.recover(progress)
    }

    /// Flushes and closes the volume, marking it clean when that is safe.
    pub fn close(mut self) -> Result<()> {
        self.stop_committer();
        self.inner.shutdown()
    }

    fn stop_committer(&mut self) {
        if let Some(handle) = self.committer.take() {
            self.inner.stopping.store(true, Ordering::Release);
            *lock(&self.inner.kick) = true;
            self.inner.kick_cv.notify_one();
            let _ = handle.join();
        }
    }
}

impl Drop for Volume {
    fn drop(&mut self) {
        self.stop_committer();
        if let Err(e) = self.inner.shutdown() {
            tracing::error!(volume = %self.inner.name, "flush on close failed: {e}");
        }
    }
}

fn copy_staged(entry: &Staged, out: &mut [u8]) {
    match entry.data(out.len()) {
        Some(d) => out.copy_from_slice(d),
        None => out.fill(0),
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
struct Aligned {
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

#[allow(dead_code)]
fn _assert_send_sync() {
    fn is<T: Send + Sync>() {}
    is::<Volume>();
    let _ = Tag::from_bytes;
}
