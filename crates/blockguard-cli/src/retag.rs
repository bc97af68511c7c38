//! `blockguard retag`: switch a volume to another tag profile whose tags fit its tag slots — directly
//! when nobody holds it, or through the control socket of the `serve` or `mount` process that
//! does, without stopping its clients.
//!
//! The engine records the re-tag and its cursor in the superblock, so Ctrl-C (or a crash, or
//! the server stopping) loses nothing: the same command again resumes it.

use crate::common::new_key_file;
use crate::control::client::{reach, Access, Client};
use crate::control::proto::{Request, Response, RetagRequest};
use crate::interrupt::Signals;
use anyhow::{bail, Context, Result};
use blockguard::{Profile, Volume};
use clap::Args;
use indicatif::{ProgressBar, ProgressStyle};
use std::path::PathBuf;
use std::sync::atomic::AtomicBool;
use std::time::Duration;

/// How long the client waits for the next reply of a re-tag running in a server: a step
/// re-tags a few MiB, so progress comes several times a second unless the server is stuck.
const STEP_WAIT: Duration = Duration::from_secs(90);

/// Arguments of `retag`.
#[derive(Args, Debug)]
pub(crate) struct RetagArgs {
    /// The volume.
    pub(crate) path: PathBuf,
    /// The tag profile to switch to: any whose tags fit the volume's tag slots (`info` shows
    /// their size: the tag size of the profile it was formatted with, or its --tag-room).
    /// 8 bytes: crc32c, xxh3, crc64-nvme, t10-dif, t10-dif-ip; 16: nvme-pi64, sha256, blake3;
    /// 32: hmac-sha256, blake3-keyed. A keyed one needs --new-key-file. To resume a re-tag,
    /// give its target again.
    #[arg(long, value_parser = crate::common::profile_parser())]
    pub(crate) profile: Profile,
    /// Print the report as JSON.
    #[arg(long)]
    pub(crate) json: bool,
    /// Re-tag at most this many megabytes (10^6 bytes) of the volume per second, written or
    /// not, to leave the disk to its clients (default: as fast as it goes).
    #[arg(long, value_name = "MB/s", value_parser = crate::scrub::parse_rate)]
    pub(crate) rate: Option<u64>,
    /// The control socket of the process serving the volume, if it was started with
    /// `--control PATH` (default: the volume's path + ".ctl").
    #[arg(long, value_name = "PATH")]
    pub(crate) control: Option<PathBuf>,
}

/// `blockguard retag`; true if no block failed verification.
pub(crate) fn run(args: &RetagArgs) -> Result<bool> {
    let signals = Signals::watch()?;
    let new_key = new_key_file()?;
    let report = match reach(&args.path, args.control.as_deref(), false)? {
        Access::Direct(vol) => {
            let report = direct(args, &vol, new_key.as_ref().map(|(_, k)| k), signals.flag());
            // Closed also after an error or a stop: the cursor is in the superblock.
            let closed = vol
                .close()
                .with_context(|| format!("cannot close {}", args.path.display()));
            let report = report?;
            closed?;
            report
        }
        Access::Socket(client, _) => served(args, client, new_key.map(|(raw, _)| hex(&raw)))?,
    };
    print_report(args, &report)?;
    if report.get("complete") != Some(&serde_json::Value::Bool(true)) {
        if let Some(signal) = signals.caught() {
            // The cursor is recorded: say how to go on, then exit as the signal asks.
            crate::log::line("blockguard: the re-tag is recorded where it stopped; run the same command again to resume it");
            return Err(signal.into());
        }
        bail!("the re-tag stopped before it finished; run the same command again to resume it");
    }
    Ok(report["bad_blocks"].as_array().is_none_or(Vec::is_empty))
}

/// Re-tags a volume opened here, with a progress bar; stops at Ctrl-C.
fn direct(
    args: &RetagArgs,
    vol: &Volume,
    key: Option<&blockguard::tag::TagKey>,
    stop: &AtomicBool,
) -> Result<serde_json::Value> {
    let mut bar: Option<ProgressBar> = None;
    let opts = blockguard::RetagOptions {
        key,
        stop: Some(stop),
        rate: args.rate,
        ..blockguard::RetagOptions::new(args.profile)
    };
    let result = vol.retag(&opts, &mut |done, total| show(&mut bar, done, total));
    if let Some(pb) = bar {
        pb.finish_and_clear();
    }
    let report = result.with_context(|| format!("cannot re-tag {}", args.path.display()))?;
    Ok(serde_json::to_value(&report)?)
}

/// Re-tags through the control socket: the server runs it and streams progress; Ctrl-C here
/// closes the connection, which stops it there (at the next step).
fn served(args: &RetagArgs, mut client: Client, key: Option<String>) -> Result<serde_json::Value> {
    client.send(&Request::Retag(RetagRequest {
        profile: args.profile.name().to_string(),
        key,
        rate: args.rate,
    }))?;
    let mut bar: Option<ProgressBar> = None;
    let outcome = loop {
        match client.recv_for(STEP_WAIT) {
            Ok(Response::RetagProgress { done, total }) => show(&mut bar, done, total),
            Ok(Response::RetagDone { report }) => break Ok(report),
            Ok(Response::Error { message, .. }) => {
                break Err(anyhow::anyhow!(
                    "cannot re-tag {}: {message}",
                    args.path.display()
                ))
            }
            Ok(other) => break Err(anyhow::anyhow!("unexpected reply to retag: {other:?}")),
            Err(e) => break Err(e),
        }
    };
    if let Some(pb) = bar {
        pb.finish_and_clear();
    }
    outcome
}

/// Shows `done` of `total` groups in the progress bar, made on first use.
fn show(bar: &mut Option<ProgressBar>, done: u64, total: u64) {
    let pb = bar.get_or_insert_with(|| {
        let pb = ProgressBar::new(total);
        if let Ok(style) = ProgressStyle::with_template("{msg:>8} [{bar:40}] {pos}/{len} groups eta {eta}") {
            pb.set_style(style.progress_chars("=> "));
        }
        pb.set_message("retag");
        pb
    });
    pb.set_length(total.max(1));
    pb.set_position(done);
}

/// Prints the report (a [`blockguard::RetagReport`] as JSON).
fn print_report(args: &RetagArgs, r: &serde_json::Value) -> Result<()> {
    if args.json {
        say!("{}", serde_json::to_string_pretty(r)?);
        return Ok(());
    }
    let num = |k: &str| r[k].as_u64().unwrap_or_default();
    let text = |k: &str| r[k].as_str().unwrap_or("?").to_string();
    for b in r["bad_blocks"].as_array().into_iter().flatten() {
        say!(
            "block {}: {}",
            b["block"].as_u64().unwrap_or_default(),
            b["detail"].as_str().unwrap_or("")
        );
    }
    for d in r["damaged"].as_array().into_iter().flatten() {
        say!(
            "damaged metadata in group {} sector {}: {}",
            d["group"].as_u64().unwrap_or_default(),
            d["sector"].as_u64().unwrap_or_default(),
            d["detail"].as_str().unwrap_or("")
        );
    }
    let state = if r["complete"].as_bool() == Some(true) {
        format!("now uses tag profile {}", text("to"))
    } else {
        format!(
            "re-tag to {} stopped at group {} of {}",
            text("to"),
            num("cursor"),
            num("groups")
        )
    };
    // Mirror sets: copies rewritten from a good one before their re-tag.
    let repaired = match num("repaired") {
        0 => String::new(),
        n => format!("; {n} bad block copies repaired from another copy first"),
    };
    say!(
        "{}: {state} ({} blocks in {} groups re-tagged by this run, from group {}; {} bad blocks{repaired})",
        args.path.display(),
        num("blocks_retagged"),
        num("groups_retagged"),
        num("started_at"),
        r["bad_blocks"].as_array().map_or(0, Vec::len)
    );
    Ok(())
}

/// `bytes` in lower-case hex.
fn hex(bytes: &[u8]) -> String {
    use std::fmt::Write as _;
    bytes
        .iter()
        .fold(String::with_capacity(bytes.len() * 2), |mut s, b| {
            // Writing to a `String` cannot fail.
            let _ = write!(s, "{b:02x}");
            s
        })
}
