//! Metadata blocks: a header and the tags of one group's data blocks. Each group has two,
//! the "brothers"; the one with the higher generation is the newer.

use super::{le16, le32, le64};
use crate::tag::{Tag, MAX_TAG_SIZE};

/// Magic at byte 0 of every metadata block.
pub const META_MAGIC: [u8; 8] = *b"BGMETA01";
/// Bytes before the first tag.
pub const META_HEADER_SIZE: usize = 64;
const CRC_AT: usize = 8;

/// A decoded, verified metadata block.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct MetaBlock {
    /// Generation: 1 for the first write of the group, +1 on every rewrite. Odd generations
    /// live in slot 0, even ones in slot 1, so a block found in the wrong slot is detected.
    pub generation: u64,
    tag_size: usize,
    /// `len() * tag_size` bytes: the tags as stored, kept raw so the cache costs what the
    /// disk does.
    raw: Vec<u8>,
}

/// What a metadata block on disk turned out to be.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum MetaParse {
    /// All zeros: never written since format. Every block of the group is unwritten.
    Empty,
    /// A valid block.
    Valid(MetaBlock),
    /// Damaged, torn, misplaced or foreign; the reason says which check failed.
    Invalid(String),
}

/// The checksum seed binds volume, group and slot, so a metadata block copied to another
/// place, or from another volume, fails its checksum.
fn checksum(b: &[u8], uuid: &[u8; 16], group: u64, slot: usize) -> u32 {
    let mut seed = [0u8; 25];
    seed[..16].copy_from_slice(uuid);
    seed[16..24].copy_from_slice(&group.to_le_bytes());
    seed[24] = slot as u8;
    let c = crc32c::crc32c_append(crc32c::crc32c(&seed), &b[..CRC_AT]);
    let c = crc32c::crc32c_append(c, &[0u8; 4]);
    crc32c::crc32c_append(c, &b[CRC_AT + 4..])
}

impl MetaBlock {
    /// A block of `count` unwritten tags.
    pub fn unwritten(generation: u64, count: u32, tag_size: usize) -> MetaBlock {
        MetaBlock {
            generation,
            tag_size,
            raw: vec![0; count as usize * tag_size],
        }
    }

    /// Number of tags.
    pub fn len(&self) -> usize {
        self.raw.len() / self.tag_size
    }

    /// True if the block holds no tags.
    pub fn is_empty(&self) -> bool {
        self.raw.is_empty()
    }

    /// Tag `i`.
    pub fn tag(&self, i: usize) -> Tag {
        Tag::from_bytes(&self.raw[i * self.tag_size..(i + 1) * self.tag_size])
    }

    /// The stored bytes of tag `i` (all zero for unwritten).
    pub fn tag_bytes(&self, i: usize) -> &[u8] {
        &self.raw[i * self.tag_size..(i + 1) * self.tag_size]
    }

    /// Replaces tag `i`.
    pub fn set_tag(&mut self, i: usize, tag: &Tag) {
        let ts = self.tag_size;
        self.raw[i * ts..(i + 1) * ts].copy_from_slice(&tag.to_bytes(ts)[..ts]);
    }

    /// Encodes into a `block_size` buffer for `slot` of `group`.
    pub fn encode(&self, out: &mut [u8], uuid: &[u8; 16], group: u64, slot: usize, tag_size: usize) {
        debug_assert_eq!(tag_size, self.tag_size);
        debug_assert!(META_HEADER_SIZE + self.raw.len() <= out.len());
        debug_assert_eq!(
            self.generation.is_multiple_of(2) as usize,
            slot,
            "generation parity picks the slot"
        );
        out.fill(0);
        out[0..8].copy_from_slice(&META_MAGIC);
        out[16..24].copy_from_slice(&self.generation.to_le_bytes());
        out[24..32].copy_from_slice(&group.to_le_bytes());
        out[32..48].copy_from_slice(uuid);
        out[48..52].copy_from_slice(&(self.len() as u32).to_le_bytes());
        out[52..54].copy_from_slice(&(tag_size as u16).to_le_bytes());
        out[META_HEADER_SIZE..META_HEADER_SIZE + self.raw.len()].copy_from_slice(&self.raw);
        let crc = checksum(out, uuid, group, slot);
        out[CRC_AT..CRC_AT + 4].copy_from_slice(&crc.to_le_bytes());
    }

    /// Decodes the metadata block read from `slot` of `group`, expecting `count` tags.
    pub fn decode(
        b: &[u8],
        uuid: &[u8; 16],
        group: u64,
        slot: usize,
        count: u32,
        tag_size: usize,
    ) -> MetaParse {
        if crate::tag::is_zero(b) {
            return MetaParse::Empty;
        }
        if b.len() < META_HEADER_SIZE || b[0..8] != META_MAGIC {
            return MetaParse::Invalid("bad magic".into());
        }
        let stored = le32(b, CRC_AT);
        let computed = checksum(b, uuid, group, slot);
        if stored != computed {
            return MetaParse::Invalid(format!(
                "checksum mismatch (stored {stored:#010x}, computed {computed:#010x}): torn, damaged or misplaced"
            ));
        }
        let generation = le64(b, 16);
        if generation == 0 || generation.is_multiple_of(2) as usize != slot {
            return MetaParse::Invalid(format!("generation {generation} does not belong in slot {slot}"));
        }
        if le64(b, 24) != group || b[32..48] != uuid[..] {
            return MetaParse::Invalid("header names another group or volume".into());
        }
        if le32(b, 48) != count
            || le16(b, 52) as usize != tag_size
            || tag_size == 0
            || tag_size > MAX_TAG_SIZE
        {
            return MetaParse::Invalid(format!(
                "holds {} tags of {} bytes, expected {count} of {tag_size}",
                le32(b, 48),
                le16(b, 52)
            ));
        }
        if META_HEADER_SIZE + count as usize * tag_size > b.len() {
            return MetaParse::Invalid("tags overflow the block".into());
        }
        let raw = b[META_HEADER_SIZE..META_HEADER_SIZE + count as usize * tag_size].to_vec();
        MetaParse::Valid(MetaBlock {
            generation,
            tag_size,
            raw,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::tag::{Profile, UNWRITTEN};

    fn sample(count: u32) -> MetaBlock {
        let mut m = MetaBlock::unwritten(3, count, 8);
        m.set_tag(3, &Profile::Crc32c.generate(&[1; 16], 3, &[5; 512]));
        m
    }

    #[test]
    fn roundtrip_and_binding() {
        let m = sample(56);
        assert_eq!(m.tag(0), UNWRITTEN);
        assert!(!m.tag(3).is_unwritten());
        let mut b = vec![0u8; 512];
        m.encode(&mut b, &[1; 16], 7, 0, 8);
        assert_eq!(MetaBlock::decode(&b, &[1; 16], 7, 0, 56, 8), MetaParse::Valid(m));
        assert!(matches!(
            MetaBlock::decode(&b, &[1; 16], 8, 0, 56, 8),
            MetaParse::Invalid(_)
        ));
        assert!(matches!(
            MetaBlock::decode(&b, &[2; 16], 7, 0, 56, 8),
            MetaParse::Invalid(_)
        ));
        assert!(matches!(
            MetaBlock::decode(&b, &[1; 16], 7, 1, 56, 8),
            MetaParse::Invalid(_)
        ));
        assert_eq!(
            MetaBlock::decode(&[0u8; 512], &[1; 16], 7, 0, 56, 8),
            MetaParse::Empty
        );
    }

    #[test]
    fn every_byte_flip_and_every_tear_is_detected() {
        let m = sample(504);
        let mut b = vec![0u8; 4096];
        m.encode(&mut b, &[1; 16], 0, 0, 8);
        for i in 0..b.len() {
            let mut c = b.clone();
            c[i] ^= 0x01;
            assert!(
                matches!(
                    MetaBlock::decode(&c, &[1; 16], 0, 0, 504, 8),
                    MetaParse::Invalid(_)
                ),
                "flip {i}"
            );
        }
        let mut newer = vec![0u8; 4096];
        let mut m2 = m.clone();
        m2.generation = 5;
        m2.set_tag(100, &Profile::Crc32c.generate(&[1; 16], 100, &[1; 4096]));
        m2.encode(&mut newer, &[1; 16], 0, 0, 8);
        for sector in 0..8 {
            if b[sector * 512..(sector + 1) * 512] == newer[sector * 512..(sector + 1) * 512] {
                continue; // this sector is the same in both versions: no tear to detect
            }
            let mut torn = b.clone();
            torn[sector * 512..(sector + 1) * 512].copy_from_slice(&newer[sector * 512..(sector + 1) * 512]);
            let r = MetaBlock::decode(&torn, &[1; 16], 0, 0, 504, 8);
            assert!(
                matches!(r, MetaParse::Invalid(_)),
                "tear at sector {sector} accepted"
            );
        }
    }
}
