//! The 1024-byte dynamic disk header (`cxsparse`), present in dynamic and differencing images at
//! the footer's data offset (0x200 in every known writer). Big-endian.
//!
//! ```text
//!   0 cookie "cxsparse"     8 data offset (unused, all ones)  16 table (BAT) offset (u64)
//!  24 header version       28 max table entries              32 block size
//!  36 checksum             40 parent unique id (16)          56 parent timestamp
//!  60 reserved             64 parent unicode name (512 B, UTF-16 big-endian)
//! 576 8 parent locator entries of 24 bytes                   768..1024 reserved
//! ```

use crate::footer::ones_complement_checksum;
use crate::locator::{LocatorEntry, RawLocatorEntry, LOCATOR_COUNT};
use core::mem::offset_of;
use uuid::Uuid;
use zerocopy::byteorder::big_endian::{U16, U32, U64};
use zerocopy::{FromBytes, FromZeros, Immutable, IntoBytes, KnownLayout, Unaligned};

/// Size of the header on disk.
pub const HEADER_SIZE: usize = 1024;
/// Header cookie.
pub const COOKIE: &[u8; 8] = b"cxsparse";
/// Header version 1.0.
pub const HEADER_VERSION: u32 = 0x0001_0000;
/// Default block size: 2 MiB, what every Windows-made sample uses.
pub const DEFAULT_BLOCK_SIZE: u32 = 2 << 20;
/// UTF-16 units reserved for the parent unicode name.
const NAME_UNITS: usize = 256;

/// The dynamic disk header exactly as stored: big-endian fields at the spec's offsets.
#[repr(C)]
#[derive(Debug, Clone, Copy, FromBytes, IntoBytes, KnownLayout, Immutable, Unaligned)]
pub struct RawDynamicHeader {
    /// `cxsparse` when valid.
    pub cookie: [u8; 8],
    /// Unused; all ones.
    pub data_offset: U64,
    /// Absolute file offset of the block allocation table.
    pub table_offset: U64,
    /// 0x00010000.
    pub header_version: U32,
    /// Number of BAT entries.
    pub max_table_entries: U32,
    /// Bytes of virtual disk per block.
    pub block_size: U32,
    /// One's complement of the byte sum of the header without this field.
    pub checksum: U32,
    /// Unique id of the parent (RFC 4122 byte order, as stored).
    pub parent_unique_id: [u8; 16],
    /// Parent modification time, seconds since 2000.
    pub parent_timestamp: U32,
    /// Reserved, zero.
    pub reserved1: U32,
    /// Parent file name, UTF-16 big-endian, NUL-terminated unless full.
    pub parent_unicode_name: [U16; NAME_UNITS],
    /// The eight parent locator entries.
    pub parent_locators: [RawLocatorEntry; LOCATOR_COUNT],
    /// Reserved, zero.
    pub reserved2: [u8; 256],
}

const _: () = assert!(size_of::<RawDynamicHeader>() == HEADER_SIZE);
const _: () = assert!(offset_of!(RawDynamicHeader, table_offset) == 16);
const _: () = assert!(offset_of!(RawDynamicHeader, checksum) == 36);
const _: () = assert!(offset_of!(RawDynamicHeader, parent_unique_id) == 40);
const _: () = assert!(offset_of!(RawDynamicHeader, parent_unicode_name) == 64);
const _: () = assert!(offset_of!(RawDynamicHeader, parent_locators) == 576);
const _: () = assert!(offset_of!(RawDynamicHeader, reserved2) == 768);

/// Offset of the checksum field in the header.
pub const HEADER_CHECKSUM_OFFSET: usize = offset_of!(RawDynamicHeader, checksum);
/// Offset of the BAT offset field in the header.
pub const TABLE_OFFSET_OFFSET: usize = offset_of!(RawDynamicHeader, table_offset);
/// Offset of the parent unique id in the header.
pub const PARENT_UUID_OFFSET: usize = offset_of!(RawDynamicHeader, parent_unique_id);
/// Offset of the first parent locator entry in the header.
pub const LOCATORS_OFFSET: usize = offset_of!(RawDynamicHeader, parent_locators);

/// A decoded dynamic disk header.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DynamicHeader {
    /// `cxsparse` when valid.
    pub cookie: [u8; 8],
    /// Unused; all ones.
    pub data_offset: u64,
    /// Absolute file offset of the block allocation table.
    pub table_offset: u64,
    /// 0x00010000.
    pub header_version: u32,
    /// Number of BAT entries.
    pub max_table_entries: u32,
    /// Bytes of virtual disk per block (power of two).
    pub block_size: u32,
    /// Checksum as stored.
    pub checksum: u32,
    /// Unique id of the parent (differencing only).
    pub parent_uuid: Uuid,
    /// Parent modification time, seconds since 2000 (Windows writes 0).
    pub parent_timestamp: u32,
    /// Parent file name, decoded from UTF-16 big-endian (lossy on unpaired surrogates).
    pub parent_unicode_name: String,
    /// The eight parent locator entries.
    pub locators: [LocatorEntry; LOCATOR_COUNT],
}

impl DynamicHeader {
    /// Decodes the header. Field validation is in [`DynamicHeader::problems`].
    pub fn parse(b: &[u8; HEADER_SIZE]) -> DynamicHeader {
        let raw: RawDynamicHeader = zerocopy::transmute!(*b);
        DynamicHeader::from_raw(&raw)
    }

    /// Decodes the typed on-disk form.
    pub fn from_raw(r: &RawDynamicHeader) -> DynamicHeader {
        let units: Vec<u16> = r
            .parent_unicode_name
            .iter()
            .map(|u| u.get())
            .take_while(|&u| u != 0)
            .collect();
        DynamicHeader {
            cookie: r.cookie,
            data_offset: r.data_offset.get(),
            table_offset: r.table_offset.get(),
            header_version: r.header_version.get(),
            max_table_entries: r.max_table_entries.get(),
            block_size: r.block_size.get(),
            checksum: r.checksum.get(),
            parent_uuid: Uuid::from_bytes(r.parent_unique_id),
            parent_timestamp: r.parent_timestamp.get(),
            parent_unicode_name: String::from_utf16_lossy(&units),
            locators: r.parent_locators.map(|l| LocatorEntry::from_raw(&l)),
        }
    }

    /// The typed on-disk form, with the `checksum` field as stored here (not recomputed) and
    /// the reserved bytes zero. A parent name longer than 255 UTF-16 units is truncated (the
    /// field holds 256 units including room for a terminator).
    pub fn to_raw(&self) -> RawDynamicHeader {
        let mut r = RawDynamicHeader::new_zeroed();
        r.cookie = self.cookie;
        r.data_offset = self.data_offset.into();
        r.table_offset = self.table_offset.into();
        r.header_version = self.header_version.into();
        r.max_table_entries = self.max_table_entries.into();
        r.block_size = self.block_size.into();
        r.checksum = self.checksum.into();
        r.parent_unique_id = *self.parent_uuid.as_bytes();
        r.parent_timestamp = self.parent_timestamp.into();
        for (slot, u) in r
            .parent_unicode_name
            .iter_mut()
            .zip(self.parent_unicode_name.encode_utf16().take(NAME_UNITS - 1))
        {
            *slot = u.into();
        }
        r.parent_locators = self.locators.map(|l| l.to_raw());
        r
    }

    /// Encodes the header with a fresh checksum (the `checksum` field is ignored). A parent
    /// name longer than 255 UTF-16 units is truncated.
    pub fn to_bytes(&self) -> [u8; HEADER_SIZE] {
        let mut raw = self.to_raw();
        raw.checksum = U32::ZERO;
        raw.checksum = ones_complement_checksum(raw.as_bytes(), HEADER_CHECKSUM_OFFSET).into();
        zerocopy::transmute!(raw)
    }

    /// Checksum the stored bytes should carry.
    pub fn computed_checksum(raw: &[u8; HEADER_SIZE]) -> u32 {
        ones_complement_checksum(raw, HEADER_CHECKSUM_OFFSET)
    }

    /// A header for a new image.
    pub fn new(table_offset: u64, max_table_entries: u32, block_size: u32) -> DynamicHeader {
        DynamicHeader {
            cookie: *COOKIE,
            data_offset: u64::MAX,
            table_offset,
            header_version: HEADER_VERSION,
            max_table_entries,
            block_size,
            checksum: 0,
            parent_uuid: Uuid::nil(),
            parent_timestamp: 0,
            parent_unicode_name: String::new(),
            locators: [LocatorEntry::default(); LOCATOR_COUNT],
        }
    }

    /// Problems with the fields for a disk of `virtual_size` bytes: empty when usable.
    pub fn problems(&self, virtual_size: u64) -> Vec<String> {
        let mut p = Vec::new();
        if &self.cookie != COOKIE {
            p.push(format!(
                "bad cookie {:?} (expected \"cxsparse\")",
                String::from_utf8_lossy(&self.cookie)
            ));
            return p;
        }
        if self.header_version >> 16 != 1 {
            p.push(format!(
                "unsupported header version {:#010x}",
                self.header_version
            ));
        }
        if !self.block_size.is_power_of_two() || self.block_size < 512 {
            p.push(format!(
                "block size {} is not a power of two of at least 512",
                self.block_size
            ));
        } else if (self.max_table_entries as u64) * (self.block_size as u64) < virtual_size {
            p.push(format!(
                "{} BAT entries of {} bytes cover less than the virtual size {}",
                self.max_table_entries, self.block_size, virtual_size
            ));
        }
        if !self.table_offset.is_multiple_of(512) {
            p.push(format!(
                "BAT offset {:#x} is not sector aligned",
                self.table_offset
            ));
        }
        p
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::locator::PlatformCode;

    #[test]
    fn encoded_header_checksum_verifies_and_round_trips() {
        let mut h = DynamicHeader::new(0x600, 20, DEFAULT_BLOCK_SIZE);
        h.parent_unicode_name = "C:\\disks\\parent.vhd".into();
        h.parent_uuid = Uuid::from_u128(42);
        h.locators[0] = LocatorEntry {
            code: PlatformCode::W2RU,
            data_space: 512,
            data_length: 24,
            reserved: 0,
            data_offset: 0x800,
        };
        let b = h.to_bytes();
        let mut g = DynamicHeader::parse(&b);
        assert_eq!(g.checksum, DynamicHeader::computed_checksum(&b));
        g.checksum = 0;
        assert_eq!(g, h);
        assert!(h.problems(40 << 20).is_empty());
    }

    #[test]
    fn parent_name_is_utf16_big_endian() {
        let mut h = DynamicHeader::new(0x600, 1, DEFAULT_BLOCK_SIZE);
        h.parent_unicode_name = "A".into();
        let b = h.to_bytes();
        assert_eq!(&b[64..68], &[0, b'A', 0, 0]);
    }

    #[test]
    fn too_few_entries_for_the_size_is_a_problem() {
        let h = DynamicHeader::new(0x600, 1, DEFAULT_BLOCK_SIZE);
        assert!(!h.problems(4 << 20).is_empty());
    }
}
