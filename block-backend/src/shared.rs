//! [`SharedDisk`]: one open disk served to many threads (the FUSE mount's workers, the NBD
//! server's connections).
//!
//! ```text
//!   thread 1 ─┐                       ┌─ Mutex<DiskState> ── Box<dyn Disk>   (every write,
//!   thread 2 ─┼── read_at / write_at ─┤                                         flush, discard)
//!   thread N ─┘     flush / discard   └─ readers: [Mutex<Box<dyn Disk>>; k]  (read-only disks:
//!                                                                              reads take any free one)
//! ```
//!
//! The [`Disk`] trait takes `&mut self`, so a writable disk sits behind one mutex and a call
//! holds it only for the disk call itself. A read-only disk may be given extra read-only
//! handles of the same image ([`SharedOptions::readers`]); a read then takes whichever handle
//! is free, so reads (and their disk I/O on a cold cache) run in parallel.
//!
//! Invariants:
//! - A writable disk has exactly one handle: every read sees every completed write, and a
//!   [`SharedDisk::flush`] covers every write completed before it, whichever thread made it.
//! - Extra handles are only kept when the disk and the handle are read-only and of the same
//!   size.
//! - After [`SharedDisk::close`] (flush, then drop every handle) each call fails with
//!   [`SharedDiskError::Closed`]; a poisoned lock is taken over (a panicking caller cannot leave
//!   a `Disk` in a state the next call could make worse than an error).

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};

use crate::{Disk, MapExtent};

/// Size of the zero buffer [`SharedDisk::write_zeroes`] writes from.
const ZERO_CHUNK: u64 = 1 << 20;

/// Errors of [`SharedDisk`].
#[derive(Debug, thiserror::Error)]
pub enum SharedDiskError {
    /// The disk reported an error.
    #[error(transparent)]
    Disk(#[from] crate::Error),
    /// The disk was closed (its server or mount is ending).
    #[error("the disk is closed")]
    Closed,
}

/// Result of [`SharedDisk`] calls.
pub type SharedResult<T> = Result<T, SharedDiskError>;

/// How a [`SharedDisk`] treats discards and reads.
pub struct SharedOptions {
    /// Pass discards to [`Disk::discard`]; when false, [`SharedDisk::supports_discard`] says so
    /// and callers refuse hole punching or write zeros themselves.
    pub discard: bool,
    /// More read-only handles of the same disk, for parallel reads. Only used when the disk is
    /// read-only (a writable disk has one state, so one handle).
    pub readers: Vec<Box<dyn Disk>>,
}

impl Default for SharedOptions {
    fn default() -> Self {
        SharedOptions {
            discard: true,
            readers: Vec::new(),
        }
    }
}

struct DiskState {
    /// `None` once closed.
    disk: Option<Box<dyn Disk>>,
    /// Something was written since the last successful flush.
    dirty: bool,
}

/// The disk shared by several threads.
pub struct SharedDisk {
    state: Mutex<DiskState>,
    /// Extra read-only handles of the same image (read-only disks only).
    readers: Vec<Mutex<Option<Box<dyn Disk>>>>,
    /// Round-robin start for reads when every handle is busy.
    next_reader: AtomicUsize,
    size: u64,
    read_only: bool,
    discard: bool,
}

impl std::fmt::Debug for SharedDisk {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SharedDisk")
            .field("size", &self.size)
            .field("read_only", &self.read_only)
            .field("discard", &self.discard)
            .field("readers", &self.readers.len())
            .finish_non_exhaustive()
    }
}

impl SharedDisk {
    /// Wraps an open disk (discards passed on, no extra read handles).
    pub fn new(disk: Box<dyn Disk>) -> Arc<SharedDisk> {
        SharedDisk::with_options(disk, SharedOptions::default())
    }

    /// Wraps an open disk.
    pub fn with_options(disk: Box<dyn Disk>, opts: SharedOptions) -> Arc<SharedDisk> {
        Arc::new(SharedDisk::unshared(disk, opts))
    }

    /// Wraps an open disk without the `Arc` (for callers that embed it).
    pub fn unshared(disk: Box<dyn Disk>, opts: SharedOptions) -> SharedDisk {
        let read_only = disk.is_read_only();
        let readers = if read_only {
            opts.readers
                .into_iter()
                .filter(|r| r.is_read_only() && r.size() == disk.size())
                .map(|r| Mutex::new(Some(r)))
                .collect()
        } else {
            Vec::new()
        };
        SharedDisk {
            readers,
            next_reader: AtomicUsize::new(0),
            size: disk.size(),
            read_only,
            discard: opts.discard,
            state: Mutex::new(DiskState {
                disk: Some(disk),
                dirty: false,
            }),
        }
    }

    /// Size of the virtual disk.
    pub fn size(&self) -> u64 {
        self.size
    }

    /// True if the disk refuses writes.
    pub fn is_read_only(&self) -> bool {
        self.read_only
    }

    /// True if discards reach [`Disk::discard`].
    pub fn supports_discard(&self) -> bool {
        self.discard
    }

    /// How many extra read handles are in use (0 for a writable disk).
    pub fn reader_count(&self) -> usize {
        self.readers.len()
    }

    fn lock(&self) -> MutexGuard<'_, DiskState> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Reads `buf` at byte `offset` of the disk (on any free handle of a read-only disk).
    pub fn read_at(&self, buf: &mut [u8], offset: u64) -> SharedResult<()> {
        self.with_reader(|disk| Ok(disk.read_at(buf, offset)?))
    }

    /// [`Disk::map`] of `[offset, offset + len)` (on any free handle of a read-only disk).
    pub fn map(&self, offset: u64, len: u64) -> SharedResult<Vec<MapExtent>> {
        self.with_reader(|disk| Ok(disk.map(offset, len)?))
    }

    /// `f(file, offset in it)` when `[offset, offset + len)` lies in one extent of one image
    /// file; `None` otherwise (empty range, several extents, zeros, a log overlay). `f` runs
    /// while the handle is held: on a writable disk, under the lock every write and discard
    /// takes, so the range cannot move to other bytes of the file while `f` looks at it.
    pub fn in_one_extent<R>(
        &self,
        offset: u64,
        len: usize,
        f: impl FnOnce(&std::fs::File, u64) -> R,
    ) -> SharedResult<Option<R>> {
        if len == 0 {
            return Ok(None);
        }
        self.with_reader(|disk| {
            Ok(match disk.leading_extent(offset, len as u64)? {
                Some((file, at, n)) if n == len as u64 => Some(f(file, at)),
                _ => None,
            })
        })
    }

    /// Runs `f` on a handle of the disk: the only one of a writable disk, any free one of a
    /// read-only disk. `f` must not write.
    pub fn with_reader<R>(
        &self,
        f: impl FnOnce(&mut dyn Disk) -> SharedResult<R>,
    ) -> SharedResult<R> {
        if self.readers.is_empty() {
            let mut s = self.lock();
            let disk = s.disk.as_mut().ok_or(SharedDiskError::Closed)?;
            return f(disk.as_mut());
        }
        if let Ok(mut s) = self.state.try_lock() {
            let disk = s.disk.as_mut().ok_or(SharedDiskError::Closed)?;
            return f(disk.as_mut());
        }
        let n = self.readers.len();
        let start = self.next_reader.fetch_add(1, Ordering::Relaxed) % n;
        let free = (0..n).find_map(|i| self.readers[(start + i) % n].try_lock().ok());
        // All busy: wait for one (a different one each time).
        let mut r = match free {
            Some(r) => r,
            None => self.readers[start]
                .lock()
                .unwrap_or_else(|p| p.into_inner()),
        };
        let disk = r.as_mut().ok_or(SharedDiskError::Closed)?;
        f(disk.as_mut())
    }

    /// Writes `buf` at byte `offset` of the disk.
    pub fn write_at(&self, buf: &[u8], offset: u64) -> SharedResult<()> {
        let mut s = self.lock();
        s.dirty = true;
        let disk = s.disk.as_mut().ok_or(SharedDiskError::Closed)?;
        Ok(disk.write_at(buf, offset)?)
    }

    /// Discards `[offset, offset + len)` (reads as zeros afterwards).
    pub fn discard(&self, offset: u64, len: u64) -> SharedResult<()> {
        let mut s = self.lock();
        s.dirty = true;
        let disk = s.disk.as_mut().ok_or(SharedDiskError::Closed)?;
        Ok(disk.discard(offset, len)?)
    }

    /// Writes zeros over `[offset, offset + len)` through the write path (the range stays
    /// allocated), a MiB at a time; the lock is let go between pieces.
    pub fn write_zeroes(&self, offset: u64, len: u64) -> SharedResult<()> {
        let zeros = vec![0u8; len.min(ZERO_CHUNK) as usize];
        let end = offset.saturating_add(len);
        let mut pos = offset;
        while pos < end {
            let n = (end - pos).min(ZERO_CHUNK) as usize;
            self.write_at(&zeros[..n], pos)?;
            pos += n as u64;
        }
        Ok(())
    }

    /// Makes everything written so far durable ([`Disk::flush`]).
    pub fn flush(&self) -> SharedResult<()> {
        let mut s = self.lock();
        Self::flush_locked(&mut s)
    }

    /// Flushes only if something was written since the last flush.
    pub fn flush_if_dirty(&self) -> SharedResult<()> {
        let mut s = self.lock();
        if s.dirty {
            Self::flush_locked(&mut s)?;
        }
        Ok(())
    }

    fn flush_locked(s: &mut DiskState) -> SharedResult<()> {
        let disk = s.disk.as_mut().ok_or(SharedDiskError::Closed)?;
        disk.flush()?;
        s.dirty = false;
        Ok(())
    }

    /// Flushes and closes the disk; later calls fail with [`SharedDiskError::Closed`].
    pub fn close(&self) -> SharedResult<()> {
        for r in &self.readers {
            *r.lock().unwrap_or_else(|p| p.into_inner()) = None;
        }
        let mut s = self.lock();
        if s.disk.is_none() {
            return Ok(());
        }
        let flushed = s.disk.as_mut().map_or(Ok(()), |d| d.flush());
        s.disk = None;
        Ok(flushed?)
    }
}
