//! What the vhdtool end-to-end tests share: running the built binary and reading its answer.
#![allow(dead_code)] // each test file uses its own subset

use std::ffi::OsStr;
use std::process::{Command, Output};

/// Runs the built `vhdtool` with `args` (of mixed types: `&[&"info", &path]`), capturing
/// everything.
pub fn vhdtool(args: &[&dyn AsRef<OsStr>]) -> Output {
    vhdtool_args(args)
}

/// Runs the built `vhdtool` with `args` of one type, capturing everything.
pub fn vhdtool_args<S: AsRef<OsStr>>(args: &[S]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_vhdtool"))
        .args(args)
        .output()
        .expect("run vhdtool")
}

/// Stdout of a run that must have succeeded (the failure message shows both streams).
pub fn ok(o: &Output) -> String {
    assert!(
        o.status.success(),
        "vhdtool failed ({:?}): {}{}",
        o.status.code(),
        String::from_utf8_lossy(&o.stdout),
        String::from_utf8_lossy(&o.stderr)
    );
    String::from_utf8_lossy(&o.stdout).into_owned()
}

/// Stderr of a run that must have failed.
pub fn fails(o: &Output) -> String {
    assert!(
        !o.status.success(),
        "vhdtool succeeded but should not have: {}",
        String::from_utf8_lossy(&o.stdout)
    );
    String::from_utf8_lossy(&o.stderr).into_owned()
}

/// Stdout of a successful run, parsed as JSON.
pub fn json(o: &Output) -> serde_json::Value {
    serde_json::from_str(&ok(o)).expect("valid JSON")
}

/// The exit code (panics if the process died of a signal).
pub fn code(o: &Output) -> i32 {
    o.status.code().expect("exit code")
}
