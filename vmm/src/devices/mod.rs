//! Devices: the 16550A console, the i8042 reset line, the ACPI sleep register, and the virtio
//! disks ([`virtio`]) behind one of two transports: virtio-mmio, or virtio-pci with MSI-X (or INTx,
//! [`intx`]) on a PCI host bridge ([`pci`]); all behind the port and MMIO dispatch of [`bus`].

pub mod bus;
pub mod hotplug;
pub mod intx;
pub mod msix;
pub mod pci;
pub mod serial;
pub mod virtio;
pub mod virtio_mmio;
pub mod virtio_pci;

use vm_superio::Trigger;
use vmm_sys_util::eventfd::EventFd;

/// An eventfd as a vm-superio interrupt or reset line (an irqfd, or a VMM event).
#[derive(Debug)]
pub struct EventFdTrigger(pub EventFd);

impl Trigger for EventFdTrigger {
    type E = std::io::Error;

    fn trigger(&self) -> std::io::Result<()> {
        self.0.write(1)
    }
}
