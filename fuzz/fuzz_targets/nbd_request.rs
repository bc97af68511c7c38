//! Fuzzes the NBD server's protocol code: the handshake state machine (option parsing and
//! replies) and, once a negotiation succeeds, request parsing, validation and execution
//! against a small in-memory export with a corrupt block.
//!
//! Properties (checked inside `blockguard_nbd::fuzzing::fuzz_one`): nothing panics; every
//! option reply and every request reply decodes as a well-formed message, answers the
//! request's cookie and leaves no trailing bytes; a successful read's chunks cover the
//! requested range exactly.
//!
//! Input layout: byte 0 selects the start state — 0 mod 4: raw client bytes from the
//! greeting on; 1/2/3: requests after a valid handshake with simple replies, structured
//! replies or extended headers.
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    blockguard_nbd::fuzzing::fuzz_one(data);
});
