//! The transport-independent half of a virtio 1.x device: feature negotiation, the device
//! status state machine, the selected virtqueue's registers, reset, and the saved state. Both
//! transports ([`super::virtio_mmio`] and [`super::virtio_pci`]) are register maps over a
//! [`VirtioDevice`]; neither keeps feature, status or queue state of its own.
//!
//! Invariants: the device model is only touched under the mutex (the vCPU threads for register
//! accesses, the disk worker for queue processing); FEATURES_OK is only accepted when the
//! driver took VIRTIO_F_VERSION_1; a reset (status 0) first waits for every request in flight,
//! then resets the queues, so no completion lands in a ring the driver gave up. The interrupt
//! status (ISR) is an atomic outside the lock: the worker sets it from the notify callback
//! while holding the lock, vCPUs read and clear it without.

use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};

use block_backend::virtio_blk::VirtioBlk;
use virtio_bindings::virtio_config::{
    VIRTIO_CONFIG_S_DRIVER_OK, VIRTIO_CONFIG_S_FEATURES_OK, VIRTIO_F_VERSION_1,
};
use virtio_queue::{Queue, QueueT};
use vmm_sys_util::eventfd::EventFd;

use crate::state::{QueueState, TransportState};

/// Virtio device id of a block device.
pub const DEVICE_ID_BLOCK: u32 = 2;
/// Interrupt status bit: a used buffer was added.
pub const INT_VRING: u32 = 1;

/// What a register write asks of the VMM.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Action {
    /// Nothing.
    None,
    /// The worker should look at the queues (driver ready, or a notify that missed the
    /// ioeventfd).
    Kick,
}

/// What a status write did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum StatusChange {
    /// Nothing the transport must act on.
    None,
    /// The driver reset the device (status 0): the transport resets its own registers.
    Reset,
    /// DRIVER_OK was just set: the worker should look at the queues.
    DriverOk,
}

/// Feature, status and queue registers over the device (under [`VirtioDevice`]'s lock).
pub struct VirtioCore {
    /// The virtio-blk device model.
    pub dev: VirtioBlk,
    /// Which 32 feature bits the device feature register shows.
    pub device_features_sel: u32,
    /// Which 32 feature bits the driver feature register takes.
    pub driver_features_sel: u32,
    /// Features the driver wrote so far.
    pub driver_features: u64,
    /// The selected virtqueue.
    pub queue_sel: u32,
    /// Device status.
    pub status: u32,
}

impl VirtioCore {
    /// The device feature word selected by `device_features_sel` (0 past bit 63).
    pub fn device_features_word(&self) -> u32 {
        match self.device_features_sel {
            0 => self.dev.device_features() as u32,
            1 => (self.dev.device_features() >> 32) as u32,
            _ => 0,
        }
    }

    /// The driver feature word selected by `driver_features_sel`.
    pub fn driver_features_word(&self) -> u32 {
        match self.driver_features_sel {
            0 => self.driver_features as u32,
            1 => (self.driver_features >> 32) as u32,
            _ => 0,
        }
    }

    /// Writes the driver feature word selected by `driver_features_sel` (ignored past 63).
    pub fn set_driver_features_word(&mut self, v: u32) {
        match self.driver_features_sel {
            0 => self.driver_features = (self.driver_features & !0xffff_ffff) | u64::from(v),
            1 => self.driver_features = (self.driver_features & 0xffff_ffff) | (u64::from(v) << 32),
            _ => {}
        }
    }

    /// The selected queue, if it exists.
    pub fn queue(&mut self) -> Option<&mut Queue> {
        let sel = self.queue_sel as usize;
        self.dev.queues_mut().get_mut(sel)
    }

    /// A status write: 0 resets; FEATURES_OK sticks only with VIRTIO_F_VERSION_1 (a legacy
    /// driver reads it back clear and gives up).
    pub fn set_status(&mut self, v: u32) -> StatusChange {
        if v == 0 {
            self.reset();
            return StatusChange::Reset;
        }
        let mut v = v;
        let new = v & !self.status;
        if new & VIRTIO_CONFIG_S_FEATURES_OK != 0 {
            if self.driver_features & (1 << VIRTIO_F_VERSION_1) != 0 {
                self.dev.set_acked_features(self.driver_features);
            } else {
                v &= !VIRTIO_CONFIG_S_FEATURES_OK;
            }
        }
        self.status = v;
        if new & VIRTIO_CONFIG_S_DRIVER_OK != 0 {
            StatusChange::DriverOk
        } else {
            StatusChange::None
        }
    }

    fn reset(&mut self) {
        if let Err(e) = self.dev.flush() {
            tracing::warn!("virtio-blk reset: draining requests failed: {e}");
        }
        for q in self.dev.queues_mut() {
            q.reset();
        }
        self.dev.set_acked_features(0);
        self.status = 0;
        self.device_features_sel = 0;
        self.driver_features_sel = 0;
        self.driver_features = 0;
        self.queue_sel = 0;
    }
}

/// A virtio device as its transport, its disk worker and checkpoints see it.
pub struct VirtioDevice {
    core: Mutex<VirtioCore>,
    interrupt_status: Arc<AtomicU32>,
    kick: EventFd,
}

impl std::fmt::Debug for VirtioDevice {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("VirtioDevice")
            .field("interrupt_status", &self.interrupt_status)
            .finish()
    }
}

impl VirtioDevice {
    /// The device `dev`, whose notify callback sets bits in `interrupt_status` and raises the
    /// interrupt. `kick` wakes the device's worker.
    pub fn new(dev: VirtioBlk, interrupt_status: Arc<AtomicU32>, kick: EventFd) -> VirtioDevice {
        VirtioDevice {
            core: Mutex::new(VirtioCore {
                dev,
                device_features_sel: 0,
                driver_features_sel: 0,
                driver_features: 0,
                queue_sel: 0,
                status: 0,
            }),
            interrupt_status,
            kick,
        }
    }

    /// The registers, locked.
    pub fn lock(&self) -> MutexGuard<'_, VirtioCore> {
        self.core.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// The interrupt status bits (ISR).
    pub fn interrupt_status(&self) -> &AtomicU32 {
        &self.interrupt_status
    }

    /// A status write; a reset also clears the interrupt status.
    pub fn set_status(&self, v: u32) -> StatusChange {
        let change = self.lock().set_status(v);
        if change == StatusChange::Reset {
            self.interrupt_status.store(0, Ordering::SeqCst);
        }
        change
    }

    /// Runs `f` on the device if the driver has set DRIVER_OK (else returns `None`).
    pub fn with_active_device<R>(&self, f: impl FnOnce(&mut VirtioBlk) -> R) -> Option<R> {
        let mut g = self.lock();
        (g.status & VIRTIO_CONFIG_S_DRIVER_OK != 0).then(|| f(&mut g.dev))
    }

    /// Runs `f` on the device whatever its state (shutdown: drain and flush).
    pub fn with_device<R>(&self, f: impl FnOnce(&mut VirtioBlk) -> R) -> R {
        f(&mut self.lock().dev)
    }

    /// The eventfd that wakes the worker.
    pub fn kick_evt(&self) -> &EventFd {
        &self.kick
    }

    /// The transport and queue registers, for a checkpoint (the device is drained first).
    pub fn save_state(&self) -> TransportState {
        let mut g = self.lock();
        let queues = g
            .dev
            .queues_mut()
            .iter()
            .map(|q| QueueState {
                size: q.size(),
                ready: q.ready(),
                desc_table: q.desc_table(),
                avail_ring: q.avail_ring(),
                used_ring: q.used_ring(),
                next_avail: q.next_avail(),
                next_used: q.next_used(),
                event_idx: q.event_idx_enabled(),
            })
            .collect();
        TransportState {
            status: g.status,
            device_features_sel: g.device_features_sel,
            driver_features_sel: g.driver_features_sel,
            driver_features: g.driver_features,
            queue_sel: g.queue_sel,
            interrupt_status: self.interrupt_status.load(Ordering::SeqCst),
            queues,
        }
    }

    /// Puts saved registers back on a fresh device with the same queues. Checks every value
    /// the guest could not have set (queue count, sizes) and says which is wrong.
    pub fn restore_state(&self, s: &TransportState) -> Result<(), String> {
        let mut g = self.lock();
        if s.queues.len() != g.dev.queues_mut().len() {
            return Err(format!(
                "{} virtqueues saved, the device has {}",
                s.queues.len(),
                g.dev.queues_mut().len()
            ));
        }
        if s.status & VIRTIO_CONFIG_S_FEATURES_OK != 0 {
            g.dev.set_acked_features(s.driver_features);
        }
        for (i, (q, st)) in g.dev.queues_mut().iter_mut().zip(&s.queues).enumerate() {
            q.try_set_size(st.size)
                .map_err(|e| format!("virtqueue {i}: size {}: {e:?}", st.size))?;
            let split = |a: u64| (Some(a as u32), Some((a >> 32) as u32));
            let (l, h) = split(st.desc_table);
            q.set_desc_table_address(l, h);
            let (l, h) = split(st.avail_ring);
            q.set_avail_ring_address(l, h);
            let (l, h) = split(st.used_ring);
            q.set_used_ring_address(l, h);
            q.set_next_avail(st.next_avail);
            q.set_next_used(st.next_used);
            q.set_event_idx(st.event_idx);
            q.set_ready(st.ready);
        }
        g.status = s.status;
        g.device_features_sel = s.device_features_sel;
        g.driver_features_sel = s.driver_features_sel;
        g.driver_features = s.driver_features;
        g.queue_sel = s.queue_sel;
        self.interrupt_status
            .store(s.interrupt_status, Ordering::SeqCst);
        Ok(())
    }
}
