//! `vhdtool create [-f vhd|vhdx] [--type fixed|dynamic] [--block-size SIZE]
//! [--logical-sector-size 512|4096] [--physical-sector-size 512|4096] [--parent PARENT]
//! [--sparse] FILE [SIZE]`
//!
//! The format comes from `-f`, else from FILE's extension (`.vhd`, `.avhd`, `.vhdx`, `.avhdx`),
//! else the parent's format, else VHD. With `--parent` the new image is a differencing child
//! whose size is the parent's. An existing FILE is never overwritten.

use std::path::PathBuf;

use anyhow::{bail, Context, Result};
use block_backend::{Disk, Format};

use super::{
    block_size_arg, format_from_extension, vhdx_options, DiskTypeArg, ImageFormat, SectorArgs,
};
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
    /// Image format (default: from the file extension, else the parent's, else vhd).
    #[arg(short = 'f', long = "format", value_enum)]
    pub format: Option<CreateFormat>,
    /// Disk type (default dynamic; not with --parent).
    #[arg(long = "type", value_enum)]
    pub disk_type: Option<DiskTypeArg>,
    /// Allocation block size (default: VHD 2M; VHDX 32M, 2M for differencing).
    #[arg(long, value_parser = parse_size)]
    pub block_size: Option<u64>,
    /// VHDX sector sizes.
    #[command(flatten)]
    pub sectors: SectorArgs,
    /// Make a differencing image over PARENT (its size is the parent's).
    #[arg(long)]
    pub parent: Option<PathBuf>,
    /// Fixed images: leave the data area sparse on the host instead of writing zeros.
    #[arg(long)]
    pub sparse: bool,
    /// For Azure: a fixed VHD whose size is rounded up to a whole MiB (Azure refuses others).
    #[arg(long, conflicts_with_all = ["parent", "disk_type"])]
    pub azure: bool,
    /// The image to create (must not exist).
    pub file: PathBuf,
    /// Virtual size, e.g. 64M or 10G (required unless --parent is given).
    #[arg(value_parser = parse_size)]
    pub size: Option<u64>,
}

/// Runs `create`.
pub fn run(a: &Args) -> Result<u8> {
    if a.file.symlink_metadata().is_ok() {
        bail!(
            "{} already exists; refusing to overwrite it",
            a.file.display()
        );
    }
    // The parent decides the size (and, failing anything else, the format).
    let parent = match &a.parent {
        Some(p) => {
            if a.disk_type.is_some() {
                bail!(
                    "--type cannot be combined with --parent: a child image is always differencing"
                );
            }
            if a.sparse {
                bail!("--sparse applies to fixed images only");
            }
            let disk = block_backend::open(p, block_backend::OpenOptions::read_only())
                .with_context(|| format!("cannot use {} as parent", p.display()))?;
            let format = disk.layers()[0].format;
            if let Some(s) = a.size {
                if s != disk.size() {
                    bail!("SIZE {s} differs from the parent's virtual size {}; a differencing image always has its parent's size", disk.size());
                }
            }
            // A remote parent (an NBD export, an Azure blob) is recorded by the identity its
            // server tells (a blob: its VHD footer's), whatever its format.
            let remote = block_backend::layer::is_remote(p)
                .then(|| (disk.top().identity(), disk.logical_sector_size()));
            Some((p.clone(), disk.size(), format, remote))
        }
        None => None,
    };
    let format = a.format.unwrap_or(match format_from_extension(&a.file) {
        _ if a.azure => CreateFormat::Vhd,
        Some(ImageFormat::Vhdx) => CreateFormat::Vhdx,
        Some(ImageFormat::Vhd) => CreateFormat::Vhd,
        _ => match &parent {
            Some((_, _, Format::Vhdx, _) | (_, _, _, Some(_))) => CreateFormat::Vhdx,
            _ => CreateFormat::Vhd,
        },
    });
    if let Some((p, _, pf, None)) = &parent {
        let want = if format == CreateFormat::Vhdx {
            Format::Vhdx
        } else {
            Format::Vhd
        };
        if *pf != want {
            bail!(
                "parent {} is a {pf} image; a {want} image needs a {want} parent",
                p.display()
            );
        }
    }
    if format == CreateFormat::Vhd && a.sectors.any() {
        bail!("--logical-sector-size and --physical-sector-size apply to VHDX only");
    }
    if a.azure && format != CreateFormat::Vhd {
        bail!("--azure makes a fixed VHD (Azure takes no VHDX); use -f vhd or a .vhd name");
    }
    let t = if a.azure {
        DiskTypeArg::Fixed
    } else {
        a.disk_type.unwrap_or(DiskTypeArg::Dynamic)
    };
    if a.sparse && t != DiskTypeArg::Fixed {
        bail!("--sparse applies to fixed images only");
    }
    if format == CreateFormat::Vhd && t == DiskTypeArg::Fixed && a.block_size.is_some() {
        bail!("--block-size applies to dynamic and differencing VHD images only");
    }
    let (size, kind) = match &parent {
        Some((_, size, _, _)) => (*size, "differencing"),
        None => {
            let Some(mut size) = a.size else {
                bail!("SIZE is required (for example 64M or 10G) unless --parent is given");
            };
            if a.azure && size % (1 << 20) != 0 {
                let rounded = size.next_multiple_of(1 << 20);
                eprintln!(
                    "vhdtool: note: --azure: size {size} rounded up to {rounded} (a whole MiB)"
                );
                size = rounded;
            }
            (
                size,
                if t == DiskTypeArg::Fixed {
                    "fixed"
                } else {
                    "dynamic"
                },
            )
        }
    };
    let parent_path = parent.as_ref().map(|p| p.0.clone());
    let remote_parent = match &parent {
        Some((p, size, _, Some((identity, sector)))) => {
            if format != CreateFormat::Vhdx {
                bail!("a child over a network export or a blob must be a VHDX (use a .vhdx name or -f vhdx): only VHDX parent locators hold a URI");
            }
            let Some(identity) = identity else {
                bail!("{} tells no image identity (`vhdtool serve` exports and blobs do): a child could not check it is stacked on the right image", p.display());
            };
            Some(vhdx::ParentInfo::remote(
                &p.to_string_lossy(),
                *identity,
                *size,
                *sector,
            ))
        }
        _ => None,
    };
    let block_size = match format {
        CreateFormat::Vhd => {
            let mut opts = vhd::CreateOptions {
                size,
                vhd_type: t.into(),
                sparse: a.sparse,
                parent: parent_path,
                ..Default::default()
            };
            if let Some(b) = block_size_arg(a.block_size)? {
                opts.block_size = b;
            }
            let image = vhd::VhdImage::create(&a.file, &opts)
                .with_context(|| format!("cannot create {}", a.file.display()))?;
            image.block_size()
        }
        CreateFormat::Vhdx => {
            let mut opts = vhdx_options(
                size,
                t == DiskTypeArg::Fixed && parent.is_none(),
                a.block_size,
                a.sparse,
                a.sectors,
            )?;
            opts.parent = parent_path;
            let image = match remote_parent {
                Some(p) => vhdx::VhdxImage::create_over(&a.file, &opts, p),
                None => vhdx::VhdxImage::create(&a.file, &opts),
            }
            .with_context(|| format!("cannot create {}", a.file.display()))?;
            let b = image.block_size();
            image
                .close()
                .with_context(|| format!("cannot close {}", a.file.display()))?;
            Some(b)
        }
    };
    let fmt = if format == CreateFormat::Vhdx {
        "vhdx"
    } else {
        "vhd"
    };
    let mut line = format!(
        "Formatting '{}', fmt={fmt} subformat={kind} size={size} ({})",
        a.file.display(),
        format_size(size)
    );
    if let Some(b) = block_size.filter(|_| kind != "fixed" || format == CreateFormat::Vhdx) {
        line.push_str(&format!(" block_size={b}"));
    }
    if let Some((p, _, _, _)) = &parent {
        line.push_str(&format!(" parent='{}'", p.display()));
    }
    println!("{line}");
    Ok(0)
}
