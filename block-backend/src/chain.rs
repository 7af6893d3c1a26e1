//! Chains: a stack of layers presented as one [`Disk`].
//!
//! ```text
//!   depth 0   child.vhd    (top; the only layer ever written)    Data | Zero | Parent ─┐
//!   depth 1   base.vhd     (opened read-only)                    Data | Zero | Parent ─┤
//!   ...                                                                                ▼
//!   below the bottom layer                                                           zeros
//! ```
//!
//! The top layer that has a sector supplies it. `Parent` at the bottom layer, or a range past the
//! end of a (smaller) parent, reads as zeros.
//!
//! Invariants:
//! - Parents are found through the candidate paths the child stores, in order; the first one that
//!   is a regular file is opened **read-only** and must carry the UUID the child expects.
//! - A chain never holds the same file twice (cycles are detected on canonical paths) and never
//!   holds more than [`MAX_CHAIN_DEPTH`] layers.
//! - A read-only chain opens every file without write access; writes fail before touching any
//!   file.
//! - VHD layers only ever see whole-sector writes: partial sectors at the edges of a request are
//!   read through the chain, patched and written back whole (read-modify-write), so a sector that
//!   a differencing child marks present holds the parent's bytes around the patched ones.

use std::collections::HashSet;
use std::path::{Path, PathBuf};

use image_io::OpenMode;

use crate::disk::{push_merged, Disk, LayerInfo, MapExtent, OpenOptions};
use crate::image_layer::{Commit, Image, Source, SECTOR};
use crate::raw::RawFile;
use crate::{probe, Error, Format, Result, MAX_CHAIN_DEPTH};

/// Size of the zero buffer used to zero-fill discarded ranges.
const ZERO_CHUNK: u64 = 1 << 20;

/// Where a piece of a read comes from, for engines that move payload themselves.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Piece {
    /// Bytes of layer `level`'s file.
    File {
        level: usize,
        file_offset: u64,
        buf_off: usize,
        len: usize,
    },
    /// Bytes that must be read through the format crate (in-memory log replay).
    Slow {
        level: usize,
        file_offset: u64,
        buf_off: usize,
        len: usize,
    },
    /// Zeros.
    Zero { buf_off: usize, len: usize },
}

/// A planned write: the top file's ranges `(buf_off, len, file_offset)` and the commit to run
/// once they are written.
pub(crate) type WriteJob = (Vec<(usize, usize, u64)>, Option<Commit>);

/// How many times a chain planned reads and writes and committed write metadata, since it was
/// opened: lets tests see that a request of many memory ranges is planned once.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct PlanStats {
    /// Reads resolved: one per engine read plan or [`Disk::read_at`] call.
    pub reads: u64,
    /// Writes placed: one per engine write plan, and one per whole-sector run that
    /// [`Disk::write_at`] writes (up to three with read-modify-write at the edges).
    pub writes: u64,
    /// Write metadata commits run (image layers only; a raw file has none).
    pub commits: u64,
}

/// One file of a chain.
#[derive(Debug)]
pub enum Layer {
    /// A plain file.
    Raw(RawFile),
    /// A VHD or VHDX image (boxed: its block tables make it much larger than a raw layer).
    Image(Box<Image>),
}

impl Layer {
    /// Opens and locks `path` for `mode` ([`image_io::lock`]), choosing the format by content.
    pub fn open(path: &Path, mode: OpenMode) -> Result<Layer> {
        let file = image_io::lock::open(path, mode).map_err(|e| Error::from_open(path, e))?;
        let image = match probe::probe(&file, path)? {
            Format::Vhdx => Image::new(Box::new(vhdx::VhdxImage::open_file(file, path, mode)?)),
            Format::Vhd => Image::new(Box::new(vhd::VhdImage::open_file(file, path, mode)?)),
            Format::Raw => {
                let read_only = !mode.is_writable();
                return Ok(Layer::Raw(RawFile::from_file(path, file, read_only)?));
            }
        };
        Ok(Layer::Image(Box::new(image)))
    }

    /// The identity a child's parent link refers to (VHD footer UUID, VHDX DataWriteGuid);
    /// `None` for raw files.
    pub fn identity(&self) -> Option<uuid::Uuid> {
        match self {
            Layer::Raw(_) => None,
            Layer::Image(v) => Some(v.identity()),
        }
    }

    /// The file as opened.
    pub fn path(&self) -> &Path {
        match self {
            Layer::Raw(r) => r.path(),
            Layer::Image(v) => v.path(),
        }
    }

    /// The open file (for payload I/O and writeback hints; the layer owns it).
    pub fn file(&self) -> &std::fs::File {
        match self {
            Layer::Raw(r) => r.file(),
            Layer::Image(i) => i.file(),
        }
    }

    /// Size of the virtual disk this layer describes.
    pub fn size(&self) -> u64 {
        match self {
            Layer::Raw(r) => r.size(),
            Layer::Image(v) => v.virtual_size(),
        }
    }

    /// Container format.
    pub fn format(&self) -> Format {
        match self {
            Layer::Raw(_) => Format::Raw,
            Layer::Image(v) => v.format(),
        }
    }

    /// Description for `info`.
    pub fn info(&self) -> LayerInfo {
        match self {
            Layer::Raw(r) => LayerInfo {
                path: r.path().to_path_buf(),
                format: Format::Raw,
                subformat: None,
                virtual_size: r.size(),
                block_size: None,
                creator: None,
                uuid: None,
                parent_uuid: None,
                parent_name: None,
            },
            Layer::Image(v) => v.info(),
        }
    }
}

/// Opens the disk at `path` (format by content) with all its parents.
pub fn open(path: &Path, opts: OpenOptions) -> Result<Chain> {
    Chain::open(path, opts)
}

/// A stack of layers, top first, behaving as one disk. Always holds at least the top layer.
#[derive(Debug)]
pub struct Chain {
    layers: Vec<Layer>,
    read_only: bool,
    /// Unit of read-modify-write: the largest logical sector of any image layer (1 when all
    /// layers are raw files, which take any byte range).
    sector: u64,
    stats: PlanStats,
}

impl Chain {
    /// Opens the disk at `path` (format by content) with all its parents.
    pub fn open(path: &Path, opts: OpenOptions) -> Result<Chain> {
        let top = Layer::open(path, opts.mode())?;
        Chain::from_top(top, opts.mode())
    }

    /// Wraps an image just created or opened by the caller (for example a fresh conversion
    /// output), resolving its parents if it is a differencing image.
    pub fn from_image(image: Image) -> Result<Chain> {
        let mode = if image.is_writable() {
            OpenMode::ReadWrite
        } else {
            OpenMode::ReadOnly
        };
        Chain::from_top(Layer::Image(Box::new(image)), mode)
    }

    /// Builds the chain under `top`, opened with `mode`, by following parent links; parents are
    /// opened read-only, sharing as `mode` does ([`OpenMode::for_parent`]).
    pub fn from_top(top: Layer, mode: OpenMode) -> Result<Chain> {
        let read_only = !mode.is_writable();
        let mut seen = HashSet::new();
        seen.insert(canonical(top.path())?);
        let top_path = top.path().to_path_buf();
        let mut layers = vec![top];
        while let Some(Layer::Image(child)) = layers.last() {
            let Some(link) = child.parent_ref() else {
                break;
            };
            if layers.len() >= MAX_CHAIN_DEPTH {
                return Err(Error::ChainTooDeep {
                    path: top_path,
                    limit: MAX_CHAIN_DEPTH,
                });
            }
            let child_path = child.path().to_path_buf();
            let Some(found) = link
                .candidates
                .iter()
                // Regular files only: opening a FIFO a hostile locator names would block
                // forever, and devices or directories are never images.
                .find(|c| c.metadata().is_ok_and(|m| m.is_file()))
            else {
                return Err(Error::ParentNotFound {
                    child: child_path,
                    name: link.name.clone(),
                    tried: link.candidates.clone(),
                });
            };
            let found = found.clone();
            if !seen.insert(canonical(&found)?) {
                return Err(Error::ChainCycle {
                    child: child_path,
                    parent: found,
                });
            }
            tracing::debug!(child = %child_path.display(), parent = %found.display(), "opening parent");
            // Parents are never written: always read-only.
            let parent = Layer::open(&found, mode.for_parent())?;
            if parent.format() != link.format {
                return Err(Error::ParentFormat {
                    child: child_path,
                    parent: found,
                    format: parent.format(),
                    expected: link.format,
                });
            }
            if let Layer::Image(p) = &parent {
                if !link.accepts.contains(&p.identity()) {
                    return Err(Error::ParentMismatch {
                        child: child_path,
                        parent: found,
                        expected: link.accepts[0],
                        found: p.identity(),
                    });
                }
            }
            layers.push(parent);
        }
        let sector = layers
            .iter()
            .filter_map(|l| match l {
                Layer::Image(i) => Some(i.sector_size()),
                Layer::Raw(_) => None,
            })
            .max()
            .unwrap_or(1);
        Ok(Chain {
            layers,
            read_only,
            sector,
            stats: PlanStats::default(),
        })
    }

    /// The layers, top first.
    pub fn stack(&self) -> &[Layer] {
        &self.layers
    }

    /// How often this chain planned and committed (see [`PlanStats`]).
    pub fn plan_stats(&self) -> PlanStats {
        self.stats
    }

    /// The top layer.
    pub fn top(&self) -> &Layer {
        &self.layers[0]
    }

    /// Path of the top image.
    pub fn path(&self) -> &Path {
        self.top().path()
    }

    /// Relaxes the write ordering of the top image (no barriers until flush): for fresh
    /// outputs under a temporary name, where a crash loses the whole file anyway. No effect on
    /// raw files.
    pub fn set_relaxed_durability(&mut self, relaxed: bool) {
        if let Layer::Image(v) = &mut self.layers[0] {
            v.set_durability(relaxed);
        }
    }

    /// Fails unless `[offset, offset + len)` lies inside the disk.
    fn check_range(&self, op: &'static str, offset: u64, len: u64) -> Result<()> {
        let size = self.size();
        match offset.checked_add(len) {
            Some(end) if end <= size => Ok(()),
            _ => Err(Error::OutOfRange {
                path: self.path().to_path_buf(),
                op,
                offset,
                len,
                size,
            }),
        }
    }

    /// Fails if the disk is read-only.
    fn check_writable(&self, op: &'static str) -> Result<()> {
        if self.read_only {
            return Err(Error::ReadOnly {
                path: self.path().to_path_buf(),
                op,
            });
        }
        Ok(())
    }

    /// Reads `buf` at `offset` from layer `level` downwards. Sector aligned for VHD layers
    /// (except at the very end of a disk whose size is not a whole number of sectors).
    fn read_level(&mut self, level: usize, buf: &mut [u8], offset: u64) -> Result<()> {
        let Some(layer) = self.layers.get_mut(level) else {
            buf.fill(0);
            return Ok(());
        };
        // Past the end of a smaller parent: zeros.
        let avail = layer.size().saturating_sub(offset).min(buf.len() as u64) as usize;
        let (buf, past_end) = buf.split_at_mut(avail);
        past_end.fill(0);
        if buf.is_empty() {
            return Ok(());
        }
        let extents = match layer {
            Layer::Raw(r) => return r.read_at(buf, offset),
            Layer::Image(v) => v.resolve_read(offset, avail as u64)?,
        };
        for e in extents {
            // In bounds: resolve_read checked that the extents tile the range.
            let start = (e.offset - offset) as usize;
            let part = &mut buf[start..start + e.len as usize];
            match e.source {
                Source::Data(file_offset) => {
                    // Extents only come from image layers.
                    if let Layer::Image(v) = &self.layers[level] {
                        v.read_payload(part, file_offset)?;
                    }
                }
                Source::Zero => part.fill(0),
                Source::Parent => self.read_level(level + 1, part, e.offset)?,
            }
        }
        Ok(())
    }

    /// Appends the map of `[offset, offset + len)` as seen from layer `level` downwards.
    fn map_level(
        &mut self,
        level: usize,
        offset: u64,
        len: u64,
        out: &mut Vec<MapExtent>,
    ) -> Result<()> {
        let bottom = self.layers.len() - 1;
        let unallocated = |offset: u64, length: u64| MapExtent {
            offset,
            length,
            depth: level.min(bottom) as u32,
            data: false,
            zero: true,
            file_offset: None,
            file: None,
        };
        let Some(layer) = self.layers.get_mut(level) else {
            push_merged(out, unallocated(offset, len));
            return Ok(());
        };
        let avail = layer.size().saturating_sub(offset).min(len);
        let extents = match layer {
            Layer::Raw(r) => {
                r.map(offset, avail, level as u32, out);
                Vec::new()
            }
            Layer::Image(v) if avail > 0 => v.resolve_read(offset, avail)?,
            Layer::Image(_) => Vec::new(),
        };
        for e in extents {
            match e.source {
                Source::Data(file_offset) => push_merged(
                    out,
                    MapExtent {
                        offset: e.offset,
                        length: e.len,
                        depth: level as u32,
                        data: true,
                        zero: false,
                        file_offset: Some(file_offset),
                        file: Some(self.layers[level].path().to_path_buf()),
                    },
                ),
                Source::Zero => push_merged(out, unallocated(e.offset, e.len)),
                Source::Parent if level < bottom => {
                    self.map_level(level + 1, e.offset, e.len, out)?
                }
                Source::Parent => push_merged(out, unallocated(e.offset, e.len)),
            }
        }
        if avail < len {
            push_merged(out, unallocated(offset + avail, len - avail));
        }
        Ok(())
    }

    /// Writes `buf` at `offset` to the top layer. For images the range must be whole sectors
    /// (or end at the end of the disk).
    fn write_top(&mut self, buf: &[u8], offset: u64) -> Result<()> {
        self.stats.writes += 1;
        match &mut self.layers[0] {
            Layer::Raw(r) => r.write_at(buf, offset),
            Layer::Image(v) => {
                self.stats.commits += 1;
                v.write(buf, offset)
            }
        }
    }

    /// The sector holding `offset`: `(start, end)`, `end` clamped to the disk size.
    fn sector_around(&self, offset: u64) -> (u64, u64) {
        let start = offset - offset % self.sector;
        (start, (start + self.sector).min(self.size()))
    }

    /// The file of layer `level`, for payload I/O by an engine.
    pub(crate) fn layer_file(&self, level: usize) -> &std::fs::File {
        self.layers[level].file()
    }

    /// Where each byte of `[offset, offset + len)` comes from, for an engine that moves the
    /// payload itself. `buf_off` counts from `offset`. The pieces replace what `out` held (a
    /// list the engine reuses, so planning a read allocates nothing of its own).
    pub(crate) fn plan_read(&mut self, offset: u64, len: u64, out: &mut Vec<Piece>) -> Result<()> {
        out.clear();
        self.check_range("read", offset, len)?;
        self.stats.reads += 1;
        if len > 0 {
            self.plan_level(0, offset, len, offset, out)?;
        }
        Ok(())
    }

    fn plan_level(
        &mut self,
        level: usize,
        offset: u64,
        len: u64,
        base: u64,
        out: &mut Vec<Piece>,
    ) -> Result<()> {
        let Some(layer) = self.layers.get_mut(level) else {
            out.push(Piece::Zero {
                buf_off: (offset - base) as usize,
                len: len as usize,
            });
            return Ok(());
        };
        let avail = layer.size().saturating_sub(offset).min(len);
        if avail < len {
            out.push(Piece::Zero {
                buf_off: (offset + avail - base) as usize,
                len: (len - avail) as usize,
            });
        }
        if avail == 0 {
            return Ok(());
        }
        let extents = match layer {
            Layer::Raw(_) => {
                out.push(Piece::File {
                    level,
                    file_offset: offset,
                    buf_off: (offset - base) as usize,
                    len: avail as usize,
                });
                return Ok(());
            }
            Layer::Image(v) => v.resolve_read(offset, avail)?,
        };
        let overlay = matches!(&self.layers[level], Layer::Image(i) if i.reads_need_overlay());
        for e in extents {
            let buf_off = (e.offset - base) as usize;
            match e.source {
                Source::Data(file_offset) if overlay => out.push(Piece::Slow {
                    level,
                    file_offset,
                    buf_off,
                    len: e.len as usize,
                }),
                Source::Data(file_offset) => out.push(Piece::File {
                    level,
                    file_offset,
                    buf_off,
                    len: e.len as usize,
                }),
                Source::Zero => out.push(Piece::Zero {
                    buf_off,
                    len: e.len as usize,
                }),
                Source::Parent => self.plan_level(level + 1, e.offset, e.len, base, out)?,
            }
        }
        Ok(())
    }

    /// Reads a [`Piece::Slow`] through the format crate.
    pub(crate) fn read_slow(&self, level: usize, buf: &mut [u8], file_offset: u64) -> Result<()> {
        match &self.layers[level] {
            Layer::Image(i) => i.read_payload(buf, file_offset),
            Layer::Raw(r) => r.read_at(buf, file_offset),
        }
    }

    /// Plans a write for an engine: `None` when the range is not whole sectors (the caller then
    /// uses [`Disk::write_at`], which does read-modify-write). Returns the top file's ranges
    /// `(buf_off, len, file_offset)` and the commit to run after they are written.
    pub(crate) fn plan_write(&mut self, offset: u64, len: u64) -> Result<Option<WriteJob>> {
        self.check_writable("write")?;
        self.check_range("write", offset, len)?;
        let end = offset + len;
        let unit = self.sector;
        if !(offset % unit == 0 && (end % unit == 0 || end == self.size())) {
            return Ok(None);
        }
        self.stats.writes += 1;
        match &mut self.layers[0] {
            Layer::Raw(_) => Ok(Some((vec![(0, len as usize, offset)], None))),
            Layer::Image(i) => {
                let (ranges, commit) = i.plan_write(offset, len)?;
                let pieces = ranges
                    .into_iter()
                    .map(|(o, l, f)| ((o - offset) as usize, l as usize, f))
                    .collect();
                Ok(Some((pieces, Some(commit))))
            }
        }
    }

    /// Completes a planned write once its payload is written.
    pub(crate) fn commit(&mut self, commit: Commit) -> Result<()> {
        self.stats.commits += 1;
        match &mut self.layers[0] {
            Layer::Image(i) => i.commit(commit),
            Layer::Raw(r) => Err(Error::Inconsistent {
                path: r.path().to_path_buf(),
                what: "commit on a raw layer".into(),
            }),
        }
    }

    /// Writes zeros over `[offset, offset + len)` through the normal write path.
    pub fn write_zeroes(&mut self, offset: u64, len: u64) -> Result<()> {
        let zeros = vec![0u8; len.min(ZERO_CHUNK) as usize];
        let end = offset + len;
        let mut pos = offset;
        while pos < end {
            let n = (end - pos).min(ZERO_CHUNK) as usize;
            self.write_at(&zeros[..n], pos)?;
            pos += n as u64;
        }
        Ok(())
    }
}

impl Disk for Chain {
    fn size(&self) -> u64 {
        self.layers[0].size()
    }

    fn logical_sector_size(&self) -> u32 {
        self.sector.max(SECTOR) as u32
    }

    fn physical_sector_size(&self) -> u32 {
        match &self.layers[0] {
            Layer::Image(i) => i.physical_sector_size().max(self.logical_sector_size()),
            Layer::Raw(_) => self.logical_sector_size(),
        }
    }

    fn read_at(&mut self, buf: &mut [u8], offset: u64) -> Result<()> {
        let len = buf.len() as u64;
        self.check_range("read", offset, len)?;
        self.stats.reads += 1;
        if len == 0 {
            return Ok(());
        }
        let end = offset + len;
        let unit = self.sector;
        if offset % unit == 0 && (end % unit == 0 || end == self.size()) {
            return self.read_level(0, buf, offset);
        }
        // Partial sectors at either edge go through a one-sector bounce buffer.
        let mut sector = vec![0u8; unit as usize];
        let mut pos = offset;
        if pos % unit != 0 {
            let (s0, s1) = self.sector_around(pos);
            self.read_level(0, &mut sector[..(s1 - s0) as usize], s0)?;
            let stop = end.min(s1);
            buf[..(stop - pos) as usize]
                .copy_from_slice(&sector[(pos - s0) as usize..(stop - s0) as usize]);
            pos = stop;
        }
        let mid_end = end - end % unit;
        if mid_end > pos {
            let b = &mut buf[(pos - offset) as usize..(mid_end - offset) as usize];
            self.read_level(0, b, pos)?;
            pos = mid_end;
        }
        if pos < end {
            let (s0, s1) = self.sector_around(pos);
            self.read_level(0, &mut sector[..(s1 - s0) as usize], s0)?;
            buf[(pos - offset) as usize..].copy_from_slice(&sector[..(end - pos) as usize]);
        }
        Ok(())
    }

    fn write_at(&mut self, buf: &[u8], offset: u64) -> Result<()> {
        self.check_writable("write")?;
        let len = buf.len() as u64;
        self.check_range("write", offset, len)?;
        if len == 0 {
            return Ok(());
        }
        let end = offset + len;
        let unit = self.sector;
        let top_is_image = matches!(self.layers[0], Layer::Image(_));
        if !top_is_image || (offset % unit == 0 && (end % unit == 0 || end == self.size())) {
            return self.write_top(buf, offset);
        }
        // Read-modify-write the partial sectors at either edge.
        let mut sector = vec![0u8; unit as usize];
        let mut pos = offset;
        if pos % unit != 0 {
            let (s0, s1) = self.sector_around(pos);
            let s = &mut sector[..(s1 - s0) as usize];
            self.read_level(0, s, s0)?;
            let stop = end.min(s1);
            s[(pos - s0) as usize..(stop - s0) as usize]
                .copy_from_slice(&buf[..(stop - pos) as usize]);
            self.write_top(s, s0)?;
            pos = stop;
        }
        let mid_end = end - end % unit;
        if mid_end > pos {
            self.write_top(
                &buf[(pos - offset) as usize..(mid_end - offset) as usize],
                pos,
            )?;
            pos = mid_end;
        }
        if pos < end {
            let (s0, s1) = self.sector_around(pos);
            let s = &mut sector[..(s1 - s0) as usize];
            self.read_level(0, s, s0)?;
            s[..(end - pos) as usize].copy_from_slice(&buf[(pos - offset) as usize..]);
            self.write_top(s, s0)?;
        }
        Ok(())
    }

    fn flush(&mut self) -> Result<()> {
        if self.read_only {
            return Ok(());
        }
        match &mut self.layers[0] {
            Layer::Raw(r) => r.flush(),
            Layer::Image(v) => v.flush(),
        }
    }

    fn discard(&mut self, offset: u64, len: u64) -> Result<()> {
        self.check_writable("discard")?;
        self.check_range("discard", offset, len)?;
        if len == 0 {
            return Ok(());
        }
        let remainder = match &mut self.layers[0] {
            Layer::Raw(r) => return r.discard(offset, len),
            Layer::Image(v) => v.discard(offset, len)?,
        };
        let end = offset + len;
        for (o, l) in remainder {
            // Only ever zero inside the requested range, whatever the format layer answered.
            let start = o.max(offset);
            let stop = o.saturating_add(l).min(end);
            if stop > start {
                self.write_zeroes(start, stop - start)?;
            }
        }
        Ok(())
    }

    fn map(&mut self, offset: u64, len: u64) -> Result<Vec<MapExtent>> {
        self.check_range("map", offset, len)?;
        let mut out = Vec::new();
        if len > 0 {
            self.map_level(0, offset, len, &mut out)?;
        }
        Ok(out)
    }

    fn is_read_only(&self) -> bool {
        self.read_only
    }

    fn layers(&self) -> Vec<LayerInfo> {
        self.layers.iter().map(Layer::info).collect()
    }

    fn backing_chain(&self) -> Vec<PathBuf> {
        self.layers.iter().map(|l| l.path().to_path_buf()).collect()
    }

    fn leading_extent(
        &mut self,
        offset: u64,
        len: u64,
    ) -> Result<Option<(&std::fs::File, u64, u64)>> {
        // Pieces in disk order; the leading run goes on through pieces that continue it in
        // the same file (blocks allocated one after another).
        let mut plan = Vec::new();
        self.plan_read(offset, len, &mut plan)?;
        plan.sort_by_key(|p| match p {
            Piece::File { buf_off, .. }
            | Piece::Slow { buf_off, .. }
            | Piece::Zero { buf_off, .. } => *buf_off,
        });
        let mut run: Option<(usize, u64, usize)> = None; // (level, file offset, length)
        for &p in &plan {
            let Piece::File {
                level,
                file_offset,
                buf_off,
                len,
            } = p
            else {
                break;
            };
            match &mut run {
                None if buf_off == 0 => run = Some((level, file_offset, len)),
                Some((l, at, n))
                    if level == *l && buf_off == *n && file_offset == *at + *n as u64 =>
                {
                    *n += len
                }
                _ => break,
            }
        }
        Ok(run.map(|(level, at, n)| (self.layer_file(level), at, n as u64)))
    }
}

/// Canonical form of `path`, for cycle detection.
fn canonical(path: &Path) -> Result<PathBuf> {
    std::fs::canonicalize(path).map_err(|e| Error::io(path, "resolve path", 0, e))
}
