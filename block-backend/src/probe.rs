//! Format detection by content, never by file name.
//!
//! ```text
//!   bytes 0..8 == "vhdxfile"            -> VHDX
//!   "head" at 64/128 KiB and "regi" at 192/256 KiB -> VHDX (damaged identifier: fails to open)
//!   vhd::VhdImage::probe (footer cookie) -> VHD   (fixed VHDs only have the footer at the end)
//!   anything else                        -> raw
//! ```

use std::fs::File;
use std::io;
use std::os::unix::fs::FileExt;
use std::path::Path;

use crate::{Disk, Error, Format, Result};

/// The VHDX file identifier signature at offset 0.
const VHDX_MAGIC: &[u8; 8] = b"vhdxfile";

/// Detects the format of an open file. `path` is only used in error messages.
pub fn probe(file: &File, path: &Path) -> Result<Format> {
    let mut magic = [0u8; 8];
    let n = read_prefix(file, &mut magic).map_err(|e| Error::io(path, "probe", 0, e))?;
    if n == magic.len() && &magic == VHDX_MAGIC || damaged_vhdx(file) {
        return Ok(Format::Vhdx);
    }
    if vhd::VhdImage::probe(file).map_err(|e| Error::io(path, "probe VHD footer", 0, e))? {
        return Ok(Format::Vhd);
    }
    Ok(Format::Raw)
}

/// A VHDX whose file identifier is damaged but whose header and region table signatures are in
/// place: it must fail to open as a VHDX (naming the identifier), not read as a raw disk.
fn damaged_vhdx(file: &File) -> bool {
    let sig_at = |at: u64, want: &[u8; 4]| {
        let mut b = [0u8; 4];
        file.read_exact_at(&mut b, at).is_ok() && &b == want
    };
    (sig_at(64 << 10, b"head") || sig_at(128 << 10, b"head"))
        && (sig_at(192 << 10, b"regi") || sig_at(256 << 10, b"regi"))
}

/// Opens `path` read-only and detects its format.
pub fn probe_path(path: &Path) -> Result<Format> {
    let file = File::open(path).map_err(|e| Error::io(path, "open", 0, e))?;
    probe(&file, path)
}

/// The file extension of a differencing child of `parent` (Hyper-V's names): `avhdx` under
/// a VHDX, `vhd` under a VHD. A raw image cannot have a child.
pub fn child_extension(parent: &Path) -> Result<&'static str> {
    match probe_path(parent)? {
        Format::Vhdx => Ok("avhdx"),
        Format::Vhd => Ok("vhd"),
        Format::Raw => Err(Error::Unsupported {
            path: parent.to_path_buf(),
            what: "a raw image cannot have a differencing child (convert it to VHD or VHDX)".into(),
        }),
    }
}

/// Creates a differencing image at `child` (which must not exist) over `parent`, in the
/// parent's format and with its size and sector sizes. The parent is only read.
pub fn create_child(parent: &Path, child: &Path) -> Result<()> {
    let chain = crate::open(parent, crate::OpenOptions::read_only())?;
    let (size, logical, physical) = (
        chain.size(),
        chain.logical_sector_size(),
        chain.physical_sector_size(),
    );
    drop(chain);
    match child_extension(parent)? {
        "avhdx" => {
            let opts = vhdx::CreateOptions {
                size,
                logical_sector_size: logical,
                physical_sector_size: physical,
                parent: Some(parent.to_path_buf()),
                ..vhdx::CreateOptions::default()
            };
            vhdx::VhdxImage::create(child, &opts)?.close()?;
        }
        _ => {
            let opts = vhd::CreateOptions {
                size,
                parent: Some(parent.to_path_buf()),
                ..vhd::CreateOptions::default()
            };
            drop(vhd::VhdImage::create(child, &opts)?);
        }
    }
    Ok(())
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
