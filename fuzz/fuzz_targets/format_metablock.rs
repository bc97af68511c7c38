//! libFuzzer entry of the `format_metablock` target; the target and its properties are
//! `blockguard_fuzz::metablock` (crates/blockguard-fuzz/src/metablock.rs).
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    blockguard_fuzz::metablock::run(data);
});
