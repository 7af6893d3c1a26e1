//! `check` and `repair` of one image file: the probe point that sends each format to its own
//! checker, so that callers see one [`CheckReport`] whatever the format.
//!
//! A raw file has no structure: its report is clean. Parent links are not followed here (a
//! differencing image checks on its own); opening its chain is how a caller checks the link.

use std::path::Path;

use image_io::check::CheckReport;
use image_io::OpenMode;

use crate::{probe, Format, Result};

/// Checks the image at `path` without writing to it, opened with the read-only `mode` given
/// ([`OpenMode::ReadOnlyForceShare`] checks an image another process is writing). Returns its
/// format and the report; `Err` only when it cannot be checked at all (unreadable, in use by a
/// writer, not the format its content claims).
pub fn check(path: &Path, mode: OpenMode) -> Result<(Format, CheckReport)> {
    let format = probe::probe_path(path)?;
    let report = match format {
        Format::Raw => CheckReport::default(),
        Format::Vhd => vhd::check_with(path, mode)?,
        Format::Vhdx => vhdx::check_with(path, mode)?,
    };
    Ok((format, report))
}

/// Repairs what the format can repair without losing data, then checks again: the report holds
/// what remains and, in `repairs`, what was done. Takes the image's write lock.
pub fn repair(path: &Path) -> Result<(Format, CheckReport)> {
    let format = probe::probe_path(path)?;
    let report = match format {
        Format::Raw => CheckReport::default(),
        Format::Vhd => vhd::repair(path)?,
        Format::Vhdx => vhdx::repair(path)?,
    };
    Ok((format, report))
}
