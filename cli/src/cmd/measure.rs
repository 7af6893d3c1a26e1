//! `vhdtool measure -O vhd|vhdx [--type fixed|dynamic] [--block-size SIZE]
//! [--logical-sector-size N] [--azure] [--json] (SRC | --size SIZE)`: file size a conversion
//! (or a new image) would take, like `qemu-img measure`.
//!
//! ```text
//!   required         = metadata + every block holding data per SRC's map (--size: none)
//!   fully-allocated  = metadata + every block of the virtual disk
//! ```
//!
//! Invariant: `vhdtool convert` with the same options never writes a file longer than
//! `required`. It counts blocks from SRC's allocation map without reading data, so `required`
//! is an upper bound: convert also skips blocks whose data is all zeros. The layouts are those
//! of the `vhd` and `vhdx` create code: VHD footer copy, header and BAT in the first sectors,
//! blocks with their bitmap in front and data 4 KiB aligned, footer at the end; VHDX 1 MiB
//! header section, 1 MiB log, 1 MiB metadata, BAT rounded to 1 MiB, then whole blocks.

use std::path::PathBuf;

use anyhow::{bail, Result};
use block_backend::Disk;
use serde::Serialize;

use super::{block_size_arg, open_read_only, DiskTypeArg, ImageFormat, MAP_WINDOW};
use crate::size::{format_size, parse_size};

/// Arguments of `measure`.
#[derive(Debug, clap::Args)]
pub struct Args {
    #[command(flatten)]
    pub share: super::ShareArgs,
    /// Output format to measure for.
    #[arg(short = 'O', value_enum)]
    pub output_format: ImageFormat,
    /// Disk type (default dynamic).
    #[arg(long = "type", value_enum)]
    pub disk_type: Option<DiskTypeArg>,
    /// Allocation block size (default: VHD 2M, VHDX 32M).
    #[arg(long, value_parser = parse_size)]
    pub block_size: Option<u64>,
    /// VHDX logical sector size, 512 or 4096 (sizes round up to it).
    #[arg(long, default_value_t = 512)]
    pub logical_sector_size: u32,
    /// Measure for `convert --azure` (fixed VHD, size rounded up to a whole MiB).
    #[arg(long)]
    pub azure: bool,
    /// A virtual size instead of a source (an empty image).
    #[arg(long, value_parser = parse_size, conflicts_with = "src")]
    pub size: Option<u64>,
    /// Print JSON (keys `required` and `fully-allocated`, bytes).
    #[arg(long)]
    pub json: bool,
    /// The source disk (any format; chains are flattened).
    #[arg(required_unless_present = "size")]
    pub src: Option<PathBuf>,
}

/// What `measure --json` prints.
#[derive(Debug, Serialize, PartialEq, Eq)]
#[serde(rename_all = "kebab-case")]
pub struct Measure {
    /// File size for the source's data.
    pub required: u64,
    /// File size with every block allocated.
    pub fully_allocated: u64,
}

/// File size of a dynamic VHD with `blocks` allocated.
pub fn vhd_dynamic_size(vsize: u64, block: u64, blocks: u64) -> u64 {
    let entries = vsize.div_ceil(block);
    let bitmap = (block / 512).div_ceil(8).next_multiple_of(512);
    let mut footer = 1536 + (entries * 4).next_multiple_of(512);
    // Each block goes where the footer was, data 4 KiB aligned (see vhd::image::allocate).
    let data_start = |footer: u64| (footer + 512 + bitmap).next_multiple_of(4096);
    if blocks > 0 {
        let first = data_start(footer);
        let step = data_start(first + block) - first;
        footer = first + block + (blocks - 1) * step;
    }
    footer + 512
}

/// File size of a VHDX (dynamic or fixed) with `blocks` allocated.
pub fn vhdx_size(vsize: u64, block: u64, lss: u64, blocks: u64) -> u64 {
    let n = vsize.div_ceil(block);
    let cr = (1u64 << 23) * lss / block;
    let entries = n + (n - 1) / cr;
    let data_at = (3 << 20) + (entries * 8).next_multiple_of(1 << 20);
    data_at + blocks * block
}

/// Blocks of `block` bytes that hold any extent the map does not call zero.
fn data_blocks(disk: &mut block_backend::Chain, block: u64) -> Result<u64> {
    let size = disk.size();
    let mut count = 0;
    let mut last: Option<u64> = None;
    let mut window = 0;
    while window < size {
        let wlen = (size - window).min(MAP_WINDOW);
        for e in disk.map(window, wlen)? {
            if e.zero && !e.data {
                continue;
            }
            let first = e.offset / block;
            let end = (e.end() - 1) / block;
            let from = match last {
                Some(l) if l >= first => l + 1,
                _ => first,
            };
            if end >= from {
                count += end - from + 1;
                last = Some(end);
            }
        }
        window += wlen;
    }
    Ok(count)
}

/// Computes the measure for `a`.
pub fn measure(a: &Args) -> Result<Measure> {
    let mut disk = match &a.src {
        Some(p) => Some(open_read_only(p, a.share)?),
        None => None,
    };
    let raw_size = match (&disk, a.size) {
        (Some(d), _) => d.size(),
        (None, Some(s)) => s,
        (None, None) => bail!("give SRC or --size"),
    };
    let fixed = a.azure || a.disk_type == Some(DiskTypeArg::Fixed);
    if a.azure && a.output_format != ImageFormat::Vhd {
        bail!("--azure means a fixed VHD: use -O vhd");
    }
    Ok(match a.output_format {
        ImageFormat::Raw => Measure {
            required: raw_size,
            fully_allocated: raw_size,
        },
        ImageFormat::Vhd => {
            let unit = if a.azure { 1 << 20 } else { 512 };
            let vsize = raw_size.div_ceil(unit) * unit;
            if fixed {
                Measure {
                    required: vsize + 512,
                    fully_allocated: vsize + 512,
                }
            } else {
                let block = u64::from(
                    block_size_arg(a.block_size)?
                        .unwrap_or(vhd::dynamic_header::DEFAULT_BLOCK_SIZE),
                );
                let used = match disk.as_mut() {
                    Some(d) => data_blocks(d, block)?,
                    None => 0,
                };
                Measure {
                    required: vhd_dynamic_size(vsize, block, used),
                    fully_allocated: vhd_dynamic_size(vsize, block, vsize.div_ceil(block)),
                }
            }
        }
        ImageFormat::Vhdx => {
            let lss = u64::from(a.logical_sector_size);
            let vsize = raw_size.div_ceil(lss) * lss;
            let block = u64::from(
                block_size_arg(a.block_size)?.unwrap_or(vhdx::create::DEFAULT_BLOCK_SIZE),
            );
            let all = vsize.div_ceil(block);
            let used = match (fixed, disk.as_mut()) {
                (true, _) => all,
                (false, Some(d)) => data_blocks(d, block)?,
                (false, None) => 0,
            };
            Measure {
                required: vhdx_size(vsize, block, lss, used),
                fully_allocated: vhdx_size(vsize, block, lss, all),
            }
        }
    })
}

/// Runs `measure`.
pub fn run(a: &Args) -> Result<u8> {
    let m = measure(a)?;
    if a.json {
        println!("{}", serde_json::to_string_pretty(&m)?);
    } else {
        println!(
            "required size: {} ({})\nfully allocated size: {} ({})",
            m.required,
            format_size(m.required),
            m.fully_allocated,
            format_size(m.fully_allocated)
        );
    }
    Ok(0)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn empty_dynamic_vhd_is_header_bat_and_footer() {
        // 64 MiB in 2 MiB blocks: 32 entries fit one BAT sector.
        assert_eq!(vhd_dynamic_size(64 << 20, 2 << 20, 0), 1536 + 512 + 512);
        // First block's data at 4 KiB, then one 4 KiB step (bitmap + padding) per block.
        assert_eq!(
            vhd_dynamic_size(64 << 20, 2 << 20, 2),
            4096 + (2 << 20) + 4096 + (2 << 20) + 512
        );
    }

    #[test]
    fn vhdx_counts_whole_blocks_after_a_megabyte_rounded_bat() {
        assert_eq!(vhdx_size(1 << 30, 32 << 20, 512, 0), 4 << 20);
        assert_eq!(vhdx_size(1 << 30, 32 << 20, 512, 32), (4 << 20) + (1 << 30));
    }
}
