//! The live-migration stream decoder on hostile bytes (header, framed records, VM state).
//! The body (and its oracles) is `vhdkit_fuzz_targets::migration_stream`, which `cargo test`
//! also runs on the committed corpus.
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| vhdkit_fuzz_targets::migration_stream(data));
