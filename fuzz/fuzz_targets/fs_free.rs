//! Arbitrary bytes (raw or sparse-encoded) as a volume, scanned as ext2/3/4, NTFS, FAT and
//! exFAT. The body (and its oracles) is `vhdkit_fuzz_targets::fs_free`, which `cargo test` also
//! runs on the committed corpus.
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| vhdkit_fuzz_targets::fs_free(data));
