//! Parsing and validating one virtio-blk descriptor chain, before any I/O.
//!
//! A request is one byte array, `struct virtio_blk_req`, laid over the chain's buffers in
//! order; virtio 1.x forbids a device to assume how the driver cut it into descriptors
//! (message framing, 2.7.4). Device-readable buffers come first, then device-writable ones:
//!
//! ```text
//!   device-readable bytes                    device-writable bytes
//!   [ header 16 B | data (OUT, DISCARD, …) ] [ data (IN, GET_ID) | status 1 B ]
//!     type, reserved, sector                                       the last writable byte
//! ```
//!
//! Linux puts the header, each data segment and the status in descriptors of their own, but a
//! header and data may share one, a status may end a data buffer, and empty descriptors count
//! for nothing. Data pieces are cut from the descriptors where those boundaries fall.
//!
//! Everything a driver controls is checked here: the order of directions, that no bytes lie
//! where the request type has none (data of a read in the readable part, of a write in the
//! writable part), lengths (data in whole 512-byte sectors, at most `seg_max` pieces of at
//! most `size_max` bytes), the sector range against the capacity, and that every buffer lies
//! inside guest memory. A malformed chain gets an error that becomes VIRTIO_BLK_S_IOERR or
//! _UNSUPP, never a panic or an out-of-bounds access.

use virtio_bindings::virtio_blk::{
    VIRTIO_BLK_T_DISCARD, VIRTIO_BLK_T_FLUSH, VIRTIO_BLK_T_GET_ID, VIRTIO_BLK_T_IN,
    VIRTIO_BLK_T_OUT, VIRTIO_BLK_T_WRITE_ZEROES,
};
use virtio_queue::desc::split::Descriptor;
use vm_memory::{Address, Bytes, GuestAddress, GuestMemoryBackend, GuestMemoryMmap};

/// Sector unit of the virtio-blk protocol.
pub const SECTOR: u64 = 512;
/// Size of a discard / write-zeroes segment.
pub const SEGMENT_SIZE: u32 = 16;

/// What a request asks for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RequestType {
    /// Read into the data buffers.
    In,
    /// Write the data buffers.
    Out,
    /// Flush.
    Flush,
    /// Device id string.
    GetId,
    /// Discard ranges.
    Discard,
    /// Zero ranges.
    WriteZeroes,
    /// Anything else: answered with VIRTIO_BLK_S_UNSUPP.
    Unsupported(u32),
}

/// A validated request.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Request {
    /// Type.
    pub kind: RequestType,
    /// First sector (512-byte units).
    pub sector: u64,
    /// Data buffers in guest memory, in order.
    pub data: Vec<(GuestAddress, u32)>,
    /// Where the status byte goes.
    pub status: GuestAddress,
}

/// Why a chain was refused. `NoStatus` chains cannot even be answered.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ParseError {
    /// No usable status descriptor: nothing can be reported back.
    NoStatus,
    /// The request is malformed: answer VIRTIO_BLK_S_IOERR at `status`.
    Invalid {
        /// Where to write the status.
        status: GuestAddress,
        /// What is wrong (for logs).
        reason: String,
    },
}

/// Limits the device advertises.
#[derive(Debug, Clone, Copy)]
pub struct Limits {
    /// Capacity in 512-byte sectors.
    pub capacity: u64,
    /// Most data segments per request.
    pub seg_max: u32,
    /// Largest data segment in bytes.
    pub size_max: u32,
    /// Most segments in a discard or write-zeroes request.
    pub max_discard_seg: u32,
}

/// The non-empty buffers of one direction, as one byte array.
struct Stream {
    pieces: Vec<(GuestAddress, u32)>,
    len: u64,
}

impl Stream {
    fn of<'a>(descs: impl Iterator<Item = &'a Descriptor>) -> Stream {
        let pieces: Vec<_> = descs
            .filter(|d| d.len() > 0)
            .map(|d| (d.addr(), d.len()))
            .collect();
        let len = pieces.iter().map(|p| u64::from(p.1)).sum();
        Stream { pieces, len }
    }

    /// The buffers holding bytes `[from, to)` of the array (`to` at most its length); `None`
    /// if a descriptor names addresses past the end of the address space.
    fn range(&self, from: u64, to: u64) -> Option<Vec<(GuestAddress, u32)>> {
        let mut out = Vec::new();
        let mut at = 0u64;
        for &(addr, len) in &self.pieces {
            let (start, end) = (at.max(from), (at + u64::from(len)).min(to));
            if start < end {
                out.push((addr.checked_add(start - at)?, (end - start) as u32));
            }
            at += u64::from(len);
        }
        Some(out)
    }
}

/// Validates a descriptor chain.
pub fn parse(
    descs: &[Descriptor],
    mem: &GuestMemoryMmap,
    limits: &Limits,
) -> Result<Request, ParseError> {
    let readable = Stream::of(descs.iter().filter(|d| !d.is_write_only()));
    let writable = Stream::of(descs.iter().filter(|d| d.is_write_only()));
    // The status is the last writable byte.
    let Some(&(last, last_len)) = writable.pieces.last() else {
        return Err(ParseError::NoStatus);
    };
    let status = match last.checked_add(u64::from(last_len) - 1) {
        Some(s) if mem.check_range(s, 1) => s,
        _ => return Err(ParseError::NoStatus),
    };
    let bad = |reason: String| ParseError::Invalid { status, reason };
    let first_writable = descs.iter().position(|d| d.is_write_only() && d.len() > 0);
    if let Some(i) = first_writable {
        if descs[i..].iter().any(|d| !d.is_write_only() && d.len() > 0) {
            return Err(bad(
                "a device-readable buffer follows a device-writable one".into(),
            ));
        }
    }
    if readable.len < 16 {
        return Err(bad(format!(
            "{} device-readable bytes, less than a 16-byte header",
            readable.len
        )));
    }
    let mut raw = [0u8; 16];
    let mut got = 0usize;
    let overflow = || bad("a buffer runs past the end of the address space".into());
    for (addr, len) in readable.range(0, 16).ok_or_else(overflow)? {
        let to = got + len as usize;
        mem.read_slice(&mut raw[got..to], addr)
            .map_err(|e| bad(format!("header: {e}")))?;
        got = to;
    }
    let kind_raw = u32::from_le_bytes(raw[0..4].try_into().expect("4 bytes"));
    let sector = u64::from_le_bytes(raw[8..16].try_into().expect("8 bytes"));
    let kind = match kind_raw {
        VIRTIO_BLK_T_IN => RequestType::In,
        VIRTIO_BLK_T_OUT => RequestType::Out,
        VIRTIO_BLK_T_FLUSH => RequestType::Flush,
        VIRTIO_BLK_T_GET_ID => RequestType::GetId,
        VIRTIO_BLK_T_DISCARD => RequestType::Discard,
        VIRTIO_BLK_T_WRITE_ZEROES => RequestType::WriteZeroes,
        other => RequestType::Unsupported(other),
    };
    // Data: the writable bytes before the status for IN / GET_ID, the readable bytes after the
    // header for the rest. Bytes on the other side belong to no field of the request.
    let (readable_extra, writable_extra) = (readable.len - 16, writable.len - 1);
    let data = match kind {
        RequestType::In | RequestType::GetId => {
            if readable_extra > 0 {
                return Err(bad(format!(
                    "{readable_extra} device-readable bytes after the header of a read"
                )));
            }
            writable.range(0, writable_extra).ok_or_else(overflow)?
        }
        RequestType::Out | RequestType::Discard | RequestType::WriteZeroes => {
            if writable_extra > 0 {
                return Err(bad(format!(
                    "{writable_extra} device-writable bytes before the status of a write"
                )));
            }
            readable.range(16, readable.len).ok_or_else(overflow)?
        }
        // Nothing is read or written: any other bytes are ignored.
        RequestType::Flush | RequestType::Unsupported(_) => Vec::new(),
    };
    if data.len() > limits.seg_max as usize {
        return Err(bad(format!(
            "{} data segments, more than seg_max {}",
            data.len(),
            limits.seg_max
        )));
    }
    let mut total: u64 = 0;
    for &(addr, len) in &data {
        if len > limits.size_max {
            return Err(bad(format!(
                "data segment of {len} bytes exceeds size_max {}",
                limits.size_max
            )));
        }
        if !mem.check_range(addr, len as usize) {
            return Err(bad(format!(
                "data buffer {:#x}+{len} is outside guest memory",
                addr.0
            )));
        }
        total += u64::from(len);
    }
    match kind {
        RequestType::In | RequestType::Out => {
            if total % SECTOR != 0 {
                return Err(bad(format!(
                    "data length {total} is not a whole number of sectors"
                )));
            }
            let end = sector.checked_add(total / SECTOR);
            if end.is_none_or(|e| e > limits.capacity) {
                return Err(bad(format!(
                    "sectors {sector}+{} beyond the capacity {}",
                    total / SECTOR,
                    limits.capacity
                )));
            }
        }
        RequestType::Discard | RequestType::WriteZeroes => {
            if total == 0 || total % u64::from(SEGMENT_SIZE) != 0 {
                return Err(bad(format!(
                    "segment list of {total} bytes is not a whole number of 16-byte segments"
                )));
            }
            if total > u64::from(limits.max_discard_seg) * u64::from(SEGMENT_SIZE) {
                return Err(bad(format!(
                    "{total}-byte segment list: more than the {} segments advertised",
                    limits.max_discard_seg
                )));
            }
        }
        RequestType::Flush | RequestType::GetId | RequestType::Unsupported(_) => {}
    }
    Ok(Request {
        kind,
        sector,
        data,
        status,
    })
}

/// One discard / write-zeroes segment.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Segment {
    /// First sector.
    pub sector: u64,
    /// Number of sectors.
    pub num_sectors: u32,
    /// Bit 0: unmap allowed (write-zeroes).
    pub flags: u32,
}

/// Reads and bounds-checks the segments of a discard / write-zeroes request.
pub fn segments(
    req: &Request,
    mem: &GuestMemoryMmap,
    capacity: u64,
    max_sectors: u32,
) -> Result<Vec<Segment>, String> {
    let mut out = Vec::new();
    // The list is the data buffers read as one byte array: a segment may straddle two
    // descriptors (parse() checked the total is a whole number of segments).
    let mut raw = [0u8; SEGMENT_SIZE as usize];
    let mut have = 0usize;
    for &(addr, len) in &req.data {
        let mut off = 0u32;
        while off < len {
            let take = (len - off).min(SEGMENT_SIZE - have as u32);
            let at = addr
                .checked_add(u64::from(off))
                .ok_or("segment address overflows")?;
            mem.read_slice(&mut raw[have..have + take as usize], at)
                .map_err(|e| format!("segment: {e}"))?;
            have += take as usize;
            off += take;
            if have < raw.len() {
                continue;
            }
            have = 0;
            let s = Segment {
                sector: u64::from_le_bytes(raw[0..8].try_into().expect("8 bytes")),
                num_sectors: u32::from_le_bytes(raw[8..12].try_into().expect("4 bytes")),
                flags: u32::from_le_bytes(raw[12..16].try_into().expect("4 bytes")),
            };
            if s.num_sectors > max_sectors
                || s.sector
                    .checked_add(u64::from(s.num_sectors))
                    .is_none_or(|e| e > capacity)
            {
                return Err(format!(
                    "segment {}+{} is beyond the capacity {capacity} or the limit {max_sectors}",
                    s.sector, s.num_sectors
                ));
            }
            out.push(s);
        }
    }
    Ok(out)
}
