//! `blockguard scrub`: verify every written block of a volume — directly when nobody holds it,
//! or through the control socket of the `serve` or `mount` process that does, without
//! stopping its clients.
//!
//! Where a scrub stopped (Ctrl-C, `scrub-stop`, a server shutting down) is kept for `--resume`
//! in the volume's scrub state file, `<volume>.scrub` next to a volume file
//! (`/var/lib/blockguard/NAME-MAJOR:MINOR.scrub` for a block device): a small JSON record of
//! the last scrub — the volume's UUID, when it ended, its report, and where a resume starts
//! (`null` once a scrub has finished). Both a direct scrub and a server's write it; a server
//! also keeps it in memory.

use crate::common::progress;
use crate::control::client::{connect, reach, Access, Client, Trust, ANSWER_TIMEOUT};
use crate::control::proto::{Request, Response, ScrubRequest};
use crate::info::uuid_string;
use crate::interrupt::Signals;
use crate::status::kind_name;
use anyhow::{anyhow, bail, Context, Result};
use blockguard::{ScrubOptions, ScrubProgress, ScrubReport, Volume};
use clap::Args;
use indicatif::ProgressBar;
use serde::{Deserialize, Serialize};
use std::io::Write;
use std::os::unix::fs::{MetadataExt, OpenOptionsExt};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

/// How long a scrub stopped by Ctrl-C waits for the server's report: longer than a server's
/// `scrub-stop` waits for its scrub (30 s).
const STOP_WAIT: Duration = Duration::from_secs(45);

/// Arguments of `scrub`.
#[derive(Args, Debug)]
pub(crate) struct ScrubArgs {
    /// The volume.
    pub(crate) path: PathBuf,
    /// Rewrite bad copies from good ones (a volume with one copy has nothing to repair from
    /// yet: bad blocks are reported unrepaired). Opens an idle volume read-write.
    #[arg(long)]
    pub(crate) repair: bool,
    /// Print the report as JSON.
    #[arg(long)]
    pub(crate) json: bool,
    /// Most megabytes (10^6 bytes) read per second, e.g. 50 or 0.5 (default: unlimited).
    #[arg(long, value_name = "MB/s", value_parser = parse_rate)]
    pub(crate) rate: Option<u64>,
    /// Go on from where the last stopped scrub of this volume left off.
    #[arg(long)]
    pub(crate) resume: bool,
    /// The control socket of the process serving the volume, if it was started with
    /// `--control PATH` (default: the volume's path + ".ctl").
    #[arg(long, value_name = "PATH")]
    pub(crate) control: Option<PathBuf>,
}

/// Parses `--rate`: megabytes per second (10^6 bytes), with up to six decimals; returns
/// bytes per second.
pub(crate) fn parse_rate(s: &str) -> Result<u64, String> {
    let bad = || format!("{s:?} is not a rate in MB/s: give a positive number such as 50 or 0.5");
    let (int, frac) = s.trim().split_once('.').unwrap_or((s.trim(), ""));
    if frac.len() > 6
        || (int.is_empty() && frac.is_empty())
        || !int.bytes().chain(frac.bytes()).all(|b| b.is_ascii_digit())
    {
        return Err(bad());
    }
    let whole: u64 = if int.is_empty() {
        0
    } else {
        int.parse().map_err(|_| bad())?
    };
    let micro: u64 = format!("{frac:0<6}").parse().map_err(|_| bad())?;
    let bytes = whole
        .checked_mul(1_000_000)
        .and_then(|b| b.checked_add(micro))
        .ok_or_else(bad)?;
    if bytes == 0 {
        return Err(bad());
    }
    Ok(bytes)
}

/// The scrub state file's content.
#[derive(Serialize, Deserialize)]
pub(crate) struct SavedScrub {
    /// Format of this file (1).
    pub(crate) version: u32,
    /// The volume's UUID: a file left by another volume at the same path is ignored.
    pub(crate) uuid: String,
    /// Unix time (seconds) when the scrub ended.
    pub(crate) ended: u64,
    /// Where `--resume` starts: the position of a stopped scrub; `None` after a finished one.
    pub(crate) resume_from: Option<u64>,
    /// The scrub's report.
    pub(crate) report: ScrubReport,
}

const STATE_VERSION: u32 = 1;

/// Seconds since the Unix epoch.
pub(crate) fn unix_now() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs())
}

/// The last scrub recorded for `vol` (at `path`), if its state file exists, fits the volume,
/// and was written by a user believed about the volume ([`Trust`]: a file another user
/// planted next to a volume in a shared directory could fake a clean scrub, or make
/// `--resume` skip the volume); a file that does not fit is ignored with a warning.
pub(crate) fn load_state(path: &Path, vol: &Volume) -> Option<SavedScrub> {
    let file = crate::sidecar::scrub_state(path).ok()?;
    let mut opened = std::fs::File::open(&file).ok()?;
    let meta = opened.metadata().ok()?;
    let trust = Trust::for_volume(path);
    let mut text = Vec::new();
    let bs = u64::from(vol.block_size());
    let parsed = if !trust.trusts(meta.uid()) {
        Err(format!("it is owned by user {}, not {}", meta.uid(), trust.who()))
    } else if meta.mode() & 0o022 != 0 {
        Err(format!(
            "users other than its owner may write it (mode {:o})",
            meta.mode() & 0o7777
        ))
    } else {
        std::io::Read::read_to_end(&mut opened, &mut text)
            .map_err(|e| e.to_string())
            .and_then(|_| serde_json::from_slice::<SavedScrub>(&text).map_err(|e| e.to_string()))
    };
    let saved = match parsed {
        Ok(s) if s.version != STATE_VERSION => Err(format!("version {} is not {STATE_VERSION}", s.version)),
        Ok(s) if s.uuid != uuid_string(&vol.superblock().uuid) => {
            Err(format!("it belongs to volume {}, not this one", s.uuid))
        }
        Ok(s)
            if s.resume_from
                .is_some_and(|p| p > vol.size() || !p.is_multiple_of(bs)) =>
        {
            Err("its resume position does not fit the volume".into())
        }
        other => other,
    };
    saved
        .inspect_err(|why| {
            tracing::warn!(file = %file.display(), "ignoring the scrub state file: {why}");
        })
        .ok()
}

/// Records `report` as the last scrub of `vol` (at `path`), atomically.
pub(crate) fn save_state(path: &Path, vol: &Volume, report: &ScrubReport) -> Result<()> {
    let file = crate::sidecar::scrub_state(path)?;
    crate::sidecar::make_parent(&file)?;
    let saved = SavedScrub {
        version: STATE_VERSION,
        uuid: uuid_string(&vol.superblock().uuid),
        ended: unix_now(),
        resume_from: report.stopped.then_some(report.position),
        report: report.clone(),
    };
    // A name of this process's own: a read-only server and a direct scrub may both hold the
    // volume (shared locks) and end at the same time.
    let mut tmp = file.clone().into_os_string();
    tmp.push(format!(".tmp.{}", std::process::id()));
    let tmp = PathBuf::from(tmp);
    // Created new, never through what another user may have left at that name.
    let _ = std::fs::remove_file(&tmp);
    std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o644)
        .open(&tmp)
        .and_then(|mut f| f.write_all(&serde_json::to_vec_pretty(&saved)?))
        .and_then(|()| std::fs::rename(&tmp, &file))
        .with_context(|| format!("cannot write the scrub state file {}", file.display()))
}

/// `blockguard scrub`; true if nothing bad (or nothing unrepaired, with `--repair`) was found.
pub(crate) fn run(args: &ScrubArgs) -> Result<bool> {
    // Ctrl-C stops the scrub (its position is kept), also while waiting for a server; a
    // second one exits at once.
    let signals = Signals::watch()?;
    let interrupted = signals.flag();
    let (report, via, resumed) = match reach(&args.path, args.control.as_deref(), !args.repair)? {
        Access::Direct(vol) => {
            let (report, resumed) = direct(args, &vol, interrupted)?;
            vol.close()
                .with_context(|| format!("cannot close {}", args.path.display()))?;
            (report, "direct", resumed)
        }
        Access::Socket(client, _) => {
            let (report, resumed) = through_socket(args, client, interrupted)?;
            (report, "control-socket", resumed)
        }
    };
    Ok(print_report(args, &report, via, resumed))
}

/// Scrubs a volume opened here, with a progress bar, and records the outcome.
fn direct(args: &ScrubArgs, vol: &Volume, interrupted: &AtomicBool) -> Result<(ScrubReport, bool)> {
    let start = if args.resume {
        let at = load_state(&args.path, vol).and_then(|s| s.resume_from);
        if at.is_none() {
            crate::log::line(&format!(
                "blockguard: no stopped scrub of {} is recorded: scrubbing from the start",
                args.path.display()
            ));
        }
        at
    } else {
        None
    };
    let opts = ScrubOptions {
        start: start.unwrap_or(0),
        rate: args.rate,
        repair: args.repair,
        stop: Some(interrupted),
        ..ScrubOptions::default()
    };
    let bar = Bar::new();
    let report = vol.scrub(opts, &mut |p| bar.show(&p))?;
    bar.finish();
    save_state(&args.path, vol, &report)?;
    Ok((report, start.is_some()))
}

/// Runs the scrub in the server that holds the volume and follows it; Ctrl-C stops it there.
fn through_socket(
    args: &ScrubArgs,
    mut client: Client,
    interrupted: &AtomicBool,
) -> Result<(ScrubReport, bool)> {
    client.send(&Request::Scrub(ScrubRequest {
        repair: args.repair,
        rate: args.rate,
        resume: args.resume,
        follow: true,
    }))?;
    let resumed = match client.recv()? {
        Response::ScrubStarted { resumed, .. } => resumed,
        Response::Error { message, .. } => bail!("{message}"),
        other => bail!("unexpected reply to scrub: {other:?}"),
    };
    if args.resume && !resumed {
        crate::log::line(&format!(
            "blockguard: no stopped scrub of {} is recorded: scrubbing from the start",
            args.path.display()
        ));
    }
    let bar = Bar::new();
    // The connection that asked the server to stop the scrub, and until when the stopped
    // scrub's report is awaited.
    let mut stopping: Option<(Client, Instant)> = None;
    let mut said_waiting = false;
    loop {
        if interrupted.load(Ordering::Relaxed) && stopping.is_none() {
            // On a connection of its own: this one is busy streaming progress. Its reply is
            // not awaited: this one gets the stopped scrub's report.
            let trust = Trust::for_volume(&args.path);
            let mut other = connect(client.socket(), trust, true)?
                .with_context(|| format!("{} went away", client.socket().display()))?;
            other.send(&Request::ScrubStop)?;
            stopping = Some((other, Instant::now()));
        }
        if let Some((_, since)) = &stopping {
            let waited = since.elapsed();
            if waited >= STOP_WAIT {
                bar.finish();
                bail!(
                    "the server{} did not stop the scrub within {} s of the request; it may \
                     still run (`blockguard status {}`)",
                    client.pid().map_or_else(String::new, |p| format!(" (pid {p})")),
                    STOP_WAIT.as_secs(),
                    args.path.display()
                );
            }
            if waited >= ANSWER_TIMEOUT && !said_waiting {
                said_waiting = true;
                crate::log::line(&format!(
                    "blockguard: waiting for the server{} to stop the scrub (Ctrl-C again quits at once)",
                    client.pid().map_or_else(String::new, |p| format!(" (pid {p})"))
                ));
            }
        }
        match client.recv_timeout(Duration::from_millis(200))? {
            None => {}
            Some(Response::ScrubProgress(p)) => bar.show(&p),
            Some(Response::ScrubDone { report }) => {
                bar.finish();
                return Ok((*report, resumed));
            }
            Some(Response::Error { message, .. }) => {
                bar.finish();
                return Err(anyhow!("{message}"));
            }
            Some(other) => bail!("unexpected reply during a scrub: {other:?}"),
        }
    }
}

/// The progress bar: position in the scrubbed range (holes go by at once).
struct Bar(ProgressBar);

impl Bar {
    fn new() -> Bar {
        Bar(progress(0, "scrub"))
    }

    fn show(&self, p: &ScrubProgress) {
        self.0.set_length(p.end.saturating_sub(p.start));
        self.0.set_position(p.position.saturating_sub(p.start));
        if p.problems > 0 {
            self.0.set_message(format!("{} bad", p.problems));
        }
    }

    fn finish(&self) {
        self.0.finish_and_clear();
    }
}

/// What `scrub --json` prints.
#[derive(Serialize)]
struct Output<'a> {
    /// How the volume was reached: `direct` or `control-socket`.
    via: &'a str,
    /// It went on from a stopped scrub.
    resumed: bool,
    /// Nothing bad found (or, with `--repair`, nothing left unrepaired).
    clean: bool,
    #[serde(flatten)]
    report: &'a ScrubReport,
}

/// Prints the report; returns whether the volume is clean for the exit code.
fn print_report(args: &ScrubArgs, report: &ScrubReport, via: &str, resumed: bool) -> bool {
    let clean = report.is_clean() || (args.repair && report.unrepaired() == 0);
    if args.json {
        let out = Output {
            via,
            resumed,
            clean,
            report,
        };
        match serde_json::to_string_pretty(&out) {
            Ok(text) => println!("{text}"),
            Err(e) => crate::log::line(&format!("blockguard: error: cannot encode the report: {e}")),
        }
        return clean;
    }
    for p in &report.problems {
        println!("bad block {} ({}): {}", p.block, kind_name(p.kind), p.detail);
    }
    let unlisted = report.problem_count - report.problems.len() as u64;
    if unlisted > 0 {
        println!("… and {unlisted} more bad blocks not listed");
    }
    let secs = report.elapsed_secs.max(1e-9);
    // Display only: the rounding of a float does not matter here.
    #[allow(clippy::cast_precision_loss)]
    let mb = report.bytes_read as f64 / 1e6;
    println!(
        "{}: scrubbed bytes {}..{}{}: {} blocks checked, {mb:.1} MB read in {:.2} s ({:.1} MB/s), {} bad, {} repaired",
        report.volume,
        report.start,
        report.position,
        if resumed { " (resumed)" } else { "" },
        report.blocks_checked,
        report.elapsed_secs,
        mb / secs,
        report.problem_count,
        report.repaired
    );
    if report.scarred_sectors > 0 {
        println!(
            "{} metadata sectors damaged with their headers intact (their blocks still read where the data proves its tag), {} healed{}",
            report.scarred_sectors,
            report.sectors_healed,
            if args.repair { "" } else { " (`--repair` heals them)" }
        );
    }
    if report.stopped {
        println!(
            "stopped at byte {} of {}: `blockguard scrub {} --resume` goes on from there",
            report.position,
            report.end,
            args.path.display()
        );
    }
    clean
}

#[cfg(test)]
mod tests {
    use super::parse_rate;

    #[test]
    fn rates_are_megabytes_per_second() {
        assert_eq!(parse_rate("50"), Ok(50_000_000));
        assert_eq!(parse_rate("0.5"), Ok(500_000));
        assert_eq!(parse_rate(".25"), Ok(250_000));
        assert_eq!(parse_rate("1.000001"), Ok(1_000_001));
        assert_eq!(parse_rate("3."), Ok(3_000_000));
        for bad in [
            "0",
            "0.0",
            "",
            ".",
            "-1",
            "1e3",
            "1.0000001",
            "fast",
            "99999999999999999999",
        ] {
            assert!(parse_rate(bad).is_err(), "{bad:?}");
        }
    }
}
