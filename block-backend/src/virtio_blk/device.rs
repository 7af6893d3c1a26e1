//! The virtio-blk device: queues in guest memory, validated requests, an engine underneath.
//!
//! ```text
//!  driver ──avail ring──> process_queue: pop chain ─ parse (validate all) ─┬─ In/Out: one engine
//!                                                                          │   request over all data
//!                                                                          │   segments (guest ranges):
//!                                                                          │   planned once, committed once
//!                                                                          ├─ Flush/Discard/WriteZeroes
//!                                                                          └─ GetId / errors: answered now
//!  driver <──used ring── process_completions: status byte, used len, notify (EVENT_IDX aware)
//! ```
//!
//! Interrupts are coalesced per call: answers only mark their queue, and each public call
//! that answered ends by asking the queue once whether the driver wants an interrupt for
//! everything it added (with EVENT_IDX, whether `used_event` lies in that whole range), as
//! QEMU's virtio-blk does. A driver reaping a batch of 32 completions then takes one
//! interrupt, not one per completion that raced its handler's update of `used_event`.
//!
//! Dirty tracking (live migration): writes into guest memory by the host (KVM's dirty log does
//! not see them) are reported to the hook of [`VirtioBlk::set_dirty_hook`] when they are
//! complete: read data and GET_ID buffers, and status bytes. The used ring is not reported
//! (its place is in the queue state, which a migrating VMM sends last anyway).
//!
//! Invariants: nothing from the driver is trusted (see [`super::request`]); guest buffers stay
//! mapped while the engine uses them because each request holds an Arc of the guest memory
//! ([`GuestBuf`]); the device has no `unsafe`; a chain is returned to the used ring exactly
//! once, after its request completed; a read-only disk answers writes, discards and
//! write-zeroes with IOERR.
//!
//! MQ: every virtqueue has its own engine (its own io_uring), all over one shared chain, so
//! a guest that spreads its submissions over queues gets independent rings. Engines do not
//! order requests against each other, so before an ordering point (flush, discard,
//! write-zeroes) from any queue the device drains every other queue's engine: a flush covers
//! every write completed before it, whatever queue carried it. Each engine offers a completion
//! eventfd ([`VirtioBlk::completion_fds`]), so a VMM can sleep in epoll on notifications and
//! completions together and hold its device lock only while it processes them.

use std::collections::HashMap;
use std::sync::atomic::Ordering;
use std::sync::Arc;

use virtio_bindings::virtio_blk::{
    VIRTIO_BLK_F_BLK_SIZE, VIRTIO_BLK_F_DISCARD, VIRTIO_BLK_F_FLUSH, VIRTIO_BLK_F_MQ,
    VIRTIO_BLK_F_RO, VIRTIO_BLK_F_SEG_MAX, VIRTIO_BLK_F_SIZE_MAX, VIRTIO_BLK_F_TOPOLOGY,
    VIRTIO_BLK_F_WRITE_ZEROES, VIRTIO_BLK_ID_BYTES, VIRTIO_BLK_S_IOERR, VIRTIO_BLK_S_OK,
    VIRTIO_BLK_S_UNSUPP,
};
use virtio_bindings::virtio_config::VIRTIO_F_VERSION_1;
use virtio_bindings::virtio_ring::VIRTIO_RING_F_EVENT_IDX;
use virtio_queue::{Queue, QueueT};
use vm_memory::{Bytes, GuestAddress, GuestMemoryMmap};

use super::request::{parse, segments, Limits, ParseError, Request, RequestType, SECTOR};
use crate::engine::{Engine, GuestBuf, IoCompletion, IoRequest};
use crate::{Disk, Error, Result};

/// Most data segments per request.
pub const SEG_MAX: u32 = 128;
/// Largest data segment (1 MiB).
pub const SIZE_MAX: u32 = 1 << 20;
/// Largest discard / write-zeroes range in sectors (1 GiB).
pub const MAX_DISCARD_SECTORS: u32 = 1 << 21;
/// Most segments in one discard or write-zeroes request (advertised as max_discard_seg and
/// max_write_zeroes_seg; more is refused, so one request cannot ask for unbounded work).
pub const MAX_DISCARD_SEG: u32 = 1;

/// A chain waiting for its segments.
struct Pending {
    queue: u16,
    head: u16,
    status: GuestAddress,
    used_len: u32,
    remaining: usize,
    failed: bool,
    /// Guest ranges the request writes (reads).
    writes: Vec<(GuestAddress, u32)>,
}

/// Called with each guest range the device wrote (see [`VirtioBlk::set_dirty_hook`]).
pub type DirtyHook = Arc<dyn Fn(GuestAddress, usize) + Send + Sync>;

/// Device configuration.
#[derive(Debug, Clone)]
pub struct Config {
    /// Serial / id string (up to 20 bytes).
    pub id: String,
}

/// A virtio-blk device over one engine per queue.
pub struct VirtioBlk {
    /// `engines[q]` serves queue `q`.
    engines: Vec<Box<dyn Engine>>,
    mem: Arc<GuestMemoryMmap>,
    queues: Vec<Queue>,
    config: Config,
    read_only: bool,
    capacity: u64,
    blk_size: u32,
    physical: u32,
    acked: u64,
    pending: HashMap<u64, Pending>,
    next_tag: u64,
    notify: Box<dyn FnMut(u16) + Send>,
    /// `unsignalled[q]`: queue `q` got used entries since its last notification check.
    unsignalled: Vec<bool>,
    done: Vec<IoCompletion>,
    dirty: Option<DirtyHook>,
}

impl std::fmt::Debug for VirtioBlk {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("VirtioBlk")
            .field("capacity", &self.capacity)
            .field("pending", &self.pending.len())
            .finish()
    }
}

impl VirtioBlk {
    /// A device with `engines[q]` serving `queues[q]` (set up by the transport: addresses,
    /// size, ready) in `mem`; the engines share one chain (see
    /// [`crate::engine::new_shared_engine`]). `notify(queue)` is called when the driver must
    /// be interrupted (wire it to an irqfd). There must be one engine per queue, at least one.
    /// Requests in flight hold a reference to `mem`, keeping it mapped.
    pub fn new(
        engines: Vec<Box<dyn Engine>>,
        mem: impl Into<Arc<GuestMemoryMmap>>,
        queues: Vec<Queue>,
        config: Config,
        notify: Box<dyn FnMut(u16) + Send>,
    ) -> Result<VirtioBlk> {
        if engines.is_empty()
            || engines.len() != queues.len()
            || queues.len() > usize::from(u16::MAX)
        {
            return Err(Error::Unsupported {
                path: std::path::PathBuf::from("virtio-blk"),
                what: format!(
                    "one engine per queue is needed: {} engines for {} queues",
                    engines.len(),
                    queues.len()
                ),
            });
        }
        let chain = engines[0].chain();
        let read_only = chain.is_read_only();
        let capacity = chain.size() / SECTOR;
        let blk_size = chain.logical_sector_size();
        let physical = chain.physical_sector_size();
        drop(chain);
        Ok(VirtioBlk {
            engines,
            mem: mem.into(),
            unsignalled: vec![false; queues.len()],
            queues,
            config,
            read_only,
            capacity,
            blk_size,
            physical,
            acked: 0,
            pending: HashMap::new(),
            next_tag: 0,
            notify,
            done: Vec::new(),
            dirty: None,
        })
    }

    /// The engines' completion eventfds (one per queue that has one): after one becomes
    /// readable, read it and call [`VirtioBlk::process_completions`] with `wait = false`.
    pub fn completion_fds(&mut self) -> Result<Vec<std::os::fd::RawFd>> {
        let mut fds = Vec::new();
        for e in &mut self.engines {
            fds.extend(e.completion_fd()?);
        }
        Ok(fds)
    }

    /// Reports every later write into guest memory (data of reads, GET_ID, status bytes) to
    /// `hook` once it is complete (requests already in flight included); `None` stops
    /// reporting.
    pub fn set_dirty_hook(&mut self, hook: Option<DirtyHook>) {
        self.dirty = hook;
    }

    /// Drains every request and closes the disk (drops the engines and with them the chain
    /// and its image lock). The device must not process its queues until
    /// [`VirtioBlk::replace_disk`] gave it a disk again.
    pub fn close_disk(&mut self) -> Result<()> {
        while self.in_flight() > 0 {
            self.process_completions(true)?;
        }
        self.engines.clear();
        Ok(())
    }

    /// Features the device offers.
    pub fn device_features(&self) -> u64 {
        let mut f = 1u64 << VIRTIO_F_VERSION_1
            | 1 << VIRTIO_RING_F_EVENT_IDX
            | 1 << VIRTIO_BLK_F_FLUSH
            | 1 << VIRTIO_BLK_F_BLK_SIZE
            | 1 << VIRTIO_BLK_F_SEG_MAX
            | 1 << VIRTIO_BLK_F_SIZE_MAX
            | 1 << VIRTIO_BLK_F_TOPOLOGY
            | 1 << VIRTIO_BLK_F_MQ;
        if self.read_only {
            f |= 1 << VIRTIO_BLK_F_RO;
        } else {
            f |= 1 << VIRTIO_BLK_F_DISCARD | 1 << VIRTIO_BLK_F_WRITE_ZEROES;
        }
        f
    }

    /// Records the features the driver accepted (a subset of the offer).
    pub fn set_acked_features(&mut self, features: u64) {
        self.acked = features & self.device_features();
        let event_idx = self.acked & (1 << VIRTIO_RING_F_EVENT_IDX) != 0;
        for q in &mut self.queues {
            q.set_event_idx(event_idx);
        }
    }

    /// The features the driver accepted.
    pub fn acked_features(&self) -> u64 {
        self.acked
    }

    /// Moves the device onto another disk (a checkpoint continues the guest on a new
    /// differencing child): drains every request, drops the engines (closing their chain),
    /// then takes the engines `reopen` returns, one per queue, over a disk of the same size
    /// and sector sizes. If `reopen` fails, its error is returned and the device has no disk
    /// left: the caller must not process its queues again.
    pub fn replace_disk(
        &mut self,
        reopen: impl FnOnce() -> Result<Vec<Box<dyn Engine>>>,
    ) -> Result<()> {
        while self.in_flight() > 0 {
            self.process_completions(true)?;
        }
        self.engines.clear();
        let engines = reopen()?;
        let chain = engines.first().map(|e| e.chain());
        let fits = chain.as_ref().is_some_and(|c| {
            c.size() / SECTOR == self.capacity
                && c.logical_sector_size() == self.blk_size
                && c.physical_sector_size() == self.physical
                && c.is_read_only() == self.read_only
        });
        drop(chain);
        if !fits || engines.len() != self.queues.len() {
            return Err(Error::Unsupported {
                path: std::path::PathBuf::from("virtio-blk"),
                what: "the replacement disk differs in size, sectors, mode or queues".into(),
            });
        }
        self.engines = engines;
        Ok(())
    }

    /// Number of virtqueues.
    pub fn num_queues(&self) -> u16 {
        self.queues.len() as u16
    }

    /// The queues, for the transport to configure.
    pub fn queues_mut(&mut self) -> &mut [Queue] {
        &mut self.queues
    }

    /// The device configuration space (`struct virtio_blk_config`, little-endian).
    pub fn config_space(&self) -> Vec<u8> {
        let mut c = vec![0u8; 60];
        c[0..8].copy_from_slice(&self.capacity.to_le_bytes());
        c[8..12].copy_from_slice(&SIZE_MAX.to_le_bytes());
        c[12..16].copy_from_slice(&SEG_MAX.to_le_bytes());
        c[20..24].copy_from_slice(&self.blk_size.to_le_bytes());
        // Topology: physical block exponent (physical / logical), min_io and opt_io in blocks.
        c[24] = (self.physical / self.blk_size).trailing_zeros() as u8;
        c[26..28].copy_from_slice(&1u16.to_le_bytes());
        c[34..36].copy_from_slice(&self.num_queues().to_le_bytes());
        c[36..40].copy_from_slice(&MAX_DISCARD_SECTORS.to_le_bytes());
        c[40..44].copy_from_slice(&MAX_DISCARD_SEG.to_le_bytes());
        c[44..48].copy_from_slice(&(self.blk_size / SECTOR as u32).to_le_bytes());
        c[48..52].copy_from_slice(&MAX_DISCARD_SECTORS.to_le_bytes());
        c[52..56].copy_from_slice(&MAX_DISCARD_SEG.to_le_bytes());
        c[56] = 1;
        c
    }

    fn limits(&self) -> Limits {
        Limits {
            capacity: self.capacity,
            seg_max: SEG_MAX,
            size_max: SIZE_MAX,
            max_discard_seg: MAX_DISCARD_SEG,
        }
    }

    fn answer(&mut self, queue: u16, head: u16, status: GuestAddress, code: u32, used_len: u32) {
        // The status address was checked to lie in guest memory when the chain was parsed.
        let _ = self.mem.write_obj(code as u8, status);
        if let Some(hook) = &self.dirty {
            hook(status, 1);
        }
        if self.queues[queue as usize]
            .add_used(&*self.mem, head, used_len)
            .is_err()
        {
            tracing::warn!(queue, head, "cannot add to the used ring");
        }
        self.signal(queue);
    }

    /// Marks `queue` as having new used entries; [`Self::send_signals`] notifies.
    fn signal(&mut self, queue: u16) {
        self.unsignalled[usize::from(queue)] = true;
    }

    /// Interrupts the driver once for each queue that got used entries, if it asked to be.
    fn send_signals(&mut self) {
        for (i, q) in self.queues.iter_mut().enumerate() {
            if std::mem::take(&mut self.unsignalled[i])
                && q.needs_notification(&*self.mem).unwrap_or(true)
            {
                (self.notify)(i as u16);
            }
        }
    }

    /// Takes every available chain of `queue`, validates it and starts its I/O.
    pub fn process_queue(&mut self, queue: u16) -> Result<()> {
        let Some(q) = self.queues.get_mut(queue as usize) else {
            return Ok(());
        };
        let mut chains = Vec::new();
        loop {
            let _ = q.disable_notification(&*self.mem);
            while let Some(chain) = q.pop_descriptor_chain(&*self.mem) {
                chains.push((chain.head_index(), chain.collect::<Vec<_>>()));
            }
            // Re-enable and look again: a chain may have arrived in between.
            if !q.enable_notification(&*self.mem).unwrap_or(false) {
                break;
            }
            // An avail index more than a queue size ahead (a broken or hostile driver) makes
            // every pop fail while the index still differs: stop instead of spinning.
            let ahead = q
                .avail_idx(&*self.mem, Ordering::Acquire)
                .map(|idx| idx.0.wrapping_sub(q.next_avail()));
            if !ahead.is_ok_and(|n| n <= q.size()) {
                tracing::warn!(
                    queue,
                    "available ring index out of range: queue not processed"
                );
                break;
            }
        }
        let started = chains
            .into_iter()
            .try_for_each(|(head, descs)| self.start(queue, head, &descs));
        self.send_signals();
        started?;
        self.engines[usize::from(queue)].kick()
    }

    fn start(
        &mut self,
        queue: u16,
        head: u16,
        descs: &[virtio_queue::desc::split::Descriptor],
    ) -> Result<()> {
        let req = match parse(descs, &self.mem, &self.limits()) {
            Ok(r) => r,
            Err(ParseError::NoStatus) => {
                tracing::warn!(queue, head, "descriptor chain without a usable status byte");
                let _ = self.queues[queue as usize].add_used(&*self.mem, head, 0);
                self.signal(queue);
                return Ok(());
            }
            Err(ParseError::Invalid { status, reason }) => {
                tracing::warn!(queue, head, "invalid request: {reason}");
                self.answer(queue, head, status, VIRTIO_BLK_S_IOERR, 1);
                return Ok(());
            }
        };
        let writes = matches!(
            req.kind,
            RequestType::Out | RequestType::Discard | RequestType::WriteZeroes
        );
        if writes && self.read_only {
            self.answer(queue, head, req.status, VIRTIO_BLK_S_IOERR, 1);
            return Ok(());
        }
        match req.kind {
            RequestType::Unsupported(_) => {
                self.answer(queue, head, req.status, VIRTIO_BLK_S_UNSUPP, 1)
            }
            RequestType::GetId => {
                let mut id = [0u8; VIRTIO_BLK_ID_BYTES as usize];
                let n = self.config.id.len().min(id.len());
                id[..n].copy_from_slice(&self.config.id.as_bytes()[..n]);
                let mut written = 0u32;
                for &(addr, len) in &req.data {
                    let take = (len as usize).min(id.len() - written as usize);
                    if take == 0 {
                        break;
                    }
                    let _ = self
                        .mem
                        .write_slice(&id[written as usize..written as usize + take], addr);
                    if let Some(hook) = &self.dirty {
                        hook(addr, take);
                    }
                    written += take as u32;
                }
                self.answer(queue, head, req.status, VIRTIO_BLK_S_OK, written + 1);
            }
            RequestType::In | RequestType::Out => self.start_rw(queue, head, req)?,
            RequestType::Flush => {
                self.start_ops(queue, head, &req, |tag| vec![IoRequest::flush(tag)])?
            }
            RequestType::Discard | RequestType::WriteZeroes => {
                let segs = match segments(&req, &self.mem, self.capacity, MAX_DISCARD_SECTORS) {
                    Ok(s) => s,
                    Err(reason) => {
                        tracing::warn!(queue, head, "invalid segments: {reason}");
                        self.answer(queue, head, req.status, VIRTIO_BLK_S_IOERR, 1);
                        return Ok(());
                    }
                };
                let zeroes = req.kind == RequestType::WriteZeroes;
                let ops = |tag| {
                    segs.iter()
                        .map(|s| {
                            let (offset, len) =
                                (s.sector * SECTOR, u64::from(s.num_sectors) * SECTOR);
                            // Unmapping also leaves zeros behind in every format we serve.
                            if zeroes && s.flags & 1 == 0 {
                                IoRequest::write_zeroes(tag, offset, len)
                            } else {
                                IoRequest::discard(tag, offset, len)
                            }
                        })
                        .collect()
                };
                self.start_ops(queue, head, &req, ops)?;
            }
        }
        Ok(())
    }

    fn new_pending(
        &mut self,
        queue: u16,
        head: u16,
        req: &Request,
        used_len: u32,
        remaining: usize,
        writes: Vec<(GuestAddress, u32)>,
    ) -> u64 {
        let id = self.next_tag;
        self.next_tag += 1;
        self.pending.insert(
            id,
            Pending {
                queue,
                head,
                status: req.status,
                used_len,
                remaining,
                failed: false,
                writes,
            },
        );
        id
    }

    fn start_rw(&mut self, queue: u16, head: u16, mut req: Request) -> Result<()> {
        let total: u32 = req.data.iter().map(|d| d.1).sum();
        let used = if req.kind == RequestType::In {
            total + 1
        } else {
            1
        };
        if req.data.is_empty() {
            self.answer(queue, head, req.status, VIRTIO_BLK_S_OK, 1);
            return Ok(());
        }
        // All data segments as one byte array: the engine plans the request once (one lock
        // of the chain), moves each planned piece straight to or from the guest ranges it
        // covers, and commits a write's metadata once.
        // Kept for every read (a few bytes), so one started before a dirty hook was set is
        // still reported when it completes after.
        let writes = if req.kind == RequestType::In {
            req.data.clone()
        } else {
            Vec::new()
        };
        let buf = match GuestBuf::new(self.mem.clone(), std::mem::take(&mut req.data)) {
            Ok(b) => b,
            Err(e) => {
                // Checked at parse time; a buffer across two memory regions lands here.
                tracing::warn!(queue, head, "{e}");
                self.answer(queue, head, req.status, VIRTIO_BLK_S_IOERR, 1);
                return Ok(());
            }
        };
        let id = self.new_pending(queue, head, &req, used, 1, writes);
        let offset = req.sector * SECTOR;
        let r = if req.kind == RequestType::In {
            IoRequest::read(id, offset, buf)
        } else {
            IoRequest::write(id, offset, buf)
        };
        self.engines[usize::from(queue)].submit(r)
    }

    fn start_ops(
        &mut self,
        queue: u16,
        head: u16,
        req: &Request,
        ops: impl FnOnce(u64) -> Vec<IoRequest>,
    ) -> Result<()> {
        // Ordering point: what other queues have in flight completes (and commits) first.
        self.drain_except(queue)?;
        let id = self.new_pending(queue, head, req, 1, 0, Vec::new());
        let ops = ops(id);
        if let Some(p) = self.pending.get_mut(&id) {
            p.remaining = ops.len();
        }
        for r in ops {
            self.engines[usize::from(queue)].submit(r)?;
        }
        Ok(())
    }

    fn segment_done(&mut self, id: u64, ok: bool) {
        let Some(p) = self.pending.get_mut(&id) else {
            return;
        };
        p.failed |= !ok;
        p.remaining -= 1;
        if p.remaining == 0 {
            let p = self.pending.remove(&id).expect("present");
            if let Some(hook) = &self.dirty {
                for &(addr, len) in &p.writes {
                    hook(addr, len as usize);
                }
            }
            let code = if p.failed {
                VIRTIO_BLK_S_IOERR
            } else {
                VIRTIO_BLK_S_OK
            };
            self.answer(
                p.queue,
                p.head,
                p.status,
                code,
                if p.failed { 1 } else { p.used_len },
            );
        }
    }

    /// Reaps every queue's completions and returns finished chains to the driver; with
    /// `wait`, blocks until at least one completes if none has yet (and any is in flight).
    pub fn process_completions(&mut self, wait: bool) -> Result<()> {
        let mut done = std::mem::take(&mut self.done);
        for e in &mut self.engines {
            e.reap(0, &mut done)?;
        }
        if wait && done.is_empty() {
            if let Some(e) = self.engines.iter_mut().find(|e| e.in_flight() > 0) {
                e.reap(1, &mut done)?;
            }
        }
        self.complete(&mut done);
        self.done = done;
        Ok(())
    }

    fn complete(&mut self, done: &mut Vec<IoCompletion>) {
        for c in done.drain(..) {
            if let Err(e) = &c.result {
                tracing::warn!("request failed: {e}");
            }
            self.segment_done(c.tag, c.result.is_ok());
        }
        self.send_signals();
    }

    /// Waits for everything in flight on every queue but `queue`, and completes it.
    fn drain_except(&mut self, queue: u16) -> Result<()> {
        let mut done = std::mem::take(&mut self.done);
        for (q, e) in self.engines.iter_mut().enumerate() {
            if q != usize::from(queue) {
                while e.in_flight() > 0 {
                    e.reap(e.in_flight(), &mut done)?;
                }
            }
        }
        self.complete(&mut done);
        self.done = done;
        Ok(())
    }

    /// Requests in flight on any queue's engine.
    fn in_flight(&self) -> usize {
        self.engines.iter().map(|e| e.in_flight()).sum()
    }

    /// Chains started and not yet returned.
    pub fn pending(&self) -> usize {
        self.pending.len()
    }

    /// Flushes the disk (for a VMM shutting down).
    pub fn flush(&mut self) -> Result<()> {
        while self.in_flight() > 0 {
            self.process_completions(true)?;
        }
        self.engines[0].chain().flush()
    }
}

impl From<vm_memory::GuestMemoryError> for Error {
    fn from(e: vm_memory::GuestMemoryError) -> Self {
        Error::Unsupported {
            path: std::path::PathBuf::from("guest memory"),
            what: e.to_string(),
        }
    }
}
