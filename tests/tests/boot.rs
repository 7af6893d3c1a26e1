//! End-to-end test of `vhdtool boot`: the stock Debian cloud kernel boots with a GPT VHDX
//! (ext4 partition with a known file) as /dev/vda, a differencing VHD child served by `vhdtool
//! serve` and given as an NBD URI (`--disk nbd+unix:///?socket=…`) as /dev/vdb, and a raw image
//! given read-only as /dev/vdc, on 2 vCPUs.
//!
//! ```text
//!  host: images + L2 initramfs (busybox, virtio modules, tests/boot/l2-init.sh)
//!   ├─ direct (hardware KVM): vhdtool boot here
//!   └─ nested (/dev/kvm is kvm_pvm, or no /dev/kvm): qemu-system-x86_64 -accel tcg
//!        -cpu qemu64,+svm,+npt runs L1 = the same kernel + tests/boot/l1-init.sh, which loads
//!        kvm-amd and runs vhdtool boot from a scratch ext4 disk holding everything; the images
//!        come back out of that disk with debugfs
//!  guest: hash of the known file, writes /guest.txt and a pattern on the child (through the
//!         VMM's NBD client and serve), checks the read-only disk, 2 CPUs, reboot -f
//!         → vhdtool boot exits 0, then serve flushes and exits 0 on SIGTERM
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
use std::io::Write;
use std::path::Path;
use std::process::{Command, Stdio};
use vhdkit_tests::noise;

use vhdkit_tests::{fresh_scratch_dir, output, run, tool_or_skip, vhdtool, vhdtool_bin};

mod nested;
use nested::{
    dump, kernel, l2_initrd, mode, run_guarded, run_l1, sh, shell_quote, stage_vhdtool, write_exec,
    Kernel, Mode, L1_VHDTOOL,
};

const L2_INIT: &str = include_str!("../boot/l2-init.sh");
/// Modules the guest loads, in order (no depmod in the initramfs).
const L2_MODULES: &[&str] = &["virtio_ring", "virtio", "virtio_mmio", "virtio_blk"];
const GUEST_TEXT: &str = "written by the guest through virtio-blk\n";
/// The child's pattern goes to 2 MiB (the guest writes at 4 KiB block 512).
const PATTERN_OFFSET: u64 = 2 << 20;
const PATTERN_LEN: usize = 64 << 10;
/// The ext4 partition of the VHDX: 1 MiB to 31 MiB of a 64 MiB disk.
const PART_START: u64 = 1 << 20;
const PART_LEN: u64 = 30 << 20;

fn sha256(path: &Path) -> String {
    let out = run(Command::new("sha256sum").arg(path));
    String::from_utf8_lossy(&out.stdout)
        .split_whitespace()
        .next()
        .unwrap()
        .to_string()
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
    let pattern = noise(4242, PATTERN_LEN);
    let expected = format!("{known_sha}  known.bin\n");
    l2_initrd(
        kernel,
        &work.join("initrd"),
        L2_INIT,
        L2_MODULES,
        &[
            ("expected.sha256", expected.as_bytes()),
            ("pattern.bin", &pattern),
        ],
        initrd,
    );

    Expect {
        pattern,
        parent_sha: sha256(&dir.join("parent.vhd")),
        ro_sha: sha256(&dir.join("ro.raw")),
    }
}

/// The `vhdtool boot` arguments, with paths under `base`.
/// The differencing VHD reaches the VM through `vhdtool serve` at `socket`.
fn boot_args(base: &str, socket: &str, kernel: &str, initrd: &str) -> Vec<String> {
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
        "--transport".into(),
        "mmio".into(),
        "--disk".into(),
        format!("{base}/disk.vhdx"),
        "--disk".into(),
        format!("nbd+unix:///?socket={socket}"),
        "--disk".into(),
        format!("{base}/ro.raw,read-only"),
        "--cmdline".into(),
        // VHDKIT_BOOT_CMDLINE replaces "quiet" (e.g. "" to see the whole kernel log).
        std::env::var("VHDKIT_BOOT_CMDLINE").unwrap_or_else(|_| "quiet".into()),
    ]
}

fn run_direct(dir: &Path, kernel: &Kernel, initrd: &Path) -> String {
    // A short directory: a Unix socket path has at most 107 bytes.
    let sockdir = tempfile::tempdir().unwrap();
    let socket = sockdir.path().join("child.sock");
    let mut serve = vhdtool()
        .arg("serve")
        .arg("--unix")
        .arg(&socket)
        .arg(dir.join("child.vhd"))
        .stdin(Stdio::null())
        .spawn()
        .unwrap();
    let t = std::time::Instant::now();
    while !socket.exists() {
        assert!(t.elapsed().as_secs() < 30, "vhdtool serve did not listen");
        std::thread::sleep(std::time::Duration::from_millis(20));
    }
    let mut cmd = Command::new(vhdtool_bin());
    cmd.env("VHDKIT_VMM_EXIT_STATS", "1").args(boot_args(
        &dir.display().to_string(),
        &socket.display().to_string(),
        &kernel.vmlinuz.display().to_string(),
        &initrd.display().to_string(),
    ));
    let (code, out) = run_guarded(cmd, "vhdtool boot");
    // SAFETY: kill(2) on our own child's pid, which has not been waited for yet.
    unsafe { libc::kill(serve.id() as i32, libc::SIGTERM) };
    let served = serve.wait().unwrap();
    assert_eq!(code, Some(0), "vhdtool boot failed:\n{out}");
    assert!(served.success(), "vhdtool serve ended with {served}");
    out
}

fn run_nested(dir: &Path, kernel: &Kernel, initrd: &Path) -> String {
    let stage = dir.join("stage");
    fs::create_dir_all(&stage).unwrap();
    for f in ["disk.vhdx", "parent.vhd", "child.vhd", "ro.raw"] {
        fs::rename(dir.join(f), stage.join(f)).unwrap();
    }
    fs::copy(&kernel.vmlinuz, stage.join("vmlinuz")).unwrap();
    fs::copy(initrd, stage.join("initrd.cpio")).unwrap();
    stage_vhdtool(&stage);
    let args: Vec<String> = boot_args(
        "/work",
        "/work/child.sock",
        "/work/vmlinuz",
        "/work/initrd.cpio",
    )
    .iter()
    .map(|a| shell_quote(a))
    .collect();
    write_exec(
        &stage.join("run.sh"),
        &format!(
            "export VHDKIT_VMM_EXIT_STATS=1\n\
             {L1_VHDTOOL} serve --unix /work/child.sock /work/child.vhd </dev/null &\n\
             serve=$!\n\
             i=0; until [ -S /work/child.sock ]; do i=$((i+1)); [ $i -gt 300 ] && exit 9; sleep 0.1; done\n\
             {L1_VHDTOOL} {} </dev/null\n\
             rc=$?\n\
             kill -TERM $serve; wait $serve\n\
             echo \"L1: serve exit status $?\"\n\
             exit $rc\n",
            args.join(" ")
        ),
    );
    let (out, scratch) = run_l1(dir, &stage, kernel, "512M");
    assert!(
        out.contains("L1: vhdtool exit status 0"),
        "vhdtool boot did not exit 0 inside L1:\n{out}"
    );
    assert!(
        out.contains("L1: serve exit status 0"),
        "vhdtool serve did not exit 0 inside L1:\n{out}"
    );
    // The images come back out of the scratch disk.
    for f in ["disk.vhdx", "parent.vhd", "child.vhd", "ro.raw"] {
        dump(&scratch, f, &dir.join(f));
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
