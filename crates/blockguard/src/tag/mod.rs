//! Tag profiles: how a block's tag is generated and verified.
//!
//! A tag is a short value stored for every data block. It is computed right before the block
//! is written and checked right after it is read. Every profile binds the block's content and
//! its address (block number) into the tag, and the volume's identity as far as its layout
//! allows (the checksum and hash profiles bind the whole UUID; the T10/NVMe protection
//! information profiles 16 bits of it, in the application tag), so a block that lands at, or
//! is read from, the wrong address (or the wrong volume) fails verification.
//!
//! The all-zero tag is reserved for [`UNWRITTEN`]: a block that holds no data since format
//! (or since a discard). It matches a block only if the block reads as all zeros, so damaged
//! metadata can never turn real data into silently returned zeros. No profile generates it
//! for a written block (`docs/FORMAT.md`, "Tags", says how for each).
//!
//! A [`Profile`] names an algorithm (stored in the superblock by its [`Profile::id`]); a
//! [`TagScheme`] is one profile made ready for one volume (its UUID, and its key if the
//! profile is keyed); a [`Tagger`] is what the engine holds: a scheme behind one indirect
//! call, so keys never live in the superblock type. The families, one module each:
//! `checksum` (`crc32c`, `xxh3`, `crc64-nvme`), `pi` (T10 DIF and NVMe protection
//! information), `hash` (`sha256`, `blake3`) and `keyed` (`hmac-sha256`, `blake3-keyed`).

mod checksum;
mod hash;
mod keyed;
mod pi;

pub use checksum::crc32c_seeded;
pub use pi::{crc16_t10dif, crc64_nvme, ip_checksum, pi_app_tag};

use serde::Serialize;
use std::fmt;

/// Largest tag any profile may use, in bytes (a full HMAC-SHA256 or keyed BLAKE3).
pub const MAX_TAG_SIZE: usize = 32;

/// The reserved tag of a block that holds no data (reads as zeros).
pub const UNWRITTEN: Tag = Tag {
    bytes: [0; MAX_TAG_SIZE],
    len: 0,
};

/// A tag value; `len` bytes of `bytes` are significant, the rest are zero.
///
/// Two tags are equal when their bytes are, padded with zeros: a volume's tag slots may be
/// wider than its profile's tags (`docs/FORMAT.md`, "Tag slots"), and a tag read from a
/// slot (all of its bytes) must equal the shorter tag computed from the data when the slot
/// holds that tag followed by zeros.
#[derive(Clone, Copy)]
pub struct Tag {
    bytes: [u8; MAX_TAG_SIZE],
    len: u8,
}

impl PartialEq for Tag {
    fn eq(&self, other: &Tag) -> bool {
        // Equal lengths are the common case; unequal ones compare as padded with zeros,
        // which `bytes` already is past `len`.
        self.bytes == other.bytes
    }
}

impl Eq for Tag {}

impl std::hash::Hash for Tag {
    fn hash<H: std::hash::Hasher>(&self, state: &mut H) {
        self.bytes.hash(state);
    }
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

    /// The stored bytes of the tag in a slot of `size` bytes: the tag, then zeros (the
    /// unwritten tag is all zeros).
    pub fn to_bytes(&self, size: usize) -> [u8; MAX_TAG_SIZE] {
        debug_assert!(self.bytes[size.min(MAX_TAG_SIZE)..].iter().all(|&b| b == 0));
        self.bytes
    }

    /// True if `slot`, the stored bytes of a tag slot, hold exactly this tag: its bytes,
    /// then zeros to the end of the slot. The unwritten tag matches an all-zero slot.
    ///
    /// ```
    /// use blockguard::tag::Tag;
    /// let t = Tag::from_bytes(&[1, 2, 3, 4, 5, 6, 7, 8]);
    /// assert!(t.matches_slot(&[1, 2, 3, 4, 5, 6, 7, 8]));
    /// assert!(t.matches_slot(&[1, 2, 3, 4, 5, 6, 7, 8, 0, 0, 0, 0, 0, 0, 0, 0]));
    /// assert!(!t.matches_slot(&[1, 2, 3, 4, 5, 6, 7, 8, 0, 0, 0, 0, 0, 0, 0, 9]));
    /// ```
    #[inline]
    pub fn matches_slot(&self, slot: &[u8]) -> bool {
        let n = self.len as usize;
        slot.len() >= n && slot[..n] == self.bytes[..n] && slot[n..].iter().all(|&b| b == 0)
    }

    /// The significant bytes (empty for the unwritten tag).
    pub fn as_bytes(&self) -> &[u8] {
        &self.bytes[..self.len as usize]
    }

    /// True for the reserved "no data" tag.
    pub fn is_unwritten(&self) -> bool {
        self.len == 0
    }

    /// The reserved tag of a block that a crash tore and that no complete version of
    /// survived, for slots of `slot` bytes: every byte of the slot `0xFF`. It matches no
    /// data — no profile generates it (`docs/FORMAT.md`, "Tags") — so the block fails every
    /// read until it is written again.
    ///
    /// Recovery stores it rather than leaving the tag of the torn write's version in place:
    /// that tag would stay acceptable as the older brother of the block's next write, and a
    /// torn next write could complete the old version's missing sectors, bringing back a
    /// version that was never durable.
    ///
    /// ```
    /// use blockguard::tag::Tag;
    /// let torn = Tag::torn(16);
    /// assert!(torn.is_torn() && !torn.is_unwritten());
    /// assert!(torn.matches_slot(&[0xFF; 16]));
    /// assert_eq!(Tag::from_bytes(&[0xFF; 16]), torn);
    /// assert_eq!(torn.to_string(), "torn");
    /// ```
    ///
    /// # Panics
    ///
    /// If `slot` is 0 or larger than [`MAX_TAG_SIZE`]: a volume's slot size is checked when
    /// its superblock is parsed, so only a bug can get here.
    pub fn torn(slot: usize) -> Tag {
        assert!(
            slot > 0 && slot <= MAX_TAG_SIZE,
            "a tag slot is 1..={MAX_TAG_SIZE} bytes, not {slot}"
        );
        let mut bytes = [0; MAX_TAG_SIZE];
        bytes[..slot].fill(0xFF);
        #[allow(clippy::cast_possible_truncation)] // At most `MAX_TAG_SIZE` (asserted above).
        let len = slot as u8;
        Tag { bytes, len }
    }

    /// True for the reserved "torn by a crash" tag ([`Tag::torn`]) of any slot size.
    pub fn is_torn(&self) -> bool {
        self.len > 0 && self.bytes[..self.len as usize].iter().all(|&b| b == 0xFF)
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
        if self.is_torn() {
            return f.write_str("torn");
        }
        // A tag read from a wider slot than its profile's tags is shown as the profile's:
        // without the zeros that pad it (the first tag size after which only zeros follow).
        let len = self.len as usize;
        let shown = [8, 16]
            .into_iter()
            .find(|&s| s < len && self.bytes[s..len].iter().all(|&b| b == 0))
            .unwrap_or(len);
        for b in &self.bytes[..shown] {
            write!(f, "{b:02x}")?;
        }
        Ok(())
    }
}

/// The tag profiles a volume can be formatted with. The numeric value is stored in the
/// superblock; a profile this build does not know makes the volume refuse to open.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize)]
#[serde(rename_all = "kebab-case")]
#[non_exhaustive]
pub enum Profile {
    /// 8 bytes: crc32c guard over (volume UUID, block number, data), an application tag
    /// marking the entry as written, and the low 16 bits of the block number as reference tag.
    Crc32c,
    /// 8 bytes: XXH3-64 of the data, seeded with a hash of (volume UUID, block number).
    Xxh3,
    /// 8 bytes: CRC-64/NVME over (data, volume UUID, block number).
    Crc64Nvme,
    /// 8 bytes, T10 DIF Type 1 as SBC lays it out (big-endian): CRC-16/T10-DIF guard over the
    /// data, a 16-bit application tag derived from the volume UUID, and the low 32 bits of the
    /// block number as reference tag.
    T10Dif,
    /// [`Profile::T10Dif`] with the IP checksum (RFC 1071) as guard.
    T10DifIp,
    /// 16 bytes, NVMe's "64b Guard" protection information (big-endian): CRC-64/NVME guard over
    /// the data, application tag as [`Profile::T10Dif`], 48-bit reference tag.
    NvmePi64,
    /// 16 bytes: SHA-256 of (data, volume UUID, block number), truncated to 128 bits.
    Sha256,
    /// 16 bytes: BLAKE3 of (data, volume UUID, block number), truncated to 128 bits.
    Blake3,
    /// 32 bytes, keyed: HMAC-SHA256 of (data, volume UUID, block number), untruncated.
    HmacSha256,
    /// 32 bytes, keyed: BLAKE3 in keyed mode over (data, volume UUID, block number),
    /// untruncated.
    Blake3Keyed,
}

impl Profile {
    /// Every profile this build knows, in id order.
    pub const ALL: [Profile; 10] = [
        Profile::Crc32c,
        Profile::Xxh3,
        Profile::Crc64Nvme,
        Profile::T10Dif,
        Profile::T10DifIp,
        Profile::NvmePi64,
        Profile::Sha256,
        Profile::Blake3,
        Profile::HmacSha256,
        Profile::Blake3Keyed,
    ];

    /// The identifier stored in the superblock (`docs/FORMAT.md`, "Superblock").
    pub fn id(self) -> u16 {
        match self {
            Profile::Crc32c => 1,
            Profile::Xxh3 => 2,
            Profile::Crc64Nvme => 3,
            Profile::T10Dif => 4,
            Profile::T10DifIp => 5,
            Profile::NvmePi64 => 6,
            Profile::Sha256 => 7,
            Profile::Blake3 => 8,
            Profile::HmacSha256 => 9,
            Profile::Blake3Keyed => 10,
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
            Profile::Xxh3 => "xxh3",
            Profile::Crc64Nvme => "crc64-nvme",
            Profile::T10Dif => "t10-dif",
            Profile::T10DifIp => "t10-dif-ip",
            Profile::NvmePi64 => "nvme-pi64",
            Profile::Sha256 => "sha256",
            Profile::Blake3 => "blake3",
            Profile::HmacSha256 => "hmac-sha256",
            Profile::Blake3Keyed => "blake3-keyed",
        }
    }

    /// Parses a command-line name.
    pub fn from_name(name: &str) -> Option<Profile> {
        Profile::ALL.into_iter().find(|p| p.name() == name)
    }

    /// Size of one stored tag in bytes (8, 16 or 32).
    pub fn tag_size(self) -> usize {
        match self {
            Profile::Crc32c | Profile::Xxh3 | Profile::Crc64Nvme | Profile::T10Dif | Profile::T10DifIp => 8,
            Profile::NvmePi64 | Profile::Sha256 | Profile::Blake3 => 16,
            Profile::HmacSha256 | Profile::Blake3Keyed => 32,
        }
    }

    /// True if the profile needs a secret key (given at format and at every open).
    pub fn is_keyed(self) -> bool {
        matches!(self, Profile::HmacSha256 | Profile::Blake3Keyed)
    }

    /// One line on what the profile is for, for `--help` and `info`.
    pub fn summary(self) -> &'static str {
        match self {
            Profile::Crc32c => "8-byte CRC-32C over volume, address and data (the default)",
            Profile::Xxh3 => "8-byte XXH3-64, seeded by volume and address; fastest",
            Profile::Crc64Nvme => "8-byte CRC-64/NVME over data, volume and address",
            Profile::T10Dif => {
                "8-byte T10 DIF Type 1 tuple: CRC-16 guard, application tag, 32-bit reference tag"
            }
            Profile::T10DifIp => "8-byte T10 DIF Type 1 tuple with the IP checksum as guard",
            Profile::NvmePi64 => {
                "16-byte NVMe 64b-guard PI tuple: CRC-64 guard, application tag, 48-bit reference tag"
            }
            Profile::Sha256 => "16-byte SHA-256 (truncated) over data, volume and address",
            Profile::Blake3 => "16-byte BLAKE3 (truncated) over data, volume and address",
            Profile::HmacSha256 => "32-byte HMAC-SHA256, keyed (--key-file): forgery needs the key",
            Profile::Blake3Keyed => {
                "32-byte keyed BLAKE3 (--key-file): forgery needs the key; faster than HMAC"
            }
        }
    }

    /// Makes the profile ready for volume `uuid`: its [`Tagger`]. Keyed profiles need `key`,
    /// the others refuse one.
    ///
    /// ```
    /// use blockguard::tag::Profile;
    /// let uuid = [7u8; 16];
    /// let t = Profile::Crc32c.tagger(&uuid, None).unwrap();
    /// let tag = t.generate(5, &[1u8; 4096]);
    /// assert!(t.verify(5, &[1u8; 4096], &tag));
    /// assert!(!t.verify(6, &[1u8; 4096], &tag)); // misdirected
    /// ```
    pub fn tagger(self, uuid: &[u8; 16], key: Option<&TagKey>) -> Result<Tagger, KeyError> {
        let scheme: Box<dyn TagScheme> = match (self, key) {
            (Profile::HmacSha256 | Profile::Blake3Keyed, None) => {
                return Err(KeyError::Missing { profile: self.name() })
            }
            (Profile::HmacSha256, Some(k)) => Box::new(keyed::HmacSha256::new(uuid, k)),
            (Profile::Blake3Keyed, Some(k)) => Box::new(keyed::Blake3Keyed::new(uuid, k)),
            (_, Some(_)) => return Err(KeyError::NotKeyed { profile: self.name() }),
            (Profile::Crc32c, None) => Box::new(checksum::Crc32c::new(uuid)),
            (Profile::Xxh3, None) => Box::new(checksum::Xxh3::new(uuid)),
            (Profile::Crc64Nvme, None) => Box::new(checksum::Crc64Nvme::new(uuid)),
            (Profile::T10Dif, None) => Box::new(pi::T10Dif::new(uuid, pi::Guard::Crc)),
            (Profile::T10DifIp, None) => Box::new(pi::T10Dif::new(uuid, pi::Guard::Ip)),
            (Profile::NvmePi64, None) => Box::new(pi::NvmePi64::new(uuid)),
            (Profile::Sha256, None) => Box::new(hash::Sha256Tag::new(uuid)),
            (Profile::Blake3, None) => Box::new(hash::Blake3Tag::new(uuid)),
        };
        debug_assert_eq!(scheme.profile(), self);
        Ok(Tagger { scheme })
    }
}

impl fmt::Display for Profile {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

/// One profile made ready for one volume: generates and verifies the tags of its blocks.
///
/// Implementations precompute what they can from the volume's UUID and key, and never
/// allocate per block: `generate` runs for every block written and `verify` for every block
/// read.
pub trait TagScheme: Send + Sync {
    /// The profile this scheme implements.
    fn profile(&self) -> Profile;

    /// The profile's name on the command line.
    fn name(&self) -> &'static str {
        self.profile().name()
    }

    /// The profile's identifier in the superblock.
    fn id(&self) -> u16 {
        self.profile().id()
    }

    /// Bytes of one stored tag.
    fn tag_size(&self) -> usize {
        self.profile().tag_size()
    }

    /// True if the scheme holds a secret key.
    fn keyed(&self) -> bool {
        self.profile().is_keyed()
    }

    /// The tag of `data` stored at block number `block`. Never [`UNWRITTEN`].
    fn generate(&self, block: u64, data: &[u8]) -> Tag;

    /// True if `data` at `block` matches `tag`. The unwritten tag matches only all-zero data.
    fn verify(&self, block: u64, data: &[u8], tag: &Tag) -> bool {
        if tag.is_unwritten() {
            return is_zero(data);
        }
        self.generate(block, data) == *tag
    }

    /// What a keyed scheme stores in the superblock to recognize its key (`None` for unkeyed
    /// schemes): a value from which the key cannot be recovered.
    fn key_check(&self) -> Option<[u8; KEY_CHECK_SIZE]> {
        None
    }

    /// A keyed scheme's MAC of `label ‖ uuid` (`None` for unkeyed schemes). Labels are short
    /// (under 64 bytes), so no such value can pass for a block's tag.
    fn seal(&self, _label: &[u8]) -> Option<[u8; KEY_CHECK_SIZE]> {
        None
    }
}

/// The tag scheme of an open volume, as the engine holds it: a profile bound to the volume's
/// UUID and, for keyed profiles, its key. Cheap to call per block (one indirect call).
pub struct Tagger {
    scheme: Box<dyn TagScheme>,
}

impl Tagger {
    /// The tagger of a volume described by its superblock fields, checking the key: a keyed
    /// profile needs `key` and `key` must match the stored key-check value; an unkeyed one
    /// refuses a key.
    pub fn for_volume(
        profile: Profile,
        uuid: &[u8; 16],
        stored_key_check: &[u8; KEY_CHECK_SIZE],
        key: Option<&TagKey>,
    ) -> Result<Tagger, KeyError> {
        let t = profile.tagger(uuid, key)?;
        if t.key_check() != *stored_key_check {
            return Err(KeyError::Wrong {
                profile: profile.name(),
            });
        }
        Ok(t)
    }

    /// The profile.
    pub fn profile(&self) -> Profile {
        self.scheme.profile()
    }

    /// The tag of `data` stored at block number `block`.
    #[inline]
    pub fn generate(&self, block: u64, data: &[u8]) -> Tag {
        let t = self.scheme.generate(block, data);
        debug_assert!(!t.is_unwritten() && t.as_bytes().len() == self.scheme.tag_size());
        t
    }

    /// True if `data` at `block` matches `tag` (the unwritten tag matches only zeros).
    #[inline]
    pub fn verify(&self, block: u64, data: &[u8], tag: &Tag) -> bool {
        self.scheme.verify(block, data, tag)
    }

    /// The key-check value to store in the superblock: all zero for unkeyed profiles.
    pub fn key_check(&self) -> [u8; KEY_CHECK_SIZE] {
        self.scheme.key_check().unwrap_or([0; KEY_CHECK_SIZE])
    }

    /// The seal a re-tag from this keyed profile to the unkeyed `target` records in the
    /// superblock (where a keyed target's key-check value goes): a MAC under this volume's
    /// key of `"blockguard re-tag to " ‖ u16le(target id) ‖ uuid`. Without it an attacker who
    /// can write the disk could mark groups as re-tagged to an unkeyed profile and forge
    /// their blocks (G6); with it only a holder of the key can start such a re-tag. `None`
    /// for an unkeyed profile.
    pub fn retag_seal(&self, target: Profile) -> Option<[u8; KEY_CHECK_SIZE]> {
        let mut label = [0u8; RETAG_SEAL_LABEL.len() + 2];
        label[..RETAG_SEAL_LABEL.len()].copy_from_slice(RETAG_SEAL_LABEL);
        label[RETAG_SEAL_LABEL.len()..].copy_from_slice(&target.id().to_le_bytes());
        self.scheme.seal(&label)
    }
}

/// The fixed prefix of the message a re-tag seal is the MAC of ([`Tagger::retag_seal`]).
const RETAG_SEAL_LABEL: &[u8; 21] = b"blockguard re-tag to ";

impl fmt::Debug for Tagger {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        // Never the key.
        f.debug_struct("Tagger")
            .field("profile", &self.profile())
            .finish_non_exhaustive()
    }
}

/// Bytes of a key of the keyed profiles.
pub const KEY_SIZE: usize = 32;
/// Bytes of the key-check value kept in the superblock.
pub const KEY_CHECK_SIZE: usize = 32;

/// A secret key of a keyed profile: 32 bytes. Its `Debug` form shows no key bytes, and its
/// memory is overwritten when it is dropped.
#[derive(Clone)]
pub struct TagKey {
    bytes: [u8; KEY_SIZE],
}

impl TagKey {
    /// A key of exactly [`KEY_SIZE`] bytes.
    pub fn from_bytes(b: &[u8]) -> Result<TagKey, KeyError> {
        let bytes: [u8; KEY_SIZE] = b.try_into().map_err(|_| KeyError::Length { len: b.len() })?;
        Ok(TagKey { bytes })
    }

    /// A key from a key file's contents: 32 raw bytes, or 64 hexadecimal digits optionally
    /// followed by one line end (`head -c 32 /dev/urandom > key` and `openssl rand -hex 32 > key`
    /// both make one).
    pub fn parse(contents: &[u8]) -> Result<TagKey, KeyError> {
        if contents.is_empty() {
            return Err(KeyError::Empty);
        }
        if contents.len() == KEY_SIZE {
            return TagKey::from_bytes(contents);
        }
        let text = contents
            .strip_suffix(b"\r\n")
            .or_else(|| contents.strip_suffix(b"\n"))
            .unwrap_or(contents);
        if text.len() == 2 * KEY_SIZE && text.iter().all(u8::is_ascii_hexdigit) {
            let mut bytes = [0u8; KEY_SIZE];
            for (b, pair) in bytes.iter_mut().zip(text.chunks_exact(2)) {
                *b = (hex_digit(pair[0]) << 4) | hex_digit(pair[1]);
            }
            return Ok(TagKey { bytes });
        }
        Err(KeyError::Length { len: contents.len() })
    }

    /// The key's bytes.
    pub(crate) fn bytes(&self) -> &[u8; KEY_SIZE] {
        &self.bytes
    }
}

/// The value of one ASCII hex digit (checked by the caller).
fn hex_digit(c: u8) -> u8 {
    match c {
        b'0'..=b'9' => c - b'0',
        b'a'..=b'f' => c - b'a' + 10,
        b'A'..=b'F' => c - b'A' + 10,
        _ => 0,
    }
}

impl fmt::Debug for TagKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("TagKey(..)")
    }
}

impl Drop for TagKey {
    fn drop(&mut self) {
        // Best effort: overwrite the key before its memory is reused. `black_box` keeps the
        // compiler from dropping the stores as dead (no `unsafe` volatile writes needed).
        self.bytes = [0; KEY_SIZE];
        std::hint::black_box(&self.bytes);
    }
}

/// Why a key cannot be used with a profile or a volume.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum KeyError {
    /// A keyed profile without a key.
    #[error("tag profile {profile} is keyed: it needs its key (--key-file)")]
    Missing {
        /// The profile's name.
        profile: &'static str,
    },
    /// A key for a profile that takes none.
    #[error("tag profile {profile} takes no key, but one was given")]
    NotKeyed {
        /// The profile's name.
        profile: &'static str,
    },
    /// The key does not match the volume's key-check value.
    #[error("wrong key: it does not match the key-check value stored for tag profile {profile}")]
    Wrong {
        /// The profile's name.
        profile: &'static str,
    },
    /// The key file holds nothing.
    #[error("the key is empty: a key is 32 raw bytes or 64 hex digits")]
    Empty,
    /// The key is not 32 bytes (or 64 hex digits).
    #[error("the key is {len} bytes: a key is 32 raw bytes or 64 hex digits")]
    Length {
        /// The length found.
        len: usize,
    },
    /// The profile an online re-tag switches to is keyed, and its key was not given.
    #[error("the re-tag target, tag profile {profile}, is keyed: it needs its key (--new-key-file)")]
    RetagMissing {
        /// The target profile's name.
        profile: &'static str,
    },
    /// A key for the target of a re-tag whose profile takes none.
    #[error("the re-tag target, tag profile {profile}, takes no key, but one was given (--new-key-file)")]
    RetagNotKeyed {
        /// The target profile's name.
        profile: &'static str,
    },
    /// The key given for a re-tag's target does not match the key-check value recorded for
    /// it.
    #[error(
        "wrong key for the re-tag target: it does not match the key-check value stored for tag \
         profile {profile} (--new-key-file)"
    )]
    RetagWrong {
        /// The target profile's name.
        profile: &'static str,
    },
    /// The superblock records a re-tag of this keyed volume to an unkeyed profile that was
    /// not sealed with the volume's key: someone without the key marked groups as re-tagged
    /// to a profile anyone can forge (G6). Refused.
    #[error(
        "the re-tag to tag profile {profile} recorded on the volume is not sealed with this volume's \
         key: it was not started by a holder of the key, and would let blocks be forged"
    )]
    RetagUnsealed {
        /// The target profile's name.
        profile: &'static str,
    },
    /// The superblock records a re-tag of this keyed volume to an unkeyed profile, sealed
    /// with its key, and the opener did not say it knows of one (`OpenOptions::retag_to`,
    /// `--retag-to`): a record its holder made once may have been put back. Refused.
    #[error(
        "a re-tag of this keyed volume to the unkeyed tag profile {profile} is in progress: \
         finish it (`blockguard retag VOLUME --profile {profile}` with --key-file), or confirm it \
         with --retag-to {profile}. Refused unconfirmed, because a record of an old re-tag put \
         back on the disk would let blocks be forged"
    )]
    RetagUnconfirmed {
        /// The target profile's name.
        profile: &'static str,
    },
}

impl KeyError {
    /// The same problem, about the key of a re-tag's target profile (`--new-key-file`).
    #[must_use]
    pub fn for_retag(self) -> KeyError {
        match self {
            KeyError::Missing { profile } => KeyError::RetagMissing { profile },
            KeyError::NotKeyed { profile } => KeyError::RetagNotKeyed { profile },
            KeyError::Wrong { profile } => KeyError::RetagWrong { profile },
            other => other,
        }
    }
}

/// `bytes` as a written tag: if they happen to be all zero (the reserved [`UNWRITTEN`]
/// value), the last byte is set to 1; if they are all `0xFF` (the reserved [`Tag::torn`]
/// value), the last byte is set to `0xFE`. For the hash and checksum profiles, whose outputs
/// are either with probability 2^-64 or less; deterministic, so verification computes the
/// same.
fn written(bytes: &[u8]) -> Tag {
    debug_assert!(bytes.len() <= MAX_TAG_SIZE && !bytes.is_empty());
    let mut b = [0u8; MAX_TAG_SIZE];
    b[..bytes.len()].copy_from_slice(bytes);
    if is_zero(bytes) {
        b[bytes.len() - 1] = 1;
    } else if bytes.iter().all(|&x| x == 0xFF) {
        b[bytes.len() - 1] = 0xFE;
    }
    #[allow(clippy::cast_possible_truncation)] // At most `MAX_TAG_SIZE` (asserted above).
    let len = bytes.len() as u8;
    Tag { bytes: b, len }
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
pub(super) mod tests {
    use super::*;
    use std::fmt::Write as _;

    /// Lower-case hex, as test vectors are printed.
    pub(super) fn hex(b: &[u8]) -> String {
        b.iter().fold(String::new(), |mut s, x| {
            // Writing to a `String` cannot fail.
            let _ = write!(s, "{x:02x}");
            s
        })
    }

    fn key(b: u8) -> TagKey {
        TagKey::from_bytes(&[b; KEY_SIZE]).unwrap()
    }

    fn tagger(p: Profile, uuid: &[u8; 16]) -> Tagger {
        p.tagger(uuid, p.is_keyed().then(|| key(0x5A)).as_ref()).unwrap()
    }

    #[test]
    fn ids_names_and_sizes_are_consistent() {
        for (i, p) in Profile::ALL.into_iter().enumerate() {
            assert_eq!(usize::from(p.id()), i + 1, "{p}: ids are dense, in ALL's order");
            assert_eq!(Profile::from_id(p.id()), Some(p));
            assert_eq!(Profile::from_name(p.name()), Some(p));
            assert!([8, 16, 32].contains(&p.tag_size()), "{p}");
            let t = tagger(p, &[3; 16]);
            assert_eq!(t.scheme.tag_size(), p.tag_size());
            assert_eq!(t.scheme.keyed(), p.is_keyed());
            assert_eq!((t.scheme.name(), t.scheme.id()), (p.name(), p.id()));
            assert_eq!(t.generate(1, &[9; 512]).as_bytes().len(), p.tag_size(), "{p}");
            assert_eq!(t.key_check() != [0; KEY_CHECK_SIZE], p.is_keyed(), "{p}");
        }
        assert_eq!(Profile::from_id(0), None);
        assert_eq!(Profile::from_id(11), None);
        assert_eq!(Profile::from_name("crc16"), None);
    }

    #[test]
    fn every_profile_binds_content_address_and_volume() {
        let a = [1u8; 16];
        let b = [2u8; 16];
        let data = vec![0xAB; 4096];
        for p in Profile::ALL {
            let t = tagger(p, &a);
            let tag = t.generate(10, &data);
            assert!(!tag.is_unwritten());
            assert!(t.verify(10, &data, &tag), "{p}");
            assert!(!t.verify(11, &data, &tag), "{p}: misdirected");
            assert!(!tagger(p, &b).verify(10, &data, &tag), "{p}: another volume");
            let mut flipped = data.clone();
            flipped[100] ^= 1;
            assert!(!t.verify(10, &flipped, &tag), "{p}: bit flip");
        }
    }

    #[test]
    fn written_tag_is_never_unwritten_even_for_zero_data() {
        for p in Profile::ALL {
            for uuid in [[0u8; 16], [0xFF; 16]] {
                let t = tagger(p, &uuid);
                for block in [0, 1, 1 << 32, u64::MAX] {
                    let tag = t.generate(block, &[0u8; 512]);
                    assert!(!tag.is_unwritten(), "{p} block {block}");
                    let size = p.tag_size();
                    assert_eq!(Tag::from_bytes(&tag.to_bytes(size)[..size]), tag);
                }
            }
        }
        assert_eq!(written(&[0; 8]).as_bytes(), &[0, 0, 0, 0, 0, 0, 0, 1]);
        assert_eq!(written(&[5; 16]).as_bytes(), &[5; 16]);
    }

    #[test]
    fn no_written_tag_is_torn_and_torn_matches_nothing() {
        let mut ff = [0xFFu8; 32];
        ff[31] = 0xFE;
        assert_eq!(written(&[0xFF; 32]).as_bytes(), &ff[..]);
        assert_eq!(written(&[0xFF; 8]).as_bytes(), &ff[24..]);
        for p in Profile::ALL {
            let t = tagger(p, &[0xFF; 16]);
            for data in [vec![0u8; 512], vec![0xFFu8; 512], vec![0x5Au8; 4096]] {
                for block in [0, 1, u64::from(u32::MAX), (1 << 48) - 1, u64::MAX] {
                    let tag = t.generate(block, &data);
                    assert!(!tag.is_torn(), "{p} block {block}: {tag}");
                    for slot in [8, 16, 32] {
                        if slot >= p.tag_size() {
                            assert!(!t.verify(block, &data, &Tag::torn(slot)), "{p} slot {slot}");
                            assert!(!Tag::torn(slot).matches_slot(&tag.to_bytes(slot)[..slot]));
                        }
                    }
                }
            }
        }
        // Torn is slot-wide: a shorter tag of all-FF bytes, padded with zeros, is not it.
        assert!(
            !Tag::from_bytes(&[0xFF, 0xFF, 0xFF, 0xFF, 0xFF, 0xFF, 0xFF, 0xFF, 0, 0, 0, 0, 0, 0, 0, 0])
                .is_torn()
        );
        assert_eq!(Tag::torn(32).to_string(), "torn");
    }

    #[test]
    fn unwritten_matches_only_zeros() {
        for p in Profile::ALL {
            let t = tagger(p, &[0; 16]);
            assert!(t.verify(3, &[0u8; 4096], &UNWRITTEN), "{p}");
            let mut d = vec![0u8; 4096];
            d[4095] = 1;
            assert!(!t.verify(3, &d, &UNWRITTEN), "{p}");
        }
        assert!(is_zero(&[]));
        assert!(!is_zero(&[0, 0, 0, 1]));
    }

    #[test]
    fn keys_are_checked() {
        let uuid = [4u8; 16];
        for p in Profile::ALL {
            if p.is_keyed() {
                assert_eq!(
                    p.tagger(&uuid, None).unwrap_err(),
                    KeyError::Missing { profile: p.name() }
                );
                let right = p.tagger(&uuid, Some(&key(1))).unwrap();
                let check = right.key_check();
                assert!(Tagger::for_volume(p, &uuid, &check, Some(&key(1))).is_ok());
                assert_eq!(
                    Tagger::for_volume(p, &uuid, &check, Some(&key(2))).unwrap_err(),
                    KeyError::Wrong { profile: p.name() }
                );
                // Another key makes other tags: a block cannot be forged without it.
                let wrong = p.tagger(&uuid, Some(&key(2))).unwrap();
                let tag = right.generate(0, &[1; 512]);
                assert!(!wrong.verify(0, &[1; 512], &tag), "{p}");
                // The check value differs per volume too.
                assert_ne!(p.tagger(&[5; 16], Some(&key(1))).unwrap().key_check(), check);
            } else {
                assert_eq!(
                    p.tagger(&uuid, Some(&key(1))).unwrap_err(),
                    KeyError::NotKeyed { profile: p.name() }
                );
                assert!(Tagger::for_volume(p, &uuid, &[0; KEY_CHECK_SIZE], None).is_ok());
                assert!(Tagger::for_volume(p, &uuid, &[1; KEY_CHECK_SIZE], None).is_err());
            }
        }
    }

    #[test]
    fn key_files_parse_raw_or_hex() {
        let raw: Vec<u8> = (0..32).collect();
        assert_eq!(TagKey::parse(&raw).unwrap().bytes(), &raw[..]);
        let hex = hex(&raw);
        for text in [
            hex.clone(),
            format!("{hex}\n"),
            format!("{}\r\n", hex.to_uppercase()),
        ] {
            assert_eq!(
                TagKey::parse(text.as_bytes()).unwrap().bytes(),
                &raw[..],
                "{text:?}"
            );
        }
        assert_eq!(TagKey::parse(b"").unwrap_err(), KeyError::Empty);
        assert_eq!(TagKey::parse(&[1; 31]).unwrap_err(), KeyError::Length { len: 31 });
        assert_eq!(TagKey::parse(&[1; 33]).unwrap_err(), KeyError::Length { len: 33 });
        let bad_hex = format!("{}zz", &hex[..62]);
        assert!(TagKey::parse(bad_hex.as_bytes()).is_err());
        assert_eq!(format!("{:?}", key(0x41)), "TagKey(..)");
        let t = Profile::HmacSha256.tagger(&[0; 16], Some(&key(0x41))).unwrap();
        assert!(!format!("{t:?}").contains("41"), "{t:?}");
    }

    proptest::proptest! {
        /// Every profile detects any single bit flip, a wrong address and (where it binds the
        /// whole UUID) a wrong volume. The T10/NVMe PI profiles bind 16 bits of the volume in
        /// their application tag: two volumes whose tags coincide cannot be told apart there.
        #[test]
        fn every_profile_detects_flips_addresses_and_volumes(
            data in proptest::collection::vec(proptest::prelude::any::<u8>(), 512..=512),
            bit in 0usize..4096,
            block in proptest::prelude::any::<u64>(),
            other in proptest::prelude::any::<u64>(),
            uuid in proptest::prelude::any::<[u8; 16]>(),
            uuid2 in proptest::prelude::any::<[u8; 16]>(),
        ) {
            for p in Profile::ALL {
                let t = tagger(p, &uuid);
                let tag = t.generate(block, &data);
                proptest::prop_assert!(t.verify(block, &data, &tag));
                let mut flipped = data.clone();
                flipped[bit / 8] ^= 1 << (bit % 8);
                proptest::prop_assert!(!t.verify(block, &flipped, &tag), "{} bit {}", p, bit);
                // The T10 reference tag holds the low 32 bits of the address, NVMe's 48.
                let span = match p {
                    Profile::T10Dif | Profile::T10DifIp => 1u64 << 32,
                    Profile::NvmePi64 => 1 << 48,
                    _ => 0,
                };
                if other != block && (span == 0 || (other ^ block) % span != 0) {
                    proptest::prop_assert!(!t.verify(other, &data, &tag), "{} address {}", p, other);
                }
                let pi = matches!(p, Profile::T10Dif | Profile::T10DifIp | Profile::NvmePi64);
                if uuid2 != uuid && (!pi || pi_app_tag(&uuid) != pi_app_tag(&uuid2)) {
                    proptest::prop_assert!(!tagger(p, &uuid2).verify(block, &data, &tag), "{} volume", p);
                }
            }
        }
    }
}
