//! Serving a [`blockguard::Volume`]: the [`Export`] implementation that maps engine errors to
//! NBD error classes.

use crate::buffers::Payload;
use crate::export::{Export, ExportError, ExportErrorKind, Extent};
use blockguard::Volume;

/// Classifies an engine error. Verification failures become [`ExportErrorKind::Corruption`]
/// (sent as `NBD_EIO`); a full disk anywhere in the cause chain becomes `NoSpace`.
pub fn export_error(e: blockguard::Error) -> ExportError {
    let kind = if e.is_corruption() {
        ExportErrorKind::Corruption
    } else if matches!(e, blockguard::Error::OutOfRange { .. }) {
        ExportErrorKind::OutOfRange
    } else if matches!(e, blockguard::Error::ReadOnly { .. }) {
        ExportErrorKind::ReadOnly
    } else if is_no_space(&e) {
        ExportErrorKind::NoSpace
    } else {
        ExportErrorKind::Io
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

fn is_no_space(e: &(dyn std::error::Error + 'static)) -> bool {
    // ENOSPC, EFBIG and EDQUOT all mean "no room" to an NBD client.
    const NO_ROOM: [i32; 3] = [28, 27, 122];
    let mut cur: Option<&(dyn std::error::Error + 'static)> = Some(e);
    while let Some(err) = cur {
        if let Some(io) = err.downcast_ref::<std::io::Error>() {
            if io.raw_os_error().is_some_and(|c| NO_ROOM.contains(&c)) {
                return true;
            }
        }
        cur = err.source();
    }
    false
}

impl Export for Volume {
    fn size(&self) -> u64 {
        Volume::size(self)
    }
    fn block_size(&self) -> u32 {
        Volume::block_size(self)
    }
    fn is_read_only(&self) -> bool {
        Volume::is_read_only(self)
    }
    fn read_at(&self, buf: &mut [u8], offset: u64) -> Result<(), ExportError> {
        Volume::read_at(self, buf, offset).map_err(export_error)
    }
    fn write_at(&self, buf: &[u8], offset: u64) -> Result<(), ExportError> {
        Volume::write_at(self, buf, offset).map_err(export_error)
    }
    fn write_owned(&self, buf: Payload, offset: u64) -> Result<(), ExportError> {
        Volume::write_owned(self, buf, offset).map_err(export_error)
    }
    fn flush(&self) -> Result<(), ExportError> {
        Volume::flush(self).map_err(export_error)
    }
    fn trim(&self, offset: u64, len: u64) -> Result<(), ExportError> {
        Volume::discard(self, offset, len).map_err(export_error)
    }
    fn write_zeroes(&self, offset: u64, len: u64) -> Result<(), ExportError> {
        Volume::write_zeroes(self, offset, len).map_err(export_error)
    }
    fn extents(&self, offset: u64, len: u64) -> Result<Vec<Extent>, ExportError> {
        Ok(Volume::extents(self, offset, len)
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
        // Zeroing marks whole blocks unwritten in metadata instead of writing data blocks.
        true
    }
    fn description(&self) -> String {
        format!("blockguard volume {}", self.name())
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
}
