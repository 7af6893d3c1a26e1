//! VM state for checkpoints: what is saved, and the checksummed container it travels in.
//!
//! ```text
//!  DIR/manifest.json   Manifest: versions, memory size, vCPUs, command line, the frozen disk
//!                      layers by path with their identities, names + sizes + CRC-32C of:
//!  DIR/vmstate.bin     "VHDKVMST" | version u32 | body length u64 | CRC-32C u32 | JSON body
//!                      (VmState: vCPUs, irqchip, PIT, clock, devices; PCI functions and
//!                      hotplug registers with --transport pci, see [`pci`])
//!  DIR/memory.img      guest RAM, regions back to back; zero pages are holes (sparse file)
//! ```
//!
//! Invariants: a container is checked (magic, version, length bound, checksum) before its body
//! is parsed; every error names the file and the offset of the bad field; nothing here writes
//! to a file it reads; a decoded state has passed [`pci::check`]. [`STATE_VERSION`] changes
//! with any change to the saved types.
//!
//! Versions: 1 is a virtio-mmio VM (what every vhdtool wrote before PCI state existed, and
//! what this one still writes for such a VM, so older readers keep reading it); 2 adds
//! [`VmState::pci`] and [`Manifest::transport`], and is written for pci-transport VMs only
//! (a version-1 reader refuses it instead of building the VM on the wrong transport).

pub mod pci;
pub mod restore;
pub mod save;

use std::path::{Path, PathBuf};

use kvm_bindings::{
    kvm_clock_data, kvm_debugregs, kvm_irqchip, kvm_lapic_state, kvm_mp_state, kvm_pit_state2,
    kvm_regs, kvm_sregs, kvm_vcpu_events, kvm_xcrs, kvm_xsave,
};
use serde::{Deserialize, Serialize};

/// Newest version of [`VmState`] and of the manifest; versions 1 to this are read.
pub const STATE_VERSION: u32 = 2;
/// The version written for a VM without PCI state.
pub const MMIO_STATE_VERSION: u32 = 1;
/// Magic of `vmstate.bin`.
pub const MAGIC: [u8; 8] = *b"VHDKVMST";
/// Header: magic, version, body length, CRC-32C.
pub const HEADER_LEN: usize = 24;
/// Largest state body accepted (the real one is tens of KiB per vCPU).
pub const MAX_BODY: u64 = 64 << 20;

/// One MSR.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct Msr {
    /// Index.
    pub index: u32,
    /// Value.
    pub data: u64,
}

/// One CPUID entry as the vCPU had it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct CpuidEntry {
    /// Leaf.
    pub function: u32,
    /// Sub-leaf.
    pub index: u32,
    /// KVM_CPUID_FLAG_*.
    pub flags: u32,
    /// Registers.
    pub eax: u32,
    /// Registers.
    pub ebx: u32,
    /// Registers.
    pub ecx: u32,
    /// Registers.
    pub edx: u32,
}

/// Everything KVM holds for one vCPU.
#[derive(Debug, Serialize, Deserialize)]
pub struct VcpuState {
    /// CPUID the vCPU runs with.
    pub cpuid: Vec<CpuidEntry>,
    /// Multiprocessing state (runnable, halted, waiting for INIT/SIPI).
    pub mp_state: kvm_mp_state,
    /// General registers.
    pub regs: kvm_regs,
    /// Segment, control and descriptor-table registers, EFER, APIC base.
    pub sregs: kvm_sregs,
    /// FPU/SSE/AVX state (the legacy 4 KiB XSAVE area).
    pub xsave: kvm_xsave,
    /// Extended control registers (XCR0).
    pub xcrs: kvm_xcrs,
    /// Debug registers.
    pub debugregs: kvm_debugregs,
    /// Local APIC registers.
    pub lapic: kvm_lapic_state,
    /// MSRs from KVM's index list that the vCPU could read.
    pub msrs: Vec<Msr>,
    /// Pending exceptions, interrupts, NMIs, SMIs.
    pub events: kvm_vcpu_events,
    /// Guest TSC frequency (kHz).
    pub tsc_khz: u32,
}

/// The in-kernel devices and the guest clock.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct VmKvmState {
    /// PIC master, PIC slave, IOAPIC.
    pub irqchips: Vec<kvm_irqchip>,
    /// The PIT.
    pub pit: kvm_pit_state2,
    /// kvmclock.
    pub clock: kvm_clock_data,
}

/// One virtqueue.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct QueueState {
    /// Size the driver chose.
    pub size: u16,
    /// Driver finished configuring it.
    pub ready: bool,
    /// Descriptor table address.
    pub desc_table: u64,
    /// Available ring address.
    pub avail_ring: u64,
    /// Used ring address.
    pub used_ring: u64,
    /// Next available index the device will read.
    pub next_avail: u16,
    /// Next used index the device will write.
    pub next_used: u16,
    /// VIRTIO_F_RING_EVENT_IDX in use.
    pub event_idx: bool,
}

/// A virtio-mmio transport and its block device.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct TransportState {
    /// Device status register.
    pub status: u32,
    /// DeviceFeaturesSel.
    pub device_features_sel: u32,
    /// DriverFeaturesSel.
    pub driver_features_sel: u32,
    /// Features the driver wrote.
    pub driver_features: u64,
    /// QueueSel.
    pub queue_sel: u32,
    /// InterruptStatus.
    pub interrupt_status: u32,
    /// The queues.
    pub queues: Vec<QueueState>,
}

/// The 16550A.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct SerialState {
    /// DLL, DLM, IER, IIR, LCR, LSR, MCR, MSR, SCR.
    pub registers: [u8; 9],
    /// Receive FIFO.
    pub in_buffer: Vec<u8>,
}

/// The whole VM but memory.
#[derive(Debug, Serialize, Deserialize)]
pub struct VmState {
    /// Per vCPU, by index.
    pub vcpus: Vec<VcpuState>,
    /// irqchip, PIT, clock.
    pub kvm: VmKvmState,
    /// Per disk, in guest order.
    pub transports: Vec<TransportState>,
    /// The console.
    pub serial: SerialState,
    /// The PCI functions and hotplug registers (pci transport; version 2).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub pci: Option<pci::PciState>,
}

impl VmState {
    /// The version its container is written with.
    pub fn version(&self) -> u32 {
        if self.pci.is_some() {
            STATE_VERSION
        } else {
            MMIO_STATE_VERSION
        }
    }
}

/// How a frozen layer is recognised: the format's identity (VHDX DataWriteGuid, VHD footer
/// UUID), the file size and its modification time. Any write changes at least one.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct LayerIdentity {
    /// The format's identity.
    pub uuid: Option<String>,
    /// File size in bytes.
    pub size: u64,
    /// Modification time, nanoseconds since the epoch.
    pub mtime_ns: i128,
}

/// A disk of the checkpoint.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ManifestDisk {
    /// The frozen image (top of the chain at the checkpoint); a restore puts a new child on it.
    pub frozen: PathBuf,
    /// Its identity when frozen.
    pub identity: LayerIdentity,
    /// Given read-only (not frozen: the image itself, never written).
    pub read_only: bool,
}

/// A file of the checkpoint with its size and CRC-32C.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ManifestFile {
    /// Name inside DIR.
    pub name: String,
    /// Length in bytes.
    pub len: u64,
    /// CRC-32C of the whole content (holes read as zeros).
    pub crc32c: u32,
}

/// `manifest.json`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Manifest {
    /// "vhdkit-checkpoint".
    pub kind: String,
    /// [`STATE_VERSION`].
    pub version: u32,
    /// vhdtool version that wrote it.
    pub writer: String,
    /// Guest RAM in bytes.
    pub memory: u64,
    /// vCPUs.
    pub cpus: u8,
    /// The guest's extra kernel command line (informational: the guest is not booted again).
    pub cmdline: String,
    /// How the guest reaches its disks (absent in version 1: mmio).
    #[serde(default, skip_serializing_if = "crate::Transport::is_mmio")]
    pub transport: crate::Transport,
    /// Disks in guest order.
    pub disks: Vec<ManifestDisk>,
    /// `vmstate.bin`.
    pub state: ManifestFile,
    /// `memory.img`.
    pub memory_file: ManifestFile,
}

/// File names inside DIR.
pub const MANIFEST: &str = "manifest.json";
/// State container.
pub const STATE_FILE: &str = "vmstate.bin";
/// Memory image.
pub const MEMORY_FILE: &str = "memory.img";
/// `Manifest::kind`.
pub const MANIFEST_KIND: &str = "vhdkit-checkpoint";

/// Errors reading or writing a checkpoint.
#[derive(Debug, thiserror::Error)]
pub enum StateError {
    /// A file could not be read or written.
    #[error("{path}: {what}: {source}")]
    Io {
        /// The file.
        path: PathBuf,
        /// The operation.
        what: &'static str,
        /// The error.
        source: std::io::Error,
    },
    /// A structure is damaged, truncated or from another version.
    #[error("{path}: {structure} at offset {offset}: {detail}")]
    Corrupt {
        /// The file.
        path: PathBuf,
        /// What was being read.
        structure: &'static str,
        /// Byte offset of the bad field.
        offset: u64,
        /// What is wrong.
        detail: String,
    },
    /// The checkpoint does not fit this host or its disks (changed layer, missing feature).
    #[error("{0}")]
    Mismatch(String),
}

fn corrupt(path: &Path, structure: &'static str, offset: u64, detail: String) -> StateError {
    StateError::Corrupt {
        path: path.to_path_buf(),
        structure,
        offset,
        detail,
    }
}

/// `vmstate.bin` bytes for `state`.
pub fn encode_state(state: &VmState) -> Vec<u8> {
    let body = serde_json::to_vec(state).unwrap_or_default();
    let mut out = Vec::with_capacity(HEADER_LEN + body.len());
    out.extend_from_slice(&MAGIC);
    out.extend_from_slice(&state.version().to_le_bytes());
    out.extend_from_slice(&(body.len() as u64).to_le_bytes());
    out.extend_from_slice(&crc32c::crc32c(&body).to_le_bytes());
    out.extend_from_slice(&body);
    out
}

/// Parses `vmstate.bin` bytes read from `path` (checked before parsing).
pub fn decode_state(path: &Path, bytes: &[u8]) -> Result<VmState, StateError> {
    let s = "state header";
    if bytes.len() < HEADER_LEN {
        return Err(corrupt(
            path,
            s,
            bytes.len() as u64,
            format!(
                "truncated: {} bytes, the header has {HEADER_LEN}",
                bytes.len()
            ),
        ));
    }
    if bytes[..8] != MAGIC {
        return Err(corrupt(
            path,
            s,
            0,
            "not a vhdkit VM state (bad magic)".into(),
        ));
    }
    let u32_at = |o: usize| u32::from_le_bytes(bytes[o..o + 4].try_into().unwrap_or_default());
    let version = u32_at(8);
    if !(MMIO_STATE_VERSION..=STATE_VERSION).contains(&version) {
        return Err(corrupt(
            path,
            s,
            8,
            format!(
                "version {version}, this vhdtool reads versions {MMIO_STATE_VERSION} to \
                 {STATE_VERSION}"
            ),
        ));
    }
    let len = u64::from_le_bytes(bytes[12..20].try_into().unwrap_or_default());
    let have = (bytes.len() - HEADER_LEN) as u64;
    if len > MAX_BODY || len != have {
        return Err(corrupt(
            path,
            s,
            12,
            format!("body length {len}, the file holds {have} bytes after the header"),
        ));
    }
    let body = &bytes[HEADER_LEN..];
    let (want, got) = (u32_at(20), crc32c::crc32c(body));
    if want != got {
        return Err(corrupt(
            path,
            "state body",
            HEADER_LEN as u64,
            format!("checksum mismatch (CRC-32C {got:#010x}, header says {want:#010x})"),
        ));
    }
    let state: VmState = serde_json::from_slice(body).map_err(|e| {
        corrupt(
            path,
            "state body",
            HEADER_LEN as u64,
            format!("cannot be parsed: {e}"),
        )
    })?;
    pci::check(path, &state, version)?;
    Ok(state)
}

/// `manifest.json` bytes: the manifest and a CRC-32C of its JSON.
pub fn encode_manifest(m: &Manifest) -> Vec<u8> {
    let body = serde_json::to_value(m).unwrap_or_default();
    let crc = crc32c::crc32c(body.to_string().as_bytes());
    let mut v = serde_json::to_vec_pretty(&serde_json::json!({ "manifest": body, "crc32c": crc }))
        .unwrap_or_default();
    v.push(b'\n');
    v
}

/// Parses `manifest.json` bytes read from `path`.
pub fn decode_manifest(path: &Path, bytes: &[u8]) -> Result<Manifest, StateError> {
    if bytes.len() as u64 > MAX_BODY {
        return Err(corrupt(path, "manifest", 0, "larger than 64 MiB".into()));
    }
    let v: serde_json::Value = serde_json::from_slice(bytes).map_err(|e| {
        let offset = line_col_offset(bytes, e.line(), e.column());
        corrupt(path, "manifest", offset, format!("not JSON: {e}"))
    })?;
    let (Some(body), Some(crc)) = (v.get("manifest"), v.get("crc32c").and_then(|c| c.as_u64()))
    else {
        return Err(corrupt(
            path,
            "manifest",
            0,
            "no \"manifest\" object with a \"crc32c\"".into(),
        ));
    };
    let got = crc32c::crc32c(body.to_string().as_bytes());
    if u64::from(got) != crc {
        return Err(corrupt(
            path,
            "manifest",
            0,
            format!("checksum mismatch (CRC-32C {got:#010x}, file says {crc:#010x})"),
        ));
    }
    let version = body.get("version").and_then(|v| v.as_u64()).unwrap_or(0);
    if !(u64::from(MMIO_STATE_VERSION)..=u64::from(STATE_VERSION)).contains(&version) {
        return Err(corrupt(
            path,
            "manifest",
            0,
            format!(
                "version {version}, this vhdtool reads versions {MMIO_STATE_VERSION} to \
                 {STATE_VERSION}"
            ),
        ));
    }
    let m: Manifest = serde_json::from_value(body.clone())
        .map_err(|e| corrupt(path, "manifest", 0, format!("bad field: {e}")))?;
    if m.kind != MANIFEST_KIND {
        return Err(corrupt(path, "manifest", 0, format!("kind {:?}", m.kind)));
    }
    if m.transport == crate::Transport::Pci && m.version < STATE_VERSION {
        return Err(corrupt(
            path,
            "manifest",
            0,
            format!("transport pci in a version {} manifest", m.version),
        ));
    }
    Ok(m)
}

/// Decodes a checkpoint from the bytes of its manifest (read from `dir`) and checks it whole:
/// the files it names stay inside `dir`, `read_state` gives the state file's bytes (bounded by
/// the manifest's length), which must match the manifest's length and decode, and the state
/// holds as many vCPUs and devices as the manifest says. The only I/O is `read_state`'s.
pub fn decode_checkpoint(
    dir: &Path,
    manifest: &[u8],
    read_state: impl FnOnce(&Path, u64) -> Result<Vec<u8>, StateError>,
) -> Result<(Manifest, VmState), StateError> {
    let mpath = dir.join(MANIFEST);
    let manifest = decode_manifest(&mpath, manifest)?;
    for name in [&manifest.state.name, &manifest.memory_file.name] {
        if name.is_empty() || name.contains('/') || name == ".." {
            return Err(corrupt(
                &mpath,
                "manifest",
                0,
                format!("file name {name:?} leaves the checkpoint folder"),
            ));
        }
    }
    let spath = dir.join(&manifest.state.name);
    if manifest.state.len > MAX_BODY + HEADER_LEN as u64 {
        return Err(corrupt(
            &mpath,
            "manifest",
            0,
            format!("state length {} is over the limit", manifest.state.len),
        ));
    }
    let bytes = read_state(&spath, manifest.state.len)?;
    if bytes.len() as u64 != manifest.state.len {
        return Err(corrupt(
            &spath,
            "state",
            (bytes.len() as u64).min(manifest.state.len),
            format!(
                "{} bytes, the manifest says {}",
                bytes.len(),
                manifest.state.len
            ),
        ));
    }
    let state = decode_state(&spath, &bytes)?;
    if state.vcpus.len() != usize::from(manifest.cpus)
        || state.transports.len() != manifest.disks.len()
    {
        return Err(StateError::Mismatch(format!(
            "{}: {} vCPUs and {} devices saved, the manifest says {} and {}",
            spath.display(),
            state.vcpus.len(),
            state.transports.len(),
            manifest.cpus,
            manifest.disks.len()
        )));
    }
    if (manifest.transport == crate::Transport::Pci) != state.pci.is_some() {
        return Err(StateError::Mismatch(format!(
            "{}: the manifest says transport {}, the state {} PCI functions",
            spath.display(),
            manifest.transport,
            if state.pci.is_some() {
                "holds"
            } else {
                "holds no"
            }
        )));
    }
    Ok((manifest, state))
}

/// Byte offset of 1-based `line` and `column` in `bytes`.
fn line_col_offset(bytes: &[u8], line: usize, column: usize) -> u64 {
    let start: usize = bytes
        .split(|&b| b == b'\n')
        .take(line.saturating_sub(1))
        .map(|l| l.len() + 1)
        .sum();
    (start + column.saturating_sub(1)) as u64
}

#[cfg(test)]
mod tests;

#[cfg(test)]
mod pci_tests;
