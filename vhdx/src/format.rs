//! On-disk structures of MS-VHDX (little-endian; GUIDs in Microsoft's mixed-endian layout;
//! CRC-32C with the checksum field zeroed).
//!
//! ```text
//! 0        64K      128K     192K     256K          1M ...
//! | ident  | head 1 | head 2 | regi 1 | regi 2 | ... | log | metadata | BAT | blocks ... |
//! ```
//! Everything past the first MiB is placed by the region table and the header's log fields, at
//! 1 MiB alignment.

use core::mem::offset_of;
use uuid::Uuid;
use zerocopy::byteorder::little_endian::{U16, U32, U64};
use zerocopy::{FromBytes, FromZeros, Immutable, IntoBytes, KnownLayout, Unaligned};

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

/// A GUID as stored: Microsoft's mixed-endian layout (first three fields little-endian).
#[repr(transparent)]
#[derive(
    Debug,
    Clone,
    Copy,
    PartialEq,
    Eq,
    Default,
    FromBytes,
    IntoBytes,
    KnownLayout,
    Immutable,
    Unaligned,
)]
pub struct Guid(pub [u8; 16]);

const _: () = assert!(size_of::<Guid>() == 16);

impl Guid {
    /// Encodes `id`.
    pub fn new(id: Uuid) -> Guid {
        Guid(id.to_bytes_le())
    }
    /// Decodes the stored bytes.
    pub fn get(self) -> Uuid {
        Uuid::from_bytes_le(self.0)
    }
}

impl From<Uuid> for Guid {
    fn from(id: Uuid) -> Guid {
        Guid::new(id)
    }
}

/// Decodes a `T` from the start of `b`, zero-filling whatever `b` lacks (callers check lengths
/// first; a short buffer then decodes as zeros rather than panicking).
pub fn read_padded<T: FromBytes + IntoBytes>(b: &[u8]) -> T {
    let mut v = T::new_zeroed();
    let dst = v.as_mut_bytes();
    let n = dst.len().min(b.len());
    dst[..n].copy_from_slice(&b[..n]);
    v
}

/// Offset of the checksum field shared by the header, the region table header and the log
/// entry header.
pub const CHECKSUM_OFFSET: usize = 4;

/// CRC-32C of `bytes` with the 4-byte field at `at` taken as zero.
pub fn crc_with_zeroed(bytes: &[u8], at: usize) -> u32 {
    let c = crc32c::crc32c(&bytes[..at]);
    let c = crc32c::crc32c_append(c, &[0; 4]);
    crc32c::crc32c_append(c, &bytes[at + 4..])
}

/// Writes the CRC-32C of `bytes` into the field at `at`.
pub fn seal(bytes: &mut [u8], at: usize) {
    let c = crc_with_zeroed(bytes, at);
    bytes[at..at + 4].copy_from_slice(U32::new(c).as_bytes());
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

/// The file type identifier at offset 0 as stored (the rest of its 64 KiB is reserved).
#[repr(C)]
#[derive(Debug, Clone, Copy, FromBytes, IntoBytes, KnownLayout, Immutable, Unaligned)]
pub struct FileIdentifier {
    /// `vhdxfile`.
    pub signature: [u8; 8],
    /// Creator, UTF-16LE, NUL-terminated unless full.
    pub creator: [U16; 256],
}

/// Bytes of the file type identifier that carry fields.
pub const IDENT_SIZE: usize = 520;
const _: () = assert!(size_of::<FileIdentifier>() == IDENT_SIZE);
const _: () = assert!(offset_of!(FileIdentifier, creator) == 8);

impl FileIdentifier {
    /// The identifier vhdkit writes, creator `creator` (truncated to 256 UTF-16 units).
    pub fn new(creator: &str) -> FileIdentifier {
        let mut id = FileIdentifier::new_zeroed();
        id.signature = *IDENT_SIGNATURE;
        for (slot, u) in id.creator.iter_mut().zip(creator.encode_utf16()) {
            *slot = u.into();
        }
        id
    }

    /// The creator text (lossy, up to the first NUL).
    pub fn creator(&self) -> String {
        from_utf16le(self.creator.as_bytes())
    }
}

/// The 4 KiB header exactly as stored.
#[repr(C)]
#[derive(Debug, Clone, Copy, FromBytes, IntoBytes, KnownLayout, Immutable, Unaligned)]
pub struct RawHeader {
    /// `head`.
    pub signature: U32,
    /// CRC-32C over the 4 KiB with this field zero.
    pub checksum: U32,
    /// Larger = newer.
    pub sequence_number: U64,
    /// Changes before the first write of each session.
    pub file_write_guid: Guid,
    /// Changes before the first user-visible data change.
    pub data_write_guid: Guid,
    /// Non-zero: the log holds entries with this GUID to replay.
    pub log_guid: Guid,
    /// 0.
    pub log_version: U16,
    /// 1.
    pub version: U16,
    /// Log size, 1 MiB multiple.
    pub log_length: U32,
    /// Log offset, 1 MiB multiple.
    pub log_offset: U64,
    /// Reserved, zero.
    pub reserved: [u8; 4016],
}

const _: () = assert!(size_of::<RawHeader>() == HEADER_SIZE);
const _: () = assert!(offset_of!(RawHeader, checksum) == CHECKSUM_OFFSET);
const _: () = assert!(offset_of!(RawHeader, log_guid) == 48);
const _: () = assert!(offset_of!(RawHeader, log_length) == 68);
const _: () = assert!(offset_of!(RawHeader, log_offset) == 72);

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
    /// Decodes 4 KiB (a shorter buffer decodes as if zero-filled).
    pub fn parse(b: &[u8]) -> Header {
        Header::from_raw(&read_padded(b))
    }

    /// Decodes the typed on-disk form.
    pub fn from_raw(r: &RawHeader) -> Header {
        Header {
            signature: r.signature.get(),
            checksum: r.checksum.get(),
            sequence_number: r.sequence_number.get(),
            file_write_guid: r.file_write_guid.get(),
            data_write_guid: r.data_write_guid.get(),
            log_guid: r.log_guid.get(),
            log_version: r.log_version.get(),
            version: r.version.get(),
            log_length: r.log_length.get(),
            log_offset: r.log_offset.get(),
        }
    }

    /// The typed on-disk form with the `head` signature and a zero checksum.
    pub fn to_raw(&self) -> RawHeader {
        let mut r = RawHeader::new_zeroed();
        r.signature = HEADER_SIGNATURE.into();
        r.sequence_number = self.sequence_number.into();
        r.file_write_guid = self.file_write_guid.into();
        r.data_write_guid = self.data_write_guid.into();
        r.log_guid = self.log_guid.into();
        r.log_version = self.log_version.into();
        r.version = self.version.into();
        r.log_length = self.log_length.into();
        r.log_offset = self.log_offset.into();
        r
    }

    /// Encodes with a fresh checksum.
    pub fn to_bytes(&self) -> Vec<u8> {
        let mut b = self.to_raw().as_bytes().to_vec();
        seal(&mut b, CHECKSUM_OFFSET);
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

/// Most entries a region table or the metadata table can hold.
pub const MAX_TABLE_ENTRIES: usize = 2047;

/// Region table header as stored.
#[repr(C)]
#[derive(Debug, Clone, Copy, FromBytes, IntoBytes, KnownLayout, Immutable, Unaligned)]
pub struct RegionTableHeader {
    /// `regi`.
    pub signature: U32,
    /// CRC-32C over the 64 KiB table with this field zero.
    pub checksum: U32,
    /// Number of entries in use (at most 2047).
    pub entry_count: U32,
    /// Reserved, zero.
    pub reserved: U32,
}

const _: () = assert!(size_of::<RegionTableHeader>() == 16);
const _: () = assert!(offset_of!(RegionTableHeader, checksum) == CHECKSUM_OFFSET);

/// Region table entry as stored.
#[repr(C)]
#[derive(Debug, Clone, Copy, FromBytes, IntoBytes, KnownLayout, Immutable, Unaligned)]
pub struct RegionTableEntry {
    /// Region GUID.
    pub guid: Guid,
    /// File offset, 1 MiB multiple.
    pub file_offset: U64,
    /// Length, 1 MiB multiple.
    pub length: U32,
    /// Bit 0: required.
    pub flags: U32,
}

const _: () = assert!(size_of::<RegionTableEntry>() == 32);

/// The whole 64 KiB region table as stored.
#[repr(C)]
#[derive(FromBytes, IntoBytes, KnownLayout, Immutable, Unaligned)]
pub struct RawRegionTable {
    /// Signature, checksum, count.
    pub header: RegionTableHeader,
    /// Entries; only the first `entry_count` are meaningful.
    pub entries: [RegionTableEntry; MAX_TABLE_ENTRIES],
    /// Reserved, zero.
    pub reserved: [u8; 16],
}

const _: () = assert!(size_of::<RawRegionTable>() == TABLE_SIZE);
const _: () = assert!(offset_of!(RawRegionTable, entries) == 16);

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
    /// Decodes a 64 KiB table. `None` if the entry count is impossible (or `b` is shorter than
    /// a table).
    pub fn parse(b: &[u8]) -> Option<RegionTable> {
        let (t, _) = RawRegionTable::ref_from_prefix(b).ok()?;
        let count = t.header.entry_count.get() as usize;
        let entries = t.entries.get(..count)?;
        Some(RegionTable {
            signature: t.header.signature.get(),
            checksum: t.header.checksum.get(),
            entries: entries
                .iter()
                .map(|e| RegionEntry {
                    guid: e.guid.get(),
                    file_offset: e.file_offset.get(),
                    length: e.length.get(),
                    required: e.flags.get() & 1 != 0,
                })
                .collect(),
        })
    }

    /// Encodes 64 KiB with a fresh checksum (at most 2047 entries are kept).
    pub fn to_bytes(&self) -> Vec<u8> {
        let mut b = vec![0u8; TABLE_SIZE];
        if let Ok(t) = RawRegionTable::mut_from_bytes(&mut b) {
            let mut count = 0u32;
            for (slot, e) in t.entries.iter_mut().zip(&self.entries) {
                *slot = RegionTableEntry {
                    guid: e.guid.into(),
                    file_offset: e.file_offset.into(),
                    length: e.length.into(),
                    flags: (e.required as u32).into(),
                };
                count += 1;
            }
            t.header.signature = REGION_SIGNATURE.into();
            t.header.entry_count = count.into();
        }
        seal(&mut b, CHECKSUM_OFFSET);
        b
    }
}

/// Metadata table header as stored.
#[repr(C)]
#[derive(Debug, Clone, Copy, FromBytes, IntoBytes, KnownLayout, Immutable, Unaligned)]
pub struct MetadataTableHeader {
    /// `metadata`.
    pub signature: [u8; 8],
    /// Reserved, zero.
    pub reserved: U16,
    /// Number of entries in use (at most 2047).
    pub entry_count: U16,
    /// Reserved, zero.
    pub reserved2: [u8; 20],
}

const _: () = assert!(size_of::<MetadataTableHeader>() == 32);
const _: () = assert!(offset_of!(MetadataTableHeader, entry_count) == 10);

/// Metadata table entry as stored.
#[repr(C)]
#[derive(Debug, Clone, Copy, FromBytes, IntoBytes, KnownLayout, Immutable, Unaligned)]
pub struct MetadataTableEntry {
    /// Item GUID.
    pub item_id: Guid,
    /// Offset from the start of the metadata region.
    pub offset: U32,
    /// Length in bytes.
    pub length: U32,
    /// Bit 0 IsUser, bit 1 IsVirtualDisk, bit 2 IsRequired.
    pub flags: U32,
    /// Reserved, zero.
    pub reserved: U32,
}

const _: () = assert!(size_of::<MetadataTableEntry>() == 32);
const _: () = assert!(offset_of!(MetadataTableEntry, offset) == 16);

/// The whole 64 KiB metadata table as stored.
#[repr(C)]
#[derive(FromBytes, IntoBytes, KnownLayout, Immutable, Unaligned)]
pub struct RawMetadataTable {
    /// Signature and count.
    pub header: MetadataTableHeader,
    /// Entries; only the first `entry_count` are meaningful.
    pub entries: [MetadataTableEntry; MAX_TABLE_ENTRIES],
}

const _: () = assert!(size_of::<RawMetadataTable>() == TABLE_SIZE);

/// Offset of metadata table entry `i` from the start of the metadata region.
pub const fn metadata_entry_offset(i: usize) -> u64 {
    (offset_of!(RawMetadataTable, entries) + i * size_of::<MetadataTableEntry>()) as u64
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

/// Decodes the metadata table (64 KiB): `None` if the signature is wrong, the count impossible
/// or `b` shorter than a table.
pub fn parse_metadata_table(b: &[u8]) -> Option<Vec<MetadataEntry>> {
    let (t, _) = RawMetadataTable::ref_from_prefix(b).ok()?;
    if &t.header.signature != METADATA_SIGNATURE {
        return None;
    }
    let entries = t.entries.get(..t.header.entry_count.get() as usize)?;
    Some(
        entries
            .iter()
            .map(|e| {
                let flags = e.flags.get();
                MetadataEntry {
                    item_id: e.item_id.get(),
                    offset: e.offset.get(),
                    length: e.length.get(),
                    is_user: flags & 1 != 0,
                    is_virtual_disk: flags & 2 != 0,
                    is_required: flags & 4 != 0,
                }
            })
            .collect(),
    )
}

/// Encodes the metadata table (at most 2047 entries are kept).
pub fn metadata_table_bytes(entries: &[MetadataEntry]) -> Vec<u8> {
    let mut b = vec![0u8; TABLE_SIZE];
    if let Ok(t) = RawMetadataTable::mut_from_bytes(&mut b) {
        let mut count = 0u16;
        for (slot, e) in t.entries.iter_mut().zip(entries) {
            let flags =
                e.is_user as u32 | (e.is_virtual_disk as u32) << 1 | (e.is_required as u32) << 2;
            *slot = MetadataTableEntry {
                item_id: e.item_id.into(),
                offset: e.offset.into(),
                length: e.length.into(),
                flags: flags.into(),
                reserved: U32::ZERO,
            };
            count += 1;
        }
        t.header.signature = *METADATA_SIGNATURE;
        t.header.entry_count = count.into();
    }
    b
}

/// The File Parameters metadata item as stored.
#[repr(C)]
#[derive(Debug, Clone, Copy, FromBytes, IntoBytes, KnownLayout, Immutable, Unaligned)]
pub struct FileParameters {
    /// Block size in bytes.
    pub block_size: U32,
    /// Bit 0 LeaveBlocksAllocated, bit 1 HasParent.
    pub flags: U32,
}

const _: () = assert!(size_of::<FileParameters>() == 8);

/// Parent locator item header as stored.
#[repr(C)]
#[derive(Debug, Clone, Copy, FromBytes, IntoBytes, KnownLayout, Immutable, Unaligned)]
pub struct ParentLocatorHeader {
    /// Locator type GUID.
    pub locator_type: Guid,
    /// Reserved, zero.
    pub reserved: U16,
    /// Number of key/value entries that follow.
    pub key_value_count: U16,
}

const _: () = assert!(size_of::<ParentLocatorHeader>() == 20);

/// Parent locator key/value entry as stored (offsets from the start of the item).
#[repr(C)]
#[derive(Debug, Clone, Copy, FromBytes, IntoBytes, KnownLayout, Immutable, Unaligned)]
pub struct ParentLocatorEntry {
    /// Offset of the UTF-16LE key.
    pub key_offset: U32,
    /// Offset of the UTF-16LE value.
    pub value_offset: U32,
    /// Key length in bytes.
    pub key_length: U16,
    /// Value length in bytes.
    pub value_length: U16,
}

const _: () = assert!(size_of::<ParentLocatorEntry>() == 12);

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
        let Ok((h, rest)) = ParentLocatorHeader::ref_from_prefix(b) else {
            return Err(format!(
                "item is {} bytes, smaller than its header",
                b.len()
            ));
        };
        let count = h.key_value_count.get() as usize;
        let Ok((kvs, _)) = <[ParentLocatorEntry]>::ref_from_prefix_with_elems(rest, count) else {
            return Err(format!(
                "{count} key/value entries do not fit in {} bytes",
                b.len()
            ));
        };
        let mut entries = Vec::with_capacity(count);
        for (i, kv) in kvs.iter().enumerate() {
            let (ko, vo) = (kv.key_offset.get() as usize, kv.value_offset.get() as usize);
            let (kl, vl) = (kv.key_length.get() as usize, kv.value_length.get() as usize);
            let key = b
                .get(ko..ko + kl)
                .ok_or_else(|| format!("key {i} at {ko}+{kl} outside the item"))?;
            let val = b
                .get(vo..vo + vl)
                .ok_or_else(|| format!("value {i} at {vo}+{vl} outside the item"))?;
            entries.push((from_utf16le(key), from_utf16le(val)));
        }
        Ok(ParentLocator {
            locator_type: h.locator_type.get(),
            entries,
        })
    }

    /// Encodes the item.
    pub fn to_bytes(&self) -> Vec<u8> {
        let header = ParentLocatorHeader {
            locator_type: self.locator_type.into(),
            reserved: U16::ZERO,
            key_value_count: (self.entries.len() as u16).into(),
        };
        let mut table = Vec::with_capacity(self.entries.len());
        let mut data = Vec::new();
        let mut at =
            size_of::<ParentLocatorHeader>() + self.entries.len() * size_of::<ParentLocatorEntry>();
        for (k, v) in &self.entries {
            let (kb, vb) = (utf16le(k), utf16le(v));
            table.push(ParentLocatorEntry {
                key_offset: (at as u32).into(),
                value_offset: ((at + kb.len()) as u32).into(),
                key_length: (kb.len() as u16).into(),
                value_length: (vb.len() as u16).into(),
            });
            at += kb.len() + vb.len();
            data.extend_from_slice(&kb);
            data.extend_from_slice(&vb);
        }
        let mut b = header.as_bytes().to_vec();
        b.extend_from_slice(table.as_bytes());
        b.extend_from_slice(&data);
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

/// Log entry header as stored at the start of an entry's first 4 KiB sector.
#[repr(C)]
#[derive(Debug, Clone, Copy, FromBytes, IntoBytes, KnownLayout, Immutable, Unaligned)]
pub struct LogEntryHeader {
    /// `loge`.
    pub signature: U32,
    /// CRC-32C over the whole entry with this field zero.
    pub checksum: U32,
    /// Entry length in bytes, a 4 KiB multiple.
    pub entry_length: U32,
    /// Log offset of the first entry of this entry's sequence.
    pub tail: U32,
    /// Sequence number, non-zero.
    pub sequence_number: U64,
    /// Number of descriptors that follow.
    pub descriptor_count: U32,
    /// Reserved, zero.
    pub reserved: U32,
    /// Must equal the header's log GUID.
    pub log_guid: Guid,
    /// File size when the entry was written, as far as it was flushed.
    pub flushed_file_offset: U64,
    /// File size the entry's writes need.
    pub last_file_offset: U64,
}

/// Size of the log entry header.
pub const LOG_ENTRY_HEADER_SIZE: usize = 64;
const _: () = assert!(size_of::<LogEntryHeader>() == LOG_ENTRY_HEADER_SIZE);
const _: () = assert!(offset_of!(LogEntryHeader, checksum) == CHECKSUM_OFFSET);
const _: () = assert!(offset_of!(LogEntryHeader, tail) == 12);
const _: () = assert!(offset_of!(LogEntryHeader, log_guid) == 32);

/// Zero descriptor (`zero`) as stored: a range the replay fills with zeros.
#[repr(C)]
#[derive(Debug, Clone, Copy, FromBytes, IntoBytes, KnownLayout, Immutable, Unaligned)]
pub struct ZeroDescriptor {
    /// `zero`.
    pub signature: U32,
    /// Reserved, zero.
    pub reserved: U32,
    /// Bytes to zero, a 4 KiB multiple.
    pub zero_length: U64,
    /// File offset, 4 KiB aligned.
    pub file_offset: U64,
    /// The entry's sequence number.
    pub sequence_number: U64,
}

/// Data descriptor (`desc`) as stored: one 4 KiB page, split with its data sector.
#[repr(C)]
#[derive(Debug, Clone, Copy, FromBytes, IntoBytes, KnownLayout, Immutable, Unaligned)]
pub struct DataDescriptor {
    /// `desc`.
    pub signature: U32,
    /// The page's last 4 bytes.
    pub trailing_bytes: [u8; 4],
    /// The page's first 8 bytes.
    pub leading_bytes: [u8; 8],
    /// File offset, 4 KiB aligned.
    pub file_offset: U64,
    /// The entry's sequence number.
    pub sequence_number: U64,
}

/// Size of a log descriptor of either kind.
pub const LOG_DESCRIPTOR_SIZE: usize = 32;
const _: () = assert!(size_of::<ZeroDescriptor>() == LOG_DESCRIPTOR_SIZE);
const _: () = assert!(size_of::<DataDescriptor>() == LOG_DESCRIPTOR_SIZE);
const _: () =
    assert!(offset_of!(ZeroDescriptor, file_offset) == offset_of!(DataDescriptor, file_offset));
const _: () = assert!(
    offset_of!(ZeroDescriptor, sequence_number) == offset_of!(DataDescriptor, sequence_number)
);

/// Data sector (`data`) as stored: the middle 4084 bytes of a page between the halves of the
/// sequence number.
#[repr(C)]
#[derive(Debug, Clone, Copy, FromBytes, IntoBytes, KnownLayout, Immutable, Unaligned)]
pub struct DataSector {
    /// `data`.
    pub signature: U32,
    /// High 32 bits of the entry's sequence number.
    pub sequence_high: U32,
    /// The page's bytes 8..4092.
    pub data: [u8; 4084],
    /// Low 32 bits of the entry's sequence number.
    pub sequence_low: U32,
}

const _: () = assert!(size_of::<DataSector>() == 4096);

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

/// A BAT entry as stored: a little-endian u64 (decoded as [`BatEntry`]).
pub type RawBatEntry = U64;

const _: () = assert!(size_of::<RawBatEntry>() == 8);

/// Encodes BAT entries as stored on disk.
pub fn bat_bytes(entries: &[BatEntry]) -> Vec<u8> {
    let raw: Vec<RawBatEntry> = entries.iter().map(|e| e.0.into()).collect();
    raw.as_bytes().to_vec()
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
        let b = Guid::new(guids::BAT_REGION).0;
        assert_eq!(b[..4], [0x66, 0x77, 0xC2, 0x2D]);
        assert_eq!(b[8..10], [0x9D, 0x64]);
    }
}
