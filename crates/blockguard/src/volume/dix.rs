//! End-to-end protection information (DIX): writes that carry the caller's tuples in a
//! separate buffer, checked against the data before anything is staged, and reads that
//! return the stored tuples with the data.
//!
//! The tuples are the volume's tags, in its profile's layout (`docs/FORMAT.md`, "Tags"): for
//! `t10-dif` the 8-byte T10 tuple, for `nvme-pi64` the 16-byte NVMe one, and so on. A caller
//! computes them where the data is made, with the volume's [`crate::tag::Tagger`]
//! ([`Volume::tagger`]), so corruption anywhere on the way — in its buffers, a copy, a network
//! hop — is caught at the write, not months later at a read.

use super::tags::Coverage;
use super::{invalid, Volume};
use crate::error::Result;
use crate::tag::{Profile, Tagger};
use std::sync::Arc;

impl Volume {
    /// The tagger of this volume (its profile, bound to its UUID and key): computes the
    /// protection information a block written at an address must carry.
    pub fn tagger(&self) -> std::sync::Arc<crate::tag::Tagger> {
        self.inner.tagger.current()
    }

    /// The tagger of the profile that covers `block` now: [`Volume::tagger`]'s, except
    /// during an online re-tag ([`Volume::retag`]) for blocks of the groups already re-tagged,
    /// which have the target profile's tags.
    pub fn tagger_for(&self, block: u64) -> std::sync::Arc<crate::tag::Tagger> {
        self.inner.tagger.tagger_for(block)
    }

    /// Bytes of protection information per block (the profile's tag size).
    pub fn pi_size(&self) -> usize {
        self.inner.geo.tag_size as usize
    }

    /// Checks a DIX request: block-aligned `offset` and data length, and one tuple per block.
    /// Returns the number of blocks.
    fn pi_request(&self, len: usize, pi_len: usize, offset: u64) -> Result<usize> {
        let bs = self.inner.geo.block_size as usize;
        if !offset.is_multiple_of(bs as u64) || !len.is_multiple_of(bs) {
            return Err(invalid(
                &self.inner.name,
                format!(
                    "protection information goes with whole blocks: offset {offset} and length {len} \
                     must be multiples of the block size {bs}"
                ),
            ));
        }
        let blocks = len / bs;
        if pi_len != blocks * self.pi_size() {
            return Err(invalid(
                &self.inner.name,
                format!(
                    "{blocks} blocks need {} bytes of protection information ({} per block), not {pi_len}",
                    blocks * self.pi_size(),
                    self.pi_size()
                ),
            ));
        }
        Ok(blocks)
    }

    /// Writes whole blocks with caller-supplied protection information: `pi` holds one tuple
    /// per block of `data` (in order, [`Volume::pi_size`] bytes each), computed by the caller
    /// with [`Volume::tagger`]. Each tuple is checked against the engine's own copy of the
    /// block before anything is staged; a mismatch refuses the whole write with
    /// [`crate::Error::ProtectionMismatch`] and leaves the volume as it was. The stored tags
    /// are then exactly the tuples supplied — except during an online re-tag, and after one
    /// completed in this session, where a tuple of the other profile than the one covering
    /// its block (computed before a re-tag step passed the block, or before the re-tag
    /// ended) is accepted too, and the covering profile's tag is stored.
    ///
    /// ```
    /// use blockguard::blockguard_backend::MemoryBackend;
    /// use blockguard::{Error, FormatOptions, Profile, Volume};
    /// use std::sync::Arc;
    ///
    /// let opts = FormatOptions {
    ///     profile: Profile::T10Dif,
    ///     ..FormatOptions::with_size(1 << 20)
    /// };
    /// let backend = Arc::new(MemoryBackend::new(opts.backing_len()?)?);
    /// let vol = Volume::format(backend, &opts)?;
    ///
    /// // Where the data is made: two blocks and their T10 tuples (8 bytes each).
    /// let data = vec![0x5A; 8192];
    /// let mut pi = Vec::new();
    /// for (i, block) in data.chunks(4096).enumerate() {
    ///     pi.extend_from_slice(vol.tagger().generate(2 + i as u64, block).as_bytes());
    /// }
    /// assert_eq!(&pi[4..8], &[0, 0, 0, 2]); // the reference tag: block address 2
    ///
    /// // On the way, a bit flips: the write is refused, nothing is written.
    /// let mut damaged = data.clone();
    /// damaged[5000] ^= 1;
    /// let err = vol.write_with_pi(&damaged, &pi, 2 * 4096).unwrap_err();
    /// assert!(matches!(err, Error::ProtectionMismatch { block: 3, .. }));
    ///
    /// // Intact, it is written, and a read returns the tuples stored with it.
    /// vol.write_with_pi(&data, &pi, 2 * 4096)?;
    /// let (mut back, mut back_pi) = (vec![0; 8192], vec![0; 16]);
    /// vol.read_with_pi(&mut back, &mut back_pi, 2 * 4096)?;
    /// assert_eq!((back, back_pi), (data, pi));
    /// # Ok::<(), Box<dyn std::error::Error>>(())
    /// ```
    pub fn write_with_pi(&self, data: &[u8], pi: &[u8], offset: u64) -> Result<()> {
        self.pi_request(data.len(), pi.len(), offset)?;
        self.inner.write_impl(data, None, offset, Some(pi))
    }

    /// Reads whole blocks (verified, as [`Volume::read_at`]) and the protection information
    /// of the data read: one tuple per block into `pi` ([`Volume::pi_size`] bytes each). A
    /// block that holds no data (never written, or discarded) has the all-zero tuple, the
    /// UNWRITTEN tag, and reads as zeros.
    ///
    /// Each tuple is the tag of the data returned with it under the profile the returned
    /// [`PiProfiles`] names for its block — the one that covered the block for the whole read
    /// (normally the volume's; during an online re-tag the target's for blocks already
    /// re-tagged), so it verifies that data with that profile, and a block that verified
    /// against its stored tag gets that tag back. (A re-tag step cannot pass the blocks while
    /// they are read: the read holds their stripes, as a write does, and a step needs them
    /// before its cursor moves; writes to them wait for the read too.)
    ///
    /// ```
    /// use blockguard::blockguard_backend::MemoryBackend;
    /// use blockguard::{FormatOptions, Profile, Volume};
    /// use std::sync::Arc;
    ///
    /// let opts = FormatOptions::with_size(1 << 20);
    /// let vol = Volume::format(Arc::new(MemoryBackend::new(opts.backing_len()?)?), &opts)?;
    /// vol.write_at(&[7; 4096], 0)?;
    /// let (mut data, mut pi) = (vec![0; 8192], vec![0; 16]);
    /// let made_by = vol.read_with_pi(&mut data, &mut pi, 0)?;
    /// assert_eq!(made_by.profile(0), Profile::Crc32c);
    /// let tag = blockguard::tag::Tag::from_bytes(&pi[..8]);
    /// assert!(made_by.tagger(0).verify(0, &data[..4096], &tag));
    /// assert_eq!(&pi[8..], &[0; 8]); // block 1 was never written
    /// # Ok::<(), Box<dyn std::error::Error>>(())
    /// ```
    pub fn read_with_pi(&self, data: &mut [u8], pi: &mut [u8], offset: u64) -> Result<PiProfiles> {
        let blocks = self.pi_request(data.len(), pi.len(), offset)?;
        let bs = self.inner.geo.block_size as usize;
        let first = offset / bs as u64;
        // No re-tag step passes these blocks (it locks their stripes before its cursor moves)
        // and no write to them is staged until the tuples are made: the profile covering each
        // block is the same when its data is verified and when its tuple is computed.
        let _stripes = self.inner.lock_stripes(first, blocks as u64);
        let coverage = self.inner.tagger.coverage();
        let holes = self.inner.extents(offset, data.len() as u64)?;
        self.inner.read_at(data, offset)?;
        let t = self.pi_size();
        for k in 0..blocks {
            let block = first + k as u64;
            let chunk = &data[k * bs..(k + 1) * bs];
            let at = block * bs as u64;
            let hole = holes
                .iter()
                .any(|e| !e.allocated && e.offset <= at && at < e.offset + e.len);
            let out = &mut pi[k * t..(k + 1) * t];
            if hole && crate::tag::is_zero(chunk) {
                out.fill(0);
            } else {
                out.copy_from_slice(&coverage.tagger(block).generate(block, chunk).to_bytes(t)[..t]);
            }
        }
        Ok(PiProfiles(coverage))
    }
}

/// Which profile made each tuple [`Volume::read_with_pi`] returned. Outside an online re-tag
/// that is the volume's profile for every block; during one, the target's for the blocks of
/// the groups already re-tagged when the read ran, the volume's for the others.
#[derive(Clone)]
pub struct PiProfiles(Coverage);

impl PiProfiles {
    /// The tagger whose tag of `block`'s data is its tuple (bound to the volume's UUID and,
    /// for a keyed profile, its key): verify the tuple with it.
    pub fn tagger(&self, block: u64) -> &Arc<Tagger> {
        self.0.tagger(block)
    }

    /// The profile of `block`'s tuple.
    pub fn profile(&self, block: u64) -> Profile {
        self.tagger(block).profile()
    }
}

impl std::fmt::Debug for PiProfiles {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let mut d = f.debug_struct("PiProfiles");
        d.field("profile", &self.0.current.profile());
        if let Some((t, end)) = &self.0.target {
            d.field("target", &t.profile()).field("target_below_block", end);
        }
        d.finish()
    }
}
