//! An in-memory file for the targets: cheap to make from an input (no copies kept, unlike
//! [`image_io::CrashFile`], which the crash checks need), counting writes so read-only paths can
//! be shown never to write, and with a size limit standing in for a disk that fills up: hostile
//! images may ask a writable open to write anywhere (a log replay to a huge offset), which a
//! real file system refuses with an error where a plain in-memory file would try to allocate it.

use image_io::ImageFile;
use std::io;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};

#[derive(Debug)]
struct State {
    bytes: Mutex<Vec<u8>>,
    writes: AtomicU64,
    budget: AtomicU64,
}

/// Shared in-memory file (clones see the same bytes) that refuses to grow past a limit or to
/// take more than a budget of writes in total (both `io::ErrorKind::StorageFull`).
#[derive(Debug, Clone)]
pub struct BoundedFile {
    state: Arc<State>,
    max_len: u64,
}

impl BoundedFile {
    /// A file holding `bytes` that may grow to `max_len` bytes and take `budget` bytes of
    /// writes.
    pub fn new(bytes: Vec<u8>, max_len: u64, budget: u64) -> BoundedFile {
        BoundedFile {
            state: Arc::new(State {
                bytes: Mutex::new(bytes),
                writes: AtomicU64::new(0),
                budget: AtomicU64::new(budget),
            }),
            max_len,
        }
    }

    /// A file holding `bytes` that refuses every write (for read-only paths).
    pub fn read_only(bytes: Vec<u8>) -> BoundedFile {
        BoundedFile::new(bytes, 0, 0)
    }

    /// Writes and length changes issued so far (refused ones included).
    pub fn write_count(&self) -> u64 {
        self.state.writes.load(Ordering::Relaxed)
    }

    /// A copy of the content.
    pub fn contents(&self) -> Vec<u8> {
        self.lock().clone()
    }

    fn lock(&self) -> MutexGuard<'_, Vec<u8>> {
        self.state.bytes.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn full(what: &str) -> io::Error {
        io::Error::new(
            io::ErrorKind::StorageFull,
            format!("fuzz file limit: {what}"),
        )
    }
}

impl ImageFile for BoundedFile {
    fn read_exact_at(&self, buf: &mut [u8], offset: u64) -> io::Result<()> {
        let b = self.lock();
        let end = offset
            .checked_add(buf.len() as u64)
            .filter(|&e| e <= b.len() as u64)
            .ok_or_else(|| io::Error::new(io::ErrorKind::UnexpectedEof, "read past end of file"))?;
        buf.copy_from_slice(&b[offset as usize..end as usize]);
        Ok(())
    }

    fn write_all_at(&self, buf: &[u8], offset: u64) -> io::Result<()> {
        self.state.writes.fetch_add(1, Ordering::Relaxed);
        let end = offset
            .checked_add(buf.len() as u64)
            .filter(|&e| e <= self.max_len)
            .ok_or_else(|| Self::full("write past the size limit"))?;
        let n = buf.len() as u64;
        if self
            .state
            .budget
            .fetch_update(Ordering::Relaxed, Ordering::Relaxed, |b| b.checked_sub(n))
            .is_err()
        {
            return Err(Self::full("write budget spent"));
        }
        let mut b = self.lock();
        if b.len() < end as usize {
            b.resize(end as usize, 0);
        }
        b[offset as usize..end as usize].copy_from_slice(buf);
        Ok(())
    }

    fn sync_data(&self) -> io::Result<()> {
        Ok(())
    }

    fn len(&self) -> io::Result<u64> {
        Ok(self.lock().len() as u64)
    }

    fn set_len(&self, len: u64) -> io::Result<()> {
        self.state.writes.fetch_add(1, Ordering::Relaxed);
        if len > self.max_len {
            return Err(Self::full("length past the size limit"));
        }
        self.lock().resize(len as usize, 0);
        Ok(())
    }
}
