//! Where commands write: recognizing a target that is the source itself, refusing targets that
//! may hold data, and preparing raw-image targets (files and block devices) for `export`.
//!
//! The rules every writing command follows: without `--force`, refuse a target that holds a
//! blockguard volume or is a non-empty file or device; never write a target that is the
//! source itself, `--force` or not; measure devices by seeking to their end (a device node's
//! own length is 0) and never resize them; sync what was written before reporting success.

use crate::common::usize_of;
use anyhow::{bail, Context, Result};
use blockguard::blockguard_backend::{Backend, FileBackend, FileOptions};
use std::fs::Metadata;
use std::os::unix::fs::{FileTypeExt, MetadataExt};
use std::path::{Path, PathBuf};

/// True if `a` and `b` name the same data: the same file (through any name or link), the same
/// block device (through any device node), or a loop device and the file behind it.
pub(crate) fn same_data(a: &Path, b: &Path) -> bool {
    let (Ok(ma), Ok(mb)) = (std::fs::metadata(a), std::fs::metadata(b)) else {
        // One of them does not exist (yet): they cannot be the same.
        return false;
    };
    if (ma.dev(), ma.ino()) == (mb.dev(), mb.ino()) {
        return true;
    }
    let device = |m: &Metadata| m.file_type().is_block_device();
    if device(&ma) && device(&mb) && ma.rdev() == mb.rdev() {
        return true;
    }
    let backs = |dev: &Metadata, file: &Path| {
        device(dev)
            && loop_backing_file(dev.rdev())
                .zip(file.canonicalize().ok())
                .is_some_and(|(backing, file)| backing == file)
    };
    backs(&ma, b) || backs(&mb, a)
}

/// The file behind loop device `rdev`, from sysfs; `None` for other devices.
fn loop_backing_file(rdev: u64) -> Option<PathBuf> {
    let (major, minor) = (rustix::fs::major(rdev), rustix::fs::minor(rdev));
    let text = std::fs::read_to_string(format!("/sys/dev/block/{major}:{minor}/loop/backing_file")).ok()?;
    Some(PathBuf::from(text.trim_end_matches('\n')))
}

/// Refuses `target` when it is `source` itself: no `--force` makes that work, since the copy
/// would overwrite what it is still reading.
pub(crate) fn refuse_same(source: &Path, target: &Path, what: &str) -> Result<()> {
    if same_data(source, target) {
        bail!(
            "{} and {} are the same file or device: {what} would overwrite what it reads",
            source.display(),
            target.display()
        );
    }
    Ok(())
}

/// Refuses to overwrite what may hold data: a non-empty regular file, an existing volume, or a
/// device with any non-zero byte in its first or last MiB or in a 64 KiB sample of every GiB
/// (scanning a whole device could take hours; `--force` is the way past a false refusal).
pub(crate) fn refuse_if_in_use(backend: &FileBackend) -> Result<()> {
    let path = backend.path().display();
    let len = backend.len();
    // Reads at most `n` bytes at `off`; every `n` below is at most 1 MiB.
    let read = |off: u64, n: u64| -> Result<Vec<u8>> {
        let mut buf = vec![0u8; usize_of(n.min(len - off))];
        backend
            .read_at(&mut buf, off)
            .with_context(|| format!("cannot read {path} at byte {off} to see whether it is in use"))?;
        Ok(buf)
    };
    if len >= 512 && read(0, 512)?.starts_with(&blockguard::format::SB_MAGIC) {
        bail!("{path} holds a blockguard volume; use --force to overwrite it");
    }
    if !backend.is_block_device() {
        if len > 0 {
            bail!("{path} is not empty ({len} bytes); use --force to overwrite it");
        }
        return Ok(());
    }
    let mut probes = vec![(0, 1 << 20), (len.saturating_sub(1 << 20), 1 << 20)];
    probes.extend((1..len >> 30).map(|g| (g << 30, 64 << 10)));
    for (off, n) in probes {
        if off < len && read(off, n)?.iter().any(|&b| b != 0) {
            bail!("{path} is not empty (data at byte {off}); use --force to overwrite it");
        }
    }
    Ok(())
}

/// A raw-image target opened for `export`, sized and checked.
pub(crate) struct ImageTarget {
    /// The open file or device (exclusively locked).
    pub(crate) backend: FileBackend,
    /// True for a file this run created (removed again if the export fails).
    pub(crate) created: bool,
    /// True when zero runs must be written: a device keeps old data where nothing is written,
    /// a freshly created or truncated file reads zeros there already.
    pub(crate) must_zero: bool,
}

/// Opens `path` to receive a `len`-byte image: creates a missing file sparse, refuses (without
/// `force`) a volume or a non-empty file or device, truncates a file and measures a device,
/// which must hold at least `len` bytes.
pub(crate) fn open_image_target(path: &Path, len: u64, force: bool) -> Result<ImageTarget> {
    let exclusive = FileOptions::default();
    match std::fs::metadata(path) {
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            let backend = FileBackend::create(path, len, &exclusive)?;
            return Ok(ImageTarget {
                backend,
                created: true,
                must_zero: false,
            });
        }
        Err(e) => return Err(e).with_context(|| format!("cannot access {}", path.display())),
        Ok(_) => {}
    }
    // Opening refuses what is neither a regular file nor a block device, and a target another
    // process holds (a served volume), before anything is written.
    let backend = FileBackend::open(path, &exclusive)?;
    if !force {
        refuse_if_in_use(&backend)?;
    }
    if backend.is_block_device() {
        if backend.len() < len {
            bail!(
                "{} holds {} bytes, less than the {len} bytes to write",
                path.display(),
                backend.len()
            );
        }
        return Ok(ImageTarget {
            backend,
            created: false,
            must_zero: true,
        });
    }
    // The lock taken by `backend` is held meanwhile; a fresh open then measures the new length.
    empty_file(path, len)?;
    drop(backend);
    Ok(ImageTarget {
        backend: FileBackend::open(path, &exclusive)?,
        created: false,
        must_zero: false,
    })
}

/// Makes the regular file at `path` `len` bytes of zeros: truncating to zero and back zeroes it
/// instantly and keeps it sparse.
pub(crate) fn empty_file(path: &Path, len: u64) -> Result<()> {
    let file = std::fs::OpenOptions::new()
        .write(true)
        .open(path)
        .with_context(|| format!("cannot open {} for writing", path.display()))?;
    file.set_len(0)
        .and_then(|()| file.set_len(len))
        .with_context(|| format!("cannot truncate {} to {len} bytes", path.display()))
}

/// Makes a new file's directory entry durable (the file's own data is synced separately).
pub(crate) fn sync_parent_dir(path: &Path) -> Result<()> {
    let parent = match path.parent() {
        Some(p) if !p.as_os_str().is_empty() => p,
        _ => Path::new("."),
    };
    std::fs::File::open(parent)
        .and_then(|d| d.sync_all())
        .with_context(|| {
            format!(
                "cannot sync directory {} after creating {}",
                parent.display(),
                path.display()
            )
        })
}
