//! Rewriting a differencing image's parent locator (Set-VHD -ParentPath): new paths, and for
//! merges and unsafe rebases a new linkage.
//!
//! ```text
//! metadata region:  | table | ... items ... | parent locator |        free        |
//!   fits in place?  write the item where it is
//!   otherwise       write it after the last item and repoint its table entry
//!   either way      table page + item pages in ONE log entry (atomic)
//! ```
//!
//! Invariants: the locator changes atomically through the log; no other item moves; user data
//! does not change, so DataWriteGuid stays (children of this image stay linked).

use crate::edit::Patch;
use crate::error::{Error, Result};
use crate::format::{
    guids, metadata_entry_offset, parse_metadata_table, MetadataTableEntry, ParentLocator,
    TABLE_SIZE,
};
use crate::image::VhdxImage;
use crate::meta::ParentLink;
use image_io::ImageFile;
use uuid::Uuid;
use zerocopy::byteorder::little_endian::U32;
use zerocopy::IntoBytes;

/// Largest locator item written (the metadata item limit is 1 MiB; real ones are < 2 KiB).
const MAX_LOCATOR: usize = 64 << 10;

impl<F: ImageFile> VhdxImage<F> {
    /// Points the image at its parent's new location (Set-VHD -ParentPath): `relative_path`
    /// and `absolute_win32_path` (Windows separators) replace every stored path (the
    /// `volume_path` too, which names the old volume); other keys are kept. With `linkage`, the
    /// parent link is re-made to that DataWriteGuid (an unsafe rebase onto another parent).
    pub fn set_parent(
        &mut self,
        absolute: &std::path::Path,
        relative: &str,
        linkage: Option<Uuid>,
    ) -> Result<()> {
        let Some(link) = self.parent.clone() else {
            return Err(Error::InvalidArgument(format!(
                "{} is not a differencing image",
                self.path.display()
            )));
        };
        let mut entries: Vec<(String, String)> = link
            .entries
            .into_iter()
            .filter(|(k, _)| {
                let path_key = matches!(
                    k.as_str(),
                    "relative_path" | "absolute_win32_path" | "volume_path"
                );
                let replaced_link = linkage.is_some() && k.starts_with("parent_linkage");
                !(path_key || replaced_link)
            })
            .collect();
        if let Some(guid) = linkage {
            entries.insert(0, ("parent_linkage".into(), format!("{{{guid}}}")));
        }
        entries.push(("relative_path".into(), relative.to_string()));
        entries.push((
            "absolute_win32_path".into(),
            absolute.to_string_lossy().replace('/', "\\"),
        ));
        self.set_parent_locator(entries)
    }

    /// Replaces the parent locator's key/value pairs; see the [module docs](self).
    pub fn set_parent_locator(&mut self, entries: Vec<(String, String)>) -> Result<()> {
        if !self.writable {
            return Err(Error::ReadOnly {
                path: self.path.clone(),
            });
        }
        if !self.params.has_parent {
            return Err(Error::InvalidArgument(format!(
                "{} is not a differencing image",
                self.path.display()
            )));
        }
        let loc = ParentLocator {
            locator_type: guids::PARENT_LOCATOR_TYPE,
            entries,
        };
        let link = ParentLink::from_locator(&loc, &self.path).map_err(Error::InvalidArgument)?;
        let bytes = loc.to_bytes();
        if bytes.len() > MAX_LOCATOR {
            return Err(Error::InvalidArgument(format!(
                "parent locator of {} bytes is too large",
                bytes.len()
            )));
        }
        let base = self.regions.metadata_offset;
        let mut table = vec![0u8; TABLE_SIZE];
        self.read_file_at(&mut table, base)?;
        let items = parse_metadata_table(&table).ok_or_else(|| Error::Corrupt {
            path: self.path.clone(),
            structure: "metadata",
            offset: base,
            reason: "bad metadata table".into(),
        })?;
        let Some(i) = items
            .iter()
            .position(|e| e.item_id == guids::PARENT_LOCATOR)
        else {
            return Err(Error::Corrupt {
                path: self.path.clone(),
                structure: "metadata",
                offset: base,
                reason: "differencing image without a parent locator item".into(),
            });
        };
        let cur = items[i];
        let len = bytes.len() as u64;
        // Room at the current place: up to the next item (or the region's end).
        let next = items
            .iter()
            .filter(|e| e.length > 0 && e.offset > cur.offset)
            .map(|e| e.offset as u64)
            .min()
            .unwrap_or(self.regions.metadata_length);
        let offset = if cur.offset as u64 + len <= next {
            cur.offset as u64
        } else {
            let end = items
                .iter()
                .map(|e| e.offset as u64 + e.length as u64)
                .max()
                .unwrap_or(0)
                .next_multiple_of(8);
            if end + len > self.regions.metadata_length {
                return Err(Error::Unsupported {
                    path: self.path.clone(),
                    what: "no room in the metadata region for a larger parent locator".into(),
                });
            }
            end
        };
        let mut patch = Patch::default();
        let entry_at = base + metadata_entry_offset(i);
        let offset_field = std::mem::offset_of!(MetadataTableEntry, offset);
        let field = [U32::new(offset as u32), U32::new(len as u32)];
        patch.put(entry_at + offset_field as u64, field.as_bytes());
        patch.put(base + offset, &bytes);
        self.apply_logged(patch)?;
        self.parent = Some(link);
        Ok(())
    }

    /// Sets the parent locator's `parent_linkage2` (an alternative parent identity), keeping
    /// every other pair.
    pub fn set_parent_linkage2(&mut self, guid: Uuid) -> Result<()> {
        let mut entries: Vec<(String, String)> = self
            .parent
            .as_ref()
            .map(|p| p.entries.clone())
            .unwrap_or_default();
        entries.retain(|(k, _)| k != "parent_linkage2");
        entries.push(("parent_linkage2".into(), format!("{{{guid}}}")));
        self.set_parent_locator(entries)
    }

    /// Sets DataWriteGuid to `guid` now (header update, synced) and counts it as this session's
    /// rotation: later writes in the session keep it. Used by merges, whose child links to the
    /// parent through this value while the merge runs.
    pub fn set_data_write_guid(&mut self, guid: Uuid) -> Result<()> {
        if !self.writable {
            return Err(Error::ReadOnly {
                path: self.path.clone(),
            });
        }
        if self.header.data_write_guid != guid {
            let mut h = self.header.clone();
            h.data_write_guid = guid;
            self.write_header(h)?;
        }
        self.data_guid_rotated = true;
        Ok(())
    }
}
