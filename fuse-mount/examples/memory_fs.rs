//! What a FUSE read costs on this host when the daemon has no work to do: a file system whose
//! one file, `mem`, is a buffer in the daemon's memory (in transparent huge pages where the
//! kernel grants them, as the large folios of a page cache filled by readahead are; filled, so
//! every page exists), opened with direct I/O like `vhdtool mount`'s files. A read is answered
//! straight from the buffer with one `writev`, so a sequential read of it shows what the
//! kernel's round trip and its copy from memory cost; `benches/fuse.sh` runs it beside the real
//! mounts. (A spliced reply can beat it: the kernel then pins no daemon pages.)
//!
//!   memory_fs DIR [SIZE_BYTES] [MAX_READ] [THREADS]   (foreground; `fusermount3 -u DIR` ends it)

use std::ffi::OsStr;
use std::time::{Duration, SystemTime};

use fuser::{
    Config, Errno, FileAttr, FileHandle, FileType, FopenFlags, Generation, INodeNo, KernelConfig,
    LockOwner, MountOption, OpenFlags, ReplyAttr, ReplyData, ReplyEntry, ReplyOpen, Request,
    Session,
};

const MAX_IO: u32 = 1 << 20;
const TTL: Duration = Duration::from_secs(60);
const FILE: u64 = 2;

struct MemoryFs {
    bytes: &'static [u8],
}

/// `len` bytes of anonymous memory with transparent huge pages asked for, filled with a
/// pattern. Never unmapped: the process serves it until it exits.
fn huge_buffer(len: usize) -> &'static [u8] {
    let size = len.next_multiple_of(2 << 20);
    // SAFETY: a fresh private anonymous mapping; no memory of ours is touched.
    let p = unsafe {
        libc::mmap(
            std::ptr::null_mut(),
            size,
            libc::PROT_READ | libc::PROT_WRITE,
            libc::MAP_PRIVATE | libc::MAP_ANONYMOUS,
            -1,
            0,
        )
    };
    assert!(p != libc::MAP_FAILED, "mmap of {size} bytes failed");
    // SAFETY: advice about the mapping just made; refusal only means small pages.
    unsafe { libc::madvise(p, size, libc::MADV_HUGEPAGE) };
    // SAFETY: the mapping is `size` >= `len` bytes, readable and writable, owned by nothing
    // else and never unmapped.
    let bytes = unsafe { std::slice::from_raw_parts_mut(p.cast::<u8>(), len) };
    for (i, b) in bytes.iter_mut().enumerate() {
        *b = (i / 4096) as u8 ^ (i as u8);
    }
    bytes
}

impl MemoryFs {
    fn attr(&self, ino: u64) -> Option<FileAttr> {
        let (kind, size, perm) = match ino {
            1 => (FileType::Directory, 0, 0o555),
            FILE => (FileType::RegularFile, self.bytes.len() as u64, 0o444),
            _ => return None,
        };
        Some(FileAttr {
            ino: INodeNo(ino),
            size,
            blocks: size.div_ceil(512),
            atime: SystemTime::UNIX_EPOCH,
            mtime: SystemTime::UNIX_EPOCH,
            ctime: SystemTime::UNIX_EPOCH,
            crtime: SystemTime::UNIX_EPOCH,
            kind,
            perm,
            nlink: 1,
            uid: 0,
            gid: 0,
            rdev: 0,
            blksize: MAX_IO,
            flags: 0,
        })
    }
}

impl fuser::Filesystem for MemoryFs {
    fn init(&mut self, _req: &Request, config: &mut KernelConfig) -> std::io::Result<()> {
        let _ = config.set_max_readahead(MAX_IO);
        Ok(())
    }

    fn lookup(&self, _req: &Request, parent: INodeNo, name: &OsStr, reply: ReplyEntry) {
        match (parent.0, name.to_str()) {
            (1, Some("mem")) => reply.entry(&TTL, &self.attr(FILE).unwrap(), Generation(0)),
            _ => reply.error(Errno::ENOENT),
        }
    }

    fn getattr(&self, _req: &Request, ino: INodeNo, _fh: Option<FileHandle>, reply: ReplyAttr) {
        match self.attr(ino.0) {
            Some(a) => reply.attr(&TTL, &a),
            None => reply.error(Errno::ENOENT),
        }
    }

    fn open(&self, _req: &Request, _ino: INodeNo, _flags: OpenFlags, reply: ReplyOpen) {
        reply.opened(FileHandle(0), FopenFlags::FOPEN_DIRECT_IO);
    }

    fn read(
        &self,
        _req: &Request,
        _ino: INodeNo,
        _fh: FileHandle,
        offset: u64,
        size: u32,
        _flags: OpenFlags,
        _lock_owner: Option<LockOwner>,
        reply: ReplyData,
    ) {
        let start = offset.min(self.bytes.len() as u64) as usize;
        let n = (self.bytes.len() - start).min(size.min(MAX_IO) as usize);
        reply.data(&self.bytes[start..start + n]);
    }
}

fn main() -> std::io::Result<()> {
    let mut args = std::env::args().skip(1);
    let dir = args
        .next()
        .expect("usage: memory_fs DIR [SIZE_BYTES] [MAX_READ] [THREADS]");
    let size: usize = args.next().map_or(1 << 30, |s| s.parse().expect("size"));
    let max_read: u32 = args.next().map_or(MAX_IO, |s| s.parse().expect("max_read"));
    let threads = args.next().map_or(2, |s| s.parse().expect("threads"));
    let mut config = Config::default();
    config.mount_options = vec![
        MountOption::FSName("memory_fs".into()),
        MountOption::RO,
        MountOption::CUSTOM(format!("max_read={}", max_read.min(MAX_IO))),
    ];
    config.n_threads = Some(threads);
    let bytes = huge_buffer(size);
    Session::new(MemoryFs { bytes }, dir, &config)?.run()
}
