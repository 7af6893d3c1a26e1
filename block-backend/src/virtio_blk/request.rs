//! Parsing and validating one virtio-blk descriptor chain, before any I/O.
//!
//! ```text
//! [ header (device-readable, 16 B: type, reserved, sector) ]
//! [ data ... (device-writable for IN / GET_ID, readable for OUT / DISCARD / WRITE_ZEROES) ]
//! [ status (device-writable, >= 1 B) ]
//! ```
//!
//! Everything a driver controls is checked here: descriptor directions, lengths (data in whole
//! 512-byte sectors, at most `seg_max` segments and `size_max` bytes each), the sector range
//! against the capacity, and that every buffer lies inside guest memory. A malformed chain gets
//! an error that becomes VIRTIO_BLK_S_IOERR or _UNSUPP, never a panic or an out-of-bounds access.

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

/// Validates a descriptor chain.
pub fn parse(
    descs: &[Descriptor],
    mem: &GuestMemoryMmap,
    limits: &Limits,
) -> Result<Request, ParseError> {
    let (Some(status_desc), true) = (descs.last(), descs.len() >= 2) else {
        return Err(ParseError::NoStatus);
    };
    if !status_desc.is_write_only()
        || status_desc.len() < 1
        || !mem.check_range(status_desc.addr(), 1)
    {
        return Err(ParseError::NoStatus);
    }
    let status = status_desc.addr();
    let bad = |reason: String| ParseError::Invalid { status, reason };
    let header = &descs[0];
    if header.is_write_only() || header.len() < 16 {
        return Err(bad(format!(
            "header descriptor is {} bytes or device-writable",
            header.len()
        )));
    }
    let mut raw = [0u8; 16];
    mem.read_slice(&mut raw, header.addr())
        .map_err(|e| bad(format!("header: {e}")))?;
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
    let middle = &descs[1..descs.len() - 1];
    let device_writes = matches!(kind, RequestType::In | RequestType::GetId);
    if middle.len() > limits.seg_max as usize {
        return Err(bad(format!(
            "{} data segments, more than seg_max {}",
            middle.len(),
            limits.seg_max
        )));
    }
    let mut data = Vec::with_capacity(middle.len());
    let mut total: u64 = 0;
    for d in middle {
        if d.is_write_only() != device_writes {
            return Err(bad(format!(
                "data descriptor at {:#x} has the wrong direction",
                d.addr().0
            )));
        }
        if d.len() > limits.size_max {
            return Err(bad(format!(
                "data segment of {} bytes exceeds size_max {}",
                d.len(),
                limits.size_max
            )));
        }
        if !mem.check_range(d.addr(), d.len() as usize) {
            return Err(bad(format!(
                "data buffer {:#x}+{} is outside guest memory",
                d.addr().0,
                d.len()
            )));
        }
        total += u64::from(d.len());
        data.push((d.addr(), d.len()));
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
