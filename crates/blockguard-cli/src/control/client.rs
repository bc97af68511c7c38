//! The client end: connecting to a control socket, and deciding how `status` and `scrub` reach
//! a volume — through the socket of the process serving it, or by opening it directly.
//!
//! Whom a client believes: a socket file owned, and a server running (`SO_PEERCRED`), as the
//! client's own user, root, or the owner of the volume (who can change the volume anyway).
//! Anyone else may have planted the socket next to a volume in a shared directory to fake
//! its status or a clean scrub: such a socket is ignored with a warning (an error when named
//! with `--control`). How long it waits: a few seconds for the answers that every server gives
//! at once (status, the copies), longer only for requests that take long themselves, and
//! never past a Ctrl-C of a command that watches for it (`scrub`).

use super::proto::{Request, Response, StatusInfo};
use crate::holder::holders;
use crate::interrupt::caught;
use anyhow::{anyhow, bail, Context, Result};
use blockguard::blockguard_backend::OpenError;
use blockguard::Volume;
use std::io::{self, BufRead, BufReader, Read, Write};
use std::os::fd::AsFd;
use std::os::unix::fs::MetadataExt;
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

/// Longest reply line a client accepts: a status or report lists at most about a thousand
/// problems, far below this.
const MAX_REPLY_LINE: u64 = 64 << 20;

/// How long [`Client::call`] waits for a reply to a request that may take long: longer than a
/// server's `scrub-stop` waits for its scrub (30 s).
const CALL_TIMEOUT: Duration = Duration::from_secs(45);

/// How long [`Client::ask`] waits for a reply a server gives at once (`status`,
/// `mirror-list`): past it, the server is stopped or hung.
pub(crate) const ANSWER_TIMEOUT: Duration = Duration::from_secs(5);

/// How often a wait looks for a Ctrl-C.
const WAIT_SLICE: Duration = Duration::from_millis(200);

/// A connection to a control server.
pub(crate) struct Client {
    socket: PathBuf,
    reader: BufReader<UnixStream>,
    writer: UnixStream,
    /// A reply line read in part before a read timed out.
    partial: Vec<u8>,
    /// The server's process id, from its credentials.
    pid: Option<u32>,
}

/// The users whose control servers and scrub state files a client believes about a volume:
/// its own, root, and the volume's owner.
#[derive(Clone, Copy, Debug)]
pub(crate) struct Trust {
    me: u32,
    owner: Option<u32>,
}

impl Trust {
    /// Whom to believe about `volume`.
    pub(crate) fn for_volume(volume: &Path) -> Trust {
        Trust {
            me: rustix::process::geteuid().as_raw(),
            owner: std::fs::metadata(volume).ok().map(|m| m.uid()),
        }
    }

    /// True if user `uid` is believed.
    pub(crate) fn trusts(self, uid: u32) -> bool {
        uid == self.me || uid == 0 || Some(uid) == self.owner
    }

    /// The users believed, for messages.
    pub(crate) fn who(self) -> String {
        match self.owner {
            Some(o) if o != self.me && o != 0 => {
                format!("you (user {}), root or the volume's owner (user {o})", self.me)
            }
            _ => format!("you (user {}) or root", self.me),
        }
    }
}

/// How `status` and `scrub` reach the volume.
pub(crate) enum Access {
    /// Through the control socket of the process that serves it, with the status it reported
    /// on connecting.
    Socket(Client, Box<StatusInfo>),
    /// Opened directly: nobody else holds it.
    Direct(Volume),
}

/// Connects to `socket`; `None` if nobody answers there (no such file, or a stale socket),
/// or if the socket or its server belongs to a user `trust` does not believe (with a warning;
/// an error when the socket was named explicitly, `explicit`).
pub(crate) fn connect(socket: &Path, trust: Trust, explicit: bool) -> Result<Option<Client>> {
    let untrusted = |why: String| -> Result<Option<Client>> {
        let why = format!("{why}, not {}", trust.who());
        if explicit {
            bail!("{why}: not believing it");
        }
        crate::log::line(&format!(
            "blockguard: warning: {why}: ignoring it (it may be there to fake the volume's status)"
        ));
        Ok(None)
    };
    match std::fs::metadata(socket) {
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(None),
        Err(e) => {
            return Err(e).with_context(|| format!("cannot access the control socket {}", socket.display()))
        }
        Ok(m) if !trust.trusts(m.uid()) => {
            return untrusted(format!(
                "the control socket {} is owned by user {}",
                socket.display(),
                m.uid()
            ))
        }
        Ok(_) => {}
    }
    let stream = match UnixStream::connect(socket) {
        Ok(s) => s,
        Err(e)
            if matches!(
                e.kind(),
                io::ErrorKind::NotFound | io::ErrorKind::ConnectionRefused
            ) =>
        {
            return Ok(None)
        }
        Err(e) => {
            return Err(e)
                .with_context(|| format!("cannot connect to the control socket {}", socket.display()))
        }
    };
    let cred = rustix::net::sockopt::socket_peercred(stream.as_fd())
        .with_context(|| format!("cannot tell who serves the control socket {}", socket.display()))?;
    let pid = cred.pid.as_raw_nonzero().get().unsigned_abs();
    if !trust.trusts(cred.uid.as_raw()) {
        return untrusted(format!(
            "the server on the control socket {} runs as user {} (pid {pid})",
            socket.display(),
            cred.uid.as_raw()
        ));
    }
    let writer = stream
        .try_clone()
        .with_context(|| format!("cannot use the control socket {}", socket.display()))?;
    Ok(Some(Client {
        socket: socket.to_path_buf(),
        reader: BufReader::new(stream),
        writer,
        partial: Vec::new(),
        pid: Some(pid),
    }))
}

/// Reaches `volume`: through its control socket (`control`, or the default one) when a server
/// answers there, else by opening it (`read_only`). A volume another process holds without a
/// control socket is an error naming that process.
pub(crate) fn reach(volume: &Path, control: Option<&Path>, read_only: bool) -> Result<Access> {
    let sockets = sockets_of(volume, control);
    let trust = Trust::for_volume(volume);
    for socket in &sockets {
        if let Some(mut client) = connect(socket, trust, control.is_some())? {
            let status = same_volume(&mut client, volume)?;
            return Ok(Access::Socket(client, status));
        }
    }
    let socket = sockets.into_iter().next();
    match crate::common::open_volume(volume, read_only) {
        Ok(v) => Ok(Access::Direct(v)),
        Err(e) if is_locked(&e) => Err(busy(volume, socket.as_deref(), control.is_some(), e)),
        Err(e) => Err(e),
    }
}

/// The control sockets to try for `volume`: `control` alone when given; else the default
/// socket of `volume`, then those of the other copies of its mirror set (a set served through
/// one copy's path is reached through any other's). (The default socket is named after the
/// volume's canonical path; a volume that cannot be resolved fails in the open that follows
/// with a clearer message.)
fn sockets_of(volume: &Path, control: Option<&Path>) -> Vec<PathBuf> {
    if let Some(p) = control {
        return vec![p.to_path_buf()];
    }
    let mut out: Vec<PathBuf> = crate::sidecar::control_socket(volume).ok().into_iter().collect();
    for r in crate::common::records_of(volume) {
        if let Ok(s) = crate::sidecar::control_socket(Path::new(&r.path)) {
            if !out.contains(&s) {
                out.push(s);
            }
        }
    }
    out
}

/// A client of the server serving `volume`, if one answers on its control socket (checked to
/// serve that very volume); `None` if nobody answers there.
pub(crate) fn connect_to(volume: &Path, control: Option<&Path>) -> Result<Option<Client>> {
    let trust = Trust::for_volume(volume);
    for socket in sockets_of(volume, control) {
        if let Some(mut client) = connect(&socket, trust, control.is_some())? {
            same_volume(&mut client, volume)?;
            return Ok(Some(client));
        }
    }
    Ok(None)
}

/// Makes sure the server on `client` serves `volume`: a `--control` path mixed up between two
/// volumes must not scrub or report the wrong one.
fn same_volume(client: &mut Client, volume: &Path) -> Result<Box<StatusInfo>> {
    let Response::Status(status) = client.ask(&Request::Status)? else {
        bail!("{}: unexpected reply to status", client.socket.display());
    };
    // A remote export has no canonical local path: it is compared by address and export.
    let wanted = if crate::remote::is_remote(volume) {
        volume.to_path_buf()
    } else {
        volume
            .canonicalize()
            .with_context(|| format!("cannot resolve {}", volume.display()))?
    };
    // A mirror set answers for each of its copies.
    let serves = |p: &str| {
        Path::new(p) == wanted
            || crate::remote::same_remote(Path::new(p), &wanted)
            || crate::target::same_data(Path::new(p), &wanted).unwrap_or(false)
    };
    if !serves(&status.path) && !status.copies.iter().any(|c| serves(&c.path)) {
        bail!(
            "the server on the control socket {} serves {}, not {}",
            client.socket.display(),
            status.path,
            wanted.display()
        );
    }
    Ok(status)
}

/// True if opening failed because another process holds the volume's lock.
fn is_locked(e: &anyhow::Error) -> bool {
    e.chain()
        .any(|c| matches!(c.downcast_ref::<OpenError>(), Some(OpenError::Locked { .. })))
}

/// The error for a volume in use that answers on no control socket: who holds it, and what to
/// do.
fn busy(volume: &Path, socket: Option<&Path>, explicit: bool, cause: anyhow::Error) -> anyhow::Error {
    let who = match holders(volume).as_slice() {
        [] => "another process (not found in /proc/locks or /proc/*/fd: it may belong to another \
               user or PID namespace)"
            .to_string(),
        found => found
            .iter()
            .map(ToString::to_string)
            .collect::<Vec<_>>()
            .join(", "),
    };
    let socket = socket.map_or_else(|| "(none)".to_string(), |s| s.display().to_string());
    let hint = if explicit {
        "check the --control path"
    } else {
        "if it was started with --control PATH, pass the same --control PATH; with --no-control, \
         stop it first"
    };
    cause.context(format!(
        "{} is in use by {who}, and no server answers on its control socket {socket}: {hint}",
        volume.display()
    ))
}

impl Client {
    /// The control socket it is connected to.
    pub(crate) fn socket(&self) -> &Path {
        &self.socket
    }

    /// The server's process id.
    pub(crate) fn pid(&self) -> Option<u32> {
        self.pid
    }

    /// Sends one request.
    pub(crate) fn send(&mut self, request: &Request) -> Result<()> {
        let mut line = serde_json::to_vec(request)?;
        line.push(b'\n');
        if let Err(e) = self.writer.write_all(&line) {
            // A server that refuses a client (another user, too many clients) says why and
            // closes at once: that reason beats "broken pipe".
            if let Ok(Some(Response::Error { message, .. })) = self.recv_timeout(Duration::from_millis(500)) {
                bail!("{}: {message}", self.socket.display());
            }
            return Err(e)
                .with_context(|| format!("cannot write to the control socket {}", self.socket.display()));
        }
        Ok(())
    }

    /// Reads the next reply, waiting at most [`CALL_TIMEOUT`] (a server that accepts but never
    /// answers must not hang the command).
    pub(crate) fn recv(&mut self) -> Result<Response> {
        self.recv_for(CALL_TIMEOUT)
    }

    /// Reads the next reply, waiting at most `timeout`, in slices: a Ctrl-C of a command that
    /// watches for it ([`crate::interrupt::Signals::watch`]) ends the wait.
    pub(crate) fn recv_for(&mut self, timeout: Duration) -> Result<Response> {
        let deadline = Instant::now() + timeout;
        loop {
            if let Some(signal) = caught() {
                return Err(signal.into());
            }
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                return Err(self.silent(timeout));
            }
            if let Some(reply) = self.recv_timeout(left.min(WAIT_SLICE))? {
                return Ok(reply);
            }
        }
    }

    /// The error for a server that did not answer within `timeout`.
    fn silent(&self, timeout: Duration) -> anyhow::Error {
        let who = self.pid.map_or_else(String::new, |p| format!(" (pid {p})"));
        let hint = self.pid.map_or_else(String::new, |p| {
            format!(" (`kill -CONT {p}` resumes a stopped process)")
        });
        anyhow!(
            "the server on the control socket {}{who} does not answer within {} s: is it stopped \
             or hung?{hint}",
            self.socket.display(),
            timeout.as_secs()
        )
    }

    /// Reads the next reply, or `None` if none is complete within `timeout`.
    pub(crate) fn recv_timeout(&mut self, timeout: Duration) -> Result<Option<Response>> {
        self.reader
            .get_ref()
            .set_read_timeout(Some(timeout))
            .context("cannot set a timeout on the control socket")?;
        self.recv_within()
    }

    /// Sends `request` and reads its reply, waiting as long as a long request may take; an
    /// error reply becomes an error.
    pub(crate) fn call(&mut self, request: &Request) -> Result<Response> {
        self.call_within(request, CALL_TIMEOUT)
    }

    /// [`Client::call`] for a request every server answers at once: waits at most
    /// [`ANSWER_TIMEOUT`].
    pub(crate) fn ask(&mut self, request: &Request) -> Result<Response> {
        self.call_within(request, ANSWER_TIMEOUT)
    }

    fn call_within(&mut self, request: &Request, timeout: Duration) -> Result<Response> {
        self.send(request)?;
        match self.recv_for(timeout)? {
            Response::Error { message, .. } => bail!("{}: {message}", self.socket.display()),
            reply => Ok(reply),
        }
    }

    fn recv_within(&mut self) -> Result<Option<Response>> {
        let room = MAX_REPLY_LINE.saturating_sub(self.partial.len() as u64);
        let read = self
            .reader
            .by_ref()
            .take(room)
            .read_until(b'\n', &mut self.partial);
        match read {
            Ok(_) => {}
            Err(e) if matches!(e.kind(), io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut) => {
                return Ok(None);
            }
            Err(e) => {
                return Err(e).with_context(|| {
                    format!("cannot read from the control socket {}", self.socket.display())
                })
            }
        }
        if self.partial.last() != Some(&b'\n') {
            if self.partial.len() as u64 >= MAX_REPLY_LINE {
                bail!(
                    "{}: a reply longer than {MAX_REPLY_LINE} bytes",
                    self.socket.display()
                );
            }
            bail!(
                "the server on {} closed the connection{}",
                self.socket.display(),
                if self.partial.is_empty() {
                    ""
                } else {
                    " in the middle of a reply"
                }
            );
        }
        let line = std::mem::take(&mut self.partial);
        serde_json::from_slice(&line).map(Some).with_context(|| {
            format!(
                "a reply from {} that this client does not understand",
                self.socket.display()
            )
        })
    }
}
