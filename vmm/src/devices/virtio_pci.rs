//! virtio-pci, modern only (virtio 1.x §4.1): a PCI function (vendor 0x1af4, device
//! 0x1040 + virtio id, revision 1) whose capabilities point into one 32-bit memory BAR.
//!
//! ```text
//!  config space                          BAR0 (32 KiB, at a fixed address)
//!  0x00 header: 1af4:1042 rev 1,         0x0000 common cfg (56 bytes, §4.1.4.3)
//!       class 01/80/00, subsystem        0x1000 ISR (1 byte, read clears)
//!       1af4:0040, pin 1 (INTA#)         0x2000 device cfg (struct virtio_blk_config)
//!  0x40 MSI-X: N = queues + 1            0x3000 notify: queue q at 0x3000 + 4q (ioeventfds)
//!  0x4c..0xa8 virtio caps: common,       0x4000 MSI-X table (16 bytes per vector)
//!       notify (multiplier 4), ISR,      0x5000 MSI-X PBA
//!       device, pci cfg access
//! ```
//!
//! Interrupts go through MSI-X once the driver enables it: vector 0 is the usual config
//! vector, and the vector of queue `q` is whatever the driver writes to `queue_msix_vector`
//! (read by the device's notify callback through [`Vectors`]). Until then (a driver without
//! MSI-X, Linux with `pci=nomsi`) they assert INTA# ([`Intx`], see [`super::intx`]), which
//! stays asserted until the driver reads the ISR (read-to-clear) or resets the device, and
//! never while the command register's Interrupt Disable bit is set.
//!
//! BAR0 starts at the address the VMM gives it, which a guest booting with the function
//! present keeps; a guest may move it (Linux assigns the BARs of a hot-added function itself).
//! The notify ioeventfds follow: they are registered, through the [`IoeventHook`], at the
//! address BAR0 decodes at, and only while it decodes; notifications elsewhere exit to the
//! VMM and still kick.
//!
//! Invariants: feature, status and queue state live in the shared [`VirtioDevice`] (this
//! module maps offsets onto it); BAR0 decodes only with memory space enabled and inside the
//! host bridge's window; the ioeventfds are registered at most once, at the decoded BAR; every
//! access the layout does not define (wrong size or offset, beyond a region, to read-only
//! registers) is ignored and reads 0, never a panic.

use std::sync::atomic::{AtomicU16, AtomicU32, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};

use virtio_queue::QueueT;

use vmm_sys_util::eventfd::EventFd;

use super::intx::Intx;
use super::msix::{Msix, NO_VECTOR};
use super::pci::{ConfigSpace, PciRoot, CONFIG_SIZE};
use super::virtio::{Action, StatusChange, VirtioDevice, DEVICE_ID_BLOCK, INT_VRING};
use crate::state::pci::PciFunctionState;

/// The virtio PCI vendor.
pub const VENDOR: u16 = 0x1af4;
/// Size of BAR0.
pub const BAR0_SIZE: u64 = 0x8000;
/// Common configuration in BAR0.
pub const COMMON: u64 = 0x0000;
const COMMON_LEN: u64 = 0x38;
/// ISR status in BAR0.
pub const ISR: u64 = 0x1000;
/// Device configuration in BAR0.
pub const DEVICE: u64 = 0x2000;
const DEVICE_LEN: u64 = 0x1000;
/// Queue notifications in BAR0: queue `q` at `NOTIFY + q * NOTIFY_MULTIPLIER`.
pub const NOTIFY: u64 = 0x3000;
/// `notify_off_multiplier`.
pub const NOTIFY_MULTIPLIER: u32 = 4;
/// MSI-X table in BAR0.
pub const MSIX_TABLE: u64 = 0x4000;
/// MSI-X pending bit array in BAR0.
pub const MSIX_PBA: u64 = 0x5000;

/// Capability offsets in config space.
const CAP_MSIX: usize = 0x40;
const CAP_COMMON: usize = 0x4c;
const CAP_NOTIFY: usize = 0x5c;
const CAP_ISR: usize = 0x70;
const CAP_DEVICE: usize = 0x80;
const CAP_PCI_CFG: usize = 0x90;
/// `struct virtio_pci_cap` cfg_type values.
const TYPE_COMMON: u8 = 1;
const TYPE_NOTIFY: u8 = 2;
const TYPE_ISR: u8 = 3;
const TYPE_DEVICE: u8 = 4;
const TYPE_PCI_CFG: u8 = 5;
const BAR0: usize = 0x10;
const COMMAND_MEMORY: u16 = 1 << 1;
const COMMAND_INTX_DISABLE: u16 = 1 << 10;

/// The vector registers: `[0]` is `config_msix_vector`, `[1 + q]` queue `q`'s.
#[derive(Debug)]
pub struct Vectors(Vec<AtomicU16>);

impl Vectors {
    /// Every vector [`NO_VECTOR`], for `queues` queues.
    pub fn new(queues: usize) -> Vectors {
        Vectors((0..=queues).map(|_| AtomicU16::new(NO_VECTOR)).collect())
    }

    /// The vector of queue `q` ([`NO_VECTOR`] if there is none).
    pub fn queue(&self, q: u16) -> u16 {
        self.0
            .get(1 + usize::from(q))
            .map_or(NO_VECTOR, |v| v.load(Ordering::SeqCst))
    }

    fn reset(&self) {
        for v in &self.0 {
            v.store(NO_VECTOR, Ordering::SeqCst);
        }
    }
}

/// The notify callback of a function's device: sets the queue bit of the ISR `isr`, then
/// raises the queue's MSI-X vector, or INTA# while MSI-X is off. The ISR comes first: a driver
/// that reads it once INTx is up must find the bit.
pub fn notifier(
    isr: Arc<AtomicU32>,
    msix: Arc<Msix>,
    vectors: Arc<Vectors>,
    intx: Arc<Intx>,
) -> Box<dyn FnMut(u16) + Send> {
    Box::new(move |queue| {
        isr.fetch_or(INT_VRING, Ordering::SeqCst);
        if !msix.notify(vectors.queue(queue)) {
            intx.raise();
        }
    })
}

/// Registers (`true`) or unregisters (`false`) an eventfd as the ioeventfd of a guest
/// address (KVM_IOEVENTFD in the VMM).
pub type IoeventHook = Box<dyn Fn(&EventFd, u64, bool) -> std::io::Result<()> + Send + Sync>;

/// A virtio-pci function over a [`VirtioDevice`].
pub struct VirtioPci {
    dev: Arc<VirtioDevice>,
    msix: Arc<Msix>,
    vectors: Arc<Vectors>,
    intx: Arc<Intx>,
    config: Mutex<ConfigSpace>,
    queues: u16,
    hook: Option<IoeventHook>,
    /// BAR0 address the ioeventfds are registered at.
    ioevents: Mutex<Option<u64>>,
}

impl std::fmt::Debug for VirtioPci {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("VirtioPci")
            .field("config", &self.config)
            .field("queues", &self.queues)
            .finish()
    }
}

/// Appends a `struct virtio_pci_cap` at `at` (length `len`: 16, or 20 with a trailing u32).
fn vendor_cap(c: &mut ConfigSpace, at: usize, next: usize, len: u8, kind: u8, region: (u64, u64)) {
    c.set_u8(at, 0x09);
    c.set_u8(at + 1, next as u8);
    c.set_u8(at + 2, len);
    c.set_u8(at + 3, kind);
    c.set_u8(at + 4, 0); // BAR0
    c.set_u32(at + 8, region.0 as u32);
    c.set_u32(at + 12, region.1 as u32);
}

impl VirtioPci {
    /// The function of `dev` with `queues` virtqueues, MSI-X vectors `msix` (one per queue plus
    /// config), INTA# `intx` (which the device's notify callback raises while MSI-X is off),
    /// and BAR0 at `bar` (a multiple of [`BAR0_SIZE`], below 4 GiB); `hook` places the notify
    /// ioeventfds (none: every notification exits to the VMM).
    pub fn new(
        dev: Arc<VirtioDevice>,
        queues: u16,
        msix: Arc<Msix>,
        vectors: Arc<Vectors>,
        intx: Arc<Intx>,
        bar: u32,
        hook: Option<IoeventHook>,
    ) -> VirtioPci {
        let mut c = ConfigSpace::new(
            VENDOR,
            0x1040 + DEVICE_ID_BLOCK as u16,
            0x0180_0001, // mass storage, other; revision 1 (modern)
        );
        c.set_writable(0x04, &[0x07, 0x04]); // I/O, memory, bus master; INTx disable
        c.set_u16(0x06, 1 << 4); // capabilities list
        c.set_writable(0x0c, &[0xff]); // cache line size
        c.set_u32(BAR0, bar); // 32-bit, non-prefetchable memory
        c.set_writable(BAR0, &(!(BAR0_SIZE as u32 - 1)).to_le_bytes());
        c.set_u16(0x2c, VENDOR);
        c.set_u16(0x2e, 0x0040);
        c.set_u8(0x34, CAP_MSIX as u8);
        c.set_writable(0x3c, &[0xff]); // interrupt line (the driver's note)
        c.set_u8(0x3d, 1); // interrupt pin: INTA#
                           // MSI-X: enable and function mask writable.
        c.set_u8(CAP_MSIX, 0x11);
        c.set_u8(CAP_MSIX + 1, CAP_COMMON as u8);
        c.set_u16(CAP_MSIX + 2, msix.len().saturating_sub(1) as u16);
        c.set_writable(CAP_MSIX + 3, &[0xc0]);
        c.set_u32(CAP_MSIX + 4, MSIX_TABLE as u32);
        c.set_u32(CAP_MSIX + 8, MSIX_PBA as u32);
        vendor_cap(
            &mut c,
            CAP_COMMON,
            CAP_NOTIFY,
            16,
            TYPE_COMMON,
            (COMMON, COMMON_LEN),
        );
        let notify_len = u64::from(queues) * u64::from(NOTIFY_MULTIPLIER);
        vendor_cap(
            &mut c,
            CAP_NOTIFY,
            CAP_ISR,
            20,
            TYPE_NOTIFY,
            (NOTIFY, notify_len),
        );
        c.set_u32(CAP_NOTIFY + 16, NOTIFY_MULTIPLIER);
        vendor_cap(&mut c, CAP_ISR, CAP_DEVICE, 16, TYPE_ISR, (ISR, 1));
        vendor_cap(
            &mut c,
            CAP_DEVICE,
            CAP_PCI_CFG,
            16,
            TYPE_DEVICE,
            (DEVICE, DEVICE_LEN),
        );
        vendor_cap(&mut c, CAP_PCI_CFG, 0, 20, TYPE_PCI_CFG, (0, 0));
        // pci cfg access: bar, offset, length and the data window are the driver's.
        c.set_writable(CAP_PCI_CFG + 4, &[0xff]);
        c.set_writable(CAP_PCI_CFG + 8, &[0xff; 12]);
        VirtioPci {
            dev,
            msix,
            vectors,
            intx,
            config: Mutex::new(c),
            queues,
            hook,
            ioevents: Mutex::new(None),
        }
    }

    fn config(&self) -> MutexGuard<'_, ConfigSpace> {
        self.config.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// The device behind the function.
    pub fn device(&self) -> &Arc<VirtioDevice> {
        &self.dev
    }

    /// Guest address of queue `q`'s notify register with BAR0 at `base`.
    pub fn notify_addr(base: u64, q: u16) -> u64 {
        base + NOTIFY + u64::from(q) * u64::from(NOTIFY_MULTIPLIER)
    }

    /// `(base, size)` of BAR0 while it decodes: memory space on, inside the PCI window.
    pub fn decoded_bar(&self) -> Option<(u64, u64)> {
        let c = self.config();
        let base = u64::from(c.u32(BAR0) & !0xf);
        (c.u16(0x04) & COMMAND_MEMORY != 0
            && PciRoot::owns_mmio(base)
            && PciRoot::owns_mmio(base + BAR0_SIZE - 1))
        .then_some((base, BAR0_SIZE))
    }

    /// Moves the notify ioeventfds to where BAR0 decodes now (or drops them).
    fn sync_ioevents(&self) {
        let Some(hook) = &self.hook else { return };
        let want = self.decoded_bar().map(|(base, _)| base);
        let mut have = self.ioevents.lock().unwrap_or_else(|e| e.into_inner());
        if *have == want {
            return;
        }
        let kick = self.dev.kick_evt();
        for (base, register) in [(*have, false), (want, true)] {
            for q in 0..self.queues {
                let Some(base) = base else { continue };
                let addr = Self::notify_addr(base, q);
                if let Err(e) = hook(kick, addr, register) {
                    // Notifications there still exit to the VMM, which kicks.
                    tracing::warn!(
                        "ioeventfd of queue {q} at {addr:#x} (register {register}): {e}"
                    );
                }
            }
        }
        *have = want;
    }

    /// Drops the notify ioeventfds (the function is leaving the VM).
    pub fn release_ioevents(&self) {
        let Some(hook) = &self.hook else { return };
        let mut have = self.ioevents.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(base) = have.take() {
            for q in 0..self.queues {
                let _ = hook(self.dev.kick_evt(), Self::notify_addr(base, q), false);
            }
        }
    }

    /// Lowers INTA# for good (the function is leaving the VM): a late completion cannot
    /// raise the shared line again.
    pub fn release_intx(&self) {
        self.intx.set_disabled(true);
    }

    /// The function's state for a checkpoint or migration: config space, vector registers,
    /// MSI-X table and pending bits (the device's own is [`VirtioDevice::save_state`]).
    pub fn save_state(&self, slot: u8, id: &str) -> PciFunctionState {
        let (msix_table, msix_pending) = self.msix.save();
        PciFunctionState {
            slot,
            id: id.to_string(),
            config: self.config().bytes().to_vec(),
            vectors: self
                .vectors
                .0
                .iter()
                .map(|v| v.load(Ordering::SeqCst))
                .collect(),
            msix_table,
            msix_pending,
        }
    }

    /// Puts saved state on this fresh function of the same shape: the writable config bits
    /// (command, BAR0, MSI-X control, ...), the vector registers and the MSI-X table; then
    /// routes every deliverable vector (and sends what was pending) and registers the notify
    /// ioeventfds where BAR0 decodes, so the guest goes on without touching anything.
    pub fn restore_state(&self, s: &PciFunctionState) -> Result<(), String> {
        if s.config.len() != CONFIG_SIZE {
            return Err(format!(
                "config space of {} bytes, not {CONFIG_SIZE}",
                s.config.len()
            ));
        }
        if s.vectors.len() != self.vectors.0.len() {
            return Err(format!(
                "{} vector registers saved, the function has {}",
                s.vectors.len(),
                self.vectors.0.len()
            ));
        }
        if let Some(v) = s
            .vectors
            .iter()
            .find(|&&v| v != NO_VECTOR && usize::from(v) >= self.msix.len())
        {
            return Err(format!(
                "vector {v} is past the MSI-X table of {}",
                self.msix.len()
            ));
        }
        self.msix.restore(&s.msix_table, &s.msix_pending)?;
        let control = {
            let mut c = self.config();
            c.write(0, &s.config);
            c.u16(CAP_MSIX + 2)
        };
        for (r, &v) in self.vectors.0.iter().zip(&s.vectors) {
            r.store(v, Ordering::SeqCst);
        }
        self.msix.set_control(control);
        self.sync_intx();
        self.sync_ioevents();
        Ok(())
    }

    /// Makes INTA# follow the command register, MSI-X and the ISR: low while disabled or
    /// while MSI-X carries the interrupts, else asserted while the ISR holds one.
    fn sync_intx(&self) {
        self.intx
            .set_disabled(self.config().u16(0x04) & COMMAND_INTX_DISABLE != 0);
        if self.msix.enabled() {
            self.intx.lower();
        } else if self.dev.interrupt_status().load(Ordering::SeqCst) != 0 {
            self.intx.raise();
        }
    }

    /// The MSI-X vectors.
    pub fn msix(&self) -> &Arc<Msix> {
        &self.msix
    }

    /// A config space read (`off` and `data.len()` as [`ConfigSpace::valid`] allows; other
    /// accesses read all ones).
    pub fn config_read(&self, off: usize, data: &mut [u8]) {
        if !ConfigSpace::valid(off, data.len()) {
            tracing::debug!("config read of {} bytes at {off:#x} refused", data.len());
            data.fill(0xff);
            return;
        }
        let data_window = CAP_PCI_CFG + 16..CAP_PCI_CFG + 20;
        if data_window.contains(&off) {
            let (bar, at, len) = self.pci_cfg_window();
            if let (0, 1 | 2 | 4) = (bar, len) {
                let mut buf = [0u8; 4];
                self.bar_read(at, &mut buf[..len]);
                self.config()
                    .set_u32(CAP_PCI_CFG + 16, u32::from_le_bytes(buf));
            }
        }
        self.config().read(off, data);
    }

    /// The VIRTIO_PCI_CAP_PCI_CFG window the driver set: `(bar, offset, length)`.
    fn pci_cfg_window(&self) -> (u8, u64, usize) {
        let c = self.config();
        let mut bar = [0u8];
        c.read(CAP_PCI_CFG + 4, &mut bar);
        let (at, len) = (c.u32(CAP_PCI_CFG + 8), c.u32(CAP_PCI_CFG + 12));
        (bar[0], u64::from(at), len as usize)
    }

    /// A config space write: writable bits only; a new BAR0 address or memory enable moves the
    /// ioeventfds, MSI-X control goes to the vectors, the pci cfg data window reaches BAR0.
    pub fn config_write(&self, off: usize, data: &[u8]) {
        if !ConfigSpace::valid(off, data.len()) {
            tracing::debug!("config write of {} bytes at {off:#x} refused", data.len());
            return;
        }
        let control = {
            let mut c = self.config();
            c.write(off, data);
            (off < CAP_MSIX + 4 && off + data.len() > CAP_MSIX + 2).then(|| c.u16(CAP_MSIX + 2))
        };
        if let Some(control) = control {
            self.msix.set_control(control);
        }
        if control.is_some() || off < BAR0 {
            // MSI-X control or the command register.
            self.sync_intx();
        }
        if off < BAR0 + 4 {
            // The command register or BAR0.
            self.sync_ioevents();
        }
        if (CAP_PCI_CFG + 16..CAP_PCI_CFG + 20).contains(&off) {
            let (bar, at, len) = self.pci_cfg_window();
            if let (0, 1 | 2 | 4) = (bar, len) {
                let word = self.config().u32(CAP_PCI_CFG + 16).to_le_bytes();
                if self.bar_write(at, &word[..len]) == Action::Kick {
                    let _ = self.dev.kick_evt().write(1);
                }
            }
        }
    }

    /// A read of `data.len()` bytes at `off` in BAR0.
    pub fn bar_read(&self, off: u64, data: &mut [u8]) {
        data.fill(0);
        let len = data.len() as u64;
        match off {
            COMMON..0x1000 if off + len <= COMMON_LEN => self.common_read(off, data),
            ISR if len == 1 => {
                data[0] = self.dev.interrupt_status().swap(0, Ordering::SeqCst) as u8;
                self.intx.lower();
            }
            DEVICE..0x3000 if off + len <= DEVICE + DEVICE_LEN => {
                let cfg = self.dev.with_device(|d| d.config_space());
                for (i, b) in data.iter_mut().enumerate() {
                    *b = cfg.get((off - DEVICE) as usize + i).copied().unwrap_or(0);
                }
            }
            MSIX_TABLE..MSIX_PBA => self.msix.table_read(off - MSIX_TABLE, data),
            MSIX_PBA..BAR0_SIZE => self.msix.pba_read(off - MSIX_PBA, data),
            _ => tracing::debug!("BAR0 read of {len} bytes at {off:#x} ignored"),
        }
    }

    /// A write of `data` at `off` in BAR0.
    pub fn bar_write(&self, off: u64, data: &[u8]) -> Action {
        let len = data.len() as u64;
        match off {
            COMMON..0x1000 if off + len <= COMMON_LEN => return self.common_write(off, data),
            NOTIFY..MSIX_TABLE
                if off + len <= NOTIFY + u64::from(self.queues) * u64::from(NOTIFY_MULTIPLIER) =>
            {
                return Action::Kick
            }
            MSIX_TABLE..MSIX_PBA => self.msix.table_write(off - MSIX_TABLE, data),
            MSIX_PBA..BAR0_SIZE => self.msix.pba_write(off - MSIX_PBA, data),
            _ => tracing::debug!("BAR0 write of {len} bytes at {off:#x} ignored"),
        }
        Action::None
    }

    fn common_read(&self, off: u64, data: &mut [u8]) {
        let mut g = self.dev.lock();
        let sel = g.queue_sel as usize;
        let vector = |i: usize| self.vectors.0.get(i).map(|v| v.load(Ordering::SeqCst));
        let v: u64 = match (off, data.len()) {
            (0x00, 4) => g.device_features_sel.into(),
            (0x04, 4) => g.device_features_word().into(),
            (0x08, 4) => g.driver_features_sel.into(),
            (0x0c, 4) => g.driver_features_word().into(),
            (0x10, 2) => vector(0).unwrap_or(NO_VECTOR).into(),
            (0x12, 2) => self.queues.into(),
            (0x14, 1) => g.status.into(),
            (0x15, 1) => 0, // config_generation: the config never changes
            (0x16, 2) => g.queue_sel.into(),
            (0x18, 2) => g.queue().map_or(0, |q| q.size().into()),
            (0x1a, 2) => vector(1 + sel).unwrap_or(NO_VECTOR).into(),
            (0x1c, 2) => g.queue().map_or(0, |q| q.ready().into()),
            (0x1e, 2) => g.queue().map_or(0, |_| sel as u64),
            (0x20..=0x37, 4 | 8) if off % data.len() as u64 == 0 => {
                let a = g.queue().map_or(0, |q| match off & !7 {
                    0x20 => q.desc_table(),
                    0x28 => q.avail_ring(),
                    _ => q.used_ring(),
                });
                if off & 4 == 0 {
                    a
                } else {
                    a >> 32
                }
            }
            _ => {
                tracing::debug!(
                    "common cfg read of {} bytes at {off:#x} ignored",
                    data.len()
                );
                0
            }
        };
        let bytes = v.to_le_bytes();
        data.copy_from_slice(&bytes[..data.len()]);
    }

    fn common_write(&self, off: u64, data: &[u8]) -> Action {
        let mut b = [0u8; 8];
        b[..data.len()].copy_from_slice(data);
        let v = u64::from_le_bytes(b);
        if (off, data.len()) == (0x14, 1) {
            return match self.dev.set_status(v as u32) {
                StatusChange::DriverOk => Action::Kick,
                StatusChange::Reset => {
                    self.vectors.reset();
                    self.intx.lower();
                    Action::None
                }
                StatusChange::None => Action::None,
            };
        }
        let mut g = self.dev.lock();
        let sel = g.queue_sel as usize;
        let vector = |v: u64| {
            if v < self.msix.len() as u64 {
                v as u16
            } else {
                NO_VECTOR
            }
        };
        match (off, data.len()) {
            (0x00, 4) => g.device_features_sel = v as u32,
            (0x08, 4) => g.driver_features_sel = v as u32,
            (0x0c, 4) => g.set_driver_features_word(v as u32),
            (0x10, 2) => self.vectors.0[0].store(vector(v), Ordering::SeqCst),
            (0x16, 2) => g.queue_sel = v as u32,
            (0x18, 2) => {
                if let Some(q) = g.queue() {
                    q.set_size(v as u16);
                }
            }
            (0x1a, 2) => {
                if let Some(slot) = self.vectors.0.get(1 + sel) {
                    slot.store(vector(v), Ordering::SeqCst);
                }
            }
            (0x1c, 2) if v == 1 => {
                if let Some(q) = g.queue() {
                    q.set_ready(true);
                }
            }
            (0x20..=0x37, 4 | 8) if off % data.len() as u64 == 0 => {
                if let Some(q) = g.queue() {
                    let (low, high) = match (data.len(), off & 4) {
                        (8, _) => (Some(v as u32), Some((v >> 32) as u32)),
                        (_, 0) => (Some(v as u32), None),
                        _ => (None, Some(v as u32)),
                    };
                    match off & !7 {
                        0x20 => q.set_desc_table_address(low, high),
                        0x28 => q.set_avail_ring_address(low, high),
                        _ => q.set_used_ring_address(low, high),
                    }
                }
            }
            _ => tracing::debug!(
                "common cfg write of {} bytes at {off:#x} ignored",
                data.len()
            ),
        }
        Action::None
    }
}

#[cfg(test)]
#[path = "virtio_pci_tests.rs"]
mod tests;
