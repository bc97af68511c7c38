//! The server over real sockets, in process, against in-memory exports: concurrency,
//! out-of-order replies, isolation of misbehaving clients, shutdown, limits.

use blockguard_nbd::client::{Client, ClientOptions};
use blockguard_nbd::{
    proto, ConnectionStats, Export, ExportError, Extent, ListenAddr, MemoryExport, Server, ServerConfig,
    ShutdownHandle,
};
use std::io::Read;
use std::os::unix::net::UnixStream;
use std::sync::Arc;
use std::thread::{self, JoinHandle};
use std::time::{Duration, Instant};

/// A memory export with injected misbehaviour: reads at offset 0 take a while (to force
/// overlap), and writes at `panic_write_at` panic (a stand-in for a broken invariant).
struct Quirky(MemoryExport, Option<u64>);

/// Slow reads at offset 0, no panics.
fn slow(size: u64) -> Quirky {
    Quirky(MemoryExport::new(size, 4096), None)
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
            thread::sleep(Duration::from_millis(300));
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
    let export = Arc::new(Quirky(MemoryExport::new(1 << 20, 4096), Some(8192)));
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
