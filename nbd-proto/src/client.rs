//! A blocking NBD client: one connection, one request in flight, every byte from the server
//! checked before use.
//!
//! ```text
//!   connect(uri) ── socket (TCP: connect timeout, no Nagle | Unix) ── read/write timeouts
//!     greeting: NBDMAGIC IHAVEOPT flags (fixed newstyle required)
//!     [STARTTLS ─> tls::connect]                                  (nbds://)
//!     STRUCTURED_REPLY ─> SET_META_CONTEXT base:allocation        (both optional)
//!     GO(export, [DESCRIPTION, BLOCK_SIZE]) ─> size, flags, block sizes, description
//!   read / write / flush / trim / write_zeroes / block_status
//!     request ─> simple reply | structured chunks up to the one flagged DONE
//! ```
//!
//! Invariants:
//! - The server is untrusted: every length it sends is bounded before anything is allocated
//!   for it (option replies [`MAX_OPTION_LEN`], block status chunks [`MAX_DESCRIPTORS`]
//!   descriptors, read data the size of the request), and a reply must match the request's
//!   cookie and cover exactly what was asked; anything else is a [`ClientError::Protocol`].
//! - A server silent for longer than the URI's timeout is a `TimedOut` error, never a hang.
//! - After an I/O or protocol error the connection is out of step with the server: every
//!   later call fails at once instead of reading someone else's reply.
//! - Requests are at most the server's maximum block size (and at most [`MAX_PAYLOAD`]);
//!   longer reads and writes are split.

use std::io::{self, Read, Write};
use std::net::{TcpStream, ToSocketAddrs};
use std::os::unix::net::UnixStream;
use std::time::Duration;

use rustls::{ClientConnection, StreamOwned};

use crate::error::{ClientError, Result};
use crate::protocol::{
    self as p, chunk, cmd, info, opt, rep, tflag, Cursor, MAX_DESCRIPTORS, MAX_OPTION_LEN,
    MAX_PAYLOAD, MAX_STRING,
};
use crate::uri::{Endpoint, Uri};

/// Largest block status request (the reply is bounded separately).
const STATUS_MAX: u64 = 1 << 30;

/// A socket.
#[derive(Debug)]
enum Socket {
    Tcp(TcpStream),
    Unix(UnixStream),
}

impl Socket {
    fn set_timeouts(&self, t: Duration) -> io::Result<()> {
        match self {
            Socket::Tcp(s) => {
                s.set_read_timeout(Some(t))?;
                s.set_write_timeout(Some(t))
            }
            Socket::Unix(s) => {
                s.set_read_timeout(Some(t))?;
                s.set_write_timeout(Some(t))
            }
        }
    }
}

impl Read for Socket {
    fn read(&mut self, b: &mut [u8]) -> io::Result<usize> {
        match self {
            Socket::Tcp(s) => s.read(b),
            Socket::Unix(s) => s.read(b),
        }
    }
}

impl Write for Socket {
    fn write(&mut self, b: &[u8]) -> io::Result<usize> {
        match self {
            Socket::Tcp(s) => s.write(b),
            Socket::Unix(s) => s.write(b),
        }
    }
    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

/// The connection: plain or TLS (`Closed` only while switching to TLS).
#[derive(Debug)]
enum Conn {
    Plain(Socket),
    Tls(Box<StreamOwned<ClientConnection, Socket>>),
    Closed,
}

impl Read for Conn {
    fn read(&mut self, b: &mut [u8]) -> io::Result<usize> {
        match self {
            Conn::Plain(s) => s.read(b),
            Conn::Tls(s) => s.read(b),
            Conn::Closed => Err(io::ErrorKind::NotConnected.into()),
        }
    }
}

impl Write for Conn {
    fn write(&mut self, b: &[u8]) -> io::Result<usize> {
        match self {
            Conn::Plain(s) => s.write(b),
            Conn::Tls(s) => s.write(b),
            Conn::Closed => Err(io::ErrorKind::NotConnected.into()),
        }
    }
    fn flush(&mut self) -> io::Result<()> {
        match self {
            Conn::Plain(s) => s.flush(),
            Conn::Tls(s) => s.flush(),
            Conn::Closed => Ok(()),
        }
    }
}

/// What a connected export offers.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ExportInfo {
    /// Size in bytes.
    pub size: u64,
    /// Transmission flags ([`tflag`]).
    pub flags: u16,
    /// Minimum, preferred and maximum block size (1, 4096, 32 MiB when not told).
    pub block: (u32, u32, u32),
    /// The export description, if the server gave one.
    pub description: Option<String>,
}

/// A connection to one export.
#[derive(Debug)]
pub struct Client {
    conn: Conn,
    peer: String,
    timeout: Duration,
    info: ExportInfo,
    structured: bool,
    /// Context id of `base:allocation`, when the server agreed to it.
    allocation: Option<u32>,
    cookie: u64,
    /// Set after an error that leaves the stream out of step.
    broken: bool,
}

/// What a reply is read into.
enum Expect<'a> {
    /// Nothing but success or an error.
    Done,
    /// Read data for `buf`, which starts at `offset`; `covered` counts bytes supplied.
    Data {
        buf: &'a mut [u8],
        offset: u64,
        covered: u64,
    },
    /// Block status descriptors `(length, flags)` of context `ctx`.
    Status {
        ctx: u32,
        out: &'a mut Vec<(u64, u32)>,
    },
}

impl Client {
    /// Connects to `uri` and negotiates its export.
    pub fn connect(uri: &Uri) -> Result<Client> {
        let peer = uri.text.clone();
        let io = |op: &'static str| {
            let peer = peer.clone();
            move |source| ClientError::Io { peer, op, source }
        };
        let socket = match &uri.endpoint {
            Endpoint::Tcp { host, port } => {
                let addrs: Vec<_> = (host.as_str(), *port)
                    .to_socket_addrs()
                    .map_err(io("resolve host"))?
                    .collect();
                let mut last = io::Error::new(io::ErrorKind::NotFound, "no address");
                let mut sock = None;
                for a in addrs {
                    match TcpStream::connect_timeout(&a, uri.timeout) {
                        Ok(s) => {
                            sock = Some(s);
                            break;
                        }
                        Err(e) => last = e,
                    }
                }
                let s = sock.ok_or(last).map_err(io("connect"))?;
                s.set_nodelay(true).map_err(io("set TCP_NODELAY"))?;
                Socket::Tcp(s)
            }
            Endpoint::Unix(path) => Socket::Unix(UnixStream::connect(path).map_err(io("connect"))?),
        };
        socket
            .set_timeouts(uri.timeout)
            .map_err(io("set timeouts"))?;
        let mut c = Client {
            conn: Conn::Plain(socket),
            peer,
            timeout: uri.timeout,
            info: ExportInfo {
                size: 0,
                flags: 0,
                block: (1, 4096, MAX_PAYLOAD),
                description: None,
            },
            structured: false,
            allocation: None,
            cookie: 0,
            broken: false,
        };
        if let Err(e) = c.handshake(uri) {
            // Still negotiating: no NBD_CMD_DISC on drop, just close.
            c.broken = true;
            return Err(e);
        }
        Ok(c)
    }

    /// The export.
    pub fn info(&self) -> &ExportInfo {
        &self.info
    }

    /// The server, as errors name it.
    pub fn peer(&self) -> &str {
        &self.peer
    }

    /// True if the export refuses writes.
    pub fn is_read_only(&self) -> bool {
        self.info.flags & tflag::READ_ONLY != 0
    }

    /// True if the server answers block status queries for `base:allocation`.
    pub fn has_block_status(&self) -> bool {
        self.allocation.is_some()
    }

    /// True if the server takes `flag` ([`tflag`]).
    pub fn can(&self, flag: u16) -> bool {
        self.info.flags & flag != 0
    }

    fn protocol(&mut self, what: String) -> ClientError {
        self.broken = true;
        ClientError::Protocol {
            peer: self.peer.clone(),
            what,
        }
    }

    fn io_err(&mut self, op: &'static str, e: io::Error) -> ClientError {
        self.broken = true;
        let source = if matches!(
            e.kind(),
            io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut
        ) {
            io::Error::new(
                io::ErrorKind::TimedOut,
                format!("no answer within {:?}", self.timeout),
            )
        } else if e.kind() == io::ErrorKind::UnexpectedEof {
            io::Error::new(
                io::ErrorKind::UnexpectedEof,
                "the server closed the connection",
            )
        } else {
            e
        };
        ClientError::Io {
            peer: self.peer.clone(),
            op,
            source,
        }
    }

    fn read_exact(&mut self, b: &mut [u8], op: &'static str) -> Result<()> {
        match self.conn.read_exact(b) {
            Ok(()) => Ok(()),
            Err(e) => Err(self.io_err(op, e)),
        }
    }

    fn write_all(&mut self, b: &[u8], op: &'static str) -> Result<()> {
        match self.conn.write_all(b).and_then(|()| self.conn.flush()) {
            Ok(()) => Ok(()),
            Err(e) => Err(self.io_err(op, e)),
        }
    }

    fn handshake(&mut self, uri: &Uri) -> Result<()> {
        let mut g = [0u8; 18];
        self.read_exact(&mut g, "read the greeting")?;
        let mut c = Cursor::new(&g);
        let (magic, style) = (c.u64("magic").unwrap_or(0), c.u64("style").unwrap_or(0));
        let flags = c.u16("flags").unwrap_or(0);
        if magic != p::NBDMAGIC {
            return Err(self.protocol(format!("not an NBD server (greeting {magic:#x})")));
        }
        if style != p::IHAVEOPT {
            return Err(self.protocol("oldstyle negotiation is not supported".into()));
        }
        if flags & p::FLAG_FIXED_NEWSTYLE == 0 {
            return Err(self.protocol("the server does not do fixed newstyle".into()));
        }
        let mut cf = p::FLAG_C_FIXED_NEWSTYLE;
        if flags & p::FLAG_NO_ZEROES != 0 {
            cf |= p::FLAG_C_NO_ZEROES;
        }
        self.write_all(&cf.to_be_bytes(), "send client flags")?;
        if uri.tls {
            self.option(opt::STARTTLS, "STARTTLS", &[], |_, _| Ok(()))?;
            let Conn::Plain(sock) = std::mem::replace(&mut self.conn, Conn::Closed) else {
                return Err(self.protocol("STARTTLS twice".into()));
            };
            self.conn = Conn::Tls(Box::new(crate::tls::connect(sock, uri)?));
        }
        self.structured = match self.option(
            opt::STRUCTURED_REPLY,
            "STRUCTURED_REPLY",
            &[],
            |_, _| Ok(()),
        ) {
            Ok(()) => true,
            Err(ClientError::Refused { .. }) => false,
            Err(e) => return Err(e),
        };
        let name = uri.export.as_str();
        if self.structured {
            let mut ctx = None;
            let data = meta_data(name, &[p::BASE_ALLOCATION]);
            let r = self.option(
                opt::SET_META_CONTEXT,
                "SET_META_CONTEXT",
                &data,
                |kind, d| {
                    if kind == rep::META_CONTEXT
                        && d.len() >= 4
                        && &d[4..] == p::BASE_ALLOCATION.as_bytes()
                    {
                        ctx = Some(u32::from_be_bytes([d[0], d[1], d[2], d[3]]));
                    }
                    Ok(())
                },
            );
            match r {
                Ok(()) => self.allocation = ctx,
                Err(ClientError::Refused { .. }) => {}
                Err(e) => return Err(e),
            }
        }
        let mut export = None;
        let mut block = None;
        let mut description = None;
        let data = info_data(name, &[info::DESCRIPTION, info::BLOCK_SIZE]);
        let r = self.option(opt::GO, "GO", &data, |kind, d| {
            if kind != rep::INFO {
                return Ok(());
            }
            let mut c = Cursor::new(d);
            let what = c.u16("information type").map_err(|e| e.to_string())?;
            match what {
                info::EXPORT => {
                    let size = c.u64("export size").map_err(|e| e.to_string())?;
                    let flags = c.u16("transmission flags").map_err(|e| e.to_string())?;
                    export = Some((size, flags));
                }
                info::BLOCK_SIZE => {
                    let mut v = [0u32; 3];
                    for x in &mut v {
                        *x = c.u32("block size").map_err(|e| e.to_string())?;
                    }
                    block = Some((v[0], v[1], v[2]));
                }
                info::DESCRIPTION => {
                    let n = c.remaining().min(MAX_STRING);
                    let b = c.take(n, "description").map_err(|e| e.to_string())?;
                    description = Some(String::from_utf8_lossy(b).into_owned());
                }
                _ => {}
            }
            Ok(())
        });
        if let Err(ClientError::Refused { reason, .. }) = &r {
            if reason.starts_with("TLS required") && !uri.tls {
                return Err(ClientError::Refused {
                    peer: self.peer.clone(),
                    option: "GO",
                    reason: format!("{reason} (use nbds:// with tls-certificates=DIR)"),
                });
            }
        }
        r?;
        let Some((size, flags)) = export else {
            return Err(self.protocol("GO succeeded without telling the export size".into()));
        };
        let (min, pref, max) = block.unwrap_or((1, 4096, MAX_PAYLOAD));
        let sane = min.is_power_of_two() && min <= 65536 && max >= min && pref >= min;
        if !sane {
            return Err(self.protocol(format!(
                "block sizes min {min}, preferred {pref}, max {max} make no sense"
            )));
        }
        self.info = ExportInfo {
            size,
            flags,
            block: (min, pref, max),
            description,
        };
        Ok(())
    }

    /// Sends an option and reads its replies up to the final one, handing each non-final
    /// reply's type and data to `each`. A final error reply is [`ClientError::Refused`].
    fn option(
        &mut self,
        option: u32,
        what: &'static str,
        data: &[u8],
        mut each: impl FnMut(u32, &[u8]) -> std::result::Result<(), String>,
    ) -> Result<()> {
        let mut b = Vec::with_capacity(16 + data.len());
        b.extend_from_slice(&p::IHAVEOPT.to_be_bytes());
        b.extend_from_slice(&option.to_be_bytes());
        b.extend_from_slice(&(data.len() as u32).to_be_bytes());
        b.extend_from_slice(data);
        self.write_all(&b, "send an option")?;
        loop {
            let mut h = [0u8; 20];
            self.read_exact(&mut h, "read an option reply")?;
            let mut c = Cursor::new(&h);
            let magic = c.u64("magic").unwrap_or(0);
            let echoed = c.u32("option").unwrap_or(0);
            let kind = c.u32("type").unwrap_or(0);
            let len = c.u32("length").unwrap_or(0);
            if magic != p::OPTION_REPLY_MAGIC || echoed != option {
                return Err(self.protocol(format!(
                    "bad reply to {what}: magic {magic:#x}, option {echoed}"
                )));
            }
            if len > MAX_OPTION_LEN {
                return Err(self.protocol(format!(
                    "reply to {what} of {len} bytes (at most {MAX_OPTION_LEN})"
                )));
            }
            let mut d = vec![0u8; len as usize];
            self.read_exact(&mut d, "read an option reply")?;
            if kind == rep::ACK {
                return Ok(());
            }
            if kind & (1 << 31) != 0 {
                return Err(ClientError::Refused {
                    peer: self.peer.clone(),
                    option: what,
                    reason: format!("{}: {}", rep_name(kind), String::from_utf8_lossy(&d)),
                });
            }
            if let Err(e) = each(kind, &d) {
                return Err(self.protocol(format!("reply to {what}: {e}")));
            }
        }
    }

    /// Fails unless the connection is usable and `[offset, offset + len)` is in the export.
    fn check(&self, op: &'static str, offset: u64, len: u64) -> Result<()> {
        if self.broken {
            return Err(ClientError::Io {
                peer: self.peer.clone(),
                op,
                source: io::Error::new(
                    io::ErrorKind::NotConnected,
                    "the connection failed earlier and was given up",
                ),
            });
        }
        if offset.checked_add(len).is_none_or(|e| e > self.info.size) {
            return Err(ClientError::Command {
                peer: self.peer.clone(),
                op,
                offset,
                len,
                errno: p::errno::EINVAL,
                message: format!("past the end of the export ({} bytes)", self.info.size),
            });
        }
        Ok(())
    }

    /// Largest request length, a multiple of the minimum block size.
    fn max_request(&self) -> u64 {
        let (min, _, max) = self.info.block;
        let m = u64::from(max.min(MAX_PAYLOAD));
        (m - m % u64::from(min)).max(u64::from(min))
    }

    fn send_request(
        &mut self,
        flags: u16,
        kind: u16,
        offset: u64,
        len: u32,
        payload: &[u8],
    ) -> Result<u64> {
        self.cookie = self.cookie.wrapping_add(1);
        let mut b = [0u8; p::REQUEST_LEN];
        b[..4].copy_from_slice(&p::REQUEST_MAGIC.to_be_bytes());
        b[4..6].copy_from_slice(&flags.to_be_bytes());
        b[6..8].copy_from_slice(&kind.to_be_bytes());
        b[8..16].copy_from_slice(&self.cookie.to_be_bytes());
        b[16..24].copy_from_slice(&offset.to_be_bytes());
        b[24..].copy_from_slice(&len.to_be_bytes());
        if payload.is_empty() {
            self.write_all(&b, "send a request")?;
        } else {
            let r = self
                .conn
                .write_all(&b)
                .and_then(|()| self.conn.write_all(payload))
                .and_then(|()| self.conn.flush());
            if let Err(e) = r {
                return Err(self.io_err("send a request", e));
            }
        }
        Ok(self.cookie)
    }

    /// Reads `buf.len()` bytes at `offset`.
    pub fn read(&mut self, buf: &mut [u8], offset: u64) -> Result<()> {
        self.check("read", offset, buf.len() as u64)?;
        let step = self.max_request() as usize;
        for (i, part) in buf.chunks_mut(step).enumerate() {
            let at = offset + (i * step) as u64;
            let len = part.len() as u32;
            let cookie = self.send_request(0, cmd::READ, at, len, &[])?;
            self.reply(
                cookie,
                "read",
                at,
                len.into(),
                Expect::Data {
                    buf: part,
                    offset: at,
                    covered: 0,
                },
            )?;
        }
        Ok(())
    }

    /// Writes `buf` at `offset`.
    pub fn write(&mut self, buf: &[u8], offset: u64) -> Result<()> {
        self.check("write", offset, buf.len() as u64)?;
        let step = self.max_request() as usize;
        for (i, part) in buf.chunks(step).enumerate() {
            let at = offset + (i * step) as u64;
            let cookie = self.send_request(0, cmd::WRITE, at, part.len() as u32, part)?;
            self.reply(cookie, "write", at, part.len() as u64, Expect::Done)?;
        }
        Ok(())
    }

    /// Makes every completed write durable (nothing to do if the server has no flush).
    pub fn flush(&mut self) -> Result<()> {
        self.check("flush", 0, 0)?;
        if !self.can(tflag::SEND_FLUSH) {
            return Ok(());
        }
        let cookie = self.send_request(0, cmd::FLUSH, 0, 0, &[])?;
        self.reply(cookie, "flush", 0, 0, Expect::Done)
    }

    /// Writes zeros over `[offset, offset + len)` with `NBD_CMD_WRITE_ZEROES` (the server may
    /// free the space). The caller checks [`tflag::SEND_WRITE_ZEROES`] first.
    pub fn write_zeroes(&mut self, offset: u64, len: u64) -> Result<()> {
        self.range_command(cmd::WRITE_ZEROES, "write zeroes", offset, len)
    }

    /// Discards `[offset, offset + len)` (contents afterwards unspecified). The caller checks
    /// [`tflag::SEND_TRIM`] first.
    pub fn trim(&mut self, offset: u64, len: u64) -> Result<()> {
        self.range_command(cmd::TRIM, "trim", offset, len)
    }

    fn range_command(&mut self, kind: u16, op: &'static str, offset: u64, len: u64) -> Result<()> {
        self.check(op, offset, len)?;
        // 32-bit lengths: whole minimum blocks of at most 2 GiB at a time.
        let min = u64::from(self.info.block.0);
        let step = ((1u64 << 31) / min) * min;
        let mut pos = offset;
        while pos < offset + len {
            let n = (offset + len - pos).min(step);
            let cookie = self.send_request(0, kind, pos, n as u32, &[])?;
            self.reply(cookie, op, pos, n, Expect::Done)?;
            pos += n;
        }
        Ok(())
    }

    /// Allocation of `[offset, offset + len)` as `(length, flags)` runs from `offset` on
    /// ([`p::STATE_HOLE`], [`p::STATE_ZERO`]); they may cover less than asked (ask again from
    /// where they end), never more. `None` without `base:allocation`.
    pub fn block_status(&mut self, offset: u64, len: u64) -> Result<Option<Vec<(u64, u32)>>> {
        let Some(ctx) = self.allocation else {
            return Ok(None);
        };
        self.check("block status", offset, len)?;
        let len = len.min(STATUS_MAX);
        let mut out = Vec::new();
        let cookie = self.send_request(0, cmd::BLOCK_STATUS, offset, len as u32, &[])?;
        self.reply(
            cookie,
            "block status",
            offset,
            len,
            Expect::Status { ctx, out: &mut out },
        )?;
        // Clip to the request: the last run may reach past it.
        let mut total = 0u64;
        out.retain_mut(|(l, _)| {
            let keep = total < len;
            *l = (*l).min(len - total.min(len));
            total += *l;
            keep && *l > 0
        });
        if out.is_empty() {
            return Err(self.protocol(format!("block status at {offset} answered no runs")));
        }
        Ok(Some(out))
    }

    /// Reads the reply to request `cookie` into `expect`.
    fn reply(
        &mut self,
        cookie: u64,
        op: &'static str,
        offset: u64,
        len: u64,
        mut expect: Expect<'_>,
    ) -> Result<()> {
        let mut failure: Option<(u32, String)> = None;
        loop {
            let mut m = [0u8; 4];
            self.read_exact(&mut m, "read a reply")?;
            let magic = u32::from_be_bytes(m);
            if magic == p::SIMPLE_REPLY_MAGIC {
                let mut h = [0u8; 12];
                self.read_exact(&mut h, "read a reply")?;
                let error = u32::from_be_bytes([h[0], h[1], h[2], h[3]]);
                let got = u64::from_be_bytes(h[4..12].try_into().unwrap_or_default());
                if got != cookie {
                    return Err(self.protocol(format!("reply for cookie {got}, expected {cookie}")));
                }
                if error != 0 {
                    return Err(self.command_error(op, offset, len, error, String::new()));
                }
                return match expect {
                    Expect::Done => Ok(()),
                    Expect::Data { buf, .. } if !self.structured => {
                        let r = self.conn.read_exact(buf);
                        r.map_err(|e| self.io_err("read data", e))
                    }
                    _ => Err(self.protocol(format!(
                        "simple reply to {op} after structured replies were agreed"
                    ))),
                };
            }
            if magic != p::STRUCTURED_REPLY_MAGIC || !self.structured {
                return Err(self.protocol(format!("bad reply magic {magic:#x}")));
            }
            let mut h = [0u8; 16];
            self.read_exact(&mut h, "read a reply chunk")?;
            let flags = u16::from_be_bytes([h[0], h[1]]);
            let kind = u16::from_be_bytes([h[2], h[3]]);
            let got = u64::from_be_bytes(h[4..12].try_into().unwrap_or_default());
            let clen = u32::from_be_bytes([h[12], h[13], h[14], h[15]]) as u64;
            if got != cookie {
                return Err(self.protocol(format!("chunk for cookie {got}, expected {cookie}")));
            }
            self.chunk(kind, clen, op, &mut expect, &mut failure)?;
            if flags & chunk::FLAG_DONE != 0 {
                break;
            }
        }
        if let Some((errno, message)) = failure {
            return Err(self.command_error(op, offset, len, errno, message));
        }
        match expect {
            Expect::Data { covered, buf, .. } if covered != buf.len() as u64 => Err(self.protocol(
                format!("read reply covered {covered} of {} bytes", buf.len()),
            )),
            _ => Ok(()),
        }
    }

    /// Handles one chunk of `clen` payload bytes.
    fn chunk(
        &mut self,
        kind: u16,
        clen: u64,
        op: &'static str,
        expect: &mut Expect<'_>,
        failure: &mut Option<(u32, String)>,
    ) -> Result<()> {
        match (kind, expect) {
            (chunk::NONE, _) if clen == 0 => Ok(()),
            (
                chunk::OFFSET_DATA,
                Expect::Data {
                    buf,
                    offset,
                    covered,
                },
            ) => {
                let Some(data_len) = clen.checked_sub(8) else {
                    return Err(self.protocol(format!("data chunk of {clen} bytes")));
                };
                let mut o = [0u8; 8];
                self.read_exact(&mut o, "read a data chunk")?;
                let at = u64::from_be_bytes(o);
                let start = at.wrapping_sub(*offset);
                if at < *offset
                    || start.saturating_add(data_len) > buf.len() as u64
                    || data_len == 0
                {
                    return Err(self.protocol(format!(
                        "data chunk ({at}, {data_len}) outside the read ({offset}, {})",
                        buf.len()
                    )));
                }
                let part = &mut buf[start as usize..(start + data_len) as usize];
                if let Err(e) = self.conn.read_exact(part) {
                    return Err(self.io_err("read data", e));
                }
                *covered += data_len;
                Ok(())
            }
            (
                chunk::OFFSET_HOLE,
                Expect::Data {
                    buf,
                    offset,
                    covered,
                },
            ) if clen == 12 => {
                let mut d = [0u8; 12];
                self.read_exact(&mut d, "read a hole chunk")?;
                let at = u64::from_be_bytes(d[..8].try_into().unwrap_or_default());
                let n = u64::from(u32::from_be_bytes([d[8], d[9], d[10], d[11]]));
                let start = at.wrapping_sub(*offset);
                if at < *offset || start.saturating_add(n) > buf.len() as u64 || n == 0 {
                    return Err(self.protocol(format!(
                        "hole chunk ({at}, {n}) outside the read ({offset}, {})",
                        buf.len()
                    )));
                }
                buf[start as usize..(start + n) as usize].fill(0);
                *covered += n;
                Ok(())
            }
            (chunk::BLOCK_STATUS, Expect::Status { ctx, out }) => {
                let max = 4 + 8 * MAX_DESCRIPTORS as u64;
                if clen < 12 || (clen - 4) % 8 != 0 || clen > max {
                    return Err(self.protocol(format!("block status chunk of {clen} bytes")));
                }
                let mut d = vec![0u8; clen as usize];
                self.read_exact(&mut d, "read a block status chunk")?;
                let id = u32::from_be_bytes([d[0], d[1], d[2], d[3]]);
                if id != *ctx {
                    return Err(
                        self.protocol(format!("block status for context {id}, asked {ctx}"))
                    );
                }
                for e in d[4..].chunks_exact(8) {
                    let l = u32::from_be_bytes([e[0], e[1], e[2], e[3]]);
                    let f = u32::from_be_bytes([e[4], e[5], e[6], e[7]]);
                    if l == 0 {
                        return Err(self.protocol("block status run of length 0".into()));
                    }
                    out.push((u64::from(l), f));
                }
                Ok(())
            }
            (k, _) if k & (1 << 15) != 0 => {
                // Error chunks: errno, message length, message (and maybe an offset).
                if !(6..=6 + MAX_STRING as u64 + 8).contains(&clen) {
                    return Err(self.protocol(format!("error chunk of {clen} bytes")));
                }
                let mut d = vec![0u8; clen as usize];
                self.read_exact(&mut d, "read an error chunk")?;
                let errno = u32::from_be_bytes([d[0], d[1], d[2], d[3]]);
                let mlen = (u16::from_be_bytes([d[4], d[5]]) as usize).min(d.len() - 6);
                let msg = String::from_utf8_lossy(&d[6..6 + mlen]).into_owned();
                failure.get_or_insert((errno.max(1), msg));
                Ok(())
            }
            (k, _) => Err(self.protocol(format!(
                "unexpected chunk type {k} ({clen} bytes) in the reply to {op}"
            ))),
        }
    }

    fn command_error(
        &self,
        op: &'static str,
        offset: u64,
        len: u64,
        errno: u32,
        message: String,
    ) -> ClientError {
        ClientError::Command {
            peer: self.peer.clone(),
            op,
            offset,
            len,
            errno,
            message,
        }
    }
}

impl Drop for Client {
    fn drop(&mut self) {
        if self.broken {
            return;
        }
        // Tell the server we are done; it may already be gone.
        let _ = self.send_request(0, cmd::DISC, 0, 0, &[]);
        if let Conn::Tls(s) = &mut self.conn {
            s.conn.send_close_notify();
            let _ = s.conn.complete_io(&mut s.sock);
        }
    }
}

/// Name of an option error reply type.
fn rep_name(kind: u32) -> &'static str {
    match kind {
        rep::ERR_UNSUP => "not supported",
        rep::ERR_POLICY => "refused by policy",
        rep::ERR_INVALID => "invalid",
        rep::ERR_TLS_REQD => "TLS required",
        rep::ERR_UNKNOWN => "no such export",
        rep::ERR_SHUTDOWN => "server shutting down",
        rep::ERR_TOO_BIG => "too big",
        _ => "error",
    }
}

/// Data of `NBD_OPT_INFO` / `NBD_OPT_GO`.
pub fn info_data(name: &str, requests: &[u16]) -> Vec<u8> {
    let mut d = (name.len() as u32).to_be_bytes().to_vec();
    d.extend_from_slice(name.as_bytes());
    d.extend_from_slice(&(requests.len() as u16).to_be_bytes());
    for r in requests {
        d.extend_from_slice(&r.to_be_bytes());
    }
    d
}

/// Data of the meta-context options.
pub fn meta_data(name: &str, queries: &[&str]) -> Vec<u8> {
    let mut d = (name.len() as u32).to_be_bytes().to_vec();
    d.extend_from_slice(name.as_bytes());
    d.extend_from_slice(&(queries.len() as u32).to_be_bytes());
    for q in queries {
        d.extend_from_slice(&(q.len() as u32).to_be_bytes());
        d.extend_from_slice(q.as_bytes());
    }
    d
}
