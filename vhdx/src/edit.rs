//! Logged edits of arbitrary metadata bytes (metadata items, region tables), for resize and
//! rebase: the pages holding the bytes are read, patched, written to the log as one entry
//! (synced), applied at their homes and synced, exactly like BAT pages at flush.
//!
//! Invariants: pending BAT and bitmap changes are flushed first, so edits land in the order
//! they are made; a group of pages that must change together fits in one log entry
//! ([`MAX_PAGES_PER_ENTRY`] pages) and is therefore atomic.

use crate::error::{Error, Result};
use crate::format::{parse_metadata_table, TABLE_SIZE};
use crate::image::{io, Durability, VhdxImage};
use crate::log::{MAX_PAGES_PER_ENTRY, SECTOR};
use image_io::ImageFile;
use std::collections::BTreeMap;
use uuid::Uuid;

/// A set of byte patches to apply together.
#[derive(Debug, Default)]
pub(crate) struct Patch {
    writes: Vec<(u64, Vec<u8>)>,
}

impl Patch {
    /// Adds `bytes` at file offset `at`.
    pub(crate) fn put(&mut self, at: u64, bytes: &[u8]) {
        self.writes.push((at, bytes.to_vec()));
    }
}

impl<F: ImageFile> VhdxImage<F> {
    /// File offset and length of metadata item `id`, with its index in the table.
    pub(crate) fn metadata_item(&self, id: Uuid) -> Result<Option<(u64, u32, usize)>> {
        let mut table = vec![0u8; TABLE_SIZE];
        let at = self.regions.metadata_offset;
        self.read_file_at(&mut table, at)?;
        let entries = parse_metadata_table(&table).ok_or_else(|| Error::Corrupt {
            path: self.path.clone(),
            structure: "metadata",
            offset: at,
            reason: "bad metadata table".into(),
        })?;
        Ok(entries
            .iter()
            .enumerate()
            .find(|(_, e)| e.item_id == id)
            .map(|(i, e)| (at + e.offset as u64, e.length, i)))
    }

    /// Applies `patch` atomically through the log (one entry), after flushing pending changes.
    pub(crate) fn apply_logged(&mut self, patch: Patch) -> Result<()> {
        self.flush()?;
        let mut pages: BTreeMap<u64, Box<[u8; SECTOR]>> = BTreeMap::new();
        for (at, bytes) in &patch.writes {
            let mut pos = *at;
            let end = at + bytes.len() as u64;
            while pos < end {
                let page_at = pos / SECTOR as u64 * SECTOR as u64;
                let page = match pages.entry(page_at) {
                    std::collections::btree_map::Entry::Occupied(o) => o.into_mut(),
                    std::collections::btree_map::Entry::Vacant(v) => {
                        let mut p = Box::new([0u8; SECTOR]);
                        self.read_file_at(&mut p[..], page_at)?;
                        v.insert(p)
                    }
                };
                let n = ((page_at + SECTOR as u64).min(end) - pos) as usize;
                let src = (pos - at) as usize;
                let dst = (pos - page_at) as usize;
                page[dst..dst + n].copy_from_slice(&bytes[src..src + n]);
                pos += n as u64;
            }
        }
        if pages.len() > MAX_PAGES_PER_ENTRY {
            return Err(Error::InvalidArgument(format!(
                "{}: a metadata edit of {} pages does not fit in one log entry",
                self.path.display(),
                pages.len()
            )));
        }
        if pages.is_empty() {
            return Ok(());
        }
        let refs: Vec<(u64, &[u8; SECTOR])> = pages.iter().map(|(o, p)| (*o, &**p)).collect();
        if self.durability == Durability::Durable {
            self.append_log_entry(&refs)?;
        }
        for (o, p) in &refs {
            self.file
                .write_all_at(&p[..], *o)
                .map_err(io(&self.path, "apply log page", *o))?;
        }
        self.sync("sync applied metadata")?;
        // Applied and synced: close the log, as a flush does.
        self.close_log()?;
        self.file_len = self.file.len().map_err(io(&self.path, "stat", 0))?;
        Ok(())
    }
}
