//! Read replies spliced from the image file's page cache into `/dev/fuse`.
//!
//! ```text
//!   image file page cache ──splice (page references, no copy)──> pipe ──splice──> /dev/fuse
//!                           reply header written first ─────────┘        kernel copies once,
//!                                                                         into the reader
//! ```
//!
//! A mount answers a read that lies in one extent of one image file this way: the pipe holds
//! references to the page-cache pages, and the kernel copies them once into the reader's
//! pinned buffer. Replying from a buffer costs a second copy; replying from a mapping
//! of the file costs no copy but makes the kernel look up and pin every source page
//! (`get_user_pages` on a file mapping: as much CPU as the copy itself here).
//!
//! Invariants:
//! - A pipe is used for one reply at a time by one thread, and is empty between replies: after
//!   a reply whose data could not be spliced whole the pipe is kept only if it holds nothing
//!   ([`ReplyPipe::is_empty`]), and after one `/dev/fuse` did not take it is thrown away (a
//!   fresh one is made for the next reply), so no stray bytes ever prefix a later reply.
//! - Nothing blocks on the pipe: it is sized for the largest reply it is used for, and filling
//!   it uses `SPLICE_F_NONBLOCK`, so a reply that does not fit ends as a short splice (the caller
//!   then replies another way) instead of a deadlock.
//! - No page is moved out of the image's page cache (`SPLICE_F_MOVE` is never passed).
//! - The reply must be written to the same open file description of `/dev/fuse` that the
//!   request was read from (the kernel keeps requests being processed per description), so the
//!   session reads every request from one description and this module writes to a duplicate
//!   of it.

use std::io;
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, FromRawFd, OwnedFd};

const PAGE: usize = 4096;

/// Size of the FUSE reply header (`struct fuse_out_header`: len u32, error i32, unique u64).
const HEADER: usize = 16;

/// A pipe that carries one read reply at a time.
#[derive(Debug)]
pub struct ReplyPipe {
    read: OwnedFd,
    write: OwnedFd,
    /// Pipe buffers it can hold (each holds at most one page of spliced data).
    slots: usize,
}

impl ReplyPipe {
    /// A pipe able to carry replies of up to `max_data` bytes at any file offset (asks for that
    /// capacity; a smaller pipe is kept when the system limit refuses it, and replies that do
    /// not fit it are refused by [`ReplyPipe::fill`]).
    pub fn new(max_data: usize) -> io::Result<ReplyPipe> {
        let mut fds = [0; 2];
        // SAFETY: `fds` is a valid array of two ints for pipe2 to fill.
        if unsafe { libc::pipe2(fds.as_mut_ptr(), libc::O_CLOEXEC) } != 0 {
            return Err(io::Error::last_os_error());
        }
        // SAFETY: pipe2 succeeded, so both descriptors are fresh and owned by nobody else.
        let (read, write) = unsafe { (OwnedFd::from_raw_fd(fds[0]), OwnedFd::from_raw_fd(fds[1])) };
        // Header slot + one slot per page touched by an unaligned reply, as a power of two.
        // Without CAP_SYS_RESOURCE the kernel refuses sizes over fs.pipe-max-size (1 MiB by
        // default): take the largest it allows.
        let mut want = ((max_data / PAGE + 2) * PAGE).next_power_of_two();
        while want > 16 * PAGE {
            // SAFETY: F_SETPIPE_SZ takes an int and touches no memory of ours.
            let rc =
                unsafe { libc::fcntl(write.as_raw_fd(), libc::F_SETPIPE_SZ, want as libc::c_int) };
            if rc >= 0 {
                break;
            }
            want /= 2;
        }
        // SAFETY: F_GETPIPE_SZ touches no memory of ours.
        let size = unsafe { libc::fcntl(write.as_raw_fd(), libc::F_GETPIPE_SZ) };
        if size < 0 {
            return Err(io::Error::last_os_error());
        }
        Ok(ReplyPipe {
            read,
            write,
            slots: size as usize / PAGE,
        })
    }

    /// The largest reply that fits the pipe from any file offset (a multiple of the page size).
    pub fn max_reply(&self) -> usize {
        self.slots.saturating_sub(2) * PAGE
    }

    /// Whether a reply of `len` bytes read from file offset `at` fits the pipe.
    pub fn fits(&self, at: u64, len: usize) -> bool {
        let lead = (at % PAGE as u64) as usize;
        (lead + len).div_ceil(PAGE) < self.slots
    }

    /// Puts the reply to request `unique` into the pipe: its header, then `len` bytes of `file`
    /// at offset `at`. `Ok(false)` when they could not all be spliced (the file is shorter than
    /// that now, or the pipe is too small): the pipe must then be dropped.
    pub fn fill(
        &mut self,
        unique: u64,
        file: BorrowedFd<'_>,
        at: u64,
        len: usize,
    ) -> io::Result<bool> {
        if !self.fits(at, len) {
            return Ok(false);
        }
        let total = u32::try_from(HEADER + len).map_err(|_| io::ErrorKind::InvalidInput)?;
        let mut header = [0u8; HEADER];
        header[0..4].copy_from_slice(&total.to_ne_bytes());
        header[8..16].copy_from_slice(&unique.to_ne_bytes());
        // SAFETY: writes HEADER bytes from a live local array to our pipe.
        let n = unsafe { libc::write(self.write.as_raw_fd(), header.as_ptr().cast(), HEADER) };
        if n != HEADER as isize {
            return Ok(false);
        }
        let mut off = libc::loff_t::try_from(at).map_err(|_| io::ErrorKind::InvalidInput)?;
        let mut left = len;
        while left > 0 {
            // SAFETY: splices between two descriptors we hold; `off` is a live local.
            let n = unsafe {
                libc::splice(
                    file.as_raw_fd(),
                    &mut off,
                    self.write.as_raw_fd(),
                    std::ptr::null_mut(),
                    left,
                    libc::SPLICE_F_NONBLOCK,
                )
            };
            match n {
                0 => return Ok(false),
                n if n > 0 => left -= n as usize,
                _ => {
                    let e = io::Error::last_os_error();
                    if e.kind() != io::ErrorKind::Interrupted {
                        return Ok(false);
                    }
                }
            }
        }
        Ok(true)
    }

    /// Sends the reply that [`ReplyPipe::fill`] put in the pipe (`len` data bytes) to `dev`.
    pub fn send(&mut self, dev: BorrowedFd<'_>, len: usize) -> io::Result<()> {
        let total = HEADER + len;
        loop {
            // SAFETY: splices between two descriptors we hold, without offsets.
            let n = unsafe {
                libc::splice(
                    self.read.as_raw_fd(),
                    std::ptr::null_mut(),
                    dev.as_raw_fd(),
                    std::ptr::null_mut(),
                    total,
                    0,
                )
            };
            if n == total as isize {
                return Ok(());
            }
            let e = if n < 0 {
                io::Error::last_os_error()
            } else {
                io::Error::other(format!("/dev/fuse took {n} of {total} bytes"))
            };
            if e.kind() != io::ErrorKind::Interrupted {
                return Err(e);
            }
        }
    }

    /// Whether the pipe holds no bytes (after a refused [`ReplyPipe::fill`]: whether it can
    /// still carry the next reply). A pipe that cannot be asked counts as not empty.
    pub fn is_empty(&self) -> bool {
        let mut n: libc::c_int = 0;
        // SAFETY: FIONREAD writes one int to a live local.
        let rc = unsafe { libc::ioctl(self.read.as_raw_fd(), libc::FIONREAD, &mut n) };
        rc == 0 && n == 0
    }

    /// The pipe's read end (tests read a filled reply back from it).
    pub fn reader(&self) -> BorrowedFd<'_> {
        self.read.as_fd()
    }
}
