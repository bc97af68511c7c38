//! Administering mirror sets from the command line (review 10): every refusal of `mirror add`
//! and `mirror replace` comes before anything is written; `replace` works on a set of three.

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
