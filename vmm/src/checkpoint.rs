//! Checkpoints: `vhdtool vm checkpoint DIR` on a running VM and `vhdtool boot --restore DIR`.
//!
//! ```text
//!  checkpoint: pause vCPUs → stop disk workers (drain, flush) → vCPU + irqchip/PIT/clock +
//!     device state → memory.img (sparse) → per writable disk: close it (now frozen), create a
//!     differencing child beside it (VHDX → .avhdx, VHD → .vhd), reopen the device on the
//!     child → vmstate.bin → manifest.json (last: a DIR without it is no checkpoint) →
//!     restart workers → resume (or stop with --stop)
//!  restore: manifest + state checked (versions, lengths, CRC-32C) → each frozen layer's
//!     identity checked → a new child per writable disk over its frozen layer → VM built from
//!     the state instead of booting → runs
//! ```
//!
//! A pci-transport VM's state also holds each function's slot, id, config space (BAR0 where
//! the guest put it) and MSI-X table, hot-added disks included (`state::pci`); a removal
//! waiting for the guest's eject refuses the checkpoint (and a migration).
//!
//! Invariants: the frozen layers are never written again (each restore writes only its own
//! new child, so restoring one DIR twice gives two independent VMs); every file is written
//! under a temporary name, synced and renamed; a checkpoint that fails before a disk moved
//! leaves the VM running as it was, and a failed checkpoint leaves no files in DIR (a raw
//! writable disk is refused before the guest pauses).

use std::fs;
use std::io::Write;
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::time::Instant;

use crate::controller::Controller;
use crate::devices::serial;
use crate::disks::{open_engines, queues_for};
use crate::state::pci::PciState;
use crate::state::{
    self, encode_manifest, encode_state, save, LayerIdentity, Manifest, ManifestDisk, ManifestFile,
    StateError, VmState, MANIFEST, MANIFEST_KIND, MEMORY_FILE, STATE_FILE,
};
use crate::{DiskConfig, Error, GuestExit, Result, RunOptions, Transport, VmConfig};

/// Where a continued VM's memory comes from.
pub enum RestoredMemory {
    /// A checkpoint's `memory.img`, with its length and CRC-32C.
    File {
        /// The file.
        path: PathBuf,
        /// Its length.
        len: u64,
        /// Its CRC-32C.
        crc: u32,
    },
    /// Already filled (received by a migration target).
    Loaded(vm_memory::GuestMemoryMmap),
}

/// A VM to continue instead of booting: a loaded checkpoint or a received migration.
pub struct Restored {
    /// vCPU, in-kernel and device state.
    pub state: VmState,
    /// Guest memory.
    pub memory: RestoredMemory,
    /// Called before the disks are opened (the rest of the VM is built); an error stops the
    /// VM there (a migration target waits for the source to release the disks).
    pub before_disks: Option<Box<dyn FnOnce() -> Result<()>>>,
    /// Called once the VM is built (disks open, state set), before any vCPU or disk worker
    /// runs; an error stops the VM there (a migration target asks the source for the go).
    pub commit: Option<Box<dyn FnOnce() -> Result<()>>>,
    /// The VM already built over `memory` (a migration target builds it while the memory
    /// streams in); `None` builds it then.
    pub built: Option<crate::vm::BuiltVm>,
    /// Advance kvmclock by the host time since the save (a migration), rather than continue
    /// from the saved value (a checkpoint).
    pub advance_clock: bool,
}

fn io<'a>(path: &'a Path, what: &'static str) -> impl Fn(std::io::Error) -> StateError + 'a {
    move |source| StateError::Io {
        path: path.to_path_buf(),
        what,
        source,
    }
}

/// Writes `bytes` to `dir/name` through a temporary name, synced, then renamed.
fn publish(dir: &Path, name: &str, bytes: &[u8]) -> std::result::Result<(), StateError> {
    let tmp = dir.join(format!(".{name}.tmp"));
    let mut f = fs::File::create(&tmp).map_err(io(&tmp, "create"))?;
    f.write_all(bytes).map_err(io(&tmp, "write"))?;
    f.sync_all().map_err(io(&tmp, "sync"))?;
    let dst = dir.join(name);
    fs::rename(&tmp, &dst).map_err(io(&dst, "rename into place"))
}

/// The identity of the image at `path`, whose format identity is `uuid`.
fn identity(
    path: &Path,
    uuid: Option<uuid::Uuid>,
) -> std::result::Result<LayerIdentity, StateError> {
    let m = fs::metadata(path).map_err(io(path, "stat"))?;
    Ok(LayerIdentity {
        uuid: uuid.map(|u| u.to_string()),
        size: m.len(),
        mtime_ns: i128::from(m.mtime()) * 1_000_000_000 + i128::from(m.mtime_nsec()),
    })
}

/// The format identity of the top image of `path` (opened read-only, then closed).
fn format_identity(path: &Path) -> std::result::Result<Option<uuid::Uuid>, Error> {
    let chain =
        block_backend::open(path, block_backend::OpenOptions::read_only()).map_err(|source| {
            Error::Disk {
                path: path.to_path_buf(),
                source,
            }
        })?;
    Ok(chain.top().identity())
}

/// `{stem}-{tag}.{ext}` beside `parent`, the extension by the parent's format.
fn child_path(parent: &Path) -> std::result::Result<PathBuf, Error> {
    let ext = block_backend::probe::child_extension(parent).map_err(|source| Error::Disk {
        path: parent.to_path_buf(),
        source,
    })?;
    let stem = parent
        .file_stem()
        .map(|s| s.to_string_lossy().into_owned())
        .unwrap_or_else(|| "disk".into());
    let tag = &uuid::Uuid::new_v4().simple().to_string()[..8];
    Ok(parent.with_file_name(format!("{stem}-{tag}.{ext}")))
}

/// Removes what a failed checkpoint wrote to DIR (which `prepare_dir` found empty), so that
/// no memory image is left behind without the manifest that would make it a checkpoint.
fn discard_partial(dir: &Path) {
    for name in [MANIFEST, STATE_FILE, MEMORY_FILE] {
        let _ = fs::remove_file(dir.join(name));
        let _ = fs::remove_file(dir.join(format!(".{name}.tmp")));
    }
}

/// Creates DIR if absent; refuses one that holds anything.
fn prepare_dir(dir: &Path) -> std::result::Result<(), StateError> {
    fs::create_dir_all(dir).map_err(io(dir, "create the checkpoint folder"))?;
    let mut entries = fs::read_dir(dir).map_err(io(dir, "list"))?;
    if entries.next().is_some() {
        return Err(StateError::Mismatch(format!(
            "{}: the checkpoint folder is not empty",
            dir.display()
        )));
    }
    Ok(())
}

impl Controller<'_> {
    /// Saves the VM to `dir`; see the module docs. Returns a summary with timings.
    pub fn checkpoint(&mut self, dir: &Path, stop: bool) -> Result<String> {
        let start = Instant::now();
        if let Some(why) = self.hotplug.unsaved() {
            return Err(Error::Config(why));
        }
        // A disk that cannot take a child (raw) refuses the checkpoint before the guest pauses.
        for d in self.disks.iter().filter(|d| !d.read_only) {
            child_path(&d.path)?;
        }
        prepare_dir(dir)?;
        let was_paused = self.control.is_paused();
        if !was_paused {
            self.control.pause(|| self.kick())?;
        }
        let result = self.save_all(dir);
        // Workers run again on whatever disk each device now has (a failed move reopened the
        // original image).
        let mut restart_error = None;
        for (i, d) in self.disks.iter_mut().enumerate() {
            if let Err(e) = d.start(i, self.tx.clone()) {
                restart_error = restart_error.or(Some(e));
            }
        }
        let paused_for = start.elapsed();
        match (result, restart_error) {
            (Ok(summary), None) => {
                if stop {
                    self.stop_after_checkpoint = Some(Ok(GuestExit::Saved));
                } else if !was_paused {
                    self.control.resume();
                }
                Ok(format!(
                    "{summary}; guest paused {:.1} ms",
                    paused_for.as_secs_f64() * 1e3
                ))
            }
            (Err(e), None) => {
                discard_partial(dir);
                if !was_paused {
                    self.control.resume();
                }
                Err(e)
            }
            (r, Some(e)) => {
                // A disk has no worker: the VM cannot go on.
                let msg = format!("checkpoint left a disk without its worker: {e}");
                self.stop_after_checkpoint = Some(Err(Error::Setup(msg.clone())));
                r.and(Err(Error::Setup(msg)))
            }
        }
    }

    /// The state of the paused VM whose disk workers are stopped: vCPUs, in-kernel devices
    /// and clock, transports, serial (what checkpoints and migrations save).
    pub fn vm_state(&self) -> Result<VmState> {
        let index = self.msr_index.clone();
        let vcpus = self
            .control
            .run_on_all(move |_, fd| save::vcpu(fd, &index))?
            .into_iter()
            .collect::<std::result::Result<Vec<_>, _>>()?;
        let kvm = save::vm(self.vm)?;
        let transports = self
            .disks
            .iter()
            .map(|d| d.transport.save_state())
            .collect();
        let serial = serial::save_state(&self.serial.lock().unwrap_or_else(|e| e.into_inner()));
        let pci = match self.config.transport {
            Transport::Mmio => None,
            Transport::Pci => Some(self.pci_state()?),
        };
        let state = VmState {
            vcpus,
            kvm,
            transports,
            serial,
            pci,
        };
        // Never write a state that a restore would refuse (state::pci::check).
        state::pci::check(Path::new("the running VM"), &state, state.version())
            .map_err(|e| StateError::Mismatch(format!("this VM's state cannot be saved: {e}")))?;
        Ok(state)
    }

    /// The PCI functions (slot, config space, MSI-X, vectors) and hotplug registers.
    fn pci_state(&self) -> Result<PciState> {
        let functions = self
            .disks
            .iter()
            .map(|d| match &d.pci {
                Some((slot, f)) => Ok(f.save_state(*slot, &d.id)),
                None => Err(Error::Setup(format!("{} has no PCI function", d.id))),
            })
            .collect::<Result<Vec<_>>>()?;
        Ok(PciState {
            functions,
            hotplug: self
                .hotplug
                .pci
                .as_ref()
                .map(|p| p.hotplug().save())
                .unwrap_or_default(),
            next_id: self.hotplug.next_id as u64,
        })
    }

    fn save_all(&mut self, dir: &Path) -> Result<String> {
        for d in self.disks.iter_mut() {
            d.stop()?;
        }
        let t0 = Instant::now();
        let state = self.vm_state()?;
        let t_state = t0.elapsed();
        let mem_path = dir.join(MEMORY_FILE);
        let (mem_len, mem_crc) = save::memory(self.mem, &mem_path)?;
        let mem_used = fs::metadata(&mem_path)
            .map(|m| m.blocks() * 512)
            .unwrap_or(0);
        let t_mem = t0.elapsed() - t_state;

        let t1 = Instant::now();
        let mut disks = Vec::new();
        for d in self.disks.iter_mut() {
            disks.push(freeze(d, queues_for(usize::from(self.config.cpus)))?);
        }
        let t_disks = t1.elapsed();
        let bytes = encode_state(&state);
        publish(dir, STATE_FILE, &bytes)?;
        let manifest = Manifest {
            kind: MANIFEST_KIND.into(),
            version: state.version(),
            writer: format!("vhdtool {}", env!("CARGO_PKG_VERSION")),
            memory: self.config.memory,
            cpus: self.config.cpus,
            cmdline: self.config.cmdline.clone(),
            transport: self.config.transport,
            disks,
            state: ManifestFile {
                name: STATE_FILE.into(),
                len: bytes.len() as u64,
                crc32c: crc32c::crc32c(&bytes),
            },
            memory_file: ManifestFile {
                name: MEMORY_FILE.into(),
                len: mem_len,
                crc32c: mem_crc,
            },
        };
        publish(dir, MANIFEST, &encode_manifest(&manifest))?;
        if let Ok(d) = fs::File::open(dir) {
            let _ = d.sync_all();
        }
        Ok(format!(
            "checkpoint in {}: state {} bytes ({:.1} ms), memory {} MiB, {} KiB written \
             ({:.1} ms), disks frozen ({:.1} ms): {}",
            dir.display(),
            bytes.len(),
            t_state.as_secs_f64() * 1e3,
            mem_len >> 20,
            mem_used >> 10,
            t_mem.as_secs_f64() * 1e3,
            t_disks.as_secs_f64() * 1e3,
            self.disks
                .iter()
                .map(|d| d.path.display().to_string())
                .collect::<Vec<_>>()
                .join(", ")
        ))
    }
}

/// Freezes disk `d` (worker stopped): a writable one moves onto a new child, and its old top
/// image becomes the frozen layer. Returns its manifest entry.
fn freeze(d: &mut crate::disks::DiskSlot, nq: usize) -> Result<ManifestDisk> {
    if d.read_only {
        let uuid = format_identity(&d.path)?;
        return Ok(ManifestDisk {
            frozen: d.path.clone(),
            identity: identity(&d.path, uuid)?,
            read_only: true,
        });
    }
    let frozen = d.path.clone();
    let child = child_path(&frozen)?;
    let mut moved: std::result::Result<LayerIdentity, Error> =
        Err(Error::Setup("not moved".into()));
    let outcome = d.transport.with_device(|dev| {
        dev.replace_disk(|| {
            // The old chain is closed now: the frozen image is final.
            moved = (|| {
                let uuid = format_identity(&frozen)?;
                let id = identity(&frozen, uuid)?;
                block_backend::probe::create_child(&frozen, &child).map_err(|source| {
                    Error::Disk {
                        path: child.clone(),
                        source,
                    }
                })?;
                Ok(id)
            })();
            let target = if moved.is_ok() { &child } else { &frozen };
            open_engines(target, false, nq)
        })
    });
    outcome.map_err(|source| Error::Disk {
        path: frozen.clone(),
        source,
    })?;
    let id = moved?;
    d.path = child;
    Ok(ManifestDisk {
        frozen,
        identity: id,
        read_only: false,
    })
}

/// Reads and checks the checkpoint in `dir` (see [`state::decode_checkpoint`]).
fn load(dir: &Path) -> std::result::Result<(Manifest, VmState), StateError> {
    let mpath = dir.join(MANIFEST);
    let bytes = fs::read(&mpath).map_err(io(&mpath, "read"))?;
    state::decode_checkpoint(dir, &bytes, |spath, want| {
        let f = fs::File::open(spath).map_err(io(spath, "open"))?;
        let mut out = Vec::new();
        // One byte past the manifest's length tells a longer file from an exact one.
        std::io::Read::read_to_end(&mut std::io::Read::take(f, want + 1), &mut out)
            .map_err(io(spath, "read"))?;
        Ok(out)
    })
}

/// Refuses a checkpoint whose vCPUs used CPU features a vCPU of this host lacks, before any
/// file is made (a scratch VM with one vCPU set up as the VMM sets them up).
fn check_host(state: &VmState, cpus: u8) -> Result<()> {
    let kvm = kvm_ioctls::Kvm::new().map_err(|e| Error::Kvm {
        what: "open /dev/kvm".into(),
        source: e,
    })?;
    let vm = kvm.create_vm().map_err(|e| Error::Kvm {
        what: "KVM_CREATE_VM".into(),
        source: e,
    })?;
    vm.create_irq_chip().map_err(|e| Error::Kvm {
        what: "KVM_CREATE_IRQCHIP".into(),
        source: e,
    })?;
    let fd = vm.create_vcpu(0).map_err(|e| Error::Kvm {
        what: "KVM_CREATE_VCPU".into(),
        source: e,
    })?;
    crate::cpu::configure(&kvm, &fd, 0, cpus, 0)?;
    for v in &state.vcpus {
        state::restore::check_cpuid(&fd, v)?;
    }
    Ok(())
}

/// Continues the VM saved in `dir` on new differencing children of its frozen layers, until
/// the guest ends it (as [`crate::run`]).
pub fn restore(dir: &Path, opts: &RunOptions) -> Result<GuestExit> {
    let (manifest, state) = load(dir)?;
    check_host(&state, manifest.cpus)?;
    let mut disks = Vec::new();
    let mut created = Vec::new();
    let result = (|| {
        for d in &manifest.disks {
            let uuid = format_identity(&d.frozen)?;
            let now = identity(&d.frozen, uuid)?;
            if now != d.identity {
                return Err(Error::State(StateError::Mismatch(format!(
                    "{}: this layer changed since the checkpoint (identity {:?}, size {}, \
                     mtime {} ns; the checkpoint recorded {:?}, size {}, mtime {} ns): \
                     refusing to continue a guest on a disk it never wrote",
                    d.frozen.display(),
                    now.uuid,
                    now.size,
                    now.mtime_ns,
                    d.identity.uuid,
                    d.identity.size,
                    d.identity.mtime_ns
                ))));
            }
            let path = if d.read_only {
                d.frozen.clone()
            } else {
                let child = child_path(&d.frozen)?;
                block_backend::probe::create_child(&d.frozen, &child).map_err(|source| {
                    Error::Disk {
                        path: child.clone(),
                        source,
                    }
                })?;
                created.push(child.clone());
                child
            };
            disks.push(DiskConfig {
                path,
                read_only: d.read_only,
            });
        }
        Ok(())
    })();
    if let Err(e) = result {
        for c in created {
            let _ = fs::remove_file(c);
        }
        return Err(e);
    }
    for d in &disks {
        eprintln!("vhdtool: restore: disk {}", d.path.display());
    }
    let config = VmConfig {
        kernel: PathBuf::new(),
        initrd: None,
        cmdline: manifest.cmdline.clone(),
        memory: manifest.memory,
        cpus: manifest.cpus,
        disks,
        transport: manifest.transport,
    };
    let restored = Restored {
        state,
        memory: RestoredMemory::File {
            path: dir.join(&manifest.memory_file.name),
            len: manifest.memory_file.len,
            crc: manifest.memory_file.crc32c,
        },
        before_disks: None,
        commit: None,
        built: None,
        advance_clock: false,
    };
    let result = crate::vm::run_vm(&config, opts, Some(restored));
    if let Err(Error::State(_)) = &result {
        // State errors come from setting the VM up, before the guest ran: the new children
        // were never written and go again.
        for d in config.disks.iter().filter(|d| !d.read_only) {
            let _ = fs::remove_file(&d.path);
        }
    }
    result
}
