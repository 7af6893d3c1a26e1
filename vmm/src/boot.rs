//! The 64-bit Linux boot protocol (Documentation/arch/x86/boot.rst): the bzImage's
//! protected-mode part at `code32_start`, `boot_params` with the setup header, e820 map,
//! command line, initrd and RSDP address, identity page tables, a flat GDT, and the entry state
//! (long mode, paging on, interrupts off, RSI = boot_params, RIP = load address + 0x200).

use std::fs::File;
use std::path::Path;

use kvm_bindings::{kvm_segment, kvm_sregs};
use linux_loader::bootparam::boot_params;
use linux_loader::loader::bzimage::BzImage;
use linux_loader::loader::KernelLoader;
use vm_memory::{Bytes, GuestAddress, GuestMemoryMmap};

use crate::layout::{self, *};
use crate::{Error, Result};

/// `boot_params.hdr.type_of_loader`: "undefined" loader.
const LOADER_TYPE: u8 = 0xff;
/// `boot_flag` magic.
const BOOT_FLAG: u16 = 0xaa55;
/// `header` magic "HdrS".
const HDRS: u32 = 0x5372_6448;
/// `loadflags` bit: the protected-mode code is loaded at 0x100000.
const LOADED_HIGH: u8 = 0x01;
/// `loadflags` bit: the loader does not reuse the heap (`heap_end_ptr` valid).
const CAN_USE_HEAP: u8 = 0x80;
/// `xloadflags` bit: the kernel has the 64-bit entry point at +0x200.
const XLF_KERNEL_64: u16 = 0x01;
/// `acpi_rsdp_addr` exists from boot protocol 2.14.
const PROTOCOL_ACPI_RSDP: u16 = 0x020e;

/// What the vCPU needs to start the kernel.
#[derive(Debug, Clone, Copy)]
pub struct BootInfo {
    /// 64-bit entry point.
    pub entry: u64,
}

/// GDT entry from flags, base and limit (the layout of the x86 segment descriptor).
pub const fn gdt_entry(flags: u16, base: u32, limit: u32) -> u64 {
    ((base as u64 & 0xff00_0000) << (56 - 24))
        | ((flags as u64 & 0x0000_f0ff) << 40)
        | ((limit as u64 & 0x000f_0000) << (48 - 16))
        | ((base as u64 & 0x00ff_ffff) << 16)
        | (limit as u64 & 0x0000_ffff)
}

/// The boot GDT: null, null, `__BOOT_CS` (0x10, 64-bit code), `__BOOT_DS` (0x18, data), TSS.
pub const GDT: [u64; 5] = [
    0,
    0,
    gdt_entry(0xa09b, 0, 0xfffff),
    gdt_entry(0xc093, 0, 0xfffff),
    gdt_entry(0x808b, 0, 0xfffff),
];

/// Selector of the code segment.
pub const BOOT_CS: u16 = 0x10;
/// Selector of the data segments.
pub const BOOT_DS: u16 = 0x18;
/// Selector of the TSS.
pub const BOOT_TSS: u16 = 0x20;

/// A GDT entry as KVM's segment register, for selector `index * 8`.
pub fn segment_from_gdt(entry: u64, index: u16) -> kvm_segment {
    let base = ((entry >> 16) & 0xff_ffff) | ((entry >> 32) & 0xff00_0000);
    let raw_limit = ((entry & 0xffff) | ((entry >> 32) & 0xf_0000)) as u32;
    let g = ((entry >> 55) & 1) as u8;
    let limit = if g == 1 {
        (raw_limit << 12) | 0xfff
    } else {
        raw_limit
    };
    kvm_segment {
        base,
        limit,
        selector: index * 8,
        type_: ((entry >> 40) & 0xf) as u8,
        present: ((entry >> 47) & 1) as u8,
        dpl: ((entry >> 45) & 3) as u8,
        db: ((entry >> 54) & 1) as u8,
        s: ((entry >> 44) & 1) as u8,
        l: ((entry >> 53) & 1) as u8,
        g,
        avl: ((entry >> 52) & 1) as u8,
        unusable: u8::from(((entry >> 47) & 1) == 0),
        padding: 0,
    }
}

/// Long-mode special registers on top of what KVM reports (`sregs`): flat segments from
/// [`GDT`], GDT/IDT, paging with [`PML4`], PAE, long mode.
pub fn long_mode_sregs(mut sregs: kvm_sregs) -> kvm_sregs {
    let code = segment_from_gdt(GDT[2], BOOT_CS / 8);
    let data = segment_from_gdt(GDT[3], BOOT_DS / 8);
    let tss = segment_from_gdt(GDT[4], BOOT_TSS / 8);
    sregs.gdt.base = GDT_ADDR;
    sregs.gdt.limit = (std::mem::size_of_val(&GDT) - 1) as u16;
    sregs.idt.base = IDT_ADDR;
    sregs.idt.limit = 7;
    sregs.cs = code;
    sregs.ds = data;
    sregs.es = data;
    sregs.fs = data;
    sregs.gs = data;
    sregs.ss = data;
    sregs.tr = tss;
    const CR0_PE: u64 = 1;
    const CR0_ET: u64 = 1 << 4;
    const CR0_PG: u64 = 1 << 31;
    const CR4_PAE: u64 = 1 << 5;
    const EFER_LME: u64 = 1 << 8;
    const EFER_LMA: u64 = 1 << 10;
    sregs.cr0 |= CR0_PE | CR0_ET | CR0_PG;
    sregs.cr3 = PML4;
    sregs.cr4 |= CR4_PAE;
    sregs.efer |= EFER_LME | EFER_LMA;
    sregs
}

/// Identity page tables for the first 4 GiB in 2 MiB pages: `(address, u64 entries)`.
pub fn page_tables() -> Vec<(u64, Vec<u64>)> {
    const PRESENT_RW: u64 = 0x3;
    const PAGE_SIZE_2M: u64 = 0x80;
    let mut tables = vec![(PML4, vec![PDPT | PRESENT_RW])];
    tables.push((
        PDPT,
        (0..4).map(|i| (PD + i * 0x1000) | PRESENT_RW).collect(),
    ));
    for i in 0..4u64 {
        let entries = (0..512u64)
            .map(|j| ((i * 512 + j) << 21) | PRESENT_RW | PAGE_SIZE_2M)
            .collect();
        tables.push((PD + i * 0x1000, entries));
    }
    tables
}

/// Fills `params` (which holds the setup header read from the image) for our memory map.
pub fn fill_boot_params(
    params: &mut boot_params,
    memory: u64,
    cmdline_len: usize,
    initrd: Option<(u64, u64)>,
    rsdp: u64,
) -> Result<()> {
    let hdr = &mut params.hdr;
    if hdr.header != HDRS {
        return Err(Error::Config("not a bzImage (no HdrS signature)".into()));
    }
    if hdr.version < PROTOCOL_ACPI_RSDP || hdr.xloadflags & XLF_KERNEL_64 == 0 {
        return Err(Error::Config(format!(
            "the kernel has boot protocol {}.{:02} and xloadflags {:#x}; the 64-bit entry of \
             protocol 2.14 or later is needed",
            hdr.version >> 8,
            hdr.version & 0xff,
            { hdr.xloadflags }
        )));
    }
    if cmdline_len > hdr.cmdline_size as usize {
        return Err(Error::Config(format!(
            "the command line is {cmdline_len} bytes, the kernel takes {}",
            { hdr.cmdline_size }
        )));
    }
    hdr.type_of_loader = LOADER_TYPE;
    hdr.boot_flag = BOOT_FLAG;
    hdr.loadflags |= LOADED_HIGH | CAN_USE_HEAP;
    hdr.heap_end_ptr = 0xfe00;
    hdr.cmd_line_ptr = CMDLINE as u32;
    hdr.cmdline_size = cmdline_len as u32;
    if let Some((addr, size)) = initrd {
        hdr.ramdisk_image = addr as u32;
        hdr.ramdisk_size = size as u32;
    }
    params.acpi_rsdp_addr = rsdp;
    let map = layout::e820_map(memory);
    for (i, &(addr, size, type_)) in map.iter().enumerate() {
        params.e820_table[i].addr = addr;
        params.e820_table[i].size = size;
        params.e820_table[i].r#type = type_;
    }
    params.e820_entries = map.len() as u8;
    Ok(())
}

/// Loads the kernel, initrd and command line into `mem` and writes boot_params, page tables
/// and the GDT. `memory` is the RAM size; `rsdp` the address of the ACPI RSDP.
pub fn load(
    mem: &GuestMemoryMmap,
    memory: u64,
    kernel: &Path,
    initrd: Option<&Path>,
    cmdline: &str,
    rsdp: u64,
) -> Result<BootInfo> {
    let file_err = |path: &Path| {
        let path = path.to_path_buf();
        move |source| Error::File { path, source }
    };
    let mut kfile = File::open(kernel).map_err(file_err(kernel))?;
    let loaded =
        BzImage::load(mem, None, &mut kfile, Some(GuestAddress(KERNEL_START))).map_err(|e| {
            Error::Kernel {
                path: kernel.to_path_buf(),
                detail: e.to_string(),
            }
        })?;
    let hdr = loaded.setup_header.ok_or_else(|| Error::Kernel {
        path: kernel.to_path_buf(),
        detail: "no setup header".into(),
    })?;
    let mut params = boot_params {
        hdr,
        ..Default::default()
    };

    // The kernel decompresses at max(load address, pref_address) up to init_size bytes; keep
    // the initrd above that (KASLR also avoids the initrd, so this is the conservative bound).
    let kernel_top = hdr
        .pref_address
        .max(KERNEL_START)
        .max(loaded.kernel_load.0)
        .saturating_add(u64::from(hdr.init_size))
        .max(loaded.kernel_end);
    if kernel_top > memory.min(MMIO_HOLE) {
        return Err(Error::Config(format!(
            "{} MiB of memory is too little for this kernel (it needs {} MiB to decompress)",
            memory >> 20,
            kernel_top.div_ceil(1 << 20)
        )));
    }
    let mut initrd_range = None;
    if let Some(path) = initrd {
        let mut f = File::open(path).map_err(file_err(path))?;
        let size = f.metadata().map_err(file_err(path))?.len();
        let max = if hdr.initrd_addr_max == 0 {
            0x37ff_ffff
        } else {
            u64::from(hdr.initrd_addr_max)
        };
        let addr = layout::initrd_addr(memory, size, max, kernel_top).ok_or_else(|| {
            Error::Config(format!(
                "the initrd ({} MiB) does not fit in {} MiB of memory beside the kernel",
                size.div_ceil(1 << 20),
                memory >> 20
            ))
        })?;
        mem.read_exact_volatile_from(GuestAddress(addr), &mut f, size as usize)
            .map_err(|e| Error::File {
                path: path.to_path_buf(),
                source: std::io::Error::other(e.to_string()),
            })?;
        initrd_range = Some((addr, size));
    }

    let mut bytes = cmdline.as_bytes().to_vec();
    if bytes.contains(&0) || bytes.len() + 1 > CMDLINE_MAX {
        return Err(Error::Config(format!(
            "the kernel command line must be at most {} bytes without NUL",
            CMDLINE_MAX - 1
        )));
    }
    fill_boot_params(&mut params, memory, bytes.len(), initrd_range, rsdp)?;
    bytes.push(0);
    let write = |what: &str, r: std::result::Result<(), vm_memory::GuestMemoryError>| {
        r.map_err(|e| Error::Setup(format!("write the {what} to guest memory: {e}")))
    };
    write(
        "command line",
        mem.write_slice(&bytes, GuestAddress(CMDLINE)),
    )?;
    write(
        "boot parameters",
        mem.write_obj(params, GuestAddress(ZERO_PAGE)),
    )?;
    for (addr, entries) in page_tables() {
        for (i, e) in entries.iter().enumerate() {
            write(
                "page tables",
                mem.write_obj(*e, GuestAddress(addr + 8 * i as u64)),
            )?;
        }
    }
    for (i, e) in GDT.iter().enumerate() {
        write(
            "GDT",
            mem.write_obj(*e, GuestAddress(GDT_ADDR + 8 * i as u64)),
        )?;
    }
    write("IDT", mem.write_obj(0u64, GuestAddress(IDT_ADDR)))?;
    Ok(BootInfo {
        entry: loaded.kernel_load.0 + 0x200,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::mem::{offset_of, size_of};

    #[test]
    fn boot_params_fields_sit_at_the_protocol_offsets() {
        assert_eq!(size_of::<boot_params>(), 4096);
        assert_eq!(offset_of!(boot_params, acpi_rsdp_addr), 0x070);
        assert_eq!(offset_of!(boot_params, e820_entries), 0x1e8);
        assert_eq!(offset_of!(boot_params, hdr), 0x1f1);
        assert_eq!(offset_of!(boot_params, e820_table), 0x2d0);
        let hdr = offset_of!(boot_params, hdr);
        use linux_loader::bootparam::setup_header as H;
        assert_eq!(hdr + offset_of!(H, type_of_loader), 0x210);
        assert_eq!(hdr + offset_of!(H, loadflags), 0x211);
        assert_eq!(hdr + offset_of!(H, ramdisk_image), 0x218);
        assert_eq!(hdr + offset_of!(H, ramdisk_size), 0x21c);
        assert_eq!(hdr + offset_of!(H, cmd_line_ptr), 0x228);
        assert_eq!(hdr + offset_of!(H, initrd_addr_max), 0x22c);
        assert_eq!(hdr + offset_of!(H, cmdline_size), 0x238);
        assert_eq!(hdr + offset_of!(H, xloadflags), 0x236);
        assert_eq!(hdr + offset_of!(H, init_size), 0x260);
    }

    fn header() -> boot_params {
        let mut p = boot_params::default();
        p.hdr.header = HDRS;
        p.hdr.version = 0x020f;
        p.hdr.xloadflags = 0x7f;
        p.hdr.cmdline_size = 0x7ff;
        p
    }

    #[test]
    fn boot_params_carry_cmdline_initrd_rsdp_and_e820() {
        let mut p = header();
        fill_boot_params(&mut p, 256 << 20, 42, Some((0x0f00_0000, 12345)), 0xe0000).unwrap();
        let hdr = p.hdr;
        assert_eq!(hdr.type_of_loader, 0xff);
        assert_eq!({ hdr.boot_flag }, 0xaa55);
        assert_eq!({ hdr.cmd_line_ptr }, 0x20000);
        assert_eq!({ hdr.cmdline_size }, 42);
        assert_eq!({ hdr.ramdisk_image }, 0x0f00_0000);
        assert_eq!({ hdr.ramdisk_size }, 12345);
        assert_eq!(hdr.loadflags & LOADED_HIGH, LOADED_HIGH);
        assert_eq!({ p.acpi_rsdp_addr }, 0xe0000);
        assert_eq!(p.e820_entries, 3);
        let last = p.e820_table[2];
        assert_eq!(
            ({ last.addr }, { last.size }),
            (0x100000, (256 << 20) - 0x100000)
        );
    }

    #[test]
    fn old_or_32_bit_only_kernels_and_long_cmdlines_are_refused() {
        let mut p = header();
        p.hdr.version = 0x020c;
        assert!(fill_boot_params(&mut p, 256 << 20, 1, None, 0).is_err());
        let mut p = header();
        p.hdr.xloadflags = 0;
        assert!(fill_boot_params(&mut p, 256 << 20, 1, None, 0).is_err());
        let mut p = header();
        assert!(fill_boot_params(&mut p, 256 << 20, 0x800, None, 0).is_err());
        let mut p = header();
        p.hdr.header = 0;
        assert!(fill_boot_params(&mut p, 256 << 20, 1, None, 0).is_err());
    }

    #[test]
    fn gdt_entries_decode_to_flat_long_mode_segments() {
        // Known encodings (the Linux boot GDT).
        assert_eq!(GDT[2], 0x00af_9b00_0000_ffff);
        assert_eq!(GDT[3], 0x00cf_9300_0000_ffff);
        let cs = segment_from_gdt(GDT[2], 2);
        assert_eq!((cs.selector, cs.base, cs.limit), (0x10, 0, 0xffff_ffff));
        assert_eq!((cs.l, cs.db, cs.present, cs.s, cs.type_), (1, 0, 1, 1, 0xb));
        let ds = segment_from_gdt(GDT[3], 3);
        assert_eq!((ds.selector, ds.db, ds.l, ds.type_), (0x18, 1, 0, 3));
        let tss = segment_from_gdt(GDT[4], 4);
        assert_eq!((tss.s, tss.type_, tss.unusable), (0, 0xb, 0));
        let null = segment_from_gdt(0, 0);
        assert_eq!(null.unusable, 1);
    }

    #[test]
    fn sregs_enter_long_mode_with_paging() {
        let s = long_mode_sregs(kvm_sregs::default());
        assert_eq!(s.cr0 & 0x8000_0001, 0x8000_0001);
        assert_eq!(s.cr3, PML4);
        assert_ne!(s.cr4 & (1 << 5), 0);
        assert_eq!(s.efer & 0x500, 0x500);
        assert_eq!(s.cs.selector, BOOT_CS);
        assert_eq!(s.ss.selector, BOOT_DS);
        assert_eq!(s.gdt.limit, 39);
    }

    #[test]
    fn page_tables_identity_map_4g_with_2m_pages() {
        let t = page_tables();
        assert_eq!(t[0], (PML4, vec![PDPT | 3]));
        assert_eq!(t[1].1.len(), 4);
        let pds: Vec<u64> = t[2..].iter().flat_map(|(_, e)| e.clone()).collect();
        assert_eq!(pds.len(), 2048);
        for (i, e) in pds.iter().enumerate() {
            assert_eq!(e & !0xfff, (i as u64) << 21);
            assert_eq!(e & 0xff, 0x83);
        }
        // Tables live below the command line and above the stack.
        assert!(t
            .iter()
            .all(|(a, _)| *a > BOOT_STACK && *a + 4096 <= CMDLINE));
    }
}
