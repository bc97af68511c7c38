//! `Volume::scrub`: every written block verified once, holes skipped, bad blocks named without
//! stopping the scrub, stop and resume, the rate honoured, and no false errors while the volume
//! is being written.

use blockguard::blockguard_backend::{FaultBackend, FileBackend, FileOptions, MemoryBackend};
use blockguard::{FormatOptions, OpenOptions, ScrubOptions, ScrubProblemKind, ScrubProgress, Volume};
use std::os::unix::fs::FileExt;
use std::path::Path;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

const BS: u64 = 4096;

fn content(block: u64, round: u64) -> Vec<u8> {
    let mut x = (block + 1).wrapping_mul(0x9e37_79b9_7f4a_7c15) ^ round;
    (0..BS)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            x as u8
        })
        .collect()
}

/// A sparse volume file of `size` bytes at `path`, opened with `opts`.
fn file_volume(path: &Path, size: u64, opts: &OpenOptions) -> Volume {
    if !path.exists() {
        let f = FormatOptions::with_size(size);
        let backend = FileBackend::create(path, f.backing_len().unwrap(), &FileOptions::default()).unwrap();
        Volume::format(Arc::new(backend), &f).unwrap().close().unwrap();
    }
    let backend = FileBackend::open(
        path,
        &FileOptions {
            read_only: opts.read_only,
            ..FileOptions::default()
        },
    )
    .unwrap();
    Volume::open(Arc::new(backend), opts).unwrap()
}

fn ro() -> OpenOptions {
    OpenOptions {
        read_only: true,
        ..OpenOptions::default()
    }
}

/// Blocks written by [`write_pattern`]: a 2 MiB run, a few scattered blocks far apart (in
/// groups of their own), and the last block.
fn pattern_blocks(size: u64) -> Vec<u64> {
    let last = size / BS - 1;
    let mut blocks: Vec<u64> = (100..612).collect();
    blocks.extend([3, 5000, 5001, 9000, 12_345, last]);
    blocks.sort_unstable();
    blocks
}

fn write_pattern(vol: &Volume) -> Vec<u64> {
    let blocks = pattern_blocks(vol.size());
    for &b in &blocks {
        vol.write_at(&content(b, 0), b * BS).unwrap();
    }
    vol.flush().unwrap();
    blocks
}

fn scrub_all(vol: &Volume, opts: ScrubOptions<'_>) -> (blockguard::ScrubReport, Vec<ScrubProgress>) {
    let mut seen = Vec::new();
    let report = vol.scrub(opts, &mut |p| seen.push(p)).unwrap();
    (report, seen)
}

/// Each verified block once, from the progress reports.
fn checked_blocks(seen: &[ScrubProgress]) -> Vec<u64> {
    seen.iter().flat_map(|p| p.last_checked.clone()).collect()
}

#[test]
fn a_clean_volume_scrubs_clean_and_reads_only_its_written_blocks() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("v.bgv");
    let size = 64 << 20;
    let written = write_pattern(&file_volume(&path, size, &OpenOptions::default()));
    let vol = file_volume(&path, size, &ro());
    let (report, seen) = scrub_all(&vol, ScrubOptions::default());
    assert!(report.is_clean(), "{report:?}");
    assert!(!report.stopped);
    assert_eq!((report.start, report.end, report.position), (0, size, size));
    assert_eq!(report.problem_count, 0);
    assert_eq!(report.repaired, 0);
    // The holes of the sparse file are skipped: exactly the written blocks were read, each once.
    assert_eq!(checked_blocks(&seen), written);
    assert_eq!(report.blocks_checked, written.len() as u64);
    assert_eq!(report.bytes_read, written.len() as u64 * BS);
    // Progress only moves forward and ends at the end.
    assert!(seen.windows(2).all(|w| w[0].position <= w[1].position));
    assert_eq!(seen.last().unwrap().position, size);
}

#[test]
fn corrupt_blocks_are_named_exactly_and_do_not_stop_the_scrub() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("v.bgv");
    let size = 64 << 20;
    let vol = file_volume(&path, size, &OpenOptions::default());
    let written = write_pattern(&vol);
    let geo = *vol.geometry();
    vol.close().unwrap();
    // Damage on disk, behind the engine's back: bytes flipped in written blocks (two in the
    // same chunk, one at a chunk's first byte, one in the last block), and data where nothing
    // was ever written (block 15_000: metadata says unwritten, the data is not zeros).
    let file = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open(&path)
        .unwrap();
    let bad_written = [100u64, 101, 356, 5001, size / BS - 1];
    for &b in &bad_written {
        let at = geo.data_offset(b) + 17;
        let mut byte = [0u8];
        file.read_exact_at(&mut byte, at).unwrap();
        file.write_all_at(&[byte[0] ^ 0x40], at).unwrap();
    }
    file.write_all_at(b"not zeros", geo.data_offset(15_000)).unwrap();
    file.sync_all().unwrap();
    drop(file);

    let vol = file_volume(&path, size, &ro());
    let (report, seen) = scrub_all(&vol, ScrubOptions::default());
    let mut want: Vec<u64> = bad_written.to_vec();
    want.push(15_000);
    want.sort_unstable();
    let got: Vec<u64> = report.problems.iter().map(|p| p.block).collect();
    assert_eq!(got, want, "{report:#?}");
    assert_eq!(report.problem_count, want.len() as u64);
    assert!(report
        .problems
        .iter()
        .all(|p| p.kind == ScrubProblemKind::Corrupt));
    for p in &report.problems {
        // The engine's message: the volume, the block, and what was expected.
        assert!(p.detail.contains(&format!("block {}", p.block)), "{}", p.detail);
        assert!(p.detail.contains("v.bgv"), "{}", p.detail);
    }
    assert!(report.problems[want.iter().position(|&b| b == 15_000).unwrap()]
        .detail
        .contains("never written"));
    assert!(report.problems[0].detail.contains("expected tag"));
    // Every block was still checked: the written ones and the one that is no longer a hole.
    assert_eq!(report.blocks_checked, written.len() as u64 + 1);
    assert!(!report.stopped && report.position == size && report.unrepaired() == 6);
    assert!(seen.last().unwrap().problems == 6);

    // The list is capped; the count is not.
    let (capped, _) = scrub_all(
        &vol,
        ScrubOptions {
            max_listed: 2,
            ..ScrubOptions::default()
        },
    );
    assert_eq!(capped.problems.len(), 2);
    assert_eq!(capped.problem_count, 6);
    assert_eq!(capped.problems[..], report.problems[..2]);
}

#[test]
fn unreadable_blocks_are_reported_and_the_scrub_goes_on() {
    let mut f = FormatOptions::with_size(8 << 20);
    f.uuid = Some([7; 16]);
    let backend = Arc::new(FaultBackend::new(f.backing_len().unwrap()).unwrap());
    let vol = Volume::format(backend.clone(), &f).unwrap();
    for b in 0..64 {
        vol.write_at(&content(b, 1), b * BS).unwrap();
    }
    vol.flush().unwrap();
    let geo = *vol.geometry();
    backend.fail_reads_at(geo.data_offset(9)..geo.data_offset(9) + 1);
    backend.fail_reads_at(geo.data_offset(40) + 100..geo.data_offset(40) + 101);
    let (report, _) = scrub_all(&vol, ScrubOptions::default());
    let got: Vec<(u64, ScrubProblemKind)> = report.problems.iter().map(|p| (p.block, p.kind)).collect();
    assert_eq!(
        got,
        [
            (9, ScrubProblemKind::Unreadable),
            (40, ScrubProblemKind::Unreadable)
        ],
        "{report:#?}"
    );
    assert!(
        report.problems[0].detail.contains("I/O error"),
        "{}",
        report.problems[0].detail
    );
    // The written blocks were read, the bad two included; the rest are holes.
    assert_eq!(report.blocks_checked, 64);
    assert!(!report.stopped);
}

#[test]
fn stop_and_resume_cover_every_written_block_exactly_once() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("v.bgv");
    let size = 64 << 20;
    let written = write_pattern(&file_volume(&path, size, &OpenOptions::default()));
    let vol = file_volume(&path, size, &ro());
    let stop = AtomicBool::new(false);
    let mut all = Vec::new();
    let mut start = 0;
    let mut rounds = 0;
    loop {
        stop.store(false, Ordering::Relaxed);
        let mut chunks = 0;
        let opts = ScrubOptions {
            start,
            chunk_bytes: 64 << 10,
            stop: Some(&stop),
            ..ScrubOptions::default()
        };
        let report = vol
            .scrub(opts, &mut |p| {
                all.extend(p.last_checked.clone());
                if !p.last_checked.is_empty() {
                    chunks += 1;
                    // Stop after every third chunk.
                    if chunks == 3 {
                        stop.store(true, Ordering::Relaxed);
                    }
                }
            })
            .unwrap();
        rounds += 1;
        assert!(report.is_clean());
        assert!(report.position >= start && report.position.is_multiple_of(BS));
        if !report.stopped {
            assert_eq!(report.position, size);
            break;
        }
        assert!(report.position < size, "stopped at the end: {report:?}");
        start = report.position;
    }
    assert!(rounds > 5, "only {rounds} rounds: the stop flag was not honoured");
    assert_eq!(
        all, written,
        "blocks missed or verified twice across {rounds} resumed scrubs"
    );

    // An explicit end: only that range.
    let (report, seen) = scrub_all(
        &vol,
        ScrubOptions {
            start: 200 * BS,
            end: Some(300 * BS),
            ..ScrubOptions::default()
        },
    );
    assert_eq!(checked_blocks(&seen), (200..300).collect::<Vec<_>>());
    assert_eq!(report.position, 300 * BS);
    // Positions that are not block multiples or lie outside the volume are refused.
    for (start, end) in [
        (1, None),
        (0, Some(BS + 1)),
        (2 * BS, Some(BS)),
        (0, Some(size + BS)),
    ] {
        let e = vol
            .scrub(
                ScrubOptions {
                    start,
                    end,
                    ..ScrubOptions::default()
                },
                &mut |_| {},
            )
            .unwrap_err();
        assert!(e.to_string().contains("cannot scrub"), "{e}");
    }
}

#[test]
fn the_rate_limit_is_roughly_honoured_and_a_stop_is_quick() {
    let f = FormatOptions::with_size(16 << 20);
    let vol = Volume::format(
        Arc::new(MemoryBackend::new(f.backing_len().unwrap()).unwrap()),
        &f,
    )
    .unwrap();
    vol.write_at(&vec![5u8; 16 << 20], 0).unwrap();
    // 16 MiB at 32 MB/s: about 0.52 s.
    let t = Instant::now();
    let (report, _) = scrub_all(
        &vol,
        ScrubOptions {
            rate: Some(32_000_000),
            chunk_bytes: 256 << 10,
            ..ScrubOptions::default()
        },
    );
    let took = t.elapsed();
    assert_eq!(report.bytes_read, 16 << 20);
    assert!(took >= Duration::from_millis(500), "rate not honoured: {took:?}");
    assert!(
        took < Duration::from_secs(5),
        "far slower than the rate: {took:?}"
    );

    // At 100 kB/s a 1 MiB chunk is due after 10 s, but a stop is seen within the pacing's
    // sleeps.
    let stop = Arc::new(AtomicBool::new(false));
    let stopper = {
        let stop = stop.clone();
        std::thread::spawn(move || {
            std::thread::sleep(Duration::from_millis(200));
            stop.store(true, Ordering::Relaxed);
        })
    };
    let t = Instant::now();
    let (report, _) = scrub_all(
        &vol,
        ScrubOptions {
            rate: Some(100_000),
            stop: Some(&stop),
            ..ScrubOptions::default()
        },
    );
    stopper.join().unwrap();
    assert!(report.stopped);
    assert_eq!(report.position, 1 << 20);
    assert!(
        t.elapsed() < Duration::from_secs(2),
        "stop took {:?}",
        t.elapsed()
    );
}

#[test]
fn a_scrub_during_writes_reports_no_false_errors() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("v.bgv");
    let size = 32 << 20;
    // A small stage: commits (which move data and tags) run all the time during the scrub.
    let opts = OpenOptions {
        stage_bytes: 128 << 10,
        ..OpenOptions::default()
    };
    let vol = Arc::new(file_volume(&path, size, &opts));
    let blocks = size / BS;
    for b in 0..blocks / 2 {
        vol.write_at(&content(b, 0), b * BS).unwrap();
    }
    vol.flush().unwrap();
    let done = Arc::new(AtomicBool::new(false));
    let rounds = Arc::new(AtomicU64::new(0));
    let writers: Vec<_> = (0..2u64)
        .map(|w| {
            let (vol, done, rounds) = (vol.clone(), done.clone(), rounds.clone());
            std::thread::spawn(move || {
                let mut x = 0x1234_5678_u64 + w;
                let mut n = 0u64;
                while !done.load(Ordering::Relaxed) {
                    x ^= x << 13;
                    x ^= x >> 7;
                    x ^= x << 17;
                    let b = x % blocks;
                    match x % 16 {
                        // Zeroing (punches a hole), multi-block writes, and flushes too.
                        0 => vol.write_zeroes(b * BS, BS).unwrap(),
                        1 => vol.flush().unwrap(),
                        2 if b + 4 < blocks => {
                            let data: Vec<u8> = (0..4).flat_map(|i| content(b + i, n)).collect();
                            vol.write_at(&data, b * BS).unwrap();
                        }
                        _ => vol.write_at(&content(b, n), b * BS).unwrap(),
                    }
                    n += 1;
                }
                rounds.fetch_add(n, Ordering::Relaxed);
            })
        })
        .collect();
    let mut scrubs = 0;
    let deadline = Instant::now() + Duration::from_secs(3);
    while Instant::now() < deadline || scrubs < 3 {
        let (report, _) = scrub_all(
            &vol,
            ScrubOptions {
                chunk_bytes: 256 << 10,
                ..ScrubOptions::default()
            },
        );
        assert!(
            report.is_clean(),
            "false errors during writes: {:#?}",
            report.problems
        );
        assert!(!report.stopped && report.position == size);
        scrubs += 1;
    }
    done.store(true, Ordering::Relaxed);
    for w in writers {
        w.join().unwrap();
    }
    assert!(
        rounds.load(Ordering::Relaxed) > 1000,
        "the writers hardly ran: {rounds:?}"
    );
    // And once they are done, a last scrub of the settled volume is clean too.
    let (report, _) = scrub_all(&vol, ScrubOptions::default());
    assert!(report.is_clean(), "{:#?}", report.problems);
    assert!(vol.failure().is_none());
    let vol = Arc::try_unwrap(vol).unwrap();
    vol.close().unwrap();
}

#[test]
fn a_failed_volume_says_why() {
    let f = FormatOptions::with_size(1 << 20);
    let backend = Arc::new(FaultBackend::new(f.backing_len().unwrap()).unwrap());
    let vol = Volume::format(backend.clone(), &f).unwrap();
    assert_eq!(vol.failure(), None);
    vol.write_at(&[1u8; 4096], 0).unwrap();
    backend.fail_next_flush();
    assert!(vol.flush().is_err());
    let why = vol.failure().expect("failed after a failed flush");
    assert!(!why.is_empty());
}

#[test]
fn holes_cost_nothing_on_a_large_sparse_volume() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("v.bgv");
    let size = 64 << 30;
    let vol = file_volume(&path, size, &OpenOptions::default());
    // A few blocks far apart, in groups of their own.
    let written = [0u64, 1 << 20, (3 << 20) + 5, size / BS - 1];
    for &b in &written {
        vol.write_at(&content(b, 2), b * BS).unwrap();
    }
    vol.flush().unwrap();
    let t = Instant::now();
    let (report, seen) = scrub_all(&vol, ScrubOptions::default());
    let took = t.elapsed();
    assert!(report.is_clean() && report.position == size);
    assert_eq!(checked_blocks(&seen), written);
    assert_eq!(report.bytes_read, written.len() as u64 * BS);
    // 64 GiB of holes: found by a few dozen allocation queries, not by reading.
    assert!(seen.len() < 200, "{} progress reports", seen.len());
    assert!(
        took < Duration::from_secs(10),
        "scrubbing the holes took {took:?}"
    );
}
