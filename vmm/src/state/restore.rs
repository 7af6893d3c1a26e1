//! Restoring: guest memory from the sparse file, the in-kernel devices and clock, and each
//! vCPU.
//!
//! VM order (as Firecracker): PIT, kvmclock (a checkpoint's continues from the saved value, so
//! guest uptime goes on from the checkpoint; a migrated guest's is advanced by the host time
//! since the save), PIC master, PIC slave, IOAPIC.
//! vCPU order: CPUID, MP state, registers, system registers (they hold the APIC base, which
//! the LAPIC needs), XSAVE, XCRs, debug registers, LAPIC (before the MSRs: writing
//! TSC_DEADLINE needs the LAPIC in TSC-deadline mode), MSRs, vCPU events last; then
//! KVM_KVMCLOCK_CTRL tells the guest's watchdogs that the vCPU was stopped on purpose.

use std::fs::File;
use std::os::fd::AsRawFd;
use std::os::unix::fs::FileExt;
use std::path::Path;

use kvm_bindings::{kvm_cpuid_entry2, kvm_msr_entry, CpuId, Msrs, KVM_CLOCK_REALTIME};
use kvm_ioctls::{VcpuFd, VmFd};
use vm_memory::{GuestMemoryBackend, GuestMemoryMmap, GuestMemoryRegion, MemoryRegionAddress};

use super::{StateError, VcpuState, VmKvmState};

/// MSR_IA32_TSC_DEADLINE.
const MSR_TSC_DEADLINE: u32 = 0x6e0;
/// MSR_IA32_TSC.
const MSR_TSC: u32 = 0x10;

fn kvm(what: &'static str) -> impl Fn(kvm_ioctls::Error) -> StateError {
    move |e| StateError::Mismatch(format!("KVM {what}: {e}"))
}

/// CPUID leaves and registers whose feature bits the saved guest may rely on.
const FEATURE_LEAVES: &[(u32, u32, &str)] =
    &[(1, 0, "1"), (7, 0, "7.0"), (0x8000_0001, 0, "0x80000001")];

/// Refuses a state whose CPUID has a feature bit that a vCPU of this host (`fresh`, set up
/// as the VMM sets up every vCPU) does not offer: the guest would fault on an instruction it
/// has been using.
pub fn check_cpuid(fresh: &VcpuFd, saved: &VcpuState) -> Result<(), StateError> {
    let host = fresh
        .get_cpuid2(kvm_bindings::KVM_MAX_CPUID_ENTRIES)
        .map_err(kvm("KVM_GET_CPUID2"))?;
    for &(function, index, name) in FEATURE_LEAVES {
        let Some(s) = saved
            .cpuid
            .iter()
            .find(|e| e.function == function && e.index == index)
        else {
            continue;
        };
        let h = host
            .as_slice()
            .iter()
            .find(|e| e.function == function && e.index == index)
            .copied()
            .unwrap_or_default();
        for (reg, want, have) in [("ecx", s.ecx, h.ecx), ("edx", s.edx, h.edx)] {
            // OSXSAVE follows the guest's CR4; KVM sets it, not the host.
            let managed = if function == 1 && reg == "ecx" {
                1 << 27
            } else {
                0
            };
            let missing = want & !have & !managed;
            if missing != 0 {
                let bit = missing.trailing_zeros();
                return Err(StateError::Mismatch(format!(
                    "this host lacks CPU feature CPUID.{name}:{reg} bit {bit} that the \
                     checkpointed guest uses (saved {want:#010x}, host offers {have:#010x})"
                )));
            }
        }
    }
    Ok(())
}

/// Sets the saved state on a fresh vCPU.
pub fn vcpu(fd: &VcpuFd, s: &VcpuState) -> Result<(), StateError> {
    let entries: Vec<kvm_cpuid_entry2> = s
        .cpuid
        .iter()
        .map(|e| kvm_cpuid_entry2 {
            function: e.function,
            index: e.index,
            flags: e.flags,
            eax: e.eax,
            ebx: e.ebx,
            ecx: e.ecx,
            edx: e.edx,
            ..Default::default()
        })
        .collect();
    let cpuid = CpuId::from_entries(&entries)
        .map_err(|e| StateError::Mismatch(format!("saved CPUID: {e:?}")))?;
    fd.set_cpuid2(&cpuid).map_err(kvm("KVM_SET_CPUID2"))?;
    match fd.get_tsc_khz() {
        Ok(khz) if khz != s.tsc_khz && s.tsc_khz != 0 => {
            if let Err(e) = fd.set_tsc_khz(s.tsc_khz) {
                // Within 250 ppm (the tolerance QEMU and Firecracker use) the guest will not
                // notice; beyond, its clock would run at the wrong speed.
                let ppm = (i64::from(khz) - i64::from(s.tsc_khz)).abs() * 1_000_000
                    / i64::from(s.tsc_khz);
                if ppm > 250 {
                    return Err(StateError::Mismatch(format!(
                        "the guest's TSC ran at {} kHz, this host's at {khz} kHz and KVM cannot \
                         scale it: {e}",
                        s.tsc_khz
                    )));
                }
            }
        }
        _ => {}
    }
    fd.set_mp_state(s.mp_state)
        .map_err(kvm("KVM_SET_MP_STATE"))?;
    fd.set_regs(&s.regs).map_err(kvm("KVM_SET_REGS"))?;
    fd.set_sregs(&s.sregs).map_err(kvm("KVM_SET_SREGS"))?;
    // SAFETY: the XSAVE area was read from KVM by KVM_GET_XSAVE on a vCPU with the same CPUID
    // (set above), so its layout is what KVM expects; KVM validates it and refuses bad ones.
    unsafe { fd.set_xsave(&s.xsave) }.map_err(kvm("KVM_SET_XSAVE"))?;
    // No XCRs were saved where the host CPU has no XSAVE (KVM then refuses the set).
    if s.xcrs.nr_xcrs > 0 {
        fd.set_xcrs(&s.xcrs).map_err(kvm("KVM_SET_XCRS"))?;
    }
    fd.set_debug_regs(&s.debugregs)
        .map_err(kvm("KVM_SET_DEBUGREGS"))?;
    fd.set_lapic(&s.lapic).map_err(kvm("KVM_SET_LAPIC"))?;
    let tsc = s.msrs.iter().find(|m| m.index == MSR_TSC).map(|m| m.data);
    let entries: Vec<kvm_msr_entry> = s
        .msrs
        .iter()
        .map(|m| kvm_msr_entry {
            index: m.index,
            // A deadline of 0 (disarmed, or fired just before the save) becomes the saved
            // TSC, so the timer fires once at resume: an extra timer interrupt the guest
            // tolerates, where a lost one could leave it waiting (Firecracker does the same).
            data: if m.index == MSR_TSC_DEADLINE && m.data == 0 {
                tsc.unwrap_or(0)
            } else {
                m.data
            },
            ..Default::default()
        })
        .collect();
    for chunk in entries.chunks(64) {
        let msrs = Msrs::from_entries(chunk)
            .map_err(|e| StateError::Mismatch(format!("saved MSRs: {e:?}")))?;
        let n = fd.set_msrs(&msrs).map_err(kvm("KVM_SET_MSRS"))?;
        if n != chunk.len() {
            return Err(StateError::Mismatch(format!(
                "KVM_SET_MSRS: this host refused MSR {:#x}",
                chunk[n].index
            )));
        }
    }
    fd.set_vcpu_events(&s.events)
        .map_err(kvm("KVM_SET_VCPU_EVENTS"))?;
    if let Err(e) = fd.kvmclock_ctrl() {
        // EINVAL: the guest has not enabled kvmclock on this vCPU; nothing to tell it.
        tracing::debug!("KVM_KVMCLOCK_CTRL: {e}");
    }
    Ok(())
}

/// Sets the in-kernel devices and the clock. With `advance`, kvmclock goes on by the host
/// wall-clock time since it was saved (KVM_CLOCK_REALTIME, Linux 5.16+: a migrated guest sees
/// the downtime, as it would have passed on a host that kept it running); returns by how much.
/// Without, or where KVM or the saved state lacks the realtime stamp, it continues from the
/// saved value (a restored checkpoint's uptime goes on from the checkpoint).
pub fn vm(
    vm: &VmFd,
    s: &VmKvmState,
    advance: bool,
) -> Result<Option<std::time::Duration>, StateError> {
    vm.set_pit2(&s.pit).map_err(kvm("KVM_SET_PIT2"))?;
    let mut clock = s.clock;
    clock.flags = 0;
    let mut advanced = None;
    if advance && s.clock.flags & KVM_CLOCK_REALTIME != 0 {
        let mut stamped = clock;
        stamped.flags = KVM_CLOCK_REALTIME;
        let now = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_nanos() as u64)
            .unwrap_or(0);
        match vm.set_clock(&stamped) {
            Ok(()) => {
                advanced = Some(std::time::Duration::from_nanos(
                    now.saturating_sub(s.clock.realtime),
                ))
            }
            // EINVAL: this KVM does not take the stamp; continue from the saved value.
            Err(e) => tracing::debug!("KVM_SET_CLOCK with KVM_CLOCK_REALTIME: {e}"),
        }
    }
    if advanced.is_none() {
        vm.set_clock(&clock).map_err(kvm("KVM_SET_CLOCK"))?;
    }
    for chip in &s.irqchips {
        vm.set_irqchip(chip).map_err(kvm("KVM_SET_IRQCHIP"))?;
    }
    Ok(advanced)
}

/// Loads the memory file into guest memory, reading only its data extents (holes stay the
/// fresh mapping's zeros), and checks its length and CRC-32C.
pub fn memory(
    mem: &GuestMemoryMmap,
    path: &Path,
    want_len: u64,
    want_crc: u32,
) -> Result<(), StateError> {
    let io = |what| {
        move |source| StateError::Io {
            path: path.to_path_buf(),
            what,
            source,
        }
    };
    let f = File::open(path).map_err(io("open"))?;
    let len = f.metadata().map_err(io("stat"))?.len();
    if len != want_len {
        return Err(StateError::Corrupt {
            path: path.to_path_buf(),
            structure: "guest memory",
            offset: len.min(want_len),
            detail: format!("{len} bytes, the manifest says {want_len}"),
        });
    }
    let mut crc = 0u32;
    let mut off = 0u64;
    for region in mem.iter() {
        let rlen = region.len() as usize;
        let host = region
            .get_host_address(MemoryRegionAddress(0))
            .map_err(|e| StateError::Mismatch(format!("guest memory: {e}")))?;
        // SAFETY: the region's mapping of `rlen` bytes, alive as long as `mem`; no vCPU or
        // device runs yet, so this is its only user.
        let bytes = unsafe { std::slice::from_raw_parts_mut(host, rlen) };
        // Holes stay the fresh mapping's zeros, never touched: the CRC runs over them in
        // O(log n), so restoring costs what the guest had touched, not its memory size.
        let mut pos = 0usize;
        while pos < rlen {
            let data = seek(&f, libc::SEEK_DATA, off + pos as u64).unwrap_or(off + rlen as u64);
            let data = (data.min(off + rlen as u64) - off) as usize;
            if data >= rlen {
                break;
            }
            let hole = seek(&f, libc::SEEK_HOLE, (off as usize + data) as u64)
                .unwrap_or(off + rlen as u64);
            let hole = (hole.min(off + rlen as u64) - off) as usize;
            f.read_exact_at(&mut bytes[data..hole], off + data as u64)
                .map_err(io("read"))?;
            crc = crate::pages::crc_append_zeros(crc, (data - pos) as u64);
            crc = crc32c::crc32c_append(crc, &bytes[data..hole]);
            pos = hole;
        }
        crc = crate::pages::crc_append_zeros(crc, (rlen - pos) as u64);
        off += rlen as u64;
    }
    if crc != want_crc {
        return Err(StateError::Corrupt {
            path: path.to_path_buf(),
            structure: "guest memory",
            offset: 0,
            detail: format!(
                "checksum mismatch (CRC-32C {crc:#010x}, the manifest says {want_crc:#010x})"
            ),
        });
    }
    Ok(())
}

/// lseek with SEEK_DATA / SEEK_HOLE; `None` past the end (ENXIO).
fn seek(f: &File, whence: libc::c_int, from: u64) -> Option<u64> {
    // SAFETY: lseek on an open descriptor owned by `f`; no memory is passed.
    let r = unsafe { libc::lseek(f.as_raw_fd(), from as libc::off_t, whence) };
    (r >= 0).then_some(r as u64)
}
