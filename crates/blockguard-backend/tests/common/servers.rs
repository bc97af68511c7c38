//! Real NBD servers for the NBD client tests: `nbdkit` on a Unix socket and `qemu-nbd` on
//! a loopback TCP port, each started in the foreground as a child and stopped by its PID
//! (on drop too, so a failing test leaves nothing running). Shared by the backend's and the
//! CLI's tests (`#[path]`-included).

#![allow(dead_code)] // Each test binary uses its own subset.

use std::net::{TcpListener, TcpStream};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

/// A running NBD server.
pub struct Server {
    child: Option<Child>,
    /// The URI that reaches its export.
    pub uri: String,
    probe: Probe,
    argv: Vec<String>,
}

enum Probe {
    Unix(PathBuf),
    Tcp(u16),
}

impl Server {
    /// `nbdkit PLUGIN ARGS…` serving on the Unix socket `sock` (export name ignored by nbdkit).
    pub fn nbdkit(sock: &Path, args: &[&str]) -> Server {
        let mut argv: Vec<String> = ["nbdkit", "--foreground", "--exit-with-parent", "-U"]
            .iter()
            .map(ToString::to_string)
            .collect();
        argv.push(sock.display().to_string());
        argv.extend(args.iter().map(ToString::to_string));
        let uri = format!("nbd+unix:///?socket={}", sock.display());
        Server::start(argv, uri, Probe::Unix(sock.to_path_buf()))
    }

    /// `nbdkit PLUGIN ARGS…` serving on a free loopback TCP port (the URI names the host
    /// `localhost`, the name the TLS tests' server certificate carries).
    pub fn nbdkit_tcp(args: &[&str]) -> Server {
        let port = free_port();
        let mut argv: Vec<String> = [
            "nbdkit",
            "--foreground",
            "--exit-with-parent",
            "-i",
            "127.0.0.1",
            "-p",
        ]
        .iter()
        .map(ToString::to_string)
        .collect();
        argv.push(port.to_string());
        argv.extend(args.iter().map(ToString::to_string));
        let uri = format!("nbd://localhost:{port}/");
        Server::start(argv, uri, Probe::Tcp(port))
    }

    /// `qemu-nbd` serving the raw file `file` as export `export` on a free loopback port.
    pub fn qemu_nbd(file: &Path, export: &str) -> Server {
        let port = free_port();
        Server::qemu_nbd_on(file, export, port)
    }

    /// `qemu-nbd` on a given port (to restart one where its clients expect it).
    pub fn qemu_nbd_on(file: &Path, export: &str, port: u16) -> Server {
        let argv: Vec<String> = [
            "qemu-nbd",
            "--format=raw",
            "--persistent",
            "--shared=16",
            "--bind=127.0.0.1",
            &format!("--port={port}"),
            &format!("--export-name={export}"),
            &file.display().to_string(),
        ]
        .iter()
        .map(ToString::to_string)
        .collect();
        let uri = format!("nbd://127.0.0.1:{port}/{export}");
        Server::start(argv, uri, Probe::Tcp(port))
    }

    fn start(argv: Vec<String>, uri: String, probe: Probe) -> Server {
        let mut s = Server {
            child: None,
            uri,
            probe,
            argv,
        };
        s.restart();
        s
    }

    /// The server's process id.
    pub fn pid(&self) -> Option<u32> {
        self.child.as_ref().map(Child::id)
    }

    /// Stops the server (SIGKILL to its PID, as a crash or a lost machine would) and reaps it.
    pub fn kill(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
        if let Probe::Unix(p) = &self.probe {
            let _ = std::fs::remove_file(p);
        }
    }

    /// Starts the same command again (after [`Server::kill`]) and waits until it accepts.
    pub fn restart(&mut self) {
        self.kill();
        let child = Command::new(&self.argv[0])
            .args(&self.argv[1..])
            .stdin(Stdio::null())
            .spawn()
            .unwrap_or_else(|e| {
                panic!(
                    "cannot start {}: {e} (scripts/install-deps.sh installs it)",
                    self.argv[0]
                )
            });
        self.child = Some(child);
        let deadline = Instant::now() + Duration::from_secs(20);
        loop {
            let up = match &self.probe {
                Probe::Unix(p) => UnixStream::connect(p).is_ok(),
                Probe::Tcp(port) => TcpStream::connect(("127.0.0.1", *port)).is_ok(),
            };
            if up {
                return;
            }
            if let Some(Ok(Some(status))) = self.child.as_mut().map(Child::try_wait) {
                panic!("{:?} exited at start: {status}", self.argv);
            }
            assert!(
                Instant::now() < deadline,
                "{:?} did not start listening",
                self.argv
            );
            std::thread::sleep(Duration::from_millis(20));
        }
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        self.kill();
    }
}

/// A loopback port free at the time of the call.
pub fn free_port() -> u16 {
    let l = TcpListener::bind("127.0.0.1:0").expect("bind a loopback port");
    l.local_addr().expect("local address").port()
}
