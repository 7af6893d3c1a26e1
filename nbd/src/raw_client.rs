//! A minimal blocking NBD client for tests and fuzz seeds: it sends exactly the bytes it is
//! told (well-formed or not) and reads replies field by field. Not the client of `nbd://`
//! images (that one will live in `client.rs`): no retries, no request queue.
//!
//! ```text
//!   RawClient::handshake(stream) ─> option(..) ─> go(structured, meta) ─> request(..) ─> reply
//! ```
//!
//! Invariant: it never hides what the server sent: replies come back as raw fields and the
//! caller checks them.

use std::io::{self, Read, Write};

use crate::protocol::{self as p, opt, rep};

/// One option reply: type and data.
pub type OptionReply = (u32, Vec<u8>);

/// One structured reply chunk.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Chunk {
    /// Chunk flags.
    pub flags: u16,
    /// Chunk type.
    pub kind: u16,
    /// Cookie.
    pub cookie: u64,
    /// Payload.
    pub payload: Vec<u8>,
}

/// A connection driven by hand.
#[derive(Debug)]
pub struct RawClient<S> {
    /// The stream (public so tests can send arbitrary bytes).
    pub stream: S,
}

impl<S: Read + Write> RawClient<S> {
    /// Reads the greeting and sends `client_flags`.
    pub fn handshake(mut stream: S, client_flags: u32) -> io::Result<Self> {
        let mut g = [0u8; 18];
        stream.read_exact(&mut g)?;
        if g[..16] != p::greeting()[..16] {
            return Err(io::Error::other("bad greeting"));
        }
        stream.write_all(&client_flags.to_be_bytes())?;
        Ok(RawClient { stream })
    }

    /// Sends an option header and data.
    pub fn send_option(&mut self, option: u32, data: &[u8]) -> io::Result<()> {
        let mut b = Vec::with_capacity(16 + data.len());
        b.extend_from_slice(&p::IHAVEOPT.to_be_bytes());
        b.extend_from_slice(&option.to_be_bytes());
        b.extend_from_slice(&(data.len() as u32).to_be_bytes());
        b.extend_from_slice(data);
        self.stream.write_all(&b)
    }

    /// Reads one option reply.
    pub fn option_reply(&mut self) -> io::Result<OptionReply> {
        let mut h = [0u8; 20];
        self.stream.read_exact(&mut h)?;
        if h[..8] != p::OPTION_REPLY_MAGIC.to_be_bytes() {
            return Err(io::Error::other("bad option reply magic"));
        }
        let kind = u32::from_be_bytes([h[12], h[13], h[14], h[15]]);
        let len = u32::from_be_bytes([h[16], h[17], h[18], h[19]]);
        if len > 1 << 20 {
            return Err(io::Error::other("option reply too long"));
        }
        let mut data = vec![0u8; len as usize];
        self.stream.read_exact(&mut data)?;
        Ok((kind, data))
    }

    /// Sends an option and reads its replies up to the final one (ACK or an error).
    pub fn option(&mut self, option: u32, data: &[u8]) -> io::Result<Vec<OptionReply>> {
        self.send_option(option, data)?;
        let mut out = Vec::new();
        loop {
            let r = self.option_reply()?;
            let last = r.0 == rep::ACK || r.0 & (1 << 31) != 0;
            out.push(r);
            if last {
                return Ok(out);
            }
        }
    }

    /// Negotiates structured replies and `base:allocation` as asked, then `NBD_OPT_GO` on
    /// `name`; returns the export size and transmission flags.
    pub fn go(&mut self, name: &str, structured: bool, meta: bool) -> io::Result<(u64, u16)> {
        if structured {
            self.expect_ack(opt::STRUCTURED_REPLY, &[])?;
        }
        if meta {
            self.option(
                opt::SET_META_CONTEXT,
                &meta_data(name, &[p::BASE_ALLOCATION]),
            )?;
        }
        let replies = self.option(opt::GO, &info_data(name, &[]))?;
        for (kind, data) in &replies {
            if *kind == rep::INFO && data.len() == 12 && data[..2] == [0, 0] {
                let size = u64::from_be_bytes(data[2..10].try_into().unwrap_or_default());
                return Ok((size, u16::from_be_bytes([data[10], data[11]])));
            }
        }
        Err(io::Error::other(format!("GO failed: {replies:?}")))
    }

    fn expect_ack(&mut self, option: u32, data: &[u8]) -> io::Result<()> {
        match self.option(option, data)?.last() {
            Some((rep::ACK, _)) => Ok(()),
            other => Err(io::Error::other(format!("option {option}: {other:?}"))),
        }
    }

    /// Sends a request header (and `payload` right after it).
    pub fn request(
        &mut self,
        flags: u16,
        kind: u16,
        cookie: u64,
        offset: u64,
        len: u32,
        payload: &[u8],
    ) -> io::Result<()> {
        let mut b = Vec::with_capacity(p::REQUEST_LEN + payload.len());
        b.extend_from_slice(&p::REQUEST_MAGIC.to_be_bytes());
        b.extend_from_slice(&flags.to_be_bytes());
        b.extend_from_slice(&kind.to_be_bytes());
        b.extend_from_slice(&cookie.to_be_bytes());
        b.extend_from_slice(&offset.to_be_bytes());
        b.extend_from_slice(&len.to_be_bytes());
        b.extend_from_slice(payload);
        self.stream.write_all(&b)
    }

    /// Reads a simple reply: `(error, cookie)`; with `data_len`, also that much data when the
    /// error is 0.
    pub fn simple_reply(&mut self, data_len: usize) -> io::Result<(u32, u64, Vec<u8>)> {
        let mut h = [0u8; 16];
        self.stream.read_exact(&mut h)?;
        if h[..4] != p::SIMPLE_REPLY_MAGIC.to_be_bytes() {
            return Err(io::Error::other("not a simple reply"));
        }
        let error = u32::from_be_bytes([h[4], h[5], h[6], h[7]]);
        let cookie = u64::from_be_bytes(h[8..16].try_into().unwrap_or_default());
        let mut data = Vec::new();
        if error == 0 && data_len > 0 {
            data.resize(data_len, 0);
            self.stream.read_exact(&mut data)?;
        }
        Ok((error, cookie, data))
    }

    /// Reads one structured chunk (payloads up to 64 MiB).
    pub fn chunk(&mut self) -> io::Result<Chunk> {
        let mut h = [0u8; 20];
        self.stream.read_exact(&mut h)?;
        if h[..4] != p::STRUCTURED_REPLY_MAGIC.to_be_bytes() {
            return Err(io::Error::other("not a structured reply"));
        }
        let len = u32::from_be_bytes([h[16], h[17], h[18], h[19]]);
        if len > 64 << 20 {
            return Err(io::Error::other("chunk too long"));
        }
        let mut payload = vec![0u8; len as usize];
        self.stream.read_exact(&mut payload)?;
        Ok(Chunk {
            flags: u16::from_be_bytes([h[4], h[5]]),
            kind: u16::from_be_bytes([h[6], h[7]]),
            cookie: u64::from_be_bytes(h[8..16].try_into().unwrap_or_default()),
            payload,
        })
    }

    /// Reads chunks up to and including the one flagged done.
    pub fn structured_reply(&mut self) -> io::Result<Vec<Chunk>> {
        let mut out = Vec::new();
        loop {
            let c = self.chunk()?;
            let done = c.flags & p::chunk::FLAG_DONE != 0;
            out.push(c);
            if done {
                return Ok(out);
            }
        }
    }
}

pub use nbd_proto::client::{info_data, meta_data};
