//! The nested-VM harness shared by the end-to-end VMM tests: where `/dev/kvm` cannot boot a
//! stock kernel (the kvm_pvm software hypervisor) or is absent, an L1 Linux runs under
//! `qemu-system-x86_64 -accel tcg -cpu qemu64,+svm,+npt`, loads kvm-amd and runs the test's
//! `run.sh` from a scratch ext4 disk (`/work` in L1) holding vhdtool, its libraries and the
//! test's files; results come back in L1's console output and out of the scratch disk.
#![allow(dead_code)] // each test file uses its own subset

use std::fs;
use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use vhdkit_tests::{output, run, tool_or_skip, vhdtool_bin};

/// /init of L1.
pub const L1_INIT: &str = include_str!("../../boot/l1-init.sh");
/// How L1's scripts run vhdtool (through the staged ld.so and libraries).
pub const L1_VHDTOOL: &str =
    "/work/lib/ld-linux-x86-64.so.2 --library-path /work/lib /work/vhdtool";

/// Modules L1 loads: KVM for AMD (nested SVM) and virtio-pci for its scratch disk.
pub const L1_MODULES: &[&str] = &[
    "irqbypass",
    "kvm",
    "kvm-amd",
    "virtio_ring",
    "virtio",
    "virtio_pci_legacy_dev",
    "virtio_pci_modern_dev",
    "virtio_pci",
    "virtio_blk",
];
/// Hang guard for one VM run.
pub const HANG_GUARD: Duration = Duration::from_secs(600);
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Mode {
    Direct,
    Nested,
}

pub fn mode() -> Mode {
    match std::env::var("VHDKIT_BOOT_MODE").as_deref() {
        Ok("direct") => return Mode::Direct,
        Ok("nested") => return Mode::Nested,
        Ok("") | Err(_) => {}
        Ok(other) => panic!("VHDKIT_BOOT_MODE must be direct or nested, not {other:?}"),
    }
    if Path::new("/sys/module/kvm_pvm").exists() {
        // The PVM software hypervisor cannot run the stock kernel (emulation failures).
        return Mode::Nested;
    }
    let usable = fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open("/dev/kvm")
        .is_ok();
    if usable {
        Mode::Direct
    } else {
        Mode::Nested
    }
}

pub fn sh(script: &str) -> Command {
    let mut c = Command::new("sh");
    c.arg("-ec").arg(script);
    c
}

/// The Debian kernel package, extracted under `target/vmm-e2e/kernel` (downloaded once).
pub struct Kernel {
    /// The bzImage.
    pub vmlinuz: PathBuf,
    /// `lib/modules/<version>`.
    pub modules: PathBuf,
}

pub fn cache_dir() -> PathBuf {
    let target = std::env::var_os("CARGO_TARGET_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| vhdkit_tests::workspace_root().join("target"));
    target.join("vmm-e2e")
}

pub fn kernel() -> Kernel {
    let dir = cache_dir().join("kernel");
    let done = dir.join(".complete");
    if !done.exists() {
        let _ = fs::remove_dir_all(&dir);
        fs::create_dir_all(dir.join("deb")).unwrap();
        // linux-image-cloud-amd64 is a metapackage: download the kernel package it names.
        let deps = run(Command::new("apt-cache").args(["depends", "linux-image-cloud-amd64"]));
        let deps = String::from_utf8_lossy(&deps.stdout);
        let pkg = deps
            .lines()
            .filter_map(|l| l.trim().strip_prefix("Depends: "))
            .find(|p| p.starts_with("linux-image-"))
            .unwrap_or_else(|| panic!("no kernel package in `apt-cache depends`:\n{deps}"))
            .to_string();
        // Three tries, as .ci/run does for apt-get install: a mirror may hiccup.
        let mut tries = 0;
        loop {
            tries += 1;
            let out = output(
                Command::new("apt-get")
                    .args(["download", "-q", &pkg])
                    .current_dir(dir.join("deb")),
            );
            if out.status.success() {
                break;
            }
            assert!(
                tries < 3,
                "apt-get download {pkg} failed 3 times: {}",
                String::from_utf8_lossy(&out.stderr)
            );
            std::thread::sleep(Duration::from_secs(10 * tries));
        }
        let deb = fs::read_dir(dir.join("deb"))
            .unwrap()
            .flatten()
            .map(|e| e.path())
            .find(|p| p.extension().is_some_and(|e| e == "deb"))
            .expect("apt-get download left no .deb");
        run(Command::new("dpkg-deb")
            .arg("-x")
            .arg(&deb)
            .arg(dir.join("root")));
        fs::remove_dir_all(dir.join("deb")).unwrap();
        fs::write(&done, &pkg).unwrap();
    }
    let boot = dir.join("root/boot");
    let vmlinuz = fs::read_dir(&boot)
        .unwrap()
        .flatten()
        .map(|e| e.path())
        .find(|p| {
            p.file_name()
                .unwrap()
                .to_string_lossy()
                .starts_with("vmlinuz-")
        })
        .expect("no vmlinuz in the kernel package");
    let version = vmlinuz.file_name().unwrap().to_string_lossy()["vmlinuz-".len()..].to_string();
    Kernel {
        vmlinuz,
        modules: dir.join("root/lib/modules").join(version),
    }
}

/// Path of module `name` (`kvm-amd` or `kvm_amd`) under `modules`.
pub fn module(modules: &Path, name: &str) -> PathBuf {
    fn walk(dir: &Path, file: &str) -> Option<PathBuf> {
        for e in fs::read_dir(dir).ok()?.flatten() {
            let p = e.path();
            if p.is_dir() {
                if let Some(f) = walk(&p, file) {
                    return Some(f);
                }
            } else if p.file_name().is_some_and(|n| n == file) {
                return Some(p);
            }
        }
        None
    }
    walk(modules, &format!("{name}.ko"))
        .or_else(|| walk(modules, &format!("{}.ko", name.replace('-', "_"))))
        .unwrap_or_else(|| panic!("module {name} not in {}", modules.display()))
}

/// An L2 guest's initramfs at `out`, built in the folder `root`: a static busybox, `init`,
/// the test kernel's `modules` under /mods, the empty folders a busybox init mounts on, and
/// `files` (name, bytes) at the top.
pub fn l2_initrd(
    kernel: &Kernel,
    root: &Path,
    init: &str,
    modules: &[&str],
    files: &[(&str, &[u8])],
    out: &Path,
) {
    for d in ["bin", "dev", "proc", "sys", "mods", "mnt", "tmp"] {
        fs::create_dir_all(root.join(d)).unwrap();
    }
    fs::copy(busybox(), root.join("bin/busybox")).unwrap();
    for m in modules {
        fs::copy(
            module(&kernel.modules, m),
            root.join(format!("mods/{m}.ko")),
        )
        .unwrap();
    }
    write_exec(&root.join("init"), init);
    for (name, bytes) in files {
        fs::write(root.join(name), bytes).unwrap();
    }
    cpio(root, out);
}

/// A static busybox (busybox-static).
pub fn busybox() -> PathBuf {
    let p = PathBuf::from("/bin/busybox");
    assert!(p.exists(), "/bin/busybox missing (install busybox-static)");
    let ldd = output(Command::new("ldd").arg(&p));
    let text =
        String::from_utf8_lossy(&ldd.stdout).to_string() + &String::from_utf8_lossy(&ldd.stderr);
    assert!(
        text.contains("not a dynamic executable") || text.contains("statically linked"),
        "/bin/busybox is not static (install busybox-static): {text}"
    );
    p
}

/// A newc cpio of `root` at `out` (uncompressed: quick to unpack under TCG).
pub fn cpio(root: &Path, out: &Path) {
    run(sh(&format!(
        "cd '{}' && find . | cpio -o -H newc --quiet > '{}'",
        root.display(),
        out.display()
    )));
}

pub fn write_exec(path: &Path, text: &str) {
    use std::os::unix::fs::PermissionsExt;
    fs::write(path, text).unwrap();
    fs::set_permissions(path, fs::Permissions::from_mode(0o755)).unwrap();
}

/// Runs `cmd`, collecting stdout and stderr lines (echoed to stderr), killing it after the hang
/// guard. Returns (exit code, output).
pub fn run_guarded(cmd: Command, what: &str) -> (Option<i32>, String) {
    let (code, out, _) = run_watched(cmd, what, |_| false, false);
    (code, out)
}

/// [`run_guarded`], but also killing `cmd` as soon as an output line satisfies `fatal`;
/// the third value says whether any line did (also one read after `cmd` had exited), or,
/// with `hang_is_fault`, whether the hang guard killed `cmd` (else that panics).
pub fn run_watched(
    mut cmd: Command,
    what: &str,
    fatal: fn(&str) -> bool,
    hang_is_fault: bool,
) -> (Option<i32>, String, bool) {
    cmd.stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    let start = Instant::now();
    let mut child = cmd.spawn().unwrap_or_else(|e| panic!("start {what}: {e}"));
    let log = Arc::new(Mutex::new(String::new()));
    let seen_fatal = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let mut readers = Vec::new();
    for stream in [
        Box::new(child.stdout.take().unwrap()) as Box<dyn std::io::Read + Send>,
        Box::new(child.stderr.take().unwrap()),
    ] {
        let log = log.clone();
        let seen_fatal = seen_fatal.clone();
        readers.push(std::thread::spawn(move || {
            for line in BufReader::new(stream).lines() {
                let Ok(line) = line else { break };
                if fatal(&line) {
                    seen_fatal.store(true, std::sync::atomic::Ordering::SeqCst);
                }
                let stamped = format!("[{:7.3}] {line}", start.elapsed().as_secs_f64());
                eprintln!("{stamped}");
                let mut l = log.lock().unwrap();
                l.push_str(&stamped);
                l.push('\n');
            }
        }));
    }
    let status = loop {
        if let Some(s) = child.try_wait().unwrap() {
            break s;
        }
        if seen_fatal.load(std::sync::atomic::Ordering::SeqCst) {
            let _ = child.kill();
            let _ = child.wait();
            for r in readers {
                let _ = r.join();
            }
            let out = log.lock().unwrap().clone();
            return (None, out, true);
        }
        if start.elapsed() > HANG_GUARD {
            let _ = child.kill();
            let _ = child.wait();
            for r in readers {
                let _ = r.join();
            }
            if hang_is_fault {
                eprintln!("{what} still running after {HANG_GUARD:?}: killed");
                return (None, log.lock().unwrap().clone(), true);
            }
            panic!(
                "{what} still running after {HANG_GUARD:?}: killed. Output:\n{}",
                log.lock().unwrap()
            );
        }
        std::thread::sleep(Duration::from_millis(100));
    };
    for r in readers {
        let _ = r.join();
    }
    eprintln!(
        "{what}: {status} after {:.1} s",
        start.elapsed().as_secs_f64()
    );
    let out = log.lock().unwrap().clone();
    // A fatal line may come last (a test script prints the L2 consoles at its end), read only
    // after the process exited: it counts all the same.
    let fatal = seen_fatal.load(std::sync::atomic::Ordering::SeqCst);
    (status.code(), out, fatal)
}

pub fn shell_quote(s: &str) -> String {
    format!("'{}'", s.replace('\'', "'\\''"))
}

/// Copies vhdtool (without debug info) and the libraries it links into `stage` and
/// `stage/lib`; L1 runs it as [`L1_VHDTOOL`].
pub fn stage_vhdtool(stage: &Path) {
    stage_program(stage, &vhdtool_bin(), "vhdtool");
}

/// Copies the host program `program` (without debug info) to `stage/name` and the libraries it
/// links into `stage/lib`; L1 runs it as `/work/lib/ld-linux-x86-64.so.2 --library-path
/// /work/lib /work/<name>` (see [`l1_command`]).
pub fn stage_program(stage: &Path, program: &Path, name: &str) {
    fs::create_dir_all(stage.join("lib")).unwrap();
    let bin = stage.join(name);
    let stripped = output(
        Command::new("objcopy")
            .arg("--strip-debug")
            .arg(program)
            .arg(&bin),
    );
    if !stripped.status.success() {
        fs::copy(program, &bin).unwrap();
    }
    let ldd = run(Command::new("ldd").arg(program));
    for line in String::from_utf8_lossy(&ldd.stdout).lines() {
        assert!(!line.contains("not found"), "{}: {line}", program.display());
        let lib = line
            .split("=>")
            .nth(1)
            .unwrap_or(line)
            .split_whitespace()
            .next()
            .unwrap_or("");
        if lib.starts_with('/') {
            let name = Path::new(lib).file_name().unwrap();
            fs::copy(lib, stage.join("lib").join(name)).unwrap();
        }
    }
    assert!(
        stage.join("lib/ld-linux-x86-64.so.2").exists(),
        "no ld.so in ldd output"
    );
}

/// How L1 runs a program staged by [`stage_program`] as `name`.
pub fn l1_command(name: &str) -> String {
    format!("/work/lib/ld-linux-x86-64.so.2 --library-path /work/lib /work/{name}")
}

/// Boots L1 with a scratch ext4 disk of `scratch_size` made from `stage` (which holds
/// `run.sh`), runs it to the end and returns L1's console output and the scratch disk.
pub fn run_l1(dir: &Path, stage: &Path, kernel: &Kernel, scratch_size: &str) -> (String, PathBuf) {
    // QEMU's TCG emulation of nested SVM at times wedges a CPU of L1 or of an L2 guest (issue
    // 20's analysis: halted vCPUs triple-fault or stall at random), resets L1 silently, or
    // leaves it printing nothing. That run is thrown away and L1 boots once more from the
    // untouched stage; a third such run fails the test.
    for attempt in 1..=3 {
        if let Some(done) = run_l1_once(dir, stage, kernel, scratch_size) {
            return done;
        }
        eprintln!("a vCPU wedged under QEMU TCG (L1 or L2): attempt {attempt} discarded");
    }
    panic!(
        "three runs in a row ended in a TCG fault, a reset of L1 or no output until the hang \
         guard (a hang of the script's own would too: see the output above)"
    );
}

/// A sign of QEMU TCG's nested-SVM fault: an RCU stall or soft-lockup report of L1's kernel
/// or of an L2 guest's (lines L1 prints for L2 come prefixed with `[L1 …]`), or vhdtool
/// reporting a triple fault of an L2 vCPU (on AMD, KVM resets it before exiting, so its
/// registers are the reset values). Both kernels have been seen stuck at random, and L2 vCPUs
/// triple-faulting in the guest's `sti; hlt` while the LAPIC timer was delivered. No nested
/// test expects a triple fault; on hardware KVM nothing is retried. Also a panic of L1's own
/// kernel (not an L2 guest's): no user program can cause one, and L1 has been seen dying of
/// "corrupted stack end detected inside scheduler" as a vhdtool vCPU thread exited.
fn tcg_fault(line: &str) -> bool {
    line.contains("rcu_preempt detected stalls")
        || line.contains("BUG: soft lockup")
        || line.contains("triple fault (KVM_EXIT_SHUTDOWN)")
        || (line.contains("Kernel panic - not syncing") && !line.contains("[L1 "))
}

fn run_l1_once(
    dir: &Path,
    stage: &Path,
    kernel: &Kernel,
    scratch_size: &str,
) -> Option<(String, PathBuf)> {
    assert!(
        tool_or_skip("qemu-system-x86_64"),
        "qemu-system-x86_64 is needed for the nested VMM tests"
    );
    let scratch = dir.join("scratch.ext4");
    run(Command::new("mkfs.ext4")
        .args(["-q", "-F", "-d"])
        .arg(stage)
        .arg(&scratch)
        .arg(scratch_size));

    // L1 initramfs.
    let root = dir.join("l1");
    for d in ["bin", "dev", "proc", "sys", "mods", "work"] {
        fs::create_dir_all(root.join(d)).unwrap();
    }
    fs::copy(busybox(), root.join("bin/busybox")).unwrap();
    for m in L1_MODULES {
        fs::copy(
            module(&kernel.modules, m),
            root.join(format!("mods/{m}.ko")),
        )
        .unwrap();
    }
    write_exec(&root.join("init"), L1_INIT);
    let l1_initrd = dir.join("l1.cpio");
    cpio(&root, &l1_initrd);

    let mut qemu = Command::new("qemu-system-x86_64");
    qemu.args([
        "-accel",
        "tcg",
        "-cpu",
        "qemu64,+svm,+npt",
        "-m",
        "2048",
        "-smp",
        "2",
    ])
    .args([
        "-M",
        "pc",
        "-nodefaults",
        "-no-user-config",
        "-display",
        "none",
    ])
    .args(["-serial", "stdio", "-no-reboot"])
    .arg("-kernel")
    .arg(&kernel.vmlinuz)
    .arg("-initrd")
    .arg(&l1_initrd)
    .args(["-append", "console=ttyS0 panic=-1 reboot=k quiet"])
    .arg("-drive")
    .arg(format!(
        "file={},format=raw,if=virtio,cache=unsafe",
        scratch.display()
    ));
    // Every script bounds its own waits and reports through "T: FAIL"/"E2E: FAIL" lines, so an
    // L1 that prints nothing until the hang guard is wedged (L1's vCPUs, under TCG).
    let (code, out, wedged) =
        run_watched(qemu, "L1 (qemu-system-x86_64 -accel tcg)", tcg_fault, true);
    if wedged {
        return None;
    }
    assert_eq!(code, Some(0), "qemu failed:\n{out}");
    if !out.contains("L1: end") {
        // L1's init prints "L1: end" after the script whatever the script did, so L1's kernel
        // reset under it: with `panic=-1` and no message, the silent reset seen under TCG.
        eprintln!("L1 reset before its script ended");
        return None;
    }
    Some((out, scratch))
}

/// Copies `/name` out of the scratch ext4 disk to `to`.
pub fn dump(scratch: &Path, name: &str, to: &Path) {
    run(Command::new("debugfs")
        .arg("-R")
        .arg(format!("dump /{name} {}", to.display()))
        .arg(scratch));
    assert!(to.exists(), "debugfs did not dump {name}");
}
