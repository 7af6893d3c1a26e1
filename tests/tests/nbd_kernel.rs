//! Linux's own NBD client against `vhdtool serve`: the kernel's nbd.ko, configured by Debian's
//! nbd-client (netlink, two connections, TCP loopback), carries an ext4 file system on a
//! dynamic VHDX served by vhdtool.
//!
//! ```text
//!  host: disk.vhdx (256 MiB, 1 MiB blocks) with a known pattern at 1 MiB
//!  L1 (tests/nbd/kernel-client.sh): insmod nbd; vhdtool serve --listen 127.0.0.1:10809;
//!      nbd-client -C 2; the pattern reads back through /dev/nbd0; mkfs.ext4; six 6 MiB
//!      files; three deleted and trimmed (mount -o discard, fstrim); umount; disconnect;
//!      SIGTERM to serve → exit 0
//!  host: vhdtool check finds leaks at most, and after compact nothing; qemu-img check clean; e2fsck -fn clean on the raw bytes; the
//!      three files' sha256 as L1 printed them; the trimmed blocks are gone from the image
//! ```
//!
//! The kernel is no NBD client on this host (no nbd module), so the test always runs in the
//! L1 Linux of the nested harness (qemu TCG, no KVM needed), under the flock the caller takes
//! (`flock /work/nested.lock cargo test …` on the shared machine).

use std::fs;
use std::path::Path;
use std::process::Command;

use vhdkit_tests::{fresh_scratch_dir, noise, output, run, tool_or_skip, vhdtool};

mod nested;
use nested::{kernel, l1_command, module, run_l1, stage_program, stage_vhdtool, L1_VHDTOOL};

const SCRIPT: &str = include_str!("../nbd/kernel-client.sh");
const MIB: u64 = 1 << 20;

/// The value of the `T: <key> …` line.
fn t_line<'a>(out: &'a str, key: &str) -> &'a str {
    let tag = format!("T: {key} ");
    out.lines()
        .find_map(|l| l.split_once(&tag).map(|(_, rest)| rest.trim()))
        .unwrap_or_else(|| panic!("no {tag:?} line:\n{out}"))
}

fn sha256(path: &Path) -> String {
    let o = run(Command::new("sha256sum").arg(path));
    String::from_utf8_lossy(&o.stdout)
        .split_whitespace()
        .next()
        .unwrap()
        .to_string()
}

/// Bytes of the image's data blocks, from `vhdtool map --json`.
fn allocated(img: &Path) -> u64 {
    let o = run(vhdtool().args(["map", "--json"]).arg(img));
    let runs: Vec<serde_json::Value> = serde_json::from_slice(&o.stdout).unwrap();
    runs.iter()
        .filter(|r| r["data"] == true)
        .map(|r| r["length"].as_u64().unwrap())
        .sum()
}

#[test]
fn kernel_nbd_client_carries_ext4_on_a_served_vhdx_with_trim() {
    for tool in [
        "apt-get",
        "dpkg-deb",
        "cpio",
        "mkfs.ext4",
        "debugfs",
        "e2fsck",
        "nbd-client",
        "mke2fs",
        "qemu-img",
    ] {
        assert!(tool_or_skip(tool), "{tool} is needed");
    }
    let dir = fresh_scratch_dir();
    let kernel = kernel();
    let stage = dir.join("stage");
    fs::create_dir_all(&stage).unwrap();

    let img = stage.join("disk.vhdx");
    let size = 256 * MIB;
    run(vhdtool()
        .arg("create")
        .arg(&img)
        .arg(size.to_string())
        .args(["--block-size", "1M"]));
    let pattern = dir.join("pattern");
    fs::write(&pattern, noise(17, 64 * 1024)).unwrap();
    run(vhdtool()
        .arg("write")
        .arg(&img)
        .args(["--offset", &MIB.to_string(), "--input"])
        .arg(&pattern));

    stage_vhdtool(&stage);
    let nbd_client = output(Command::new("sh").args(["-c", "command -v nbd-client"]));
    let nbd_client = String::from_utf8_lossy(&nbd_client.stdout)
        .trim()
        .to_string();
    stage_program(&stage, Path::new(&nbd_client), "nbd-client");
    let mke2fs = output(Command::new("sh").args(["-c", "command -v mke2fs"]));
    let mke2fs = String::from_utf8_lossy(&mke2fs.stdout).trim().to_string();
    stage_program(&stage, Path::new(&mke2fs), "mke2fs");
    if Path::new("/etc/mke2fs.conf").exists() {
        fs::copy("/etc/mke2fs.conf", stage.join("mke2fs.conf")).unwrap();
    }
    fs::copy(module(&kernel.modules, "nbd"), stage.join("nbd.ko")).unwrap();
    nested::write_exec(
        &stage.join("run.sh"),
        &format!(
            "W=/work\nV='{L1_VHDTOOL}'\nNBDC='{}'\nMKE2FS='{}'\n{SCRIPT}",
            l1_command("nbd-client"),
            l1_command("mke2fs")
        ),
    );
    let (out, scratch) = run_l1(&dir, &stage, &kernel, "1G");
    assert!(!out.contains("T: FAIL"), "L1 script failed:\n{out}");
    assert_eq!(t_line(&out, "size"), size.to_string(), "{out}");
    assert_eq!(t_line(&out, "pattern"), sha256(&pattern), "{out}");
    assert_ne!(
        t_line(&out, "discard"),
        "0",
        "the kernel saw no TRIM support:\n{out}"
    );
    assert_eq!(t_line(&out, "serve exit"), "0", "{out}");

    let img = dir.join("disk.vhdx");
    nested::dump(&scratch, "disk.vhdx", &img);
    // Blocks the guest trimmed leave their file space unused until compact moves blocks into
    // it: check reports that as leaks (exit 3, as qemu-img check does), never as corruption.
    let o = output(vhdtool().arg("check").arg(&img));
    let said = String::from_utf8_lossy(&o.stdout);
    assert!(
        o.status.code() == Some(0) || (o.status.code() == Some(3) && said.contains("leaked")),
        "vhdtool check after the kernel's writes and trims: {o:?}"
    );
    let before = fs::metadata(&img).unwrap().len();
    run(vhdtool().arg("compact").arg(&img));
    run(vhdtool().arg("check").arg(&img));
    let after = fs::metadata(&img).unwrap().len();
    eprintln!("compact: {} → {} MiB", before / MIB, after / MIB);
    run(Command::new("qemu-img")
        .args(["check", "-f", "vhdx"])
        .arg(&img));
    let raw = dir.join("disk.raw");
    run(vhdtool().arg("convert").arg(&img).arg(&raw));
    run(Command::new("e2fsck").arg("-fn").arg(&raw));
    for f in ["f1", "f3", "f5"] {
        let got = dir.join(f);
        run(Command::new("debugfs")
            .arg("-R")
            .arg(format!("dump /{f} {}", got.display()))
            .arg(&raw));
        assert_eq!(sha256(&got), t_line(&out, &format!("sum {f}")), "{f}");
    }
    // 36 MiB of files were written and 18 MiB of them deleted and trimmed: with TRIM reaching
    // the image, what stays allocated is the live files plus ext4's metadata and journal.
    let kept = allocated(&img);
    eprintln!("allocated after trim: {} MiB", kept / MIB);
    assert!(
        kept < 36 * MIB,
        "trimmed blocks stayed allocated: {kept} bytes"
    );
}
