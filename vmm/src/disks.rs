//! The disks: building each virtio block device over its image behind its transport
//! (virtio-mmio with an IOAPIC pin, or virtio-pci with MSI-X), and the worker thread that
//! serves its queues.
//!
//! Invariant: a worker that returns has drained every request of its device and flushed its
//! disk; a checkpoint stops a disk's worker, moves the device onto a new differencing child,
//! and starts a new worker.

use std::os::fd::AsRawFd;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::mpsc::Sender;
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;

use block_backend::engine::{new_shared_engine, Engine, EngineKind};
use block_backend::virtio_blk::{Config, VirtioBlk};
use block_backend::OpenOptions;
use kvm_ioctls::{IoEventAddress, NoDatamatch, VmFd};
use virtio_queue::{Queue, QueueT};
use vm_memory::GuestMemoryMmap;
use vmm_sys_util::epoll::{ControlOperation, Epoll, EpollEvent, EventSet};
use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};

use crate::devices::intx::SharedLine;
use crate::devices::msix::{MsiRouter, Msix};
use crate::devices::virtio::{VirtioDevice, INT_VRING};
use crate::devices::virtio_mmio::{VirtioMmio, QUEUE_NOTIFY};
use crate::devices::virtio_pci::{notifier, IoeventHook, Vectors, VirtioPci};
use crate::layout;
use crate::vcpu::VmEvent;
use crate::vm::block_stop_signals;
use crate::Transport;
use crate::{Error, Result};

/// Virtqueue size of each disk.
const QUEUE_SIZE: u16 = 256;

fn new_eventfd() -> Result<EventFd> {
    EventFd::new(EFD_NONBLOCK).map_err(|e| Error::Setup(format!("eventfd: {e}")))
}

/// A disk of the running VM.
pub struct DiskSlot {
    /// Its name in the control API (`disk0`, `disk1`, …; never reused while the VM runs).
    pub id: String,
    /// Its PCI function, with the pci transport (device number `pci.0` on bus 0).
    pub pci: Option<(u8, Arc<VirtioPci>)>,
    /// Its device.
    pub transport: Arc<VirtioDevice>,
    /// The image the guest writes now (changes at each checkpoint).
    pub path: PathBuf,
    /// Opened read-only.
    pub read_only: bool,
    /// The worker serving it, when running.
    pub worker: Option<Worker>,
}

/// A running disk worker.
pub struct Worker {
    stop: EventFd,
    handle: JoinHandle<Result<()>>,
}

impl DiskSlot {
    /// Starts the worker of disk `i`; its errors also go to `tx`.
    pub fn start(&mut self, i: usize, tx: Sender<VmEvent>) -> Result<()> {
        let stop = new_eventfd()?;
        let theirs = stop
            .try_clone()
            .map_err(|e| Error::Setup(format!("eventfd: {e}")))?;
        let (t, path) = (self.transport.clone(), self.path.clone());
        let handle = std::thread::Builder::new()
            .name(format!("disk{i}"))
            .spawn(move || {
                block_stop_signals();
                let r = disk_worker(&t, &theirs, &path);
                if let Err(e) = &r {
                    let _ = tx.send(Err(Error::Setup(e.to_string())));
                }
                r
            })
            .map_err(|e| Error::Setup(format!("spawn a disk thread: {e}")))?;
        self.worker = Some(Worker { stop, handle });
        Ok(())
    }

    /// Stops the worker: it drains its requests and flushes the disk.
    pub fn stop(&mut self) -> Result<()> {
        let Some(w) = self.worker.take() else {
            return Ok(());
        };
        let _ = w.stop.write(1);
        match w.handle.join() {
            Ok(r) => r,
            Err(_) => Err(Error::Setup(format!(
                "disk {} thread panicked",
                self.path.display()
            ))),
        }
    }
}

/// Takes a PCI function out of KVM: its notify ioeventfds, its vectors' irqfds (the
/// function has left the bus; its GSIs may serve another function later) and its INTA#.
pub fn release_pci(vm: &VmFd, pci: &VirtioPci) {
    pci.release_ioevents();
    pci.release_intx();
    for (fd, gsi) in pci.msix().irqfds() {
        if let Err(e) = vm.unregister_irqfd(fd, gsi) {
            tracing::warn!("unregister the irqfd of GSI {gsi}: {e}");
        }
    }
}

/// One engine per queue over the image at `path` (its whole chain).
pub fn open_engines(
    path: &Path,
    read_only: bool,
    nq: usize,
) -> block_backend::Result<Vec<Box<dyn Engine>>> {
    let opts = if read_only {
        OpenOptions::read_only()
    } else {
        OpenOptions::read_write()
    };
    let chain = Arc::new(Mutex::new(block_backend::open(path, opts)?));
    (0..nq)
        .map(|_| new_shared_engine(EngineKind::IoUring, chain.clone(), usize::from(QUEUE_SIZE)))
        .collect()
}

/// Most virtqueues per disk.
const MAX_DISK_QUEUES: usize = 4;

/// Virtqueues (and io_uring engines) of a disk for `cpus` vCPUs.
pub fn queues_for(cpus: usize) -> usize {
    cpus.clamp(1, MAX_DISK_QUEUES)
}

/// A disk's device and the transport the guest reaches it through.
pub struct BuiltDisk {
    /// The device (what the worker, checkpoints and migration use).
    pub device: Arc<VirtioDevice>,
    /// Its virtio-mmio registers, with `--transport mmio`.
    pub mmio: Option<Arc<VirtioMmio>>,
    /// Its PCI function, with `--transport pci`.
    pub pci: Option<Arc<VirtioPci>>,
}

/// How the PCI functions interrupt: MSI-X routes, and the INTx line they share.
#[derive(Clone)]
pub struct PciInterrupts {
    /// Routes MSI-X vectors.
    pub router: Arc<dyn MsiRouter>,
    /// INTA# of every function ([`layout::PCI_INTX_GSI`]).
    pub intx: Arc<SharedLine>,
}

/// Opens disk `i` and builds its device (one virtqueue, and one io_uring, per vCPU up to
/// [`MAX_DISK_QUEUES`]) behind `transport`: its interrupts (an irqfd on IOAPIC pin
/// [`layout::virtio_gsi`], or one irqfd per MSI-X vector on GSIs from
/// [`layout::PCI_MSI_GSI_BASE`] routed by `irqs`, with INTx on `irqs`' shared line until the
/// driver enables MSI-X) and its queue notify ioeventfds.
pub fn make_disk(
    vm: &Arc<VmFd>,
    mem: &GuestMemoryMmap,
    i: usize,
    disk: &crate::DiskConfig,
    cpus: usize,
    transport: Transport,
    irqs: &PciInterrupts,
) -> Result<BuiltDisk> {
    let derr = |source| Error::Disk {
        path: disk.path.clone(),
        source,
    };
    let nq = queues_for(cpus);
    let engines = open_engines(&disk.path, disk.read_only, nq).map_err(derr)?;
    let queues = (0..nq)
        .map(|_| Queue::new(QUEUE_SIZE))
        .collect::<std::result::Result<Vec<_>, _>>()
        .map_err(|e| Error::Setup(format!("virtqueue: {e:?}")))?;
    let config = Config {
        id: format!("vhdkit{i}"),
    };
    let status = Arc::new(AtomicU32::new(0));
    let kick = new_eventfd()?;
    let ioevent = |kick: &EventFd, addr: u64| {
        vm.register_ioevent(kick, &IoEventAddress::Mmio(addr), NoDatamatch)
            .map_err(|e| Error::kvm(format!("KVM_IOEVENTFD (disk {i} at {addr:#x})"), e))
    };
    match transport {
        Transport::Mmio => {
            let irq = Arc::new(new_eventfd()?);
            let gsi = layout::virtio_gsi(i);
            vm.register_irqfd(&irq, gsi)
                .map_err(|e| Error::kvm(format!("KVM_IRQFD (disk {i}, GSI {gsi})"), e))?;
            let (s, q) = (status.clone(), irq.clone());
            let notify = Box::new(move |_queue| {
                s.fetch_or(INT_VRING, Ordering::SeqCst);
                if let Err(e) = q.write(1) {
                    tracing::warn!("virtio interrupt: {e}");
                }
            });
            let dev = VirtioBlk::new(engines, mem.clone(), queues, config, notify).map_err(derr)?;
            ioevent(&kick, layout::virtio_mmio_addr(i) + QUEUE_NOTIFY)?;
            let mmio = Arc::new(VirtioMmio::new(dev, status, kick));
            Ok(BuiltDisk {
                device: mmio.device().clone(),
                mmio: Some(mmio),
                pci: None,
            })
        }
        Transport::Pci => {
            // Vector 0 for the configuration, 1 + q for queue q (what Linux asks for).
            let nvec = nq + 1;
            let base = layout::PCI_MSI_GSI_BASE + i as u32 * layout::PCI_VECTORS_PER_DISK;
            let gsis: Vec<u32> = (0..nvec as u32).map(|v| base + v).collect();
            let mut irqfds: Vec<EventFd> = Vec::new();
            for &gsi in &gsis {
                let fd = new_eventfd()?;
                vm.register_irqfd(&fd, gsi)
                    .map_err(|e| Error::kvm(format!("KVM_IRQFD (disk {i}, GSI {gsi})"), e))?;
                irqfds.push(fd);
            }
            let msix = Arc::new(Msix::new(irqfds, gsis, irqs.router.clone()));
            let vectors = Arc::new(Vectors::new(nq));
            let intx = Arc::new(irqs.intx.function());
            let notify = notifier(status.clone(), msix.clone(), vectors.clone(), intx.clone());
            let dev = VirtioBlk::new(engines, mem.clone(), queues, config, notify).map_err(derr)?;
            let device = Arc::new(VirtioDevice::new(dev, status, kick));
            let bar = layout::pci_bar_addr(i) as u32;
            // All queues wake the one worker of the disk, through ioeventfds wherever the
            // guest puts BAR0.
            let vm = vm.clone();
            let hook: IoeventHook = Box::new(move |kick, addr, register| {
                let at = IoEventAddress::Mmio(addr);
                if register {
                    vm.register_ioevent(kick, &at, NoDatamatch)
                } else {
                    vm.unregister_ioevent(kick, &at, NoDatamatch)
                }
                .map_err(|e| std::io::Error::from_raw_os_error(e.errno()))
            });
            let pci = VirtioPci::new(device, nq as u16, msix, vectors, intx, bar, Some(hook));
            Ok(BuiltDisk {
                device: pci.device().clone(),
                mmio: None,
                pci: Some(Arc::new(pci)),
            })
        }
    }
}

/// Every disk of a VM, built (and given its saved state when restored).
pub struct Disks {
    /// The devices, in disk order.
    pub devices: Vec<Arc<VirtioDevice>>,
    /// The virtio-mmio register windows (mmio transport).
    pub mmio: Vec<Arc<VirtioMmio>>,
    /// The PCI functions with their slots (pci transport).
    pub pci: Vec<(u8, Arc<VirtioPci>)>,
}

/// Builds `config`'s disks: disk `i` in PCI slot `i + 1` at boot, in its saved slot when
/// `saved` (a checkpoint's or migration's state) is given; then puts the saved device and PCI
/// state on each (registers, queues, config space, MSI-X routes, ioeventfds at BAR0).
pub fn build_disks(
    vm: &Arc<VmFd>,
    mem: &GuestMemoryMmap,
    config: &crate::VmConfig,
    saved: Option<&crate::state::VmState>,
    irqs: &PciInterrupts,
) -> Result<Disks> {
    let saved_pci = saved.and_then(|s| s.pci.as_ref());
    if saved.is_some() && saved_pci.is_some() != (config.transport == Transport::Pci) {
        return Err(Error::Setup(format!(
            "restore: the saved state {} PCI functions, the VM's transport is {}",
            if saved_pci.is_some() {
                "holds"
            } else {
                "holds no"
            },
            config.transport
        )));
    }
    let mut out = Disks {
        devices: Vec::new(),
        mmio: Vec::new(),
        pci: Vec::new(),
    };
    for (i, disk) in config.disks.iter().enumerate() {
        let slot = match saved_pci {
            Some(p) => p.functions.get(i).map(|f| f.slot).ok_or_else(|| {
                Error::Setup(format!("restore: no PCI function state for disk {i}"))
            })?,
            None => i as u8 + 1,
        };
        let built = make_disk(
            vm,
            mem,
            usize::from(slot).saturating_sub(1),
            disk,
            usize::from(config.cpus),
            config.transport,
            irqs,
        )?;
        out.mmio.extend(built.mmio);
        let t = built.device;
        if let Some(s) = saved {
            let state = s
                .transports
                .get(i)
                .ok_or_else(|| Error::Setup(format!("restore: no device state for disk {i}")))?;
            t.restore_state(state)
                .map_err(|e| Error::Setup(format!("restore: disk {i}: {e}")))?;
        }
        if let Some(f) = built.pci {
            if let Some(state) = saved_pci.and_then(|p| p.functions.get(i)) {
                f.restore_state(state).map_err(|e| {
                    Error::Setup(format!("restore: disk {i}, PCI slot {slot}: {e}"))
                })?;
            }
            out.pci.push((slot, f));
        }
        out.devices.push(t);
    }
    Ok(out)
}

/// The disk worker: queue notifications and engine completions in (one epoll over the kick
/// eventfd, every queue engine's completion eventfd and `stop`), used-ring entries out, until
/// `stop`; then drains and flushes. It sleeps only in epoll, never while holding the device
/// lock, so vCPUs reading registers are never held up behind a disk request.
pub fn disk_worker(t: &VirtioDevice, stop: &EventFd, path: &std::path::Path) -> Result<()> {
    const KICK: u64 = 0;
    const STOP: u64 = 1;
    const COMPLETION: u64 = 2;
    let io = |e: std::io::Error| Error::DiskWorker {
        path: path.to_path_buf(),
        source: e,
    };
    let disk = |source: block_backend::Error| Error::Disk {
        path: path.to_path_buf(),
        source,
    };
    let epoll = Epoll::new().map_err(io)?;
    let completion_fds = t.with_device(|d| d.completion_fds()).map_err(disk)?;
    let watched = [(t.kick_evt().as_raw_fd(), KICK), (stop.as_raw_fd(), STOP)]
        .into_iter()
        .chain(
            (COMPLETION..)
                .zip(&completion_fds)
                .map(|(what, &fd)| (fd, what)),
        );
    for (fd, what) in watched {
        epoll
            .ctl(
                ControlOperation::Add,
                fd,
                EpollEvent::new(EventSet::IN, what),
            )
            .map_err(io)?;
    }
    let mut events = [EpollEvent::default(); 8];
    loop {
        let n = match epoll.wait(-1, &mut events) {
            Ok(n) => n,
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
            Err(e) => return Err(io(e)),
        };
        let mut kicked = false;
        for e in &events[..n] {
            match e.data() {
                STOP => return t.with_device(|d| d.flush()).map_err(disk),
                KICK => {
                    let _ = t.kick_evt().read();
                    kicked = true;
                }
                what => {
                    // Reset the completion eventfd before reaping, so a completion that lands
                    // after the reap signals again.
                    let fd = completion_fds[(what - COMPLETION) as usize];
                    let mut count = [0u8; 8];
                    // SAFETY: reads at most 8 bytes into a local array; the descriptor is an
                    // engine's non-blocking eventfd, open as long as the device exists.
                    let _ = unsafe { libc::read(fd, count.as_mut_ptr().cast(), count.len()) };
                }
            }
        }
        if kicked {
            t.with_active_device(|d| (0..d.num_queues()).try_for_each(|q| d.process_queue(q)))
                .unwrap_or(Ok(()))
                .map_err(disk)?;
        }
        t.with_device(|d| d.process_completions(false))
            .map_err(disk)?;
    }
}
