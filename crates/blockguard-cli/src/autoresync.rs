//! Automatic resync of mirror copies on NBD exports, while a volume is served.
//!
//! A remote copy usually fails because the network or its server went away for a while, not
//! because its disk is going bad, so the server brings it back by itself: while a copy on an
//! NBD export is out of sync, a thread tries `mirror resync` (only the groups written since it
//! fell behind), first a second after noticing, then with a wait that doubles up to a minute
//! while attempts fail. Local copies are left to the administrator: a local disk that failed a
//! write may be failing, and rewriting it in a loop would not help.

use blockguard::blockguard_backend::nbd::is_nbd_uri;
use blockguard::Volume;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

/// First wait after a remote copy is seen out of sync.
const FIRST: Duration = Duration::from_secs(1);
/// Longest wait between attempts.
const LONGEST: Duration = Duration::from_mins(1);
/// How often the thread looks at the copies and at its stop flag.
const TICK: Duration = Duration::from_millis(100);

/// The running resync thread; stopped when dropped (an attempt in progress is given up
/// between groups), which waits for it to let go of the volume.
pub(crate) struct AutoResync {
    stop: Arc<AtomicBool>,
    thread: Option<JoinHandle<()>>,
}

impl AutoResync {
    /// Starts watching `volume` if `enabled` (nothing to do for a read-only volume, whose
    /// copies a resync could not write, nor for a plain one).
    pub(crate) fn start(volume: &Arc<Volume>, enabled: bool) -> Option<AutoResync> {
        if !enabled || volume.is_read_only() || volume.members().is_empty() {
            return None;
        }
        let stop = Arc::new(AtomicBool::new(false));
        let (vol, flag) = (Arc::clone(volume), Arc::clone(&stop));
        let thread = std::thread::Builder::new()
            .name("auto-resync".to_string())
            .spawn(move || watch(&vol, &flag))
            .ok()?;
        Some(AutoResync {
            stop,
            thread: Some(thread),
        })
    }
}

impl Drop for AutoResync {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::SeqCst);
        if let Some(t) = self.thread.take() {
            // A panic in the thread was reported by the panic hook already.
            let _ = t.join();
        }
    }
}

fn remote_out_of_sync(vol: &Volume) -> bool {
    vol.members()
        .iter()
        .any(|(name, in_sync)| !in_sync && is_nbd_uri(name))
}

fn watch(vol: &Volume, stop: &AtomicBool) {
    let mut wait = FIRST;
    let mut next: Option<Instant> = None;
    while !stop.load(Ordering::SeqCst) {
        std::thread::sleep(TICK);
        if !remote_out_of_sync(vol) {
            next = None;
            wait = FIRST;
            continue;
        }
        let due = *next.get_or_insert_with(|| Instant::now() + wait);
        if Instant::now() < due {
            continue;
        }
        match vol.resync_until(&mut |_, _| {}, stop) {
            Ok(report) if report.failed.is_empty() => {
                tracing::info!(volume = %vol.name(), copies = ?report.members, groups = report.groups,
                    "remote mirror copies back in sync (automatic resync)");
                wait = FIRST;
            }
            Ok(report) => {
                tracing::warn!(volume = %vol.name(), failed = ?report.failed, retry_in = ?wait * 2,
                    "automatic resync of remote copies failed");
                wait = (wait * 2).min(LONGEST);
            }
            Err(e) => {
                tracing::warn!(volume = %vol.name(), retry_in = ?wait * 2,
                    "automatic resync of remote copies failed: {}", e.describe());
                wait = (wait * 2).min(LONGEST);
            }
        }
        next = Some(Instant::now() + wait);
    }
}
