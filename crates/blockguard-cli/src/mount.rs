//! `blockguard mount` and `blockguard umount`: a volume exported as one file over FUSE, for
//! `losetup`.
//!
//! Without `--foreground`, `mount` detaches without `fork` (the workspace forbids unsafe code):
//! it re-executes itself in the foreground, in its own process group so that the terminal's
//! Ctrl-C does not reach it, and returns once the child prints the exported file's path — or
//! fails with the child's error if the child exits first.

use std::io::{BufRead, BufReader, Read, Write};
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::Arc;
use std::time::Duration;

use anyhow::{anyhow, bail, Context, Result};
use blockguard_fuse::{DeviceFile, FuseError, MountConfig, DEFAULT_THREADS};
use clap::Args;

use crate::common::open_volume_staged;

// `--threads` defaults to the FUSE crate's `DEFAULT_THREADS`, narrowed to `u16` in the
// attribute below: lossless, and inside the option's range, as long as this holds.
const _: () = assert!(DEFAULT_THREADS >= 1 && DEFAULT_THREADS <= 256);

/// Arguments of `mount`.
#[derive(Args, Debug)]
pub(crate) struct MountArgs {
    /// The volume (file or block device).
    pub(crate) volume: PathBuf,
    /// An existing directory; the volume appears in it as one file with the volume's file name,
    /// whose path is printed once mounted (`losetup -f --show "$(blockguard mount …)"`).
    pub(crate) mountpoint: PathBuf,
    /// Export read-only (the volume is opened read-only too).
    #[arg(long)]
    pub(crate) read_only: bool,
    /// Override the volume's error policy while mounted (what happens when a read finds a
    /// block with no good copy): eio, read-only (suspend writes until `blockguard resume` or
    /// a remount) or continue (log each such block once). See `blockguard format --help`.
    #[arg(long, value_name = "POLICY", value_parser = crate::common::error_policy_parser())]
    pub(crate) error_policy: Option<blockguard::ErrorPolicy>,
    /// Stay attached and serve until unmounted or interrupted (SIGINT/SIGTERM unmount cleanly).
    #[arg(long, short = 'f')]
    pub(crate) foreground: bool,
    /// Threads answering FUSE requests.
    #[arg(long, default_value_t = DEFAULT_THREADS as u16,
          value_parser = clap::value_parser!(u16).range(1..=256))]
    pub(crate) threads: u16,
    /// Where a detached server appends its log (verification failures are logged there with
    /// the block number). Without it, a detached server's messages are discarded; in the
    /// foreground they go to stderr.
    #[arg(long, value_name = "FILE")]
    pub(crate) log_file: Option<PathBuf>,
    #[command(flatten)]
    pub(crate) control: crate::control::ControlArgs,
    /// Internal: set on the re-executed server; detach output once mounted.
    #[arg(long, hide = true)]
    pub(crate) detached: bool,
}

/// Arguments of `umount`.
#[derive(Args, Debug)]
pub(crate) struct UmountArgs {
    /// Where the volume is mounted.
    pub(crate) mountpoint: PathBuf,
    /// Seconds to wait for the server to flush and close the volume after unmounting
    /// (0: do not wait).
    #[arg(long, default_value_t = 60, value_name = "SECONDS")]
    pub(crate) timeout: u64,
}

/// `blockguard mount`.
pub(crate) fn run(args: &MountArgs) -> Result<()> {
    if args.foreground || args.detached {
        serve(args)
    } else {
        spawn_detached(args)
    }
}

/// Opens, mounts, prints the exported file's path, serves until unmounted, then closes.
fn serve(args: &MountArgs) -> Result<()> {
    let file_name = args
        .volume
        .file_name()
        .ok_or_else(|| anyhow!("{} has no file name to export it under", args.volume.display()))?
        .to_owned();
    if !args.mountpoint.is_dir() {
        bail!("mount point {} is not a directory", args.mountpoint.display());
    }
    // Canonical, so that `blockguard umount` can find the volume from the mount table.
    // A remote export is named by its URI.
    let source = if crate::remote::is_remote(&args.volume) {
        args.volume.clone()
    } else {
        args.volume
            .canonicalize()
            .with_context(|| format!("cannot resolve {}", args.volume.display()))?
    };
    let volume = open_volume_staged(&args.volume, args.read_only, None, args.error_policy)?;

    let mut config = MountConfig::new(file_name.clone(), source.to_string_lossy());
    config.read_only = args.read_only;
    config.threads = usize::from(args.threads);
    let volume = Arc::new(volume);
    let file = Arc::new(DeviceFile::new(volume.clone()));
    let mounted = blockguard_fuse::mount(file, &args.mountpoint, &config)
        .with_context(|| format!("cannot mount {}", args.volume.display()))?;

    let exported = mounted.mountpoint().join(&file_name);
    let control = crate::control::start(
        &args.control,
        crate::control::server::Context {
            volume: Arc::clone(&volume),
            path: args.volume.clone(),
            serving: crate::control::server::Serving::Fuse {
                file: exported.clone(),
            },
        },
    );
    let control = match control {
        Ok(c) => c,
        Err(e) => {
            // Not serving after all: unmount before reporting (dropping the mount does).
            drop(mounted);
            return Err(e);
        }
    };
    tracing::info!(volume = %source.display(), file = %exported.display(), "mounted");
    // The readiness signal for a detaching parent, and the path to hand to losetup.
    let mut stdout = std::io::stdout().lock();
    writeln!(stdout, "{}", exported.display()).context("cannot write to stdout")?;
    stdout.flush().context("cannot write to stdout")?;
    drop(stdout);
    if args.detached {
        // Immediately: the parent exits once it has read that line, and from then on
        // whatever goes to its pipes is lost. What was logged so far goes to the parent.
        crate::log::flush(Duration::from_secs(2));
        blockguard_fuse::detach_output(args.log_file.as_deref())
            .context("cannot redirect output after detaching")?;
    }

    let served = mounted.serve().context("serving the FUSE mount failed");
    // Stops a scrub (keeping its position for a resume) and lets go of the volume.
    if let Some(c) = control {
        c.shutdown();
    }
    drop(served?);
    // serve() returns after every worker has stopped and the file is dropped, so this is the
    // last reference.
    let volume = Arc::try_unwrap(volume)
        .map_err(|_| anyhow!("internal error: the volume is still shared after unmounting"))?;
    volume.close().context("closing the volume failed")?;
    tracing::info!(volume = %source.display(), "closed");
    Ok(())
}

/// Starts `blockguard mount … --detached` and waits until it has mounted (or failed).
fn spawn_detached(args: &MountArgs) -> Result<()> {
    // The usual mistakes, reported directly rather than through the child.
    if !args.mountpoint.is_dir() {
        bail!("mount point {} is not a directory", args.mountpoint.display());
    }
    args.volume
        .metadata()
        .with_context(|| format!("cannot open {}", args.volume.display()))?;
    let exe = std::env::current_exe().context("cannot locate the blockguard executable")?;
    let mut cmd = Command::new(exe);
    cmd.arg("mount")
        .arg(&args.volume)
        .arg(&args.mountpoint)
        .arg("--detached")
        .arg("--threads")
        .arg(args.threads.to_string())
        .args(args.control.to_args());
    if args.read_only {
        cmd.arg("--read-only");
    }
    if let Some(p) = args.error_policy {
        cmd.arg("--error-policy").arg(p.name());
    }
    if let Some(log) = &args.log_file {
        // The child inherits our working directory, so a relative path names the same file.
        cmd.arg("--log-file").arg(log);
    }
    // The server's log goes to a pipe, then to a file or nowhere: never a terminal, so
    // no colour escapes (tracing-subscriber honours NO_COLOR).
    cmd.env("NO_COLOR", "1");
    cmd.stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        // Out of the terminal's foreground process group: Ctrl-C in the shell that ran
        // `blockguard mount` must not kill the server.
        .process_group(0);
    let mut child = cmd.spawn().context("cannot start the mount server")?;

    // Drain stderr on a thread: a chatty child must not block on a full pipe while we wait
    // for its stdout.
    let stderr = child.stderr.take();
    let collector = std::thread::spawn(move || {
        let mut text = String::new();
        if let Some(mut e) = stderr {
            let _ = e.read_to_string(&mut text);
        }
        text
    });
    let stdout = child.stdout.take().ok_or_else(|| anyhow!("no stdout pipe"))?;
    let mut line = String::new();
    BufReader::new(stdout)
        .read_line(&mut line)
        .context("cannot read from the mount server")?;
    let mounted = line.ends_with('\n');
    if !mounted {
        // The server exited (or closed stdout) before mounting; its stderr says why. Relay
        // that as our own error rather than adding a second, vaguer one.
        let status = child.wait().context("cannot wait for the mount server")?;
        let text = collector.join().unwrap_or_default();
        let (before, error) = split_error(&text);
        crate::log::raw(before);
        match error {
            Some(error) => bail!("{error}"),
            None => bail!("the mount server exited before mounting ({status})"),
        }
    }
    // Mounted. The server now points its output elsewhere, which ends the stderr pipe: relay
    // what it said while starting (volume warnings, for instance).
    crate::log::raw(&collector.join().unwrap_or_default());
    print!("{line}");
    std::io::stdout().flush().context("cannot write to stdout")?;
    Ok(())
}

/// Splits a failed server's stderr into what came before its final `blockguard: error: …`
/// line, and that error's message.
fn split_error(stderr: &str) -> (&str, Option<&str>) {
    const PREFIX: &str = "blockguard: error: ";
    match stderr.rfind(PREFIX) {
        Some(at) if at == 0 || stderr[..at].ends_with('\n') => {
            (&stderr[..at], Some(stderr[at + PREFIX.len()..].trim_end()))
        }
        _ => (stderr, None),
    }
}

/// `blockguard umount`.
pub(crate) fn run_umount(args: &UmountArgs) -> Result<()> {
    let entry = blockguard_fuse::find_mount(&args.mountpoint)?
        .ok_or_else(|| FuseError::NotMounted(args.mountpoint.clone()))?;
    if !entry.is_blockguard() {
        return Err(FuseError::NotBlockguard {
            mountpoint: entry.mountpoint,
            fstype: entry.fstype,
        }
        .into());
    }
    blockguard_fuse::unmount(&entry.mountpoint)?;
    if args.timeout > 0 {
        // The server flushes and closes after the kernel lets go; wait for that, so that the
        // volume is usable (check, remount, serve) as soon as we return.
        wait_for_server(&entry.source, Duration::from_secs(args.timeout))?;
    }
    Ok(())
}

fn wait_for_server(volume: &Path, timeout: Duration) -> Result<()> {
    if !blockguard_fuse::wait_released(volume, timeout)? {
        crate::log::line(&format!(
            "blockguard: warning: cannot open {} to wait for its server to close it",
            volume.display()
        ));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::split_error;

    #[test]
    fn a_failed_server_error_is_relayed_once() {
        let text = "warning: x\nblockguard: error: vol.bgv: the volume is in use\n";
        assert_eq!(
            split_error(text),
            ("warning: x\n", Some("vol.bgv: the volume is in use"))
        );
        assert_eq!(split_error("panicked\n"), ("panicked\n", None));
        assert_eq!(split_error(""), ("", None));
    }
}
