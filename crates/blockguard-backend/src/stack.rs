//! What a path's bytes are stored on, through partitions and loop devices: the one place that
//! follows that chain, for locking ([`crate::FileBackend::open`]) and for telling whether two
//! paths share data ([`share_data`], which the CLI uses to refuse a copy onto its own source).
//!
//! A path names a regular file or a block device. A block device may be a partition — a byte
//! range of its disk (`/sys/dev/block/M:m/partition`, `start`, `size`) — and a disk may be a
//! loop device — a byte range of its backing file, which may itself be a block device (stacked
//! loops). Each step down is a [`Layer`]: the store (a file by device and inode number, or a
//! device by number) and the byte range of it that the path's bytes are.
//!
//! A loop device's backing file is identified by the device and inode numbers the kernel
//! reports (`LOOP_GET_STATUS64`), never by its name: the name in sysfs is the one the loop
//! device was set up with, which may be another hard link, a link deleted since (shown as
//! "… (deleted)"), or a name that now holds a different file.

use crate::file::{lock, LockMode, OpenError};
use std::fs::File;
use std::io;
use std::ops::Range;
use std::os::unix::fs::{FileTypeExt, MetadataExt};
use std::path::{Path, PathBuf};

/// Partitions and loop devices are followed at most this deep (the kernel refuses loop
/// cycles; this bounds a pathological stack).
const MAX_DEPTH: usize = 16;

/// Sysfs counts partition starts and device sizes in 512-byte sectors, whatever the device's
/// logical block size.
const SYSFS_SECTOR: u64 = 512;

/// One store a path's bytes live on.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Store {
    /// A regular file (or anything that is not a block device), by the device and inode
    /// numbers of the filesystem holding it.
    File {
        /// `st_dev` of the file.
        dev: u64,
        /// `st_ino` of the file.
        ino: u64,
    },
    /// A block device (a disk or a partition), by its device number.
    Device {
        /// `st_rdev` of the device.
        rdev: u64,
    },
}

/// How a layer is reached from the one above it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Via {
    /// The path itself.
    Path,
    /// The disk the layer above is a partition of.
    PartitionOf,
    /// The backing file (or device) of the loop device above.
    LoopOver,
}

/// One step of the chain under a path.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Layer {
    /// What holds the bytes.
    pub store: Store,
    /// The bytes of `store` that are the path's bytes; `end` is `u64::MAX` where the path
    /// reaches to the store's end, whatever its length.
    pub range: Range<u64>,
    /// A name to open it by: the path, a disk's device node, or a backing file's name as the
    /// kernel reports it (which may be stale: see the module documentation).
    pub name: PathBuf,
    /// How it is reached from the layer above.
    pub via: Via,
}

/// The chain of stores under `path`, the path itself first: one layer for a regular file;
/// for a block device, the device, then for a partition its disk, then for a loop device its
/// backing file or device, and so on down.
///
/// Reading a loop device's status opens it read-only, which needs read permission on it.
pub fn layers(path: &Path) -> Result<Vec<Layer>, OpenError> {
    let meta = std::fs::metadata(path).map_err(|e| OpenError::from_io(path, e))?;
    if !meta.file_type().is_block_device() {
        return Ok(vec![Layer {
            store: Store::File {
                dev: meta.dev(),
                ino: meta.ino(),
            },
            range: 0..u64::MAX,
            name: path.to_path_buf(),
            via: Via::Path,
        }]);
    }
    let mut rdev = meta.rdev();
    let mut node = path.to_path_buf();
    let mut range = 0..u64::MAX;
    let mut out = vec![Layer {
        store: Store::Device { rdev },
        range: range.clone(),
        name: node.clone(),
        via: Via::Path,
    }];
    let sys_err = |file: &Path, source: io::Error| OpenError::Io {
        path: path.to_path_buf(),
        operation: "follow it to the storage under it",
        source: io::Error::new(source.kind(), format!("{}: {source}", file.display())),
    };
    for _ in 0..MAX_DEPTH {
        let sys = sysfs_dir(rdev);
        if !sys.exists() {
            // No sysfs entry (sysfs not mounted, or not a device the block layer lists):
            // nothing to follow.
            break;
        }
        if sys.join("partition").exists() {
            let start = read_number(&sys.join("start")).map_err(|e| sys_err(&sys.join("start"), e))?;
            let size = read_number(&sys.join("size")).map_err(|e| sys_err(&sys.join("size"), e))?;
            // `M:m/..` is the directory of the disk the partition belongs to.
            let parent = sys.join("..");
            let disk = read_devno(&parent.join("dev")).map_err(|e| sys_err(&parent.join("dev"), e))?;
            range = within(&range, start * SYSFS_SECTOR, size * SYSFS_SECTOR);
            rdev = disk;
            node = device_node(disk).map_err(|e| sys_err(&parent.join("uevent"), e))?;
            out.push(Layer {
                store: Store::Device { rdev },
                range: range.clone(),
                name: node.clone(),
                via: Via::PartitionOf,
            });
        }
        let sys = sysfs_dir(rdev);
        if !sys.join("loop").exists() {
            break;
        }
        let size = read_number(&sys.join("size")).map_err(|e| sys_err(&sys.join("size"), e))?;
        let info = loop_status(&node, rdev)?;
        let backing_file = sys.join("loop/backing_file");
        let backing = std::fs::read_to_string(&backing_file).map_err(|e| sys_err(&backing_file, e))?;
        let backing = PathBuf::from(backing.strip_suffix('\n').unwrap_or(&backing));
        range = within(&range, info.offset, size * SYSFS_SECTOR);
        if info.rdevice == 0 {
            out.push(Layer {
                store: Store::File {
                    dev: info.device,
                    ino: info.inode,
                },
                range,
                name: backing,
                via: Via::LoopOver,
            });
            break;
        }
        // A loop device over a block device: follow that one.
        rdev = info.rdevice;
        node = backing;
        out.push(Layer {
            store: Store::Device { rdev },
            range: range.clone(),
            name: node.clone(),
            via: Via::LoopOver,
        });
    }
    Ok(out)
}

/// The bytes `range` of a device whose bytes are `start..start + len` of the store under it.
fn within(range: &Range<u64>, start: u64, len: u64) -> Range<u64> {
    let end = range.end.min(len);
    let begin = range.start.min(end);
    start.saturating_add(begin)..start.saturating_add(end)
}

/// True if some store lies under both chains with overlapping byte ranges.
pub fn overlap(a: &[Layer], b: &[Layer]) -> bool {
    a.iter().any(|x| {
        b.iter()
            .any(|y| x.store == y.store && x.range.start < y.range.end && y.range.start < x.range.end)
    })
}

/// True if `a` and `b` share bytes: the same file through any name or hard link, the same
/// device through any node, a loop device (or a partition of one, or a loop device stacked on
/// those) and the file under it, or overlapping partitions. `false` when either does not
/// exist.
pub fn share_data(a: &Path, b: &Path) -> Result<bool, OpenError> {
    let chain = |p: &Path| match layers(p) {
        Ok(l) => Ok(Some(l)),
        Err(OpenError::NotFound { .. }) => Ok(None),
        Err(e) => Err(e),
    };
    let (Some(la), Some(lb)) = (chain(a)?, chain(b)?) else {
        return Ok(false);
    };
    Ok(overlap(&la, &lb))
}

/// Locks every layer under the path (`layers[0]`, which the caller has open and locked) and
/// returns the files holding those locks.
///
/// A partition's disk is locked shared whatever `mode` is: partitions of a disk never
/// overlap (the kernel refuses that), so other partitions stay usable while the whole disk
/// cannot be opened for writing. Everything else takes `mode`, below a partition too: two
/// partitions of one loop device then lock the same file under it and cannot be written at
/// once (nor one read while the other is written). That is conservative — a whole-file lock
/// cannot tell byte ranges apart — and it is what keeps out a partition of a second loop
/// device over the same file. Partitions of other disks are not affected. A loop device's backing file
/// that can no longer be opened by the name it was set up with (deleted, or the name now
/// holds another file) cannot be locked, and the open is refused: another process could
/// write it under a different name unseen.
pub(crate) fn lock_layers(layers: &[Layer], path: &Path, mode: LockMode) -> Result<Vec<File>, OpenError> {
    let mut held = Vec::new();
    if mode == LockMode::None {
        return Ok(held);
    }
    // What the path stands on, for the message when a layer is locked by another process:
    // "/dev/loop0p1 (a partition of /dev/loop0, a loop device over /srv/v.bgv, which is in use)".
    let mut how = Vec::new();
    for (i, layer) in layers.iter().enumerate().skip(1) {
        let above = &layers[i - 1];
        let layer_mode = match layer.via {
            Via::PartitionOf => LockMode::Shared,
            Via::LoopOver | Via::Path => mode,
        };
        how.push(match layer.via {
            Via::PartitionOf => format!("a partition of {}", layer.name.display()),
            Via::LoopOver | Via::Path => format!("a loop device over {}", layer.name.display()),
        });
        let file = open_layer(layer).map_err(|e| match e.kind() {
            io::ErrorKind::NotFound if layer.via == Via::LoopOver => OpenError::BackingGone {
                path: path.to_path_buf(),
                loop_device: above.name.clone(),
                backing: layer.name.clone(),
            },
            _ => OpenError::Io {
                path: layer.name.clone(),
                operation: "open it to lock it",
                source: e,
            },
        })?;
        lock(&file, &layer.name, layer_mode).map_err(|e| match e {
            OpenError::Locked { .. } => OpenError::Locked {
                path: PathBuf::from(format!(
                    "{} ({}, which is in use)",
                    path.display(),
                    how.join(", ")
                )),
            },
            other => other,
        })?;
        held.push(file);
    }
    Ok(held)
}

/// Opens a layer read-only by its name, checking it is the store the kernel reported: a
/// name that is gone or now holds something else is [`io::ErrorKind::NotFound`]. Checked
/// before opening too, so that a name replaced by a FIFO cannot block the open.
fn open_layer(layer: &Layer) -> io::Result<File> {
    let is = |m: &std::fs::Metadata| match layer.store {
        Store::File { dev, ino } => !m.file_type().is_block_device() && m.dev() == dev && m.ino() == ino,
        Store::Device { rdev } => m.file_type().is_block_device() && m.rdev() == rdev,
    };
    let gone = || {
        io::Error::new(
            io::ErrorKind::NotFound,
            format!("{} is gone or now names something else", layer.name.display()),
        )
    };
    let try_open = |name: &Path| -> io::Result<File> {
        match std::fs::metadata(name) {
            Ok(m) if is(&m) => {}
            Ok(_) => return Err(gone()),
            Err(e) if e.kind() == io::ErrorKind::NotFound => return Err(gone()),
            Err(e) => return Err(e),
        }
        let file = File::open(name)?;
        if is(&file.metadata()?) {
            Ok(file)
        } else {
            Err(gone())
        }
    };
    match (try_open(&layer.name), layer.store) {
        (Ok(f), _) => Ok(f),
        // A device has another name to try: its node under /dev.
        (Err(e), Store::Device { rdev }) if e.kind() == io::ErrorKind::NotFound => {
            device_node(rdev).and_then(|n| try_open(&n))
        }
        (Err(e), _) => Err(e),
    }
}

/// `/sys/dev/block/MAJOR:MINOR`, the sysfs directory of a block device.
fn sysfs_dir(rdev: u64) -> PathBuf {
    let (major, minor) = (rustix::fs::major(rdev), rustix::fs::minor(rdev));
    PathBuf::from(format!("/sys/dev/block/{major}:{minor}"))
}

/// The device node of `rdev` under /dev, by the name the kernel gives it (`DEVNAME` in its
/// sysfs `uevent`).
fn device_node(rdev: u64) -> io::Result<PathBuf> {
    let uevent = std::fs::read_to_string(sysfs_dir(rdev).join("uevent"))?;
    uevent
        .lines()
        .find_map(|l| l.strip_prefix("DEVNAME="))
        .map(|name| Path::new("/dev").join(name))
        .ok_or_else(|| io::Error::new(io::ErrorKind::NotFound, "no DEVNAME in its uevent"))
}

/// A decimal number in a sysfs file.
fn read_number(file: &Path) -> io::Result<u64> {
    let text = std::fs::read_to_string(file)?;
    text.trim().parse().map_err(|e| {
        io::Error::new(
            io::ErrorKind::InvalidData,
            format!("not a number ({e}): {text:?}"),
        )
    })
}

/// A device number written as `MAJOR:MINOR` in a sysfs file.
fn read_devno(file: &Path) -> io::Result<u64> {
    let text = std::fs::read_to_string(file)?;
    let bad = || io::Error::new(io::ErrorKind::InvalidData, format!("not MAJOR:MINOR: {text:?}"));
    let (major, minor) = text.trim().split_once(':').ok_or_else(bad)?;
    let major = major.parse().map_err(|_| bad())?;
    let minor = minor.parse().map_err(|_| bad())?;
    Ok(rustix::fs::makedev(major, minor))
}

/// What `LOOP_GET_STATUS64` says of a loop device's backing file.
struct LoopStatus {
    /// `st_dev` of the backing file.
    device: u64,
    /// `st_ino` of the backing file.
    inode: u64,
    /// `st_rdev` of the backing file: non-zero when it is a device.
    rdevice: u64,
    /// Where in the backing file the loop device starts.
    offset: u64,
}

/// Asks the loop device `rdev` (opened read-only by `node`, or by its /dev name) about its
/// backing file. The kernel encodes device numbers as `stat` does (`new_encode_dev`), so they
/// compare with `st_dev` and `st_rdev` directly.
fn loop_status(node: &Path, rdev: u64) -> Result<LoopStatus, OpenError> {
    let layer = Layer {
        store: Store::Device { rdev },
        range: 0..u64::MAX,
        name: node.to_path_buf(),
        via: Via::Path,
    };
    let io_err = |operation: &'static str| {
        move |source: io::Error| OpenError::Io {
            path: node.to_path_buf(),
            operation,
            source,
        }
    };
    let file = open_layer(&layer).map_err(io_err("open the loop device to ask what it is over"))?;
    let info = loop_get_status64(&file)
        .map_err(io_err("ask the loop device what it is over (LOOP_GET_STATUS64)"))?;
    Ok(LoopStatus {
        device: info.lo_device,
        inode: info.lo_inode,
        rdevice: info.lo_rdevice,
        offset: info.lo_offset,
    })
}

/// `ioctl(LOOP_GET_STATUS64)`. Neither std nor rustix wrap it, and it is the only source of
/// the backing file's device and inode numbers (sysfs gives only a name, which may be stale).
#[allow(unsafe_code)]
fn loop_get_status64(file: &File) -> io::Result<linux_raw_sys::loop_device::loop_info64> {
    use linux_raw_sys::loop_device::{loop_info64, LOOP_GET_STATUS64};
    // SAFETY: LOOP_GET_STATUS64 is a read-only query that writes exactly one
    // `struct loop_info64` to its argument; the Getter passes a pointer to its own
    // `MaybeUninit<loop_info64>`, whose layout is the kernel's (bindgen-generated from
    // <linux/loop.h> by linux-raw-sys), and reads it only after the call succeeded. The
    // descriptor belongs to `file`, borrowed for the whole call.
    unsafe {
        let getter = rustix::ioctl::Getter::<{ LOOP_GET_STATUS64 }, loop_info64>::new();
        rustix::ioctl::ioctl(file, getter)
    }
    .map_err(io::Error::from)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn layer(store: Store, range: Range<u64>) -> Layer {
        Layer {
            store,
            range,
            name: PathBuf::new(),
            via: Via::Path,
        }
    }

    #[test]
    fn ranges_map_down_and_overlap_only_where_they_meet() {
        // A partition of 10 bytes at 100 of a disk, the whole partition.
        assert_eq!(within(&(0..u64::MAX), 100, 10), 100..110);
        // A loop device at offset 5 over a file, the bytes 2..4 of the loop device.
        assert_eq!(within(&(2..4), 5, 10), 7..9);
        assert_eq!(within(&(20..30), 5, 10), 15..15);
        let file = Store::File { dev: 1, ino: 2 };
        let disk = Store::Device { rdev: 3 };
        let a = [layer(disk, 0..10), layer(file, 100..110)];
        assert!(overlap(&a, &[layer(file, 0..u64::MAX)]));
        assert!(overlap(&a, &[layer(file, 109..200)]));
        assert!(!overlap(&a, &[layer(file, 110..200)]));
        assert!(!overlap(
            &a,
            &[layer(Store::File { dev: 1, ino: 3 }, 0..u64::MAX)]
        ));
        assert!(overlap(&a, &[layer(disk, 9..10)]));
        assert!(!overlap(&a, &[layer(disk, 10..20)]));
    }

    #[test]
    fn a_regular_file_is_one_layer_and_shares_data_with_its_hard_links() {
        let dir = tempfile::tempdir().unwrap();
        let a = dir.path().join("a");
        let b = dir.path().join("b");
        let c = dir.path().join("c");
        std::fs::write(&a, b"x").unwrap();
        std::fs::hard_link(&a, &b).unwrap();
        std::fs::write(&c, b"x").unwrap();
        let l = layers(&a).unwrap();
        assert_eq!(l.len(), 1);
        assert_eq!(l[0].via, Via::Path);
        assert!(share_data(&a, &b).unwrap());
        assert!(!share_data(&a, &c).unwrap());
        assert!(!share_data(&a, &dir.path().join("missing")).unwrap());
    }

    // Loop devices and partitions: these need root and util-linux (losetup, addpart); skipped
    // otherwise.

    use crate::testdev::{add_partition, attach, scratch_image};
    use crate::{Backend, FileBackend, FileOptions};

    fn rw() -> FileOptions {
        FileOptions::default()
    }

    fn ro_shared() -> FileOptions {
        FileOptions {
            read_only: true,
            lock: LockMode::Shared,
            ..FileOptions::default()
        }
    }

    #[track_caller]
    fn refused(path: &Path, opts: &FileOptions) -> OpenError {
        match FileBackend::open(path, opts) {
            Ok(_) => panic!(
                "{} opened ({opts:?}) while it should be locked out",
                path.display()
            ),
            Err(e) => e,
        }
    }

    /// Regression (review 9, findings 1 and 2): a partition of a loop device over a volume
    /// file took no lock on the file, so the volume was served twice, or exported into while
    /// served. A partition locks its disk shared and what is under the disk with its own mode.
    #[test]
    fn a_partition_of_a_loop_device_locks_the_disk_and_the_file_under_it() {
        let Some((_dir, img, lo)) = scratch_image(8 << 20) else {
            return;
        };
        let Some(p1) = add_partition(&lo.0, 1, 1 << 20, 2 << 20) else {
            return;
        };
        let Some(p2) = add_partition(&lo.0, 2, 4 << 20, 2 << 20) else {
            return;
        };

        // The chain: the partition, its disk at 1 MiB, the file at 1 MiB.
        let l = layers(&p1.node).unwrap();
        assert_eq!(l.len(), 3, "{l:?}");
        assert_eq!(
            (l[1].via, l[1].range.clone()),
            (Via::PartitionOf, (1 << 20)..(3 << 20))
        );
        let meta = std::fs::metadata(&img).unwrap();
        assert_eq!(
            l[2].store,
            Store::File {
                dev: meta.dev(),
                ino: meta.ino()
            }
        );
        assert_eq!(
            (l[2].via, l[2].range.clone()),
            (Via::LoopOver, (1 << 20)..(3 << 20))
        );
        assert!(share_data(&p1.node, &img).unwrap());
        assert!(share_data(&p1.node, &lo.0).unwrap());
        assert!(
            !share_data(&p1.node, &p2.node).unwrap(),
            "disjoint partitions share no byte"
        );

        // The file served: no partition opens, read-write or read-only.
        let held = FileBackend::open(&img, &rw()).unwrap();
        let err = refused(&p1.node, &rw());
        assert!(matches!(err, OpenError::Locked { .. }), "{err}");
        let shown = err.to_string();
        assert!(
            shown.contains("a partition of") && shown.contains("a loop device over"),
            "{shown}"
        );
        refused(&p1.node, &ro_shared());
        drop(held);

        // The partition served: not the file, nor the whole loop device, nor the file read-only.
        let held = FileBackend::open(&p1.node, &rw()).unwrap();
        assert_eq!(held.len(), 2 << 20);
        refused(&img, &rw());
        refused(&img, &ro_shared());
        refused(&lo.0, &rw());
        refused(&p1.node, &ro_shared());
        drop(held);

        // Read-only on a partition: other readers welcome, no writer of the file.
        let reader = FileBackend::open(&p1.node, &ro_shared()).unwrap();
        let other = FileBackend::open(&img, &ro_shared()).unwrap();
        refused(&img, &rw());
        drop((reader, other));
        drop((p2, p1, lo));
    }

    /// A loop device stacked on a partition of a loop device: every layer is followed.
    #[test]
    fn a_loop_device_over_a_partition_of_a_loop_device_locks_down_to_the_file() {
        let Some((_dir, img, lo)) = scratch_image(8 << 20) else {
            return;
        };
        let Some(p1) = add_partition(&lo.0, 1, 2 << 20, 4 << 20) else {
            return;
        };
        let Some(upper) = attach(&p1.node) else { return };
        let l = layers(&upper.0).unwrap();
        let vias: Vec<Via> = l.iter().map(|l| l.via).collect();
        assert_eq!(
            vias,
            [Via::Path, Via::LoopOver, Via::PartitionOf, Via::LoopOver],
            "{l:?}"
        );
        assert_eq!(l[3].range, (2 << 20)..(6 << 20));
        assert!(share_data(&upper.0, &img).unwrap());
        let held = FileBackend::open(&upper.0, &rw()).unwrap();
        for other in [&img, &lo.0, &p1.node] {
            refused(other, &rw());
        }
        drop(held);
        let held = FileBackend::open(&img, &rw()).unwrap();
        refused(&upper.0, &rw());
        drop(held);
        drop((upper, p1, lo));
    }

    /// Regression (review 9, findings 3 and 4): a loop device set up through a hard link is
    /// the file; through a link deleted since, too — and it cannot be locked by name, so a
    /// locking open is refused instead of going ahead unlocked.
    #[test]
    fn a_loop_device_over_a_hard_link_or_a_deleted_link_is_the_file() {
        let dir = tempfile::tempdir().unwrap();
        let img = dir.path().join("img");
        let link = dir.path().join("link");
        let gone = dir.path().join("gone");
        File::create(&img).unwrap().set_len(4 << 20).unwrap();
        std::fs::hard_link(&img, &link).unwrap();
        std::fs::hard_link(&img, &gone).unwrap();
        let Some(by_link) = attach(&link) else { return };
        let Some(by_gone) = attach(&gone) else { return };
        std::fs::remove_file(&gone).unwrap();
        assert!(share_data(&by_link.0, &img).unwrap());
        assert!(share_data(&by_gone.0, &img).unwrap());
        assert!(share_data(&by_gone.0, &by_link.0).unwrap());

        let held = FileBackend::open(&img, &rw()).unwrap();
        refused(&by_link.0, &rw());
        drop(held);
        let err = refused(&by_gone.0, &rw());
        assert!(matches!(err, OpenError::BackingGone { .. }), "{err}");
        assert!(err.to_string().contains("deleted or replaced"), "{err}");
        refused(&by_gone.0, &ro_shared());
        // Without a lock (info, dump) it still opens.
        let unlocked = FileOptions {
            read_only: true,
            lock: LockMode::None,
            ..FileOptions::default()
        };
        assert_eq!(FileBackend::open(&by_gone.0, &unlocked).unwrap().len(), 4 << 20);

        // A name that now holds another file is not taken for the file behind the loop device.
        std::fs::remove_file(&link).unwrap();
        File::create(&link).unwrap().set_len(4 << 20).unwrap();
        assert!(!share_data(&by_link.0, &link).unwrap());
        assert!(share_data(&by_link.0, &img).unwrap());
        let err = refused(&by_link.0, &rw());
        assert!(matches!(err, OpenError::BackingGone { .. }), "{err}");
        drop((by_gone, by_link));
    }
}
