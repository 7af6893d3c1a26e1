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
//! released first (it then reads as zeros, or in a differencing VHD as the parent's bytes,
//! which the file system ignores as free space). Everything is read and checked before the first
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
use image_io::ImageFile;

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
pub fn read_virtual<F: ImageFile>(
    image: &mut dyn FormatImage<F>,
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
fn stored<F: ImageFile>(image: &mut dyn FormatImage<F>, offset: u64, len: u64) -> Result<bool> {
    Ok(image
        .resolve_read(offset, len)?
        .iter()
        .any(|e| matches!(e.source, ReadSource::Data { .. })))
}

/// `compact --fs`, first half: reads every file system's map, then releases the image blocks
/// wholly in free space and flushes. Returns the blocks released and the volumes.
pub fn release_free_space<F: ImageFile>(
    image: &mut dyn FormatImage<F>,
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
        let img: &mut dyn FormatImage<F> = &mut *image;
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
        if !stored(&mut *image, off, len)? {
            continue;
        }
        // Free space: it may read as zeros or, in a differencing VHD, as the parent's bytes.
        if image.release(off, len)? == 0 {
            continue;
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
            release_free_space(&mut *image, parent.as_mut(), a.force)
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

#[cfg(test)]
mod tests {
    //! Crash simulation of `compact --fs` at every write: an ext4 made by mke2fs (files
    //! written, half deleted) in a dynamic VHDX over image-io's CrashFile; after a power cut
    //! after any operation (no, all, or some unsynced writes kept, one torn), the image opens,
    //! checks clean, and every byte the file system uses reads as before.

    use super::*;
    use image_io::format::CompactMode;
    use image_io::{CrashFile, Survivors};
    use std::path::Path;
    use std::process::Command;
    use vhdx::{CreateOptions, OpenMode, VhdxImage};

    const SIZE: u64 = 16 << 20;

    fn read_all(img: &mut dyn FormatImage<CrashFile>) -> Vec<u8> {
        let mut out = vec![0u8; SIZE as usize];
        read_virtual(img, None, 0, &mut out).unwrap();
        out
    }

    /// The used ranges (complement of the free ones) of an ext4 disk image.
    fn used_mask(disk: &[u8]) -> Vec<bool> {
        let mut read = |off: u64, buf: &mut [u8]| {
            buf.copy_from_slice(&disk[off as usize..off as usize + buf.len()]);
            Ok(())
        };
        let mut used = vec![true; disk.len() / 512];
        fsfree::scan(SIZE, 512, &mut read, false, &mut |o, l| {
            for s in o / 512..(o + l) / 512 {
                used[s as usize] = false;
            }
        })
        .unwrap();
        used
    }

    fn same_used(a: &[u8], b: &[u8], used: &[bool]) -> bool {
        used.iter()
            .enumerate()
            .all(|(s, &u)| !u || a[s * 512..(s + 1) * 512] == b[s * 512..(s + 1) * 512])
    }

    #[test]
    fn compact_fs_keeps_file_system_data_at_every_power_cut() {
        if !vhdkit_tests::tool_or_skip("mke2fs") || !vhdkit_tests::tool_or_skip("debugfs") {
            return;
        }
        let dir = tempfile::tempdir().unwrap();
        let src = dir.path().join("src");
        std::fs::create_dir(&src).unwrap();
        for i in 0..8u32 {
            let data: Vec<u8> = (0..1_200_000u32)
                .map(|j| (j.wrapping_mul(2_654_435_761) ^ i) as u8 | 1)
                .collect();
            std::fs::write(src.join(format!("f{i}")), data).unwrap();
        }
        let raw = dir.path().join("fs.img");
        std::fs::File::create(&raw).unwrap().set_len(SIZE).unwrap();
        let mut c = Command::new("mke2fs");
        c.args(["-q", "-F", "-t", "ext4", "-b", "4096", "-d"])
            .arg(&src)
            .arg(&raw);
        vhdkit_tests::run(c);
        for f in ["f1", "f2", "f3", "f5", "f6"] {
            let mut c = Command::new("debugfs");
            c.args(["-w", "-R", &format!("rm {f}")]).arg(&raw);
            vhdkit_tests::run(c);
        }
        let disk = std::fs::read(&raw).unwrap();
        let used = used_mask(&disk);

        let f = CrashFile::new();
        let path = Path::new("c.vhdx");
        let opts = CreateOptions {
            size: SIZE,
            block_size: Some(1 << 20),
            ..Default::default()
        };
        let mut img = VhdxImage::create_in(f.clone(), path, &opts, None).unwrap();
        for (i, chunk) in disk.chunks(64 << 10).enumerate() {
            if chunk.iter().any(|&b| b != 0) {
                let at = i as u64 * (64 << 10);
                let plan = img.resolve_write(at, chunk.len() as u64).unwrap();
                for e in &plan.extents {
                    let o = (e.offset - at) as usize;
                    img.file()
                        .write_all_at(&chunk[o..o + e.len as usize], e.file_offset)
                        .unwrap();
                }
                img.commit_write(plan).unwrap();
            }
        }
        img.close().unwrap();
        let size_before = f.len().unwrap();
        let start = f.op_count();
        let mut img: Box<dyn FormatImage<CrashFile>> =
            Box::new(VhdxImage::open_file(f.clone(), path, OpenMode::ReadWrite).unwrap());
        let (released, volumes) = release_free_space(&mut *img, None, false).unwrap();
        assert!(released >= 2, "{released} {volumes:?}");
        img.compact(CompactMode::Full, None, &mut |_| {}).unwrap();
        assert!(same_used(&read_all(&mut *img), &disk, &used));
        img.close().unwrap();
        let end = f.op_count();
        assert!(f.len().unwrap() < size_before);
        let survivors = [
            ("none", Survivors::None),
            ("all", Survivors::All),
            (
                "even+torn",
                Survivors::Mask {
                    mask: 0x5555_5555_5555_5555,
                    torn: Some(2),
                },
            ),
        ];
        for cut in start..=end {
            for (name, s) in survivors {
                let what = format!("cut after op {cut} of {start}..{end}, survivors {name}");
                let state = f.crash_after_op(cut, s);
                let mut ro = VhdxImage::open_file(state.clone(), path, OpenMode::ReadOnly)
                    .unwrap_or_else(|e| panic!("{what}: read-only open: {e}"));
                let got = read_all(&mut ro);
                assert!(
                    same_used(&got, &disk, &used),
                    "{what}: file system data changed"
                );
                drop(ro);
                let rw = VhdxImage::open_file(state, path, OpenMode::ReadWrite)
                    .unwrap_or_else(|e| panic!("{what}: read-write open: {e}"));
                let r = vhdx::check::check_image(&rw);
                assert!(r.corruptions.is_empty(), "{what}: {r:?}");
            }
        }
    }
}
