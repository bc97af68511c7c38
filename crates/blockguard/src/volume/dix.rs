//! End-to-end protection information (DIX): writes that carry the caller's tuples in a
//! separate buffer, checked against the data before anything is staged, and reads that
//! return the stored tuples with the data.
//!
//! The tuples are the volume's tags, in its profile's layout (`docs/FORMAT.md`, "Tags"): for
//! `t10-dif` the 8-byte T10 tuple, for `nvme-pi64` the 16-byte NVMe one, and so on. A caller
//! computes them where the data is made, with the volume's [`crate::tag::Tagger`]
//! ([`Volume::tagger`]), so corruption anywhere on the way — in its buffers, a copy, a network
//! hop — is caught at the write, not months later at a read.

use super::{invalid, Volume};
use crate::error::Result;

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
    /// are then exactly the tuples supplied — except during an online re-tag, where a tuple
    /// of the other profile than the one covering its block (computed before a re-tag step
    /// passed the block) is accepted too, and the covering profile's tag is stored.
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
    /// stored with them: one tuple per block into `pi` ([`Volume::pi_size`] bytes each). A
    /// block that holds no data (never written, or discarded) has the all-zero tuple, the
    /// UNWRITTEN tag, and reads as zeros. Every tuple verifies the data returned with it.
    pub fn read_with_pi(&self, data: &mut [u8], pi: &mut [u8], offset: u64) -> Result<()> {
        let blocks = self.pi_request(data.len(), pi.len(), offset)?;
        // Holes first, then the data: a block written in between is returned with its own
        // tag, computed from the data read (which verified against it, so it is the stored one).
        let holes = self.inner.extents(offset, data.len() as u64)?;
        self.inner.read_at(data, offset)?;
        let bs = self.inner.geo.block_size as usize;
        let t = self.pi_size();
        let first = offset / bs as u64;
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
                out.copy_from_slice(self.inner.tagger.generate(block, chunk).as_bytes());
            }
        }
        Ok(())
    }
}
