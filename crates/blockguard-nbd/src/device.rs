//! Serving a [`BlockDevice`] (a [`blockguard::Volume`], or any other device of the engine):
//! [`DeviceExport`] is the thin view the server needs, mapping engine errors to NBD error
//! classes.

use crate::buffers::Payload;
use crate::export::{Export, ExportError, ExportErrorKind, Extent};
use blockguard::{BlockDevice, ErrorClass};
use std::sync::Arc;

/// Classifies an engine error. Verification failures become [`ExportErrorKind::Corruption`]
/// (sent as `NBD_EIO`); a full disk anywhere in the cause chain becomes `NoSpace`.
// By value: made for `map_err(export_error)`, which hands the error over; a reference would
// put a closure at every call site.
#[allow(clippy::needless_pass_by_value)]
pub fn export_error(e: blockguard::Error) -> ExportError {
    let kind = match e.class() {
        ErrorClass::Corruption => ExportErrorKind::Corruption,
        ErrorClass::OutOfRange => ExportErrorKind::OutOfRange,
        ErrorClass::ReadOnly => ExportErrorKind::ReadOnly,
        ErrorClass::NoSpace => ExportErrorKind::NoSpace,
        _ => ExportErrorKind::Io,
    };
    ExportError::new(kind, with_causes(&e))
}

/// The error's message followed by each cause's, `: `-separated (what `anyhow`'s `{:#}` shows):
/// the client gets one string, and error types show their own level only.
fn with_causes(e: &(dyn std::error::Error + 'static)) -> String {
    let mut out = e.to_string();
    let mut cur = e.source();
    while let Some(cause) = cur {
        out.push_str(": ");
        out.push_str(&cause.to_string());
        cur = cause.source();
    }
    out
}

/// A [`BlockDevice`] as the server sees it.
///
/// The engine already does what NBD asks beyond plain I/O: its flush covers writes completed
/// on every connection and is shared by concurrent callers (so `NBD_FLAG_CAN_MULTI_CONN` and
/// FUA on every write are cheap).
pub struct DeviceExport {
    device: Arc<dyn BlockDevice>,
}

impl DeviceExport {
    /// Serves `device`.
    pub fn new(device: Arc<dyn BlockDevice>) -> DeviceExport {
        DeviceExport { device }
    }
}

impl Export for DeviceExport {
    fn size(&self) -> u64 {
        self.device.size()
    }
    fn block_size(&self) -> u32 {
        self.device.block_size()
    }
    fn is_read_only(&self) -> bool {
        self.device.is_read_only()
    }
    fn read_at(&self, buf: &mut [u8], offset: u64) -> Result<(), ExportError> {
        self.device.read_at(buf, offset).map_err(export_error)
    }
    fn write_at(&self, buf: &[u8], offset: u64) -> Result<(), ExportError> {
        self.device.write_at(buf, offset).map_err(export_error)
    }
    fn write_owned(&self, buf: Payload, offset: u64) -> Result<(), ExportError> {
        self.device
            .write_owned(Arc::new(buf), offset)
            .map_err(export_error)
    }
    fn flush(&self) -> Result<(), ExportError> {
        self.device.flush().map_err(export_error)
    }
    fn trim(&self, offset: u64, len: u64) -> Result<(), ExportError> {
        self.device.discard(offset, len).map_err(export_error)
    }
    fn write_zeroes(&self, offset: u64, len: u64) -> Result<(), ExportError> {
        self.device.write_zeroes(offset, len).map_err(export_error)
    }
    fn extents(&self, offset: u64, len: u64) -> Result<Vec<Extent>, ExportError> {
        Ok(self
            .device
            .extents(offset, len)
            .map_err(export_error)?
            .into_iter()
            .map(|e| Extent {
                offset: e.offset,
                len: e.len,
                allocated: e.allocated,
            })
            .collect())
    }
    fn can_fast_zero(&self) -> bool {
        self.device.zeroing_is_cheap()
    }
    fn description(&self) -> String {
        format!("blockguard volume {}", self.device.name())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Regression: engine I/O errors used to end with their cause while also chaining it.
    #[test]
    fn an_engine_io_error_reaches_the_client_with_its_cause_once() {
        let cause = std::io::Error::from_raw_os_error(5);
        let shown_cause = cause.to_string();
        let e = blockguard::Error::Io {
            volume: "v.bgv".into(),
            during: "reading data",
            offset: 4096,
            source: cause,
        };
        let msg = export_error(e).message;
        assert!(
            msg.starts_with("v.bgv: I/O error while reading data at byte 4096"),
            "{msg}"
        );
        assert_eq!(msg.matches(&shown_cause).count(), 1, "{msg}");
    }

    #[test]
    fn a_full_disk_is_no_space_for_the_client() {
        let e = blockguard::Error::Io {
            volume: "v.bgv".into(),
            during: "writing data",
            offset: 0,
            source: std::io::Error::from_raw_os_error(28),
        };
        assert_eq!(export_error(e).kind, ExportErrorKind::NoSpace);
    }
}
