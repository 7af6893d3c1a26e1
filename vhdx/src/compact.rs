//! Compaction of dynamic and differencing VHDX images, in place: blocks that hold nothing
//! become ZERO or NOT_PRESENT, the blocks at the end of the file move down into the holes, and
//! the file is cut short.
//!
//! ```text
//! before: | hdr | log | meta | BAT | A | hole | B | C(zeros) | D |
//! release: C -> ZERO (dynamic) / NOT_PRESENT (differencing, equal to the parent)   [logged]
//! move:    D copied into the hole, synced; BAT entry -> hole                       [logged]
//! clean:   LogGuid cleared, then the file truncated after the last live byte
//! after:  | hdr | log | meta | BAT | A | D | B |
//! ```
//!
//! Modes: [`CompactMode::Quick`] releases only partially present blocks with no sector
//! present (and sector-bitmap blocks no partially present block needs); [`CompactMode::Full`]
//! also reads every allocated block and releases those that read as zeros (state ZERO, which
//! reads as zeros in differencing images too) or, in a differencing image whose parent view
//! the caller supplies, as the parent's bytes (state NOT_PRESENT). Both modes close holes.
//!
//! The hole-closing loop is the one both formats share ([`image_io::compact::close_holes`]);
//! this module says where blocks may go, how they move and how a batch of moves commits.
//!
//! Invariants (every step leaves a valid image with the same content):
//! - BAT and sector-bitmap changes go through the log ([`VhdxImage::flush`]); a block's
//!   bitmap bits are cleared in the same flush that makes it NOT_PRESENT, bitmap pages first.
//! - A move copies the block to space nothing points to and syncs before the logged BAT
//!   change; space freed by a move is reused only after that change is durable.
//! - The file is only truncated after the log is closed (LogGuid cleared): a log entry that
//!   remembers a longer file would otherwise make replay refuse the image as truncated.
//! - User-visible data does not change, so DataWriteGuid is kept and children stay linked.

use crate::error::{Error, Result};
use crate::format::{state, BatEntry, MIB};
use crate::image::{io, VhdxImage};
use image_io::compact::{close_holes, BlockMover, FreeRanges, LiveBlock};
use image_io::ImageFile;

pub use image_io::format::{BackingReader, CompactMode, CompactReport};

/// Bytes copied between two logged BAT updates.
const BATCH_BYTES: u64 = 256 << 20;
/// Copy and scan buffer size.
const CHUNK: u64 = 4 << 20;

fn has_data(e: BatEntry) -> bool {
    matches!(e.state(), state::FULLY_PRESENT | state::PARTIALLY_PRESENT)
}

impl<F: ImageFile> VhdxImage<F> {
    /// Compacts a dynamic or differencing image in place; see the [module docs](self).
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
        if self.params.leave_blocks_allocated {
            return Err(Error::InvalidArgument(format!(
                "{}: a fixed image keeps every block allocated (convert it to a dynamic image)",
                self.path.display()
            )));
        }
        self.flush()?;
        let mut report = CompactReport {
            file_size_before: self.file.len().map_err(io(&self.path, "stat", 0))?,
            ..Default::default()
        };
        let diff = self.params.has_parent;
        let bs = self.params.block_size as u64;
        for block in 0..self.payload_blocks() {
            let idx = self.payload_index(block);
            let e = self.bat[idx];
            if !has_data(e) {
                continue;
            }
            let new_state = match (e.state(), mode) {
                (state::PARTIALLY_PRESENT, _) if self.block_bits_clear(block)? => {
                    Some(state::NOT_PRESENT)
                }
                (_, CompactMode::Quick) => None,
                (_, CompactMode::Full) => self.redundant_state(block, &mut backing)?,
            };
            progress(bs);
            if let Some(s) = new_state {
                if diff {
                    self.clear_block_bits(block)?;
                }
                self.set_bat(idx, BatEntry::new(s, 0));
                report.blocks_released += 1;
            }
        }
        if diff {
            report.blocks_released += self.release_unneeded_bitmaps();
        }
        self.flush()?;
        report.blocks_moved = self.close_holes(progress)?;
        self.truncate_to_live_end()?;
        report.file_size_after = self.file.len().map_err(io(&self.path, "stat", 0))?;
        Ok(report)
    }

    /// Virtual sector range `[first, end)` of payload block `block`.
    fn block_sectors(&self, block: u64) -> (u64, u64) {
        let lss = self.params.logical_sector_size as u64;
        let bs = self.params.block_size as u64;
        let first = block * bs / lss;
        let end = ((block + 1) * bs)
            .min(self.params.virtual_size)
            .div_ceil(lss);
        (first, end)
    }

    /// Whether no sector of a partially present block is present.
    fn block_bits_clear(&mut self, block: u64) -> Result<bool> {
        let (first, end) = self.block_sectors(block);
        for s in first..end {
            if s % 8 == 0 && s + 8 <= end {
                let (page, bit) = self.bitmap_location(s);
                if self.bitmap_page(page)?[bit / 8] != 0 {
                    return Ok(false);
                }
                continue;
            }
            if self.sector_present(s)? {
                return Ok(false);
            }
        }
        Ok(true)
    }

    /// Clears the bitmap bits of `block` (if its chunk has a sector bitmap).
    fn clear_block_bits(&mut self, block: u64) -> Result<()> {
        let chunk = block / self.chunk_ratio();
        if self.bat[self.bitmap_index(chunk)].state() != state::SB_PRESENT {
            return Ok(());
        }
        let (first, end) = self.block_sectors(block);
        for s in first..end {
            let (page, bit) = self.bitmap_location(s);
            let p = self.bitmap_page(page)?;
            if p[bit / 8] & (1 << (bit % 8)) != 0 {
                p[bit / 8] &= !(1 << (bit % 8));
                self.dirty_bitmap_pages.insert(page);
            }
        }
        Ok(())
    }

    /// The state `block` can take without changing what it reads as, if any: ZERO when its
    /// data is all zeros, NOT_PRESENT when it equals the parent's view (`backing`).
    fn redundant_state(
        &mut self,
        block: u64,
        backing: &mut Option<BackingReader<'_>>,
    ) -> Result<Option<u8>> {
        let e = self.bat[self.payload_index(block)];
        let lss = self.params.logical_sector_size as u64;
        let bs = self.params.block_size as u64;
        let base = block * bs;
        let end = (base + bs).min(self.params.virtual_size);
        let partial = e.state() == state::PARTIALLY_PRESENT;
        let (mut zero, mut same) = (!partial, backing.is_some());
        let mut buf = vec![0u8; CHUNK.min(bs) as usize];
        let mut other = vec![0u8; buf.len()];
        let mut pos = base;
        while pos < end && (zero || same) {
            // Runs of one presence (whole blocks are one run when fully present).
            let mut run_end = (pos + buf.len() as u64).min(end);
            let present = if partial {
                let p = self.sector_present(pos / lss)?;
                let mut s = pos / lss + 1;
                while s * lss < run_end && self.sector_present(s)? == p {
                    s += 1;
                }
                run_end = run_end.min(s * lss);
                p
            } else {
                true
            };
            if present {
                let n = (run_end - pos) as usize;
                self.read_file_at(&mut buf[..n], e.file_offset() + (pos - base))?;
                zero = zero && buf[..n].iter().all(|&b| b == 0);
                if same {
                    if let Some(read_parent) = backing.as_mut() {
                        read_parent(pos, &mut other[..n]).map_err(io(
                            &self.path,
                            "read parent",
                            pos,
                        ))?;
                        same = buf[..n] == other[..n];
                    }
                }
            }
            pos = run_end;
        }
        Ok(if same && self.params.has_parent {
            Some(state::NOT_PRESENT)
        } else if zero {
            Some(state::ZERO)
        } else {
            None
        })
    }

    /// Marks sector-bitmap blocks of chunks without a partially present block not present.
    fn release_unneeded_bitmaps(&mut self) -> u64 {
        let cr = self.chunk_ratio();
        let n = self.payload_blocks();
        let mut released = 0;
        for chunk in 0..n.div_ceil(cr) {
            let sb = self.bitmap_index(chunk);
            if self.bat[sb].state() != state::SB_PRESENT {
                continue;
            }
            let needed = (chunk * cr..((chunk + 1) * cr).min(n))
                .any(|b| self.bat[self.payload_index(b)].state() == state::PARTIALLY_PRESENT);
            if !needed {
                let at = self.bat[sb].file_offset();
                self.bitmap_pages
                    .retain(|&p, _| !(at..at + MIB).contains(&p));
                self.dirty_bitmap_pages
                    .retain(|&p| !(at..at + MIB).contains(&p));
                self.set_bat(sb, BatEntry::new(state::NOT_PRESENT, 0));
                released += 1;
            }
        }
        released
    }

    /// Size on disk of the block behind BAT entry `idx`.
    pub(crate) fn entry_bytes(&self, idx: usize) -> u64 {
        if (idx as u64 + 1).is_multiple_of(self.chunk_ratio() + 1) {
            MIB
        } else {
            self.params.block_size as u64
        }
    }

    /// Live blocks sorted by file offset: (offset, BAT index).
    fn live_blocks(&self) -> Vec<(u64, usize)> {
        let mut v: Vec<(u64, usize)> = self
            .bat
            .iter()
            .enumerate()
            .filter(|(_, &e)| has_data(e))
            .map(|(i, e)| (e.file_offset(), i))
            .collect();
        v.sort_unstable();
        v
    }

    /// File ranges of the fixed structures: header section, log, BAT and metadata regions.
    pub(crate) fn structure_ranges(&self) -> Vec<(u64, u64)> {
        let r = self.regions;
        let h = &self.header;
        vec![
            (0, MIB),
            (h.log_offset, h.log_offset + h.log_length as u64),
            (r.bat_offset, r.bat_offset + r.bat_length),
            (r.metadata_offset, r.metadata_offset + r.metadata_length),
        ]
    }

    /// Moves blocks from the end of the file into holes until none fits; returns how many moved.
    pub(crate) fn close_holes(&mut self, progress: &mut dyn FnMut(u64)) -> Result<u64> {
        let live: Vec<LiveBlock> = self
            .live_blocks()
            .into_iter()
            .map(|(offset, id)| LiveBlock {
                offset,
                len: self.entry_bytes(id),
                id,
            })
            .collect();
        let end = self.file.len().map_err(io(&self.path, "stat", 0))?;
        let mut used = self.structure_ranges();
        used.extend(live.iter().map(|b| (b.offset, b.offset + b.len)));
        let free = FreeRanges::gaps(used, end.next_multiple_of(MIB));
        close_holes(&mut Mover(self), live, free, BATCH_BYTES, CHUNK, progress)
    }

    /// Closes the log, then truncates the file after the last live byte.
    pub(crate) fn truncate_to_live_end(&mut self) -> Result<()> {
        let live_end = self
            .structure_ranges()
            .into_iter()
            .map(|r| r.1)
            .chain(
                self.live_blocks()
                    .into_iter()
                    .map(|(s, i)| s + self.entry_bytes(i)),
            )
            .max()
            .unwrap_or(MIB);
        let len = self.file.len().map_err(io(&self.path, "stat", 0))?;
        if live_end >= len {
            return Ok(());
        }
        self.flush()?;
        self.close_log()?;
        self.file
            .set_len(live_end)
            .map_err(io(&self.path, "truncate", live_end))?;
        self.sync("sync truncation")?;
        self.file_len = live_end;
        self.next_alloc = live_end.next_multiple_of(MIB);
        Ok(())
    }
}

/// The image as the shared hole-closing loop sees it.
struct Mover<'a, F: ImageFile>(&'a mut VhdxImage<F>);

impl<F: ImageFile> BlockMover for Mover<'_, F> {
    type Error = Error;

    fn read(&mut self, buf: &mut [u8], offset: u64) -> Result<()> {
        self.0.read_file_at(buf, offset)
    }

    fn write(&mut self, buf: &[u8], offset: u64) -> Result<()> {
        let i = &self.0;
        i.file
            .write_all_at(buf, offset)
            .map_err(io(&i.path, "move block", offset))
    }

    fn repoint(&mut self, id: usize, to: u64) {
        let e = self.0.bat[id];
        self.0.set_bat(id, BatEntry::new(e.state(), to));
    }

    /// Syncs the copies, then makes the BAT change durable through the log.
    fn commit(&mut self) -> Result<()> {
        self.0.sync("sync moved blocks")?;
        self.0.flush()?;
        // Sector-bitmap pages are cached by file offset: moved ones must be read afresh.
        self.0.bitmap_pages.clear();
        Ok(())
    }
}
