//! A bounded, deterministic mutation run of the `checkpoint_state` target in `cargo test`: the
//! committed seeds (a real checkpoint of the tiny test guest) with bytes flipped, inserted,
//! deleted and spliced; every other input resealed (flag bit 0), so mutations also reach the
//! JSON parsers and the cross-checks behind the checksums. The real fuzzing is
//! `cargo fuzz run checkpoint_state`.

use std::fs;
use std::path::Path;

#[test]
fn mutated_checkpoints_never_break_the_decoder() {
    let corpus = vhdkit_tests::workspace_root().join("fuzz/corpus/checkpoint_state");
    let mut seeds: Vec<(String, Vec<u8>)> = fs::read_dir(&corpus)
        .unwrap()
        .flatten()
        .filter(|e| e.file_name().to_string_lossy().starts_with("seed-"))
        .map(|e| {
            let name = e.file_name().to_string_lossy().into_owned();
            (name, fs::read(e.path()).unwrap())
        })
        .collect();
    seeds.sort();
    assert!(!seeds.is_empty(), "no seeds in {}", corpus.display());
    // The seeds decode, so the mutations start on the round-trip oracle's path.
    for (name, seed) in &seeds {
        let (_, manifest, state) = vhdkit_fuzz_targets::checkpoint_parts(seed).unwrap();
        vmm::state::decode_checkpoint(Path::new("seed"), manifest, |_, _| Ok(state.to_vec()))
            .unwrap_or_else(|e| panic!("{name}: {e}"));
    }
    let inputs = vhdkit_fuzz_targets::mutations(&seeds, 0x9e37_79b9_7f4a_7c15, 2000, 4);
    for (round, mut v) in inputs.enumerate() {
        if let Some(flags) = v.first_mut() {
            *flags = (*flags & !1) | u8::from(round % 2 == 0);
        }
        vhdkit_fuzz_targets::checkpoint_state(&v);
    }
}
