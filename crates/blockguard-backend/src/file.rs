//! A backend on a regular file or a block device, with positioned I/O.
//!
//! [`FileBackend`] is what the CLI, the NBD server and the FUSE export open. It uses only
//! positioned system calls (`pread`, `pwrite`, `pwritev`), so one open file serves many threads
//! without a shared file position; `flush` is `fdatasync`, which on a block device also flushes
//! the device's volatile write cache. [`Backend::zero_ranges`] asks a regular file for its
//! holes with `lseek(SEEK_DATA / SEEK_HOLE)`: that does move the (shared) file position, but
//! nothing here reads or relies on it, and each `lseek` starts from an absolute offset.
//!
//! A volume must be served by one process at a time (two writers would interleave data and tag
//! updates and break crash consistency), so [`FileBackend::open`] takes an advisory `flock` and
//! fails with [`OpenError::Locked`] instead of waiting when another process holds it.

use crate::{check_range, Backend};
use rustix::fs::{FallocateFlags, FlockOperation};
use rustix::io::Errno;
use std::fs::{File, OpenOptions};
use std::io::{self, IoSlice, Seek, SeekFrom};
use std::ops::{Deref, DerefMut, Range};
use std::os::unix::fs::{FileExt, FileTypeExt, OpenOptionsExt};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};

/// Largest number of buffers one `pwritev` call accepts on Linux (`IOV_MAX`).
const IOV_MAX: usize = 1024;

/// Largest buffer the zero-writing fallback of [`Backend::zero_range`] allocates: large enough
/// to keep the system-call count low, small enough not to matter for memory.
const ZERO_CHUNK: usize = 1 << 20;

/// Alignment required for `O_DIRECT` on regular files. 4096 is the largest logical block size
/// in common use, so it is valid on every Linux filesystem that supports direct I/O.
const DIRECT_FILE_ALIGN: usize = 4096;

/// Logical block size assumed for a block device that does not answer `BLKSSZGET`.
const DEFAULT_SECTOR: u32 = 512;

/// Which advisory lock [`FileBackend::open`] takes on the file or device.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum LockMode {
    /// Take no lock (for tools that inspect a volume another process may be serving).
    None,
    /// A shared lock: several readers may hold it, no exclusive holder may coexist.
    Shared,
    /// An exclusive lock: the only holder. The default, because a volume must be served by one
    /// process at a time.
    #[default]
    Exclusive,
}

/// How [`FileBackend::open`] and [`FileBackend::create`] open the file.
///
/// The default is read-write, buffered (no `O_DIRECT`), with an exclusive lock.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct FileOptions {
    /// Open read-only; every write, `zero_range` included, then fails with
    /// [`io::ErrorKind::PermissionDenied`].
    pub read_only: bool,
    /// Open with `O_DIRECT`, bypassing the page cache. Buffers, offsets and lengths must then be
    /// multiples of [`Backend::alignment`] (see [`AlignedBuf`]).
    pub direct: bool,
    /// Which advisory lock to take.
    pub lock: LockMode,
}

/// Why a file or device could not be opened or created. Every message names the path.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum OpenError {
    /// The path does not exist.
    #[error("{}: no such file or device", path.display())]
    NotFound {
        /// The path that was opened.
        path: PathBuf,
    },
    /// The caller may not open the path with the requested access.
    #[error("{}: permission denied", path.display())]
    PermissionDenied {
        /// The path that was opened.
        path: PathBuf,
    },
    /// [`FileBackend::create`] found something already at the path.
    #[error("{}: already exists (refusing to overwrite it)", path.display())]
    AlreadyExists {
        /// The path that was created.
        path: PathBuf,
    },
    /// The path is neither a regular file nor a block device (for example a directory).
    #[error("{}: not a regular file or block device", path.display())]
    NotFileOrDevice {
        /// The path that was opened.
        path: PathBuf,
    },
    /// Another open file holds a conflicting lock.
    #[error(
        "{}: the volume is in use by another process (it is locked; a volume can be served by \
         only one process at a time)",
        path.display()
    )]
    Locked {
        /// The path that was opened.
        path: PathBuf,
    },
    /// A loop device somewhere under the path is over a file that can no longer be opened by
    /// the name it was set up with (deleted, or the name now holds another file), so it cannot
    /// be locked: another process could write that file under another name unseen.
    #[error(
        "{}: cannot lock the file under loop device {}: {} was deleted or replaced since the \
         loop device was set up (detach the loop device and set it up again on the file's \
         current name)",
        path.display(),
        loop_device.display(),
        backing.display()
    )]
    BackingGone {
        /// The path that was opened.
        path: PathBuf,
        /// The loop device whose backing file is gone.
        loop_device: PathBuf,
        /// The backing file's name as the kernel reports it.
        backing: PathBuf,
    },
    /// The filesystem or device refuses `O_DIRECT`.
    #[error(
        "{}: the filesystem does not support direct I/O (O_DIRECT); open it without direct I/O",
        path.display()
    )]
    DirectUnsupported {
        /// The path that was opened.
        path: PathBuf,
    },
    /// Any other failure of the underlying system calls.
    #[error("{}: cannot {operation}", path.display())]
    Io {
        /// The path that was opened.
        path: PathBuf,
        /// What failed, as a verb phrase ("open it", "read its size").
        operation: &'static str,
        /// The underlying error (shown by the error chain, not in this message).
        #[source]
        source: io::Error,
    },
}

impl OpenError {
    /// Classifies an `open`/`stat` failure into the specific variants callers act on.
    pub(crate) fn from_io(path: &Path, err: io::Error) -> Self {
        let path = path.to_path_buf();
        match err.kind() {
            io::ErrorKind::NotFound => OpenError::NotFound { path },
            io::ErrorKind::PermissionDenied => OpenError::PermissionDenied { path },
            io::ErrorKind::AlreadyExists => OpenError::AlreadyExists { path },
            _ if err.raw_os_error() == Some(Errno::ISDIR.raw_os_error()) => {
                OpenError::NotFileOrDevice { path }
            }
            _ => OpenError::Io {
                path,
                operation: "open it",
                source: err,
            },
        }
    }
}

/// A heap buffer whose start address is a multiple of a chosen alignment, as `O_DIRECT` needs.
///
/// It over-allocates a `Vec<u8>` by `align - 1` bytes and exposes the aligned sub-slice, which
/// needs no `unsafe` and no custom allocator. The heap block never moves while the buffer lives
/// (moving an `AlignedBuf` moves only the `Vec` header), so the alignment holds for its lifetime.
/// The contents start zeroed.
pub struct AlignedBuf {
    storage: Vec<u8>,
    start: usize,
    len: usize,
    align: usize,
}

impl AlignedBuf {
    /// A zeroed buffer of `len` bytes starting at a multiple of `align` (0 is treated as 1).
    ///
    /// # Panics
    /// Like `vec![0; n]`, panics if `len + align` overflows `usize` and aborts if the allocation
    /// fails.
    pub fn new(len: usize, align: usize) -> Self {
        let align = align.max(1);
        let cap = len
            .checked_add(align - 1)
            .unwrap_or_else(|| panic!("AlignedBuf of {len} bytes aligned to {align} overflows"));
        let storage = vec![0u8; cap];
        // Casting the pointer to an integer is safe; only its value is used.
        let addr = storage.as_ptr() as usize;
        let start = (align - addr % align) % align;
        Self {
            storage,
            start,
            len,
            align,
        }
    }

    /// The alignment the buffer was created with.
    pub fn align(&self) -> usize {
        self.align
    }
}

impl Deref for AlignedBuf {
    type Target = [u8];
    fn deref(&self) -> &[u8] {
        &self.storage[self.start..self.start + self.len]
    }
}

impl DerefMut for AlignedBuf {
    fn deref_mut(&mut self) -> &mut [u8] {
        &mut self.storage[self.start..self.start + self.len]
    }
}

impl Clone for AlignedBuf {
    // A derived clone would copy `start`, which is only right for the original heap block.
    fn clone(&self) -> Self {
        let mut copy = AlignedBuf::new(self.len, self.align);
        copy.copy_from_slice(self);
        copy
    }
}

impl std::fmt::Debug for AlignedBuf {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("AlignedBuf")
            .field("len", &self.len)
            .field("align", &self.align)
            .finish_non_exhaustive()
    }
}

/// A [`Backend`] on a regular file or a block device.
///
/// The lock taken at open is held until the backend is dropped, which releases it explicitly:
/// a lock belongs to the open file description, which a process forked by this one (any
/// `Command`) shares until its `exec`, so closing the file alone could leave it held a moment
/// longer.
#[derive(Debug)]
pub struct FileBackend {
    file: File,
    /// For a loop device: the files under it (its backing file, and theirs when loop devices
    /// are stacked), held open only for the locks on them.
    backing_locks: Vec<File>,
    path: PathBuf,
    len: u64,
    block_device: bool,
    read_only: bool,
    direct: bool,
    /// Logical block size of a block device (`BLKSSZGET`); 512 for regular files. `fallocate`
    /// on a block device only accepts ranges aligned to it.
    sector: u64,
    /// What `alignment()` reports: 1 for buffered I/O, the `O_DIRECT` requirement otherwise.
    align: usize,
    /// Writeback hints handed to the kernel, so a test can see that a layer above forwards
    /// them (a wrapper that silently dropped them would only show as slower flushes).
    hints: AtomicU64,
}

impl FileBackend {
    /// Opens an existing regular file or block device.
    ///
    /// Fails with [`OpenError::Locked`] if `opts.lock` conflicts with a lock another open file
    /// holds (the call never waits), and with [`OpenError::DirectUnsupported`] if `opts.direct`
    /// is set and the filesystem refuses `O_DIRECT`.
    pub fn open(path: &Path, opts: &FileOptions) -> Result<FileBackend, OpenError> {
        // Refuse FIFOs, sockets and character devices before opening them: opening a FIFO can
        // block forever, and none of them is a fixed-length store.
        let meta = std::fs::metadata(path).map_err(|e| OpenError::from_io(path, e))?;
        if !is_file_or_device(&meta) {
            return Err(OpenError::NotFileOrDevice {
                path: path.to_path_buf(),
            });
        }
        let mut oo = OpenOptions::new();
        oo.read(true).write(!opts.read_only);
        Self::finish_open(path, opts, oo, None)
    }

    /// Creates a new sparse regular file of exactly `len` bytes and opens it (used by `format`).
    ///
    /// Refuses with [`OpenError::AlreadyExists`] if anything exists at `path`, so an existing
    /// volume can never be overwritten by accident. If a later step fails (locking, sizing),
    /// the new file is removed again. `opts.read_only` only affects the returned backend.
    pub fn create(path: &Path, len: u64, opts: &FileOptions) -> Result<FileBackend, OpenError> {
        let mut oo = OpenOptions::new();
        // Opened writable even when `opts.read_only` is set: the file must be sized. The
        // read-only flag is still enforced on every write through the returned backend.
        oo.read(true).write(true).create_new(true);
        Self::finish_open(path, opts, oo, Some(len))
    }

    /// Shared tail of `open` and `create`: open, check type, lock, measure, probe `O_DIRECT`.
    fn finish_open(
        path: &Path,
        opts: &FileOptions,
        mut oo: OpenOptions,
        create_len: Option<u64>,
    ) -> Result<FileBackend, OpenError> {
        if opts.direct {
            // `custom_flags` takes the raw flags as a C `int`, which is what libc's `O_DIRECT` is.
            oo.custom_flags(libc::O_DIRECT);
        }
        let file = oo.open(path).map_err(|e| {
            if opts.direct && e.raw_os_error() == Some(Errno::INVAL.raw_os_error()) {
                // tmpfs (before Linux 6.6) and some FUSE filesystems refuse O_DIRECT at open.
                OpenError::DirectUnsupported {
                    path: path.to_path_buf(),
                }
            } else {
                OpenError::from_io(path, e)
            }
        })?;
        // From here on a failure of `create` must remove the file it made.
        let cleanup = |err: OpenError| {
            if create_len.is_some() {
                // Best effort: the error reported is the one that made `create` fail.
                let _ = std::fs::remove_file(path);
            }
            err
        };
        let io_err = |operation: &'static str| {
            move |source: io::Error| OpenError::Io {
                path: path.to_path_buf(),
                operation,
                source,
            }
        };

        // Check the type again on the open file: the path may have been replaced since `stat`.
        let meta = file
            .metadata()
            .map_err(io_err("read its metadata"))
            .map_err(cleanup)?;
        if !is_file_or_device(&meta) {
            return Err(cleanup(OpenError::NotFileOrDevice {
                path: path.to_path_buf(),
            }));
        }
        let block_device = meta.file_type().is_block_device();

        lock(&file, path, opts.lock).map_err(cleanup)?;
        // A partition or loop device is another name for bytes of the disk or file under it:
        // lock those too, so the volume cannot be opened for writing through two names at
        // once (each lock is per inode).
        let backing_locks = if block_device && opts.lock != LockMode::None {
            lock_storage_under(path, &meta, opts.lock).map_err(cleanup)?
        } else {
            Vec::new()
        };

        let len = if let Some(len) = create_len {
            // `set_len` extends with a hole, so the file takes no space until written: this is
            // what makes `format` of a large volume instant. Sized before the O_DIRECT probe
            // below, which needs a block to read.
            file.set_len(len)
                .map_err(io_err("set its length"))
                .map_err(cleanup)?;
            len
        } else if block_device {
            // The inode of a device node has size 0; seeking to the end asks the block layer for
            // the device size without any ioctl. The file position is irrelevant: all I/O is
            // positioned.
            (&file)
                .seek(SeekFrom::End(0))
                .map_err(io_err("measure the device (seek to its end)"))
                .map_err(cleanup)?
        } else {
            meta.len()
        };

        let sector = if block_device {
            // Loop, NVMe and SCSI devices all answer BLKSSZGET; fall back to 512 otherwise.
            u64::from(rustix::fs::ioctl_blksszget(&file).unwrap_or(DEFAULT_SECTOR))
        } else {
            u64::from(DEFAULT_SECTOR)
        };
        let align = match (opts.direct, block_device) {
            (false, _) => 1,
            (true, true) => usize::try_from(sector).unwrap_or(DIRECT_FILE_ALIGN),
            (true, false) => DIRECT_FILE_ALIGN,
        };

        let backend = FileBackend {
            file,
            backing_locks,
            path: path.to_path_buf(),
            len,
            block_device,
            read_only: opts.read_only,
            direct: opts.direct,
            sector,
            align,
            hints: AtomicU64::new(0),
        };
        if opts.direct {
            backend.probe_direct().map_err(cleanup)?;
        }
        Ok(backend)
    }

    /// Some filesystems accept `O_DIRECT` at open and only refuse the I/O itself (EINVAL);
    /// reading the first block now turns that into a clear open error instead of a failure
    /// deep inside the engine.
    fn probe_direct(&self) -> Result<(), OpenError> {
        let probe_len = self.align as u64;
        if self.len < probe_len {
            return Ok(());
        }
        let mut buf = AlignedBuf::new(self.align, self.align);
        match self.file.read_exact_at(&mut buf, 0) {
            Ok(()) => Ok(()),
            Err(e) if e.raw_os_error() == Some(Errno::INVAL.raw_os_error()) => {
                Err(OpenError::DirectUnsupported {
                    path: self.path.clone(),
                })
            }
            Err(source) => Err(OpenError::Io {
                path: self.path.clone(),
                operation: "read its first block (direct I/O probe)",
                source,
            }),
        }
    }

    /// True if the backend is a block device rather than a regular file.
    pub fn is_block_device(&self) -> bool {
        self.block_device
    }

    /// The path the backend was opened with.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// How many writeback hints ([`Backend::start_writeback`]) reached the kernel so far.
    pub fn writeback_hints(&self) -> u64 {
        self.hints.load(Ordering::Relaxed)
    }

    /// True if the backend was opened with `O_DIRECT`.
    pub fn is_direct(&self) -> bool {
        self.direct
    }

    fn check_writable(&self) -> io::Result<()> {
        if self.read_only {
            return Err(io::Error::new(
                io::ErrorKind::PermissionDenied,
                format!("{}: opened read-only", self.path.display()),
            ));
        }
        Ok(())
    }

    /// Under `O_DIRECT` the kernel answers a misaligned request with a bare EINVAL; checking
    /// first gives the caller a message that says what is wrong.
    fn check_aligned(&self, addr: Option<usize>, offset: u64, len: u64) -> io::Result<()> {
        if !self.direct {
            return Ok(());
        }
        let a = self.align as u64;
        let addr_ok = addr.is_none_or(|p| p % self.align == 0);
        if offset % a != 0 || len % a != 0 || !addr_ok {
            return Err(io::Error::new(
                io::ErrorKind::InvalidInput,
                format!(
                    "{}: direct I/O needs offset, length and buffer aligned to {} bytes \
                     (got offset {offset}, length {len})",
                    self.path.display(),
                    self.align
                ),
            ));
        }
        Ok(())
    }

    /// Writes zeros over the range with ordinary writes: the fallback when the medium cannot
    /// deallocate or zero a range itself.
    fn write_zeros(&self, mut offset: u64, len: u64) -> io::Result<()> {
        let end = offset + len;
        let chunk = usize::try_from(len).map_or(ZERO_CHUNK, |l| l.min(ZERO_CHUNK));
        // Aligned so that the same code serves O_DIRECT (ranges are then aligned too).
        let zeros = AlignedBuf::new(chunk, self.align);
        while offset < end {
            let n = usize::try_from(end - offset).map_or(chunk, |r| r.min(chunk));
            self.file.write_all_at(&zeros[..n], offset)?;
            offset += n as u64;
        }
        Ok(())
    }

    /// The holes of a regular file inside `offset..end` (which lies inside the file), clipped
    /// to it, ascending and merged, found with `lseek(SEEK_DATA)` / `lseek(SEEK_HOLE)`.
    ///
    /// `lseek` sets the position of the open file description, which all clones of the
    /// descriptor share; no dup'd descriptor is needed because nothing depends on that position:
    /// every read and write of this backend is positioned (`pread`, `pwrite`, `pwritev`,
    /// `fallocate`), the descriptor is never handed out, and each `lseek` here starts from an
    /// absolute offset and returns its answer directly, so calls racing from several threads
    /// cannot disturb one another either.
    ///
    /// A filesystem without hole support reports the whole file as data, so the answer is then
    /// empty, which is correct ("nothing known").
    fn holes(&self, offset: u64, end: u64) -> io::Result<Vec<Range<u64>>> {
        use rustix::fs::{seek, SeekFrom as Whence};
        let mut out: Vec<Range<u64>> = Vec::new();
        let mut pos = offset;
        while pos < end {
            let data = match seek(&self.file, Whence::Data(pos)) {
                Ok(d) => d,
                // No data at or after `pos`: a hole up to the end of the file (whose length is
                // fixed for the backend's lifetime, like for every other method).
                Err(Errno::NXIO) => end,
                Err(Errno::INTR) => continue,
                Err(e) => return Err(e.into()),
            };
            let hole_end = data.min(end);
            if hole_end > pos {
                match out.last_mut() {
                    Some(last) if last.end == pos => last.end = hole_end,
                    _ => out.push(pos..hole_end),
                }
            }
            if data >= end {
                break;
            }
            let next_hole = match seek(&self.file, Whence::Hole(data)) {
                Ok(h) => h,
                // Only possible if the file shrank under us; report nothing more.
                Err(Errno::NXIO) => break,
                Err(Errno::INTR) => continue,
                Err(e) => return Err(e.into()),
            };
            if next_hole <= data {
                // Cannot happen (SEEK_HOLE never goes backwards); stop rather than loop.
                break;
            }
            pos = next_hole;
        }
        Ok(out)
    }

    /// Makes an aligned range read as zeros, deallocating it when the medium allows.
    fn deallocate(&self, offset: u64, len: u64) -> io::Result<()> {
        // PUNCH_HOLE frees the space (a thin or sparse backing store shrinks); ZERO_RANGE only
        // zeroes but is still far cheaper than writing. KEEP_SIZE is required with PUNCH_HOLE
        // and keeps a file from growing. Block devices accept both since Linux 4.9.
        let modes = [
            FallocateFlags::PUNCH_HOLE | FallocateFlags::KEEP_SIZE,
            FallocateFlags::ZERO_RANGE | FallocateFlags::KEEP_SIZE,
        ];
        for mode in modes {
            loop {
                match rustix::fs::fallocate(&self.file, mode, offset, len) {
                    Ok(()) => return Ok(()),
                    // Interrupted by a signal: go round again.
                    Err(Errno::INTR) => {}
                    // Not supported by this filesystem or device: try the next way.
                    Err(Errno::OPNOTSUPP | Errno::NOSYS) => break,
                    Err(e) => return Err(e.into()),
                }
            }
        }
        self.write_zeros(offset, len)
    }
}

impl Drop for FileBackend {
    fn drop(&mut self) {
        // Best effort: the close that follows releases the locks anyway, only maybe later.
        for f in std::iter::once(&self.file).chain(&self.backing_locks) {
            let _ = rustix::fs::flock(f, FlockOperation::Unlock);
        }
    }
}

/// Regular files and block devices are the only fixed-length stores we accept.
fn is_file_or_device(meta: &std::fs::Metadata) -> bool {
    meta.is_file() || meta.file_type().is_block_device()
}

/// Locks what the device `path` (open, with metadata `meta`) stands on: see
/// [`crate::stack::lock_layers`]. The chain is read by path, so it must start at the device
/// that is open (the path may have been replaced meanwhile).
fn lock_storage_under(path: &Path, meta: &std::fs::Metadata, mode: LockMode) -> Result<Vec<File>, OpenError> {
    use std::os::unix::fs::MetadataExt;
    let layers = crate::stack::layers(path)?;
    if layers.first().map(|l| l.store) != Some(crate::stack::Store::Device { rdev: meta.rdev() }) {
        return Err(OpenError::Io {
            path: path.to_path_buf(),
            operation: "lock it",
            source: io::Error::other("the path was replaced while it was opened"),
        });
    }
    crate::stack::lock_layers(&layers, path, mode)
}

/// Takes the advisory lock without waiting.
pub(crate) fn lock(file: &File, path: &Path, mode: LockMode) -> Result<(), OpenError> {
    let op = match mode {
        LockMode::None => return Ok(()),
        LockMode::Shared => FlockOperation::NonBlockingLockShared,
        LockMode::Exclusive => FlockOperation::NonBlockingLockExclusive,
    };
    loop {
        return match rustix::fs::flock(file, op) {
            Ok(()) => Ok(()),
            Err(Errno::INTR) => continue,
            // EWOULDBLOCK (= EAGAIN on Linux): someone else holds a conflicting lock.
            Err(Errno::WOULDBLOCK) => Err(OpenError::Locked {
                path: path.to_path_buf(),
            }),
            Err(e) => Err(OpenError::Io {
                path: path.to_path_buf(),
                operation: "lock it",
                source: e.into(),
            }),
        };
    }
}

/// `sync_file_range(SYNC_FILE_RANGE_WRITE)`: starts writeback of the dirty pages in the range
/// without waiting for it. Neither rustix nor std offer it; measured need: in a sequential
/// write the commit's next flush otherwise waits for the whole previous batch to reach the
/// disk (10–25 ms per 32 MiB here) instead of overlapping that with the next batch.
#[allow(unsafe_code)]
fn sync_file_range_write(file: &File, offset: u64, len: u64) -> io::Result<()> {
    use std::os::fd::AsRawFd;
    let (Ok(off), Ok(n)) = (i64::try_from(offset), i64::try_from(len)) else {
        return Err(io::Error::new(io::ErrorKind::InvalidInput, "range beyond i64"));
    };
    loop {
        // SAFETY: the call takes only integers; the descriptor belongs to `file`, which is
        // borrowed (so open) for the whole call. No memory is passed to the kernel.
        let r = unsafe { libc::sync_file_range(file.as_raw_fd(), off, n, libc::SYNC_FILE_RANGE_WRITE) };
        if r == 0 {
            return Ok(());
        }
        let e = io::Error::last_os_error();
        if e.kind() != io::ErrorKind::Interrupted {
            return Err(e);
        }
    }
}

impl Backend for FileBackend {
    fn len(&self) -> u64 {
        self.len
    }

    fn read_at(&self, buf: &mut [u8], offset: u64) -> io::Result<()> {
        check_range(offset, buf.len() as u64, self.len)?;
        self.check_aligned(Some(buf.as_ptr() as usize), offset, buf.len() as u64)?;
        // Holes in a sparse file read as zeros; that is what makes unwritten blocks of a freshly
        // formatted volume read as zeros.
        self.file.read_exact_at(buf, offset)
    }

    fn write_at(&self, buf: &[u8], offset: u64) -> io::Result<()> {
        self.check_writable()?;
        check_range(offset, buf.len() as u64, self.len)?;
        self.check_aligned(Some(buf.as_ptr() as usize), offset, buf.len() as u64)?;
        self.file.write_all_at(buf, offset)
    }

    fn write_vectored_at(&self, bufs: &[&[u8]], offset: u64) -> io::Result<()> {
        self.check_writable()?;
        let total = bufs
            .iter()
            .try_fold(0u64, |acc, b| acc.checked_add(b.len() as u64));
        let Some(total) = total else {
            return Err(io::Error::new(
                io::ErrorKind::InvalidInput,
                "vectored write length overflows",
            ));
        };
        check_range(offset, total, self.len)?;
        let mut pos = offset;
        for b in bufs {
            self.check_aligned(Some(b.as_ptr() as usize), pos, b.len() as u64)?;
            pos += b.len() as u64;
        }

        // Cursor into `bufs`: index of the current buffer and bytes of it already written.
        let (mut idx, mut done_in_buf, mut pos) = (0usize, 0usize, offset);
        loop {
            // Skip empty and finished buffers so no zero-length iovec is ever submitted.
            while idx < bufs.len() && done_in_buf >= bufs[idx].len() {
                idx += 1;
                done_in_buf = 0;
            }
            if idx >= bufs.len() {
                return Ok(());
            }
            // At most IOV_MAX buffers per call, else the kernel fails the whole call with
            // EINVAL.
            let iov: Vec<IoSlice<'_>> = std::iter::once(&bufs[idx][done_in_buf..])
                .chain(bufs[idx + 1..].iter().copied())
                .filter(|b| !b.is_empty())
                .take(IOV_MAX)
                .map(IoSlice::new)
                .collect();
            let mut written = match rustix::io::pwritev(&self.file, &iov, pos) {
                Ok(0) => {
                    return Err(io::Error::new(
                        io::ErrorKind::WriteZero,
                        format!("{}: pwritev wrote nothing", self.path.display()),
                    ))
                }
                Ok(n) => n,
                Err(Errno::INTR) => continue,
                Err(e) => return Err(e.into()),
            };
            pos += written as u64;
            // A short write is legal (signals, quotas near full); advance the cursor and retry
            // with the rest.
            while written > 0 && idx < bufs.len() {
                let left = bufs[idx].len() - done_in_buf;
                if written >= left {
                    written -= left;
                    idx += 1;
                    done_in_buf = 0;
                } else {
                    done_in_buf += written;
                    written = 0;
                }
            }
        }
    }

    fn flush(&self) -> io::Result<()> {
        if self.read_only {
            // Nothing of ours can be dirty.
            return Ok(());
        }
        loop {
            // fdatasync, not fsync: the data is what must be durable; the only metadata that
            // matters (the size) is fixed at format time.
            match rustix::fs::fdatasync(&self.file) {
                // Interrupted by a signal: go round again.
                Err(Errno::INTR) => {}
                r => return r.map_err(Into::into),
            }
        }
    }

    fn start_writeback(&self, offset: u64, len: u64) -> io::Result<()> {
        if self.read_only || self.direct || len == 0 {
            // Direct I/O leaves nothing dirty in the page cache.
            return Ok(());
        }
        check_range(offset, len, self.len)?;
        self.hints.fetch_add(1, Ordering::Relaxed);
        sync_file_range_write(&self.file, offset, len)
    }

    /// `posix_fadvise(POSIX_FADV_DONTNEED)`: the kernel drops the range's clean pages (pages
    /// whose writeback failed are clean too), so the next reads come from the medium.
    fn drop_cached(&self, offset: u64, len: u64) -> io::Result<()> {
        check_range(offset, len, self.len)?;
        let Some(len) = std::num::NonZeroU64::new(len) else {
            return Ok(());
        };
        if self.direct {
            // Direct I/O bypasses the page cache.
            return Ok(());
        }
        rustix::fs::fadvise(&self.file, offset, Some(len), rustix::fs::Advice::DontNeed).map_err(Into::into)
    }

    fn zero_range(&self, offset: u64, len: u64) -> io::Result<()> {
        self.check_writable()?;
        check_range(offset, len, self.len)?;
        self.check_aligned(None, offset, len)?;
        if len == 0 {
            return Ok(());
        }
        let end = offset + len;
        if !self.block_device {
            // Filesystems punch partial blocks themselves by zeroing them.
            return self.deallocate(offset, len);
        }
        // Block devices only accept fallocate ranges aligned to the logical block size: zero the
        // unaligned head and tail by writing, deallocate the aligned middle.
        let s = self.sector;
        let mid_start = offset.div_ceil(s) * s;
        let mid_end = end / s * s;
        if mid_start >= mid_end {
            return self.write_zeros(offset, len);
        }
        if mid_start > offset {
            self.write_zeros(offset, mid_start - offset)?;
        }
        self.deallocate(mid_start, mid_end - mid_start)?;
        if end > mid_end {
            self.write_zeros(mid_end, end - mid_end)?;
        }
        Ok(())
    }

    /// On a regular file, its holes inside the range (`lseek(SEEK_DATA / SEEK_HOLE)`), at the
    /// filesystem's allocation granularity; on a block device nothing (unknown).
    fn zero_ranges(&self, offset: u64, len: u64) -> io::Result<Vec<Range<u64>>> {
        check_range(offset, len, self.len)?;
        if self.block_device || len == 0 {
            return Ok(Vec::new());
        }
        self.holes(offset, offset + len)
    }

    fn alignment(&self) -> usize {
        self.align
    }

    fn is_read_only(&self) -> bool {
        self.read_only
    }

    fn name(&self) -> String {
        self.path.display().to_string()
    }
}

#[cfg(test)]
// Expected answers of `zero_ranges` are often a single range.
#[allow(clippy::single_range_in_vec_init)]
mod tests {
    use super::*;
    use crate::usize_of;
    use std::os::unix::fs::MetadataExt;

    /// A scratch directory on a real disk filesystem (so sparse files, hole punching and
    /// `O_DIRECT` behave as in production), falling back to the system temp dir.
    fn scratch() -> tempfile::TempDir {
        let work = Path::new("/work");
        if work.is_dir() {
            if let Ok(d) = tempfile::tempdir_in(work) {
                return d;
            }
        }
        tempfile::tempdir().expect("temp dir")
    }

    fn rw() -> FileOptions {
        FileOptions::default()
    }

    #[test]
    fn default_options_are_read_write_buffered_exclusive() {
        let o = FileOptions::default();
        assert!(!o.read_only && !o.direct);
        assert_eq!(o.lock, LockMode::Exclusive);
    }

    #[test]
    fn create_is_sparse_and_exact_and_refuses_existing() {
        let dir = scratch();
        let p = dir.path().join("vol");
        let len = 64 << 20;
        let b = FileBackend::create(&p, len, &rw()).unwrap();
        assert_eq!(b.len(), len);
        assert!(!b.is_block_device());
        assert_eq!(b.path(), p);
        assert_eq!(b.name(), p.display().to_string());
        let meta = std::fs::metadata(&p).unwrap();
        assert_eq!(meta.len(), len);
        assert!(meta.blocks() * 512 < 1 << 20, "create must not allocate");
        let mut buf = vec![0xffu8; 8192];
        b.read_at(&mut buf, len - 8192).unwrap();
        assert!(buf.iter().all(|&x| x == 0), "holes read as zeros");
        drop(b);

        let err = FileBackend::create(&p, 4096, &rw()).unwrap_err();
        assert!(matches!(err, OpenError::AlreadyExists { .. }), "{err}");
        assert!(err.to_string().contains(&p.display().to_string()));
        assert_eq!(std::fs::metadata(&p).unwrap().len(), len, "untouched");
    }

    #[test]
    fn drop_cached_keeps_the_data_and_checks_the_range() {
        let dir = scratch();
        let b = FileBackend::create(&dir.path().join("vol"), 1 << 20, &rw()).unwrap();
        b.write_at(&[7; 8192], 4096).unwrap();
        b.flush().unwrap();
        b.drop_cached(0, 1 << 20).unwrap();
        b.drop_cached(4096, 0).unwrap();
        let mut back = vec![0u8; 8192];
        b.read_at(&mut back, 4096).unwrap();
        assert_eq!(back, vec![7; 8192], "read back from the medium");
        assert_eq!(
            b.drop_cached(1 << 20, 1).unwrap_err().kind(),
            io::ErrorKind::InvalidInput
        );
    }

    #[test]
    fn open_errors_are_specific_and_name_the_path() {
        let dir = scratch();
        let missing = dir.path().join("missing");
        let err = FileBackend::open(&missing, &rw()).unwrap_err();
        assert!(matches!(err, OpenError::NotFound { .. }), "{err}");
        assert!(err.to_string().contains("missing"));

        let err = FileBackend::open(dir.path(), &rw()).unwrap_err();
        assert!(matches!(err, OpenError::NotFileOrDevice { .. }), "{err}");
        let ro = FileOptions {
            read_only: true,
            ..rw()
        };
        let err = FileBackend::open(dir.path(), &ro).unwrap_err();
        assert!(matches!(err, OpenError::NotFileOrDevice { .. }), "{err}");

        // Character devices are not fixed-length stores.
        let err = FileBackend::open(Path::new("/dev/null"), &ro).unwrap_err();
        assert!(matches!(err, OpenError::NotFileOrDevice { .. }), "{err}");
    }

    /// Regression: the message used to end with the cause while also chaining it, so every
    /// printer of the chain showed the cause twice.
    #[test]
    fn an_io_error_names_path_and_operation_and_chains_its_cause_once() {
        use std::error::Error as _;
        let dir = scratch();
        let looped = dir.path().join("loop");
        std::os::unix::fs::symlink(&looped, &looped).unwrap();
        let err = FileBackend::open(&looped, &rw()).unwrap_err();
        assert!(matches!(err, OpenError::Io { .. }), "{err}");
        let shown = err.to_string();
        assert!(shown.contains("loop") && shown.contains("cannot open"), "{shown}");
        let cause = err.source().expect("the cause is chained").to_string();
        assert!(!shown.contains(&cause), "{shown:?} repeats its cause {cause:?}");
    }

    #[test]
    fn permission_denied_when_not_root() {
        if rustix::process::geteuid().is_root() {
            println!("skipped: root bypasses file permissions");
            return;
        }
        let dir = scratch();
        let p = dir.path().join("vol");
        std::fs::write(&p, [0u8; 4096]).unwrap();
        let mut perm = std::fs::metadata(&p).unwrap().permissions();
        std::os::unix::fs::PermissionsExt::set_mode(&mut perm, 0o400);
        std::fs::set_permissions(&p, perm).unwrap();
        let err = FileBackend::open(&p, &rw()).unwrap_err();
        assert!(matches!(err, OpenError::PermissionDenied { .. }), "{err}");
    }

    #[test]
    fn read_write_roundtrip_and_out_of_range_touches_nothing() {
        let dir = scratch();
        let p = dir.path().join("vol");
        let b = FileBackend::create(&p, 1 << 20, &rw()).unwrap();
        b.write_at(b"hello", 4095).unwrap();
        let mut buf = [0u8; 5];
        b.read_at(&mut buf, 4095).unwrap();
        assert_eq!(&buf, b"hello");
        let before = std::fs::read(&p).unwrap();

        let e = b.write_at(&[1u8; 10], (1 << 20) - 5).unwrap_err();
        assert_eq!(e.kind(), io::ErrorKind::InvalidInput);
        let e = b.write_at(&[1u8; 1], u64::MAX).unwrap_err();
        assert_eq!(e.kind(), io::ErrorKind::InvalidInput);
        let e = b
            .write_vectored_at(&[&[1u8; 4][..], &[2u8; 4][..]], (1 << 20) - 6)
            .unwrap_err();
        assert_eq!(e.kind(), io::ErrorKind::InvalidInput);
        let e = b.zero_range((1 << 20) - 1, 2).unwrap_err();
        assert_eq!(e.kind(), io::ErrorKind::InvalidInput);
        let e = b.read_at(&mut [0u8; 2], (1 << 20) - 1).unwrap_err();
        assert_eq!(e.kind(), io::ErrorKind::InvalidInput);

        let after = std::fs::read(&p).unwrap();
        assert_eq!(before, after, "refused requests must write nothing");
        assert_eq!(after.len(), 1 << 20, "and must not grow the file");
        b.flush().unwrap();
    }

    #[test]
    fn vectored_write_across_more_than_iov_max_buffers() {
        let dir = scratch();
        let p = dir.path().join("vol");
        let b = FileBackend::create(&p, 1 << 20, &rw()).unwrap();
        // 3000 buffers of varying sizes (some empty) force chunking at IOV_MAX.
        let data: Vec<Vec<u8>> = (0..3000u32)
            .map(|i| vec![(i % 251) as u8; (i % 7) as usize])
            .collect();
        let bufs: Vec<&[u8]> = data.iter().map(Vec::as_slice).collect();
        let expected: Vec<u8> = data.concat();
        b.write_vectored_at(&bufs, 12345).unwrap();
        let mut got = vec![0u8; expected.len()];
        b.read_at(&mut got, 12345).unwrap();
        assert_eq!(got, expected);
        // Nothing around it was touched.
        let mut edge = [9u8; 1];
        b.read_at(&mut edge, 12344).unwrap();
        assert_eq!(edge, [0]);
        b.read_at(&mut edge, 12345 + expected.len() as u64).unwrap();
        assert_eq!(edge, [0]);
        // An all-empty vectored write is a no-op.
        b.write_vectored_at(&[&[][..], &[][..]], 0).unwrap();
        b.write_vectored_at(&[], 1 << 20).unwrap();
    }

    #[test]
    fn writeback_hint_checks_its_range_and_changes_nothing_visible() {
        let dir = scratch();
        let p = dir.path().join("vol");
        let b = FileBackend::create(&p, 4 << 20, &rw()).unwrap();
        b.write_at(&vec![0x5a; 1 << 20], 1 << 20).unwrap();
        b.start_writeback(1 << 20, 1 << 20).unwrap();
        b.start_writeback(0, 0).unwrap();
        let e = b.start_writeback(3 << 20, 2 << 20).unwrap_err();
        assert_eq!(e.kind(), io::ErrorKind::InvalidInput, "past the end");
        let mut got = vec![0u8; 1 << 20];
        b.read_at(&mut got, 1 << 20).unwrap();
        assert!(got.iter().all(|&x| x == 0x5a));
        b.flush().unwrap();
    }

    #[test]
    fn zero_range_zeroes_and_deallocates() {
        let dir = scratch();
        let p = dir.path().join("vol");
        let b = FileBackend::create(&p, 8 << 20, &rw()).unwrap();
        b.write_at(&vec![0xabu8; 8 << 20], 0).unwrap();
        b.flush().unwrap();
        let full = std::fs::metadata(&p).unwrap().blocks();

        // Unaligned on both ends: the partial blocks must be zeroed, the neighbours kept.
        let (off, len) = (100u64, (4 << 20) + 3);
        b.zero_range(off, len).unwrap();
        b.flush().unwrap();
        let mut got = vec![0u8; 8 << 20];
        b.read_at(&mut got, 0).unwrap();
        for (i, &x) in got.iter().enumerate() {
            let inside = (i as u64) >= off && (i as u64) < off + len;
            assert_eq!(x, if inside { 0 } else { 0xab }, "byte {i}");
        }
        let after = std::fs::metadata(&p).unwrap().blocks();
        assert!(
            after * 512 <= full * 512 - (3 << 20),
            "st_blocks must shrink: {full} -> {after}"
        );
        assert_eq!(std::fs::metadata(&p).unwrap().len(), 8 << 20, "size kept");
        b.zero_range(0, 0).unwrap();
    }

    #[test]
    fn write_zeros_fallback_zeroes_in_chunks() {
        let dir = scratch();
        let p = dir.path().join("vol");
        let b = FileBackend::create(&p, 3 << 20, &rw()).unwrap();
        b.write_at(&vec![7u8; 3 << 20], 0).unwrap();
        // Larger than one chunk and unaligned, to cover the chunk loop's tail.
        b.write_zeros(1, (2 << 20) + 10).unwrap();
        let mut got = vec![0u8; 3 << 20];
        b.read_at(&mut got, 0).unwrap();
        assert_eq!(got[0], 7);
        assert!(got[1..(2 << 20) + 11].iter().all(|&x| x == 0));
        assert!(got[(2 << 20) + 11..].iter().all(|&x| x == 7));
    }

    #[test]
    fn second_open_is_locked_out() {
        let dir = scratch();
        let p = dir.path().join("vol");
        let first = FileBackend::create(&p, 4096, &rw()).unwrap();
        // flock belongs to the open file description, so a second open in the same process
        // conflicts just like another process would.
        let err = FileBackend::open(&p, &rw()).unwrap_err();
        assert!(matches!(err, OpenError::Locked { .. }), "{err}");
        let msg = err.to_string();
        assert!(msg.contains("in use by another process"), "{msg}");
        assert!(msg.contains(&p.display().to_string()), "{msg}");
        let shared = FileOptions {
            lock: LockMode::Shared,
            read_only: true,
            ..rw()
        };
        assert!(matches!(
            FileBackend::open(&p, &shared),
            Err(OpenError::Locked { .. })
        ));
        // Without a lock, inspection is still possible.
        let none = FileOptions {
            lock: LockMode::None,
            read_only: true,
            ..rw()
        };
        FileBackend::open(&p, &none).unwrap();
        drop(first);

        // Shared locks coexist with each other but not with an exclusive one.
        let a = FileBackend::open(&p, &shared).unwrap();
        let b = FileBackend::open(&p, &shared).unwrap();
        assert!(matches!(
            FileBackend::open(&p, &rw()),
            Err(OpenError::Locked { .. })
        ));
        drop(a);
        drop(b);
        FileBackend::open(&p, &rw()).unwrap();
    }

    #[test]
    fn read_only_refuses_writes() {
        let dir = scratch();
        let p = dir.path().join("vol");
        FileBackend::create(&p, 8192, &rw())
            .unwrap()
            .write_at(b"keep", 0)
            .unwrap();
        let ro = FileOptions {
            read_only: true,
            lock: LockMode::Shared,
            ..rw()
        };
        let b = FileBackend::open(&p, &ro).unwrap();
        assert!(b.is_read_only());
        for e in [
            b.write_at(b"x", 0).unwrap_err(),
            b.write_vectored_at(&[&b"x"[..]], 0).unwrap_err(),
            b.zero_range(0, 4096).unwrap_err(),
        ] {
            assert_eq!(e.kind(), io::ErrorKind::PermissionDenied);
        }
        b.flush().unwrap();
        let mut buf = [0u8; 4];
        b.read_at(&mut buf, 0).unwrap();
        assert_eq!(&buf, b"keep");
    }

    #[test]
    fn create_with_read_only_option_yields_read_only_backend() {
        let dir = scratch();
        let p = dir.path().join("vol");
        let ro = FileOptions {
            read_only: true,
            ..rw()
        };
        let b = FileBackend::create(&p, 4096, &ro).unwrap();
        assert!(b.is_read_only());
        assert_eq!(
            b.write_at(b"x", 0).unwrap_err().kind(),
            io::ErrorKind::PermissionDenied
        );
    }

    #[test]
    fn aligned_buf_is_aligned_and_clones_aligned() {
        for align in [1usize, 512, 4096, 65536] {
            for len in [0usize, 1, 4096, 10000] {
                let mut b = AlignedBuf::new(len, align);
                assert_eq!(b.len(), len);
                assert_eq!(b.as_ptr() as usize % align, 0);
                assert!(b.iter().all(|&x| x == 0));
                b.fill(3);
                let c = b.clone();
                assert_eq!(c.as_ptr() as usize % align, 0);
                assert_eq!(&c[..], &b[..]);
                assert_eq!(c.align(), align);
            }
        }
        assert_eq!(AlignedBuf::new(8, 0).len(), 8);
    }

    #[test]
    fn libc_o_direct_is_the_flag_rustix_names() {
        // `finish_open` hands libc's `O_DIRECT` to `custom_flags`; it must be the same bit.
        assert_eq!(
            u32::try_from(libc::O_DIRECT).unwrap(),
            rustix::fs::OFlags::DIRECT.bits()
        );
    }

    #[test]
    fn direct_io_roundtrip_or_clear_refusal() {
        let dir = scratch();
        let p = dir.path().join("vol");
        let opts = FileOptions { direct: true, ..rw() };
        let b = match FileBackend::create(&p, 1 << 20, &opts) {
            Ok(b) => b,
            Err(OpenError::DirectUnsupported { .. }) => {
                println!("skipped: {} refuses O_DIRECT", dir.path().display());
                assert!(!p.exists(), "a failed create removes its file");
                return;
            }
            Err(e) => panic!("{e}"),
        };
        assert!(b.is_direct());
        let align = b.alignment();
        assert_eq!(align, 4096);
        let mut w = AlignedBuf::new(2 * align, align);
        w.iter_mut().zip((0..=255u8).cycle()).for_each(|(x, v)| *x = v);
        b.write_at(&w, align as u64).unwrap();
        let w2 = AlignedBuf::new(align, align);
        b.write_vectored_at(&[&w[..align], &w2], 4 * align as u64)
            .unwrap();
        b.flush().unwrap();
        let mut r = AlignedBuf::new(2 * align, align);
        b.read_at(&mut r, align as u64).unwrap();
        assert_eq!(&r[..], &w[..]);
        b.zero_range(align as u64, align as u64).unwrap();
        b.read_at(&mut r, align as u64).unwrap();
        assert!(r[..align].iter().all(|&x| x == 0));
        assert_eq!(&r[align..], &w[align..]);

        // Misaligned requests get a clear InvalidInput, not a bare EINVAL.
        let err = b.read_at(&mut r[1..=align], 0).unwrap_err();
        assert_eq!(err.kind(), io::ErrorKind::InvalidInput);
        assert!(err.to_string().contains("aligned"), "{err}");
        assert!(b.write_at(&w[..align], 512).is_err());
        assert!(b.zero_range(0, 100).is_err());
        drop(b);

        // Reopening with O_DIRECT goes through the probe.
        FileBackend::open(&p, &opts).unwrap();
    }

    #[test]
    fn direct_io_on_tmpfs_is_either_supported_or_clearly_refused() {
        let shm = Path::new("/dev/shm");
        let Ok(dir) = tempfile::tempdir_in(shm) else {
            println!("skipped: no /dev/shm");
            return;
        };
        let p = dir.path().join("vol");
        let opts = FileOptions { direct: true, ..rw() };
        match FileBackend::create(&p, 1 << 16, &opts) {
            Ok(_) => println!("tmpfs supports O_DIRECT on this kernel"),
            Err(e @ OpenError::DirectUnsupported { .. }) => {
                assert!(e.to_string().contains("O_DIRECT"));
                assert!(!p.exists(), "a failed create removes its file");
            }
            Err(e) => panic!("unexpected error: {e}"),
        }
    }

    /// Whether files in `dir` report holes: a file with data only in its second MiB must show a
    /// hole before it. (Filesystems without `SEEK_HOLE` support report everything as data.)
    fn supports_holes(dir: &Path) -> bool {
        let p = dir.join("probe");
        let f = File::options()
            .read(true)
            .write(true)
            .create_new(true)
            .open(&p)
            .unwrap();
        f.set_len(2 << 20).unwrap();
        f.write_all_at(&[1u8; 4096], 1 << 20).unwrap();
        let data = rustix::fs::seek(&f, rustix::fs::SeekFrom::Data(0));
        drop(f);
        std::fs::remove_file(&p).unwrap();
        matches!(data, Ok(d) if d > 0)
    }

    /// Temporary directories on the filesystems the tests care about: the scratch disk, the
    /// one /var/tmp lives on, and tmpfs.
    fn hole_dirs() -> Vec<tempfile::TempDir> {
        let mut dirs = vec![scratch()];
        for base in ["/var/tmp", "/dev/shm"] {
            if let Ok(d) = tempfile::tempdir_in(base) {
                dirs.push(d);
            }
        }
        dirs
    }

    /// `holes` clipped to `range`, dropping empty pieces.
    fn clip(holes: &[Range<u64>], range: Range<u64>) -> Vec<Range<u64>> {
        holes
            .iter()
            .map(|h| h.start.max(range.start)..h.end.min(range.end))
            .filter(|h| h.start < h.end)
            .collect()
    }

    /// Checks the shape promised by `Backend::zero_ranges` and that every listed byte reads as
    /// zero.
    fn check_zero_ranges_shape(b: &FileBackend, off: u64, len: u64, got: &[Range<u64>]) {
        let mut prev_end = None;
        for r in got {
            assert!(r.start < r.end, "{got:?}");
            assert!(
                r.start >= off && r.end <= off + len,
                "{got:?} outside {off}+{len}"
            );
            if let Some(p) = prev_end {
                assert!(r.start > p, "ascending, disjoint and merged: {got:?}");
            }
            prev_end = Some(r.end);
            let mut buf = vec![0xffu8; usize_of(r.end - r.start)];
            b.read_at(&mut buf, r.start).unwrap();
            assert!(
                buf.iter().all(|&x| x == 0),
                "{r:?} is listed but does not read as zeros"
            );
        }
    }

    #[test]
    fn zero_ranges_reports_the_holes_of_a_sparse_file() {
        for dir in hole_dirs() {
            let holes = supports_holes(dir.path());
            let p = dir.path().join("vol");
            let mib = 1u64 << 20;
            let b = FileBackend::create(&p, 4 * mib, &rw()).unwrap();
            let g = std::fs::metadata(&p).unwrap().blksize().max(4096);
            println!(
                "{}: holes supported: {holes}, block size {g}",
                dir.path().display()
            );
            assert_eq!(b.zero_ranges(0, 0).unwrap(), []);
            assert_eq!(b.zero_ranges(4 * mib, 0).unwrap(), []);
            for (off, len) in [(4 * mib, 1), (0, 4 * mib + 1), (u64::MAX, 1), (1, u64::MAX)] {
                let e = b.zero_ranges(off, len).unwrap_err();
                assert_eq!(e.kind(), io::ErrorKind::InvalidInput, "{off}+{len}");
            }
            let all = b.zero_ranges(0, 4 * mib).unwrap();
            if holes {
                assert_eq!(all, [0..4 * mib], "a new file is one hole");
            } else {
                assert_eq!(all, []);
            }

            // Data: a whole 64 KiB at 64 KiB, 10 bytes at 320 KiB (one filesystem block), 256 KiB
            // at 1 MiB with 64 KiB punched out of its middle, and the last byte of the file.
            let k = 1024u64;
            b.write_at(&vec![1u8; 64 * 1024], 64 * k).unwrap();
            b.write_at(&[2u8; 10], 320 * k).unwrap();
            b.write_at(&vec![3u8; 256 * 1024], mib).unwrap();
            b.zero_range(mib + 64 * k, 64 * k).unwrap();
            b.write_at(&[4u8], 4 * mib - 1).unwrap();
            let expected = [
                0..64 * k,
                128 * k..320 * k,
                320 * k + g..mib,
                mib + 64 * k..mib + 128 * k,
                mib + 256 * k..4 * mib - g,
            ];
            for flushed in [false, true] {
                // Dirty pages in the page cache count as data before and after writeback.
                if flushed {
                    b.flush().unwrap();
                }
                let got = b.zero_ranges(0, 4 * mib).unwrap();
                check_zero_ranges_shape(&b, 0, 4 * mib, &got);
                if !holes {
                    assert_eq!(got, [], "without hole support nothing is known");
                    continue;
                }
                assert_eq!(got, expected, "flushed: {flushed}");
                // Sub-ranges, aligned or not, are the holes clipped to them.
                for (off, len) in [
                    (0, 4 * mib),
                    (1, 100),
                    (64 * k - 1, 2),
                    (100 * k + 3, 900 * k),
                    (mib + 100 * k, 10 * k),
                    (mib + 200 * k, 2 * mib),
                    (3 * mib, mib),
                    (4 * mib - 1, 1),
                ] {
                    let got = b.zero_ranges(off, len).unwrap();
                    check_zero_ranges_shape(&b, off, len, &got);
                    assert_eq!(got, clip(&expected, off..off + len), "{off}+{len}");
                }
            }
            // Data only before the range: SEEK_DATA answers ENXIO, the rest is one hole.
            let tail = FileBackend::create(&dir.path().join("tail"), mib, &rw()).unwrap();
            tail.write_at(&[9u8; 4096], 0).unwrap();
            if holes {
                assert_eq!(tail.zero_ranges(8192, mib - 8192).unwrap(), [8192..mib]);
                assert_eq!(tail.zero_ranges(0, mib).unwrap(), [g..mib]);
            }
        }
    }

    #[test]
    fn zero_ranges_leaves_reads_and_writes_unaffected_and_is_thread_safe() {
        let dir = scratch();
        let holes = supports_holes(dir.path());
        let p = dir.path().join("vol");
        let len = 8u64 << 20;
        let b = FileBackend::create(&p, len, &rw()).unwrap();
        for i in 0..8u64 {
            b.write_at(&[u8::try_from(i + 1).unwrap(); 4096], i * (1 << 20) + 65536)
                .unwrap();
        }
        let whole = b.zero_ranges(0, len).unwrap();
        if holes {
            assert_eq!(whole.len(), 9);
        }
        // Queries from several threads at once, interleaved with positioned reads and writes,
        // agree with the sequential answer: nothing depends on the shared file position.
        std::thread::scope(|s| {
            for t in 0..4u64 {
                let (b, whole) = (&b, &whole);
                s.spawn(move || {
                    for round in 0..200u64 {
                        let off = (t * 7919 + round * 104_729) % len;
                        let n = (len - off).min(3 << 20);
                        let got = b.zero_ranges(off, n).unwrap();
                        assert_eq!(got, clip(whole, off..off + n), "{off}+{n}");
                        let mut buf = [0u8; 4096];
                        let blk = (t + round) % 8;
                        b.read_at(&mut buf, blk * (1 << 20) + 65536).unwrap();
                        assert_eq!(buf, [u8::try_from(blk + 1).unwrap(); 4096]);
                        b.write_at(&buf, blk * (1 << 20) + 65536).unwrap();
                    }
                });
            }
        });
    }

    #[test]
    fn zero_ranges_randomized_against_written_blocks() {
        use rand::{Rng, SeedableRng};
        let seed: u64 = rand::random();
        println!("seed {seed}");
        let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(seed);
        let dir = scratch();
        let holes = supports_holes(dir.path());
        let p = dir.path().join("vol");
        let bs = 4096u64;
        let blocks = 256u64;
        let b = FileBackend::create(&p, blocks * bs, &rw()).unwrap();
        // Blocks written with non-zero data and not punched since.
        let mut data = vec![false; usize_of(blocks)];
        for step in 0..300 {
            let at = rng.random_range(0..blocks);
            let n = rng.random_range(1..=8u64).min(blocks - at);
            match rng.random_range(0..4) {
                0 => {
                    b.zero_range(at * bs, n * bs).unwrap();
                    data[usize_of(at)..usize_of(at + n)].fill(false);
                }
                1 => b.flush().unwrap(),
                _ => {
                    b.write_at(&vec![0x5a; usize_of(n * bs)], at * bs).unwrap();
                    data[usize_of(at)..usize_of(at + n)].fill(true);
                }
            }
            let off = rng.random_range(0..blocks * bs);
            let len = rng.random_range(0..=blocks * bs - off);
            let got = b.zero_ranges(off, len).unwrap();
            check_zero_ranges_shape(&b, off, len, &got);
            if !holes {
                continue;
            }
            // Every byte of a block never written (or punched since) is in a hole.
            for (i, _) in data.iter().enumerate().filter(|(_, &d)| !d) {
                let (lo, hi) = ((i as u64 * bs).max(off), ((i as u64 + 1) * bs).min(off + len));
                if lo < hi {
                    assert!(
                        got.iter().any(|r| r.start <= lo && hi <= r.end),
                        "seed {seed} step {step}: block {i} missing from {got:?}"
                    );
                }
            }
        }
    }

    #[test]
    fn loop_block_device() {
        let Some((_dir, img, guard)) = crate::testdev::scratch_image(4 << 20) else {
            return;
        };
        let dev = guard.0.clone();

        let b = FileBackend::open(&dev, &rw()).unwrap();
        assert!(b.is_block_device());
        // The backing file is all holes, but a block device does not say so: unknown.
        assert_eq!(b.zero_ranges(0, 4 << 20).unwrap(), []);
        assert!(b.zero_ranges(4 << 20, 1).is_err());
        assert_eq!(b.len(), 4 << 20);
        assert!(matches!(
            FileBackend::open(&dev, &rw()),
            Err(OpenError::Locked { .. })
        ));
        // The backing file is the same storage under another name: locked out too, and the
        // other way round (two writers on one volume through both names corrupt it).
        assert!(matches!(
            FileBackend::open(&img, &rw()),
            Err(OpenError::Locked { .. })
        ));
        drop(b);
        let f = FileBackend::open(&img, &rw()).unwrap();
        let err = FileBackend::open(&dev, &rw()).unwrap_err();
        assert!(matches!(err, OpenError::Locked { .. }), "{err}");
        assert!(err.to_string().contains("loop device over"), "{err}");
        drop(f);
        let b = FileBackend::open(&dev, &rw()).unwrap();
        b.write_at(&vec![0x5au8; 1 << 20], 1 << 20).unwrap();
        b.flush().unwrap();
        let mut got = vec![0u8; 1 << 20];
        b.read_at(&mut got, 1 << 20).unwrap();
        assert!(got.iter().all(|&x| x == 0x5a));
        // Unaligned to the sector size: head and tail are written, the middle deallocated.
        b.zero_range((1 << 20) + 100, 8192).unwrap();
        b.flush().unwrap();
        b.read_at(&mut got, 1 << 20).unwrap();
        for (i, &x) in got.iter().enumerate() {
            let inside = (100..100 + 8192).contains(&i);
            assert_eq!(x, if inside { 0 } else { 0x5a }, "byte {i}");
        }
        assert!(b.write_at(b"x", 4 << 20).is_err());
        drop(b);

        // Direct I/O on the device uses its logical block size.
        let opts = FileOptions { direct: true, ..rw() };
        let direct = FileBackend::open(&dev, &opts).unwrap();
        let align = direct.alignment();
        assert!(align >= 512 && align.is_power_of_two());
        let mut sector = AlignedBuf::new(align, align);
        direct.read_at(&mut sector, 1 << 20).unwrap();
        assert!(sector[..100].iter().all(|&x| x == 0x5a));
        assert!(sector[100..].iter().all(|&x| x == 0));
    }

    /// A loop device over a loop device over a file is a third name for the same storage:
    /// every name locks every other out, whichever is opened first.
    #[test]
    fn stacked_loop_devices_lock_the_whole_chain() {
        let Some((_dir, img, lower)) = crate::testdev::scratch_image(4 << 20) else {
            return;
        };
        let Some(upper) = crate::testdev::attach(&lower.0) else {
            return;
        };
        let names = [img.as_path(), lower.0.as_path(), upper.0.as_path()];
        for first in names {
            let held = FileBackend::open(first, &rw()).unwrap();
            for other in names.into_iter().filter(|&p| p != first) {
                let err = FileBackend::open(other, &rw()).map(|_| ()).unwrap_err();
                assert!(
                    matches!(err, OpenError::Locked { .. }),
                    "{} opened while {} was: {err}",
                    other.display(),
                    first.display()
                );
            }
            drop(held);
        }
        drop(upper);
    }
}
