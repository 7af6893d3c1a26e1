//! Disk hot-add and hot-remove while the guest runs (`vhdtool vm disk-add | disk-remove`), on
//! the pci transport: the main thread's side of ACPI PCI hotplug (`devices::hotplug`).
//!
//! ```text
//!  disk-add IMAGE   → open the image (its lock), build the function in the lowest free
//!                     slot, start its worker, plug it (UP bit), raise HOTPLUG_GSI → reply id
//!  disk-remove ID   → DOWN bit, raise HOTPLUG_GSI, hold the reply
//!     guest _EJ0    → the function leaves bus 0 (vCPU thread); here: stop the worker (drains
//!                     and flushes), drop the ioeventfds and irqfds, close the image → reply
//!     no _EJ0 by the deadline → withdraw the request → error reply; the disk stays
//! ```
//!
//! Invariants: only the main thread adds or removes disks; a disk leaves `Controller::disks`
//! only after the guest ejected it and its worker has drained and flushed it; a failed
//! add leaves nothing behind (the image is closed again, no slot is taken); ids are
//! `disk<N>` with N never reused while the VM runs.

use std::path::Path;
use std::sync::mpsc::Sender;
use std::sync::Arc;
use std::time::{Duration, Instant};

use kvm_ioctls::VmFd;
use vmm_sys_util::eventfd::EventFd;

use crate::api::Reply;
use crate::controller::Controller;
use crate::devices::pci::PciRoot;
use crate::disks::{make_disk, release_pci, DiskSlot, PciInterrupts};
use crate::{DiskConfig, Transport};

/// Why `disk-add` is refused on a virtio-mmio VM.
pub const MMIO_FIXED: &str = "disk hotplug needs --transport pci: this VM's disks use \
     virtio-mmio, whose devices are fixed at boot";

/// A `disk-remove` waiting for the guest's eject.
struct Removal {
    id: String,
    device: u8,
    deadline: Instant,
    timeout_s: u64,
    reply: Sender<Reply>,
}

/// What hotplug needs besides the controller's disks.
pub struct HotplugState {
    /// The PCI bus (pci transport only).
    pub pci: Option<Arc<PciRoot>>,
    /// Raises [`crate::layout::HOTPLUG_GSI`].
    pub irq: EventFd,
    /// The VM (for building functions and dropping their ioeventfds and irqfds).
    pub vm: Arc<VmFd>,
    /// MSI-X routes and the INTx line of the functions.
    pub irqs: PciInterrupts,
    /// The number of the next disk id.
    pub next_id: usize,
    removals: Vec<Removal>,
}

impl HotplugState {
    /// Hotplug state of a VM whose first `disks` disks were there at boot.
    pub fn new(
        pci: Option<Arc<PciRoot>>,
        irq: EventFd,
        vm: Arc<VmFd>,
        irqs: PciInterrupts,
        disks: usize,
    ) -> HotplugState {
        HotplugState {
            pci,
            irq,
            vm,
            irqs,
            next_id: disks,
            removals: Vec::new(),
        }
    }
}

impl HotplugState {
    /// Why the VM cannot be checkpointed or migrated now, if it cannot: a removal waits for
    /// the guest's eject (its reply cannot travel with the VM, and the disk is half gone).
    pub fn unsaved(&self) -> Option<String> {
        let r = self.removals.first()?;
        Some(format!(
            "a removal of {} (PCI slot {}) is in progress: the guest has not ejected it yet; \
             checkpoint or migrate once `disk-remove` has answered",
            r.id, r.device
        ))
    }
}

/// Whether `target` (an id or an image path) names `d`.
fn names(d: &DiskSlot, target: &str) -> bool {
    if d.id == target {
        return true;
    }
    let canon = |p: &Path| std::fs::canonicalize(p).unwrap_or_else(|_| p.to_path_buf());
    canon(Path::new(target)) == canon(&d.path)
}

impl Controller<'_> {
    /// `disk-add`: the new disk's id, or why not.
    pub fn disk_add(&mut self, path: &Path, read_only: bool) -> Result<String, String> {
        let pci = match (&self.hotplug.pci, self.config.transport) {
            (Some(pci), Transport::Pci) => pci.clone(),
            _ => return Err(MMIO_FIXED.into()),
        };
        if self.shutdown.is_some() {
            return Err("a shutdown is in progress".into());
        }
        let device = pci.free_slot().ok_or_else(|| {
            format!(
                "no free PCI slot: all {} are in use (remove a disk first)",
                crate::MAX_DISKS
            )
        })?;
        let disk = DiskConfig {
            path: path.to_path_buf(),
            read_only,
        };
        let built = make_disk(
            &self.hotplug.vm,
            self.mem,
            usize::from(device) - 1,
            &disk,
            usize::from(self.config.cpus),
            Transport::Pci,
            &self.hotplug.irqs,
        )
        .map_err(|e| e.to_string())?;
        let Some(function) = built.pci else {
            return Err("internal: a pci disk without its function".into());
        };
        let id = format!("disk{}", self.hotplug.next_id);
        let mut slot = DiskSlot {
            id: id.clone(),
            pci: Some((device, function.clone())),
            transport: built.device,
            path: disk.path,
            read_only,
            worker: None,
        };
        if let Err(e) = slot.start(usize::from(device), self.tx.clone()) {
            release_pci(&self.hotplug.vm, &function);
            return Err(e.to_string());
        }
        self.hotplug.next_id += 1;
        pci.plug(device, function);
        self.disks.push(slot);
        if let Err(e) = self.hotplug.irq.write(1) {
            tracing::warn!("raise the hotplug interrupt: {e}");
        }
        tracing::info!("{id}: {} plugged into PCI slot {device}", path.display());
        Ok(id)
    }

    /// `disk-remove`: asks the guest to eject the disk; the reply goes out when it has (see
    /// [`Controller::poll_hotplug`]) or the timeout passed. `Err` is an immediate refusal.
    pub fn disk_remove(
        &mut self,
        target: &str,
        timeout_s: u64,
        reply: Sender<Reply>,
    ) -> Result<(), (String, Sender<Reply>)> {
        let refuse = |e: String, reply| Err((e, reply));
        let Some(pci) = self.hotplug.pci.clone() else {
            return refuse(MMIO_FIXED.into(), reply);
        };
        if self.shutdown.is_some() {
            return refuse("a shutdown is in progress".into(), reply);
        }
        if self.control.is_paused() {
            return refuse(
                "the VM is paused: a paused guest cannot eject a disk (resume it first)".into(),
                reply,
            );
        }
        let Some(d) = self.disks.iter().find(|d| names(d, target)) else {
            let known: Vec<&str> = self.disks.iter().map(|d| d.id.as_str()).collect();
            return refuse(
                format!("no disk {target:?} (disks: {})", known.join(", ")),
                reply,
            );
        };
        let Some((device, _)) = d.pci else {
            return refuse(format!("{} is not a PCI function", d.id), reply);
        };
        if self.hotplug.removals.iter().any(|r| r.device == device) {
            return refuse(format!("a removal of {} is in progress", d.id), reply);
        }
        let id = d.id.clone();
        pci.hotplug().request_remove(device);
        if let Err(e) = self.hotplug.irq.write(1) {
            pci.hotplug().cancel_remove(device);
            return refuse(format!("raise the hotplug interrupt: {e}"), reply);
        }
        let timeout = Duration::from_secs(timeout_s.min(24 * 3600));
        self.hotplug.removals.push(Removal {
            id,
            device,
            deadline: Instant::now() + timeout,
            timeout_s,
            reply,
        });
        Ok(())
    }

    /// Finishes the removals the guest ejected, and refuses those past their deadline.
    /// Returns an error (the VM must stop) when an ejected disk cannot be flushed.
    pub fn poll_hotplug(&mut self) -> crate::Result<()> {
        let Some(pci) = self.hotplug.pci.clone() else {
            return Ok(());
        };
        // Withdraw the overdue requests first: an eject that lands after this is ignored, one
        // that landed before is in take_ejected below and counts.
        let now = Instant::now();
        for r in self.hotplug.removals.iter().filter(|r| now >= r.deadline) {
            pci.hotplug().cancel_remove(r.device);
        }
        let mut failed = None;
        for (device, function) in pci.take_ejected() {
            release_pci(&self.hotplug.vm, &function);
            drop(function);
            let pos = self
                .disks
                .iter()
                .position(|d| d.pci.as_ref().is_some_and(|p| p.0 == device));
            let Some(pos) = pos else { continue };
            let mut d = self.disks.remove(pos);
            let flushed = d.stop();
            let id = d.id.clone();
            let path = d.path.clone();
            drop(d); // closes the image and releases its lock
            let waiting = self
                .hotplug
                .removals
                .iter()
                .position(|r| r.device == device);
            let reply = match &flushed {
                Ok(()) => Reply::done(format!(
                    "{id} removed: the guest ejected PCI slot {device}; {} drained, flushed \
                     and closed",
                    path.display()
                )),
                Err(e) => Reply::failed(format!("{id} ejected, but its last flush failed: {e}")),
            };
            if let Some(w) = waiting {
                let _ = self.hotplug.removals.remove(w).reply.send(reply);
            }
            if let Err(e) = flushed {
                failed = failed.or(Some(e));
            }
        }
        let (overdue, waiting): (Vec<Removal>, Vec<Removal>) =
            std::mem::take(&mut self.hotplug.removals)
                .into_iter()
                .partition(|r| now >= r.deadline);
        self.hotplug.removals = waiting;
        for r in overdue {
            let _ = r.reply.send(Reply::failed(format!(
                "the guest did not eject {} (PCI slot {}) within {} s: it stays attached",
                r.id, r.device, r.timeout_s
            )));
        }
        failed.map_or(Ok(()), Err)
    }
}
