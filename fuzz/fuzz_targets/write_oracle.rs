//! Writes, discards, flushes and reopens checked against a flat model; power cuts keep every flushed byte.
//! The body (and its oracles) is `vhdkit_fuzz_targets::write_oracle`, which `cargo test` also runs on
//! the committed corpus.
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| vhdkit_fuzz_targets::write_oracle(data));
