//! The virtio-blk device model under a fuzzer-controlled driver: guest memory, descriptors,
//! avail rings, queues, engine, features and disk format from the input, checked against the
//! harness's own reading of every chain and a flat disk model.
//! The body (and its oracles) is `vhdkit_fuzz_targets::virtio_blk`, which `cargo test` also runs
//! on the committed corpus.
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| vhdkit_fuzz_targets::virtio_blk(data));
