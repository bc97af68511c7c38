//! libFuzzer entry of the `format_journal` target; the target and its properties are
//! `blockguard_fuzz::journal` (crates/blockguard-fuzz/src/journal.rs).
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    blockguard_fuzz::journal::run(data);
});
