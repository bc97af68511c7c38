//! The same volume under other names: loop devices over it (set up through a hard link, or a
//! link deleted since), partitions of those loop devices, loop devices stacked on them. Every
//! such name must be locked out while the volume is in use, and never be a copy's target
//! when it is the copy's source (review 9, findings 1 to 4).
//!
//! These tests need root, losetup and addpart, and skip (saying so) without them.

mod loop_support;
mod nbd_support;

use loop_support::{loop_devices_usable, read_dev, Loop, Partition};
use nbd_support::{random_bytes, Served, BIN};
use std::path::Path;
use std::process::{Command, Output, Stdio};
use std::time::{Duration, Instant};

/// Runs `blockguard args…` in `dir`; a run that has not ended after 30 s is killed and fails
/// the test (a second server that was not refused would run forever).
fn bg(dir: &Path, args: &[&str]) -> Output {
    let mut child = Command::new(BIN)
        .args(args)
        .current_dir(dir)
        .env("BLOCKGUARD_LOG", "warn")
        .env("NO_COLOR", "1")
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("run blockguard");
    let deadline = Instant::now() + Duration::from_secs(30);
    while child.try_wait().expect("wait").is_none() {
        if Instant::now() > deadline {
            let _ = child.kill();
            let out = child.wait_with_output().expect("wait");
            panic!(
                "blockguard {args:?} still running after 30 s:\n{}",
                String::from_utf8_lossy(&out.stderr)
            );
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    child.wait_with_output().expect("wait")
}

/// Asserts a run failed with exit status 2 and said every one of `parts` on stderr.
#[track_caller]
fn refused(out: &Output, parts: &[&str]) {
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(2), "not refused:\n{stderr}");
    for p in parts {
        assert!(stderr.contains(p), "stderr lacks {p:?}:\n{stderr}");
    }
}

/// Asserts `args` is refused as [`refused`] says, and with `--force` added too.
#[track_caller]
fn refused_even_forced(dir: &Path, args: &[&str], parts: &[&str]) {
    refused(&bg(dir, args), parts);
    let mut forced = args.to_vec();
    forced.push("--force");
    refused(&bg(dir, &forced), parts);
}

#[track_caller]
fn ok(out: &Output) {
    assert!(
        out.status.success(),
        "failed ({}):\n{}",
        out.status,
        String::from_utf8_lossy(&out.stderr)
    );
}

/// A volume `vol.bgv` of `size` in a new temporary directory, holding 1 MiB of random data.
fn volume(size: &str) -> tempfile::TempDir {
    let dir = tempfile::tempdir().expect("tempdir");
    ok(&bg(dir.path(), &["format", "vol.bgv", "--size", size]));
    std::fs::write(dir.path().join("data.raw"), random_bytes(1 << 20, 9)).unwrap();
    ok(&bg(dir.path(), &["import", "data.raw", "vol.bgv"]));
    dir
}

/// [`volume`], where loop devices can be used (`None`, said on stderr, otherwise).
fn volume_on_loop_host(size: &str) -> Option<tempfile::TempDir> {
    loop_devices_usable().then(|| volume(size))
}

/// Regression (finding 1): a partition of a loop device over the volume file took no lock on
/// the file, so a second server ran read-write next to the first and lost its writes.
#[test]
fn regression_a_second_server_through_a_partition_of_a_loop_device_is_refused() {
    let Some(dir) = volume_on_loop_host("16M") else {
        return;
    };
    let vol = dir.path().join("vol.bgv");
    let Some(lo) = Loop::attach(&vol) else { return };
    let len = std::fs::metadata(&vol).unwrap().len() & !511;
    let Some(p1) = Partition::add(&lo.dev, 1, 0, len) else {
        return;
    };

    let first = Served::start(&vol, &[]);
    let out = bg(dir.path(), &["serve", &p1.dev, "--socket", "b.sock"]);
    refused(&out, &["in use", "a partition of", "a loop device over"]);
    drop(first);

    // The other way round: the partition served, the volume file refused.
    let part_served = Served::start_in(Path::new(&p1.dev), dir.path(), &[]);
    refused(
        &bg(dir.path(), &["serve", "vol.bgv", "--socket", "a.sock"]),
        &["in use"],
    );
    // Read-only too: the partition's server writes.
    refused(&bg(dir.path(), &["check", "vol.bgv"]), &["in use"]);
    drop(part_served);
    ok(&bg(dir.path(), &["check", "vol.bgv"]));
    drop(p1);
}

/// Regression (finding 2): `export other.bgv /dev/loopNp1` (no --force: the partition's
/// first and last MiB were zeros) wrote into a volume while it was served.
#[test]
fn regression_export_into_a_served_volume_through_a_partition_is_refused() {
    let Some(dir) = volume_on_loop_host("24M") else {
        return;
    };
    ok(&bg(dir.path(), &["format", "other.bgv", "--size", "4M"]));
    let vol = dir.path().join("vol.bgv");
    let Some(lo) = Loop::attach(&vol) else { return };
    // Bytes 12..20 MiB of the volume file: unwritten, so zeros.
    let Some(p1) = Partition::add(&lo.dev, 1, 12 << 20, 8 << 20) else {
        return;
    };
    let before = read_dev(&vol, 12 << 20, 8 << 20);
    assert!(before.iter().all(|&b| b == 0));
    let served = Served::start(&vol, &[]);
    refused_even_forced(dir.path(), &["export", "other.bgv", &p1.dev], &["in use"]);
    drop(served);
    assert!(
        read_dev(&vol, 12 << 20, 8 << 20) == before,
        "the export wrote into the served volume"
    );
    ok(&bg(dir.path(), &["check", "vol.bgv"]));
    drop(p1);
}

/// Regression (finding 3): a loop device over the volume set up through a hard link deleted
/// since ("… (deleted)" in sysfs) was not recognized as the volume, and `export vol.bgv
/// /dev/loopN --force` overwrote the volume with itself. The source is never a target.
#[test]
fn regression_export_onto_a_loop_device_over_a_deleted_link_of_the_source_is_refused() {
    let Some(dir) = volume_on_loop_host("16M") else {
        return;
    };
    let vol = dir.path().join("vol.bgv");
    let link = dir.path().join("link.bgv");
    std::fs::hard_link(&vol, &link).unwrap();
    let Some(lo) = Loop::attach(&link) else { return };
    std::fs::remove_file(&link).unwrap();
    let before = std::fs::read(&vol).unwrap();
    refused_even_forced(
        dir.path(),
        &["export", "vol.bgv", &lo.dev],
        &["same file or device", "would overwrite what it reads"],
    );
    refused_even_forced(
        dir.path(),
        &["import", &lo.dev, "vol.bgv"],
        &["same file or device"],
    );
    assert!(std::fs::read(&vol).unwrap() == before, "the volume was modified");
    // Its backing file cannot be locked by name: refused rather than opened unlocked.
    refused(
        &bg(dir.path(), &["check", &lo.dev]),
        &["deleted or replaced", "set it up again"],
    );
    ok(&bg(dir.path(), &["check", "vol.bgv"]));
}

/// Regression (finding 4): a loop device set up through a hard link of the volume was not
/// recognized (its backing file's *name* was compared), so `import /dev/loopN vol.bgv`
/// imported the volume into itself, and with --force destroyed it. Partitions of it, and loop
/// devices stacked on those, are the volume too.
#[test]
fn regression_import_from_a_loop_device_over_a_hard_link_of_the_volume_is_refused() {
    let Some(dir) = volume_on_loop_host("16M") else {
        return;
    };
    let vol = dir.path().join("vol.bgv");
    let link = dir.path().join("link.bgv");
    std::fs::hard_link(&vol, &link).unwrap();
    // No larger than the volume, so that only the same-source check can refuse it.
    let Some(lo) = Loop::attach_with(&link, &["--sizelimit", "8388608"]) else {
        return;
    };
    let Some(p1) = Partition::add(&lo.dev, 1, 1 << 20, 4 << 20) else {
        return;
    };
    let Some(stacked) = Loop::attach(Path::new(&p1.dev)) else {
        return;
    };
    let before = std::fs::read(&vol).unwrap();
    for dev in [&lo.dev, &p1.dev, &stacked.dev] {
        let same = ["same file or device"];
        refused_even_forced(dir.path(), &["import", dev, "vol.bgv"], &same);
        refused_even_forced(dir.path(), &["export", "vol.bgv", dev], &same);
    }
    assert!(std::fs::read(&vol).unwrap() == before, "the volume was modified");
    drop((stacked, p1));

    // A partition of a loop device over another file is a source like any other (locked
    // shared, so the volume file's own exclusive lock does not meet it).
    let img = dir.path().join("disk.img");
    std::fs::File::create(&img).unwrap().set_len(16 << 20).unwrap();
    let Some(disk) = Loop::attach(&img) else { return };
    let Some(a) = Partition::add(&disk.dev, 1, 1 << 20, 4 << 20) else {
        return;
    };
    let data = random_bytes(4 << 20, 10);
    let raw_a = std::fs::OpenOptions::new().write(true).open(&a.dev).unwrap();
    std::os::unix::fs::FileExt::write_all_at(&raw_a, &data, 0).unwrap();
    raw_a.sync_all().unwrap();
    drop(raw_a);
    ok(&bg(dir.path(), &["format", "copy.bgv", "--size", "4M"]));
    ok(&bg(dir.path(), &["import", &a.dev, "copy.bgv"]));
    ok(&bg(dir.path(), &["export", "copy.bgv", "copy.raw"]));
    assert!(std::fs::read(dir.path().join("copy.raw")).unwrap() == data);
    drop(a);
}

/// The import source is locked (shared): a volume another process writes is not read as a
/// raw image, and nothing writes the source while it is read.
#[test]
fn import_from_a_volume_file_another_process_writes_is_refused() {
    let dir = volume("8M");
    ok(&bg(dir.path(), &["format", "other.bgv", "--size", "16M"]));
    let served = Served::start(&dir.path().join("vol.bgv"), &[]);
    refused(
        &bg(dir.path(), &["import", "vol.bgv", "other.bgv"]),
        &["vol.bgv", "in use"],
    );
    drop(served);
    ok(&bg(dir.path(), &["import", "vol.bgv", "other.bgv"]));
}
