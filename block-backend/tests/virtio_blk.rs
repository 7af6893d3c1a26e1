//! The virtio-blk device model driven by a mock driver (virtio-queue's mock split queue) on raw,
//! VHD, VHDX and differencing disks, with both engines: data lands on the disk and reads back,
//! GET_ID, FLUSH, DISCARD and WRITE_ZEROES work, and malformed chains from a hostile driver get
//! an error status (or are returned unanswered when no status byte is usable), never a panic.

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;

use block_backend::engine::{lock_chain, new_shared_engine, EngineKind, SharedChain};
use block_backend::virtio_blk::{Config, VirtioBlk};
use block_backend::{open, Disk, OpenOptions};
use virtio_bindings::virtio_blk::*;
use virtio_bindings::virtio_ring::{VRING_DESC_F_NEXT, VRING_DESC_F_WRITE};
use virtio_queue::desc::{split::Descriptor as SplitDescriptor, RawDescriptor};
use virtio_queue::mock::MockSplitQueue;
use virtio_queue::Queue;
use vm_memory::{Bytes, GuestAddress, GuestMemoryMmap};

const SIZE: u64 = 8 << 20;
const HDR: u64 = 0x10_0000;
const DATA: u64 = 0x20_0000;
const STATUS: u64 = 0x80_0000;

fn make(kind: &str, dir: &Path) -> PathBuf {
    let path = dir.join("disk");
    match kind {
        "raw" => std::fs::File::create(&path).unwrap().set_len(SIZE).unwrap(),
        "vhd" => drop(
            vhd::VhdImage::create(
                &path,
                &vhd::CreateOptions {
                    size: SIZE,
                    block_size: 1 << 20,
                    ..Default::default()
                },
            )
            .unwrap(),
        ),
        "vhdx" => vhdx::VhdxImage::create(
            &path,
            &vhdx::CreateOptions {
                size: SIZE,
                block_size: Some(1 << 20),
                ..Default::default()
            },
        )
        .unwrap()
        .close()
        .unwrap(),
        "diff" => {
            let parent = dir.join("parent.vhdx");
            vhdx::VhdxImage::create(
                &parent,
                &vhdx::CreateOptions {
                    size: SIZE,
                    block_size: Some(1 << 20),
                    ..Default::default()
                },
            )
            .unwrap()
            .close()
            .unwrap();
            let mut p = open(&parent, OpenOptions::read_write()).unwrap();
            p.write_at(&vec![0x77; 1 << 20], 0).unwrap();
            p.flush().unwrap();
            drop(p);
            vhdx::VhdxImage::create(
                &path,
                &vhdx::CreateOptions {
                    parent: Some(parent),
                    ..Default::default()
                },
            )
            .unwrap()
            .close()
            .unwrap();
        }
        _ => unreachable!(),
    }
    path
}

struct Rig<'a> {
    mem: &'a GuestMemoryMmap,
    vq: MockSplitQueue<'a, GuestMemoryMmap>,
    dev: VirtioBlk,
    notified: Arc<AtomicUsize>,
    next_desc: u16,
    /// The chain under the device's engine.
    chain: SharedChain,
}

impl<'a> Rig<'a> {
    fn new(mem: &'a GuestMemoryMmap, path: &Path, engine: EngineKind, read_only: bool) -> Rig<'a> {
        let vq = MockSplitQueue::new(mem, 256);
        let q: Queue = vq.create_queue().unwrap();
        let opts = if read_only {
            OpenOptions::read_only()
        } else {
            OpenOptions::read_write()
        };
        let chain: SharedChain = Arc::new(std::sync::Mutex::new(open(path, opts).unwrap()));
        let e = new_shared_engine(engine, chain.clone(), 64).unwrap();
        let notified = Arc::new(AtomicUsize::new(0));
        let n = notified.clone();
        let mut dev = VirtioBlk::new(
            vec![e],
            mem.clone(),
            vec![q],
            Config {
                id: "vhdkit-disk-0".into(),
            },
            Box::new(move |_| {
                n.fetch_add(1, Ordering::SeqCst);
            }),
        )
        .unwrap();
        dev.set_acked_features(dev.device_features());
        Rig {
            mem,
            vq,
            dev,
            notified,
            next_desc: 0,
            chain,
        }
    }

    /// Submits one chain of (addr, len, device_writable) and runs the device to completion;
    /// returns (status byte, used length) or None if the chain was not answered.
    fn run(&mut self, descs: &[(u64, u32, bool)]) -> Option<(u8, u32)> {
        let used_before = self.vq.used().idx().load();
        self.mem.write_obj(0xFFu8, GuestAddress(STATUS)).unwrap();
        publish(&self.vq, self.next_desc, descs);
        self.next_desc += descs.len() as u16;
        self.dev.process_queue(0).unwrap();
        while self.dev.pending() > 0 {
            self.dev.process_completions(true).unwrap();
        }
        let used_after = self.vq.used().idx().load();
        assert_eq!(
            used_after.wrapping_sub(used_before),
            1,
            "every chain is returned exactly once"
        );
        let elem = self
            .vq
            .used()
            .ring()
            .ref_at((used_before % 256) as usize)
            .unwrap()
            .load();
        let len = elem.len();
        let status: u8 = self.mem.read_obj(GuestAddress(STATUS)).unwrap();
        (len > 0).then_some((status, len))
    }

    fn header(&self, kind: u32, sector: u64) {
        header_at(self.mem, HDR, kind, sector);
    }
}

fn memory() -> GuestMemoryMmap {
    GuestMemoryMmap::<()>::from_ranges(&[(GuestAddress(0), 16 << 20)]).unwrap()
}

fn round_trip(kind: &str, engine: EngineKind) {
    let dir = tempfile::tempdir().unwrap();
    let path = make(kind, dir.path());
    let mem = memory();
    let mut rig = Rig::new(&mem, &path, engine, false);
    let cfg = rig.dev.config_space();
    assert_eq!(
        u64::from_le_bytes(cfg[0..8].try_into().unwrap()),
        SIZE / 512
    );
    // Write 3 segments (12 KiB) at sector 2047 (crossing the first 1 MiB block).
    let data: Vec<u8> = (0..12288u32).map(|i| (i * 7 % 251) as u8).collect();
    mem.write_slice(&data, GuestAddress(DATA)).unwrap();
    rig.header(VIRTIO_BLK_T_OUT, 2047);
    let r = rig.run(&[
        (HDR, 16, false),
        (DATA, 4096, false),
        (DATA + 4096, 4096, false),
        (DATA + 8192, 4096, false),
        (STATUS, 1, true),
    ]);
    assert_eq!(r, Some((VIRTIO_BLK_S_OK as u8, 1)));
    // Read it back into another buffer.
    rig.header(VIRTIO_BLK_T_IN, 2047);
    let r = rig.run(&[
        (HDR, 16, false),
        (DATA + 0x10_0000, 12288, true),
        (STATUS, 1, true),
    ]);
    assert_eq!(r, Some((VIRTIO_BLK_S_OK as u8, 12289)));
    let mut back = vec![0u8; 12288];
    mem.read_slice(&mut back, GuestAddress(DATA + 0x10_0000))
        .unwrap();
    assert_eq!(back, data);
    // GET_ID, FLUSH.
    rig.header(VIRTIO_BLK_T_GET_ID, 0);
    assert_eq!(
        rig.run(&[(HDR, 16, false), (DATA, 20, true), (STATUS, 1, true)]),
        Some((VIRTIO_BLK_S_OK as u8, 21))
    );
    let mut id = [0u8; 13];
    mem.read_slice(&mut id, GuestAddress(DATA)).unwrap();
    assert_eq!(&id, b"vhdkit-disk-0");
    rig.header(VIRTIO_BLK_T_FLUSH, 0);
    assert_eq!(
        rig.run(&[(HDR, 16, false), (STATUS, 1, true)]),
        Some((VIRTIO_BLK_S_OK as u8, 1))
    );
    // WRITE_ZEROES over the second sector written, DISCARD of the whole second MiB.
    let seg = |sector: u64, n: u32, flags: u32| {
        let mut b = sector.to_le_bytes().to_vec();
        b.extend(n.to_le_bytes());
        b.extend(flags.to_le_bytes());
        b
    };
    mem.write_slice(&seg(2048, 8, 0), GuestAddress(DATA))
        .unwrap();
    rig.header(VIRTIO_BLK_T_WRITE_ZEROES, 0);
    assert_eq!(
        rig.run(&[(HDR, 16, false), (DATA, 16, false), (STATUS, 1, true)]),
        Some((VIRTIO_BLK_S_OK as u8, 1))
    );
    mem.write_slice(&seg(4096, 2048, 0), GuestAddress(DATA))
        .unwrap();
    rig.header(VIRTIO_BLK_T_DISCARD, 0);
    assert_eq!(
        rig.run(&[(HDR, 16, false), (DATA, 16, false), (STATUS, 1, true)]),
        Some((VIRTIO_BLK_S_OK as u8, 1))
    );
    assert!(rig.notified.load(Ordering::SeqCst) > 0);
    rig.dev.flush().unwrap();
    drop(rig);
    // The disk holds what the driver wrote.
    let mut d = open(&path, OpenOptions::read_only()).unwrap();
    let mut got = vec![0u8; 12288];
    d.read_at(&mut got, 2047 * 512).unwrap();
    let mut expect = data.clone();
    expect[512..512 + 4096].fill(0);
    assert_eq!(got, expect);
    let mut second_mib = vec![1u8; 1 << 20];
    d.read_at(&mut second_mib, 2 << 20).unwrap();
    assert!(second_mib.iter().all(|&b| b == 0));
}

#[test]
fn driver_round_trip_on_raw_with_both_engines() {
    round_trip("raw", EngineKind::Sync);
    round_trip("raw", EngineKind::IoUring);
}

#[test]
fn driver_round_trip_on_vhd_with_both_engines() {
    round_trip("vhd", EngineKind::Sync);
    round_trip("vhd", EngineKind::IoUring);
}

#[test]
fn driver_round_trip_on_vhdx_with_both_engines() {
    round_trip("vhdx", EngineKind::Sync);
    round_trip("vhdx", EngineKind::IoUring);
}

#[test]
fn driver_round_trip_on_a_differencing_chain_with_both_engines() {
    round_trip("diff", EngineKind::Sync);
    round_trip("diff", EngineKind::IoUring);
}

/// A request of many data segments is one engine request: planned once (one lock of the
/// chain), its payload moved straight between the guest ranges and the file, and a write's
/// metadata committed once, even across a block boundary and with the segments scattered in
/// guest memory.
#[test]
fn a_multi_segment_request_is_planned_once_and_committed_once() {
    for engine in [EngineKind::Sync, EngineKind::IoUring] {
        let dir = tempfile::tempdir().unwrap();
        let path = make("vhdx", dir.path());
        let mem = memory();
        let mut rig = Rig::new(&mem, &path, engine, false);
        let data: Vec<u8> = (0..4 * 4096u32).map(|i| (i * 13 % 251) as u8).collect();
        // Four 4 KiB segments, out of order in guest memory.
        let at = [DATA + 0x3000, DATA, DATA + 0x9000, DATA + 0x5000];
        for (i, &a) in at.iter().enumerate() {
            mem.write_slice(&data[i * 4096..(i + 1) * 4096], GuestAddress(a))
                .unwrap();
        }
        let before = lock_chain(&rig.chain).plan_stats();
        // Sector 2040: the request crosses from the first 1 MiB block into the second.
        rig.header(VIRTIO_BLK_T_OUT, 2040);
        let mut descs = vec![(HDR, 16, false)];
        descs.extend(at.iter().map(|&a| (a, 4096, false)));
        descs.push((STATUS, 1, true));
        assert_eq!(rig.run(&descs), Some((VIRTIO_BLK_S_OK as u8, 1)));
        let after = lock_chain(&rig.chain).plan_stats();
        assert_eq!(after.writes - before.writes, 1, "{engine:?}: write plans");
        assert_eq!(after.commits - before.commits, 1, "{engine:?}: commits");
        // Read it back in four other scattered segments: one read plan.
        let back_at = [
            DATA + 0x20000,
            DATA + 0x11000,
            DATA + 0x18000,
            DATA + 0x14000,
        ];
        rig.header(VIRTIO_BLK_T_IN, 2040);
        let mut descs = vec![(HDR, 16, false)];
        descs.extend(back_at.iter().map(|&a| (a, 4096, true)));
        descs.push((STATUS, 1, true));
        assert_eq!(rig.run(&descs), Some((VIRTIO_BLK_S_OK as u8, 4 * 4096 + 1)));
        let again = lock_chain(&rig.chain).plan_stats();
        assert_eq!(again.reads - after.reads, 1, "{engine:?}: read plans");
        for (i, &a) in back_at.iter().enumerate() {
            let mut got = vec![0u8; 4096];
            mem.read_slice(&mut got, GuestAddress(a)).unwrap();
            assert!(
                got == data[i * 4096..(i + 1) * 4096],
                "{engine:?}: segment {i}"
            );
        }
        drop(rig);
        let mut d = open(&path, OpenOptions::read_only()).unwrap();
        let mut got = vec![0u8; data.len()];
        d.read_at(&mut got, 2040 * 512).unwrap();
        assert!(got == data, "{engine:?}: disk content");
    }
}

#[test]
fn hostile_chains_get_error_statuses_not_panics() {
    for engine in [EngineKind::Sync, EngineKind::IoUring] {
        let dir = tempfile::tempdir().unwrap();
        // VHD: a writable open that writes nothing leaves the file byte-identical (a VHDX
        // would rotate its FileWriteGuid).
        let path = make("vhd", dir.path());
        let before = std::fs::read(&path).unwrap();
        let mem = memory();
        let mut rig = Rig::new(&mem, &path, engine, false);
        let ioerr = Some((VIRTIO_BLK_S_IOERR as u8, 1));
        // Past the capacity.
        rig.header(VIRTIO_BLK_T_IN, SIZE / 512 - 1);
        assert_eq!(
            rig.run(&[(HDR, 16, false), (DATA, 1024, true), (STATUS, 1, true)]),
            ioerr
        );
        // Sector number that overflows.
        rig.header(VIRTIO_BLK_T_OUT, u64::MAX);
        assert_eq!(
            rig.run(&[(HDR, 16, false), (DATA, 512, false), (STATUS, 1, true)]),
            ioerr
        );
        // Data outside guest memory.
        rig.header(VIRTIO_BLK_T_IN, 0);
        assert_eq!(
            rig.run(&[
                (HDR, 16, false),
                ((16 << 20) - 256, 512, true),
                (STATUS, 1, true)
            ]),
            ioerr
        );
        // Wrong direction: a read into a device-readable buffer.
        rig.header(VIRTIO_BLK_T_IN, 0);
        assert_eq!(
            rig.run(&[(HDR, 16, false), (DATA, 512, false), (STATUS, 1, true)]),
            ioerr
        );
        // Not whole sectors.
        rig.header(VIRTIO_BLK_T_OUT, 0);
        assert_eq!(
            rig.run(&[(HDR, 16, false), (DATA, 100, false), (STATUS, 1, true)]),
            ioerr
        );
        // Short header.
        assert_eq!(rig.run(&[(HDR, 8, false), (STATUS, 1, true)]), ioerr);
        // Unknown type.
        rig.header(12345, 0);
        assert_eq!(
            rig.run(&[(HDR, 16, false), (STATUS, 1, true)]),
            Some((VIRTIO_BLK_S_UNSUPP as u8, 1))
        );
        // Discard segment past the end, and a ragged segment list.
        mem.write_slice(&[0xFFu8; 16], GuestAddress(DATA)).unwrap();
        rig.header(VIRTIO_BLK_T_DISCARD, 0);
        assert_eq!(
            rig.run(&[(HDR, 16, false), (DATA, 16, false), (STATUS, 1, true)]),
            ioerr
        );
        rig.header(VIRTIO_BLK_T_DISCARD, 0);
        assert_eq!(
            rig.run(&[(HDR, 16, false), (DATA, 20, false), (STATUS, 1, true)]),
            ioerr
        );
        // No usable status byte: returned with length 0.
        rig.header(VIRTIO_BLK_T_IN, 0);
        assert_eq!(rig.run(&[(HDR, 16, false)]), None);
        // A readable buffer after the writable ones: malformed, answered at the last
        // writable byte (the status, wherever the chain puts it).
        assert_eq!(
            rig.run(&[(HDR, 16, false), (DATA, 512, true), (STATUS, 1, false)])
                .map(|r| r.1),
            Some(1)
        );
        assert_eq!(
            mem.read_obj::<u8>(GuestAddress(DATA + 511)).unwrap(),
            VIRTIO_BLK_S_IOERR as u8
        );
        // Bytes where the request type has none: data readable by the device in a read,
        // writable before the status in a write.
        rig.header(VIRTIO_BLK_T_IN, 0);
        assert_eq!(
            rig.run(&[(HDR, 528, false), (DATA, 512, true), (STATUS, 1, true)]),
            ioerr
        );
        rig.header(VIRTIO_BLK_T_OUT, 0);
        assert_eq!(
            rig.run(&[
                (HDR, 16, false),
                (DATA, 512, false),
                (STATUS - 512, 513, true)
            ])
            .map(|r| r.1),
            Some(1)
        );
        // A descriptor whose address range wraps the address space.
        rig.header(VIRTIO_BLK_T_OUT, 0);
        assert_eq!(
            rig.run(&[
                (HDR, 16, false),
                (u64::MAX - 255, 512, false),
                (STATUS, 1, true)
            ]),
            ioerr
        );
        drop(rig);
        assert!(
            std::fs::read(&path).unwrap() == before,
            "rejected requests changed the image"
        );
    }
}

/// virtio 1.x message framing: the request is one byte array over the chain's buffers, cut
/// wherever the driver likes. Header and data in one buffer, a header split in two, the status
/// at the end of the data buffer, empty buffers anywhere: all read and write the same bytes as
/// the usual one-field-per-descriptor layout.
#[test]
fn requests_are_byte_arrays_whatever_the_descriptor_layout() {
    for engine in [EngineKind::Sync, EngineKind::IoUring] {
        let dir = tempfile::tempdir().unwrap();
        let path = make("vhdx", dir.path());
        let mem = memory();
        let mut rig = Rig::new(&mem, &path, engine, false);
        let data: Vec<u8> = (0..8192u32).map(|i| (i * 13 % 251) as u8).collect();
        // Header and data in one readable buffer.
        header_at(&mem, HDR, VIRTIO_BLK_T_OUT, 8);
        mem.write_slice(&data[..4096], GuestAddress(HDR + 16))
            .unwrap();
        assert_eq!(
            rig.run(&[(HDR, 16 + 4096, false), (STATUS, 1, true)]),
            Some((VIRTIO_BLK_S_OK as u8, 1))
        );
        // Header split 5 + 11, data in a buffer that starts with its last header bytes, and
        // empty buffers in both directions.
        let h2 = HDR + 0x1000;
        header_at(&mem, h2, VIRTIO_BLK_T_OUT, 16);
        mem.write_slice(&data[4096..], GuestAddress(h2 + 16))
            .unwrap();
        assert_eq!(
            rig.run(&[
                (h2, 5, false),
                (0, 0, false),
                (h2 + 5, 11 + 4096, false),
                (0xdead_0000_0000, 0, true),
                (STATUS, 1, true),
            ]),
            Some((VIRTIO_BLK_S_OK as u8, 1))
        );
        // Read all 8 KiB back into one writable buffer that ends with the status byte.
        rig.header(VIRTIO_BLK_T_IN, 8);
        let out = DATA + 0x10_0000;
        assert_eq!(
            rig.run(&[(HDR, 16, false), (out, 8192 + 1, true)])
                .map(|r| r.1),
            Some(8193)
        );
        assert_eq!(
            mem.read_obj::<u8>(GuestAddress(out + 8192)).unwrap(),
            VIRTIO_BLK_S_OK as u8
        );
        let mut back = vec![0u8; 8192];
        mem.read_slice(&mut back, GuestAddress(out)).unwrap();
        assert_eq!(back, data);
        // GET_ID with the status inside the id buffer: the id is cut to fit before it.
        rig.header(VIRTIO_BLK_T_GET_ID, 0);
        assert_eq!(
            rig.run(&[(HDR, 16, false), (STATUS - 6, 7, true)]),
            Some((VIRTIO_BLK_S_OK as u8, 7))
        );
        let mut id = [0u8; 6];
        mem.read_slice(&mut id, GuestAddress(STATUS - 6)).unwrap();
        assert_eq!(&id, b"vhdkit");
        drop(rig);
        let mut d = open(&path, OpenOptions::read_only()).unwrap();
        let mut got = vec![0u8; 8192];
        d.read_at(&mut got, 8 * 512).unwrap();
        assert_eq!(got, data);
    }
}

#[test]
fn read_only_disk_refuses_writes_and_advertises_ro() {
    let dir = tempfile::tempdir().unwrap();
    let path = make("vhd", dir.path());
    let before = std::fs::read(&path).unwrap();
    let mem = memory();
    let mut rig = Rig::new(&mem, &path, EngineKind::IoUring, true);
    assert!(rig.dev.device_features() & (1 << VIRTIO_BLK_F_RO) != 0);
    rig.header(VIRTIO_BLK_T_OUT, 0);
    assert_eq!(
        rig.run(&[(HDR, 16, false), (DATA, 512, false), (STATUS, 1, true)]),
        Some((VIRTIO_BLK_S_IOERR as u8, 1))
    );
    rig.header(VIRTIO_BLK_T_IN, 0);
    assert_eq!(
        rig.run(&[(HDR, 16, false), (DATA, 512, true), (STATUS, 1, true)]),
        Some((VIRTIO_BLK_S_OK as u8, 513))
    );
    drop(rig);
    assert!(
        std::fs::read(&path).unwrap() == before,
        "read-only device changed the image"
    );
}

/// Publishes one chain of (addr, len, device_writable) in `vq`, descriptors from `first`.
fn publish(vq: &MockSplitQueue<'_, GuestMemoryMmap>, first: u16, descs: &[(u64, u32, bool)]) {
    let raw: Vec<RawDescriptor> = descs
        .iter()
        .enumerate()
        .map(|(i, &(addr, len, w))| {
            let mut flags = if w { VRING_DESC_F_WRITE as u16 } else { 0 };
            if i + 1 < descs.len() {
                flags |= VRING_DESC_F_NEXT as u16;
            }
            RawDescriptor::from(SplitDescriptor::new(addr, len, flags, first + i as u16 + 1))
        })
        .collect();
    vq.add_desc_chains(&raw, first).unwrap();
}

/// Writes a request header at `at`.
fn header_at(mem: &GuestMemoryMmap, at: u64, kind: u32, sector: u64) {
    mem.write_obj(kind, GuestAddress(at)).unwrap();
    mem.write_obj(0u32, GuestAddress(at + 4)).unwrap();
    mem.write_obj(sector, GuestAddress(at + 8)).unwrap();
}

/// MQ: two virtqueues, each with its own io_uring over one shared chain. Writes to the same
/// unallocated block arrive on both queues before anything completes (the block is allocated
/// once); a discard on queue 1 while queue 0 still has a write in flight to the same block
/// takes effect after that write (the device drains the other queue first); a flush on one
/// queue covers what completed on the other.
#[test]
fn two_queues_have_their_own_rings_over_one_chain_and_ordering_points_drain_both() {
    use block_backend::engine::new_shared_engine;
    use std::sync::Mutex;

    let dir = tempfile::tempdir().unwrap();
    let path = make("vhdx", dir.path());
    let size_before = std::fs::metadata(&path).unwrap().len();
    let mem = memory();
    let vq0 = MockSplitQueue::create(&mem, GuestAddress(0), 256);
    let vq1 = MockSplitQueue::create(&mem, GuestAddress(0x4_0000), 256);
    let chain = Arc::new(Mutex::new(open(&path, OpenOptions::read_write()).unwrap()));
    let engines = (0..2)
        .map(|_| new_shared_engine(EngineKind::IoUring, chain.clone(), 64).unwrap())
        .collect();
    let mut dev = VirtioBlk::new(
        engines,
        mem.clone(),
        vec![vq0.create_queue().unwrap(), vq1.create_queue().unwrap()],
        Config { id: "mq".into() },
        Box::new(|_| {}),
    )
    .unwrap();
    dev.set_acked_features(dev.device_features());
    assert_eq!(dev.num_queues(), 2);
    assert_eq!(
        u16::from_le_bytes(dev.config_space()[34..36].try_into().unwrap()),
        2,
        "num_queues in the config space"
    );
    assert_eq!(
        dev.completion_fds().unwrap().len(),
        2,
        "one completion eventfd per ring"
    );

    // Queue 0 writes 0x11 to the first 4 KiB of block 1, queue 1 writes 0x22 to the next 4 KiB:
    // both planned before either completes.
    let block = 1u64 << 20;
    mem.write_slice(&[0x11; 4096], GuestAddress(DATA)).unwrap();
    mem.write_slice(&[0x22; 4096], GuestAddress(DATA + 4096))
        .unwrap();
    header_at(&mem, HDR, VIRTIO_BLK_T_OUT, block / 512);
    header_at(&mem, HDR + 16, VIRTIO_BLK_T_OUT, (block + 4096) / 512);
    publish(
        &vq0,
        0,
        &[(HDR, 16, false), (DATA, 4096, false), (STATUS, 1, true)],
    );
    publish(
        &vq1,
        0,
        &[
            (HDR + 16, 16, false),
            (DATA + 4096, 4096, false),
            (STATUS + 1, 1, true),
        ],
    );
    dev.process_queue(0).unwrap();
    dev.process_queue(1).unwrap();
    while dev.pending() > 0 {
        dev.process_completions(true).unwrap();
    }
    for (vq, status) in [(&vq0, STATUS), (&vq1, STATUS + 1)] {
        assert_eq!(vq.used().idx().load(), 1);
        let s: u8 = mem.read_obj(GuestAddress(status)).unwrap();
        assert_eq!(u32::from(s), VIRTIO_BLK_S_OK);
    }
    // Flush on queue 1.
    header_at(&mem, HDR + 32, VIRTIO_BLK_T_FLUSH, 0);
    publish(&vq1, 3, &[(HDR + 32, 16, false), (STATUS + 2, 1, true)]);
    dev.process_queue(1).unwrap();
    while dev.pending() > 0 {
        dev.process_completions(true).unwrap();
    }
    assert_eq!(
        u32::from(mem.read_obj::<u8>(GuestAddress(STATUS + 2)).unwrap()),
        VIRTIO_BLK_S_OK
    );

    // Block 2: queue 0 writes 0x33 over the whole block, and before that completes queue 1
    // discards it. The discard waits for the write, so the block reads as zeros afterwards.
    let block2 = 2u64 << 20;
    mem.write_slice(&vec![0x33; 1 << 20], GuestAddress(DATA + 0x10_0000))
        .unwrap();
    header_at(&mem, HDR + 48, VIRTIO_BLK_T_OUT, block2 / 512);
    publish(
        &vq0,
        3,
        &[
            (HDR + 48, 16, false),
            (DATA + 0x10_0000, 1 << 20, false),
            (STATUS + 3, 1, true),
        ],
    );
    // Discard segment: sector, num_sectors, flags.
    let seg = DATA + 0x30_0000;
    mem.write_obj(block2 / 512, GuestAddress(seg)).unwrap();
    mem.write_obj(((1u64 << 20) / 512) as u32, GuestAddress(seg + 8))
        .unwrap();
    mem.write_obj(0u32, GuestAddress(seg + 12)).unwrap();
    header_at(&mem, HDR + 64, VIRTIO_BLK_T_DISCARD, 0);
    publish(
        &vq1,
        5,
        &[
            (HDR + 64, 16, false),
            (seg, 16, false),
            (STATUS + 4, 1, true),
        ],
    );
    dev.process_queue(0).unwrap();
    assert_eq!(vq0.used().idx().load(), 1, "the write is still in flight");
    dev.process_queue(1).unwrap();
    assert_eq!(
        vq0.used().idx().load(),
        2,
        "queue 0's write completed before queue 1's discard started"
    );
    while dev.pending() > 0 {
        dev.process_completions(true).unwrap();
    }
    for status in [STATUS + 3, STATUS + 4] {
        assert_eq!(
            u32::from(mem.read_obj::<u8>(GuestAddress(status)).unwrap()),
            VIRTIO_BLK_S_OK
        );
    }
    dev.flush().unwrap();
    drop(dev);
    drop(chain);

    let mut disk = open(&path, OpenOptions::read_only()).unwrap();
    let mut back = vec![0u8; 8192];
    disk.read_at(&mut back, block).unwrap();
    assert!(back[..4096].iter().all(|&b| b == 0x11), "queue 0's write");
    assert!(back[4096..].iter().all(|&b| b == 0x22), "queue 1's write");
    let mut b2 = vec![0xFFu8; 1 << 20];
    disk.read_at(&mut b2, block2).unwrap();
    assert!(
        b2.iter().all(|&b| b == 0),
        "the discard took effect after the write"
    );
    drop(disk);
    // Block 1 was allocated once (block 2 at most once more), not once per queue.
    let grown = std::fs::metadata(&path).unwrap().len() - size_before;
    assert!(
        grown <= 2 << 20,
        "file grew by {grown} bytes for at most two 1 MiB blocks"
    );
    // The discarded block's space stays in the file until a compact: a leak, not corruption.
    let report = vhdx::check(&path).unwrap();
    assert!(report.corruptions.is_empty(), "{report:?}");
}

#[test]
fn discards_with_more_segments_than_advertised_are_refused_and_leave_data_alone() {
    let dir = tempfile::tempdir().unwrap();
    let path = make("raw", dir.path());
    std::fs::write(&path, vec![0x44u8; SIZE as usize]).unwrap();
    let mem = memory();
    let mut rig = Rig::new(&mem, &path, EngineKind::IoUring, false);
    let cfg = rig.dev.config_space();
    assert_eq!(
        u32::from_le_bytes(cfg[40..44].try_into().unwrap()),
        1,
        "max_discard_seg"
    );
    // Two segments of 8 sectors each.
    for (i, sector) in [0u64, 64].into_iter().enumerate() {
        let at = DATA + 16 * i as u64;
        mem.write_obj(sector, GuestAddress(at)).unwrap();
        mem.write_obj(8u32, GuestAddress(at + 8)).unwrap();
        mem.write_obj(0u32, GuestAddress(at + 12)).unwrap();
    }
    rig.header(VIRTIO_BLK_T_DISCARD, 0);
    assert_eq!(
        rig.run(&[(HDR, 16, false), (DATA, 32, false), (STATUS, 1, true)]),
        Some((VIRTIO_BLK_S_IOERR as u8, 1))
    );
    // One segment is fine.
    assert_eq!(
        rig.run(&[(HDR, 16, false), (DATA, 16, false), (STATUS, 1, true)]),
        Some((VIRTIO_BLK_S_OK as u8, 1))
    );
    drop(rig);
    let bytes = std::fs::read(&path).unwrap();
    assert!(
        bytes[..4096].iter().all(|&b| b == 0),
        "the accepted discard zeroed sectors 0..8"
    );
    assert!(
        bytes[64 * 512..72 * 512].iter().all(|&b| b == 0x44),
        "the refused one did nothing"
    );
}

#[test]
fn the_dirty_hook_reports_every_host_write_into_guest_memory() {
    let dir = tempfile::tempdir().unwrap();
    let path = make("raw", dir.path());
    let mem = memory();
    let mut rig = Rig::new(&mem, &path, EngineKind::IoUring, false);
    let seen = Arc::new(std::sync::Mutex::new(Vec::new()));
    let s = seen.clone();
    rig.dev
        .set_dirty_hook(Some(Arc::new(move |a: GuestAddress, len| {
            s.lock().unwrap().push((a.0, len))
        })));
    let take = || std::mem::take(&mut *seen.lock().unwrap());
    // A write changes no guest memory but its status byte.
    rig.header(VIRTIO_BLK_T_OUT, 0);
    rig.run(&[(HDR, 16, false), (DATA, 4096, false), (STATUS, 1, true)]);
    assert_eq!(take(), vec![(STATUS, 1)]);
    // A read: both data segments, then the status byte.
    rig.header(VIRTIO_BLK_T_IN, 0);
    rig.run(&[
        (HDR, 16, false),
        (DATA + 0x1000, 512, true),
        (DATA + 0x9000, 3584, true),
        (STATUS, 1, true),
    ]);
    assert_eq!(
        take(),
        vec![(DATA + 0x1000, 512), (DATA + 0x9000, 3584), (STATUS, 1)]
    );
    // GET_ID: the id bytes (20 at most) and the status byte.
    rig.header(VIRTIO_BLK_T_GET_ID, 0);
    rig.run(&[(HDR, 16, false), (DATA, 64, true), (STATUS, 1, true)]);
    assert_eq!(take(), vec![(DATA, 20), (STATUS, 1)]);
    // Off again: nothing more is reported.
    rig.dev.set_dirty_hook(None);
    rig.header(VIRTIO_BLK_T_IN, 0);
    rig.run(&[(HDR, 16, false), (DATA, 512, true), (STATUS, 1, true)]);
    assert!(take().is_empty());
}

/// 16 reads and a GET_ID published at once. Without EVENT_IDX the device interrupts the
/// driver once for the GET_ID it answers while taking the chains and once for the 16 reads
/// that complete together, not once per used entry. With EVENT_IDX and `used_event` = 7 it
/// stays silent for the GET_ID (entry 1) and interrupts once when the batch passes entry 8.
#[test]
fn a_batch_of_completions_raises_one_interrupt() {
    let dir = tempfile::tempdir().unwrap();
    let path = make("vhdx", dir.path());
    let mem = memory();
    for event_idx in [false, true] {
        let mut rig = Rig::new(&mem, &path, EngineKind::Sync, false);
        let mut features = rig.dev.device_features();
        if !event_idx {
            features &= !(1 << virtio_bindings::virtio_ring::VIRTIO_RING_F_EVENT_IDX);
        }
        rig.dev.set_acked_features(features);
        // used_event: interrupt me once the 8th entry is used.
        let used_event = rig.vq.avail_addr().0 + 4 + 2 * 256;
        mem.write_obj(7u16, GuestAddress(used_event)).unwrap();
        let mut next = 0u16;
        for i in 0..16u64 {
            header_at(&mem, HDR + 16 * i, VIRTIO_BLK_T_IN, 8 * i);
            let descs = [
                (HDR + 16 * i, 16, false),
                (DATA + 4096 * i, 4096, true),
                (STATUS + i, 1, true),
            ];
            publish(&rig.vq, next, &descs);
            next += 3;
        }
        header_at(&mem, HDR + 16 * 16, VIRTIO_BLK_T_GET_ID, 0);
        publish(
            &rig.vq,
            next,
            &[
                (HDR + 16 * 16, 16, false),
                (DATA + 0x10_0000, 20, true),
                (STATUS + 16, 1, true),
            ],
        );
        rig.dev.process_queue(0).unwrap();
        assert_eq!(rig.vq.used().idx().load(), 1, "GET_ID is answered at once");
        let first = usize::from(!event_idx);
        assert_eq!(
            rig.notified.load(Ordering::SeqCst),
            first,
            "event_idx {event_idx}"
        );
        rig.dev.process_completions(true).unwrap();
        assert_eq!(rig.dev.pending(), 0, "the sync engine completed every read");
        assert_eq!(rig.vq.used().idx().load(), 17);
        assert_eq!(
            rig.notified.load(Ordering::SeqCst),
            first + 1,
            "one interrupt for the 16 reads (event_idx {event_idx})"
        );
        for i in 0..17 {
            let s: u8 = mem.read_obj(GuestAddress(STATUS + i)).unwrap();
            assert_eq!(u32::from(s), VIRTIO_BLK_S_OK, "request {i}");
        }
    }
}
