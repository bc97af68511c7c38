//! `blockguard format`: create a volume on a file or block device.

use crate::common::{
    check_size, error_policy_parser, mode_parser, parse_block_size, parse_size, profile_parser, progress,
};
use anyhow::{bail, Context, Result};
use blockguard::blockguard_backend::{Backend, FileBackend, FileOptions};
use blockguard::{ErrorPolicy, FormatOptions, Mode, Profile, Volume};
use clap::Args;
use std::path::{Path, PathBuf};
use std::sync::Arc;

/// Arguments of `format`.
#[derive(Args, Debug)]
pub(crate) struct FormatArgs {
    /// File or block device to format (a missing file is created sparse), or an NBD export
    /// (`nbd://HOST[:PORT]/EXPORT`, `nbd+unix:///EXPORT?socket=PATH`) of the size its server gives.
    pub(crate) path: PathBuf,
    /// Usable size of the volume, binary units ("10G" = 10 GiB). Defaults to the whole
    /// device, or the current length of an existing file.
    #[arg(long, value_parser = parse_size, allow_hyphen_values = true)]
    pub(crate) size: Option<u64>,
    /// Logical block size: a power of two from 512 to 64K (units allowed: "4K").
    #[arg(long, default_value = "4096", value_parser = parse_block_size, allow_hyphen_values = true)]
    pub(crate) block_size: u32,
    /// Consistency mode: dual (crash-consistent: new tags durable before data; the default),
    /// journal (every write goes to a journal first, then home: after a crash each write
    /// request up to the journal's atomic size is entirely old or entirely new, torn writes
    /// included; costs writing the data twice), rebuild (no barrier per write; after a crash
    /// the tags of the regions written last are recomputed from the data, so damage inside
    /// that window goes undetected), or none (no crash protection, for comparison).
    #[arg(long, default_value = "dual", value_parser = mode_parser())]
    pub(crate) mode: Mode,
    /// Journal mode: size of the journal ("64M"; a multiple of 4 KiB and of the block size,
    /// at least 64K). Defaults to a sixteenth of the volume, between 1 MiB and 64 MiB. The
    /// largest atomic write is about a quarter of it (`info` shows it).
    #[arg(long, value_parser = parse_size)]
    pub(crate) journal_size: Option<u64>,
    /// Keep the superblocks, tags, bitmaps and journal on this other file or device (a small
    /// fast one), leaving the volume's path holding only the data, at the offsets of a raw
    /// image, plus a 4 KiB trailer at its end that names the metadata device: its first SIZE
    /// bytes read as the plain image. Every later command is given the data path. Needs --size.
    #[arg(long, value_name = "PATH")]
    pub(crate) metadata_device: Option<PathBuf>,
    /// Tag profile: how each block's tag is computed and checked. Keyed profiles need
    /// --key-file, here and at every open. `docs/FORMAT.md` lays each one out byte by byte.
    #[arg(long, default_value = "crc32c", value_parser = profile_parser())]
    pub(crate) profile: Profile,
    /// Bytes of room for each block's tag: 8, 16 or 32 (at least the profile's tag size, the
    /// default). More room lets `retag` switch the volume later, in place, to a profile with
    /// larger tags (crc32c with --tag-room 32 can become blake3-keyed or hmac-sha256), at the
    /// cost of more metadata (with 4 KiB blocks 1.67 % of the data for 32 bytes, 0.81 % for
    /// 16, 0.40 % for 8).
    #[arg(long, value_name = "BYTES")]
    pub(crate) tag_room: Option<usize>,
    /// A label stored in the superblock.
    #[arg(long, default_value = "")]
    pub(crate) label: String,
    /// What the volume does when a read finds a block with no good copy (it fails
    /// verification and no mirror copy verifies): eio (the read fails, every failure is
    /// logged), read-only (also suspend writes until `blockguard resume` or a reopen) or
    /// continue (the read fails, each block is logged once). Stored in the superblock;
    /// `serve` and `mount` can override it. Never returns wrong data.
    #[arg(long, default_value = "eio", value_parser = error_policy_parser())]
    pub(crate) error_policy: ErrorPolicy,
    /// Overwrite an existing volume, a non-empty file or a non-empty device.
    #[arg(long)]
    pub(crate) force: bool,
    /// Also format this file or device as a mirror copy of the volume (repeat for a third
    /// copy). Every copy holds the whole volume; reads that fail verification on one copy
    /// are served from another and the bad copy is rewritten. Needs --size for a file that
    /// does not exist yet.
    /// A copy may be an NBD export (an NBD URI).
    #[arg(long = "mirror", value_name = "PATH")]
    pub(crate) mirrors: Vec<PathBuf>,
    /// Print the result as JSON.
    #[arg(long)]
    pub(crate) json: bool,
}

/// `blockguard format`.
pub(crate) fn run(args: &FormatArgs) -> Result<()> {
    let size = args.size;
    if let Some(size) = size {
        check_size(size, args.block_size)?;
    }
    // The key is read and matched with the profile before anything is created or written.
    let key = crate::common::key()?;
    if let Err(e) = args.profile.tagger(&[0; 16], key.as_ref()) {
        bail!("{}: {e}", args.path.display());
    }
    let mut opts = FormatOptions {
        size,
        block_size: args.block_size,
        mode: args.mode,
        profile: args.profile,
        key,
        uuid: None,
        label: args.label.clone(),
        group_blocks: None,
        assume_zeroed: false,
        error_policy: args.error_policy,
        journal_size: args.journal_size,
        tag_room: args.tag_room,
    };
    opts.tag_slot()
        .map_err(|e| anyhow::anyhow!("{}: {e}", args.path.display()))?;
    blockguard::format::validate_label(&args.label).map_err(anyhow::Error::msg)?;
    let path = &args.path;
    let vol = if let Some(meta) = &args.metadata_device {
        format_split(args, &opts, meta)?
    } else if args.mirrors.is_empty() {
        format_one(args, &mut opts)?
    } else {
        format_set(args, &opts)?
    };
    report(args, path, vol)
}

/// Formats a mirror set: the volume's path and every `--mirror`, each prepared like a single
/// volume's target (refused without `--force` if it holds data, created if missing), none
/// the same file as another.
fn format_set(args: &FormatArgs, opts: &FormatOptions) -> Result<Volume> {
    if args.mirrors.len() > 2 {
        bail!("at most two --mirror copies (three copies in all)");
    }
    let paths: Vec<&PathBuf> = std::iter::once(&args.path).chain(&args.mirrors).collect();
    for (i, a) in paths.iter().enumerate() {
        for b in &paths[i + 1..] {
            if crate::target::same_target(a, b)? {
                bail!(
                    "{} and {} are the same file: mirror copies must be on separate files or devices",
                    a.display(),
                    b.display()
                );
            }
        }
    }
    check_copies(args, opts, &paths)?;
    let mut backends: Vec<Arc<dyn Backend>> = Vec::new();
    for p in &paths {
        let member_args = FormatArgs {
            path: (*p).clone(),
            size: args.size,
            block_size: args.block_size,
            mode: args.mode,
            journal_size: args.journal_size,
            metadata_device: None,
            profile: args.profile,
            tag_room: args.tag_room,
            label: args.label.clone(),
            error_policy: args.error_policy,
            force: args.force,
            mirrors: Vec::new(),
            json: false,
        };
        let mut member_opts = opts.clone();
        // Prepares the target exactly as a single volume's (checks, creation, zeroing).
        format_one(&member_args, &mut member_opts)?.close()?;
        let backend = if crate::remote::is_remote(p) {
            crate::remote::open_store(p, &FileOptions::default())?
        } else {
            let abs = std::fs::canonicalize(p).with_context(|| format!("resolving {}", p.display()))?;
            Arc::new(FileBackend::open(&abs, &FileOptions::default())?)
        };
        backends.push(backend);
    }
    let mut set_opts = opts.clone();
    set_opts.assume_zeroed = true;
    let smallest = backends.iter().map(|b| b.len()).min().unwrap_or(0);
    if set_opts.size.is_none() {
        // The whole of the smallest copy.
        set_opts.size = Some(
            blockguard::Geometry::for_backing_len(smallest, args.block_size, set_opts.tag_slot()?)
                .map_err(|e| anyhow::anyhow!("{}: {e}", args.path.display()))?
                .size(),
        );
    }
    Volume::format_members(backends, &set_opts).context("forming the mirror set")
}

/// Formats a volume split over the data path and a metadata device.
fn format_split(args: &FormatArgs, opts: &FormatOptions, meta_path: &Path) -> Result<Volume> {
    if !args.mirrors.is_empty() {
        bail!("--metadata-device cannot be combined with --mirror");
    }
    if crate::remote::is_remote(&args.path) || crate::remote::is_remote(meta_path) {
        bail!("a volume split over a data and a metadata device needs local files or devices");
    }
    if args.size.is_none() {
        bail!("--metadata-device needs --size");
    }
    if std::fs::metadata(meta_path).is_ok() && crate::target::same_target(&args.path, meta_path)? {
        bail!(
            "{} is the volume's own path: the metadata device must be another file or device",
            meta_path.display()
        );
    }
    let (data_len, meta_len) = Volume::split_lengths(opts)?;
    // Both are checked before either is written.
    let data_ready = split_target(&args.path, data_len, args.force, "data")?;
    let meta_ready = split_target(meta_path, meta_len, args.force, "metadata")?;
    let data = data_ready.open(&args.path, data_len)?;
    let meta = meta_ready.open(meta_path, meta_len)?;
    let hint =
        std::fs::canonicalize(meta_path).with_context(|| format!("resolving {}", meta_path.display()))?;
    let mut opts = opts.clone();
    opts.assume_zeroed = data_ready.zeroed() && meta_ready.zeroed();
    Volume::format_split(data, meta, &opts, &hint.display().to_string()).with_context(|| {
        format!(
            "formatting {} with metadata on {}",
            args.path.display(),
            meta_path.display()
        )
    })
}

/// One device of a split volume, checked and ready to be made.
enum SplitTarget {
    /// A missing file (created sparse) or an existing one (emptied and sized).
    File,
    Device,
}

impl SplitTarget {
    /// Whether the new store reads as zeros without being zeroed.
    fn zeroed(&self) -> bool {
        matches!(self, SplitTarget::File)
    }

    fn open(&self, path: &Path, len: u64) -> Result<Arc<dyn Backend>> {
        Ok(match self {
            SplitTarget::File => {
                if std::fs::metadata(path).is_ok() {
                    crate::target::empty_file(path, len)?;
                    Arc::new(FileBackend::open(path, &FileOptions::default())?)
                } else {
                    Arc::new(FileBackend::create(path, len, &FileOptions::default())?)
                }
            }
            SplitTarget::Device => Arc::new(FileBackend::open(path, &FileOptions::default())?),
        })
    }
}

/// Checks one path of a split volume: missing is fine (a file is made), an existing one is
/// refused without `--force` if it may hold data (or is in use), a device must be long enough.
fn split_target(path: &Path, len: u64, force: bool, what: &str) -> Result<SplitTarget> {
    match std::fs::metadata(path) {
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(SplitTarget::File),
        Err(e) => Err(e).with_context(|| format!("cannot access the {what} device {}", path.display())),
        Ok(m) => {
            let backend = FileBackend::open(path, &FileOptions::default())?;
            if !force {
                crate::target::refuse_if_in_use(&backend)?;
            }
            if m.is_file() {
                return Ok(SplitTarget::File);
            }
            if backend.len() < len {
                bail!(
                    "the {what} device {} has {} bytes, the volume needs {len}",
                    path.display(),
                    backend.len()
                );
            }
            Ok(SplitTarget::Device)
        }
    }
}

/// Checks every copy of a new set before any is written: a refused one must not leave the
/// others formatted. Each is measured as it will be: the copies of a set have one layout,
/// which puts the backup superblock at the end of each, so they must be the same length.
fn check_copies(args: &FormatArgs, opts: &FormatOptions, paths: &[&PathBuf]) -> Result<()> {
    let mut lens = Vec::new();
    for p in paths {
        lens.push(Target::inspect(p, args, opts)?.len(p, opts)?);
    }
    if lens.iter().any(|&l| l != lens[0]) {
        let sizes: Vec<String> = paths
            .iter()
            .zip(&lens)
            .map(|(p, l)| format!("{} {l} bytes", p.display()))
            .collect();
        bail!(
            "the copies of a mirror set must be the same size, and these would not be ({}): \
             give --size to size files alike (a device keeps its own size: use devices of one \
             size, or files as large as the device, formatted without --size); nothing was written",
            sizes.join(", ")
        );
    }
    Ok(())
}

/// A target of `format`, checked (refused without `--force` if it may hold data, locked).
enum Target {
    /// A file to create.
    New,
    /// An existing file, to be emptied to `len` bytes.
    File { len: u64 },
    /// A block device or a remote NBD export, held open.
    Device(Arc<dyn Backend>),
}

impl Target {
    /// Checks `path` for a volume of `args.size` (`opts`): a missing file needs a size; what
    /// exists is opened (refused if another process holds it) and, without `--force`, refused
    /// if it may hold data. Writes nothing.
    fn inspect(path: &Path, args: &FormatArgs, opts: &FormatOptions) -> Result<Target> {
        if crate::remote::is_remote(path) {
            // An export has the size its server gave it, like a device.
            let backend = crate::remote::open_remote(path, false)?;
            if !args.force {
                crate::target::refuse_if_holding_data(&backend, false)?;
            }
            return Ok(Target::Device(Arc::new(backend)));
        }
        match std::fs::metadata(path) {
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                if args.size.is_none() {
                    bail!("{} does not exist: give --size to create it", path.display());
                }
                Ok(Target::New)
            }
            Err(e) => Err(e).with_context(|| format!("cannot access {}", path.display())),
            Ok(meta) => {
                let backend = FileBackend::open(path, &FileOptions::default())?;
                if !args.force {
                    crate::target::refuse_if_in_use(&backend)?;
                }
                Ok(match (meta.is_file(), args.size) {
                    (true, Some(_)) => Target::File {
                        len: crate::common::backing_len(opts, path)?,
                    },
                    (true, None) => Target::File { len: meta.len() },
                    (false, _) => Target::Device(Arc::new(backend)),
                })
            }
        }
    }

    /// Bytes of backing store the volume will have on it.
    fn len(&self, path: &Path, opts: &FormatOptions) -> Result<u64> {
        Ok(match self {
            Target::New => crate::common::backing_len(opts, path)?,
            Target::File { len } => *len,
            Target::Device(backend) => backend.len(),
        })
    }
}

/// Formats one file or device (the volume, or one copy of a set).
fn format_one(args: &FormatArgs, opts: &mut FormatOptions) -> Result<Volume> {
    let path = &args.path;
    Ok(match Target::inspect(path, args, opts)? {
        Target::New => crate::common::create_file_volume(path, opts)?,
        Target::File { len } => {
            crate::target::empty_file(path, len)?;
            opts.assume_zeroed = true;
            let backend = FileBackend::open(path, &FileOptions::default())?;
            Volume::format(Arc::new(backend), opts)?
        }
        Target::Device(backend) => {
            let len = backend.len();
            let pb = progress(len, "zeroing");
            let vol = Volume::format_with_progress(backend, opts, &mut |done, _| {
                pb.set_position(done);
            })?;
            pb.finish_and_clear();
            vol
        }
    })
}

/// Closes the new volume and prints what was made.
fn report(args: &FormatArgs, path: &std::path::Path, vol: Volume) -> Result<()> {
    let members = vol.members();
    let sb = vol.superblock().clone();
    vol.close()?;
    if args.json {
        say!(
            "{}",
            serde_json::to_string_pretty(&crate::info::summary(&sb, path))?
        );
    } else {
        say!(
            "formatted {}: {} bytes in {} blocks of {} bytes, mode {}, tags {}, error policy {}, uuid {}",
            path.display(),
            sb.geometry.size(),
            sb.geometry.data_blocks,
            sb.geometry.block_size,
            sb.mode.name(),
            if sb.geometry.tag_size as usize == sb.profile.tag_size() {
                sb.profile.name().to_string()
            } else {
                format!("{} in {}-byte slots", sb.profile.name(), sb.geometry.tag_size)
            },
            sb.error_policy.name(),
            crate::info::uuid_string(&sb.uuid)
        );
        for (i, (member, _)) in members.iter().enumerate() {
            say!("  copy {i}: {member}");
        }
    }
    Ok(())
}
