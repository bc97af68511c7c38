//! Life cycle of `blockguard serve`: graceful SIGTERM, SIGKILL and reopen, the volume lock,
//! `--create`, `--read-only`.

mod nbd_support;

use blockguard_nbd::client::{Client, ClientOptions};
use blockguard_nbd::proto;
use nbd_support::*;
use std::os::unix::net::UnixStream;
use std::time::Duration;

fn client(srv: &Served) -> Client<UnixStream> {
    srv.client()
}

#[test]
fn sigterm_answers_in_flight_writes_flushes_and_reopens() {
    let dir = tempfile::tempdir().unwrap();
    let vol = make_volume(dir.path(), "v.bgv", "64M");
    let mut srv = Served::start(&vol, &[]);
    let mut c = client(&srv);
    // 64 pipelined 64 KiB writes, none flushed and none with FUA.
    let mut sent = Vec::new();
    for i in 0..64u64 {
        let data = random_bytes(65536, i);
        let cookie = c
            .send_request(proto::CMD_WRITE, 0, i * 65536 * 2, 65536, &data)
            .unwrap();
        sent.push((cookie, i, data));
    }
    // Let the server read at least the first requests, then ask it to stop.
    let first = c.read_reply().unwrap();
    assert_eq!(first.errno, 0);
    let status = srv.signal("TERM");
    assert!(status.success(), "exit status {status}:\n{}", srv.log_text());
    // Every write the server acknowledged must be durable; read whatever replies came.
    let mut acked = vec![first.cookie];
    while let Ok(r) = c.read_reply() {
        assert_eq!(r.errno, 0);
        acked.push(r.cookie);
    }
    let log = srv.log_text();
    assert!(log.contains("all requests finished and flushed"), "{log}");
    assert!(log.contains("volume closed cleanly"), "{log}");
    assert!(!srv.socket.exists(), "socket file left behind");
    let srv = Served::start(&vol, &[]);
    let mut c = client(&srv);
    for (cookie, i, data) in &sent {
        if acked.contains(cookie) {
            let got = c.read(i * 65536 * 2, 65536).unwrap().expect("read");
            assert!(got == *data, "acknowledged write {i} lost");
        }
    }
    assert!(!acked.is_empty());
}

#[test]
fn sigkill_then_reopen_keeps_flushed_writes_and_checks_clean() {
    let dir = tempfile::tempdir().unwrap();
    let vol = make_volume(dir.path(), "v.bgv", "64M");
    let mut srv = Served::start(&vol, &[]);
    let mut c = client(&srv);
    let flushed = random_bytes(1 << 20, 7);
    assert_eq!(c.write(1 << 20, &flushed, 0).unwrap(), 0);
    let fua = random_bytes(8192, 8);
    assert_eq!(c.write(3 << 20, &fua, proto::CMD_FLAG_FUA).unwrap(), 0);
    assert_eq!(c.call(proto::CMD_FLUSH, 0, 0, 0, &[]).unwrap().errno, 0);
    // Unflushed writes in flight when the process dies: allowed to be lost, never to
    // corrupt anything.
    for i in 0..32u64 {
        let d = random_bytes(65536, 100 + i);
        c.send_request(proto::CMD_WRITE, 0, (8 << 20) + i * 65536, 65536, &d)
            .unwrap();
    }
    let status = srv.signal("KILL");
    assert!(!status.success());
    drop(c);
    // Reopens without complaint; every block verifies.
    run(BIN, &["check", vol.to_str().unwrap()]);
    // Not closed cleanly; recovery settles it and marks it clean, once.
    let v = vol.to_str().unwrap();
    let info = String::from_utf8_lossy(&run(BIN, &["info", v]).stdout).into_owned();
    assert!(info.contains("state:         in use"), "{info}");
    let out = String::from_utf8_lossy(&run(BIN, &["recover", v]).stdout).into_owned();
    assert!(out.contains("settled after an unclean shutdown"), "{out}");
    assert!(out.contains("marked clean"), "{out}");
    let info = String::from_utf8_lossy(&run(BIN, &["info", v]).stdout).into_owned();
    assert!(info.contains("state:         clean"), "{info}");
    let again = String::from_utf8_lossy(&run(BIN, &["recover", v, "--json"]).stdout).into_owned();
    assert!(again.contains("\"after_crash\": null"), "{again}");
    run(BIN, &["check", v]);
    let srv = Served::start(&vol, &[]);
    let mut c = client(&srv);
    assert!(c.read(1 << 20, 1 << 20).unwrap().unwrap() == flushed);
    assert!(c.read(3 << 20, 8192).unwrap().unwrap() == fua);
    // Whatever survived of the unflushed region reads without verification errors.
    assert!(c.read(8 << 20, 2 << 20).unwrap().is_ok());
}

#[test]
fn a_volume_is_served_by_one_process_at_a_time() {
    let dir = tempfile::tempdir().unwrap();
    let vol = make_volume(dir.path(), "v.bgv", "8M");
    let _srv = Served::start(&vol, &[]);
    let other = dir.path().join("other.sock");
    let out = run_any(
        BIN,
        &[
            "serve",
            vol.to_str().unwrap(),
            "--socket",
            other.to_str().unwrap(),
        ],
    );
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("in use"), "{err}");
}

#[test]
fn a_socket_path_in_use_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    let a = make_volume(dir.path(), "a.bgv", "8M");
    let b = make_volume(dir.path(), "b.bgv", "8M");
    let srv = Served::start(&a, &[]);
    let out = run_any(
        BIN,
        &[
            "serve",
            b.to_str().unwrap(),
            "--socket",
            srv.socket.to_str().unwrap(),
        ],
    );
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("in use"), "{err}");
}

#[test]
fn create_formats_a_missing_volume_and_keeps_an_existing_one() {
    let dir = tempfile::tempdir().unwrap();
    let vol = dir.path().join("new.bgv");
    let mut srv = Served::start(&vol, &["--create", "32M"]);
    let mut c = client(&srv);
    assert_eq!(c.size, 32 << 20);
    assert_eq!(c.write(0, b"kept", 0).unwrap(), 0);
    drop(c);
    assert!(srv.signal("INT").success());
    // --create on an existing volume serves it unchanged, and (regression: it used to say
    // nothing) warns that the size differs from the one asked for.
    let srv = Served::start(&vol, &["--create", "64M"]);
    let mut c = client(&srv);
    assert_eq!(c.size, 32 << 20);
    assert_eq!(c.read(0, 4).unwrap().unwrap(), b"kept");
    let log = srv.log_text();
    assert!(log.contains("WARN"), "{log}");
    assert!(
        log.contains("exists with 33554432 bytes, not the 67108864 bytes --create asked for"),
        "{log}"
    );
}

/// Regression: `--listen localhost:PORT` was refused ("invalid socket address syntax").
#[test]
fn listen_takes_a_host_name() {
    let dir = tempfile::tempdir().unwrap();
    let vol = make_volume(dir.path(), "v.bgv", "8M");
    let srv = Served::start_tcp_host(&vol, "localhost", &[]);
    let s = std::net::TcpStream::connect(("127.0.0.1", srv.tcp.unwrap())).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(20))).unwrap();
    let mut c = Client::handshake(s, &ClientOptions::default()).expect("handshake");
    assert_eq!(c.size, 8 << 20);
    assert_eq!(c.read(0, 512).unwrap().unwrap(), vec![0; 512]);
    let out = run_any(
        BIN,
        &[
            "serve",
            vol.to_str().unwrap(),
            "--listen",
            "no-such-host.invalid:1",
        ],
    );
    assert_eq!(out.status.code(), Some(2));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("cannot resolve --listen \"no-such-host.invalid:1\""),
        "{err}"
    );
    assert!(err.contains("127.0.0.1:10809"), "{err}");
}

#[test]
fn read_only_export_refuses_writes() {
    let dir = tempfile::tempdir().unwrap();
    let vol = make_volume(dir.path(), "v.bgv", "8M");
    let srv = Served::start(&vol, &["--read-only"]);
    let mut c = client(&srv);
    assert_ne!(c.flags & proto::TFLAG_READ_ONLY, 0);
    assert_eq!(c.flags & proto::TFLAG_SEND_TRIM, 0);
    assert_eq!(c.write(0, b"nope", 0).unwrap(), proto::EPERM);
    for typ in [proto::CMD_TRIM, proto::CMD_WRITE_ZEROES] {
        assert_eq!(c.call(typ, 0, 0, 4096, &[]).unwrap().errno, proto::EPERM);
    }
    assert_eq!(c.read(0, 4096).unwrap().unwrap(), vec![0; 4096]);
}

/// Regression: error types displayed their cause and chained it too, so the CLI printed
/// "Address already in use (os error 98): Address already in use (os error 98)".
#[test]
fn a_bind_error_shows_its_cause_once() {
    let dir = tempfile::tempdir().unwrap();
    let vol = make_volume(dir.path(), "v.bgv", "8M");
    let taken = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = taken.local_addr().unwrap().to_string();
    let out = run_any(BIN, &["serve", vol.to_str().unwrap(), "--listen", &addr]);
    assert_eq!(out.status.code(), Some(2));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains(&format!("cannot listen on nbd://{addr}")), "{err}");
    assert_eq!(err.matches("Address already in use").count(), 1, "{err}");
}

/// A `blockguard serve VOL --socket SOCK` whose stderr is a pipe; killed if still running
/// when dropped.
struct PipedServer {
    child: std::process::Child,
    socket: std::path::PathBuf,
}

impl PipedServer {
    /// Starts the server and waits for its greeting.
    fn start(vol: &std::path::Path, log_level: &str) -> PipedServer {
        let socket = vol.with_extension("sock");
        let child = std::process::Command::new(BIN)
            .arg("serve")
            .arg(vol)
            .arg("--socket")
            .arg(&socket)
            .env("BLOCKGUARD_LOG", log_level)
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::piped())
            .spawn()
            .expect("start blockguard serve");
        let server = PipedServer { child, socket };
        let deadline = std::time::Instant::now() + Duration::from_secs(20);
        loop {
            let mut greeting = [0u8; 18];
            let ready = UnixStream::connect(&server.socket)
                .and_then(|mut s| std::io::Read::read_exact(&mut s, &mut greeting));
            if ready.is_ok() {
                return server;
            }
            assert!(std::time::Instant::now() < deadline, "server not ready");
            std::thread::sleep(Duration::from_millis(20));
        }
    }
}

impl Drop for PipedServer {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Sends `sig` and waits (bounded) for the exit status.
fn stop_within(child: &mut std::process::Child, sig: &str, limit: Duration) -> std::process::ExitStatus {
    run("kill", &[&format!("-{sig}"), &child.id().to_string()]);
    let deadline = std::time::Instant::now() + limit;
    loop {
        if let Some(status) = child.try_wait().unwrap() {
            return status;
        }
        if std::time::Instant::now() > deadline {
            let _ = child.kill();
            let _ = child.wait();
            panic!("server did not stop within {limit:?} of SIG{sig}");
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

fn one_client_round_trip(socket: &std::path::Path, at: u64) {
    let s = UnixStream::connect(socket).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    let mut c = Client::handshake(s, &ClientOptions::default()).expect("handshake");
    let data = random_bytes(4096, at);
    assert_eq!(c.write(at, &data, proto::CMD_FLAG_FUA).unwrap(), 0);
    assert_eq!(c.read(at, 4096).unwrap().unwrap(), data);
    c.disconnect().unwrap();
}

/// Regression: with stderr's reader gone, a failed log write panicked the signal thread
/// (which logged before starting the shutdown), so SIGINT and SIGTERM no longer stopped the
/// server, and connections hung.
#[test]
fn signals_stop_the_server_when_its_stderr_is_closed() {
    for sig in ["TERM", "INT"] {
        let dir = tempfile::tempdir().unwrap();
        let vol = make_volume(dir.path(), "v.bgv", "8M");
        let mut srv = PipedServer::start(&vol, "debug");
        drop(srv.child.stderr.take());
        for i in 0..20 {
            one_client_round_trip(&srv.socket, i * 4096);
        }
        let status = stop_within(&mut srv.child, sig, Duration::from_secs(10));
        assert!(status.success(), "SIG{sig}: exit status {status}");
        let info = String::from_utf8_lossy(&run(BIN, &["info", vol.to_str().unwrap()]).stdout).into_owned();
        assert!(info.contains("state:         clean"), "SIG{sig}: {info}");
    }
}

/// With stderr a pipe nobody reads (full after 64 KiB), logging must not block anything:
/// clients keep being served and a signal still stops the server at once.
#[test]
fn signals_stop_the_server_when_its_stderr_is_full() {
    let dir = tempfile::tempdir().unwrap();
    let vol = make_volume(dir.path(), "v.bgv", "8M");
    let mut srv = PipedServer::start(&vol, "debug");
    let start = std::time::Instant::now();
    // Each client logs a few lines of ~150 bytes: far more than the pipe holds.
    for i in 0..600 {
        one_client_round_trip(&srv.socket, (i % 2048) * 4096);
    }
    assert!(
        start.elapsed() < Duration::from_secs(30),
        "clients were slowed down"
    );
    let status = stop_within(&mut srv.child, "TERM", Duration::from_secs(10));
    assert!(status.success(), "exit status {status}");
}

/// Detaches a loop device on drop.
struct LoopDev(String);

impl LoopDev {
    fn attach(target: &std::path::Path) -> Option<LoopDev> {
        let out = std::process::Command::new("losetup")
            .args(["--find", "--show"])
            .arg(target)
            .output()
            .ok()?;
        if !out.status.success() {
            eprintln!(
                "skipped: losetup: {}",
                String::from_utf8_lossy(&out.stderr).trim()
            );
            return None;
        }
        Some(LoopDev(String::from_utf8_lossy(&out.stdout).trim().to_string()))
    }
}

impl Drop for LoopDev {
    fn drop(&mut self) {
        let _ = std::process::Command::new("losetup")
            .args(["--detach", &self.0])
            .status();
    }
}

/// A loop device over a loop device over the volume's file is the same storage under a third
/// name: while the file is served, serving either device is refused (two writers corrupt it).
#[test]
fn a_volume_served_is_locked_through_stacked_loop_devices() {
    if !nix_is_root() {
        eprintln!("skipped: loop devices need root");
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let vol = make_volume(dir.path(), "v.bgv", "8M");
    let Some(lower) = LoopDev::attach(&vol) else {
        return;
    };
    let Some(upper) = LoopDev::attach(std::path::Path::new(&lower.0)) else {
        return;
    };
    let srv = Served::start(&vol, &[]);
    for dev in [&upper.0, &lower.0] {
        let sock = dir.path().join("other.sock");
        let out = run_any(BIN, &["serve", dev, "--socket", sock.to_str().unwrap()]);
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(!out.status.success(), "{dev} served alongside {}", vol.display());
        assert!(err.contains("in use"), "{dev}: {err}");
    }
    drop(srv);
    drop(upper);
}

fn nix_is_root() -> bool {
    use std::os::unix::fs::MetadataExt;
    std::fs::metadata("/proc/self").is_ok_and(|m| m.uid() == 0)
}
