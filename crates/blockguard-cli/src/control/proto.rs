//! The control protocol's messages (documented for users in `docs/CONTROL.md`): one JSON
//! object per line each way. A request names its command in `"cmd"`; every reply line names
//! its kind in `"type"`. New commands (`mirror …`) are new variants of [`Request`] and
//! [`Response`]; an older server answers them with an error of kind `unknown-command`, which
//! a newer client can tell from a malformed request.

use blockguard::{ScrubProgress, ScrubReport};
use serde::{Deserialize, Serialize};

/// Protocol version, reported by `status`; raised when a message changes incompatibly.
pub(crate) const PROTOCOL_VERSION: u32 = 1;

/// Longest request line accepted, newline included; a longer one is refused and the
/// connection closed (nothing legitimate comes near it).
pub(crate) const MAX_REQUEST_LINE: usize = 64 << 10;

/// The commands this server knows, for the error that answers an unknown one.
pub(crate) const COMMANDS: [&str; 8] = [
    "status",
    "scrub",
    "scrub-stop",
    "scrub-status",
    "mirror-list",
    "mirror-resync",
    "resume",
    "retag",
];

/// A request: `{"cmd": "status"}`, `{"cmd": "scrub", "rate": 50000000}`, ...
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "cmd", rename_all = "kebab-case")]
pub(crate) enum Request {
    /// The volume, the engine's counters, the server and the scrub: one `status` line.
    Status,
    /// Starts a scrub: `scrub-started`, then (with `follow`) `scrub-progress` lines and a
    /// final `scrub-done`.
    Scrub(ScrubRequest),
    /// Stops the running scrub and waits for it: one `scrub-stopped` line.
    ScrubStop,
    /// The running scrub's progress and the last one's report: one `scrub-status` line.
    ScrubStatus,
    /// The copies of the volume as the server sees them: one `mirror-list` line.
    MirrorList,
    /// Resynchronizes the copies that fell behind, clients going on meanwhile:
    /// `mirror-resync-progress` lines (with `follow`), then `mirror-resync-done`.
    MirrorResync(FollowRequest),
    /// Retries what a write-back failure left staged and clears the error state: one
    /// `resumed` line.
    Resume,
    /// Switches the volume to another tag profile (or resumes the switch), clients going on
    /// meanwhile: `retag-progress` lines, then `retag-done`. Runs on the connection: it stops
    /// (resumably) when the client goes away or the server shuts down.
    Retag(RetagRequest),
}

/// The options of a `retag` request.
#[derive(Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct RetagRequest {
    /// The target profile's name.
    pub(crate) profile: String,
    /// A keyed target's key: the contents of a key file (32 raw bytes or 64 hex digits), in
    /// hex. The socket is the owner's alone; the key is never logged.
    #[serde(default)]
    pub(crate) key: Option<String>,
    /// Most bytes of the volume passed per second (none: unlimited).
    #[serde(default)]
    pub(crate) rate: Option<u64>,
}

impl std::fmt::Debug for RetagRequest {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // Never the key.
        f.debug_struct("RetagRequest")
            .field("profile", &self.profile)
            .field("key", &self.key.as_ref().map(|_| "<given>"))
            .field("rate", &self.rate)
            .finish()
    }
}

/// Options of a request that may stream progress.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct FollowRequest {
    /// Stream progress lines before the final reply (the default).
    #[serde(default = "yes")]
    pub(crate) follow: bool,
}

/// The options of a `scrub` request; every field may be left out.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct ScrubRequest {
    /// Rewrite bad copies from good ones (meaningful once a volume has mirrors).
    #[serde(default)]
    pub(crate) repair: bool,
    /// Most bytes read per second (none: unlimited).
    #[serde(default)]
    pub(crate) rate: Option<u64>,
    /// Start where the last stopped scrub of this volume left off.
    #[serde(default)]
    pub(crate) resume: bool,
    /// Stream progress and the final report on this connection (the default); without it
    /// the reply is `scrub-started` alone and the scrub runs on.
    #[serde(default = "yes")]
    pub(crate) follow: bool,
}

fn yes() -> bool {
    true
}

/// A reply line.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(tag = "type", rename_all = "kebab-case")]
pub(crate) enum Response {
    /// Answer to `status`.
    Status(Box<StatusInfo>),
    /// A scrub was started from `start` to `end` (bytes).
    ScrubStarted {
        /// Where it starts: 0, or where the last stopped scrub left off (`resume`).
        start: u64,
        /// Where it ends (the volume's size).
        end: u64,
        /// `resume` found a stopped scrub and continues it.
        resumed: bool,
    },
    /// Where a followed scrub is (a few times a second).
    ScrubProgress(Box<ScrubProgress>),
    /// A followed scrub ended (finished, or stopped).
    ScrubDone {
        /// What it did and found.
        report: Box<ScrubReport>,
    },
    /// Answer to `scrub-stop`.
    ScrubStopped {
        /// A scrub was running (and is stopped now).
        was_running: bool,
        /// Its report, if one was running.
        report: Option<Box<ScrubReport>>,
    },
    /// Answer to `scrub-status`.
    ScrubStatus(Box<ScrubState>),
    /// Answer to `mirror-list`: every copy (empty for a plain volume).
    MirrorList {
        /// The copies, by number.
        copies: Vec<CopyInfo>,
    },
    /// Where a followed resync is: `done` of `total` groups copied.
    MirrorResyncProgress {
        /// Groups copied.
        done: u64,
        /// Groups to copy.
        total: u64,
    },
    /// A resync ended: [`blockguard::ResyncReport`] as JSON.
    MirrorResyncDone {
        /// What it copied, to which copies, from which.
        report: serde_json::Value,
    },
    /// Where a re-tag is: `done` of `total` groups re-tagged.
    RetagProgress {
        /// Groups re-tagged (in order from group 0).
        done: u64,
        /// Groups of the volume.
        total: u64,
    },
    /// A re-tag ended (complete, or stopped): [`blockguard::RetagReport`] as JSON.
    RetagDone {
        /// What it did and found.
        report: serde_json::Value,
    },
    /// Answer to `resume`: [`blockguard::ResumeReport`] as JSON.
    Resumed {
        /// What the retry wrote, verified, repaired and found lost, and what was cleared.
        report: serde_json::Value,
    },
    /// The request failed; the connection stays open unless the kind says otherwise.
    Error {
        /// What kind of failure, for programs.
        kind: ErrorKind,
        /// What went wrong, for people.
        message: String,
    },
}

/// Kinds of [`Response::Error`].
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub(crate) enum ErrorKind {
    /// Not JSON, not an object, or fields that do not fit the command.
    BadRequest,
    /// A command this server does not know (an older server, or a typo).
    UnknownCommand,
    /// The request line is longer than [`MAX_REQUEST_LINE`]; the connection is closed.
    TooLong,
    /// A scrub (or a resync) is already running.
    Busy,
    /// The request cannot be carried out on this volume (e.g. repair on a read-only one).
    Refused,
    /// The peer's user may not use this socket; the connection is closed.
    PermissionDenied,
    /// Too many control clients at once; the connection is closed.
    TooManyClients,
    /// The server is shutting down.
    ShuttingDown,
    /// The engine failed the request.
    Failed,
}

/// What `status` reports.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub(crate) struct StatusInfo {
    /// [`PROTOCOL_VERSION`] of the server (absent when the volume was opened directly).
    pub(crate) protocol: Option<u32>,
    /// The volume's name in the engine's messages (its path as the server was given it).
    pub(crate) name: String,
    /// The volume's path (canonical).
    pub(crate) path: String,
    /// The volume's UUID.
    pub(crate) uuid: String,
    /// Its label.
    pub(crate) label: String,
    /// Logical size in bytes.
    pub(crate) size: u64,
    /// Logical block size in bytes.
    pub(crate) block_size: u32,
    /// Consistency mode (`dual`, `none`).
    pub(crate) mode: String,
    /// Tag profile (`crc32c`, ...).
    pub(crate) profile: String,
    /// The re-tag in progress ([`blockguard::RetagStatus`] as JSON: `from`, `to`, `cursor`,
    /// `groups`), if any.
    #[serde(default)]
    pub(crate) retag: Option<serde_json::Value>,
    /// Open read-only.
    pub(crate) read_only: bool,
    /// The superblock's state when the volume was last opened (`clean` or `in-use`); only
    /// known to a direct open.
    pub(crate) state: Option<String>,
    /// The engine's counters ([`blockguard::VolumeStats`], as JSON so that counters added
    /// later reach clients without a protocol change).
    pub(crate) stats: serde_json::Value,
    /// Why the volume has failed (writes and flushes refused), if it has.
    pub(crate) failed: Option<String>,
    /// Warnings of the open (a damaged superblock copy, ...).
    pub(crate) warnings: Vec<String>,
    /// The process serving the volume; `None` when `status` opened it itself.
    pub(crate) server: Option<ServerInfo>,
    /// The running scrub and the last one.
    pub(crate) scrub: ScrubState,
    /// [`blockguard::VolumeHealth`] as JSON: failure, suspension, unrepairable blocks, lost
    /// writes (absent from servers older than this field).
    #[serde(default)]
    pub(crate) health: serde_json::Value,
    /// The copies of a mirror set (empty for a plain volume).
    #[serde(default)]
    pub(crate) copies: Vec<CopyInfo>,
    /// Groups the write-intent map marks.
    #[serde(default)]
    pub(crate) dirty_regions: u64,
    /// `journal` mode: [`blockguard::JournalStatus`] (sizes, fill, segments written) and the
    /// replay at open, if there was one, as JSON.
    #[serde(default)]
    pub(crate) journal: Option<serde_json::Value>,
}

/// One copy of a volume, as `status` and `mirror-list` report it.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub(crate) struct CopyInfo {
    /// Its number in the set.
    pub(crate) copy: usize,
    /// Its path.
    pub(crate) path: String,
    /// `in-sync`, `catching-up`, `out-of-sync` or `absent`.
    pub(crate) state: String,
    /// `state` is `in-sync`: the copy is read and holds the volume's current contents.
    pub(crate) in_sync: bool,
}

/// The process that answers on the control socket.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub(crate) struct ServerInfo {
    /// `serve` or `mount`.
    pub(crate) kind: String,
    /// Its process id.
    pub(crate) pid: u32,
    /// Its control socket.
    pub(crate) control: String,
    /// Where it serves: the NBD address, or the file the FUSE mount exports.
    pub(crate) serving: String,
    /// NBD connections open now (`serve` only).
    pub(crate) connections: Option<usize>,
    /// NBD connections admitted since it started (`serve` only).
    pub(crate) connections_total: Option<u64>,
    /// Seconds since it started.
    pub(crate) uptime_secs: u64,
}

/// The running scrub, the last one, and where `resume` would start.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub(crate) struct ScrubState {
    /// A scrub is running.
    pub(crate) running: bool,
    /// Its latest progress.
    pub(crate) progress: Option<ScrubProgress>,
    /// The report of the last scrub that ended (finished or stopped).
    pub(crate) last: Option<ScrubReport>,
    /// Unix time (seconds) when it ended.
    pub(crate) last_ended: Option<u64>,
    /// Where a `resume` starts: the position of the last scrub if it was stopped.
    pub(crate) resume_from: Option<u64>,
}

/// Parses a request line, telling an unknown command from a malformed request.
pub(crate) fn parse_request(line: &[u8]) -> Result<Request, Response> {
    let value: serde_json::Value = serde_json::from_slice(line)
        .map_err(|e| error(ErrorKind::BadRequest, format!("not a JSON request ({e})")))?;
    let Some(cmd) = value.get("cmd") else {
        return Err(error(
            ErrorKind::BadRequest,
            format!(
                "a request is a JSON object with a \"cmd\" field (one of {})",
                COMMANDS.join(", ")
            ),
        ));
    };
    match cmd.as_str() {
        Some(name) if COMMANDS.contains(&name) => {}
        _ => {
            return Err(error(
                ErrorKind::UnknownCommand,
                format!(
                    "unknown command {cmd} (this server knows {})",
                    COMMANDS.join(", ")
                ),
            ))
        }
    }
    serde_json::from_value(value).map_err(|e| error(ErrorKind::BadRequest, format!("bad request: {e}")))
}

/// An error reply.
pub(crate) fn error(kind: ErrorKind, message: String) -> Response {
    Response::Error { kind, message }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn kind(line: &str) -> ErrorKind {
        match parse_request(line.as_bytes()) {
            Err(Response::Error { kind, .. }) => kind,
            other => panic!("{line}: {other:?}"),
        }
    }

    #[test]
    fn requests_parse_with_defaults() {
        assert_eq!(parse_request(br#"{"cmd":"status"}"#).unwrap(), Request::Status);
        assert_eq!(
            parse_request(br#"{"cmd":"scrub"}"#).unwrap(),
            Request::Scrub(ScrubRequest {
                repair: false,
                rate: None,
                resume: false,
                follow: true
            })
        );
        assert_eq!(
            parse_request(br#"{"cmd":"scrub","rate":5,"resume":true,"follow":false,"repair":true}"#).unwrap(),
            Request::Scrub(ScrubRequest {
                repair: true,
                rate: Some(5),
                resume: true,
                follow: false
            })
        );
        assert_eq!(
            parse_request(br#"{"cmd":"scrub-stop"}"#).unwrap(),
            Request::ScrubStop
        );
    }

    #[test]
    fn bad_requests_are_told_from_unknown_commands() {
        assert_eq!(kind("status"), ErrorKind::BadRequest);
        assert_eq!(kind("[1,2]"), ErrorKind::BadRequest);
        assert_eq!(kind(r#"{"command":"status"}"#), ErrorKind::BadRequest);
        assert_eq!(kind(r#"{"cmd":"scrub","rate":-1}"#), ErrorKind::BadRequest);
        assert_eq!(kind(r#"{"cmd":"scrub","speed":1}"#), ErrorKind::BadRequest);
        assert_eq!(kind("\u{0}\u{ff}"), ErrorKind::BadRequest);
        assert_eq!(kind(r#"{"cmd":"mirror"}"#), ErrorKind::UnknownCommand);
        assert_eq!(kind(r#"{"cmd":7}"#), ErrorKind::UnknownCommand);
    }

    #[test]
    fn replies_round_trip() {
        let r = Response::ScrubStarted {
            start: 0,
            end: 4096,
            resumed: false,
        };
        let line = serde_json::to_string(&r).unwrap();
        assert_eq!(
            line,
            r#"{"type":"scrub-started","start":0,"end":4096,"resumed":false}"#
        );
        assert_eq!(serde_json::from_str::<Response>(&line).unwrap(), r);
        let e = error(ErrorKind::TooLong, "x".into());
        assert_eq!(
            serde_json::to_string(&e).unwrap(),
            r#"{"type":"error","kind":"too-long","message":"x"}"#
        );
    }
}
