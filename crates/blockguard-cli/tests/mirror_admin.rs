//! Administering mirror sets from the command line (review 10): every refusal of `mirror add`
//! and `mirror replace` comes before anything is written; `replace` works on a set of three.

mod nbd_support;

use nbd_support::*;
use serde_json::Value;
use std::path::Path;
use std::process::{Command, Output};

/// Runs `blockguard args…` in `dir`, whatever its exit status; never a panic.
fn bg_in(dir: &Path, args: &[&str]) -> Output {
    let out = Command::new(BIN)
        .args(args)
        .current_dir(dir)
        .env("BLOCKGUARD_LOG", "warn")
        .env("NO_COLOR", "1")
        .output()
        .expect("run blockguard");
    assert!(
        !String::from_utf8_lossy(&out.stderr).contains("panicked"),
        "blockguard {args:?} panicked:\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    out
}

fn code(out: &Output) -> i32 {
    out.status.code().expect("exited, not killed")
}

fn err(out: &Output) -> String {
    String::from_utf8_lossy(&out.stderr).into_owned()
}

/// Asserts `out` exited with `want`, showing everything it printed otherwise.
#[track_caller]
fn expect(out: &Output, want: i32) {
    assert_eq!(
        code(out),
        want,
        "--- stdout\n{}\n--- stderr\n{}",
        stdout(out),
        err(out)
    );
}

fn md5ish(path: &Path) -> Vec<u8> {
    std::fs::read(path).unwrap()
}

/// A 16 MiB pattern imported into `volume` (in `dir`).
fn fill(dir: &Path, volume: &str) -> Vec<u8> {
    let data = random_bytes(16 << 20, 11);
    std::fs::write(dir.join("d.raw"), &data).unwrap();
    expect(&bg_in(dir, &["import", "d.raw", volume, "--force"]), 0);
    data
}

#[test]
fn regression_mirror_add_to_a_full_set_refuses_before_writing_its_target() {
    let t = tempfile::tempdir().unwrap();
    let d = t.path();
    expect(
        &bg_in(
            d,
            &[
                "format", "v.bgv", "--size", "16M", "--mirror", "v1.bgv", "--mirror", "v2.bgv",
            ],
        ),
        0,
    );
    // The target: a plain volume holding data, and a healthy set's member.
    expect(&bg_in(d, &["format", "p.bgv", "--size", "16M"]), 0);
    fill(d, "p.bgv");
    expect(
        &bg_in(d, &["format", "o.bgv", "--size", "16M", "--mirror", "o1.bgv"]),
        0,
    );
    for target in ["p.bgv", "o1.bgv"] {
        let before = md5ish(&d.join(target));
        let out = bg_in(d, &["mirror", "add", "v.bgv", target, "--force"]);
        expect(&out, 2);
        assert!(err(&out).contains("3 copies"), "{}", err(&out));
        assert!(md5ish(&d.join(target)) == before, "{target} was written");
    }
    expect(&bg_in(d, &["check", "p.bgv"]), 0);
    expect(&bg_in(d, &["check", "o.bgv"]), 0);
    // A new path is not left behind either.
    let out = bg_in(d, &["mirror", "add", "v.bgv", "new.bgv"]);
    expect(&out, 2);
    assert!(!d.join("new.bgv").exists());
}

#[test]
fn regression_mirror_replace_works_on_a_set_of_three_copies() {
    let t = tempfile::tempdir().unwrap();
    let d = t.path();
    expect(
        &bg_in(
            d,
            &[
                "format", "v.bgv", "--size", "16M", "--mirror", "v1.bgv", "--mirror", "v2.bgv",
            ],
        ),
        0,
    );
    let data = fill(d, "v.bgv");
    // Refused before anything is written: a copy that does not exist.
    std::fs::write(d.join("precious.img"), vec![0x77u8; 17 << 20]).unwrap();
    let out = bg_in(d, &["mirror", "replace", "v.bgv", "7", "precious.img", "--force"]);
    expect(&out, 2);
    assert!(md5ish(&d.join("precious.img")) == vec![0x77u8; 17 << 20]);

    let out = bg_in(d, &["mirror", "replace", "v.bgv", "1", "new.bgv"]);
    expect(&out, 0);
    let text = stdout(&out);
    assert!(text.contains("replaced copy 1"), "{text}");
    assert!(text.contains("redundancy"), "{text}");
    let list = bg_in(d, &["mirror", "list", "v.bgv", "--json"]);
    expect(&list, 0);
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
    expect(&bg_in(d, &["check", "v.bgv"]), 0);
    expect(&bg_in(d, &["export", "v.bgv", "out.raw"]), 0);
    assert!(std::fs::read(d.join("out.raw")).unwrap() == data);
    // The new copy alone holds them: take the other two out of the set.
    expect(&bg_in(d, &["mirror", "remove", "new.bgv", "v.bgv"]), 0);
    expect(&bg_in(d, &["mirror", "remove", "new.bgv", "v2.bgv"]), 0);
    expect(&bg_in(d, &["export", "new.bgv", "alone.raw"]), 0);
    assert!(std::fs::read(d.join("alone.raw")).unwrap() == data);
}
