//! `check` and `repair`: report every problem of an image's structures, and fix what can be fixed
//! without losing data.
//!
//! Repairs:
//! - a missing or damaged trailing footer is rewritten from the intact copy at offset 0, and a
//!   damaged copy from the trailing footer;
//! - a footer or dynamic header whose only fault is its checksum (every field consistent with
//!   the file) gets its checksum recomputed;
//! - unused space at the end of the file (left by a crash during allocation) is dropped by moving
//!   the footer back and truncating.
//!
//! Leaked space inside the file (freed blocks) is reported but only `compact` reclaims it.
//! Parent linkage needs the chain and is checked by the block backend.

use crate::dynamic_header::{DynamicHeader, RawDynamicHeader};
use crate::error::{Error, Result};
use crate::footer::{DiskType, Footer, FOOTER_SIZE};
use crate::layout::{read_at, write_at, Layout, Severity};
use image_io::ImageFile;
use image_io::OpenMode;
use std::fs::File;
use std::path::Path;
use zerocopy::{FromZeros, IntoBytes};

pub use image_io::check::{CheckReport, Finding};

fn report(layout: &Layout) -> CheckReport {
    let mut r = CheckReport::default();
    for p in &layout.problems {
        match p.severity {
            Severity::Corruption => r.corruptions.push(Finding::from(&p.error)),
            Severity::Leak => {
                r.leaks.push(Finding::from(&p.error));
                r.leaked_bytes += p.bytes;
            }
        }
    }
    r
}

/// Checks every structure of the image at `path` without writing to it. `Err` only when the
/// file cannot be read, is in use by a writer ([`Error::InUse`]) or is not a VHD at all.
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
    let file = image_io::lock::open(path, mode).map_err(|e| Error::from_open(path, e))?;
    check_file(&file, path)
}

/// Checks an image held in any [`ImageFile`] (for example a crash-test file) without writing.
pub fn check_file<F: ImageFile>(file: &F, path: &Path) -> Result<CheckReport> {
    Ok(report(&Layout::read(file, path)?))
}

/// Repairs what can be repaired without losing data, then checks again. The returned report
/// holds the remaining problems and, in `repairs`, what was done.
pub fn repair(path: &Path) -> Result<CheckReport> {
    let file =
        image_io::lock::open(path, OpenMode::ReadWrite).map_err(|e| Error::from_open(path, e))?;
    let mut repairs = Vec::new();
    // Each pass fixes one layer (footer, then header, then space); a few passes reach a fixpoint.
    for _ in 0..4 {
        let layout = Layout::read(&file, path)?;
        let done = repair_once(&file, path, &layout)?;
        if done.is_empty() {
            break;
        }
        repairs.extend(done);
    }
    file.sync_all().map_err(|source| Error::Io {
        path: path.into(),
        op: "sync",
        offset: 0,
        source,
    })?;
    let mut r = report(&Layout::read(&file, path)?);
    r.repairs = repairs;
    Ok(r)
}

fn is_checksum(l: &Layout, structure: &str) -> bool {
    l.problems
        .iter()
        .any(|p| matches!(&p.error, Error::Checksum { structure: s, .. } if *s == structure))
}

fn has_problem(l: &Layout, structure: &str) -> bool {
    l.problems.iter().any(|p| match &p.error {
        Error::Checksum { structure: s, .. } | Error::Corrupt { structure: s, .. } => {
            *s == structure
        }
        _ => false,
    })
}

fn repair_once(file: &File, path: &Path, l: &Layout) -> Result<Vec<String>> {
    let mut done = Vec::new();
    let sparse_type = l.footer.disk_type().is_some_and(|t| t != DiskType::Fixed);
    // 1. Footer: rebuild from a good copy, or recompute a checksum whose fields are sound.
    if has_problem(l, "footer") {
        let stored_ok = Footer::computed_checksum(&l.footer_raw) == l.footer.checksum;
        let fields_ok = l.footer.problems().is_empty();
        if fields_ok && (stored_ok || is_checksum(l, "footer")) {
            let fixed = l.footer.to_bytes();
            let at = l.footer_offset;
            write_at(file, path, &fixed, at, "rewrite footer")?;
            if sparse_type {
                write_at(file, path, &fixed, 0, "rewrite footer copy")?;
            }
            if l.legacy_footer {
                file.set_len(at + FOOTER_SIZE as u64)
                    .map_err(|source| Error::Io {
                        path: path.into(),
                        op: "extend for footer",
                        offset: at,
                        source,
                    })?;
            }
            done.push(if stored_ok {
                format!("rewrote the footer at offset {at} from the copy at offset 0")
            } else {
                format!(
                    "recomputed the footer checksum ({:#010x} -> {:#010x}); every field is consistent",
                    l.footer.checksum,
                    Footer::computed_checksum(&l.footer_raw)
                )
            });
            return Ok(done);
        }
        return Ok(done);
    }
    if sparse_type && has_problem(l, "footer copy") {
        write_at(file, path, &l.footer_raw, 0, "rewrite footer copy")?;
        done.push("rewrote the footer copy at offset 0 from the footer at the end".into());
        return Ok(done);
    }
    // 2. Dynamic header with only a checksum fault.
    if sparse_type && is_checksum(l, "dynamic header") {
        let at = l.footer.data_offset;
        let mut raw = RawDynamicHeader::new_zeroed();
        read_at(file, path, raw.as_mut_bytes(), at, "read dynamic header")?;
        let h = DynamicHeader::from_raw(&raw);
        if h.problems(l.virtual_size()).is_empty() {
            let computed = DynamicHeader::computed_checksum(&zerocopy::transmute!(raw));
            raw.checksum = computed.into();
            write_at(file, path, raw.as_bytes(), at, "rewrite dynamic header")?;
            done.push(format!(
                "recomputed the dynamic header checksum ({:#010x} -> {computed:#010x}); every field is consistent",
                h.checksum
            ));
        }
        return Ok(done);
    }
    // 3. Trailing leaked space: move the footer back and truncate.
    if let Some(trailing) = l.problems.iter().find(|p| {
        p.severity == Severity::Leak
            && matches!(&p.error, Error::Corrupt { offset, .. } if offset + p.bytes == l.footer_offset)
    }) {
        let Error::Corrupt { offset, .. } = trailing.error else { unreachable!() };
        let new_footer = offset.next_multiple_of(512);
        write_at(file, path, &l.footer_raw, new_footer, "move footer")?;
        file.sync_data().map_err(|source| Error::Io { path: path.into(), op: "sync", offset: 0, source })?;
        file.set_len(new_footer + FOOTER_SIZE as u64)
            .map_err(|source| Error::Io { path: path.into(), op: "truncate", offset: new_footer, source })?;
        done.push(format!("dropped {} leaked bytes at the end of the file", l.footer_offset - new_footer));
    }
    Ok(done)
}
