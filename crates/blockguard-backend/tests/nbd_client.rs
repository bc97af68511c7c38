//! The NBD client backend against real servers (`nbdkit`, `qemu-nbd`) started by the tests:
//! data round trips, pipelined requests from many threads, multi-conn, zeroing, the errors
//! of a server that refuses, answers errors, goes silent or dies, and reconnection.

mod common;

use blockguard_backend::{Backend, NbdBackend, NbdError, NbdOptions};
use common::servers::Server;
use rand::{Rng, SeedableRng};
use std::sync::Arc;
use std::time::{Duration, Instant};

fn quick() -> NbdOptions {
    NbdOptions {
        connect_timeout: Duration::from_secs(5),
        request_timeout: Duration::from_secs(5),
        backoff_min: Duration::from_millis(50),
        backoff_max: Duration::from_millis(400),
        ..NbdOptions::default()
    }
}

fn seed() -> u64 {
    std::env::var("SEED")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or_else(rand::random)
}

#[test]
fn nbdkit_memory_round_trip_large_and_zeroing() {
    let dir = tempfile::tempdir().unwrap();
    let srv = Server::nbdkit(&dir.path().join("s"), &["memory", "64M"]);
    let b = NbdBackend::connect(&srv.uri, &quick()).unwrap();
    assert_eq!(b.len(), 64 << 20);
    assert!(!b.is_read_only());
    // nbdkit's memory plugin advertises multi-conn.
    assert_eq!(b.connections(), 4);
    assert!(b.has_write_zeroes());
    // Larger than the 32 MiB a request may carry: split and pipelined.
    let big: Vec<u8> = (0..40u32 << 20).map(|i| (i % 251) as u8).collect();
    b.write_vectored_at(&[&big[..1000], &big[1000..]], 4096).unwrap();
    b.flush().unwrap();
    let mut back = vec![0u8; big.len()];
    b.read_at(&mut back, 4096).unwrap();
    assert!(back == big, "40 MiB read back differently");
    b.zero_range(8192, 1 << 20).unwrap();
    b.read_at(&mut back[..(1 << 20) + 8192], 4096).unwrap();
    assert_eq!(&back[..4096], &big[..4096]);
    assert!(back[4096..(1 << 20) + 4096].iter().all(|&x| x == 0));
    assert_eq!(
        &back[(1 << 20) + 4096..(1 << 20) + 8192],
        &big[(1 << 20) + 4096..(1 << 20) + 8192]
    );
    // Out of range: refused before anything is sent, naming the range.
    let e = b.write_at(&[1; 4096], (64 << 20) - 2048).unwrap_err();
    assert_eq!(e.kind(), std::io::ErrorKind::InvalidInput);
    assert!(b.read_at(&mut [0u8; 1], 64 << 20).is_err());
}

#[test]
fn many_threads_pipelined_against_a_model() {
    let seed = seed();
    let dir = tempfile::tempdir().unwrap();
    let srv = Server::nbdkit(&dir.path().join("s"), &["memory", "16M"]);
    let b = Arc::new(NbdBackend::connect(&srv.uri, &quick()).unwrap());
    // Each thread owns a 2 MiB region, so its own model is the truth for it.
    let threads: Vec<_> = (0..8u64)
        .map(|t| {
            let b = Arc::clone(&b);
            std::thread::spawn(move || {
                let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(seed ^ t);
                let base = t << 21;
                let mut model = vec![0u8; 1 << 21];
                for _ in 0..300 {
                    let at = rng.random_range(0..512u64) * 4096;
                    let n = (rng.random_range(1..16u64) * 4096).min((1 << 21) - at);
                    let r = at as usize..(at + n) as usize;
                    match rng.random_range(0..10) {
                        0 => {
                            b.zero_range(base + at, n).unwrap();
                            model[r].fill(0);
                        }
                        1..=4 => {
                            rng.fill(&mut model[r.clone()]);
                            b.write_at(&model[r], base + at).unwrap();
                        }
                        5 => b.flush().unwrap(),
                        _ => {
                            let mut got = vec![0u8; r.len()];
                            b.read_at(&mut got, base + at).unwrap();
                            assert!(got == model[r], "thread {t}: read at {at} differs (seed {seed})");
                        }
                    }
                }
                model
            })
        })
        .collect();
    for (t, h) in threads.into_iter().enumerate() {
        let model = h
            .join()
            .unwrap_or_else(|_| panic!("a thread failed (seed {seed})"));
        let mut got = vec![0u8; 1 << 21];
        b.read_at(&mut got, (t as u64) << 21).unwrap();
        assert!(
            got == model,
            "thread {t}'s region differs at the end (seed {seed})"
        );
    }
}

#[test]
fn qemu_nbd_raw_file_round_trip_reaches_the_file() {
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("disk.raw");
    std::fs::File::create(&file).unwrap().set_len(8 << 20).unwrap();
    let srv = Server::qemu_nbd(&file, "disk");
    let b = NbdBackend::connect(&srv.uri, &quick()).unwrap();
    assert_eq!(b.len(), 8 << 20);
    let data: Vec<u8> = (0..65536u32).map(|i| (i * 7) as u8).collect();
    b.write_at(&data, 1 << 20).unwrap();
    b.zero_range(1 << 20, 4096).unwrap();
    b.flush().unwrap();
    let on_disk = std::fs::read(&file).unwrap();
    assert!(on_disk[(1 << 20)..(1 << 20) + 4096].iter().all(|&x| x == 0));
    assert_eq!(&on_disk[(1 << 20) + 4096..(1 << 20) + 65536], &data[4096..]);
    let mut back = vec![0u8; 65536];
    b.read_at(&mut back, 1 << 20).unwrap();
    assert_eq!(&back[..], &on_disk[(1 << 20)..(1 << 20) + 65536]);
    drop(b);

    // The wrong export name is refused at the handshake, naming the URI.
    let wrong = srv.uri.replace("/disk", "/nope");
    let e = NbdBackend::connect(&wrong, &quick()).unwrap_err();
    assert!(matches!(e, NbdError::Handshake { .. }), "{e}");
    assert!(e.to_string().contains(&wrong), "{e}");
}

#[test]
fn connection_refused_and_tls_are_clear_errors() {
    let port = common::servers::free_port();
    let uri = format!("nbd://127.0.0.1:{port}/x");
    let e = NbdBackend::connect(&uri, &quick()).unwrap_err();
    assert!(matches!(e, NbdError::Connect { .. }), "{e}");
    assert!(e.to_string().contains(&uri));
    // TLS without a CA to check the server with is refused before connecting.
    let e = NbdBackend::connect("nbds://127.0.0.1/x", &quick()).unwrap_err();
    assert!(matches!(e, NbdError::TlsSetup { .. }), "{e}");
    assert!(e.to_string().contains("no CA"), "{e}");
    let e = NbdBackend::connect("nbd+unix:///x", &quick()).unwrap_err();
    assert!(e.to_string().contains("socket=PATH"), "{e}");
}

#[test]
fn server_errors_name_the_export_and_request() {
    let dir = tempfile::tempdir().unwrap();
    let srv = Server::nbdkit(
        &dir.path().join("s"),
        &[
            "--filter=error",
            "memory",
            "1M",
            "error-pwrite=EIO",
            "error-pwrite-rate=100%",
        ],
    );
    let b = NbdBackend::connect(&srv.uri, &quick()).unwrap();
    let e = b.write_at(&[1; 4096], 8192).unwrap_err();
    let msg = e.to_string();
    assert!(
        msg.contains(&srv.uri) && msg.contains("write of 4096 bytes at byte 8192") && msg.contains("EIO"),
        "{msg}"
    );
    // An error answer leaves the connection usable.
    let mut buf = [1u8; 4096];
    b.read_at(&mut buf, 8192).unwrap();
    assert_eq!(buf, [0; 4096]);
}

#[test]
fn a_silent_server_times_out_and_the_connection_comes_back() {
    let dir = tempfile::tempdir().unwrap();
    // Reads take 3 s; the client waits 300 ms.
    let srv = Server::nbdkit(
        &dir.path().join("s"),
        &["--filter=delay", "memory", "1M", "rdelay=3"],
    );
    let opts = NbdOptions {
        request_timeout: Duration::from_millis(300),
        ..quick()
    };
    let b = NbdBackend::connect(&srv.uri, &opts).unwrap();
    b.write_at(&[7; 4096], 0).unwrap();
    let t = Instant::now();
    let e = b.read_at(&mut [0u8; 4096], 0).unwrap_err();
    assert!(
        t.elapsed() < Duration::from_secs(2),
        "the timeout took {:?}",
        t.elapsed()
    );
    let msg = e.to_string();
    assert!(
        msg.contains("read of 4096 bytes at byte 0") && msg.contains("no reply within"),
        "{msg}"
    );
    // Other connections (multi-conn) are unaffected; reconnection after the backoff restores
    // the one that was dropped. The write made before the loss was never flushed: the first
    // flush says so, the next succeeds.
    std::thread::sleep(Duration::from_millis(100));
    for i in 0..8 {
        b.write_at(&[i; 4096], 4096).unwrap();
    }
    assert!(b.reconnects() >= 1);
    let e = b.flush().unwrap_err();
    assert!(
        e.to_string()
            .contains("lost while written data was not yet flushed"),
        "{e}"
    );
    b.flush().unwrap();
}

#[test]
fn a_killed_server_fails_requests_fast_and_reconnection_follows_its_return() {
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("disk.raw");
    std::fs::File::create(&file).unwrap().set_len(4 << 20).unwrap();
    let mut srv = Server::nbdkit(&dir.path().join("s"), &["file", &file.display().to_string()]);
    let b = NbdBackend::connect(&srv.uri, &quick()).unwrap();
    b.write_at(&[1; 4096], 0).unwrap();
    b.flush().unwrap();
    b.write_at(&[2; 4096], 4096).unwrap();
    srv.kill();
    // Nothing waits for the request timeout: the dead socket fails every request at once.
    let t = Instant::now();
    for _ in 0..20 {
        assert!(b.write_at(&[3; 4096], 8192).is_err());
    }
    assert!(
        t.elapsed() < Duration::from_secs(2),
        "requests on a dead server took {:?}",
        t.elapsed()
    );
    srv.restart();
    let deadline = Instant::now() + Duration::from_secs(5);
    while b.write_at(&[4; 4096], 8192).is_err() {
        assert!(Instant::now() < deadline, "no reconnection within 5 s");
        std::thread::sleep(Duration::from_millis(20));
    }
    assert!(
        b.flush().is_err(),
        "a flush after losing unflushed writes must fail once"
    );
    b.flush().unwrap();
    let mut buf = [0u8; 4096];
    b.read_at(&mut buf, 0).unwrap();
    assert_eq!(buf, [1; 4096]);
}

#[test]
fn a_server_that_went_silent_costs_one_attempt_per_backoff_not_one_per_request() {
    let dir = tempfile::tempdir().unwrap();
    let sock = dir.path().join("s");
    let mut srv = Server::nbdkit(&sock, &["memory", "1M"]);
    let opts = NbdOptions {
        connect_timeout: Duration::from_millis(200),
        backoff_min: Duration::from_millis(300),
        backoff_max: Duration::from_secs(1),
        ..quick()
    };
    let b = NbdBackend::connect(&srv.uri, &opts).unwrap();
    srv.kill();
    // In its place, something that accepts connections and never answers the handshake.
    let listener = std::os::unix::net::UnixListener::bind(&sock).unwrap();
    let attempts = Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let counter = Arc::clone(&attempts);
    std::thread::spawn(move || {
        let mut held = Vec::new();
        for c in listener.incoming().flatten() {
            counter.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
            held.push(c);
        }
    });
    let start = Instant::now();
    let mut requests = 0;
    while start.elapsed() < Duration::from_secs(3) {
        let t = Instant::now();
        assert!(b.read_at(&mut [0u8; 4096], 0).is_err());
        // Only a reconnection attempt waits, and no longer than the connect timeout.
        assert!(
            t.elapsed() < Duration::from_millis(600),
            "a request took {:?}",
            t.elapsed()
        );
        requests += 1;
        std::thread::sleep(Duration::from_millis(5));
    }
    let n = attempts.load(std::sync::atomic::Ordering::SeqCst);
    // One immediate attempt, then after 0.3, 0.6, 1 and 1 s (each attempt taking 0.2 s),
    // whichever of the four connections (multi-conn) the requests land on.
    assert!(
        (2..=7).contains(&n),
        "{n} connection attempts for {requests} requests in 3 s"
    );
}
