//! Formatting and opening a volume split over a data device and a metadata device
//! (`crate::split` lays the two out).

use super::open::{open_after_format, read_layout, write_new_volume};
use super::{invalid, FormatOptions, OpenOptions, Volume};
use crate::copies::CopySet;
use crate::error::{Error, Result};
use crate::format::{Superblock, INCOMPAT_META_DEVICE, SB_REGION, SB_STRUCT_SIZE};
use crate::split::{read_trailer, trailer_offset, DataTrailer, SplitBackend, SplitLayout};
use blockguard_backend::Backend;
use std::sync::Arc;

impl Volume {
    /// Bytes the data device and the metadata device of a split volume with `opts` need
    /// (`opts.size` must be set): the image plus a 4 KiB trailer, and the packed metadata.
    ///
    /// # Errors
    /// The options describe no valid layout.
    pub fn split_lengths(opts: &FormatOptions) -> Result<(u64, u64)> {
        let geo = opts.geometry_for_size()?;
        Ok((
            crate::split::data_device_len(geo.size()),
            SplitLayout::new(geo).meta_len(),
        ))
    }

    /// Formats a volume whose data lives on `data` — block `b` at byte `b·B`, so its first
    /// `size` bytes read as the plain image — and everything else on `meta`; both devices name
    /// each other. `meta_hint` (the metadata device's path) is kept in the data device's
    /// trailer to find it again. Opens the volume read-write.
    ///
    /// # Errors
    /// As [`Volume::format`]; also a device too short, or mirrors (not supported split).
    pub fn format_split(
        data: Arc<dyn Backend>,
        meta: Arc<dyn Backend>,
        opts: &FormatOptions,
        meta_hint: &str,
    ) -> Result<Volume> {
        let name = data.name();
        same_device(&data, &meta)?;
        if meta_hint.len() > crate::split::MAX_HINT {
            return Err(invalid(
                &name,
                format!(
                    "the metadata device's path is {} bytes; the data device's trailer keeps at most {}: \
                     give a shorter path (a symlink)",
                    meta_hint.len(),
                    crate::split::MAX_HINT
                ),
            ));
        }
        let geo = opts
            .geometry_for_size()
            .map_err(|e| invalid(&name, e.to_string()))?;
        let split = SplitBackend::new(data.clone(), meta.clone(), SplitLayout::new(geo))
            .map_err(|e| invalid(&name, e.to_string()))?;
        let pair: [u8; 16] = rand::random();
        // The superblock is written first (through the split) so that its UUID is known; the
        // trailer last: a data device without a trailer is not (yet) part of a volume.
        let opts = FormatOptions {
            uuid: Some(opts.uuid.unwrap_or_else(rand::random)),
            ..opts.clone()
        };
        write_new_volume(&split, &opts, Some(pair), &mut |_, _| {})?;
        let trailer = DataTrailer {
            uuid: opts.uuid.unwrap_or_default(),
            pair,
            size: geo.size(),
            meta_hint: meta_hint.to_string(),
        };
        write_trailer(&*data, &trailer)?;
        Self::open_split(data, meta, &open_after_format(&opts))
    }

    /// Opens a volume split over `data` and `meta` (see [`Volume::format_split`]). Refuses a
    /// pair that does not belong together: a data device without a trailer, or whose trailer
    /// names another volume or another metadata device; a metadata device that is not one.
    ///
    /// # Errors
    /// As [`Volume::open`], and the mismatches above.
    pub fn open_split(data: Arc<dyn Backend>, meta: Arc<dyn Backend>, opts: &OpenOptions) -> Result<Volume> {
        let split = Self::pair(data, meta)?;
        let (sb, warnings) = read_layout(&split, true)?;
        Self::assemble(
            CopySet::single(Arc::new(split)),
            sb,
            warnings,
            opts,
            &mut |_, _| {},
        )
    }

    /// The superblock of a split volume, without opening it (for tools that only describe it).
    ///
    /// # Errors
    /// As [`Volume::open_split`].
    pub fn read_split_superblock(
        data: Arc<dyn Backend>,
        meta: Arc<dyn Backend>,
    ) -> Result<(Superblock, Vec<String>)> {
        read_layout(&Self::pair(data, meta)?, true)
    }

    /// Checks that `data` and `meta` are the two devices of one volume and joins them.
    fn pair(data: Arc<dyn Backend>, meta: Arc<dyn Backend>) -> Result<SplitBackend> {
        same_device(&data, &meta)?;
        let sb = meta_superblock(&*meta)?;
        let dname = data.name();
        let trailer = read_trailer(&*data)
            .map_err(|e| Error::Io {
                volume: dname.clone(),
                during: "reading the data device's trailer",
                offset: trailer_offset(data.len()).unwrap_or(0),
                source: e,
            })?
            .map_err(|e| Error::NotAVolume {
                volume: dname.clone(),
                detail: format!("not the data device of a blockguard volume: {e}"),
            })?;
        if trailer.uuid != sb.uuid || trailer.pair != sb.meta_device {
            return Err(Error::Unsupported {
                volume: dname,
                detail: format!(
                    "this data device and the metadata device {} do not belong together (the data device \
                     names volume {} and pair {}, the metadata device volume {} and pair {})",
                    meta.name(),
                    hex(&trailer.uuid),
                    hex(&trailer.pair),
                    hex(&sb.uuid),
                    hex(&sb.meta_device)
                ),
            });
        }
        if trailer.size != sb.geometry.size() {
            return Err(Error::Unsupported {
                volume: dname,
                detail: format!(
                    "the data device's trailer says {} bytes, the metadata device {}",
                    trailer.size,
                    sb.geometry.size()
                ),
            });
        }
        SplitBackend::new(data, meta, SplitLayout::new(sb.geometry))
            .map_err(|e| invalid(&dname, e.to_string()))
    }
}

/// The superblock on a metadata device: its primary copy, or its backup in the device's last
/// 4 KiB. Refuses a device that is not the metadata device of a split volume.
fn meta_superblock(meta: &dyn Backend) -> Result<Superblock> {
    let name = meta.name();
    let mut last = None;
    for at in [Some(0), trailer_offset(meta.len())].into_iter().flatten() {
        let mut buf = super::aligned(crate::cast::usize_of(SB_REGION), meta.alignment().max(1));
        meta.read_at(buf.as_mut(), at)
            .map_err(super::open::io_error(&name, "reading a superblock", at))?;
        match Superblock::decode(&buf.as_ref()[..SB_STRUCT_SIZE]) {
            Ok((sb, _)) if sb.incompat & INCOMPAT_META_DEVICE != 0 => return Ok(sb),
            Ok(_) => {
                return Err(Error::Unsupported {
                    volume: name,
                    detail: "a blockguard volume of its own, not the metadata device of a split volume"
                        .into(),
                })
            }
            Err(e) => last = Some(e),
        }
    }
    Err(Error::NotAVolume {
        volume: name,
        detail: format!(
            "not a blockguard metadata device ({})",
            last.map_or_else(|| "too small".into(), |e| e.to_string())
        ),
    })
}

/// Refuses one backend given as both devices (its superblock and data block 0 would share
/// byte 0).
fn same_device(data: &Arc<dyn Backend>, meta: &Arc<dyn Backend>) -> Result<()> {
    if Arc::ptr_eq(data, meta) {
        return Err(invalid(
            &data.name(),
            "the same device was given as the data device and the metadata device".into(),
        ));
    }
    Ok(())
}

/// Writes the trailer in the data device's last 4 KiB, and flushes.
fn write_trailer(data: &dyn Backend, t: &DataTrailer) -> Result<()> {
    let name = data.name();
    let at =
        trailer_offset(data.len()).ok_or_else(|| invalid(&name, "the data device is too small".into()))?;
    let mut buf = super::aligned(crate::cast::usize_of(SB_REGION), data.alignment().max(1));
    buf.as_mut()[..512].copy_from_slice(&t.encode());
    data.write_at(buf.as_ref(), at).map_err(super::open::io_error(
        &name,
        "writing the data device's trailer",
        at,
    ))?;
    data.flush()
        .map_err(super::open::io_error(&name, "flushing the data device", 0))
}

fn hex(b: &[u8; 16]) -> String {
    use std::fmt::Write as _;
    b.iter().fold(String::with_capacity(32), |mut s, x| {
        // Writing to a `String` cannot fail.
        let _ = write!(s, "{x:02x}");
        s
    })
}
