//! A data block corrupted on disk while the server is stopped: reads of it fail with EIO (a
//! structured error chunk at its offset), the log names the block, every other block still
//! reads, and the server keeps serving.

mod nbd_support;

use blockguard_nbd::client::{Chunk, Client, ClientOptions};
use blockguard_nbd::proto;
use nbd_support::*;
use std::time::Duration;

const BS: u64 = 4096;
const BAD: u64 = 10;

#[test]
fn corrupted_block_fails_with_eio_and_others_still_read() {
    require("qemu-io");
    let dir = tempfile::tempdir().unwrap();
    let vol = make_volume(dir.path(), "v.bgv", "16M");
    let data = random_bytes(32 * BS as usize, 42);
    let mut srv = Served::start(&vol, &[]);
    {
        let s = srv.connect();
        s.set_read_timeout(Some(Duration::from_secs(20))).unwrap();
        let mut c = Client::handshake(s, &ClientOptions::default()).unwrap();
        assert_eq!(c.write(0, &data, proto::CMD_FLAG_FUA).unwrap(), 0);
    }
    assert!(srv.signal("TERM").success());
    flip_byte(&vol, data_block_offset(&vol, BAD) + 1234);
    let mut srv = Served::start(&vol, &[]);
    let uri = srv.uri();

    // A real client: the bad block fails with an I/O error, its neighbours read fine.
    let out = run_any(
        "qemu-io",
        &[
            "-f",
            "raw",
            "-c",
            &format!("read {} {}", BAD * BS, BS),
            "-c",
            &format!("read {} {}", (BAD - 1) * BS, BS),
            "-c",
            &format!("read {} {}", (BAD + 1) * BS, BS),
            &uri,
        ],
    );
    // qemu-io exits non-zero when a command failed.
    assert!(!out.status.success());
    let out = format!("{}{}", stdout(&out), String::from_utf8_lossy(&out.stderr));
    assert!(out.contains("read failed: Input/output error"), "{out}");
    assert!(
        out.contains(&format!("read 4096/4096 bytes at offset {}", (BAD - 1) * BS)),
        "{out}"
    );
    assert!(
        out.contains(&format!("read 4096/4096 bytes at offset {}", (BAD + 1) * BS)),
        "{out}"
    );

    // Structured replies: good data chunks around one ERROR_OFFSET chunk at the bad block.
    let s = srv.connect();
    s.set_read_timeout(Some(Duration::from_secs(20))).unwrap();
    let mut c = Client::handshake(s, &ClientOptions::default()).unwrap();
    let r = c.call(proto::CMD_READ, 0, 8 * BS + 100, 4 * BS, &[]).unwrap();
    assert_eq!(r.errno, proto::EIO);
    let mut error_offsets = Vec::new();
    for chunk in &r.chunks {
        match chunk {
            Chunk::Data { offset, data: d } => {
                let o = *offset as usize;
                assert!(*d == data[o..o + d.len()], "good data must be correct");
                assert!(o + d.len() <= (BAD * BS) as usize || o >= ((BAD + 1) * BS) as usize);
            }
            Chunk::Error {
                errno,
                offset,
                message,
            } => {
                assert_eq!(*errno, proto::EIO);
                assert!(message.contains("block 10"), "{message}");
                error_offsets.push(offset.expect("error chunk carries the offset"));
            }
            other => panic!("unexpected chunk {other:?}"),
        }
    }
    assert_eq!(error_offsets, vec![BAD * BS]);

    // Simple replies: plain EIO.
    let s = srv.connect();
    s.set_read_timeout(Some(Duration::from_secs(20))).unwrap();
    let opts = ClientOptions {
        structured: false,
        ..ClientOptions::default()
    };
    let mut simple = Client::handshake(s, &opts).unwrap();
    assert_eq!(simple.read(BAD * BS, 1).unwrap(), Err(proto::EIO));
    assert!(simple.read(0, (BAD * BS) as usize).unwrap().unwrap() == data[..(BAD * BS) as usize]);

    // Still serving, and the log names the block.
    assert!(srv.is_running());
    assert!(c.read(20 * BS, BS as usize).unwrap().unwrap() == data[20 * BS as usize..21 * BS as usize]);
    let log = srv.log_text();
    assert!(log.contains("block 10"), "{log}");
    assert!(log.contains("integrity failure"), "{log}");

    // Rewriting the block repairs it.
    assert_eq!(
        c.write(BAD * BS, &[7u8; BS as usize], proto::CMD_FLAG_FUA)
            .unwrap(),
        0
    );
    assert_eq!(
        c.read(BAD * BS, BS as usize).unwrap().unwrap(),
        vec![7u8; BS as usize]
    );
}

/// Issue 8, case 4, with real clients: one flipped bit in a metadata sector of a group written
/// once. Block status must not report any written block as a hole (v1 said `hole,zero` for the
/// whole group, and `qemu-img convert` copied zeros and exited 0); the copy must fail.
#[test]
fn damaged_metadata_is_never_a_hole_and_a_copy_fails() {
    require("qemu-img");
    require("nbdinfo");
    let dir = tempfile::tempdir().unwrap();
    let vol = make_volume(dir.path(), "v.bgv", "16M");
    // Every block of the first 4 MiB written once (what `import` leaves).
    let raw = dir.path().join("raw");
    let data = random_bytes(4 << 20, 77);
    std::fs::write(&raw, &data).unwrap();
    run(
        BIN,
        &["import", raw.to_str().unwrap(), vol.to_str().unwrap(), "--force"],
    );
    // A bit of slot 0's first metadata sector of group 0.
    let meta = data_block_offset(&vol, 0) - 2 * BS;
    flip_byte(&vol, meta + 40);
    let check = run_any(BIN, &["check", vol.to_str().unwrap()]);
    assert_eq!(check.status.code(), Some(1), "check finds the damage");
    assert!(
        stdout(&check).contains("damaged metadata: group 0 sector 0"),
        "{}",
        stdout(&check)
    );

    let mut srv = Served::start(&vol, &["--read-only"]);
    let uri = srv.uri();
    let map = run("nbdinfo", &["--map", &uri]);
    let map = stdout(&map);
    assert!(
        map.lines()
            .next()
            .is_some_and(|l| l.split_whitespace().next() == Some("0")),
        "a map from offset 0: {map}"
    );
    // Every line of the map: offset, length, type, description.
    for line in map.lines() {
        let cols: Vec<&str> = line.split_whitespace().collect();
        let (off, len): (u64, u64) = (cols[0].parse().unwrap(), cols[1].parse().unwrap());
        if line.contains("hole") {
            assert!(
                off >= data.len() as u64,
                "written bytes {off}..{} reported as a hole: {map}",
                off + len
            );
        }
    }
    let out = dir.path().join("out.raw");
    let copy = run_any(
        "qemu-img",
        &["convert", "-f", "raw", "-O", "raw", &uri, out.to_str().unwrap()],
    );
    assert!(
        !copy.status.success(),
        "qemu-img convert of a damaged volume must fail, not copy zeros"
    );
    assert!(srv.is_running());
    drop(srv);
}

/// `serve --error-policy read-only` overrides the volume's `eio`: after a read finds a block
/// with no good copy, writes are refused (`NBD_EPERM`) while reads go on, and the log says why
/// and what to do. Nothing new reaches the disk any more: a write acknowledged before the
/// suspension but never flushed is left unwritten at shutdown, which says so (exit status 2).
/// The volume's own policy is unchanged.
#[test]
fn serve_error_policy_read_only_suspends_writes_after_an_unrepairable_block() {
    let dir = tempfile::tempdir().unwrap();
    let vol = make_volume(dir.path(), "v.bgv", "16M");
    let data = random_bytes(32 * BS as usize, 43);
    let mut srv = Served::start(&vol, &[]);
    {
        let mut c = srv.client();
        assert_eq!(c.write(0, &data, proto::CMD_FLAG_FUA).unwrap(), 0);
    }
    assert!(srv.signal("TERM").success());
    flip_byte(&vol, data_block_offset(&vol, BAD) + 99);
    let mut srv = Served::start(&vol, &["--error-policy", "read-only"]);
    let mut c = srv.client();
    // Writes work until a read meets the block.
    assert_eq!(c.write(BS, &[1u8; BS as usize], proto::CMD_FLAG_FUA).unwrap(), 0);
    assert_eq!(c.write(3 * BS, &[3u8; BS as usize], 0).unwrap(), 0);
    assert_eq!(c.read(BAD * BS, BS as usize).unwrap(), Err(proto::EIO));
    assert_eq!(c.write(2 * BS, &[2u8; BS as usize], 0).unwrap(), proto::EPERM);
    let flush = c.call(proto::CMD_FLUSH, 0, 0, 0, &[]).unwrap();
    assert_eq!(
        flush.errno,
        proto::EPERM,
        "the flush would commit the staged write"
    );
    assert!(c.read(20 * BS, BS as usize).unwrap().unwrap() == data[20 * BS as usize..21 * BS as usize]);
    assert!(srv.is_running());
    let status = srv.signal("TERM");
    let log = srv.log_text();
    assert_eq!(status.code(), Some(2), "{log}");
    assert!(log.contains("writes are suspended"), "{log}");
    assert!(log.contains("blockguard resume"), "{log}");
    assert!(log.contains("unwritten (blocks 3)"), "{log}");
    // The stored policy is still eio; the flushed write is there, the unflushed one is not.
    let info = stdout(&run(BIN, &["info", vol.to_str().unwrap(), "--json"]));
    assert!(info.contains("\"error_policy\": \"eio\""), "{info}");
    assert!(info.contains("\"state\": \"clean\""), "{info}");
    let mut srv = Served::start(&vol, &[]);
    let mut c = srv.client();
    assert_eq!(c.read(BS, BS as usize).unwrap().unwrap(), vec![1u8; BS as usize]);
    assert!(c.read(3 * BS, BS as usize).unwrap().unwrap() == data[3 * BS as usize..4 * BS as usize]);
    assert_eq!(c.read(BAD * BS, BS as usize).unwrap(), Err(proto::EIO));
    assert_eq!(
        c.write(2 * BS, &[2u8; BS as usize], 0).unwrap(),
        0,
        "eio does not suspend"
    );
    assert!(srv.signal("TERM").success());
}
