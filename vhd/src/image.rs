//! An open VHD image: resolves virtual ranges to file ranges, allocates blocks, and keeps the
//! metadata durable in the right order. Payload bytes are moved by the caller (the block
//! backend), at the file offsets this module returns.
//!
//! ```text
//! dynamic / differencing file:
//! | footer copy | dyn header | BAT | (locator data) | pad | bitmap | block data ... | footer |
//!                                                             ^ data 4 KiB aligned
//! ```
//!
//! Invariants:
//! - A read-only image never writes and never opens its file for writing.
//! - New blocks are appended where the footer was; block data starts 4 KiB-aligned with the
//!   bitmap in the sector(s) just before it; the old footer stays untouched in the padding.
//! - Allocation first writes the footer at the new end of the file and (with
//!   [`Durability::Durable`]) syncs it, so the file always ends in a footer.
//! - Bitmap and BAT changes are kept in memory and written by [`VhdImage::flush`]: sync the
//!   payload, write bitmaps then BAT, sync again. A crash at any point leaves an image that opens
//!   and checks clean (at most a leaked block at the end) and keeps every write completed before
//!   the last flush.
//! - A differencing image's parent is only ever opened read-only (by the caller).

use crate::bitmap::Bitmap;
use crate::dynamic_header::DynamicHeader;
use crate::error::{Error, Result};
use crate::footer::{DiskType, Footer, FOOTER_SIZE};
use crate::layout::{read_at, write_at, Layout, UNALLOCATED};
use image_io::ImageFile;
use std::collections::{BTreeSet, HashMap};
use std::fs::File;
use std::path::{Path, PathBuf};
use uuid::Uuid;

pub use image_io::OpenMode;

pub use image_io::format::{Durability, ReadExtent, ReadSource, WriteExtent, WritePlan};

/// The parent a differencing image refers to.
#[derive(Debug, Clone)]
pub struct ParentLink {
    /// Unique id the parent's footer must carry.
    pub uuid: Uuid,
    /// Parent modification time recorded at creation (Windows writes 0; not enforced).
    pub timestamp: u32,
    /// Parent unicode name from the header.
    pub unicode_name: String,
    /// Candidate parent paths in resolution order (see [`Layout::parent_candidates`]).
    pub candidates: Vec<PathBuf>,
}

/// An open VHD image over any [`ImageFile`] (a `std::fs::File` for real use).
#[derive(Debug)]
pub struct VhdImage<F: ImageFile = File> {
    pub(crate) path: PathBuf,
    pub(crate) file: F,
    pub(crate) writable: bool,
    pub(crate) durability: Durability,
    pub(crate) footer: Footer,
    pub(crate) footer_bytes: [u8; FOOTER_SIZE],
    pub(crate) footer_offset: u64,
    pub(crate) header: Option<DynamicHeader>,
    pub(crate) virtual_size: u64,
    pub(crate) block_size: u64,
    pub(crate) bitmap_size: u64,
    pub(crate) bat: Vec<u32>,
    pub(crate) bitmaps: HashMap<u32, Bitmap>,
    pub(crate) dirty_bat: BTreeSet<usize>,
    pub(crate) dirty_bitmaps: BTreeSet<u32>,
    pub(crate) parent: Option<ParentLink>,
}

impl VhdImage {
    /// Whether `file` looks like a VHD: a `conectix` footer in the last 512 or 511 bytes, or at
    /// offset 0 (dynamic images whose trailing footer is damaged, or that were cut short: they
    /// must fail to open as VHDs, not read as raw disks).
    pub fn probe(file: &File) -> std::io::Result<bool> {
        let len = file.metadata()?.len();
        let mut head = [0u8; 8];
        if len >= 8 && file.read_exact_at(&mut head, 0).is_ok() && &head == crate::footer::COOKIE {
            return Ok(true);
        }
        if len < FOOTER_SIZE as u64 - 1 {
            return Ok(false);
        }
        let mut tail = [0u8; FOOTER_SIZE];
        let at = len.saturating_sub(FOOTER_SIZE as u64);
        let n = (len - at) as usize;
        file.read_exact_at(&mut tail[..n], at)?;
        Ok(&tail[..8] == crate::footer::COOKIE || &tail[1..9] == crate::footer::COOKIE)
    }

    /// Opens an image. Any checksum or structural problem is an error naming the structure and
    /// its offset (run `check --repair`); read-only opens never write.
    /// The file is locked for `mode` (see [`image_io::lock`]): a second writer, or a writer
    /// and a reader, are refused with [`Error::InUse`].
    pub fn open(path: &Path, mode: OpenMode) -> Result<VhdImage> {
        let file = image_io::lock::open(path, mode).map_err(|e| Error::from_open(path, e))?;
        VhdImage::open_file(file, path, mode)
    }
}

impl<F: ImageFile> VhdImage<F> {
    /// Opens an image held in `file` (which must allow writes for [`OpenMode::ReadWrite`]);
    /// `path` names it in errors and anchors relative parent paths.
    pub fn open_file(file: F, path: &Path, mode: OpenMode) -> Result<VhdImage<F>> {
        let mut layout = Layout::read(&file, path)?;
        if let Some(e) = layout.first_corruption() {
            return Err(e);
        }
        Ok(Self::from_layout(layout, file, mode.is_writable()))
    }

    pub(crate) fn from_layout(layout: Layout, file: F, writable: bool) -> VhdImage<F> {
        let parent = (layout.footer.disk_type() == Some(DiskType::Differencing)).then(|| {
            let h = layout
                .header
                .as_ref()
                .expect("differencing layout has a header");
            ParentLink {
                uuid: h.parent_uuid,
                timestamp: h.parent_timestamp,
                unicode_name: h.parent_unicode_name.clone(),
                candidates: layout.parent_candidates(),
            }
        });
        let block_size = layout.block_size().unwrap_or(0) as u64;
        let bitmap_size = layout.bitmap_size();
        VhdImage {
            path: layout.path.clone(),
            file,
            writable,
            durability: Durability::Durable,
            footer_bytes: layout.footer.to_bytes(),
            virtual_size: layout.virtual_size(),
            footer: layout.footer,
            footer_offset: layout.footer_offset,
            header: layout.header,
            block_size,
            bitmap_size,
            bat: layout.bat,
            bitmaps: HashMap::new(),
            dirty_bat: BTreeSet::new(),
            dirty_bitmaps: BTreeSet::new(),
            parent,
        }
    }

    /// Path the image was opened from.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// The image file; payload I/O goes to the offsets `resolve_*` return.
    pub fn file(&self) -> &F {
        &self.file
    }

    /// Size of the virtual disk in bytes.
    pub fn virtual_size(&self) -> u64 {
        self.virtual_size
    }

    /// Fixed, dynamic or differencing.
    pub fn disk_type(&self) -> DiskType {
        self.footer.disk_type().expect("validated at open")
    }

    /// The footer.
    pub fn footer(&self) -> &Footer {
        &self.footer
    }

    /// The dynamic header (dynamic and differencing images).
    pub fn header(&self) -> Option<&DynamicHeader> {
        self.header.as_ref()
    }

    /// Creator application and version, e.g. `win 10.0`.
    pub fn creator(&self) -> String {
        self.footer.creator()
    }

    /// Unique id of the image.
    pub fn uuid(&self) -> Uuid {
        self.footer.uuid
    }

    /// Block size (dynamic and differencing).
    pub fn block_size(&self) -> Option<u32> {
        self.header.as_ref().map(|h| h.block_size)
    }

    /// Whether the image was opened for writing.
    pub fn is_writable(&self) -> bool {
        self.writable
    }

    /// The parent link of a differencing image.
    pub fn parent(&self) -> Option<&ParentLink> {
        self.parent.as_ref()
    }

    /// Sets the ordering mode for later writes.
    pub fn set_durability(&mut self, d: Durability) {
        self.durability = d;
    }

    /// Number of allocated blocks.
    pub fn allocated_blocks(&self) -> usize {
        self.bat.iter().filter(|&&e| e != UNALLOCATED).count()
    }

    fn check_range(&self, offset: u64, len: u64) -> Result<()> {
        if offset
            .checked_add(len)
            .is_none_or(|e| e > self.virtual_size)
        {
            return Err(Error::InvalidArgument(format!(
                "{}: range {offset}+{len} is beyond the virtual size {}",
                self.path.display(),
                self.virtual_size
            )));
        }
        Ok(())
    }

    fn sectors_per_block(&self) -> u64 {
        self.block_size / 512
    }

    pub(crate) fn bitmap(&mut self, block: u32) -> Result<&Bitmap> {
        if !self.bitmaps.contains_key(&block) {
            let at = self.bat[block as usize] as u64 * 512;
            let mut raw = vec![0u8; self.bitmap_size as usize];
            read_at(&self.file, &self.path, &mut raw, at, "read sector bitmap")?;
            let b = Bitmap::from_bytes(raw, self.sectors_per_block());
            self.bitmaps.insert(block, b);
        }
        Ok(&self.bitmaps[&block])
    }

    fn data_offset(&self, block: u32) -> u64 {
        self.bat[block as usize] as u64 * 512 + self.bitmap_size
    }

    /// Where `[offset, offset+len)` lives. The extents are in order, contiguous, cover the range
    /// exactly, and adjacent extents of the same kind are merged.
    pub fn resolve_read(&mut self, offset: u64, len: u64) -> Result<Vec<ReadExtent>> {
        self.check_range(offset, len)?;
        let mut out: Vec<ReadExtent> = Vec::new();
        if self.disk_type() == DiskType::Fixed {
            if len > 0 {
                out.push(ReadExtent {
                    offset,
                    len,
                    source: ReadSource::Data {
                        file_offset: offset,
                    },
                });
            }
            return Ok(out);
        }
        let absent = if self.disk_type() == DiskType::Differencing {
            ReadSource::Parent
        } else {
            ReadSource::Zero
        };
        let (bs, end) = (self.block_size, offset + len);
        let mut pos = offset;
        while pos < end {
            let block = (pos / bs) as u32;
            let block_end = ((block as u64 + 1) * bs).min(end);
            if self.bat[block as usize] == UNALLOCATED {
                ReadExtent::push_merged(&mut out, pos, block_end - pos, absent);
                pos = block_end;
                continue;
            }
            let base = block as u64 * bs;
            let data = self.data_offset(block);
            let bitmap = self.bitmap(block)?.clone();
            while pos < block_end {
                let sector = (pos - base) / 512;
                let end_sector = (block_end - base).div_ceil(512);
                let (present, n) = bitmap.run(sector, end_sector);
                let run_end = (base + (sector + n) * 512).min(block_end);
                let source = if present {
                    ReadSource::Data {
                        file_offset: data + (pos - base),
                    }
                } else {
                    absent
                };
                ReadExtent::push_merged(&mut out, pos, run_end - pos, source);
                pos = run_end;
            }
        }
        Ok(out)
    }

    /// Returns the file ranges to write `[offset, offset+len)` to, allocating blocks as needed.
    /// In a differencing image, a sector that is not yet present must be written whole (the
    /// caller reads the rest of it from the parent first); partial writes of such sectors are
    /// refused.
    pub fn resolve_write(&mut self, offset: u64, len: u64) -> Result<WritePlan> {
        if !self.writable {
            return Err(Error::ReadOnly {
                path: self.path.clone(),
            });
        }
        self.check_range(offset, len)?;
        let mut plan = WritePlan {
            extents: Vec::new(),
            sectors: Vec::new(),
        };
        if self.disk_type() == DiskType::Fixed {
            if len > 0 {
                plan.extents.push(WriteExtent {
                    offset,
                    len,
                    file_offset: offset,
                });
            }
            return Ok(plan);
        }
        let (bs, end) = (self.block_size, offset + len);
        let mut pos = offset;
        while pos < end {
            let block = (pos / bs) as u32;
            let base = block as u64 * bs;
            let block_end = (base + bs).min(end);
            if self.bat[block as usize] == UNALLOCATED {
                self.allocate(block)?;
            }
            let (first, last) = ((pos - base) / 512, (block_end - base).div_ceil(512));
            if self.disk_type() == DiskType::Differencing {
                let vsize = self.virtual_size;
                let bitmap = self.bitmap(block)?;
                let partial_head = !pos.is_multiple_of(512) && !bitmap.get(first);
                let partial_tail =
                    block_end % 512 != 0 && block_end < vsize && !bitmap.get(last - 1);
                if partial_head || partial_tail {
                    return Err(Error::InvalidArgument(format!(
                        "{}: partial-sector write at {offset}+{len} to a sector not yet in the differencing image; write whole sectors",
                        self.path.display()
                    )));
                }
            }
            let file_offset = self.data_offset(block) + (pos - base);
            match plan.extents.last_mut() {
                Some(e) if e.file_offset + e.len == file_offset => e.len += block_end - pos,
                _ => plan.extents.push(WriteExtent {
                    offset: pos,
                    len: block_end - pos,
                    file_offset,
                }),
            }
            // As virtual sector numbers: commit_write finds the block again.
            let block_first = block as u64 * (bs / 512);
            plan.sectors.push((block_first + first, block_first + last));
            pos = block_end;
        }
        Ok(plan)
    }

    /// Marks the sectors of a completed payload write present. Durable at the next flush.
    pub fn commit_write(&mut self, plan: WritePlan) -> Result<()> {
        let spb = self.sectors_per_block();
        let per_block = spb;
        for (vfirst, vlast) in plan.sectors {
            let Ok(block) = u32::try_from(vfirst / per_block) else {
                return Err(Error::InvalidArgument("write plan of another image".into()));
            };
            let (first, last) = (vfirst % per_block, vlast - block as u64 * per_block);
            if block as usize >= self.bat.len() || first >= last || last > per_block {
                return Err(Error::InvalidArgument(format!(
                    "{}: write plan of another image (sectors {vfirst}..{vlast})",
                    self.path.display()
                )));
            }
            self.bitmap(block)?;
            let b = self.bitmaps.get_mut(&block).expect("loaded above");
            if b.set_range(first, last, spb) {
                self.dirty_bitmaps.insert(block);
            }
        }
        Ok(())
    }

    /// Appends a block where the footer is and moves the footer past it.
    fn allocate(&mut self, block: u32) -> Result<()> {
        let data_start =
            (self.footer_offset + FOOTER_SIZE as u64 + self.bitmap_size).next_multiple_of(4096);
        let bitmap_at = data_start - self.bitmap_size;
        let new_footer = data_start + self.block_size;
        let sector = bitmap_at / 512;
        if sector >= UNALLOCATED as u64 {
            return Err(Error::Unsupported {
                path: self.path.clone(),
                what: "image file would exceed 2 TiB, the limit of VHD block addresses".into(),
            });
        }
        write_at(
            &self.file,
            &self.path,
            &self.footer_bytes,
            new_footer,
            "write footer",
        )?;
        if self.durability == Durability::Durable {
            self.sync("sync new footer")?;
        }
        self.footer_offset = new_footer;
        self.bat[block as usize] = sector as u32;
        self.dirty_bat.insert(block as usize / 128);
        // Fresh file space reads as zeros, so a dynamic block may claim every sector; a
        // differencing block starts empty so that unwritten sectors still come from the parent.
        let bitmap = if self.disk_type() == DiskType::Differencing {
            Bitmap::empty(self.bitmap_size as usize)
        } else {
            Bitmap::Full
        };
        self.bitmaps.insert(block, bitmap);
        self.dirty_bitmaps.insert(block);
        Ok(())
    }

    pub(crate) fn sync(&self, op: &'static str) -> Result<()> {
        self.file.sync_data().map_err(|source| Error::Io {
            path: self.path.clone(),
            op,
            offset: 0,
            source,
        })
    }

    /// Makes every completed write durable: sync payload, write dirty bitmaps and BAT sectors,
    /// sync again.
    pub fn flush(&mut self) -> Result<()> {
        if !self.writable {
            return Ok(());
        }
        if self.dirty_bat.is_empty() && self.dirty_bitmaps.is_empty() {
            return self.sync("flush");
        }
        if self.durability == Durability::Durable {
            self.sync("sync payload before metadata")?;
        }
        for block in std::mem::take(&mut self.dirty_bitmaps) {
            let entry = self.bat[block as usize];
            if entry == UNALLOCATED {
                continue;
            }
            let bytes = self.bitmaps[&block].to_bytes(self.bitmap_size as usize);
            write_at(
                &self.file,
                &self.path,
                &bytes,
                entry as u64 * 512,
                "write sector bitmap",
            )?;
        }
        let table = self.header.as_ref().map_or(0, |h| h.table_offset);
        for sector in std::mem::take(&mut self.dirty_bat) {
            let first = sector * 128;
            let last = (first + 128).min(self.bat.len());
            let bytes = crate::layout::bat_bytes(&self.bat[first..last]);
            write_at(
                &self.file,
                &self.path,
                &bytes,
                table + first as u64 * 4,
                "write BAT",
            )?;
        }
        self.sync("flush")
    }

    /// Makes whole blocks of `[offset, offset+len)` read as zeros by unallocating them, where
    /// that is possible (dynamic images). Returns the sub-ranges the caller must still zero.
    /// Freed space stays in the file until the image is compacted.
    pub fn discard(&mut self, offset: u64, len: u64) -> Result<Vec<(u64, u64)>> {
        if !self.writable {
            return Err(Error::ReadOnly {
                path: self.path.clone(),
            });
        }
        self.check_range(offset, len)?;
        if self.disk_type() != DiskType::Dynamic || len == 0 {
            return Ok(if len > 0 { vec![(offset, len)] } else { vec![] });
        }
        let (bs, end) = (self.block_size, offset + len);
        let mut rest: Vec<(u64, u64)> = Vec::new();
        let mut pos = offset;
        while pos < end {
            let block = (pos / bs) as u32;
            let base = block as u64 * bs;
            let block_end = (base + bs).min(end);
            let whole = pos == base && (block_end == base + bs || block_end == self.virtual_size);
            if self.bat[block as usize] == UNALLOCATED {
                // already reads as zeros
            } else if whole {
                self.bat[block as usize] = UNALLOCATED;
                self.bitmaps.remove(&block);
                self.dirty_bitmaps.remove(&block);
                self.dirty_bat.insert(block as usize / 128);
            } else {
                match rest.last_mut() {
                    Some((o, l)) if *o + *l == pos => *l += block_end - pos,
                    _ => rest.push((pos, block_end - pos)),
                }
            }
            pos = block_end;
        }
        Ok(rest)
    }

    /// Unallocates the whole blocks of `[offset, offset+len)` of a dynamic or differencing
    /// image, for space whose content does not matter (a file system's free space): they then
    /// read as zeros (dynamic) or as the parent's bytes (differencing). Returns how many blocks
    /// were released; their space stays in the file until the image is compacted. Durable at
    /// the next flush (one BAT sector write each).
    pub fn release(&mut self, offset: u64, len: u64) -> Result<u64> {
        if !self.writable {
            return Err(Error::ReadOnly {
                path: self.path.clone(),
            });
        }
        self.check_range(offset, len)?;
        if self.disk_type() == DiskType::Fixed || len == 0 {
            return Ok(0);
        }
        let (bs, end) = (self.block_size, offset + len);
        let mut released = 0;
        let mut block = offset.div_ceil(bs);
        while block * bs < end {
            let block_end = (block * bs + bs).min(self.virtual_size);
            if block_end > end {
                break;
            }
            let b = block as u32;
            if self.bat[b as usize] != UNALLOCATED {
                self.bat[b as usize] = UNALLOCATED;
                self.bitmaps.remove(&b);
                self.dirty_bitmaps.remove(&b);
                self.dirty_bat.insert(b as usize / 128);
                released += 1;
            }
            block += 1;
        }
        Ok(released)
    }
}

impl<F: ImageFile> Drop for VhdImage<F> {
    fn drop(&mut self) {
        if self.writable && (!self.dirty_bat.is_empty() || !self.dirty_bitmaps.is_empty()) {
            if let Err(e) = self.flush() {
                tracing::error!("{}: flush on close failed: {e}", self.path.display());
            }
        }
    }
}
