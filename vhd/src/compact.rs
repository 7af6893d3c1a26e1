//! Compaction of dynamic and differencing images, in place: release blocks that hold nothing,
//! move the blocks at the end of the file down into the holes, and cut the file short.
//!
//! ```text
//! before: | meta | A | hole | B | C(zero) | D | footer |
//! release: C's BAT entry -> unallocated            (C read as zeros / the parent already)
//! move:    D copied into the hole, synced, BAT -> hole, synced   (highest block, lowest hole)
//! after:  | meta | A | D | B | footer |
//! ```
//!
//! Modes (Hyper-V's Optimize-VHD words): [`CompactMode::Quick`] releases only blocks whose
//! sector bitmap has no sector present (already trimmed); [`CompactMode::Full`] also reads the
//! data of every allocated block and releases blocks whose present sectors all read as what
//! the block would read without them: zeros in a dynamic image, the parent's bytes in a
//! differencing image (when the caller supplies the parent's view; without it differencing
//! images are compacted as in quick mode). Both modes close every hole in the file. Work is
//! proportional to the allocated data, not to the virtual size.
//!
//! The hole-closing loop is the one both formats share ([`image_io::compact::close_holes`]);
//! this module says where blocks may go, how they move and how a batch of moves commits.
//!
//! Invariants (crash safety: at every step the file is a valid image with the same content):
//! - A release only changes a BAT entry of a block that reads the same without it; the 512-byte
//!   BAT sector is written whole and synced. A crash leaves at most leaked space.
//! - A move copies bitmap and data to space no BAT entry points to, syncs, then repoints the
//!   BAT entry (one sector write) and syncs. Space a move frees is only reused after the BAT
//!   change that freed it is durable.
//! - The file is shortened last: a footer is written past the last live byte and synced, then
//!   the file is truncated just after it, so the file always ends in a footer.

use crate::error::{Error, Result};
use crate::footer::{DiskType, FOOTER_SIZE};
use crate::image::VhdImage;
use crate::layout::{read_at, write_at, UNALLOCATED};
use image_io::compact::{close_holes, BlockMover, FreeRanges, LiveBlock};
use image_io::ImageFile;

pub use image_io::format::{BackingReader, CompactMode, CompactReport};

/// Moves committed together: at most this many bytes copied between two BAT updates.
const BATCH_BYTES: u64 = 64 << 20;
/// Copy buffer size.
const COPY_CHUNK: u64 = 4 << 20;

impl<F: ImageFile> VhdImage<F> {
    /// Compacts a dynamic or differencing image in place; see the [module docs](self).
    /// `backing` supplies the parent's view for full mode on differencing images; `progress`
    /// is called with the number of bytes of allocated data examined or moved.
    pub fn compact(
        &mut self,
        mode: CompactMode,
        mut backing: Option<BackingReader<'_>>,
        progress: &mut dyn FnMut(u64),
    ) -> Result<CompactReport> {
        if !self.writable {
            return Err(Error::ReadOnly {
                path: self.path.clone(),
            });
        }
        if self.disk_type() == DiskType::Fixed {
            return Err(Error::InvalidArgument(format!(
                "{}: a fixed image has no unused blocks to release (convert it to a dynamic image)",
                self.path.display()
            )));
        }
        self.flush()?;
        let mut report = CompactReport {
            file_size_before: self.footer_offset + FOOTER_SIZE as u64,
            ..Default::default()
        };
        // 1. Release blocks that hold nothing.
        let diff = self.disk_type() == DiskType::Differencing;
        let has_backing = backing.is_some();
        for block in 0..self.bat.len() as u32 {
            if self.bat[block as usize] == UNALLOCATED {
                continue;
            }
            let release = match mode {
                CompactMode::Quick => self.block_is_empty(block)?,
                CompactMode::Full if diff && !has_backing => self.block_is_empty(block)?,
                CompactMode::Full => self.block_is_redundant(block, &mut backing)?,
            };
            progress(self.block_size);
            if release {
                self.bat[block as usize] = UNALLOCATED;
                self.bitmaps.remove(&block);
                self.dirty_bat.insert(block as usize / 128);
                report.blocks_released += 1;
            }
        }
        self.write_dirty_bat()?;
        // 2. Move the highest blocks into the lowest holes.
        report.blocks_moved = self.close_holes(progress)?;
        // 3. Cut the file after the last live byte.
        self.truncate_to_live_end()?;
        report.file_size_after = self.footer_offset + FOOTER_SIZE as u64;
        Ok(report)
    }

    /// Whether no sector of `block` is present.
    fn block_is_empty(&mut self, block: u32) -> Result<bool> {
        let spb = self.block_size / 512;
        let b = self.bitmap(block)?;
        Ok(b.run(0, spb) == (false, spb))
    }

    /// Whether every present sector of `block` holds what it would read without the block:
    /// zeros (dynamic) or the parent's bytes (`backing`, differencing).
    fn block_is_redundant(
        &mut self,
        block: u32,
        backing: &mut Option<BackingReader<'_>>,
    ) -> Result<bool> {
        let spb = self.block_size / 512;
        let bitmap = self.bitmap(block)?.clone();
        let data = self.bat[block as usize] as u64 * 512 + self.bitmap_size;
        let base = block as u64 * self.block_size;
        let mut buf = vec![0u8; COPY_CHUNK.min(self.block_size) as usize];
        let mut other = vec![0u8; buf.len()];
        let mut s = 0;
        while s < spb {
            let (present, n) = bitmap.run(s, spb);
            if present {
                let mut at = s * 512;
                let end = ((s + n) * 512).min(self.virtual_size.saturating_sub(base));
                while at < end {
                    let len = (end - at).min(buf.len() as u64) as usize;
                    read_at(
                        &self.file,
                        &self.path,
                        &mut buf[..len],
                        data + at,
                        "read block",
                    )?;
                    let same = match backing {
                        None => buf[..len].iter().all(|&b| b == 0),
                        Some(read_parent) => {
                            read_parent(base + at, &mut other[..len]).map_err(|source| {
                                Error::Io {
                                    path: self.path.clone(),
                                    op: "read parent",
                                    offset: base + at,
                                    source,
                                }
                            })?;
                            buf[..len] == other[..len]
                        }
                    };
                    if !same {
                        return Ok(false);
                    }
                    at += len as u64;
                }
            }
            s += n;
        }
        Ok(true)
    }

    /// Writes the dirty BAT sectors (each one whole) and syncs.
    pub(crate) fn write_dirty_bat(&mut self) -> Result<()> {
        if self.dirty_bat.is_empty() {
            return Ok(());
        }
        let table = self.header.as_ref().map_or(0, |h| h.table_offset);
        for sector in std::mem::take(&mut self.dirty_bat) {
            let first = sector * 128;
            let last = (first + 128).min(self.bat.len());
            let bytes = crate::layout::bat_bytes(&self.bat[first..last]);
            // A BAT sector past the entries in use keeps whatever padding it had.
            write_at(
                &self.file,
                &self.path,
                &bytes,
                table + first as u64 * 4,
                "write BAT",
            )?;
        }
        self.sync("sync BAT")
    }

    /// Bytes of one block on disk: bitmap plus data.
    pub(crate) fn block_bytes(&self) -> u64 {
        self.bitmap_size + self.block_size
    }

    /// File ranges used by metadata: footer copy, dynamic header, BAT, parent locator data.
    pub(crate) fn metadata_ranges(&self) -> Vec<(u64, u64)> {
        let mut v = vec![(0, FOOTER_SIZE as u64)];
        if let Some(h) = &self.header {
            v.push((self.footer.data_offset, self.footer.data_offset + 1024));
            let bat_bytes = (h.max_table_entries as u64 * 4).next_multiple_of(512);
            v.push((h.table_offset, h.table_offset + bat_bytes));
            let used = |l: &&crate::locator::LocatorEntry| {
                l.code.0 != 0 && (l.data_length > 0 || l.data_space > 0)
            };
            for l in h.locators.iter().filter(used) {
                let len = (l.data_length as u64).next_multiple_of(512);
                // The data space is bytes in Windows files and sectors per the spec.
                let space = if l.data_space as u64 >= l.data_length as u64 {
                    l.data_space as u64
                } else {
                    l.data_space as u64 * 512
                };
                let end = l
                    .data_offset
                    .saturating_add(len.max(space.next_multiple_of(512)));
                v.push((l.data_offset, end.min(self.footer_offset)));
            }
        }
        v
    }

    /// Moves blocks from the end of the file into holes until none fits; returns how many moved.
    fn close_holes(&mut self, progress: &mut dyn FnMut(u64)) -> Result<u64> {
        let bb = self.block_bytes();
        let live: Vec<LiveBlock> = self
            .bat
            .iter()
            .enumerate()
            .filter(|(_, &e)| e != UNALLOCATED)
            .map(|(id, &e)| LiveBlock {
                offset: e as u64 * 512,
                len: bb,
                id,
            })
            .collect();
        let mut used = self.metadata_ranges();
        used.extend(live.iter().map(|b| (b.offset, b.offset + b.len)));
        let free = FreeRanges::gaps(used, self.footer_offset);
        close_holes(
            &mut Mover(self),
            live,
            free,
            BATCH_BYTES,
            COPY_CHUNK,
            progress,
        )
    }

    /// Puts the footer just past the last live byte and truncates the file there.
    pub(crate) fn truncate_to_live_end(&mut self) -> Result<()> {
        let bb = self.block_bytes();
        let live_end = self
            .metadata_ranges()
            .iter()
            .map(|r| r.1)
            .chain(
                self.bat
                    .iter()
                    .filter(|&&e| e != UNALLOCATED)
                    .map(|&e| e as u64 * 512 + bb),
            )
            .max()
            .unwrap_or(0)
            .next_multiple_of(512);
        if live_end >= self.footer_offset {
            return Ok(());
        }
        write_at(
            &self.file,
            &self.path,
            &self.footer_bytes,
            live_end,
            "write footer",
        )?;
        self.sync("sync new footer")?;
        self.file
            .set_len(live_end + FOOTER_SIZE as u64)
            .map_err(|source| Error::Io {
                path: self.path.clone(),
                op: "truncate",
                offset: live_end,
                source,
            })?;
        self.sync("sync truncation")?;
        self.footer_offset = live_end;
        Ok(())
    }
}

/// The image as the shared hole-closing loop sees it.
struct Mover<'a, F: ImageFile>(&'a mut VhdImage<F>);

impl<F: ImageFile> BlockMover for Mover<'_, F> {
    type Error = Error;

    /// Data 4 KiB aligned where possible, else at any sector.
    fn place(&self, start: u64, end: u64, len: u64) -> Option<u64> {
        let bitmap = self.0.bitmap_size;
        let aligned = (start + bitmap).next_multiple_of(4096) - bitmap;
        let plain = start.next_multiple_of(512);
        [aligned, plain]
            .into_iter()
            .find(|&at| at >= start && at + len <= end)
    }

    fn read(&mut self, buf: &mut [u8], offset: u64) -> Result<()> {
        let i = &self.0;
        read_at(&i.file, &i.path, buf, offset, "read block to move")
    }

    fn write(&mut self, buf: &[u8], offset: u64) -> Result<()> {
        let i = &self.0;
        write_at(&i.file, &i.path, buf, offset, "move block")
    }

    fn repoint(&mut self, id: usize, to: u64) {
        self.0.bat[id] = (to / 512) as u32;
        self.0.dirty_bat.insert(id / 128);
    }

    /// Syncs the copies, then writes the changed BAT sectors and syncs.
    fn commit(&mut self) -> Result<()> {
        self.0.sync("sync moved blocks")?;
        self.0.write_dirty_bat()
    }
}
