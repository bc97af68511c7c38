//! The scrub a control server runs on its volume: at most one at a time, owned by the server
//! (not by the connection that asked for it), observed and stopped by any control client.
//!
//! The scrub thread publishes each chunk's progress under a mutex and wakes the followers;
//! each follower relays the latest progress to its client a few times a second at most, so a
//! slow or stuck client never slows the scrub (its connection's writes time out instead).

use super::proto::{error, ErrorKind, Response, ScrubRequest, ScrubState};
use crate::scrub::{load_state, save_state, unix_now};
use blockguard::{ScrubOptions, ScrubProgress, ScrubReport, Volume};
use std::collections::VecDeque;
use std::io;
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Condvar, Mutex, MutexGuard, PoisonError};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

/// A follower sends at most one progress line per this interval.
const PROGRESS_EVERY: Duration = Duration::from_millis(200);

/// How long `scrub-stop` waits for the scrub to end.
const STOP_WAIT: Duration = Duration::from_secs(30);

/// Finished scrubs whose outcome a late follower can still pick up.
const RECENT: usize = 8;

/// The server's scrub: the one running, and what the last ones left.
pub(crate) struct Scrubber {
    volume: Arc<Volume>,
    /// The volume's path, for its scrub state file.
    path: PathBuf,
    state: Mutex<State>,
    changed: Condvar,
}

/// What the mutex guards.
#[derive(Default)]
struct State {
    /// Id of the latest scrub started (ids start at 1).
    last_id: u64,
    running: Option<Running>,
    /// Bumped at every progress of the running scrub.
    generation: u64,
    /// Outcomes of the last scrubs, by id (oldest first).
    recent: VecDeque<(u64, Result<ScrubReport, String>)>,
    /// The last scrub's report (here, or from the state file at start).
    last: Option<ScrubReport>,
    last_ended: Option<u64>,
    resume_from: Option<u64>,
    closing: bool,
    /// Every scrub thread not joined yet: all are joined at shutdown, so that none still
    /// holds the volume when the server closes it.
    threads: Vec<JoinHandle<()>>,
}

struct Running {
    id: u64,
    stop: Arc<AtomicBool>,
    progress: Option<ScrubProgress>,
}

/// What [`Scrubber::start`] started.
pub(crate) struct Started {
    /// The scrub's id, to follow it.
    pub(crate) id: u64,
    /// The reply to send.
    pub(crate) reply: Response,
}

fn lock(m: &Mutex<State>) -> MutexGuard<'_, State> {
    // Bookkeeping only: a panic elsewhere leaves nothing inconsistent here that matters more
    // than being able to stop and report.
    m.lock().unwrap_or_else(PoisonError::into_inner)
}

impl Scrubber {
    /// A scrubber for `volume` (at `path`), knowing what the state file says about the last
    /// scrub.
    pub(crate) fn new(volume: Arc<Volume>, path: PathBuf) -> Scrubber {
        let mut state = State::default();
        if let Some(saved) = load_state(&path, &volume) {
            state.resume_from = saved.resume_from;
            state.last_ended = Some(saved.ended);
            state.last = Some(saved.report);
        }
        Scrubber {
            volume,
            path,
            state: Mutex::new(state),
            changed: Condvar::new(),
        }
    }

    /// Starts a scrub as `req` asks; an error reply if one runs already or it cannot start.
    pub(crate) fn start(self: &Arc<Self>, req: &ScrubRequest) -> Result<Started, Response> {
        if req.repair && self.volume.is_read_only() {
            return Err(error(
                ErrorKind::Refused,
                format!(
                    "{}: cannot repair a volume that is served read-only",
                    self.volume.name()
                ),
            ));
        }
        if req.rate == Some(0) {
            return Err(error(
                ErrorKind::BadRequest,
                "rate must be at least 1 byte/s".into(),
            ));
        }
        let mut g = lock(&self.state);
        if g.closing {
            return Err(error(
                ErrorKind::ShuttingDown,
                "the server is shutting down".into(),
            ));
        }
        if let Some(r) = &g.running {
            let at = r.progress.as_ref().map_or(0, |p| p.position);
            return Err(error(
                ErrorKind::Busy,
                format!(
                    "{}: a scrub is already running (at byte {at} of {}); follow it with scrub-status or stop it with scrub-stop",
                    self.volume.name(),
                    self.volume.size()
                ),
            ));
        }
        let (start, resumed) = match g.resume_from {
            Some(p) if req.resume => (p, true),
            _ => (0, false),
        };
        g.last_id += 1;
        let id = g.last_id;
        let stop = Arc::new(AtomicBool::new(false));
        let me = Arc::clone(self);
        let (flag, repair, rate) = (Arc::clone(&stop), req.repair, req.rate);
        let thread = std::thread::Builder::new()
            .name("blockguard-scrub".into())
            .spawn(move || me.run(id, start, &flag, repair, rate))
            .map_err(|e| error(ErrorKind::Failed, format!("cannot start the scrub thread: {e}")))?;
        g.running = Some(Running {
            id,
            stop,
            progress: None,
        });
        // Threads of scrubs that ended are joined here rather than left to pile up.
        let (ended, alive): (Vec<_>, Vec<_>) = g.threads.drain(..).partition(JoinHandle::is_finished);
        g.threads = alive;
        g.threads.push(thread);
        for t in ended {
            let _ = t.join();
        }
        tracing::info!(volume = %self.volume.name(), start, resumed, "scrub started");
        Ok(Started {
            id,
            reply: Response::ScrubStarted {
                start,
                end: self.volume.size(),
                resumed,
            },
        })
    }

    /// The scrub thread's body.
    fn run(&self, id: u64, start: u64, stop: &AtomicBool, repair: bool, rate: Option<u64>) {
        let opts = ScrubOptions {
            start,
            rate,
            repair,
            stop: Some(stop),
            ..ScrubOptions::default()
        };
        let mut publish = |p| {
            let mut g = lock(&self.state);
            if let Some(r) = g.running.as_mut().filter(|r| r.id == id) {
                r.progress = Some(p);
            }
            g.generation += 1;
            drop(g);
            self.changed.notify_all();
        };
        // A panic must still end the scrub for its followers and `scrub-stop`, who wait for
        // its outcome.
        let outcome = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
            self.volume.scrub(opts, &mut publish).map_err(|e| e.to_string())
        }))
        .unwrap_or_else(|_| Err(format!("{}: the scrub panicked", self.volume.name())));
        match &outcome {
            Ok(report) => {
                tracing::info!(
                    volume = %self.volume.name(),
                    blocks = report.blocks_checked,
                    problems = report.problem_count,
                    stopped = report.stopped,
                    position = report.position,
                    "scrub ended"
                );
                if let Err(e) = save_state(&self.path, &self.volume, report) {
                    tracing::warn!(volume = %self.volume.name(), "cannot save the scrub state: {e:#}");
                }
            }
            Err(e) => tracing::error!(volume = %self.volume.name(), "scrub failed: {e}"),
        }
        let mut g = lock(&self.state);
        if let Ok(report) = &outcome {
            g.resume_from = report.stopped.then_some(report.position);
            g.last = Some(report.clone());
            g.last_ended = Some(unix_now());
        }
        if g.recent.len() == RECENT {
            g.recent.pop_front();
        }
        g.recent.push_back((id, outcome));
        if g.running.as_ref().is_some_and(|r| r.id == id) {
            g.running = None;
        }
        drop(g);
        self.changed.notify_all();
    }

    /// The running scrub and the last one.
    pub(crate) fn state(&self) -> ScrubState {
        let g = lock(&self.state);
        ScrubState {
            running: g.running.is_some(),
            progress: g.running.as_ref().and_then(|r| r.progress.clone()),
            last: g.last.clone(),
            last_ended: g.last_ended,
            resume_from: g.resume_from,
        }
    }

    /// Stops the running scrub, waits for it to end (it checks between chunks; at most
    /// [`STOP_WAIT`] for a chunk stuck on a failing disk), and returns its report.
    pub(crate) fn stop(&self) -> Response {
        let deadline = Instant::now() + STOP_WAIT;
        let mut g = lock(&self.state);
        let Some(id) = g.running.as_ref().map(|r| {
            r.stop.store(true, Ordering::Relaxed);
            r.id
        }) else {
            return Response::ScrubStopped {
                was_running: false,
                report: None,
            };
        };
        loop {
            if let Some(outcome) = find(&g.recent, id) {
                return match outcome {
                    Ok(report) => Response::ScrubStopped {
                        was_running: true,
                        report: Some(Box::new(report.clone())),
                    },
                    Err(e) => error(ErrorKind::Failed, e.clone()),
                };
            }
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                return error(
                    ErrorKind::Failed,
                    format!(
                        "{}: the scrub was told to stop but has not ended after {} s (a read may be stuck)",
                        self.volume.name(),
                        STOP_WAIT.as_secs()
                    ),
                );
            }
            g = self
                .changed
                .wait_timeout(g, left)
                .unwrap_or_else(PoisonError::into_inner)
                .0;
        }
    }

    /// Sends the progress of scrub `id` through `send` (at most every [`PROGRESS_EVERY`]) and
    /// then its outcome; returns when it has ended, the server is closing, or `send` fails.
    pub(crate) fn follow(
        &self,
        id: u64,
        send: &mut dyn FnMut(&Response) -> io::Result<()>,
    ) -> io::Result<()> {
        let mut sent_generation = 0;
        let mut next_at = Instant::now();
        loop {
            let mut g = lock(&self.state);
            let (reply, done) = loop {
                if let Some(outcome) = find(&g.recent, id) {
                    let reply = match outcome {
                        Ok(report) => Response::ScrubDone {
                            report: Box::new(report.clone()),
                        },
                        Err(e) => error(ErrorKind::Failed, e.clone()),
                    };
                    break (reply, true);
                }
                if g.closing {
                    let e = error(
                        ErrorKind::ShuttingDown,
                        "the server is shutting down: the scrub was stopped".into(),
                    );
                    break (e, true);
                }
                let now = Instant::now();
                let fresh = g.generation != sent_generation;
                let progress = g.running.as_ref().and_then(|r| r.progress.clone());
                match progress {
                    Some(p) if fresh && now >= next_at => {
                        sent_generation = g.generation;
                        break (Response::ScrubProgress(Box::new(p)), false);
                    }
                    _ => {}
                }
                let wait = if fresh {
                    next_at.saturating_duration_since(now)
                } else {
                    Duration::from_secs(1)
                };
                g = self
                    .changed
                    .wait_timeout(g, wait)
                    .unwrap_or_else(PoisonError::into_inner)
                    .0;
            };
            drop(g);
            send(&reply)?;
            if done {
                return Ok(());
            }
            next_at = Instant::now() + PROGRESS_EVERY;
        }
    }

    /// Stops any scrub and waits for it (its position is saved for a resume); wakes every
    /// follower. Called once, at shutdown.
    pub(crate) fn shutdown(&self) {
        let threads = {
            let mut g = lock(&self.state);
            g.closing = true;
            if let Some(r) = &g.running {
                r.stop.store(true, Ordering::Relaxed);
            }
            std::mem::take(&mut g.threads)
        };
        self.changed.notify_all();
        for t in threads {
            if t.join().is_err() {
                tracing::error!(volume = %self.volume.name(), "the scrub thread panicked");
            }
        }
        self.changed.notify_all();
    }
}

fn find(
    recent: &VecDeque<(u64, Result<ScrubReport, String>)>,
    id: u64,
) -> Option<&Result<ScrubReport, String>> {
    recent.iter().find(|(i, _)| *i == id).map(|(_, o)| o)
}
