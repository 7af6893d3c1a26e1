//! ACPI tables (hardware-reduced): RSDP → XSDT → FADT (→ DSDT) and MADT.
//!
//! - FADT: `HW_REDUCED_ACPI`, power and sleep buttons as control-method devices, no VGA, no
//!   MSI (unless the disks are on PCI: Linux disables MSI when the FADT says so), no CMOS RTC, no i8042 (IAPC_BOOT_ARCH bit 1 clear: the guest does not probe a
//!   keyboard controller; `reboot=k` still writes 0xFE to port 0x64), and the sleep
//!   control/status registers at I/O port 0x600/0x601 so `poweroff` can reach S5.
//! - MADT: one enabled local APIC per vCPU (APIC id = index), one IOAPIC (id 0, GSI 0-23),
//!   no PC-AT dual 8259 flag.
//! - DSDT: COM1 (`PNP0501`, I/O 0x3f8, GSI 4), one `LNRO0005` virtio-mmio device per disk
//!   (4 KiB window, edge-triggered active-high GSI), and `\_S5` for poweroff. With the pci
//!   transport instead: `PCI0`, a PCI host bridge (`PNP0A03`, segment 0, bus 0) whose `_CRS`
//!   gives bus 0 and the 32-bit BAR window; its config space is mechanism #1 (ports
//!   0xCF8/0xCFC, see `devices::pci`), so there is no MCFG; a `_PRT` that names one GSI
//!   ([`PCI_INTX_GSI`], level-triggered as PCI interrupts are) for INTA# of every slot, for
//!   drivers without MSI-X (see `devices::intx`); under it the ACPI hotplug slots `S001`..
//!   with `_ADR`, `_SUN`, `_EJ0` and the scan `PSCN` (see `devices::hotplug`).
//! - The power button of a hardware-reduced machine: a Generic Event Device (`ACPI0013`) with
//!   one edge-triggered GSI ([`GED_GSI`]) whose `_EVT` notifies `PWRB` (`PNP0C0C`) with 0x80
//!   ("button pressed"). The VMM presses it by raising that GSI (`vhdtool vm shutdown`); the
//!   guest's `button` driver turns it into a KEY_POWER input event for userspace. With the
//!   pci transport the GED has a second GSI ([`HOTPLUG_GSI`]): `_EVT` then runs `PCI0.PSCN`.

use acpi_tables::aml;
use acpi_tables::fadt::{FADTBuilder, Flags};
use acpi_tables::gas::{AccessSize, AddressSpace, GAS};
use acpi_tables::madt::{
    EnabledStatus, IoApic, LocalInterruptController, ProcessorLocalApic, MADT,
};
use acpi_tables::rsdp::Rsdp;
use acpi_tables::sdt::Sdt;
use acpi_tables::xsdt::XSDT;
use acpi_tables::Aml;

use crate::devices::hotplug::{self, RawAml};
use crate::layout::{
    self, ACPI_SLEEP_PORT, GED_GSI, HOTPLUG_GSI, IOAPIC_ADDR, LAPIC_ADDR, PCI_INTX_GSI,
    PCI_MMIO_BASE, PCI_MMIO_SIZE, SERIAL_GSI, SERIAL_PORT,
};

const OEM_ID: [u8; 6] = *b"VHDKIT";
const OEM_TABLE_ID: [u8; 8] = *b"VHDKITVM";
const OEM_REVISION: u32 = 1;

/// IAPC_BOOT_ARCH flags.
const IAPC_VGA_NOT_PRESENT: u16 = 1 << 2;
const IAPC_MSI_NOT_SUPPORTED: u16 = 1 << 3;
const IAPC_CMOS_RTC_NOT_PRESENT: u16 = 1 << 5;

/// A virtio-mmio device for the DSDT.
#[derive(Debug, Clone, Copy)]
pub struct MmioDevice {
    /// Register window.
    pub addr: u64,
    /// Window length.
    pub len: u64,
    /// IOAPIC GSI.
    pub gsi: u32,
}

/// The tables, laid out from `base`: `(guest address, bytes)` each, RSDP first at `base`;
/// with `pci`, the PCI host bridge too.
pub fn tables(base: u64, cpus: u8, devices: &[MmioDevice], pci: bool) -> Vec<(u64, Vec<u8>)> {
    let align = |a: u64| (a + 15) & !15;
    let rsdp_addr = base;
    let xsdt_addr = align(rsdp_addr + Rsdp::len() as u64);
    // The XSDT has two entries.
    let fadt_addr = align(xsdt_addr + 36 + 2 * 8);

    let dsdt = dsdt(devices, pci);
    let madt = madt(cpus);
    let fadt_len = acpi_tables::fadt::FADT::len() as u64;
    let madt_addr = align(fadt_addr + fadt_len);
    let dsdt_addr = align(madt_addr + madt.len() as u64);
    let fadt = aml_bytes(&fadt(dsdt_addr, pci));

    let mut xsdt = XSDT::new(OEM_ID, OEM_TABLE_ID, OEM_REVISION);
    xsdt.add_entry(fadt_addr);
    xsdt.add_entry(madt_addr);
    let xsdt = aml_bytes(&xsdt);
    debug_assert_eq!(xsdt.len(), 52);
    let rsdp = aml_bytes(&Rsdp::new(OEM_ID, xsdt_addr));
    vec![
        (rsdp_addr, rsdp),
        (xsdt_addr, xsdt),
        (fadt_addr, fadt),
        (madt_addr, madt),
        (dsdt_addr, dsdt),
    ]
}

fn fadt(dsdt_addr: u64, msi: bool) -> acpi_tables::fadt::FADT {
    let mut f = FADTBuilder::new(OEM_ID, OEM_TABLE_ID, OEM_REVISION)
        .dsdt_64(dsdt_addr)
        .flag(Flags::HwReducedAcpi)
        .flag(Flags::PwrButton)
        .flag(Flags::SlpButton);
    let no_msi = if msi { 0 } else { IAPC_MSI_NOT_SUPPORTED };
    f.iapc_boot_arch = (IAPC_VGA_NOT_PRESENT | no_msi | IAPC_CMOS_RTC_NOT_PRESENT).into();
    f.sleep_control_reg = GAS::new(
        AddressSpace::SystemIo,
        8,
        0,
        AccessSize::ByteAccess,
        u64::from(ACPI_SLEEP_PORT),
    );
    f.sleep_status_reg = GAS::new(
        AddressSpace::SystemIo,
        8,
        0,
        AccessSize::ByteAccess,
        u64::from(ACPI_SLEEP_PORT + 1),
    );
    f.hypervisor_vendor_identity = u64::from_le_bytes(*b"VHDKITVM").into();
    f.finalize()
}

fn madt(cpus: u8) -> Vec<u8> {
    let mut m = MADT::new(
        OEM_ID,
        OEM_TABLE_ID,
        OEM_REVISION,
        LocalInterruptController::Address(LAPIC_ADDR),
    );
    for i in 0..cpus {
        m.add_structure(ProcessorLocalApic::new(i, i, EnabledStatus::Enabled));
    }
    m.add_structure(IoApic::new(0, IOAPIC_ADDR, 0));
    aml_bytes(&m)
}

fn aml_bytes(t: &dyn Aml) -> Vec<u8> {
    let mut v = Vec::new();
    t.to_aml_bytes(&mut v);
    v
}

/// `Device(COM1)`: the 16550A at 0x3f8, GSI 4.
fn com1() -> Vec<u8> {
    let io = aml::IO::new(SERIAL_PORT, SERIAL_PORT, 1, 8);
    let irq = aml::Interrupt::new(true, true, false, false, SERIAL_GSI);
    let crs = aml::ResourceTemplate::new(vec![&io, &irq]);
    let hid = aml::EISAName::new("PNP0501");
    let name_hid = aml::Name::new("_HID".into(), &hid);
    let name_uid = aml::Name::new("_UID".into(), &aml::ZERO);
    let name_crs = aml::Name::new("_CRS".into(), &crs);
    aml_bytes(&aml::Device::new(
        "COM1".into(),
        vec![&name_hid, &name_uid, &name_crs],
    ))
}

/// `Device(Vnnn)`: virtio-mmio device `i` (`LNRO0005`).
fn virtio_device(i: usize, d: &MmioDevice) -> Vec<u8> {
    let mem = aml::Memory32Fixed::new(true, d.addr as u32, d.len as u32);
    let irq = aml::Interrupt::new(true, true, false, false, d.gsi);
    let crs = aml::ResourceTemplate::new(vec![&mem, &irq]);
    let hid: aml::AmlStr = "LNRO0005";
    let uid = i as u32;
    let name_hid = aml::Name::new("_HID".into(), &hid);
    let name_uid = aml::Name::new("_UID".into(), &uid);
    let name_cca = aml::Name::new("_CCA".into(), &aml::ONE);
    let name_crs = aml::Name::new("_CRS".into(), &crs);
    let name = format!("V{i:03}");
    aml_bytes(&aml::Device::new(
        name.as_str().into(),
        vec![&name_hid, &name_uid, &name_cca, &name_crs],
    ))
}

/// `Device(PWRB)` and `Device(GED0)`: the power button and the event device that presses it;
/// with `hotplug`, the GED also has [`HOTPLUG_GSI`], which runs the PCI slot scan.
fn power_button(hotplug: bool) -> Vec<u8> {
    let hid = aml::EISAName::new("PNP0C0C");
    let name_hid = aml::Name::new("_HID".into(), &hid);
    let name_uid = aml::Name::new("_UID".into(), &aml::ZERO);
    let mut v = aml_bytes(&aml::Device::new("PWRB".into(), vec![&name_hid, &name_uid]));
    let ged_hid: aml::AmlStr = "ACPI0013";
    let name_hid = aml::Name::new("_HID".into(), &ged_hid);
    let irq = aml::Interrupt::new(true, true, false, false, GED_GSI);
    let hp_irq = aml::Interrupt::new(true, true, false, false, HOTPLUG_GSI);
    let crs = if hotplug {
        aml::ResourceTemplate::new(vec![&irq, &hp_irq])
    } else {
        aml::ResourceTemplate::new(vec![&irq])
    };
    let name_crs = aml::Name::new("_CRS".into(), &crs);
    let pwrb = aml::Path::new("PWRB");
    let pressed = 0x80u8;
    let notify = aml::Notify::new(&pwrb, &pressed);
    let dispatch = RawAml(hotplug::ged_event_aml());
    let body: &dyn Aml = if hotplug { &dispatch } else { &notify };
    let evt = aml::Method::new("_EVT".into(), 1, true, vec![body]);
    v.extend(aml_bytes(&aml::Device::new(
        "GED0".into(),
        vec![&name_hid, &name_uid, &name_crs, &evt],
    )));
    v
}

/// `Name(_PRT, ...)`: INTA# of slots `1..=slots` on GSI [`PCI_INTX_GSI`] (source 0: a GSI,
/// which the OS programs level-triggered, active-low).
fn pci_routing(slots: u8) -> Vec<u8> {
    let (pin, source, gsi) = (0u8, 0u8, PCI_INTX_GSI);
    let addrs: Vec<u32> = (1..=u32::from(slots)).map(|d| (d << 16) | 0xffff).collect();
    let entries: Vec<aml::Package> = addrs
        .iter()
        .map(|a| aml::Package::new(vec![a, &pin, &source, &gsi]))
        .collect();
    let table = aml::Package::new(entries.iter().map(|e| e as &dyn Aml).collect());
    aml_bytes(&aml::Name::new("_PRT".into(), &table))
}

/// `Device(PCI0)`: the host bridge, bus 0, the BAR window, INTx routing, and hotplug slots
/// `1..=slots`.
fn pci_host_bridge(slots: u8) -> Vec<u8> {
    let hid = aml::EISAName::new("PNP0A03");
    let name_hid = aml::Name::new("_HID".into(), &hid);
    let name_uid = aml::Name::new("_UID".into(), &aml::ZERO);
    let name_seg = aml::Name::new("_SEG".into(), &aml::ZERO);
    let name_bbn = aml::Name::new("_BBN".into(), &aml::ZERO);
    let bus = aml::AddressSpace::new_bus_number(0u16, 0u16);
    let window = aml::AddressSpace::new_memory(
        aml::AddressSpaceCacheable::NotCacheable,
        true,
        PCI_MMIO_BASE as u32,
        (PCI_MMIO_BASE + PCI_MMIO_SIZE - 1) as u32,
        None,
    );
    let crs = aml::ResourceTemplate::new(vec![&bus, &window]);
    let name_crs = aml::Name::new("_CRS".into(), &crs);
    let prt = RawAml(pci_routing(slots));
    let slots = RawAml(hotplug::pci0_aml(slots));
    aml_bytes(&aml::Device::new(
        "PCI0".into(),
        vec![
            &name_hid, &name_uid, &name_seg, &name_bbn, &name_crs, &prt, &slots,
        ],
    ))
}

fn dsdt(devices: &[MmioDevice], pci: bool) -> Vec<u8> {
    let mut sb = com1();
    sb.extend(power_button(pci));
    if pci {
        sb.extend(pci_host_bridge(crate::MAX_DISKS as u8));
    }
    for (i, d) in devices.iter().enumerate() {
        sb.extend(virtio_device(i, d));
    }
    let mut body = aml::Scope::raw("\\_SB_".into(), sb);
    let (five, zero) = (5u8, 0u8);
    let s5_pkg = aml::Package::new(vec![&five, &zero, &zero, &zero]);
    body.extend(aml_bytes(&aml::Name::new("_S5_".into(), &s5_pkg)));
    let mut dsdt = Sdt::new(*b"DSDT", 36, 6, OEM_ID, OEM_TABLE_ID, OEM_REVISION);
    dsdt.append_slice(&body);
    dsdt.as_slice().to_vec()
}

/// The DSDT devices for `n` virtio-mmio disks.
pub fn mmio_devices(n: usize) -> Vec<MmioDevice> {
    (0..n)
        .map(|i| MmioDevice {
            addr: layout::virtio_mmio_addr(i),
            len: layout::VIRTIO_MMIO_SIZE,
            gsi: layout::virtio_gsi(i),
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sum(b: &[u8]) -> u8 {
        b.iter().fold(0u8, |a, x| a.wrapping_add(*x))
    }

    fn u32_at(b: &[u8], off: usize) -> u32 {
        u32::from_le_bytes(b[off..off + 4].try_into().unwrap())
    }

    fn u64_at(b: &[u8], off: usize) -> u64 {
        u64::from_le_bytes(b[off..off + 8].try_into().unwrap())
    }

    fn find(t: &[(u64, Vec<u8>)], sig: &[u8]) -> (u64, Vec<u8>) {
        t.iter()
            .find(|(_, b)| &b[..sig.len()] == sig)
            .cloned()
            .unwrap_or_else(|| panic!("no {}", String::from_utf8_lossy(sig)))
    }

    #[test]
    fn every_table_checksums_to_zero_and_states_its_length() {
        let t = tables(0xe0000, 2, &mmio_devices(3), false);
        let (_, rsdp) = find(&t, b"RSD PTR ");
        assert_eq!(sum(&rsdp[..20]), 0, "RSDP v1 checksum");
        assert_eq!(sum(&rsdp), 0, "RSDP extended checksum");
        for sig in [b"XSDT", b"FACP", b"APIC", b"DSDT"] {
            let (_, b) = find(&t, sig);
            assert_eq!(sum(&b), 0, "{} checksum", String::from_utf8_lossy(sig));
            assert_eq!(u32_at(&b, 4) as usize, b.len(), "length field");
        }
    }

    #[test]
    fn tables_are_linked_and_do_not_overlap() {
        let t = tables(0xe0000, 1, &mmio_devices(1), false);
        assert_eq!(t[0].0, 0xe0000);
        let (_, rsdp) = find(&t, b"RSD PTR ");
        let (xsdt_addr, xsdt) = find(&t, b"XSDT");
        assert_eq!(u64_at(&rsdp, 24), xsdt_addr);
        let (fadt_addr, fadt) = find(&t, b"FACP");
        let (madt_addr, _) = find(&t, b"APIC");
        assert_eq!(u64_at(&xsdt, 36), fadt_addr);
        assert_eq!(u64_at(&xsdt, 44), madt_addr);
        let (dsdt_addr, _) = find(&t, b"DSDT");
        assert_eq!(u64_at(&fadt, 140), dsdt_addr, "X_DSDT");
        let mut spans: Vec<(u64, u64)> = t.iter().map(|(a, b)| (*a, a + b.len() as u64)).collect();
        spans.sort();
        for w in spans.windows(2) {
            assert!(w[0].1 <= w[1].0, "{w:?} overlap");
        }
        assert!(spans.last().unwrap().1 <= layout::ACPI_END);
    }

    #[test]
    fn fadt_is_hardware_reduced_without_i8042_and_with_sleep_registers() {
        let t = tables(0xe0000, 1, &[], false);
        let (_, fadt) = find(&t, b"FACP");
        assert_eq!(fadt.len(), 276);
        let flags = u32_at(&fadt, 112);
        assert_ne!(flags & (1 << 20), 0, "HW_REDUCED_ACPI");
        let iapc = u16::from_le_bytes([fadt[109], fadt[110]]);
        assert_eq!(iapc & 0x2, 0, "no 8042");
        assert_ne!(iapc & (1 << 5), 0, "no CMOS RTC");
        // SLEEP_CONTROL_REG at 244: system I/O space, port 0x600.
        assert_eq!(fadt[244], 1);
        assert_eq!(u64_at(&fadt, 248), 0x600);
        assert_eq!(u64_at(&fadt, 260), 0x601);
    }

    #[test]
    fn madt_lists_each_cpu_and_the_ioapic() {
        let t = tables(0xe0000, 4, &[], false);
        let (_, madt) = find(&t, b"APIC");
        assert_eq!(u32_at(&madt, 36), 0xfee0_0000);
        let mut off = 44;
        let mut cpus = Vec::new();
        let mut ioapics = Vec::new();
        while off < madt.len() {
            let (ty, len) = (madt[off], madt[off + 1] as usize);
            match ty {
                0 => {
                    assert_eq!(u32_at(&madt, off + 4) & 1, 1, "enabled");
                    cpus.push(madt[off + 3]);
                }
                1 => ioapics.push((u32_at(&madt, off + 4), u32_at(&madt, off + 8))),
                _ => panic!("unexpected MADT entry {ty}"),
            }
            off += len;
        }
        assert_eq!(cpus, vec![0, 1, 2, 3]);
        assert_eq!(ioapics, vec![(0xfec0_0000, 0)]);
    }

    #[test]
    fn madt_of_many_cpus_has_one_enabled_lapic_per_cpu_with_distinct_ids() {
        for n in [64u8, 128, crate::MAX_CPUS] {
            let t = tables(0xe0000, n, &mmio_devices(crate::MAX_DISKS), false);
            let (madt_addr, madt) = find(&t, b"APIC");
            assert_eq!(sum(&madt), 0);
            let (mut uids, mut ids) = (Vec::new(), Vec::new());
            let mut off = 44;
            while off < madt.len() {
                let (ty, len) = (madt[off], madt[off + 1] as usize);
                if ty == 0 {
                    assert_eq!(len, 8);
                    assert_eq!(u32_at(&madt, off + 4) & 1, 1, "enabled");
                    uids.push(madt[off + 2]);
                    ids.push(madt[off + 3]);
                }
                off += len;
            }
            assert_eq!(off, madt.len(), "entries fill the table exactly");
            let want: Vec<u8> = (0..n).collect();
            assert_eq!(ids, want, "APIC ids 0..{n}, the vCPU indexes");
            assert_eq!(uids, want, "processor UIDs");
            assert!(!ids.contains(&0xff), "0xff is the broadcast id");
            let end = t.iter().map(|(a, b)| a + b.len() as u64).max().unwrap();
            assert!(end <= layout::ACPI_END, "{n} CPUs: tables end at {end:#x}");
            assert!(madt_addr >= 0xe0000);
        }
    }

    #[test]
    fn dsdt_describes_com1_and_each_virtio_device() {
        let devs = mmio_devices(2);
        let t = tables(0xe0000, 1, &devs, false);
        let (_, dsdt) = find(&t, b"DSDT");
        let has = |needle: &[u8]| dsdt.windows(needle.len()).any(|w| w == needle);
        assert!(has(b"LNRO0005"));
        assert!(has(b"V000") && has(b"V001") && !has(b"V002"));
        assert!(has(b"COM1") && has(b"_S5_"));
        assert!(has(b"ACPI0013") && has(b"GED0") && has(b"_EVT") && has(b"PWRB"));
        let mut ged = vec![0x89, 6, 0, 0x03, 1];
        ged.extend_from_slice(&GED_GSI.to_le_bytes());
        assert!(has(&ged), "GED interrupt");
        // Memory32Fixed descriptors (0x86, length 9, RW) with each window.
        for d in &devs {
            let mut m = vec![0x86, 9, 0, 1];
            m.extend_from_slice(&(d.addr as u32).to_le_bytes());
            m.extend_from_slice(&(d.len as u32).to_le_bytes());
            assert!(has(&m), "window of {d:?}");
            // Extended interrupt descriptor: consumer, edge, active high, exclusive.
            let mut irq = vec![0x89, 6, 0, 0x03, 1];
            irq.extend_from_slice(&d.gsi.to_le_bytes());
            assert!(has(&irq), "interrupt of {d:?}");
        }
        let mut irq4 = vec![0x89, 6, 0, 0x03, 1];
        irq4.extend_from_slice(&4u32.to_le_bytes());
        assert!(has(&irq4), "COM1 interrupt");
    }

    #[test]
    fn pci_transport_adds_the_host_bridge_and_allows_msi() {
        let t = tables(0xe0000, 1, &[], true);
        let (_, dsdt) = find(&t, b"DSDT");
        assert_eq!(sum(&dsdt), 0);
        let has = |needle: &[u8]| dsdt.windows(needle.len()).any(|w| w == needle);
        assert!(has(b"PCI0") && has(b"_SEG") && has(b"_BBN") && has(b"_CRS"));
        assert!(!has(b"LNRO0005"), "no virtio-mmio device");
        // PNP0A03 as an EISA id.
        assert!(has(&[0x0c, 0x41, 0xd0, 0x0a, 0x03]), "PNP0A03");
        // WordBusNumber 0-0 (type 2), then DWordMemory 0xe000_0000-0xefff_ffff, producers.
        assert!(has(&[
            0x88, 13, 0, 2, 0x0c, 0, 0, 0, 0, 0, 0, 0, 0, 0, 1, 0
        ]));
        let mut mem = vec![0x87, 23, 0, 0, 0x0c, 1, 0, 0, 0, 0];
        mem.extend_from_slice(&0xe000_0000u32.to_le_bytes());
        mem.extend_from_slice(&0xefff_ffffu32.to_le_bytes());
        mem.extend_from_slice(&[0; 4]);
        mem.extend_from_slice(&0x1000_0000u32.to_le_bytes());
        assert!(has(&mem), "BAR window");
        let (_, fadt) = find(&t, b"FACP");
        let iapc = u16::from_le_bytes([fadt[109], fadt[110]]);
        assert_eq!(iapc & IAPC_MSI_NOT_SUPPORTED, 0, "MSI allowed");
        let t = tables(0xe0000, 1, &[], false);
        let (_, fadt) = find(&t, b"FACP");
        let iapc = u16::from_le_bytes([fadt[109], fadt[110]]);
        assert_ne!(iapc & IAPC_MSI_NOT_SUPPORTED, 0, "no MSI without PCI");
        let (_, dsdt) = find(&t, b"DSDT");
        assert!(!dsdt.windows(4).any(|w| w == b"PCI0"));
    }

    #[test]
    fn the_pci_dsdt_with_hotplug_slots_disassembles_cleanly_with_iasl() {
        if std::process::Command::new("iasl")
            .arg("-v")
            .output()
            .is_err()
        {
            assert!(
                std::env::var_os("CI").is_none(),
                "iasl (acpica-tools) is needed in CI"
            );
            eprintln!("SKIP: no iasl (apt-get install acpica-tools)");
            return;
        }
        let dir = tempfile::tempdir().unwrap();
        let t = tables(0xe0000, 2, &[], true);
        let (_, dsdt) = find(&t, b"DSDT");
        let path = dir.path().join("dsdt.dat");
        std::fs::write(&path, &dsdt).unwrap();
        let out = std::process::Command::new("iasl")
            .arg("-d")
            .arg(&path)
            .output()
            .unwrap();
        let log = format!(
            "{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        assert!(out.status.success(), "iasl -d failed:\n{log}");
        let dsl = std::fs::read_to_string(dir.path().join("dsdt.dsl")).unwrap();
        for want in [
            "Device (S001)",
            "Device (S018)",
            "Name (_ADR, 0x00120000)",
            "Name (_SUN, 0x12)",
            "Method (_EJ0, 1, NotSerialized)",
            "B0EJ = 0x00040000",
            "OperationRegion (PHPR, SystemIO, 0x0700, 0x0C)",
            "Method (PSCN, 0, Serialized)",
            "Notify (S002, 0x03)",
            "Notify (S018, One)",
            "If ((Arg0 == 0x16))",
            "\\_SB.PCI0.PSCN ()",
            "Notify (PWRB, 0x80)",
            "Name (_PRT, Package (0x12)",
            "0x0001FFFF",
            "0x0012FFFF",
        ] {
            assert!(dsl.contains(want), "no {want:?} in\n{dsl}");
        }
        // Re-compiling the disassembly finds no errors either.
        let out = std::process::Command::new("iasl")
            .arg(dir.path().join("dsdt.dsl"))
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "iasl could not compile its own disassembly:\n{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
    }
}
