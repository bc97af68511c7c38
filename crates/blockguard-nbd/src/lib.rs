//! NBD server for blockguard volumes.
//!
//! `blockguard serve` uses this crate to make a volume a network block device that qemu,
//! `nbd-client`, `nbdcopy`, `nbdinfo` and friends use unchanged, with every read verified.
//!
//! The public API is small: a [`Server`] configured by [`ServerConfig`] serves one
//! [`Export`] — usually a [`DeviceExport`] over any engine [`blockguard::BlockDevice`], or a
//! [`MemoryExport`] in tests — until [`ShutdownHandle::shutdown`] or a signal
//! ([`shutdown_on_signals`]) stops it. [`proto`] holds the wire constants
//! (NetworkBlockDevice/nbd `doc/proto.md`) for clients and tests.
//!
//! Inside: `handshake` (the fixed-newstyle negotiation as an I/O-free state machine),
//! `transmission` (request parsing, validation, execution and reply encoding, I/O-free),
//! `server` (sockets, per-connection reader threads, the shared worker pool, shutdown),
//! `buffers` (recycled I/O buffers), `pool` (the adaptive worker pool), `budget` (the bound
//! on reply memory), `conns` (the connection table and its limits), `tls` (certificates and
//! the TLS session a connection continues in after `STARTTLS`) and `channel` (a connection's
//! stream, plain or TLS, behind one seam).
//!
//! With the `testing` feature (for this workspace's tests and fuzz targets only): `client`, a
//! minimal blocking client, and `fuzzing`, the request-parser fuzz body.
//!
//! Supported: options `EXPORT_NAME`, `ABORT`, `LIST`, `INFO`, `GO`, `STRUCTURED_REPLY`,
//! `EXTENDED_HEADERS`, `LIST_META_CONTEXT`/`SET_META_CONTEXT` (`base:allocation`), and
//! `STARTTLS` when [`ServerConfig::tls`] is set (`tls`: `rustls`, optional or required,
//! optionally with client certificates; without it `NBD_REP_ERR_UNSUP`). Commands `READ` (+`DF`), `WRITE` (+`FUA`),
//! `FLUSH`, `TRIM`, `WRITE_ZEROES` (+`NO_HOLE`, `FAST_ZERO`), `CACHE`, `DISC`,
//! `BLOCK_STATUS` (+`REQ_ONE`). `NBD_FLAG_CAN_MULTI_CONN` is advertised because the engine's
//! flush covers writes completed on every connection.

// Lint policy, the same in every crate of the workspace: clippy's pedantic group on, minus a
// short list that would add noise without catching bugs here.
#![warn(missing_docs, unreachable_pub, clippy::pedantic)]
#![allow(
    // Pure getters are obvious; what must not be ignored is already a `Result` or `#[must_use]` type.
    clippy::must_use_candidate,
    // Errors are typed enums whose variants document themselves.
    clippy::missing_errors_doc,
    // `volume::VolumeStats` and the like read better at use sites outside the module.
    clippy::module_name_repetitions,
)]

mod budget;
mod buffers;
mod channel;
#[cfg(feature = "testing")]
pub mod client;
mod conns;
mod device;
mod export;
#[cfg(feature = "testing")]
#[doc(hidden)]
pub mod fuzzing;
mod handshake;
mod pool;
pub use blockguard_backend::nbd::proto;
mod server;
mod spin;
mod stream;
mod tls;
mod transmission;

pub use buffers::Payload;
pub use device::{export_error, DeviceExport};
pub use export::{Export, ExportError, ExportErrorKind, Extent, MemoryExport};
pub use handshake::{Negotiated, ReplyMode};
pub use server::{
    shutdown_on_signals, ConnectionStats, ListenAddr, Server, ServerConfig, ServerError, ShutdownHandle,
    MAX_PAYLOAD_LIMIT,
};
pub use tls::{TlsConfig, TlsError, TlsMode};

// The workspace builds for 64-bit targets only, where a `usize` holds every `u64`.
const _: () = assert!(usize::BITS == 64);

/// `x` as a `usize`: a length or offset of memory the crate holds or is about to allocate,
/// which the caller has already bounded (lengths from the network are converted where they
/// are checked, with `try_from`).
#[allow(clippy::cast_possible_truncation)] // Lossless: `usize` is 64 bits wide (asserted above).
pub(crate) const fn usize_of(x: u64) -> usize {
    x as usize
}
