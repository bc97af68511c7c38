//! One NBD connection in transmission: many requests in flight from many threads.
//!
//! Senders take the socket's write lock only for the time it takes to write one request, and
//! then wait on a channel of their own; one reader thread per connection reads the replies
//! in whatever order the server sends them and hands each to the request its cookie names.
//! When anything goes wrong with the connection itself (a send or receive fails, a reply
//! makes no sense, a request gets no reply in time) the connection is declared dead: the
//! socket is shut down and every request still waiting fails with the reason. A request
//! whose reply never came may or may not have been carried out, so nothing is retried here.

use super::proto::{
    REPLY_FLAG_DONE, REPLY_TYPE_ERROR_BIT, REPLY_TYPE_NONE, REPLY_TYPE_OFFSET_DATA, REPLY_TYPE_OFFSET_HOLE,
    SIMPLE_REPLY_MAGIC, STRUCTURED_REPLY_MAGIC,
};
use super::wire::{self, Cmd, ExportInfo, Stream};
use crate::tls::Tunnel;
use std::collections::HashMap;
use std::io::{self, IoSlice, Read};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::mpsc::{self, Receiver, RecvTimeoutError, SyncSender};
use std::sync::{Arc, Mutex, PoisonError};
use std::thread::JoinHandle;
use std::time::Duration;

/// Why a request failed.
#[derive(Debug, Clone)]
pub(crate) enum Failure {
    /// The server carried out the request and answered an error.
    Server {
        /// The NBD error number (a Linux errno value).
        errno: u32,
        /// The server's message (structured replies only; may be empty).
        message: String,
    },
    /// The connection was lost (or declared dead) before the reply came.
    Lost(String),
}

/// What the reader hands back: a read's data, or nothing for other requests.
pub(crate) type Outcome = Result<Vec<u8>, Failure>;

/// A request in flight, as the reader thread sees it.
struct Waiter {
    cmd: Cmd,
    offset: u64,
    /// A read's destination (zeroed: holes need no filling); empty for other requests.
    data: Vec<u8>,
    /// The first error chunk of a structured reply.
    error: Option<Failure>,
    tx: SyncSender<Outcome>,
}

impl Waiter {
    /// A request of `len` bytes at `offset` waiting for its reply, and where its outcome will
    /// arrive.
    fn new(cmd: Cmd, offset: u64, len: u32) -> (Waiter, Receiver<Outcome>) {
        let (tx, rx) = mpsc::sync_channel(1);
        let data = if cmd == Cmd::Read {
            vec![0u8; len as usize]
        } else {
            Vec::new()
        };
        let waiter = Waiter {
            cmd,
            offset,
            data,
            error: None,
            tx,
        };
        (waiter, rx)
    }
}

#[derive(Default)]
struct State {
    pending: HashMap<u64, Waiter>,
    /// Why the connection is dead, once it is.
    dead: Option<String>,
}

/// What the senders and the reader thread share.
pub(crate) struct Shared {
    state: Mutex<State>,
    /// A handle on the socket for shutting it down from any thread.
    ctl: Stream,
}

impl Shared {
    fn state(&self) -> std::sync::MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Declares the connection dead (the first reason sticks) and fails every waiting request.
    fn kill(&self, reason: &str) {
        let drained: Vec<Waiter> = {
            let mut st = self.state();
            if st.dead.is_none() {
                st.dead = Some(reason.to_string());
            }
            st.pending.drain().map(|(_, w)| w).collect()
        };
        let reason = self.state().dead.clone().unwrap_or_default();
        for w in drained {
            // The sender may have given up waiting already; nothing to tell then.
            let _ = w.tx.try_send(Err(Failure::Lost(reason.clone())));
        }
        self.ctl.shutdown();
    }
}

/// A request sent and not yet answered.
pub(crate) struct Ticket {
    rx: Receiver<Outcome>,
    cookie: u64,
}

/// An NBD connection in transmission.
pub(crate) struct Conn {
    writer: Mutex<Stream>,
    shared: Arc<Shared>,
    next_cookie: AtomicU64,
    reader: Mutex<Option<JoinHandle<()>>>,
    /// What the handshake learned.
    pub(crate) info: ExportInfo,
    /// The TLS tunnel the socket is the plain-text end of (`nbds`). A field, so dropped
    /// after [`Conn`]'s own `drop` has said goodbye: the tunnel's drop waits for its pumps to
    /// carry that to the server.
    _tunnel: Option<Tunnel>,
}

impl std::fmt::Debug for Conn {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Conn")
            .field("info", &self.info)
            .field("dead", &self.dead())
            .finish_non_exhaustive()
    }
}

impl Conn {
    /// Starts transmission on a socket that finished its handshake (the plain-text end of
    /// `tunnel`, with TLS). `write_timeout` bounds every send, so a server that stops reading
    /// cannot hold the write lock forever.
    pub(crate) fn start(
        stream: Stream,
        info: ExportInfo,
        write_timeout: Duration,
        tunnel: Option<Tunnel>,
    ) -> io::Result<Conn> {
        // Replies may be far apart (an idle volume): the reader waits without a limit, and
        // each request's own timeout decides when the silence is too long.
        stream.set_read_timeout(None)?;
        stream.set_write_timeout(Some(write_timeout))?;
        let shared = Arc::new(Shared {
            state: Mutex::new(State::default()),
            ctl: stream.try_clone()?,
        });
        let mut rx = stream.try_clone()?;
        let reader_shared = Arc::clone(&shared);
        let structured = info.structured;
        let reader = std::thread::Builder::new()
            .name("nbd-client-reader".to_string())
            .spawn(move || {
                let reason = match read_replies(&mut rx, &reader_shared, structured) {
                    Ok(()) => "the server closed the connection".to_string(),
                    Err(e) => e,
                };
                reader_shared.kill(&reason);
            })?;
        Ok(Conn {
            writer: Mutex::new(stream),
            shared,
            next_cookie: AtomicU64::new(1),
            reader: Mutex::new(Some(reader)),
            info,
            _tunnel: tunnel,
        })
    }

    /// Why the connection is dead, or `None` while it works.
    pub(crate) fn dead(&self) -> Option<String> {
        self.shared.state().dead.clone()
    }

    /// Declares the connection dead.
    pub(crate) fn kill(&self, reason: &str) {
        self.shared.kill(reason);
    }

    /// Sends a request; `payload` is a write's data, `read_len` a read's length.
    pub(crate) fn submit(
        &self,
        cmd: Cmd,
        offset: u64,
        len: u32,
        payload: &[&[u8]],
    ) -> Result<Ticket, Failure> {
        let cookie = self.next_cookie.fetch_add(1, Ordering::Relaxed);
        let (waiter, rx) = Waiter::new(cmd, offset, len);
        {
            let mut st = self.shared.state();
            if let Some(reason) = &st.dead {
                return Err(Failure::Lost(reason.clone()));
            }
            st.pending.insert(cookie, waiter);
        }
        let header = wire::request(cmd, cookie, offset, len);
        let mut slices = Vec::with_capacity(1 + payload.len());
        slices.push(IoSlice::new(&header));
        slices.extend(payload.iter().map(|p| IoSlice::new(p)));
        let sent = {
            let mut w = self.writer.lock().unwrap_or_else(PoisonError::into_inner);
            wire::write_all_vectored(&mut *w, &mut slices)
        };
        if let Err(e) = sent {
            // Part of a request may be on the wire: the stream cannot be used any more.
            let reason = format!("sending a {} request failed: {e}", cmd.name());
            self.shared.kill(&reason);
            return Err(Failure::Lost(self.dead().unwrap_or(reason)));
        }
        Ok(Ticket { rx, cookie })
    }

    /// Waits for a request's reply, at most `timeout`; a request unanswered by then kills the
    /// connection (its outcome is unknown, and so is the state of everything sent after it).
    pub(crate) fn wait(&self, ticket: &Ticket, timeout: Duration) -> Result<Vec<u8>, Failure> {
        match ticket.rx.recv_timeout(timeout) {
            Ok(outcome) => outcome,
            Err(RecvTimeoutError::Timeout) => {
                let reason = format!(
                    "no reply within {timeout:?} (request {} timed out)",
                    ticket.cookie
                );
                self.shared.kill(&reason);
                // The reader may have delivered the reply just as the wait ended.
                ticket.rx.try_recv().unwrap_or(Err(Failure::Lost(reason)))
            }
            Err(RecvTimeoutError::Disconnected) => Err(Failure::Lost(
                self.dead()
                    .unwrap_or_else(|| "the connection was lost".to_string()),
            )),
        }
    }
}

impl Drop for Conn {
    fn drop(&mut self) {
        if self.dead().is_none() {
            // A polite goodbye; the write timeout bounds it, and failure changes nothing.
            let header = wire::request(Cmd::Disconnect, 0, 0, 0);
            let mut w = self.writer.lock().unwrap_or_else(PoisonError::into_inner);
            let _ = wire::write_all_vectored(&mut *w, &mut [IoSlice::new(&header)]);
        }
        self.shared.kill("the connection was closed");
        let reader = self.reader.lock().unwrap_or_else(PoisonError::into_inner).take();
        if let Some(r) = reader {
            // The shutdown above ends the reader's blocking read.
            let _ = r.join();
        }
    }
}

/// Largest non-data chunk payload accepted (error messages): more is a broken server.
const MAX_CHUNK: u32 = 64 << 10;

/// Reads replies until the connection ends: `Ok` for a clean end of stream, else why not.
pub(crate) fn read_replies(rx: &mut impl Read, shared: &Shared, structured: bool) -> Result<(), String> {
    loop {
        let mut magic = [0u8; 4];
        match rx.read_exact(&mut magic) {
            Ok(()) => {}
            Err(e) if e.kind() == io::ErrorKind::UnexpectedEof => return Ok(()),
            Err(e) => return Err(format!("receiving a reply failed: {e}")),
        }
        match u32::from_be_bytes(magic) {
            SIMPLE_REPLY_MAGIC => simple_reply(rx, shared)?,
            STRUCTURED_REPLY_MAGIC if structured => chunk(rx, shared)?,
            m => {
                return Err(format!(
                    "reply magic {m:#010x} is not an NBD reply (the stream is out of step)"
                ))
            }
        }
    }
}

fn io_err(e: &io::Error) -> String {
    format!("receiving a reply failed: {e}")
}

/// Takes the waiter of `cookie` out of the table (the reader puts it back if more chunks come).
fn take(shared: &Shared, cookie: u64) -> Result<Waiter, String> {
    shared
        .state()
        .pending
        .remove(&cookie)
        .ok_or_else(|| format!("the server answered request {cookie}, which is not waiting for a reply"))
}

fn simple_reply(rx: &mut impl Read, shared: &Shared) -> Result<(), String> {
    let mut h = [0u8; 12];
    rx.read_exact(&mut h).map_err(|e| io_err(&e))?;
    let errno = u32::from_be_bytes([h[0], h[1], h[2], h[3]]);
    let cookie = u64::from_be_bytes([h[4], h[5], h[6], h[7], h[8], h[9], h[10], h[11]]);
    let mut w = take(shared, cookie)?;
    let outcome = if errno != 0 {
        // A simple error reply carries no payload, even for a read.
        Err(Failure::Server {
            errno,
            message: String::new(),
        })
    } else {
        if w.cmd == Cmd::Read {
            if let Err(e) = rx.read_exact(&mut w.data) {
                let _ = w.tx.try_send(Err(Failure::Lost(io_err(&e))));
                return Err(io_err(&e));
            }
        }
        Ok(std::mem::take(&mut w.data))
    };
    let _ = w.tx.try_send(outcome);
    Ok(())
}

fn chunk(rx: &mut impl Read, shared: &Shared) -> Result<(), String> {
    let mut h = [0u8; 16];
    rx.read_exact(&mut h).map_err(|e| io_err(&e))?;
    let flags = u16::from_be_bytes([h[0], h[1]]);
    let typ = u16::from_be_bytes([h[2], h[3]]);
    let cookie = u64::from_be_bytes([h[4], h[5], h[6], h[7], h[8], h[9], h[10], h[11]]);
    let len = u32::from_be_bytes([h[12], h[13], h[14], h[15]]);
    let mut w = take(shared, cookie)?;
    if let Err(e) = chunk_payload(rx, &mut w, typ, len) {
        let _ = w.tx.try_send(Err(Failure::Lost(e.clone())));
        return Err(e);
    }
    if flags & REPLY_FLAG_DONE != 0 {
        let outcome = match w.error.take() {
            Some(f) => Err(f),
            None => Ok(std::mem::take(&mut w.data)),
        };
        let _ = w.tx.try_send(outcome);
    } else {
        let mut st = shared.state();
        if st.dead.is_some() {
            drop(st);
            let _ =
                w.tx.try_send(Err(Failure::Lost("the connection was lost".to_string())));
        } else {
            st.pending.insert(cookie, w);
        }
    }
    Ok(())
}

/// Reads one chunk's payload into its waiter: data into place, an error into `w.error`.
fn chunk_payload(rx: &mut impl Read, w: &mut Waiter, typ: u16, len: u32) -> Result<(), String> {
    if typ == REPLY_TYPE_OFFSET_DATA && w.cmd == Cmd::Read {
        let mut off = [0u8; 8];
        if len < 8 {
            return Err(format!("data chunk of {len} bytes has no offset"));
        }
        rx.read_exact(&mut off).map_err(|e| io_err(&e))?;
        let at = u64::from_be_bytes(off);
        let n = u64::from(len - 8);
        let start = placed(w, at, n)?;
        rx.read_exact(&mut w.data[start..start + (len - 8) as usize])
            .map_err(|e| io_err(&e))?;
        return Ok(());
    }
    if len > MAX_CHUNK {
        return Err(format!("reply chunk of type {typ} and {len} bytes is too long"));
    }
    let mut p = vec![0u8; len as usize];
    rx.read_exact(&mut p).map_err(|e| io_err(&e))?;
    match typ {
        REPLY_TYPE_NONE => Ok(()),
        REPLY_TYPE_OFFSET_HOLE if w.cmd == Cmd::Read && p.len() == 12 => {
            let at = u64::from_be_bytes(p[..8].try_into().map_err(|_| "bad hole chunk".to_string())?);
            let n = u32::from_be_bytes([p[8], p[9], p[10], p[11]]);
            let start = placed(w, at, u64::from(n))?;
            // The buffer starts zeroed, but a server may send data and then a hole over it.
            w.data[start..start + n as usize].fill(0);
            Ok(())
        }
        t if t & REPLY_TYPE_ERROR_BIT != 0 && p.len() >= 6 => {
            let errno = u32::from_be_bytes([p[0], p[1], p[2], p[3]]);
            if errno == 0 {
                // An error with no error number: reporting it would say "failed: success".
                return Err(format!("error chunk of type {t} with error number 0"));
            }
            let mlen = usize::from(u16::from_be_bytes([p[4], p[5]]));
            let message = String::from_utf8_lossy(p.get(6..6 + mlen).unwrap_or_default()).into_owned();
            if w.error.is_none() {
                w.error = Some(Failure::Server { errno, message });
            }
            Ok(())
        }
        t => Err(format!(
            "unexpected reply chunk of type {t} ({len} bytes) to a {} request",
            w.cmd.name()
        )),
    }
}

/// Where `n` bytes the server placed at `at` go in a read's buffer; refuses what lies outside.
fn placed(w: &Waiter, at: u64, n: u64) -> Result<usize, String> {
    let end = w.offset + w.data.len() as u64;
    if at < w.offset || at.checked_add(n).is_none_or(|e| e > end) {
        return Err(format!(
            "the server sent {n} bytes at byte {at}, outside the read of {} bytes at byte {}",
            w.data.len(),
            w.offset
        ));
    }
    usize::try_from(at - w.offset).map_err(|_| "offset overflow".to_string())
}

#[cfg(feature = "testing")]
impl Shared {
    /// A request table with no reader thread, for the fuzz body: `ctl` is one end of a socket
    /// pair (what [`Shared::kill`] shuts down).
    pub(crate) fn detached() -> io::Result<Shared> {
        let (a, _b) = std::os::unix::net::UnixStream::pair()?;
        Ok(Shared {
            state: Mutex::new(State::default()),
            ctl: Stream::Unix(a),
        })
    }

    /// Registers request `cookie` (a read of `len` bytes at `offset`, or another command) as
    /// waiting for its reply; the outcome arrives on the receiver.
    pub(crate) fn expect(&self, cookie: u64, cmd: Cmd, offset: u64, len: u32) -> Receiver<Outcome> {
        let (waiter, rx) = Waiter::new(cmd, offset, len);
        self.state().pending.insert(cookie, waiter);
        rx
    }

    /// How many requests still wait for a reply.
    pub(crate) fn waiting(&self) -> usize {
        self.state().pending.len()
    }
}
