//! The io_uring engine: payload goes straight between request memory and the resolved file
//! offsets, many requests in flight, submissions batched, registered files, O_DIRECT where the
//! file system allows it (buffered otherwise, and the engine name says so). No SQPOLL: a
//! polling kernel thread would take one of the two cores this has to share.
//!
//! Planning (resolution, allocation) happens in `submit`, in order, on the one chain, once per
//! request however many memory ranges it has; only the payload transfers run concurrently.
//! Each planned file piece becomes one transfer per memory chunk it covers (one for an owned
//! buffer, one per guest range crossed). Transfers wait in `unpushed` until the engine hands
//! work to the kernel; then runs of reads of one file at adjacent offsets (a guest's or a
//! reader's sequential requests) go out as one `readv` of up to [`MERGE_MAX`] transfers, as
//! QEMU's virtio-blk merges requests: one kernel request instead of many. A merged read that
//! fails or comes back short is resubmitted as its transfers, one entry each, so errors and
//! short reads are handled per transfer as before. A request's metadata commit runs once, when
//! its last transfer completes. Short transfers are resubmitted for the remainder. Flush,
//! discard and write-zeroes first drain every request in flight, then run on the chain.
//!
//! Memory: a request's [`IoBuf`] moves into its slot in `reqs` at submission and leaves it
//! only in its completion, after every transfer of it has completed; the addresses in the
//! SQEs point into that `IoBuf` (an owned buffer's heap storage, or guest memory kept mapped
//! by the `GuestBuf`'s Arc). If the ring cannot be drained on drop, the slots are leaked rather
//! than freed under the kernel.

use std::fs::{File, OpenOptions};
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::os::unix::fs::OpenOptionsExt;
use std::path::PathBuf;
use std::sync::MutexGuard;

use io_uring::{opcode, types, IoUring};

use super::{
    lock_chain, run_on_chain, Engine, IoBuf, IoCompletion, IoKind, IoRequest, SharedChain,
};
use crate::chain::Piece;
use crate::layer::Commit;
use crate::{AlignedBuf, Chain, Disk, Error, Result};

/// A request with transfers still in flight.
struct Req {
    tag: u64,
    remaining: usize,
    error: Option<Error>,
    commit: Option<Commit>,
    /// The request's memory: the transfers' addresses point into it.
    buf: IoBuf,
}

/// Which registered descriptor a transfer uses.
struct Files {
    /// Registered-file index of each level's buffered and direct descriptor (`u32::MAX` for
    /// a level without a local file: the chain plans no file pieces for it).
    buffered_idx: Vec<u32>,
    direct_idx: Vec<Option<u32>>,
    /// Alignment O_DIRECT needs for memory, offsets and lengths.
    dio_align: u64,
}

impl Files {
    /// Descriptor index for a transfer: direct when everything is aligned for it.
    fn pick(&self, level: usize, ptr: *mut u8, len: usize, offset: u64) -> u32 {
        let a = self.dio_align;
        match self.direct_idx[level] {
            Some(i) if (ptr as u64) % a == 0 && len as u64 % a == 0 && offset % a == 0 => i,
            _ => self.buffered_idx[level],
        }
    }
}

/// One transfer (one SQE, resubmitted for the rest if short).
#[derive(Clone, Copy)]
struct Xfer {
    req: usize,
    file: u32,
    ptr: *mut u8,
    len: usize,
    offset: u64,
    write: bool,
}

/// Transfers merged into one `readv`, at most (well under the kernel's 1024 iovecs).
const MERGE_MAX: usize = 64;
/// Bytes one merged `readv` covers, at most.
const MERGE_MAX_BYTES: usize = 1 << 20;
/// User-data bit of a merged read's entry (transfer slots are far below it).
const MERGED: u64 = 1 << 63;

/// Adjacent reads of one file sent as one `readv`: the transfers' slots, in file order, and
/// the iovecs the entry points at (heap storage that stays put while the entry is in flight).
struct Merged {
    slots: Vec<usize>,
    iovecs: Vec<libc::iovec>,
    len: usize,
}

/// Stores `v` in a free slot of `slots` (or a new one) and returns its index.
fn put_in_slot<T>(slots: &mut Vec<Option<T>>, free: &mut Vec<usize>, v: T) -> usize {
    match free.pop() {
        Some(i) => {
            slots[i] = Some(v);
            i
        }
        None => {
            slots.push(Some(v));
            slots.len() - 1
        }
    }
}

/// io_uring engine over a chain.
pub struct UringEngine {
    ring: IoUring,
    chain: SharedChain,
    /// The top image's path, for errors.
    path: PathBuf,
    /// Signalled by the kernel on every completion once registered with the ring, which
    /// happens on the first [`Engine::completion_fd`] call.
    completion_evt: Option<OwnedFd>,
    /// O_DIRECT descriptors kept open for registration (index = level).
    _direct: Vec<Option<File>>,
    files: Files,
    reqs: Vec<Option<Req>>,
    free_reqs: Vec<usize>,
    xfers: Vec<Option<Xfer>>,
    free_xfers: Vec<usize>,
    /// Transfers counted in `outstanding` whose entries are not in the ring yet (in order).
    unpushed: Vec<usize>,
    /// Merged reads in the kernel (user data [`MERGED`] | index).
    merged: Vec<Option<Merged>>,
    free_merged: Vec<usize>,
    /// Completed merges, emptied, kept for their vectors' capacity.
    spare_merged: Vec<Merged>,
    done: Vec<IoCompletion>,
    /// Requests submitted and not yet reaped (including those in `done`).
    in_flight: usize,
    /// Transfers in the kernel.
    outstanding: usize,
    /// Staging for pieces read through the format crate and for read-modify-write.
    bounce: AlignedBuf,
    /// Scratch lists kept between requests (no allocation per request).
    scratch_xfers: Vec<Xfer>,
    scratch_chunks: Vec<(*mut u8, usize, usize)>,
    scratch_cqes: Vec<(u64, i32)>,
    scratch_pieces: Vec<Piece>,
}

// SAFETY: the raw pointers in `Xfer` and the chunk scratch point into request memory the
// engine itself owns (each request's `IoBuf`, held in `reqs`): an owned buffer's heap storage
// or guest memory kept mapped by an Arc, both of which may be used from any thread. Moving the
// engine moves neither.
unsafe impl Send for UringEngine {}

impl std::fmt::Debug for UringEngine {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("UringEngine")
            .field("name", &self.name())
            .field("in_flight", &self.in_flight)
            .finish()
    }
}

/// O_DIRECT alignment of the file at `path` (statx DIOALIGN), or `None` if unknown.
fn dio_alignment(file: &File) -> Option<u64> {
    // SAFETY: `statx` is a plain C struct for which all-zero bytes are a valid value.
    let mut stx: libc::statx = unsafe { std::mem::zeroed() };
    // SAFETY: statx writes only into `stx`, a properly sized and aligned local; the empty path
    // with AT_EMPTY_PATH refers to the open descriptor.
    let rc = unsafe {
        libc::statx(
            file.as_raw_fd(),
            c"".as_ptr(),
            libc::AT_EMPTY_PATH,
            libc::STATX_DIOALIGN,
            &mut stx,
        )
    };
    if rc != 0 || stx.stx_mask & libc::STATX_DIOALIGN == 0 || stx.stx_dio_offset_align == 0 {
        return None;
    }
    Some(u64::from(
        stx.stx_dio_mem_align.max(stx.stx_dio_offset_align),
    ))
}

impl UringEngine {
    /// An engine over `chain` for up to about `depth` requests in flight.
    pub fn new(shared: SharedChain, depth: usize) -> Result<UringEngine> {
        let chain = lock_chain(&shared);
        let path = chain.path().to_path_buf();
        let entries = (depth.max(8) * 4).next_power_of_two().min(4096) as u32;
        let ring = IoUring::new(entries).map_err(|e| Error::io(&path, "io_uring setup", 0, e))?;
        let levels = chain.stack().len();
        let mut fds = Vec::new();
        let mut buffered_idx = Vec::new();
        let mut direct_idx = Vec::new();
        let mut direct = Vec::new();
        let mut dio_align = 0u64;
        for level in 0..levels {
            let Some(file) = chain.layer_file(level) else {
                buffered_idx.push(u32::MAX);
                direct_idx.push(None);
                direct.push(None);
                continue;
            };
            buffered_idx.push(fds.len() as u32);
            fds.push(file.as_raw_fd());
            let writable = level == 0 && !chain.is_read_only();
            let path = chain.stack()[level].path().to_path_buf();
            let d = OpenOptions::new()
                .read(true)
                .write(writable)
                .custom_flags(libc::O_DIRECT)
                .open(&path)
                .ok();
            let align = d.as_ref().and_then(dio_alignment);
            match (d, align) {
                (Some(f), Some(a)) => {
                    dio_align = dio_align.max(a);
                    direct_idx.push(Some(fds.len() as u32));
                    fds.push(f.as_raw_fd());
                    direct.push(Some(f));
                }
                _ => {
                    direct_idx.push(None);
                    direct.push(None);
                }
            }
        }
        if !fds.is_empty() {
            ring.submitter()
                .register_files(&fds)
                .map_err(|e| Error::io(&path, "io_uring register files", 0, e))?;
        }
        drop(chain);
        Ok(UringEngine {
            ring,
            chain: shared,
            path,
            completion_evt: None,
            _direct: direct,
            files: Files {
                buffered_idx,
                direct_idx,
                dio_align: dio_align.max(512),
            },
            reqs: Vec::new(),
            free_reqs: Vec::new(),
            xfers: Vec::new(),
            free_xfers: Vec::new(),
            unpushed: Vec::new(),
            merged: Vec::new(),
            free_merged: Vec::new(),
            spare_merged: Vec::new(),
            done: Vec::new(),
            in_flight: 0,
            outstanding: 0,
            bounce: AlignedBuf::new(0),
            scratch_xfers: Vec::new(),
            scratch_chunks: Vec::new(),
            scratch_cqes: Vec::new(),
            scratch_pieces: Vec::new(),
        })
    }

    fn new_req(&mut self, tag: u64, buf: IoBuf) -> usize {
        let r = Req {
            tag,
            remaining: 0,
            error: None,
            commit: None,
            buf,
        };
        put_in_slot(&mut self.reqs, &mut self.free_reqs, r)
    }

    /// Takes a transfer in; its entry reaches the ring in [`UringEngine::push_unpushed`].
    fn push_xfer(&mut self, x: Xfer) {
        let slot = put_in_slot(&mut self.xfers, &mut self.free_xfers, x);
        self.unpushed.push(slot);
        self.outstanding += 1;
    }

    /// Puts every unpushed transfer's entry into the ring, merging runs of adjacent reads.
    fn push_unpushed(&mut self) -> Result<()> {
        let mut slots = std::mem::take(&mut self.unpushed);
        let mut i = 0;
        let mut result = Ok(());
        while i < slots.len() && result.is_ok() {
            let first = self.xfers[slots[i]].expect("unpushed transfer");
            let (mut end, mut bytes, mut n) = (first.offset + first.len as u64, first.len, 1);
            while let Some(&next) = slots.get(i + n) {
                let x = self.xfers[next].expect("unpushed transfer");
                if first.write
                    || x.write
                    || x.file != first.file
                    || x.offset != end
                    || n == MERGE_MAX
                    || bytes + x.len > MERGE_MAX_BYTES
                {
                    break;
                }
                end += x.len as u64;
                bytes += x.len;
                n += 1;
            }
            result = if n == 1 {
                self.push_single(slots[i])
            } else {
                self.push_merged(&slots[i..i + n], bytes)
            };
            i += n;
        }
        slots.clear();
        self.unpushed = slots;
        result
    }

    fn push_single(&mut self, slot: usize) -> Result<()> {
        let x = self.xfers[slot].expect("transfer in flight");
        let len = u32::try_from(x.len).unwrap_or(u32::MAX);
        let entry = if x.write {
            opcode::Write::new(types::Fixed(x.file), x.ptr, len)
                .offset(x.offset)
                .build()
        } else {
            opcode::Read::new(types::Fixed(x.file), x.ptr, len)
                .offset(x.offset)
                .build()
        };
        // SAFETY: the entry refers to a registered file and to `x.len` bytes of the memory of
        // request `x.req` (from `IoBuf::chunks`, so inside it), whose `IoBuf` stays in `reqs`
        // (owned buffer: heap storage that does not move; guest memory: mapped while its Arc
        // lives) and is not handed out until this request finishes, which happens only after
        // this entry's completion has been reaped. Nothing else reads or writes that memory
        // meanwhile: the caller gave it up with the request.
        unsafe { self.push_entry(entry.user_data(slot as u64)) }
    }

    fn push_merged(&mut self, slots: &[usize], len: usize) -> Result<()> {
        let mut m = self.spare_merged.pop().unwrap_or_else(|| Merged {
            slots: Vec::with_capacity(MERGE_MAX),
            iovecs: Vec::with_capacity(MERGE_MAX),
            len: 0,
        });
        for &s in slots {
            let x = self.xfers[s].expect("transfer in flight");
            m.iovecs.push(libc::iovec {
                iov_base: x.ptr.cast(),
                iov_len: x.len,
            });
        }
        m.slots.extend_from_slice(slots);
        m.len = len;
        let first = self.xfers[slots[0]].expect("transfer in flight");
        let entry = opcode::Readv::new(
            types::Fixed(first.file),
            m.iovecs.as_ptr(),
            m.iovecs.len() as u32,
        )
        .offset(first.offset)
        .build();
        let idx = put_in_slot(&mut self.merged, &mut self.free_merged, m);
        // SAFETY: each iovec is one transfer's chunk of its request's memory, kept as for a
        // single transfer (see `push_single`); the iovec array is the heap storage of
        // `merged[idx].iovecs`, which is neither moved nor freed until this entry's completion
        // has been reaped (moving the `Merged` moves only the Vec's handle).
        unsafe { self.push_entry(entry.user_data(MERGED | idx as u64)) }
    }

    /// Pushes one entry, handing the ring to the kernel first if it is full.
    ///
    /// # Safety
    /// Every address in `entry` must stay valid until its completion has been reaped.
    unsafe fn push_entry(&mut self, entry: io_uring::squeue::Entry) -> Result<()> {
        loop {
            // SAFETY: the caller keeps the entry's memory valid until its completion.
            if unsafe { self.ring.submission().push(&entry) }.is_ok() {
                return Ok(());
            }
            // Submission queue full: hand it to the kernel and retry.
            self.ring
                .submit()
                .map_err(|e| Error::io(&self.path, "io_uring submit", 0, e))?;
        }
    }

    fn finish(&mut self, idx: usize) {
        let Some(mut r) = self.reqs[idx].take() else {
            return;
        };
        self.free_reqs.push(idx);
        let mut result = match r.error.take() {
            Some(e) => Err(e),
            None => Ok(()),
        };
        if let (Ok(()), Some(c)) = (&result, r.commit.take()) {
            result = lock_chain(&self.chain).commit(c);
        }
        self.done.push(IoCompletion {
            tag: r.tag,
            result,
            buf: r.buf,
        });
    }

    /// Hands queued entries to the kernel and waits for at least one completion, in one
    /// `io_uring_enter`, then processes what completed.
    fn wait_one(&mut self) -> Result<()> {
        self.push_unpushed()?;
        if self.outstanding > 0 {
            self.ring
                .submit_and_wait(1)
                .map_err(|e| Error::io(&self.path, "io_uring wait", 0, e))?;
        }
        self.process_cq()
    }

    /// Processes the completions already in the ring (no system call).
    fn process_cq(&mut self) -> Result<()> {
        let mut cqes = std::mem::take(&mut self.scratch_cqes);
        cqes.clear();
        cqes.extend(self.ring.completion().map(|c| (c.user_data(), c.result())));
        let result = self.handle_cqes(&cqes);
        self.scratch_cqes = cqes;
        result
    }

    fn handle_cqes(&mut self, cqes: &[(u64, i32)]) -> Result<()> {
        for &(ud, res) in cqes {
            if ud & MERGED != 0 {
                self.merged_done((ud & !MERGED) as usize, res)?;
            } else {
                self.xfer_done(ud as usize, res)?;
            }
        }
        Ok(())
    }

    /// A merged read completed: whole, each transfer completes; otherwise each goes again
    /// on its own, so that errors and short reads are handled per transfer.
    fn merged_done(&mut self, idx: usize, res: i32) -> Result<()> {
        let Some(mut m) = self.merged.get_mut(idx).and_then(Option::take) else {
            return Ok(());
        };
        self.free_merged.push(idx);
        let whole = usize::try_from(res).is_ok_and(|n| n == m.len);
        for &slot in &m.slots {
            if whole {
                let n = self.xfers[slot].map_or(0, |x| x.len);
                self.xfer_done(slot, n as i32)?;
            } else {
                self.push_single(slot)?;
            }
        }
        // The kernel is done with the iovecs: keep the storage for the next merge.
        m.slots.clear();
        m.iovecs.clear();
        self.spare_merged.push(m);
        Ok(())
    }

    fn xfer_done(&mut self, slot: usize, res: i32) -> Result<()> {
        self.outstanding -= 1;
        let Some(x) = self.xfers.get_mut(slot).and_then(Option::take) else {
            return Ok(());
        };
        self.free_xfers.push(slot);
        let mut failed = None;
        if res < 0 {
            failed = Some(std::io::Error::from_raw_os_error(-res));
        } else if res == 0 && x.len > 0 {
            failed = Some(std::io::Error::new(
                std::io::ErrorKind::UnexpectedEof,
                "transfer stopped at end of file",
            ));
        } else if (res as usize) < x.len {
            // Short transfer: queue the rest.
            let n = res as usize;
            // SAFETY: n < x.len, so the advanced pointer stays inside the chunk of request
            // memory the transfer covers.
            let ptr = unsafe { x.ptr.add(n) };
            let rest = Xfer {
                ptr,
                len: x.len - n,
                offset: x.offset + n as u64,
                ..x
            };
            self.push_xfer(rest);
            return Ok(());
        }
        let path = &self.path;
        if let Some(r) = self.reqs[x.req].as_mut() {
            if let Some(e) = failed {
                let op = if x.write {
                    "write payload"
                } else {
                    "read payload"
                };
                r.error.get_or_insert(Error::io(path, op, x.offset, e));
            }
            r.remaining -= 1;
            if r.remaining == 0 {
                self.finish(x.req);
            }
        }
        Ok(())
    }

    /// Hands queued submission entries to the kernel, if there are any.
    fn submit_queued(&mut self) -> Result<()> {
        self.push_unpushed()?;
        if !self.ring.submission().is_empty() {
            self.ring
                .submit()
                .map_err(|e| Error::io(&self.path, "io_uring submit", 0, e))?;
        }
        Ok(())
    }

    /// Waits until no request has transfers in the kernel.
    fn drain_all(&mut self) -> Result<()> {
        while self.outstanding > 0 {
            self.wait_one()?;
        }
        Ok(())
    }

    /// Completes `req` at once with `result`, handing its memory back.
    fn complete_now(&mut self, req: IoRequest, result: Result<()>) {
        self.done.push(IoCompletion {
            tag: req.tag,
            result,
            buf: req.buf,
        });
    }

    fn submit_read(&mut self, mut req: IoRequest) -> Result<()> {
        let mut pieces = std::mem::take(&mut self.scratch_pieces);
        let planned = lock_chain(&self.chain).plan_read(req.offset, req.len, &mut pieces);
        if let Err(e) = planned {
            self.scratch_pieces = pieces;
            self.complete_now(req, Err(e));
            return Ok(());
        }
        let idx = self.new_req(req.tag, std::mem::take(&mut req.buf));
        let mut xfers = std::mem::take(&mut self.scratch_xfers);
        let mut chunks = std::mem::take(&mut self.scratch_chunks);
        xfers.clear();
        let r = self.reqs[idx].as_mut().expect("new");
        let mut failed = None;
        for &p in &pieces {
            let step = match p {
                Piece::Zero { buf_off, len } => r.buf.zero(buf_off, len),
                Piece::Slow {
                    level,
                    file_offset,
                    buf_off,
                    len,
                } => match &mut r.buf {
                    IoBuf::Owned(b) => lock_chain(&self.chain).read_slow(
                        level,
                        &mut b[buf_off..buf_off + len],
                        file_offset,
                    ),
                    other => {
                        self.bounce.resize(len);
                        lock_chain(&self.chain)
                            .read_slow(level, &mut self.bounce, file_offset)
                            .and_then(|()| other.fill_from(buf_off, &self.bounce))
                    }
                },
                Piece::File {
                    level,
                    file_offset,
                    buf_off,
                    len,
                } => {
                    chunks.clear();
                    r.buf.chunks(buf_off, len, &mut chunks).map(|()| {
                        for &(ptr, n, at) in &chunks {
                            let offset = file_offset + (at - buf_off) as u64;
                            xfers.push(Xfer {
                                req: idx,
                                file: self.files.pick(level, ptr, n, offset),
                                ptr,
                                len: n,
                                offset,
                                write: false,
                            });
                        }
                    })
                }
            };
            if let Err(e) = step {
                failed = Some(e);
                break;
            }
        }
        if let Some(e) = failed {
            r.error = Some(e);
            xfers.clear();
        }
        self.scratch_chunks = chunks;
        self.scratch_pieces = pieces;
        let started = self.start(idx, &xfers);
        self.scratch_xfers = xfers;
        started
    }

    fn submit_write(&mut self, mut req: IoRequest) -> Result<()> {
        let planned = lock_chain(&self.chain).plan_write(req.offset, req.len);
        let (pieces, commit) = match planned {
            Ok(Some(p)) => p,
            Ok(None) => {
                // Partial sectors: read-modify-write through the chain, synchronously.
                self.drain_all()?;
                let result = run_on_chain(&mut lock_chain(&self.chain), &mut req, &mut self.bounce);
                self.complete_now(req, result);
                return Ok(());
            }
            Err(e) => {
                self.complete_now(req, Err(e));
                return Ok(());
            }
        };
        let idx = self.new_req(req.tag, std::mem::take(&mut req.buf));
        let mut xfers = std::mem::take(&mut self.scratch_xfers);
        let mut chunks = std::mem::take(&mut self.scratch_chunks);
        xfers.clear();
        chunks.clear();
        let r = self.reqs[idx].as_mut().expect("new");
        r.commit = commit;
        let mut failed = None;
        for (buf_off, len, file_offset) in pieces {
            let first = chunks.len();
            if let Err(e) = r.buf.chunks(buf_off, len, &mut chunks) {
                failed = Some(e);
                break;
            }
            for &(ptr, n, at) in &chunks[first..] {
                let offset = file_offset + (at - buf_off) as u64;
                xfers.push(Xfer {
                    req: idx,
                    file: self.files.pick(0, ptr, n, offset),
                    ptr,
                    len: n,
                    offset,
                    write: true,
                });
            }
        }
        if let Some(e) = failed {
            // No payload goes out, so the commit must not run either.
            r.error = Some(e);
            xfers.clear();
        }
        self.scratch_chunks = chunks;
        let started = self.start(idx, &xfers);
        self.scratch_xfers = xfers;
        started
    }

    fn start(&mut self, idx: usize, xfers: &[Xfer]) -> Result<()> {
        if xfers.is_empty() {
            self.finish(idx);
            return Ok(());
        }
        self.reqs[idx].as_mut().expect("new").remaining = xfers.len();
        for &x in xfers {
            self.push_xfer(x);
        }
        Ok(())
    }
}

impl Engine for UringEngine {
    fn submit(&mut self, mut req: IoRequest) -> Result<()> {
        self.in_flight += 1;
        match req.kind {
            IoKind::Read => self.submit_read(req),
            IoKind::Write => self.submit_write(req),
            _ => {
                // Ordering points: everything before them completes (and commits) first.
                self.drain_all()?;
                let result = run_on_chain(&mut lock_chain(&self.chain), &mut req, &mut self.bounce);
                self.complete_now(req, result);
                Ok(())
            }
        }
    }

    fn kick(&mut self) -> Result<()> {
        self.submit_queued()
    }

    fn reap(&mut self, min: usize, out: &mut Vec<IoCompletion>) -> Result<()> {
        // Completions already in the ring cost no system call; the kernel is entered at most
        // once per wait, submitting whatever is queued on the way.
        self.process_cq()?;
        while self.done.len() < min && self.outstanding > 0 {
            self.wait_one()?;
        }
        self.submit_queued()?;
        self.in_flight -= self.done.len();
        out.append(&mut self.done);
        Ok(())
    }

    fn in_flight(&self) -> usize {
        self.in_flight
    }

    fn chain(&self) -> MutexGuard<'_, Chain> {
        lock_chain(&self.chain)
    }

    fn completion_fd(&mut self) -> Result<Option<RawFd>> {
        if let Some(evt) = &self.completion_evt {
            return Ok(Some(evt.as_raw_fd()));
        }
        // SAFETY: eventfd takes no pointers; a non-negative result is a new descriptor that
        // nothing else owns.
        let efd = unsafe { libc::eventfd(0, libc::EFD_CLOEXEC | libc::EFD_NONBLOCK) };
        if efd < 0 {
            let e = std::io::Error::last_os_error();
            return Err(Error::io(&self.path, "eventfd", 0, e));
        }
        // SAFETY: `efd` was just created and is owned by nobody else.
        let evt = unsafe { OwnedFd::from_raw_fd(efd) };
        self.ring
            .submitter()
            .register_eventfd(evt.as_raw_fd())
            .map_err(|e| Error::io(&self.path, "io_uring register eventfd", 0, e))?;
        let fd = evt.as_raw_fd();
        self.completion_evt = Some(evt);
        Ok(Some(fd))
    }

    fn name(&self) -> String {
        if self.files.direct_idx.iter().any(Option::is_some) {
            "io_uring (O_DIRECT)".into()
        } else {
            "io_uring (buffered: the file system refuses O_DIRECT)".into()
        }
    }
}

impl Drop for UringEngine {
    fn drop(&mut self) {
        // Never free request memory while the kernel may still use it: drain, and if that
        // fails, leak the requests' memory rather than free it under the kernel.
        if self.drain_all().is_err() && self.outstanding > 0 {
            std::mem::forget(std::mem::take(&mut self.reqs));
            std::mem::forget(std::mem::take(&mut self.merged));
        }
        // Give the image files back now: a ring being closed drops its registered files later,
        // from a kernel worker, and until then the image's lock (an open file description's)
        // would outlive the disk, refusing the next open of the image.
        let _ = self.ring.submitter().unregister_files();
    }
}
