//! `blockguard scrub` and `blockguard status`, run for real: on an idle volume (opened
//! directly), and on a volume `serve` holds (through its control socket) while a real NBD
//! client writes to it; a busy volume without a control socket; hostile control requests.

mod nbd_support;

use nbd_support::*;
use serde_json::Value;
use std::io::{BufRead, BufReader, Read, Write};
use std::os::unix::fs::PermissionsExt;
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};

const BS: u64 = 4096;

fn json(out: &Output) -> Value {
    serde_json::from_slice(&out.stdout).unwrap_or_else(|e| {
        panic!(
            "bad JSON ({e}):\n{}\nstderr: {}",
            stdout(out),
            String::from_utf8_lossy(&out.stderr)
        )
    })
}

fn s(p: &Path) -> &str {
    p.to_str().unwrap()
}

/// The control socket next to `volume`.
fn ctl(volume: &Path) -> PathBuf {
    PathBuf::from(format!("{}.ctl", volume.canonicalize().unwrap().display()))
}

/// A volume of `mib` MiB whose first `written_mib` MiB hold random data (imported).
fn written_volume(dir: &Path, mib: u64, written_mib: u64) -> PathBuf {
    let raw = dir.join("src.raw");
    let mut data = random_bytes((written_mib << 20) as usize, 7);
    data.resize((mib << 20) as usize, 0);
    std::fs::write(&raw, &data).unwrap();
    let vol = make_volume(dir, "v.bgv", &format!("{mib}M"));
    run(BIN, &["import", s(&raw), s(&vol), "--force"]);
    std::fs::remove_file(&raw).unwrap();
    vol
}

fn blocks_of(report: &Value) -> Vec<u64> {
    report["problems"]
        .as_array()
        .unwrap()
        .iter()
        .map(|p| p["block"].as_u64().unwrap())
        .collect()
}

#[test]
fn scrub_of_an_idle_volume_names_the_corrupt_blocks_and_exits_1() {
    let dir = tempfile::tempdir().unwrap();
    let vol = written_volume(dir.path(), 32, 8);
    let v = s(&vol);
    let clean = bg(&["scrub", v, "--json"]);
    assert_eq!(code(&clean), 0, "{}", String::from_utf8_lossy(&clean.stderr));
    let r = json(&clean);
    assert_eq!(r["via"], "direct");
    assert_eq!(r["clean"], true);
    assert_eq!(r["blocks_checked"], 2048, "{r}");
    assert_eq!(r["position"], 32 << 20);

    let bad = [3u64, 700, 701, 2047];
    for b in bad {
        flip_byte(&vol, data_block_offset(&vol, b) + 99);
    }
    let out = bg(&["scrub", v, "--json"]);
    assert_eq!(code(&out), 1, "{}", String::from_utf8_lossy(&out.stderr));
    let r = json(&out);
    assert_eq!(blocks_of(&r), bad);
    assert_eq!(r["problem_count"], 4);
    assert_eq!(r["clean"], false);
    assert_eq!(r["stopped"], false);
    for p in r["problems"].as_array().unwrap() {
        assert_eq!(p["kind"], "corrupt");
        let detail = p["detail"].as_str().unwrap();
        assert!(
            detail.contains(&format!("block {}", p["block"])) && detail.contains("expected tag"),
            "{detail}"
        );
    }
    // Text output lists every block; --repair cannot fix a volume with one copy: still 1.
    let text = bg(&["scrub", v, "--repair"]);
    assert_eq!(code(&text), 1);
    for b in bad {
        assert!(
            stdout(&text).contains(&format!("bad block {b} (corrupt)")),
            "{}",
            stdout(&text)
        );
    }
    assert!(stdout(&text).contains("4 bad, 0 repaired"), "{}", stdout(&text));
    // The last scrub is recorded next to the volume, and status shows it.
    assert!(Path::new(&format!("{}.scrub", vol.canonicalize().unwrap().display())).exists());
    let st = bg(&["status", v, "--json"]);
    assert_eq!(code(&st), 0);
    let st = json(&st);
    assert!(st["server"].is_null());
    assert_eq!(st["state"], "clean");
    assert_eq!(st["scrub"]["last"]["problem_count"], 4);
    assert!(st["scrub"]["resume_from"].is_null());
    // Errors: exit 2.
    let missing = bg(&["scrub", s(&dir.path().join("nope.bgv"))]);
    assert_eq!(code(&missing), 2);
    assert!(String::from_utf8_lossy(&missing.stderr).contains("nope.bgv"));
    let bad_rate = bg(&["scrub", v, "--rate", "-3"]);
    assert_eq!(code(&bad_rate), 2);
}

/// Starts `blockguard args…` in the background.
fn spawn(args: &[&str]) -> Child {
    Command::new(BIN)
        .args(args)
        .env("BLOCKGUARD_LOG", "warn")
        .env("NO_COLOR", "1")
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("start blockguard")
}

/// Interrupts a running `blockguard` after `after` and collects its output.
fn interrupt(child: Child, after: Duration) -> Output {
    std::thread::sleep(after);
    run("kill", &["-INT", &child.id().to_string()]);
    let out = child.wait_with_output().unwrap();
    assert!(!String::from_utf8_lossy(&out.stderr).contains("panicked"));
    out
}

#[test]
fn an_interrupted_direct_scrub_resumes_where_it_stopped() {
    let dir = tempfile::tempdir().unwrap();
    let vol = written_volume(dir.path(), 16, 16);
    let v = s(&vol);
    // 16 MiB at 2 MB/s: about 8 s; interrupted after 1.5 s.
    let first = interrupt(
        spawn(&["scrub", v, "--rate", "2", "--json"]),
        Duration::from_millis(1500),
    );
    assert_eq!(code(&first), 0, "{}", String::from_utf8_lossy(&first.stderr));
    let r1 = json(&first);
    assert_eq!(r1["stopped"], true, "{r1}");
    let stopped_at = r1["position"].as_u64().unwrap();
    assert!(stopped_at > 0 && stopped_at < 16 << 20, "{r1}");
    assert!(stdout(&first).contains("\"resumed\": false"));

    let status = json(&bg(&["status", v, "--json"]));
    assert_eq!(status["scrub"]["resume_from"], stopped_at);

    let second = bg(&["scrub", v, "--resume", "--json"]);
    assert_eq!(code(&second), 0);
    let r2 = json(&second);
    assert_eq!(r2["resumed"], true);
    assert_eq!(r2["start"], stopped_at);
    assert_eq!(r2["stopped"], false);
    // Between them, every block exactly once.
    assert_eq!(
        r1["blocks_checked"].as_u64().unwrap() + r2["blocks_checked"].as_u64().unwrap(),
        (16 << 20) / BS
    );
    // A finished scrub leaves nothing to resume: --resume starts over, and says so.
    let third = bg(&["scrub", v, "--resume", "--json"]);
    assert_eq!(json(&third)["start"], 0);
    assert!(String::from_utf8_lossy(&third.stderr).contains("no stopped scrub"));
    // A state file left by another volume at the same path is not believed.
    let state = PathBuf::from(format!("{}.scrub", vol.canonicalize().unwrap().display()));
    let mut saved: Value = serde_json::from_slice(&std::fs::read(&state).unwrap()).unwrap();
    saved["uuid"] = "00000000-0000-0000-0000-000000000000".into();
    saved["resume_from"] = 4096.into();
    std::fs::write(&state, saved.to_string()).unwrap();
    let fourth = bg(&["scrub", v, "--resume", "--json"]);
    assert_eq!(json(&fourth)["start"], 0);
    let err = String::from_utf8_lossy(&fourth.stderr);
    assert!(
        err.contains("ignoring the scrub state file") && err.contains("belongs to volume"),
        "{err}"
    );
}

#[test]
fn status_and_scrub_of_a_served_volume_go_through_its_control_socket_while_a_client_writes() {
    require("qemu-io");
    let dir = tempfile::tempdir().unwrap();
    let vol = written_volume(dir.path(), 64, 64);
    let v = s(&vol);
    let srv = Served::start(&vol, &["--stage-size", "1M"]);
    let socket = ctl(&vol);
    assert!(socket.exists(), "no control socket at {}", socket.display());
    let mode = std::fs::metadata(&socket).unwrap().permissions().mode() & 0o777;
    assert_eq!(mode, 0o600, "control socket mode {mode:o}");

    let writer = Writer::start(srv.uri());
    let mut scrubs = 0;
    let deadline = Instant::now() + Duration::from_secs(4);
    while Instant::now() < deadline || scrubs < 3 {
        let out = bg(&["scrub", v, "--json"]);
        assert_eq!(
            code(&out),
            0,
            "{}\n{}",
            stdout(&out),
            String::from_utf8_lossy(&out.stderr)
        );
        let r = json(&out);
        assert_eq!(r["via"], "control-socket");
        assert_eq!(r["problem_count"], 0, "false errors while a client writes: {r}");
        assert_eq!(r["position"], 64 << 20);
        scrubs += 1;
    }
    let st = bg(&["status", v, "--json"]);
    assert_eq!(code(&st), 0);
    let st = json(&st);
    assert_eq!(st["protocol"], 1);
    assert_eq!(st["server"]["kind"], "serve");
    assert_eq!(st["server"]["pid"], srv.child.as_ref().unwrap().id());
    assert!(st["server"]["connections_total"].as_u64().unwrap() >= 1, "{st}");
    assert_eq!(st["size"], 64 << 20);
    assert_eq!(st["read_only"], false);
    assert!(st["failed"].is_null());
    assert!(st["stats"]["flush_calls"].as_u64().unwrap() > 0, "{st}");
    assert_eq!(st["scrub"]["last"]["problem_count"], 0);
    let text = bg(&["status", v]);
    assert!(
        stdout(&text).contains("blockguard serve (pid"),
        "{}",
        stdout(&text)
    );
    assert!(stdout(&text).contains("health:     ok"));
    let rounds = writer.finish();
    eprintln!("{scrubs} scrubs during {rounds} rounds of qemu-io writes");
    assert!(rounds >= 1, "qemu-io never completed a round");
    assert!(!srv.log_text().contains("panicked"));
}

#[test]
fn a_socket_scrub_is_stopped_by_ctrl_c_and_resumed_by_the_server() {
    let dir = tempfile::tempdir().unwrap();
    let vol = written_volume(dir.path(), 16, 16);
    let v = s(&vol);
    let mut srv = Served::start(&vol, &[]);
    let first = interrupt(
        spawn(&["scrub", v, "--rate", "2", "--json"]),
        Duration::from_millis(1500),
    );
    assert_eq!(code(&first), 0, "{}", String::from_utf8_lossy(&first.stderr));
    let r1 = json(&first);
    assert_eq!(r1["via"], "control-socket");
    assert_eq!(r1["stopped"], true, "{r1}");
    let at = r1["position"].as_u64().unwrap();
    assert!(at > 0 && at < 16 << 20);
    let st = json(&bg(&["status", v, "--json"]));
    assert_eq!(st["scrub"]["running"], false);
    assert_eq!(st["scrub"]["resume_from"], at);
    let r2 = json(&bg(&["scrub", v, "--resume", "--json"]));
    assert_eq!(
        (r2["resumed"].clone(), r2["start"].clone()),
        (Value::from(true), Value::from(at))
    );
    assert_eq!(
        r1["blocks_checked"].as_u64().unwrap() + r2["blocks_checked"].as_u64().unwrap(),
        (16 << 20) / BS
    );
    // A scrub running when the server stops is stopped, and its position kept in the state
    // file, for a direct --resume once the server is gone.
    let mut c = control(&vol);
    send(&mut c, r#"{"cmd":"scrub","rate":1000000,"follow":false}"#);
    assert_eq!(recv(&mut c)["type"], "scrub-started");
    std::thread::sleep(Duration::from_millis(1200));
    assert!(srv.signal("TERM").success());
    assert!(!ctl(&vol).exists(), "the control socket outlived the server");
    let r3 = json(&bg(&["scrub", v, "--resume", "--json"]));
    assert_eq!(r3["via"], "direct");
    assert_eq!(r3["resumed"], true);
    assert!(r3["start"].as_u64().unwrap() > 0, "{r3}");
}

#[test]
fn a_busy_volume_without_a_control_socket_is_an_error_naming_its_process() {
    let dir = tempfile::tempdir().unwrap();
    let vol = make_volume(dir.path(), "v.bgv", "16M");
    let v = s(&vol);
    let srv = Served::start(&vol, &["--no-control"]);
    assert!(!ctl(&vol).exists());
    let pid = srv.child.as_ref().unwrap().id();
    for cmd in ["status", "scrub"] {
        let out = bg(&[cmd, v]);
        assert_eq!(code(&out), 2, "{cmd}");
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(
            err.contains(&format!("in use by process {pid} (")),
            "{cmd}: {err}"
        );
        assert!(
            err.contains("serve") && err.contains("--no-control"),
            "{cmd}: {err}"
        );
        assert!(err.contains("control socket"), "{cmd}: {err}");
    }
    // A --control path that another volume's server answers on: refused, naming both.
    let other = make_volume(dir.path(), "w.bgv", "16M");
    let _other_srv = Served::start(&other, &[]);
    let out = bg(&["scrub", v, "--control", s(&ctl(&other))]);
    assert_eq!(code(&out), 2);
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("serves") && err.contains("w.bgv, not") && err.contains("v.bgv"),
        "{err}"
    );
    // A --control path that nobody answers on: the same error, pointing at that path.
    let out = bg(&["status", v, "--control", s(&dir.path().join("elsewhere.ctl"))]);
    assert_eq!(code(&out), 2);
    assert!(String::from_utf8_lossy(&out.stderr).contains("elsewhere.ctl"));
}

/// A raw connection to `volume`'s control socket.
fn control(volume: &Path) -> BufReader<UnixStream> {
    let c = UnixStream::connect(ctl(volume)).expect("connect to the control socket");
    c.set_read_timeout(Some(Duration::from_secs(20))).unwrap();
    BufReader::new(c)
}

fn send(c: &mut BufReader<UnixStream>, line: &str) {
    c.get_mut().write_all(format!("{line}\n").as_bytes()).unwrap();
}

fn recv(c: &mut BufReader<UnixStream>) -> Value {
    let mut line = String::new();
    c.read_line(&mut line).expect("a reply line");
    serde_json::from_str(&line).unwrap_or_else(|e| panic!("bad reply ({e}): {line:?}"))
}

fn error_kind(reply: &Value) -> &str {
    assert_eq!(reply["type"], "error", "{reply}");
    assert!(!reply["message"].as_str().unwrap().is_empty());
    reply["kind"].as_str().unwrap()
}

#[test]
fn malformed_and_hostile_control_requests_get_clear_errors() {
    let dir = tempfile::tempdir().unwrap();
    // Written, so that a slow scrub has something to read for a while.
    let vol = written_volume(dir.path(), 16, 16);
    let srv = Served::start(&vol, &[]);
    let mut c = control(&vol);
    for (line, kind) in [
        ("garbage", "bad-request"),
        ("[1,2,3]", "bad-request"),
        (r#"{"command":"status"}"#, "bad-request"),
        (r#"{"cmd":"scrub","rate":"fast"}"#, "bad-request"),
        (r#"{"cmd":"scrub","rate":0}"#, "bad-request"),
        (r#"{"cmd":"scrub","unknown":1}"#, "bad-request"),
        (r#"{"cmd":"status""#, "bad-request"),
        (r#"{"cmd":"mirror","action":"add"}"#, "unknown-command"),
        (r#"{"cmd":null}"#, "unknown-command"),
    ] {
        send(&mut c, line);
        assert_eq!(error_kind(&recv(&mut c)), kind, "{line}");
    }
    // At most 16 control clients at once: with this one and 15 more (each admitted: it got a
    // reply), the 17th is told so and closed.
    let held: Vec<_> = (0..15)
        .map(|_| {
            let mut h = control(&vol);
            send(&mut h, r#"{"cmd":"scrub-status"}"#);
            assert_eq!(recv(&mut h)["type"], "scrub-status");
            h
        })
        .collect();
    // Told at once, before it says anything.
    let mut extra = control(&vol);
    assert_eq!(error_kind(&recv(&mut extra)), "too-many-clients");
    drop(held);
    // Once they are gone, new clients get in again.
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let mut again = control(&vol);
        send(&mut again, r#"{"cmd":"status"}"#);
        if recv(&mut again)["type"] == "status" {
            break;
        }
        assert!(Instant::now() < deadline, "control clients never freed");
        std::thread::sleep(Duration::from_millis(50));
    }

    // Bytes that are not UTF-8, and blank lines (ignored).
    c.get_mut().write_all(b"\xff\xfe{}\n\n  \n").unwrap();
    assert_eq!(error_kind(&recv(&mut c)), "bad-request");
    // The connection still works after all that.
    send(&mut c, r#"{"cmd":"status"}"#);
    assert_eq!(recv(&mut c)["type"], "status");
    send(&mut c, r#"{"cmd":"scrub-stop"}"#);
    assert_eq!(recv(&mut c)["was_running"], false);
    send(&mut c, r#"{"cmd":"scrub-status"}"#);
    assert_eq!(recv(&mut c)["running"], false);

    // A scrub while one runs: busy.
    send(&mut c, r#"{"cmd":"scrub","rate":100000,"follow":false}"#);
    assert_eq!(recv(&mut c)["type"], "scrub-started");
    let mut other = control(&vol);
    send(&mut other, r#"{"cmd":"scrub"}"#);
    assert_eq!(error_kind(&recv(&mut other)), "busy");
    send(&mut other, r#"{"cmd":"scrub-status"}"#);
    assert_eq!(recv(&mut other)["running"], true);
    send(&mut other, r#"{"cmd":"scrub-stop"}"#);
    let stopped = recv(&mut other);
    assert_eq!(stopped["type"], "scrub-stopped");
    assert_eq!(stopped["report"]["stopped"], true);

    // A line longer than 64 KiB: refused, and the connection closed.
    let mut long = control(&vol);
    long.get_mut().write_all(&vec![b'x'; 70 << 10]).unwrap();
    assert_eq!(error_kind(&recv(&mut long)), "too-long");
    let mut rest = Vec::new();
    let _ = long.read_to_end(&mut rest);

    drop(c);
    assert!(!srv.log_text().contains("panicked"), "{}", srv.log_text());
}

#[test]
fn only_the_owner_and_root_may_use_the_control_socket() {
    if !std::fs::metadata("/proc/self").is_ok_and(|m| std::os::unix::fs::MetadataExt::uid(&m) == 0) {
        eprintln!("skipped: needs root (to connect as another user)");
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    std::fs::set_permissions(dir.path(), std::fs::Permissions::from_mode(0o755)).unwrap();
    let vol = make_volume(dir.path(), "v.bgv", "16M");
    let _srv = Served::start(&vol, &[]);
    let socket = ctl(&vol);
    // Even with the file mode opened up, the peer's credentials are checked.
    std::fs::set_permissions(&socket, std::fs::Permissions::from_mode(0o666)).unwrap();
    // The client: this very binary, copied where user nobody can run it.
    let client = dir.path().join("blockguard");
    std::fs::copy(BIN, &client).unwrap();
    let out = run_any(
        "setpriv",
        &[
            "--reuid=65534",
            "--regid=65534",
            "--clear-groups",
            s(&client),
            "status",
            s(&vol),
            "--control",
            s(&socket),
        ],
    );
    assert_eq!(code(&out), 2);
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("only user 0 (the server's) and root may use this control socket"),
        "{err}"
    );
}

#[test]
fn the_control_socket_is_replaced_when_stale_and_refused_when_live() {
    let dir = tempfile::tempdir().unwrap();
    let vol = make_volume(dir.path(), "v.bgv", "16M");
    let mut srv = Served::start(&vol, &[]);
    // Killed: the socket file stays behind, stale.
    srv.child.as_mut().unwrap().kill().unwrap();
    srv.child.as_mut().unwrap().wait().unwrap();
    srv.child = None;
    assert!(ctl(&vol).exists());
    let mut srv = Served::start(&vol, &[]);
    let st = json(&bg(&["status", s(&vol), "--json"]));
    assert_eq!(st["server"]["pid"], srv.child.as_ref().unwrap().id());
    // Another volume's server asked to listen on the same control socket: refused.
    let other = make_volume(dir.path(), "w.bgv", "16M");
    let nbd = dir.path().join("w.sock");
    let serve_other =
        |control: &Path| bg(&["serve", s(&other), "--socket", s(&nbd), "--control", s(control)]);
    let out = serve_other(&ctl(&vol));
    assert_eq!(code(&out), 2);
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("another server answers on the control socket"),
        "{err}"
    );
    // Something that is not a socket is never replaced.
    let file = dir.path().join("plain");
    std::fs::write(&file, b"keep me").unwrap();
    let out = serve_other(&file);
    assert_eq!(code(&out), 2);
    assert!(String::from_utf8_lossy(&out.stderr).contains("is not a socket"));
    assert_eq!(std::fs::read(&file).unwrap(), b"keep me");
    // A clean stop removes the socket; the server's status is what status shows meanwhile.
    assert!(srv.signal("TERM").success());
    assert!(!ctl(&vol).exists());
}
