//! Saving: vCPU and in-kernel device state from KVM, and guest memory as a sparse file.
//!
//! Order on each (paused, exit-completed) vCPU, as Firecracker and cloud-hypervisor do it:
//! MP state first (reading it makes KVM accept pending INIT/SIPI events), then the registers,
//! XSAVE, XCRs, debug registers, LAPIC, MSRs, and the vCPU events last, so nothing read
//! earlier adds an event after they were taken.

use std::fs::File;
use std::os::unix::fs::FileExt;
use std::path::Path;

use kvm_bindings::{
    kvm_irqchip, kvm_msr_entry, Msrs, KVM_IRQCHIP_IOAPIC, KVM_IRQCHIP_PIC_MASTER,
    KVM_IRQCHIP_PIC_SLAVE, KVM_MAX_CPUID_ENTRIES,
};
use kvm_ioctls::{VcpuFd, VmFd};
use vm_memory::{GuestMemoryBackend, GuestMemoryMmap, GuestMemoryRegion, MemoryRegionAddress};

use crate::pages::{self, PAGE};

use super::{CpuidEntry, Msr, StateError, VcpuState, VmKvmState};

/// Largest MSR batch of one KVM_GET_MSRS.
const MSR_CHUNK: usize = 64;
fn kvm(what: &'static str) -> impl Fn(kvm_ioctls::Error) -> StateError {
    move |e| StateError::Mismatch(format!("KVM {what}: {e}"))
}

/// The state of a parked vCPU; `msr_index` is KVM's MSR index list.
pub fn vcpu(fd: &VcpuFd, msr_index: &[u32]) -> Result<VcpuState, StateError> {
    let mp_state = fd.get_mp_state().map_err(kvm("KVM_GET_MP_STATE"))?;
    let regs = fd.get_regs().map_err(kvm("KVM_GET_REGS"))?;
    let sregs = fd.get_sregs().map_err(kvm("KVM_GET_SREGS"))?;
    let xsave = fd.get_xsave().map_err(kvm("KVM_GET_XSAVE"))?;
    let xcrs = fd.get_xcrs().map_err(kvm("KVM_GET_XCRS"))?;
    let debugregs = fd.get_debug_regs().map_err(kvm("KVM_GET_DEBUGREGS"))?;
    let lapic = fd.get_lapic().map_err(kvm("KVM_GET_LAPIC"))?;
    let msrs = msrs(fd, msr_index)?;
    let tsc_khz = fd.get_tsc_khz().map_err(kvm("KVM_GET_TSC_KHZ"))?;
    let cpuid = fd
        .get_cpuid2(KVM_MAX_CPUID_ENTRIES)
        .map_err(kvm("KVM_GET_CPUID2"))?
        .as_slice()
        .iter()
        .map(|e| CpuidEntry {
            function: e.function,
            index: e.index,
            flags: e.flags,
            eax: e.eax,
            ebx: e.ebx,
            ecx: e.ecx,
            edx: e.edx,
        })
        .collect();
    let events = fd.get_vcpu_events().map_err(kvm("KVM_GET_VCPU_EVENTS"))?;
    Ok(VcpuState {
        cpuid,
        mp_state,
        regs,
        sregs,
        xsave,
        xcrs,
        debugregs,
        lapic,
        msrs,
        events,
        tsc_khz,
    })
}

/// Every MSR of `index` the vCPU lets us read. KVM stops a batch at the first MSR it cannot
/// read (returning how many it did): that one is skipped and the rest read again.
fn msrs(fd: &VcpuFd, index: &[u32]) -> Result<Vec<Msr>, StateError> {
    let mut out = Vec::with_capacity(index.len());
    let mut rest = index;
    while !rest.is_empty() {
        let batch = &rest[..rest.len().min(MSR_CHUNK)];
        let entries: Vec<kvm_msr_entry> = batch
            .iter()
            .map(|&i| kvm_msr_entry {
                index: i,
                ..Default::default()
            })
            .collect();
        let mut msrs = Msrs::from_entries(&entries)
            .map_err(|e| StateError::Mismatch(format!("MSR list: {e:?}")))?;
        let n = fd.get_msrs(&mut msrs).map_err(kvm("KVM_GET_MSRS"))?;
        out.extend(msrs.as_slice()[..n].iter().map(|e| Msr {
            index: e.index,
            data: e.data,
        }));
        // Skip the MSR that stopped the batch (if any).
        let used = if n < batch.len() { n + 1 } else { n };
        rest = &rest[used..];
    }
    Ok(out)
}

/// The irqchip (PIC master, slave, IOAPIC), PIT and kvmclock.
pub fn vm(vm: &VmFd) -> Result<VmKvmState, StateError> {
    let mut irqchips = Vec::new();
    for chip in [
        KVM_IRQCHIP_PIC_MASTER,
        KVM_IRQCHIP_PIC_SLAVE,
        KVM_IRQCHIP_IOAPIC,
    ] {
        let mut c = kvm_irqchip {
            chip_id: chip,
            ..Default::default()
        };
        vm.get_irqchip(&mut c).map_err(kvm("KVM_GET_IRQCHIP"))?;
        irqchips.push(c);
    }
    let pit = vm.get_pit2().map_err(kvm("KVM_GET_PIT2"))?;
    let clock = vm.get_clock().map_err(kvm("KVM_GET_CLOCK"))?;
    Ok(VmKvmState {
        irqchips,
        pit,
        clock,
    })
}

/// Writes guest memory to `path` (regions back to back), skipping zero pages so they stay
/// holes, and syncs it. Returns the file length and the CRC-32C of the whole content. Pages
/// never populated (see the `pages` module) are not even read: the cost follows the memory the
/// guest touched, not its size.
pub fn memory(mem: &GuestMemoryMmap, path: &Path) -> Result<(u64, u32), StateError> {
    let io = |what| {
        move |source| StateError::Io {
            path: path.to_path_buf(),
            what,
            source,
        }
    };
    let f = File::create(path).map_err(io("create"))?;
    let mut crc = 0u32;
    let mut off = 0u64;
    let populated = pages::populated(mem);
    for (region, bits) in mem.iter().zip(&populated) {
        let len = region.len() as usize;
        let host = region
            .get_host_address(MemoryRegionAddress(0))
            .map_err(|e| StateError::Mismatch(format!("guest memory: {e}")))?;
        // SAFETY: `host` is the start of the region's mapping of `len` bytes, alive as long as
        // `mem`; the vCPUs are paused and the disk workers stopped, so nothing writes it
        // while this reads it.
        let bytes = unsafe { std::slice::from_raw_parts(host as *const u8, len) };
        let mut done = 0usize;
        for (start, end) in pages::runs(bits, len / PAGE) {
            let (start, end) = (start * PAGE, end * PAGE);
            crc = pages::crc_append_zeros(crc, (start - done) as u64);
            crc = crc32c::crc32c_append(crc, &bytes[start..end]);
            write_data(&f, &bytes[start..end], off + start as u64).map_err(io("write"))?;
            done = end;
        }
        crc = pages::crc_append_zeros(crc, (len - done) as u64);
        off += len as u64;
    }
    f.set_len(off).map_err(io("set the length"))?;
    f.sync_all().map_err(io("sync"))?;
    Ok((off, crc))
}

/// Writes the non-zero pages of `run` at `at` in `f`, one write per run of them.
fn write_data(f: &File, run: &[u8], at: u64) -> std::io::Result<()> {
    let zero = [0u8; PAGE];
    let is_zero = |p: usize| run[p * PAGE..(p + 1) * PAGE] == zero;
    let n = run.len() / PAGE;
    let mut p = 0;
    while p < n {
        if is_zero(p) {
            p += 1;
            continue;
        }
        let start = p;
        while p < n && !is_zero(p) {
            p += 1;
        }
        f.write_all_at(&run[start * PAGE..p * PAGE], at + (start * PAGE) as u64)?;
    }
    Ok(())
}
