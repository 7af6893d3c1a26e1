//! The interface both format crates implement, and the vocabulary it speaks.
//!
//! A format crate answers "where does virtual range [off, off+len) live?" and keeps its metadata
//! correct; whoever holds a [`FormatImage`] moves the payload:
//!
//! ```text
//!   read:  resolve_read(off, len) -> [Data{file_offset} | Zero | Parent]   (tiles the range)
//!            Data: pread the file (read_payload, which sees an in-memory log replay)
//!   write: resolve_write(off, len) -> WritePlan { extents: [file ranges], sectors }
//!            pwrite every extent, then commit_write(plan): bitmaps and BAT, in order
//! ```
//!
//! Only the open point names a format (`VhdImage::open_file`, `VhdxImage::open_file`); what is
//! opened travels as `Box<dyn FormatImage>`.
//!
//! Invariants every implementation keeps:
//! - `resolve_read` and `resolve_write` answers tile the asked range, in order (callers check it
//!   anyway: a format crate is trusted for metadata, not for bounds).
//! - A plan's payload is written before `commit_write` makes it visible; a plan is committed
//!   to the image that made it, at most once.
//! - An image opened read-only never writes: `resolve_write`, `commit_write` and `discard` fail.

use std::fmt;
use std::path::{Path, PathBuf};

use uuid::Uuid;

use crate::ImageFile;

/// Where a piece of a resolved virtual range lives.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ReadSource {
    /// In this image's file at `file_offset`.
    Data {
        /// Byte offset in the file.
        file_offset: u64,
    },
    /// Reads as zeros.
    Zero,
    /// Not in this image: the parent has it (a differencing image's unwritten sectors).
    Parent,
}

/// A contiguous piece of a resolved virtual range.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ReadExtent {
    /// Virtual byte offset.
    pub offset: u64,
    /// Length in bytes.
    pub len: u64,
    /// Where the bytes are.
    pub source: ReadSource,
}

impl ReadExtent {
    /// Appends `[offset, offset + len)` read from `source` to `out`, extending the last extent
    /// instead when it ends at `offset` and its source continues into this one (the same kind,
    /// and for data the next file byte).
    pub fn push_merged(out: &mut Vec<ReadExtent>, offset: u64, len: u64, source: ReadSource) {
        if let Some(last) = out.last_mut() {
            let contiguous = match (last.source, source) {
                (ReadSource::Data { file_offset: a }, ReadSource::Data { file_offset: b }) => {
                    a + last.len == b
                }
                (a, b) => a == b,
            };
            if contiguous && last.offset + last.len == offset {
                last.len += len;
                return;
            }
        }
        out.push(ReadExtent {
            offset,
            len,
            source,
        });
    }
}

/// A file range to write payload to.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct WriteExtent {
    /// Virtual byte offset.
    pub offset: u64,
    /// Length in bytes.
    pub len: u64,
    /// Byte offset in the file.
    pub file_offset: u64,
}

/// A planned write: write the payload to every extent, then commit the plan to the image that
/// made it.
#[derive(Debug)]
#[must_use = "commit_write makes the written sectors visible"]
pub struct WritePlan {
    /// File ranges, in virtual order, covering the requested range.
    pub extents: Vec<WriteExtent>,
    /// Virtual sector ranges `[first, end)` whose presence bits the commit sets (in the unit
    /// of the format's sector bitmaps); opaque to callers.
    pub sectors: Vec<(u64, u64)>,
}

/// How strictly metadata updates are ordered against payload writes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Durability {
    /// Ordering barriers, so a crash at any point leaves a consistent image.
    Durable,
    /// No barriers until `flush`: for fresh outputs under a temporary name, where a crash loses
    /// the whole file anyway.
    Relaxed,
}

/// Container format of an image.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FormatKind {
    /// Microsoft VHD.
    Vhd,
    /// Microsoft VHDX.
    Vhdx,
}

impl fmt::Display for FormatKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            FormatKind::Vhd => "VHD",
            FormatKind::Vhdx => "VHDX",
        })
    }
}

/// Disk type, in Hyper-V's words.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Subformat {
    /// All blocks preallocated.
    Fixed,
    /// Blocks allocated on first write.
    Dynamic,
    /// Holds only the changes made over a parent image.
    Differencing,
}

impl fmt::Display for Subformat {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Subformat::Fixed => "fixed",
            Subformat::Dynamic => "dynamic",
            Subformat::Differencing => "differencing",
        })
    }
}

/// What a differencing image needs from its parent.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ParentRef {
    /// Parent name as stored (for messages).
    pub name: String,
    /// Candidate paths, in resolution order.
    pub candidates: Vec<PathBuf>,
    /// Identities the parent may carry ([`FormatImage::identity`]); never empty.
    pub accepts: Vec<Uuid>,
}

/// Description of an image, for `info`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ImageInfo {
    /// Disk type.
    pub subformat: Subformat,
    /// Allocation unit of dynamic and differencing images.
    pub block_size: Option<u32>,
    /// Creator application and version (`"win  10.0"`).
    pub creator: String,
    /// Stable identity of the disk (VHD: footer UUID; VHDX: page-83 virtual disk id).
    pub uuid: Uuid,
}

/// What compaction releases.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CompactMode {
    /// Release only blocks with no sector present; close holes.
    Quick,
    /// Also release blocks whose data reads the same without them (zeros, or the parent's view).
    Full,
}

/// What a compaction did.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct CompactReport {
    /// Blocks whose BAT entry was released.
    pub blocks_released: u64,
    /// Blocks moved down to close holes.
    pub blocks_moved: u64,
    /// File length before.
    pub file_size_before: u64,
    /// File length after.
    pub file_size_after: u64,
}

/// Reads the parent's view of a virtual range (differencing images in full mode).
pub type BackingReader<'a> = &'a mut dyn FnMut(u64, &mut [u8]) -> std::io::Result<()>;

/// Stable classification of a format crate's error.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ErrorKind {
    /// The underlying file operation failed.
    Io,
    /// The file is not an image of the format.
    NotThisFormat,
    /// A structure failed its checksum.
    Checksum,
    /// A structure is inconsistent or out of bounds.
    Corrupt,
    /// A valid image using something the crate does not handle.
    Unsupported,
    /// The caller asked for something impossible.
    InvalidArgument,
    /// A write on an image opened read-only.
    ReadOnly,
    /// Another process has the image open in a way this open cannot share.
    InUse,
}

/// The error behind the shared interface: the format crates' own error type.
pub type FormatError = crate::error::ImageError;

/// Result of the shared interface.
pub type FormatResult<T> = std::result::Result<T, FormatError>;

/// An open VHD or VHDX image over a file `F`, whatever its format.
pub trait FormatImage<F: ImageFile = std::fs::File>: Send + fmt::Debug {
    /// Container format.
    fn format(&self) -> FormatKind;
    /// The file as opened (names it in errors; anchors relative parent paths).
    fn path(&self) -> &Path;
    /// The image file, for payload I/O.
    fn file(&self) -> &F;
    /// Size of the virtual disk in bytes.
    fn virtual_size(&self) -> u64;
    /// Logical sector size: the smallest write that needs no read-modify-write.
    fn logical_sector_size(&self) -> u32;
    /// Physical sector size the image advertises.
    fn physical_sector_size(&self) -> u32;
    /// Whether the image was opened for writing.
    fn is_writable(&self) -> bool;
    /// Identity a child's parent link refers to (VHD: footer UUID; VHDX: DataWriteGuid).
    fn identity(&self) -> Uuid;
    /// The parent this image needs, if it is a differencing image.
    fn parent_ref(&self) -> Option<ParentRef>;
    /// Description for `info`.
    fn info(&self) -> ImageInfo;

    /// Where the bytes of `[offset, offset + len)` live.
    fn resolve_read(&mut self, offset: u64, len: u64) -> FormatResult<Vec<ReadExtent>>;
    /// Whether `Data` extents must be read with [`FormatImage::read_payload`] (a log replayed in
    /// memory overlays the file) rather than straight from the file.
    fn reads_need_overlay(&self) -> bool;
    /// Reads payload bytes at `file_offset`, as the image sees its file.
    fn read_payload(&self, buf: &mut [u8], file_offset: u64) -> FormatResult<()>;
    /// Allocates what `[offset, offset + len)` (whole sectors) needs and plans the write.
    fn resolve_write(&mut self, offset: u64, len: u64) -> FormatResult<WritePlan>;
    /// Makes a planned write whose payload is written visible.
    fn commit_write(&mut self, plan: WritePlan) -> FormatResult<()>;
    /// Frees what can be freed in `[offset, offset + len)`; returns the ranges the caller
    /// must zero itself.
    fn discard(&mut self, offset: u64, len: u64) -> FormatResult<Vec<(u64, u64)>>;
    /// Drops the whole blocks of `[offset, offset + len)` from this image, for space whose
    /// content does not matter (a file system's free space): they then read as zeros, or, in a
    /// differencing image whose format cannot mark a block zero, as the parent's bytes. Returns
    /// how many blocks were released. Durable at the next flush, crash-safe as `discard`.
    fn release(&mut self, offset: u64, len: u64) -> FormatResult<u64> {
        let before = self.allocated_blocks();
        self.discard(offset, len)?;
        Ok(before.saturating_sub(self.allocated_blocks()) as u64)
    }
    /// Makes every committed write durable.
    fn flush(&mut self) -> FormatResult<()>;
    /// Sets the write ordering policy.
    fn set_durability(&mut self, durability: Durability);

    /// Blocks with a data offset (dynamic and differencing images).
    fn allocated_blocks(&self) -> usize;
    /// Compacts the image in place (every step leaves a valid image with the same content).
    /// `backing` supplies the parent's view for full mode on differencing images; `progress` is
    /// called with the number of bytes examined or moved.
    fn compact(
        &mut self,
        mode: CompactMode,
        backing: Option<BackingReader<'_>>,
        progress: &mut dyn FnMut(u64),
    ) -> FormatResult<CompactReport>;
    /// Changes the virtual size (new space reads as zeros; shrinking drops what lies beyond).
    fn resize(&mut self, new_size: u64, progress: &mut dyn FnMut(u64)) -> FormatResult<()>;
    /// Points a differencing image at its parent's new location: `absolute` path and the
    /// Windows-style path `relative` to the child's directory. With `identity`, the link is
    /// re-made to a parent of that identity ([`FormatImage::identity`]) instead of the old one.
    fn set_parent(
        &mut self,
        absolute: &Path,
        relative: &str,
        identity: Option<Uuid>,
    ) -> FormatResult<()>;
    /// Flushes and closes the image (a VHDX's log GUID is cleared: clean for other readers).
    fn close(self: Box<Self>) -> FormatResult<()>;
}

/// Path of `target` relative to directory `from_dir`, Windows style (`.\\p.vhd`,
/// `..\\d\\p.vhdx`), as the parent locators of both formats store it. Both must be absolute
/// and normalised.
pub fn relative_windows_path(from_dir: &Path, target: &Path) -> String {
    let from: Vec<_> = from_dir.components().collect();
    let to: Vec<_> = target.components().collect();
    let common = from.iter().zip(&to).take_while(|(a, b)| a == b).count();
    let mut parts: Vec<String> = Vec::new();
    if common == from.len() {
        parts.push(".".into());
    }
    parts.extend(std::iter::repeat_n("..".to_string(), from.len() - common));
    parts.extend(
        to[common..]
            .iter()
            .map(|c| c.as_os_str().to_string_lossy().into_owned()),
    );
    parts.join("\\")
}
