//! [`VhdxImage`] behind the shared format interface ([`image_io::format::FormatImage`]): what
//! the block backend, the tools and the fuzz targets use without naming VHDX.

use std::path::Path;

use image_io::format::{
    BackingReader, CompactMode, CompactReport, Durability, FormatImage, FormatKind, FormatResult,
    ImageInfo, ParentRef, ReadExtent, Subformat, WritePlan,
};
use image_io::ImageFile;
use uuid::Uuid;

use crate::image::VhdxImage;

impl<F: ImageFile> FormatImage<F> for VhdxImage<F> {
    fn format(&self) -> FormatKind {
        FormatKind::Vhdx
    }
    fn path(&self) -> &Path {
        VhdxImage::path(self)
    }
    fn file(&self) -> &F {
        VhdxImage::file(self)
    }
    fn virtual_size(&self) -> u64 {
        VhdxImage::virtual_size(self)
    }
    fn logical_sector_size(&self) -> u32 {
        VhdxImage::logical_sector_size(self)
    }
    fn physical_sector_size(&self) -> u32 {
        VhdxImage::physical_sector_size(self)
    }
    fn is_writable(&self) -> bool {
        VhdxImage::is_writable(self)
    }
    /// The DataWriteGuid, which children link to (it changes with every writing session).
    fn identity(&self) -> Uuid {
        self.header().data_write_guid
    }
    fn parent_ref(&self) -> Option<ParentRef> {
        self.parent().map(|p| ParentRef {
            name: p
                .entries
                .iter()
                .find(|(k, _)| k == "relative_path" || k == "absolute_win32_path")
                .map_or_else(String::new, |(_, v)| v.clone()),
            candidates: p.candidates.clone(),
            accepts: std::iter::once(p.linkage).chain(p.linkage2).collect(),
        })
    }
    fn info(&self) -> ImageInfo {
        ImageInfo {
            subformat: if self.params().has_parent {
                Subformat::Differencing
            } else if self.params().leave_blocks_allocated {
                Subformat::Fixed
            } else {
                Subformat::Dynamic
            },
            block_size: Some(self.block_size()),
            creator: self.creator().to_string(),
            // The virtual disk id (page 83): stable, unlike DataWriteGuid.
            uuid: self.params().page83,
        }
    }
    fn resolve_read(&mut self, offset: u64, len: u64) -> FormatResult<Vec<ReadExtent>> {
        VhdxImage::resolve_read(self, offset, len)
    }
    /// A log replayed in memory (read-only open of a dirty image) overlays the file.
    fn reads_need_overlay(&self) -> bool {
        self.replayed_log() && !self.is_writable()
    }
    fn read_payload(&self, buf: &mut [u8], file_offset: u64) -> FormatResult<()> {
        self.read_file_at(buf, file_offset)
    }
    fn resolve_write(&mut self, offset: u64, len: u64) -> FormatResult<WritePlan> {
        VhdxImage::resolve_write(self, offset, len)
    }
    fn commit_write(&mut self, plan: WritePlan) -> FormatResult<()> {
        VhdxImage::commit_write(self, plan)
    }
    fn discard(&mut self, offset: u64, len: u64) -> FormatResult<Vec<(u64, u64)>> {
        VhdxImage::discard(self, offset, len)
    }
    fn flush(&mut self) -> FormatResult<()> {
        VhdxImage::flush(self)
    }
    fn set_durability(&mut self, durability: Durability) {
        VhdxImage::set_durability(self, durability)
    }
    fn allocated_blocks(&self) -> usize {
        VhdxImage::allocated_blocks(self)
    }
    fn compact(
        &mut self,
        mode: CompactMode,
        backing: Option<BackingReader<'_>>,
        progress: &mut dyn FnMut(u64),
    ) -> FormatResult<CompactReport> {
        VhdxImage::compact(self, mode, backing, progress)
    }
    fn resize(&mut self, new_size: u64, progress: &mut dyn FnMut(u64)) -> FormatResult<()> {
        VhdxImage::resize(self, new_size, progress)
    }
    fn set_parent(
        &mut self,
        absolute: &Path,
        relative: &str,
        identity: Option<Uuid>,
    ) -> FormatResult<()> {
        VhdxImage::set_parent(self, absolute, relative, identity)
    }
    fn close(self: Box<Self>) -> FormatResult<()> {
        VhdxImage::close(*self)
    }
}
