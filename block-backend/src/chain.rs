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
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};

use image_io::OpenMode;

use crate::disk::{push_merged, Disk, LayerInfo, MapExtent, OpenOptions};
use crate::layer::{self, Commit, Image, Layer, Source, SECTOR};
use crate::{Error, Result, MAX_CHAIN_DEPTH};

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
    /// Bytes that must be read through the layer ([`Layer::read_payload`]): it has no local
    /// file, or its file alone is not the truth (in-memory log replay).
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

/// Opens the disk at `path` (format by content) with all its parents.
pub fn open(path: &Path, opts: OpenOptions) -> Result<Chain> {
    Chain::open(path, opts)
}

/// A stack of layers, top first, behaving as one disk. Always holds at least the top layer.
#[derive(Debug)]
pub struct Chain {
    layers: Vec<Box<dyn Layer>>,
    read_only: bool,
    /// Unit of read-modify-write: the largest sector of any layer (1 when every layer takes
    /// any byte range).
    sector: u64,
    stats: PlanStats,
}

impl Chain {
    /// Opens the disk at `path` (format by content) with all its parents.
    pub fn open(path: &Path, opts: OpenOptions) -> Result<Chain> {
        let top = layer::open(path, opts.mode())?;
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
        Chain::from_top(Box::new(image), mode)
    }

    /// Builds the chain under `top`, opened with `mode`, by following parent links; parents are
    /// opened read-only, sharing as `mode` does ([`OpenMode::for_parent`]).
    pub fn from_top(top: Box<dyn Layer>, mode: OpenMode) -> Result<Chain> {
        let read_only = !mode.is_writable();
        let mut seen = HashSet::new();
        seen.insert(layer::canonical(top.path())?);
        let top_path = top.path().to_path_buf();
        let mut layers = vec![top];
        while let Some(child) = layers.last() {
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
                .find(|c| layer::parent_candidate_exists(c))
            else {
                return Err(Error::ParentNotFound {
                    child: child_path,
                    name: link.name.clone(),
                    tried: link.candidates.clone(),
                });
            };
            let found = found.clone();
            if !seen.insert(layer::canonical(&found)?) {
                return Err(Error::ChainCycle {
                    child: child_path,
                    parent: found,
                });
            }
            tracing::debug!(child = %child_path.display(), parent = %found.display(), "opening parent");
            // Parents are never written: always read-only.
            let parent = layer::open(&found, mode.for_parent())?;
            // A remote parent (an NBD export, a blob) is a byte provider named by URI, which
            // only vhdkit's own locators hold: its identity, checked below, is what binds it.
            if !layer::is_remote(&found) && parent.format() != link.format {
                return Err(Error::ParentFormat {
                    child: child_path,
                    parent: found,
                    format: parent.format(),
                    expected: link.format,
                });
            }
            if let Some(identity) = parent.identity() {
                if !link.accepts.contains(&identity) {
                    return Err(Error::ParentMismatch {
                        child: child_path,
                        // As the layer names itself: a blob without its SAS.
                        parent: parent.path().to_path_buf(),
                        expected: link.accepts[0],
                        found: identity,
                    });
                }
            }
            layers.push(parent);
        }
        let sector = layers.iter().map(|l| l.sector_size()).max().unwrap_or(1);
        Ok(Chain {
            layers,
            read_only,
            sector,
            stats: PlanStats::default(),
        })
    }

    /// The layers, top first.
    pub fn stack(&self) -> &[Box<dyn Layer>] {
        &self.layers
    }

    /// How often this chain planned and committed (see [`PlanStats`]).
    pub fn plan_stats(&self) -> PlanStats {
        self.stats
    }

    /// The top layer.
    pub fn top(&self) -> &dyn Layer {
        &*self.layers[0]
    }

    /// Path of the top image.
    pub fn path(&self) -> &Path {
        self.top().path()
    }

    /// Relaxes the write ordering of the top image (no barriers until flush): for fresh
    /// outputs under a temporary name, where a crash loses the whole file anyway. No effect on
    /// layers without ordering to relax.
    pub fn set_relaxed_durability(&mut self, relaxed: bool) {
        self.layers[0].set_relaxed_durability(relaxed);
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

    /// Reads `buf` at `offset` from layer `level` downwards. Aligned to the chain's sector
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
        let extents = layer.resolve_read(offset, avail as u64)?;
        layer::check_tiling(
            layer.path(),
            "resolve_read",
            offset,
            avail as u64,
            extents.iter().map(|e| (e.offset, e.len)),
        )?;
        for e in extents {
            // In bounds: checked above that the extents tile the range.
            let start = (e.offset - offset) as usize;
            let part = &mut buf[start..start + e.len as usize];
            match e.source {
                Source::Data(at) => self.layers[level].read_payload(part, at)?,
                Source::Zero | Source::Hole(_) => part.fill(0),
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
        let extents = if avail > 0 {
            let extents = layer.map(offset, avail)?;
            layer::check_tiling(
                layer.path(),
                "map",
                offset,
                avail,
                extents.iter().map(|e| (e.offset, e.len)),
            )?;
            extents
        } else {
            Vec::new()
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
                Source::Hole(file_offset) => push_merged(
                    out,
                    MapExtent {
                        offset: e.offset,
                        length: e.len,
                        depth: level as u32,
                        data: false,
                        zero: true,
                        file_offset: Some(file_offset),
                        file: Some(self.layers[level].path().to_path_buf()),
                    },
                ),
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

    /// Writes `buf` at `offset` to the top layer, in whole units of its sector size (or up
    /// to the end of the disk): planned and committed, or written through.
    fn write_top(&mut self, buf: &[u8], offset: u64) -> Result<()> {
        self.stats.writes += 1;
        let top = &mut self.layers[0];
        let Some((ranges, commit)) = top.plan_write(offset, buf.len() as u64)? else {
            return top.write(buf, offset);
        };
        let end = offset + buf.len() as u64;
        for (o, l, file_offset) in ranges {
            let in_request = o >= offset && o.checked_add(l).is_some_and(|e| e <= end);
            let Some(file) = top.file().filter(|_| in_request) else {
                return Err(Error::Inconsistent {
                    path: top.path().to_path_buf(),
                    what: format!(
                        "write plan ({o}, {l}) for ({offset}, {}) has no file range to take it",
                        buf.len()
                    ),
                });
            };
            let start = (o - offset) as usize;
            file.write_all_at(&buf[start..start + l as usize], file_offset)
                .map_err(|err| Error::io(top.path(), "write payload", file_offset, err))?;
        }
        if let Some(c) = commit {
            self.stats.commits += 1;
            self.layers[0].commit(c)?;
        }
        Ok(())
    }

    /// The sector holding `offset`: `(start, end)`, `end` clamped to the disk size.
    fn sector_around(&self, offset: u64) -> (u64, u64) {
        let start = offset - offset % self.sector;
        (start, (start + self.sector).min(self.size()))
    }

    /// The local file of layer `level`, for payload I/O by an engine (`None` for layers whose
    /// payload only goes through the layer).
    pub(crate) fn layer_file(&self, level: usize) -> Option<&std::fs::File> {
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
        let extents = layer.resolve_read(offset, avail)?;
        layer::check_tiling(
            layer.path(),
            "resolve_read",
            offset,
            avail,
            extents.iter().map(|e| (e.offset, e.len)),
        )?;
        let slow = !layer.direct_reads();
        for e in extents {
            let buf_off = (e.offset - base) as usize;
            match e.source {
                Source::Data(file_offset) if slow => out.push(Piece::Slow {
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
                Source::Zero | Source::Hole(_) => out.push(Piece::Zero {
                    buf_off,
                    len: e.len as usize,
                }),
                Source::Parent => self.plan_level(level + 1, e.offset, e.len, base, out)?,
            }
        }
        Ok(())
    }

    /// Reads a [`Piece::Slow`] through its layer.
    pub(crate) fn read_slow(
        &mut self,
        level: usize,
        buf: &mut [u8],
        file_offset: u64,
    ) -> Result<()> {
        self.layers[level].read_payload(buf, file_offset)
    }

    /// Plans a write for an engine: `None` when the range is not whole sectors or the top layer
    /// takes writes only through itself (the caller then uses [`Disk::write_at`]). Returns the
    /// top file's ranges `(buf_off, len, file_offset)` and the commit to run after they are
    /// written.
    pub(crate) fn plan_write(&mut self, offset: u64, len: u64) -> Result<Option<WriteJob>> {
        self.check_writable("write")?;
        self.check_range("write", offset, len)?;
        let end = offset + len;
        let unit = self.sector;
        if !(offset % unit == 0 && (end % unit == 0 || end == self.size())) {
            return Ok(None);
        }
        let top = &mut self.layers[0];
        if top.file().is_none() {
            return Ok(None);
        }
        let Some((ranges, commit)) = top.plan_write(offset, len)? else {
            return Ok(None);
        };
        self.stats.writes += 1;
        layer::check_tiling(
            top.path(),
            "plan_write",
            offset,
            len,
            ranges.iter().map(|r| (r.0, r.1)),
        )?;
        let pieces = ranges
            .into_iter()
            .map(|(o, l, f)| ((o - offset) as usize, l as usize, f))
            .collect();
        Ok(Some((pieces, commit)))
    }

    /// Completes a planned write once its payload is written.
    pub(crate) fn commit(&mut self, commit: Commit) -> Result<()> {
        self.stats.commits += 1;
        self.layers[0].commit(commit)
    }

    /// Writes zeros over `[offset, offset + len)`: the top layer's own way if it has one for
    /// the range, through the normal write path otherwise.
    pub fn write_zeroes(&mut self, offset: u64, len: u64) -> Result<()> {
        self.check_writable("write")?;
        self.check_range("write", offset, len)?;
        let unit = self.sector;
        let end = offset + len;
        let whole = offset % unit == 0 && (end % unit == 0 || end == self.size());
        if len > 0 && whole && self.layers[0].write_zeroes(offset, len)? {
            return Ok(());
        }
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
        self.layers[0]
            .physical_sector_size()
            .max(self.logical_sector_size())
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
        let any_bytes = self.layers[0].sector_size() <= 1;
        if any_bytes || (offset % unit == 0 && (end % unit == 0 || end == self.size())) {
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
        self.layers[0].flush()
    }

    fn discard(&mut self, offset: u64, len: u64) -> Result<()> {
        self.check_writable("discard")?;
        self.check_range("discard", offset, len)?;
        if len == 0 {
            return Ok(());
        }
        let remainder = self.layers[0].discard(offset, len)?;
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
        self.layers.iter().map(|l| l.info()).collect()
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
        Ok(run.and_then(|(level, at, n)| Some((self.layer_file(level)?, at, n as u64))))
    }
}
