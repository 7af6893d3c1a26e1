//! Guest memory layout: where rings and request buffers live, and range arithmetic.

use super::*;

pub(super) fn overlap(a: (u64, u64), b: (u64, u64)) -> bool {
    a.0 < b.1 && b.0 < a.1 && a.0 < a.1 && b.0 < b.1
}

/// The buffers holding bytes `[from, to)` of `bufs` read as one array (`to` at most their
/// total); `None` if one of them would run past the end of the address space.
pub(super) fn cut(bufs: &[D], from: u64, to: u64) -> Option<Vec<D>> {
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
pub(super) fn span(addr: u64, len: u64) -> (u64, u64) {
    (addr, addr.saturating_add(len))
}

pub(super) struct Layout {
    pub(super) regions: Vec<(u64, u64)>,
    pub(super) qsize: u16,
    pub(super) nq: usize,
}

impl Layout {
    pub(super) fn top(&self) -> u64 {
        self.regions.last().map_or(0, |r| r.1)
    }

    pub(super) fn desc(&self, q: usize) -> u64 {
        q as u64 * RING_STRIDE
    }

    pub(super) fn avail(&self, q: usize) -> u64 {
        q as u64 * RING_STRIDE + AVAIL_OFF
    }

    pub(super) fn used(&self, q: usize) -> u64 {
        q as u64 * RING_STRIDE + USED_OFF
    }

    pub(super) fn used_area(&self, q: usize) -> (u64, u64) {
        span(self.used(q), 6 + 8 * u64::from(self.qsize))
    }

    /// Every ring of every queue: what the device reads when popping, and its used rings.
    pub(super) fn ring_areas(&self) -> Vec<(u64, u64)> {
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
    pub(super) fn in_mem(&self, addr: u64, len: u64) -> bool {
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
    pub(super) fn one_region(&self, addr: u64, len: u64) -> bool {
        addr.checked_add(len)
            .is_some_and(|end| self.regions.iter().any(|r| r.0 <= addr && end <= r.1))
    }

    /// Bytes of `[addr, addr + len)`, `None` outside memory.
    pub(super) fn peek(&self, mem: &GuestMemoryMmap, addr: u64, len: usize) -> Vec<Option<u8>> {
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
    pub(super) fn read(&self, mem: &GuestMemoryMmap, addr: u64, len: usize) -> Vec<u8> {
        let mut buf = vec![0u8; len];
        if len > 0 {
            mem.read_slice(&mut buf, GuestAddress(addr))
                .expect("read guest memory");
        }
        buf
    }

    pub(super) fn peek_u16(&self, mem: &GuestMemoryMmap, addr: u64) -> u16 {
        let b = self.peek(mem, addr, 2);
        u16::from_le_bytes([b[0].unwrap_or(0), b[1].unwrap_or(0)])
    }

    pub(super) fn peek_u32(&self, mem: &GuestMemoryMmap, addr: u64) -> u32 {
        let b = self.peek(mem, addr, 4);
        u32::from_le_bytes(std::array::from_fn(|i| b[i].unwrap_or(0)))
    }
}
