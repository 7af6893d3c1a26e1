//! The [`Disk`] contract: what every disk (raw file, VHD, differencing chain) promises its users.
//!
//! Byte-addressed, synchronous and positional: there is no cursor. Any offset and length are
//! accepted as long as the range lies inside the disk; sub-sector requests are handled by the
//! implementation (read-modify-write where the format needs whole sectors).
//!
//! | call        | promise                                                                   |
//! |-------------|---------------------------------------------------------------------------|
//! | `read_at`   | fills the whole buffer or fails; a range reaching past the end fails      |
//! | `write_at`  | writes the whole buffer or fails; never changes the size                  |
//! | `flush`     | everything written before it survives a crash                             |
//! | `discard`   | afterwards the range reads as zeros (space may or may not be freed)       |
//! | `map`       | extents covering the range, in order, merged where nothing differs        |
//!
//! A disk opened read-only never writes to any file and fails writes with
//! [`crate::Error::ReadOnly`].

use std::fmt;
use std::path::PathBuf;

use crate::Result;

/// One run of a [`Disk::map`] answer, modelled on `qemu-img map --output=json`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MapExtent {
    /// Start of the run on the virtual disk.
    pub offset: u64,
    /// Length of the run in bytes.
    pub length: u64,
    /// Which layer supplies the run: 0 = the top image, 1 = its parent, ... For runs no layer
    /// has, the depth of the bottom layer.
    pub depth: u32,
    /// The run is stored in a file (at `file_offset` of `file`).
    pub data: bool,
    /// The run is known to read as zeros without looking at the payload.
    pub zero: bool,
    /// Where the run starts in `file` (for data, and for holes of raw files).
    pub file_offset: Option<u64>,
    /// The file holding the run.
    pub file: Option<PathBuf>,
}

impl MapExtent {
    /// Byte just past the run.
    pub fn end(&self) -> u64 {
        self.offset + self.length
    }

    /// True if `next` continues this run with identical properties (so the two can be merged).
    pub fn continues_with(&self, next: &MapExtent) -> bool {
        self.end() == next.offset
            && self.depth == next.depth
            && self.data == next.data
            && self.zero == next.zero
            && self.file == next.file
            && match (self.file_offset, next.file_offset) {
                (None, None) => true,
                (Some(a), Some(b)) => a.checked_add(self.length) == Some(b),
                _ => false,
            }
    }
}

/// Appends `ext` to `out`, merging it into the last run when it continues it.
pub(crate) fn push_merged(out: &mut Vec<MapExtent>, ext: MapExtent) {
    if ext.length == 0 {
        return;
    }
    if let Some(last) = out.last_mut() {
        if last.continues_with(&ext) {
            last.length += ext.length;
            return;
        }
    }
    out.push(ext);
}

/// Container format of a file, as found by content probing.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Format {
    /// A plain file holding the disk bytes.
    Raw,
    /// Microsoft VHD (fixed, dynamic or differencing).
    Vhd,
    /// Microsoft VHDX.
    Vhdx,
}

impl fmt::Display for Format {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Format::Raw => "raw",
            Format::Vhd => "vhd",
            Format::Vhdx => "vhdx",
        })
    }
}

pub use image_io::format::Subformat;

/// Description of one layer of a disk, for `info`-style output.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LayerInfo {
    /// The file, as it was opened.
    pub path: PathBuf,
    /// Container format.
    pub format: Format,
    /// Disk type (`None` for raw files).
    pub subformat: Option<Subformat>,
    /// Size of the virtual disk this layer describes.
    pub virtual_size: u64,
    /// Allocation unit of dynamic and differencing images.
    pub block_size: Option<u32>,
    /// Creator application and version (`"win  10.0"`), for images that record one.
    pub creator: Option<String>,
    /// Identity of the image, for formats that have one.
    pub uuid: Option<uuid::Uuid>,
    /// For differencing images: the UUID the parent must have.
    pub parent_uuid: Option<uuid::Uuid>,
    /// For differencing images: the parent name stored in the image.
    pub parent_name: Option<String>,
}

/// Options of [`crate::open`].
///
/// Every file of the chain is locked ([`image_io::lock`]): the top one for writing unless
/// `read_only`, parents for reading, so a second writer of any layer is refused with
/// [`crate::Error::InUse`], as is a writer while a reader has the image.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct OpenOptions {
    /// Open every file without write access; writes fail with [`crate::Error::ReadOnly`].
    pub read_only: bool,
    /// Read-only opens only: take no lock that stands in a writer's way (qemu-img's
    /// `--force-share`), for inspecting an image in use. What is read may be changing.
    pub force_share: bool,
}

impl OpenOptions {
    /// Options for a read-only open.
    pub fn read_only() -> Self {
        OpenOptions {
            read_only: true,
            force_share: false,
        }
    }

    /// Options for a read-only open of an image that may be in use ([`OpenOptions::force_share`]).
    pub fn read_only_force_share() -> Self {
        OpenOptions {
            read_only: true,
            force_share: true,
        }
    }

    /// Options for a read-write open (parents of differencing images are still read-only).
    pub fn read_write() -> Self {
        OpenOptions {
            read_only: false,
            force_share: false,
        }
    }

    /// The mode the top file is opened and locked with (`force_share` only counts when
    /// `read_only`).
    pub fn mode(&self) -> image_io::OpenMode {
        match (self.read_only, self.force_share) {
            (false, _) => image_io::OpenMode::ReadWrite,
            (true, false) => image_io::OpenMode::ReadOnly,
            (true, true) => image_io::OpenMode::ReadOnlyForceShare,
        }
    }
}

/// A virtual disk: byte-addressed positional I/O plus allocation queries.
///
/// Object safe, so tools and devices can hold a `Box<dyn Disk>` whatever the format.
pub trait Disk: Send {
    /// Size of the virtual disk in bytes.
    fn size(&self) -> u64;

    /// Logical sector size the disk presents to a guest.
    fn logical_sector_size(&self) -> u32;

    /// Physical sector size (the write granularity that avoids read-modify-write).
    fn physical_sector_size(&self) -> u32;

    /// Reads exactly `buf.len()` bytes at `offset`. A range reaching past the end is an error.
    fn read_at(&mut self, buf: &mut [u8], offset: u64) -> Result<()>;

    /// Writes all of `buf` at `offset`. A range reaching past the end is an error; the size of the
    /// disk never changes.
    fn write_at(&mut self, buf: &[u8], offset: u64) -> Result<()>;

    /// Makes everything written so far durable.
    fn flush(&mut self) -> Result<()>;

    /// Drops `[offset, offset + len)`: afterwards the range reads as zeros.
    fn discard(&mut self, offset: u64, len: u64) -> Result<()>;

    /// Where the bytes of `[offset, offset + len)` live, as merged, ordered extents covering the
    /// range exactly.
    fn map(&mut self, offset: u64, len: u64) -> Result<Vec<MapExtent>>;

    /// True if the disk refuses writes.
    fn is_read_only(&self) -> bool;

    /// One entry per layer, top first.
    fn layers(&self) -> Vec<LayerInfo>;

    /// Paths of the layers, top first (the top image followed by its parents).
    fn backing_chain(&self) -> Vec<PathBuf> {
        self.layers().into_iter().map(|l| l.path).collect()
    }

    /// The file range that holds the first bytes of `[offset, offset + len)` as they read:
    /// `(file, offset in it, length)`, the length being how many bytes from `offset` on that
    /// range covers (at most `len`). For callers that splice or map image files and copy from
    /// the page cache themselves. `None` when the range starts with zeros or must be read
    /// through the format crate (a VHDX log replayed in memory).
    fn leading_extent(
        &mut self,
        _offset: u64,
        _len: u64,
    ) -> Result<Option<(&std::fs::File, u64, u64)>> {
        Ok(None)
    }
}

impl<D: Disk + ?Sized> Disk for Box<D> {
    fn size(&self) -> u64 {
        (**self).size()
    }
    fn logical_sector_size(&self) -> u32 {
        (**self).logical_sector_size()
    }
    fn physical_sector_size(&self) -> u32 {
        (**self).physical_sector_size()
    }
    fn read_at(&mut self, buf: &mut [u8], offset: u64) -> Result<()> {
        (**self).read_at(buf, offset)
    }
    fn write_at(&mut self, buf: &[u8], offset: u64) -> Result<()> {
        (**self).write_at(buf, offset)
    }
    fn flush(&mut self) -> Result<()> {
        (**self).flush()
    }
    fn leading_extent(
        &mut self,
        offset: u64,
        len: u64,
    ) -> Result<Option<(&std::fs::File, u64, u64)>> {
        (**self).leading_extent(offset, len)
    }
    fn discard(&mut self, offset: u64, len: u64) -> Result<()> {
        (**self).discard(offset, len)
    }
    fn map(&mut self, offset: u64, len: u64) -> Result<Vec<MapExtent>> {
        (**self).map(offset, len)
    }
    fn is_read_only(&self) -> bool {
        (**self).is_read_only()
    }
    fn layers(&self) -> Vec<LayerInfo> {
        (**self).layers()
    }
    fn backing_chain(&self) -> Vec<PathBuf> {
        (**self).backing_chain()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ext(offset: u64, length: u64, data: bool, file_offset: Option<u64>) -> MapExtent {
        MapExtent {
            offset,
            length,
            depth: 0,
            data,
            zero: !data,
            file_offset,
            file: None,
        }
    }

    #[test]
    fn contiguous_data_runs_merge() {
        let mut v = Vec::new();
        push_merged(&mut v, ext(0, 512, true, Some(4096)));
        push_merged(&mut v, ext(512, 512, true, Some(4608)));
        assert_eq!(v, vec![ext(0, 1024, true, Some(4096))]);
    }

    #[test]
    fn data_runs_with_a_file_offset_gap_stay_apart() {
        let mut v = Vec::new();
        push_merged(&mut v, ext(0, 512, true, Some(4096)));
        push_merged(&mut v, ext(512, 512, true, Some(8192)));
        assert_eq!(v.len(), 2);
    }

    #[test]
    fn zero_runs_merge_and_empty_runs_vanish() {
        let mut v = Vec::new();
        push_merged(&mut v, ext(0, 512, false, None));
        push_merged(&mut v, ext(512, 0, true, Some(1)));
        push_merged(&mut v, ext(512, 512, false, None));
        assert_eq!(v, vec![ext(0, 1024, false, None)]);
    }
}
