//! Parent locators of differencing images: the 24-byte entries in the dynamic header and the
//! path data they point to, and the order in which candidate parent paths are tried.
//!
//! Platform codes: `W2ru` (path relative to the child, UTF-16LE), `W2ku` (absolute path,
//! UTF-16LE), `Wi2r`/`Wi2k` (deprecated relative/absolute, ANSI), `MacX` (file URL, UTF-8) and
//! `Mac ` (an alias blob, ignored). The spec says the data-space field counts sectors, Windows
//! and Virtual PC write bytes: readers use only the data length, which is in bytes either way.

use core::mem::offset_of;
use std::path::PathBuf;
use zerocopy::byteorder::big_endian::{U32, U64};
use zerocopy::{FromBytes, Immutable, IntoBytes, KnownLayout, Unaligned};

/// Number of locator entries in the header.
pub const LOCATOR_COUNT: usize = 8;
/// Size of one entry.
pub const LOCATOR_ENTRY_SIZE: usize = 24;
/// Largest locator payload read (Windows reserves 64 KiB for W2ru).
pub const MAX_LOCATOR_DATA: u32 = 64 * 1024;

/// Platform code of a locator entry.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct PlatformCode(pub u32);

impl PlatformCode {
    /// Unused entry.
    pub const NONE: PlatformCode = PlatformCode(0);
    /// Relative path, UTF-16LE.
    pub const W2RU: PlatformCode = PlatformCode(0x5732_7275);
    /// Absolute path, UTF-16LE.
    pub const W2KU: PlatformCode = PlatformCode(0x5732_6B75);
    /// Deprecated relative path, ANSI.
    pub const WI2R: PlatformCode = PlatformCode(0x5769_3272);
    /// Deprecated absolute path, ANSI.
    pub const WI2K: PlatformCode = PlatformCode(0x5769_326B);
    /// Mac OS alias blob.
    pub const MAC: PlatformCode = PlatformCode(0x4D61_6320);
    /// File URL, UTF-8.
    pub const MACX: PlatformCode = PlatformCode(0x4D61_6358);

    /// Four-character name, for messages.
    pub fn name(self) -> String {
        self.0
            .to_be_bytes()
            .iter()
            .map(|&c| if c.is_ascii_graphic() { c as char } else { '?' })
            .collect()
    }
}

/// One parent locator entry exactly as stored in the dynamic header (big-endian).
#[repr(C)]
#[derive(Debug, Clone, Copy, FromBytes, IntoBytes, KnownLayout, Immutable, Unaligned)]
pub struct RawLocatorEntry {
    /// Platform code (`W2ru`, `W2ku`, ...).
    pub platform_code: U32,
    /// Space reserved for the data (bytes in Windows files, sectors per the spec).
    pub platform_data_space: U32,
    /// Length of the data in bytes.
    pub platform_data_length: U32,
    /// Reserved, zero.
    pub reserved: U32,
    /// Absolute file offset of the data.
    pub platform_data_offset: U64,
}

const _: () = assert!(size_of::<RawLocatorEntry>() == LOCATOR_ENTRY_SIZE);
const _: () = assert!(offset_of!(RawLocatorEntry, platform_data_length) == 8);
const _: () = assert!(offset_of!(RawLocatorEntry, platform_data_offset) == 16);

/// One 24-byte parent locator entry.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct LocatorEntry {
    /// Platform code.
    pub code: PlatformCode,
    /// Space reserved for the data (bytes in Windows files, sectors per the spec).
    pub data_space: u32,
    /// Length of the data in bytes.
    pub data_length: u32,
    /// Reserved, zero.
    pub reserved: u32,
    /// Absolute file offset of the data.
    pub data_offset: u64,
}

impl LocatorEntry {
    /// Decodes 24 bytes.
    pub fn parse(b: &[u8; LOCATOR_ENTRY_SIZE]) -> LocatorEntry {
        let raw: RawLocatorEntry = zerocopy::transmute!(*b);
        LocatorEntry::from_raw(&raw)
    }

    /// Decodes the typed on-disk form.
    pub fn from_raw(r: &RawLocatorEntry) -> LocatorEntry {
        LocatorEntry {
            code: PlatformCode(r.platform_code.get()),
            data_space: r.platform_data_space.get(),
            data_length: r.platform_data_length.get(),
            reserved: r.reserved.get(),
            data_offset: r.platform_data_offset.get(),
        }
    }

    /// The typed on-disk form.
    pub fn to_raw(&self) -> RawLocatorEntry {
        RawLocatorEntry {
            platform_code: self.code.0.into(),
            platform_data_space: self.data_space.into(),
            platform_data_length: self.data_length.into(),
            reserved: self.reserved.into(),
            platform_data_offset: self.data_offset.into(),
        }
    }

    /// Encodes 24 bytes.
    pub fn to_bytes(&self) -> [u8; LOCATOR_ENTRY_SIZE] {
        zerocopy::transmute!(self.to_raw())
    }

    /// Whether the entry describes a path we can decode.
    pub fn is_path(&self) -> bool {
        matches!(
            self.code,
            PlatformCode::W2RU
                | PlatformCode::W2KU
                | PlatformCode::WI2R
                | PlatformCode::WI2K
                | PlatformCode::MACX
        ) && self.data_length > 0
    }

    /// Decodes the locator data into a path string (no mapping applied).
    pub fn decode(&self, data: &[u8]) -> Option<String> {
        let s = match self.code {
            PlatformCode::W2RU | PlatformCode::W2KU => {
                let units: Vec<u16> = data
                    .chunks_exact(2)
                    .map(|c| u16::from_le_bytes([c[0], c[1]]))
                    .take_while(|&u| u != 0)
                    .collect();
                String::from_utf16_lossy(&units)
            }
            PlatformCode::WI2R | PlatformCode::WI2K => data
                .iter()
                .take_while(|&&c| c != 0)
                .map(|&c| c as char)
                .collect(),
            PlatformCode::MACX => {
                let text = String::from_utf8_lossy(data)
                    .trim_end_matches('\0')
                    .to_string();
                let rest = text.strip_prefix("file://").unwrap_or(&text);
                // "file://localhost/path" or "file:///path"
                let rest = rest.strip_prefix("localhost").unwrap_or(rest);
                rest.to_string()
            }
            _ => return None,
        };
        (!s.is_empty()).then_some(s)
    }

    /// Whether the path is relative to the child's directory.
    pub fn is_relative(&self) -> bool {
        matches!(self.code, PlatformCode::W2RU | PlatformCode::WI2R)
    }
}

/// Maps a Windows-style path to a host path: backslashes become slashes and a leading `.\` is
/// dropped; drive letters are kept as written (a `C:/...` path simply won't exist on Linux).
pub fn host_path(windows: &str) -> PathBuf {
    let s = windows.replace('\\', "/");
    let s = s.strip_prefix("./").unwrap_or(&s);
    PathBuf::from(s)
}

/// The last component of a Windows or Unix path.
pub fn base_name(path: &str) -> &str {
    path.rsplit(['\\', '/']).next().unwrap_or(path)
}

pub use image_io::format::relative_windows_path;

/// UTF-16LE encoding of a path string, as W2ru/W2ku store it.
pub fn encode_utf16le(s: &str) -> Vec<u8> {
    s.encode_utf16().flat_map(|u| u.to_le_bytes()).collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::path::Path;

    #[test]
    fn entry_round_trips() {
        let e = LocatorEntry {
            code: PlatformCode::W2KU,
            data_space: 4096,
            data_length: 66,
            reserved: 0,
            data_offset: 0x1000,
        };
        assert_eq!(LocatorEntry::parse(&e.to_bytes()), e);
        assert_eq!(&e.to_bytes()[0..4], b"W2ku");
    }

    #[test]
    fn w2ru_data_is_utf16_little_endian() {
        let e = LocatorEntry {
            code: PlatformCode::W2RU,
            data_length: 22,
            ..Default::default()
        };
        let data = encode_utf16le(".\\win8.vhd");
        assert_eq!(data[0..2], [b'.', 0]);
        assert_eq!(e.decode(&data).as_deref(), Some(".\\win8.vhd"));
        assert_eq!(host_path(".\\win8.vhd"), PathBuf::from("win8.vhd"));
    }

    #[test]
    fn relative_paths_use_backslashes_and_dot_prefix() {
        assert_eq!(
            relative_windows_path(Path::new("/a/b"), Path::new("/a/b/p.vhd")),
            ".\\p.vhd"
        );
        assert_eq!(
            relative_windows_path(Path::new("/a/b"), Path::new("/a/c/p.vhd")),
            "..\\c\\p.vhd"
        );
    }

    #[test]
    fn base_name_handles_both_separators() {
        assert_eq!(base_name("C:\\Users\\x\\win8.vhd"), "win8.vhd");
        assert_eq!(base_name("/tmp/p.vhd"), "p.vhd");
        assert_eq!(base_name("p.vhd"), "p.vhd");
    }

    #[test]
    fn macx_file_url_becomes_a_path() {
        let e = LocatorEntry {
            code: PlatformCode::MACX,
            data_length: 30,
            ..Default::default()
        };
        assert_eq!(
            e.decode(b"file://localhost/Users/a/p.vhd").as_deref(),
            Some("/Users/a/p.vhd")
        );
    }
}
