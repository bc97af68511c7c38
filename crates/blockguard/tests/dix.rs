//! End-to-end protection information (DIX): a write carries the caller's tuples, checked
//! against the data before anything is written; a read returns the stored tuples. For every
//! profile.

use blockguard::blockguard_backend::MemoryBackend;
use blockguard::tag::TagKey;
use blockguard::{Error, FormatOptions, OpenOptions, Profile, Volume};
use std::sync::Arc;

const BS: usize = 4096;

fn volume(profile: Profile) -> (Arc<MemoryBackend>, Volume) {
    let opts = FormatOptions {
        profile,
        key: profile.is_keyed().then(|| TagKey::from_bytes(&[3; 32]).unwrap()),
        uuid: Some([0x24; 16]),
        ..FormatOptions::with_size(64 * BS as u64)
    };
    let backend = Arc::new(MemoryBackend::new(opts.backing_len().unwrap()).unwrap());
    let vol = Volume::format(backend.clone(), &opts).unwrap();
    (backend, vol)
}

/// The tuples of `data` written at block `first`, as the caller computes them.
fn tuples(vol: &Volume, first: u64, data: &[u8]) -> Vec<u8> {
    (first..)
        .zip(data.chunks(BS))
        .flat_map(|(b, c)| vol.tagger().generate(b, c).as_bytes().to_vec())
        .collect()
}

fn data(blocks: usize, seed: u8) -> Vec<u8> {
    (0..blocks * BS)
        .map(|i| seed.wrapping_add((i / 7).to_le_bytes()[0]).wrapping_mul(31))
        .collect()
}

#[test]
fn tuples_go_in_with_the_data_and_come_back_out() {
    for profile in Profile::ALL {
        let (backend, vol) = volume(profile);
        let t = vol.pi_size();
        assert_eq!(t, profile.tag_size());
        let d = data(4, 1);
        let pi = tuples(&vol, 8, &d);
        vol.write_with_pi(&d, &pi, 8 * BS as u64).unwrap();
        let (mut back, mut back_pi) = (vec![0u8; 6 * BS], vec![0xEE; 6 * t]);
        vol.read_with_pi(&mut back, &mut back_pi, 7 * BS as u64).unwrap();
        assert_eq!(&back[BS..5 * BS], &d[..], "{profile}");
        assert_eq!(&back_pi[t..5 * t], &pi[..], "{profile}: the stored tuples");
        // Blocks never written: zeros, and the all-zero (UNWRITTEN) tuple.
        assert!(back[..BS].iter().all(|&b| b == 0) && back_pi[..t].iter().all(|&b| b == 0));
        assert!(back_pi[5 * t..].iter().all(|&b| b == 0), "{profile}");
        // A block written with zeros has a real tuple, not the UNWRITTEN one.
        let zeros = vec![0u8; BS];
        vol.write_with_pi(&zeros, &tuples(&vol, 20, &zeros), 20 * BS as u64)
            .unwrap();
        let mut zpi = vec![0u8; t];
        vol.read_with_pi(&mut back[..BS], &mut zpi, 20 * BS as u64)
            .unwrap();
        assert!(zpi.iter().any(|&b| b != 0), "{profile}");
        assert_eq!(zpi, tuples(&vol, 20, &zeros));
        // Durable like any write: after a reopen the same tuples come back.
        vol.close().unwrap();
        let o = OpenOptions {
            key: profile.is_keyed().then(|| TagKey::from_bytes(&[3; 32]).unwrap()),
            ..OpenOptions::default()
        };
        let vol = Volume::open(backend, &o).unwrap();
        let mut again = vec![0u8; 4 * t];
        vol.read_with_pi(&mut back[..4 * BS], &mut again, 8 * BS as u64)
            .unwrap();
        assert_eq!(again, pi, "{profile}");
    }
}

#[test]
fn a_mismatch_is_refused_and_nothing_is_written() {
    for profile in Profile::ALL {
        let (backend, vol) = volume(profile);
        let old = data(3, 2);
        vol.write_with_pi(&old, &tuples(&vol, 4, &old), 4 * BS as u64)
            .unwrap();
        vol.flush().unwrap();
        let before = backend.snapshot();
        let new = data(3, 9);
        let pi = tuples(&vol, 4, &new);
        // A flipped data bit in the second block, then a flipped tuple bit in the third.
        let mut bad = new.clone();
        bad[BS + 100] ^= 0x08;
        let mut bad_pi = pi.clone();
        bad_pi[2 * vol.pi_size() + 1] ^= 0x40;
        for (d, p, block) in [(&bad, &pi, 5), (&new, &bad_pi, 6)] {
            match vol.write_with_pi(d, p, 4 * BS as u64) {
                Err(Error::ProtectionMismatch { block: b, volume, .. }) => {
                    assert_eq!(b, block, "{profile}");
                    assert!(!volume.is_empty());
                }
                other => panic!("{profile}: expected a mismatch, got {other:?}"),
            }
        }
        // Old data intact, in the engine and on the backend.
        let mut back = vec![0u8; 3 * BS];
        vol.read_at(&mut back, 4 * BS as u64).unwrap();
        assert!(back == old, "{profile}: a refused write changed the data");
        vol.flush().unwrap();
        assert!(
            backend.snapshot() == before,
            "{profile}: a refused write reached the backend"
        );
    }
}

/// T10/NVMe PI: the reference tag holds the block's address, so a block and its tuple sent
/// to another address are refused.
#[test]
fn a_pi_tuple_for_another_address_is_refused() {
    for profile in [Profile::T10Dif, Profile::T10DifIp, Profile::NvmePi64] {
        let (_, vol) = volume(profile);
        let d = data(1, 5);
        let pi = tuples(&vol, 10, &d);
        let t = vol.pi_size();
        let reference = &pi[t - if t == 8 { 4 } else { 6 }..];
        assert_eq!(
            reference.last(),
            Some(&10),
            "{profile}: address 10 in the reference tag"
        );
        assert!(matches!(
            vol.write_with_pi(&d, &pi, 11 * BS as u64),
            Err(Error::ProtectionMismatch { block: 11, .. })
        ));
        vol.write_with_pi(&d, &pi, 10 * BS as u64).unwrap();
    }
}

#[test]
fn misaligned_or_mis_sized_requests_are_refused() {
    let (_, vol) = volume(Profile::Crc32c);
    let d = vec![1u8; BS];
    let pi = tuples(&vol, 0, &d);
    for (len, pi_len, offset) in [(BS, 8, 512u64), (BS - 1, 8, 0), (BS, 16, 0), (BS, 7, 0)] {
        let e = vol
            .write_with_pi(&d[..len], &vec![0; pi_len], offset)
            .unwrap_err();
        assert!(matches!(e, Error::InvalidArgument { .. }), "{e}");
        let mut out = vec![0u8; len];
        let e = vol
            .read_with_pi(&mut out, &mut vec![0; pi_len], offset)
            .unwrap_err();
        assert!(matches!(e, Error::InvalidArgument { .. }), "{e}");
    }
    vol.write_with_pi(&d, &pi, 0).unwrap();
}
