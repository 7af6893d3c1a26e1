//! `vhdtool rebase CHILD --parent NEWPATH [--unsafe] [--json]`: re-link a differencing image to
//! its parent at a new place (Set-VHD -ParentPath), after checking that NEWPATH is the same
//! disk.
//!
//! ```text
//!   NEWPATH (read-only): VHD footer UUID / VHDX DataWriteGuid  ==  what CHILD records?
//!       yes -> new relative + absolute locators written into CHILD
//!       no  -> refused (nothing written), unless --unsafe
//! ```
//!
//! `--unsafe` skips the check and also records NEWPATH's identity, so the chain opens over it:
//! a recovery tool for a parent that was copied or edited (its content may differ from what
//! the child was made over; the child's view is then whatever the combination reads).

use std::path::{Path, PathBuf};

use anyhow::{bail, Context, Result};
use serde::Serialize;

use super::edit::RwImage;

/// Arguments of `rebase`.
#[derive(Debug, clap::Args)]
pub struct Args {
    /// The new location of the parent.
    #[arg(long)]
    pub parent: PathBuf,
    /// Do not check the parent's identity; record NEWPATH's identity instead (recovery).
    #[arg(long = "unsafe")]
    pub unsafe_: bool,
    /// Print the result as JSON.
    #[arg(long)]
    pub json: bool,
    /// The differencing image.
    pub child: PathBuf,
}

/// What `rebase --json` prints.
#[derive(Debug, Serialize)]
#[serde(rename_all = "kebab-case")]
pub struct Report {
    /// The child.
    pub child: PathBuf,
    /// The parent it now points to (absolute).
    pub parent: PathBuf,
    /// The relative locator written (Windows style).
    pub relative_path: String,
    /// Whether the identity check was skipped.
    pub unsafe_: bool,
}

use image_io::format::relative_windows_path;

/// Runs `rebase`.
pub fn run(a: &Args) -> Result<u8> {
    let new_parent = block_backend::open_layer(&a.parent, vhd::OpenMode::ReadOnly)
        .with_context(|| format!("cannot open the new parent {}", a.parent.display()))?;
    let absolute = std::fs::canonicalize(&a.parent)
        .with_context(|| format!("cannot resolve {}", a.parent.display()))?;
    let child_abs = std::fs::canonicalize(&a.child)
        .with_context(|| format!("cannot resolve {}", a.child.display()))?;
    let dir = child_abs.parent().unwrap_or(Path::new("/"));
    let relative = relative_windows_path(dir, &absolute);
    // Identity first, read-only: a refused rebase writes nothing.
    let child = block_backend::open_layer(&a.child, vhd::OpenMode::ReadOnly)
        .with_context(|| format!("cannot open {}", a.child.display()))?;
    let (c, f) = (child.format(), new_parent.format());
    let Some(link) = child.format_image().and_then(|img| img.parent_ref()) else {
        bail!("{} is not a differencing image", a.child.display());
    };
    if c != f {
        bail!(
            "{} is a {f} image: the parent of a {c} differencing image is a {c} image",
            a.parent.display()
        );
    }
    let Some(found) = new_parent.identity() else {
        bail!("{} is not a {c} image", a.parent.display());
    };
    let want = link.accepts[0];
    let matches = link.accepts.contains(&found);
    drop(child);
    if !matches && !a.unsafe_ {
        bail!(
            "{} is not the parent of {}: it has identity {found}, the child was made over {want} (use --unsafe to re-link anyway)",
            a.parent.display(),
            a.child.display()
        );
    }
    drop(new_parent);
    let mut image = RwImage::open(&a.child, "rebase")?;
    image.set_parent(&absolute, &relative, a.unsafe_.then_some(found))?;
    image.close()?;
    if a.json {
        let r = Report {
            child: a.child.clone(),
            parent: absolute,
            relative_path: relative,
            unsafe_: a.unsafe_,
        };
        println!("{}", serde_json::to_string_pretty(&r)?);
    } else {
        println!(
            "{}: parent is now {} ({relative})",
            a.child.display(),
            absolute.display()
        );
    }
    Ok(0)
}
