//! SIGINT, SIGTERM and SIGHUP during a command that must clean up after itself (`export`,
//! `scrub`): the handlers only record the signal; the command looks at [`Signals::caught`]
//! between steps (and waits for a control server in short slices, checking [`caught`]),
//! cleans up, and returns [`Interrupted`], which exits with status 128 + the signal, as the
//! signal itself would have. A second signal exits at once, without cleaning up.

use anyhow::{Context, Result};
use signal_hook::consts::{SIGHUP, SIGINT, SIGTERM};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, OnceLock};

/// The stop signals seen since [`Signals::watch`].
#[derive(Clone)]
pub(crate) struct Signals {
    caught: Arc<AtomicUsize>,
    requested: Arc<AtomicBool>,
}

/// The process's handlers, installed once.
static WATCHED: OnceLock<Signals> = OnceLock::new();

/// The stop signal caught since [`Signals::watch`], if it was called and one came.
pub(crate) fn caught() -> Option<Interrupted> {
    WATCHED.get().and_then(Signals::caught)
}

impl Signals {
    /// Installs the handlers (once: later calls share them); they stay for the rest of the
    /// process.
    pub(crate) fn watch() -> Result<Signals> {
        if let Some(s) = WATCHED.get() {
            return Ok(s.clone());
        }
        let caught = Arc::new(AtomicUsize::new(0));
        let requested = Arc::new(AtomicBool::new(false));
        for sig in [SIGINT, SIGTERM, SIGHUP] {
            // Registered first, so it sees the flag as it was before this signal: it exits
            // only when an earlier signal had already set it.
            signal_hook::flag::register_conditional_shutdown(sig, 128 + sig, Arc::clone(&requested))
                .and_then(|_| signal_hook::flag::register(sig, Arc::clone(&requested)))
                // Signal numbers are positive; 0 reads as "none".
                .and_then(|_| {
                    signal_hook::flag::register_usize(
                        sig,
                        Arc::clone(&caught),
                        usize::try_from(sig).unwrap_or(1),
                    )
                })
                .context("cannot install signal handlers")?;
        }
        Ok(WATCHED.get_or_init(|| Signals { caught, requested }).clone())
    }

    /// The flag the handlers set, for code that polls a flag (a scrub's stop option).
    pub(crate) fn flag(&self) -> &AtomicBool {
        &self.requested
    }

    /// The stop signal caught, if any.
    pub(crate) fn caught(&self) -> Option<Interrupted> {
        match self.caught.load(Ordering::SeqCst) {
            0 => None,
            n => Some(Interrupted(i32::try_from(n).unwrap_or(SIGTERM))),
        }
    }
}

/// A command stopped by a signal: the error it returns once it has cleaned up.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Interrupted(pub(crate) i32);

impl Interrupted {
    /// The exit status a process killed by the signal reports in a shell: 128 + the signal.
    pub(crate) fn exit_code(self) -> u8 {
        u8::try_from(128 + self.0).unwrap_or(u8::MAX)
    }
}

impl std::fmt::Display for Interrupted {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let name = match self.0 {
            SIGINT => "SIGINT",
            SIGTERM => "SIGTERM",
            SIGHUP => "SIGHUP",
            _ => "a signal",
        };
        write!(f, "interrupted by {name}")
    }
}

impl std::error::Error for Interrupted {}
