//! The control socket: how `blockguard status` and `blockguard scrub` reach a volume that a
//! `serve` or `mount` process holds (documented for users in `docs/CONTROL.md`).
//!
//! Both ends are the `blockguard` binary, so the protocol lives here rather than in a crate of
//! its own: `proto` (the messages), `server` (the listener `serve` and `mount` run),
//! `scrubber` (the scrub a server runs), `client` (connecting, and choosing between the socket
//! and a direct open). A separate crate would pay off once something other than this binary
//! speaks the protocol.

pub(crate) mod client;
pub(crate) mod proto;
pub(crate) mod scrubber;
pub(crate) mod server;

use anyhow::Result;
use std::path::{Path, PathBuf};

/// The control-socket options of `serve` and `mount`.
#[derive(clap::Args, Debug, Clone, Default)]
pub(crate) struct ControlArgs {
    /// Listen for `blockguard status` and `scrub` on this Unix socket (default: the volume's
    /// path + ".ctl"; for a block device, /run/blockguard/NAME-MAJOR:MINOR.ctl).
    #[arg(long, value_name = "PATH")]
    pub(crate) control: Option<PathBuf>,
    /// Do not listen on a control socket (`status` and `scrub` then cannot reach the volume
    /// while it is served).
    #[arg(long, conflicts_with = "control")]
    pub(crate) no_control: bool,
}

impl ControlArgs {
    /// The socket to listen on for `volume`, or `None` with `--no-control`.
    pub(crate) fn socket(&self, volume: &Path) -> Result<Option<PathBuf>> {
        if self.no_control {
            return Ok(None);
        }
        match &self.control {
            Some(p) => Ok(Some(p.clone())),
            None => crate::sidecar::control_socket(volume).map(Some),
        }
    }

    /// The same options as command-line arguments (for a re-executed `mount`).
    pub(crate) fn to_args(&self) -> Vec<std::ffi::OsString> {
        match (&self.control, self.no_control) {
            (_, true) => vec!["--no-control".into()],
            (Some(p), false) => vec!["--control".into(), p.clone().into_os_string()],
            (None, false) => Vec::new(),
        }
    }
}

/// Starts a control server for `ctx` if `args` ask for one.
pub(crate) fn start(args: &ControlArgs, ctx: server::Context) -> Result<Option<server::ControlServer>> {
    match args.socket(&ctx.path)? {
        Some(socket) => server::ControlServer::start(&socket, ctx).map(Some),
        None => Ok(None),
    }
}
