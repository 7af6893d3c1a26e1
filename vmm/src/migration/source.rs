//! The source side of a live migration, run by the VMM's main thread for the `migrate` API
//! call (see the module docs of [`super`] for the protocol and its invariants).
//!
//! Undo on failure, in reverse order of what was done: reopen closed disks (retrying while a
//! target that got `DisksReleased` lets go of them), restart stopped disk workers, device
//! marks and KVM dirty logging off, resume vCPUs the migration paused.

use std::io::BufReader;
use std::net::{Shutdown, TcpStream};
use std::sync::Arc;
use std::time::{Duration, Instant};

use super::dirty::{self, DevicePages, DirtySet};
use super::parse_tcp;
use super::stream::{Receiver, Record, Sender, WireConfig, WireDisk, PAGE};
use crate::controller::Controller;
use crate::disks::{open_engines, queues_for};
use crate::state::encode_state;
use crate::{Error, GuestExit, Result};

/// Most pre-copy passes before the guest is paused whatever is left.
pub const MAX_PASSES: u32 = 30;
/// How long connecting may take.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(10);
/// How long one read or write may block (the target builds the VM before `Ready`).
const IO_TIMEOUT: Duration = Duration::from_secs(60);
/// How long reopening a disk is retried after a failed migration.
const REOPEN_FOR: Duration = Duration::from_secs(15);

/// What the migration changed so far (undone on failure).
#[derive(Default)]
struct Done {
    logging: bool,
    paused: bool,
    workers_stopped: bool,
    disks_closed: bool,
}

/// Figures for the reply.
#[derive(Default)]
struct Stats {
    passes: u32,
    pages_sent: u64,
    last_pages: u64,
    bandwidth: f64,
    downtime: Duration,
    /// Of the downtime: pausing, draining the disks, the last pages and the state.
    stop_copy: Duration,
    /// Of the downtime: from DisksReleased to Ready (the target builds the VM).
    target_build: Duration,
}

/// Sleeps as needed to keep the average rate at or below `limit` bytes per second.
struct Pace {
    start: Instant,
    limit: Option<f64>,
}

impl Pace {
    fn wait(&self, bytes: u64) {
        if let Some(limit) = self.limit {
            let due = Duration::from_secs_f64(bytes as f64 / limit);
            if let Some(d) = due.checked_sub(self.start.elapsed()) {
                std::thread::sleep(d);
            }
        }
    }
}

impl Controller<'_> {
    /// Migrates the VM to `to`; see the module docs. On success the VMM stops with
    /// [`GuestExit::Migrated`] after replying.
    pub fn migrate(
        &mut self,
        to: &str,
        downtime_ms: u64,
        max_bw_mib: Option<u64>,
    ) -> Result<String> {
        let start = Instant::now();
        if let Some(why) = self.hotplug.unsaved() {
            return Err(Error::Config(why));
        }
        let addrs = parse_tcp(to)?;
        let conn = addrs
            .iter()
            .find_map(|a| TcpStream::connect_timeout(a, CONNECT_TIMEOUT).ok())
            .ok_or_else(|| {
                Error::Config(format!("migration target {to}: cannot connect (is `vhdtool boot --incoming` listening there?)"))
            })?;
        let io = |e: std::io::Error| Error::Setup(format!("migration target {to}: {e}"));
        conn.set_nodelay(true).map_err(io)?;
        conn.set_read_timeout(Some(IO_TIMEOUT)).map_err(io)?;
        conn.set_write_timeout(Some(IO_TIMEOUT)).map_err(io)?;
        let mut tx = Sender::new(conn.try_clone().map_err(io)?, to);
        let mut rx = Receiver::new(BufReader::new(conn.try_clone().map_err(io)?), to);
        let was_paused = self.control.is_paused();
        let marks = Arc::new(DevicePages::new(self.mem));
        let mut done = Done::default();
        let mut stats = Stats::default();
        let pace = Pace {
            start: Instant::now(),
            limit: max_bw_mib.map(|m| (m.max(1) << 20) as f64),
        };
        let result = self.send_vm(
            &mut tx,
            &mut rx,
            &marks,
            &mut done,
            &mut stats,
            &pace,
            downtime_ms,
        );
        match result {
            Ok(()) => {
                self.stop_after_checkpoint = Some(Ok(GuestExit::Migrated));
                let _ = conn.shutdown(Shutdown::Both);
                Ok(format!(
                    "migrated to {to}: {} pre-copy passes, {} pages ({} MiB) in {} bytes sent, \
                     {} pages in the last pass, {:.1} MiB/s, guest paused {:.1} ms (stop and copy {:.1} ms, target build {:.1} ms), total {:.1} ms",
                    stats.passes,
                    stats.pages_sent,
                    (stats.pages_sent * PAGE as u64) >> 20,
                    tx.offset,
                    stats.last_pages,
                    stats.bandwidth / f64::from(1 << 20),
                    stats.downtime.as_secs_f64() * 1e3,
                    stats.stop_copy.as_secs_f64() * 1e3,
                    stats.target_build.as_secs_f64() * 1e3,
                    start.elapsed().as_secs_f64() * 1e3
                ))
            }
            Err(e) => {
                // Tell the target (it may be waiting), then undo.
                if !matches!(
                    &e,
                    Error::Migration(super::stream::StreamError::Remote { .. })
                ) {
                    let _ = tx.send(&Record::Failed(format!("the source gave up: {e}")));
                }
                let _ = conn.shutdown(Shutdown::Both);
                let undo = self.undo(&done, was_paused);
                let msg = match undo {
                    Ok(()) => format!("{e}; the VM runs on here"),
                    Err(u) => {
                        let m = format!("{e}; and the VM cannot go on here: {u}");
                        self.stop_after_checkpoint = Some(Err(Error::Setup(m.clone())));
                        m
                    }
                };
                Err(Error::Setup(msg))
            }
        }
    }

    #[allow(clippy::too_many_arguments)]
    fn send_vm(
        &mut self,
        tx: &mut Sender<TcpStream>,
        rx: &mut Receiver<BufReader<TcpStream>>,
        marks: &Arc<DevicePages>,
        done: &mut Done,
        stats: &mut Stats,
        pace: &Pace,
        downtime_ms: u64,
    ) -> Result<()> {
        tx.header()?;
        rx.header()?;
        tx.send(&Record::Config(WireConfig {
            memory: self.config.memory,
            cpus: self.config.cpus,
            cmdline: self.config.cmdline.clone(),
            transport: self.config.transport,
            disks: self
                .disks
                .iter()
                .map(|d| WireDisk {
                    path: d.path.clone(),
                    read_only: d.read_only,
                })
                .collect(),
        }))?;

        // Track from here: every later write is marked, so pass 0 may copy freely.
        for d in self.disks.iter() {
            let m = marks.clone();
            d.transport.with_device(|dev| {
                dev.set_dirty_hook(Some(Arc::new(move |gpa: vm_memory::GuestAddress, len| {
                    m.mark(gpa.0, len)
                })))
            });
        }
        done.logging = true;
        dirty::set_logging(self.vm, self.mem, true)?;
        let mut paced = |bytes| pace.wait(bytes);

        // Pass 0: all of memory (zero pages are zero on the target already).
        let t = Instant::now();
        let (b0, s) = (
            tx.offset,
            dirty::send(tx, self.mem, &dirty::first_pass(self.mem), true, &mut paced)?,
        );
        stats.pages_sent += s.data_pages;
        stats.bandwidth = rate(tx.offset - b0, t.elapsed());
        stats.passes = 1;
        let budget = Duration::from_millis(downtime_ms);
        let mut pending: DirtySet = loop {
            let mut set = dirty::take_kvm(self.vm, self.mem)?;
            dirty::merge(&mut set, &marks.take());
            let n = dirty::count(&set);
            let eta = Duration::from_secs_f64((n * PAGE as u64) as f64 / stats.bandwidth.max(1.0));
            if eta <= budget || stats.passes >= MAX_PASSES {
                break set;
            }
            let t = Instant::now();
            let b0 = tx.offset;
            let s = dirty::send(tx, self.mem, &set, false, &mut paced)?;
            stats.pages_sent += s.data_pages + s.zero_pages;
            stats.bandwidth = rate(tx.offset - b0, t.elapsed());
            stats.passes += 1;
        };

        // Stop and copy.
        let paused_at = Instant::now();
        if !self.control.is_paused() {
            self.control.pause(|| self.kick())?;
            done.paused = true;
        }
        done.workers_stopped = true;
        for d in self.disks.iter_mut() {
            d.stop()?;
        }
        dirty::merge(&mut pending, &dirty::take_kvm(self.vm, self.mem)?);
        dirty::merge(&mut pending, &marks.take());
        // The used rings (written by the devices; KVM does not see it), and the avail_event
        // the queues write there.
        for d in self.disks.iter() {
            for q in d.transport.save_state().queues.iter().filter(|q| q.ready) {
                marks.mark(q.used_ring, 6 + 8 * usize::from(q.size));
            }
        }
        dirty::merge(&mut pending, &marks.take());
        stats.last_pages = dirty::count(&pending);
        let s = dirty::send(tx, self.mem, &pending, false, &mut |_| {})?;
        stats.pages_sent += s.data_pages + s.zero_pages;
        let state = self.vm_state()?;
        tx.send(&Record::State(encode_state(&state)))?;

        // Give the disks up, then let the target take them.
        done.disks_closed = true;
        for d in self.disks.iter() {
            d.transport
                .with_device(|dev| dev.close_disk())
                .map_err(|source| Error::Disk {
                    path: d.path.clone(),
                    source,
                })?;
        }
        stats.stop_copy = paused_at.elapsed();
        tx.send(&Record::DisksReleased)?;
        let released = Instant::now();
        match rx.record()? {
            Record::Ready => {}
            other => {
                return Err(rx
                    .bad_record(
                        "reply",
                        rx.offset,
                        format!("expected ready, got a {}", other.name()),
                    )
                    .into())
            }
        }
        stats.target_build = released.elapsed();
        tx.send(&Record::Go)?;
        stats.downtime = paused_at.elapsed();
        Ok(())
    }

    /// Undoes what `done` says the failed migration did.
    fn undo(&mut self, done: &Done, was_paused: bool) -> Result<()> {
        let mut first_error = None;
        if done.disks_closed {
            let nq = queues_for(usize::from(self.config.cpus));
            for d in self.disks.iter() {
                let t0 = Instant::now();
                loop {
                    let r = d.transport.with_device(|dev| {
                        dev.replace_disk(|| open_engines(&d.path, d.read_only, nq))
                    });
                    match r {
                        Ok(()) => break,
                        Err(e) if t0.elapsed() > REOPEN_FOR => {
                            first_error = first_error.or(Some(Error::Disk {
                                path: d.path.clone(),
                                source: e,
                            }));
                            break;
                        }
                        // The target may hold it a little longer.
                        Err(_) => std::thread::sleep(Duration::from_millis(200)),
                    }
                }
            }
        }
        if done.logging {
            for d in self.disks.iter() {
                d.transport.with_device(|dev| dev.set_dirty_hook(None));
            }
            if let Err(e) = dirty::set_logging(self.vm, self.mem, false) {
                tracing::warn!("dirty logging stays on: {e}");
            }
        }
        if done.workers_stopped && first_error.is_none() {
            for (i, d) in self.disks.iter_mut().enumerate() {
                if d.worker.is_none() {
                    if let Err(e) = d.start(i, self.tx.clone()) {
                        first_error = first_error.or(Some(e));
                    }
                }
            }
            // Requests the guest queued while the workers were stopped.
            for d in self.disks.iter() {
                let _ = d.transport.kick_evt().write(1);
            }
        }
        match first_error {
            Some(e) => Err(e),
            None => {
                if done.paused && !was_paused {
                    self.control.resume();
                }
                Ok(())
            }
        }
    }
}

/// Bytes per second.
fn rate(bytes: u64, t: Duration) -> f64 {
    bytes as f64 / t.as_secs_f64().max(1e-6)
}
