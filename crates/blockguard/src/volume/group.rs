//! The state of one group's brother metadata blocks, and which tags a read may accept.

use crate::format::{MetaBlock, MetaParse};
use crate::tag::{Tag, UNWRITTEN};

/// A group's two metadata slots as last read or written, plus what the engine knows about
/// the durability of the data they cover.
#[derive(Clone, Debug)]
pub(crate) struct GroupState {
    pub slots: [MetaParse; 2],
    /// Commit epoch that last wrote this group's metadata; `None` when loaded from disk
    /// (after open nothing is known about the durability of the newest brother's data).
    pub written_epoch: Option<u64>,
}

/// The tags a block's data may match.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Accept {
    /// Exactly this tag.
    One(Tag),
    /// Either tag: the newest brother's, or the older one kept until the data is durable.
    Either(Tag, Tag),
    /// No trustworthy metadata: the reason is reported, the data never returned.
    Damaged(&'static str),
}

impl Accept {
    /// True if `matches` accepts one of the tags.
    pub fn any(&self, mut matches: impl FnMut(&Tag) -> bool) -> bool {
        match self {
            Accept::One(t) => matches(t),
            Accept::Either(a, b) => matches(a) || (a != b && matches(b)),
            Accept::Damaged(_) => false,
        }
    }

    /// The newest tag, if any.
    pub fn newest(&self) -> Option<Tag> {
        match self {
            Accept::One(t) | Accept::Either(t, _) => Some(*t),
            Accept::Damaged(_) => None,
        }
    }
}

/// Where the next metadata write of a group goes, and what it starts from.
pub(crate) struct NextMeta {
    pub slot: usize,
    pub base: MetaBlock,
}

impl GroupState {
    /// The newest valid slot and its block.
    pub fn newest(&self) -> Option<(usize, &MetaBlock)> {
        let valid = |s: usize| match &self.slots[s] {
            MetaParse::Valid(m) => Some((s, m)),
            _ => None,
        };
        match (valid(0), valid(1)) {
            (Some(a), Some(b)) => Some(if a.1.generation >= b.1.generation { a } else { b }),
            (a, b) => a.or(b),
        }
    }

    /// Which tags data block `index` of this group may match. `settled` is true when the
    /// data covered by the newest brother is known durable (then the older tag is no longer
    /// a legitimate state and accepting it would hide a lost write).
    pub fn accept(&self, index: usize, settled: bool) -> Accept {
        use MetaParse::*;
        match (&self.slots[0], &self.slots[1]) {
            (Empty, Empty) => Accept::One(UNWRITTEN),
            // A first write (generation 1, always slot 0) torn by a crash: its data was never
            // issued, because data follows only once its metadata is durable.
            (Invalid(_), Empty) => Accept::One(UNWRITTEN),
            // Slot 1 is only ever written after slot 0 held generation 1: an empty slot 0 next
            // to slot 1 means slot 0 was wiped. An intact slot 1 is then the newest copy.
            (Empty, Valid(m)) => Accept::One(m.tag(index)),
            (Empty, Invalid(_)) => Accept::Damaged("metadata slot 0 is blank and slot 1 is damaged"),
            (Invalid(_), Invalid(_)) => Accept::Damaged("both metadata copies fail their checksums"),
            (Valid(m), Empty) => {
                if m.generation == 1 && !settled {
                    Accept::Either(m.tag(index), UNWRITTEN)
                } else if m.generation == 1 {
                    Accept::One(m.tag(index))
                } else {
                    // Generation >= 3 in slot 0 implies slot 1 held generation 2: it was wiped.
                    // The newest copy is intact and covers all durable data.
                    Accept::One(m.tag(index))
                }
            }
            (Valid(m), Invalid(_)) | (Invalid(_), Valid(m)) => {
                // The invalid brother is either torn by a crash while being rewritten (then
                // its data was never issued and the valid one describes the disk) or damaged.
                Accept::One(m.tag(index))
            }
            (Valid(a), Valid(b)) => {
                let (new, old) = if a.generation >= b.generation {
                    (a, b)
                } else {
                    (b, a)
                };
                if settled || new.generation != old.generation + 1 {
                    // Non-consecutive generations mean the older copy is stale beyond what
                    // the protocol ever leaves behind: trust only the newest.
                    Accept::One(new.tag(index))
                } else {
                    Accept::Either(new.tag(index), old.tag(index))
                }
            }
        }
    }

    /// The slot and starting content for the next metadata write, or `None` when the
    /// group's tags are unknown (both copies damaged).
    pub fn next(&self, count: u32, tag_size: usize) -> Option<NextMeta> {
        use MetaParse::*;
        match (&self.slots[0], &self.slots[1]) {
            (Empty, Empty) | (Invalid(_), Empty) => Some(NextMeta {
                slot: 0,
                base: MetaBlock::unwritten(1, count, tag_size),
            }),
            (Empty, Invalid(_)) | (Invalid(_), Invalid(_)) => None,
            _ => {
                let (slot, m) = self.newest()?;
                let mut base = m.clone();
                base.generation = m.generation + 1;
                Some(NextMeta { slot: 1 - slot, base })
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::tag::Profile;

    fn block(generation: u64, tag: Tag) -> MetaParse {
        let mut m = MetaBlock::unwritten(generation, 4, 8);
        m.set_tag(0, &tag);
        MetaParse::Valid(m)
    }

    fn state(a: MetaParse, b: MetaParse) -> GroupState {
        GroupState {
            slots: [a, b],
            written_epoch: None,
        }
    }

    #[test]
    fn acceptance_rules() {
        let t1 = Profile::Crc32c.generate(&[0; 16], 0, &[1; 512]);
        let t2 = Profile::Crc32c.generate(&[0; 16], 0, &[2; 512]);
        let bad = || MetaParse::Invalid("x".into());
        assert_eq!(
            state(MetaParse::Empty, MetaParse::Empty).accept(0, false),
            Accept::One(UNWRITTEN)
        );
        assert_eq!(
            state(bad(), MetaParse::Empty).accept(0, false),
            Accept::One(UNWRITTEN)
        );
        assert_eq!(
            state(MetaParse::Empty, block(2, t1)).accept(0, false),
            Accept::One(t1)
        );
        assert!(matches!(
            state(MetaParse::Empty, bad()).accept(0, false),
            Accept::Damaged(_)
        ));
        assert!(matches!(state(bad(), bad()).accept(0, false), Accept::Damaged(_)));
        assert_eq!(
            state(block(1, t1), MetaParse::Empty).accept(0, false),
            Accept::Either(t1, UNWRITTEN)
        );
        assert_eq!(
            state(block(1, t1), MetaParse::Empty).accept(0, true),
            Accept::One(t1)
        );
        assert_eq!(
            state(block(3, t1), MetaParse::Empty).accept(0, false),
            Accept::One(t1)
        );
        assert_eq!(
            state(block(3, t2), block(2, t1)).accept(0, false),
            Accept::Either(t2, t1)
        );
        assert_eq!(state(block(3, t2), block(2, t1)).accept(0, true), Accept::One(t2));
        assert_eq!(
            state(block(5, t2), block(2, t1)).accept(0, false),
            Accept::One(t2)
        );
        assert_eq!(state(bad(), block(2, t1)).accept(0, false), Accept::One(t1));
    }

    #[test]
    fn next_write_alternates_slots() {
        let t = Profile::Crc32c.generate(&[0; 16], 0, &[1; 512]);
        let n = state(MetaParse::Empty, MetaParse::Empty).next(4, 8).unwrap();
        assert_eq!((n.slot, n.base.generation), (0, 1));
        let n = state(block(1, t), MetaParse::Empty).next(4, 8).unwrap();
        assert_eq!((n.slot, n.base.generation, n.base.tag(0)), (1, 2, t));
        let n = state(block(3, t), block(2, UNWRITTEN)).next(4, 8).unwrap();
        assert_eq!((n.slot, n.base.generation, n.base.tag(0)), (1, 4, t));
        assert!(
            state(MetaParse::Invalid("x".into()), MetaParse::Invalid("y".into()))
                .next(4, 8)
                .is_none()
        );
    }
}
