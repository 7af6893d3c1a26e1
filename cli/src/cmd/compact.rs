//! `vhdtool compact [--fs] [--mode quick|full] [--force] [-p] [--json] FILE`: shrink a dynamic
//! or differencing image in place (Hyper-V's Optimize-VHD offline).
//!
//! ```text
//!   FILE (writable, locked) ──--fs: partitions + allocation maps (fsfree.rs)──> free ranges
//!        │                       blocks wholly free ──discard──> released, flushed
//!        └──vhd/vhdx compact──> release empty / zero / parent-equal blocks
//!        parent chain (read-only) ─┘      move tail blocks into holes, truncate
//! ```
//!
//! With `--fs`, every file system on the disk (MBR/GPT partitions, or one on the whole disk) is
//! read from the image itself and every image block whose bytes all lie in free space is
//! released first (it then reads as zeros, or in a differencing VHDX as zeros too; a
//! differencing VHD keeps such blocks). Everything is read and checked before the first
//! write: a file system whose map may be stale is refused unless `--force`, a damaged map
//! always. The image lock makes `compact` fail while the image is mounted, booted or written.
//!
//! `full` (the default) reads every allocated block: all-zero blocks of a dynamic image, and
//! blocks of a differencing image equal to what its parent shows, are released. `quick` only
//! releases blocks with no sector present (already trimmed or discarded). Both close the holes
//! left in the file and shorten it. Every step leaves a valid image with the same content, so an
//! interrupted run loses nothing and can simply be run again.

use image_io::format::{BackingReader, CompactMode};
use std::path::PathBuf;

use anyhow::{Context, Result};
use serde::Serialize;

use super::edit::{parent_chain, read_or_zero, RwImage};
use super::fsfree::{self, VolumeReport};
use crate::progress::Progress;
use crate::size::format_size;
use anyhow::bail;
use block_backend::Chain;
use fs_free::FreeMap;
use image_io::format::{FormatImage, ReadSource};

/// Compaction modes (Optimize-VHD's names).
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum Mode {
    /// Release only blocks that hold no sector (trimmed, discarded); close holes.
    Quick,
    /// Also release blocks that read as zeros, or as the parent's data in a differencing image.
    Full,
}

/// Arguments of `compact`.
#[derive(Debug, clap::Args)]
pub struct Args {
    /// What to release.
    #[arg(long, value_enum, default_value = "full")]
    pub mode: Mode,
    /// Also release blocks lying wholly in space the file systems (ext2/3/4, NTFS, FAT, exFAT)
    /// call free, read from their allocation maps.
    #[arg(long)]
    pub fs: bool,
    /// With --fs: release free space even of a file system whose map may be stale (journal
    /// needing recovery, dirty or hibernated volume).
    #[arg(long, requires = "fs")]
    pub force: bool,
    /// Show progress on stderr.
    #[arg(short = 'p', long = "progress")]
    pub progress: bool,
    /// Print the result as JSON.
    #[arg(long)]
    pub json: bool,
    /// The image to compact (dynamic or differencing VHD/VHDX).
    pub file: PathBuf,
}

/// What `compact --json` prints.
#[derive(Debug, Serialize)]
#[serde(rename_all = "kebab-case")]
pub struct Report {
    /// The image.
    pub filename: PathBuf,
    /// `quick` or `full`.
    pub mode: &'static str,
    /// Blocks released.
    pub blocks_released: u64,
    /// Blocks moved to close holes.
    pub blocks_moved: u64,
    /// File size before, bytes.
    pub file_size_before: u64,
    /// File size after, bytes.
    pub file_size_after: u64,
    /// With --fs: blocks released because they lie in free file-system space (included in
    /// `blocks-released`).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub fs_blocks_released: Option<u64>,
    /// With --fs: every volume, its file system, size, free and released bytes.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub partitions: Option<Vec<VolumeReport>>,
}

/// Reads virtual bytes of `image` (its parent's view where it has none of its own).
pub fn read_virtual(
    image: &mut dyn FormatImage,
    parent: Option<&mut Chain>,
    offset: u64,
    buf: &mut [u8],
) -> std::io::Result<()> {
    let len = buf.len() as u64;
    let extents = image
        .resolve_read(offset, len)
        .map_err(std::io::Error::other)?;
    let mut parent = parent;
    for e in extents {
        let inside = e.offset >= offset
            && e.offset
                .checked_add(e.len)
                .is_some_and(|x| x <= offset + len);
        if !inside {
            return Err(std::io::Error::other(format!(
                "{}: resolve_read({offset}, {len}) returned extent ({}, {})",
                image.path().display(),
                e.offset,
                e.len
            )));
        }
        let at = (e.offset - offset) as usize;
        let piece = &mut buf[at..at + e.len as usize];
        match e.source {
            ReadSource::Data { file_offset } => image
                .read_payload(piece, file_offset)
                .map_err(std::io::Error::other)?,
            ReadSource::Zero => piece.fill(0),
            ReadSource::Parent => match parent.as_deref_mut() {
                Some(p) => read_or_zero(p, e.offset, piece)?,
                None => piece.fill(0),
            },
        }
    }
    Ok(())
}

/// Reads every file system's map through a read-only open (the read lock refuses an image
/// being written), failing as `compact --fs` would, without writing anything.
fn precheck(path: &std::path::Path, force: bool) -> Result<()> {
    use block_backend::{Disk, OpenOptions};
    let mut disk = block_backend::open(path, OpenOptions::read_only())
        .with_context(|| format!("cannot open {}", path.display()))?;
    let (size, sector) = (disk.size(), disk.logical_sector_size());
    let mut read = |off: u64, buf: &mut [u8]| disk.read_at(buf, off).map_err(std::io::Error::other);
    fsfree::scan(size, sector, &mut read, force, &mut |_, _| {})
        .with_context(|| format!("{}: compact --fs", path.display()))?;
    Ok(())
}

/// Whether any byte of `[offset, offset + len)` is stored in `image` itself.
fn stored(image: &mut dyn FormatImage, offset: u64, len: u64) -> Result<bool> {
    Ok(image
        .resolve_read(offset, len)?
        .iter()
        .any(|e| matches!(e.source, ReadSource::Data { .. })))
}

/// `compact --fs`, first half: reads every file system's map, then releases the image blocks
/// wholly in free space and flushes. Returns the blocks released and the volumes.
fn release_free_space(
    image: &mut RwImage,
    parent: Option<&mut Chain>,
    force: bool,
) -> Result<(u64, Vec<VolumeReport>)> {
    let Some(bs) = image.info().block_size.filter(|&b| b > 0) else {
        bail!(
            "{}: a fixed image has no blocks to release (convert it to a dynamic image)",
            image.path().display()
        );
    };
    let size = image.virtual_size();
    let sector = image.logical_sector_size();
    let mut map = FreeMap::new(size, u64::from(bs))?;
    let mut parent = parent;
    let mut volumes = {
        let img: &mut dyn FormatImage = &mut **image;
        let mut read =
            |off: u64, buf: &mut [u8]| read_virtual(img, parent.as_deref_mut(), off, buf);
        fsfree::scan(size, sector, &mut read, force, &mut |o, l| map.add(o, l))?
    };
    // Nothing is written before here: every map has been read and checked.
    let mut released = 0;
    let bs = u64::from(bs);
    for b in map.free_blocks().collect::<Vec<_>>() {
        let off = b * bs;
        let len = bs.min(size - off);
        if !stored(&mut **image, off, len)? {
            continue;
        }
        // The ranges discard leaves for the caller to zero are free space: left as they are.
        image.discard(off, len)?;
        if stored(&mut **image, off, len)? {
            continue; // this image keeps the block (a differencing VHD)
        }
        released += 1;
        if let Some(v) = volumes
            .iter_mut()
            .find(|v| v.offset <= off && off < v.offset + v.size)
        {
            v.released += len;
        }
    }
    image.flush()?;
    Ok((released, std::mem::take(&mut volumes)))
}

/// Runs `compact`.
pub fn run(a: &Args) -> Result<u8> {
    if a.fs {
        // Read every map once without writing (a writable VHDX open already writes a new
        // FileWriteGuid), so a refusal leaves the image byte-identical. The maps are read
        // again under the write lock below, and that reading is the one acted on.
        precheck(&a.file, a.force)?;
    }
    let mut image = RwImage::open(&a.file, "compact")?;
    let full = a.mode == Mode::Full;
    let mut fs_part = None;
    if a.fs {
        let mut parent = if image.is_differencing() {
            Some(parent_chain(&a.file)?)
        } else {
            None
        };
        fs_part = Some(
            release_free_space(&mut image, parent.as_mut(), a.force)
                .with_context(|| format!("{}: compact --fs", a.file.display()))?,
        );
    }
    // Full compaction of a differencing image compares its blocks with the parent's view.
    let mut parent = if full && image.is_differencing() {
        Some(parent_chain(&a.file)?)
    } else {
        None
    };
    let mut read_parent = |off: u64, buf: &mut [u8]| match parent.as_mut() {
        Some(p) => read_or_zero(p, off, buf),
        None => Ok(()),
    };
    let has_parent = image.is_differencing() && full;
    let total = image.allocated_blocks() as u64 * u64::from(image.info().block_size.unwrap_or(0));
    let mut progress = Progress::new(total, a.progress);
    let mut tick = |n: u64| progress.inc(n);
    let mode = if full {
        CompactMode::Full
    } else {
        CompactMode::Quick
    };
    let backing: Option<BackingReader<'_>> = has_parent.then_some(&mut read_parent);
    let r = image.compact(mode, backing, &mut tick)?;
    let (released, moved, before, after) = (
        r.blocks_released,
        r.blocks_moved,
        r.file_size_before,
        r.file_size_after,
    );
    image
        .close()
        .with_context(|| format!("cannot close {}", a.file.display()))?;
    progress.finish();
    let fs_released = fs_part.as_ref().map(|f| f.0);
    let report = Report {
        filename: a.file.clone(),
        mode: if full { "full" } else { "quick" },
        blocks_released: released + fs_released.unwrap_or(0),
        blocks_moved: moved,
        file_size_before: before,
        file_size_after: after,
        fs_blocks_released: fs_released,
        partitions: fs_part.map(|f| f.1),
    };
    if a.json {
        println!("{}", serde_json::to_string_pretty(&report)?);
    } else {
        for v in report.partitions.iter().flatten() {
            println!(
                "{}: {} at {}, {}: {} free, {} released",
                v.name(),
                v.fs,
                format_size(v.offset),
                format_size(v.size),
                format_size(v.free),
                format_size(v.released)
            );
            for w in &v.warnings {
                eprintln!("warning: {}: {w} (--force)", v.name());
            }
        }
        println!(
            "{}: {} blocks released, {} moved; {} -> {}",
            a.file.display(),
            report.blocks_released,
            moved,
            format_size(before),
            format_size(after)
        );
    }
    Ok(0)
}
