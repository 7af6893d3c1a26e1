//! The main thread's side of the control API: carries out each [`ApiCall`] against the
//! running VM (pause, resume, status, the power button and the shutdown deadline; disk
//! hotplug is in `crate::hotplug`).
//!
//! Invariant: only the main thread pauses or resumes the vCPUs, so calls never race each
//! other; a pending `shutdown` holds its reply until the VM has stopped and the disks are
//! flushed (see `vm::run`).

use std::sync::mpsc::Sender;
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use kvm_ioctls::VmFd;
use vm_memory::GuestMemoryMmap;
use vmm_sys_util::eventfd::EventFd;
use vmm_sys_util::signal::{Killable, SIGRTMIN};

use crate::api::{ApiCall, Command, DiskStatus, Reply, Status, API_VERSION};
use crate::control::RunControl;
use crate::devices::serial::SerialDevice;
use crate::disks::DiskSlot;
use crate::hotplug::HotplugState;
use crate::vcpu::VmEvent;
use crate::{GuestExit, VmConfig};

/// What the main thread needs to act on API calls.
pub struct Controller<'a> {
    /// The VM's configuration.
    pub config: &'a VmConfig,
    /// Pause and vCPU jobs.
    pub control: &'a RunControl,
    /// The vCPU threads (to kick them out of KVM_RUN).
    pub vcpus: &'a [JoinHandle<()>],
    /// Raises the GED interrupt: the ACPI power button.
    pub power_button: &'a EventFd,
    /// A `shutdown` in progress: its deadline, timeout and reply.
    pub shutdown: Option<((Instant, u64), Sender<Reply>)>,
    /// The VM (irqchip, PIT and clock state).
    pub vm: &'a VmFd,
    /// Guest memory.
    pub mem: &'a GuestMemoryMmap,
    /// The console.
    pub serial: &'a Arc<Mutex<SerialDevice>>,
    /// The disks and their workers.
    pub disks: &'a mut Vec<DiskSlot>,
    /// Where restarted disk workers report errors.
    pub tx: Sender<VmEvent>,
    /// KVM's MSR index list.
    pub msr_index: Vec<u32>,
    /// Set by `checkpoint --stop` (or a checkpoint that left a disk unusable): how the VM
    /// ends.
    pub stop_after_checkpoint: Option<VmEvent>,
    /// Disk hotplug (`disk-add`, `disk-remove`).
    pub hotplug: HotplugState,
}

impl std::fmt::Display for GuestExit {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            GuestExit::Reboot => write!(f, "guest rebooted"),
            GuestExit::PowerOff => write!(f, "guest powered off"),
            GuestExit::Stopped(s) => {
                write!(f, "guest did not power off within {s} s: stopped")
            }
            GuestExit::Saved => write!(f, "guest checkpointed and stopped"),
            GuestExit::Migrated => write!(f, "guest migrated"),
        }
    }
}

impl Controller<'_> {
    /// Kicks every running vCPU out of KVM_RUN.
    pub fn kick(&self) {
        for h in self.vcpus.iter().filter(|h| !h.is_finished()) {
            let _ = h.kill(SIGRTMIN());
        }
    }

    /// `Some` once a shutdown's timeout has passed: the VM is to be stopped.
    pub fn shutdown_overdue(&self) -> Option<GuestExit> {
        let ((deadline, secs), _) = self.shutdown.as_ref()?;
        (Instant::now() >= *deadline).then_some(GuestExit::Stopped(*secs))
    }

    fn state(&self) -> &'static str {
        if self.shutdown.is_some() {
            "shutting-down"
        } else if self.control.is_paused() {
            "paused"
        } else {
            "running"
        }
    }

    /// Carries out `call` and answers it (a shutdown answers later).
    pub fn handle(&mut self, call: ApiCall) {
        let reply = match call.command {
            Command::Status => Reply {
                version: API_VERSION,
                ok: true,
                status: Some(Status {
                    state: self.state().into(),
                    cpus: self.config.cpus,
                    memory: self.config.memory,
                    disks: self
                        .disks
                        .iter()
                        .map(|d| DiskStatus {
                            id: d.id.clone(),
                            pci_slot: d.pci.as_ref().map(|p| p.0),
                            path: d.path.clone(),
                            read_only: d.read_only,
                        })
                        .collect(),
                    pid: std::process::id(),
                }),
                ..Reply::default()
            },
            Command::Pause if self.control.is_paused() => Reply::done("already paused"),
            Command::Pause => match self.control.pause(|| self.kick()) {
                Ok(()) => Reply::done("paused"),
                Err(e) => Reply::failed(e.to_string()),
            },
            Command::Resume if !self.control.is_paused() => Reply::done("already running"),
            Command::Resume => {
                self.control.resume();
                Reply::done("running")
            }
            Command::Shutdown { .. } if self.shutdown.is_some() => {
                Reply::failed("a shutdown is already in progress")
            }
            Command::Checkpoint { .. } if self.shutdown.is_some() => {
                Reply::failed("a shutdown is in progress")
            }
            Command::Migrate { .. } if self.shutdown.is_some() => {
                Reply::failed("a shutdown is in progress")
            }
            Command::Migrate {
                to,
                downtime_ms,
                max_bandwidth_mib,
            } => match self.migrate(&to, downtime_ms, max_bandwidth_mib) {
                Ok(detail) => Reply::done(detail),
                Err(e) => Reply::failed(e.to_string()),
            },
            Command::Checkpoint { dir, stop } => match self.checkpoint(&dir, stop) {
                Ok(detail) => Reply::done(detail),
                Err(e) => Reply::failed(e.to_string()),
            },
            Command::DiskAdd { path, read_only } => match self.disk_add(&path, read_only) {
                Ok(id) => Reply::done(id),
                Err(e) => Reply::failed(format!("disk-add {}: {e}", path.display())),
            },
            Command::DiskRemove { disk, timeout_s } => {
                match self.disk_remove(&disk, timeout_s, call.reply) {
                    Ok(()) => return,
                    Err((e, reply)) => {
                        let _ = reply.send(Reply::failed(format!("disk-remove {disk}: {e}")));
                        return;
                    }
                }
            }
            Command::Shutdown { timeout_s } => {
                // A paused guest cannot see the button.
                self.control.resume();
                if let Err(e) = self.power_button.write(1) {
                    Reply::failed(format!("press the power button: {e}"))
                } else {
                    let timeout = Duration::from_secs(timeout_s.min(24 * 3600));
                    self.shutdown = Some(((Instant::now() + timeout, timeout_s), call.reply));
                    return;
                }
            }
        };
        let _ = call.reply.send(reply);
    }
}
