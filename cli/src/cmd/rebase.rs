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
use block_backend::{Format, Layer};
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

/// `target` relative to `from_dir`, Windows style (`.\p.vhd`, `..\d\p.vhd`).
fn relative_windows_path(from_dir: &Path, target: &Path) -> String {
    let from: Vec<_> = from_dir.components().collect();
    let to: Vec<_> = target.components().collect();
    let common = from.iter().zip(&to).take_while(|(a, b)| a == b).count();
    let mut parts: Vec<String> = Vec::new();
    if common == from.len() {
        parts.push(".".into());
    }
    parts.extend(std::iter::repeat_n("..".to_string(), from.len() - common));
    parts.extend(
        to[common..]
            .iter()
            .map(|c| c.as_os_str().to_string_lossy().into_owned()),
    );
    parts.join("\\")
}

/// Runs `rebase`.
pub fn run(a: &Args) -> Result<u8> {
    let new_parent = Layer::open(&a.parent, vhd::OpenMode::ReadOnly)
        .with_context(|| format!("cannot open the new parent {}", a.parent.display()))?;
    let absolute = std::fs::canonicalize(&a.parent)
        .with_context(|| format!("cannot resolve {}", a.parent.display()))?;
    let child_abs = std::fs::canonicalize(&a.child)
        .with_context(|| format!("cannot resolve {}", a.child.display()))?;
    let dir = child_abs.parent().unwrap_or(Path::new("/"));
    let relative = relative_windows_path(dir, &absolute);
    // Identity first, read-only: a refused rebase writes nothing.
    let (want, found, matches) = match (
        block_backend::probe::probe_path(&a.child)?,
        new_parent.format(),
    ) {
        (Format::Vhd, Format::Vhd) => {
            let c = vhd::VhdImage::open(&a.child, vhd::OpenMode::ReadOnly)?;
            let want = c
                .parent()
                .map(|p| p.uuid)
                .context("not a differencing image")?;
            let found = new_parent.info().uuid.unwrap_or_default();
            (want, found, want == found)
        }
        (Format::Vhdx, Format::Vhdx) => {
            let c = vhdx::VhdxImage::open(&a.child, vhdx::OpenMode::ReadOnly)?;
            let link = c.parent().cloned().context("not a differencing image")?;
            let Layer::Image(img) = &new_parent else {
                bail!("{} is not a VHDX image", a.parent.display());
            };
            let block_backend::Image::Vhdx(p) = &**img else {
                bail!("{} is not a VHDX image", a.parent.display());
            };
            let found = p.header().data_write_guid;
            (link.linkage, found, link.matches(found))
        }
        (Format::Raw, _) => bail!("{} is not a differencing image", a.child.display()),
        (c, f) => bail!(
            "{} is a {f} image: the parent of a {c} differencing image is a {c} image",
            a.parent.display()
        ),
    };
    if !matches && !a.unsafe_ {
        bail!(
            "{} is not the parent of {}: it has identity {found}, the child was made over {want} (use --unsafe to re-link anyway)",
            a.parent.display(),
            a.child.display()
        );
    }
    drop(new_parent);
    let mut image = RwImage::open(&a.child, "rebase")?;
    match &mut image {
        RwImage::Vhd(c) => c.set_parent(&absolute, &relative, a.unsafe_.then_some(found))?,
        RwImage::Vhdx(c) => {
            let link = c.parent().cloned().context("no parent link")?;
            let mut entries: Vec<(String, String)> = link
                .entries
                .iter()
                .filter(|(k, _)| {
                    let path_key = matches!(
                        k.as_str(),
                        "relative_path" | "absolute_win32_path" | "volume_path"
                    );
                    let replaced_link = a.unsafe_ && k.starts_with("parent_linkage");
                    !(path_key || replaced_link)
                })
                .cloned()
                .collect();
            if a.unsafe_ {
                entries.insert(0, ("parent_linkage".into(), format!("{{{found}}}")));
            }
            entries.push(("relative_path".into(), relative.clone()));
            entries.push((
                "absolute_win32_path".into(),
                absolute.to_string_lossy().replace('/', "\\"),
            ));
            c.set_parent_locator(entries)?;
        }
    }
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
