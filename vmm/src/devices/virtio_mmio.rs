//! virtio-mmio (version 2, "modern") transport: a register map over a [`VirtioDevice`].
//!
//! Registers (virtio 1.x §4.2.2), 4 KiB window:
//!
//! ```text
//!  0x000 Magic "virt"   0x004 Version 2      0x008 DeviceID 2   0x00c VendorID
//!  0x010 DeviceFeatures (by 0x014 DeviceFeaturesSel)  0x020 DriverFeatures (by 0x024 Sel)
//!  0x030 QueueSel  0x034 QueueNumMax  0x038 QueueNum  0x044 QueueReady
//!  0x050 QueueNotify  (an ioeventfd in KVM: never reaches us unless that failed)
//!  0x060 InterruptStatus  0x064 InterruptACK   (atomics, no lock: the hot path of interrupts)
//!  0x070 Status  0x080/84 QueueDesc  0x090/94 QueueDriver (avail)  0x0a0/a4 QueueDevice (used)
//!  0x0fc ConfigGeneration  0x100… device config (struct virtio_blk_config)
//! ```
//!
//! Feature negotiation, status, reset and queue state live in [`super::virtio`]; this module
//! only maps offsets onto them.

use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::Arc;

use block_backend::virtio_blk::VirtioBlk;
use virtio_queue::QueueT;
use vmm_sys_util::eventfd::EventFd;

pub use super::virtio::{Action, DEVICE_ID_BLOCK};
use super::virtio::{StatusChange, VirtioDevice};

/// "virt".
pub const MAGIC: u32 = 0x7472_6976;
/// Our vendor id ("VHDK").
pub const VENDOR_ID: u32 = 0x4b44_4856;
/// Offset of the queue notify register (for the ioeventfd).
pub const QUEUE_NOTIFY: u64 = 0x50;

/// A virtio-mmio device.
#[derive(Debug)]
pub struct VirtioMmio {
    dev: Arc<VirtioDevice>,
}

impl VirtioMmio {
    /// The transport over `dev`, whose notify callback sets bits in `interrupt_status` and
    /// raises the interrupt. `kick` wakes the device's worker.
    pub fn new(dev: VirtioBlk, interrupt_status: Arc<AtomicU32>, kick: EventFd) -> VirtioMmio {
        VirtioMmio {
            dev: Arc::new(VirtioDevice::new(dev, interrupt_status, kick)),
        }
    }

    /// The device behind the registers.
    pub fn device(&self) -> &Arc<VirtioDevice> {
        &self.dev
    }

    /// A guest read of `data.len()` bytes at `offset` in the window.
    pub fn read(&self, offset: u64, data: &mut [u8]) {
        let value: u32 = match offset {
            0x60 => self.dev.interrupt_status().load(Ordering::SeqCst),
            0x100.. => {
                let cfg = self.dev.with_device(|d| d.config_space());
                let start = (offset - 0x100) as usize;
                for (i, b) in data.iter_mut().enumerate() {
                    *b = cfg.get(start + i).copied().unwrap_or(0);
                }
                return;
            }
            _ => {
                let mut g = self.dev.lock();
                match offset {
                    0x00 => MAGIC,
                    0x04 => 2,
                    0x08 => DEVICE_ID_BLOCK,
                    0x0c => VENDOR_ID,
                    0x10 => g.device_features_word(),
                    0x34 => g.queue().map_or(0, |q| q.max_size().into()),
                    0x44 => g.queue().map_or(0, |q| u32::from(q.ready())),
                    0x70 => g.status,
                    0x80 | 0x84 | 0x90 | 0x94 | 0xa0 | 0xa4 => g.queue().map_or(0, |q| {
                        let a = match offset {
                            0x80 | 0x84 => q.desc_table(),
                            0x90 | 0x94 => q.avail_ring(),
                            _ => q.used_ring(),
                        };
                        if offset & 4 == 0 {
                            a as u32
                        } else {
                            (a >> 32) as u32
                        }
                    }),
                    0xfc => 0, // ConfigGeneration: the config never changes.
                    _ => 0,
                }
            }
        };
        let bytes = value.to_le_bytes();
        for (i, b) in data.iter_mut().enumerate() {
            *b = bytes.get(i).copied().unwrap_or(0);
        }
    }

    /// A guest write of `data` at `offset` in the window.
    pub fn write(&self, offset: u64, data: &[u8]) -> Action {
        let mut b = [0u8; 4];
        let n = data.len().min(4);
        b[..n].copy_from_slice(&data[..n]);
        let v = u32::from_le_bytes(b);
        match offset {
            0x64 => {
                self.dev.interrupt_status().fetch_and(!v, Ordering::SeqCst);
                return Action::None;
            }
            QUEUE_NOTIFY => return Action::Kick,
            0x100.. => return Action::None, // virtio-blk config is read-only here (no WCE).
            0x70 => {
                return match self.dev.set_status(v) {
                    StatusChange::DriverOk => Action::Kick,
                    StatusChange::None | StatusChange::Reset => Action::None,
                }
            }
            _ => {}
        }
        let mut g = self.dev.lock();
        match offset {
            0x14 => g.device_features_sel = v,
            0x20 => g.set_driver_features_word(v),
            0x24 => g.driver_features_sel = v,
            0x30 => g.queue_sel = v,
            0x38 => {
                if let Some(q) = g.queue() {
                    q.set_size(v as u16);
                }
            }
            0x44 => {
                if let Some(q) = g.queue() {
                    q.set_ready(v == 1);
                }
            }
            0x80 | 0x84 | 0x90 | 0x94 | 0xa0 | 0xa4 => {
                if let Some(q) = g.queue() {
                    let (low, high) = if offset & 4 == 0 {
                        (Some(v), None)
                    } else {
                        (None, Some(v))
                    };
                    match offset {
                        0x80 | 0x84 => q.set_desc_table_address(low, high),
                        0x90 | 0x94 => q.set_avail_ring_address(low, high),
                        _ => q.set_used_ring_address(low, high),
                    }
                }
            }
            _ => {}
        }
        Action::None
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::devices::virtio::INT_VRING;
    use block_backend::engine::{new_engine, EngineKind};
    use block_backend::virtio_blk::Config;
    use block_backend::OpenOptions;
    use virtio_bindings::virtio_config::{
        VIRTIO_CONFIG_S_ACKNOWLEDGE, VIRTIO_CONFIG_S_DRIVER, VIRTIO_CONFIG_S_DRIVER_OK,
        VIRTIO_CONFIG_S_FEATURES_OK,
    };
    use virtio_queue::Queue;
    use vm_memory::{GuestAddress, GuestMemoryMmap};
    use vmm_sys_util::eventfd::EFD_NONBLOCK;

    struct Rig {
        t: VirtioMmio,
        irq: Arc<EventFd>,
        _dir: tempfile::TempDir,
    }

    fn rig(read_only: bool) -> Rig {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("disk.raw");
        std::fs::write(&path, vec![0u8; 1 << 20]).unwrap();
        let opts = if read_only {
            OpenOptions::read_only()
        } else {
            OpenOptions::read_write()
        };
        let chain = block_backend::open(&path, opts).unwrap();
        let engine = new_engine(EngineKind::Sync, chain, 16).unwrap();
        let mem = GuestMemoryMmap::from_ranges(&[(GuestAddress(0), 1 << 20)]).unwrap();
        let status = Arc::new(AtomicU32::new(0));
        let irq = Arc::new(EventFd::new(EFD_NONBLOCK).unwrap());
        let (s, i) = (status.clone(), irq.clone());
        let dev = VirtioBlk::new(
            vec![engine],
            mem,
            vec![Queue::new(256).unwrap()],
            Config { id: "test".into() },
            Box::new(move |_| {
                s.fetch_or(INT_VRING, Ordering::SeqCst);
                let _ = i.write(1);
            }),
        )
        .unwrap();
        Rig {
            t: VirtioMmio::new(dev, status, EventFd::new(EFD_NONBLOCK).unwrap()),
            irq,
            _dir: dir,
        }
    }

    fn r32(t: &VirtioMmio, off: u64) -> u32 {
        let mut b = [0u8; 4];
        t.read(off, &mut b);
        u32::from_le_bytes(b)
    }

    fn w32(t: &VirtioMmio, off: u64, v: u32) -> Action {
        t.write(off, &v.to_le_bytes())
    }

    #[test]
    fn identifies_as_a_version_2_block_device() {
        let r = rig(false);
        assert_eq!(r32(&r.t, 0), MAGIC);
        assert_eq!(r32(&r.t, 4), 2);
        assert_eq!(r32(&r.t, 8), 2);
        assert_eq!(r32(&r.t, 0x34), 256, "QueueNumMax of queue 0");
        w32(&r.t, 0x30, 1);
        assert_eq!(r32(&r.t, 0x34), 0, "queue 1 does not exist");
    }

    #[test]
    fn features_are_offered_in_two_halves_and_version_1_is_required() {
        let r = rig(true);
        w32(&r.t, 0x14, 1);
        assert_eq!(r32(&r.t, 0x10) & 1, 1, "VIRTIO_F_VERSION_1 (bit 32)");
        w32(&r.t, 0x14, 0);
        assert_ne!(r32(&r.t, 0x10) & (1 << 5), 0, "VIRTIO_BLK_F_RO");
        let s = VIRTIO_CONFIG_S_ACKNOWLEDGE | VIRTIO_CONFIG_S_DRIVER;
        w32(&r.t, 0x70, s);
        // Without VERSION_1 FEATURES_OK does not stick.
        w32(&r.t, 0x70, s | VIRTIO_CONFIG_S_FEATURES_OK);
        assert_eq!(r32(&r.t, 0x70) & VIRTIO_CONFIG_S_FEATURES_OK, 0);
        w32(&r.t, 0x24, 1);
        w32(&r.t, 0x20, 1);
        w32(&r.t, 0x70, s | VIRTIO_CONFIG_S_FEATURES_OK);
        assert_ne!(r32(&r.t, 0x70) & VIRTIO_CONFIG_S_FEATURES_OK, 0);
        let a = w32(
            &r.t,
            0x70,
            s | VIRTIO_CONFIG_S_FEATURES_OK | VIRTIO_CONFIG_S_DRIVER_OK,
        );
        assert_eq!(a, Action::Kick);
        assert!(r.t.device().with_active_device(|_| ()).is_some());
    }

    #[test]
    fn config_space_reads_capacity_at_any_width() {
        let r = rig(false);
        // 1 MiB = 2048 sectors.
        assert_eq!(r32(&r.t, 0x100), 2048);
        let mut b = [0u8; 8];
        r.t.read(0x100, &mut b);
        assert_eq!(u64::from_le_bytes(b), 2048);
        let mut one = [0u8; 1];
        r.t.read(0x101, &mut one);
        assert_eq!(one[0], 8);
        r.t.read(0x100 + 4000, &mut one);
        assert_eq!(one[0], 0, "past the config space");
    }

    #[test]
    fn queue_addresses_are_programmed_in_halves_and_reset_clears_them() {
        let r = rig(false);
        w32(&r.t, 0x38, 128);
        w32(&r.t, 0x80, 0x1000);
        w32(&r.t, 0x84, 0x1);
        w32(&r.t, 0x90, 0x2000);
        w32(&r.t, 0xa0, 0x3000);
        w32(&r.t, 0x44, 1);
        assert_eq!(r32(&r.t, 0x80), 0x1000);
        assert_eq!(r32(&r.t, 0x84), 0x1);
        assert_eq!(r32(&r.t, 0x90), 0x2000);
        assert_eq!(r32(&r.t, 0xa0), 0x3000);
        assert_eq!(r32(&r.t, 0x44), 1);
        w32(&r.t, 0x70, VIRTIO_CONFIG_S_ACKNOWLEDGE);
        w32(&r.t, 0x70, 0);
        assert_eq!(r32(&r.t, 0x44), 0);
        assert_eq!(r32(&r.t, 0x80), 0);
        assert_eq!(r32(&r.t, 0x70), 0);
    }

    #[test]
    fn interrupt_status_is_acknowledged_bit_by_bit() {
        let r = rig(false);
        r.t.device().interrupt_status().store(3, Ordering::SeqCst);
        assert_eq!(r32(&r.t, 0x60), 3);
        w32(&r.t, 0x64, 1);
        assert_eq!(r32(&r.t, 0x60), 2);
        w32(&r.t, 0x64, 2);
        assert_eq!(r32(&r.t, 0x60), 0);
        assert!(r.irq.read().is_err(), "no interrupt was raised");
        assert_eq!(w32(&r.t, QUEUE_NOTIFY, 0), Action::Kick);
    }

    /// A driver's whole conversation through the registers: features, queue addresses from
    /// the mock driver's rings, DRIVER_OK, then a read and a write on the io_uring engine;
    /// completions land in the used ring and raise InterruptStatus and the irqfd.
    #[test]
    fn requests_flow_through_queues_programmed_via_registers() {
        use block_backend::engine::EngineKind;
        use virtio_bindings::virtio_ring::{VRING_DESC_F_NEXT, VRING_DESC_F_WRITE};
        use virtio_queue::desc::{split::Descriptor, RawDescriptor};
        use virtio_queue::mock::MockSplitQueue;
        use vm_memory::Bytes;

        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("disk.raw");
        let mut content = vec![0u8; 1 << 20];
        for (i, b) in content.iter_mut().enumerate() {
            *b = (i / 512) as u8;
        }
        std::fs::write(&path, &content).unwrap();
        let chain = block_backend::open(&path, OpenOptions::read_write()).unwrap();
        let engine = new_engine(EngineKind::IoUring, chain, 16).unwrap();
        let mem = GuestMemoryMmap::from_ranges(&[(GuestAddress(0), 4 << 20)]).unwrap();
        let vq = MockSplitQueue::new(&mem, 16);
        let status = Arc::new(AtomicU32::new(0));
        let irq = Arc::new(EventFd::new(EFD_NONBLOCK).unwrap());
        let (s, i) = (status.clone(), irq.clone());
        let dev = VirtioBlk::new(
            vec![engine],
            mem.clone(),
            vec![Queue::new(256).unwrap()],
            Config { id: "t".into() },
            Box::new(move |_| {
                s.fetch_or(INT_VRING, Ordering::SeqCst);
                let _ = i.write(1);
            }),
        )
        .unwrap();
        let t = VirtioMmio::new(dev, status, EventFd::new(EFD_NONBLOCK).unwrap());

        let s = VIRTIO_CONFIG_S_ACKNOWLEDGE | VIRTIO_CONFIG_S_DRIVER;
        w32(&t, 0x70, s);
        w32(&t, 0x14, 0);
        let low = r32(&t, 0x10);
        w32(&t, 0x24, 0);
        w32(&t, 0x20, low);
        w32(&t, 0x24, 1);
        w32(&t, 0x20, 1); // VIRTIO_F_VERSION_1
        w32(&t, 0x70, s | VIRTIO_CONFIG_S_FEATURES_OK);
        w32(&t, 0x30, 0);
        w32(&t, 0x38, 16);
        for (reg, addr) in [
            (0x80, vq.desc_table_addr().0),
            (0x90, vq.avail_addr().0),
            (0xa0, vq.used_addr().0),
        ] {
            w32(&t, reg, addr as u32);
            w32(&t, reg + 4, (addr >> 32) as u32);
        }
        w32(&t, 0x44, 1);
        let ok = s | VIRTIO_CONFIG_S_FEATURES_OK | VIRTIO_CONFIG_S_DRIVER_OK;
        assert_eq!(w32(&t, 0x70, ok), Action::Kick);

        const HDR: u64 = 0x10_0000;
        const DATA: u64 = 0x20_0000;
        const STATUS: u64 = 0x30_0000;
        let mut next = 0u16;
        let mut submit = |kind: u32, sector: u64, data_writable: bool| {
            mem.write_obj(kind, GuestAddress(HDR)).unwrap();
            mem.write_obj(0u32, GuestAddress(HDR + 4)).unwrap();
            mem.write_obj(sector, GuestAddress(HDR + 8)).unwrap();
            mem.write_obj(0xffu8, GuestAddress(STATUS)).unwrap();
            let w = if data_writable { VRING_DESC_F_WRITE } else { 0 };
            let descs = [
                (HDR, 16, VRING_DESC_F_NEXT),
                (DATA, 1024, w | VRING_DESC_F_NEXT),
                (STATUS, 1, VRING_DESC_F_WRITE),
            ];
            let raw: Vec<RawDescriptor> = descs
                .iter()
                .enumerate()
                .map(|(k, &(a, l, f))| {
                    RawDescriptor::from(Descriptor::new(a, l, f as u16, next + k as u16 + 1))
                })
                .collect();
            vq.add_desc_chains(&raw, next).unwrap();
            next += 3;
            t.device()
                .with_active_device(|d| {
                    d.process_queue(0).unwrap();
                    while d.pending() > 0 {
                        d.process_completions(true).unwrap();
                    }
                })
                .expect("the device is active");
            mem.read_obj::<u8>(GuestAddress(STATUS)).unwrap()
        };

        // Read sectors 3 and 4.
        assert_eq!(submit(0, 3, true), 0, "VIRTIO_BLK_S_OK");
        let mut got = vec![0u8; 1024];
        mem.read_slice(&mut got, GuestAddress(DATA)).unwrap();
        assert_eq!(got, content[3 * 512..5 * 512]);
        assert_eq!(vq.used().idx().load(), 1);
        assert_eq!(r32(&t, 0x60) & INT_VRING, INT_VRING);
        assert!(
            irq.read().unwrap() >= 1,
            "interrupt raised through the irqfd"
        );
        w32(&t, 0x64, INT_VRING);
        assert_eq!(r32(&t, 0x60), 0);

        // Write sectors 8 and 9, then read them back.
        mem.write_slice(&[0xabu8; 1024], GuestAddress(DATA))
            .unwrap();
        assert_eq!(submit(1, 8, false), 0);
        mem.write_slice(&[0u8; 1024], GuestAddress(DATA)).unwrap();
        assert_eq!(submit(0, 8, true), 0);
        mem.read_slice(&mut got, GuestAddress(DATA)).unwrap();
        assert!(got.iter().all(|&b| b == 0xab));
        assert_eq!(vq.used().idx().load(), 3);

        // A reset waits for nothing in flight and clears the queue.
        w32(&t, 0x70, 0);
        assert!(t.device().with_active_device(|_| ()).is_none());
        assert_eq!(r32(&t, 0x44), 0);
        drop(t);
        let on_disk = std::fs::read(&path).unwrap();
        assert!(on_disk[8 * 512..10 * 512].iter().all(|&b| b == 0xab));
    }
}
