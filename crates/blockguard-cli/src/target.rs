//! Where commands write: recognizing a target that is the source itself, refusing targets that
//! may hold data, and preparing raw-image targets (files and block devices) for `export`.
//!
//! The rules every writing command follows: without `--force`, refuse a target that holds a
//! blockguard volume or is a non-empty file or device; never write a target that is the
//! source itself, `--force` or not; measure devices by seeking to their end (a device node's
//! own length is 0) and never resize them; sync what was written before reporting success.

use crate::common::usize_of;
use anyhow::{bail, Context, Result};
use blockguard::blockguard_backend::{Backend, FileBackend, FileOptions, OpenError};
use std::path::{Path, PathBuf};

/// True if `a` and `b` share data: the same file through any name or hard link, the same
/// device through any node, or a loop device (a partition of one, loop devices stacked on
/// those) and the file under it, identified by device and inode number — see
/// [`blockguard::blockguard_backend::stack`]. False when either does not exist.
pub(crate) fn same_data(a: &Path, b: &Path) -> Result<bool> {
    blockguard::blockguard_backend::share_data(a, b).with_context(|| {
        format!(
            "cannot tell whether {} and {} share data",
            a.display(),
            b.display()
        )
    })
}

/// `path` made absolute and free of `.`, `..` and symbolic links as far as it exists: the
/// canonical path of what exists, else that of its directory with its name (following a
/// dangling symbolic link to where it points). Two names of a file not created yet resolve
/// alike: `m0.bgv` and `./m0.bgv`.
pub(crate) fn resolved(path: &Path) -> PathBuf {
    let mut path = path.to_path_buf();
    // A chain of dangling links ends, or is cut off after a few hops (a loop).
    for _ in 0..8 {
        if let Ok(p) = path.canonicalize() {
            return p;
        }
        match std::fs::read_link(&path) {
            Ok(to) => path = path.parent().map_or_else(|| to.clone(), |dir| dir.join(&to)),
            Err(_) => break,
        }
    }
    let dir = match path.parent() {
        Some(d) if !d.as_os_str().is_empty() => d.to_path_buf(),
        _ => PathBuf::from("."),
    };
    match (dir.canonicalize(), path.file_name()) {
        (Ok(dir), Some(name)) => dir.join(name),
        _ => std::path::absolute(&path).unwrap_or(path),
    }
}

/// True if `a` and `b` name the same file, device or data ([`same_data`]), or, for what does
/// not exist yet, the same path ([`resolved`]).
pub(crate) fn same_target(a: &Path, b: &Path) -> Result<bool> {
    if crate::remote::is_remote(a) || crate::remote::is_remote(b) {
        return Ok(crate::remote::same_remote(a, b));
    }
    Ok(same_data(a, b)? || resolved(a) == resolved(b))
}

/// Refuses `target` when it shares data with `source`: no `--force` makes that work, since
/// the copy would overwrite what it is still reading.
pub(crate) fn refuse_same(source: &Path, target: &Path, what: &str) -> Result<()> {
    if same_data(source, target)? {
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
    refuse_if_holding_data(backend, !backend.is_block_device())
}

/// [`refuse_if_in_use`] for any store: `is_file` says whether any length means data (a
/// regular file), or whether samples must be read (a device or a remote export, whose length
/// is fixed).
pub(crate) fn refuse_if_holding_data(backend: &dyn Backend, is_file: bool) -> Result<()> {
    let path = backend.name();
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
    if is_file {
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

/// How an export's image reaches its target, which decides what an unfinished one leaves.
pub(crate) enum Landing {
    /// A new file: the image is written to `temp`, a new file in the same directory, and
    /// renamed to the target only once complete and synced; an unfinished one is removed.
    New {
        /// The temporary file.
        temp: PathBuf,
    },
    /// An existing regular file, emptied and sized for the export; emptied again if the
    /// export does not finish (it must not pass for an image).
    Emptied,
    /// A block device, written in place: an unfinished export leaves the image's first bytes
    /// and the device's old data after them (said in `export --help`).
    Device,
}

/// A raw-image target opened for `export`, sized and checked.
pub(crate) struct ImageTarget {
    /// Where the image is written (exclusively locked): the target, or the temporary file.
    pub(crate) backend: FileBackend,
    /// The target as the user named it.
    pub(crate) path: PathBuf,
    /// How the image gets there.
    pub(crate) landing: Landing,
}

impl ImageTarget {
    /// True when zero runs must be written: a device keeps old data where nothing is written,
    /// a new or emptied file reads zeros there already (and stays sparse).
    pub(crate) fn must_zero(&self) -> bool {
        matches!(self.landing, Landing::Device)
    }

    /// Once the image is written and synced: renames a new file's temporary to the target
    /// (never over something created there meanwhile) and makes that durable.
    pub(crate) fn finish(self) -> Result<()> {
        let Landing::New { temp } = &self.landing else {
            return Ok(());
        };
        if let Err(e) = rename_no_replace(temp, &self.path) {
            let _ = std::fs::remove_file(temp);
            return Err(e).with_context(|| {
                format!(
                    "cannot move the finished image from {} to {} (the image was removed)",
                    temp.display(),
                    self.path.display()
                )
            });
        }
        sync_parent_dir(&self.path)
    }

    /// After a failure: removes a new file's temporary, or empties an existing file again.
    /// Says what the target holds now, for the error message; `written` is how many bytes of
    /// the image were written.
    pub(crate) fn abandon(self, written: u64) -> String {
        let path = self.path.display();
        match &self.landing {
            Landing::New { temp } => match std::fs::remove_file(temp) {
                Ok(()) => format!("{path} was not created"),
                Err(e) => format!(
                    "{path} was not created, but the unfinished image {} could not be removed ({e}): remove it",
                    temp.display()
                ),
            },
            Landing::Emptied => match empty_file(&self.path, 0) {
                Ok(()) => format!("{path} was left empty"),
                Err(e) => format!("{path} holds an unfinished image and could not be emptied ({e:#})"),
            },
            Landing::Device => format!(
                "{path} holds the image's first {written} bytes, and its old data after them"
            ),
        }
    }
}

/// Renames `from` to `to` unless something exists at `to`: `renameat2(RENAME_NOREPLACE)`, or
/// where the filesystem lacks it a hard link and an unlink (which refuse an existing `to` too).
fn rename_no_replace(from: &Path, to: &Path) -> std::io::Result<()> {
    use rustix::fs::{renameat_with, RenameFlags, CWD};
    match renameat_with(CWD, from, CWD, to, RenameFlags::NOREPLACE) {
        Ok(()) => Ok(()),
        Err(rustix::io::Errno::INVAL | rustix::io::Errno::NOSYS) => {
            std::fs::hard_link(from, to)?;
            std::fs::remove_file(from)
        }
        Err(e) => Err(e.into()),
    }
}

/// A name for the temporary file of an export to `path`, in the same directory (so the final
/// rename stays on one filesystem), hidden, and saying what it is for: `attempt` picks
/// another when one is taken.
fn temp_name(path: &Path, attempt: u32) -> PathBuf {
    let pid = std::process::id();
    let name = path.file_name().map(|n| n.to_string_lossy()).unwrap_or_default();
    // Short enough for NAME_MAX (255) whatever the target's name.
    let name: String = name.chars().take(100).collect();
    path.with_file_name(format!(".{name}.blockguard-export-{pid}-{attempt}"))
}

/// Opens `path` to receive a `len`-byte image: a missing file is created (as a temporary, see
/// [`Landing::New`]); without `force` a volume or a non-empty file or device is refused; a
/// file is emptied and sized, a device measured, which must hold at least `len` bytes.
pub(crate) fn open_image_target(path: &Path, len: u64, force: bool) -> Result<ImageTarget> {
    let exclusive = FileOptions::default();
    match std::fs::symlink_metadata(path) {
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            let mut attempt = 0;
            loop {
                let temp = temp_name(path, attempt);
                match FileBackend::create(&temp, len, &exclusive) {
                    Ok(backend) => {
                        return Ok(ImageTarget {
                            backend,
                            path: path.to_path_buf(),
                            landing: Landing::New { temp },
                        })
                    }
                    Err(OpenError::AlreadyExists { .. }) if attempt < 100 => attempt += 1,
                    Err(e) => return Err(e).with_context(|| format!("cannot create {}", path.display())),
                }
            }
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
            path: path.to_path_buf(),
            landing: Landing::Device,
        });
    }
    // The lock taken by `backend` is held meanwhile; a fresh open then measures the new length.
    empty_file(path, len)?;
    drop(backend);
    Ok(ImageTarget {
        backend: FileBackend::open(path, &exclusive)?,
        path: path.to_path_buf(),
        landing: Landing::Emptied,
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
