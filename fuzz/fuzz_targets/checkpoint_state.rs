//! The checkpoint decoder on hostile bytes (manifest and VM state, resealed or not).
//! The body (and its oracles) is `vhdkit_fuzz_targets::checkpoint_state`, which `cargo test`
//! also runs on the committed corpus.
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| vhdkit_fuzz_targets::checkpoint_state(data));
