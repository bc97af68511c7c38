//! The tag profiles of an open volume: which one generates the tag of a block, and which ones
//! a stored tag may have been made by.
//!
//! Normally one profile does everything. During an online re-tag (`volume/retag_online.rs`)
//! there are two, and the cursor — the number of groups re-tagged, in order — says which one
//! covers a block: the groups before it have the target profile's tags (every one of their
//! blocks was re-tagged under the commit lock, and writes to them since are tagged by the
//! target), so only the target is accepted there; the groups at and after it have the old
//! profile's tags, except those a re-tag reached after the last cursor written to the
//! superblock (a crash, or a stop, loses nothing but the cursor's advance), so there a tag
//! made by either profile is accepted. Tags of both profiles fill slots of the same size (the
//! layout does not change; a shorter tag is followed by zeros, compared too), and a slot
//! matches data only if its tag was computed from that data by that profile, so accepting
//! the second profile accepts no data that no tag describes.

use crate::format::{
    tags_incompat, Retag, Superblock, INCOMPAT_RETAG, INCOMPAT_TAG_PROFILE, INCOMPAT_TAG_ROOM,
};
use crate::tag::{Profile, Tag, Tagger};
use std::sync::{Arc, PoisonError, RwLock, RwLockReadGuard};

/// The profiles of an open volume and, during a re-tag, how far it got.
pub(crate) struct Tags {
    state: RwLock<State>,
    /// Data blocks per group: a block's group is `block / group_blocks`.
    group_blocks: u64,
}

/// What [`Tags`] holds; replaced as a whole under the lock.
struct State {
    /// The volume's profile (the old one while a re-tag runs).
    current: Arc<Tagger>,
    /// The re-tag in progress, if any.
    switch: Option<Switch>,
    /// The profile a re-tag completed in this session switched away from: only a check of
    /// caller-supplied protection information may still use it (a tuple computed just before
    /// the re-tag ended), never a stored tag.
    previous: Option<Arc<Tagger>>,
}

/// A re-tag in progress, as the engine knows it.
struct Switch {
    target: Arc<Tagger>,
    /// Groups `0..cursor` carry `target`'s tags.
    cursor: u64,
}

/// Which profile covered which block at one instant (see [`Tags::coverage`]).
#[derive(Clone)]
pub(crate) struct Coverage {
    /// The volume's profile: covers every block, or those from the target's boundary on.
    pub(crate) current: Arc<Tagger>,
    /// During a re-tag: the target, and the first block it does not cover (the first block of
    /// the cursor's group).
    pub(crate) target: Option<(Arc<Tagger>, u64)>,
}

impl Coverage {
    /// The tagger covering `block`.
    pub(crate) fn tagger(&self, block: u64) -> &Arc<Tagger> {
        match &self.target {
            Some((t, end)) if block < *end => t,
            _ => &self.current,
        }
    }
}

/// Where a re-tag stands: the profiles and the cursor.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) struct SwitchState {
    pub(crate) from: Profile,
    pub(crate) to: Profile,
    pub(crate) cursor: u64,
}

impl Tags {
    /// The tags of a volume of `group_blocks` blocks per group with profile `current`, and a
    /// re-tag in progress to `target` from group `cursor` on, if any.
    pub(crate) fn new(current: Tagger, switch: Option<(Tagger, u64)>, group_blocks: u32) -> Tags {
        Tags {
            state: RwLock::new(State {
                current: Arc::new(current),
                switch: switch.map(|(target, cursor)| Switch {
                    target: Arc::new(target),
                    cursor,
                }),
                previous: None,
            }),
            group_blocks: u64::from(group_blocks.max(1)),
        }
    }

    /// The state, also after a panic elsewhere (nothing is ever left half-changed: every
    /// change is one assignment).
    fn read(&self) -> RwLockReadGuard<'_, State> {
        self.state.read().unwrap_or_else(PoisonError::into_inner)
    }

    /// Changes the state with `f`.
    fn change(&self, f: impl FnOnce(&mut State)) {
        f(&mut self.state.write().unwrap_or_else(PoisonError::into_inner));
    }

    /// True if `block` lies in a group already re-tagged.
    fn switched(&self, s: &Switch, block: u64) -> bool {
        block / self.group_blocks < s.cursor
    }

    /// The tag of `data` stored at `block`, by the profile that covers the block.
    #[inline]
    pub(crate) fn generate(&self, block: u64, data: &[u8]) -> Tag {
        let s = self.read();
        match &s.switch {
            Some(w) if self.switched(w, block) => w.target.generate(block, data),
            _ => s.current.generate(block, data),
        }
    }

    /// True if `data` at `block` matches `tag`: made by the target profile in a re-tagged
    /// group, by either profile in the others while a re-tag is in progress.
    #[inline]
    pub(crate) fn verify(&self, block: u64, data: &[u8], tag: &Tag) -> bool {
        let s = self.read();
        match &s.switch {
            None => s.current.verify(block, data, tag),
            Some(w) if self.switched(w, block) => w.target.verify(block, data, tag),
            Some(w) => s.current.verify(block, data, tag) || w.target.verify(block, data, tag),
        }
    }

    /// The tagger of the profile that covers `block` now.
    pub(crate) fn tagger_for(&self, block: u64) -> Arc<Tagger> {
        let s = self.read();
        match &s.switch {
            Some(w) if self.switched(w, block) => w.target.clone(),
            _ => s.current.clone(),
        }
    }

    /// Which profile covers which block now, as one consistent picture: the taggers, and the
    /// first block the volume's profile covers (blocks before it have the target's tags).
    pub(crate) fn coverage(&self) -> Coverage {
        let s = self.read();
        match &s.switch {
            None => Coverage {
                current: s.current.clone(),
                target: None,
            },
            Some(w) => Coverage {
                current: s.current.clone(),
                target: Some((w.target.clone(), w.cursor.saturating_mul(self.group_blocks))),
            },
        }
    }

    /// The volume's profile (the one being switched from, during a re-tag).
    pub(crate) fn current(&self) -> Arc<Tagger> {
        self.read().current.clone()
    }

    /// The re-tag in progress, if any.
    pub(crate) fn switch(&self) -> Option<SwitchState> {
        let s = self.read();
        s.switch.as_ref().map(|w| SwitchState {
            from: s.current.profile(),
            to: w.target.profile(),
            cursor: w.cursor,
        })
    }

    /// Starts a re-tag to `target` at group 0. The caller holds the commit lock and writes the
    /// superblock that records it before any tag of `target` is written.
    pub(crate) fn begin(&self, target: Tagger) {
        self.change(|s| {
            s.switch = Some(Switch {
                target: Arc::new(target),
                cursor: 0,
            });
        });
    }

    /// The profile the last re-tag completed in this session switched away from.
    pub(crate) fn previous(&self) -> Option<Arc<Tagger>> {
        self.read().previous.clone()
    }

    /// Carries `previous` over from the engine this one replaced in the same session (a
    /// mirror membership change reopens the volume), unless this one has its own.
    pub(crate) fn keep_previous(&self, previous: Option<Arc<Tagger>>) {
        self.change(|s| {
            if s.previous.is_none() {
                s.previous = previous;
            }
        });
    }

    /// The target of the re-tag in progress.
    pub(crate) fn target(&self) -> Option<Arc<Tagger>> {
        self.read().switch.as_ref().map(|w| w.target.clone())
    }

    /// Forgets a re-tag that has not re-tagged anything yet (its start could not be recorded).
    pub(crate) fn abort(&self) {
        self.change(|s| {
            if s.switch.as_ref().is_some_and(|w| w.cursor == 0) {
                s.switch = None;
            }
        });
    }

    /// Groups `0..cursor` are re-tagged (their new tags written; writes to them are tagged by
    /// the target from now on).
    pub(crate) fn advance(&self, cursor: u64) {
        self.change(|s| {
            if let Some(w) = &mut s.switch {
                w.cursor = cursor;
            }
        });
    }

    /// Every group is re-tagged: the target becomes the volume's profile.
    pub(crate) fn finish(&self) {
        self.change(|s| {
            if let Some(w) = s.switch.take() {
                s.previous = Some(std::mem::replace(&mut s.current, w.target));
            }
        });
    }

    /// `sb` with the profile, key-check value, feature bits and re-tag fields of now.
    pub(crate) fn apply(&self, sb: &Superblock) -> Superblock {
        let s = self.read();
        let profile = s.current.profile();
        let retag = s.switch.as_ref().map(|w| Retag {
            target: w.target.profile(),
            cursor: w.cursor,
            key_check: if w.target.profile().is_keyed() {
                w.target.key_check()
            } else {
                s.current.retag_seal(w.target.profile()).unwrap_or_default()
            },
        });
        let retag_bit = if retag.is_some() { INCOMPAT_RETAG } else { 0 };
        Superblock {
            profile,
            key_check: s.current.key_check(),
            incompat: (sb.incompat & !(INCOMPAT_TAG_PROFILE | INCOMPAT_TAG_ROOM | INCOMPAT_RETAG))
                | tags_incompat(profile, sb.geometry.tag_size, retag.as_ref())
                | retag_bit,
            retag,
            ..sb.clone()
        }
    }
}
