//! The live-migration wire format: a versioned header each way, then framed, checksummed
//! records.
//!
//! ```text
//!  header  "VHDKMIGR" | protocol u32 | version length u16 | vhdtool version (≤ 64 bytes)
//!          | CRC-32C u32 of everything before it
//!  record  kind u32 | payload length u32 | payload | CRC-32C u32 of kind, length and payload
//! ```
//!
//! All integers little-endian. Both ends send their header first and refuse a peer whose
//! protocol version or vhdtool version differs from theirs (the VM state format belongs to
//! the build). Each record kind has its own payload bound ([`max_payload`]), checked before
//! anything is read, and payloads are read as they arrive (a peer that announces a large
//! record and sends nothing costs no memory). Every error names the peer, the record number
//! and the stream offset where the bad field starts; nothing here panics on any input.

use std::io::{Read, Write};
use std::path::PathBuf;

use serde::{Deserialize, Serialize};

/// Magic of the stream header.
pub const MAGIC: [u8; 8] = *b"VHDKMIGR";
/// Version of this protocol; a peer with another is refused.
pub const PROTOCOL_VERSION: u32 = 1;
/// Longest vhdtool version string in a header.
pub const MAX_VERSION_LEN: usize = 64;
/// Guest page size of [`Record::Pages`] and [`Record::Zero`].
pub const PAGE: usize = 4096;
/// Most pages in one [`Record::Pages`].
pub const MAX_PAGES_PER_RECORD: usize = 256;
/// Largest [`Record::Config`] or [`Record::Failed`] payload.
pub const MAX_SMALL: usize = 64 << 10;
/// Record header: kind and length.
const RECORD_HEAD: usize = 8;

/// This build's vhdtool version, as sent in the header.
pub fn our_version() -> &'static str {
    env!("CARGO_PKG_VERSION")
}

/// A disk of the migrating VM (shared storage: the same path on both ends).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct WireDisk {
    /// The image the guest writes.
    pub path: PathBuf,
    /// Opened read-only.
    pub read_only: bool,
}

/// What the target needs to build the VM before memory arrives.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct WireConfig {
    /// Guest RAM in bytes.
    pub memory: u64,
    /// vCPUs.
    pub cpus: u8,
    /// The guest's extra kernel command line (informational: the guest is not booted).
    pub cmdline: String,
    /// How the guest reaches its disks (absent from older sources: mmio).
    #[serde(default, skip_serializing_if = "crate::Transport::is_mmio")]
    pub transport: crate::Transport,
    /// Disks in guest order.
    pub disks: Vec<WireDisk>,
}

/// One record of the stream.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Record {
    /// Source → target, first: the VM's shape.
    Config(WireConfig),
    /// Source → target: guest pages at `gpa` (a whole number of pages, at most
    /// [`MAX_PAGES_PER_RECORD`]).
    Pages {
        /// Guest physical address of the first page.
        gpa: u64,
        /// The page contents.
        data: Vec<u8>,
    },
    /// Source → target: `pages` zero pages at `gpa`.
    Zero {
        /// Guest physical address of the first page.
        gpa: u64,
        /// How many.
        pages: u32,
    },
    /// Source → target: the VM state (`vmstate.bin` container, see [`crate::state`]).
    State(Vec<u8>),
    /// Source → target: every disk is flushed and closed; the target may open them.
    DisksReleased,
    /// Target → source: the VM is built and its disks are open; waiting for [`Record::Go`].
    Ready,
    /// Source → target: the source has given the VM up; run it.
    Go,
    /// Either way: the sender gives up, for this reason.
    Failed(String),
}

impl Record {
    /// What the record is, for messages (never its payload).
    pub fn name(&self) -> &'static str {
        kind_name(match self {
            Record::Config(_) => K_CONFIG,
            Record::Pages { .. } => K_PAGES,
            Record::Zero { .. } => K_ZERO,
            Record::State(_) => K_STATE,
            Record::DisksReleased => K_DISKS_RELEASED,
            Record::Ready => K_READY,
            Record::Go => K_GO,
            Record::Failed(_) => K_FAILED,
        })
    }
}

const K_CONFIG: u32 = 1;
const K_PAGES: u32 = 2;
const K_ZERO: u32 = 3;
const K_STATE: u32 = 4;
const K_DISKS_RELEASED: u32 = 5;
const K_READY: u32 = 6;
const K_GO: u32 = 7;
const K_FAILED: u32 = 8;

/// Largest payload of a record of `kind`; `None` for an unknown kind.
pub fn max_payload(kind: u32) -> Option<usize> {
    Some(match kind {
        K_CONFIG | K_FAILED => MAX_SMALL,
        K_PAGES => 8 + MAX_PAGES_PER_RECORD * PAGE,
        K_ZERO => 12,
        K_STATE => crate::state::MAX_BODY as usize + crate::state::HEADER_LEN,
        K_DISKS_RELEASED | K_READY | K_GO => 0,
        _ => return None,
    })
}

fn kind_name(kind: u32) -> &'static str {
    match kind {
        K_CONFIG => "config record",
        K_PAGES => "pages record",
        K_ZERO => "zero-pages record",
        K_STATE => "VM state record",
        K_DISKS_RELEASED => "disks-released record",
        K_READY => "ready record",
        K_GO => "go record",
        K_FAILED => "failure record",
        _ => "record",
    }
}

/// Errors of the stream.
#[derive(Debug, thiserror::Error)]
pub enum StreamError {
    /// Reading or writing failed (the connection broke, timed out, or ended early).
    #[error("migration peer {peer}: {what} at stream offset {offset}: {source}")]
    Io {
        /// The other end.
        peer: String,
        /// What was being read or written.
        what: String,
        /// Stream offset (in this direction) where it failed.
        offset: u64,
        /// The error.
        source: std::io::Error,
    },
    /// The peer sent something malformed.
    #[error("migration peer {peer}: {structure} #{record} at stream offset {offset}: {detail}")]
    Corrupt {
        /// The other end.
        peer: String,
        /// What was being read.
        structure: &'static str,
        /// Record number (0 = the header).
        record: u64,
        /// Stream offset of the bad field.
        offset: u64,
        /// What is wrong.
        detail: String,
    },
    /// The peer runs another protocol or vhdtool version.
    #[error("migration peer {peer}: refused: {detail}")]
    Version {
        /// The other end.
        peer: String,
        /// Both versions.
        detail: String,
    },
    /// The peer gave up and said why.
    #[error("migration peer {peer} failed: {message}")]
    Remote {
        /// The other end.
        peer: String,
        /// Its reason.
        message: String,
    },
}

/// The header bytes for protocol `protocol` and vhdtool `version` (tests make foreign ones).
pub fn encode_header(protocol: u32, version: &str) -> Vec<u8> {
    let v = &version.as_bytes()[..version.len().min(MAX_VERSION_LEN)];
    let mut h = Vec::with_capacity(8 + 4 + 2 + v.len() + 4);
    h.extend_from_slice(&MAGIC);
    h.extend_from_slice(&protocol.to_le_bytes());
    h.extend_from_slice(&(v.len() as u16).to_le_bytes());
    h.extend_from_slice(v);
    let crc = crc32c::crc32c(&h);
    h.extend_from_slice(&crc.to_le_bytes());
    h
}

/// The bytes of one record (payload parts concatenated).
fn frame(kind: u32, parts: &[&[u8]]) -> Vec<u8> {
    let len: usize = parts.iter().map(|p| p.len()).sum();
    let mut out = Vec::with_capacity(RECORD_HEAD + len + 4);
    out.extend_from_slice(&kind.to_le_bytes());
    out.extend_from_slice(&(len as u32).to_le_bytes());
    for p in parts {
        out.extend_from_slice(p);
    }
    let crc = crc32c::crc32c(&out);
    out.extend_from_slice(&crc.to_le_bytes());
    out
}

/// The bytes of `record`.
pub fn encode(record: &Record) -> Vec<u8> {
    match record {
        Record::Config(c) => frame(K_CONFIG, &[&serde_json::to_vec(c).unwrap_or_default()]),
        Record::Pages { gpa, data } => frame(K_PAGES, &[&gpa.to_le_bytes(), data]),
        Record::Zero { gpa, pages } => frame(K_ZERO, &[&gpa.to_le_bytes(), &pages.to_le_bytes()]),
        Record::State(s) => frame(K_STATE, &[s]),
        Record::DisksReleased => frame(K_DISKS_RELEASED, &[]),
        Record::Ready => frame(K_READY, &[]),
        Record::Go => frame(K_GO, &[]),
        Record::Failed(m) => {
            let m = &m.as_bytes()[..m.len().min(MAX_SMALL)];
            frame(K_FAILED, &[m])
        }
    }
}

/// Writes the stream to a peer, counting bytes.
pub struct Sender<W: Write> {
    w: W,
    peer: String,
    /// Bytes written so far.
    pub offset: u64,
}

impl<W: Write> Sender<W> {
    /// A sender to `peer` (named in errors).
    pub fn new(w: W, peer: impl Into<String>) -> Sender<W> {
        Sender {
            w,
            peer: peer.into(),
            offset: 0,
        }
    }

    fn put(&mut self, bytes: &[u8], what: &str) -> Result<(), StreamError> {
        self.w
            .write_all(bytes)
            .and_then(|()| self.w.flush())
            .map_err(|source| StreamError::Io {
                peer: self.peer.clone(),
                what: format!("send the {what}"),
                offset: self.offset,
                source,
            })?;
        self.offset += bytes.len() as u64;
        Ok(())
    }

    /// Sends this build's header.
    pub fn header(&mut self) -> Result<(), StreamError> {
        self.put(&encode_header(PROTOCOL_VERSION, our_version()), "header")
    }

    /// Sends `record`.
    pub fn send(&mut self, record: &Record) -> Result<(), StreamError> {
        let bytes = encode(record);
        let what = kind_name(u32::from_le_bytes(
            bytes[..4].try_into().unwrap_or_default(),
        ));
        self.put(&bytes, what)
    }

    /// Sends guest pages without copying them into a [`Record`] first.
    pub fn pages(&mut self, gpa: u64, data: &[u8]) -> Result<(), StreamError> {
        self.put(&frame(K_PAGES, &[&gpa.to_le_bytes(), data]), "pages record")
    }

    /// The writer (to shut the connection down).
    pub fn get_ref(&self) -> &W {
        &self.w
    }
}

/// Reads and checks the stream from a peer.
pub struct Receiver<R: Read> {
    r: R,
    peer: String,
    /// Bytes read so far.
    pub offset: u64,
    /// Records read so far.
    pub records: u64,
}

impl<R: Read> Receiver<R> {
    /// A receiver from `peer` (named in errors).
    pub fn new(r: R, peer: impl Into<String>) -> Receiver<R> {
        Receiver {
            r,
            peer: peer.into(),
            offset: 0,
            records: 0,
        }
    }

    fn corrupt(&self, structure: &'static str, offset: u64, detail: String) -> StreamError {
        StreamError::Corrupt {
            peer: self.peer.clone(),
            structure,
            record: self.records,
            offset,
            detail,
        }
    }

    fn take(&mut self, buf: &mut [u8], what: &str) -> Result<(), StreamError> {
        self.r.read_exact(buf).map_err(|source| StreamError::Io {
            source: if source.kind() == std::io::ErrorKind::UnexpectedEof {
                std::io::Error::new(source.kind(), "the peer closed the connection")
            } else {
                source
            },
            peer: self.peer.clone(),
            what: format!("read the {what}"),
            offset: self.offset,
        })?;
        self.offset += buf.len() as u64;
        Ok(())
    }

    /// Reads the peer's header and refuses another protocol or vhdtool version than
    /// `version`; returns the peer's version.
    pub fn header_for(&mut self, version: &str) -> Result<String, StreamError> {
        let s = "stream header";
        let mut head = [0u8; 14];
        self.take(&mut head, s)?;
        if head[..8] != MAGIC {
            return Err(self.corrupt(s, 0, "not a vhdkit migration stream (bad magic)".into()));
        }
        let protocol = u32::from_le_bytes([head[8], head[9], head[10], head[11]]);
        if protocol != PROTOCOL_VERSION {
            return Err(StreamError::Version {
                peer: self.peer.clone(),
                detail: format!(
                    "it speaks migration protocol {protocol}, this vhdtool {} speaks \
                     protocol {PROTOCOL_VERSION}",
                    our_version()
                ),
            });
        }
        let vlen = usize::from(u16::from_le_bytes([head[12], head[13]]));
        if vlen > MAX_VERSION_LEN {
            return Err(self.corrupt(
                s,
                12,
                format!("version string of {vlen} bytes, at most {MAX_VERSION_LEN}"),
            ));
        }
        let mut rest = vec![0u8; vlen + 4];
        self.take(&mut rest, s)?;
        let mut all = head.to_vec();
        all.extend_from_slice(&rest[..vlen]);
        let want = u32::from_le_bytes(rest[vlen..].try_into().unwrap_or_default());
        let got = crc32c::crc32c(&all);
        if want != got {
            return Err(self.corrupt(
                s,
                14 + vlen as u64,
                format!("checksum mismatch (CRC-32C {got:#010x}, header says {want:#010x})"),
            ));
        }
        let theirs = String::from_utf8_lossy(&rest[..vlen]).into_owned();
        if theirs != version {
            return Err(StreamError::Version {
                peer: self.peer.clone(),
                detail: format!(
                    "it runs vhdtool {theirs:?}, this is vhdtool {version:?}: the VM state \
                     format belongs to the build, both ends must run the same version"
                ),
            });
        }
        self.records = 1;
        Ok(theirs)
    }

    /// [`Receiver::header_for`] this build's version.
    pub fn header(&mut self) -> Result<String, StreamError> {
        self.header_for(our_version())
    }

    /// Reads the next record; a [`Record::Failed`] from the peer is returned as
    /// [`StreamError::Remote`].
    pub fn record(&mut self) -> Result<Record, StreamError> {
        let start = self.offset;
        let mut head = [0u8; RECORD_HEAD];
        self.take(&mut head, "record header")?;
        let kind = u32::from_le_bytes([head[0], head[1], head[2], head[3]]);
        let len = u32::from_le_bytes([head[4], head[5], head[6], head[7]]) as usize;
        let name = kind_name(kind);
        let Some(max) = max_payload(kind) else {
            return Err(self.corrupt(name, start, format!("unknown record kind {kind}")));
        };
        if len > max {
            return Err(self.corrupt(
                name,
                start + 4,
                format!("payload of {len} bytes, at most {max} for this kind"),
            ));
        }
        // Read as it arrives: the allocation grows with what the peer really sent.
        let mut payload = Vec::new();
        let got = (&mut self.r)
            .take(len as u64)
            .read_to_end(&mut payload)
            .map_err(|source| StreamError::Io {
                peer: self.peer.clone(),
                what: format!("read the {name}"),
                offset: self.offset,
                source,
            })?;
        self.offset += got as u64;
        if got < len {
            return Err(StreamError::Io {
                peer: self.peer.clone(),
                what: format!("read the {name} ({len} bytes announced, {got} came)"),
                offset: self.offset,
                source: std::io::Error::new(
                    std::io::ErrorKind::UnexpectedEof,
                    "the peer closed the connection",
                ),
            });
        }
        let mut crc = [0u8; 4];
        self.take(&mut crc, name)?;
        let want = u32::from_le_bytes(crc);
        let got = crc32c::crc32c_append(crc32c::crc32c(&head), &payload);
        if want != got {
            return Err(self.corrupt(
                name,
                start,
                format!("checksum mismatch (CRC-32C {got:#010x}, record says {want:#010x})"),
            ));
        }
        let body = start + RECORD_HEAD as u64;
        let record = match kind {
            K_CONFIG => Record::Config(
                serde_json::from_slice(&payload)
                    .map_err(|e| self.corrupt(name, body, format!("cannot be parsed: {e}")))?,
            ),
            K_PAGES => {
                let n = len.saturating_sub(8);
                if len < 8 + PAGE || n % PAGE != 0 {
                    return Err(self.corrupt(
                        name,
                        start + 4,
                        format!("{n} bytes of page data, not a whole number of pages"),
                    ));
                }
                let gpa = u64::from_le_bytes(payload[..8].try_into().unwrap_or_default());
                if gpa % PAGE as u64 != 0 {
                    return Err(self.corrupt(name, body, format!("address {gpa:#x} unaligned")));
                }
                payload.drain(..8);
                Record::Pages { gpa, data: payload }
            }
            K_ZERO => {
                if len != 12 {
                    return Err(self.corrupt(name, start + 4, format!("{len} bytes, not 12")));
                }
                let gpa = u64::from_le_bytes(payload[..8].try_into().unwrap_or_default());
                let pages = u32::from_le_bytes(payload[8..].try_into().unwrap_or_default());
                if gpa % PAGE as u64 != 0 {
                    return Err(self.corrupt(name, body, format!("address {gpa:#x} unaligned")));
                }
                Record::Zero { gpa, pages }
            }
            K_STATE => Record::State(payload),
            K_DISKS_RELEASED => Record::DisksReleased,
            K_READY => Record::Ready,
            K_GO => Record::Go,
            _ => {
                return Err(StreamError::Remote {
                    peer: self.peer.clone(),
                    message: String::from_utf8_lossy(&payload).into_owned(),
                })
            }
        };
        self.records += 1;
        Ok(record)
    }

    /// The peer's name.
    pub fn peer(&self) -> &str {
        &self.peer
    }

    /// An error about the record just read (at `offset`), for checks made by the caller.
    pub fn bad_record(&self, structure: &'static str, offset: u64, detail: String) -> StreamError {
        StreamError::Corrupt {
            peer: self.peer.clone(),
            structure,
            record: self.records.saturating_sub(1),
            offset,
            detail,
        }
    }
}

/// Decodes a whole stream (header, then records until the input ends or an error) and
/// returns the records; for the fuzz target and tests.
pub fn decode_all(bytes: &[u8]) -> Result<Vec<Record>, StreamError> {
    let mut r = Receiver::new(bytes, "fuzz");
    r.header()?;
    let mut out = Vec::new();
    while r.offset < bytes.len() as u64 {
        out.push(r.record()?);
    }
    Ok(out)
}

#[cfg(test)]
#[path = "stream_tests.rs"]
mod tests;
