//! `vhdtool info [--json] FILE`: format, disk type, sizes, identity and backing chain.
//!
//! Opens read-only. If the chain below a differencing image cannot be opened (missing or wrong
//! parent), the image itself is still described, with a warning and `parent: null`.

use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};

use anyhow::{Context, Result};
use block_backend::{Disk, LayerInfo};
use serde::Serialize;

use crate::size::format_size;

/// Arguments of `info`.
#[derive(Debug, clap::Args)]
pub struct Args {
    #[command(flatten)]
    pub share: super::ShareArgs,
    /// Print JSON instead of text.
    #[arg(long)]
    pub json: bool,
    /// The image.
    pub file: PathBuf,
}

/// What `info --json` prints.
#[derive(Debug, Serialize)]
#[serde(rename_all = "kebab-case")]
pub struct Info {
    /// The file as given.
    pub filename: PathBuf,
    /// `raw`, `vhd` or `vhdx`.
    pub format: String,
    /// `fixed`, `dynamic`, `differencing`; null for raw.
    pub subformat: Option<String>,
    /// Size of the virtual disk in bytes.
    pub virtual_size: u64,
    /// Bytes allocated on the host for the file (`st_blocks * 512`); null for a remote
    /// layer (an NBD export), which has no local file.
    pub actual_size: Option<u64>,
    /// Allocation block size (dynamic and differencing).
    pub block_size: Option<u32>,
    /// Logical sector size.
    pub logical_sector_size: u32,
    /// Physical sector size.
    pub physical_sector_size: u32,
    /// Creator application and version.
    pub creator: Option<String>,
    /// Image UUID.
    pub uuid: Option<String>,
    /// Resolved parent path, null when there is none or it could not be opened.
    pub parent: Option<PathBuf>,
    /// Parent UUID recorded in a differencing image.
    pub parent_uuid: Option<String>,
    /// Parent name recorded in a differencing image.
    pub parent_name: Option<String>,
    /// Paths of the chain, top first.
    pub backing_chain: Vec<PathBuf>,
    /// Why the chain could not be opened, if it could not.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub chain_error: Option<String>,
}

/// Gathers the information about `path`.
pub fn gather(path: &Path, share: super::ShareArgs) -> Result<Info> {
    let opts = share.open_options(path);
    let (layers, sector_sizes, chain_error) = match block_backend::open(path, opts) {
        Ok(disk) => (
            disk.layers(),
            (disk.logical_sector_size(), disk.physical_sector_size()),
            None,
        ),
        Err(e) if e.is_chain_error() => {
            // The image itself may be fine: describe it alone.
            let top = block_backend::open_layer(path, opts.mode())?;
            (vec![top.info()], (512, 512), Some(e.to_string()))
        }
        Err(e) => return Err(e.into()),
    };
    let top: &LayerInfo = layers.first().context("no layers")?;
    let actual_size = if block_backend::layer::is_remote(path) {
        None
    } else {
        let meta = std::fs::metadata(path).with_context(|| format!("stat {}", path.display()))?;
        Some(meta.blocks().saturating_mul(512))
    };
    Ok(Info {
        filename: block_backend::layer::shown_location(path),
        format: top.format.to_string(),
        subformat: top.subformat.map(|s| s.to_string()),
        virtual_size: top.virtual_size,
        actual_size,
        block_size: top.block_size,
        logical_sector_size: sector_sizes.0,
        physical_sector_size: sector_sizes.1,
        creator: top.creator.clone(),
        uuid: top.uuid.map(|u| u.to_string()),
        parent: layers.get(1).map(|l| l.path.clone()),
        parent_uuid: top.parent_uuid.map(|u| u.to_string()),
        parent_name: top.parent_name.as_deref().map(|n| {
            block_backend::layer::shown_location(Path::new(n))
                .to_string_lossy()
                .into_owned()
        }),
        backing_chain: layers.iter().map(|l| l.path.clone()).collect(),
        chain_error,
    })
}

/// Runs `info`.
pub fn run(a: &Args) -> Result<u8> {
    let info = gather(&a.file, a.share)?;
    if let Some(e) = &info.chain_error {
        eprintln!("vhdtool: warning: {e}");
    }
    if a.json {
        println!("{}", serde_json::to_string_pretty(&info)?);
    } else {
        print!("{}", human(&info));
    }
    Ok(0)
}

/// The text form, qemu-img style.
fn human(i: &Info) -> String {
    let mut s = String::new();
    let mut line = |k: &str, v: String| s.push_str(&format!("{k}: {v}\n"));
    line("image", i.filename.display().to_string());
    line("file format", i.format.clone());
    if let Some(sub) = &i.subformat {
        line("subformat", sub.clone());
    }
    line(
        "virtual size",
        format!("{} ({} bytes)", format_size(i.virtual_size), i.virtual_size),
    );
    line(
        "disk size",
        i.actual_size
            .map_or_else(|| "unavailable".into(), format_size),
    );
    if let Some(b) = i.block_size {
        line(
            "block size",
            format!("{} ({b} bytes)", format_size(u64::from(b))),
        );
    }
    line(
        "sector size",
        format!(
            "{} logical, {} physical",
            i.logical_sector_size, i.physical_sector_size
        ),
    );
    if let Some(c) = &i.creator {
        line("creator", c.clone());
    }
    if let Some(u) = &i.uuid {
        line("uuid", u.clone());
    }
    if let Some(name) = &i.parent_name {
        line("parent name", name.clone());
    }
    if let Some(u) = &i.parent_uuid {
        line("parent uuid", u.clone());
    }
    match (&i.parent, &i.parent_uuid) {
        (Some(p), _) => line("parent", p.display().to_string()),
        (None, Some(_)) => line("parent", "(not found)".into()),
        _ => {}
    }
    if i.backing_chain.len() > 1 {
        s.push_str("backing chain:\n");
        for (depth, p) in i.backing_chain.iter().enumerate() {
            s.push_str(&format!("  {depth}: {}\n", p.display()));
        }
    }
    s
}
