//! NBD server for blockguard volumes.
//!
//! `blockguard serve` uses this crate to make a volume a network block device that qemu,
//! `nbd-client`, `nbdcopy`, `nbdinfo` and friends use unchanged, with every read verified.
//!
//! Layers:
//! - [`proto`]: wire constants and byte helpers (NetworkBlockDevice/nbd `doc/proto.md`).
//! - [`handshake`]: the fixed-newstyle negotiation as an I/O-free state machine.
//! - [`transmission`]: request parsing, validation, execution and reply encoding, I/O-free.
//! - [`export`]: the [`Export`] trait the protocol serves and an in-memory export for tests;
//!   [`DeviceExport`] serves any engine [`blockguard::BlockDevice`] through it.
//! - [`server`]: sockets, per-connection reader threads, the shared worker pool, shutdown.
//! - [`buffers`]: recycled I/O buffers; [`pool`]: the adaptive worker pool.
//! - [`client`]: a minimal blocking client for tests and diagnostics.
//!
//! Supported: options `EXPORT_NAME`, `ABORT`, `LIST`, `INFO`, `GO`, `STRUCTURED_REPLY`,
//! `EXTENDED_HEADERS`, `LIST_META_CONTEXT`/`SET_META_CONTEXT` (`base:allocation`);
//! `STARTTLS` is refused with `NBD_REP_ERR_UNSUP`. Commands `READ` (+`DF`), `WRITE` (+`FUA`),
//! `FLUSH`, `TRIM`, `WRITE_ZEROES` (+`NO_HOLE`, `FAST_ZERO`), `CACHE`, `DISC`,
//! `BLOCK_STATUS` (+`REQ_ONE`). `NBD_FLAG_CAN_MULTI_CONN` is advertised because the engine's
//! flush covers writes completed on every connection.

mod budget;
pub mod buffers;
pub mod client;
mod conns;
mod device;
pub mod export;
#[doc(hidden)]
pub mod fuzzing;
pub mod handshake;
pub mod pool;
pub mod proto;
pub mod server;
pub mod spin;
mod stream;
pub mod transmission;

pub use device::{export_error, DeviceExport};
pub use export::{Export, ExportError, ExportErrorKind, Extent, MemoryExport};
pub use handshake::{Negotiated, ReplyMode};
pub use server::{shutdown_on_signals, ListenAddr, Server, ServerConfig, ServerError, ShutdownHandle};
