//! Format detection by content, never by file name.
//!
//! ```text
//!   bytes 0..8 == "vhdxfile"            -> VHDX
//!   vhd::VhdImage::probe (footer cookie) -> VHD   (fixed VHDs only have the footer at the end)
//!   anything else                        -> raw
//! ```

use std::fs::File;
use std::io;
use std::os::unix::fs::FileExt;
use std::path::Path;

use crate::{Error, Format, Result};

/// The VHDX file identifier signature at offset 0.
const VHDX_MAGIC: &[u8; 8] = b"vhdxfile";

/// Detects the format of an open file. `path` is only used in error messages.
pub fn probe(file: &File, path: &Path) -> Result<Format> {
    let mut magic = [0u8; 8];
    let n = read_prefix(file, &mut magic).map_err(|e| Error::io(path, "probe", 0, e))?;
    if n == magic.len() && &magic == VHDX_MAGIC {
        return Ok(Format::Vhdx);
    }
    if vhd::VhdImage::probe(file).map_err(|e| Error::io(path, "probe VHD footer", 0, e))? {
        return Ok(Format::Vhd);
    }
    Ok(Format::Raw)
}

/// Opens `path` read-only and detects its format.
pub fn probe_path(path: &Path) -> Result<Format> {
    let file = File::open(path).map_err(|e| Error::io(path, "open", 0, e))?;
    probe(&file, path)
}

/// Reads as much of `buf` as the file holds from offset 0; returns the byte count.
fn read_prefix(file: &File, buf: &mut [u8]) -> io::Result<usize> {
    let mut done = 0;
    while done < buf.len() {
        match file.read_at(&mut buf[done..], done as u64) {
            Ok(0) => break,
            Ok(n) => done += n,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
    }
    Ok(done)
}
