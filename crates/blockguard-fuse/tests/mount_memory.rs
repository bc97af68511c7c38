//! The FUSE layer through a real kernel mount, over an in-memory file.
//!
//! Needs root and /dev/fuse (as in CI). Without them these tests fail loudly rather than pass
//! without having run.

use std::fs::{File, OpenOptions};
use std::io::Read;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::thread::JoinHandle;

use blockguard_fuse::{mount, unmount, BlockFile, FuseError, MemoryFile, MountConfig};
use rustix::fs::FallocateFlags;

const MIB: usize = 1 << 20;
const NAME: &str = "vol.bgv";

fn require_fuse() {
    assert!(
        rustix::process::geteuid().is_root(),
        "FUSE tests need root (they mount); run them as root as CI does"
    );
    assert!(
        Path::new("/dev/fuse").exists(),
        "FUSE tests need /dev/fuse (modprobe fuse)"
    );
}

/// A mounted in-memory file served on a background thread; unmounted on drop.
struct Served {
    dir: tempfile::TempDir,
    memory: Arc<MemoryFile>,
    thread: Option<JoinHandle<Result<Arc<MemoryFile>, FuseError>>>,
}

impl Served {
    fn start(memory: MemoryFile, read_only: bool) -> Self {
        require_fuse();
        let dir = tempfile::tempdir().expect("tempdir");
        let memory = Arc::new(memory);
        let mut config = MountConfig::new(NAME, "memory-test");
        config.read_only = read_only;
        // The test harness owns the process's signals.
        config.handle_signals = false;
        let mounted = mount(Arc::clone(&memory), dir.path(), &config).expect("mount");
        let thread = std::thread::spawn(move || mounted.serve());
        Self {
            dir,
            memory,
            thread: Some(thread),
        }
    }

    fn path(&self) -> PathBuf {
        self.dir.path().join(NAME)
    }

    fn open_rw(&self) -> File {
        OpenOptions::new()
            .read(true)
            .write(true)
            .open(self.path())
            .expect("open rw")
    }

    /// Unmounts and returns what `serve` returned.
    fn stop(mut self) -> Result<Arc<MemoryFile>, FuseError> {
        unmount(self.dir.path()).expect("unmount");
        self.thread
            .take()
            .expect("running")
            .join()
            .expect("serve thread panicked")
    }
}

impl Drop for Served {
    fn drop(&mut self) {
        if let Some(thread) = self.thread.take() {
            if unmount(self.dir.path()).is_ok() {
                let _ = thread.join();
            }
        }
    }
}

fn errno(e: &std::io::Error) -> i32 {
    e.raw_os_error().unwrap_or(0)
}

#[test]
fn directory_holds_one_file_of_the_volume_size() {
    let served = Served::start(MemoryFile::new(64 * MIB, 4096, false), false);
    let names: Vec<_> = std::fs::read_dir(served.dir.path())
        .expect("readdir")
        .map(|e| e.expect("entry").file_name())
        .collect();
    assert_eq!(names, [NAME]);
    let meta = std::fs::metadata(served.path()).expect("stat");
    assert!(meta.is_file());
    assert_eq!(meta.len(), 64 * MIB as u64);
    // Nothing can be created, removed or renamed.
    let other = served.dir.path().join("other");
    assert_eq!(errno(&File::create(&other).expect_err("create")), 1);
    assert_eq!(
        errno(&std::fs::remove_file(served.path()).expect_err("unlink")),
        1
    );
    assert_eq!(
        errno(&std::fs::rename(served.path(), &other).expect_err("rename")),
        1
    );
    assert_eq!(errno(&std::fs::create_dir(&other).expect_err("mkdir")), 1);
    assert!(served.stop().is_ok());
}

#[test]
fn reads_and_writes_reach_the_file_in_large_requests() {
    let served = Served::start(MemoryFile::new(64 * MIB, 4096, false), false);
    let f = served.open_rw();
    let data: Vec<u8> = (0..8 * MIB).map(|i| (i * 7 + i / 4096) as u8).collect();
    f.write_all_at(&data, 3 * MIB as u64 + 512).expect("write");
    assert_eq!(served.memory.snapshot(3 * MIB + 512, data.len()), data);
    let mut back = vec![0u8; data.len()];
    f.read_exact_at(&mut back, 3 * MIB as u64 + 512).expect("read");
    assert_eq!(back, data);
    // One 8 MiB pwrite arrives as requests as large as the kernel allows (1 MiB here).
    let largest = served.memory.largest_request();
    assert!(largest >= MIB as u64, "largest request only {largest} bytes");
    drop(f);
    served.stop().expect("serve");
}

#[test]
fn the_end_of_the_file_is_fixed() {
    let size = 4 * MIB;
    let served = Served::start(MemoryFile::new(size, 4096, false), false);
    let f = served.open_rw();
    // A read straddling the end is short; one at the end is end of file.
    let mut buf = vec![0u8; 8192];
    assert_eq!(f.read_at(&mut buf, size as u64 - 100).expect("read"), 100);
    assert_eq!(f.read_at(&mut buf, size as u64).expect("read"), 0);
    // A write at the end cannot grow the file.
    let e = f.write_at(b"x", size as u64).expect_err("write past end");
    assert_eq!(errno(&e), 28, "{e}");
    // Truncation is refused unless to the same size.
    assert_eq!(errno(&f.set_len(0).expect_err("truncate")), 1);
    assert_eq!(errno(&f.set_len(size as u64 + 1).expect_err("extend")), 1);
    f.set_len(size as u64).expect("same size");
    assert_eq!(std::fs::metadata(served.path()).expect("stat").len(), size as u64);
    drop(f);
    served.stop().expect("serve");
}

#[test]
fn fsync_and_close_flush_the_engine() {
    let served = Served::start(MemoryFile::new(MIB, 4096, false), false);
    let before = served.memory.flush_count();
    let f = served.open_rw();
    f.write_all_at(b"abc", 0).expect("write");
    f.sync_all().expect("fsync");
    let after_fsync = served.memory.flush_count();
    assert!(after_fsync > before);
    drop(f);
    let after_close = served.memory.flush_count();
    assert!(after_close > after_fsync, "close did not flush");
    // Closing a read-only handle (blkid, a checksum) has nothing to make durable.
    drop(File::open(served.path()).expect("open ro"));
    assert_eq!(served.memory.flush_count(), after_close);
    served.stop().expect("serve");
}

#[test]
fn fallocate_punches_and_zeroes_and_refuses_the_rest() {
    let served = Served::start(MemoryFile::new(MIB, 4096, false), false);
    let f = served.open_rw();
    f.write_all_at(&vec![0xAB; 64 * 1024], 0).expect("write");
    let punch = FallocateFlags::PUNCH_HOLE | FallocateFlags::KEEP_SIZE;
    rustix::fs::fallocate(&f, punch, 4096, 8192).expect("punch hole");
    rustix::fs::fallocate(&f, FallocateFlags::ZERO_RANGE, 32768, 4096).expect("zero range");
    let mem = served.memory.snapshot(0, 64 * 1024);
    assert!(mem[..4096].iter().all(|&b| b == 0xAB));
    assert!(mem[4096..12288].iter().all(|&b| b == 0));
    assert!(mem[12288..32768].iter().all(|&b| b == 0xAB));
    assert!(mem[32768..36864].iter().all(|&b| b == 0));
    assert!(mem[36864..].iter().all(|&b| b == 0xAB));
    let e = rustix::fs::fallocate(&f, FallocateFlags::empty(), 0, 4096).expect_err("prealloc");
    assert_eq!(e, rustix::io::Errno::OPNOTSUPP);
    drop(f);
    served.stop().expect("serve");
}

#[test]
fn a_corrupt_block_is_eio_and_its_neighbours_still_read() {
    let memory = MemoryFile::new(MIB, 4096, false);
    memory.write_at(&vec![0x5A; MIB], 0).expect("fill");
    memory.corrupt(10);
    let served = Served::start(memory, false);
    let f = File::open(served.path()).expect("open");
    let mut buf = vec![0u8; 4096];
    let e = f.read_exact_at(&mut buf, 10 * 4096).expect_err("corrupt block");
    assert_eq!(errno(&e), 5, "{e}");
    // A large read covering the block fails as a whole: never part data, part zeros.
    let mut big = vec![0u8; 64 * 1024];
    assert_eq!(
        errno(&f.read_exact_at(&mut big, 0).expect_err("covering read")),
        5
    );
    f.read_exact_at(&mut buf, 9 * 4096).expect("block before");
    assert!(buf.iter().all(|&b| b == 0x5A));
    f.read_exact_at(&mut buf, 11 * 4096).expect("block after");
    drop(f);
    served.stop().expect("serve");
}

#[test]
fn read_only_mount_refuses_writes() {
    let served = Served::start(MemoryFile::new(MIB, 4096, false), true);
    let meta = std::fs::metadata(served.path()).expect("stat");
    assert!(meta.permissions().readonly());
    let e = OpenOptions::new()
        .write(true)
        .open(served.path())
        .expect_err("open for write");
    assert_eq!(errno(&e), 30, "{e}");
    let mut f = File::open(served.path()).expect("open ro");
    let mut all = Vec::new();
    f.read_to_end(&mut all).expect("read");
    assert_eq!(all.len(), MIB);
    drop(f);
    served.stop().expect("serve");
}

#[test]
fn unmount_is_refused_while_the_file_is_open() {
    let served = Served::start(MemoryFile::new(MIB, 4096, false), false);
    let f = served.open_rw();
    assert!(matches!(unmount(served.dir.path()), Err(FuseError::Busy(_))));
    drop(f);
    let memory = served.stop().expect("serve");
    assert!(memory.flush_count() > 0);
}
