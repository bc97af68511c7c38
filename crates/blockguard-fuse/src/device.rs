//! [`BlockFile`] for the volume engine.

use blockguard::{Error, Volume};

use crate::file::BlockFile;

impl BlockFile for Volume {
    type Error = Error;

    fn size(&self) -> u64 {
        Volume::size(self)
    }

    fn block_size(&self) -> u32 {
        Volume::block_size(self)
    }

    fn is_read_only(&self) -> bool {
        Volume::is_read_only(self)
    }

    fn read_at(&self, buf: &mut [u8], offset: u64) -> Result<(), Error> {
        Volume::read_at(self, buf, offset)
    }

    fn write_at(&self, buf: &[u8], offset: u64) -> Result<(), Error> {
        Volume::write_at(self, buf, offset)
    }

    fn flush(&self) -> Result<(), Error> {
        Volume::flush(self)
    }

    fn punch_hole(&self, offset: u64, len: u64) -> Result<(), Error> {
        Volume::discard(self, offset, len)
    }

    fn write_zeroes(&self, offset: u64, len: u64) -> Result<(), Error> {
        Volume::write_zeroes(self, offset, len)
    }

    fn is_corruption(error: &Error) -> bool {
        error.is_corruption()
    }
}
