//! Loop devices and partitions of them for the integration tests: they need root and
//! util-linux (losetup, addpart, delpart); the tests that use them skip, saying why, where
//! those are missing. Every guard undoes what it set up when dropped, a failing test too.

#![allow(dead_code)]

use std::fs::File;
use std::os::unix::fs::MetadataExt;
use std::path::Path;
use std::process::Command;
use std::time::{Duration, Instant};

/// A loop device over a file, detached on drop.
pub struct Loop {
    pub dev: String,
}

impl Loop {
    /// Attaches `file` to a free loop device; `None` (said on stderr) when losetup fails.
    pub fn attach(file: &Path) -> Option<Loop> {
        Self::attach_with(file, &[])
    }

    /// [`Loop::attach`] with more losetup options (`--sizelimit N`, `--offset N`).
    pub fn attach_with(file: &Path, options: &[&str]) -> Option<Loop> {
        let out = Command::new("losetup")
            .args(["--find", "--show"])
            .args(options)
            .arg(file)
            .output()
            .ok()?;
        if !out.status.success() {
            eprintln!("losetup failed: {}", String::from_utf8_lossy(&out.stderr));
            return None;
        }
        let dev = String::from_utf8_lossy(&out.stdout).trim().to_string();
        Some(Loop { dev })
    }
}

impl Drop for Loop {
    fn drop(&mut self) {
        let _ = Command::new("losetup").args(["--detach", &self.dev]).status();
    }
}

/// A partition added to a loop device with `addpart`, deleted on drop. Drop it before its
/// loop device: a detached loop device keeps its partitions.
pub struct Partition {
    disk: String,
    number: u32,
    pub dev: String,
}

impl Partition {
    /// Partition `number` of `disk`: `len` bytes at byte `start` (multiples of 512). `None`
    /// (said on stderr) when addpart fails.
    pub fn add(disk: &str, number: u32, start: u64, len: u64) -> Option<Partition> {
        let out = Command::new("addpart")
            .arg(disk)
            .arg(number.to_string())
            .arg((start / 512).to_string())
            .arg((len / 512).to_string())
            .output()
            .ok()?;
        if !out.status.success() {
            eprintln!("addpart failed: {}", String::from_utf8_lossy(&out.stderr));
            return None;
        }
        let part = Partition {
            disk: disk.to_string(),
            number,
            dev: format!("{disk}p{number}"),
        };
        // devtmpfs creates the node asynchronously.
        let deadline = Instant::now() + Duration::from_secs(5);
        while !Path::new(&part.dev).exists() {
            assert!(Instant::now() < deadline, "{} did not appear", part.dev);
            std::thread::sleep(Duration::from_millis(10));
        }
        Some(part)
    }
}

impl Drop for Partition {
    fn drop(&mut self) {
        let _ = Command::new("delpart")
            .arg(&self.disk)
            .arg(self.number.to_string())
            .status();
    }
}

pub fn is_root() -> bool {
    std::fs::metadata("/proc/self").is_ok_and(|m| m.uid() == 0)
}

/// True if the test may attach loop devices (and add partitions to them); says why not
/// otherwise.
pub fn loop_devices_usable() -> bool {
    let have = |tool: &str| {
        Command::new(tool)
            .arg("--version")
            .output()
            .is_ok_and(|o| o.status.success())
    };
    if !is_root() || !have("losetup") || !have("addpart") {
        eprintln!("skipped: needs root, losetup and addpart");
        return false;
    }
    true
}

/// Reads `len` bytes at `offset` of a device (or any file) by path.
pub fn read_dev(dev: impl AsRef<Path>, offset: u64, len: usize) -> Vec<u8> {
    use std::os::unix::fs::FileExt;
    let mut b = vec![0u8; len];
    File::open(dev.as_ref())
        .unwrap()
        .read_exact_at(&mut b, offset)
        .unwrap();
    b
}
