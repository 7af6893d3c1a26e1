//! Shared helpers for the vhd integration tests: read and write virtual ranges through the
//! resolve API the way the block backend does, one layer only.

#![allow(dead_code)]

use std::os::unix::fs::FileExt;
use vhd::{ReadSource, VhdImage};

/// Reads `len` bytes at `offset`; `Parent` extents read as `parent_fill`.
pub fn read(img: &mut VhdImage, offset: u64, len: usize) -> Vec<u8> {
    let mut out = vec![0u8; len];
    for e in img.resolve_read(offset, len as u64).unwrap() {
        let at = (e.offset - offset) as usize;
        let dst = &mut out[at..at + e.len as usize];
        match e.source {
            ReadSource::Data { file_offset } => img.file().read_exact_at(dst, file_offset).unwrap(),
            ReadSource::Zero => dst.fill(0),
            ReadSource::Parent => dst.fill(0xEE),
        }
    }
    out
}

/// Writes `data` at `offset` (sector-aligned for differencing images).
pub fn write(img: &mut VhdImage, offset: u64, data: &[u8]) {
    let plan = img.resolve_write(offset, data.len() as u64).unwrap();
    for e in &plan.extents {
        let at = (e.offset - offset) as usize;
        img.file()
            .write_all_at(&data[at..at + e.len as usize], e.file_offset)
            .unwrap();
    }
    img.commit_write(plan).unwrap();
}

/// A fresh scratch directory.
pub fn scratch() -> std::path::PathBuf {
    vhdkit_tests::fresh_scratch_dir()
}
