//! TLS for NBD connections (`NBD_OPT_STARTTLS`): the server's certificate, key and optional
//! client CA, and the per-connection tunnel that carries the rest of the session encrypted.
//!
//! # Design: a tunnel over a socket pair
//!
//! After the TLS handshake, two pump threads per connection move bytes between the client's
//! socket (ciphertext, through `rustls`) and one end of a Unix socket pair; the server serves
//! the other end exactly like a plain connection. The transmission code relies on a kernel
//! socket in ways a userspace TLS stream cannot offer cheaply: any worker sends replies with
//! non-blocking `sendmsg` (`MSG_DONTWAIT`) while the reader blocks on the same socket,
//! readiness and hang-ups are polled, and the connection table shuts sockets down from
//! another thread. A `rustls` connection shared under a lock by reader and writers would need
//! all of that rebuilt around it (ciphertext a non-blocking send has accepted but not yet
//! written, a reader that must not hold the lock while it blocks), in the hottest code of the
//! server. The pair costs one more copy of each byte in each direction and a thread hop, and
//! keeps TLS out of that code entirely. Measured (docs/PERFORMANCE.md, "TLS"): the pair's
//! copies are about a quarter of a TLS server's CPU time on 1 MiB reads, AES-GCM about a
//! sixth; the locked design was not built, so that quarter is the most it could save.
//!
//! The two pump threads share the `rustls` state under a mutex, held only to decrypt or
//! encrypt, never across a blocking read or write: a client that stops reading its replies
//! does not keep its requests from being decrypted, as with a plain connection. Records
//! `rustls` queues while decrypting (an answer to a key update) leave with the next reply:
//! only the outbound pump writes to the client's socket, so records never interleave.

use crate::stream::Stream;
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use rustls::server::WebPkiClientVerifier;
use rustls::{RootCertStore, ServerConnection};
use std::fmt;
use std::io::{self, Read, Write};
use std::net::Shutdown;
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use std::thread::{self, JoinHandle};
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

fn pem_error(path: &Path, what: impl fmt::Display) -> TlsError {
    TlsError::Pem {
        path: path.to_path_buf(),
        what: what.to_string(),
    }
}

/// Every certificate in a PEM file; at least one.
fn load_certs(path: &Path, kind: &str) -> Result<Vec<CertificateDer<'static>>, TlsError> {
    let certs = CertificateDer::pem_file_iter(path)
        .and_then(Iterator::collect::<Result<Vec<_>, _>>)
        .map_err(|e| pem_error(path, format!("cannot read {kind}: {e}")))?;
    if certs.is_empty() {
        return Err(pem_error(path, format!("no PEM certificate in it ({kind})")));
    }
    Ok(certs)
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
        let key_der = PrivateKeyDer::from_pem_file(key).map_err(|e| match e {
            rustls::pki_types::pem::Error::NoItemsFound => {
                pem_error(key, "no PEM private key in it (PKCS#8, PKCS#1 or SEC1)")
            }
            e => pem_error(key, format!("cannot read the private key: {e}")),
        })?;
        // Chosen explicitly, so that another crate turning on a second provider cannot make
        // the choice ambiguous at run time.
        let provider = Arc::new(rustls::crypto::ring::default_provider());
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
                let mut roots = RootCertStore::empty();
                for c in load_certs(ca, "the client CA")? {
                    roots
                        .add(c)
                        .map_err(|e| pem_error(ca, format!("not a usable CA certificate: {e}")))?;
                }
                let verifier = WebPkiClientVerifier::builder_with_provider(Arc::new(roots), provider)
                    .build()
                    .map_err(|source| TlsError::ClientCa {
                        path: ca.to_path_buf(),
                        source,
                    })?;
                builder.with_client_cert_verifier(verifier)
            }
        };
        let server = builder
            .with_single_cert(chain, key_der)
            .map_err(|source| TlsError::Identity {
                cert: cert.to_path_buf(),
                key: key.to_path_buf(),
                source,
            })?;
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

/// Bytes read from either side per step: large enough that a 1 MiB reply crosses in a few
/// steps, small enough to stay in the CPU cache between the copies.
const CHUNK: usize = 256 << 10;

/// Send buffer of the pair's ends (the kernel doubles it), as for Unix-socket clients
/// (see `UNIX_SEND_BUFFER` in `server.rs`).
const PAIR_SEND_BUFFER: usize = 1 << 20;

/// A TLS connection's pump threads; the server speaks plain NBD on [`Tunnel::plain`].
pub(crate) struct Tunnel {
    /// The server's end of the pair (kept to close it when the tunnel is dropped).
    plain: UnixStream,
    threads: Vec<JoinHandle<()>>,
}

impl Tunnel {
    /// Runs the TLS handshake on `outer` (blocking, bounded by its read and write timeouts
    /// and by the connection table, which shuts the socket down at the handshake deadline)
    /// and starts the pumps. `stall` bounds how long a reply may wait for the client to
    /// read before the connection is given up.
    pub(crate) fn start(cfg: &TlsConfig, outer: &Stream, stall: Duration, id: u64) -> io::Result<Tunnel> {
        let mut tls = ServerConnection::new(Arc::clone(&cfg.server)).map_err(io::Error::other)?;
        let mut sock = outer.try_clone()?;
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
        outer.set_read_timeout(None)?;
        outer.set_write_timeout(Some(stall))?;
        let tls = Arc::new(Mutex::new(tls));
        let mut threads = Vec::with_capacity(2);
        let (from, to) = (outer.try_clone()?, pumped.try_clone()?);
        let state = Arc::clone(&tls);
        threads.push(spawn(format!("nbd-tls-in-{id}"), move || {
            inbound(&state, from, to);
        })?);
        let (from, to) = (pumped, outer.try_clone()?);
        threads.push(spawn(format!("nbd-tls-out-{id}"), move || {
            outbound(&tls, from, to);
        })?);
        Ok(Tunnel { plain, threads })
    }

    /// The plain-text end, for the server.
    pub(crate) fn plain(&self) -> io::Result<UnixStream> {
        self.plain.try_clone()
    }
}

impl Drop for Tunnel {
    /// Closes the server's end (done with the connection) and waits for the pumps, so that
    /// the replies it wrote reach the client before the connection counts as ended (server
    /// shutdown waits for that). What the server wrote stays readable for the pump.
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

fn lock(m: &Mutex<ServerConnection>) -> MutexGuard<'_, ServerConnection> {
    // A panic while a pump held the lock leaves a connection that is dropped anyway.
    m.lock().unwrap_or_else(PoisonError::into_inner)
}

/// Appends what `tls` has decrypted to `plain`; true once the client closed the TLS session.
fn take_plaintext(tls: &mut ServerConnection, plain: &mut Vec<u8>) -> bool {
    match tls.reader().read_to_end(plain) {
        // A close_notify alert, or a client that closed without one.
        Ok(_) => true,
        Err(e) => e.kind() != io::ErrorKind::WouldBlock,
    }
}

/// Client → server: reads ciphertext, decrypts it, writes the plain text to the pair.
fn inbound(tls: &Mutex<ServerConnection>, mut from: Stream, mut to: UnixStream) {
    let mut cipher = vec![0u8; CHUNK];
    let mut plain = Vec::with_capacity(CHUNK);
    // The handshake may have read the client's first bytes of data already.
    let mut closed = take_plaintext(&mut lock(tls), &mut plain);
    let how = loop {
        if !plain.is_empty() {
            if to.write_all(&plain).is_err() {
                break Shutdown::Both;
            }
            plain.clear();
        }
        if closed {
            // The client sent everything it will: the server reads to the end and may still
            // answer (as after a plain client's half-close).
            break Shutdown::Write;
        }
        let n = match from.read(&mut cipher) {
            Ok(0) => break Shutdown::Write,
            Ok(n) => n,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
            // A reset: nothing sent can reach the client any more, which the server notices
            // as a hang-up on its end of the pair.
            Err(_) => break Shutdown::Both,
        };
        match decrypt(&mut lock(tls), &cipher[..n], &mut plain) {
            Ok(c) => closed = c,
            Err(e) => {
                tracing::warn!(error = %e, "TLS error; closing connection");
                from.shutdown(Shutdown::Both);
                break Shutdown::Both;
            }
        }
    };
    let _ = to.shutdown(how);
}

/// Feeds `cipher` to `tls`, appending the plain text to `plain`; true once the client closed
/// the TLS session. An error (a forged or corrupt record) ends the connection; `rustls`
/// has queued the alert for the outbound pump.
fn decrypt(
    tls: &mut ServerConnection,
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

/// Server → client: reads plain text from the pair, encrypts it, writes the ciphertext.
/// Ends (closing the client's socket, after a `close_notify` when the server ended first)
/// when the server closes its end, the client's socket fails, or a reply makes no progress
/// for the stall time (the socket's write timeout).
fn outbound(tls: &Mutex<ServerConnection>, mut from: UnixStream, mut to: Stream) {
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
    to.shutdown(Shutdown::Both);
    let _ = from.shutdown(Shutdown::Both);
}

/// Encrypts `plain` into `cipher`, with whatever else `rustls` has queued (alerts).
fn encrypt(tls: &mut ServerConnection, plain: &[u8], cipher: &mut Vec<u8>) -> io::Result<()> {
    tls.writer().write_all(plain)?;
    while tls.wants_write() {
        tls.write_tls(cipher)?;
    }
    Ok(())
}
