//! Merging a differencing VHDX into its parent (Merge-VHD): every sector the child holds (and
//! every block it marks ZERO) is written into the parent; the caller then deletes the child.
//!
//! ```text
//! 1. child:  parent_linkage2 = G (new GUID)              [child's log, synced]
//! 2. parent: DataWriteGuid   = G                          [header, synced]
//! 3. copy:   child Data runs -> parent writes; child ZERO blocks -> parent discard/zeros
//! 4. parent flushed (through its log)
//! ```
//!
//! Writing the parent changes its DataWriteGuid, which the child links to; steps 1-2 keep the
//! child linked at every moment: before step 2 the parent still carries the GUID of
//! `parent_linkage`, after it the one of `parent_linkage2`. A restarted merge finds
//! `parent_linkage2` equal to the parent's GUID and keeps it (no new rotation), so the chain
//! opens whenever the merge is interrupted.
//!
//! Invariants:
//! - Only sectors the child holds are written into the parent, so the child's view (child over
//!   parent) never changes; a rerun copies the same bytes again and completes.
//! - The parent must be the child's (linkage or linkage2 equals its DataWriteGuid) and have
//!   the same logical sector size; a smaller parent is grown first.
//! - Other children of the parent no longer link to it afterwards (its data changed), as in
//!   Hyper-V.

use crate::error::{Error, Result};
use crate::image::{io, ReadSource, VhdxImage};
use image_io::ImageFile;
use uuid::Uuid;

/// Copy unit.
const CHUNK: u64 = 4 << 20;

/// What [`merge_into`] did.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct MergeReport {
    /// Bytes of data copied into the parent.
    pub bytes_copied: u64,
    /// Bytes the parent was made to read as zeros (the child's ZERO blocks).
    pub bytes_zeroed: u64,
    /// Whether the parent was grown to the child's size first.
    pub parent_grown: bool,
    /// Whether an interrupted merge was resumed.
    pub resumed: bool,
}

/// Merges `child` (opened writable: its parent locator is updated) into `parent`; see the
/// [module docs](self).
pub fn merge_into<C: ImageFile, P: ImageFile>(
    child: &mut VhdxImage<C>,
    parent: &mut VhdxImage<P>,
    progress: &mut dyn FnMut(u64),
) -> Result<MergeReport> {
    let Some(link) = child.parent().cloned() else {
        return Err(Error::InvalidArgument(format!(
            "{} is not a differencing image: there is nothing to merge",
            child.path().display()
        )));
    };
    let pg = parent.header().data_write_guid;
    if !link.matches(pg) {
        return Err(Error::InvalidArgument(format!(
            "{} is not the parent of {}: its DataWriteGuid is {pg}, the child expects {}",
            parent.path().display(),
            child.path().display(),
            link.linkage
        )));
    }
    if parent.logical_sector_size() != child.logical_sector_size() {
        return Err(Error::InvalidArgument(format!(
            "{} has {}-byte sectors, its child {} {}-byte ones",
            parent.path().display(),
            parent.logical_sector_size(),
            child.path().display(),
            child.logical_sector_size()
        )));
    }
    let size = child.virtual_size();
    if parent.virtual_size() > size {
        return Err(Error::Unsupported {
            path: child.path().to_path_buf(),
            what: format!(
                "merging a child ({size} bytes) smaller than its parent ({} bytes)",
                parent.virtual_size()
            ),
        });
    }
    let mut report = MergeReport::default();
    if link.linkage2 == Some(pg) && link.linkage != pg {
        // Resumed: the child already links to the parent's merge-session GUID.
        parent.set_data_write_guid(pg)?;
        report.resumed = true;
    } else {
        let g = Uuid::new_v4();
        child.set_parent_linkage2(g)?;
        parent.set_data_write_guid(g)?;
    }
    if parent.virtual_size() < size {
        parent.resize(size, &mut |_| {})?;
        report.parent_grown = true;
    }
    let mut buf = vec![0u8; CHUNK as usize];
    let mut pos = 0;
    while pos < size {
        let len = (size - pos).min(CHUNK);
        for e in child.resolve_read(pos, len)? {
            match e.source {
                ReadSource::Parent => {}
                ReadSource::Data { file_offset } => {
                    let b = &mut buf[..e.len as usize];
                    child.read_file_at(b, file_offset)?;
                    write(parent, e.offset, b)?;
                    report.bytes_copied += e.len;
                }
                ReadSource::Zero => {
                    for (o, l) in parent.discard(e.offset, e.len)? {
                        let zeros = vec![0u8; l as usize];
                        write(parent, o, &zeros)?;
                    }
                    report.bytes_zeroed += e.len;
                }
            }
        }
        progress(len);
        pos += len;
    }
    parent.flush()?;
    Ok(report)
}

/// Writes whole sectors `data` at virtual `offset` of `img`.
fn write<F: ImageFile>(img: &mut VhdxImage<F>, offset: u64, data: &[u8]) -> Result<()> {
    let plan = img.resolve_write(offset, data.len() as u64)?;
    for x in &plan.extents {
        let at = (x.offset - offset) as usize;
        img.file()
            .write_all_at(&data[at..at + x.len as usize], x.file_offset)
            .map_err(io(img.path(), "write merged data", x.file_offset))?;
    }
    img.commit_write(plan)
}
