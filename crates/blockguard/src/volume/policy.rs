//! The error policy: what the volume does, besides failing the read, when a block has no good
//! copy left (it fails verification and no mirror member holds a copy that verifies); and the
//! write suspension of the `read-only` policy. See `docs/CONSISTENCY.md`, "Error policy".
//!
//! Whatever the policy, the read of such a block fails with the typed corruption error naming
//! the block (G3: wrong data is never returned). The policies differ only in what else
//! happens: `eio` logs every failure; `read-only` also suspends writes from the first such
//! block on; `continue` logs each block once and sums up repeats.

use super::Inner;
use crate::error::{Error, Result};
use crate::format::ErrorPolicy;
use std::collections::BTreeSet;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Mutex;
use std::time::{Duration, Instant};

/// Distinct unrepairable blocks remembered for [`crate::Volume::health`] and once-per-block
/// logging (8 bytes each); blocks past it are counted, not listed.
const REMEMBERED: usize = 1 << 16;

/// Under `continue`, repeated failures of blocks already logged are summed up in one line at
/// most this often.
const SUMMARY_EVERY: Duration = Duration::from_secs(10);

/// The `read-only` policy's suspension of writes: the block that caused it.
#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize)]
pub struct Suspension {
    /// The first block found with no good copy.
    pub block: u64,
    /// What its read found.
    pub detail: String,
}

/// The policy in force and what it has seen this session.
pub(crate) struct PolicyState {
    /// The superblock's policy, or the open's override.
    pub(crate) policy: ErrorPolicy,
    /// Writers' fast check: the suspension is in force.
    suspended: AtomicBool,
    /// Some block is remembered (writers check before taking the lock to forget one).
    any_bad: AtomicBool,
    seen: Mutex<Seen>,
}

#[derive(Default)]
struct Seen {
    suspension: Option<Suspension>,
    /// Distinct blocks found with no good copy (up to [`REMEMBERED`]), until rewritten.
    blocks: BTreeSet<u64>,
    /// Failures of blocks past [`REMEMBERED`] (not told apart: an upper bound of the blocks).
    unlisted: u64,
    /// Failures of blocks already logged, not yet summed up (`continue`).
    repeats: u64,
    last_summary: Option<Instant>,
}

/// What [`PolicyState::forget`] cleared.
pub(crate) struct Forgotten {
    pub(crate) suspension: Option<Suspension>,
    pub(crate) blocks: u64,
}

impl PolicyState {
    pub(crate) fn new(policy: ErrorPolicy) -> PolicyState {
        PolicyState {
            policy,
            suspended: AtomicBool::new(false),
            any_bad: AtomicBool::new(false),
            seen: Mutex::new(Seen::default()),
        }
    }

    fn seen(&self) -> std::sync::MutexGuard<'_, Seen> {
        // Only counters and sets behind it, each updated whole: a panic elsewhere cannot
        // leave them inconsistent.
        self.seen
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// True while the `read-only` suspension is in force.
    pub(crate) fn is_suspended(&self) -> bool {
        self.suspended.load(Ordering::Acquire)
    }

    /// The suspension in force, if any.
    pub(crate) fn suspension(&self) -> Option<Suspension> {
        if !self.is_suspended() {
            return None;
        }
        self.seen().suspension.clone()
    }

    /// Blocks found with no good copy this session and not rewritten since: how many (an
    /// upper bound once more than [`REMEMBERED`] were found), and the first `list` of them.
    pub(crate) fn unrepairable(&self, list: usize) -> (u64, Vec<u64>) {
        let seen = self.seen();
        (
            seen.blocks.len() as u64 + seen.unlisted,
            seen.blocks.iter().take(list).copied().collect(),
        )
    }

    /// Blocks `first..=last` were written again: they are no longer known bad (a block that
    /// fails again later is found, logged and counted anew).
    pub(crate) fn rewritten(&self, first: u64, last: u64) {
        if !self.any_bad.load(Ordering::Acquire) {
            return;
        }
        let mut seen = self.seen();
        let gone: Vec<u64> = seen.blocks.range(first..=last).copied().collect();
        for b in gone {
            seen.blocks.remove(&b);
        }
        if seen.blocks.is_empty() && seen.unlisted == 0 {
            self.any_bad.store(false, Ordering::Release);
        }
    }

    /// Lifts the suspension and forgets every block found bad: the operator has acted.
    pub(crate) fn forget(&self) -> Forgotten {
        let mut seen = self.seen();
        let blocks = seen.blocks.len() as u64 + seen.unlisted;
        let suspension = seen.suspension.take();
        *seen = Seen::default();
        self.suspended.store(false, Ordering::Release);
        self.any_bad.store(false, Ordering::Release);
        Forgotten { suspension, blocks }
    }
}

impl Inner {
    /// A read found `block` with no good copy (`error` is what the read returns): applies the
    /// error policy. Called once per failed read, after read repair found no member that
    /// verifies.
    pub(crate) fn unrepairable(&self, block: u64, error: &Error) {
        let p = &self.policy;
        let mut seen = p.seen();
        let new = if seen.blocks.contains(&block) {
            false
        } else if seen.blocks.len() < REMEMBERED {
            seen.blocks.insert(block);
            true
        } else {
            seen.unlisted += 1;
            true
        };
        p.any_bad.store(true, Ordering::Release);
        match p.policy {
            ErrorPolicy::Eio => {
                // Returned, not logged: the caller reports it once (the servers with the
                // request, `check` in its list, `export` when it stops).
                tracing::debug!(volume = %self.name, block, "{error}");
            }
            ErrorPolicy::ReadOnly => {
                if seen.suspension.is_none() {
                    seen.suspension = Some(Suspension {
                        block,
                        detail: error_detail(error),
                    });
                    p.suspended.store(true, Ordering::Release);
                    tracing::error!(
                        volume = %self.name,
                        block,
                        "error policy read-only: block {block} has no good copy; writes are suspended until \
                         the error state is cleared (`blockguard resume`) or the volume is reopened"
                    );
                }
            }
            ErrorPolicy::Continue => {
                if new {
                    tracing::error!(
                        volume = %self.name,
                        block,
                        "{error} (error policy continue: later failures of this block are counted, not logged)"
                    );
                } else {
                    seen.repeats += 1;
                    let now = Instant::now();
                    let due = seen
                        .last_summary
                        .is_none_or(|t| now.duration_since(t) >= SUMMARY_EVERY);
                    if due {
                        tracing::warn!(
                            volume = %self.name,
                            "error policy continue: {} more reads failed on {} blocks with no good copy",
                            seen.repeats,
                            seen.blocks.len() as u64 + seen.unlisted
                        );
                        seen.repeats = 0;
                        seen.last_summary = Some(now);
                    }
                }
            }
        }
    }

    /// The error writes (and flushes that would commit staged writes) get while the
    /// `read-only` suspension is in force.
    pub(crate) fn suspended(&self) -> Result<()> {
        if !self.policy.is_suspended() {
            return Ok(());
        }
        let (block, detail) = self
            .policy
            .suspension()
            .map_or((0, String::new()), |s| (s.block, s.detail));
        Err(Error::WritesSuspended {
            volume: self.name.clone(),
            block,
            detail,
        })
    }
}

impl Inner {
    /// At close, while writes are suspended: the staged writes (acknowledged before the
    /// suspension) are dropped unwritten, as a crash would drop them. Returns the error that
    /// reports them, if there were any.
    pub(crate) fn drop_suspended_stage(&self) -> Option<Error> {
        let suspension = self.policy.suspension()?;
        let dropped = {
            let mut stage = self.lock(&self.stage);
            if stage.active.is_empty() {
                return None;
            }
            stage.take_active()
        };
        let blocks: Vec<String> = dropped.keys().take(16).map(ToString::to_string).collect();
        let more = if dropped.len() > 16 { ", …" } else { "" };
        let detail = format!(
            "{}; closing while writes are suspended left {} acknowledged, unflushed block writes unwritten \
             (blocks {}{more})",
            suspension.detail,
            dropped.len(),
            blocks.join(", ")
        );
        tracing::error!(volume = %self.name, block = suspension.block, "{detail}");
        Some(Error::WritesSuspended {
            volume: self.name.clone(),
            block: suspension.block,
            detail,
        })
    }
}

/// What a read error says about its block, without the volume and block it already names.
fn error_detail(e: &Error) -> String {
    match e {
        Error::Corrupt { detail, .. } => detail.clone(),
        other => other.to_string(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rewriting_forgets_blocks_and_forget_lifts_everything() {
        let p = PolicyState::new(ErrorPolicy::ReadOnly);
        {
            let mut seen = p.seen();
            seen.blocks.extend([3, 7, 9]);
            seen.suspension = Some(Suspension {
                block: 3,
                detail: "x".into(),
            });
        }
        p.suspended.store(true, Ordering::Release);
        p.any_bad.store(true, Ordering::Release);
        p.rewritten(5, 8);
        assert_eq!(p.unrepairable(10), (2, vec![3, 9]));
        assert!(p.is_suspended(), "a rewrite does not lift the suspension");
        let f = p.forget();
        assert_eq!(f.blocks, 2);
        assert_eq!(f.suspension.map(|s| s.block), Some(3));
        assert!(!p.is_suspended());
        assert_eq!(p.unrepairable(10), (0, vec![]));
    }
}
