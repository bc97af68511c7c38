//! `blockguard format`: create a volume on a file or block device.

use crate::common::{check_size, mode_parser, parse_block_size, parse_size, profile_parser, progress};
use anyhow::{bail, Context, Result};
use blockguard::blockguard_backend::{Backend, FileBackend, FileOptions};
use blockguard::{FormatOptions, Mode, Profile, Volume};
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
    /// Tag profile: how each block's checksum tag is computed.
    #[arg(long, default_value = "crc32c", value_parser = profile_parser())]
    pub(crate) profile: Profile,
    /// A label stored in the superblock.
    #[arg(long, default_value = "")]
    pub(crate) label: String,
    /// Overwrite an existing volume, a non-empty file or a non-empty device.
    #[arg(long)]
    pub(crate) force: bool,
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
    let mut opts = FormatOptions {
        size,
        block_size: args.block_size,
        mode: args.mode,
        profile: args.profile,
        uuid: None,
        label: args.label.clone(),
        group_blocks: None,
        assume_zeroed: false,
    };
    blockguard::format::validate_label(&args.label).map_err(anyhow::Error::msg)?;
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
                crate::target::refuse_if_in_use(&backend)?;
            }
            if meta.is_file() {
                let len = match size {
                    Some(_) => crate::common::backing_len(&opts, path)?,
                    None => meta.len(),
                };
                drop(backend);
                crate::target::empty_file(path, len)?;
                opts.assume_zeroed = true;
                let backend = FileBackend::open(path, &FileOptions::default())?;
                Volume::format(Arc::new(backend), &opts)?
            } else {
                let len = backend.len();
                let pb = progress(len, "zeroing");
                let vol = Volume::format_with_progress(Arc::new(backend), &opts, &mut |done, _| {
                    pb.set_position(done);
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
