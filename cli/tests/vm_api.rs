//! `vhdtool vm … --api-socket` against `vhdtool boot --api-socket` with a tiny guest on the
//! machine's own `/dev/kvm`: status, pause (the guest's output stops), resume (it goes on),
//! hostile clients (error replies, the VM unharmed) and shutdown (power button, then a hard
//! stop after the timeout: exit 0, disks flushed, the image free again, the socket gone).
//!
//! Without a usable `/dev/kvm` these tests print SKIP and pass, except under `CI=true`.

use std::io::{Read, Write};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

mod support;
use support::vm_process::{dynamic_vhdx, kvm_or_skip, next_letter, Vmm};

fn vhdtool() -> Command {
    Command::new(env!("CARGO_BIN_EXE_vhdtool"))
}

/// The letters guest over `disk` once it printed, its API socket ready.
fn start(dir: &Path, disk: &Path) -> Vmm {
    let vm = Vmm::letters(dir, "api.sock", disk, 1);
    assert!(vm.socket.exists(), "no API socket");
    vm
}

#[test]
fn pause_stops_the_guest_resume_continues_and_shutdown_stops_it_with_exit_0() {
    if !kvm_or_skip() {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let disk = dynamic_vhdx(dir.path());
    let vm = start(dir.path(), &disk);

    let v: serde_json::Value = serde_json::from_str(&vm.ok(&["status", "--json"])).unwrap();
    assert_eq!(v["state"], "running");
    assert_eq!(v["cpus"], 1);
    assert_eq!(v["memory"], 128u64 << 20);
    assert_eq!(v["pid"], vm.child.id());
    assert_eq!(v["disks"][0]["path"], disk.to_str().unwrap());
    assert!(vm.ok(&["status"]).contains("state: running"));

    vm.wait_for_output(3);
    vm.ok(&["pause"]);
    assert_eq!(vm.state(), "paused");
    let at_pause = vm.printed.load(Ordering::SeqCst);
    std::thread::sleep(Duration::from_millis(500));
    assert_eq!(
        vm.printed.load(Ordering::SeqCst),
        at_pause,
        "the guest printed while paused"
    );
    vm.ok(&["resume"]);
    assert_eq!(vm.state(), "running");
    vm.wait_for_output(at_pause + 2);

    // The letters ran on in sequence across the pause.
    let out = vm.out.lock().unwrap().clone();
    for w in out.windows(2) {
        let next = if w[0] == b'z' { b'a' } else { w[0] + 1 };
        assert_eq!(
            w[1],
            next,
            "sequence broken: {}",
            String::from_utf8_lossy(&out)
        );
    }

    // The guest has no ACPI: the button goes unanswered, the VMM stops it after 1 s.
    let start = Instant::now();
    let said = vm.ok(&["shutdown", "--timeout", "1"]);
    assert!(
        said.contains("did not power off within 1 s: stopped; disks flushed"),
        "{said}"
    );
    assert!(start.elapsed() >= Duration::from_secs(1));
    let socket = vm.socket.clone();
    let (code, stderr, _) = vm.wait();
    assert_eq!(code, Some(0), "{stderr}");
    assert!(stderr.contains("stopped; disks flushed"), "{stderr}");
    assert!(!socket.exists(), "the API socket was left behind");
    // The image is free again and clean.
    let o = vhdtool().arg("check").arg(&disk).output().unwrap();
    assert_eq!(o.status.code(), Some(0), "{o:?}");
}

#[test]
fn hostile_api_clients_get_errors_and_the_vm_runs_on() {
    if !kvm_or_skip() {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let disk = dynamic_vhdx(dir.path());
    let vm = start(dir.path(), &disk);
    let ask = |bytes: &[u8]| {
        let mut s = UnixStream::connect(&vm.socket).unwrap();
        s.set_read_timeout(Some(Duration::from_secs(30))).unwrap();
        let _ = s.write_all(bytes);
        let mut reply = String::new();
        let _ = s.read_to_string(&mut reply);
        reply
    };
    for (bytes, want) in [
        (&b"\x00\x01\x02\n"[..], "not JSON"),
        (br#"{"version":99,"command":"status"}"#.as_slice(), ""),
        (b"{\"version\":99,\"command\":\"status\"}\n", "version 99"),
        (b"{\"version\":1,\"command\":\"rm -rf\"}\n", "bad request"),
    ] {
        let reply = ask(bytes);
        let v: serde_json::Value = serde_json::from_str(&reply).unwrap_or_else(|e| {
            panic!("{:?} got a reply that is not JSON ({e}): {reply:?}", bytes)
        });
        assert_eq!(v["ok"], false, "{reply}");
        assert!(v["error"].as_str().unwrap().contains(want), "{reply}");
    }
    // A flood larger than any request.
    let flood = vec![b'{'; 1 << 20];
    let reply = ask(&flood);
    assert!(reply.contains("longer than"), "{reply}");
    // Unknown socket path: a clear error naming it.
    let o = vhdtool()
        .args(["vm", "status", "--api-socket"])
        .arg(dir.path().join("nope.sock"))
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(!o.status.success() && err.contains("nope.sock"), "{err}");

    assert_eq!(vm.state(), "running");
    let n = vm.printed.load(Ordering::SeqCst);
    vm.wait_for_output(n + 1);
    vm.ok(&["shutdown", "--timeout", "0"]);
    assert_eq!(vm.wait().0, Some(0));
}

/// Takes `vm checkpoint --stop DIR` and waits for the VMM to exit 0; returns what the guest
/// printed.
fn checkpoint_and_stop(vm: Vmm, dir: &Path) -> Vec<u8> {
    let said = vm.ok(&["checkpoint", "--stop", dir.to_str().unwrap()]);
    assert!(said.contains("checkpoint in"), "{said}");
    let (code, stderr, printed) = vm.wait();
    assert_eq!(code, Some(0), "{stderr}");
    assert!(stderr.contains("checkpointed and stopped"), "{stderr}");
    printed
}

fn restore(dir: &Path, ckpt: &Path, socket: &str) -> Vmm {
    let start = std::time::Instant::now();
    let vm = Vmm::spawn(dir.join(socket), &["--restore".as_ref(), ckpt.as_os_str()]);
    // The guest prints again: restored and running (printed, not asserted).
    let printed = vm.printed.load(std::sync::atomic::Ordering::SeqCst);
    vm.wait_for_output(printed);
    println!(
        "restore to the guest's first output: {:.1} ms",
        start.elapsed().as_secs_f64() * 1e3
    );
    vm
}

fn stop(vm: Vmm) -> String {
    vm.ok(&["shutdown", "--timeout", "0"]);
    let (code, stderr, _) = vm.wait();
    assert_eq!(code, Some(0), "{stderr}");
    stderr
}

fn images(dir: &Path) -> Vec<String> {
    let mut v: Vec<String> = std::fs::read_dir(dir)
        .unwrap()
        .flatten()
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .filter(|n| n.ends_with(".vhdx") || n.ends_with(".avhdx"))
        .collect();
    v.sort();
    v
}

#[test]
fn restored_guest_continues_where_the_checkpoint_stopped_it_twice_independently() {
    if !kvm_or_skip() {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let disk = dynamic_vhdx(dir.path());
    let vm = start(dir.path(), &disk);
    vm.wait_for_output(3);
    let ckpt = dir.path().join("ckpt");
    let before = checkpoint_and_stop(vm, &ckpt);
    for f in ["manifest.json", "vmstate.bin", "memory.img"] {
        assert!(ckpt.join(f).exists(), "no {f}");
    }
    // The VM had moved onto a child of d.vhdx before it stopped.
    let after_ckpt = images(dir.path());
    assert_eq!(after_ckpt.len(), 2, "{after_ckpt:?}");
    let frozen = std::fs::read(&disk).unwrap();
    // Sparse: 128 MiB of guest RAM, a few pages touched.
    let m = std::fs::metadata(ckpt.join("memory.img")).unwrap();
    assert_eq!(m.len(), 128 << 20);
    assert!(
        std::os::unix::fs::MetadataExt::blocks(&m) * 512 < 16 << 20,
        "memory.img is not sparse"
    );

    let want = next_letter(*before.last().unwrap());
    let a = restore(dir.path(), &ckpt, "a.sock");
    // The second one runs at the same time as the first.
    let b = restore(dir.path(), &ckpt, "b.sock");
    for vm in [&a, &b] {
        let out = vm.out.lock().unwrap().clone();
        assert_eq!(
            out[0],
            want,
            "the guest did not continue after {:?}: {:?}",
            String::from_utf8_lossy(&before),
            String::from_utf8_lossy(&out)
        );
    }
    let (sa, sb) = (a.ok(&["status", "--json"]), b.ok(&["status", "--json"]));
    let path = |s: &str| -> String {
        let v: serde_json::Value = serde_json::from_str(s).unwrap();
        v["disks"][0]["path"].as_str().unwrap().to_string()
    };
    assert_ne!(path(&sa), path(&sb), "two restores share a child");
    stop(a);
    stop(b);
    assert_eq!(images(dir.path()).len(), 4, "one new child per restore");
    assert_eq!(
        std::fs::read(&disk).unwrap(),
        frozen,
        "a frozen layer was written"
    );
    for img in images(dir.path()) {
        let o = vhdtool()
            .arg("check")
            .arg(dir.path().join(&img))
            .output()
            .unwrap();
        assert_eq!(o.status.code(), Some(0), "{img}: {o:?}");
    }
}

#[test]
fn a_checkpoint_of_a_running_guest_lets_it_run_on_over_a_new_child() {
    if !kvm_or_skip() {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let disk = dynamic_vhdx(dir.path());
    let vm = start(dir.path(), &disk);
    let ckpt = dir.path().join("ckpt");
    let said = vm.ok(&["checkpoint", ckpt.to_str().unwrap()]);
    assert!(said.contains("guest paused"), "{said}");
    println!("{said}");
    assert_eq!(vm.state(), "running");
    let n = vm.printed.load(Ordering::SeqCst);
    vm.wait_for_output(n + 2);
    let v: serde_json::Value = serde_json::from_str(&vm.ok(&["status", "--json"])).unwrap();
    let now = v["disks"][0]["path"].as_str().unwrap().to_string();
    assert!(now.ends_with(".avhdx") && now.contains("d-"), "{now}");
    // A second checkpoint into a folder that is not empty is refused; the VM runs on.
    let o = vm.vm(&["checkpoint", ckpt.to_str().unwrap()]);
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(!o.status.success() && err.contains("not empty"), "{err}");
    assert_eq!(vm.state(), "running");
    stop(vm);
}

#[test]
fn damaged_checkpoints_and_changed_layers_are_refused_with_clear_errors() {
    if !kvm_or_skip() {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let disk = dynamic_vhdx(dir.path());
    let vm = start(dir.path(), &disk);
    let ckpt = dir.path().join("ckpt");
    checkpoint_and_stop(vm, &ckpt);
    let images_before = images(dir.path());
    let copy = |name: &str, edit: &dyn Fn(&Path)| -> PathBuf {
        let c = dir.path().join(name);
        std::fs::create_dir(&c).unwrap();
        for f in ["manifest.json", "vmstate.bin", "memory.img"] {
            std::fs::copy(ckpt.join(f), c.join(f)).unwrap();
        }
        edit(&c);
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
    let truncated = copy("truncated", &|c| {
        let f = std::fs::OpenOptions::new()
            .write(true)
            .open(c.join("vmstate.bin"))
            .unwrap();
        f.set_len(100).unwrap();
    });
    refused(&truncated, &["vmstate.bin", "offset"]);
    let flipped = copy("flipped", &|c| {
        let mut b = std::fs::read(c.join("vmstate.bin")).unwrap();
        let at = b.len() / 2;
        b[at] ^= 1;
        std::fs::write(c.join("vmstate.bin"), b).unwrap();
    });
    refused(&flipped, &["vmstate.bin", "offset 24", "checksum"]);
    let memory = copy("memory", &|c| {
        let f = std::fs::OpenOptions::new()
            .write(true)
            .open(c.join("memory.img"))
            .unwrap();
        std::os::unix::fs::FileExt::write_all_at(&f, b"X", 64 << 20).unwrap();
    });
    refused(&memory, &["memory.img", "checksum"]);
    let manifest = copy("manifest", &|c| {
        let t = std::fs::read_to_string(c.join("manifest.json")).unwrap();
        std::fs::write(c.join("manifest.json"), t.replace("134217728", "134221824")).unwrap();
    });
    refused(&manifest, &["manifest.json", "checksum"]);
    // A CPU feature this host does not offer (a bit its own vCPUs have clear), with the
    // state and manifest sealed again: refused by the feature check, before any file is made.
    let foreign = copy("foreign-cpu", &|c| {
        let spath = c.join("vmstate.bin");
        let mut st = vmm::state::decode_state(&spath, &std::fs::read(&spath).unwrap()).unwrap();
        let leaf = st.vcpus[0]
            .cpuid
            .iter_mut()
            .find(|e| e.function == 1 && e.index == 0)
            .expect("CPUID leaf 1 saved");
        // Not OSXSAVE (27, follows the guest's CR4) nor the hypervisor bit (31).
        let bit = (0..31)
            .find(|&b| b != 27 && leaf.ecx & (1 << b) == 0)
            .unwrap();
        leaf.ecx |= 1 << bit;
        let bytes = vmm::state::encode_state(&st);
        std::fs::write(&spath, &bytes).unwrap();
        let mpath = c.join("manifest.json");
        let mut m = vmm::state::decode_manifest(&mpath, &std::fs::read(&mpath).unwrap()).unwrap();
        m.state.len = bytes.len() as u64;
        std::fs::write(&mpath, vmm::state::encode_manifest(&m)).unwrap();
    });
    refused(&foreign, &["lacks CPU feature CPUID.1:ecx bit"]);
    refused(&dir.path().join("nowhere"), &["manifest.json"]);
    assert_eq!(
        images(dir.path()),
        images_before,
        "a refused restore left files"
    );

    // The frozen layer changes: refused by its identity.
    let input = dir.path().join("in");
    std::fs::write(&input, [7u8; 512]).unwrap();
    let o = vhdtool()
        .arg("write")
        .arg(&disk)
        .args(["--offset", "0", "--input"])
        .arg(&input)
        .output()
        .unwrap();
    assert!(o.status.success(), "{o:?}");
    refused(&ckpt, &["d.vhdx", "changed since the checkpoint"]);
    assert_eq!(
        images(dir.path()),
        images_before,
        "a refused restore left files"
    );
}
