//! `vhdx_open`: arbitrary bytes (raw, or [`crate::sparse`]-encoded) as a VHDX file.

use crate::bounded::BoundedFile;
use crate::input::pattern;
use crate::sparse;
use crate::vhd_open::sample_ranges;
use image_io::ImageFile;
use std::path::Path;
use vhdx::{check::check_image, OpenMode, ReadSource, VhdxImage};

/// Opens the file read-only (a pending log is replayed in memory), resolves and reads sample
/// ranges, checks it; then opens it writable (replaying on disk), writes a logical sector at
/// each end, closes, reopens and reads them back.
///
/// Oracles: a read-only open, its reads and the check never write; an image that opens resolves
/// every range into extents that tile it and whose data can be read; what opens read-only opens
/// read-write; written sectors read back after flush and after a clean reopen, which shows no
/// corruption if there was none before.
pub fn vhdx_open(data: &[u8]) {
    let bytes = sparse::decode(data);
    let path = Path::new("fuzz.vhdx");
    let file = BoundedFile::read_only(bytes);
    let Ok(mut img) = VhdxImage::open_file(file.clone(), path, OpenMode::ReadOnly) else {
        assert_eq!(file.write_count(), 0, "a failed read-only open wrote");
        return;
    };
    let _ = (
        img.creator(),
        img.subformat(),
        img.parent(),
        img.allocated_blocks(),
    );
    let size = img.virtual_size();
    let has_parent = img.parent().is_some();
    for (offset, len) in sample_ranges(size) {
        let extents = img
            .resolve_read(offset, len)
            .unwrap_or_else(|e| panic!("open image cannot resolve {offset}+{len}: {e}"));
        let mut next = offset;
        for e in &extents {
            assert_eq!(e.offset, next, "extents do not tile the range: {extents:?}");
            assert!(e.len > 0, "empty extent: {extents:?}");
            next += e.len;
            match e.source {
                ReadSource::Data { file_offset } => {
                    let mut buf = vec![0u8; e.len as usize];
                    img.read_file_at(&mut buf, file_offset)
                        .unwrap_or_else(|err| panic!("data extent {e:?} unreadable: {err}"));
                }
                ReadSource::Parent => assert!(has_parent, "parent extent without a parent"),
                ReadSource::Zero => {}
            }
        }
        assert_eq!(
            next,
            offset + len,
            "extents do not cover the range: {extents:?}"
        );
    }
    // A pending log is reported, but the writable open below replays it.
    let clean = check_image(&img)
        .corruptions
        .iter()
        .all(|f| f.structure == "log");
    let (lss, bs) = (img.logical_sector_size() as u64, img.block_size());
    drop(img);
    assert_eq!(
        file.write_count(),
        0,
        "read-only open, reads or check wrote"
    );
    if bs <= 8 << 20 {
        write_back(file.contents(), size, lss, clean);
    }
}

fn is_full(e: &vhdx::Error) -> bool {
    matches!(e, vhdx::Error::Io { .. })
}

/// Writes the first and last logical sector through a writable open and checks they read back.
fn write_back(bytes: Vec<u8>, size: u64, lss: u64, clean: bool) {
    if size < lss {
        return;
    }
    let path = Path::new("fuzz.vhdx");
    let limit = bytes.len() as u64 + (64 << 20);
    let file = BoundedFile::new(bytes, limit, 256 << 20);
    let mut img = match VhdxImage::open_file(file.clone(), path, OpenMode::ReadWrite) {
        Ok(img) => img,
        Err(e) if is_full(&e) => return,
        Err(e) => panic!("opens read-only but not read-write: {e}"),
    };
    let spots = [0, (size - lss) / lss * lss];
    let mut written = Vec::new();
    for (i, &at) in spots.iter().enumerate() {
        let data = pattern(at ^ i as u64 ^ 0x55, lss as usize);
        let plan = match img.resolve_write(at, lss) {
            Ok(plan) => plan,
            Err(e) if is_full(&e) => return,
            Err(e) => panic!("open image refuses a sector write at {at}: {e}"),
        };
        for e in &plan.extents {
            let s = (e.offset - at) as usize;
            if img
                .file()
                .write_all_at(&data[s..s + e.len as usize], e.file_offset)
                .is_err()
            {
                return;
            }
        }
        img.commit_write(plan).expect("commit a planned write");
        written.push((at, data));
    }
    match img.flush() {
        Ok(()) => {}
        Err(e) if is_full(&e) => return,
        Err(e) => panic!("flush failed: {e}"),
    }
    let check = |img: &mut VhdxImage<BoundedFile>, when: &str| {
        for (at, data) in &written {
            let mut got = vec![0u8; data.len()];
            for e in img
                .resolve_read(*at, lss)
                .expect("resolve a written sector")
            {
                let s = (e.offset - at) as usize;
                let dst = &mut got[s..s + e.len as usize];
                match e.source {
                    ReadSource::Data { file_offset } => img
                        .read_file_at(dst, file_offset)
                        .expect("read written data"),
                    _ => panic!("{when}: written sector {at} not mapped: {e:?}"),
                }
            }
            assert!(&got == data, "{when}: sector at {at} does not read back");
        }
    };
    check(&mut img, "after flush");
    match img.close() {
        Ok(()) => {}
        Err(e) if is_full(&e) => return,
        Err(e) => panic!("close failed: {e}"),
    }
    let mut img = VhdxImage::open_file(file, path, OpenMode::ReadOnly).expect("reopen after write");
    assert!(!img.replayed_log(), "a clean close left a pending log");
    let report = check_image(&img);
    assert!(
        !clean || report.corruptions.is_empty(),
        "a write to an image that opens left corruption: {report:?}"
    );
    check(&mut img, "after reopen");
}
