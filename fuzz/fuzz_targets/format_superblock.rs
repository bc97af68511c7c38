//! libFuzzer entry of the `format_superblock` target; the target and its properties are
//! `blockguard_fuzz::superblock` (crates/blockguard-fuzz/src/superblock.rs).
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    blockguard_fuzz::superblock::run(data);
});
