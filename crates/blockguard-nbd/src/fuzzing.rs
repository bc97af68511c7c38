//! Entry points shared by the fuzz targets and the unit tests that stand in for them.

use crate::client::{read_option_reply, Client};
use crate::export::{Export, MemoryExport};
use crate::handshake::{Event, ExportInfo, Handshake, HandshakeConfig, TlsPolicy};
use crate::proto;
use crate::transmission::{Outcome, Session};
use crate::usize_of;
use std::io::Cursor;

const SIZE: u64 = 64 * 1024;
const MAX_PAYLOAD: u32 = 256 * 1024;

/// The fuzz target's entry point. The first byte picks what the rest is:
/// `0` (or anything ≡ 0 mod 4) raw client bytes from the very start of the handshake;
/// `1`, `2`, `3` requests after a valid handshake prefix negotiating simple replies,
/// structured replies or extended headers (with `base:allocation`), so the fuzzer spends
/// its time in the transmission phase too.
pub fn fuzz_one(data: &[u8]) -> usize {
    let Some((&selector, rest)) = data.split_first() else {
        return 0;
    };
    match selector % 4 {
        0 => handshake_and_requests(rest),
        mode => {
            let mut input = valid_prefix(mode);
            input.extend_from_slice(rest);
            handshake_and_requests(&input)
        }
    }
}

/// Client bytes of a successful handshake: 1 simple, 2 structured, 3 extended headers.
pub fn valid_prefix(mode: u8) -> Vec<u8> {
    use crate::client::{info_request, meta_request};
    use crate::proto::PutBe;
    let mut p = Vec::new();
    p.put_u32(proto::FLAG_C_FIXED_NEWSTYLE | proto::FLAG_C_NO_ZEROES);
    let mut option = |opt: u32, data: &[u8]| {
        p.put_u64(proto::IHAVEOPT);
        p.put_u32(opt);
        p.put_u32(u32::try_from(data.len()).expect("option data of the fuzz input, under 4 GiB"));
        p.extend_from_slice(data);
    };
    match mode {
        2 => option(proto::OPT_STRUCTURED_REPLY, &[]),
        3 => option(proto::OPT_EXTENDED_HEADERS, &[]),
        _ => {}
    }
    if mode >= 2 {
        option(
            proto::OPT_SET_META_CONTEXT,
            &meta_request("", &[proto::META_BASE_ALLOCATION]),
        );
    }
    option(proto::OPT_GO, &info_request("", &[proto::INFO_BLOCK_SIZE]));
    p
}

/// One request as a client sends it: command, flags, offset, length, payload.
pub type Request<'a> = (u16, u16, u64, u64, &'a [u8]);

/// The bytes the test client sends for `requests` in the transmission phase of a session
/// negotiated by [`valid_prefix`]`(mode)` (cookies count from 1): the real encoder, for the
/// fuzz target's seed inputs.
pub fn encode_requests(mode: u8, requests: &[Request<'_>]) -> Vec<u8> {
    let reply_mode = match mode {
        3 => crate::handshake::ReplyMode::Extended,
        2 => crate::handshake::ReplyMode::Structured,
        _ => crate::handshake::ReplyMode::Simple,
    };
    let mut c = Client::for_replies(Cursor::new(Vec::new()), reply_mode);
    for &(typ, flags, offset, length, payload) in requests {
        c.send_request(typ, flags, offset, length, payload)
            .expect("writing to memory cannot fail");
    }
    c.stream_owned().into_inner()
}

/// Feeds arbitrary client bytes through the handshake state machine and then, if the
/// handshake reaches transmission, through request parsing and execution against a small
/// in-memory export with one corrupt block. Panics if the server misbehaves: any panic, an
/// undecodable option reply or request reply, a reply to the wrong cookie, or a successful
/// read whose chunks do not cover the request. Returns how many requests were executed.
pub fn handshake_and_requests(data: &[u8]) -> usize {
    let export = MemoryExport::new(SIZE, 512);
    export.corrupt_block(3);
    let cfg = HandshakeConfig {
        export: ExportInfo {
            name: "fuzz".into(),
            description: export.description(),
            size: export.size(),
            block_size: export.block_size(),
            read_only: false,
            fast_zero: true,
        },
        max_payload: MAX_PAYLOAD,
        extended_headers: true,
        // STARTTLS is accepted, and the TLS handshake taken as done: the option state machine
        // around it (the restart, a second STARTTLS) is what is fuzzed here, not TLS.
        tls: TlsPolicy::Optional,
    };
    let mut hs = Handshake::new(cfg);
    drop(hs.take_output());
    let mut input = data;
    let negotiated = loop {
        let want = hs.want();
        if input.len() < want {
            return 0;
        }
        let (chunk, rest) = input.split_at(want);
        input = rest;
        let event = hs.feed(chunk);
        let out = hs.take_output();
        if matches!(event, Ok(Event::Continue | Event::Close | Event::StartTls)) {
            check_option_replies(&out);
        }
        match event {
            Ok(Event::Continue) => {}
            Ok(Event::StartTls) => hs.tls_started(),
            Ok(Event::Transmission(n)) => break n,
            Ok(Event::Close) | Err(_) => return 0,
        }
    };
    let mut handled = 0;
    let session = Session::new(&negotiated, export.size(), MAX_PAYLOAD);
    loop {
        let hlen = session.header_len();
        if input.len() < hlen {
            return handled;
        }
        let (hdr, rest) = input.split_at(hlen);
        input = rest;
        let Ok(req) = session.parse_header(hdr) else {
            return handled;
        };
        if input.len() < req.payload_len {
            return handled;
        }
        let (payload, rest) = input.split_at(req.payload_len);
        input = rest;
        handled += 1;
        match session.handle(&export, &req, payload) {
            Outcome::Disconnect => return handled,
            Outcome::Reply(bytes) => {
                let mut c = Client::for_replies(Cursor::new(bytes.to_vec()), negotiated.mode);
                c.expect(req.cookie, req.typ, req.length);
                let reply = c.read_reply().expect("reply must decode");
                assert_eq!(reply.cookie, req.cookie, "reply to the wrong cookie");
                assert!(c.at_end(), "trailing bytes after the reply");
                if req.typ == proto::CMD_READ
                    && reply.errno == 0
                    && negotiated.mode != crate::handshake::ReplyMode::Simple
                {
                    assert!(
                        reply.read_data(req.offset, usize_of(req.length)).is_some(),
                        "successful read does not cover its range"
                    );
                }
            }
        }
    }
}

fn check_option_replies(out: &[u8]) {
    let mut cur = Cursor::new(out);
    while usize_of(cur.position()) < out.len() {
        read_option_reply(&mut cur).expect("option reply must decode");
    }
}
