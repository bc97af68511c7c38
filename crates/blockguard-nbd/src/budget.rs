//! The memory all connections together may hold in requests in flight: write payloads being
//! read or executed, and read replies until they are on the wire.
//!
//! Each connection is bounded on its own (`ServerConfig::max_inflight_bytes`, or one request
//! of up to the maximum payload when it has nothing else in flight), but a client that sends
//! read requests and never reads the replies pins that much for as long as it stays
//! connected, and a few hundred such clients pin gigabytes. So every request also takes its
//! cost from this budget before its payload is read or its reply built, and gives it back
//! once the reply is written (or dropped with the connection).
//!
//! When the budget is spent, readers wait. Waiters are served smallest request first (then
//! in arrival order): a small request pins little and finishes soon, and a well-behaved
//! client's requests are usually smaller than the largest reads a misbehaving one can ask for.
//! A waiter that has waited [`PRESSURE_GRACE`] asks for relief: the server then closes the
//! connection stalled the longest — replies sat unread, or a write payload the client stopped
//! sending (see `ConnTable::relieve`) — which returns its memory. A waiting request counts as
//! in flight, so its connection is never the one closed as idle; and every holder is bounded
//! in time (the request timeout), so no wait here is unbounded.

use std::collections::BTreeSet;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Condvar, Mutex, MutexGuard, PoisonError};
use std::time::{Duration, Instant};

/// How long a request waits for memory before the server closes a connection that does not
/// read its replies (or, stalled for a second, does not send its payload).
pub(crate) const PRESSURE_GRACE: Duration = Duration::from_millis(250);

/// Waiters re-check this often (so a cancelled one leaves and relief repeats).
const RECHECK: Duration = Duration::from_millis(50);

/// Waiting requests, by (cost, ticket): the first is served first.
#[derive(Default)]
struct Queue {
    waiting: BTreeSet<(usize, u64)>,
    next_ticket: u64,
}

/// The in-flight memory budget shared by all connections.
pub(crate) struct Budget {
    limit: usize,
    used: AtomicUsize,
    /// Requests waiting; while any do, new requests queue behind them.
    waiters: AtomicUsize,
    queue: Mutex<Queue>,
    freed: Condvar,
}

fn lock(m: &Mutex<Queue>) -> MutexGuard<'_, Queue> {
    // The queue is bookkeeping only; it must keep working for the server to shut down.
    m.lock().unwrap_or_else(PoisonError::into_inner)
}

impl Budget {
    /// A budget of `limit` bytes. A request larger than that is still admitted when nothing
    /// else is in flight, so no request can wait forever.
    pub(crate) fn new(limit: usize) -> Budget {
        Budget {
            limit,
            used: AtomicUsize::new(0),
            waiters: AtomicUsize::new(0),
            queue: Mutex::new(Queue::default()),
            freed: Condvar::new(),
        }
    }

    /// Bytes taken now.
    #[cfg(test)]
    pub(crate) fn used(&self) -> usize {
        self.used.load(Ordering::SeqCst)
    }

    fn try_add(&self, cost: usize) -> bool {
        self.used
            .fetch_update(Ordering::SeqCst, Ordering::SeqCst, |used| {
                (used == 0 || used.saturating_add(cost) <= self.limit).then(|| used + cost)
            })
            .is_ok()
    }

    /// Takes `cost` bytes, waiting for them if need be; calls `relieve` each time it has
    /// waited [`PRESSURE_GRACE`]. Returns false, without taking anything, once `gone()` says
    /// the request no longer matters (its connection was closed, or its client left).
    ///
    /// A waiter asks `gone()` before it is granted memory, not only after: when clients that
    /// queued many large reads hang up, their requests must leave the queue, not take the
    /// memory one after the other to build replies nobody will read (which kept the memory
    /// taken for seconds after they left). `gone` is called with the queue locked and must
    /// not block.
    pub(crate) fn take(&self, cost: usize, gone: &dyn Fn() -> bool, relieve: &dyn Fn()) -> bool {
        // Without waiters, a request that fits goes first: no lock on the common path.
        if self.waiters.load(Ordering::SeqCst) == 0 && self.try_add(cost) {
            return true;
        }
        let mut q = lock(&self.queue);
        let me = (cost, q.next_ticket);
        q.next_ticket += 1;
        q.waiting.insert(me);
        self.waiters.fetch_add(1, Ordering::SeqCst);
        let mut since = Instant::now();
        let taken = loop {
            if gone() {
                break false;
            }
            if q.waiting.first() == Some(&me) && self.try_add(cost) {
                break true;
            }
            q = self
                .freed
                .wait_timeout(q, RECHECK)
                .unwrap_or_else(PoisonError::into_inner)
                .0;
            if since.elapsed() >= PRESSURE_GRACE {
                drop(q);
                relieve();
                since = Instant::now();
                q = lock(&self.queue);
            }
        };
        q.waiting.remove(&me);
        self.waiters.fetch_sub(1, Ordering::SeqCst);
        // The next waiter may fit now (or be first now).
        self.freed.notify_all();
        taken
    }

    /// Gives back `cost` bytes taken with [`Budget::take`].
    pub(crate) fn give(&self, cost: usize) {
        self.used.fetch_sub(cost, Ordering::SeqCst);
        if self.waiters.load(Ordering::SeqCst) > 0 {
            // Under the lock, so a waiter between its check and its wait cannot miss it.
            let _q = lock(&self.queue);
            self.freed.notify_all();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::AtomicBool;
    use std::sync::Arc;
    use std::thread;

    #[test]
    fn waiters_are_served_smallest_first_and_relief_is_asked_for() {
        let b = Arc::new(Budget::new(100));
        let never = || false;
        let nothing = || {};
        assert!(b.take(60, &never, &nothing));
        assert!(b.take(40, &never, &nothing));
        assert_eq!(b.used(), 100);
        let order = Arc::new(Mutex::new(Vec::new()));
        let relieved = Arc::new(AtomicBool::new(false));
        let spawn = |cost: usize| {
            let (b, order, relieved) = (Arc::clone(&b), Arc::clone(&order), Arc::clone(&relieved));
            thread::spawn(move || {
                let relieve = || relieved.store(true, Ordering::SeqCst);
                assert!(b.take(cost, &|| false, &relieve));
                order.lock().unwrap().push(cost);
            })
        };
        let big = spawn(60);
        thread::sleep(Duration::from_millis(20));
        let small = spawn(10);
        thread::sleep(PRESSURE_GRACE + Duration::from_millis(100));
        assert!(relieved.load(Ordering::SeqCst), "a long wait asks for relief");
        b.give(40);
        small.join().unwrap();
        assert_eq!(*order.lock().unwrap(), vec![10], "the small request went first");
        b.give(60);
        big.join().unwrap();
        assert_eq!(b.used(), 70);
        // A request larger than the whole budget runs alone.
        b.give(70);
        assert!(b.take(1000, &never, &nothing));
        b.give(1000);
        // A cancelled waiter leaves without taking anything.
        assert!(b.take(100, &never, &nothing));
        assert!(!b.take(1, &|| true, &nothing));
        assert_eq!(b.used(), 100);
    }

    /// Regression: a waiter whose client had left was still granted the memory when its turn
    /// came (it was asked whether it was gone only when it could not have the memory), so
    /// clients that queued large reads and hung up were served one after the other, holding
    /// the memory for seconds after they left.
    #[test]
    fn a_waiter_whose_client_left_never_takes_memory() {
        let b = Arc::new(Budget::new(100));
        assert!(b.take(100, &|| false, &|| {}));
        let left = Arc::new(AtomicBool::new(false));
        let waiter = {
            let (b, left) = (Arc::clone(&b), Arc::clone(&left));
            thread::spawn(move || b.take(60, &|| left.load(Ordering::SeqCst), &|| {}))
        };
        while b.waiters.load(Ordering::SeqCst) == 0 {
            thread::sleep(Duration::from_millis(1));
        }
        // The client leaves while the waiter is first in line, and then memory is freed.
        left.store(true, Ordering::SeqCst);
        b.give(100);
        assert!(
            !waiter.join().unwrap(),
            "the memory went to a client that had left"
        );
        assert_eq!(b.used(), 0);
    }
}
