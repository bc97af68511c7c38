//! The FUSE filesystem: a root directory holding exactly one regular file backed by a
//! [`BlockFile`].
//!
//! The request handlers are thin: the range arithmetic and the decoding of `fallocate` and
//! `setattr` live in small pure functions at the bottom of this module, unit-tested without a
//! kernel.

use std::cell::RefCell;
use std::ffi::{OsStr, OsString};
use std::io;
use std::path::Path;
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use fuser::{
    BsdFileFlags, Errno, FileAttr, FileHandle, FileType, Filesystem, FopenFlags, Generation, INodeNo,
    InitFlags, KernelConfig, LockOwner, OpenAccMode, OpenFlags, RenameFlags, ReplyAttr, ReplyCreate,
    ReplyData, ReplyDirectory, ReplyEmpty, ReplyEntry, ReplyOpen, ReplyStatfs, ReplyWrite, ReplyXattr,
    Request, TimeOrNow, WriteFlags,
};

use crate::file::{errno_for, BlockFile};

/// Inode of the root directory (fixed by the FUSE protocol).
pub(crate) const ROOT_INO: INodeNo = INodeNo::ROOT;
/// Inode of the one regular file.
pub(crate) const FILE_INO: INodeNo = INodeNo(2);

/// File handles: all state is in the inode, so the handle only records whether the file was
/// opened for writing.
const READ_ONLY_FH: FileHandle = FileHandle(0);
const WRITABLE_FH: FileHandle = FileHandle(1);

/// How long the kernel may cache names and attributes. Nothing about the tree ever changes
/// while mounted (the file's size is fixed, and its times are those of the mount), so a long
/// validity saves a `getattr` round trip on every `stat` without any risk of staleness.
// An hour in seconds: `Duration::from_hours` needs Rust 1.91, the workspace targets 1.85.
#[allow(clippy::duration_suboptimal_units)]
const TTL: Duration = Duration::from_secs(3600);

/// The largest request the kernel sends when `/proc/sys/fs/fuse/max_pages_limit` is absent
/// (kernels before 6.13 hard-code 256 pages).
const DEFAULT_MAX_PAGES: u32 = 256;

/// Upper bound on the request size we ask for, whatever the kernel allows: the request buffer
/// of `fuser` holds 16 MiB of payload.
const MAX_REQUEST: u32 = 16 << 20;

/// Background requests (readahead and asynchronous direct I/O) the kernel may have in flight.
/// The default of 16 would throttle a loop device in direct-I/O mode, which submits its whole
/// queue asynchronously; the worker threads are the real limit on concurrency.
const MAX_BACKGROUND: u16 = 64;

/// `fallocate` mode bits (from `<linux/falloc.h>`; the values are part of the kernel ABI).
const FALLOC_FL_KEEP_SIZE: i32 = 0x01;
const FALLOC_FL_PUNCH_HOLE: i32 = 0x02;
const FALLOC_FL_ZERO_RANGE: i32 = 0x10;

thread_local! {
    /// Per-worker read buffer, reused so that a 1 MiB read does not allocate and zero 1 MiB.
    static READ_BUF: RefCell<Vec<u8>> = const { RefCell::new(Vec::new()) };
}

/// The filesystem served to the kernel.
pub(crate) struct BlockFs<F: BlockFile> {
    file: Arc<F>,
    name: OsString,
    size: u64,
    read_only: bool,
    uid: u32,
    gid: u32,
    /// Reported as every timestamp: the mount time.
    time: SystemTime,
}

impl<F: BlockFile> BlockFs<F> {
    pub(crate) fn new(file: Arc<F>, name: OsString, read_only: bool) -> Self {
        let size = file.size();
        // A read-only store is served read-only whatever was asked.
        let read_only = read_only || file.is_read_only();
        Self {
            file,
            name,
            size,
            read_only,
            uid: rustix::process::getuid().as_raw(),
            gid: rustix::process::getgid().as_raw(),
            time: SystemTime::now(),
        }
    }

    fn attr(&self, ino: INodeNo) -> Option<FileAttr> {
        let (kind, perm, nlink, size) = match ino {
            ROOT_INO => (FileType::Directory, 0o755, 2, 0),
            FILE_INO => {
                let perm = if self.read_only { 0o444 } else { 0o644 };
                (FileType::RegularFile, perm, 1, self.size)
            }
            _ => return None,
        };
        Some(FileAttr {
            ino,
            size,
            // Reported fully allocated: the engine knows which blocks were ever written, but
            // st_blocks is only advisory and keeping it exact would cost a lookup per stat.
            blocks: size.div_ceil(512),
            atime: self.time,
            mtime: self.time,
            ctime: self.time,
            crtime: self.time,
            kind,
            perm,
            nlink,
            uid: self.uid,
            gid: self.gid,
            rdev: 0,
            blksize: self.file.block_size(),
            flags: 0,
        })
    }

    /// Logs a failed operation and returns the errno for the kernel.
    fn fail(op: &str, offset: u64, len: u64, error: &F::Error) -> Errno {
        // Recorded as an error value, so the log shows its causes too (messages hold only
        // their own level; the chain carries the rest).
        let shown: &(dyn std::error::Error + 'static) = error;
        if F::is_corruption(error) {
            // The error's own message names the block; offset and length locate the request.
            tracing::error!(
                op,
                offset,
                len,
                error = shown,
                "verification failed, returning EIO"
            );
        } else {
            tracing::error!(op, offset, len, error = shown, "I/O error");
        }
        errno_for::<F>(error)
    }

    fn flush_file(&self, op: &str) -> Result<(), Errno> {
        // Nothing can be pending on a read-only store, and its flush may refuse to run.
        if self.read_only {
            return Ok(());
        }
        self.file.flush().map_err(|e| Self::fail(op, 0, self.size, &e))
    }
}

impl<F: BlockFile> Filesystem for BlockFs<F> {
    fn init(&mut self, _req: &Request, config: &mut KernelConfig) -> io::Result<()> {
        let max = max_request_bytes();
        // Both fail only with the nearest legal value, which is then the best we can get.
        let _ = config.set_max_write(max).or_else(|v| config.set_max_write(v));
        let _ = config.set_max_background(MAX_BACKGROUND);
        // Asynchronous direct I/O lets one large or queued request from the loop driver
        // become several FUSE requests served in parallel by the worker threads.
        if config.add_capabilities(InitFlags::FUSE_ASYNC_DIO).is_err() {
            tracing::debug!("kernel lacks FUSE_ASYNC_DIO; direct I/O will be synchronous");
        }
        tracing::debug!(max_write = max, "FUSE session initialised");
        Ok(())
    }

    fn lookup(&self, _req: &Request, parent: INodeNo, name: &OsStr, reply: ReplyEntry) {
        match (parent, self.attr(FILE_INO)) {
            (ROOT_INO, Some(attr)) if name == self.name.as_os_str() => {
                reply.entry(&TTL, &attr, Generation(0));
            }
            (FILE_INO, _) => reply.error(Errno::ENOTDIR),
            // Another name in the root, or an inode that does not exist.
            _ => reply.error(Errno::ENOENT),
        }
    }

    fn getattr(&self, _req: &Request, ino: INodeNo, _fh: Option<FileHandle>, reply: ReplyAttr) {
        match self.attr(ino) {
            Some(attr) => reply.attr(&TTL, &attr),
            None => reply.error(Errno::ENOENT),
        }
    }

    fn setattr(
        &self,
        _req: &Request,
        ino: INodeNo,
        mode: Option<u32>,
        uid: Option<u32>,
        gid: Option<u32>,
        size: Option<u64>,
        _atime: Option<TimeOrNow>,
        _mtime: Option<TimeOrNow>,
        _ctime: Option<SystemTime>,
        _fh: Option<FileHandle>,
        _crtime: Option<SystemTime>,
        _chgtime: Option<SystemTime>,
        _bkuptime: Option<SystemTime>,
        _flags: Option<BsdFileFlags>,
        reply: ReplyAttr,
    ) {
        let Some(attr) = self.attr(ino) else {
            return reply.error(Errno::ENOENT);
        };
        let change = AttrChange { mode, uid, gid, size };
        match change.check(&attr) {
            Ok(()) => reply.attr(&TTL, &attr),
            Err(errno) => reply.error(errno),
        }
    }

    fn open(&self, _req: &Request, ino: INodeNo, flags: OpenFlags, reply: ReplyOpen) {
        match ino {
            FILE_INO => {}
            ROOT_INO => return reply.error(Errno::EISDIR),
            _ => return reply.error(Errno::ENOENT),
        }
        if self.read_only && flags.acc_mode() != OpenAccMode::O_RDONLY {
            return reply.error(Errno::EROFS);
        }
        // Direct I/O: every read and write goes to the engine, bypassing the page cache of
        // this file.
        // - Correctness: each read is verified against the stored tags when it happens; a
        //   cached copy could hide corruption that appeared since, and it could not be
        //   invalidated if the volume changed underneath.
        // - Speed: whatever sits on top already caches — a filesystem on the loop device has
        //   its own page cache, and so does the loop device's buffer cache — so a second copy
        //   here would only double the memory and the copying. With `losetup --direct-io=on`
        //   the loop driver needs O_DIRECT on this file anyway, and then submits its queue
        //   asynchronously, which direct I/O turns into parallel requests.
        // - Parallel direct writes: without this flag the kernel serialises writes to one file
        //   on its inode lock; the engine is internally synchronised, so let them overlap.
        let writable = flags.acc_mode() != OpenAccMode::O_RDONLY;
        reply.opened(
            if writable { WRITABLE_FH } else { READ_ONLY_FH },
            FopenFlags::FOPEN_DIRECT_IO | FopenFlags::FOPEN_PARALLEL_DIRECT_WRITES,
        );
    }

    fn read(
        &self,
        _req: &Request,
        ino: INodeNo,
        _fh: FileHandle,
        offset: u64,
        size: u32,
        _flags: OpenFlags,
        _lock_owner: Option<LockOwner>,
        reply: ReplyData,
    ) {
        if ino != FILE_INO {
            return reply.error(Errno::EISDIR);
        }
        let Some(len) = read_len(offset, size, self.size) else {
            return reply.data(&[]);
        };
        // All or nothing: a short read of an in-range request would make the loop driver
        // zero-fill the rest of the bio, turning a verification failure into silent zeros.
        READ_BUF.with_borrow_mut(|buf| {
            if buf.len() < len {
                buf.resize(len, 0);
            }
            let buf = &mut buf[..len];
            match self.file.read_at(buf, offset) {
                Ok(()) => reply.data(buf),
                Err(e) => reply.error(Self::fail("read", offset, len as u64, &e)),
            }
        });
    }

    fn write(
        &self,
        _req: &Request,
        ino: INodeNo,
        _fh: FileHandle,
        offset: u64,
        data: &[u8],
        _write_flags: WriteFlags,
        _flags: OpenFlags,
        _lock_owner: Option<LockOwner>,
        reply: ReplyWrite,
    ) {
        if ino != FILE_INO {
            return reply.error(Errno::EISDIR);
        }
        if self.read_only {
            return reply.error(Errno::EROFS);
        }
        let len = match write_len(offset, data.len(), self.size) {
            Ok(len) => len,
            Err(errno) => return reply.error(errno),
        };
        let Ok(written) = u32::try_from(len) else {
            // Unreachable: the kernel never sends more than max_write (<= 16 MiB).
            return reply.error(Errno::EINVAL);
        };
        match self.file.write_at(&data[..len], offset) {
            Ok(()) => reply.written(written),
            Err(e) => reply.error(Self::fail("write", offset, len as u64, &e)),
        }
    }

    fn flush(&self, _req: &Request, ino: INodeNo, fh: FileHandle, _lock_owner: LockOwner, reply: ReplyEmpty) {
        // Sent on every close(2). Flushing here means a loop device that is detached (which
        // closes the file) leaves everything it wrote durable, even without an fsync. A
        // read-only handle wrote nothing, so probes such as blkid cost no engine flush.
        if ino != FILE_INO || fh == READ_ONLY_FH {
            return reply.ok();
        }
        match self.flush_file("flush") {
            Ok(()) => reply.ok(),
            Err(errno) => reply.error(errno),
        }
    }

    fn fsync(&self, _req: &Request, ino: INodeNo, _fh: FileHandle, _datasync: bool, reply: ReplyEmpty) {
        // The loop driver turns a REQ_PREFLUSH from the filesystem above into this call.
        if ino != FILE_INO {
            return reply.ok();
        }
        match self.flush_file("fsync") {
            Ok(()) => reply.ok(),
            Err(errno) => reply.error(errno),
        }
    }

    fn fallocate(
        &self,
        _req: &Request,
        ino: INodeNo,
        _fh: FileHandle,
        offset: u64,
        length: u64,
        mode: i32,
        reply: ReplyEmpty,
    ) {
        if ino != FILE_INO {
            return reply.error(Errno::EISDIR);
        }
        if self.read_only {
            return reply.error(Errno::EROFS);
        }
        let op = match Fallocate::decode(mode, offset, length, self.size) {
            Ok(Some(op)) => op,
            Ok(None) => return reply.ok(),
            Err(errno) => return reply.error(errno),
        };
        let result = match op.kind {
            FallocKind::PunchHole => self.file.punch_hole(op.offset, op.len),
            FallocKind::ZeroRange => self.file.write_zeroes(op.offset, op.len),
        };
        match result {
            Ok(()) => reply.ok(),
            Err(e) => reply.error(Self::fail("fallocate", op.offset, op.len, &e)),
        }
    }

    fn opendir(&self, _req: &Request, ino: INodeNo, _flags: OpenFlags, reply: ReplyOpen) {
        match ino {
            ROOT_INO => reply.opened(FileHandle(0), FopenFlags::empty()),
            FILE_INO => reply.error(Errno::ENOTDIR),
            _ => reply.error(Errno::ENOENT),
        }
    }

    fn readdir(&self, _req: &Request, ino: INodeNo, _fh: FileHandle, offset: u64, mut reply: ReplyDirectory) {
        if ino != ROOT_INO {
            return reply.error(Errno::ENOTDIR);
        }
        let entries: [(INodeNo, FileType, &OsStr); 3] = [
            (ROOT_INO, FileType::Directory, OsStr::new(".")),
            (ROOT_INO, FileType::Directory, OsStr::new("..")),
            (FILE_INO, FileType::RegularFile, self.name.as_os_str()),
        ];
        // The offset handed back with each entry is the position of the next one.
        for (next, (ino, kind, name)) in (1u64..).zip(entries).skip_while(|(n, _)| *n <= offset) {
            if reply.add(ino, next, kind, name) {
                break;
            }
        }
        reply.ok();
    }

    fn statfs(&self, _req: &Request, _ino: INodeNo, reply: ReplyStatfs) {
        let bsize = self.file.block_size();
        let blocks = self.size.div_ceil(u64::from(bsize));
        // Nothing can be created, so no free blocks and no free inodes.
        reply.statfs(blocks, 0, 0, 2, 0, bsize, 255, bsize);
    }

    fn access(&self, _req: &Request, ino: INodeNo, _mask: fuser::AccessFlags, reply: ReplyEmpty) {
        // Permission checks are the kernel's (the mount uses default_permissions); this only
        // has to say whether the inode exists.
        match ino {
            ROOT_INO | FILE_INO => reply.ok(),
            _ => reply.error(Errno::ENOENT),
        }
    }

    // No extended attributes. ENOSYS (rather than ENODATA) makes the kernel remember that and
    // answer every later xattr call itself, sparing a round trip per `ls -l` or SELinux probe.

    fn getxattr(&self, _req: &Request, _ino: INodeNo, _name: &OsStr, _size: u32, reply: ReplyXattr) {
        reply.error(Errno::ENOSYS);
    }

    fn listxattr(&self, _req: &Request, _ino: INodeNo, _size: u32, reply: ReplyXattr) {
        reply.error(Errno::ENOSYS);
    }

    fn setxattr(
        &self,
        _req: &Request,
        _ino: INodeNo,
        _name: &OsStr,
        _value: &[u8],
        _flags: i32,
        _position: u32,
        reply: ReplyEmpty,
    ) {
        reply.error(Errno::ENOSYS);
    }

    fn removexattr(&self, _req: &Request, _ino: INodeNo, _name: &OsStr, reply: ReplyEmpty) {
        reply.error(Errno::ENOSYS);
    }

    // The namespace is fixed: one file, named after the volume. Refuse every change with
    // EPERM rather than the default ENOSYS, which reads as "not implemented yet".

    fn mknod(
        &self,
        _req: &Request,
        _parent: INodeNo,
        _name: &OsStr,
        _mode: u32,
        _umask: u32,
        _rdev: u32,
        reply: ReplyEntry,
    ) {
        reply.error(Errno::EPERM);
    }

    fn mkdir(
        &self,
        _req: &Request,
        _parent: INodeNo,
        _name: &OsStr,
        _mode: u32,
        _umask: u32,
        reply: ReplyEntry,
    ) {
        reply.error(Errno::EPERM);
    }

    fn create(
        &self,
        _req: &Request,
        _parent: INodeNo,
        _name: &OsStr,
        _mode: u32,
        _umask: u32,
        _flags: i32,
        reply: ReplyCreate,
    ) {
        reply.error(Errno::EPERM);
    }

    fn unlink(&self, _req: &Request, _parent: INodeNo, _name: &OsStr, reply: ReplyEmpty) {
        reply.error(Errno::EPERM);
    }

    fn rmdir(&self, _req: &Request, _parent: INodeNo, _name: &OsStr, reply: ReplyEmpty) {
        reply.error(Errno::EPERM);
    }

    fn symlink(
        &self,
        _req: &Request,
        _parent: INodeNo,
        _link_name: &OsStr,
        _target: &Path,
        reply: ReplyEntry,
    ) {
        reply.error(Errno::EPERM);
    }

    fn rename(
        &self,
        _req: &Request,
        _parent: INodeNo,
        _name: &OsStr,
        _newparent: INodeNo,
        _newname: &OsStr,
        _flags: RenameFlags,
        reply: ReplyEmpty,
    ) {
        reply.error(Errno::EPERM);
    }

    fn link(&self, _req: &Request, _ino: INodeNo, _newparent: INodeNo, _newname: &OsStr, reply: ReplyEntry) {
        reply.error(Errno::EPERM);
    }
}

/// The largest request the kernel will send: `max_pages_limit` pages (1 MiB unless the
/// administrator raised `/proc/sys/fs/fuse/max_pages_limit`), capped at [`MAX_REQUEST`].
pub(crate) fn max_request_bytes() -> u32 {
    let pages = std::fs::read_to_string("/proc/sys/fs/fuse/max_pages_limit")
        .ok()
        .and_then(|s| s.trim().parse::<u32>().ok())
        .filter(|&p| p > 0)
        .unwrap_or(DEFAULT_MAX_PAGES);
    let page = u32::try_from(rustix::param::page_size()).unwrap_or(4096);
    pages.saturating_mul(page).min(MAX_REQUEST)
}

/// Bytes to return for a read of `size` at `offset` from a file of `file_size` bytes, or
/// `None` at or past the end (an empty reply, i.e. end of file).
pub(crate) fn read_len(offset: u64, size: u32, file_size: u64) -> Option<usize> {
    let remaining = file_size.checked_sub(offset).filter(|&r| r > 0)?;
    let len = remaining.min(u64::from(size));
    usize::try_from(len).ok().filter(|&l| l > 0)
}

/// Bytes to write for a write of `len` at `offset` into a file of `file_size` bytes.
///
/// Like a block device: a write straddling the end is shortened (direct I/O reports the short
/// count to the caller), one starting at or past the end is `ENOSPC` — the file cannot grow.
pub(crate) fn write_len(offset: u64, len: usize, file_size: u64) -> Result<usize, Errno> {
    if len == 0 {
        return Ok(0);
    }
    let remaining = file_size
        .checked_sub(offset)
        .filter(|&r| r > 0)
        .ok_or(Errno::ENOSPC)?;
    Ok(usize::try_from(remaining).map_or(len, |r| r.min(len)))
}

/// What an `fallocate` call asks for, once decoded and clamped to the file.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Fallocate {
    pub(crate) kind: FallocKind,
    pub(crate) offset: u64,
    pub(crate) len: u64,
}

/// The two supported `fallocate` operations.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum FallocKind {
    /// `PUNCH_HOLE | KEEP_SIZE`: discard (the loop driver's `REQ_OP_DISCARD`).
    PunchHole,
    /// `ZERO_RANGE`: write zeroes (the loop driver's `REQ_OP_WRITE_ZEROES` with `NOUNMAP`).
    ZeroRange,
}

impl Fallocate {
    /// Decodes `mode` for the range `offset..offset + len` of a file of `file_size` bytes.
    ///
    /// `Ok(None)` means there is nothing to do (the range lies past the end, where a kept size
    /// makes the request a no-op). Preallocation (mode 0) and the range-shifting modes are
    /// `EOPNOTSUPP`: the size is fixed, and whether space can be reserved is the engine's
    /// business, not something this file can promise.
    pub(crate) fn decode(mode: i32, offset: u64, len: u64, file_size: u64) -> Result<Option<Self>, Errno> {
        let kind = match mode {
            m if m == FALLOC_FL_PUNCH_HOLE | FALLOC_FL_KEEP_SIZE => FallocKind::PunchHole,
            m if m == FALLOC_FL_ZERO_RANGE || m == FALLOC_FL_ZERO_RANGE | FALLOC_FL_KEEP_SIZE => {
                FallocKind::ZeroRange
            }
            _ => return Err(Errno::EOPNOTSUPP),
        };
        if len == 0 {
            return Err(Errno::EINVAL);
        }
        let end = offset.checked_add(len).ok_or(Errno::EFBIG)?;
        // Zeroing without KEEP_SIZE past the end would have to grow the file.
        if mode & FALLOC_FL_KEEP_SIZE == 0 && end > file_size {
            return Err(Errno::EFBIG);
        }
        let end = end.min(file_size);
        if offset >= end {
            return Ok(None);
        }
        Ok(Some(Self {
            kind,
            offset,
            len: end - offset,
        }))
    }
}

/// The attribute changes of a `setattr` request that are not silently ignored.
///
/// Times are accepted and ignored (tools such as `touch` or `cp -p` must not fail on the
/// export); size, mode and ownership are fixed, so a request to change them is `EPERM`
/// unless it asks for the current value.
#[derive(Debug, Default, Clone, Copy)]
pub(crate) struct AttrChange {
    pub(crate) mode: Option<u32>,
    pub(crate) uid: Option<u32>,
    pub(crate) gid: Option<u32>,
    pub(crate) size: Option<u64>,
}

impl AttrChange {
    pub(crate) fn check(&self, attr: &FileAttr) -> Result<(), Errno> {
        let differs = |new: Option<u64>, current: u64| new.is_some_and(|n| n != current);
        if differs(self.size, attr.size)
            || differs(self.mode.map(|m| u64::from(m & 0o7777)), u64::from(attr.perm))
            || differs(self.uid.map(u64::from), u64::from(attr.uid))
            || differs(self.gid.map(u64::from), u64::from(attr.gid))
        {
            return Err(Errno::EPERM);
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::memory::MemoryFile;

    const MIB: u64 = 1 << 20;

    #[test]
    fn read_is_clamped_at_end_of_file() {
        assert_eq!(read_len(0, 4096, MIB), Some(4096));
        assert_eq!(read_len(MIB - 100, 4096, MIB), Some(100));
        assert_eq!(read_len(MIB, 4096, MIB), None);
        assert_eq!(read_len(u64::MAX, 4096, MIB), None);
        assert_eq!(read_len(0, 0, MIB), None);
    }

    #[test]
    fn write_is_shortened_at_end_and_refused_past_it() {
        assert_eq!(write_len(0, 4096, MIB), Ok(4096));
        assert_eq!(write_len(MIB - 100, 4096, MIB), Ok(100));
        assert_eq!(write_len(MIB, 4096, MIB), Err(Errno::ENOSPC));
        assert_eq!(write_len(u64::MAX, 1, MIB), Err(Errno::ENOSPC));
        assert_eq!(write_len(MIB, 0, MIB), Ok(0));
    }

    #[test]
    fn fallocate_modes() {
        let punch = FALLOC_FL_PUNCH_HOLE | FALLOC_FL_KEEP_SIZE;
        assert_eq!(
            Fallocate::decode(punch, 4096, 8192, MIB),
            Ok(Some(Fallocate {
                kind: FallocKind::PunchHole,
                offset: 4096,
                len: 8192
            }))
        );
        for zero in [FALLOC_FL_ZERO_RANGE, FALLOC_FL_ZERO_RANGE | FALLOC_FL_KEEP_SIZE] {
            assert_eq!(
                Fallocate::decode(zero, 0, 512, MIB),
                Ok(Some(Fallocate {
                    kind: FallocKind::ZeroRange,
                    offset: 0,
                    len: 512
                }))
            );
        }
        // Preallocation, plain or keeping the size, and anything else: unsupported.
        for mode in [0, FALLOC_FL_KEEP_SIZE, FALLOC_FL_PUNCH_HOLE, 0x08, 0x20, 0x40] {
            assert_eq!(
                Fallocate::decode(mode, 0, 4096, MIB),
                Err(Errno::EOPNOTSUPP),
                "{mode:#x}"
            );
        }
    }

    #[test]
    fn fallocate_ranges_are_clamped() {
        let punch = FALLOC_FL_PUNCH_HOLE | FALLOC_FL_KEEP_SIZE;
        // Straddling the end: clamped. Entirely past it: nothing to do.
        assert_eq!(
            Fallocate::decode(punch, MIB - 4096, 3 * 4096, MIB),
            Ok(Some(Fallocate {
                kind: FallocKind::PunchHole,
                offset: MIB - 4096,
                len: 4096
            }))
        );
        assert_eq!(Fallocate::decode(punch, MIB, 4096, MIB), Ok(None));
        assert_eq!(Fallocate::decode(punch, 0, 0, MIB), Err(Errno::EINVAL));
        assert_eq!(Fallocate::decode(punch, u64::MAX, 2, MIB), Err(Errno::EFBIG));
        // Zeroing that would grow the file.
        assert_eq!(
            Fallocate::decode(FALLOC_FL_ZERO_RANGE, MIB - 1, 2, MIB),
            Err(Errno::EFBIG)
        );
    }

    fn file_attr() -> FileAttr {
        let fs = BlockFs::new(Arc::new(MemoryFile::new(8192, 4096, false)), "v".into(), false);
        fs.attr(FILE_INO).expect("file inode exists")
    }

    #[test]
    fn setattr_refuses_size_mode_and_owner_changes() {
        let attr = file_attr();
        let ok = |c: AttrChange| c.check(&attr);
        assert_eq!(ok(AttrChange::default()), Ok(()));
        assert_eq!(
            ok(AttrChange {
                size: Some(8192),
                ..Default::default()
            }),
            Ok(())
        );
        assert_eq!(
            ok(AttrChange {
                size: Some(0),
                ..Default::default()
            }),
            Err(Errno::EPERM)
        );
        assert_eq!(
            ok(AttrChange {
                size: Some(8193),
                ..Default::default()
            }),
            Err(Errno::EPERM)
        );
        // The file-type bits of mode are not part of the comparison.
        assert_eq!(
            ok(AttrChange {
                mode: Some(0o100_644),
                ..Default::default()
            }),
            Ok(())
        );
        assert_eq!(
            ok(AttrChange {
                mode: Some(0o600),
                ..Default::default()
            }),
            Err(Errno::EPERM)
        );
        let uid = Some(attr.uid.wrapping_add(1));
        assert_eq!(
            ok(AttrChange {
                uid,
                ..Default::default()
            }),
            Err(Errno::EPERM)
        );
        assert_eq!(
            ok(AttrChange {
                uid: Some(attr.uid),
                ..Default::default()
            }),
            Ok(())
        );
    }

    #[test]
    fn attributes_follow_the_file() {
        let fs = BlockFs::new(Arc::new(MemoryFile::new(8192, 4096, true)), "v".into(), false);
        let attr = fs.attr(FILE_INO).expect("file inode exists");
        assert_eq!(
            (attr.size, attr.kind, attr.blksize),
            (8192, FileType::RegularFile, 4096)
        );
        // A read-only store is exported read-only even when not asked to be.
        assert_eq!(attr.perm, 0o444);
        assert_eq!(fs.attr(ROOT_INO).map(|a| a.kind), Some(FileType::Directory));
        assert!(fs.attr(INodeNo(3)).is_none());
    }

    #[test]
    fn request_size_is_a_page_multiple_within_bounds() {
        let max = max_request_bytes();
        assert!((4096..=MAX_REQUEST).contains(&max));
        assert_eq!(max % 4096, 0);
    }
}
