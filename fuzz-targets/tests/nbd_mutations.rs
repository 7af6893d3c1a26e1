//! A bounded, deterministic mutation run of the `nbd_server` target in `cargo test`: each seed
//! with bytes flipped, inserted, deleted and spliced from another seed, so the server's
//! parsing sees damaged handshakes, options and requests even where cargo-fuzz is not
//! installed. The real fuzzing is `cargo fuzz run nbd_server` (fuzz/README.md).

#[test]
fn mutated_nbd_sessions_never_break_the_server() {
    let seeds = vhdkit_fuzz_targets::nbd_server_seeds();
    let mut x: u64 = 0x9e37_79b9_7f4a_7c15;
    let mut next = move || {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        x
    };
    for round in 0..250 {
        let (_, base) = &seeds[round % seeds.len()];
        let mut v = base.clone();
        for _ in 0..1 + next() % 6 {
            let at = (next() as usize) % v.len().max(1);
            match next() % 5 {
                0 => v[at] ^= 1 << (next() % 8),
                1 => v[at] = next() as u8,
                2 => v.insert(at, next() as u8),
                3 if v.len() > 2 => {
                    v.remove(at);
                }
                _ => {
                    let (_, other) = &seeds[(next() as usize) % seeds.len()];
                    let from = (next() as usize) % other.len();
                    let n = ((next() as usize) % 64).min(other.len() - from);
                    v.splice(at..at, other[from..from + n].iter().copied());
                }
            }
        }
        vhdkit_fuzz_targets::nbd_server(&v);
    }
    vhdkit_fuzz_targets::cleanup();
}
