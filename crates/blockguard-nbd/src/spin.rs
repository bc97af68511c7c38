//! Busy-polling an idle connection for a short while before blocking on it.
//!
//! At queue depth 1 the next request arrives a few tens of microseconds after the reply
//! left. A reader that blocks at once pays a sleep and a wake-up for every request — on a
//! virtual machine, waking an idle vCPU alone costs about as much as serving a 4 KiB read
//! from the page cache. Polling the socket for up to [`SpinConfig::window`] first roughly
//! doubled 4 KiB QD1 IOPS here (see `docs/PERFORMANCE.md`), at the price of CPU time while
//! requests keep coming.
//!
//! The price is bounded: at most [`SpinConfig::max_spinners`] readers poll at once, a
//! polling reader yields its CPU to any other runnable thread between polls, and a connection
//! whose requests keep arriving later than the window (an interactive or idle client) stops
//! polling, retrying only now and then.

use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

/// How readers poll.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct SpinConfig {
    /// Longest poll before blocking; zero disables polling.
    pub window: Duration,
    /// Most readers polling at the same time, server-wide.
    pub max_spinners: usize,
}

impl SpinConfig {
    /// 50 µs, and one poller per two cores (at least one).
    pub(crate) fn for_cores(cores: usize) -> Self {
        Self {
            window: Duration::from_micros(50),
            max_spinners: (cores / 2).max(1),
        }
    }

    /// No polling.
    #[cfg(test)]
    pub(crate) fn off() -> Self {
        Self {
            window: Duration::ZERO,
            max_spinners: 0,
        }
    }
}

/// Server-wide count of polling readers.
#[derive(Debug, Default)]
pub(crate) struct Spinners(AtomicUsize);

/// Score above which a connection polls; each poll that sees data raises it, each that
/// times out lowers it more.
const MAX_SCORE: u32 = 8;
const HIT: u32 = 1;
const MISS: u32 = 3;
/// A connection that stopped polling tries again after this many waits.
const RETRY_EVERY: u32 = 64;

/// One connection's polling history.
#[derive(Debug)]
pub(crate) struct SpinState {
    score: u32,
    waits_since_poll: u32,
}

impl Default for SpinState {
    fn default() -> Self {
        Self {
            score: MAX_SCORE,
            waits_since_poll: 0,
        }
    }
}

impl SpinState {
    /// Before blocking on an empty socket: polls `ready` (true once there is something to
    /// read) until it says so or the window ends, if this connection's history and the
    /// server-wide limit allow. Returns true if data arrived while polling.
    pub(crate) fn wait(
        &mut self,
        cfg: &SpinConfig,
        spinners: &Spinners,
        mut ready: impl FnMut() -> bool,
    ) -> bool {
        if cfg.window.is_zero() {
            return false;
        }
        if self.score == 0 {
            self.waits_since_poll += 1;
            if self.waits_since_poll < RETRY_EVERY {
                return false;
            }
            self.waits_since_poll = 0;
            self.score = HIT;
        }
        let Some(_slot) = Slot::take(spinners, cfg.max_spinners) else {
            return false;
        };
        let deadline = Instant::now() + cfg.window;
        loop {
            if ready() {
                self.score = (self.score + HIT).min(MAX_SCORE);
                return true;
            }
            if Instant::now() >= deadline {
                self.score = self.score.saturating_sub(MISS);
                return false;
            }
            // Another runnable thread (a worker with a request) goes first.
            std::thread::yield_now();
        }
    }
}

/// A place among the server's pollers, given back on drop.
struct Slot<'a>(&'a Spinners);

impl<'a> Slot<'a> {
    fn take(spinners: &'a Spinners, max: usize) -> Option<Self> {
        spinners
            .0
            .fetch_update(Ordering::AcqRel, Ordering::Acquire, |n| {
                (n < max).then_some(n + 1)
            })
            .ok()
            .map(|_| Slot(spinners))
    }
}

impl Drop for Slot<'_> {
    fn drop(&mut self) {
        self.0 .0.fetch_sub(1, Ordering::AcqRel);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cfg() -> SpinConfig {
        SpinConfig {
            window: Duration::from_millis(2),
            max_spinners: 1,
        }
    }

    #[test]
    fn data_within_the_window_is_seen_by_polling() {
        let s = Spinners::default();
        let mut st = SpinState::default();
        let mut polls = 0;
        assert!(st.wait(&cfg(), &s, || {
            polls += 1;
            polls == 3
        }));
        assert_eq!(s.0.load(Ordering::SeqCst), 0, "slot given back");
    }

    #[test]
    fn connections_whose_requests_come_late_stop_polling_then_retry() {
        let s = Spinners::default();
        let mut st = SpinState::default();
        let mut polled = 0;
        for _ in 0..3 {
            st.wait(&cfg(), &s, || {
                polled += 1;
                false
            });
        }
        assert_eq!(st.score, 0, "three misses end polling");
        let before = polled;
        for _ in 0..RETRY_EVERY - 1 {
            assert!(!st.wait(&cfg(), &s, || {
                polled += 1;
                true
            }));
        }
        assert_eq!(polled, before, "no polling while backed off");
        assert!(st.wait(&cfg(), &s, || true), "retried after RETRY_EVERY waits");
        assert!(st.score > 0);
    }

    #[test]
    fn pollers_are_limited_server_wide_and_zero_window_disables() {
        let s = Spinners::default();
        let held = Slot::take(&s, 1).unwrap();
        let mut st = SpinState::default();
        assert!(!st.wait(&cfg(), &s, || true), "the only slot is taken");
        drop(held);
        assert!(st.wait(&cfg(), &s, || true));
        assert!(!st.wait(&SpinConfig::off(), &s, || true));
    }
}
