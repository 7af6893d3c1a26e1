//! Read-only mappings of image files: a read-only mount replies to a read straight from the
//! page cache of the image file (the kernel copies once, into the reader's buffer) instead of
//! reading into a buffer first and copying that (twice).
//!
//! Invariants: a mapping is `PROT_READ`, `MAP_SHARED`, as long as the file was when mapped, and
//! is unmapped only when dropped, after every reply that used it was written (replies are
//! written synchronously, holding an `Arc` of the mapping). Before a range is used it is
//! populated with `MADV_POPULATE_READ`, which fails with `EFAULT` rather than raising `SIGBUS`
//! when the file has shrunk since (someone else truncated the image under a mount): the caller
//! then reads through the disk instead and gets an error it can report. A truncation landing
//! between that check and the copy would still raise `SIGBUS`; images are not truncated under
//! a mount by anything in this project.

use std::collections::HashMap;
use std::fs::File;
use std::os::fd::{AsRawFd, RawFd};
use std::sync::{Arc, Mutex};

/// One file mapped whole, read-only.
#[derive(Debug)]
pub struct Mapping {
    ptr: *mut libc::c_void,
    len: usize,
}

// SAFETY: the mapping is read-only and never written through; sharing the pointer between
// threads only allows concurrent reads of it.
unsafe impl Send for Mapping {}
// SAFETY: as above.
unsafe impl Sync for Mapping {}

impl Mapping {
    /// Maps `file` whole; `None` if it is empty or cannot be mapped.
    fn new(file: &File) -> Option<Mapping> {
        let len = usize::try_from(file.metadata().ok()?.len()).ok()?;
        if len == 0 {
            return None;
        }
        // SAFETY: a fresh shared read-only mapping of an open descriptor; the kernel picks the
        // address, so no existing memory is affected.
        let ptr = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                len,
                libc::PROT_READ,
                libc::MAP_SHARED,
                file.as_raw_fd(),
                0,
            )
        };
        (ptr != libc::MAP_FAILED).then_some(Mapping { ptr, len })
    }

    /// `len` bytes at `offset` of the file, populated, or `None` if out of range or no longer
    /// backed by the file.
    pub fn get(&self, offset: u64, len: usize) -> Option<&[u8]> {
        let start = usize::try_from(offset).ok()?;
        let end = start.checked_add(len)?;
        if end > self.len || len == 0 {
            return None;
        }
        let page = 4096;
        let first = start - start % page;
        // SAFETY: `first..end` lies inside the mapping; MADV_POPULATE_READ only faults pages in
        // (and reports EFAULT for pages past the end of the file instead of raising SIGBUS).
        let rc = unsafe {
            libc::madvise(
                self.ptr.cast::<u8>().add(first).cast(),
                end - first,
                libc::MADV_POPULATE_READ,
            )
        };
        if rc != 0 {
            return None;
        }
        // SAFETY: `start..end` lies inside the live mapping (unmapped only on drop, and `self`
        // is borrowed), whose pages were just populated.
        Some(unsafe { std::slice::from_raw_parts(self.ptr.cast::<u8>().add(start), len) })
    }
}

impl Drop for Mapping {
    fn drop(&mut self) {
        // SAFETY: `ptr`/`len` are exactly what mmap returned; no slice of it outlives `self`.
        unsafe {
            libc::munmap(self.ptr, self.len);
        }
    }
}

/// The mappings of the files behind a read-only disk, made on first use, keyed by descriptor
/// (each read handle has its own descriptors, which stay open as long as the disk).
#[derive(Debug, Default)]
pub struct Maps {
    by_fd: Mutex<HashMap<RawFd, Option<Arc<Mapping>>>>,
}

impl Maps {
    /// The mapping of `file` (made now if this is the first use), or `None` if it cannot be
    /// mapped.
    pub fn of(&self, file: &File) -> Option<Arc<Mapping>> {
        let mut m = self.by_fd.lock().unwrap_or_else(|p| p.into_inner());
        m.entry(file.as_raw_fd())
            .or_insert_with(|| Mapping::new(file).map(Arc::new))
            .clone()
    }
}
