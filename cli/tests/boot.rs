//! `vhdtool boot` with tiny hand-assembled guests on the machine's own `/dev/kvm` (hardware KVM
//! or the PVM software hypervisor: a few instructions run fine on either). They check the
//! 64-bit boot protocol state at the entry, the serial port, and every way out: i8042 reset
//! (exit 0), ACPI S5 (exit 0), a panic line before the reset (exit 1), an unexpected triple
//! fault (exit 1 naming the exit, RIP and the instruction bytes) — quickly and without
//! hanging. The full Debian-kernel boot is `tests/tests/boot.rs`.
//!
//! Without a usable `/dev/kvm` these tests print SKIP and pass, except under `CI=true`, where
//! they fail (CI machines have one).

use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};

mod support;
use support::tiny_guest::{bzimage, Asm};
use support::vm_process::kvm_or_skip;

fn vhdtool() -> Command {
    Command::new(env!("CARGO_BIN_EXE_vhdtool"))
}

struct Run {
    out: Output,
    stdout: String,
    stderr: String,
}

/// Guest code that runs each of `checks` (a compare instruction) followed by `jne fail`; when
/// all pass it prints `message`, resets and parks; `fail` (right after) is `ud2`, a triple fault
/// since there is no IDT.
fn checks_then_print(checks: &[&[u8]], message: &str) -> Asm {
    let ok_path = Asm::default().print(message).reset().park().0;
    let mut code = Asm::default();
    for (i, c) in checks.iter().enumerate() {
        let rest: usize =
            checks[i + 1..].iter().map(|c| c.len() + 2).sum::<usize>() + ok_path.len();
        code = code.raw(c).raw(&[0x75, u8::try_from(rest).unwrap()]);
    }
    code.raw(&ok_path).raw(&[0x0f, 0x0b])
}

fn boot(dir: &Path, code: Asm, extra: &[&str]) -> Run {
    let kernel: PathBuf = dir.join("tiny.bzImage");
    std::fs::write(&kernel, bzimage(&code.0)).unwrap();
    let out = vhdtool()
        .arg("boot")
        .arg("--kernel")
        .arg(&kernel)
        .args(if extra.contains(&"--memory") {
            &[][..]
        } else {
            &["--memory", "128M"][..]
        })
        .args(extra)
        .stdin(Stdio::null())
        .output()
        .unwrap();
    Run {
        stdout: String::from_utf8_lossy(&out.stdout).into_owned(),
        stderr: String::from_utf8_lossy(&out.stderr).into_owned(),
        out,
    }
}

#[test]
fn entry_state_follows_the_64_bit_boot_protocol_and_reset_exits_0() {
    if !kvm_or_skip() {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    // At the entry RSI points to boot_params: boot_flag 0xaa55 at 0x1fe, cmd_line_ptr 0x20000 at
    // 0x228, three e820 entries (count at 0x1e8), and the command line starts "console=ttyS0".
    // Any mismatch jumps to `ud2` (a triple fault: no IDT).
    let checks: &[&[u8]] = &[
        &[0x66, 0x81, 0xbe, 0xfe, 0x01, 0, 0, 0x55, 0xaa], // cmp word [rsi+0x1fe], 0xaa55
        &[0x81, 0xbe, 0x28, 0x02, 0, 0, 0x00, 0x00, 0x02, 0x00], // cmp dword [rsi+0x228], 0x20000
        &[0x80, 0xbe, 0xe8, 0x01, 0, 0, 0x03],             // cmp byte [rsi+0x1e8], 3
        &[
            0x81, 0x3c, 0x25, 0x00, 0x00, 0x02, 0x00, b'c', b'o', b'n', b's',
        ], // cmp dword [0x20000], "cons"
    ];
    let code = checks_then_print(checks, "entry ok\n");
    let r = boot(dir.path(), code, &["--cpus", "2"]);
    assert!(
        r.out.status.success(),
        "status {}: stdout {:?} stderr {:?}",
        r.out.status,
        r.stdout,
        r.stderr
    );
    assert_eq!(r.stdout, "entry ok\n");
    assert!(r.stderr.contains("guest rebooted"), "{}", r.stderr);
}

#[test]
fn acpi_s5_powers_off_with_exit_0() {
    if !kvm_or_skip() {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let code = Asm::default()
        .print("bye\n")
        .dx(0x600)
        .out((5 << 2) | (1 << 5))
        .park();
    let r = boot(dir.path(), code, &[]);
    assert!(r.out.status.success(), "{}: {}", r.out.status, r.stderr);
    assert_eq!(r.stdout, "bye\n");
    assert!(r.stderr.contains("guest powered off"), "{}", r.stderr);
}

#[test]
fn a_panic_line_before_the_reset_exits_1() {
    if !kvm_or_skip() {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let code = Asm::default()
        .print("[ 1.0] Kernel panic - not syncing: test\n")
        .reset()
        .park();
    let r = boot(dir.path(), code, &[]);
    assert_eq!(r.out.status.code(), Some(1), "{}", r.stderr);
    assert!(
        r.stderr.contains("the guest kernel panicked"),
        "{}",
        r.stderr
    );
    assert!(r.stderr.contains("not syncing: test"), "{}", r.stderr);
}

#[test]
fn an_unexpected_triple_fault_exits_1_with_rip_and_instruction_bytes() {
    if !kvm_or_skip() {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    // ud2 with an empty IDT: #UD → #GP → #DF → triple fault.
    let r = boot(dir.path(), Asm::default().raw(&[0x0f, 0x0b]), &[]);
    assert_eq!(r.out.status.code(), Some(1), "{}", r.stderr);
    assert!(r.stderr.contains("triple fault"), "{}", r.stderr);
    assert!(r.stderr.contains("RIP=0x100200"), "{}", r.stderr);
    assert!(r.stderr.contains("bytes at RIP"), "{}", r.stderr);
    assert!(r.stderr.contains(": 0f 0b"), "{}", r.stderr);
}

#[test]
fn a_triple_fault_after_the_restart_message_is_a_reboot() {
    if !kvm_or_skip() {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    // What `reboot=t` does: print, then fault with no IDT.
    let code = Asm::default()
        .print("reboot: Restarting system\n")
        .raw(&[0x0f, 0x0b]);
    let r = boot(dir.path(), code, &[]);
    assert!(r.out.status.success(), "{}: {}", r.out.status, r.stderr);
    assert!(r.stderr.contains("guest rebooted"), "{}", r.stderr);
}

#[test]
fn bad_kernels_and_configurations_fail_with_a_message() {
    if !kvm_or_skip() {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let junk = dir.path().join("junk");
    std::fs::write(&junk, vec![0x5au8; 8192]).unwrap();
    let out = vhdtool()
        .args(["boot", "--kernel"])
        .arg(&junk)
        .stdin(Stdio::null())
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(1));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("cannot load the kernel"), "{err}");

    let r = boot(dir.path(), Asm::default().reset(), &["--cpus", "0"]);
    assert_eq!(r.out.status.code(), Some(1));
    assert!(r.stderr.contains("--cpus"), "{}", r.stderr);
    let r = boot(
        dir.path(),
        Asm::default().reset(),
        &["--disk", "/nonexistent/disk.vhdx"],
    );
    assert_eq!(r.out.status.code(), Some(1));
    assert!(r.stderr.contains("/nonexistent/disk.vhdx"), "{}", r.stderr);
}

#[test]
fn an_instruction_kvm_cannot_emulate_exits_1_naming_the_internal_error() {
    if !kvm_or_skip() {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    // mov eax, 0xd0000000; fld tbyte [rax]: an x87 load from MMIO (no device there) that KVM's
    // instruction emulator does not handle.
    let code = Asm::default()
        .raw(&[0xb8, 0x00, 0x00, 0x00, 0xd0, 0xdb, 0x28])
        .park();
    let r = boot(dir.path(), code, &[]);
    eprintln!("{}", r.stderr);
    assert_eq!(r.out.status.code(), Some(1), "{}", r.stderr);
    assert!(r.stderr.contains("KVM_EXIT_INTERNAL_ERROR"), "{}", r.stderr);
    assert!(r.stderr.contains("db 28"), "{}", r.stderr);
}

#[test]
fn sigterm_stops_a_spinning_guest_cleanly_with_exit_1() {
    if !kvm_or_skip() {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let disk = dir.path().join("d.raw");
    std::fs::write(&disk, vec![0u8; 1 << 20]).unwrap();
    let child = spinning_guest(dir.path(), &disk, &["--cpus", "2"]);
    let out = sigterm(child);
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{err}");
    assert!(err.contains("stopped by SIGTERM"), "{err}");
}

#[test]
fn stdin_reaches_the_guest_through_the_uart() {
    use std::io::Write;
    if !kvm_or_skip() {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let kernel = dir.path().join("echo.bzImage");
    // poll: mov dx, 0x3fd; in al, dx; test al, 1; jz poll   (LSR: data ready)
    //       mov dx, 0x3f8; in al, dx; out dx, al             (echo the byte)
    let code = Asm::default()
        .raw(&[0x66, 0xba, 0xfd, 0x03, 0xec, 0xa8, 0x01, 0x74, 0xf7])
        .raw(&[0x66, 0xba, 0xf8, 0x03, 0xec, 0xee])
        .print("\n")
        .reset()
        .park();
    std::fs::write(&kernel, bzimage(&code.0)).unwrap();
    let mut child = vhdtool()
        .arg("boot")
        .arg("--kernel")
        .arg(&kernel)
        .args(["--memory", "128M"])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    child.stdin.take().unwrap().write_all(b"Z").unwrap();
    let out = child.wait_with_output().unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{}: {err}", out.status);
    assert_eq!(String::from_utf8_lossy(&out.stdout), "Z\n");
}

#[test]
fn memory_above_the_3g_hole_continues_at_4g_in_the_e820() {
    if !kvm_or_skip() {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    // Four e820 entries; the fourth (at 0x2d0 + 3 * 20) starts at 4 GiB: low dword 0, high 1.
    let checks: &[&[u8]] = &[
        &[0x80, 0xbe, 0xe8, 0x01, 0, 0, 0x04], // cmp byte [rsi+0x1e8], 4
        &[0x81, 0xbe, 0x0c, 0x03, 0, 0, 0, 0, 0, 0], // cmp dword [rsi+0x30c], 0
        &[0x81, 0xbe, 0x10, 0x03, 0, 0, 1, 0, 0, 0], // cmp dword [rsi+0x310], 1
    ];
    let code = checks_then_print(checks, "e820 ok\n");
    let r = boot(dir.path(), code, &["--memory", "5G"]);
    assert!(r.out.status.success(), "{}: {}", r.out.status, r.stderr);
    assert_eq!(r.stdout, "e820 ok\n");
}

/// A guest that prints "spinning" and then spins in KVM_RUN (jmp $), booted over `disk` with
/// `extra` arguments; returns once it printed.
fn spinning_guest(dir: &Path, disk: &Path, extra: &[&str]) -> std::process::Child {
    use std::io::BufRead;
    let kernel = dir.join("spin.bzImage");
    let code = Asm::default().print("spinning\n").raw(&[0xeb, 0xfe]);
    std::fs::write(&kernel, bzimage(&code.0)).unwrap();
    let mut child = vhdtool()
        .arg("boot")
        .arg("--kernel")
        .arg(&kernel)
        .args(["--memory", "128M"])
        .args(extra)
        .arg("--disk")
        .arg(disk)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let mut line = String::new();
    std::io::BufReader::new(child.stdout.take().unwrap())
        .read_line(&mut line)
        .unwrap();
    assert_eq!(line, "spinning\n");
    child
}

fn sigterm(child: std::process::Child) -> Output {
    let kill = Command::new("kill")
        .args(["-TERM", &child.id().to_string()])
        .status()
        .unwrap();
    assert!(kill.success());
    child.wait_with_output().unwrap()
}

#[test]
fn a_running_guest_holds_its_disk_against_every_other_writer_and_unshared_reader() {
    if !kvm_or_skip() {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let disk = dir.path().join("d.vhdx");
    let o = vhdtool()
        .args(["create", "--type", "dynamic"])
        .arg(&disk)
        .arg("64M")
        .output()
        .unwrap();
    assert!(o.status.success(), "{o:?}");
    let child = spinning_guest(dir.path(), &disk, &[]);
    let input = dir.path().join("in");
    std::fs::write(&input, [9u8; 512]).unwrap();
    let before = std::fs::read(&disk).unwrap();
    let refused = |args: &[&std::ffi::OsStr]| {
        let o = vhdtool().args(args).output().unwrap();
        let err = String::from_utf8_lossy(&o.stderr).into_owned();
        assert!(
            !o.status.success() && err.contains("in use"),
            "{args:?}: {err}"
        );
    };
    let d = disk.as_os_str();
    refused(&[
        "write".as_ref(),
        d,
        "--offset".as_ref(),
        "0".as_ref(),
        "--input".as_ref(),
        input.as_os_str(),
    ]);
    refused(&["info".as_ref(), d]);
    refused(&["resize".as_ref(), d, "+1M".as_ref()]);
    // A second VM on the same disk.
    let kernel = dir.path().join("spin.bzImage");
    refused(&[
        "boot".as_ref(),
        "--kernel".as_ref(),
        kernel.as_os_str(),
        "--disk".as_ref(),
        d,
    ]);
    let o = vhdtool()
        .args(["info", "--force-share"])
        .arg(&disk)
        .output()
        .unwrap();
    assert!(o.status.success(), "{o:?}");
    assert_eq!(
        std::fs::read(&disk).unwrap(),
        before,
        "a refused verb wrote the disk"
    );
    let out = sigterm(child);
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("stopped by SIGTERM"), "{err}");
    // Once the VMM is gone, the disk is free again.
    let o = vhdtool().args(["check"]).arg(&disk).output().unwrap();
    assert_eq!(o.status.code(), Some(0), "{o:?}");
}

#[test]
fn boot_warns_first_when_dev_kvm_is_a_software_hypervisor() {
    if !kvm_or_skip() {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let r = boot(dir.path(), Asm::default().reset(), &[]);
    assert_eq!(r.out.status.code(), Some(0), "{}", r.stderr);
    let pvm = Path::new("/sys/module/kvm_pvm").exists();
    let first = r.stderr.lines().next().unwrap_or("");
    assert_eq!(
        first.contains("warning") && first.contains("kvm_pvm"),
        pvm,
        "kvm_pvm loaded: {pvm}; stderr: {}",
        r.stderr
    );
}

#[test]
fn a_guest_whose_console_reader_went_away_still_exits_0_with_its_disks_flushed() {
    if !kvm_or_skip() {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let kernel = dir.path().join("chatty.bzImage");
    let code = Asm::default().print(&"chatter\n".repeat(64)).reset().park();
    std::fs::write(&kernel, bzimage(&code.0)).unwrap();
    let disk = dir.path().join("d.raw");
    std::fs::write(&disk, vec![0u8; 1 << 20]).unwrap();
    let mut child = vhdtool()
        .arg("boot")
        .arg("--kernel")
        .arg(&kernel)
        .args(["--memory", "128M", "--disk"])
        .arg(&disk)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    drop(child.stdout.take()); // the reader goes away before the guest says anything
    let out = child.wait_with_output().unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(0), "{}: {err}", out.status);
    assert!(
        err.contains("disks flushed") && !err.contains("panicked"),
        "{err}"
    );
}
