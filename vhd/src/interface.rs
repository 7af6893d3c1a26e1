//! [`VhdImage`] behind the shared format interface ([`image_io::format::FormatImage`]): what
//! the block backend, the tools and the fuzz targets use without naming VHD.

use std::path::Path;

use image_io::format::{
    BackingReader, CompactMode, CompactReport, Durability, FormatImage, FormatKind, FormatResult,
    ImageInfo, ParentRef, ReadExtent, Subformat, WritePlan,
};
use image_io::ImageFile;
use uuid::Uuid;

use crate::error::Error;
use crate::footer::DiskType;
use crate::image::VhdImage;

/// VHD's only sector size.
const SECTOR: u32 = 512;

impl From<DiskType> for Subformat {
    fn from(t: DiskType) -> Subformat {
        match t {
            DiskType::Fixed => Subformat::Fixed,
            DiskType::Dynamic => Subformat::Dynamic,
            DiskType::Differencing => Subformat::Differencing,
        }
    }
}

impl<F: ImageFile> FormatImage<F> for VhdImage<F> {
    fn format(&self) -> FormatKind {
        FormatKind::Vhd
    }
    fn path(&self) -> &Path {
        VhdImage::path(self)
    }
    fn file(&self) -> &F {
        VhdImage::file(self)
    }
    fn virtual_size(&self) -> u64 {
        VhdImage::virtual_size(self)
    }
    fn logical_sector_size(&self) -> u32 {
        SECTOR
    }
    fn physical_sector_size(&self) -> u32 {
        SECTOR
    }
    fn is_writable(&self) -> bool {
        VhdImage::is_writable(self)
    }
    fn identity(&self) -> Uuid {
        self.uuid()
    }
    fn parent_ref(&self) -> Option<ParentRef> {
        self.parent().map(|p| ParentRef {
            name: p.unicode_name.clone(),
            candidates: p.candidates.clone(),
            accepts: vec![p.uuid],
        })
    }
    fn info(&self) -> ImageInfo {
        ImageInfo {
            subformat: self.disk_type().into(),
            block_size: self.block_size(),
            creator: self.creator(),
            uuid: self.uuid(),
        }
    }
    fn resolve_read(&mut self, offset: u64, len: u64) -> FormatResult<Vec<ReadExtent>> {
        VhdImage::resolve_read(self, offset, len)
    }
    fn reads_need_overlay(&self) -> bool {
        false
    }
    fn read_payload(&self, buf: &mut [u8], file_offset: u64) -> FormatResult<()> {
        self.file()
            .read_exact_at(buf, file_offset)
            .map_err(|source| Error::Io {
                path: self.path().into(),
                op: "read payload",
                offset: file_offset,
                source,
            })
    }
    fn resolve_write(&mut self, offset: u64, len: u64) -> FormatResult<WritePlan> {
        VhdImage::resolve_write(self, offset, len)
    }
    fn commit_write(&mut self, plan: WritePlan) -> FormatResult<()> {
        VhdImage::commit_write(self, plan)
    }
    fn discard(&mut self, offset: u64, len: u64) -> FormatResult<Vec<(u64, u64)>> {
        VhdImage::discard(self, offset, len)
    }
    fn release(&mut self, offset: u64, len: u64) -> FormatResult<u64> {
        VhdImage::release(self, offset, len)
    }
    fn flush(&mut self) -> FormatResult<()> {
        VhdImage::flush(self)
    }
    fn set_durability(&mut self, durability: Durability) {
        VhdImage::set_durability(self, durability)
    }
    fn allocated_blocks(&self) -> usize {
        VhdImage::allocated_blocks(self)
    }
    fn compact(
        &mut self,
        mode: CompactMode,
        backing: Option<BackingReader<'_>>,
        progress: &mut dyn FnMut(u64),
    ) -> FormatResult<CompactReport> {
        VhdImage::compact(self, mode, backing, progress)
    }
    fn resize(&mut self, new_size: u64, progress: &mut dyn FnMut(u64)) -> FormatResult<()> {
        VhdImage::resize(self, new_size, progress)
    }
    fn set_parent(
        &mut self,
        absolute: &Path,
        relative: &str,
        identity: Option<Uuid>,
    ) -> FormatResult<()> {
        VhdImage::set_parent(self, absolute, relative, identity)
    }
    fn close(mut self: Box<Self>) -> FormatResult<()> {
        VhdImage::flush(&mut self)
    }
}
