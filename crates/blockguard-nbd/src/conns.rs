//! The table of live connections, and the limits that keep any local process from locking
//! real clients out.
//!
//! A connection costs a thread and a socket, so the server takes at most
//! [`Limits::max`]. Without more, anybody could hold every slot: by trickling a byte every few
//! seconds through the handshake (a timeout per read never fires), or by finishing the
//! handshake and idling. So:
//! - the whole handshake has a deadline ([`Limits::handshake`]), counted from the accept;
//! - a request's data must keep moving (see [`Transfer`]): a write payload the client stops
//!   sending, or sends slower than [`Limits::min_rate`], is *stalled*, and so are replies the
//!   client stops reading; a stall of [`Limits::request`] closes the connection, which
//!   releases the memory its requests hold;
//! - connections idle in the transmission phase (no request in flight, or a stalled one)
//!   past [`Limits::idle`] are closed, when that is set;
//! - at the limit, a new client still gets in: the connection quiet the longest is closed for
//!   it — any connection still in its handshake (a real client finishes it in milliseconds,
//!   so it is never the quietest), or one idle or stalled for at least [`EVICT_MIN_IDLE_MS`].
//!   A request waiting for the server (for memory, or being executed) is not quiet. Only when
//!   every connection is busy is the new one refused;
//! - while requests wait for memory, the connection stalled the longest — replies unread for
//!   [`crate::budget::PRESSURE_GRACE`], or a payload stalled for [`EVICT_MIN_IDLE_MS`] — is
//!   closed to free what it holds (`relieve`): the staller goes, not the waiter.
//!
//! Every such closing is logged with the peer it hit (address, or process and user for Unix
//! sockets) and the request memory it released, aggregated so a flood costs a few lines, not
//! one per connection.
//!
//! The cost on the request path is a few relaxed atomic stores per request, and none for a
//! payload that arrived with its header: no timers, no system calls; the accept loop looks at
//! the stamps every [`REAP_EVERY_MS`].

use crate::stream::{Peer, Stream};
use std::collections::{BTreeMap, HashMap};
use std::io;
use std::net::Shutdown;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Condvar, Mutex, MutexGuard, PoisonError};
use std::time::{Duration, Instant};

/// A connection in the transmission phase is closed to make room only after this long
/// without a request in flight (or with a stalled one), so clients between two requests are
/// never cut off. Also how long a payload must have stalled before it is closed to free memory
/// for requests that wait for it.
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

    /// Reads the real clock and publishes it (never backwards: threads may race here).
    fn tick(&self) -> u64 {
        let ms = u64::try_from(self.epoch.elapsed().as_millis()).unwrap_or(u64::MAX);
        self.now_ms.fetch_max(ms, Ordering::Relaxed).max(ms)
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
    /// (0: none waiting), or of where a transfer at the minimum rate would be, if that is
    /// earlier (see [`Transfer`]). A client that does not read its replies stays stalled.
    stalled_since: AtomicU64,
    /// Clock time + 1 at which the reader started waiting for a write payload (0: not
    /// waiting for one). Stored last when a payload starts (`Release`), so the fields below
    /// belong to it when this is read (`Acquire`).
    payload_since: AtomicU64,
    /// Its length: the memory it holds.
    payload_len: AtomicU64,
    /// Bytes of it received so far.
    payload_got: AtomicU64,
    /// Clock time of the last bytes of it.
    payload_moved: AtomicU64,
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
            payload_since: AtomicU64::new(0),
            payload_len: AtomicU64::new(0),
            payload_got: AtomicU64::new(0),
            payload_moved: AtomicU64::new(0),
            closing: AtomicBool::new(false),
        }
    }

    /// Replies did not fit the socket; they wait for the client to read.
    pub(crate) fn stalled(&self, clock: &Clock) {
        let _ = self
            .stalled_since
            .compare_exchange(0, clock.now() + 1, Ordering::Relaxed, Ordering::Relaxed);
    }

    /// Some waiting reply bytes reached the socket; `behind_ms`: how far the replies are
    /// behind a transfer at the minimum rate (see [`Transfer::behind_ms`]).
    pub(crate) fn progressed(&self, clock: &Clock, behind_ms: u64) {
        self.stalled_since
            .store(clock.now().saturating_sub(behind_ms) + 1, Ordering::Relaxed);
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

    /// The reader starts waiting for a write payload of `len` bytes (only when it is not
    /// already buffered: those take no wait).
    pub(crate) fn payload_started(&self, len: usize, clock: &Clock) {
        let now = clock.now();
        self.payload_len.store(len as u64, Ordering::Relaxed);
        self.payload_got.store(0, Ordering::Relaxed);
        self.payload_moved.store(now, Ordering::Relaxed);
        self.payload_since.store(now + 1, Ordering::Release);
    }

    /// `got` bytes of the payload have arrived.
    pub(crate) fn payload_progressed(&self, got: usize, clock: &Clock) {
        self.payload_got.store(got as u64, Ordering::Relaxed);
        self.payload_moved.store(clock.now(), Ordering::Relaxed);
    }

    /// The payload is in (or the connection is ending).
    pub(crate) fn payload_done(&self) {
        self.payload_since.store(0, Ordering::Relaxed);
    }

    /// How long the payload being read has stalled, and the memory it holds (`None`: no
    /// payload is being waited for). See [`Transfer`].
    fn payload_stalled_for(&self, now: u64, min_rate: u64) -> Option<(u64, u64)> {
        let since = self.payload_since.load(Ordering::Acquire);
        if since == 0 {
            return None;
        }
        let transfer = Transfer {
            started: since - 1,
            moved: self.payload_moved.load(Ordering::Relaxed),
            done: self.payload_got.load(Ordering::Relaxed),
        };
        Some((
            transfer.stalled_for(now, min_rate),
            self.payload_len.load(Ordering::Relaxed),
        ))
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

    /// Milliseconds without progress: without a message while nothing is in flight, or the
    /// longer stall of waiting replies and of the payload being read; `None` while requests
    /// are in flight and moving (or waiting for the server: memory, the disk).
    fn idle_for(&self, now: u64, min_rate: u64) -> Option<u64> {
        if self.inflight.load(Ordering::Relaxed) == 0 {
            Some(now.saturating_sub(self.last.load(Ordering::Relaxed)))
        } else {
            let payload = self.payload_stalled_for(now, min_rate).map(|(ms, _)| ms);
            self.stalled_for(now).max(payload)
        }
    }
}

/// How far a transfer of a request's data — a write payload coming in, replies going out —
/// is stalled: the longer of the time since its last bytes moved and how far it is behind a
/// transfer at the minimum rate since it started. A client that stops sending or reading is
/// stalled from its last byte on; one that trickles is stalled by as much as it is late,
/// whatever it sent first. A healthy transfer is never stalled, however large or slow, as
/// long as it moves at the minimum rate.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Transfer {
    /// Clock time the transfer started.
    pub(crate) started: u64,
    /// Clock time its last bytes moved.
    pub(crate) moved: u64,
    /// Bytes moved so far.
    pub(crate) done: u64,
}

impl Transfer {
    /// Milliseconds the transfer is behind one at `min_rate` bytes per second (0: on time).
    pub(crate) fn behind_ms(&self, now: u64, min_rate: u64) -> u64 {
        let allowed = self.done.saturating_mul(1000) / min_rate.max(1);
        now.saturating_sub(self.started).saturating_sub(allowed)
    }

    /// Milliseconds the transfer has been stalled (see the type).
    pub(crate) fn stalled_for(&self, now: u64, min_rate: u64) -> u64 {
        now.saturating_sub(self.moved).max(self.behind_ms(now, min_rate))
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
    /// Close connections whose requests' data has stalled this long (see [`Transfer`]).
    pub(crate) request: Duration,
    /// The slowest a request's data may move, in bytes per second (at least 1).
    pub(crate) min_rate: u64,
}

/// Why the table closed or refused a connection, for the aggregated log.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
enum Reason {
    HandshakeDeadline,
    Idle,
    MadeRoom,
    Refused,
    Unread,
    PayloadStalled,
    PayloadTimeout,
    ReplyTimeout,
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
            Reason::PayloadStalled => {
                "closed: request payload stalled while other requests waited for memory"
            }
            Reason::PayloadTimeout => {
                "closed: request payload not received within the request timeout (stalled, or \
                 slower than the minimum transfer rate)"
            }
            Reason::ReplyTimeout => {
                "closed: replies not read within the request timeout (stalled, or slower than \
                 the minimum transfer rate)"
            }
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
    /// The memory of the payload this connection is waiting for: what closing it releases,
    /// for the log.
    fn payload_held(&self, now: u64, min_rate: u64) -> u64 {
        self.activity
            .payload_stalled_for(now, min_rate)
            .map_or(0, |(_, len)| len)
    }

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
    /// Request memory the closed connections' stalled payloads held (released as they end).
    released: u64,
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
            self.note(Reason::Refused, &peer, 0);
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
                let idle = e.activity.idle_for(now, self.limits.min_rate)?;
                let evictable = !e.activity.transmitting.load(Ordering::Relaxed) || idle >= EVICT_MIN_IDLE_MS;
                evictable.then_some((idle, *id))
            })
            .max()
            .map(|(_, id)| id);
        let Some(entry) = victim.and_then(|id| table.get_mut(&id)) else {
            return false;
        };
        // Before the close: its reader clears the payload as soon as it sees it.
        let released = entry.payload_held(now, self.limits.min_rate);
        entry.close();
        self.note(Reason::MadeRoom, &entry.peer, released);
        true
    }

    /// Closes the connection stalled the longest — replies waiting unread for at least
    /// [`crate::budget::PRESSURE_GRACE`], or a payload stalled for at least
    /// [`EVICT_MIN_IDLE_MS`] — if there is one: called when requests wait for memory, which
    /// such a connection holds without any use.
    pub(crate) fn relieve(&self) {
        // Reads the clock itself: at shutdown the accept loop no longer advances it.
        let now = self.clock.tick();
        let grace = duration_ms(crate::budget::PRESSURE_GRACE);
        let rate = self.limits.min_rate;
        let mut table = lock(&self.table);
        let victim = table
            .iter()
            .filter(|(_, e)| !e.closing)
            .filter_map(|(id, e)| {
                let unread = e
                    .activity
                    .stalled_for(now)
                    .filter(|ms| *ms >= grace)
                    .map(|ms| (ms, Reason::Unread));
                let payload = e
                    .activity
                    .payload_stalled_for(now, rate)
                    .filter(|(ms, _)| *ms >= EVICT_MIN_IDLE_MS)
                    .map(|(ms, _)| (ms, Reason::PayloadStalled));
                Some((unread.max(payload)?, *id))
            })
            .max()
            .map(|((_, reason), id)| (id, reason));
        if let Some((entry, reason)) = victim.and_then(|(id, reason)| Some((table.get_mut(&id)?, reason))) {
            // Before the close: its reader clears the payload as soon as it sees it.
            let released = entry.payload_held(now, rate);
            entry.close();
            let peer = entry.peer.clone();
            drop(table);
            self.note(reason, &peer, released);
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

    /// Closes connections past their handshake deadline, request timeout or idle timeout,
    /// and logs what was closed; called by the accept loop at least every tick (does nothing
    /// more often than every [`REAP_EVERY_MS`]).
    pub(crate) fn reap(&self) {
        let now = self.clock.tick();
        if now.saturating_sub(self.last_reap.load(Ordering::Relaxed)) < REAP_EVERY_MS {
            return;
        }
        self.last_reap.store(now, Ordering::Relaxed);
        let handshake = duration_ms(self.limits.handshake);
        let request = duration_ms(self.limits.request);
        let idle_limit = self.limits.idle.map(duration_ms);
        let rate = self.limits.min_rate;
        let mut closed = Vec::new();
        {
            let mut table = lock(&self.table);
            for e in table.values_mut().filter(|e| !e.closing) {
                let a = &e.activity;
                let reason = if a.transmitting.load(Ordering::Relaxed) {
                    let payload = a.payload_stalled_for(now, rate).map(|(ms, _)| ms);
                    let idle = a.idle_for(now, rate);
                    if payload.is_some_and(|ms| ms >= request) {
                        Some(Reason::PayloadTimeout)
                    } else if a.stalled_for(now).is_some_and(|ms| ms >= request) {
                        Some(Reason::ReplyTimeout)
                    } else {
                        idle.zip(idle_limit)
                            .is_some_and(|(idle, limit)| idle >= limit)
                            .then_some(Reason::Idle)
                    }
                } else {
                    (now.saturating_sub(e.started) >= handshake).then_some(Reason::HandshakeDeadline)
                };
                if let Some(reason) = reason {
                    // Before the close: its reader clears the payload as soon as it sees it.
                    let released = e.payload_held(now, rate);
                    e.close();
                    closed.push((reason, e.peer.clone(), released));
                }
            }
        }
        for (reason, peer, released) in &closed {
            self.note(*reason, peer, *released);
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

    /// Records a closing for the log; `released`: the memory of a stalled payload it frees.
    fn note(&self, reason: Reason, peer: &Peer, released: u64) {
        let mut reports = lock(&self.reports);
        let report = reports.entry(reason).or_default();
        *report.peers.entry(peer.who.clone()).or_default() += 1;
        report.released = report.released.saturating_add(released);
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
            let released = std::mem::take(&mut report.released);
            due.push((*reason, std::mem::take(&mut report.peers), released));
        }
        for (reason, peers, released) in due {
            let connections: u64 = peers.values().sum();
            let freed = if released > 0 {
                format!("; {released} bytes of request memory released")
            } else {
                String::new()
            };
            // Not in the span of whichever connection's thread happens to log it.
            tracing::warn!(
                parent: None,
                connections,
                peers = %summarize(peers),
                limit = self.limits.max,
                released,
                "{} connection(s) {}{}",
                connections,
                reason.describe(),
                freed
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
    fn a_transfer_is_stalled_by_its_silence_or_its_lateness_whichever_is_longer() {
        const RATE: u64 = 256 << 10;
        let t = |moved, done| Transfer {
            started: 1000,
            moved,
            done,
        };
        // Healthy: 1 MiB/s, the last bytes just came.
        assert_eq!(t(2990, 2 << 20).stalled_for(3000, RATE), 10);
        // Stopped after a fast start: stalled from its last byte, however much came first.
        assert_eq!(t(1100, 16 << 20).stalled_for(6100, RATE), 5000);
        // Trickling (a byte just came, 20 in all): as late as it is.
        assert_eq!(t(3990, 20).stalled_for(4000, RATE), 3000);
        // Slow but steady at the minimum rate: never stalled, however long it takes.
        assert_eq!(t(61_000, 15 << 20).stalled_for(61_000, RATE), 0);
        // Half the minimum rate: late by half the time taken.
        assert_eq!(t(9000, RATE * 4).behind_ms(9000, RATE), 4000);
    }

    #[test]
    fn a_request_is_busy_while_it_waits_and_quiet_once_its_payload_stalls() {
        let clock = Clock::new();
        let a = Activity::new(0);
        a.start_transmission(&clock);
        assert_eq!(a.idle_for(5000, 1), Some(5000), "idle");
        // Read, waiting for memory (or executing): busy, however long it takes.
        a.request_started(&clock);
        assert_eq!(a.idle_for(5000, 1), None);
        // Reading its payload: quiet once it stops coming.
        a.payload_started(4096, &clock);
        a.payload_progressed(100, &clock);
        assert_eq!(a.payload_stalled_for(3000, 1 << 20), Some((3000, 4096)));
        assert_eq!(a.idle_for(3000, 1 << 20), Some(3000));
        a.payload_done();
        assert_eq!(a.idle_for(3000, 1 << 20), None);
        a.request_done(&clock);
        assert_eq!(a.idle_for(3000, 1 << 20), Some(3000));
    }

    #[test]
    fn the_log_names_the_busiest_peers_first() {
        let peers: BTreeMap<String, u64> = [("b", 1), ("a", 500), ("c", 7), ("d", 7), ("e", 1)]
            .into_iter()
            .map(|(w, n)| (w.to_string(), n))
            .collect();
        assert_eq!(summarize(peers), "a ×500, c ×7, d ×7, and 2 more peers");
    }
}
