//! The keyed profiles: `hmac-sha256` and `blake3-keyed`, untruncated 32-byte MACs over
//! data ‖ uuid ‖ u64le(block). Without the key, nobody with raw access to the disk can make a
//! block and a tag that verify (G6); a changed, moved or replayed-from-another-volume block
//! fails like a damaged one. (A block of the same volume and address replayed from an older
//! state with its older tag is not caught by the tag alone: the metadata generations are.)
//!
//! The key itself is never stored. The superblock keeps a key-check value: the MAC, under
//! the same key and algorithm, of the 36-byte message `"blockguard key check" ‖ uuid`. A wrong
//! key is refused at open, before anything is written; the check value reveals nothing of the
//! key, and it cannot pass for a block's tag, whose message is at least 512 + 24 bytes long.
//! The same construction with another label seals a re-tag from a keyed profile to an unkeyed
//! one ([`super::Tagger::retag_seal`]), so that only a holder of the key can start one.

use super::{written, Profile, Tag, TagKey, TagScheme, KEY_CHECK_SIZE};
use hmac::{Hmac, Mac as _};

/// The key-check message's fixed prefix.
const KEY_CHECK_LABEL: &[u8; 20] = b"blockguard key check";

/// `hmac-sha256`: HMAC-SHA256(key, data ‖ uuid ‖ u64le(block)), 32 bytes.
pub(super) struct HmacSha256 {
    /// The HMAC with the key already absorbed (its inner and outer pads hashed), cloned per
    /// block: saves two SHA-256 compressions per block.
    keyed: Hmac<sha2::Sha256>,
    uuid: [u8; 16],
}

impl HmacSha256 {
    pub(super) fn new(uuid: &[u8; 16], key: &TagKey) -> HmacSha256 {
        HmacSha256 {
            keyed: keyed_hmac(key),
            uuid: *uuid,
        }
    }
}

/// HMAC-SHA256 keyed with `key`.
fn keyed_hmac(key: &TagKey) -> Hmac<sha2::Sha256> {
    // HMAC takes keys of any length: this cannot fail.
    <Hmac<sha2::Sha256> as hmac::Mac>::new_from_slice(key.bytes())
        .unwrap_or_else(|_| unreachable!("HMAC accepts keys of every length"))
}

impl TagScheme for HmacSha256 {
    fn profile(&self) -> Profile {
        Profile::HmacSha256
    }

    fn generate(&self, block: u64, data: &[u8]) -> Tag {
        let mut m = self.keyed.clone();
        m.update(data);
        m.update(&self.uuid);
        m.update(&block.to_le_bytes());
        written(&m.finalize().into_bytes())
    }

    fn key_check(&self) -> Option<[u8; KEY_CHECK_SIZE]> {
        self.seal(KEY_CHECK_LABEL)
    }

    fn seal(&self, label: &[u8]) -> Option<[u8; KEY_CHECK_SIZE]> {
        let mut m = self.keyed.clone();
        m.update(label);
        m.update(&self.uuid);
        let mut out = [0u8; KEY_CHECK_SIZE];
        out.copy_from_slice(&m.finalize().into_bytes());
        Some(out)
    }
}

/// `blake3-keyed`: BLAKE3 in keyed mode, key = the 32-byte key, over data ‖ uuid ‖
/// u64le(block), 32 bytes.
pub(super) struct Blake3Keyed {
    key: [u8; 32],
    uuid: [u8; 16],
}

impl Blake3Keyed {
    pub(super) fn new(uuid: &[u8; 16], key: &TagKey) -> Blake3Keyed {
        Blake3Keyed {
            key: *key.bytes(),
            uuid: *uuid,
        }
    }
}

impl Drop for Blake3Keyed {
    fn drop(&mut self) {
        // Best effort, as for `TagKey`.
        self.key = [0; 32];
        std::hint::black_box(&self.key);
    }
}

impl TagScheme for Blake3Keyed {
    fn profile(&self) -> Profile {
        Profile::Blake3Keyed
    }

    fn generate(&self, block: u64, data: &[u8]) -> Tag {
        let mut h = blake3::Hasher::new_keyed(&self.key);
        h.update(data);
        h.update(&self.uuid);
        h.update(&block.to_le_bytes());
        written(h.finalize().as_bytes())
    }

    fn key_check(&self) -> Option<[u8; KEY_CHECK_SIZE]> {
        self.seal(KEY_CHECK_LABEL)
    }

    fn seal(&self, label: &[u8]) -> Option<[u8; KEY_CHECK_SIZE]> {
        let mut h = blake3::Hasher::new_keyed(&self.key);
        h.update(label);
        h.update(&self.uuid);
        Some(*h.finalize().as_bytes())
    }
}

#[cfg(test)]
mod tests {
    use super::super::tests::hex;
    use super::*;

    /// RFC 4231, test cases 1 and 2: the HMAC-SHA256 this profile is built on.
    #[test]
    fn rfc4231_vectors() {
        let mac = |key: &[u8], data: &[u8]| {
            let mut m = <Hmac<sha2::Sha256> as hmac::Mac>::new_from_slice(key).unwrap();
            m.update(data);
            hex(&m.finalize().into_bytes())
        };
        assert_eq!(
            mac(&[0x0b; 20], b"Hi There"),
            "b0344c61d8db38535ca8afceaf0bf12b881dc200c9833da726e9376c2e32cff7"
        );
        assert_eq!(
            mac(b"Jefe", b"what do ya want for nothing?"),
            "5bdcc146bf60754e6a042426089575c75a003f089d2739839dec58b964ec3843"
        );
    }

    /// The official BLAKE3 test vectors (input: bytes 0, 1, …, 250 repeated; key "whats the
    /// Elvish word for friend"), first 32 bytes of the output.
    #[test]
    fn blake3_official_vectors() {
        let key = *b"whats the Elvish word for friend";
        let input: Vec<u8> = (0..4096u32).map(|i| u8::try_from(i % 251).unwrap()).collect();
        let cases = [
            (
                1024,
                "42214739f095a406f3fc83deb889744ac00df831c10daa55189b5d121c855af7",
                "75c46f6f3d9eb4f55ecaaee480db732e6c2105546f1e675003687c31719c7ba4",
            ),
            (
                4096,
                "015094013f57a5277b59d8475c0501042c0b642e531b0a1c8f58d2163229e969",
                "befc660aea2f1718884cd8deb9902811d332f4fc4a38cf7c7300d597a081bfc0",
            ),
        ];
        for (len, hash, keyed) in cases {
            assert_eq!(hex(blake3::hash(&input[..len]).as_bytes()), hash, "{len}");
            assert_eq!(
                hex(blake3::keyed_hash(&key, &input[..len]).as_bytes()),
                keyed,
                "{len}"
            );
        }
        // The profile is keyed BLAKE3 of data ‖ uuid ‖ u64le(block).
        let k = TagKey::from_bytes(&key).unwrap();
        let mut msg = input.clone();
        msg.extend_from_slice(&[2; 16]);
        msg.extend_from_slice(&3u64.to_le_bytes());
        assert_eq!(
            Blake3Keyed::new(&[2; 16], &k).generate(3, &input).as_bytes(),
            blake3::keyed_hash(&key, &msg).as_bytes()
        );
        let mut m = <Hmac<sha2::Sha256> as hmac::Mac>::new_from_slice(&key).unwrap();
        m.update(&msg);
        assert_eq!(
            HmacSha256::new(&[2; 16], &k).generate(3, &input).as_bytes(),
            &m.finalize().into_bytes()[..]
        );
    }
}
