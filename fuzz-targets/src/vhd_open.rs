//! `vhd_open`: arbitrary bytes (raw, or [`crate::sparse`]-encoded) as a VHD file.

use crate::bounded::BoundedFile;
use crate::input::pattern;
use crate::sparse;
use image_io::ImageFile;
use std::path::Path;
use vhd::{DiskType, OpenMode, ReadSource, VhdImage};

/// Up to three ranges of a disk of `size` bytes: the start, the middle and the end, 256 KiB
/// each.
pub(crate) fn sample_ranges(size: u64) -> Vec<(u64, u64)> {
    let n = size.min(256 << 10);
    let mut v = vec![(0, n)];
    if size > 2 * n {
        v.push(((size / 2) & !511, n.min(size - ((size / 2) & !511))));
    }
    if size > n {
        v.push((size - n, n));
    }
    v
}

/// Opens `data` read-only, resolves and reads sample ranges, checks it; then, when it opened
/// clean, writes a sector at each end through a writable open and reads them back.
///
/// Oracles: open succeeds exactly when check finds no corruption; a read-only open, its reads
/// and the check never write; a clean image resolves every range into extents that tile it,
/// whose data lies inside the file; written sectors read back, also after reopening, and the
/// image stays free of corruption.
pub fn vhd_open(data: &[u8]) {
    let bytes = sparse::decode(data);
    let path = Path::new("fuzz.vhd");
    let file = BoundedFile::read_only(bytes);
    let report = vhd::check_file(&file, path);
    let opened = VhdImage::open_file(file.clone(), path, OpenMode::ReadOnly);
    let clean = matches!(&report, Ok(r) if r.corruptions.is_empty());
    assert_eq!(
        opened.is_ok(),
        clean,
        "open and check disagree: open {:?}, check {report:?}",
        opened.as_ref().err()
    );
    let Ok(mut img) = opened else {
        assert_eq!(file.write_count(), 0, "a failed read-only open wrote");
        return;
    };
    let _ = (
        img.creator(),
        img.uuid(),
        img.header(),
        img.allocated_blocks(),
    );
    let size = img.virtual_size();
    for (offset, len) in sample_ranges(size) {
        let extents = img
            .resolve_read(offset, len)
            .unwrap_or_else(|e| panic!("clean image cannot resolve {offset}+{len}: {e}"));
        let mut next = offset;
        for e in &extents {
            assert_eq!(e.offset, next, "extents do not tile the range: {extents:?}");
            assert!(e.len > 0, "empty extent: {extents:?}");
            next += e.len;
            if img.disk_type() != DiskType::Differencing {
                assert_ne!(
                    e.source,
                    ReadSource::Parent,
                    "parent extent without a parent"
                );
            }
            if let ReadSource::Data { file_offset } = e.source {
                let mut buf = vec![0u8; e.len as usize];
                img.file()
                    .read_exact_at(&mut buf, file_offset)
                    .unwrap_or_else(|err| {
                        panic!("data extent {e:?} lies outside the file ({err})")
                    });
            }
        }
        assert_eq!(
            next,
            offset + len,
            "extents do not cover the range: {extents:?}"
        );
    }
    drop(img);
    assert_eq!(
        file.write_count(),
        0,
        "read-only open, reads or check wrote"
    );
    write_back(file.contents(), size);
}

/// Writes the first and last sector through a writable open and checks they read back.
fn write_back(data: Vec<u8>, size: u64) {
    if size < 512 {
        return;
    }
    let path = Path::new("fuzz.vhd");
    let limit = data.len() as u64 + (64 << 20);
    let file = BoundedFile::new(data, limit, 64 << 20);
    let Ok(mut img) = VhdImage::open_file(file.clone(), path, OpenMode::ReadWrite) else {
        panic!("opens read-only but not read-write");
    };
    if img.block_size().is_some_and(|b| b > 2 << 20) {
        return; // each allocation would add a large block to the in-memory file
    }
    let spots = [0, (size - 512) & !511];
    let mut written = Vec::new();
    for (i, &at) in spots.iter().enumerate() {
        let bytes = pattern(at ^ i as u64, 512);
        let plan = match img.resolve_write(at, 512) {
            Ok(plan) => plan,
            Err(vhd::Error::Io { .. }) => return, // the size limit: a full disk
            Err(e) => panic!("clean image refuses a sector write at {at}: {e}"),
        };
        for e in &plan.extents {
            let s = (e.offset - at) as usize;
            if img
                .file()
                .write_all_at(&bytes[s..s + e.len as usize], e.file_offset)
                .is_err()
            {
                return;
            }
        }
        img.commit_write(plan).expect("commit a planned write");
        written.push((at, bytes));
    }
    match img.flush() {
        Ok(()) => {}
        Err(vhd::Error::Io { .. }) => return,
        Err(e) => panic!("flush failed: {e}"),
    }
    let check = |img: &mut VhdImage<BoundedFile>, when: &str| {
        for (at, bytes) in &written {
            let mut got = vec![0u8; 512];
            for e in img
                .resolve_read(*at, 512)
                .expect("resolve a written sector")
            {
                let s = (e.offset - at) as usize;
                let dst = &mut got[s..s + e.len as usize];
                match e.source {
                    ReadSource::Data { file_offset } => img
                        .file()
                        .read_exact_at(dst, file_offset)
                        .expect("read written data"),
                    _ => panic!("{when}: written sector {at} not mapped: {e:?}"),
                }
            }
            assert!(&got == bytes, "{when}: sector at {at} does not read back");
        }
    };
    check(&mut img, "after flush");
    drop(img);
    let report = vhd::check_file(&file, path).expect("check after a write");
    assert!(
        report.corruptions.is_empty(),
        "a write to a clean image left corruption: {report:?}"
    );
    let mut img = VhdImage::open_file(file, path, OpenMode::ReadOnly).expect("reopen after write");
    check(&mut img, "after reopen");
}
