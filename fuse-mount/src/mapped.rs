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

use memmap2::{Advice, Mmap, MmapOptions};

/// One file mapped whole, read-only (memmap2: unmapped when dropped).
#[derive(Debug)]
pub struct Mapping(Mmap);

impl Mapping {
    /// Maps `file` whole; `None` if it is empty or cannot be mapped.
    fn new(file: &File) -> Option<Mapping> {
        let len = usize::try_from(file.metadata().ok()?.len()).ok()?;
        if len == 0 {
            return None;
        }
        // SAFETY: a shared read-only mapping of an image file; the bytes may change under it
        // (writes through another handle show, as in the page cache they come from), and a
        // shrinking file is caught before each use by MADV_POPULATE_READ (see the module docs).
        let map = unsafe { MmapOptions::new().len(len).map(file) }.ok()?;
        Some(Mapping(map))
    }

    /// `len` bytes at `offset` of the file, populated, or `None` if out of range or no longer
    /// backed by the file.
    pub fn get(&self, offset: u64, len: usize) -> Option<&[u8]> {
        let start = usize::try_from(offset).ok()?;
        let end = start.checked_add(len)?;
        if end > self.0.len() || len == 0 {
            return None;
        }
        // Faults the pages in, and reports EFAULT for pages past the end of the file instead
        // of raising SIGBUS.
        self.0.advise_range(Advice::PopulateRead, start, len).ok()?;
        Some(&self.0[start..end])
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
