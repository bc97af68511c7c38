//! `blockguard format`: create a volume on a file or block device.

use crate::common::{
    check_size, error_policy_parser, mode_parser, parse_block_size, parse_size, profile_parser, progress,
};
use anyhow::{bail, Context, Result};
use blockguard::blockguard_backend::{Backend, FileBackend, FileOptions};
use blockguard::{ErrorPolicy, FormatOptions, Mode, Profile, Volume};
use clap::Args;
use std::path::PathBuf;
use std::sync::Arc;

/// Arguments of `format`.
#[derive(Args, Debug)]
pub(crate) struct FormatArgs {
    /// File or block device to format (a missing file is created sparse).
    pub(crate) path: PathBuf,
    /// Usable size of the volume, binary units ("10G" = 10 GiB). Defaults to the whole
    /// device, or the current length of an existing file.
    #[arg(long, value_parser = parse_size, allow_hyphen_values = true)]
    pub(crate) size: Option<u64>,
    /// Logical block size: a power of two from 512 to 64K (units allowed: "4K").
    #[arg(long, default_value = "4096", value_parser = parse_block_size, allow_hyphen_values = true)]
    pub(crate) block_size: u32,
    /// Consistency mode: dual (crash-consistent) or none (no crash protection).
    #[arg(long, default_value = "dual", value_parser = mode_parser())]
    pub(crate) mode: Mode,
    /// Tag profile: how each block's tag is computed and checked. Keyed profiles need
    /// --key-file, here and at every open. `docs/FORMAT.md` lays each one out byte by byte.
    #[arg(long, default_value = "crc32c", value_parser = profile_parser())]
    pub(crate) profile: Profile,
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
    };
    blockguard::format::validate_label(&args.label).map_err(anyhow::Error::msg)?;
    let path = &args.path;
    let vol = if args.mirrors.is_empty() {
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
            if a == b || crate::target::same_data(a, b)? {
                bail!(
                    "{} and {} are the same file: mirror copies must be on separate files or devices",
                    a.display(),
                    b.display()
                );
            }
        }
    }
    // Every copy is checked before any is written: a refused one must not leave the others
    // formatted.
    for p in &paths {
        match std::fs::metadata(p) {
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                if args.size.is_none() {
                    bail!("{} does not exist: give --size to create it", p.display());
                }
            }
            Err(e) => return Err(e).with_context(|| format!("cannot access {}", p.display())),
            Ok(_) if !args.force => {
                let backend = FileBackend::open(p, &FileOptions::default())?;
                crate::target::refuse_if_in_use(&backend)?;
            }
            Ok(_) => {}
        }
    }
    let mut backends: Vec<Arc<dyn Backend>> = Vec::new();
    for p in &paths {
        let member_args = FormatArgs {
            path: (*p).clone(),
            size: args.size,
            block_size: args.block_size,
            mode: args.mode,
            profile: args.profile,
            label: args.label.clone(),
            error_policy: args.error_policy,
            force: args.force,
            mirrors: Vec::new(),
            json: false,
        };
        let mut member_opts = opts.clone();
        // Prepares the target exactly as a single volume's (checks, creation, zeroing).
        format_one(&member_args, &mut member_opts)?.close()?;
        let abs = std::fs::canonicalize(p).with_context(|| format!("resolving {}", p.display()))?;
        let backend = FileBackend::open(&abs, &FileOptions::default())?;
        backends.push(Arc::new(backend));
    }
    let mut set_opts = opts.clone();
    set_opts.assume_zeroed = true;
    let smallest = backends.iter().map(|b| b.len()).min().unwrap_or(0);
    if set_opts.size.is_none() {
        // The whole of the smallest copy.
        set_opts.size = Some(
            blockguard::Geometry::for_backing_len(smallest, args.block_size, args.profile.tag_size())
                .map_err(|e| anyhow::anyhow!("{}: {e}", args.path.display()))?
                .size(),
        );
    }
    Volume::format_members(backends, &set_opts).context("forming the mirror set")
}

/// Formats one file or device (the volume, or one copy of a set).
fn format_one(args: &FormatArgs, opts: &mut FormatOptions) -> Result<Volume> {
    let size = args.size;
    let path = &args.path;
    Ok(match std::fs::metadata(path) {
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            if size.is_none() {
                bail!("{} does not exist: give --size to create it", path.display());
            }
            crate::common::create_file_volume(path, opts)?
        }
        Err(e) => return Err(e).with_context(|| format!("cannot access {}", path.display())),
        Ok(meta) => {
            let backend = FileBackend::open(path, &FileOptions::default())?;
            if !args.force {
                crate::target::refuse_if_in_use(&backend)?;
            }
            if meta.is_file() {
                let len = match size {
                    Some(_) => crate::common::backing_len(opts, path)?,
                    None => meta.len(),
                };
                drop(backend);
                crate::target::empty_file(path, len)?;
                opts.assume_zeroed = true;
                let backend = FileBackend::open(path, &FileOptions::default())?;
                Volume::format(Arc::new(backend), opts)?
            } else {
                let len = backend.len();
                let pb = progress(len, "zeroing");
                let vol = Volume::format_with_progress(Arc::new(backend), opts, &mut |done, _| {
                    pb.set_position(done);
                })?;
                pb.finish_and_clear();
                vol
            }
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
            sb.profile.name(),
            sb.error_policy.name(),
            crate::info::uuid_string(&sb.uuid)
        );
        for (i, (member, _)) in members.iter().enumerate() {
            say!("  copy {i}: {member}");
        }
    }
    Ok(())
}
