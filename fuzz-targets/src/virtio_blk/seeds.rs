//! Seeds: inputs in the target's encoding, for the corpus.

/// Builds inputs in the target's encoding (for the seed corpus).
pub(super) struct Enc(Vec<u8>);

impl Enc {
    pub(super) fn new(c0: u8, c1: u8, seed: u8) -> Enc {
        Enc(vec![c0, c1, seed])
    }

    /// An IN / OUT (kind 0 / 1) of `lens` sectors each at `sector`.
    pub(super) fn rw(mut self, q: u8, kind: u8, indirect: bool, sector: u16, lens: &[u8]) -> Enc {
        self.0
            .extend([0, q | kind << 1 | u8::from(indirect) << 4, 0]);
        self.0.extend(sector.to_le_bytes());
        self.0.push(lens.len() as u8);
        self.0.extend(lens.iter().map(|l| l - 1));
        self
    }

    pub(super) fn flush(mut self, q: u8) -> Enc {
        self.0.extend([0, q | 2 << 1, 0, 0, 0, 0]);
        self
    }

    pub(super) fn get_id(mut self, q: u8, len: u8) -> Enc {
        self.0.extend([0, q | 3 << 1, 0, 0, 0, 1, len - 1]);
        self
    }

    /// DISCARD (kind 4) / WRITE_ZEROES (kind 5) of (sector, sectors, flags) segments.
    pub(super) fn zero(mut self, q: u8, kind: u8, segs: &[(u16, u16, u8)]) -> Enc {
        self.0.extend([0, q | kind << 1, 0, segs.len() as u8]);
        for &(s, n, f) in segs {
            self.0.extend(s.to_le_bytes());
            self.0.extend(n.to_le_bytes());
            self.0.push(f);
        }
        self
    }

    pub(super) fn kick(mut self, q: u8) -> Enc {
        self.0.extend([5, q]);
        self
    }

    pub(super) fn complete(mut self) -> Enc {
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
