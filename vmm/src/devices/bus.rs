//! Port and MMIO dispatch for the vCPU threads.
//!
//! | range | device |
//! |---|---|
//! | PIO 0x3f8-0x3ff | 16550A console |
//! | PIO 0x60, 0x64 | i8042 (only the 0xFE reset command does anything; status reads 0) |
//! | PIO 0x600 | ACPI sleep control: SLP_EN with SLP_TYP 5 = power off |
//! | PIO 0x700-0x70b | PCI hotplug registers (pci transport only, `super::hotplug`) |
//! | PIO 0xcf8-0xcff | PCI config mechanism #1 (pci transport only) |
//! | PIO other | reads all ones, writes ignored (no device) |
//! | MMIO 0xd000_0000 + 4 KiB·i | virtio-mmio disk i (mmio transport) |
//! | MMIO 0xe000_0000-0xefff_ffff | PCI BARs: virtio-pci disk i's BAR0 (pci transport) |
//! | MMIO other | reads zeros, writes ignored |

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};

use vm_superio::{I8042Device, Trigger};

use super::hotplug::Hotplug;
use super::pci::PciRoot;
use super::serial::SerialDevice;
use super::virtio::VirtioDevice;
use super::virtio_mmio::{Action, VirtioMmio};
use crate::layout::{
    self, ACPI_SLEEP_PORT, I8042_COMMAND, I8042_DATA, SERIAL_PORT, VIRTIO_MMIO_BASE,
    VIRTIO_MMIO_SIZE,
};

/// The i8042 reset line: sets a flag the vCPU checks after the port write.
#[derive(Debug, Clone, Default)]
pub struct ResetLine(pub Arc<AtomicBool>);

impl Trigger for ResetLine {
    type E = std::convert::Infallible;

    fn trigger(&self) -> Result<(), Self::E> {
        self.0.store(true, Ordering::SeqCst);
        Ok(())
    }
}

/// What an access asks of the VMM.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum BusEvent {
    /// Nothing.
    None,
    /// The guest reset the machine.
    Reset,
    /// The guest entered S5.
    PowerOff,
    /// Virtio device `i` has work (DRIVER_OK, or a notify not caught by the ioeventfd).
    Kick(usize),
}

/// SLP_EN in the sleep control register.
const SLP_EN: u8 = 1 << 5;
/// SLP_TYP of S5 (from `\_S5`).
const SLP_TYP_S5: u8 = 5;

/// The devices as seen from the vCPUs.
pub struct Bus {
    serial: Arc<Mutex<SerialDevice>>,
    i8042: Mutex<I8042Device<ResetLine>>,
    reset: ResetLine,
    virtio: Vec<Arc<VirtioMmio>>,
    pci: Option<Arc<PciRoot>>,
    devices: Vec<Arc<VirtioDevice>>,
}

impl Bus {
    /// A bus with these devices: virtio-mmio device `i` at window `i`, and the PCI bus if
    /// any; `devices[i]` is virtio-mmio disk `i` (for [`BusEvent::Kick`]; PCI functions wake
    /// their workers themselves).
    pub fn new(
        serial: Arc<Mutex<SerialDevice>>,
        virtio: Vec<Arc<VirtioMmio>>,
        pci: Option<Arc<PciRoot>>,
        devices: Vec<Arc<VirtioDevice>>,
    ) -> Bus {
        let reset = ResetLine::default();
        Bus {
            serial,
            i8042: Mutex::new(I8042Device::new(reset.clone())),
            reset,
            virtio,
            pci,
            devices,
        }
    }

    /// A port read.
    pub fn pio_in(&self, port: u16, data: &mut [u8]) {
        match port {
            p if (SERIAL_PORT..SERIAL_PORT + 8).contains(&p) => {
                let mut s = self.serial.lock().unwrap_or_else(|e| e.into_inner());
                data.fill(0);
                data[0] = s.read((p - SERIAL_PORT) as u8);
            }
            I8042_DATA | I8042_COMMAND => {
                let mut k = self.i8042.lock().unwrap_or_else(|e| e.into_inner());
                data.fill(0);
                data[0] = k.read((port - I8042_DATA) as u8);
            }
            p if PciRoot::owns_port(p) && self.pci.is_some() => {
                if let Some(pci) = &self.pci {
                    pci.pio_in(p, data);
                }
            }
            p if Hotplug::owns_port(p) && self.pci.is_some() => {
                if let Some(pci) = &self.pci {
                    pci.hotplug().pio_in(p, data);
                }
            }
            _ => data.fill(0xff),
        }
    }

    /// A port write.
    pub fn pio_out(&self, port: u16, data: &[u8]) -> BusEvent {
        let Some(&value) = data.first() else {
            return BusEvent::None;
        };
        match port {
            p if (SERIAL_PORT..SERIAL_PORT + 8).contains(&p) => {
                let mut s = self.serial.lock().unwrap_or_else(|e| e.into_inner());
                if let Err(e) = s.write((p - SERIAL_PORT) as u8, value) {
                    tracing::debug!("serial write: {e:?}");
                }
            }
            I8042_DATA | I8042_COMMAND => {
                let mut k = self.i8042.lock().unwrap_or_else(|e| e.into_inner());
                let _ = k.write((port - I8042_DATA) as u8, value);
                if self.reset.0.swap(false, Ordering::SeqCst) {
                    return BusEvent::Reset;
                }
            }
            ACPI_SLEEP_PORT if value & SLP_EN != 0 && (value >> 2) & 7 == SLP_TYP_S5 => {
                return BusEvent::PowerOff;
            }
            p if PciRoot::owns_port(p) => {
                if let Some(pci) = &self.pci {
                    pci.pio_out(p, data);
                }
            }
            p if Hotplug::owns_port(p) => {
                if let Some(pci) = &self.pci {
                    pci.hotplug_out(p, data);
                }
            }
            _ => {}
        }
        BusEvent::None
    }

    fn virtio_at(&self, addr: u64) -> Option<(usize, &VirtioMmio, u64)> {
        let off = addr.checked_sub(VIRTIO_MMIO_BASE)?;
        let i = (off / VIRTIO_MMIO_SIZE) as usize;
        let dev = self.virtio.get(i)?;
        Some((i, dev, addr - layout::virtio_mmio_addr(i)))
    }

    /// An MMIO read.
    pub fn mmio_read(&self, addr: u64, data: &mut [u8]) {
        if let Some(pci) = self.pci.as_ref().filter(|_| PciRoot::owns_mmio(addr)) {
            return pci.mmio_read(addr, data);
        }
        match self.virtio_at(addr) {
            Some((_, dev, off)) => dev.read(off, data),
            None => data.fill(0),
        }
    }

    /// An MMIO write.
    pub fn mmio_write(&self, addr: u64, data: &[u8]) -> BusEvent {
        if let Some(pci) = self.pci.as_ref().filter(|_| PciRoot::owns_mmio(addr)) {
            pci.mmio_write(addr, data);
            return BusEvent::None;
        }
        match self.virtio_at(addr) {
            Some((i, dev, off)) => match dev.write(off, data) {
                Action::Kick => BusEvent::Kick(i),
                Action::None => BusEvent::None,
            },
            None => BusEvent::None,
        }
    }

    /// Wakes the worker of disk `i`.
    pub fn kick(&self, i: usize) {
        if let Some(d) = self.devices.get(i) {
            let _ = d.kick_evt().write(1);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::devices::serial::{ConsoleOut, ConsoleState};
    use crate::devices::EventFdTrigger;
    use vm_superio::Serial;
    use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};

    fn bus() -> Bus {
        let serial = Serial::new(
            EventFdTrigger(EventFd::new(EFD_NONBLOCK).unwrap()),
            ConsoleOut::new(
                Box::new(std::io::sink()),
                Arc::new(Mutex::new(ConsoleState::default())),
            ),
        );
        Bus::new(Arc::new(Mutex::new(serial)), Vec::new(), None, Vec::new())
    }

    #[test]
    fn i8042_reset_command_resets_and_status_never_reads_busy() {
        let b = bus();
        let mut st = [0xaau8];
        b.pio_in(0x64, &mut st);
        assert_eq!(st[0] & 0x02, 0, "input buffer never full");
        assert_eq!(b.pio_out(0x64, &[0xd1]), BusEvent::None);
        assert_eq!(
            b.pio_out(0x60, &[0xfe]),
            BusEvent::None,
            "0xFE to data is no reset"
        );
        assert_eq!(b.pio_out(0x64, &[0xfe]), BusEvent::Reset);
        assert_eq!(
            b.pio_out(0x64, &[0x00]),
            BusEvent::None,
            "the reset is reported once"
        );
    }

    #[test]
    fn s5_through_the_sleep_register_powers_off() {
        let b = bus();
        assert_eq!(b.pio_out(0x600, &[(5 << 2) | (1 << 5)]), BusEvent::PowerOff);
        assert_eq!(b.pio_out(0x600, &[5 << 2]), BusEvent::None, "no SLP_EN");
        assert_eq!(
            b.pio_out(0x600, &[(3 << 2) | (1 << 5)]),
            BusEvent::None,
            "S3"
        );
    }

    #[test]
    fn absent_ports_read_all_ones_and_absent_mmio_reads_zero() {
        let b = bus();
        let mut d = [0u8; 4];
        b.pio_in(0x2f8, &mut d);
        assert_eq!(d, [0xff; 4]);
        b.mmio_read(0xd000_0000, &mut d);
        assert_eq!(d, [0; 4], "no virtio device 0");
        assert_eq!(b.mmio_write(0xd000_0050, &[0, 0, 0, 0]), BusEvent::None);
    }

    #[test]
    fn pci_ports_and_window_answer_only_with_the_pci_transport() {
        let mut b = bus();
        let mut d = [0u8; 4];
        b.pio_out(0xcf8, &0x8000_0000u32.to_le_bytes());
        b.pio_in(0xcf8, &mut d);
        assert_eq!(d, [0xff; 4], "no PCI: no CONFIG_ADDRESS");
        b.pci = Some(Arc::new(PciRoot::new(4, Vec::new())));
        b.pio_out(0xcf8, &0x8000_0000u32.to_le_bytes());
        b.pio_in(0xcfc, &mut d);
        assert_eq!(u32::from_le_bytes(d), 0x0008_1b36, "the host bridge");
        assert_eq!(b.mmio_write(0xe000_3000, &[0, 0]), BusEvent::None);
    }

    #[test]
    fn serial_registers_are_reached_through_their_ports() {
        let b = bus();
        b.pio_out(0x3f8 + 7, &[0x5a]); // scratch register
        let mut d = [0u8];
        b.pio_in(0x3f8 + 7, &mut d);
        assert_eq!(d[0], 0x5a);
    }
}
