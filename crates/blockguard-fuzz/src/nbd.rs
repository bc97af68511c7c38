//! Target `nbd_request`: the NBD server's protocol code, the handshake state machine (option
//! parsing and replies) and, once a negotiation succeeds, request parsing, validation and
//! execution against a 64 KiB in-memory export of 512-byte blocks whose block 3 is corrupt.
//!
//! Properties (checked inside `blockguard_nbd::fuzzing::fuzz_one`): nothing panics; every
//! option reply and every request reply decodes as a well-formed message, answers the
//! request's cookie and leaves no trailing bytes; a successful read's chunks cover the
//! requested range exactly.
//!
//! Input layout: byte 0 selects the start state — 0 mod 4: raw client bytes from the
//! greeting on; 1/2/3: requests after a valid handshake with simple replies, structured
//! replies or extended headers.

use blockguard_nbd::client::{info_request, meta_request};
use blockguard_nbd::fuzzing::{encode_requests, fuzz_one, valid_prefix, Request};
use blockguard_nbd::proto::{
    self, PutBe, CMD_BLOCK_STATUS, CMD_CACHE, CMD_DISC, CMD_FLAG_DF, CMD_FLAG_FAST_ZERO, CMD_FLAG_FUA,
    CMD_FLAG_NO_HOLE, CMD_FLAG_PAYLOAD_LEN, CMD_FLAG_REQ_ONE, CMD_FLUSH, CMD_READ, CMD_TRIM, CMD_WRITE,
    CMD_WRITE_ZEROES, FLAG_C_FIXED_NEWSTYLE, FLAG_C_NO_ZEROES, INFO_BLOCK_SIZE, INFO_DESCRIPTION,
    INFO_EXPORT, INFO_NAME, META_BASE_ALLOCATION, OPT_ABORT, OPT_EXPORT_NAME, OPT_EXTENDED_HEADERS, OPT_GO,
    OPT_INFO, OPT_LIST, OPT_LIST_META_CONTEXT, OPT_SET_META_CONTEXT, OPT_STARTTLS, OPT_STRUCTURED_REPLY,
};

/// A handshake and a few requests with payloads.
pub const MAX_LEN: usize = 64 << 10;

/// The target: hands the input to `blockguard_nbd::fuzzing::fuzz_one`, which checks the
/// properties, and labels how far it got (start state, number of requests handled).
///
/// # Panics
///
/// When `fuzz_one` finds a property violated: that is what the fuzzer looks for. Never
/// otherwise, whatever the bytes.
pub fn run(data: &[u8]) -> &'static str {
    const LABELS: [[&str; 3]; 4] = [
        ["raw: no request", "raw: one request", "raw: requests"],
        ["simple: no request", "simple: one request", "simple: requests"],
        [
            "structured: no request",
            "structured: one request",
            "structured: requests",
        ],
        [
            "extended: no request",
            "extended: one request",
            "extended: requests",
        ],
    ];
    let handled = fuzz_one(data);
    let mode = usize::from(data.first().map_or(0, |b| b % 4));
    LABELS[mode][handled.min(2)]
}

/// Bytes of one option as a client sends it.
fn option(out: &mut Vec<u8>, opt: u32, data: &[u8]) {
    out.put_u64(proto::IHAVEOPT);
    out.put_u32(opt);
    out.put_u32(u32::try_from(data.len()).expect("an option's data fits its 32-bit length"));
    out.extend_from_slice(data);
}

/// Request sequences from the test client's encoder after each kind of handshake (and the
/// same bytes behind a raw handshake), and handshakes that exercise each option.
pub fn seeds() -> Vec<(String, Vec<u8>)> {
    let mut out = Vec::new();
    request_seeds(&mut out);
    handshake_seeds(&mut out);
    out
}

/// Request sequences after each kind of valid handshake (byte 0 = 1, 2, 3), two of them also
/// behind the handshake bytes themselves (byte 0 = 0).
fn request_seeds(out: &mut Vec<(String, Vec<u8>)>) {
    let page = vec![0x5a; 4096];
    let sector = vec![0x33; 512];
    let sessions: Vec<(&str, Vec<Request<'_>>)> = vec![
        ("read", vec![(CMD_READ, 0, 0, 4096, &[])]),
        (
            "write-read-back",
            vec![(CMD_WRITE, 0, 8192, 4096, &page), (CMD_READ, 0, 8192, 4096, &[])],
        ),
        (
            "write-fua-flush",
            vec![
                (CMD_WRITE, CMD_FLAG_FUA, 512, 512, &sector),
                (CMD_FLUSH, 0, 0, 0, &[]),
            ],
        ),
        ("read-corrupt-block", vec![(CMD_READ, 0, 1536, 512, &[])]),
        (
            "read-df-across-corrupt",
            vec![(CMD_READ, CMD_FLAG_DF, 1024, 2048, &[])],
        ),
        ("read-past-end", vec![(CMD_READ, 0, (64 << 10) - 512, 1024, &[])]),
        (
            "trim-zeroes-status",
            vec![
                (CMD_TRIM, 0, 0, 8192, &[]),
                (CMD_WRITE_ZEROES, CMD_FLAG_NO_HOLE, 8192, 4096, &[]),
                (CMD_WRITE_ZEROES, CMD_FLAG_FAST_ZERO, 16384, 4096, &[]),
                (CMD_BLOCK_STATUS, 0, 0, 64 << 10, &[]),
                (CMD_BLOCK_STATUS, CMD_FLAG_REQ_ONE, 4096, 8192, &[]),
            ],
        ),
        (
            "cache-unknown-disc",
            vec![
                (CMD_CACHE, 0, 0, 4096, &[]),
                (99, 0, 0, 0, &[]),
                (CMD_DISC, 0, 0, 0, &[]),
                (CMD_READ, 0, 0, 512, &[]),
            ],
        ),
        (
            "unaligned-and-zero-length",
            vec![
                (CMD_WRITE, 0, 100, 10, &sector[..10]),
                (CMD_READ, 0, 0, 0, &[]),
                (CMD_READ, 0, 7, 1000, &[]),
            ],
        ),
    ];
    for mode in 1..=3u8 {
        for (name, requests) in &sessions {
            let body = encode_requests(mode, requests);
            let mut input = vec![mode];
            input.extend(&body);
            out.push((format!("gen-mode{mode}-{name}"), input));
            if *name == "write-read-back" || *name == "trim-zeroes-status" {
                let mut raw = vec![0u8];
                raw.extend(valid_prefix(mode));
                raw.extend(&body);
                out.push((format!("gen-raw-handshake{mode}-{name}"), raw));
            }
        }
    }
    // Extended headers only: a payload announced on a non-write command.
    let mut input = vec![3u8];
    input.extend(encode_requests(
        3,
        &[(CMD_BLOCK_STATUS, CMD_FLAG_PAYLOAD_LEN, 0, 16, &[0; 16])],
    ));
    out.push(("gen-mode3-status-with-payload".into(), input));
}

/// Raw handshakes (byte 0 = 0) exercising each option, each followed by a read, and one from a
/// client without fixed newstyle.
fn handshake_seeds(out: &mut Vec<(String, Vec<u8>)>) {
    type Options = Vec<(u32, Vec<u8>)>;
    let flags = FLAG_C_FIXED_NEWSTYLE | FLAG_C_NO_ZEROES;
    let handshakes: Vec<(&str, Options)> = vec![
        ("list-abort", vec![(OPT_LIST, vec![]), (OPT_ABORT, vec![])]),
        (
            "info-then-go",
            vec![
                (OPT_INFO, info_request("fuzz", &[INFO_NAME, INFO_DESCRIPTION])),
                (OPT_GO, info_request("", &[INFO_BLOCK_SIZE, INFO_EXPORT])),
            ],
        ),
        ("unknown-export", vec![(OPT_GO, info_request("nope", &[]))]),
        ("starttls", vec![(OPT_STARTTLS, vec![]), (OPT_ABORT, vec![])]),
        (
            "meta-contexts",
            vec![
                (OPT_STRUCTURED_REPLY, vec![]),
                (OPT_LIST_META_CONTEXT, meta_request("", &["base:", "qemu:x"])),
                (OPT_SET_META_CONTEXT, meta_request("", &[META_BASE_ALLOCATION])),
                (OPT_GO, info_request("", &[])),
            ],
        ),
        (
            "extended-twice",
            vec![
                (OPT_EXTENDED_HEADERS, vec![]),
                (OPT_EXTENDED_HEADERS, vec![]),
                (OPT_STRUCTURED_REPLY, vec![]),
                (OPT_GO, info_request("", &[])),
            ],
        ),
        ("export-name", vec![(OPT_EXPORT_NAME, b"fuzz".to_vec())]),
        (
            "unknown-option",
            vec![(0x7777, vec![1, 2, 3]), (OPT_ABORT, vec![])],
        ),
    ];
    for (name, options) in handshakes {
        let mut input = vec![0u8];
        input.put_u32(flags);
        for (opt, data) in options {
            option(&mut input, opt, &data);
        }
        input.extend(encode_requests(1, &[(CMD_READ, 0, 0, 512, &[])]));
        out.push((format!("gen-handshake-{name}"), input));
    }
    // Old-style client flags (no fixed newstyle).
    let mut input = vec![0u8];
    input.put_u32(0);
    option(&mut input, OPT_EXPORT_NAME, b"");
    out.push(("gen-handshake-not-fixed-newstyle".into(), input));
}
