//! An open VHDX image: replays the log, resolves virtual ranges to file ranges, allocates
//! blocks, and makes metadata changes durable through the log.
//!
//! Invariants:
//! - A pending log is replayed before anything else is trusted: on disk for a writable open, into
//!   an in-memory overlay (never touching the file) for a read-only one.
//! - A read-only image never writes. A writable open rotates FileWriteGuid before its first
//!   write; the first data write rotates DataWriteGuid (children link to it).
//! - Payload goes straight to its file offset. BAT and sector-bitmap changes are kept in memory
//!   and written by [`VhdxImage::flush`]: sync the payload, set the header's LogGuid (sync),
//!   write a log entry, sync, apply the pages at their homes, sync, clear LogGuid (sync). Only a
//!   crash inside a flush leaves a log to replay.
//! - New blocks are appended at 1 MiB-aligned offsets past everything in the file, so fresh
//!   block space reads as zeros and never exposes stale bytes.

use crate::error::{Error, Result};
use crate::format::{
    guids, state, BatEntry, FileIdentifier, Header, RawBatEntry, RawHeader, RegionTable,
    CHECKSUM_OFFSET, HEADER_OFFSETS, IDENT_SIGNATURE, MIB, REGION_OFFSETS, TABLE_SIZE,
};
use crate::log::SECTOR;
use crate::meta::{DiskParams, ParentLink};
use image_io::ImageFile;
use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::path::{Path, PathBuf};
use uuid::Uuid;
use zerocopy::{FromZeros, IntoBytes};

pub use image_io::OpenMode;

pub use image_io::format::{Durability, ReadExtent, ReadSource, WriteExtent, WritePlan};

/// Parsed location of the two regions.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Regions {
    pub bat_offset: u64,
    pub bat_length: u64,
    pub metadata_offset: u64,
    pub metadata_length: u64,
}

/// An open VHDX image over any [`ImageFile`] (a `std::fs::File` for real use).
#[derive(Debug)]
pub struct VhdxImage<F: ImageFile = std::fs::File> {
    pub(crate) path: PathBuf,
    pub(crate) file: F,
    pub(crate) writable: bool,
    pub(crate) durability: Durability,
    pub(crate) creator: String,
    pub(crate) header: Header,
    pub(crate) header_slot: usize,
    pub(crate) regions: Regions,
    pub(crate) params: DiskParams,
    pub(crate) parent: Option<ParentLink>,
    pub(crate) bat: Vec<BatEntry>,
    pub(crate) dirty_bat_pages: BTreeSet<u64>,
    pub(crate) bitmap_pages: HashMap<u64, Box<[u8; SECTOR]>>,
    pub(crate) dirty_bitmap_pages: BTreeSet<u64>,
    pub(crate) overlay: BTreeMap<u64, Box<[u8; SECTOR]>>,
    pub(crate) file_len: u64,
    pub(crate) next_alloc: u64,
    pub(crate) log_active: bool,
    pub(crate) log_sequence: u64,
    pub(crate) log_position: u64,
    pub(crate) data_guid_rotated: bool,
    pub(crate) replayed: bool,
}

pub(crate) fn io<'a>(
    path: &'a Path,
    op: &'static str,
    offset: u64,
) -> impl FnOnce(std::io::Error) -> Error + 'a {
    move |source| Error::Io {
        path: path.into(),
        op,
        offset,
        source,
    }
}

/// Largest file a log replay may ask for: twice the largest virtual disk (payload plus
/// metadata and leaked space never come near it).
pub(crate) const MAX_FILE_LEN: u64 = 2 * crate::format::MAX_VIRTUAL_SIZE;

/// Most zero-filled pages a read-only replay keeps in memory (64 MiB).
pub(crate) const MAX_OVERLAY_ZERO_PAGES: u64 = 16384;

impl VhdxImage<std::fs::File> {
    /// Opens the image at `path`. The file is locked for `mode` (see [`image_io::lock`]): a second writer, or a writer
    /// and a reader, are refused with [`Error::InUse`]. A pending log is replayed in memory
    /// when read-only, on disk when writable.
    pub fn open(path: &Path, mode: OpenMode) -> Result<Self> {
        let file = image_io::lock::open(path, mode).map_err(|e| Error::from_open(path, e))?;
        Self::open_file(file, path, mode)
    }

    /// Whether `file` starts with the `vhdxfile` signature.
    pub fn probe(file: &std::fs::File) -> std::io::Result<bool> {
        let mut sig = [0u8; 8];
        match std::os::unix::fs::FileExt::read_exact_at(file, &mut sig, 0) {
            Ok(()) => Ok(&sig == IDENT_SIGNATURE),
            Err(e) if e.kind() == std::io::ErrorKind::UnexpectedEof => Ok(false),
            Err(e) => Err(e),
        }
    }
}

impl<F: ImageFile> VhdxImage<F> {
    /// Opens an image held in `file`; `path` names it in errors and anchors relative parent
    /// paths.
    pub fn open_file(file: F, path: &Path, mode: OpenMode) -> Result<Self> {
        let writable = mode.is_writable();
        let file_len = file.len().map_err(io(path, "stat", 0))?;
        let mut ident = FileIdentifier::new_zeroed();
        if file_len < 4 * MIB / 4 {
            return Err(Error::NotThisFormat {
                format: image_io::format::FormatKind::Vhdx,
                path: path.into(),
                reason: format!("file is {file_len} bytes, smaller than the VHDX header section"),
            });
        }
        file.read_exact_at(ident.as_mut_bytes(), 0)
            .map_err(io(path, "read file identifier", 0))?;
        if &ident.signature != IDENT_SIGNATURE {
            return Err(Error::NotThisFormat {
                format: image_io::format::FormatKind::Vhdx,
                path: path.into(),
                reason: "no \"vhdxfile\" signature at offset 0".into(),
            });
        }
        let creator = ident.creator();
        let (header, header_slot) = read_headers(&file, path)?;
        let mut img = VhdxImage {
            path: path.into(),
            file,
            writable,
            durability: Durability::Durable,
            creator,
            header,
            header_slot,
            regions: Regions {
                bat_offset: 0,
                bat_length: 0,
                metadata_offset: 0,
                metadata_length: 0,
            },
            params: DiskParams::default(),
            parent: None,
            bat: Vec::new(),
            dirty_bat_pages: BTreeSet::new(),
            bitmap_pages: HashMap::new(),
            dirty_bitmap_pages: BTreeSet::new(),
            overlay: BTreeMap::new(),
            file_len,
            next_alloc: 0,
            log_active: false,
            log_sequence: 1,
            log_position: 0,
            data_guid_rotated: false,
            replayed: false,
        };
        img.replay_log()?;
        img.regions = img.read_regions()?;
        let (params, parent) = crate::meta::read_metadata(&img)?;
        img.params = params;
        img.parent = parent;
        img.read_bat()?;
        if writable {
            // A new FileWriteGuid before anything else is modified in this session.
            let mut h = img.header.clone();
            h.file_write_guid = Uuid::new_v4();
            img.write_header(h)?;
        }
        Ok(img)
    }

    /// Path of the image.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// The underlying file: payload writes go to the offsets `resolve_write` returns.
    pub fn file(&self) -> &F {
        &self.file
    }

    /// The creator string of the file type identifier.
    pub fn creator(&self) -> &str {
        &self.creator
    }

    /// The current header.
    pub fn header(&self) -> &Header {
        &self.header
    }

    /// Disk parameters from the metadata region.
    pub fn params(&self) -> &DiskParams {
        &self.params
    }

    /// Virtual size in bytes.
    pub fn virtual_size(&self) -> u64 {
        self.params.virtual_size
    }

    /// Block size in bytes.
    pub fn block_size(&self) -> u32 {
        self.params.block_size
    }

    /// Logical sector size (512 or 4096).
    pub fn logical_sector_size(&self) -> u32 {
        self.params.logical_sector_size
    }

    /// Physical sector size (512 or 4096).
    pub fn physical_sector_size(&self) -> u32 {
        self.params.physical_sector_size
    }

    /// Fixed (blocks left allocated), dynamic or differencing.
    pub fn subformat(&self) -> &'static str {
        if self.params.has_parent {
            "differencing"
        } else if self.params.leave_blocks_allocated {
            "fixed"
        } else {
            "dynamic"
        }
    }

    /// The parent link of a differencing image.
    pub fn parent(&self) -> Option<&ParentLink> {
        self.parent.as_ref()
    }

    /// Whether a log was replayed at open (on disk or in memory).
    pub fn replayed_log(&self) -> bool {
        self.replayed
    }

    /// Whether opened for writing.
    pub fn is_writable(&self) -> bool {
        self.writable
    }

    /// Sets the ordering mode for later flushes.
    pub fn set_durability(&mut self, d: Durability) {
        self.durability = d;
    }

    /// Number of payload blocks with data in this file.
    pub fn allocated_blocks(&self) -> usize {
        (0..self.payload_blocks())
            .filter(|&b| {
                matches!(
                    self.bat[self.payload_index(b)].state(),
                    state::FULLY_PRESENT | state::PARTIALLY_PRESENT
                )
            })
            .count()
    }

    pub(crate) fn chunk_ratio(&self) -> u64 {
        (1u64 << 23) * self.params.logical_sector_size as u64 / self.params.block_size as u64
    }

    pub(crate) fn payload_blocks(&self) -> u64 {
        self.params
            .virtual_size
            .div_ceil(self.params.block_size as u64)
    }

    pub(crate) fn payload_index(&self, block: u64) -> usize {
        (block + block / self.chunk_ratio()) as usize
    }

    pub(crate) fn bitmap_index(&self, chunk: u64) -> usize {
        (chunk * (self.chunk_ratio() + 1) + self.chunk_ratio()) as usize
    }

    pub(crate) fn bat_entries(&self) -> u64 {
        let (n, cr) = (self.payload_blocks(), self.chunk_ratio());
        if self.params.has_parent {
            n.div_ceil(cr) * (cr + 1)
        } else {
            n + (n - 1) / cr
        }
    }

    /// Reads file bytes as they are after log replay: a read-only open sees the replayed pages
    /// from memory, and zeros past the end of the file up to the replayed length.
    pub fn read_file_at(&self, buf: &mut [u8], offset: u64) -> Result<()> {
        let end = offset
            .checked_add(buf.len() as u64)
            .ok_or_else(|| Error::InvalidArgument("offset overflow".into()))?;
        // Fast path (every payload read): the range is in the file, one pread, no stat.
        let direct = end <= self.file_len && self.file.read_exact_at(buf, offset).is_ok();
        let on_disk = if direct {
            end
        } else {
            self.file.len().map_err(io(&self.path, "stat", offset))?
        };
        if end > self.file_len.max(on_disk) {
            return Err(Error::Corrupt {
                path: self.path.clone(),
                structure: "file",
                offset,
                reason: format!(
                    "read of {} bytes past the end of the file ({} bytes)",
                    buf.len(),
                    self.file_len.max(on_disk)
                ),
            });
        }
        let real = on_disk.saturating_sub(offset).min(buf.len() as u64) as usize;
        if real > 0 && !direct {
            self.file
                .read_exact_at(&mut buf[..real], offset)
                .map_err(io(&self.path, "read", offset))?;
        }
        buf[real..].fill(0);
        if !self.overlay.is_empty() {
            let first = offset / SECTOR as u64 * SECTOR as u64;
            for (&at, page) in self.overlay.range(first..end) {
                let s = at.max(offset);
                let e = (at + SECTOR as u64).min(end);
                buf[(s - offset) as usize..(e - offset) as usize]
                    .copy_from_slice(&page[(s - at) as usize..(e - at) as usize]);
            }
        }
        Ok(())
    }

    fn read_regions(&self) -> Result<Regions> {
        let mut last_err = None;
        for at in REGION_OFFSETS {
            let mut b = vec![0u8; TABLE_SIZE];
            self.read_file_at(&mut b, at)?;
            match self.parse_regions(&b, at) {
                Ok(r) => return Ok(r),
                Err(e) => last_err = Some(e),
            }
        }
        Err(last_err.expect("two tables tried"))
    }

    fn parse_regions(&self, b: &[u8], at: u64) -> Result<Regions> {
        let corrupt = |reason: String| Error::Corrupt {
            path: self.path.clone(),
            structure: "region table",
            offset: at,
            reason,
        };
        let t = RegionTable::parse(b).ok_or_else(|| corrupt("more than 2047 entries".into()))?;
        if t.signature != crate::format::REGION_SIGNATURE {
            return Err(corrupt("bad signature (expected \"regi\")".into()));
        }
        let computed = crate::format::crc_with_zeroed(b, CHECKSUM_OFFSET);
        if computed != t.checksum {
            return Err(Error::Checksum {
                path: self.path.clone(),
                structure: "region table",
                offset: at,
                stored: t.checksum,
                computed,
            });
        }
        let (mut bat, mut meta) = (None, None);
        for e in &t.entries {
            let end = e.file_offset.checked_add(e.length as u64);
            if e.file_offset % MIB != 0
                || e.file_offset < MIB
                || !(e.length as u64).is_multiple_of(MIB)
                || e.length == 0
                || end.is_none_or(|x| x > self.file_len)
            {
                return Err(corrupt(format!(
                    "region {} at {:#x} (+{:#x}) is not 1 MiB aligned inside the file",
                    e.guid, e.file_offset, e.length
                )));
            }
            if e.guid == guids::BAT_REGION {
                bat = Some((e.file_offset, e.length as u64));
            } else if e.guid == guids::METADATA_REGION {
                meta = Some((e.file_offset, e.length as u64));
            } else if e.required {
                return Err(Error::Unsupported {
                    path: self.path.clone(),
                    what: format!("required region {} is unknown", e.guid),
                });
            }
        }
        let (Some(bat), Some(meta)) = (bat, meta) else {
            return Err(corrupt("BAT or metadata region missing".into()));
        };
        let log = (self.header.log_offset, self.header.log_length as u64);
        for (a, b, what) in [
            (bat, meta, "BAT and metadata"),
            (bat, log, "BAT and log"),
            (meta, log, "metadata and log"),
        ] {
            if a.0 < b.0 + b.1 && b.0 < a.0 + a.1 {
                return Err(corrupt(format!("{what} regions overlap")));
            }
        }
        Ok(Regions {
            bat_offset: bat.0,
            bat_length: bat.1,
            metadata_offset: meta.0,
            metadata_length: meta.1,
        })
    }

    pub(crate) fn regions(&self) -> Regions {
        self.regions
    }

    fn read_bat(&mut self) -> Result<()> {
        let entries = self.bat_entries();
        if entries * 8 > self.regions.bat_length {
            return Err(Error::Corrupt {
                path: self.path.clone(),
                structure: "BAT",
                offset: self.regions.bat_offset,
                reason: format!(
                    "{entries} entries do not fit in the BAT region of {} bytes",
                    self.regions.bat_length
                ),
            });
        }
        let mut raw = vec![RawBatEntry::ZERO; entries as usize];
        self.read_file_at(raw.as_mut_bytes(), self.regions.bat_offset)?;
        self.bat = raw.iter().map(|e| BatEntry(e.get())).collect();
        let problems = crate::check::bat_problems(self);
        if let Some((offset, reason)) = problems.into_iter().next() {
            return Err(Error::Corrupt {
                path: self.path.clone(),
                structure: "BAT",
                offset,
                reason,
            });
        }
        let mut end = self
            .file_len
            .max(self.regions.bat_offset + self.regions.bat_length)
            .max(self.regions.metadata_offset + self.regions.metadata_length);
        for e in &self.bat {
            if matches!(e.state(), state::FULLY_PRESENT | state::PARTIALLY_PRESENT) {
                end = end.max(e.file_offset() + self.params.block_size as u64);
            }
        }
        self.next_alloc = end.next_multiple_of(MIB);
        Ok(())
    }

    pub(crate) fn bat(&self) -> &[BatEntry] {
        &self.bat
    }

    pub(crate) fn file_len(&self) -> u64 {
        self.file_len
    }

    pub(crate) fn check_range(&self, offset: u64, len: u64) -> Result<()> {
        if offset
            .checked_add(len)
            .is_none_or(|e| e > self.params.virtual_size)
        {
            return Err(Error::InvalidArgument(format!(
                "{}: range {offset}+{len} is beyond the virtual size {}",
                self.path.display(),
                self.params.virtual_size
            )));
        }
        Ok(())
    }

    /// File offset of the bitmap page holding virtual sector `sector`, and the bit index in it.
    pub(crate) fn bitmap_location(&self, sector: u64) -> (u64, usize) {
        let per_chunk = 1u64 << 23;
        let chunk = sector / per_chunk;
        let within = sector % per_chunk;
        let sb = self.bat[self.bitmap_index(chunk)].file_offset();
        let page = within / (SECTOR as u64 * 8);
        (
            sb + page * SECTOR as u64,
            (within % (SECTOR as u64 * 8)) as usize,
        )
    }

    pub(crate) fn bitmap_page(&mut self, page_at: u64) -> Result<&mut Box<[u8; SECTOR]>> {
        if !self.bitmap_pages.contains_key(&page_at) {
            let mut p = Box::new([0u8; SECTOR]);
            self.read_file_at(&mut p[..], page_at)?;
            self.bitmap_pages.insert(page_at, p);
        }
        Ok(self.bitmap_pages.get_mut(&page_at).expect("inserted"))
    }

    pub(crate) fn sector_present(&mut self, sector: u64) -> Result<bool> {
        let (page, bit) = self.bitmap_location(sector);
        let p = self.bitmap_page(page)?;
        Ok(p[bit / 8] & (1 << (bit % 8)) != 0)
    }

    /// Where `[offset, offset+len)` lives: extents in order, contiguous, covering the range,
    /// adjacent extents of the same kind merged.
    pub fn resolve_read(&mut self, offset: u64, len: u64) -> Result<Vec<ReadExtent>> {
        self.check_range(offset, len)?;
        let mut out = Vec::new();
        let (bs, end) = (self.params.block_size as u64, offset + len);
        let lss = self.params.logical_sector_size as u64;
        let absent = if self.params.has_parent {
            ReadSource::Parent
        } else {
            ReadSource::Zero
        };
        let mut pos = offset;
        while pos < end {
            let block = pos / bs;
            let base = block * bs;
            let block_end = (base + bs).min(end);
            let e = self.bat[self.payload_index(block)];
            match e.state() {
                state::FULLY_PRESENT => {
                    ReadExtent::push_merged(
                        &mut out,
                        pos,
                        block_end - pos,
                        ReadSource::Data {
                            file_offset: e.file_offset() + (pos - base),
                        },
                    );
                    pos = block_end;
                }
                state::PARTIALLY_PRESENT => {
                    while pos < block_end {
                        let sector = pos / lss;
                        let present = self.sector_present(sector)?;
                        let mut s = sector + 1;
                        while s * lss < block_end && self.sector_present(s)? == present {
                            s += 1;
                        }
                        let run_end = (s * lss).min(block_end);
                        let src = if present {
                            ReadSource::Data {
                                file_offset: e.file_offset() + (pos - base),
                            }
                        } else {
                            ReadSource::Parent
                        };
                        ReadExtent::push_merged(&mut out, pos, run_end - pos, src);
                        pos = run_end;
                    }
                }
                state::ZERO => {
                    ReadExtent::push_merged(&mut out, pos, block_end - pos, ReadSource::Zero);
                    pos = block_end;
                }
                _ => {
                    ReadExtent::push_merged(&mut out, pos, block_end - pos, absent);
                    pos = block_end;
                }
            }
        }
        Ok(out)
    }

    /// Rotates DataWriteGuid once per session, before the first data change.
    pub(crate) fn before_data_change(&mut self) -> Result<()> {
        if !self.writable {
            return Err(Error::ReadOnly {
                path: self.path.clone(),
            });
        }
        if !self.data_guid_rotated {
            let mut h = self.header.clone();
            h.data_write_guid = Uuid::new_v4();
            self.write_header(h)?;
            self.data_guid_rotated = true;
        }
        Ok(())
    }

    /// File ranges to write `[offset, offset+len)` to, allocating blocks as needed. In a
    /// differencing image a logical sector not yet present must be written whole (the caller
    /// reads the rest from the parent first).
    pub fn resolve_write(&mut self, offset: u64, len: u64) -> Result<WritePlan> {
        self.check_range(offset, len)?;
        self.before_data_change()?;
        let mut plan = WritePlan {
            extents: Vec::new(),
            sectors: Vec::new(),
        };
        let (bs, end) = (self.params.block_size as u64, offset + len);
        let lss = self.params.logical_sector_size as u64;
        let mut pos = offset;
        while pos < end {
            let block = pos / bs;
            let base = block * bs;
            let block_end = (base + bs).min(end);
            let idx = self.payload_index(block);
            let mut e = self.bat[idx];
            if !matches!(e.state(), state::FULLY_PRESENT | state::PARTIALLY_PRESENT) {
                e = self.allocate(block)?;
            }
            if e.state() == state::PARTIALLY_PRESENT {
                let (first, last) = (pos / lss, block_end.div_ceil(lss));
                let head_partial = !pos.is_multiple_of(lss) && !self.sector_present(first)?;
                let tail_partial = block_end % lss != 0 && !self.sector_present(last - 1)?;
                if head_partial || tail_partial {
                    return Err(Error::InvalidArgument(format!("{}: partial-sector write at {offset}+{len} to a sector not yet in the differencing image; write whole {lss}-byte sectors", self.path.display())));
                }
                plan.sectors.push((first, last));
            }
            let file_offset = e.file_offset() + (pos - base);
            match plan.extents.last_mut() {
                Some(x) if x.file_offset + x.len == file_offset => x.len += block_end - pos,
                _ => plan.extents.push(WriteExtent {
                    offset: pos,
                    len: block_end - pos,
                    file_offset,
                }),
            }
            pos = block_end;
        }
        Ok(plan)
    }

    pub(crate) fn take_space(&mut self, len: u64) -> Result<u64> {
        let at = self.next_alloc;
        let end = at
            .checked_add(len)
            .filter(|&e| e >> 20 < 1 << 44)
            .ok_or_else(|| Error::Unsupported {
                path: self.path.clone(),
                what: "file would exceed the BAT's addressable size".into(),
            })?;
        // Grow the file over the new space now, so the block never reaches past the end of
        // the file even if its payload is written only in part (fresh space reads as zeros).
        if self.file.len().map_err(io(&self.path, "stat", at))? < end {
            self.file
                .set_len(end)
                .map_err(io(&self.path, "extend file", at))?;
        }
        self.next_alloc = end;
        Ok(at)
    }

    pub(crate) fn set_bat(&mut self, idx: usize, e: BatEntry) {
        self.bat[idx] = e;
        self.dirty_bat_pages.insert(idx as u64 * 8 / SECTOR as u64);
    }

    /// Gives `block` file space. Blocks that would read from the parent become partially
    /// present (with a sector bitmap for their chunk); all others fully present, since fresh
    /// space reads as zeros.
    fn allocate(&mut self, block: u64) -> Result<BatEntry> {
        let idx = self.payload_index(block);
        let old = self.bat[idx].state();
        let partial = self.params.has_parent && !matches!(old, state::ZERO);
        if partial {
            let chunk = block / self.chunk_ratio();
            let sb = self.bitmap_index(chunk);
            if self.bat[sb].state() != state::SB_PRESENT {
                let at = self.take_space(MIB)?;
                self.set_bat(sb, BatEntry::new(state::SB_PRESENT, at));
            }
        }
        let at = self.take_space(self.params.block_size as u64)?;
        let e = BatEntry::new(
            if partial {
                state::PARTIALLY_PRESENT
            } else {
                state::FULLY_PRESENT
            },
            at,
        );
        self.set_bat(idx, e);
        Ok(e)
    }

    /// Marks the sectors of a completed payload write present. Durable at the next flush.
    pub fn commit_write(&mut self, plan: WritePlan) -> Result<()> {
        for (first, last) in plan.sectors {
            for s in first..last {
                let (page, bit) = self.bitmap_location(s);
                let p = self.bitmap_page(page)?;
                if p[bit / 8] & (1 << (bit % 8)) == 0 {
                    p[bit / 8] |= 1 << (bit % 8);
                    self.dirty_bitmap_pages.insert(page);
                }
            }
        }
        Ok(())
    }

    /// Makes whole blocks of `[offset, offset+len)` read as zeros by marking them ZERO (their
    /// space stays in the file until compaction); returns the sub-ranges the caller must still
    /// zero-fill. Fixed images keep their blocks: the whole range is returned.
    pub fn discard(&mut self, offset: u64, len: u64) -> Result<Vec<(u64, u64)>> {
        self.check_range(offset, len)?;
        if len == 0 {
            return Ok(vec![]);
        }
        if self.params.leave_blocks_allocated {
            return Ok(vec![(offset, len)]);
        }
        self.before_data_change()?;
        let (bs, end) = (self.params.block_size as u64, offset + len);
        let mut rest: Vec<(u64, u64)> = Vec::new();
        let mut pos = offset;
        while pos < end {
            let block = pos / bs;
            let base = block * bs;
            let block_end = (base + bs).min(end);
            let whole =
                pos == base && (block_end == base + bs || block_end == self.params.virtual_size);
            let idx = self.payload_index(block);
            let reads_zero = match self.bat[idx].state() {
                state::ZERO => true,
                state::FULLY_PRESENT | state::PARTIALLY_PRESENT => false,
                _ => !self.params.has_parent,
            };
            if whole && !reads_zero {
                self.set_bat(idx, BatEntry::new(state::ZERO, 0));
            } else if !reads_zero {
                match rest.last_mut() {
                    Some((o, l)) if *o + *l == pos => *l += block_end - pos,
                    _ => rest.push((pos, block_end - pos)),
                }
            }
            pos = block_end;
        }
        Ok(rest)
    }
}

/// Reads both headers; the current one is the valid one with the larger sequence number (equal
/// numbers are accepted: Disk2vhd writes two identical headers).
fn read_headers<F: ImageFile>(file: &F, path: &Path) -> Result<(Header, usize)> {
    let mut best: Option<(Header, usize)> = None;
    let mut first_err = None;
    for (slot, at) in HEADER_OFFSETS.into_iter().enumerate() {
        let mut raw = RawHeader::new_zeroed();
        file.read_exact_at(raw.as_mut_bytes(), at)
            .map_err(io(path, "read header", at))?;
        let h = Header::from_raw(&raw);
        let computed = crate::format::crc_with_zeroed(raw.as_bytes(), CHECKSUM_OFFSET);
        let err = if h.signature != crate::format::HEADER_SIGNATURE {
            Some(Error::Corrupt {
                path: path.into(),
                structure: "header",
                offset: at,
                reason: "bad signature (expected \"head\")".into(),
            })
        } else if computed != h.checksum {
            Some(Error::Checksum {
                path: path.into(),
                structure: "header",
                offset: at,
                stored: h.checksum,
                computed,
            })
        } else {
            h.problems()
                .into_iter()
                .next()
                .map(|reason| Error::Corrupt {
                    path: path.into(),
                    structure: "header",
                    offset: at,
                    reason,
                })
        };
        match err {
            Some(e) => first_err = first_err.or(Some(e)),
            None => {
                if best
                    .as_ref()
                    .is_none_or(|(b, _)| h.sequence_number > b.sequence_number)
                {
                    best = Some((h, slot));
                }
            }
        }
    }
    best.ok_or_else(|| first_err.expect("no valid header means an error was recorded"))
}
