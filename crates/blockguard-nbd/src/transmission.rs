//! The transmission phase, without I/O: request parsing and validation, command execution
//! against an [`Export`], and reply encoding.
//!
//! The server reads a header of [`Session::header_len`] bytes, calls
//! [`Session::parse_header`] (a violation there means hard disconnect), reads
//! [`Request::payload_len`] more bytes, and passes everything to [`Session::handle`], which
//! returns the complete reply — header and payload in one buffer, so it can be written with a
//! single call under the connection's write lock.

use crate::buffers::{BufferPool, Payload};
use crate::export::{Export, ExportError, ExportErrorKind, Extent};
use crate::handshake::{Negotiated, ReplyMode};
use crate::proto::{self, PutBe, Reader};
use crate::usize_of;

/// Largest span one `NBD_CMD_BLOCK_STATUS` reply describes. Clients ask again for the rest;
/// the cap bounds the work (the engine scans block metadata) and the reply size.
pub(crate) const MAX_STATUS_SPAN: u64 = 256 << 20;

/// First window looked at for a `REQ_ONE` block status; it grows while the status stays the
/// same, so a small answer costs a small scan.
const REQ_ONE_WINDOW: u64 = 256 << 10;

/// Most descriptors in one block status chunk (the limit the specification recommends).
pub(crate) const MAX_STATUS_DESCRIPTORS: usize = 1 << 20;

/// Size of the zero buffer used for `NBD_CMD_FLAG_NO_HOLE` write zeroes.
const ZERO_CHUNK: usize = 1 << 20;

/// A protocol violation in a request header: the connection must be dropped, because the
/// byte stream can no longer be framed reliably.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub(crate) enum ProtocolViolation {
    /// The header did not start with the negotiated request magic.
    #[error("request has wrong magic {0:#010x}")]
    BadMagic(u32),
    /// A write payload larger than the advertised maximum.
    #[error("request payload of {len} bytes exceeds the {max}-byte maximum")]
    PayloadTooLarge {
        /// Payload length the client announced.
        len: u64,
        /// Advertised maximum.
        max: u32,
    },
    /// The header slice had the wrong length (a server bug, not client input).
    #[error("header of {0} bytes")]
    WrongHeaderLength(usize),
}

/// A parsed request header.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Request {
    /// Command flags.
    pub flags: u16,
    /// Command type.
    pub typ: u16,
    /// Opaque cookie echoed in the reply.
    pub cookie: u64,
    /// Offset in the export.
    pub offset: u64,
    /// Effect length (or payload length for writes).
    pub length: u64,
    /// Bytes of payload following the header.
    pub payload_len: usize,
}

/// Per-connection transmission state fixed by the handshake.
#[derive(Debug, Clone)]
pub(crate) struct Session {
    /// Reply format.
    pub mode: ReplyMode,
    /// Transmission flags advertised.
    pub flags: u16,
    /// Selected `base:allocation` context id.
    pub meta_context: Option<u32>,
    /// Export size in bytes.
    pub size: u64,
    /// Largest request/reply payload.
    pub max_payload: u32,
}

/// The reply to one request, ready to be written.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum Outcome {
    /// Write these bytes.
    Reply(ReplyBytes),
    /// `NBD_CMD_DISC`: no reply; finish in-flight requests and close.
    Disconnect,
}

impl Session {
    /// The session for a finished negotiation.
    pub(crate) fn new(neg: &Negotiated, size: u64, max_payload: u32) -> Self {
        Self {
            mode: neg.mode,
            flags: neg.flags,
            meta_context: neg.meta_context,
            size,
            max_payload,
        }
    }

    /// Size of a request header in this session.
    pub(crate) fn header_len(&self) -> usize {
        match self.mode {
            ReplyMode::Extended => proto::EXTENDED_REQUEST_LEN,
            _ => proto::REQUEST_LEN,
        }
    }

    /// Parses a request header of exactly [`Session::header_len`] bytes.
    pub(crate) fn parse_header(&self, hdr: &[u8]) -> Result<Request, ProtocolViolation> {
        if hdr.len() != self.header_len() {
            return Err(ProtocolViolation::WrongHeaderLength(hdr.len()));
        }
        let extended = self.mode == ReplyMode::Extended;
        let mut r = Reader::new(hdr);
        let magic = r.u32().unwrap_or(0);
        let want = if extended {
            proto::EXTENDED_REQUEST_MAGIC
        } else {
            proto::REQUEST_MAGIC
        };
        if magic != want {
            return Err(ProtocolViolation::BadMagic(magic));
        }
        let flags = r.u16().unwrap_or(0);
        let typ = r.u16().unwrap_or(0);
        let cookie = r.u64().unwrap_or(0);
        let offset = r.u64().unwrap_or(0);
        let length = if extended {
            r.u64().unwrap_or(0)
        } else {
            u64::from(r.u32().unwrap_or(0))
        };
        // A write always carries its data. With extended headers the specification has
        // writes set PAYLOAD_LEN too, but qemu 10 does not; like qemu-nbd, accept both.
        let has_payload = typ == proto::CMD_WRITE || (extended && flags & proto::CMD_FLAG_PAYLOAD_LEN != 0);
        let payload_len = if has_payload {
            match usize::try_from(length) {
                Ok(len) if length <= u64::from(self.max_payload) => len,
                _ => {
                    return Err(ProtocolViolation::PayloadTooLarge {
                        len: length,
                        max: self.max_payload,
                    })
                }
            }
        } else {
            0
        };
        Ok(Request {
            flags,
            typ,
            cookie,
            offset,
            length,
            payload_len,
        })
    }

    /// Validates and executes one request, returning its complete reply.
    #[cfg(any(test, feature = "testing"))]
    pub(crate) fn handle(&self, export: &dyn Export, req: &Request, payload: &[u8]) -> Outcome {
        self.handle_with(
            export,
            req,
            Payload::from_vec(payload.to_vec()),
            &BufferPool::new(0, 0),
        )
    }

    /// A complete error reply to `req` (for requests the server refuses before they reach
    /// [`Session::handle`]); the message is sent where the reply format carries one.
    pub(crate) fn error_reply(&self, req: &Request, errno: u32, message: &str) -> ReplyBytes {
        let rep = Replier {
            mode: self.mode,
            cookie: req.cookie,
            offset: req.offset,
        };
        rep.error(errno, message).into()
    }

    /// [`Session::handle`] taking the read reply buffer from `buffers` and handing a write's
    /// payload over to the export.
    pub(crate) fn handle_with(
        &self,
        export: &dyn Export,
        req: &Request,
        payload: Payload,
        buffers: &BufferPool,
    ) -> Outcome {
        let rep = Replier {
            mode: self.mode,
            cookie: req.cookie,
            offset: req.offset,
        };
        if req.typ == proto::CMD_DISC {
            return Outcome::Disconnect;
        }
        match self.execute(export, req, payload, &rep, buffers) {
            Ok(reply) => Outcome::Reply(reply),
            Err(e) => {
                if e.errno == proto::EIO {
                    tracing::error!(
                        command = proto::command_name(req.typ),
                        offset = req.offset,
                        length = req.length,
                        error = %e.message,
                        "request failed"
                    );
                } else {
                    tracing::debug!(
                        command = proto::command_name(req.typ),
                        offset = req.offset,
                        length = req.length,
                        errno = e.errno,
                        error = %e.message,
                        "request refused"
                    );
                }
                Outcome::Reply(rep.error(e.errno, &e.message).into())
            }
        }
    }

    fn execute(
        &self,
        export: &dyn Export,
        req: &Request,
        payload: Payload,
        rep: &Replier,
        buffers: &BufferPool,
    ) -> Result<ReplyBytes, Failure> {
        self.check_flags(req)?;
        let fua = req.flags & proto::CMD_FLAG_FUA != 0;
        // The payload was consumed; a write must have one exactly as long as announced.
        if req.typ == proto::CMD_WRITE && payload.len() as u64 != req.length {
            return Err(Failure::new(proto::EINVAL, "write without payload"));
        }
        let read_only = self.flags & proto::TFLAG_READ_ONLY != 0;
        match req.typ {
            proto::CMD_READ => {
                self.check_range(req, proto::EINVAL)?;
                let len = match usize::try_from(req.length) {
                    Ok(len) if req.length <= u64::from(self.max_payload) => len,
                    _ => {
                        return Err(Failure::new(
                            proto::EOVERFLOW,
                            format!("read of {} bytes exceeds the maximum", req.length),
                        ))
                    }
                };
                Ok(read(export, req, len, rep, buffers))
            }
            proto::CMD_WRITE => {
                if read_only {
                    return Err(Failure::new(proto::EPERM, "export is read-only"));
                }
                self.check_range(req, proto::ENOSPC)?;
                if !payload.is_empty() {
                    export.write_owned(payload, req.offset).map_err(Failure::from)?;
                    if fua {
                        export.flush().map_err(Failure::from)?;
                    }
                }
                Ok(rep.ok().into())
            }
            proto::CMD_FLUSH => {
                if req.offset != 0 || req.length != 0 {
                    return Err(Failure::new(proto::EINVAL, "flush with offset or length"));
                }
                export.flush().map_err(Failure::from)?;
                Ok(rep.ok().into())
            }
            proto::CMD_TRIM => {
                if read_only {
                    return Err(Failure::new(proto::EPERM, "export is read-only"));
                }
                self.check_range(req, proto::EINVAL)?;
                if req.length > 0 {
                    export.trim(req.offset, req.length).map_err(Failure::from)?;
                    if fua {
                        export.flush().map_err(Failure::from)?;
                    }
                }
                Ok(rep.ok().into())
            }
            proto::CMD_WRITE_ZEROES => {
                if read_only {
                    return Err(Failure::new(proto::EPERM, "export is read-only"));
                }
                self.write_zeroes(export, req, fua)?;
                Ok(rep.ok().into())
            }
            proto::CMD_CACHE => {
                self.check_range(req, proto::EINVAL)?;
                export.cache(req.offset, req.length).map_err(Failure::from)?;
                Ok(rep.ok().into())
            }
            proto::CMD_BLOCK_STATUS => {
                let Some(ctx) = self.meta_context else {
                    return Err(Failure::new(proto::EINVAL, "no metadata context selected"));
                };
                self.check_range(req, proto::EINVAL)?;
                if req.length == 0 {
                    return Err(Failure::new(proto::EINVAL, "block status of 0 bytes"));
                }
                block_status(export, req, ctx, rep).map(Into::into)
            }
            other => Err(Failure::new(proto::EINVAL, format!("unknown command {other}"))),
        }
    }

    /// Refuses flags the command does not take (or this session did not negotiate).
    fn check_flags(&self, req: &Request) -> Result<(), Failure> {
        let mut allowed = proto::CMD_FLAG_FUA;
        match req.typ {
            proto::CMD_READ if self.mode != ReplyMode::Simple => allowed |= proto::CMD_FLAG_DF,
            proto::CMD_WRITE if self.mode == ReplyMode::Extended => allowed |= proto::CMD_FLAG_PAYLOAD_LEN,
            proto::CMD_WRITE_ZEROES => {
                allowed |= proto::CMD_FLAG_NO_HOLE;
                if self.flags & proto::TFLAG_SEND_FAST_ZERO != 0 {
                    allowed |= proto::CMD_FLAG_FAST_ZERO;
                }
            }
            proto::CMD_BLOCK_STATUS => allowed |= proto::CMD_FLAG_REQ_ONE,
            _ => {}
        }
        if req.flags & !allowed != 0 {
            return Err(Failure::new(
                proto::EINVAL,
                format!(
                    "flags {:#x} not valid for {}",
                    req.flags & !allowed,
                    proto::command_name(req.typ)
                ),
            ));
        }
        Ok(())
    }

    /// `NBD_CMD_WRITE_ZEROES` on a writable export: real zero blocks with `NO_HOLE`; refuses
    /// `FAST_ZERO` when zeroing would not be fast.
    fn write_zeroes(&self, export: &dyn Export, req: &Request, fua: bool) -> Result<(), Failure> {
        self.check_range(req, proto::ENOSPC)?;
        let no_hole = req.flags & proto::CMD_FLAG_NO_HOLE != 0;
        if req.flags & proto::CMD_FLAG_FAST_ZERO != 0 && (no_hole || !export.can_fast_zero()) {
            // Writing real zero blocks is no faster than a write: fail fast,
            // touching nothing, as FAST_ZERO requires.
            return Err(Failure::new(proto::ENOTSUP, "zeroing would not be fast"));
        }
        if req.length > 0 {
            if no_hole {
                write_zero_blocks(export, req.offset, req.length)?;
            } else {
                export
                    .write_zeroes(req.offset, req.length)
                    .map_err(Failure::from)?;
            }
            if fua {
                export.flush().map_err(Failure::from)?;
            }
        }
        Ok(())
    }

    fn check_range(&self, req: &Request, errno: u32) -> Result<(), Failure> {
        match req.offset.checked_add(req.length) {
            Some(end) if end <= self.size => Ok(()),
            _ => Err(Failure::new(
                errno,
                format!(
                    "range {}+{} beyond the export's {} bytes",
                    req.offset, req.length, self.size
                ),
            )),
        }
    }
}

/// An error reply to send: NBD errno and message.
#[derive(Debug)]
struct Failure {
    errno: u32,
    message: String,
}

impl Failure {
    fn new(errno: u32, message: impl Into<String>) -> Self {
        Self {
            errno,
            message: message.into(),
        }
    }
}

impl From<ExportError> for Failure {
    fn from(e: ExportError) -> Self {
        Self {
            errno: errno_of(&e),
            message: e.message,
        }
    }
}

/// The NBD error code for an export failure.
pub(crate) fn errno_of(e: &ExportError) -> u32 {
    match e.kind {
        ExportErrorKind::Corruption | ExportErrorKind::Io => proto::EIO,
        ExportErrorKind::OutOfRange => proto::EINVAL,
        ExportErrorKind::ReadOnly => proto::EPERM,
        ExportErrorKind::NoSpace => proto::ENOSPC,
        ExportErrorKind::Unsupported => proto::ENOTSUP,
    }
}

/// Encodes replies to one request in the negotiated format.
#[derive(Debug, Clone, Copy)]
struct Replier {
    mode: ReplyMode,
    cookie: u64,
    /// The request's offset (echoed in extended headers).
    offset: u64,
}

impl Replier {
    fn simple(&self, out: &mut Vec<u8>, errno: u32) {
        out.put_u32(proto::SIMPLE_REPLY_MAGIC);
        out.put_u32(errno);
        out.put_u64(self.cookie);
    }

    fn chunk(&self, out: &mut Vec<u8>, flags: u16, typ: u16, len: u64) {
        if self.mode == ReplyMode::Extended {
            out.put_u32(proto::EXTENDED_REPLY_MAGIC);
            out.put_u16(flags);
            out.put_u16(typ);
            out.put_u64(self.cookie);
            out.put_u64(self.offset);
            out.put_u64(len);
        } else {
            out.put_u32(proto::STRUCTURED_REPLY_MAGIC);
            out.put_u16(flags);
            out.put_u16(typ);
            out.put_u64(self.cookie);
            // Compact chunks carry at most a read of `max_payload` (a `u32`) plus its offset,
            // a block status reply or an error message.
            debug_assert!(u32::try_from(len).is_ok(), "chunk of {len} bytes");
            out.put_u32(u32::try_from(len).unwrap_or(u32::MAX));
        }
    }

    /// Success without payload.
    fn ok(&self) -> Vec<u8> {
        let mut out = Vec::with_capacity(32);
        match self.mode {
            // Structured sessions may use simple replies for payload-free successes.
            ReplyMode::Simple | ReplyMode::Structured => self.simple(&mut out, 0),
            ReplyMode::Extended => self.chunk(&mut out, proto::REPLY_FLAG_DONE, proto::REPLY_TYPE_NONE, 0),
        }
        out
    }

    /// A complete error reply.
    fn error(&self, errno: u32, message: &str) -> Vec<u8> {
        let mut out = Vec::with_capacity(64);
        if self.mode == ReplyMode::Simple {
            self.simple(&mut out, errno);
        } else {
            self.error_chunk(&mut out, errno, message, None, true);
        }
        out
    }

    fn error_chunk(&self, out: &mut Vec<u8>, errno: u32, message: &str, offset: Option<u64>, done: bool) {
        let msg = truncate_utf8(message, proto::MAX_STRING_LEN);
        let (typ, extra) = match offset {
            Some(_) => (proto::REPLY_TYPE_ERROR_OFFSET, 8),
            None => (proto::REPLY_TYPE_ERROR, 0),
        };
        let flags = if done { proto::REPLY_FLAG_DONE } else { 0 };
        self.chunk(out, flags, typ, (6 + msg.len() + extra) as u64);
        out.put_u32(errno);
        // At most `MAX_STRING_LEN` (4096) bytes: truncated above.
        out.put_u16(u16::try_from(msg.len()).expect("error message truncated to 4096 bytes"));
        out.extend_from_slice(msg.as_bytes());
        if let Some(off) = offset {
            out.put_u64(off);
        }
    }
}

/// The longest prefix of `s` of at most `max` bytes that ends on a character boundary.
fn truncate_utf8(s: &str, max: usize) -> &str {
    if s.len() <= max {
        return s;
    }
    let mut end = max;
    while !s.is_char_boundary(end) {
        end -= 1;
    }
    &s[..end]
}

/// Where read data starts in a reply buffer: on a page boundary, not at the odd offset behind
/// the reply header, so a volume opened with `O_DIRECT` reads straight into it (no bounce
/// buffer and extra copy) and the kernel's copies work on whole, aligned pages.
const DATA_ALIGN: usize = 4096;

/// `NBD_CMD_READ`: one buffer holding the reply header followed by the data read in place,
/// the data page-aligned. `len` is `req.length`, checked against the maximum payload.
fn read(export: &dyn Export, req: &Request, len: usize, rep: &Replier, buffers: &BufferPool) -> ReplyBytes {
    let mut h = Vec::with_capacity(proto::EXTENDED_REPLY_LEN + 8);
    if rep.mode == ReplyMode::Simple {
        rep.simple(&mut h, 0);
    } else if len == 0 {
        rep.chunk(&mut h, proto::REPLY_FLAG_DONE, proto::REPLY_TYPE_NONE, 0);
        return h.into();
    } else {
        rep.chunk(
            &mut h,
            proto::REPLY_FLAG_DONE,
            proto::REPLY_TYPE_OFFSET_DATA,
            len as u64 + 8,
        );
        h.put_u64(req.offset);
    }
    let hdr = h.len();
    // The buffer's old contents are all overwritten: header here, data by the read; the
    // padding before the header is never sent.
    let mut out = buffers.take(DATA_ALIGN + hdr + len);
    let base = out.as_ptr() as usize;
    let data_at = (base + hdr).next_multiple_of(DATA_ALIGN) - base;
    debug_assert!(data_at >= hdr && data_at + len <= out.len());
    let start = data_at - hdr;
    out[start..data_at].copy_from_slice(&h);
    out.truncate(data_at + len);
    match export.read_at(&mut out[data_at..], req.offset) {
        Ok(()) => ReplyBytes { buf: out, start },
        Err(e) if e.is_corruption() && rep.mode != ReplyMode::Simple => {
            salvage_read(export, req, len, rep).into()
        }
        Err(e) => {
            log_read_failure(&e, req);
            buffers.give(out);
            if rep.mode == ReplyMode::Simple {
                // A simple reply carries no payload after an error.
                let mut out = Vec::with_capacity(proto::SIMPLE_REPLY_LEN);
                rep.simple(&mut out, errno_of(&e));
                out.into()
            } else {
                rep.error(errno_of(&e), &e.message).into()
            }
        }
    }
}

/// An encoded reply: the bytes from `start` on are sent (a read reply keeps padding in
/// front of its header so its data is page-aligned).
#[derive(Clone)]
pub(crate) struct ReplyBytes {
    buf: Vec<u8>,
    start: usize,
}

impl ReplyBytes {
    /// The whole underlying buffer, for reuse.
    pub(crate) fn into_buffer(self) -> Vec<u8> {
        self.buf
    }
}

impl From<Vec<u8>> for ReplyBytes {
    fn from(buf: Vec<u8>) -> Self {
        Self { buf, start: 0 }
    }
}

impl std::ops::Deref for ReplyBytes {
    type Target = [u8];
    fn deref(&self) -> &[u8] {
        &self.buf[self.start..]
    }
}

impl PartialEq for ReplyBytes {
    fn eq(&self, other: &Self) -> bool {
        **self == **other
    }
}

impl Eq for ReplyBytes {}

impl AsRef<[u8]> for ReplyBytes {
    fn as_ref(&self) -> &[u8] {
        self
    }
}

impl std::fmt::Debug for ReplyBytes {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "ReplyBytes({} bytes)", self.len())
    }
}

fn log_read_failure(e: &ExportError, req: &Request) {
    tracing::error!(offset = req.offset, length = req.length, error = %e, "read failed");
}

/// A read that hit a block failing verification, with structured replies: re-read block by
/// block, send the good runs as data chunks and each bad run as an `ERROR_OFFSET` chunk, so
/// the client learns exactly which bytes are bad and still gets the good ones.
fn salvage_read(export: &dyn Export, req: &Request, len: usize, rep: &Replier) -> Vec<u8> {
    let bs = u64::from(export.block_size().max(1));
    let end = req.offset + req.length;
    let df = req.flags & proto::CMD_FLAG_DF != 0;
    let mut out = Vec::new();
    let mut pos = req.offset;
    // A run of good bytes waiting to be sent as one data chunk: (start, bytes).
    let mut good: Option<(u64, Vec<u8>)> = None;
    let mut bad_start: Option<(u64, ExportError)> = None;
    let mut any_bad = false;
    let flush_good = |out: &mut Vec<u8>, good: &mut Option<(u64, Vec<u8>)>| {
        if let Some((start, data)) = good.take() {
            rep.chunk(out, 0, proto::REPLY_TYPE_OFFSET_DATA, data.len() as u64 + 8);
            out.put_u64(start);
            out.extend_from_slice(&data);
        }
    };
    let flush_bad = |out: &mut Vec<u8>, bad: &mut Option<(u64, ExportError)>, upto: u64| {
        if let Some((start, e)) = bad.take() {
            tracing::error!(
                offset = start,
                length = upto - start,
                error = %e,
                "integrity failure: bytes {start}..{upto} fail verification"
            );
            rep.error_chunk(out, errno_of(&e), &e.message, Some(start), false);
        }
    };
    while pos < end {
        let next = ((pos / bs + 1) * bs).min(end);
        // At most one block.
        let mut piece = vec![0u8; usize_of(next - pos)];
        match export.read_at(&mut piece, pos) {
            Ok(()) => {
                flush_bad(&mut out, &mut bad_start, pos);
                if !df {
                    match &mut good {
                        Some((_, data)) => data.extend_from_slice(&piece),
                        None => good = Some((pos, piece)),
                    }
                }
            }
            Err(e) => {
                any_bad = true;
                flush_good(&mut out, &mut good);
                if bad_start.is_none() {
                    bad_start = Some((pos, e));
                }
            }
        }
        pos = next;
    }
    flush_bad(&mut out, &mut bad_start, end);
    flush_good(&mut out, &mut good);
    if !any_bad {
        // The failure did not repeat (e.g. the block was rewritten meanwhile): every byte
        // was read fresh and verified, so send it as data — but DF forbids fragments, so
        // retry the whole read once instead.
        if df {
            let mut whole = vec![0u8; len];
            return match export.read_at(&mut whole, req.offset) {
                Ok(()) => {
                    let mut out = Vec::new();
                    rep.chunk(
                        &mut out,
                        proto::REPLY_FLAG_DONE,
                        proto::REPLY_TYPE_OFFSET_DATA,
                        whole.len() as u64 + 8,
                    );
                    out.put_u64(req.offset);
                    out.extend_from_slice(&whole);
                    out
                }
                Err(e) => rep.error(errno_of(&e), &e.message),
            };
        }
    }
    rep.chunk(&mut out, proto::REPLY_FLAG_DONE, proto::REPLY_TYPE_NONE, 0);
    out
}

/// `NBD_CMD_WRITE_ZEROES` with `NO_HOLE`: write real zero blocks so the range stays
/// allocated.
fn write_zero_blocks(export: &dyn Export, offset: u64, len: u64) -> Result<(), Failure> {
    let zeroes = vec![0u8; ZERO_CHUNK.min(usize_of(len))];
    let mut pos = offset;
    let end = offset + len;
    while pos < end {
        let n = usize_of((end - pos).min(zeroes.len() as u64));
        export.write_at(&zeroes[..n], pos).map_err(Failure::from)?;
        pos += n as u64;
    }
    Ok(())
}

fn status_of(e: &Extent) -> u32 {
    if e.allocated {
        0
    } else {
        proto::STATE_HOLE | proto::STATE_ZERO
    }
}

/// The extent starting at `offset` (clipped to `end`), found by scanning growing windows
/// until the status changes.
fn first_extent(export: &dyn Export, offset: u64, end: u64) -> Result<Option<(u64, u32)>, Failure> {
    let mut found: Option<(u64, u32)> = None;
    let mut pos = offset;
    let mut window = REQ_ONE_WINDOW;
    while pos < end {
        let len = window.min(end - pos);
        let extents = export.extents(pos, len).map_err(Failure::from)?;
        let Some(first) = extents.first().filter(|e| e.offset == pos && e.len > 0) else {
            break;
        };
        let status = status_of(first);
        let n = first.len.min(len);
        match &mut found {
            None => found = Some((n, status)),
            Some((l, s)) if *s == status => *l += n,
            Some(_) => break,
        }
        pos += n;
        if n < len {
            break;
        }
        window = window.saturating_mul(4);
    }
    Ok(found)
}

/// `NBD_CMD_BLOCK_STATUS` for `base:allocation`: unwritten blocks are hole+zero.
fn block_status(export: &dyn Export, req: &Request, ctx: u32, rep: &Replier) -> Result<Vec<u8>, Failure> {
    let span = req.length.min(MAX_STATUS_SPAN);
    let end = req.offset + span;
    let req_one = req.flags & proto::CMD_FLAG_REQ_ONE != 0;
    let mut descs: Vec<(u64, u32)> = Vec::new();
    if req_one {
        if let Some(d) = first_extent(export, req.offset, end)? {
            descs.push(d);
        }
    }
    let extents = if req_one {
        Vec::new()
    } else {
        export.extents(req.offset, span).map_err(Failure::from)?
    };
    let mut pos = req.offset;
    for e in &extents {
        // Trust but verify: only a contiguous run starting where we are is usable.
        if e.offset != pos || e.len == 0 || pos >= end {
            break;
        }
        let len = e.len.min(end - pos);
        let status = status_of(e);
        match descs.last_mut() {
            Some((l, s)) if *s == status => *l += len,
            _ => {
                if descs.len() == MAX_STATUS_DESCRIPTORS {
                    break;
                }
                descs.push((len, status));
            }
        }
        pos += len;
    }
    if descs.is_empty() {
        // Status 0 ("allocated, contents unknown") is always a safe answer.
        descs.push((span, 0));
    }
    if req_one {
        descs.truncate(1);
    }
    let mut out = Vec::new();
    if rep.mode == ReplyMode::Extended {
        rep.chunk(
            &mut out,
            proto::REPLY_FLAG_DONE,
            proto::REPLY_TYPE_BLOCK_STATUS_EXT,
            8 + 16 * descs.len() as u64,
        );
        out.put_u32(ctx);
        out.put_u32(u32::try_from(descs.len()).expect("at most MAX_STATUS_DESCRIPTORS descriptors"));
        for (len, status) in descs {
            out.put_u64(len);
            out.put_u64(u64::from(status));
        }
    } else {
        rep.chunk(
            &mut out,
            proto::REPLY_FLAG_DONE,
            proto::REPLY_TYPE_BLOCK_STATUS,
            4 + 8 * descs.len() as u64,
        );
        out.put_u32(ctx);
        for (len, status) in descs {
            // span ≤ MAX_STATUS_SPAN < 2^32, so every descriptor length fits.
            out.put_u32(u32::try_from(len).expect("descriptor within MAX_STATUS_SPAN"));
            out.put_u32(status);
        }
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::client::{Chunk, Client, Reply};
    use crate::export::MemoryExport;
    use crate::handshake::{transmission_flags, ExportInfo, BASE_ALLOCATION_ID};
    use std::io::Cursor;

    const SIZE: u64 = 64 * 1024;
    const MAX: u32 = 256 * 1024;
    const ALL: [ReplyMode; 3] = [ReplyMode::Simple, ReplyMode::Structured, ReplyMode::Extended];

    fn export() -> MemoryExport {
        MemoryExport::new(SIZE, 512)
    }

    fn session(mode: ReplyMode, read_only: bool) -> Session {
        let info = ExportInfo {
            name: String::new(),
            description: String::new(),
            size: SIZE,
            block_size: 512,
            read_only,
            fast_zero: true,
        };
        Session {
            mode,
            flags: transmission_flags(&info, mode),
            meta_context: (mode != ReplyMode::Simple).then_some(BASE_ALLOCATION_ID),
            size: SIZE,
            max_payload: MAX,
        }
    }

    fn request(s: &Session, typ: u16, flags: u16, offset: u64, length: u64) -> Request {
        let payload_len = if typ == proto::CMD_WRITE {
            usize_of(length)
        } else {
            0
        };
        let flags = if typ == proto::CMD_WRITE && s.mode == ReplyMode::Extended {
            flags | proto::CMD_FLAG_PAYLOAD_LEN
        } else {
            flags
        };
        Request {
            flags,
            typ,
            cookie: 0x00c0_0c1e,
            offset,
            length,
            payload_len,
        }
    }

    /// Executes a request and decodes its reply like a client would, checking framing.
    fn run(s: &Session, e: &MemoryExport, req: Request, payload: &[u8]) -> Reply {
        let Outcome::Reply(bytes) = s.handle(e, &req, payload) else {
            panic!("no reply")
        };
        let mut c = Client::for_replies(Cursor::new(bytes.to_vec()), s.mode);
        c.expect(req.cookie, req.typ, req.length);
        let r = c.read_reply().expect("reply decodes");
        assert!(c.at_end(), "trailing bytes");
        assert_eq!(r.cookie, req.cookie);
        r
    }

    fn errno(s: &Session, e: &MemoryExport, typ: u16, flags: u16, off: u64, len: u64) -> u32 {
        let req = request(s, typ, flags, off, len);
        let payload = vec![0xaa; req.payload_len];
        run(s, e, req, &payload).errno
    }

    fn read(s: &Session, e: &MemoryExport, off: u64, len: u64) -> Reply {
        run(s, e, request(s, proto::CMD_READ, 0, off, len), &[])
    }

    fn data_of(s: &Session, r: &Reply, off: u64, len: usize) -> Vec<u8> {
        if s.mode == ReplyMode::Simple {
            match &r.chunks[..] {
                [Chunk::Data { data, .. }] => data.clone(),
                [] if len == 0 => Vec::new(),
                other => panic!("{other:?}"),
            }
        } else {
            r.read_data(off, len).expect("covers the range")
        }
    }

    fn header(mode: ReplyMode, flags: u16, typ: u16, length: u64) -> Vec<u8> {
        let mut b = Vec::new();
        if mode == ReplyMode::Extended {
            b.put_u32(proto::EXTENDED_REQUEST_MAGIC);
            b.put_u16(flags);
            b.put_u16(typ);
            b.put_u64(7);
            b.put_u64(512);
            b.put_u64(length);
        } else {
            b.put_u32(proto::REQUEST_MAGIC);
            b.put_u16(flags);
            b.put_u16(typ);
            b.put_u64(7);
            b.put_u64(512);
            b.put_u32(u32::try_from(length).unwrap());
        }
        b
    }

    #[test]
    fn parses_compact_and_extended_headers() {
        let s = session(ReplyMode::Structured, false);
        let r = s
            .parse_header(&header(s.mode, 1, proto::CMD_WRITE, 4096))
            .unwrap();
        assert_eq!(
            (r.flags, r.typ, r.cookie, r.offset),
            (1, proto::CMD_WRITE, 7, 512)
        );
        assert_eq!((r.length, r.payload_len), (4096, 4096));
        let r = s.parse_header(&header(s.mode, 0, proto::CMD_READ, 4096)).unwrap();
        assert_eq!(r.payload_len, 0);
        let x = session(ReplyMode::Extended, false);
        let h = header(x.mode, proto::CMD_FLAG_PAYLOAD_LEN, proto::CMD_WRITE, 100);
        assert_eq!(x.parse_header(&h).unwrap().payload_len, 100);
        // Without PAYLOAD_LEN, an extended length is an effect length, even past 4 GiB.
        let h = header(x.mode, 0, proto::CMD_TRIM, 1 << 40);
        let r = x.parse_header(&h).unwrap();
        assert_eq!((r.length, r.payload_len), (1 << 40, 0));
    }

    #[test]
    fn wrong_magic_and_oversized_payloads_are_violations() {
        let s = session(ReplyMode::Simple, false);
        let mut h = header(s.mode, 0, proto::CMD_READ, 1);
        h[3] ^= 0xff;
        assert!(matches!(s.parse_header(&h), Err(ProtocolViolation::BadMagic(_))));
        // An extended header on a compact session is garbage.
        let x = header(ReplyMode::Extended, 0, proto::CMD_READ, 1);
        assert!(s.parse_header(&x).is_err());
        let h = header(s.mode, 0, proto::CMD_WRITE, u64::from(MAX) + 1);
        assert!(matches!(
            s.parse_header(&h),
            Err(ProtocolViolation::PayloadTooLarge { .. })
        ));
        let x = session(ReplyMode::Extended, false);
        let h = header(x.mode, proto::CMD_FLAG_PAYLOAD_LEN, proto::CMD_READ, 1 << 33);
        assert!(x.parse_header(&h).is_err());
        assert!(matches!(
            s.parse_header(&[0; 5]),
            Err(ProtocolViolation::WrongHeaderLength(5))
        ));
    }

    #[test]
    fn write_then_read_at_odd_offsets_in_every_mode() {
        for mode in ALL {
            let s = session(mode, false);
            let e = export();
            for (off, len) in [(0u64, 1usize), (1, 513), (4095, 4097), (SIZE - 1, 1), (777, 0)] {
                let data: Vec<u8> = (0..len)
                    .map(|i| (i * 7 + usize_of(off)).to_le_bytes()[0])
                    .collect();
                let req = request(&s, proto::CMD_WRITE, 0, off, len as u64);
                assert_eq!(run(&s, &e, req, &data).errno, 0);
                let r = read(&s, &e, off, len as u64);
                assert_eq!(r.errno, 0);
                assert_eq!(data_of(&s, &r, off, len), data, "{mode:?} {off}+{len}");
            }
        }
    }

    #[test]
    fn structured_read_is_one_data_chunk() {
        let s = session(ReplyMode::Structured, false);
        let r = read(&s, &export(), 1000, 3000);
        assert!(matches!(&r.chunks[..], [Chunk::Data { offset: 1000, data }] if data.len() == 3000));
    }

    #[test]
    fn read_data_is_page_aligned_behind_its_header_in_every_mode() {
        for (mode, hdr) in [
            (ReplyMode::Simple, proto::SIMPLE_REPLY_LEN),
            (ReplyMode::Structured, proto::STRUCTURED_REPLY_LEN + 8),
            (ReplyMode::Extended, proto::EXTENDED_REPLY_LEN + 8),
        ] {
            let s = session(mode, false);
            let e = export();
            let pool = BufferPool::new(4, 1 << 20);
            let req = request(&s, proto::CMD_READ, 0, 4096, 8192);
            let Outcome::Reply(b) = s.handle_with(&e, &req, Payload::from_vec(Vec::new()), &pool) else {
                panic!("no reply")
            };
            assert_eq!(b.len(), hdr + 8192, "{mode:?}");
            assert_eq!((b.as_ptr() as usize + hdr) % DATA_ALIGN, 0, "{mode:?}");
            // Reused buffers (at another address) are aligned too.
            pool.give(b.into_buffer());
            let Outcome::Reply(b) = s.handle_with(&e, &req, Payload::from_vec(Vec::new()), &pool) else {
                panic!("no reply")
            };
            assert_eq!((b.as_ptr() as usize + hdr) % DATA_ALIGN, 0, "{mode:?}");
        }
    }

    #[test]
    fn extended_replies_echo_the_request_offset() {
        let s = session(ReplyMode::Extended, false);
        let Outcome::Reply(b) = s.handle(&export(), &request(&s, proto::CMD_FLUSH, 0, 0, 0), &[]) else {
            panic!()
        };
        assert_eq!(b.len(), proto::EXTENDED_REPLY_LEN);
        let Outcome::Reply(b) = s.handle(&export(), &request(&s, proto::CMD_READ, 0, 4608, 8), &[]) else {
            panic!()
        };
        assert_eq!(&b[16..24], &4608u64.to_be_bytes());
    }

    #[test]
    fn fua_write_flushes() {
        let s = session(ReplyMode::Simple, false);
        let e = export();
        assert_eq!(errno(&s, &e, proto::CMD_WRITE, 0, 0, 512), 0);
        assert_eq!(e.flush_count(), 0);
        assert_eq!(errno(&s, &e, proto::CMD_WRITE, proto::CMD_FLAG_FUA, 0, 512), 0);
        assert_eq!(e.flush_count(), 1);
        assert_eq!(errno(&s, &e, proto::CMD_FLUSH, 0, 0, 0), 0);
        assert_eq!(e.flush_count(), 2);
        // FUA on a read is tolerated (clients are known to set it) and ignored.
        assert_eq!(errno(&s, &e, proto::CMD_READ, proto::CMD_FLAG_FUA, 0, 512), 0);
    }

    #[test]
    fn requests_past_the_end() {
        for mode in ALL {
            let s = session(mode, false);
            let e = export();
            let cases = [
                (proto::CMD_READ, SIZE - 1, 2, proto::EINVAL),
                (proto::CMD_WRITE, SIZE, 1, proto::ENOSPC),
                (proto::CMD_TRIM, SIZE - 512, 1024, proto::EINVAL),
                (proto::CMD_WRITE_ZEROES, 1, SIZE, proto::ENOSPC),
                (proto::CMD_CACHE, SIZE + 1, 0, proto::EINVAL),
                (proto::CMD_READ, u64::MAX, 1, proto::EINVAL),
                (proto::CMD_TRIM, 1, u64::MAX, proto::EINVAL),
            ];
            for (typ, off, len, want) in cases {
                if typ == proto::CMD_TRIM && len == u64::MAX && mode != ReplyMode::Extended {
                    continue;
                }
                assert_eq!(
                    errno(&s, &e, typ, 0, off, len),
                    want,
                    "{mode:?} {typ} {off}+{len}"
                );
            }
            if mode != ReplyMode::Simple {
                assert_eq!(
                    errno(&s, &e, proto::CMD_BLOCK_STATUS, 0, SIZE - 1, 2),
                    proto::EINVAL
                );
            }
            assert_eq!(e.contents(), vec![0; usize_of(SIZE)], "nothing written");
        }
    }

    #[test]
    fn oversized_read_overflows() {
        let s = session(ReplyMode::Extended, false);
        let e = MemoryExport::new(u64::from(MAX) * 2, 512);
        let s = Session { size: e.size(), ..s };
        assert_eq!(
            errno(&s, &e, proto::CMD_READ, 0, 0, u64::from(MAX) + 1),
            proto::EOVERFLOW
        );
        assert_eq!(errno(&s, &e, proto::CMD_READ, 0, 0, u64::from(MAX)), 0);
        // Commands without payload may exceed the maximum payload.
        assert_eq!(errno(&s, &e, proto::CMD_WRITE_ZEROES, 0, 0, e.size()), 0);
    }

    #[test]
    fn unknown_commands_and_flags_are_invalid() {
        for mode in ALL {
            let s = session(mode, false);
            let e = export();
            assert_eq!(errno(&s, &e, 99, 0, 0, 0), proto::EINVAL);
            assert_eq!(errno(&s, &e, proto::CMD_RESIZE, 0, 0, 0), proto::EINVAL);
            assert_eq!(errno(&s, &e, proto::CMD_READ, 1 << 15, 0, 1), proto::EINVAL);
            assert_eq!(
                errno(&s, &e, proto::CMD_READ, proto::CMD_FLAG_REQ_ONE, 0, 1),
                proto::EINVAL
            );
            assert_eq!(
                errno(&s, &e, proto::CMD_WRITE, proto::CMD_FLAG_NO_HOLE, 0, 1),
                proto::EINVAL
            );
            assert_eq!(
                errno(&s, &e, proto::CMD_FLUSH, proto::CMD_FLAG_DF, 0, 0),
                proto::EINVAL
            );
            let df = errno(&s, &e, proto::CMD_READ, proto::CMD_FLAG_DF, 0, 1);
            assert_eq!(
                df,
                if mode == ReplyMode::Simple {
                    proto::EINVAL
                } else {
                    0
                }
            );
            // PAYLOAD_LEN is only for extended writes.
            let pl = errno(&s, &e, proto::CMD_TRIM, proto::CMD_FLAG_PAYLOAD_LEN, 0, 0);
            assert_eq!(pl, proto::EINVAL);
            assert_eq!(errno(&s, &e, proto::CMD_FLUSH, 0, 1, 0), proto::EINVAL);
            assert_eq!(errno(&s, &e, proto::CMD_FLUSH, 0, 0, 1), proto::EINVAL);
        }
        // An extended write carries its payload with or without PAYLOAD_LEN (qemu omits it).
        let s = session(ReplyMode::Extended, false);
        let h = header(s.mode, 0, proto::CMD_WRITE, 512);
        let req = s.parse_header(&h).unwrap();
        assert_eq!(req.payload_len, 512);
        assert_eq!(run(&s, &export(), req, &[1; 512]).errno, 0);
    }

    #[test]
    fn read_only_refuses_writes() {
        for mode in ALL {
            let s = session(mode, true);
            let e = export().read_only();
            for typ in [proto::CMD_WRITE, proto::CMD_TRIM, proto::CMD_WRITE_ZEROES] {
                assert_eq!(errno(&s, &e, typ, 0, 0, 512), proto::EPERM);
            }
            assert_eq!(errno(&s, &e, proto::CMD_READ, 0, 0, 512), 0);
            assert_eq!(errno(&s, &e, proto::CMD_FLUSH, 0, 0, 0), 0);
        }
    }

    #[test]
    fn zero_length_requests_succeed() {
        for mode in ALL {
            let s = session(mode, false);
            let e = export();
            for typ in [
                proto::CMD_READ,
                proto::CMD_WRITE,
                proto::CMD_TRIM,
                proto::CMD_WRITE_ZEROES,
                proto::CMD_CACHE,
            ] {
                assert_eq!(errno(&s, &e, typ, 0, 100, 0), 0, "{mode:?} {typ}");
            }
            if mode != ReplyMode::Simple {
                assert_eq!(errno(&s, &e, proto::CMD_BLOCK_STATUS, 0, 0, 0), proto::EINVAL);
            }
        }
    }

    fn status(s: &Session, e: &MemoryExport, flags: u16, off: u64, len: u64) -> Vec<(u64, u64)> {
        let r = run(s, e, request(s, proto::CMD_BLOCK_STATUS, flags, off, len), &[]);
        assert_eq!(r.errno, 0);
        match &r.chunks[..] {
            [Chunk::BlockStatus { context, extents }] => {
                assert_eq!(*context, BASE_ALLOCATION_ID);
                extents.clone()
            }
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn block_status_reports_holes_as_zero() {
        const HZ: u64 = (proto::STATE_HOLE | proto::STATE_ZERO) as u64;
        for mode in [ReplyMode::Structured, ReplyMode::Extended] {
            let s = session(mode, false);
            let e = export();
            assert_eq!(status(&s, &e, 0, 0, SIZE), vec![(SIZE, HZ)]);
            assert_eq!(errno(&s, &e, proto::CMD_WRITE, 0, 1024, 1024), 0);
            assert_eq!(
                status(&s, &e, 0, 0, SIZE),
                vec![(1024, HZ), (1024, 0), (SIZE - 2048, HZ)]
            );
            assert_eq!(status(&s, &e, 0, 1536, 100), vec![(100, 0)]);
            // REQ_ONE: exactly one descriptor, no longer than asked.
            assert_eq!(status(&s, &e, proto::CMD_FLAG_REQ_ONE, 0, SIZE), vec![(1024, HZ)]);
            assert_eq!(status(&s, &e, proto::CMD_FLAG_REQ_ONE, 0, 100), vec![(100, HZ)]);
            // Trim makes a hole again.
            assert_eq!(errno(&s, &e, proto::CMD_TRIM, 0, 1024, 1024), 0);
            assert_eq!(status(&s, &e, 0, 0, SIZE), vec![(SIZE, HZ)]);
        }
    }

    #[test]
    fn req_one_status_grows_its_window_until_the_status_changes() {
        let e = MemoryExport::new(8 << 20, 4096);
        let s = Session {
            size: e.size(),
            ..session(ReplyMode::Structured, false)
        };
        let third = 3u64 << 20;
        assert_eq!(errno(&s, &e, proto::CMD_WRITE, 0, third + 4096, 8192), 0);
        let one = proto::CMD_FLAG_REQ_ONE;
        assert_eq!(status(&s, &e, one, 0, 8 << 20), vec![(third + 4096, 3)]);
        assert_eq!(status(&s, &e, one, third + 4096, 8 << 20 >> 1), vec![(8192, 0)]);
        assert_eq!(status(&s, &e, one, 0, 1000), vec![(1000, 3)]);
        let rest = (8 << 20) - third - 12288;
        assert_eq!(status(&s, &e, one, third + 12288, rest), vec![(rest, 3)]);
    }

    #[test]
    fn block_status_needs_a_context() {
        let mut s = session(ReplyMode::Structured, false);
        s.meta_context = None;
        assert_eq!(
            errno(&s, &export(), proto::CMD_BLOCK_STATUS, 0, 0, 512),
            proto::EINVAL
        );
        let s = session(ReplyMode::Simple, false);
        assert_eq!(
            errno(&s, &export(), proto::CMD_BLOCK_STATUS, 0, 0, 512),
            proto::EINVAL
        );
    }

    #[test]
    fn write_zeroes_flags() {
        let s = session(ReplyMode::Structured, false);
        let e = export();
        assert_eq!(errno(&s, &e, proto::CMD_WRITE, 0, 0, 4096), 0);
        // NO_HOLE: zeroes but stays allocated.
        assert_eq!(
            errno(&s, &e, proto::CMD_WRITE_ZEROES, proto::CMD_FLAG_NO_HOLE, 0, 2048),
            0
        );
        assert_eq!(status(&s, &e, 0, 0, 4096)[0], (4096, 0));
        assert_eq!(data_of(&s, &read(&s, &e, 0, 4096), 0, 4096)[..2048], [0u8; 2048]);
        // Default: may punch holes.
        assert_eq!(
            errno(&s, &e, proto::CMD_WRITE_ZEROES, proto::CMD_FLAG_FUA, 0, 4096),
            0
        );
        assert_eq!(status(&s, &e, 0, 0, 4096)[0].1, 3);
        assert_eq!(e.flush_count(), 1);
        // FAST_ZERO succeeds on metadata zeroing, fails fast with NO_HOLE.
        assert_eq!(
            errno(&s, &e, proto::CMD_WRITE_ZEROES, proto::CMD_FLAG_FAST_ZERO, 0, 512),
            0
        );
        let both = proto::CMD_FLAG_FAST_ZERO | proto::CMD_FLAG_NO_HOLE;
        assert_eq!(
            errno(&s, &e, proto::CMD_WRITE_ZEROES, both, 0, 512),
            proto::ENOTSUP
        );
        // Not advertised → invalid.
        let mut s2 = s.clone();
        s2.flags &= !proto::TFLAG_SEND_FAST_ZERO;
        assert_eq!(
            errno(
                &s2,
                &e,
                proto::CMD_WRITE_ZEROES,
                proto::CMD_FLAG_FAST_ZERO,
                0,
                512
            ),
            proto::EINVAL
        );
    }

    #[test]
    fn corrupt_block_gives_eio_simple() {
        let s = session(ReplyMode::Simple, false);
        let e = export();
        e.corrupt_block(3);
        let r = read(&s, &e, 0, 4096);
        assert_eq!(r.errno, proto::EIO);
        assert!(r.chunks.is_empty(), "no payload after an error");
        assert_eq!(read(&s, &e, 0, 1536).errno, 0);
        assert_eq!(read(&s, &e, 2048, 512).errno, 0);
    }

    #[test]
    fn corrupt_block_gives_error_offset_and_good_data_structured() {
        for mode in [ReplyMode::Structured, ReplyMode::Extended] {
            let s = session(mode, false);
            let e = export();
            let data: Vec<u8> = (0..4096_u32).map(|i| (i % 251) as u8 + 1).collect();
            assert_eq!(
                run(&s, &e, request(&s, proto::CMD_WRITE, 0, 0, 4096), &data).errno,
                0
            );
            e.corrupt_block(3);
            e.corrupt_block(4);
            e.corrupt_block(6);
            let r = read(&s, &e, 100, 3900);
            assert_eq!(r.errno, proto::EIO);
            let mut errors = Vec::new();
            for c in &r.chunks {
                match c {
                    Chunk::Data { offset, data: got } => {
                        let at = usize_of(*offset);
                        let end = at + got.len();
                        assert_eq!(got[..], data[at..end]);
                        assert!(end <= 1536 || at >= 2560 && end <= 3072 || at >= 3584);
                    }
                    Chunk::Error {
                        errno,
                        offset,
                        message,
                    } => {
                        assert_eq!(*errno, proto::EIO);
                        assert!(message.contains("block"));
                        errors.push(offset.unwrap());
                    }
                    other => panic!("{other:?}"),
                }
            }
            assert_eq!(errors, vec![1536, 3072]);
            // DF: no data fragments at all, only errors.
            let r = run(
                &s,
                &e,
                request(&s, proto::CMD_READ, proto::CMD_FLAG_DF, 0, 4096),
                &[],
            );
            assert_eq!(r.errno, proto::EIO);
            assert!(r.chunks.iter().all(|c| matches!(c, Chunk::Error { .. })));
            // Reads beside the bad blocks still work.
            assert_eq!(data_of(&s, &read(&s, &e, 0, 1536), 0, 1536), data[..1536]);
        }
    }

    #[test]
    fn disc_has_no_reply() {
        let s = session(ReplyMode::Structured, false);
        assert_eq!(
            s.handle(&export(), &request(&s, proto::CMD_DISC, 0, 0, 0), &[]),
            Outcome::Disconnect
        );
    }

    #[test]
    fn error_messages_are_truncated_on_char_boundaries() {
        let s = "é".repeat(3000);
        let t = truncate_utf8(&s, proto::MAX_STRING_LEN);
        assert!(t.len() <= proto::MAX_STRING_LEN && s.is_char_boundary(t.len()));
    }

    /// Stands in for the fuzz target where cargo-fuzz is not available: random and
    /// half-valid byte streams through the same entry point.
    #[test]
    fn fuzz_entry_survives_random_input() {
        let mut seed = 0x9e37_79b9_7f4a_7c15u64;
        let mut next = move || {
            seed ^= seed << 13;
            seed ^= seed >> 7;
            seed ^= seed << 17;
            seed
        };
        let mut handled = 0;
        for i in 0..3000_u32 {
            let mode = (i % 4) as u8;
            let mut data = vec![mode];
            // Well-framed requests with random fields (and exact payloads), then random bytes.
            if mode != 0 {
                for _ in 0..(next() % 8) {
                    let flags = (next() % 64) as u16;
                    let typ = (next() % 9) as u16;
                    let len = next() % 8192;
                    let payload =
                        typ == proto::CMD_WRITE || (mode == 3 && flags & proto::CMD_FLAG_PAYLOAD_LEN != 0);
                    data.put_u32(if mode == 3 {
                        proto::EXTENDED_REQUEST_MAGIC
                    } else {
                        proto::REQUEST_MAGIC
                    });
                    data.put_u16(flags);
                    data.put_u16(typ);
                    data.put_u64(next());
                    data.put_u64(next() % (SIZE + 1024));
                    if mode == 3 {
                        data.put_u64(len);
                    } else {
                        data.put_u32(len as u32);
                    }
                    if payload {
                        data.extend(std::iter::repeat_n(0xa5, len as usize));
                    }
                }
            }
            let n = (next() % 400) as usize;
            for _ in 0..n {
                // Bias towards small values so flags and lengths are sometimes plausible.
                let b = next();
                data.push(if b % 3 == 0 {
                    ((b >> 8) % 8) as u8
                } else {
                    (b >> 8).to_le_bytes()[0]
                });
            }
            handled += crate::fuzzing::fuzz_one(&data);
        }
        assert!(handled > 3000, "only {handled} requests reached execution");
    }
}
