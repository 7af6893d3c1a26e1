//! Page-aligned heap buffers for moving payload.
//!
//! Why: copies into a buffer whose start is not cache-line aligned can be several times slower.
//! On this project's AMD EPYC test machine a 2 MiB `pread` from the page cache into a plain
//! `Vec<u8>` (glibc puts large allocations 16 bytes past a page boundary) ran at 1.7 GB/s, and
//! into a page-aligned buffer at 7.6 GB/s (`benches/convert.sh`, issue 7). Every buffer that
//! carries bulk data through `read`/`pread` (convert, compare, read, the FUSE daemon, bench)
//! uses this type. Page alignment also satisfies O_DIRECT's memory alignment.

use std::ops::{Deref, DerefMut};

/// A zero-initialised byte buffer whose first byte is 4096-byte aligned. Invariant:
/// `start + len <= storage.len()` and `storage[start..]` begins on a 4096-byte boundary.
#[derive(Clone)]
pub struct AlignedBuf {
    storage: Vec<u8>,
    start: usize,
    len: usize,
}

impl AlignedBuf {
    /// Alignment of the first byte.
    pub const ALIGN: usize = 4096;

    /// A buffer of `len` zero bytes.
    pub fn new(len: usize) -> AlignedBuf {
        let storage = vec![0u8; len + Self::ALIGN];
        let start = storage.as_ptr().align_offset(Self::ALIGN);
        AlignedBuf {
            storage,
            start,
            len,
        }
    }

    /// Sets the length to `len`, keeping the allocation when it is large enough. Bytes that
    /// come into view keep whatever they held before (they were initialised at allocation).
    pub fn resize(&mut self, len: usize) {
        if self.start + len <= self.storage.len() {
            self.len = len;
        } else {
            *self = AlignedBuf::new(len);
        }
    }
}

impl Deref for AlignedBuf {
    type Target = [u8];
    fn deref(&self) -> &[u8] {
        &self.storage[self.start..self.start + self.len]
    }
}

impl DerefMut for AlignedBuf {
    fn deref_mut(&mut self) -> &mut [u8] {
        &mut self.storage[self.start..self.start + self.len]
    }
}

impl std::fmt::Debug for AlignedBuf {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("AlignedBuf")
            .field("len", &self.len)
            .finish()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn buffers_start_on_a_page_boundary_and_keep_it_through_resizes() {
        for len in [0, 1, 4095, 4096, 2 << 20] {
            let mut b = AlignedBuf::new(len);
            assert_eq!(b.len(), len);
            assert_eq!(b.as_ptr() as usize % AlignedBuf::ALIGN, 0);
            assert!(b.iter().all(|&x| x == 0));
            b.resize(len / 2);
            assert_eq!(b.len(), len / 2);
            assert_eq!(b.as_ptr() as usize % AlignedBuf::ALIGN, 0);
            b.resize(len + 10_000);
            assert_eq!(b.len(), len + 10_000);
            assert_eq!(b.as_ptr() as usize % AlignedBuf::ALIGN, 0);
            b[len + 9_999] = 7;
            assert_eq!(b[len + 9_999], 7);
        }
    }
}
