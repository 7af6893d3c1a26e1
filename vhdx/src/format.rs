//! On-disk structures of MS-VHDX (little-endian; GUIDs in Microsoft's mixed-endian layout;
//! CRC-32C with the checksum field zeroed).
//!
//! ```text
//! 0        64K      128K     192K     256K          1M ...
//! | ident  | head 1 | head 2 | regi 1 | regi 2 | ... | log | metadata | BAT | blocks ... |
//! ```
//! Everything past the first MiB is placed by the region table and the header's log fields, at
//! 1 MiB alignment.

use uuid::Uuid;

/// 1 MiB: alignment of regions, log and blocks.
pub const MIB: u64 = 1 << 20;
/// 64 KiB.
pub const KIB64: u64 = 64 << 10;
/// Offset of the file type identifier.
pub const IDENT_OFFSET: u64 = 0;
/// Offsets of the two headers.
pub const HEADER_OFFSETS: [u64; 2] = [64 << 10, 128 << 10];
/// Offsets of the two region tables.
pub const REGION_OFFSETS: [u64; 2] = [192 << 10, 256 << 10];
/// Size of a header.
pub const HEADER_SIZE: usize = 4096;
/// Size of a region table and of the metadata table.
pub const TABLE_SIZE: usize = 64 << 10;
/// Largest virtual size: 64 TiB.
pub const MAX_VIRTUAL_SIZE: u64 = 64 << 40;
/// Smallest and largest block sizes.
pub const BLOCK_SIZE_RANGE: std::ops::RangeInclusive<u32> = (1 << 20)..=(256 << 20);

/// `vhdxfile` signature of the file type identifier.
pub const IDENT_SIGNATURE: &[u8; 8] = b"vhdxfile";
/// `head`.
pub const HEADER_SIGNATURE: u32 = u32::from_le_bytes(*b"head");
/// `regi`.
pub const REGION_SIGNATURE: u32 = u32::from_le_bytes(*b"regi");
/// `metadata`.
pub const METADATA_SIGNATURE: &[u8; 8] = b"metadata";
/// `loge`.
pub const LOG_ENTRY_SIGNATURE: u32 = u32::from_le_bytes(*b"loge");
/// `zero` descriptor.
pub const ZERO_DESC_SIGNATURE: u32 = u32::from_le_bytes(*b"zero");
/// `desc` descriptor.
pub const DATA_DESC_SIGNATURE: u32 = u32::from_le_bytes(*b"desc");
/// `data` sector.
pub const DATA_SECTOR_SIGNATURE: u32 = u32::from_le_bytes(*b"data");

/// Well-known GUIDs.
pub mod guids {
    use uuid::{uuid, Uuid};
    /// BAT region.
    pub const BAT_REGION: Uuid = uuid!("2DC27766-F623-4200-9D64-115E9BFD4A08");
    /// Metadata region.
    pub const METADATA_REGION: Uuid = uuid!("8B7CA206-4790-4B9A-B8FE-575F050F886E");
    /// File Parameters item.
    pub const FILE_PARAMETERS: Uuid = uuid!("CAA16737-FA36-4D43-B3B6-33F0AA44E76B");
    /// Virtual Disk Size item.
    pub const VIRTUAL_DISK_SIZE: Uuid = uuid!("2FA54224-CD1B-4876-B211-5DBED83BF4B8");
    /// Page 83 Data item.
    pub const PAGE_83_DATA: Uuid = uuid!("BECA12AB-B2E6-4523-93EF-C309E000C746");
    /// Logical Sector Size item.
    pub const LOGICAL_SECTOR_SIZE: Uuid = uuid!("8141BF1D-A96F-4709-BA47-F233A8FAAB5F");
    /// Physical Sector Size item.
    pub const PHYSICAL_SECTOR_SIZE: Uuid = uuid!("CDA348C7-445D-4471-9CC9-E9885251C556");
    /// Parent Locator item.
    pub const PARENT_LOCATOR: Uuid = uuid!("A8D35F2D-B30B-454D-ABF7-D3D84834AB0C");
    /// Locator type of VHDX parent locators.
    pub const PARENT_LOCATOR_TYPE: Uuid = uuid!("B04AEFB7-D19E-4A81-B789-25B8E9445913");
}

/// Little-endian field access on a byte slice (bounds are the caller's invariant).
pub mod le {
    use uuid::Uuid;
    /// u16 at `at`.
    pub fn u16(b: &[u8], at: usize) -> u16 {
        u16::from_le_bytes([b[at], b[at + 1]])
    }
    /// u32 at `at`.
    pub fn u32(b: &[u8], at: usize) -> u32 {
        u32::from_le_bytes(b[at..at + 4].try_into().expect("4 bytes"))
    }
    /// u64 at `at`.
    pub fn u64(b: &[u8], at: usize) -> u64 {
        u64::from_le_bytes(b[at..at + 8].try_into().expect("8 bytes"))
    }
    /// GUID (mixed-endian) at `at`.
    pub fn guid(b: &[u8], at: usize) -> Uuid {
        Uuid::from_bytes_le(b[at..at + 16].try_into().expect("16 bytes"))
    }
    /// Stores a u16.
    pub fn put_u16(b: &mut [u8], at: usize, v: u16) {
        b[at..at + 2].copy_from_slice(&v.to_le_bytes());
    }
    /// Stores a u32.
    pub fn put_u32(b: &mut [u8], at: usize, v: u32) {
        b[at..at + 4].copy_from_slice(&v.to_le_bytes());
    }
    /// Stores a u64.
    pub fn put_u64(b: &mut [u8], at: usize, v: u64) {
        b[at..at + 8].copy_from_slice(&v.to_le_bytes());
    }
    /// Stores a GUID.
    pub fn put_guid(b: &mut [u8], at: usize, v: Uuid) {
        b[at..at + 16].copy_from_slice(&v.to_bytes_le());
    }
}

/// CRC-32C of `bytes` with the 4-byte field at `at` taken as zero.
pub fn crc_with_zeroed(bytes: &[u8], at: usize) -> u32 {
    let c = crc32c::crc32c(&bytes[..at]);
    let c = crc32c::crc32c_append(c, &[0; 4]);
    crc32c::crc32c_append(c, &bytes[at + 4..])
}

/// Writes the CRC-32C of `bytes` into the field at `at`.
pub fn seal(bytes: &mut [u8], at: usize) {
    let c = crc_with_zeroed(bytes, at);
    le::put_u32(bytes, at, c);
}

/// UTF-16LE encoding.
pub fn utf16le(s: &str) -> Vec<u8> {
    s.encode_utf16().flat_map(u16::to_le_bytes).collect()
}

/// UTF-16LE decoding (lossy), stopping at a NUL.
pub fn from_utf16le(b: &[u8]) -> String {
    let units: Vec<u16> = b
        .chunks_exact(2)
        .map(|c| u16::from_le_bytes([c[0], c[1]]))
        .take_while(|&u| u != 0)
        .collect();
    String::from_utf16_lossy(&units)
}

/// The 4 KiB header.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Header {
    /// Bytes 0..4: `head` when valid.
    pub signature: u32,
    /// CRC-32C as stored.
    pub checksum: u32,
    /// Larger = newer.
    pub sequence_number: u64,
    /// Changes before the first write of each session.
    pub file_write_guid: Uuid,
    /// Changes before the first user-visible data change; children link to it.
    pub data_write_guid: Uuid,
    /// Non-zero: the log holds entries with this GUID that must be replayed.
    pub log_guid: Uuid,
    /// 0.
    pub log_version: u16,
    /// 1.
    pub version: u16,
    /// Log size, 1 MiB multiple.
    pub log_length: u32,
    /// Log offset, 1 MiB multiple.
    pub log_offset: u64,
}

impl Header {
    /// Decodes 4 KiB.
    pub fn parse(b: &[u8]) -> Header {
        Header {
            signature: le::u32(b, 0),
            checksum: le::u32(b, 4),
            sequence_number: le::u64(b, 8),
            file_write_guid: le::guid(b, 16),
            data_write_guid: le::guid(b, 32),
            log_guid: le::guid(b, 48),
            log_version: le::u16(b, 64),
            version: le::u16(b, 66),
            log_length: le::u32(b, 68),
            log_offset: le::u64(b, 72),
        }
    }

    /// Encodes with a fresh checksum.
    pub fn to_bytes(&self) -> Vec<u8> {
        let mut b = vec![0u8; HEADER_SIZE];
        le::put_u32(&mut b, 0, HEADER_SIGNATURE);
        le::put_u64(&mut b, 8, self.sequence_number);
        le::put_guid(&mut b, 16, self.file_write_guid);
        le::put_guid(&mut b, 32, self.data_write_guid);
        le::put_guid(&mut b, 48, self.log_guid);
        le::put_u16(&mut b, 64, self.log_version);
        le::put_u16(&mut b, 66, self.version);
        le::put_u32(&mut b, 68, self.log_length);
        le::put_u64(&mut b, 72, self.log_offset);
        seal(&mut b, 4);
        b
    }

    /// Field problems (not the checksum); empty when usable.
    pub fn problems(&self) -> Vec<String> {
        let mut p = Vec::new();
        if self.signature != HEADER_SIGNATURE {
            p.push("bad signature (expected \"head\")".to_string());
            return p;
        }
        if self.version != 1 {
            p.push(format!("unsupported version {}", self.version));
        }
        if self.log_version != 0 {
            p.push(format!("unsupported log version {}", self.log_version));
        }
        if !self.log_offset.is_multiple_of(MIB)
            || self.log_offset < MIB
            || !(self.log_length as u64).is_multiple_of(MIB)
        {
            p.push(format!(
                "log at {:#x} length {:#x} is not 1 MiB aligned past the first MiB",
                self.log_offset, self.log_length
            ));
        }
        p
    }
}

/// A region table entry.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RegionEntry {
    /// Region GUID.
    pub guid: Uuid,
    /// File offset, 1 MiB multiple.
    pub file_offset: u64,
    /// Length, 1 MiB multiple.
    pub length: u32,
    /// Bit 0: required.
    pub required: bool,
}

/// Decoded region table: (signature, checksum, entries).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RegionTable {
    /// `regi` when valid.
    pub signature: u32,
    /// CRC-32C as stored.
    pub checksum: u32,
    /// Entries (count bounded by 2047).
    pub entries: Vec<RegionEntry>,
}

impl RegionTable {
    /// Decodes a 64 KiB table. `None` if the entry count is impossible.
    pub fn parse(b: &[u8]) -> Option<RegionTable> {
        let count = le::u32(b, 8) as usize;
        if count > 2047 {
            return None;
        }
        let entries = (0..count)
            .map(|i| {
                let at = 16 + 32 * i;
                RegionEntry {
                    guid: le::guid(b, at),
                    file_offset: le::u64(b, at + 16),
                    length: le::u32(b, at + 24),
                    required: le::u32(b, at + 28) & 1 != 0,
                }
            })
            .collect();
        Some(RegionTable {
            signature: le::u32(b, 0),
            checksum: le::u32(b, 4),
            entries,
        })
    }

    /// Encodes 64 KiB with a fresh checksum.
    pub fn to_bytes(&self) -> Vec<u8> {
        let mut b = vec![0u8; TABLE_SIZE];
        le::put_u32(&mut b, 0, REGION_SIGNATURE);
        le::put_u32(&mut b, 8, self.entries.len() as u32);
        for (i, e) in self.entries.iter().enumerate() {
            let at = 16 + 32 * i;
            le::put_guid(&mut b, at, e.guid);
            le::put_u64(&mut b, at + 16, e.file_offset);
            le::put_u32(&mut b, at + 24, e.length);
            le::put_u32(&mut b, at + 28, e.required as u32);
        }
        seal(&mut b, 4);
        b
    }
}

/// A metadata table entry.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct MetadataEntry {
    /// Item GUID.
    pub item_id: Uuid,
    /// Offset from the start of the metadata region (≥ 64 KiB unless length is 0).
    pub offset: u32,
    /// Length in bytes (≤ 1 MiB).
    pub length: u32,
    /// Bit 0 IsUser.
    pub is_user: bool,
    /// Bit 1 IsVirtualDisk.
    pub is_virtual_disk: bool,
    /// Bit 2 IsRequired.
    pub is_required: bool,
}

/// Decodes the metadata table (64 KiB): `None` if the signature is wrong or the count impossible.
pub fn parse_metadata_table(b: &[u8]) -> Option<Vec<MetadataEntry>> {
    if &b[0..8] != METADATA_SIGNATURE {
        return None;
    }
    let count = le::u16(b, 10) as usize;
    if count > 2047 {
        return None;
    }
    Some(
        (0..count)
            .map(|i| {
                let at = 32 + 32 * i;
                let flags = le::u32(b, at + 24);
                MetadataEntry {
                    item_id: le::guid(b, at),
                    offset: le::u32(b, at + 16),
                    length: le::u32(b, at + 20),
                    is_user: flags & 1 != 0,
                    is_virtual_disk: flags & 2 != 0,
                    is_required: flags & 4 != 0,
                }
            })
            .collect(),
    )
}

/// Encodes the metadata table.
pub fn metadata_table_bytes(entries: &[MetadataEntry]) -> Vec<u8> {
    let mut b = vec![0u8; TABLE_SIZE];
    b[0..8].copy_from_slice(METADATA_SIGNATURE);
    le::put_u16(&mut b, 10, entries.len() as u16);
    for (i, e) in entries.iter().enumerate() {
        let at = 32 + 32 * i;
        le::put_guid(&mut b, at, e.item_id);
        le::put_u32(&mut b, at + 16, e.offset);
        le::put_u32(&mut b, at + 20, e.length);
        let flags =
            e.is_user as u32 | (e.is_virtual_disk as u32) << 1 | (e.is_required as u32) << 2;
        le::put_u32(&mut b, at + 24, flags);
    }
    b
}

/// Parent locator: key/value pairs (UTF-16LE strings).
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct ParentLocator {
    /// Locator type GUID (VHDX: B04AEFB7-...).
    pub locator_type: Uuid,
    /// Key/value pairs in stored order.
    pub entries: Vec<(String, String)>,
}

impl ParentLocator {
    /// Decodes the item; `Err` with a reason if an offset or length falls outside it.
    pub fn parse(b: &[u8]) -> Result<ParentLocator, String> {
        if b.len() < 20 {
            return Err(format!(
                "item is {} bytes, smaller than its header",
                b.len()
            ));
        }
        let count = le::u16(b, 18) as usize;
        if 20 + count * 12 > b.len() {
            return Err(format!(
                "{count} key/value entries do not fit in {} bytes",
                b.len()
            ));
        }
        let mut entries = Vec::with_capacity(count);
        for i in 0..count {
            let at = 20 + 12 * i;
            let (ko, vo) = (le::u32(b, at) as usize, le::u32(b, at + 4) as usize);
            let (kl, vl) = (le::u16(b, at + 8) as usize, le::u16(b, at + 10) as usize);
            let key = b
                .get(ko..ko + kl)
                .ok_or_else(|| format!("key {i} at {ko}+{kl} outside the item"))?;
            let val = b
                .get(vo..vo + vl)
                .ok_or_else(|| format!("value {i} at {vo}+{vl} outside the item"))?;
            entries.push((from_utf16le(key), from_utf16le(val)));
        }
        Ok(ParentLocator {
            locator_type: le::guid(b, 0),
            entries,
        })
    }

    /// Encodes the item.
    pub fn to_bytes(&self) -> Vec<u8> {
        let mut b = vec![0u8; 20 + 12 * self.entries.len()];
        le::put_guid(&mut b, 0, self.locator_type);
        le::put_u16(&mut b, 18, self.entries.len() as u16);
        for (i, (k, v)) in self.entries.iter().enumerate() {
            let (kb, vb) = (utf16le(k), utf16le(v));
            let at = 20 + 12 * i;
            let ko = b.len();
            b.extend_from_slice(&kb);
            let vo = b.len();
            b.extend_from_slice(&vb);
            le::put_u32(&mut b, at, ko as u32);
            le::put_u32(&mut b, at + 4, vo as u32);
            le::put_u16(&mut b, at + 8, kb.len() as u16);
            le::put_u16(&mut b, at + 10, vb.len() as u16);
        }
        b
    }

    /// Value of `key`.
    pub fn get(&self, key: &str) -> Option<&str> {
        self.entries
            .iter()
            .find(|(k, _)| k == key)
            .map(|(_, v)| v.as_str())
    }
}

/// Payload and sector-bitmap block states (BAT entry bits 0..3).
pub mod state {
    /// Not present: zeros in dynamic images (strictly "undefined"), parent data in differencing.
    pub const NOT_PRESENT: u8 = 0;
    /// Undefined content.
    pub const UNDEFINED: u8 = 1;
    /// Reads as zeros.
    pub const ZERO: u8 = 2;
    /// Trimmed.
    pub const UNMAPPED: u8 = 3;
    /// Trimmed, as written by pre-1.0 writers.
    pub const UNMAPPED_V095: u8 = 5;
    /// Stored at the entry's file offset.
    pub const FULLY_PRESENT: u8 = 6;
    /// Differencing only: per sector, per the chunk's sector bitmap.
    pub const PARTIALLY_PRESENT: u8 = 7;
    /// Sector bitmap block present (same value as FULLY_PRESENT).
    pub const SB_PRESENT: u8 = 6;
}

/// A BAT entry: state in bits 0..3, file offset in MiB in bits 20..64.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct BatEntry(pub u64);

impl BatEntry {
    /// Builds an entry.
    pub fn new(state: u8, file_offset: u64) -> BatEntry {
        BatEntry((file_offset / MIB) << 20 | state as u64)
    }
    /// The state bits.
    pub fn state(self) -> u8 {
        (self.0 & 7) as u8
    }
    /// File offset in bytes.
    pub fn file_offset(self) -> u64 {
        (self.0 >> 20) * MIB
    }
    /// Reserved bits 3..20.
    pub fn reserved(self) -> u64 {
        (self.0 >> 3) & 0x1FFFF
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn header_round_trips_and_verifies() {
        let h = Header {
            signature: HEADER_SIGNATURE,
            checksum: 0,
            sequence_number: 6,
            file_write_guid: Uuid::from_u128(1),
            data_write_guid: Uuid::from_u128(2),
            log_guid: Uuid::nil(),
            log_version: 0,
            version: 1,
            log_length: MIB as u32,
            log_offset: MIB,
        };
        let b = h.to_bytes();
        let g = Header::parse(&b);
        assert_eq!(g.checksum, crc_with_zeroed(&b, 4));
        assert_eq!(Header { checksum: 0, ..g }, h);
        assert!(h.problems().is_empty());
    }

    #[test]
    fn bat_entry_packs_state_and_megabyte_offset() {
        let e = BatEntry::new(state::FULLY_PRESENT, 5 * MIB);
        assert_eq!(e.0, (5 << 20) | 6);
        assert_eq!(e.file_offset(), 5 * MIB);
        assert_eq!(e.state(), 6);
    }

    #[test]
    fn parent_locator_round_trips() {
        let l = ParentLocator {
            locator_type: guids::PARENT_LOCATOR_TYPE,
            entries: vec![(
                "parent_linkage".into(),
                "{00000000-0000-0000-0000-000000000001}".into(),
            )],
        };
        assert_eq!(ParentLocator::parse(&l.to_bytes()).unwrap(), l);
    }

    #[test]
    fn guids_use_microsoft_mixed_endian_layout() {
        let mut b = [0u8; 16];
        le::put_guid(&mut b, 0, guids::BAT_REGION);
        assert_eq!(b[..4], [0x66, 0x77, 0xC2, 0x2D]);
        assert_eq!(b[8..10], [0x9D, 0x64]);
    }
}
