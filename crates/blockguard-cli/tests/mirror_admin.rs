//! Administering mirror sets from the command line (review 10): every refusal of `format
//! --mirror`, `mirror add` and `mirror replace` comes before anything is written; `replace`
//! works on a set of three; what `check`, `mirror list`, `mirror resync` and `status` say
//! about a set with a missing copy or a block bad on every copy.

mod nbd_support;

use nbd_support::*;
use serde_json::Value;
use std::path::Path;

fn md5ish(path: &Path) -> Vec<u8> {
    std::fs::read(path).unwrap()
}

/// A 16 MiB pattern imported into `volume` (in `dir`).
fn fill(dir: &Path, volume: &str) -> Vec<u8> {
    let data = random_bytes(16 << 20, 11);
    std::fs::write(dir.join("d.raw"), &data).unwrap();
    ok_in(dir, &["import", "d.raw", volume, "--force"]);
    data
}

/// Runs `blockguard args…` in `dir`; it must succeed.
#[track_caller]
fn ok_in(dir: &Path, args: &[&str]) {
    expect_exit(&bg_in(Some(dir), args), 0);
}

#[test]
fn regression_mirror_add_to_a_full_set_refuses_before_writing_its_target() {
    let t = tempfile::tempdir().unwrap();
    let d = t.path();
    ok_in(
        d,
        &[
            "format", "v.bgv", "--size", "16M", "--mirror", "v1.bgv", "--mirror", "v2.bgv",
        ],
    );
    // The target: a plain volume holding data, and a healthy set's member.
    ok_in(d, &["format", "p.bgv", "--size", "16M"]);
    fill(d, "p.bgv");
    ok_in(d, &["format", "o.bgv", "--size", "16M", "--mirror", "o1.bgv"]);
    for target in ["p.bgv", "o1.bgv"] {
        let before = md5ish(&d.join(target));
        let out = bg_in(Some(d), &["mirror", "add", "v.bgv", target, "--force"]);
        expect_exit(&out, 2);
        assert!(stderr(&out).contains("3 copies"), "{}", stderr(&out));
        assert!(md5ish(&d.join(target)) == before, "{target} was written");
    }
    ok_in(d, &["check", "p.bgv"]);
    ok_in(d, &["check", "o.bgv"]);
    // A new path is not left behind either.
    let out = bg_in(Some(d), &["mirror", "add", "v.bgv", "new.bgv"]);
    expect_exit(&out, 2);
    assert!(!d.join("new.bgv").exists());
}

#[test]
fn regression_mirror_replace_works_on_a_set_of_three_copies() {
    let t = tempfile::tempdir().unwrap();
    let d = t.path();
    ok_in(
        d,
        &[
            "format", "v.bgv", "--size", "16M", "--mirror", "v1.bgv", "--mirror", "v2.bgv",
        ],
    );
    let data = fill(d, "v.bgv");
    // Refused before anything is written: a copy that does not exist.
    std::fs::write(d.join("precious.img"), vec![0x77u8; 17 << 20]).unwrap();
    let out = bg_in(
        Some(d),
        &["mirror", "replace", "v.bgv", "7", "precious.img", "--force"],
    );
    expect_exit(&out, 2);
    assert!(md5ish(&d.join("precious.img")) == vec![0x77u8; 17 << 20]);

    let out = bg_in(Some(d), &["mirror", "replace", "v.bgv", "1", "new.bgv"]);
    expect_exit(&out, 0);
    let text = stdout(&out);
    assert!(text.contains("replaced copy 1"), "{text}");
    assert!(text.contains("redundancy"), "{text}");
    let list = bg_in(Some(d), &["mirror", "list", "v.bgv", "--json"]);
    expect_exit(&list, 0);
    let copies: Value = serde_json::from_slice(&list.stdout).unwrap();
    let paths: Vec<&str> = copies
        .as_array()
        .unwrap()
        .iter()
        .map(|c| c["path"].as_str().unwrap())
        .collect();
    assert_eq!(paths.len(), 3, "{copies}");
    assert!(paths.iter().any(|p| p.ends_with("/new.bgv")), "{copies}");
    assert!(!paths.iter().any(|p| p.ends_with("/v1.bgv")), "{copies}");
    assert!(
        copies.as_array().unwrap().iter().all(|c| c["in_sync"] == true),
        "{copies}"
    );
    // Every copy verifies (check reads each one), and the contents are the volume's.
    ok_in(d, &["check", "v.bgv"]);
    ok_in(d, &["export", "v.bgv", "out.raw"]);
    assert!(std::fs::read(d.join("out.raw")).unwrap() == data);
    // The new copy alone holds them: take the other two out of the set.
    ok_in(d, &["mirror", "remove", "new.bgv", "v.bgv"]);
    ok_in(d, &["mirror", "remove", "new.bgv", "v2.bgv"]);
    ok_in(d, &["export", "new.bgv", "alone.raw"]);
    assert!(std::fs::read(d.join("alone.raw")).unwrap() == data);
}

#[test]
fn regression_format_refuses_the_same_file_by_another_name_and_copies_of_different_sizes() {
    let t = tempfile::tempdir().unwrap();
    let d = t.path();
    let out = bg_in(
        Some(d),
        &["format", "m0.bgv", "--size", "16M", "--mirror", "./m0.bgv"],
    );
    expect_exit(&out, 2);
    assert!(stderr(&out).contains("same file"), "{}", stderr(&out));
    assert!(!d.join("m0.bgv").exists(), "nothing formatted");

    // Without --size, each file would keep its own length: refused before anything is
    // written, rather than two half-made members.
    let m0 = d.join("m0.bgv");
    let big = d.join("big.img");
    std::fs::File::create(&m0).unwrap().set_len(64 << 20).unwrap();
    std::fs::File::create(&big).unwrap().set_len(80 << 20).unwrap();
    let out = bg_in(Some(d), &["format", "m0.bgv", "--mirror", "big.img", "--force"]);
    expect_exit(&out, 2);
    let e = stderr(&out);
    assert!(e.contains("same size") && e.contains("--size"), "{e}");
    for f in [&m0, &big] {
        let bytes = std::fs::read(f).unwrap();
        assert!(bytes.iter().all(|&b| b == 0), "{} was written", f.display());
    }
    assert_eq!(std::fs::metadata(&big).unwrap().len(), 80 << 20);
    // With --size both are sized alike, and the set forms.
    ok_in(
        d,
        &[
            "format", "m0.bgv", "--size", "32M", "--mirror", "big.img", "--force",
        ],
    );
    ok_in(d, &["check", "m0.bgv"]);
}

#[test]
fn regression_check_does_not_call_a_copy_good_when_every_copy_is_bad() {
    let t = tempfile::tempdir().unwrap();
    let d = t.path();
    ok_in(d, &["format", "m0.bgv", "--size", "16M", "--mirror", "m1.bgv"]);
    fill(d, "m0.bgv");
    let dump = bg_in(Some(d), &["dump", "m0.bgv", "--block", "7", "--json"]);
    expect_exit(&dump, 0);
    let dump: Value = serde_json::from_slice(&dump.stdout).unwrap();
    let off = dump["blocks"][0]["location"]["data_offset"].as_u64().unwrap();
    flip_byte(&d.join("m0.bgv"), off + 5);
    flip_byte(&d.join("m1.bgv"), off + 5);
    let out = bg_in(Some(d), &["check", "m0.bgv"]);
    expect_exit(&out, 1);
    let text = stdout(&out);
    assert!(text.contains("bad block 7"), "{text}");
    assert!(!text.contains("a good copy is served"), "{text}");
    assert!(text.contains("no good copy"), "{text}");
    assert!(text.contains("2 bad copies"), "{text}");
}

#[test]
fn regression_a_missing_copy_is_named_by_its_own_path_and_not_called_in_sync() {
    let t = tempfile::tempdir().unwrap();
    let d = t.path();
    ok_in(d, &["format", "m0.bgv", "--size", "16M", "--mirror", "m1.bgv"]);
    std::fs::rename(d.join("m1.bgv"), d.join("away.bgv")).unwrap();
    let m1 = d.canonicalize().unwrap().join("m1.bgv");
    let m1 = m1.to_str().unwrap();

    let out = bg_in(Some(d), &["mirror", "list", "m0.bgv"]);
    expect_exit(&out, 0);
    assert!(
        stdout(&out).contains(&format!("copy 1: {m1} (absent)")),
        "{}",
        stdout(&out)
    );

    // Status of the idle set: degraded, naming the missing copy.
    let out = bg_in(Some(d), &["status", "m0.bgv"]);
    expect_exit(&out, 0);
    let text = stdout(&out);
    let health = text
        .lines()
        .find(|l| l.starts_with("health:"))
        .unwrap_or_default();
    assert!(health.contains("degraded") && health.contains(m1), "{text}");
    let out = bg_in(Some(d), &["status", "m0.bgv", "--json"]);
    let st: Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(st["health"]["state"], "degraded", "{st}");

    // Resync cannot bring back a copy that is not there: said, and not a success.
    let out = bg_in(Some(d), &["mirror", "resync", "m0.bgv"]);
    assert_ne!(code(&out), 0, "{}", stdout(&out));
    let all = format!("{}{}", stdout(&out), stderr(&out));
    assert!(!all.contains("every copy is in sync"), "{all}");
    assert!(all.contains("missing") && all.contains(m1), "{all}");

    // Once it is back, resync restores it, and all is well again.
    std::fs::rename(d.join("away.bgv"), d.join("m1.bgv")).unwrap();
    ok_in(d, &["mirror", "resync", "m0.bgv"]);
    let out = bg_in(Some(d), &["status", "m0.bgv"]);
    assert!(stdout(&out).contains("health:     ok"), "{}", stdout(&out));
}
