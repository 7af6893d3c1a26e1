//! `virtio_blk`: the virtio-blk device model driven by a fuzzer-controlled driver. Guest
//! memory, descriptor tables, avail rings, the number of queues, the engine, EVENT_IDX, read-only
//! and the disk format are all chosen by the input; the harness plays the driver, reads the used
//! rings after every device call and checks what the device did against its own reading of each
//! chain and a flat model of the disk.
//!
//! ```text
//! input: config (3 bytes) | op*
//!   config: engine, queues, EVENT_IDX, read-only, disk kind, memory fill | memory size and
//!           layout, queue size | seed
//!   op: request (built: header, data, status; direct or indirect; reframed into other
//!       descriptor cuts; hostile variants)
//!     | raw descriptor | publish head | bump avail idx | memory write | kick queue
//!     | process completions | used_event / avail flags
//! ```
//!
//! The harness knows which chains the device pops by popping, just before each kick, its own
//! copy of the queue state (a second `virtio_queue::Queue` over the same guest memory: the chain
//! walk is virtio-queue's; the request parsing, below, is the harness's own). Oracles, all exact
//! unless the guest raced the device (a buffer the device writes overlapping one it reads while
//! both requests are in flight, a buffer on a used ring, a driver write into a buffer in flight,
//! a chain published twice), in which case only the affected bytes or outcomes go unchecked (and
//! when the rings themselves are hit, only the crash, hang and read-only checks remain):
//! - no panic; no hang (bounded calls, and after the last op every chain completes);
//! - every used entry names a head that was popped and is still outstanding (each chain returns
//!   at most once), every popped chain is returned once the device is drained (except heads
//!   outside the queue, which cannot be), used lengths are what the device wrote;
//! - status bytes are OK / IOERR / UNSUPP; a well-formed request is answered OK, a malformed,
//!   out-of-range or unsupported one (or a write to a read-only disk) never is; needed
//!   interrupts (EVENT_IDX aware) are raised;
//! - a flat model of the disk: an OUT answered OK put its guest bytes there, DISCARD /
//!   WRITE_ZEROES answered OK leave zeros, an IN answered OK put the model's bytes into guest
//!   memory (GET_ID: the id); requests in flight together on the io_uring engine are unordered
//!   (flush, discard and write-zeroes order everything, as the device promises); at the end the
//!   disk reopened with `block_backend::open` equals the model;
//! - a read-only device leaves the file byte-identical.

use crate::input::{pattern, Input};
use block_backend::engine::{new_shared_engine, EngineKind};
use block_backend::virtio_blk::{Config, VirtioBlk};
use block_backend::{Disk, OpenOptions};
use std::fs::File;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU32, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, OnceLock, PoisonError, RwLock};
use virtio_bindings::virtio_blk::{
    VIRTIO_BLK_ID_BYTES, VIRTIO_BLK_S_IOERR, VIRTIO_BLK_S_OK, VIRTIO_BLK_S_UNSUPP,
    VIRTIO_BLK_T_DISCARD, VIRTIO_BLK_T_FLUSH, VIRTIO_BLK_T_GET_ID, VIRTIO_BLK_T_IN,
    VIRTIO_BLK_T_OUT, VIRTIO_BLK_T_WRITE_ZEROES,
};
use virtio_bindings::virtio_ring::{
    VIRTIO_RING_F_EVENT_IDX, VRING_DESC_F_INDIRECT, VRING_DESC_F_NEXT, VRING_DESC_F_WRITE,
};
use virtio_queue::desc::split::Descriptor;
use virtio_queue::{Queue, QueueT};
use vm_memory::{Bytes, GuestAddress, GuestMemoryMmap};

/// Most operations taken from one input.
const MAX_OPS: usize = 64;
/// Most device calls (kicks and completion passes) the ops may make.
const MAX_CALLS: u32 = 40;
/// Beyond this many popped chains the pairwise race bookkeeping is skipped (still run).
const MAX_RECORDS: usize = 256;
/// Completion passes allowed after the last op before the device counts as hung.
const DRAIN_PASSES: usize = 200;
/// The device id string.
const ID: &str = "vhdkit-fuzz-virtio";
/// Queue `q`'s rings live at `q * RING_STRIDE`: descriptors, then avail at +0x1000, used at
/// +0x1400 (room for 256 entries each).
const RING_STRIDE: u64 = 0x2000;
const AVAIL_OFF: u64 = 0x1000;
const USED_OFF: u64 = 0x1400;
/// Request buffers the harness builds start here (after both queues' rings).
const DATA_START: u64 = 0x4000;
const SECTOR: u64 = 512;

// ---------------------------------------------------------------------------------------------
// Disks: a template per kind, built once per process, copied to a scratch file per input.

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum DiskKind {
    Raw,
    /// A raw file whose length is not a whole number of sectors.
    RawTail,
    /// 64 KiB: most requests reach past the end.
    RawTiny,
    Vhd4k,
    Vhd64k,
    Vhdx512,
    Vhdx4k,
}

impl DiskKind {
    fn from_bits(b: u8) -> DiskKind {
        [
            DiskKind::Raw,
            DiskKind::RawTail,
            DiskKind::Vhd4k,
            DiskKind::Vhd64k,
            DiskKind::Vhdx512,
            DiskKind::Vhdx4k,
            DiskKind::RawTiny,
            DiskKind::Raw,
        ][b as usize & 7]
    }

    fn index(self) -> usize {
        self as usize
    }

    fn ext(self) -> &'static str {
        match self {
            DiskKind::Raw | DiskKind::RawTail | DiskKind::RawTiny => "img",
            DiskKind::Vhd4k | DiskKind::Vhd64k => "vhd",
            DiskKind::Vhdx512 | DiskKind::Vhdx4k => "vhdx",
        }
    }
}

/// A disk as first written for every input.
struct Template {
    file: Vec<u8>,
    /// Non-zero 4 KiB runs of `file` (the rest is written as a hole).
    runs: Vec<(usize, usize)>,
    /// The virtual disk's bytes.
    content: Vec<u8>,
}

/// This process's scratch directory (in `/dev/shm` when there is one).
fn scratch_dir() -> &'static PathBuf {
    static DIR: OnceLock<PathBuf> = OnceLock::new();
    DIR.get_or_init(|| crate::make_scratch_dir("virtio"))
}

static SCRATCH_USED: AtomicBool = AtomicBool::new(false);

/// Held (shared) by every input while it uses the scratch directory, and (exclusive) by
/// [`cleanup`]: `cargo test` replays corpus and regressions on two threads, and the first to
/// finish cleans up while the other may still be running.
static SCRATCH_LOCK: RwLock<()> = RwLock::new(());

pub(crate) fn cleanup() {
    let _excl = SCRATCH_LOCK.write().unwrap_or_else(PoisonError::into_inner);
    if SCRATCH_USED.load(Ordering::SeqCst) {
        let _ = std::fs::remove_dir_all(scratch_dir());
    }
}

/// A file name per thread: `cargo test` replays corpus and regressions on two threads at once.
fn thread_slot() -> usize {
    static NEXT: AtomicUsize = AtomicUsize::new(0);
    thread_local! {
        static SLOT: usize = NEXT.fetch_add(1, Ordering::SeqCst);
    }
    SLOT.with(|s| *s)
}

fn template(kind: DiskKind) -> &'static Template {
    static TEMPLATES: [OnceLock<Template>; 7] = [const { OnceLock::new() }; 7];
    TEMPLATES[kind.index()].get_or_init(|| build_template(kind))
}

fn build_template(kind: DiskKind) -> Template {
    SCRATCH_USED.store(true, Ordering::SeqCst);
    let path = scratch_dir().join(format!("template-{}.{}", kind.index(), kind.ext()));
    let _ = std::fs::remove_file(&path);
    let fill = |path: &Path, spans: &[(u64, usize)]| {
        let mut d = block_backend::open(path, OpenOptions::read_write()).expect("open a template");
        for (i, &(at, len)) in spans.iter().enumerate() {
            d.write_at(&pattern(0x7E57 + i as u64, len), at)
                .expect("fill a template");
        }
        d.flush().expect("flush a template");
    };
    match kind {
        DiskKind::Raw | DiskKind::RawTail | DiskKind::RawTiny => {
            let len = match kind {
                DiskKind::Raw => 256 << 10,
                DiskKind::RawTail => (192 << 10) + 100,
                _ => 64 << 10,
            };
            std::fs::write(&path, pattern(0xD15C + len as u64, len)).expect("write a template");
        }
        DiskKind::Vhd4k | DiskKind::Vhd64k => {
            let (block, size) = if kind == DiskKind::Vhd4k {
                (4096, 320 << 10)
            } else {
                (64 << 10, 640 << 10)
            };
            drop(
                vhd::VhdImage::create(
                    &path,
                    &vhd::CreateOptions {
                        size,
                        block_size: block,
                        ..Default::default()
                    },
                )
                .expect("create a VHD template"),
            );
            // Some blocks allocated (whole and partial), the rest not.
            fill(
                &path,
                &[(0, 6144), (3 * 4096 + 512, 4096), (96 << 10, 64 << 10)],
            );
        }
        DiskKind::Vhdx512 | DiskKind::Vhdx4k => {
            let lss = if kind == DiskKind::Vhdx512 { 512 } else { 4096 };
            vhdx::VhdxImage::create(
                &path,
                &vhdx::CreateOptions {
                    size: (3 << 20) / 2,
                    block_size: Some(1 << 20),
                    logical_sector_size: lss,
                    ..Default::default()
                },
            )
            .expect("create a VHDX template")
            .close()
            .expect("close a VHDX template");
            fill(&path, &[(0, 64 << 10), ((1 << 20) - 4096, 12288)]);
        }
    }
    let file = std::fs::read(&path).expect("read a template");
    let mut d = block_backend::open(&path, OpenOptions::read_only()).expect("open a template");
    let mut content = vec![0u8; d.size() as usize];
    d.read_at(&mut content, 0).expect("read a template");
    drop(d);
    let _ = std::fs::remove_file(&path);
    let mut runs: Vec<(usize, usize)> = Vec::new();
    for (i, chunk) in file.chunks(4096).enumerate() {
        if chunk.iter().any(|&b| b != 0) {
            let (s, e) = (i * 4096, i * 4096 + chunk.len());
            match runs.last_mut() {
                Some(last) if last.1 == s => last.1 = e,
                _ => runs.push((s, e)),
            }
        }
    }
    Template {
        file,
        runs,
        content,
    }
}

fn write_disk(path: &Path, t: &Template) {
    let f = File::create(path).expect("create the scratch disk");
    f.set_len(t.file.len() as u64)
        .expect("size the scratch disk");
    for &(s, e) in &t.runs {
        f.write_all_at(&t.file[s..e], s as u64)
            .expect("write the scratch disk");
    }
}

// ---------------------------------------------------------------------------------------------
// Guest memory layout.

fn overlap(a: (u64, u64), b: (u64, u64)) -> bool {
    a.0 < b.1 && b.0 < a.1 && a.0 < a.1 && b.0 < b.1
}

/// The buffers holding bytes `[from, to)` of `bufs` read as one array (`to` at most their
/// total); `None` if one of them would run past the end of the address space.
fn cut(bufs: &[D], from: u64, to: u64) -> Option<Vec<D>> {
    let mut out = Vec::new();
    let mut at = 0u64;
    for d in bufs {
        let (start, end) = (at.max(from), (at + u64::from(d.len)).min(to));
        if start < end {
            out.push(D {
                addr: d.addr.checked_add(start - at)?,
                len: (end - start) as u32,
                write: d.write,
            });
        }
        at += u64::from(d.len);
    }
    Some(out)
}

/// `[addr, addr + len)`, saturating.
fn span(addr: u64, len: u64) -> (u64, u64) {
    (addr, addr.saturating_add(len))
}

struct Layout {
    regions: Vec<(u64, u64)>,
    qsize: u16,
    nq: usize,
}

impl Layout {
    fn top(&self) -> u64 {
        self.regions.last().map_or(0, |r| r.1)
    }

    fn desc(&self, q: usize) -> u64 {
        q as u64 * RING_STRIDE
    }

    fn avail(&self, q: usize) -> u64 {
        q as u64 * RING_STRIDE + AVAIL_OFF
    }

    fn used(&self, q: usize) -> u64 {
        q as u64 * RING_STRIDE + USED_OFF
    }

    fn used_area(&self, q: usize) -> (u64, u64) {
        span(self.used(q), 6 + 8 * u64::from(self.qsize))
    }

    /// Every ring of every queue: what the device reads when popping, and its used rings.
    fn ring_areas(&self) -> Vec<(u64, u64)> {
        let s = u64::from(self.qsize);
        (0..self.nq)
            .flat_map(|q| {
                [
                    span(self.desc(q), 16 * s),
                    span(self.avail(q), 6 + 2 * s),
                    self.used_area(q),
                ]
            })
            .collect()
    }

    /// The whole range lies in guest memory (adjacent regions count as contiguous).
    fn in_mem(&self, addr: u64, len: u64) -> bool {
        let Some(end) = addr.checked_add(len) else {
            return false;
        };
        let mut at = addr;
        while at < end {
            match self.regions.iter().find(|r| r.0 <= at && at < r.1) {
                Some(r) => at = r.1,
                None => return false,
            }
        }
        true
    }

    /// The whole range lies in one region.
    fn one_region(&self, addr: u64, len: u64) -> bool {
        addr.checked_add(len)
            .is_some_and(|end| self.regions.iter().any(|r| r.0 <= addr && end <= r.1))
    }

    /// Bytes of `[addr, addr + len)`, `None` outside memory.
    fn peek(&self, mem: &GuestMemoryMmap, addr: u64, len: usize) -> Vec<Option<u8>> {
        let mut out = vec![None; len];
        let want = span(addr, len as u64);
        for &r in &self.regions {
            if !overlap(want, r) {
                continue;
            }
            let (s, e) = (want.0.max(r.0), want.1.min(r.1));
            let mut buf = vec![0u8; (e - s) as usize];
            mem.read_slice(&mut buf, GuestAddress(s))
                .expect("read guest memory");
            for (i, b) in buf.into_iter().enumerate() {
                out[(s - addr) as usize + i] = Some(b);
            }
        }
        out
    }

    /// Bytes of `[addr, addr + len)`, which must lie in guest memory.
    fn read(&self, mem: &GuestMemoryMmap, addr: u64, len: usize) -> Vec<u8> {
        let mut buf = vec![0u8; len];
        if len > 0 {
            mem.read_slice(&mut buf, GuestAddress(addr))
                .expect("read guest memory");
        }
        buf
    }

    fn peek_u16(&self, mem: &GuestMemoryMmap, addr: u64) -> u16 {
        let b = self.peek(mem, addr, 2);
        u16::from_le_bytes([b[0].unwrap_or(0), b[1].unwrap_or(0)])
    }

    fn peek_u32(&self, mem: &GuestMemoryMmap, addr: u64) -> u32 {
        let b = self.peek(mem, addr, 4);
        u32::from_le_bytes(std::array::from_fn(|i| b[i].unwrap_or(0)))
    }
}

// ---------------------------------------------------------------------------------------------
// Requests as the harness reads them.

#[derive(Debug, Clone, Copy)]
struct D {
    addr: u64,
    len: u32,
    write: bool,
}

impl D {
    fn range(&self) -> (u64, u64) {
        span(self.addr, u64::from(self.len))
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Op {
    In,
    Out,
    Flush,
    GetId,
    Discard,
    WriteZeroes,
    Other(u32),
}

/// What the device must answer, by the harness's reading of the chain.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Expect {
    /// No usable status byte: returned with used length 0, nothing done.
    NoStatus,
    /// Well-formed: OK.
    MustOk,
    /// Malformed, out of range, unsupported or a write to a read-only disk: never OK, nothing
    /// done (the device validates everything before any I/O).
    MustFail,
    /// Allowed either way (e.g. a zero-length buffer, a buffer across two memory regions, more
    /// discard segments than advertised); when not OK, what it may have written is unknown.
    Either,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Outcome {
    /// Popped, not yet in the used ring.
    Pending,
    Ok,
    Failed,
    NoStatus,
    /// In the used ring, but its status cannot be trusted (raced, or an ambiguous head).
    Unknown,
    /// Head outside the queue: cannot be returned.
    Never,
}

/// One popped chain.
#[derive(Debug)]
struct Rec {
    queue: usize,
    head: u16,
    /// Device call that popped it and the one after which its used entry was seen.
    pop: u32,
    answer: Option<u32>,
    descs: Vec<D>,
    /// Guest ranges the device may write for this chain.
    w: Vec<(u64, u64)>,
    writable_total: u64,
    status: Option<u64>,
    /// Guest ranges holding the 16 header bytes.
    header: Vec<(u64, u64)>,
    op: Option<Op>,
    /// False when another request may have overwritten the header or segment list before the
    /// device read it: then what this request did is unknown.
    op_known: bool,
    sector: u64,
    data: Vec<D>,
    total: u64,
    /// OUT: the bytes it carried (read just before the device popped it), and which of
    /// them nobody else may have changed before the device read them (1) or not (0).
    payload: Vec<u8>,
    payload_known: Vec<u8>,
    /// DISCARD / WRITE_ZEROES: (sector, sectors, flags), the data buffers read as one array.
    segs: Vec<(u64, u32, u32)>,
    expect: Expect,
    outcome: Outcome,
    ambiguous: bool,
    used_len: u32,
}

impl Rec {
    fn settled(&self) -> bool {
        self.outcome != Outcome::Pending
    }

    fn modifying(&self) -> bool {
        matches!(self.op, Some(Op::Out | Op::Discard | Op::WriteZeroes))
    }

    /// Could have changed the disk (as far as is known now).
    fn may_modify(&self) -> bool {
        if !self.op_known {
            return true;
        }
        if !self.modifying() {
            return false;
        }
        match self.outcome {
            Outcome::Ok | Outcome::Unknown | Outcome::Pending => true,
            Outcome::Failed => self.expect == Expect::Either,
            Outcome::NoStatus | Outcome::Never => false,
        }
    }

    /// Orders everything before and after it (the device drains all queues first and runs it
    /// before starting anything later).
    fn barrier(&self) -> bool {
        self.op_known
            && !self.ambiguous
            && self.outcome == Outcome::Ok
            && matches!(self.op, Some(Op::Flush | Op::Discard | Op::WriteZeroes))
    }
}

/// Limits from the device's config space.
#[derive(Debug, Clone, Copy)]
struct Limits {
    capacity: u64,
    size_max: u32,
    seg_max: u32,
    max_discard_sectors: u32,
    max_discard_seg: u32,
    max_wz_sectors: u32,
    max_wz_seg: u32,
}

/// What a request does to the disk: `(start, end, fill)`; later pieces override earlier ones.
#[derive(Debug, Clone, Copy)]
enum Fill {
    /// The payload of the record, byte `pos - origin`.
    Payload(u64),
    Zero,
    Unknown,
}

type Piece = (u64, u64, Fill);

/// A window of the disk model: `vals`/`known` (1 = known) cover `[base, base + vals.len())`.
struct View<'a> {
    base: u64,
    vals: &'a mut [u8],
    known: &'a mut [u8],
}

impl View<'_> {
    /// Applies `pieces` of a request whose payload is `payload` / `pknown`.
    fn apply(&mut self, pieces: &[Piece], payload: &[u8], pknown: &[u8]) {
        let end = self.base + self.vals.len() as u64;
        for &(s, e, fill) in pieces {
            let (s, e) = (s.max(self.base), e.min(end));
            if s >= e {
                continue;
            }
            let (a, b) = ((s - self.base) as usize, (e - self.base) as usize);
            match fill {
                Fill::Payload(origin) => {
                    let pa = ((s - origin) as usize).min(payload.len());
                    let pb = ((e - origin) as usize).min(payload.len());
                    let n = pb - pa;
                    self.vals[a..a + n].copy_from_slice(&payload[pa..pb]);
                    self.known[a..a + n].copy_from_slice(&pknown[pa..pb]);
                    self.known[a + n..b].fill(0);
                }
                Fill::Zero => {
                    self.vals[a..b].fill(0);
                    self.known[a..b].fill(1);
                }
                Fill::Unknown => self.known[a..b].fill(0),
            }
        }
    }
}

/// Clears `known` (indexed like the concatenated `data` buffers) where a buffer's guest bytes
/// fall in one of `ranges`.
fn mask_guest(data: &[D], ranges: &[(u64, u64)], known: &mut [u8]) {
    let mut pos = 0usize;
    for d in data {
        let (ds, de) = d.range();
        for &(cs, ce) in ranges {
            let (s, e) = (cs.max(ds), ce.min(de));
            if s < e {
                let a = (pos + (s - ds) as usize).min(known.len());
                let b = (pos + (e - ds) as usize).min(known.len());
                known[a..b].fill(0);
            }
        }
        pos += d.len as usize;
    }
}

/// First position where `got` differs from `want` at a known position.
fn first_mismatch(got: &[u8], want: &[u8], known: &[u8]) -> Option<usize> {
    const CHUNK: usize = 4096;
    for (c, (g, w)) in got.chunks(CHUNK).zip(want.chunks(CHUNK)).enumerate() {
        if g == w {
            continue;
        }
        let k = &known[c * CHUNK..c * CHUNK + g.len()];
        if let Some(i) = (0..g.len()).find(|&i| k[i] != 0 && g[i] != w[i]) {
            return Some(c * CHUNK + i);
        }
    }
    None
}

// ---------------------------------------------------------------------------------------------
// The harness.

struct Harness {
    lay: Layout,
    mem: GuestMemoryMmap,
    /// The driver's copy of each queue's state, popped just before the device pops.
    mirror_q: Vec<Queue>,
    dev: VirtioBlk,
    notified: Arc<[AtomicU32; 2]>,
    uring: bool,
    read_only: bool,
    event_idx: bool,
    limits: Limits,
    disk_size: u64,
    seed: u64,
    calls: u32,
    /// Driver writes into guest memory: (time = index of the next device call, range).
    driver_writes: Vec<(u32, (u64, u64))>,
    records: Vec<Rec>,
    /// Records `[0, applied)` are folded into the model.
    applied: usize,
    model: Vec<u8>,
    /// 1 where the model knows the disk's byte.
    known: Vec<u8>,
    model_ok: bool,
    /// The used rings or the chains popped can no longer be trusted: only crash, hang and
    /// read-only checks remain.
    unchecked: bool,
    // Driver state.
    avail_idx: Vec<u16>,
    last_used: Vec<u16>,
    next_desc: Vec<u16>,
    cursor: u64,
    counter: u64,
}

impl Harness {
    /// Writes driver bytes into guest memory (skipping the used rings, which the device owns).
    fn poke(&mut self, addr: u64, bytes: &[u8]) {
        let want = span(addr, bytes.len() as u64);
        let used: Vec<(u64, u64)> = (0..self.lay.nq).map(|q| self.lay.used_area(q)).collect();
        for r in self.lay.regions.clone() {
            if !overlap(want, r) {
                continue;
            }
            let (s, e) = (want.0.max(r.0), want.1.min(r.1));
            // Cut out the used rings.
            let mut pieces = vec![(s, e)];
            for &u in &used {
                pieces = pieces
                    .into_iter()
                    .flat_map(|p| {
                        if !overlap(p, u) {
                            return vec![p];
                        }
                        let mut v = Vec::new();
                        if p.0 < u.0 {
                            v.push((p.0, u.0));
                        }
                        if u.1 < p.1 {
                            v.push((u.1, p.1));
                        }
                        v
                    })
                    .collect();
            }
            for (ps, pe) in pieces {
                let b = &bytes[(ps - addr) as usize..(pe - addr) as usize];
                self.mem
                    .write_slice(b, GuestAddress(ps))
                    .expect("write guest memory");
                self.driver_writes.push((self.calls, (ps, pe)));
            }
        }
    }

    fn alloc(&mut self, len: u64, align: u64) -> u64 {
        let top = self.lay.top();
        let mut a = self.cursor.next_multiple_of(align);
        if a.saturating_add(len) > top {
            a = DATA_START.next_multiple_of(align);
        }
        if !self.lay.one_region(a, len) && self.lay.regions.len() == 2 {
            let second = self.lay.regions[1];
            let gap = second.0 > self.lay.regions[0].1;
            if gap && a < second.0 {
                a = second.0.next_multiple_of(align);
            }
        }
        self.cursor = a.saturating_add(len);
        a
    }

    fn write_desc(&mut self, q: usize, idx: u16, d: (u64, u32, u16, u16)) {
        let at = self.lay.desc(q) + 16 * u64::from(idx % self.lay.qsize);
        self.poke(at, &desc_bytes(d));
    }

    fn publish(&mut self, q: usize, head: u16) {
        let slot = u64::from(self.avail_idx[q] % self.lay.qsize);
        self.poke(self.lay.avail(q) + 4 + 2 * slot, &head.to_le_bytes());
        self.avail_idx[q] = self.avail_idx[q].wrapping_add(1);
        self.poke(self.lay.avail(q) + 2, &self.avail_idx[q].to_le_bytes());
    }

    /// The same request cut into other descriptors (virtio 1.x lets a driver frame it as it
    /// likes): the readable bytes copied to one place and split at an input-chosen point, the
    /// writable ones likewise (so a header may share a buffer with data, or be split, and the
    /// status may end a data buffer), and an empty buffer at a wild address in between. A chain
    /// with a buffer outside memory is left as it is.
    fn reframe(&mut self, chain: Vec<(u64, u32, u16)>, inp: &mut Input) -> Vec<(u64, u32, u16)> {
        let w = VRING_DESC_F_WRITE as u16;
        if !chain
            .iter()
            .all(|&(a, l, _)| self.lay.in_mem(a, u64::from(l)))
        {
            return chain;
        }
        let mut out = Vec::new();
        for write in [false, true] {
            let bytes: Vec<u8> = chain
                .iter()
                .filter(|c| (c.2 & w != 0) == write)
                .flat_map(|&(a, l, _)| self.lay.read(&self.mem, a, l as usize))
                .collect();
            if bytes.is_empty() {
                continue;
            }
            let at = self.alloc(bytes.len() as u64, 1);
            self.poke(at, &bytes);
            let len = bytes.len() as u32;
            let split = u32::from(inp.u8()) * 97 % len;
            let flags = if write { w } else { 0 };
            if split > 0 {
                out.push((at, split, flags));
            }
            if inp.u8() & 1 != 0 {
                out.push((0xdead_beef_0000, 0, flags));
            }
            out.push((at + u64::from(split), len - split, flags));
        }
        out
    }

    /// Op 0: a request chain built from a few input bytes, published.
    fn op_request(&mut self, inp: &mut Input) {
        let (b0, b1) = (inp.u8(), inp.u8());
        let q = usize::from(b0 & 1) % self.lay.nq;
        let kind = (b0 >> 1) & 7;
        let indirect = b0 & 0x10 != 0;
        let variant = b0 >> 5;
        let align = [512u64, 4096, 16, 1][usize::from(b1 & 3)];
        let explicit = b1 & 4 != 0;
        let dup = b1 & 8 != 0;
        let cap = self.limits.capacity;
        let type_ = match kind {
            0 => VIRTIO_BLK_T_IN,
            1 | 6 => VIRTIO_BLK_T_OUT,
            2 => VIRTIO_BLK_T_FLUSH,
            3 => VIRTIO_BLK_T_GET_ID,
            4 => VIRTIO_BLK_T_DISCARD,
            5 => VIRTIO_BLK_T_WRITE_ZEROES,
            _ => inp.u32(),
        };
        let device_writes = matches!(type_, VIRTIO_BLK_T_IN | VIRTIO_BLK_T_GET_ID);
        let data_write = device_writes != (variant == 6);
        let mut sector = 0u64;
        let mut data: Vec<(u64, u32)> = Vec::new();
        let seg_count = |n: u8| if n >= 0xFC { 129 } else { usize::from(n % 4) };
        match type_ {
            VIRTIO_BLK_T_DISCARD | VIRTIO_BLK_T_WRITE_ZEROES => {
                let n = usize::from(inp.u8() % 4);
                let mut list = Vec::with_capacity(16 * n);
                for _ in 0..n {
                    let s = u64::from(inp.u16()) % (cap + 8);
                    let v = inp.u16();
                    let num = if v >= 0xFFF0 {
                        self.limits.max_discard_sectors + 1
                    } else {
                        u32::from(v % 64)
                    };
                    let flags = u32::from(inp.u8() & 3);
                    list.extend(s.to_le_bytes());
                    list.extend(num.to_le_bytes());
                    list.extend(flags.to_le_bytes());
                }
                let at = self.alloc(list.len() as u64, 16);
                self.poke(at, &list);
                let len = list.len() as u32;
                if variant == 7 && len > 0 {
                    // Segments split across descriptors at a point inside a segment.
                    let cut = if len > 16 { 20 } else { 4 };
                    data.push((at, cut));
                    data.push((at + u64::from(cut), len - cut));
                } else {
                    for i in 0..n as u64 {
                        data.push((at + 16 * i, 16));
                    }
                }
            }
            _ => {
                sector = u64::from(inp.u16()) % (cap + 8);
                let count = seg_count(inp.u8());
                let mut lens = Vec::with_capacity(count);
                let mut addrs = Vec::with_capacity(count);
                for _ in 0..count {
                    let b = inp.u8();
                    lens.push(if type_ == VIRTIO_BLK_T_GET_ID {
                        1 + u32::from(b % 32)
                    } else {
                        (1 + u32::from(b % 16)) * SECTOR as u32
                    });
                    addrs.push(
                        explicit.then(|| u64::from(inp.u16()) * 4 % (self.lay.top() + 0x1000)),
                    );
                }
                if variant == 7 && count >= 2 && lens[count - 1] > 100 {
                    // Whole sectors in all, but not per descriptor.
                    lens[0] += 100;
                    lens[count - 1] -= 100;
                }
                for (len, addr) in lens.into_iter().zip(addrs) {
                    let at = addr.unwrap_or_else(|| self.alloc(u64::from(len), align));
                    if data_write {
                        self.poke(at, &vec![0xEE; len as usize]);
                    } else {
                        self.counter += 1;
                        let fill = pattern(self.seed ^ (self.counter << 20), len as usize);
                        self.poke(at, &fill);
                    }
                    data.push((at, len));
                }
            }
        }
        let header = self.alloc(16, 16);
        let mut h = [0u8; 16];
        h[0..4].copy_from_slice(&type_.to_le_bytes());
        h[8..16].copy_from_slice(&sector.to_le_bytes());
        self.poke(header, &h);
        let status = self.alloc(1, 1);
        self.poke(status, &[0xFF]);
        let w = VRING_DESC_F_WRITE as u16;
        let mut chain: Vec<(u64, u32, u16)> = Vec::new();
        chain.push((header, 16, if variant == 4 { w } else { 0 }));
        for (a, l) in data {
            chain.push((a, l, if data_write { w } else { 0 }));
        }
        chain.push((status, 1, if variant == 5 { 0 } else { w }));
        if b1 & 0x10 != 0 && variant < 4 {
            chain = self.reframe(chain, inp);
        }
        let k = chain.len() as u16;
        let head = self.next_desc[q] % self.lay.qsize;
        if indirect {
            let table = self.alloc(16 * u64::from(k), 16);
            let mut bytes = Vec::with_capacity(16 * usize::from(k));
            for (i, &(a, l, f)) in chain.iter().enumerate() {
                let next = i as u16 + 1;
                let f = if next < k {
                    f | VRING_DESC_F_NEXT as u16
                } else {
                    f
                };
                bytes.extend(desc_bytes((a, l, f, next)));
            }
            self.poke(table, &bytes);
            self.write_desc(
                q,
                head,
                (table, 16 * u32::from(k), VRING_DESC_F_INDIRECT as u16, 0),
            );
            self.next_desc[q] = self.next_desc[q].wrapping_add(1);
        } else {
            for (i, &(a, l, f)) in chain.iter().enumerate() {
                let idx = head.wrapping_add(i as u16) % self.lay.qsize;
                let next = idx.wrapping_add(1) % self.lay.qsize;
                let f = if i + 1 < chain.len() {
                    f | VRING_DESC_F_NEXT as u16
                } else {
                    f
                };
                self.write_desc(q, idx, (a, l, f, next));
            }
            self.next_desc[q] = self.next_desc[q].wrapping_add(k);
        }
        self.publish(q, head);
        if dup {
            self.publish(q, head);
        }
    }

    // -- device calls -------------------------------------------------------------------------

    /// `process_queue(q)`, with the chains it pops worked out beforehand.
    fn kick(&mut self, q: usize) {
        // The mirror queue pops the chains the device is about to pop (popping only reads
        // guest memory; what a request in flight may write meanwhile is accounted for below).
        let call = self.calls;
        // A request in flight may write into the indirect tables read now.
        let table = self.lay.read(
            &self.mem,
            self.lay.desc(q),
            16 * usize::from(self.lay.qsize),
        );
        let tables: Vec<(u64, u64)> = table
            .chunks_exact(16)
            .filter_map(|b| {
                let flags = u16::from_le_bytes([b[12], b[13]]);
                (u32::from(flags) & VRING_DESC_F_INDIRECT != 0).then(|| {
                    let addr = u64::from_le_bytes(b[0..8].try_into().expect("8"));
                    let len = u32::from_le_bytes(b[8..12].try_into().expect("4"));
                    span(addr, u64::from(len))
                })
            })
            .collect();
        if self
            .records
            .iter()
            .filter(|r| r.answer.is_none())
            .any(|r| r.w.iter().any(|&w| tables.iter().any(|&t| overlap(w, t))))
        {
            self.unchecked = true;
        }
        let mut popped = Vec::new();
        while let Some(chain) = self.mirror_q[q].pop_descriptor_chain(&self.mem) {
            let head = chain.head_index();
            let descs: Vec<D> = chain
                .map(|d: Descriptor| D {
                    addr: d.addr().0,
                    len: d.len(),
                    write: d.is_write_only(),
                })
                .collect();
            popped.push((head, descs));
        }
        let first_new = self.records.len();
        for (head, descs) in popped {
            let rec = self.classify(q, head, call, descs);
            self.records.push(rec);
        }
        if self.records.len() > MAX_RECORDS {
            self.unchecked = true;
        }
        let rings = self.lay.ring_areas();
        if self.records[first_new..]
            .iter()
            .any(|r| r.w.iter().any(|&w| rings.iter().any(|&x| overlap(w, x))))
        {
            self.unchecked = true;
        }
        // Whether each new request read its header and segments before anyone overwrote them.
        if !self.unchecked {
            for i in first_new..self.records.len() {
                let r = &self.records[i];
                let mut reads: Vec<(u64, u64)> = r.header.clone();
                if matches!(r.op, Some(Op::Discard | Op::WriteZeroes)) {
                    reads.extend(r.data.iter().map(D::range));
                }
                let used: Vec<(u64, u64)> =
                    (0..self.lay.nq).map(|q| self.lay.used_area(q)).collect();
                let clobbered = used.iter().any(|&u| reads.iter().any(|&x| overlap(u, x)))
                    || self.records.iter().enumerate().any(|(j, b)| {
                        j != i
                            && b.pop <= call
                            && b.answer.is_none()
                            && (b.pop < call || j < i)
                            && b.w.iter().any(|&w| reads.iter().any(|&x| overlap(w, x)))
                    });
                if clobbered {
                    self.records[i].op_known = false;
                    if !self.read_only {
                        self.model_ok = false;
                    }
                }
            }
        }
        let before = self.ring_state();
        self.dev
            .process_queue(q as u16)
            .unwrap_or_else(|e| panic!("process_queue({q}) failed: {e}"));
        self.calls += 1;
        self.after_call(call, before);
    }

    fn complete(&mut self, wait: bool) {
        let call = self.calls;
        let before = self.ring_state();
        self.dev
            .process_completions(wait)
            .unwrap_or_else(|e| panic!("process_completions failed: {e}"));
        self.calls += 1;
        self.after_call(call, before);
    }

    fn ring_state(&self) -> Vec<(u16, u32)> {
        (0..self.lay.nq)
            .map(|q| {
                (
                    self.lay.peek_u16(&self.mem, self.lay.used(q) + 2),
                    self.notified[q].load(Ordering::SeqCst),
                )
            })
            .collect()
    }

    /// Reads the used rings after device call `call` and checks every chain it returned.
    fn after_call(&mut self, call: u32, before: Vec<(u16, u32)>) {
        if self.unchecked {
            return;
        }
        let size = self.lay.qsize;
        let mut answered = Vec::new();
        for (q, &(old_used, old_notes)) in before.iter().enumerate() {
            let new_used = self.lay.peek_u16(&self.mem, self.lay.used(q) + 2);
            assert_eq!(
                old_used, self.last_used[q],
                "queue {q}: the used index moved between device calls"
            );
            let n = new_used.wrapping_sub(old_used);
            if n > size {
                // More entries than the ring holds: the overwritten ones cannot be read.
                self.unchecked = true;
                return;
            }
            for k in 0..n {
                let slot = u64::from(old_used.wrapping_add(k) % size);
                let at = self.lay.used(q) + 4 + 8 * slot;
                let id = self.lay.peek_u32(&self.mem, at);
                let len = self.lay.peek_u32(&self.mem, at + 4);
                assert!(
                    id < u32::from(size),
                    "queue {q}: used entry names descriptor {id}, outside a queue of {size}"
                );
                let matching: Vec<usize> = self
                    .records
                    .iter()
                    .enumerate()
                    .filter(|(_, r)| {
                        r.queue == q
                            && u32::from(r.head) == id
                            && r.answer.is_none()
                            && r.outcome != Outcome::Never
                    })
                    .map(|(i, _)| i)
                    .collect();
                let Some(&first) = matching.first() else {
                    panic!(
                        "queue {q}: used entry names head {id}, which is not outstanding \
                         (never made available, or returned twice)"
                    );
                };
                if matching.len() > 1 {
                    for &i in &matching {
                        self.records[i].ambiguous = true;
                    }
                }
                let r = &mut self.records[first];
                r.answer = Some(call);
                r.used_len = len;
                answered.push(first);
            }
            // Interrupts: needed unless suppressed by used_event (EVENT_IDX).
            if n > 0 {
                let needed = if self.event_idx {
                    let used_event = self
                        .lay
                        .peek_u16(&self.mem, self.lay.avail(q) + 4 + 2 * u64::from(size));
                    new_used.wrapping_sub(used_event).wrapping_sub(1) < n
                } else {
                    true
                };
                if needed {
                    assert!(
                        self.notified[q].load(Ordering::SeqCst) != old_notes,
                        "queue {q}: used index went {old_used} -> {new_used} without the \
                         interrupt the driver asked for"
                    );
                }
            }
            self.last_used[q] = new_used;
        }
        for i in answered {
            self.check_answer(i);
        }
        self.fold();
    }

    /// Guest ranges other requests in flight at the same time as `i` may write, plus (with
    /// `driver`) what the driver wrote while `i` was in flight.
    fn clobbers(&self, i: usize, driver: bool) -> Vec<(u64, u64)> {
        let a = &self.records[i];
        let (ap, aa) = (a.pop, a.answer.unwrap_or(u32::MAX));
        let mut v: Vec<(u64, u64)> = self
            .records
            .iter()
            .enumerate()
            .filter(|&(j, b)| j != i && b.pop <= aa && ap <= b.answer.unwrap_or(u32::MAX))
            .flat_map(|(_, b)| b.w.iter().copied())
            .collect();
        // The device rewrites the used rings (entries, flags, avail_event) at any call.
        v.extend((0..self.lay.nq).map(|q| self.lay.used_area(q)));
        if driver {
            v.extend(
                self.driver_writes
                    .iter()
                    .filter(|&&(t, _)| ap < t && t <= aa)
                    .map(|&(_, r)| r),
            );
        }
        v
    }

    fn check_answer(&mut self, i: usize) {
        let r = &self.records[i];
        let writable_total = r.writable_total;
        let used_len = r.used_len;
        let what = format!(
            "queue {} head {} ({:?} sector {}, {} data bytes in {} buffers, expected {:?})",
            r.queue,
            r.head,
            r.op,
            r.sector,
            r.total,
            r.data.len(),
            r.expect
        );
        if r.ambiguous {
            // Another chain with the same head was outstanding: this entry may be its.
            self.records[i].outcome = Outcome::Unknown;
            return;
        }
        assert!(
            u64::from(used_len) <= writable_total,
            "{what}: used length {used_len} exceeds the {writable_total} device-writable bytes"
        );
        let Some(status_at) = r.status else {
            assert_eq!(
                used_len, 0,
                "{what}: a chain without a usable status byte was returned with a length"
            );
            self.records[i].outcome = Outcome::NoStatus;
            return;
        };
        let status_range = span(status_at, 1);
        if self
            .clobbers(i, false)
            .iter()
            .any(|&c| overlap(c, status_range))
        {
            self.records[i].outcome = Outcome::Unknown;
            return;
        }
        let status = self.lay.peek(&self.mem, status_at, 1)[0].expect("status in memory");
        assert!(
            matches!(
                u32::from(status),
                VIRTIO_BLK_S_OK | VIRTIO_BLK_S_IOERR | VIRTIO_BLK_S_UNSUPP
            ),
            "{what}: status byte {status:#x} is not OK, IOERR or UNSUPP (used length {used_len})"
        );
        let ok = u32::from(status) == VIRTIO_BLK_S_OK;
        assert!(used_len >= 1, "{what}: answered with used length 0");
        if !r.op_known {
            self.records[i].outcome = if ok { Outcome::Ok } else { Outcome::Unknown };
            return;
        }
        match r.expect {
            Expect::MustOk => assert!(ok, "{what}: well-formed request answered {status}"),
            Expect::MustFail => {
                assert!(!ok, "{what}: answered OK");
                assert_eq!(used_len, 1, "{what}: rejected with used length {used_len}");
            }
            Expect::Either | Expect::NoStatus => {}
        }
        if ok {
            let want = match r.op {
                Some(Op::In) => r.total + 1,
                Some(Op::GetId) => r.total.min(u64::from(VIRTIO_BLK_ID_BYTES)) + 1,
                _ => 1,
            };
            assert_eq!(
                u64::from(used_len),
                want,
                "{what}: answered OK with used length {used_len}"
            );
        }
        self.records[i].outcome = if ok { Outcome::Ok } else { Outcome::Failed };
        if !ok {
            return;
        }
        match self.records[i].op {
            Some(Op::In) => self.check_in(i),
            Some(Op::GetId) => self.check_get_id(i),
            Some(Op::Out) => {
                // The bytes it carried, less those someone else may have changed meanwhile.
                let clob = self.clobbers(i, true);
                let r = &mut self.records[i];
                mask_guest(&r.data, &clob, &mut r.payload_known);
            }
            _ => {}
        }
    }

    /// Guest bytes of request `i`'s data buffers that it alone wrote: not written by another
    /// request in flight or by the driver meanwhile, not its own status byte, not covered by
    /// two of its buffers.
    fn own_bytes(&self, i: usize) -> Vec<(u64, u64)> {
        let r = &self.records[i];
        let mut c = self.clobbers(i, true);
        if let Some(s) = r.status {
            c.push(span(s, 1));
        }
        for (x, a) in r.data.iter().enumerate() {
            for b in &r.data[x + 1..] {
                let (ra, rb) = (a.range(), b.range());
                if overlap(ra, rb) {
                    c.push((ra.0.max(rb.0), ra.1.min(rb.1)));
                }
            }
        }
        c
    }

    fn check_get_id(&mut self, i: usize) {
        let skip = self.own_bytes(i);
        let r = &self.records[i];
        let mut id = [0u8; VIRTIO_BLK_ID_BYTES as usize];
        id[..ID.len()].copy_from_slice(ID.as_bytes());
        let mut pos = 0usize;
        for d in &r.data {
            let take = (d.len as usize).min(id.len() - pos);
            let got = self.lay.peek(&self.mem, d.addr, take);
            for (k, g) in got.into_iter().enumerate() {
                let c = d.addr + k as u64;
                if skip.iter().any(|&x| x.0 <= c && c < x.1) {
                    continue;
                }
                assert_eq!(
                    g,
                    Some(id[pos + k]),
                    "GET_ID (queue {} head {}): id byte {} wrong",
                    r.queue,
                    r.head,
                    pos + k
                );
            }
            pos += take;
        }
    }

    fn check_in(&mut self, i: usize) {
        if !self.model_ok {
            return;
        }
        let skip = self.own_bytes(i);
        let r = &self.records[i];
        let base = r.sector * SECTOR;
        let mut vals = self.model[base as usize..(base + r.total) as usize].to_vec();
        let mut known = self.known[base as usize..(base + r.total) as usize].to_vec();
        let mut view = View {
            base,
            vals: &mut vals,
            known: &mut known,
        };
        // The disk as this read found it: everything settled before it, except what may
        // still have been in flight, and whatever ran alongside it.
        for j in self.applied..self.records.len() {
            if j == i {
                continue;
            }
            let o = &self.records[j];
            let pieces = if j < i && o.settled() && !self.concurrent(j, i) {
                self.effect(j)
            } else if j < i || self.concurrent(i, j) {
                self.possible(j)
            } else {
                Some(Vec::new())
            };
            let Some(pieces) = pieces else {
                return;
            };
            view.apply(&pieces, &o.payload, &o.payload_known);
        }
        mask_guest(&r.data, &skip, &mut known);
        let mut got = Vec::with_capacity(r.total as usize);
        for d in &r.data {
            got.extend(self.lay.read(&self.mem, d.addr, d.len as usize));
        }
        if let Some(at) = first_mismatch(&got, &vals, &known) {
            panic!(
                "IN (queue {} head {}, sector {}, {} bytes in {} buffers): disk byte {} read as \
                 {:#04x} into guest memory, the model says {:#04x}",
                r.queue,
                r.head,
                r.sector,
                r.total,
                r.data.len(),
                base + at as u64,
                got[at],
                vals[at]
            );
        }
    }

    /// Requests `a` and `b` may have run at the same time (io_uring only): their windows
    /// overlap and no ordering point separates them.
    fn concurrent(&self, a: usize, b: usize) -> bool {
        if !self.uring || a == b {
            return false;
        }
        let (x, y) = (a.min(b), a.max(b));
        let (rx, ry) = (&self.records[x], &self.records[y]);
        if rx.barrier() || ry.barrier() {
            return false;
        }
        if rx.answer.is_some_and(|c| c < ry.pop) {
            return false;
        }
        !self.records[x + 1..y].iter().any(Rec::barrier)
    }

    /// Disk ranges request `i` may have changed; `None` if unknown (its header was raced).
    fn ranges(&self, i: usize) -> Option<Vec<(u64, u64)>> {
        let r = &self.records[i];
        if !r.op_known {
            return if self.read_only {
                Some(Vec::new())
            } else {
                None
            };
        }
        let clip = |s: u64, n: u64| -> Option<(u64, u64)> {
            let s = s.checked_mul(SECTOR)?;
            let e = s
                .saturating_add(n.saturating_mul(SECTOR))
                .min(self.disk_size);
            (s < e).then_some((s, e))
        };
        Some(match r.op {
            Some(Op::Out) => clip(r.sector, r.total / SECTOR + 1).into_iter().collect(),
            Some(Op::Discard | Op::WriteZeroes) => r
                .segs
                .iter()
                .filter_map(|&(s, n, _)| clip(s, u64::from(n)))
                .collect(),
            _ => Vec::new(),
        })
    }

    /// `i`'s possible changes, all unknown.
    fn possible(&self, i: usize) -> Option<Vec<Piece>> {
        if !self.records[i].may_modify() {
            return Some(Vec::new());
        }
        Some(
            self.ranges(i)?
                .into_iter()
                .map(|(s, e)| (s, e, Fill::Unknown))
                .collect(),
        )
    }

    /// What settled request `i` did to the disk.
    fn effect(&self, i: usize) -> Option<Vec<Piece>> {
        let r = &self.records[i];
        if r.outcome != Outcome::Ok || !r.op_known {
            return self.possible(i);
        }
        let sec = |s: u64| s.saturating_mul(SECTOR);
        let mut pieces: Vec<Piece> = match r.op {
            Some(Op::Out) => {
                let s = sec(r.sector);
                vec![(s, s.saturating_add(r.total), Fill::Payload(s))]
            }
            Some(Op::Discard | Op::WriteZeroes) => r
                .segs
                .iter()
                .map(|&(s, n, _)| (sec(s), sec(s.saturating_add(u64::from(n))), Fill::Zero))
                .collect(),
            _ => return Some(Vec::new()),
        };
        // Where a request running alongside also wrote, either may have landed last.
        let own: Vec<(u64, u64)> = pieces.iter().map(|p| (p.0, p.1)).collect();
        for j in 0..self.records.len() {
            if j != i && self.records[j].may_modify() && self.concurrent(i, j) {
                for o in self.ranges(j)? {
                    for &m in &own {
                        if overlap(o, m) {
                            pieces.push((o.0.max(m.0), o.1.min(m.1), Fill::Unknown));
                        }
                    }
                }
            }
        }
        Some(pieces)
    }

    /// Folds settled requests, in submission order, into the model.
    fn fold(&mut self) {
        while self.applied < self.records.len() && self.records[self.applied].settled() {
            let i = self.applied;
            if self.model_ok {
                match self.effect(i) {
                    Some(pieces) => {
                        let mut view = View {
                            base: 0,
                            vals: &mut self.model,
                            known: &mut self.known,
                        };
                        let r = &self.records[i];
                        view.apply(&pieces, &r.payload, &r.payload_known);
                    }
                    None => self.model_ok = false,
                }
            }
            self.applied += 1;
        }
    }

    /// The harness's own reading of a popped chain (the readable bytes, then the writable ones,
    /// each read as one array however the descriptors cut them: header first, status the last
    /// writable byte, data between).
    fn classify(&self, queue: usize, head: u16, pop: u32, descs: Vec<D>) -> Rec {
        // virtio 1.x framing: the request is the device-readable bytes followed by the
        // device-writable ones, however the chain cuts them; empty buffers count for nothing.
        let readable: Vec<D> = descs
            .iter()
            .filter(|d| !d.write && d.len > 0)
            .copied()
            .collect();
        let writable: Vec<D> = descs
            .iter()
            .filter(|d| d.write && d.len > 0)
            .copied()
            .collect();
        let rlen: u64 = readable.iter().map(|d| u64::from(d.len)).sum();
        let wlen: u64 = writable.iter().map(|d| u64::from(d.len)).sum();
        let mut rec = Rec {
            queue,
            head,
            pop,
            answer: None,
            descs: Vec::new(),
            w: writable.iter().map(D::range).collect(),
            writable_total: wlen,
            status: None,
            header: Vec::new(),
            op: None,
            op_known: true,
            sector: 0,
            data: Vec::new(),
            total: 0,
            payload: Vec::new(),
            payload_known: Vec::new(),
            segs: Vec::new(),
            expect: Expect::NoStatus,
            outcome: if head >= self.lay.qsize {
                Outcome::Never
            } else {
                Outcome::Pending
            },
            ambiguous: false,
            used_len: 0,
        };
        // The status: the last writable byte.
        match writable
            .last()
            .and_then(|d| d.addr.checked_add(u64::from(d.len) - 1))
        {
            Some(at) if self.lay.in_mem(at, 1) => rec.status = Some(at),
            _ => {
                rec.descs = descs;
                return rec;
            }
        }
        let fail = |mut rec: Rec, descs: Vec<D>| {
            rec.expect = Expect::MustFail;
            rec.descs = descs;
            rec
        };
        let first_w = descs.iter().position(|d| d.write && d.len > 0);
        let misordered = first_w.is_some_and(|i| descs[i..].iter().any(|d| !d.write && d.len > 0));
        let header = cut(&readable, 0, 16);
        let header_ok = rlen >= 16
            && header
                .as_ref()
                .is_some_and(|h| h.iter().all(|d| self.lay.in_mem(d.addr, u64::from(d.len))));
        if misordered || !header_ok {
            return fail(rec, descs);
        }
        let header = header.expect("checked");
        rec.header = header.iter().map(D::range).collect();
        let raw: Vec<u8> = header
            .iter()
            .flat_map(|d| self.lay.peek(&self.mem, d.addr, d.len as usize))
            .map(|b| b.unwrap_or(0))
            .collect();
        let type_ = u32::from_le_bytes(raw[0..4].try_into().expect("4"));
        let sector = u64::from_le_bytes(raw[8..16].try_into().expect("8"));
        let op = match type_ {
            VIRTIO_BLK_T_IN => Op::In,
            VIRTIO_BLK_T_OUT => Op::Out,
            VIRTIO_BLK_T_FLUSH => Op::Flush,
            VIRTIO_BLK_T_GET_ID => Op::GetId,
            VIRTIO_BLK_T_DISCARD => Op::Discard,
            VIRTIO_BLK_T_WRITE_ZEROES => Op::WriteZeroes,
            other => Op::Other(other),
        };
        // Data: writable bytes before the status (IN, GET_ID) or readable bytes after the
        // header (OUT, DISCARD, WRITE_ZEROES); bytes on the other side make the request
        // malformed. FLUSH and unknown types carry none (other bytes are ignored).
        let (data, misplaced) = match op {
            Op::In | Op::GetId => (cut(&writable, 0, wlen - 1), rlen > 16),
            Op::Out | Op::Discard | Op::WriteZeroes => (cut(&readable, 16, rlen), wlen > 1),
            Op::Flush | Op::Other(_) => (Some(Vec::new()), false),
        };
        let Some(data) = data else {
            return fail(rec, descs);
        };
        let total: u64 = data.iter().map(|d| u64::from(d.len)).sum();
        let l = self.limits;
        let limits_ok =
            data.len() <= l.seg_max as usize && data.iter().all(|d| d.len <= l.size_max);
        let in_mem = data
            .iter()
            .all(|d| self.lay.in_mem(d.addr, u64::from(d.len)));
        let one_region = data
            .iter()
            .all(|d| self.lay.one_region(d.addr, u64::from(d.len)));
        // The data bytes as one array (only read when they are in memory and few).
        let bytes = if in_mem && total <= 4 << 20 {
            let mut v = Vec::with_capacity(total as usize);
            for d in &data {
                v.extend(self.lay.read(&self.mem, d.addr, d.len as usize));
            }
            Some(v)
        } else {
            None
        };
        let is_zeroing = matches!(op, Op::Discard | Op::WriteZeroes);
        if is_zeroing {
            if let Some(list) = &bytes {
                rec.segs = list
                    .chunks_exact(16)
                    .map(|c| {
                        (
                            u64::from_le_bytes(c[0..8].try_into().expect("8")),
                            u32::from_le_bytes(c[8..12].try_into().expect("4")),
                            u32::from_le_bytes(c[12..16].try_into().expect("4")),
                        )
                    })
                    .collect();
            }
        }
        let (max_sectors, max_seg) = if op == Op::Discard {
            (l.max_discard_sectors, l.max_discard_seg)
        } else {
            (l.max_wz_sectors, l.max_wz_seg)
        };
        // First everything that makes the device refuse the request, then what leaves it free.
        let refused = match op {
            Op::Other(_) => true,
            _ if misplaced || !limits_ok || !in_mem => true,
            Op::In | Op::Out => {
                !total.is_multiple_of(SECTOR)
                    || sector
                        .checked_add(total / SECTOR)
                        .is_none_or(|e| e > l.capacity)
                    || (op == Op::Out && self.read_only)
            }
            Op::Discard | Op::WriteZeroes => {
                self.read_only
                    || total == 0
                    || !total.is_multiple_of(16)
                    || bytes.is_none()
                    || rec.segs.iter().any(|&(s, n, _)| {
                        n > max_sectors
                            || s.checked_add(u64::from(n)).is_none_or(|e| e > l.capacity)
                    })
            }
            Op::Flush | Op::GetId => false,
        };
        let free = !one_region
            || match op {
                Op::In | Op::Out => total == 0,
                Op::Discard | Op::WriteZeroes => {
                    rec.segs.len() > max_seg as usize || rec.segs.iter().any(|s| s.1 == 0)
                }
                _ => false,
            };
        rec.expect = if refused {
            Expect::MustFail
        } else if free {
            Expect::Either
        } else {
            Expect::MustOk
        };
        if op == Op::Out && !refused {
            if let Some(b) = bytes {
                rec.payload_known = vec![1; b.len()];
                rec.payload = b;
            }
        }
        rec.op = Some(op);
        rec.sector = sector;
        rec.data = data;
        rec.total = total;
        rec.descs = descs;
        rec
    }
}

/// `VHDKIT_FUZZ_TRACE=1`: one line per input on what was checked.
fn trace() -> bool {
    static ON: OnceLock<bool> = OnceLock::new();
    *ON.get_or_init(|| std::env::var_os("VHDKIT_FUZZ_TRACE").is_some())
}

fn desc_bytes((addr, len, flags, next): (u64, u32, u16, u16)) -> [u8; 16] {
    let mut b = [0u8; 16];
    b[0..8].copy_from_slice(&addr.to_le_bytes());
    b[8..12].copy_from_slice(&len.to_le_bytes());
    b[12..14].copy_from_slice(&flags.to_le_bytes());
    b[14..16].copy_from_slice(&next.to_le_bytes());
    b
}

fn new_queue(lay: &Layout, q: usize) -> Queue {
    let mut queue = Queue::new(256).expect("a queue");
    queue.set_size(lay.qsize);
    let (d, a, u) = (lay.desc(q), lay.avail(q), lay.used(q));
    queue.set_desc_table_address(Some(d as u32), Some((d >> 32) as u32));
    queue.set_avail_ring_address(Some(a as u32), Some((a >> 32) as u32));
    queue.set_used_ring_address(Some(u as u32), Some((u >> 32) as u32));
    queue.set_ready(true);
    queue
}

/// Makes the engines, falling back to the sync engine where io_uring is unavailable.
fn make_engines(
    uring: bool,
    chain: &Arc<Mutex<block_backend::Chain>>,
    n: usize,
) -> (Vec<Box<dyn block_backend::engine::Engine>>, bool) {
    static WARNED: AtomicBool = AtomicBool::new(false);
    if uring {
        let made: Result<Vec<_>, _> = (0..n)
            .map(|_| new_shared_engine(EngineKind::IoUring, chain.clone(), 32))
            .collect();
        match made {
            Ok(v) => return (v, true),
            Err(e) => {
                if !WARNED.swap(true, Ordering::SeqCst) {
                    eprintln!("virtio_blk: io_uring unavailable ({e}); using the sync engine");
                }
            }
        }
    }
    let v = (0..n)
        .map(|_| new_shared_engine(EngineKind::Sync, chain.clone(), 32).expect("sync engine"))
        .collect();
    (v, false)
}

/// Input: see the module documentation. Panics only on a device bug (or a broken oracle).
pub fn virtio_blk(data: &[u8]) {
    let _shared = SCRATCH_LOCK.read().unwrap_or_else(PoisonError::into_inner);
    SCRATCH_USED.store(true, Ordering::SeqCst);
    std::fs::create_dir_all(scratch_dir()).expect("create the fuzz scratch directory");
    let mut inp = Input::new(data);
    let (c0, c1, seed) = (inp.u8(), inp.u8(), inp.u8());
    let want_uring = c0 & 1 != 0;
    let nq = 1 + usize::from(c0 >> 1 & 1);
    let event_idx = c0 & 4 != 0;
    let read_only = c0 & 8 != 0;
    let kind = DiskKind::from_bits(c0 >> 4);
    let fill_memory = c0 & 0x80 != 0;
    let mem_size: u64 = [64 << 10, 128 << 10, 256 << 10, 128 << 10][usize::from(c1 & 3)];
    let regions = match (c1 >> 2) & 3 {
        1 => vec![(0, mem_size / 2), (mem_size / 2, mem_size)],
        2 => vec![
            (0, mem_size / 2),
            (mem_size / 2 + 0x1000, mem_size + 0x1000),
        ],
        _ => vec![(0, mem_size)],
    };
    let qsize = [16u16, 4, 8, 32, 64, 128, 256, 2][usize::from(c1 >> 4 & 7)];
    let lay = Layout { regions, qsize, nq };

    let t = template(kind);
    let path = scratch_dir().join(format!("disk-{}.{}", thread_slot(), kind.ext()));
    write_disk(&path, t);
    let opts = if read_only {
        OpenOptions::read_only()
    } else {
        OpenOptions::read_write()
    };
    let chain = block_backend::open(&path, opts).expect("open the scratch disk");
    let disk_size = chain.size();
    assert_eq!(
        disk_size as usize,
        t.content.len(),
        "the disk's size changed"
    );
    let shared = Arc::new(Mutex::new(chain));
    let (engines, uring) = make_engines(want_uring, &shared, nq);
    drop(shared);

    let ranges: Vec<(GuestAddress, usize)> = lay
        .regions
        .iter()
        .map(|&(s, e)| (GuestAddress(s), (e - s) as usize))
        .collect();
    let mem = GuestMemoryMmap::<()>::from_ranges(&ranges).expect("guest memory");
    let notified: Arc<[AtomicU32; 2]> = Arc::new([AtomicU32::new(0), AtomicU32::new(0)]);
    let n2 = notified.clone();
    let queues = (0..nq).map(|q| new_queue(&lay, q)).collect();
    let mut dev = VirtioBlk::new(
        engines,
        mem.clone(),
        queues,
        Config { id: ID.into() },
        Box::new(move |q| {
            n2[usize::from(q) % 2].fetch_add(1, Ordering::SeqCst);
        }),
    )
    .expect("a device");
    let features = dev.device_features();
    let acked = if event_idx {
        features
    } else {
        features & !(1u64 << VIRTIO_RING_F_EVENT_IDX)
    };
    dev.set_acked_features(acked);
    assert_eq!(dev.num_queues() as usize, nq, "number of queues");

    let cfg = dev.config_space();
    let le32 = |at: usize| u32::from_le_bytes(cfg[at..at + 4].try_into().expect("4"));
    let limits = Limits {
        capacity: u64::from_le_bytes(cfg[0..8].try_into().expect("8")),
        size_max: le32(8),
        seg_max: le32(12),
        max_discard_sectors: le32(36),
        max_discard_seg: le32(40),
        max_wz_sectors: le32(48),
        max_wz_seg: le32(52),
    };
    assert_eq!(
        limits.capacity,
        disk_size / SECTOR,
        "capacity in the config space"
    );
    assert_eq!(
        usize::from(u16::from_le_bytes([cfg[34], cfg[35]])),
        nq,
        "num_queues in the config space"
    );

    let mirror_q = (0..nq).map(|q| new_queue(&lay, q)).collect();
    let mut h = Harness {
        lay,
        mem,
        mirror_q,
        dev,
        notified,
        uring,
        read_only,
        event_idx,
        limits,
        disk_size,
        seed: u64::from(seed) << 32 | u64::from(c0) << 8 | u64::from(c1),
        calls: 0,
        driver_writes: Vec::new(),
        records: Vec::new(),
        applied: 0,
        model: t.content.clone(),
        known: vec![1; t.content.len()],
        model_ok: true,
        unchecked: false,
        avail_idx: vec![0; nq],
        last_used: vec![0; nq],
        next_desc: vec![0; nq],
        cursor: DATA_START,
        counter: 0,
    };
    if fill_memory {
        let top = h.lay.top();
        let fill = pattern(h.seed, (top - DATA_START) as usize);
        h.poke(DATA_START, &fill);
    }

    for _ in 0..MAX_OPS {
        if inp.is_empty() {
            break;
        }
        match inp.u8() % 8 {
            0 => h.op_request(&mut inp),
            1 => {
                let q = usize::from(inp.u8() & 1) % nq;
                let idx = inp.u16();
                let a = inp.u32();
                let addr = if a & 0x8000_0000 != 0 {
                    u64::MAX - u64::from(a & 0xFFFF)
                } else {
                    u64::from(a) % (h.lay.top() + 0x2000)
                };
                let (len, flags, next) = (inp.u32(), inp.u16(), inp.u16());
                h.write_desc(q, idx, (addr, len, flags, next));
            }
            2 => {
                let q = usize::from(inp.u8() & 1) % nq;
                let head = inp.u16();
                h.publish(q, head);
            }
            3 => {
                let q = usize::from(inp.u8() & 1) % nq;
                let delta = inp.u16();
                h.avail_idx[q] = h.avail_idx[q].wrapping_add(delta);
                let idx = h.avail_idx[q];
                h.poke(h.lay.avail(q) + 2, &idx.to_le_bytes());
            }
            4 => {
                let addr = u64::from(inp.u32()) % (h.lay.top() + 0x1000);
                let len = usize::from(inp.u8());
                let bytes = inp.bytes(len).to_vec();
                h.poke(addr, &bytes);
            }
            5 => {
                let q = usize::from(inp.u8() & 1) % nq;
                if h.calls < MAX_CALLS {
                    h.kick(q);
                }
            }
            6 => {
                let wait = inp.u8() & 1 != 0;
                if h.calls < MAX_CALLS {
                    h.complete(wait);
                }
            }
            _ => {
                let b = inp.u8();
                let q = usize::from(b & 1) % nq;
                let v = inp.u16();
                let at = if b & 2 != 0 {
                    h.lay.avail(q)
                } else {
                    h.lay.avail(q) + 4 + 2 * u64::from(h.lay.qsize)
                };
                h.poke(at, &v.to_le_bytes());
            }
        }
    }

    // The driver stops: everything published is taken, everything taken completes.
    for q in 0..nq {
        h.kick(q);
    }
    let mut passes = 0;
    while h.dev.pending() > 0 {
        passes += 1;
        assert!(
            passes <= DRAIN_PASSES,
            "{} chains still pending after {DRAIN_PASSES} completion passes",
            h.dev.pending()
        );
        h.complete(true);
    }
    if !h.unchecked {
        for r in &h.records {
            assert!(
                r.outcome != Outcome::Pending,
                "queue {} head {} was popped and never returned",
                r.queue,
                r.head
            );
        }
    }
    if !read_only {
        h.dev.flush().expect("device flush");
    }
    if trace() {
        let count = |f: &dyn Fn(&Rec) -> bool| h.records.iter().filter(|r| f(r)).count();
        eprintln!(
            "virtio_blk: {} chains ({} OK, {} failed, {} no status, {} unknown), {} must-OK, \
             {} must-fail, engine {}, {} queues, {} calls, model {}, {}",
            h.records.len(),
            count(&|r| r.outcome == Outcome::Ok),
            count(&|r| r.outcome == Outcome::Failed),
            count(&|r| r.outcome == Outcome::NoStatus),
            count(&|r| r.outcome == Outcome::Unknown),
            count(&|r| r.expect == Expect::MustOk),
            count(&|r| r.expect == Expect::MustFail),
            if h.uring { "io_uring" } else { "sync" },
            nq,
            h.calls,
            if h.model_ok { "exact" } else { "poisoned" },
            if h.unchecked { "unchecked" } else { "checked" },
        );
    }
    if trace() && std::env::var_os("VHDKIT_FUZZ_TRACE").is_some_and(|v| v == "2") {
        for (i, r) in h.records.iter().enumerate() {
            eprintln!(
                "  #{i} q{} head {} calls {}..{:?} {:?} sector {} total {} {:?} -> {:?} len {} \
                 known {} amb {} data {:x?} segs {:?}",
                r.queue,
                r.head,
                r.pop,
                r.answer,
                r.op,
                r.sector,
                r.total,
                r.expect,
                r.outcome,
                r.used_len,
                r.op_known,
                r.ambiguous,
                r.data,
                r.segs
            );
        }
    }
    let Harness {
        dev,
        model,
        known,
        model_ok,
        unchecked,
        ..
    } = h;
    drop(dev);

    let mut back = vec![0u8; disk_size as usize];
    block_backend::open(&path, OpenOptions::read_only())
        .expect("reopen the disk")
        .read_at(&mut back, 0)
        .expect("read the disk back");
    if read_only {
        assert!(
            std::fs::read(&path).is_ok_and(|b| b == t.file),
            "a read-only device changed the file"
        );
    }
    if model_ok && !unchecked {
        if let Some(at) = first_mismatch(&back, &model, &known) {
            panic!(
                "disk byte {at} (sector {}) is {:#04x} after reopening, the model says {:#04x}",
                at as u64 / SECTOR,
                back[at],
                model[at]
            );
        }
    }
}

// ---------------------------------------------------------------------------------------------
// Seeds.

/// Builds inputs in the target's encoding (for the seed corpus).
struct Enc(Vec<u8>);

impl Enc {
    fn new(c0: u8, c1: u8, seed: u8) -> Enc {
        Enc(vec![c0, c1, seed])
    }

    /// An IN / OUT (kind 0 / 1) of `lens` sectors each at `sector`.
    fn rw(mut self, q: u8, kind: u8, indirect: bool, sector: u16, lens: &[u8]) -> Enc {
        self.0
            .extend([0, q | kind << 1 | u8::from(indirect) << 4, 0]);
        self.0.extend(sector.to_le_bytes());
        self.0.push(lens.len() as u8);
        self.0.extend(lens.iter().map(|l| l - 1));
        self
    }

    fn flush(mut self, q: u8) -> Enc {
        self.0.extend([0, q | 2 << 1, 0, 0, 0, 0]);
        self
    }

    fn get_id(mut self, q: u8, len: u8) -> Enc {
        self.0.extend([0, q | 3 << 1, 0, 0, 0, 1, len - 1]);
        self
    }

    /// DISCARD (kind 4) / WRITE_ZEROES (kind 5) of (sector, sectors, flags) segments.
    fn zero(mut self, q: u8, kind: u8, segs: &[(u16, u16, u8)]) -> Enc {
        self.0.extend([0, q | kind << 1, 0, segs.len() as u8]);
        for &(s, n, f) in segs {
            self.0.extend(s.to_le_bytes());
            self.0.extend(n.to_le_bytes());
            self.0.push(f);
        }
        self
    }

    fn kick(mut self, q: u8) -> Enc {
        self.0.extend([5, q]);
        self
    }

    fn complete(mut self) -> Enc {
        self.0.extend([6, 1]);
        self
    }
}

/// A handful of well-formed inputs: reads, writes, flush, discard, write-zeroes, GET_ID, two
/// queues, both engines, each disk kind, indirect chains, EVENT_IDX, read-only.
pub fn virtio_blk_seeds() -> Vec<(String, Vec<u8>)> {
    let mut v = Vec::new();
    // Disk kinds (bits 4-6): 0 raw, 2 VHD 4K blocks, 3 VHD 64K blocks, 4 VHDX, 5 VHDX 4K sectors.
    for (name, disk) in [
        ("raw", 0u8),
        ("vhd", 2),
        ("vhd64k", 3),
        ("vhdx", 4),
        ("vhdx4k", 5),
    ] {
        for (ename, engine) in [("sync", 0u8), ("uring", 1)] {
            let c0 = engine | 4 | disk << 4 | 0x80;
            let e = Enc::new(c0, 0x01, 1)
                .rw(0, 1, false, 3, &[2, 1])
                .kick(0)
                .complete()
                .rw(0, 0, false, 2, &[4])
                .rw(0, 0, true, 0, &[8])
                .kick(0)
                .complete()
                .flush(0)
                .kick(0)
                .complete();
            v.push((format!("rw-{name}-{ename}"), e.0));
        }
    }
    let e = Enc::new(0x01 | 0x40, 0x01, 2)
        .rw(0, 1, false, 0, &[8])
        .rw(0, 1, false, 40, &[16])
        .kick(0)
        .complete()
        .zero(0, 4, &[(4, 8, 0)])
        .zero(0, 5, &[(40, 16, 0)])
        .zero(0, 5, &[(48, 4, 1)])
        .kick(0)
        .rw(0, 0, false, 0, &[16])
        .rw(0, 0, false, 40, &[16])
        .kick(0)
        .complete();
    v.push(("discard-write-zeroes-vhdx".into(), e.0));
    let e = Enc::new(0x20, 0x01, 3)
        .rw(0, 1, false, 1, &[1])
        .zero(0, 4, &[(0, 4, 0)])
        .kick(0)
        .complete();
    v.push(("discard-vhd-sync".into(), e.0));
    let e = Enc::new(0x81, 0x00, 4)
        .get_id(0, 20)
        .get_id(0, 8)
        .kick(0)
        .complete();
    v.push(("get-id".into(), e.0));
    // Two queues over one disk, io_uring and sync.
    for (ename, engine) in [("uring", 1u8), ("sync", 0)] {
        let e = Enc::new(engine | 2 | 4 | 4 << 4 | 0x80, 0x02, 5)
            .rw(0, 1, false, 0, &[8])
            .rw(1, 1, false, 8, &[8])
            .kick(0)
            .kick(1)
            .complete()
            .rw(1, 0, false, 0, &[16])
            .flush(0)
            .kick(1)
            .kick(0)
            .complete()
            .zero(1, 4, &[(0, 8, 0)])
            .kick(1)
            .rw(0, 0, false, 0, &[16])
            .kick(0)
            .complete();
        v.push((format!("two-queues-{ename}"), e.0));
    }
    // Ordering across queues: a write still in flight on queue 0 when queue 1 discards (or
    // write-zeroes, or flushes) the same range; the device drains queue 0 first.
    for (name, disk, kind) in [
        ("discard-vhdx", 4u8, 4u8),
        ("write-zeroes-vhd", 2, 5),
        ("discard-raw", 0, 4),
    ] {
        let e = Enc::new(1 | 2 | 4 | disk << 4 | 0x80, 0x02, 8)
            .rw(0, 1, false, 64, &[16, 16])
            .kick(0)
            .zero(1, kind, &[(64, 24, 0)])
            .kick(1)
            .complete()
            .rw(1, 0, false, 64, &[16, 16])
            .kick(1)
            .complete();
        v.push((format!("two-queues-ordering-{name}"), e.0));
    }
    let e = Enc::new(1 | 2 | 4 | 4 << 4 | 0x80, 0x02, 9)
        .rw(0, 1, false, 2048, &[16])
        .kick(0)
        .flush(1)
        .kick(1)
        .zero(1, 4, &[(2048, 8, 0)])
        .kick(1)
        .complete()
        .rw(0, 0, false, 2048, &[16])
        .kick(0)
        .complete();
    v.push(("two-queues-ordering-flush-discard-vhdx".into(), e.0));
    // Read-only: reads and a refused write.
    let e = Enc::new(0x01 | 8 | 2 << 4 | 0x80, 0x00, 6)
        .rw(0, 0, false, 0, &[8])
        .rw(0, 1, false, 0, &[1])
        .flush(0)
        .kick(0)
        .complete();
    v.push(("read-only-vhd".into(), e.0));
    // Adjacent memory regions, small queue, wrapping indexes.
    let mut e = Enc::new(0x01 | 0x80, 0x04 | 2 << 4, 7);
    for i in 0..12u16 {
        e = e
            .rw(0, (i % 2) as u8, i % 3 == 0, i * 8, &[8])
            .kick(0)
            .complete();
    }
    v.push(("wrap-small-queue".into(), e.0));
    v
}
