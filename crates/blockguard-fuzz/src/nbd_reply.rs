//! Target `nbd_reply`: the NBD client backend's parsing of what a server sends (the server is
//! not trusted): the greeting and option replies of the handshake, `NBD_OPT_STARTTLS`'s
//! answer, and the simple and structured replies of transmission.
//!
//! Properties (checked inside `blockguard_backend::nbd::fuzzing`): nothing panics; export
//! information the client accepts is within the bounds it promises; with TLS asked, nothing
//! but `STARTTLS` is sent before the server agrees; every request waiting for a reply is
//! answered at most once, a successful read with exactly the length asked for, an error
//! with a non-zero error number, or else is still waiting.
//!
//! Input layout: byte 0 selects — 0 mod 3: the handshake without TLS, 1: with TLS (up to
//! where the TLS handshake would start), 2: transmission replies; the rest is what the server
//! sends (for replies, 7 bytes of setup first: see `fuzzing::replies`).

use blockguard_backend::nbd::fuzzing;
use blockguard_nbd::proto::{
    self, PutBe, FLAG_FIXED_NEWSTYLE, FLAG_NO_ZEROES, INFO_BLOCK_SIZE, INFO_EXPORT, OPT_GO, OPT_STARTTLS,
    OPT_STRUCTURED_REPLY, REPLY_FLAG_DONE, REPLY_TYPE_ERROR, REPLY_TYPE_NONE, REPLY_TYPE_OFFSET_DATA,
    REPLY_TYPE_OFFSET_HOLE, REP_ACK, REP_ERR_POLICY, REP_ERR_TLS_REQD, REP_ERR_UNKNOWN, REP_ERR_UNSUP,
    REP_INFO,
};

/// A handshake's worth of replies, or a few reads' data.
pub const MAX_LEN: usize = 16 << 10;

/// The target; see the module documentation.
///
/// # Panics
///
/// When a property is violated.
pub fn run(data: &[u8]) -> &'static str {
    let Some((&mode, rest)) = data.split_first() else {
        return "empty";
    };
    match mode % 3 {
        0 => fuzzing::handshake(rest, false),
        1 => fuzzing::handshake(rest, true),
        _ => fuzzing::replies(rest),
    }
}

/// A server's greeting with `flags`.
fn greeting(flags: u16) -> Vec<u8> {
    let mut out = Vec::new();
    out.put_u64(proto::NBDMAGIC);
    out.put_u64(proto::IHAVEOPT);
    out.put_u16(flags);
    out
}

/// One option reply.
fn opt_reply(out: &mut Vec<u8>, opt: u32, typ: u32, data: &[u8]) {
    out.put_u64(proto::REPLY_MAGIC_OPT);
    out.put_u32(opt);
    out.put_u32(typ);
    out.put_u32(u32::try_from(data.len()).expect("a short reply"));
    out.extend_from_slice(data);
}

/// `NBD_REP_INFO` of the export (size, flags) and of block sizes.
fn infos(out: &mut Vec<u8>, size: u64, min: u32, max: u32) {
    let mut export = Vec::new();
    export.put_u16(INFO_EXPORT);
    export.put_u64(size);
    export.put_u16(proto::TFLAG_HAS_FLAGS | proto::TFLAG_SEND_FLUSH);
    opt_reply(out, OPT_GO, REP_INFO, &export);
    let mut sizes = Vec::new();
    sizes.put_u16(INFO_BLOCK_SIZE);
    sizes.put_u32(min);
    sizes.put_u32(4096);
    sizes.put_u32(max);
    opt_reply(out, OPT_GO, REP_INFO, &sizes);
}

/// Handshakes a server may answer with (mode 0: plain, 1: TLS).
fn handshake_seeds() -> Vec<Vec<u8>> {
    let both = FLAG_FIXED_NEWSTYLE | FLAG_NO_ZEROES;
    let mut seeds = Vec::new();
    for (structured, min, max) in [
        (REP_ACK, 512, 1 << 20),
        (REP_ERR_UNSUP, 1, 32 << 20),
        (REP_ACK, 3, 4096),
    ] {
        let mut s = vec![0];
        s.extend(greeting(both));
        opt_reply(&mut s, OPT_STRUCTURED_REPLY, structured, &[]);
        infos(&mut s, 64 << 20, min, max);
        opt_reply(&mut s, OPT_GO, REP_ACK, &[]);
        seeds.push(s);
    }
    // Errors: TLS required, an unknown export with a message, GO unsupported (then the
    // EXPORT_NAME fallback, with and without the 124 zeros), a truncated reply.
    for (flags, go) in [
        (both, REP_ERR_UNKNOWN),
        (both, REP_ERR_UNSUP),
        (FLAG_FIXED_NEWSTYLE, REP_ERR_UNSUP),
    ] {
        let mut s = vec![0];
        s.extend(greeting(flags));
        opt_reply(&mut s, OPT_STRUCTURED_REPLY, REP_ACK, &[]);
        opt_reply(&mut s, OPT_GO, go, b"no such export");
        s.put_u64(1 << 30);
        s.put_u16(proto::TFLAG_HAS_FLAGS);
        if flags & FLAG_NO_ZEROES == 0 {
            s.extend([0u8; 124]);
        }
        seeds.push(s);
    }
    let mut s = vec![0];
    s.extend(greeting(both));
    opt_reply(&mut s, OPT_STRUCTURED_REPLY, REP_ERR_TLS_REQD, b"TLS is required");
    seeds.push(s);
    let mut s = vec![0];
    s.extend(greeting(0));
    seeds.push(s);
    // STARTTLS: acknowledged, unsupported, refused by policy, answered for another option.
    for (opt, typ) in [
        (OPT_STARTTLS, REP_ACK),
        (OPT_STARTTLS, REP_ERR_UNSUP),
        (OPT_STARTTLS, REP_ERR_POLICY),
        (OPT_GO, REP_ACK),
    ] {
        let mut s = vec![1];
        s.extend(greeting(both));
        opt_reply(&mut s, opt, typ, &[]);
        seeds.push(s);
    }
    seeds
}

/// One structured reply chunk.
fn chunk(out: &mut Vec<u8>, flags: u16, typ: u16, cookie: u64, payload: &[u8]) {
    out.put_u32(proto::STRUCTURED_REPLY_MAGIC);
    out.put_u16(flags);
    out.put_u16(typ);
    out.put_u64(cookie);
    out.put_u32(u32::try_from(payload.len()).expect("a short chunk"));
    out.extend_from_slice(payload);
}

/// One simple reply.
fn simple(out: &mut Vec<u8>, errno: u32, cookie: u64, data: &[u8]) {
    out.put_u32(proto::SIMPLE_REPLY_MAGIC);
    out.put_u32(errno);
    out.put_u64(cookie);
    out.extend_from_slice(data);
}

/// Transmission replies (mode 2): setup (structured?, offset and length of read 1), then
/// what the server sends.
fn reply_seeds() -> Vec<Vec<u8>> {
    let setup = |structured: bool, at: u32, len: u16| {
        let mut s = vec![2, u8::from(structured)];
        s.put_u32(at);
        s.put_u16(len);
        s
    };
    let mut seeds = Vec::new();
    // Simple replies to all four requests, out of order, one an error.
    let mut s = setup(false, 0, 1024);
    simple(&mut s, 0, 3, &[]);
    simple(&mut s, 0, 1, &[0x5a; 1024]);
    simple(&mut s, proto::EIO, 2, &[]);
    simple(&mut s, 0, 4, &[]);
    seeds.push(s);
    // Structured: data then a hole for read 1, an error chunk for read 2, NONE for the rest.
    let mut s = setup(true, 8192, 2048);
    let mut data = Vec::new();
    data.put_u64(8192);
    data.extend([7u8; 1024]);
    chunk(&mut s, 0, REPLY_TYPE_OFFSET_DATA, 1, &data);
    let mut hole = Vec::new();
    hole.put_u64(9216);
    hole.put_u32(1024);
    chunk(&mut s, REPLY_FLAG_DONE, REPLY_TYPE_OFFSET_HOLE, 1, &hole);
    let mut err = Vec::new();
    err.put_u32(proto::EIO);
    err.put_u16(4);
    err.extend(b"oops");
    chunk(&mut s, REPLY_FLAG_DONE, REPLY_TYPE_ERROR, 2, &err);
    chunk(&mut s, REPLY_FLAG_DONE, REPLY_TYPE_NONE, 3, &[]);
    chunk(&mut s, REPLY_FLAG_DONE, REPLY_TYPE_NONE, 4, &[]);
    seeds.push(s);
    // Hostile: data outside the read, an unknown cookie, a bad magic, an error with errno 0,
    // a chunk longer than allowed, a reply cut short.
    let mut s = setup(true, 0, 512);
    let mut out_of_range = Vec::new();
    out_of_range.put_u64(4096);
    out_of_range.extend([1u8; 512]);
    chunk(&mut s, REPLY_FLAG_DONE, REPLY_TYPE_OFFSET_DATA, 1, &out_of_range);
    seeds.push(s);
    let mut s = setup(false, 0, 512);
    simple(&mut s, 0, 99, &[]);
    seeds.push(s);
    let mut s = setup(false, 0, 512);
    s.put_u32(0x1234_5678);
    seeds.push(s);
    let mut s = setup(true, 0, 512);
    let mut zero = Vec::new();
    zero.put_u32(0);
    zero.put_u16(0);
    chunk(&mut s, REPLY_FLAG_DONE, REPLY_TYPE_ERROR, 3, &zero);
    seeds.push(s);
    let mut s = setup(true, 0, 512);
    chunk(&mut s, REPLY_FLAG_DONE, REPLY_TYPE_ERROR, 3, &vec![0u8; 70_000]);
    s.truncate(s.len() - 60_000);
    seeds.push(s);
    let mut s = setup(false, 0, 4096);
    simple(&mut s, 0, 1, &[3u8; 100]);
    seeds.push(s);
    // A structured chunk where simple replies were negotiated; a reply left without DONE.
    let mut s = setup(false, 0, 512);
    chunk(&mut s, REPLY_FLAG_DONE, REPLY_TYPE_NONE, 4, &[]);
    seeds.push(s);
    let mut s = setup(true, 0, 512);
    chunk(&mut s, 0, REPLY_TYPE_NONE, 4, &[]);
    seeds.push(s);
    seeds
}

/// Handshakes and replies of every kind the client parses, well-formed and hostile.
pub fn seeds() -> Vec<(String, Vec<u8>)> {
    handshake_seeds()
        .into_iter()
        .chain(reply_seeds())
        .enumerate()
        .map(|(i, s)| (format!("seed-{i:02}"), s))
        .collect()
}
