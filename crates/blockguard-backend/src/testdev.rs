//! Loop devices and partitions for the tests that need real block devices: they need root
//! and util-linux (losetup, addpart) and are skipped (with a line saying why) otherwise.
//! Guards detach and delete what they set up even when a test fails.

use std::fs::File;
use std::path::{Path, PathBuf};
use std::process::Command;

/// A loop device, detached on drop.
pub(crate) struct LoopDev(pub(crate) PathBuf);

impl Drop for LoopDev {
    fn drop(&mut self) {
        let _ = Command::new("losetup").arg("-d").arg(&self.0).status();
    }
}

/// A partition added to a disk with `addpart`, deleted on drop (drop it before its loop
/// device: a detached loop device keeps its partitions).
pub(crate) struct Part {
    disk: PathBuf,
    number: u32,
    pub(crate) node: PathBuf,
}

impl Drop for Part {
    fn drop(&mut self) {
        let _ = Command::new("delpart")
            .arg(&self.disk)
            .arg(self.number.to_string())
            .status();
    }
}

/// Attaches `target` to a free loop device; `None` (test skipped) where that is impossible.
pub(crate) fn attach(target: &Path) -> Option<LoopDev> {
    if !rustix::process::geteuid().is_root() {
        println!("skipped: loop devices need root");
        return None;
    }
    let out = Command::new("losetup")
        .args(["-f", "--show"])
        .arg(target)
        .output();
    match out {
        Ok(o) if o.status.success() => {
            Some(LoopDev(PathBuf::from(String::from_utf8_lossy(&o.stdout).trim())))
        }
        Ok(o) => {
            println!(
                "skipped: losetup failed: {}",
                String::from_utf8_lossy(&o.stderr).trim()
            );
            None
        }
        Err(e) => {
            println!("skipped: losetup not available: {e}");
            None
        }
    }
}

/// A sparse file `img` of `len` bytes in a new temporary directory, and a loop device over it.
pub(crate) fn scratch_image(len: u64) -> Option<(tempfile::TempDir, PathBuf, LoopDev)> {
    let dir = tempfile::tempdir().unwrap();
    let img = dir.path().join("img");
    File::create(&img).unwrap().set_len(len).unwrap();
    let lo = attach(&img)?;
    Some((dir, img, lo))
}

/// Partition `number` of `disk`: `len` bytes at `start` (multiples of 512).
pub(crate) fn add_partition(disk: &Path, number: u32, start: u64, len: u64) -> Option<Part> {
    let out = Command::new("addpart")
        .arg(disk)
        .arg(number.to_string())
        .arg((start / 512).to_string())
        .arg((len / 512).to_string())
        .output();
    match out {
        Ok(o) if o.status.success() => {}
        Ok(o) => {
            println!(
                "skipped: addpart failed: {}",
                String::from_utf8_lossy(&o.stderr).trim()
            );
            return None;
        }
        Err(e) => {
            println!("skipped: addpart not available: {e}");
            return None;
        }
    }
    let part = Part {
        disk: disk.to_path_buf(),
        number,
        node: PathBuf::from(format!("{}p{number}", disk.display())),
    };
    // devtmpfs creates the node asynchronously.
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(5);
    while !part.node.exists() {
        assert!(
            std::time::Instant::now() < deadline,
            "{} did not appear",
            part.node.display()
        );
        std::thread::sleep(std::time::Duration::from_millis(10));
    }
    Some(part)
}
