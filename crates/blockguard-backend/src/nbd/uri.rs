//! NBD URIs (`doc/uri.md` of the NetworkBlockDevice/nbd repository): `nbd://host[:port]/export`,
//! `nbd+unix:///export?socket=PATH`, and their TLS forms `nbds://` and `nbds+unix://`.
//!
//! The export name is the URI's path without its leading `/`, percent-decoded; the TCP port
//! defaults to 10809 (IANA's). Query parameters this client does not understand are refused
//! rather than ignored, as the URI document recommends, so a typo cannot silently change what
//! is opened.
//!
//! TLS parameters, as libnbd's `nbd_connect_uri` takes them: `tls-certificates=DIR` (a
//! directory holding `ca-cert.pem`, and optionally `client-cert.pem` with `client-key.pem`,
//! the layout qemu and libnbd use), `tls-hostname=NAME` (the name the server's certificate
//! must carry, instead of the URI's host), `tls-verify-peer=false` (accept any server
//! certificate, with a warning), and `tls-type=x509`. They are refused on the plain schemes:
//! a URI that names certificates but says `nbd://` is a mistake, not a request for plain text.

use std::fmt;
use std::path::PathBuf;

/// The TCP port assigned to NBD by IANA, used when a URI names none.
pub const DEFAULT_PORT: u16 = 10809;

/// Where an NBD server listens.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Address {
    /// A TCP host (a name, an IPv4 address, or an IPv6 address without brackets) and port.
    Tcp {
        /// Host name or address.
        host: String,
        /// TCP port.
        port: u16,
    },
    /// A Unix domain socket.
    Unix(PathBuf),
}

/// A parsed NBD URI.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NbdUri {
    /// Where the server listens.
    pub address: Address,
    /// The export name (may be empty: the server's default export).
    pub export: String,
    /// True for the `nbds` schemes: the connection must be encrypted.
    pub tls: bool,
    /// `tls-certificates=DIR`: the directory of `ca-cert.pem` (and of the client's
    /// `client-cert.pem` and `client-key.pem`, if present).
    pub tls_certificates: Option<PathBuf>,
    /// `tls-hostname=NAME`: the name the server's certificate is checked against.
    pub tls_hostname: Option<String>,
    /// `tls-verify-peer`: false only when the URI says so (the server's certificate is then
    /// accepted unchecked, with a warning).
    pub tls_verify_peer: bool,
    /// The URI as written, for messages.
    text: String,
}

/// Why a string is not an NBD URI this client can use. Every message quotes the URI.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{uri:?} is not a usable NBD URI: {reason}")]
pub struct UriError {
    /// The string as given.
    pub uri: String,
    /// What is wrong with it.
    pub reason: String,
}

/// The schemes this client recognizes, with (TLS, Unix socket).
const SCHEMES: [(&str, bool, bool); 4] = [
    ("nbd://", false, false),
    ("nbds://", true, false),
    ("nbd+unix://", false, true),
    ("nbds+unix://", true, true),
];

/// True if `s` begins with one of the NBD URI schemes (`nbd://`, `nbds://`, `nbd+unix://`,
/// `nbds+unix://`): the test that decides whether a command-line argument is a remote export
/// or a local path. Case-insensitive, like URI schemes.
pub fn is_nbd_uri(s: &str) -> bool {
    SCHEMES.iter().any(|(p, _, _)| starts_with_ignore_case(s, p))
}

fn starts_with_ignore_case(s: &str, prefix: &str) -> bool {
    s.get(..prefix.len())
        .is_some_and(|h| h.eq_ignore_ascii_case(prefix))
}

impl NbdUri {
    /// Parses an NBD URI.
    pub fn parse(s: &str) -> Result<NbdUri, UriError> {
        let fail = |reason: String| UriError {
            uri: s.to_string(),
            reason,
        };
        let Some(&(scheme, tls, unix)) = SCHEMES.iter().find(|(p, _, _)| starts_with_ignore_case(s, p))
        else {
            return Err(fail(
                "the scheme must be nbd://, nbds://, nbd+unix:// or nbds+unix://".to_string(),
            ));
        };
        let rest = &s[scheme.len()..];
        if rest.contains('#') {
            return Err(fail("a fragment (#...) has no meaning in an NBD URI".to_string()));
        }
        let (before_query, query) = match rest.split_once('?') {
            Some((b, q)) => (b, Some(q)),
            None => (rest, None),
        };
        let (authority, path) = match before_query.find('/') {
            Some(i) => (&before_query[..i], &before_query[i..]),
            None => (before_query, ""),
        };
        let export = match path.strip_prefix('/') {
            Some(p) => decode(p).map_err(&fail)?,
            None => String::new(),
        };
        if export.contains('\0') {
            return Err(fail("the export name contains a NUL byte".to_string()));
        }
        let mut socket = None;
        let mut tls_params = TlsParams::default();
        for param in query
            .into_iter()
            .flat_map(|q| q.split('&'))
            .filter(|p| !p.is_empty())
        {
            let (key, value) = param.split_once('=').unwrap_or((param, ""));
            let key = decode(key).map_err(&fail)?;
            let value = decode(value).map_err(&fail)?;
            match key.as_str() {
                "socket" if unix => socket = Some(value),
                k if k.starts_with("tls-") && !tls => {
                    return Err(fail(format!(
                    "{k} is a TLS parameter, but the scheme is not a TLS one: write nbds:// or nbds+unix://"
                )))
                }
                k => tls_params.set(k, value).map_err(&fail)?,
            }
        }
        let address = if unix {
            if !authority.is_empty() {
                return Err(fail(format!(
                    "a Unix-socket URI takes no host ({authority:?}): write nbd+unix:///export?socket=PATH"
                )));
            }
            match socket {
                Some(p) if !p.is_empty() && !p.contains('\0') => Address::Unix(PathBuf::from(p)),
                Some(_) => {
                    return Err(fail(
                        "the socket parameter is empty or holds a NUL byte".to_string(),
                    ))
                }
                None => return Err(fail("a Unix-socket URI needs ?socket=PATH".to_string())),
            }
        } else {
            parse_authority(authority).map_err(&fail)?
        };
        Ok(NbdUri {
            address,
            export,
            tls,
            tls_certificates: tls_params.certificates,
            tls_hostname: tls_params.hostname,
            tls_verify_peer: tls_params.verify_peer.unwrap_or(true),
            text: s.to_string(),
        })
    }

    /// The URI as it was written.
    pub fn as_str(&self) -> &str {
        &self.text
    }
}

impl fmt::Display for NbdUri {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.text)
    }
}

/// The TLS query parameters of a URI.
#[derive(Default)]
struct TlsParams {
    certificates: Option<PathBuf>,
    hostname: Option<String>,
    verify_peer: Option<bool>,
}

impl TlsParams {
    /// Takes one parameter (decoded): an error for an unknown, empty or repeated one.
    fn set(&mut self, key: &str, value: String) -> Result<(), String> {
        if value.is_empty() || value.contains('\0') {
            return Err(format!("the {key} parameter is empty or holds a NUL byte"));
        }
        let repeated = match key {
            "tls-certificates" => self.certificates.replace(PathBuf::from(value)).is_some(),
            "tls-hostname" => self.hostname.replace(value).is_some(),
            "tls-verify-peer" => {
                let v = match value.to_ascii_lowercase().as_str() {
                    "1" | "true" | "yes" | "on" => true,
                    "0" | "false" | "no" | "off" => false,
                    _ => return Err(format!("tls-verify-peer={value:?} is not true or false")),
                };
                self.verify_peer.replace(v).is_some()
            }
            // The only kind of TLS credentials this client has (no PSK).
            "tls-type" if value == "x509" => false,
            "tls-type" => return Err(format!("tls-type={value:?}: only x509 is supported")),
            other => return Err(format!("unknown query parameter {other:?}")),
        };
        if repeated {
            return Err(format!("the {key} parameter is given twice"));
        }
        Ok(())
    }
}

/// `[userinfo@]host[:port]`, with IPv6 literals in brackets.
fn parse_authority(authority: &str) -> Result<Address, String> {
    // The user name is for TLS authentication methods this client does not implement.
    let hostport = authority.rsplit_once('@').map_or(authority, |(_, h)| h);
    let (host, port) = if let Some(v6) = hostport.strip_prefix('[') {
        let Some((host, after)) = v6.split_once(']') else {
            return Err("an IPv6 address opened with [ is not closed with ]".to_string());
        };
        let port = match after {
            "" => None,
            p => Some(
                p.strip_prefix(':')
                    .ok_or_else(|| format!("unexpected {p:?} after the IPv6 address"))?,
            ),
        };
        (host.to_string(), port)
    } else {
        match hostport.rsplit_once(':') {
            Some((h, p)) => (decode(h)?, Some(p)),
            None => (decode(hostport)?, None),
        }
    };
    if host.is_empty() {
        return Err("a TCP URI needs a host: nbd://HOST[:PORT]/EXPORT".to_string());
    }
    // Brackets only delimit an IPv6 address, whose colons cannot stand unbracketed.
    if host.contains(['[', ']']) || (host.contains(':') && !hostport.starts_with('[')) {
        return Err(format!(
            "host {host:?} is malformed (an IPv6 address goes in brackets: [::1])"
        ));
    }
    let port = match port {
        None | Some("") => DEFAULT_PORT,
        Some(p) => p
            .parse::<u16>()
            .ok()
            .filter(|&n| n != 0)
            .ok_or_else(|| format!("port {p:?} is not a number from 1 to 65535"))?,
    };
    Ok(Address::Tcp { host, port })
}

/// Percent-decodes `s` (RFC 3986); the result must be UTF-8.
fn decode(s: &str) -> Result<String, String> {
    let bytes = s.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        if bytes[i] == b'%' {
            let hex = bytes
                .get(i + 1..i + 3)
                .and_then(|h| std::str::from_utf8(h).ok())
                .and_then(|h| u8::from_str_radix(h, 16).ok())
                .ok_or_else(|| format!("bad percent-escape at character {i} of {s:?}"))?;
            out.push(hex);
            i += 3;
        } else {
            out.push(bytes[i]);
            i += 1;
        }
    }
    String::from_utf8(out).map_err(|_| format!("{s:?} does not decode to UTF-8"))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn tcp(host: &str, port: u16) -> Address {
        Address::Tcp {
            host: host.to_string(),
            port,
        }
    }

    #[test]
    fn export_names_follow_the_uri_document() {
        for (uri, export) in [
            ("nbd://example.com/disk", "disk"),
            ("nbd://example.com/", ""),
            ("nbd://example.com", ""),
            ("nbd://example.com//disk", "/disk"),
            ("nbd://example.com/hello%20world", "hello world"),
        ] {
            let u = NbdUri::parse(uri).unwrap();
            assert_eq!(u.export, export, "{uri}");
            assert_eq!(u.address, tcp("example.com", DEFAULT_PORT), "{uri}");
            assert!(!u.tls);
            assert_eq!(u.to_string(), uri);
        }
    }

    #[test]
    fn hosts_ports_sockets_and_tls() {
        let u = NbdUri::parse("nbd://127.0.0.1:10810/x").unwrap();
        assert_eq!(u.address, tcp("127.0.0.1", 10810));
        let u = NbdUri::parse("nbds://user@[::1]:99/x?tls-type=x509").unwrap();
        assert_eq!(u.address, tcp("::1", 99));
        assert!(u.tls);
        let u = NbdUri::parse("NBD+UNIX:///disk?socket=/tmp/a%20b.sock").unwrap();
        assert_eq!(u.address, Address::Unix(PathBuf::from("/tmp/a b.sock")));
        assert_eq!(u.export, "disk");
        let u = NbdUri::parse("nbds+unix://?socket=s").unwrap();
        assert_eq!((u.export.as_str(), u.tls), ("", true));
        assert!(is_nbd_uri("nbd://h") && is_nbd_uri("Nbds+Unix://") && !is_nbd_uri("/tmp/nbd://x"));
    }

    #[test]
    fn bad_uris_are_refused_with_a_reason_quoting_them() {
        for (uri, why) in [
            ("http://x/y", "scheme"),
            ("nbd:///disk", "needs a host"),
            ("nbd://h:0/x", "port"),
            ("nbd://h:70000/x", "port"),
            ("nbd://h:abc/x", "port"),
            ("nbd://[::1/x", "not closed"),
            ("nbd://[::1]x/e", "unexpected"),
            ("nbd://k::1]:99/x", "malformed"),
            ("nbd://[a[b]/x", "malformed"),
            ("nbd://a%3Ab/x", "malformed"),
            ("nbd+unix:///disk", "socket=PATH"),
            ("nbd+unix://host/disk?socket=s", "takes no host"),
            ("nbd+unix:///d?socket=", "empty"),
            ("nbd://h/x?sockte=s", "unknown query parameter"),
            ("nbd://h/x?socket=s", "unknown query parameter"),
            ("nbd://h/a%2", "percent-escape"),
            ("nbd://h/a%zz", "percent-escape"),
            ("nbd://h/a%00b", "NUL"),
            ("nbd://h/%ff", "UTF-8"),
            ("nbd://h/x#frag", "fragment"),
        ] {
            let e = NbdUri::parse(uri).unwrap_err();
            let msg = e.to_string();
            assert!(msg.contains(why) && msg.contains(uri), "{uri}: {msg}");
        }
    }

    #[test]
    fn tls_parameters_are_parsed_and_refused_without_tls() {
        let u = NbdUri::parse(
            "nbds://h/x?tls-certificates=/etc/pki/a%20b&tls-hostname=srv.example&tls-verify-peer=off",
        )
        .unwrap();
        assert_eq!(u.tls_certificates, Some(PathBuf::from("/etc/pki/a b")));
        assert_eq!(u.tls_hostname.as_deref(), Some("srv.example"));
        assert!(!u.tls_verify_peer);
        let u = NbdUri::parse("nbds+unix:///x?socket=s&tls-hostname=localhost").unwrap();
        assert!(u.tls && u.tls_verify_peer && u.tls_certificates.is_none());
        for (uri, why) in [
            ("nbd://h/x?tls-certificates=/d", "not a TLS one"),
            ("nbd+unix:///x?socket=s&tls-hostname=h", "not a TLS one"),
            ("nbds://h/x?tls-verify-peer=maybe", "not true or false"),
            ("nbds://h/x?tls-hostname=a&tls-hostname=b", "twice"),
            ("nbds://h/x?tls-certificates=", "empty"),
            ("nbds://h/x?tls-type=psk", "only x509"),
            ("nbds://h/x?tls-psk-file=/k", "unknown query parameter"),
        ] {
            let e = NbdUri::parse(uri).unwrap_err().to_string();
            assert!(e.contains(why) && e.contains(uri), "{uri}: {e}");
        }
    }

    proptest::proptest! {
        #[test]
        fn parsing_never_panics_and_round_trips_export_names(
            s in "\\PC{0,40}",
            name in "[a-zA-Z0-9 /%._-]{0,20}",
        ) {
            let _ = NbdUri::parse(&s);
            let _ = NbdUri::parse(&format!("nbd://{s}"));
            let _ = NbdUri::parse(&format!("nbd+unix:///{s}"));
            let encoded: String = name
                .bytes()
                .map(|b| if b.is_ascii_alphanumeric() || b == b'/' { (b as char).to_string() } else { format!("%{b:02X}") })
                .collect();
            let u = NbdUri::parse(&format!("nbd://h/{encoded}")).unwrap();
            proptest::prop_assert_eq!(u.export, name);
        }
    }
}
