//! Replaying a pending VHDX log (MS-VHDX 2.3.3): the active sequence found by
//! [`crate::log::find_replay`] is applied on disk when the image is writable, or to an
//! in-memory overlay of the file when it is read-only (the file is never written then).

use crate::error::{Error, Result};
use crate::format::HEADER_OFFSETS;
use crate::image::{io, VhdxImage, MAX_FILE_LEN, MAX_OVERLAY_ZERO_PAGES};
use crate::log::{find_replay, LogWrite, SECTOR};
use image_io::ImageFile;
use uuid::Uuid;

impl<F: ImageFile> VhdxImage<F> {
    pub(crate) fn replay_log(&mut self) -> Result<()> {
        let h = self.header.clone();
        if h.log_guid.is_nil() || h.log_length == 0 {
            return Ok(());
        }
        let end = h.log_offset.checked_add(h.log_length as u64);
        if end.is_none_or(|e| e > self.file_len) {
            return Err(Error::Corrupt {
                path: self.path.clone(),
                structure: "header",
                offset: HEADER_OFFSETS[self.header_slot] + 68,
                reason: format!(
                    "log at {:#x} (+{:#x}) lies outside the file",
                    h.log_offset, h.log_length
                ),
            });
        }
        let mut log = vec![0u8; h.log_length as usize];
        self.file.read_exact_at(&mut log, h.log_offset).map_err(io(
            &self.path,
            "read log",
            h.log_offset,
        ))?;
        let replay = find_replay(&log, h.log_guid).map_err(|reason| Error::Corrupt {
            path: self.path.clone(),
            structure: "log",
            offset: h.log_offset,
            reason,
        })?;
        let Some(replay) = replay else {
            // LogGuid set but nothing valid to replay: nothing changes.
            if self.writable {
                let mut nh = h.clone();
                nh.log_guid = Uuid::nil();
                nh.file_write_guid = Uuid::new_v4();
                self.write_header(nh)?;
            }
            return Ok(());
        };
        // A hostile log may name any offset or length: every write must land inside the file
        // as the entry says it will be (LastFileOffset), and that must be a size a VHDX can
        // have; otherwise a replay would write (or allocate) without bound.
        let limit = self.file_len.max(replay.last_file_offset);
        let outside = replay.writes.iter().find(|w| {
            let (offset, len) = match w {
                LogWrite::Page { offset, .. } => (*offset, SECTOR as u64),
                LogWrite::Zero { offset, length } => (*offset, *length),
            };
            offset.checked_add(len).is_none_or(|end| end > limit)
        });
        if replay.last_file_offset > MAX_FILE_LEN || outside.is_some() {
            return Err(Error::Corrupt {
                path: self.path.clone(),
                structure: "log",
                offset: h.log_offset,
                reason: match outside {
                    Some(LogWrite::Page { offset, .. }) => format!(
                        "entry writes a page at {offset:#x}, outside the file ({limit:#x} bytes)"
                    ),
                    Some(LogWrite::Zero { offset, length }) => format!(
                        "entry zeroes {length:#x} bytes at {offset:#x}, outside the file ({limit:#x} bytes)"
                    ),
                    None => format!(
                        "entry's last file offset {:#x} is beyond any VHDX",
                        replay.last_file_offset
                    ),
                },
            });
        }
        if self.file_len < replay.flushed_file_offset {
            return Err(Error::Corrupt { path: self.path.clone(), structure: "log", offset: h.log_offset, reason: format!("file is {} bytes but the log was written when it had {}: the file was truncated", self.file_len, replay.flushed_file_offset) });
        }
        self.replayed = true;
        if self.writable {
            let mut nh = h.clone();
            nh.file_write_guid = Uuid::new_v4();
            for w in &replay.writes {
                match w {
                    LogWrite::Page { offset, data } => {
                        self.file.write_all_at(&data[..], *offset).map_err(io(
                            &self.path,
                            "replay log page",
                            *offset,
                        ))?
                    }
                    // A hole where the file system can punch one: a hostile entry may
                    // zero terabytes of a sparse file. What lies past the end is zero
                    // anyway once the file is extended to LastFileOffset below.
                    LogWrite::Zero { offset, length } => self
                        .file
                        .zero_range(*offset, *length)
                        .map_err(io(&self.path, "replay log zeros", *offset))?,
                }
            }
            if self.file.len().map_err(io(&self.path, "stat", 0))? < replay.last_file_offset {
                self.file.set_len(replay.last_file_offset).map_err(io(
                    &self.path,
                    "extend file after replay",
                    replay.last_file_offset,
                ))?;
            }
            self.file
                .sync_data()
                .map_err(io(&self.path, "sync replay", 0))?;
            self.file_len = self.file.len().map_err(io(&self.path, "stat", 0))?;
            nh.log_guid = Uuid::nil();
            self.write_header(nh)?;
        } else {
            let mut zero_pages = 0u64;
            for w in &replay.writes {
                match w {
                    LogWrite::Page { offset, data } => {
                        self.overlay.insert(*offset, data.clone());
                    }
                    LogWrite::Zero { offset, length } => {
                        zero_pages += length / SECTOR as u64;
                        if zero_pages > MAX_OVERLAY_ZERO_PAGES {
                            return Err(Error::Unsupported { path: self.path.clone(), what: "the pending log zeroes more than 64 MiB; open it writable (`vhdtool check --repair`) to replay it on disk".into() });
                        }
                        for p in (0..length / SECTOR as u64).map(|i| offset + i * SECTOR as u64) {
                            self.overlay.insert(p, Box::new([0u8; SECTOR]));
                        }
                    }
                }
            }
            self.file_len = self.file_len.max(replay.last_file_offset);
        }
        Ok(())
    }
}
