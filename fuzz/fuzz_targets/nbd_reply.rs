//! libFuzzer entry of the `nbd_reply` target; the target and its properties are
//! `blockguard_fuzz::nbd_reply` (crates/blockguard-fuzz/src/nbd_reply.rs).
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    blockguard_fuzz::nbd_reply::run(data);
});
