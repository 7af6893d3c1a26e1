//! The NBD server's handshake, option haggling and request parsing under a fuzzer-chosen client
//! byte stream. The body (and its oracles) is `vhdkit_fuzz_targets::nbd_server`, which
//! `cargo test` also runs on the committed corpus.
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| vhdkit_fuzz_targets::nbd_server(data));
