//! `vhdtool compact [--mode quick|full] [-p] [--json] FILE`: shrink a dynamic or differencing
//! image in place (Hyper-V's Optimize-VHD offline).
//!
//! ```text
//!   FILE (writable) ──vhd/vhdx compact──> release empty / zero / parent-equal blocks
//!        parent chain (read-only) ─┘      move tail blocks into holes, truncate
//! ```
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
use crate::progress::Progress;
use crate::size::format_size;

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
}

/// Runs `compact`.
pub fn run(a: &Args) -> Result<u8> {
    let mut image = RwImage::open(&a.file, "compact")?;
    let full = a.mode == Mode::Full;
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
    let report = Report {
        filename: a.file.clone(),
        mode: if full { "full" } else { "quick" },
        blocks_released: released,
        blocks_moved: moved,
        file_size_before: before,
        file_size_after: after,
    };
    if a.json {
        println!("{}", serde_json::to_string_pretty(&report)?);
    } else {
        println!(
            "{}: {} blocks released, {} moved; {} -> {}",
            a.file.display(),
            released,
            moved,
            format_size(before),
            format_size(after)
        );
    }
    Ok(0)
}
