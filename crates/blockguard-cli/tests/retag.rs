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
    // Away from the key, to smaller tags (stored in the 32-byte slots): the key opens the
    // volume for the re-tag; afterwards the volume takes none.
    refused(&vol, &["retag", v, "--profile", "crc32c"], "--key-file");
    let out = bg(&["retag", v, "--profile", "crc32c", "--key-file", nk]);
    assert_eq!(code(&out), 0, "{}", stderr(&out));
    let i = info(&vol);
    assert_eq!(
        (i["profile"].as_str(), i["tag_size"].as_u64()),
        (Some("crc32c"), Some(32)),
        "{i}"
    );
    expect_exit(&bg(&["check", v]), 0);
    let keyed = bg(&["check", v, "--key-file", nk]);
    assert_eq!(code(&keyed), 2);
    assert!(stderr(&keyed).contains("takes no key"), "{}", stderr(&keyed));
    assert_holds(&vol, &data, &[]);
}

/// `format --tag-room 32` leaves room for 32-byte tags: `info` says so, and the crc32c volume
/// is re-tagged to blake3-keyed in place while `serve` holds it and qemu-io writes, then back.
/// Without the room the same re-tag is refused naming `--tag-room`; a room that is not a tag
/// size, or too small for the profile, is refused at format with nothing created.
#[test]
fn tag_room_lets_a_served_volume_be_retagged_to_a_keyed_profile() {
    require("qemu-io");
    let dir = tempfile::tempdir().unwrap();
    let (narrow, _) = written_volume(dir.path(), 8, 1, &[], &[]);
    let key = dir.path().join("k");
    std::fs::write(&key, [0x3du8; 32]).unwrap();
    refused(
        &narrow,
        &[
            "retag",
            s(&narrow),
            "--profile",
            "blake3-keyed",
            "--new-key-file",
            s(&key),
        ],
        "--tag-room 32",
    );
    for (room, profile, want) in [
        ("12", "crc32c", "tag room of 12"),
        ("8", "sha256", "tag room of 8"),
        ("x", "crc32c", "--tag-room"),
    ] {
        let path = dir.path().join("bad.bgv");
        let out = bg(&[
            "format",
            s(&path),
            "--size",
            "8M",
            "--profile",
            profile,
            "--tag-room",
            room,
        ]);
        assert_eq!(code(&out), 2, "{room} {profile}: {}", stderr(&out));
        assert!(stderr(&out).contains(want), "{room} {profile}: {}", stderr(&out));
        assert!(!path.exists(), "{room} {profile}: a volume was created");
    }
    let sub = dir.path().join("wide");
    std::fs::create_dir(&sub).unwrap();
    let (vol, _) = written_volume(&sub, 64, 64, &["--tag-room", "32"], &[]);
    let v = s(&vol);
    let i = info(&vol);
    assert_eq!(
        (i["profile"].as_str(), i["tag_size"].as_u64()),
        (Some("crc32c"), Some(32)),
        "{i}"
    );
    assert_eq!(i["geometry"]["group_blocks"], 120, "{i}");
    let text = stdout(&bg(&["info", v]));
    assert!(text.contains("in 32-byte tag slots"), "{text}");
    let mut srv = Served::start(&vol, &["--stage-size", "1M"]);
    let writer = Writer::start(srv.uri());
    let out = bg(&[
        "retag",
        v,
        "--profile",
        "blake3-keyed",
        "--new-key-file",
        s(&key),
        "--json",
    ]);
    assert_eq!(code(&out), 0, "{}\n{}", stdout(&out), stderr(&out));
    let r = json(&out);
    assert_eq!(
        (r["complete"].as_bool(), r["to"].as_str()),
        (Some(true), Some("blake3-keyed")),
        "{r}"
    );
    assert_eq!(
        r["bad_blocks"].as_array().map(Vec::len),
        Some(0),
        "false errors: {r}"
    );
    let rounds = writer.finish();
    assert!(rounds >= 1, "qemu-io never completed a round");
    assert!(srv.signal("TERM").success(), "{}", srv.log_text());
    assert!(!srv.log_text().contains("panicked"));
    let i = info(&vol);
    assert_eq!(
        (i["profile"].as_str(), i["tag_size"].as_u64()),
        (Some("blake3-keyed"), Some(32)),
        "{i}"
    );
    expect_exit(&bg(&["check", v, "--key-file", s(&key)]), 0);
    let out = bg(&["check", v]);
    assert_eq!(code(&out), 2, "opened without its key");
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

/// The re-tag recorded in `vol`'s superblock: its target and cursor (`None`: none).
fn recorded_retag(vol: &Path) -> Option<(String, u64)> {
    let i = info(vol);
    let r = &i["retag"];
    (!r.is_null()).then(|| {
        (
            r["target"].as_str().unwrap().to_string(),
            r["cursor"].as_u64().unwrap(),
        )
    })
}

/// Starts `blockguard retag VOL --profile PROFILE --rate 8 --json` (8 MB/s: seconds for the
/// volumes here), waits until the superblock records a cursor past group 0 (polling `info`;
/// the cursor is recorded every second), interrupts it with SIGINT and returns its output
/// (exit status 130).
fn interrupted_retag(vol: &Path, profile: &str) -> Output {
    interrupted_retag_with(vol, profile, &[])
}

/// [`interrupted_retag`] with more arguments (keys).
fn interrupted_retag_with(vol: &Path, profile: &str, more: &[&str]) -> Output {
    let child = std::process::Command::new(BIN)
        .args(["retag", s(vol), "--profile", profile, "--rate", "8", "--json"])
        .args(more)
        .env("BLOCKGUARD_LOG", "warn")
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        if recorded_retag(vol).is_some_and(|(_, cursor)| cursor > 0) {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "the re-tag recorded no progress in 60 s"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
    run("kill", &["-INT", &child.id().to_string()]);
    let out = child.wait_with_output().unwrap();
    // 128 + SIGINT, as a shell expects of a command Ctrl-C stopped.
    assert_eq!(code(&out), 130, "{}", stderr(&out));
    assert!(!stderr(&out).contains("panicked"), "{}", stderr(&out));
    out
}

/// A fully written volume of 64 MiB (16 groups), and its data.
fn full_volume(dir: &Path) -> (PathBuf, Vec<u8>, u64) {
    let (vol, data) = written_volume(dir, 64, 64, &[], &[]);
    let groups = info(&vol)["geometry"]["groups"].as_u64().unwrap();
    assert!(groups >= 8, "{groups} groups: too few to stop in the middle");
    (vol, data, groups)
}

/// Ctrl-C stops a direct re-tag with its cursor recorded; the same command resumes from that
/// cursor (not from 0) and completes; `check` is clean and every block reads its data.
#[test]
fn an_interrupted_retag_resumes_where_it_stopped() {
    let dir = tempfile::tempdir().unwrap();
    let (vol, data, groups) = full_volume(dir.path());
    let first = interrupted_retag(&vol, "xxh3");
    let v = s(&vol);
    let r1 = json(&first);
    assert_eq!(r1["complete"], false, "{r1}");
    assert_eq!(r1["started_at"], 0, "{r1}");
    let stopped_at = r1["cursor"].as_u64().unwrap();
    assert!(stopped_at > 0 && stopped_at < groups, "{r1}");
    let e = stderr(&first);
    assert!(
        e.contains("interrupted by SIGINT") && e.contains("run the same command again to resume"),
        "{e}"
    );
    // The stop recorded exactly where it got to; the volume keeps its profile until the end.
    assert_eq!(recorded_retag(&vol), Some(("xxh3".into(), stopped_at)));
    let i = info(&vol);
    assert_eq!(
        (i["profile"].as_str(), i["state"].as_str()),
        (Some("crc32c"), Some("clean"))
    );
    // Readable and clean in the middle, with both profiles in play.
    expect_exit(&bg(&["check", v]), 0);
    assert_holds(&vol, &data, &[]);
    assert_eq!(recorded_retag(&vol), Some(("xxh3".into(), stopped_at)));

    let second = bg(&["retag", v, "--profile", "xxh3", "--json"]);
    assert_eq!(code(&second), 0, "{}", stderr(&second));
    let r2 = json(&second);
    assert_eq!(r2["complete"], true, "{r2}");
    assert_eq!(r2["started_at"], stopped_at, "the cursor was reset: {r2}");
    assert_eq!(r2["groups_retagged"], groups - stopped_at, "{r2}");
    // Between them the two runs re-tagged every block once.
    let blocks = (64u64 << 20) / 4096;
    assert_eq!(
        r1["blocks_retagged"].as_u64().unwrap() + r2["blocks_retagged"].as_u64().unwrap(),
        blocks,
        "{r1}\n{r2}"
    );
    assert_eq!(r2["bad_blocks"].as_array().map(Vec::len), Some(0), "{r2}");
    assert_eq!(info(&vol)["profile"], "xxh3");
    assert_eq!(recorded_retag(&vol), None);
    expect_exit(&bg(&["check", v]), 0);
    assert_holds(&vol, &data, &[]);
}

/// While a re-tag to xxh3 is in progress (stopped), one to another profile is refused with the
/// target in progress named, and changes nothing; resuming the one in progress still works.
#[test]
fn another_target_is_refused_while_a_retag_is_in_progress() {
    let dir = tempfile::tempdir().unwrap();
    let (vol, data, groups) = full_volume(dir.path());
    let v = s(&vol);
    let first = interrupted_retag(&vol, "xxh3");
    let stopped_at = json(&first)["cursor"].as_u64().unwrap();
    let want = format!("a re-tag to tag profile xxh3 is in progress ({stopped_at} of {groups} groups done)");
    for other in ["t10-dif", "crc64-nvme"] {
        refused(&vol, &["retag", v, "--profile", other], &want);
        refused(
            &vol,
            &["retag", v, "--profile", other, "--json"],
            "--profile xxh3",
        );
    }
    // The volume's own profile is not a target either while the re-tag runs.
    refused(&vol, &["retag", v, "--profile", "crc32c"], &want);
    assert_eq!(recorded_retag(&vol), Some(("xxh3".into(), stopped_at)));
    let out = bg(&["retag", v, "--profile", "xxh3", "--json"]);
    assert_eq!(code(&out), 0, "{}", stderr(&out));
    assert_eq!(json(&out)["started_at"], stopped_at);
    expect_exit(&bg(&["check", v]), 0);
    assert_holds(&vol, &data, &[]);
    // Complete, another profile may follow.
    expect_exit(&bg(&["retag", v, "--profile", "t10-dif"]), 0);
    assert_eq!(info(&vol)["profile"], "t10-dif");
}

/// The same through the control socket of `serve`: Ctrl-C of the client stops the server's
/// re-tag with its cursor recorded, another target is refused naming the one in progress, and
/// the same command resumes it from the cursor.
#[test]
fn an_interrupted_retag_of_a_served_volume_resumes() {
    let dir = tempfile::tempdir().unwrap();
    let (vol, data, groups) = full_volume(dir.path());
    let v = s(&vol);
    let mut srv = Served::start(&vol, &[]);
    interrupted_retag(&vol, "xxh3");
    // The server stops at its next step, once it sees the client gone; until then a request
    // is answered "busy".
    let deadline = Instant::now() + Duration::from_secs(30);
    let refusal = loop {
        let out = bg(&["retag", v, "--profile", "t10-dif"]);
        assert_eq!(code(&out), 2, "{}\n{}", stdout(&out), stderr(&out));
        if !stderr(&out).contains("already running") {
            break stderr(&out);
        }
        assert!(Instant::now() < deadline, "the server's re-tag did not stop");
        std::thread::sleep(Duration::from_millis(50));
    };
    let (target, stopped_at) = recorded_retag(&vol).unwrap();
    assert_eq!(target, "xxh3");
    assert!(stopped_at > 0 && stopped_at < groups, "{stopped_at} of {groups}");
    assert!(
        refusal.contains(&format!(
            "a re-tag to tag profile xxh3 is in progress ({stopped_at} of {groups} groups done)"
        )),
        "{refusal}"
    );
    let st = json(&bg(&["status", v, "--json"]));
    assert_eq!(st["profile"], "crc32c", "{st}");
    let out = bg(&["retag", v, "--profile", "xxh3", "--json"]);
    assert_eq!(code(&out), 0, "{}", stderr(&out));
    let r = json(&out);
    assert_eq!(
        (r["complete"].as_bool(), r["started_at"].as_u64()),
        (Some(true), Some(stopped_at)),
        "{r}"
    );
    assert_eq!(r["groups_retagged"], groups - stopped_at, "{r}");
    assert!(srv.signal("TERM").success(), "{}", srv.log_text());
    assert!(!srv.log_text().contains("panicked"));
    assert_eq!(info(&vol)["profile"], "xxh3");
    expect_exit(&bg(&["check", v]), 0);
    assert_holds(&vol, &data, &[]);
}

/// A mirror set of two copies, one block bad on copy 1: `retag` repairs it from copy 0 before
/// its re-tag and completes, both copies on the target and the data intact; a set with a copy
/// missing is refused, naming it, and no re-tag is recorded.
#[test]
fn retag_of_a_mirror_set_repairs_a_bad_copy_first_and_refuses_a_degraded_set() {
    let dir = tempfile::tempdir().unwrap();
    let (v0, v1) = (dir.path().join("m0.bgv"), dir.path().join("m1.bgv"));
    expect_exit(&bg(&["format", s(&v0), "--size", "16M", "--mirror", s(&v1)]), 0);
    let raw = dir.path().join("d.raw");
    let data = random_bytes(16 << 20, 13);
    std::fs::write(&raw, &data).unwrap();
    expect_exit(&bg(&["import", s(&raw), s(&v0), "--force"]), 0);
    flip_byte(&v1, geometry(&v1).data_offset(300) + 9);

    let out = bg(&["retag", s(&v0), "--profile", "xxh3", "--json"]);
    assert_eq!(code(&out), 0, "{}", stderr(&out));
    let r = json(&out);
    assert_eq!(
        (r["complete"].as_bool(), r["repaired"].as_u64()),
        (Some(true), Some(1)),
        "{r}"
    );
    assert_eq!(r["bad_blocks"].as_array().map(Vec::len), Some(0), "{r}");
    for v in [&v0, &v1] {
        assert_eq!(info(v)["profile"], "xxh3", "{}", v.display());
    }
    expect_exit(&bg(&["check", s(&v0)]), 0);
    assert_holds(&v0, &data, &[]);
    // Copy 1 moved away: the set opens degraded (the open records copy 1 missing), and the
    // re-tag is refused with the copy named, no re-tag recorded.
    std::fs::rename(&v1, dir.path().join("away.bgv")).unwrap();
    let out = bg(&["retag", s(&v0), "--profile", "crc32c"]);
    assert_eq!(code(&out), 2, "{}\n{}", stdout(&out), stderr(&out));
    let e = stderr(&out);
    assert!(
        e.contains("copy 1") && e.contains("out of sync") && e.contains("mirror resync"),
        "{e}"
    );
    let i = info(&v0);
    assert_eq!(
        (i["profile"].as_str(), i["retag"].is_null()),
        (Some("xxh3"), true),
        "{i}"
    );
}

/// A re-tag of a keyed volume down to crc32c, interrupted: every later command that opens the
/// volume is refused (exit 2, nothing written) until it confirms the re-tag with
/// `--retag-to crc32c`, naming the way on; `info` describes it regardless; the same `retag`
/// command resumes it without the flag, and afterwards no confirmation is needed.
#[test]
fn an_interrupted_retag_away_from_a_key_must_be_confirmed() {
    let dir = tempfile::tempdir().unwrap();
    let key = dir.path().join("k");
    std::fs::write(&key, [0x2eu8; 32]).unwrap();
    let k = s(&key);
    let (vol, data) = written_volume(
        dir.path(),
        64,
        64,
        &["--profile", "blake3-keyed"],
        &["--key-file", k],
    );
    let v = s(&vol);
    interrupted_retag_with(&vol, "crc32c", &["--key-file", k]);
    assert_eq!(recorded_retag(&vol).map(|(t, _)| t), Some("crc32c".to_string()));
    refused(&vol, &["check", v, "--key-file", k], "--retag-to crc32c");
    refused(
        &vol,
        &["export", v, s(&dir.path().join("x.raw")), "--key-file", k],
        "--retag-to crc32c",
    );
    let out = bg(&["check", v, "--key-file", k, "--retag-to", "crc32c"]);
    assert_eq!(code(&out), 0, "{}", stderr(&out));
    let out = bg(&["retag", v, "--profile", "crc32c", "--key-file", k, "--json"]);
    assert_eq!(code(&out), 0, "{}", stderr(&out));
    assert_eq!(json(&out)["complete"], true);
    expect_exit(&bg(&["check", v]), 0);
    assert_holds(&vol, &data, &[]);
}
