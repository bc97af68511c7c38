//! `blockguard recover`: settle a volume after an unclean shutdown and mark it clean; with
//! `--rebuild`, also rebuild damaged metadata from what the disk holds (an explicit decision:
//! it may make blocks read as an older version, and blank groups under a written-groups map
//! sector no copy of which is valid read as never written).

use crate::common::{open_volume, progress, PathOnce};
use anyhow::Result;
use blockguard::{RecoverOptions, RecoveryReport};
use clap::Args;
use serde::Serialize;
use std::path::PathBuf;

/// Arguments of `recover`.
#[derive(Args, Debug)]
pub(crate) struct RecoverArgs {
    /// The volume (not in use by another process).
    pub(crate) path: PathBuf,
    /// Print JSON.
    #[arg(long)]
    pub(crate) json: bool,
    /// Also scan every group and rebuild damaged metadata: a damaged metadata sector from its
    /// valid brother (its blocks may then read as an older version), and a written-groups map
    /// sector with no valid copy from the groups' metadata (blank groups under it then count
    /// as never written, even if they were wiped). Without it, damage is only reported.
    #[arg(long)]
    pub(crate) rebuild: bool,
}

#[derive(Serialize)]
struct Report<'a> {
    volume: String,
    /// What settling after an unclean shutdown did (null if the volume was closed cleanly).
    after_crash: Option<&'a RecoveryReport>,
    /// The scan for damaged metadata and what it rebuilt (null without `--rebuild`).
    rebuild: Option<&'a RecoveryReport>,
}

/// Runs recovery and prints what it did.
pub(crate) fn run(args: &RecoverArgs) -> Result<()> {
    // Opening read-write settles a volume left in use (with its own progress bar).
    let vol = open_volume(&args.path, false)?;
    let report = if args.rebuild {
        let pb = progress(vol.geometry().groups, "rebuild");
        let report = vol
            .recover(RecoverOptions::rebuild(), |done, _| pb.set_position(done))
            .doing("recover", &args.path)?;
        pb.finish_and_clear();
        Some(report)
    } else {
        None
    };
    let at_open = vol.recovery_at_open().cloned();
    vol.close().doing("close", &args.path)?;
    if args.json {
        let r = Report {
            volume: args.path.display().to_string(),
            after_crash: at_open.as_ref(),
            rebuild: report.as_ref(),
        };
        say!("{}", serde_json::to_string_pretty(&r)?);
        return Ok(());
    }
    let name = args.path.display();
    match &at_open {
        None => say!("{name}: was closed cleanly; no crash state to settle"),
        Some(r) => say!(
            "{name}: settled after an unclean shutdown: {}",
            crate::common::describe_recovery(r)
        ),
    }
    let damaged = report
        .as_ref()
        .or(at_open.as_ref())
        .map_or(&[][..], |r| &r.damaged[..]);
    for p in damaged {
        let end = p.first_block + u64::from(p.blocks);
        if p.rebuilt {
            say!(
                "{name}: rebuilt damaged metadata of blocks {}..{end} (group {} sector {}: {}) from its valid brother; \
                 those blocks now verify against it, and any of them whose newer version the damaged copy described reads as that older version",
                p.first_block, p.group, p.sector, p.detail
            );
        } else if args.rebuild {
            say!(
                "{name}: cannot rebuild the metadata of blocks {}..{end} (group {} sector {}: {}): no valid brother; reads of them keep failing",
                p.first_block, p.group, p.sector, p.detail
            );
        } else {
            say!(
                "{name}: damaged metadata of blocks {}..{end} (group {} sector {}: {}); reads of them fail; \
                 `blockguard recover --rebuild` rebuilds it from what the disk holds",
                p.first_block,
                p.group,
                p.sector,
                p.detail
            );
        }
    }
    if report.is_none() {
        say!(
            "{name}: marked clean (damage is found by `blockguard check` and rebuilt by `recover --rebuild`)"
        );
    } else {
        say!("{name}: marked clean");
    }
    Ok(())
}
