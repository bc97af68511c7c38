//! A backend on a remote NBD export: the client side of the NBD protocol.
//!
//! [`NbdBackend`] reaches an export named by an NBD URI ([`NbdUri`]) and serves the
//! [`Backend`] contract over the network:
//! - Many requests are in flight at once: every thread sends its request under a short write
//!   lock and waits for its own reply, which a reader thread per connection matches by cookie.
//! - When the server advertises multi-conn (a flush on one connection covers the writes
//!   completed on all of them), up to [`NbdOptions::connections`] connections share the load;
//!   otherwise there is one, since a flush would not cover writes sent on another.
//! - [`Backend::flush`] is `NBD_CMD_FLUSH`, sent after the writes it must cover have been
//!   answered (every write here returns only once answered). No request carries FUA: the
//!   engine makes writes durable with flushes only. A server that does not advertise
//!   `NBD_FLAG_SEND_FLUSH` is taken to have no volatile cache (what the Linux NBD client
//!   assumes too): a flush then has nothing to send.
//! - [`Backend::zero_range`] is `NBD_CMD_WRITE_ZEROES` where advertised (the server may
//!   deallocate), else written zeros. `NBD_CMD_TRIM` is never sent: trimmed data need not read
//!   as zeros, which `zero_range` promises.
//! - Every request has a time limit ([`NbdOptions::request_timeout`]); a request unanswered
//!   by then fails and the connection is dropped. A dropped connection makes requests fail at
//!   once, and is reconnected on a later request after a backoff that doubles up to
//!   [`NbdOptions::backoff_max`], so nothing waits forever on a server that went away. If
//!   writes were answered but not yet flushed when a connection was lost, the next flush
//!   fails (the server may have lost them): the caller must rewrite what it cannot prove
//!   durable, which the volume's mirror resync does.
//! - `nbds://` and `nbds+unix://` start TLS (`NBD_OPT_STARTTLS`) before any other option, on
//!   every connection, and negotiate the rest inside it; which CA, client certificate and
//!   server name are used: see [TLS](#tls). A server that requires TLS, reached with a
//!   plain URI, is refused with a message saying so.
//!
//! # TLS
//!
//! The server's certificate must chain to the CA in `ca-cert.pem` of the URI's
//! `tls-certificates=DIR`, else to [`NbdOptions::tls_ca`]; `DIR`'s `client-cert.pem` and
//! `client-key.pem`, when present, are presented to a server that asks for a client
//! certificate. The certificate must be valid for the URI's `tls-hostname`, else for its
//! host; `nbds+unix://` URIs need `tls-hostname`. `tls-verify-peer=false` skips the check of
//! the server's certificate and logs a warning (`tracing`) at every connection. The TLS
//! handshake is bounded by [`NbdOptions::connect_timeout`] like the rest of the handshake.

mod conn;
#[cfg(feature = "testing")]
pub mod fuzzing;
pub mod proto;
mod secure;
mod uri;
mod wire;

pub use uri::{is_nbd_uri, Address, NbdUri, UriError, DEFAULT_PORT};

use crate::{check_range, Backend};
use conn::{Conn, Failure, Ticket};
use secure::ClientTls;
use std::io;
use std::net::{TcpStream, ToSocketAddrs};
use std::os::unix::net::UnixStream;
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::{Duration, Instant};
use wire::{Cmd, ExportInfo, HandshakeError, Stream};

/// How [`NbdBackend::connect`] connects and how long it waits.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NbdOptions {
    /// Limit on connecting and on the handshake, each attempt.
    pub connect_timeout: Duration,
    /// Limit on each request, from sending it to its reply.
    pub request_timeout: Duration,
    /// Most connections to open when the server advertises multi-conn (at least 1).
    pub connections: usize,
    /// Refuse writes even if the export accepts them.
    pub read_only: bool,
    /// Wait before the first reconnection attempt after a connection is lost.
    pub backoff_min: Duration,
    /// Longest wait between reconnection attempts.
    pub backoff_max: Duration,
    /// The CA certificates (PEM) that `nbds` servers' certificates must chain to, when the URI
    /// names no `tls-certificates` directory.
    pub tls_ca: Option<PathBuf>,
}

impl Default for NbdOptions {
    fn default() -> Self {
        Self {
            connect_timeout: Duration::from_secs(10),
            request_timeout: Duration::from_secs(30),
            connections: 4,
            read_only: false,
            backoff_min: Duration::from_millis(100),
            backoff_max: Duration::from_secs(10),
            tls_ca: None,
        }
    }
}

/// Why an NBD export could not be opened. Every message names the URI.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum NbdError {
    /// The URI does not parse.
    #[error(transparent)]
    Uri(#[from] UriError),
    /// The URI's TLS setup cannot be used: no CA, an unreadable certificate or key file, no
    /// server name to check.
    #[error("{uri}: cannot set up TLS: {detail}")]
    TlsSetup {
        /// The URI.
        uri: String,
        /// What is missing or wrong, naming the file.
        detail: String,
    },
    /// A plain URI reached a server that serves only TLS clients.
    #[error("{uri}: the server requires TLS: use nbds:// (or nbds+unix://) with tls-certificates=DIR")]
    TlsRequired {
        /// The URI.
        uri: String,
    },
    /// The server refused `NBD_OPT_STARTTLS`.
    #[error("{uri}: the server refused to start TLS: {detail}")]
    StartTlsRefused {
        /// The URI.
        uri: String,
        /// The server's answer.
        detail: String,
    },
    /// The TLS handshake failed, or the server ended the session with a TLS alert: a server
    /// certificate the CA did not sign or not valid for the name, a client certificate refused.
    #[error("{uri}: TLS failed: {detail}")]
    Tls {
        /// The URI.
        uri: String,
        /// What failed, and what to check.
        detail: String,
    },
    /// The server could not be reached.
    #[error("{uri}: cannot connect to {address}")]
    Connect {
        /// The URI.
        uri: String,
        /// The address tried, as text.
        address: String,
        /// Why.
        #[source]
        source: io::Error,
    },
    /// The handshake failed: the server refused the export, spoke something else, or went
    /// silent.
    #[error("{uri}: handshake failed: {detail}")]
    Handshake {
        /// The URI.
        uri: String,
        /// What went wrong.
        detail: String,
    },
    /// A reconnection reached an export that is not the one opened (another size or flags).
    #[error("{uri}: the export changed since it was opened ({detail}); not reconnecting to it")]
    Changed {
        /// The URI.
        uri: String,
        /// What differs.
        detail: String,
    },
}

/// One connection slot: the connection, or why it was lost.
#[derive(Debug)]
struct Link {
    conn: Option<Arc<Conn>>,
    /// Why the last connection was lost, for the errors of requests made meanwhile.
    lost: String,
}

/// When the next reconnection may be tried, shared by all connection slots: a server that is
/// away costs one connection attempt per backoff, not one per slot or per request.
#[derive(Debug)]
struct Retry {
    next_try: Instant,
    wait: Duration,
}

/// A backend on a remote NBD export. See the [module documentation](self).
#[derive(Debug)]
pub struct NbdBackend {
    uri: NbdUri,
    opts: NbdOptions,
    /// The TLS configuration of an `nbds` URI, used by every connection.
    tls: Option<ClientTls>,
    info: ExportInfo,
    links: Vec<Mutex<Link>>,
    retry: Mutex<Retry>,
    next: AtomicUsize,
    /// Writes answered so far, and how many of them the last successful flush covered.
    acked: AtomicU64,
    flushed: AtomicU64,
    /// A connection was lost while answered writes were not flushed: the next flush fails.
    lost_unflushed: AtomicBool,
    reconnects: AtomicU64,
}

impl NbdBackend {
    /// Connects to the export `uri` names, with as many connections as the server allows
    /// (up to [`NbdOptions::connections`]).
    pub fn connect(uri: &str, opts: &NbdOptions) -> Result<NbdBackend, NbdError> {
        let uri = NbdUri::parse(uri)?;
        let tls = ClientTls::new(&uri, opts)?;
        let first = open_conn(&uri, opts, tls.as_ref())?;
        let info = first.info;
        let n = if info.flags & proto::TFLAG_CAN_MULTI_CONN != 0 {
            opts.connections.max(1)
        } else {
            1
        };
        let mut links = vec![Mutex::new(Link::up(Arc::new(first)))];
        for _ in 1..n {
            let c = open_conn(&uri, opts, tls.as_ref())?;
            check_same(&uri, &info, &c.info)?;
            links.push(Mutex::new(Link::up(Arc::new(c))));
        }
        Ok(NbdBackend {
            uri,
            opts: opts.clone(),
            tls,
            info,
            links,
            retry: Mutex::new(Retry {
                next_try: Instant::now(),
                wait: Duration::ZERO,
            }),
            next: AtomicUsize::new(0),
            acked: AtomicU64::new(0),
            flushed: AtomicU64::new(0),
            lost_unflushed: AtomicBool::new(false),
            reconnects: AtomicU64::new(0),
        })
    }

    /// The URI this backend was opened with.
    pub fn uri(&self) -> &NbdUri {
        &self.uri
    }

    /// How many connections are in use (more than one only with multi-conn).
    pub fn connections(&self) -> usize {
        self.links.len()
    }

    /// How many times a lost connection was reconnected.
    pub fn reconnects(&self) -> u64 {
        self.reconnects.load(Ordering::Relaxed)
    }

    /// True when the server advertised `NBD_CMD_WRITE_ZEROES`.
    pub fn has_write_zeroes(&self) -> bool {
        self.info.flags & proto::TFLAG_SEND_WRITE_ZEROES != 0
    }

    /// Drops every connection now, as a lost network would (for tests of the recovery path):
    /// requests fail until a reconnection succeeds.
    pub fn disconnect(&self) {
        for link in &self.links {
            if let Some(c) = &lock(link).conn {
                c.kill("disconnected on request");
            }
        }
    }

    /// A connection to send on: a live one, or a reconnection if the backoff allows one now.
    fn conn(&self) -> Result<Arc<Conn>, String> {
        let i = self.next.fetch_add(1, Ordering::Relaxed) % self.links.len();
        let mut link = lock(&self.links[i]);
        if let Some(c) = &link.conn {
            match c.dead() {
                None => return Ok(Arc::clone(c)),
                Some(reason) => {
                    // Answered writes not yet covered by a flush may be gone with the server.
                    if self.acked.load(Ordering::SeqCst) > self.flushed.load(Ordering::SeqCst) {
                        self.lost_unflushed.store(true, Ordering::SeqCst);
                    }
                    link.lost = reason;
                    link.conn = None;
                }
            }
        }
        let now = Instant::now();
        {
            let mut retry = self.retry.lock().unwrap_or_else(PoisonError::into_inner);
            if now < retry.next_try {
                return Err(format!(
                    "not connected ({}); next reconnection attempt in {:?}",
                    link.lost,
                    retry.next_try - now
                ));
            }
            // The first attempt after a loss is immediate (wait zero); while attempts fail the
            // wait doubles from the minimum. Set before trying, so other slots wait meanwhile.
            retry.wait = (retry.wait * 2).clamp(self.opts.backoff_min, self.opts.backoff_max);
            retry.next_try = now + retry.wait;
        }
        match open_conn(&self.uri, &self.opts, self.tls.as_ref()).and_then(|c| {
            check_same(&self.uri, &self.info, &c.info)?;
            Ok(c)
        }) {
            Ok(c) => {
                let c = Arc::new(c);
                *link = Link::up(Arc::clone(&c));
                self.reconnects.fetch_add(1, Ordering::Relaxed);
                // The server is back: the other slots may reconnect at once.
                let mut retry = self.retry.lock().unwrap_or_else(PoisonError::into_inner);
                retry.wait = Duration::ZERO;
                retry.next_try = Instant::now();
                Ok(c)
            }
            Err(e) => {
                link.lost = e.to_string();
                Err(format!("not connected; reconnecting failed: {e}"))
            }
        }
    }

    /// An `io::Error` naming the export and the request.
    fn error(&self, cmd: Cmd, offset: u64, len: u64, f: Failure) -> io::Error {
        let what = format!("{}: {} of {len} bytes at byte {offset}", self.uri, cmd.name());
        match f {
            Failure::Server { errno, message } => {
                let kind = io::Error::from_raw_os_error(i32::try_from(errno).unwrap_or(5)).kind();
                let message = if message.is_empty() {
                    String::new()
                } else {
                    format!(" ({message})")
                };
                io::Error::new(
                    kind,
                    format!("{what}: the server answered {}{message}", wire::errno_name(errno)),
                )
            }
            Failure::Lost(reason) => io::Error::new(io::ErrorKind::BrokenPipe, format!("{what}: {reason}")),
        }
    }

    /// Sends the requests of one operation (split at the largest payload the server takes) on
    /// one connection and waits for all of them: `pieces` are (offset, length, payload).
    fn run(
        &self,
        cmd: Cmd,
        offset: u64,
        len: u64,
        pieces: &[(u64, u32, Vec<&[u8]>)],
    ) -> io::Result<Vec<Vec<u8>>> {
        let conn = self
            .conn()
            .map_err(|reason| self.error(cmd, offset, len, Failure::Lost(reason)))?;
        let mut tickets: Vec<Ticket> = Vec::with_capacity(pieces.len());
        let mut first_err = None;
        for (at, n, payload) in pieces {
            match conn.submit(cmd, *at, *n, payload) {
                Ok(t) => tickets.push(t),
                Err(f) => {
                    first_err = Some(f);
                    break;
                }
            }
        }
        let mut out = Vec::with_capacity(tickets.len());
        for t in tickets {
            match conn.wait(&t, self.opts.request_timeout) {
                Ok(d) => out.push(d),
                Err(f) => {
                    first_err.get_or_insert(f);
                }
            }
        }
        match first_err {
            Some(f) => Err(self.error(cmd, offset, len, f)),
            None => Ok(out),
        }
    }

    fn check(&self, offset: u64, len: u64, write: bool) -> io::Result<()> {
        check_range(offset, len, self.info.size)?;
        let min = u64::from(self.info.min_block);
        if offset % min != 0 || len % min != 0 {
            return Err(io::Error::new(
                io::ErrorKind::InvalidInput,
                format!(
                    "{}: {len} bytes at byte {offset} are not aligned to the export's minimum block size {min}",
                    self.uri
                ),
            ));
        }
        if write && self.is_read_only() {
            return Err(io::Error::new(
                io::ErrorKind::PermissionDenied,
                format!(
                    "{}: the export is read-only (write of {len} bytes at byte {offset} refused)",
                    self.uri
                ),
            ));
        }
        Ok(())
    }

    /// Splits `offset..offset + len` into requests of at most the largest payload.
    fn split(&self, offset: u64, len: u64) -> Vec<(u64, u32)> {
        let max = u64::from(self.info.max_payload);
        let mut out = Vec::with_capacity(usize::try_from(len / max + 1).unwrap_or(1));
        let mut at = offset;
        while at < offset + len {
            let n = max.min(offset + len - at);
            // `n` is at most `max_payload`, a `u32`.
            out.push((at, u32::try_from(n).unwrap_or(u32::MAX)));
            at += n;
        }
        out
    }

    fn write_pieces(&self, bufs: &[&[u8]], offset: u64, len: u64) -> io::Result<()> {
        let mut pieces = Vec::new();
        let (mut bi, mut bo) = (0usize, 0usize);
        for (at, n) in self.split(offset, len) {
            let mut need = n as usize;
            let mut payload = Vec::new();
            while need > 0 {
                let b = bufs[bi];
                let take = (b.len() - bo).min(need);
                if take > 0 {
                    payload.push(&b[bo..bo + take]);
                }
                need -= take;
                bo += take;
                if bo == b.len() {
                    bi += 1;
                    bo = 0;
                }
            }
            pieces.push((at, n, payload));
        }
        self.run(Cmd::Write, offset, len, &pieces)?;
        self.acked.fetch_add(1, Ordering::SeqCst);
        Ok(())
    }
}

impl Link {
    fn up(c: Arc<Conn>) -> Link {
        Link {
            conn: Some(c),
            lost: String::new(),
        }
    }
}

fn lock(link: &Mutex<Link>) -> std::sync::MutexGuard<'_, Link> {
    link.lock().unwrap_or_else(PoisonError::into_inner)
}

/// Refuses a connection to an export that differs from the one first opened.
fn check_same(uri: &NbdUri, a: &ExportInfo, b: &ExportInfo) -> Result<(), NbdError> {
    if a.size != b.size || a.flags != b.flags || a.min_block != b.min_block {
        return Err(NbdError::Changed {
            uri: uri.to_string(),
            detail: format!(
                "size {} then {}, flags {:#x} then {:#x}, minimum block {} then {}",
                a.size, b.size, a.flags, b.flags, a.min_block, b.min_block
            ),
        });
    }
    Ok(())
}

/// Connects, negotiates (starting TLS first for an `nbds` URI) and starts transmission, each
/// step bounded by the connect timeout.
fn open_conn(uri: &NbdUri, opts: &NbdOptions, tls: Option<&ClientTls>) -> Result<Conn, NbdError> {
    let (mut stream, address) = dial(uri, opts.connect_timeout)?;
    let connect_err = |source: io::Error| NbdError::Connect {
        uri: uri.to_string(),
        address: address.clone(),
        source,
    };
    let bound = |s: &Stream| -> io::Result<()> {
        s.set_read_timeout(Some(opts.connect_timeout))?;
        s.set_write_timeout(Some(opts.connect_timeout))
    };
    bound(&stream).map_err(connect_err)?;
    let no_zeroes = wire::greet(&mut stream).map_err(|e| handshake_error(uri, opts, e))?;
    let mut tunnel = None;
    // A TLS error the server reports after the handshake (TLS 1.3 checks the client's
    // certificate then): it explains why the negotiation that follows broke off.
    let failure = Arc::new(Mutex::new(None));
    if let Some(tls) = tls {
        wire::starttls(&mut stream).map_err(|e| handshake_error(uri, opts, e))?;
        let t = tunnel.insert(tls.start(uri, &stream, opts.request_timeout, Arc::clone(&failure))?);
        stream = Stream::Unix(t.plain().map_err(connect_err)?);
        bound(&stream).map_err(connect_err)?;
    }
    let mut info = wire::negotiate(&mut stream, &uri.export, no_zeroes).map_err(|e| match tls {
        Some(tls) => {
            let late = failure.lock().unwrap_or_else(PoisonError::into_inner).take();
            tls.after_handshake(uri, late, e)
                .unwrap_or_else(|e| handshake_error(uri, opts, e))
        }
        None => handshake_error(uri, opts, e),
    })?;
    if opts.read_only {
        info.flags |= proto::TFLAG_READ_ONLY;
    }
    Conn::start(stream, info, opts.request_timeout, tunnel).map_err(connect_err)
}

/// A handshake error as the backend reports it, naming the URI.
fn handshake_error(uri: &NbdUri, opts: &NbdOptions, e: HandshakeError) -> NbdError {
    let detail = match e {
        HandshakeError::TlsRequired => return NbdError::TlsRequired { uri: uri.to_string() },
        HandshakeError::StartTlsRefused(detail) => {
            return NbdError::StartTlsRefused {
                uri: uri.to_string(),
                detail,
            }
        }
        HandshakeError::Io(e) if matches!(e.kind(), io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut) => {
            format!("no answer within {:?}", opts.connect_timeout)
        }
        HandshakeError::Io(e) if e.kind() == io::ErrorKind::UnexpectedEof => {
            "the server closed the connection (no such export, or it accepts no more clients)".to_string()
        }
        HandshakeError::Io(e) => e.to_string(),
        HandshakeError::Protocol(s) => s,
    };
    NbdError::Handshake {
        uri: uri.to_string(),
        detail,
    }
}

/// Opens the socket the URI names: (stream, the address for messages).
fn dial(uri: &NbdUri, timeout: Duration) -> Result<(Stream, String), NbdError> {
    match &uri.address {
        Address::Unix(path) => {
            let address = path.display().to_string();
            // A local socket answers at once or not at all: no timeout is needed to connect.
            match UnixStream::connect(path) {
                Ok(s) => Ok((Stream::Unix(s), address)),
                Err(source) => Err(NbdError::Connect {
                    uri: uri.to_string(),
                    address,
                    source,
                }),
            }
        }
        Address::Tcp { host, port } => {
            let address = format!("{host}:{port}");
            let fail = |source| NbdError::Connect {
                uri: uri.to_string(),
                address: address.clone(),
                source,
            };
            let addrs = (host.as_str(), *port).to_socket_addrs().map_err(fail)?;
            let mut last = io::Error::new(io::ErrorKind::NotFound, "the host name has no address");
            for a in addrs {
                match TcpStream::connect_timeout(&a, timeout) {
                    Ok(s) => {
                        // Requests are complete messages: send each at once.
                        s.set_nodelay(true).map_err(fail)?;
                        return Ok((Stream::Tcp(s), address));
                    }
                    Err(e) => last = e,
                }
            }
            Err(fail(last))
        }
    }
}

/// Largest zero buffer written when the server lacks `WRITE_ZEROES`.
const ZERO_CHUNK: u64 = 1 << 20;

/// Largest `WRITE_ZEROES` request (its length is a `u32`; kept a multiple of any minimum
/// block size up to 64 KiB).
const MAX_ZERO_REQUEST: u64 = 1 << 30;

impl Backend for NbdBackend {
    fn len(&self) -> u64 {
        self.info.size
    }

    fn read_at(&self, buf: &mut [u8], offset: u64) -> io::Result<()> {
        let len = buf.len() as u64;
        self.check(offset, len, false)?;
        let pieces: Vec<_> = self
            .split(offset, len)
            .into_iter()
            .map(|(at, n)| (at, n, Vec::new()))
            .collect();
        let data = self.run(Cmd::Read, offset, len, &pieces)?;
        let mut at = 0;
        for d in data {
            buf[at..at + d.len()].copy_from_slice(&d);
            at += d.len();
        }
        Ok(())
    }

    fn write_at(&self, buf: &[u8], offset: u64) -> io::Result<()> {
        self.write_vectored_at(&[buf], offset)
    }

    fn write_vectored_at(&self, bufs: &[&[u8]], offset: u64) -> io::Result<()> {
        let len: u64 = bufs.iter().map(|b| b.len() as u64).sum();
        self.check(offset, len, true)?;
        if len == 0 {
            return Ok(());
        }
        self.write_pieces(bufs, offset, len)
    }

    fn flush(&self) -> io::Result<()> {
        let covered = self.acked.load(Ordering::SeqCst);
        if self.info.flags & proto::TFLAG_SEND_FLUSH != 0 && !self.is_read_only() {
            self.run(Cmd::Flush, 0, 0, &[(0, 0, Vec::new())])?;
        }
        if self.lost_unflushed.swap(false, Ordering::SeqCst) {
            return Err(io::Error::new(
                io::ErrorKind::BrokenPipe,
                format!(
                    "{}: flush: a connection was lost while written data was not yet flushed; the server may not have kept it",
                    self.uri
                ),
            ));
        }
        self.flushed.fetch_max(covered, Ordering::SeqCst);
        Ok(())
    }

    fn zero_range(&self, offset: u64, len: u64) -> io::Result<()> {
        self.check(offset, len, true)?;
        if len == 0 {
            return Ok(());
        }
        if self.has_write_zeroes() {
            let mut pieces = Vec::new();
            let mut at = offset;
            while at < offset + len {
                let n = MAX_ZERO_REQUEST.min(offset + len - at);
                pieces.push((at, u32::try_from(n).unwrap_or(u32::MAX), Vec::new()));
                at += n;
            }
            self.run(Cmd::WriteZeroes, offset, len, &pieces)?;
            self.acked.fetch_add(1, Ordering::SeqCst);
            return Ok(());
        }
        let zeros = vec![0u8; crate::usize_of(ZERO_CHUNK.min(len))];
        let mut at = offset;
        while at < offset + len {
            let n = ZERO_CHUNK.min(offset + len - at);
            self.write_pieces(&[&zeros[..crate::usize_of(n)]], at, n)?;
            at += n;
        }
        Ok(())
    }

    fn alignment(&self) -> usize {
        self.info.min_block as usize
    }

    fn is_read_only(&self) -> bool {
        self.info.flags & proto::TFLAG_READ_ONLY != 0
    }

    fn name(&self) -> String {
        self.uri.to_string()
    }
}
