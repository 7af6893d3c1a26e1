//! `vhdtool merge [-p] [--json] CHILD`: commit a differencing image into its parent
//! (Merge-VHD), then delete it.
//!
//! ```text
//!   CHILD ──its chain (read-only) finds and verifies──> PARENT
//!   CHILD's sectors ──written into──> PARENT (writable)  ──flushed──>  CHILD removed
//! ```
//!
//! The parent ends up reading exactly as the child did. The child's view never changes while
//! the merge runs, so an interrupted merge (crash, kill -9) leaves a working chain, and running
//! the same command again finishes the job. Other children of the parent no longer match it
//! afterwards (its data changed), as with Hyper-V.

use std::path::PathBuf;

use anyhow::{bail, Context, Result};
use serde::Serialize;

use super::edit::parent_path;
use crate::progress::Progress;

/// Arguments of `merge`.
#[derive(Debug, clap::Args)]
pub struct Args {
    /// Show progress on stderr.
    #[arg(short = 'p', long = "progress")]
    pub progress: bool,
    /// Print the result as JSON.
    #[arg(long)]
    pub json: bool,
    /// The differencing image to merge into its parent (removed afterwards).
    pub child: PathBuf,
}

/// What `merge --json` prints.
#[derive(Debug, Serialize)]
#[serde(rename_all = "kebab-case")]
pub struct Report {
    /// The merged (and removed) child.
    pub child: PathBuf,
    /// The parent that now holds the child's view.
    pub parent: PathBuf,
    /// Bytes copied.
    pub bytes_copied: u64,
}

/// Runs `merge`.
pub fn run(a: &Args) -> Result<u8> {
    let parent = parent_path(&a.child)?;
    let format = block_backend::probe::probe_path(&a.child)?;
    let copied = match format {
        block_backend::Format::Vhd => {
            let mut p = vhd::VhdImage::open(&parent, vhd::OpenMode::ReadWrite)
                .with_context(|| format!("cannot open parent {} for writing", parent.display()))?;
            let mut child = vhd::VhdImage::open(&a.child, vhd::OpenMode::ReadOnly)?;
            let mut progress = Progress::new(child.virtual_size(), a.progress);
            let r = vhd::merge::merge_into(&mut child, &mut p, &mut |n| progress.inc(n))?;
            p.flush()?;
            progress.finish();
            r.bytes_copied
        }
        block_backend::Format::Vhdx => {
            // The parent first: opening a VHDX for writing updates its header, and a refused
            // merge must leave the child as it was.
            let mut p = vhdx::VhdxImage::open(&parent, vhdx::OpenMode::ReadWrite)
                .with_context(|| format!("cannot open parent {} for writing", parent.display()))?;
            let mut child = vhdx::VhdxImage::open(&a.child, vhdx::OpenMode::ReadWrite)?;
            let mut progress = Progress::new(child.virtual_size(), a.progress);
            let r = vhdx::merge::merge_into(&mut child, &mut p, &mut |n| progress.inc(n))?;
            p.close()?;
            child.close()?;
            progress.finish();
            r.bytes_copied
        }
        block_backend::Format::Raw => bail!(
            "{} is a raw file, not a differencing image",
            a.child.display()
        ),
    };
    // The parent is durable; only now may the child go.
    std::fs::remove_file(&a.child)
        .with_context(|| format!("cannot remove {}", a.child.display()))?;
    image_io::publish::sync_dir(&image_io::publish::parent_dir(&a.child));
    if a.json {
        let r = Report {
            child: a.child.clone(),
            parent,
            bytes_copied: copied,
        };
        println!("{}", serde_json::to_string_pretty(&r)?);
    } else {
        println!(
            "merged {} into {} ({copied} bytes); removed {}",
            a.child.display(),
            parent.display(),
            a.child.display()
        );
    }
    Ok(0)
}
