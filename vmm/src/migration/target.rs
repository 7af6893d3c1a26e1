//! The target side of a live migration: `vhdtool boot --incoming tcp:HOST:PORT`.
//!
//! Listens, takes one connection, receives the VM's shape, its memory and its state (checked
//! as a checkpoint is: versions, sizes, checksums, vCPU and device counts; this host's CPU
//! features when each vCPU is built), builds the VM but its disks, waits for
//! `DisksReleased`, opens the same disk paths, says `Ready`, and runs it on `Go` (see
//! [`super`]). Any failure before `Go` is reported to the
//! source (`Failed`) so that it keeps the guest, and ends this process with an error.

use std::io::BufReader;
use std::net::{TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use vm_memory::{Bytes, GuestAddress, GuestMemoryBackend, GuestMemoryMmap};

use super::parse_tcp;
use super::stream::{Receiver, Record, Sender, WireConfig, PAGE};
use crate::checkpoint::{Restored, RestoredMemory};
use crate::state::{decode_state, VmState};
use crate::vm::{build_vm, BuiltVm};
use crate::{layout, DiskConfig, Error, GuestExit, Result, RunOptions, VmConfig};

/// How long one read may block (the source's passes come back to back).
const IO_TIMEOUT: Duration = Duration::from_secs(60);
/// Progress lines on stderr every this many bytes of memory received.
const PROGRESS_EVERY: u64 = 32 << 20;

/// Waits for a migration on `uri` (`tcp:HOST:PORT`; port 0 picks one, printed on stderr),
/// then runs the received VM until the guest ends it (as [`crate::run`]).
pub fn incoming(uri: &str, opts: &RunOptions) -> Result<GuestExit> {
    let addrs = parse_tcp(uri)?;
    let listener =
        TcpListener::bind(&addrs[..]).map_err(|e| Error::Setup(format!("listen on {uri}: {e}")))?;
    let local = listener
        .local_addr()
        .map_err(|e| Error::Setup(format!("listen on {uri}: {e}")))?;
    eprintln!("vhdtool: waiting for a migration on tcp:{local}");
    let (conn, peer) = listener
        .accept()
        .map_err(|e| Error::Setup(format!("accept on tcp:{local}: {e}")))?;
    drop(listener);
    let peer = format!("tcp:{peer}");
    eprintln!("vhdtool: incoming migration from {peer}");
    let io = |e: std::io::Error| Error::Setup(format!("migration source {peer}: {e}"));
    conn.set_nodelay(true).map_err(io)?;
    conn.set_read_timeout(Some(IO_TIMEOUT)).map_err(io)?;
    conn.set_write_timeout(Some(IO_TIMEOUT)).map_err(io)?;
    let tx = Arc::new(Mutex::new(Sender::new(
        conn.try_clone().map_err(io)?,
        &peer,
    )));
    let mut rx = Receiver::new(BufReader::new(conn), &peer);
    let fail = |e: Error| {
        let mut tx = tx.lock().unwrap_or_else(|p| p.into_inner());
        let _ = tx.send(&Record::Failed(format!("target: {e}")));
        e
    };

    let t0 = Instant::now();
    let received = (|| {
        tx.lock().unwrap_or_else(|p| p.into_inner()).header()?;
        rx.header()?;
        receive(&mut rx)
    })();
    let (wire, mem, built, state) = match received {
        Ok(r) => r,
        // A peer that failed or broke needs no word; a bad stream gets one.
        Err(e @ Error::Migration(super::stream::StreamError::Remote { .. })) => return Err(e),
        Err(e) => return Err(fail(e)),
    };
    eprintln!(
        "vhdtool: incoming: memory and state received in {:.1} ms ({} bytes)",
        t0.elapsed().as_secs_f64() * 1e3,
        rx.offset
    );
    let config = VmConfig {
        kernel: PathBuf::new(),
        initrd: None,
        cmdline: wire.cmdline.clone(),
        memory: wire.memory,
        cpus: wire.cpus,
        disks: wire
            .disks
            .iter()
            .map(|d| DiskConfig {
                path: d.path.clone(),
                read_only: d.read_only,
            })
            .collect(),
        transport: wire.transport,
    };
    let committed = Arc::new(AtomicBool::new(false));
    let rx = Arc::new(Mutex::new(rx));
    let rx2 = rx.clone();
    // The rest of the VM is built while the source closes the disks.
    let before_disks = move || -> Result<()> {
        let mut rx = rx2.lock().unwrap_or_else(|p| p.into_inner());
        let at = rx.offset;
        match rx.record()? {
            Record::DisksReleased => Ok(()),
            other => Err(rx
                .bad_record(
                    "record",
                    at,
                    format!("expected disks-released, got a {}", other.name()),
                )
                .into()),
        }
    };
    let (c, ctx) = (committed.clone(), tx.clone());
    let commit = move || -> Result<()> {
        ctx.lock()
            .unwrap_or_else(|p| p.into_inner())
            .send(&Record::Ready)?;
        let mut rx = rx.lock().unwrap_or_else(|p| p.into_inner());
        let at = rx.offset;
        match rx.record()? {
            Record::Go => {
                c.store(true, Ordering::SeqCst);
                eprintln!("vhdtool: incoming: running");
                Ok(())
            }
            other => Err(rx
                .bad_record("reply", at, format!("expected go, got a {}", other.name()))
                .into()),
        }
    };
    let restored = Restored {
        state,
        memory: RestoredMemory::Loaded(mem),
        before_disks: Some(Box::new(before_disks)),
        commit: Some(Box::new(commit)),
        built: Some(built),
        advance_clock: true,
    };
    let result = crate::vm::run_vm(&config, opts, Some(restored));
    match result {
        Err(e) if !committed.load(Ordering::SeqCst) => Err(fail(e)),
        r => r,
    }
}

/// Host RAM in bytes (MemTotal of /proc/meminfo), if known.
fn host_memory() -> Option<u64> {
    let s = std::fs::read_to_string("/proc/meminfo").ok()?;
    let kib: u64 = s
        .lines()
        .find_map(|l| l.strip_prefix("MemTotal:"))?
        .trim()
        .trim_end_matches("kB")
        .trim()
        .parse()
        .ok()?;
    Some(kib << 10)
}

/// Receives the VM's shape, its memory and its state; builds the VM (KVM, in-kernel devices,
/// memory slots) as soon as the shape is known, while the memory streams in, so that the
/// guest's pause does not wait for it.
fn receive(
    rx: &mut Receiver<BufReader<TcpStream>>,
) -> Result<(WireConfig, GuestMemoryMmap, BuiltVm, VmState)> {
    let wire = match rx.record()? {
        Record::Config(c) => c,
        other => {
            return Err(rx
                .bad_record(
                    "first record",
                    0,
                    format!("expected the config, got a {}", other.name()),
                )
                .into())
        }
    };
    let at = rx.offset;
    let shape = VmConfig {
        kernel: PathBuf::new(),
        initrd: None,
        cmdline: String::new(),
        memory: wire.memory,
        cpus: wire.cpus,
        disks: Vec::new(),
        transport: crate::Transport::Mmio,
    };
    crate::vm::validate(&shape)
        .and_then(|()| {
            if wire.disks.len() > crate::MAX_DISKS {
                return Err(Error::Config(format!("{} disks", wire.disks.len())));
            }
            match host_memory() {
                Some(host) if wire.memory > host => Err(Error::Config(format!(
                    "{} MiB of guest memory, this host has {} MiB",
                    wire.memory >> 20,
                    host >> 20
                ))),
                _ => Ok(()),
            }
        })
        .map_err(|e| rx.bad_record("config record", at, e.to_string()))?;
    let regions: Vec<(GuestAddress, usize)> = layout::ram_regions(wire.memory)
        .into_iter()
        .map(|(a, l)| (GuestAddress(a), l as usize))
        .collect();
    let mem = GuestMemoryMmap::from_ranges(&regions)
        .map_err(|e| Error::Setup(format!("allocate guest memory: {e}")))?;
    let built = build_vm(wire.cpus, &mem)?;
    let (mut bytes, mut next_report) = (0u64, 0u64);
    loop {
        let at = rx.offset;
        match rx.record()? {
            Record::Pages { gpa, data } => {
                if !mem.check_range(GuestAddress(gpa), data.len()) {
                    return Err(rx
                        .bad_record(
                            "pages record",
                            at,
                            format!("{} bytes at {gpa:#x} outside guest memory", data.len()),
                        )
                        .into());
                }
                mem.write_slice(&data, GuestAddress(gpa))
                    .map_err(|e| Error::Setup(format!("guest memory: {e}")))?;
                bytes += data.len() as u64;
                if bytes >= next_report {
                    eprintln!("vhdtool: incoming: {} MiB of memory received", bytes >> 20);
                    next_report = bytes + PROGRESS_EVERY;
                }
            }
            Record::Zero { gpa, pages } => {
                let len = pages as usize * PAGE;
                if !mem.check_range(GuestAddress(gpa), len) {
                    return Err(rx
                        .bad_record(
                            "zero-pages record",
                            at,
                            format!("{pages} pages at {gpa:#x} outside guest memory"),
                        )
                        .into());
                }
                let zero = [0u8; PAGE];
                for p in 0..u64::from(pages) {
                    mem.write_slice(&zero, GuestAddress(gpa + p * PAGE as u64))
                        .map_err(|e| Error::Setup(format!("guest memory: {e}")))?;
                }
            }
            Record::State(bytes) => {
                let name = PathBuf::from(format!("migration stream from {}", rx.peer()));
                let s = decode_state(Path::new(&name), &bytes)?;
                if s.vcpus.len() != usize::from(wire.cpus)
                    || s.transports.len() != wire.disks.len()
                    || s.pci.is_some() != (wire.transport == crate::Transport::Pci)
                {
                    return Err(rx
                        .bad_record(
                            "VM state record",
                            at,
                            format!(
                                "{} vCPUs and {} devices ({} PCI state), the config says {} \
                                 and {} (transport {})",
                                s.vcpus.len(),
                                s.transports.len(),
                                if s.pci.is_some() { "with" } else { "without" },
                                wire.cpus,
                                wire.disks.len(),
                                wire.transport
                            ),
                        )
                        .into());
                }
                // The last record before DisksReleased (read while the VM is built).
                return Ok((wire, mem, built, s));
            }
            other => {
                return Err(rx
                    .bad_record(
                        "record",
                        at,
                        format!("a {} is unexpected here", other.name()),
                    )
                    .into())
            }
        }
    }
}
