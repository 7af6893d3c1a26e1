//! Re-linking a differencing image to its parent at a new place (Set-VHD -ParentPath).
//!
//! ```text
//! new W2ru (relative) and W2ku (absolute) path data -> fresh space at the end of the file
//!                                                      (footer moved behind it first), synced
//! dynamic header: locator entries, parent unicode name (and, unsafe, parent UUID)  -> synced
//! ```
//!
//! Invariants: locator data is never overwritten in place, so until the header (one 1024-byte
//! write) changes, the old locators stay intact; the parent UUID only changes when the caller
//! asks (unsafe re-link to a different disk). The old locator space is left unused (a few
//! sectors; `compact` does not reclaim metadata space).

use crate::error::{Error, Result};
use crate::image::VhdImage;
use crate::layout::{write_at, Layout};
use crate::locator::{base_name, encode_utf16le, LocatorEntry, PlatformCode};
use image_io::ImageFile;
use std::path::Path;
use uuid::Uuid;

impl<F: ImageFile> VhdImage<F> {
    /// Points the parent locators at `absolute` (and `relative`, Windows style, from the
    /// child's directory); with `uuid`, also records that parent identity.
    pub fn set_parent(
        &mut self,
        absolute: &Path,
        relative: &str,
        uuid: Option<Uuid>,
    ) -> Result<()> {
        if !self.writable {
            return Err(Error::ReadOnly {
                path: self.path.clone(),
            });
        }
        if self.parent.is_none() {
            return Err(Error::InvalidArgument(format!(
                "{} is not a differencing image",
                self.path.display()
            )));
        }
        self.flush()?;
        let mut h = self
            .header
            .clone()
            .expect("differencing image has a header");
        let abs = absolute.to_string_lossy().into_owned();
        for (code, text) in [
            (PlatformCode::W2RU, relative.to_string()),
            (PlatformCode::W2KU, abs.clone()),
        ] {
            let data = encode_utf16le(&text);
            let space = (data.len() as u64).next_multiple_of(512).max(512);
            let at = self.append_space(space, 0)?;
            let mut padded = data.clone();
            padded.resize(space as usize, 0);
            write_at(&self.file, &self.path, &padded, at, "write parent locator")?;
            let slot = h
                .locators
                .iter()
                .position(|l| l.code == code)
                .or_else(|| h.locators.iter().position(|l| l.code == PlatformCode::NONE))
                .ok_or_else(|| Error::Unsupported {
                    path: self.path.clone(),
                    what: "no free parent locator entry".into(),
                })?;
            h.locators[slot] = LocatorEntry {
                code,
                data_space: space as u32,
                data_length: data.len() as u32,
                reserved: 0,
                data_offset: at,
            };
        }
        // Deprecated ANSI and Mac locators would still name the old place: drop them.
        for l in h.locators.iter_mut() {
            if matches!(
                l.code,
                PlatformCode::WI2R | PlatformCode::WI2K | PlatformCode::MAC | PlatformCode::MACX
            ) {
                *l = LocatorEntry::default();
            }
        }
        h.parent_unicode_name = base_name(&abs).to_string();
        if let Some(u) = uuid {
            h.parent_uuid = u;
        }
        self.sync("sync parent locators")?;
        self.header = Some(h);
        self.write_header()?;
        let layout = Layout::read(&self.file, &self.path)?;
        if let Some(p) = self.parent.as_mut() {
            p.candidates = layout.parent_candidates();
            p.unicode_name = base_name(&abs).to_string();
            if let Some(u) = uuid {
                p.uuid = u;
            }
        }
        Ok(())
    }
}
