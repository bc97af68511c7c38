//! TLS for NBD connections (`NBD_OPT_STARTTLS`): the server's certificate, key and optional
//! client CA, and the per-connection tunnel that carries the rest of the session encrypted.
//!
//! PEM loading and the tunnel itself are `blockguard_backend::tls`, shared with the NBD client
//! (which sits below this crate); what follows is the server's side of them.
//!
//! # Design: a tunnel over a socket pair
//!
//! After the TLS handshake, the server serves one end of a Unix socket pair exactly like a
//! plain connection, and two pump threads carry the bytes to and from the client's socket
//! through `rustls` (`blockguard_backend::tls`, "Design"). The transmission code relies on a
//! kernel socket in ways a userspace TLS stream cannot offer cheaply: any worker sends replies
//! with non-blocking `sendmsg` (`MSG_DONTWAIT`) while the reader blocks on the same socket,
//! readiness and hang-ups are polled, and the connection table shuts sockets down from
//! another thread. A `rustls` connection shared under a lock by reader and writers would need
//! all of that rebuilt around it, in the hottest code of the server. Measured
//! (docs/PERFORMANCE.md, "TLS"): the pair's copies are about a quarter of a TLS server's CPU
//! time on 1 MiB reads, AES-GCM about a sixth; the locked design was not built, so that
//! quarter is the most it could save.

use crate::stream::Stream;
pub(crate) use blockguard_backend::tls::Tunnel;
use blockguard_backend::tls::{load_certs, load_key, load_roots, provider, PemError, TlsSocket};
use rustls::server::WebPkiClientVerifier;
use rustls::ServerConnection;
use std::fmt;
use std::io;
use std::net::Shutdown;
use std::path::{Path, PathBuf};
use std::sync::Arc;
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
        let provider = provider();
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

impl TlsSocket for Stream {
    fn clone_socket(&self) -> io::Result<Self> {
        self.try_clone()
    }
    fn shut(&self, how: Shutdown) {
        self.shutdown(how);
    }
    fn read_timeout(&self, t: Option<Duration>) -> io::Result<()> {
        self.set_read_timeout(t)
    }
    fn write_timeout(&self, t: Option<Duration>) -> io::Result<()> {
        self.set_write_timeout(t)
    }
}

/// Runs the TLS handshake on the client's socket `outer` (blocking, bounded by its read and
/// write timeouts and by the connection table, which shuts the socket down at the handshake
/// deadline) and starts the tunnel. `stall` bounds how long a reply may wait for the client
/// to read before the connection is given up.
pub(crate) fn start_tunnel(cfg: &TlsConfig, outer: &Stream, stall: Duration, id: u64) -> io::Result<Tunnel> {
    let tls = ServerConnection::new(Arc::clone(&cfg.server)).map_err(io::Error::other)?;
    Tunnel::start(tls.into(), outer, stall, &format!("nbd-tls-{id}"), |e| {
        tracing::warn!(error = %e, "TLS error; closing connection");
    })
}
