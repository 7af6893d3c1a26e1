//! Fuzz `vhdx::VhdxImage::open_file` (read-only, in memory: a pending log is replayed into the
//! overlay), `resolve_read` over the first MiB with payload reads, and the checker. Untrusted
//! images must give typed errors: no panic, hang or unbounded allocation.
#![no_main]

use image_io::CrashFile;
use libfuzzer_sys::fuzz_target;
use std::path::Path;

fuzz_target!(|data: &[u8]| {
    let file = CrashFile::from_bytes(data.to_vec());
    let path = Path::new("fuzz.vhdx");
    let Ok(mut image) = vhdx::VhdxImage::open_file(file, path, vhdx::OpenMode::ReadOnly) else {
        return;
    };
    let len = image.virtual_size().min(1 << 20);
    if let Ok(extents) = image.resolve_read(0, len) {
        let mut next = 0u64;
        for extent in &extents {
            assert_eq!(extent.offset, next, "extents not contiguous: {extents:?}");
            next += extent.len;
            if let vhdx::ReadSource::Data { file_offset } = extent.source {
                let mut buf = vec![0u8; extent.len.min(1 << 20) as usize];
                let _ = image.read_file_at(&mut buf, file_offset);
            }
        }
        assert_eq!(next, len, "extents do not cover [0, {len})");
    }
    let _ = vhdx::check::check_image(&image);
});
