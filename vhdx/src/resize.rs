//! Changing the virtual size of a VHDX in place (Resize-VHD, both ways).
//!
//! ```text
//! grow:   BAT region too small? new BAT at the end of the file (old entries copied, synced)
//!         old last block's tail zeroed (payload, synced) / its bits cleared
//!         new entries (ZERO / NOT_PRESENT / fixed: new zero-filled blocks)      [logged]
//!         region table x2 -> new BAT, then Virtual Disk Size                    [logged, one entry]
//! shrink: entries past the end cleared                                          [logged]
//!         Virtual Disk Size                                                     [logged]
//!         holes closed, log closed, file truncated (see [`crate::compact`])
//! ```
//!
//! Invariants:
//! - Growing never changes what the old range reads; the new range reads as zeros (from the
//!   parent for a differencing image, which reads as zeros past its own end).
//! - Shrinking is refused while any non-zero sector of this image lies past the new end; the
//!   error names the amount and the first offset.
//! - The BAT entries a size needs are durable before the size is: at every crash point the
//!   image opens with either size.
//! - DataWriteGuid changes first (the size is user-visible): children of this image no longer
//!   link to it, as with any other change of its content.
//! - Sizes are whole logical sectors, at most 64 TiB.

use crate::edit::Patch;
use crate::error::{Error, Result};
use crate::format::{guids, state, BatEntry, RegionTable, MAX_VIRTUAL_SIZE, MIB, REGION_OFFSETS};
use crate::image::{io, VhdxImage};
use crate::log::SECTOR;
use image_io::ImageFile;

const CHUNK: u64 = 4 << 20;

impl<F: ImageFile> VhdxImage<F> {
    /// Bytes of non-zero data this image stores at or past `offset`, and where the first such
    /// logical sector is.
    pub fn data_beyond(&mut self, offset: u64) -> Result<(u64, Option<u64>)> {
        let size = self.params.virtual_size;
        let lss = self.params.logical_sector_size as u64;
        let (mut bytes, mut first) = (0u64, None);
        let mut buf = vec![0u8; CHUNK as usize];
        let mut pos = offset - offset % lss;
        while pos < size {
            let len = (size - pos).min(CHUNK);
            for e in self.resolve_read(pos, len)? {
                let crate::image::ReadSource::Data { file_offset } = e.source else {
                    continue;
                };
                let b = &mut buf[..e.len as usize];
                self.read_file_at(b, file_offset)?;
                for (i, s) in b.chunks(lss as usize).enumerate() {
                    if s.iter().any(|&x| x != 0) {
                        bytes += s.len() as u64;
                        first.get_or_insert(e.offset + i as u64 * lss);
                    }
                }
            }
            pos += len;
        }
        Ok((bytes, first))
    }

    /// BAT entries a disk of `size` bytes needs.
    fn entries_for(&self, size: u64) -> u64 {
        let n = size.div_ceil(self.params.block_size as u64);
        let cr = self.chunk_ratio();
        if self.params.has_parent {
            n.div_ceil(cr) * (cr + 1)
        } else {
            n + (n - 1) / cr
        }
    }

    /// Sets the virtual size to `new_size`; see the [module docs](self). `progress` is called
    /// with bytes of new blocks zero-filled (fixed images).
    pub fn resize(&mut self, new_size: u64, progress: &mut dyn FnMut(u64)) -> Result<()> {
        let lss = self.params.logical_sector_size as u64;
        if new_size == 0 || !new_size.is_multiple_of(lss) || new_size > MAX_VIRTUAL_SIZE {
            return Err(Error::InvalidArgument(format!(
                "virtual size {new_size} must be a positive multiple of {lss} bytes, at most 64 TiB"
            )));
        }
        let old = self.params.virtual_size;
        if new_size == old {
            return Ok(());
        }
        if new_size < old {
            let (bytes, first) = self.data_beyond(new_size)?;
            if let Some(first) = first {
                return Err(Error::InvalidArgument(format!(
                    "{}: cannot shrink to {new_size} bytes: {bytes} bytes of data lie beyond it (the first at offset {first}); move or delete that data first",
                    self.path.display()
                )));
            }
        }
        self.before_data_change()?;
        self.flush()?;
        let Some((size_at, _, _)) = self.metadata_item(guids::VIRTUAL_DISK_SIZE)? else {
            return Err(Error::Corrupt {
                path: self.path.clone(),
                structure: "metadata",
                offset: self.regions.metadata_offset,
                reason: "no virtual disk size item".into(),
            });
        };
        if new_size > old {
            self.grow(new_size, size_at, progress)
        } else {
            self.shrink(new_size, size_at)
        }
    }

    fn grow(&mut self, new_size: u64, size_at: u64, progress: &mut dyn FnMut(u64)) -> Result<()> {
        let old = self.params.virtual_size;
        let bs = self.params.block_size as u64;
        let lss = self.params.logical_sector_size as u64;
        let old_entries = self.bat.len();
        let new_entries = self.entries_for(new_size) as usize;
        let mut patch = Patch::default();
        // A larger BAT region, if needed: extended in place over the blocks behind it (moved to
        // the end of the file first), or, when a fixed structure is in the way, rebuilt at the
        // end of the file.
        if new_entries as u64 * 8 > self.regions.bat_length {
            let len = (new_entries as u64 * 8).next_multiple_of(MIB);
            let len32 = u32::try_from(len).map_err(|_| Error::Unsupported {
                path: self.path.clone(),
                what: "BAT region over 4 GiB".into(),
            })?;
            let (from, to) = (
                self.regions.bat_offset + self.regions.bat_length,
                self.regions.bat_offset + len,
            );
            let blocked = self
                .structure_ranges()
                .iter()
                .any(|&(s, e)| s < to && e > from);
            let at = if blocked {
                let at = self.take_space(len)?;
                let mut raw = crate::format::bat_bytes(&self.bat);
                raw.resize((new_entries * 8).next_multiple_of(SECTOR), 0);
                self.file
                    .write_all_at(&raw, at)
                    .map_err(io(&self.path, "write new BAT", at))?;
                at
            } else {
                self.move_out_of(from, to)?;
                let zeros = vec![0u8; MIB as usize];
                for m in (from..to).step_by(MIB as usize) {
                    self.file.write_all_at(&zeros, m).map_err(io(
                        &self.path,
                        "clear BAT space",
                        m,
                    ))?;
                }
                self.next_alloc = self.next_alloc.max(to);
                self.regions.bat_offset
            };
            self.sync("sync new BAT space")?;
            let mut table = vec![0u8; crate::format::TABLE_SIZE];
            self.read_file_at(&mut table, REGION_OFFSETS[0])?;
            let mut rt = RegionTable::parse(&table).ok_or_else(|| Error::Corrupt {
                path: self.path.clone(),
                structure: "region table",
                offset: REGION_OFFSETS[0],
                reason: "unreadable".into(),
            })?;
            for e in rt
                .entries
                .iter_mut()
                .filter(|e| e.guid == guids::BAT_REGION)
            {
                e.file_offset = at;
                e.length = len32;
            }
            let bytes = rt.to_bytes();
            for r in REGION_OFFSETS {
                patch.put(r, &bytes);
            }
            self.regions.bat_offset = at;
            self.regions.bat_length = len;
        }
        // The old last block's bytes past the old end become visible.
        let last = (old - 1) / bs;
        let tail_from = old - last * bs;
        let e = self.bat[self.payload_index(last)];
        if tail_from < bs {
            match e.state() {
                state::FULLY_PRESENT => {
                    let zeros = vec![0u8; (bs - tail_from) as usize];
                    let at = e.file_offset() + tail_from;
                    self.file.write_all_at(&zeros, at).map_err(io(
                        &self.path,
                        "zero block tail",
                        at,
                    ))?;
                }
                state::PARTIALLY_PRESENT => {
                    for s in old / lss..(last + 1) * bs / lss {
                        let (page, bit) = self.bitmap_location(s);
                        let p = self.bitmap_page(page)?;
                        p[bit / 8] &= !(1 << (bit % 8));
                        self.dirty_bitmap_pages.insert(page);
                    }
                }
                _ => {}
            }
        }
        // New entries.
        let fill = if self.params.has_parent {
            state::NOT_PRESENT
        } else {
            state::ZERO
        };
        self.bat.resize(new_entries, BatEntry::default());
        self.params.virtual_size = new_size;
        let cr = self.chunk_ratio();
        for idx in old_entries..new_entries {
            let is_sb = (idx as u64 + 1).is_multiple_of(cr + 1);
            let e = if is_sb {
                BatEntry::default()
            } else if self.params.leave_blocks_allocated {
                let at = self.take_space(bs)?;
                let zeros = vec![0u8; CHUNK.min(bs) as usize];
                let mut done = 0;
                while done < bs {
                    let n = (bs - done).min(zeros.len() as u64);
                    self.file
                        .write_all_at(&zeros[..n as usize], at + done)
                        .map_err(io(&self.path, "zero new block", at + done))?;
                    progress(n);
                    done += n;
                }
                BatEntry::new(state::FULLY_PRESENT, at)
            } else {
                BatEntry::new(fill, 0)
            };
            self.set_bat(idx, e);
        }
        // Payload synced, then BAT and bitmaps through the log, then the size (and regions).
        self.flush()?;
        patch.put(size_at, &new_size.to_le_bytes());
        self.apply_logged(patch)?;
        // A BAT rebuilt elsewhere leaves its old region free: let blocks fill it.
        self.close_holes(&mut |_| {})?;
        self.truncate_to_live_end()
    }

    /// Moves every block overlapping `[from, to)` to the end of the file: copies synced, then
    /// the BAT change through the log.
    fn move_out_of(&mut self, from: u64, to: u64) -> Result<()> {
        let movers: Vec<usize> = (0..self.bat.len())
            .filter(|&i| {
                let e = self.bat[i];
                matches!(e.state(), state::FULLY_PRESENT | state::PARTIALLY_PRESENT)
                    && e.file_offset() < to
                    && e.file_offset() + self.entry_bytes(i) > from
            })
            .collect();
        let mut buf = vec![0u8; CHUNK as usize];
        for idx in movers {
            let e = self.bat[idx];
            let len = self.entry_bytes(idx);
            let dst = self.take_space(len)?;
            let mut done = 0;
            while done < len {
                let n = (len - done).min(CHUNK) as usize;
                self.read_file_at(&mut buf[..n], e.file_offset() + done)?;
                self.file.write_all_at(&buf[..n], dst + done).map_err(io(
                    &self.path,
                    "move block",
                    dst + done,
                ))?;
                done += n as u64;
            }
            self.set_bat(idx, BatEntry::new(e.state(), dst));
        }
        // flush: payload synced, then the BAT through the log.
        self.flush()?;
        self.bitmap_pages.clear();
        Ok(())
    }

    fn shrink(&mut self, new_size: u64, size_at: u64) -> Result<()> {
        let new_entries = self.entries_for(new_size) as usize;
        // Bitmap bits of sectors past the new end, in the new last block, are cleared.
        if self.params.has_parent {
            let lss = self.params.logical_sector_size as u64;
            let bs = self.params.block_size as u64;
            let last = (new_size - 1) / bs;
            if self.bat[self.payload_index(last)].state() == state::PARTIALLY_PRESENT {
                let end = ((last + 1) * bs).min(self.params.virtual_size);
                for s in new_size / lss..end / lss {
                    let (page, bit) = self.bitmap_location(s);
                    let p = self.bitmap_page(page)?;
                    if p[bit / 8] & (1 << (bit % 8)) != 0 {
                        p[bit / 8] &= !(1 << (bit % 8));
                        self.dirty_bitmap_pages.insert(page);
                    }
                }
            }
        }
        for idx in new_entries..self.bat.len() {
            if self.bat[idx] != BatEntry::default() {
                self.set_bat(idx, BatEntry::default());
            }
        }
        self.flush()?;
        let mut patch = Patch::default();
        patch.put(size_at, &new_size.to_le_bytes());
        self.apply_logged(patch)?;
        self.bat.truncate(new_entries);
        self.params.virtual_size = new_size;
        self.bitmap_pages.clear();
        self.close_holes(&mut |_| {})?;
        self.truncate_to_live_end()
    }
}
