//! Tiny hand-assembled guests for `vhdtool boot` on the machine's own `/dev/kvm`: a bzImage
//! header around a few instructions at the 64-bit entry point.

/// A minimal bzImage (boot protocol 2.15, 64-bit entry) whose protected-mode part holds `code`
/// at its 64-bit entry point (load address + 0x200).
pub fn bzimage(code: &[u8]) -> Vec<u8> {
    let mut setup = vec![0u8; 1024];
    let put16 =
        |b: &mut Vec<u8>, off: usize, v: u16| b[off..off + 2].copy_from_slice(&v.to_le_bytes());
    let put32 =
        |b: &mut Vec<u8>, off: usize, v: u32| b[off..off + 4].copy_from_slice(&v.to_le_bytes());
    setup[0x1f1] = 1; // setup_sects
    put16(&mut setup, 0x1fe, 0xaa55); // boot_flag
    setup[0x202..0x206].copy_from_slice(b"HdrS");
    put16(&mut setup, 0x206, 0x020f); // version
    setup[0x211] = 0x01; // loadflags: LOADED_HIGH
    put32(&mut setup, 0x214, 0x10_0000); // code32_start
    put32(&mut setup, 0x22c, 0x7fff_ffff); // initrd_addr_max
    put32(&mut setup, 0x230, 0x20_0000); // kernel_alignment
    put16(&mut setup, 0x236, 0x0001); // xloadflags: XLF_KERNEL_64
    put32(&mut setup, 0x238, 0x7ff); // cmdline_size
    setup[0x258..0x260].copy_from_slice(&0x10_0000u64.to_le_bytes()); // pref_address
    put32(&mut setup, 0x260, 0x10_0000); // init_size
    let mut payload = vec![0xf4u8; 0x200]; // hlt up to the 64-bit entry
    payload.extend_from_slice(code);
    setup.extend(payload);
    setup
}

/// x86-64 machine code, assembled by hand.
#[derive(Default)]
pub struct Asm(pub Vec<u8>);

impl Asm {
    /// `mov dx, port`
    pub fn dx(mut self, port: u16) -> Self {
        self.0.extend_from_slice(&[0x66, 0xba]);
        self.0.extend_from_slice(&port.to_le_bytes());
        self
    }
    /// `mov al, v; out dx, al`
    pub fn out(mut self, v: u8) -> Self {
        self.0.extend_from_slice(&[0xb0, v, 0xee]);
        self
    }
    /// Each byte of `s` to the UART data register.
    pub fn print(self, s: &str) -> Self {
        s.bytes().fold(self.dx(0x3f8), Asm::out)
    }
    /// i8042 reset: 0xFE to port 0x64.
    pub fn reset(self) -> Self {
        self.dx(0x64).out(0xfe)
    }
    /// `hlt; jmp $-1`: stop here.
    pub fn park(mut self) -> Self {
        self.0.extend_from_slice(&[0xf4, 0xeb, 0xfd]);
        self
    }
    pub fn raw(mut self, b: &[u8]) -> Self {
        self.0.extend_from_slice(b);
        self
    }
}
