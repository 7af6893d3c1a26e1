//! Layers: one trait for every kind of storage a chain can stack, and the one place that
//! names the kinds.
//!
//! ```text
//!   open(location, mode)  ── the probe/open point: the only code that names a layer kind
//!     ├─ nbd:// nbds:// nbd+unix:// ──> nbd.rs   (NbdLayer: an export on an NBD server)
//!     ├─ local file, probed by content ─> raw.rs   (RawFile: the file's bytes are the disk)
//!     │                                 └> image.rs (Image: VHD/VHDX through the format crates)
//!     ├─ http:// https://…?sig=… ─────> blob.rs  (BlobLayer: a fixed VHD in an Azure page blob)
//!     └─ (more remote kinds: one more file here each)
//!
//!   Chain ──> Box<dyn Layer> ── resolve_read(off, len) -> [Data(at) | Zero | Hole(at) | Parent]
//!                             ├─ file() = Some(f): engines move payload at `at` of `f` themselves
//!                             └─ file() = None:    payload goes through read_payload / write
//! ```
//!
//! A layer says where bytes live and keeps its own metadata correct; the chain stacks layers
//! and the engines move payload. A layer may be local or remote, have a local file or not, and
//! be read-only: nothing above this module asks which.
//!
//! Invariants every implementation keeps:
//! - `resolve_read` and `map` answers tile the requested range exactly (the chain re-checks
//!   with `check_tiling` where an answer comes from outside this crate).
//! - A `Data(at)` extent of a layer whose [`Layer::file`] is `Some` may be read straight from
//!   that file at `at`; without a file (or when [`Layer::direct_reads`] is false) it is read
//!   with [`Layer::read_payload`].
//! - Writes reaching a layer are whole [`Layer::sector_size`] units inside the layer (the chain
//!   does read-modify-write at the edges). A layer opened read-only never writes anything.
//! - A write planned with [`Layer::plan_write`] is durable only after its payload landed at the
//!   planned file ranges and [`Layer::commit`] ran; `None` from `plan_write` means the layer
//!   takes writes only through [`Layer::write`] (write-through, e.g. a remote export).

mod blob;
mod image;
mod nbd;
mod raw;

pub use blob::{fixed_vhd_in_blob, shown_location, BlobLayer};
pub use image::{Image, SECTOR};
pub use nbd::NbdLayer;
pub use raw::RawFile;

use std::fs::File;
use std::path::{Path, PathBuf};

use image_io::format::{FormatImage, WritePlan};
use image_io::OpenMode;
use uuid::Uuid;

use crate::disk::LayerInfo;
use crate::{probe, Error, Format, Result};

/// Where a piece of a layer's range lives.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Source {
    /// Payload of this layer at this offset (of its file, or of the layer itself when it has
    /// no file).
    Data(u64),
    /// Reads as zeros; nothing stored.
    Zero,
    /// Reads as zeros; a hole in this layer's file at this offset (sparse raw files). Only
    /// [`Layer::map`] reports holes: reads may see them as `Data`.
    Hole(u64),
    /// In the next layer down.
    Parent,
}

/// A resolved piece of a layer's range.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Extent {
    /// Start on the virtual disk.
    pub offset: u64,
    /// Length in bytes.
    pub len: u64,
    /// Where it lives.
    pub source: Source,
}

/// `(virtual offset, length, file offset)` of a planned payload write.
pub type FileRange = (u64, u64, u64);

/// Metadata update that completes a planned write, run once every payload write completed.
pub type Commit = WritePlan;

/// A planned write: the file ranges to write the payload to, and the commit to run after
/// (none for layers whose payload needs no metadata, like a raw file).
pub type PlannedWrite = (Vec<FileRange>, Option<Commit>);

/// What a differencing layer needs from its parent.
#[derive(Debug, Clone)]
pub struct ParentRef {
    /// Parent name as stored (for messages).
    pub name: String,
    /// Candidate locations, in resolution order: file paths, or URIs of remote layers.
    pub candidates: Vec<PathBuf>,
    /// Identities the parent may carry (VHD: footer UUID; VHDX: DataWriteGuid linkages).
    pub accepts: Vec<Uuid>,
    /// Format the parent must have (the child's own).
    pub format: Format,
}

/// One layer of a chain: a raw file, a VHD/VHDX image, a remote export...
pub trait Layer: std::fmt::Debug + Send {
    /// Where the layer lives: the file path as opened, or a URI for a remote layer.
    fn path(&self) -> &Path;

    /// Size of the virtual disk this layer describes.
    fn size(&self) -> u64;

    /// Format of the disk this layer presents (a remote layer: the format of the image behind
    /// it when it says, raw otherwise).
    fn format(&self) -> Format;

    /// Description for `info`.
    fn info(&self) -> LayerInfo;

    /// Smallest unit a write may cover without read-modify-write; 1 when any byte range goes.
    fn sector_size(&self) -> u64;

    /// Physical sector size advertised, or 0 when the layer has no opinion.
    fn physical_sector_size(&self) -> u32 {
        0
    }

    /// Whether the layer was opened for writing.
    fn is_writable(&self) -> bool;

    /// Identity a child's parent link refers to, for layers that have one.
    fn identity(&self) -> Option<Uuid> {
        None
    }

    /// The parent this layer needs, if it is a differencing layer.
    fn parent_ref(&self) -> Option<ParentRef> {
        None
    }

    /// The local file holding this layer's payload at the offsets of its `Data` extents, for
    /// engines that move payload themselves; `None` when payload only goes through
    /// [`Layer::read_payload`] and [`Layer::write`].
    fn file(&self) -> Option<&File>;

    /// Whether `Data` extents may be read straight from [`Layer::file`] (false while the file
    /// alone is not the truth, e.g. a VHDX log replayed in memory).
    fn direct_reads(&self) -> bool {
        self.file().is_some()
    }

    /// Where `[offset, offset + len)` (inside the layer) lives, as extents tiling the range.
    fn resolve_read(&mut self, offset: u64, len: u64) -> Result<Vec<Extent>>;

    /// Like [`Layer::resolve_read`], for allocation maps: may be slower and finer (holes of
    /// sparse files, a remote layer's block status).
    fn map(&mut self, offset: u64, len: u64) -> Result<Vec<Extent>> {
        self.resolve_read(offset, len)
    }

    /// Reads the payload of a `Data(at)` extent into `buf`.
    fn read_payload(&mut self, buf: &mut [u8], at: u64) -> Result<()>;

    /// Plans a write of whole sectors `[offset, offset + len)`: allocates as needed and says
    /// where the payload goes. `None` when the layer takes writes only through
    /// [`Layer::write`].
    fn plan_write(&mut self, _offset: u64, _len: u64) -> Result<Option<PlannedWrite>> {
        Ok(None)
    }

    /// Runs the commit of a planned write whose payload has landed.
    fn commit(&mut self, _commit: Commit) -> Result<()> {
        Err(Error::Inconsistent {
            path: self.path().to_path_buf(),
            what: "commit on a layer that plans no commits".into(),
        })
    }

    /// Writes whole sectors `buf` at `offset`, for layers that plan no writes.
    fn write(&mut self, _buf: &[u8], offset: u64) -> Result<()> {
        Err(Error::Inconsistent {
            path: self.path().to_path_buf(),
            what: format!("write-through at {offset} on a layer that plans its writes"),
        })
    }

    /// Writes zeros over `[offset, offset + len)` if the layer has a cheaper way than writing
    /// zero buffers; `Ok(false)` when it has none (the chain then writes zeros).
    fn write_zeroes(&mut self, _offset: u64, _len: u64) -> Result<bool> {
        Ok(false)
    }

    /// Frees what the layer can free in `[offset, offset + len)`; returns the ranges the chain
    /// must still zero.
    fn discard(&mut self, offset: u64, len: u64) -> Result<Vec<(u64, u64)>>;

    /// Makes every completed write durable.
    fn flush(&mut self) -> Result<()>;

    /// Relaxes write ordering (no barriers until flush) for outputs nobody sees before the
    /// final flush; no effect where there is nothing to relax.
    fn set_relaxed_durability(&mut self, _relaxed: bool) {}

    /// The format crate's image, for layers that are VHD/VHDX images (editing verbs).
    fn format_image(&self) -> Option<&dyn FormatImage> {
        None
    }

    /// The format crate's image, owned, for layers that are VHD/VHDX images.
    fn into_format_image(self: Box<Self>) -> Option<Box<dyn FormatImage>> {
        None
    }
}

/// Opens and locks the layer at `location` for `mode`: the probe/open point, the only code
/// that names a layer kind. Local files are probed by content, never by name.
pub fn open(location: &Path, mode: OpenMode) -> Result<Box<dyn Layer>> {
    if let Some(uri) = nbd_uri(location) {
        return Ok(Box::new(NbdLayer::open(uri, mode)?));
    }
    if blob::is_blob_url(location) {
        let url = location.to_str().unwrap_or_default();
        return Ok(Box::new(BlobLayer::open(url, mode)?));
    }
    let file = image_io::lock::open(location, mode).map_err(|e| Error::from_open(location, e))?;
    let image = match probe::probe(&file, location)? {
        Format::Vhdx => Image::new(Box::new(vhdx::VhdxImage::open_file(file, location, mode)?)),
        Format::Vhd => Image::new(Box::new(vhd::VhdImage::open_file(file, location, mode)?)),
        Format::Raw => {
            let read_only = !mode.is_writable();
            return Ok(Box::new(RawFile::from_file(location, file, read_only)?));
        }
    };
    Ok(Box::new(image))
}

/// The URI, if `location` names an NBD export.
fn nbd_uri(location: &Path) -> Option<&str> {
    location.to_str().filter(|s| nbd_proto::Uri::is_nbd_uri(s))
}

/// Whether `location` names a remote layer (a URI) rather than a local file: such a location
/// has no file to stat, lock, create or rename.
pub fn is_remote(location: &Path) -> bool {
    nbd_uri(location).is_some() || blob::is_blob_url(location)
}

/// Canonical form of a location, for cycle detection: the resolved path of a local file, a
/// remote location as written.
pub(crate) fn canonical(location: &Path) -> Result<PathBuf> {
    if is_remote(location) {
        return Ok(location.to_path_buf());
    }
    std::fs::canonicalize(location).map_err(|e| Error::io(location, "resolve path", 0, e))
}

/// Whether a parent candidate names something [`open`] can open as a parent without
/// blocking: a remote location, or a regular file (a FIFO a hostile locator names would block
/// forever; devices and directories are never images).
pub(crate) fn parent_candidate_exists(candidate: &Path) -> bool {
    is_remote(candidate) || candidate.metadata().is_ok_and(|m| m.is_file())
}

/// Checks that `(offset, len)` pairs are non-empty, in order, contiguous and cover exactly
/// `[offset, offset + len)`.
pub(crate) fn check_tiling(
    path: &Path,
    what: &str,
    offset: u64,
    len: u64,
    extents: impl Iterator<Item = (u64, u64)>,
) -> Result<()> {
    let end = offset + len;
    let mut pos = offset;
    for (o, l) in extents {
        let e_end = o.checked_add(l);
        if o != pos || l == 0 || !matches!(e_end, Some(x) if x <= end) {
            return Err(Error::Inconsistent {
                path: path.to_path_buf(),
                what: format!(
                    "{what}({offset}, {len}) returned extent ({o}, {l}) where {pos} was expected"
                ),
            });
        }
        pos = o + l;
    }
    if pos != end {
        return Err(Error::Inconsistent {
            path: path.to_path_buf(),
            what: format!("{what}({offset}, {len}) covered only up to {pos}"),
        });
    }
    Ok(())
}
