//! libFuzzer entry of the `nbd_request` target; the target and its properties are
//! `blockguard_fuzz::nbd` (crates/blockguard-fuzz/src/nbd.rs).
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    blockguard_fuzz::nbd::run(data);
});
