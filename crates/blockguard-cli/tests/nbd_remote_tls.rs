//! Volumes and mirror copies on remote NBD exports over TLS (`nbds://`, `nbds+unix://`),
//! through the real binary, with real servers started here and stopped by PID: `nbdkit
//! --tls=require` (memory and file plugins) and blockguard's own `serve` requiring client
//! certificates. And the refusals, each with a message that says what is wrong and names the
//! URI, a non-zero exit, and nothing written: a wrong CA, no client certificate, a plain URI
//! against a server that requires TLS, a server name the certificate does not carry, a server
//! that does not do TLS, a missing certificate file.

mod nbd_support;
#[path = "../../blockguard-backend/tests/common/servers.rs"]
mod servers;

use nbd_support::pki::Pki;
use nbd_support::*;
use servers::Server;
use std::path::Path;

/// `nbdkit --tls=require` with the test PKI's server identity, on a loopback TCP port.
fn nbdkit_tls(pki: &Pki, extra: &[&str], plugin: &[&str]) -> Server {
    let certs = format!("--tls-certificates={}", pki.file("nbdkit"));
    let mut args = vec!["--tls=require", certs.as_str()];
    args.extend_from_slice(extra);
    args.extend_from_slice(plugin);
    Server::nbdkit_tcp(&args)
}

/// The `nbds` URI of `kit`'s export with the client credentials `creds` (a directory of
/// [`Pki`]) and more query parameters `more` (`&`-separated).
fn nbds(kit_uri: &str, pki: &Pki, creds: &str, more: &str) -> String {
    let base = kit_uri.replacen("nbd://", "nbds://", 1);
    let sep = if more.is_empty() { "" } else { "&" };
    format!("{base}?tls-certificates={}{sep}{more}", pki.creds_dir(creds))
}

/// Both outputs of a command, for messages.
fn said(out: &std::process::Output) -> String {
    format!("{}{}", stdout(out), stderr(out))
}

#[test]
fn a_volume_whose_only_copy_is_on_nbdkit_over_tls() {
    require("nbdkit");
    let dir = tempfile::tempdir().unwrap();
    let pki = Pki::new(dir.path());
    let kit = nbdkit_tls(&pki, &[], &["memory", "64M"]);
    let uri = nbds(&kit.uri, &pki, "right", "");
    let out = bg(&["format", &uri, "--size", "32M"]);
    expect_exit(&out, 0);
    assert!(
        stdout(&out).contains(&format!("formatted {uri}")),
        "{}",
        said(&out)
    );

    let data = random_bytes(256 * BS as usize, 21);
    let mut srv = Served::start_in(Path::new(&uri), dir.path(), &["--no-control"]);
    write_through(&srv, &data, 0);
    let back = srv.client().read(0, data.len()).unwrap().expect("read back");
    assert!(back == data, "read back through the server");
    assert!(srv.signal("TERM").success(), "{}", srv.log_text());

    // A new process, new TLS sessions: every block verified.
    let out = bg(&["check", &uri]);
    expect_exit(&out, 0);
    let image = dir.path().join("out.raw");
    expect_exit(&bg(&["export", &uri, image.to_str().unwrap()]), 0);
    assert!(
        std::fs::read(&image).unwrap()[..data.len()] == data[..],
        "exported image"
    );
}

#[test]
fn a_mirror_copy_on_nbdkit_over_a_tls_unix_socket_repairs_and_is_repaired() {
    require("nbdkit");
    let dir = tempfile::tempdir().unwrap();
    let pki = Pki::new(dir.path());
    let remote = raw_file(dir.path(), "remote.raw", 16 << 20);
    let local = raw_file(dir.path(), "local.bgv", 16 << 20);
    let certs = format!("--tls-certificates={}", pki.file("nbdkit"));
    let kit = Server::nbdkit(
        &dir.path().join("kit.sock"),
        &["--tls=require", &certs, "file", remote.to_str().unwrap()],
    );
    // A Unix socket has no host: the certificate's name is given.
    let uri = format!(
        "{}&tls-certificates={}&tls-hostname=localhost",
        kit.uri.replacen("nbd+unix://", "nbds+unix://", 1),
        pki.creds_dir("right")
    );
    let local_s = local.to_str().unwrap();
    expect_exit(&bg(&["format", local_s, "--force", "--mirror", &uri]), 0);
    let data = random_bytes(128 * BS as usize, 6);
    let mut srv = Served::start(&local, &["--no-control"]);
    write_through(&srv, &data, 0);
    assert!(srv.signal("TERM").success(), "{}", srv.log_text());
    assert_eq!(
        block_of(&remote, 10),
        block_of(&local, 10),
        "block 10 on both copies"
    );

    // The remote's backing file damaged: caught, and repaired from the local copy.
    flip_byte(&remote, geometry(&remote).data_offset(10) + 7);
    expect_exit(&bg(&["scrub", local_s]), 1);
    expect_exit(&bg(&["scrub", "--repair", local_s]), 0);
    assert_eq!(
        block_of(&remote, 10),
        data[10 * BS as usize..11 * BS as usize],
        "remote repaired"
    );
    // The local copy damaged: repaired from the remote one, over TLS.
    flip_byte(&local, geometry(&local).data_offset(20) + 7);
    expect_exit(&bg(&["scrub", "--repair", local_s]), 0);
    assert_eq!(
        block_of(&local, 20),
        data[20 * BS as usize..21 * BS as usize],
        "local repaired"
    );
    expect_exit(&bg(&["check", local_s]), 0);
    expect_exit(&bg(&["check", &uri]), 0);
}

#[test]
fn blockguard_serve_requiring_client_certificates_serves_the_client_backend() {
    let dir = tempfile::tempdir().unwrap();
    let pki = Pki::new(dir.path());
    let vol = make_volume(dir.path(), "outer.bgv", "16M");
    let args = pki.serve_args("required", true);
    let srv = Served::start_tcp(&vol, &args.iter().map(String::as_str).collect::<Vec<_>>());
    let port = srv.tcp.unwrap();
    let uri = format!(
        "nbds://localhost:{port}/?tls-certificates={}",
        pki.creds_dir("right")
    );
    // A volume inside the served one: every read and write crosses TLS with the client's
    // certificate presented.
    expect_exit(&bg(&["format", &uri, "--size", "8M"]), 0);
    let out = bg(&["check", &uri, "--nbd-connections", "4"]);
    expect_exit(&out, 0);
    // The CA given on the command line instead of in the directory.
    let ca = pki.file("good-ca-cert.pem");
    let bare = format!("nbds://localhost:{port}/");
    let out = bg(&["info", &bare, "--nbd-tls-ca", &ca]);
    // No client certificate this way: the server refuses, saying why.
    expect_exit(&out, 2);
    assert!(said(&out).contains("client certificate"), "{}", said(&out));
    let log = srv.log_text();
    assert!(log.contains("TLS handshake complete"), "{log}");
}

/// Runs `format` on `uri` (expecting a refusal naming the URI and saying `why`) and checks
/// that nothing reached `backing`, the export's file.
fn refused(uri: &str, why: &str, backing: &Path) {
    let start = std::time::Instant::now();
    let out = bg(&["format", uri, "--size", "8M", "--nbd-connect-timeout", "5"]);
    expect_exit(&out, 2);
    let text = stderr(&out);
    assert!(text.contains(why), "{uri}: expected {why:?} in:\n{text}");
    assert!(
        text.contains(uri.split('?').next().unwrap()),
        "the message names the URI:\n{text}"
    );
    assert!(!text.contains("panicked"), "{text}");
    assert!(
        start.elapsed() < std::time::Duration::from_secs(20),
        "{uri}: took {:?}",
        start.elapsed()
    );
    let bytes = std::fs::read(backing).unwrap();
    assert!(
        bytes.iter().all(|&b| b == 0),
        "{uri}: something was written to the export"
    );
}

#[test]
fn tls_refusals_are_clear_and_write_nothing() {
    require("nbdkit");
    let dir = tempfile::tempdir().unwrap();
    let pki = Pki::new(dir.path());
    let file = raw_file(dir.path(), "export.raw", 16 << 20);
    let f = file.to_str().unwrap();
    // nbdkit checks client certificates against its CA (--tls-verify-peer).
    let kit = nbdkit_tls(&pki, &["--tls-verify-peer"], &["file", f]);
    refused(
        &nbds(&kit.uri, &pki, "wrong-ca", ""),
        "not signed by the CA",
        &file,
    );
    refused(
        &nbds(&kit.uri, &pki, "no-client-cert", ""),
        "client certificate",
        &file,
    );
    refused(&kit.uri, "the server requires TLS: use nbds://", &file);
    refused(
        &nbds(&kit.uri, &pki, "right", "tls-hostname=elsewhere.example"),
        "not valid for the name",
        &file,
    );
    let missing = kit.uri.replacen("nbd://", "nbds://", 1) + "?tls-certificates=/nonexistent/creds";
    refused(&missing, "/nonexistent/creds/ca-cert.pem", &file);
    // The right credentials work against the same server (the refusals were not its fault).
    expect_exit(
        &bg(&["format", &nbds(&kit.uri, &pki, "right", ""), "--size", "8M"]),
        0,
    );

    // A server without TLS refuses STARTTLS.
    let plain_file = raw_file(dir.path(), "plain.raw", 16 << 20);
    let plain = Server::nbdkit_tcp(&["file", plain_file.to_str().unwrap()]);
    refused(
        &nbds(&plain.uri, &pki, "right", ""),
        "refused to start TLS",
        &plain_file,
    );
}

#[test]
fn tls_verify_peer_false_warns_loudly() {
    require("nbdkit");
    let dir = tempfile::tempdir().unwrap();
    let pki = Pki::new(dir.path());
    let kit = nbdkit_tls(&pki, &[], &["memory", "16M"]);
    // The wrong CA, but verification switched off: served, with a warning.
    let uri = nbds(&kit.uri, &pki, "wrong-ca", "tls-verify-peer=false");
    let out = bg(&["format", &uri, "--size", "8M"]);
    expect_exit(&out, 0);
    assert!(
        stderr(&out).contains("WARN") && stderr(&out).contains("NOT checked"),
        "{}",
        said(&out)
    );
}
