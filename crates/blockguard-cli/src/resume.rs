//! `blockguard resume`: gets a served volume past a write-back failure (a full disk, an I/O
//! error) without restarting the server, like `zpool clear`: the server retries what was
//! still staged, verifies it, clears the error state, and reports exactly which acknowledged
//! writes, if any, were lost.

use crate::control::client::{reach, Access};
use crate::control::proto::{Request, Response};
use anyhow::{bail, Result};
use clap::Args;
use serde_json::Value;
use std::path::PathBuf;

/// Arguments of `resume`.
#[derive(Args, Debug)]
pub(crate) struct ResumeArgs {
    /// The volume (being served or mounted).
    pub(crate) path: PathBuf,
    /// Print the report as JSON.
    #[arg(long)]
    pub(crate) json: bool,
    /// The control socket of the process serving the volume, if it was started with
    /// `--control PATH` (default: the volume's path + ".ctl").
    #[arg(long, value_name = "PATH")]
    pub(crate) control: Option<PathBuf>,
}

/// `blockguard resume`.
pub(crate) fn run(args: &ResumeArgs) -> Result<()> {
    let mut client = match reach(&args.path, args.control.as_deref(), true)? {
        Access::Socket(client, _) => client,
        Access::Direct(vol) => {
            drop(vol);
            say!(
                "{}: no process has the volume open, so there is nothing to resume (a failure lasts \
                 only as long as the process that has the volume open; `blockguard check` verifies it)",
                args.path.display()
            );
            return Ok(());
        }
    };
    let Response::Resumed { report } = client.call(&Request::Resume)? else {
        bail!("unexpected reply to resume");
    };
    if args.json {
        say!("{}", serde_json::to_string_pretty(&report)?);
    } else {
        print_report(&args.path.display().to_string(), &report);
    }
    Ok(())
}

fn print_report(volume: &str, r: &Value) {
    let n = |k: &str| r.get(k).and_then(Value::as_u64).unwrap_or(0);
    match r.get("failure").and_then(Value::as_str) {
        Some(why) => say!(
            "{volume}: resumed after: {why}; {} staged blocks written again, {} blocks verified, {} repaired from another copy",
            n("blocks_retried"),
            n("blocks_verified"),
            n("blocks_repaired")
        ),
        None => say!("{volume}: the write path had not failed; error state cleared"),
    }
    let lost: Vec<u64> = r
        .get("lost")
        .and_then(Value::as_array)
        .map(|a| a.iter().filter_map(Value::as_u64).collect())
        .unwrap_or_default();
    if lost.is_empty() {
        say!("no acknowledged write was lost");
    } else {
        say!(
            "LOST: {} acknowledged block writes did not survive the failure: blocks {:?}; their reads fail until they are written again",
            lost.len(),
            lost
        );
    }
    let cleared = r.get("cleared").cloned().unwrap_or_default();
    if let Some(s) = cleared.get("suspension").filter(|v| !v.is_null()) {
        say!(
            "lifted the read-only error policy's suspension of writes (block {})",
            s.get("block").map_or(String::new(), ToString::to_string)
        );
    }
    let forgotten = cleared
        .get("unrepairable_forgotten")
        .and_then(Value::as_u64)
        .unwrap_or(0);
    if forgotten > 0 {
        say!("forgot {forgotten} blocks found with no good copy (they are reported again if read before written)");
    }
}
