//! [`Volume`] as a [`BlockDevice`]: what the frontends serve.

use super::{stage, Extent, Volume};
use crate::device::{BlockDevice, OwnedBuf};
use crate::error::Result;

impl BlockDevice for Volume {
    fn name(&self) -> &str {
        Volume::name(self)
    }
    fn size(&self) -> u64 {
        Volume::size(self)
    }
    fn block_size(&self) -> u32 {
        Volume::block_size(self)
    }
    fn is_read_only(&self) -> bool {
        Volume::is_read_only(self)
    }
    fn read_at(&self, buf: &mut [u8], offset: u64) -> Result<()> {
        Volume::read_at(self, buf, offset)
    }
    fn write_at(&self, buf: &[u8], offset: u64) -> Result<()> {
        Volume::write_at(self, buf, offset)
    }
    fn write_owned(&self, data: OwnedBuf, offset: u64) -> Result<()> {
        self.inner
            .write_impl(stage::bytes(&data), Some(data.clone()), offset, None)
    }
    fn write_zeroes(&self, offset: u64, len: u64) -> Result<()> {
        Volume::write_zeroes(self, offset, len)
    }
    fn discard(&self, offset: u64, len: u64) -> Result<()> {
        Volume::discard(self, offset, len)
    }
    fn flush(&self) -> Result<()> {
        Volume::flush(self)
    }
    fn extents(&self, offset: u64, len: u64) -> Result<Vec<Extent>> {
        Volume::extents(self, offset, len)
    }
    fn zeroing_is_cheap(&self) -> bool {
        // Zeroing marks whole blocks unwritten in metadata instead of writing data blocks.
        true
    }
}
