//! The memory of a request, as safe types: what a read fills and a write takes.
//!
//! ```text
//!   IoBuf::Owned(AlignedBuf)  moved into the engine with the request, handed back in its
//!                             completion: nobody else can touch it while the kernel does
//!   IoBuf::Guest(GuestBuf)    guest-memory ranges, in order, read as one byte array; the
//!                             request holds an Arc of the memory, so the mapping outlives it
//! ```
//!
//! No raw pointer crosses the engine boundary. Only the engines turn these into addresses for
//! the kernel ([`IoBuf::chunks`], crate-private), and they keep the `IoBuf` (so the owned
//! buffer, or the Arc that keeps guest memory mapped) until the kernel is done with it.
//!
//! Guest memory is only reached through vm-memory's volatile accessors here; whether the guest
//! itself leaves a buffer alone while a request is in flight is the virtio driver's contract
//! (a buffer made available is the device's until it is on the used ring), and a driver that
//! breaks it only garbles its own bytes: nothing in this process reads guest memory as a Rust
//! reference.

use std::sync::Arc;

use vm_memory::{Address, Bytes, GuestAddress, GuestMemoryBackend, GuestMemoryMmap};

use crate::AlignedBuf;

/// Ranges of guest memory, in order, seen as one byte array. Invariant (checked by
/// [`GuestBuf::new`]): every range lies inside one mapped region of `mem`, and the total
/// length fits in `usize`.
#[derive(Debug, Clone)]
pub struct GuestBuf {
    mem: Arc<GuestMemoryMmap>,
    ranges: Vec<(GuestAddress, u32)>,
    len: usize,
}

/// A guest range that is not inside one region of guest memory.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
#[error("guest range {:#x}+{len} is not inside one region of guest memory", addr.0)]
pub struct BadGuestRange {
    /// Start of the range.
    pub addr: GuestAddress,
    /// Its length.
    pub len: u32,
}

impl GuestBuf {
    /// The byte array `ranges` (in order) of `mem`. Empty ranges are dropped. Fails if a range
    /// is not inside one region of `mem` (a buffer across two regions, or outside memory).
    pub fn new(
        mem: Arc<GuestMemoryMmap>,
        mut ranges: Vec<(GuestAddress, u32)>,
    ) -> Result<GuestBuf, BadGuestRange> {
        ranges.retain(|r| r.1 > 0);
        let mut len = 0usize;
        for &(addr, n) in &ranges {
            if mem.get_slice(addr, n as usize).is_err() {
                return Err(BadGuestRange { addr, len: n });
            }
            len = len
                .checked_add(n as usize)
                .ok_or(BadGuestRange { addr, len: n })?;
        }
        Ok(GuestBuf { mem, ranges, len })
    }

    /// The ranges, in order.
    pub fn ranges(&self) -> &[(GuestAddress, u32)] {
        &self.ranges
    }

    /// The memory the ranges are in.
    pub fn memory(&self) -> &Arc<GuestMemoryMmap> {
        &self.mem
    }

    /// Calls `f(guest address, length, array offset)` for each piece of `[pos, pos + len)`.
    fn walk(
        &self,
        pos: usize,
        len: usize,
        mut f: impl FnMut(GuestAddress, usize, usize) -> crate::Result<()>,
    ) -> crate::Result<()> {
        let end = pos + len;
        let mut at = 0usize;
        for &(addr, n) in &self.ranges {
            let n = n as usize;
            let (start, stop) = (pos.max(at), end.min(at + n));
            if start < stop {
                // Inside the range: `new` checked `addr + n` lies in guest memory.
                f(addr.unchecked_add((start - at) as u64), stop - start, start)?;
            }
            at += n;
            if at >= end {
                break;
            }
        }
        Ok(())
    }
}

/// The memory of one request.
#[derive(Debug, Clone, Default)]
pub enum IoBuf {
    /// No memory (flush, discard, write-zeroes).
    #[default]
    None,
    /// An owned page-aligned buffer, returned in the completion.
    Owned(AlignedBuf),
    /// Guest memory.
    Guest(GuestBuf),
}

impl From<AlignedBuf> for IoBuf {
    fn from(b: AlignedBuf) -> IoBuf {
        IoBuf::Owned(b)
    }
}

impl From<GuestBuf> for IoBuf {
    fn from(b: GuestBuf) -> IoBuf {
        IoBuf::Guest(b)
    }
}

/// Error for a guest memory access that `GuestBuf::new` has already proven in bounds.
fn guest_error(e: vm_memory::GuestMemoryError) -> crate::Error {
    crate::Error::Inconsistent {
        path: std::path::PathBuf::from("guest memory"),
        what: e.to_string(),
    }
}

impl IoBuf {
    /// Length in bytes.
    pub fn len(&self) -> usize {
        match self {
            IoBuf::None => 0,
            IoBuf::Owned(b) => b.len(),
            IoBuf::Guest(g) => g.len,
        }
    }

    /// Whether it holds no bytes.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// The owned buffer, if that is what this is.
    pub fn into_aligned(self) -> Option<AlignedBuf> {
        match self {
            IoBuf::Owned(b) => Some(b),
            _ => None,
        }
    }

    /// Copies `src` into bytes `[pos, pos + src.len())` (for reads). In bounds by the caller.
    pub(crate) fn fill_from(&mut self, pos: usize, src: &[u8]) -> crate::Result<()> {
        match self {
            IoBuf::None => Ok(()),
            IoBuf::Owned(b) => {
                b[pos..pos + src.len()].copy_from_slice(src);
                Ok(())
            }
            IoBuf::Guest(g) => g.walk(pos, src.len(), |addr, n, at| {
                let from = &src[at - pos..at - pos + n];
                g.mem.write_slice(from, addr).map_err(guest_error)
            }),
        }
    }

    /// Copies bytes `[pos, pos + dst.len())` into `dst` (for writes). In bounds by the caller.
    pub(crate) fn copy_out(&self, pos: usize, dst: &mut [u8]) -> crate::Result<()> {
        match self {
            IoBuf::None => Ok(()),
            IoBuf::Owned(b) => {
                dst.copy_from_slice(&b[pos..pos + dst.len()]);
                Ok(())
            }
            IoBuf::Guest(g) => {
                let base = pos;
                g.walk(pos, dst.len(), |addr, n, at| {
                    let to = &mut dst[at - base..at - base + n];
                    g.mem.read_slice(to, addr).map_err(guest_error)
                })
            }
        }
    }

    /// Zeroes bytes `[pos, pos + len)`. In bounds by the caller.
    pub(crate) fn zero(&mut self, pos: usize, len: usize) -> crate::Result<()> {
        const ZEROS: [u8; 4096] = [0; 4096];
        match self {
            IoBuf::None => Ok(()),
            IoBuf::Owned(b) => {
                b[pos..pos + len].fill(0);
                Ok(())
            }
            IoBuf::Guest(_) => {
                let mut at = pos;
                while at < pos + len {
                    let n = (pos + len - at).min(ZEROS.len());
                    self.fill_from(at, &ZEROS[..n])?;
                    at += n;
                }
                Ok(())
            }
        }
    }

    /// The memory of bytes `[pos, pos + len)` as `(address, length)` pieces, in order, for an
    /// engine to hand to the kernel: one piece for an owned buffer, one per guest range crossed.
    ///
    /// Obtaining the addresses is safe; using them is not. An engine may let the kernel access
    /// them only while it owns this `IoBuf` (an owned buffer's heap storage does not move when
    /// the `IoBuf` does, and guest memory stays mapped while the `GuestBuf`'s Arc lives), and
    /// must not hand out the buffer again before the kernel is done.
    pub(crate) fn chunks(
        &mut self,
        pos: usize,
        len: usize,
        out: &mut Vec<(*mut u8, usize, usize)>,
    ) -> crate::Result<()> {
        match self {
            IoBuf::None => Ok(()),
            IoBuf::Owned(b) => {
                out.push((b[pos..pos + len].as_mut_ptr(), len, pos));
                Ok(())
            }
            IoBuf::Guest(g) => g.walk(pos, len, |addr, n, at| {
                let slice = g.mem.get_slice(addr, n).map_err(guest_error)?;
                out.push((slice.ptr_guard_mut().as_ptr(), n, at));
                Ok(())
            }),
        }
    }
}
