//! The client side of the control socket (review 10): whom `status` and `scrub` believe (a
//! socket or a scrub state file planted by another user is not), how long they wait for a
//! server that does not answer, and what `status` says about a degraded set.

mod nbd_support;

use nbd_support::*;
use serde_json::Value;
use std::io::{BufRead, BufReader, Write};
use std::os::unix::fs::PermissionsExt;
use std::os::unix::net::UnixListener;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

fn s(p: &Path) -> &str {
    p.to_str().unwrap()
}

/// True if the test runs as root; otherwise says it is skipped, and why it needs root.
fn root_for(why: &str) -> bool {
    let root = std::fs::metadata("/proc/self").is_ok_and(|m| std::os::unix::fs::MetadataExt::uid(&m) == 0);
    if !root {
        eprintln!("skipped: needs root ({why})");
    }
    root
}

/// `<canonical volume path>.EXT`.
fn sidecar(volume: &Path, ext: &str) -> PathBuf {
    PathBuf::from(format!("{}.{ext}", volume.canonicalize().unwrap().display()))
}

/// A temp directory anyone may create files in (sticky, like /var/tmp).
fn shared_dir() -> tempfile::TempDir {
    let dir = tempfile::tempdir().unwrap();
    std::fs::set_permissions(dir.path(), std::fs::Permissions::from_mode(0o1777)).unwrap();
    dir
}

/// A 16 MiB volume full of data, with block 3000 damaged.
fn damaged_volume(dir: &Path) -> PathBuf {
    let vol = make_volume(dir, "v.bgv", "16M");
    let raw = dir.join("d.raw");
    std::fs::write(&raw, random_bytes(16 << 20, 5)).unwrap();
    run(BIN, &["import", s(&raw), s(&vol), "--force"]);
    flip_byte(&vol, data_block_offset(&vol, 3000) + 9);
    vol
}

/// Not a test of its own: the fake control server that
/// `regression_a_control_socket_of_another_user_is_not_believed` runs as user nobody. It
/// answers `status` with the reply in `$FAKE_STATUS` and every scrub with a clean report.
#[test]
#[ignore = "a helper that another test runs as another user"]
fn fake_control_server() {
    let (Ok(socket), Ok(status)) = (std::env::var("FAKE_SOCKET"), std::env::var("FAKE_STATUS")) else {
        return;
    };
    let listener = UnixListener::bind(&socket).unwrap();
    std::fs::set_permissions(&socket, std::fs::Permissions::from_mode(0o777)).unwrap();
    for conn in listener.incoming() {
        let Ok(mut out) = conn else { continue };
        let status = status.clone();
        std::thread::spawn(move || {
            let reader = BufReader::new(out.try_clone().unwrap());
            for line in reader.lines() {
                let Ok(line) = line else { return };
                let reply = if line.contains("\"status\"") {
                    format!("{status}\n")
                } else if line.contains("\"scrub\"") {
                    let report = r#"{"volume":"v.bgv","start":0,"end":16777216,"position":16777216,"stopped":false,"blocks_checked":4096,"bytes_read":16777216,"problems":[],"problem_count":0,"repaired":0,"repair_requested":true,"elapsed_secs":0.1}"#;
                    format!(
                        "{{\"type\":\"scrub-started\",\"start\":0,\"end\":16777216,\"resumed\":false}}\n{{\"type\":\"scrub-done\",\"report\":{report}}}\n"
                    )
                } else {
                    continue;
                };
                if out.write_all(reply.as_bytes()).is_err() {
                    return;
                }
            }
        });
    }
}

/// Starts [`fake_control_server`] as user nobody on `socket`, answering `status` with the real
/// status of `volume` dressed up as a server's.
fn start_fake_server(dir: &Path, volume: &Path, socket: &Path) -> std::process::Child {
    let mut st: Value = serde_json::from_slice(&run(BIN, &["status", s(volume), "--json"]).stdout).unwrap();
    st["type"] = "status".into();
    st["protocol"] = 1.into();
    st["server"] = serde_json::json!({"kind":"serve","pid":1,"control":s(socket),
        "serving":"pwned by uid 65534","connections":0,"connections_total":0,"uptime_secs":1});
    // The helper is this test binary, copied where user nobody can run it.
    let exe = dir.join("fake-server");
    std::fs::copy(std::env::current_exe().unwrap(), &exe).unwrap();
    std::fs::set_permissions(&exe, std::fs::Permissions::from_mode(0o755)).unwrap();
    let child = Command::new("setpriv")
        .args(["--reuid=65534", "--regid=65534", "--clear-groups", s(&exe)])
        .args(["fake_control_server", "--exact", "--ignored", "--test-threads=1"])
        .env("FAKE_SOCKET", socket)
        .env("FAKE_STATUS", st.to_string())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .expect("start the fake server");
    let deadline = Instant::now() + Duration::from_secs(20);
    while !socket.exists() {
        assert!(
            Instant::now() < deadline,
            "the fake server never bound its socket"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
    child
}

#[test]
fn regression_a_control_socket_of_another_user_is_not_believed() {
    if !root_for("to run a server as another user") {
        return;
    }
    let dir = shared_dir();
    let vol = damaged_volume(dir.path());
    let v = s(&vol);
    let mut fake = start_fake_server(dir.path(), &vol, &sidecar(&vol, "ctl"));

    // The volume is not served: status and scrub open it themselves, saying why they did not
    // use the socket.
    let out = bg(&["status", v]);
    expect_exit(&out, 0);
    assert!(!stdout(&out).contains("pwned"), "{}", stdout(&out));
    assert!(stdout(&out).contains("server:     none"), "{}", stdout(&out));
    assert!(stderr(&out).contains("65534"), "{}", stderr(&out));
    let out = bg(&["scrub", v, "--repair", "--json"]);
    expect_exit(&out, 1);
    let r: Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(r["via"], "direct", "{r}");
    assert_eq!(r["problems"][0]["block"], 3000, "{r}");
    // Named with --control, it is an error.
    let out = bg(&["status", v, "--control", s(&sidecar(&vol, "ctl"))]);
    expect_exit(&out, 2);
    assert!(stderr(&out).contains("65534"), "{}", stderr(&out));
    // The socket file given to root: the server's credentials still give it away.
    std::os::unix::fs::chown(sidecar(&vol, "ctl"), Some(0), Some(0)).unwrap();
    let out = bg(&["status", v]);
    expect_exit(&out, 0);
    assert!(!stdout(&out).contains("pwned"), "{}", stdout(&out));
    assert!(stderr(&out).contains("runs as user 65534"), "{}", stderr(&out));
    fake.kill().unwrap();
    fake.wait().unwrap();
}

#[test]
fn regression_a_control_socket_file_of_another_user_is_not_used() {
    if !root_for("to give a socket to another user") {
        return;
    }
    let dir = shared_dir();
    let vol = make_volume(dir.path(), "v.bgv", "16M");
    let _srv = Served::start(&vol, &[]);
    let socket = sidecar(&vol, "ctl");
    // The real server's socket, given away: whoever owns it could have bound it.
    std::os::unix::fs::chown(&socket, Some(65534), Some(65534)).unwrap();
    let out = bg(&["status", s(&vol)]);
    expect_exit(&out, 2);
    let e = stderr(&out);
    assert!(e.contains("owned by") && e.contains("65534"), "{e}");
    std::os::unix::fs::chown(&socket, Some(0), Some(0)).unwrap();
    expect_exit(&bg(&["status", s(&vol)]), 0);
}

#[test]
fn regression_a_scrub_state_file_of_another_user_is_ignored() {
    if !root_for("to give a file to another user") {
        return;
    }
    let dir = shared_dir();
    let vol = damaged_volume(dir.path());
    let v = s(&vol);
    let uuid = serde_json::from_slice::<Value>(&run(BIN, &["info", v, "--json"]).stdout).unwrap()["uuid"]
        .as_str()
        .unwrap()
        .to_string();
    let forged = serde_json::json!({"version":1,"uuid":uuid,"ended":1,"resume_from":16773120,
        "report":{"volume":"v.bgv","start":0,"end":16777216,"position":16773120,"stopped":true,
        "blocks_checked":4095,"bytes_read":16773120,"problems":[],"problem_count":0,"repaired":0,
        "repair_requested":false,"elapsed_secs":3.0}});
    let state = sidecar(&vol, "scrub");
    for (owner, mode) in [(65534, 0o644), (0, 0o666)] {
        std::fs::write(&state, forged.to_string()).unwrap();
        std::os::unix::fs::chown(&state, Some(owner), Some(owner)).unwrap();
        std::fs::set_permissions(&state, std::fs::Permissions::from_mode(mode)).unwrap();
        let out = bg(&["status", v]);
        expect_exit(&out, 0);
        assert!(
            stdout(&out).contains("last scrub: none recorded"),
            "{}",
            stdout(&out)
        );
        assert!(
            stderr(&out).contains("ignoring the scrub state file"),
            "{}",
            stderr(&out)
        );
        let out = bg(&["scrub", v, "--resume", "--json"]);
        expect_exit(&out, 1);
        let r: Value = serde_json::from_slice(&out.stdout).unwrap();
        assert_eq!(r["resumed"], false, "{r}");
        assert_eq!(r["problems"][0]["block"], 3000, "{r}");
    }
    // The file this scrub wrote is ours again, and believed.
    let out = bg(&["status", v]);
    assert!(stdout(&out).contains("1 bad"), "{}", stdout(&out));
}

#[test]
fn regression_status_and_scrub_give_up_on_a_stopped_server_and_ctrl_c_stops_them() {
    let dir = tempfile::tempdir().unwrap();
    let vol = make_volume(dir.path(), "v.bgv", "16M");
    let v = s(&vol);
    let mut srv = Served::start(&vol, &[]);
    let pid = srv.child.as_ref().unwrap().id().to_string();
    run("kill", &["-STOP", &pid]);
    let started = Instant::now();
    let out = bg(&["status", v]);
    let took = started.elapsed();
    expect_exit(&out, 2);
    let e = stderr(&out);
    assert!(e.contains("does not answer") && e.contains(&pid), "{e}");
    assert!(took < Duration::from_secs(15), "status took {took:?}");
    // Ctrl-C while scrub waits for the server: it stops at once.
    let child = Command::new(BIN)
        .args(["scrub", v])
        .env("BLOCKGUARD_LOG", "warn")
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    std::thread::sleep(Duration::from_millis(1000));
    let sent = Instant::now();
    run("kill", &["-INT", &child.id().to_string()]);
    let out = child.wait_with_output().unwrap();
    assert!(
        sent.elapsed() < Duration::from_secs(3),
        "scrub took {:?} after SIGINT",
        sent.elapsed()
    );
    assert_eq!(out.status.code(), Some(130), "{}", stderr(&out));
    run("kill", &["-CONT", &pid]);
    expect_exit(&bg(&["status", v]), 0);
    assert!(srv.signal("TERM").success());
}

#[test]
fn regression_a_silent_listener_does_not_hang_status_or_scrub() {
    let dir = tempfile::tempdir().unwrap();
    let vol = make_volume(dir.path(), "v.bgv", "16M");
    let socket = sidecar(&vol, "ctl");
    // Accepts, never answers.
    let listener = UnixListener::bind(&socket).unwrap();
    let held = std::thread::spawn(move || {
        let mut conns = Vec::new();
        for c in listener.incoming().take(2) {
            conns.push(c.unwrap());
        }
        std::thread::sleep(Duration::from_secs(30));
    });
    for args in [vec!["status", s(&vol)], vec!["scrub", s(&vol)]] {
        let started = Instant::now();
        let out = bg(&args);
        assert!(
            started.elapsed() < Duration::from_secs(15),
            "{args:?} took {:?}",
            started.elapsed()
        );
        expect_exit(&out, 2);
        assert!(stderr(&out).contains("does not answer"), "{}", stderr(&out));
    }
    drop(held);
}

#[test]
fn regression_status_of_a_served_set_with_a_missing_copy_says_degraded() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let m0 = d.join("m0.bgv");
    let m1 = d.join("m1.bgv");
    run(BIN, &["format", s(&m0), "--size", "16M", "--mirror", s(&m1)]);
    std::fs::rename(&m1, d.join("away.bgv")).unwrap();
    let mut srv = Served::start(&m0, &[]);
    let out = bg(&["status", s(&m0)]);
    expect_exit(&out, 0);
    let text = stdout(&out);
    assert!(text.contains("blockguard serve (pid"), "{text}");
    let health = text
        .lines()
        .find(|l| l.starts_with("health:"))
        .unwrap_or_default();
    let m1 = d.canonicalize().unwrap().join("m1.bgv");
    assert!(health.contains("degraded") && health.contains(s(&m1)), "{text}");
    let st: Value = serde_json::from_slice(&bg(&["status", s(&m0), "--json"]).stdout).unwrap();
    assert_eq!(st["health"]["state"], "degraded", "{st}");
    assert_eq!(st["copies"][1]["path"], s(&m1), "{st}");
    assert!(srv.signal("TERM").success());
}
