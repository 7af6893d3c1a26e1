//! Which guest pages changed: KVM's dirty log (guest writes) and a bitmap the disk devices
//! mark (host writes into guest memory, which KVM does not see), and sending a set of pages.
//!
//! A dirty set is one bitmap per memory slot, in KVM's layout (bit `i` of word `i / 64` is
//! page `i` of the slot), slots in the order of `GuestMemoryMmap::iter()` (which is how the
//! VMM numbered them). Invariant: a page written after its bit was taken is marked again
//! (KVM re-arms write protection when the log is read; devices mark on completion), so the
//! union of every set taken up to the pause, plus the set taken while paused, covers every
//! page that differs from what was sent.

use std::sync::atomic::{AtomicU64, Ordering};

use kvm_bindings::{kvm_userspace_memory_region, KVM_MEM_LOG_DIRTY_PAGES};
use kvm_ioctls::VmFd;
use vm_memory::{
    Bytes, GuestAddress, GuestMemoryBackend, GuestMemoryMmap, GuestMemoryRegion,
    MemoryRegionAddress,
};

use super::stream::{Record, Sender, StreamError, MAX_PAGES_PER_RECORD, PAGE};
use crate::{Error, Result};

/// A dirty set: per slot, one bit per page.
pub type DirtySet = Vec<Vec<u64>>;

/// Turns KVM's dirty logging of every slot on or off.
pub fn set_logging(vm: &VmFd, mem: &GuestMemoryMmap, on: bool) -> Result<()> {
    for (slot, region) in mem.iter().enumerate() {
        let host = region
            .get_host_address(MemoryRegionAddress(0))
            .map_err(|e| Error::Setup(format!("guest memory: {e}")))?;
        let r = kvm_userspace_memory_region {
            slot: slot as u32,
            flags: if on { KVM_MEM_LOG_DIRTY_PAGES } else { 0 },
            guest_phys_addr: region.start_addr().0,
            memory_size: region.len(),
            userspace_addr: host as u64,
        };
        // SAFETY: the same slot, address, size and mapping the VMM registered at start (only
        // the flags change); `mem` owns the mapping and outlives the VM.
        unsafe { vm.set_user_memory_region(r) }
            .map_err(|e| Error::kvm("KVM_SET_USER_MEMORY_REGION (dirty logging)", e))?;
    }
    Ok(())
}

/// Takes (and clears) KVM's dirty log of every slot.
pub fn take_kvm(vm: &VmFd, mem: &GuestMemoryMmap) -> Result<DirtySet> {
    mem.iter()
        .enumerate()
        .map(|(slot, r)| {
            vm.get_dirty_log(slot as u32, r.len() as usize)
                .map_err(|e| Error::kvm("KVM_GET_DIRTY_LOG", e))
        })
        .collect()
}

/// Pages written by devices, marked from their threads.
pub struct DevicePages {
    regions: Vec<(u64, u64)>,
    bits: Vec<Vec<AtomicU64>>,
}

impl DevicePages {
    /// An empty set over the slots of `mem`.
    pub fn new(mem: &GuestMemoryMmap) -> DevicePages {
        let regions: Vec<(u64, u64)> = mem.iter().map(|r| (r.start_addr().0, r.len())).collect();
        let bits = regions
            .iter()
            .map(|&(_, len)| (0..words(len)).map(|_| AtomicU64::new(0)).collect())
            .collect();
        DevicePages { regions, bits }
    }

    /// Marks every page of `len` bytes at `gpa` (parts outside guest memory are ignored).
    pub fn mark(&self, gpa: u64, len: usize) {
        if len == 0 {
            return;
        }
        let end = gpa.saturating_add(len as u64);
        for (&(start, rlen), bits) in self.regions.iter().zip(&self.bits) {
            let (lo, hi) = (gpa.max(start), end.min(start + rlen));
            if lo >= hi {
                continue;
            }
            for page in (lo - start) / PAGE as u64..=(hi - 1 - start) / PAGE as u64 {
                bits[(page / 64) as usize].fetch_or(1 << (page % 64), Ordering::SeqCst);
            }
        }
    }

    /// Takes the marked pages, clearing them.
    pub fn take(&self) -> DirtySet {
        self.bits
            .iter()
            .map(|b| b.iter().map(|w| w.swap(0, Ordering::SeqCst)).collect())
            .collect()
    }
}

fn words(len: u64) -> usize {
    (len / PAGE as u64).div_ceil(64) as usize
}

/// The first pass: the pages of `mem` that may hold data ([`crate::pages::populated`]). A
/// page never populated is zero at the target too; one populated later is logged by KVM or
/// marked by the device hook, since logging is on before this is taken.
pub fn first_pass(mem: &GuestMemoryMmap) -> DirtySet {
    crate::pages::populated(mem)
}

/// `into |= from`, slot by slot.
pub fn merge(into: &mut DirtySet, from: &DirtySet) {
    for (a, b) in into.iter_mut().zip(from) {
        for (x, y) in a.iter_mut().zip(b) {
            *x |= y;
        }
    }
}

/// Pages in `set`.
pub fn count(set: &DirtySet) -> u64 {
    set.iter()
        .flatten()
        .map(|w| u64::from(w.count_ones()))
        .sum()
}

/// What sending a set cost.
#[derive(Debug, Default, Clone, Copy)]
pub struct Sent {
    /// Pages sent with their contents.
    pub data_pages: u64,
    /// Pages sent as zero records (or skipped, on the first pass).
    pub zero_pages: u64,
}

/// Sends the pages of `set` from `mem`: runs of non-zero pages as page records, runs of zero
/// pages as zero records, or not at all with `skip_zero` (the target's memory starts zeroed).
/// `pace` is called after each record with the bytes sent so far (bandwidth limit).
pub fn send<W: std::io::Write>(
    tx: &mut Sender<W>,
    mem: &GuestMemoryMmap,
    set: &DirtySet,
    skip_zero: bool,
    pace: &mut dyn FnMut(u64),
) -> std::result::Result<Sent, StreamError> {
    let mut sent = Sent::default();
    let mut buf = vec![0u8; MAX_PAGES_PER_RECORD * PAGE];
    for (region, bits) in mem.iter().zip(set) {
        let base = region.start_addr().0;
        let pages = region.len() / PAGE as u64;
        let mut p = 0u64;
        while p < pages {
            if bits[(p / 64) as usize] & (1 << (p % 64)) == 0 {
                // Skip clear words quickly.
                p = if p % 64 == 0 && bits[(p / 64) as usize] == 0 {
                    p + 64
                } else {
                    p + 1
                };
                continue;
            }
            // A run of marked pages, at most one record long.
            let mut n = 0u64;
            while p + n < pages
                && n < MAX_PAGES_PER_RECORD as u64
                && bits[((p + n) / 64) as usize] & (1 << ((p + n) % 64)) != 0
            {
                n += 1;
            }
            let bytes = &mut buf[..(n as usize) * PAGE];
            // A volatile copy: the guest may be writing these pages right now (then they are
            // marked again and go in a later pass).
            if mem
                .read_slice(bytes, GuestAddress(base + p * PAGE as u64))
                .is_err()
            {
                return Err(StreamError::Io {
                    peer: "guest memory".into(),
                    what: format!("read {n} pages at {:#x}", base + p * PAGE as u64),
                    offset: tx.offset,
                    source: std::io::ErrorKind::InvalidInput.into(),
                });
            }
            send_run(tx, base + p * PAGE as u64, bytes, skip_zero, &mut sent)?;
            pace(tx.offset);
            p += n;
        }
    }
    Ok(sent)
}

/// Sends `bytes` (whole pages at `gpa`) split into zero and non-zero runs.
fn send_run<W: std::io::Write>(
    tx: &mut Sender<W>,
    gpa: u64,
    bytes: &[u8],
    skip_zero: bool,
    sent: &mut Sent,
) -> std::result::Result<(), StreamError> {
    let zero = [0u8; PAGE];
    let is_zero: Vec<bool> = bytes.chunks(PAGE).map(|p| p == zero).collect();
    let mut i = 0;
    while i < is_zero.len() {
        let z = is_zero[i];
        let mut j = i;
        while j < is_zero.len() && is_zero[j] == z {
            j += 1;
        }
        let at = gpa + (i * PAGE) as u64;
        if z {
            sent.zero_pages += (j - i) as u64;
            if !skip_zero {
                tx.send(&Record::Zero {
                    gpa: at,
                    pages: (j - i) as u32,
                })?;
            }
        } else {
            sent.data_pages += (j - i) as u64;
            tx.pages(at, &bytes[i * PAGE..j * PAGE])?;
        }
        i = j;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn mem() -> GuestMemoryMmap {
        GuestMemoryMmap::from_ranges(&[
            (GuestAddress(0), 1 << 20),
            (GuestAddress(1 << 32), 64 * PAGE),
        ])
        .unwrap()
    }

    /// Every page of `mem`.
    fn all(mem: &GuestMemoryMmap) -> DirtySet {
        mem.iter()
            .map(|r| crate::pages::every((r.len() / PAGE as u64) as usize))
            .collect()
    }

    #[test]
    fn device_marks_cover_every_touched_page_and_are_taken_once() {
        let m = mem();
        let d = DevicePages::new(&m);
        d.mark(PAGE as u64 - 1, 2); // pages 0 and 1
        d.mark(10 * PAGE as u64, PAGE); // page 10 only
        d.mark((1 << 32) + 63 * PAGE as u64, 2 * PAGE); // last page of slot 1, rest outside
        d.mark(0x8000_0000, 4096); // in no slot
        let set = d.take();
        assert_eq!(set[0][0], 0b100_0000_0011);
        assert_eq!(set[1][0], 1 << 63);
        assert_eq!(count(&set), 4);
        assert_eq!(count(&d.take()), 0);
    }

    #[test]
    fn all_pages_counts_each_page_once_and_merge_is_a_union() {
        let m = mem();
        let mut a = all(&m);
        assert_eq!(count(&a), 256 + 64);
        let d = DevicePages::new(&m);
        d.mark(0, 1);
        let mut b = d.take();
        merge(&mut b, &a);
        assert_eq!(count(&b), 256 + 64);
        a[0][0] = 0;
        assert_eq!(count(&a), 256 + 64 - 64);
    }

    #[test]
    fn sending_splits_zero_and_data_runs_and_reaches_the_same_memory() {
        let m = mem();
        m.write_slice(&[1u8; 3], GuestAddress(5 * PAGE as u64))
            .unwrap();
        m.write_slice(&[2u8; PAGE], GuestAddress((1 << 32) + PAGE as u64))
            .unwrap();
        let mut out = Vec::new();
        let mut tx = Sender::new(&mut out, "t");
        let mut paced = 0;
        let s = send(&mut tx, &m, &first_pass(&m), true, &mut |_| paced += 1).unwrap();
        // Only populated pages are looked at (transparent huge pages may populate more than
        // the two written), and only the two holding data are sent.
        assert_eq!(s.data_pages, 2);
        assert!(s.zero_pages < 256 + 64 - 2, "{s:?}");
        assert!(paced > 0);
        // Replayed into fresh memory, the pages come back.
        let copy = mem();
        let mut rx = super::super::stream::Receiver::new(&out[..], "t");
        while rx.offset < out.len() as u64 {
            match rx.record().unwrap() {
                Record::Pages { gpa, data } => copy.write_slice(&data, GuestAddress(gpa)).unwrap(),
                other => panic!("{other:?}"),
            }
        }
        let (mut a, mut b) = (vec![0u8; 1 << 20], vec![0u8; 1 << 20]);
        m.read_slice(&mut a, GuestAddress(0)).unwrap();
        copy.read_slice(&mut b, GuestAddress(0)).unwrap();
        assert!(a == b);
        // Not skipping zeros: a dirty page that became zero is sent as such.
        let mut out = Vec::new();
        let mut tx = Sender::new(&mut out, "t");
        let d = DevicePages::new(&m);
        d.mark(0, PAGE);
        send(&mut tx, &m, &d.take(), false, &mut |_| {}).unwrap();
        let mut rx = super::super::stream::Receiver::new(&out[..], "t");
        assert_eq!(rx.record().unwrap(), Record::Zero { gpa: 0, pages: 1 });
    }
}
