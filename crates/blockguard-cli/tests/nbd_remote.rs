//! Volumes and mirror copies on remote NBD exports, through the real binary, with real
//! servers started here and stopped by PID: a volume whose only copy is on `qemu-nbd`; a
//! local volume with a copy on `nbdkit file`, corruption on either side repaired from the
//! other; the remote killed mid-workload (writes go on, degraded), brought back, and
//! resynchronized in only the groups written meanwhile.

mod nbd_support;
#[path = "../../blockguard-backend/tests/common/servers.rs"]
mod servers;

use blockguard_nbd::proto;
use nbd_support::*;
use servers::Server;
use std::path::Path;
use std::time::{Duration, Instant};

#[test]
fn a_volume_whose_only_copy_is_on_qemu_nbd() {
    require("qemu-nbd");
    let dir = tempfile::tempdir().unwrap();
    let file = raw_file(dir.path(), "remote.raw", 16 << 20);
    let qemu = Server::qemu_nbd(&file, "disk");
    let uri = qemu.uri.clone();
    let out = bg(&["format", &uri, "--size", "8M"]);
    expect_exit(&out, 0);
    assert!(
        stdout(&out).contains(&format!("formatted {uri}")),
        "{}",
        stdout(&out)
    );
    // Formatting again is refused: the export holds a volume now.
    let again = bg(&["format", &uri, "--size", "8M"]);
    expect_exit(&again, 2);
    assert!(
        stderr(&again).contains("holds a blockguard volume"),
        "{}",
        stderr(&again)
    );

    let data = random_bytes(256 * BS as usize, 11);
    let ctl = dir.path().join("v.ctl");
    let ctl_s = ctl.to_str().unwrap();
    let mut srv = Served::start_in(Path::new(&uri), dir.path(), &["--control", ctl_s]);
    write_through(&srv, &data, 0);
    let back = srv
        .client()
        .read(0, data.len())
        .unwrap()
        .expect("read back through the server");
    assert!(back == data, "read back through the server");
    // status and scrub reach the served remote volume through its control socket.
    let status = bg(&["status", &uri, "--control", ctl_s]);
    expect_exit(&status, 0);
    assert!(stdout(&status).contains(&uri), "{}", stdout(&status));
    let scrub = bg(&["scrub", &uri, "--control", ctl_s]);
    expect_exit(&scrub, 0);
    assert!(stdout(&scrub).contains("0 bad"), "{}", stdout(&scrub));
    assert!(srv.signal("TERM").success(), "{}", srv.log_text());

    expect_exit(&bg(&["check", &uri]), 0);
    let image = dir.path().join("out.raw");
    expect_exit(&bg(&["export", &uri, image.to_str().unwrap()]), 0);
    assert!(
        std::fs::read(&image).unwrap()[..data.len()] == data[..],
        "exported image"
    );
    // The data really is on the remote file, where qemu-nbd put it.
    assert_eq!(block_of(&file, 17), data[17 * BS as usize..18 * BS as usize]);

    // Corruption of the remote file is caught (one copy: reported, not repairable).
    flip_byte(&file, geometry(&file).data_offset(17) + 99);
    let out = bg(&["check", &uri]);
    expect_exit(&out, 1);
    assert!(
        format!("{}{}", stdout(&out), stderr(&out)).contains("17"),
        "names block 17"
    );
}

#[test]
fn a_local_volume_with_a_copy_on_nbdkit_repairs_either_side_from_the_other() {
    require("nbdkit");
    let dir = tempfile::tempdir().unwrap();
    let remote = raw_file(dir.path(), "remote.raw", 16 << 20);
    let local = raw_file(dir.path(), "local.bgv", 16 << 20);
    let kit = Server::nbdkit(&dir.path().join("kit.sock"), &["file", remote.to_str().unwrap()]);
    let out = bg(&["format", local.to_str().unwrap(), "--force", "--mirror", &kit.uri]);
    expect_exit(&out, 0);
    assert!(
        stdout(&out).contains(&format!("copy 1: {}", kit.uri)),
        "{}",
        stdout(&out)
    );
    let data = random_bytes(128 * BS as usize, 5);
    let mut srv = Served::start(&local, &["--no-control"]);
    write_through(&srv, &data, 0);
    assert!(srv.signal("TERM").success(), "{}", srv.log_text());
    for b in [0, 10, 20, 127] {
        assert_eq!(
            block_of(&remote, b),
            block_of(&local, b),
            "block {b} on both copies"
        );
    }

    // Remote damaged: scrub repairs it from the local copy.
    flip_byte(&remote, geometry(&remote).data_offset(10) + 7);
    assert_ne!(block_of(&remote, 10), block_of(&local, 10));
    expect_exit(&bg(&["scrub", local.to_str().unwrap()]), 1);
    expect_exit(&bg(&["scrub", "--repair", local.to_str().unwrap()]), 0);
    assert_eq!(
        block_of(&remote, 10),
        data[10 * BS as usize..11 * BS as usize],
        "remote repaired"
    );
    // And back: local damaged, repaired from the remote copy.
    flip_byte(&local, geometry(&local).data_offset(20) + 7);
    expect_exit(&bg(&["scrub", "--repair", local.to_str().unwrap()]), 0);
    assert_eq!(
        block_of(&local, 20),
        data[20 * BS as usize..21 * BS as usize],
        "local repaired"
    );
    expect_exit(&bg(&["check", local.to_str().unwrap()]), 0);
    expect_exit(&bg(&["check", &kit.uri]), 0);
}

/// A local volume with a copy on `nbdkit file`, served with `extra` arguments; `nbdkit` is
/// killed while a client writes the first 64 blocks over and over (every write must succeed,
/// the copy going out of sync), then restarted. `resync` brings the copy back and returns its
/// report; then both copies are checked identical and as last written.
fn kill_the_remote_mid_workload(
    extra: &[&str],
    resync: impl FnOnce(&Path, &str, &Served) -> serde_json::Value,
) {
    require("nbdkit");
    let dir = tempfile::tempdir().unwrap();
    let remote = raw_file(dir.path(), "remote.raw", 32 << 20);
    let local = raw_file(dir.path(), "local.bgv", 32 << 20);
    let mut kit = Server::nbdkit(&dir.path().join("kit.sock"), &["file", remote.to_str().unwrap()]);
    expect_exit(
        &bg(&["format", local.to_str().unwrap(), "--force", "--mirror", &kit.uri]),
        0,
    );
    let groups = geometry(&local).groups;
    assert!(
        groups >= 6,
        "{groups} groups: too few to tell a partial resync from a full one"
    );
    let ctl = dir.path().join("v.ctl");
    let ctl_s = ctl.to_str().unwrap();
    let mut args = vec!["--control", ctl_s, "--nbd-timeout", "2"];
    args.extend_from_slice(extra);
    let mut srv = Served::start(&local, &args);
    // Every block written once, then a workload on the first 64 blocks while the remote dies.
    let mut model = random_bytes(1024 * BS as usize, 1);
    write_through(&srv, &model, 0);
    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let writer = {
        let stop = std::sync::Arc::clone(&stop);
        let socket = srv.socket.clone();
        let mut model = model.clone();
        std::thread::spawn(move || {
            let s = std::os::unix::net::UnixStream::connect(socket).unwrap();
            s.set_read_timeout(Some(Duration::from_secs(20))).unwrap();
            let mut c = blockguard_nbd::client::Client::handshake(s, &Default::default()).unwrap();
            let mut round = 0u64;
            while !stop.load(std::sync::atomic::Ordering::Relaxed) || round < 4 {
                round += 1;
                let chunk = random_bytes(64 * BS as usize, 100 + round);
                assert_eq!(
                    c.write(0, &chunk, proto::CMD_FLAG_FUA).unwrap(),
                    0,
                    "round {round}: a write failed"
                );
                model[..chunk.len()].copy_from_slice(&chunk);
            }
            model
        })
    };
    std::thread::sleep(Duration::from_millis(300));
    let pid = kit.pid();
    kit.kill();
    std::thread::sleep(Duration::from_millis(500));
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    model = writer
        .join()
        .unwrap_or_else(|_| panic!("writes failed after nbdkit (pid {pid:?}) was killed"));
    let list = bg(&["mirror", "list", local.to_str().unwrap(), "--control", ctl_s]);
    assert!(stdout(&list).contains("out of sync"), "{}", stdout(&list));

    kit.restart();
    let report = resync(&local, ctl_s, &srv);
    // The workload wrote blocks 0..1024, groups 0 to 2: their write-intent bits may still be
    // set when the copy fails (they clear lazily), so those are what may be copied, and
    // nothing of the rest of the volume.
    let copied = report["groups"]
        .as_u64()
        .unwrap_or_else(|| panic!("no group count in {report}"));
    let touched = geometry(&local).group_of(1023).0 + 1;
    assert!(
        (1..=touched).contains(&copied),
        "resync copied {copied} of {groups} groups: {report}"
    );
    let list = bg(&["mirror", "list", local.to_str().unwrap(), "--control", ctl_s]);
    assert!(!stdout(&list).contains("out of sync"), "{}", stdout(&list));
    // The volume takes writes again, on both copies (failed resync attempts while the remote
    // was still away did not stop it).
    let late = random_bytes(8 * BS as usize, 77);
    write_through(&srv, &late, 2000);
    assert!(srv.signal("TERM").success(), "{}", srv.log_text());
    assert_eq!(
        block_of(&remote, 2003),
        late[3 * BS as usize..4 * BS as usize],
        "a write after the resync reached the remote copy"
    );

    expect_exit(&bg(&["check", local.to_str().unwrap()]), 0);
    let (l, r) = (std::fs::read(&local).unwrap(), std::fs::read(&remote).unwrap());
    let g = geometry(&local);
    for b in 0..g.data_blocks {
        let at = g.data_offset(b) as usize;
        assert!(
            l[at..at + BS as usize] == r[at..at + BS as usize],
            "block {b} differs between the copies"
        );
        if b < 1024 {
            let m = &model[(b * BS) as usize..((b + 1) * BS) as usize];
            assert!(
                &l[at..at + BS as usize] == m,
                "block {b} is not what was written last"
            );
        }
    }
}

#[test]
fn the_remote_killed_mid_workload_degrades_and_mirror_resync_copies_only_what_changed() {
    kill_the_remote_mid_workload(&["--no-auto-resync"], |local, ctl, _| {
        // The client side reconnects after its backoff: resync until it gets through.
        let deadline = Instant::now() + Duration::from_secs(30);
        let report = loop {
            let out = bg(&[
                "mirror",
                "resync",
                local.to_str().unwrap(),
                "--control",
                ctl,
                "--json",
            ]);
            if code(&out) == 0 && !stdout(&out).contains("could not be resynchronized") {
                break stdout(&out);
            }
            assert!(
                Instant::now() < deadline,
                "resync never succeeded: {}{}",
                stdout(&out),
                stderr(&out)
            );
            std::thread::sleep(Duration::from_millis(500));
        };
        serde_json::from_str(&report).unwrap_or_else(|e| panic!("{e}: {report}"))
    });
}

#[test]
fn the_remote_killed_mid_workload_is_resynced_automatically_when_back() {
    kill_the_remote_mid_workload(&[], |local, ctl, srv| {
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            let list = bg(&["mirror", "list", local.to_str().unwrap(), "--control", ctl]);
            if !stdout(&list).contains("out of sync") {
                break;
            }
            assert!(
                Instant::now() < deadline,
                "not resynced automatically:\n{}",
                srv.log_text()
            );
            std::thread::sleep(Duration::from_millis(200));
        }
        // The server's log line of the automatic resync carries its group count (the log is
        // written by a queue: the line may follow the state by a moment).
        let line = loop {
            let log = srv.log_text();
            if let Some(l) = log
                .lines()
                .find(|l| l.contains("back in sync (automatic resync)"))
            {
                break l.to_string();
            }
            assert!(Instant::now() < deadline, "no automatic resync logged:\n{log}");
            std::thread::sleep(Duration::from_millis(100));
        };
        let groups: u64 = line
            .split("groups=")
            .nth(1)
            .and_then(|r| r.split(|c: char| !c.is_ascii_digit()).next())
            .and_then(|n| n.parse().ok())
            .unwrap_or_else(|| panic!("no group count in {line:?}"));
        serde_json::json!({ "groups": groups })
    });
}

#[test]
fn a_remote_copy_answering_errors_is_dropped_and_comes_back_when_they_stop() {
    require("nbdkit");
    let dir = tempfile::tempdir().unwrap();
    let remote = raw_file(dir.path(), "remote.raw", 16 << 20);
    let local = raw_file(dir.path(), "local.bgv", 16 << 20);
    // nbdkit's error filter fails every write with EIO while the trigger file exists.
    let trigger = dir.path().join("fail-writes");
    let kit = Server::nbdkit(
        &dir.path().join("kit.sock"),
        &[
            "--filter=error",
            "file",
            remote.to_str().unwrap(),
            "error-pwrite=EIO",
            "error-pwrite-rate=100%",
            &format!("error-pwrite-file={}", trigger.display()),
        ],
    );
    expect_exit(
        &bg(&["format", local.to_str().unwrap(), "--force", "--mirror", &kit.uri]),
        0,
    );
    let ctl = dir.path().join("v.ctl");
    let ctl_s = ctl.to_str().unwrap();
    let mut srv = Served::start(&local, &["--control", ctl_s]);
    std::fs::write(&trigger, b"").unwrap();
    let data = random_bytes(32 * BS as usize, 9);
    write_through(&srv, &data, 100);
    let list = bg(&["mirror", "list", local.to_str().unwrap(), "--control", ctl_s]);
    assert!(stdout(&list).contains("out of sync"), "{}", stdout(&list));
    assert!(
        srv.log_text().contains("EIO"),
        "the server's EIO is named:\n{}",
        srv.log_text()
    );
    std::fs::remove_file(&trigger).unwrap();
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let list = bg(&["mirror", "list", local.to_str().unwrap(), "--control", ctl_s]);
        if !stdout(&list).contains("out of sync") {
            break;
        }
        assert!(Instant::now() < deadline, "not resynced:\n{}", srv.log_text());
        std::thread::sleep(Duration::from_millis(200));
    }
    assert!(srv.signal("TERM").success(), "{}", srv.log_text());
    for b in [100, 115, 131] {
        let want = &data[((b - 100) * BS) as usize..((b - 99) * BS) as usize];
        assert_eq!(block_of(&remote, b), want, "block {b} on the remote copy");
    }
    expect_exit(&bg(&["check", &kit.uri]), 0);
}
