//! Files that belong to a volume but live outside it: its control socket (`<volume>.ctl`) and
//! its scrub state (`<volume>.scrub`).
//!
//! For a volume file they sit next to it, under its canonical path, so every name of the file
//! (relative, absolute, through a symbolic link) finds the same ones. A block device's
//! directory is `/dev`, where nothing of ours belongs: its control socket goes to
//! `/run/blockguard/` and its scrub state, which must survive a reboot, to
//! `/var/lib/blockguard/`, named after the device and its numbers (`sdb-8:16.ctl`), which
//! every node of the same device shares. A volume on a remote NBD export is treated like a
//! device, named after its URI (`crate::remote::local_name`).

use anyhow::{Context, Result};
use std::os::unix::fs::{DirBuilderExt, FileTypeExt, MetadataExt};
use std::path::{Path, PathBuf};

/// Where the control sockets of block devices live.
pub(crate) const DEVICE_CONTROL_DIR: &str = "/run/blockguard";

/// Where the scrub state of block devices lives.
pub(crate) const DEVICE_STATE_DIR: &str = "/var/lib/blockguard";

/// The default control socket of `volume`: `<canonical path>.ctl`, or for a block device
/// `/run/blockguard/<name>-<major>:<minor>.ctl`.
pub(crate) fn control_socket(volume: &Path) -> Result<PathBuf> {
    sidecar(volume, "ctl", DEVICE_CONTROL_DIR)
}

/// The scrub state file of `volume`: `<canonical path>.scrub`, or for a block device
/// `/var/lib/blockguard/<name>-<major>:<minor>.scrub`.
pub(crate) fn scrub_state(volume: &Path) -> Result<PathBuf> {
    sidecar(volume, "scrub", DEVICE_STATE_DIR)
}

fn sidecar(volume: &Path, ext: &str, device_dir: &str) -> Result<PathBuf> {
    // A remote export has no local directory: its files go where a device's do.
    if crate::remote::is_remote(volume) {
        let name = crate::remote::local_name(volume);
        return Ok(Path::new(device_dir).join(format!("{name}.{ext}")));
    }
    let canonical = volume
        .canonicalize()
        .with_context(|| format!("cannot resolve {}", volume.display()))?;
    let meta =
        std::fs::metadata(&canonical).with_context(|| format!("cannot access {}", volume.display()))?;
    if meta.file_type().is_block_device() {
        let name = canonical
            .file_name()
            .map_or_else(|| "device".into(), |n| n.to_string_lossy().into_owned());
        let (major, minor) = (rustix::fs::major(meta.rdev()), rustix::fs::minor(meta.rdev()));
        return Ok(Path::new(device_dir).join(format!("{name}-{major}:{minor}.{ext}")));
    }
    let mut os = canonical.into_os_string();
    os.push(".");
    os.push(ext);
    Ok(PathBuf::from(os))
}

/// Creates the directory a sidecar file goes into, if it is one of ours for devices (the
/// directory of a volume file exists already).
pub(crate) fn make_parent(file: &Path) -> Result<()> {
    let Some(parent) = file.parent() else {
        return Ok(());
    };
    if parent == Path::new(DEVICE_CONTROL_DIR) || parent == Path::new(DEVICE_STATE_DIR) {
        std::fs::DirBuilder::new()
            .recursive(true)
            .mode(0o755)
            .create(parent)
            .with_context(|| format!("cannot create {}", parent.display()))?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_file_volume_has_its_sidecars_next_to_it_under_every_name() {
        let dir = tempfile::tempdir().unwrap();
        let vol = dir.path().join("v.bgv");
        std::fs::write(&vol, b"x").unwrap();
        let link = dir.path().join("link.bgv");
        std::os::unix::fs::symlink(&vol, &link).unwrap();
        let canonical = vol.canonicalize().unwrap();
        let want = PathBuf::from(format!("{}.ctl", canonical.display()));
        assert_eq!(control_socket(&vol).unwrap(), want);
        assert_eq!(control_socket(&link).unwrap(), want);
        assert_eq!(
            scrub_state(&vol).unwrap(),
            PathBuf::from(format!("{}.scrub", canonical.display()))
        );
        assert!(control_socket(&dir.path().join("missing")).is_err());
    }
}
