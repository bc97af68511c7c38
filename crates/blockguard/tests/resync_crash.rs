//! A crash in the middle of an online resync, clients writing and flushing meanwhile: each
//! member's disk crashes on its own (unflushed writes kept at random, reordered, torn at 512
//! bytes) at points all along the resync. Reopened from the crash images, the set reads every
//! block as the last flushed version (G1, G2: nothing written by a client since was left
//! unflushed), the member being resynchronized is still out of sync (its copy was never
//! declared complete) or, past the end, complete; a second resync makes the members identical
//! and the resynchronized member alone reads every block right.
//!
//! A failing case prints its seed; replay it with `BLOCKGUARD_SEED=<seed>`.

use blockguard::blockguard_backend::{Backend, FaultBackend};
use blockguard::{FormatOptions, OpenOptions, Volume};
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;
use std::collections::HashMap;
use std::sync::Arc;

const BS: u64 = 512;
const N: u64 = 6_000;

fn content(b: u64, round: u32) -> Vec<u8> {
    let mut v: Vec<u8> = (0..BS)
        .map(|i| (b as u8).wrapping_mul(7).wrapping_add(i as u8))
        .collect();
    v[..8].copy_from_slice(&b.to_le_bytes());
    v[8..12].copy_from_slice(&round.to_le_bytes());
    v
}

fn opts() -> FormatOptions {
    let mut o = FormatOptions::with_size(BS * N);
    o.block_size = BS as u32;
    o
}

fn dyns(m: &[Arc<FaultBackend>]) -> Vec<Arc<dyn Backend>> {
    m.iter().map(|b| b.clone() as Arc<dyn Backend>).collect()
}

/// The members' crash images at one point, and what every block must read there.
type CrashPoint = (Vec<Vec<u8>>, HashMap<u64, u32>);

fn check_reads(vol: &Volume, model: &HashMap<u64, u32>, what: &str) {
    let mut buf = vec![0u8; BS as usize];
    for b in 0..N {
        let want = model
            .get(&b)
            .map_or_else(|| vec![0u8; BS as usize], |&r| content(b, r));
        vol.read_at(&mut buf, b * BS)
            .unwrap_or_else(|e| panic!("{what}: block {b}: {e}"));
        assert!(
            buf == want,
            "{what}: block {b} reads {:?}, expected round {:?}",
            &buf[8..12],
            model.get(&b)
        );
    }
}

fn one_seed(seed: u64) {
    let mut rng = ChaCha8Rng::seed_from_u64(seed);
    let len = opts().backing_len().expect("geometry");
    let m: Vec<Arc<FaultBackend>> = (0..2)
        .map(|_| Arc::new(FaultBackend::new(len).expect("memory")))
        .collect();
    let mut model: HashMap<u64, u32> = HashMap::new();
    let vol = Volume::format_members(dyns(&m), &opts()).expect("format");
    for b in (0..N).step_by(3) {
        vol.write_at(&content(b, 1), b * BS).expect("write");
        model.insert(b, 1);
    }
    vol.close().expect("close");
    // Member 1 misses writes.
    let vol = Volume::open_members(vec![m[0].clone()], &OpenOptions::default()).expect("open degraded");
    for _ in 0..400 {
        let b = rng.random_range(0..N);
        vol.write_at(&content(b, 2), b * BS).expect("write");
        model.insert(b, 2);
    }
    vol.close().expect("close");
    for fb in &m {
        fb.forget_history();
    }
    let vol = Volume::open_members(dyns(&m), &OpenOptions::default()).expect("open both");
    let mut images: Vec<CrashPoint> = Vec::new();
    let mut round = 3;
    let model_during = std::cell::RefCell::new(model.clone());
    vol.resync(&mut |done, total| {
        if done == total {
            return;
        }
        // A client writes and flushes while the resync runs.
        let mut model = model_during.borrow_mut();
        for _ in 0..3 {
            let b = rng.random_range(0..N);
            vol.write_at(&content(b, round), b * BS)
                .expect("write during resync");
            model.insert(b, round);
        }
        vol.flush().expect("flush during resync");
        round += 1;
        let crashed = m
            .iter()
            .map(|fb| fb.crash_state().random_crash_image(&mut rng, true))
            .collect();
        images.push((crashed, model.clone()));
    })
    .expect("resync");
    let model = model_during.into_inner();
    // Past the end: both in sync.
    let crashed = m
        .iter()
        .map(|fb| fb.crash_state().random_crash_image(&mut rng, true))
        .collect();
    images.push((crashed, model.clone()));
    vol.close().expect("close");
    assert!(images.len() > 2, "crashes at several points of the resync");
    let last = images.len() - 1;
    for (k, (crashed, model)) in images.into_iter().enumerate() {
        let what = format!("seed {seed}, crash {k}");
        let fbs: Vec<Arc<FaultBackend>> = crashed
            .into_iter()
            .map(|i| Arc::new(FaultBackend::from_image(i)))
            .collect();
        let vol = Volume::open_members(dyns(&fbs), &OpenOptions::default())
            .unwrap_or_else(|e| panic!("{what}: reopen: {e}"));
        if k < last {
            assert!(
                !vol.members()[1].1,
                "{what}: an unfinished resync left member 1 in sync"
            );
        } else {
            assert!(vol.members()[1].1, "{what}: a finished resync is not recorded");
        }
        check_reads(&vol, &model, &what);
        vol.resync(&mut |_, _| {})
            .unwrap_or_else(|e| panic!("{what}: second resync: {e}"));
        vol.close().unwrap_or_else(|e| panic!("{what}: close: {e}"));
        let images: Vec<Vec<u8>> = fbs.iter().map(|f| f.live_image()).collect();
        let end = images[0].len() - 4096;
        assert!(
            images[0][4096..end] == images[1][4096..end],
            "{what}: members differ after the second resync"
        );
        let alone = Volume::open_members(vec![fbs[1].clone() as Arc<dyn Backend>], &OpenOptions::default())
            .unwrap_or_else(|e| panic!("{what}: member 1 alone: {e}"));
        check_reads(&alone, &model, &format!("{what}, member 1 alone"));
    }
}

#[test]
fn a_crash_during_an_online_resync_loses_nothing_and_a_second_resync_finishes() {
    let seeds: Vec<u64> = match std::env::var("BLOCKGUARD_SEED").ok().as_deref() {
        Some("random") => vec![rand::random()],
        Some(s) => vec![s.parse().expect("BLOCKGUARD_SEED is a number or `random`")],
        None => (0..4).collect(),
    };
    for seed in seeds {
        let result = std::panic::catch_unwind(|| one_seed(seed));
        if let Err(e) = result {
            eprintln!("failing seed: {seed} (replay with BLOCKGUARD_SEED={seed})");
            std::panic::resume_unwind(e);
        }
    }
}
