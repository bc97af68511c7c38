//! T10 DIF and NVMe protection information: the profiles `t10-dif`, `t10-dif-ip` and
//! `nvme-pi64`. One tuple per block, laid out byte for byte as the standards put it on the wire (big-endian
//! fields), so a tuple can be handed to or taken from a PI-capable stack unchanged.
//!
//! Type 1 semantics: the reference tag is the low bits of the block's address (32 bits for
//! T10 DIF, 48 for NVMe's 64b-guard format) and is always checked. The guard covers the data
//! alone, as the standards define it, so the address and the volume are bound only by the
//! reference and application tags: the application tag holds 16 bits derived from the volume
//! UUID ([`pi_app_tag`]), never 0 (so no written tuple is all zero, the reserved UNWRITTEN
//! value, even for a zero block at address 0, whose guard and reference tag are both 0) and
//! never 0xFFFF (T10's "do not check" escape: blockguard never turns checking off, and a stored
//! 0xFFFF never matches).

use super::{Profile, Tag, TagScheme};

/// CRC-16/T10-DIF (polynomial 0x8BB7, no reflection, initial value 0, no final XOR) of `data`.
pub fn crc16_t10dif(data: &[u8]) -> u16 {
    let crc = crc_fast::checksum(crc_fast::CrcAlgorithm::Crc16T10Dif, data);
    debug_assert!(u16::try_from(crc).is_ok());
    // A 16-bit CRC: the high bits are zero.
    u16::try_from(crc).unwrap_or_default()
}

/// CRC-64/NVME (the NVMe 64b-guard CRC: reflected polynomial 0x9A6C9329AC4BC9B5, initial value
/// and final XOR all ones) of `data`.
pub fn crc64_nvme(data: &[u8]) -> u64 {
    crc_fast::checksum(crc_fast::CrcAlgorithm::Crc64Nvme, data)
}

/// The IP checksum of RFC 1071 over `data` taken as big-endian 16-bit words (an odd last byte
/// padded with zero): the ones' complement of the ones' complement sum. As the big-endian
/// value it is in a packet header, and in the guard of `t10-dif-ip`.
pub fn ip_checksum(data: &[u8]) -> u16 {
    // Two facts of ones' complement sums (RFC 1071, section 2) make this fast: they can be
    // taken over wider words and folded at the end (end-around carry is associative), and in
    // either byte order (the sum of byte-swapped words is the byte-swapped sum). So 8 bytes at
    // a time are read little-endian (the order of the machines this runs on) and added as two 32-bit halves into a 64-bit
    // accumulator, which the compiler vectorizes; each chunk of 2^20 words adds at most 2^53,
    // folded after each chunk so no length overflows.
    let (words, rest) = data.split_at(data.len() - data.len() % 8);
    let mut sum: u64 = 0;
    for chunk in words.chunks(8 << 20) {
        let mut acc: u64 = 0;
        for w in chunk.chunks_exact(8) {
            let x = u64::from_le_bytes([w[0], w[1], w[2], w[3], w[4], w[5], w[6], w[7]]);
            acc += (x & 0xFFFF_FFFF) + (x >> 32);
        }
        sum = fold32(sum) + fold32(acc);
    }
    // The tail (data lengths here are multiples of 512; any length works), padded with zeros
    // to a whole word, read the same way.
    let mut tail = [0u8; 8];
    tail[..rest.len()].copy_from_slice(rest);
    let x = u64::from_le_bytes(tail);
    sum = fold32(sum) + (x & 0xFFFF_FFFF) + (x >> 32);
    let mut s = fold32(sum);
    while s > 0xFFFF {
        s = (s & 0xFFFF) + (s >> 16);
    }
    // Folded to 16 bits above. The sum is of little-endian words: swapped, it is the sum of the
    // big-endian words the checksum is defined over.
    !u16::try_from(s).unwrap_or_default().swap_bytes()
}

/// `x` folded to at most 33 bits with end-around carry (the same ones' complement value).
fn fold32(x: u64) -> u64 {
    (x & 0xFFFF_FFFF) + (x >> 32)
}

/// The application tag of the PI profiles for volume `uuid`: CRC-16/T10-DIF of the UUID's 16
/// bytes, with 0 replaced by 1 and 0xFFFF by 0xFFFE (see the module's documentation).
pub fn pi_app_tag(uuid: &[u8; 16]) -> u16 {
    match crc16_t10dif(uuid) {
        0 => 1,
        0xFFFF => 0xFFFE,
        x => x,
    }
}

/// Which 16-bit guard a T10 DIF tuple carries.
#[derive(Clone, Copy, Debug)]
pub(super) enum Guard {
    /// CRC-16/T10-DIF, as SBC defines the guard.
    Crc,
    /// The IP checksum: cheaper in software, weaker (the DIX "IP guard" some HBAs accept).
    Ip,
}

/// `t10-dif` and `t10-dif-ip`: 8 bytes, guard (u16 BE), application tag (u16 BE), reference
/// tag (u32 BE) = the low 32 bits of the block number.
pub(super) struct T10Dif {
    app: [u8; 2],
    guard: Guard,
}

impl T10Dif {
    pub(super) fn new(uuid: &[u8; 16], guard: Guard) -> T10Dif {
        T10Dif {
            app: pi_app_tag(uuid).to_be_bytes(),
            guard,
        }
    }
}

impl TagScheme for T10Dif {
    fn profile(&self) -> Profile {
        match self.guard {
            Guard::Crc => Profile::T10Dif,
            Guard::Ip => Profile::T10DifIp,
        }
    }

    fn generate(&self, block: u64, data: &[u8]) -> Tag {
        let guard = match self.guard {
            Guard::Crc => crc16_t10dif(data),
            Guard::Ip => ip_checksum(data),
        };
        let mut b = [0u8; 8];
        b[0..2].copy_from_slice(&guard.to_be_bytes());
        b[2..4].copy_from_slice(&self.app);
        // Type 1: the low 32 bits of the logical block address.
        b[4..8].copy_from_slice(&block.to_be_bytes()[4..8]);
        debug_assert!(self.app != [0, 0]);
        Tag::from_bytes(&b)
    }
}

/// `nvme-pi64`: 16 bytes, guard (u64 BE, CRC-64/NVME), application tag (u16 BE), reference tag
/// (48 bits BE) = the low 48 bits of the block number (no storage tag: STS = 0).
pub(super) struct NvmePi64 {
    app: [u8; 2],
}

impl NvmePi64 {
    pub(super) fn new(uuid: &[u8; 16]) -> NvmePi64 {
        NvmePi64 {
            app: pi_app_tag(uuid).to_be_bytes(),
        }
    }
}

impl TagScheme for NvmePi64 {
    fn profile(&self) -> Profile {
        Profile::NvmePi64
    }

    fn generate(&self, block: u64, data: &[u8]) -> Tag {
        let mut b = [0u8; 16];
        b[0..8].copy_from_slice(&crc64_nvme(data).to_be_bytes());
        b[8..10].copy_from_slice(&self.app);
        b[10..16].copy_from_slice(&block.to_be_bytes()[2..8]);
        debug_assert!(self.app != [0, 0]);
        Tag::from_bytes(&b)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn crc16_t10dif_known_answers() {
        // The catalogue check value, and SBC's CRC test cases on 32-byte buffers.
        assert_eq!(crc16_t10dif(b"123456789"), 0xD0DB);
        assert_eq!(crc16_t10dif(&[0; 32]), 0x0000);
        assert_eq!(crc16_t10dif(&[0xFF; 32]), 0xA293);
        let ramp: Vec<u8> = (0..32).collect();
        assert_eq!(crc16_t10dif(&ramp), 0x0224);
    }

    #[test]
    fn ip_checksum_known_answers() {
        // RFC 1071, section 3: the sum of 0001 f203 f4f5 f6f7 is ddf2; the checksum its
        // complement.
        assert_eq!(
            ip_checksum(&[0x00, 0x01, 0xf2, 0x03, 0xf4, 0xf5, 0xf6, 0xf7]),
            !0xddf2
        );
        assert_eq!(ip_checksum(&[0; 4096]), 0xFFFF);
        // An odd length is padded with a zero byte; 16-bit and 32-bit summing agree.
        assert_eq!(ip_checksum(&[0x12]), !0x1200);
        // Against the definition, 16-bit big-endian words one by one, for every tail length.
        let data: Vec<u8> = (0..4099u32).map(|i| (i * 7 + i / 255).to_le_bytes()[0]).collect();
        for len in (0..40).chain(4090..4099) {
            let d = &data[..len];
            let mut sum = 0u32;
            for w in d.chunks(2) {
                sum += u32::from(u16::from_be_bytes([w[0], *w.get(1).unwrap_or(&0)]));
            }
            while sum > 0xFFFF {
                sum = (sum & 0xFFFF) + (sum >> 16);
            }
            assert_eq!(u32::from(ip_checksum(d)), !sum & 0xFFFF, "length {len}");
        }
    }

    #[test]
    fn app_tag_avoids_zero_and_the_escape() {
        for i in 0..2000u32 {
            let mut uuid = [0u8; 16];
            uuid[..4].copy_from_slice(&i.to_le_bytes());
            let a = pi_app_tag(&uuid);
            assert!(a != 0 && a != 0xFFFF);
        }
        // The all-zero UUID has CRC 0: replaced by 1.
        assert_eq!(crc16_t10dif(&[0; 16]), 0);
        assert_eq!(pi_app_tag(&[0; 16]), 1);
    }

    /// The tuples as the standards lay them out: big-endian guard, application tag, reference
    /// tag with the address in it.
    #[test]
    fn tuples_are_laid_out_as_on_the_wire() {
        let uuid = [0x11u8; 16];
        let app = pi_app_tag(&uuid).to_be_bytes();
        let data = [0xFFu8; 4096];
        let dif = T10Dif::new(&uuid, Guard::Crc).generate(0x0123_4567_89AB_CDEF, &data);
        let g = crc16_t10dif(&data).to_be_bytes();
        assert_eq!(
            dif.as_bytes(),
            &[g[0], g[1], app[0], app[1], 0x89, 0xAB, 0xCD, 0xEF]
        );
        let ip = T10Dif::new(&uuid, Guard::Ip).generate(7, &data);
        assert_eq!(
            ip.as_bytes(),
            &[0x00, 0x00, app[0], app[1], 0, 0, 0, 7],
            "sum of all-ones is FFFF"
        );
        let nv = NvmePi64::new(&uuid).generate(0x0123_4567_89AB_CDEF, &[0; 4096]);
        let mut want = 0x6482_D367_EB22_B64Eu64.to_be_bytes().to_vec();
        want.extend_from_slice(&app);
        want.extend_from_slice(&[0x45, 0x67, 0x89, 0xAB, 0xCD, 0xEF]);
        assert_eq!(nv.as_bytes(), &want[..]);
        // A zero block at address 0 has guard 0 and reference tag 0: the application tag
        // keeps the tuple from being the UNWRITTEN value.
        let z = T10Dif::new(&[0; 16], Guard::Crc).generate(0, &[0; 512]);
        assert_eq!(z.as_bytes(), &[0, 0, 0, 1, 0, 0, 0, 0]);
    }

    #[test]
    fn a_block_copied_to_another_address_fails() {
        let t = T10Dif::new(&[3; 16], Guard::Crc);
        let tag = t.generate(100, &[5; 512]);
        assert!(t.verify(100, &[5; 512], &tag));
        assert!(!t.verify(101, &[5; 512], &tag));
        let n = NvmePi64::new(&[3; 16]);
        let tag = n.generate(1 << 40, &[5; 512]);
        assert!(!n.verify((1 << 40) + 1, &[5; 512], &tag));
    }
}
