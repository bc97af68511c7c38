//! Sockets and threads: accepts connections on TCP or a Unix socket and serves the
//! handshake and transmission phases of each one.
//!
//! Per connection, one reader thread runs the handshake and then parses requests. The last
//! request of a burst (nothing more buffered: always the case at queue depth 1) runs on the
//! reader thread itself; the others go to a worker pool shared by all connections, so both
//! cores and the disk see parallel requests. Every reply is assembled whole; whichever thread
//! completes a request sends it with one non-blocking vectored write that also carries the
//! replies queued meanwhile, so replies never interleave (they may complete out of order,
//! which NBD allows). Only a full socket hands the rest to the connection's writer thread.
//! In-flight requests and bytes per connection are bounded, and so is the time a request's
//! data may stall (`ServerConfig::request_timeout`; the connection table enforces it).
//!
//! Shutdown ([`ShutdownHandle::shutdown`], e.g. from SIGINT/SIGTERM): stop accepting, stop
//! reading new requests, let every in-flight request finish and be answered, flush the export.

use crate::budget::Budget;
use crate::buffers::{BufferPool, Payload};
use crate::channel::Channel;
use crate::conns::{Activity, Clock, ConnTable, Limits, Transfer};
use crate::export::Export;
use crate::handshake::{Event, ExportInfo, Handshake, HandshakeConfig, Negotiated, TlsPolicy};
use crate::pool::{Job, Pool, Submitter};
use crate::proto;
use crate::spin::{SpinConfig, SpinState, Spinners};
use crate::stream::{Listener, Stream};
use crate::tls::{self, TlsConfig, TlsMode, TlsStream};
use crate::transmission::{Outcome, ReplyBytes, Request, Session};
use crate::usize_of;
use std::collections::VecDeque;
use std::fmt;
use std::io::{self, BufReader, IoSlice, Read, Write};
use std::net::{Shutdown, SocketAddr, TcpListener, TcpStream};
use std::num::NonZeroUsize;
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Condvar, Mutex, MutexGuard, PoisonError};
use std::thread;
use std::time::{Duration, Instant};

/// Where the server listens.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ListenAddr {
    /// A TCP address (default `127.0.0.1:10809`).
    Tcp(SocketAddr),
    /// A Unix domain socket path.
    Unix(PathBuf),
}

impl fmt::Display for ListenAddr {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            ListenAddr::Tcp(a) => write!(f, "nbd://{a}"),
            ListenAddr::Unix(p) => write!(f, "nbd+unix:///?socket={}", p.display()),
        }
    }
}

/// Server tuning and policy.
#[derive(Debug, Clone)]
pub struct ServerConfig {
    /// Canonical export name (the empty name selects the export too).
    pub export_name: String,
    /// Largest read or write payload, advertised as the maximum block size; 1 ..=
    /// [`MAX_PAYLOAD_LIMIT`].
    pub max_payload: u32,
    /// Most worker threads shared by all connections (0: two per core, at least 4). Two per
    /// core run while requests are fast (page cache); up to this many while most requests
    /// wait for the disk.
    pub workers: usize,
    /// Most connections at once. At the limit a new client gets the place of the quietest
    /// idle or stalled connection (see `conns.rs`); it is refused only when every connection
    /// is busy.
    pub max_connections: usize,
    /// Requests in flight per connection before the reader stops reading.
    pub max_inflight_requests: usize,
    /// Payload bytes in flight per connection before the reader stops reading (a single
    /// larger request is still accepted when nothing else is in flight). Kept small on
    /// purpose: buffers that cycle quickly stay in the CPU cache; with a 64 MiB bound a
    /// multi-connection `nbdcopy` out cost ~20 % more CPU per GiB than with 4 MiB.
    pub max_inflight_bytes: usize,
    /// Payload and reply bytes in flight on all connections together; requests beyond wait
    /// (see `budget.rs`). Keeps clients that never read their replies, or never finish sending
    /// a payload, from pinning memory without bound.
    pub max_total_inflight_bytes: usize,
    /// A client must finish the whole handshake within this time of connecting (one
    /// deadline, not a timeout per read: trickling bytes does not extend it).
    pub handshake_timeout: Duration,
    /// Close connections that have had no request in flight, or a stalled one (see
    /// `request_timeout`), for this long (`None`: never). Idle and stalled connections are
    /// also closed, quietest first, when a new client comes while the server is at
    /// `max_connections`.
    pub idle_timeout: Option<Duration>,
    /// A request's data must keep moving: a connection is closed, releasing the memory its
    /// requests hold, when a write payload has stalled this long — no byte of it for this
    /// long, or this far behind a transfer at `min_transfer_rate` since its header came — and
    /// likewise when its replies have gone unread. (Stalled payloads are also closed sooner
    /// when other requests wait for memory or a new client for a connection; see `conns.rs`.)
    /// At least a millisecond.
    pub request_timeout: Duration,
    /// The slowest transfer of a request's data (see `request_timeout`), in bytes per
    /// second; at least 1.
    pub min_transfer_rate: u64,
    /// Accept `NBD_OPT_EXTENDED_HEADERS`.
    pub extended_headers: bool,
    /// How long a reader busy-polls an empty socket before blocking (zero: never). See
    /// [`crate::spin`]: it trades CPU time for latency at low queue depths.
    pub poll_window: Duration,
    /// TLS (`NBD_OPT_STARTTLS`): `None` refuses it.
    pub tls: Option<TlsConfig>,
}

impl Default for ServerConfig {
    fn default() -> Self {
        Self {
            export_name: String::new(),
            max_payload: 32 << 20,
            workers: 0,
            max_connections: 512,
            max_inflight_requests: 128,
            max_inflight_bytes: 4 << 20,
            max_total_inflight_bytes: 256 << 20,
            handshake_timeout: Duration::from_secs(10),
            idle_timeout: None,
            request_timeout: Duration::from_secs(30),
            min_transfer_rate: 256 << 10,
            extended_headers: true,
            poll_window: SpinConfig::for_cores(1).window,
            tls: None,
        }
    }
}

/// The largest [`ServerConfig::max_payload`] a server accepts. A structured read reply carries
/// its chunk's length in 32 bits with the offset, so a payload near 4 GiB could not be
/// described; 1 GiB is far beyond what clients ask (qemu and the kernel use up to 32 MiB).
pub const MAX_PAYLOAD_LIMIT: u32 = 1 << 30;

/// Why the server could not start or stop cleanly.
#[derive(Debug, thiserror::Error)]
pub enum ServerError {
    /// A [`ServerConfig`] value outside what the server can honour.
    #[error("invalid server configuration: {0}")]
    Config(String),
    /// Binding the listening socket failed.
    #[error("cannot listen on {addr}")]
    Bind {
        /// The address.
        addr: ListenAddr,
        /// The cause (shown by the error chain, not in this message).
        source: io::Error,
    },
    /// Another process is serving on this Unix socket, or the path is not a socket.
    #[error("{0} is in use (another server listens there, or it is not a socket)")]
    SocketInUse(PathBuf),
    /// The final flush at shutdown failed.
    #[error("final flush failed")]
    Flush(#[source] crate::export::ExportError),
    /// A thread could not be created.
    #[error("cannot start thread")]
    Thread(#[source] io::Error),
    /// Request handlers panicked: writes and flushes were refused from the first panic on,
    /// and the export was not flushed at shutdown.
    #[error(
        "internal error: {panics} request handler(s) panicked; writes and flushes were refused \
         from the first panic on and the export was not flushed"
    )]
    Panicked {
        /// How many panics were caught.
        panics: u64,
    },
}

/// Asks a running [`Server`] to stop; cheap to clone and usable from any thread.
#[derive(Clone, Debug)]
pub struct ShutdownHandle {
    inner: Arc<ShutdownState>,
}

#[derive(Debug)]
struct ShutdownState {
    /// Set by [`ShutdownHandle::shutdown`] or, from inside a signal handler, by the signal.
    requested: Arc<AtomicBool>,
    /// The signal that asked for the shutdown (0: none, or not a signal).
    signal: Arc<AtomicUsize>,
    wake: ListenAddr,
}

impl ShutdownHandle {
    /// Starts a graceful shutdown: stop accepting, finish in-flight requests, flush.
    pub fn shutdown(&self) {
        if !self.inner.requested.swap(true, Ordering::SeqCst) {
            // The accept loop notices the flag within a tick anyway; a connection of our
            // own wakes it at once.
            match &self.inner.wake {
                ListenAddr::Tcp(a) => drop(TcpStream::connect_timeout(a, Duration::from_secs(1))),
                ListenAddr::Unix(p) => drop(UnixStream::connect(p)),
            }
        }
    }

    /// True once [`ShutdownHandle::shutdown`] was called or a stop signal arrived.
    pub fn is_requested(&self) -> bool {
        self.inner.requested.load(Ordering::SeqCst)
    }
}

/// Makes SIGINT and SIGTERM start a graceful shutdown; a second signal exits at once (status
/// 128 + signal).
///
/// The handlers only set flags, which the accept loop polls: no thread of ours runs on a
/// signal, so nothing on the way — logging to a stderr that is full or closed included — can
/// block or kill the shutdown.
pub fn shutdown_on_signals(handle: &ShutdownHandle) -> io::Result<()> {
    use signal_hook::consts::{SIGINT, SIGTERM};
    use signal_hook::flag;
    for sig in [SIGINT, SIGTERM] {
        // Registered first, so it sees the flag as it was before this signal: it exits only
        // when an earlier signal had already set it.
        flag::register_conditional_shutdown(sig, 128 + sig, Arc::clone(&handle.inner.requested))?;
        // Signal numbers are positive; 0 would only read as "not a signal".
        let number = usize::try_from(sig).unwrap_or_default();
        flag::register_usize(sig, Arc::clone(&handle.inner.signal), number)?;
        flag::register(sig, Arc::clone(&handle.inner.requested))?;
    }
    Ok(())
}

/// Counts of client connections, readable from any thread while the server runs (for status
/// reports); cheap to clone. See [`Server::connection_stats`].
#[derive(Clone, Debug, Default)]
pub struct ConnectionStats {
    inner: Arc<ConnCounts>,
}

#[derive(Debug, Default)]
struct ConnCounts {
    open: AtomicUsize,
    admitted: AtomicU64,
}

impl ConnectionStats {
    /// Connections admitted whose threads have not ended yet (in the handshake or the
    /// transmission phase).
    pub fn open(&self) -> usize {
        self.inner.open.load(Ordering::Relaxed)
    }

    /// Connections admitted since the server started.
    pub fn admitted(&self) -> u64 {
        self.inner.admitted.load(Ordering::Relaxed)
    }

    fn started(&self) {
        self.inner.open.fetch_add(1, Ordering::Relaxed);
        self.inner.admitted.fetch_add(1, Ordering::Relaxed);
    }

    fn ended(&self) {
        self.inner.open.fetch_sub(1, Ordering::Relaxed);
    }
}

/// An NBD server for one export.
pub struct Server {
    listener: Listener,
    addr: ListenAddr,
    export: Arc<dyn Export>,
    cfg: ServerConfig,
    shutdown: ShutdownHandle,
    stats: ConnectionStats,
}

impl fmt::Debug for Server {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Server")
            .field("addr", &self.addr)
            .field("cfg", &self.cfg)
            .finish_non_exhaustive()
    }
}

impl Server {
    /// Binds the listening socket. A stale Unix socket file (nobody accepting) is replaced;
    /// a live one is an error.
    pub fn bind(
        addr: &ListenAddr,
        export: Arc<dyn Export>,
        cfg: ServerConfig,
    ) -> Result<Server, ServerError> {
        if !(1..=MAX_PAYLOAD_LIMIT).contains(&cfg.max_payload) {
            return Err(ServerError::Config(format!(
                "max_payload {} is outside 1..={MAX_PAYLOAD_LIMIT}",
                cfg.max_payload
            )));
        }
        if cfg.request_timeout < Duration::from_millis(1) {
            return Err(ServerError::Config(format!(
                "request_timeout {:?} is shorter than a millisecond",
                cfg.request_timeout
            )));
        }
        if cfg.min_transfer_rate == 0 {
            return Err(ServerError::Config("min_transfer_rate is 0".into()));
        }
        let bind_err = |source| ServerError::Bind {
            addr: addr.clone(),
            source,
        };
        let (listener, actual) = match addr {
            ListenAddr::Tcp(a) => {
                let l = TcpListener::bind(a).map_err(bind_err)?;
                let actual = l.local_addr().map_err(bind_err)?;
                (Listener::Tcp(l), ListenAddr::Tcp(actual))
            }
            ListenAddr::Unix(p) => {
                if let Ok(meta) = std::fs::symlink_metadata(p) {
                    use std::os::unix::fs::FileTypeExt;
                    // Only a socket nobody accepts on is stale; never delete anything else.
                    if !meta.file_type().is_socket() || UnixStream::connect(p).is_ok() {
                        return Err(ServerError::SocketInUse(p.clone()));
                    }
                    std::fs::remove_file(p).map_err(bind_err)?;
                }
                let l = UnixListener::bind(p).map_err(bind_err)?;
                (Listener::Unix(l, p.clone()), ListenAddr::Unix(p.clone()))
            }
        };
        let shutdown = ShutdownHandle {
            inner: Arc::new(ShutdownState {
                requested: Arc::new(AtomicBool::new(false)),
                signal: Arc::new(AtomicUsize::new(0)),
                wake: match &actual {
                    // A wildcard address cannot be connected to; wake via loopback.
                    ListenAddr::Tcp(a) if a.ip().is_unspecified() => {
                        let ip: std::net::IpAddr = if a.is_ipv4() {
                            std::net::Ipv4Addr::LOCALHOST.into()
                        } else {
                            std::net::Ipv6Addr::LOCALHOST.into()
                        };
                        ListenAddr::Tcp(SocketAddr::new(ip, a.port()))
                    }
                    other => other.clone(),
                },
            }),
        };
        Ok(Server {
            listener,
            addr: actual,
            export,
            cfg,
            shutdown,
            stats: ConnectionStats::default(),
        })
    }

    /// The address actually bound (with the real port when port 0 was asked for).
    pub fn local_addr(&self) -> &ListenAddr {
        &self.addr
    }

    /// A handle that stops [`Server::run`].
    pub fn shutdown_handle(&self) -> ShutdownHandle {
        self.shutdown.clone()
    }

    /// A handle on the server's connection counts.
    pub fn connection_stats(&self) -> ConnectionStats {
        self.stats.clone()
    }

    /// Serves until shut down, then waits for every connection to finish its in-flight
    /// requests and flushes the export.
    pub fn run(self) -> Result<(), ServerError> {
        let cores = thread::available_parallelism().map_or(2, NonZeroUsize::get);
        let workers = if self.cfg.workers == 0 {
            (cores * 2).max(4)
        } else {
            self.cfg.workers
        };
        let pool = Pool::new(cores * 2, workers).map_err(ServerError::Thread)?;
        let shared = self.shared_state(&pool, cores, workers);
        self.accept_until_shutdown(&shared);
        self.finish(shared, pool)
    }

    /// The state every connection shares; logs what is served.
    fn shared_state(&self, pool: &Pool, cores: usize, workers: usize) -> Arc<Shared> {
        let export = &self.export;
        let info = ExportInfo {
            name: self.cfg.export_name.clone(),
            description: export.description(),
            size: export.size(),
            block_size: export.block_size(),
            read_only: export.is_read_only(),
            fast_zero: export.can_fast_zero(),
        };
        tracing::info!(
            listen = %self.addr,
            export = %info.name,
            size = info.size,
            block_size = info.block_size,
            read_only = info.read_only,
            workers,
            "serving {} ({} bytes) on {}",
            info.description,
            info.size,
            self.addr
        );
        Arc::new(Shared {
            export: Arc::clone(&self.export),
            buffers: Arc::new(BufferPool::default()),
            hs_config: HandshakeConfig {
                export: info,
                max_payload: self.cfg.max_payload,
                extended_headers: self.cfg.extended_headers,
                tls: match self.cfg.tls.as_ref().map(TlsConfig::mode) {
                    None => TlsPolicy::Off,
                    Some(TlsMode::Optional) => TlsPolicy::Optional,
                    Some(TlsMode::Required) => TlsPolicy::Required,
                },
            },
            cfg: self.cfg.clone(),
            pool: pool.submitter(),
            spin: SpinConfig {
                window: self.cfg.poll_window,
                ..SpinConfig::for_cores(cores)
            },
            spinners: Spinners::default(),
            conns: Arc::new(ConnTable::new(
                Limits {
                    max: self.cfg.max_connections,
                    handshake: self.cfg.handshake_timeout,
                    idle: self.cfg.idle_timeout,
                    request: self.cfg.request_timeout,
                    min_rate: self.cfg.min_transfer_rate,
                },
                Arc::new(Clock::new()),
            )),
            budget: Arc::new(Budget::new(self.cfg.max_total_inflight_bytes)),
            shutdown: self.shutdown.clone(),
            stats: self.stats.clone(),
            failed: Arc::new(Failed::default()),
        })
    }

    /// Accepts connections and starts serving each, until a shutdown is requested.
    fn accept_until_shutdown(&self, shared: &Arc<Shared>) {
        let next_id = AtomicU64::new(1);
        loop {
            shared.conns.reap();
            shared.buffers.trim(KEEP_UNUSED_BUFFERS);
            if self.shutdown.is_requested() {
                break;
            }
            match self.listener.wait_readable(ACCEPT_TICK) {
                Ok(true) => {}
                Ok(false) => continue,
                Err(e) => {
                    tracing::warn!(error = %e, "cannot wait for connections");
                    thread::sleep(ACCEPT_TICK);
                    continue;
                }
            }
            let accepted = self.accept();
            if self.shutdown.is_requested() {
                break;
            }
            let stream = match accepted {
                Ok(s) => s,
                Err(e) => {
                    tracing::warn!(error = %e, "accept failed");
                    // Out of descriptors and the like: back off instead of spinning.
                    thread::sleep(Duration::from_millis(50));
                    continue;
                }
            };
            let id = next_id.fetch_add(1, Ordering::Relaxed);
            if let Err(e) = shared.start_connection(id, stream) {
                tracing::warn!(error = %e, "cannot serve new connection");
            }
        }
    }

    /// Accepts one connection (the listener is readable) and tunes its socket.
    fn accept(&self) -> io::Result<Stream> {
        match &self.listener {
            Listener::Tcp(l) => l.accept().map(|(s, _)| {
                // Replies are written whole; Nagle would only add latency.
                let _ = s.set_nodelay(true);
                Stream::Tcp(s)
            }),
            Listener::Unix(l, _) => l.accept().map(|(s, _)| {
                // A Unix socket's default send buffer (~200 KiB) takes only part of a
                // 1 MiB read reply without blocking, and the rest then costs a hand-off
                // to the writer thread. The kernel caps this at net.core.wmem_max.
                let _ = rustix::net::sockopt::set_socket_send_buffer_size(&s, UNIX_SEND_BUFFER);
                Stream::Unix(s)
            }),
        }
    }

    /// After the accept loop: stops the connections, waits for their requests, then flushes
    /// the export (unless a worker panicked).
    fn finish(self, shared: Arc<Shared>, pool: Pool) -> Result<(), ServerError> {
        match self.shutdown.inner.signal.load(Ordering::SeqCst) {
            0 => tracing::info!("shutting down: finishing in-flight requests, then flushing"),
            signal => tracing::info!(
                signal,
                "shutting down on a signal: finishing in-flight requests, then flushing"
            ),
        }
        shared.stop_connections();
        let failed = Arc::clone(&shared.failed);
        drop(shared);
        pool.join();
        let panics = failed.panics.load(Ordering::SeqCst);
        if panics > 0 {
            // Fail-stop: after a broken invariant nothing is made durable that was not
            // already; the volume is left as a crash would leave it.
            if let Listener::Unix(_, p) = &self.listener {
                let _ = std::fs::remove_file(p);
            }
            return Err(ServerError::Panicked { panics });
        }
        let flushed = self.export.flush();
        if let Listener::Unix(_, p) = &self.listener {
            let _ = std::fs::remove_file(p);
        }
        flushed.map_err(ServerError::Flush)?;
        tracing::info!("all requests finished and flushed");
        Ok(())
    }
}

/// Send buffer asked for on Unix-socket connections (TCP tunes its own); the kernel doubles
/// it. Measured with 256 KiB (`nbdcopy` out) and 1 MiB (fio) read replies: the default
/// (~200 KiB) hands most replies to the writer thread; 4 MiB keeps so much in flight that
/// the copies into the socket run cache-cold; 1 MiB was fastest for both, in every round.
const UNIX_SEND_BUFFER: usize = 1 << 20;

/// A connection reader's buffer: room for hundreds of request headers per read(2), but
/// small: whatever part of a write payload the buffer pre-reads costs an extra copy (large
/// payloads are read straight into their own buffer past that).
const READ_BUFFER: usize = 16 * 1024;

/// Longest the accept loop sleeps before looking at the shutdown flag (which a signal handler
/// sets without waking anybody).
const ACCEPT_TICK: Duration = Duration::from_millis(100);

/// How long a buffer nobody needs is kept for reuse (see [`BufferPool::trim`], called every
/// [`ACCEPT_TICK`] or sooner).
const KEEP_UNUSED_BUFFERS: Duration = Duration::from_secs(1);

/// How long shutdown waits for connections to drain before cutting them off.
const SHUTDOWN_GRACE: Duration = Duration::from_secs(30);

/// How much longer than the request timeout a connection's writer itself waits for stalled
/// replies to move before it closes the connection: a backstop, since the connection table
/// closes it at the request timeout, logging whom it closed (but stops looking at shutdown).
const WRITER_BACKSTOP: Duration = Duration::from_secs(1);

/// The write timeout of a connection's socket in the transmission phase: how often a blocked
/// writer looks up to record progress (see `Activity::progressed`).
const WRITE_PROBE: Duration = Duration::from_millis(100);

/// State shared by the accept loop and all connections.
struct Shared {
    export: Arc<dyn Export>,
    buffers: Arc<BufferPool>,
    hs_config: HandshakeConfig,
    cfg: ServerConfig,
    pool: Submitter,
    spin: SpinConfig,
    spinners: Spinners,
    /// Every live connection, with the limits on them.
    conns: Arc<ConnTable>,
    /// Memory for requests in flight, all connections together.
    budget: Arc<Budget>,
    shutdown: ShutdownHandle,
    stats: ConnectionStats,
    failed: Arc<Failed>,
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    // These locks guard only the server's own bookkeeping (queues, counters, the connection
    // table), which must keep working to refuse requests and shut down after a panic has
    // latched the export failed (see `Failed`).
    m.lock().unwrap_or_else(PoisonError::into_inner)
}

impl Shared {
    fn start_connection(self: &Arc<Self>, id: u64, stream: Stream) -> io::Result<()> {
        let peer = stream.peer();
        let Some(activity) = self.conns.admit(id, &stream, peer.clone())? else {
            // Refused (and logged by the table); dropping the stream closes it.
            return Ok(());
        };
        self.stats.started();
        let shared = Arc::clone(self);
        let spawned = thread::Builder::new()
            .name(format!("nbd-conn-{id}"))
            .spawn(move || {
                // A panic outside a request handler (those catch their own) fails the
                // export the same way; the connection's bookkeeping ends either way.
                let served = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
                    shared.serve(id, stream, &peer.detail, &activity);
                }));
                if served.is_err() {
                    shared.failed.record("serving a connection", 0);
                }
                // Let go of the export before the table says this connection ended: shutdown
                // waits for an empty table and then expects to hold the last reference, to
                // close the volume cleanly.
                let table = Arc::clone(&shared.conns);
                let stats = shared.stats.clone();
                drop(shared);
                table.remove(id);
                stats.ended();
            });
        if let Err(e) = spawned {
            self.conns.remove(id);
            self.stats.ended();
            return Err(e);
        }
        Ok(())
    }

    /// Unblocks every reader (they then drain their in-flight requests) and waits for all
    /// connections to end.
    fn stop_connections(&self) {
        self.conns.shutdown_all(Shutdown::Read);
        let left = self.conns.wait_empty(Some(Instant::now() + SHUTDOWN_GRACE));
        if left > 0 {
            // Clients that stopped reading their replies: cut them off so their writers
            // fail instead of blocking shutdown forever.
            tracing::warn!(connections = left, "closing connections that do not drain");
            self.conns.shutdown_all(Shutdown::Both);
            self.conns.wait_empty(None);
        }
        self.conns.flush_log();
    }

    /// Runs one connection to its end.
    fn serve(self: &Arc<Self>, id: u64, stream: Stream, peer: &str, activity: &Arc<Activity>) {
        let span = tracing::info_span!("conn", id, peer);
        let _guard = span.enter();
        let stream = Channel::Plain(stream);
        let Ok(mut writer) = stream.try_clone() else {
            return;
        };
        // The table closes the socket at the handshake deadline; this is only a backstop.
        if let Err(e) = writer.set_write_timeout(Some(self.cfg.handshake_timeout)) {
            tracing::debug!(error = %e, "cannot set write timeout");
        }
        let mut reader = BufReader::with_capacity(READ_BUFFER, stream);
        let handshake = self.handshake(&mut reader, &mut writer, activity);
        let negotiated = match handshake {
            Ok(Some(n)) => n,
            Ok(None) => {
                writer.close();
                return;
            }
            Err(e) => {
                tracing::debug!(error = %e, "handshake ended");
                writer.close();
                return;
            }
        };
        tracing::info!(
            export = %negotiated.export_name,
            mode = ?negotiated.mode,
            base_allocation = negotiated.meta_context.is_some(),
            "client connected"
        );
        if let Err(e) = writer.set_write_timeout(Some(WRITE_PROBE)) {
            tracing::debug!(error = %e, "cannot set write timeout");
        }
        let conn = Arc::new(Conn {
            session: Session::new(&negotiated, self.export.size(), self.cfg.max_payload),
            failed: Arc::clone(&self.failed),
            export: Arc::clone(&self.export),
            buffers: Arc::clone(&self.buffers),
            stream: Mutex::new(writer),
            queue: Mutex::new(OutQueue::default()),
            queue_cv: Condvar::new(),
            inflight: Mutex::new(Inflight::default()),
            inflight_cv: Condvar::new(),
            broken: AtomicBool::new(false),
            activity: Arc::clone(activity),
            clock: Arc::clone(self.conns.clock()),
            budget: Arc::clone(&self.budget),
            min_rate: self.cfg.min_transfer_rate,
            write_deadline: self.cfg.request_timeout.saturating_add(WRITER_BACKSTOP),
        });
        let writer = {
            let conn = Arc::clone(&conn);
            let span = span.clone();
            thread::Builder::new()
                .name(format!("nbd-writer-{id}"))
                .spawn(move || {
                    let _guard = span.enter();
                    conn.write_loop();
                })
        };
        let reason = match writer {
            Ok(writer) => {
                // Closed however the reader ends, a panic included, so the writer thread
                // always exits.
                let closing = CloseQueue(&conn);
                let reason = self.transmission(&mut reader, &conn);
                conn.wait_idle();
                drop(closing);
                let _ = writer.join();
                reason
            }
            Err(e) => {
                tracing::warn!(error = %e, "cannot start writer thread");
                "no writer thread"
            }
        };
        lock(&conn.stream).close();
        tracing::info!(reason, "client disconnected");
    }

    /// Runs the handshake; `Ok(None)` when the client aborted. After `STARTTLS`, `reader` and
    /// `w` are the TLS session.
    fn handshake(
        &self,
        reader: &mut BufReader<Channel>,
        w: &mut Channel,
        activity: &Activity,
    ) -> io::Result<Option<Negotiated>> {
        // The connection table closes the socket at the handshake deadline; the per-read
        // timeout is only a backstop.
        reader
            .get_ref()
            .set_read_timeout(Some(self.cfg.handshake_timeout))?;
        let mut hs = Handshake::new(self.hs_config.clone());
        let mut buf = Vec::new();
        loop {
            let out = hs.take_output();
            if !out.is_empty() {
                w.write_all(&out)?;
            }
            if self.shutdown.is_requested() {
                hs.set_shutting_down();
            }
            buf.resize(hs.want(), 0);
            reader.read_exact(&mut buf)?;
            activity.touch(self.conns.clock());
            match hs.feed(&buf) {
                Ok(Event::Continue) => {}
                Ok(Event::Transmission(n)) => {
                    // Before the client can see the handshake end: from then on it is a
                    // client in transmission, never evicted as a stalled handshake.
                    activity.start_transmission(self.conns.clock());
                    w.write_all(&hs.take_output())?;
                    reader.get_ref().set_read_timeout(None)?;
                    return Ok(Some(n));
                }
                Ok(Event::Close) => {
                    // The client may have hung up already; the ACK is best effort.
                    let _ = w.write_all(&hs.take_output());
                    return Ok(None);
                }
                Ok(Event::StartTls) => {
                    w.write_all(&hs.take_output())?;
                    let tls = Channel::Tls(self.start_tls(reader)?);
                    // The socket's timeouts (the handshake's) hold for the TLS session too.
                    tls.set_write_timeout(Some(self.cfg.handshake_timeout))?;
                    *w = tls.try_clone()?;
                    *reader = BufReader::with_capacity(READ_BUFFER, tls);
                    hs.tls_started();
                }
                Err(e) => {
                    tracing::warn!(error = %e, "handshake failed; disconnecting client");
                    return Err(io::Error::new(io::ErrorKind::InvalidData, e));
                }
            }
        }
    }

    /// Runs the TLS handshake on the client's socket (after the `STARTTLS` ACK); the rest of
    /// the session goes through the stream it returns.
    fn start_tls(&self, reader: &BufReader<Channel>) -> io::Result<TlsStream> {
        // Bytes the client sent after STARTTLS without waiting for the ACK were read as
        // plain text: they must not reach the TLS session, nor be taken for options (the
        // STARTTLS command-injection flaw).
        if !reader.buffer().is_empty() {
            return Err(io::Error::new(
                io::ErrorKind::InvalidData,
                "client sent data after NBD_OPT_STARTTLS before its reply",
            ));
        }
        let Some(tls) = &self.cfg.tls else {
            return Err(io::Error::other("STARTTLS accepted without TLS configured"));
        };
        tls::accept(tls, reader.get_ref().socket()).inspect_err(|e| {
            tracing::warn!(error = %e, "TLS handshake failed; disconnecting client");
        })
    }

    /// Reads and dispatches requests until the client leaves; returns why.
    fn transmission(&self, reader: &mut BufReader<Channel>, conn: &Arc<Conn>) -> &'static str {
        let mut hdr = vec![0u8; conn.session.header_len()];
        let mut spin = SpinState::default();
        loop {
            if conn.broken.load(Ordering::SeqCst) {
                return "write failed";
            }
            if reader.buffer().is_empty() {
                let stream = reader.get_ref();
                spin.wait(&self.spin, &self.spinners, || stream.readable_now());
            }
            if let Err(e) = reader.read_exact(&mut hdr) {
                return if e.kind() == io::ErrorKind::UnexpectedEof {
                    // Includes clients that hang up without NBD_CMD_DISC, and shutdown.
                    "connection closed"
                } else {
                    "read failed"
                };
            }
            let req = match conn.session.parse_header(&hdr) {
                Ok(r) => r,
                Err(e) => {
                    tracing::warn!(error = %e, "protocol violation; disconnecting client");
                    return "protocol violation";
                }
            };
            if req.typ == proto::CMD_DISC {
                return "NBD_CMD_DISC";
            }
            // Memory is granted before the payload is read or the reply built: a client
            // that does not read its replies stops being read here.
            let cost = request_cost(&req, &conn.session);
            let acquired = conn.acquire(cost, &self.cfg, reader.get_ref(), &|| self.conns.relieve());
            let Some(was_idle) = acquired else {
                return if conn.broken.load(Ordering::SeqCst) {
                    "write failed"
                } else {
                    "closed while waiting for memory"
                };
            };
            let mut payload = Payload::take(&conn.buffers, req.payload_len);
            if let Err(e) = read_payload(reader, &mut payload, &conn.activity, &conn.clock) {
                // The write was never acknowledged, so dropping it loses nothing promised.
                drop(payload);
                conn.release(cost);
                if conn.activity.is_closing() {
                    // The table closed it (and logs whom, and why).
                    tracing::debug!(error = %e, released = cost, "payload stalled; connection closed, its memory released");
                    return "closed by the server: request payload stalled";
                }
                tracing::warn!(error = %e, "client disconnected in the middle of a request");
                return "disconnected mid-request";
            }
            // The last request of a burst (nothing more buffered) runs right here: at queue
            // depth 1 there is nothing to overlap with, and under load the reader taking
            // its share saves a hand-off per burst. Big requests that could overlap with
            // others still go to the pool, so one connection's large writes run in parallel.
            if reader.buffer().is_empty() && (was_idle || cost <= INLINE_MAX) {
                conn.execute(req, payload, cost);
            } else {
                let conn = Arc::clone(conn);
                let job: Job = Box::new(move || conn.execute(req, payload, cost));
                self.pool.submit(job);
            }
        }
    }
}

/// Reads a write payload into `buf`. One already buffered with its header (small writes,
/// usually) is copied; otherwise each read is stamped in `activity` (a few relaxed stores,
/// no system call of its own), from which the connection table tells a stalled payload (see
/// `conns::Transfer`) and closes its connection, which ends the read here.
fn read_payload(
    reader: &mut BufReader<Channel>,
    buf: &mut [u8],
    activity: &Activity,
    clock: &Clock,
) -> io::Result<()> {
    if reader.buffer().len() >= buf.len() {
        return reader.read_exact(buf);
    }
    activity.payload_started(buf.len(), clock);
    let mut got = 0;
    let read = loop {
        if got == buf.len() {
            break Ok(());
        }
        match reader.read(&mut buf[got..]) {
            Ok(0) => break Err(io::ErrorKind::UnexpectedEof.into()),
            Ok(n) => {
                got += n;
                activity.payload_progressed(got, clock);
            }
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => break Err(e),
        }
    };
    activity.payload_done();
    read
}

/// Closes a connection's reply queue when dropped (see [`Conn::close_queue`]).
struct CloseQueue<'a>(&'a Conn);

impl Drop for CloseQueue<'_> {
    fn drop(&mut self) {
        self.0.close_queue();
    }
}

/// What a client is told when a request is refused after a panic.
const FAILED_MESSAGE: &str =
    "the server refuses writes and flushes after an internal error (a request handler panicked)";

/// True for the commands a failed server refuses: those that change data or promise
/// durability.
fn changes_data(typ: u16) -> bool {
    matches!(
        typ,
        proto::CMD_WRITE | proto::CMD_FLUSH | proto::CMD_TRIM | proto::CMD_WRITE_ZEROES
    )
}

/// Panics caught in request handlers or connection threads. The first latches the export
/// failed for good: it is logged (once), writes and flushes are refused from then on, the
/// export is not flushed at shutdown, and [`Server::run`] returns [`ServerError::Panicked`].
#[derive(Debug, Default)]
struct Failed {
    panics: AtomicU64,
}

impl Failed {
    fn record(&self, during: &str, offset: u64) {
        if self.panics.fetch_add(1, Ordering::SeqCst) == 0 {
            tracing::error!(
                during,
                offset,
                "internal error: a request handler panicked; refusing writes and flushes from \
                 now on (reads go on); the server will exit with an error at shutdown"
            );
        }
    }

    fn is_set(&self) -> bool {
        self.panics.load(Ordering::Relaxed) > 0
    }
}

/// Largest request (payload or read length) the reader runs itself while others are in
/// flight.
const INLINE_MAX: usize = 64 << 10;

/// Memory a request holds while in flight (its payload or its read buffer).
fn request_cost(req: &Request, s: &Session) -> usize {
    let read = if req.typ == proto::CMD_READ {
        usize_of(req.length.min(u64::from(s.max_payload)))
    } else {
        0
    };
    req.payload_len + read
}

#[derive(Default)]
struct Inflight {
    count: usize,
    bytes: usize,
    /// The reader waits for room or for idleness. Condvar notifications cost a system call
    /// even without waiters, so releases only notify when this is set.
    waiting: bool,
}

/// Replies of one connection that are not on the wire yet.
#[derive(Default)]
struct OutQueue {
    /// Encoded replies with the in-flight cost each one releases once written.
    replies: VecDeque<(ReplyBytes, usize)>,
    /// Some thread is sending (it drains `replies` before it stops).
    writing: bool,
    /// A batch the socket did not take without blocking, with the bytes already sent:
    /// the writer thread finishes it with blocking writes.
    stalled: Option<(Batch, usize)>,
    /// The connection is ending: the writer thread exits once nothing is left.
    closed: bool,
}

/// Encoded replies, each with the in-flight cost it releases once written.
type Batch = Vec<(ReplyBytes, usize)>;

/// Most replies gathered into one vectored write.
const MAX_BATCH: usize = 64;

/// One connection in the transmission phase.
///
/// Whoever completes a request sends its reply, with a non-blocking vectored write that also
/// carries every other reply queued meanwhile ("combining": while one thread sends, others
/// only queue). Only when the socket is full — a slow client, or one that stopped reading —
/// does the rest go to the connection's writer thread, which blocks on the socket; so a
/// client that stops reading stalls only itself, never the shared worker pool.
struct Conn {
    session: Session,
    failed: Arc<Failed>,
    export: Arc<dyn Export>,
    buffers: Arc<BufferPool>,
    stream: Mutex<Channel>,
    queue: Mutex<OutQueue>,
    queue_cv: Condvar,
    inflight: Mutex<Inflight>,
    inflight_cv: Condvar,
    broken: AtomicBool,
    /// What the connection table reads to tell idle connections from busy ones.
    activity: Arc<Activity>,
    /// The server's memory budget for requests in flight.
    budget: Arc<Budget>,
    clock: Arc<Clock>,
    /// The slowest a request's data may move (bytes per second).
    min_rate: u64,
    /// How long replies may stall before the writer gives up (see [`WRITER_BACKSTOP`]).
    write_deadline: Duration,
}

impl Conn {
    /// Waits for room for a request of `cost` bytes, on this connection and in the server's
    /// whole budget (asking `relieve` for memory held by unread replies when that takes long);
    /// returns whether nothing was in flight, or `None` if the connection was closed, or the
    /// client hung up `socket` (the reader's end of the connection), before it got room.
    ///
    /// A request counts as in flight from here until its reply has been written, so the
    /// bounds cover payloads being read, executing requests and unsent replies alike.
    fn acquire(&self, cost: usize, cfg: &ServerConfig, socket: &Channel, relieve: &dyn Fn()) -> Option<bool> {
        {
            let mut f = lock(&self.inflight);
            while f.count > 0
                && (f.count >= cfg.max_inflight_requests || f.bytes + cost > cfg.max_inflight_bytes)
            {
                f.waiting = true;
                f = self.inflight_cv.wait(f).unwrap_or_else(PoisonError::into_inner);
            }
            f.waiting = false;
        }
        // Meanwhile only this connection's releases change its counts: the room stays.
        let closed = || self.broken.load(Ordering::Relaxed) || self.activity.is_closing();
        // The previous request's reply may just have failed (the client left): then this one
        // takes no memory either, even when there is plenty.
        if closed() {
            return None;
        }
        // While it waits for memory, a request also gives up when its client hangs up: the
        // reply could never be sent, and clients that queue large reads and leave would
        // otherwise be served one by one, holding the memory long after they left. (Only
        // asked while waiting: it costs a system call.)
        let gone = || closed() || socket.hung_up();
        // In flight for the connection table from here: a connection whose request waits for
        // memory is busy, never closed as idle (it is the stalled ones that make way).
        self.activity.request_started(&self.clock);
        if !self.budget.take(cost, &gone, relieve) {
            self.activity.request_done(&self.clock);
            return None;
        }
        let mut f = lock(&self.inflight);
        let idle = f.count == 0;
        f.count += 1;
        f.bytes += cost;
        Some(idle)
    }

    fn release(&self, cost: usize) {
        self.budget.give(cost);
        let mut f = lock(&self.inflight);
        f.count -= 1;
        f.bytes -= cost;
        self.activity.request_done(&self.clock);
        if f.waiting {
            self.inflight_cv.notify_all();
        }
    }

    fn wait_idle(&self) {
        let mut f = lock(&self.inflight);
        while f.count > 0 {
            f.waiting = true;
            f = self.inflight_cv.wait(f).unwrap_or_else(PoisonError::into_inner);
        }
        f.waiting = false;
    }

    /// Runs a request. After a panic anywhere in the server an invariant may be broken, so
    /// nothing more may be promised durable: the panic is answered `EIO` and latches the
    /// export failed, and from then on writes and flushes are refused (reads go on).
    fn run(&self, req: &Request, payload: Payload) -> Outcome {
        if self.failed.is_set() && changes_data(req.typ) {
            return Outcome::Reply(self.session.error_reply(req, proto::EIO, FAILED_MESSAGE));
        }
        // The payload goes back to the pool when dropped: at once, or once a write's data
        // has left the engine's write-back stage.
        let outcome = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
            self.session
                .handle_with(&*self.export, req, payload, &self.buffers)
        }));
        outcome.unwrap_or_else(|_| {
            self.failed.record(proto::command_name(req.typ), req.offset);
            Outcome::Reply(self.session.error_reply(req, proto::EIO, FAILED_MESSAGE))
        })
    }

    /// Executes a request (on a worker or the reader) and sends or queues its reply.
    fn execute(&self, req: Request, payload: Payload, cost: usize) {
        match self.run(&req, payload) {
            Outcome::Reply(bytes) => self.complete(bytes, cost),
            Outcome::Disconnect => self.release(cost),
        }
    }

    /// Sends `reply` now if no other thread is sending, together with whatever is queued;
    /// otherwise queues it for the thread that is.
    fn complete(&self, reply: ReplyBytes, cost: usize) {
        let mut q = lock(&self.queue);
        q.replies.push_back((reply, cost));
        if q.writing {
            return;
        }
        q.writing = true;
        loop {
            let n = q.replies.len().min(MAX_BATCH);
            let batch: Batch = q.replies.drain(..n).collect();
            drop(q);
            let sent = self.send_nonblocking(&batch);
            q = lock(&self.queue);
            let total: usize = batch.iter().map(|(b, _)| b.len()).sum();
            if sent < total {
                // The socket is full: the writer thread finishes this batch and drains the
                // queue with blocking writes; `writing` stays set until it is done.
                self.activity.stalled(&self.clock);
                q.stalled = Some((batch, sent));
                self.queue_cv.notify_all();
                return;
            }
            drop(q);
            self.recycle(batch);
            q = lock(&self.queue);
            if q.replies.is_empty() {
                q.writing = false;
                if q.closed {
                    // The writer thread waits for the last sender to finish before exiting.
                    self.queue_cv.notify_all();
                }
                return;
            }
        }
    }

    /// Writes as much of `batch` as the socket takes without blocking; returns the bytes
    /// written (all of them when the connection is broken: those replies are dropped).
    fn send_nonblocking(&self, batch: &[(ReplyBytes, usize)]) -> usize {
        let total: usize = batch.iter().map(|(b, _)| b.len()).sum();
        if self.broken.load(Ordering::SeqCst) {
            return total;
        }
        let stream = lock(&self.stream);
        let mut slices: Vec<IoSlice<'_>> = batch.iter().map(|(b, _)| IoSlice::new(b)).collect();
        let mut rest = &mut slices[..];
        let mut sent = 0;
        while sent < total {
            match stream.send_vectored_nonblocking(rest) {
                Ok(0) => break,
                Ok(n) => {
                    sent += n;
                    IoSlice::advance_slices(&mut rest, n);
                }
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => break,
                Err(e) => {
                    self.fail(&stream, &e);
                    return total;
                }
            }
        }
        sent
    }

    fn fail(&self, stream: &Channel, e: &io::Error) {
        if !self.broken.swap(true, Ordering::SeqCst) {
            tracing::debug!(error = %e, "cannot send reply; closing connection");
        }
        stream.shutdown(Shutdown::Both);
    }

    /// The writer thread: finishes batches the socket would not take at once, with blocking
    /// writes (bounded by the socket's write timeout), then drains the queue.
    fn write_loop(&self) {
        loop {
            let (batch, sent) = {
                let mut q = lock(&self.queue);
                loop {
                    if let Some(stalled) = q.stalled.take() {
                        break stalled;
                    }
                    if q.closed && !q.writing {
                        return;
                    }
                    q = self.queue_cv.wait(q).unwrap_or_else(PoisonError::into_inner);
                }
            };
            self.send_blocking(&batch, sent);
            self.recycle(batch);
            // Keep the sender role until the queue is empty.
            loop {
                let batch: Batch = {
                    let mut q = lock(&self.queue);
                    if q.replies.is_empty() {
                        q.writing = false;
                        self.activity.unstalled();
                        break;
                    }
                    let n = q.replies.len().min(MAX_BATCH);
                    q.replies.drain(..n).collect()
                };
                self.send_blocking(&batch, 0);
                self.recycle(batch);
            }
        }
    }

    /// Writes `batch` after skipping `skip` bytes already sent, blocking as needed. Progress
    /// is stamped for the connection table as a transfer (`conns::Transfer`): a client that
    /// stops reading, or reads slower than the minimum rate, is stalled, and closed at the
    /// request timeout; this gives up (and closes the connection) itself a little later.
    fn send_blocking(&self, batch: &[(ReplyBytes, usize)], skip: usize) {
        if self.broken.load(Ordering::SeqCst) {
            return;
        }
        let mut stream = lock(&self.stream);
        let mut slices: Vec<IoSlice<'_>> = batch.iter().map(|(b, _)| IoSlice::new(b)).collect();
        let mut rest = &mut slices[..];
        IoSlice::advance_slices(&mut rest, skip);
        let began = Instant::now();
        let ms = |t: Instant| u64::try_from(t.duration_since(began).as_millis()).unwrap_or(u64::MAX);
        let deadline = u64::try_from(self.write_deadline.as_millis()).unwrap_or(u64::MAX);
        let mut transfer = Transfer {
            started: 0,
            moved: 0,
            done: 0,
        };
        while !rest.is_empty() {
            // The socket's write timeout (WRITE_PROBE) returns control now and then, so
            // progress is seen (and a client that reads nothing is told from a slow one).
            match stream.write_vectored(rest) {
                Ok(0) => {
                    self.fail(&stream, &io::ErrorKind::WriteZero.into());
                    return;
                }
                Ok(n) => {
                    IoSlice::advance_slices(&mut rest, n);
                    transfer.moved = ms(Instant::now());
                    transfer.done += n as u64;
                    let behind = transfer.behind_ms(transfer.moved, self.min_rate);
                    self.activity.progressed(&self.clock, behind);
                }
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e)
                    if matches!(e.kind(), io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut)
                        && transfer.stalled_for(ms(Instant::now()), self.min_rate) < deadline => {}
                Err(e) => {
                    self.fail(&stream, &e);
                    return;
                }
            }
        }
    }

    /// After sending: frees the requests' in-flight budget and keeps their buffers.
    fn recycle(&self, batch: Batch) {
        for (bytes, cost) in batch {
            self.buffers.give(bytes.into_buffer());
            self.release(cost);
        }
    }

    /// Lets the writer thread exit once nothing is left to send.
    fn close_queue(&self) {
        lock(&self.queue).closed = true;
        self.queue_cv.notify_all();
    }
}
