//! `blockguard import` and `blockguard export`: copy between a raw image and a volume.

use crate::common::{open_volume, progress};
use anyhow::{bail, Context, Result};
use clap::Args;
use std::fs::File;
use std::io::{Read, Seek, SeekFrom, Write};
use std::path::PathBuf;

const CHUNK: usize = 4 << 20;

/// Arguments of `import`.
#[derive(Args, Debug)]
pub struct ImportArgs {
    /// Raw image to read.
    pub raw: PathBuf,
    /// Volume to write it into (from byte 0).
    pub volume: PathBuf,
}

/// Arguments of `export`.
#[derive(Args, Debug)]
pub struct ExportArgs {
    /// Volume to read (every block is verified).
    pub volume: PathBuf,
    /// Raw image to write (created or truncated; zero runs stay sparse).
    pub raw: PathBuf,
}

fn is_zero(b: &[u8]) -> bool {
    blockguard::tag::is_zero(b)
}

pub fn run_import(args: ImportArgs) -> Result<()> {
    let mut raw = File::open(&args.raw).with_context(|| format!("cannot open {}", args.raw.display()))?;
    let len = raw.metadata()?.len();
    let vol = open_volume(&args.volume, false)?;
    if len > vol.size() {
        bail!(
            "{} is {len} bytes, larger than the volume {} ({} bytes)",
            args.raw.display(),
            args.volume.display(),
            vol.size()
        );
    }
    let pb = progress(len, "import");
    let mut buf = vec![0u8; CHUNK];
    let mut off = 0u64;
    while off < len {
        let n = (CHUNK as u64).min(len - off) as usize;
        raw.read_exact(&mut buf[..n])
            .with_context(|| format!("reading {} at byte {off}", args.raw.display()))?;
        if is_zero(&buf[..n]) {
            // Zero runs become unwritten blocks: no data written, and they stay holes.
            vol.write_zeroes(off, n as u64)?;
        } else {
            vol.write_at(&buf[..n], off)?;
        }
        off += n as u64;
        pb.set_position(off);
    }
    vol.close()?;
    pb.finish_and_clear();
    println!(
        "imported {len} bytes from {} into {}",
        args.raw.display(),
        args.volume.display()
    );
    Ok(())
}

pub fn run_export(args: ExportArgs) -> Result<()> {
    let vol = open_volume(&args.volume, true)?;
    let len = vol.size();
    let mut raw = File::create(&args.raw).with_context(|| format!("cannot create {}", args.raw.display()))?;
    let pb = progress(len, "export");
    let mut buf = vec![0u8; CHUNK];
    let mut off = 0u64;
    while off < len {
        let n = (CHUNK as u64).min(len - off) as usize;
        vol.read_at(&mut buf[..n], off)?;
        if is_zero(&buf[..n]) {
            raw.seek(SeekFrom::Current(n as i64))?;
        } else {
            raw.write_all(&buf[..n])
                .with_context(|| format!("writing {} at byte {off}", args.raw.display()))?;
        }
        off += n as u64;
        pb.set_position(off);
    }
    raw.set_len(len)?;
    raw.sync_all()?;
    pb.finish_and_clear();
    println!(
        "exported {len} verified bytes from {} to {}",
        args.volume.display(),
        args.raw.display()
    );
    Ok(())
}
