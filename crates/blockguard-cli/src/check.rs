//! `blockguard check`: verify every block of a volume and list the bad ones.

use crate::common::{open_volume, progress};
use anyhow::Result;
use blockguard::{BlockProblem, MapProblem, MetadataProblem};
use clap::Args;
use serde::Serialize;
use std::path::PathBuf;

/// Arguments of `check`.
#[derive(Args, Debug)]
pub(crate) struct CheckArgs {
    /// The volume.
    pub(crate) path: PathBuf,
    /// Print JSON.
    #[arg(long)]
    pub(crate) json: bool,
}

#[derive(Serialize)]
struct Report {
    volume: String,
    blocks: u64,
    bad_blocks: Vec<BlockProblem>,
    damaged_metadata: Vec<MetadataProblem>,
    map_problems: Vec<MapProblem>,
    /// Mirror sets: block copies that do not verify on the member holding them, as
    /// (copy number, block). The reads above are served from a good copy; these are the bad
    /// ones behind them (`blockguard scrub --repair` or reads of a writable volume fix them).
    bad_copies: Vec<(usize, u64)>,
    warnings: Vec<String>,
    clean: bool,
    /// Copies of the volume (1 for a plain volume).
    #[serde(skip)]
    copies: usize,
}

/// Bad blocks (and damaged metadata sectors) listed one a line before the rest is only
/// counted: a truncated or wiped volume has thousands. `--json` lists them all.
const LISTED: usize = 100;

/// The line after the first [`LISTED`] of `total` problems.
fn more(total: usize, what: &str) {
    if total > LISTED {
        say!(
            "... and {} more {what} (`check --json` lists them all)",
            total - LISTED
        );
    }
}

/// Returns true if the volume is clean.
pub(crate) fn run(args: &CheckArgs) -> Result<bool> {
    let vol = open_volume(&args.path, true)?;
    let g = *vol.geometry();
    let pb = progress(vol.size(), "check");
    let mut bad = Vec::new();
    // A group at a time: one large read per group, bounded memory.
    let step = u64::from(g.group_blocks) * 16;
    let mut block = 0;
    while block < g.data_blocks {
        let n = step.min(g.data_blocks - block);
        bad.extend(vol.check_blocks(block, n)?);
        block += n;
        pb.set_position(block * u64::from(g.block_size));
    }
    pb.finish_and_clear();
    let mut bad_copies = Vec::new();
    if vol.members().len() > 1 {
        // Every copy, not only the one each read went to.
        let pb = progress(vol.size(), "copies");
        let mut block = 0;
        while block < g.data_blocks {
            let n = step.min(g.data_blocks - block);
            bad_copies.extend(vol.verify_copies(block, n, false)?.bad);
            block += n;
            pb.set_position(block * u64::from(g.block_size));
        }
        pb.finish_and_clear();
    }
    let damaged = vol.check_metadata(0, g.groups)?;
    let map = vol.check_map()?;
    let report = Report {
        volume: args.path.display().to_string(),
        blocks: g.data_blocks,
        clean: bad.is_empty()
            && damaged.is_empty()
            && map.is_empty()
            && bad_copies.is_empty()
            && vol.warnings().is_empty(),
        bad_copies,
        copies: vol.members().len().max(1),
        warnings: vol.warnings().to_vec(),
        bad_blocks: bad,
        damaged_metadata: damaged,
        map_problems: map,
    };
    if args.json {
        say!("{}", serde_json::to_string_pretty(&report)?);
    } else {
        print_text(&report);
    }
    // A damaged superblock copy is corruption found, too.
    Ok(report.clean)
}

/// The report as lines of text.
fn print_text(report: &Report) {
    for p in report.bad_blocks.iter().take(LISTED) {
        say!("bad block {}: {}", p.block, p.detail);
    }
    more(report.bad_blocks.len(), "bad blocks");
    for p in report.damaged_metadata.iter().take(LISTED) {
        say!(
            "damaged metadata: group {} sector {} (blocks {}..{}): {}",
            p.group,
            p.sector,
            p.first_block,
            p.first_block + u64::from(p.blocks),
            p.detail
        );
    }
    more(report.damaged_metadata.len(), "damaged metadata sectors");
    for p in &report.map_problems {
        say!(
            "written-groups map sector {} (groups {}..{}): {}",
            p.sector,
            p.first_group,
            p.first_group + p.groups,
            p.detail
        );
    }
    let no_good_copy: std::collections::HashSet<u64> = report.bad_blocks.iter().map(|p| p.block).collect();
    for (copy, block) in report.bad_copies.iter().take(LISTED) {
        if no_good_copy.contains(block) {
            say!("bad copy of block {block} on copy {copy} (no good copy: see bad block {block})");
        } else {
            say!("bad copy of block {block} on copy {copy} (a good copy is served)");
        }
    }
    more(report.bad_copies.len(), "bad copies");
    for w in &report.warnings {
        say!("warning: {w}");
    }
    let mut counts = vec![
        format!("{} blocks checked", report.blocks),
        format!("{} bad", report.bad_blocks.len()),
        format!("{} damaged metadata sectors", report.damaged_metadata.len()),
    ];
    if report.copies > 1 {
        counts.push(format!("{} bad copies", report.bad_copies.len()));
    }
    if !report.warnings.is_empty() {
        // Maybe not clean for them alone: counted, rather than exit 1 under "0 bad".
        counts.push(format!("{} warnings", report.warnings.len()));
    }
    say!("{}: {}", report.volume, counts.join(", "));
}
