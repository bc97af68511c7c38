//! TLS for the NBD client (`nbds://`, `nbds+unix://`): which files and which server name a
//! URI means, and the handshake after `NBD_OPT_STARTTLS`.
//!
//! - The server's certificate must chain to a CA: `ca-cert.pem` of the URI's
//!   `tls-certificates=DIR`, else [`NbdOptions::tls_ca`]; without either the URI is refused
//!   (there is no system trust store here: an NBD server's CA is the operator's own).
//! - A client certificate is presented when `DIR` holds `client-cert.pem` and
//!   `client-key.pem` (one without the other is refused).
//! - The certificate must be valid for `tls-hostname=NAME` if given, else for the URI's host
//!   (a name or an IP address). A Unix socket has no host: `nbds+unix://` needs `tls-hostname`.
//! - `tls-verify-peer=false` accepts any server certificate (the handshake still proves the
//!   server holds its key) and logs a warning (`tracing`) at every connection: the traffic
//!   is then encrypted but the server is not authenticated.
//!
//! Every connection of a backend (multi-conn, reconnections) runs its own TLS handshake with
//! the configuration built once by [`ClientTls::new`].

use super::uri::{Address, NbdUri};
use super::wire::HandshakeError;
use super::{NbdError, NbdOptions};
use crate::tls::{self as shared, ClientFiles, Tunnel};
use rustls::pki_types::ServerName;
use std::path::PathBuf;
use std::sync::Arc;

/// The TLS side of an `nbds` backend: what every connection's handshake uses.
#[derive(Debug)]
pub(crate) struct ClientTls {
    config: Arc<rustls::ClientConfig>,
    name: ServerName<'static>,
    /// The CA file, for messages.
    ca: PathBuf,
    /// The client certificate file, if one is presented.
    client_cert: Option<PathBuf>,
    verify: bool,
}

impl ClientTls {
    /// The TLS configuration `uri` asks for; `None` for a plain URI.
    pub(crate) fn new(uri: &NbdUri, opts: &NbdOptions) -> Result<Option<ClientTls>, NbdError> {
        if !uri.tls {
            return Ok(None);
        }
        let setup = |detail: String| NbdError::TlsSetup {
            uri: uri.to_string(),
            detail,
        };
        let ca = match (&uri.tls_certificates, &opts.tls_ca) {
            (Some(dir), _) => dir.join("ca-cert.pem"),
            (None, Some(file)) => file.clone(),
            (None, None) => {
                return Err(setup(
                    "no CA to verify the server with: add tls-certificates=DIR to the URI (a directory \
                     holding ca-cert.pem) or give a CA file (--nbd-tls-ca FILE)"
                        .to_string(),
                ))
            }
        };
        let identity = match &uri.tls_certificates {
            None => None,
            Some(dir) => {
                let (cert, key) = (dir.join("client-cert.pem"), dir.join("client-key.pem"));
                match (cert.exists(), key.exists()) {
                    (true, true) => Some((cert, key)),
                    (false, false) => None,
                    (true, false) | (false, true) => {
                        return Err(setup(format!(
                            "{} holds only one of client-cert.pem and client-key.pem: a client \
                             certificate needs both",
                            dir.display()
                        )))
                    }
                }
            }
        };
        let host = match (&uri.tls_hostname, &uri.address) {
            (Some(h), _) => h.clone(),
            (None, Address::Tcp { host, .. }) => host.clone(),
            (None, Address::Unix(_)) => {
                return Err(setup(
                    "a Unix socket has no host name to check the server's certificate against: add \
                     tls-hostname=NAME (a name the certificate carries) to the URI"
                        .to_string(),
                ))
            }
        };
        let name = ServerName::try_from(host.clone())
            .map_err(|e| setup(format!("{host:?} is not a usable TLS server name: {e}")))?;
        let files = ClientFiles {
            ca: ca.clone(),
            identity: identity.clone(),
            skip_verification: !uri.tls_verify_peer,
        };
        let config = shared::client_config(&files).map_err(|e| setup(e.to_string()))?;
        Ok(Some(ClientTls {
            config,
            name,
            ca,
            client_cert: identity.map(|(c, _)| c),
            verify: uri.tls_verify_peer,
        }))
    }

    /// Runs the TLS handshake on `outer` (after the server acknowledged `STARTTLS`) and starts
    /// the tunnel; `failure` receives a TLS error that ends the session later (an alert the
    /// server sends after the handshake, as when it refuses the client's certificate).
    pub(crate) fn start(
        &self,
        uri: &NbdUri,
        outer: &super::wire::Stream,
        stall: std::time::Duration,
        failure: Arc<std::sync::Mutex<Option<rustls::Error>>>,
    ) -> Result<Tunnel, NbdError> {
        if !self.verify {
            // Said at every connection, where it happens, so it cannot go unnoticed in a log.
            // Through `tracing`, not written to stderr here: the program decides where its
            // diagnostics go (the CLI queues them, so a stuck stderr cannot block a reconnection).
            tracing::warn!(
                "{uri}: tls-verify-peer=false: the server's certificate is NOT checked; the \
                 connection is encrypted, but anyone on the path can pose as the server"
            );
        }
        let conn = rustls::ClientConnection::new(Arc::clone(&self.config), self.name.clone())
            .map_err(|e| self.failed(uri, &e))?;
        Tunnel::start(conn.into(), outer, stall, "nbd-client-tls", move |e| {
            let mut slot = failure.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
            slot.get_or_insert_with(|| e.clone());
        })
        .map_err(|e| match shared::tls_error_of(&e) {
            Some(t) => self.failed(uri, t),
            None if matches!(
                e.kind(),
                std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut
            ) =>
            {
                NbdError::Tls {
                    uri: uri.to_string(),
                    detail: "the server did not finish the TLS handshake in time (--nbd-connect-timeout)"
                        .to_string(),
                }
            }
            None => NbdError::Tls {
                uri: uri.to_string(),
                detail: format!("the connection failed during the TLS handshake: {e}"),
            },
        })
    }

    /// Why the negotiation inside TLS failed with `e`, when TLS is the likely cause: `late`,
    /// the TLS error the server ended the session with, or a server that hung up right after
    /// the handshake (as one that refuses the client's certificate without an alert does).
    /// `Err(e)` when it is an NBD matter.
    pub(crate) fn after_handshake(
        &self,
        uri: &NbdUri,
        late: Option<rustls::Error>,
        e: HandshakeError,
    ) -> Result<NbdError, HandshakeError> {
        if let Some(t) = late {
            return Ok(self.failed(uri, &t));
        }
        match e {
            HandshakeError::Io(io) if io.kind() == std::io::ErrorKind::UnexpectedEof => {
                let presented = match &self.client_cert {
                    None => "none was presented: put client-cert.pem and client-key.pem in the \
                             tls-certificates directory"
                        .to_string(),
                    Some(c) => format!("{} was presented", c.display()),
                };
                Ok(NbdError::Tls {
                    uri: uri.to_string(),
                    detail: format!(
                        "the server closed the connection right after the TLS handshake: it may \
                         require a client certificate it accepts ({presented})"
                    ),
                })
            }
            e => Err(e),
        }
    }

    /// A TLS error, in words that say what to check.
    pub(crate) fn failed(&self, uri: &NbdUri, e: &rustls::Error) -> NbdError {
        use rustls::{AlertDescription as A, CertificateError as C, Error as E};
        let name = self.name.to_str();
        let detail = match e {
            E::InvalidCertificate(C::UnknownIssuer | C::BadSignature) => format!(
                "the server's certificate is not signed by the CA in {} ({e})",
                self.ca.display()
            ),
            E::InvalidCertificate(C::NotValidForName | C::NotValidForNameContext { .. }) => format!(
                "the server's certificate is not valid for the name {name:?} (set tls-hostname=NAME to \
                 the name it carries) ({e})"
            ),
            E::InvalidCertificate(c) => format!("the server's certificate is not acceptable: {c:?}"),
            E::AlertReceived(
                A::CertificateRequired | A::BadCertificate | A::UnknownCA | A::HandshakeFailure,
            ) if self.client_cert.is_none() => {
                format!(
                    "the server refused the connection ({e}): it probably requires a client certificate; \
                     put client-cert.pem and client-key.pem in the tls-certificates directory"
                )
            }
            E::AlertReceived(A::BadCertificate | A::UnknownCA | A::CertificateUnknown | A::AccessDenied) => {
                format!(
                    "the server refused the client certificate {} ({e})",
                    self.client_cert
                        .as_ref()
                        .map_or_else(String::new, |c| c.display().to_string())
                )
            }
            e => e.to_string(),
        };
        NbdError::Tls {
            uri: uri.to_string(),
            detail,
        }
    }
}

impl shared::TlsSocket for super::wire::Stream {
    fn clone_socket(&self) -> std::io::Result<Self> {
        self.try_clone()
    }
    fn shut(&self, how: std::net::Shutdown) {
        // Errors only mean the socket is closed already.
        let _ = match self {
            super::wire::Stream::Tcp(s) => s.shutdown(how),
            super::wire::Stream::Unix(s) => s.shutdown(how),
        };
    }
    fn read_timeout(&self, t: Option<std::time::Duration>) -> std::io::Result<()> {
        self.set_read_timeout(t)
    }
    fn write_timeout(&self, t: Option<std::time::Duration>) -> std::io::Result<()> {
        self.set_write_timeout(t)
    }
}
