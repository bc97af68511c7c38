//! TLS plumbing: PEM loading and the provider, shared by the NBD server (`blockguard-nbd`)
//! and this crate's NBD client; the client's `rustls` configuration; and the tunnel that
//! carries the client's plain text over a TLS connection.
//!
//! It lives in the lowest crate so that both sides use one copy without the backend crate
//! importing the server. `rustls` is always given the `ring` provider explicitly, so that
//! another crate turning on a second provider cannot make the choice ambiguous at run time.
//!
//! # Design: a tunnel over a socket pair (the client)
//!
//! After the TLS handshake, two pump threads per connection move bytes between the peer's
//! socket (ciphertext, through `rustls`) and one end of a Unix socket pair; the NBD client
//! speaks plain NBD on the other end, exactly as on a plain connection: its reader thread and
//! its senders share one socket, polled and shut down from other threads. The pair costs one
//! more copy of each byte in each direction and a thread hop. The server used the same tunnel
//! until it measured at about a quarter of its TLS CPU time on 1 MiB reads; it now shares one
//! `rustls` session between its reader and its senders instead (`blockguard-nbd`'s `tls.rs`
//! and `docs/PERFORMANCE.md`, "TLS"), which the client could follow.
//!
//! The two pump threads share the `rustls` state under a mutex, held only to decrypt or
//! encrypt, never across a blocking read or write: a peer that stops reading does not keep
//! what it sent from being decrypted, as with a plain connection. Records `rustls` queues
//! while decrypting (an answer to a key update) leave with the next outgoing data: only the
//! outbound pump writes to the peer's socket, so records never interleave.

use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::crypto::CryptoProvider;
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer, ServerName, UnixTime};
use rustls::{DigitallySignedStruct, RootCertStore, SignatureScheme};
use std::fmt;
use std::io::{self, Read, Write};
use std::net::Shutdown;
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use std::thread::{self, JoinHandle};
use std::time::Duration;

/// A PEM file that could not be used.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{}: {what}", path.display())]
pub struct PemError {
    /// The file.
    pub path: PathBuf,
    /// What was wrong with it (unreadable, or no item of the kind expected).
    pub what: String,
}

fn pem_error(path: &Path, what: impl fmt::Display) -> PemError {
    PemError {
        path: path.to_path_buf(),
        what: what.to_string(),
    }
}

/// Every certificate in the PEM file `path`; at least one. `kind` says what it is for, in
/// messages ("the server certificate").
pub fn load_certs(path: &Path, kind: &str) -> Result<Vec<CertificateDer<'static>>, PemError> {
    let certs = CertificateDer::pem_file_iter(path)
        .and_then(Iterator::collect::<Result<Vec<_>, _>>)
        .map_err(|e| pem_error(path, format!("cannot read {kind}: {e}")))?;
    if certs.is_empty() {
        return Err(pem_error(path, format!("no PEM certificate in it ({kind})")));
    }
    Ok(certs)
}

/// The private key in the PEM file `path` (PKCS#8, PKCS#1 or SEC1).
pub fn load_key(path: &Path) -> Result<PrivateKeyDer<'static>, PemError> {
    PrivateKeyDer::from_pem_file(path).map_err(|e| match e {
        rustls::pki_types::pem::Error::NoItemsFound => {
            pem_error(path, "no PEM private key in it (PKCS#8, PKCS#1 or SEC1)")
        }
        e => pem_error(path, format!("cannot read the private key: {e}")),
    })
}

/// The CA certificates of the PEM file `path` as a trust store; `kind` as for [`load_certs`].
pub fn load_roots(path: &Path, kind: &str) -> Result<RootCertStore, PemError> {
    let mut roots = RootCertStore::empty();
    for c in load_certs(path, kind)? {
        roots
            .add(c)
            .map_err(|e| pem_error(path, format!("not a usable CA certificate: {e}")))?;
    }
    Ok(roots)
}

/// The `ring` provider `rustls` is given everywhere in blockguard.
pub fn provider() -> Arc<CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

/// What a TLS client trusts and presents.
#[derive(Debug, Clone)]
pub struct ClientFiles {
    /// PEM file of the CA certificates the server's certificate must chain to.
    pub ca: PathBuf,
    /// PEM files of the client's certificate chain and private key, presented when the
    /// server asks for one.
    pub identity: Option<(PathBuf, PathBuf)>,
    /// Accept any server certificate (still checking that the server holds its key). Only
    /// for tests and for servers whose certificate cannot be checked; callers must warn.
    pub skip_verification: bool,
}

/// Why a TLS client configuration could not be built.
#[derive(Debug, thiserror::Error)]
pub enum ClientConfigError {
    /// A file could not be read or holds nothing usable.
    #[error(transparent)]
    Pem(#[from] PemError),
    /// `rustls` refused the configuration (a key that does not match its certificate).
    #[error("{} with {}: not a usable client identity: {source}", cert.display(), key.display())]
    Identity {
        /// The certificate file.
        cert: PathBuf,
        /// The key file.
        key: PathBuf,
        /// What `rustls` refused.
        source: rustls::Error,
    },
    /// No protocol version or cipher suite is left (cannot happen with `ring`'s defaults).
    #[error("no usable TLS protocol version: {0}")]
    Versions(rustls::Error),
}

/// A `rustls` client configuration (TLS 1.2 and 1.3, `rustls`' safe defaults) from `files`.
pub fn client_config(files: &ClientFiles) -> Result<Arc<rustls::ClientConfig>, ClientConfigError> {
    let provider = provider();
    let builder = rustls::ClientConfig::builder_with_provider(Arc::clone(&provider))
        .with_safe_default_protocol_versions()
        .map_err(ClientConfigError::Versions)?;
    // Loaded even when verification is skipped: a missing CA file is still a mistake to report.
    let roots = load_roots(&files.ca, "the CA certificate")?;
    let builder = if files.skip_verification {
        builder
            .dangerous()
            .with_custom_certificate_verifier(Arc::new(AnyServer(provider)))
    } else {
        builder.with_root_certificates(roots)
    };
    let config = match &files.identity {
        None => builder.with_no_client_auth(),
        Some((cert, key)) => {
            let chain = load_certs(cert, "the client certificate")?;
            let key_der = load_key(key)?;
            builder
                .with_client_auth_cert(chain, key_der)
                .map_err(|source| ClientConfigError::Identity {
                    cert: cert.clone(),
                    key: key.clone(),
                    source,
                })?
        }
    };
    Ok(Arc::new(config))
}

/// Accepts any server certificate, but still checks the handshake's signatures, so the
/// server must hold the key of the certificate it sent (which stops nothing an active
/// attacker could not do with a certificate of its own: hence the callers' warning).
#[derive(Debug)]
struct AnyServer(Arc<CryptoProvider>);

impl ServerCertVerifier for AnyServer {
    fn verify_server_cert(
        &self,
        _end_entity: &CertificateDer<'_>,
        _intermediates: &[CertificateDer<'_>],
        _server_name: &ServerName<'_>,
        _ocsp_response: &[u8],
        _now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        Ok(ServerCertVerified::assertion())
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls12_signature(message, cert, dss, &self.0.signature_verification_algorithms)
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls13_signature(message, cert, dss, &self.0.signature_verification_algorithms)
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.0.signature_verification_algorithms.supported_schemes()
    }
}

/// The `rustls` error behind an `io::Error` from a TLS handshake, if that is what it was.
pub fn tls_error_of(e: &io::Error) -> Option<&rustls::Error> {
    e.get_ref()
        .and_then(|inner| inner.downcast_ref::<rustls::Error>())
}

/// A connected socket a [`Tunnel`] can carry TLS over.
pub trait TlsSocket: Read + Write + Send + Sized + 'static {
    /// Another handle on the same socket.
    fn clone_socket(&self) -> io::Result<Self>;
    /// Shuts the socket down; errors only mean it is closed already.
    fn shut(&self, how: Shutdown);
    /// Bounds every blocking read (`None`: unbounded).
    fn read_timeout(&self, t: Option<Duration>) -> io::Result<()>;
    /// Bounds every blocking write.
    fn write_timeout(&self, t: Option<Duration>) -> io::Result<()>;
}

/// Bytes read from either side per step: large enough that a 1 MiB message crosses in a few
/// steps, small enough to stay in the CPU cache between the copies.
const CHUNK: usize = 256 << 10;

/// Send buffer of the pair's ends (the kernel doubles it), as for the server's Unix-socket
/// clients.
const PAIR_SEND_BUFFER: usize = 1 << 20;

/// A TLS connection's pump threads; the NBD code speaks plain text on [`Tunnel::plain`].
#[derive(Debug)]
pub struct Tunnel {
    /// The plain-text end of the pair (kept to close it when the tunnel is dropped).
    plain: UnixStream,
    threads: Vec<JoinHandle<()>>,
}

impl Tunnel {
    /// Runs the TLS handshake of `tls` on `outer` (blocking, bounded by the socket's read and
    /// write timeouts, which the caller sets) and starts the pumps, named `name-in` and
    /// `name-out`. `stall` bounds how long outgoing data may wait for the peer to read before
    /// the connection is given up. `on_error` is told of a TLS error after the handshake (a
    /// forged record, or an alert from the peer), which ends the connection.
    ///
    /// A handshake failure is an `io::Error` whose [`tls_error_of`] is the `rustls` error,
    /// when it was one (rather than a socket error).
    pub fn start<S: TlsSocket>(
        mut tls: rustls::Connection,
        outer: &S,
        stall: Duration,
        name: &str,
        on_error: impl FnOnce(&rustls::Error) + Send + 'static,
    ) -> io::Result<Tunnel> {
        let mut sock = outer.clone_socket()?;
        while tls.is_handshaking() {
            // Sends the alert, if any, before returning the handshake's error.
            tls.complete_io(&mut sock)?;
        }
        // The pumps bound their own buffering (one chunk at a time).
        tls.set_buffer_limit(None);
        let (plain, pumped) = UnixStream::pair()?;
        for s in [&plain, &pumped] {
            let _ = rustix::net::sockopt::set_socket_send_buffer_size(s, PAIR_SEND_BUFFER);
        }
        outer.read_timeout(None)?;
        outer.write_timeout(Some(stall))?;
        let tls = Arc::new(Mutex::new(tls));
        let mut threads = Vec::with_capacity(2);
        let (from, to) = (outer.clone_socket()?, pumped.try_clone()?);
        let state = Arc::clone(&tls);
        threads.push(spawn(format!("{name}-in"), move || {
            inbound(&state, from, to, on_error);
        })?);
        let (from, to) = (pumped, outer.clone_socket()?);
        threads.push(spawn(format!("{name}-out"), move || {
            outbound(&tls, from, to);
        })?);
        Ok(Tunnel { plain, threads })
    }

    /// The plain-text end.
    pub fn plain(&self) -> io::Result<UnixStream> {
        self.plain.try_clone()
    }
}

impl Drop for Tunnel {
    /// Closes the plain-text end (the NBD code is done with the connection) and waits for
    /// the pumps, so that what was written to it reaches the peer before the connection counts
    /// as ended. What was written stays readable for the pump.
    fn drop(&mut self) {
        let _ = self.plain.shutdown(Shutdown::Both);
        for t in self.threads.drain(..) {
            let _ = t.join();
        }
    }
}

fn spawn(name: String, f: impl FnOnce() + Send + 'static) -> io::Result<JoinHandle<()>> {
    thread::Builder::new().name(name).spawn(f)
}

fn lock(m: &Mutex<rustls::Connection>) -> MutexGuard<'_, rustls::Connection> {
    // A panic while a pump held the lock leaves a connection that is dropped anyway.
    m.lock().unwrap_or_else(PoisonError::into_inner)
}

/// Appends what `tls` has decrypted to `plain`; true once the peer closed the TLS session.
fn take_plaintext(tls: &mut rustls::Connection, plain: &mut Vec<u8>) -> bool {
    match tls.reader().read_to_end(plain) {
        // A close_notify alert, or a peer that closed without one.
        Ok(_) => true,
        Err(e) => e.kind() != io::ErrorKind::WouldBlock,
    }
}

/// Peer → us: reads ciphertext, decrypts it, writes the plain text to the pair.
fn inbound<S: TlsSocket>(
    tls: &Mutex<rustls::Connection>,
    mut from: S,
    mut to: UnixStream,
    on_error: impl FnOnce(&rustls::Error),
) {
    let mut cipher = vec![0u8; CHUNK];
    let mut plain = Vec::with_capacity(CHUNK);
    // The handshake may have read the peer's first bytes of data already.
    let mut closed = take_plaintext(&mut lock(tls), &mut plain);
    let how = loop {
        if !plain.is_empty() {
            if to.write_all(&plain).is_err() {
                break Shutdown::Both;
            }
            plain.clear();
        }
        if closed {
            // The peer sent everything it will: the NBD code reads to the end and may still
            // answer (as after a plain peer's half-close).
            break Shutdown::Write;
        }
        let n = match from.read(&mut cipher) {
            Ok(0) => break Shutdown::Write,
            Ok(n) => n,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
            // A reset: nothing sent can reach the peer any more, which the NBD code notices
            // as a hang-up on its end of the pair.
            Err(_) => break Shutdown::Both,
        };
        match decrypt(&mut lock(tls), &cipher[..n], &mut plain) {
            Ok(c) => closed = c,
            Err(e) => {
                on_error(&e);
                from.shut(Shutdown::Both);
                break Shutdown::Both;
            }
        }
    };
    let _ = to.shutdown(how);
}

/// Feeds `cipher` to `tls`, appending the plain text to `plain`; true once the peer closed
/// the TLS session. An error (a forged or corrupt record, an alert) ends the connection;
/// `rustls` has queued the alert for the outbound pump.
fn decrypt(
    tls: &mut rustls::Connection,
    mut cipher: &[u8],
    plain: &mut Vec<u8>,
) -> Result<bool, rustls::Error> {
    let mut closed = false;
    while !cipher.is_empty() {
        // Reading from a slice fails only when the received plain text is over its limit,
        // which taking it out each round prevents.
        if tls.read_tls(&mut cipher).is_err() {
            return Err(rustls::Error::General("TLS receive buffer full".into()));
        }
        tls.process_new_packets()?;
        closed |= take_plaintext(tls, plain);
    }
    Ok(closed)
}

/// Us → peer: reads plain text from the pair, encrypts it, writes the ciphertext. Ends
/// (closing the peer's socket, after a `close_notify` when our side ended first) when the
/// NBD code closes its end, the peer's socket fails, or data makes no progress for the stall
/// time (the socket's write timeout).
fn outbound<S: TlsSocket>(tls: &Mutex<rustls::Connection>, mut from: UnixStream, mut to: S) {
    let mut plain = vec![0u8; CHUNK];
    let mut cipher = Vec::with_capacity(CHUNK + CHUNK / 8);
    loop {
        let n = match from.read(&mut plain) {
            Ok(0) => {
                let mut tls = lock(tls);
                tls.send_close_notify();
                let _ = tls.write_tls(&mut cipher);
                drop(tls);
                let _ = to.write_all(&cipher);
                break;
            }
            Ok(n) => n,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
            Err(_) => break,
        };
        if encrypt(&mut lock(tls), &plain[..n], &mut cipher).is_err() {
            break;
        }
        if to.write_all(&cipher).is_err() {
            break;
        }
        cipher.clear();
    }
    to.shut(Shutdown::Both);
    let _ = from.shutdown(Shutdown::Both);
}

/// Encrypts `plain` into `cipher`, with whatever else `rustls` has queued (alerts).
fn encrypt(tls: &mut rustls::Connection, plain: &[u8], cipher: &mut Vec<u8>) -> io::Result<()> {
    tls.writer().write_all(plain)?;
    while tls.wants_write() {
        tls.write_tls(cipher)?;
    }
    Ok(())
}
