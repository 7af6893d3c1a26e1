//! # image-io — the file underneath a disk image
//!
//! The format crates (`vhd`, `vhdx`) read and write their metadata through [`ImageFile`]:
//! positional reads and writes, a durability barrier, and the file length. `std::fs::File`
//! implements it for real use; [`CrashFile`] implements it in memory for crash tests.
//!
//! ```text
//!   format crate ──ImageFile──> std::fs::File      (real images)
//!                          └──> CrashFile          (tests: volatile vs durable bytes)
//! ```
//!
//! [`lock`] opens image files with QEMU-compatible locks: one writer or many readers per image.
//!
//! [`CrashFile`] keeps the durable bytes (what survived the last `sync_data`) apart from the
//! writes issued since. [`CrashFile::crash`] returns a file as it could be after a power cut:
//! the durable bytes plus any chosen subset of the unsynced writes, each of which may also be
//! torn at a 512-byte boundary. Crash tests then check that every such state opens, checks clean
//! and holds every write that was flushed.
#![deny(unsafe_code)]
#![warn(missing_docs)]

pub mod check;
pub mod compact;
pub mod error;
pub mod format;
pub mod lock;
pub mod publish;

pub use error::ImageError;
pub use lock::{InUse, OpenMode};

use std::io;
use std::sync::{Arc, Mutex};

/// Positional I/O on the file underneath an image.
pub trait ImageFile: Send + Sync + std::fmt::Debug {
    /// Reads exactly `buf.len()` bytes at `offset` (error if the file is shorter).
    fn read_exact_at(&self, buf: &mut [u8], offset: u64) -> io::Result<()>;
    /// Writes all of `buf` at `offset`, extending the file if needed.
    fn write_all_at(&self, buf: &[u8], offset: u64) -> io::Result<()>;
    /// Durability barrier: every write issued before it survives a crash.
    fn sync_data(&self) -> io::Result<()>;
    /// Current length in bytes.
    fn len(&self) -> io::Result<u64>;
    /// Whether the file is empty.
    fn is_empty(&self) -> io::Result<bool> {
        Ok(self.len()? == 0)
    }
    /// Truncates or extends (with zeros).
    fn set_len(&self, len: u64) -> io::Result<()>;
    /// Makes `[offset, offset + len)` read as zeros, never extending the file (the part past
    /// its end already reads as zeros once the file is extended). Time and space must not grow
    /// with `len` where the file system can help: a hostile VHDX log may ask for terabytes.
    /// The default writes zeros, 1 MiB at a time, up to the current end.
    fn zero_range(&self, offset: u64, len: u64) -> io::Result<()> {
        write_zeros(self, offset, len)
    }
}

/// Writes zeros over `[offset, offset + len)` clipped to the file's current length.
fn write_zeros<F: ImageFile + ?Sized>(f: &F, offset: u64, len: u64) -> io::Result<()> {
    const STEP: u64 = 1 << 20;
    let end = offset.saturating_add(len).min(f.len()?);
    let zeros = vec![0u8; STEP.min(end.saturating_sub(offset)) as usize];
    let mut at = offset;
    while at < end {
        let n = (end - at).min(STEP);
        f.write_all_at(&zeros[..n as usize], at)?;
        at += n;
    }
    Ok(())
}

impl ImageFile for std::fs::File {
    fn read_exact_at(&self, buf: &mut [u8], offset: u64) -> io::Result<()> {
        std::os::unix::fs::FileExt::read_exact_at(self, buf, offset)
    }
    fn write_all_at(&self, buf: &[u8], offset: u64) -> io::Result<()> {
        std::os::unix::fs::FileExt::write_all_at(self, buf, offset)
    }
    fn sync_data(&self) -> io::Result<()> {
        std::fs::File::sync_data(self)
    }
    fn len(&self) -> io::Result<u64> {
        Ok(self.metadata()?.len())
    }
    fn set_len(&self, len: u64) -> io::Result<()> {
        std::fs::File::set_len(self, len)
    }
    /// Punches a hole (`FALLOC_FL_PUNCH_HOLE | FALLOC_FL_KEEP_SIZE`): constant work, and the
    /// space is returned. Falls back to writing zeros where the file system cannot punch.
    fn zero_range(&self, offset: u64, len: u64) -> io::Result<()> {
        use std::os::fd::AsRawFd;
        let (Ok(off), Ok(n)) = (i64::try_from(offset), i64::try_from(len)) else {
            return Err(io::Error::new(
                io::ErrorKind::InvalidInput,
                "range beyond i64",
            ));
        };
        if n == 0 {
            return Ok(());
        }
        #[allow(unsafe_code)]
        // SAFETY: fallocate takes a descriptor this `File` keeps open and plain integers.
        let rc = unsafe {
            libc::fallocate(
                self.as_raw_fd(),
                libc::FALLOC_FL_PUNCH_HOLE | libc::FALLOC_FL_KEEP_SIZE,
                off,
                n,
            )
        };
        if rc == 0 {
            // The hole is a metadata change: make it durable like the writes it replaces
            // would be after `sync_data`.
            return std::fs::File::sync_all(self);
        }
        let e = io::Error::last_os_error();
        match e.raw_os_error() {
            Some(libc::EOPNOTSUPP) | Some(libc::ENOSYS) | Some(libc::EINVAL) => {
                write_zeros(self, offset, len)
            }
            _ => Err(e),
        }
    }
}

/// One write (or length change) issued since the last sync.
#[derive(Debug, Clone)]
enum Pending {
    Write { offset: u64, data: Vec<u8> },
    SetLen(u64),
}

#[derive(Debug, Default)]
struct State {
    initial: Vec<u8>,
    // The durable bytes are not kept: they are rebuilt from `initial` and `history` when a
    // crash is simulated, so a sync costs nothing (fuzz targets sync thousands of times).
    current: Vec<u8>,
    pending: Vec<Pending>,
    /// Every operation since creation, `None` standing for a sync.
    history: Vec<Option<Pending>>,
    writes: u64,
    syncs: u64,
}

/// In-memory file that remembers which bytes are durable. Cheap to clone (shared state).
#[derive(Debug, Clone, Default)]
pub struct CrashFile {
    state: Arc<Mutex<State>>,
}

/// Which unsynced operations survive a simulated crash.
#[derive(Debug, Clone, Copy)]
pub enum Survivors {
    /// None of them: only durable bytes.
    None,
    /// All of them (a crash right after the last write reached the disk).
    All,
    /// Only the first `n`, in issue order.
    Prefix(usize),
    /// Operation `i` survives when bit `i % 64` of the mask is set; a surviving write whose
    /// index is in `torn` keeps only its first 512-byte sector.
    Mask {
        /// Survival bits.
        mask: u64,
        /// Index of a write torn after its first sector.
        torn: Option<usize>,
    },
}

impl Survivors {
    /// The crash shapes a crash test tries at every cut, by name: no pending write survives,
    /// all do, every other one (odd indexes), and the even ones with write `torn` cut after its
    /// first sector.
    pub fn matrix(torn: usize) -> [(&'static str, Survivors); 4] {
        [
            ("none", Survivors::None),
            ("all", Survivors::All),
            (
                "odd",
                Survivors::Mask {
                    mask: 0xAAAA_AAAA_AAAA_AAAA,
                    torn: None,
                },
            ),
            (
                "even+torn",
                Survivors::Mask {
                    mask: 0x5555_5555_5555_5555,
                    torn: Some(torn),
                },
            ),
        ]
    }
}

fn apply(buf: &mut Vec<u8>, op: &Pending, limit: Option<usize>) {
    match op {
        Pending::Write { offset, data } => {
            let n = limit.unwrap_or(data.len()).min(data.len());
            let end = *offset as usize + n;
            if buf.len() < end {
                buf.resize(end, 0);
            }
            buf[*offset as usize..end].copy_from_slice(&data[..n]);
        }
        Pending::SetLen(len) => buf.resize(*len as usize, 0),
    }
}

impl CrashFile {
    /// An empty file.
    pub fn new() -> CrashFile {
        CrashFile::default()
    }

    /// A file whose durable and current content is `bytes`.
    pub fn from_bytes(bytes: Vec<u8>) -> CrashFile {
        let s = State {
            initial: bytes.clone(),
            current: bytes,
            ..State::default()
        };
        CrashFile {
            state: Arc::new(Mutex::new(s)),
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// The current content (what reads see).
    pub fn contents(&self) -> Vec<u8> {
        self.lock().current.clone()
    }

    /// Number of writes issued so far (for "crash after write i" loops).
    pub fn write_count(&self) -> u64 {
        self.lock().writes
    }

    /// Number of unsynced operations.
    pub fn pending_count(&self) -> usize {
        self.lock().pending.len()
    }

    /// Number of syncs so far.
    pub fn sync_count(&self) -> u64 {
        self.lock().syncs
    }

    /// Number of operations (writes, length changes, syncs) so far.
    pub fn op_count(&self) -> usize {
        self.lock().history.len()
    }

    /// The durable content right after sync number `k` (1-based; 0 = the initial content).
    pub fn state_after_sync(&self, k: u64) -> CrashFile {
        let s = self.lock();
        let mut bytes = s.initial.clone();
        let mut seen = 0;
        for op in &s.history {
            match op {
                None => {
                    seen += 1;
                    if seen == k {
                        break;
                    }
                }
                Some(op) => apply(&mut bytes, op, None),
            }
        }
        assert!(seen >= k, "only {seen} syncs happened");
        CrashFile::from_bytes(bytes)
    }

    /// The file as a power cut after the first `n` operations could leave it: everything up to
    /// the last sync among them, plus the chosen survivors of the writes after that sync.
    pub fn crash_after_op(&self, n: usize, survivors: Survivors) -> CrashFile {
        let s = self.lock();
        let ops = &s.history[..n.min(s.history.len())];
        let last_sync = ops.iter().rposition(Option::is_none).map_or(0, |i| i + 1);
        let mut bytes = s.initial.clone();
        for op in ops[..last_sync].iter().flatten() {
            apply(&mut bytes, op, None);
        }
        let pending: Vec<Pending> = ops[last_sync..].iter().flatten().cloned().collect();
        CrashFile::from_bytes(survive(bytes, &pending, survivors))
    }

    /// The file as it could be after a power cut now: durable bytes plus the chosen survivors.
    pub fn crash(&self, survivors: Survivors) -> CrashFile {
        let n = self.op_count();
        self.crash_after_op(n, survivors)
    }
}

fn survive(mut bytes: Vec<u8>, pending: &[Pending], survivors: Survivors) -> Vec<u8> {
    {
        for (i, op) in pending.iter().enumerate() {
            let (keep, limit) = match survivors {
                Survivors::None => (false, None),
                Survivors::All => (true, None),
                Survivors::Prefix(n) => (i < n, None),
                Survivors::Mask { mask, torn } => (
                    mask & (1 << (i % 64)) != 0,
                    (torn == Some(i)).then_some(512),
                ),
            };
            if keep {
                apply(&mut bytes, op, limit);
            }
        }
    }
    bytes
}

impl ImageFile for CrashFile {
    fn read_exact_at(&self, buf: &mut [u8], offset: u64) -> io::Result<()> {
        let s = self.lock();
        let end = offset
            .checked_add(buf.len() as u64)
            .filter(|&e| e <= s.current.len() as u64);
        match end {
            Some(end) => {
                buf.copy_from_slice(&s.current[offset as usize..end as usize]);
                Ok(())
            }
            None => Err(io::Error::new(
                io::ErrorKind::UnexpectedEof,
                "read past end of file",
            )),
        }
    }

    fn write_all_at(&self, buf: &[u8], offset: u64) -> io::Result<()> {
        let mut s = self.lock();
        let op = Pending::Write {
            offset,
            data: buf.to_vec(),
        };
        apply(&mut s.current, &op, None);
        s.history.push(Some(op.clone()));
        s.pending.push(op);
        s.writes += 1;
        Ok(())
    }

    fn sync_data(&self) -> io::Result<()> {
        let mut s = self.lock();
        s.pending.clear();
        s.history.push(None);
        s.syncs += 1;
        Ok(())
    }

    fn len(&self) -> io::Result<u64> {
        Ok(self.lock().current.len() as u64)
    }

    fn set_len(&self, len: u64) -> io::Result<()> {
        let mut s = self.lock();
        let op = Pending::SetLen(len);
        apply(&mut s.current, &op, None);
        s.history.push(Some(op.clone()));
        s.pending.push(op);
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn zero_range_zeroes_inside_the_file_and_never_extends_it() {
        let dir = std::env::temp_dir().join(format!("image-io-zero-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let real = std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(true)
            .open(dir.join("f"))
            .unwrap();
        let mem = CrashFile::new();
        let files: [&dyn ImageFile; 2] = [&real, &mem];
        for f in files {
            f.write_all_at(&[0xAB; 3 << 20], 0).unwrap();
            f.zero_range(4096, 1 << 20).unwrap();
            f.zero_range((3 << 20) - 4096, 1 << 30).unwrap();
            assert_eq!(f.len().unwrap(), 3 << 20, "{f:?}: length unchanged");
            let mut b = vec![0u8; 3 << 20];
            f.read_exact_at(&mut b, 0).unwrap();
            assert!(b[..4096].iter().all(|&x| x == 0xAB));
            assert!(b[4096..4096 + (1 << 20)].iter().all(|&x| x == 0));
            assert!(b[4096 + (1 << 20)..(3 << 20) - 4096]
                .iter()
                .all(|&x| x == 0xAB));
            assert!(b[(3 << 20) - 4096..].iter().all(|&x| x == 0));
        }
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn unsynced_writes_are_lost_in_a_crash_and_synced_ones_kept() {
        let f = CrashFile::new();
        f.write_all_at(b"durable", 0).unwrap();
        f.sync_data().unwrap();
        f.write_all_at(b"VOLATILE", 0).unwrap();
        assert_eq!(&f.contents()[..7], b"VOLATIL");
        assert_eq!(f.crash(Survivors::None).contents(), b"durable");
        assert_eq!(&f.crash(Survivors::All).contents()[..], b"VOLATILE");
    }

    #[test]
    fn a_torn_write_keeps_only_its_first_sector() {
        let f = CrashFile::new();
        f.write_all_at(&[1u8; 1024], 0).unwrap();
        let c = f.crash(Survivors::Mask {
            mask: 1,
            torn: Some(0),
        });
        assert_eq!(c.contents(), vec![1u8; 512]);
    }

    #[test]
    fn history_rebuilds_the_state_at_any_sync_or_operation() {
        let f = CrashFile::new();
        f.write_all_at(b"a", 0).unwrap();
        f.sync_data().unwrap();
        f.write_all_at(b"b", 0).unwrap();
        f.sync_data().unwrap();
        f.write_all_at(b"c", 0).unwrap();
        assert_eq!(f.state_after_sync(1).contents(), b"a");
        assert_eq!(f.state_after_sync(2).contents(), b"b");
        assert_eq!(f.crash_after_op(3, Survivors::All).contents(), b"b");
        assert_eq!(f.crash_after_op(5, Survivors::None).contents(), b"b");
        assert_eq!(f.crash_after_op(5, Survivors::All).contents(), b"c");
    }

    #[test]
    fn reads_past_the_end_fail() {
        let f = CrashFile::from_bytes(vec![0; 10]);
        let mut b = [0u8; 11];
        assert!(f.read_exact_at(&mut b, 0).is_err());
        assert!(f.read_exact_at(&mut b[..1], u64::MAX).is_err());
    }
}
