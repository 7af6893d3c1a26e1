//! `check` and `repair` for VHDX, and the BAT validation `open` relies on.
//!
//! Findings: unreadable or inconsistent structures (anything `open` refuses), blocks without
//! data that still carry a file offset (Hyper-V refuses those), and, with the leaks (exit 3, no
//! harm to data), file space no structure uses and a pending log. A pending log is what a crash
//! inside a flush leaves by design: the check runs on the image as replayed (in memory), which is
//! what every reader must see (MS-VHDX: the log is replayed before the file is used); a reader
//! that ignores logs would see stale metadata until `repair` replays it on disk.
//! `repair` opens the image writable, which replays a pending log on disk, and drops leaked
//! space at the end of the file.

use crate::error::{Error, Result};
use crate::format::{state, MIB};
use crate::image::{OpenMode, VhdxImage};
use image_io::ImageFile;
use std::path::Path;

/// One problem found by [`check`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Finding {
    /// Structure name.
    pub structure: String,
    /// Byte offset in the file.
    pub offset: u64,
    /// Full message.
    pub message: String,
}

/// Result of [`check`] or [`repair`].
#[derive(Debug, Clone, Default)]
pub struct CheckReport {
    /// Problems that make data read wrongly or the image unusable.
    pub corruptions: Vec<Finding>,
    /// Unused file space.
    pub leaks: Vec<Finding>,
    /// Total leaked bytes.
    pub leaked_bytes: u64,
    /// What [`repair`] did.
    pub repairs: Vec<String>,
}

impl CheckReport {
    /// 0 clean, 2 corruption, 3 only leaks (qemu-img's convention).
    pub fn exit_code(&self) -> i32 {
        if !self.corruptions.is_empty() {
            2
        } else if !self.leaks.is_empty() {
            3
        } else {
            0
        }
    }

    /// Whether nothing was found.
    pub fn is_clean(&self) -> bool {
        self.corruptions.is_empty() && self.leaks.is_empty()
    }
}

/// Problems with BAT entries: (file offset of the entry, reason). Empty when the BAT is usable.
pub(crate) fn bat_problems<F: ImageFile>(img: &VhdxImage<F>) -> Vec<(u64, String)> {
    let bat = img.bat();
    let r = img.regions();
    let bs = img.block_size() as u64;
    let cr = img.chunk_ratio();
    let diff = img.params().has_parent;
    let len = img.file_len();
    let mut out = Vec::new();
    let mut used: Vec<(u64, u64, String)> = vec![
        (0, MIB, "header section".into()),
        (
            img.header().log_offset,
            img.header().log_offset + img.header().log_length as u64,
            "log".into(),
        ),
        (
            r.bat_offset,
            r.bat_offset + r.bat_length,
            "BAT region".into(),
        ),
        (
            r.metadata_offset,
            r.metadata_offset + r.metadata_length,
            "metadata region".into(),
        ),
    ];
    for (i, e) in bat.iter().enumerate() {
        let at = r.bat_offset + 8 * i as u64;
        let is_sb = (i as u64 + 1).is_multiple_of(cr + 1);
        let (size, what) = if is_sb {
            (MIB, "sector bitmap")
        } else {
            (bs, "payload block")
        };
        let s = e.state();
        let valid = if is_sb {
            s == state::NOT_PRESENT || (diff && s == state::SB_PRESENT)
        } else {
            matches!(s, 0..=3 | 5 | 6) || (diff && s == state::PARTIALLY_PRESENT)
        };
        if !valid {
            out.push((at, format!("entry {i} ({what}) has invalid state {s}")));
            continue;
        }
        let has_data = if is_sb {
            s == state::SB_PRESENT
        } else {
            matches!(s, state::FULLY_PRESENT | state::PARTIALLY_PRESENT)
        };
        if !has_data {
            continue;
        }
        let start = e.file_offset();
        if start < MIB || start.checked_add(size).is_none_or(|end| end > len) {
            out.push((
                at,
                format!("entry {i} ({what}) points to {start:#x}, outside the file of {len} bytes"),
            ));
            continue;
        }
        if !is_sb && s == state::PARTIALLY_PRESENT {
            let chunk = i as u64 / (cr + 1);
            let sb = (chunk * (cr + 1) + cr) as usize;
            if bat.get(sb).map(|e| e.state()) != Some(state::SB_PRESENT) {
                out.push((
                    at,
                    format!("entry {i} is partially present but its chunk has no sector bitmap"),
                ));
            }
        }
        used.push((start, start + size, format!("{what} (entry {i})")));
    }
    used.sort();
    for w in used.windows(2) {
        if w[1].0 < w[0].1 {
            out.push((
                r.bat_offset,
                format!(
                    "{} at {:#x} overlaps {} at {:#x}",
                    w[1].2, w[1].0, w[0].2, w[0].0
                ),
            ));
        }
    }
    out
}

/// File ranges used by any structure, sorted and merged.
fn used_ranges<F: ImageFile>(img: &VhdxImage<F>) -> Vec<(u64, u64)> {
    let r = img.regions();
    let bs = img.block_size() as u64;
    let cr = img.chunk_ratio();
    let mut used = vec![
        (0, MIB),
        (
            img.header().log_offset,
            img.header().log_offset + img.header().log_length as u64,
        ),
        (r.bat_offset, r.bat_offset + r.bat_length),
        (r.metadata_offset, r.metadata_offset + r.metadata_length),
    ];
    for (i, e) in img.bat().iter().enumerate() {
        let is_sb = (i as u64 + 1).is_multiple_of(cr + 1);
        if matches!(e.state(), state::FULLY_PRESENT | state::PARTIALLY_PRESENT) {
            used.push((
                e.file_offset(),
                e.file_offset() + if is_sb { MIB } else { bs },
            ));
        }
    }
    used.sort();
    let mut merged: Vec<(u64, u64)> = Vec::new();
    for (s, e) in used {
        match merged.last_mut() {
            Some(last) if s <= last.1 => last.1 = last.1.max(e),
            _ => merged.push((s, e)),
        }
    }
    merged
}

fn finding(e: &Error) -> Finding {
    let (structure, offset) = match e {
        Error::Corrupt {
            structure, offset, ..
        }
        | Error::Checksum {
            structure, offset, ..
        } => (structure.to_string(), *offset),
        Error::Io { offset, .. } => ("file".into(), *offset),
        _ => ("image".into(), 0),
    };
    Finding {
        structure,
        offset,
        message: e.to_string(),
    }
}

/// Checks an open image (for images held in memory, such as crash-test files).
pub fn check_image<F: ImageFile>(img: &VhdxImage<F>) -> CheckReport {
    report(img)
}

fn report<F: ImageFile>(img: &VhdxImage<F>) -> CheckReport {
    let mut r = CheckReport::default();
    // A writable open has already replayed the log on disk; a read-only one only in memory.
    if img.replayed_log() && !img.is_writable() {
        r.leaks.push(Finding {
            structure: "log".into(),
            offset: img.header().log_offset,
            message: format!("{}: log at offset {} holds entries to replay (a flush was interrupted); this check and every reader that replays logs see the data as it should be, readers that ignore logs see stale metadata; `check --repair` replays it", img.path().display(), img.header().log_offset),
        });
    }
    let regions = img.regions();
    for (i, e) in img.bat().iter().enumerate() {
        if !matches!(e.state(), state::FULLY_PRESENT | state::PARTIALLY_PRESENT)
            && e.file_offset() != 0
        {
            let at = regions.bat_offset + 8 * i as u64;
            r.corruptions.push(Finding {
                structure: "BAT".into(),
                offset: at,
                message: format!("{}: BAT entry {i} at offset {at} has state {} but a file offset {:#x} (Hyper-V refuses such images)", img.path().display(), e.state(), e.file_offset()),
            });
        }
    }
    let len = img.file_len();
    let mut end = 0u64;
    for (s, e) in used_ranges(img).into_iter().chain(std::iter::once((
        len.next_multiple_of(MIB),
        len.next_multiple_of(MIB),
    ))) {
        if s > end && s - end >= MIB && end < len {
            let bytes = s.min(len) - end;
            if bytes >= MIB {
                r.leaks.push(Finding {
                    structure: "file space".into(),
                    offset: end,
                    message: format!(
                        "{}: {bytes} bytes at offset {end} not used by any structure",
                        img.path().display()
                    ),
                });
                r.leaked_bytes += bytes;
            }
        }
        end = end.max(e);
    }
    r
}

/// Checks the image without writing to it. `Err` only when the file is not a VHDX or cannot be
/// read at all; anything `open` refuses is reported as a corruption.
pub fn check(path: &Path) -> Result<CheckReport> {
    check_with(path, OpenMode::ReadOnly)
}

/// [`check`], opening the image with a read-only `mode` of the caller's choice
/// ([`OpenMode::ReadOnlyForceShare`] checks an image in use, whose metadata may be changing).
pub fn check_with(path: &Path, mode: OpenMode) -> Result<CheckReport> {
    if mode.is_writable() {
        return Err(Error::InvalidArgument(
            "check opens images read-only".into(),
        ));
    }
    match VhdxImage::open(path, mode) {
        Ok(img) => Ok(report(&img)),
        Err(e @ (Error::Io { .. } | Error::NotVhdx { .. } | Error::InUse(_))) => Err(e),
        Err(e) => Ok(CheckReport {
            corruptions: vec![finding(&e)],
            ..Default::default()
        }),
    }
}

/// Replays a pending log on disk and drops leaked space at the end of the file, then checks.
pub fn repair(path: &Path) -> Result<CheckReport> {
    let mut repairs = Vec::new();
    let before = check(path)?;
    if before.corruptions.iter().any(|f| f.structure != "log") {
        // Nothing here can fix other structures without risking data.
        return Ok(before);
    }
    {
        let img = VhdxImage::open(path, OpenMode::ReadWrite)?;
        if img.replayed_log() {
            repairs.push(format!(
                "replayed the log at offset {}",
                img.header().log_offset
            ));
        }
        let used_end = used_ranges(&img).last().map_or(MIB, |r| r.1);
        let len = img.file_len();
        if len >= used_end + MIB {
            img.file().set_len(used_end).map_err(|source| Error::Io {
                path: path.into(),
                op: "truncate leaked space",
                offset: used_end,
                source,
            })?;
            img.file().sync_data().map_err(|source| Error::Io {
                path: path.into(),
                op: "sync",
                offset: 0,
                source,
            })?;
            repairs.push(format!(
                "dropped {} leaked bytes at the end of the file",
                len - used_end
            ));
        }
        img.close()?;
    }
    let mut r = check(path)?;
    r.repairs = repairs;
    Ok(r)
}
