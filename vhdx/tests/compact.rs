//! Compaction: blocks that read the same without their data are released, tail blocks move
//! into holes, the file shrinks, the content stays, and every power cut (after each operation,
//! none/all/some unsynced writes kept, one torn) leaves an image that opens and reads the same.

mod common;

use common::{pattern, write};
use image_io::{CrashFile, ImageFile, Survivors};
use std::path::Path;
use vhdx::check::check_image;
use vhdx::{CompactMode, CreateOptions, OpenMode, ParentInfo, ReadSource, VhdxImage};

const SIZE: u64 = 16 << 20;
const BLOCK: u64 = 1 << 20;

fn read_all<F: ImageFile>(img: &mut VhdxImage<F>, parent: &[u8]) -> Vec<u8> {
    let mut out = vec![0u8; SIZE as usize];
    for e in img.resolve_read(0, SIZE).unwrap() {
        let dst = &mut out[e.offset as usize..(e.offset + e.len) as usize];
        match e.source {
            ReadSource::Data { file_offset } => img.read_file_at(dst, file_offset).unwrap(),
            ReadSource::Zero => dst.fill(0),
            ReadSource::Parent => dst.copy_from_slice(&parent[e.offset as usize..][..dst.len()]),
        }
    }
    out
}

fn fragmented(diff: bool) -> (CrashFile, VhdxImage<CrashFile>, Vec<u8>) {
    let f = CrashFile::new();
    let opts = CreateOptions {
        size: SIZE,
        block_size: Some(BLOCK as u32),
        ..Default::default()
    };
    let parent = if diff {
        pattern(3, SIZE as usize)
    } else {
        vec![0; SIZE as usize]
    };
    let info = diff.then(|| ParentInfo {
        absolute: "/nonexistent/p.vhdx".into(),
        relative: ".\\p.vhdx".into(),
        data_write_guid: uuid::Uuid::from_u128(5),
        virtual_size: SIZE,
        logical_sector_size: 512,
        page83: uuid::Uuid::from_u128(6),
    });
    let mut img =
        VhdxImage::create_in(f.clone(), Path::new("c.vhdx"), &opts, info.as_ref()).unwrap();
    for b in 0..14u64 {
        let at = b * BLOCK;
        let p = |len: usize| parent[at as usize..at as usize + len].to_vec();
        match b % 5 {
            0 => write(&mut img, at, &vec![0; BLOCK as usize]),
            1 => write(&mut img, at, &p(BLOCK as usize)),
            2 => write(&mut img, at, &p(64 << 10)), // part of a block, equal to the parent
            _ => write(&mut img, at + 4096, &pattern(b, 100 << 10)),
        }
    }
    img.flush().unwrap();
    if !diff {
        for b in [3u64, 8, 12] {
            assert!(img.discard(b * BLOCK, BLOCK).unwrap().is_empty());
        }
        img.flush().unwrap();
    }
    (f, img, parent)
}

fn run(diff: bool, mode: CompactMode) {
    let path = Path::new("c.vhdx");
    let (f, mut img, parent) = fragmented(diff);
    let expected = read_all(&mut img, &parent);
    let guid = img.header().data_write_guid;
    let size_before = f.len().unwrap();
    let start = f.op_count();
    let mut backing = |off: u64, buf: &mut [u8]| -> std::io::Result<()> {
        buf.copy_from_slice(&parent[off as usize..][..buf.len()]);
        Ok(())
    };
    let backing: Option<vhdx::compact::BackingReader<'_>> = diff.then_some(&mut backing);
    let report = img.compact(mode, backing, &mut |_| {}).unwrap();
    assert!(report.blocks_moved > 0, "{report:?}");
    if mode == CompactMode::Full {
        assert!(report.blocks_released >= 5, "{report:?}");
    }
    assert_eq!(read_all(&mut img, &parent), expected);
    assert_eq!(
        img.header().data_write_guid,
        guid,
        "children must stay linked"
    );
    img.close().unwrap();
    let end = f.op_count();
    assert!(f.len().unwrap() < size_before, "file did not shrink");
    let after = VhdxImage::open_file(f.clone(), path, OpenMode::ReadOnly).unwrap();
    let r = check_image(&after);
    assert!(r.is_clean(), "{r:?}");
    drop(after);
    let survivors = Survivors::matrix(2);
    for cut in start..=end {
        for (name, s) in survivors {
            let what = format!("cut after op {cut} of {start}..{end}, survivors {name}");
            let state = f.crash_after_op(cut, s);
            let mut ro = VhdxImage::open_file(state.clone(), path, OpenMode::ReadOnly)
                .unwrap_or_else(|e| panic!("{what}: read-only open: {e}"));
            assert!(
                read_all(&mut ro, &parent) == expected,
                "{what}: content changed"
            );
            drop(ro);
            let rw = VhdxImage::open_file(state, path, OpenMode::ReadWrite)
                .unwrap_or_else(|e| panic!("{what}: read-write open: {e}"));
            let r = check_image(&rw);
            assert!(r.corruptions.is_empty(), "{what}: {r:?}");
        }
    }
    // An interrupted compaction run again completes.
    for cut in (start..=end).step_by(5) {
        let state = f.crash_after_op(cut, Survivors::None);
        let mut rw = VhdxImage::open_file(state.clone(), path, OpenMode::ReadWrite).unwrap();
        rw.compact(CompactMode::Quick, None, &mut |_| {}).unwrap();
        assert!(
            read_all(&mut rw, &parent) == expected,
            "rerun after cut {cut}"
        );
        rw.close().unwrap();
    }
}

#[test]
fn full_compaction_of_a_dynamic_vhdx_keeps_content_at_every_power_cut() {
    run(false, CompactMode::Full);
}

#[test]
fn quick_compaction_of_a_dynamic_vhdx_closes_discarded_holes_at_every_power_cut() {
    run(false, CompactMode::Quick);
}

#[test]
fn full_compaction_of_a_differencing_vhdx_drops_blocks_equal_to_the_parent_at_every_power_cut() {
    run(true, CompactMode::Full);
}

#[test]
fn compacting_a_fixed_vhdx_is_refused() {
    let opts = CreateOptions {
        size: 4 << 20,
        fixed: true,
        block_size: Some(1 << 20),
        ..Default::default()
    };
    let mut img = VhdxImage::create_in(CrashFile::new(), Path::new("f.vhdx"), &opts, None).unwrap();
    let e = img
        .compact(CompactMode::Full, None, &mut |_| {})
        .unwrap_err();
    assert!(e.to_string().contains("fixed"), "{e}");
}
