//! The NBD client's TLS start against scripted servers on loopback TCP (the real-server tests,
//! nbdkit and blockguard's own server, are the CLI's `nbd_remote_tls`): a server that refuses
//! `STARTTLS`, one that acknowledges it and then says nothing (the TLS handshake is bounded
//! by the connect timeout), and one that sends plain text where the TLS handshake should be.
//! Each is a clear error naming the URI, in bounded time.

use blockguard_backend::{NbdBackend, NbdError, NbdOptions};
use std::io::{Read, Write};
use std::net::{TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::thread;
use std::time::{Duration, Instant};

const REPLY_MAGIC_OPT: u64 = 0x0003_e889_0455_65a9;
const OPT_STARTTLS: u32 = 5;

/// A self-signed CA certificate made by `openssl` in `dir` (the client loads it before
/// connecting; these servers never get as far as showing a certificate).
fn ca_file(dir: &Path) -> PathBuf {
    let out = Command::new("openssl")
        .current_dir(dir)
        .args([
            "req",
            "-x509",
            "-newkey",
            "rsa:2048",
            "-nodes",
            "-keyout",
            "ca-key.pem",
            "-out",
            "ca-cert.pem",
            "-days",
            "2",
            "-subj",
            "/CN=test CA",
        ])
        .output()
        .expect("openssl is installed (scripts/install-deps.sh)");
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    dir.join("ca-cert.pem")
}

/// A server on a loopback port that greets, reads the client's flags and first option
/// (checking it is STARTTLS), answers with `reply`, writes `after`, and holds the connection
/// open for `hold`.
fn scripted(reply: u32, after: &'static [u8], hold: Duration) -> (u16, thread::JoinHandle<()>) {
    let l = TcpListener::bind("127.0.0.1:0").unwrap();
    let port = l.local_addr().unwrap().port();
    let t = thread::spawn(move || {
        let (mut s, _) = l.accept().unwrap();
        let mut greet = Vec::new();
        greet.extend_from_slice(b"NBDMAGICIHAVEOPT");
        greet.extend_from_slice(&3u16.to_be_bytes());
        s.write_all(&greet).unwrap();
        let mut flags_and_option = [0u8; 4 + 16];
        s.read_exact(&mut flags_and_option).unwrap();
        let opt = u32::from_be_bytes(flags_and_option[12..16].try_into().unwrap());
        assert_eq!(opt, OPT_STARTTLS, "the first option of an nbds client");
        let mut r = Vec::new();
        r.extend_from_slice(&REPLY_MAGIC_OPT.to_be_bytes());
        r.extend_from_slice(&OPT_STARTTLS.to_be_bytes());
        r.extend_from_slice(&reply.to_be_bytes());
        r.extend_from_slice(&0u32.to_be_bytes());
        r.extend_from_slice(after);
        s.write_all(&r).unwrap();
        thread::sleep(hold);
        drop::<TcpStream>(s);
    });
    (port, t)
}

fn connect(port: u16, ca: &Path) -> (NbdError, Duration) {
    let opts = NbdOptions {
        connect_timeout: Duration::from_secs(1),
        tls_ca: Some(ca.to_path_buf()),
        ..NbdOptions::default()
    };
    let uri = format!("nbds://127.0.0.1:{port}/x");
    let start = Instant::now();
    let e = NbdBackend::connect(&uri, &opts).expect_err("the connection is refused");
    assert!(e.to_string().contains(&uri), "the message names the URI: {e}");
    (e, start.elapsed())
}

#[test]
fn a_server_that_refuses_starttls() {
    let dir = tempfile::tempdir().unwrap();
    let ca = ca_file(dir.path());
    let (port, t) = scripted((1 << 31) + 1, b"", Duration::ZERO);
    let (e, _) = connect(port, &ca);
    assert!(matches!(e, NbdError::StartTlsRefused { .. }), "{e}");
    assert!(e.to_string().contains("does not support TLS"), "{e}");
    t.join().unwrap();
}

#[test]
fn a_server_silent_after_starttls_times_out() {
    let dir = tempfile::tempdir().unwrap();
    let ca = ca_file(dir.path());
    let (port, t) = scripted(1, b"", Duration::from_secs(4));
    let (e, took) = connect(port, &ca);
    assert!(matches!(e, NbdError::Tls { .. }), "{e}");
    assert!(e.to_string().contains("in time"), "{e}");
    assert!(
        took < Duration::from_secs(3),
        "took {took:?} with a 1 s connect timeout"
    );
    t.join().unwrap();
}

#[test]
fn plain_text_where_the_tls_handshake_should_be_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    let ca = ca_file(dir.path());
    // An injected option reply, as a man in the middle would send (the STARTTLS flaw): it
    // must reach the TLS handshake and fail it, never be read as NBD.
    let (port, t) = scripted(
        1,
        b"\x00\x03\xe8\x89\x04\x55\x65\xa9 injected",
        Duration::from_millis(500),
    );
    let (e, _) = connect(port, &ca);
    assert!(matches!(e, NbdError::Tls { .. }), "{e}");
    t.join().unwrap();
}
