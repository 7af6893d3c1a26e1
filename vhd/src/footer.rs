//! The 512-byte hard disk footer (VHD spec 2006, "Hard Disk Footer Format"). Big-endian.
//!
//! ```text
//!  0 cookie "conectix"   8 features       12 format version  16 data offset (u64)
//! 24 timestamp          28 creator app    32 creator version 36 creator host OS
//! 40 original size(u64) 48 current size   56 geometry C/H/S  60 disk type
//! 64 checksum           68 unique id (16) 84 saved state     85..512 reserved (zero)
//! ```
//!
//! Fixed images keep the footer only at the end of the file; dynamic and differencing images
//! also keep an identical copy at offset 0. Images older than Virtual PC 2004 have a 511-byte
//! footer (no saved-state byte at the end of the reserved area); [`Footer::parse`] accepts it
//! because the checksum covers exactly the bytes present.

use crate::geometry::Geometry;
use core::mem::offset_of;
use std::fmt;
use uuid::Uuid;
use zerocopy::byteorder::big_endian::{U16, U32, U64};
use zerocopy::{FromBytes, Immutable, IntoBytes, KnownLayout, Unaligned};

/// Size of the footer on disk.
pub const FOOTER_SIZE: usize = 512;
/// Cookie at the start of the footer.
pub const COOKIE: &[u8; 8] = b"conectix";
/// Seconds between the Unix epoch and the VHD epoch (2000-01-01 00:00:00 UTC).
pub const VHD_EPOCH_OFFSET: u64 = 946_684_800;
/// Features: bit 1 is reserved and must always be set.
pub const FEATURES_RESERVED: u32 = 0x0000_0002;
/// Format version 1.0.
pub const FORMAT_VERSION: u32 = 0x0001_0000;
/// Data offset of fixed disks: all 64 bits set (Microsoft tools expect all ones).
pub const NO_DATA_OFFSET: u64 = u64::MAX;
/// Host OS code "Wi2k".
pub const HOST_WINDOWS: u32 = 0x5769_326B;
/// Largest virtual size accepted: 2040 GiB, the Hyper-V and qemu limit for VHD.
pub const MAX_VIRTUAL_SIZE: u64 = 2040 << 30;

/// Creator application written by vhdkit.
pub const VHDKIT_CREATOR: [u8; 4] = *b"vhdk";

/// Footer disk type field.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DiskType {
    /// Type 2: raw data followed by the footer.
    Fixed,
    /// Type 3: sparse, blocks allocated on first write.
    Dynamic,
    /// Type 4: sparse, unallocated sectors come from a parent image.
    Differencing,
}

impl DiskType {
    /// Decodes the footer field.
    pub fn from_code(code: u32) -> Option<DiskType> {
        match code {
            2 => Some(DiskType::Fixed),
            3 => Some(DiskType::Dynamic),
            4 => Some(DiskType::Differencing),
            _ => None,
        }
    }

    /// The footer field value.
    pub fn code(self) -> u32 {
        match self {
            DiskType::Fixed => 2,
            DiskType::Dynamic => 3,
            DiskType::Differencing => 4,
        }
    }
}

impl fmt::Display for DiskType {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            DiskType::Fixed => "fixed",
            DiskType::Dynamic => "dynamic",
            DiskType::Differencing => "differencing",
        })
    }
}

/// A decoded footer. Parsing never fails on field values: [`Footer::problems`] lists what is
/// wrong, so `check` can report everything and `open` can refuse.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Footer {
    /// Bytes 0..8, `conectix` when valid.
    pub cookie: [u8; 8],
    /// Feature bits (bit 0 temporary, bit 1 reserved = 1).
    pub features: u32,
    /// Format version, 0x00010000.
    pub format_version: u32,
    /// Absolute offset of the dynamic header; all ones for fixed disks.
    pub data_offset: u64,
    /// Seconds since 2000-01-01 UTC.
    pub timestamp: u32,
    /// Creator application, four characters (`win `, `vpc `, `qemu`, `vbox`, `vhdk`, ...).
    pub creator_app: [u8; 4],
    /// Creator version, major << 16 | minor.
    pub creator_version: u32,
    /// Creator host OS (`Wi2k`, `Mac `, or 0).
    pub creator_host_os: u32,
    /// Size at creation time.
    pub original_size: u64,
    /// Current size of the virtual disk in bytes.
    pub current_size: u64,
    /// CHS geometry.
    pub geometry: Geometry,
    /// Raw disk type field.
    pub disk_type_code: u32,
    /// Checksum as stored.
    pub checksum: u32,
    /// Unique id of this image (the identity children refer to).
    pub uuid: Uuid,
    /// Saved-state flag.
    pub saved_state: u8,
}

/// One's complement of the byte sum of `bytes`, skipping the 4-byte field at `skip`.
pub fn ones_complement_checksum(bytes: &[u8], skip: usize) -> u32 {
    let sum = bytes
        .iter()
        .enumerate()
        .filter(|(i, _)| !(skip..skip + 4).contains(i))
        .fold(0u32, |acc, (_, &b)| acc.wrapping_add(b as u32));
    !sum
}

/// The footer exactly as stored: big-endian fields at the spec's offsets.
#[repr(C)]
#[derive(Debug, Clone, Copy, FromBytes, IntoBytes, KnownLayout, Immutable, Unaligned)]
pub struct RawFooter {
    /// `conectix` when valid.
    pub cookie: [u8; 8],
    /// Feature bits (bit 0 temporary, bit 1 reserved = 1).
    pub features: U32,
    /// Format version, 0x00010000.
    pub format_version: U32,
    /// Absolute offset of the dynamic header; all ones for fixed disks.
    pub data_offset: U64,
    /// Seconds since 2000-01-01 UTC.
    pub timestamp: U32,
    /// Creator application, four characters.
    pub creator_app: [u8; 4],
    /// Creator version, major << 16 | minor.
    pub creator_version: U32,
    /// Creator host OS.
    pub creator_host_os: U32,
    /// Size at creation time.
    pub original_size: U64,
    /// Current size of the virtual disk in bytes.
    pub current_size: U64,
    /// CHS cylinders.
    pub cylinders: U16,
    /// CHS heads.
    pub heads: u8,
    /// CHS sectors per track.
    pub sectors_per_track: u8,
    /// Disk type (2 fixed, 3 dynamic, 4 differencing).
    pub disk_type: U32,
    /// One's complement of the byte sum of the footer without this field.
    pub checksum: U32,
    /// Unique id of this image (RFC 4122 byte order, as stored).
    pub unique_id: [u8; 16],
    /// Saved-state flag (absent from the legacy 511-byte footer).
    pub saved_state: u8,
    /// Reserved, zero.
    pub reserved: [u8; 427],
}

const _: () = assert!(size_of::<RawFooter>() == FOOTER_SIZE);
const _: () = assert!(offset_of!(RawFooter, data_offset) == 16);
const _: () = assert!(offset_of!(RawFooter, current_size) == 48);
const _: () = assert!(offset_of!(RawFooter, cylinders) == 56);
const _: () = assert!(offset_of!(RawFooter, disk_type) == 60);
const _: () = assert!(offset_of!(RawFooter, checksum) == 64);
const _: () = assert!(offset_of!(RawFooter, unique_id) == 68);
const _: () = assert!(offset_of!(RawFooter, saved_state) == 84);

/// Offset of the checksum field in the footer.
pub const FOOTER_CHECKSUM_OFFSET: usize = offset_of!(RawFooter, checksum);

impl Footer {
    /// Decodes a footer from 512 bytes (or 511 for the legacy layout, zero-padded by the caller).
    pub fn parse(b: &[u8; FOOTER_SIZE]) -> Footer {
        let raw: RawFooter = zerocopy::transmute!(*b);
        Footer::from_raw(&raw)
    }

    /// Decodes the typed on-disk form.
    pub fn from_raw(r: &RawFooter) -> Footer {
        Footer {
            cookie: r.cookie,
            features: r.features.get(),
            format_version: r.format_version.get(),
            data_offset: r.data_offset.get(),
            timestamp: r.timestamp.get(),
            creator_app: r.creator_app,
            creator_version: r.creator_version.get(),
            creator_host_os: r.creator_host_os.get(),
            original_size: r.original_size.get(),
            current_size: r.current_size.get(),
            geometry: Geometry {
                cylinders: r.cylinders.get(),
                heads: r.heads,
                sectors_per_track: r.sectors_per_track,
            },
            disk_type_code: r.disk_type.get(),
            checksum: r.checksum.get(),
            uuid: Uuid::from_bytes(r.unique_id),
            saved_state: r.saved_state,
        }
    }

    /// The typed on-disk form, with the `checksum` field as stored here (not recomputed) and
    /// the reserved bytes zero.
    pub fn to_raw(&self) -> RawFooter {
        RawFooter {
            cookie: self.cookie,
            features: self.features.into(),
            format_version: self.format_version.into(),
            data_offset: self.data_offset.into(),
            timestamp: self.timestamp.into(),
            creator_app: self.creator_app,
            creator_version: self.creator_version.into(),
            creator_host_os: self.creator_host_os.into(),
            original_size: self.original_size.into(),
            current_size: self.current_size.into(),
            cylinders: self.geometry.cylinders.into(),
            heads: self.geometry.heads,
            sectors_per_track: self.geometry.sectors_per_track,
            disk_type: self.disk_type_code.into(),
            checksum: self.checksum.into(),
            unique_id: *self.uuid.as_bytes(),
            saved_state: self.saved_state,
            reserved: [0; 427],
        }
    }

    /// Encodes the footer, computing a fresh checksum (the `checksum` field is ignored).
    pub fn to_bytes(&self) -> [u8; FOOTER_SIZE] {
        let mut raw = self.to_raw();
        raw.checksum = U32::ZERO;
        raw.checksum = ones_complement_checksum(raw.as_bytes(), FOOTER_CHECKSUM_OFFSET).into();
        zerocopy::transmute!(raw)
    }

    /// Checksum the stored bytes should carry.
    pub fn computed_checksum(raw: &[u8; FOOTER_SIZE]) -> u32 {
        ones_complement_checksum(raw, FOOTER_CHECKSUM_OFFSET)
    }

    /// The disk type, if the field holds a known value.
    pub fn disk_type(&self) -> Option<DiskType> {
        DiskType::from_code(self.disk_type_code)
    }

    /// Structural problems other than the checksum: empty when the footer is usable.
    pub fn problems(&self) -> Vec<String> {
        let mut p = Vec::new();
        if &self.cookie != COOKIE {
            p.push(format!(
                "bad cookie {:?} (expected \"conectix\")",
                String::from_utf8_lossy(&self.cookie)
            ));
            return p;
        }
        if self.format_version >> 16 != 1 {
            p.push(format!(
                "unsupported format version {:#010x}",
                self.format_version
            ));
        }
        match self.disk_type() {
            None => p.push(format!("unknown disk type {}", self.disk_type_code)),
            Some(DiskType::Fixed) => {}
            Some(_) => {
                if self.data_offset == NO_DATA_OFFSET || !self.data_offset.is_multiple_of(512) {
                    p.push(format!("bad dynamic header offset {:#x}", self.data_offset));
                }
            }
        }
        if self.current_size == 0 && self.geometry.sectors() == 0 {
            p.push("virtual size is zero".into());
        }
        if self.virtual_size() > MAX_VIRTUAL_SIZE {
            p.push(format!(
                "virtual size {} exceeds the VHD limit of 2040 GiB",
                self.virtual_size()
            ));
        }
        p
    }

    /// Whether the CHS field is the maximum value, which marks "trust current size".
    pub fn has_max_geometry(&self) -> bool {
        self.geometry.sectors() == Geometry::MAX.sectors()
    }

    /// The size the creator meant the guest to see.
    ///
    /// Virtual PC (`vpc `), Virtual Server (`vs  `) and qemu's default mode (`qemu`) size the
    /// disk by its CHS geometry; every other creator (Hyper-V/Windows `win `, Disk2vhd `d2v\0`,
    /// XenServer `tap\0`, VirtualBox `vbox`, qemu `force_size` `qem2`, vhdkit `vhdk`, ...) means
    /// the current-size field. A maximal geometry always means the current-size field.
    /// (qemu-img reads VirtualBox images at the CHS size and truncates them; we do not.)
    pub fn virtual_size(&self) -> u64 {
        let chs_sized = matches!(&self.creator_app, b"vpc " | b"vs  " | b"qemu");
        if chs_sized && !self.has_max_geometry() && self.geometry.sectors() > 0 {
            self.geometry.bytes()
        } else {
            self.current_size
        }
    }

    /// Creator as text: application and version, e.g. `win 10.0` or `vbox 4.3`.
    pub fn creator(&self) -> String {
        let app: String = self
            .creator_app
            .iter()
            .map(|&c| if c.is_ascii_graphic() { c as char } else { ' ' })
            .collect();
        format!(
            "{} {}.{}",
            app.trim_end(),
            self.creator_version >> 16,
            self.creator_version & 0xffff
        )
    }

    /// Footer vhdkit writes for a new image of `size` bytes.
    ///
    /// Creator `vhdk`; geometry by the spec's algorithm when its CHS product is exactly `size`
    /// (every reader then agrees whatever rule it uses), otherwise the maximal geometry
    /// 65535/16/255, which qemu (7.2 and 10) and libvhdi read as "current size" and which
    /// Hyper-V ignores (it always uses the current size): all three see exactly `size`.
    pub fn new_vhdkit(size: u64, disk_type: DiskType, uuid: Uuid, timestamp: u32) -> Footer {
        let spec = Geometry::for_size(size);
        let geometry = if spec.bytes() == size {
            spec
        } else {
            Geometry::MAX
        };
        Footer {
            cookie: *COOKIE,
            features: FEATURES_RESERVED,
            format_version: FORMAT_VERSION,
            data_offset: match disk_type {
                DiskType::Fixed => NO_DATA_OFFSET,
                _ => 512,
            },
            timestamp,
            creator_app: VHDKIT_CREATOR,
            creator_version: (env!("CARGO_PKG_VERSION_MAJOR").parse::<u32>().unwrap_or(0) << 16)
                | env!("CARGO_PKG_VERSION_MINOR").parse::<u32>().unwrap_or(0),
            creator_host_os: HOST_WINDOWS,
            original_size: size,
            current_size: size,
            geometry,
            disk_type_code: disk_type.code(),
            checksum: 0,
            uuid,
            saved_state: 0,
        }
    }
}

/// Current time as a VHD timestamp (seconds since 2000-01-01 UTC), saturating.
pub fn vhd_timestamp_now() -> u32 {
    let unix = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(VHD_EPOCH_OFFSET);
    unix.saturating_sub(VHD_EPOCH_OFFSET).min(u32::MAX as u64) as u32
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sample() -> Footer {
        Footer::new_vhdkit(40 << 20, DiskType::Dynamic, Uuid::from_u128(0x1234), 7)
    }

    #[test]
    fn encoded_footer_checksum_verifies() {
        let b = sample().to_bytes();
        let f = Footer::parse(&b);
        assert_eq!(f.checksum, Footer::computed_checksum(&b));
        assert!(f.problems().is_empty());
    }

    #[test]
    fn round_trip_keeps_every_field() {
        let f = sample();
        let mut g = Footer::parse(&f.to_bytes());
        g.checksum = 0;
        assert_eq!(f, g);
    }

    #[test]
    fn fields_are_big_endian_at_spec_offsets() {
        let b = sample().to_bytes();
        assert_eq!(&b[0..8], b"conectix");
        assert_eq!(&b[8..12], &[0, 0, 0, 2]);
        assert_eq!(&b[12..16], &[0, 1, 0, 0]);
        assert_eq!(&b[16..24], &512u64.to_be_bytes());
        assert_eq!(&b[48..56], &(40u64 << 20).to_be_bytes());
        assert_eq!(&b[60..64], &[0, 0, 0, 3]);
    }

    #[test]
    fn non_chs_exact_size_gets_max_geometry_and_reads_exactly() {
        let f = Footer::new_vhdkit((1 << 30) + (3 << 20), DiskType::Fixed, Uuid::nil(), 0);
        assert_eq!(f.geometry, Geometry::MAX);
        assert_eq!(f.virtual_size(), (1 << 30) + (3 << 20));
    }

    #[test]
    fn chs_exact_size_keeps_spec_geometry() {
        let size = Geometry::for_size(40 << 20).bytes();
        let f = Footer::new_vhdkit(size, DiskType::Fixed, Uuid::nil(), 0);
        assert_eq!(f.geometry, Geometry::for_size(size));
    }

    #[test]
    fn virtual_pc_images_are_sized_by_geometry_others_by_current_size() {
        let mut f = sample();
        f.geometry = Geometry::for_size(40 << 20);
        f.creator_app = *b"vpc ";
        assert_eq!(f.virtual_size(), 41_909_760);
        f.creator_app = *b"vbox";
        assert_eq!(f.virtual_size(), 40 << 20);
        f.creator_app = *b"win ";
        assert_eq!(f.virtual_size(), 40 << 20);
    }

    #[test]
    fn corrupted_byte_changes_checksum() {
        let mut b = sample().to_bytes();
        b[100] ^= 1;
        assert_ne!(Footer::parse(&b).checksum, Footer::computed_checksum(&b));
    }
}
