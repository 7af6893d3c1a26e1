//! The vCPU thread: a KVM_RUN loop that sends port and MMIO exits through the [`Bus`], parks
//! when the VM is paused ([`RunControl`]), and reports how the guest ended.
//!
//! Invariant: a parked vCPU has completed its last port/MMIO exit (one KVM_RUN with
//! `immediate_exit` set after the exit was handled), so its registers are consistent and can
//! be saved.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::mpsc::Sender;
use std::sync::{Arc, Mutex};

use kvm_bindings::{
    KVM_INTERNAL_ERROR_EMULATION, KVM_INTERNAL_ERROR_EMULATION_FLAG_INSTRUCTION_BYTES,
    KVM_SYSTEM_EVENT_CRASH, KVM_SYSTEM_EVENT_RESET, KVM_SYSTEM_EVENT_SHUTDOWN,
};
use kvm_ioctls::{VcpuExit, VcpuFd};
use vm_memory::{Bytes, GuestAddress, GuestMemoryMmap};

use crate::control::RunControl;
use crate::devices::bus::{Bus, BusEvent};
use crate::devices::serial::ConsoleState;
use crate::{Error, GuestExit, Result};

/// How the VM ended, as sent by the threads to the main thread.
pub type VmEvent = Result<GuestExit>;

/// What a vCPU thread needs.
pub struct VcpuCtx {
    /// vCPU index.
    pub id: u8,
    /// The devices.
    pub bus: Arc<Bus>,
    /// Set when the VM stops.
    pub stop: Arc<AtomicBool>,
    /// Pause and per-vCPU jobs.
    pub control: Arc<RunControl>,
    /// Panic and reboot messages seen on the console.
    pub console: Arc<Mutex<ConsoleState>>,
    /// Keeps guest memory mapped while this vCPU may run; reads instruction bytes.
    pub mem: GuestMemoryMmap,
    /// Where the outcome goes.
    pub tx: Sender<VmEvent>,
}

/// Exit counts by kind and port/address, printed to stderr when the vCPU ends if
/// `VHDKIT_VMM_EXIT_STATS=1` (to see where a slow boot spends its exits).
struct ExitStats {
    counts: Option<std::collections::HashMap<(&'static str, u64), u64>>,
    start: std::time::Instant,
}

impl ExitStats {
    fn from_env() -> ExitStats {
        let on = std::env::var_os("VHDKIT_VMM_EXIT_STATS").is_some_and(|v| v == "1");
        ExitStats {
            counts: on.then(std::collections::HashMap::new),
            start: std::time::Instant::now(),
        }
    }

    fn count(&mut self, kind: &'static str, addr: u64) {
        if let Some(c) = &mut self.counts {
            *c.entry((kind, addr)).or_default() += 1;
        }
    }

    fn report(&mut self, cpu: u8) {
        let Some(c) = self.counts.take() else {
            return;
        };
        let total: u64 = c.values().sum();
        let mut v: Vec<_> = c.into_iter().collect();
        v.sort_by_key(|e| std::cmp::Reverse(e.1));
        let top: Vec<String> = v
            .iter()
            .take(12)
            .map(|((k, a), n)| format!("{k} {a:#x}: {n}"))
            .collect();
        eprintln!(
            "vmm: vCPU {cpu}: {total} port/MMIO exits in {:.1} s; {}",
            self.start.elapsed().as_secs_f64(),
            top.join(", ")
        );
    }
}

/// The outcome of one KVM_RUN, with the borrow of the vCPU's run structure ended.
enum Step {
    Continue,
    Event(BusEvent),
    Shutdown,
    SystemEvent(u32),
    InternalError,
    FailEntry(u64),
    Unexpected(String),
    RunError(kvm_ioctls::Error),
}

impl VcpuCtx {
    /// Runs the vCPU until the VM stops or the guest ends it.
    pub fn run(self, mut vcpu: VcpuFd) {
        let mut stats = ExitStats::from_env();
        loop {
            self.control.park_if_paused(usize::from(self.id), &mut vcpu);
            if self.stop.load(Ordering::SeqCst) {
                stats.report(self.id);
                return;
            }
            let step = match vcpu.run() {
                Ok(exit) => match exit {
                    VcpuExit::IoIn(port, data) => {
                        stats.count("pio in", u64::from(port));
                        self.bus.pio_in(port, data);
                        Step::Continue
                    }
                    VcpuExit::IoOut(port, data) => {
                        stats.count("pio out", u64::from(port));
                        Step::Event(self.bus.pio_out(port, data))
                    }
                    VcpuExit::MmioRead(addr, data) => {
                        stats.count("mmio read", addr);
                        self.bus.mmio_read(addr, data);
                        Step::Continue
                    }
                    VcpuExit::MmioWrite(addr, data) => {
                        stats.count("mmio write", addr);
                        Step::Event(self.bus.mmio_write(addr, data))
                    }
                    VcpuExit::Hlt | VcpuExit::Intr | VcpuExit::IrqWindowOpen => Step::Continue,
                    VcpuExit::Shutdown => Step::Shutdown,
                    VcpuExit::SystemEvent(kind, _) => Step::SystemEvent(kind),
                    VcpuExit::InternalError => Step::InternalError,
                    VcpuExit::FailEntry(reason, _) => Step::FailEntry(reason),
                    other => Step::Unexpected(format!("{other:?}")),
                },
                Err(e) if e.errno() == libc::EINTR || e.errno() == libc::EAGAIN => Step::Continue,
                Err(e) => Step::RunError(e),
            };
            let outcome = match step {
                Step::Continue | Step::Event(BusEvent::None) => continue,
                Step::Event(BusEvent::Kick(i)) => {
                    self.bus.kick(i);
                    continue;
                }
                Step::Event(BusEvent::Reset) => self.on_reset(),
                Step::Event(BusEvent::PowerOff) => Ok(GuestExit::PowerOff),
                Step::Shutdown => self.on_triple_fault(&vcpu),
                Step::SystemEvent(KVM_SYSTEM_EVENT_RESET) => self.on_reset(),
                Step::SystemEvent(KVM_SYSTEM_EVENT_SHUTDOWN) => Ok(GuestExit::PowerOff),
                Step::SystemEvent(KVM_SYSTEM_EVENT_CRASH) => {
                    self.fail(&vcpu, "the guest reported a crash (KVM_SYSTEM_EVENT_CRASH)")
                }
                Step::SystemEvent(kind) => {
                    self.fail(&vcpu, &format!("KVM_EXIT_SYSTEM_EVENT type {kind}"))
                }
                Step::InternalError => {
                    let what = internal_error(&mut vcpu);
                    self.fail(&vcpu, &what)
                }
                Step::FailEntry(reason) => self.fail(
                    &vcpu,
                    &format!(
                        "KVM_EXIT_FAIL_ENTRY: the VM entry failed (hardware reason {reason:#x})"
                    ),
                ),
                Step::Unexpected(what) => self.fail(&vcpu, &format!("unexpected exit {what}")),
                Step::RunError(e) => Err(Error::GuestFailure {
                    cpu: self.id,
                    reason: format!("KVM_RUN failed: {e}"),
                }),
            };
            stats.report(self.id);
            let _ = self.tx.send(outcome);
            return;
        }
    }

    fn on_reset(&self) -> VmEvent {
        let st = self.console.lock().unwrap_or_else(|e| e.into_inner());
        match &st.panic {
            Some(p) => Err(Error::GuestPanic(p.clone())),
            None => Ok(GuestExit::Reboot),
        }
    }

    fn on_triple_fault(&self, vcpu: &VcpuFd) -> VmEvent {
        let (panic, restarting) = {
            let st = self.console.lock().unwrap_or_else(|e| e.into_inner());
            (st.panic.clone(), st.restarting)
        };
        match panic {
            Some(p) => Err(Error::GuestPanic(p)),
            None if restarting => Ok(GuestExit::Reboot),
            None => self.fail(
                vcpu,
                "triple fault (KVM_EXIT_SHUTDOWN) without a reboot request from the guest",
            ),
        }
    }

    fn fail(&self, vcpu: &VcpuFd, what: &str) -> VmEvent {
        Err(Error::GuestFailure {
            cpu: self.id,
            reason: format!("{what}; {}", cpu_state(vcpu, &self.mem)),
        })
    }
}

/// `KVM_EXIT_INTERNAL_ERROR` with its suberror, data words and, for emulation failures, the
/// instruction bytes KVM reports.
fn internal_error(vcpu: &mut VcpuFd) -> String {
    let run = vcpu.get_kvm_run();
    // SAFETY: after KVM_EXIT_INTERNAL_ERROR the kernel filled the `internal` member of the
    // union (and, for suberror 1 with the flag set, the `emulation_failure` view of the same
    // bytes); both are plain integers, valid for any bit pattern.
    let (internal, emulation) = unsafe {
        (
            run.__bindgen_anon_1.internal,
            run.__bindgen_anon_1.emulation_failure,
        )
    };
    let name = match internal.suberror {
        1 => "emulation failure",
        2 => "exception while delivering an exception",
        3 => "failure while delivering an event",
        4 => "unexpected exit reason",
        _ => "unknown",
    };
    let n = (internal.ndata as usize).min(internal.data.len());
    let data: Vec<String> = internal.data[..n]
        .iter()
        .map(|d| format!("{d:#x}"))
        .collect();
    let mut s = format!(
        "KVM_EXIT_INTERNAL_ERROR suberror {} ({name}), data [{}]",
        internal.suberror,
        data.join(", ")
    );
    if internal.suberror == KVM_INTERNAL_ERROR_EMULATION
        && emulation.flags & u64::from(KVM_INTERNAL_ERROR_EMULATION_FLAG_INSTRUCTION_BYTES) != 0
    {
        // SAFETY: the flag says the kernel filled the instruction bytes (plain integers).
        let insn = unsafe { emulation.__bindgen_anon_1.__bindgen_anon_1 };
        let len = usize::from(insn.insn_size).min(insn.insn_bytes.len());
        s.push_str(&format!(
            ", instruction bytes from KVM: {}",
            hex(&insn.insn_bytes[..len])
        ));
    }
    s
}

fn hex(b: &[u8]) -> String {
    b.iter()
        .map(|x| format!("{x:02x}"))
        .collect::<Vec<_>>()
        .join(" ")
}

/// RIP, the mode registers and the 16 bytes at RIP (translated through the guest's page
/// tables) for an error message.
fn cpu_state(vcpu: &VcpuFd, mem: &GuestMemoryMmap) -> String {
    let Ok(regs) = vcpu.get_regs() else {
        return "registers unavailable".into();
    };
    let mut s = format!(
        "RIP={:#x} RSP={:#x} RFLAGS={:#x}",
        regs.rip, regs.rsp, regs.rflags
    );
    if let Ok(sregs) = vcpu.get_sregs() {
        s.push_str(&format!(
            " CR0={:#x} CR3={:#x} CR4={:#x} EFER={:#x} CS={:#x}",
            sregs.cr0, sregs.cr3, sregs.cr4, sregs.efer, sregs.cs.selector
        ));
        let rip = regs
            .rip
            .wrapping_add(if sregs.cr0 & 1 == 0 { sregs.cs.base } else { 0 });
        match vcpu.translate_gva(rip) {
            Ok(t) if t.valid != 0 => {
                let mut b = [0u8; 16];
                match mem.read_slice(&mut b, GuestAddress(t.physical_address)) {
                    Ok(()) => s.push_str(&format!(
                        ", bytes at RIP (GPA {:#x}): {}",
                        t.physical_address,
                        hex(&b)
                    )),
                    Err(_) => s.push_str(&format!(
                        ", RIP maps to GPA {:#x} outside RAM",
                        t.physical_address
                    )),
                }
            }
            _ => s.push_str(", RIP is not mapped"),
        }
        if is_init_state(regs.rip, sregs.cs.selector) {
            s.push_str(INIT_STATE_NOTE);
        }
    }
    s
}

/// Said when the registers are the INIT values: KVM on AMD (SVM) re-initializes a vCPU on a
/// shutdown intercept before reporting KVM_EXIT_SHUTDOWN, because the VMCB is undefined then.
const INIT_STATE_NOTE: &str = " (the INIT values: KVM on AMD resets a vCPU that triple faults \
     before reporting it, so these registers do not show where the fault happened)";

/// Whether RIP and CS hold their INIT/reset values (CS:IP = f000:fff0).
fn is_init_state(rip: u64, cs: u16) -> bool {
    rip == 0xfff0 && cs == 0xf000
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hex_formats_instruction_bytes() {
        assert_eq!(hex(&[0x0f, 0xc7, 0x0e]), "0f c7 0e");
    }

    #[test]
    fn the_reset_vector_state_is_recognised() {
        assert!(is_init_state(0xfff0, 0xf000));
        assert!(!is_init_state(0x1000200, 0x10));
        assert!(!is_init_state(0xfff0, 0x10));
    }
}
