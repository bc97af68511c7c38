//! libFuzzer entry of the `engine_model` target; the target and its properties are
//! `blockguard_fuzz::engine` (crates/blockguard-fuzz/src/engine.rs).
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    blockguard_fuzz::engine::run(data);
});
