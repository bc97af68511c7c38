//! The client side of the NBD wire protocol (`doc/proto.md` of the NetworkBlockDevice/nbd
//! repository): the fixed-newstyle handshake and the request and reply headers. All integers
//! are big-endian.
//!
//! The protocol's numbers are `super::proto`, shared with the server crate.

use std::io::{self, Read, Write};
use std::net::{Shutdown, TcpStream};
use std::os::unix::net::UnixStream;
use std::time::Duration;

use super::proto::{
    FLAG_FIXED_NEWSTYLE, FLAG_NO_ZEROES, IHAVEOPT, INFO_BLOCK_SIZE, INFO_EXPORT, NBDMAGIC, OPT_EXPORT_NAME,
    OPT_GO, OPT_STARTTLS, OPT_STRUCTURED_REPLY, REPLY_MAGIC_OPT, REP_ACK, REP_ERR_TLS_REQD, REP_ERR_UNSUP,
    REP_INFO, REQUEST_LEN, REQUEST_MAGIC,
};

/// Largest request the protocol document lets a client send when the server states no
/// maximum block size.
pub(crate) const DEFAULT_MAX_PAYLOAD: u32 = 32 << 20;

/// A request type.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Cmd {
    Read = 0,
    Write = 1,
    Disconnect = 2,
    Flush = 3,
    WriteZeroes = 6,
}

impl Cmd {
    /// The request's name, for messages.
    pub(crate) fn name(self) -> &'static str {
        match self {
            Cmd::Read => "read",
            Cmd::Write => "write",
            Cmd::Disconnect => "disconnect",
            Cmd::Flush => "flush",
            Cmd::WriteZeroes => "write-zeroes",
        }
    }
}

/// A request header.
pub(crate) fn request(cmd: Cmd, cookie: u64, offset: u64, len: u32) -> [u8; REQUEST_LEN] {
    let mut h = [0u8; REQUEST_LEN];
    h[0..4].copy_from_slice(&REQUEST_MAGIC.to_be_bytes());
    // Flags (bytes 4..6) stay 0: no FUA (durability comes from flush), no NO_HOLE.
    h[6..8].copy_from_slice(&(cmd as u16).to_be_bytes());
    h[8..16].copy_from_slice(&cookie.to_be_bytes());
    h[16..24].copy_from_slice(&offset.to_be_bytes());
    h[24..28].copy_from_slice(&len.to_be_bytes());
    h
}

/// A connected socket, TCP or Unix.
#[derive(Debug)]
pub(crate) enum Stream {
    Tcp(TcpStream),
    Unix(UnixStream),
}

impl Stream {
    pub(crate) fn try_clone(&self) -> io::Result<Stream> {
        Ok(match self {
            Stream::Tcp(s) => Stream::Tcp(s.try_clone()?),
            Stream::Unix(s) => Stream::Unix(s.try_clone()?),
        })
    }

    /// Ends the connection both ways, which wakes a thread blocked reading it.
    pub(crate) fn shutdown(&self) {
        // Already shut down or reset: nothing more to do.
        let _ = match self {
            Stream::Tcp(s) => s.shutdown(Shutdown::Both),
            Stream::Unix(s) => s.shutdown(Shutdown::Both),
        };
    }

    /// Bounds every blocking read (`None`: unbounded) of this socket and its clones.
    pub(crate) fn set_read_timeout(&self, t: Option<Duration>) -> io::Result<()> {
        match self {
            Stream::Tcp(s) => s.set_read_timeout(t),
            Stream::Unix(s) => s.set_read_timeout(t),
        }
    }

    /// Bounds every blocking write of this socket and its clones.
    pub(crate) fn set_write_timeout(&self, t: Option<Duration>) -> io::Result<()> {
        match self {
            Stream::Tcp(s) => s.set_write_timeout(t),
            Stream::Unix(s) => s.set_write_timeout(t),
        }
    }
}

impl Read for Stream {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        match self {
            Stream::Tcp(s) => s.read(buf),
            Stream::Unix(s) => s.read(buf),
        }
    }
}

impl Write for Stream {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        match self {
            Stream::Tcp(s) => s.write(buf),
            Stream::Unix(s) => s.write(buf),
        }
    }
    fn write_vectored(&mut self, bufs: &[io::IoSlice<'_>]) -> io::Result<usize> {
        match self {
            Stream::Tcp(s) => s.write_vectored(bufs),
            Stream::Unix(s) => s.write_vectored(bufs),
        }
    }
    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

/// Writes all of `bufs` (a header and its payload) with as few system calls as the socket
/// allows, so a request's header and data usually leave in one segment.
pub(crate) fn write_all_vectored(w: &mut impl Write, bufs: &mut [io::IoSlice<'_>]) -> io::Result<()> {
    let mut bufs = bufs;
    io::IoSlice::advance_slices(&mut bufs, 0);
    while !bufs.is_empty() {
        match w.write_vectored(bufs) {
            Ok(0) => return Err(io::ErrorKind::WriteZero.into()),
            Ok(n) => io::IoSlice::advance_slices(&mut bufs, n),
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
    }
    Ok(())
}

/// What the handshake learned about the export.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct ExportInfo {
    /// Size in bytes.
    pub(crate) size: u64,
    /// Transmission flags.
    pub(crate) flags: u16,
    /// Minimum block size: offsets and lengths must be multiples of it.
    pub(crate) min_block: u32,
    /// Largest payload of one request.
    pub(crate) max_payload: u32,
    /// Replies are structured (chunks), not simple.
    pub(crate) structured: bool,
}

/// Why a handshake failed, before the backend names the export.
#[derive(Debug)]
pub(crate) enum HandshakeError {
    Io(io::Error),
    Protocol(String),
    /// The server answered an option with `NBD_REP_ERR_TLS_REQD`.
    TlsRequired,
    /// The server refused `NBD_OPT_STARTTLS`: why, in words.
    StartTlsRefused(String),
}

impl From<io::Error> for HandshakeError {
    fn from(e: io::Error) -> Self {
        HandshakeError::Io(e)
    }
}

fn read_u16(r: &mut impl Read) -> io::Result<u16> {
    let mut b = [0u8; 2];
    r.read_exact(&mut b)?;
    Ok(u16::from_be_bytes(b))
}

fn read_u32(r: &mut impl Read) -> io::Result<u32> {
    let mut b = [0u8; 4];
    r.read_exact(&mut b)?;
    Ok(u32::from_be_bytes(b))
}

fn read_u64(r: &mut impl Read) -> io::Result<u64> {
    let mut b = [0u8; 8];
    r.read_exact(&mut b)?;
    Ok(u64::from_be_bytes(b))
}

fn send_option(w: &mut impl Write, opt: u32, data: &[u8]) -> Result<(), HandshakeError> {
    let len =
        u32::try_from(data.len()).map_err(|_| HandshakeError::Protocol("option data too long".into()))?;
    let mut msg = Vec::with_capacity(16 + data.len());
    msg.extend_from_slice(&IHAVEOPT.to_be_bytes());
    msg.extend_from_slice(&opt.to_be_bytes());
    msg.extend_from_slice(&len.to_be_bytes());
    msg.extend_from_slice(data);
    w.write_all(&msg)?;
    Ok(())
}

/// Largest option reply accepted: the replies asked for are a few bytes, error messages a few
/// hundred; more means a broken or hostile server, whose length must not size an allocation.
const MAX_OPTION_REPLY: u32 = 64 << 10;

/// Reads one option reply to `opt`: (reply type, data).
fn read_option_reply(r: &mut impl Read, opt: u32) -> Result<(u32, Vec<u8>), HandshakeError> {
    let magic = read_u64(r)?;
    if magic != REPLY_MAGIC_OPT {
        return Err(HandshakeError::Protocol(format!(
            "option reply magic {magic:#x} is wrong"
        )));
    }
    let got = read_u32(r)?;
    let typ = read_u32(r)?;
    let len = read_u32(r)?;
    if got != opt {
        return Err(HandshakeError::Protocol(format!(
            "reply to option {got} while option {opt} was asked"
        )));
    }
    if len > MAX_OPTION_REPLY {
        return Err(HandshakeError::Protocol(format!(
            "option reply of {len} bytes is too long"
        )));
    }
    let mut data = vec![0u8; len as usize];
    r.read_exact(&mut data)?;
    Ok((typ, data))
}

/// An option error reply, as a message: its number and the server's text.
fn option_error(opt: &str, typ: u32, data: &[u8]) -> HandshakeError {
    if typ == REP_ERR_TLS_REQD {
        return HandshakeError::TlsRequired;
    }
    HandshakeError::Protocol(option_error_text(opt, typ, data))
}

/// The words for an option error reply: "the server answered OPT with NAME: TEXT".
fn option_error_text(opt: &str, typ: u32, data: &[u8]) -> String {
    let name = match typ.wrapping_sub(1 << 31) {
        1 => "unsupported",
        2 => "forbidden by policy",
        3 => "invalid",
        4 => "unsupported on this platform",
        5 => "TLS required",
        6 => "unknown export",
        7 => "server shutting down",
        8 => "block size information required",
        9 => "too big",
        _ => "refused",
    };
    let text = String::from_utf8_lossy(data);
    let text = if text.is_empty() {
        String::new()
    } else {
        format!(": {text}")
    };
    format!("the server answered {opt} with {name}{text}")
}

/// Reads the fixed-newstyle greeting and answers it; returns whether the server leaves out
/// the 124 zero bytes after `NBD_OPT_EXPORT_NAME` (`NO_ZEROES`, which the client then asks for).
pub(crate) fn greet<S: Read + Write>(s: &mut S) -> Result<bool, HandshakeError> {
    if read_u64(s)? != NBDMAGIC || read_u64(s)? != IHAVEOPT {
        return Err(HandshakeError::Protocol(
            "the server does not speak newstyle NBD (wrong greeting magic)".into(),
        ));
    }
    let hflags = read_u16(s)?;
    if hflags & FLAG_FIXED_NEWSTYLE == 0 {
        return Err(HandshakeError::Protocol(
            "the server does not speak fixed newstyle NBD".into(),
        ));
    }
    let no_zeroes = hflags & FLAG_NO_ZEROES != 0;
    let cflags = u32::from(FLAG_FIXED_NEWSTYLE) | if no_zeroes { u32::from(FLAG_NO_ZEROES) } else { 0 };
    s.write_all(&cflags.to_be_bytes())?;
    Ok(no_zeroes)
}

/// `NBD_OPT_STARTTLS`, first of all options: `Ok` once the server acknowledged it, after
/// which the TLS handshake starts on the same socket and the options are sent again inside
/// TLS (nothing said before counts). Nothing the server sends after the acknowledgement is
/// read here: any plain text it slipped in must reach the TLS handshake (and fail it), never
/// be taken for an option reply.
pub(crate) fn starttls<S: Read + Write>(s: &mut S) -> Result<(), HandshakeError> {
    send_option(s, OPT_STARTTLS, &[])?;
    let (typ, data) = read_option_reply(s, OPT_STARTTLS)?;
    match typ {
        REP_ACK => Ok(()),
        REP_ERR_UNSUP => Err(HandshakeError::StartTlsRefused(
            "the server does not support TLS (it answered NBD_OPT_STARTTLS with unsupported)".into(),
        )),
        t if t & (1 << 31) != 0 => Err(HandshakeError::StartTlsRefused(option_error_text(
            "STARTTLS", t, &data,
        ))),
        t => Err(HandshakeError::Protocol(format!(
            "the server answered STARTTLS with reply type {t}, not an acknowledgement"
        ))),
    }
}

/// Negotiates the options and enters transmission: structured replies when the server has
/// them, then `NBD_OPT_GO` asking for block size constraints, or `NBD_OPT_EXPORT_NAME` on a
/// server that predates `GO`. `no_zeroes` is what [`greet`] returned.
pub(crate) fn negotiate<S: Read + Write>(
    s: &mut S,
    export: &str,
    no_zeroes: bool,
) -> Result<ExportInfo, HandshakeError> {
    send_option(s, OPT_STRUCTURED_REPLY, &[])?;
    let (typ, data) = read_option_reply(s, OPT_STRUCTURED_REPLY)?;
    let structured = match typ {
        REP_ACK => true,
        // A server that requires TLS answers every option so; GO would too, but says less.
        REP_ERR_TLS_REQD => return Err(HandshakeError::TlsRequired),
        t if t & (1 << 31) != 0 => false,
        t => return Err(option_error("structured replies", t, &data)),
    };

    let name = export.as_bytes();
    let name_len =
        u32::try_from(name.len()).map_err(|_| HandshakeError::Protocol("export name too long".into()))?;
    let mut go = Vec::with_capacity(8 + name.len());
    go.extend_from_slice(&name_len.to_be_bytes());
    go.extend_from_slice(name);
    go.extend_from_slice(&1u16.to_be_bytes());
    go.extend_from_slice(&INFO_BLOCK_SIZE.to_be_bytes());
    send_option(s, OPT_GO, &go)?;
    let mut info = ExportInfo {
        size: 0,
        flags: 0,
        min_block: 1,
        max_payload: DEFAULT_MAX_PAYLOAD,
        structured,
    };
    let mut have_export = false;
    loop {
        let (typ, data) = read_option_reply(s, OPT_GO)?;
        match typ {
            REP_ACK => break,
            REP_INFO => read_info(&data, &mut info, &mut have_export)?,
            REP_ERR_UNSUP => return export_name_fallback(s, name, no_zeroes, structured),
            t if t & (1 << 31) != 0 => return Err(option_error("GO", t, &data)),
            // Other informational replies are for other options; the spec lets a client skip them.
            _ => {}
        }
    }
    if !have_export {
        return Err(HandshakeError::Protocol(
            "the server acknowledged GO without sending the export's size".into(),
        ));
    }
    Ok(info)
}

fn read_info(data: &[u8], info: &mut ExportInfo, have_export: &mut bool) -> Result<(), HandshakeError> {
    let bad = || HandshakeError::Protocol(format!("malformed NBD_REP_INFO of {} bytes", data.len()));
    let item = data.get(..2).ok_or_else(bad)?;
    match u16::from_be_bytes([item[0], item[1]]) {
        INFO_EXPORT => {
            let d: [u8; 10] = data.get(2..12).and_then(|d| d.try_into().ok()).ok_or_else(bad)?;
            info.size = u64::from_be_bytes(d[..8].try_into().map_err(|_| bad())?);
            info.flags = u16::from_be_bytes([d[8], d[9]]);
            *have_export = true;
        }
        INFO_BLOCK_SIZE => {
            let d: [u8; 12] = data.get(2..14).and_then(|d| d.try_into().ok()).ok_or_else(bad)?;
            let word = |i: usize| u32::from_be_bytes([d[i], d[i + 1], d[i + 2], d[i + 3]]);
            let (min, max) = (word(0), word(8));
            if !min.is_power_of_two() || min > 64 << 10 || max < min {
                return Err(HandshakeError::Protocol(format!(
                    "the server's block size constraints make no sense (minimum {min}, maximum {max})"
                )));
            }
            info.min_block = min;
            // Round the maximum down to a multiple of the minimum so split requests stay aligned.
            info.max_payload = max.min(DEFAULT_MAX_PAYLOAD) / min * min;
        }
        _ => {}
    }
    Ok(())
}

/// `NBD_OPT_EXPORT_NAME`, for servers without `GO`: no error reply is possible (the server
/// closes the connection on an unknown export).
fn export_name_fallback<S: Read + Write>(
    s: &mut S,
    name: &[u8],
    no_zeroes: bool,
    structured: bool,
) -> Result<ExportInfo, HandshakeError> {
    send_option(s, OPT_EXPORT_NAME, name)?;
    let size = read_u64(s)?;
    let flags = read_u16(s)?;
    if !no_zeroes {
        let mut zeros = [0u8; 124];
        s.read_exact(&mut zeros)?;
    }
    Ok(ExportInfo {
        size,
        flags,
        min_block: 1,
        max_payload: DEFAULT_MAX_PAYLOAD,
        structured,
    })
}

/// The name of an NBD error number (the protocol reuses Linux's errno values).
pub(crate) fn errno_name(e: u32) -> &'static str {
    use super::proto::{EINVAL, EIO, ENOMEM, ENOSPC, ENOTSUP, EOVERFLOW, EPERM, ESHUTDOWN};
    match e {
        EPERM => "EPERM",
        EIO => "EIO",
        ENOMEM => "ENOMEM",
        EINVAL => "EINVAL",
        ENOSPC => "ENOSPC",
        EOVERFLOW => "EOVERFLOW",
        ENOTSUP => "ENOTSUP",
        ESHUTDOWN => "ESHUTDOWN",
        _ => "an unknown error",
    }
}
