//! Serving a [`BlockDevice`] (a [`blockguard::Volume`], or any other device of the engine):
//! [`DeviceFile`] is the thin view the FUSE file needs.

use blockguard::{BlockDevice, Error, ErrorClass};
use std::sync::Arc;

use crate::file::BlockFile;

/// A [`BlockDevice`] as the FUSE file sees it. The engine's flush is shared by concurrent
/// callers, so the kernel's `fsync`s from many threads cost one backend flush, not one each.
pub struct DeviceFile {
    device: Arc<dyn BlockDevice>,
}

impl DeviceFile {
    /// Shows `device` as the file.
    pub fn new(device: Arc<dyn BlockDevice>) -> DeviceFile {
        DeviceFile { device }
    }
}

impl BlockFile for DeviceFile {
    type Error = Error;

    fn size(&self) -> u64 {
        self.device.size()
    }

    fn block_size(&self) -> u32 {
        self.device.block_size()
    }

    fn is_read_only(&self) -> bool {
        self.device.is_read_only()
    }

    fn read_at(&self, buf: &mut [u8], offset: u64) -> Result<(), Error> {
        self.device.read_at(buf, offset)
    }

    fn write_at(&self, buf: &[u8], offset: u64) -> Result<(), Error> {
        self.device.write_at(buf, offset)
    }

    fn flush(&self) -> Result<(), Error> {
        self.device.flush()
    }

    fn punch_hole(&self, offset: u64, len: u64) -> Result<(), Error> {
        self.device.discard(offset, len)
    }

    fn write_zeroes(&self, offset: u64, len: u64) -> Result<(), Error> {
        self.device.write_zeroes(offset, len)
    }

    fn is_corruption(error: &Error) -> bool {
        error.class() == ErrorClass::Corruption
    }
}
