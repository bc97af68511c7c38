//! Outside review of `format --tag-room` and `retag` across tag sizes, through the binary.
//! Findings are `bug_*` (they fail on the code they were found on); the others held.

use std::fs;

mod cli_support;
use cli_support::T;

fn random_bytes(len: usize, seed: u64) -> Vec<u8> {
    let mut x = seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
    (0..len)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            x as u8
        })
        .collect()
}

/// Bad `--tag-room` values: exit 2 with a clear message, no panic, no file created, an
/// existing volume (even with --force) left byte for byte as it was.
#[test]
fn bad_tag_room_is_refused_and_creates_or_changes_nothing() {
    let t = T::new();
    for (room, profile) in [
        ("0", "crc32c"),
        ("4", "crc32c"),
        ("7", "crc32c"),
        ("12", "crc32c"),
        ("24", "crc32c"),
        ("64", "crc32c"),
        ("128", "crc32c"),
        ("65544", "crc32c"),
        ("4294967304", "crc32c"),
        ("18446744073709551615", "crc32c"),
        ("99999999999999999999999", "crc32c"),
        ("-8", "crc32c"),
        ("abc", "crc32c"),
        ("", "crc32c"),
        ("8", "sha256"),
        ("16", "blake3-keyed"),
        ("8", "hmac-sha256"),
        (" 32", "crc32c"),
        ("0x20", "crc32c"),
    ] {
        let arg = format!("--tag-room={room}");
        let o = t.run(&["format", "new.bgv", "--size", "1M", "--profile", profile, &arg]);
        o.code(2);
        assert!(
            !t.path("new.bgv").exists(),
            "{room} {profile}: a file was created"
        );
        assert!(
            o.stderr.len() < 2000 && !o.stderr.is_empty(),
            "{room}: {}",
            o.stderr
        );
        // Mirror and metadata-device forms.
        let o = t.run(&[
            "format",
            "m0.bgv",
            "--size",
            "1M",
            "--profile",
            profile,
            &arg,
            "--mirror",
            "m1.bgv",
        ]);
        o.code(2);
        assert!(
            !t.path("m0.bgv").exists() && !t.path("m1.bgv").exists(),
            "{room}: mirror created"
        );
        let o = t.run(&[
            "format",
            "d.bgv",
            "--size",
            "1M",
            "--profile",
            profile,
            &arg,
            "--metadata-device",
            "meta.bgm",
        ]);
        o.code(2);
        assert!(
            !t.path("d.bgv").exists() && !t.path("meta.bgm").exists(),
            "{room}: split created"
        );
    }
    // An existing volume, --force: unchanged.
    t.run(&["format", "v.bgv", "--size", "1M"]).code(0);
    t.run(&["import", "/dev/null", "v.bgv"]);
    let before = t.read("v.bgv");
    for room in ["0", "64", "24", "4294967304"] {
        let arg = format!("--tag-room={room}");
        t.run(&["format", "v.bgv", "--size", "1M", &arg, "--force"])
            .code(2);
        assert_eq!(
            t.read("v.bgv"),
            before,
            "--tag-room {room} --force changed the volume"
        );
        t.run(&["format", "v.bgv", &arg, "--force"]).code(2);
        assert_eq!(
            t.read("v.bgv"),
            before,
            "--tag-room {room} --force (no size) changed the volume"
        );
    }
}

/// A volume with 32-byte slots through every tool: import, info, dump, check, scrub, export;
/// retag up to blake3-keyed and back down to crc32c; the tools agree at every stage.
#[test]
fn wide_slot_volume_through_every_tool() {
    let t = T::new();
    fs::write(t.path("k"), "11".repeat(32)).unwrap();
    t.run(&["format", "v.bgv", "--size", "4M", "--tag-room", "32"])
        .code(0);
    let raw = random_bytes(3 << 20, 5);
    fs::write(t.path("raw"), &raw).unwrap();
    t.run(&["import", "raw", "v.bgv"]).code(0);
    t.run(&["info", "v.bgv"]).code(0).out_has(&[
        "crc32c (8 bytes per block, in 32-byte tag slots)",
        "incompat 0x40",
    ]);
    let j = t.run(&["info", "v.bgv", "--json"]).code(0).json();
    assert_eq!(j["tag_size"], 32);
    let d = t.dump("v.bgv", 5, &[]);
    let tag = d["blocks"][0]["slots"][0]["tag"].as_str().unwrap().to_string();
    assert_eq!(
        tag.len(),
        16,
        "dump shows the crc32c tag without its padding: {tag}"
    );
    t.run(&["check", "v.bgv"]).code(0).out_has(&["0 bad"]);
    t.run(&["scrub", "v.bgv"]).code(0);
    t.run(&["export", "v.bgv", "out"]).code(0);
    assert_eq!(&t.read("out")[..raw.len()], &raw[..]);

    // Up: crc32c -> blake3-keyed.
    t.run(&[
        "retag",
        "v.bgv",
        "--profile",
        "blake3-keyed",
        "--new-key-file",
        "k",
    ])
    .code(0);
    t.run(&["info", "v.bgv"])
        .code(0)
        .out_has(&["blake3-keyed (32 bytes per block"]);
    t.run(&["check", "v.bgv"]).code(2);
    t.run(&["check", "v.bgv", "--key-file", "k"])
        .code(0)
        .out_has(&["0 bad"]);
    t.run(&["scrub", "v.bgv", "--key-file", "k"]).code(0);
    let d = t.dump("v.bgv", 5, &["--key-file", "k"]);
    let tag = d["blocks"][0]["accepted"][0].as_str().unwrap().to_string();
    assert_eq!(tag.len(), 64, "{d}");
    t.run(&["export", "v.bgv", "out2", "--key-file", "k"]).code(0);
    assert_eq!(&t.read("out2")[..raw.len()], &raw[..]);

    // Down: blake3-keyed -> crc32c (sealed with the key).
    t.run(&["retag", "v.bgv", "--profile", "crc32c"]).code(2);
    t.run(&["retag", "v.bgv", "--profile", "crc32c", "--key-file", "k"])
        .code(0);
    t.run(&["info", "v.bgv"])
        .code(0)
        .out_has(&["crc32c (8 bytes per block, in 32-byte tag slots)"]);
    t.run(&["check", "v.bgv"]).code(0).out_has(&["0 bad"]);
    t.run(&["check", "v.bgv", "--key-file", "k"]).code(2);
    t.run(&["export", "v.bgv", "out3"]).code(0);
    assert_eq!(&t.read("out3")[..raw.len()], &raw[..]);
    // A profile that does not fit is refused with the list of those that do.
    let t2 = T::new();
    t2.run(&["format", "n.bgv", "--size", "1M"]).code(0);
    t2.run(&["retag", "n.bgv", "--profile", "sha256"])
        .code(2)
        .err_has(&["8-byte tag"]);
}

/// A bit flipped in the zero padding of a written block's slot: `check` exits 1 naming the
/// block, `export` fails naming it, `dump` shows the whole slot.
#[test]
fn padding_flip_is_found_by_check_and_export() {
    let t = T::new();
    t.run(&["format", "v.bgv", "--size", "2M", "--tag-room", "16"])
        .code(0);
    fs::write(t.path("raw"), random_bytes(1 << 20, 9)).unwrap();
    t.run(&["import", "raw", "v.bgv"]).code(0);
    let d = t.dump("v.bgv", 7, &[]);
    let l = &d["blocks"][0]["location"];
    let meta = l["meta_offsets"][0].as_u64().unwrap();
    let at = l["tag_offset_in_meta"].as_u64().unwrap();
    // Slot 0 holds the tag (first write of the group: generation 1).
    assert_eq!(d["blocks"][0]["slots"][0]["state"], "valid");
    t.flip("v.bgv", meta + at + 12, 0x10);
    let o = t.run(&["check", "v.bgv"]);
    o.code(1);
    assert!(
        o.stdout.contains('7') || o.stderr.contains('7'),
        "check does not name block 7:\n{}\n{}",
        o.stdout,
        o.stderr
    );
    t.run(&["export", "v.bgv", "out"]).code(1);
    let d = t.dump("v.bgv", 7, &[]);
    eprintln!("{}", d["blocks"][0]);
}

/// `format --mirror` and `format --metadata-device` with `--tag-room 32`: info shows the
/// slots on every copy, a re-tag up to hmac-sha256 and `check`/`scrub`/`export` work, and a
/// re-tag down to xxh3 reopens without a key.
#[test]
fn mirror_and_metadata_device_with_tag_room() {
    let t = T::new();
    fs::write(t.path("k"), "ab".repeat(32)).unwrap();
    let raw = random_bytes(1 << 20, 3);
    fs::write(t.path("raw"), &raw).unwrap();
    t.run(&[
        "format",
        "a.bgv",
        "--size",
        "2M",
        "--tag-room",
        "32",
        "--mirror",
        "b.bgv",
    ])
    .code(0);
    t.run(&[
        "format",
        "d.bgv",
        "--size",
        "2M",
        "--tag-room",
        "32",
        "--metadata-device",
        "d.meta",
    ])
    .code(0);
    for vol in ["a.bgv", "d.bgv"] {
        t.run(&["import", "raw", vol]).code(0);
        t.run(&["info", vol]).code(0).out_has(&["in 32-byte tag slots"]);
        t.run(&["retag", vol, "--profile", "hmac-sha256", "--new-key-file", "k"])
            .code(0);
        t.run(&["check", vol, "--key-file", "k"])
            .code(0)
            .out_has(&["0 bad"]);
        t.run(&["scrub", vol, "--key-file", "k"]).code(0);
        t.run(&["export", vol, &format!("{vol}.out"), "--key-file", "k"])
            .code(0);
        assert_eq!(&t.read(&format!("{vol}.out"))[..raw.len()], &raw[..]);
        t.run(&["retag", vol, "--profile", "xxh3", "--key-file", "k"])
            .code(0);
        t.run(&["info", vol])
            .code(0)
            .out_has(&["xxh3 (8 bytes per block, in 32-byte tag slots)"]);
        t.run(&["check", vol]).code(0).out_has(&["0 bad"]);
    }
    t.run(&["info", "b.bgv"])
        .code(0)
        .out_has(&["xxh3 (8 bytes per block, in 32-byte tag slots)"]);
    t.run(&["mirror", "list", "a.bgv"]).code(0);
}

/// `retag` misuse across sizes: a key for an unkeyed target, no key for a keyed one, a target
/// too large for the slots, the volume's own profile — exit 2, volume unchanged.
#[test]
fn retag_misuse_is_refused_and_changes_nothing() {
    let t = T::new();
    fs::write(t.path("k"), "cd".repeat(32)).unwrap();
    t.run(&["format", "v.bgv", "--size", "1M", "--tag-room", "16"])
        .code(0);
    fs::write(t.path("raw"), random_bytes(200_000, 4)).unwrap();
    t.run(&["import", "raw", "v.bgv"]).code(0);
    let before = t.read("v.bgv");
    for args in [
        vec![
            "retag",
            "v.bgv",
            "--profile",
            "blake3-keyed",
            "--new-key-file",
            "k",
        ],
        vec![
            "retag",
            "v.bgv",
            "--profile",
            "hmac-sha256",
            "--new-key-file",
            "k",
        ],
        vec!["retag", "v.bgv", "--profile", "sha256", "--new-key-file", "k"],
        vec!["retag", "v.bgv", "--profile", "xxh3", "--key-file", "k"],
        vec!["retag", "v.bgv", "--profile", "crc32c"],
        vec!["retag", "v.bgv", "--profile", "nope"],
        vec!["retag", "v.bgv"],
    ] {
        let o = t.run(&args);
        o.code(2);
        assert_eq!(
            t.read("v.bgv"),
            before,
            "{args:?} changed the volume:\n{}",
            o.stderr
        );
    }
    t.run(&["retag", "v.bgv", "--profile", "nvme-pi64"]).code(0);
    t.run(&["info", "v.bgv"])
        .code(0)
        .out_has(&["nvme-pi64 (16 bytes per block"]);
    t.run(&["check", "v.bgv"]).code(0).out_has(&["0 bad"]);
    t.run(&["retag", "v.bgv", "--profile", "t10-dif"]).code(0);
    t.run(&["info", "v.bgv"])
        .code(0)
        .out_has(&["t10-dif (8 bytes per block, in 16-byte tag slots)"]);
    t.run(&["check", "v.bgv"]).code(0).out_has(&["0 bad"]);
}
