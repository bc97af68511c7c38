//! A minimal blocking NBD client, for tests, the fuzz harness and diagnostics.
//!
//! It speaks the same subset the server does (fixed newstyle, `GO` or `EXPORT_NAME`,
//! structured replies, extended headers, `base:allocation`) and also exposes raw option and
//! request I/O so tests can send malformed input on purpose. It is not meant for production
//! clients: one request at a time unless [`Client::send_request`] /
//! [`Client::read_reply`] are used directly.

use crate::handshake::ReplyMode;
use crate::proto::{self, PutBe, Reader};
use crate::usize_of;
use std::collections::HashMap;
use std::io::{self, Read, Write};

/// What to negotiate.
#[derive(Debug, Clone)]
// Independent switches, one per protocol feature a test may ask for or leave out in any
// combination (malformed negotiations included): no state machine or enum to fold them into.
#[allow(clippy::struct_excessive_bools)]
pub struct ClientOptions {
    /// Export name to ask for.
    pub export_name: String,
    /// Ask for structured replies.
    pub structured: bool,
    /// Ask for extended headers (before structured replies, as qemu does).
    pub extended: bool,
    /// Select `base:allocation`.
    pub base_allocation: bool,
    /// End with `NBD_OPT_EXPORT_NAME` instead of `NBD_OPT_GO`.
    pub export_name_option: bool,
    /// Set `NBD_FLAG_C_NO_ZEROES`.
    pub no_zeroes: bool,
}

impl Default for ClientOptions {
    fn default() -> Self {
        Self {
            export_name: String::new(),
            structured: true,
            extended: false,
            base_allocation: true,
            export_name_option: false,
            no_zeroes: true,
        }
    }
}

/// One option reply.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct OptionReply {
    /// The option answered.
    pub opt: u32,
    /// Reply type (`NBD_REP_*`).
    pub typ: u32,
    /// Reply data.
    pub data: Vec<u8>,
}

/// One chunk of a structured or extended reply (or the contents of a simple reply).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Chunk {
    /// Data at an offset.
    Data {
        /// Offset in the export.
        offset: u64,
        /// The bytes.
        data: Vec<u8>,
    },
    /// Zeroes at an offset.
    Hole {
        /// Offset in the export.
        offset: u64,
        /// Length of the hole.
        len: u32,
    },
    /// Block status descriptors `(length, flags)`.
    BlockStatus {
        /// Context id.
        context: u32,
        /// Descriptors.
        extents: Vec<(u64, u64)>,
    },
    /// An error chunk.
    Error {
        /// NBD errno.
        errno: u32,
        /// Message.
        message: String,
        /// Offset for `ERROR_OFFSET`.
        offset: Option<u64>,
    },
}

/// A complete reply to one request.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct Reply {
    /// The cookie it answers.
    pub cookie: u64,
    /// First error (simple reply error, or errno of the first error chunk); 0 on success.
    pub errno: u32,
    /// Chunks (a simple read reply becomes one `Data` chunk).
    pub chunks: Vec<Chunk>,
}

impl Reply {
    /// Reassembles read data for `offset..offset+len`, holes as zeroes. `None` on error.
    pub fn read_data(&self, offset: u64, len: usize) -> Option<Vec<u8>> {
        if self.errno != 0 {
            return None;
        }
        let mut out = vec![0u8; len];
        let mut covered = 0usize;
        for c in &self.chunks {
            match c {
                Chunk::Data { offset: o, data } => {
                    let start = usize::try_from(o.checked_sub(offset)?).ok()?;
                    out.get_mut(start..start + data.len())?.copy_from_slice(data);
                    covered += data.len();
                }
                Chunk::Hole { offset: o, len: l } => {
                    let start = usize::try_from(o.checked_sub(offset)?).ok()?;
                    out.get_mut(start..start + *l as usize)?.fill(0);
                    covered += *l as usize;
                }
                _ => {}
            }
        }
        (covered == len).then_some(out)
    }
}

fn bad(msg: impl Into<String>) -> io::Error {
    io::Error::new(io::ErrorKind::InvalidData, msg.into())
}

/// A request the caller asked for that the wire format cannot carry.
fn too_long(what: &str) -> io::Error {
    io::Error::new(
        io::ErrorKind::InvalidInput,
        format!("{what} too long for its length field"),
    )
}

fn read_u16(s: &mut impl Read) -> io::Result<u16> {
    let mut b = [0u8; 2];
    s.read_exact(&mut b)?;
    Ok(u16::from_be_bytes(b))
}
fn read_u32(s: &mut impl Read) -> io::Result<u32> {
    let mut b = [0u8; 4];
    s.read_exact(&mut b)?;
    Ok(u32::from_be_bytes(b))
}
fn read_u64(s: &mut impl Read) -> io::Result<u64> {
    let mut b = [0u8; 8];
    s.read_exact(&mut b)?;
    Ok(u64::from_be_bytes(b))
}

/// Reads the 18-byte server greeting; returns the handshake flags.
pub fn read_greeting(s: &mut impl Read) -> io::Result<u16> {
    if read_u64(s)? != proto::NBDMAGIC || read_u64(s)? != proto::IHAVEOPT {
        return Err(bad("bad server greeting"));
    }
    read_u16(s)
}

/// Sends one option.
pub fn send_option(s: &mut impl Write, opt: u32, data: &[u8]) -> io::Result<()> {
    let len = u32::try_from(data.len()).map_err(|_| too_long("option data"))?;
    let mut b = Vec::with_capacity(16 + data.len());
    b.put_u64(proto::IHAVEOPT);
    b.put_u32(opt);
    b.put_u32(len);
    b.extend_from_slice(data);
    s.write_all(&b)
}

/// Reads one option reply.
pub fn read_option_reply(s: &mut impl Read) -> io::Result<OptionReply> {
    if read_u64(s)? != proto::REPLY_MAGIC_OPT {
        return Err(bad("bad option reply magic"));
    }
    let opt = read_u32(s)?;
    let typ = read_u32(s)?;
    let len = read_u32(s)?;
    if len > 16 << 20 {
        return Err(bad("option reply too long"));
    }
    let mut data = vec![0u8; usize::try_from(len).map_err(|_| bad("option reply too long"))?];
    s.read_exact(&mut data)?;
    Ok(OptionReply { opt, typ, data })
}

/// Encodes `NBD_OPT_GO`/`INFO` data.
///
/// # Panics
///
/// If `name` has 4 GiB or more, or `infos` 64 Ki items or more (the fields cannot hold them).
pub fn info_request(name: &str, infos: &[u16]) -> Vec<u8> {
    let mut d = Vec::new();
    d.put_u32(u32::try_from(name.len()).expect("export name under 4 GiB"));
    d.extend_from_slice(name.as_bytes());
    d.put_u16(u16::try_from(infos.len()).expect("fewer than 64 Ki info requests"));
    for i in infos {
        d.put_u16(*i);
    }
    d
}

/// Encodes `NBD_OPT_SET/LIST_META_CONTEXT` data.
///
/// # Panics
///
/// If a string has 4 GiB or more, or there are 4 Gi queries or more.
pub fn meta_request(name: &str, queries: &[&str]) -> Vec<u8> {
    let len = |n: usize| u32::try_from(n).expect("meta context request field under 4 Gi");
    let mut d = Vec::new();
    d.put_u32(len(name.len()));
    d.extend_from_slice(name.as_bytes());
    d.put_u32(len(queries.len()));
    for q in queries {
        d.put_u32(len(q.len()));
        d.extend_from_slice(q.as_bytes());
    }
    d
}

/// A connected client in the transmission phase.
#[derive(Debug)]
pub struct Client<S> {
    stream: S,
    /// Reply format in use.
    pub mode: ReplyMode,
    /// Export size.
    pub size: u64,
    /// Transmission flags.
    pub flags: u16,
    /// Context id of `base:allocation`, if selected.
    pub meta_context: Option<u32>,
    /// `(minimum, preferred, maximum)` block sizes if the server sent them.
    pub block_sizes: Option<(u32, u32, u32)>,
    next_cookie: u64,
    /// Outstanding requests: cookie → (command, length), needed to parse simple read replies.
    pending: HashMap<u64, (u16, u64)>,
}

/// Asks for extended headers and/or structured replies, as `opts` says; returns the reply
/// format the server agreed to.
fn negotiate_reply_mode(stream: &mut (impl Read + Write), opts: &ClientOptions) -> io::Result<ReplyMode> {
    let mut mode = ReplyMode::Simple;
    if opts.extended {
        send_option(stream, proto::OPT_EXTENDED_HEADERS, &[])?;
        if read_option_reply(stream)?.typ == proto::REP_ACK {
            mode = ReplyMode::Extended;
        }
    }
    if opts.structured && mode == ReplyMode::Simple {
        send_option(stream, proto::OPT_STRUCTURED_REPLY, &[])?;
        if read_option_reply(stream)?.typ == proto::REP_ACK {
            mode = ReplyMode::Structured;
        }
    }
    Ok(mode)
}

/// Selects `base:allocation` with `NBD_OPT_SET_META_CONTEXT`; returns the context id the
/// server gave it, if any.
fn select_base_allocation(stream: &mut (impl Read + Write), export_name: &str) -> io::Result<Option<u32>> {
    let d = meta_request(export_name, &[proto::META_BASE_ALLOCATION]);
    send_option(stream, proto::OPT_SET_META_CONTEXT, &d)?;
    let mut meta_context = None;
    loop {
        let r = read_option_reply(stream)?;
        match r.typ {
            proto::REP_META_CONTEXT => {
                meta_context = Reader::new(&r.data).u32();
            }
            proto::REP_ACK => return Ok(meta_context),
            t => return Err(bad(format!("SET_META_CONTEXT failed: {t:#x}"))),
        }
    }
}

impl<S: Read + Write> Client<S> {
    /// Performs the handshake on `stream`.
    pub fn handshake(mut stream: S, opts: &ClientOptions) -> io::Result<Self> {
        let hflags = read_greeting(&mut stream)?;
        let mut cflags = proto::FLAG_C_FIXED_NEWSTYLE;
        if opts.no_zeroes && hflags & proto::FLAG_NO_ZEROES != 0 {
            cflags |= proto::FLAG_C_NO_ZEROES;
        }
        stream.write_all(&cflags.to_be_bytes())?;
        let mode = negotiate_reply_mode(&mut stream, opts)?;
        let meta_context = if opts.base_allocation && mode != ReplyMode::Simple {
            select_base_allocation(&mut stream, &opts.export_name)?
        } else {
            None
        };
        let mut client = Client {
            stream,
            mode,
            size: 0,
            flags: 0,
            meta_context,
            block_sizes: None,
            next_cookie: 1,
            pending: HashMap::new(),
        };
        if opts.export_name_option {
            send_option(
                &mut client.stream,
                proto::OPT_EXPORT_NAME,
                opts.export_name.as_bytes(),
            )?;
            client.size = read_u64(&mut client.stream)?;
            client.flags = read_u16(&mut client.stream)?;
            if cflags & proto::FLAG_C_NO_ZEROES == 0 {
                let mut z = [0u8; 124];
                client.stream.read_exact(&mut z)?;
            }
            return Ok(client);
        }
        client.go(&opts.export_name)?;
        Ok(client)
    }

    /// Ends the negotiation with `NBD_OPT_GO`, recording the size, flags and block sizes.
    fn go(&mut self, export_name: &str) -> io::Result<()> {
        let d = info_request(export_name, &[proto::INFO_BLOCK_SIZE]);
        send_option(&mut self.stream, proto::OPT_GO, &d)?;
        loop {
            let r = read_option_reply(&mut self.stream)?;
            match r.typ {
                proto::REP_INFO => {
                    let mut rd = Reader::new(&r.data);
                    match rd.u16() {
                        Some(proto::INFO_EXPORT) => {
                            self.size = rd.u64().ok_or_else(|| bad("short INFO_EXPORT"))?;
                            self.flags = rd.u16().ok_or_else(|| bad("short INFO_EXPORT"))?;
                        }
                        Some(proto::INFO_BLOCK_SIZE) => {
                            self.block_sizes = (|| Some((rd.u32()?, rd.u32()?, rd.u32()?)))();
                        }
                        _ => {}
                    }
                }
                proto::REP_ACK => return Ok(()),
                t => {
                    return Err(bad(format!(
                        "GO failed: {t:#x} {}",
                        String::from_utf8_lossy(&r.data)
                    )))
                }
            }
        }
    }

    /// The underlying stream (for sending garbage on purpose).
    pub fn stream(&mut self) -> &mut S {
        &mut self.stream
    }

    /// Sends a request; returns its cookie.
    pub fn send_request(
        &mut self,
        typ: u16,
        flags: u16,
        offset: u64,
        length: u64,
        payload: &[u8],
    ) -> io::Result<u64> {
        let cookie = self.next_cookie;
        self.next_cookie += 1;
        let mut b = Vec::with_capacity(32 + payload.len());
        if self.mode == ReplyMode::Extended {
            b.put_u32(proto::EXTENDED_REQUEST_MAGIC);
            b.put_u16(flags);
            b.put_u16(typ);
            b.put_u64(cookie);
            b.put_u64(offset);
            b.put_u64(length);
        } else {
            b.put_u32(proto::REQUEST_MAGIC);
            b.put_u16(flags);
            b.put_u16(typ);
            b.put_u64(cookie);
            b.put_u64(offset);
            b.put_u32(u32::try_from(length).map_err(|_| too_long("compact request length"))?);
        }
        b.extend_from_slice(payload);
        self.stream.write_all(&b)?;
        self.pending.insert(cookie, (typ, length));
        Ok(cookie)
    }

    /// Reads one complete reply (all chunks up to the one flagged DONE).
    pub fn read_reply(&mut self) -> io::Result<Reply> {
        let mut reply = Reply::default();
        loop {
            let magic = read_u32(&mut self.stream)?;
            if magic == proto::SIMPLE_REPLY_MAGIC {
                if self.mode == ReplyMode::Extended {
                    return Err(bad("simple reply in extended mode"));
                }
                reply.errno = read_u32(&mut self.stream)?;
                reply.cookie = read_u64(&mut self.stream)?;
                let (typ, len) = self
                    .pending
                    .remove(&reply.cookie)
                    .ok_or_else(|| bad("reply to unknown cookie"))?;
                if typ == proto::CMD_READ && reply.errno == 0 {
                    if self.mode != ReplyMode::Simple {
                        return Err(bad("simple reply to a read in structured mode"));
                    }
                    let mut data = vec![0u8; usize_of(len)];
                    self.stream.read_exact(&mut data)?;
                    reply.chunks.push(Chunk::Data { offset: 0, data });
                }
                return Ok(reply);
            }
            let (flags, typ, cookie, len) = match (magic, self.mode) {
                (proto::STRUCTURED_REPLY_MAGIC, ReplyMode::Structured) => {
                    let flags = read_u16(&mut self.stream)?;
                    let typ = read_u16(&mut self.stream)?;
                    let cookie = read_u64(&mut self.stream)?;
                    let len = u64::from(read_u32(&mut self.stream)?);
                    (flags, typ, cookie, len)
                }
                (proto::EXTENDED_REPLY_MAGIC, ReplyMode::Extended) => {
                    let flags = read_u16(&mut self.stream)?;
                    let typ = read_u16(&mut self.stream)?;
                    let cookie = read_u64(&mut self.stream)?;
                    let _offset = read_u64(&mut self.stream)?;
                    let len = read_u64(&mut self.stream)?;
                    (flags, typ, cookie, len)
                }
                _ => return Err(bad(format!("unexpected reply magic {magic:#x}"))),
            };
            if len > 64 << 20 {
                return Err(bad("reply chunk too long"));
            }
            reply.cookie = cookie;
            let mut payload = vec![0u8; usize_of(len)];
            self.stream.read_exact(&mut payload)?;
            let chunk = parse_chunk(typ, &payload, self.mode)?;
            if let Some(Chunk::Error { errno, .. }) = &chunk {
                if reply.errno == 0 {
                    reply.errno = *errno;
                }
            }
            reply.chunks.extend(chunk);
            if flags & proto::REPLY_FLAG_DONE != 0 {
                self.pending.remove(&cookie);
                return Ok(reply);
            }
        }
    }

    /// Sends a request and waits for its reply.
    pub fn call(
        &mut self,
        typ: u16,
        flags: u16,
        offset: u64,
        length: u64,
        payload: &[u8],
    ) -> io::Result<Reply> {
        let cookie = self.send_request(typ, flags, offset, length, payload)?;
        let r = self.read_reply()?;
        if r.cookie != cookie {
            return Err(bad("reply cookie mismatch"));
        }
        Ok(r)
    }

    /// Reads `len` bytes; `Ok(Err(errno))` when the server reports an error.
    pub fn read(&mut self, offset: u64, len: usize) -> io::Result<Result<Vec<u8>, u32>> {
        let r = self.call(proto::CMD_READ, 0, offset, len as u64, &[])?;
        if r.errno != 0 {
            return Ok(Err(r.errno));
        }
        if self.mode == ReplyMode::Simple {
            return Ok(Ok(match r.chunks.into_iter().next() {
                Some(Chunk::Data { data, .. }) => data,
                _ => Vec::new(),
            }));
        }
        r.read_data(offset, len)
            .map(Ok)
            .ok_or_else(|| bad("read reply does not cover the request"))
    }

    /// Writes `data`; returns the errno (0 on success).
    pub fn write(&mut self, offset: u64, data: &[u8], flags: u16) -> io::Result<u32> {
        let flags = if self.mode == ReplyMode::Extended {
            flags | proto::CMD_FLAG_PAYLOAD_LEN
        } else {
            flags
        };
        Ok(self
            .call(proto::CMD_WRITE, flags, offset, data.len() as u64, data)?
            .errno)
    }

    /// Sends `NBD_CMD_DISC` and drops the connection.
    pub fn disconnect(mut self) -> io::Result<()> {
        self.send_request(proto::CMD_DISC, 0, 0, 0, &[])?;
        Ok(())
    }
}

fn parse_chunk(typ: u16, p: &[u8], mode: ReplyMode) -> io::Result<Option<Chunk>> {
    let mut r = Reader::new(p);
    let short = || bad("short reply chunk");
    Ok(Some(match typ {
        proto::REPLY_TYPE_NONE => return Ok(None),
        proto::REPLY_TYPE_OFFSET_DATA => {
            let offset = r.u64().ok_or_else(short)?;
            Chunk::Data {
                offset,
                data: r.bytes(r.remaining()).unwrap_or_default().to_vec(),
            }
        }
        proto::REPLY_TYPE_OFFSET_HOLE => Chunk::Hole {
            offset: r.u64().ok_or_else(short)?,
            len: r.u32().ok_or_else(short)?,
        },
        proto::REPLY_TYPE_BLOCK_STATUS if mode == ReplyMode::Structured => {
            let context = r.u32().ok_or_else(short)?;
            let mut extents = Vec::new();
            while r.remaining() > 0 {
                let l = r.u32().ok_or_else(short)?;
                let f = r.u32().ok_or_else(short)?;
                extents.push((u64::from(l), u64::from(f)));
            }
            Chunk::BlockStatus { context, extents }
        }
        proto::REPLY_TYPE_BLOCK_STATUS_EXT if mode == ReplyMode::Extended => {
            let context = r.u32().ok_or_else(short)?;
            let n = r.u32().ok_or_else(short)?;
            let mut extents = Vec::new();
            for _ in 0..n {
                extents.push((r.u64().ok_or_else(short)?, r.u64().ok_or_else(short)?));
            }
            if r.remaining() != 0 {
                return Err(bad("block status descriptor count mismatch"));
            }
            Chunk::BlockStatus { context, extents }
        }
        proto::REPLY_TYPE_ERROR | proto::REPLY_TYPE_ERROR_OFFSET => {
            let errno = r.u32().ok_or_else(short)?;
            let mlen = r.u16().ok_or_else(short)? as usize;
            let message = String::from_utf8_lossy(r.bytes(mlen).ok_or_else(short)?).into_owned();
            let offset = if typ == proto::REPLY_TYPE_ERROR_OFFSET {
                Some(r.u64().ok_or_else(short)?)
            } else {
                None
            };
            Chunk::Error {
                errno,
                message,
                offset,
            }
        }
        t => return Err(bad(format!("unknown reply chunk type {t}"))),
    }))
}

impl<S: Read + Write> Client<S> {
    /// A client that only decodes replies from `stream` (used by the fuzz harness).
    pub(crate) fn for_replies(stream: S, mode: ReplyMode) -> Self {
        Client {
            stream,
            mode,
            size: 0,
            flags: 0,
            meta_context: None,
            block_sizes: None,
            next_cookie: 1,
            pending: HashMap::new(),
        }
    }

    /// Registers an outstanding request sent by someone else.
    pub(crate) fn expect(&mut self, cookie: u64, typ: u16, length: u64) {
        self.pending.insert(cookie, (typ, length));
    }
}

impl Client<io::Cursor<Vec<u8>>> {
    /// True when every byte of the reply buffer was consumed.
    pub(crate) fn at_end(&self) -> bool {
        usize_of(self.stream.position()) == self.stream.get_ref().len()
    }
}

impl<S> Client<S> {
    /// Gives up the client and returns its stream (to keep a connection open while idle).
    pub fn stream_owned(self) -> S {
        self.stream
    }
}
