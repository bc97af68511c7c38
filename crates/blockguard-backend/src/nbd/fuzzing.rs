//! The client's parsing of what a server sends, as fuzz bodies (feature `testing`): option
//! replies during the handshake ([`handshake`]) and simple and structured replies during
//! transmission ([`replies`]). A server is not trusted: whatever it sends, the client must not
//! panic, must not place data outside the read it asked for, and must not say anything but
//! `NBD_OPT_STARTTLS` before TLS is up when it asked for TLS. Each function panics when one
//! of its properties is violated, and only then.

use super::conn::{read_replies, Failure, Shared};
use super::wire::{self, Cmd, HandshakeError};
use std::io::{self, Read, Write};

/// A server that says `input` and records what the client says.
struct Scripted<'a> {
    input: &'a [u8],
    sent: Vec<u8>,
}

impl Read for Scripted<'_> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        self.input.read(buf)
    }
}

impl Write for Scripted<'_> {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        self.sent.extend_from_slice(buf);
        Ok(buf.len())
    }
    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

/// The option numbers the client sent, from what it wrote after the greeting (4 bytes of
/// flags, then options of 16 bytes of header and their data).
///
/// # Panics
///
/// When what the client wrote is not a sequence of well-formed options.
fn options_sent(sent: &[u8]) -> Vec<u32> {
    let mut opts = Vec::new();
    let mut rest = sent.get(4..).unwrap_or_default();
    while !rest.is_empty() {
        assert!(rest.len() >= 16, "a truncated option header: {rest:?}");
        assert_eq!(&rest[..8], b"IHAVEOPT", "an option without its magic");
        let word = |i: usize| u32::from_be_bytes([rest[i], rest[i + 1], rest[i + 2], rest[i + 3]]);
        let (opt, len) = (word(8), word(12) as usize);
        // NBD_OPT_EXPORT_NAME ends the options: the server answers with no header.
        assert!(rest.len() >= 16 + len, "option {opt} shorter than its length");
        opts.push(opt);
        rest = &rest[16 + len..];
    }
    opts
}

/// The handshake against a server that sends `input`: the greeting, then `STARTTLS` when
/// `tls` (stopping there, where the TLS handshake would start), else the options up to
/// transmission. Returns a label of how far it got.
///
/// # Panics
///
/// When a property is violated: export information out of the bounds the client promises
/// (minimum block a power of two up to 64 KiB, largest request a multiple of it), anything
/// but `STARTTLS` sent before TLS, or malformed options sent.
pub fn handshake(input: &[u8], tls: bool) -> &'static str {
    let mut s = Scripted {
        input,
        sent: Vec::new(),
    };
    let Ok(no_zeroes) = wire::greet(&mut s) else {
        return "bad greeting";
    };
    if tls {
        let result = wire::starttls(&mut s);
        assert_eq!(
            options_sent(&s.sent),
            [5],
            "the client must send STARTTLS and nothing else before TLS"
        );
        return match result {
            Ok(()) => "starttls acknowledged",
            Err(HandshakeError::StartTlsRefused(_)) => "starttls refused",
            Err(_) => "starttls broken",
        };
    }
    match wire::negotiate(&mut s, "export", no_zeroes) {
        Ok(info) => {
            assert!(
                info.min_block.is_power_of_two() && info.min_block <= 64 << 10,
                "minimum block {} accepted",
                info.min_block
            );
            assert!(
                info.max_payload >= info.min_block && info.max_payload % info.min_block == 0,
                "largest request {} with minimum block {}",
                info.max_payload,
                info.min_block
            );
            assert!(info.max_payload <= wire::DEFAULT_MAX_PAYLOAD);
            let _ = options_sent(&s.sent);
            "transmission"
        }
        Err(HandshakeError::TlsRequired) => "tls required",
        Err(HandshakeError::Protocol(_)) => "refused",
        Err(_) => "broken",
    }
}

/// The requests [`replies`] waits for: (cookie, command, offset, length); the reads' offsets
/// and lengths come from the input.
fn requests(read_at: u64, read_len: u32) -> [(u64, Cmd, u64, u32); 4] {
    [
        (1, Cmd::Read, read_at, read_len),
        (2, Cmd::Read, 4096, 512),
        (3, Cmd::Write, 0, 4096),
        (4, Cmd::Flush, 0, 0),
    ]
}

/// Transmission replies from a server that sends `input` after its first 7 bytes, which say:
/// byte 0, whether structured replies were negotiated (bit 0); bytes 1..5, the offset of
/// request 1 (a read); bytes 5..7, its length. Four requests wait (cookies 1 to 4: two reads, a
/// write, a flush). Returns a label of how far it got.
///
/// # Panics
///
/// When a property is violated: a successful read whose data is not the length asked for, a
/// request answered twice, an error reply with errno 0 (which would report a failure as no
/// error), or a request neither answered nor still waiting (one whose reply never came
/// stays waiting, for its timeout to fail it).
pub fn replies(input: &[u8]) -> &'static str {
    let Some((head, stream)) = input.split_first_chunk::<7>() else {
        return "short";
    };
    let structured = head[0] & 1 != 0;
    let read_at = u64::from(u32::from_be_bytes([head[1], head[2], head[3], head[4]]));
    let read_len = u32::from(u16::from_be_bytes([head[5], head[6]]));
    let Ok(shared) = Shared::detached() else {
        return "no socket pair";
    };
    let reqs = requests(read_at, read_len);
    let rxs: Vec<_> = reqs
        .iter()
        .map(|&(cookie, cmd, at, len)| shared.expect(cookie, cmd, at, len))
        .collect();
    let mut rest = stream;
    let ended = read_replies(&mut rest, &shared, structured);
    let mut answered = 0;
    for (rx, &(cookie, cmd, _, len)) in rxs.iter().zip(&reqs) {
        let Ok(outcome) = rx.try_recv() else { continue };
        answered += 1;
        assert!(rx.try_recv().is_err(), "request {cookie} answered twice");
        match outcome {
            Ok(data) if cmd == Cmd::Read => assert_eq!(data.len(), len as usize, "read {cookie}'s data"),
            Ok(data) => assert!(data.is_empty(), "{} {cookie} returned data", cmd.name()),
            Err(Failure::Server { errno, .. }) => assert_ne!(errno, 0, "an error reply with errno 0"),
            Err(Failure::Lost(reason)) => assert!(!reason.is_empty()),
        }
    }
    assert_eq!(
        answered + shared.waiting(),
        reqs.len(),
        "every request is answered or still waiting"
    );
    match (ended, answered) {
        (Ok(()), 0) => "clean end, none answered",
        (Ok(()), _) => "clean end",
        (Err(_), 0) => "refused",
        (Err(_), _) => "answered, then refused",
    }
}
