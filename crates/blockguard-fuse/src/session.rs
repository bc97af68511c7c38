//! Mounting, serving until unmounted, and shutting down on signals.

use std::ffi::{CString, OsString};
use std::fs::OpenOptions;
use std::io;
use std::os::fd::{AsRawFd, OwnedFd};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::thread::JoinHandle;

use fuser::{Config, MountOption, Session, SessionACL};
use rustix::mount::{MountFlags, UnmountFlags};
use signal_hook::consts::{SIGHUP, SIGINT, SIGTERM};
use signal_hook::iterator::{Handle, Signals};

use crate::file::BlockFile;
use crate::fs::BlockFs;
use crate::mounts;
use crate::FuseError;

/// The filesystem type shown by `mount` and `/proc/self/mountinfo` is `fuse.<SUBTYPE>`;
/// `blockguard umount` uses it to recognise its own mounts.
pub const SUBTYPE: &str = "blockguard";

/// Default number of request-handling threads. Requests wait on disk I/O rather than on the
/// CPU, and a loop device in direct-I/O mode keeps many in flight, so several threads per
/// core keep the disk busy; each costs about 2 MiB (a request buffer and a read buffer).
pub const DEFAULT_THREADS: usize = 8;

/// How to mount.
#[derive(Debug, Clone)]
pub struct MountConfig {
    /// Name of the one file in the mounted directory (usually the volume's file name).
    pub file_name: OsString,
    /// Shown as the mount's source by `mount` and `findmnt`; `blockguard umount` reads it back
    /// to find the volume, so it should be the volume's canonical path.
    pub source: String,
    /// Mount read-only: the file is `0444` and writes fail with `EROFS`.
    pub read_only: bool,
    /// Request-handling threads (at least one).
    pub threads: usize,
    /// Install handlers so that SIGTERM and SIGINT unmount and end [`Mounted::serve`]
    /// cleanly, and SIGHUP is ignored. Turn off when embedding in a process that handles
    /// signals itself.
    pub handle_signals: bool,
}

impl MountConfig {
    /// A configuration with defaults: read-write, [`DEFAULT_THREADS`], signals handled.
    pub fn new(file_name: impl Into<OsString>, source: impl Into<String>) -> Self {
        Self {
            file_name: file_name.into(),
            source: source.into(),
            read_only: false,
            threads: DEFAULT_THREADS,
            handle_signals: true,
        }
    }
}

/// A mounted filesystem that is not yet serving requests (the kernel queues them meanwhile).
pub struct Mounted<F: BlockFile> {
    session: Session<BlockFs<F>>,
    /// Set when we made the mount ourselves (fuser then leaves unmounting to us).
    guard: Option<MountGuard>,
    file: Arc<F>,
    mountpoint: PathBuf,
    signals: Option<Signals>,
}

impl<F: BlockFile> std::fmt::Debug for Mounted<F> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Mounted")
            .field("mountpoint", &self.mountpoint)
            .finish_non_exhaustive()
    }
}

/// Mounts `file` on `mountpoint` as a directory holding one file.
///
/// On return the mount is visible and the kernel handshake is done; call [`Mounted::serve`]
/// to answer requests. Dropping the result instead unmounts.
pub fn mount<F: BlockFile>(
    file: Arc<F>,
    mountpoint: &Path,
    config: &MountConfig,
) -> Result<Mounted<F>, FuseError> {
    validate_file_name(&config.file_name)?;
    // Registered before mounting so that a signal arriving while the mount is being set up
    // is queued rather than killing the process with the mount half made.
    let signals = if config.handle_signals {
        Some(Signals::new([SIGTERM, SIGINT, SIGHUP]).map_err(FuseError::Signals)?)
    } else {
        None
    };
    let fs = BlockFs::new(Arc::clone(&file), config.file_name.clone(), config.read_only);
    // Resolved before mounting: afterwards, looking at the path would be a request to this
    // filesystem, which is not answering yet.
    let canonical = mountpoint.canonicalize().map_err(|source| FuseError::Mount {
        mountpoint: mountpoint.to_path_buf(),
        source,
    })?;
    let mountpoint = canonical.as_path();

    let mut fuse_config = Config::default();
    fuse_config.n_threads = Some(config.threads.max(1));
    // One /dev/fuse descriptor per worker thread: the kernel then queues requests per
    // descriptor instead of waking every thread for each request.
    fuse_config.clone_fd = true;

    let mount_error = |source| FuseError::Mount {
        mountpoint: mountpoint.to_path_buf(),
        source,
    };
    let (session, guard) = if rustix::process::geteuid().is_root() {
        mount_direct(fs, mountpoint, config, fuse_config).map_err(mount_error)?
    } else {
        fuse_config.mount_options = fusermount_options(config);
        let session = Session::new(fs, mountpoint, &fuse_config).map_err(mount_error)?;
        (session, None)
    };
    Ok(Mounted {
        session,
        guard,
        file,
        mountpoint: canonical,
        signals,
    })
}

/// Mounts with mount(2) ourselves (root only), so that fuser holds no handle on the mount:
/// its own unmount-on-exit would run after the user's unmount and, finding the path no longer
/// a mount point, either fail noisily or unmount whatever was mounted there since.
fn mount_direct<F: BlockFile>(
    fs: BlockFs<F>,
    mountpoint: &Path,
    config: &MountConfig,
    fuse_config: Config,
) -> io::Result<(Session<BlockFs<F>>, Option<MountGuard>)> {
    let dev = OpenOptions::new().read(true).write(true).open("/dev/fuse")?;
    // The kernel's fuse options: the connection's descriptor, the root's file type (a
    // directory), the owner whose requests are allowed, and — as for fusermount's
    // default_permissions — permission checks done by the kernel against our attributes, so
    // that the 0444 mode of a read-only export is enforced before a request reaches us.
    // No max_read: its default is unlimited, so reads are bounded by the max_pages
    // negotiated in `init`, like writes.
    let data = format!(
        "fd={},rootmode=40000,user_id={},group_id={},default_permissions,subtype={SUBTYPE}",
        dev.as_raw_fd(),
        rustix::process::getuid().as_raw(),
        rustix::process::getgid().as_raw(),
    );
    let data = CString::new(data).map_err(io::Error::other)?;
    let mut flags = MountFlags::NOSUID | MountFlags::NODEV | MountFlags::NOEXEC | MountFlags::NOATIME;
    if config.read_only {
        flags |= MountFlags::RDONLY;
    }
    rustix::mount::mount(config.source.as_str(), mountpoint, "fuse", flags, data.as_c_str())?;
    let guard = MountGuard {
        mountpoint: mountpoint.to_path_buf(),
        armed: true,
    };
    // The kernel queued INIT during mount(2); a failed handshake drops `guard`, detaching
    // the mount that would otherwise hang every access.
    let session = Session::from_fd(fs, OwnedFd::from(dev), SessionACL::Owner, fuse_config)?;
    Ok((session, Some(guard)))
}

/// The same mount through fuser and the fusermount3 helper, for non-root users.
fn fusermount_options(config: &MountConfig) -> Vec<MountOption> {
    vec![
        MountOption::FSName(config.source.clone()),
        // Not MountOption::Subtype, which fuser passes only to fusermount in some versions;
        // fusermount understands `subtype=` as an ordinary option.
        MountOption::CUSTOM(format!("subtype={SUBTYPE}")),
        MountOption::DefaultPermissions,
        MountOption::NoAtime,
        MountOption::NoExec,
        if config.read_only {
            MountOption::RO
        } else {
            MountOption::RW
        },
    ]
}

/// Detaches a mount we made if it is abandoned (mounting failed half-way, or serving ended
/// in an error), so that it does not linger answering "transport endpoint is not connected".
struct MountGuard {
    mountpoint: PathBuf,
    armed: bool,
}

impl MountGuard {
    fn disarm(mut self) {
        self.armed = false;
    }
}

impl Drop for MountGuard {
    fn drop(&mut self) {
        if self.armed {
            // Lazy: a loop device may still hold the file open; it gets I/O errors either way.
            if let Err(e) = rustix::mount::unmount(&self.mountpoint, UnmountFlags::DETACH) {
                tracing::error!(mountpoint = %self.mountpoint.display(), error = %e, "cannot detach abandoned mount");
            }
        }
    }
}

/// Refuses names the kernel would never look up, so the mistake shows at mount time.
fn validate_file_name(name: &std::ffi::OsStr) -> Result<(), FuseError> {
    use std::os::unix::ffi::OsStrExt;
    let bytes = name.as_bytes();
    if bytes.is_empty() || bytes == b"." || bytes == b".." || bytes.contains(&b'/') {
        return Err(FuseError::InvalidFileName(name.to_os_string()));
    }
    if bytes.len() > 255 || bytes.contains(&0) {
        return Err(FuseError::InvalidFileName(name.to_os_string()));
    }
    Ok(())
}

impl<F: BlockFile> Mounted<F> {
    /// The canonical path of the mount point.
    pub fn mountpoint(&self) -> &Path {
        &self.mountpoint
    }

    /// Answers requests until the filesystem is unmounted — by `blockguard umount`,
    /// `fusermount3 -u`, `umount`, or SIGTERM/SIGINT when signals are handled — then flushes
    /// the file and hands it back so that the caller can close it.
    pub fn serve(self) -> Result<Arc<F>, FuseError> {
        let Mounted {
            session,
            guard,
            file,
            mountpoint,
            signals,
        } = self;
        let watcher = match signals {
            Some(signals) => Some(SignalWatcher::start(signals, Arc::clone(&file), mountpoint)?),
            None => None,
        };
        let served = session.run().map_err(FuseError::Session);
        if let Some(watcher) = watcher {
            watcher.stop();
        }
        if served.is_ok() {
            // The loop ends when the kernel drops the connection, i.e. the mount is gone;
            // unmounting the path again could hit a filesystem mounted there since.
            if let Some(guard) = guard {
                guard.disarm();
            }
        }
        // On error the guard detaches the mount, which no one answers any more.
        served?;
        // The kernel has already sent everything it will send; this flush covers writes that
        // were never followed by an fsync or close (for example after `umount -l`).
        if !file.is_read_only() {
            file.flush().map_err(|e| FuseError::Flush(Box::new(e)))?;
        }
        tracing::info!("unmounted; volume flushed");
        Ok(file)
    }
}

/// A thread turning SIGTERM and SIGINT into an unmount.
struct SignalWatcher {
    handle: Handle,
    thread: JoinHandle<()>,
}

impl SignalWatcher {
    fn start<F: BlockFile>(
        mut signals: Signals,
        file: Arc<F>,
        mountpoint: PathBuf,
    ) -> Result<Self, FuseError> {
        let handle = signals.handle();
        let thread = std::thread::Builder::new()
            .name("blockguard-signals".into())
            .spawn(move || {
                for signal in signals.forever() {
                    if signal == SIGHUP {
                        // A daemon outlives the terminal that started it.
                        tracing::info!("SIGHUP ignored");
                        continue;
                    }
                    on_stop_signal(signal, &*file, &mountpoint);
                }
            })
            .map_err(FuseError::Signals)?;
        Ok(Self { handle, thread })
    }

    fn stop(self) {
        self.handle.close();
        if self.thread.join().is_err() {
            tracing::error!("signal thread panicked");
        }
    }
}

/// Flushes first, so that what was written is durable even if the unmount cannot happen,
/// then unmounts; the session loop sees the unmount and returns.
fn on_stop_signal<F: BlockFile>(signal: i32, file: &F, mountpoint: &Path) {
    tracing::info!(signal, "stop signal received: flushing and unmounting");
    if !file.is_read_only() {
        if let Err(e) = file.flush() {
            tracing::error!(error = &e as &dyn std::error::Error, "flush on signal failed");
        }
    }
    match mounts::unmount(mountpoint) {
        Ok(()) => {}
        Err(FuseError::Busy(_)) => tracing::error!(
            mountpoint = %mountpoint.display(),
            "cannot unmount: the file is in use (detach its loop device first); still serving"
        ),
        Err(e) => tracing::error!(
            error = &e as &dyn std::error::Error,
            "unmount on signal failed; still serving"
        ),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn file_names() {
        assert!(validate_file_name("vol.bgv".as_ref()).is_ok());
        for bad in ["", ".", "..", "a/b"] {
            assert!(validate_file_name(bad.as_ref()).is_err(), "{bad:?}");
        }
        assert!(validate_file_name("x".repeat(256).as_ref()).is_err());
    }
}
