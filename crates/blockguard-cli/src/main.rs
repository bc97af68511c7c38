// Lint policy, the same in every crate of the workspace: clippy's pedantic group on, minus a
// short list that would add noise without catching bugs here.
#![warn(missing_docs, unreachable_pub, clippy::pedantic)]
#![allow(
    // Pure getters are obvious; what must not be ignored is already a `Result` or `#[must_use]` type.
    clippy::must_use_candidate,
    // Errors are typed enums whose variants document themselves.
    clippy::missing_errors_doc,
    // `volume::VolumeStats` and the like read better at use sites outside the module.
    clippy::module_name_repetitions,
)]

//! `blockguard`: per-block integrity for files and block devices.

/// `println!` for the program's results: a reader that went away (`blockguard info | head`)
/// ends the program quietly, as it would a C tool killed by SIGPIPE, instead of a panic.
macro_rules! say {
    ($($arg:tt)*) => {
        $crate::log::stdout_line(&format!($($arg)*))
    };
}

mod autoresync;
mod check;
mod common;
mod control;
mod format;
mod holder;
mod info;
mod interrupt;
mod log;
mod mirror;
mod mount;
mod recover;
mod remote;
mod resume;
mod retag;
mod scrub;
mod serve;
mod sidecar;
mod status;
mod target;
mod transfer;

use clap::{Parser, Subcommand};
use std::process::ExitCode;

/// Per-block end-to-end integrity for files and block devices.
#[derive(Parser, Debug)]
#[command(name = "blockguard", version, about)]
struct Cli {
    #[command(subcommand)]
    command: Command,
    /// The key of a volume with a keyed tag profile (hmac-sha256, blake3-keyed): a file of 32
    /// raw bytes or 64 hex digits (`openssl rand -hex 32 > KEY`). Needed by `format` and by
    /// every command that opens such a volume; refused for the other profiles. The key is
    /// never written to the volume nor logged.
    #[arg(long, global = true, value_name = "FILE")]
    key_file: Option<std::path::PathBuf>,
    /// The key of the keyed profile a re-tag switches to (`retag --profile`), in the same form
    /// as --key-file: needed by `retag`, and while the re-tag is in progress by every command
    /// that opens the volume.
    #[arg(long, global = true, value_name = "FILE")]
    new_key_file: Option<std::path::PathBuf>,
    /// Confirms a re-tag in progress of a keyed volume to an unkeyed profile (NAME), left by
    /// a `retag` that was stopped: while one is, every command that opens the volume needs it
    /// (`retag --profile NAME` gives it itself). A re-tag away from a key that nobody
    /// confirms is refused: a record of an old one put back on the disk would let blocks be
    /// forged.
    #[arg(long, global = true, value_name = "NAME", value_parser = common::profile_parser())]
    retag_to: Option<blockguard::Profile>,
    #[command(flatten)]
    nbd: remote::NbdArgs,
}

#[derive(Subcommand, Debug)]
enum Command {
    /// Create a volume on a file (created sparse if missing) or a block device.
    Format(format::FormatArgs),
    /// Show a volume's superblock and geometry.
    Info(info::InfoArgs),
    /// Like info, and where given blocks and their tags live (--block N).
    Dump(info::InfoArgs),
    /// Copy a raw image into a volume.
    Import(transfer::ImportArgs),
    /// Copy a volume into a raw image, verifying every block.
    Export(transfer::ExportArgs),
    /// Verify every block; exit 0 clean, 1 corruption found, 2 usage or I/O error.
    Check(check::CheckArgs),
    /// After an unclean shutdown: settle every group against the disk and mark the volume
    /// clean, so later sessions accept only the newest tags again.
    Recover(recover::RecoverArgs),
    /// Serve a volume over NBD (TCP or a Unix socket).
    Serve(serve::ServeArgs),
    /// Expose a volume as a single file through FUSE (for losetup).
    Mount(mount::MountArgs),
    /// Unmount a FUSE-mounted volume, flushing it.
    Umount(mount::UmountArgs),
    /// The copies of a volume: list, add, remove, replace, resync.
    Mirror(mirror::MirrorArgs),
    /// Show a volume's health, counters and scrub state (through the control socket of the
    /// process serving it, or by opening it read-only).
    Status(status::StatusArgs),
    /// Verify every written block, also of a volume being served; exit 0 clean, 1 bad blocks
    /// found (unrepaired), 2 error.
    Scrub(scrub::ScrubArgs),
    /// Get a served volume past a write-back failure (full disk, I/O error): retry what was
    /// staged, verify it, clear the error state, report any acknowledged write lost.
    Resume(resume::ResumeArgs),
    /// Switch a volume to another tag profile whose tags fit its tag slots, also while it is served:
    /// every block verified and re-tagged in order, resumable; exit 0 done, 1 bad blocks
    /// found (left failing), 2 error.
    Retag(retag::RetagArgs),
}

/// How long the program waits at exit for its last diagnostics to reach stderr.
const FINAL_FLUSH: std::time::Duration = std::time::Duration::from_secs(2);

fn main() -> ExitCode {
    log::init();
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_env("BLOCKGUARD_LOG")
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info")),
        )
        // Queued, and never reported with eprintln! (which panics when stderr is gone).
        .with_writer(log::Queued)
        .log_internal_errors(false)
        // Colour codes only for a terminal, not for log files and journald.
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .init();
    let code = run(Cli::parse());
    log::flush(FINAL_FLUSH);
    code
}

fn run(cli: Cli) -> ExitCode {
    common::set_key_file(cli.key_file);
    common::set_new_key_file(cli.new_key_file);
    // `retag --profile NAME` confirms the re-tag it resumes.
    let retag_to = match &cli.command {
        Command::Retag(a) => cli.retag_to.or(Some(a.profile)),
        _ => cli.retag_to,
    };
    common::set_retag_to(retag_to);
    remote::set_options(&cli.nbd);
    let result = match cli.command {
        Command::Format(a) => format::run(&a),
        Command::Info(a) | Command::Dump(a) => info::run(&a),
        Command::Import(a) => transfer::run_import(&a),
        Command::Export(a) => transfer::run_export(&a),
        Command::Serve(a) => serve::run(&a),
        Command::Recover(a) => recover::run(&a),
        Command::Mount(a) => mount::run(&a),
        Command::Umount(a) => mount::run_umount(&a),
        Command::Mirror(a) => mirror::run(&a),
        Command::Status(a) => status::run(&a),
        Command::Resume(a) => resume::run(&a),
        Command::Scrub(a) => match scrub::run(&a) {
            Ok(true) => Ok(()),
            Ok(false) => return ExitCode::from(1),
            // 2, or 128 + the signal that interrupted it.
            Err(e) => return exit_error(&e, common::exit_code_for(&e).max(2)),
        },
        Command::Retag(a) => match retag::run(&a) {
            Ok(true) => Ok(()),
            Ok(false) => return ExitCode::from(1),
            Err(e) => return exit_error(&e, common::exit_code_for(&e).max(2)),
        },
        Command::Check(a) => match check::run(&a) {
            Ok(true) => Ok(()),
            Ok(false) => return ExitCode::from(1),
            Err(e) => Err(e),
        },
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => exit_error(&e, common::exit_code_for(&e)),
    }
}

/// Reports `e` and exits with `code`.
fn exit_error(e: &anyhow::Error, code: u8) -> ExitCode {
    log::line(&format!("blockguard: error: {e:#}"));
    ExitCode::from(code)
}
