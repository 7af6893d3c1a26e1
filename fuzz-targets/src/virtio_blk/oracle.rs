//! The oracle half of the harness: which requests raced which, what each answer must be, and
//! how the flat disk model changes.

use super::*;

impl Harness {
    /// Guest ranges other requests in flight at the same time as `i` may write, plus (with
    /// `driver`) what the driver wrote while `i` was in flight.
    pub(super) fn clobbers(&self, i: usize, driver: bool) -> Vec<(u64, u64)> {
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

    pub(super) fn check_answer(&mut self, i: usize) {
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
    pub(super) fn own_bytes(&self, i: usize) -> Vec<(u64, u64)> {
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

    pub(super) fn check_get_id(&mut self, i: usize) {
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

    pub(super) fn check_in(&mut self, i: usize) {
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
    pub(super) fn concurrent(&self, a: usize, b: usize) -> bool {
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
    pub(super) fn ranges(&self, i: usize) -> Option<Vec<(u64, u64)>> {
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
    pub(super) fn possible(&self, i: usize) -> Option<Vec<Piece>> {
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
    pub(super) fn effect(&self, i: usize) -> Option<Vec<Piece>> {
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
    pub(super) fn fold(&mut self) {
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
    pub(super) fn classify(&self, queue: usize, head: u16, pop: u32, descs: Vec<D>) -> Rec {
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
