//! `vhdtool boot --transport pci` with a tiny hand-assembled guest on the machine's own
//! `/dev/kvm`: the guest reaches the PCI host bridge and the virtio-pci disk through config
//! mechanism #1 (port exits) and BAR0 (MMIO exits), then throws malformed accesses at both:
//! every config register written with all ones in every width, straddling and wrong-bus
//! accesses, a BAR moved out of the window and within it, garbage in every common-config register, a queue enabled on
//! garbage addresses with DRIVER_OK, MSI-X enabled with garbage messages in the table and
//! beyond it, PBA writes. The VMM must survive all of it (no panic, exit 0 on the guest's reset)
//! and the guest then still reads the right ids. The Linux guest over virtio-pci is
//! `tests/tests/virtio_pci.rs`.
//!
//! Without a usable `/dev/kvm` these tests print SKIP and pass, except under `CI=true`.

use std::process::{Command, Stdio};

mod support;
use support::tiny_guest::{bzimage, Asm};
use support::vm_process::kvm_or_skip;

const BAR0: u32 = 0xe000_0000;

/// Guest code with `jne fail` placeholders patched at the end.
#[derive(Default)]
struct Code {
    b: Vec<u8>,
    fails: Vec<usize>,
}

impl Code {
    fn raw(&mut self, b: &[u8]) -> &mut Self {
        self.b.extend_from_slice(b);
        self
    }
    /// `mov dx, port`
    fn dx(&mut self, port: u16) -> &mut Self {
        self.raw(&[0x66, 0xba]).raw(&port.to_le_bytes())
    }
    /// CONFIG_ADDRESS = `a`.
    fn cfg_addr(&mut self, a: u32) -> &mut Self {
        self.dx(0xcf8)
            .raw(&[0xb8])
            .raw(&a.to_le_bytes())
            .raw(&[0xef])
    }
    /// `out port, eax` with eax = `v`.
    fn out32(&mut self, port: u16, v: u32) -> &mut Self {
        self.dx(port)
            .raw(&[0xb8])
            .raw(&v.to_le_bytes())
            .raw(&[0xef])
    }
    /// `out port, ax` with ax = `v`.
    fn out16(&mut self, port: u16, v: u16) -> &mut Self {
        self.dx(port)
            .raw(&[0x66, 0xb8])
            .raw(&v.to_le_bytes())
            .raw(&[0x66, 0xef])
    }
    /// `out port, al` with al = `v`.
    fn out8(&mut self, port: u16, v: u8) -> &mut Self {
        self.dx(port).raw(&[0xb0, v, 0xee])
    }
    /// Config dword `reg` of device `dev` on bus 0 must read `want`.
    fn expect_cfg(&mut self, dev: u32, reg: u32, want: u32) -> &mut Self {
        self.cfg_addr(0x8000_0000 | dev << 11 | reg)
            .dx(0xcfc)
            .raw(&[0xed, 0x3d])
            .raw(&want.to_le_bytes())
            .jne_fail()
    }
    fn jne_fail(&mut self) -> &mut Self {
        self.raw(&[0x0f, 0x85]);
        self.fails.push(self.b.len());
        self.raw(&[0; 4])
    }
    /// `mov edi, BAR0` (zero-extended into rdi).
    fn rdi_bar0(&mut self) -> &mut Self {
        self.raw(&[0xbf]).raw(&BAR0.to_le_bytes())
    }
    /// A store of `width` bytes of `v` at BAR0 + `off` (through rdi).
    fn bar_store(&mut self, off: u32, width: u8, v: u32) -> &mut Self {
        let d = off.to_le_bytes();
        match width {
            1 => self.raw(&[0xc6, 0x87]).raw(&d).raw(&[v as u8]),
            2 => self
                .raw(&[0x66, 0xc7, 0x87])
                .raw(&d)
                .raw(&(v as u16).to_le_bytes()),
            4 => self.raw(&[0xc7, 0x87]).raw(&d).raw(&v.to_le_bytes()),
            _ => self.raw(&[0x48, 0xc7, 0x87]).raw(&d).raw(&v.to_le_bytes()),
        }
    }
    /// The 16-bit register at BAR0 + `off` must read `want`.
    fn expect_bar16(&mut self, off: u32, want: u16) -> &mut Self {
        self.raw(&[0x0f, 0xb7, 0x87])
            .raw(&off.to_le_bytes())
            .raw(&[0x3d])
            .raw(&u32::from(want).to_le_bytes())
            .jne_fail()
    }
    /// Prints `ok`, resets, parks; `fail` is `ud2` (a triple fault: no IDT).
    fn finish(mut self, ok: &str) -> Vec<u8> {
        let ok_path = Asm::default().print(ok).reset().park().0;
        self.raw(&ok_path);
        let fail = self.b.len();
        self.raw(&[0x0f, 0x0b]);
        for at in &self.fails {
            let rel = i32::try_from(fail - (at + 4)).unwrap();
            self.b[*at..at + 4].copy_from_slice(&rel.to_le_bytes());
        }
        self.b
    }
}

/// The ids, BAR and queue count the guest must see (1 vCPU: one queue).
fn identity_checks(c: &mut Code) {
    c.expect_cfg(0, 0, 0x0008_1b36) // host bridge
        .expect_cfg(1, 0, 0x1042_1af4) // virtio-pci block
        .expect_cfg(1, 0x10, BAR0)
        .expect_cfg(2, 0, 0xffff_ffff); // nothing at device 2
}

#[test]
fn malformed_config_bar_and_msix_accesses_leave_the_vmm_and_the_device_working() {
    if !kvm_or_skip() {
        return;
    }
    let mut c = Code::default();
    identity_checks(&mut c);
    // Every config register of the disk and the host bridge, all ones, in every width.
    for dev in [0u32, 1] {
        for reg in (0..256).step_by(4) {
            c.cfg_addr(0x8000_0000 | dev << 11 | reg)
                .out32(0xcfc, 0xffff_ffff)
                .out16(0xcfe, 0xffff)
                .out8(0xcfd, 0xff)
                .out16(0xcff, 0xffff) // straddles the register
                .out32(0xcfe, 0xffff_ffff); // straddles too
        }
    }
    // Extended-register bits, another bus, a disabled address, byte accesses to 0xCF8.
    c.cfg_addr(0x8f00_0800).out32(0xcfc, 0);
    c.cfg_addr(0x8001_0800).out32(0xcfc, 0);
    c.cfg_addr(0x0000_0800).out32(0xcfc, 0);
    c.out8(0xcfb, 1).out16(0xcfa, 0xffff);
    // The BAR reads the sizing mask now; a move out of the PCI window is kept but does not
    // decode; a move inside it with memory decoding on decodes there (the ioeventfds follow);
    // then back to BAR0, MSI-X enabled without the function mask.
    c.expect_cfg(1, 0x10, 0xffff_8000);
    c.cfg_addr(0x8000_0810).out32(0xcfc, 0xd000_0000);
    c.expect_cfg(1, 0x10, 0xd000_0000);
    c.cfg_addr(0x8000_0810).out32(0xcfc, 0xe010_0000);
    c.cfg_addr(0x8000_0804).out32(0xcfc, 0x0000_0006);
    c.raw(&[0xbf]).raw(&0xe010_0000u32.to_le_bytes()); // mov edi, the moved BAR
    c.expect_bar16(0x12, 1);
    c.cfg_addr(0x8000_0810).out32(0xcfc, BAR0);
    c.expect_cfg(1, 0x10, BAR0);
    c.cfg_addr(0x8000_0840).out32(0xcfc, 0x8000_0000);
    c.rdi_bar0();
    c.expect_bar16(0x12, 1); // num_queues through BAR0
                             // Garbage in every common-config register, every width.
    for off in (0..0x40).step_by(4) {
        c.bar_store(off, 4, 0xffff_ffff)
            .bar_store(off, 2, 0xffff)
            .bar_store(off + 1, 1, 0xff);
    }
    c.bar_store(0x20, 8, 0xffff_ffff);
    // Queue 0 on garbage addresses, enabled, DRIVER_OK (FEATURES_OK refused: no VERSION_1),
    // then notified: the worker finds nothing it can read.
    c.bar_store(0x16, 2, 0)
        .bar_store(0x18, 2, 16)
        .bar_store(0x20, 4, 0xffff_f000)
        .bar_store(0x24, 4, 0xffff_ffff)
        .bar_store(0x28, 8, 0x7fff_0000)
        .bar_store(0x1c, 2, 1)
        .bar_store(0x14, 1, 0x0f)
        .bar_store(0x3000, 2, 0)
        .bar_store(0x3004, 4, 0xffff_ffff);
    // MSI-X: garbage messages unmasked (routed), stores beyond the table, misaligned, PBA.
    for off in (0x4000..0x4040).step_by(4) {
        c.bar_store(off, 4, 0xffff_fff0);
    }
    c.bar_store(0x400c, 4, 0)
        .bar_store(0x401c, 4, 0)
        .bar_store(0x4020, 8, 0xffff_ffff)
        .bar_store(0x4ff0, 4, 0)
        .bar_store(0x4003, 4, 0)
        .bar_store(0x4001, 1, 0)
        .bar_store(0x5000, 8, 0xffff_ffff)
        .bar_store(0x1000, 4, 0)
        .bar_store(0x2000, 4, 0)
        .bar_store(0x7ffc, 4, 0xffff_ffff);
    // Reset the device; it still answers.
    c.bar_store(0x14, 1, 0);
    c.expect_bar16(0x14, 0).expect_bar16(0x12, 1);
    identity_checks(&mut c);
    let code = c.finish("pci ok\n");

    let dir = tempfile::tempdir().unwrap();
    let kernel = dir.path().join("tiny.bzImage");
    std::fs::write(&kernel, bzimage(&code)).unwrap();
    let disk = dir.path().join("d.raw");
    std::fs::write(&disk, vec![0x5a; 1 << 20]).unwrap();
    let out = Command::new(env!("CARGO_BIN_EXE_vhdtool"))
        .arg("boot")
        .arg("--kernel")
        .arg(&kernel)
        .args(["--memory", "128M", "--transport", "pci", "--disk"])
        .arg(&disk)
        .stdin(Stdio::null())
        .output()
        .unwrap();
    let (stdout, stderr) = (
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr),
    );
    assert!(out.status.success(), "{}: {stdout:?} {stderr}", out.status);
    assert_eq!(stdout, "pci ok\n", "{stderr}");
    assert!(stderr.contains("guest rebooted"), "{stderr}");
    assert!(!stderr.contains("panicked"), "{stderr}");
    assert!(
        std::fs::read(&disk).unwrap().iter().all(|&b| b == 0x5a),
        "the disk changed"
    );
}
