//! Adversarial review of the two-device ("metadata device") volume at a4a7716.
//!
//! Tests marked FINDING fail on a4a7716 (each comment says what is broken); the others are
//! claims that held. See review_metadev/README.md.

use blockguard::blockguard_backend::{Backend, FaultBackend, MemoryBackend};
use blockguard::split::{read_trailer, trailer_offset};
use blockguard::{FormatOptions, Mode, OpenOptions, Volume};
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::Arc;

const BS: u64 = 4096;
const SIZE: u64 = 64 * BS;

fn opts(mode: Mode) -> FormatOptions {
    let mut o = FormatOptions::with_size(SIZE);
    o.mode = mode;
    o.group_blocks = Some(16);
    if mode == Mode::Journal {
        o.journal_size = Some(64 * BS);
    }
    o
}

struct Pair {
    data: Arc<FaultBackend>,
    meta: Arc<FaultBackend>,
}

impl Pair {
    fn new(mode: Mode, data_extra: u64, meta_extra: u64) -> (Pair, Volume) {
        let (dl, ml) = Volume::split_lengths(&opts(mode)).unwrap();
        let data = Arc::new(FaultBackend::new(dl + data_extra).unwrap());
        let meta = Arc::new(FaultBackend::new(ml + meta_extra).unwrap());
        let v = Volume::format_split(data.clone(), meta.clone(), &opts(mode), "/nonexistent/meta").unwrap();
        (Pair { data, meta }, v)
    }
    fn open(&self) -> blockguard::Result<Volume> {
        Volume::open_split(self.data.clone(), self.meta.clone(), &OpenOptions::default())
    }
}

fn pattern(b: u64, gen: u8) -> Vec<u8> {
    (0..BS)
        .map(|i| (i as u8) ^ (b as u8).wrapping_mul(31) ^ gen.wrapping_mul(101))
        .collect()
}

/// `v` closed and opened again with commits on the writing thread only, so that the two
/// devices' images a crash test takes one after the other are of one moment. (With the
/// background committer, a commit running between the two snapshots mixes two moments — a
/// metadata device from before a segment's barrier and a data device from after the home
/// writes that follow it — which no crash can produce; this test failed intermittently in
/// journal mode for that reason alone.)
fn reopen_committing_on_writer(p: &Pair, v: Volume) -> Volume {
    v.close().unwrap();
    Volume::open_split(
        p.data.clone(),
        p.meta.clone(),
        &OpenOptions {
            background_commit: false,
            ..OpenOptions::default()
        },
    )
    .unwrap()
}

fn write_all(v: &Volume, gen: u8) {
    for b in 0..SIZE / BS {
        v.write_at(&pattern(b, gen), b * BS).unwrap();
    }
    v.flush().unwrap();
}

// ---------------------------------------------------------------------------------------------
// Claims that held
// ---------------------------------------------------------------------------------------------

/// The data device's first SIZE bytes are the plain image.
#[test]
fn held_data_device_is_the_plain_image() {
    for mode in [Mode::Dual, Mode::Rebuild, Mode::Journal] {
        let (p, v) = Pair::new(mode, 0, 0);
        write_all(&v, 3);
        v.close().unwrap();
        let img = p.data.live_image();
        for b in 0..SIZE / BS {
            assert_eq!(
                &img[(b * BS) as usize..((b + 1) * BS) as usize],
                &pattern(b, 3)[..],
                "{mode:?} block {b}"
            );
        }
        let v = p.open().unwrap();
        let mut buf = vec![0u8; BS as usize];
        v.read_at(&mut buf, 5 * BS).unwrap();
        assert_eq!(buf, pattern(5, 3));
    }
}

/// Swapped / foreign / mismatched pairs are refused and nothing is written.
#[test]
fn held_swapped_and_foreign_pairs_refused_without_writing() {
    let (a, va) = Pair::new(Mode::Dual, 0, 0);
    write_all(&va, 1);
    va.close().unwrap();
    let (b, vb) = Pair::new(Mode::Dual, 0, 0);
    vb.close().unwrap();
    let snap = |p: &Pair| (p.data.live_image(), p.meta.live_image());
    let (sa, sb) = (snap(&a), snap(&b));
    // swapped
    let e = Volume::open_split(a.meta.clone(), a.data.clone(), &OpenOptions::default());
    assert!(e.is_err());
    // foreign
    let e = Volume::open_split(a.data.clone(), b.meta.clone(), &OpenOptions::default());
    let msg = format!("{}", e.err().unwrap());
    assert!(msg.contains("do not belong together"), "{msg}");
    let e = Volume::open_split(b.data.clone(), a.meta.clone(), &OpenOptions::default());
    assert!(e.is_err());
    // same device twice
    assert!(Volume::open_split(a.data.clone(), a.data.clone(), &OpenOptions::default()).is_err());
    assert!(Volume::open_split(a.meta.clone(), a.meta.clone(), &OpenOptions::default()).is_err());
    assert_eq!(snap(&a), sa);
    assert_eq!(snap(&b), sb);
}

/// The metadata device alone is refused; the data device alone is refused.
#[test]
fn held_single_device_opens_refused() {
    let (p, v) = Pair::new(Mode::Dual, 0, 0);
    write_all(&v, 1);
    v.close().unwrap();
    let before = (p.data.live_image(), p.meta.live_image());
    assert!(Volume::open(p.meta.clone(), &OpenOptions::default()).is_err());
    assert!(Volume::open(p.data.clone(), &OpenOptions::default()).is_err());
    assert_eq!((p.data.live_image(), p.meta.live_image()), before);
}

/// Damage on either device is detected: a lost or misdirected write on the data device, a bit
/// flip in a data block or the trailer, a bit flip in the metadata superblock.
#[test]
fn held_damage_detected() {
    for mode in [Mode::Dual, Mode::Journal] {
        // lost write on data device
        let (p, v) = Pair::new(mode, 0, 0);
        write_all(&v, 1);
        p.data.lose_next_write();
        if mode == Mode::Journal {
            // journal goes to meta first; lose the home write by losing many
            p.data.set_lost_write_rate(1.0).unwrap();
        }
        v.write_at(&pattern(7, 2), 7 * BS).unwrap();
        v.flush().unwrap();
        v.close().unwrap();
        p.data.set_lost_write_rate(0.0).unwrap();
        let v = p.open().unwrap();
        let mut buf = vec![0u8; BS as usize];
        let r = v.read_at(&mut buf, 7 * BS);
        assert!(
            r.is_err() || buf == pattern(7, 2),
            "{mode:?}: lost write returned stale data silently"
        );
        drop(v);

        // bit flip in a data block
        let (p, v) = Pair::new(mode, 0, 0);
        write_all(&v, 1);
        v.close().unwrap();
        p.data.flip_bit(9 * BS + 17, 3).unwrap();
        let v = p.open().unwrap();
        assert!(
            v.read_at(&mut buf, 9 * BS).is_err(),
            "{mode:?}: bit flip not detected"
        );
    }
    // misdirected write on the data device
    let (p, v) = Pair::new(Mode::Dual, 0, 0);
    write_all(&v, 1);
    p.data.misdirect_next_write(12 * BS);
    v.write_at(&pattern(3, 2), 3 * BS).unwrap();
    v.flush().unwrap();
    v.close().unwrap();
    let v = p.open().unwrap();
    let mut buf = vec![0u8; BS as usize];
    assert!(
        v.read_at(&mut buf, 12 * BS).is_err(),
        "misdirected write landed silently"
    );
    let r = v.read_at(&mut buf, 3 * BS);
    assert!(r.is_err() || buf == pattern(3, 2));
    drop(v);
    // trailer bit flip -> refused
    let (p, v) = Pair::new(Mode::Dual, 0, 0);
    v.close().unwrap();
    let t = trailer_offset(p.data.len()).unwrap();
    p.data.flip_bit(t + 30, 0).unwrap();
    let msg = format!("{}", p.open().expect_err("damaged trailer accepted"));
    assert!(msg.contains("damaged"), "{msg}");
    // zeros once during open on the metadata device: still opens (backup) or refuses cleanly
    let (p, v) = Pair::new(Mode::Dual, 0, 0);
    write_all(&v, 4);
    v.close().unwrap();
    p.meta.zero_next_read();
    if let Ok(v) = p.open() {
        v.read_at(&mut buf, 2 * BS).unwrap();
        assert_eq!(buf, pattern(2, 4));
    }
}

/// Tiny / short devices give errors, not panics.
#[test]
fn held_short_devices_refused() {
    let (dl, ml) = Volume::split_lengths(&opts(Mode::Dual)).unwrap();
    for (d, m) in [(dl - 1, ml), (dl, ml - 1), (0, 0), (4096, 4096), (dl, 0)] {
        let data = Arc::new(MemoryBackend::new(d).unwrap());
        let meta = Arc::new(MemoryBackend::new(m).unwrap());
        let r = std::panic::catch_unwind(|| {
            Volume::format_split(data.clone(), meta.clone(), &opts(Mode::Dual), "x").is_err()
        });
        assert_eq!(r.ok(), Some(true), "data {d} meta {m}");
    }
    // data device shrunk after format
    let (p, v) = Pair::new(Mode::Dual, 0, 0);
    v.close().unwrap();
    let img = p.data.live_image();
    let short = Arc::new(MemoryBackend::from_vec(img[..img.len() - 8192].to_vec()));
    assert!(Volume::open_split(short, p.meta.clone(), &OpenOptions::default()).is_err());
}

/// Every mode's crash guarantee with the two devices crashing independently (each keeps a
/// random subset of its own unflushed writes, torn or not): every block reads its old or new
/// contents, and journal requests are all-or-nothing.
#[test]
fn held_independent_crash_of_both_devices() {
    let mut rng = ChaCha8Rng::seed_from_u64(0xB10C);
    for mode in [Mode::Dual, Mode::Rebuild, Mode::Journal] {
        for round in 0..40u32 {
            let (p, v) = Pair::new(mode, 0, 0);
            write_all(&v, 1);
            let v = reopen_committing_on_writer(&p, v);
            let mut written = std::collections::BTreeSet::new();
            let n = rng.random_range(1..12);
            for _ in 0..n {
                let b = rng.random_range(0..SIZE / BS - 1);
                // Two-block requests: journal keeps them all-or-nothing.
                let mut buf = pattern(b, 2);
                buf.extend(pattern(b + 1, 2));
                v.write_at(&buf, b * BS).unwrap();
                written.insert(b);
                written.insert(b + 1);
                if rng.random_bool(0.2) {
                    v.flush().unwrap();
                }
            }
            let torn = rng.random_bool(0.5);
            let dimg = p.data.random_crash_image(&mut rng, torn);
            let mimg = p.meta.random_crash_image(&mut rng, torn);
            std::mem::forget(v);
            let data = Arc::new(MemoryBackend::from_vec(dimg));
            let meta = Arc::new(MemoryBackend::from_vec(mimg));
            let v = Volume::open_split(data, meta, &OpenOptions::default())
                .unwrap_or_else(|e| panic!("{mode:?} round {round}: open after crash: {e}"));
            let mut buf = vec![0u8; BS as usize];
            for b in 0..SIZE / BS {
                match v.read_at(&mut buf, b * BS) {
                    Ok(()) => assert!(
                        buf == pattern(b, 1) || (written.contains(&b) && buf == pattern(b, 2)),
                        "{mode:?} round {round} torn={torn}: block {b} reads neither old nor new"
                    ),
                    Err(e) => {
                        // Dual may flag a torn block that was in flight; nothing else may fail.
                        assert!(
                            mode == Mode::Dual && torn && written.contains(&b),
                            "{mode:?} round {round} torn={torn}: block {b}: {e}"
                        );
                    }
                }
            }
        }
    }
}

// ---------------------------------------------------------------------------------------------
// Findings (fail on a4a7716)
// ---------------------------------------------------------------------------------------------

/// FINDING (medium): the metadata device's backup superblock is looked for in the metadata
/// device's *last 4 KiB*, but the volume's backup superblock lives at `meta_len - 4 KiB` (the
/// end of the packed layout). Formatting on a metadata device larger than needed (any real
/// partition: `--metadata-device /dev/nvme0n1p3`) is allowed, and then a damaged primary
/// superblock makes the pair unopenable ("not a blockguard metadata device") although an
/// intact backup exists — the same damage on a single-device volume opens from its backup.
#[test]
#[ignore = "known limit (review_metadev finding 3): the backup superblock is looked for in the metadata device's last 4 KiB, not at the end of the packed layout"]
fn finding_backup_superblock_not_found_on_larger_metadata_device() {
    // Control: exact-size metadata device recovers from the backup.
    let (p, v) = Pair::new(Mode::Dual, 0, 0);
    write_all(&v, 1);
    v.close().unwrap();
    for i in 0..64 {
        p.meta.flip_bit(i * 8, 1).unwrap();
    }
    assert!(
        p.open().is_ok(),
        "control: exact-size metadata device opens from its backup superblock"
    );

    let (p, v) = Pair::new(Mode::Dual, 0, 1 << 20);
    write_all(&v, 1);
    v.close().unwrap();
    for i in 0..64 {
        p.meta.flip_bit(i * 8, 1).unwrap();
    }
    let r = p.open();
    assert!(
        r.is_ok(),
        "metadata device 1 MiB larger than needed, primary superblock damaged: {}",
        r.err().unwrap()
    );
}

/// FINDING (medium): the data device's trailer is located from the device's *current* length
/// (its last whole 4 KiB). Growing the data device after format (a file extended, an LV
/// lvextend-ed, the raw image grown to resize later) loses the trailer: the pair is refused as
/// "not the data device of a blockguard volume: no blockguard data-device trailer", nothing
/// says the device grew, and the trailer still sits at its old offset. (Through the CLI the
/// data path is then silently opened as a single-device volume instead — see the next test.)
#[test]
#[ignore = "known limit (review_metadev finding 4): the trailer is looked for at the data device's current end"]
fn finding_grown_data_device_loses_its_trailer() {
    let (p, v) = Pair::new(Mode::Dual, 0, 0);
    write_all(&v, 1);
    v.close().unwrap();
    let mut img = p.data.live_image();
    img.extend(vec![0u8; 1 << 20]);
    let grown = Arc::new(MemoryBackend::from_vec(img));
    assert!(read_trailer(&*grown).unwrap().is_err());
    let r = Volume::open_split(grown, p.meta.clone(), &OpenOptions::default());
    assert!(
        r.is_ok(),
        "data device grown by 1 MiB after format: {}",
        r.err().unwrap()
    );
}

// ------------------------------- CLI (needs the built binary) --------------------------------

fn cli() -> Option<PathBuf> {
    let dir = std::env::var_os("CARGO_TARGET_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from(concat!(env!("CARGO_MANIFEST_DIR"), "/../../target")));
    let p = dir.join("ci/blockguard");
    p.exists().then_some(p)
}

fn run(bin: &Path, args: &[&str]) -> (bool, String) {
    let out = Command::new(bin).args(args).output().unwrap();
    let s = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(!s.contains("panicked"), "panic: {s}");
    (out.status.success(), s)
}

fn tmp(name: &str) -> PathBuf {
    let d = std::env::temp_dir().join(format!("review_metadev_{}_{name}", std::process::id()));
    let _ = std::fs::remove_dir_all(&d);
    std::fs::create_dir_all(&d).unwrap();
    d
}

/// Bad CLI input: clear error, non-zero exit, no panic.
#[test]
fn held_cli_bad_input() {
    let Some(bin) = cli() else { return };
    let d = tmp("bad");
    let data = d.join("data");
    let meta = d.join("meta");
    let (ds, ms) = (data.to_str().unwrap(), meta.to_str().unwrap());
    let cases: Vec<Vec<&str>> = vec![
        vec!["format", ds, "--metadata-device", ms],
        vec!["format", ds, "--size", "1M", "--metadata-device", ds],
        vec![
            "format",
            ds,
            "--size",
            "1M",
            "--metadata-device",
            ms,
            "--mirror",
            "/tmp/x",
        ],
        vec![
            "format",
            ds,
            "--size",
            "1M",
            "--metadata-device",
            "nbd://127.0.0.1/x",
        ],
        vec!["format", ds, "--size", "0", "--metadata-device", ms],
        vec!["format", ds, "--size", "1", "--metadata-device", ms],
    ];
    for c in &cases {
        let (ok, s) = run(&bin, c);
        assert!(!ok, "{c:?} succeeded: {s}");
    }
    // hard link of an existing file
    std::fs::write(&data, b"").unwrap();
    std::fs::hard_link(&data, &meta).unwrap();
    let (ok, s) = run(
        &bin,
        &["format", ds, "--size", "1M", "--metadata-device", ms, "--force"],
    );
    assert!(!ok, "hard link accepted: {s}");
    let _ = std::fs::remove_dir_all(&d);
}

/// FINDING (low): the same file twice via a symlink is only checked when the metadata path
/// already resolves. `--metadata-device LINK` where LINK is a symlink to the (not yet
/// existing) data file passes the same-file check; the data file is then created, and
/// "emptied and sized" again through the link as the metadata device. What stops it is only
/// the advisory lock, with a misleading message ("the volume is in use by another process"),
/// and the refused format leaves the data file behind (created, sized to the metadata length):
/// not "nothing written".
#[test]
#[ignore = "known limit (review_metadev finding 6): the same-file check runs only for paths that exist"]
fn finding_cli_dangling_symlink_to_data_file() {
    let Some(bin) = cli() else { return };
    let d = tmp("symlink");
    let data = d.join("data");
    let link = d.join("meta-link");
    std::os::unix::fs::symlink(&data, &link).unwrap();
    let (ok, s) = run(
        &bin,
        &[
            "format",
            data.to_str().unwrap(),
            "--size",
            "1M",
            "--metadata-device",
            link.to_str().unwrap(),
        ],
    );
    let left = data.exists();
    let _ = std::fs::remove_dir_all(&d);
    assert!(
        !ok,
        "format with the metadata device a symlink to the data file succeeded: {s}"
    );
    assert!(
        !left && !s.contains("in use by another process"),
        "refused only by the lock ({s}); data file left behind: {left}"
    );
}

/// FINDING (medium): the metadata device's path is kept in the trailer truncated to 400 bytes
/// (MAX_HINT) at a byte boundary, and format does not refuse a longer path. (a) A path of more
/// than 400 bytes formats fine, and then no CLI command can open the volume: the data path
/// "keeps its metadata on <truncated path>, which cannot be opened" (and the truncated path
/// could name another file). (b) When byte 400 falls inside a multi-byte UTF-8 character the
/// trailer written by format fails to decode: `open_split` refuses the intact pair as a
/// "damaged data-device trailer: path hint is not UTF-8", and the CLI silently falls back to
/// opening the data path as a single volume.
#[test]
fn finding_long_metadata_hint_makes_the_trailer_unreadable() {
    let (dl, ml) = Volume::split_lengths(&opts(Mode::Dual)).unwrap();
    let data = Arc::new(MemoryBackend::new(dl).unwrap());
    let meta = Arc::new(MemoryBackend::new(ml).unwrap());
    let hint = format!("/{}", "\u{e9}".repeat(250)); // 501 bytes; byte 400 splits an 'é'
    match Volume::format_split(data.clone(), meta.clone(), &opts(Mode::Dual), &hint) {
        Ok(v) => {
            v.close().unwrap();
            let r = Volume::open_split(data, meta, &OpenOptions::default());
            assert!(
                r.is_ok(),
                "intact pair refused after format: {}",
                r.err().unwrap()
            );
        }
        Err(e) => {
            let msg = e.to_string();
            let mut img = vec![0u8; dl as usize];
            data.read_at(&mut img, 0).unwrap();
            let written = img.iter().any(|&b| b != 0);
            assert!(
                !msg.contains("not UTF-8") && !written,
                "format wrote both devices, then refused the trailer it wrote itself: {msg}"
            );
        }
    }
}

#[test]
fn finding_cli_long_metadata_path_unopenable() {
    let Some(bin) = cli() else { return };
    let d = tmp("longpath");
    let dir = d.join("a".repeat(200)).join("b".repeat(200));
    std::fs::create_dir_all(&dir).unwrap();
    let data = d.join("data");
    let meta = dir.join("meta");
    let (ok, s) = run(
        &bin,
        &[
            "format",
            data.to_str().unwrap(),
            "--size",
            "1M",
            "--metadata-device",
            meta.to_str().unwrap(),
        ],
    );
    let (ok2, s2) = run(&bin, &["check", data.to_str().unwrap()]);
    let _ = std::fs::remove_dir_all(&d);
    assert!(
        !ok || ok2,
        "format accepted a {}-byte metadata path ({s}) that check cannot follow: {s2}",
        meta.as_os_str().len()
    );
}

/// FINDING (low): `dump --block N` on a split volume prints the *virtual* single-device
/// offsets ("data at byte 36864, tags at bytes 16424 and 20520") instead of where the bytes
/// are: block 3 is at byte 12288 of the data device, its tags at metadata-device offsets. A
/// tool whose purpose is to say where a block and its tags live points at the wrong bytes
/// (and does not say which device).
#[test]
#[ignore = "known limit (review_metadev finding 7): dump prints single-device offsets"]
fn finding_cli_dump_prints_virtual_offsets() {
    let Some(bin) = cli() else { return };
    let d = tmp("dump");
    let data = d.join("data");
    let meta = d.join("meta");
    let (ok, s) = run(
        &bin,
        &[
            "format",
            data.to_str().unwrap(),
            "--size",
            "2M",
            "--metadata-device",
            meta.to_str().unwrap(),
        ],
    );
    assert!(ok, "{s}");
    let (ok, s) = run(&bin, &["dump", data.to_str().unwrap(), "--block", "3"]);
    let _ = std::fs::remove_dir_all(&d);
    assert!(ok, "{s}");
    assert!(
        s.contains("data at byte 12288"),
        "block 3 lives at byte 12288 of the data device: {s}"
    );
}

/// FINDING (high): the CLI decides "split volume or not" by whether the data path's last 4 KiB
/// parse as a trailer, and on *any* failure (damaged trailer, grown device) silently opens the
/// data path as a single-device volume. The data device's first bytes are the guest's image;
/// when that image is itself a blockguard volume (a nested volume, an image stored on the
/// split volume), `check`/`mount`/`serve` of the data path open the *inner* volume, report it
/// clean, and write to it read-write, bypassing the outer volume's tags. At best (plain guest
/// data) the error is "not a volume" and the trailer damage is never mentioned.
#[test]
fn finding_cli_damaged_trailer_falls_back_to_inner_volume() {
    let Some(bin) = cli() else { return };
    let d = tmp("nested");
    let data = d.join("data");
    let meta = d.join("meta");
    let inner = d.join("inner");
    let (ds, ms, is) = (
        data.to_str().unwrap(),
        meta.to_str().unwrap(),
        inner.to_str().unwrap(),
    );
    let (ok, s) = run(&bin, &["format", is, "--size", "256K"]);
    assert!(ok, "{s}");
    let inner_img = std::fs::read(&inner).unwrap();
    let (ok, s) = run(&bin, &["format", ds, "--size", "2M", "--metadata-device", ms]);
    assert!(ok, "{s}");
    // Put the inner volume's image into the outer volume through the library (as a guest would).
    {
        let dat: Arc<dyn Backend> =
            Arc::new(blockguard::blockguard_backend::FileBackend::open(&data, &Default::default()).unwrap());
        let met: Arc<dyn Backend> =
            Arc::new(blockguard::blockguard_backend::FileBackend::open(&meta, &Default::default()).unwrap());
        let v = Volume::open_split(dat, met, &OpenOptions::default()).unwrap();
        v.write_at(&inner_img, 0).unwrap();
        v.close().unwrap();
    }
    let (ok, s) = run(&bin, &["check", ds]);
    assert!(ok, "outer check before damage: {s}");
    // One bit of the trailer flips.
    let mut img = std::fs::read(&data).unwrap();
    let t = img.len() - 4096 + 30;
    img[t] ^= 1;
    std::fs::write(&data, &img).unwrap();
    let (ok, s) = run(&bin, &["check", ds]);
    let _ = std::fs::remove_dir_all(&d);
    assert!(
        !ok && s.to_lowercase().contains("trailer"),
        "damaged trailer: `check DATA` should refuse naming the trailer, got ok={ok}: {s}"
    );
}

/// FINDING (medium): `Volume::format_split` (and `open_split`) accept the same backend as
/// both devices: nothing compares them (the CLI's same-path check is the only guard). The
/// primary superblock and data block 0 then share byte 0: format succeeds, block 0 is
/// written, the volume reopens, and block 0 fails verification (every write of block 0
/// overwrites the superblock and the superblock's rewrite overwrites block 0).
#[test]
fn finding_library_same_backend_as_both_devices() {
    let (dl, ml) = Volume::split_lengths(&opts(Mode::Dual)).unwrap();
    let one: Arc<dyn Backend> = Arc::new(MemoryBackend::new(dl.max(ml)).unwrap());
    let r = Volume::format_split(one.clone(), one.clone(), &opts(Mode::Dual), "x");
    if let Ok(v) = r {
        // If it formatted, writing block 0 must not silently destroy the superblock.
        v.write_at(&pattern(0, 9), 0).unwrap();
        v.close().unwrap();
        let r = Volume::open_split(one.clone(), one, &OpenOptions::default());
        let block0 = r.as_ref().ok().map(|v| {
            let mut b = vec![0u8; BS as usize];
            v.read_at(&mut b, 0)
                .map(|()| b == pattern(0, 9))
                .map_err(|e| e.to_string())
        });
        eprintln!("block 0 after reopen (Some(Ok(true)) = intact): {block0:?}");
        panic!(
            "format_split accepted one device as both data and metadata; reopen after writing block 0: {:?}",
            r.map(|_| ()).map_err(|e| e.to_string())
        );
    }
}

/// Only one device crashes (the other keeps every write, or only its flushed ones), in every
/// mode: blocks read old or new, never an error.
#[test]
fn held_crash_of_one_device_only() {
    let mut rng = ChaCha8Rng::seed_from_u64(0x0DE5);
    for mode in [Mode::Dual, Mode::Rebuild, Mode::Journal] {
        for round in 0..60u32 {
            let (p, v) = Pair::new(mode, 0, 0);
            write_all(&v, 1);
            let v = reopen_committing_on_writer(&p, v);
            let mut written = std::collections::BTreeSet::new();
            for _ in 0..rng.random_range(1..10) {
                let b = rng.random_range(0..SIZE / BS);
                v.write_at(&pattern(b, 2), b * BS).unwrap();
                written.insert(b);
                if rng.random_bool(0.25) {
                    v.flush().unwrap();
                }
            }
            let (live_d, live_m) = (p.data.live_image(), p.meta.live_image());
            let (dur_d, dur_m) = (p.data.durable_image(), p.meta.durable_image());
            let crash_data = rng.random_bool(0.5);
            let torn = rng.random_bool(0.5);
            let (dimg, mimg) = if crash_data {
                let other = if rng.random_bool(0.5) { live_m } else { dur_m };
                (p.data.random_crash_image(&mut rng, torn), other)
            } else {
                let other = if rng.random_bool(0.5) { live_d } else { dur_d };
                (other, p.meta.random_crash_image(&mut rng, torn))
            };
            std::mem::forget(v);
            let v = Volume::open_split(
                Arc::new(MemoryBackend::from_vec(dimg)),
                Arc::new(MemoryBackend::from_vec(mimg)),
                &OpenOptions::default(),
            )
            .unwrap_or_else(|e| panic!("{mode:?} round {round}: {e}"));
            let mut buf = vec![0u8; BS as usize];
            for b in 0..SIZE / BS {
                match v.read_at(&mut buf, b * BS) {
                    Ok(()) => assert!(
                        buf == pattern(b, 1) || (written.contains(&b) && buf == pattern(b, 2)),
                        "{mode:?} round {round} crash_data={crash_data} torn={torn}: block {b} neither old nor new"
                    ),
                    Err(e) => assert!(
                        mode == Mode::Dual && torn && crash_data && written.contains(&b),
                        "{mode:?} round {round} crash_data={crash_data} torn={torn}: block {b}: {e}"
                    ),
                }
            }
        }
    }
}

/// A lost or misdirected write on the metadata device (a tag update) is detected.
#[test]
fn held_metadata_device_lost_and_misdirected_writes_detected() {
    let mut buf = vec![0u8; BS as usize];
    // lost tag write: block 5 rewritten, its tags' write vanishes
    let (p, v) = Pair::new(Mode::Dual, 0, 0);
    write_all(&v, 1);
    p.meta.set_lost_write_rate(1.0).unwrap();
    v.write_at(&pattern(5, 2), 5 * BS).unwrap();
    v.flush().unwrap();
    p.meta.set_lost_write_rate(0.0).unwrap();
    std::mem::forget(v);
    let v = p.open().unwrap();
    let r = v.read_at(&mut buf, 5 * BS);
    assert!(
        r.is_err() || buf == pattern(5, 1),
        "lost tag write: new data returned as if verified? {r:?}"
    );
    assert!(
        r.is_err(),
        "lost tag write on the metadata device: block 5 read without error"
    );
    drop(v);
    // misdirected metadata write onto the primary superblock region: open still refuses or works
    let (p, v) = Pair::new(Mode::Dual, 0, 0);
    write_all(&v, 1);
    p.meta.misdirect_next_write(0);
    v.write_at(&pattern(6, 2), 6 * BS).unwrap();
    v.flush().unwrap();
    v.close().ok();
    if let Ok(v) = p.open() {
        for b in 0..SIZE / BS {
            if let Ok(()) = v.read_at(&mut buf, b * BS) {
                assert!(
                    buf == pattern(b, 1) || (b == 6 && buf == pattern(6, 2)),
                    "block {b}"
                );
            }
        }
    }
}

/// The trailer's hint pointing at the wrong file: the metadata device moved away (clear
/// error naming the hint), or another volume's metadata device put at the hint's path
/// (refused, "do not belong together"), and nothing written.
#[test]
fn held_cli_hint_pointing_at_wrong_file() {
    let Some(bin) = cli() else { return };
    let d = tmp("hint");
    let s = |p: &Path| p.to_str().unwrap().to_string();
    let (d1, m1, d2, m2) = (d.join("d1"), d.join("m1"), d.join("d2"), d.join("m2"));
    // relative metadata path at format: the hint is absolute
    let out = Command::new(&bin)
        .current_dir(&d)
        .args(["format", "d1", "--size", "1M", "--metadata-device", "m1"])
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    assert!(
        run(
            &bin,
            &["format", &s(&d2), "--size", "1M", "--metadata-device", &s(&m2)]
        )
        .0
    );
    assert!(run(&bin, &["check", &s(&d1)]).0);
    std::fs::rename(&m1, d.join("m1.moved")).unwrap();
    let (ok, msg) = run(&bin, &["check", &s(&d1)]);
    assert!(!ok && msg.contains("cannot be opened"), "{msg}");
    std::fs::copy(&m2, &m1).unwrap();
    let before = (std::fs::read(&d1).unwrap(), std::fs::read(&m1).unwrap());
    for cmd in ["check", "recover", "scrub", "info"] {
        let (ok, msg) = run(&bin, &[cmd, &s(&d1)]);
        assert!(!ok && msg.contains("do not belong together"), "{cmd}: {msg}");
    }
    assert_eq!((std::fs::read(&d1).unwrap(), std::fs::read(&m1).unwrap()), before);
    let _ = std::fs::remove_dir_all(&d);
}
