//! `blockguard import` and `blockguard export`: copy between a raw image and a volume.
//!
//! Both follow the rules of [`crate::target`]: the target is never the source itself, is
//! refused without `--force` when it may hold data, devices are measured by seeking to their
//! end, and what was written is synced before success is reported.

use crate::common::{open_volume, progress, usize_of};
use crate::target::{open_image_target, refuse_same, sync_parent_dir};
use anyhow::{bail, Context, Result};
use blockguard::blockguard_backend::Backend;
use blockguard::Volume;
use clap::Args;
use std::fs::File;
use std::io::{Seek, SeekFrom};
use std::os::unix::fs::{FileExt, FileTypeExt};
use std::path::{Path, PathBuf};

/// Bytes copied per step: large enough for sequential speed, small enough for memory.
const CHUNK: u64 = 4 << 20;

/// Arguments of `import`.
#[derive(Args, Debug)]
pub(crate) struct ImportArgs {
    /// Raw image to read: a regular file or a block device.
    pub(crate) raw: PathBuf,
    /// Volume to write it into (from byte 0).
    pub(crate) volume: PathBuf,
    /// Overwrite a volume that already holds data.
    #[arg(long)]
    pub(crate) force: bool,
}

/// Arguments of `export`.
#[derive(Args, Debug)]
pub(crate) struct ExportArgs {
    /// Volume to read (every block is verified).
    pub(crate) volume: PathBuf,
    /// Raw image to write: a new file (created sparse), an empty file, or a block device at
    /// least as large as the volume.
    pub(crate) raw: PathBuf,
    /// Overwrite a non-empty file or device, or one holding a blockguard volume.
    #[arg(long)]
    pub(crate) force: bool,
}

fn is_zero(b: &[u8]) -> bool {
    blockguard::tag::is_zero(b)
}

/// Opens an import source and measures it: a regular file by its length, a block device by
/// seeking to its end (its inode says 0). Anything else has no size to import.
fn open_source(path: &Path) -> Result<(File, u64)> {
    let file = File::open(path).with_context(|| format!("cannot open {}", path.display()))?;
    let meta = file
        .metadata()
        .with_context(|| format!("cannot read the metadata of {}", path.display()))?;
    let kind = meta.file_type();
    let len = if kind.is_file() {
        meta.len()
    } else if kind.is_block_device() {
        (&file)
            .seek(SeekFrom::End(0))
            .with_context(|| format!("cannot measure {} (seek to its end)", path.display()))?
    } else {
        let what = if kind.is_char_device() {
            "a character device"
        } else if kind.is_dir() {
            "a directory"
        } else if kind.is_fifo() {
            "a pipe"
        } else {
            "not a regular file"
        };
        bail!(
            "{} is {what}, not a regular file or block device: it has no size to import",
            path.display()
        );
    };
    if len == 0 {
        bail!("{} is empty: there is nothing to import", path.display());
    }
    Ok((file, len))
}

/// Refuses a volume that holds written data: importing over it replaces that data.
fn refuse_if_written(vol: &Volume, path: &Path) -> Result<()> {
    let written = vol
        .first_written_block(0)
        .with_context(|| format!("cannot read the metadata of {}", path.display()))?;
    if let Some(block) = written {
        bail!(
            "{} already holds data (block {block}, byte {}, is written); use --force to overwrite it",
            path.display(),
            block * u64::from(vol.block_size())
        );
    }
    Ok(())
}

/// `blockguard import`.
pub(crate) fn run_import(args: &ImportArgs) -> Result<()> {
    refuse_same(&args.raw, &args.volume, "importing")?;
    let (raw, len) = open_source(&args.raw)?;
    let vol = open_volume(&args.volume, false)?;
    if len > vol.size() {
        bail!(
            "{} is {len} bytes, larger than the volume {} ({} bytes)",
            args.raw.display(),
            args.volume.display(),
            vol.size()
        );
    }
    if !args.force {
        refuse_if_written(&vol, &args.volume)?;
    }
    let pb = progress(len, "import");
    let mut buf = vec![0u8; usize_of(CHUNK)];
    let mut off = 0u64;
    while off < len {
        let n = CHUNK.min(len - off);
        let chunk = &mut buf[..usize_of(n)];
        raw.read_exact_at(chunk, off)
            .with_context(|| format!("cannot read {} at byte {off}", args.raw.display()))?;
        if is_zero(chunk) {
            // Zero runs become unwritten blocks: no data written, and they stay holes.
            vol.write_zeroes(off, n)
        } else {
            vol.write_at(chunk, off)
        }
        .with_context(|| format!("cannot write {} at byte {off}", args.volume.display()))?;
        off += n;
        pb.set_position(off);
    }
    // Closing flushes: the data is durable before success is reported.
    vol.close()
        .with_context(|| format!("cannot flush and close {}", args.volume.display()))?;
    pb.finish_and_clear();
    say!(
        "imported {len} bytes from {} into {}",
        args.raw.display(),
        args.volume.display()
    );
    Ok(())
}

/// `blockguard export`.
pub(crate) fn run_export(args: &ExportArgs) -> Result<()> {
    refuse_same(&args.volume, &args.raw, "exporting")?;
    let vol = open_volume(&args.volume, true)?;
    let len = vol.size();
    let target = open_image_target(&args.raw, len, args.force)?;
    let result = copy_out(&vol, args, &target.backend, target.must_zero);
    if result.is_err() && target.created {
        // A half-written new image must not pass for an export; it held nothing before.
        let _ = std::fs::remove_file(&args.raw);
    }
    result?;
    if target.created {
        sync_parent_dir(&args.raw)?;
    }
    let rest = target.backend.len() - len;
    say!(
        "exported {len} verified bytes from {} to {}{}",
        args.volume.display(),
        args.raw.display(),
        if rest > 0 {
            format!(" (its last {rest} bytes were left as they were)")
        } else {
            String::new()
        }
    );
    Ok(())
}

/// Copies the volume into `out`, verifying every block, then syncs `out`.
fn copy_out(vol: &Volume, args: &ExportArgs, out: &dyn Backend, must_zero: bool) -> Result<()> {
    let len = vol.size();
    let raw = args.raw.display();
    let pb = progress(len, "export");
    let mut buf = vec![0u8; usize_of(CHUNK)];
    let mut off = 0u64;
    while off < len {
        let n = CHUNK.min(len - off);
        let chunk = &mut buf[..usize_of(n)];
        vol.read_at(chunk, off)?;
        let written = if !is_zero(chunk) {
            out.write_at(chunk, off)
        } else if must_zero {
            out.zero_range(off, n)
        } else {
            // A new or truncated file reads zeros here already, and stays sparse.
            Ok(())
        };
        written.with_context(|| format!("cannot write {raw} at byte {off}"))?;
        off += n;
        pb.set_position(off);
    }
    out.flush().with_context(|| format!("cannot sync {raw}"))?;
    pb.finish_and_clear();
    Ok(())
}
