//! What the vhdtool end-to-end tests share: running the built binary and reading its answer.
#![allow(dead_code)] // each test file uses its own subset

pub mod nbd_peer;
pub mod pci_guest;
pub mod tiny_guest;
pub mod vm_process;

use std::ffi::OsStr;
use std::path::Path;
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};

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

/// A process holding an image until dropped (stdin closed, then killed if still running).
pub struct Holder(pub Child);

impl Drop for Holder {
    fn drop(&mut self) {
        drop(self.0.stdin.take());
        let deadline = Instant::now() + Duration::from_secs(10);
        while Instant::now() < deadline {
            if let Ok(Some(_)) = self.0.try_wait() {
                return;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// `vhdtool write IMG --input -` with a stdin that stays open: it holds IMG open for writing.
pub fn vhdtool_writer(img: &Path) -> Holder {
    let child = Command::new(env!("CARGO_BIN_EXE_vhdtool"))
        .args([OsStr::new("write"), img.as_os_str()])
        .args(["--offset", "0", "--input", "-"])
        .stdin(Stdio::piped())
        .stdout(Stdio::null())
        .spawn()
        .expect("spawn vhdtool write");
    wait_for_lock_byte(img, 101);
    Holder(child)
}

/// Waits until some process holds a lock on `byte` of `img`, as /proc/locks shows (looking
/// takes no lock: a probing open could itself refuse the holder it waits for).
pub fn wait_for_lock_byte(img: &Path, byte: u64) {
    use std::os::unix::fs::MetadataExt;
    let ino = std::fs::metadata(img).unwrap().ino();
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let locks = std::fs::read_to_string("/proc/locks").unwrap();
        let found = locks.lines().any(|l| {
            let f: Vec<&str> = l.split_whitespace().collect();
            // "1: OFDLCK ADVISORY READ -1 fe:00:1234 100 101"
            f.len() >= 8
                && f[5].rsplit(':').next() == Some(&ino.to_string())
                && f[6].parse::<u64>().is_ok_and(|a| a <= byte)
                && f[7].parse::<u64>().is_ok_and(|b| b >= byte)
        });
        if found {
            return;
        }
        assert!(
            Instant::now() < deadline,
            "nothing took the lock of {img:?}"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
}
