//! Target `nbd_uri`: the NBD URI parser of the client backend (`NbdUri::parse`), which reads
//! what a user types on the command line and what a mirror set's member records hold.
//!
//! Properties: parsing arbitrary text never panics; a URI that parses is recognized as one
//! (`is_nbd_uri`) and displays as written; and a URI rebuilt from its parts, every byte of the
//! export name and socket path percent-encoded, parses back to the same address, export and
//! TLS demand.
//!
//! Input layout: the bytes as text (invalid UTF-8 replaced), used as is.

use blockguard::blockguard_backend::nbd::{is_nbd_uri, Address, NbdUri};
use std::fmt::Write as _;

/// Longer URIs exercise nothing new.
pub const MAX_LEN: usize = 512;

/// Percent-encodes every byte but unreserved ones (RFC 3986).
fn encode(s: &str) -> String {
    s.bytes().fold(String::new(), |mut out, b| {
        if b.is_ascii_alphanumeric() || b"-._~".contains(&b) {
            out.push(char::from(b));
        } else {
            // Writing to a `String` cannot fail.
            let _ = write!(out, "%{b:02X}");
        }
        out
    })
}

/// The target; see the module documentation.
///
/// # Panics
///
/// When a property is violated.
pub fn run(data: &[u8]) -> &'static str {
    let text = String::from_utf8_lossy(data);
    let Ok(uri) = NbdUri::parse(&text) else {
        return "refused";
    };
    assert!(
        is_nbd_uri(&text),
        "{text:?} parsed but is not recognized as an NBD URI"
    );
    assert_eq!(uri.to_string(), text, "a parsed URI displays as written");
    let scheme = if uri.tls { "nbds" } else { "nbd" };
    let rebuilt = match &uri.address {
        Address::Tcp { host, port } if host.contains(':') => {
            format!("{scheme}://[{host}]:{port}/{}", encode(&uri.export))
        }
        Address::Tcp { host, port } => format!("{scheme}://{}:{port}/{}", encode(host), encode(&uri.export)),
        Address::Unix(p) => format!(
            "{scheme}+unix:///{}?socket={}",
            encode(&uri.export),
            encode(&p.to_string_lossy())
        ),
    };
    let again = NbdUri::parse(&rebuilt).unwrap_or_else(|e| panic!("{text:?} rebuilt as {rebuilt:?}: {e}"));
    assert_eq!(
        (&again.address, &again.export, again.tls),
        (&uri.address, &uri.export, uri.tls),
        "{text:?} rebuilt as {rebuilt:?}"
    );
    match uri.address {
        Address::Tcp { .. } => "tcp",
        Address::Unix(_) => "unix",
    }
}

/// URIs of every form the parser knows, and near misses.
pub fn seeds() -> Vec<(String, Vec<u8>)> {
    [
        "nbd://example.com/disk",
        "nbd://example.com/",
        "nbd://example.com",
        "nbd://example.com//disk",
        "nbd://example.com/hello%20world",
        "nbd://127.0.0.1:10810/x",
        "nbd://[::1]:99/x",
        "nbd://[fe80::1]/x",
        "nbds://user@host/x?tls-type=x509&tls-verify-peer=0",
        "nbds://host/x?tls-hostname=h",
        "nbd+unix:///disk?socket=/tmp/s.sock",
        "nbd+unix:///?socket=%2Ftmp%2Fa%20b",
        "nbds+unix://?socket=s",
        "NBD://HOST/X",
        "nbd://h:0/x",
        "nbd://h:70000/x",
        "nbd:///x",
        "nbd+unix://host/x?socket=s",
        "nbd+unix:///x",
        "nbd://h/x?unknown=1",
        "nbd://h/%zz",
        "nbd://h/%00",
        "nbd://[::1/x",
        "nbd://h/x#frag",
        "http://h/x",
    ]
    .iter()
    .enumerate()
    .map(|(i, s)| (format!("seed-{i:02}"), s.as_bytes().to_vec()))
    .collect()
}
