//! `blockguard recover`: settle a volume after an unclean shutdown and mark it clean.

use crate::common::{open_volume, progress};
use anyhow::{Context, Result};
use clap::Args;
use std::path::PathBuf;

/// Arguments of `recover`.
#[derive(Args, Debug)]
pub struct RecoverArgs {
    /// The volume (not in use by another process).
    pub path: PathBuf,
    /// Print JSON.
    #[arg(long)]
    pub json: bool,
}

/// Runs recovery and prints what it did.
pub fn run(args: RecoverArgs) -> Result<()> {
    let vol = open_volume(&args.path, false)?;
    let groups = vol.geometry().groups;
    // The bar counts groups; shown in "bytes" of volume covered, like `check`.
    let group_len = vol.size() / groups.max(1);
    let pb = progress(vol.size(), "recover");
    let report = vol
        .recover(|done| pb.set_position(done * group_len))
        .with_context(|| format!("recovering {}", args.path.display()))?;
    pb.finish_and_clear();
    vol.close()
        .with_context(|| format!("closing {}", args.path.display()))?;
    if args.json {
        println!("{}", serde_json::to_string_pretty(&report)?);
    } else if report.already_clean {
        println!("{}: closed cleanly; nothing to recover", args.path.display());
    } else {
        println!(
            "{}: recovered and marked clean: {} groups examined, {} rewritten, {} blocks back to the version on disk, {} with unreadable metadata",
            args.path.display(),
            report.groups_examined,
            report.groups_rewritten,
            report.blocks_reverted,
            report.groups_damaged
        );
    }
    Ok(())
}
