//! `vhdtool resize [-p] [--json] FILE [+|-]SIZE`: change the virtual size in place
//! (Resize-VHD; qemu-img resize syntax).
//!
//! ```text
//!   SIZE    absolute new size       +SIZE  grow by       -SIZE  shrink by
//!   grow:   any type; new space reads as zeros
//!   shrink: refused while non-zero data lies past the new end (the error says how much)
//! ```
//!
//! Limits: VHD 2040 GiB, VHDX 64 TiB; sizes are whole sectors (512 bytes; a VHDX's logical
//! sector). For a differencing image the whole chain's view past the new end must be zeros.

use std::path::PathBuf;

use anyhow::{bail, Context, Result};
use block_backend::Disk;
use serde::Serialize;

use super::edit::RwImage;
use super::{is_zero, open_own_view, CHUNK, MAP_WINDOW};
use crate::progress::Progress;
use crate::size::{format_size, parse_size};

/// A size argument: absolute, or relative to the current size.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SizeArg {
    /// `SIZE`.
    Absolute(u64),
    /// `+SIZE`.
    Grow(u64),
    /// `-SIZE`.
    Shrink(u64),
}

fn parse_size_arg(s: &str) -> Result<SizeArg, String> {
    if let Some(r) = s.strip_prefix('+') {
        Ok(SizeArg::Grow(parse_size(r)?))
    } else if let Some(r) = s.strip_prefix('-') {
        Ok(SizeArg::Shrink(parse_size(r)?))
    } else {
        Ok(SizeArg::Absolute(parse_size(s)?))
    }
}

/// Arguments of `resize`.
#[derive(Debug, clap::Args)]
pub struct Args {
    /// Show progress on stderr (zero-filling new space of fixed images).
    #[arg(short = 'p', long = "progress")]
    pub progress: bool,
    /// Print the result as JSON.
    #[arg(long)]
    pub json: bool,
    /// The image to resize.
    pub file: PathBuf,
    /// New size (64G), or a change (+10G, -1G).
    #[arg(value_parser = parse_size_arg, allow_hyphen_values = true)]
    pub size: SizeArg,
}

/// What `resize --json` prints.
#[derive(Debug, Serialize)]
#[serde(rename_all = "kebab-case")]
pub struct Report {
    /// The image.
    pub filename: PathBuf,
    /// Virtual size before.
    pub old_size: u64,
    /// Virtual size after.
    pub new_size: u64,
}

/// Runs `resize`.
pub fn run(a: &Args) -> Result<u8> {
    let mut image = RwImage::open(&a.file, "resize")?;
    let old = image.virtual_size();
    let new = match a.size {
        SizeArg::Absolute(s) => s,
        SizeArg::Grow(d) => old
            .checked_add(d)
            .context("the new size overflows 64 bits")?,
        SizeArg::Shrink(d) => match old.checked_sub(d) {
            Some(s) if s > 0 => s,
            _ => bail!("cannot shrink {} bytes by {d} bytes", old),
        },
    };
    if new < old && image.is_differencing() {
        // The parent's data past the new end would vanish from the child's view too.
        let mut chain = open_own_view(&a.file)?;
        let (bytes, first) = nonzero_beyond(&mut chain, new)?;
        if let Some(first) = first {
            bail!(
                "{}: cannot shrink to {new} bytes: {bytes} bytes of data (from this image or its parents) lie beyond it, the first at offset {first}",
                a.file.display()
            );
        }
    }
    let mut progress = Progress::new(new.saturating_sub(old), a.progress);
    let mut tick = |n: u64| progress.inc(n);
    image.resize(new, &mut tick)?;
    image
        .close()
        .with_context(|| format!("cannot close {}", a.file.display()))?;
    progress.finish();
    if a.json {
        let r = Report {
            filename: a.file.clone(),
            old_size: old,
            new_size: new,
        };
        println!("{}", serde_json::to_string_pretty(&r)?);
    } else {
        println!(
            "{}: resized from {} ({old} bytes) to {} ({new} bytes)",
            a.file.display(),
            format_size(old),
            format_size(new)
        );
    }
    Ok(0)
}

/// Non-zero bytes of `disk` at or past `offset` (counted per 512-byte sector) and the first
/// one's offset. Ranges the map calls zero are not read.
fn nonzero_beyond(disk: &mut block_backend::Chain, offset: u64) -> Result<(u64, Option<u64>)> {
    let size = disk.size();
    let (mut bytes, mut first) = (0u64, None);
    let mut buf = block_backend::AlignedBuf::new(CHUNK as usize);
    let mut window = offset - offset % 512;
    while window < size {
        let wlen = (size - window).min(MAP_WINDOW);
        for e in disk.map(window, wlen)? {
            if e.zero && !e.data {
                continue;
            }
            let mut pos = e.offset;
            while pos < e.end() {
                let n = (e.end() - pos).min(CHUNK);
                let b = &mut buf[..n as usize];
                disk.read_at(b, pos)?;
                if !is_zero(b) {
                    for (i, s) in b.chunks(512).enumerate() {
                        if !is_zero(s) {
                            bytes += s.len() as u64;
                            first.get_or_insert(pos + i as u64 * 512);
                        }
                    }
                }
                pos += n;
            }
        }
        window += wlen;
    }
    Ok((bytes, first))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sizes_may_be_absolute_or_relative() {
        assert_eq!(parse_size_arg("10G"), Ok(SizeArg::Absolute(10 << 30)));
        assert_eq!(parse_size_arg("+1M"), Ok(SizeArg::Grow(1 << 20)));
        assert_eq!(parse_size_arg("-512"), Ok(SizeArg::Shrink(512)));
        assert!(parse_size_arg("+").is_err());
        assert!(parse_size_arg("-x").is_err());
    }
}
