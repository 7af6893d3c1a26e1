//! Shared helpers: read and write virtual ranges through the resolve API, one layer.

#![allow(dead_code)]

use image_io::ImageFile;
pub use vhdkit_tests::pattern_at as pattern;
use vhdx::{ReadSource, VhdxImage};

/// Reads `len` bytes at `offset`; `Parent` extents read as 0xEE.
pub fn read<F: ImageFile>(img: &mut VhdxImage<F>, offset: u64, len: usize) -> Vec<u8> {
    let mut out = vec![0u8; len];
    for e in img.resolve_read(offset, len as u64).unwrap() {
        let at = (e.offset - offset) as usize;
        let dst = &mut out[at..at + e.len as usize];
        match e.source {
            ReadSource::Data { file_offset } => img.read_file_at(dst, file_offset).unwrap(),
            ReadSource::Zero => dst.fill(0),
            ReadSource::Parent => dst.fill(0xEE),
        }
    }
    out
}

/// Writes `data` at `offset` (whole logical sectors for differencing images).
pub fn write<F: ImageFile>(img: &mut VhdxImage<F>, offset: u64, data: &[u8]) {
    let plan = img.resolve_write(offset, data.len() as u64).unwrap();
    for e in &plan.extents {
        let at = (e.offset - offset) as usize;
        img.file()
            .write_all_at(&data[at..at + e.len as usize], e.file_offset)
            .unwrap();
    }
    img.commit_write(plan).unwrap();
}
