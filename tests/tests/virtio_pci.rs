//! End-to-end test of `vhdtool boot --transport pci`: the stock Debian cloud kernel finds its
//! disk as a virtio-pci function (1af4:1042, bound to `virtio-pci`, MSI-X vectors) on the
//! VMM's PCI host bridge, writes a pattern through it and reads it back; the host finds the
//! pattern in the image. The same image is then booted with `--transport mmio`, and with
//! `--transport pci` again for a guest booted with `pci=nomsi`, whose driver falls back to the
//! function's INTA# (an IO-APIC line, no MSI-X vectors) and does the same work through it. Each
//! guest times an uncached read of the whole disk (printed, never asserted).
//!
//! ```text
//!  host: disk.raw (noise) + L2 initramfs (busybox, virtio-pci and virtio-mmio modules,
//!        tests/boot/l2-pci.sh, pattern.bin)
//!   ├─ direct (hardware KVM): vhdtool boot --transport pci, then mmio, then pci + pci=nomsi
//!   └─ nested: the same three boots inside L1 (see nested/mod.rs; run under
//!      `flock /work/nested.lock`), disk.raw comes back out of the scratch disk
//!  host: the E2E: lines; pattern.bin at 1 MiB of disk.raw, the rest unchanged
//! ```

use std::fs;
use std::path::Path;
use std::process::Command;

use vhdkit_tests::{fresh_scratch_dir, noise, tool_or_skip, vhdtool_bin};

mod nested;
use nested::{
    dump, kernel, l2_initrd, mode, run_guarded, run_l1, shell_quote, stage_vhdtool, write_exec,
    Kernel, Mode, L1_VHDTOOL,
};

const L2_INIT: &str = include_str!("../boot/l2-pci.sh");
/// Every module either transport needs; the guest loads its transport's in order.
const L2_MODULES: &[&str] = &[
    "virtio_ring",
    "virtio",
    "virtio_mmio",
    "virtio_pci_legacy_dev",
    "virtio_pci_modern_dev",
    "virtio_pci",
    "virtio_blk",
];
const DISK_SIZE: usize = 32 << 20;
/// The guest writes the pattern at 4 KiB block 256.
const PATTERN_OFFSET: usize = 1 << 20;
const PATTERN_LEN: usize = 64 << 10;

/// `vhdtool boot` arguments for the guest's `transport`: pci, mmio, or intx (pci with the
/// guest booted with `pci=nomsi`, so its driver falls back to INTA#).
fn boot_args(base: &str, transport: &str) -> Vec<String> {
    let (vmm_transport, extra) = match transport {
        "intx" => ("pci", " pci=nomsi"),
        t => (t, ""),
    };
    [
        "boot",
        "--kernel",
        &format!("{base}/vmlinuz"),
        "--initrd",
        &format!("{base}/initrd.cpio"),
        "--memory",
        "256M",
        "--cpus",
        "2",
        "--transport",
        vmm_transport,
        "--disk",
        &format!("{base}/disk.raw"),
        "--cmdline",
        &format!("quiet e2e_transport={transport}{extra}"),
    ]
    .iter()
    .map(|s| s.to_string())
    .collect()
}

fn run_direct(dir: &Path) -> String {
    let mut all = String::new();
    for transport in ["pci", "mmio", "intx"] {
        let mut cmd = Command::new(vhdtool_bin());
        cmd.args(boot_args(&dir.display().to_string(), transport));
        let (code, out) = run_guarded(cmd, "vhdtool boot");
        assert_eq!(
            code,
            Some(0),
            "vhdtool boot --transport {transport}:\n{out}"
        );
        all.push_str(&out);
    }
    all
}

fn run_nested(dir: &Path, kernel: &Kernel) -> String {
    let stage = dir.join("stage");
    fs::create_dir_all(&stage).unwrap();
    for f in ["disk.raw", "vmlinuz", "initrd.cpio"] {
        fs::rename(dir.join(f), stage.join(f)).unwrap();
    }
    stage_vhdtool(&stage);
    let args = |t: &str| -> String {
        let v: Vec<String> = boot_args("/work", t)
            .iter()
            .map(|a| shell_quote(a))
            .collect();
        v.join(" ")
    };
    // The pci VM also serves the API: a checkpoint (its disk is raw, which cannot take the
    // differencing child a checkpoint needs) and a migration to a port nobody listens on are
    // refused, nothing is left in the checkpoint folder, and the VM runs on (it may still be
    // booting; the refusals do not depend on the guest).
    write_exec(
        &stage.join("run.sh"),
        &format!(
            "export VHDKIT_VMM_EXIT_STATS=1\n\
             {L1_VHDTOOL} {} --api-socket /work/api.sock </dev/null &\n\
             vmm=$!\n\
             i=0; until [ -S /work/api.sock ]; do i=$((i+1)); [ $i -gt 300 ] && exit 9; sleep 0.1; done\n\
             r=$({L1_VHDTOOL} vm checkpoint --api-socket /work/api.sock /work/ck 2>&1); rc=$?\n\
             echo \"L1: checkpoint reply rc=$rc $(echo $r)\"\n\
             r=$({L1_VHDTOOL} vm migrate --api-socket /work/api.sock tcp:127.0.0.1:9 2>&1); rc=$?\n\
             echo \"L1: migrate reply rc=$rc $(echo $r)\"\n\
             echo \"L1: checkpoint files $(ls /work/ck 2>/dev/null | wc -l)\"\n\
             echo \"L1: status after $({L1_VHDTOOL} vm status --json --api-socket /work/api.sock 2>&1)\"\n\
             wait $vmm || {{ echo \"L1: pci boot failed\"; exit 1; }}\n\
             {L1_VHDTOOL} {} </dev/null || {{ echo \"L1: mmio boot failed\"; exit 1; }}\n\
             {L1_VHDTOOL} {} </dev/null || {{ echo \"L1: intx boot failed\"; exit 1; }}\n",
            args("pci"),
            args("mmio"),
            args("intx")
        ),
    );
    // run_l1 repeats a run in which an L2 vCPU triple-faulted under QEMU TCG once (seen here
    // 0.5 s into a boot, before the guest's first port or MMIO access).
    let (out, scratch) = run_l1(dir, &stage, kernel, "256M");
    assert!(
        out.contains("L1: vhdtool exit status 0"),
        "vhdtool boot did not exit 0 inside L1:\n{out}"
    );
    dump(&scratch, "disk.raw", &dir.join("disk.raw"));
    out
}

#[test]
fn guest_finds_its_disk_as_a_virtio_pci_function_with_msix_and_writes_reach_the_image() {
    for tool in ["apt-get", "dpkg-deb", "cpio", "mkfs.ext4", "debugfs"] {
        assert!(tool_or_skip(tool), "{tool} is needed");
    }
    let mode = mode();
    eprintln!("virtio-pci test mode: {mode:?}");
    let dir = fresh_scratch_dir();
    let kernel = kernel();
    let original = noise(0x5eed, DISK_SIZE);
    fs::write(dir.join("disk.raw"), &original).unwrap();
    let pattern = noise(31337, PATTERN_LEN);
    l2_initrd(
        &kernel,
        &dir.join("l2root"),
        L2_INIT,
        L2_MODULES,
        &[("pattern.bin", &pattern)],
        &dir.join("initrd.cpio"),
    );
    fs::copy(&kernel.vmlinuz, dir.join("vmlinuz")).unwrap();

    let out = match mode {
        Mode::Direct => run_direct(&dir),
        Mode::Nested => run_nested(&dir, &kernel),
    };
    for line in out
        .lines()
        .filter(|l| l.contains("E2E:") || l.contains("L1:") || l.contains("port/MMIO exits"))
    {
        println!("{line}");
    }
    assert!(
        !out.contains("E2E: FAIL"),
        "the guest reported a failure:\n{out}"
    );
    for marker in [
        "E2E: transport=pci",
        "E2E: vda on pci 0000:00:01.0",
        "E2E: msi_irqs",
        "E2E: vda queues=2",
        "E2E: transport=mmio",
        "E2E: transport=intx",
        "E2E: intx irq",
    ] {
        assert!(out.contains(marker), "no {marker:?} from the guest:\n{out}");
    }
    assert_eq!(out.matches("E2E: pattern ok").count(), 3, "{out}");
    if mode == Mode::Nested {
        for (refused, why) in [
            (
                "L1: checkpoint reply",
                "a raw image cannot have a differencing child",
            ),
            ("L1: migrate reply", "cannot connect"),
        ] {
            let line = out
                .lines()
                .find(|l| l.contains(refused))
                .unwrap_or_default();
            assert!(
                line.contains(why) && line.contains("rc=1"),
                "{refused}: not refused with {why:?}:\n{out}"
            );
        }
        assert!(
            out.contains("L1: checkpoint files 0"),
            "a checkpoint was written:\n{out}"
        );
        assert!(
            out.lines()
                .any(|l| l.contains("L1: status after") && l.contains("running")),
            "the VM did not run on:\n{out}"
        );
    }
    assert_eq!(out.matches("E2E: done").count(), 3, "{out}");
    assert!(
        out.lines()
            .any(|l| l.contains("E2E: irq") && l.contains("PCI-MSI")),
        "no MSI interrupt line in /proc/interrupts:\n{out}"
    );
    assert!(
        out.contains("E2E: pci 0000:00:00.0 0x1b36:0x0008 class=0x060000"),
        "no host bridge:\n{out}"
    );

    let disk = fs::read(dir.join("disk.raw")).unwrap();
    assert_eq!(disk.len(), DISK_SIZE);
    assert!(
        disk[PATTERN_OFFSET..PATTERN_OFFSET + PATTERN_LEN] == pattern[..],
        "the pattern is not in the image"
    );
    assert!(disk[..PATTERN_OFFSET] == original[..PATTERN_OFFSET]);
    assert!(disk[PATTERN_OFFSET + PATTERN_LEN..] == original[PATTERN_OFFSET + PATTERN_LEN..]);
    let _ = fs::remove_dir_all(&dir);
}
