//! The VHDX log scanner on arbitrary log regions, and logs our writer builds (exact replay).
//! The body (and its oracles) is `vhdkit_fuzz_targets::vhdx_log`, which `cargo test` also runs on
//! the committed corpus.
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| vhdkit_fuzz_targets::vhdx_log(data));
