//! The server over real sockets, in process, against in-memory exports: concurrency,
//! out-of-order replies, isolation of misbehaving clients, shutdown, limits.

use blockguard_nbd::client::{Client, ClientOptions};
use blockguard_nbd::{
    proto, ConnectionStats, Export, ExportError, Extent, ListenAddr, MemoryExport, Server, ServerConfig,
    ShutdownHandle,
};
use std::io::{Read, Write};
use std::os::unix::net::UnixStream;
use std::sync::Arc;
use std::thread::{self, JoinHandle};
use std::time::{Duration, Instant};

/// A memory export with injected misbehaviour: reads at offset 0 take a while (the third
/// field; to force overlap), and writes at the second field's offset panic (a stand-in for a
/// broken invariant).
struct Quirky(MemoryExport, Option<u64>, Duration);

/// Slow reads at offset 0 (300 ms), no panics.
fn slow(size: u64) -> Quirky {
    Quirky(MemoryExport::new(size, 4096), None, Duration::from_millis(300))
}

impl Export for Quirky {
    fn size(&self) -> u64 {
        self.0.size()
    }
    fn block_size(&self) -> u32 {
        self.0.block_size()
    }
    fn is_read_only(&self) -> bool {
        false
    }
    fn read_at(&self, buf: &mut [u8], offset: u64) -> Result<(), ExportError> {
        if offset == 0 {
            thread::sleep(self.2);
        }
        self.0.read_at(buf, offset)
    }
    fn write_at(&self, buf: &[u8], offset: u64) -> Result<(), ExportError> {
        assert_ne!(Some(offset), self.1, "injected panic");
        self.0.write_at(buf, offset)
    }
    fn flush(&self) -> Result<(), ExportError> {
        self.0.flush()
    }
    fn trim(&self, offset: u64, len: u64) -> Result<(), ExportError> {
        self.0.trim(offset, len)
    }
    fn write_zeroes(&self, offset: u64, len: u64) -> Result<(), ExportError> {
        self.0.write_zeroes(offset, len)
    }
    fn extents(&self, offset: u64, len: u64) -> Result<Vec<Extent>, ExportError> {
        self.0.extents(offset, len)
    }
}

struct Running {
    _dir: tempfile::TempDir,
    socket: std::path::PathBuf,
    handle: ShutdownHandle,
    stats: ConnectionStats,
    thread: Option<JoinHandle<Result<(), blockguard_nbd::ServerError>>>,
}

impl Running {
    fn start(export: Arc<dyn Export>, cfg: ServerConfig) -> Running {
        let dir = tempfile::tempdir().unwrap();
        let socket = dir.path().join("s.sock");
        let server = Server::bind(&ListenAddr::Unix(socket.clone()), export, cfg).unwrap();
        let handle = server.shutdown_handle();
        let stats = server.connection_stats();
        let thread = Some(thread::spawn(move || server.run()));
        Running {
            _dir: dir,
            socket,
            handle,
            stats,
            thread,
        }
    }

    fn raw(&self) -> UnixStream {
        let s = UnixStream::connect(&self.socket).unwrap();
        s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
        s
    }

    fn client(&self) -> Client<UnixStream> {
        Client::handshake(self.raw(), &ClientOptions::default()).unwrap()
    }

    fn stop(mut self) -> Result<(), blockguard_nbd::ServerError> {
        self.handle.shutdown();
        self.thread.take().unwrap().join().unwrap()
    }
}

impl Drop for Running {
    fn drop(&mut self) {
        if let Some(t) = self.thread.take() {
            self.handle.shutdown();
            let _ = t.join();
        }
    }
}

#[test]
fn replies_complete_out_of_order() {
    let srv = Running::start(Arc::new(slow(1 << 20)), ServerConfig::default());
    let mut c = srv.client();
    let slow = c.send_request(proto::CMD_READ, 0, 0, 4096, &[]).unwrap();
    let fast = c.send_request(proto::CMD_READ, 0, 8192, 4096, &[]).unwrap();
    let first = c.read_reply().unwrap();
    let second = c.read_reply().unwrap();
    assert_eq!((first.cookie, second.cookie), (fast, slow));
    assert_eq!(first.errno + second.errno, 0);
}

#[test]
fn many_pipelined_requests_on_several_connections() {
    let export = Arc::new(MemoryExport::new(8 << 20, 4096));
    let srv = Running::start(export.clone(), ServerConfig::default());
    let threads: Vec<_> = (0..4u64)
        .map(|i| {
            let mut c = srv.client();
            thread::spawn(move || {
                let base = i << 21;
                let mut cookies = Vec::new();
                for k in 0..200u64 {
                    let data = vec![(i * 31 + k) as u8; 4096];
                    cookies.push(
                        c.send_request(proto::CMD_WRITE, 0, base + k * 4096, 4096, &data)
                            .unwrap(),
                    );
                }
                for _ in 0..200 {
                    let r = c.read_reply().unwrap();
                    assert_eq!(r.errno, 0);
                    cookies.retain(|x| *x != r.cookie);
                }
                assert!(cookies.is_empty(), "every request answered exactly once");
                for k in 0..200u64 {
                    let got = c.read(base + k * 4096, 4096).unwrap().unwrap();
                    assert_eq!(got, vec![(i * 31 + k) as u8; 4096]);
                }
                c.disconnect().unwrap();
            })
        })
        .collect();
    for t in threads {
        t.join().unwrap();
    }
    srv.stop().unwrap();
    assert!(export.flush_count() >= 1, "final flush at shutdown");
}

#[test]
fn a_client_that_stops_reading_replies_stalls_only_itself() {
    let cfg = ServerConfig {
        workers: 2,
        ..ServerConfig::default()
    };
    let srv = Running::start(Arc::new(MemoryExport::new(64 << 20, 4096)), cfg);
    let mut hog = srv.client();
    // Far more reply data than socket buffers hold; the hog never reads it.
    for i in 0..200u64 {
        hog.send_request(proto::CMD_READ, 0, (i % 60) << 20, 1 << 20, &[])
            .unwrap();
    }
    thread::sleep(Duration::from_millis(300));
    let start = Instant::now();
    let mut c = srv.client();
    for i in 0..20u64 {
        assert_eq!(c.write(i * 4096, &[1; 4096], 0).unwrap(), 0);
        assert_eq!(c.read(i * 4096, 4096).unwrap().unwrap(), vec![1; 4096]);
    }
    assert!(start.elapsed() < Duration::from_secs(5));
    drop(hog);
    drop(c);
    srv.stop().unwrap();
}

#[test]
fn shutdown_answers_in_flight_requests_then_flushes() {
    let export = Arc::new(slow(1 << 20));
    let srv = Running::start(export.clone(), ServerConfig::default());
    let mut c = srv.client();
    assert_eq!(c.write(0, &[5; 4096], 0).unwrap(), 0);
    let slow = c.send_request(proto::CMD_READ, 0, 0, 4096, &[]).unwrap();
    thread::sleep(Duration::from_millis(50));
    let handle = srv.handle.clone();
    let stopper = thread::spawn(move || srv.stop());
    handle.shutdown();
    let r = c.read_reply().unwrap();
    assert_eq!((r.cookie, r.errno), (slow, 0));
    stopper.join().unwrap().unwrap();
    assert!(export.0.flush_count() >= 1);
}

#[test]
fn stalled_handshakes_time_out() {
    let cfg = ServerConfig {
        handshake_timeout: Duration::from_millis(200),
        ..ServerConfig::default()
    };
    let srv = Running::start(Arc::new(MemoryExport::new(1 << 20, 4096)), cfg);
    let mut s = srv.raw();
    let start = Instant::now();
    let mut buf = [0u8; 64];
    let mut total = 0;
    loop {
        match s.read(&mut buf) {
            Ok(0) | Err(_) => break,
            Ok(n) => total += n,
        }
    }
    assert_eq!(total, 18, "only the greeting");
    assert!(start.elapsed() < Duration::from_secs(5));
    // Transmission-phase idleness is fine: that client stays connected.
    let mut c = srv.client();
    thread::sleep(Duration::from_millis(400));
    assert!(c.read(0, 1).unwrap().is_ok());
}

#[test]
fn connections_beyond_the_limit_are_closed() {
    let cfg = ServerConfig {
        max_connections: 2,
        ..ServerConfig::default()
    };
    let srv = Running::start(Arc::new(MemoryExport::new(1 << 20, 4096)), cfg);
    let mut a = srv.client();
    let _b = srv.client();
    let mut third = srv.raw();
    let mut buf = [0u8; 18];
    assert!(third.read_exact(&mut buf).is_err(), "third connection refused");
    assert!(a.read(0, 1).unwrap().is_ok());
}

#[test]
fn tcp_listener_reports_its_port_and_shuts_down() {
    let export: Arc<dyn Export> = Arc::new(MemoryExport::new(1 << 20, 4096));
    let server = Server::bind(
        &ListenAddr::Tcp("127.0.0.1:0".parse().unwrap()),
        export,
        ServerConfig::default(),
    )
    .unwrap();
    let ListenAddr::Tcp(addr) = server.local_addr().clone() else {
        panic!()
    };
    assert_ne!(addr.port(), 0);
    let handle = server.shutdown_handle();
    let t = thread::spawn(move || server.run());
    let s = std::net::TcpStream::connect(addr).unwrap();
    let mut c = Client::handshake(s, &ClientOptions::default()).unwrap();
    assert_eq!(c.size, 1 << 20);
    assert_eq!(c.write(0, b"tcp", 0).unwrap(), 0);
    handle.shutdown();
    t.join().unwrap().unwrap();
}

/// Regression: `ServerError` displayed its cause and chained it too.
#[test]
fn a_bind_error_chains_its_cause_without_repeating_it() {
    use std::error::Error as _;
    let taken = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = ListenAddr::Tcp(taken.local_addr().unwrap());
    let export = Arc::new(MemoryExport::new(1 << 20, 4096));
    let err = Server::bind(&addr, export, ServerConfig::default()).unwrap_err();
    let shown = err.to_string();
    let cause = err.source().expect("cause chained").to_string();
    assert!(shown.starts_with("cannot listen on nbd://127.0.0.1:"), "{shown}");
    assert!(!shown.contains(&cause), "{shown:?} repeats {cause:?}");
}

/// Regression: a panicking request was answered EIO and the server carried on as if nothing
/// had happened. Now the panic latches the export failed: writes and flushes are refused on
/// every connection (reads go on), nothing is flushed at shutdown, and `run` fails.
#[test]
fn a_panicking_request_fails_the_export_for_writes_and_flushes() {
    let export = Arc::new(Quirky(
        MemoryExport::new(1 << 20, 4096),
        Some(8192),
        Duration::from_millis(300),
    ));
    let srv = Running::start(export.clone(), ServerConfig::default());
    let mut c = srv.client();
    assert_eq!(c.write(0, &[1; 4096], 0).unwrap(), 0);
    assert_eq!(c.call(proto::CMD_FLUSH, 0, 0, 0, &[]).unwrap().errno, 0);
    let flushes = export.0.flush_count();
    assert_eq!(
        c.write(8192, &[2; 4096], 0).unwrap(),
        proto::EIO,
        "the panic is answered"
    );
    // From now on, on this connection and on new ones: writes, trims, zeroing and flushes
    // fail, reads still work.
    let mut fresh = srv.client();
    for c in [&mut c, &mut fresh] {
        assert_eq!(c.write(4096, &[3; 4096], 0).unwrap(), proto::EIO);
        for typ in [proto::CMD_FLUSH, proto::CMD_TRIM, proto::CMD_WRITE_ZEROES] {
            let len = if typ == proto::CMD_FLUSH { 0 } else { 4096 };
            assert_eq!(c.call(typ, 0, 0, len, &[]).unwrap().errno, proto::EIO, "{typ}");
        }
        assert_eq!(c.read(0, 4096).unwrap().unwrap(), vec![1; 4096]);
        assert_eq!(c.read(4096, 4096).unwrap().unwrap(), vec![0; 4096]);
    }
    drop((c, fresh));
    let err = srv.stop().unwrap_err();
    assert!(
        matches!(err, blockguard_nbd::ServerError::Panicked { panics: 1 }),
        "{err}"
    );
    assert_eq!(export.0.flush_count(), flushes, "flushed after the panic");
}

/// A `max_payload` the protocol cannot describe (a structured reply's chunk length is 32 bits)
/// or that allows nothing is refused when the server is made, not met by a client later.
#[test]
fn a_max_payload_out_of_range_is_refused_at_bind() {
    let dir = tempfile::tempdir().unwrap();
    for max_payload in [0, blockguard_nbd::MAX_PAYLOAD_LIMIT + 1, u32::MAX] {
        let cfg = ServerConfig {
            max_payload,
            ..ServerConfig::default()
        };
        let export = Arc::new(MemoryExport::new(1 << 20, 4096));
        let socket = dir.path().join("s.sock");
        match Server::bind(&ListenAddr::Unix(socket), export, cfg) {
            Err(blockguard_nbd::ServerError::Config(why)) => assert!(why.contains("max_payload"), "{why}"),
            Err(e) => panic!("max_payload {max_payload}: {e}"),
            Ok(_) => panic!("max_payload {max_payload} accepted"),
        }
    }
}

#[test]
fn connection_stats_count_open_and_admitted_connections() {
    let srv = Running::start(
        Arc::new(MemoryExport::new(1 << 20, 4096)),
        ServerConfig::default(),
    );
    let wait_for = |open: usize| {
        let deadline = Instant::now() + Duration::from_secs(10);
        while srv.stats.open() != open {
            assert!(
                Instant::now() < deadline,
                "{} open, want {open}",
                srv.stats.open()
            );
            thread::sleep(Duration::from_millis(10));
        }
    };
    assert_eq!((srv.stats.open(), srv.stats.admitted()), (0, 0));
    let mut a = srv.client();
    let b = srv.client();
    wait_for(2);
    assert_eq!(a.read(0, 4096).unwrap().unwrap(), vec![0u8; 4096]);
    drop(b);
    wait_for(1);
    assert_eq!(srv.stats.admitted(), 2);
    drop(a);
    wait_for(0);
    srv.stop().unwrap();
}

/// A connection past the handshake that announced a write of `len` bytes, sent `sent` bytes
/// of its payload and stalls.
fn stalled_writer(srv: &Running, len: u64, sent: usize) -> UnixStream {
    let mut c = srv.client();
    // The request's length, but only part of its payload.
    c.send_request(proto::CMD_WRITE, 0, 0, len, &vec![0x77; sent])
        .unwrap();
    c.stream_owned()
}

/// True once the server has closed `s` (nothing is ever sent to a stalled writer).
fn closed_by_server(s: &mut UnixStream) -> bool {
    s.set_read_timeout(Some(Duration::from_millis(1))).unwrap();
    let mut b = [0u8; 1];
    match s.read(&mut b) {
        Ok(0) => true,
        Ok(_) => panic!("unexpected data"),
        Err(e) => !matches!(
            e.kind(),
            std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut
        ),
    }
}

/// Waits up to `limit` for the server to close `s`; how long that took.
fn wait_closed(s: &mut UnixStream, limit: Duration) -> Option<Duration> {
    let start = Instant::now();
    while start.elapsed() < limit {
        if closed_by_server(s) {
            return Some(start.elapsed());
        }
        thread::sleep(Duration::from_millis(20));
    }
    None
}

/// Regression (finding 5 of review 9): connections that each stalled in the middle of a
/// 4 KiB write payload held every connection slot for good: one mid-payload was never idle,
/// so none made room for a new client and no timeout closed them. Now a stalled payload makes
/// room like an idle connection (the oldest stall first), and the request timeout closes it.
#[test]
fn connections_stalled_mid_payload_make_room_and_time_out() {
    let cfg = ServerConfig {
        max_connections: 8,
        request_timeout: Duration::from_secs(3),
        ..ServerConfig::default()
    };
    let srv = Running::start(Arc::new(MemoryExport::new(1 << 20, 4096)), cfg);
    // Oldest first, far enough apart for the table's clock (100 ms ticks) to tell them apart.
    let mut stalled: Vec<UnixStream> = (0..8)
        .map(|_| {
            let s = stalled_writer(&srv, 4096, 100);
            thread::sleep(Duration::from_millis(150));
            s
        })
        .collect();
    let filled = Instant::now();
    thread::sleep(Duration::from_millis(200));
    // Every slot is taken by a stalled payload: the newcomer still gets in, at once.
    let start = Instant::now();
    let mut newcomer = Client::handshake(srv.raw(), &ClientOptions::default())
        .expect("a new client was refused while every connection was stalled mid-payload");
    assert_eq!(newcomer.read(0, 512).unwrap().unwrap(), vec![0; 512]);
    assert!(start.elapsed() < Duration::from_secs(1), "{:?}", start.elapsed());
    // In place of the oldest stall.
    assert!(wait_closed(&mut stalled[0], Duration::from_secs(1)).is_some());
    assert!(
        stalled[1..].iter_mut().all(|s| !closed_by_server(s)),
        "not the oldest stall made room"
    );
    // The request timeout closes the rest: each 3 s after its payload stopped (the last
    // stalled 1.05 s after the first).
    for s in &mut stalled[1..] {
        let limit = Duration::from_secs(5).saturating_sub(filled.elapsed());
        assert!(
            wait_closed(s, limit).is_some(),
            "a stalled payload outlived the request timeout"
        );
    }
    assert!(
        filled.elapsed() >= Duration::from_millis(2500),
        "closed before the request timeout: {:?}",
        filled.elapsed()
    );
    // The memory they held is back: a write as large as the default budget goes through.
    assert_eq!(newcomer.write(0, &vec![3; 256 << 10], 0).unwrap(), 0);
}

/// A socket that sends at most 64 KiB every 60 ms (about 1 MiB/s).
struct Throttled(UnixStream);

impl Read for Throttled {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        self.0.read(buf)
    }
}

impl Write for Throttled {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        let n = self.0.write(&buf[..buf.len().min(64 << 10)])?;
        if buf.len() > 4096 {
            thread::sleep(Duration::from_millis(60));
        }
        Ok(n)
    }
    fn flush(&mut self) -> std::io::Result<()> {
        self.0.flush()
    }
}

/// A payload trickled a byte at a time never stops moving, but it is far behind any useful
/// rate: the request timeout counts from where a transfer at the minimum rate would be. A
/// large payload that keeps that rate may take longer than the timeout.
#[test]
fn a_trickled_payload_times_out_but_a_slow_steady_one_does_not() {
    let cfg = ServerConfig {
        request_timeout: Duration::from_secs(1),
        min_transfer_rate: 256 << 10,
        ..ServerConfig::default()
    };
    let srv = Running::start(Arc::new(MemoryExport::new(4 << 20, 4096)), cfg);
    // 2 MiB at ~1 MiB/s (64 KiB every 60 ms): 2 s, twice the request timeout.
    let mut steady = srv.client();
    let steady_writer = {
        let s = Throttled(srv.raw());
        thread::spawn(move || {
            let mut c = Client::handshake(s, &ClientOptions::default()).unwrap();
            c.write(1 << 20, &vec![9u8; 2 << 20], 0).unwrap()
        })
    };
    let mut trickler = stalled_writer(&srv, 4096, 1);
    let start = Instant::now();
    let mut sent = 1;
    let closed = loop {
        if closed_by_server(&mut trickler) {
            break true;
        }
        if start.elapsed() > Duration::from_secs(4) || sent == 4096 {
            break false;
        }
        // The write fails once the server has closed the connection.
        if trickler.write_all(&[1]).is_err() {
            break true;
        }
        sent += 1;
        thread::sleep(Duration::from_millis(100));
    };
    assert!(
        closed,
        "a trickled payload was not closed ({sent} bytes in {:?})",
        start.elapsed()
    );
    assert!(
        start.elapsed() >= Duration::from_millis(800),
        "{:?}",
        start.elapsed()
    );
    assert_eq!(steady_writer.join().unwrap(), 0, "the steady writer failed");
    assert_eq!(steady.read(1 << 20, 4096).unwrap().unwrap(), vec![9; 4096]);
}

/// Regression (finding 6 of review 9): connections that each sent half of a large write
/// payload and stalled held the whole in-flight memory budget for good, so every other
/// client's request waited for memory forever. Now, while requests wait for memory, the
/// connection whose payload stalled the longest is closed, releasing its memory: the staller
/// goes, the waiter is served.
#[test]
fn stalled_payloads_cannot_starve_other_requests_of_memory() {
    let cfg = ServerConfig {
        max_total_inflight_bytes: 4 << 20,
        // Only the relief under memory pressure can help within this test.
        request_timeout: Duration::from_secs(60),
        ..ServerConfig::default()
    };
    let srv = Running::start(Arc::new(MemoryExport::new(8 << 20, 4096)), cfg);
    let mut hogs: Vec<UnixStream> = (0..2).map(|_| stalled_writer(&srv, 2 << 20, 1 << 20)).collect();
    // A third one waits for memory, like the honest client.
    let mut waiting_hog = stalled_writer(&srv, 2 << 20, 0);
    thread::sleep(Duration::from_millis(300));
    let start = Instant::now();
    let mut good = srv.client();
    let read = good.read(0, 4096).expect("a 4 KiB read got no reply within 10 s");
    assert_eq!(read.unwrap(), vec![0; 4096]);
    assert_eq!(good.write(4096, &[5; 4096], 0).unwrap(), 0);
    let served = start.elapsed();
    assert!(
        served < Duration::from_secs(3),
        "a 4 KiB read and write took {served:?}"
    );
    // Larger than what is left after one hog: the other makes way too.
    assert_eq!(good.write(1 << 20, &vec![6; 3 << 20], 0).unwrap(), 0);
    assert!(start.elapsed() < Duration::from_secs(6), "{:?}", start.elapsed());
    for h in &mut hogs {
        assert!(
            wait_closed(h, Duration::from_secs(1)).is_some(),
            "a stalled hog still holds memory"
        );
    }
    drop(waiting_hog.write_all(&[0; 1]));
    assert_eq!(good.read(4096, 4096).unwrap().unwrap(), vec![5; 4096]);
}

/// Regression (finding 6 of review 9): with an idle timeout, the client whose request waited
/// for memory was closed as idle (its request did not count as in flight until it had the
/// memory), while the connections holding the memory stayed. A request waiting for memory is
/// in flight: its connection is busy, not idle.
#[test]
fn a_request_waiting_for_memory_is_not_idle() {
    let cfg = ServerConfig {
        max_total_inflight_bytes: 1 << 20,
        idle_timeout: Some(Duration::from_millis(300)),
        ..ServerConfig::default()
    };
    let export = Arc::new(Quirky(
        MemoryExport::new(4 << 20, 4096),
        None,
        Duration::from_millis(1500),
    ));
    let srv = Running::start(export, cfg);
    // A busy client holds the whole budget with a read the export takes 1.5 s to serve.
    let mut busy = srv.client();
    let big = busy.send_request(proto::CMD_READ, 0, 0, 1 << 20, &[]).unwrap();
    thread::sleep(Duration::from_millis(100));
    let start = Instant::now();
    let mut waiter = srv.client();
    let got = waiter.read(8192, 4096);
    let waited = start.elapsed();
    assert!(
        got.as_ref().is_ok_and(Result::is_ok),
        "the client waiting for memory was closed after {waited:?}: {got:?}"
    );
    assert!(
        waited >= Duration::from_millis(1000),
        "it did not wait for memory: {waited:?}"
    );
    let r = busy.read_reply().unwrap();
    assert_eq!((r.cookie, r.errno), (big, 0));
}
