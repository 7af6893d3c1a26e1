//! Image layers: payload I/O on top of the format crates' range resolution, through the shared
//! interface ([`FormatImage`]): nothing here names VHD or VHDX.
//!
//! The format crates say where bytes live and keep metadata correct; this module moves them:
//!
//! ```text
//!   read:  resolve_read(off, len) -> [Data{file_offset} | Zero | Parent]
//!            Data   -> pread from the image file (VHDX: through its log-replay overlay)
//!            Zero   -> fill zeros
//!            Parent -> the chain asks the next layer down
//!   write: resolve_write(off, len) -> plan (blocks allocated)
//!            pwrite each plan extent -> commit_write(plan)  (metadata durable at flush)
//! ```
//!
//! Invariants:
//! - Extents from a format crate are checked to tile the requested range before any byte is
//!   moved; a bad answer is an [`Error::Inconsistent`], never a panic or a wild write.
//! - Writes reaching this module are whole logical sectors (the chain does read-modify-write),
//!   so a sector marked present in a bitmap always holds fully defined bytes.

use std::os::unix::fs::FileExt;
use std::path::Path;

use image_io::format::{Durability, FormatImage, FormatKind, ReadSource, WritePlan};
use uuid::Uuid;

use crate::disk::LayerInfo;
use crate::{Error, Format, Result};

/// VHD sector size: the unit of VHD sector bitmaps and offsets.
pub const SECTOR: u64 = 512;

/// Where a piece of a layer's range lives.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Source {
    /// In the layer's file at this offset.
    Data(u64),
    /// Reads as zeros.
    Zero,
    /// In the next layer down.
    Parent,
}

/// A resolved piece of a layer's range.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Extent {
    pub offset: u64,
    pub len: u64,
    pub source: Source,
}

/// `(virtual offset, length, file offset)` of a planned payload write.
pub(crate) type FileRange = (u64, u64, u64);

/// Metadata update that completes a planned write: the format crate's plan, committed once
/// every payload write has completed.
pub(crate) type Commit = WritePlan;

/// What a differencing layer needs from its parent.
#[derive(Debug, Clone)]
pub(crate) struct ParentRef {
    /// Parent name as stored (for messages).
    pub name: String,
    /// Candidate paths, in resolution order.
    pub candidates: Vec<std::path::PathBuf>,
    /// Identities the parent may carry (VHD: footer UUID; VHDX: DataWriteGuid linkages).
    pub accepts: Vec<Uuid>,
    /// Format the parent must have (the child's own).
    pub format: Format,
}

impl From<FormatKind> for Format {
    fn from(k: FormatKind) -> Format {
        match k {
            FormatKind::Vhd => Format::Vhd,
            FormatKind::Vhdx => Format::Vhdx,
        }
    }
}

/// A VHD or VHDX image in a chain, whatever its format.
#[derive(Debug)]
pub struct Image(Box<dyn FormatImage>);

impl Image {
    /// Wraps an image opened (or created) by its format crate.
    pub fn new(image: Box<dyn FormatImage>) -> Image {
        Image(image)
    }

    /// The format crate's image, through the shared interface.
    pub fn format_image(&self) -> &dyn FormatImage {
        &*self.0
    }

    /// The format crate's image, for editing (compact, resize, rebase).
    pub fn into_format_image(self) -> Box<dyn FormatImage> {
        self.0
    }

    /// Path of the image.
    pub fn path(&self) -> &Path {
        self.0.path()
    }

    /// Virtual size.
    pub fn virtual_size(&self) -> u64 {
        self.0.virtual_size()
    }

    /// Container format.
    pub fn format(&self) -> Format {
        self.0.format().into()
    }

    /// Smallest unit a write may cover without read-modify-write.
    pub(crate) fn sector_size(&self) -> u64 {
        self.0.logical_sector_size() as u64
    }

    /// Physical sector size the image advertises.
    pub(crate) fn physical_sector_size(&self) -> u32 {
        self.0.physical_sector_size()
    }

    /// Identity a child's parent link refers to.
    pub fn identity(&self) -> Uuid {
        self.0.identity()
    }

    /// The parent this image needs, if it is a differencing image.
    pub(crate) fn parent_ref(&self) -> Option<ParentRef> {
        self.0.parent_ref().map(|p| ParentRef {
            name: p.name,
            candidates: p.candidates,
            accepts: p.accepts,
            format: self.format(),
        })
    }

    /// Resolves `[offset, offset + len)` and checks that the extents tile the range exactly.
    pub(crate) fn resolve_read(&mut self, offset: u64, len: u64) -> Result<Vec<Extent>> {
        let extents: Vec<Extent> = self
            .0
            .resolve_read(offset, len)?
            .into_iter()
            .map(|e| Extent {
                offset: e.offset,
                len: e.len,
                source: match e.source {
                    ReadSource::Data { file_offset } => Source::Data(file_offset),
                    ReadSource::Zero => Source::Zero,
                    ReadSource::Parent => Source::Parent,
                },
            })
            .collect();
        check_tiling(
            self.path(),
            "resolve_read",
            offset,
            len,
            extents.iter().map(|e| (e.offset, e.len)),
        )?;
        Ok(extents)
    }

    /// Reads payload bytes stored at `file_offset` of the image file.
    pub(crate) fn read_payload(&self, buf: &mut [u8], file_offset: u64) -> Result<()> {
        Ok(self.0.read_payload(buf, file_offset)?)
    }

    /// Writes `buf` at virtual `offset` (whole sectors, inside the disk): allocate, write the
    /// payload to each planned file range, then commit the metadata.
    pub(crate) fn write(&mut self, buf: &[u8], offset: u64) -> Result<()> {
        let (ranges, commit) = self.plan_write(offset, buf.len() as u64)?;
        for (o, l, file_offset) in ranges {
            // In bounds: plan_write checked that offset <= o and o + l <= offset + len.
            let start = (o - offset) as usize;
            self.file()
                .write_all_at(&buf[start..start + l as usize], file_offset)
                .map_err(|err| Error::io(self.path(), "write payload", file_offset, err))?;
        }
        self.commit(commit)
    }

    /// Plans a whole-sector write of `len` bytes at `offset`: allocates, and returns the file
    /// ranges `(virtual offset, len, file offset)` for the payload and the commit to run once
    /// every payload write has completed.
    pub(crate) fn plan_write(&mut self, offset: u64, len: u64) -> Result<(Vec<FileRange>, Commit)> {
        let plan = self.0.resolve_write(offset, len)?;
        let ranges: Vec<FileRange> = plan
            .extents
            .iter()
            .map(|e| (e.offset, e.len, e.file_offset))
            .collect();
        check_tiling(
            self.path(),
            "resolve_write",
            offset,
            len,
            ranges.iter().map(|r| (r.0, r.1)),
        )?;
        Ok((ranges, plan))
    }

    /// Runs the commit of a planned write whose payload has been written.
    pub(crate) fn commit(&mut self, commit: Commit) -> Result<()> {
        Ok(self.0.commit_write(commit)?)
    }

    /// Whether payload reads must go through the format crate (a VHDX whose log was replayed
    /// in memory) rather than straight to the file.
    pub(crate) fn reads_need_overlay(&self) -> bool {
        self.0.reads_need_overlay()
    }

    /// The image file, for payload I/O.
    pub(crate) fn file(&self) -> &std::fs::File {
        self.0.file()
    }

    /// Makes every completed write durable.
    pub(crate) fn flush(&mut self) -> Result<()> {
        Ok(self.0.flush()?)
    }

    /// Frees what the format can free; returns the ranges the caller must zero.
    pub(crate) fn discard(&mut self, offset: u64, len: u64) -> Result<Vec<(u64, u64)>> {
        Ok(self.0.discard(offset, len)?)
    }

    /// Sets the write ordering policy.
    pub(crate) fn set_durability(&mut self, relaxed: bool) {
        self.0.set_durability(if relaxed {
            Durability::Relaxed
        } else {
            Durability::Durable
        })
    }

    /// Whether the image was opened for writing.
    pub fn is_writable(&self) -> bool {
        self.0.is_writable()
    }

    /// Describes the image for `info`.
    pub(crate) fn info(&self) -> LayerInfo {
        let parent = self.parent_ref();
        let info = self.0.info();
        LayerInfo {
            path: self.path().to_path_buf(),
            format: self.format(),
            subformat: Some(info.subformat),
            virtual_size: self.virtual_size(),
            block_size: info.block_size,
            creator: Some(info.creator),
            uuid: Some(info.uuid),
            parent_uuid: parent.as_ref().map(|p| p.accepts[0]),
            parent_name: parent.map(|p| p.name),
        }
    }
}

/// Checks that `(offset, len)` pairs are non-empty, in order, contiguous and cover exactly
/// `[offset, offset + len)`.
fn check_tiling(
    path: &Path,
    what: &str,
    offset: u64,
    len: u64,
    extents: impl Iterator<Item = (u64, u64)>,
) -> Result<()> {
    let end = offset + len;
    let mut pos = offset;
    for (o, l) in extents {
        let e_end = o.checked_add(l);
        if o != pos || l == 0 || !matches!(e_end, Some(x) if x <= end) {
            return Err(Error::Inconsistent {
                path: path.to_path_buf(),
                what: format!(
                    "{what}({offset}, {len}) returned extent ({o}, {l}) where {pos} was expected"
                ),
            });
        }
        pos = o + l;
    }
    if pos != end {
        return Err(Error::Inconsistent {
            path: path.to_path_buf(),
            what: format!("{what}({offset}, {len}) covered only up to {pos}"),
        });
    }
    Ok(())
}
