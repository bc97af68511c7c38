//! Volumes and mirror copies on remote NBD exports, named by NBD URIs (`nbd://host[:port]/export`,
//! `nbd+unix:///export?socket=PATH`, and over TLS `nbds://` and `nbds+unix://`) wherever a path
//! is accepted.
//!
//! A remote export cannot be locked from here the way a local file is (`flock` works only on
//! this machine): two processes serving one export would interleave data and tag updates
//! unseen. The NBD server's own limit on clients is the guard there (`qemu-nbd` accepts one
//! client unless `--shared` says more); what the lock checks of local files do (same file
//! under two names, who holds it) is reduced for URIs to comparing the address and export.

use anyhow::{Context, Result};
use blockguard::blockguard_backend::nbd::{is_nbd_uri, NbdUri};
use blockguard::blockguard_backend::{Backend, FileBackend, FileOptions, NbdBackend, NbdOptions};
use std::path::Path;
use std::sync::{Arc, OnceLock};
use std::time::Duration;

/// The global NBD client options (`--nbd-timeout`, …).
#[derive(clap::Args, Debug, Clone)]
// The fields are the options `--nbd-*`, named alike on purpose.
#[allow(clippy::struct_field_names)]
pub(crate) struct NbdArgs {
    /// For volumes and copies on NBD exports: seconds a request may wait for its reply
    /// before the connection is dropped and the request fails (a mirror copy then goes out
    /// of sync and the volume carries on with the others).
    #[arg(long, global = true, value_name = "SECS", default_value = "30",
          value_parser = clap::value_parser!(u64).range(1..=3600))]
    pub(crate) nbd_timeout: u64,
    /// Seconds to connect to an NBD export and finish the handshake.
    #[arg(long, global = true, value_name = "SECS", default_value = "10",
          value_parser = clap::value_parser!(u64).range(1..=3600))]
    pub(crate) nbd_connect_timeout: u64,
    /// Most connections to one NBD export, used when the server advertises multi-conn.
    #[arg(long, global = true, value_name = "N", default_value = "4",
          value_parser = clap::value_parser!(u64).range(1..=64))]
    pub(crate) nbd_connections: u64,
    /// For `nbds://` URIs without `tls-certificates=DIR`: the CA certificates (PEM) the
    /// server's certificate must chain to. With the directory, its `ca-cert.pem` is used.
    #[arg(long, global = true, value_name = "FILE")]
    pub(crate) nbd_tls_ca: Option<std::path::PathBuf>,
}

static OPTIONS: OnceLock<NbdOptions> = OnceLock::new();

/// Records the global NBD options, once, before any command runs.
pub(crate) fn set_options(args: &NbdArgs) {
    let opts = NbdOptions {
        request_timeout: Duration::from_secs(args.nbd_timeout),
        connect_timeout: Duration::from_secs(args.nbd_connect_timeout),
        connections: usize::try_from(args.nbd_connections).unwrap_or(1),
        tls_ca: args.nbd_tls_ca.clone(),
        ..NbdOptions::default()
    };
    // Set once, by `main`.
    let _ = OPTIONS.set(opts);
}

/// True if `path` is an NBD URI rather than a local path.
pub(crate) fn is_remote(path: &Path) -> bool {
    path.to_str().is_some_and(is_nbd_uri)
}

/// The parsed URI of `path`, if it is one.
fn uri(path: &Path) -> Option<NbdUri> {
    path.to_str()
        .filter(|s| is_nbd_uri(s))
        .and_then(|s| NbdUri::parse(s).ok())
}

/// True if `a` and `b` are URIs of the same export (same address and export name).
pub(crate) fn same_remote(a: &Path, b: &Path) -> bool {
    match (uri(a), uri(b)) {
        (Some(x), Some(y)) => x.address == y.address && x.export == y.export,
        _ => false,
    }
}

/// Connects to the export `path` names.
pub(crate) fn open_remote(path: &Path, read_only: bool) -> Result<NbdBackend> {
    let mut opts = OPTIONS.get().cloned().unwrap_or_default();
    opts.read_only = read_only;
    let text = path.to_str().context("an NBD URI must be UTF-8")?;
    Ok(NbdBackend::connect(text, &opts)?)
}

/// Opens a volume's store: a local file or device with `opts` (lock included), or a remote
/// export (no lock: see the module documentation).
pub(crate) fn open_store(path: &Path, opts: &FileOptions) -> Result<Arc<dyn Backend>> {
    if is_remote(path) {
        return Ok(Arc::new(open_remote(path, opts.read_only)?));
    }
    Ok(Arc::new(FileBackend::open(path, opts)?))
}

/// A file name standing for the export `path` names, for its control socket and scrub state
/// (which live on this machine): the URI with every character outside `[A-Za-z0-9.-]`
/// replaced, cut to a length a file name allows, and a hash of the whole URI so two long URIs
/// that agree in their first characters still differ.
pub(crate) fn local_name(path: &Path) -> String {
    let text = path.to_string_lossy();
    let clean: String = text
        .chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() || c == '.' || c == '-' {
                c
            } else {
                '_'
            }
        })
        .take(150)
        .collect();
    // FNV-1a: stable across builds (the names must not change between versions).
    let hash = text.bytes().fold(0xcbf2_9ce4_8422_2325_u64, |h, b| {
        (h ^ u64::from(b)).wrapping_mul(0x0100_0000_01b3)
    });
    format!("{clean}-{hash:016x}")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn uris_are_told_from_paths_and_compared_by_export() {
        assert!(is_remote(Path::new("nbd://h/x")));
        assert!(!is_remote(Path::new("./nbd://h/x")));
        assert!(same_remote(Path::new("nbd://h/x"), Path::new("nbd://h:10809/x")));
        assert!(!same_remote(Path::new("nbd://h/x"), Path::new("nbd://h/y")));
        assert!(!same_remote(Path::new("nbd://h/x"), Path::new("/h/x")));
        let a = local_name(Path::new("nbd+unix:///e?socket=/tmp/s"));
        assert!(a.starts_with("nbd_unix____e_socket__tmp_s-"), "{a}");
        assert_ne!(a, local_name(Path::new("nbd+unix:///e?socket=/tmp/t")));
    }
}
