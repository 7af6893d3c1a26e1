//! The FUSE file system: one directory holding the whole disk and each partition as a file.
//!
//! ```text
//!   DIR/            inode 1
//!     disk          inode 2   bytes [0, size) of the virtual disk
//!     p1            inode 3   bytes [offset, offset + size) of partition 1
//!     p5 …          inode 4…  (numbers as Linux gives them: MBR logicals from 5, GPT by slot)
//!
//!   kernel ── read/write (≤ 1 MiB, FOPEN_DIRECT_IO) ──> worker threads ──> SharedDisk
//!                                                                          Mutex<Box<dyn Disk>>
//! ```
//!
//! Every file is opened with `FOPEN_DIRECT_IO`: requests reach the daemon exactly as the
//! application issued them (up to [`MAX_IO`]), nothing is cached in the kernel for these files,
//! so `disk` and `p1` — two files over the same bytes — can never show each other stale data, and
//! a loop device or file system on top is not cached twice. `FUSE_DIRECT_IO_ALLOW_MMAP` keeps
//! `mmap` working where the kernel offers it.
//!
//! A read whose bytes lie in one contiguous extent of one image file is answered without the
//! daemon copying them: they are spliced from the file's page cache into `/dev/fuse`
//! ([`crate::spliced`]), so the kernel copies once, into the reader's buffer. On a writable
//! mount the extent is looked up and its pages taken into the pipe under the disk's lock, so
//! no write or discard can give the range other file bytes in between; a write racing the read
//! may show in the reply, as on a block device. Where the pipe cannot hold the reply (a 1 MiB
//! reply needs a 2 MiB pipe: `fs.pipe-max-size` or `CAP_SYS_RESOURCE`), a read-only mount
//! replies from a mapping of the file instead ([`crate::mapped`]): also one copy, but the
//! kernel pins each source page first (never on a writable mount: the copy happens after the
//! lock is gone). Everything else (zeros, ranges spanning extents, a VHDX log replayed in
//! memory) is read through the [`Disk`] API into a buffer.
//!
//! Requests are served by several threads. The [`Disk`] API takes `&mut self`, so a writable
//! disk sits behind one mutex: a request holds it only for its own `read_at`/`write_at`, while
//! the FUSE round trips of other requests (copying requests in and replies out of the kernel)
//! run in parallel on the other threads. A read-only mount opens one read-only handle of the
//! image per thread ([`SharedOptions::readers`]) and a read takes any free one, so reads (and
//! their disk I/O on a cold cache) run in parallel. `benches/fuse.sh` measures both.
//!
//! Invariants:
//! - Writes never change a file's size: writes at or past the end fail with `ENOSPC` (as on a
//!   block device), a write crossing the end is cut short, truncation to another size is
//!   `EINVAL`, and `O_TRUNC` is ignored (`FUSE_ATOMIC_O_TRUNC`), as block devices do.
//! - The partition files follow the partition table: a write within the first or last MiB of
//!   the disk marks it for a rescan at the next flush or fsync (what sfdisk and friends do when
//!   they finish), after which `p1`, `p2`, … are rebuilt from the table as it now reads. Names
//!   and attributes are cached by the kernel for one second, so the change shows within it.
//! - A read-only mount refuses every modification with `EROFS` (open for writing, write,
//!   fallocate, truncate); the disk itself is open read-only as well.
//! - Every write goes through [`Disk::write_at`] at `file offset + partition offset`, with the
//!   range checked against the file first, so a partition file can never touch bytes outside its
//!   partition.
//! - Hole punching reaches [`Disk::discard`] only where the format returns the space
//!   ([`SharedOptions::discard`]: not on VHD, as with Hyper-V); otherwise it is `EOPNOTSUPP`.
//! - `fsync` always reaches [`Disk::flush`]; `flush` (each `close`) does when something was
//!   written since the last flush; so does FUSE's `destroy` on unmount
//!   (closing the disk).
//! - Errors of the disk are logged and returned as the OS error they carry, else `EIO`; a
//!   request never panics the daemon.

use std::cell::RefCell;
use std::ffi::OsStr;
use std::os::fd::{AsFd, OwnedFd};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, OnceLock, RwLock};
use std::time::{Duration, SystemTime};

use block_backend::{AlignedBuf, Disk, ErrorKind};

use crate::mapped::{Mapping, Maps};
use crate::spliced::ReplyPipe;
use fuser::{
    Errno, FileAttr, FileHandle, FileType, FopenFlags, Generation, INodeNo, InitFlags,
    KernelConfig, LockOwner, OpenAccMode, OpenFlags, ReplyAttr, ReplyData, ReplyDirectory,
    ReplyEmpty, ReplyEntry, ReplyOpen, ReplyStatfs, ReplyWrite, Request, WriteFlags,
};

use crate::partitions::{self, PartitionTable};

mod requests;

/// Largest read or write request (bytes), negotiated with the kernel as `max_write` and
/// `max_read`.
pub const MAX_IO: u32 = 1 << 20;

/// Inode of the directory.
const ROOT: u64 = 1;
/// Inode of the first file (`disk`); partitions follow.
const FIRST_FILE: u64 = 2;
/// Writes within this distance of either end of the disk may change a partition table.
const TABLE_ZONE: u64 = 1 << 20;
/// How long the kernel may cache names and attributes: they change only when the partition
/// table is rewritten through the mount, and then should show within a second.
const TTL: Duration = Duration::from_secs(1);
/// `st_blksize` of the files: the I/O size tools like `cp` and `cat` use. Every read is a round
/// trip to the daemon (direct I/O, no read-ahead), so they should ask for whole requests:
/// with 128 KiB, `cat` and `cp` read a VHDX here at 1.8–2.5 GB/s, with 1 MiB at 2.8–3.7 GB/s.
const BLKSIZE: u32 = MAX_IO;

/// `fallocate` mode bits (linux/falloc.h).
const FALLOC_FL_KEEP_SIZE: i32 = 0x01;
const FALLOC_FL_PUNCH_HOLE: i32 = 0x02;
const FALLOC_FL_ZERO_RANGE: i32 = 0x10;

thread_local! {
    /// Per-thread read buffer, reused so a 1 MiB read does not map and fault in fresh memory.
    static READ_BUF: RefCell<AlignedBuf> = RefCell::new(AlignedBuf::new(MAX_IO as usize));
    /// Per-thread pipe for spliced read replies; `None` until first used or after a failure.
    static REPLY_PIPE: RefCell<Option<ReplyPipe>> = const { RefCell::new(None) };
}

pub use block_backend::{SharedDiskError, SharedOptions, SharedResult};

/// The disk shared by the worker threads (and the signal handler, which flushes it):
/// [`block_backend::SharedDisk`] (reads, writes, flushes; extra read handles on a read-only
/// mount) plus the mappings of the image files the page-cache replies use. Derefs to the
/// former.
#[derive(Debug)]
pub struct SharedDisk {
    inner: block_backend::SharedDisk,
    /// Mappings of the image files (read-only mounts only), see [`SharedDisk::read_mapped`].
    maps: Maps,
}

impl std::ops::Deref for SharedDisk {
    type Target = block_backend::SharedDisk;
    fn deref(&self) -> &Self::Target {
        &self.inner
    }
}

impl SharedDisk {
    /// Wraps an open disk (discards passed on, no extra read handles).
    pub fn new(disk: Box<dyn Disk>) -> Arc<SharedDisk> {
        SharedDisk::with_options(disk, SharedOptions::default())
    }

    /// Wraps an open disk.
    pub fn with_options(disk: Box<dyn Disk>, opts: SharedOptions) -> Arc<SharedDisk> {
        Arc::new(SharedDisk {
            inner: block_backend::SharedDisk::unshared(disk, opts),
            maps: Maps::default(),
        })
    }

    /// When `[offset, offset + len)` lies in one extent of one image file, puts the reply to
    /// request `unique` (header and those bytes, as page references) into `pipe` and returns
    /// true; false when the range must be read another way. After false the pipe may hold part
    /// of a reply (see [`ReplyPipe::is_empty`]). On a writable disk this happens under the lock
    /// of its writes, see [`block_backend::SharedDisk::in_one_extent`].
    pub fn read_spliced(
        &self,
        offset: u64,
        len: usize,
        unique: u64,
        pipe: &mut ReplyPipe,
    ) -> SharedResult<bool> {
        let filled = self.in_one_extent(offset, len, |file, at| {
            pipe.fill(unique, file.as_fd(), at, len).unwrap_or(false)
        })?;
        Ok(filled == Some(true))
    }

    /// On a read-only disk, the mapped image-file bytes that `[offset, offset + len)` reads as,
    /// when they lie in one contiguous extent: `(mapping, offset in the file)`. `None` when the
    /// range must be read with [`block_backend::SharedDisk::read_at`] (writable disk, several
    /// extents, zeros, a log overlay, a file that cannot be mapped). A writable disk is never
    /// mapped: its metadata changes under the mapping.
    pub fn read_mapped(
        &self,
        offset: u64,
        len: usize,
    ) -> SharedResult<Option<(Arc<Mapping>, u64)>> {
        if !self.is_read_only() {
            return Ok(None);
        }
        let mapped =
            self.in_one_extent(offset, len, |file, at| self.maps.of(file).map(|m| (m, at)))?;
        Ok(mapped.flatten())
    }
}

/// One file of the mount: a byte range of the disk.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FileNode {
    /// File name (`disk`, `p1`, ...).
    pub name: String,
    /// First byte on the disk.
    pub offset: u64,
    /// Length in bytes.
    pub size: u64,
}

/// The file system served over FUSE.
#[derive(Debug)]
pub struct DiskFs {
    disk: Arc<SharedDisk>,
    /// `disk`, then one file per partition; replaced when the partition table is rewritten.
    /// Shared so a request takes its file without copying the name.
    files: RwLock<Vec<Arc<FileNode>>>,
    /// A write touched where partition tables live (first or last MiB of the disk) since the
    /// last rescan: rescan at the next flush/fsync.
    table_dirty: AtomicBool,
    uid: u32,
    gid: u32,
    time: SystemTime,
    /// A duplicate of the session's `/dev/fuse` descriptor, for spliced read replies; unset
    /// (no splicing) until the session tells it, see [`DiskFs::reply_device`].
    reply_dev: Arc<OnceLock<OwnedFd>>,
    /// `/dev/fuse` refused a spliced reply: reply by copy from now on.
    splice_refused: AtomicBool,
}

impl DiskFs {
    /// The file system for `disk` with one file per partition of `table` (none if `None`).
    /// Files are owned by `uid`/`gid`; `time` is shown as every timestamp.
    pub fn new(
        disk: Arc<SharedDisk>,
        table: Option<&PartitionTable>,
        uid: u32,
        gid: u32,
        time: SystemTime,
    ) -> DiskFs {
        let files = file_nodes(disk.size(), table);
        DiskFs {
            disk,
            files: RwLock::new(files),
            table_dirty: AtomicBool::new(false),
            uid,
            gid,
            time,
            reply_dev: Arc::default(),
            splice_refused: AtomicBool::new(false),
        }
    }

    /// Where the session puts a duplicate of its `/dev/fuse` descriptor once mounted, to let
    /// read replies be spliced (only valid when every request is read from that one
    /// descriptor: no cloned descriptors per thread).
    pub fn reply_device(&self) -> Arc<OnceLock<OwnedFd>> {
        self.reply_dev.clone()
    }

    /// Replies to request `unique`, a read of `n` bytes at disk offset `offset`, by splicing
    /// them from the image file; false if that could not be done and nothing was sent (the
    /// caller replies another way). Turned off for good by an error of `/dev/fuse` other than
    /// "request gone", so a kernel that refuses spliced replies costs one attempt.
    fn reply_spliced(&self, unique: u64, offset: u64, n: usize) -> bool {
        let Some(dev) = self.reply_dev.get() else {
            return false;
        };
        if self.splice_refused.load(Ordering::Relaxed) {
            return false;
        }
        REPLY_PIPE.with(|p| {
            let mut slot = p.borrow_mut();
            if slot.is_none() {
                *slot = ReplyPipe::new(MAX_IO as usize).ok();
            }
            let Some(pipe) = slot.as_mut() else {
                return false;
            };
            if !matches!(self.disk.read_spliced(offset, n, unique, pipe), Ok(true)) {
                if !pipe.is_empty() {
                    // It holds part of a reply: start the next one on a fresh pipe.
                    *slot = None;
                }
                return false;
            }
            match pipe.send(dev.as_fd(), n) {
                Ok(()) => true,
                Err(e) => {
                    *slot = None;
                    if e.raw_os_error() == Some(libc::ENOENT) {
                        // The request was interrupted and is gone: nothing is left to answer.
                        return true;
                    }
                    tracing::warn!("/dev/fuse refused a spliced reply ({e}); replying by copy");
                    self.splice_refused.store(true, Ordering::Relaxed);
                    false
                }
            }
        })
    }

    /// The files, `disk` first.
    pub fn files(&self) -> Vec<FileNode> {
        self.files_now().iter().map(|f| (**f).clone()).collect()
    }

    fn files_now(&self) -> std::sync::RwLockReadGuard<'_, Vec<Arc<FileNode>>> {
        self.files.read().unwrap_or_else(|p| p.into_inner())
    }

    /// Rereads the partition table if a write may have changed it: `p1`, `p2`, … then match
    /// the new table (a tool like sfdisk run on `DIR/disk` needs no remount). Names and
    /// attributes are cached by the kernel for [`TTL`] only.
    fn rescan_if_needed(&self) {
        if !self.table_dirty.swap(false, Ordering::AcqRel) {
            return;
        }
        let table = match self.disk.with_reader(|d| Ok(partitions::scan_disk(d))) {
            Ok(t) => t,
            Err(e) => {
                tracing::warn!("rescan the partition table: {e}");
                return;
            }
        };
        if let Err(e) = &table {
            tracing::warn!("partition table ignored after a rewrite: {e}");
        }
        let files = file_nodes(self.disk.size(), table.as_ref().ok());
        *self.files.write().unwrap_or_else(|p| p.into_inner()) = files;
    }

    /// The shared disk (for flushing from outside the request loop).
    pub fn shared(&self) -> Arc<SharedDisk> {
        self.disk.clone()
    }

    fn node(&self, ino: u64) -> Option<Arc<FileNode>> {
        let i = ino.checked_sub(FIRST_FILE)?;
        self.files_now().get(usize::try_from(i).ok()?).cloned()
    }

    fn attr(&self, ino: u64) -> Option<FileAttr> {
        let (kind, size, perm, nlink) = if ino == ROOT {
            (FileType::Directory, 0, 0o755, 2)
        } else {
            let node = self.node(ino)?;
            let perm = if self.disk.is_read_only() {
                0o444
            } else {
                0o644
            };
            (FileType::RegularFile, node.size, perm, 1)
        };
        Some(FileAttr {
            ino: INodeNo(ino),
            size,
            blocks: size.div_ceil(512),
            atime: self.time,
            mtime: self.time,
            ctime: self.time,
            crtime: self.time,
            kind,
            perm,
            nlink,
            uid: self.uid,
            gid: self.gid,
            rdev: 0,
            blksize: BLKSIZE,
            flags: 0,
        })
    }

    /// The file for `ino`, or `ENOENT` (`EISDIR` for the directory).
    fn file(&self, ino: u64) -> Result<Arc<FileNode>, Errno> {
        if ino == ROOT {
            return Err(Errno::EISDIR);
        }
        self.node(ino).ok_or(Errno::ENOENT)
    }

    /// Reads up to `size` bytes at `offset` of file `ino` into `buf` (resized to what was read:
    /// short at the end of the file, empty past it).
    pub fn read_file(
        &self,
        ino: u64,
        offset: u64,
        size: u32,
        buf: &mut AlignedBuf,
    ) -> Result<(), Errno> {
        let (node, n) = self.read_span(ino, offset, size)?;
        self.read_node(&node, offset, n, buf)
    }

    /// The file `ino` and how many of `size` bytes at `offset` it holds (short at its end, 0
    /// past it).
    fn read_span(&self, ino: u64, offset: u64, size: u32) -> Result<(Arc<FileNode>, usize), Errno> {
        let node = self.file(ino)?;
        let n = node.size.saturating_sub(offset).min(u64::from(size)) as usize;
        Ok((node, n))
    }

    /// Reads `n` bytes (from [`DiskFs::read_span`]) at `offset` of `node` into `buf`.
    fn read_node(
        &self,
        node: &FileNode,
        offset: u64,
        n: usize,
        buf: &mut AlignedBuf,
    ) -> Result<(), Errno> {
        buf.resize(n);
        if n == 0 {
            return Ok(());
        }
        // In range: offset + n <= node.size and the node lies inside the disk.
        self.disk
            .read_at(buf, node.offset + offset)
            .map_err(|e| errno("read", &node.name, offset, &e))
    }

    /// Writes `data` at `offset` of file `ino`; returns the number of bytes written (short if
    /// the write crosses the end of the file).
    pub fn write_file(&self, ino: u64, offset: u64, data: &[u8]) -> Result<u32, Errno> {
        let node = self.file(ino)?;
        if self.disk.is_read_only() {
            return Err(Errno::EROFS);
        }
        if data.is_empty() {
            return Ok(0);
        }
        if offset >= node.size {
            return Err(Errno::ENOSPC);
        }
        let n = (node.size - offset).min(data.len() as u64) as usize;
        let at = node.offset + offset;
        // MBR, GPT header and entries live in the first MiB, the GPT backup in the last.
        if at < TABLE_ZONE || at + n as u64 > self.disk.size().saturating_sub(TABLE_ZONE) {
            self.table_dirty.store(true, Ordering::Release);
        }
        self.disk
            .write_at(&data[..n], at)
            .map_err(|e| errno("write", &node.name, offset, &e))?;
        // n <= data.len(), which the kernel bounds by max_write (1 MiB).
        Ok(n as u32)
    }

    /// `fallocate`: punching holes and zeroing ranges discard them (they then read as zeros);
    /// plain allocation inside the file succeeds without doing anything; growing the file and
    /// other modes are refused.
    pub fn fallocate_file(&self, ino: u64, offset: u64, len: u64, mode: i32) -> Result<(), Errno> {
        let node = self.file(ino)?;
        if self.disk.is_read_only() {
            return Err(Errno::EROFS);
        }
        let end = offset.checked_add(len).ok_or(Errno::EFBIG)?;
        let keep_size = mode & FALLOC_FL_KEEP_SIZE != 0;
        let zeroing = mode & (FALLOC_FL_PUNCH_HOLE | FALLOC_FL_ZERO_RANGE);
        if mode & !(FALLOC_FL_KEEP_SIZE | FALLOC_FL_PUNCH_HOLE | FALLOC_FL_ZERO_RANGE) != 0
            || zeroing == FALLOC_FL_PUNCH_HOLE | FALLOC_FL_ZERO_RANGE
            || (mode & FALLOC_FL_PUNCH_HOLE != 0 && !keep_size)
        {
            return Err(Errno::EOPNOTSUPP);
        }
        if end > node.size && !keep_size {
            // The file would have to grow.
            return Err(Errno::EFBIG);
        }
        if zeroing == 0 {
            return Ok(());
        }
        if !self.disk.supports_discard() {
            return Err(Errno::EOPNOTSUPP);
        }
        let end = end.min(node.size);
        if end <= offset {
            return Ok(());
        }
        self.disk
            .discard(node.offset + offset, end - offset)
            .map_err(|e| errno("discard", &node.name, offset, &e))
    }

    /// `truncate`: only to the current size (a no-op).
    pub fn truncate_file(&self, ino: u64, size: u64) -> Result<(), Errno> {
        let node = self.file(ino)?;
        if size == node.size {
            Ok(())
        } else if self.disk.is_read_only() {
            Err(Errno::EROFS)
        } else {
            Err(Errno::EINVAL)
        }
    }

    /// Flushes the disk for `fsync` (always) or `close` (`if_dirty`), then rescans the
    /// partition table if a write may have changed it.
    fn flush_disk(&self, if_dirty: bool) -> Result<(), Errno> {
        let r = if if_dirty {
            self.disk.flush_if_dirty()
        } else {
            self.disk.flush()
        };
        self.rescan_if_needed();
        r.map_err(|e| errno("flush", "disk", 0, &e))
    }
}

/// The files of a disk of `size` bytes: `disk`, then `p1`, `p2`, … for each partition of
/// `table`, at the partition's offset and size.
fn file_nodes(size: u64, table: Option<&PartitionTable>) -> Vec<Arc<FileNode>> {
    let disk = FileNode {
        name: "disk".to_string(),
        offset: 0,
        size,
    };
    let parts = table
        .into_iter()
        .flat_map(|t| &t.partitions)
        .map(|p| FileNode {
            name: format!("p{}", p.number),
            offset: p.offset,
            size: p.size,
        });
    std::iter::once(disk).chain(parts).map(Arc::new).collect()
}

/// The errno for a disk error (logged): the OS error it carries, `EROFS`, else `EIO`.
fn errno(op: &str, file: &str, offset: u64, e: &SharedDiskError) -> Errno {
    tracing::warn!("{op} {file} at {offset}: {e}");
    let SharedDiskError::Disk(e) = e else {
        return Errno::EIO;
    };
    match e.kind() {
        ErrorKind::ReadOnly => Errno::EROFS,
        ErrorKind::OutOfRange => Errno::EINVAL,
        _ => {
            let os = std::error::Error::source(e)
                .and_then(|s| s.downcast_ref::<std::io::Error>())
                .and_then(std::io::Error::raw_os_error);
            match os {
                Some(code) if code > 0 => Errno::from_i32(code),
                _ => Errno::EIO,
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::partitions::{Partition, PartitionKind, TableKind};
    use block_backend::OpenOptions;

    /// A 4 MiB raw disk with partition 1 at [1 MiB, 3 MiB), filled with a byte pattern.
    fn setup(read_only: bool) -> (tempfile::TempDir, DiskFs) {
        setup_with(read_only, SharedOptions::default())
    }

    fn setup_with(read_only: bool, opts: SharedOptions) -> (tempfile::TempDir, DiskFs) {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("d.raw");
        let data: Vec<u8> = (0..4u32 << 20).map(|i| (i % 251) as u8).collect();
        std::fs::write(&path, &data).unwrap();
        let open = if read_only {
            OpenOptions::read_only()
        } else {
            OpenOptions::read_write()
        };
        let disk = block_backend::open(&path, open).unwrap();
        let table = PartitionTable {
            kind: TableKind::Mbr,
            sector_size: 512,
            partitions: vec![Partition {
                number: 1,
                offset: 1 << 20,
                size: 2 << 20,
                kind: PartitionKind::Mbr {
                    type_id: 0x83,
                    logical: false,
                },
            }],
        };
        let fs = DiskFs::new(
            SharedDisk::with_options(Box::new(disk), opts),
            Some(&table),
            0,
            0,
            SystemTime::UNIX_EPOCH,
        );
        (dir, fs)
    }

    const DISK: u64 = FIRST_FILE;
    const P1: u64 = FIRST_FILE + 1;

    #[test]
    fn files_are_disk_then_partitions_with_exact_sizes() {
        let (_d, fs) = setup(true);
        let files = fs.files();
        let names: Vec<_> = files.iter().map(|f| f.name.as_str()).collect();
        assert_eq!(names, ["disk", "p1"]);
        assert_eq!(fs.attr(DISK).unwrap().size, 4 << 20);
        assert_eq!(fs.attr(P1).unwrap().size, 2 << 20);
        assert_eq!(fs.attr(ROOT).unwrap().kind, FileType::Directory);
        assert!(fs.attr(P1 + 1).is_none());
        assert_eq!(fs.attr(P1).unwrap().perm, 0o444);
        // cp and cat size their reads by st_blksize: one whole request each.
        assert_eq!(fs.attr(DISK).unwrap().blksize, MAX_IO);
    }

    #[test]
    fn partition_reads_are_shifted_by_the_partition_offset() {
        let (_d, fs) = setup(true);
        let mut a = AlignedBuf::new(0);
        let mut b = AlignedBuf::new(0);
        fs.read_file(P1, 100, 4096, &mut a).unwrap();
        fs.read_file(DISK, (1 << 20) + 100, 4096, &mut b).unwrap();
        assert_eq!(a.len(), 4096);
        assert_eq!(a[..], b[..]);
    }

    #[test]
    fn reads_stop_at_the_end_of_the_file() {
        let (_d, fs) = setup(true);
        let mut buf = AlignedBuf::new(0);
        fs.read_file(P1, (2 << 20) - 10, 4096, &mut buf).unwrap();
        assert_eq!(buf.len(), 10);
        fs.read_file(P1, 2 << 20, 4096, &mut buf).unwrap();
        assert!(buf.is_empty());
        fs.read_file(P1, u64::MAX, 4096, &mut buf).unwrap();
        assert!(buf.is_empty());
        assert_eq!(fs.read_file(ROOT, 0, 1, &mut buf), Err(Errno::EISDIR));
        assert_eq!(fs.read_file(99, 0, 1, &mut buf), Err(Errno::ENOENT));
    }

    #[test]
    fn read_only_refuses_every_modification_with_erofs() {
        let (_d, fs) = setup(true);
        assert_eq!(fs.write_file(P1, 0, b"x"), Err(Errno::EROFS));
        assert_eq!(
            fs.fallocate_file(P1, 0, 4096, FALLOC_FL_PUNCH_HOLE | FALLOC_FL_KEEP_SIZE),
            Err(Errno::EROFS)
        );
        assert_eq!(fs.truncate_file(P1, 0), Err(Errno::EROFS));
        assert_eq!(fs.truncate_file(P1, 2 << 20), Ok(()));
    }

    #[test]
    fn writes_land_inside_the_partition_and_stop_at_its_end() {
        let (_d, fs) = setup(false);
        assert_eq!(fs.write_file(P1, 0, b"hello"), Ok(5));
        let mut buf = AlignedBuf::new(0);
        fs.read_file(DISK, 1 << 20, 5, &mut buf).unwrap();
        assert_eq!(&buf[..], b"hello");
        // Crossing the end: short write; at the end: ENOSPC.
        let before_end = (2 << 20) - 3;
        assert_eq!(fs.write_file(P1, before_end, b"abcdef"), Ok(3));
        fs.read_file(DISK, 3 << 20, 3, &mut buf).unwrap();
        assert_eq!(
            buf[..],
            [
                (3u32 << 20) % 251,
                ((3 << 20) + 1) % 251,
                ((3 << 20) + 2) % 251
            ]
            .map(|b| b as u8)
        );
        assert_eq!(fs.write_file(P1, 2 << 20, b"x"), Err(Errno::ENOSPC));
        assert_eq!(fs.write_file(P1, 0, b""), Ok(0));
        fs.flush_disk(true).unwrap();
        fs.flush_disk(false).unwrap();
    }

    #[test]
    fn punch_hole_reads_back_zeros_and_odd_modes_are_refused() {
        let (_d, fs) = setup(false);
        let mode = FALLOC_FL_PUNCH_HOLE | FALLOC_FL_KEEP_SIZE;
        fs.fallocate_file(P1, 4096, 8192, mode).unwrap();
        let mut buf = AlignedBuf::new(0);
        fs.read_file(DISK, (1 << 20) + 4096, 8192, &mut buf)
            .unwrap();
        assert!(buf.iter().all(|&b| b == 0));
        fs.read_file(DISK, (1 << 20) + 4095, 1, &mut buf).unwrap();
        assert_ne!(buf[..], [0]);
        assert_eq!(
            fs.fallocate_file(P1, 0, 1, FALLOC_FL_PUNCH_HOLE),
            Err(Errno::EOPNOTSUPP)
        );
        assert_eq!(fs.fallocate_file(P1, 0, 3 << 20, 0), Err(Errno::EFBIG));
        assert_eq!(fs.fallocate_file(P1, 0, 4096, 0), Ok(()));
        assert_eq!(fs.fallocate_file(P1, 0, 4096, 0x40), Err(Errno::EOPNOTSUPP));
        // Past the end with KEEP_SIZE: only the part inside the file is zeroed.
        fs.fallocate_file(P1, (2 << 20) - 512, 4096, mode).unwrap();
        fs.read_file(DISK, 3 << 20, 1, &mut buf).unwrap();
        assert_eq!(buf[..], [((3u32 << 20) % 251) as u8]);
    }

    #[test]
    fn hole_punching_is_refused_when_discard_is_off() {
        let opts = SharedOptions {
            discard: false,
            ..SharedOptions::default()
        };
        let (_d, fs) = setup_with(false, opts);
        let mode = FALLOC_FL_PUNCH_HOLE | FALLOC_FL_KEEP_SIZE;
        assert_eq!(fs.fallocate_file(P1, 0, 4096, mode), Err(Errno::EOPNOTSUPP));
        let mut buf = AlignedBuf::new(0);
        fs.read_file(P1, 0, 1, &mut buf).unwrap();
        assert_eq!(buf[..], [((1u32 << 20) % 251) as u8], "data kept");
        // Plain allocation inside the file still succeeds.
        assert_eq!(fs.fallocate_file(P1, 0, 4096, 0), Ok(()));
    }

    #[test]
    fn read_only_disk_reads_in_parallel_on_its_extra_handles() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("r.raw");
        let data: Vec<u8> = (0..1u32 << 20).map(|i| (i % 253) as u8).collect();
        std::fs::write(&path, &data).unwrap();
        let open = || -> Box<dyn Disk> {
            Box::new(block_backend::open(&path, OpenOptions::read_only()).unwrap())
        };
        let shared = SharedDisk::with_options(
            open(),
            SharedOptions {
                readers: vec![open(), open(), open()],
                ..SharedOptions::default()
            },
        );
        assert_eq!(shared.reader_count(), 3);
        std::thread::scope(|s| {
            for t in 0..4u64 {
                let shared = &shared;
                let data = &data;
                s.spawn(move || {
                    for i in 0..200u64 {
                        let off = (t * 7919 + i * 4099) % ((1 << 20) - 4096);
                        let mut buf = vec![0u8; 4096];
                        shared.read_at(&mut buf, off).unwrap();
                        assert_eq!(buf, data[off as usize..off as usize + 4096]);
                    }
                });
            }
        });
        shared.close().unwrap();
        let mut buf = [0u8; 1];
        assert!(matches!(
            shared.read_at(&mut buf, 0),
            Err(SharedDiskError::Closed)
        ));
    }

    #[test]
    fn writable_disk_ignores_extra_read_handles() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("w.raw");
        std::fs::write(&path, vec![0u8; 4096]).unwrap();
        let rw = block_backend::open(&path, OpenOptions::read_write()).unwrap();
        // Beside the writable open, which holds the image's lock, a reader must share.
        let ro = block_backend::open(&path, OpenOptions::read_only_force_share()).unwrap();
        let shared = SharedDisk::with_options(
            Box::new(rw),
            SharedOptions {
                readers: vec![Box::new(ro)],
                ..SharedOptions::default()
            },
        );
        assert_eq!(shared.reader_count(), 0, "reads must see the writes");
    }

    #[test]
    fn truncate_to_another_size_is_refused() {
        let (_d, fs) = setup(false);
        assert_eq!(fs.truncate_file(P1, 0), Err(Errno::EINVAL));
        assert_eq!(fs.truncate_file(P1, 2 << 20), Ok(()));
    }
}
