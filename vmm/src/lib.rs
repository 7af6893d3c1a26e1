//! vmm: a minimal KVM virtual machine monitor that boots a stock Linux `bzImage` with
//! VHD/VHDX/raw disks served by [`block_backend`]'s io_uring engine (`vhdtool boot`).
//!
//! A Firecracker-sized VMM built from rust-vmm crates (kvm-ioctls, kvm-bindings, vm-memory,
//! linux-loader, vm-superio, virtio-queue, vmm-sys-util, acpi_tables): no firmware, no PCI
//! unless asked for (`--transport pci`), no hand-written ioctls. The reference guest is Debian's `linux-image-cloud-amd64` (6.1) with a
//! busybox initramfs.
//!
//! # Device model
//!
//! ```text
//!  vCPU threads (KVM_RUN) ──PIO──> 0x3f8-0x3ff  16550A UART (vm-superio) ── stdout / stdin
//!        │                         0x60, 0x64   i8042: 0xFE on 0x64 = reset  → VMM exits 0
//!        │                         0x600-0x601  ACPI sleep control/status: S5 → VMM exits 0
//!        │                         other ports  reads 0xff, writes ignored
//!        └────────MMIO──> 0xd000_0000 + 0x1000·i  virtio-mmio v2 transport of disk i
//!                            │ QueueNotify (0x50) never exits: KVM ioeventfd ──┐
//!                            │ InterruptStatus/ACK: lock-free atomics          │
//!  disk worker thread i  <───────────────────────────────────────────────────────┘
//!     epoll(ioeventfd, stop) → VirtioBlk::process_queue → io_uring engine (block_backend)
//!     completions → used ring → InterruptStatus |= 1, irqfd → in-kernel IOAPIC pin 5+i
//!  serial interrupt: irqfd → IOAPIC pin 4; in-kernel LAPICs, IOAPIC (KVM_CREATE_IRQCHIP), PIT
//! ```
//!
//! **Transport and interrupts — virtio-mmio described by ACPI, interrupts through the IOAPIC.**
//! Debian's kernel has every virtio driver as a module, is built without
//! `VIRTIO_MMIO_CMDLINE_DEVICES` (no `virtio_mmio.device=` on the command line) and without
//! `X86_MPPARSE` (MP tables are ignored). So the guest must learn about CPUs, the IOAPIC and the
//! devices from ACPI: without a MADT it runs one CPU in PIC virtual-wire mode, which stalled with
//! an interrupt pending in about one boot in four in the nested setup, while IOAPIC-routed guests
//! never did. Given that ACPI is needed anyway, the smallest transport is virtio-mmio: one
//! `LNRO0005` device per disk in the DSDT (the Firecracker ≥1.8 and QEMU microvm model), one
//! edge-triggered IOAPIC GSI per disk, a 4 KiB register window, no PCI config space, BARs,
//! bridges or `_PRT` routing.
//!
//! **`--transport pci`: virtio-pci with MSI-X.** The same devices as modern virtio-pci
//! functions on bus 0 of a PCI host bridge (`PCI0`, `PNP0A03` in the DSDT; config mechanism #1
//! on ports 0xCF8/0xCFC, no MCFG: `devices::pci` says why), one 32 KiB BAR0 each in the window
//! 0xe000_0000-0xefff_ffff, one MSI-X vector per queue plus config, each an irqfd on its own
//! GSI (24 + 8·disk + vector) that KVM routes to the guest's MSI message
//! (KVM_SET_GSI_ROUTING, rewritten when the guest unmasks or reprograms a vector), queue
//! notifications by ioeventfd. An interrupt costs no exit (virtio-mmio costs two: the ISR read
//! and the acknowledge). It is the default: in `benches/vmm.sh` (nested) it boots faster than
//! virtio-mmio (0.67-0.73 of its time), serves one fio job faster (1.18-1.55x) and four jobs
//! on four queues level with it (0.95-1.04x, inside the runs' spread). A driver that
//! leaves MSI-X off (a guest booted with `pci=nomsi`) gets INTA# instead: one level-triggered
//! IOAPIC pin shared by every function (GSI 16, in `PCI0._PRT`), asserted until the driver
//! reads the ISR (`devices::intx`).
//! Checkpoints and migrations of a pci-transport VM carry each function's slot, config space
//! (BAR0 where the guest put it), MSI-X table and virtio registers, hot-added disks included
//! (`state::pci`); only a disk removal in progress refuses them. The ACPI tables are
//! "hardware-reduced" (FADT flag): no PIC, PIT or SCI for the guest; the LAPIC timer runs in
//! TSC-deadline mode and kvm-clock gives the time (CPUID hypervisor bit set).
//!
//! # Guest memory map
//!
//! ```text
//!  0x0000_0500  GDT (null, null, code 0x10, data 0x18, TSS 0x20); IDT at 0x0530 (empty)
//!  0x0000_7000  boot_params ("zero page"), RSI at entry
//!  0x0000_8ff0  initial stack (RSP, RBP)
//!  0x0000_9000  PML4, 0xa000 PDPT, 0xb000-0xefff four PDs: 4 GiB identity map in 2 MiB pages
//!  0x0002_0000  kernel command line
//!  0x0009_fc00 ─ 0x0010_0000  reserved in e820; ACPI tables at 0x000e_0000 (RSDP first)
//!  0x0010_0000  protected-mode kernel (bzImage payload); entry = 0x10_0200 (64-bit boot protocol)
//!   …           initrd at the top of low RAM (page aligned, below 2 GiB)
//!  low RAM ends at min(memory, 3 GiB)
//!  0xc000_0000 ─ 4 GiB  MMIO hole: virtio-mmio at 0xd000_0000 (4 KiB each), IOAPIC 0xfec0_0000,
//!                        LAPIC 0xfee0_0000 (both in KVM)
//!  4 GiB ─      the rest of the RAM when memory > 3 GiB
//! ```
//!
//! # Exits
//!
//! [`run`] returns [`GuestExit::Reboot`] when the guest resets (i8042 `0xFE` with `reboot=k`,
//! or a triple fault after the kernel printed `reboot: Restarting system`, as with `reboot=t`)
//! and [`GuestExit::PowerOff`] on ACPI S5 (`poweroff -f`). A kernel panic (seen on the console),
//! an unexpected triple fault (`KVM_EXIT_SHUTDOWN`), `KVM_EXIT_INTERNAL_ERROR` (with its
//! suberror and the instruction bytes for emulation failures), a failed VM entry or any other
//! unexpected exit is an [`Error`] that names it, with the vCPU's RIP and the bytes there.
//! SIGINT/SIGTERM (and ^A x on a terminal console) stop the VM with an error. Every way out
//! stops all vCPUs (signal kick) and the disk workers, which drain their I/O and flush the disks
//! before `run` returns. `VHDKIT_VMM_EXIT_STATS=1` prints each vCPU's port/MMIO exit counts.
//!
//! # Checkpoints and live migration
//!
//! `checkpoint` (module docs there) saves a running VM to a folder and continues its disks on
//! differencing children; [`restore`] continues it. [`migration`] moves a running VM to
//! another VMM process over TCP (pre-copy with KVM dirty logging, the state in the
//! checkpoint's container; [`incoming`] is the target); a failed migration leaves the guest
//! running at the source.
//!
//! # Running it
//!
//! On a machine with hardware KVM (`/dev/kvm` from kvm_intel or kvm_amd):
//!
//! ```text
//! vhdtool boot --kernel /boot/vmlinuz --initrd initrd.img --memory 512M --cpus 2 \
//!     --disk root.vhdx --disk data.vhd,read-only --cmdline "quiet"
//! ```
//!
//! The VMM always puts `console=ttyS0 reboot=k panic=-1 pci=off 8250.nr_uarts=1` in front of
//! the given command line (the only console is ttyS0, there is no PCI, and a reset is how the
//! guest ends the VM); `--transport pci` leaves out `pci=off`, and the guest then needs
//! `virtio_pci_legacy_dev`, `virtio_pci_modern_dev` and `virtio_pci` instead of `virtio_mmio`. Disks are `/dev/vda`, `/dev/vdb`, … in `--disk` order once the guest has
//! loaded `virtio_mmio` and `virtio_blk` (`virtio_ring`, `virtio`, `virtio_mmio`, `virtio_blk`
//! with `insmod`, in that order, for the Debian kernel; never pass `nomodule`).
//!
//! Tests: `cargo test -p vhdtool --test boot` boots hand-assembled tiny guests on the machine's
//! `/dev/kvm` (every exit path, in well under a second). `cargo test -p vhdkit-tests --test
//! boot` is the end-to-end test with the Debian cloud kernel (fetched with `apt-get download`):
//! on hardware KVM it runs `vhdtool boot` directly; where `/dev/kvm` is the PVM software
//! hypervisor (`/sys/module/kvm_pvm`, which cannot run the stock kernel) or absent, it boots an
//! L1 Linux under `qemu-system-x86_64 -accel tcg -cpu qemu64,+svm,+npt` that loads kvm-amd and
//! runs vhdtool there. `VHDKIT_BOOT_MODE=direct|nested` forces a mode. Boot time and guest fio
//! against QEMU: `benches/vmm.sh` (hardware KVM only).

#![warn(missing_docs)]

mod acpi;
pub mod api;
mod boot;
mod checkpoint;
mod console;
mod control;
mod controller;
mod cpu;
mod devices;
mod disks;
mod hotplug;
mod layout;
pub mod migration;
mod pages;
pub mod state;
mod vcpu;
mod vm;

use std::path::PathBuf;

pub use checkpoint::restore;
pub use migration::incoming;
pub use vm::run;

/// Where `/dev/kvm` is the PVM software hypervisor: the module's sysfs folder.
const KVM_PVM: &str = "/sys/module/kvm_pvm";

/// A warning to show before booting when `/dev/kvm` is a software hypervisor (`kvm_pvm`), on
/// which guest kernel code is emulated: a stock Linux runs far slower there, or does not boot,
/// and would otherwise leave the user looking at a silent console.
pub fn software_hypervisor_warning() -> Option<String> {
    std::path::Path::new(KVM_PVM).exists().then(|| {
        "/dev/kvm is the kvm_pvm software hypervisor (/sys/module/kvm_pvm): guest kernel code \
         is emulated there, so a guest kernel runs far slower than on hardware KVM, and a stock \
         Linux kernel may not boot at all (no output for minutes)"
            .to_string()
    })
}

/// One disk of the guest.
#[derive(Debug, Clone)]
pub struct DiskConfig {
    /// Image (raw, VHD or VHDX; a differencing image brings its parents).
    pub path: PathBuf,
    /// Open read-only: the guest sees a read-only device and its writes fail.
    pub read_only: bool,
}

/// What to boot.
#[derive(Debug, Clone)]
pub struct VmConfig {
    /// Linux `bzImage`.
    pub kernel: PathBuf,
    /// Initial ramdisk, if any.
    pub initrd: Option<PathBuf>,
    /// Extra kernel command line, after [`BASE_CMDLINE`].
    pub cmdline: String,
    /// Guest RAM in bytes.
    pub memory: u64,
    /// Number of vCPUs (1 to [`MAX_CPUS`]).
    pub cpus: u8,
    /// Disks, `/dev/vda` first.
    pub disks: Vec<DiskConfig>,
    /// How the guest reaches the disks.
    pub transport: Transport,
}

/// The virtio transport of the disks.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Transport {
    /// virtio-mmio devices in the DSDT, one IOAPIC pin each; no PCI (`pci=off`).
    #[default]
    Mmio,
    /// virtio-pci functions on a PCI host bridge (config mechanism #1, `PCI0` in the DSDT),
    /// MSI-X vectors through KVM MSI routes; disks can be hot-added and hot-removed.
    Pci,
}

impl Transport {
    /// Whether it is [`Transport::Mmio`] (the default, left out of saved records).
    pub fn is_mmio(&self) -> bool {
        *self == Transport::Mmio
    }
}

impl std::fmt::Display for Transport {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Transport::Mmio => "mmio",
            Transport::Pci => "pci",
        })
    }
}

impl std::str::FromStr for Transport {
    type Err = String;

    fn from_str(s: &str) -> std::result::Result<Transport, String> {
        match s {
            "mmio" => Ok(Transport::Mmio),
            "pci" => Ok(Transport::Pci),
            other => Err(format!("transport must be mmio or pci, not {other:?}")),
        }
    }
}

/// How to run the VM beside its configuration.
#[derive(Debug, Clone, Default)]
pub struct RunOptions {
    /// Serve the control API ([`api`]) on this unix socket.
    pub api_socket: Option<PathBuf>,
}

/// Kernel command line the VMM always passes, before the user's (with the mmio transport;
/// the pci transport drops `pci=off`).
pub const BASE_CMDLINE: &str = "console=ttyS0 reboot=k panic=-1 pci=off 8250.nr_uarts=1";

/// Most vCPUs: the xAPIC limit. APIC ids are the vCPU indexes, 8 bits in the MADT's local APIC
/// entries, CPUID leaf 1 and the IOAPIC's destination field, and 0xff is the broadcast id.
pub const MAX_CPUS: u8 = 254;

/// Most disks (one IOAPIC GSI each, 5 to 23).
pub const MAX_DISKS: usize = layout::MAX_VIRTIO_DEVICES;

/// How the guest ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum GuestExit {
    /// The guest reset the machine (`reboot`).
    Reboot,
    /// The guest entered ACPI S5 (`poweroff`).
    PowerOff,
    /// `shutdown` through the API: the guest did not power off within the timeout (seconds),
    /// so the VMM stopped it.
    Stopped(u64),
    /// `checkpoint --stop` through the API: the VM was saved and stopped.
    Saved,
    /// `migrate` through the API: the VM runs on the target now.
    Migrated,
}

/// VMM errors.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// The configuration cannot be booted.
    #[error("{0}")]
    Config(String),
    /// `/dev/kvm` cannot be used.
    #[error("KVM: {what}: {source}")]
    Kvm {
        /// The operation.
        what: String,
        /// The error from the kernel.
        source: kvm_ioctls::Error,
    },
    /// A file could not be read.
    #[error("{path}: {source}")]
    File {
        /// The file.
        path: PathBuf,
        /// The error.
        source: std::io::Error,
    },
    /// The kernel image could not be loaded.
    #[error("{path}: cannot load the kernel: {detail}")]
    Kernel {
        /// The kernel file.
        path: PathBuf,
        /// What went wrong.
        detail: String,
    },
    /// A disk could not be opened or failed.
    #[error("disk {path}: {source}")]
    Disk {
        /// The image.
        path: PathBuf,
        /// The backend error.
        source: block_backend::Error,
    },
    /// A disk's worker could not wait for its queue and completion events (epoll).
    #[error("disk {path}: worker event loop: {source}")]
    DiskWorker {
        /// The image.
        path: PathBuf,
        /// The error of epoll.
        source: std::io::Error,
    },
    /// The VMM could not set something up (threads, eventfds, guest memory).
    #[error("{0}")]
    Setup(String),
    /// The guest kernel panicked (seen on the serial console).
    #[error("the guest kernel panicked: {0}")]
    GuestPanic(String),
    /// A checkpoint could not be written or restored.
    #[error("checkpoint: {0}")]
    State(state::StateError),
    /// A live migration failed (the stream, or the peer).
    #[error("migration: {0}")]
    Migration(migration::stream::StreamError),
    /// The guest stopped in a way it did not ask for.
    #[error("vCPU {cpu}: {reason}")]
    GuestFailure {
        /// The vCPU that saw it.
        cpu: u8,
        /// The exit reason, registers and instruction bytes.
        reason: String,
    },
}

impl From<state::StateError> for Error {
    fn from(e: state::StateError) -> Error {
        Error::State(e)
    }
}

impl From<migration::stream::StreamError> for Error {
    fn from(e: migration::stream::StreamError) -> Error {
        Error::Migration(e)
    }
}

/// Result of the VMM.
pub type Result<T> = std::result::Result<T, Error>;

impl Error {
    fn kvm(what: impl Into<String>, source: kvm_ioctls::Error) -> Error {
        Error::Kvm {
            what: what.into(),
            source,
        }
    }
}
