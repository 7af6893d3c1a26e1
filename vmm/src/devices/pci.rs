//! The PCI host bridge: configuration mechanism #1 (I/O ports 0xCF8 CONFIG_ADDRESS and
//! 0xCFC-0xCFF CONFIG_DATA, PCI Local Bus spec 3.0 §3.2.2.3.2) over bus 0, and the dispatch of
//! the 32-bit MMIO window where the functions' BARs live.
//!
//! ```text
//!  bus 0, device 0: host bridge (class 06/00/00), no BARs, read-only
//!  bus 0, device 1 + i: virtio-pci disk i (super::virtio_pci), BAR0 at PCI_MMIO_BASE + i·BAR0_SIZE
//!  everything else: no device (vendor 0xffff, all ones)
//! ```
//!
//! Why port I/O and no ECAM/MCFG: a conventional (non-PCIe) function needs only the first
//! 256 bytes of config space, which mechanism #1 reaches; Linux 6.1 on x86 uses an MCFG area
//! only once it is reserved in the E820 map (with mechanism #1 present) or as an ACPI
//! motherboard resource, so ECAM would need mechanism #1 or a `PNP0C02` device anyway, plus
//! a 1 MiB-per-bus window. Config accesses happen at probe time only, so their cost (two
//! exits each) does not matter.
//!
//! Hotplug (see `super::hotplug`): device numbers `1..=slots` are slots the main thread plugs
//! functions into; a function the guest ejects leaves the bus at once (its config space reads
//! all ones from then on) and waits in [`PciRoot::take_ejected`] for the main thread.
//!
//! Invariants: a config access is at most 4 bytes and never crosses the 32-bit register
//! CONFIG_ADDRESS selects (wider or straddling accesses read all ones and write nothing);
//! functions only see offsets below 256; the bridge never panics on guest input.

use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::{Arc, Mutex, RwLock};

use super::hotplug::Hotplug;
use super::virtio_pci::VirtioPci;
use crate::layout::{PCI_MMIO_BASE, PCI_MMIO_SIZE};

/// CONFIG_ADDRESS.
pub const CONFIG_ADDRESS: u16 = 0xcf8;
/// CONFIG_DATA (four ports).
pub const CONFIG_DATA: u16 = 0xcfc;
/// CONFIG_ADDRESS enable bit.
const ENABLE: u32 = 1 << 31;
/// Bytes of a function's (conventional) config space.
pub const CONFIG_SIZE: usize = 256;

/// A function's config space: its bytes and which bits the guest may change.
#[derive(Clone)]
pub struct ConfigSpace {
    bytes: [u8; CONFIG_SIZE],
    wmask: [u8; CONFIG_SIZE],
}

impl std::fmt::Debug for ConfigSpace {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ConfigSpace")
            .field(
                "id",
                &format_args!("{:04x}:{:04x}", self.u16(0), self.u16(2)),
            )
            .finish()
    }
}

impl ConfigSpace {
    /// A type 0 header with these ids and class (`class << 8 | revision`), read-only.
    pub fn new(vendor: u16, device: u16, class_rev: u32) -> ConfigSpace {
        let mut c = ConfigSpace {
            bytes: [0; CONFIG_SIZE],
            wmask: [0; CONFIG_SIZE],
        };
        c.set_u16(0x00, vendor);
        c.set_u16(0x02, device);
        c.set_u32(0x08, class_rev);
        c
    }

    /// Whether `len` bytes at `off` are one access inside the config space: 1, 2 or 4 bytes
    /// inside one 32-bit register.
    pub fn valid(off: usize, len: usize) -> bool {
        matches!(len, 1 | 2 | 4) && off < CONFIG_SIZE && (off % 4) + len <= 4
    }

    /// All its bytes.
    pub fn bytes(&self) -> &[u8; CONFIG_SIZE] {
        &self.bytes
    }

    /// Little-endian u16 at `off`.
    pub fn u16(&self, off: usize) -> u16 {
        u16::from_le_bytes([self.bytes[off], self.bytes[off + 1]])
    }

    /// Little-endian u32 at `off`.
    pub fn u32(&self, off: usize) -> u32 {
        u32::from_le_bytes(self.bytes[off..off + 4].try_into().unwrap_or([0; 4]))
    }

    /// Sets a byte (not a guest write: ignores the mask).
    pub fn set_u8(&mut self, off: usize, v: u8) {
        self.bytes[off] = v;
    }

    /// Sets a u16.
    pub fn set_u16(&mut self, off: usize, v: u16) {
        self.bytes[off..off + 2].copy_from_slice(&v.to_le_bytes());
    }

    /// Sets a u32.
    pub fn set_u32(&mut self, off: usize, v: u32) {
        self.bytes[off..off + 4].copy_from_slice(&v.to_le_bytes());
    }

    /// Lets the guest change the bits of `mask` at `off`.
    pub fn set_writable(&mut self, off: usize, mask: &[u8]) {
        self.wmask[off..off + mask.len()].copy_from_slice(mask);
    }

    /// A guest read (the caller checked [`ConfigSpace::valid`]).
    pub fn read(&self, off: usize, data: &mut [u8]) {
        data.copy_from_slice(&self.bytes[off..off + data.len()]);
    }

    /// A guest write (also of a whole saved config space at 0): only the writable bits
    /// change; bytes past the end are ignored.
    pub fn write(&mut self, off: usize, data: &[u8]) {
        for (i, &b) in data
            .iter()
            .enumerate()
            .take(CONFIG_SIZE.saturating_sub(off))
        {
            let m = self.wmask[off + i];
            self.bytes[off + i] = (self.bytes[off + i] & !m) | (b & m);
        }
    }
}

/// The host bridge at 00:00.0: the PCI vendor id 0x1b36 (Red Hat) with device 0x0008, the id
/// assigned to a generic virtual host bridge; Linux's mechanism #1 sanity check looks for a
/// host bridge class on bus 0.
fn host_bridge() -> ConfigSpace {
    ConfigSpace::new(0x1b36, 0x0008, 0x0600_0000)
}

/// Bus 0 behind mechanism #1, the BAR window, and the hotplug registers.
#[derive(Debug)]
pub struct PciRoot {
    address: AtomicU32,
    host: ConfigSpace,
    /// `slots[i]`: the function at device number `i + 1`.
    slots: RwLock<Vec<Option<Arc<VirtioPci>>>>,
    hotplug: Hotplug,
    /// Functions the guest ejected, with their device numbers, for the main thread.
    ejected: Mutex<Vec<(u8, Arc<VirtioPci>)>>,
}

impl PciRoot {
    /// Bus 0 with `slots` hotplug slots (device numbers `1..=slots`), `devices[i]` at device
    /// number `i + 1`.
    pub fn new(slots: usize, devices: Vec<Arc<VirtioPci>>) -> PciRoot {
        let mut v: Vec<Option<Arc<VirtioPci>>> = devices.into_iter().map(Some).collect();
        v.resize(slots.max(v.len()), None);
        PciRoot {
            address: AtomicU32::new(0),
            host: host_bridge(),
            slots: RwLock::new(v),
            hotplug: Hotplug::default(),
            ejected: Mutex::new(Vec::new()),
        }
    }

    /// Bus 0 with `slots` hotplug slots and each function at its device number (restored
    /// from a checkpoint or migration); numbers outside `1..=slots` are refused.
    pub fn with_functions(
        slots: usize,
        functions: Vec<(u8, Arc<VirtioPci>)>,
    ) -> Result<PciRoot, String> {
        let root = PciRoot::new(slots, Vec::new());
        {
            let mut s = root.slots_mut();
            for (device, f) in functions {
                match usize::from(device)
                    .checked_sub(1)
                    .and_then(|i| s.get_mut(i))
                {
                    Some(slot @ None) => *slot = Some(f),
                    Some(Some(_)) => return Err(format!("PCI slot {device} used twice")),
                    None => return Err(format!("PCI slot {device} is not in 1..={slots}")),
                }
            }
        }
        Ok(root)
    }

    fn slots(&self) -> std::sync::RwLockReadGuard<'_, Vec<Option<Arc<VirtioPci>>>> {
        self.slots.read().unwrap_or_else(|e| e.into_inner())
    }

    fn slots_mut(&self) -> std::sync::RwLockWriteGuard<'_, Vec<Option<Arc<VirtioPci>>>> {
        self.slots.write().unwrap_or_else(|e| e.into_inner())
    }

    /// The function at device number `device`.
    fn device(&self, device: usize) -> Option<Arc<VirtioPci>> {
        self.slots().get(device.checked_sub(1)?).cloned().flatten()
    }

    /// The lowest free device number, if any: empty, and not holding a function the guest
    /// ejected that the main thread has not taken out of KVM yet (its ioeventfds would clash).
    pub fn free_slot(&self) -> Option<u8> {
        let s = self.slots();
        let ejected = self.ejected.lock().unwrap_or_else(|e| e.into_inner());
        (0..s.len())
            .map(|i| i as u8 + 1)
            .find(|&d| s[usize::from(d) - 1].is_none() && !ejected.iter().any(|e| e.0 == d))
    }

    /// Plugs `dev` in at device number `device` (free, see [`PciRoot::free_slot`]) and tells
    /// the guest at its next scan.
    pub fn plug(&self, device: u8, dev: Arc<VirtioPci>) {
        if let Some(s) = self.slots_mut().get_mut(usize::from(device) - 1) {
            *s = Some(dev);
            self.hotplug.request_add(device);
        }
    }

    /// The hotplug registers.
    pub fn hotplug(&self) -> &Hotplug {
        &self.hotplug
    }

    /// A write to the hotplug registers: functions the guest ejected leave the bus now.
    pub fn hotplug_out(&self, port: u16, data: &[u8]) {
        let ejected = self.hotplug.pio_out(port, data);
        if ejected == 0 {
            return;
        }
        let mut slots = self.slots_mut();
        let mut out = self.ejected.lock().unwrap_or_else(|e| e.into_inner());
        for (i, s) in slots.iter_mut().enumerate() {
            if 1u32
                .checked_shl(i as u32 + 1)
                .is_some_and(|b| ejected & b != 0)
            {
                if let Some(d) = s.take() {
                    out.push((i as u8 + 1, d));
                }
            }
        }
    }

    /// The functions ejected since the last call.
    pub fn take_ejected(&self) -> Vec<(u8, Arc<VirtioPci>)> {
        std::mem::take(&mut *self.ejected.lock().unwrap_or_else(|e| e.into_inner()))
    }

    /// The config register a CONFIG_DATA access at `port` of `len` bytes reaches:
    /// `(device, offset)`, or `None` (disabled, another bus or function, extended register
    /// bits, or straddling the register).
    fn target(&self, port: u16, len: usize) -> Option<(usize, usize)> {
        let a = self.address.load(Ordering::SeqCst);
        let byte = usize::from(port - CONFIG_DATA);
        let bus = (a >> 16) & 0xff;
        let function = (a >> 8) & 7;
        if a & ENABLE == 0 || bus != 0 || function != 0 || (a >> 24) & 0x7f != 0 {
            return None;
        }
        let off = (a & 0xfc) as usize + byte;
        ConfigSpace::valid(off, len).then_some((((a >> 11) & 0x1f) as usize, off))
    }

    /// Whether the port is one of the mechanism's.
    pub fn owns_port(port: u16) -> bool {
        (CONFIG_ADDRESS..CONFIG_DATA + 4).contains(&port)
    }

    /// A port read.
    pub fn pio_in(&self, port: u16, data: &mut [u8]) {
        data.fill(0xff);
        if port == CONFIG_ADDRESS && data.len() == 4 {
            data.copy_from_slice(&self.address.load(Ordering::SeqCst).to_le_bytes());
            return;
        }
        if port < CONFIG_DATA {
            return;
        }
        match self.target(port, data.len()) {
            Some((0, off)) => self.host.read(off, data),
            Some((d, off)) => {
                if let Some(dev) = self.device(d) {
                    dev.config_read(off, data);
                }
            }
            None => {}
        }
    }

    /// A port write.
    pub fn pio_out(&self, port: u16, data: &[u8]) {
        if port == CONFIG_ADDRESS && data.len() == 4 {
            let v = u32::from_le_bytes([data[0], data[1], data[2], data[3]]);
            self.address.store(v & !3, Ordering::SeqCst);
            return;
        }
        if port < CONFIG_DATA {
            // Byte and word accesses to 0xCF8-0xCFB are not CONFIG_ADDRESS (Linux's type 1
            // probe writes one byte to 0xCFB).
            return;
        }
        match self.target(port, data.len()) {
            Some((0, off)) => tracing::debug!("write to the host bridge's {off:#x} ignored"),
            Some((d, off)) => {
                if let Some(dev) = self.device(d) {
                    dev.config_write(off, data);
                }
            }
            None => tracing::debug!(
                "config write to {:#x} ({} bytes at port {port:#x}) ignored",
                self.address.load(Ordering::SeqCst),
                data.len()
            ),
        }
    }

    /// Whether `addr` is in the BAR window.
    pub fn owns_mmio(addr: u64) -> bool {
        (PCI_MMIO_BASE..PCI_MMIO_BASE + PCI_MMIO_SIZE).contains(&addr)
    }

    /// The decoding function and the offset in its BAR.
    fn bar_at(&self, addr: u64, len: usize) -> Option<(Arc<VirtioPci>, u64)> {
        self.slots().iter().flatten().find_map(|d| {
            let (base, size) = d.decoded_bar()?;
            let off = addr.checked_sub(base)?;
            (off + len as u64 <= size).then(|| (d.clone(), off))
        })
    }

    /// An MMIO read in the window (zeros where no BAR decodes).
    pub fn mmio_read(&self, addr: u64, data: &mut [u8]) {
        match self.bar_at(addr, data.len()) {
            Some((d, off)) => d.bar_read(off, data),
            None => data.fill(0),
        }
    }

    /// An MMIO write in the window; a queue notification (or DRIVER_OK) wakes the function's
    /// disk worker.
    pub fn mmio_write(&self, addr: u64, data: &[u8]) {
        if let Some((d, off)) = self.bar_at(addr, data.len()) {
            if d.bar_write(off, data) == super::virtio::Action::Kick {
                let _ = d.device().kick_evt().write(1);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn addr(dev: u32, reg: u32) -> [u8; 4] {
        (ENABLE | dev << 11 | reg).to_le_bytes()
    }

    fn read(r: &PciRoot, dev: u32, reg: u32, len: usize) -> u32 {
        r.pio_out(CONFIG_ADDRESS, &addr(dev, reg & !3));
        let mut b = [0u8; 4];
        r.pio_in(CONFIG_DATA + (reg & 3) as u16, &mut b[..len]);
        u32::from_le_bytes(b)
    }

    #[test]
    fn config_address_reads_back_what_linux_probes_with() {
        let r = PciRoot::new(4, Vec::new());
        r.pio_out(CONFIG_ADDRESS, &0x8000_0000u32.to_le_bytes());
        let mut b = [0u8; 4];
        r.pio_in(CONFIG_ADDRESS, &mut b);
        assert_eq!(u32::from_le_bytes(b), 0x8000_0000);
        r.pio_out(0xcfb, &[1]); // the type 1 probe's byte write is not CONFIG_ADDRESS
        r.pio_in(CONFIG_ADDRESS, &mut b);
        assert_eq!(u32::from_le_bytes(b), 0x8000_0000);
        let mut one = [0u8; 1];
        r.pio_in(0xcf9, &mut one);
        assert_eq!(one, [0xff]);
    }

    #[test]
    fn the_host_bridge_is_device_0_and_absent_devices_read_all_ones() {
        let r = PciRoot::new(4, Vec::new());
        assert_eq!(read(&r, 0, 0, 4), 0x0008_1b36);
        assert_eq!(read(&r, 0, 0x0a, 2), 0x0600, "class: host bridge");
        assert_eq!(read(&r, 0, 0x0b, 1), 0x06);
        assert_eq!(read(&r, 1, 0, 4), 0xffff_ffff, "no device 1");
        // Function 1, bus 1 and extended register bits reach nothing.
        r.pio_out(CONFIG_ADDRESS, &(ENABLE | 1 << 8).to_le_bytes());
        let mut b = [0u8; 4];
        r.pio_in(CONFIG_DATA, &mut b);
        assert_eq!(b, [0xff; 4]);
        r.pio_out(CONFIG_ADDRESS, &(ENABLE | 1 << 16).to_le_bytes());
        r.pio_in(CONFIG_DATA, &mut b);
        assert_eq!(b, [0xff; 4]);
        r.pio_out(CONFIG_ADDRESS, &(ENABLE | 1 << 24).to_le_bytes());
        r.pio_in(CONFIG_DATA, &mut b);
        assert_eq!(b, [0xff; 4]);
        // Disabled.
        r.pio_out(CONFIG_ADDRESS, &0u32.to_le_bytes());
        r.pio_in(CONFIG_DATA, &mut b);
        assert_eq!(b, [0xff; 4]);
    }

    #[test]
    fn straddling_or_oversized_config_accesses_are_refused() {
        let r = PciRoot::new(4, Vec::new());
        r.pio_out(CONFIG_ADDRESS, &addr(0, 0));
        let mut b = [0u8; 4];
        r.pio_in(CONFIG_DATA + 2, &mut b); // 4 bytes from byte 2
        assert_eq!(b, [0xff; 4]);
        let mut w = [0u8; 2];
        r.pio_in(CONFIG_DATA + 3, &mut w);
        assert_eq!(w, [0xff; 2]);
        r.pio_in(CONFIG_DATA + 2, &mut w);
        assert_eq!(w, [0x08, 0x00], "device id, high half");
        assert!(!ConfigSpace::valid(256, 1));
        assert!(!ConfigSpace::valid(0, 3));
        assert!(!ConfigSpace::valid(0, 8));
        assert!(!ConfigSpace::valid(254, 4));
        // Writes to the read-only bridge change nothing.
        r.pio_out(CONFIG_DATA, &[0; 4]);
        assert_eq!(read(&r, 0, 0, 4), 0x0008_1b36);
    }

    #[test]
    fn writes_only_change_writable_bits() {
        let mut c = ConfigSpace::new(1, 2, 0);
        c.set_writable(0x04, &[0x07, 0x04]);
        c.write(0x04, &[0xff, 0xff]);
        assert_eq!(c.u16(0x04), 0x0407);
        c.write(0x00, &[0; 4]);
        assert_eq!(c.u32(0x00), 0x0002_0001);
    }

    #[test]
    fn the_mmio_window_without_bars_reads_zeros() {
        let r = PciRoot::new(4, Vec::new());
        assert!(PciRoot::owns_mmio(PCI_MMIO_BASE));
        assert!(!PciRoot::owns_mmio(PCI_MMIO_BASE + PCI_MMIO_SIZE));
        let mut b = [0xffu8; 4];
        r.mmio_read(PCI_MMIO_BASE, &mut b);
        assert_eq!(b, [0; 4]);
        r.mmio_write(PCI_MMIO_BASE, &[1, 0]);
    }
}
