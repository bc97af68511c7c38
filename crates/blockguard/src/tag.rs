//! Tag profiles: how a block's tag is generated and verified.
//!
//! A tag is a short value stored for every data block. It is computed right before the block
//! is written and checked right after it is read. Every profile binds three things into the
//! tag: the block's content, its address (block number) and the volume's UUID, so a block
//! that lands at, or is read from, the wrong address (or the wrong volume) fails verification.
//!
//! The all-zero tag is reserved for [`UNWRITTEN`]: a block that holds no data since format
//! (or since a discard). It matches a block only if the block reads as all zeros, so damaged
//! metadata can never turn real data into silently returned zeros.

use serde::Serialize;
use std::fmt;

/// Largest tag any profile may use, in bytes (room for SHA-256 or keyed MACs later).
pub const MAX_TAG_SIZE: usize = 32;

/// The reserved tag of a block that holds no data (reads as zeros).
pub const UNWRITTEN: Tag = Tag {
    bytes: [0; MAX_TAG_SIZE],
    len: 0,
};

/// A tag value; `len` bytes of `bytes` are significant, the rest are zero.
#[derive(Clone, Copy, PartialEq, Eq, Hash)]
pub struct Tag {
    bytes: [u8; MAX_TAG_SIZE],
    len: u8,
}

impl Tag {
    /// A tag from its stored bytes (at most [`MAX_TAG_SIZE`]). All-zero bytes mean
    /// [`UNWRITTEN`].
    pub fn from_bytes(b: &[u8]) -> Tag {
        debug_assert!(b.len() <= MAX_TAG_SIZE);
        if b.iter().all(|&x| x == 0) {
            return UNWRITTEN;
        }
        let mut bytes = [0; MAX_TAG_SIZE];
        bytes[..b.len()].copy_from_slice(b);
        #[allow(clippy::cast_possible_truncation)] // At most `MAX_TAG_SIZE`: the copy above checked.
        let len = b.len() as u8;
        Tag { bytes, len }
    }

    /// The stored bytes of the tag (`size` bytes; the unwritten tag is all zeros).
    pub fn to_bytes(&self, size: usize) -> [u8; MAX_TAG_SIZE] {
        debug_assert!(self.is_unwritten() || self.len as usize == size);
        self.bytes
    }

    /// The significant bytes (empty for the unwritten tag).
    pub fn as_bytes(&self) -> &[u8] {
        &self.bytes[..self.len as usize]
    }

    /// True for the reserved "no data" tag.
    pub fn is_unwritten(&self) -> bool {
        self.len == 0
    }
}

impl fmt::Debug for Tag {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Display::fmt(self, f)
    }
}

impl fmt::Display for Tag {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.is_unwritten() {
            return f.write_str("unwritten");
        }
        for b in &self.bytes[..self.len as usize] {
            write!(f, "{b:02x}")?;
        }
        Ok(())
    }
}

/// The tag profiles a volume can be formatted with. The numeric value is stored in the
/// superblock; profiles this build does not know make the volume refuse to open.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum Profile {
    /// 8 bytes: crc32c guard over (volume UUID, block number, data), an application tag
    /// marking the entry as written, and the low 16 bits of the block number as reference tag.
    Crc32c,
}

/// Application tag of the `crc32c` profile: "BG", so a written entry is never all-zero.
const CRC32C_APP_TAG: u16 = 0x4742;

impl Profile {
    /// Every profile this build knows.
    pub const ALL: [Profile; 1] = [Profile::Crc32c];

    /// The identifier stored in the superblock.
    pub fn id(self) -> u16 {
        match self {
            Profile::Crc32c => 1,
        }
    }

    /// The profile with a stored identifier, if this build knows it.
    pub fn from_id(id: u16) -> Option<Profile> {
        Profile::ALL.into_iter().find(|p| p.id() == id)
    }

    /// The profile's name on the command line.
    pub fn name(self) -> &'static str {
        match self {
            Profile::Crc32c => "crc32c",
        }
    }

    /// Parses a command-line name.
    pub fn from_name(name: &str) -> Option<Profile> {
        Profile::ALL.into_iter().find(|p| p.name() == name)
    }

    /// Size of one stored tag in bytes.
    pub fn tag_size(self) -> usize {
        match self {
            Profile::Crc32c => 8,
        }
    }

    /// Computes the tag of `data` stored at block number `block` of volume `uuid`.
    ///
    /// ```
    /// use blockguard::tag::Profile;
    /// let uuid = [7u8; 16];
    /// let t = Profile::Crc32c.generate(&uuid, 5, &[1u8; 4096]);
    /// assert!(Profile::Crc32c.verify(&uuid, 5, &[1u8; 4096], &t));
    /// assert!(!Profile::Crc32c.verify(&uuid, 6, &[1u8; 4096], &t)); // misdirected
    /// ```
    pub fn generate(self, uuid: &[u8; 16], block: u64, data: &[u8]) -> Tag {
        match self {
            Profile::Crc32c => {
                let mut seed = [0u8; 24];
                seed[..16].copy_from_slice(uuid);
                seed[16..].copy_from_slice(&block.to_le_bytes());
                let guard = crc32c_seeded(&seed, data);
                let mut b = [0u8; 8];
                b[0..4].copy_from_slice(&guard.to_le_bytes());
                b[4..6].copy_from_slice(&CRC32C_APP_TAG.to_le_bytes());
                // The low 16 bits of the block number.
                b[6..8].copy_from_slice(&block.to_le_bytes()[..2]);
                Tag::from_bytes(&b)
            }
        }
    }

    /// True if `data` at `block` matches `tag`. The unwritten tag matches only all-zero data.
    pub fn verify(self, uuid: &[u8; 16], block: u64, data: &[u8], tag: &Tag) -> bool {
        if tag.is_unwritten() {
            return is_zero(data);
        }
        self.generate(uuid, block, data) == *tag
    }
}

/// CRC-32C (Castagnoli) of `seed` followed by `data`, by whichever of two implementations
/// of the same function is faster on this CPU: `crc-fast` where AVX-512 with VPCLMULQDQ is
/// available (it folds 64 bytes per instruction), `crc32c` (SSE 4.2 `crc32` in three
/// streams, or portable code) everywhere else. Both give identical results (tested), so
/// volumes move freely between machines.
pub fn crc32c_seeded(seed: &[u8], data: &[u8]) -> u32 {
    if wide_clmul() {
        crc32c_wide(seed, data)
    } else {
        crc32c_narrow(seed, data)
    }
}

fn crc32c_narrow(seed: &[u8], data: &[u8]) -> u32 {
    crc32c::crc32c_append(crc32c::crc32c(seed), data)
}

fn crc32c_wide(seed: &[u8], data: &[u8]) -> u32 {
    let mut d = crc_fast::Digest::new(crc_fast::CrcAlgorithm::Crc32Iscsi);
    d.update(seed);
    d.update(data);
    // CRC-32 results fit in the low 32 bits.
    #[allow(clippy::cast_possible_truncation)] // The high 32 bits are zero (see above).
    let crc = d.finalize() as u32;
    crc
}

/// True if the CPU folds CRCs with 512-bit carry-less multiplies (std caches the detection).
fn wide_clmul() -> bool {
    #[cfg(target_arch = "x86_64")]
    {
        std::arch::is_x86_feature_detected!("avx512f")
            && std::arch::is_x86_feature_detected!("avx512vl")
            && std::arch::is_x86_feature_detected!("vpclmulqdq")
    }
    #[cfg(not(target_arch = "x86_64"))]
    {
        false
    }
}

/// True if every byte of `data` is zero.
pub fn is_zero(data: &[u8]) -> bool {
    // Word-at-a-time is several times faster than a byte loop and needs no unsafe.
    let (chunks, rest) = data.split_at(data.len() - data.len() % 16);
    chunks
        .chunks_exact(16)
        .all(|c| u128::from_le_bytes(c.try_into().unwrap_or([1; 16])) == 0)
        && rest.iter().all(|&b| b == 0)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn crc32c_check_value() {
        assert_eq!(crc32c::crc32c(b"123456789"), 0xE306_9283);
        assert_eq!(crc32c::crc32c(&[0u8; 4096]), 0x98F9_4189);
        for f in [crc32c_narrow, crc32c_wide, crc32c_seeded] {
            assert_eq!(f(b"1234", b"56789"), 0xE306_9283);
            assert_eq!(f(&[], &[0u8; 4096]), 0x98F9_4189);
        }
    }

    proptest::proptest! {
        /// The two implementations are the same function, whatever the lengths and
        /// alignment, so the choice between them can never change a tag.
        #[test]
        fn both_crc32c_implementations_agree(
            seed in proptest::collection::vec(proptest::prelude::any::<u8>(), 0..40),
            data in proptest::collection::vec(proptest::prelude::any::<u8>(), 0..9000),
            skip in 0usize..64,
        ) {
            let d = &data[skip.min(data.len())..];
            proptest::prop_assert_eq!(crc32c_narrow(&seed, d), crc32c_wide(&seed, d));
        }
    }

    #[test]
    fn tag_binds_content_address_and_volume() {
        let p = Profile::Crc32c;
        let a = [1u8; 16];
        let b = [2u8; 16];
        let data = vec![0xAB; 4096];
        let t = p.generate(&a, 10, &data);
        assert!(!t.is_unwritten());
        assert!(p.verify(&a, 10, &data, &t));
        assert!(!p.verify(&a, 11, &data, &t));
        assert!(!p.verify(&b, 10, &data, &t));
        let mut flipped = data.clone();
        flipped[100] ^= 1;
        assert!(!p.verify(&a, 10, &flipped, &t));
    }

    #[test]
    fn written_tag_is_never_unwritten_even_for_zero_data() {
        let t = Profile::Crc32c.generate(&[0; 16], 0, &[0u8; 512]);
        assert!(!t.is_unwritten());
        assert_eq!(Tag::from_bytes(&t.to_bytes(8)[..8]), t);
    }

    #[test]
    fn unwritten_matches_only_zeros() {
        let p = Profile::Crc32c;
        assert!(p.verify(&[0; 16], 3, &[0u8; 4096], &UNWRITTEN));
        let mut d = vec![0u8; 4096];
        d[4095] = 1;
        assert!(!p.verify(&[0; 16], 3, &d, &UNWRITTEN));
        assert!(is_zero(&[]));
        assert!(!is_zero(&[0, 0, 0, 1]));
    }
}
