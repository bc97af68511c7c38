//! `blockguard serve` with TLS: real clients (qemu-img, qemu-io, nbdinfo, nbdcopy) connect
//! with the right CA and client certificate and are refused otherwise; plain text is
//! refused when TLS is required; what crosses the network is not the data in clear.
//! Certificates are made by `openssl` in each test's temporary directory.

mod nbd_support;

use nbd_support::pki::Pki;
use nbd_support::*;
use std::io::{Read, Write};
use std::net::{Shutdown, TcpListener, TcpStream};
use std::path::Path;
use std::sync::{Arc, Mutex};
use std::thread;

fn strs(v: &[String]) -> Vec<&str> {
    v.iter().map(String::as_str).collect()
}

/// libnbd's URI for a TLS connection to `port` with credentials `creds`.
fn nbds(port: u16, creds: &str) -> String {
    format!("nbds://localhost:{port}/?tls-certificates={creds}")
}

/// qemu's arguments for the export on `port` over TLS with credentials `creds`.
fn qemu_tls(port: u16, creds: &str) -> [String; 4] {
    [
        "--object".into(),
        format!("tls-creds-x509,id=tls0,endpoint=client,dir={creds}"),
        "--image-opts".into(),
        format!("driver=nbd,host=localhost,port={port},tls-creds=tls0"),
    ]
}

#[test]
fn qemu_and_nbdinfo_connect_with_the_right_ca_and_client_certificate() {
    for tool in ["qemu-img", "qemu-io", "nbdinfo"] {
        require(tool);
    }
    let dir = tempfile::tempdir().unwrap();
    let pki = Pki::new(dir.path());
    let vol = make_volume(dir.path(), "v.bgv", "16M");
    let srv = Served::start_tcp(&vol, &strs(&pki.serve_args("required", true)));
    let port = srv.tcp.unwrap();
    let right = pki.creds_dir("right");
    let size = stdout(&run("nbdinfo", &["--size", &nbds(port, &right)]));
    assert_eq!(size.trim(), "16777216");
    let mut args = qemu_tls(port, &right).to_vec();
    for c in [
        "write -P 0x5a 1M 1M",
        "read -P 0x5a 1M 1M",
        "read -P 0 0 1M",
        "flush",
    ] {
        args.extend(["-c".to_string(), c.to_string()]);
    }
    let out = stdout(&run("qemu-io", &strs(&args)));
    assert!(
        !out.contains("failed") && !out.contains("Pattern verification"),
        "{out}"
    );
    let mut args = vec!["info".to_string()];
    args.extend(qemu_tls(port, &right));
    let info = stdout(&run("qemu-img", &strs(&args)));
    assert!(info.contains("16 MiB"), "{info}");
    let log = srv.log_text();
    assert!(log.contains("TLS handshake complete"), "{log}");
}

#[test]
fn wrong_ca_missing_or_foreign_client_certificate_and_plain_text_are_refused() {
    for tool in ["qemu-img", "nbdinfo"] {
        require(tool);
    }
    let dir = tempfile::tempdir().unwrap();
    let pki = Pki::new(dir.path());
    let vol = make_volume(dir.path(), "v.bgv", "16M");
    let srv = Served::start_tcp(&vol, &strs(&pki.serve_args("required", true)));
    let port = srv.tcp.unwrap();
    for creds in ["wrong-ca", "no-client-cert", "stranger"] {
        let uri = nbds(port, &pki.creds_dir(creds));
        let out = run_any("nbdinfo", &["--size", &uri]);
        assert!(
            !out.status.success(),
            "nbdinfo with {creds} was served: {}",
            stdout(&out)
        );
        let mut args = vec!["info".to_string()];
        args.extend(qemu_tls(port, &pki.creds_dir(creds)));
        let out = run_any("qemu-img", &strs(&args));
        assert!(
            !out.status.success(),
            "qemu-img with {creds} was served: {}",
            stdout(&out)
        );
    }
    // Plain text: libnbd's nbd:// does not start TLS.
    let plain = format!("nbd://localhost:{port}/");
    let out = run_any("nbdinfo", &["--size", &plain]);
    assert!(
        !out.status.success(),
        "a plain-text client was served: {}",
        stdout(&out)
    );
    let log = srv.log_text();
    assert!(log.contains("TLS handshake failed"), "{log}");
    assert!(log.contains("TLS is required"), "{log}");
    assert!(
        !log.contains("client connected"),
        "a refused client got connected:\n{log}"
    );
}

/// The client's side of a fixed-newstyle handshake up to the first option, over plain TCP.
fn plain_handshake(port: u16) -> TcpStream {
    let mut s = TcpStream::connect(("127.0.0.1", port)).unwrap();
    s.set_read_timeout(Some(std::time::Duration::from_secs(20)))
        .unwrap();
    let mut greeting = [0u8; 18];
    s.read_exact(&mut greeting).unwrap();
    assert_eq!(&greeting[..16], b"NBDMAGICIHAVEOPT");
    s.write_all(&3u32.to_be_bytes()).unwrap();
    s
}

fn send_option(s: &mut TcpStream, opt: u32, data: &[u8]) {
    let mut b = b"IHAVEOPT".to_vec();
    b.extend_from_slice(&opt.to_be_bytes());
    b.extend_from_slice(&u32::try_from(data.len()).unwrap().to_be_bytes());
    b.extend_from_slice(data);
    s.write_all(&b).unwrap();
}

/// Reads one option reply; returns its type.
fn reply_type(s: &mut TcpStream, opt: u32) -> u32 {
    let mut h = [0u8; 20];
    s.read_exact(&mut h).unwrap();
    assert_eq!(&h[..8], &0x0003_e889_0455_65a9u64.to_be_bytes());
    assert_eq!(u32::from_be_bytes(h[8..12].try_into().unwrap()), opt);
    let len = u32::from_be_bytes(h[16..20].try_into().unwrap());
    let mut data = vec![0u8; len as usize];
    s.read_exact(&mut data).unwrap();
    u32::from_be_bytes(h[12..16].try_into().unwrap())
}

#[test]
fn tls_required_answers_plain_text_only_with_tls_reqd() {
    use blockguard_nbd::proto;
    let dir = tempfile::tempdir().unwrap();
    let pki = Pki::new(dir.path());
    let vol = make_volume(dir.path(), "v.bgv", "16M");
    let srv = Served::start_tcp(&vol, &strs(&pki.serve_args("required", false)));
    let port = srv.tcp.unwrap();
    let mut s = plain_handshake(port);
    let go = [0u8; 6]; // empty name, no info requests
    for (opt, data) in [
        (proto::OPT_LIST, &[][..]),
        (proto::OPT_STRUCTURED_REPLY, &[][..]),
        (proto::OPT_INFO, &go[..]),
        (proto::OPT_GO, &go[..]),
    ] {
        send_option(&mut s, opt, data);
        assert_eq!(reply_type(&mut s, opt), proto::REP_ERR_TLS_REQD, "option {opt}");
    }
    // EXPORT_NAME cannot be refused with an error: the server hangs up, sending nothing.
    send_option(&mut s, proto::OPT_EXPORT_NAME, b"");
    let mut rest = Vec::new();
    let _ = s.read_to_end(&mut rest);
    assert!(
        rest.is_empty(),
        "export data after EXPORT_NAME without TLS: {rest:?}"
    );
    // ABORT is honoured.
    let mut s = plain_handshake(port);
    send_option(&mut s, proto::OPT_ABORT, &[]);
    assert_eq!(reply_type(&mut s, proto::OPT_ABORT), proto::REP_ACK);
}

#[test]
fn tls_optional_serves_plain_text_and_tls_clients() {
    require("nbdinfo");
    let dir = tempfile::tempdir().unwrap();
    let pki = Pki::new(dir.path());
    let vol = make_volume(dir.path(), "v.bgv", "16M");
    let srv = Served::start_tcp(&vol, &strs(&pki.serve_args("optional", false)));
    let port = srv.tcp.unwrap();
    let plain = format!("nbd://localhost:{port}/");
    assert_eq!(stdout(&run("nbdinfo", &["--size", &plain])).trim(), "16777216");
    let tls = nbds(port, &pki.creds_dir("no-client-cert"));
    let out = stdout(&run("nbdinfo", &[&tls]));
    assert!(out.contains("with TLS"), "{out}");
}

/// A TCP proxy to `port` that records every byte in either direction.
fn recording_proxy(port: u16) -> (u16, Arc<Mutex<Vec<u8>>>) {
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let local = listener.local_addr().unwrap().port();
    let capture = Arc::new(Mutex::new(Vec::new()));
    let cap = Arc::clone(&capture);
    // Accepts for as long as the test runs; the threads end with the process.
    thread::spawn(move || {
        for client in listener.incoming() {
            let Ok(client) = client else { return };
            let Ok(server) = TcpStream::connect(("127.0.0.1", port)) else {
                return;
            };
            for (from, to) in [(&client, &server), (&server, &client)] {
                let (mut from, mut to) = (from.try_clone().unwrap(), to.try_clone().unwrap());
                let cap = Arc::clone(&cap);
                thread::spawn(move || {
                    let mut buf = vec![0u8; 64 << 10];
                    while let Ok(n) = from.read(&mut buf) {
                        if n == 0 || to.write_all(&buf[..n]).is_err() {
                            break;
                        }
                        cap.lock().unwrap().extend_from_slice(&buf[..n]);
                    }
                    let _ = to.shutdown(Shutdown::Write);
                });
            }
        }
    });
    (local, capture)
}

/// Copies `data` in and out of the export on `uri` with nbdcopy; true if `data` (any of
/// several 64-byte pieces of it) appears in what the proxy saw.
fn copy_through(dir: &Path, uri: &str, data: &[u8], capture: &Mutex<Vec<u8>>) -> bool {
    let src = dir.join("pattern");
    let back = dir.join("back");
    std::fs::write(&src, data).unwrap();
    run("nbdcopy", &[src.to_str().unwrap(), uri]);
    run("nbdcopy", &[uri, back.to_str().unwrap()]);
    assert_eq!(std::fs::read(&back).unwrap(), data, "data came back changed");
    let cap = capture.lock().unwrap();
    assert!(
        cap.len() > 2 * data.len(),
        "the proxy saw only {} bytes",
        cap.len()
    );
    [0, 4096, 100_000, data.len() - 64]
        .iter()
        .any(|&at| cap.windows(64).any(|w| w == &data[at..at + 64]))
}

#[test]
fn bytes_on_the_wire_are_not_plaintext() {
    require("nbdcopy");
    let dir = tempfile::tempdir().unwrap();
    let pki = Pki::new(dir.path());
    let data = random_bytes(1 << 20, 7);
    // With TLS the pattern must not appear on the wire...
    let vol = make_volume(dir.path(), "v.bgv", "1M");
    let srv = Served::start_tcp(&vol, &strs(&pki.serve_args("required", true)));
    let (port, capture) = recording_proxy(srv.tcp.unwrap());
    let uri = nbds(port, &pki.creds_dir("right"));
    assert!(
        !copy_through(dir.path(), &uri, &data, &capture),
        "plain text seen on the wire with TLS"
    );
    // ...while without it the same check finds it (the check itself works).
    let plain_vol = make_volume(dir.path(), "p.bgv", "1M");
    let plain = Served::start_tcp(&plain_vol, &[]);
    let (port, capture) = recording_proxy(plain.tcp.unwrap());
    let uri = format!("nbd://localhost:{port}/");
    assert!(
        copy_through(dir.path(), &uri, &data, &capture),
        "the capture misses plain text"
    );
}

#[test]
fn bad_tls_files_fail_at_startup_naming_the_file() {
    let dir = tempfile::tempdir().unwrap();
    let pki = Pki::new(dir.path());
    let vol = make_volume(dir.path(), "v.bgv", "1M");
    let garbage = dir.path().join("garbage.pem");
    std::fs::write(&garbage, "not a certificate\n").unwrap();
    let missing = dir.path().join("missing.pem");
    let (garbage, missing) = (garbage.to_str().unwrap(), missing.to_str().unwrap());
    let (cert, key) = (pki.file("server-cert.pem"), pki.file("server-key.pem"));
    let other_key = pki.file("client-key.pem");
    let port = free_port();
    let listen = format!("127.0.0.1:{port}");
    let cases: [(&[&str], &str); 6] = [
        (&["--tls-cert", garbage, "--tls-key", &key], garbage),
        (&["--tls-cert", missing, "--tls-key", &key], missing),
        (&["--tls-cert", &cert, "--tls-key", garbage], garbage),
        (&["--tls-cert", &cert, "--tls-key", &other_key], &other_key),
        (
            &["--tls-cert", &cert, "--tls-key", &key, "--tls-client-ca", garbage],
            garbage,
        ),
        (
            &["--tls-cert", &cert, "--tls-key", &key, "--tls-client-ca", missing],
            missing,
        ),
    ];
    for (tls, named) in cases {
        let mut args = vec![
            "serve",
            vol.to_str().unwrap(),
            "--listen",
            &listen,
            "--no-control",
        ];
        args.extend_from_slice(tls);
        let out = bg(&args);
        assert_ne!(code(&out), 0, "{args:?} started");
        let err = stderr(&out);
        assert!(
            err.contains(named),
            "{args:?}: the error does not name {named}:\n{err}"
        );
        assert!(
            TcpStream::connect(("127.0.0.1", port)).is_err(),
            "{args:?} listened"
        );
    }
    // A key without its certificate is a usage error.
    let out = bg(&["serve", vol.to_str().unwrap(), "--tls-key", &key]);
    assert_eq!(code(&out), 2, "{}", stderr(&out));
    let out = bg(&[
        "serve",
        vol.to_str().unwrap(),
        "--tls-cert",
        &cert,
        "--tls-key",
        &key,
        "--tls",
        "maybe",
    ]);
    assert_eq!(code(&out), 2, "{}", stderr(&out));
    let help = stdout(&bg(&["serve", "--help"]));
    for opt in [
        "--tls-cert <FILE>",
        "--tls-key <FILE>",
        "--tls-client-ca <FILE>",
        "--tls <MODE>",
    ] {
        assert!(help.contains(opt), "serve --help lacks {opt}:\n{help}");
    }
}

#[test]
fn listening_beyond_loopback_warns_unless_tls_is_required() {
    require("nbdinfo");
    let dir = tempfile::tempdir().unwrap();
    let pki = Pki::new(dir.path());
    let vol = make_volume(dir.path(), "v.bgv", "1M");
    let srv = Served::start_tcp_host(&vol, "0.0.0.0", &["--no-control"]);
    assert!(
        srv.log_text().contains("beyond loopback without TLS"),
        "{}",
        srv.log_text()
    );
    drop(srv);
    let mut args = pki.serve_args("optional", false);
    args.push("--no-control".into());
    let srv = Served::start_tcp_host(&vol, "0.0.0.0", &strs(&args));
    assert!(srv.log_text().contains("--tls optional"), "{}", srv.log_text());
    drop(srv);
    let mut args = pki.serve_args("required", false);
    args.push("--no-control".into());
    let srv = Served::start_tcp_host(&vol, "0.0.0.0", &strs(&args));
    assert!(!srv.log_text().contains("beyond loopback"), "{}", srv.log_text());
}
