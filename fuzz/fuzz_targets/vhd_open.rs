//! Fuzz `vhd::VhdImage::open` (read-only), `resolve_read` over the first MiB, and `vhd::check`
//! on arbitrary file contents. Any panic, hang or unbounded allocation is a bug: untrusted
//! images must give typed errors.
#![no_main]

use libfuzzer_sys::fuzz_target;
use std::path::PathBuf;
use std::sync::OnceLock;

/// One scratch file per fuzzing process, overwritten with each input.
fn scratch_path() -> &'static PathBuf {
    static PATH: OnceLock<PathBuf> = OnceLock::new();
    PATH.get_or_init(|| {
        std::env::temp_dir().join(format!("vhdkit-fuzz-vhd_open-{}.vhd", std::process::id()))
    })
}

fuzz_target!(|data: &[u8]| {
    let path = scratch_path();
    std::fs::write(path, data).expect("write the fuzz input to a scratch file");

    if let Ok(mut image) = vhd::VhdImage::open(path, vhd::OpenMode::ReadOnly) {
        let len = image.virtual_size().min(1 << 20);
        if let Ok(extents) = image.resolve_read(0, len) {
            // Contract: extents are contiguous, in order, and cover the range.
            let mut next = 0u64;
            for extent in &extents {
                assert_eq!(extent.offset, next, "extents not contiguous: {extents:?}");
                next += extent.len;
            }
            assert_eq!(next, len, "extents do not cover [0, {len})");
        }
    }
    let _ = vhd::check(path);
});
