//! Helpers shared by the subcommands: opening volumes, parsing sizes, progress bars, exit codes.

use anyhow::{bail, Context, Result};
use blockguard::blockguard_backend::{Backend, FileBackend, FileOptions, LockMode};
use blockguard::{ErrorPolicy, FormatOptions, Mode, OpenOptions, Profile, Volume};
use clap::builder::{PossibleValuesParser, TypedValueParser};
use indicatif::{ProgressBar, ProgressStyle};
use std::path::Path;
use std::sync::Arc;

/// The forms every size option accepts, for help and error messages.
pub(crate) const SIZE_FORMS: &str = "a number of bytes with an optional binary unit: 4096, 512K, 64M, \
                              10G, 2T (K, M, G, T, P, E are powers of 1024; KiB, MiB, … too)";

/// Parses a size with binary units ("64M" = 64 MiB, "10G" = 10 GiB, plain numbers are bytes):
/// the clap value parser of every size option, so its message names the option.
pub(crate) fn parse_size(s: &str) -> Result<u64, String> {
    let t = s.trim();
    if t.starts_with('-') {
        return Err(format!("a size cannot be negative; use {SIZE_FORMS}"));
    }
    parse_size::Config::new()
        .with_binary()
        .parse_size(t)
        .map_err(|e| format!("not a size ({e}); use {SIZE_FORMS}"))
}

/// Smallest and largest logical block size a volume may have.
const BLOCK_SIZES: std::ops::RangeInclusive<u64> = 512..=65536;

/// Parses `--block-size`: a size (units allowed, "4K") that is a power of two from 512 to 64K.
pub(crate) fn parse_block_size(s: &str) -> Result<u32, String> {
    let n = parse_size(s)?;
    u32::try_from(n)
        .ok()
        .filter(|b| b.is_power_of_two() && BLOCK_SIZES.contains(&u64::from(*b)))
        .ok_or_else(|| {
            format!("block size {n} is not a power of two from 512 to 64K (512, 1K, 2K, 4K, …, 64K)")
        })
}

/// The value parser of `--mode`: the mode names this build knows, listed in `--help`.
pub(crate) fn mode_parser() -> impl TypedValueParser<Value = Mode> {
    let names: Vec<&'static str> = (0..=u8::MAX).filter_map(Mode::from_id).map(Mode::name).collect();
    PossibleValuesParser::new(names)
        .try_map(|s| Mode::from_name(&s).ok_or_else(|| format!("unknown mode {s:?}")))
}

/// The value parser of `--error-policy`: the policies this build knows, listed in `--help`.
pub(crate) fn error_policy_parser() -> impl TypedValueParser<Value = ErrorPolicy> {
    PossibleValuesParser::new(ErrorPolicy::ALL.map(ErrorPolicy::name))
        .try_map(|s| ErrorPolicy::from_name(&s).ok_or_else(|| format!("unknown error policy {s:?}")))
}

/// What each error policy does, for `info` and the options' help.
pub(crate) fn error_policy_meaning(p: ErrorPolicy) -> &'static str {
    match p {
        ErrorPolicy::Eio => "a read of a block with no good copy fails; every such failure is logged",
        ErrorPolicy::ReadOnly => {
            "a read of a block with no good copy fails, and writes are suspended from then on until \
             the error state is cleared (`blockguard resume`) or the volume is reopened"
        }
        ErrorPolicy::Continue => {
            "a read of a block with no good copy fails; each such block is logged once, the volume \
             carries on"
        }
    }
}

/// The value parser of `--profile`: the tag profiles this build knows, each listed in
/// `--help` with what it is.
pub(crate) fn profile_parser() -> impl TypedValueParser<Value = Profile> {
    PossibleValuesParser::new(
        Profile::ALL.map(|p| clap::builder::PossibleValue::new(p.name()).help(p.summary())),
    )
    .try_map(|s| Profile::from_name(&s).ok_or_else(|| format!("unknown tag profile {s:?}")))
}

/// The global `--key-file`, set once by `main` before any command runs.
static KEY_FILE: std::sync::OnceLock<Option<std::path::PathBuf>> = std::sync::OnceLock::new();

/// Records the global `--key-file` option.
pub(crate) fn set_key_file(path: Option<std::path::PathBuf>) {
    // Set once, by `main`; a second call (none is made) would keep the first.
    let _ = KEY_FILE.set(path);
}

/// The key from `--key-file`, read and checked (32 raw bytes or 64 hex digits), or `None`
/// without the option. Errors name the file and what is wrong, never the key's bytes.
pub(crate) fn key() -> Result<Option<blockguard::tag::TagKey>> {
    let Some(path) = KEY_FILE.get().and_then(Option::as_ref) else {
        return Ok(None);
    };
    let bytes = std::fs::read(path).with_context(|| format!("cannot read key file {}", path.display()))?;
    let key =
        blockguard::tag::TagKey::parse(&bytes).with_context(|| format!("key file {}", path.display()))?;
    Ok(Some(key))
}

/// The global `--new-key-file`, set once by `main` before any command runs.
static NEW_KEY_FILE: std::sync::OnceLock<Option<std::path::PathBuf>> = std::sync::OnceLock::new();

/// Records the global `--new-key-file` option.
pub(crate) fn set_new_key_file(path: Option<std::path::PathBuf>) {
    // Set once, by `main`.
    let _ = NEW_KEY_FILE.set(path);
}

/// The contents of the `--new-key-file` (the key of the profile a re-tag switches to), read
/// and checked, or `None` without the option: the raw contents (for the control socket, whose
/// server parses them) and the key. Errors name the file, never the key's bytes.
pub(crate) fn new_key_file() -> Result<Option<(Vec<u8>, blockguard::tag::TagKey)>> {
    let Some(path) = NEW_KEY_FILE.get().and_then(Option::as_ref) else {
        return Ok(None);
    };
    let bytes = std::fs::read(path).with_context(|| format!("cannot read key file {}", path.display()))?;
    let key =
        blockguard::tag::TagKey::parse(&bytes).with_context(|| format!("key file {}", path.display()))?;
    Ok(Some((bytes, key)))
}

/// The global `--retag-to` (or the target of `retag`), set once by `main`.
static RETAG_TO: std::sync::OnceLock<Option<blockguard::Profile>> = std::sync::OnceLock::new();

/// Records which re-tag in progress the command confirms.
pub(crate) fn set_retag_to(profile: Option<blockguard::Profile>) {
    // Set once, by `main`.
    let _ = RETAG_TO.set(profile);
}

/// The re-tag in progress the command confirms (`OpenOptions::retag_to`).
pub(crate) fn retag_to() -> Option<blockguard::Profile> {
    RETAG_TO.get().copied().flatten()
}

/// The key from `--new-key-file`, or `None` without the option.
pub(crate) fn new_key() -> Result<Option<blockguard::tag::TagKey>> {
    Ok(new_key_file()?.map(|(_, k)| k))
}

/// Context that says a path once. The typed errors of the engine and the backends begin with
/// the path they concern ("v.bgv: the volume is in use …"); context naming it again read
/// "cannot serve v.bgv: v.bgv: …".
pub(crate) trait PathOnce<T> {
    /// "cannot OP PATH: cause", or "cannot OP: cause" when the cause begins with the path.
    fn doing(self, op: &str, path: &Path) -> Result<T>;
    /// "cannot OP PATH: cause", or the cause alone when it begins with the path.
    fn naming(self, op: &str, path: &Path) -> Result<T>;
}

/// True if `err`'s own message begins with `path` ("PATH: …", "PATH (a loop device …").
fn names_path(err: &anyhow::Error, path: &Path) -> bool {
    let p = path.display().to_string();
    err.to_string()
        .strip_prefix(&p)
        .is_some_and(|rest| rest.starts_with(':') || rest.starts_with(" ("))
}

impl<T, E: Into<anyhow::Error>> PathOnce<T> for std::result::Result<T, E> {
    fn doing(self, op: &str, path: &Path) -> Result<T> {
        self.map_err(|e| {
            let e = e.into();
            if names_path(&e, path) {
                e.context(format!("cannot {op}"))
            } else {
                e.context(format!("cannot {op} {}", path.display()))
            }
        })
    }

    fn naming(self, op: &str, path: &Path) -> Result<T> {
        self.map_err(|e| {
            let e = e.into();
            if names_path(&e, path) {
                e
            } else {
                e.context(format!("cannot {op} {}", path.display()))
            }
        })
    }
}

/// Opens the volume at `path`. Read-write opens take an exclusive lock and read-only opens a
/// shared one, so a volume is never served or mounted by two processes at once.
pub(crate) fn open_volume(path: &Path, read_only: bool) -> Result<Volume> {
    open_volume_staged(path, read_only, None, None)
}

/// [`open_volume`] with a write-back stage of `stage_bytes` (default 32 MiB) and an error
/// policy overriding the volume's: the servers' `--stage-size` and `--error-policy`.
pub(crate) fn open_volume_staged(
    path: &Path,
    read_only: bool,
    stage_bytes: Option<u64>,
    error_policy: Option<ErrorPolicy>,
) -> Result<Volume> {
    let lock = if read_only {
        LockMode::Shared
    } else {
        LockMode::Exclusive
    };
    open_with(path, read_only, lock, stage_bytes, error_policy)
}

/// Opens without taking a lock: for `info`/`dump`, which only read metadata and must work
/// while the volume is being served.
pub(crate) fn open_unlocked(path: &Path) -> Result<Volume> {
    open_with(path, true, LockMode::None, None, None)
}

/// The member records kept next to the superblocks of the volume file or device at `path`
/// (read without a lock: it may be open here, or served); none for a plain volume or what
/// cannot be read.
pub(crate) fn records_of(path: &Path) -> Vec<blockguard::format::MemberRecord> {
    let unlocked = FileOptions {
        read_only: true,
        lock: LockMode::None,
        ..FileOptions::default()
    };
    crate::remote::open_store(path, &unlocked)
        .ok()
        .and_then(|b| blockguard::member_records(&*b).ok())
        .unwrap_or_default()
}

/// The metadata device of a volume whose data device is `backend` (it ends with a data-device
/// trailer naming where its metadata device was at format), opened the same way; `None` for
/// every other store.
///
/// A trailer that is there but damaged, or cannot be read, is an error, never a reason to
/// open the path as a volume of its own: its first bytes are the guest's image, which may
/// itself be a blockguard volume.
pub(crate) fn split_metadata(backend: &dyn Backend, opts: &FileOptions) -> Result<Option<Arc<dyn Backend>>> {
    let trailer = match blockguard::split::read_trailer(backend) {
        Ok(Ok(t)) => t,
        Ok(Err(blockguard::split::TrailerError::Missing)) => return Ok(None),
        Ok(Err(e)) => bail!(
            "{}: {e}; this is the data device of a volume split over two devices, whose trailer (its \
             last 4 KiB) no longer says where its metadata device is",
            backend.name()
        ),
        Err(e) => {
            return Err(e).with_context(|| {
                format!(
                    "{}: reading its last 4 KiB (a data-device trailer?)",
                    backend.name()
                )
            })
        }
    };
    let meta = FileBackend::open(Path::new(&trailer.meta_hint), opts).with_context(|| {
        format!(
            "{} keeps its metadata on {}, which cannot be opened",
            backend.name(),
            trailer.meta_hint
        )
    })?;
    Ok(Some(Arc::new(meta)))
}

/// Whether `backend` is a member of a mirror set (it keeps member records).
fn backend_is_member(backend: &dyn Backend) -> bool {
    blockguard::member_records(backend).is_ok_and(|r| !r.is_empty())
}

/// Every member of the mirror set `path` belongs to that can be opened, found through the
/// member records next to its superblocks. A member that cannot be opened is left out with a
/// warning: the set opens degraded (and records it when opened read-write).
fn open_members(path: &Path, backend: Arc<dyn Backend>, opts: &FileOptions) -> Result<Vec<Arc<dyn Backend>>> {
    let records = blockguard::member_records(&*backend).naming("read the mirror copies of", path)?;
    let mut members: Vec<Arc<dyn Backend>> = vec![backend];
    for r in records {
        let other = Path::new(&r.path);
        // Undecidable means not the same: opening it then finds out (our own lock refuses it).
        if crate::remote::same_remote(path, other) || crate::target::same_data(path, other).unwrap_or(false) {
            continue;
        }
        match crate::remote::open_store(other, opts) {
            Ok(b) => members.push(b),
            Err(e) => crate::log::line(&format!(
                "blockguard: warning: mirror copy {} of {} cannot be opened ({e:#}); going on without it",
                r.index,
                path.display()
            )),
        }
    }
    Ok(members)
}

fn open_with(
    path: &Path,
    read_only: bool,
    lock: LockMode,
    stage_bytes: Option<u64>,
    error_policy: Option<ErrorPolicy>,
) -> Result<Volume> {
    let opts = FileOptions {
        read_only,
        lock,
        ..FileOptions::default()
    };
    let backend = crate::remote::open_store(path, &opts)?;
    let mut open_opts = OpenOptions {
        read_only,
        error_policy,
        key: key()?,
        retag_key: new_key()?,
        retag_to: retag_to(),
        ..OpenOptions::default()
    };
    if let Some(stage) = stage_bytes {
        open_opts.stage_bytes = usize::try_from(stage).context("stage size does not fit in memory")?;
    }
    // A read-write open of a volume left in use recovers it first: show that it is working.
    let mut bar: Option<ProgressBar> = None;
    let mut show = |done: u64, total: u64| {
        let pb = bar.get_or_insert_with(|| {
            let pb = ProgressBar::new(total);
            if let Ok(style) =
                ProgressStyle::with_template("{msg:>8} [{bar:40}] {pos}/{len} groups eta {eta}")
            {
                pb.set_style(style.progress_chars("=> "));
            }
            pb.set_message("recover");
            pb
        });
        pb.set_position(done);
    };
    let vol = if let Some(meta) = split_metadata(&*backend, &opts)? {
        Volume::open_split(backend, meta, &open_opts)
    } else if backend_is_member(&*backend) {
        let members = open_members(path, backend, &opts)?;
        Volume::open_members_with_progress(members, &open_opts, &mut show)
    } else {
        Volume::open_with_progress(backend, &open_opts, &mut show)
    }
    .naming("open", path)?;
    if let Some(pb) = bar {
        pb.finish_and_clear();
    }
    for w in vol.warnings() {
        crate::log::line(&format!("blockguard: warning: {w}"));
    }
    if let Some(r) = vol.recovery_at_open() {
        crate::log::line(&format!(
            "blockguard: {} was not closed cleanly: recovered ({})",
            path.display(),
            describe_recovery(r)
        ));
        for p in &r.damaged {
            crate::log::line(&format!(
                "blockguard: warning: damaged metadata in group {} sector {} (blocks {}..{}): {}; reads of these blocks fail until `blockguard recover --rebuild` rebuilds it",
                p.group,
                p.sector,
                p.first_block,
                p.first_block + u64::from(p.blocks),
                p.detail
            ));
        }
    }
    Ok(vol)
}

/// What recovery at open did, in one phrase: the journal's replay in `journal` mode, the
/// groups settled otherwise.
pub(crate) fn describe_recovery(r: &blockguard::RecoveryReport) -> String {
    if let Some(j) = &r.journal {
        let dropped = match j.dropped_segments {
            0 => String::new(),
            d => format!(
                "; DROPPED {d} later segments (blocks {:?}): a segment before them is damaged or was lost, so those blocks may read an older version",
                j.dropped_blocks
            ),
        };
        return format!(
            "replayed {} journal segments, {} blocks written home; replay stopped at: {}{dropped}",
            j.segments_replayed, j.blocks_replayed, j.stopped
        );
    }
    let retagged = if r.blocks_retagged > 0 {
        format!(
            "; {} blocks of {} groups written in the last window retagged from their data",
            r.blocks_retagged, r.groups_dirty
        )
    } else {
        String::new()
    };
    let torn = if r.blocks_torn > 0 {
        format!(
            "; {} blocks marked torn: their data matches none of their tags (a crash cut their last \
             write short, or the metadata that described them was damaged), so they fail every \
             read until they are written again (`blockguard check` lists them)",
            r.blocks_torn
        )
    } else {
        String::new()
    };
    format!(
        "{} groups examined, {} rewritten, {} blocks back to the version on disk, {} first writes completed{retagged}{torn}",
        r.groups_examined - r.groups_skipped,
        r.groups_rewritten,
        r.blocks_reverted,
        r.pairs_completed
    )
}

/// Creates a new sparse volume file at `path` with default options (used by `serve --create`).
pub(crate) fn create_volume(path: &Path, size: u64) -> Result<Volume> {
    let opts = FormatOptions {
        key: key()?,
        ..FormatOptions::with_size(size)
    };
    create_file_volume(path, &opts)
}

/// Creates a new sparse file sized for `opts` and formats it. Refuses an existing path.
pub(crate) fn create_file_volume(path: &Path, opts: &FormatOptions) -> Result<Volume> {
    if crate::remote::is_remote(path) {
        bail!(
            "{}: an NBD export cannot be created from here (its server makes it); format it with `blockguard format {}`",
            path.display(),
            path.display()
        );
    }
    let len = backing_len(opts, path)?;
    let backend = FileBackend::create(path, len, &FileOptions::default())?;
    let mut opts = opts.clone();
    opts.assume_zeroed = true;
    let vol = Volume::format(Arc::new(backend), &opts).inspect_err(|_| {
        let _ = std::fs::remove_file(path);
    })?;
    Ok(vol)
}

/// Bytes of backing store a volume with `opts` needs at `path`. The engine names a volume
/// that does not exist yet "new volume"; the user knows it by its path.
pub(crate) fn backing_len(opts: &FormatOptions, path: &Path) -> Result<u64> {
    opts.backing_len().map_err(|e| match e {
        blockguard::Error::InvalidArgument { detail, .. } => blockguard::Error::InvalidArgument {
            volume: path.display().to_string(),
            detail,
        }
        .into(),
        other => anyhow::Error::new(other).context(format!("cannot size {}", path.display())),
    })
}

/// A progress bar for `total` bytes on stderr (hidden when stderr is not a terminal).
pub(crate) fn progress(total: u64, what: &str) -> ProgressBar {
    let pb = ProgressBar::new(total);
    if let Ok(style) =
        ProgressStyle::with_template("{msg:>8} [{bar:40}] {bytes}/{total_bytes} {bytes_per_sec} eta {eta}")
    {
        pb.set_style(style.progress_chars("=> "));
    }
    pb.set_message(what.to_string());
    pb
}

// The workspace builds for 64-bit targets only, where a `usize` holds every `u64`.
const _: () = assert!(usize::BITS == 64);

/// `x` as a `usize`: a length or offset inside an in-memory buffer, which the caller has
/// already bounded by that buffer's length.
#[allow(clippy::cast_possible_truncation)] // Lossless: `usize` is 64 bits wide (asserted above).
pub(crate) const fn usize_of(x: u64) -> usize {
    x as usize
}

/// Exit codes: 0 success, 1 corruption found, 2 usage or I/O error, 128 + N stopped by
/// signal N.
pub(crate) fn exit_code_for(err: &anyhow::Error) -> u8 {
    if let Some(i) = err
        .chain()
        .find_map(|e| e.downcast_ref::<crate::interrupt::Interrupted>())
    {
        return i.exit_code();
    }
    let corrupt = err.chain().any(|e| {
        e.downcast_ref::<blockguard::Error>()
            .is_some_and(blockguard::Error::is_corruption)
    });
    if corrupt {
        1
    } else {
        2
    }
}

/// Refuses sizes that are not a positive multiple of `block_size`.
pub(crate) fn check_size(size: u64, block_size: u32) -> Result<()> {
    if size == 0 || !size.is_multiple_of(u64::from(block_size)) {
        bail!("size {size} is not a positive multiple of the block size {block_size}");
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sizes_use_binary_units() {
        assert_eq!(parse_size("64M").unwrap(), 64 << 20);
        assert_eq!(parse_size("10G").unwrap(), 10 << 30);
        assert_eq!(parse_size("4096").unwrap(), 4096);
        assert!(parse_size("ten").unwrap_err().contains("512K, 64M"));
        assert!(parse_size("-1G").unwrap_err().contains("negative"));
        assert_eq!(parse_block_size("4K").unwrap(), 4096);
        assert_eq!(parse_block_size("512").unwrap(), 512);
        assert!(parse_block_size("3K").is_err());
        assert!(parse_block_size("128K").is_err());
        assert!(parse_block_size("16E").is_err());
        assert!(check_size(4095, 4096).is_err());
        assert!(check_size(0, 4096).is_err());
    }
}
