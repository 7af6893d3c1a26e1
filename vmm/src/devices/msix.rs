//! MSI-X (PCI Local Bus spec 3.0 §6.8.2): the vector table and pending bit array of one
//! function, delivered through KVM: vector `v` is an irqfd on its own GSI, and that GSI is
//! routed (KVM_SET_GSI_ROUTING, a `KVM_IRQ_ROUTING_MSI` entry) to the message the guest wrote
//! into table entry `v`.
//!
//! Invariants:
//! - An interrupt is only sent through an irqfd when its vector is deliverable: MSI-X enabled,
//!   the function not masked and the entry not masked. Otherwise its pending bit is set, and
//!   the interrupt goes out when the vector becomes deliverable (unmask, enable), so none is
//!   lost and none reaches a masked vector.
//! - Before a vector's interrupt is sent, its GSI is routed to the entry's current message;
//!   routes are only rewritten while a vector is deliverable, and under the same lock as the
//!   sends, so no interrupt uses a stale message.
//! - Table accesses other than aligned 32- or 64-bit ones inside the table, and any PBA
//!   write, are ignored (reads return 0) and logged at debug level (a guest cannot flood the
//!   log); nothing the guest writes panics.

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex, MutexGuard};

use kvm_bindings::{
    kvm_irq_routing_entry, KvmIrqRouting, KVM_IRQCHIP_IOAPIC, KVM_IRQCHIP_PIC_MASTER,
    KVM_IRQCHIP_PIC_SLAVE, KVM_IRQ_ROUTING_IRQCHIP, KVM_IRQ_ROUTING_MSI,
};
use kvm_ioctls::VmFd;
use vmm_sys_util::eventfd::EventFd;

use crate::state::pci::MsixEntryState;

/// "No vector" in the virtio-pci vector registers.
pub const NO_VECTOR: u16 = 0xffff;
/// Bytes per table entry.
pub const ENTRY_SIZE: u64 = 16;
/// Vector control: masked.
const MASKED: u32 = 1;
/// Message control: MSI-X enable.
pub const CONTROL_ENABLE: u16 = 1 << 15;
/// Message control: function mask.
pub const CONTROL_FUNCTION_MASK: u16 = 1 << 14;

/// Points a GSI at an MSI message (KVM in the VMM, a recorder in tests).
pub trait MsiRouter: Send + Sync {
    /// Routes `gsi` to the message `(address, data)`.
    fn set_msi(&self, gsi: u32, address: u64, data: u32) -> Result<(), String>;
}

#[derive(Debug, Clone, Copy)]
struct Entry {
    addr_lo: u32,
    addr_hi: u32,
    data: u32,
    control: u32,
    /// The message the GSI is routed to now.
    routed: Option<(u64, u32)>,
}

struct State {
    entries: Vec<Entry>,
    pending: Vec<bool>,
    enabled: bool,
    function_mask: bool,
}

/// The MSI-X vectors of one function.
pub struct Msix {
    state: Mutex<State>,
    irqfds: Vec<EventFd>,
    gsis: Vec<u32>,
    router: Arc<dyn MsiRouter>,
}

impl std::fmt::Debug for Msix {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Msix").field("gsis", &self.gsis).finish()
    }
}

impl Msix {
    /// Vectors `0..irqfds.len()`, vector `v` raising `irqfds[v]` (registered by the caller on
    /// `gsis[v]`). Every entry starts masked, MSI-X disabled (the reset state).
    pub fn new(irqfds: Vec<EventFd>, gsis: Vec<u32>, router: Arc<dyn MsiRouter>) -> Msix {
        assert_eq!(irqfds.len(), gsis.len(), "one GSI per irqfd");
        let n = irqfds.len();
        let entry = Entry {
            addr_lo: 0,
            addr_hi: 0,
            data: 0,
            control: MASKED,
            routed: None,
        };
        Msix {
            state: Mutex::new(State {
                entries: vec![entry; n],
                pending: vec![false; n],
                enabled: false,
                function_mask: false,
            }),
            irqfds,
            gsis,
            router,
        }
    }

    /// Each vector's irqfd and GSI (to unregister them when the function leaves).
    pub fn irqfds(&self) -> impl Iterator<Item = (&EventFd, u32)> {
        self.irqfds.iter().zip(self.gsis.iter().copied())
    }

    /// Number of vectors.
    pub fn len(&self) -> usize {
        self.irqfds.len()
    }

    /// Bytes of the table.
    pub fn table_len(&self) -> u64 {
        self.len() as u64 * ENTRY_SIZE
    }

    /// Bytes of the pending bit array (whole 64-bit words).
    pub fn pba_len(&self) -> u64 {
        self.len().div_ceil(64) as u64 * 8
    }

    fn lock(&self) -> MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// The table and pending bits, for a checkpoint.
    pub fn save(&self) -> (Vec<MsixEntryState>, Vec<bool>) {
        let st = self.lock();
        let table = st
            .entries
            .iter()
            .map(|e| MsixEntryState {
                addr_lo: e.addr_lo,
                addr_hi: e.addr_hi,
                data: e.data,
                control: e.control,
            })
            .collect();
        (table, st.pending.clone())
    }

    /// Puts a saved table and pending bits back (lengths must match this function's); the
    /// enable and mask bits come next through [`Msix::set_control`], which routes every
    /// deliverable vector and sends what is pending.
    pub fn restore(&self, table: &[MsixEntryState], pending: &[bool]) -> Result<(), String> {
        if table.len() != self.len() || pending.len() != self.len() {
            return Err(format!(
                "{} MSI-X entries and {} pending bits saved, the function has {} vectors",
                table.len(),
                pending.len(),
                self.len()
            ));
        }
        let mut st = self.lock();
        for (e, s) in st.entries.iter_mut().zip(table) {
            *e = Entry {
                addr_lo: s.addr_lo & !3,
                addr_hi: s.addr_hi,
                data: s.data,
                control: s.control & MASKED,
                routed: None,
            };
        }
        st.pending.copy_from_slice(pending);
        Ok(())
    }

    /// Takes the enable and function-mask bits of a message control write; vectors that
    /// became deliverable send what is pending.
    pub fn set_control(&self, control: u16) {
        let mut st = self.lock();
        st.enabled = control & CONTROL_ENABLE != 0;
        st.function_mask = control & CONTROL_FUNCTION_MASK != 0;
        for v in 0..st.entries.len() {
            self.sync(&mut st, v);
        }
    }

    /// Whether the driver enabled MSI-X (message control bit 15).
    pub fn enabled(&self) -> bool {
        self.lock().enabled
    }

    /// Raises vector `vector`: sent now if deliverable, else left pending. [`NO_VECTOR`] and
    /// vectors past the table raise nothing. Returns whether MSI-X is enabled, read under the
    /// same lock (when it is not, the function interrupts through INTx instead).
    pub fn notify(&self, vector: u16) -> bool {
        let v = usize::from(vector);
        let mut st = self.lock();
        if v < self.len() {
            st.pending[v] = true;
            self.sync(&mut st, v);
        }
        st.enabled
    }

    fn deliverable(st: &State, v: usize) -> bool {
        st.enabled && !st.function_mask && st.entries[v].control & MASKED == 0
    }

    /// If vector `v` is deliverable: routes its GSI to the current message, then sends what
    /// is pending.
    fn sync(&self, st: &mut State, v: usize) {
        if !Self::deliverable(st, v) {
            return;
        }
        let e = st.entries[v];
        let msg = ((u64::from(e.addr_hi) << 32) | u64::from(e.addr_lo), e.data);
        if e.routed != Some(msg) {
            match self.router.set_msi(self.gsis[v], msg.0, msg.1) {
                Ok(()) => st.entries[v].routed = Some(msg),
                Err(err) => tracing::warn!("MSI-X vector {v}: route GSI {}: {err}", self.gsis[v]),
            }
        }
        if std::mem::take(&mut st.pending[v]) {
            if let Err(err) = self.irqfds[v].write(1) {
                tracing::warn!("MSI-X vector {v}: irqfd: {err}");
            }
        }
    }

    /// Checks a table or PBA access: aligned 4 or 8 bytes inside `len`.
    fn valid(off: u64, size: usize, len: u64) -> bool {
        matches!(size, 4 | 8)
            && off % size as u64 == 0
            && off.checked_add(size as u64).is_some_and(|end| end <= len)
    }

    /// A guest read of the table at `off`.
    pub fn table_read(&self, off: u64, data: &mut [u8]) {
        data.fill(0);
        if !Self::valid(off, data.len(), self.table_len()) {
            tracing::debug!(
                "MSI-X table read of {} bytes at {off:#x} ignored",
                data.len()
            );
            return;
        }
        let st = self.lock();
        for (i, chunk) in data.chunks_mut(4).enumerate() {
            let o = off + 4 * i as u64;
            let e = &st.entries[(o / ENTRY_SIZE) as usize];
            let v = match o % ENTRY_SIZE {
                0 => e.addr_lo,
                4 => e.addr_hi,
                8 => e.data,
                _ => e.control,
            };
            chunk.copy_from_slice(&v.to_le_bytes());
        }
    }

    /// A guest write of the table at `off`.
    pub fn table_write(&self, off: u64, data: &[u8]) {
        if !Self::valid(off, data.len(), self.table_len()) {
            tracing::debug!(
                "MSI-X table write of {} bytes at {off:#x} ignored (table of {} bytes)",
                data.len(),
                self.table_len()
            );
            return;
        }
        let mut st = self.lock();
        let v = (off / ENTRY_SIZE) as usize;
        for (i, chunk) in data.chunks(4).enumerate() {
            let o = off + 4 * i as u64;
            let word = u32::from_le_bytes([chunk[0], chunk[1], chunk[2], chunk[3]]);
            let e = &mut st.entries[v];
            match o % ENTRY_SIZE {
                0 => e.addr_lo = word & !3,
                4 => e.addr_hi = word,
                8 => e.data = word,
                _ => e.control = word & MASKED,
            }
        }
        self.sync(&mut st, v);
    }

    /// A guest read of the pending bit array at `off`.
    pub fn pba_read(&self, off: u64, data: &mut [u8]) {
        data.fill(0);
        if !Self::valid(off, data.len(), self.pba_len()) {
            tracing::debug!("MSI-X PBA read of {} bytes at {off:#x} ignored", data.len());
            return;
        }
        let st = self.lock();
        for (i, b) in data.iter_mut().enumerate() {
            let first = (off as usize + i) * 8;
            for bit in 0..8 {
                if st.pending.get(first + bit).copied().unwrap_or(false) {
                    *b |= 1 << bit;
                }
            }
        }
    }

    /// A guest write of the pending bit array: read-only, ignored.
    pub fn pba_write(&self, off: u64, data: &[u8]) {
        tracing::debug!(
            "MSI-X PBA write of {} bytes at {off:#x} ignored (read-only)",
            data.len()
        );
    }
}

/// GSI routing through KVM: the in-kernel IOAPIC and PIC pins (what KVM_CREATE_IRQCHIP set
/// up) plus one MSI route per MSI-X vector. KVM_SET_GSI_ROUTING replaces the whole table, so
/// every call sends all of it.
pub struct KvmMsiRouter {
    vm: Arc<VmFd>,
    msi: Mutex<BTreeMap<u32, (u64, u32)>>,
}

/// IOAPIC pins (GSIs 0-23); MSI GSIs start after them.
pub const IOAPIC_PINS: u32 = 24;

impl KvmMsiRouter {
    /// A router for `vm`.
    pub fn new(vm: Arc<VmFd>) -> KvmMsiRouter {
        KvmMsiRouter {
            vm,
            msi: Mutex::new(BTreeMap::new()),
        }
    }
}

/// The routing table: IOAPIC pins 0-23, PIC pins 0-15, then the MSI routes.
pub fn routing_entries(msi: &BTreeMap<u32, (u64, u32)>) -> Vec<kvm_irq_routing_entry> {
    let mut v = Vec::new();
    let chip = |gsi: u32, irqchip: u32, pin: u32| {
        let mut e = kvm_irq_routing_entry {
            gsi,
            type_: KVM_IRQ_ROUTING_IRQCHIP,
            ..Default::default()
        };
        e.u.irqchip.irqchip = irqchip;
        e.u.irqchip.pin = pin;
        e
    };
    for gsi in 0..IOAPIC_PINS {
        v.push(chip(gsi, KVM_IRQCHIP_IOAPIC, gsi));
        if gsi < 8 {
            v.push(chip(gsi, KVM_IRQCHIP_PIC_MASTER, gsi));
        } else if gsi < 16 {
            v.push(chip(gsi, KVM_IRQCHIP_PIC_SLAVE, gsi - 8));
        }
    }
    for (&gsi, &(address, data)) in msi {
        let mut e = kvm_irq_routing_entry {
            gsi,
            type_: KVM_IRQ_ROUTING_MSI,
            ..Default::default()
        };
        e.u.msi.address_lo = address as u32;
        e.u.msi.address_hi = (address >> 32) as u32;
        e.u.msi.data = data;
        v.push(e);
    }
    v
}

impl MsiRouter for KvmMsiRouter {
    fn set_msi(&self, gsi: u32, address: u64, data: u32) -> Result<(), String> {
        let mut msi = self.msi.lock().unwrap_or_else(|e| e.into_inner());
        msi.insert(gsi, (address, data));
        let entries = routing_entries(&msi);
        let mut table = KvmIrqRouting::new(entries.len()).map_err(|e| format!("{e:?}"))?;
        table.as_mut_slice().copy_from_slice(&entries);
        self.vm
            .set_gsi_routing(&table)
            .map_err(|e| format!("KVM_SET_GSI_ROUTING: {e}"))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use vmm_sys_util::eventfd::EFD_NONBLOCK;

    #[derive(Default)]
    struct Recorder(Mutex<Vec<(u32, u64, u32)>>);

    impl MsiRouter for Recorder {
        fn set_msi(&self, gsi: u32, address: u64, data: u32) -> Result<(), String> {
            self.0.lock().unwrap().push((gsi, address, data));
            Ok(())
        }
    }

    fn msix(n: usize) -> (Msix, Arc<Recorder>) {
        let r = Arc::new(Recorder::default());
        let fds = (0..n)
            .map(|_| EventFd::new(EFD_NONBLOCK).unwrap())
            .collect();
        let gsis = (0..n as u32).map(|v| 24 + v).collect();
        (Msix::new(fds, gsis, r.clone()), r)
    }

    fn w32(m: &Msix, off: u64, v: u32) {
        m.table_write(off, &v.to_le_bytes());
    }

    fn r32(m: &Msix, off: u64) -> u32 {
        let mut b = [0u8; 4];
        m.table_read(off, &mut b);
        u32::from_le_bytes(b)
    }

    fn fired(m: &Msix, v: usize) -> bool {
        m.irqfds[v].read().is_ok()
    }

    #[test]
    fn entries_start_masked_and_read_back_what_was_written() {
        let (m, _) = msix(3);
        assert_eq!(r32(&m, 12), 1, "vector control: masked");
        w32(&m, 16, 0xfee0_1000);
        w32(&m, 20, 0);
        w32(&m, 24, 0x4041);
        assert_eq!(r32(&m, 16), 0xfee0_1000);
        assert_eq!(r32(&m, 24), 0x4041);
        let mut b = [0u8; 8];
        m.table_read(16, &mut b);
        assert_eq!(u64::from_le_bytes(b), 0xfee0_1000);
        assert_eq!(m.pba_len(), 8);
    }

    #[test]
    fn masked_vector_interrupts_wait_in_the_pba_until_unmasked() {
        let (m, r) = msix(2);
        m.set_control(CONTROL_ENABLE);
        w32(&m, 16, 0xfee0_0000);
        w32(&m, 24, 0x31);
        m.notify(1);
        assert!(!fired(&m, 1), "masked: nothing sent");
        let mut pba = [0u8; 8];
        m.pba_read(0, &mut pba);
        assert_eq!(u64::from_le_bytes(pba), 0b10, "pending bit of vector 1");
        assert!(r.0.lock().unwrap().is_empty(), "no route while masked");
        w32(&m, 28, 0); // unmask
        assert!(fired(&m, 1), "the pending interrupt went out on unmask");
        assert_eq!(*r.0.lock().unwrap(), vec![(25, 0xfee0_0000, 0x31)]);
        m.pba_read(0, &mut pba);
        assert_eq!(u64::from_le_bytes(pba), 0);
        m.notify(1);
        assert!(fired(&m, 1));
        assert_eq!(
            r.0.lock().unwrap().len(),
            1,
            "route unchanged: no new ioctl"
        );
    }

    #[test]
    fn disabled_or_function_masked_msix_holds_interrupts() {
        let (m, _) = msix(1);
        w32(&m, 12, 0);
        m.notify(0);
        assert!(!fired(&m, 0), "MSI-X disabled");
        m.set_control(CONTROL_ENABLE | CONTROL_FUNCTION_MASK);
        assert!(!fired(&m, 0), "function masked");
        m.set_control(CONTROL_ENABLE);
        assert!(fired(&m, 0), "sent once deliverable");
    }

    #[test]
    fn a_new_message_while_unmasked_is_routed_before_the_next_interrupt() {
        let (m, r) = msix(1);
        m.set_control(CONTROL_ENABLE);
        w32(&m, 0, 0xfee0_0000);
        w32(&m, 8, 0x20);
        w32(&m, 12, 0);
        w32(&m, 8, 0x21);
        m.notify(0);
        assert!(fired(&m, 0));
        assert_eq!(r.0.lock().unwrap().last(), Some(&(24, 0xfee0_0000, 0x21)));
    }

    #[test]
    fn table_accesses_beyond_the_table_or_misaligned_are_ignored() {
        let (m, r) = msix(2);
        m.set_control(CONTROL_ENABLE);
        w32(&m, 32, 0); // entry 2 does not exist
        w32(&m, 2, 0xffff_ffff); // misaligned
        m.table_write(12, &[0]); // one byte
        m.table_write(8, &[0; 16]); // too wide
        m.table_write(u64::MAX - 3, &[0; 4]); // would overflow
        assert_eq!(r32(&m, 12), 1, "entry 0 still masked");
        assert_eq!(r32(&m, 0), 0);
        assert_eq!(r32(&m, 32), 0, "read past the table");
        let mut b = [0xffu8; 2];
        m.table_read(0, &mut b);
        assert_eq!(b, [0, 0]);
        m.pba_write(0, &[0xff; 8]);
        let mut pba = [0xffu8; 4];
        m.pba_read(8, &mut pba);
        assert_eq!(pba, [0; 4], "read past the PBA");
        m.notify(NO_VECTOR);
        m.notify(7);
        assert!(r.0.lock().unwrap().is_empty());
    }

    #[test]
    fn the_routing_table_keeps_the_irqchip_pins_and_adds_msi_routes() {
        let mut msi = BTreeMap::new();
        msi.insert(30, (0xfee0_1000, 0x4022));
        let e = routing_entries(&msi);
        // 24 IOAPIC pins + 16 PIC pins + 1 MSI.
        assert_eq!(e.len(), 41);
        let last = e.last().unwrap();
        assert_eq!((last.gsi, last.type_), (30, KVM_IRQ_ROUTING_MSI));
        // SAFETY: reading the union member this test wrote (an MSI entry).
        let (lo, data) = unsafe { (last.u.msi.address_lo, last.u.msi.data) };
        assert_eq!((lo, data), (0xfee0_1000, 0x4022));
        let serial = e
            .iter()
            .find(|x| x.gsi == 4 && x.type_ == KVM_IRQ_ROUTING_IRQCHIP);
        // SAFETY: an irqchip entry, as its type says.
        let (chip, pin) = unsafe {
            let s = serial.unwrap();
            (s.u.irqchip.irqchip, s.u.irqchip.pin)
        };
        assert_eq!((chip, pin), (KVM_IRQCHIP_IOAPIC, 4));
    }
}
