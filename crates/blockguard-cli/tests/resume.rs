//! `blockguard resume` for real: a served volume on a filesystem that fills up fails its
//! write-back (ENOSPC), refuses writes and flushes; once space is freed, `resume` through the
//! control socket retries what was staged, verifies it and reports that no acknowledged write
//! was lost; every write the client saw acknowledged then reads back, and new writes work.
//!
//! Needs root (a small tmpfs is mounted) and qemu-io; skips, saying so, without them.

mod nbd_support;

use nbd_support::*;
use std::path::{Path, PathBuf};
use std::process::Command;

/// A tmpfs of `mib` MiB mounted on a fresh directory, unmounted on drop.
struct Tmpfs {
    dir: PathBuf,
    _parent: tempfile::TempDir,
}

impl Tmpfs {
    fn mount(mib: u64) -> Option<Tmpfs> {
        let parent = tempfile::tempdir().ok()?;
        let dir = parent.path().join("fs");
        std::fs::create_dir(&dir).ok()?;
        let ok = Command::new("mount")
            .args(["-t", "tmpfs", "-o", &format!("size={mib}M"), "tmpfs"])
            .arg(&dir)
            .status()
            .is_ok_and(|s| s.success());
        ok.then_some(Tmpfs { dir, _parent: parent })
    }

    fn resize(&self, mib: u64) {
        let st = Command::new("mount")
            .args(["-o", &format!("remount,size={mib}M")])
            .arg(&self.dir)
            .status()
            .unwrap();
        assert!(st.success(), "remount the tmpfs");
    }
}

impl Drop for Tmpfs {
    fn drop(&mut self) {
        let _ = Command::new("umount").arg("-l").arg(&self.dir).status();
    }
}

fn s(p: &Path) -> &str {
    p.to_str().unwrap()
}

#[test]
fn a_volume_whose_disk_filled_up_is_resumed_through_its_control_socket() {
    require("qemu-io");
    let Some(fs) = Tmpfs::mount(24) else {
        eprintln!("skipped: cannot mount a tmpfs (needs root)");
        return;
    };
    let vol = make_volume(&fs.dir, "v.bgv", "64M");
    let v = s(&vol);
    let mut srv = Served::start(&vol, &["--stage-size", "4M"]);
    let mut args: Vec<String> = vec!["-f".into(), "raw".into()];
    for k in 0..12u64 {
        args.extend(["-c".into(), format!("write -P {} {}M 4M", k + 1, k * 4)]);
    }
    args.extend(["-c".into(), "flush".into(), srv.uri()]);
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    let out = run_any("qemu-io", &args);
    let text = format!("{}{}", stdout(&out), String::from_utf8_lossy(&out.stderr));
    assert!(
        text.contains("failed"),
        "the disk filled up: some request must fail:\n{text}"
    );
    // The writes the client saw acknowledged.
    let acked: Vec<u64> = text
        .lines()
        .filter_map(|l| l.strip_prefix("wrote 4194304/4194304 bytes at offset "))
        .map(|n| n.trim().parse::<u64>().unwrap() >> 20)
        .collect();
    assert!(
        !acked.is_empty(),
        "some writes went through before the disk was full:\n{text}"
    );

    let st = stdout(&run(BIN, &["status", v]));
    assert!(st.contains("FAILED") && st.contains("blockguard resume"), "{st}");
    // Still full: resume fails, says why, and the volume stays failed.
    let out = run_any(BIN, &["resume", v]);
    assert_ne!(out.status.code(), Some(0), "resume on a full disk");
    assert!(String::from_utf8_lossy(&out.stderr).contains("error"), "{out:?}");

    fs.resize(128);
    let out = run(BIN, &["resume", v, "--json"]);
    let report: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert!(
        report["failure"].as_str().unwrap().contains("I/O error"),
        "{report}"
    );
    assert_eq!(report["lost"], serde_json::json!([]), "{report}");
    assert!(report["blocks_verified"].as_u64().unwrap() > 0, "{report}");
    let st: serde_json::Value = serde_json::from_slice(&run(BIN, &["status", v, "--json"]).stdout).unwrap();
    assert!(st["failed"].is_null(), "{st}");
    assert_eq!(st["health"]["state"], "healthy", "{st}");

    let mut args: Vec<String> = vec!["-f".into(), "raw".into()];
    for &mib in &acked {
        args.extend(["-c".into(), format!("read -P {} {mib}M 4M", mib / 4 + 1)]);
    }
    args.extend([
        "-c".into(),
        "write -P 99 60M 4M".into(),
        "-c".into(),
        "flush".into(),
    ]);
    args.extend(["-c".into(), "read -P 99 60M 4M".into(), srv.uri()]);
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    let text = stdout(&run("qemu-io", &args));
    assert!(
        !text.contains("failed") && !text.contains("verification"),
        "{text}"
    );
    assert!(srv.signal("TERM").success(), "{}", srv.log_text());
    // Closed cleanly, every block verifies.
    run(BIN, &["check", v]);
    // Resume of a volume nobody has open has nothing to do.
    let idle = stdout(&run(BIN, &["resume", v]));
    assert!(idle.contains("nothing to resume"), "{idle}");
}
