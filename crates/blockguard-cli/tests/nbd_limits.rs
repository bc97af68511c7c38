//! Clients that hold on to the server's resources must not keep others out: connections that
//! trickle through the handshake or sit idle, and (see the reply-memory tests) clients that
//! never read their replies.

mod nbd_support;

use nbd_support::*;
use std::io::Write;
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::Arc;
use std::thread;
use std::time::{Duration, Instant};

/// Runs `nbdinfo --size URI` until it succeeds; returns how long that took. Each attempt is
/// bounded, so a server that lets the client in but never answers fails the test too.
fn time_to_get_in(uri: &str, give_up: Duration) -> Duration {
    let start = Instant::now();
    loop {
        let mut child = Command::new("nbdinfo")
            .args(["--size", uri])
            .stdout(Stdio::piped())
            .stderr(Stdio::null())
            .spawn()
            .expect("run nbdinfo");
        let attempt = Instant::now();
        let status = loop {
            if let Some(status) = child.try_wait().unwrap() {
                break Some(status);
            }
            if attempt.elapsed() > Duration::from_secs(10) {
                let _ = child.kill();
                let _ = child.wait();
                break None;
            }
            thread::sleep(Duration::from_millis(10));
        };
        if status.is_some_and(|s| s.success()) {
            return start.elapsed();
        }
        assert!(
            start.elapsed() < give_up,
            "a real client was kept out for {:?}",
            start.elapsed()
        );
        thread::sleep(Duration::from_millis(100));
    }
}

/// `n` connections that each send one byte of a valid handshake every `every`, and reconnect
/// whenever the server closes them; counts the reconnections.
struct Tricklers {
    stop: Arc<AtomicBool>,
    reconnects: Arc<AtomicUsize>,
    thread: Option<thread::JoinHandle<()>>,
}

impl Tricklers {
    fn start(socket: &Path, n: usize, every: Duration) -> Tricklers {
        let stop = Arc::new(AtomicBool::new(false));
        let reconnects = Arc::new(AtomicUsize::new(0));
        let socket: PathBuf = socket.to_path_buf();
        let (stop2, reconnects2) = (Arc::clone(&stop), Arc::clone(&reconnects));
        // Client flags, then an option header: what a slow client would send.
        let mut script = vec![0, 0, 0, 3];
        script.extend_from_slice(&blockguard_nbd::proto::IHAVEOPT.to_be_bytes());
        script.extend_from_slice(&[0, 0, 0, 7, 0, 0, 0, 0]);
        let thread = thread::spawn(move || {
            let connect = || {
                UnixStream::connect(&socket).ok().inspect(|s| {
                    let _ = s.set_nonblocking(true);
                })
            };
            // (socket, bytes sent, next send), first sends spread over the period.
            let start = Instant::now();
            let mut slots: Vec<(Option<UnixStream>, usize, Instant)> = (0..n)
                .map(|i| (connect(), 0, start + every.mul_f64(i as f64 / n as f64)))
                .collect();
            while !stop2.load(Ordering::Relaxed) {
                let now = Instant::now();
                for (sock, sent, next) in &mut slots {
                    let closed = match sock {
                        None => true,
                        Some(s) if now >= *next => {
                            *next = now + every;
                            let byte = script[*sent % script.len()];
                            *sent += 1;
                            s.write(&[byte]).is_err()
                        }
                        Some(_) => false,
                    };
                    if closed {
                        *sock = connect();
                        *sent = 0;
                        reconnects2.fetch_add(1, Ordering::Relaxed);
                    }
                }
                thread::sleep(Duration::from_millis(50));
            }
        });
        Tricklers {
            stop,
            reconnects,
            thread: Some(thread),
        }
    }
}

impl Drop for Tricklers {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

/// Regression: the server took at most 512 connections with a timeout per handshake read, so
/// 520 connections sending one byte every few seconds kept real clients out for minutes.
/// Now the handshake has one deadline, and at the limit the quietest connection still in its
/// handshake makes room for the new one.
#[test]
fn trickling_connections_do_not_keep_real_clients_out() {
    require("nbdinfo");
    let dir = tempfile::tempdir().unwrap();
    let vol = make_volume(dir.path(), "v.bgv", "8M");
    let srv = Served::start(&vol, &["--handshake-timeout", "3", "--max-connections", "512"]);
    let attack = Tricklers::start(&srv.socket, 520, Duration::from_secs(2));
    thread::sleep(Duration::from_millis(1500));
    let mut worst = Duration::ZERO;
    for _ in 0..4 {
        worst = worst.max(time_to_get_in(&srv.uri(), Duration::from_secs(5)));
        thread::sleep(Duration::from_millis(1500));
    }
    let reconnects = attack.reconnects.load(Ordering::Relaxed);
    drop(attack);
    eprintln!("worst wait of a real client: {worst:?}; tricklers reconnected {reconnects} times");
    assert!(
        reconnects >= 500,
        "only {reconnects} trickling connections were closed"
    );
    let log = srv.log_text();
    let me = format!("pid {}", std::process::id());
    assert!(
        log.contains("handshake not finished within the deadline"),
        "{log}"
    );
    assert!(log.contains(&me), "the log does not name the peer:\n{log}");
}

/// Regression: 512 connections idling after the handshake kept every new client out. Now a
/// new client takes the place of the quietest one, and `--idle-timeout` closes idle ones.
#[test]
fn idle_connections_make_room_and_are_closed_after_the_idle_timeout() {
    let dir = tempfile::tempdir().unwrap();
    let vol = make_volume(dir.path(), "v.bgv", "8M");
    let srv = Served::start(&vol, &["--max-connections", "64", "--idle-timeout", "3"]);
    let mut idle: Vec<_> = (0..63).map(|_| srv.client()).collect();
    let mut busy = srv.client();
    thread::sleep(Duration::from_millis(1200));
    // Full: the newcomer gets in at once, in place of one idle connection.
    let start = Instant::now();
    let mut newcomer = srv.client();
    assert_eq!(newcomer.read(0, 512).unwrap().unwrap(), vec![0; 512]);
    assert!(start.elapsed() < Duration::from_secs(2), "{:?}", start.elapsed());
    // A busy client (a request every half second) is never idle long enough to be closed.
    let deadline = Instant::now() + Duration::from_millis(3500);
    while Instant::now() < deadline {
        assert!(busy.read(4096, 512).unwrap().is_ok());
        thread::sleep(Duration::from_millis(500));
    }
    assert!(busy.read(4096, 512).unwrap().is_ok(), "a busy client was closed");
    // Every idle one is gone by now.
    let open = idle.iter_mut().filter_map(|c| c.read(0, 1).ok()).count();
    assert_eq!(open, 0, "{open} idle connections outlived the idle timeout");
    let log = srv.log_text();
    assert!(log.contains("closed to make room for new clients"), "{log}");
    assert!(log.contains("idle past the idle timeout"), "{log}");
}

/// The server's resident memory, from /proc.
fn rss_mib(pid: u32) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    let kib: u64 = status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .expect("VmRSS in /proc/PID/status");
    kib >> 10
}

/// Regression: a client that sends read requests and never reads the replies pinned about
/// 32 MiB of server memory (100 of them: 3.3 GB), and the memory stayed taken after they left.
///
/// The bound: requests in flight may hold at most `--inflight-memory` (64 MiB here), and
/// buffers that came back within the last second (the pool keeps unused ones that long;
/// evicted connections return at most the budget's worth) may still be kept: 2 × 64 MiB over
/// the idle server, plus 16 MiB for threads and allocator slack. Without the bound, 24 such
/// clients took ~775 MiB.
///
/// Regression (flaky on a loaded machine): the requests of clients that had left while
/// waiting for memory still took it, one after the other, to build replies nobody read, so
/// the memory stayed taken for seconds after they closed (42 MiB after 5 s).
#[test]
fn clients_that_never_read_replies_pin_bounded_memory() {
    let dir = tempfile::tempdir().unwrap();
    let vol = make_volume(dir.path(), "v.bgv", "64M");
    let srv = Served::start(&vol, &["--inflight-memory", "64M"]);
    let pid = srv.child.as_ref().expect("running").id();
    let mut warm = srv.client();
    assert_eq!(warm.write(0, &random_bytes(1 << 20, 1), 0).unwrap(), 0);
    assert!(warm.read(0, 1 << 20).unwrap().is_ok());
    drop(warm);
    thread::sleep(Duration::from_millis(2500));
    let idle = rss_mib(pid);

    // 24 clients, each asking for 8 reads of 32 MiB (the largest allowed), reading nothing.
    let mut bad = Vec::new();
    for _ in 0..24 {
        let mut c = srv.client();
        for _ in 0..8 {
            c.send_request(blockguard_nbd::proto::CMD_READ, 0, 0, 32 << 20, &[])
                .unwrap();
        }
        bad.push(c);
    }
    thread::sleep(Duration::from_secs(3));
    let attacked = rss_mib(pid);

    // A well-behaved client is served meanwhile.
    let start = Instant::now();
    let mut good = srv.client();
    let data = random_bytes(1 << 20, 2);
    assert_eq!(good.write(8 << 20, &data, 0).unwrap(), 0);
    assert!(good.read(8 << 20, 1 << 20).unwrap().unwrap() == data);
    let served_in = start.elapsed();
    let during = attacked.max(rss_mib(pid));

    drop(bad);
    let closed = Instant::now();
    let after = loop {
        let rss = rss_mib(pid);
        if rss <= idle + 16 || closed.elapsed() > Duration::from_secs(5) {
            break rss;
        }
        thread::sleep(Duration::from_millis(100));
    };
    eprintln!(
        "server RSS: {idle} MiB idle, {during} MiB with 24 clients not reading 8 x 32 MiB \
         reads, {after} MiB {:?} after they closed; a good client was served in {served_in:?}",
        closed.elapsed()
    );
    assert!(
        served_in < Duration::from_secs(5),
        "the good client waited {served_in:?}"
    );
    assert!(during <= idle + 2 * 64 + 16, "{during} MiB with a 64 MiB budget");
    assert!(
        after <= idle + 16,
        "{after} MiB after the clients left ({idle} before)"
    );
    let log = srv.log_text();
    assert!(
        log.contains("replies left unread while other requests waited for memory"),
        "{log}"
    );
    drop(good);
}

/// A connection past the handshake that announced a write of `len` bytes,
/// sent `sent` bytes of its payload and stalls.
fn stalled_writer(srv: &Served, len: u64, sent: usize) -> UnixStream {
    let mut c = srv.client();
    // The request's length, but only part of its payload.
    c.send_request(blockguard_nbd::proto::CMD_WRITE, 0, 0, len, &vec![0x77; sent])
        .unwrap();
    c.stream_owned()
}

/// Waits up to `limit` for the server to close `s` (nothing is ever sent to a stalled
/// writer); false if it did not.
fn closed_within(s: &mut UnixStream, limit: Duration) -> bool {
    use std::io::Read;
    s.set_read_timeout(Some(Duration::from_millis(50))).unwrap();
    let start = Instant::now();
    let mut b = [0u8; 1];
    while start.elapsed() < limit {
        match s.read(&mut b) {
            Ok(0) => return true,
            Ok(_) => panic!("unexpected data"),
            Err(e)
                if matches!(
                    e.kind(),
                    std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut
                ) => {}
            Err(_) => return true,
        }
    }
    false
}

/// Regression (finding 5 of review 9): `--max-connections` connections each stalled in the
/// middle of a 4 KiB write payload refused every new client for as long as they liked, and
/// no timeout closed them. Now at the limit the oldest stall makes room, `--request-timeout`
/// closes the rest, and the log names whom and the memory released.
#[test]
fn connections_stalled_mid_payload_do_not_keep_clients_out() {
    let dir = tempfile::tempdir().unwrap();
    let vol = make_volume(dir.path(), "v.bgv", "8M");
    let srv = Served::start(&vol, &["--max-connections", "8", "--request-timeout", "2"]);
    let mut stalled: Vec<_> = (0..8).map(|_| stalled_writer(&srv, 4096, 100)).collect();
    thread::sleep(Duration::from_millis(1200));
    let start = Instant::now();
    let mut newcomer = srv.client();
    assert_eq!(newcomer.read(0, 512).unwrap().unwrap(), vec![0; 512]);
    assert!(start.elapsed() < Duration::from_secs(2), "{:?}", start.elapsed());
    for s in &mut stalled {
        assert!(
            closed_within(s, Duration::from_secs(3)),
            "a connection stalled mid-payload outlived --request-timeout"
        );
    }
    // Flushed at exit: the aggregated lines come every few seconds.
    let mut srv = srv;
    assert!(srv.signal("TERM").success());
    let log = srv.log_text();
    let me = format!("pid {}", std::process::id());
    assert!(log.contains("closed to make room for new clients"), "{log}");
    assert!(
        log.contains("request payload not received within the request timeout"),
        "{log}"
    );
    assert!(log.contains(&me), "the log does not name the peer:\n{log}");
    assert!(log.contains("bytes of request memory released"), "{log}");
}

/// Regression (finding 6 of review 9): connections that each sent half of a large write
/// payload and stalled took the whole `--inflight-memory` for good: a well-behaved client's
/// 4 KiB read and write waited forever. Now, while requests wait for memory, the connection
/// whose payload stalled the longest is closed and its memory released.
#[test]
fn stalled_payloads_do_not_starve_other_clients_of_memory() {
    let dir = tempfile::tempdir().unwrap();
    let vol = make_volume(dir.path(), "v.bgv", "64M");
    let srv = Served::start(&vol, &["--inflight-memory", "8M", "--request-timeout", "120"]);
    let mut hogs: Vec<_> = (0..2).map(|_| stalled_writer(&srv, 4 << 20, 2 << 20)).collect();
    let _waiting_hog = stalled_writer(&srv, 4 << 20, 0);
    thread::sleep(Duration::from_millis(300));
    let start = Instant::now();
    let mut good = srv.client();
    let read = good.read(0, 4096).expect("a 4 KiB read got no reply within 20 s");
    assert_eq!(read.unwrap(), vec![0; 4096]);
    assert_eq!(good.write(0, &[1; 4096], 0).unwrap(), 0);
    let served = start.elapsed();
    assert!(
        served < Duration::from_secs(5),
        "4 KiB read and write took {served:?}"
    );
    assert!(
        hogs.iter_mut().any(|h| closed_within(h, Duration::from_secs(1))),
        "no stalled hog was closed"
    );
    let mut srv = srv;
    assert!(srv.signal("TERM").success());
    let log = srv.log_text();
    assert!(
        log.contains("request payload stalled while other requests waited for memory"),
        "{log}"
    );
    assert!(log.contains(&format!("pid {}", std::process::id())), "{log}");
}
