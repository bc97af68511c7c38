//! `format --metadata-device` from the command line: the volume served through its data path
//! with qemu-io, killed and served again (the journal replayed from the metadata device);
//! the data file's first SIZE bytes are the plain image; a swapped, missing or foreign
//! metadata device is refused with a clear message and nothing written.

mod nbd_support;

use nbd_support::*;
use std::path::Path;

const SIZE: u64 = 16 << 20;

fn format(dir: &Path, data: &str, meta: &str, mode: &str) {
    let d = dir.join(data);
    let m = dir.join(meta);
    let out = bg(&[
        "format",
        d.to_str().unwrap(),
        "--size",
        "16M",
        "--mode",
        mode,
        "--metadata-device",
        m.to_str().unwrap(),
    ]);
    expect_exit(&out, 0);
}

fn qemu_io(uri: &str, cmds: &[String]) -> std::process::Output {
    let mut args: Vec<&str> = vec!["-f", "raw"];
    for c in cmds {
        args.push("-c");
        args.push(c);
    }
    args.push(uri);
    run("qemu-io", &args)
}

#[test]
fn a_split_volume_is_served_through_its_data_path_and_survives_a_kill() {
    require("qemu-io");
    let dir = tempfile::tempdir().unwrap();
    format(dir.path(), "data.img", "meta.img", "journal");
    let data = dir.path().join("data.img");
    // The data file is the image plus its 4 KiB trailer; the metadata file is small.
    assert_eq!(std::fs::metadata(&data).unwrap().len(), SIZE + 4096);
    assert!(std::fs::metadata(dir.path().join("meta.img")).unwrap().len() < 4 << 20);
    let info = bg(&["info", data.to_str().unwrap()]);
    expect_exit(&info, 0);
    assert!(
        stdout(&info).contains("mode:          journal"),
        "{}",
        stdout(&info)
    );
    let mut srv = Served::start(&data, &[]);
    let uri = srv.uri();
    let out = qemu_io(
        &uri,
        &[
            "write -P 0xa5 0 1M".into(),
            "write -P 0x3c 5M 300k".into(),
            "flush".into(),
        ],
    );
    assert!(out.status.success(), "{}", stderr(&out));
    // A crash of the server: kill -9, then serve again (the journal is replayed).
    assert!(!srv.signal("KILL").success());
    let mut srv = Served::start(&data, &[]);
    let uri = srv.uri();
    let out = qemu_io(&uri, &["read -P 0xa5 0 1M".into(), "read -P 0x3c 5M 300k".into()]);
    assert!(out.status.success(), "{}{}", stdout(&out), stderr(&out));
    assert!(srv.signal("TERM").success());
    // The data file alone reads as the plain image.
    let bytes = std::fs::read(&data).unwrap();
    assert!(bytes[..1 << 20].iter().all(|&b| b == 0xa5));
    assert!(bytes[5 << 20..(5 << 20) + 300 * 1024].iter().all(|&b| b == 0x3c));
    assert!(bytes[2 << 20..3 << 20].iter().all(|&b| b == 0));
    let check = bg(&["check", data.to_str().unwrap()]);
    expect_exit(&check, 0);
}

#[test]
fn swapped_missing_and_foreign_metadata_devices_are_refused() {
    let dir = tempfile::tempdir().unwrap();
    format(dir.path(), "a.img", "a.meta", "dual");
    format(dir.path(), "b.img", "b.meta", "dual");
    let p = |n: &str| dir.path().join(n);
    let snapshot = || ["a.img", "a.meta", "b.img", "b.meta"].map(|n| std::fs::read(p(n)).unwrap_or_default());
    let before = snapshot();
    // The metadata device given as the volume.
    let out = bg(&["check", p("a.meta").to_str().unwrap()]);
    assert_ne!(code(&out), 0);
    assert!(
        stderr(&out).contains("through its data device"),
        "{}",
        stderr(&out)
    );
    // A foreign metadata device in place of the right one.
    std::fs::rename(p("a.meta"), p("a.meta.orig")).unwrap();
    std::fs::copy(p("b.meta"), p("a.meta")).unwrap();
    let out = bg(&["check", p("a.img").to_str().unwrap()]);
    assert_ne!(code(&out), 0);
    assert!(
        stderr(&out).contains("do not belong together"),
        "{}",
        stderr(&out)
    );
    // No metadata device at all.
    std::fs::remove_file(p("a.meta")).unwrap();
    let out = bg(&["check", p("a.img").to_str().unwrap()]);
    assert_ne!(code(&out), 0);
    assert!(stderr(&out).contains("cannot be opened"), "{}", stderr(&out));
    std::fs::rename(p("a.meta.orig"), p("a.meta")).unwrap();
    assert!(snapshot() == before, "refused opens wrote nothing");
    // Bad input at format.
    let out = bg(&[
        "format",
        p("c.img").to_str().unwrap(),
        "--metadata-device",
        p("c.meta").to_str().unwrap(),
    ]);
    assert_ne!(code(&out), 0);
    assert!(stderr(&out).contains("needs --size"), "{}", stderr(&out));
    let out = bg(&[
        "format",
        p("a.img").to_str().unwrap(),
        "--size",
        "16M",
        "--metadata-device",
        p("b.meta").to_str().unwrap(),
    ]);
    assert_ne!(
        code(&out),
        0,
        "existing devices are not overwritten without --force"
    );
    assert!(snapshot() == before);
}

/// A keyed split volume in 32-byte tag slots: `info` describes it without its key (read
/// through the data path's trailer, like a keyed volume of one device), and it is re-tagged
/// in place to an unkeyed profile and back with the metadata on the other device.
#[test]
fn a_keyed_split_volume_is_described_without_its_key_and_retagged_in_place() {
    let dir = tempfile::tempdir().unwrap();
    let (d, m, k) = (
        dir.path().join("d.img"),
        dir.path().join("m.img"),
        dir.path().join("k"),
    );
    std::fs::write(&k, [0x6bu8; 32]).unwrap();
    let (ds, ks) = (d.to_str().unwrap(), k.to_str().unwrap());
    expect_exit(
        &bg(&[
            "format",
            ds,
            "--size",
            "16M",
            "--metadata-device",
            m.to_str().unwrap(),
            "--profile",
            "blake3-keyed",
            "--key-file",
            ks,
        ]),
        0,
    );
    let pattern = random_bytes(1 << 20, 3);
    let raw = dir.path().join("src");
    std::fs::write(&raw, &pattern).unwrap();
    expect_exit(
        &bg(&["import", raw.to_str().unwrap(), ds, "--force", "--key-file", ks]),
        0,
    );
    let info = bg(&["info", ds]);
    expect_exit(&info, 0);
    assert!(stdout(&info).contains("blake3-keyed"), "{}", stdout(&info));
    // Down to crc32c (in the 32-byte slots), checked without a key, then back up.
    expect_exit(&bg(&["retag", ds, "--profile", "crc32c", "--key-file", ks]), 0);
    expect_exit(&bg(&["check", ds]), 0);
    expect_exit(
        &bg(&["retag", ds, "--profile", "blake3-keyed", "--new-key-file", ks]),
        0,
    );
    expect_exit(&bg(&["check", ds, "--key-file", ks]), 0);
    let info = bg(&["info", ds]);
    expect_exit(&info, 0);
    assert!(
        stdout(&info).contains("blake3-keyed (32 bytes per block;"),
        "{}",
        stdout(&info)
    );
    // The data path's first bytes are still the plain image.
    let image = std::fs::read(&d).unwrap();
    assert!(image[..pattern.len()] == pattern[..]);
}
