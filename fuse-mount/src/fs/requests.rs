//! The kernel's requests, answered: the [`fuser::Filesystem`] implementation of [`DiskFs`]. Each
//! handler checks and translates one FUSE request into a call of `DiskFs` (lookup and attributes
//! of the files, reads, writes, hole punching, flushes) and replies with its result or errno.

use super::*;

impl fuser::Filesystem for DiskFs {
    fn init(&mut self, _req: &Request, config: &mut KernelConfig) -> std::io::Result<()> {
        if let Err(nearest) = config.set_max_write(MAX_IO) {
            let _ = config.set_max_write(nearest);
        }
        if let Err(nearest) = config.set_max_readahead(MAX_IO) {
            let _ = config.set_max_readahead(nearest);
        }
        let _ = config.set_max_background(64);
        let wanted = InitFlags::FUSE_ATOMIC_O_TRUNC
            | InitFlags::FUSE_ASYNC_DIO
            | InitFlags::FUSE_DIRECT_IO_ALLOW_MMAP;
        // Ask for what the kernel has; everything here is optional.
        let _ = config.add_capabilities(wanted & config.capabilities());
        Ok(())
    }

    fn destroy(&mut self) {
        if let Err(e) = self.disk.close() {
            tracing::error!("flush on unmount: {e}");
        }
    }

    fn lookup(&self, _req: &Request, parent: INodeNo, name: &OsStr, reply: ReplyEntry) {
        if parent.0 != ROOT {
            return reply.error(Errno::ENOENT);
        }
        let found = self
            .files_now()
            .iter()
            .position(|f| OsStr::new(&f.name) == name);
        match found.and_then(|i| self.attr(FIRST_FILE + i as u64)) {
            Some(attr) => reply.entry(&TTL, &attr, Generation(0)),
            None => reply.error(Errno::ENOENT),
        }
    }

    fn getattr(&self, _req: &Request, ino: INodeNo, _fh: Option<FileHandle>, reply: ReplyAttr) {
        match self.attr(ino.0) {
            Some(attr) => reply.attr(&TTL, &attr),
            None => reply.error(Errno::ENOENT),
        }
    }

    fn setattr(
        &self,
        _req: &Request,
        ino: INodeNo,
        _mode: Option<u32>,
        _uid: Option<u32>,
        _gid: Option<u32>,
        size: Option<u64>,
        _atime: Option<fuser::TimeOrNow>,
        _mtime: Option<fuser::TimeOrNow>,
        _ctime: Option<SystemTime>,
        _fh: Option<FileHandle>,
        _crtime: Option<SystemTime>,
        _chgtime: Option<SystemTime>,
        _bkuptime: Option<SystemTime>,
        _flags: Option<fuser::BsdFileFlags>,
        reply: ReplyAttr,
    ) {
        if let Some(size) = size {
            if let Err(e) = self.truncate_file(ino.0, size) {
                return reply.error(e);
            }
        }
        // Ownership, mode and times are fixed; the request succeeds without changing them.
        match self.attr(ino.0) {
            Some(attr) => reply.attr(&TTL, &attr),
            None => reply.error(Errno::ENOENT),
        }
    }

    fn open(&self, _req: &Request, ino: INodeNo, flags: OpenFlags, reply: ReplyOpen) {
        if let Err(e) = self.file(ino.0) {
            return reply.error(e);
        }
        if self.disk.is_read_only() && flags.acc_mode() != OpenAccMode::O_RDONLY {
            return reply.error(Errno::EROFS);
        }
        reply.opened(
            FileHandle(0),
            FopenFlags::FOPEN_DIRECT_IO | FopenFlags::FOPEN_PARALLEL_DIRECT_WRITES,
        );
    }

    fn read(
        &self,
        req: &Request,
        ino: INodeNo,
        _fh: FileHandle,
        offset: u64,
        size: u32,
        _flags: OpenFlags,
        _lock_owner: Option<LockOwner>,
        reply: ReplyData,
    ) {
        let (node, n) = match self.read_span(ino.0, offset, size.min(MAX_IO)) {
            Ok(span) => span,
            Err(e) => return reply.error(e),
        };
        // Reply straight from the image file's page cache where possible (spliced, else mapped
        // on a read-only mount); an error there is reported by the ordinary read below.
        if n > 0 && self.reply_spliced(req.unique().0, node.offset + offset, n) {
            // Answered already. Dropping `reply` would make fuser answer again (an EIO the
            // kernel rejects, and a warning): forget it instead, which only leaves one more
            // reference to the session's descriptor that is never released.
            std::mem::forget(reply);
            return;
        }
        if n > 0 {
            if let Ok(Some((map, at))) = self.disk.read_mapped(node.offset + offset, n) {
                if let Some(bytes) = map.get(at, n) {
                    return reply.data(bytes);
                }
            }
        }
        READ_BUF.with(|b| {
            let mut buf = b.borrow_mut();
            match self.read_node(&node, offset, n, &mut buf) {
                Ok(()) => reply.data(&buf),
                Err(e) => reply.error(e),
            }
        });
    }

    fn write(
        &self,
        _req: &Request,
        ino: INodeNo,
        _fh: FileHandle,
        offset: u64,
        data: &[u8],
        _write_flags: WriteFlags,
        _flags: OpenFlags,
        _lock_owner: Option<LockOwner>,
        reply: ReplyWrite,
    ) {
        match self.write_file(ino.0, offset, data) {
            Ok(n) => reply.written(n),
            Err(e) => reply.error(e),
        }
    }

    fn flush(
        &self,
        _req: &Request,
        _ino: INodeNo,
        _fh: FileHandle,
        _lock_owner: LockOwner,
        reply: ReplyEmpty,
    ) {
        match self.flush_disk(true) {
            Ok(()) => reply.ok(),
            Err(e) => reply.error(e),
        }
    }

    fn fsync(
        &self,
        _req: &Request,
        _ino: INodeNo,
        _fh: FileHandle,
        _datasync: bool,
        reply: ReplyEmpty,
    ) {
        match self.flush_disk(false) {
            Ok(()) => reply.ok(),
            Err(e) => reply.error(e),
        }
    }

    fn fsyncdir(
        &self,
        _req: &Request,
        _ino: INodeNo,
        _fh: FileHandle,
        _datasync: bool,
        reply: ReplyEmpty,
    ) {
        reply.ok();
    }

    fn readdir(
        &self,
        _req: &Request,
        ino: INodeNo,
        _fh: FileHandle,
        offset: u64,
        mut reply: ReplyDirectory,
    ) {
        if ino.0 != ROOT {
            return reply.error(Errno::ENOTDIR);
        }
        let entries = [
            (ROOT, FileType::Directory, "."),
            (ROOT, FileType::Directory, ".."),
        ]
        .into_iter()
        .map(|(ino, kind, name)| (ino, kind, name.to_string()))
        .chain(
            self.files_now()
                .iter()
                .enumerate()
                .map(|(i, f)| (FIRST_FILE + i as u64, FileType::RegularFile, f.name.clone())),
        )
        .collect::<Vec<_>>();
        for (i, (ino, kind, name)) in entries.into_iter().enumerate().skip(offset as usize) {
            // The offset given is that of the next entry.
            if reply.add(INodeNo(ino), i as u64 + 1, kind, name) {
                break;
            }
        }
        reply.ok();
    }

    fn statfs(&self, _req: &Request, _ino: INodeNo, reply: ReplyStatfs) {
        let blocks = self.disk.size().div_ceil(4096);
        reply.statfs(
            blocks,
            0,
            0,
            self.files_now().len() as u64 + 1,
            0,
            4096,
            255,
            4096,
        );
    }

    fn fallocate(
        &self,
        _req: &Request,
        ino: INodeNo,
        _fh: FileHandle,
        offset: u64,
        length: u64,
        mode: i32,
        reply: ReplyEmpty,
    ) {
        match self.fallocate_file(ino.0, offset, length, mode) {
            Ok(()) => reply.ok(),
            Err(e) => reply.error(e),
        }
    }
}
