//! libFuzzer entry of the `nbd_uri` target; the target and its properties are
//! `blockguard_fuzz::nbd_uri` (crates/blockguard-fuzz/src/nbd_uri.rs).
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    blockguard_fuzz::nbd_uri::run(data);
});
