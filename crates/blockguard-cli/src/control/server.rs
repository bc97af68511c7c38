//! The control server: a Unix socket that `serve` and `mount` listen on next to their NBD or
//! FUSE work, answering `status` and running scrubs for `blockguard status` and `scrub`.
//!
//! Who may connect: the socket file is mode 0600, and every connection's peer credentials
//! (`SO_PEERCRED`) must name the server's own user or root — the file mode alone would let a
//! connection slip in between `bind` and `chmod`, and does not hold on filesystems that ignore
//! modes. What a client can do to the server: at most [`MAX_CLIENTS`] connections at once
//! (more are told so and closed), request lines of at most `MAX_REQUEST_LINE` bytes (a longer
//! one closes the connection), [`IDLE_TIMEOUT`] between requests and [`WRITE_TIMEOUT`] per
//! reply write; anything malformed gets an error reply, never a panic.

use super::proto::{
    error, parse_request, ErrorKind, Request, Response, RetagRequest, ServerInfo, StatusInfo,
    MAX_REQUEST_LINE, PROTOCOL_VERSION,
};
use super::scrubber::Scrubber;
use anyhow::{bail, Context as _, Result};
use blockguard::Volume;
use blockguard_nbd::ConnectionStats;
use std::io::{self, BufRead, BufReader, Read, Write};
use std::net::Shutdown;
use std::os::fd::AsFd;
use std::os::unix::fs::{FileTypeExt, MetadataExt, PermissionsExt};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

/// Control connections served at once.
pub(crate) const MAX_CLIENTS: usize = 16;

/// A connection that sends no request for this long is closed.
// A minute in seconds: `Duration::from_mins` needs Rust 1.91, the workspace targets 1.85.
#[allow(clippy::duration_suboptimal_units)]
pub(crate) const IDLE_TIMEOUT: Duration = Duration::from_secs(60);

/// A reply write that makes no progress for this long closes the connection.
pub(crate) const WRITE_TIMEOUT: Duration = Duration::from_secs(10);

/// Progress lines of a followed resync are at least this far apart.
const PROGRESS_EVERY: Duration = Duration::from_millis(200);

/// How often the accept loop looks at the stop flag.
const ACCEPT_TICK: Duration = Duration::from_millis(100);

/// What the volume is being served as, for `status`.
pub(crate) enum Serving {
    /// `blockguard serve`: the NBD address and the server's connection counts.
    Nbd {
        /// Where it listens.
        listen: String,
        /// Its connections.
        connections: ConnectionStats,
    },
    /// `blockguard mount`: the file the FUSE mount exports.
    Fuse {
        /// The exported file.
        file: PathBuf,
    },
}

/// Everything the control server answers about.
pub(crate) struct Context {
    /// The volume being served.
    pub(crate) volume: Arc<Volume>,
    /// Its path as given.
    pub(crate) path: PathBuf,
    /// How it is served.
    pub(crate) serving: Serving,
}

/// A running control server; [`ControlServer::shutdown`] stops it.
pub(crate) struct ControlServer {
    shared: Arc<Shared>,
    accept: Option<JoinHandle<()>>,
}

struct Shared {
    ctx: Context,
    socket: PathBuf,
    /// Device and inode of the socket file we bound, so that shutdown removes only ours.
    socket_id: (u64, u64),
    scrubber: Arc<Scrubber>,
    stopping: AtomicBool,
    started: Instant,
    next_id: AtomicU64,
    clients: Mutex<Clients>,
}

#[derive(Default)]
struct Clients {
    /// The streams of open connections, to cut them off at shutdown.
    streams: std::collections::HashMap<u64, UnixStream>,
    threads: Vec<JoinHandle<()>>,
}

fn lock(m: &Mutex<Clients>) -> MutexGuard<'_, Clients> {
    m.lock().unwrap_or_else(PoisonError::into_inner)
}

impl ControlServer {
    /// Binds `socket` (replacing a stale one; refusing one another server answers on) and
    /// starts answering on it.
    pub(crate) fn start(socket: &Path, ctx: Context) -> Result<ControlServer> {
        crate::sidecar::make_parent(socket)?;
        let listener = bind(socket)?;
        let meta = std::fs::metadata(socket).with_context(|| format!("cannot stat {}", socket.display()))?;
        let scrubber = Arc::new(Scrubber::new(Arc::clone(&ctx.volume), ctx.path.clone()));
        let shared = Arc::new(Shared {
            ctx,
            socket: socket.to_path_buf(),
            socket_id: (meta.dev(), meta.ino()),
            scrubber,
            stopping: AtomicBool::new(false),
            started: Instant::now(),
            next_id: AtomicU64::new(1),
            clients: Mutex::new(Clients::default()),
        });
        let s = Arc::clone(&shared);
        let accept = std::thread::Builder::new()
            .name("control-accept".into())
            .spawn(move || s.accept_loop(&listener))
            .context("cannot start the control server thread")?;
        tracing::info!(socket = %socket.display(), "control socket ready");
        Ok(ControlServer {
            shared,
            accept: Some(accept),
        })
    }

    /// Stops the scrub (saving where it was), closes every control connection, waits for
    /// their threads, and removes the socket file: afterwards nothing of the control server
    /// holds the volume.
    pub(crate) fn shutdown(mut self) {
        self.stop();
    }

    fn stop(&mut self) {
        let Some(accept) = self.accept.take() else {
            return;
        };
        let shared = &self.shared;
        shared.stopping.store(true, Ordering::SeqCst);
        shared.scrubber.shutdown();
        let _ = accept.join();
        let threads = {
            let mut clients = lock(&shared.clients);
            for s in clients.streams.values() {
                let _ = s.shutdown(Shutdown::Both);
            }
            std::mem::take(&mut clients.threads)
        };
        for t in threads {
            let _ = t.join();
        }
        // Remove the file only if it is still the one we bound (not one a successor made).
        if std::fs::metadata(&shared.socket).is_ok_and(|m| (m.dev(), m.ino()) == shared.socket_id) {
            let _ = std::fs::remove_file(&shared.socket);
        }
    }
}

impl Drop for ControlServer {
    fn drop(&mut self) {
        self.stop();
    }
}

/// Binds the socket: a stale socket file (nobody answers) is replaced, a live one is refused,
/// and anything that is not a socket is left alone.
fn bind(socket: &Path) -> Result<UnixListener> {
    if let Ok(meta) = std::fs::symlink_metadata(socket) {
        if !meta.file_type().is_socket() {
            bail!(
                "{} exists and is not a socket: not replacing it with the control socket \
                 (choose another path with --control PATH, or --no-control)",
                socket.display()
            );
        }
        if UnixStream::connect(socket).is_ok() {
            bail!(
                "another server answers on the control socket {}: is the volume served \
                 already? (choose another path with --control PATH, or --no-control)",
                socket.display()
            );
        }
        std::fs::remove_file(socket)
            .with_context(|| format!("cannot remove the stale control socket {}", socket.display()))?;
    }
    let listener = UnixListener::bind(socket).with_context(|| {
        format!(
            "cannot create the control socket {} (choose another path with --control PATH, or --no-control)",
            socket.display()
        )
    })?;
    let restrict = std::fs::set_permissions(socket, std::fs::Permissions::from_mode(0o600));
    if let Err(e) = restrict {
        let _ = std::fs::remove_file(socket);
        return Err(e).with_context(|| format!("cannot restrict {} to its owner", socket.display()));
    }
    listener
        .set_nonblocking(true)
        .context("cannot make the control socket non-blocking")?;
    Ok(listener)
}

/// True if a peer of user `peer` may use a server running as `me`: the same user, or root.
fn allowed(peer: u32, me: u32) -> bool {
    peer == me || peer == 0
}

impl Shared {
    fn accept_loop(self: &Arc<Self>, listener: &UnixListener) {
        while !self.stopping.load(Ordering::SeqCst) {
            if !readable(listener, ACCEPT_TICK) {
                continue;
            }
            match listener.accept() {
                Ok((stream, _)) => self.admit(stream),
                Err(e) if e.kind() == io::ErrorKind::WouldBlock || e.kind() == io::ErrorKind::Interrupted => {
                }
                Err(e) => {
                    // Out of descriptors or the like: wait a tick rather than spin.
                    tracing::warn!("control socket: accept failed: {e}");
                    std::thread::sleep(ACCEPT_TICK);
                }
            }
        }
    }

    /// Checks the peer and the number of clients, then serves the connection on a thread.
    fn admit(self: &Arc<Self>, mut stream: UnixStream) {
        // Accepted sockets do not inherit the listener's O_NONBLOCK on Linux; make sure.
        let setup = stream
            .set_nonblocking(false)
            .and_then(|()| stream.set_write_timeout(Some(WRITE_TIMEOUT)))
            .and_then(|()| stream.set_read_timeout(Some(IDLE_TIMEOUT)));
        if setup.is_err() {
            return;
        }
        let me = rustix::process::geteuid().as_raw();
        match rustix::net::sockopt::socket_peercred(stream.as_fd()) {
            Ok(cred) if allowed(cred.uid.as_raw(), me) => {}
            Ok(cred) => {
                tracing::warn!(
                    uid = cred.uid.as_raw(),
                    pid = cred.pid.as_raw_nonzero().get(),
                    "control socket: refused a connection of another user"
                );
                refuse(
                    &mut stream,
                    ErrorKind::PermissionDenied,
                    format!("only user {me} (the server's) and root may use this control socket"),
                );
                return;
            }
            Err(e) => {
                tracing::warn!("control socket: cannot identify a peer ({e}): refused");
                return;
            }
        }
        let id = self.next_id.fetch_add(1, Ordering::Relaxed);
        let mut clients = lock(&self.clients);
        clients.threads.retain(|t| !t.is_finished());
        if clients.streams.len() >= MAX_CLIENTS {
            drop(clients);
            refuse(
                &mut stream,
                ErrorKind::TooManyClients,
                format!("{MAX_CLIENTS} control clients are connected already; try again later"),
            );
            return;
        }
        let Ok(copy) = stream.try_clone() else {
            return;
        };
        let me = Arc::clone(self);
        let spawned = std::thread::Builder::new()
            .name(format!("control-{id}"))
            .spawn(move || {
                me.serve_client(stream);
                lock(&me.clients).streams.remove(&id);
            });
        match spawned {
            Ok(t) => {
                clients.streams.insert(id, copy);
                clients.threads.push(t);
            }
            Err(e) => tracing::warn!("control socket: cannot start a client thread: {e}"),
        }
    }

    /// Answers requests until the client hangs up, idles too long, or misbehaves.
    fn serve_client(&self, stream: UnixStream) {
        let Ok(mut out) = stream.try_clone() else {
            return;
        };
        let mut reader = BufReader::new(stream);
        let mut line = Vec::new();
        loop {
            line.clear();
            match read_line(&mut reader, &mut line) {
                Ok(Line::Eof) | Err(_) => return,
                Ok(Line::TooLong) => {
                    let message = format!("request line longer than {MAX_REQUEST_LINE} bytes: closing");
                    let _ = send(&mut out, &error(ErrorKind::TooLong, message));
                    return;
                }
                Ok(Line::Complete) => {}
            }
            if line.iter().all(u8::is_ascii_whitespace) {
                continue;
            }
            if self.stopping.load(Ordering::SeqCst) {
                let _ = send(
                    &mut out,
                    &error(ErrorKind::ShuttingDown, "the server is shutting down".into()),
                );
                return;
            }
            let request = match parse_request(&line) {
                Ok(r) => r,
                Err(reply) => {
                    if send(&mut out, &reply).is_err() {
                        return;
                    }
                    continue;
                }
            };
            if self.answer(&request, &mut out).is_err() {
                return;
            }
        }
    }

    fn answer(&self, request: &Request, out: &mut UnixStream) -> io::Result<()> {
        match request {
            Request::Status => send(out, &Response::Status(Box::new(self.status()))),
            Request::ScrubStatus => send(out, &Response::ScrubStatus(Box::new(self.scrubber.state()))),
            Request::ScrubStop => send(out, &self.scrubber.stop()),
            Request::MirrorList => send(
                out,
                &Response::MirrorList {
                    copies: crate::status::copy_infos(&self.ctx.volume),
                },
            ),
            Request::MirrorResync(req) => self.resync(req.follow, out),
            Request::Resume => send(out, &self.resume()),
            Request::Retag(req) => self.retag(req, out),
            Request::Scrub(req) => match self.scrubber.start(req) {
                Err(reply) => send(out, &reply),
                Ok(started) => {
                    send(out, &started.reply)?;
                    if req.follow {
                        self.scrubber.follow(started.id, &mut |r| send(out, r))?;
                    }
                    Ok(())
                }
            },
        }
    }

    /// Runs a resync on this connection's thread, clients going on meanwhile; stopped (the
    /// copies staying out of sync) when the server shuts down. Progress lines are best effort:
    /// a client that goes away does not stop the resync.
    fn resync(&self, follow: bool, out: &mut UnixStream) -> io::Result<()> {
        let vol = &self.ctx.volume;
        if vol.is_read_only() {
            return send(
                out,
                &error(
                    ErrorKind::Refused,
                    "the volume is served read-only: a resync writes".into(),
                ),
            );
        }
        let mut last = Instant::now();
        let mut gone = false;
        let result = vol.resync_until(
            &mut |done, total| {
                if follow && !gone && (last.elapsed() >= PROGRESS_EVERY || done == 0) {
                    last = Instant::now();
                    gone = send(out, &Response::MirrorResyncProgress { done, total }).is_err();
                }
            },
            &self.stopping,
        );
        let reply = match result {
            Ok(report) => Response::MirrorResyncDone {
                report: serde_json::to_value(&report).unwrap_or_default(),
            },
            Err(e @ blockguard::Error::Busy { .. }) => error(ErrorKind::Busy, e.to_string()),
            Err(e @ blockguard::Error::Stopped { .. }) => error(ErrorKind::ShuttingDown, e.to_string()),
            Err(e) => error(ErrorKind::Failed, e.describe()),
        };
        if let Response::Error { message, .. } = &reply {
            tracing::error!(volume = %vol.name(), "resync through the control socket: {message}");
        }
        send(out, &reply)
    }

    /// Runs a re-tag on this connection's thread, clients going on meanwhile; stopped
    /// (resumably: the engine keeps its cursor) when the client goes away or the server shuts
    /// down.
    fn retag(&self, req: &RetagRequest, out: &mut UnixStream) -> io::Result<()> {
        let vol = &self.ctx.volume;
        let Some(profile) = blockguard::Profile::from_name(&req.profile) else {
            return send(
                out,
                &error(
                    ErrorKind::BadRequest,
                    format!("unknown tag profile {:?}", req.profile),
                ),
            );
        };
        let key = match req.key.as_deref().map(parse_key).transpose() {
            Ok(k) => k,
            Err(why) => return send(out, &error(ErrorKind::BadRequest, why)),
        };
        let stop = AtomicBool::new(false);
        let mut last = Instant::now();
        let mut gone = false;
        let opts = blockguard::RetagOptions {
            key: key.as_ref(),
            stop: Some(&stop),
            rate: req.rate,
            ..blockguard::RetagOptions::new(profile)
        };
        let result = vol.retag(&opts, &mut |done, total| {
            if !gone && (last.elapsed() >= PROGRESS_EVERY || done == 0 || done == total) {
                last = Instant::now();
                gone = send(out, &Response::RetagProgress { done, total }).is_err();
            }
            if gone || self.stopping.load(Ordering::SeqCst) {
                stop.store(true, Ordering::SeqCst);
            }
        });
        let reply = match result {
            Ok(report) => {
                tracing::info!(volume = %vol.name(), ?report, "re-tag through the control socket");
                Response::RetagDone {
                    report: serde_json::to_value(&report).unwrap_or_default(),
                }
            }
            Err(e @ blockguard::Error::Busy { .. }) => error(ErrorKind::Busy, e.to_string()),
            Err(
                e @ (blockguard::Error::Key { .. }
                | blockguard::Error::InvalidArgument { .. }
                | blockguard::Error::Unsupported { .. }
                | blockguard::Error::ReadOnly { .. }),
            ) => error(ErrorKind::Refused, e.to_string()),
            Err(e) => error(ErrorKind::Failed, e.describe()),
        };
        if let Response::Error { message, .. } = &reply {
            tracing::error!(volume = %vol.name(), "re-tag through the control socket: {message}");
        }
        send(out, &reply)
    }

    /// Retries what a write-back failure left staged and clears the error state.
    fn resume(&self) -> Response {
        let vol = &self.ctx.volume;
        match vol.resume() {
            Ok(report) => {
                tracing::info!(volume = %vol.name(), ?report, "resumed through the control socket");
                Response::Resumed {
                    report: serde_json::to_value(&report).unwrap_or_default(),
                }
            }
            Err(e) => error(ErrorKind::Failed, e.describe()),
        }
    }

    fn status(&self) -> StatusInfo {
        let ctx = &self.ctx;
        let mut info = crate::status::volume_status(&ctx.volume, &ctx.path);
        info.protocol = Some(PROTOCOL_VERSION);
        let (kind, serving, connections, total) = match &ctx.serving {
            Serving::Nbd { listen, connections } => (
                "serve",
                listen.clone(),
                Some(connections.open()),
                Some(connections.admitted()),
            ),
            Serving::Fuse { file } => ("mount", file.display().to_string(), None, None),
        };
        info.server = Some(ServerInfo {
            kind: kind.into(),
            pid: std::process::id(),
            control: self.socket.display().to_string(),
            serving,
            connections,
            connections_total: total,
            uptime_secs: self.started.elapsed().as_secs(),
        });
        info.scrub = self.scrubber.state();
        info
    }
}

/// Waits up to `timeout` for a connection to accept.
/// A key sent in a `retag` request: hex of a key file's contents.
fn parse_key(text: &str) -> Result<blockguard::tag::TagKey, String> {
    let bytes: Option<Vec<u8>> = (0..text.len())
        .step_by(2)
        .map(|i| text.get(i..i + 2).and_then(|h| u8::from_str_radix(h, 16).ok()))
        .collect();
    let bytes = bytes.ok_or_else(|| "the key is not hex".to_string())?;
    blockguard::tag::TagKey::parse(&bytes).map_err(|e| format!("the key: {e}"))
}

fn readable(listener: &UnixListener, timeout: Duration) -> bool {
    use rustix::event::{poll, PollFd, PollFlags, Timespec};
    let mut fds = [PollFd::new(listener, PollFlags::IN)];
    let ts = Timespec {
        tv_sec: i64::try_from(timeout.as_secs()).unwrap_or(i64::MAX),
        tv_nsec: i64::from(timeout.subsec_nanos()),
    };
    matches!(poll(&mut fds, Some(&ts)), Ok(n) if n > 0)
}

/// How a bounded line read ended.
enum Line {
    /// A line (its newline, if any, included), or the last bytes before the end.
    Complete,
    /// More than `MAX_REQUEST_LINE` bytes without a newline.
    TooLong,
    /// The end of the stream, nothing read.
    Eof,
}

/// Reads one line of at most [`MAX_REQUEST_LINE`] bytes into `buf`.
fn read_line(reader: &mut impl BufRead, buf: &mut Vec<u8>) -> io::Result<Line> {
    let limit = u64::try_from(MAX_REQUEST_LINE).unwrap_or(u64::MAX);
    let n = reader.by_ref().take(limit).read_until(b'\n', buf)?;
    Ok(if n == 0 {
        Line::Eof
    } else if buf.last() != Some(&b'\n') && n >= MAX_REQUEST_LINE {
        Line::TooLong
    } else {
        Line::Complete
    })
}

/// Tells a client why it is not served; the caller then closes the connection. The client
/// may be gone already: nothing to do about a failed write then.
fn refuse(stream: &mut UnixStream, kind: ErrorKind, message: String) {
    let _ = send(stream, &error(kind, message));
}

/// Writes one reply line.
pub(crate) fn send(out: &mut impl Write, reply: &Response) -> io::Result<()> {
    let mut line = serde_json::to_vec(reply).map_err(io::Error::other)?;
    line.push(b'\n');
    out.write_all(&line)?;
    out.flush()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_the_owner_and_root_are_allowed() {
        assert!(allowed(1000, 1000));
        assert!(allowed(0, 1000));
        assert!(allowed(0, 0));
        assert!(!allowed(1001, 1000));
        assert!(!allowed(1000, 0));
    }

    #[test]
    fn lines_are_bounded() {
        let mut buf = Vec::new();
        let mut ok = io::Cursor::new(b"{\"cmd\":\"status\"}\nrest".to_vec());
        assert!(matches!(read_line(&mut ok, &mut buf).unwrap(), Line::Complete));
        assert_eq!(buf, b"{\"cmd\":\"status\"}\n");
        buf.clear();
        assert!(matches!(read_line(&mut ok, &mut buf).unwrap(), Line::Complete));
        buf.clear();
        assert!(matches!(read_line(&mut ok, &mut buf).unwrap(), Line::Eof));
        let mut long = io::Cursor::new(vec![b'x'; MAX_REQUEST_LINE + 10]);
        buf.clear();
        assert!(matches!(read_line(&mut long, &mut buf).unwrap(), Line::TooLong));
        // Exactly at the limit, with its newline: still a line.
        let mut exact = vec![b' '; MAX_REQUEST_LINE - 1];
        exact.push(b'\n');
        buf.clear();
        assert!(matches!(
            read_line(&mut io::Cursor::new(exact), &mut buf).unwrap(),
            Line::Complete
        ));
    }
}
