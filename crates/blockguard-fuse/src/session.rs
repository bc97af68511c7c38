//! Mounting, serving until unmounted, and shutting down on signals.

use std::ffi::OsString;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::thread::JoinHandle;

use fuser::{Config, MountOption, Session};
use signal_hook::consts::{SIGHUP, SIGINT, SIGTERM};
use signal_hook::iterator::{Handle, Signals};

use crate::file::BlockFile;
use crate::fs::BlockFs;
use crate::mounts;
use crate::FuseError;

/// The filesystem type shown by `mount` and `/proc/self/mountinfo` is `fuse.<SUBTYPE>`;
/// `blockguard umount` uses it to recognise its own mounts.
pub const SUBTYPE: &str = "blockguard";

/// Default number of request-handling threads. Requests block on disk I/O rather than on the
/// CPU, so a few more threads than cores keep the disk busy; each costs one request buffer.
pub const DEFAULT_THREADS: usize = 4;

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

    let mut options = vec![
        MountOption::FSName(config.source.clone()),
        MountOption::Subtype(SUBTYPE.to_owned()),
        // Let the kernel check permissions against the attributes we report, so that the
        // 0444 mode of a read-only export is enforced before a request reaches us.
        MountOption::DefaultPermissions,
        MountOption::NoAtime,
        MountOption::NoExec,
    ];
    options.push(if config.read_only {
        MountOption::RO
    } else {
        MountOption::RW
    });
    // No max_read option: its default is unlimited, so reads are bounded only by the
    // max_pages negotiated in `init`, the same as writes.
    let mut fuse_config = Config::default();
    fuse_config.mount_options = options;
    fuse_config.n_threads = Some(config.threads.max(1));
    // One /dev/fuse descriptor per worker thread: the kernel then queues requests per
    // descriptor instead of waking every thread for each request.
    fuse_config.clone_fd = true;

    let session = Session::new(fs, mountpoint, &fuse_config).map_err(|source| FuseError::Mount {
        mountpoint: mountpoint.to_path_buf(),
        source,
    })?;
    let mountpoint = mountpoint
        .canonicalize()
        .unwrap_or_else(|_| mountpoint.to_path_buf());
    Ok(Mounted {
        session,
        file,
        mountpoint,
        signals,
    })
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
            tracing::error!(error = %e, "flush on signal failed");
        }
    }
    match mounts::unmount(mountpoint) {
        Ok(()) => {}
        Err(FuseError::Busy(_)) => tracing::error!(
            mountpoint = %mountpoint.display(),
            "cannot unmount: the file is in use (detach its loop device first); still serving"
        ),
        Err(e) => tracing::error!(error = %e, "unmount on signal failed; still serving"),
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
