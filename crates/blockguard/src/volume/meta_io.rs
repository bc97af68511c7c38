//! Reading and writing group metadata: loading into the cache, confirming a load by reading
//! again, and writing a group's new brothers.
//!
//! A metadata read that returned wrong bytes once (zeros, another place's bytes, an older
//! version) must never be written back: a group's new brothers are built from its cached
//! state, unchanged sectors included. So before a group is rewritten, or a hole is reported
//! on its word, or a read that failed against it is reported as corruption, a state that came
//! from a single read is *confirmed*: read until two reads in a row agree.

use super::bitmaps::MapBit;
use super::group::{GroupState, Origin};
use super::{aligned, Inner};
use crate::error::{Error, Result};
use blockguard_backend::Backend as _;
use std::sync::atomic::Ordering;
use std::sync::Arc;

/// Disagreeing reads of a group's metadata tolerated before its bytes are declared unstable.
const CONFIRM_READS: usize = 4;

/// Further agreeing reads required before blank metadata of a group the written-groups map
/// says was written is believed (a read fault's favourite content is zeros).
const BLANK_CONFIRM_READS: usize = 4;

/// A group's new metadata, ready to write: where, what, and the state to install.
pub(crate) struct MetaUpdate {
    pub group: u64,
    pub offset: u64,
    pub bytes: Vec<u8>,
    pub state: Arc<GroupState>,
}

impl Inner {
    /// The metadata state of `group`, loading it from disk on a miss.
    pub(crate) fn group(&self, group: u64) -> Result<Arc<GroupState>> {
        let mut shard = self.cache.lock(group);
        if let Some(s) = shard.get(group) {
            return Ok(s);
        }
        // Loaded while the shard is locked, so a load can never overwrite a newer state that
        // a commit installed concurrently.
        let raw = self.read_meta(group)?;
        let state = Arc::new(self.parse_loaded(group, raw, false)?);
        shard.put(group, state.clone());
        Ok(state)
    }

    /// The cached state of `group`, if any, without loading it.
    pub(crate) fn cached_group(&self, group: u64) -> Option<Arc<GroupState>> {
        self.cache.lock(group).get(group)
    }

    /// `state` (the current state of `group`) confirmed: if it came from a single read, the
    /// metadata is read again until two reads agree, and the agreed bytes replace it.
    pub(crate) fn confirm(&self, group: u64, state: Arc<GroupState>) -> Result<Arc<GroupState>> {
        if !state.unconfirmed() {
            return Ok(state);
        }
        let mut shard = self.cache.lock(group);
        if let Some(current) = shard.get(group) {
            if !current.unconfirmed() {
                // A commit or another confirmation got there first.
                return Ok(current);
            }
        }
        let mut previous = state.raw().to_vec();
        let (mut disagreements, mut blank_agreements) = (0, 0);
        while disagreements < CONFIRM_READS {
            let raw = self.read_meta(group)?;
            if *raw == previous[..] {
                // Blank metadata of a group the map says was written is also what zero or
                // misdirected read faults look like: look harder before believing it.
                if crate::tag::is_zero(&raw)
                    && blank_agreements < BLANK_CONFIRM_READS
                    && self.map_bit(group, true)? == MapBit::Set
                {
                    blank_agreements += 1;
                    continue;
                }
                let fresh = Arc::new(self.parse_loaded(group, raw, true)?);
                shard.put(group, fresh.clone());
                return Ok(fresh);
            }
            tracing::warn!(
                volume = %self.name,
                group,
                "metadata read back differently than before (a transient read fault?); reading again"
            );
            self.stats.metadata_rereads.fetch_add(1, Ordering::Relaxed);
            disagreements += 1;
            previous = raw.into_vec();
        }
        Err(Error::Io {
            volume: self.name.clone(),
            during: "confirming metadata",
            offset: self.geo.meta_offset(group, 0),
            source: std::io::Error::other(format!(
                "the metadata of group {group} read differently {CONFIRM_READS} times in a row"
            )),
        })
    }

    /// The confirmed state of `group` (loaded if needed).
    pub(crate) fn confirmed_group(&self, group: u64) -> Result<Arc<GroupState>> {
        let state = self.group(group)?;
        self.confirm(group, state)
    }

    pub(crate) fn parse_loaded(&self, group: u64, raw: Box<[u8]>, confirmed: bool) -> Result<GroupState> {
        // After a crash only the groups the dirty map marks may hide an older brother that still
        // describes the data: every other group was settled before it.
        let after_crash = !self.trusted.load(Ordering::Acquire) && self.dirty_after_crash(group)?;
        let first_write =
            after_crash && self.marked_after_crash(crate::format::MapKind::FirstWrite, group)?;
        let origin = Origin::Loaded {
            after_crash,
            first_write,
            confirmed,
        };
        // Blank metadata means "never written" only if the written-groups map agrees. With one
        // tag copy a blank *sector* beside written ones is judged by the map too (`journal`
        // puts a first write's map bit on disk only after the group's metadata is durable).
        let map = if crate::tag::is_zero(&raw) || self.sb.mode.single_copy_tags() {
            self.map_bit(group, confirmed)?
        } else {
            MapBit::Set
        };
        let state = GroupState::parse(&self.geo, self.sb.mode, &self.sb.uuid, group, raw, origin, map);
        for k in 0..state.pairs() {
            for (slot, s) in state.pair(k).iter().enumerate() {
                if let crate::format::SectorParse::Invalid(why) = s {
                    tracing::warn!(volume = %self.name, group, sector = k, slot, "metadata sector unusable: {why}");
                }
            }
        }
        Ok(state)
    }

    /// Both brothers of `group`, as the backend returns them now.
    fn read_meta(&self, group: u64) -> Result<Box<[u8]>> {
        let bs = self.geo.block_size as usize;
        let mut buf = vec![0u8; 2 * bs];
        let off = self.geo.meta_offset(group, 0);
        self.backend_read(&mut buf, off, "reading metadata")?;
        Ok(buf.into_boxed_slice())
    }

    /// Reads `buf.len()` bytes at `offset` until two reads in a row agree: for decisions that
    /// are written down (recovery keeps the tag the data matches), where one bad read must not
    /// become permanent.
    pub(crate) fn read_confirmed(&self, buf: &mut [u8], offset: u64, during: &'static str) -> Result<()> {
        self.backend_read(buf, offset, during)?;
        let mut again = vec![0u8; buf.len()];
        for _ in 0..CONFIRM_READS {
            self.backend_read(&mut again, offset, during)?;
            if again[..] == buf[..] {
                return Ok(());
            }
            tracing::warn!(volume = %self.name, offset, "data read back differently than before; reading again");
            buf.copy_from_slice(&again);
        }
        Err(Error::Io {
            volume: self.name.clone(),
            during,
            offset,
            source: std::io::Error::other(format!(
                "{} bytes at offset {offset} read differently {CONFIRM_READS} times in a row",
                buf.len()
            )),
        })
    }

    /// Reads `buf.len()` bytes at `offset` of mirror member `member` alone until two reads in
    /// a row agree: what convergence and resync copy to another member is written down there,
    /// so one bad read (zeros once, another offset's bytes) must not be. `buf` must be
    /// aligned for the backend.
    pub(crate) fn read_member_confirmed(
        &self,
        member: usize,
        buf: &mut [u8],
        offset: u64,
        during: &'static str,
    ) -> Result<()> {
        self.backend
            .read_from(member, buf, offset)
            .map_err(self.io_err(during, offset))?;
        let mut again = aligned(buf.len(), self.backend.alignment().max(1));
        for _ in 0..CONFIRM_READS {
            self.backend
                .read_from(member, again.as_mut(), offset)
                .map_err(self.io_err(during, offset))?;
            if again.as_ref() == &buf[..] {
                return Ok(());
            }
            tracing::warn!(volume = %self.name, member, offset, "a mirror member read back differently than before; reading again");
            buf.copy_from_slice(again.as_ref());
        }
        Err(Error::Io {
            volume: self.name.clone(),
            during,
            offset,
            source: std::io::Error::other(format!(
                "{} bytes at offset {offset} of mirror member {member} read differently {CONFIRM_READS} times in a row",
                buf.len()
            )),
        })
    }

    /// Reads from the backend, through an aligned bounce buffer covering the enclosing aligned
    /// range when the backend needs aligned I/O and the request is not.
    pub(crate) fn backend_read(&self, buf: &mut [u8], offset: u64, during: &'static str) -> Result<()> {
        let align = self.backend.alignment();
        if align <= 1
            || ((buf.as_ptr() as usize).is_multiple_of(align)
                && buf.len().is_multiple_of(align)
                && offset.is_multiple_of(align as u64))
        {
            return self
                .backend
                .read_at(buf, offset)
                .map_err(self.io_err(during, offset));
        }
        let start = offset / align as u64 * align as u64;
        let end = (offset + buf.len() as u64).div_ceil(align as u64) * align as u64;
        let mut bounce = aligned(crate::cast::usize_of(end - start), align);
        self.backend
            .read_at(bounce.as_mut(), start)
            .map_err(self.io_err(during, offset))?;
        let at = crate::cast::usize_of(offset - start);
        buf.copy_from_slice(&bounce.as_ref()[at..at + buf.len()]);
        Ok(())
    }

    /// The write that stores `state`'s changed slots of `group`: the changed slot alone, or
    /// both slots at once (one request) when both changed.
    pub(crate) fn meta_update(&self, group: u64, state: GroupState, slots: [bool; 2]) -> MetaUpdate {
        let bs = self.geo.block_size as usize;
        let (offset, bytes) = match slots {
            [true, true] => (self.geo.meta_offset(group, 0), state.raw().to_vec()),
            [false, true] => (self.geo.meta_offset(group, 1), state.raw()[bs..].to_vec()),
            _ => (self.geo.meta_offset(group, 0), state.raw()[..bs].to_vec()),
        };
        debug_assert!(slots != [false, false], "an update writes at least one slot");
        MetaUpdate {
            group,
            offset,
            bytes,
            state: Arc::new(state),
        }
    }

    /// Publishes new metadata to readers. Done after the metadata is on the backend and
    /// before the data, so a reader that sees new data also sees the tag that covers it.
    pub(crate) fn install(&self, updates: &[MetaUpdate]) {
        for u in updates {
            self.cache.lock(u.group).put(u.group, u.state.clone());
        }
    }
}
