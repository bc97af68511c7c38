//! Detaching a server from the terminal without `fork` (which would need unsafe code in a
//! multithreaded process): the CLI re-executes itself in the foreground with piped output,
//! waits for the first line on stdout — printed once the mount is up — and exits; the server
//! then calls [`detach_output`] so that nothing it writes later depends on the pipes of the
//! process that started it.

use std::fs::{File, OpenOptions};
use std::io;
use std::path::Path;

/// Points stdout at `/dev/null` and stderr at `log` (appending; created if missing) or at
/// `/dev/null`.
///
/// Call after the readiness line has been written: once the starting process has exited, a
/// write to its pipes would fail with `EPIPE` (and `eprintln!` panics on that).
pub fn detach_output(log: Option<&Path>) -> io::Result<()> {
    let null = OpenOptions::new().write(true).open("/dev/null")?;
    let err: File = match log {
        Some(path) => OpenOptions::new().create(true).append(true).open(path)?,
        None => null.try_clone()?,
    };
    rustix::stdio::dup2_stdout(&null)?;
    rustix::stdio::dup2_stderr(&err)?;
    Ok(())
}
