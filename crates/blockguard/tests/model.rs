//! Property test: random sequences of reads, writes (unaligned too), discards, zeroing,
//! flushes and reopens give exactly the results of a plain in-memory byte array.

use blockguard::blockguard_backend::MemoryBackend;
use blockguard::{FormatOptions, Mode, OpenOptions, Volume};
use proptest::prelude::*;
use std::sync::Arc;

#[derive(Debug, Clone)]
enum Op {
    /// `owned`: handed over with `write_owned` instead of copied by `write_at`.
    Write {
        off: u64,
        len: usize,
        fill: u8,
        owned: bool,
    },
    Read {
        off: u64,
        len: usize,
    },
    Zero {
        off: u64,
        len: u64,
    },
    Discard {
        off: u64,
        len: u64,
    },
    Flush,
    Reopen,
}

fn op(size: u64) -> impl Strategy<Value = Op> {
    let range = (0..size).prop_flat_map(move |off| (Just(off), 0..=(size - off).min(3000)));
    prop_oneof![
        4 => (range.clone(), any::<u8>(), any::<bool>())
            .prop_map(|((off, len), fill, owned)| Op::Write { off, len: len as usize, fill, owned }),
        3 => range.clone().prop_map(|(off, len)| Op::Read { off, len: len as usize }),
        1 => range.clone().prop_map(|(off, len)| Op::Zero { off, len }),
        1 => range.prop_map(|(off, len)| Op::Discard { off, len }),
        1 => Just(Op::Flush),
        1 => Just(Op::Reopen),
    ]
}

/// Content for a write: varies by position so misplaced bytes are caught.
fn pattern(fill: u8, off: u64, len: usize) -> Vec<u8> {
    (0..len)
        .map(|i| fill.wrapping_add(((off + i as u64) % 251) as u8))
        .collect()
}

fn run(ops: &[Op], block_size: u32, mode: Mode, stage_bytes: usize) {
    let size = block_size as u64 * 150; // three groups at 512-byte blocks
    let mut opts = FormatOptions::with_size(size);
    opts.block_size = block_size;
    opts.mode = mode;
    let backend = Arc::new(MemoryBackend::new(opts.backing_len().unwrap()).unwrap());
    let open_opts = OpenOptions {
        stage_bytes,
        cache_bytes: 0, // smallest cache: exercises eviction and reload
        ..OpenOptions::default()
    };
    drop(Volume::format(backend.clone(), &opts).unwrap());
    let mut vol = Volume::open(backend.clone(), &open_opts).unwrap();
    let mut model = vec![0u8; size as usize];
    for op in ops {
        match *op {
            Op::Write {
                off,
                len,
                fill,
                owned,
            } => {
                let data = pattern(fill, off, len);
                if owned {
                    vol.write_owned(data.clone(), off).unwrap();
                } else {
                    vol.write_at(&data, off).unwrap();
                }
                model[off as usize..off as usize + len].copy_from_slice(&data);
            }
            Op::Read { off, len } => {
                let mut buf = vec![0xEEu8; len];
                vol.read_at(&mut buf, off).unwrap();
                assert_eq!(buf, &model[off as usize..off as usize + len], "read {off}+{len}");
            }
            Op::Zero { off, len } | Op::Discard { off, len } => {
                if matches!(op, Op::Zero { .. }) {
                    vol.write_zeroes(off, len).unwrap();
                } else {
                    vol.discard(off, len).unwrap();
                }
                model[off as usize..(off + len) as usize].fill(0);
            }
            Op::Flush => vol.flush().unwrap(),
            Op::Reopen => {
                vol.close().unwrap();
                vol = Volume::open(backend.clone(), &open_opts).unwrap();
            }
        }
    }
    let mut all = vec![0u8; size as usize];
    vol.read_at(&mut all, 0).unwrap();
    assert!(all == model, "final contents differ");
    // Allocation map agrees with the model: a hole always reads as zeros.
    for e in vol.extents(0, size).unwrap() {
        if !e.allocated {
            let bad = model[e.offset as usize..(e.offset + e.len) as usize]
                .iter()
                .position(|&b| b != 0);
            assert!(
                bad.is_none(),
                "extent {e:?} reported as a hole holds data at byte {}",
                e.offset + bad.unwrap_or(0) as u64
            );
        }
    }
    assert!(vol
        .check_blocks(0, vol.geometry().data_blocks)
        .unwrap()
        .is_empty());
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 200, ..ProptestConfig::default() })]

    #[test]
    fn engine_matches_model_512(ops in proptest::collection::vec(op(512 * 150), 1..60)) {
        run(&ops, 512, Mode::Dual, 4096);
    }

    #[test]
    fn engine_matches_model_4096(ops in proptest::collection::vec(op(4096 * 150), 1..40)) {
        run(&ops, 4096, Mode::Dual, 64 << 10);
    }

    #[test]
    fn journal_mode_matches_model(ops in proptest::collection::vec(op(4096 * 150), 1..40)) {
        run(&ops, 4096, Mode::Journal, 64 << 10);
    }

    #[test]
    fn journal_mode_matches_model_512(ops in proptest::collection::vec(op(512 * 150), 1..40)) {
        run(&ops, 512, Mode::Journal, 64 << 10);
    }

    #[test]
    fn rebuild_mode_matches_model(ops in proptest::collection::vec(op(512 * 150), 1..40)) {
        run(&ops, 512, Mode::Rebuild, 4096);
    }

    #[test]
    fn none_mode_matches_model_without_crashes(ops in proptest::collection::vec(op(512 * 150), 1..40)) {
        run(&ops, 512, Mode::None, 4096);
    }
}

#[test]
fn concurrent_writers_and_readers_on_shared_blocks() {
    let opts = FormatOptions::with_size(512 * 1024);
    let mut o = opts.clone();
    o.block_size = 512;
    let backend = Arc::new(MemoryBackend::new(o.backing_len().unwrap()).unwrap());
    let vol = Arc::new(Volume::format(backend, &o).unwrap());
    // Each thread owns every 4th byte-range of 100 bytes; ranges share blocks across threads,
    // so read-modify-write must not lose neighbours' updates.
    let threads: Vec<_> = (0..4u8)
        .map(|t| {
            let vol = vol.clone();
            std::thread::spawn(move || {
                for round in 0..50u8 {
                    for k in 0..40u64 {
                        let off = (k * 4 + t as u64) * 100;
                        vol.write_at(&[t.wrapping_mul(31).wrapping_add(round); 100], off)
                            .unwrap();
                        if k % 7 == 0 {
                            vol.flush().unwrap();
                        }
                        let mut b = [0u8; 100];
                        vol.read_at(&mut b, off).unwrap();
                        assert_eq!(b, [t.wrapping_mul(31).wrapping_add(round); 100]);
                    }
                }
            })
        })
        .collect();
    for t in threads {
        t.join().unwrap();
    }
    for t in 0..4u8 {
        for k in 0..40u64 {
            let mut b = [0u8; 100];
            vol.read_at(&mut b, (k * 4 + t as u64) * 100).unwrap();
            assert_eq!(b, [t.wrapping_mul(31).wrapping_add(49); 100]);
        }
    }
}

#[test]
fn out_of_range_and_read_only_are_refused() {
    let opts = FormatOptions::with_size(1 << 20);
    let backend = Arc::new(MemoryBackend::new(opts.backing_len().unwrap()).unwrap());
    let vol = Volume::format(backend.clone(), &opts).unwrap();
    let mut buf = [0u8; 2];
    assert!(matches!(
        vol.read_at(&mut buf, (1 << 20) - 1),
        Err(blockguard::Error::OutOfRange { .. })
    ));
    assert!(matches!(
        vol.write_at(&buf, u64::MAX),
        Err(blockguard::Error::OutOfRange { .. })
    ));
    assert!(vol.write_zeroes(1 << 20, 1).is_err());
    drop(vol);
    let ro = Volume::open(
        backend,
        &OpenOptions {
            read_only: true,
            ..OpenOptions::default()
        },
    )
    .unwrap();
    assert!(matches!(
        ro.write_at(&buf, 0),
        Err(blockguard::Error::ReadOnly { .. })
    ));
    ro.read_at(&mut buf, 0).unwrap();
}

#[test]
fn large_reads_split_across_threads_match_the_model() {
    use rand::{Rng, SeedableRng};
    let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(42);
    let size = 8u64 << 20; // 2048 blocks: five groups, so halves straddle group boundaries
    let opts = FormatOptions::with_size(size);
    let backend = Arc::new(MemoryBackend::new(opts.backing_len().unwrap()).unwrap());
    let vol = Volume::format(backend, &opts).unwrap();
    let mut model = vec![0u8; size as usize];
    for round in 0..40 {
        let off = rng.random_range(0..size - 1);
        let len = rng.random_range(1..=(size - off).min(3 << 20));
        if round % 5 == 4 {
            vol.write_zeroes(off, len).unwrap();
            model[off as usize..(off + len) as usize].fill(0);
        } else {
            let data: Vec<u8> = (0..len).map(|_| rng.random()).collect();
            vol.write_at(&data, off).unwrap();
            model[off as usize..(off + len) as usize].copy_from_slice(&data);
        }
        if round % 3 == 0 {
            vol.flush().unwrap(); // some data on disk, some still staged
        }
        let roff = rng.random_range(0..size - 1);
        let rlen = rng.random_range(1..=(size - roff).min(4 << 20)) as usize;
        let mut buf = vec![0u8; rlen];
        vol.read_at(&mut buf, roff).unwrap();
        assert!(
            buf == model[roff as usize..roff as usize + rlen],
            "round {round}: read {roff}+{rlen}"
        );
    }
    let mut all = vec![0u8; size as usize];
    vol.read_at(&mut all, 0).unwrap();
    assert!(all == model);
}

#[test]
fn extents_never_report_a_completed_write_as_a_hole_during_commits() {
    use std::sync::atomic::{AtomicU64, Ordering};
    let opts = FormatOptions::with_size(4096 * 2048);
    let backend = Arc::new(MemoryBackend::new(opts.backing_len().unwrap()).unwrap());
    drop(Volume::format(backend.clone(), &opts).unwrap());
    let vol = Arc::new(
        Volume::open(
            backend,
            &OpenOptions {
                stage_bytes: 8 * 4096, // commits every few writes, on the committer thread
                cache_bytes: 0,
                ..OpenOptions::default()
            },
        )
        .unwrap(),
    );
    let done = Arc::new(AtomicU64::new(0));
    let writer = {
        let (vol, done) = (vol.clone(), done.clone());
        std::thread::spawn(move || {
            for b in 0..2048u64 {
                vol.write_at(&[0xAB; 4096], b * 4096).unwrap();
                done.store(b + 1, Ordering::Release);
            }
        })
    };
    while done.load(Ordering::Acquire) < 2048 {
        let n = done.load(Ordering::Acquire);
        let extents = vol.extents(0, 4096 * 2048).unwrap();
        for e in extents.iter().filter(|e| !e.allocated) {
            assert!(
                e.offset >= n * 4096,
                "block {} completed but reported as a hole",
                e.offset / 4096
            );
        }
    }
    writer.join().unwrap();
}

/// A buffer handed over with `write_owned` that counts its drops.
struct Tracked(Vec<u8>, Arc<std::sync::atomic::AtomicUsize>);

impl AsRef<[u8]> for Tracked {
    fn as_ref(&self) -> &[u8] {
        &self.0
    }
}

impl Drop for Tracked {
    fn drop(&mut self) {
        self.1.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
    }
}

#[test]
fn owned_buffers_are_kept_until_their_data_is_written_then_released() {
    use std::sync::atomic::{AtomicUsize, Ordering};
    let opts = FormatOptions::with_size(1 << 20);
    let backend = Arc::new(MemoryBackend::new(opts.backing_len().unwrap()).unwrap());
    drop(Volume::format(backend.clone(), &opts).unwrap());
    let vol = Volume::open(backend.clone(), &OpenOptions::default()).unwrap();
    let drops = Arc::new(AtomicUsize::new(0));
    // Whole blocks (kept), an unaligned write with whole blocks inside (kept), and a write
    // inside one block (merged into a copy, so released at once).
    vol.write_owned(Tracked(vec![1; 8192], drops.clone()), 0).unwrap();
    vol.write_owned(Tracked(vec![2; 10000], drops.clone()), 10000)
        .unwrap();
    vol.write_owned(Tracked(vec![3; 100], drops.clone()), 30000)
        .unwrap();
    assert_eq!(
        drops.load(Ordering::SeqCst),
        1,
        "only the sub-block write is released"
    );
    let mut back = vec![0u8; 40000];
    vol.read_at(&mut back, 0).unwrap();
    assert!(back[..8192].iter().all(|&b| b == 1));
    assert!(back[10000..20000].iter().all(|&b| b == 2));
    assert!(back[30000..30100].iter().all(|&b| b == 3));
    vol.flush().unwrap();
    assert_eq!(drops.load(Ordering::SeqCst), 3, "all released once committed");
    drop(vol);
    let vol = Volume::open(backend, &OpenOptions::default()).unwrap();
    let mut again = vec![0u8; 40000];
    vol.read_at(&mut again, 0).unwrap();
    assert_eq!(again, back, "the owned bytes are what reached the disk");
}

#[test]
fn memory_pinned_by_partly_overwritten_buffers_counts_against_the_stage() {
    // Each round stages a 1 MiB buffer and then zeroes all but its first block: only one 4 KiB
    // block stays staged, but it keeps the whole 1 MiB alive. If the stage counted blocks
    // instead of buffers, 64 rounds would pin 64 MiB behind a 4 MiB stage.
    use std::sync::atomic::{AtomicUsize, Ordering};
    let opts = FormatOptions::with_size(80 << 20);
    let backend = Arc::new(MemoryBackend::new(opts.backing_len().unwrap()).unwrap());
    drop(Volume::format(backend.clone(), &opts).unwrap());
    let open = OpenOptions {
        stage_bytes: 4 << 20,
        background_commit: false,
        ..OpenOptions::default()
    };
    let vol = Volume::open(backend, &open).unwrap();
    let drops = Arc::new(AtomicUsize::new(0));
    let mut most_alive = 0;
    for i in 0..64u64 {
        vol.write_owned(Tracked(vec![i as u8 | 1; 1 << 20], drops.clone()), i << 20)
            .unwrap();
        vol.write_zeroes((i << 20) + 4096, (1 << 20) - 4096).unwrap();
        most_alive = most_alive.max(i as usize + 1 - drops.load(Ordering::SeqCst));
    }
    assert!(
        most_alive <= 5,
        "{most_alive} MiB of buffers pinned behind a 4 MiB stage"
    );
    let mut b = vec![0u8; 8192];
    vol.read_at(&mut b, 63 << 20).unwrap();
    assert!(b[..4096].iter().all(|&x| x == 63 | 1) && b[4096..].iter().all(|&x| x == 0));
}

/// Regression: `rebuild` and `journal` installed a commit's new tags in the metadata cache
/// before writing them. With a tiny cache, a load on another thread could evict them and read
/// the old sectors back: a group's first write then read as blank metadata under a set
/// written-map bit, and a write into the group was refused as "metadata damaged" (13 of 300
/// runs of this sequence failed before the fix). Every mode, with the background committer
/// running while the writer goes on.
#[test]
fn background_commits_under_cache_pressure_raise_no_false_alarm() {
    let ops = [
        Op::Flush,
        Op::Read {
            off: 62306,
            len: 1585,
        },
        Op::Write {
            off: 73168,
            len: 1051,
            fill: 166,
            owned: true,
        },
        Op::Write {
            off: 52150,
            len: 2903,
            fill: 59,
            owned: false,
        },
        Op::Write {
            off: 21599,
            len: 1732,
            fill: 215,
            owned: false,
        },
        Op::Read {
            off: 38980,
            len: 1862,
        },
        Op::Write {
            off: 36815,
            len: 2820,
            fill: 179,
            owned: false,
        },
        Op::Discard {
            off: 33258,
            len: 2207,
        },
        Op::Discard { off: 1719, len: 1812 },
        Op::Write {
            off: 45919,
            len: 1535,
            fill: 153,
            owned: false,
        },
        Op::Flush,
        Op::Write {
            off: 60728,
            len: 1423,
            fill: 182,
            owned: true,
        },
        Op::Write {
            off: 69455,
            len: 1437,
            fill: 224,
            owned: false,
        },
    ];
    for mode in [Mode::Rebuild, Mode::Journal, Mode::Dual, Mode::None] {
        for _ in 0..300 {
            run(&ops, 512, mode, 4096);
        }
    }
}
