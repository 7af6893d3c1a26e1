//! ACPI PCI hotplug: the register block the DSDT's AML reads to learn which slots changed and
//! writes to eject one, and that AML.
//!
//! ```text
//!  VMM (main thread)                         guest (ACPI, Linux acpiphp)
//!  add:    slot filled, UP |= 1<<d ──GSI──>  GED._EVT(HOTPLUG_GSI) → PCI0.PSCN:
//!  remove: DOWN |= 1<<d        ──GSI──>        reads PCIU, PCID (each read clears it),
//!                                              Notify(Sdd, 1) (device check: scan the slot)
//!                                              Notify(Sdd, 3) (eject request: unbind, then
//!  function of device d leaves bus 0 <──────   Sdd._EJ0 writes 1<<d to B0EJ)
//! ```
//!
//! Registers (I/O ports from [`HOTPLUG_PORT`], 32-bit little-endian, one bit per PCI device
//! number on bus 0):
//!
//! | offset | name | access |
//! |---|---|---|
//! | 0 | PCIU: slots added since the last read | read clears |
//! | 4 | PCID: slots the VMM asks the guest to eject | read clears |
//! | 8 | B0EJ: the guest ejected these slots | write |
//!
//! Facts used (ACPI 6.4 §5.6.6 notification values 1 = device check, 3 = eject request;
//! §6.3.3 `_EJ0`; §6.1.1 `_ADR` of a PCI device = device << 16 | function; §6.1.12 `_SUN`;
//! §5.6.9 the GED's `_EVT` gets the GSI as Arg0): Linux's acpiphp makes a slot of every
//! device object under the host bridge that has an `_ADR` and an `_EJ0`; on a device check it
//! scans that slot, on an eject request it unbinds the slot's functions and runs `_EJ0`.
//!
//! Invariants: only a 4-byte access at offset 0, 4 or 8 is a register; anything else reads 0
//! and writes nothing (logged), so a guest can never make the VMM fail; an eject only counts
//! for a slot the VMM asked to eject ([`Hotplug::request_remove`]), other bits are ignored.

use std::sync::Mutex;

use acpi_tables::aml;
use acpi_tables::Aml;

use crate::layout::{HOTPLUG_GSI, HOTPLUG_PORT};
use crate::state::pci::HotplugRegs;

/// Bytes of the register block.
pub const HOTPLUG_LEN: u16 = 12;
const PCIU: u16 = 0;
const PCID: u16 = 4;
const B0EJ: u16 = 8;

#[derive(Debug, Default)]
struct State {
    up: u32,
    down: u32,
    /// Slots asked to eject and not ejected yet.
    ejecting: u32,
}

/// The register block (shared by the vCPUs and the main thread).
#[derive(Debug, Default)]
pub struct Hotplug {
    state: Mutex<State>,
}

fn bit(device: u8) -> u32 {
    1u32.checked_shl(u32::from(device)).unwrap_or(0)
}

impl Hotplug {
    fn lock(&self) -> std::sync::MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Whether the port is one of the block's.
    pub fn owns_port(port: u16) -> bool {
        (HOTPLUG_PORT..HOTPLUG_PORT + HOTPLUG_LEN).contains(&port)
    }

    /// Device `device` was plugged in: the next scan reports it.
    pub fn request_add(&self, device: u8) {
        let mut s = self.lock();
        s.up |= bit(device);
        s.down &= !bit(device);
    }

    /// Asks the guest to eject device `device`.
    pub fn request_remove(&self, device: u8) {
        let mut s = self.lock();
        s.down |= bit(device);
        s.ejecting |= bit(device);
    }

    /// Withdraws the request to eject `device` (the guest did not within the timeout): a
    /// later `_EJ0` of it is ignored.
    pub fn cancel_remove(&self, device: u8) {
        let mut s = self.lock();
        s.down &= !bit(device);
        s.ejecting &= !bit(device);
    }

    /// The registers, for a checkpoint or migration.
    pub fn save(&self) -> HotplugRegs {
        let s = self.lock();
        HotplugRegs {
            up: s.up,
            down: s.down,
            ejecting: s.ejecting,
        }
    }

    /// Puts saved registers back (a restored guest that had not read PCIU yet still sees
    /// its added slots at its next scan).
    pub fn restore(&self, r: &HotplugRegs) {
        let mut s = self.lock();
        s.up = r.up;
        s.down = r.down;
        s.ejecting = r.ejecting;
    }

    /// A guest read.
    pub fn pio_in(&self, port: u16, data: &mut [u8]) {
        data.fill(0);
        let off = port.wrapping_sub(HOTPLUG_PORT);
        if data.len() != 4 {
            tracing::debug!(
                "hotplug register read of {} bytes at +{off} ignored",
                data.len()
            );
            return;
        }
        let mut s = self.lock();
        let v = match off {
            PCIU => std::mem::take(&mut s.up),
            PCID => std::mem::take(&mut s.down),
            _ => {
                tracing::debug!("hotplug register read at +{off} ignored");
                0
            }
        };
        data.copy_from_slice(&v.to_le_bytes());
    }

    /// A guest write: the devices it ejects (among those asked to), as a bit mask.
    pub fn pio_out(&self, port: u16, data: &[u8]) -> u32 {
        let off = port.wrapping_sub(HOTPLUG_PORT);
        let (B0EJ, &[a, b, c, d]) = (off, data) else {
            tracing::debug!(
                "hotplug register write of {} bytes at +{off} ignored",
                data.len()
            );
            return 0;
        };
        let v = u32::from_le_bytes([a, b, c, d]);
        let mut s = self.lock();
        let ejected = v & s.ejecting;
        if v & !ejected != 0 {
            tracing::debug!("eject of slots {:#x} not asked for: ignored", v & !ejected);
        }
        s.ejecting &= !ejected;
        ejected
    }
}

fn aml_bytes(t: &dyn Aml) -> Vec<u8> {
    let mut v = Vec::new();
    t.to_aml_bytes(&mut v);
    v
}

/// Name of the slot object of PCI device `d`.
fn slot_name(d: u8) -> String {
    format!("S{d:03}")
}

/// What goes inside `Device(PCI0)` for hotplug slots `1..=slots`: the register block as an
/// operation region, `PSCN` (the scan `GED0._EVT` calls) and one `Sddd` per slot with
/// `_ADR`, `_SUN` and `_EJ0`.
pub fn pci0_aml(slots: u8) -> Vec<u8> {
    let port = u32::from(HOTPLUG_PORT);
    let len = u32::from(HOTPLUG_LEN);
    let mut v = aml_bytes(&aml::OpRegion::new(
        "PHPR".into(),
        aml::OpRegionSpace::SystemIO,
        &port,
        &len,
    ));
    v.extend(aml_bytes(&aml::Field::new(
        "PHPR".into(),
        aml::FieldAccessType::DWord,
        aml::FieldLockRule::NoLock,
        aml::FieldUpdateRule::WriteAsZeroes,
        vec![
            aml::FieldEntry::Named(*b"PCIU", 32),
            aml::FieldEntry::Named(*b"PCID", 32),
            aml::FieldEntry::Named(*b"B0EJ", 32),
        ],
    )));
    // PSCN: Local0 = PCIU, Local1 = PCID, then per slot
    // If (Local0 & bit) { Notify (Sddd, 1) } and If (Local1 & bit) { Notify (Sddd, 3) }.
    let (up, down) = (aml::Local(0), aml::Local(1));
    let pciu = aml::Path::new("PCIU");
    let pcid = aml::Path::new("PCID");
    let store_up = aml::Store::new(&up, &pciu);
    let store_down = aml::Store::new(&down, &pcid);
    let mut body = aml_bytes(&store_up);
    body.extend(aml_bytes(&store_down));
    for d in 1..=slots {
        let b = bit(d);
        let path = aml::Path::new(&slot_name(d));
        for (local, event) in [(&up, 1u8), (&down, 3u8)] {
            let and = aml::And::new(&aml::ZERO, local, &b);
            let notify = aml::Notify::new(&path, &event);
            body.extend(aml_bytes(&aml::If::new(&and, vec![&notify])));
        }
    }
    let body = RawAml(body);
    v.extend(aml_bytes(&aml::Method::new(
        "PSCN".into(),
        0,
        true,
        vec![&body],
    )));
    for d in 1..=slots {
        let adr = u32::from(d) << 16;
        let sun = u32::from(d);
        let b = bit(d);
        let name_adr = aml::Name::new("_ADR".into(), &adr);
        let name_sun = aml::Name::new("_SUN".into(), &sun);
        let b0ej = aml::Path::new("B0EJ");
        let eject = aml::Store::new(&b0ej, &b);
        let ej0 = aml::Method::new("_EJ0".into(), 1, false, vec![&eject]);
        v.extend(aml_bytes(&aml::Device::new(
            slot_name(d).as_str().into(),
            vec![&name_adr, &name_sun, &ej0],
        )));
    }
    v
}

/// The body of `GED0._EVT` with PCI hotplug: `If (Arg0 == HOTPLUG_GSI) { \_SB.PCI0.PSCN () }
/// Else { Notify (PWRB, 0x80) }`.
pub fn ged_event_aml() -> Vec<u8> {
    let gsi = HOTPLUG_GSI;
    let is_hotplug = aml::Equal::new(&aml::Arg(0), &gsi);
    let scan = aml::MethodCall::new("\\_SB_.PCI0.PSCN".into(), vec![]);
    let pwrb = aml::Path::new("PWRB");
    let pressed = 0x80u8;
    let notify = aml::Notify::new(&pwrb, &pressed);
    let mut v = aml_bytes(&aml::If::new(&is_hotplug, vec![&scan]));
    v.extend(aml_bytes(&aml::Else::new(vec![&notify])));
    v
}

/// AML bytes already encoded, as one term of a list.
pub struct RawAml(pub Vec<u8>);

impl Aml for RawAml {
    fn to_aml_bytes(&self, sink: &mut dyn acpi_tables::AmlSink) {
        sink.vec(&self.0);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn read(h: &Hotplug, off: u16) -> u32 {
        let mut b = [0u8; 4];
        h.pio_in(HOTPLUG_PORT + off, &mut b);
        u32::from_le_bytes(b)
    }

    #[test]
    fn additions_and_removals_are_reported_once_each() {
        let h = Hotplug::default();
        assert_eq!((read(&h, PCIU), read(&h, PCID)), (0, 0));
        h.request_add(2);
        h.request_add(5);
        h.request_remove(3);
        assert_eq!(read(&h, PCIU), 1 << 2 | 1 << 5);
        assert_eq!(read(&h, PCIU), 0, "read clears");
        assert_eq!(read(&h, PCID), 1 << 3);
        assert_eq!(read(&h, PCID), 0);
    }

    #[test]
    fn only_slots_asked_to_eject_are_ejected_and_only_once() {
        let h = Hotplug::default();
        h.request_remove(3);
        assert_eq!(read(&h, PCID), 1 << 3);
        let ej = |v: u32| h.pio_out(HOTPLUG_PORT + B0EJ, &v.to_le_bytes());
        assert_eq!(ej(1 << 4), 0, "slot 4 was not asked to eject");
        assert_eq!(ej(1 << 3 | 1 << 4), 1 << 3);
        assert_eq!(ej(1 << 3), 0, "already ejected");
        h.request_remove(6);
        h.cancel_remove(6);
        assert_eq!(read(&h, PCID), 0, "cancelled before the guest looked");
        assert_eq!(ej(1 << 6), 0, "an eject after the timeout is ignored");
    }

    #[test]
    fn malformed_accesses_read_zero_and_change_nothing() {
        let h = Hotplug::default();
        h.request_add(1);
        h.request_remove(2);
        let mut one = [0xffu8; 1];
        h.pio_in(HOTPLUG_PORT, &mut one);
        assert_eq!(one, [0], "byte read");
        let mut two = [0xffu8; 2];
        h.pio_in(HOTPLUG_PORT + 4, &mut two);
        assert_eq!(two, [0, 0]);
        let mut b = [0xffu8; 4];
        h.pio_in(HOTPLUG_PORT + B0EJ, &mut b);
        assert_eq!(b, [0; 4], "B0EJ is write-only");
        h.pio_in(HOTPLUG_PORT + 2, &mut b);
        assert_eq!(b, [0; 4], "misaligned");
        h.pio_in(HOTPLUG_PORT + 100, &mut b);
        assert_eq!(b, [0; 4], "beyond the block");
        assert_eq!(h.pio_out(HOTPLUG_PORT + B0EJ, &[4]), 0, "byte write");
        assert_eq!(h.pio_out(HOTPLUG_PORT + B0EJ, &[4, 0]), 0, "word write");
        assert_eq!(h.pio_out(HOTPLUG_PORT + B0EJ, &[0; 8]), 0, "qword write");
        assert_eq!(h.pio_out(HOTPLUG_PORT, &4u32.to_le_bytes()), 0, "PCIU");
        assert_eq!(h.pio_out(HOTPLUG_PORT - 4, &4u32.to_le_bytes()), 0);
        assert_eq!(read(&h, PCIU), 1 << 1, "state intact");
        assert_eq!(read(&h, PCID), 1 << 2);
        assert_eq!(h.pio_out(HOTPLUG_PORT + B0EJ, &4u32.to_le_bytes()), 4);
        // Device numbers past 31 have no bit.
        h.request_add(40);
        assert_eq!(read(&h, PCIU), 0);
        assert!(Hotplug::owns_port(HOTPLUG_PORT + 11));
        assert!(!Hotplug::owns_port(HOTPLUG_PORT + 12));
    }

    #[test]
    fn the_aml_names_each_slot_with_its_address_and_eject_method() {
        let v = pci0_aml(3);
        let has = |needle: &[u8]| v.windows(needle.len()).any(|w| w == needle);
        for n in [
            &b"PHPR"[..],
            b"PCIU",
            b"PCID",
            b"B0EJ",
            b"PSCN",
            b"_EJ0",
            b"_SUN",
        ] {
            assert!(has(n), "{}", String::from_utf8_lossy(n));
        }
        assert!(has(b"S001") && has(b"S003") && !has(b"S004"));
        // OperationRegion (PHPR, SystemIO, 0x700, 12): ExtOp 0x80, name, space 1, DWord, Byte.
        assert!(has(&[
            0x5b, 0x80, b'P', b'H', b'P', b'R', 1, 0x0b, 0x00, 0x07, 0x0a, 12
        ]));
        // Name (_ADR, 0x00020000) for device 2.
        assert!(has(&[0x08, b'_', b'A', b'D', b'R', 0x0c, 0, 0, 2, 0]));
        // Notify (S002, 3): NotifyOp, the name, ByteConst 3.
        assert!(has(&[0x86, b'S', b'0', b'0', b'2', 0x0a, 3]));
        let e = ged_event_aml();
        assert!(e.windows(4).any(|w| w == b"PSCN") && e.windows(4).any(|w| w == b"PWRB"));
        // LEqual (Arg0, 22).
        assert!(e.windows(4).any(|w| w == [0x93, 0x68, 0x0a, 22]));
    }
}
