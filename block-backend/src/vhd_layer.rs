//! VHD layer: payload I/O on top of the `vhd` crate's range resolution.
//!
//! The `vhd` crate says where bytes live and keeps metadata correct; this module moves them:
//!
//! ```text
//!   read:  resolve_read(off, len) -> [Data{file_offset} | Zero | Parent]
//!            Data   -> pread(image.file(), file_offset)
//!            Zero   -> fill zeros
//!            Parent -> the chain asks the next layer down
//!   write: resolve_write(off, len) -> plan (blocks allocated)
//!            pwrite each plan extent -> commit_write(plan)  (bitmaps/BAT, durable at flush)
//! ```
//!
//! Invariants:
//! - Extents from the format crate are checked to tile the requested range before any byte is
//!   moved; a bad answer is an [`Error::Inconsistent`], never a panic or a wild write.
//! - Writes reaching this module are whole sectors (the chain does read-modify-write), so a
//!   sector marked present in a bitmap always holds fully defined bytes.

use std::os::unix::fs::FileExt;

use vhd::{ReadExtent, VhdImage};

use crate::disk::LayerInfo;
use crate::{Error, Format, Result};

/// VHD sector size: the unit of sector bitmaps and of every VHD offset.
pub const SECTOR: u64 = 512;

/// Resolves `[offset, offset + len)` and checks that the extents tile the range exactly.
pub(crate) fn resolve_read(image: &mut VhdImage, offset: u64, len: u64) -> Result<Vec<ReadExtent>> {
    let extents = image.resolve_read(offset, len)?;
    check_tiling(
        image,
        "resolve_read",
        offset,
        len,
        extents.iter().map(|e| (e.offset, e.len)),
    )?;
    Ok(extents)
}

/// Reads payload bytes stored at `file_offset` of the image file.
pub(crate) fn read_payload(image: &VhdImage, buf: &mut [u8], file_offset: u64) -> Result<()> {
    image
        .file()
        .read_exact_at(buf, file_offset)
        .map_err(|e| Error::io(image.path(), "read payload", file_offset, e))
}

/// Writes `buf` at virtual `offset` (sector aligned, inside the disk): allocate, write the payload
/// to each planned file range, then commit the metadata.
pub(crate) fn write(image: &mut VhdImage, buf: &[u8], offset: u64) -> Result<()> {
    let len = buf.len() as u64;
    let plan = image.resolve_write(offset, len)?;
    check_tiling(
        image,
        "resolve_write",
        offset,
        len,
        plan.extents.iter().map(|e| (e.offset, e.len)),
    )?;
    for e in &plan.extents {
        // In bounds: check_tiling proved offset <= e.offset and e.offset + e.len <= offset + len.
        let start = (e.offset - offset) as usize;
        let chunk = &buf[start..start + e.len as usize];
        image
            .file()
            .write_all_at(chunk, e.file_offset)
            .map_err(|err| Error::io(image.path(), "write payload", e.file_offset, err))?;
    }
    image.commit_write(plan)?;
    Ok(())
}

/// Describes the image for `info`.
pub(crate) fn info(image: &VhdImage) -> LayerInfo {
    let parent = image.parent();
    LayerInfo {
        path: image.path().to_path_buf(),
        format: Format::Vhd,
        subformat: Some(image.disk_type().into()),
        virtual_size: image.virtual_size(),
        block_size: image.block_size(),
        creator: Some(image.creator()),
        uuid: Some(image.uuid()),
        parent_uuid: parent.map(|p| p.uuid),
        parent_name: parent.map(|p| p.unicode_name.clone()),
    }
}

/// Checks that `(offset, len)` pairs are non-empty, in order, contiguous and cover exactly
/// `[offset, offset + len)`.
fn check_tiling(
    image: &VhdImage,
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
                path: image.path().to_path_buf(),
                what: format!(
                    "{what}({offset}, {len}) returned extent ({o}, {l}) where {pos} was expected"
                ),
            });
        }
        pos = o + l;
    }
    if pos != end {
        return Err(Error::Inconsistent {
            path: image.path().to_path_buf(),
            what: format!("{what}({offset}, {len}) covered only up to {pos}"),
        });
    }
    Ok(())
}
