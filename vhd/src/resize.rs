//! Changing the virtual size of an image in place (Resize-VHD; also shrinking).
//!
//! ```text
//! fixed grow:    footer at the new end (synced) -> zeros over [old end, new end) (synced)
//! fixed shrink:  footer at the new end (synced) -> truncate after it
//! dynamic grow:  BAT needs more room? move the blocks / locator data in its way to the end
//!                (copy, sync, repoint, sync) -> new BAT entries unallocated (synced)
//!                -> header max_table_entries (synced) -> footer (synced) -> footer copy
//! dynamic shrink: blocks past the end unallocated (synced) -> footer -> footer copy ->
//!                header -> holes closed and the file shortened (see [`crate::compact`])
//! ```
//!
//! Invariants:
//! - Growing never changes what the old range reads; the new range reads as zeros (a dynamic
//!   image's last block is zero-filled past the old end first; a differencing image's new range
//!   comes from its parent, which reads as zeros past its own end).
//! - Shrinking is refused when any non-zero sector of this image lies past the new end; the
//!   error says how many bytes and where the first one is. (The parent of a differencing image
//!   is the caller's to check.)
//! - The 2040 GiB VHD limit holds; sizes are whole sectors.
//! - Every step is synced before the next. The footer and its copy at offset 0 are two separate
//!   sector writes: a crash between them leaves a copy that differs, which `check` reports and
//!   `check --repair` restores from the footer at the end (the authoritative one).

use crate::create::validate_size;
use crate::error::{Error, Result};
use crate::footer::{DiskType, Footer, FOOTER_SIZE};
use crate::geometry::Geometry;
use crate::image::VhdImage;
use crate::layout::{read_at, write_at, UNALLOCATED};
use image_io::ImageFile;

/// Zero buffer size for filling new space.
const ZERO_CHUNK: u64 = 1 << 20;

impl<F: ImageFile> VhdImage<F> {
    /// Bytes of non-zero data this image stores at or past `offset`, and where the first such
    /// sector is (only sectors present in this file count).
    pub fn data_beyond(&mut self, offset: u64) -> Result<(u64, Option<u64>)> {
        let size = self.virtual_size;
        if offset >= size {
            return Ok((0, None));
        }
        let (mut bytes, mut first) = (0u64, None);
        let mut buf = vec![0u8; ZERO_CHUNK as usize];
        let mut pos = offset - offset % 512;
        while pos < size {
            let len = (size - pos).min(ZERO_CHUNK);
            for e in self.resolve_read(pos, len)? {
                let crate::image::ReadSource::Data { file_offset } = e.source else {
                    continue;
                };
                let b = &mut buf[..e.len as usize];
                read_at(&self.file, &self.path, b, file_offset, "read data")?;
                for (i, s) in b.chunks(512).enumerate() {
                    if s.iter().any(|&x| x != 0) {
                        bytes += s.len() as u64;
                        first.get_or_insert(e.offset + i as u64 * 512);
                    }
                }
            }
            pos += len;
        }
        Ok((bytes, first))
    }

    /// Sets the virtual size to `new_size`; see the [module docs](self). `progress` is called
    /// with bytes of new space zero-filled (fixed images).
    pub fn resize(&mut self, new_size: u64, progress: &mut dyn FnMut(u64)) -> Result<()> {
        if !self.writable {
            return Err(Error::ReadOnly {
                path: self.path.clone(),
            });
        }
        validate_size(new_size)?;
        self.flush()?;
        let old = self.virtual_size;
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
        let mut footer = self.footer.clone();
        footer.current_size = new_size;
        let spec = Geometry::for_size(new_size);
        footer.geometry = if spec.bytes() == new_size {
            spec
        } else {
            Geometry::MAX
        };
        let bytes = footer.to_bytes();
        if self.disk_type() == DiskType::Fixed {
            self.resize_fixed(new_size, bytes, progress)?;
        } else if new_size > old {
            self.grow_dynamic(new_size, bytes)?;
        } else {
            self.shrink_dynamic(new_size, bytes)?;
        }
        self.footer = Footer::parse(&bytes);
        self.footer_bytes = bytes;
        self.virtual_size = new_size;
        Ok(())
    }

    fn resize_fixed(
        &mut self,
        new_size: u64,
        footer: [u8; FOOTER_SIZE],
        progress: &mut dyn FnMut(u64),
    ) -> Result<()> {
        let old = self.virtual_size;
        write_at(&self.file, &self.path, &footer, new_size, "write footer")?;
        self.sync("sync new footer")?;
        if new_size > old {
            // Zero the new space, the old footer's sector first.
            let zeros = vec![0u8; ZERO_CHUNK as usize];
            let mut at = old;
            while at < new_size {
                let n = (new_size - at).min(ZERO_CHUNK);
                write_at(
                    &self.file,
                    &self.path,
                    &zeros[..n as usize],
                    at,
                    "zero new space",
                )?;
                progress(n);
                at += n;
            }
            self.sync("sync new space")?;
        } else {
            self.file
                .set_len(new_size + FOOTER_SIZE as u64)
                .map_err(|source| Error::Io {
                    path: self.path.clone(),
                    op: "truncate",
                    offset: new_size,
                    source,
                })?;
            self.sync("sync truncation")?;
        }
        self.footer_offset = new_size;
        Ok(())
    }

    /// Writes the footer at the end, then its copy at offset 0, each synced.
    fn write_footers(&mut self, footer: &[u8; FOOTER_SIZE]) -> Result<()> {
        write_at(
            &self.file,
            &self.path,
            footer,
            self.footer_offset,
            "write footer",
        )?;
        self.sync("sync footer")?;
        write_at(&self.file, &self.path, footer, 0, "write footer copy")?;
        self.sync("sync footer copy")
    }

    /// Writes the dynamic header (with a fresh checksum) and syncs.
    pub(crate) fn write_header(&mut self) -> Result<()> {
        let h = self.header.as_ref().expect("dynamic image has a header");
        let bytes = h.to_bytes();
        let at = self.footer.data_offset;
        write_at(&self.file, &self.path, &bytes, at, "write dynamic header")?;
        self.sync("sync dynamic header")
    }

    /// Space for `len` bytes past the last block: the footer moves behind it first (synced).
    /// Returns the offset; `bitmap` asks for block placement (data 4 KiB aligned after it).
    pub(crate) fn append_space(&mut self, len: u64, bitmap: u64) -> Result<u64> {
        let at = (self.footer_offset + FOOTER_SIZE as u64 + bitmap).next_multiple_of(4096) - bitmap;
        let new_footer = at + len;
        if new_footer / 512 >= UNALLOCATED as u64 {
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
        self.sync("sync moved footer")?;
        self.footer_offset = new_footer;
        Ok(at)
    }

    fn copy_range(&self, from: u64, to: u64, len: u64) -> Result<()> {
        let mut buf = vec![0u8; len.min(4 << 20) as usize];
        let mut done = 0;
        while done < len {
            let n = (len - done).min(buf.len() as u64) as usize;
            read_at(
                &self.file,
                &self.path,
                &mut buf[..n],
                from + done,
                "read to move",
            )?;
            write_at(&self.file, &self.path, &buf[..n], to + done, "move")?;
            done += n as u64;
        }
        Ok(())
    }

    fn grow_dynamic(&mut self, new_size: u64, footer: [u8; FOOTER_SIZE]) -> Result<()> {
        let old = self.virtual_size;
        let bs = self.block_size;
        let new_entries = new_size.div_ceil(bs);
        let entries32 = u32::try_from(new_entries)
            .map_err(|_| Error::InvalidArgument("too many blocks".into()))?;
        let (table, max_entries) = {
            let h = self.header.as_ref().expect("dynamic image has a header");
            (h.table_offset, h.max_table_entries as u64)
        };
        let mut moved = false;
        if new_entries > max_entries {
            let need_end = table + (new_entries * 4).next_multiple_of(512);
            let old_end = table + (max_entries * 4).next_multiple_of(512);
            moved = self.clear_way(old_end, need_end)?;
            // The new entries: unallocated.
            let ff = vec![0xFFu8; (need_end - old_end) as usize];
            write_at(&self.file, &self.path, &ff, old_end, "extend BAT")?;
            // Entries between the old count and the old table's padding.
            let pad_from = table + self.bat.len() as u64 * 4;
            if pad_from < old_end {
                let ff = vec![0xFFu8; (old_end - pad_from) as usize];
                write_at(&self.file, &self.path, &ff, pad_from, "extend BAT")?;
            }
            self.sync("sync extended BAT")?;
        } else {
            // Entries the old size did not use may hold anything: make them unallocated.
            let from = table + self.bat.len() as u64 * 4;
            let ff = vec![0xFFu8; ((new_entries - self.bat.len() as u64) * 4) as usize];
            write_at(&self.file, &self.path, &ff, from, "extend BAT")?;
            self.sync("sync extended BAT")?;
        }
        // The old last block's bytes past the old end become visible: zero them.
        let last = (old - 1) / bs;
        if !old.is_multiple_of(bs) && self.bat[last as usize] != UNALLOCATED {
            let data = self.bat[last as usize] as u64 * 512 + self.bitmap_size;
            let from = old - last * bs;
            let zeros = vec![0u8; (bs - from) as usize];
            write_at(
                &self.file,
                &self.path,
                &zeros,
                data + from,
                "zero block tail",
            )?;
            self.sync("sync block tail")?;
        }
        self.bat.resize(new_entries as usize, UNALLOCATED);
        if let Some(h) = self.header.as_mut() {
            h.max_table_entries = h.max_table_entries.max(entries32);
        }
        self.write_header()?;
        self.write_footers(&footer)?;
        self.footer_bytes = footer;
        self.footer = Footer::parse(&footer);
        self.virtual_size = new_size;
        if moved {
            // Blocks that made way for the BAT left holes behind it: close them.
            self.compact(crate::CompactMode::Quick, None, &mut |_| {})?;
        }
        Ok(())
    }

    /// Makes `[from, to)` free for the BAT: parent locator payloads in the way move to just
    /// past `to` (or to the end of the file when that place is taken), and every block in the
    /// way of either moves to the end of the file (copy, sync, repoint, sync). Returns whether
    /// anything moved.
    fn clear_way(&mut self, from: u64, to: u64) -> Result<bool> {
        let bb = self.block_bytes();
        let hdr = self.footer.data_offset;
        if hdr < to && from < hdr + 1024 {
            return Err(Error::Unsupported {
                path: self.path.clone(),
                what: "the dynamic header lies where the BAT must grow".into(),
            });
        }
        let locators = self.header.as_ref().map(|h| h.locators).unwrap_or_default();
        let span = |l: &crate::locator::LocatorEntry| {
            let space = (l.data_space as u64)
                .max(l.data_length as u64)
                .next_multiple_of(512);
            (l.data_offset, l.data_offset + space)
        };
        let live: Vec<(usize, (u64, u64))> = locators
            .iter()
            .enumerate()
            .filter(|(_, l)| l.code.0 != 0 && l.data_length > 0)
            .map(|(i, l)| (i, span(l)))
            .collect();
        let in_way: Vec<(usize, (u64, u64))> = live
            .iter()
            .copied()
            .filter(|(_, (s, e))| *s < to && *e > from)
            .collect();
        let clear_to = to + in_way.iter().map(|(_, (s, e))| e - s).sum::<u64>();
        let blocks: Vec<u32> = (0..self.bat.len() as u32)
            .filter(|&b| {
                let e = self.bat[b as usize];
                e != UNALLOCATED && (e as u64 * 512) < clear_to && e as u64 * 512 + bb > from
            })
            .collect();
        let moved = !blocks.is_empty() || !in_way.is_empty();
        for block in blocks {
            let src = self.bat[block as usize] as u64 * 512;
            let dst = self.append_space(bb, self.bitmap_size)?;
            self.copy_range(src, dst, bb)?;
            self.sync("sync moved block")?;
            self.bat[block as usize] = (dst / 512) as u32;
            self.dirty_bat.insert(block as usize / 128);
            self.write_dirty_bat()?;
        }
        let mut at = to;
        for (i, (s, e)) in in_way {
            let space = e - s;
            let taken = live
                .iter()
                .any(|(_, (ls, le))| *ls < at + space && at < *le);
            let dst = if taken || at + space > self.footer_offset {
                self.append_space(space, 0)?
            } else {
                at += space;
                at - space
            };
            let len = locators[i].data_length as u64;
            self.copy_range(s, dst, len)?;
            self.sync("sync moved locator")?;
            if let Some(h) = self.header.as_mut() {
                h.locators[i].data_offset = dst;
                h.locators[i].data_space = space as u32;
            }
            self.write_header()?;
        }
        Ok(moved)
    }

    fn shrink_dynamic(&mut self, new_size: u64, footer: [u8; FOOTER_SIZE]) -> Result<()> {
        let new_entries = new_size.div_ceil(self.block_size) as usize;
        for b in new_entries..self.bat.len() {
            if self.bat[b] != UNALLOCATED {
                self.bat[b] = UNALLOCATED;
                self.bitmaps.remove(&(b as u32));
                self.dirty_bat.insert(b / 128);
            }
        }
        self.write_dirty_bat()?;
        self.write_footers(&footer)?;
        // Compaction below writes the footer at the new end of the file: the new one.
        self.footer_bytes = footer;
        self.footer = Footer::parse(&footer);
        self.bat.truncate(new_entries);
        if let Some(h) = self.header.as_mut() {
            h.max_table_entries = new_entries as u32;
        }
        self.write_header()?;
        self.virtual_size = new_size;
        self.compact(crate::CompactMode::Quick, None, &mut |_| {})?;
        Ok(())
    }
}
