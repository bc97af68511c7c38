//! The outside review 11 (branch `attack11`), kept as regression tests: online resync when the
//! *source* member fails in the middle, a member dropped after another was resynchronized (not a
//! split brain), a failing member that must not block the resync of another.

use blockguard::blockguard_backend::{Backend, FaultBackend};
use blockguard::{FormatOptions, Mode, OpenOptions, Volume};
use std::sync::Arc;

const BS: usize = 4096;

fn run(mode: Mode) -> Result<(), String> {
    let opts = FormatOptions {
        mode,
        group_blocks: Some(16),
        ..FormatOptions::with_size(4 << 20)
    };
    let len = opts.backing_len().unwrap();
    let ms: Vec<Arc<FaultBackend>> = (0..3)
        .map(|_| Arc::new(FaultBackend::new(len).unwrap()))
        .collect();
    let d: Vec<Arc<dyn Backend>> = ms.iter().map(|m| m.clone() as Arc<dyn Backend>).collect();
    Volume::format_members(d.clone(), &opts).unwrap().close().unwrap();
    let oo = OpenOptions {
        background_commit: false,
        ..OpenOptions::default()
    };
    let vol = Volume::open_members(d.clone(), &oo).unwrap();
    let blocks = (4 << 20) / BS as u64;
    // member 1 falls behind
    ms[1].fail_writes_at(0..len);
    vol.write_at(&vec![1u8; BS], 0).unwrap();
    vol.flush().unwrap();
    ms[1].clear_faults();
    for b in (0..blocks).step_by(4) {
        vol.write_at(&vec![(b % 250) as u8 + 2; BS], b * BS as u64)
            .unwrap();
    }
    vol.flush().unwrap();
    eprintln!(
        "{mode:?} before resync: {:?}",
        vol.copies()
            .iter()
            .map(|c| format!("{:?}", c.state))
            .collect::<Vec<_>>()
    );
    // resync; at the second progress report the source (member 0) starts failing writes, and a
    // client rewrites block 48*16 (a group not copied yet) and flushes.
    let target = 60 * 16u64; // group 60
    let mut fired = false;
    let r = vol.resync(&mut |n, _total| {
        if n >= 16 && !fired {
            fired = true;
            ms[0].fail_writes_at(0..len);
            vol.write_at(&vec![0xEE; BS], target * BS as u64).unwrap();
            vol.flush().unwrap();
        }
    });
    eprintln!(
        "{mode:?} resync: {r:?}; copies {:?}",
        vol.copies()
            .iter()
            .map(|c| format!("{:?}", c.state))
            .collect::<Vec<_>>()
    );
    let geo = *vol.geometry();
    let states: Vec<String> = vol.copies().iter().map(|c| format!("{:?}", c.state)).collect();
    let mut errs = Vec::new();
    // Raw: what each member that the set calls in sync holds at the block's data.
    for (i, m) in ms.iter().enumerate() {
        let img = m.live_image();
        let off = geo.data_offset(target) as usize;
        let byte = img[off];
        eprintln!(
            "{mode:?}: member {i} ({}) holds {byte:#x} at block {target}",
            states[i]
        );
        if states[i] == "InSync" && byte != 0xEE {
            errs.push(format!(
                "member {i} is recorded in sync but holds the stale {byte:#x} for the acknowledged 0xEE"
            ));
        }
    }
    // Through the set, several reads (the stripe may pick either member).
    let mut buf = vec![0u8; BS];
    match vol.read_at(&mut buf, target * BS as u64) {
        Ok(()) if buf == vec![0xEE; BS] => {}
        Ok(()) => errs.push(format!(
            "the set reads {:#x} without error for the acknowledged 0xEE",
            buf[0]
        )),
        Err(e) => errs.push(format!("the set: {e}")),
    }
    if errs.is_empty() {
        Ok(())
    } else {
        Err(errs.join("; "))
    }
}

/// The source of a resync fails (its writes) in the middle while a client writes a group not
/// copied yet. The resync must not go on copying from a member that no longer receives writes.
#[test]
fn resync_source_fails_midway_dual() {
    run(Mode::Dual).unwrap();
}

#[test]
fn resync_source_fails_midway_rebuild() {
    run(Mode::Rebuild).unwrap();
}

/// Set of three: member 1 falls behind; later member 0 fails (its superblock can no longer be
/// updated: it still says "0 in sync, 1 out of sync"); member 1 is resynchronized (from 2) and
/// recorded in sync. Reopening the set with all three present must open it (member 0 out of
/// sync, older event), not refuse it as a split brain.
#[test]
fn dropped_member_after_resync_of_another_is_not_a_split_brain() {
    let opts = FormatOptions {
        group_blocks: Some(16),
        ..FormatOptions::with_size(4 << 20)
    };
    let len = opts.backing_len().unwrap();
    let ms: Vec<Arc<FaultBackend>> = (0..3)
        .map(|_| Arc::new(FaultBackend::new(len).unwrap()))
        .collect();
    let d: Vec<Arc<dyn Backend>> = ms.iter().map(|m| m.clone() as Arc<dyn Backend>).collect();
    Volume::format_members(d.clone(), &opts).unwrap().close().unwrap();
    let oo = OpenOptions {
        background_commit: false,
        ..OpenOptions::default()
    };
    let vol = Volume::open_members(d.clone(), &oo).unwrap();
    ms[1].fail_writes_at(0..len);
    vol.write_at(&vec![1u8; BS], 0).unwrap();
    vol.flush().unwrap();
    ms[1].clear_faults();
    ms[0].fail_writes_at(0..len);
    vol.write_at(&vec![2u8; BS], 0).unwrap();
    vol.flush().unwrap();
    vol.close().unwrap();
    // member 0's disk is gone for a while: the set is opened without it, member 1 resynced.
    let vol = Volume::open_members(vec![d[1].clone(), d[2].clone()], &oo).unwrap();
    let rep = vol.resync(&mut |_, _| {}).unwrap();
    eprintln!(
        "resync {rep:?}; copies {:?}",
        vol.copies()
            .iter()
            .map(|c| format!("{:?}", c.state))
            .collect::<Vec<_>>()
    );
    vol.close().unwrap();
    ms[0].clear_faults();
    let r = Volume::open_members(d.clone(), &oo);
    match r {
        Ok(v) => eprintln!(
            "opened: {:?}",
            v.copies()
                .iter()
                .map(|c| format!("{:?}", c.state))
                .collect::<Vec<_>>()
        ),
        Err(e) => panic!("the set is refused: {e}"),
    }
}

/// Set of three: member 1 behind, member 0 present but failing every write. `resync` targets
/// every present member out of sync, so member 0's failure fails the whole resync and member 1
/// cannot be brought back while member 0 is present.
#[test]
fn a_dead_present_member_blocks_the_resync_of_another() {
    let opts = FormatOptions {
        group_blocks: Some(16),
        ..FormatOptions::with_size(4 << 20)
    };
    let len = opts.backing_len().unwrap();
    let ms: Vec<Arc<FaultBackend>> = (0..3)
        .map(|_| Arc::new(FaultBackend::new(len).unwrap()))
        .collect();
    let d: Vec<Arc<dyn Backend>> = ms.iter().map(|m| m.clone() as Arc<dyn Backend>).collect();
    Volume::format_members(d.clone(), &opts).unwrap().close().unwrap();
    let oo = OpenOptions {
        background_commit: false,
        ..OpenOptions::default()
    };
    let vol = Volume::open_members(d.clone(), &oo).unwrap();
    ms[1].fail_writes_at(0..len);
    vol.write_at(&vec![1u8; BS], 0).unwrap();
    vol.flush().unwrap();
    ms[1].clear_faults();
    ms[0].fail_writes_at(0..len);
    vol.write_at(&vec![2u8; BS], 0).unwrap();
    vol.flush().unwrap();
    let r = vol.resync(&mut |_, _| {});
    let states: Vec<String> = vol.copies().iter().map(|c| format!("{:?}", c.state)).collect();
    assert!(
        r.is_ok() && states[1] == "InSync",
        "resync: {r:?}; copies {states:?}"
    );
}
