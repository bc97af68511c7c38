//! Mirror copies through the real binary: `format --mirror`, serving the set from either
//! copy's path, a copy corrupted on disk read from the other and healed, and the mistakes a
//! user makes forming a set refused before anything is written.

mod nbd_support;

use blockguard_nbd::client::{Client, ClientOptions};
use blockguard_nbd::proto;
use nbd_support::*;
use std::path::Path;
use std::time::Duration;

const BS: u64 = 4096;
const BLOCKS: u64 = 64;

/// Byte offset of data block `b` in a mirror copy's file, from its own superblock.
fn data_offset(copy: &Path, b: u64) -> u64 {
    let bytes = std::fs::read(copy).expect("read the copy");
    let (sb, _) = blockguard::Superblock::decode(&bytes[..512]).expect("a superblock");
    assert!(sb.mirror.is_some(), "{} is a mirror copy", copy.display());
    sb.geometry.data_offset(b)
}

fn block_of(path: &Path, b: u64) -> Vec<u8> {
    let bytes = std::fs::read(path).expect("read");
    let at = data_offset(path, b) as usize;
    bytes[at..at + BS as usize].to_vec()
}

#[test]
fn a_copy_corrupted_on_disk_is_read_from_the_other_and_healed() {
    require("qemu-io");
    let dir = tempfile::tempdir().unwrap();
    let a = dir.path().join("a.bgv");
    let b = dir.path().join("b.bgv");
    let out = run(
        BIN,
        &[
            "format",
            a.to_str().unwrap(),
            "--size",
            "16M",
            "--mirror",
            b.to_str().unwrap(),
        ],
    );
    assert!(stdout(&out).contains("copy 1"), "{}", stdout(&out));
    let data = random_bytes((BLOCKS * BS) as usize, 7);
    let mut srv = Served::start(&a, &[]);
    {
        let s = srv.connect();
        s.set_read_timeout(Some(Duration::from_secs(20))).unwrap();
        let mut c = Client::handshake(s, &ClientOptions::default()).unwrap();
        assert_eq!(c.write(0, &data, proto::CMD_FLAG_FUA).unwrap(), 0);
    }
    assert!(srv.signal("TERM").success());
    assert_eq!(block_of(&a, 10), block_of(&b, 10), "both copies written");

    // Block 10 damaged on the copy reads go to first (copy 0 serves the first MiB).
    flip_byte(&a, data_offset(&a, 10) + 99);
    // Served through the *other* copy's path: the set is found from either.
    let mut srv = Served::start(&b, &[]);
    let image = dir.path().join("out.raw");
    run(
        "qemu-img",
        &[
            "convert",
            "-f",
            "raw",
            "-O",
            "raw",
            &srv.uri(),
            image.to_str().unwrap(),
        ],
    );
    let got = std::fs::read(&image).unwrap();
    assert_eq!(&got[..data.len()], &data[..], "every block read right");
    assert!(srv.signal("TERM").success());
    let log = srv.log_text();
    assert!(log.contains("read repair") && log.contains("block 10"), "{log}");
    assert_eq!(
        block_of(&a, 10),
        data[10 * BS as usize..11 * BS as usize],
        "copy 0 healed"
    );

    // `check` opens the set read-only from either copy: clean now.
    for p in [&a, &b] {
        let out = run_any(BIN, &["check", p.to_str().unwrap()]);
        assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    }
}

#[test]
fn forming_a_set_refuses_the_same_file_and_a_copy_holding_a_volume() {
    let dir = tempfile::tempdir().unwrap();
    let a = dir.path().join("a.bgv");
    let link = dir.path().join("link.bgv");
    run(BIN, &["format", a.to_str().unwrap(), "--size", "8M"]);
    std::os::unix::fs::symlink(&a, &link).unwrap();
    let before = std::fs::read(&a).unwrap();
    let out = run_any(
        BIN,
        &[
            "format",
            a.to_str().unwrap(),
            "--force",
            "--mirror",
            link.to_str().unwrap(),
        ],
    );
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("same file"), "{err}");
    assert_eq!(std::fs::read(&a).unwrap(), before, "nothing written");

    let c = dir.path().join("c.bgv");
    let out = run_any(
        BIN,
        &[
            "format",
            c.to_str().unwrap(),
            "--size",
            "8M",
            "--mirror",
            a.to_str().unwrap(),
        ],
    );
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("--force") && err.contains("a.bgv"), "{err}");
    assert_eq!(
        std::fs::read(&a).unwrap(),
        before,
        "the other volume is untouched"
    );
}

#[test]
fn a_copy_missing_while_served_is_resynced_with_only_what_it_missed() {
    require("qemu-io");
    let dir = tempfile::tempdir().unwrap();
    let a = dir.path().join("a.bgv");
    let b = dir.path().join("b.bgv");
    run(BIN, &["format", a.to_str().unwrap(), "--size", "64M"]);
    let mut srv = Served::start(&a, &[]);
    run("qemu-io", &["-f", "raw", "-c", "write -P 7 0 8M", &srv.uri()]);
    assert!(srv.signal("TERM").success());
    // A plain volume becomes a set of two.
    let out = run(BIN, &["mirror", "add", a.to_str().unwrap(), b.to_str().unwrap()]);
    assert!(stdout(&out).contains("added"), "{}", stdout(&out));
    let out = run(BIN, &["mirror", "list", b.to_str().unwrap(), "--json"]);
    let list: serde_json::Value = serde_json::from_str(&stdout(&out)).unwrap();
    assert_eq!(list.as_array().map(Vec::len), Some(2), "{list}");
    assert!(
        list.as_array().unwrap().iter().all(|c| c["in_sync"] == true),
        "{list}"
    );

    // Copy 1 goes missing; the set is served degraded and written.
    let away = dir.path().join("away.bgv");
    std::fs::rename(&b, &away).unwrap();
    let mut srv = Served::start(&a, &[]);
    run("qemu-io", &["-f", "raw", "-c", "write -P 9 32M 1M", &srv.uri()]);
    assert!(srv.signal("TERM").success());
    assert!(srv.log_text().contains("missing"), "{}", srv.log_text());
    std::fs::rename(&away, &b).unwrap();
    let out = run(BIN, &["mirror", "list", a.to_str().unwrap()]);
    assert!(stdout(&out).contains("out of sync"), "{}", stdout(&out));

    // Resync copies only the group the degraded session wrote (and the bitmaps).
    let out = run(BIN, &["mirror", "resync", a.to_str().unwrap(), "--json"]);
    let report: serde_json::Value = serde_json::from_str(&stdout(&out)).unwrap();
    assert_eq!(report["members"], serde_json::json!([1]), "{report}");
    // 1 MiB at 32 MiB touches one or two groups of about 2 MiB each; the whole volume is 64 MiB.
    let groups = report["groups"].as_u64().unwrap();
    assert!((1..=2).contains(&groups), "{report}");
    assert!(report["bytes_copied"].as_u64().unwrap() < 5 << 20, "{report}");
    let out = run(BIN, &["mirror", "list", a.to_str().unwrap()]);
    assert!(!stdout(&out).contains("out of sync"), "{}", stdout(&out));
    // Copy 1 alone now holds everything: take copy 0 out of the set and read copy 1.
    run(
        BIN,
        &["mirror", "remove", b.to_str().unwrap(), a.to_str().unwrap()],
    );
    let mut srv = Served::start(&b, &["--read-only"]);
    run(
        "qemu-io",
        &[
            "-r",
            "-f",
            "raw",
            "-c",
            "read -P 7 0 8M",
            "-c",
            "read -P 9 32M 1M",
            "-c",
            "read -P 0 40M 1M",
            &srv.uri(),
        ],
    );
    assert!(srv.signal("TERM").success());
}

#[test]
fn check_verifies_every_copy_not_only_the_one_reads_go_to() {
    let dir = tempfile::tempdir().unwrap();
    let a = dir.path().join("a.bgv");
    let b = dir.path().join("b.bgv");
    run(
        BIN,
        &[
            "format",
            a.to_str().unwrap(),
            "--size",
            "8M",
            "--mirror",
            b.to_str().unwrap(),
        ],
    );
    let mut srv = Served::start(&a, &[]);
    {
        let s = srv.connect();
        s.set_read_timeout(Some(Duration::from_secs(20))).unwrap();
        let mut c = Client::handshake(s, &ClientOptions::default()).unwrap();
        assert_eq!(
            c.write(0, &random_bytes((16 * BS) as usize, 3), proto::CMD_FLAG_FUA)
                .unwrap(),
            0
        );
    }
    assert!(srv.signal("TERM").success());
    // Block 5 damaged on copy 1; reads of the first MiB go to copy 0 and never see it.
    flip_byte(&b, data_offset(&b, 5) + 1);
    let out = run_any(BIN, &["check", a.to_str().unwrap(), "--json"]);
    assert_eq!(
        out.status.code(),
        Some(1),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let report: serde_json::Value = serde_json::from_str(&stdout(&out)).unwrap();
    assert_eq!(report["bad_copies"], serde_json::json!([[1, 5]]), "{report}");
    assert_eq!(
        report["bad_blocks"],
        serde_json::json!([]),
        "the set reads right: {report}"
    );
}

/// `status`, `mirror list` and `mirror resync` of a served set go through its control socket:
/// the copy that missed writes is resynchronized by the server while a client keeps writing,
/// and ends holding everything on its own; a membership change of the served set is refused.
#[test]
fn a_served_set_is_resynced_through_its_control_socket_while_a_client_writes() {
    require("qemu-io");
    let dir = tempfile::tempdir().unwrap();
    let a = dir.path().join("a.bgv");
    let b = dir.path().join("b.bgv");
    let (sa, sb) = (a.to_str().unwrap(), b.to_str().unwrap());
    run(BIN, &["format", sa, "--size", "64M", "--mirror", sb]);
    // Copy 1 misses writes spread over most of the volume.
    let away = dir.path().join("away.bgv");
    std::fs::rename(&b, &away).unwrap();
    let mut srv = Served::start(&a, &[]);
    run("qemu-io", &["-f", "raw", "-c", "write -P 9 4M 48M", &srv.uri()]);
    assert!(srv.signal("TERM").success());
    std::fs::rename(&away, &b).unwrap();

    let mut srv = Served::start(&a, &[]);
    let st: serde_json::Value = serde_json::from_str(&stdout(&run(BIN, &["status", sa, "--json"]))).unwrap();
    assert_eq!(st["copies"][0]["state"], "in-sync", "{st}");
    assert_eq!(st["copies"][1]["state"], "out-of-sync", "{st}");
    assert!(st["dirty_regions"].as_u64().unwrap() >= 20, "{st}");
    // Review 10 #8: a set with a copy out of sync is degraded, not healthy.
    assert_eq!(st["health"]["state"], "degraded", "{st}");
    let text = stdout(&run(BIN, &["status", sa]));
    assert!(text.contains("out of sync") && text.contains("dirty:"), "{text}");
    assert!(text.contains("health:     degraded: copy 1"), "{text}");
    let list = stdout(&run(BIN, &["mirror", "list", sb]));
    assert!(list.contains("copy 1") && list.contains("out of sync"), "{list}");

    // A membership change of a served set is refused, nothing created.
    let c = dir.path().join("c.bgv");
    let out = run_any(BIN, &["mirror", "add", sa, c.to_str().unwrap()]);
    assert_ne!(out.status.code(), Some(0));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("in use by blockguard serve (pid") && err.contains("stop it first"),
        "{err}"
    );
    assert!(!c.exists(), "mirror add on a served set created its target");

    // A client writes (and reads back) while the server resyncs copy 1.
    let uri = srv.uri();
    let writer = std::thread::spawn(move || {
        let mut last = Vec::new();
        for round in 0..6u64 {
            let mut args: Vec<String> = vec!["-f".into(), "raw".into()];
            last.clear();
            for k in 0..6u64 {
                let (off, pattern) = ((k * 10 + 1) << 20, (round * 6 + k) % 200 + 20);
                args.extend(["-c".into(), format!("write -P {pattern} {off} 256k")]);
                args.extend(["-c".into(), format!("read -P {pattern} {off} 256k")]);
                last.push((off, pattern));
            }
            args.extend(["-c".into(), "flush".into(), uri.clone()]);
            let out = std::process::Command::new("qemu-io")
                .args(&args)
                .output()
                .unwrap();
            let text = format!("{}{}", stdout(&out), String::from_utf8_lossy(&out.stderr));
            assert!(
                out.status.success() && !text.contains("failed") && !text.contains("verification"),
                "{text}"
            );
        }
        last
    });
    let out = run(BIN, &["mirror", "resync", sb, "--json"]);
    let report: serde_json::Value = serde_json::from_str(&stdout(&out)).unwrap();
    assert_eq!(report["members"], serde_json::json!([1]), "{report}");
    assert!(report["groups"].as_u64().unwrap() >= 20, "{report}");
    let last = writer.join().unwrap();
    let st: serde_json::Value = serde_json::from_str(&stdout(&run(BIN, &["status", sa, "--json"]))).unwrap();
    assert!(
        st["copies"]
            .as_array()
            .unwrap()
            .iter()
            .all(|c| c["state"] == "in-sync"),
        "{st}"
    );
    assert_eq!(
        stdout(&run(BIN, &["mirror", "resync", sa])).trim(),
        "every copy is in sync: nothing to do"
    );
    assert!(srv.signal("TERM").success());
    assert!(srv.log_text().contains("resynchronized"), "{}", srv.log_text());

    // Copy 1 alone holds every write: the one it missed and those made during the resync.
    run(BIN, &["mirror", "remove", sb, sa]);
    let mut srv = Served::start(&b, &["--read-only"]);
    let mut args: Vec<String> = vec!["-r".into(), "-f".into(), "raw".into()];
    args.extend([
        "-c".into(),
        "read -P 9 4M 1M".into(),
        "-c".into(),
        "read -P 9 45M 1M".into(),
    ]);
    for (off, pattern) in last {
        args.extend(["-c".into(), format!("read -P {pattern} {off} 256k")]);
    }
    args.push(srv.uri());
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    let text = stdout(&run("qemu-io", &args));
    assert!(
        !text.contains("verification") && !text.contains("failed"),
        "{text}"
    );
    assert!(srv.signal("TERM").success());
}
