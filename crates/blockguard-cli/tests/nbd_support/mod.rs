//! Shared helpers of the NBD integration tests: start the real `blockguard serve`, wait for
//! it, find the external clients, make test data.

#![allow(dead_code)]

pub mod pki;

use std::io::Read;
use std::net::TcpListener;
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Output, Stdio};
use std::time::{Duration, Instant};

/// Path of the binary under test.
pub const BIN: &str = env!("CARGO_BIN_EXE_blockguard");

/// Fails (never skips) when an external client is missing.
pub fn require(tool: &str) {
    let found = Command::new("sh")
        .arg("-c")
        .arg(format!("command -v {tool}"))
        .stdout(Stdio::null())
        .status()
        .is_ok_and(|s| s.success());
    assert!(
        found,
        "`{tool}` is not installed: run scripts/install-deps.sh \
         (Debian packages qemu-utils, libnbd-bin, nbdkit, fio)"
    );
}

/// Runs a command, failing the test with its output if it does not succeed.
pub fn run(cmd: &str, args: &[&str]) -> Output {
    let out = Command::new(cmd)
        .args(args)
        .output()
        .unwrap_or_else(|e| panic!("cannot run {cmd}: {e}"));
    assert!(
        out.status.success(),
        "{cmd} {args:?} failed ({}):\nstdout: {}\nstderr: {}",
        out.status,
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    out
}

/// Runs a command and returns its output whatever the exit status.
pub fn run_any(cmd: &str, args: &[&str]) -> Output {
    Command::new(cmd)
        .args(args)
        .output()
        .unwrap_or_else(|e| panic!("cannot run {cmd}: {e}"))
}

/// Runs `blockguard args…` (in `dir`, if given) and returns its output whatever the exit
/// status; fails the test if it panicked.
pub fn bg_in(dir: Option<&Path>, args: &[&str]) -> Output {
    let mut cmd = Command::new(BIN);
    if let Some(dir) = dir {
        cmd.current_dir(dir);
    }
    let out = cmd
        .args(args)
        .env("BLOCKGUARD_LOG", "warn")
        .env("NO_COLOR", "1")
        .output()
        .expect("run blockguard");
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        !stderr.contains("panicked"),
        "blockguard {args:?} panicked:\n{stderr}"
    );
    out
}

/// [`bg_in`] in the current directory.
pub fn bg(args: &[&str]) -> Output {
    bg_in(None, args)
}

/// The exit code of a process that exited (not killed).
pub fn code(out: &Output) -> i32 {
    out.status.code().expect("exited, not killed")
}

/// Stderr of a command as a string.
pub fn stderr(out: &Output) -> String {
    String::from_utf8_lossy(&out.stderr).into_owned()
}

/// Asserts `out` exited with `want`, showing everything it printed otherwise.
#[track_caller]
pub fn expect_exit(out: &Output, want: i32) {
    assert_eq!(
        code(out),
        want,
        "--- stdout\n{}\n--- stderr\n{}",
        stdout(out),
        stderr(out)
    );
}

/// Stdout of a command as a string.
pub fn stdout(out: &Output) -> String {
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// A running `blockguard serve` on a Unix socket (or TCP port) in a temporary directory.
pub struct Served {
    pub child: Option<Child>,
    pub volume: PathBuf,
    pub socket: PathBuf,
    pub tcp: Option<u16>,
    pub log: PathBuf,
}

impl Served {
    /// Starts serving `volume` on a socket next to it, with `extra` arguments.
    pub fn start(volume: &Path, extra: &[&str]) -> Served {
        let dir = volume.parent().expect("volume in a directory");
        let socket = dir.join(format!("{}.sock", volume.file_name().unwrap().to_string_lossy()));
        Self::spawn(volume, socket, None, extra)
    }

    /// Starts serving `volume` (a device, say) with its socket and log in `dir`.
    pub fn start_in(volume: &Path, dir: &Path, extra: &[&str]) -> Served {
        let name = volume.file_name().unwrap().to_string_lossy().into_owned();
        let socket = dir.join(format!("{name}.sock"));
        Self::spawn_logged(volume, socket, None, dir.join(format!("{name}.log")), extra)
    }

    /// Starts serving `volume` on a free loopback TCP port.
    pub fn start_tcp(volume: &Path, extra: &[&str]) -> Served {
        Self::start_tcp_host(volume, "127.0.0.1", extra)
    }

    /// Starts serving `volume` with `--listen HOST:PORT` on a free port; `host` must resolve
    /// to 127.0.0.1 (among others), where readiness is checked.
    pub fn start_tcp_host(volume: &Path, host: &str, extra: &[&str]) -> Served {
        let port = free_port();
        let socket = PathBuf::new();
        Self::spawn(volume, socket, Some((host, port)), extra)
    }

    fn spawn(volume: &Path, socket: PathBuf, tcp: Option<(&str, u16)>, extra: &[&str]) -> Served {
        Self::spawn_logged(volume, socket, tcp, volume.with_extension("log"), extra)
    }

    fn spawn_logged(
        volume: &Path,
        socket: PathBuf,
        tcp: Option<(&str, u16)>,
        log: PathBuf,
        extra: &[&str],
    ) -> Served {
        let logf = std::fs::File::create(&log).unwrap();
        let mut cmd = Command::new(BIN);
        cmd.arg("serve").arg(volume);
        match tcp {
            Some((host, port)) => cmd.arg("--listen").arg(format!("{host}:{port}")),
            None => cmd.arg("--socket").arg(&socket),
        };
        let child = cmd
            .args(extra)
            .env("BLOCKGUARD_LOG", "info,blockguard_nbd=debug")
            .stdout(Stdio::null())
            .stderr(logf)
            .spawn()
            .expect("start blockguard serve");
        let mut s = Served {
            child: Some(child),
            volume: volume.to_path_buf(),
            socket,
            tcp: tcp.map(|(_, port)| port),
            log,
        };
        s.wait_ready();
        s
    }

    /// Waits until the server sends its greeting.
    fn wait_ready(&mut self) {
        let deadline = Instant::now() + Duration::from_secs(20);
        loop {
            if let Some(status) = self.child.as_mut().unwrap().try_wait().unwrap() {
                panic!("server exited early ({status}):\n{}", self.log_text());
            }
            let mut greeting = [0u8; 18];
            let ok = match self.tcp {
                Some(port) => std::net::TcpStream::connect(("127.0.0.1", port))
                    .and_then(|mut s| s.read_exact(&mut greeting))
                    .is_ok(),
                None => UnixStream::connect(&self.socket)
                    .and_then(|mut s| s.read_exact(&mut greeting))
                    .is_ok(),
            };
            if ok && &greeting[..8] == b"NBDMAGIC" {
                return;
            }
            assert!(
                Instant::now() < deadline,
                "server not ready:\n{}",
                self.log_text()
            );
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// The NBD URI of the export.
    pub fn uri(&self) -> String {
        match self.tcp {
            Some(port) => format!("nbd://127.0.0.1:{port}/"),
            None => format!("nbd+unix:///?socket={}", self.socket.display()),
        }
    }

    /// A raw connection to the server.
    pub fn connect(&self) -> UnixStream {
        UnixStream::connect(&self.socket).expect("connect to server")
    }

    /// A client past the handshake (default options), whose reads time out after 20 s.
    pub fn client(&self) -> blockguard_nbd::client::Client<UnixStream> {
        let s = self.connect();
        s.set_read_timeout(Some(Duration::from_secs(20))).unwrap();
        let opts = blockguard_nbd::client::ClientOptions::default();
        blockguard_nbd::client::Client::handshake(s, &opts).expect("handshake")
    }

    /// The server's log so far.
    pub fn log_text(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// Sends a signal and waits for the server to exit.
    pub fn signal(&mut self, sig: &str) -> ExitStatus {
        let mut child = self.child.take().expect("server running");
        let pid = child.id().to_string();
        run("kill", &[&format!("-{sig}"), &pid]);
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            if let Some(status) = child.try_wait().unwrap() {
                return status;
            }
            if Instant::now() > deadline {
                let _ = child.kill();
                panic!("server did not exit after SIG{sig}:\n{}", self.log_text());
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// True while the server process runs.
    pub fn is_running(&mut self) -> bool {
        self.child
            .as_mut()
            .is_some_and(|c| c.try_wait().unwrap().is_none())
    }
}

impl Drop for Served {
    fn drop(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

/// A loopback port nobody listens on right now.
pub fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .expect("free port")
}

/// Creates a fresh volume of `size` bytes with the real binary.
pub fn make_volume(dir: &Path, name: &str, size: &str) -> PathBuf {
    let p = dir.join(name);
    run(BIN, &["format", p.to_str().unwrap(), "--size", size]);
    p
}

/// Deterministic pseudo-random bytes (xorshift64*).
pub fn random_bytes(len: usize, seed: u64) -> Vec<u8> {
    let mut x = seed | 1;
    let mut out = Vec::with_capacity(len + 8);
    while out.len() < len {
        x ^= x >> 12;
        x ^= x << 25;
        x ^= x >> 27;
        out.extend_from_slice(&x.wrapping_mul(0x2545_f491_4f6c_dd1d).to_le_bytes());
    }
    out.truncate(len);
    out
}

/// Byte offset of data block `b` in the volume file (closed, not served), as the volume's own
/// superblock lays it out.
pub fn data_block_offset(volume: &Path, b: u64) -> u64 {
    use blockguard::blockguard_backend::{FileBackend, FileOptions, LockMode};
    let opts = FileOptions {
        read_only: true,
        lock: LockMode::None,
        ..FileOptions::default()
    };
    let backend = FileBackend::open(volume, &opts).expect("open the volume file");
    let vol = blockguard::Volume::open(
        std::sync::Arc::new(backend),
        &blockguard::OpenOptions {
            read_only: true,
            ..blockguard::OpenOptions::default()
        },
    )
    .expect("open the volume");
    vol.geometry().data_offset(b)
}

/// Flips the bits of one byte of the volume file.
pub fn flip_byte(volume: &Path, offset: u64) {
    use std::os::unix::fs::FileExt;
    let f = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open(volume)
        .unwrap();
    let mut b = [0u8; 1];
    f.read_exact_at(&mut b, offset).unwrap();
    b[0] ^= 0xff;
    f.write_all_at(&b, offset).unwrap();
    f.sync_all().unwrap();
}

/// Block size of the volumes the remote-volume tests format.
pub const BS: u64 = 4096;

/// The geometry a member's own superblock states (read from the raw file under the export).
pub fn geometry(file: &Path) -> blockguard::Geometry {
    let bytes = std::fs::read(file).expect("read the copy");
    let (sb, _) = blockguard::Superblock::decode(&bytes[..512]).expect("a superblock");
    sb.geometry
}

pub fn block_of(file: &Path, b: u64) -> Vec<u8> {
    let bytes = std::fs::read(file).expect("read");
    let at = geometry(file).data_offset(b) as usize;
    bytes[at..at + BS as usize].to_vec()
}

pub fn raw_file(dir: &Path, name: &str, len: u64) -> std::path::PathBuf {
    let p = dir.join(name);
    std::fs::File::create(&p).unwrap().set_len(len).unwrap();
    p
}

/// Writes `data` at block 0 of the served volume, each request with FUA.
pub fn write_through(srv: &Served, data: &[u8], at_block: u64) {
    let mut c = srv.client();
    for (i, chunk) in data.chunks(64 << 10).enumerate() {
        let off = at_block * BS + (i as u64) * (64 << 10);
        assert_eq!(
            c.write(off, chunk, blockguard_nbd::proto::CMD_FLAG_FUA).unwrap(),
            0,
            "write at {off}"
        );
    }
}

/// A qemu-io process writing 1 MiB patterns all over the first 60 MiB of a volume and reading
/// them back, round after round, until [`Writer::finish`]; its output is checked for errors
/// at the end.
pub struct Writer {
    stop: std::sync::Arc<std::sync::atomic::AtomicBool>,
    thread: std::thread::JoinHandle<(u64, String)>,
}

impl Writer {
    pub fn start(uri: String) -> Writer {
        let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
        let flag = stop.clone();
        let thread = std::thread::spawn(move || {
            let mut rounds = 0u64;
            let mut log = String::new();
            while !flag.load(std::sync::atomic::Ordering::Relaxed) {
                let mut args = vec!["-f".to_string(), "raw".to_string()];
                for i in 0..24u64 {
                    let pattern = (rounds * 24 + i) % 250 + 1;
                    let off = ((rounds * 7919 + i * 104_729) % 60) << 20;
                    args.extend(["-c".into(), format!("write -P {pattern} {off} 1M")]);
                    args.extend(["-c".into(), format!("read -P {pattern} {off} 1M")]);
                }
                args.extend(["-c".into(), "flush".into(), uri.clone()]);
                let out = Command::new("qemu-io").args(&args).output().expect("run qemu-io");
                let text = format!("{}{}", stdout(&out), String::from_utf8_lossy(&out.stderr));
                if !out.status.success() || text.contains("failed") || text.contains("Pattern verification") {
                    log.push_str(&text);
                    break;
                }
                rounds += 1;
            }
            (rounds, log)
        });
        Writer { stop, thread }
    }

    /// Stops it; asserts it ran and saw no error.
    pub fn finish(self) -> u64 {
        self.stop.store(true, std::sync::atomic::Ordering::Relaxed);
        let (rounds, log) = self.thread.join().unwrap();
        assert!(log.is_empty(), "the NBD client saw an error:\n{log}");
        rounds
    }
}
