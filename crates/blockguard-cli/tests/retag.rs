//! `blockguard retag`, run for real: on a volume file (opened directly), with keyed profiles,
//! with a corrupted block, with bad input (nothing written, exit 2); and on a volume `serve`
//! holds, through its control socket, while `qemu-io` writes and verifies patterns over NBD.

mod nbd_support;

use nbd_support::*;
use serde_json::Value;
use std::path::{Path, PathBuf};
use std::process::Output;
use std::time::{Duration, Instant};

fn json(out: &Output) -> Value {
    serde_json::from_slice(&out.stdout)
        .unwrap_or_else(|e| panic!("bad JSON ({e}):\n{}\n{}", stdout(out), stderr(out)))
}

fn s(p: &Path) -> &str {
    p.to_str().unwrap()
}

/// A volume of `mib` MiB whose first `written_mib` MiB hold random data (imported), and that
/// data; `profile` and `key` are arguments of `format` (`key` of `import` too).
fn written_volume(
    dir: &Path,
    mib: u64,
    written_mib: u64,
    profile: &[&str],
    key: &[&str],
) -> (PathBuf, Vec<u8>) {
    let raw = dir.join("src.raw");
    let mut data = random_bytes((written_mib << 20) as usize, 7);
    data.resize((mib << 20) as usize, 0);
    std::fs::write(&raw, &data).unwrap();
    let vol = dir.join("v.bgv");
    let size = format!("{mib}M");
    let mut args = vec!["format", s(&vol), "--size", &size];
    args.extend_from_slice(profile);
    args.extend_from_slice(key);
    expect_exit(&bg(&args), 0);
    let mut args = vec!["import", s(&raw), s(&vol), "--force"];
    args.extend_from_slice(key);
    expect_exit(&bg(&args), 0);
    std::fs::remove_file(&raw).unwrap();
    (vol, data)
}

/// The volume exported and compared with `data`.
fn assert_holds(vol: &Path, data: &[u8], key: &[&str]) {
    let out_path = vol.with_extension("out");
    let mut args = vec!["export", s(vol), s(&out_path), "--force"];
    args.extend_from_slice(key);
    expect_exit(&bg(&args), 0);
    let got = std::fs::read(&out_path).unwrap();
    assert!(got == data, "the exported volume differs");
    std::fs::remove_file(&out_path).unwrap();
}

fn info(vol: &Path) -> Value {
    let out = bg(&["info", s(vol), "--json"]);
    expect_exit(&out, 0);
    json(&out)
}

/// `args` fails with exit 2 and a message containing `want`, and the volume file is unchanged.
fn refused(vol: &Path, args: &[&str], want: &str) {
    let before = std::fs::read(vol).unwrap();
    let out = bg(args);
    assert_eq!(code(&out), 2, "{args:?}: {}\n{}", stdout(&out), stderr(&out));
    assert!(stderr(&out).contains(want), "{args:?}: {}", stderr(&out));
    assert!(
        std::fs::read(vol).unwrap() == before,
        "{args:?}: the volume changed"
    );
}

#[test]
fn retag_of_a_volume_file_and_bad_input() {
    let dir = tempfile::tempdir().unwrap();
    let (vol, data) = written_volume(dir.path(), 32, 8, &[], &[]);
    let v = s(&vol);
    // Bad input first: clear errors, exit 2, nothing written.
    refused(&vol, &["retag", v, "--profile", "nope"], "nope");
    refused(
        &vol,
        &["retag", v, "--profile", "crc32c"],
        "already uses tag profile crc32c",
    );
    refused(&vol, &["retag", v, "--profile", "sha256"], "in place");
    let key = dir.path().join("k");
    std::fs::write(&key, [0x44u8; 32]).unwrap();
    refused(
        &vol,
        &["retag", v, "--profile", "xxh3", "--new-key-file", s(&key)],
        "takes no key",
    );
    refused(
        &vol,
        &["retag", s(&dir.path().join("none.bgv")), "--profile", "xxh3"],
        "none.bgv",
    );

    let out = bg(&["retag", v, "--profile", "xxh3", "--json"]);
    assert_eq!(code(&out), 0, "{}", stderr(&out));
    let r = json(&out);
    assert_eq!(r["complete"], true, "{r}");
    assert_eq!(
        (r["from"].as_str(), r["to"].as_str()),
        (Some("crc32c"), Some("xxh3"))
    );
    assert_eq!(r["blocks_retagged"], 2048, "{r}");
    assert_eq!(r["bad_blocks"].as_array().map(Vec::len), Some(0));
    let i = info(&vol);
    assert_eq!(i["profile"], "xxh3");
    assert!(i["retag"].is_null(), "{i}");
    expect_exit(&bg(&["check", v]), 0);
    assert_holds(&vol, &data, &[]);
    // Text output, and on to another 8-byte profile.
    let out = bg(&["retag", v, "--profile", "t10-dif"]);
    assert_eq!(code(&out), 0, "{}", stderr(&out));
    assert!(
        stdout(&out).contains("now uses tag profile t10-dif"),
        "{}",
        stdout(&out)
    );

    // A corrupted block is reported (exit 1) and keeps failing.
    let bad = 700;
    flip_byte(&vol, data_block_offset(&vol, bad) + 99);
    let out = bg(&["retag", v, "--profile", "crc64-nvme", "--json"]);
    assert_eq!(code(&out), 1, "{}", stderr(&out));
    let r = json(&out);
    assert_eq!(r["complete"], true);
    let listed: Vec<u64> = r["bad_blocks"]
        .as_array()
        .unwrap()
        .iter()
        .map(|b| b["block"].as_u64().unwrap())
        .collect();
    assert_eq!(listed, vec![bad]);
    assert_eq!(info(&vol)["profile"], "crc64-nvme");
    let out = bg(&["check", v, "--json"]);
    assert_eq!(code(&out), 1, "{}", stdout(&out));
    assert!(stdout(&out).contains(&bad.to_string()), "{}", stdout(&out));
}

#[test]
fn retag_between_keyed_profiles_needs_both_keys() {
    let dir = tempfile::tempdir().unwrap();
    let (old_key, new_key) = (dir.path().join("old.key"), dir.path().join("new.key"));
    std::fs::write(&old_key, format!("{}\n", "ab".repeat(32))).unwrap();
    std::fs::write(&new_key, [0x5cu8; 32]).unwrap();
    let (vol, data) = written_volume(
        dir.path(),
        16,
        4,
        &["--profile", "hmac-sha256"],
        &["--key-file", s(&old_key)],
    );
    let v = s(&vol);
    let (ok, nk) = (s(&old_key), s(&new_key));
    refused(
        &vol,
        &["retag", v, "--profile", "blake3-keyed", "--key-file", ok],
        "--new-key-file",
    );
    refused(
        &vol,
        &[
            "retag",
            v,
            "--profile",
            "blake3-keyed",
            "--key-file",
            nk,
            "--new-key-file",
            nk,
        ],
        "wrong key",
    );
    refused(
        &vol,
        &["retag", v, "--profile", "crc32c", "--key-file", ok],
        "in place",
    );
    let out = bg(&[
        "retag",
        v,
        "--profile",
        "blake3-keyed",
        "--key-file",
        ok,
        "--new-key-file",
        nk,
    ]);
    assert_eq!(code(&out), 0, "{}", stderr(&out));
    assert_eq!(info(&vol)["profile"], "blake3-keyed");
    expect_exit(&bg(&["check", v, "--key-file", nk]), 0);
    let old = bg(&["check", v, "--key-file", ok]);
    assert_eq!(code(&old), 2);
    assert!(stderr(&old).contains("wrong key"), "{}", stderr(&old));
    assert_holds(&vol, &data, &["--key-file", nk]);
}

#[test]
fn retag_of_a_served_volume_while_qemu_io_writes() {
    require("qemu-io");
    let dir = tempfile::tempdir().unwrap();
    let mib = 64;
    let (vol, _) = written_volume(dir.path(), mib, mib, &[], &[]);
    let v = s(&vol);
    let mut srv = Served::start(&vol, &["--stage-size", "1M"]);
    let writer = Writer::start(srv.uri());
    // Re-tag back and forth for a few seconds while the client writes.
    let targets = ["xxh3", "crc32c", "crc64-nvme", "t10-dif-ip"];
    let mut done = 0;
    let deadline = Instant::now() + Duration::from_secs(4);
    while Instant::now() < deadline || done < 2 {
        let target = targets[done % targets.len()];
        let out = bg(&["retag", v, "--profile", target, "--json"]);
        assert_eq!(code(&out), 0, "{}\n{}", stdout(&out), stderr(&out));
        let r = json(&out);
        assert_eq!(r["complete"], true, "{r}");
        assert_eq!(r["to"], target);
        assert_eq!(
            r["bad_blocks"].as_array().map(Vec::len),
            Some(0),
            "false errors: {r}"
        );
        let st = json(&bg(&["status", v, "--json"]));
        assert_eq!(st["profile"], target, "{st}");
        done += 1;
    }
    // Refused through the socket too, with the reason.
    let out = bg(&["retag", v, "--profile", "sha256"]);
    assert_eq!(code(&out), 2);
    assert!(stderr(&out).contains("in place"), "{}", stderr(&out));
    let rounds = writer.finish();
    eprintln!("{done} re-tags during {rounds} rounds of qemu-io writes");
    assert!(rounds >= 1, "qemu-io never completed a round");
    let last = targets[(done - 1) % targets.len()];
    assert!(srv.signal("TERM").success(), "{}", srv.log_text());
    assert!(!srv.log_text().contains("panicked"));
    assert_eq!(info(&vol)["profile"], last);
    let out = bg(&["check", v]);
    assert_eq!(code(&out), 0, "{}\n{}", stdout(&out), stderr(&out));
}
