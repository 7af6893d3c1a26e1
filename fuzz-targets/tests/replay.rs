//! Replays every committed fuzz input without libFuzzer: each target's minimized corpus
//! (`fuzz/corpus/<target>/`) and the inputs that once crashed it (`fuzz/regressions/<target>/`).
//! A failure names the target and the file; rerun one with
//! `cargo fuzz run <target> <file>` in `fuzz/` (or this test) to debug it.

use std::path::{Path, PathBuf};

fn inputs(dir: &Path) -> Vec<PathBuf> {
    let mut v: Vec<PathBuf> = match std::fs::read_dir(dir) {
        Ok(rd) => rd
            .flatten()
            .map(|e| e.path())
            .filter(|p| p.is_file())
            .collect(),
        Err(_) => Vec::new(),
    };
    v.sort();
    v
}

fn fuzz_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../fuzz")
}

/// The targets share per-process scratch directories that `cleanup` removes: one replay at a
/// time, so one test's cleanup never pulls a directory from under the other.
static ONE_AT_A_TIME: std::sync::Mutex<()> = std::sync::Mutex::new(());

fn replay(kind: &str, min_inputs: usize) {
    let _turn = ONE_AT_A_TIME.lock().unwrap_or_else(|p| p.into_inner());
    let mut failures = Vec::new();
    for (target, body) in vhdkit_fuzz_targets::TARGETS {
        let files = inputs(&fuzz_dir().join(kind).join(target));
        assert!(
            files.len() >= min_inputs,
            "fuzz/{kind}/{target} holds {} inputs, expected at least {min_inputs}",
            files.len()
        );
        for f in files {
            let data = std::fs::read(&f).unwrap();
            let started = std::time::Instant::now();
            let result = std::panic::catch_unwind(|| body(&data));
            if std::env::var_os("VHDKIT_FUZZ_TIMING").is_some() {
                eprintln!("{:8.3} s  {}", started.elapsed().as_secs_f64(), f.display());
            }
            if let Err(e) = result {
                let msg = e
                    .downcast_ref::<String>()
                    .cloned()
                    .or_else(|| e.downcast_ref::<&str>().map(|s| s.to_string()))
                    .unwrap_or_default();
                failures.push(format!("{target}: {}: {msg}", f.display()));
            }
        }
    }
    vhdkit_fuzz_targets::cleanup();
    assert!(
        failures.is_empty(),
        "{} inputs fail:\n{}",
        failures.len(),
        failures.join("\n")
    );
}

#[test]
fn every_committed_corpus_input_passes_its_target() {
    replay("corpus", 1);
}

#[test]
fn every_committed_regression_input_passes_its_target() {
    replay("regressions", 0);
}
