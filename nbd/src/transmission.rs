//! The transmission phase: requests in, replies out, one request at a time per connection.
//!
//! ```text
//!   header(28) ─parse─> check flags, length, range ─> SharedDisk call ─> reply
//!        │                  (WRITE payload is read first,        simple: magic error cookie [data]
//!        │                   so the stream stays in step)        structured: chunks, last DONE
//!        └─ bad magic / unknown stream state: close
//! ```
//!
//! Invariants:
//! - A request is fully validated (flags known for its command, length within
//!   [`MAX_PAYLOAD`] where it carries or asks for data, range inside the export, export
//!   writable) before the disk is touched; a refused WRITE's payload is still read (in small
//!   pieces) and dropped, so one bad request costs an error reply, not the connection.
//! - Memory per connection is bounded by one payload buffer of at most [`MAX_PAYLOAD`] plus
//!   headers, kept only while requests need it.
//! - A read's reply goes out only once all its bytes were read, so an error is always an error
//!   reply, never a reply cut short; with structured replies, ranges the image's map shows as
//!   zeros are sent as hole chunks, not as bytes.
//! - `FLUSH`, and `FUA` on any write, return only once [`SharedDisk::flush`] has made every
//!   write completed so far (on any connection) durable; that is what `NBD_FLAG_CAN_MULTI_CONN`
//!   promises.

use std::io::{Read, Write};

use block_backend::{ErrorKind, SharedDisk, SharedDiskError};

use crate::error::{Error, Result};
use crate::io::Framed;
use crate::negotiate::Negotiated;
use crate::protocol::{self as p, cflag, chunk, cmd, errno, MAX_PAYLOAD};
use crate::server::Export;

/// Reads at least this long are mapped first, so zero ranges go out as hole chunks.
const SPARSE_READ_MIN: u32 = 64 << 10;
/// A payload buffer larger than this is released after its request.
const KEEP_BUF: usize = 4 << 20;

/// One connection in the transmission phase.
pub struct Transmission<'a, S> {
    io: Framed<S>,
    export: &'a Export,
    peer: &'a str,
    neg: Negotiated,
    buf: Vec<u8>,
}

/// A refused request: the error code and a message for structured error chunks.
struct Refused(u32, String);

type Outcome = std::result::Result<(), Refused>;

impl<'a, S: Read + Write> Transmission<'a, S> {
    /// Starts transmission on `io`.
    pub fn new(io: Framed<S>, export: &'a Export, peer: &'a str, neg: Negotiated) -> Self {
        Transmission {
            io,
            export,
            peer,
            neg,
            buf: Vec::new(),
        }
    }

    fn io_err(&self, op: &'static str) -> impl FnOnce(std::io::Error) -> Error + '_ {
        move |source| Error::Io {
            peer: self.peer.to_string(),
            op,
            source,
        }
    }

    fn disk(&self) -> &SharedDisk {
        &self.export.disk
    }

    /// Serves requests until the client disconnects (`Ok`) or the stream fails.
    pub fn run(mut self) -> Result<()> {
        loop {
            let mut h = [0u8; p::REQUEST_LEN];
            match self.io.read_exact(&mut h) {
                Ok(()) => {}
                // A client may close between requests without NBD_CMD_DISC.
                Err(e) if e.kind() == std::io::ErrorKind::UnexpectedEof => return Ok(()),
                Err(e) => return Err(self.io_err("read request")(e)),
            }
            let req = p::parse_request(&h).map_err(|source| Error::Parse {
                peer: self.peer.to_string(),
                what: "request",
                source,
            })?;
            if req.kind == cmd::DISC {
                let _ = self.disk().flush_if_dirty();
                self.io.flush().map_err(self.io_err("write reply"))?;
                return Ok(());
            }
            self.request(req)?;
            self.io
                .flush_if_idle()
                .map_err(self.io_err("write reply"))?;
            if self.buf.capacity() > KEEP_BUF {
                self.buf = Vec::new();
            }
        }
    }

    /// Handles one request (not DISC) and sends its reply.
    fn request(&mut self, req: p::Request) -> Result<()> {
        let allowed = match req.kind {
            cmd::READ if self.neg.structured => cflag::FUA | cflag::DF,
            cmd::READ | cmd::WRITE | cmd::FLUSH | cmd::TRIM | cmd::CACHE => cflag::FUA,
            cmd::WRITE_ZEROES => cflag::FUA | cflag::NO_HOLE | cflag::FAST_ZERO,
            cmd::BLOCK_STATUS => cflag::FUA | cflag::REQ_ONE,
            _ => 0,
        };
        let bad_flags = req.flags & !allowed != 0;
        if req.kind == cmd::WRITE {
            return self.write(req, bad_flags);
        }
        let outcome = if bad_flags {
            Err(Refused(errno::EINVAL, format!("flags {:#x}", req.flags)))
        } else {
            match req.kind {
                cmd::READ => return self.read(req),
                cmd::BLOCK_STATUS => return self.block_status(req),
                cmd::FLUSH => self.flush(),
                cmd::TRIM => self.trim(req),
                cmd::CACHE => self.range(&req, errno::EINVAL),
                cmd::WRITE_ZEROES => self.write_zeroes(req),
                k => Err(Refused(errno::EINVAL, format!("unknown command {k}"))),
            }
        };
        self.finish(req.cookie, outcome)
    }

    /// Fails unless `[offset, offset + len)` lies inside the export.
    fn range(&self, req: &p::Request, code: u32) -> Outcome {
        match req.offset.checked_add(req.len.into()) {
            Some(end) if end <= self.export.size() => Ok(()),
            _ => Err(Refused(
                code,
                format!(
                    "range {}+{} past the end ({})",
                    req.offset,
                    req.len,
                    self.export.size()
                ),
            )),
        }
    }

    fn writable(&self) -> Outcome {
        if self.disk().is_read_only() {
            return Err(Refused(errno::EPERM, "read-only export".into()));
        }
        Ok(())
    }

    fn write(&mut self, req: p::Request, bad_flags: bool) -> Result<()> {
        if req.len > MAX_PAYLOAD {
            self.io
                .discard(req.len.into())
                .map_err(self.io_err("read write payload"))?;
            let r = Refused(errno::EOVERFLOW, format!("write of {} bytes", req.len));
            return self.finish(req.cookie, Err(r));
        }
        let n = req.len as usize;
        if self.buf.len() < n {
            self.buf.resize(n, 0);
        }
        let mut buf = std::mem::take(&mut self.buf);
        let read = self.io.read_exact(&mut buf[..n]);
        let outcome = match read {
            Err(e) => {
                self.buf = buf;
                // The client vanished mid-payload: nothing of it is written.
                return Err(self.io_err("read write payload")(e));
            }
            Ok(()) if bad_flags => Err(Refused(errno::EINVAL, format!("flags {:#x}", req.flags))),
            Ok(()) => self
                .writable()
                .and_then(|()| self.range(&req, errno::ENOSPC))
                .and_then(|()| disk_result(self.disk().write_at(&buf[..n], req.offset)))
                .and_then(|()| self.fua(req.flags)),
        };
        self.buf = buf;
        self.finish(req.cookie, outcome)
    }

    fn fua(&self, flags: u16) -> Outcome {
        if flags & cflag::FUA != 0 {
            return self.flush();
        }
        Ok(())
    }

    fn flush(&self) -> Outcome {
        disk_result(self.disk().flush_if_dirty())
    }

    fn trim(&self, req: p::Request) -> Outcome {
        self.writable()?;
        self.range(&req, errno::EINVAL)?;
        // A hint: where the format keeps no holes (VHD) it is not advertised, and ignored.
        if self.disk().supports_discard() && req.len > 0 {
            disk_result(self.disk().discard(req.offset, req.len.into()))?;
        }
        self.fua(req.flags)
    }

    fn write_zeroes(&self, req: p::Request) -> Outcome {
        self.writable()?;
        self.range(&req, errno::ENOSPC)?;
        let punch = self.disk().supports_discard() && req.flags & cflag::NO_HOLE == 0;
        if req.flags & cflag::FAST_ZERO != 0 && !punch {
            return Err(Refused(errno::ENOTSUP, "no fast zeroing here".into()));
        }
        if req.len > 0 {
            let len = req.len.into();
            disk_result(if punch {
                self.disk().discard(req.offset, len)
            } else {
                self.disk().write_zeroes(req.offset, len)
            })?;
        }
        self.fua(req.flags)
    }

    /// Sends the reply of a request without data.
    fn finish(&mut self, cookie: u64, outcome: Outcome) -> Result<()> {
        match outcome {
            Ok(()) => {
                let mut h = [0u8; p::SIMPLE_HEADER_LEN];
                p::simple_header(&mut h, 0, cookie);
                self.io.send(&h)
            }
            Err(r) => self.send_error(cookie, r),
        }
        .map_err(self.io_err("write reply"))
    }

    fn send_error(&mut self, cookie: u64, Refused(code, msg): Refused) -> std::io::Result<()> {
        tracing::debug!("{}: request {cookie:#x} refused: {msg}", self.peer);
        if self.neg.structured {
            return self.io.send(&p::error_chunk(cookie, code, &msg));
        }
        let mut h = [0u8; p::SIMPLE_HEADER_LEN];
        p::simple_header(&mut h, code, cookie);
        self.io.send(&h)
    }

    fn read(&mut self, req: p::Request) -> Result<()> {
        let checked = if req.len > MAX_PAYLOAD {
            Err(Refused(
                errno::EOVERFLOW,
                format!("read of {} bytes", req.len),
            ))
        } else {
            self.range(&req, errno::EINVAL)
        };
        if let Err(r) = checked {
            return self
                .send_error(req.cookie, r)
                .map_err(self.io_err("write reply"));
        }
        if self.neg.structured && req.flags & cflag::DF == 0 && req.len >= SPARSE_READ_MIN {
            if let Ok(extents) = self.disk().map(req.offset, req.len.into()) {
                if extents.iter().any(|e| e.zero) {
                    return self.read_sparse(req, &extents);
                }
            }
        }
        let n = req.len as usize;
        let hdr = if self.neg.structured {
            p::CHUNK_HEADER_LEN + 8
        } else {
            p::SIMPLE_HEADER_LEN
        };
        if self.buf.len() < hdr + n {
            self.buf.resize(hdr + n, 0);
        }
        let mut buf = std::mem::take(&mut self.buf);
        let sent = match self.disk().read_at(&mut buf[hdr..hdr + n], req.offset) {
            Ok(()) => {
                if self.neg.structured {
                    let len = 8 + req.len;
                    p::chunk_header(
                        &mut buf,
                        chunk::FLAG_DONE,
                        chunk::OFFSET_DATA,
                        req.cookie,
                        len,
                    );
                    buf[p::CHUNK_HEADER_LEN..hdr].copy_from_slice(&req.offset.to_be_bytes());
                } else {
                    p::simple_header(&mut buf, 0, req.cookie);
                }
                self.io.send(&buf[..hdr + n])
            }
            Err(e) => self.send_error(req.cookie, refused(&e)),
        };
        self.buf = buf;
        sent.map_err(self.io_err("write reply"))
    }

    /// A structured read as data and hole chunks, following the image's map.
    fn read_sparse(&mut self, req: p::Request, extents: &[block_backend::MapExtent]) -> Result<()> {
        let hdr = p::CHUNK_HEADER_LEN + 8;
        let last = extents.len() - 1;
        for (i, e) in extents.iter().enumerate() {
            let flags = if i == last { chunk::FLAG_DONE } else { 0 };
            // Inside the request (map covers exactly the range asked), so it fits in u32.
            let len = e.length as u32;
            if e.zero {
                let c = p::hole_chunk(flags, req.cookie, e.offset, len);
                self.io.send(&c).map_err(self.io_err("write reply"))?;
                continue;
            }
            let n = len as usize;
            if self.buf.len() < hdr + n {
                self.buf.resize(hdr + n, 0);
            }
            let mut buf = std::mem::take(&mut self.buf);
            let sent = match self.disk().read_at(&mut buf[hdr..hdr + n], e.offset) {
                Ok(()) => {
                    p::chunk_header(&mut buf, flags, chunk::OFFSET_DATA, req.cookie, 8 + len);
                    buf[p::CHUNK_HEADER_LEN..hdr].copy_from_slice(&e.offset.to_be_bytes());
                    self.io.send(&buf[..hdr + n])
                }
                // Ends the reply: the error chunk is final.
                Err(err) => {
                    self.buf = buf;
                    return self
                        .send_error(req.cookie, refused(&err))
                        .map_err(self.io_err("write reply"));
                }
            };
            self.buf = buf;
            sent.map_err(self.io_err("write reply"))?;
        }
        Ok(())
    }

    fn block_status(&mut self, req: p::Request) -> Result<()> {
        let checked = if !self.neg.block_status {
            Err(Refused(
                errno::EINVAL,
                "no metadata context selected".into(),
            ))
        } else if req.len == 0 {
            Err(Refused(errno::EINVAL, "empty range".into()))
        } else {
            self.range(&req, errno::EINVAL)
        };
        let extents =
            checked.and_then(|()| disk_result(self.disk().map(req.offset, req.len.into())));
        let extents = match extents {
            Ok(e) => e,
            Err(r) => {
                return self
                    .send_error(req.cookie, r)
                    .map_err(self.io_err("write reply"))
            }
        };
        let mut descriptors: Vec<(u32, u32)> = Vec::new();
        for e in &extents {
            let state =
                if e.zero { p::STATE_ZERO } else { 0 } | if e.data { 0 } else { p::STATE_HOLE };
            // Inside the request, so each length fits in u32.
            match descriptors.last_mut() {
                Some((len, s)) if *s == state => *len += e.length as u32,
                _ => descriptors.push((e.length as u32, state)),
            }
        }
        let keep = if req.flags & cflag::REQ_ONE != 0 {
            1
        } else {
            p::MAX_DESCRIPTORS
        };
        descriptors.truncate(keep);
        let mut payload = Vec::with_capacity(4 + 8 * descriptors.len());
        payload.extend_from_slice(&p::BASE_ALLOCATION_ID.to_be_bytes());
        for (len, state) in descriptors {
            payload.extend_from_slice(&len.to_be_bytes());
            payload.extend_from_slice(&state.to_be_bytes());
        }
        let c = p::chunk(chunk::FLAG_DONE, chunk::BLOCK_STATUS, req.cookie, &payload);
        self.io.send(&c).map_err(self.io_err("write reply"))
    }
}

/// The NBD error for a disk error (logged): `EPERM` for a read-only disk, `EINVAL` out of
/// range, `ENOSPC` when the host is full, `ESHUTDOWN` once closed, else `EIO`.
fn refused(e: &SharedDiskError) -> Refused {
    tracing::warn!("disk: {e}");
    let code = match e {
        SharedDiskError::Closed => errno::ESHUTDOWN,
        SharedDiskError::Disk(d) => match d.kind() {
            ErrorKind::ReadOnly => errno::EPERM,
            ErrorKind::OutOfRange => errno::EINVAL,
            _ => {
                let os = std::error::Error::source(d)
                    .and_then(|s| s.downcast_ref::<std::io::Error>())
                    .and_then(std::io::Error::raw_os_error);
                match os {
                    Some(libc::ENOSPC) => errno::ENOSPC,
                    Some(libc::ENOMEM) => errno::ENOMEM,
                    _ => errno::EIO,
                }
            }
        },
    };
    Refused(code, e.to_string())
}

fn disk_result<T>(r: Result<T, SharedDiskError>) -> std::result::Result<T, Refused> {
    r.map_err(|e| refused(&e))
}
