//! A tiny guest that drives virtio-pci disks as a driver would, with MSI-X interrupts: the
//! checkpoint and migration tests of pci-transport VMs (`tests/pci_state.rs`) run it.
//!
//! ```text
//!  boot: IDT with vector 0x40 (count, EOI) and 0xff (spurious), LAPIC enabled, sti;
//!        disk A (slot 1, BAR0 where the VMM put it): memory space, MSI-X on, features
//!        (VERSION_1), queue 0 of 8 entries on vector 1 → message 0xfee00000 / 0x40, DRIVER_OK
//!  loop: n += 1
//!        PCID has slot 2 → stop using disk B, eject it (B0EJ)
//!        write sector n & 0xffff of A: { MAGIC, n, 0xA }, wait for the used ring AND the
//!          interrupt, check the status byte
//!        slot 2 answers with a virtio-blk id and B is not set up → move its BAR0 to
//!          0xe010_0000 (as Linux places a hot-added function), set it up as A
//!        B set up → the same write on B with tag 0xB, print 'B'; else print 'A'
//!        delay
//!  any failed request: print '!', ud2 (a triple fault: the VMM exits 1)
//! ```
//!
//! A guest whose interrupts or notifications stop after a restore hangs in its wait, so its
//! output stops: what the tests watch. The sectors it wrote tell which iterations reached
//! each disk ([`records`]).

use std::collections::HashMap;

use super::tiny_guest::bzimage;

/// First dword of every sector the guest writes.
pub const MAGIC: u32 = 0x2149_4350;
/// Tags of the disks (third dword of a sector).
pub const TAG_A: u32 = 0xa;
/// See [`TAG_A`].
pub const TAG_B: u32 = 0xb;
/// Where the guest puts the hot-added disk's BAR0.
pub const MOVED_BAR: u32 = 0xe010_0000;

const ENTRY: u32 = 0x10_0200;
const IDT: u32 = 0x61_0000;
const IDTR: u32 = 0x61_1000;
const CNT: u32 = 0x61_2000;
const INITB: u32 = 0x61_2004;
const IRQCNT: u32 = 0x61_2008;
const OLDIRQ: u32 = 0x61_200c;
const QA: u32 = 0x62_0000;
const QB: u32 = 0x63_0000;
const AVAIL: u32 = 0x1000;
const USED: u32 = 0x2000;
const HDR: u32 = 0x3000;
const DATA: u32 = 0x4000;
const STATUS: u32 = 0x5000;

#[derive(Default)]
struct Code {
    b: Vec<u8>,
    labels: HashMap<String, usize>,
    fixups: Vec<(usize, String)>,
}

impl Code {
    fn raw(&mut self, b: &[u8]) -> &mut Self {
        self.b.extend_from_slice(b);
        self
    }
    fn u32(&mut self, v: u32) -> &mut Self {
        self.raw(&v.to_le_bytes())
    }
    fn u16(&mut self, v: u16) -> &mut Self {
        self.raw(&v.to_le_bytes())
    }
    fn label(&mut self, l: &str) -> &mut Self {
        self.labels.insert(l.to_string(), self.b.len());
        self
    }
    fn addr(&self, l: &str) -> u32 {
        ENTRY + self.labels[l] as u32
    }
    fn rel32(&mut self, l: &str) -> &mut Self {
        self.fixups.push((self.b.len(), l.to_string()));
        self.u32(0)
    }
    fn jmp(&mut self, l: &str) -> &mut Self {
        self.raw(&[0xe9]).rel32(l)
    }
    fn jne(&mut self, l: &str) -> &mut Self {
        self.raw(&[0x0f, 0x85]).rel32(l)
    }
    fn je(&mut self, l: &str) -> &mut Self {
        self.raw(&[0x0f, 0x84]).rel32(l)
    }
    /// `mov byte [addr], v` (addr below 2 GiB).
    fn st8(&mut self, addr: u32, v: u8) -> &mut Self {
        self.raw(&[0xc6, 0x04, 0x25]).u32(addr).raw(&[v])
    }
    fn st16(&mut self, addr: u32, v: u16) -> &mut Self {
        self.raw(&[0x66, 0xc7, 0x04, 0x25]).u32(addr).u16(v)
    }
    fn st32(&mut self, addr: u32, v: u32) -> &mut Self {
        self.raw(&[0xc7, 0x04, 0x25]).u32(addr).u32(v)
    }
    /// `mov edi, v`: the BAR base of the `b*` stores.
    fn edi(&mut self, v: u32) -> &mut Self {
        self.raw(&[0xbf]).u32(v)
    }
    fn bst8(&mut self, off: u32, v: u8) -> &mut Self {
        self.raw(&[0xc6, 0x87]).u32(off).raw(&[v])
    }
    fn bst16(&mut self, off: u32, v: u16) -> &mut Self {
        self.raw(&[0x66, 0xc7, 0x87]).u32(off).u16(v)
    }
    fn bst32(&mut self, off: u32, v: u32) -> &mut Self {
        self.raw(&[0xc7, 0x87]).u32(off).u32(v)
    }
    /// `mov dx, port`
    fn dx(&mut self, port: u16) -> &mut Self {
        self.raw(&[0x66, 0xba]).u16(port)
    }
    fn out32(&mut self, port: u16, v: u32) -> &mut Self {
        self.dx(port).raw(&[0xb8]).u32(v).raw(&[0xef])
    }
    fn out16(&mut self, port: u16, v: u16) -> &mut Self {
        self.dx(port).raw(&[0x66, 0xb8]).u16(v).raw(&[0x66, 0xef])
    }
    /// Config dword `reg` of device `dev` on bus 0 = `v`.
    fn cfg(&mut self, dev: u32, reg: u32, v: u32) -> &mut Self {
        self.out32(0xcf8, 0x8000_0000 | dev << 11 | reg)
            .out32(0xcfc, v)
    }
    fn print(&mut self, ch: u8) -> &mut Self {
        self.dx(0x3f8).raw(&[0xb0, ch, 0xee])
    }
    /// An interrupt gate for `vector` to `handler` (code selector 0x10).
    fn gate(&mut self, vector: u32, handler: u32) -> &mut Self {
        let e = IDT + vector * 16;
        self.st16(e, handler as u16)
            .st16(e + 2, 0x10)
            .st16(e + 4, 0x8e00)
            .st16(e + 6, (handler >> 16) as u16)
            .st32(e + 8, 0)
            .st32(e + 12, 0)
    }

    /// Sets up the disk in `slot` with BAR0 at `bar` and its queue at `q`.
    fn init_disk(&mut self, slot: u32, bar: u32, q: u32, tag: u32, move_bar: bool) -> &mut Self {
        if move_bar {
            self.cfg(slot, 0x10, bar);
        }
        self.cfg(slot, 0x04, 0x6);
        // MSI-X message control (config 0x42): enable.
        self.out32(0xcf8, 0x8000_0000 | slot << 11 | 0x40)
            .out16(0xcfe, 0x8000);
        self.edi(bar)
            .bst8(0x14, 1)
            .bst8(0x14, 3)
            .bst32(0x08, 1)
            .bst32(0x0c, 1) // VERSION_1
            .bst8(0x14, 0x0b)
            .bst16(0x16, 0)
            .bst16(0x18, 8)
            .bst16(0x1a, 1)
            .bst32(0x20, q)
            .bst32(0x28, q + AVAIL)
            .bst32(0x30, q + USED)
            .bst16(0x1c, 1)
            .bst32(0x4010, 0xfee0_0000)
            .bst32(0x4014, 0)
            .bst32(0x4018, 0x40)
            .bst32(0x401c, 0)
            .bst8(0x14, 0x0f);
        // Descriptors: header (16), data (512, read by the device), status (1, written).
        self.st32(q, q + HDR)
            .st32(q + 8, 16)
            .st16(q + 12, 1)
            .st16(q + 14, 1)
            .st32(q + 16, q + DATA)
            .st32(q + 24, 512)
            .st16(q + 28, 1)
            .st16(q + 30, 2)
            .st32(q + 32, q + STATUS)
            .st32(q + 40, 1)
            .st16(q + 44, 2)
            .st16(q + 46, 0)
            .st32(q + HDR, 1) // VIRTIO_BLK_T_OUT
            .st32(q + DATA, MAGIC)
            .st32(q + DATA + 8, tag)
    }

    /// Writes iteration `[CNT]` to its sector of the disk at `bar` / `q`, waits for the used
    /// ring and the interrupt, checks the status.
    fn request(&mut self, name: &str, bar: u32, q: u32) -> &mut Self {
        let (spin_used, spin_irq) = (format!("used_{name}"), format!("irq_{name}"));
        self.raw(&[0x8b, 0x04, 0x25]).u32(CNT); // mov eax, [CNT]
        self.raw(&[0x89, 0x04, 0x25]).u32(q + DATA + 4); // mov [data+4], eax
        self.raw(&[0x25]).u32(0xffff); // and eax, 0xffff
        self.raw(&[0x89, 0x04, 0x25]).u32(q + HDR + 8); // sector
        self.st8(q + STATUS, 0xff);
        self.raw(&[0x8b, 0x0c, 0x25]).u32(IRQCNT); // mov ecx, [IRQCNT]
        self.raw(&[0x89, 0x0c, 0x25]).u32(OLDIRQ); // mov [OLDIRQ], ecx
        self.raw(&[0x0f, 0xb7, 0x04, 0x25]).u32(q + AVAIL + 2); // movzx eax, avail.idx
        self.raw(&[0xff, 0xc0]); // inc eax
        self.raw(&[0x66, 0x89, 0x04, 0x25]).u32(q + AVAIL + 2); // avail.idx = ax
        self.edi(bar).bst16(0x3000, 0); // notify queue 0
        self.label(&spin_used);
        self.raw(&[0x0f, 0xb7, 0x0c, 0x25]).u32(q + USED + 2); // movzx ecx, used.idx
        self.raw(&[0x66, 0x39, 0xc1]).jne(&spin_used); // cmp cx, ax
        self.label(&spin_irq);
        self.raw(&[0x8b, 0x0c, 0x25]).u32(IRQCNT);
        self.raw(&[0x3b, 0x0c, 0x25]).u32(OLDIRQ).je(&spin_irq);
        self.raw(&[0x80, 0x3c, 0x25]).u32(q + STATUS).raw(&[0]);
        self.jne("fail")
    }

    fn finish(mut self) -> Vec<u8> {
        for (at, l) in std::mem::take(&mut self.fixups) {
            let rel = self.labels[&l] as i64 - (at as i64 + 4);
            self.b[at..at + 4].copy_from_slice(&(rel as i32).to_le_bytes());
        }
        self.b
    }
}

/// The guest's bzImage.
pub fn kernel() -> Vec<u8> {
    let mut c = Code::default();
    c.jmp("main");
    // Vector 0x40: count, EOI, return.
    c.label("irq");
    c.raw(&[0x50]); // push rax
    c.raw(&[0xff, 0x04, 0x25]).u32(IRQCNT); // inc dword [IRQCNT]
    c.raw(&[0xb8]).u32(0xfee0_00b0); // mov eax, EOI
    c.raw(&[0xc7, 0x00]).u32(0); // mov dword [rax], 0
    c.raw(&[0x58, 0x48, 0xcf]); // pop rax; iretq
    c.label("spurious").raw(&[0x48, 0xcf]);
    c.label("main");
    let (irq, spurious) = (c.addr("irq"), c.addr("spurious"));
    c.gate(0x40, irq).gate(0xff, spurious);
    c.st16(IDTR, 0xfff).st32(IDTR + 2, IDT).st32(IDTR + 6, 0);
    c.raw(&[0x0f, 0x01, 0x1c, 0x25]).u32(IDTR); // lidt [IDTR]
    c.raw(&[0xb8]).u32(0xfee0_00f0); // mov eax, SVR
    c.raw(&[0xc7, 0x00]).u32(0x1ff); // APIC enabled, spurious vector 0xff
    c.init_disk(1, 0xe000_0000, QA, TAG_A, false);
    c.raw(&[0xfb]); // sti
    c.label("loop");
    c.raw(&[0x8b, 0x04, 0x25]).u32(CNT);
    c.raw(&[0xff, 0xc0]);
    c.raw(&[0x89, 0x04, 0x25]).u32(CNT);
    // An eject request for slot 2: B is no longer used, then ejected.
    c.dx(0x704).raw(&[0xed]); // in eax, dx (PCID)
    c.raw(&[0xa9]).u32(1 << 2).je("no_eject"); // test eax, 4
    c.st32(INITB, 0);
    c.out32(0x708, 1 << 2);
    c.label("no_eject");
    c.request("a", 0xe000_0000, QA);
    c.raw(&[0x83, 0x3c, 0x25]).u32(INITB).raw(&[0]); // cmp dword [INITB], 0
    c.jne("have_b");
    c.out32(0xcf8, 0x8000_0000 | 2 << 11).dx(0xcfc).raw(&[0xed]); // in eax, dx
    c.raw(&[0x3d]).u32(0x1042_1af4).jne("no_b"); // cmp eax, virtio-blk
    c.init_disk(2, MOVED_BAR, QB, TAG_B, true);
    c.st32(INITB, 1);
    c.label("have_b");
    c.request("b", MOVED_BAR, QB);
    c.print(b'B').jmp("delay");
    c.label("no_b");
    c.print(b'A');
    c.label("delay");
    c.raw(&[0xb9]).u32(0x8000); // mov ecx, delay (emulated under kvm_pvm)
    c.raw(&[0xff, 0xc9, 0x75, 0xfc]); // dec ecx; jnz
    c.jmp("loop");
    c.label("fail");
    c.print(b'!').raw(&[0x0f, 0x0b]);
    bzimage(&c.finish())
}

/// The records in `bytes` (a disk's first sectors): for each sector holding one, its
/// iteration number; panics on a record in the wrong sector or with the wrong tag.
pub fn records(bytes: &[u8], tag: u32) -> Vec<u32> {
    let word = |s: &[u8], i: usize| u32::from_le_bytes(s[i * 4..i * 4 + 4].try_into().unwrap());
    let mut out = Vec::new();
    for (sector, s) in bytes.chunks(512).enumerate() {
        if s.len() < 12 || word(s, 0) != MAGIC {
            continue;
        }
        let n = word(s, 1);
        assert_eq!(word(s, 2), tag, "sector {sector}: tag");
        assert_eq!(
            (n & 0xffff) as usize,
            sector,
            "record {n} in sector {sector}"
        );
        out.push(n);
    }
    out.sort_unstable();
    out
}
