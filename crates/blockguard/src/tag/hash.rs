//! The cryptographic hash profiles: `sha256` and `blake3`, each truncated to 16 bytes.
//!
//! Unkeyed, so anyone who can write the disk can also compute a matching tag: they protect
//! against accidental damage (with a collision resistance of 2^64 at 128 bits, far beyond
//! what random damage can hit), not against an attacker; that is what the keyed profiles are
//! for. 16 bytes instead of 32 halve the metadata (31 tags per metadata sector instead of 15).
//! Input: data ‖ uuid ‖ u64le(block); the data first, so a hash that works in aligned
//! chunks (BLAKE3's 1 KiB chunks) takes it whole.

use super::{written, Profile, Tag, TagScheme};
use sha2::Digest as _;

/// Bytes kept of each digest.
const KEPT: usize = 16;

/// `sha256`: the first 16 bytes of SHA-256(data ‖ uuid ‖ u64le(block)).
pub(super) struct Sha256Tag {
    uuid: [u8; 16],
}

impl Sha256Tag {
    pub(super) fn new(uuid: &[u8; 16]) -> Sha256Tag {
        Sha256Tag { uuid: *uuid }
    }
}

impl TagScheme for Sha256Tag {
    fn profile(&self) -> Profile {
        Profile::Sha256
    }

    fn generate(&self, block: u64, data: &[u8]) -> Tag {
        let mut h = sha2::Sha256::new();
        h.update(data);
        h.update(self.uuid);
        h.update(block.to_le_bytes());
        written(&h.finalize()[..KEPT])
    }
}

/// `blake3`: the first 16 bytes of BLAKE3(data ‖ uuid ‖ u64le(block)).
pub(super) struct Blake3Tag {
    uuid: [u8; 16],
}

impl Blake3Tag {
    pub(super) fn new(uuid: &[u8; 16]) -> Blake3Tag {
        Blake3Tag { uuid: *uuid }
    }
}

impl TagScheme for Blake3Tag {
    fn profile(&self) -> Profile {
        Profile::Blake3
    }

    fn generate(&self, block: u64, data: &[u8]) -> Tag {
        let mut h = blake3::Hasher::new();
        h.update(data);
        h.update(&self.uuid);
        h.update(&block.to_le_bytes());
        written(&h.finalize().as_bytes()[..KEPT])
    }
}

#[cfg(test)]
mod tests {
    use super::super::tests::hex;
    use super::*;

    #[test]
    fn known_answers() {
        // FIPS 180-2's "abc" example, and the official BLAKE3 test vector for the empty input.
        assert_eq!(
            hex(&sha2::Sha256::digest(b"abc")),
            "ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad"
        );
        assert_eq!(
            hex(blake3::hash(b"").as_bytes()),
            "af1349b9f5f9a1a6a0404dea36dcc9499bcb25c9adc112b7cc9a93cae41f3262"
        );
        // The tags are the truncated hashes of data ‖ uuid ‖ u64le(block).
        let uuid = [9u8; 16];
        let mut input = vec![1u8; 512];
        input.extend_from_slice(&uuid);
        input.extend_from_slice(&77u64.to_le_bytes());
        assert_eq!(
            Sha256Tag::new(&uuid).generate(77, &[1; 512]).as_bytes(),
            &sha2::Sha256::digest(&input)[..16]
        );
        assert_eq!(
            Blake3Tag::new(&uuid).generate(77, &[1; 512]).as_bytes(),
            &blake3::hash(&input).as_bytes()[..16]
        );
    }
}
