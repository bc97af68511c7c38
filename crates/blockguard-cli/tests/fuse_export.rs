//! `blockguard mount`: a volume exported over FUSE, attached with `losetup`, carrying ext4.
//!
//! These tests mount filesystems and attach loop devices, so they need root, /dev/fuse and
//! e2fsprogs/util-linux — as in CI. Without them they fail loudly instead of passing without
//! having run. Every mount and loop device is released by a guard, also when a test fails.

use std::fs::{File, OpenOptions};
use std::io::{BufRead, BufReader, Write};
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::sync::Mutex;
use std::time::{Duration, Instant};

const BIN: &str = env!("CARGO_BIN_EXE_blockguard");
const MIB: usize = 1 << 20;

/// Loop devices and mounts are machine-wide: run one test at a time, which also keeps the
/// load on a small CI machine predictable.
static SERIAL: Mutex<()> = Mutex::new(());

fn serial() -> std::sync::MutexGuard<'static, ()> {
    SERIAL.lock().unwrap_or_else(|e| e.into_inner())
}

fn require_environment() {
    let uid = String::from_utf8(run_ok(Command::new("id").arg("-u")).stdout).expect("utf-8");
    assert_eq!(
        uid.trim(),
        "0",
        "the FUSE tests need root (they mount and use loop devices)"
    );
    assert!(
        Path::new("/dev/fuse").exists(),
        "the FUSE tests need /dev/fuse (modprobe fuse)"
    );
    for tool in [
        "losetup",
        "mkfs.ext4",
        "fsck.ext4",
        "debugfs",
        "sha256sum",
        "mount",
        "umount",
    ] {
        let found = Command::new("sh")
            .arg("-c")
            .arg(format!("command -v {tool}"))
            .output()
            .is_ok_and(|o| o.status.success());
        assert!(
            found,
            "the FUSE tests need `{tool}` (install e2fsprogs / util-linux / fuse3)"
        );
    }
}

fn describe(cmd: &Command) -> String {
    let args: Vec<_> = cmd.get_args().map(|a| a.to_string_lossy().into_owned()).collect();
    format!("{} {}", cmd.get_program().to_string_lossy(), args.join(" "))
}

fn run(cmd: &mut Command) -> Output {
    cmd.output()
        .unwrap_or_else(|e| panic!("cannot run {}: {e}", describe(cmd)))
}

fn run_ok(cmd: &mut Command) -> Output {
    let out = run(cmd);
    assert!(
        out.status.success(),
        "{} failed ({}):\nstdout: {}\nstderr: {}",
        describe(cmd),
        out.status,
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    out
}

fn stdout_line(out: &Output) -> String {
    String::from_utf8_lossy(&out.stdout).trim().to_owned()
}

fn blockguard() -> Command {
    Command::new(BIN)
}

fn format_volume(path: &Path, size: &str) {
    run_ok(blockguard().arg("format").arg(path).arg("--size").arg(size));
}

fn is_mounted(path: &Path) -> bool {
    let table = std::fs::read_to_string("/proc/self/mountinfo").expect("mountinfo");
    let path = path.to_string_lossy().replace(' ', "\\040");
    table.lines().any(|l| l.split(' ').nth(4) == Some(path.as_str()))
}

/// `blockguard mount` (detached); unmounted on drop.
struct FuseMount {
    mountpoint: PathBuf,
    file: PathBuf,
}

impl FuseMount {
    fn new(volume: &Path, mountpoint: &Path, log: &Path, read_only: bool) -> Self {
        std::fs::create_dir_all(mountpoint).expect("mkdir");
        let mut cmd = blockguard();
        cmd.arg("mount")
            .arg(volume)
            .arg(mountpoint)
            .arg("--log-file")
            .arg(log);
        if read_only {
            cmd.arg("--read-only");
        }
        let out = run_ok(&mut cmd);
        let file = PathBuf::from(stdout_line(&out));
        let mountpoint = mountpoint.canonicalize().expect("canonical mountpoint");
        assert_eq!(file, mountpoint.join(volume.file_name().expect("name")));
        Self { mountpoint, file }
    }

    /// `blockguard umount`, which returns once the server has flushed and closed the volume.
    fn unmount(self) {
        run_ok(blockguard().arg("umount").arg(&self.mountpoint));
        assert!(!is_mounted(&self.mountpoint));
    }
}

impl Drop for FuseMount {
    fn drop(&mut self) {
        if is_mounted(&self.mountpoint) {
            let ok = blockguard().arg("umount").arg(&self.mountpoint).output();
            if !ok.is_ok_and(|o| o.status.success()) {
                let _ = Command::new("umount").arg("-l").arg(&self.mountpoint).status();
            }
        }
    }
}

/// A loop device over a file; detached on drop.
struct Loop {
    dev: PathBuf,
    detached: bool,
}

impl Loop {
    fn new(file: &Path) -> Self {
        let out = run_ok(Command::new("losetup").arg("-f").arg("--show").arg(file));
        Self {
            dev: PathBuf::from(stdout_line(&out)),
            detached: false,
        }
    }

    fn detach(mut self) {
        self.detached = true;
        run_ok(Command::new("losetup").arg("-d").arg(&self.dev));
        // Detaching is asynchronous: the backing file is closed once the device is idle.
        wait_for("loop device to let go of its file", || {
            !String::from_utf8_lossy(&run(Command::new("losetup").arg("-a")).stdout)
                .lines()
                .any(|l| l.starts_with(&format!("{}:", self.dev.display())))
        });
    }
}

impl Drop for Loop {
    fn drop(&mut self) {
        if !self.detached {
            let _ = Command::new("losetup").arg("-d").arg(&self.dev).status();
        }
    }
}

/// A filesystem mounted on a directory; unmounted on drop.
struct FsMount {
    dir: PathBuf,
    mounted: bool,
}

impl FsMount {
    fn new(dev: &Path, dir: &Path, read_only: bool) -> Self {
        std::fs::create_dir_all(dir).expect("mkdir");
        let mut cmd = Command::new("mount");
        if read_only {
            cmd.arg("-o").arg("ro");
        }
        run_ok(cmd.arg(dev).arg(dir));
        Self {
            dir: dir.to_path_buf(),
            mounted: true,
        }
    }

    fn unmount(mut self) {
        self.mounted = false;
        run_ok(Command::new("umount").arg(&self.dir));
    }
}

impl Drop for FsMount {
    fn drop(&mut self) {
        if self.mounted {
            let _ = Command::new("umount").arg(&self.dir).status();
        }
    }
}

fn wait_for(what: &str, mut done: impl FnMut() -> bool) {
    let deadline = Instant::now() + Duration::from_secs(20);
    while !done() {
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// Deterministic pseudo-random bytes (xorshift64*), so failures reproduce.
fn pseudo_random(seed: u64, len: usize) -> Vec<u8> {
    let mut x = seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
    let mut out = Vec::with_capacity(len + 8);
    while out.len() < len {
        x ^= x >> 12;
        x ^= x << 25;
        x ^= x >> 27;
        out.extend_from_slice(&x.wrapping_mul(0x2545_F491_4F6C_DD1D).to_le_bytes());
    }
    out.truncate(len);
    out
}

/// Writes three 8 MiB files and 150 small ones in nested directories; returns their paths
/// relative to `root`.
fn write_tree(root: &Path) -> Vec<PathBuf> {
    let mut files = Vec::new();
    for i in 0..3u64 {
        let rel = PathBuf::from(format!("big{i}"));
        std::fs::write(root.join(&rel), pseudo_random(1000 + i, 8 * MIB)).expect("write big");
        files.push(rel);
    }
    for i in 0..150u64 {
        let dir = PathBuf::from(format!("d{}/e{}", i % 7, i % 3));
        std::fs::create_dir_all(root.join(&dir)).expect("mkdir");
        let rel = dir.join(format!("f{i}.dat"));
        let len = (i as usize * 997) % (20 * 1024);
        std::fs::write(root.join(&rel), pseudo_random(i, len)).expect("write small");
        files.push(rel);
    }
    files
}

/// `sha256sum` lines for `files` under `root`.
fn checksums(root: &Path, files: &[PathBuf]) -> String {
    let out = run_ok(Command::new("sha256sum").current_dir(root).args(files));
    String::from_utf8(out.stdout).expect("utf-8")
}

/// Verifies `sums` (sha256sum output) under `root`.
fn verify_checksums(root: &Path, sums: &str) {
    let mut child = Command::new("sha256sum")
        .arg("--quiet")
        .arg("-c")
        .current_dir(root)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("sha256sum");
    child
        .stdin
        .take()
        .expect("stdin")
        .write_all(sums.as_bytes())
        .expect("feed sha256sum");
    let out = child.wait_with_output().expect("sha256sum");
    assert!(
        out.status.success(),
        "checksum mismatch:\n{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
}

/// The ext4 blocks holding `file` (a path inside the filesystem on `dev`), via debugfs.
fn ext4_blocks(dev: &Path, file: &str) -> Vec<u64> {
    let out = run_ok(
        Command::new("debugfs")
            .arg("-R")
            .arg(format!("blocks /{file}"))
            .arg(dev),
    );
    let blocks: Vec<u64> = String::from_utf8_lossy(&out.stdout)
        .split_whitespace()
        .map(|b| b.parse().expect("block number"))
        .collect();
    assert!(!blocks.is_empty(), "debugfs found no blocks for {file}");
    blocks
}

/// Where data block `block` lives in the volume file, from `blockguard dump --json`.
fn data_offset(volume: &Path, block: u64) -> u64 {
    let out = run_ok(
        blockguard()
            .arg("dump")
            .arg(volume)
            .arg("--block")
            .arg(block.to_string())
            .arg("--json"),
    );
    let json: serde_json::Value = serde_json::from_slice(&out.stdout).expect("dump --json");
    assert_eq!(json["block_size"], 4096);
    let location = &json["blocks"][0]["location"];
    assert_eq!(location["block"], block);
    location["data_offset"].as_u64().expect("data_offset")
}

/// Mounts `volume` (64 MiB) through FUSE, builds ext4 on it through a loop device, writes a
/// tree of files, checks the filesystem with `fsck.ext4` and releases everything; then
/// `check`s the volume (exit 0: every block verified). Returns the files' `sha256sum` lines and
/// the files.
fn ext4_tree_through_fuse(volume: &Path, mnt: &Path, ext: &Path, log: &Path) -> (String, Vec<PathBuf>) {
    let fuse = FuseMount::new(volume, mnt, log, false);
    assert_eq!(
        std::fs::metadata(&fuse.file).expect("stat").len(),
        64 * MIB as u64
    );
    let lo = Loop::new(&fuse.file);
    // 4 KiB ext4 blocks, so that an ext4 block number is a volume block number.
    run_ok(
        Command::new("mkfs.ext4")
            .args(["-q", "-F", "-b", "4096"])
            .arg(&lo.dev),
    );
    let fs = FsMount::new(&lo.dev, ext, false);
    let files = write_tree(ext);
    let sums = checksums(ext, &files);
    run_ok(&mut Command::new("sync"));
    fs.unmount();
    run_ok(Command::new("fsck.ext4").arg("-fn").arg(&lo.dev));
    lo.detach();
    fuse.unmount();
    run_ok(blockguard().arg("check").arg(volume));
    (sums, files)
}

#[test]
fn ext4_lives_on_an_exported_volume_and_corruption_is_an_io_error() {
    let _serial = serial();
    require_environment();
    let tmp = tempfile::tempdir().expect("tempdir");
    let volume = tmp.path().join("vol.bgv");
    let mnt = tmp.path().join("fuse");
    let ext = tmp.path().join("ext");
    let log = tmp.path().join("server.log");
    format_volume(&volume, "64M");

    let (sums, files) = ext4_tree_through_fuse(&volume, &mnt, &ext, &log);

    // Remount everything and read every file back.
    let fuse = FuseMount::new(&volume, &mnt, &log, false);
    let lo = Loop::new(&fuse.file);
    let fs = FsMount::new(&lo.dev, &ext, true);
    verify_checksums(&ext, &sums);
    fs.unmount();
    let victim_blocks = ext4_blocks(&lo.dev, "big1");
    lo.detach();
    fuse.unmount();

    // Corrupt one data block of big1 in the stopped volume's file.
    let bad = victim_blocks[victim_blocks.len() / 2];
    let offset = data_offset(&volume, bad);
    let raw = OpenOptions::new()
        .read(true)
        .write(true)
        .open(&volume)
        .expect("open volume file");
    let mut bytes = [0u8; 16];
    raw.read_exact_at(&mut bytes, offset + 100).expect("read");
    bytes.iter_mut().for_each(|b| *b ^= 0x5A);
    raw.write_all_at(&bytes, offset + 100).expect("corrupt");
    raw.sync_all().expect("sync");
    drop(raw);

    // Reading big1 is an I/O error; every other file still reads correctly.
    let fuse = FuseMount::new(&volume, &mnt, &log, true);
    let lo = Loop::new(&fuse.file);
    let fs = FsMount::new(&lo.dev, &ext, true);
    let err = std::fs::read(ext.join("big1")).expect_err("reading a corrupt file must fail");
    assert_eq!(err.raw_os_error(), Some(5), "expected EIO, got {err}");
    let others: String = sums
        .lines()
        .filter(|l| !l.ends_with(" big1"))
        .map(|l| format!("{l}\n"))
        .collect();
    assert_eq!(others.lines().count(), files.len() - 1);
    verify_checksums(&ext, &others);
    fs.unmount();
    lo.detach();
    fuse.unmount();
    let server_log = std::fs::read_to_string(&log).expect("server log");
    assert!(
        server_log.contains(&format!("block {bad} failed verification")),
        "the server log does not name block {bad}:\n{server_log}"
    );

    // `check` finds it too.
    let out = run(blockguard().arg("check").arg(&volume));
    assert_eq!(out.status.code(), Some(1), "check: {out:?}");
    let report = String::from_utf8_lossy(&out.stdout);
    assert!(
        report.contains(&format!("bad block {bad}")),
        "check did not name block {bad}:\n{report}"
    );
}

#[test]
fn a_mounted_volume_cannot_be_opened_again() {
    let _serial = serial();
    require_environment();
    let tmp = tempfile::tempdir().expect("tempdir");
    let volume = tmp.path().join("vol.bgv");
    let log = tmp.path().join("server.log");
    format_volume(&volume, "16M");
    let first = FuseMount::new(&volume, &tmp.path().join("m1"), &log, false);

    let second = tmp.path().join("m2");
    std::fs::create_dir(&second).expect("mkdir");
    for read_only in [false, true] {
        let mut cmd = blockguard();
        cmd.arg("mount").arg(&volume).arg(&second);
        if read_only {
            cmd.arg("--read-only");
        }
        let out = run(&mut cmd);
        assert!(
            !out.status.success(),
            "a second mount succeeded (read_only={read_only})"
        );
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert!(stderr.contains("in use"), "unclear refusal: {stderr}");
        assert!(!is_mounted(&second));
    }
    first.unmount();
    // Released: mounting it elsewhere now works.
    FuseMount::new(&volume, &second, &log, false).unmount();
}

/// Writes `data` at `offset` through the exported file, without fsync.
fn write_through(file: &Path, data: &[u8], offset: u64) {
    let f = OpenOptions::new()
        .write(true)
        .open(file)
        .expect("open exported file");
    f.write_all_at(data, offset).expect("write");
}

fn read_back(volume: &Path, tmp: &Path, offset: u64, len: usize) -> Vec<u8> {
    let fuse = FuseMount::new(volume, &tmp.join("verify"), &tmp.join("verify.log"), true);
    let mut buf = vec![0u8; len];
    File::open(&fuse.file)
        .expect("open")
        .read_exact_at(&mut buf, offset)
        .expect("read back");
    fuse.unmount();
    buf
}

#[test]
fn umount_and_sigterm_flush_and_close() {
    let _serial = serial();
    require_environment();
    let tmp = tempfile::tempdir().expect("tempdir");
    let volume = tmp.path().join("vol.bgv");
    let mnt = tmp.path().join("fuse");
    format_volume(&volume, "16M");

    // `blockguard umount` returns once the server has flushed and released the volume, so a
    // check can open it at once.
    let data = pseudo_random(7, 3 * MIB + 1234);
    let fuse = FuseMount::new(&volume, &mnt, &tmp.path().join("a.log"), false);
    write_through(&fuse.file, &data, 5 * MIB as u64 + 17);
    fuse.unmount();
    run_ok(blockguard().arg("check").arg(&volume));
    assert_eq!(
        read_back(&volume, tmp.path(), 5 * MIB as u64 + 17, data.len()),
        data
    );

    // In the foreground, SIGTERM unmounts, flushes, closes and exits 0 — but not while a loop
    // device still has the file open: then the server keeps serving.
    std::fs::create_dir_all(&mnt).expect("mkdir");
    let mut server: Child = blockguard()
        .arg("mount")
        .arg(&volume)
        .arg(&mnt)
        .arg("--foreground")
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .expect("start server");
    let mut line = String::new();
    BufReader::new(server.stdout.take().expect("stdout"))
        .read_line(&mut line)
        .expect("ready line");
    let file = PathBuf::from(line.trim());
    let mut guard = ServerGuard {
        child: server,
        mountpoint: mnt.canonicalize().expect("canonical"),
    };
    let data = pseudo_random(8, MIB);
    write_through(&file, &data, 1234);

    let lo = Loop::new(&file);
    sigterm(&guard.child);
    std::thread::sleep(Duration::from_millis(300));
    assert!(
        guard.child.try_wait().expect("try_wait").is_none(),
        "server exited under a loop device"
    );
    assert!(is_mounted(&guard.mountpoint));
    lo.detach();

    sigterm(&guard.child);
    let status = wait_with_timeout(&mut guard.child, Duration::from_secs(20));
    assert!(status.success(), "server exited with {status}");
    assert!(!is_mounted(&guard.mountpoint));
    run_ok(blockguard().arg("check").arg(&volume));
    assert_eq!(read_back(&volume, tmp.path(), 1234, data.len()), data);
}

/// A foreground server; killed and its mount removed on drop if the test fails first.
struct ServerGuard {
    child: Child,
    mountpoint: PathBuf,
}

impl Drop for ServerGuard {
    fn drop(&mut self) {
        if self.child.try_wait().ok().flatten().is_none() {
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
        if is_mounted(&self.mountpoint) {
            let _ = Command::new("umount").arg("-l").arg(&self.mountpoint).status();
        }
    }
}

fn sigterm(child: &Child) {
    run_ok(Command::new("kill").arg("-TERM").arg(child.id().to_string()));
}

fn wait_with_timeout(child: &mut Child, timeout: Duration) -> std::process::ExitStatus {
    let deadline = Instant::now() + timeout;
    loop {
        if let Some(status) = child.try_wait().expect("try_wait") {
            return status;
        }
        assert!(
            Instant::now() < deadline,
            "server did not exit within {timeout:?}"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
}

#[test]
fn a_mirrored_volume_reads_right_through_fuse_while_one_copy_is_corrupt() {
    let _serial = serial();
    require_environment();
    let tmp = tempfile::tempdir().expect("tempdir");
    let a = tmp.path().join("a.bgv");
    let b = tmp.path().join("b.bgv");
    run_ok(
        blockguard()
            .arg("format")
            .arg(&a)
            .arg("--size")
            .arg("16M")
            .arg("--mirror")
            .arg(&b),
    );
    let data = pseudo_random(11, 4 * MIB);
    let fuse = FuseMount::new(&a, &tmp.path().join("mnt"), &tmp.path().join("mount.log"), false);
    write_through(&fuse.file, &data, 0);
    File::open(&fuse.file).expect("open").sync_all().expect("fsync");
    fuse.unmount();
    // Blocks 0..64 damaged on the copy the first MiB is read from, 300..310 on the other.
    for block in (0..64).chain(300..310) {
        let copy = if block < 64 { &a } else { &b };
        let at = data_offset(copy, block) + 7;
        let f = OpenOptions::new().write(true).open(copy).expect("open copy");
        f.write_all_at(&[0xEE; 3], at).expect("corrupt");
        f.sync_all().expect("sync");
    }
    // Read-write mount (repairs are written), through the other copy's path.
    let fuse = FuseMount::new(
        &b,
        &tmp.path().join("mnt2"),
        &tmp.path().join("mount2.log"),
        false,
    );
    let mut back = vec![0u8; data.len()];
    File::open(&fuse.file)
        .expect("open")
        .read_exact_at(&mut back, 0)
        .expect("every block reads");
    assert!(
        back == data,
        "the data read back through FUSE is what was written"
    );
    fuse.unmount();
    let log = std::fs::read_to_string(tmp.path().join("mount2.log")).expect("log");
    assert!(log.contains("read repair"), "{log}");
    // Every damaged copy was read (each MiB from another copy) and healed: every copy checks
    // clean, the set from either path.
    for p in [&a, &b] {
        run_ok(blockguard().arg("check").arg(p));
    }
}

#[test]
fn a_mounted_volume_answers_status_and_scrub_on_its_control_socket() {
    let _serial = serial();
    require_environment();
    let tmp = tempfile::tempdir().expect("tempdir");
    let volume = tmp.path().join("vol.bgv");
    let control = PathBuf::from(format!(
        "{}.ctl",
        tmp.path().canonicalize().unwrap().join("vol.bgv").display()
    ));
    format_volume(&volume, "16M");
    let fuse = FuseMount::new(&volume, &tmp.path().join("fuse"), &tmp.path().join("log"), false);
    assert!(control.exists(), "no control socket at {}", control.display());
    write_through(&fuse.file, &pseudo_random(3, 2 << 20), 1 << 20);

    let status = run_ok(blockguard().arg("status").arg(&volume).arg("--json"));
    let status: serde_json::Value = serde_json::from_slice(&status.stdout).expect("status JSON");
    assert_eq!(status["server"]["kind"], "mount");
    assert_eq!(status["server"]["serving"], fuse.file.display().to_string());
    let scrub = run_ok(blockguard().arg("scrub").arg(&volume).arg("--json"));
    let scrub: serde_json::Value = serde_json::from_slice(&scrub.stdout).expect("scrub JSON");
    assert_eq!(scrub["via"], "control-socket");
    assert_eq!(scrub["problem_count"], 0);
    // The 2 MiB written (still staged or already on disk) were verified.
    assert!(scrub["blocks_checked"].as_u64().unwrap() >= 512, "{scrub}");

    fuse.unmount();
    assert!(!control.exists(), "the control socket outlived the mount");
}

/// ext4 through `mount` on a `journal` volume, a `rebuild` volume and a volume whose metadata
/// lives on a separate device: the filesystem is built, filled, checked by `fsck.ext4`, and
/// read back after a remount; `check` finds the volume clean. The split volume's data device,
/// attached alone (without blockguard) and cut to the volume's size, is the plain image:
/// `fsck.ext4` accepts it and every file reads back.
#[test]
fn ext4_on_journal_rebuild_and_split_volumes() {
    let _serial = serial();
    require_environment();
    let tmp = tempfile::tempdir().expect("tempdir");
    let log = tmp.path().join("server.log");
    let (mnt, ext) = (tmp.path().join("fuse"), tmp.path().join("ext"));
    let cases: [(&str, &[&str]); 3] = [
        ("journal.bgv", &["--mode", "journal"]),
        ("rebuild.bgv", &["--mode", "rebuild"]),
        ("data.img", &["--metadata-device", "META"]),
    ];
    for (name, extra) in cases {
        let volume = tmp.path().join(name);
        let meta = tmp.path().join("meta.bgm");
        let args: Vec<PathBuf> = extra
            .iter()
            .map(|a| {
                if *a == "META" {
                    meta.clone()
                } else {
                    PathBuf::from(a)
                }
            })
            .collect();
        run_ok(
            blockguard()
                .arg("format")
                .arg(&volume)
                .args(["--size", "64M"])
                .args(&args),
        );
        let (sums, _) = ext4_tree_through_fuse(&volume, &mnt, &ext, &log);

        let fuse = FuseMount::new(&volume, &mnt, &log, true);
        let lo = Loop::new(&fuse.file);
        let fs = FsMount::new(&lo.dev, &ext, true);
        verify_checksums(&ext, &sums);
        fs.unmount();
        lo.detach();
        fuse.unmount();

        if extra.contains(&"META") {
            // The data device alone: the first 64 MiB are the filesystem, nothing else.
            let out = run_ok(
                Command::new("losetup")
                    .args(["-f", "--show", "-r", "--sizelimit"])
                    .arg((64 * MIB).to_string())
                    .arg(&volume),
            );
            let lo = Loop {
                dev: PathBuf::from(stdout_line(&out)),
                detached: false,
            };
            run_ok(Command::new("fsck.ext4").arg("-fn").arg(&lo.dev));
            let fs = FsMount::new(&lo.dev, &ext, true);
            verify_checksums(&ext, &sums);
            fs.unmount();
            lo.detach();
        }
        std::fs::remove_file(&volume).expect("remove volume");
        let _ = std::fs::remove_file(&meta);
    }
}
