//! Deterministic seed mutations, for the bounded mutation runs in `cargo test` (where
//! cargo-fuzz is not installed): each input is a seed with 1 to `max_edits` edits — a bit
//! flipped, a byte replaced, inserted or deleted, or up to 64 bytes spliced in from another
//! seed — chosen by an xorshift generator, so every run tests the same inputs.

/// `rounds` mutated inputs, seed `round % seeds.len()` for round `round`.
pub fn mutations<S>(
    seeds: &[(S, Vec<u8>)],
    state: u64,
    rounds: usize,
    max_edits: u64,
) -> impl Iterator<Item = Vec<u8>> + '_ {
    let mut x = state | 1;
    let mut next = move || {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        x
    };
    (0..rounds).map(move |round| {
        let mut v = seeds[round % seeds.len()].1.clone();
        for _ in 0..1 + next() % max_edits {
            let at = (next() as usize) % v.len().max(1);
            match next() % 5 {
                0 if !v.is_empty() => v[at] ^= 1 << (next() % 8),
                1 if !v.is_empty() => v[at] = next() as u8,
                3 if v.len() > 2 => {
                    v.remove(at);
                }
                4 => {
                    let other = &seeds[(next() as usize) % seeds.len()].1;
                    if !other.is_empty() {
                        let from = (next() as usize) % other.len();
                        let n = ((next() as usize) % 64).min(other.len() - from);
                        v.splice(at..at, other[from..from + n].iter().copied());
                    }
                }
                _ => v.insert(at.min(v.len()), next() as u8),
            }
        }
        v
    })
}
