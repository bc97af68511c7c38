//! `blockguard status`: a volume's health, counters and scrub, from the process serving it
//! (through its control socket) or, when nobody holds it, from a read-only open.

use crate::control::client::{reach, Access};
use crate::control::proto::{CopyInfo, ScrubState, StatusInfo};
use crate::info::uuid_string;
use crate::scrub::{load_state, unix_now};
use anyhow::Result;
use blockguard::Volume;
use clap::Args;
use std::path::{Path, PathBuf};

/// Arguments of `status`.
#[derive(Args, Debug)]
pub(crate) struct StatusArgs {
    /// The volume.
    pub(crate) path: PathBuf,
    /// Print JSON.
    #[arg(long)]
    pub(crate) json: bool,
    /// The control socket of the process serving the volume, if it was started with
    /// `--control PATH` (default: the volume's path + ".ctl").
    #[arg(long, value_name = "PATH")]
    pub(crate) control: Option<PathBuf>,
}

/// What every status says about `vol` itself (no server, no scrub).
pub(crate) fn volume_status(vol: &Volume, path: &Path) -> StatusInfo {
    let sb = vol.superblock();
    let path = path.canonicalize().unwrap_or_else(|_| path.to_path_buf());
    let copies = copy_infos(vol);
    StatusInfo {
        protocol: None,
        name: vol.name().to_string(),
        path: path.display().to_string(),
        uuid: uuid_string(&sb.uuid),
        label: sb.label.clone(),
        size: vol.size(),
        block_size: vol.block_size(),
        mode: sb.mode.name().into(),
        profile: vol.profile().name().into(),
        retag: vol
            .retag_status()
            .map(|r| serde_json::to_value(r).unwrap_or_default()),
        read_only: vol.is_read_only(),
        state: None,
        stats: serde_json::to_value(vol.stats()).unwrap_or_default(),
        failed: vol.failure(),
        warnings: vol.warnings().to_vec(),
        server: None,
        scrub: ScrubState::default(),
        health: health_json(vol, &copies),
        copies,
        dirty_regions: vol.dirty_regions(),
        journal: vol.journal().map(|j| {
            serde_json::json!({
                "status": j,
                "replay": vol.recovery_at_open().and_then(|r| r.journal.clone()),
            })
        }),
    }
}

/// [`Volume::health`] as JSON, with its one-word `state` added: the engine's, except that a
/// volume the engine calls healthy is `degraded` while one of its `copies` is not in sync.
fn health_json(vol: &Volume, copies: &[CopyInfo]) -> serde_json::Value {
    let health = vol.health();
    let mut v = serde_json::to_value(&health).unwrap_or_default();
    let state = match health.state() {
        "healthy" if copies.iter().any(|c| !c.in_sync) => "degraded",
        other => other,
    };
    if let Some(map) = v.as_object_mut() {
        map.insert("state".into(), state.into());
    }
    v
}

/// The volume's copies as the control protocol reports them. A copy missing at open is named
/// by the path the member records of the copies present keep for it (the engine stands one
/// of those in for it), or "unknown" when no record names one.
pub(crate) fn copy_infos(vol: &Volume) -> Vec<CopyInfo> {
    let copies = vol.copies();
    let absent = |c: &blockguard::CopyStatus| c.state == blockguard::CopyState::Absent;
    let present: Vec<&str> = copies
        .iter()
        .filter(|c| !absent(c))
        .map(|c| c.path.as_str())
        .collect();
    let records: Vec<_> = if copies.iter().any(absent) {
        present
            .iter()
            .flat_map(|p| crate::common::records_of(Path::new(p)))
            .collect()
    } else {
        Vec::new()
    };
    let recorded = |copy: usize| -> String {
        records
            .iter()
            .filter(|r| usize::from(r.index) == copy)
            .map(|r| r.path.clone())
            // A record naming a copy that is here is no name for the missing one.
            .find(|p| {
                !present
                    .iter()
                    .any(|q| crate::target::same_target(Path::new(p), Path::new(q)).unwrap_or(false))
            })
            .unwrap_or_else(|| "unknown".into())
    };
    copies
        .iter()
        .map(|c| CopyInfo {
            in_sync: c.state == blockguard::CopyState::InSync,
            copy: c.copy,
            path: if absent(c) {
                recorded(c.copy)
            } else {
                c.path.clone()
            },
            state: serde_json::to_value(c.state)
                .ok()
                .and_then(|v| v.as_str().map(str::to_string))
                .unwrap_or_default(),
        })
        .collect()
}

/// `blockguard status`.
pub(crate) fn run(args: &StatusArgs) -> Result<()> {
    let info = match reach(&args.path, args.control.as_deref(), true)? {
        Access::Socket(_, info) => *info,
        Access::Direct(vol) => {
            let mut info = volume_status(&vol, &args.path);
            info.state = Some(crate::info::summary(vol.superblock(), &args.path).state.into());
            if let Some(saved) = load_state(&args.path, &vol) {
                info.scrub = ScrubState {
                    running: false,
                    progress: None,
                    last: Some(saved.report),
                    last_ended: Some(saved.ended),
                    resume_from: saved.resume_from,
                };
            }
            info
        }
    };
    if args.json {
        println!("{}", serde_json::to_string_pretty(&info)?);
    } else {
        print_status(&info);
    }
    Ok(())
}

fn print_status(s: &StatusInfo) {
    println!("volume:     {}", s.path);
    println!("uuid:       {}", s.uuid);
    if !s.label.is_empty() {
        println!("label:      {}", s.label);
    }
    println!(
        "size:       {} bytes ({} blocks of {} bytes)",
        s.size,
        s.size / u64::from(s.block_size.max(1)),
        s.block_size
    );
    println!("mode:       {} (tag profile {})", s.mode, s.profile);
    match &s.server {
        Some(srv) => {
            let conns = match (srv.connections, srv.connections_total) {
                (Some(open), Some(total)) => format!(", {open} connections ({total} since start)"),
                _ => String::new(),
            };
            println!(
                "server:     blockguard {} (pid {}) on {}{conns}, up {} s",
                srv.kind, srv.pid, srv.serving, srv.uptime_secs
            );
            println!("control:    {}", srv.control);
        }
        None => println!(
            "server:     none (not in use; opened read-only for this report{})",
            s.state
                .as_deref()
                .map_or(String::new(), |st| format!(", superblock state {st}"))
        ),
    }
    println!(
        "access:     {}",
        if s.read_only { "read-only" } else { "read-write" }
    );
    print_health(s);
    for c in &s.copies {
        println!("copy {}:     {} ({})", c.copy, c.path, c.state.replace('-', " "));
    }
    if !s.copies.is_empty() || s.dirty_regions > 0 {
        println!(
            "dirty:      {} regions marked in the write-intent map",
            s.dirty_regions
        );
    }
    if let Some(j) = &s.journal {
        print_journal(j);
    }
    if let Some(counters) = s.stats.as_object() {
        let list: Vec<String> = counters.iter().map(|(k, v)| format!("{k} {v}")).collect();
        println!("counters:   {}", list.join(", "));
    }
    print_scrub(&s.scrub);
    for w in &s.warnings {
        println!("warning:    {w}");
    }
}

/// The journal's fill and the replay at open, from `status`'s JSON.
fn print_journal(j: &serde_json::Value) {
    let n = |v: &serde_json::Value, k: &str| v.get(k).and_then(serde_json::Value::as_u64).unwrap_or(0);
    let st = &j["status"];
    println!(
        "journal:    {} of {} bytes of log in use ({} segments a crash could need), {} segments written; atomic writes up to {} bytes",
        n(st, "used"),
        n(&st["limits"], "log_len"),
        n(st, "segments_needed"),
        n(st, "segments_written"),
        n(&st["limits"], "max_atomic")
    );
    let r = &j["replay"];
    if r.is_object() {
        println!(
            "replayed:   {} segments ({} blocks) at open; stopped: {}{}",
            n(r, "segments_replayed"),
            n(r, "blocks_replayed"),
            r["stopped"].as_str().unwrap_or(""),
            match n(r, "dropped_segments") {
                0 => String::new(),
                d => format!("; DROPPED {d} later segments (blocks {})", r["dropped_blocks"]),
            }
        );
    }
}

fn print_health(s: &StatusInfo) {
    let h = &s.health;
    let state = h.get("state").and_then(|v| v.as_str()).unwrap_or("");
    match &s.failed {
        Some(why) => {
            let how = if h
                .pointer("/failure/resumable")
                .and_then(serde_json::Value::as_bool)
                == Some(false)
            {
                "until it is reopened"
            } else {
                "until `blockguard resume` succeeds or it is reopened"
            };
            println!("health:     FAILED: {why} (writes and flushes are refused {how})");
        }
        None if state == "suspended" => {
            let block = h
                .pointer("/suspension/block")
                .map_or(String::new(), ToString::to_string);
            println!(
                "health:     writes SUSPENDED by the read-only error policy (block {block} has no good copy); \
                 `blockguard resume` clears it"
            );
        }
        // A failure the server does not describe in `failed`.
        None if state.starts_with("failed") => println!("health:     FAILED ({state})"),
        None => match degraded(s).as_slice() {
            [] if state == "healthy" || state.is_empty() => println!("health:     ok"),
            [] => println!("health:     {state}"),
            why => println!("health:     degraded: {}", why.join("; ")),
        },
    }
    if let Some(policy) = h.get("error_policy").and_then(|v| v.as_str()) {
        println!("on error:   {policy}");
    }
    let unrepairable = h
        .get("unrepairable")
        .and_then(serde_json::Value::as_u64)
        .unwrap_or(0);
    if unrepairable > 0 {
        println!(
            "bad blocks: {unrepairable} with no good copy: {}",
            h.get("unrepairable_blocks")
                .map_or(String::new(), ToString::to_string)
        );
    }
    let lost = h
        .get("lost_writes")
        .and_then(serde_json::Value::as_u64)
        .unwrap_or(0);
    if lost > 0 {
        println!(
            "lost:       {lost} acknowledged block writes known lost (`blockguard resume` reports them)"
        );
    }
}

/// What keeps the volume from full health while it works: copies not in sync (named), blocks
/// with no good copy, acknowledged writes lost.
fn degraded(s: &StatusInfo) -> Vec<String> {
    let mut why: Vec<String> = s
        .copies
        .iter()
        .filter(|c| !c.in_sync)
        .map(|c| {
            let how = match c.state.as_str() {
                "absent" => "is missing",
                "catching-up" => "is being resynchronized",
                _ => "is out of sync",
            };
            format!("copy {} ({}) {how}", c.copy, c.path)
        })
        .collect();
    let count = |key: &str| s.health.get(key).and_then(serde_json::Value::as_u64).unwrap_or(0);
    if count("unrepairable") > 0 {
        why.push(format!("{} blocks with no good copy", count("unrepairable")));
    }
    if count("lost_writes") > 0 {
        why.push(format!("{} acknowledged writes lost", count("lost_writes")));
    }
    why
}

fn print_scrub(scrub: &ScrubState) {
    if let Some(p) = scrub.progress.as_ref().filter(|_| scrub.running) {
        let span = p.end.saturating_sub(p.start).max(1);
        let done = p.position.saturating_sub(p.start);
        println!(
            "scrub:      running, {}% (byte {} of {}), {} blocks checked, {} bad, {} repaired, {:.0} s",
            done.saturating_mul(100) / span,
            p.position,
            p.end,
            p.blocks_checked,
            p.problems,
            p.repaired,
            p.elapsed_secs
        );
    } else if scrub.running {
        println!("scrub:      starting");
    }
    match &scrub.last {
        Some(r) => {
            let ago = scrub.last_ended.map_or(String::new(), |t| {
                format!(" {} s ago", unix_now().saturating_sub(t))
            });
            let how = if r.stopped {
                format!("stopped at byte {}", r.position)
            } else {
                "finished".into()
            };
            println!(
                "last scrub: {how}{ago}: bytes {}..{}, {} blocks checked, {} bad, {} repaired",
                r.start, r.position, r.blocks_checked, r.problem_count, r.repaired
            );
            for p in &r.problems {
                println!("  bad block {} ({}): {}", p.block, kind_name(p.kind), p.detail);
            }
            if r.problems.len() as u64 != r.problem_count {
                println!("  … and {} more", r.problem_count - r.problems.len() as u64);
            }
        }
        None if !scrub.running => println!("last scrub: none recorded"),
        None => {}
    }
    if let Some(at) = scrub.resume_from {
        println!("resume:     `blockguard scrub --resume` goes on from byte {at}");
    }
}

/// How a problem kind reads in text output.
pub(crate) fn kind_name(kind: blockguard::ScrubProblemKind) -> &'static str {
    match kind {
        blockguard::ScrubProblemKind::Corrupt => "corrupt",
        blockguard::ScrubProblemKind::Unreadable => "unreadable",
    }
}
