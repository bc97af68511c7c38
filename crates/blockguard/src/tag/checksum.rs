//! The fast checksum profiles: `crc32c` (the default, format version 3's only profile),
//! `xxh3` and `crc64-nvme`. Not cryptographic: they catch accidental damage and misplaced
//! blocks, not a deliberate forgery.

use super::{written, Profile, Tag, TagScheme};
use xxhash_rust::xxh3::{xxh3_64, xxh3_64_with_seed};

/// Application tag of the `crc32c` profile: "BG", so a written entry is never all-zero.
const CRC32C_APP_TAG: u16 = 0x4742;

/// `crc32c`: guard = crc32c(uuid ‖ u64le(block) ‖ data), then "BG", then the low 16 bits of
/// the block number, all little-endian. Unchanged since format version 1.
pub(super) struct Crc32c {
    uuid: [u8; 16],
}

impl Crc32c {
    pub(super) fn new(uuid: &[u8; 16]) -> Crc32c {
        Crc32c { uuid: *uuid }
    }
}

impl TagScheme for Crc32c {
    fn profile(&self) -> Profile {
        Profile::Crc32c
    }

    fn generate(&self, block: u64, data: &[u8]) -> Tag {
        let mut seed = [0u8; 24];
        seed[..16].copy_from_slice(&self.uuid);
        seed[16..].copy_from_slice(&block.to_le_bytes());
        let guard = crc32c_seeded(&seed, data);
        let mut b = [0u8; 8];
        b[0..4].copy_from_slice(&guard.to_le_bytes());
        b[4..6].copy_from_slice(&CRC32C_APP_TAG.to_le_bytes());
        // The low 16 bits of the block number.
        b[6..8].copy_from_slice(&block.to_le_bytes()[..2]);
        // Never all zero: the application tag is not.
        written(&b)
    }
}

/// `xxh3`: XXH3-64 of the data with seed XXH3-64(uuid ‖ u64le(block)), little-endian. The
/// seed is one short hash per block; a seeded XXH3 is a different hash function per seed, so
/// the same data at another address or in another volume gets an unrelated tag.
pub(super) struct Xxh3 {
    uuid: [u8; 16],
}

impl Xxh3 {
    pub(super) fn new(uuid: &[u8; 16]) -> Xxh3 {
        Xxh3 { uuid: *uuid }
    }

    /// The per-block seed.
    fn seed(&self, block: u64) -> u64 {
        let mut where_ = [0u8; 24];
        where_[..16].copy_from_slice(&self.uuid);
        where_[16..].copy_from_slice(&block.to_le_bytes());
        xxh3_64(&where_)
    }
}

impl TagScheme for Xxh3 {
    fn profile(&self) -> Profile {
        Profile::Xxh3
    }

    fn generate(&self, block: u64, data: &[u8]) -> Tag {
        written(&xxh3_64_with_seed(data, self.seed(block)).to_le_bytes())
    }
}

/// `crc64-nvme`: CRC-64/NVME over data ‖ uuid ‖ u64le(block), little-endian. The address is
/// appended, not prepended, so the data's CRC runs over aligned memory; because a CRC of
/// degree 64 maps every non-zero 64-bit difference to a non-zero remainder, two addresses
/// always give different tags for the same data and volume.
pub(super) struct Crc64Nvme {
    uuid: [u8; 16],
}

impl Crc64Nvme {
    pub(super) fn new(uuid: &[u8; 16]) -> Crc64Nvme {
        Crc64Nvme { uuid: *uuid }
    }
}

impl TagScheme for Crc64Nvme {
    fn profile(&self) -> Profile {
        Profile::Crc64Nvme
    }

    fn generate(&self, block: u64, data: &[u8]) -> Tag {
        // One update for the 24 bytes after the data: each `update` has a fixed cost that
        // shows at 4 KiB (measured: three updates ran at 22 GB/s, two at 30+).
        let mut suffix = [0u8; 24];
        suffix[..16].copy_from_slice(&self.uuid);
        suffix[16..].copy_from_slice(&block.to_le_bytes());
        let mut d = crc_fast::Digest::new(crc_fast::CrcAlgorithm::Crc64Nvme);
        d.update(data);
        d.update(&suffix);
        written(&d.finalize().to_le_bytes())
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

    /// The `crc32c` tag, byte for byte as `docs/FORMAT.md` shows it in its worked example
    /// (the golden images under `tests/golden` pin it too).
    #[test]
    fn crc32c_tag_is_byte_identical_to_format_version_3() {
        let uuid = [7u8; 16];
        let t = Crc32c::new(&uuid).generate(0x1_0203, &[0x41; 4096]);
        let mut seed = [0u8; 24];
        seed[..16].copy_from_slice(&uuid);
        seed[16..].copy_from_slice(&0x1_0203u64.to_le_bytes());
        let guard = crc32c::crc32c_append(crc32c::crc32c(&seed), &[0x41; 4096]);
        let mut want = guard.to_le_bytes().to_vec();
        want.extend_from_slice(&[0x42, 0x47, 0x03, 0x02]);
        assert_eq!(t.as_bytes(), &want[..]);
    }

    /// Known answers: XXH3-64 and CRC-64/NVME themselves, then the tags built from them.
    #[test]
    fn xxh3_and_crc64_known_answers() {
        // XXH3-64 of the empty input (seed 0), from the reference implementation's tests.
        assert_eq!(xxh3_64(b""), 0x2D06_8005_38D3_94C2);
        // CRC-64/NVME check value and the NVMe specification's 4 KiB vectors.
        assert_eq!(super::super::crc64_nvme(b"123456789"), 0xAE8B_1486_0A79_9888);
        assert_eq!(super::super::crc64_nvme(&[0; 4096]), 0x6482_D367_EB22_B64E);
        assert_eq!(super::super::crc64_nvme(&[0xFF; 4096]), 0xC0DD_BA73_02EC_A3AC);
        let uuid = [1u8; 16];
        let x = Xxh3::new(&uuid);
        let mut w = [1u8; 24];
        w[16..].copy_from_slice(&9u64.to_le_bytes());
        let want = xxh3_64_with_seed(&[3; 4096], xxh3_64(&w));
        assert_eq!(x.generate(9, &[3; 4096]).as_bytes(), &want.to_le_bytes());
        let mut all = vec![3u8; 4096];
        all.extend_from_slice(&w);
        let want = super::super::crc64_nvme(&all);
        assert_eq!(
            Crc64Nvme::new(&uuid).generate(9, &[3; 4096]).as_bytes(),
            &want.to_le_bytes()
        );
    }
}
