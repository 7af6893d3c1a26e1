//! Making writes durable: flush (payload, then sector bitmaps and BAT through the log, then
//! in place, in that order) and close (flush, then clear the log GUID so the file is clean for
//! every reader). An image dropped without `close` is flushed on a best-effort basis.

use crate::error::Result;
use crate::format::{bat_bytes, Header, HEADER_OFFSETS};
use crate::image::{io, Durability, VhdxImage};
use crate::log::{build_entry, MAX_PAGES_PER_ENTRY, SECTOR};
use image_io::ImageFile;
use uuid::Uuid;

impl<F: ImageFile> VhdxImage<F> {
    /// Makes `pages` durable in the log as one entry: opens the log first if it is closed (a
    /// new LogGuid in the header), wraps to the log's start when the entry does not fit before
    /// its end, writes the entry and syncs. The caller then applies the pages in place and
    /// syncs, and closes the log ([`VhdxImage::close_log`]) once everything is applied: the
    /// crash-critical order every metadata change of this crate follows.
    pub(crate) fn append_log_entry(&mut self, pages: &[(u64, &[u8; SECTOR])]) -> Result<()> {
        if !self.log_active {
            let mut h = self.header.clone();
            h.log_guid = Uuid::new_v4();
            self.write_header(h)?;
            self.log_active = true;
            self.log_position = 0;
        }
        let flushed = self.file.len().map_err(io(&self.path, "stat", 0))?;
        let entry_len = (1 + pages.len()) as u64 * SECTOR as u64;
        if self.log_position + entry_len > self.header.log_length as u64 {
            self.log_position = 0;
        }
        let entry = build_entry(
            self.log_position,
            self.log_sequence,
            self.header.log_guid,
            flushed,
            self.next_alloc.max(flushed),
            pages,
        );
        let at = self.header.log_offset + self.log_position;
        self.file
            .write_all_at(&entry, at)
            .map_err(io(&self.path, "write log entry", at))?;
        self.sync("sync log")?;
        self.log_position += entry_len;
        self.log_sequence += 1;
        Ok(())
    }

    /// Closes an open log (LogGuid cleared in the header): for when every entry is applied in
    /// place and synced, so the file needs no replay and reads right in any tool.
    pub(crate) fn close_log(&mut self) -> Result<()> {
        if self.log_active {
            let mut h = self.header.clone();
            h.log_guid = Uuid::nil();
            self.write_header(h)?;
            self.log_active = false;
        }
        Ok(())
    }

    pub(crate) fn sync(&self, op: &'static str) -> Result<()> {
        self.file.sync_data().map_err(io(&self.path, op, 0))
    }

    /// Writes `h` (sequence + 1) to the other header slot and syncs: the header update protocol.
    pub(crate) fn write_header(&mut self, mut h: Header) -> Result<()> {
        h.sequence_number = self.header.sequence_number + 1;
        let slot = 1 - self.header_slot;
        self.file
            .write_all_at(&h.to_bytes(), HEADER_OFFSETS[slot])
            .map_err(io(&self.path, "write header", HEADER_OFFSETS[slot]))?;
        self.sync("sync header")?;
        self.header = h;
        self.header_slot = slot;
        Ok(())
    }

    fn dirty_pages(&self) -> Vec<(u64, Box<[u8; SECTOR]>)> {
        let mut pages = Vec::new();
        for &at in &self.dirty_bitmap_pages {
            pages.push((at, self.bitmap_pages[&at].clone()));
        }
        for &p in &self.dirty_bat_pages {
            let mut page = Box::new([0u8; SECTOR]);
            let first = (p * SECTOR as u64 / 8) as usize;
            let end = (first + SECTOR / 8).min(self.bat.len());
            let bytes = bat_bytes(&self.bat[first..end]);
            page[..bytes.len()].copy_from_slice(&bytes);
            pages.push((self.regions.bat_offset + p * SECTOR as u64, page));
        }
        pages
    }

    /// Makes every completed write durable. Metadata changes go through the log: payload sync,
    /// log entry, sync, apply, sync.
    pub fn flush(&mut self) -> Result<()> {
        if !self.writable {
            return Ok(());
        }
        if self.dirty_bat_pages.is_empty() && self.dirty_bitmap_pages.is_empty() {
            return self.sync("flush");
        }
        let pages = self.dirty_pages();
        let durable = self.durability == Durability::Durable;
        if durable {
            self.sync("sync payload before metadata")?;
            for chunk in pages.chunks(MAX_PAGES_PER_ENTRY) {
                let refs: Vec<(u64, &[u8; SECTOR])> =
                    chunk.iter().map(|(o, p)| (*o, &**p)).collect();
                self.append_log_entry(&refs)?;
                for (o, p) in chunk {
                    self.file.write_all_at(&p[..], *o).map_err(io(
                        &self.path,
                        "apply log page",
                        *o,
                    ))?;
                }
                self.sync("sync applied metadata")?;
            }
            // Everything is applied and synced: close the log again, so that between flushes
            // (and after a crash outside one) the file needs no replay and reads right in any
            // tool, not only in those that replay logs.
            self.close_log()?;
        } else {
            for (o, p) in &pages {
                self.file.write_all_at(&p[..], *o).map_err(io(
                    &self.path,
                    "write metadata page",
                    *o,
                ))?;
            }
            self.sync("flush")?;
        }
        self.dirty_bat_pages.clear();
        self.dirty_bitmap_pages.clear();
        self.file_len = self.file.len().map_err(io(&self.path, "stat", 0))?;
        Ok(())
    }

    /// Flushes and clears the log GUID: the file is then clean for any reader.
    pub fn close(mut self) -> Result<()> {
        self.close_inner()
    }

    fn close_inner(&mut self) -> Result<()> {
        if !self.writable {
            return Ok(());
        }
        self.flush()?;
        self.close_log()
    }
}

impl<F: ImageFile> Drop for VhdxImage<F> {
    fn drop(&mut self) {
        if let Err(e) = self.close_inner() {
            tracing::error!("{}: close failed: {e}", self.path.display());
        }
    }
}
