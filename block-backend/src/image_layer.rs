//! Image layers: payload I/O on top of the format crates' range resolution, for VHD and VHDX
//! alike.
//!
//! The format crates say where bytes live and keep metadata correct; this module moves them:
//!
//! ```text
//!   read:  resolve_read(off, len) -> [Data{file_offset} | Zero | Parent]
//!            Data   -> pread from the image file (VHDX: through its log-replay overlay)
//!            Zero   -> fill zeros
//!            Parent -> the chain asks the next layer down
//!   write: resolve_write(off, len) -> plan (blocks allocated)
//!            pwrite each plan extent -> commit_write(plan)  (metadata durable at flush)
//! ```
//!
//! Invariants:
//! - Extents from a format crate are checked to tile the requested range before any byte is
//!   moved; a bad answer is an [`Error::Inconsistent`], never a panic or a wild write.
//! - Writes reaching this module are whole logical sectors (the chain does read-modify-write),
//!   so a sector marked present in a bitmap always holds fully defined bytes.

use std::os::unix::fs::FileExt;
use std::path::Path;

use uuid::Uuid;
use vhd::VhdImage;
use vhdx::VhdxImage;

use crate::disk::{LayerInfo, Subformat};
use crate::{Error, Format, Result};

/// VHD sector size: the unit of VHD sector bitmaps and offsets.
pub const SECTOR: u64 = 512;

/// Where a piece of a layer's range lives.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Source {
    /// In the layer's file at this offset.
    Data(u64),
    /// Reads as zeros.
    Zero,
    /// In the next layer down.
    Parent,
}

/// A resolved piece of a layer's range.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Extent {
    pub offset: u64,
    pub len: u64,
    pub source: Source,
}

/// `(virtual offset, length, file offset)` of a planned payload write.
pub(crate) type FileRange = (u64, u64, u64);

/// Metadata update that completes a planned write.
#[derive(Debug)]
pub(crate) enum Commit {
    /// VHD bitmaps.
    Vhd(vhd::WritePlan),
    /// VHDX sector bitmaps.
    Vhdx(vhdx::WritePlan),
}

/// What a differencing layer needs from its parent.
#[derive(Debug, Clone)]
pub(crate) struct ParentRef {
    /// Parent name as stored (for messages).
    pub name: String,
    /// Candidate paths, in resolution order.
    pub candidates: Vec<std::path::PathBuf>,
    /// Identities the parent may carry (VHD: footer UUID; VHDX: DataWriteGuid linkages).
    pub accepts: Vec<Uuid>,
    /// Format the parent must have.
    pub format: Format,
}

/// A VHD or VHDX image in a chain.
// The chain keeps layers boxed, so the size difference between the variants costs nothing.
#[allow(clippy::large_enum_variant)]
#[derive(Debug)]
pub enum Image {
    /// A VHD image.
    Vhd(VhdImage),
    /// A VHDX image.
    Vhdx(VhdxImage),
}

impl Image {
    /// Path of the image.
    pub fn path(&self) -> &Path {
        match self {
            Image::Vhd(v) => v.path(),
            Image::Vhdx(v) => v.path(),
        }
    }

    /// Virtual size.
    pub fn virtual_size(&self) -> u64 {
        match self {
            Image::Vhd(v) => v.virtual_size(),
            Image::Vhdx(v) => v.virtual_size(),
        }
    }

    /// Container format.
    pub fn format(&self) -> Format {
        match self {
            Image::Vhd(_) => Format::Vhd,
            Image::Vhdx(_) => Format::Vhdx,
        }
    }

    /// Smallest unit a write may cover without read-modify-write.
    pub(crate) fn sector_size(&self) -> u64 {
        match self {
            Image::Vhd(_) => SECTOR,
            Image::Vhdx(v) => v.logical_sector_size() as u64,
        }
    }

    /// Physical sector size the image advertises.
    pub(crate) fn physical_sector_size(&self) -> u32 {
        match self {
            Image::Vhd(_) => SECTOR as u32,
            Image::Vhdx(v) => v.physical_sector_size(),
        }
    }

    /// Identity a child's parent link refers to.
    pub(crate) fn identity(&self) -> Uuid {
        match self {
            Image::Vhd(v) => v.uuid(),
            Image::Vhdx(v) => v.header().data_write_guid,
        }
    }

    /// The parent this image needs, if it is a differencing image.
    pub(crate) fn parent_ref(&self) -> Option<ParentRef> {
        match self {
            Image::Vhd(v) => v.parent().map(|p| ParentRef {
                name: p.unicode_name.clone(),
                candidates: p.candidates.clone(),
                accepts: vec![p.uuid],
                format: Format::Vhd,
            }),
            Image::Vhdx(v) => v.parent().map(|p| ParentRef {
                name: p
                    .entries
                    .iter()
                    .find(|(k, _)| k == "relative_path" || k == "absolute_win32_path")
                    .map_or_else(String::new, |(_, v)| v.clone()),
                candidates: p.candidates.clone(),
                accepts: std::iter::once(p.linkage).chain(p.linkage2).collect(),
                format: Format::Vhdx,
            }),
        }
    }

    /// Resolves `[offset, offset + len)` and checks that the extents tile the range exactly.
    pub(crate) fn resolve_read(&mut self, offset: u64, len: u64) -> Result<Vec<Extent>> {
        let extents: Vec<Extent> = match self {
            Image::Vhd(v) => v
                .resolve_read(offset, len)?
                .into_iter()
                .map(|e| Extent {
                    offset: e.offset,
                    len: e.len,
                    source: match e.source {
                        vhd::ReadSource::Data { file_offset } => Source::Data(file_offset),
                        vhd::ReadSource::Zero => Source::Zero,
                        vhd::ReadSource::Parent => Source::Parent,
                    },
                })
                .collect(),
            Image::Vhdx(v) => v
                .resolve_read(offset, len)?
                .into_iter()
                .map(|e| Extent {
                    offset: e.offset,
                    len: e.len,
                    source: match e.source {
                        vhdx::ReadSource::Data { file_offset } => Source::Data(file_offset),
                        vhdx::ReadSource::Zero => Source::Zero,
                        vhdx::ReadSource::Parent => Source::Parent,
                    },
                })
                .collect(),
        };
        check_tiling(
            self.path(),
            "resolve_read",
            offset,
            len,
            extents.iter().map(|e| (e.offset, e.len)),
        )?;
        Ok(extents)
    }

    /// Reads payload bytes stored at `file_offset` of the image file.
    pub(crate) fn read_payload(&self, buf: &mut [u8], file_offset: u64) -> Result<()> {
        match self {
            Image::Vhd(v) => v
                .file()
                .read_exact_at(buf, file_offset)
                .map_err(|e| Error::io(v.path(), "read payload", file_offset, e)),
            Image::Vhdx(v) => Ok(v.read_file_at(buf, file_offset)?),
        }
    }

    /// Writes `buf` at virtual `offset` (whole sectors, inside the disk): allocate, write the
    /// payload to each planned file range, then commit the metadata.
    pub(crate) fn write(&mut self, buf: &[u8], offset: u64) -> Result<()> {
        let len = buf.len() as u64;
        let path = self.path().to_path_buf();
        let put = |file: &std::fs::File, ranges: &[(u64, u64, u64)]| -> Result<()> {
            check_tiling(
                &path,
                "resolve_write",
                offset,
                len,
                ranges.iter().map(|r| (r.0, r.1)),
            )?;
            for &(o, l, file_offset) in ranges {
                // In bounds: check_tiling proved offset <= o and o + l <= offset + len.
                let start = (o - offset) as usize;
                file.write_all_at(&buf[start..start + l as usize], file_offset)
                    .map_err(|err| Error::io(&path, "write payload", file_offset, err))?;
            }
            Ok(())
        };
        match self {
            Image::Vhd(v) => {
                let plan = v.resolve_write(offset, len)?;
                let ranges: Vec<_> = plan
                    .extents
                    .iter()
                    .map(|e| (e.offset, e.len, e.file_offset))
                    .collect();
                put(v.file(), &ranges)?;
                v.commit_write(plan)?;
            }
            Image::Vhdx(v) => {
                let plan = v.resolve_write(offset, len)?;
                let ranges: Vec<_> = plan
                    .extents
                    .iter()
                    .map(|e| (e.offset, e.len, e.file_offset))
                    .collect();
                put(v.file(), &ranges)?;
                v.commit_write(plan)?;
            }
        }
        Ok(())
    }

    /// Plans a whole-sector write of `len` bytes at `offset`: allocates, and returns the file
    /// ranges `(virtual offset, len, file offset)` for the payload and the commit to run once
    /// every payload write has completed.
    pub(crate) fn plan_write(&mut self, offset: u64, len: u64) -> Result<(Vec<FileRange>, Commit)> {
        let (ranges, commit): (Vec<_>, Commit) = match self {
            Image::Vhd(v) => {
                let plan = v.resolve_write(offset, len)?;
                (
                    plan.extents
                        .iter()
                        .map(|e| (e.offset, e.len, e.file_offset))
                        .collect(),
                    Commit::Vhd(plan),
                )
            }
            Image::Vhdx(v) => {
                let plan = v.resolve_write(offset, len)?;
                (
                    plan.extents
                        .iter()
                        .map(|e| (e.offset, e.len, e.file_offset))
                        .collect(),
                    Commit::Vhdx(plan),
                )
            }
        };
        check_tiling(
            self.path(),
            "resolve_write",
            offset,
            len,
            ranges.iter().map(|r| (r.0, r.1)),
        )?;
        Ok((ranges, commit))
    }

    /// Runs the commit of a planned write whose payload has been written.
    pub(crate) fn commit(&mut self, commit: Commit) -> Result<()> {
        match (self, commit) {
            (Image::Vhd(v), Commit::Vhd(plan)) => Ok(v.commit_write(plan)?),
            (Image::Vhdx(v), Commit::Vhdx(plan)) => Ok(v.commit_write(plan)?),
            (img, _) => Err(Error::Inconsistent {
                path: img.path().to_path_buf(),
                what: "commit of another format's write plan".into(),
            }),
        }
    }

    /// Whether payload reads must go through the format crate (a VHDX whose log was replayed
    /// in memory) rather than straight to the file.
    pub(crate) fn reads_need_overlay(&self) -> bool {
        match self {
            Image::Vhd(_) => false,
            Image::Vhdx(v) => v.replayed_log() && !v.is_writable(),
        }
    }

    /// The image file, for payload I/O.
    pub(crate) fn file(&self) -> &std::fs::File {
        match self {
            Image::Vhd(v) => v.file(),
            Image::Vhdx(v) => v.file(),
        }
    }

    /// Makes every completed write durable.
    pub(crate) fn flush(&mut self) -> Result<()> {
        match self {
            Image::Vhd(v) => Ok(v.flush()?),
            Image::Vhdx(v) => Ok(v.flush()?),
        }
    }

    /// Frees what the format can free; returns the ranges the caller must zero.
    pub(crate) fn discard(&mut self, offset: u64, len: u64) -> Result<Vec<(u64, u64)>> {
        match self {
            Image::Vhd(v) => Ok(v.discard(offset, len)?),
            Image::Vhdx(v) => Ok(v.discard(offset, len)?),
        }
    }

    /// Sets the write ordering policy.
    pub(crate) fn set_durability(&mut self, relaxed: bool) {
        match self {
            Image::Vhd(v) => v.set_durability(if relaxed {
                vhd::Durability::Relaxed
            } else {
                vhd::Durability::Durable
            }),
            Image::Vhdx(v) => v.set_durability(if relaxed {
                vhdx::Durability::Relaxed
            } else {
                vhdx::Durability::Durable
            }),
        }
    }

    /// Whether the image was opened for writing.
    pub fn is_writable(&self) -> bool {
        match self {
            Image::Vhd(v) => v.is_writable(),
            Image::Vhdx(v) => v.is_writable(),
        }
    }

    /// Describes the image for `info`.
    pub(crate) fn info(&self) -> LayerInfo {
        let parent = self.parent_ref();
        match self {
            Image::Vhd(v) => LayerInfo {
                path: v.path().to_path_buf(),
                format: Format::Vhd,
                subformat: Some(v.disk_type().into()),
                virtual_size: v.virtual_size(),
                block_size: v.block_size(),
                creator: Some(v.creator()),
                uuid: Some(v.uuid()),
                parent_uuid: parent.as_ref().map(|p| p.accepts[0]),
                parent_name: parent.map(|p| p.name),
            },
            Image::Vhdx(v) => LayerInfo {
                path: v.path().to_path_buf(),
                format: Format::Vhdx,
                subformat: Some(match v.subformat() {
                    "fixed" => Subformat::Fixed,
                    "differencing" => Subformat::Differencing,
                    _ => Subformat::Dynamic,
                }),
                virtual_size: v.virtual_size(),
                block_size: Some(v.block_size()),
                creator: Some(v.creator().to_string()),
                // The virtual disk id (page 83): stable, unlike DataWriteGuid, which changes
                // with every writing session and is what children link to.
                uuid: Some(v.params().page83),
                parent_uuid: parent.as_ref().map(|p| p.accepts[0]),
                parent_name: parent.map(|p| p.name),
            },
        }
    }
}

/// Checks that `(offset, len)` pairs are non-empty, in order, contiguous and cover exactly
/// `[offset, offset + len)`.
fn check_tiling(
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
