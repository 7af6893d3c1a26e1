//! What the in-place editing verbs (`compact`, `resize`, `merge`, `rebase`) share: opening one
//! image file writable with its format crate, and the read-only view of a differencing image's
//! parent chain.
//!
//! Invariants: only the named file is ever opened writable; parents are opened read-only
//! through the block backend, which checks their identity.

use std::path::{Path, PathBuf};

use anyhow::{bail, Context, Result};
use block_backend::{Chain, Disk, OpenOptions};
use image_io::format::FormatImage;

/// One image opened writable, whatever its format (the shared format interface).
pub struct RwImage(Box<dyn FormatImage>);

impl RwImage {
    /// Opens `path` writable (format by content). Raw files are refused: they have no
    /// structure to edit.
    pub fn open(path: &Path, verb: &str) -> Result<RwImage> {
        let layer = block_backend::open_layer(path, vhd::OpenMode::ReadWrite)
            .with_context(|| format!("cannot open {}", path.display()))?;
        let format = layer.format();
        match layer.into_format_image() {
            Some(image) => Ok(RwImage(image)),
            None => bail!(
                "{}: a {format} disk has no VHD/VHDX structure to {verb}",
                path.display()
            ),
        }
    }

    /// Whether the image is a differencing image.
    pub fn is_differencing(&self) -> bool {
        self.0.parent_ref().is_some()
    }

    /// Flushes and closes (a VHDX's log GUID is cleared).
    pub fn close(self) -> Result<()> {
        Ok(self.0.close()?)
    }
}

impl std::ops::Deref for RwImage {
    type Target = dyn FormatImage;
    fn deref(&self) -> &Self::Target {
        &*self.0
    }
}

impl std::ops::DerefMut for RwImage {
    fn deref_mut(&mut self) -> &mut Self::Target {
        &mut *self.0
    }
}

/// Path of the parent of the differencing image at `child`, as the block backend finds and
/// verifies it. The chain is looked at without locks (the caller may hold `child` open for
/// writing already, and locks the files it then uses itself).
pub fn parent_path(child: &Path) -> Result<PathBuf> {
    let chain = block_backend::open(child, OpenOptions::read_only_force_share())
        .with_context(|| format!("cannot open the chain of {}", child.display()))?;
    match chain.stack().get(1) {
        Some(p) => Ok(p.path().to_path_buf()),
        None => bail!("{} is not a differencing image", child.display()),
    }
}

/// The parent's view of a differencing image at `child`, opened read-only.
pub fn parent_chain(child: &Path) -> Result<Chain> {
    let p = parent_path(child)?;
    block_backend::open(&p, OpenOptions::read_only())
        .with_context(|| format!("cannot open parent {}", p.display()))
}

/// Reads `buf.len()` bytes at `offset` of `disk`, zeros past its end (a parent smaller than
/// its child reads as zeros beyond its size).
pub fn read_or_zero(disk: &mut Chain, offset: u64, buf: &mut [u8]) -> std::io::Result<()> {
    let size = disk.size();
    let avail = size.saturating_sub(offset).min(buf.len() as u64) as usize;
    buf[avail..].fill(0);
    if avail > 0 {
        disk.read_at(&mut buf[..avail], offset)
            .map_err(std::io::Error::other)?;
    }
    Ok(())
}
