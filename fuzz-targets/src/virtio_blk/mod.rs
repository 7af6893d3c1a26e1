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

mod disk;
mod harness;
mod layout;
mod oracle;
mod records;
mod seeds;

pub(crate) use disk::cleanup;
use disk::*;
use harness::*;
use layout::*;
use records::*;
pub use seeds::virtio_blk_seeds;

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
