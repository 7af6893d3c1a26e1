//! vCPU setup: CPUID, boot MSRs, registers for the 64-bit entry, FPU, LAPIC LINT pins.
//!
//! Every vCPU gets the same setup; KVM keeps the application processors waiting for INIT/SIPI
//! (their registers are reset then) and starts only vCPU 0 at the kernel entry.

use kvm_bindings::{kvm_cpuid_entry2, kvm_fpu, kvm_regs, CpuId, Msrs, KVM_MAX_CPUID_ENTRIES};
use kvm_ioctls::{Kvm, VcpuFd};

use crate::boot;
use crate::layout::{BOOT_STACK, ZERO_PAGE};
use crate::{Error, Result};

/// CPUID leaf 1 ECX: TSC-deadline timer.
const ECX_TSC_DEADLINE: u32 = 1 << 24;
/// CPUID leaf 1 ECX: running under a hypervisor (enables kvm-clock and PV features).
const ECX_HYPERVISOR: u32 = 1 << 31;
/// CPUID leaf 1 EDX: more than one logical processor.
const EDX_HTT: u32 = 1 << 28;
/// CPUID leaf 7 EDX: IA32_ARCH_CAPABILITIES (an Intel MSR; hide it on AMD).
const EDX_ARCH_CAPABILITIES: u32 = 1 << 29;

/// Whether the vendor string of leaf 0 is AuthenticAMD (or HygonGenuine).
fn is_amd(entries: &[kvm_cpuid_entry2]) -> bool {
    entries.iter().find(|e| e.function == 0).is_some_and(|e| {
        let v = [e.ebx, e.edx, e.ecx];
        v == [0x6874_7541, 0x6974_6e65, 0x444d_4163] // "AuthenticAMD"
                || v == [0x6f67_7948, 0x6e65_476e, 0x656e_6975] // "HygonGenuine"
    })
}

/// Patches KVM's supported CPUID for vCPU `id` of `count`: APIC ids and topology, the
/// hypervisor bit, TSC-deadline.
pub fn patch_cpuid(entries: &mut [kvm_cpuid_entry2], id: u8, count: u8) {
    let amd = is_amd(entries);
    let shift = u32::from(count).next_power_of_two().trailing_zeros();
    for e in entries.iter_mut() {
        match e.function {
            1 => {
                // EBX: initial APIC id, logical processors per package, CLFLUSH size (64 B).
                e.ebx = (u32::from(id) << 24) | (u32::from(count) << 16) | (8 << 8);
                e.ecx |= ECX_TSC_DEADLINE | ECX_HYPERVISOR;
                if count > 1 {
                    e.edx |= EDX_HTT;
                } else {
                    e.edx &= !EDX_HTT;
                }
            }
            7 if e.index == 0 && amd => e.edx &= !EDX_ARCH_CAPABILITIES,
            0xb | 0x1f => {
                // Extended topology: level 0 = SMT (1 thread per core), level 1 = cores.
                e.edx = u32::from(id);
                match e.index {
                    0 => {
                        e.eax = 0;
                        e.ebx = 1;
                        e.ecx = 1 << 8;
                    }
                    1 => {
                        e.eax = shift;
                        e.ebx = u32::from(count);
                        e.ecx = (2 << 8) | 1;
                    }
                    n => {
                        e.eax = 0;
                        e.ebx = 0;
                        e.ecx = n;
                    }
                }
            }
            4 if e.eax & 0x1f != 0 => {
                // Deterministic cache parameters (Intel): EAX[31:26] = addressable core ids in
                // the package - 1, EAX[25:14] = logical processors sharing the cache - 1 (one
                // per core for L1 and L2, the whole package for L3).
                let ids = (1u32 << shift) - 1;
                let level = (e.eax >> 5) & 7;
                let sharing = if level >= 3 { ids.min(0xfff) } else { 0 };
                e.eax = (e.eax & 0x3fff) | (sharing << 14) | (ids.min(63) << 26);
            }
            0x8000_0008 if amd => {
                // ECX: number of cores - 1, APIC id size.
                e.ecx = (e.ecx & !0xf0ff) | (shift << 12) | (u32::from(count) - 1);
            }
            0x8000_001e if amd => {
                // Extended APIC id; core id (one thread per core); node 0 of one.
                e.eax = u32::from(id);
                e.ebx = u32::from(id);
                e.ecx = 0;
                e.edx = 0;
            }
            _ => {}
        }
    }
}

/// The MSRs set at boot (index, value), as Firecracker does.
pub fn boot_msrs() -> Vec<(u32, u64)> {
    vec![
        (0x174, 0),             // IA32_SYSENTER_CS
        (0x175, 0),             // IA32_SYSENTER_ESP
        (0x176, 0),             // IA32_SYSENTER_EIP
        (0xc000_0081, 0),       // STAR
        (0xc000_0082, 0),       // LSTAR
        (0xc000_0083, 0),       // CSTAR
        (0xc000_0084, 0),       // SYSCALL_MASK
        (0xc000_0102, 0),       // KERNEL_GS_BASE
        (0x10, 0),              // IA32_TSC
        (0x1a0, 1),             // IA32_MISC_ENABLE: fast strings
        (0x2ff, (1 << 11) | 6), // MTRRdefType: enabled, write-back
    ]
}

/// Configures `vcpu` number `id` of `count` to start at `entry`.
pub fn configure(kvm: &Kvm, vcpu: &VcpuFd, id: u8, count: u8, entry: u64) -> Result<()> {
    let mut cpuid: CpuId = kvm
        .get_supported_cpuid(KVM_MAX_CPUID_ENTRIES)
        .map_err(|e| Error::kvm("KVM_GET_SUPPORTED_CPUID", e))?;
    patch_cpuid(cpuid.as_mut_slice(), id, count);
    vcpu.set_cpuid2(&cpuid)
        .map_err(|e| Error::kvm("KVM_SET_CPUID2", e))?;

    // One MSR at a time: an MSR this KVM does not know is skipped, not fatal.
    for (index, data) in boot_msrs() {
        let msrs = Msrs::from_entries(&[kvm_bindings::kvm_msr_entry {
            index,
            data,
            ..Default::default()
        }])
        .map_err(|e| Error::Setup(format!("MSR list: {e:?}")))?;
        match vcpu.set_msrs(&msrs) {
            Ok(1) => {}
            _ => tracing::debug!("MSR {index:#x} not set (unsupported by this KVM)"),
        }
    }

    let regs = kvm_regs {
        rflags: 0x2,
        rip: entry,
        rsp: BOOT_STACK,
        rbp: BOOT_STACK,
        rsi: ZERO_PAGE,
        ..Default::default()
    };
    vcpu.set_regs(&regs)
        .map_err(|e| Error::kvm("KVM_SET_REGS", e))?;
    let sregs = vcpu
        .get_sregs()
        .map_err(|e| Error::kvm("KVM_GET_SREGS", e))?;
    vcpu.set_sregs(&boot::long_mode_sregs(sregs))
        .map_err(|e| Error::kvm("KVM_SET_SREGS", e))?;
    let fpu = kvm_fpu {
        fcw: 0x37f,
        mxcsr: 0x1f80,
        ..Default::default()
    };
    vcpu.set_fpu(&fpu)
        .map_err(|e| Error::kvm("KVM_SET_FPU", e))?;

    // LINT0 = ExtINT, LINT1 = NMI (the reset values of a BSP wired to a PC-AT).
    let mut lapic = vcpu
        .get_lapic()
        .map_err(|e| Error::kvm("KVM_GET_LAPIC", e))?;
    set_lvt(&mut lapic.regs, 0x350, 7);
    set_lvt(&mut lapic.regs, 0x360, 4);
    vcpu.set_lapic(&lapic)
        .map_err(|e| Error::kvm("KVM_SET_LAPIC", e))?;
    Ok(())
}

/// Sets the delivery mode (bits 8-10) of the LVT register at `offset`.
fn set_lvt(regs: &mut [std::os::raw::c_char; 1024], offset: usize, mode: u32) {
    let mut b = [0u8; 4];
    for (i, x) in b.iter_mut().enumerate() {
        *x = regs[offset + i] as u8;
    }
    let v = (u32::from_le_bytes(b) & !0x700) | (mode << 8);
    for (i, x) in v.to_le_bytes().iter().enumerate() {
        regs[offset + i] = *x as std::os::raw::c_char;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn entry(function: u32, index: u32) -> kvm_cpuid_entry2 {
        kvm_cpuid_entry2 {
            function,
            index,
            ..Default::default()
        }
    }

    #[test]
    fn leaf1_names_the_apic_id_and_sets_hypervisor_and_deadline() {
        let mut e = vec![entry(0, 0), entry(1, 0), entry(0xb, 0), entry(0xb, 1)];
        patch_cpuid(&mut e, 1, 2);
        assert_eq!(e[1].ebx >> 24, 1);
        assert_eq!((e[1].ebx >> 16) & 0xff, 2);
        assert_ne!(e[1].ecx & ECX_HYPERVISOR, 0);
        assert_ne!(e[1].ecx & ECX_TSC_DEADLINE, 0);
        assert_ne!(e[1].edx & EDX_HTT, 0);
        assert_eq!((e[2].edx, e[2].ebx, e[2].ecx), (1, 1, 1 << 8));
        assert_eq!((e[3].edx, e[3].ebx, e[3].eax), (1, 2, 1));
    }

    /// KVM's leaves as an AMD or Intel host reports them, before patching.
    fn host_leaves(amd: bool) -> Vec<kvm_cpuid_entry2> {
        let mut v = vec![entry(0, 0), entry(1, 0)];
        if amd {
            (v[0].ebx, v[0].edx, v[0].ecx) = (0x6874_7541, 0x6974_6e65, 0x444d_4163);
        } else {
            (v[0].ebx, v[0].edx, v[0].ecx) = (0x756e_6547, 0x4965_6e69, 0x6c65_746e);
        }
        for i in 0..3 {
            v.push(entry(0xb, i));
        }
        // Leaf 4: L1d (type 1, level 1), L3 (type 3, level 3) and the end (type 0).
        let mut l1 = entry(4, 0);
        l1.eax = 1 | (1 << 5) | (7 << 26);
        let mut l3 = entry(4, 1);
        l3.eax = 3 | (3 << 5) | (15 << 14) | (7 << 26);
        v.extend([l1, l3, entry(4, 2)]);
        v.extend([entry(0x8000_0008, 0), entry(0x8000_001e, 0)]);
        v
    }

    fn leaf(e: &[kvm_cpuid_entry2], function: u32, index: u32) -> kvm_cpuid_entry2 {
        *e.iter()
            .find(|x| x.function == function && x.index == index)
            .unwrap()
    }

    #[test]
    fn every_vcpu_of_many_has_its_own_apic_id_in_leaves_1_and_0xb() {
        for count in [64u8, 128, 254] {
            for amd in [true, false] {
                let mut ids = std::collections::BTreeSet::new();
                for id in 0..count {
                    let mut e = host_leaves(amd);
                    patch_cpuid(&mut e, id, count);
                    let l1 = leaf(&e, 1, 0);
                    assert_eq!(l1.ebx >> 24, u32::from(id), "leaf 1 initial APIC id");
                    assert_eq!((l1.ebx >> 16) & 0xff, u32::from(count));
                    for sub in 0..3 {
                        assert_eq!(leaf(&e, 0xb, sub).edx, u32::from(id), "x2APIC id");
                    }
                    assert!(ids.insert(l1.ebx >> 24));
                    // Level 1 (core): the shift covers every APIC id, and level 2 ends the list.
                    let core = leaf(&e, 0xb, 1);
                    assert_eq!((core.ecx >> 8) & 0xff, 2, "core level");
                    assert!(1u32 << core.eax >= u32::from(count));
                    assert!(u32::from(id) >> core.eax == 0, "one package");
                    assert_eq!(core.ebx, u32::from(count));
                    assert_eq!((leaf(&e, 0xb, 2).ecx >> 8) & 0xff, 0, "invalid level");
                    if amd {
                        let ext = leaf(&e, 0x8000_001e, 0);
                        assert_eq!((ext.eax, ext.ebx & 0xff), (u32::from(id), u32::from(id)));
                        let size = leaf(&e, 0x8000_0008, 0).ecx;
                        assert_eq!(size & 0xff, u32::from(count) - 1, "cores - 1");
                        assert!(1u32 << ((size >> 12) & 0xf) >= u32::from(count));
                    }
                }
                assert_eq!(ids.len(), usize::from(count));
            }
        }
    }

    #[test]
    fn cache_leaf_4_names_cores_per_package_and_l3_sharing() {
        let mut e = host_leaves(false);
        patch_cpuid(&mut e, 5, 128);
        let (l1, l3, end) = (leaf(&e, 4, 0), leaf(&e, 4, 1), leaf(&e, 4, 2));
        assert_eq!(l1.eax >> 26, 63, "at most 64 core ids fit in 6 bits");
        assert_eq!((l1.eax >> 14) & 0xfff, 0, "L1 is per core");
        assert_eq!((l3.eax >> 14) & 0xfff, 127, "L3 shared by the package");
        assert_eq!(l3.eax & 0x3fff, 3 | (3 << 5), "type and level kept");
        assert_eq!(end.eax, 0, "the end marker stays");
        let mut e = host_leaves(false);
        patch_cpuid(&mut e, 0, 4);
        assert_eq!(leaf(&e, 4, 0).eax >> 26, 3);
    }

    #[test]
    fn amd_hides_arch_capabilities_intel_keeps_it() {
        let mut amd = vec![entry(0, 0), entry(7, 0)];
        amd[0].ebx = 0x6874_7541;
        amd[0].edx = 0x6974_6e65;
        amd[0].ecx = 0x444d_4163;
        amd[1].edx = EDX_ARCH_CAPABILITIES;
        let mut intel = amd.clone();
        intel[0].ebx = 0x756e_6547; // "GenuineIntel"
        patch_cpuid(&mut amd, 0, 1);
        patch_cpuid(&mut intel, 0, 1);
        assert_eq!(amd[1].edx & EDX_ARCH_CAPABILITIES, 0);
        assert_ne!(intel[1].edx & EDX_ARCH_CAPABILITIES, 0);
    }

    #[test]
    fn lvt_delivery_mode_is_replaced_in_place() {
        let mut regs = [0 as std::os::raw::c_char; 1024];
        regs[0x350] = 0x10u8 as std::os::raw::c_char;
        regs[0x351] = 0x07u8 as std::os::raw::c_char; // mode 7 + bit 10
        regs[0x352] = 0x01;
        set_lvt(&mut regs, 0x350, 4);
        assert_eq!(regs[0x350] as u8, 0x10);
        assert_eq!(regs[0x351] as u8, 0x04);
        assert_eq!(regs[0x352] as u8, 0x01);
    }

    #[test]
    fn boot_msrs_include_misc_enable_and_mtrr_default() {
        let m = boot_msrs();
        assert!(m.contains(&(0x1a0, 1)));
        assert!(m.contains(&(0x2ff, 0x806)));
    }
}
