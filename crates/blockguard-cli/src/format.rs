//! `blockguard format`: create a volume on a file or block device.

use crate::common::{check_size, parse_size, progress};
use anyhow::{bail, Context, Result};
use blockguard::blockguard_backend::{Backend, FileBackend, FileOptions};
use blockguard::{FormatOptions, Mode, Profile, Volume};
use clap::Args;
use std::path::PathBuf;
use std::sync::Arc;

/// Arguments of `format`.
#[derive(Args, Debug)]
pub struct FormatArgs {
    /// File or block device to format (a missing file is created sparse).
    pub path: PathBuf,
    /// Usable size of the volume, binary units ("10G" = 10 GiB). Defaults to the whole
    /// device, or the current length of an existing file.
    #[arg(long)]
    pub size: Option<String>,
    /// Logical block size in bytes (4096 or 512).
    #[arg(long, default_value_t = 4096)]
    pub block_size: u32,
    /// Consistency mode: dual (crash-consistent, default) or none (no crash protection).
    #[arg(long, default_value = "dual")]
    pub mode: String,
    /// Tag profile.
    #[arg(long, default_value = "crc32c")]
    pub profile: String,
    /// A label stored in the superblock.
    #[arg(long, default_value = "")]
    pub label: String,
    /// Overwrite an existing volume, a non-empty file or a non-empty device.
    #[arg(long)]
    pub force: bool,
    /// Print the result as JSON.
    #[arg(long)]
    pub json: bool,
}

pub fn run(args: FormatArgs) -> Result<()> {
    let mode = Mode::from_name(&args.mode)
        .with_context(|| format!("unknown mode {:?} (use dual or none)", args.mode))?;
    let profile = Profile::from_name(&args.profile)
        .with_context(|| format!("unknown tag profile {:?} (use crc32c)", args.profile))?;
    let size = args.size.as_deref().map(parse_size).transpose()?;
    if let Some(size) = size {
        check_size(size, args.block_size)?;
    }
    let mut opts = FormatOptions {
        size,
        block_size: args.block_size,
        mode,
        profile,
        uuid: None,
        label: args.label.clone(),
        assume_zeroed: false,
    };
    if args.label.len() > 64 {
        bail!("label is {} bytes, at most 64 fit", args.label.len());
    }
    let path = &args.path;
    let vol = match std::fs::metadata(path) {
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            if size.is_none() {
                bail!("{} does not exist: give --size to create it", path.display());
            }
            crate::common::create_file_volume(path, &opts)?
        }
        Err(e) => return Err(e).with_context(|| format!("cannot access {}", path.display())),
        Ok(meta) => {
            let backend = FileBackend::open(path, &FileOptions::default())?;
            if !args.force {
                refuse_if_in_use(&backend)?;
            }
            if meta.is_file() {
                // Truncating to zero and back zeroes the file instantly and keeps it sparse.
                let len = match size {
                    Some(_) => opts.backing_len()?,
                    None => meta.len(),
                };
                drop(backend);
                let f = std::fs::OpenOptions::new()
                    .write(true)
                    .open(path)
                    .with_context(|| format!("cannot open {}", path.display()))?;
                f.set_len(0)?;
                f.set_len(len)?;
                drop(f);
                opts.assume_zeroed = true;
                let backend = FileBackend::open(path, &FileOptions::default())?;
                Volume::format(Arc::new(backend), &opts)?
            } else {
                let len = backend.len();
                let pb = progress(len, "zeroing");
                let vol = Volume::format_with_progress(Arc::new(backend), &opts, &mut |done, _| {
                    pb.set_position(done)
                })?;
                pb.finish_and_clear();
                vol
            }
        }
    };
    let sb = vol.superblock().clone();
    vol.close()?;
    if args.json {
        println!(
            "{}",
            serde_json::to_string_pretty(&crate::info::summary(&sb, path))?
        );
    } else {
        println!(
            "formatted {}: {} bytes in {} blocks of {} bytes, mode {}, tags {}, uuid {}",
            path.display(),
            sb.geometry.size(),
            sb.geometry.data_blocks,
            sb.geometry.block_size,
            sb.mode.name(),
            sb.profile.name(),
            crate::info::uuid_string(&sb.uuid)
        );
    }
    Ok(())
}

/// An existing volume or any data in the first and last MiB counts as "in use".
fn refuse_if_in_use(backend: &FileBackend) -> Result<()> {
    let len = backend.len();
    let probe = (1u64 << 20).min(len);
    for off in [0, len - probe] {
        let mut buf = vec![0u8; probe as usize];
        backend.read_at(&mut buf, off)?;
        if buf.iter().any(|&b| b != 0) {
            let what = if buf.starts_with(&blockguard::format::SB_MAGIC) {
                "holds a blockguard volume"
            } else {
                "is not empty"
            };
            bail!("{} {what}; use --force to overwrite it", backend.path().display());
        }
    }
    Ok(())
}
