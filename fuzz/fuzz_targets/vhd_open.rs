//! Arbitrary bytes (raw or sparse-encoded) as a VHD: open, resolve, read, check, write back.
//! The body (and its oracles) is `vhdkit_fuzz_targets::vhd_open`, which `cargo test` also runs on
//! the committed corpus.
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| vhdkit_fuzz_targets::vhd_open(data));
