//! I/O engines: move many requests at once between request memory and a [`Chain`].
//!
//! ```text
//!   submit(IoRequest { kind, offset, IoBuf: owned AlignedBuf | guest ranges }) (safe)
//!     ──> plan the whole request through the chain, once (format crates resolve, allocate)
//!           ├─ file pieces ──> sync: through the Disk API | io_uring: SQEs per memory chunk
//!           └─ zero pieces ──> zero fill
//!   reap() <── completions, each handing its IoBuf back; a write's metadata is committed
//!              once, after all its payload landed
//! ```
//!
//! Both engines have one interface so every test runs on both, and a property test compares
//! them. The API is safe: a request carries its memory as an [`IoBuf`] that the engine owns
//! while the request is in flight, so no raw pointer crosses it and only the engine turns
//! memory into addresses for the kernel (see [`buf`](IoBuf)). Invariants:
//! - A request completes exactly once, with its error if any part failed, and hands its memory
//!   back in the completion; until then the kernel may use it, nobody else can.
//! - A write's metadata (bitmap bits, BAT entries) is committed only after its payload write
//!   completed; `Flush` completes only after every write submitted before it completed and was
//!   committed, and after the chain's flush (payload sync, metadata, sync).
//! - Two requests touching the same unallocated block never allocate it twice: planning runs in
//!   submission order on the one `Chain`, and the first plan allocates.
//! - Reads of a block being written see old or new data, never garbage: fresh blocks read as
//!   zeros (dynamic) or from the parent (differencing) until their commit.

mod buf;
mod sync;
mod uring;

pub use buf::{BadGuestRange, GuestBuf, IoBuf};
pub use sync::SyncEngine;
pub use uring::UringEngine;

use std::os::fd::RawFd;
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};

use crate::{AlignedBuf, Chain, Disk, Result};

/// A chain several engines share (one per virtqueue): each locks it only to plan a request,
/// to commit a write's metadata, and for flush, discard and write-zeroes. Payload transfers run
/// without the lock.
pub type SharedChain = Arc<Mutex<Chain>>;

/// Locks a shared chain. A panic elsewhere while it was held cannot leave it half-updated in a
/// way that matters here (metadata is only made durable by `flush`, which re-derives it), so a
/// poisoned lock is taken as is.
pub fn lock_chain(chain: &SharedChain) -> MutexGuard<'_, Chain> {
    chain.lock().unwrap_or_else(PoisonError::into_inner)
}

/// Most bytes staged at once when request memory has to be copied (guest memory on the sync
/// engine, read-modify-write of partial sectors): a bigger request runs in pieces this size.
const BOUNCE_MAX: usize = 8 << 20;

/// Carries out `req` on `chain` through the [`Disk`] API, copying between the request's memory
/// and `bounce` when it is not an owned buffer (guest memory is never lent out as a Rust
/// slice). A request of at most [`BOUNCE_MAX`] bytes is one chain call: one plan, one commit.
pub(crate) fn run_on_chain(
    chain: &mut Chain,
    req: &mut IoRequest,
    bounce: &mut AlignedBuf,
) -> Result<()> {
    let (offset, len) = (req.offset, req.len as usize);
    match (req.kind, &mut req.buf) {
        (IoKind::Read, IoBuf::Owned(b)) => chain.read_at(b, offset),
        (IoKind::Write, IoBuf::Owned(b)) => chain.write_at(b, offset),
        (IoKind::Read, buf) => {
            let mut pos = 0;
            while pos < len {
                let n = (len - pos).min(BOUNCE_MAX);
                bounce.resize(n);
                chain.read_at(bounce, offset + pos as u64)?;
                buf.fill_from(pos, bounce)?;
                pos += n;
            }
            Ok(())
        }
        (IoKind::Write, buf) => {
            let mut pos = 0;
            while pos < len {
                let n = (len - pos).min(BOUNCE_MAX);
                bounce.resize(n);
                buf.copy_out(pos, bounce)?;
                chain.write_at(bounce, offset + pos as u64)?;
                pos += n;
            }
            Ok(())
        }
        (IoKind::Flush, _) => chain.flush(),
        (IoKind::Discard, _) => chain.discard(offset, req.len),
        (IoKind::WriteZeroes, _) => chain.write_zeroes(offset, req.len),
    }
}

/// What a request asks for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum IoKind {
    /// Fill the buffer from the disk.
    Read,
    /// Write the buffer to the disk.
    Write,
    /// Make every completed write durable.
    Flush,
    /// Afterwards `[offset, offset + len)` reads as zeros; space may be freed.
    Discard,
    /// Write zeros over `[offset, offset + len)`.
    WriteZeroes,
}

/// One request: an operation, a disk range and, for reads and writes, the memory (which the
/// engine owns until it hands it back in the completion). Built by the constructors, so a read
/// or write always covers exactly its memory.
#[derive(Debug, Clone)]
pub struct IoRequest {
    tag: u64,
    kind: IoKind,
    offset: u64,
    len: u64,
    buf: IoBuf,
}

impl IoRequest {
    fn new(tag: u64, kind: IoKind, offset: u64, len: u64, buf: IoBuf) -> IoRequest {
        IoRequest {
            tag,
            kind,
            offset,
            len,
            buf,
        }
    }

    /// Fills `buf` from the disk at `offset`.
    pub fn read(tag: u64, offset: u64, buf: impl Into<IoBuf>) -> IoRequest {
        let buf = buf.into();
        IoRequest::new(tag, IoKind::Read, offset, buf.len() as u64, buf)
    }

    /// Writes `buf` to the disk at `offset`.
    pub fn write(tag: u64, offset: u64, buf: impl Into<IoBuf>) -> IoRequest {
        let buf = buf.into();
        IoRequest::new(tag, IoKind::Write, offset, buf.len() as u64, buf)
    }

    /// Makes every write completed before it durable.
    pub fn flush(tag: u64) -> IoRequest {
        IoRequest::new(tag, IoKind::Flush, 0, 0, IoBuf::None)
    }

    /// Discards `[offset, offset + len)`.
    pub fn discard(tag: u64, offset: u64, len: u64) -> IoRequest {
        IoRequest::new(tag, IoKind::Discard, offset, len, IoBuf::None)
    }

    /// Writes zeros over `[offset, offset + len)`.
    pub fn write_zeroes(tag: u64, offset: u64, len: u64) -> IoRequest {
        IoRequest::new(tag, IoKind::WriteZeroes, offset, len, IoBuf::None)
    }

    /// Caller's tag, returned in the completion.
    pub fn tag(&self) -> u64 {
        self.tag
    }

    /// Operation.
    pub fn kind(&self) -> IoKind {
        self.kind
    }

    /// Byte offset on the virtual disk.
    pub fn offset(&self) -> u64 {
        self.offset
    }

    /// Length in bytes.
    pub fn len(&self) -> u64 {
        self.len
    }

    /// Whether the range is empty.
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// The memory (empty for flush, discard and write-zeroes).
    pub fn buf(&self) -> &IoBuf {
        &self.buf
    }
}

/// A finished request.
#[derive(Debug)]
pub struct IoCompletion {
    /// The request's tag.
    pub tag: u64,
    /// Its outcome.
    pub result: Result<()>,
    /// The request's memory, handed back (a read's data is in it).
    pub buf: IoBuf,
}

/// An I/O engine over a chain.
pub trait Engine: Send {
    /// Queues a request; the engine owns its memory until the completion hands it back.
    /// Errors of the request itself arrive in its completion; `Err` here means the engine
    /// cannot go on. A read or write is planned through the chain once, whatever number of
    /// guest ranges its memory has, and a write's metadata is committed once, after all of
    /// its payload landed.
    fn submit(&mut self, req: IoRequest) -> Result<()>;
    /// Hands queued work to the kernel (no-op for the sync engine).
    fn kick(&mut self) -> Result<()>;
    /// Appends completions to `out`, waiting until at least `min` are available (or nothing
    /// is in flight). Queued work is handed to the kernel on the way (in the same system call
    /// as the wait), so a caller that reaps right after submitting need not `kick` first.
    fn reap(&mut self, min: usize, out: &mut Vec<IoCompletion>) -> Result<()>;
    /// Requests submitted and not yet reaped.
    fn in_flight(&self) -> usize;
    /// The chain underneath, locked.
    fn chain(&self) -> MutexGuard<'_, Chain>;
    /// An eventfd the engine signals whenever a transfer completes, for callers that wait in
    /// epoll rather than in [`Engine::reap`]: read it (to reset it), then `reap(0, ..)`.
    /// Made on the first call, so engines nobody waits on in epoll signal nothing. `None` when
    /// completions are only produced inside `submit` (the sync engine).
    fn completion_fd(&mut self) -> Result<Option<RawFd>>;
    /// Engine name for reports (`sync`, `io_uring`, `io_uring (buffered)`).
    fn name(&self) -> String;
}

/// Engine choice.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum EngineKind {
    /// pread/pwrite in the caller's thread.
    Sync,
    /// io_uring, O_DIRECT where the file system allows it.
    IoUring,
}

/// Builds an engine of `kind` over `chain`, sized for `depth` requests in flight.
pub fn new_engine(kind: EngineKind, chain: Chain, depth: usize) -> Result<Box<dyn Engine>> {
    new_shared_engine(kind, Arc::new(Mutex::new(chain)), depth)
}

/// Builds an engine of `kind` over a chain other engines may share (one engine, and so one
/// io_uring, per virtqueue). Engines sharing a chain do not order requests against each other:
/// whoever submits an ordering point (flush, discard, write-zeroes) on one of them must first
/// drain the others, as [`crate::virtio_blk::VirtioBlk`] does.
pub fn new_shared_engine(
    kind: EngineKind,
    chain: SharedChain,
    depth: usize,
) -> Result<Box<dyn Engine>> {
    Ok(match kind {
        EngineKind::Sync => Box::new(SyncEngine::new(chain)),
        EngineKind::IoUring => Box::new(UringEngine::new(chain, depth)?),
    })
}
