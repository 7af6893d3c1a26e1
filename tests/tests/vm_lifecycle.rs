//! End-to-end test of the VM control API with the stock Debian kernel: `vhdtool boot
//! --api-socket`, `vhdtool vm status | pause | resume | shutdown`.
//!
//! ```text
//!  guest (tests/vm/l2-counter.sh): COUNTER n every 0.2 s, n → sector 0 of /dev/vda (fsync);
//!         waits for the ACPI power button (GED → PNP0C0C → evdev), then powers off
//!  script (tests/vm/lifecycle.sh): boot; status; pause → counter stands still 3 s; resume →
//!         it goes on; shutdown → the guest sees the button and powers off; VMM exits 0;
//!         the image is free (vhdtool check takes its lock)
//!  host: the T: lines, and the counter in the image = the last one the guest printed
//! ```
//!
//! The checkpoint test (tests/vm/checkpoint.sh) takes a checkpoint of that guest while it
//! runs (it keeps running), kills the VMM, restores the checkpoint twice at the same time
//! (the counter and uptime go on from the checkpoint, no boot messages, each restore on its
//! own differencing child) and feeds a truncated state and a changed frozen layer.
//!
//! The live migration test (tests/vm/migrate.sh) moves that guest between two VMM processes
//! over TCP loopback while it writes its disk (the counter goes on at the target, no boot
//! messages, the source exits 0), prints the guest-visible pause and the migration's figures,
//! then migrates it again to a target killed half-way (the guest runs on; `migrate` fails).
//!
//! The checkpoint test runs on a dynamic VHDX (restores on .avhdx children) and on a dynamic
//! VHD (restores on .vhd children); the migration test on a dynamic VHDX and on a differencing
//! VHD whose parent must come out unchanged. The VHDX guests have their disk on virtio-pci
//! with MSI-X (the PCI function's config space and vectors travel in the state), the VHD
//! guests on virtio-mmio; the guest loads the drivers of both.
//!
//! Runs directly on hardware KVM, else nested (see `nested/mod.rs`) under the flock the
//! caller takes (`flock /work/nested.lock cargo test …` on the shared machine).

use std::fs;
use std::path::{Path, PathBuf};
use std::process::Command;

use vhdkit_tests::{fresh_scratch_dir, run, tool_or_skip, vhdtool, vhdtool_bin};

mod nested;
use nested::{
    kernel, l2_initrd, mode, run_guarded, run_l1, stage_vhdtool, write_exec, Kernel, Mode,
    L1_VHDTOOL,
};

const L2_INIT: &str = include_str!("../vm/l2-counter.sh");
const SCRIPT: &str = include_str!("../vm/lifecycle.sh");
const CHECKPOINT_SCRIPT: &str = include_str!("../vm/checkpoint.sh");
const MIGRATE_SCRIPT: &str = include_str!("../vm/migrate.sh");
const L2_MODULES: &[&str] = &[
    "virtio_ring",
    "virtio",
    "virtio_mmio",
    "virtio_pci_legacy_dev",
    "virtio_pci_modern_dev",
    "virtio_pci",
    "virtio_blk",
    "button",
    "evdev",
];

/// Runs `script` with $W = the files' folder, $V = vhdtool and `vars` (shell assignments),
/// directly or in L1; returns the output. `images` come back into `dir` afterwards.
pub fn run_script(
    dir: &Path,
    kernel: &Kernel,
    script: &str,
    images: &[&str],
    vars: &[(&str, &str)],
) -> String {
    let assign: String = vars.iter().map(|(k, v)| format!("{k}={v}\n")).collect();
    match mode() {
        Mode::Direct => {
            write_exec(&dir.join("run.sh"), &format!("{assign}{script}"));
            let mut sh = Command::new("sh");
            sh.arg(dir.join("run.sh"))
                .env("W", dir)
                .env("V", vhdtool_bin());
            run_guarded(sh, "the test script").1
        }
        Mode::Nested => {
            let stage = dir.join("stage");
            fs::create_dir_all(&stage).unwrap();
            for f in images.iter().chain(&["vmlinuz", "initrd.cpio"]) {
                fs::rename(dir.join(f), stage.join(f)).unwrap();
            }
            stage_vhdtool(&stage);
            write_exec(
                &stage.join("run.sh"),
                &format!("W=/work\nV='{L1_VHDTOOL}'\n{assign}{script}"),
            );
            let (out, scratch) = run_l1(dir, &stage, kernel, "1G");
            for f in images {
                nested::dump(&scratch, f, &dir.join(f));
            }
            out
        }
    }
}

/// A scratch folder with the counter guest's kernel and initramfs and its disk `disk`: a
/// dynamic 16 MiB image of the format its extension names, or for "child.vhd" a differencing
/// VHD over a dynamic "base.vhd". Returns the folder, the kernel and the image files.
fn counter_guest(disk: &str) -> (PathBuf, Kernel, Vec<&str>) {
    for tool in ["apt-get", "dpkg-deb", "cpio", "mkfs.ext4", "debugfs"] {
        assert!(tool_or_skip(tool), "{tool} is needed");
    }
    let dir = fresh_scratch_dir();
    let kernel = kernel();
    fs::copy(&kernel.vmlinuz, dir.join("vmlinuz")).unwrap();
    l2_initrd(
        &kernel,
        &dir.join("l2root"),
        L2_INIT,
        L2_MODULES,
        &[],
        &dir.join("initrd.cpio"),
    );
    let mut images = vec![disk];
    let base = if disk == "child.vhd" {
        images.push("base.vhd");
        Some("base.vhd")
    } else {
        None
    };
    let top = base.unwrap_or(disk);
    run(vhdtool()
        .args(["create", "--type", "dynamic"])
        .arg(dir.join(top))
        .arg("16M"));
    if let Some(base) = base {
        // Parent data the guest never writes over: the migration must not touch it.
        fs::write(dir.join("parent-data"), vhdkit_tests::noise(7, 65536)).unwrap();
        run(vhdtool()
            .arg("write")
            .arg(dir.join(base))
            .args(["--offset", "1048576", "--input"])
            .arg(dir.join("parent-data")));
        run(vhdtool()
            .args(["create", "--parent"])
            .arg(dir.join(base))
            .arg(dir.join(disk)));
    }
    (dir, kernel, images)
}

/// The value of `T: <key> …` lines.
fn t_line<'a>(out: &'a str, key: &str) -> &'a str {
    let tag = format!("T: {key}");
    out.lines()
        .find_map(|l| l.split_once(&tag).map(|(_, rest)| rest.trim()))
        .unwrap_or_else(|| panic!("no {tag:?} line:\n{out}"))
}

#[test]
fn paused_guest_stands_still_resumes_and_powers_off_on_the_acpi_button() {
    let (dir, kernel, images) = counter_guest("disk.vhdx");
    let out = run_script(&dir, &kernel, SCRIPT, &images, &[]);
    for line in out.lines().filter(|l| l.contains("T: ")) {
        println!("{line}");
    }
    assert!(
        !out.contains("T: FAIL") && !out.contains("GUEST: FAIL"),
        "{out}"
    );
    assert!(
        t_line(&out, "status").contains(r#""state":"running""#),
        "{out}"
    );
    assert!(
        out.contains("T: pause ok") && out.contains("T: resume ok"),
        "{out}"
    );
    assert_eq!(t_line(&out, "state"), r#""state":"paused""#);
    let paused: Vec<u64> = t_line(&out, "paused from")
        .split(" to ")
        .map(|n| n.parse().unwrap())
        .collect();
    assert_eq!(paused[0], paused[1], "the counter moved while paused");
    let resumed: u64 = t_line(&out, "resumed at").parse().unwrap();
    assert!(
        resumed > paused[1],
        "the counter did not go on after resume"
    );
    assert!(t_line(&out, "shutdown rc=").starts_with('0'), "{out}");
    assert!(
        out.contains("GUEST: power button pressed"),
        "the guest did not see the power button:\n{out}"
    );
    assert!(out.contains("guest powered off; disks flushed"), "{out}");
    assert_eq!(t_line(&out, "vmm rc="), "0");
    assert_eq!(
        t_line(&out, "check rc="),
        "0",
        "the image is not free or not clean"
    );

    // What the guest wrote last is in the image.
    let last: u64 = t_line(&out, "last counter printed").parse().unwrap();
    let sector = run(vhdtool()
        .arg("read")
        .arg(dir.join("disk.vhdx"))
        .args(["--offset", "0", "--length", "512"]));
    let text = String::from_utf8_lossy(&sector.stdout);
    let on_disk: u64 = text.split('\n').next().unwrap().parse().unwrap();
    assert_eq!(on_disk, last, "the image does not hold the last counter");
    let _ = fs::remove_dir_all(&dir);
}

/// `(counter, uptime)` from "n uptime".
fn counter_uptime(s: &str) -> (u64, f64) {
    let mut it = s.split_whitespace();
    let n = it.next().unwrap().parse().unwrap();
    let t = it.next().unwrap().parse().unwrap();
    (n, t)
}

/// The first disk of a `vm status` reply sits on a PCI slot exactly when `transport` is pci.
fn assert_disk_on(status: &serde_json::Value, transport: &str, who: &str) {
    assert_eq!(
        status["disks"][0]["pci_slot"].is_u64(),
        transport == "pci",
        "{who}: disk not on {transport}: {status}"
    );
}

#[test]
fn checkpointed_guest_runs_on_and_two_restores_continue_its_counter_without_a_reboot() {
    checkpoint_and_restore_twice("disk.vhdx", "pci");
}

#[test]
fn checkpoint_of_a_guest_on_a_vhd_disk_restores_on_vhd_children() {
    checkpoint_and_restore_twice("disk.vhd", "mmio");
}

/// The checkpoint test on `disk` (see `counter_guest`) attached through `transport`: the
/// restores run on children of the disk's own format (.avhdx for VHDX, .vhd for VHD).
fn checkpoint_and_restore_twice(disk: &str, transport: &str) {
    let (dir, kernel, images) = counter_guest(disk);
    let vars = [("D", disk), ("TRANSPORT", transport)];
    let out = run_script(&dir, &kernel, CHECKPOINT_SCRIPT, &images, &vars);
    for line in out.lines().filter(|l| l.contains("T: ")) {
        println!("{line}");
    }
    assert!(
        !out.contains("T: FAIL") && !out.contains("GUEST: FAIL"),
        "{out}"
    );
    assert!(
        t_line(&out, "checkpoint reply").contains("checkpoint in"),
        "{out}"
    );
    let around: Vec<u64> = t_line(&out, "counter around the checkpoint")
        .split(' ')
        .map(|n| n.parse().unwrap())
        .collect();
    let kept: u64 = t_line(&out, "kept running to").parse().unwrap();
    assert!(
        kept > around[1],
        "the guest stopped after the checkpoint:\n{out}"
    );
    let killed: u64 = t_line(&out, "killed at").parse().unwrap();
    let mut children = Vec::new();
    for n in ["restore1", "restore2"] {
        let first = t_line(&out, &format!("{n} first"));
        let (c, uptime) = counter_uptime(first.split(" after ").next().unwrap());
        assert!(
            c >= around[0] && c <= around[1] + 1,
            "{n} continued at {c}, the checkpoint was taken between {} and {}:\n{out}",
            around[0],
            around[1]
        );
        assert!(c < killed, "{n} did not go back to the checkpoint");
        assert!(uptime > 1.0, "{n}: uptime {uptime}: a reboot?");
        let status = t_line(&out, &format!("{n} status"));
        let v: serde_json::Value = serde_json::from_str(status).unwrap();
        assert_eq!(v["state"], "running");
        assert_disk_on(&v, transport, n);
        children.push(v["disks"][0]["path"].as_str().unwrap().to_string());
        let rc = t_line(&out, &format!("{n} vmm rc="));
        assert!(rc.starts_with("0 "), "{n}: {rc}");
    }
    assert_ne!(children[0], children[1], "the restores share a child");
    // Every image checks clean; each restore's child holds its own last counter.
    for line in out
        .lines()
        .filter_map(|l| l.split_once("T: image ").map(|x| x.1))
    {
        assert!(line.contains("check rc=0"), "{line}");
    }
    for (n, child) in ["restore1", "restore2"].iter().zip(&children) {
        let last: u64 = t_line(&out, &format!("{n} vmm rc=0 last")).parse().unwrap();
        let name = Path::new(child).file_name().unwrap().to_string_lossy();
        let line = t_line(&out, &format!("image {name}"));
        assert!(line.ends_with(&format!("counter {last}")), "{n}: {line}");
    }
    let bad = t_line(&out, "truncated");
    assert!(
        bad.contains("vmstate.bin") && bad.contains("offset"),
        "{bad}"
    );
    let changed = t_line(&out, "changed layer");
    assert!(
        changed.contains("changed since the checkpoint"),
        "{changed}"
    );
    let _ = fs::remove_dir_all(&dir);
}

#[test]
fn live_migrated_guest_continues_its_counter_at_the_target_and_survives_a_cut_stream() {
    migrate_twice("disk.vhdx", "pci");
}

#[test]
fn live_migration_of_a_guest_on_a_differencing_vhd_leaves_its_parent_untouched() {
    migrate_twice("child.vhd", "mmio");
}

/// The live migration test on `disk` (see `counter_guest`) attached through `transport`.
fn migrate_twice(disk: &str, transport: &str) {
    let (dir, kernel, images) = counter_guest(disk);
    let base_before = images
        .contains(&"base.vhd")
        .then(|| fs::read(dir.join("base.vhd")).unwrap());
    let vars = [("D", disk), ("TRANSPORT", transport)];
    let out = run_script(&dir, &kernel, MIGRATE_SCRIPT, &images, &vars);
    for line in out.lines().filter(|l| l.contains("T: ")) {
        println!("{line}");
    }
    assert!(
        !out.contains("T: FAIL") && !out.contains("GUEST: FAIL"),
        "{out}"
    );
    let reply = t_line(&out, "migrate rc=");
    assert!(
        reply.starts_with("0 reply migrated to tcp:127.0.0.1:4444"),
        "{out}"
    );
    let source = t_line(&out, "source VMM rc=");
    assert!(source.starts_with("0 "), "the source VMM: {source}\n{out}");
    let src_last: u64 = source.rsplit(' ').next().unwrap().parse().unwrap();
    let (first, uptime) = counter_uptime(t_line(&out, "target first"));
    assert!(
        first == src_last || first == src_last + 1,
        "the target continued at {first}, the source stopped at {src_last}:\n{out}"
    );
    assert!(uptime > 1.0, "target uptime {uptime}: a reboot?");
    let status: serde_json::Value = serde_json::from_str(t_line(&out, "target status")).unwrap();
    assert_eq!(status["state"], "running");
    assert!(status["disks"][0]["path"].as_str().unwrap().ends_with(disk));
    assert_disk_on(&status, transport, "the target");

    // The cut migration failed and the guest went on at the target of the first one.
    let cut = t_line(&out, "cut migrate rc=");
    assert!(
        !cut.starts_with('0') && cut.contains("tcp:127.0.0.1:4445") && cut.contains("runs on here"),
        "{cut}"
    );
    let around: Vec<u64> = t_line(&out, "after the cut counter")
        .split(" to ")
        .map(|n| n.parse().unwrap())
        .collect();
    assert!(
        around[1] > around[0],
        "the guest stopped after the cut:\n{out}"
    );
    assert!(t_line(&out, "after the cut status").contains(r#""state":"running""#));

    // Every write the guest made is in the image, which checks clean.
    let target = t_line(&out, "target VMM rc=");
    assert!(target.starts_with("0 "), "{target}");
    let last: u64 = target.rsplit(' ').next().unwrap().parse().unwrap();
    let image = t_line(&out, "image check rc=");
    assert_eq!(image, format!("0 counter {last}"), "{out}");
    if let Some(before) = base_before {
        assert!(
            fs::read(dir.join("base.vhd")).unwrap() == before,
            "the parent base.vhd was written"
        );
    }
    let _ = fs::remove_dir_all(&dir);
}
