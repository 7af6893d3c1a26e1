//! NBD wire format: constants, length-checked parsing of every client message, reply encoding
//! (the server's side) and the request encoding the client sends.
//!
//! Numbers and layouts are those of the NBD protocol document (`doc/proto.md` of the
//! NetworkBlockDevice/nbd project); everything is big-endian.
//!
//! ```text
//!   handshake  S: NBDMAGIC IHAVEOPT flags(16)        C: client flags(32)
//!   option     C: IHAVEOPT option(32) len(32) data[len]      (len ≤ MAX_OPTION_LEN, else drained)
//!   opt reply  S: REPLY_MAGIC(64) option(32) type(32) len(32) data[len]
//!   request    C: REQUEST_MAGIC(32) flags(16) type(16) cookie(64) offset(64) len(32) [payload]
//!   simple     S: SIMPLE_MAGIC(32) error(32) cookie(64) [read data]
//!   chunk      S: STRUCTURED_MAGIC(32) flags(16) type(16) cookie(64) len(32) payload[len]
//! ```
//!
//! Invariants:
//! - Parsers take byte slices whose length the caller already bounded, read every field
//!   through [`Cursor`], which fails on a short buffer instead of panicking, and allocate at
//!   most the slice length (names and queries are copied out of the slice, never sized by a
//!   count from the wire).
//! - Encoders produce exactly the documented layout; chunk payloads never exceed
//!   [`MAX_PAYLOAD`] plus their fixed fields.

/// `NBDMAGIC`, first 8 bytes the server sends.
pub const NBDMAGIC: u64 = 0x4e42_444d_4147_4943;
/// `IHAVEOPT`: newstyle negotiation, and the prefix of every option the client sends.
pub const IHAVEOPT: u64 = 0x4948_4156_454f_5054;
/// Magic of every option reply.
pub const OPTION_REPLY_MAGIC: u64 = 0x0003_e889_0455_65a9;
/// Magic of every transmission request.
pub const REQUEST_MAGIC: u32 = 0x2560_9513;
/// Magic of simple replies.
pub const SIMPLE_REPLY_MAGIC: u32 = 0x6744_6698;
/// Magic of structured reply chunks.
pub const STRUCTURED_REPLY_MAGIC: u32 = 0x668e_33ef;

/// Handshake flag: fixed newstyle negotiation.
pub const FLAG_FIXED_NEWSTYLE: u16 = 1 << 0;
/// Handshake flag: no 124 zero bytes after `NBD_OPT_EXPORT_NAME`'s reply.
pub const FLAG_NO_ZEROES: u16 = 1 << 1;
/// Client flag: fixed newstyle.
pub const FLAG_C_FIXED_NEWSTYLE: u32 = 1 << 0;
/// Client flag: no zeroes.
pub const FLAG_C_NO_ZEROES: u32 = 1 << 1;

/// Transmission flags (16 bits).
pub mod tflag {
    /// Always set.
    pub const HAS_FLAGS: u16 = 1 << 0;
    /// The export refuses writes.
    pub const READ_ONLY: u16 = 1 << 1;
    /// `NBD_CMD_FLUSH` supported.
    pub const SEND_FLUSH: u16 = 1 << 2;
    /// `NBD_CMD_FLAG_FUA` supported.
    pub const SEND_FUA: u16 = 1 << 3;
    /// `NBD_CMD_TRIM` supported.
    pub const SEND_TRIM: u16 = 1 << 5;
    /// `NBD_CMD_WRITE_ZEROES` (and `NO_HOLE`) supported.
    pub const SEND_WRITE_ZEROES: u16 = 1 << 6;
    /// `NBD_CMD_FLAG_DF` supported (structured replies only).
    pub const SEND_DF: u16 = 1 << 7;
    /// A flush on one connection covers writes completed on every connection.
    pub const CAN_MULTI_CONN: u16 = 1 << 8;
    /// `NBD_CMD_CACHE` understood.
    pub const SEND_CACHE: u16 = 1 << 10;
    /// `NBD_CMD_FLAG_FAST_ZERO` supported.
    pub const SEND_FAST_ZERO: u16 = 1 << 11;
}

/// Option types.
pub mod opt {
    /// Choose an export and enter transmission (no error reply possible).
    pub const EXPORT_NAME: u32 = 1;
    /// End the negotiation.
    pub const ABORT: u32 = 2;
    /// List the exports.
    pub const LIST: u32 = 3;
    /// Upgrade the connection to TLS.
    pub const STARTTLS: u32 = 5;
    /// Describe an export.
    pub const INFO: u32 = 6;
    /// Describe an export and enter transmission.
    pub const GO: u32 = 7;
    /// Use structured replies.
    pub const STRUCTURED_REPLY: u32 = 8;
    /// List metadata contexts.
    pub const LIST_META_CONTEXT: u32 = 9;
    /// Select metadata contexts.
    pub const SET_META_CONTEXT: u32 = 10;
}

/// Option reply types.
pub mod rep {
    /// Success, no data.
    pub const ACK: u32 = 1;
    /// One export of a list.
    pub const SERVER: u32 = 2;
    /// One item of information about an export.
    pub const INFO: u32 = 3;
    /// One metadata context.
    pub const META_CONTEXT: u32 = 4;
    const ERR: u32 = 1 << 31;
    /// Option not supported.
    pub const ERR_UNSUP: u32 = ERR | 1;
    /// Refused by policy.
    pub const ERR_POLICY: u32 = ERR | 2;
    /// Syntactically or semantically invalid.
    pub const ERR_INVALID: u32 = ERR | 3;
    /// TLS is required first.
    pub const ERR_TLS_REQD: u32 = ERR | 5;
    /// No such export.
    pub const ERR_UNKNOWN: u32 = ERR | 6;
    /// The server is shutting down.
    pub const ERR_SHUTDOWN: u32 = ERR | 7;
    /// The request is too large.
    pub const ERR_TOO_BIG: u32 = ERR | 9;
}

/// `NBD_REP_INFO` item types.
pub mod info {
    /// Size and transmission flags.
    pub const EXPORT: u16 = 0;
    /// Canonical name.
    pub const NAME: u16 = 1;
    /// Human-readable description.
    pub const DESCRIPTION: u16 = 2;
    /// Minimum, preferred and maximum block sizes.
    pub const BLOCK_SIZE: u16 = 3;
}

/// Command types.
pub mod cmd {
    /// Read.
    pub const READ: u16 = 0;
    /// Write (payload follows the request).
    pub const WRITE: u16 = 1;
    /// Disconnect.
    pub const DISC: u16 = 2;
    /// Flush.
    pub const FLUSH: u16 = 3;
    /// Discard.
    pub const TRIM: u16 = 4;
    /// Prefetch hint.
    pub const CACHE: u16 = 5;
    /// Write zeros.
    pub const WRITE_ZEROES: u16 = 6;
    /// Allocation query.
    pub const BLOCK_STATUS: u16 = 7;
}

/// Command flags.
pub mod cflag {
    /// Force unit access: durable before the reply.
    pub const FUA: u16 = 1 << 0;
    /// Write zeroes: keep the range allocated.
    pub const NO_HOLE: u16 = 1 << 1;
    /// Read: at most one content chunk.
    pub const DF: u16 = 1 << 2;
    /// Block status: one descriptor.
    pub const REQ_ONE: u16 = 1 << 3;
    /// Write zeroes: fail with `ENOTSUP` unless faster than writing.
    pub const FAST_ZERO: u16 = 1 << 4;
}

/// Structured reply chunk types and flags.
pub mod chunk {
    /// Last chunk of a reply.
    pub const FLAG_DONE: u16 = 1;
    /// No payload.
    pub const NONE: u16 = 0;
    /// Offset and data.
    pub const OFFSET_DATA: u16 = 1;
    /// Offset and length of zeros.
    pub const OFFSET_HOLE: u16 = 2;
    /// Context id and descriptors.
    pub const BLOCK_STATUS: u16 = 5;
    /// Error code and message.
    pub const ERROR: u16 = (1 << 15) | 1;
}

/// Error values in replies (Linux errno numbers, as the protocol fixes them).
pub mod errno {
    /// Operation not permitted (write to a read-only export).
    pub const EPERM: u32 = 1;
    /// Input/output error.
    pub const EIO: u32 = 5;
    /// Cannot allocate memory.
    pub const ENOMEM: u32 = 12;
    /// Invalid argument.
    pub const EINVAL: u32 = 22;
    /// No space left (write past the end).
    pub const ENOSPC: u32 = 28;
    /// Value too large (request over the maximum payload).
    pub const EOVERFLOW: u32 = 75;
    /// Not supported.
    pub const ENOTSUP: u32 = 95;
    /// Server shutting down.
    pub const ESHUTDOWN: u32 = 108;
}

/// `base:allocation` flag: not allocated.
pub const STATE_HOLE: u32 = 1 << 0;
/// `base:allocation` flag: reads as zeros.
pub const STATE_ZERO: u32 = 1 << 1;
/// The one metadata context this server offers.
pub const BASE_ALLOCATION: &str = "base:allocation";
/// Its context id.
pub const BASE_ALLOCATION_ID: u32 = 1;

/// Largest READ or WRITE payload (advertised as the maximum block size).
pub const MAX_PAYLOAD: u32 = 32 << 20;
/// Largest option payload read into memory; longer ones are drained and refused.
pub const MAX_OPTION_LEN: u32 = 64 << 10;
/// Longest string (export name, query) the protocol allows.
pub const MAX_STRING: usize = 4096;
/// Most block status descriptors in one chunk (the protocol's recommended cap).
pub const MAX_DESCRIPTORS: usize = 1 << 20;
/// Size of a transmission request header.
pub const REQUEST_LEN: usize = 28;
/// Size of an option header (after the client flags).
pub const OPTION_HEADER_LEN: usize = 16;
/// Size of a structured chunk header.
pub const CHUNK_HEADER_LEN: usize = 20;
/// Size of a simple reply header.
pub const SIMPLE_HEADER_LEN: usize = 16;

/// Why a client message could not be parsed.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ParseError {
    /// The message ended before a field.
    #[error("{what} cut short: {need} bytes needed, {have} left")]
    Short {
        /// The field being read.
        what: &'static str,
        /// Bytes it needs.
        need: usize,
        /// Bytes that were left.
        have: usize,
    },
    /// A magic number was wrong.
    #[error("bad {what} magic {found:#x}")]
    Magic {
        /// Which magic.
        what: &'static str,
        /// The value found.
        found: u64,
    },
    /// Bytes left over after the last field.
    #[error("{0} trailing bytes")]
    Trailing(usize),
    /// A string longer than the protocol allows, or not UTF-8.
    #[error("invalid {0}")]
    BadString(&'static str),
}

/// Reads big-endian fields off a byte slice; every read is bounds-checked.
#[derive(Debug)]
pub struct Cursor<'a> {
    buf: &'a [u8],
}

impl<'a> Cursor<'a> {
    /// A cursor at the start of `buf`.
    pub fn new(buf: &'a [u8]) -> Self {
        Cursor { buf }
    }

    /// The next `n` bytes.
    pub fn take(&mut self, n: usize, what: &'static str) -> Result<&'a [u8], ParseError> {
        if self.buf.len() < n {
            return Err(ParseError::Short {
                what,
                need: n,
                have: self.buf.len(),
            });
        }
        let (head, rest) = self.buf.split_at(n);
        self.buf = rest;
        Ok(head)
    }

    /// A big-endian u16.
    pub fn u16(&mut self, what: &'static str) -> Result<u16, ParseError> {
        let b = self.take(2, what)?;
        Ok(u16::from_be_bytes([b[0], b[1]]))
    }

    /// A big-endian u32.
    pub fn u32(&mut self, what: &'static str) -> Result<u32, ParseError> {
        let b = self.take(4, what)?;
        Ok(u32::from_be_bytes([b[0], b[1], b[2], b[3]]))
    }

    /// A big-endian u64.
    pub fn u64(&mut self, what: &'static str) -> Result<u64, ParseError> {
        let b = self.take(8, what)?;
        let mut a = [0u8; 8];
        a.copy_from_slice(b);
        Ok(u64::from_be_bytes(a))
    }

    /// A string of `len` bytes (at most [`MAX_STRING`], UTF-8).
    pub fn string(&mut self, len: usize, what: &'static str) -> Result<String, ParseError> {
        if len > MAX_STRING {
            return Err(ParseError::BadString(what));
        }
        let b = self.take(len, what)?;
        String::from_utf8(b.to_vec()).map_err(|_| ParseError::BadString(what))
    }

    /// Bytes not read yet.
    pub fn remaining(&self) -> usize {
        self.buf.len()
    }

    /// Fails if bytes are left.
    pub fn finish(&self) -> Result<(), ParseError> {
        match self.buf.len() {
            0 => Ok(()),
            n => Err(ParseError::Trailing(n)),
        }
    }
}

/// An option header: which option, and how many data bytes follow.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct OptionHeader {
    /// Option type.
    pub option: u32,
    /// Length of its data.
    pub len: u32,
}

/// Parses the 16-byte option header.
pub fn parse_option_header(b: &[u8; OPTION_HEADER_LEN]) -> Result<OptionHeader, ParseError> {
    let mut c = Cursor::new(b);
    let magic = c.u64("option magic")?;
    if magic != IHAVEOPT {
        return Err(ParseError::Magic {
            what: "option",
            found: magic,
        });
    }
    Ok(OptionHeader {
        option: c.u32("option")?,
        len: c.u32("option length")?,
    })
}

/// Data of `NBD_OPT_INFO` and `NBD_OPT_GO`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct InfoRequest {
    /// Export name.
    pub name: String,
    /// Information types asked for.
    pub requests: Vec<u16>,
}

/// Parses the data of `NBD_OPT_INFO` / `NBD_OPT_GO`.
pub fn parse_info_request(data: &[u8]) -> Result<InfoRequest, ParseError> {
    let mut c = Cursor::new(data);
    let name_len = c.u32("name length")? as usize;
    let name = c.string(name_len, "export name")?;
    let n = c.u16("information request count")? as usize;
    // Bounded by the data: take() fails before anything is allocated for a count too large.
    let raw = c.take(n * 2, "information requests")?;
    c.finish()?;
    let requests = raw
        .chunks_exact(2)
        .map(|p| u16::from_be_bytes([p[0], p[1]]))
        .collect();
    Ok(InfoRequest { name, requests })
}

/// Data of `NBD_OPT_LIST_META_CONTEXT` / `NBD_OPT_SET_META_CONTEXT`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MetaRequest {
    /// Export name.
    pub name: String,
    /// Queries (each starts with a namespace and a colon).
    pub queries: Vec<String>,
}

/// Parses the data of the meta-context options.
pub fn parse_meta_request(data: &[u8]) -> Result<MetaRequest, ParseError> {
    let mut c = Cursor::new(data);
    let name_len = c.u32("name length")? as usize;
    let name = c.string(name_len, "export name")?;
    let n = c.u32("query count")?;
    let mut queries = Vec::new();
    for _ in 0..n {
        // Each query takes at least its 4-byte length: a count larger than the data ends here.
        let len = c.u32("query length")? as usize;
        queries.push(c.string(len, "query")?);
    }
    c.finish()?;
    Ok(MetaRequest { name, queries })
}

/// A transmission request header.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Request {
    /// Command flags.
    pub flags: u16,
    /// Command type.
    pub kind: u16,
    /// Opaque value echoed in the reply.
    pub cookie: u64,
    /// Byte offset.
    pub offset: u64,
    /// Length in bytes (for WRITE, of the payload that follows).
    pub len: u32,
}

/// Parses a 28-byte request header.
pub fn parse_request(b: &[u8; REQUEST_LEN]) -> Result<Request, ParseError> {
    let mut c = Cursor::new(b);
    let magic = c.u32("request magic")?;
    if magic != REQUEST_MAGIC {
        return Err(ParseError::Magic {
            what: "request",
            found: magic.into(),
        });
    }
    Ok(Request {
        flags: c.u16("command flags")?,
        kind: c.u16("command type")?,
        cookie: c.u64("cookie")?,
        offset: c.u64("offset")?,
        len: c.u32("length")?,
    })
}

/// The server's opening: `NBDMAGIC IHAVEOPT handshake-flags`.
pub fn greeting() -> [u8; 18] {
    let mut b = [0u8; 18];
    b[..8].copy_from_slice(&NBDMAGIC.to_be_bytes());
    b[8..16].copy_from_slice(&IHAVEOPT.to_be_bytes());
    b[16..].copy_from_slice(&(FLAG_FIXED_NEWSTYLE | FLAG_NO_ZEROES).to_be_bytes());
    b
}

/// An option reply with `data`.
pub fn option_reply(option: u32, kind: u32, data: &[u8]) -> Vec<u8> {
    let mut b = Vec::with_capacity(20 + data.len());
    b.extend_from_slice(&OPTION_REPLY_MAGIC.to_be_bytes());
    b.extend_from_slice(&option.to_be_bytes());
    b.extend_from_slice(&kind.to_be_bytes());
    b.extend_from_slice(&(data.len() as u32).to_be_bytes());
    b.extend_from_slice(data);
    b
}

/// `NBD_INFO_EXPORT` data: type, size, transmission flags.
pub fn info_export(size: u64, flags: u16) -> Vec<u8> {
    let mut b = Vec::with_capacity(12);
    b.extend_from_slice(&info::EXPORT.to_be_bytes());
    b.extend_from_slice(&size.to_be_bytes());
    b.extend_from_slice(&flags.to_be_bytes());
    b
}

/// `NBD_INFO_BLOCK_SIZE` data.
pub fn info_block_size(min: u32, preferred: u32, max: u32) -> Vec<u8> {
    let mut b = Vec::with_capacity(14);
    b.extend_from_slice(&info::BLOCK_SIZE.to_be_bytes());
    for v in [min, preferred, max] {
        b.extend_from_slice(&v.to_be_bytes());
    }
    b
}

/// `NBD_INFO_NAME` / `NBD_INFO_DESCRIPTION` data.
pub fn info_string(kind: u16, s: &str) -> Vec<u8> {
    let mut b = Vec::with_capacity(2 + s.len());
    b.extend_from_slice(&kind.to_be_bytes());
    b.extend_from_slice(s.as_bytes());
    b
}

/// Writes a simple reply header into `b[..16]`.
pub fn simple_header(b: &mut [u8], error: u32, cookie: u64) {
    b[..4].copy_from_slice(&SIMPLE_REPLY_MAGIC.to_be_bytes());
    b[4..8].copy_from_slice(&error.to_be_bytes());
    b[8..16].copy_from_slice(&cookie.to_be_bytes());
}

/// Writes a structured chunk header into `b[..20]`.
pub fn chunk_header(b: &mut [u8], flags: u16, kind: u16, cookie: u64, len: u32) {
    b[..4].copy_from_slice(&STRUCTURED_REPLY_MAGIC.to_be_bytes());
    b[4..6].copy_from_slice(&flags.to_be_bytes());
    b[6..8].copy_from_slice(&kind.to_be_bytes());
    b[8..16].copy_from_slice(&cookie.to_be_bytes());
    b[16..20].copy_from_slice(&len.to_be_bytes());
}

/// A whole chunk with a small payload.
pub fn chunk(flags: u16, kind: u16, cookie: u64, payload: &[u8]) -> Vec<u8> {
    let mut b = vec![0u8; CHUNK_HEADER_LEN];
    chunk_header(&mut b, flags, kind, cookie, payload.len() as u32);
    b.extend_from_slice(payload);
    b
}

/// An `NBD_REPLY_TYPE_ERROR` chunk (final) with a message (cut to [`MAX_STRING`] bytes).
pub fn error_chunk(cookie: u64, error: u32, message: &str) -> Vec<u8> {
    let mut end = message.len().min(MAX_STRING);
    while !message.is_char_boundary(end) {
        end -= 1;
    }
    let msg = &message.as_bytes()[..end];
    let mut p = Vec::with_capacity(6 + msg.len());
    p.extend_from_slice(&error.to_be_bytes());
    p.extend_from_slice(&(msg.len() as u16).to_be_bytes());
    p.extend_from_slice(msg);
    chunk(chunk::FLAG_DONE, chunk::ERROR, cookie, &p)
}

/// An `NBD_REPLY_TYPE_OFFSET_HOLE` chunk.
pub fn hole_chunk(flags: u16, cookie: u64, offset: u64, len: u32) -> Vec<u8> {
    let mut p = [0u8; 12];
    p[..8].copy_from_slice(&offset.to_be_bytes());
    p[8..].copy_from_slice(&len.to_be_bytes());
    chunk(flags, chunk::OFFSET_HOLE, cookie, &p)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn request_header_round_trips_its_fields() {
        let mut b = [0u8; REQUEST_LEN];
        b[..4].copy_from_slice(&REQUEST_MAGIC.to_be_bytes());
        b[4..6].copy_from_slice(&cflag::FUA.to_be_bytes());
        b[6..8].copy_from_slice(&cmd::WRITE.to_be_bytes());
        b[8..16].copy_from_slice(&7u64.to_be_bytes());
        b[16..24].copy_from_slice(&4096u64.to_be_bytes());
        b[24..].copy_from_slice(&512u32.to_be_bytes());
        let r = parse_request(&b).unwrap();
        assert_eq!(
            r,
            Request {
                flags: cflag::FUA,
                kind: cmd::WRITE,
                cookie: 7,
                offset: 4096,
                len: 512
            }
        );
        b[0] ^= 1;
        assert!(matches!(parse_request(&b), Err(ParseError::Magic { .. })));
    }

    #[test]
    fn info_request_with_a_count_past_its_data_is_refused() {
        let mut d = Vec::new();
        d.extend_from_slice(&3u32.to_be_bytes());
        d.extend_from_slice(b"abc");
        d.extend_from_slice(&0xffffu16.to_be_bytes());
        d.extend_from_slice(&3u16.to_be_bytes());
        assert!(matches!(
            parse_info_request(&d),
            Err(ParseError::Short { .. })
        ));
        let mut ok = d[..7].to_vec();
        ok.extend_from_slice(&1u16.to_be_bytes());
        ok.extend_from_slice(&info::BLOCK_SIZE.to_be_bytes());
        assert_eq!(
            parse_info_request(&ok).unwrap(),
            InfoRequest {
                name: "abc".into(),
                requests: vec![info::BLOCK_SIZE]
            }
        );
    }

    #[test]
    fn meta_request_with_a_huge_query_count_fails_without_allocating_it() {
        let mut d = Vec::new();
        d.extend_from_slice(&0u32.to_be_bytes());
        d.extend_from_slice(&u32::MAX.to_be_bytes());
        d.extend_from_slice(&15u32.to_be_bytes());
        d.extend_from_slice(BASE_ALLOCATION.as_bytes());
        assert!(matches!(
            parse_meta_request(&d),
            Err(ParseError::Short { .. })
        ));
    }

    #[test]
    fn name_longer_than_the_protocol_limit_is_refused() {
        let mut d = Vec::new();
        d.extend_from_slice(&5000u32.to_be_bytes());
        d.extend_from_slice(&[b'a'; 5000]);
        d.extend_from_slice(&0u16.to_be_bytes());
        assert_eq!(
            parse_info_request(&d),
            Err(ParseError::BadString("export name"))
        );
    }

    #[test]
    fn error_chunk_message_is_cut_on_a_character_boundary() {
        let msg = "é".repeat(3000);
        let c = error_chunk(1, errno::EIO, &msg);
        let len = u16::from_be_bytes([c[24], c[25]]) as usize;
        assert!(len <= MAX_STRING && len % 2 == 0);
        assert_eq!(c.len(), CHUNK_HEADER_LEN + 6 + len);
    }
}
