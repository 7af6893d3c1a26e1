//! A `vhdtool boot` process with a tiny guest on the machine's own `/dev/kvm`, as the VM API
//! and migration tests drive it: console output and stderr collected as they come, `vhdtool
//! vm …` against its API socket, bounded waits.

use std::io::{BufRead, BufReader, Read};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use super::tiny_guest::{bzimage, Asm};

fn vhdtool() -> Command {
    Command::new(env!("CARGO_BIN_EXE_vhdtool"))
}

/// Whether `/dev/kvm` can run a VM here (records a skip otherwise; fails under `CI=true`).
pub fn kvm_or_skip() -> bool {
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
pub const LETTER_AT: u32 = 0x60_0000;

/// A guest that prints the letters a to z over and over, one per delay loop, keeping the last
/// letter in guest memory at [`LETTER_AT`] (a page it dirties all the time; a restored or
/// migrated guest shows whether memory and registers came back: the sequence continues).
pub fn letters_guest() -> Asm {
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

/// Writes the letters guest's bzImage into `dir`.
pub fn letters_kernel(dir: &Path) -> PathBuf {
    let kernel = dir.join("letters.bzImage");
    std::fs::write(&kernel, bzimage(&letters_guest().0)).unwrap();
    kernel
}

/// A running `vhdtool boot … --api-socket SOCKET`.
pub struct Vmm {
    pub child: Child,
    pub socket: PathBuf,
    /// Everything the guest printed so far.
    pub out: Arc<Mutex<Vec<u8>>>,
    /// How many bytes that is.
    pub printed: Arc<AtomicUsize>,
    /// The VMM's stderr so far.
    pub err: Arc<Mutex<String>>,
    err_reader: JoinHandle<()>,
}

impl Vmm {
    /// The letters guest (128 MiB) over `disk`, its API socket `dir/socket`; returns once it
    /// has printed `n` letters.
    pub fn letters(dir: &Path, socket: &str, disk: &Path, n: usize) -> Vmm {
        let kernel = letters_kernel(dir);
        let vm = Vmm::spawn(
            dir.join(socket),
            &[
                "--kernel".as_ref(),
                kernel.as_os_str(),
                "--memory".as_ref(),
                "128M".as_ref(),
                "--transport".as_ref(),
                "mmio".as_ref(),
                "--disk".as_ref(),
                disk.as_os_str(),
            ],
        );
        vm.wait_for_output(n);
        vm
    }

    /// `vhdtool boot ARGS --api-socket SOCKET`.
    pub fn spawn(socket: PathBuf, args: &[&std::ffi::OsStr]) -> Vmm {
        let mut child = vhdtool()
            .arg("boot")
            .args(args)
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
        let err = Arc::new(Mutex::new(String::new()));
        let e = err.clone();
        let stderr = BufReader::new(child.stderr.take().unwrap());
        let err_reader = std::thread::spawn(move || {
            for line in stderr.lines().map_while(Result::ok) {
                let mut e = e.lock().unwrap();
                e.push_str(&line);
                e.push('\n');
            }
        });
        Vmm {
            child,
            socket,
            out,
            printed,
            err,
            err_reader,
        }
    }

    /// Waits until more than `n` bytes were printed (bounded: fails after 60 s).
    pub fn wait_for_output(&self, n: usize) -> usize {
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

    /// The rest of the first stderr line holding `tag` (bounded wait).
    pub fn wait_for_stderr(&self, tag: &str) -> String {
        let start = Instant::now();
        loop {
            if let Some(rest) = self
                .err
                .lock()
                .unwrap()
                .lines()
                .find_map(|l| l.split_once(tag).map(|x| x.1.trim().to_string()))
            {
                return rest;
            }
            assert!(
                start.elapsed() < Duration::from_secs(30),
                "no {tag:?} on stderr"
            );
            std::thread::sleep(Duration::from_millis(10));
        }
    }

    /// `vhdtool vm ARGS --api-socket SOCKET`.
    pub fn vm(&self, args: &[&str]) -> Output {
        vhdtool()
            .arg("vm")
            .args(args)
            .arg("--api-socket")
            .arg(&self.socket)
            .output()
            .unwrap()
    }

    /// Stdout of a `vm` call that must succeed.
    pub fn ok(&self, args: &[&str]) -> String {
        let o = self.vm(args);
        assert!(o.status.success(), "vm {args:?}: {o:?}");
        String::from_utf8_lossy(&o.stdout).into_owned()
    }

    /// The VM's state as `vm status --json` tells it.
    pub fn state(&self) -> String {
        let v: serde_json::Value = serde_json::from_str(&self.ok(&["status", "--json"])).unwrap();
        v["state"].as_str().unwrap().to_string()
    }

    /// Waits (at most 60 s, then kills and fails) for the VMM to exit: its exit code, whole
    /// stderr and everything the guest printed.
    pub fn wait(mut self) -> (Option<i32>, String, Vec<u8>) {
        let start = Instant::now();
        let status = loop {
            if let Some(s) = self.child.try_wait().unwrap() {
                break s;
            }
            if start.elapsed() > Duration::from_secs(60) {
                let _ = self.child.kill();
                panic!("the VMM did not exit: {}", self.err.lock().unwrap());
            }
            std::thread::sleep(Duration::from_millis(20));
        };
        let _ = self.err_reader.join();
        let err = self.err.lock().unwrap().clone();
        let out = self.out.lock().unwrap().clone();
        (status.code(), err, out)
    }
}

/// A 64 MiB dynamic VHDX `d.vhdx` in `dir`.
pub fn dynamic_vhdx(dir: &Path) -> PathBuf {
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

/// The letter after `c` in the guest's sequence.
pub fn next_letter(c: u8) -> u8 {
    if c == b'z' {
        b'a'
    } else {
        c + 1
    }
}
