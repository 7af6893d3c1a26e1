//! `check` and `repair` for VHDX, and the BAT validation `open` relies on.
//!
//! Findings: unreadable or inconsistent structures (anything `open` refuses), blocks without
//! data that still carry a file offset (Hyper-V refuses those), and, with the leaks (exit 3, no
//! harm to data), file space that `repair` or `compact` can give back and a pending log. A
//! pending log is what a crash inside a flush leaves by design: the check runs on the image as
//! replayed (in memory), which is what every reader must see (MS-VHDX: the log is replayed
//! before the file is used); a reader that ignores logs would see stale metadata until `repair`
//! replays it on disk. `repair` opens the image writable, which replays a pending log on disk,
//! and drops leaked space at the end of the file.
//!
//! ## Unused file space: leak or layout
//!
//! MS-VHDX places the log, the regions and every block at any 1 MiB boundary past the header
//! section and forbids only overlaps, so no free space is invalid: the question is only whether
//! our tools can give it back. Every free range of at least 1 MiB is one of:
//!
//! ```text
//! | hdr | log | BAT | meta | reserve | blk | blk | hole | blk | tail |      (written image)
//! | hdr | log | BAT | meta | reserve ........................... |        (as its creator made it)
//!                            ^ unused: layout          ^ leak     ^ leak
//! ```
//!
//! - **Before the first data block** (payload or sector bitmap): space the creator left around
//!   its regions, by alignment or as a reserve (qemu-img keeps 4 MiB after the metadata region;
//!   its fixed images keep the preallocated area unused and append blocks after it; a relocated
//!   BAT leaves its old place). Not a leak; reported in [`CheckReport::unused`], saying whether
//!   `compact` can move blocks into it.
//! - **At the end of the file**, past the last structure: a leak that `repair` cuts off (an
//!   allocation a crash interrupted, blocks released at the end). Except in an image with no
//!   data block whose log was never written: nothing has been written since it was made, so the
//!   length is the one its creator chose (qemu-img's reserve, a fixed image's preallocation).
//! - **Between data blocks**: a leak when `compact` can move a block after it into it (dynamic
//!   and differencing images, a hole at least one block long); otherwise unused (a fixed image,
//!   whose blocks compact does not move, or a hole smaller than every block after it).
//!
//! A block released below every other block is indistinguishable from a creator's reserve: it
//! is reported as unused space that `compact` can fill, not as a leak.

use crate::error::{Error, Result};
use crate::format::{state, MIB};
use crate::image::{OpenMode, VhdxImage};
use image_io::ImageFile;
use std::path::Path;

pub use image_io::check::{CheckReport, Finding, Unused};

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
        // The file must hold the block, except that a fixed image's last block needs to reach
        // only the end of the virtual disk: qemu-img sizes fixed files to the disk, not to
        // whole blocks, and nothing reads past the disk's end.
        let block = i as u64 - i as u64 / (cr + 1);
        let held = if is_sb || !img.params().leave_blocks_allocated {
            size
        } else {
            size.min(img.virtual_size().saturating_sub(block * bs))
        };
        if start < MIB || start.checked_add(held).is_none_or(|end| end > len) {
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

/// Payload and sector-bitmap blocks with data: (file offset, size).
fn data_blocks<F: ImageFile>(img: &VhdxImage<F>) -> Vec<(u64, u64)> {
    let bs = img.block_size() as u64;
    let cr = img.chunk_ratio();
    img.bat()
        .iter()
        .enumerate()
        .filter(|(_, e)| matches!(e.state(), state::FULLY_PRESENT | state::PARTIALLY_PRESENT))
        .map(|(i, e)| {
            let is_sb = (i as u64 + 1).is_multiple_of(cr + 1);
            (e.file_offset(), if is_sb { MIB } else { bs })
        })
        .collect()
}

/// Whether anything was ever written to the log. Every log entry fills whole 4 KiB log sectors
/// (entry header, descriptors, data sectors, each signed), so a log of zeros was never used:
/// no BAT entry or other metadata changed through it since the image was made.
fn log_ever_written<F: ImageFile>(img: &VhdxImage<F>) -> bool {
    if img.replayed_log() {
        return true;
    }
    let (at, len) = (img.header().log_offset, img.header().log_length as u64);
    let mut buf = vec![0u8; len.min(MIB) as usize];
    let mut pos = 0;
    while pos < len {
        let n = (len - pos).min(MIB) as usize;
        // A log the file does not hold counts as written: the space is then judged a leak.
        if img.read_file_at(&mut buf[..n], at + pos).is_err() || buf[..n].iter().any(|&b| b != 0) {
            return true;
        }
        pos += n as u64;
    }
    false
}

/// What a free file range is (see the module docs).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Gap {
    /// Past the last structure, to the end of the file: `repair` cuts it off.
    Tail,
    /// Between data blocks, and a block after it fits: `compact` moves blocks into it.
    Hole,
    /// Not a leak.
    Unused {
        compact_releases: bool,
        why: &'static str,
    },
}

/// Free ranges of at least 1 MiB (smaller ones hold no structure): (start, end, kind).
fn free_space<F: ImageFile>(img: &VhdxImage<F>) -> Vec<(u64, u64, Gap)> {
    let len = img.file_len();
    let fixed = img.params().leave_blocks_allocated;
    let blocks = data_blocks(img);
    let first_block = blocks.iter().map(|b| b.0).min();
    let mut used = img.structure_ranges();
    used.extend(blocks.iter().map(|&(s, n)| (s, s + n)));
    used.sort_unstable();
    // `compact` moves a block down into free space that holds it whole.
    let compact_fills =
        |s: u64, e: u64| !fixed && blocks.iter().any(|&(at, n)| at >= e && n <= e - s);
    let mut out = Vec::new();
    let mut end = 0u64;
    for (s, e) in used.into_iter().chain(std::iter::once((len, len))) {
        let stop = s.min(len);
        if stop >= end + MIB {
            let kind = if stop == len {
                if blocks.is_empty() && !log_ever_written(img) {
                    Gap::Unused {
                        compact_releases: !fixed,
                        why:
                            "the length its creator gave the file (nothing has been written since)",
                    }
                } else {
                    Gap::Tail
                }
            } else if first_block.is_none_or(|f| stop <= f) {
                Gap::Unused {
                    compact_releases: compact_fills(end, stop),
                    why: "before the first data block (the creator's alignment or reserve, or a region's old place)",
                }
            } else if compact_fills(end, stop) {
                Gap::Hole
            } else if fixed {
                Gap::Unused {
                    compact_releases: false,
                    why:
                        "after the first block of a fixed image, whose blocks compact does not move",
                }
            } else {
                Gap::Unused {
                    compact_releases: false,
                    why: "after the first data block, and no block after it fits in it",
                }
            };
            out.push((end, stop, kind));
        }
        end = end.max(e);
    }
    out
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
    let path = img.path().display();
    for (s, e, kind) in free_space(img) {
        let bytes = e - s;
        let leak = |how: &str| Finding {
            structure: "file space".into(),
            offset: s,
            message: format!(
                "{path}: {bytes} bytes at offset {s} not used by any structure; {how}"
            ),
        };
        match kind {
            Gap::Tail => r.leaks.push(leak("`check --repair` cuts them off")),
            Gap::Hole => r.leaks.push(leak("`compact` moves blocks into them")),
            Gap::Unused {
                compact_releases,
                why,
            } => {
                let release = if compact_releases {
                    "not a leak; `compact` gives them back"
                } else {
                    "not a leak; no in-place tool gives them back"
                };
                r.unused.push(Unused {
                    offset: s,
                    length: bytes,
                    compact_releases,
                    message: format!(
                        "{path}: {bytes} bytes at offset {s} unused: {why}; {release}"
                    ),
                });
                continue;
            }
        }
        r.leaked_bytes += bytes;
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
        Err(e @ (Error::Io { .. } | Error::NotThisFormat { .. } | Error::InUse(_))) => Err(e),
        Err(e) => Ok(CheckReport {
            corruptions: vec![Finding::from(&e)],
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
        let len = img.file_len();
        let tail = free_space(&img)
            .into_iter()
            .find(|g| g.2 == Gap::Tail)
            .map(|g| g.0);
        if let Some(used_end) = tail {
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
