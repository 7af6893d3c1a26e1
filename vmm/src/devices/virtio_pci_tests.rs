//! Tests of the virtio-pci function: config space, BAR0, capabilities, MSI-X, and a driver's
//! whole conversation carrying requests.

use std::sync::atomic::AtomicU32;

use block_backend::virtio_blk::{Config, VirtioBlk};
use virtio_bindings::virtio_config::{
    VIRTIO_CONFIG_S_ACKNOWLEDGE, VIRTIO_CONFIG_S_DRIVER, VIRTIO_CONFIG_S_DRIVER_OK,
    VIRTIO_CONFIG_S_FEATURES_OK,
};
use virtio_queue::Queue;
use vm_memory::{GuestAddress, GuestMemoryMmap};
use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};

use super::*;
use crate::devices::msix::MsiRouter;

const BAR: u32 = 0xe000_8000;

#[derive(Default)]
struct Recorder(std::sync::Mutex<Vec<(u32, u64, u32)>>);

impl MsiRouter for Recorder {
    fn set_msi(&self, gsi: u32, address: u64, data: u32) -> Result<(), String> {
        self.0.lock().unwrap().push((gsi, address, data));
        Ok(())
    }
}

/// `(address, registered)` of each ioeventfd change.
type IoeventLog = Arc<std::sync::Mutex<Vec<(u64, bool)>>>;

struct Rig {
    f: VirtioPci,
    ioevents: IoeventLog,
    irqs: Vec<Arc<EventFd>>,
    routes: Arc<Recorder>,
    /// INTA#'s line and every level it was set to.
    line: Arc<crate::devices::intx::SharedLine>,
    levels: Arc<crate::devices::intx::tests::Levels>,
    mem: GuestMemoryMmap,
    _dir: tempfile::TempDir,
}

/// A function over a 1 MiB disk whose sector `s` is filled with byte `s`, with two queues.
fn rig() -> Rig {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("disk.raw");
    let content: Vec<u8> = (0..1 << 20).map(|i| (i / 512) as u8).collect();
    std::fs::write(&path, content).unwrap();
    let mem = GuestMemoryMmap::from_ranges(&[(GuestAddress(0), 4 << 20)]).unwrap();
    let engines = crate::disks::open_engines(&path, false, 2).unwrap();
    let irqs: Vec<Arc<EventFd>> = (0..3)
        .map(|_| Arc::new(EventFd::new(EFD_NONBLOCK).unwrap()))
        .collect();
    let routes = Arc::new(Recorder::default());
    let fds = irqs.iter().map(|e| e.try_clone().unwrap()).collect();
    let msix = Arc::new(Msix::new(fds, vec![24, 25, 26], routes.clone()));
    let vectors = Arc::new(Vectors::new(2));
    let isr = Arc::new(AtomicU32::new(0));
    let (line, levels) = crate::devices::intx::tests::recorded_line();
    let intx = Arc::new(line.function());
    let notify = notifier(isr.clone(), msix.clone(), vectors.clone(), intx.clone());
    let dev = VirtioBlk::new(
        engines,
        mem.clone(),
        vec![Queue::new(256).unwrap(), Queue::new(256).unwrap()],
        Config { id: "pci".into() },
        notify,
    )
    .unwrap();
    let dev = Arc::new(VirtioDevice::new(
        dev,
        isr,
        EventFd::new(EFD_NONBLOCK).unwrap(),
    ));
    let ioevents = IoeventLog::default();
    let log = ioevents.clone();
    let hook: IoeventHook = Box::new(move |_, addr, register| {
        log.lock().unwrap().push((addr, register));
        Ok(())
    });
    Rig {
        f: VirtioPci::new(dev, 2, msix, vectors, intx, BAR, Some(hook)),
        ioevents,
        line,
        levels,
        irqs,
        routes,
        mem,
        _dir: dir,
    }
}

fn cfg(f: &VirtioPci, off: usize, len: usize) -> u32 {
    let mut b = [0u8; 4];
    f.config_read(off, &mut b[..len]);
    u32::from_le_bytes(b)
}

fn set_cfg(f: &VirtioPci, off: usize, v: u32, len: usize) {
    f.config_write(off, &v.to_le_bytes()[..len]);
}

fn bar(f: &VirtioPci, off: u64, len: usize) -> u64 {
    let mut b = [0u8; 8];
    f.bar_read(off, &mut b[..len]);
    u64::from_le_bytes(b)
}

fn set_bar(f: &VirtioPci, off: u64, v: u64, len: usize) -> Action {
    f.bar_write(off, &v.to_le_bytes()[..len])
}

/// The vendor capabilities as `(cfg_type, bar, offset, length)`, walking the list.
fn vendor_caps(f: &VirtioPci) -> Vec<(u8, u8, u32, u32)> {
    let mut caps = Vec::new();
    let mut at = cfg(f, 0x34, 1) as usize;
    let mut seen = 0;
    while at != 0 {
        seen += 1;
        assert!(seen < 48, "capability loop");
        assert_eq!(at % 4, 0, "capability alignment");
        if cfg(f, at, 1) == 0x09 {
            caps.push((
                cfg(f, at + 3, 1) as u8,
                cfg(f, at + 4, 1) as u8,
                cfg(f, at + 8, 4),
                cfg(f, at + 12, 4),
            ));
        }
        at = cfg(f, at + 1, 1) as usize;
    }
    caps
}

#[test]
fn identifies_as_a_modern_virtio_block_function_with_inta() {
    let r = rig();
    assert_eq!(cfg(&r.f, 0, 4), 0x1042_1af4);
    assert_eq!(cfg(&r.f, 0x08, 1), 1, "revision 1");
    assert_eq!(cfg(&r.f, 0x2e, 2), 0x40, "subsystem id");
    assert_eq!(cfg(&r.f, 0x3d, 1), 1, "interrupt pin: INTA#");
    assert_ne!(cfg(&r.f, 0x06, 2) & 0x10, 0, "capability list");
    assert_eq!(cfg(&r.f, 0x0e, 1), 0, "header type 0");
}

#[test]
fn capabilities_point_at_regions_inside_bar0() {
    let r = rig();
    let caps = vendor_caps(&r.f);
    let kinds: Vec<u8> = caps.iter().map(|c| c.0).collect();
    assert_eq!(kinds, vec![1, 2, 3, 4, 5]);
    for &(kind, b, off, len) in &caps[..4] {
        assert_eq!(b, 0, "type {kind} in BAR0");
        assert!(u64::from(off) + u64::from(len) <= BAR0_SIZE, "type {kind}");
    }
    assert!(caps[0].3 >= 56, "common cfg holds the whole structure");
    assert_eq!(cfg(&r.f, CAP_NOTIFY + 16, 4), NOTIFY_MULTIPLIER);
    // MSI-X: 3 vectors, table and PBA in BAR0.
    assert_eq!(cfg(&r.f, CAP_MSIX, 1), 0x11);
    assert_eq!(cfg(&r.f, CAP_MSIX + 2, 2), 2, "table size N - 1");
    assert_eq!(cfg(&r.f, CAP_MSIX + 4, 4), MSIX_TABLE as u32);
    assert_eq!(cfg(&r.f, CAP_MSIX + 8, 4), MSIX_PBA as u32);
}

#[test]
fn bar0_sizes_decodes_only_with_memory_enabled_and_moves_with_its_ioeventfds() {
    let r = rig();
    let log = |r: &Rig| std::mem::take(&mut *r.ioevents.lock().unwrap());
    assert_eq!(cfg(&r.f, 0x10, 4), BAR);
    assert_eq!(r.f.decoded_bar(), None, "memory space off");
    set_cfg(&r.f, 0x10, 0xffff_ffff, 4);
    assert_eq!(cfg(&r.f, 0x10, 4), 0xffff_8000, "32 KiB, 32-bit memory");
    set_cfg(&r.f, 0x04, 0x2, 2);
    assert_eq!(r.f.decoded_bar(), None, "sizing value: not decoded");
    assert_eq!(log(&r), vec![], "nothing decoded yet");
    set_cfg(&r.f, 0x10, BAR, 4);
    assert_eq!(r.f.decoded_bar(), Some((u64::from(BAR), BAR0_SIZE)));
    let notify = |base: u32, q: u64| u64::from(base) + NOTIFY + 4 * q;
    assert_eq!(
        log(&r),
        vec![(notify(BAR, 0), true), (notify(BAR, 1), true)]
    );
    // Linux assigns a hot-added function's BAR itself: decoding and ioeventfds follow.
    set_cfg(&r.f, 0x10, 0xe010_0000, 4);
    assert_eq!(cfg(&r.f, 0x10, 4), 0xe010_0000);
    assert_eq!(r.f.decoded_bar(), Some((0xe010_0000, BAR0_SIZE)));
    let moved = vec![
        (notify(BAR, 0), false),
        (notify(BAR, 1), false),
        (notify(0xe010_0000, 0), true),
        (notify(0xe010_0000, 1), true),
    ];
    assert_eq!(log(&r), moved);
    // Outside the host bridge's window it does not decode.
    set_cfg(&r.f, 0x10, 0x1000_0000, 4);
    assert_eq!(r.f.decoded_bar(), None);
    assert_eq!(log(&r).iter().filter(|e| e.1).count(), 0);
    set_cfg(&r.f, 0x10, BAR, 4);
    set_cfg(&r.f, 0x04, 0, 2);
    assert_eq!(r.f.decoded_bar(), None, "memory space off again");
    assert_eq!(log(&r).last(), Some(&(notify(BAR, 1), false)));
    set_cfg(&r.f, 0x04, 0x2, 2);
    r.f.release_ioevents();
    assert_eq!(
        log(&r)[2..],
        [(notify(BAR, 0), false), (notify(BAR, 1), false)]
    );
    for other in [0x14, 0x18, 0x1c, 0x20, 0x24, 0x30] {
        set_cfg(&r.f, other, 0xffff_ffff, 4);
        assert_eq!(
            cfg(&r.f, other, 4),
            0,
            "BAR/ROM at {other:#x} does not exist"
        );
    }
    set_cfg(&r.f, 0x00, 0, 4);
    assert_eq!(cfg(&r.f, 0, 4), 0x1042_1af4, "ids are read-only");
}

#[test]
fn config_accesses_out_of_range_or_of_odd_sizes_are_refused() {
    let r = rig();
    let mut b = [0u8; 4];
    r.f.config_read(256, &mut b);
    assert_eq!(b, [0xff; 4]);
    r.f.config_read(0x3e, &mut b);
    assert_eq!(b, [0xff; 4], "straddles a register");
    let mut three = [0u8; 3];
    r.f.config_read(0, &mut three);
    assert_eq!(three, [0xff; 3]);
    r.f.config_write(usize::MAX, &[1]);
    r.f.config_write(0x10, &[0; 8]);
    assert_eq!(cfg(&r.f, 0x10, 4), BAR);
}

#[test]
fn bar0_accesses_outside_the_regions_are_ignored() {
    let r = rig();
    assert_eq!(set_bar(&r.f, 0x38, 5, 4), Action::None, "past common cfg");
    assert_eq!(bar(&r.f, 0x38, 4), 0);
    assert_eq!(bar(&r.f, 0x14, 4), 0, "status is a byte register");
    assert_eq!(
        set_bar(&r.f, 0x12, 9, 2),
        Action::None,
        "num_queues is read-only"
    );
    assert_eq!(bar(&r.f, 0x12, 2), 2);
    assert_eq!(set_bar(&r.f, NOTIFY + 8, 0, 2), Action::None, "no queue 2");
    assert_eq!(set_bar(&r.f, NOTIFY + 4, 1, 2), Action::Kick);
    assert_eq!(bar(&r.f, ISR, 4), 0, "ISR is one byte");
    assert_eq!(bar(&r.f, BAR0_SIZE - 4, 4), 0);
    assert_eq!(set_bar(&r.f, 0x7ff0, 1, 8), Action::None);
    assert_eq!(
        set_bar(&r.f, MSIX_TABLE + 3 * 16, 0, 4),
        Action::None,
        "entry 3"
    );
    assert_eq!(bar(&r.f, MSIX_TABLE + 12, 4), 1, "entry 0 masked");
    assert_eq!(set_bar(&r.f, u64::MAX - 1, 0, 2), Action::None);
}

#[test]
fn vectors_past_the_table_read_back_as_no_vector_and_reset_clears_them() {
    let r = rig();
    set_bar(&r.f, 0x10, 0, 2);
    assert_eq!(bar(&r.f, 0x10, 2), 0);
    set_bar(&r.f, 0x16, 1, 2);
    set_bar(&r.f, 0x1a, 3, 2);
    assert_eq!(bar(&r.f, 0x1a, 2), u64::from(NO_VECTOR), "only 3 vectors");
    set_bar(&r.f, 0x1a, 2, 2);
    assert_eq!(bar(&r.f, 0x1a, 2), 2);
    set_bar(&r.f, 0x16, 7, 2);
    assert_eq!(bar(&r.f, 0x18, 2), 0, "queue 7 does not exist");
    set_bar(&r.f, 0x1a, 1, 2);
    assert_eq!(bar(&r.f, 0x1a, 2), u64::from(NO_VECTOR));
    set_bar(&r.f, 0x14, 0, 1);
    assert_eq!(bar(&r.f, 0x10, 2), u64::from(NO_VECTOR));
    assert_eq!(bar(&r.f, 0x16, 2), 0, "queue_select reset");
}

#[test]
fn msix_control_in_config_space_reaches_the_vectors() {
    let r = rig();
    set_bar(&r.f, MSIX_TABLE, 0xfee0_0000, 4);
    set_bar(&r.f, MSIX_TABLE + 8, 0x41, 4);
    set_bar(&r.f, MSIX_TABLE + 12, 0, 4);
    assert!(
        r.routes.0.lock().unwrap().is_empty(),
        "MSI-X still disabled"
    );
    set_cfg(&r.f, CAP_MSIX + 2, 0xffff, 2);
    assert_eq!(
        cfg(&r.f, CAP_MSIX + 2, 2),
        0xc002,
        "enable, mask; size read-only"
    );
    set_cfg(&r.f, CAP_MSIX + 3, 0x80, 1);
    assert_eq!(*r.routes.0.lock().unwrap(), vec![(24, 0xfee0_0000, 0x41)]);
}

/// The Linux driver's sequence through BAR0: features, two queues (with their own vectors 1
/// and 2 when `msix`, else MSI-X left off and no vectors), DRIVER_OK.
fn start_driver(
    r: &Rig,
    msix: bool,
) -> Vec<virtio_queue::mock::MockSplitQueue<'_, GuestMemoryMmap>> {
    use virtio_queue::mock::MockSplitQueue;

    let f = &r.f;
    set_cfg(f, 0x04, 0x6, 2);
    if msix {
        set_cfg(f, CAP_MSIX + 2, 0x8000, 2);
        for v in 0..3u64 {
            set_bar(f, MSIX_TABLE + 16 * v, 0xfee0_0000, 4);
            set_bar(f, MSIX_TABLE + 16 * v + 8, 0x30 + v, 4);
            set_bar(f, MSIX_TABLE + 16 * v + 12, 0, 4);
        }
    }
    let s = u64::from(VIRTIO_CONFIG_S_ACKNOWLEDGE | VIRTIO_CONFIG_S_DRIVER);
    set_bar(f, 0x14, s, 1);
    set_bar(f, 0x00, 0, 4);
    let low = bar(f, 0x04, 4);
    set_bar(f, 0x00, 1, 4);
    assert_eq!(bar(f, 0x04, 4) & 1, 1, "VIRTIO_F_VERSION_1");
    set_bar(f, 0x08, 0, 4);
    set_bar(f, 0x0c, low, 4);
    set_bar(f, 0x08, 1, 4);
    set_bar(f, 0x0c, 1, 4);
    set_bar(f, 0x14, s | u64::from(VIRTIO_CONFIG_S_FEATURES_OK), 1);
    assert_ne!(bar(f, 0x14, 1) & u64::from(VIRTIO_CONFIG_S_FEATURES_OK), 0);
    set_bar(f, 0x10, if msix { 0 } else { u64::from(NO_VECTOR) }, 2);
    let vqs: Vec<MockSplitQueue<GuestMemoryMmap>> = (0..2)
        .map(|i| MockSplitQueue::create(&r.mem, GuestAddress(0x1_0000 * (i + 1)), 16))
        .collect();
    for (q, vq) in vqs.iter().enumerate() {
        set_bar(f, 0x16, q as u64, 2);
        assert_eq!(bar(f, 0x18, 2), 256, "queue_size starts at the maximum");
        assert_eq!(bar(f, 0x1e, 2), q as u64, "queue_notify_off");
        set_bar(f, 0x18, 16, 2);
        let vector = if msix {
            1 + q as u64
        } else {
            u64::from(NO_VECTOR)
        };
        set_bar(f, 0x1a, vector, 2);
        set_bar(f, 0x20, vq.desc_table_addr().0, 8);
        set_bar(f, 0x28, vq.avail_addr().0, 4);
        set_bar(f, 0x2c, vq.avail_addr().0 >> 32, 4);
        set_bar(f, 0x30, vq.used_addr().0, 8);
        set_bar(f, 0x1c, 1, 2);
        assert_eq!(bar(f, 0x28, 8), vq.avail_addr().0);
        assert_eq!(bar(f, 0x1c, 2), 1);
    }
    let ok = s | u64::from(VIRTIO_CONFIG_S_FEATURES_OK | VIRTIO_CONFIG_S_DRIVER_OK);
    assert_eq!(set_bar(f, 0x14, ok, 1), Action::Kick);
    vqs
}

const HDR: u64 = 0x10_0000;
const DATA: u64 = 0x20_0000;
const STATUS: u64 = 0x30_0000;

/// Reads sector 5 through queue `q` (chain number `n` of that queue) and runs the device
/// until it completes; checks the bytes and the used ring.
fn read_sector_5(
    r: &Rig,
    vq: &virtio_queue::mock::MockSplitQueue<'_, GuestMemoryMmap>,
    q: u16,
    n: u16,
) {
    use virtio_bindings::virtio_ring::{VRING_DESC_F_NEXT, VRING_DESC_F_WRITE};
    use virtio_queue::desc::{split::Descriptor, RawDescriptor};
    use vm_memory::Bytes;

    r.mem.write_obj(0u32, GuestAddress(HDR)).unwrap(); // VIRTIO_BLK_T_IN
    r.mem.write_obj(0u32, GuestAddress(HDR + 4)).unwrap();
    r.mem.write_obj(5u64, GuestAddress(HDR + 8)).unwrap();
    r.mem.write_obj(0xffu8, GuestAddress(STATUS)).unwrap();
    r.mem.write_obj(0u8, GuestAddress(DATA + 100)).unwrap();
    let first = 3 * n;
    let raw: Vec<RawDescriptor> = [
        (HDR, 16, VRING_DESC_F_NEXT),
        (DATA, 512, VRING_DESC_F_WRITE | VRING_DESC_F_NEXT),
        (STATUS, 1, VRING_DESC_F_WRITE),
    ]
    .iter()
    .enumerate()
    .map(|(k, &(a, l, fl))| {
        RawDescriptor::from(Descriptor::new(a, l, fl as u16, first + k as u16 + 1))
    })
    .collect();
    vq.add_desc_chains(&raw, first).unwrap();
    r.f.device()
        .with_active_device(|d| {
            d.process_queue(q).unwrap();
            while d.pending() > 0 {
                d.process_completions(true).unwrap();
            }
        })
        .expect("DRIVER_OK");
    assert_eq!(r.mem.read_obj::<u8>(GuestAddress(STATUS)).unwrap(), 0);
    assert_eq!(r.mem.read_obj::<u8>(GuestAddress(DATA + 100)).unwrap(), 5);
    assert_eq!(vq.used().idx().load(), n + 1);
}

/// A read on queue 1 completes into the used ring and raises queue 1's vector, and INTA#
/// stays low.
#[test]
fn a_request_completes_and_raises_its_queues_msix_vector() {
    let r = rig();
    let vqs = start_driver(&r, true);
    assert_eq!(
        VirtioPci::notify_addr(u64::from(BAR), 1),
        u64::from(BAR) + NOTIFY + 4
    );
    read_sector_5(&r, &vqs[1], 1, 0);
    assert!(r.irqs[2].read().is_ok(), "queue 1's vector 2 fired");
    assert!(r.irqs[1].read().is_err(), "queue 0's vector did not");
    assert!(r
        .routes
        .0
        .lock()
        .unwrap()
        .contains(&(26, 0xfee0_0000, 0x32)));
    assert!(r.levels.0.lock().unwrap().is_empty(), "INTA# never rose");
    assert_eq!(bar(&r.f, ISR, 1), 1, "ISR says a queue");
    assert_eq!(bar(&r.f, ISR, 1), 0, "reading ISR cleared it");
}

/// A driver that leaves MSI-X off (Linux with `pci=nomsi`): a completion asserts INTA# until
/// the driver reads the ISR; with Interrupt Disable set it stays low, and clearing that bit
/// with an interrupt still in the ISR asserts it; a reset lowers it.
#[test]
fn without_msix_a_completion_asserts_inta_until_the_isr_is_read() {
    let r = rig();
    let vqs = start_driver(&r, false);
    read_sector_5(&r, &vqs[0], 0, 0);
    assert!(r.line.is_high(), "INTA# asserted");
    assert!(
        r.irqs.iter().all(|e| e.read().is_err()),
        "no MSI-X vector fired"
    );
    assert_eq!(bar(&r.f, ISR, 1), 1, "ISR says a queue");
    assert!(!r.line.is_high(), "reading the ISR deasserts INTA#");
    assert_eq!(*r.levels.0.lock().unwrap(), vec![true, false]);

    set_cfg(&r.f, 0x04, 0x406, 2); // memory, bus master, INTx disable
    read_sector_5(&r, &vqs[1], 1, 0);
    assert!(!r.line.is_high(), "INTx disabled: no interrupt");
    set_cfg(&r.f, 0x04, 0x6, 2);
    assert!(r.line.is_high(), "INTx enabled again with the ISR set");
    set_bar(&r.f, 0x14, 0, 1); // reset
    assert!(!r.line.is_high(), "a reset deasserts INTA#");
    assert_eq!(bar(&r.f, ISR, 1), 0, "and clears the ISR");
}

#[test]
fn the_pci_cfg_capability_reaches_bar0() {
    let r = rig();
    set_cfg(&r.f, CAP_PCI_CFG + 4, 0, 1);
    set_cfg(&r.f, CAP_PCI_CFG + 8, 0x12, 4); // num_queues
    set_cfg(&r.f, CAP_PCI_CFG + 12, 2, 4);
    assert_eq!(cfg(&r.f, CAP_PCI_CFG + 16, 4) & 0xffff, 2);
    set_cfg(&r.f, CAP_PCI_CFG + 8, 0x16, 4); // queue_select
    set_cfg(&r.f, CAP_PCI_CFG + 16, 1, 4);
    assert_eq!(bar(&r.f, 0x16, 2), 1);
    // A window past BAR0 or of a bad length reaches nothing.
    set_cfg(&r.f, CAP_PCI_CFG + 8, 0xffff_fffe, 4);
    assert_eq!(cfg(&r.f, CAP_PCI_CFG + 16, 4), 0, "nothing there");
    set_cfg(&r.f, CAP_PCI_CFG + 12, 3, 4);
    set_cfg(&r.f, CAP_PCI_CFG + 16, 0, 4);
    assert_eq!(bar(&r.f, 0x16, 2), 1);
}

#[test]
fn a_plugged_function_answers_on_bus_0_until_the_guest_ejects_it_when_asked() {
    use crate::devices::pci::{PciRoot, CONFIG_ADDRESS, CONFIG_DATA};
    use crate::layout::HOTPLUG_PORT;
    let (a, b) = (rig(), rig());
    let root = PciRoot::new(2, vec![Arc::new(a.f)]);
    assert_eq!(root.free_slot(), Some(2));
    root.plug(2, Arc::new(b.f));
    assert_eq!(root.free_slot(), None, "both slots taken");
    let id = |dev: u32| {
        root.pio_out(CONFIG_ADDRESS, &(0x8000_0000u32 | dev << 11).to_le_bytes());
        let mut v = [0u8; 4];
        root.pio_in(CONFIG_DATA, &mut v);
        u32::from_le_bytes(v)
    };
    assert_eq!(id(2), 0x1042_1af4);
    let reg = |off: u16| {
        let mut v = [0u8; 4];
        root.hotplug().pio_in(HOTPLUG_PORT + off, &mut v);
        u32::from_le_bytes(v)
    };
    assert_eq!(reg(0), 1 << 2, "PCIU reports the new function");
    let eject = |bits: u32| root.hotplug_out(HOTPLUG_PORT + 8, &bits.to_le_bytes());
    eject(1 << 1 | 1 << 2);
    assert!(root.take_ejected().is_empty(), "nobody asked for an eject");
    assert_eq!(id(2), 0x1042_1af4);
    root.hotplug().request_remove(2);
    assert_eq!(reg(4), 1 << 2, "PCID");
    eject(1 << 2);
    assert_eq!(id(2), 0xffff_ffff, "gone from the bus");
    assert_eq!(id(1), 0x1042_1af4, "the other stays");
    assert_eq!(
        root.free_slot(),
        None,
        "not free before the main thread took it"
    );
    let taken = root.take_ejected();
    assert_eq!(taken.iter().map(|t| t.0).collect::<Vec<_>>(), vec![2]);
    assert_eq!(root.free_slot(), Some(2));
}

/// What a checkpoint saves of a function comes back on a fresh one: BAR0 where the guest
/// moved it with its notify ioeventfds there, the vector registers, the MSI-X table with the
/// deliverable vector routed again and a masked vector's pending interrupt kept.
#[test]
fn a_saved_function_restores_onto_a_fresh_one_with_its_routes_ioeventfds_and_vectors() {
    let a = rig();
    let moved = 0xe010_0000u32;
    set_cfg(&a.f, 0x10, moved, 4);
    set_cfg(&a.f, 0x04, 0x6, 2);
    // Vector 0 (config) masked; vector 2 unmasked; queue 1 on vector 2.
    set_bar(&a.f, MSIX_TABLE, 0xfee0_0000, 4);
    set_bar(&a.f, MSIX_TABLE + 8, 0x41, 4);
    set_bar(&a.f, MSIX_TABLE + 32, 0xfee0_1000, 4);
    set_bar(&a.f, MSIX_TABLE + 40, 0x42, 4);
    set_bar(&a.f, MSIX_TABLE + 44, 0, 4);
    set_bar(&a.f, 0x10, 0, 2);
    set_bar(&a.f, 0x16, 1, 2);
    set_bar(&a.f, 0x1a, 2, 2);
    set_cfg(&a.f, CAP_MSIX + 3, 0x80, 1);
    a.f.msix().notify(0);
    let saved = a.f.save_state(5, "disk4");
    assert_eq!((saved.slot, saved.id.as_str()), (5, "disk4"));
    assert_eq!(saved.vectors, vec![0, NO_VECTOR, 2]);
    assert_eq!(saved.msix_pending, vec![true, false, false]);

    let b = rig();
    b.f.restore_state(&saved).unwrap();
    assert_eq!(b.f.decoded_bar(), Some((u64::from(moved), BAR0_SIZE)));
    let notify = |q: u64| u64::from(moved) + NOTIFY + 4 * q;
    assert_eq!(
        *b.ioevents.lock().unwrap(),
        vec![(notify(0), true), (notify(1), true)],
        "ioeventfds at the saved BAR0, with no guest access"
    );
    assert_eq!(
        *b.routes.0.lock().unwrap(),
        vec![(26, 0xfee0_1000, 0x42)],
        "only the deliverable vector is routed"
    );
    assert_eq!(cfg(&b.f, 0x10, 4), moved);
    assert_eq!(cfg(&b.f, CAP_MSIX + 2, 2), 0x8002, "enabled, 3 vectors");
    assert_eq!(
        cfg(&b.f, 0, 4),
        0x1042_1af4,
        "read-only bytes are the fresh ones"
    );
    assert_eq!(
        b.f.save_state(5, "disk4"),
        saved,
        "a second save is the same"
    );
    // Queue 1's vector sends through the restored route; the pending one waits for unmask.
    b.f.msix().notify(2);
    assert!(b.irqs[2].read().is_ok());
    assert!(b.irqs[0].read().is_err(), "masked: still pending");
    set_bar(&b.f, MSIX_TABLE + 12, 0, 4);
    assert!(
        b.irqs[0].read().is_ok(),
        "the saved pending interrupt went out"
    );
    set_bar(&b.f, 0x16, 1, 2);
    assert_eq!(bar(&b.f, 0x1a, 2), 2);

    // Shapes this function cannot take are refused before anything changes.
    let c = rig();
    let mut bad = saved.clone();
    bad.vectors.push(0);
    assert!(c
        .f
        .restore_state(&bad)
        .unwrap_err()
        .contains("4 vector registers"));
    let mut bad = saved.clone();
    bad.vectors[1] = 3;
    assert!(c
        .f
        .restore_state(&bad)
        .unwrap_err()
        .contains("past the MSI-X table"));
    let mut bad = saved.clone();
    bad.msix_table.pop();
    assert!(c
        .f
        .restore_state(&bad)
        .unwrap_err()
        .contains("2 MSI-X entries"));
    let mut bad = saved;
    bad.config.truncate(64);
    assert!(c.f.restore_state(&bad).is_err());
    assert_eq!(c.f.decoded_bar(), None);
    assert!(c.routes.0.lock().unwrap().is_empty());
}

/// A restored bus puts each function at its saved device number, and refuses numbers outside
/// its slots or used twice.
#[test]
fn a_restored_bus_holds_functions_in_their_saved_slots_only() {
    let (a, b) = (Arc::new(rig().f), Arc::new(rig().f));
    let root = PciRoot::with_functions(18, vec![(1, a.clone()), (5, b.clone())]).unwrap();
    let id = |dev: u32| {
        root.pio_out(
            super::super::pci::CONFIG_ADDRESS,
            &(0x8000_0000u32 | dev << 11).to_le_bytes(),
        );
        let mut v = [0u8; 4];
        root.pio_in(super::super::pci::CONFIG_DATA, &mut v);
        u32::from_le_bytes(v)
    };
    assert_eq!((id(1), id(5)), (0x1042_1af4, 0x1042_1af4));
    assert_eq!(id(2), 0xffff_ffff);
    assert_eq!(root.free_slot(), Some(2));
    for bad in [0u8, 19] {
        let e = PciRoot::with_functions(18, vec![(bad, a.clone())]).unwrap_err();
        assert!(e.contains(&format!("slot {bad} is not in 1..=18")), "{e}");
    }
    let e = PciRoot::with_functions(18, vec![(3, a), (3, b)]).unwrap_err();
    assert!(e.contains("slot 3 used twice"), "{e}");
}

/// A function saved with MSI-X off and an interrupt in its ISR asserts INTA# again once
/// restored, with no guest access; one saved with INTx disabled does not.
#[test]
fn a_restored_function_without_msix_asserts_inta_from_its_saved_isr() {
    for disabled in [false, true] {
        let a = rig();
        set_cfg(&a.f, 0x04, if disabled { 0x406 } else { 0x6 }, 2);
        a.f.device()
            .interrupt_status()
            .fetch_or(crate::devices::virtio::INT_VRING, Ordering::SeqCst);
        let device = a.f.device().save_state();
        let function = a.f.save_state(1, "disk0");
        let b = rig();
        b.f.device().restore_state(&device).unwrap();
        b.f.restore_state(&function).unwrap();
        assert_eq!(b.line.is_high(), !disabled, "INTx disabled: {disabled}");
        assert_eq!(bar(&b.f, ISR, 1), 1, "the ISR came along");
        assert!(!b.line.is_high(), "and reading it deasserts");
    }
}
