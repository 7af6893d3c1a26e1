//! A bounded, deterministic mutation run of the `migration_stream` target in `cargo test`:
//! each seed with bytes flipped, inserted, deleted and spliced from another seed (CRCs
//! recomputed for half of them, so mutations also reach past the checksums), for where
//! cargo-fuzz is not installed. The real fuzzing is `cargo fuzz run migration_stream`.

/// Recomputes the header's and every record's CRC-32C, as far as the framing can be followed.
fn reseal(v: &mut [u8]) {
    if v.len() < 14 {
        return;
    }
    let vlen = usize::from(u16::from_le_bytes([v[12], v[13]])).min(64);
    let mut at = 14 + vlen;
    if at + 4 > v.len() {
        return;
    }
    let crc = crc32c::crc32c(&v[..at]);
    v[at..at + 4].copy_from_slice(&crc.to_le_bytes());
    at += 4;
    while at + 8 <= v.len() {
        let len = u32::from_le_bytes(v[at + 4..at + 8].try_into().unwrap()) as usize;
        let end = at + 8 + len;
        if end + 4 > v.len() {
            return;
        }
        let crc = crc32c::crc32c(&v[at..end]);
        v[end..end + 4].copy_from_slice(&crc.to_le_bytes());
        at = end + 4;
    }
}

#[test]
fn mutated_migration_streams_never_break_the_decoder() {
    let seeds = vhdkit_fuzz_targets::migration_stream_seeds();
    let inputs = vhdkit_fuzz_targets::mutations(&seeds, 0x2545_f491_4f6c_dd1d, 2000, 4);
    for (round, mut v) in inputs.enumerate() {
        if round % 2 == 0 {
            reseal(&mut v);
        }
        vhdkit_fuzz_targets::migration_stream(&v);
    }
}
