//! End-to-end test of disk hotplug (`vhdtool vm disk-add | disk-remove`) on the pci transport:
//! the stock Debian cloud kernel (acpiphp built in, `CONFIG_HOTPLUG_PCI_ACPI=y`) boots with
//! one disk, then sees each hot-added disk appear through ACPI hotplug (the GED's interrupt,
//! `PCI0.PSCN`, a device check of the slot), writes a pattern to it, and ejects it when asked;
//! `disk-remove` returns after that, the image checks clean and holds the pattern while the VM
//! runs on. Rounds: a VHDX, a VHD, a differencing VHDX, its parent read-only (the write
//! fails), then the VHDX 20 times in a row.
//!
//! ```text
//!  host: images (vhdtool create), L2 initramfs (busybox, virtio-pci modules,
//!        tests/boot/l2-hotplug.sh, pattern.bin), run.sh
//!   └─ nested (L1 under QEMU TCG; `flock /work/nested.lock`) or direct (hardware KVM):
//!      run.sh: vhdtool boot --transport pci --api-socket … >console.log, then per round
//!      disk-add → wait for the guest's "written" → disk-remove → check + read the image
//!  host: the E2E:/L1: lines; pattern in each written image, none in the read-only parent
//! ```

use std::fs;
use std::path::Path;
use std::process::Command;

use vhdkit_tests::{fresh_scratch_dir, noise, tool_or_skip, vhdtool_bin};

mod nested;
use nested::{
    dump, kernel, l2_initrd, mode, run_guarded, run_l1, shell_quote, stage_vhdtool, write_exec,
    Mode, L1_VHDTOOL,
};

const L2_INIT: &str = include_str!("../boot/l2-hotplug.sh");
const L2_MODULES: &[&str] = &[
    "virtio_ring",
    "virtio",
    "virtio_pci_legacy_dev",
    "virtio_pci_modern_dev",
    "virtio_pci",
    "virtio_blk",
];
const PATTERN_OFFSET: u64 = 1 << 20;
const PATTERN_LEN: usize = 64 << 10;
/// Add/remove cycles of one image after the four kinds.
const REPEATS: usize = 20;
/// The images hot-added, in order (`,read-only` as `disk-add` takes it).
const KINDS: &[&str] = &["hot.vhdx", "hot.vhd", "child.vhdx", "base.vhdx,read-only"];

fn vhdtool(args: &[&str], dir: &Path) {
    let o = Command::new(vhdtool_bin())
        .args(args)
        .current_dir(dir)
        .output()
        .unwrap();
    assert!(o.status.success(), "vhdtool {args:?}: {o:?}");
}

/// The script that boots the VM and drives the rounds; `v` runs vhdtool, `w` is the folder.
fn run_script(v: &str, w: &str) -> String {
    let rounds = KINDS.len() + REPEATS;
    let boot = [
        "boot",
        "--kernel",
        &format!("{w}/vmlinuz"),
        "--initrd",
        &format!("{w}/initrd.cpio"),
        "--memory",
        "256M",
        "--cpus",
        "2",
        "--transport",
        "pci",
        "--disk",
        &format!("{w}/boot.vhdx"),
        "--api-socket",
        &format!("{w}/api.sock"),
        "--cmdline",
        &format!("quiet e2e_rounds={rounds}"),
    ]
    .map(shell_quote)
    .join(" ");
    let mut images: Vec<String> = KINDS.iter().map(|k| format!("{w}/{k}")).collect();
    images.extend((0..REPEATS).map(|_| format!("{w}/{}", KINDS[0])));
    format!(
        r#"V="{v}"; W="{w}"; S="$W/api.sock"
# The VM's console goes to a file (printed at the end: one writer per pipe, whole lines).
$V {boot} </dev/null >"$W/console.log" 2>&1 &
vmm=$!
wait_for() {{
    i=0
    until grep -qE "$1" "$W/console.log"; do
        grep -q "E2E: FAIL" "$W/console.log" && return 1
        i=$((i + 1)); [ $i -gt 3000 ] && {{ echo "L1: FAIL no '$1' within 300 s"; return 1; }}
        sleep 0.1
    done
}}
want=$(sha256sum "$W/pattern.bin" | cut -d' ' -f1)
round=0
hot() {{
    round=$((round + 1))
    img="${{1%,read-only}}"
    id=$($V vm disk-add --api-socket "$S" "$1" 2>&1) || {{ echo "L1: FAIL disk-add $1: $id"; return 1; }}
    echo "L1: round $round added $1 as $id"
    wait_for "E2E: round $round .*(written|read-only ok)" || return 1
    r=$($V vm disk-remove --api-socket "$S" --timeout 120 "$id" 2>&1) || {{ echo "L1: FAIL disk-remove $id: $r"; return 1; }}
    echo "L1: round $round removed: $r"
    wait_for "E2E: round $round .* gone" || return 1
    r=$($V check "$img" 2>&1) || {{ echo "L1: FAIL check $img: $r"; return 1; }}
    got=$($V read --offset {PATTERN_OFFSET} --length {PATTERN_LEN} "$img" | sha256sum | cut -d' ' -f1)
    [ "$got" = "$want" ] && p=pattern || p=no-pattern
    echo "L1: round $round $img checks clean, $p, vm $($V vm status --api-socket "$S" | head -1)"
}}
if wait_for "E2E: ready"; then
    for img in {images}; do hot "$img" || break; done
fi
echo "L1: status after the rounds: $($V vm status --json --api-socket "$S" 2>&1)"
wait $vmm
rc=$?
echo "L1: vhdtool boot exit status $rc"
tr -d '\r' <"$W/console.log"
exit $rc
"#,
        images = images
            .iter()
            .map(|i| shell_quote(i))
            .collect::<Vec<_>>()
            .join(" "),
    )
}

#[test]
fn hot_added_disks_appear_in_the_guest_and_leave_drained_flushed_and_closed() {
    for tool in ["apt-get", "dpkg-deb", "cpio", "mkfs.ext4", "debugfs"] {
        assert!(tool_or_skip(tool), "{tool} is needed");
    }
    let mode = mode();
    eprintln!("disk hotplug test mode: {mode:?}");
    let dir = fresh_scratch_dir();
    let kernel = kernel();
    let stage = dir.join("stage");
    fs::create_dir_all(&stage).unwrap();
    let pattern = noise(4242, PATTERN_LEN);
    fs::write(stage.join("pattern.bin"), &pattern).unwrap();
    l2_initrd(
        &kernel,
        &dir.join("l2root"),
        L2_INIT,
        L2_MODULES,
        &[("pattern.bin", &pattern)],
        &stage.join("initrd.cpio"),
    );
    fs::copy(&kernel.vmlinuz, stage.join("vmlinuz")).unwrap();
    vhdtool(&["create", "boot.vhdx", "32M"], &stage);
    vhdtool(&["create", "hot.vhdx", "32M"], &stage);
    vhdtool(&["create", "hot.vhd", "32M"], &stage);
    vhdtool(&["create", "base.vhdx", "32M"], &stage);
    vhdtool(&["create", "--parent", "base.vhdx", "child.vhdx"], &stage);

    let out = match mode {
        Mode::Direct => {
            let w = stage.display().to_string();
            write_exec(
                &stage.join("run.sh"),
                &run_script(&vhdtool_bin().display().to_string(), &w),
            );
            let mut cmd = Command::new("sh");
            cmd.arg(stage.join("run.sh"));
            run_guarded(cmd, "run.sh (vhdtool boot)").1
        }
        Mode::Nested => {
            stage_vhdtool(&stage);
            write_exec(&stage.join("run.sh"), &run_script(L1_VHDTOOL, "/work"));
            let (out, scratch) = run_l1(&dir, &stage, &kernel, "512M");
            for name in ["hot.vhdx", "hot.vhd", "child.vhdx", "base.vhdx"] {
                dump(&scratch, name, &stage.join(name));
            }
            out
        }
    };
    for line in out
        .lines()
        .filter(|l| l.contains("E2E:") || l.contains("L1:"))
    {
        println!("{line}");
    }
    assert!(!out.contains("FAIL"), "a failure:\n{out}");
    let rounds = KINDS.len() + REPEATS;
    assert!(
        out.contains(&format!("E2E: ready for {rounds} rounds")),
        "{out}"
    );
    assert!(
        out.contains("E2E: acpiphp slots 1 "),
        "no ACPI hotplug slots:\n{out}"
    );
    for n in 1..=rounds {
        let removed = format!("L1: round {n} removed: disk{n} removed");
        assert!(out.contains(&removed), "no {removed:?}:\n{out}");
        assert!(
            out.contains(&format!("E2E: round {n} vd")),
            "round {n}:\n{out}"
        );
        let gone = format!("E2E: round {n} vd");
        assert!(
            out.lines()
                .any(|l| l.contains(&gone) && l.contains(" gone")),
            "round {n}: the disk did not leave the guest:\n{out}"
        );
    }
    let ro = format!("E2E: round {} ", KINDS.len());
    assert!(
        out.lines()
            .any(|l| l.contains(&ro) && l.contains("on 0000:00:02.0 read-only ok")),
        "the read-only disk was not in slot 2, or took a write:\n{out}"
    );
    let checked = |n: usize, img: &str, p: &str| {
        let (round, rest) = (
            format!("L1: round {n} "),
            format!("/{img} checks clean, {p}, vm state: running"),
        );
        out.lines().any(|l| l.contains(&round) && l.contains(&rest))
    };
    for (n, img) in [(1, "hot.vhdx"), (2, "hot.vhd"), (3, "child.vhdx")] {
        assert!(checked(n, img, "pattern"), "round {n} {img}:\n{out}");
    }
    assert!(
        checked(4, "base.vhdx", "no-pattern"),
        "the read-only parent changed:\n{out}"
    );
    assert!(checked(rounds, "hot.vhdx", "pattern"), "last round:\n{out}");
    assert!(out.contains("E2E: done"), "{out}");
    assert!(out.contains("L1: vhdtool boot exit status 0"), "{out}");
    assert!(
        out.lines()
            .any(|l| l.contains("L1: status after the rounds") && l.contains("\"id\":\"disk0\"")),
        "{out}"
    );

    // On the host: the pattern in each written image (through its chain), not in the parent.
    let read = |img: &str| {
        let o = Command::new(vhdtool_bin())
            .args(["read", "--offset", &PATTERN_OFFSET.to_string()])
            .args(["--length", &PATTERN_LEN.to_string(), img])
            .current_dir(&stage)
            .output()
            .unwrap();
        assert!(o.status.success(), "read {img}: {o:?}");
        o.stdout
    };
    for img in ["hot.vhdx", "hot.vhd", "child.vhdx"] {
        assert!(read(img) == pattern, "{img} does not hold the pattern");
    }
    assert!(
        read("base.vhdx").iter().all(|&b| b == 0),
        "base.vhdx was written"
    );
    let _ = fs::remove_dir_all(&dir);
}
