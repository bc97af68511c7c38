//! Diagnostics — log events, warnings, the final error — that can neither block nor fail the
//! program: they are queued, and one thread of their own writes them to stderr.
//!
//! Why: `serve` must stop on SIGINT/SIGTERM whatever became of its stderr. When stderr was a
//! pipe whose reader had gone, every write failed, tracing-subscriber reported that with
//! `eprintln!`, which panics when it cannot write, and the panic killed whichever thread
//! logged — the signal thread included. When the reader is still there but stops reading, a
//! direct write blocks the logging thread for good once the pipe is full. Queued, a full or
//! broken stderr costs only lines: new ones are dropped while the queue is full.

use std::io::Write;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::mpsc::{sync_channel, Receiver, SyncSender, TrySendError};
use std::sync::OnceLock;
use std::time::{Duration, Instant};

/// Lines queued before new ones are dropped: room for bursts (a few hundred connections
/// logging at once), bounded memory.
const QUEUE_LINES: usize = 4096;

enum Msg {
    Line(Vec<u8>),
    /// Answered once everything queued before it has been written.
    Flush(SyncSender<()>),
}

struct Sink {
    tx: SyncSender<Msg>,
    dropped: AtomicU64,
}

static SINK: OnceLock<Sink> = OnceLock::new();

/// Starts the writer thread. Without it (it could not start), lines are written directly,
/// errors ignored: output may then block, but still never panics.
pub(crate) fn init() {
    let (tx, rx) = sync_channel(QUEUE_LINES);
    let started = std::thread::Builder::new()
        .name("log-writer".into())
        .spawn(move || write_loop(&rx));
    if started.is_ok() {
        let _ = SINK.set(Sink {
            tx,
            dropped: AtomicU64::new(0),
        });
    }
}

fn write_loop(rx: &Receiver<Msg>) {
    let mut stderr = std::io::stderr();
    for msg in rx {
        match msg {
            // Nobody to tell about a failed write to stderr: the line is lost.
            Msg::Line(line) => drop(stderr.write_all(&line)),
            Msg::Flush(done) => drop(done.try_send(())),
        }
    }
}

/// Queues `bytes` for stderr; drops them if the queue is full.
fn enqueue(bytes: Vec<u8>) {
    match SINK.get() {
        Some(sink) => {
            if let Err(TrySendError::Full(_) | TrySendError::Disconnected(_)) =
                sink.tx.try_send(Msg::Line(bytes))
            {
                sink.dropped.fetch_add(1, Ordering::Relaxed);
            }
        }
        None => drop(std::io::stderr().write_all(&bytes)),
    }
}

/// Writes `text` to stderr as it is (relayed output of another process).
pub(crate) fn raw(text: &str) {
    if !text.is_empty() {
        enqueue(text.as_bytes().to_vec());
    }
}

/// Writes one line to stderr (a newline is added).
pub(crate) fn line(text: &str) {
    let mut bytes = Vec::with_capacity(text.len() + 1);
    bytes.extend_from_slice(text.as_bytes());
    bytes.push(b'\n');
    enqueue(bytes);
}

/// Writes one line of results to stdout. If stdout is closed (its reader went away), exits at
/// once with status 141, the status of a process killed by SIGPIPE, as a C tool would.
pub(crate) fn stdout_line(text: &str) {
    use std::io::Write as _;
    let mut out = std::io::stdout().lock();
    if let Err(e) = writeln!(out, "{text}").and_then(|()| out.flush()) {
        if e.kind() == std::io::ErrorKind::BrokenPipe {
            std::process::exit(141);
        }
        line(&format!("blockguard: cannot write to stdout: {e}"));
        flush(Duration::from_secs(2));
        std::process::exit(2);
    }
}

/// Waits up to `timeout` for everything queued so far to be written (before exiting, so the
/// final error is not lost); gives up when stderr does not take it.
pub(crate) fn flush(timeout: Duration) {
    let Some(sink) = SINK.get() else {
        return;
    };
    let deadline = Instant::now() + timeout;
    let dropped = sink.dropped.load(Ordering::Relaxed);
    if dropped > 0 {
        line(&format!(
            "blockguard: {dropped} diagnostic lines were dropped (stderr did not take them)"
        ));
    }
    let (done_tx, done_rx) = sync_channel(1);
    let mut msg = Msg::Flush(done_tx);
    loop {
        match sink.tx.try_send(msg) {
            Ok(()) => break,
            Err(TrySendError::Full(m)) if Instant::now() < deadline => {
                msg = m;
                std::thread::sleep(Duration::from_millis(5));
            }
            Err(_) => return,
        }
    }
    let _ = done_rx.recv_timeout(deadline.saturating_duration_since(Instant::now()));
}

/// The writer tracing-subscriber formats each event into; the event is queued whole when the
/// writer is dropped, so lines of different threads never interleave.
#[derive(Default)]
pub(crate) struct EventWriter(Vec<u8>);

impl Write for EventWriter {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        self.0.extend_from_slice(buf);
        Ok(buf.len())
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

impl Drop for EventWriter {
    fn drop(&mut self) {
        if !self.0.is_empty() {
            enqueue(std::mem::take(&mut self.0));
        }
    }
}

/// Makes an [`EventWriter`] per event: `with_writer(log::Queued)`.
#[derive(Clone, Copy, Debug)]
pub(crate) struct Queued;

impl<'a> tracing_subscriber::fmt::MakeWriter<'a> for Queued {
    type Writer = EventWriter;
    fn make_writer(&'a self) -> EventWriter {
        EventWriter::default()
    }
}
