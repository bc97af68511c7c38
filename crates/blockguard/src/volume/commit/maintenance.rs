//! Exclusive access to the volume's on-disk state for recovery and repairs.
//!
//! Recovery (and, later, resync and scrub repairs) rewrites metadata outside a commit. It may
//! do so only while no commit can run and nothing staged is still in flight, and what it
//! writes must be durable before anything relies on it. [`Maintenance`] is that contract as a
//! value: obtained by [`Inner::maintenance`], it holds the commit lock, starts with every
//! staged write committed and flushed, and is the only way outside a commit to write
//! metadata or map sectors, make them durable and mark the volume clean.

use super::super::bitmaps::MapUpdate;
use super::super::meta_io::MetaUpdate;
use super::super::Inner;
use super::CommitState;
use crate::error::Result;
use crate::format::VolumeState;
use std::sync::MutexGuard;

/// The commit lock, held for maintenance, with everything staged before it durable.
pub(crate) struct Maintenance<'a> {
    vol: &'a Inner,
    state: MutexGuard<'a, CommitState>,
}

impl Inner {
    /// Takes the commit lock, commits what is staged and flushes unconditionally (a killed
    /// process may have left pages the kernel has yet to write: what maintenance reads must be
    /// what the disk holds). Fails if the volume has failed.
    pub(crate) fn maintenance(&self, during: &'static str) -> Result<Maintenance<'_>> {
        let mut state = self.lock(&self.commit);
        self.failed()?;
        if !self.lock(&self.stage).active.is_empty() {
            // Staged writes are not committed while writes are suspended.
            self.suspended()?;
        }
        self.commit_locked(&mut state)?;
        self.flush_or_fail(during)?;
        let epoch = state.epoch;
        state.flushed(epoch);
        Ok(Maintenance { vol: self, state })
    }
}

impl Maintenance<'_> {
    /// Writes new metadata sectors (not durable until [`Maintenance::make_durable`]). Each
    /// must replace a sector no accepted state needs any more: the caller's argument.
    pub(crate) fn write_metadata(&self, updates: &[MetaUpdate]) -> Result<()> {
        self.vol.write_metadata(updates)
    }

    /// Writes map sectors (not durable until [`Maintenance::make_durable`]).
    pub(crate) fn write_map(&self, updates: &[MapUpdate]) -> Result<()> {
        self.vol.write_map(updates)
    }

    /// Flushes: everything written so far is durable. A failure fails the volume.
    pub(crate) fn make_durable(&mut self, during: &'static str) -> Result<()> {
        self.vol.flush_or_fail(during)?;
        let epoch = self.state.epoch;
        self.state.flushed(epoch);
        Ok(())
    }

    /// `journal` mode: a durable checkpoint passes every segment written so far, so none is
    /// replayed after a crash (see `journal::pass_all`). Nothing in the other modes.
    pub(crate) fn pass_journal(&mut self) -> Result<()> {
        if self.vol.sb.mode == crate::format::Mode::Journal {
            super::journal::pass_all(self.vol, &mut self.state)?;
        }
        Ok(())
    }

    /// Marks the volume clean (both superblocks, flushed): every pair's newest sector
    /// describes durable data. Only after everything maintenance changed is durable.
    pub(crate) fn mark_clean(&mut self, during: &'static str) -> Result<()> {
        self.vol.write_superblocks(VolumeState::Clean, during)?;
        self.state.marked_in_use = false;
        Ok(())
    }

    /// The volume's superblocks say "in use".
    pub(crate) fn marked_in_use(&self) -> bool {
        self.state.marked_in_use
    }

    /// What the commit protocol remembers (for the close path's lost-write report).
    pub(crate) fn state(&self) -> &CommitState {
        &self.state
    }
}
