//! Checkpoints and live migrations of `vhdtool boot --transport pci` VMs with a disk
//! hot-added before, with the tiny virtio-pci guest of `support::pci_guest` on the machine's
//! own `/dev/kvm`: it writes one numbered sector per iteration to each disk and waits for the
//! used ring and the MSI-X interrupt of every request, so it stops as soon as a notification
//! or an interrupt is lost. After a restore or a migration it must go on writing to both disks
//! (the hot-added one in its slot, at the BAR0 the guest moved it to) with no iteration
//! missing from either image, the images check clean, and the hot-added disk can still be
//! removed (the guest ejects it). A removal in progress refuses both, and a hostile PCI state
//! is refused at restore with a clear error.
//!
//! Without a usable `/dev/kvm` these tests print SKIP and pass, except under `CI=true`.

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::atomic::Ordering;
use std::time::Instant;

mod support;
use support::pci_guest::{kernel, records, MOVED_BAR, TAG_A, TAG_B};
use support::vm_process::{kvm_or_skip, letters_kernel, Vmm};

fn vhdtool() -> Command {
    Command::new(env!("CARGO_BIN_EXE_vhdtool"))
}

/// A 64 MiB dynamic VHDX `dir/name`.
fn vhdx(dir: &Path, name: &str) -> PathBuf {
    let p = dir.join(name);
    let o = vhdtool()
        .args(["create", "--type", "dynamic"])
        .arg(&p)
        .arg("64M")
        .output()
        .unwrap();
    assert!(o.status.success(), "{o:?}");
    p
}

/// `vhdtool boot --transport pci` of `kernel` over `disk`, API socket `dir/socket`.
fn boot_pci(dir: &Path, socket: &str, kernel: &Path, disk: &Path) -> Vmm {
    Vmm::spawn(
        dir.join(socket),
        &[
            "--kernel".as_ref(),
            kernel.as_os_str(),
            "--memory".as_ref(),
            "128M".as_ref(),
            "--transport".as_ref(),
            "pci".as_ref(),
            "--disk".as_ref(),
            disk.as_os_str(),
        ],
    )
}

fn guest_kernel(dir: &Path) -> PathBuf {
    let k = dir.join("pci-writer.bzImage");
    std::fs::write(&k, kernel()).unwrap();
    k
}

/// How many 'B's the guest printed: iterations that wrote to the hot-added disk.
fn b_count(vm: &Vmm) -> usize {
    vm.out
        .lock()
        .unwrap()
        .iter()
        .filter(|&&c| c == b'B')
        .count()
}

/// Waits until the guest printed `n` more 'B's than `from` (bounded by wait_for_output).
fn wait_for_b(vm: &Vmm, from: usize, n: usize) {
    while b_count(vm) < from + n {
        let printed = vm.printed.load(Ordering::SeqCst);
        assert!(
            !vm.out.lock().unwrap().contains(&b'!'),
            "a request failed: {}",
            String::from_utf8_lossy(&vm.out.lock().unwrap())
        );
        vm.wait_for_output(printed);
    }
}

/// The pci guest over a.vhdx with b.vhdx hot-added, once it wrote to B a few times.
fn start_with_hot_added(dir: &Path, socket: &str) -> (Vmm, PathBuf, PathBuf) {
    let (a, b) = (vhdx(dir, "a.vhdx"), vhdx(dir, "b.vhdx"));
    let vm = boot_pci(dir, socket, &guest_kernel(dir), &a);
    vm.wait_for_output(3);
    assert_eq!(vm.ok(&["disk-add", b.to_str().unwrap()]).trim(), "disk1");
    wait_for_b(&vm, 0, 3);
    (vm, a, b)
}

/// `(id, pci slot, path)` of each disk.
fn disks(vm: &Vmm) -> Vec<(String, u64, String)> {
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
            )
        })
        .collect()
}

/// The records of the first 32 MiB of `image` (through its chain).
fn image_records(image: &Path, tag: u32) -> Vec<u32> {
    let o = vhdtool()
        .arg("read")
        .arg(image)
        .args(["--offset", "0", "--length", "32M"])
        .output()
        .unwrap();
    assert!(o.status.success(), "read {}: {o:?}", image.display());
    records(&o.stdout, tag)
}

/// Every iteration from the first to the last reached the disk, none twice.
fn assert_contiguous(what: &str, r: &[u32]) {
    assert!(!r.is_empty(), "{what}: no records");
    let (first, last) = (r[0], *r.last().unwrap());
    assert!(last < 0x10000, "{what}: the sectors wrapped");
    assert_eq!(
        r.len() as u32,
        last - first + 1,
        "{what}: iterations missing between {first} and {last}"
    );
}

fn assert_clean(image: &Path) {
    let o = vhdtool().arg("check").arg(image).output().unwrap();
    assert_eq!(o.status.code(), Some(0), "check {}: {o:?}", image.display());
}

/// The last record of the frozen layers must come before later ones in the final chains:
/// the guest wrote both disks before and after.
fn assert_io_on_both_sides(frozen: [(&Path, u32); 2], now: [(&Path, u32); 2]) {
    for ((f, tag), (n, _)) in frozen.into_iter().zip(now) {
        let before = image_records(f, tag);
        let after = image_records(n, tag);
        println!(
            "{}: {} records before ({:?}..={:?}), {} in the end ({:?}..={:?})",
            n.display(),
            before.len(),
            before.first(),
            before.last(),
            after.len(),
            after.first(),
            after.last()
        );
        assert_contiguous(&f.display().to_string(), &before);
        assert_contiguous(&n.display().to_string(), &after);
        assert_eq!(after[0], before[0], "{}: first record", n.display());
        assert!(
            after.last() > before.last(),
            "{}: no write after the restore or migration",
            n.display()
        );
    }
}

/// Removes disk1 (the guest ejects it) and checks the guest goes on with A alone.
fn remove_hot_added(vm: &Vmm) {
    let r = vm.ok(&["disk-remove", "--timeout", "30", "disk1"]);
    assert!(r.contains("drained, flushed and closed"), "{r}");
    let d = disks(vm);
    assert!(!d.iter().any(|x| x.0 == "disk1"), "{d:?}");
    let printed = vm.printed.load(Ordering::SeqCst);
    vm.wait_for_output(printed + 2);
    let out = vm.out.lock().unwrap().clone();
    assert_eq!(out.last(), Some(&b'A'), "the guest still writes to B");
}

fn shutdown(vm: Vmm) -> String {
    vm.ok(&["shutdown", "--timeout", "0"]);
    let (code, err, out) = vm.wait();
    assert_eq!(code, Some(0), "{err}");
    assert!(!out.contains(&b'!'), "a request failed");
    err
}

#[test]
fn a_pci_vm_with_a_hot_added_disk_is_checkpointed_restored_and_writes_both_disks_on() {
    if !kvm_or_skip() {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let (vm, a, b) = start_with_hot_added(d, "src.sock");
    let ckpt = d.join("ckpt");
    let said = vm.ok(&["checkpoint", "--stop", ckpt.to_str().unwrap()]);
    println!("pci checkpoint: {}", said.trim());
    let (code, err, _) = vm.wait();
    assert_eq!(code, Some(0), "{err}");
    let manifest = std::fs::read_to_string(ckpt.join("manifest.json")).unwrap();
    assert!(manifest.contains("\"transport\": \"pci\""), "{manifest}");

    let t0 = Instant::now();
    let vm = Vmm::spawn(
        d.join("restored.sock"),
        &["--restore".as_ref(), ckpt.as_os_str()],
    );
    vm.wait_for_output(0);
    println!(
        "pci restore to the guest's first output: {:.1} ms",
        t0.elapsed().as_secs_f64() * 1e3
    );
    wait_for_b(&vm, 0, 5);
    let now = disks(&vm);
    assert_eq!(
        now.iter().map(|x| (x.0.as_str(), x.1)).collect::<Vec<_>>(),
        [("disk0", 1), ("disk1", 2)],
        "ids and slots: {now:?}"
    );
    let (ca, cb) = (PathBuf::from(&now[0].2), PathBuf::from(&now[1].2));
    assert!(
        ca.to_str().unwrap().ends_with(".avhdx") && cb != b,
        "{now:?}"
    );
    // A disk added after the restore gets a new id, in the free slot 3.
    let c = vhdx(d, "c.vhdx");
    assert_eq!(vm.ok(&["disk-add", c.to_str().unwrap()]).trim(), "disk2");
    assert_eq!(disks(&vm)[2].1, 3);
    remove_hot_added(&vm);
    shutdown(vm);
    assert_io_on_both_sides([(&a, TAG_A), (&b, TAG_B)], [(&ca, TAG_A), (&cb, TAG_B)]);
    for img in [&a, &b, &ca, &cb, &c] {
        assert_clean(img);
    }
}

#[test]
fn a_pci_vm_with_a_hot_added_disk_migrates_and_the_disk_can_be_removed_on_the_target() {
    if !kvm_or_skip() {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let (src, a, b) = start_with_hot_added(d, "src.sock");
    let dst = Vmm::spawn(
        d.join("dst.sock"),
        &["--incoming".as_ref(), "tcp:127.0.0.1:0".as_ref()],
    );
    let uri = dst.wait_for_stderr("waiting for a migration on ");
    let o = src.vm(&["migrate", &uri]);
    assert!(o.status.success(), "{o:?}");
    println!("pci migrate: {}", String::from_utf8_lossy(&o.stdout).trim());
    let (code, err, before) = src.wait();
    assert_eq!(code, Some(0), "{err}");
    assert!(err.contains("guest migrated"), "{err}");
    wait_for_b(&dst, 0, 5);
    let now = disks(&dst);
    assert_eq!(
        now,
        [
            ("disk0".to_string(), 1, a.display().to_string()),
            ("disk1".to_string(), 2, b.display().to_string())
        ],
    );
    remove_hot_added(&dst);
    let after = dst.out.lock().unwrap().clone();
    shutdown(dst);
    // Every character printed is an iteration that wrote A; every 'B' one that wrote B: the
    // images hold at least those of the source and of the target, with none missing.
    let count_b = |v: &[u8]| v.iter().filter(|&&c| c == b'B').count();
    for (img, tag, want) in [
        (&a, TAG_A, before.len() + after.len()),
        (&b, TAG_B, count_b(&before) + count_b(&after)),
    ] {
        let r = image_records(img, tag);
        println!(
            "{}: {} records, the guest printed {want} for it (source and target)",
            img.display(),
            r.len()
        );
        assert_contiguous(&img.display().to_string(), &r);
        assert!(r.len() >= want, "{}: writes missing", img.display());
        assert_clean(img);
    }
}

#[test]
fn a_removal_in_progress_refuses_checkpoint_and_migration_and_the_vm_runs_on() {
    if !kvm_or_skip() {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    // The letters guest never ejects: the removal waits for its timeout.
    let vm = boot_pci(d, "api.sock", &letters_kernel(d), &vhdx(d, "a.vhdx"));
    vm.wait_for_output(2);
    let b = vhdx(d, "b.vhdx");
    assert_eq!(vm.ok(&["disk-add", b.to_str().unwrap()]).trim(), "disk1");
    let socket = vm.socket.clone();
    let removal = std::thread::spawn(move || {
        vhdtool()
            .args([
                "vm",
                "disk-remove",
                "--timeout",
                "10",
                "disk1",
                "--api-socket",
            ])
            .arg(&socket)
            .output()
            .unwrap()
    });
    // A migration to nowhere tells when the removal is registered (refused before connecting).
    let t0 = Instant::now();
    let refusal = loop {
        let o = vm.vm(&["migrate", "tcp:127.0.0.1:1"]);
        assert!(!o.status.success());
        let e = String::from_utf8_lossy(&o.stderr).into_owned();
        if e.contains("removal") {
            break e;
        }
        assert!(
            t0.elapsed().as_secs() < 8 && !removal.is_finished(),
            "never refused: {e}"
        );
        std::thread::sleep(std::time::Duration::from_millis(20));
    };
    assert!(
        refusal.contains("a removal of disk1 (PCI slot 2) is in progress"),
        "{refusal}"
    );
    let ckpt = d.join("ckpt");
    let o = vm.vm(&["checkpoint", ckpt.to_str().unwrap()]);
    let e = String::from_utf8_lossy(&o.stderr);
    assert!(!o.status.success() && e.contains("removal of disk1"), "{e}");
    assert!(!ckpt.join("manifest.json").exists());
    assert_eq!(vm.state(), "running");
    let o = removal.join().unwrap();
    let e = String::from_utf8_lossy(&o.stderr);
    assert!(
        !o.status.success() && e.contains("did not eject disk1"),
        "{e}"
    );
    // The removal timed out: the disk stays, and the VM checkpoints now.
    let said = vm.ok(&["checkpoint", ckpt.to_str().unwrap()]);
    println!("pci checkpoint (letters guest, running): {}", said.trim());
    assert!(said.contains("checkpoint in"), "{said}");
    let printed = vm.printed.load(Ordering::SeqCst);
    vm.wait_for_output(printed + 2);
    shutdown(vm);
}

#[test]
fn a_hostile_pci_state_is_refused_at_restore_naming_what_is_wrong() {
    if !kvm_or_skip() {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let (vm, _, _) = start_with_hot_added(d, "src.sock");
    let ckpt = d.join("ckpt");
    vm.ok(&["checkpoint", "--stop", ckpt.to_str().unwrap()]);
    assert_eq!(vm.wait().0, Some(0));
    let edit = |name: &str, f: &dyn Fn(&mut vmm::state::pci::PciState)| -> PathBuf {
        let c = d.join(name);
        std::fs::create_dir(&c).unwrap();
        for file in ["manifest.json", "vmstate.bin", "memory.img"] {
            std::fs::copy(ckpt.join(file), c.join(file)).unwrap();
        }
        let spath = c.join("vmstate.bin");
        let mut st = vmm::state::decode_state(&spath, &std::fs::read(&spath).unwrap()).unwrap();
        f(st.pci.as_mut().expect("pci state saved"));
        let bytes = vmm::state::encode_state(&st);
        std::fs::write(&spath, &bytes).unwrap();
        let mpath = c.join("manifest.json");
        let mut m = vmm::state::decode_manifest(&mpath, &std::fs::read(&mpath).unwrap()).unwrap();
        m.state.len = bytes.len() as u64;
        std::fs::write(&mpath, vmm::state::encode_manifest(&m)).unwrap();
        c
    };
    let refused = |c: &Path, want: &[&str]| {
        let o = vhdtool()
            .arg("boot")
            .arg("--restore")
            .arg(c)
            .stdin(Stdio::null())
            .output()
            .unwrap();
        let err = String::from_utf8_lossy(&o.stderr);
        assert_eq!(o.status.code(), Some(1), "{err}");
        for w in want {
            assert!(err.contains(w), "{w:?} not in: {err}");
        }
    };
    // What the guest did is in the state: B's BAR0 where it moved it, decoding.
    let spath = ckpt.join("vmstate.bin");
    let st = vmm::state::decode_state(&spath, &std::fs::read(&spath).unwrap()).unwrap();
    let f = &st.pci.as_ref().unwrap().functions[1];
    assert_eq!(f.config[0x10..0x14], MOVED_BAR.to_le_bytes());
    assert_eq!(f.vectors[1], 1, "queue 0 on vector 1");

    let c = edit("slot", &|p| p.functions[1].slot = 19);
    refused(
        &c,
        &[
            "vmstate.bin",
            "pci function",
            "slot outside 1..=18",
            "offset 24",
        ],
    );
    let c = edit("vector", &|p| p.functions[0].vectors[1] = 7);
    refused(&c, &["msi-x state", "holds vector 7, past the table"]);
    let c = edit("bar", &|p| {
        p.functions[1].config[0x10..0x14].copy_from_slice(&0xe000_0000u32.to_le_bytes())
    });
    refused(&c, &["pci config space", "overlaps the BAR0 of slot 1"]);
    let c = edit("twice", &|p| p.functions[1].slot = 1);
    refused(&c, &["slot used twice"]);
    let images: Vec<_> = std::fs::read_dir(d)
        .unwrap()
        .flatten()
        .filter(|e| e.file_name().to_string_lossy().ends_with(".avhdx"))
        .collect();
    assert_eq!(images.len(), 2, "a refused restore left children behind");
}
