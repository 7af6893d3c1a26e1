//! Merging a differencing image into its parent (Merge-VHD): every sector the child holds is
//! written into the parent, so the parent ends up reading as the child did. The caller then
//! deletes the child.
//!
//! ```text
//!   child  (read only) : resolve_read -> Data runs ──copy──> parent.resolve_write / commit
//!   parent (writable)  : grown first if the child is larger; flushed at the end
//! ```
//!
//! Invariants:
//! - The child is never written. Every sector copied into the parent is one the child holds,
//!   so the child's view (child over parent) is the same at every step: an interrupted merge
//!   leaves a valid chain with unchanged content, and running the merge again finishes it
//!   (copying a sector twice writes the same bytes).
//! - The parent must be the child's: its footer UUID equals the child's parent UUID (a VHD
//!   parent keeps its UUID when written, so a restarted merge still finds it).
//! - Writes are whole 512-byte sectors (the child's bitmap granularity), so a differencing
//!   parent needs nothing from its own parent.

use crate::error::{Error, Result};
use crate::image::{ReadSource, VhdImage};
use crate::layout::read_at;
use image_io::ImageFile;

/// Copy unit.
const CHUNK: u64 = 4 << 20;

/// What [`merge_into`] did.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct MergeReport {
    /// Bytes copied from the child into the parent.
    pub bytes_copied: u64,
    /// Whether the parent was grown to the child's size first.
    pub parent_grown: bool,
}

/// Writes every sector `child` holds into `parent` and flushes the parent; see the
/// [module docs](self). `progress` is called with bytes of the child's virtual disk examined.
pub fn merge_into<C: ImageFile, P: ImageFile>(
    child: &mut VhdImage<C>,
    parent: &mut VhdImage<P>,
    progress: &mut dyn FnMut(u64),
) -> Result<MergeReport> {
    let Some(link) = child.parent() else {
        return Err(Error::InvalidArgument(format!(
            "{} is not a differencing image: there is nothing to merge",
            child.path().display()
        )));
    };
    if link.uuid != parent.uuid() {
        return Err(Error::InvalidArgument(format!(
            "{} is not the parent of {}: its UUID is {}, the child expects {}",
            parent.path().display(),
            child.path().display(),
            parent.uuid(),
            link.uuid
        )));
    }
    let mut report = MergeReport::default();
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
    if parent.virtual_size() < size {
        parent.resize(size, &mut |_| {})?;
        report.parent_grown = true;
    }
    let mut buf = vec![0u8; CHUNK as usize];
    let mut pos = 0;
    while pos < size {
        let len = (size - pos).min(CHUNK);
        for e in child.resolve_read(pos, len)? {
            let ReadSource::Data { file_offset } = e.source else {
                continue;
            };
            let b = &mut buf[..e.len as usize];
            read_at(
                child.file(),
                child.path(),
                b,
                file_offset,
                "read child data",
            )?;
            let plan = parent.resolve_write(e.offset, e.len)?;
            for x in &plan.extents {
                let at = (x.offset - e.offset) as usize;
                parent
                    .file()
                    .write_all_at(&b[at..at + x.len as usize], x.file_offset)
                    .map_err(|source| Error::Io {
                        path: parent.path().to_path_buf(),
                        op: "write merged data",
                        offset: x.file_offset,
                        source,
                    })?;
            }
            parent.commit_write(plan)?;
            report.bytes_copied += e.len;
        }
        progress(len);
        pos += len;
    }
    parent.flush()?;
    Ok(report)
}
