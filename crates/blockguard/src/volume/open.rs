//! Making and opening volumes: format, superblock selection and repair, and the recovery a
//! read-write open of a volume left in use runs before it accepts writes.

use super::bitmaps::Bitmaps;
use super::cache::MetaCache;
use super::group_commit::FlushSequence;
use super::stage::Stage;
use super::{aligned, invalid, relabel, FormatOptions, Inner, OpenOptions, Volume};
use super::{commit, Stats, LOCK_STRIPES};
use crate::cast::{u32_of, usize_of};
use crate::copies::CopySet;
use crate::error::{Error, Result};
use crate::format::{
    empty_map_sector, validate_label, Geometry, MapKind, MirrorInfo, Superblock, SuperblockError,
    VolumeState, SB_REGION, SB_STRUCT_SIZE, SECTOR_SIZE, SUPPORTED_RO_COMPAT,
};
use blockguard_backend::Backend;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize};
use std::sync::{Arc, Condvar, Mutex};

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
        write_new_volume(&*backend, opts, None, progress)?;
        Self::open(backend, &open_after_format(opts))
    }

    /// Opens an existing volume. A damaged superblock copy is reported in
    /// [`Volume::warnings`] (and rewritten from the good copy when opened read-write).
    ///
    /// A read-write open of a volume left *in use* (not closed cleanly) recovers it before it
    /// accepts writes: see [`Volume::open_with_progress`].
    pub fn open(backend: Arc<dyn Backend>, opts: &OpenOptions) -> Result<Volume> {
        Self::open_with_progress(backend, opts, &mut |_, _| {})
    }

    /// [`Volume::open`], reporting the progress of recovery as `(groups_done, groups_total)`.
    ///
    /// After a crash the newest metadata of a group may describe data that never reached the
    /// disk. Before a read-write session may write, every such group is settled against the
    /// disk (see [`Volume::recover`]): writing on top of an unsettled group could overwrite
    /// the only tag of the data a crash left behind. The groups the backend proves never
    /// written are skipped without a read; the rest cost one metadata read each, plus one
    /// data read per block whose brothers disagree. [`Volume::recovery_at_open`] reports
    /// what was done. A read-only open changes nothing: it accepts either brother where a
    /// crash may have left both meaningful.
    pub fn open_with_progress(
        backend: Arc<dyn Backend>,
        opts: &OpenOptions,
        progress: &mut dyn FnMut(u64, u64),
    ) -> Result<Volume> {
        let (sb, warnings) = read_member(&*backend)?;
        if sb.mirror.is_some() {
            return Err(invalid(
                &backend.name(),
                "this is a member of a mirror set: open the set (`Volume::open_members`, or the \
                 command line, which finds the other members)"
                    .into(),
            ));
        }
        Self::assemble(CopySet::single(backend), sb, warnings, opts, progress)
    }

    /// Reads and checks the superblock of `backend` without opening the volume (so without
    /// the key of a keyed profile, and without writing anything): the superblock in use and
    /// warnings about a damaged or differing copy. For tools that only describe a volume.
    pub fn read_superblock(backend: &dyn Backend) -> Result<(Superblock, Vec<String>)> {
        read_member(backend)
    }

    /// Builds the engine over `set`, whose superblock is `sb`, and recovers it if it was left
    /// in use (read-write opens).
    pub(super) fn assemble(
        set: CopySet,
        sb: Superblock,
        warnings: Vec<String>,
        opts: &OpenOptions,
        progress: &mut dyn FnMut(u64, u64),
    ) -> Result<Volume> {
        let name = set.name();
        let geo = sb.geometry;
        // A superblock is not keyed: whoever can write the disk can set its mode, for the
        // profile and for a re-tag's target (whose groups `rebuild` would recompute too).
        mode_fits_profile(&name, sb.mode, sb.profile)?;
        if let Some(r) = &sb.retag {
            mode_fits_profile(&name, sb.mode, r.target)?;
        }
        // Unknown read-only-compatible features: reading is safe, writing could break them.
        let read_only = opts.read_only || set.is_read_only() || sb.ro_compat & !SUPPORTED_RO_COMPAT != 0;
        let group_bytes = 2 * geo.block_size as usize + 256;
        // A missing, superfluous or wrong key is refused here, before anything is written
        // (recovery and superblock repair come after).
        let tagger = open_tags(&name, &sb, opts)?;
        let vol = Inner {
            tagger,
            keys: Mutex::new(super::HeldKeys {
                current: opts.key.clone(),
                target: sb.retag.and(opts.retag_key.clone()),
            }),
            failure: Mutex::new(None),
            failed: AtomicBool::new(false),
            policy: super::policy::PolicyState::new(opts.error_policy.unwrap_or(sb.error_policy)),
            lost_writes: AtomicU64::new(0),
            kick: Mutex::new(false),
            kick_cv: Condvar::new(),
            flushes: FlushSequence::default(),
            stopping: AtomicBool::new(false),
            background: opts.background_commit && !read_only,
            cache: MetaCache::new((opts.cache_bytes / group_bytes).max(1)),
            maps: Bitmaps::default(),
            dirty_clear_interval: opts.dirty_clear_interval,
            stage: Mutex::new(Stage::default()),
            // In `journal` mode a batch becomes one segment: the committer starts well before
            // the bound the stage enforces.
            stage_limit: commit::journal::SegmentCost::of(&geo)
                .map_or(opts.stage_bytes, |c| opts.stage_bytes.min(c.cap / 2))
                .max(geo.block_size as usize),
            segment_cost: commit::journal::SegmentCost::of(&geo),
            commit: Mutex::new(commit::CommitState::default()),
            protocol: commit::protocol::for_mode(sb.mode),
            trusted: AtomicBool::new(sb.state == VolumeState::Clean),
            stripes: (0..LOCK_STRIPES).map(|_| Mutex::new(())).collect(),
            reads_active: AtomicUsize::new(0),
            retag_running: AtomicBool::new(false),
            recovered_at_open: None,
            stats: Stats::default(),
            mirror: Mutex::new(sb.mirror.clone()),
            records: if sb.mirror.is_some() {
                super::mirror::encoded_records(&**set.backend(set.live().first().copied().unwrap_or(0)))
            } else {
                Vec::new()
            },
            disk_in_use: AtomicBool::new(sb.state == VolumeState::InUse),
            backend: Arc::new(set),
            name,
            sb,
            geo,
            read_only,
            warnings,
        };
        Self::settle(vol, progress)
    }

    /// Repairs superblocks and settles a volume left in use (read-write), then starts it.
    fn settle(mut vol: Inner, progress: &mut dyn FnMut(u64, u64)) -> Result<Volume> {
        if vol.read_only && vol.sb.state == VolumeState::InUse && !vol.protocol.readable_before_recovery() {
            return Err(Error::Unsupported {
                volume: vol.name.clone(),
                detail: format!(
                    "the volume was not closed cleanly, and in {} mode {} before it can be read: open it \
                     read-write once (`blockguard recover`, or serve or mount it) first",
                    vol.sb.mode.name(),
                    vol.protocol.recovery_before_reading()
                ),
            });
        }
        if !vol.read_only && !vol.warnings.is_empty() {
            vol.repair_superblocks()?;
        }
        if !vol.read_only && vol.sb.state == VolumeState::InUse {
            // Copies may disagree where the crash cut writes short: make them agree first.
            vol.converge_after_crash()?;
            vol.recovered_at_open = vol.protocol.settle_after_crash(&vol, progress)?;
        }
        if !vol.read_only && vol.degraded() {
            // The write-intent marks of earlier degraded sessions are kept, not overwritten.
            vol.adopt_dirty_from_disk()?;
        }
        Ok(Volume::start(vol))
    }
}

/// The options a freshly formatted volume is opened with.
pub(super) fn open_after_format(opts: &FormatOptions) -> OpenOptions {
    OpenOptions {
        key: opts.key.clone(),
        ..OpenOptions::default()
    }
}

/// Formats `backend`: zeroes it unless told it reads as zeros, writes the empty bitmaps and
/// the two superblock copies (the backup first), flushing after each step. `pair`: the
/// identity of a split volume's two devices (the backend is then their [`SplitBackend`](crate::split::SplitBackend)).
pub(super) fn write_new_volume(
    backend: &dyn Backend,
    opts: &FormatOptions,
    pair: Option<[u8; 16]>,
    progress: &mut dyn FnMut(u64, u64),
) -> Result<()> {
    let name = backend.name();
    let len = backend.len();
    validate_label(&opts.label).map_err(|e| invalid(&name, e))?;
    let geo = format_geometry(opts, &name, len)?;
    let mut sb = new_superblock(opts, geo);
    if let Some(pair) = pair {
        sb.meta_device = pair;
        sb.incompat |= crate::format::INCOMPAT_META_DEVICE;
    }
    // The key is checked, and its check value made, before anything is written.
    let tagger = opts
        .profile
        .tagger(&sb.uuid, opts.key.as_ref())
        .map_err(|problem| Error::Key {
            volume: name.clone(),
            problem,
        })?;
    sb.key_check = tagger.key_check();
    if !opts.assume_zeroed {
        zero_backend(backend, &name, len, progress)?;
    }
    let align = backend.alignment().max(1);
    if align > geo.block_size as usize {
        return Err(invalid(
            &name,
            format!(
                "the backend needs {align}-byte aligned I/O, larger than the volume's {}-byte blocks",
                geo.block_size
            ),
        ));
    }
    write_empty_maps(backend, &name, &geo, &sb.uuid, align)?;
    let io = |during, offset| io_error(&name, during, offset);
    // Backup first: a crash before the primary lands leaves no volume rather than half of one.
    write_aligned(backend, &sb.encode(1), geo.backup_sb_offset, align)
        .map_err(io("writing the backup superblock", geo.backup_sb_offset))?;
    backend.flush().map_err(io("flushing", 0))?;
    write_aligned(backend, &sb.encode(0), 0, align).map_err(io("writing the primary superblock", 0))?;
    backend.flush().map_err(io("flushing", 0))?;
    Ok(())
}

/// Reads and chooses the superblock of one backend, checking that the backend holds the
/// layout it describes. Returns it and the warnings about damaged copies. The metadata device
/// of a volume split over two devices is refused: it is opened with its data device
/// ([`Volume::open_split`]).
pub(super) fn read_member(backend: &dyn Backend) -> Result<(Superblock, Vec<String>)> {
    read_layout(backend, false)
}

/// [`read_member`]; `split`: `backend` is the two devices of a split volume seen as one.
pub(super) fn read_layout(backend: &dyn Backend, split: bool) -> Result<(Superblock, Vec<String>)> {
    let name = backend.name();
    let len = backend.len();
    let (primary, backup) = read_superblocks(backend, &name, len)?;
    let mut warnings = Vec::new();
    // With one copy unusable the other's state is still trustworthy: both markings write
    // the primary first, so a readable copy saying "clean" was never followed by a commit.
    let sb = choose_superblock(&name, primary, backup, &mut warnings)?;
    if !split && sb.incompat & crate::format::INCOMPAT_META_DEVICE != 0 {
        return Err(Error::Unsupported {
            volume: name,
            detail: "this is the metadata device of a volume whose data is on a separate data device: \
                     open the volume through its data device"
                .into(),
        });
    }
    check_backend_fits(backend, &name, &sb.geometry, len)?;
    Ok((sb, warnings))
}

/// The layout of a volume formatted with `opts` on a backend of `len` bytes: `opts.size`
/// bytes with the backup superblock at the backend's end, or as much as fits.
fn format_geometry(opts: &FormatOptions, name: &str, len: u64) -> Result<Geometry> {
    mode_fits_profile(name, opts.mode, opts.profile)?;
    let tag_size = opts.tag_slot().map_err(|e| relabel(e, name))?;
    let Some(size) = opts.size else {
        let g = Geometry::for_backing_len(len, opts.block_size, tag_size)
            .map_err(|e| invalid(name, e.to_string()))?;
        return match opts.journal_len(len)? {
            0 => Ok(g),
            j => g
                .with_journal(j, Some(len))
                .map_err(|e| invalid(name, e.to_string())),
        };
    };
    let g = opts.geometry_for_size().map_err(|e| relabel(e, name))?;
    if g.backing_len > len {
        return Err(invalid(
            name,
            format!(
                "a {size}-byte volume needs {} bytes of backend, it has {len}",
                g.backing_len
            ),
        ));
    }
    // On a larger backend (a device) the backup superblock goes to its end.
    Geometry::from_parts(
        opts.block_size,
        tag_size,
        g.group_blocks,
        g.data_blocks,
        len,
        g.journal_len,
    )
    .ok_or_else(|| invalid(name, format!("a {size}-byte volume does not fit {len} bytes")))
}

/// The superblock of a new volume with layout `geo`, clean, created now.
fn new_superblock(opts: &FormatOptions, geo: Geometry) -> Superblock {
    let uuid = opts.uuid.unwrap_or_else(rand::random);
    let created = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs());
    Superblock {
        error_policy: opts.error_policy,
        ..Superblock::new(geo, uuid, opts.profile, opts.mode, &opts.label, created)
    }
}

/// An [`Error::Io`] of volume `name` for a backend failure while `during` at `offset`.
pub(super) fn io_error(
    name: &str,
    during: &'static str,
    offset: u64,
) -> impl FnOnce(std::io::Error) -> Error {
    let name = name.to_string();
    move |source| Error::Io {
        volume: name,
        during,
        offset,
        source,
    }
}

/// Zeroes the backend's `len` bytes, a gigabyte at a time, reporting `(bytes_done, bytes_total)`.
fn zero_backend(
    backend: &dyn Backend,
    name: &str,
    len: u64,
    progress: &mut dyn FnMut(u64, u64),
) -> Result<()> {
    const CHUNK: u64 = 1 << 30;
    let mut off = 0;
    while off < len {
        let n = CHUNK.min(len - off);
        backend
            .zero_range(off, n)
            .map_err(io_error(name, "zeroing the backend", off))?;
        off += n;
        progress(off, len);
    }
    Ok(())
}

/// Writes both copies of the three group bitmaps, every sector with no bit set (a blank
/// sector found later is damage, not an empty map), and flushes. The head and tail copies
/// each fill a contiguous, 4 KiB-aligned run of regions.
pub(super) fn write_empty_maps(
    backend: &dyn Backend,
    name: &str,
    geo: &Geometry,
    uuid: &[u8; 16],
    align: usize,
) -> Result<()> {
    let sectors = u32_of(geo.map_sectors());
    let region = usize_of(geo.map_region_len());
    let mut maps = vec![0u8; 3 * region];
    for (k, kind) in [MapKind::Written, MapKind::Dirty, MapKind::FirstWrite]
        .into_iter()
        .enumerate()
    {
        debug_assert_eq!(usize_of(kind.ordinal()), k);
        for i in 0..sectors {
            let at = k * region + i as usize * SECTOR_SIZE;
            maps[at..at + SECTOR_SIZE].copy_from_slice(&empty_map_sector(uuid, kind, i));
        }
    }
    for copy in 0..2 {
        let at = geo.map_offset(MapKind::Written, copy);
        debug_assert_eq!(geo.map_offset(MapKind::FirstWrite, copy), at + 2 * region as u64);
        write_aligned(backend, &maps, at, align).map_err(io_error(name, "writing the group bitmaps", at))?;
    }
    backend.flush().map_err(io_error(name, "flushing", 0))
}

/// Reads both superblock copies of a backend of `len` bytes: the primary at offset 0, the backup where the primary says
/// it is (or in the backend's last 4 KiB). Fails only if the backend cannot be read or is
/// too small to hold a volume; each copy's own verdict is returned.
#[allow(clippy::type_complexity)] // Two verdicts, one per copy: naming the type would hide that.
fn read_superblocks(
    backend: &dyn Backend,
    name: &str,
    len: u64,
) -> Result<(
    std::result::Result<Superblock, SuperblockError>,
    std::result::Result<Superblock, SuperblockError>,
)> {
    let read_sb = |offset: u64| -> Result<std::result::Result<Superblock, SuperblockError>> {
        // The whole region, through an aligned buffer: direct-I/O backends need both.
        let mut region = aligned(usize_of(SB_REGION), backend.alignment().max(1));
        let b = region.as_mut();
        backend
            .read_at(b, offset)
            .map_err(io_error(name, "reading a superblock", offset))?;
        Ok(Superblock::decode(&b[..SB_STRUCT_SIZE]).map(|(sb, _)| sb))
    };
    if len < 2 * SB_REGION {
        return Err(Error::NotAVolume {
            volume: name.to_string(),
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
    Ok((primary, backup))
}

/// The superblock to open with, from the two copies' verdicts: the primary if it is usable,
/// else the backup; "in use" if either says so. A copy unusable or different from the other
/// adds a warning.
fn choose_superblock(
    name: &str,
    primary: std::result::Result<Superblock, SuperblockError>,
    backup: std::result::Result<Superblock, SuperblockError>,
    warnings: &mut Vec<String>,
) -> Result<Superblock> {
    // A copy from a newer version is not damage: never open (or "repair") from the other.
    for e in [&primary, &backup].into_iter().filter_map(|r| r.as_ref().err()) {
        if e.is_unsupported() {
            return Err(Error::Unsupported {
                volume: name.to_string(),
                detail: e.to_string(),
            });
        }
    }
    Ok(match (primary, backup) {
        (Ok(p), Ok(b)) => {
            let same = Superblock {
                state: p.state,
                ..b.clone()
            } == p;
            if !same {
                warnings.push(format!("{name}: superblock copies differ; using the primary"));
            }
            // A crash between updating the two copies: either saying "in use" wins, and of a
            // mirror member's two descriptions of its set the newer one (every write of the set's
            // superblocks is a new event, and the backup may have landed without the primary).
            let newer_backup = match (&p.mirror, &b.mirror) {
                (Some(pm), Some(bm)) => bm.event > pm.event,
                _ => false,
            };
            let in_use = p.state == VolumeState::InUse || b.state == VolumeState::InUse;
            let mut chosen = if newer_backup { b } else { p };
            if in_use {
                chosen.state = VolumeState::InUse;
            }
            chosen
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
                    volume: name.to_string(),
                    detail: "no superblock at the start or the end".into(),
                }
            } else {
                Error::SuperblockDamaged {
                    volume: name.to_string(),
                    primary: p.to_string(),
                    backup: b.to_string(),
                }
            });
        }
    })
}

/// Checks that the backend (`len` bytes) holds the whole layout and needs no alignment larger
/// than a block.
fn check_backend_fits(backend: &dyn Backend, name: &str, geo: &Geometry, len: u64) -> Result<()> {
    if len < geo.backing_len {
        return Err(Error::Truncated {
            volume: name.to_string(),
            expected: geo.backing_len,
            actual: len,
        });
    }
    if backend.alignment() > geo.block_size as usize {
        return Err(invalid(
            name,
            format!(
                "the backend needs {}-byte aligned I/O, larger than the volume's {}-byte blocks",
                backend.alignment(),
                geo.block_size
            ),
        ));
    }
    Ok(())
}

impl Inner {
    /// Rewrites both superblock copies from the one in use (self-healing after damage).
    fn repair_superblocks(&self) -> Result<()> {
        self.write_superblocks(self.sb.state, "repairing a superblock")?;
        tracing::warn!(volume = %self.name, "rewrote damaged superblock copy");
        Ok(())
    }

    /// Writes both superblock copies with `state` to every member in sync (each with its own
    /// role, and the set's current view of its members), then flushes.
    pub(crate) fn write_superblocks(&self, state: VolumeState, during: &'static str) -> Result<()> {
        // The event is raised by the changes of health and membership (their callers), not by
        // every write: a member whose superblock writes are silently lost must not look older
        // than one that failed in the middle of a session and still calls itself current.
        let mirror = self.lock(&self.mirror).clone();
        let backup_at = self.geo.backup_sb_offset;
        let align = self.backend.alignment().max(1);
        for member in self.backend.live() {
            let sb = Superblock {
                state,
                mirror: mirror.clone().map(|m| MirrorInfo {
                    role: u8::try_from(member).unwrap_or(u8::MAX),
                    ..m
                }),
                ..self.tagger.apply(&self.sb)
            };
            let mut regions = [sb.encode(0), sb.encode(1)];
            for (copy, region) in (0u8..).zip(regions.iter_mut()) {
                // Both copies read back as exactly what is meant: a superblock that did not
                // would make the volume unopenable, or open it with another geometry.
                assert_eq!(
                    Superblock::decode(region),
                    Ok((sb.clone(), copy)),
                    "{}: an encoded superblock does not decode",
                    self.name
                );
                self.put_member_records(region);
            }
            let dev = &**self.backend.backend(member);
            let result = write_aligned(dev, &regions[0], 0, align)
                .and_then(|()| write_aligned(dev, &regions[1], backup_at, align))
                .and_then(|()| dev.flush());
            if let Err(e) = result {
                if self.backend.count() == 1 {
                    return Err(self.io_err(during, 0)(e));
                }
                self.backend.drop_member(member, format!("{during}: {e}"));
            }
        }
        if self.backend.live().is_empty() {
            return Err(self.io_err(during, 0)(std::io::Error::other(
                "no mirror member is left in sync",
            )));
        }
        self.disk_in_use
            .store(state == VolumeState::InUse, std::sync::atomic::Ordering::Release);
        Ok(())
    }
}

/// Writes `bytes` (a multiple of `align` long) at `offset` (a multiple of `align`) through a
/// buffer aligned in memory: direct-I/O backends need both.
fn write_aligned(backend: &dyn Backend, bytes: &[u8], offset: u64, align: usize) -> std::io::Result<()> {
    debug_assert!(bytes.len().is_multiple_of(align) && offset.is_multiple_of(align as u64));
    if align <= 1 {
        return backend.write_at(bytes, offset);
    }
    let mut buf = aligned(bytes.len(), align);
    buf.as_mut().copy_from_slice(bytes);
    backend.write_at(buf.as_ref(), offset)
}

/// The tags of a volume opened with `opts`: its profile's tagger with the key checked and,
/// when the superblock records a re-tag in progress, the target's with `opts.retag_key`.
fn open_tags(name: &str, sb: &Superblock, opts: &OpenOptions) -> Result<super::tags::Tags> {
    let key_err = |problem| Error::Key {
        volume: name.to_string(),
        problem,
    };
    let current = crate::tag::Tagger::for_volume(sb.profile, &sb.uuid, &sb.key_check, opts.key.as_ref())
        .map_err(key_err)?;
    let switch = match &sb.retag {
        Some(r) => {
            let retag_err = |problem: crate::tag::KeyError| Error::Key {
                volume: name.to_string(),
                problem: problem.for_retag(),
            };
            let target = if !r.target.is_keyed() && sb.profile.is_keyed() {
                // Away from a key: the record must carry the seal only the key makes.
                let target = r
                    .target
                    .tagger(&sb.uuid, opts.retag_key.as_ref())
                    .map_err(retag_err)?;
                if current.retag_seal(r.target) != Some(r.key_check) {
                    return Err(key_err(crate::tag::KeyError::RetagUnsealed {
                        profile: r.target.name(),
                    }));
                }
                if opts.retag_to != Some(r.target) {
                    return Err(key_err(crate::tag::KeyError::RetagUnconfirmed {
                        profile: r.target.name(),
                    }));
                }
                target
            } else {
                crate::tag::Tagger::for_volume(r.target, &sb.uuid, &r.key_check, opts.retag_key.as_ref())
                    .map_err(retag_err)?
            };
            Some((target, r.cursor))
        }
        None => None,
    };
    Ok(super::tags::Tags::new(current, switch, sb.geometry.group_blocks))
}

/// `rebuild` mode recomputes tags from whatever data a crash left, with the volume's key: on a
/// keyed profile that would bless data written by someone without the key (G6). Refused at
/// format and at open (the mode is a field of the unkeyed superblock).
pub(super) fn mode_fits_profile(
    name: &str,
    mode: crate::format::Mode,
    profile: crate::tag::Profile,
) -> Result<()> {
    if mode == crate::format::Mode::Rebuild && profile.is_keyed() {
        return Err(Error::Unsupported {
            volume: name.to_string(),
            detail: format!(
                "{} mode cannot be used with the keyed profile {}: it recomputes tags from the data \
                 after a crash, which would accept blocks written without the key",
                mode.name(),
                profile.name()
            ),
        });
    }
    Ok(())
}
