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
//!            the chain (or an engine) pwrites each plan extent -> commit (metadata durable at flush)
//! ```
//!
//! Invariants:
//! - Extents from a format crate are checked to tile the requested range before any byte is
//!   moved; a bad answer is an [`crate::Error::Inconsistent`], never a panic or a wild write.
//! - Writes reaching this module are whole logical sectors (the chain does read-modify-write),
//!   so a sector marked present in a bitmap always holds fully defined bytes.

use std::fs::File;
use std::path::Path;

use image_io::format::{Durability, FormatImage, FormatKind, ReadSource};
use uuid::Uuid;

use super::{check_tiling, Commit, Extent, FileRange, Layer, ParentRef, PlannedWrite, Source};
use crate::disk::LayerInfo;
use crate::{Format, Result};

/// VHD sector size: the unit of VHD sector bitmaps and offsets.
pub const SECTOR: u64 = 512;

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

    /// Virtual size.
    pub fn virtual_size(&self) -> u64 {
        self.0.virtual_size()
    }

    /// Whether the image was opened for writing.
    pub fn is_writable(&self) -> bool {
        self.0.is_writable()
    }

    /// Plans a whole-sector write of `len` bytes at `offset`: allocates, and returns the file
    /// ranges `(virtual offset, len, file offset)` for the payload and the commit to run once
    /// every payload write has completed.
    fn plan(&mut self, offset: u64, len: u64) -> Result<(Vec<FileRange>, Commit)> {
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
}

impl Layer for Image {
    fn path(&self) -> &Path {
        self.0.path()
    }

    fn size(&self) -> u64 {
        self.0.virtual_size()
    }

    fn format(&self) -> Format {
        self.0.format().into()
    }

    fn info(&self) -> LayerInfo {
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

    fn sector_size(&self) -> u64 {
        self.0.logical_sector_size() as u64
    }

    fn physical_sector_size(&self) -> u32 {
        self.0.physical_sector_size()
    }

    fn is_writable(&self) -> bool {
        self.0.is_writable()
    }

    fn identity(&self) -> Option<Uuid> {
        Some(self.0.identity())
    }

    fn parent_ref(&self) -> Option<ParentRef> {
        self.0.parent_ref().map(|p| ParentRef {
            name: p.name,
            candidates: p.candidates,
            accepts: p.accepts,
            format: self.format(),
        })
    }

    fn file(&self) -> Option<&File> {
        Some(self.0.file())
    }

    fn direct_reads(&self) -> bool {
        // A VHDX whose log was replayed in memory: payload reads go through the format crate.
        !self.0.reads_need_overlay()
    }

    /// Resolves `[offset, offset + len)` and checks that the extents tile the range exactly.
    fn resolve_read(&mut self, offset: u64, len: u64) -> Result<Vec<Extent>> {
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

    fn read_payload(&mut self, buf: &mut [u8], at: u64) -> Result<()> {
        Ok(self.0.read_payload(buf, at)?)
    }

    fn plan_write(&mut self, offset: u64, len: u64) -> Result<Option<PlannedWrite>> {
        let (ranges, commit) = self.plan(offset, len)?;
        Ok(Some((ranges, Some(commit))))
    }

    fn commit(&mut self, commit: Commit) -> Result<()> {
        Ok(self.0.commit_write(commit)?)
    }

    fn discard(&mut self, offset: u64, len: u64) -> Result<Vec<(u64, u64)>> {
        Ok(self.0.discard(offset, len)?)
    }

    fn flush(&mut self) -> Result<()> {
        Ok(self.0.flush()?)
    }

    fn set_relaxed_durability(&mut self, relaxed: bool) {
        self.0.set_durability(if relaxed {
            Durability::Relaxed
        } else {
            Durability::Durable
        })
    }

    fn format_image(&self) -> Option<&dyn FormatImage> {
        Some(&*self.0)
    }

    fn into_format_image(self: Box<Self>) -> Option<Box<dyn FormatImage>> {
        Some(self.0)
    }
}
