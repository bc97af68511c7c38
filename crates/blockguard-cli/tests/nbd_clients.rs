//! `blockguard serve` driven by real NBD clients: qemu-io, qemu-img, nbdinfo, nbdcopy.

mod nbd_support;

use nbd_support::*;
use std::io::{Read, Write};
use std::thread;

/// qemu-io issues each write with FUA and uses extended headers on qemu 10.
fn qemu_io(uri: &str, cmds: &[String]) -> String {
    let mut args = vec!["-f".to_string(), "raw".to_string()];
    for c in cmds {
        args.push("-c".into());
        args.push(c.clone());
    }
    args.push(uri.to_string());
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    let out = run("qemu-io", &args);
    let text = stdout(&out);
    // qemu-io exits 0 even when a command fails; failures are printed.
    assert!(
        !text.contains("failed") && !text.contains("Pattern verification"),
        "qemu-io reported a failure:\n{text}"
    );
    text
}

#[test]
fn qemu_io_patterned_io_at_odd_offsets_and_sizes() {
    require("qemu-io");
    let dir = tempfile::tempdir().unwrap();
    let vol = make_volume(dir.path(), "v.bgv", "64M");
    let srv = Served::start(&vol, &[]);
    let end = 64u64 << 20;
    // (pattern, offset, length): 1-byte and 513-byte I/O, block-straddling, last bytes.
    let cases: Vec<(u8, u64, u64)> = vec![
        (0x11, 1, 1),
        (0x22, 513, 513),
        (0x33, 4095, 4097),
        (0x44, (1 << 20) - 1, 3),
        (0x55, end - 513, 513),
        (0x66, 5 << 20, 1 << 20),
        (0x77, (7 << 20) + 100, 70_000),
    ];
    let mut cmds = Vec::new();
    for (p, off, len) in &cases {
        cmds.push(format!("write -P {p} {off} {len}"));
    }
    for (p, off, len) in &cases {
        cmds.push(format!("read -P {p} {off} {len}"));
    }
    // Neighbours of the written bytes are untouched zeroes.
    cmds.push("read -P 0 0 1".into());
    cmds.push("read -P 0 2 511".into());
    cmds.push(format!("read -P 0 {} 1", 1026));
    cmds.push("read -P 0 40M 1M".into());
    // Asynchronous writes in flight together, then a flush.
    cmds.push("aio_write -P 0x88 10M 64k".into());
    cmds.push("aio_write -P 0x99 11M 64k".into());
    cmds.push("aio_write -P 0xaa 12M 4k".into());
    cmds.push("aio_flush".into());
    cmds.push("read -P 0x88 10M 64k".into());
    cmds.push("read -P 0x99 11M 64k".into());
    cmds.push("read -P 0xaa 12M 4k".into());
    // Write zeroes (with and without unmap) and discard.
    cmds.push("write -z 5M 4k".into());
    cmds.push("read -P 0 5M 4k".into());
    cmds.push("read -P 0x66 5316608 4096".into());
    cmds.push("write -z -u 10M 64k".into());
    cmds.push("read -P 0 10M 64k".into());
    cmds.push("discard 11M 64k".into());
    cmds.push("read -P 0 11M 64k".into());
    cmds.push("flush".into());
    qemu_io(&srv.uri(), &cmds);
}

#[test]
fn qemu_img_info_convert_compare() {
    require("qemu-img");
    let dir = tempfile::tempdir().unwrap();
    let vol = make_volume(dir.path(), "v.bgv", "16M");
    let srv = Served::start(&vol, &[]);
    let uri = srv.uri();
    let info = stdout(&run("qemu-img", &["info", "--output=json", &uri]));
    assert!(info.contains("\"virtual-size\": 16777216"), "{info}");
    // A sparse source: random data in a few places, holes elsewhere.
    let src = dir.path().join("src.raw");
    {
        let f = std::fs::File::create(&src).unwrap();
        f.set_len(16 << 20).unwrap();
        use std::os::unix::fs::FileExt;
        for (i, off) in [0u64, 3 << 20, (9 << 20) + 4096, (16 << 20) - 65536]
            .iter()
            .enumerate()
        {
            f.write_all_at(&random_bytes(65536, i as u64 + 1), *off).unwrap();
        }
    }
    let s = src.to_str().unwrap();
    run("qemu-img", &["convert", "-n", "-f", "raw", "-O", "raw", s, &uri]);
    run("qemu-img", &["compare", "-f", "raw", "-F", "raw", s, &uri]);
    let out = dir.path().join("out.raw");
    let o = out.to_str().unwrap();
    run("qemu-img", &["convert", "-f", "raw", "-O", "raw", &uri, o]);
    assert_eq!(std::fs::read(&src).unwrap(), std::fs::read(&out).unwrap());
    // The map shows data where the source had data, holes elsewhere.
    let map = stdout(&run("qemu-img", &["map", "--output=json", "-f", "raw", &uri]));
    assert!(map.contains("\"data\": false"), "{map}");
    assert!(map.contains("\"data\": true"), "{map}");
}

#[test]
fn nbdinfo_size_capabilities_and_map() {
    require("nbdinfo");
    require("qemu-io");
    let dir = tempfile::tempdir().unwrap();
    let vol = make_volume(dir.path(), "v.bgv", "32M");
    let srv = Served::start(&vol, &["--export-name", "disk1"]);
    let uri = srv.uri();
    assert_eq!(stdout(&run("nbdinfo", &["--size", &uri])).trim(), "33554432");
    for cap in ["flush", "trim", "zero", "multi-conn", "fua", "fast-zero", "cache"] {
        run("nbdinfo", &["--can", cap, &uri]);
    }
    // Not read-only: `--is read-only` exits 2 for "false".
    assert_eq!(
        run_any("nbdinfo", &["--is", "read-only", &uri]).status.code(),
        Some(2)
    );
    let list = stdout(&run("nbdinfo", &["--list", &uri]));
    assert!(list.contains("disk1"), "{list}");
    // A fresh volume is one hole; after writing 1 MiB at 4 MiB, three extents.
    let map = stdout(&run("nbdinfo", &["--map", &uri]));
    assert_eq!(map.lines().count(), 1, "{map}");
    assert!(map.contains("hole,zero"), "{map}");
    qemu_io(&uri, &["write -P 1 4M 1M".into()]);
    let map = stdout(&run("nbdinfo", &["--map", &uri]));
    let lines: Vec<Vec<&str>> = map.lines().map(|l| l.split_whitespace().collect()).collect();
    assert_eq!(lines.len(), 3, "{map}");
    assert_eq!(&lines[0][..3], &["0", "4194304", "3"]);
    assert_eq!(&lines[1][..4], &["4194304", "1048576", "0", "data"]);
    assert_eq!(&lines[2][..3], &["5242880", "28311552", "3"]);
}

#[test]
fn nbdcopy_256_mib_in_and_out_byte_for_byte() {
    require("nbdcopy");
    let dir = tempfile::tempdir().unwrap();
    let vol = make_volume(dir.path(), "v.bgv", "256M");
    let srv = Served::start(&vol, &[]);
    let src = dir.path().join("in.raw");
    {
        let mut f = std::fs::File::create(&src).unwrap();
        for i in 0..64 {
            f.write_all(&random_bytes(4 << 20, 1000 + i)).unwrap();
        }
    }
    let out = dir.path().join("out.raw");
    let (s, o) = (src.to_str().unwrap(), out.to_str().unwrap());
    run("nbdcopy", &["--flush", s, &srv.uri()]);
    run("nbdcopy", &[&srv.uri(), o]);
    let (mut a, mut b) = (
        std::fs::File::open(&src).unwrap(),
        std::fs::File::open(&out).unwrap(),
    );
    let (mut ba, mut bb) = (vec![0u8; 1 << 20], vec![0u8; 1 << 20]);
    for mib in 0..256 {
        a.read_exact(&mut ba).unwrap();
        b.read_exact(&mut bb).unwrap();
        assert!(ba == bb, "copies differ in MiB {mib}");
    }
    assert_eq!(b.read(&mut bb).unwrap(), 0, "output longer than input");
    // nbdcopy used several connections (multi-conn) and all of them ended cleanly.
    let log = srv.log_text();
    assert!(log.matches("client connected").count() >= 2, "{log}");
}

#[test]
fn four_concurrent_connections() {
    require("qemu-io");
    let dir = tempfile::tempdir().unwrap();
    let vol = make_volume(dir.path(), "v.bgv", "32M");
    let srv = Served::start(&vol, &[]);
    let uri = srv.uri();
    let writers: Vec<_> = (0..4u64)
        .map(|i| {
            let uri = uri.clone();
            thread::spawn(move || {
                let cmds: Vec<String> = (0..16)
                    .map(|k| format!("aio_write -P {} {} 64k", i + 1, (i << 22) + k * 65536 * 3 + 1))
                    .chain(["aio_flush".to_string()])
                    .collect();
                qemu_io(&uri, &cmds);
            })
        })
        .collect();
    for w in writers {
        w.join().unwrap();
    }
    let readers: Vec<_> = (0..4u64)
        .map(|i| {
            let uri = uri.clone();
            thread::spawn(move || {
                let cmds: Vec<String> = (0..16)
                    .flat_map(|k| {
                        let off = (i << 22) + k * 65536 * 3 + 1;
                        [
                            format!("read -P {} {off} 64k", i + 1),
                            format!("read -P 0 {} 65536", off + 65536),
                        ]
                    })
                    .collect();
                qemu_io(&uri, &cmds);
            })
        })
        .collect();
    for r in readers {
        r.join().unwrap();
    }
}

#[test]
fn tcp_on_a_loopback_port() {
    require("nbdinfo");
    let dir = tempfile::tempdir().unwrap();
    let vol = make_volume(dir.path(), "v.bgv", "8M");
    let srv = Served::start_tcp(&vol, &[]);
    assert!(srv.uri().starts_with("nbd://127.0.0.1:"));
    assert_eq!(stdout(&run("nbdinfo", &["--size", &srv.uri()])).trim(), "8388608");
    let log = srv.log_text();
    assert!(
        log.contains("nbd://127.0.0.1:"),
        "log must say where it listens:\n{log}"
    );
}
