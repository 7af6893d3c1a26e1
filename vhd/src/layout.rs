//! Reading and validating every on-disk structure of an image: footer (and its copy), dynamic
//! header, BAT, parent locators and block placement. [`Layout::read`] is shared by `open`, which
//! refuses the first problem, and `check`, which reports them all.
//!
//! Every offset and count read from the file is checked against the file length before use, so
//! memory use is bounded by the file's own size and a hostile image cannot make us read or
//! allocate beyond it.

use crate::bitmap::bitmap_bytes;
use crate::dynamic_header::{
    DynamicHeader, HEADER_SIZE, LOCATORS_OFFSET, PARENT_UUID_OFFSET, TABLE_OFFSET_OFFSET,
};
use crate::error::{Error, Result};
use crate::footer::{DiskType, Footer, COOKIE, FOOTER_SIZE};
use crate::locator::{LocatorEntry, LOCATOR_ENTRY_SIZE, MAX_LOCATOR_DATA};
use image_io::ImageFile;
use std::path::{Path, PathBuf};
use zerocopy::byteorder::big_endian::U32;
use zerocopy::IntoBytes;

/// Smallest block size accepted. The spec allows smaller powers of two, but no known writer
/// uses them and they would make the BAT of a large disk enormous.
pub const MIN_BLOCK_SIZE: u32 = 4096;
/// Largest block size accepted (a 64 KiB bitmap).
pub const MAX_BLOCK_SIZE: u32 = 256 << 20;
/// BAT value of an unallocated block.
pub const UNALLOCATED: u32 = u32::MAX;

/// A BAT entry as stored: the big-endian sector number of the block's bitmap, or all ones.
pub type RawBatEntry = U32;

const _: () = assert!(size_of::<RawBatEntry>() == 4);

/// Encodes BAT entries as stored on disk.
pub fn bat_bytes(entries: &[u32]) -> Vec<u8> {
    let raw: Vec<RawBatEntry> = entries.iter().map(|&e| e.into()).collect();
    raw.as_bytes().to_vec()
}

/// How serious a finding is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Severity {
    /// Data may be read wrongly or the image cannot be opened.
    Corruption,
    /// Space in the file that nothing uses.
    Leak,
}

/// A problem found while reading the layout.
#[derive(Debug)]
pub struct Problem {
    /// Corruption or leak.
    pub severity: Severity,
    /// The problem, as the error `open` would return.
    pub error: Error,
    /// Bytes of file space involved (leaks).
    pub bytes: u64,
}

/// A parent locator entry with its decoded path, if any.
#[derive(Debug, Clone)]
pub struct Locator {
    /// The entry as stored in the header.
    pub entry: LocatorEntry,
    /// Decoded path text.
    pub text: Option<String>,
}

/// Everything read from an image's metadata.
#[derive(Debug)]
pub struct Layout {
    /// Path of the file (for messages).
    pub path: PathBuf,
    /// File length at open.
    pub file_len: u64,
    /// The footer in use (the one at the end, or the copy at 0 if the end one is missing).
    pub footer: Footer,
    /// Raw bytes of the footer in use.
    pub footer_raw: [u8; FOOTER_SIZE],
    /// Offset of the trailing footer (where the next footer goes when nothing is allocated).
    pub footer_offset: u64,
    /// Whether the trailing footer is the legacy 511-byte form.
    pub legacy_footer: bool,
    /// Dynamic header (dynamic and differencing images).
    pub header: Option<DynamicHeader>,
    /// BAT entries covering the virtual size.
    pub bat: Vec<u32>,
    /// Parent locators with decoded paths.
    pub locators: Vec<Locator>,
    /// File ranges used by metadata (footer copy, header, BAT, locator data).
    pub metadata: Vec<(u64, u64, &'static str)>,
    /// Problems found; `open` refuses the image if any is a corruption.
    pub problems: Vec<Problem>,
}

/// Reads `buf.len()` bytes at `offset`, naming the operation in the error.
pub fn read_at<F: ImageFile + ?Sized>(
    file: &F,
    path: &Path,
    buf: &mut [u8],
    offset: u64,
    op: &'static str,
) -> Result<()> {
    file.read_exact_at(buf, offset).map_err(|source| Error::Io {
        path: path.to_path_buf(),
        op,
        offset,
        source,
    })
}

/// Writes all of `buf` at `offset`, naming the operation in the error.
pub fn write_at<F: ImageFile + ?Sized>(
    file: &F,
    path: &Path,
    buf: &[u8],
    offset: u64,
    op: &'static str,
) -> Result<()> {
    file.write_all_at(buf, offset).map_err(|source| Error::Io {
        path: path.to_path_buf(),
        op,
        offset,
        source,
    })
}

impl Layout {
    fn corrupt(&mut self, structure: &'static str, offset: u64, reason: String) {
        let path = self.path.clone();
        self.problems.push(Problem {
            severity: Severity::Corruption,
            error: Error::Corrupt {
                path,
                structure,
                offset,
                reason,
            },
            bytes: 0,
        });
    }

    fn checksum(&mut self, structure: &'static str, offset: u64, stored: u32, computed: u32) {
        let path = self.path.clone();
        self.problems.push(Problem {
            severity: Severity::Corruption,
            error: Error::Checksum {
                path,
                structure,
                offset,
                stored,
                computed,
            },
            bytes: 0,
        });
    }

    /// First corruption, if any: what `open` reports.
    pub fn first_corruption(&mut self) -> Option<Error> {
        let i = self
            .problems
            .iter()
            .position(|p| p.severity == Severity::Corruption)?;
        Some(self.problems.swap_remove(i).error)
    }

    /// Virtual size meant by the creator.
    pub fn virtual_size(&self) -> u64 {
        self.footer.virtual_size()
    }

    /// Block size (dynamic and differencing only).
    pub fn block_size(&self) -> Option<u32> {
        self.header.as_ref().map(|h| h.block_size)
    }

    /// Bytes of sector bitmap in front of each block.
    pub fn bitmap_size(&self) -> u64 {
        self.block_size().map_or(0, bitmap_bytes)
    }

    /// Reads and validates the metadata of `file`. Returns `Err` only when the file is not a VHD
    /// at all or cannot be read; everything else is recorded in `problems`.
    pub fn read<F: ImageFile>(file: &F, path: &Path) -> Result<Layout> {
        let file_len = file.len().map_err(|source| Error::Io {
            path: path.into(),
            op: "stat",
            offset: 0,
            source,
        })?;
        if file_len < FOOTER_SIZE as u64 - 1 {
            return Err(Error::NotThisFormat {
                format: image_io::format::FormatKind::Vhd,
                path: path.into(),
                reason: format!("file is {file_len} bytes, smaller than a VHD footer"),
            });
        }
        let mut l = Layout {
            path: path.into(),
            file_len,
            footer: Footer::parse(&[0; FOOTER_SIZE]),
            footer_raw: [0; FOOTER_SIZE],
            footer_offset: 0,
            legacy_footer: false,
            header: None,
            bat: Vec::new(),
            locators: Vec::new(),
            metadata: Vec::new(),
            problems: Vec::new(),
        };
        l.read_footers(file)?;
        if l.footer.disk_type() != Some(DiskType::Fixed)
            && l.footer.problems().is_empty()
            && l.footer_offset > 0
        {
            l.read_dynamic(file)?;
        } else if l.footer.disk_type() == Some(DiskType::Fixed) {
            let data = l.footer_offset;
            let size = l.virtual_size();
            if data < size {
                let off = l.footer_offset;
                l.corrupt("footer", off, format!("fixed image is truncated: {data} data bytes before the footer, virtual size {size}"));
            }
        }
        Ok(l)
    }

    fn read_footers<F: ImageFile>(&mut self, file: &F) -> Result<()> {
        let path = self.path.clone();
        let len = self.file_len;
        let mut tail = [0u8; FOOTER_SIZE];
        let tail_at = len.saturating_sub(FOOTER_SIZE as u64);
        let tail_len = (len - tail_at) as usize;
        read_at(file, &path, &mut tail[..tail_len], tail_at, "read footer")?;
        let mut copy = [0u8; FOOTER_SIZE];
        let copy_ok = len >= FOOTER_SIZE as u64 * 2 && {
            read_at(file, &path, &mut copy, 0, "read footer copy")?;
            &copy[0..8] == COOKIE
        };
        if tail_len == FOOTER_SIZE && &tail[0..8] == COOKIE {
            self.footer_raw = tail;
            self.footer_offset = tail_at;
        } else if &tail[1..9] == COOKIE {
            // Legacy 511-byte footer: the last 511 bytes.
            self.footer_raw[..FOOTER_SIZE - 1].copy_from_slice(&tail[1..]);
            self.footer_offset = len - (FOOTER_SIZE as u64 - 1);
            self.legacy_footer = true;
        } else if copy_ok {
            self.footer_raw = copy;
            self.footer_offset = tail_at;
            self.corrupt(
                "footer",
                tail_at,
                "no footer at the end of the file (the copy at offset 0 is present; `check --repair` restores it)".into(),
            );
        } else {
            return Err(Error::NotThisFormat {
                format: image_io::format::FormatKind::Vhd,
                path,
                reason: "no \"conectix\" footer at the end of the file or at offset 0".into(),
            });
        }
        self.footer = Footer::parse(&self.footer_raw);
        let computed = Footer::computed_checksum(&self.footer_raw);
        if computed != self.footer.checksum {
            let (s, c, off) = (self.footer.checksum, computed, self.footer_offset);
            self.checksum("footer", off, s, c);
        }
        for reason in self.footer.problems() {
            let off = self.footer_offset;
            self.corrupt("footer", off, reason);
        }
        if self.footer.disk_type() != Some(DiskType::Fixed) && self.footer.disk_type().is_some() {
            self.metadata.push((0, FOOTER_SIZE as u64, "footer copy"));
            if !copy_ok {
                self.corrupt("footer copy", 0, "missing footer copy at offset 0".into());
            } else if copy != self.footer_raw {
                let computed = Footer::computed_checksum(&copy);
                let stored = Footer::parse(&copy).checksum;
                if computed != stored {
                    self.checksum("footer copy", 0, stored, computed);
                } else {
                    self.corrupt(
                        "footer copy",
                        0,
                        "differs from the footer at the end of the file".into(),
                    );
                }
            }
        }
        Ok(())
    }

    fn read_dynamic<F: ImageFile>(&mut self, file: &F) -> Result<()> {
        let path = self.path.clone();
        let hdr_at = self.footer.data_offset;
        if hdr_at
            .checked_add(HEADER_SIZE as u64)
            .is_none_or(|e| e > self.footer_offset)
        {
            self.corrupt(
                "footer",
                48,
                format!("dynamic header offset {hdr_at:#x} lies outside the file"),
            );
            return Ok(());
        }
        let mut raw = [0u8; HEADER_SIZE];
        read_at(file, &path, &mut raw, hdr_at, "read dynamic header")?;
        let h = DynamicHeader::parse(&raw);
        self.metadata
            .push((hdr_at, HEADER_SIZE as u64, "dynamic header"));
        let computed = DynamicHeader::computed_checksum(&raw);
        if computed != h.checksum {
            self.checksum("dynamic header", hdr_at, h.checksum, computed);
        }
        let vsize = self.virtual_size();
        let problems = h.problems(vsize);
        let usable = problems.is_empty();
        for reason in problems {
            self.corrupt("dynamic header", hdr_at, reason);
        }
        if !usable {
            return Ok(());
        }
        if !(MIN_BLOCK_SIZE..=MAX_BLOCK_SIZE).contains(&h.block_size) {
            self.problems.push(Problem {
                severity: Severity::Corruption,
                error: Error::Unsupported {
                    path: path.clone(),
                    what: format!("block size {} (supported: 4 KiB to 256 MiB)", h.block_size),
                },
                bytes: 0,
            });
            return Ok(());
        }
        let entries = vsize.div_ceil(h.block_size as u64);
        let bat_bytes = (h.max_table_entries as u64 * 4).div_ceil(512) * 512;
        let used_bytes = entries * 4;
        if h.table_offset
            .checked_add(used_bytes)
            .is_none_or(|e| e > self.footer_offset)
        {
            self.corrupt(
                "dynamic header",
                hdr_at + TABLE_OFFSET_OFFSET as u64,
                format!(
                    "BAT at {:#x} ({} entries) extends past the end of the file",
                    h.table_offset, entries
                ),
            );
            return Ok(());
        }
        let mut bat_raw = vec![RawBatEntry::ZERO; entries as usize];
        read_at(
            file,
            &path,
            bat_raw.as_mut_bytes(),
            h.table_offset,
            "read BAT",
        )?;
        self.bat = bat_raw.iter().map(|e| e.get()).collect();
        self.metadata.push((
            h.table_offset,
            bat_bytes.min(self.footer_offset - h.table_offset),
            "BAT",
        ));
        if h.parent_uuid.is_nil() && self.footer.disk_type() == Some(DiskType::Differencing) {
            self.corrupt(
                "dynamic header",
                hdr_at + PARENT_UUID_OFFSET as u64,
                "differencing image without a parent unique id".into(),
            );
        }
        if self.footer.disk_type() == Some(DiskType::Differencing) {
            self.read_locators(file, &h)?;
        }
        self.header = Some(h);
        self.check_blocks();
        Ok(())
    }

    fn read_locators<F: ImageFile>(&mut self, file: &F, h: &DynamicHeader) -> Result<()> {
        let path = self.path.clone();
        let hdr_at = self.footer.data_offset;
        for (i, entry) in h.locators.iter().enumerate() {
            let entry_at = hdr_at + (LOCATORS_OFFSET + LOCATOR_ENTRY_SIZE * i) as u64;
            if !entry.is_path() {
                continue;
            }
            if entry.data_length > MAX_LOCATOR_DATA {
                self.corrupt(
                    "parent locator",
                    entry_at,
                    format!(
                        "{} data length {} exceeds {} bytes",
                        entry.code.name(),
                        entry.data_length,
                        MAX_LOCATOR_DATA
                    ),
                );
                continue;
            }
            if entry
                .data_offset
                .checked_add(entry.data_length as u64)
                .is_none_or(|e| e > self.footer_offset)
            {
                self.corrupt(
                    "parent locator",
                    entry_at,
                    format!(
                        "{} data at {:#x} lies outside the file",
                        entry.code.name(),
                        entry.data_offset
                    ),
                );
                continue;
            }
            let mut data = vec![0u8; entry.data_length as usize];
            read_at(
                file,
                &path,
                &mut data,
                entry.data_offset,
                "read parent locator",
            )?;
            let footprint = (entry.data_length as u64)
                .next_multiple_of(512)
                .min(self.footer_offset - entry.data_offset);
            self.metadata
                .push((entry.data_offset, footprint, "parent locator data"));
            self.locators.push(Locator {
                entry: *entry,
                text: entry.decode(&data),
            });
        }
        Ok(())
    }

    /// Checks that blocks lie inside the file and overlap neither each other nor metadata, and
    /// records unused space as leaks.
    fn check_blocks(&mut self) {
        let Some(bs) = self.block_size() else { return };
        let block_bytes = self.bitmap_size() + bs as u64;
        let mut regions: Vec<(u64, u64, String)> = self
            .metadata
            .iter()
            .map(|&(s, l, what)| (s, s + l, what.to_string()))
            .collect();
        let bat_at = self.header.as_ref().map_or(0, |h| h.table_offset);
        let mut bad = Vec::new();
        for (i, &e) in self.bat.iter().enumerate() {
            if e == UNALLOCATED {
                continue;
            }
            let start = e as u64 * 512;
            let end = start + block_bytes;
            if end > self.footer_offset {
                bad.push((bat_at + 4 * i as u64, format!("BAT entry {i} points to sector {e} (offset {start:#x}), past the end of the data area at {:#x}", self.footer_offset)));
            } else {
                regions.push((start, end, format!("block {i}")));
            }
        }
        for (off, reason) in bad {
            self.corrupt("BAT", off, reason);
        }
        regions.sort();
        let mut overlaps = Vec::new();
        for w in regions.windows(2) {
            if w[1].0 < w[0].1 {
                overlaps.push(format!(
                    "{} at {:#x} overlaps {} at {:#x}",
                    w[1].2, w[1].0, w[0].2, w[0].0
                ));
            }
        }
        for reason in overlaps {
            self.corrupt("BAT", bat_at, reason);
        }
        // Unused space big enough to hold a block is leaked (alignment padding is smaller).
        let mut end = 0u64;
        let mut leaks = Vec::new();
        for (s, e, _) in regions.iter().chain(std::iter::once(&(
            self.footer_offset,
            self.footer_offset,
            String::new(),
        ))) {
            if *s > end && s - end >= block_bytes {
                leaks.push((end, s - end));
            }
            end = end.max(*e);
        }
        for (at, bytes) in leaks {
            self.problems.push(Problem {
                severity: Severity::Leak,
                error: Error::Corrupt {
                    path: self.path.clone(),
                    structure: "file space",
                    offset: at,
                    reason: format!("{bytes} bytes not used by any block or metadata"),
                },
                bytes,
            });
        }
    }

    /// Parent locators in resolution order with their host paths, relative ones resolved against
    /// the child's directory: W2ru, Wi2r, W2ku, Wi2k, MacX, then the parent unicode name as a
    /// path and its file name beside the child. Duplicates removed.
    pub fn parent_candidates(&self) -> Vec<PathBuf> {
        use crate::locator::{base_name, host_path};
        let dir = self
            .path
            .parent()
            .map(Path::to_path_buf)
            .unwrap_or_default();
        let mut out: Vec<PathBuf> = Vec::new();
        let mut push = |p: PathBuf| {
            if !out.contains(&p) {
                out.push(p);
            }
        };
        let mut ordered: Vec<&Locator> = self
            .locators
            .iter()
            .filter(|l| l.entry.is_relative())
            .collect();
        ordered.extend(self.locators.iter().filter(|l| !l.entry.is_relative()));
        for l in &ordered {
            if let Some(t) = &l.text {
                let p = host_path(t);
                push(if l.entry.is_relative() || p.is_relative() {
                    dir.join(p)
                } else {
                    p
                });
            }
        }
        if let Some(h) = &self.header {
            let name = &h.parent_unicode_name;
            if !name.is_empty() {
                let p = host_path(name);
                if p.is_absolute() {
                    push(p);
                }
                push(dir.join(base_name(name)));
            }
        }
        for l in &ordered {
            if let Some(t) = &l.text {
                push(dir.join(base_name(t)));
            }
        }
        out
    }
}
