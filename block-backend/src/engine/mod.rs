//! I/O engines: move many requests at once between caller buffers and a [`Chain`].
//!
//! ```text
//!   submit(req) ──> plan through the chain (format crates resolve, allocate)
//!                     ├─ file pieces ──> sync: pread/pwrite now | io_uring: SQEs, batched
//!                     └─ zero pieces ──> memset
//!   reap() <── completions; a write's metadata commit runs after all its payload landed
//! ```
//!
//! Both engines have one interface so every test runs on both, and a property test compares
//! them. Invariants:
//! - A request completes exactly once, with its error if any part failed.
//! - A write's metadata (bitmap bits, BAT entries) is committed only after its payload write
//!   completed; `Flush` completes only after every write submitted before it completed and was
//!   committed, and after the chain's flush (payload sync, metadata, sync).
//! - Two requests touching the same unallocated block never allocate it twice: planning runs in
//!   submission order on the one `Chain`, and the first plan allocates.
//! - Reads of a block being written see old or new data, never garbage: fresh blocks read as
//!   zeros (dynamic) or from the parent (differencing) until their commit.

mod sync;
mod uring;

pub use sync::SyncEngine;
pub use uring::UringEngine;

use std::os::fd::RawFd;
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};

use crate::{Chain, Disk, Result};

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

/// Carries out `req` on `chain` synchronously.
///
/// # Safety
/// For reads and writes, `req.buf` must be valid for `req.len` bytes (writable for reads) and
/// not accessed by anything else during the call, as [`Engine::submit`] requires of its caller.
pub(crate) unsafe fn run_on_chain(chain: &mut Chain, req: &IoRequest) -> Result<()> {
    match req.kind {
        IoKind::Read => {
            // SAFETY: the caller guarantees `buf` is valid and unaliased for `len` bytes.
            let buf = unsafe { std::slice::from_raw_parts_mut(req.buf, req.len) };
            chain.read_at(buf, req.offset)
        }
        IoKind::Write => {
            // SAFETY: as above; the buffer is only read.
            let buf = unsafe { std::slice::from_raw_parts(req.buf, req.len) };
            chain.write_at(buf, req.offset)
        }
        IoKind::Flush => chain.flush(),
        IoKind::Discard => chain.discard(req.offset, req.len as u64),
        IoKind::WriteZeroes => chain.write_zeroes(req.offset, req.len as u64),
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

/// One request. `buf` points to `len` bytes for reads and writes (ignored otherwise).
#[derive(Debug, Clone, Copy)]
pub struct IoRequest {
    /// Caller's tag, returned in the completion.
    pub tag: u64,
    /// Operation.
    pub kind: IoKind,
    /// Byte offset on the virtual disk.
    pub offset: u64,
    /// Caller memory for reads and writes.
    pub buf: *mut u8,
    /// Length in bytes.
    pub len: usize,
}

// SAFETY: the pointer is only dereferenced under the contract of `Engine::submit`, which makes
// the caller keep the memory valid and unaliased until the completion; moving the request to
// another thread does not change that.
unsafe impl Send for IoRequest {}

/// A finished request.
#[derive(Debug)]
pub struct IoCompletion {
    /// The request's tag.
    pub tag: u64,
    /// Its outcome.
    pub result: Result<()>,
}

/// An I/O engine over a chain.
pub trait Engine: Send {
    /// Queues a request. Errors of the request itself arrive in its completion; `Err` here
    /// means the engine cannot go on.
    ///
    /// # Safety
    /// For reads and writes, `req.buf` must point to `req.len` bytes that stay valid, and are
    /// neither read nor written by anyone else (for reads) or not written by anyone else (for
    /// writes), until the completion with `req.tag` has been returned by [`Engine::reap`].
    unsafe fn submit(&mut self, req: IoRequest) -> Result<()>;
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
