//! Finding, unmounting and waiting for blockguard mounts from another process (the
//! `blockguard umount` side).

use std::fs::File;
use std::os::unix::ffi::OsStrExt;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use rustix::fs::FlockOperation;
use rustix::io::Errno;
use rustix::mount::UnmountFlags;

use crate::session::SUBTYPE;
use crate::FuseError;

/// One line of `/proc/self/mountinfo`, the parts we use.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MountEntry {
    /// Where it is mounted.
    pub mountpoint: PathBuf,
    /// Filesystem type, e.g. `fuse.blockguard`.
    pub fstype: String,
    /// The mount source; for blockguard mounts the volume's path.
    pub source: PathBuf,
}

impl MountEntry {
    /// Whether this is a mount made by [`crate::mount`].
    pub fn is_blockguard(&self) -> bool {
        self.fstype.strip_prefix("fuse.") == Some(SUBTYPE)
    }
}

/// The mount currently visible at `mountpoint` (the last one mounted there), if any.
pub fn find_mount(mountpoint: &Path) -> Result<Option<MountEntry>, FuseError> {
    let table = std::fs::read("/proc/self/mountinfo").map_err(FuseError::MountTable)?;
    // canonicalize fails on a mount whose server died (ENOTCONN); then at least make the path
    // absolute, as the mount table's are.
    let target = mountpoint
        .canonicalize()
        .or_else(|_| std::path::absolute(mountpoint))
        .unwrap_or_else(|_| mountpoint.to_path_buf());
    Ok(parse_mountinfo(&table)
        .into_iter()
        .rev()
        .find(|m| m.mountpoint == target))
}

/// Parses the text of `/proc/<pid>/mountinfo`; malformed lines are skipped.
pub(crate) fn parse_mountinfo(table: &[u8]) -> Vec<MountEntry> {
    table
        .split(|&b| b == b'\n')
        .filter_map(|line| {
            let fields: Vec<&[u8]> = line.split(|&b| b == b' ').collect();
            // id parent dev root MOUNTPOINT options [optional...] - FSTYPE SOURCE superopts
            let mountpoint = fields.get(4)?;
            let dash = fields.iter().skip(6).position(|f| *f == b"-")? + 6;
            let fstype = fields.get(dash + 1)?;
            let source = fields.get(dash + 2)?;
            Some(MountEntry {
                mountpoint: PathBuf::from(std::ffi::OsStr::from_bytes(&unescape(mountpoint))),
                fstype: String::from_utf8_lossy(&unescape(fstype)).into_owned(),
                source: PathBuf::from(std::ffi::OsStr::from_bytes(&unescape(source))),
            })
        })
        .collect()
}

/// Undoes the kernel's octal escaping of space, tab, newline and backslash (`\040` etc.).
fn unescape(field: &[u8]) -> Vec<u8> {
    let mut out = Vec::with_capacity(field.len());
    let mut i = 0;
    while i < field.len() {
        let octal = field
            .get(i + 1..i + 4)
            .filter(|d| d.iter().all(|c| (b'0'..=b'7').contains(c)) && field[i] == b'\\');
        if let Some(d) = octal {
            let v = (u32::from(d[0] - b'0') << 6) | (u32::from(d[1] - b'0') << 3) | u32::from(d[2] - b'0');
            out.push(u8::try_from(v).unwrap_or(b'?'));
            i += 4;
        } else {
            out.push(field[i]);
            i += 1;
        }
    }
    out
}

/// How long [`unmount`] waits for releases of just-closed files.
const RELEASE_GRACE: std::time::Duration = std::time::Duration::from_millis(500);

/// Unmounts `mountpoint` with umount(2).
///
/// The serving process notices and ends [`crate::Mounted::serve`]. A mount whose file is
/// still open — typically by a loop device — is [`FuseError::Busy`]; it is deliberately not
/// detached lazily, which would leave the loop device writing to a filesystem no one can
/// reach any more.
///
/// A file closed just before is released asynchronously by FUSE, and the kernel reports the
/// mount busy until the release is answered; so `EBUSY` is retried for a short while.
pub fn unmount(mountpoint: &Path) -> Result<(), FuseError> {
    let deadline = std::time::Instant::now() + RELEASE_GRACE;
    let mut result = rustix::mount::unmount(mountpoint, UnmountFlags::empty());
    while result == Err(Errno::BUSY) && std::time::Instant::now() < deadline {
        std::thread::sleep(std::time::Duration::from_millis(10));
        result = rustix::mount::unmount(mountpoint, UnmountFlags::empty());
    }
    match result {
        Ok(()) => Ok(()),
        Err(Errno::BUSY) => Err(FuseError::Busy(mountpoint.to_path_buf())),
        Err(Errno::INVAL | Errno::NOENT) => Err(FuseError::NotMounted(mountpoint.to_path_buf())),
        Err(e) => Err(FuseError::Unmount {
            mountpoint: mountpoint.to_path_buf(),
            source: e.into(),
        }),
    }
}

/// Waits until no process holds a lock on `volume`, i.e. until the server that had it open
/// has flushed and closed it. Returns `Ok(false)` if the volume cannot be opened to check.
///
/// A server holds a `flock` on the volume for as long as it has it open (exclusive when
/// read-write, shared when read-only); this polls for an exclusive one, which conflicts with
/// both, and releases it at once.
pub fn wait_released(volume: &Path, timeout: Duration) -> Result<bool, FuseError> {
    let Ok(file) = File::open(volume) else {
        return Ok(false);
    };
    let deadline = Instant::now() + timeout;
    loop {
        match rustix::fs::flock(&file, FlockOperation::NonBlockingLockExclusive) {
            // Closing `file` on return drops the lock.
            Ok(()) => return Ok(true),
            Err(Errno::WOULDBLOCK | Errno::INTR) => {}
            Err(e) => {
                return Err(FuseError::Wait {
                    volume: volume.to_path_buf(),
                    source: e.into(),
                })
            }
        }
        if Instant::now() >= deadline {
            return Err(FuseError::StillOpen {
                volume: volume.to_path_buf(),
                timeout,
            });
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const TABLE: &[u8] = b"\
22 1 0:21 / /proc rw,nosuid,nodev,noexec,relatime shared:12 - proc proc rw
98 29 0:51 / /tmp/a\\040b rw,nosuid,nodev,noexec,noatime shared:50 - fuse.blockguard /vols/my\\040vol.bgv rw,user_id=0,group_id=0,default_permissions
99 29 0:52 / /mnt rw - ext4 /dev/loop0 rw
garbage line
";

    #[test]
    fn parses_and_unescapes() {
        let m = parse_mountinfo(TABLE);
        assert_eq!(m.len(), 3);
        assert_eq!(m[1].mountpoint, Path::new("/tmp/a b"));
        assert_eq!(m[1].source, Path::new("/vols/my vol.bgv"));
        assert!(m[1].is_blockguard());
        assert!(!m[2].is_blockguard());
        assert_eq!(m[2].fstype, "ext4");
    }

    #[test]
    fn unescape_edge_cases() {
        assert_eq!(unescape(b"a\\134b"), b"a\\b");
        assert_eq!(unescape(b"tail\\04"), b"tail\\04");
        assert_eq!(unescape(b"\\999"), b"\\999");
        assert_eq!(unescape(b"nl\\012"), b"nl\n");
    }

    #[test]
    fn unmounting_a_plain_directory_is_not_mounted() {
        let dir = tempfile::tempdir().expect("tempdir");
        match unmount(dir.path()) {
            // EPERM when not root.
            Err(FuseError::NotMounted(_) | FuseError::Unmount { .. }) => {}
            other => panic!("unexpected {other:?}"),
        }
    }

    #[test]
    fn wait_released_sees_an_unlocked_file() {
        let f = tempfile::NamedTempFile::new().expect("tempfile");
        assert_eq!(
            wait_released(f.path(), Duration::from_millis(10)).ok(),
            Some(true)
        );
        let held = File::open(f.path()).expect("open");
        rustix::fs::flock(&held, FlockOperation::LockExclusive).expect("lock");
        assert!(matches!(
            wait_released(f.path(), Duration::from_millis(50)),
            Err(FuseError::StillOpen { .. })
        ));
        drop(held);
        assert_eq!(
            wait_released(f.path(), Duration::from_millis(10)).ok(),
            Some(true)
        );
    }
}
