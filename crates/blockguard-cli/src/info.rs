//! `blockguard info` and `blockguard dump`: what a volume is and where its blocks live.

use crate::common::open_unlocked;
use anyhow::{bail, Result};
use blockguard::blockguard_backend::{FileOptions, LockMode};
use blockguard::{BlockReport, Superblock, Volume};
use clap::Args;
use serde::Serialize;
use std::fmt::Write;
use std::path::{Path, PathBuf};

/// Arguments of `info` and `dump`.
#[derive(Args, Debug)]
pub(crate) struct InfoArgs {
    /// The volume.
    pub(crate) path: PathBuf,
    /// Also show where these data blocks and their tags live (dump).
    // Signed, so that a negative number reaches the range check and its message instead of
    // clap's "unexpected argument '-1'".
    #[arg(long = "block", value_name = "N", allow_negative_numbers = true)]
    pub(crate) blocks: Vec<i64>,
    /// Print JSON.
    #[arg(long)]
    pub(crate) json: bool,
}

/// The superblock and geometry, as `info --json` prints them.
#[derive(Serialize)]
pub(crate) struct Summary {
    pub(crate) path: String,
    pub(crate) version: u32,
    pub(crate) uuid: String,
    pub(crate) label: String,
    pub(crate) size: u64,
    pub(crate) block_size: u32,
    pub(crate) mode: blockguard::Mode,
    pub(crate) profile: blockguard::Profile,
    /// The profile needs a key (`--key-file`) to open the volume.
    pub(crate) keyed: bool,
    /// What a read of a block with no good copy does besides failing (`eio`, `read-only`,
    /// `continue`).
    pub(crate) error_policy: blockguard::ErrorPolicy,
    /// Bytes of each tag slot: the profile's tag size, or more with `--tag-room`.
    pub(crate) tag_size: u32,
    pub(crate) created: u64,
    pub(crate) compat: u64,
    pub(crate) ro_compat: u64,
    pub(crate) incompat: u64,
    /// `clean`, or `in-use` (open for writing, or not closed cleanly).
    pub(crate) state: &'static str,
    pub(crate) geometry: blockguard::Geometry,
    /// `journal` mode: the journal's sizes and the largest atomic write.
    pub(crate) journal: Option<blockguard::JournalLimits>,
    /// An online re-tag in progress (`blockguard retag`): its target and cursor.
    pub(crate) retag: Option<blockguard::format::Retag>,
}

/// A UUID in its usual text form (8-4-4-4-12 hex digits).
pub(crate) fn uuid_string(u: &[u8; 16]) -> String {
    let mut h = String::with_capacity(32);
    for b in u {
        // Writing to a `String` cannot fail.
        let _ = write!(h, "{b:02x}");
    }
    format!(
        "{}-{}-{}-{}-{}",
        &h[0..8],
        &h[8..12],
        &h[12..16],
        &h[16..20],
        &h[20..32]
    )
}

/// What `info --json` (and `format --json`) prints about a volume.
pub(crate) fn summary(sb: &Superblock, path: &Path) -> Summary {
    Summary {
        path: path.display().to_string(),
        version: sb.version,
        uuid: uuid_string(&sb.uuid),
        label: sb.label.clone(),
        size: sb.geometry.size(),
        block_size: sb.geometry.block_size,
        mode: sb.mode,
        profile: sb.profile,
        keyed: sb.profile.is_keyed(),
        error_policy: sb.error_policy,
        tag_size: sb.geometry.tag_size,
        created: sb.created,
        compat: sb.compat,
        ro_compat: sb.ro_compat,
        incompat: sb.incompat,
        state: match sb.state {
            blockguard::format::VolumeState::Clean => "clean",
            blockguard::format::VolumeState::InUse => "in-use",
        },
        geometry: sb.geometry,
        journal: blockguard::journal_limits(&sb.geometry),
        retag: sb.retag,
    }
}

#[derive(Serialize)]
struct Dump {
    #[serde(flatten)]
    summary: Summary,
    warnings: Vec<String>,
    blocks: Vec<BlockReport>,
}

/// `blockguard info` and `blockguard dump`.
pub(crate) fn run(args: &InfoArgs) -> Result<()> {
    let dump = match open_unlocked(&args.path) {
        Ok(vol) => Dump {
            blocks: inspect_blocks(&vol, args)?,
            summary: summary(vol.superblock(), &args.path),
            warnings: vol.warnings().to_vec(),
        },
        // A keyed volume is described without its key (or a re-tag's key, or the confirmation
        // of a re-tag away from the key); only its blocks need them.
        Err(e) if args.blocks.is_empty() && key_missing(&e) => {
            let unlocked = FileOptions {
                read_only: true,
                lock: LockMode::None,
                ..FileOptions::default()
            };
            let backend = crate::remote::open_store(&args.path, &unlocked)?;
            // A volume split over two devices keeps its superblocks on the metadata device.
            let (sb, warnings) = match crate::common::split_metadata(&*backend, &unlocked)? {
                Some(meta) => Volume::read_split_superblock(backend, meta)?,
                None => Volume::read_superblock(&*backend)?,
            };
            Dump {
                summary: summary(&sb, &args.path),
                warnings,
                blocks: Vec::new(),
            }
        }
        Err(e) => return Err(e),
    };
    if args.json {
        say!("{}", serde_json::to_string_pretty(&dump)?);
        return Ok(());
    }
    print_summary(&dump.summary);
    for w in &dump.warnings {
        say!("warning:       {w}");
    }
    for b in &dump.blocks {
        print_block(b);
    }
    Ok(())
}

/// True if `e` says a keyed volume was opened without its key.
fn key_missing(e: &anyhow::Error) -> bool {
    e.chain().any(|c| {
        matches!(
            c.downcast_ref::<blockguard::Error>(),
            Some(blockguard::Error::Key {
                problem: blockguard::tag::KeyError::Missing { .. }
                    | blockguard::tag::KeyError::RetagMissing { .. }
                    | blockguard::tag::KeyError::RetagUnconfirmed { .. },
                ..
            })
        )
    })
}

/// Where each block asked for with `--block` and its tags live; refuses a block past the end.
fn inspect_blocks(vol: &Volume, args: &InfoArgs) -> Result<Vec<BlockReport>> {
    let count = vol.geometry().data_blocks;
    let mut blocks = Vec::new();
    for &asked in &args.blocks {
        // Answered in blocks, as asked: the engine's range error speaks in bytes.
        let Some(b) = u64::try_from(asked).ok().filter(|&b| b < count) else {
            bail!(
                "{}: there is no block {asked}: the volume has {count} blocks, numbered 0 to {}",
                args.path.display(),
                count.saturating_sub(1)
            );
        };
        blocks.push(vol.inspect_block(b)?);
    }
    Ok(blocks)
}

/// Prints the superblock and geometry as `info` shows them.
fn print_summary(s: &Summary) {
    let g = &s.geometry;
    say!("volume:        {}", s.path);
    say!("format:        blockguard v{}", s.version);
    say!("uuid:          {}", s.uuid);
    if !s.label.is_empty() {
        say!("label:         {}", s.label);
    }
    say!(
        "size:          {} bytes ({} blocks of {} bytes)",
        s.size,
        g.data_blocks,
        g.block_size
    );
    say!("mode:          {}", s.mode.name());
    if let Some(caveat) = mode_caveat(s.mode) {
        say!("               {caveat}");
    }
    if let Some(j) = &s.journal {
        say!(
            "journal:       {} bytes at byte {} ({} bytes of log); write requests of up to {} bytes are atomic across a crash, larger ones are split",
            j.journal_len,
            g.journal_offset(),
            j.log_len,
            j.max_atomic
        );
    }
    say!(
        "error policy:  {} ({})",
        s.error_policy.name(),
        crate::common::error_policy_meaning(s.error_policy)
    );
    let room = if s.tag_size as usize == s.profile.tag_size() {
        String::new()
    } else {
        format!(", in {}-byte tag slots", s.tag_size)
    };
    say!(
        "tag profile:   {} ({} bytes per block{room}{})",
        s.profile.name(),
        s.profile.tag_size(),
        if s.keyed {
            "; keyed: opening needs --key-file"
        } else {
            ""
        }
    );
    print_retag(s);
    say!(
        "groups:        {} of {} data blocks + 2 metadata blocks, first at byte {}",
        g.groups,
        g.group_blocks,
        g.first_group_offset
    );
    say!(
        "backing:       {} bytes, backup superblock at byte {}",
        g.backing_len,
        g.backup_sb_offset
    );
    say!(
        "features:      compat {:#x} ro_compat {:#x} incompat {:#x}",
        s.compat,
        s.ro_compat,
        s.incompat
    );
    say!(
        "state:         {}",
        if s.state == "clean" {
            "clean"
        } else {
            "in use (open for writing, or not closed cleanly: the next read-write open, or `blockguard recover`, settles it)"
        }
    );
}

/// Prints where one block and its tags live, and what each tag slot holds (`dump --block`).
fn print_block(b: &BlockReport) {
    let l = &b.location;
    say!(
        "block {}: group {} index {}, data at byte {}, tags at bytes {} and {} (metadata sector {}){}",
        l.block,
        l.group,
        l.index,
        l.data_offset,
        l.meta_offsets[0] + u64::from(l.tag_offset_in_meta),
        l.meta_offsets[1] + u64::from(l.tag_offset_in_meta),
        b.sector,
        if b.staged { " (newer version staged)" } else { "" }
    );
    for (i, slot) in b.slots.iter().enumerate() {
        say!(
            "  slot {i}, sector at byte {}: {}{}{}",
            l.meta_offsets[i] + u64::from(b.sector) * 512,
            slot.state,
            slot.generation
                .map(|g| format!(", generation {g}"))
                .unwrap_or_default(),
            slot.tag
                .as_ref()
                .map(|t| format!(", tag {t}"))
                .unwrap_or_default()
        );
    }
    say!("  a read accepts: {}", b.accepted.join(" or "));
}

/// What a mode does not protect against, said plainly by `info`.
fn mode_caveat(mode: blockguard::Mode) -> Option<&'static str> {
    match mode {
        blockguard::Mode::Rebuild => Some(
            "after a crash, the tags of the regions written in the last seconds are recomputed from \
             the data: damage that happened in those regions during the crash window (a torn \
             block, a lost or misdirected write) cannot be detected",
        ),
        blockguard::Mode::None => {
            Some("no crash protection: a crash can make intact blocks fail verification")
        }
        _ => None,
    }
}

/// The line about a re-tag in progress, if there is one.
fn print_retag(s: &Summary) {
    let Some(r) = &s.retag else {
        return;
    };
    say!(
        "re-tag:        to {} in progress, {} of {} groups done (`blockguard retag {} --profile {}` resumes it{})",
        r.target.name(),
        r.cursor,
        s.geometry.groups,
        s.path,
        r.target.name(),
        if r.target.is_keyed() {
            "; opening needs --new-key-file too"
        } else {
            ""
        }
    );
}
