//! Building the VM and running it until the guest resets, powers off or fails.
//!
//! ```text
//!  main thread: KVM VM + irqchip + PIT, memory, ACPI, kernel, devices, vCPUs, workers
//!      └─ waits for the first event: vCPU exit (reset / S5 / failure), worker error, ^A x
//!         → stop flag, signal-kick every vCPU out of KVM_RUN, stop the workers (each drains its
//!           requests and flushes its disk), restore the terminal, return
//!  vCPU thread i: KVM_RUN loop, port and MMIO exits through the Bus
//!  disk worker i: epoll(ioeventfd, stop) → process_queue / process_completions
//!  stdin thread: stdin → UART receive FIFO (crate::console)
//! ```

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::mpsc::channel;
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::Duration;

use kvm_bindings::{kvm_pit_config, kvm_userspace_memory_region, KVM_PIT_SPEAKER_DUMMY};
use kvm_ioctls::Kvm;
use vm_memory::{
    Bytes, GuestAddress, GuestMemoryBackend, GuestMemoryMmap, GuestMemoryRegion,
    MemoryRegionAddress,
};
use vm_superio::Serial;
use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};
use vmm_sys_util::signal::{block_signal, register_signal_handler, Killable, SIGRTMIN};

use crate::api::{ApiServer, Reply};
use crate::checkpoint::{Restored, RestoredMemory};
use crate::console::{spawn_stdin, TerminalGuard};
use crate::control::RunControl;
use crate::controller::Controller;
use crate::devices::bus::Bus;
use crate::devices::intx::{KvmLine, SharedLine};
use crate::devices::msix::KvmMsiRouter;
use crate::devices::pci::PciRoot;
use crate::devices::serial;
use crate::devices::serial::{ConsoleOut, ConsoleState, SerialDevice};
use crate::devices::EventFdTrigger;
use crate::disks::{build_disks, DiskSlot, Disks, PciInterrupts};
use crate::hotplug::HotplugState;
use crate::layout::{self, ACPI_START, GED_GSI, HOTPLUG_GSI, MIN_MEMORY, SERIAL_GSI};
use crate::state::restore;
use crate::vcpu::{VcpuCtx, VmEvent};
use crate::{
    acpi, boot, cpu, Error, GuestExit, Result, RunOptions, Transport, VmConfig, BASE_CMDLINE,
    MAX_CPUS,
};

/// KVM_SET_TSS_ADDR: three pages just below the identity map page, in the MMIO hole.
const TSS_ADDR: usize = 0xfffb_d000;
/// KVM_SET_IDENTITY_MAP_ADDR.
const IDENTITY_MAP_ADDR: u64 = 0xfffb_c000;

/// The signal (SIGINT or SIGTERM) that asked the VMM to stop, 0 if none.
static STOP_SIGNAL: std::sync::atomic::AtomicI32 = std::sync::atomic::AtomicI32::new(0);

extern "C" fn stop_handler(num: libc::c_int, _: *mut libc::siginfo_t, _: *mut libc::c_void) {
    STOP_SIGNAL.store(num, Ordering::SeqCst);
}

/// Keeps SIGINT and SIGTERM away from the calling (VMM-spawned) thread: they go to the main
/// thread, which stops the VM cleanly, instead of interrupting a KVM_RUN, a read or an
/// io_uring wait here.
pub(crate) fn block_stop_signals() {
    for sig in [libc::SIGINT, libc::SIGTERM] {
        if let Err(e) = block_signal(sig) {
            tracing::warn!("cannot block signal {sig}: {e}");
        }
    }
}

/// Checks the configuration before anything is created.
pub(crate) fn validate(config: &VmConfig) -> Result<()> {
    if config.cpus == 0 || config.cpus > MAX_CPUS {
        return Err(Error::Config(format!(
            "--cpus must be 1 to {MAX_CPUS}, not {}",
            config.cpus
        )));
    }
    if config.memory < MIN_MEMORY {
        return Err(Error::Config(format!(
            "--memory must be at least {} MiB",
            MIN_MEMORY >> 20
        )));
    }
    if config.memory % 4096 != 0 {
        return Err(Error::Config("--memory must be a multiple of 4 KiB".into()));
    }
    if config.disks.len() > crate::MAX_DISKS {
        return Err(Error::Config(format!(
            "at most {} disks, not {}",
            crate::MAX_DISKS,
            config.disks.len()
        )));
    }
    Ok(())
}

/// Checks `cpus` against what this KVM can create: `max_vcpus` (KVM_CAP_MAX_VCPUS) vCPUs with
/// ids below `max_vcpu_id` (KVM_CAP_MAX_VCPU_ID); vCPU `i` has id (and APIC id) `i`.
fn check_kvm_vcpus(cpus: u8, max_vcpus: usize, max_vcpu_id: usize) -> Result<()> {
    let cpus = usize::from(cpus);
    if cpus > max_vcpus || cpus > max_vcpu_id {
        return Err(Error::Config(format!(
            "--cpus {cpus}: this KVM creates at most {} vCPUs (KVM_CAP_MAX_VCPUS {max_vcpus}, \
             KVM_CAP_MAX_VCPU_ID {max_vcpu_id})",
            max_vcpus.min(max_vcpu_id)
        )));
    }
    Ok(())
}

/// The kernel command line: [`BASE_CMDLINE`] (without `pci=off` for the pci transport) then
/// the user's.
pub fn full_cmdline(extra: &str, transport: Transport) -> String {
    let base = match transport {
        Transport::Mmio => BASE_CMDLINE.to_string(),
        Transport::Pci => BASE_CMDLINE.replace(" pci=off", ""),
    };
    let extra = extra.trim();
    if extra.is_empty() {
        base
    } else {
        format!("{base} {extra}")
    }
}

/// Boots `config` and runs the guest until it resets or powers off (or fails: see the crate
/// docs). Disks are flushed before this returns, whatever the outcome.
pub fn run(config: &VmConfig, opts: &RunOptions) -> Result<GuestExit> {
    run_vm(config, opts, None)
}

/// A KVM VM with its in-kernel devices (irqchip, PIT) and `mem` registered, for `cpus` vCPUs:
/// what a migration target builds while the source's memory still streams in.
pub(crate) struct BuiltVm {
    /// /dev/kvm.
    pub kvm: Kvm,
    /// The VM; shared with the MSI-X router, which rewrites the GSI routes from the vCPU
    /// threads.
    pub vm: Arc<kvm_ioctls::VmFd>,
}

/// Builds [`BuiltVm`] over `mem`, which must outlive it.
pub(crate) fn build_vm(cpus: u8, mem: &GuestMemoryMmap) -> Result<BuiltVm> {
    let kvm = Kvm::new().map_err(|e| Error::kvm("open /dev/kvm", e))?;
    let kvm_api = kvm.get_api_version();
    if kvm_api != 12 {
        return Err(Error::Config(format!(
            "/dev/kvm has API version {kvm_api}, not 12"
        )));
    }
    check_kvm_vcpus(cpus, kvm.get_max_vcpus(), kvm.get_max_vcpu_id())?;

    let vm = Arc::new(
        kvm.create_vm()
            .map_err(|e| Error::kvm("KVM_CREATE_VM", e))?,
    );
    vm.set_tss_address(TSS_ADDR)
        .map_err(|e| Error::kvm("KVM_SET_TSS_ADDR", e))?;
    if let Err(e) = vm.set_identity_map_address(IDENTITY_MAP_ADDR) {
        tracing::debug!("KVM_SET_IDENTITY_MAP_ADDR: {e}");
    }
    vm.create_irq_chip()
        .map_err(|e| Error::kvm("KVM_CREATE_IRQCHIP", e))?;
    vm.create_pit2(kvm_pit_config {
        flags: KVM_PIT_SPEAKER_DUMMY,
        ..Default::default()
    })
    .map_err(|e| Error::kvm("KVM_CREATE_PIT2", e))?;
    for (slot, region) in mem.iter().enumerate() {
        let host = region
            .get_host_address(MemoryRegionAddress(0))
            .map_err(|e| Error::Setup(format!("guest memory: {e}")))?;
        let r = kvm_userspace_memory_region {
            slot: slot as u32,
            flags: 0,
            guest_phys_addr: region.start_addr().0,
            memory_size: region.len(),
            userspace_addr: host as u64,
        };
        // SAFETY: `host` is the start of an anonymous mapping of `region.len()` bytes owned by
        // `mem`. The caller keeps `mem` (or a clone sharing the mapping) for the VM's life:
        // run_vm holds it and hands clones to every thread that runs the guest, so the
        // mapping outlives its use through KVM.
        unsafe { vm.set_user_memory_region(r) }
            .map_err(|e| Error::kvm("KVM_SET_USER_MEMORY_REGION", e))?;
    }

    Ok(BuiltVm { kvm, vm })
}

/// Runs `config`: booted, or continued from `restored` (a checkpoint).
pub(crate) fn run_vm(
    config: &VmConfig,
    opts: &RunOptions,
    mut restored: Option<Restored>,
) -> Result<GuestExit> {
    validate(config)?;
    // The API socket first: a clash there should not cost a VM start.
    let api = match &opts.api_socket {
        Some(p) => Some(ApiServer::start(p).map_err(|e| Error::Setup(e.to_string()))?),
        None => None,
    };
    // Guest memory first: it must outlive the VM and every thread that uses it.
    let regions: Vec<(GuestAddress, usize)> = layout::ram_regions(config.memory)
        .into_iter()
        .map(|(a, l)| (GuestAddress(a), l as usize))
        .collect();
    let (mem, built) = match restored.as_mut() {
        Some(Restored {
            memory: RestoredMemory::Loaded(m),
            built,
            ..
        }) => (m.clone(), built.take()),
        _ => (
            GuestMemoryMmap::from_ranges(&regions)
                .map_err(|e| Error::Setup(format!("allocate guest memory: {e}")))?,
            None,
        ),
    };
    let BuiltVm { kvm, vm } = match built {
        Some(b) => b,
        None => build_vm(config.cpus, &mem)?,
    };

    // ACPI tables, then the kernel; or the checkpoint's memory and in-kernel devices.
    let entry = match &restored {
        None => {
            let (mmio, pci) = match config.transport {
                Transport::Mmio => (acpi::mmio_devices(config.disks.len()), false),
                Transport::Pci => (Vec::new(), true),
            };
            for (addr, bytes) in acpi::tables(ACPI_START, config.cpus, &mmio, pci) {
                mem.write_slice(&bytes, GuestAddress(addr))
                    .map_err(|e| Error::Setup(format!("write the ACPI tables: {e}")))?;
            }
            let cmdline = full_cmdline(&config.cmdline, config.transport);
            boot::load(
                &mem,
                config.memory,
                &config.kernel,
                config.initrd.as_deref(),
                &cmdline,
                ACPI_START,
            )?
            .entry
        }
        Some(r) => {
            if let RestoredMemory::File { path, len, crc } = &r.memory {
                restore::memory(&mem, path, *len, *crc)?;
            }
            if let Some(d) = restore::vm(&vm, &r.state.kvm, r.advance_clock)? {
                eprintln!(
                    "vhdtool: guest clock advanced by {:.1} ms (the time since it was saved)",
                    d.as_secs_f64() * 1e3
                );
            }
            0
        }
    };

    // Console.
    let console = Arc::new(Mutex::new(ConsoleState::default()));
    let serial_irq = new_eventfd()?;
    vm.register_irqfd(&serial_irq, SERIAL_GSI)
        .map_err(|e| Error::kvm("KVM_IRQFD (serial)", e))?;
    let out = ConsoleOut::new(Box::new(std::io::stdout()), console.clone());
    let serial: SerialDevice = match &restored {
        None => Serial::new(EventFdTrigger(serial_irq), out),
        Some(r) => serial::restore(&r.state.serial, EventFdTrigger(serial_irq), out)
            .map_err(|e| Error::Setup(format!("restore: {e}")))?,
    };
    let serial = Arc::new(Mutex::new(serial));

    // vCPUs, before the disks: a migration target builds them while the source still
    // releases the disks.
    let mut fds = Vec::new();
    for id in 0..config.cpus {
        let fd = vm
            .create_vcpu(u64::from(id))
            .map_err(|e| Error::kvm(format!("KVM_CREATE_VCPU {id}"), e))?;
        cpu::configure(&kvm, &fd, id, config.cpus, entry)?;
        if let Some(r) = &restored {
            let saved = r
                .state
                .vcpus
                .get(usize::from(id))
                .ok_or_else(|| Error::Setup(format!("restore: no state for vCPU {id}")))?;
            // The vCPU is set up as a fresh one: refuse a saved CPU feature this host lacks
            // (a migration target checks here; a checkpoint restore also before any file).
            restore::check_cpuid(&fd, saved)?;
            restore::vcpu(&fd, saved)?;
        }
        fds.push(fd);
    }
    if let Some(wait) = restored.as_mut().and_then(|r| r.before_disks.take()) {
        wait()?;
    }

    // Disks: disk i in PCI slot i + 1 at boot, in its saved slot when restored.
    let irqs = PciInterrupts {
        router: Arc::new(KvmMsiRouter::new(vm.clone())),
        intx: SharedLine::new(Box::new(KvmLine::new(vm.clone(), layout::PCI_INTX_GSI))),
    };
    let saved_state = restored.as_ref().map(|r| &r.state);
    let saved_pci = saved_state.and_then(|s| s.pci.clone());
    let saved_pci = saved_pci.as_ref();
    let Disks {
        devices: transports,
        mmio,
        pci,
    } = build_disks(&vm, &mem, config, saved_state, &irqs)?;
    let pci_functions: Vec<_> = pci.clone();
    let pci = match config.transport {
        Transport::Mmio => None,
        Transport::Pci => Some(Arc::new(
            PciRoot::with_functions(crate::MAX_DISKS, pci)
                .map_err(|e| Error::Setup(format!("restore: {e}")))?,
        )),
    };
    if let (Some(root), Some(saved)) = (&pci, saved_pci) {
        root.hotplug().restore(&saved.hotplug);
    }
    // PCI functions wake their own workers; BusEvent::Kick(i) is virtio-mmio disk i's.
    let mmio_kicks = match config.transport {
        Transport::Mmio => transports.clone(),
        Transport::Pci => Vec::new(),
    };
    let bus = Arc::new(Bus::new(serial.clone(), mmio, pci.clone(), mmio_kicks));
    // The power button: the GED's interrupt.
    let power_button = new_eventfd()?;
    vm.register_irqfd(&power_button, GED_GSI)
        .map_err(|e| Error::kvm("KVM_IRQFD (power button)", e))?;
    // The PCI hotplug interrupt: the GED's second GSI (pci transport).
    let hotplug_irq = new_eventfd()?;
    if pci.is_some() {
        vm.register_irqfd(&hotplug_irq, HOTPLUG_GSI)
            .map_err(|e| Error::kvm("KVM_IRQFD (PCI hotplug)", e))?;
    }

    // Signal handlers, before any thread starts (a failure here leaves none behind).
    register_signal_handler(SIGRTMIN(), kick_handler)
        .map_err(|e| Error::Setup(format!("install the vCPU kick signal handler: {e}")))?;
    // SIGINT/SIGTERM stop the VM like any other exit: vCPUs stopped, disks drained and
    // flushed; the result is an error naming the signal.
    STOP_SIGNAL.store(0, Ordering::SeqCst);
    for sig in [libc::SIGINT, libc::SIGTERM] {
        register_signal_handler(sig, stop_handler)
            .map_err(|e| Error::Setup(format!("install the handler of signal {sig}: {e}")))?;
    }

    // Last word before anything runs (a migration target waits for the source's go).
    if let Some(commit) = restored.as_mut().and_then(|r| r.commit.take()) {
        commit()?;
    }

    let (tx, rx) = channel::<VmEvent>();
    let mut disks: Vec<DiskSlot> = transports
        .iter()
        .zip(&config.disks)
        .enumerate()
        .map(|(i, (t, d))| DiskSlot {
            id: saved_pci
                .and_then(|p| p.functions.get(i))
                .map_or_else(|| format!("disk{i}"), |f| f.id.clone()),
            pci: pci_functions.get(i).cloned(),
            transport: t.clone(),
            path: d.path.clone(),
            read_only: d.read_only,
            worker: None,
        })
        .collect();
    for (i, d) in disks.iter_mut().enumerate() {
        d.start(i, tx.clone())?;
        if restored.is_some() {
            // Requests the guest queued before the checkpoint and never kicked again.
            let _ = d.transport.kick_evt().write(1);
        }
    }

    let stop = Arc::new(AtomicBool::new(false));
    let control = Arc::new(RunControl::new(usize::from(config.cpus)));
    let mut vcpus: Vec<JoinHandle<()>> = Vec::new();
    let terminal = TerminalGuard::new();
    for (id, fd) in fds.into_iter().enumerate() {
        let ctx = VcpuCtx {
            id: id as u8,
            bus: bus.clone(),
            stop: stop.clone(),
            control: control.clone(),
            console: console.clone(),
            mem: mem.clone(),
            tx: tx.clone(),
        };
        let h = std::thread::Builder::new()
            .name(format!("vcpu{id}"))
            .spawn(move || {
                block_stop_signals();
                ctx.run(fd)
            })
            .map_err(|e| Error::Setup(format!("spawn a vCPU thread: {e}")))?;
        vcpus.push(h);
    }
    spawn_stdin(serial.clone(), tx.clone(), terminal.is_some());

    let msr_index = kvm
        .get_msr_index_list()
        .map_err(|e| Error::kvm("KVM_GET_MSR_INDEX_LIST", e))?
        .as_slice()
        .to_vec();
    // Disk ids are never reused: the saved counter is past every saved id (state::pci).
    let next_id = saved_pci.map_or(config.disks.len(), |p| p.next_id as usize);
    let mut ctl = Controller {
        config,
        control: &control,
        vcpus: &vcpus,
        power_button: &power_button,
        shutdown: None,
        vm: &vm,
        mem: &mem,
        serial: &serial,
        disks: &mut disks,
        tx,
        msr_index,
        stop_after_checkpoint: None,
        hotplug: HotplugState::new(pci, hotplug_irq, vm.clone(), irqs, next_id),
    };
    let outcome = loop {
        match rx.recv_timeout(Duration::from_millis(20)) {
            Ok(ev) => break ev,
            Err(std::sync::mpsc::RecvTimeoutError::Timeout) => {
                let sig = STOP_SIGNAL.load(Ordering::SeqCst);
                if sig != 0 {
                    let name = if sig == libc::SIGINT {
                        "SIGINT"
                    } else {
                        "SIGTERM"
                    };
                    break Err(Error::Setup(format!("stopped by {name}")));
                }
            }
            Err(std::sync::mpsc::RecvTimeoutError::Disconnected) => {
                break Err(Error::Setup("every VM thread ended without a word".into()))
            }
        }
        if let Some(exit) = ctl.shutdown_overdue() {
            break Ok(exit);
        }
        if let Some(exit) = ctl.stop_after_checkpoint.take() {
            break exit;
        }
        if let Some((_, rx)) = &api {
            while let Ok(call) = rx.try_recv() {
                ctl.handle(call);
            }
        }
        if let Err(e) = ctl.poll_hotplug() {
            break Err(e);
        }
    };
    let pending_shutdown = ctl.shutdown.take();
    // Replies still held (a removal waiting for its eject) fail now, not at the end.
    drop(ctl);

    // Stop the vCPUs: set the flag, then kick until each has left KVM_RUN (a kick that lands
    // just before KVM_RUN is lost, hence the repeats). A vCPU that never stops is left behind
    // after about two seconds, so this never hangs.
    stop.store(true, Ordering::SeqCst);
    control.stop();
    for _ in 0..200 {
        if vcpus.iter().all(JoinHandle::is_finished) {
            break;
        }
        for h in vcpus.iter().filter(|h| !h.is_finished()) {
            let _ = h.kill(SIGRTMIN());
        }
        std::thread::sleep(Duration::from_millis(10));
    }
    for h in vcpus {
        if h.is_finished() {
            let _ = h.join();
        } else {
            tracing::warn!("a vCPU did not stop");
        }
    }
    // Stop the workers; each drains its requests and flushes its disk.
    let mut flush_error = None;
    for d in &mut disks {
        if let Err(e) = d.stop() {
            flush_error = flush_error.or(Some(e));
        }
    }
    drop(terminal);
    let result = match (outcome, flush_error) {
        (Ok(exit), None) => Ok(exit),
        (Err(e), _) | (Ok(_), Some(e)) => Err(e),
    };
    if let Some((_, reply)) = pending_shutdown {
        let _ = reply.send(match &result {
            Ok(exit) => Reply::done(format!("{exit}; disks flushed")),
            Err(e) => Reply::failed(e.to_string()),
        });
    }
    // Joins the API thread (which sends that reply) and removes the socket.
    drop(api);
    result
}

fn new_eventfd() -> Result<EventFd> {
    EventFd::new(EFD_NONBLOCK).map_err(|e| Error::Setup(format!("eventfd: {e}")))
}

pub(crate) extern "C" fn kick_handler(
    _: libc::c_int,
    _: *mut libc::siginfo_t,
    _: *mut libc::c_void,
) {
}

#[cfg(test)]
mod tests {
    use super::*;

    fn config() -> VmConfig {
        VmConfig {
            kernel: "bzImage".into(),
            initrd: None,
            cmdline: String::new(),
            memory: 512 << 20,
            cpus: 1,
            disks: Vec::new(),
            transport: Transport::Mmio,
        }
    }

    #[test]
    fn base_cmdline_comes_first() {
        assert_eq!(full_cmdline("", Transport::Mmio), BASE_CMDLINE);
        assert_eq!(
            full_cmdline(" quiet ", Transport::Mmio),
            format!("{BASE_CMDLINE} quiet")
        );
        let pci = full_cmdline("quiet", Transport::Pci);
        assert!(
            !pci.contains("pci=off") && pci.ends_with("8250.nr_uarts=1 quiet"),
            "{pci}"
        );
        assert!(BASE_CMDLINE.contains("reboot=k"));
        assert!(!BASE_CMDLINE.contains("nomodule"), "would forbid insmod");
    }

    #[test]
    fn bad_configurations_are_refused_before_touching_kvm() {
        assert!(validate(&config()).is_ok());
        assert!(validate(&VmConfig {
            cpus: 0,
            ..config()
        })
        .is_err());
        assert!(validate(&VmConfig {
            cpus: MAX_CPUS + 1,
            ..config()
        })
        .is_err());
        assert!(validate(&VmConfig {
            memory: 64 << 20,
            ..config()
        })
        .is_err());
        assert!(validate(&VmConfig {
            memory: (512 << 20) + 1,
            ..config()
        })
        .is_err());
        let disk = crate::DiskConfig {
            path: "d".into(),
            read_only: false,
        };
        assert!(validate(&VmConfig {
            disks: vec![disk; crate::MAX_DISKS + 1],
            ..config()
        })
        .is_err());
    }

    #[test]
    fn more_vcpus_than_kvm_creates_are_refused_with_its_limits() {
        assert!(check_kvm_vcpus(254, 1024, 4096).is_ok());
        assert!(check_kvm_vcpus(64, 64, 64).is_ok());
        let e = check_kvm_vcpus(65, 64, 1024).unwrap_err().to_string();
        assert!(e.contains("at most 64 vCPUs"), "{e}");
        let e = check_kvm_vcpus(128, 1024, 100).unwrap_err().to_string();
        assert!(e.contains("KVM_CAP_MAX_VCPU_ID 100"), "{e}");
    }

    #[test]
    fn the_xapic_maximum_of_254_vcpus_is_accepted() {
        assert_eq!(MAX_CPUS, 254);
        assert!(validate(&VmConfig {
            cpus: 254,
            ..config()
        })
        .is_ok());
    }
}
