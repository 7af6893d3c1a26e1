//! `vhdtool write FILE --offset N --input F|-`: copy a file (or stdin) into the virtual disk.
//!
//! Any byte offset and length (the Disk does read-modify-write of partial sectors). A regular
//! input file that would not fit is refused before anything is written; a stream (stdin) is
//! written as it arrives and fails at the end of the disk. Flushed before exit.

use std::fs::File;
use std::io::Read;
use std::path::PathBuf;

use anyhow::{bail, Context, Result};
use block_backend::{AlignedBuf, Disk, OpenOptions};

use super::CHUNK;
use crate::size::parse_size;

/// Arguments of `write`.
#[derive(Debug, clap::Args)]
pub struct Args {
    /// The image.
    pub file: PathBuf,
    /// Where the first byte goes (suffixes and 0x hex accepted).
    #[arg(long, value_parser = parse_size)]
    pub offset: u64,
    /// The data: a file, or - for stdin.
    #[arg(long)]
    pub input: PathBuf,
}

/// Runs `write`.
pub fn run(a: &Args) -> Result<u8> {
    let mut disk = block_backend::open(&a.file, OpenOptions::read_write())?;
    let size = disk.size();
    if a.offset > size {
        bail!(
            "offset {} is past the end of {} ({size} bytes)",
            a.offset,
            a.file.display()
        );
    }
    let mut input: Box<dyn Read> = if a.input.as_os_str() == "-" {
        Box::new(std::io::stdin().lock())
    } else {
        let f = File::open(&a.input)
            .with_context(|| format!("cannot open input {}", a.input.display()))?;
        let meta = f
            .metadata()
            .with_context(|| format!("stat {}", a.input.display()))?;
        let fits = matches!(a.offset.checked_add(meta.len()), Some(end) if end <= size);
        if meta.is_file() && !fits {
            bail!(
                "{} ({} bytes) does not fit at offset {} of {} ({size} bytes)",
                a.input.display(),
                meta.len(),
                a.offset,
                a.file.display()
            );
        }
        Box::new(f)
    };
    let mut buf = AlignedBuf::new(CHUNK as usize);
    let mut pos = a.offset;
    loop {
        let n = read_full(&mut input, &mut buf).context("read input")?;
        if n == 0 {
            break;
        }
        disk.write_at(&buf[..n], pos)?;
        pos += n as u64;
    }
    disk.flush()?;
    Ok(0)
}

/// Fills `buf` as far as the input allows; returns the byte count (0 at end of input).
fn read_full(r: &mut dyn Read, buf: &mut [u8]) -> std::io::Result<usize> {
    let mut n = 0;
    while n < buf.len() {
        match r.read(&mut buf[n..]) {
            Ok(0) => break,
            Ok(k) => n += k,
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
    }
    Ok(n)
}
