//! `vhdtool vm … --api-socket` against `vhdtool boot --api-socket` with a tiny guest on the
//! machine's own `/dev/kvm`: status, pause (the guest's output stops), resume (it goes on),
//! hostile clients (error replies, the VM unharmed) and shutdown (power button, then a hard
//! stop after the timeout: exit 0, disks flushed, the image free again, the socket gone).
//!
//! Without a usable `/dev/kvm` these tests print SKIP and pass, except under `CI=true`.

use std::io::{Read, Write};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

mod support;
use support::tiny_guest::{bzimage, Asm};

fn vhdtool() -> Command {
    Command::new(env!("CARGO_BIN_EXE_vhdtool"))
}

fn kvm_or_skip() -> bool {
    let ok = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open("/dev/kvm")
        .is_ok();
    if !ok {
        vhdkit_tests::skip_unless_ci("/dev/kvm is not usable");
    }
    ok
}

/// Guest byte that holds the last letter printed.
const LETTER_AT: u32 = 0x60_0000;

/// A guest that prints the letters a to z over and over, one per delay loop, keeping the last
/// letter in guest memory at [`LETTER_AT`] (so a restored guest shows whether memory and
/// registers came back: the sequence continues where it stopped).
fn letters_guest() -> Asm {
    let at = LETTER_AT.to_le_bytes();
    let mut c = Asm::default().dx(0x3f8);
    // mov byte [LETTER_AT], 'a' - 1
    c = c.raw(&[0xc6, 0x04, 0x25]).raw(&at).raw(&[b'a' - 1]);
    // loop: mov al, [LETTER_AT]; inc al; cmp al, 'z' + 1; jne +2; mov al, 'a'
    c = c.raw(&[0x8a, 0x04, 0x25]).raw(&at);
    c = c.raw(&[0xfe, 0xc0, 0x3c, b'z' + 1, 0x75, 0x02, 0xb0, b'a']);
    // mov [LETTER_AT], al; out dx, al; mov ecx, delay; dec ecx; jnz -4; jmp loop
    c = c.raw(&[0x88, 0x04, 0x25]).raw(&at).raw(&[0xee, 0xb9]);
    c = c.raw(&0x0001_0000u32.to_le_bytes());
    c.raw(&[0xff, 0xc9, 0x75, 0xfc, 0xeb, 0xde])
}

/// A running `vhdtool boot --api-socket` whose console output is collected.
struct Vm {
    child: Child,
    socket: PathBuf,
    out: Arc<Mutex<Vec<u8>>>,
    printed: Arc<AtomicUsize>,
    stderr: std::thread::JoinHandle<String>,
}

impl Vm {
    fn start(dir: &Path, disk: &Path, extra: &[&str]) -> Vm {
        let kernel = dir.join("letters.bzImage");
        std::fs::write(&kernel, bzimage(&letters_guest().0)).unwrap();
        let socket = dir.join("api.sock");
        let mut child = vhdtool()
            .arg("boot")
            .arg("--kernel")
            .arg(&kernel)
            .args(["--memory", "128M", "--api-socket"])
            .arg(&socket)
            .arg("--disk")
            .arg(disk)
            .args(extra)
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap();
        let (out, printed) = (
            Arc::new(Mutex::new(Vec::new())),
            Arc::new(AtomicUsize::new(0)),
        );
        let (o, p) = (out.clone(), printed.clone());
        let mut stdout = child.stdout.take().unwrap();
        std::thread::spawn(move || {
            let mut buf = [0u8; 256];
            while let Ok(n) = stdout.read(&mut buf) {
                if n == 0 {
                    break;
                }
                o.lock().unwrap().extend_from_slice(&buf[..n]);
                p.fetch_add(n, Ordering::SeqCst);
            }
        });
        let mut stderr = child.stderr.take().unwrap();
        let stderr = std::thread::spawn(move || {
            let mut s = String::new();
            let _ = stderr.read_to_string(&mut s);
            s
        });
        let vm = Vm {
            child,
            socket,
            out,
            printed,
            stderr,
        };
        vm.wait_for_output(1);
        assert!(vm.socket.exists(), "no API socket");
        vm
    }

    /// Waits until more than `n` bytes were printed (bounded: fails after 60 s).
    fn wait_for_output(&self, n: usize) -> usize {
        let start = Instant::now();
        loop {
            let now = self.printed.load(Ordering::SeqCst);
            if now > n {
                return now;
            }
            assert!(
                start.elapsed() < Duration::from_secs(60),
                "the guest printed nothing more than {n} bytes in 60 s"
            );
            std::thread::sleep(Duration::from_millis(10));
        }
    }

    fn vm(&self, args: &[&str]) -> std::process::Output {
        vhdtool()
            .arg("vm")
            .args(args)
            .arg("--api-socket")
            .arg(&self.socket)
            .output()
            .unwrap()
    }

    fn ok(&self, args: &[&str]) -> String {
        let o = self.vm(args);
        assert!(o.status.success(), "vm {args:?}: {o:?}");
        String::from_utf8_lossy(&o.stdout).into_owned()
    }

    fn state(&self) -> String {
        let v: serde_json::Value = serde_json::from_str(&self.ok(&["status", "--json"])).unwrap();
        v["state"].as_str().unwrap().to_string()
    }
}

fn dynamic_vhdx(dir: &Path) -> PathBuf {
    let disk = dir.join("d.vhdx");
    let o = vhdtool()
        .args(["create", "--type", "dynamic"])
        .arg(&disk)
        .arg("64M")
        .output()
        .unwrap();
    assert!(o.status.success(), "{o:?}");
    disk
}

#[test]
fn pause_stops_the_guest_resume_continues_and_shutdown_stops_it_with_exit_0() {
    if !kvm_or_skip() {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let disk = dynamic_vhdx(dir.path());
    let vm = Vm::start(dir.path(), &disk, &[]);

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
    let Vm {
        mut child,
        socket,
        stderr,
        ..
    } = vm;
    let status = child.wait().unwrap();
    let stderr = stderr.join().unwrap();
    assert_eq!(status.code(), Some(0), "{stderr}");
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
    let vm = Vm::start(dir.path(), &disk, &[]);
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
    let Vm { mut child, .. } = vm;
    assert_eq!(child.wait().unwrap().code(), Some(0));
}

/// The letter after `c` in the guest's sequence.
fn next_letter(c: u8) -> u8 {
    if c == b'z' {
        b'a'
    } else {
        c + 1
    }
}

/// Takes `vm checkpoint --stop DIR` and waits for the VMM to exit 0; returns what the guest
/// printed.
fn checkpoint_and_stop(vm: Vm, dir: &Path) -> Vec<u8> {
    let said = vm.ok(&["checkpoint", "--stop", dir.to_str().unwrap()]);
    assert!(said.contains("checkpoint in"), "{said}");
    let Vm {
        mut child,
        out,
        stderr,
        ..
    } = vm;
    let status = child.wait().unwrap();
    let stderr = stderr.join().unwrap();
    assert_eq!(status.code(), Some(0), "{stderr}");
    assert!(stderr.contains("checkpointed and stopped"), "{stderr}");
    let printed = out.lock().unwrap().clone();
    printed
}

fn restore(dir: &Path, ckpt: &Path, socket: &str) -> Vm {
    let socket = dir.join(socket);
    let mut child = vhdtool()
        .arg("boot")
        .arg("--restore")
        .arg(ckpt)
        .arg("--api-socket")
        .arg(&socket)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let (out, printed) = (
        Arc::new(Mutex::new(Vec::new())),
        Arc::new(AtomicUsize::new(0)),
    );
    let (o, p) = (out.clone(), printed.clone());
    let mut stdout = child.stdout.take().unwrap();
    std::thread::spawn(move || {
        let mut buf = [0u8; 256];
        while let Ok(n) = stdout.read(&mut buf) {
            if n == 0 {
                break;
            }
            o.lock().unwrap().extend_from_slice(&buf[..n]);
            p.fetch_add(n, Ordering::SeqCst);
        }
    });
    let mut stderr = child.stderr.take().unwrap();
    let stderr = std::thread::spawn(move || {
        let mut s = String::new();
        let _ = stderr.read_to_string(&mut s);
        s
    });
    let vm = Vm {
        child,
        socket,
        out,
        printed,
        stderr,
    };
    vm.wait_for_output(1);
    vm
}

fn stop(vm: Vm) -> String {
    vm.ok(&["shutdown", "--timeout", "0"]);
    let Vm {
        mut child, stderr, ..
    } = vm;
    assert_eq!(child.wait().unwrap().code(), Some(0));
    stderr.join().unwrap()
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
    let vm = Vm::start(dir.path(), &disk, &[]);
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
    let vm = Vm::start(dir.path(), &disk, &[]);
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
    let vm = Vm::start(dir.path(), &disk, &[]);
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
