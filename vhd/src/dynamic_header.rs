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
use crate::locator::{LocatorEntry, LOCATOR_COUNT, LOCATOR_ENTRY_SIZE};
use uuid::Uuid;

/// Size of the header on disk.
pub const HEADER_SIZE: usize = 1024;
/// Header cookie.
pub const COOKIE: &[u8; 8] = b"cxsparse";
/// Header version 1.0.
pub const HEADER_VERSION: u32 = 0x0001_0000;
/// Default block size: 2 MiB, what every Windows-made sample uses.
pub const DEFAULT_BLOCK_SIZE: u32 = 2 << 20;
/// Offset of the parent unicode name.
const NAME_OFFSET: usize = 64;
/// Bytes reserved for the parent unicode name.
const NAME_BYTES: usize = 512;
/// Offset of the first parent locator entry.
const LOCATORS_OFFSET: usize = 576;

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

fn be32(b: &[u8], at: usize) -> u32 {
    u32::from_be_bytes([b[at], b[at + 1], b[at + 2], b[at + 3]])
}

fn be64(b: &[u8], at: usize) -> u64 {
    let mut a = [0u8; 8];
    a.copy_from_slice(&b[at..at + 8]);
    u64::from_be_bytes(a)
}

impl DynamicHeader {
    /// Decodes the header. Field validation is in [`DynamicHeader::problems`].
    pub fn parse(b: &[u8; HEADER_SIZE]) -> DynamicHeader {
        let mut cookie = [0u8; 8];
        cookie.copy_from_slice(&b[0..8]);
        let mut id = [0u8; 16];
        id.copy_from_slice(&b[40..56]);
        let units: Vec<u16> = b[NAME_OFFSET..NAME_OFFSET + NAME_BYTES]
            .chunks_exact(2)
            .map(|c| u16::from_be_bytes([c[0], c[1]]))
            .take_while(|&u| u != 0)
            .collect();
        let locators = std::array::from_fn(|i| {
            let at = LOCATORS_OFFSET + i * LOCATOR_ENTRY_SIZE;
            LocatorEntry::parse(&b[at..at + LOCATOR_ENTRY_SIZE])
        });
        DynamicHeader {
            cookie,
            data_offset: be64(b, 8),
            table_offset: be64(b, 16),
            header_version: be32(b, 24),
            max_table_entries: be32(b, 28),
            block_size: be32(b, 32),
            checksum: be32(b, 36),
            parent_uuid: Uuid::from_bytes(id),
            parent_timestamp: be32(b, 56),
            parent_unicode_name: String::from_utf16_lossy(&units),
            locators,
        }
    }

    /// Encodes the header with a fresh checksum. A parent name longer than 255 UTF-16 units is
    /// truncated (the field holds 256 units including room for a terminator).
    pub fn to_bytes(&self) -> [u8; HEADER_SIZE] {
        let mut b = [0u8; HEADER_SIZE];
        b[0..8].copy_from_slice(&self.cookie);
        b[8..16].copy_from_slice(&self.data_offset.to_be_bytes());
        b[16..24].copy_from_slice(&self.table_offset.to_be_bytes());
        b[24..28].copy_from_slice(&self.header_version.to_be_bytes());
        b[28..32].copy_from_slice(&self.max_table_entries.to_be_bytes());
        b[32..36].copy_from_slice(&self.block_size.to_be_bytes());
        b[40..56].copy_from_slice(self.parent_uuid.as_bytes());
        b[56..60].copy_from_slice(&self.parent_timestamp.to_be_bytes());
        for (i, u) in self
            .parent_unicode_name
            .encode_utf16()
            .take(NAME_BYTES / 2 - 1)
            .enumerate()
        {
            b[NAME_OFFSET + 2 * i..NAME_OFFSET + 2 * i + 2].copy_from_slice(&u.to_be_bytes());
        }
        for (i, l) in self.locators.iter().enumerate() {
            let at = LOCATORS_OFFSET + i * LOCATOR_ENTRY_SIZE;
            b[at..at + LOCATOR_ENTRY_SIZE].copy_from_slice(&l.to_bytes());
        }
        let sum = ones_complement_checksum(&b, 36);
        b[36..40].copy_from_slice(&sum.to_be_bytes());
        b
    }

    /// Checksum the stored bytes should carry.
    pub fn computed_checksum(raw: &[u8; HEADER_SIZE]) -> u32 {
        ones_complement_checksum(raw, 36)
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
