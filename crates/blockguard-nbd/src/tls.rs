//! TLS for NBD connections (`NBD_OPT_STARTTLS`): the server's certificate, key and optional
//! client CA, and [`TlsStream`], the encrypted stream the rest of a session goes through.
//!
//! PEM loading is `blockguard_backend::tls`, shared with the NBD client (which sits below
//! this crate).
//!
//! # Design: one `rustls` session shared by the reader and the senders
//!
//! After the TLS handshake the connection's reader thread and whichever thread sends replies
//! use one `rustls::ServerConnection` under a mutex, held only to encrypt or decrypt and for
//! non-blocking socket calls, never across a blocking read or a wait for room in the socket:
//! a client that stops reading its replies does not keep what it sends from being decrypted,
//! and the reader waiting for the next request never delays a reply. The transmission code
//! sees it through [`crate::channel::Channel`], the same seam as a plain socket: non-blocking
//! vectored sends, blocking sends bounded by a write timeout, readiness and hang-up checks,
//! and a shutdown of the socket from the connection table all keep their meaning.
//!
//! This replaced a tunnel (two pump threads per connection bridged to the NBD code over a Unix
//! socket pair), whose extra copies and thread hops were about a quarter of a TLS server's CPU
//! time on 1 MiB reads (docs/PERFORMANCE.md, "TLS").
//!
//! Records: replies are encrypted [`SEND_CHUNK`] bytes at a time into full 16 KiB records
//! (`rustls`' default fragment size) and leave with one vectored `sendmsg` per chunk;
//! ciphertext is read [`RECV_CHUNK`] bytes at a time.

use crate::stream::Stream;
use blockguard_backend::tls::{load_certs, load_key, load_roots, provider, PemError};
use rustls::crypto::CryptoProvider;
use rustls::server::WebPkiClientVerifier;
use rustls::{ServerConnection, SupportedCipherSuite};
use std::fmt;
use std::io::{self, IoSlice, Read, Write};
use std::net::Shutdown;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use std::time::Duration;

/// Whether clients must start TLS.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TlsMode {
    /// Only `NBD_OPT_STARTTLS` and `NBD_OPT_ABORT` are served before TLS is up.
    Required,
    /// Clients may start TLS or stay in plain text.
    Optional,
}

/// The server's TLS identity and policy, loaded once at startup.
#[derive(Clone)]
pub struct TlsConfig {
    server: Arc<rustls::ServerConfig>,
    mode: TlsMode,
    client_certificates: bool,
}

impl fmt::Debug for TlsConfig {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("TlsConfig")
            .field("mode", &self.mode)
            .field("client_certificates", &self.client_certificates)
            .finish_non_exhaustive()
    }
}

/// Why the TLS files could not be used.
#[derive(Debug, thiserror::Error)]
pub enum TlsError {
    /// A file could not be read or holds no usable PEM item of the kind needed.
    #[error("{}: {what}", path.display())]
    Pem {
        /// The file.
        path: PathBuf,
        /// What was wrong with it.
        what: String,
    },
    /// The certificate chain and key do not make a usable server identity (e.g. the key
    /// does not belong to the certificate).
    #[error("{} with {}: not a usable server identity", cert.display(), key.display())]
    Identity {
        /// The certificate file.
        cert: PathBuf,
        /// The key file.
        key: PathBuf,
        /// What `rustls` refused.
        source: rustls::Error,
    },
    /// The client CA file cannot verify client certificates.
    #[error("{}: cannot verify client certificates with it", path.display())]
    ClientCa {
        /// The CA file.
        path: PathBuf,
        /// What `rustls` refused.
        source: rustls::server::VerifierBuilderError,
    },
}

impl From<PemError> for TlsError {
    fn from(e: PemError) -> Self {
        TlsError::Pem {
            path: e.path,
            what: e.what,
        }
    }
}

impl TlsConfig {
    /// Loads the server's certificate chain and private key (PEM files) and, if given, the
    /// CA whose certificates clients must present (client certificates are then required
    /// and verified). TLS 1.2 and 1.3 with `rustls`' safe defaults.
    pub fn from_pem_files(
        cert: &Path,
        key: &Path,
        client_ca: Option<&Path>,
        mode: TlsMode,
    ) -> Result<TlsConfig, TlsError> {
        let chain = load_certs(cert, "the server certificate")?;
        let key_der = load_key(key)?;
        let provider = Arc::new(prefer_aes128(&provider()));
        let builder = rustls::ServerConfig::builder_with_provider(Arc::clone(&provider))
            .with_safe_default_protocol_versions()
            .map_err(|source| TlsError::Identity {
                cert: cert.to_path_buf(),
                key: key.to_path_buf(),
                source,
            })?;
        let builder = match client_ca {
            None => builder.with_no_client_auth(),
            Some(ca) => {
                let roots = load_roots(ca, "the client CA")?;
                let verifier = WebPkiClientVerifier::builder_with_provider(Arc::new(roots), provider)
                    .build()
                    .map_err(|source| TlsError::ClientCa {
                        path: ca.to_path_buf(),
                        source,
                    })?;
                builder.with_client_cert_verifier(verifier)
            }
        };
        let mut server = builder
            .with_single_cert(chain, key_der)
            .map_err(|source| TlsError::Identity {
                cert: cert.to_path_buf(),
                key: key.to_path_buf(),
                source,
            })?;
        // Our order (`prefer_aes128`), not the client's: GnuTLS, qemu's and libnbd's TLS, puts
        // AES-256-GCM first.
        server.ignore_client_order = true;
        Ok(TlsConfig {
            server: Arc::new(server),
            mode,
            client_certificates: client_ca.is_some(),
        })
    }

    /// Whether TLS is required or optional.
    pub fn mode(&self) -> TlsMode {
        self.mode
    }

    /// Whether clients must present a certificate signed by the client CA.
    pub fn requires_client_certificates(&self) -> bool {
        self.client_certificates
    }
}

/// `base` with the AES-128-GCM suites first, then AES-256-GCM, then the rest (`ChaCha20`),
/// each group in `base`'s order (TLS 1.3 first). Bulk data is what a block server's TLS
/// costs: AES-128 takes 10 rounds per block where AES-256 takes 14, for the client as much as
/// for the server, with the same security margin for this purpose (AES-128-GCM is TLS 1.3's
/// mandatory suite). A client without AES instructions, which would rather have `ChaCha20`,
/// still gets AES if it offers it: not worth a heuristic for a block device's clients.
fn prefer_aes128(base: &CryptoProvider) -> CryptoProvider {
    use rustls::CipherSuite as S;
    let rank = |s: &SupportedCipherSuite| match s.suite() {
        S::TLS13_AES_128_GCM_SHA256
        | S::TLS_ECDHE_ECDSA_WITH_AES_128_GCM_SHA256
        | S::TLS_ECDHE_RSA_WITH_AES_128_GCM_SHA256 => 0,
        S::TLS13_AES_256_GCM_SHA384
        | S::TLS_ECDHE_ECDSA_WITH_AES_256_GCM_SHA384
        | S::TLS_ECDHE_RSA_WITH_AES_256_GCM_SHA384 => 1,
        _ => 2,
    };
    let mut provider = base.clone();
    // Stable: the order within each group is kept.
    provider.cipher_suites.sort_by_key(rank);
    provider
}

/// Most plain text encrypted per send: 16 full records, one `sendmsg`. Small enough that the
/// records are still in the CPU cache when the kernel copies them, large enough that a 1 MiB
/// reply takes only a few system calls.
const SEND_CHUNK: usize = 256 << 10;

/// Most ciphertext read per `recv`.
const RECV_CHUNK: usize = 64 << 10;

/// Runs the TLS handshake on the client's socket (blocking, bounded by its read and write
/// timeouts and by the connection table, which shuts the socket down at the handshake
/// deadline) and returns the encrypted stream over it.
pub(crate) fn accept(cfg: &TlsConfig, socket: &Stream) -> io::Result<TlsStream> {
    let mut conn = ServerConnection::new(Arc::clone(&cfg.server)).map_err(io::Error::other)?;
    let mut sock = socket.try_clone()?;
    while conn.is_handshaking() {
        // Sends the alert, if any, before returning the handshake's error.
        conn.complete_io(&mut sock)?;
    }
    // Session tickets, queued as the handshake ends.
    while conn.wants_write() {
        conn.write_tls(&mut sock)?;
    }
    tracing::debug!(
        version = ?conn.protocol_version(),
        suite = ?conn.negotiated_cipher_suite().map(|s| s.suite()),
        "TLS handshake complete"
    );
    // What is encrypted at a time is bounded here (`SEND_CHUNK`), not by `rustls`.
    conn.set_buffer_limit(None);
    Ok(TlsStream {
        shared: Arc::new(Shared {
            socket: sock,
            state: Mutex::new(State { conn, committed: 0 }),
            inbound: Mutex::new(Inbound::default()),
            write_timeout: Mutex::new(None),
        }),
    })
}

/// A TLS session on a client's socket, after its handshake. Handles made by
/// [`TlsStream::try_clone`] share the session: one reads (the connection's reader), the others
/// send, one at a time (the connection's send lock sees to that).
#[derive(Debug)]
pub(crate) struct TlsStream {
    shared: Arc<Shared>,
}

struct Shared {
    socket: Stream,
    state: Mutex<State>,
    /// Ciphertext received and not yet given to `rustls`; only the reader takes this lock.
    inbound: Mutex<Inbound>,
    /// How long a blocking send waits for room in the socket (`None`: for ever).
    write_timeout: Mutex<Option<Duration>>,
}

impl fmt::Debug for Shared {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("TlsStream")
            .field("socket", &self.socket)
            .finish_non_exhaustive()
    }
}

struct State {
    conn: ServerConnection,
    /// Plain-text bytes already encrypted whose records have not all reached the socket: a
    /// send that found the socket full reports them written only once they have, to the call
    /// that retries with the same bytes (see [`TlsStream::send`]).
    committed: usize,
}

/// A buffer of received ciphertext: `buf[start..end]` is not yet given to `rustls`.
#[derive(Default)]
struct Inbound {
    buf: Vec<u8>,
    start: usize,
    end: usize,
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    // A panic while the lock was held leaves a session the connection drops anyway (it ends
    // the connection's thread, or fails the request, which closes it).
    m.lock().unwrap_or_else(PoisonError::into_inner)
}

/// The socket, written with `MSG_DONTWAIT`: what `rustls` writes its records to.
struct NonBlocking<'a>(&'a Stream);

impl Write for NonBlocking<'_> {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        self.0.send_vectored_nonblocking(&[IoSlice::new(buf)])
    }
    fn write_vectored(&mut self, bufs: &[IoSlice<'_>]) -> io::Result<usize> {
        self.0.send_vectored_nonblocking(bufs)
    }
    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

/// Hands the socket every record `conn` has queued, without blocking; true when none is left.
fn push_records(conn: &mut ServerConnection, socket: &Stream) -> io::Result<bool> {
    while conn.wants_write() {
        match conn.write_tls(&mut NonBlocking(socket)) {
            Ok(0) => return Err(io::ErrorKind::WriteZero.into()),
            Ok(_) => {}
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => return Ok(false),
            Err(e) => return Err(e),
        }
    }
    Ok(true)
}

/// At most `limit` bytes of `bufs`, as slices.
fn prefix<'a>(bufs: &'a [IoSlice<'_>], limit: usize) -> Vec<IoSlice<'a>> {
    let mut out = Vec::with_capacity(bufs.len().min(64));
    let mut left = limit;
    for b in bufs {
        if left == 0 {
            break;
        }
        let b: &'a [u8] = b;
        let take = b.len().min(left);
        out.push(IoSlice::new(&b[..take]));
        left -= take;
    }
    out
}

impl TlsStream {
    /// Another handle on the same session.
    pub(crate) fn try_clone(&self) -> TlsStream {
        TlsStream {
            shared: Arc::clone(&self.shared),
        }
    }

    /// The client's socket.
    pub(crate) fn socket(&self) -> &Stream {
        &self.shared.socket
    }

    /// Bounds every blocking send (`None`: unbounded), like `SO_SNDTIMEO` on a plain socket.
    pub(crate) fn set_write_timeout(&self, t: Option<Duration>) -> io::Result<()> {
        // The handshake wrote to the socket itself; sends now wait with `poll`.
        self.shared.socket.set_write_timeout(t)?;
        *lock(&self.shared.write_timeout) = t;
        Ok(())
    }

    /// Encrypts up to [`SEND_CHUNK`] bytes of `bufs` and hands the records to the socket,
    /// waiting up to `wait` for room (zero: not at all; `Duration::MAX`: for ever). Returns how many plain-text bytes
    /// have left, all of their records in the socket; `WouldBlock` when the socket stayed
    /// full.
    ///
    /// Records that did not fit stay queued, and the bytes they carry count as written only
    /// once they have left, on the next call: the caller must retry with the same bytes
    /// (as after a partial write of a plain socket, nothing else may be sent meanwhile). Each
    /// connection has one sender at a time, which retries its batch until it is out or the
    /// connection is closed.
    fn send(&self, bufs: &[IoSlice<'_>], wait: Duration) -> io::Result<usize> {
        let socket = &self.shared.socket;
        let mut st = lock(&self.shared.state);
        if st.committed == 0 {
            let chunk = prefix(bufs, SEND_CHUNK);
            st.committed = st.conn.writer().write_vectored(&chunk)?;
        } else {
            debug_assert!(bufs.iter().map(|b| b.len()).sum::<usize>() >= st.committed);
        }
        loop {
            if push_records(&mut st.conn, socket)? {
                return Ok(std::mem::take(&mut st.committed));
            }
            if wait.is_zero() {
                return Err(io::ErrorKind::WouldBlock.into());
            }
            // The reader may decrypt meanwhile.
            drop(st);
            if !socket.wait_writable(wait)? {
                return Err(io::ErrorKind::WouldBlock.into());
            }
            st = lock(&self.shared.state);
        }
    }

    /// [`Stream::send_vectored_nonblocking`] through TLS.
    pub(crate) fn send_vectored_nonblocking(&self, bufs: &[IoSlice<'_>]) -> io::Result<usize> {
        self.send(bufs, Duration::ZERO)
    }

    /// True if a read would not block: plain text or ciphertext is buffered, or the socket
    /// is readable.
    pub(crate) fn readable_now(&self) -> bool {
        {
            let inbound = lock(&self.shared.inbound);
            if inbound.start < inbound.end {
                return true;
            }
        }
        let buffered = match lock(&self.shared.state).conn.process_new_packets() {
            Ok(io) => io.plaintext_bytes_to_read() > 0 || io.peer_has_closed(),
            // The read reports it.
            Err(_) => true,
        };
        buffered || self.shared.socket.readable_now()
    }

    /// Sends `close_notify` (best effort: never blocks) and shuts the socket down.
    pub(crate) fn close(&self) {
        {
            let mut st = lock(&self.shared.state);
            st.conn.send_close_notify();
            let _ = push_records(&mut st.conn, &self.shared.socket);
        }
        self.shared.socket.shutdown(Shutdown::Both);
    }

    /// Decrypted plain text into `buf`, reading ciphertext from the socket as needed
    /// (blocking, bounded by the socket's read timeout).
    fn read_plain(&self, buf: &mut [u8]) -> io::Result<usize> {
        if buf.is_empty() {
            return Ok(0);
        }
        let mut inbound = lock(&self.shared.inbound);
        loop {
            {
                let mut st = lock(&self.shared.state);
                loop {
                    match st.conn.reader().read(buf) {
                        // 0: the client closed the session (`close_notify`); a client that
                        // hung up without one is `UnexpectedEof`.
                        Ok(n) => return Ok(n),
                        Err(e) if e.kind() == io::ErrorKind::WouldBlock => {}
                        Err(e) => return Err(e),
                    }
                    if inbound.start == inbound.end {
                        break;
                    }
                    self.decrypt(&mut st, &mut inbound)?;
                }
            }
            // Nothing decrypted is left: wait for the client without holding the session.
            let got = inbound.fill(&self.shared.socket)?;
            if got == 0 {
                // Lets `rustls` tell a clean close from a truncation.
                lock(&self.shared.state).conn.read_tls(&mut &[][..])?;
            }
        }
    }

    /// Gives `rustls` some of the buffered ciphertext and decrypts what it completes.
    fn decrypt(&self, st: &mut State, inbound: &mut Inbound) -> io::Result<()> {
        let mut rest = &inbound.buf[inbound.start..inbound.end];
        let before = rest.len();
        // From a slice, this fails only when `rustls` holds too much unread plain text, which
        // reading it out before giving more prevents.
        st.conn.read_tls(&mut rest)?;
        let used = before - rest.len();
        if used == 0 {
            // Cannot happen; a loop that makes no progress must not spin.
            return Err(io::Error::new(
                io::ErrorKind::InvalidData,
                "TLS record not accepted",
            ));
        }
        inbound.start += used;
        if let Err(e) = st.conn.process_new_packets() {
            tracing::warn!(error = %e, "TLS error; closing connection");
            // The alert `rustls` queued, if the socket takes it now.
            let _ = push_records(&mut st.conn, &self.shared.socket);
            return Err(io::Error::new(io::ErrorKind::InvalidData, e));
        }
        Ok(())
    }
}

impl Inbound {
    /// Reads ciphertext from `socket` into the emptied buffer; 0 at the end of the stream.
    fn fill(&mut self, socket: &Stream) -> io::Result<usize> {
        if self.buf.is_empty() {
            self.buf = vec![0; RECV_CHUNK];
        }
        self.start = 0;
        self.end = 0;
        let n = socket.recv(&mut self.buf)?;
        self.end = n;
        Ok(n)
    }
}

impl Read for TlsStream {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        self.read_plain(buf)
    }
}

impl Write for TlsStream {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        self.write_vectored(&[IoSlice::new(buf)])
    }
    fn write_vectored(&mut self, bufs: &[IoSlice<'_>]) -> io::Result<usize> {
        let wait = *lock(&self.shared.write_timeout);
        // `None` waits for ever, as a plain socket without a write timeout does.
        self.send(bufs, wait.unwrap_or(Duration::MAX))
    }
    /// Nothing to do: a write returns once its records are in the socket.
    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use blockguard_backend::tls::{client_config, ClientFiles};
    use rustls::CipherSuite as S;
    use rustls::{ClientConnection, StreamOwned};
    use std::net::{TcpListener, TcpStream};
    use std::thread;
    use std::time::Instant;

    /// A server configuration with a fresh self-signed certificate (made by `openssl`) in `dir`.
    fn server_config(dir: &Path) -> TlsConfig {
        let (cert, key) = (dir.join("cert.pem"), dir.join("key.pem"));
        let out = std::process::Command::new("openssl")
            .args([
                "req",
                "-x509",
                "-newkey",
                "ec",
                "-pkeyopt",
                "ec_paramgen_curve:prime256v1",
            ])
            .args(["-nodes", "-days", "2", "-subj", "/CN=localhost", "-keyout"])
            .arg(&key)
            .arg("-out")
            .arg(&cert)
            .output()
            .expect("run openssl");
        assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
        TlsConfig::from_pem_files(&cert, &key, None, TlsMode::Required).unwrap()
    }

    /// A TLS session over loopback TCP: the server's end, and a `rustls` client's. Both
    /// sockets buffer little, so that large sends fill them.
    fn session(dir: &Path) -> (TlsStream, StreamOwned<ClientConnection, TcpStream>) {
        let cfg = server_config(dir);
        let files = ClientFiles {
            ca: dir.join("cert.pem"),
            identity: None,
            skip_verification: true,
        };
        let client_cfg = client_config(&files).unwrap();
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = listener.local_addr().unwrap();
        let client = thread::spawn(move || {
            let mut sock = TcpStream::connect(addr).unwrap();
            rustix::net::sockopt::set_socket_recv_buffer_size(&sock, 16 << 10).unwrap();
            let name = "localhost".try_into().unwrap();
            let mut conn = ClientConnection::new(client_cfg, name).unwrap();
            while conn.is_handshaking() {
                conn.complete_io(&mut sock).unwrap();
            }
            StreamOwned::new(conn, sock)
        });
        let (sock, _) = listener.accept().unwrap();
        rustix::net::sockopt::set_socket_send_buffer_size(&sock, 16 << 10).unwrap();
        let server = accept(&cfg, &Stream::Tcp(sock)).unwrap();
        (server, client.join().unwrap())
    }

    #[test]
    fn a_send_that_fills_the_socket_resumes_without_loss_and_reads_go_on_meanwhile() {
        let dir = tempfile::tempdir().unwrap();
        let (server, mut client) = session(dir.path());
        let data: Arc<Vec<u8>> = Arc::new((0..4u32 << 20).map(|i| (i % 251) as u8).collect());
        let mut sender = server.try_clone();
        sender.set_write_timeout(Some(Duration::from_millis(20))).unwrap();
        let sending = {
            let data = Arc::clone(&data);
            thread::spawn(move || {
                // As a connection sends a batch: without blocking first, then the rest on the
                // writer thread with blocking sends that time out now and then, each retried
                // with the same bytes.
                let mut sent = 0;
                while sent < data.len() {
                    match sender.send_vectored_nonblocking(&[IoSlice::new(&data[sent..])]) {
                        Ok(n) => sent += n,
                        Err(e) if e.kind() == io::ErrorKind::WouldBlock => break,
                        Err(e) => panic!("{e}"),
                    }
                }
                let mut timeouts = 0;
                while sent < data.len() {
                    match sender.write_vectored(&[IoSlice::new(&data[sent..])]) {
                        Ok(n) => sent += n,
                        Err(e) if e.kind() == io::ErrorKind::WouldBlock => timeouts += 1,
                        Err(e) => panic!("{e}"),
                    }
                }
                sender.close();
                timeouts
            })
        };
        // The sender is stuck on a full socket; what the client sends is still decrypted.
        thread::sleep(Duration::from_millis(100));
        client.write_all(b"next request").unwrap();
        client.flush().unwrap();
        let mut reader = server;
        let mut got = [0u8; 12];
        let start = Instant::now();
        reader.read_exact(&mut got).unwrap();
        assert_eq!(&got, b"next request");
        assert!(start.elapsed() < Duration::from_secs(5));
        // Everything arrives, in order, and the session ends with `close_notify` (a clean end
        // of stream, not a truncation).
        let mut received = Vec::new();
        client.read_to_end(&mut received).unwrap();
        assert!(received == *data, "the data arrived damaged");
        let timeouts = sending.join().unwrap();
        assert!(
            timeouts > 0,
            "the socket never filled: the test did not test the resumption"
        );
    }

    #[test]
    fn a_client_that_hangs_up_without_close_notify_is_a_truncation() {
        let dir = tempfile::tempdir().unwrap();
        let (mut server, client) = session(dir.path());
        // A FIN without the alert (dropping the socket could reset it instead: the session
        // tickets the server sent are unread).
        client.sock.shutdown(Shutdown::Write).unwrap();
        let e = server.read(&mut [0u8; 16]).unwrap_err();
        assert_eq!(e.kind(), io::ErrorKind::UnexpectedEof);
    }

    #[test]
    fn aes128_gcm_comes_first_for_each_protocol_version() {
        let suites: Vec<_> = prefer_aes128(&provider())
            .cipher_suites
            .iter()
            .map(SupportedCipherSuite::suite)
            .collect();
        assert_eq!(suites[0], S::TLS13_AES_128_GCM_SHA256);
        let tls12 = |s: &&S| format!("{s:?}").starts_with("TLS_ECDHE");
        let first12 = suites.iter().find(tls12).copied();
        assert_eq!(first12, Some(S::TLS_ECDHE_ECDSA_WITH_AES_128_GCM_SHA256));
        assert_eq!(suites.len(), provider().cipher_suites.len());
    }
}
