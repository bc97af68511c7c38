//! `blockguard serve`: serve a volume as a network block device (NBD).
//!
//! ```text
//! blockguard serve disk.bgv --create 1G            # nbd://127.0.0.1:10809
//! blockguard serve disk.bgv --socket /run/disk.sock
//! ```
//!
//! SIGINT/SIGTERM stop accepting connections, let in-flight requests finish, flush, and close
//! the volume. A control socket (`<volume>.ctl`; `--control PATH`, `--no-control`) answers
//! `blockguard status` and runs `blockguard scrub` meanwhile (see `control`). The volume is locked while served, so a second server fails with a clear error.
//!
//! Fail-stop: if a request handler panics, an invariant may be broken. From then on writes and
//! flushes are refused (reads go on), and at shutdown the volume is left unflushed and marked
//! in use, as a crash would leave it, and `serve` exits with an error.

use crate::common::{parse_size, PathOnce};
use crate::control::server::{Context as ControlContext, Serving};
use anyhow::{anyhow, Context, Result};
use blockguard_nbd::{
    DeviceExport, Export, ListenAddr, Server, ServerConfig, ServerError, TlsConfig, TlsMode,
};
use std::net::{SocketAddr, ToSocketAddrs};
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

/// Arguments of `blockguard serve`.
#[derive(clap::Args, Debug)]
pub(crate) struct ServeArgs {
    /// Volume file or block device to serve.
    pub(crate) volume: PathBuf,
    /// TCP address to listen on, HOST:PORT (an IP address or a host name such as
    /// localhost:10809). Loopback by default: NBD has no authentication.
    #[arg(
        long,
        value_name = "ADDR",
        default_value = "127.0.0.1:10809",
        conflicts_with = "socket"
    )]
    pub(crate) listen: String,
    /// Listen on this Unix domain socket instead of TCP.
    #[arg(long, value_name = "PATH")]
    pub(crate) socket: Option<PathBuf>,
    /// Export name clients may ask for (default: the volume's file name; the empty name
    /// always selects the export too).
    #[arg(long, value_name = "NAME")]
    pub(crate) export_name: Option<String>,
    /// Serve read-only: writes, trims and zeroing are refused.
    #[arg(long)]
    pub(crate) read_only: bool,
    /// Override the volume's error policy for this session (what happens when a read finds
    /// a block with no good copy): eio, read-only (suspend writes until `blockguard resume`
    /// or a restart) or continue (log each such block once). See `blockguard format --help`.
    #[arg(long, value_name = "POLICY", value_parser = crate::common::error_policy_parser())]
    pub(crate) error_policy: Option<blockguard::ErrorPolicy>,
    /// If VOLUME does not exist, format a new sparse volume of this size there first
    /// (binary units: "64M", "10G").
    #[arg(long, value_name = "SIZE", value_parser = parse_size, allow_hyphen_values = true)]
    pub(crate) create: Option<u64>,
    /// Most worker threads shared by all connections (default: two per core, at least 4).
    /// Two per core run while requests are served from memory; raise this for disk-bound
    /// random I/O, where more reads in flight help.
    #[arg(long, value_name = "N", value_parser = clap::value_parser!(u16).range(1..))]
    pub(crate) workers: Option<u16>,
    /// Bytes of written data the engine stages in memory before committing them (binary
    /// units). Each commit orders a metadata flush before its data; up to three stages'
    /// worth of memory may be in use at once.
    #[arg(long, value_name = "SIZE", default_value = "32M", value_parser = parse_size,
          allow_hyphen_values = true)]
    pub(crate) stage_size: u64,
    /// Most client connections at once. At the limit a new client takes the place of the
    /// quietest connection (one still in its handshake, one without a request for a second or
    /// more, or one whose request's data has stalled for a second or more, see
    /// --request-timeout); it is refused only when every connection is busy.
    #[arg(long, value_name = "N", default_value_t = 512,
          value_parser = clap::value_parser!(u32).range(1..=65536))]
    pub(crate) max_connections: u32,
    /// Seconds a client has to finish the whole NBD handshake, counted from connecting.
    #[arg(long, value_name = "SECONDS", default_value_t = 10,
          value_parser = clap::value_parser!(u32).range(1..))]
    pub(crate) handshake_timeout: u32,
    /// Close a connection after this many seconds without a request in flight, or with a
    /// stalled one (0: never; the kernel's nbd client, for one, keeps idle connections for as
    /// long as it is attached).
    #[arg(long, value_name = "SECONDS", default_value_t = 0)]
    pub(crate) idle_timeout: u32,
    /// Seconds a request's data may stall before its connection is closed (logged with the
    /// client's address, or process and user) and the memory it holds released: a write
    /// payload of which no byte came for this long, or that is this far behind a transfer at
    /// --min-transfer-rate since its header came; likewise replies the client does not read.
    /// While other requests wait for memory, or a new client for a connection, a payload
    /// stalled for a second already makes way.
    #[arg(long, value_name = "SECONDS", default_value_t = 30,
          value_parser = clap::value_parser!(u32).range(1..))]
    pub(crate) request_timeout: u32,
    /// The slowest a request's data may move, per second (binary units: "256K"); see
    /// --request-timeout. Clients on slower links than this with large requests need it lower.
    #[arg(long, value_name = "SIZE", default_value = "256K", value_parser = parse_rate,
          allow_hyphen_values = true)]
    pub(crate) min_transfer_rate: u64,
    /// Memory for requests in flight on all connections together: write payloads being read
    /// and read replies not yet sent (binary units). Beyond it requests wait, and connections
    /// that leave their replies unread, or stall in the middle of a write payload, are closed
    /// to free memory for the others.
    #[arg(long, value_name = "SIZE", default_value = "256M", value_parser = parse_size,
          allow_hyphen_values = true)]
    pub(crate) inflight_memory: u64,
    /// Refuse NBD extended headers (forces compact headers; for old or buggy clients).
    #[arg(long)]
    pub(crate) no_extended_headers: bool,
    /// Microseconds a connection's reader busy-polls for the next request before sleeping
    /// (0: never). Polling cuts latency at low queue depth (4 KiB QD1 reads: about 2x the
    /// IOPS) at the price of CPU time while requests keep coming; at most one reader per two
    /// cores polls, and connections whose requests come later than this stop polling.
    #[arg(long, value_name = "MICROSECONDS", default_value_t = 50,
          value_parser = clap::value_parser!(u32).range(0..=10_000))]
    pub(crate) poll_us: u32,
    #[command(flatten)]
    pub(crate) tls: TlsArgs,
    #[command(flatten)]
    pub(crate) control: crate::control::ControlArgs,
    /// Do not resync mirror copies on NBD exports automatically when they are back (by
    /// default a remote copy that fell out of sync is resynchronized once reachable, retried
    /// with a backoff up to a minute; `mirror resync` does it by hand).
    #[arg(long)]
    pub(crate) no_auto_resync: bool,
}

/// TLS options of `blockguard serve` (NBD `STARTTLS`, as `nbds://` clients and qemu's
/// `tls-creds-x509` use it).
#[derive(clap::Args, Debug)]
pub(crate) struct TlsArgs {
    /// Offer TLS with this certificate (PEM; the server's certificate first, then any
    /// intermediates). Needs --tls-key.
    #[arg(long, value_name = "FILE", requires = "tls_key")]
    pub(crate) tls_cert: Option<PathBuf>,
    /// The private key of --tls-cert (PEM: PKCS#8, PKCS#1 or SEC1).
    #[arg(long, value_name = "FILE", requires = "tls_cert")]
    pub(crate) tls_key: Option<PathBuf>,
    /// Require client certificates signed by this CA (PEM); clients without one, or with
    /// another, are refused in the TLS handshake.
    #[arg(long, value_name = "FILE", requires = "tls_cert")]
    pub(crate) tls_client_ca: Option<PathBuf>,
    /// With --tls-cert: "required" (the default) serves nothing to a client before it has
    /// started TLS; "optional" serves plain-text clients too.
    #[arg(long, value_name = "MODE", requires = "tls_cert", value_parser = parse_tls_mode)]
    pub(crate) tls: Option<TlsMode>,
}

fn parse_tls_mode(s: &str) -> Result<TlsMode, String> {
    match s {
        "required" => Ok(TlsMode::Required),
        "optional" => Ok(TlsMode::Optional),
        _ => Err(format!("{s:?} is not a TLS mode: give required or optional")),
    }
}

impl TlsArgs {
    /// Loads the certificate, key and client CA (a bad file is an error here, at startup).
    fn load(&self) -> Result<Option<TlsConfig>> {
        let (Some(cert), Some(key)) = (&self.tls_cert, &self.tls_key) else {
            return Ok(None);
        };
        let mode = self.tls.unwrap_or(TlsMode::Required);
        let cfg = TlsConfig::from_pem_files(cert, key, self.tls_client_ca.as_deref(), mode)
            .context("cannot set up TLS")?;
        Ok(Some(cfg))
    }
}

/// Parses `--min-transfer-rate`: a size per second, not zero.
fn parse_rate(s: &str) -> Result<u64, String> {
    match parse_size(s)? {
        0 => Err("the minimum transfer rate cannot be 0".into()),
        rate => Ok(rate),
    }
}

/// Runs the server until SIGINT/SIGTERM, then flushes and closes the volume.
pub(crate) fn run(args: &ServeArgs) -> Result<()> {
    let path = &args.volume;
    // Arguments first: a bad address or TLS file must not cost a volume creation or open.
    let tls = args.tls.load()?;
    let addr = listen_addr(args, tls.as_ref())?;
    let stage = args.stage_size;
    let volume = match args.create {
        Some(size) if !path.exists() && !crate::remote::is_remote(path) => {
            let vol = crate::common::create_volume(path, size)?;
            tracing::info!(volume = %path.display(), size, "created a new volume");
            // Formatting opened it read-write with defaults: reopen with the requested mode
            // and stage size.
            vol.close().doing("close the new volume", path)?;
            crate::common::open_volume_staged(path, args.read_only, Some(stage), args.error_policy)?
        }
        _ => {
            let vol = crate::common::open_volume_staged(path, args.read_only, Some(stage), args.error_policy)
                .doing("serve", path)?;
            if let Some(asked) = args.create {
                warn_if_other_size(path, vol.size(), asked);
            }
            vol
        }
    };
    let export_name = args.export_name.clone().unwrap_or_else(|| {
        path.file_name()
            .map(|n| n.to_string_lossy().into_owned())
            .unwrap_or_default()
    });
    let cfg = ServerConfig {
        export_name,
        workers: args.workers.map_or(0, usize::from),
        extended_headers: !args.no_extended_headers,
        poll_window: Duration::from_micros(args.poll_us.into()),
        max_connections: usize::try_from(args.max_connections).unwrap_or(usize::MAX),
        max_total_inflight_bytes: usize::try_from(args.inflight_memory).unwrap_or(usize::MAX),
        handshake_timeout: Duration::from_secs(args.handshake_timeout.into()),
        idle_timeout: (args.idle_timeout > 0).then(|| Duration::from_secs(args.idle_timeout.into())),
        request_timeout: Duration::from_secs(args.request_timeout.into()),
        min_transfer_rate: args.min_transfer_rate,
        tls,
        ..ServerConfig::default()
    };
    let volume = Arc::new(volume);
    let export: Arc<dyn Export> = Arc::new(DeviceExport::new(volume.clone()));
    let server = Server::bind(&addr, export, cfg)?;
    let control = crate::control::start(
        &args.control,
        ControlContext {
            volume: Arc::clone(&volume),
            path: path.clone(),
            serving: Serving::Nbd {
                listen: server.local_addr().to_string(),
                connections: server.connection_stats(),
            },
        },
    )?;
    blockguard_nbd::shutdown_on_signals(&server.shutdown_handle())
        .context("cannot install signal handlers")?;
    let auto = crate::autoresync::AutoResync::start(&volume, !args.no_auto_resync);
    let outcome = server.run();
    // Stopping it lets go of the volume before the close below.
    drop(auto);
    // Stops a scrub (keeping its position for a resume) and lets go of the volume.
    if let Some(c) = control {
        c.shutdown();
    }
    if let Err(e @ ServerError::Panicked { .. }) = outcome {
        // Fail-stop: an invariant may be broken, so the volume is neither flushed nor marked
        // clean — left as a crash would leave it, for `recover` to settle. Dropping it would
        // do both, so it is leaked; the process exits right after.
        std::mem::forget(volume);
        return Err(anyhow::Error::new(e).context(format!(
            "{} was left unflushed and marked in use: run `blockguard check` and `blockguard \
             recover` on it before using it again",
            path.display()
        )));
    }
    // The server and every connection have ended, so this is the last reference.
    match Arc::try_unwrap(volume) {
        Ok(vol) => vol.close().doing("close", path)?,
        Err(vol) => {
            // Only a bug leaves another reference behind; the data is made durable, but the
            // volume stays marked in use, so the next open checks the groups last written.
            tracing::warn!(volume = %path.display(), "the volume is still referenced after shutdown: flushed, left marked in use");
            vol.flush().doing("flush", path)?;
        }
    }
    outcome?;
    tracing::info!(volume = %path.display(), "volume closed cleanly");
    Ok(())
}

/// Where to listen: `--socket` if given, else `--listen` (with a warning when that is not a
/// loopback address and TLS is not required).
fn listen_addr(args: &ServeArgs, tls: Option<&TlsConfig>) -> Result<ListenAddr> {
    if let Some(p) = &args.socket {
        return Ok(ListenAddr::Unix(p.clone()));
    }
    let addr = resolve_listen(&args.listen)?;
    if !addr.ip().is_loopback() {
        match tls.map(TlsConfig::mode) {
            None => tracing::warn!(
                listen = %addr,
                "listening beyond loopback without TLS: anyone who can reach this address reads \
                 and writes the volume, and the data crosses the network in clear (see \
                 --tls-cert)"
            ),
            Some(TlsMode::Optional) => tracing::warn!(
                listen = %addr,
                "listening beyond loopback with --tls optional: clients that do not start TLS \
                 are served in clear (--tls required refuses them)"
            ),
            Some(TlsMode::Required) => {}
        }
    }
    Ok(ListenAddr::Tcp(addr))
}

/// `--create SIZE` on an existing volume serves it unchanged; say so when the sizes differ,
/// since the client sees the existing size, not the one asked for.
fn warn_if_other_size(path: &std::path::Path, size: u64, asked: u64) {
    if size != asked {
        tracing::warn!(
            volume = %path.display(),
            size,
            asked,
            "the volume exists with {size} bytes, not the {asked} bytes --create asked for: \
             serving it as it is (--create never resizes or reformats)"
        );
    }
}

/// Resolves `--listen HOST:PORT`. A host name may resolve to several addresses (`localhost`:
/// `127.0.0.1` and `::1`); the server listens on one, IPv4 first, since clients try every address
/// the name resolves to.
fn resolve_listen(listen: &str) -> Result<SocketAddr> {
    let hint = "give HOST:PORT with an IP address or a host name, e.g. 127.0.0.1:10809 or localhost:10809";
    let addrs: Vec<SocketAddr> = listen
        .to_socket_addrs()
        .with_context(|| format!("cannot resolve --listen {listen:?} ({hint})"))?
        .collect();
    let chosen = addrs
        .iter()
        .find(|a| a.is_ipv4())
        .or(addrs.first())
        .copied()
        .ok_or_else(|| anyhow!("--listen {listen:?} resolves to no address ({hint})"))?;
    if addrs.len() > 1 {
        tracing::info!(listen, address = %chosen, "host name resolves to several addresses; listening on one");
    }
    Ok(chosen)
}
