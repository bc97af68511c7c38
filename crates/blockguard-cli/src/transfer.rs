//! `blockguard import` and `blockguard export`: copy between a raw image and a volume.
//!
//! Both follow the rules of [`crate::target`]: the target is never the source itself, is
//! refused without `--force` when it may hold data, devices are measured by seeking to their
//! end, and what was written is synced before success is reported.

use crate::common::{open_volume, progress, usize_of, PathOnce};
use crate::interrupt::Signals;
use crate::target::{open_image_target, refuse_same, ImageTarget};
use anyhow::{bail, Context, Result};
use blockguard::blockguard_backend::{Backend, FileBackend, FileOptions, LockMode};
use blockguard::Volume;
use clap::Args;
use std::os::unix::fs::FileTypeExt;
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
    ///
    /// An export that does not finish (an error, or SIGINT/SIGTERM/SIGHUP; a second signal
    /// exits at once) leaves no image that could pass for a finished one: a new file is
    /// written under a temporary name next to it (".NAME.blockguard-export-…") and renamed to
    /// NAME only when complete and synced, otherwise removed; an existing file is left empty;
    /// a block device is written in place and keeps the image's first bytes, up to where it
    /// stopped (the error says the byte), and its old data after them.
    pub(crate) raw: PathBuf,
    /// Overwrite a non-empty file or device, or one holding a blockguard volume.
    #[arg(long)]
    pub(crate) force: bool,
}

fn is_zero(b: &[u8]) -> bool {
    blockguard::tag::is_zero(b)
}

/// What `kind` is, for messages: "a pipe (FIFO)", "a directory", …
fn kind_name(kind: std::fs::FileType) -> &'static str {
    if kind.is_file() {
        "a regular file"
    } else if kind.is_block_device() {
        "a block device"
    } else if kind.is_char_device() {
        "a character device"
    } else if kind.is_dir() {
        "a directory"
    } else if kind.is_fifo() {
        "a pipe (FIFO)"
    } else if kind.is_socket() {
        "a socket"
    } else if kind.is_symlink() {
        "a symbolic link"
    } else {
        "neither a file nor a device"
    }
}

/// Opens an import source: a regular file, or a block device (measured by seeking to its
/// end: its inode says 0). The type is checked with `stat` before opening, since opening a
/// pipe waits for a writer that may never come. Opened read-only with a shared lock — through
/// loop devices and partitions too — so nothing writes it during the copy: not a server of
/// the volume it holds, nor the import itself (the volume's own open is exclusive).
fn open_source(path: &Path) -> Result<FileBackend> {
    let meta = std::fs::metadata(path).with_context(|| format!("cannot access {}", path.display()))?;
    let kind = meta.file_type();
    if !kind.is_file() && !kind.is_block_device() {
        bail!(
            "{} is {}: import reads a regular file or a block device",
            path.display(),
            kind_name(kind)
        );
    }
    let opts = FileOptions {
        read_only: true,
        lock: LockMode::Shared,
        ..FileOptions::default()
    };
    let source = FileBackend::open(path, &opts)?;
    if source.is_empty() {
        bail!("{} is empty: there is nothing to import", path.display());
    }
    Ok(source)
}

/// Refuses a volume that holds written data: importing over it replaces that data.
fn refuse_if_written(vol: &Volume, path: &Path) -> Result<()> {
    let written = vol.first_written_block(0).naming("read the metadata of", path)?;
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
    let raw = open_source(&args.raw)?;
    let len = raw.len();
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
        raw.read_at(chunk, off)
            .with_context(|| format!("cannot read {} at byte {off}", args.raw.display()))?;
        if is_zero(chunk) {
            // Zero runs become unwritten blocks: no data written, and they stay holes.
            vol.write_zeroes(off, n)
        } else {
            vol.write_at(chunk, off)
        }
        .with_context(|| format!("import stopped at byte {off}"))?;
        off += n;
        pb.set_position(off);
    }
    // Closing flushes: the data is durable before success is reported.
    vol.close().doing("flush and close", &args.volume)?;
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
    let signals = Signals::watch()?;
    let vol = open_volume(&args.volume, true)?;
    let len = vol.size();
    let target = open_image_target(&args.raw, len, args.force)?;
    if let Err(stop) = copy_out(&vol, &target, &signals) {
        let left = target.abandon(stop.written);
        return Err(stop.cause.context(format!(
            "export to {} stopped at byte {} ({left})",
            args.raw.display(),
            stop.at
        )));
    }
    let rest = target.backend.len() - len;
    target.finish()?;
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

/// Why and where an export stopped.
struct Stopped {
    /// The byte of the volume where it failed.
    at: u64,
    /// Bytes of the image written before that.
    written: u64,
    cause: anyhow::Error,
}

/// Copies the volume into the target, verifying every block, then syncs the target. Stops at
/// the first error, or at a stop signal (checked between chunks).
fn copy_out(vol: &Volume, target: &ImageTarget, signals: &Signals) -> Result<(), Stopped> {
    let out = &target.backend;
    let len = vol.size();
    let pb = progress(len, "export");
    let mut buf = vec![0u8; usize_of(CHUNK)];
    let mut off = 0u64;
    let stopped = |at: u64, written: u64, cause: anyhow::Error| Stopped { at, written, cause };
    while off < len {
        if let Some(signal) = signals.caught() {
            return Err(stopped(off, off, signal.into()));
        }
        let n = CHUNK.min(len - off);
        let chunk = &mut buf[..usize_of(n)];
        if let Err(e) = vol.read_at(chunk, off) {
            // Where exactly: the bad block's first byte, when verification failed.
            let at = e.corrupt_block().map_or(off, |b| b * u64::from(vol.block_size()));
            return Err(stopped(at, off, e.into()));
        }
        let written = if !is_zero(chunk) {
            out.write_at(chunk, off)
        } else if target.must_zero() {
            out.zero_range(off, n)
        } else {
            // A new or emptied file reads zeros here already, and stays sparse.
            Ok(())
        };
        if let Err(e) = written {
            return Err(stopped(
                off,
                off,
                anyhow::Error::new(e).context("cannot write the image"),
            ));
        }
        off += n;
        pb.set_position(off);
    }
    if let Err(e) = out.flush() {
        return Err(stopped(
            len,
            len,
            anyhow::Error::new(e).context("cannot sync the image"),
        ));
    }
    if let Some(signal) = signals.caught() {
        return Err(stopped(len, len, signal.into()));
    }
    pb.finish_and_clear();
    Ok(())
}
