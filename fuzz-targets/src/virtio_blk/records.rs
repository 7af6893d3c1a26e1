//! Requests as the harness reads them: one record per popped chain, and the oracle's view
//! of guest memory.

use super::*;

#[derive(Debug, Clone, Copy)]
pub(super) struct D {
    pub(super) addr: u64,
    pub(super) len: u32,
    pub(super) write: bool,
}

impl D {
    pub(super) fn range(&self) -> (u64, u64) {
        span(self.addr, u64::from(self.len))
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Op {
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
pub(super) enum Expect {
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
pub(super) enum Outcome {
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
pub(super) struct Rec {
    pub(super) queue: usize,
    pub(super) head: u16,
    /// Device call that popped it and the one after which its used entry was seen.
    pub(super) pop: u32,
    pub(super) answer: Option<u32>,
    pub(super) descs: Vec<D>,
    /// Guest ranges the device may write for this chain.
    pub(super) w: Vec<(u64, u64)>,
    pub(super) writable_total: u64,
    pub(super) status: Option<u64>,
    /// Guest ranges holding the 16 header bytes.
    pub(super) header: Vec<(u64, u64)>,
    pub(super) op: Option<Op>,
    /// False when another request may have overwritten the header or segment list before the
    /// device read it: then what this request did is unknown.
    pub(super) op_known: bool,
    pub(super) sector: u64,
    pub(super) data: Vec<D>,
    pub(super) total: u64,
    /// OUT: the bytes it carried (read just before the device popped it), and which of
    /// them nobody else may have changed before the device read them (1) or not (0).
    pub(super) payload: Vec<u8>,
    pub(super) payload_known: Vec<u8>,
    /// DISCARD / WRITE_ZEROES: (sector, sectors, flags), the data buffers read as one array.
    pub(super) segs: Vec<(u64, u32, u32)>,
    pub(super) expect: Expect,
    pub(super) outcome: Outcome,
    pub(super) ambiguous: bool,
    pub(super) used_len: u32,
}

impl Rec {
    pub(super) fn settled(&self) -> bool {
        self.outcome != Outcome::Pending
    }

    pub(super) fn modifying(&self) -> bool {
        matches!(self.op, Some(Op::Out | Op::Discard | Op::WriteZeroes))
    }

    /// Could have changed the disk (as far as is known now).
    pub(super) fn may_modify(&self) -> bool {
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
    pub(super) fn barrier(&self) -> bool {
        self.op_known
            && !self.ambiguous
            && self.outcome == Outcome::Ok
            && matches!(self.op, Some(Op::Flush | Op::Discard | Op::WriteZeroes))
    }
}

/// Limits from the device's config space.
#[derive(Debug, Clone, Copy)]
pub(super) struct Limits {
    pub(super) capacity: u64,
    pub(super) size_max: u32,
    pub(super) seg_max: u32,
    pub(super) max_discard_sectors: u32,
    pub(super) max_discard_seg: u32,
    pub(super) max_wz_sectors: u32,
    pub(super) max_wz_seg: u32,
}

/// What a request does to the disk: `(start, end, fill)`; later pieces override earlier ones.
#[derive(Debug, Clone, Copy)]
pub(super) enum Fill {
    /// The payload of the record, byte `pos - origin`.
    Payload(u64),
    Zero,
    Unknown,
}

pub(super) type Piece = (u64, u64, Fill);

/// A window of the disk model: `vals`/`known` (1 = known) cover `[base, base + vals.len())`.
pub(super) struct View<'a> {
    pub(super) base: u64,
    pub(super) vals: &'a mut [u8],
    pub(super) known: &'a mut [u8],
}

impl View<'_> {
    /// Applies `pieces` of a request whose payload is `payload` / `pknown`.
    pub(super) fn apply(&mut self, pieces: &[Piece], payload: &[u8], pknown: &[u8]) {
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
pub(super) fn mask_guest(data: &[D], ranges: &[(u64, u64)], known: &mut [u8]) {
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
pub(super) fn first_mismatch(got: &[u8], want: &[u8], known: &[u8]) -> Option<usize> {
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
