//! `vhdtool map [--json] FILE`: where each range of the virtual disk is stored, like
//! `qemu-img map`.
//!
//! Text: one row per stored run (offset, length, offset in the file, file). JSON: every run,
//! including zero ones, as `{start, length, depth, present, zero, data, offset, file}` objects.
//! The disk is mapped in windows so memory stays bounded on huge disks; runs continuing across a
//! window edge are merged.

use std::io::Write;
use std::path::PathBuf;

use anyhow::{Context, Result};
use block_backend::{Disk, MapExtent};
use serde::Serialize;

use super::{open_read_only, MAP_WINDOW};

/// Arguments of `map`.
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

/// One run in `map --json` output.
#[derive(Debug, Serialize)]
pub struct JsonExtent {
    /// Start on the virtual disk.
    pub start: u64,
    /// Length in bytes.
    pub length: u64,
    /// Layer supplying the run (0 = top).
    pub depth: u32,
    /// Stored in some layer.
    pub present: bool,
    /// Reads as zeros.
    pub zero: bool,
    /// Stored as data in a file.
    pub data: bool,
    /// Offset in `file`.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub offset: Option<u64>,
    /// The file holding the run.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub file: Option<PathBuf>,
}

impl From<&MapExtent> for JsonExtent {
    fn from(e: &MapExtent) -> Self {
        JsonExtent {
            start: e.offset,
            length: e.length,
            depth: e.depth,
            present: e.data,
            zero: e.zero,
            data: e.data,
            offset: e.file_offset,
            file: e.file.clone(),
        }
    }
}

/// Runs `map`.
pub fn run(a: &Args) -> Result<u8> {
    let mut disk = open_read_only(&a.file, a.share)?;
    let size = disk.size();
    let mut out = std::io::stdout().lock();
    let mut printer = Printer {
        json: a.json,
        first: true,
    };
    printer.begin(&mut out)?;
    let mut pending: Option<MapExtent> = None;
    let mut window = 0;
    while window < size {
        let wlen = (size - window).min(MAP_WINDOW);
        for e in disk.map(window, wlen)? {
            match &mut pending {
                Some(p) if p.continues_with(&e) => p.length += e.length,
                _ => {
                    if let Some(p) = pending.replace(e) {
                        printer.extent(&mut out, &p)?;
                    }
                }
            }
        }
        window += wlen;
    }
    if let Some(p) = pending {
        printer.extent(&mut out, &p)?;
    }
    printer.end(&mut out)?;
    out.flush().context("write to stdout")?;
    Ok(0)
}

/// Streams extents in the chosen format.
struct Printer {
    json: bool,
    first: bool,
}

impl Printer {
    fn begin(&mut self, out: &mut dyn Write) -> Result<()> {
        if self.json {
            write!(out, "[")?;
        } else {
            writeln!(
                out,
                "{:<16}{:<16}{:<16}File",
                "Offset", "Length", "Mapped to"
            )?;
        }
        Ok(())
    }

    fn extent(&mut self, out: &mut dyn Write, e: &MapExtent) -> Result<()> {
        if self.json {
            if !self.first {
                writeln!(out, ",")?;
            }
            self.first = false;
            write!(out, "{}", serde_json::to_string(&JsonExtent::from(e))?)?;
        } else if let (true, Some(off), Some(file)) = (e.data, e.file_offset, &e.file) {
            writeln!(
                out,
                "{:<16}{:<16}{:<16}{}",
                format!("{:#x}", e.offset),
                format!("{:#x}", e.length),
                format!("{off:#x}"),
                file.display()
            )?;
        }
        Ok(())
    }

    fn end(&mut self, out: &mut dyn Write) -> Result<()> {
        if self.json {
            writeln!(out, "]")?;
        }
        Ok(())
    }
}
