//! The handshake phase as an explicit, I/O-free state machine.
//!
//! The server writes [`Handshake::take_output`] to the socket, reads exactly
//! [`Handshake::want`] bytes, passes them to [`Handshake::feed`], and repeats until an
//! [`Event`] other than [`Event::Continue`] comes back:
//!
//! ```text
//!  new() ──greeting──▶ ClientFlags ──▶ OptionHeader ──len=0──▶ (process option) ─┐
//!                                        │  ▲   │                                  │
//!                                  len>0 │  │   └─len>MAX─▶ SkipOption ─▶ ERR_TOO_BIG
//!                                        ▼  │                                      │
//!                                    OptionData ──▶ (process option) ──────────────┤
//!                                                                                  ▼
//!                                   GO/EXPORT_NAME ▶ Transmission   ABORT ▶ Closed
//! ```
//!
//! With TLS configured, `NBD_OPT_STARTTLS` ends in [`Event::StartTls`]: the server sends the
//! ACK, runs the TLS handshake, calls [`Handshake::tls_started`], and negotiation restarts
//! inside TLS at `OptionHeader` (no new greeting), with everything negotiated before
//! forgotten. With TLS required, every option before that but `ABORT` and `STARTTLS` is
//! answered `NBD_REP_ERR_TLS_REQD`, and `EXPORT_NAME` (which cannot be refused) disconnects.
//!
//! Every malformed or unknown option gets the reply the specification asks for and
//! negotiation continues; only violations that leave no way to answer (bad magic, unknown
//! client flags, `NBD_OPT_EXPORT_NAME` for an unknown export) end the session.

use crate::proto::{self, PutBe, Reader};

/// Largest option payload accepted; longer ones are skipped and answered `NBD_REP_ERR_TOO_BIG`.
///
/// The biggest legitimate option (`SET_META_CONTEXT` with a few 4 KiB queries) fits easily;
/// the cap keeps a hostile client from making the server buffer gigabytes.
pub(crate) const MAX_OPTION_LEN: u32 = 64 * 1024;

/// After this many options a client is considered abusive and disconnected.
pub(crate) const MAX_OPTIONS: u32 = 4096;

/// Chunk size used to discard an oversized option.
const SKIP_CHUNK: u32 = 64 * 1024;

/// Context id given to `base:allocation`.
pub(crate) const BASE_ALLOCATION_ID: u32 = 1;

/// What the handshake needs to know about the export it offers.
#[derive(Debug, Clone)]
pub(crate) struct ExportInfo {
    /// Canonical export name (the empty name always selects it as well).
    pub name: String,
    /// Human-readable description.
    pub description: String,
    /// Size in bytes.
    pub size: u64,
    /// Preferred block size.
    pub block_size: u32,
    /// Writes refused.
    pub read_only: bool,
    /// `NBD_CMD_FLAG_FAST_ZERO` can succeed.
    pub fast_zero: bool,
}

/// Server-side negotiation policy.
#[derive(Debug, Clone)]
pub(crate) struct HandshakeConfig {
    /// The export offered.
    pub export: ExportInfo,
    /// Largest request payload accepted (advertised in `NBD_INFO_BLOCK_SIZE`).
    pub max_payload: u32,
    /// Whether `NBD_OPT_EXTENDED_HEADERS` is accepted.
    pub extended_headers: bool,
    /// Whether `NBD_OPT_STARTTLS` is offered, and whether it must come first.
    pub tls: TlsPolicy,
}

/// What the handshake does about TLS.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum TlsPolicy {
    /// No TLS configured: `STARTTLS` is unsupported.
    Off,
    /// `STARTTLS` is accepted; plain-text clients are served too.
    Optional,
    /// Nothing but `STARTTLS` and `ABORT` is served before TLS is up.
    Required,
}

/// Which reply format the transmission phase uses.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ReplyMode {
    /// Only simple replies (16-byte headers).
    Simple,
    /// Structured reply chunks (20-byte headers), compact requests.
    Structured,
    /// Extended requests and replies (32-byte headers).
    Extended,
}

/// The outcome of a successful negotiation.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Negotiated {
    /// Reply format.
    pub mode: ReplyMode,
    /// Transmission flags sent to the client.
    pub flags: u16,
    /// Context id of `base:allocation` if the client selected it.
    pub meta_context: Option<u32>,
    /// The export name the client asked for.
    pub export_name: String,
}

/// What [`Handshake::feed`] concluded.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum Event {
    /// Keep negotiating: write the output, then read [`Handshake::want`] bytes.
    Continue,
    /// Write the output, then enter the transmission phase.
    Transmission(Negotiated),
    /// Write the output, then close the connection (the client sent `NBD_OPT_ABORT`).
    Close,
    /// Write the output (the `STARTTLS` ACK), run the TLS handshake, then call
    /// [`Handshake::tls_started`] and go on negotiating inside TLS.
    StartTls,
}

/// A violation that ends the session (a hard disconnect).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub(crate) enum HandshakeError {
    /// The client set flags the server does not know or did not offer.
    #[error("client sent unknown flags {0:#x}")]
    BadClientFlags(u32),
    /// An option did not start with `IHAVEOPT`.
    #[error("option has wrong magic {0:#018x}")]
    BadOptionMagic(u64),
    /// `NBD_OPT_EXPORT_NAME` named an export that does not exist (the option cannot fail).
    #[error("client asked for unknown export {0:?}")]
    UnknownExport(String),
    /// `NBD_OPT_EXPORT_NAME` is not allowed in this state (extended headers, shutdown, or
    /// TLS required and not started).
    #[error("NBD_OPT_EXPORT_NAME refused: {0}")]
    ExportNameRefused(&'static str),
    /// More than [`MAX_OPTIONS`] options.
    #[error("client sent more than {MAX_OPTIONS} options")]
    TooManyOptions,
    /// The caller passed a slice of the wrong length (a server bug, not client input).
    #[error("handshake fed {got} bytes, wanted {want}")]
    WrongFeed {
        /// Bytes wanted.
        want: usize,
        /// Bytes given.
        got: usize,
    },
    /// The machine already finished.
    #[error("handshake already finished")]
    Finished,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum State {
    ClientFlags,
    OptionHeader,
    OptionData { opt: u32, len: u32 },
    SkipOption { opt: u32, remaining: u32 },
    Finished,
}

/// The server side of the NBD handshake.
#[derive(Debug)]
pub(crate) struct Handshake {
    cfg: HandshakeConfig,
    state: State,
    out: Vec<u8>,
    no_zeroes: bool,
    /// The reply format negotiated so far: structured replies, then possibly extended headers.
    mode: ReplyMode,
    meta_context: Option<u32>,
    options: u32,
    shutting_down: bool,
    /// The TLS handshake has completed: the session is encrypted from here on.
    in_tls: bool,
}

impl Handshake {
    /// A new handshake; its output already holds the server greeting.
    pub(crate) fn new(cfg: HandshakeConfig) -> Self {
        let mut out = Vec::with_capacity(18);
        out.put_u64(proto::NBDMAGIC);
        out.put_u64(proto::IHAVEOPT);
        out.put_u16(proto::FLAG_FIXED_NEWSTYLE | proto::FLAG_NO_ZEROES);
        Self {
            cfg,
            state: State::ClientFlags,
            out,
            no_zeroes: false,
            mode: ReplyMode::Simple,
            meta_context: None,
            options: 0,
            shutting_down: false,
            in_tls: false,
        }
    }

    /// The TLS handshake that followed [`Event::StartTls`] completed: negotiation restarts
    /// inside TLS, forgetting what was negotiated in plain text (the specification asks the
    /// client to negotiate again; nothing said before TLS may carry over).
    pub(crate) fn tls_started(&mut self) {
        self.in_tls = true;
        self.mode = ReplyMode::Simple;
        self.meta_context = None;
        self.state = State::OptionHeader;
    }

    /// From now on refuse options with `NBD_REP_ERR_SHUTDOWN` (the server is stopping).
    pub(crate) fn set_shutting_down(&mut self) {
        self.shutting_down = true;
    }

    /// Number of bytes the next [`Handshake::feed`] expects (0 once finished).
    pub(crate) fn want(&self) -> usize {
        match self.state {
            State::ClientFlags => 4,
            State::OptionHeader => 16,
            State::OptionData { len, .. } => len as usize,
            State::SkipOption { remaining, .. } => remaining.min(SKIP_CHUNK) as usize,
            State::Finished => 0,
        }
    }

    /// Bytes to send to the client, draining them.
    pub(crate) fn take_output(&mut self) -> Vec<u8> {
        std::mem::take(&mut self.out)
    }

    /// Consumes exactly [`Handshake::want`] bytes from the client.
    pub(crate) fn feed(&mut self, input: &[u8]) -> Result<Event, HandshakeError> {
        let want = self.want();
        if self.state == State::Finished {
            return Err(HandshakeError::Finished);
        }
        if input.len() != want {
            return Err(HandshakeError::WrongFeed {
                want,
                got: input.len(),
            });
        }
        let result = self.step(input);
        if !matches!(result, Ok(Event::Continue | Event::StartTls)) {
            self.state = State::Finished;
        }
        result
    }

    fn step(&mut self, input: &[u8]) -> Result<Event, HandshakeError> {
        let mut r = Reader::new(input);
        match self.state {
            State::ClientFlags => {
                let flags = r.u32().unwrap_or(0);
                let known = proto::FLAG_C_FIXED_NEWSTYLE | proto::FLAG_C_NO_ZEROES;
                if flags & !known != 0 {
                    return Err(HandshakeError::BadClientFlags(flags));
                }
                // A client without FIXED_NEWSTYLE is still served fixed newstyle replies,
                // which the specification allows; every real client sets it anyway.
                self.no_zeroes = flags & proto::FLAG_C_NO_ZEROES != 0;
                self.state = State::OptionHeader;
                Ok(Event::Continue)
            }
            State::OptionHeader => {
                let magic = r.u64().unwrap_or(0);
                let opt = r.u32().unwrap_or(0);
                let len = r.u32().unwrap_or(0);
                if magic != proto::IHAVEOPT {
                    return Err(HandshakeError::BadOptionMagic(magic));
                }
                self.options += 1;
                if self.options > MAX_OPTIONS {
                    return Err(HandshakeError::TooManyOptions);
                }
                if len > MAX_OPTION_LEN {
                    if opt == proto::OPT_EXPORT_NAME {
                        // Cannot be answered with an error; the name is too long to exist.
                        return Err(HandshakeError::UnknownExport(format!("<{len}-byte name>")));
                    }
                    self.state = State::SkipOption { opt, remaining: len };
                    return Ok(Event::Continue);
                }
                if len == 0 {
                    self.state = State::OptionHeader;
                    return self.option(opt, &[]);
                }
                self.state = State::OptionData { opt, len };
                Ok(Event::Continue)
            }
            State::OptionData { opt, .. } => {
                self.state = State::OptionHeader;
                self.option(opt, input)
            }
            State::SkipOption { opt, remaining } => {
                // `feed` checked that `input` is the `want()` bytes asked for.
                let remaining = remaining - remaining.min(SKIP_CHUNK);
                if remaining > 0 {
                    self.state = State::SkipOption { opt, remaining };
                } else {
                    self.state = State::OptionHeader;
                    self.reply_error(opt, proto::REP_ERR_TOO_BIG, "option data too long");
                }
                Ok(Event::Continue)
            }
            State::Finished => Err(HandshakeError::Finished),
        }
    }

    /// Handles one complete option.
    fn option(&mut self, opt: u32, data: &[u8]) -> Result<Event, HandshakeError> {
        if self.shutting_down && opt != proto::OPT_ABORT {
            if opt == proto::OPT_EXPORT_NAME {
                return Err(HandshakeError::ExportNameRefused("server shutting down"));
            }
            self.reply_error(opt, proto::REP_ERR_SHUTDOWN, "server is shutting down");
            return Ok(Event::Continue);
        }
        if self.cfg.tls == TlsPolicy::Required
            && !self.in_tls
            && !matches!(opt, proto::OPT_ABORT | proto::OPT_STARTTLS)
        {
            if opt == proto::OPT_EXPORT_NAME {
                return Err(HandshakeError::ExportNameRefused("TLS is required"));
            }
            self.reply_error(
                opt,
                proto::REP_ERR_TLS_REQD,
                "TLS is required: send NBD_OPT_STARTTLS first",
            );
            return Ok(Event::Continue);
        }
        match opt {
            proto::OPT_EXPORT_NAME => self.opt_export_name(data),
            proto::OPT_ABORT => {
                // The client may already have hung up; the ACK is best effort.
                self.reply(opt, proto::REP_ACK, &[]);
                Ok(Event::Close)
            }
            proto::OPT_LIST => {
                if data.is_empty() {
                    let mut payload = Vec::new();
                    payload.put_u32(wire_len(self.cfg.export.name.len()));
                    payload.extend_from_slice(self.cfg.export.name.as_bytes());
                    payload.extend_from_slice(self.cfg.export.description.as_bytes());
                    self.reply(opt, proto::REP_SERVER, &payload);
                    self.reply(opt, proto::REP_ACK, &[]);
                } else {
                    self.reply_error(opt, proto::REP_ERR_INVALID, "LIST takes no data");
                }
                Ok(Event::Continue)
            }
            proto::OPT_STARTTLS => Ok(self.opt_starttls(data)),
            proto::OPT_INFO | proto::OPT_GO => Ok(self.opt_info_go(opt, data)),
            proto::OPT_STRUCTURED_REPLY => {
                if !data.is_empty() {
                    self.reply_error(opt, proto::REP_ERR_INVALID, "option takes no data");
                } else if self.mode == ReplyMode::Extended {
                    self.reply_error(
                        opt,
                        proto::REP_ERR_EXT_HEADER_REQD,
                        "extended headers already negotiated",
                    );
                } else {
                    self.mode = ReplyMode::Structured;
                    self.reply(opt, proto::REP_ACK, &[]);
                }
                Ok(Event::Continue)
            }
            proto::OPT_EXTENDED_HEADERS => {
                if !data.is_empty() {
                    self.reply_error(opt, proto::REP_ERR_INVALID, "option takes no data");
                } else if !self.cfg.extended_headers {
                    self.reply_error(opt, proto::REP_ERR_UNSUP, "extended headers disabled");
                } else {
                    self.mode = ReplyMode::Extended;
                    self.reply(opt, proto::REP_ACK, &[]);
                }
                Ok(Event::Continue)
            }
            proto::OPT_LIST_META_CONTEXT | proto::OPT_SET_META_CONTEXT => {
                self.opt_meta_context(opt, data);
                Ok(Event::Continue)
            }
            _ => {
                self.reply_error(opt, proto::REP_ERR_UNSUP, "unknown option");
                Ok(Event::Continue)
            }
        }
    }

    fn opt_starttls(&mut self, data: &[u8]) -> Event {
        let opt = proto::OPT_STARTTLS;
        if !data.is_empty() {
            self.reply_error(opt, proto::REP_ERR_INVALID, "STARTTLS takes no data");
        } else if self.cfg.tls == TlsPolicy::Off {
            // No TLS configured: the specification allows ERR_UNSUP.
            self.reply_error(opt, proto::REP_ERR_UNSUP, "TLS is not supported");
        } else if self.in_tls {
            self.reply_error(opt, proto::REP_ERR_INVALID, "TLS is already started");
        } else {
            self.reply(opt, proto::REP_ACK, &[]);
            return Event::StartTls;
        }
        Event::Continue
    }

    fn knows_export(&self, name: &[u8]) -> bool {
        name.is_empty() || name == self.cfg.export.name.as_bytes()
    }

    fn mode(&self) -> ReplyMode {
        self.mode
    }

    /// Transmission flags for the current negotiation state.
    fn transmission_flags(&self) -> u16 {
        transmission_flags(&self.cfg.export, self.mode())
    }

    fn negotiated(&self, name: &[u8]) -> Negotiated {
        let mode = self.mode();
        Negotiated {
            mode,
            flags: self.transmission_flags(),
            // Block status needs reply chunks; a context chosen without them is useless.
            meta_context: if mode == ReplyMode::Simple {
                None
            } else {
                self.meta_context
            },
            export_name: String::from_utf8_lossy(name).into_owned(),
        }
    }

    fn opt_export_name(&mut self, data: &[u8]) -> Result<Event, HandshakeError> {
        if self.mode == ReplyMode::Extended {
            return Err(HandshakeError::ExportNameRefused(
                "not allowed after extended headers",
            ));
        }
        if !self.knows_export(data) {
            return Err(HandshakeError::UnknownExport(
                String::from_utf8_lossy(data).into_owned(),
            ));
        }
        self.out.put_u64(self.cfg.export.size);
        self.out.put_u16(self.transmission_flags());
        if !self.no_zeroes {
            self.out.extend_from_slice(&[0u8; 124]);
        }
        Ok(Event::Transmission(self.negotiated(data)))
    }

    fn opt_info_go(&mut self, opt: u32, data: &[u8]) -> Event {
        let mut r = Reader::new(data);
        let parsed = (|| {
            let name_len = r.u32()? as usize;
            let name = r.bytes(name_len)?;
            let n = r.u16()? as usize;
            let mut requests = Vec::with_capacity(n.min(16));
            for _ in 0..n {
                requests.push(r.u16()?);
            }
            (r.remaining() == 0).then_some((name, requests))
        })();
        let Some((name, requests)) = parsed else {
            self.reply_error(opt, proto::REP_ERR_INVALID, "malformed INFO/GO request");
            return Event::Continue;
        };
        if !self.knows_export(name) {
            self.reply_error(opt, proto::REP_ERR_UNKNOWN, "no such export");
            return Event::Continue;
        }
        let e = self.cfg.export.clone();
        let mut info = Vec::with_capacity(14);
        info.put_u16(proto::INFO_EXPORT);
        info.put_u64(e.size);
        info.put_u16(self.transmission_flags());
        self.reply(opt, proto::REP_INFO, &info);
        // Block sizes are always sent: every real client asks, and unrequested items are
        // allowed (clients ignore what they did not ask for).
        let mut info = Vec::with_capacity(14);
        info.put_u16(proto::INFO_BLOCK_SIZE);
        info.put_u32(1);
        info.put_u32(e.block_size.max(512));
        info.put_u32(self.cfg.max_payload.max(e.block_size));
        self.reply(opt, proto::REP_INFO, &info);
        if requests.contains(&proto::INFO_NAME) {
            let mut info = Vec::new();
            info.put_u16(proto::INFO_NAME);
            info.extend_from_slice(e.name.as_bytes());
            self.reply(opt, proto::REP_INFO, &info);
        }
        if requests.contains(&proto::INFO_DESCRIPTION) {
            let mut info = Vec::new();
            info.put_u16(proto::INFO_DESCRIPTION);
            info.extend_from_slice(e.description.as_bytes());
            self.reply(opt, proto::REP_INFO, &info);
        }
        self.reply(opt, proto::REP_ACK, &[]);
        if opt == proto::OPT_GO {
            Event::Transmission(self.negotiated(name))
        } else {
            Event::Continue
        }
    }

    fn opt_meta_context(&mut self, opt: u32, data: &[u8]) {
        let set = opt == proto::OPT_SET_META_CONTEXT;
        if set {
            // SET replaces the selection even when it fails.
            self.meta_context = None;
        }
        if self.mode == ReplyMode::Simple {
            self.reply_error(
                opt,
                proto::REP_ERR_INVALID,
                "structured replies must be negotiated first",
            );
            return;
        }
        let mut r = Reader::new(data);
        let parsed = (|| {
            let name_len = r.u32()? as usize;
            let name = r.bytes(name_len)?;
            let n = r.u32()?;
            let mut queries = Vec::new();
            for _ in 0..n {
                let len = r.u32()? as usize;
                queries.push(r.bytes(len)?);
            }
            (r.remaining() == 0).then_some((name, queries))
        })();
        let Some((name, queries)) = parsed else {
            self.reply_error(opt, proto::REP_ERR_INVALID, "malformed meta context request");
            return;
        };
        if !self.knows_export(name) {
            self.reply_error(opt, proto::REP_ERR_UNKNOWN, "no such export");
            return;
        }
        let mut matched = queries.is_empty() && !set;
        for q in &queries {
            let Some(q) = std::str::from_utf8(q).ok().filter(|q| q.contains(':')) else {
                self.reply_error(opt, proto::REP_ERR_INVALID, "query is not namespace:leaf");
                return;
            };
            matched |= q == proto::META_BASE_ALLOCATION || (!set && q == "base:");
        }
        if matched {
            let mut payload = Vec::new();
            // LIST must report id 0 (reserved); SET gives the id used in replies.
            payload.put_u32(if set { BASE_ALLOCATION_ID } else { 0 });
            payload.extend_from_slice(proto::META_BASE_ALLOCATION.as_bytes());
            self.reply(opt, proto::REP_META_CONTEXT, &payload);
            if set {
                self.meta_context = Some(BASE_ALLOCATION_ID);
            }
        }
        self.reply(opt, proto::REP_ACK, &[]);
    }

    fn reply(&mut self, opt: u32, typ: u32, data: &[u8]) {
        self.out.put_u64(proto::REPLY_MAGIC_OPT);
        self.out.put_u32(opt);
        self.out.put_u32(typ);
        self.out.put_u32(wire_len(data.len()));
        self.out.extend_from_slice(data);
    }

    fn reply_error(&mut self, opt: u32, typ: u32, message: &str) {
        tracing::debug!(
            option = proto::option_name(opt),
            opt,
            reply = typ,
            message,
            "refusing option"
        );
        self.reply(opt, typ, message.as_bytes());
    }
}

/// `len` as the `u32` length of an option reply or of a string in one. Replies hold the
/// export's name and description from the server's configuration and short messages: far
/// below 4 GiB.
fn wire_len(len: usize) -> u32 {
    u32::try_from(len).expect("option reply data under 4 GiB")
}

/// Transmission flags the server advertises for `export` under `mode`.
pub(crate) fn transmission_flags(export: &ExportInfo, mode: ReplyMode) -> u16 {
    let mut flags = proto::TFLAG_HAS_FLAGS
        | proto::TFLAG_SEND_FLUSH
        | proto::TFLAG_SEND_CACHE
        // Flush is global in the engine: it covers writes completed on every connection.
        | proto::TFLAG_CAN_MULTI_CONN;
    if export.read_only {
        flags |= proto::TFLAG_READ_ONLY;
    } else {
        flags |= proto::TFLAG_SEND_FUA | proto::TFLAG_SEND_TRIM | proto::TFLAG_SEND_WRITE_ZEROES;
        if export.fast_zero {
            flags |= proto::TFLAG_SEND_FAST_ZERO;
        }
    }
    if mode != ReplyMode::Simple {
        flags |= proto::TFLAG_SEND_DF;
    }
    flags
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::client::{info_request, meta_request, read_option_reply, OptionReply};
    use crate::usize_of;
    use std::io::Cursor;

    fn config() -> HandshakeConfig {
        HandshakeConfig {
            export: ExportInfo {
                name: "vol".into(),
                description: "test volume".into(),
                size: 1 << 20,
                block_size: 4096,
                read_only: false,
                fast_zero: true,
            },
            max_payload: 32 << 20,
            extended_headers: true,
            tls: TlsPolicy::Off,
        }
    }

    /// A handshake past the client flags.
    fn started(cfg: HandshakeConfig, client_flags: u32) -> Handshake {
        let mut hs = Handshake::new(cfg);
        let greeting = hs.take_output();
        assert_eq!(greeting.len(), 18);
        assert_eq!(hs.feed(&client_flags.to_be_bytes()), Ok(Event::Continue));
        hs
    }

    fn option(opt: u32, data: &[u8]) -> Vec<u8> {
        let mut b = Vec::new();
        b.put_u64(proto::IHAVEOPT);
        b.put_u32(opt);
        b.put_u32(u32::try_from(data.len()).unwrap());
        b.extend_from_slice(data);
        b
    }

    /// Feeds `bytes` in the pieces the machine asks for; returns the last event.
    fn drive(hs: &mut Handshake, mut bytes: &[u8]) -> Result<Event, HandshakeError> {
        loop {
            let (chunk, rest) = bytes.split_at(hs.want());
            bytes = rest;
            let ev = hs.feed(chunk)?;
            if ev != Event::Continue || bytes.is_empty() {
                assert!(bytes.is_empty(), "input left after {ev:?}");
                return Ok(ev);
            }
        }
    }

    fn replies(hs: &mut Handshake) -> Vec<OptionReply> {
        let out = hs.take_output();
        let mut cur = Cursor::new(&out[..]);
        let mut v = Vec::new();
        while usize_of(cur.position()) < out.len() {
            v.push(read_option_reply(&mut cur).unwrap());
        }
        v
    }

    fn types(r: &[OptionReply]) -> Vec<u32> {
        r.iter().map(|r| r.typ).collect()
    }

    #[test]
    fn greeting_offers_fixed_newstyle_and_no_zeroes() {
        let mut hs = Handshake::new(config());
        let g = hs.take_output();
        assert_eq!(&g[..8], b"NBDMAGIC");
        assert_eq!(&g[8..16], b"IHAVEOPT");
        assert_eq!(&g[16..], &[0, 3]);
        assert_eq!(hs.want(), 4);
    }

    #[test]
    fn unknown_client_flags_disconnect() {
        let mut hs = Handshake::new(config());
        assert_eq!(
            hs.feed(&4u32.to_be_bytes()),
            Err(HandshakeError::BadClientFlags(4))
        );
        assert_eq!(hs.want(), 0);
        assert_eq!(hs.feed(&[]), Err(HandshakeError::Finished));
    }

    #[test]
    fn wrong_option_magic_disconnects() {
        let mut hs = started(config(), 1);
        let mut b = option(proto::OPT_LIST, &[]);
        b[0] ^= 1;
        assert!(matches!(
            drive(&mut hs, &b),
            Err(HandshakeError::BadOptionMagic(_))
        ));
    }

    #[test]
    fn wrong_feed_length_is_reported() {
        let mut hs = Handshake::new(config());
        assert_eq!(
            hs.feed(&[0; 3]),
            Err(HandshakeError::WrongFeed { want: 4, got: 3 })
        );
    }

    #[test]
    fn export_name_with_and_without_zeroes() {
        for (flags, len) in [(1u32, 134usize), (3, 10)] {
            let mut hs = started(config(), flags);
            let ev = drive(&mut hs, &option(proto::OPT_EXPORT_NAME, b"vol")).unwrap();
            let Event::Transmission(n) = ev else {
                panic!("{ev:?}")
            };
            assert_eq!(n.mode, ReplyMode::Simple);
            assert_eq!(n.export_name, "vol");
            let out = hs.take_output();
            assert_eq!(out.len(), len);
            assert_eq!(&out[..8], &(1u64 << 20).to_be_bytes());
            assert_eq!(u16::from_be_bytes([out[8], out[9]]), n.flags);
            assert!(out[10..].iter().all(|b| *b == 0));
        }
    }

    #[test]
    fn export_name_default_and_unknown() {
        let mut hs = started(config(), 3);
        assert!(matches!(
            drive(&mut hs, &option(proto::OPT_EXPORT_NAME, b"")),
            Ok(Event::Transmission(_))
        ));
        let mut hs = started(config(), 3);
        assert_eq!(
            drive(&mut hs, &option(proto::OPT_EXPORT_NAME, b"nope")),
            Err(HandshakeError::UnknownExport("nope".into()))
        );
    }

    #[test]
    fn abort_is_acknowledged_then_closes() {
        let mut hs = started(config(), 1);
        assert_eq!(drive(&mut hs, &option(proto::OPT_ABORT, &[])), Ok(Event::Close));
        assert_eq!(types(&replies(&mut hs)), vec![proto::REP_ACK]);
        // Data on ABORT is ignored, not rejected.
        let mut hs = started(config(), 1);
        assert_eq!(drive(&mut hs, &option(proto::OPT_ABORT, b"x")), Ok(Event::Close));
    }

    #[test]
    fn list_names_the_export() {
        let mut hs = started(config(), 1);
        drive(&mut hs, &option(proto::OPT_LIST, &[])).unwrap();
        let r = replies(&mut hs);
        assert_eq!(types(&r), vec![proto::REP_SERVER, proto::REP_ACK]);
        assert_eq!(&r[0].data[..4], &3u32.to_be_bytes());
        assert_eq!(&r[0].data[4..7], b"vol");
        drive(&mut hs, &option(proto::OPT_LIST, b"junk")).unwrap();
        assert_eq!(types(&replies(&mut hs)), vec![proto::REP_ERR_INVALID]);
    }

    #[test]
    fn starttls_is_refused_and_negotiation_continues() {
        let mut hs = started(config(), 1);
        drive(&mut hs, &option(proto::OPT_STARTTLS, &[])).unwrap();
        assert_eq!(types(&replies(&mut hs)), vec![proto::REP_ERR_UNSUP]);
        drive(&mut hs, &option(proto::OPT_STARTTLS, b"x")).unwrap();
        assert_eq!(types(&replies(&mut hs)), vec![proto::REP_ERR_INVALID]);
        let go = option(proto::OPT_GO, &info_request("", &[]));
        assert!(matches!(drive(&mut hs, &go), Ok(Event::Transmission(_))));
    }

    #[test]
    fn tls_required_serves_nothing_before_starttls() {
        let mut cfg = config();
        cfg.tls = TlsPolicy::Required;
        let mut hs = started(cfg.clone(), 1);
        let go = option(proto::OPT_GO, &info_request("", &[]));
        for opt in [
            option(proto::OPT_LIST, &[]),
            option(proto::OPT_STRUCTURED_REPLY, &[]),
            option(proto::OPT_INFO, &info_request("", &[])),
            go.clone(),
            option(99, b"x"),
        ] {
            assert_eq!(drive(&mut hs, &opt), Ok(Event::Continue));
            assert_eq!(types(&replies(&mut hs)), vec![proto::REP_ERR_TLS_REQD]);
        }
        // EXPORT_NAME cannot be answered with an error: the connection ends.
        assert_eq!(
            drive(&mut hs, &option(proto::OPT_EXPORT_NAME, b"")),
            Err(HandshakeError::ExportNameRefused("TLS is required"))
        );
        let mut hs = started(cfg.clone(), 1);
        assert_eq!(drive(&mut hs, &option(proto::OPT_ABORT, &[])), Ok(Event::Close));
        let mut hs = started(cfg, 1);
        drive(&mut hs, &option(proto::OPT_STARTTLS, b"x")).unwrap();
        assert_eq!(types(&replies(&mut hs)), vec![proto::REP_ERR_INVALID]);
        assert_eq!(
            drive(&mut hs, &option(proto::OPT_STARTTLS, &[])),
            Ok(Event::StartTls)
        );
        assert_eq!(types(&replies(&mut hs)), vec![proto::REP_ACK]);
        hs.tls_started();
        assert_eq!(hs.want(), 16);
        // Inside TLS: a second STARTTLS is an error, everything else is served.
        drive(&mut hs, &option(proto::OPT_STARTTLS, &[])).unwrap();
        assert_eq!(types(&replies(&mut hs)), vec![proto::REP_ERR_INVALID]);
        assert!(matches!(drive(&mut hs, &go), Ok(Event::Transmission(_))));
    }

    #[test]
    fn tls_optional_serves_both_and_forgets_plain_text_negotiation() {
        let mut cfg = config();
        cfg.tls = TlsPolicy::Optional;
        let mut hs = started(cfg.clone(), 1);
        let go = option(proto::OPT_GO, &info_request("", &[]));
        assert!(matches!(drive(&mut hs, &go), Ok(Event::Transmission(_))));
        let mut hs = started(cfg, 1);
        drive(&mut hs, &option(proto::OPT_STRUCTURED_REPLY, &[])).unwrap();
        assert_eq!(
            drive(&mut hs, &option(proto::OPT_STARTTLS, &[])),
            Ok(Event::StartTls)
        );
        assert_eq!(types(&replies(&mut hs)), vec![proto::REP_ACK, proto::REP_ACK]);
        hs.tls_started();
        let Ok(Event::Transmission(n)) = drive(&mut hs, &go) else {
            panic!()
        };
        assert_eq!(
            n.mode,
            ReplyMode::Simple,
            "structured replies asked for before TLS"
        );
    }

    #[test]
    fn unknown_options_are_unsupported() {
        let mut hs = started(config(), 1);
        for opt in [proto::OPT_PEEK_EXPORT, 99, u32::MAX] {
            drive(&mut hs, &option(opt, b"abc")).unwrap();
            let r = replies(&mut hs);
            assert_eq!(types(&r), vec![proto::REP_ERR_UNSUP]);
            assert_eq!(r[0].opt, opt);
        }
    }

    #[test]
    fn info_reports_size_flags_and_block_sizes() {
        let mut hs = started(config(), 1);
        let d = info_request("vol", &[proto::INFO_BLOCK_SIZE, proto::INFO_NAME, 77]);
        assert_eq!(drive(&mut hs, &option(proto::OPT_INFO, &d)), Ok(Event::Continue));
        let r = replies(&mut hs);
        assert_eq!(
            types(&r),
            vec![proto::REP_INFO, proto::REP_INFO, proto::REP_INFO, proto::REP_ACK]
        );
        let mut rd = Reader::new(&r[0].data);
        assert_eq!(rd.u16(), Some(proto::INFO_EXPORT));
        assert_eq!(rd.u64(), Some(1 << 20));
        let flags = rd.u16().unwrap();
        for f in [
            proto::TFLAG_HAS_FLAGS,
            proto::TFLAG_SEND_FLUSH,
            proto::TFLAG_SEND_FUA,
            proto::TFLAG_SEND_TRIM,
            proto::TFLAG_SEND_WRITE_ZEROES,
            proto::TFLAG_SEND_FAST_ZERO,
            proto::TFLAG_CAN_MULTI_CONN,
            proto::TFLAG_SEND_CACHE,
        ] {
            assert_ne!(flags & f, 0, "flag {f:#x} missing");
        }
        assert_eq!(flags & (proto::TFLAG_READ_ONLY | proto::TFLAG_SEND_DF), 0);
        let mut rd = Reader::new(&r[1].data);
        assert_eq!(rd.u16(), Some(proto::INFO_BLOCK_SIZE));
        assert_eq!(
            (rd.u32(), rd.u32(), rd.u32()),
            (Some(1), Some(4096), Some(32 << 20))
        );
        assert_eq!(&r[2].data[2..], b"vol");
    }

    #[test]
    fn malformed_info_and_go_are_invalid() {
        let mut hs = started(config(), 1);
        let mut too_long_name = info_request("vol", &[]);
        too_long_name[3] = 200;
        let mut trailing = info_request("vol", &[]);
        trailing.push(0);
        let mut odd_count = info_request("vol", &[]);
        odd_count[8] = 5;
        for d in [vec![], vec![0, 0], too_long_name, trailing, odd_count] {
            for opt in [proto::OPT_INFO, proto::OPT_GO] {
                assert_eq!(drive(&mut hs, &option(opt, &d)), Ok(Event::Continue));
                assert_eq!(types(&replies(&mut hs)), vec![proto::REP_ERR_INVALID]);
            }
        }
    }

    #[test]
    fn go_to_unknown_export_fails_softly() {
        let mut hs = started(config(), 1);
        let bad = option(proto::OPT_GO, &info_request("other", &[]));
        assert_eq!(drive(&mut hs, &bad), Ok(Event::Continue));
        assert_eq!(types(&replies(&mut hs)), vec![proto::REP_ERR_UNKNOWN]);
        let good = option(proto::OPT_GO, &info_request("vol", &[]));
        let Ok(Event::Transmission(n)) = drive(&mut hs, &good) else {
            panic!()
        };
        assert_eq!(n.export_name, "vol");
        assert_eq!(types(&replies(&mut hs)).last(), Some(&proto::REP_ACK));
    }

    #[test]
    fn structured_replies_and_meta_context() {
        let mut hs = started(config(), 1);
        let set = option(
            proto::OPT_SET_META_CONTEXT,
            &meta_request("", &[proto::META_BASE_ALLOCATION]),
        );
        // Before structured replies: refused.
        drive(&mut hs, &set).unwrap();
        assert_eq!(types(&replies(&mut hs)), vec![proto::REP_ERR_INVALID]);
        drive(&mut hs, &option(proto::OPT_STRUCTURED_REPLY, b"x")).unwrap();
        assert_eq!(types(&replies(&mut hs)), vec![proto::REP_ERR_INVALID]);
        drive(&mut hs, &option(proto::OPT_STRUCTURED_REPLY, &[])).unwrap();
        assert_eq!(types(&replies(&mut hs)), vec![proto::REP_ACK]);
        // LIST with no query lists everything, with id 0.
        let list = option(proto::OPT_LIST_META_CONTEXT, &meta_request("", &[]));
        drive(&mut hs, &list).unwrap();
        let r = replies(&mut hs);
        assert_eq!(types(&r), vec![proto::REP_META_CONTEXT, proto::REP_ACK]);
        assert_eq!(&r[0].data[..4], &[0, 0, 0, 0]);
        assert_eq!(&r[0].data[4..], proto::META_BASE_ALLOCATION.as_bytes());
        // "base:" is a wildcard for LIST.
        let list = option(proto::OPT_LIST_META_CONTEXT, &meta_request("", &["base:"]));
        drive(&mut hs, &list).unwrap();
        assert_eq!(types(&replies(&mut hs)).len(), 2);
        // Unknown namespaces are ignored; a query without a colon is invalid.
        let set_other = option(
            proto::OPT_SET_META_CONTEXT,
            &meta_request("", &["qemu:dirty-bitmap:x"]),
        );
        drive(&mut hs, &set_other).unwrap();
        assert_eq!(types(&replies(&mut hs)), vec![proto::REP_ACK]);
        let bad = option(proto::OPT_SET_META_CONTEXT, &meta_request("", &["nocolon"]));
        drive(&mut hs, &bad).unwrap();
        assert_eq!(types(&replies(&mut hs)), vec![proto::REP_ERR_INVALID]);
        let mut truncated = meta_request("", &[proto::META_BASE_ALLOCATION]);
        truncated.pop();
        drive(&mut hs, &option(proto::OPT_SET_META_CONTEXT, &truncated)).unwrap();
        assert_eq!(types(&replies(&mut hs)), vec![proto::REP_ERR_INVALID]);
        let unknown = option(
            proto::OPT_SET_META_CONTEXT,
            &meta_request("zzz", &[proto::META_BASE_ALLOCATION]),
        );
        drive(&mut hs, &unknown).unwrap();
        assert_eq!(types(&replies(&mut hs)), vec![proto::REP_ERR_UNKNOWN]);
        // A good SET selects base:allocation with a nonzero id.
        drive(&mut hs, &set).unwrap();
        let r = replies(&mut hs);
        assert_eq!(types(&r), vec![proto::REP_META_CONTEXT, proto::REP_ACK]);
        assert_eq!(&r[0].data[..4], &BASE_ALLOCATION_ID.to_be_bytes());
        let go = option(proto::OPT_GO, &info_request("", &[]));
        let Ok(Event::Transmission(n)) = drive(&mut hs, &go) else {
            panic!()
        };
        assert_eq!(n.mode, ReplyMode::Structured);
        assert_eq!(n.meta_context, Some(BASE_ALLOCATION_ID));
        assert_ne!(n.flags & proto::TFLAG_SEND_DF, 0);
    }

    #[test]
    fn failed_set_meta_context_clears_the_selection() {
        let mut hs = started(config(), 1);
        drive(&mut hs, &option(proto::OPT_STRUCTURED_REPLY, &[])).unwrap();
        let set = meta_request("", &[proto::META_BASE_ALLOCATION]);
        drive(&mut hs, &option(proto::OPT_SET_META_CONTEXT, &set)).unwrap();
        drive(&mut hs, &option(proto::OPT_SET_META_CONTEXT, &[1])).unwrap();
        let go = option(proto::OPT_GO, &info_request("", &[]));
        let Ok(Event::Transmission(n)) = drive(&mut hs, &go) else {
            panic!()
        };
        assert_eq!(n.meta_context, None);
    }

    #[test]
    fn extended_headers() {
        let mut hs = started(config(), 1);
        drive(&mut hs, &option(proto::OPT_EXTENDED_HEADERS, b"x")).unwrap();
        assert_eq!(types(&replies(&mut hs)), vec![proto::REP_ERR_INVALID]);
        drive(&mut hs, &option(proto::OPT_EXTENDED_HEADERS, &[])).unwrap();
        assert_eq!(types(&replies(&mut hs)), vec![proto::REP_ACK]);
        drive(&mut hs, &option(proto::OPT_STRUCTURED_REPLY, &[])).unwrap();
        assert_eq!(types(&replies(&mut hs)), vec![proto::REP_ERR_EXT_HEADER_REQD]);
        let set = meta_request("", &[proto::META_BASE_ALLOCATION]);
        drive(&mut hs, &option(proto::OPT_SET_META_CONTEXT, &set)).unwrap();
        let go = option(proto::OPT_GO, &info_request("", &[]));
        let Ok(Event::Transmission(n)) = drive(&mut hs, &go) else {
            panic!()
        };
        assert_eq!(n.mode, ReplyMode::Extended);
        assert_eq!(n.meta_context, Some(BASE_ALLOCATION_ID));
        // EXPORT_NAME is forbidden after extended headers.
        let mut hs = started(config(), 1);
        drive(&mut hs, &option(proto::OPT_EXTENDED_HEADERS, &[])).unwrap();
        assert!(matches!(
            drive(&mut hs, &option(proto::OPT_EXPORT_NAME, b"")),
            Err(HandshakeError::ExportNameRefused(_))
        ));
        // Disabled by configuration: refused, compact headers stay.
        let mut cfg = config();
        cfg.extended_headers = false;
        let mut hs = started(cfg, 1);
        drive(&mut hs, &option(proto::OPT_EXTENDED_HEADERS, &[])).unwrap();
        assert_eq!(types(&replies(&mut hs)), vec![proto::REP_ERR_UNSUP]);
    }

    #[test]
    fn oversized_option_is_skipped_and_refused() {
        let mut hs = started(config(), 1);
        let big = vec![7u8; MAX_OPTION_LEN as usize + 100_000];
        assert_eq!(drive(&mut hs, &option(proto::OPT_GO, &big)), Ok(Event::Continue));
        assert_eq!(types(&replies(&mut hs)), vec![proto::REP_ERR_TOO_BIG]);
        assert_eq!(hs.want(), 16);
        let mut hs = started(config(), 1);
        assert!(matches!(
            drive(&mut hs, &option(proto::OPT_EXPORT_NAME, &big)),
            Err(HandshakeError::UnknownExport(_))
        ));
    }

    #[test]
    fn endless_options_are_cut_off() {
        let mut hs = started(config(), 1);
        let one = option(proto::OPT_LIST, &[]);
        for _ in 0..MAX_OPTIONS {
            drive(&mut hs, &one).unwrap();
        }
        assert_eq!(drive(&mut hs, &one), Err(HandshakeError::TooManyOptions));
    }

    #[test]
    fn shutting_down_refuses_options_but_allows_abort() {
        let mut hs = started(config(), 1);
        hs.set_shutting_down();
        let go = option(proto::OPT_GO, &info_request("", &[]));
        assert_eq!(drive(&mut hs, &go), Ok(Event::Continue));
        assert_eq!(types(&replies(&mut hs)), vec![proto::REP_ERR_SHUTDOWN]);
        assert_eq!(drive(&mut hs, &option(proto::OPT_ABORT, &[])), Ok(Event::Close));
    }

    #[test]
    fn read_only_flags() {
        let mut cfg = config();
        cfg.export.read_only = true;
        let f = transmission_flags(&cfg.export, ReplyMode::Structured);
        assert_ne!(f & proto::TFLAG_READ_ONLY, 0);
        for absent in [
            proto::TFLAG_SEND_TRIM,
            proto::TFLAG_SEND_WRITE_ZEROES,
            proto::TFLAG_SEND_FAST_ZERO,
            proto::TFLAG_SEND_FUA,
        ] {
            assert_eq!(f & absent, 0);
        }
    }
}
