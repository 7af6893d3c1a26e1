//! End-to-end test of `vhdtool boot`: the stock Debian cloud kernel boots with a GPT VHDX
//! (ext4 partition with a known file) as /dev/vda, a differencing VHD child as /dev/vdb and a
//! raw image given read-only as /dev/vdc, on 2 vCPUs.
//!
//! ```text
//!  host: images + L2 initramfs (busybox, virtio modules, tests/boot/l2-init.sh)
//!   ├─ direct (hardware KVM): vhdtool boot here
//!   └─ nested (/dev/kvm is kvm_pvm, or no /dev/kvm): qemu-system-x86_64 -accel tcg
//!        -cpu qemu64,+svm,+npt runs L1 = the same kernel + tests/boot/l1-init.sh, which loads
//!        kvm-amd and runs vhdtool boot from a scratch ext4 disk holding everything; the images
//!        come back out of that disk with debugfs
//!  guest: hash of the known file, writes /guest.txt and a pattern on the child, checks the
//!         read-only disk, 2 CPUs, reboot -f  → vhdtool exits 0
//!  host: vhdtool check clean, guest.txt in the VHDX's ext4 (debugfs), pattern in the child,
//!        parent and read-only image byte-identical
//! ```
//!
//! Kernel and busybox come from Debian packages (`apt-get download linux-image-cloud-amd64`'s
//! kernel package, busybox-static, qemu-system-x86); the kernel is cached under
//! `target/vmm-e2e/`. `VHDKIT_BOOT_MODE=direct|nested` forces a mode; `VHDKIT_BOOT_CMDLINE`
//! replaces the guest's extra command line (`quiet`). The only time limit is a
//! hang guard (10 minutes) that kills the VM and fails with its output.

use std::fs;
use std::io::{BufRead, BufReader, Write};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};
use vhdkit_tests::noise;

use vhdkit_tests::{fresh_scratch_dir, output, run, tool_or_skip, vhdtool, vhdtool_bin};

const L1_INIT: &str = include_str!("../boot/l1-init.sh");
const L2_INIT: &str = include_str!("../boot/l2-init.sh");
/// Modules the guest loads, in order (no depmod in the initramfs).
const L2_MODULES: &[&str] = &["virtio_ring", "virtio", "virtio_mmio", "virtio_blk"];
/// Modules L1 loads: KVM for AMD (nested SVM) and virtio-pci for its scratch disk.
const L1_MODULES: &[&str] = &[
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
const HANG_GUARD: Duration = Duration::from_secs(600);
const GUEST_TEXT: &str = "written by the guest through virtio-blk\n";
/// The child's pattern goes to 2 MiB (the guest writes at 4 KiB block 512).
const PATTERN_OFFSET: u64 = 2 << 20;
const PATTERN_LEN: usize = 64 << 10;
/// The ext4 partition of the VHDX: 1 MiB to 31 MiB of a 64 MiB disk.
const PART_START: u64 = 1 << 20;
const PART_LEN: u64 = 30 << 20;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Mode {
    Direct,
    Nested,
}

fn mode() -> Mode {
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

fn sha256(path: &Path) -> String {
    let out = run(Command::new("sha256sum").arg(path));
    String::from_utf8_lossy(&out.stdout)
        .split_whitespace()
        .next()
        .unwrap()
        .to_string()
}

fn sh(script: &str) -> Command {
    let mut c = Command::new("sh");
    c.arg("-ec").arg(script);
    c
}

/// The Debian kernel package, extracted under `target/vmm-e2e/kernel` (downloaded once).
struct Kernel {
    vmlinuz: PathBuf,
    modules: PathBuf,
}

fn cache_dir() -> PathBuf {
    let target = std::env::var_os("CARGO_TARGET_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| vhdkit_tests::workspace_root().join("target"));
    target.join("vmm-e2e")
}

fn kernel() -> Kernel {
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
fn module(modules: &Path, name: &str) -> PathBuf {
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

/// A static busybox (busybox-static).
fn busybox() -> PathBuf {
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
fn cpio(root: &Path, out: &Path) {
    run(sh(&format!(
        "cd '{}' && find . | cpio -o -H newc --quiet > '{}'",
        root.display(),
        out.display()
    )));
}

/// What the host expects back.
struct Expect {
    pattern: Vec<u8>,
    parent_sha: String,
    ro_sha: String,
}

/// disk.vhdx (GPT, ext4 partition with known.bin), parent.vhd + child.vhd, ro.raw; and the L2
/// initramfs at `initrd`.
fn make_images(dir: &Path, kernel: &Kernel, initrd: &Path) -> Expect {
    let work = dir.join("build");
    fs::create_dir_all(work.join("content")).unwrap();
    fs::write(work.join("content/known.bin"), noise(0x9e37_79b9, 1 << 20)).unwrap();
    let known_sha = sha256(&work.join("content/known.bin"));
    let p1 = work.join("p1.img");
    run(Command::new("mkfs.ext4")
        .args(["-q", "-F", "-b", "4096", "-d"])
        .arg(work.join("content"))
        .arg(&p1)
        .arg(format!("{}k", PART_LEN >> 10)));
    let raw = work.join("disk.raw");
    fs::File::create(&raw).unwrap().set_len(64 << 20).unwrap();
    let mut sfdisk = Command::new("sfdisk");
    sfdisk
        .args(["-q", "--no-reread", "--no-tell-kernel"])
        .arg(&raw);
    sfdisk.stdin(Stdio::piped()).stdout(Stdio::null());
    let mut child = sfdisk.spawn().expect("run sfdisk");
    write!(
        child.stdin.take().unwrap(),
        "label: gpt\nstart={}, size={}, type=linux\n",
        PART_START / 512,
        PART_LEN / 512
    )
    .unwrap();
    assert!(child.wait().unwrap().success(), "sfdisk failed");
    run(sh(&format!(
        "dd if='{}' of='{}' bs=1M seek={} conv=notrunc status=none",
        p1.display(),
        raw.display(),
        PART_START >> 20
    )));
    run(vhdtool()
        .args(["convert", "-O", "vhdx", "--type", "dynamic"])
        .arg(&raw)
        .arg(dir.join("disk.vhdx")));

    // Differencing VHD: the parent starts with "PARENT"; the child is created beside it with a
    // relative name so it still finds the parent once copied elsewhere.
    run(vhdtool()
        .args(["create", "--type", "dynamic", "parent.vhd", "16M"])
        .current_dir(dir));
    let mut w = vhdtool();
    w.args(["write", "parent.vhd", "--offset", "0", "--input", "-"])
        .current_dir(dir)
        .stdin(Stdio::piped());
    let mut child = w.spawn().unwrap();
    child
        .stdin
        .take()
        .unwrap()
        .write_all(b"PARENT data of the differencing test\n")
        .unwrap();
    assert!(child.wait().unwrap().success());
    run(vhdtool()
        .args(["create", "--parent", "parent.vhd", "child.vhd"])
        .current_dir(dir));
    fs::write(dir.join("ro.raw"), noise(77, 4 << 20)).unwrap();

    // L2 initramfs.
    let root = work.join("initrd");
    for d in ["bin", "dev", "proc", "sys", "mods", "mnt"] {
        fs::create_dir_all(root.join(d)).unwrap();
    }
    fs::copy(busybox(), root.join("bin/busybox")).unwrap();
    for m in L2_MODULES {
        fs::copy(
            module(&kernel.modules, m),
            root.join(format!("mods/{m}.ko")),
        )
        .unwrap();
    }
    write_exec(&root.join("init"), L2_INIT);
    fs::write(
        root.join("expected.sha256"),
        format!("{known_sha}  known.bin\n"),
    )
    .unwrap();
    let pattern = noise(4242, PATTERN_LEN);
    fs::write(root.join("pattern.bin"), &pattern).unwrap();
    cpio(&root, initrd);

    Expect {
        pattern,
        parent_sha: sha256(&dir.join("parent.vhd")),
        ro_sha: sha256(&dir.join("ro.raw")),
    }
}

fn write_exec(path: &Path, text: &str) {
    use std::os::unix::fs::PermissionsExt;
    fs::write(path, text).unwrap();
    fs::set_permissions(path, fs::Permissions::from_mode(0o755)).unwrap();
}

/// The `vhdtool boot` arguments, with paths under `base`.
fn boot_args(base: &str, kernel: &str, initrd: &str) -> Vec<String> {
    vec![
        "boot".into(),
        "--kernel".into(),
        kernel.into(),
        "--initrd".into(),
        initrd.into(),
        "--memory".into(),
        "256M".into(),
        "--cpus".into(),
        "2".into(),
        "--disk".into(),
        format!("{base}/disk.vhdx"),
        "--disk".into(),
        format!("{base}/child.vhd"),
        "--disk".into(),
        format!("{base}/ro.raw,read-only"),
        "--cmdline".into(),
        // VHDKIT_BOOT_CMDLINE replaces "quiet" (e.g. "" to see the whole kernel log).
        std::env::var("VHDKIT_BOOT_CMDLINE").unwrap_or_else(|_| "quiet".into()),
    ]
}

/// Runs `cmd`, collecting stdout and stderr lines (echoed to stderr), killing it after the hang
/// guard. Returns (exit code, output).
fn run_guarded(mut cmd: Command, what: &str) -> (Option<i32>, String) {
    cmd.stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    let start = Instant::now();
    let mut child = cmd.spawn().unwrap_or_else(|e| panic!("start {what}: {e}"));
    let log = Arc::new(Mutex::new(String::new()));
    let mut readers = Vec::new();
    for stream in [
        Box::new(child.stdout.take().unwrap()) as Box<dyn std::io::Read + Send>,
        Box::new(child.stderr.take().unwrap()),
    ] {
        let log = log.clone();
        readers.push(std::thread::spawn(move || {
            for line in BufReader::new(stream).lines() {
                let Ok(line) = line else { break };
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
        if start.elapsed() > HANG_GUARD {
            let _ = child.kill();
            let _ = child.wait();
            for r in readers {
                let _ = r.join();
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
    (status.code(), out)
}

fn run_direct(dir: &Path, kernel: &Kernel, initrd: &Path) -> String {
    let mut cmd = Command::new(vhdtool_bin());
    cmd.env("VHDKIT_VMM_EXIT_STATS", "1").args(boot_args(
        &dir.display().to_string(),
        &kernel.vmlinuz.display().to_string(),
        &initrd.display().to_string(),
    ));
    let (code, out) = run_guarded(cmd, "vhdtool boot");
    assert_eq!(code, Some(0), "vhdtool boot failed:\n{out}");
    out
}

fn shell_quote(s: &str) -> String {
    format!("'{}'", s.replace('\'', "'\\''"))
}

fn run_nested(dir: &Path, kernel: &Kernel, initrd: &Path) -> String {
    assert!(
        tool_or_skip("qemu-system-x86_64"),
        "qemu-system-x86_64 is needed for the nested boot test"
    );
    let stage = dir.join("stage");
    fs::create_dir_all(stage.join("lib")).unwrap();
    for f in ["disk.vhdx", "parent.vhd", "child.vhd", "ro.raw"] {
        fs::rename(dir.join(f), stage.join(f)).unwrap();
    }
    fs::copy(&kernel.vmlinuz, stage.join("vmlinuz")).unwrap();
    fs::copy(initrd, stage.join("initrd.cpio")).unwrap();
    // vhdtool without debug info, and the libraries it links (loaded through their own ld.so).
    let bin = stage.join("vhdtool");
    let stripped = output(
        Command::new("objcopy")
            .arg("--strip-debug")
            .arg(vhdtool_bin())
            .arg(&bin),
    );
    if !stripped.status.success() {
        fs::copy(vhdtool_bin(), &bin).unwrap();
    }
    let ldd = run(Command::new("ldd").arg(vhdtool_bin()));
    for line in String::from_utf8_lossy(&ldd.stdout).lines() {
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
    let args: Vec<String> = boot_args("/work", "/work/vmlinuz", "/work/initrd.cpio")
        .iter()
        .map(|a| shell_quote(a))
        .collect();
    write_exec(
        &stage.join("run.sh"),
        &format!(
            "export VHDKIT_VMM_EXIT_STATS=1\n\
             exec /work/lib/ld-linux-x86-64.so.2 --library-path /work/lib /work/vhdtool {} </dev/null\n",
            args.join(" ")
        ),
    );
    let scratch = dir.join("scratch.ext4");
    run(Command::new("mkfs.ext4")
        .args(["-q", "-F", "-d"])
        .arg(&stage)
        .arg(&scratch)
        .arg("512M"));

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
    let (code, out) = run_guarded(qemu, "L1 (qemu-system-x86_64 -accel tcg)");
    assert_eq!(code, Some(0), "qemu failed:\n{out}");
    assert!(out.contains("L1: end"), "L1 did not finish:\n{out}");
    assert!(
        out.contains("L1: vhdtool exit status 0"),
        "vhdtool boot did not exit 0 inside L1:\n{out}"
    );
    // The images come back out of the scratch disk.
    for f in ["disk.vhdx", "parent.vhd", "child.vhd", "ro.raw"] {
        run(Command::new("debugfs")
            .arg("-R")
            .arg(format!("dump /{f} {}", dir.join(f).display()))
            .arg(&scratch));
        assert!(dir.join(f).exists(), "debugfs did not dump {f}");
    }
    out
}

#[test]
fn debian_kernel_boots_from_vhdx_and_differencing_vhd_and_writes_reach_the_images() {
    for tool in [
        "apt-get",
        "dpkg-deb",
        "cpio",
        "mkfs.ext4",
        "sfdisk",
        "debugfs",
        "e2fsck",
    ] {
        assert!(tool_or_skip(tool), "{tool} is needed");
    }
    let mode = mode();
    eprintln!("boot test mode: {mode:?}");
    let dir = fresh_scratch_dir();
    let kernel = kernel();
    let initrd = dir.join("l2-initrd.cpio");
    let expect = make_images(&dir, &kernel, &initrd);

    let out = match mode {
        Mode::Direct => run_direct(&dir, &kernel, &initrd),
        Mode::Nested => run_nested(&dir, &kernel, &initrd),
    };

    // What the guest saw.
    assert!(
        !out.contains("E2E: FAIL"),
        "the guest reported a failure:\n{out}"
    );
    for marker in [
        "E2E: cpus=2",
        "E2E: vda queues=2",
        "E2E: hash ok",
        "E2E: pattern ok",
        "E2E: ro ok",
        "E2E: done",
    ] {
        assert!(out.contains(marker), "no {marker:?} from the guest:\n{out}");
    }
    // The guest reboots (i8042), or powers off (ACPI S5) with `e2e_poweroff` in
    // VHDKIT_BOOT_CMDLINE.
    let ending = if std::env::var("VHDKIT_BOOT_CMDLINE").is_ok_and(|c| c.contains("e2e_poweroff")) {
        "vhdtool: guest powered off; disks flushed"
    } else {
        "vhdtool: guest rebooted; disks flushed"
    };
    assert!(out.contains(ending), "no {ending:?}:\n{out}");
    for line in out
        .lines()
        .filter(|l| l.contains("E2E:") || l.contains("L1:"))
    {
        println!("{line}");
    }

    // The images, on the host.
    for img in ["disk.vhdx", "child.vhd", "parent.vhd"] {
        let c = output(vhdtool().arg("check").arg(dir.join(img)));
        assert!(
            c.status.success(),
            "vhdtool check {img}: {}\n{}{}",
            c.status,
            String::from_utf8_lossy(&c.stdout),
            String::from_utf8_lossy(&c.stderr)
        );
    }
    assert_eq!(
        sha256(&dir.join("parent.vhd")),
        expect.parent_sha,
        "the parent changed"
    );
    assert_eq!(
        sha256(&dir.join("ro.raw")),
        expect.ro_sha,
        "the read-only disk changed"
    );
    let pattern = run(vhdtool()
        .arg("read")
        .arg(dir.join("child.vhd"))
        .args(["--offset", &PATTERN_OFFSET.to_string()])
        .args(["--length", &PATTERN_LEN.to_string()]));
    assert!(
        pattern.stdout == expect.pattern,
        "the pattern is not in the child"
    );
    let p1 = dir.join("p1-after.img");
    let part = run(vhdtool()
        .arg("read")
        .arg(dir.join("disk.vhdx"))
        .args(["--offset", &PART_START.to_string()])
        .args(["--length", &PART_LEN.to_string()]));
    fs::write(&p1, &part.stdout).unwrap();
    let fsck = output(Command::new("e2fsck").arg("-fn").arg(&p1));
    assert!(
        fsck.status.success(),
        "e2fsck of the partition: {}\n{}",
        fsck.status,
        String::from_utf8_lossy(&fsck.stdout)
    );
    let cat = run(Command::new("debugfs")
        .arg("-R")
        .arg("cat /guest.txt")
        .arg(&p1));
    assert_eq!(String::from_utf8_lossy(&cat.stdout), GUEST_TEXT);
    // Kept on failure for a look; about 100 MB otherwise.
    let _ = fs::remove_dir_all(&dir);
}
