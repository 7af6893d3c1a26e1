//! The saved state of a pci-transport VM (state version 2) and the checks every decoded
//! state goes through before anything is built from it.
//!
//! ```text
//!  VmState.pci = PciState
//!    functions[i]  (disk i, as VmState.transports[i]): PCI slot (device number on bus 0),
//!                  API id, the 256 bytes of config space (command, BAR0, MSI-X message
//!                  control, ...), vector registers (config, then one per queue), MSI-X
//!                  table entries and pending bits
//!    hotplug       PCIU / PCID / pending ejects of the ACPI hotplug register block
//!    next_id       number of the next `disk<N>` id
//! ```
//!
//! Invariants: [`check`] accepts only what a running VMM can hold: at most
//! [`crate::MAX_DISKS`] disks, power-of-two queue sizes, one function per disk in distinct
//! slots `1..=MAX_DISKS` with ids `disk<N>` below `next_id`, a config space of 256 bytes,
//! one MSI-X entry and pending bit per vector register, vectors inside the table (or none),
//! and BARs that decode only inside the PCI window without overlapping. (A guest can leave a
//! decoding BAR outside the window or on another one; such a VM's checkpoint or migration is
//! refused rather than written unrestorable.) The VMM runs the same check before it writes a state, so
//! it never writes one it would refuse to read. Read-only config bytes are taken from the
//! fresh function at restore (only the writable bits are restored).

use std::path::Path;

use serde::{Deserialize, Serialize};

use super::{corrupt, StateError, VmState, HEADER_LEN};
use crate::devices::msix::NO_VECTOR;
use crate::devices::pci::CONFIG_SIZE;
use crate::devices::virtio_pci::BAR0_SIZE;
use crate::layout::{PCI_MMIO_BASE, PCI_MMIO_SIZE};

/// One MSI-X table entry.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
pub struct MsixEntryState {
    /// Message address, low 32 bits.
    pub addr_lo: u32,
    /// Message address, high 32 bits.
    pub addr_hi: u32,
    /// Message data.
    pub data: u32,
    /// Vector control (bit 0: masked).
    pub control: u32,
}

/// A virtio-pci function of a disk.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct PciFunctionState {
    /// Device number on bus 0 (`1..=MAX_DISKS`).
    pub slot: u8,
    /// The disk's id in the control API (`disk<N>`).
    pub id: String,
    /// Config space, 256 bytes (only the guest-writable bits are restored).
    pub config: Vec<u8>,
    /// `config_msix_vector`, then each queue's `queue_msix_vector`.
    pub vectors: Vec<u16>,
    /// MSI-X table.
    pub msix_table: Vec<MsixEntryState>,
    /// MSI-X pending bits, one per entry.
    pub msix_pending: Vec<bool>,
}

/// The ACPI PCI hotplug registers.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
pub struct HotplugRegs {
    /// PCIU: slots added since the guest last read it.
    pub up: u32,
    /// PCID: slots the VMM asks the guest to eject.
    pub down: u32,
    /// Slots asked to eject and not ejected yet.
    pub ejecting: u32,
}

/// The PCI side of a pci-transport VM.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct PciState {
    /// One per disk, in the order of `VmState::transports`.
    pub functions: Vec<PciFunctionState>,
    /// Hotplug registers.
    pub hotplug: HotplugRegs,
    /// Number of the next disk id.
    pub next_id: u64,
}

/// Config space offsets the check reads.
const COMMAND: usize = 0x04;
const BAR0: usize = 0x10;
const COMMAND_MEMORY: u8 = 1 << 1;
/// Largest disk id counter accepted (the VMM adds one per hot-add).
pub const MAX_NEXT_ID: u64 = 1 << 32;
/// Largest virtqueue (virtio 1.x: 32768).
const MAX_QUEUE: u16 = 32768;

/// Where BAR0 of `f` decodes: `Some(base)` with memory space on (`None`: off).
fn decoding_bar(f: &PciFunctionState) -> Option<u64> {
    let on = f
        .config
        .get(COMMAND)
        .is_some_and(|c| c & COMMAND_MEMORY != 0);
    let bar = f.config.get(BAR0..BAR0 + 4)?;
    let base = u32::from_le_bytes([bar[0], bar[1], bar[2], bar[3]]) & !0xf;
    on.then_some(u64::from(base))
}

/// Checks a decoded state (see the module docs). `path` names the state's file or stream;
/// `version` is its header's.
pub fn check(path: &Path, s: &VmState, version: u32) -> Result<(), StateError> {
    let at = HEADER_LEN as u64;
    let bad = |structure: &'static str, detail: String| Err(corrupt(path, structure, at, detail));
    if s.transports.len() > crate::MAX_DISKS {
        return bad(
            "device state",
            format!(
                "{} disks, a VM has at most {}",
                s.transports.len(),
                crate::MAX_DISKS
            ),
        );
    }
    for (i, t) in s.transports.iter().enumerate() {
        for (q, st) in t.queues.iter().enumerate() {
            if !st.size.is_power_of_two() || st.size > MAX_QUEUE {
                return bad(
                    "device state",
                    format!(
                        "disk {i} virtqueue {q}: size {} is not a power of two up to {MAX_QUEUE}",
                        st.size
                    ),
                );
            }
        }
    }
    let Some(pci) = &s.pci else { return Ok(()) };
    if version < 2 {
        return bad(
            "pci state",
            format!("PCI state in a version {version} state (PCI came with version 2)"),
        );
    }
    if pci.functions.len() != s.transports.len() {
        return bad(
            "pci state",
            format!(
                "{} PCI functions for {} disks",
                pci.functions.len(),
                s.transports.len()
            ),
        );
    }
    if pci.next_id > MAX_NEXT_ID {
        return bad(
            "pci state",
            format!("next disk id {} is over {MAX_NEXT_ID}", pci.next_id),
        );
    }
    let mut bars: Vec<(u64, u8)> = Vec::new();
    for (i, (f, t)) in pci.functions.iter().zip(&s.transports).enumerate() {
        let what = |d: String| format!("function {i} (slot {}): {d}", f.slot);
        if f.slot == 0 || usize::from(f.slot) > crate::MAX_DISKS {
            return bad(
                "pci function",
                what(format!("slot outside 1..={}", crate::MAX_DISKS)),
            );
        }
        if pci.functions[..i].iter().any(|o| o.slot == f.slot) {
            return bad("pci function", what("slot used twice".into()));
        }
        let number =
            f.id.strip_prefix("disk")
                .and_then(|n| n.parse::<u64>().ok());
        if !number.is_some_and(|n| n < pci.next_id && f.id == format!("disk{n}"))
            || pci.functions[..i].iter().any(|o| o.id == f.id)
        {
            return bad(
                "pci function",
                what(format!(
                    "id {:?} is not disk<N> with N below the next id {}, or is used twice",
                    f.id, pci.next_id
                )),
            );
        }
        if f.config.len() != CONFIG_SIZE {
            return bad(
                "pci config space",
                what(format!(
                    "{} bytes, config space has {CONFIG_SIZE}",
                    f.config.len()
                )),
            );
        }
        let n = t.queues.len() + 1;
        if f.vectors.len() != n || f.msix_table.len() != n || f.msix_pending.len() != n {
            return bad(
                "msi-x state",
                what(format!(
                    "{} vector registers, {} table entries and {} pending bits for {} queues \
                     (want {n} each)",
                    f.vectors.len(),
                    f.msix_table.len(),
                    f.msix_pending.len(),
                    t.queues.len()
                )),
            );
        }
        if let Some((r, &v)) = f
            .vectors
            .iter()
            .enumerate()
            .find(|(_, &v)| v != NO_VECTOR && usize::from(v) >= n)
        {
            return bad(
                "msi-x state",
                what(format!(
                    "vector register {r} holds vector {v}, past the table of {n}"
                )),
            );
        }
        if let Some(base) = decoding_bar(f) {
            let end = base + BAR0_SIZE;
            if base < PCI_MMIO_BASE || end > PCI_MMIO_BASE + PCI_MMIO_SIZE {
                return bad(
                    "pci config space",
                    what(format!(
                        "BAR0 decodes at {base:#x}, outside the PCI window {PCI_MMIO_BASE:#x}-{:#x}",
                        PCI_MMIO_BASE + PCI_MMIO_SIZE - 1
                    )),
                );
            }
            if let Some(&(_, other)) = bars.iter().find(|(b, _)| *b < end && base < b + BAR0_SIZE) {
                return bad(
                    "pci config space",
                    what(format!(
                        "BAR0 at {base:#x} overlaps the BAR0 of slot {other}"
                    )),
                );
            }
            bars.push((base, f.slot));
        }
    }
    Ok(())
}
