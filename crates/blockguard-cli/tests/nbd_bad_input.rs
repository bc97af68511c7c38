//! Bad input over raw sockets: each case gets the specification's error reply or a
//! disconnect of that client alone; the server keeps serving and acknowledged writes stay.

mod nbd_support;

use blockguard_nbd::client::{self, Client, ClientOptions};
use blockguard_nbd::proto;
use nbd_support::*;
use std::io::{Read, Write};
use std::os::unix::net::UnixStream;
use std::time::Duration;

const SIZE: u64 = 64 << 20;
const MAX: u64 = 32 << 20;

struct Fixture {
    _dir: tempfile::TempDir,
    srv: Served,
    /// Written with FUA before any bad input; must read back at the end of every test.
    canary: Vec<u8>,
}

impl Fixture {
    fn new() -> Fixture {
        let dir = tempfile::tempdir().unwrap();
        let vol = make_volume(dir.path(), "v.bgv", "64M");
        let srv = Served::start(&vol, &[]);
        let canary = random_bytes(65536, 99);
        let f = Fixture {
            _dir: dir,
            srv,
            canary,
        };
        let canary = f.canary.clone();
        assert_eq!(
            f.client().write(1 << 20, &canary, proto::CMD_FLAG_FUA).unwrap(),
            0
        );
        f
    }

    fn raw(&self) -> UnixStream {
        let s = self.srv.connect();
        s.set_read_timeout(Some(Duration::from_secs(20))).unwrap();
        s
    }

    fn client_with(&self, opts: &ClientOptions) -> Client<UnixStream> {
        Client::handshake(self.raw(), opts).expect("handshake")
    }

    fn client(&self) -> Client<UnixStream> {
        self.client_with(&ClientOptions::default())
    }

    /// A raw connection past the greeting and client flags.
    fn negotiating(&self) -> UnixStream {
        let mut s = self.raw();
        client::read_greeting(&mut s).unwrap();
        s.write_all(&1u32.to_be_bytes()).unwrap();
        s
    }

    /// The server is alive, serves a new client, and the canary is intact.
    fn still_fine(&mut self) {
        assert!(self.srv.is_running(), "server died:\n{}", self.srv.log_text());
        let mut c = self.client();
        let got = c.read(1 << 20, 65536).unwrap().expect("canary read");
        assert!(got == self.canary, "acknowledged write lost");
        c.disconnect().unwrap();
    }
}

/// True if the server closed the connection (EOF or reset).
fn closed_by_server(s: &mut UnixStream) -> bool {
    let mut buf = [0u8; 256];
    loop {
        match s.read(&mut buf) {
            Ok(0) | Err(_) => return true,
            Ok(_) => continue,
        }
    }
}

#[test]
fn wrong_magic_and_bad_flags_disconnect_only_that_client() {
    let mut f = Fixture::new();
    let mut bystander = f.client();
    // Wrong option magic.
    let mut s = f.negotiating();
    s.write_all(b"IHAVEOPX\0\0\0\x03\0\0\0\0").unwrap();
    assert!(closed_by_server(&mut s));
    // Unknown client flags.
    let mut s = f.raw();
    client::read_greeting(&mut s).unwrap();
    s.write_all(&0x80u32.to_be_bytes()).unwrap();
    assert!(closed_by_server(&mut s));
    // Wrong request magic in transmission.
    let mut c = f.client();
    c.stream().write_all(&[0x55; 28]).unwrap();
    assert!(closed_by_server(c.stream()));
    // The other client never noticed.
    assert!(bystander.read(1 << 20, 65536).unwrap().unwrap() == f.canary);
    f.still_fine();
}

#[test]
fn unknown_options_and_starttls_get_errors_and_negotiation_continues() {
    let mut f = Fixture::new();
    let mut s = f.negotiating();
    for (opt, want) in [
        (0x1234u32, proto::REP_ERR_UNSUP),
        (proto::OPT_STARTTLS, proto::REP_ERR_UNSUP),
        (proto::OPT_PEEK_EXPORT, proto::REP_ERR_UNSUP),
        (proto::OPT_LIST, proto::REP_SERVER),
    ] {
        client::send_option(&mut s, opt, &[]).unwrap();
        let r = client::read_option_reply(&mut s).unwrap();
        assert_eq!((r.opt, r.typ), (opt, want));
        if want == proto::REP_SERVER {
            assert_eq!(client::read_option_reply(&mut s).unwrap().typ, proto::REP_ACK);
        }
    }
    // Malformed GO, unknown export, then a good GO.
    client::send_option(&mut s, proto::OPT_GO, &[0, 0, 0, 9]).unwrap();
    assert_eq!(
        client::read_option_reply(&mut s).unwrap().typ,
        proto::REP_ERR_INVALID
    );
    client::send_option(&mut s, proto::OPT_GO, &client::info_request("nope", &[])).unwrap();
    assert_eq!(
        client::read_option_reply(&mut s).unwrap().typ,
        proto::REP_ERR_UNKNOWN
    );
    client::send_option(&mut s, proto::OPT_GO, &client::info_request("", &[])).unwrap();
    loop {
        let r = client::read_option_reply(&mut s).unwrap();
        if r.typ == proto::REP_ACK {
            break;
        }
        assert_eq!(r.typ, proto::REP_INFO);
    }
    // Oversized option data is skipped and refused.
    let mut s = f.negotiating();
    client::send_option(&mut s, proto::OPT_INFO, &vec![0u8; 1 << 20]).unwrap();
    assert_eq!(
        client::read_option_reply(&mut s).unwrap().typ,
        proto::REP_ERR_TOO_BIG
    );
    // ABORT is acknowledged.
    client::send_option(&mut s, proto::OPT_ABORT, &[]).unwrap();
    assert_eq!(client::read_option_reply(&mut s).unwrap().typ, proto::REP_ACK);
    assert!(closed_by_server(&mut s));
    f.still_fine();
}

#[test]
fn bad_requests_get_spec_errors() {
    let mut f = Fixture::new();
    for opts in [
        ClientOptions::default(),
        ClientOptions {
            extended: true,
            ..ClientOptions::default()
        },
        ClientOptions {
            structured: false,
            ..ClientOptions::default()
        },
    ] {
        let mut c = f.client_with(&opts);
        let cases: &[(u16, u16, u64, u64, u32)] = &[
            (42, 0, 0, 0, proto::EINVAL),                      // unknown command
            (proto::CMD_READ, 1 << 12, 0, 512, proto::EINVAL), // unknown flag
            (proto::CMD_FLUSH, proto::CMD_FLAG_REQ_ONE, 0, 0, proto::EINVAL), // wrong flag
            (proto::CMD_READ, 0, SIZE - 1, 2, proto::EINVAL),  // past the end
            (proto::CMD_READ, 0, u64::MAX - 10, 100, proto::EINVAL), // offset overflow
            (proto::CMD_TRIM, 0, SIZE, 1, proto::EINVAL),
            (proto::CMD_WRITE_ZEROES, 0, SIZE - 4096, 8192, proto::ENOSPC),
            (proto::CMD_CACHE, 0, SIZE + 4096, 1, proto::EINVAL),
            (proto::CMD_FLUSH, 0, 4096, 0, proto::EINVAL),
            (proto::CMD_READ, 0, 0, 0, 0), // zero length: fine
            (proto::CMD_TRIM, 0, 0, 0, 0),
            (proto::CMD_WRITE_ZEROES, 0, 0, 0, 0),
        ];
        for &(typ, flags, off, len, want) in cases {
            let r = c.call(typ, flags, off, len, &[]).unwrap();
            assert_eq!(r.errno, want, "{opts:?} cmd {typ} flags {flags:#x} {off}+{len}");
        }
        assert_eq!(c.write(SIZE - 10, &[1; 20], 0).unwrap(), proto::ENOSPC);
        assert_eq!(c.write(SIZE, &[], 0).unwrap(), 0);
        if opts.structured {
            // Reads larger than the advertised maximum: EOVERFLOW, connection kept.
            let r = c.call(proto::CMD_READ, 0, 0, MAX + 1, &[]).unwrap();
            assert_eq!(r.errno, proto::EOVERFLOW);
            let r = c.call(proto::CMD_BLOCK_STATUS, 0, SIZE, 4096, &[]).unwrap();
            assert_eq!(r.errno, proto::EINVAL);
        }
        assert!(c.read(1 << 20, 65536).unwrap().unwrap() == f.canary);
    }
    f.still_fine();
}

#[test]
fn oversized_write_disconnects_that_client() {
    let mut f = Fixture::new();
    let mut c = f.client();
    // Announce 33 MiB of payload: more than the advertised maximum. The server hangs up
    // instead of reading it.
    c.send_request(proto::CMD_WRITE, 0, 0, MAX + 1, &[0u8; 4096])
        .unwrap_or(0);
    assert!(closed_by_server(c.stream()));
    f.still_fine();
}

#[test]
fn disconnect_mid_write_and_mid_handshake_lose_nothing() {
    let mut f = Fixture::new();
    // Header of a 64 KiB write over the canary, then only half the payload, then hang up.
    let mut c = f.client();
    let mut hdr = Vec::new();
    hdr.extend_from_slice(&proto::REQUEST_MAGIC.to_be_bytes());
    hdr.extend_from_slice(&0u16.to_be_bytes());
    hdr.extend_from_slice(&proto::CMD_WRITE.to_be_bytes());
    hdr.extend_from_slice(&1u64.to_be_bytes());
    hdr.extend_from_slice(&(1u64 << 20).to_be_bytes());
    hdr.extend_from_slice(&65536u32.to_be_bytes());
    hdr.extend_from_slice(&[0xee; 32768]);
    c.stream().write_all(&hdr).unwrap();
    drop(c);
    // Mid-handshake: right after connecting, after the flags, half an option.
    drop(f.raw());
    drop(f.negotiating());
    let mut s = f.negotiating();
    s.write_all(&proto::IHAVEOPT.to_be_bytes()).unwrap();
    s.write_all(&[0, 0, 0, 7, 0, 0, 1]).unwrap();
    drop(s);
    // Garbage instead of client flags, and a flood of garbage.
    let mut s = f.raw();
    s.write_all(&random_bytes(7, 1)).unwrap();
    drop(s);
    let mut s = f.raw();
    let _ = s.write_all(&random_bytes(100_000, 2));
    assert!(closed_by_server(&mut s));
    // A client that hangs up without NBD_CMD_DISC, with a write acknowledged.
    let mut c = f.client();
    assert_eq!(c.write(2 << 20, b"no disc", proto::CMD_FLAG_FUA).unwrap(), 0);
    drop(c);
    let mut c = f.client();
    assert_eq!(c.read(2 << 20, 7).unwrap().unwrap(), b"no disc");
    f.still_fine();
}

#[test]
fn many_idle_connections_do_not_affect_others() {
    let mut f = Fixture::new();
    let mut idle = Vec::new();
    for i in 0..150 {
        match i % 3 {
            0 => idle.push(f.raw()),
            1 => idle.push(f.negotiating()),
            _ => {
                let c = f.client();
                idle.push(c.stream_owned());
            }
        }
    }
    let start = std::time::Instant::now();
    let mut c = f.client();
    for i in 0..50u64 {
        assert_eq!(c.write((4 << 20) + i * 512, &[i as u8; 512], 0).unwrap(), 0);
    }
    assert_eq!(c.read((4 << 20) + 49 * 512, 512).unwrap().unwrap(), vec![49; 512]);
    assert!(
        start.elapsed() < Duration::from_secs(10),
        "idle connections slowed the server"
    );
    drop(idle);
    f.still_fine();
}

#[test]
fn extended_headers_round_trip() {
    let mut f = Fixture::new();
    let opts = ClientOptions {
        extended: true,
        ..ClientOptions::default()
    };
    let mut c = f.client_with(&opts);
    assert_eq!(c.mode, blockguard_nbd::ReplyMode::Extended);
    assert_eq!(c.write(8 << 20, &[9; 1000], 0).unwrap(), 0);
    assert_eq!(c.read(8 << 20, 1000).unwrap().unwrap(), vec![9; 1000]);
    let r = c.call(proto::CMD_BLOCK_STATUS, 0, 0, SIZE, &[]).unwrap();
    assert_eq!(r.errno, 0);
    let Some(client::Chunk::BlockStatus { extents, .. }) = r.chunks.first() else {
        panic!("{r:?}")
    };
    let total: u64 = extents.iter().map(|e| e.0).sum();
    assert_eq!(total, SIZE);
    assert!(extents.iter().any(|e| e.1 == 0) && extents.iter().any(|e| e.1 == 3));
    f.still_fine();
}
