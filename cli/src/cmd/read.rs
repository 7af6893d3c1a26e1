//! `vhdtool read FILE --offset N --length L`: copy bytes of the virtual disk to stdout.
//!
//! Opens read-only; any offset and length inside the disk (no sector alignment needed). A
//! closed stdout (`| head`) ends the command quietly.

use std::io::Write;
use std::path::PathBuf;

use anyhow::{Context, Result};
use block_backend::{AlignedBuf, Disk};

use super::{open_read_only, CHUNK};
use crate::size::parse_size;

/// Arguments of `read`.
#[derive(Debug, clap::Args)]
pub struct Args {
    #[command(flatten)]
    pub share: super::ShareArgs,
    /// The image.
    pub file: PathBuf,
    /// First byte to read (suffixes and 0x hex accepted).
    #[arg(long, value_parser = parse_size)]
    pub offset: u64,
    /// Number of bytes to read.
    #[arg(long, value_parser = parse_size)]
    pub length: u64,
}

/// Runs `read`.
pub fn run(a: &Args) -> Result<u8> {
    let mut disk = open_read_only(&a.file, a.share)?;
    let end = a.offset.checked_add(a.length).filter(|&e| e <= disk.size());
    let Some(end) = end else {
        anyhow::bail!(
            "{}: range {}+{} is past the end of the disk ({} bytes)",
            a.file.display(),
            a.offset,
            a.length,
            disk.size()
        );
    };
    let mut out = std::io::stdout().lock();
    let mut buf = AlignedBuf::new(CHUNK.min(a.length) as usize);
    let mut pos = a.offset;
    while pos < end {
        let n = (end - pos).min(CHUNK) as usize;
        disk.read_at(&mut buf[..n], pos)?;
        if let Err(e) = out.write_all(&buf[..n]) {
            if e.kind() == std::io::ErrorKind::BrokenPipe {
                return Ok(0);
            }
            return Err(e).context("write to stdout");
        }
        pos += n as u64;
    }
    match out.flush() {
        Err(e) if e.kind() != std::io::ErrorKind::BrokenPipe => Err(e).context("write to stdout"),
        _ => Ok(0),
    }
}
