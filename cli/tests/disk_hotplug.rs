//! `vhdtool vm disk-add | disk-remove` against `vhdtool boot --transport pci` with tiny guests
//! on the machine's own `/dev/kvm` (they run no ACPI; the Linux guest that ejects through
//! ACPI is `tests/tests/disk_hotplug.rs`):
//!
//! - the letters guest ignores hotplug: adds work VMM-side, a removal times out and is
//!   refused with the disk still attached; missing, locked and too many images, unknown ids,
//!   and an mmio VM are refused with clear errors while the VM runs on;
//! - the ejecting guest writes "eject every slot" to the hotplug register in a loop (with
//!   malformed accesses to the block in between), so every removal completes: the reply comes
//!   after the drain, flush and close, the image is free again (a new `disk-add` of it works).
//!
//! Without a usable `/dev/kvm` these tests print SKIP and pass, except under `CI=true`.

use std::path::{Path, PathBuf};
use std::process::Command;

mod support;
use support::tiny_guest::{bzimage, Asm};
use support::vm_process::{dynamic_vhdx, kvm_or_skip, letters_kernel, Vmm};

fn vhdtool() -> Command {
    Command::new(env!("CARGO_BIN_EXE_vhdtool"))
}

/// `vhdtool create FLAGS PATH [SIZE]`.
fn create(path: &Path, flags: &[&str], size: Option<&str>) -> PathBuf {
    let o = vhdtool()
        .arg("create")
        .args(flags)
        .arg(path)
        .args(size)
        .output()
        .unwrap();
    assert!(o.status.success(), "create {}: {o:?}", path.display());
    path.to_path_buf()
}

/// A guest that loops: reads PCIU and PCID, writes all ones (but slot 0) to B0EJ, throws a
/// byte read, a byte write and a straddling word write at the block, prints '.'.
fn ejecting_kernel(dir: &Path) -> PathBuf {
    let mut c = Asm::default();
    c = c.dx(0x700).raw(&[0xed, 0xec]); // in eax, dx; in al, dx
    c = c.dx(0x704).raw(&[0xed]);
    c = c.dx(0x708).raw(&[0xb8]).raw(&0xffff_fffeu32.to_le_bytes());
    c = c.raw(&[0xef, 0xee]); // out dx, eax; out dx, al
    c = c.dx(0x70a).raw(&[0x66, 0xef]); // out dx, ax
    c = c.dx(0x3f8).out(b'.');
    // mov ecx, delay; dec ecx; jnz -4
    c = c.raw(&[0xb9]).raw(&0x0002_0000u32.to_le_bytes());
    c = c.raw(&[0xff, 0xc9, 0x75, 0xfc]);
    let back = -(c.0.len() as i32 + 2);
    c = c.raw(&[0xeb, back as i8 as u8]);
    let kernel = dir.join("eject.bzImage");
    std::fs::write(&kernel, bzimage(&c.0)).unwrap();
    kernel
}

fn boot(dir: &Path, kernel: &Path, transport: &str, disk: &Path) -> Vmm {
    let vm = Vmm::spawn(
        dir.join("api.sock"),
        &[
            "--kernel".as_ref(),
            kernel.as_os_str(),
            "--memory".as_ref(),
            "128M".as_ref(),
            "--transport".as_ref(),
            transport.as_ref(),
            "--disk".as_ref(),
            disk.as_os_str(),
        ],
    );
    vm.wait_for_output(2);
    vm
}

/// `vm ARGS`: `Err(stderr)` when it failed.
fn vm_try(vm: &Vmm, args: &[&str]) -> Result<String, String> {
    let o = vm.vm(args);
    if o.status.success() {
        Ok(String::from_utf8_lossy(&o.stdout).trim().to_string())
    } else {
        Err(String::from_utf8_lossy(&o.stderr).into_owned())
    }
}

fn disks(vm: &Vmm) -> Vec<(String, u64, String, bool)> {
    let v: serde_json::Value = serde_json::from_str(&vm.ok(&["status", "--json"])).unwrap();
    v["disks"]
        .as_array()
        .unwrap()
        .iter()
        .map(|d| {
            (
                d["id"].as_str().unwrap().to_string(),
                d["pci_slot"].as_u64().unwrap_or(0),
                d["path"].as_str().unwrap().to_string(),
                d["read_only"].as_bool().unwrap(),
            )
        })
        .collect()
}

fn shutdown(vm: Vmm) {
    vm.ok(&["shutdown", "--timeout", "1"]);
    let (code, err, _) = vm.wait();
    assert_eq!(code, Some(0), "{err}");
}

#[test]
fn a_guest_that_does_not_eject_keeps_its_disk_and_bad_requests_are_refused() {
    if !kvm_or_skip() {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let boot_disk = dynamic_vhdx(d);
    let vm = boot(d, &letters_kernel(d), "pci", &boot_disk);
    let s = disks(&vm);
    assert_eq!(s.len(), 1);
    assert_eq!((s[0].0.as_str(), s[0].1), ("disk0", 1), "{s:?}");

    let missing = d.join("missing.vhdx");
    let e = vm_try(&vm, &["disk-add", missing.to_str().unwrap()]).unwrap_err();
    assert!(e.contains("missing.vhdx"), "{e}");
    let e = vm_try(&vm, &["disk-add", boot_disk.to_str().unwrap()]).unwrap_err();
    assert!(e.to_lowercase().contains("lock"), "the VM's own disk: {e}");
    let e = vm_try(&vm, &["disk-add", "x.vhdx,readonly"]).unwrap_err();
    assert!(e.contains("unknown disk option"), "{e}");

    let extra = create(&d.join("extra.vhdx"), &[], Some("32M"));
    let id = vm.ok(&["disk-add", extra.to_str().unwrap()]);
    assert_eq!(id.trim(), "disk1");
    let s = disks(&vm);
    assert_eq!((s[1].0.as_str(), s[1].1), ("disk1", 2), "{s:?}");
    let e = vm_try(&vm, &["disk-add", extra.to_str().unwrap()]).unwrap_err();
    assert!(e.to_lowercase().contains("lock"), "added twice: {e}");

    let e = vm_try(&vm, &["disk-remove", "disk9"]).unwrap_err();
    assert!(
        e.contains("no disk \"disk9\"") && e.contains("disk0, disk1"),
        "{e}"
    );
    let t0 = std::time::Instant::now();
    let e = vm_try(&vm, &["disk-remove", "--timeout", "1", "disk1"]).unwrap_err();
    println!("refused removal after {:?}", t0.elapsed());
    assert!(
        e.contains("did not eject disk1") && e.contains("stays attached"),
        "{e}"
    );
    assert_eq!(disks(&vm).len(), 2, "disk1 is still there");
    // By path, the same.
    let e = vm_try(
        &vm,
        &["disk-remove", "--timeout", "0", extra.to_str().unwrap()],
    )
    .unwrap_err();
    assert!(e.contains("did not eject disk1"), "{e}");

    // Fill every slot: 18 in all.
    for i in 2..18 {
        let img = create(&d.join(format!("s{i}.vhd")), &[], Some("32M"));
        let ro = format!("{},read-only", img.display());
        let spec = if i % 2 == 0 {
            ro
        } else {
            img.display().to_string()
        };
        assert_eq!(vm.ok(&["disk-add", &spec]).trim(), format!("disk{i}"));
    }
    let img = create(&d.join("one-too-many.vhd"), &[], Some("32M"));
    let e = vm_try(&vm, &["disk-add", img.to_str().unwrap()]).unwrap_err();
    assert!(e.contains("no free PCI slot"), "{e}");
    let s = disks(&vm);
    assert_eq!(s.len(), 18);
    assert!(s[2].3 && !s[3].3, "read-only flags: {s:?}");
    assert_eq!(vm.state(), "running");
    let before = vm.printed.load(std::sync::atomic::Ordering::SeqCst);
    vm.wait_for_output(before + 2);
    shutdown(vm);
}

#[test]
fn an_mmio_vm_refuses_hotplug() {
    if !kvm_or_skip() {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let vm = boot(d, &letters_kernel(d), "mmio", &dynamic_vhdx(d));
    let extra = create(&d.join("extra.vhdx"), &[], Some("32M"));
    let e = vm_try(&vm, &["disk-add", extra.to_str().unwrap()]).unwrap_err();
    assert!(e.contains("--transport pci"), "{e}");
    let e = vm_try(&vm, &["disk-remove", "disk0"]).unwrap_err();
    assert!(e.contains("--transport pci"), "{e}");
    let s = disks(&vm);
    assert_eq!(s.len(), 1);
    assert_eq!(
        (s[0].0.as_str(), s[0].1),
        ("disk0", 0),
        "no PCI slot: {s:?}"
    );
    assert_eq!(vm.state(), "running");
    shutdown(vm);
}

#[test]
fn a_guest_that_ejects_gets_each_disk_drained_flushed_and_closed() {
    if !kvm_or_skip() {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let vm = boot(d, &ejecting_kernel(d), "pci", &dynamic_vhdx(d));
    let base = create(&d.join("base.vhdx"), &[], Some("32M"));
    let images = [
        create(&d.join("a.vhd"), &[], Some("32M")),
        create(
            &d.join("child.vhdx"),
            &["--parent", base.to_str().unwrap()],
            None,
        ),
        base.clone(),
    ];
    for (i, img) in images.iter().enumerate() {
        let spec = if i == 2 {
            format!("{},read-only", img.display())
        } else {
            img.display().to_string()
        };
        let id = vm.ok(&["disk-add", &spec]).trim().to_string();
        let s = disks(&vm);
        let added = s.iter().find(|x| x.0 == id).expect("listed");
        assert_eq!((added.1, added.3), (2, i == 2), "{s:?}");
        // By id, then by path.
        let target = if i == 0 {
            id.clone()
        } else {
            img.display().to_string()
        };
        let r = vm.ok(&["disk-remove", "--timeout", "30", &target]);
        assert!(r.contains("drained, flushed and closed"), "{r}");
        assert_eq!(disks(&vm).len(), 1, "{id} gone");
    }
    // 20 in a row, the same image each time: each removal released its lock.
    let t0 = std::time::Instant::now();
    let img = &images[0];
    for _ in 0..20 {
        let id = vm
            .ok(&["disk-add", img.to_str().unwrap()])
            .trim()
            .to_string();
        vm.ok(&["disk-remove", &id]);
    }
    println!("20 add/remove cycles in {:?}", t0.elapsed());
    let s = disks(&vm);
    assert_eq!(s.len(), 1, "{s:?}");
    assert_eq!(s[0].0, "disk0");
    // The VM runs on and the images check clean.
    let before = vm.printed.load(std::sync::atomic::Ordering::SeqCst);
    vm.wait_for_output(before + 2);
    for img in &images {
        let o = vhdtool().arg("check").arg(img).output().unwrap();
        assert!(o.status.success(), "check {}: {o:?}", img.display());
    }
    shutdown(vm);
}
