//! `vhdtool create [-f vhd|vhdx] [--type fixed|dynamic] [--block-size SIZE] [--parent PARENT]
//! [--sparse] FILE [SIZE]`
//!
//! The format comes from `-f`, else from FILE's extension (`.vhd`, `.avhd`; `.vhdx`/`.avhdx`
//! are refused until VHDX is built), else VHD. With `--parent` the new image is a differencing
//! child whose size is the parent's. An existing FILE is never overwritten.

use std::path::PathBuf;

use anyhow::{bail, Context, Result};

use super::{block_size_arg, format_from_extension, vhdx_not_built, DiskTypeArg};
use crate::size::{format_size, parse_size};

/// Formats `create` can produce.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum CreateFormat {
    /// Microsoft VHD.
    Vhd,
    /// Microsoft VHDX.
    Vhdx,
}

/// Arguments of `create`.
#[derive(Debug, clap::Args)]
pub struct Args {
    /// Image format (default: from the file extension, else vhd).
    #[arg(short = 'f', long = "format", value_enum)]
    pub format: Option<CreateFormat>,
    /// Disk type (default dynamic; not with --parent).
    #[arg(long = "type", value_enum)]
    pub disk_type: Option<DiskTypeArg>,
    /// Allocation block size of dynamic and differencing images (default 2M).
    #[arg(long, value_parser = parse_size)]
    pub block_size: Option<u64>,
    /// Make a differencing image over PARENT (its size is the parent's).
    #[arg(long)]
    pub parent: Option<PathBuf>,
    /// Fixed images: leave the data area sparse on the host instead of writing zeros.
    #[arg(long)]
    pub sparse: bool,
    /// The image to create (must not exist).
    pub file: PathBuf,
    /// Virtual size, e.g. 64M or 10G (required unless --parent is given).
    #[arg(value_parser = parse_size)]
    pub size: Option<u64>,
}

/// Runs `create`.
pub fn run(a: &Args) -> Result<u8> {
    let format = a.format.unwrap_or(match format_from_extension(&a.file) {
        Some(super::ImageFormat::Vhdx) => CreateFormat::Vhdx,
        _ => CreateFormat::Vhd,
    });
    if format == CreateFormat::Vhdx {
        return Err(vhdx_not_built());
    }
    if a.file.symlink_metadata().is_ok() {
        bail!(
            "{} already exists; refusing to overwrite it",
            a.file.display()
        );
    }
    let block_size = block_size_arg(a.block_size)?;
    let mut opts = vhd::CreateOptions {
        block_size,
        ..Default::default()
    };
    let (size, kind) = match &a.parent {
        Some(parent) => {
            if a.disk_type.is_some() {
                bail!(
                    "--type cannot be combined with --parent: a child image is always differencing"
                );
            }
            if a.sparse {
                bail!("--sparse applies to fixed images only");
            }
            let p = vhd::VhdImage::open(parent, vhd::OpenMode::ReadOnly)
                .with_context(|| format!("cannot use {} as parent", parent.display()))?;
            let psize = p.virtual_size();
            if let Some(s) = a.size {
                if s != psize {
                    bail!(
                        "SIZE {s} differs from the parent's virtual size {psize}; a differencing image always has its parent's size"
                    );
                }
            }
            opts.parent = Some(parent.clone());
            (psize, "differencing")
        }
        None => {
            let Some(size) = a.size else {
                bail!("SIZE is required (for example 64M or 10G) unless --parent is given");
            };
            let t = a.disk_type.unwrap_or(DiskTypeArg::Dynamic);
            if a.sparse && t != DiskTypeArg::Fixed {
                bail!("--sparse applies to fixed images only");
            }
            if t == DiskTypeArg::Fixed && a.block_size.is_some() {
                bail!("--block-size applies to dynamic and differencing images only");
            }
            opts.size = size;
            opts.vhd_type = t.into();
            opts.sparse = a.sparse;
            (
                size,
                match t {
                    DiskTypeArg::Fixed => "fixed",
                    DiskTypeArg::Dynamic => "dynamic",
                },
            )
        }
    };
    let image = vhd::VhdImage::create(&a.file, &opts)
        .with_context(|| format!("cannot create {}", a.file.display()))?;
    drop(image);
    let mut line = format!(
        "Formatting '{}', fmt=vhd subformat={kind} size={size} ({})",
        a.file.display(),
        format_size(size)
    );
    if kind != "fixed" {
        line.push_str(&format!(" block_size={block_size}"));
    }
    if let Some(p) = &a.parent {
        line.push_str(&format!(" parent='{}'", p.display()));
    }
    println!("{line}");
    Ok(0)
}
