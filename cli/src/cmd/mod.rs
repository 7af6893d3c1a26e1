//! The `vhdtool` verbs, one module each, plus what they share: format names and guessing the
//! format from a file extension (only for files being *created*; existing files are always
//! probed by content), and the size of copy chunks.

pub mod bench;
pub mod boot;
pub mod check;
pub mod compact;
pub mod compare;
pub mod completions;
pub mod convert;
pub mod create;
pub mod download;
pub mod edit;
pub mod fsfree;
pub mod info;
pub mod map;
pub mod measure;
pub mod merge;
pub mod mount;
pub mod read;
pub mod rebase;
pub mod resize;
pub mod serve;
pub mod upload;
pub mod vm;
pub mod write;

use std::path::Path;

use anyhow::{bail, Result};
use block_backend::{Chain, OpenOptions};

/// Size of the buffers used to move payload (2 MiB: one default VHD block).
pub const CHUNK: u64 = 2 << 20;

/// Span of the virtual disk mapped at a time by the copying verbs (bounds memory for the map
/// of huge disks).
pub const MAP_WINDOW: u64 = 1 << 30;

/// Image formats on the command line.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum ImageFormat {
    /// A plain file holding the disk bytes.
    Raw,
    /// Microsoft VHD.
    Vhd,
    /// Microsoft VHDX.
    Vhdx,
}

/// VHD/VHDX disk types that can be created directly (differencing comes from `--parent`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum DiskTypeArg {
    /// All space allocated up front.
    Fixed,
    /// Space allocated on first write.
    Dynamic,
}

impl From<DiskTypeArg> for vhd::VhdType {
    fn from(t: DiskTypeArg) -> Self {
        match t {
            DiskTypeArg::Fixed => vhd::VhdType::Fixed,
            DiskTypeArg::Dynamic => vhd::VhdType::Dynamic,
        }
    }
}

/// The format a new file's name asks for: `.vhd`/`.avhd` VHD, `.vhdx`/`.avhdx` VHDX,
/// `.raw`/`.img`/`.bin` raw; `None` otherwise.
pub fn format_from_extension(path: &Path) -> Option<ImageFormat> {
    let ext = path.extension()?.to_str()?.to_ascii_lowercase();
    match ext.as_str() {
        "vhd" | "avhd" => Some(ImageFormat::Vhd),
        "vhdx" | "avhdx" => Some(ImageFormat::Vhdx),
        "raw" | "img" | "bin" => Some(ImageFormat::Raw),
        _ => None,
    }
}

/// Sector sizes of new VHDX images.
#[derive(Debug, Clone, Copy, clap::Args)]
pub struct SectorArgs {
    /// VHDX only: logical sector size, 512 or 4096 (default 512).
    #[arg(long, value_parser = parse_sector_size)]
    pub logical_sector_size: Option<u32>,
    /// VHDX only: physical sector size, 512 or 4096 (default 4096, as Hyper-V).
    #[arg(long, value_parser = parse_sector_size)]
    pub physical_sector_size: Option<u32>,
}

impl SectorArgs {
    /// Whether any sector size was given (they only apply to VHDX).
    pub fn any(&self) -> bool {
        self.logical_sector_size.is_some() || self.physical_sector_size.is_some()
    }
}

fn parse_sector_size(s: &str) -> std::result::Result<u32, String> {
    match s {
        "512" => Ok(512),
        "4096" | "4K" | "4k" => Ok(4096),
        _ => Err(format!("sector size must be 512 or 4096, not {s:?}")),
    }
}

/// Options for a new VHDX image from the command line.
pub fn vhdx_options(
    size: u64,
    fixed: bool,
    block_size: Option<u64>,
    sparse: bool,
    sectors: SectorArgs,
) -> Result<vhdx::CreateOptions> {
    let d = vhdx::CreateOptions::default();
    Ok(vhdx::CreateOptions {
        size,
        fixed,
        block_size: block_size_arg(block_size)?,
        logical_sector_size: sectors.logical_sector_size.unwrap_or(d.logical_sector_size),
        physical_sector_size: sectors
            .physical_sector_size
            .unwrap_or(d.physical_sector_size),
        sparse,
        parent: None,
    })
}

/// `--force-share` of the verbs that only read images.
#[derive(Debug, Clone, Copy, Default, clap::Args)]
pub struct ShareArgs {
    /// Read the image even while another process (a VM, a mount, qemu) writes it, taking no lock
    /// that stands in its way; what is read may be changing (qemu-img's -U).
    #[arg(short = 'U', long)]
    pub force_share: bool,
}

impl ShareArgs {
    /// The backend's options for a read-only open of `path`; warns on stderr when sharing.
    pub fn open_options(&self, path: &Path) -> OpenOptions {
        if self.force_share {
            eprintln!(
                "vhdtool: warning: --force-share: {} may be in use by another process; what is read may be changing",
                path.display()
            );
            OpenOptions::read_only_force_share()
        } else {
            OpenOptions::read_only()
        }
    }
}

/// Opens a disk (with its whole chain) read-only, sharing it as `share` says.
pub fn open_read_only(path: &Path, share: ShareArgs) -> Result<Chain> {
    Ok(block_backend::open(path, share.open_options(path))?)
}

/// A second, read-only view of an image this process holds open for writing (the lock is
/// ours: the view shares it rather than be refused by it).
pub fn open_own_view(path: &Path) -> Result<Chain> {
    Ok(block_backend::open(
        path,
        OpenOptions::read_only_force_share(),
    )?)
}

/// Block size argument to the `u32` the formats take (`None`: the format's default).
pub fn block_size_arg(size: Option<u64>) -> Result<Option<u32>> {
    match size {
        None => Ok(None),
        Some(s) => match u32::try_from(s) {
            Ok(v) => Ok(Some(v)),
            Err(_) => bail!("block size {s} is too large (the maximum is 256 MiB)"),
        },
    }
}

/// True if every byte of `buf` is zero (OR-folds 64-byte chunks, which vectorizes well).
pub fn is_zero(buf: &[u8]) -> bool {
    let mut chunks = buf.chunks_exact(64);
    chunks
        .by_ref()
        .all(|c| c.iter().fold(0u8, |acc, &b| acc | b) == 0)
        && chunks.remainder().iter().all(|&b| b == 0)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn extensions_pick_formats_case_insensitively() {
        assert_eq!(
            format_from_extension(Path::new("a.vhd")),
            Some(ImageFormat::Vhd)
        );
        assert_eq!(
            format_from_extension(Path::new("a.VHD")),
            Some(ImageFormat::Vhd)
        );
        assert_eq!(
            format_from_extension(Path::new("a.avhd")),
            Some(ImageFormat::Vhd)
        );
        assert_eq!(
            format_from_extension(Path::new("d/a.vhdx")),
            Some(ImageFormat::Vhdx)
        );
        assert_eq!(
            format_from_extension(Path::new("a.avhdx")),
            Some(ImageFormat::Vhdx)
        );
        assert_eq!(
            format_from_extension(Path::new("a.img")),
            Some(ImageFormat::Raw)
        );
        assert_eq!(format_from_extension(Path::new("a.qcow2")), None);
        assert_eq!(format_from_extension(Path::new("noext")), None);
    }

    #[test]
    fn zero_detection_sees_any_nonzero_byte() {
        let mut buf = vec![0u8; 4099];
        assert!(is_zero(&buf));
        assert!(is_zero(&buf[1..]));
        for i in [0, 1, 7, 8, 2048, 4097, 4098] {
            buf[i] = 1;
            assert!(!is_zero(&buf), "byte {i}");
            assert!(!is_zero(&buf[..=i]), "byte {i} at the end");
            buf[i] = 0;
        }
        assert!(is_zero(&[]));
    }

    #[test]
    fn block_size_must_fit_u32() {
        assert_eq!(block_size_arg(None).unwrap(), None);
        assert_eq!(block_size_arg(Some(512 << 10)).unwrap(), Some(512 << 10));
        assert!(block_size_arg(Some(1 << 40)).is_err());
    }
}
