//! `blockguard mirror`: the copies of a volume — list them, add one, remove one, replace one,
//! and resynchronize copies that fell behind. `list` and `resync` also work on a volume being
//! served or mounted, through its control socket (the resync runs in the server, clients
//! going on); membership changes need the volume closed.

use crate::common::{progress, PathOnce};
use crate::control::client::{reach, Access, Client};
use crate::control::proto::{CopyInfo, FollowRequest, Request, Response};
use anyhow::{bail, Context, Result};
use blockguard::blockguard_backend::{Backend, FileBackend, FileOptions};
use blockguard::format::MAX_MEMBERS;
use blockguard::{ResyncReport, Volume};
use clap::{Args, Subcommand};
use std::path::{Path, PathBuf};
use std::sync::Arc;

/// Arguments of `mirror`.
#[derive(Args, Debug)]
pub(crate) struct MirrorArgs {
    #[command(subcommand)]
    pub(crate) action: Action,
    /// The control socket of the process serving the volume, if it was started with
    /// `--control PATH` (default: the volume's path + ".ctl").
    #[arg(long, value_name = "PATH", global = true)]
    pub(crate) control: Option<PathBuf>,
}

/// What `mirror` does.
#[derive(Subcommand, Debug)]
pub(crate) enum Action {
    /// List the copies of a volume and whether each holds its current contents.
    List {
        /// The volume (any copy's path).
        volume: PathBuf,
        /// Print JSON.
        #[arg(long)]
        json: bool,
    },
    /// Add a copy (a new file, created with the volume's size, or an empty device) and build
    /// it from the volume, with a progress bar. A plain volume becomes a set of two.
    Add {
        /// The volume (any copy's path).
        volume: PathBuf,
        /// The new copy.
        copy: PathBuf,
        /// Use a device or file that is not empty (its contents are overwritten).
        #[arg(long)]
        force: bool,
    },
    /// Remove a copy from the set (it is left as it was, and is no longer part of the set).
    /// The last copy left becomes a plain volume.
    Remove {
        /// The volume (any copy's path).
        volume: PathBuf,
        /// The copy to remove: its path, or its number as `mirror list` shows it.
        copy: String,
    },
    /// Replace a copy by a new one: the new one is built first, then the old one removed. A
    /// copy that is missing or out of sync is removed first (it holds nothing the set needs);
    /// so is an in-sync one in a set of three copies, the most there can be, if another copy
    /// is in sync (redundancy is reduced until the new copy is built).
    Replace {
        /// The volume (any copy's path).
        volume: PathBuf,
        /// The copy to replace: its path or number.
        old: String,
        /// The new copy.
        new: PathBuf,
        /// Use a device or file that is not empty.
        #[arg(long)]
        force: bool,
    },
    /// Copy to every copy that fell behind the groups written since, then mark it in sync.
    Resync {
        /// The volume (any copy's path).
        volume: PathBuf,
        /// Print JSON.
        #[arg(long)]
        json: bool,
    },
}

/// `blockguard mirror`.
pub(crate) fn run(args: &MirrorArgs) -> Result<()> {
    let control = args.control.as_deref();
    match &args.action {
        Action::List { volume, json } => list(volume, control, *json),
        Action::Add { volume, copy, force } => {
            let vol = closed_volume(volume, control, "add a copy")?;
            let copies = crate::status::copy_infos(&vol);
            if copies.len() >= MAX_MEMBERS {
                bail!(
                    "{} has {MAX_MEMBERS} copies already, the most a set can have: replace one \
                     (`blockguard mirror replace`) or remove one first",
                    volume.display()
                );
            }
            check_target(&vol, &copies, None, copy, *force)?;
            let (vol, report) = add(vol, copy)?;
            vol.close()?;
            say!(
                "added {}: {} groups ({} bytes) copied",
                copy.display(),
                report.groups,
                report.bytes_copied
            );
            Ok(())
        }
        Action::Remove { volume, copy } => {
            let vol = closed_volume(volume, control, "remove a copy")?;
            let copies = crate::status::copy_infos(&vol);
            let role = resolve(&copies, volume, copy)?;
            let vol = vol
                .remove_member(role)
                .with_context(|| format!("removing copy {role}"))?;
            vol.close()?;
            say!("removed copy {role} ({})", copies[role].path);
            Ok(())
        }
        Action::Replace {
            volume,
            old,
            new,
            force,
        } => {
            let vol = closed_volume(volume, control, "replace a copy")?;
            replace(vol, volume, old, new, *force)
        }
        Action::Resync { volume, json } => {
            let vol = match reach(volume, control, false)? {
                Access::Socket(client, _) => return resync_served(client, *json),
                Access::Direct(vol) => vol,
            };
            let pb = progress(vol.geometry().groups, "resync");
            let report = vol
                .resync(&mut |done, total| {
                    pb.set_length(total.max(1));
                    pb.set_position(done);
                })
                .doing("resynchronize", volume)?;
            pb.finish_and_clear();
            let copies = crate::status::copy_infos(&vol);
            vol.close()?;
            print_resync(&report, *json, &copies)
        }
    }
}

/// Prints what a resync did; an error if a copy is missing (`copies`: the set afterwards),
/// which no resync can bring back.
fn print_resync(report: &ResyncReport, json: bool, copies: &[CopyInfo]) -> Result<()> {
    let missing: Vec<&CopyInfo> = copies.iter().filter(|c| c.state == "absent").collect();
    if json {
        say!("{}", serde_json::to_string_pretty(report)?);
    } else if report.members.is_empty() && missing.is_empty() {
        say!("every copy is in sync: nothing to do");
    } else if report.members.is_empty() {
        say!("every copy present is in sync");
    } else {
        for (copy, why) in &report.failed {
            say!("copy {copy} could not be resynchronized and stays out of sync: {why}");
        }
        say!(
            "resynchronized copies {:?} from copy {}: {} groups, {} bytes each",
            report.members,
            report.source.unwrap_or_default(),
            report.groups,
            report.bytes_copied
        );
    }
    if let Some(c) = missing.first() {
        bail!(
            "copy {} ({}) is missing: it cannot be resynchronized until it is back at that path, \
             or replaced (`blockguard mirror replace VOLUME {} NEW`); the volume runs with one \
             copy less meanwhile",
            c.copy,
            c.path,
            c.copy
        );
    }
    Ok(())
}

/// Opens `volume` read-write for a membership change, which needs it closed everywhere else:
/// a volume being served is refused with what to do.
fn closed_volume(volume: &Path, control: Option<&Path>, what: &str) -> Result<Volume> {
    match reach(volume, control, false)? {
        Access::Direct(vol) => Ok(vol),
        Access::Socket(_, status) => {
            let who = status.server.map_or_else(String::new, |s| {
                format!(" by blockguard {} (pid {})", s.kind, s.pid)
            });
            bail!(
                "{} is in use{who}: to {what}, stop it first (membership changes rewrite every \
                 copy's superblock with the volume closed); `mirror list` and `mirror resync` work \
                 while it is served",
                volume.display()
            )
        }
    }
}

/// `mirror resync` through the control socket of the process serving the volume.
fn resync_served(mut client: Client, json: bool) -> Result<()> {
    client.send(&Request::MirrorResync(FollowRequest { follow: true }))?;
    let mut pb = None;
    loop {
        match client.recv()? {
            Response::MirrorResyncProgress { done, total } => {
                let bar = pb.get_or_insert_with(|| progress(total, "resync"));
                bar.set_length(total.max(1));
                bar.set_position(done);
            }
            Response::MirrorResyncDone { report } => {
                if let Some(bar) = pb {
                    bar.finish_and_clear();
                }
                let report: ResyncReport = serde_json::from_value(report)
                    .context("a resync report this client does not understand")?;
                let copies = match client.ask(&Request::MirrorList)? {
                    Response::MirrorList { copies } => copies,
                    other => bail!("unexpected reply to mirror-list: {other:?}"),
                };
                return print_resync(&report, json, &copies);
            }
            Response::Error { message, .. } => bail!("resync: {message}"),
            other => bail!("unexpected reply to resync: {other:?}"),
        }
    }
}

fn list(volume: &Path, control: Option<&Path>, json: bool) -> Result<()> {
    // The server's view when the volume is served: it knows which copies failed or are being
    // resynchronized; the superblocks alone may be behind it.
    let copies = match crate::control::client::connect_to(volume, control)? {
        Some(mut client) => match client.ask(&Request::MirrorList)? {
            Response::MirrorList { copies } => copies,
            other => bail!("unexpected reply to mirror-list: {other:?}"),
        },
        None => crate::status::copy_infos(&crate::common::open_unlocked(volume)?),
    };
    if json {
        say!("{}", serde_json::to_string_pretty(&copies)?);
    } else if copies.is_empty() {
        say!("{}: a plain volume (one copy)", volume.display());
    } else {
        for c in &copies {
            say!("copy {}: {} ({})", c.copy, c.path, c.state.replace('-', " "));
        }
    }
    Ok(())
}

/// The role of the copy named `copy`: a number, or a path naming the same file as a copy (a
/// missing copy: its recorded path).
fn resolve(copies: &[CopyInfo], volume: &Path, copy: &str) -> Result<usize> {
    if copies.is_empty() {
        bail!(
            "{} is a plain volume (one copy): there is no copy to remove or replace; `blockguard mirror add` makes a set",
            volume.display()
        );
    }
    if let Ok(n) = copy.parse::<usize>() {
        if n < copies.len() {
            return Ok(n);
        }
        bail!(
            "there is no copy {n}: the set has copies 0 to {}",
            copies.len() - 1
        );
    }
    copies
        .iter()
        .position(|c| crate::target::same_target(Path::new(&c.path), Path::new(copy)).unwrap_or(false))
        .with_context(|| format!("{copy} is not a copy of this volume (see `blockguard mirror list`)"))
}

/// `mirror replace`: builds `new` in place of copy `old` of `vol`. A copy that is not in sync
/// holds nothing the set needs: it is removed first. An in-sync one is removed once the new
/// copy is built, except in a set of [`MAX_MEMBERS`], which has no room for another: there
/// it is removed first, if another copy is in sync, with redundancy reduced meanwhile.
fn replace(vol: Volume, volume: &Path, old: &str, new: &Path, force: bool) -> Result<()> {
    let copies = crate::status::copy_infos(&vol);
    let role = resolve(&copies, volume, old)?;
    let old_path = copies[role].path.clone();
    let old_in_sync = copies[role].in_sync;
    let remove_first = !old_in_sync || copies.len() >= MAX_MEMBERS;
    if remove_first && !copies.iter().any(|c| c.copy != role && c.in_sync) {
        bail!(
            "copy {role} ({old_path}) is the only copy in sync, and the set has {} copies, the most \
             it can have: it cannot be removed before its replacement is built. Resynchronize \
             another copy first (`blockguard mirror resync`), or remove one that is not in sync",
            copies.len()
        );
    }
    check_target(&vol, &copies, Some(role), new, force)?;
    let (vol, report) = if remove_first {
        let vol = vol
            .remove_member(role)
            .with_context(|| format!("removing copy {role} ({old_path})"))?;
        if old_in_sync {
            say!(
                "removed copy {role} ({old_path}) first (a set has at most {MAX_MEMBERS} copies): \
                 redundancy is reduced until {} is built",
                new.display()
            );
        }
        add(vol, new).with_context(|| {
            format!(
                "copy {role} ({old_path}) was removed from the set, but {} could not be added \
                 (`blockguard mirror add` it again)",
                new.display()
            )
        })?
    } else {
        let (vol, report) = add(vol, new)?;
        let vol = vol.remove_member(role).with_context(|| {
            format!(
                "removing copy {role} ({old_path}) once {} was built",
                new.display()
            )
        })?;
        (vol, report)
    };
    let now = crate::status::copy_infos(&vol)
        .iter()
        .find(|c| crate::target::same_target(Path::new(&c.path), new).unwrap_or(false))
        .map(|c| c.copy);
    vol.close()?;
    say!(
        "replaced copy {role} ({old_path}) by {}{}: {} groups copied",
        new.display(),
        now.map_or(String::new(), |n| format!(" (now copy {n})")),
        report.groups
    );
    Ok(())
}

/// Every refusal of a new copy, before anything is written to it: the target is a copy of the
/// set already (by any name, a missing copy's recorded path, or by its own superblock), the
/// set has a missing copy other than `replacing` (adding a copy then would mistake the
/// stand-in for it), the target is in use by another process, or holds data without `force`.
fn check_target(
    vol: &Volume,
    copies: &[CopyInfo],
    replacing: Option<usize>,
    copy: &Path,
    force: bool,
) -> Result<()> {
    let existing: Vec<String> = if copies.is_empty() {
        vec![vol.name().to_string()]
    } else {
        copies.iter().map(|c| c.path.clone()).collect()
    };
    for p in &existing {
        if crate::target::same_target(Path::new(p), copy)? {
            bail!("{} is already a copy of this volume", copy.display());
        }
    }
    if let Some(c) = copies
        .iter()
        .find(|c| c.state == "absent" && Some(c.copy) != replacing)
    {
        bail!(
            "copy {} ({}) is missing: replace it (`blockguard mirror replace VOLUME {} NEW`) or \
             remove it (`blockguard mirror remove VOLUME {}`) before adding another copy",
            c.copy,
            c.path,
            c.copy,
            c.copy
        );
    }
    let remote = crate::remote::is_remote(copy);
    if !remote && !copy.exists() {
        return Ok(());
    }
    // Locked like the volume itself: a target another process holds is refused, `force` or not.
    let backend = crate::remote::open_store(copy, &FileOptions::default())?;
    let set = vol.superblock().mirror.as_ref().map(|m| m.set);
    if let Some((_, role)) = mirror_role(&*backend).filter(|(s, _)| Some(*s) == set) {
        bail!(
            "{} is copy {role} of this set (by another name): see `blockguard mirror list`; a copy \
             that fell behind is brought back by `blockguard mirror resync`",
            copy.display()
        );
    }
    if !force {
        let is_file = !remote && std::fs::metadata(copy).is_ok_and(|m| m.is_file());
        crate::target::refuse_if_holding_data(&*backend, is_file)?;
    }
    Ok(())
}

/// The mirror set and role `backend`'s superblock names, if it holds a member of a set.
fn mirror_role(backend: &dyn Backend) -> Option<([u8; 16], u8)> {
    let mut region = vec![0u8; usize::try_from(blockguard::format::SB_REGION).ok()?];
    backend.read_at(&mut region, 0).ok()?;
    let (sb, _) = blockguard::Superblock::decode(&region).ok()?;
    sb.mirror.map(|m| (m.set, m.role))
}

/// Adds `copy` (checked by [`check_target`]) to `vol`, with a progress bar.
fn add(vol: Volume, copy: &Path) -> Result<(Volume, ResyncReport)> {
    let len = vol.geometry().backing_len;
    let backend = prepare_target(copy, len)?;
    let pb = progress(vol.geometry().groups, "copy");
    let result = vol
        .add_member(backend, &mut |done, total| {
            pb.set_length(total.max(1));
            pb.set_position(done);
        })
        .with_context(|| format!("adding {} as a copy", copy.display()));
    pb.finish_and_clear();
    result
}

/// Opens (creating a file if missing) the new copy's target of at least `len` bytes, empty:
/// a file is emptied and sized; a device (refused if smaller) is zeroed. [`check_target`]
/// has refused what must not be overwritten.
fn prepare_target(copy: &Path, len: u64) -> Result<Arc<dyn Backend>> {
    if crate::remote::is_remote(copy) {
        let backend = crate::remote::open_remote(copy, false)?;
        if backend.len() < len {
            bail!(
                "{} holds {} bytes; a copy of this volume needs {len}",
                copy.display(),
                backend.len()
            );
        }
        backend
            .zero_range(0, backend.len())
            .with_context(|| format!("zeroing {}", copy.display()))?;
        return Ok(Arc::new(backend));
    }
    let exists = copy.exists();
    let is_file = !exists || std::fs::metadata(copy).is_ok_and(|m| m.is_file());
    if exists && !is_file {
        // A device is measured before anything is written (a file is sized to fit).
        let backend = FileBackend::open(copy, &FileOptions::default())?;
        if backend.len() < len {
            bail!(
                "{} holds {} bytes; a copy of this volume needs {len}",
                copy.display(),
                backend.len()
            );
        }
    }
    if !exists {
        std::fs::OpenOptions::new()
            .write(true)
            .create_new(true)
            .open(copy)
            .with_context(|| format!("cannot create {}", copy.display()))?;
        crate::target::sync_parent_dir(copy)?;
    }
    if is_file {
        crate::target::empty_file(copy, len)?;
    }
    let abs = std::fs::canonicalize(copy).with_context(|| format!("resolving {}", copy.display()))?;
    let backend = FileBackend::open(&abs, &FileOptions::default())?;
    if !is_file {
        backend
            .zero_range(0, backend.len())
            .with_context(|| format!("zeroing {}", abs.display()))?;
    }
    Ok(Arc::new(backend))
}
