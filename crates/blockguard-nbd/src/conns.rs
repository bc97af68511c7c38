//! The table of live connections, and the limits that keep any local process from locking
//! real clients out.
//!
//! A connection costs a thread and a socket, so the server takes at most
//! [`Limits::max`]. Without more, anybody could hold every slot: by trickling a byte every few
//! seconds through the handshake (a timeout per read never fires), or by finishing the
//! handshake and idling. So:
//! - the whole handshake has a deadline ([`Limits::handshake`]), counted from the accept;
//! - connections idle in the transmission phase (no request in flight) past
//!   [`Limits::idle`] are closed, when that is set;
//! - at the limit, a new client still gets in: the idle connection quiet the longest is
//!   closed for it — any connection still in its handshake (a real client finishes it in
//!   milliseconds, so it is never the quietest), or one idle for at least
//!   [`EVICT_MIN_IDLE_MS`]. Only when every connection is busy is the new one refused.
//!
//! Every such closing is logged with the peer it hit (address, or process and user for Unix
//! sockets), aggregated so a flood costs a few lines, not one per connection.

use crate::stream::{Peer, Stream};
use std::collections::{BTreeMap, HashMap};
use std::io;
use std::net::Shutdown;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Condvar, Mutex, MutexGuard, PoisonError};
use std::time::{Duration, Instant};

/// A connection in the transmission phase is closed to make room only after this long
/// without a request in flight, so clients between two requests are never cut off.
pub(crate) const EVICT_MIN_IDLE_MS: u64 = 1000;

/// How often deadlines are checked.
const REAP_EVERY_MS: u64 = 100;

/// Closings are logged at most this often (aggregated by reason and peer).
const LOG_EVERY_MS: u64 = 5000;

/// Peers named per log line; the rest are counted.
const LOG_PEERS: usize = 3;

/// Milliseconds since the server started, advanced by the accept loop at least every tick:
/// connections stamp their activity with a relaxed load rather than a clock read per request.
#[derive(Debug)]
pub(crate) struct Clock {
    epoch: Instant,
    now_ms: AtomicU64,
}

impl Clock {
    pub(crate) fn new() -> Clock {
        Clock {
            epoch: Instant::now(),
            now_ms: AtomicU64::new(0),
        }
    }

    /// Reads the real clock and publishes it.
    fn tick(&self) -> u64 {
        let ms = u64::try_from(self.epoch.elapsed().as_millis()).unwrap_or(u64::MAX);
        self.now_ms.store(ms, Ordering::Relaxed);
        ms
    }

    /// The time last published.
    pub(crate) fn now(&self) -> u64 {
        self.now_ms.load(Ordering::Relaxed)
    }
}

/// What a connection's threads tell the table, without locks.
#[derive(Debug)]
pub(crate) struct Activity {
    /// Clock time of the last message received or reply sent.
    last: AtomicU64,
    /// The handshake is done.
    transmitting: AtomicBool,
    /// Requests in flight: a connection with any is busy, never idle — unless its replies
    /// are stuck.
    inflight: AtomicUsize,
    /// Clock time + 1 of the last progress of replies that did not fit the socket at once
    /// (0: none waiting). A client that does not read its replies stays stalled.
    stalled_since: AtomicU64,
    /// The table closed the socket: the connection's threads are on their way out.
    closing: AtomicBool,
}

impl Activity {
    fn new(now: u64) -> Activity {
        Activity {
            last: AtomicU64::new(now),
            transmitting: AtomicBool::new(false),
            inflight: AtomicUsize::new(0),
            stalled_since: AtomicU64::new(0),
            closing: AtomicBool::new(false),
        }
    }

    /// Replies did not fit the socket; they wait for the client to read.
    pub(crate) fn stalled(&self, clock: &Clock) {
        let _ = self
            .stalled_since
            .compare_exchange(0, clock.now() + 1, Ordering::Relaxed, Ordering::Relaxed);
    }

    /// Some waiting reply bytes reached the socket.
    pub(crate) fn progressed(&self, clock: &Clock) {
        self.stalled_since.store(clock.now() + 1, Ordering::Relaxed);
    }

    /// No reply waits any more.
    pub(crate) fn unstalled(&self) {
        self.stalled_since.store(0, Ordering::Relaxed);
    }

    /// Milliseconds the waiting replies have made no progress (`None`: nothing waits).
    fn stalled_for(&self, now: u64) -> Option<u64> {
        match self.stalled_since.load(Ordering::Relaxed) {
            0 => None,
            since => Some(now.saturating_sub(since - 1)),
        }
    }

    /// True once the table has closed the connection.
    pub(crate) fn is_closing(&self) -> bool {
        self.closing.load(Ordering::Relaxed)
    }

    /// A handshake message arrived.
    pub(crate) fn touch(&self, clock: &Clock) {
        self.last.store(clock.now(), Ordering::Relaxed);
    }

    /// The handshake is done.
    pub(crate) fn start_transmission(&self, clock: &Clock) {
        self.touch(clock);
        self.transmitting.store(true, Ordering::Relaxed);
    }

    /// A request was read.
    pub(crate) fn request_started(&self, clock: &Clock) {
        self.inflight.fetch_add(1, Ordering::Relaxed);
        self.touch(clock);
    }

    /// A request's reply was sent (or dropped).
    pub(crate) fn request_done(&self, clock: &Clock) {
        self.inflight.fetch_sub(1, Ordering::Relaxed);
        self.touch(clock);
    }

    /// Milliseconds without progress: without a message while nothing is in flight, or
    /// since waiting replies last moved; `None` while requests are in flight and moving.
    fn idle_for(&self, now: u64) -> Option<u64> {
        if self.inflight.load(Ordering::Relaxed) == 0 {
            Some(now.saturating_sub(self.last.load(Ordering::Relaxed)))
        } else {
            self.stalled_for(now)
        }
    }
}

/// The limits on connections (see the module documentation).
#[derive(Debug, Clone)]
pub(crate) struct Limits {
    /// Most connections served at once.
    pub(crate) max: usize,
    /// The whole handshake must be done within this time of the accept.
    pub(crate) handshake: Duration,
    /// Close transmission-phase connections idle this long (`None`: never).
    pub(crate) idle: Option<Duration>,
}

/// Why the table closed or refused a connection, for the aggregated log.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
enum Reason {
    HandshakeDeadline,
    Idle,
    MadeRoom,
    Refused,
    Unread,
}

impl Reason {
    fn describe(self) -> &'static str {
        match self {
            Reason::HandshakeDeadline => "closed: handshake not finished within the deadline",
            Reason::Idle => "closed: idle past the idle timeout",
            Reason::MadeRoom => {
                "closed to make room for new clients (connection limit reached; quietest first)"
            }
            Reason::Refused => "refused: connection limit reached and every connection busy",
            Reason::Unread => "closed: replies left unread while other requests waited for memory",
        }
    }
}

struct Entry {
    /// A clone of the socket, to close it from outside its threads.
    stream: Stream,
    peer: Peer,
    activity: Arc<Activity>,
    /// Clock time of the accept.
    started: u64,
    /// Set once the table closed the socket (its threads are on their way out).
    closing: bool,
}

impl Entry {
    /// Closes the socket; the connection's threads see it and end.
    fn close(&mut self) {
        self.closing = true;
        self.activity.closing.store(true, Ordering::Relaxed);
        self.stream.shutdown(Shutdown::Both);
    }
}

/// Closings of one kind since its last log line.
#[derive(Default)]
struct Report {
    logged_at: Option<u64>,
    peers: BTreeMap<String, u64>,
}

/// Every live connection, from the accept until its threads have ended.
pub(crate) struct ConnTable {
    limits: Limits,
    clock: Arc<Clock>,
    table: Mutex<HashMap<u64, Entry>>,
    emptied: Condvar,
    last_reap: AtomicU64,
    reports: Mutex<BTreeMap<Reason, Report>>,
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    // Bookkeeping only (no invariant of the data can break here), and it must keep working
    // for the server to shut down.
    m.lock().unwrap_or_else(PoisonError::into_inner)
}

impl ConnTable {
    pub(crate) fn new(limits: Limits, clock: Arc<Clock>) -> ConnTable {
        ConnTable {
            limits,
            clock,
            table: Mutex::new(HashMap::new()),
            emptied: Condvar::new(),
            last_reap: AtomicU64::new(0),
            reports: Mutex::new(BTreeMap::new()),
        }
    }

    /// The clock connections stamp their activity with.
    pub(crate) fn clock(&self) -> &Arc<Clock> {
        &self.clock
    }

    /// Registers a new connection, closing the quietest idle one if the server is full;
    /// `None` if it must be refused (full, and every connection busy).
    pub(crate) fn admit(&self, id: u64, stream: &Stream, peer: Peer) -> io::Result<Option<Arc<Activity>>> {
        let clone = stream.try_clone()?;
        let now = self.clock.now();
        let mut table = lock(&self.table);
        let open = table.values().filter(|e| !e.closing).count();
        // Connections already closed still hold their threads for a moment: bounded too.
        if open >= self.limits.max && !self.make_room(&mut table, now) || table.len() >= 2 * self.limits.max {
            drop(table);
            self.note(Reason::Refused, &peer);
            return Ok(None);
        }
        let activity = Arc::new(Activity::new(now));
        table.insert(
            id,
            Entry {
                stream: clone,
                peer,
                activity: Arc::clone(&activity),
                started: now,
                closing: false,
            },
        );
        Ok(Some(activity))
    }

    /// Closes the quietest evictable connection; false if there is none.
    fn make_room(&self, table: &mut HashMap<u64, Entry>, now: u64) -> bool {
        let victim = table
            .iter()
            .filter(|(_, e)| !e.closing)
            .filter_map(|(id, e)| {
                let idle = e.activity.idle_for(now)?;
                let evictable = !e.activity.transmitting.load(Ordering::Relaxed) || idle >= EVICT_MIN_IDLE_MS;
                evictable.then_some((idle, *id))
            })
            .max()
            .map(|(_, id)| id);
        let Some(entry) = victim.and_then(|id| table.get_mut(&id)) else {
            return false;
        };
        entry.close();
        self.note(Reason::MadeRoom, &entry.peer);
        true
    }

    /// Closes the connection whose replies have waited unread the longest, if it has for
    /// at least [`crate::budget::PRESSURE_GRACE`]: called when requests wait for memory, which
    /// such a connection holds without any use.
    pub(crate) fn relieve(&self) {
        // Reads the clock itself: at shutdown the accept loop no longer advances it.
        let now = self.clock.tick();
        let grace = duration_ms(crate::budget::PRESSURE_GRACE);
        let mut table = lock(&self.table);
        let victim = table
            .iter()
            .filter(|(_, e)| !e.closing)
            .filter_map(|(id, e)| Some((e.activity.stalled_for(now)?, *id)))
            .filter(|(stalled, _)| *stalled >= grace)
            .max()
            .map(|(_, id)| id);
        if let Some(entry) = victim.and_then(|id| table.get_mut(&id)) {
            entry.close();
            let peer = entry.peer.clone();
            drop(table);
            self.note(Reason::Unread, &peer);
        }
    }

    /// Forgets a connection whose threads have ended.
    pub(crate) fn remove(&self, id: u64) {
        let mut table = lock(&self.table);
        table.remove(&id);
        if table.is_empty() {
            self.emptied.notify_all();
        }
    }

    /// Closes connections past their handshake deadline or idle timeout, and logs what was
    /// closed; called by the accept loop at least every tick (does nothing more often than
    /// every [`REAP_EVERY_MS`]).
    pub(crate) fn reap(&self) {
        let now = self.clock.tick();
        if now.saturating_sub(self.last_reap.load(Ordering::Relaxed)) < REAP_EVERY_MS {
            return;
        }
        self.last_reap.store(now, Ordering::Relaxed);
        let handshake = duration_ms(self.limits.handshake);
        let idle_limit = self.limits.idle.map(duration_ms);
        let mut closed = Vec::new();
        {
            let mut table = lock(&self.table);
            for e in table.values_mut().filter(|e| !e.closing) {
                let reason = if e.activity.transmitting.load(Ordering::Relaxed) {
                    let idle = e.activity.idle_for(now);
                    idle.zip(idle_limit)
                        .is_some_and(|(idle, limit)| idle >= limit)
                        .then_some(Reason::Idle)
                } else {
                    (now.saturating_sub(e.started) >= handshake).then_some(Reason::HandshakeDeadline)
                };
                if let Some(reason) = reason {
                    e.close();
                    closed.push((reason, e.peer.clone()));
                }
            }
        }
        for (reason, peer) in &closed {
            self.note(*reason, peer);
        }
        self.log_if_due(now, false);
    }

    /// Closes the reading side (`Shutdown::Read`: in-flight requests still get their replies)
    /// or both sides of every connection.
    pub(crate) fn shutdown_all(&self, how: Shutdown) {
        for e in lock(&self.table).values() {
            e.stream.shutdown(how);
        }
    }

    /// Waits until every connection has ended or `deadline` passed; the connections left.
    pub(crate) fn wait_empty(&self, deadline: Option<Instant>) -> usize {
        let mut table = lock(&self.table);
        while !table.is_empty() {
            match deadline {
                None => table = self.emptied.wait(table).unwrap_or_else(PoisonError::into_inner),
                Some(d) => {
                    let now = Instant::now();
                    if now >= d {
                        break;
                    }
                    table = self
                        .emptied
                        .wait_timeout(table, d - now)
                        .unwrap_or_else(PoisonError::into_inner)
                        .0;
                }
            }
        }
        table.len()
    }

    fn note(&self, reason: Reason, peer: &Peer) {
        let mut reports = lock(&self.reports);
        let report = reports.entry(reason).or_default();
        *report.peers.entry(peer.who.clone()).or_default() += 1;
        drop(reports);
        self.log_if_due(self.clock.now(), false);
    }

    /// Logs the closings of each kind since its last line: at once the first time, then at
    /// most every [`LOG_EVERY_MS`] (or now, when `all`).
    fn log_if_due(&self, now: u64, all: bool) {
        let mut due = Vec::new();
        for (reason, report) in lock(&self.reports).iter_mut() {
            let recent = report
                .logged_at
                .is_some_and(|at| now.saturating_sub(at) < LOG_EVERY_MS);
            if report.peers.is_empty() || recent && !all {
                continue;
            }
            report.logged_at = Some(now);
            due.push((*reason, std::mem::take(&mut report.peers)));
        }
        for (reason, peers) in due {
            let connections: u64 = peers.values().sum();
            tracing::warn!(
                connections,
                peers = %summarize(peers),
                limit = self.limits.max,
                "{} connection(s) {}",
                connections,
                reason.describe()
            );
        }
    }

    /// Logs every closing not logged yet (at shutdown).
    pub(crate) fn flush_log(&self) {
        self.log_if_due(self.clock.now(), true);
    }
}

/// "pid 12 (uid 0) ×500, 10.0.0.7 ×3 and 4 more peers", busiest first.
fn summarize(peers: BTreeMap<String, u64>) -> String {
    let mut by_count: Vec<(String, u64)> = peers.into_iter().collect();
    by_count.sort_by(|a, b| b.1.cmp(&a.1).then_with(|| a.0.cmp(&b.0)));
    let more = by_count.len().saturating_sub(LOG_PEERS);
    let mut out: Vec<String> = by_count
        .into_iter()
        .take(LOG_PEERS)
        .map(|(who, n)| format!("{who} ×{n}"))
        .collect();
    if more > 0 {
        out.push(format!("and {more} more peers"));
    }
    out.join(", ")
}

fn duration_ms(d: Duration) -> u64 {
    u64::try_from(d.as_millis()).unwrap_or(u64::MAX)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_log_names_the_busiest_peers_first() {
        let peers: BTreeMap<String, u64> = [("b", 1), ("a", 500), ("c", 7), ("d", 7), ("e", 1)]
            .into_iter()
            .map(|(w, n)| (w.to_string(), n))
            .collect();
        assert_eq!(summarize(peers), "a ×500, c ×7, d ×7, and 2 more peers");
    }
}
