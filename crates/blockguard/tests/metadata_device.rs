//! A volume split over a data device and a metadata device: the data device alone reads as
//! the plain image; a swapped, foreign or wrong device is refused with nothing written; and
//! crashes of the pair (each device losing, reordering and tearing its own unflushed writes)
//! keep G1/G2 in `dual` mode and every request atomic in `journal` mode.

use blockguard::blockguard_backend::{Backend, FaultBackend, MemoryBackend};
use blockguard::{Error, FormatOptions, Mode, OpenOptions, Volume};
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;
use std::sync::Arc;

const BS: u64 = 4096;
const BLOCKS: u64 = 96;

fn opts(mode: Mode) -> FormatOptions {
    let mut o = FormatOptions::with_size(BS * BLOCKS);
    o.mode = mode;
    o.group_blocks = Some(16);
    if mode == Mode::Journal {
        o.journal_size = Some(128 * 1024);
    }
    o
}

fn pair(mode: Mode) -> (Arc<MemoryBackend>, Arc<MemoryBackend>) {
    let (d, m) = Volume::split_lengths(&opts(mode)).unwrap();
    (
        Arc::new(MemoryBackend::new(d).unwrap()),
        Arc::new(MemoryBackend::new(m).unwrap()),
    )
}

#[test]
fn the_data_device_alone_reads_as_the_plain_image() {
    for mode in [Mode::Dual, Mode::Journal, Mode::Rebuild] {
        let (data, meta) = pair(mode);
        let vol = Volume::format_split(data.clone(), meta.clone(), &opts(mode), "/meta").unwrap();
        let mut model = vec![0u8; (BS * BLOCKS) as usize];
        let mut rng = ChaCha8Rng::seed_from_u64(1);
        for _ in 0..200 {
            let off = rng.random_range(0..BS * BLOCKS - 1);
            let len = rng.random_range(1..=(BS * BLOCKS - off).min(20_000));
            let bytes: Vec<u8> = (0..len).map(|_| rng.random()).collect();
            vol.write_at(&bytes, off).unwrap();
            model[off as usize..(off + len) as usize].copy_from_slice(&bytes);
        }
        vol.write_zeroes(10 * BS, 5 * BS).unwrap();
        model[(10 * BS) as usize..(15 * BS) as usize].fill(0);
        vol.close().unwrap();
        let mut image = vec![0u8; model.len()];
        data.read_at(&mut image, 0).unwrap();
        assert!(
            image == model,
            "{mode:?}: the data device's first bytes are the image"
        );
        let vol = Volume::open_split(data, meta, &OpenOptions::default()).unwrap();
        let mut back = vec![0u8; model.len()];
        vol.read_at(&mut back, 0).unwrap();
        assert!(back == model, "{mode:?}");
        assert!(vol.check_blocks(0, BLOCKS).unwrap().is_empty());
    }
}

#[test]
fn damage_on_the_data_device_is_still_detected() {
    let (data, meta) = pair(Mode::Dual);
    let vol = Volume::format_split(data.clone(), meta.clone(), &opts(Mode::Dual), "/meta").unwrap();
    vol.write_at(&vec![7u8; BS as usize], 5 * BS).unwrap();
    vol.close().unwrap();
    let mut b = vec![0u8; 1];
    data.read_at(&mut b, 5 * BS + 9).unwrap();
    b[0] ^= 1;
    data.write_at(&b, 5 * BS + 9).unwrap();
    let vol = Volume::open_split(data, meta, &OpenOptions::default()).unwrap();
    let mut buf = vec![0u8; BS as usize];
    assert!(matches!(
        vol.read_at(&mut buf, 5 * BS),
        Err(Error::Corrupt { block: 5, .. })
    ));
}

#[test]
fn swapped_foreign_and_lone_devices_are_refused_and_left_unchanged() {
    let (data, meta) = pair(Mode::Dual);
    drop(Volume::format_split(data.clone(), meta.clone(), &opts(Mode::Dual), "/meta").unwrap());
    let (data2, meta2) = pair(Mode::Dual);
    drop(Volume::format_split(data2.clone(), meta2.clone(), &opts(Mode::Dual), "/meta2").unwrap());
    let snapshot = |b: &MemoryBackend| {
        let mut v = vec![0u8; b.len() as usize];
        b.read_at(&mut v, 0).unwrap();
        v
    };
    let before = [
        snapshot(&data),
        snapshot(&meta),
        snapshot(&data2),
        snapshot(&meta2),
    ];
    let o = OpenOptions::default();
    let swapped = Volume::open_split(meta.clone(), data.clone(), &o).unwrap_err();
    assert!(swapped.to_string().contains("metadata device"), "{swapped}");
    let foreign = Volume::open_split(data.clone(), meta2.clone(), &o).unwrap_err();
    assert!(
        foreign.to_string().contains("do not belong together"),
        "{foreign}"
    );
    let lone_meta = Volume::open(meta.clone(), &o).unwrap_err();
    assert!(
        lone_meta
            .to_string()
            .contains("open the volume through its data device"),
        "{lone_meta}"
    );
    let lone_data = Volume::open(data.clone(), &o).unwrap_err();
    assert!(matches!(lone_data, Error::NotAVolume { .. }), "{lone_data}");
    // A plain volume given as the metadata device.
    let plain = Arc::new(MemoryBackend::new(opts(Mode::Dual).backing_len().unwrap()).unwrap());
    drop(Volume::format(plain.clone(), &opts(Mode::Dual)).unwrap());
    let e = Volume::open_split(data.clone(), plain, &o).unwrap_err();
    assert!(e.to_string().contains("not the metadata device"), "{e}");
    let after = [
        snapshot(&data),
        snapshot(&meta),
        snapshot(&data2),
        snapshot(&meta2),
    ];
    assert!(before == after, "refused opens wrote nothing");
}

/// Hash of every block.
fn hashes(model: &[u8]) -> Vec<u64> {
    model
        .chunks(BS as usize)
        .map(|c| crc_fast::checksum(crc_fast::CrcAlgorithm::Crc64Nvme, c))
        .collect()
}

#[test]
fn crashes_of_the_pair_keep_the_guarantees() {
    for (seed, mode) in [
        (1u64, Mode::Dual),
        (2, Mode::Journal),
        (3, Mode::Dual),
        (4, Mode::Journal),
    ] {
        let mut rng = ChaCha8Rng::seed_from_u64(seed);
        let o = opts(mode);
        let (dl, ml) = Volume::split_lengths(&o).unwrap();
        let data = Arc::new(FaultBackend::new(dl).unwrap());
        let meta = Arc::new(FaultBackend::new(ml).unwrap());
        drop(Volume::format_split(data.clone(), meta.clone(), &o, "/meta").unwrap());
        let open = OpenOptions {
            stage_bytes: BS as usize * 3,
            cache_bytes: 0,
            background_commit: false,
            ..OpenOptions::default()
        };
        let vol = Volume::open_split(data.clone(), meta.clone(), &open).unwrap();
        let mut model = vec![0u8; (BS * BLOCKS) as usize];
        // States after each request; `durable`: the index the last flush covered.
        let mut states = vec![hashes(&model)];
        let mut durable = 0;
        for step in 0..80 {
            if rng.random_bool(0.15) {
                vol.flush().unwrap();
                durable = states.len() - 1;
            } else {
                let b = rng.random_range(0..BLOCKS);
                let n = rng.random_range(1..=(BLOCKS - b).min(4));
                let bytes: Vec<u8> = (0..n * BS).map(|_| rng.random()).collect();
                vol.write_at(&bytes, b * BS).unwrap();
                model[(b * BS) as usize..((b + n) * BS) as usize].copy_from_slice(&bytes);
                states.push(hashes(&model));
            }
            // Crash images of both devices, each keeping any subset of its unflushed writes,
            // whole or (journal mode, where no torn block may show) torn at 512 bytes; `dual`
            // reports a torn data block, as it must.
            let (ds, ms) = (data.crash_state(), meta.crash_state());
            for _ in 0..4 {
                let torn = mode == Mode::Journal && rng.random_bool(0.5);
                let di = Arc::new(MemoryBackend::from_vec(ds.random_crash_image(&mut rng, torn)));
                let mi = Arc::new(MemoryBackend::from_vec(ms.random_crash_image(&mut rng, torn)));
                let v = Volume::open_split(di, mi, &OpenOptions::default())
                    .unwrap_or_else(|e| panic!("seed {seed} step {step}: open after the crash: {e}"));
                let mut got = vec![0u8; model.len()];
                v.read_at(&mut got, 0).unwrap_or_else(|e| {
                    panic!("seed {seed} step {step} {mode:?}: a block reported after the crash: {e}")
                });
                let got = hashes(&got);
                if mode == Mode::Journal {
                    assert!(
                        states[durable..].contains(&got),
                        "seed {seed} step {step}: no prefix of the requests"
                    );
                } else {
                    for (b, h) in got.iter().enumerate() {
                        assert!(
                            states[durable..].iter().any(|s| s[b] == *h),
                            "seed {seed} step {step}: block {b} holds no allowed version"
                        );
                    }
                }
            }
        }
    }
}
