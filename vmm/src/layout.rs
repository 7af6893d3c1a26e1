//! The guest physical memory map (see the crate docs for the picture) and the e820 table.

/// GDT (5 entries).
pub const GDT_ADDR: u64 = 0x500;
/// IDT (empty, limit 7).
pub const IDT_ADDR: u64 = 0x530;
/// `boot_params` (the zero page).
pub const ZERO_PAGE: u64 = 0x7000;
/// Initial stack pointer.
pub const BOOT_STACK: u64 = 0x8ff0;
/// Page map level 4.
pub const PML4: u64 = 0x9000;
/// Page directory pointer table.
pub const PDPT: u64 = 0xa000;
/// First of four page directories (4 GiB in 2 MiB pages).
pub const PD: u64 = 0xb000;
/// Kernel command line.
pub const CMDLINE: u64 = 0x20000;
/// Largest command line (bytes, with the NUL), the Debian kernel's `cmdline_size` + 1.
pub const CMDLINE_MAX: usize = 0x800;
/// End of the low RAM the e820 reports below the EBDA.
pub const EBDA_START: u64 = 0x9fc00;
/// ACPI tables (RSDP first), inside the reserved BIOS area the kernel scans.
pub const ACPI_START: u64 = 0xe0000;
/// End of the reserved BIOS area.
pub const ACPI_END: u64 = 0x100000;
/// Where the protected-mode kernel goes (the bzImage's `code32_start`).
pub const KERNEL_START: u64 = 0x100000;
/// Start of the 32-bit MMIO hole; low RAM ends here at the latest.
pub const MMIO_HOLE: u64 = 0xc000_0000;
/// RAM above the hole starts at 4 GiB.
pub const HIGH_RAM: u64 = 1 << 32;
/// First virtio-mmio window.
pub const VIRTIO_MMIO_BASE: u64 = 0xd000_0000;
/// Size of each virtio-mmio window.
pub const VIRTIO_MMIO_SIZE: u64 = 0x1000;
/// The PCI host bridge's 32-bit MMIO window (the BARs), in the DSDT's `PCI0._CRS`.
pub const PCI_MMIO_BASE: u64 = 0xe000_0000;
/// Size of the PCI MMIO window.
pub const PCI_MMIO_SIZE: u64 = 0x1000_0000;
/// First GSI of the MSI-X vectors (after the IOAPIC's 24 pins); disk `i` has
/// [`PCI_VECTORS_PER_DISK`] from `PCI_MSI_GSI_BASE + i * PCI_VECTORS_PER_DISK`.
pub const PCI_MSI_GSI_BASE: u32 = 24;
/// GSIs reserved per virtio-pci disk (its queues plus the config vector).
pub const PCI_VECTORS_PER_DISK: u32 = 8;
/// IOAPIC registers (in KVM).
pub const IOAPIC_ADDR: u32 = 0xfec0_0000;
/// Local APIC registers (in KVM).
pub const LAPIC_ADDR: u32 = 0xfee0_0000;
/// Serial port base and GSI.
pub const SERIAL_PORT: u16 = 0x3f8;
/// GSI (IOAPIC pin) of the serial port.
pub const SERIAL_GSI: u32 = 4;
/// i8042 data and command ports.
pub const I8042_DATA: u16 = 0x60;
/// i8042 command/status port.
pub const I8042_COMMAND: u16 = 0x64;
/// ACPI sleep control register (FADT `SLEEP_CONTROL_REG`); status at +1.
pub const ACPI_SLEEP_PORT: u16 = 0x600;
/// The PCI hotplug register block (pci transport): see `devices::hotplug`.
pub const HOTPLUG_PORT: u16 = 0x0700;
/// GSI the VMM raises when PCI slots change (pci transport only: there the virtio-mmio GSIs,
/// this one included, are unused); the GED's second interrupt.
pub const HOTPLUG_GSI: u32 = 22;
/// GSI of every PCI function's INTA# (pci transport only, where the virtio-mmio GSIs are
/// unused): one shared, level-triggered pin, named for every slot in the DSDT's `PCI0._PRT`.
pub const PCI_INTX_GSI: u32 = 16;
/// GSI of the first virtio device; device `i` uses `VIRTIO_GSI_BASE + i`.
pub const VIRTIO_GSI_BASE: u32 = 5;
/// GSI of the ACPI Generic Event Device (the power button), the last IOAPIC pin.
pub const GED_GSI: u32 = 23;
/// IOAPIC pins are 0..=23; the last is the GED's.
pub const MAX_VIRTIO_DEVICES: usize = (GED_GSI - VIRTIO_GSI_BASE) as usize;

/// Smallest guest RAM accepted: the Debian kernel decompresses into about 52 MiB above 16 MiB.
pub const MIN_MEMORY: u64 = 128 << 20;

/// e820 entry types.
pub const E820_RAM: u32 = 1;
/// Reserved e820 range.
pub const E820_RESERVED: u32 = 2;

/// MMIO window of virtio device `i`.
pub fn virtio_mmio_addr(i: usize) -> u64 {
    VIRTIO_MMIO_BASE + i as u64 * VIRTIO_MMIO_SIZE
}

/// GSI of virtio device `i`.
pub fn virtio_gsi(i: usize) -> u32 {
    VIRTIO_GSI_BASE + i as u32
}

/// BAR0 of virtio-pci disk `i` (assigned by the VMM, as firmware would).
pub fn pci_bar_addr(i: usize) -> u64 {
    PCI_MMIO_BASE + i as u64 * crate::devices::virtio_pci::BAR0_SIZE
}

/// RAM regions `(start, length)` for `memory` bytes: below the hole, then above 4 GiB.
pub fn ram_regions(memory: u64) -> Vec<(u64, u64)> {
    let low = memory.min(MMIO_HOLE);
    let mut r = vec![(0, low)];
    if memory > low {
        r.push((HIGH_RAM, memory - low));
    }
    r
}

/// The e820 map `(addr, size, type)` for `memory` bytes of RAM.
pub fn e820_map(memory: u64) -> Vec<(u64, u64, u32)> {
    let regions = ram_regions(memory);
    let low_end = regions[0].1;
    let mut m = vec![
        (0, EBDA_START, E820_RAM),
        (EBDA_START, ACPI_END - EBDA_START, E820_RESERVED),
        (KERNEL_START, low_end - KERNEL_START, E820_RAM),
    ];
    if let Some(&(start, len)) = regions.get(1) {
        m.push((start, len, E820_RAM));
    }
    m
}

/// Where an initrd of `size` bytes goes: the highest page-aligned address below the end of low
/// RAM and below `addr_max` (the header's `initrd_addr_max`, inclusive), and not below
/// `lowest` (the end of what the kernel needs: its load address plus `init_size`).
pub fn initrd_addr(memory: u64, size: u64, addr_max: u64, lowest: u64) -> Option<u64> {
    let low_end = memory.min(MMIO_HOLE);
    let end = low_end.min(addr_max.saturating_add(1));
    let start = end.checked_sub(size)? & !0xfff;
    (start >= lowest).then_some(start)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn small_memory_is_one_low_region() {
        assert_eq!(ram_regions(512 << 20), vec![(0, 512 << 20)]);
        let m = e820_map(512 << 20);
        assert_eq!(m[0], (0, 0x9fc00, E820_RAM));
        assert_eq!(m[1], (0x9fc00, 0x100000 - 0x9fc00, E820_RESERVED));
        assert_eq!(m[2], (0x100000, (512 << 20) - 0x100000, E820_RAM));
        assert_eq!(m.len(), 3);
    }

    #[test]
    fn large_memory_continues_above_4g() {
        let mem = 5u64 << 30;
        assert_eq!(
            ram_regions(mem),
            vec![(0, 0xc000_0000), (1 << 32, mem - 0xc000_0000)]
        );
        let m = e820_map(mem);
        assert_eq!(m[3], (1 << 32, mem - 0xc000_0000, E820_RAM));
        // Nothing in the e820 overlaps the MMIO hole.
        for &(a, s, t) in &m {
            if t == E820_RAM {
                assert!(a + s <= MMIO_HOLE || a >= HIGH_RAM);
            }
        }
    }

    #[test]
    fn acpi_tables_and_virtio_windows_are_outside_ram() {
        const { assert!(ACPI_START >= EBDA_START && ACPI_START < ACPI_END) };
        let last = virtio_mmio_addr(MAX_VIRTIO_DEVICES - 1) + VIRTIO_MMIO_SIZE;
        assert!(VIRTIO_MMIO_BASE >= MMIO_HOLE && last <= u64::from(IOAPIC_ADDR));
        assert_eq!(virtio_gsi(MAX_VIRTIO_DEVICES - 1), GED_GSI - 1);
        let bars = pci_bar_addr(MAX_VIRTIO_DEVICES);
        assert!(last <= PCI_MMIO_BASE && bars <= PCI_MMIO_BASE + PCI_MMIO_SIZE);
        assert!(PCI_MMIO_BASE + PCI_MMIO_SIZE <= u64::from(IOAPIC_ADDR));
    }

    #[test]
    fn initrd_goes_high_page_aligned_and_below_the_limit() {
        let mem = 512 << 20;
        let a = initrd_addr(mem, 10_000_001, 0x7fff_ffff, 0x500_0000).unwrap();
        assert_eq!(a % 4096, 0);
        assert!(a + 10_000_001 <= mem);
        assert!(mem - (a + 10_000_001) < 4096);
        // Limited by initrd_addr_max when RAM is larger.
        let a = initrd_addr(3 << 30, 4096, 0x7fff_ffff, 0).unwrap();
        assert_eq!(a, 0x8000_0000 - 4096);
        // Too little room above what the kernel needs.
        assert_eq!(
            initrd_addr(128 << 20, 100 << 20, 0x7fff_ffff, 64 << 20),
            None
        );
        assert_eq!(initrd_addr(128 << 20, 1 << 40, 0x7fff_ffff, 0), None);
    }
}
