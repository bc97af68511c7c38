//! The engine's narrowing integer conversions whose range is guaranteed, each in one place, so
//! the rest of the crate has no `as` casts that could silently truncate.
//!
//! Values that come from outside (the disk, a caller) are converted with `try_from` where they
//! enter, and the error is reported; what is left here is in range by construction.

// In-memory lengths and offsets are computed in `u64` and used as `usize`: lossless only where
// `usize` has 64 bits, the only targets this crate is built for.
const _: () = assert!(usize::BITS == 64, "blockguard supports 64-bit targets only");

/// `x` as a `usize`: lossless, as `usize` has 64 bits (checked above). For byte counts and
/// indices into buffers in memory, which the engine computes in `u64`.
#[allow(clippy::cast_possible_truncation)] // `usize` has 64 bits: nothing is truncated.
pub(crate) const fn usize_of(x: u64) -> usize {
    x as usize
}

/// `x` as a `u32`, for numbers the geometry keeps below 2^32: a block's index or the number of
/// blocks in its group (below `group_blocks`, itself a `u32`) and map sector numbers (bounded
/// when the geometry is built).
#[allow(clippy::cast_possible_truncation)] // In range by the geometry's invariants (asserted).
pub(crate) const fn u32_of(x: u64) -> u32 {
    debug_assert!(x < 1 << 32);
    x as u32
}

/// `x` as a `u32`, for sizes and counts within one metadata block (a sector number, a number
/// of tags, a sector's layout constants): a metadata block is at most 64 KiB.
#[allow(clippy::cast_possible_truncation)] // In range: at most 64 Ki (asserted).
pub(crate) const fn u32_of_small(x: usize) -> u32 {
    debug_assert!(x <= 1 << 16);
    x as u32
}
