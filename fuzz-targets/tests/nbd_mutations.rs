//! A bounded, deterministic mutation run of the `nbd_server` target in `cargo test`: each seed
//! with bytes flipped, inserted, deleted and spliced from another seed, so the server's
//! parsing sees damaged handshakes, options and requests even where cargo-fuzz is not
//! installed. The real fuzzing is `cargo fuzz run nbd_server` (fuzz/README.md).

#[test]
fn mutated_nbd_sessions_never_break_the_server() {
    let seeds = vhdkit_fuzz_targets::nbd_server_seeds();
    for v in vhdkit_fuzz_targets::mutations(&seeds, 0x9e37_79b9_7f4a_7c15, 250, 6) {
        vhdkit_fuzz_targets::nbd_server(&v);
    }
    vhdkit_fuzz_targets::cleanup();
}
