//! The harness: plays the driver (builds and publishes chains, kicks, completes) and reads the
//! used rings after every device call.

use super::*;

pub(super) struct Harness {
    pub(super) lay: Layout,
    pub(super) mem: GuestMemoryMmap,
    /// The driver's copy of each queue's state, popped just before the device pops.
    pub(super) mirror_q: Vec<Queue>,
    pub(super) dev: VirtioBlk,
    pub(super) notified: Arc<[AtomicU32; 2]>,
    pub(super) uring: bool,
    pub(super) read_only: bool,
    pub(super) event_idx: bool,
    pub(super) limits: Limits,
    pub(super) disk_size: u64,
    pub(super) seed: u64,
    pub(super) calls: u32,
    /// Driver writes into guest memory: (time = index of the next device call, range).
    pub(super) driver_writes: Vec<(u32, (u64, u64))>,
    pub(super) records: Vec<Rec>,
    /// Records `[0, applied)` are folded into the model.
    pub(super) applied: usize,
    pub(super) model: Vec<u8>,
    /// 1 where the model knows the disk's byte.
    pub(super) known: Vec<u8>,
    pub(super) model_ok: bool,
    /// The used rings or the chains popped can no longer be trusted: only crash, hang and
    /// read-only checks remain.
    pub(super) unchecked: bool,
    // Driver state.
    pub(super) avail_idx: Vec<u16>,
    pub(super) last_used: Vec<u16>,
    pub(super) next_desc: Vec<u16>,
    pub(super) cursor: u64,
    pub(super) counter: u64,
}

impl Harness {
    /// Writes driver bytes into guest memory (skipping the used rings, which the device owns).
    pub(super) fn poke(&mut self, addr: u64, bytes: &[u8]) {
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

    pub(super) fn alloc(&mut self, len: u64, align: u64) -> u64 {
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

    pub(super) fn write_desc(&mut self, q: usize, idx: u16, d: (u64, u32, u16, u16)) {
        let at = self.lay.desc(q) + 16 * u64::from(idx % self.lay.qsize);
        self.poke(at, &desc_bytes(d));
    }

    pub(super) fn publish(&mut self, q: usize, head: u16) {
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
    pub(super) fn reframe(
        &mut self,
        chain: Vec<(u64, u32, u16)>,
        inp: &mut Input,
    ) -> Vec<(u64, u32, u16)> {
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
    pub(super) fn op_request(&mut self, inp: &mut Input) {
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
    pub(super) fn kick(&mut self, q: usize) {
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

    pub(super) fn complete(&mut self, wait: bool) {
        let call = self.calls;
        let before = self.ring_state();
        self.dev
            .process_completions(wait)
            .unwrap_or_else(|e| panic!("process_completions failed: {e}"));
        self.calls += 1;
        self.after_call(call, before);
    }

    pub(super) fn ring_state(&self) -> Vec<(u16, u32)> {
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
    pub(super) fn after_call(&mut self, call: u32, before: Vec<(u16, u32)>) {
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
}

/// `VHDKIT_FUZZ_TRACE=1`: one line per input on what was checked.
pub(super) fn trace() -> bool {
    static ON: OnceLock<bool> = OnceLock::new();
    *ON.get_or_init(|| std::env::var_os("VHDKIT_FUZZ_TRACE").is_some())
}

pub(super) fn desc_bytes((addr, len, flags, next): (u64, u32, u16, u16)) -> [u8; 16] {
    let mut b = [0u8; 16];
    b[0..8].copy_from_slice(&addr.to_le_bytes());
    b[8..12].copy_from_slice(&len.to_le_bytes());
    b[12..14].copy_from_slice(&flags.to_le_bytes());
    b[14..16].copy_from_slice(&next.to_le_bytes());
    b
}

pub(super) fn new_queue(lay: &Layout, q: usize) -> Queue {
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
pub(super) fn make_engines(
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
