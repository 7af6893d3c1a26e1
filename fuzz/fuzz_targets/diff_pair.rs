//! A differencing child and its parent opened as a chain: chain reads equal the layers composed by hand.
//! The body (and its oracles) is `vhdkit_fuzz_targets::diff_pair`, which `cargo test` also runs on
//! the committed corpus.
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| vhdkit_fuzz_targets::diff_pair(data));
