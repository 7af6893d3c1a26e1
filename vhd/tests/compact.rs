//! Compaction: releases blocks that read the same without them, closes holes, shortens the
//! file, and keeps the content; crash-safe at every operation (power cut after each one, with
//! none, all, or some of the unsynced writes kept, one of them torn).

use image_io::{CrashFile, ImageFile, Survivors};
use std::path::Path;
use vhd::{check_file, CompactMode, CreateOptions, OpenMode, ParentInfo, ReadSource, VhdImage};
use vhdkit_tests::pattern_at as pattern;

const SIZE: u64 = 4 << 20;
const BLOCK: u32 = 64 << 10;

fn read_all<F: ImageFile>(img: &mut VhdImage<F>, parent: &[u8]) -> Vec<u8> {
    let mut out = vec![0u8; SIZE as usize];
    for e in img.resolve_read(0, SIZE).unwrap() {
        let dst = &mut out[e.offset as usize..(e.offset + e.len) as usize];
        match e.source {
            ReadSource::Data { file_offset } => img.file().read_exact_at(dst, file_offset).unwrap(),
            ReadSource::Zero => dst.fill(0),
            ReadSource::Parent => dst.copy_from_slice(&parent[e.offset as usize..][..dst.len()]),
        }
    }
    out
}

fn write<F: ImageFile>(img: &mut VhdImage<F>, offset: u64, data: &[u8]) {
    let plan = img.resolve_write(offset, data.len() as u64).unwrap();
    for e in &plan.extents {
        let at = (e.offset - offset) as usize;
        img.file()
            .write_all_at(&data[at..at + e.len as usize], e.file_offset)
            .unwrap();
    }
    img.commit_write(plan).unwrap();
}

/// An image with data blocks, written-zero blocks, blocks equal to the parent and discarded
/// holes; returns the file, the image and the parent's flat content.
fn fragmented(diff: bool) -> (CrashFile, VhdImage<CrashFile>, Vec<u8>) {
    let path = Path::new("c.vhd");
    let f = CrashFile::new();
    let opts = CreateOptions {
        size: SIZE,
        block_size: BLOCK,
        ..Default::default()
    };
    let parent = if diff {
        pattern(7, SIZE as usize)
    } else {
        vec![0; SIZE as usize]
    };
    let info = diff.then(|| ParentInfo {
        absolute: "/nonexistent/p.vhd".into(),
        relative: ".\\p.vhd".into(),
        size: SIZE,
        uuid: uuid::Uuid::from_u128(9),
        timestamp: 0,
    });
    let mut img = VhdImage::create_in(f.clone(), path, &opts, info.as_ref()).unwrap();
    let bs = BLOCK as u64;
    for b in 0..48u64 {
        let at = b * bs;
        let data = match b % 4 {
            0 => vec![0; bs as usize],                             // written zeros
            1 => parent[at as usize..(at + bs) as usize].to_vec(), // same as the parent
            _ => pattern(b, bs as usize),                          // real data
        };
        write(&mut img, at, &data);
        if b % 4 == 2 {
            // a partial sector run in the next block as well
            write(&mut img, at + bs + 512, &pattern(b + 100, 1024));
        }
    }
    img.flush().unwrap();
    if !diff {
        for b in (5..48u64).step_by(6) {
            assert!(img.discard(b * bs, bs).unwrap().is_empty());
        }
        img.flush().unwrap();
    }
    (f, img, parent)
}

fn run(diff: bool, mode: CompactMode) {
    let path = Path::new("c.vhd");
    let (f, mut img, parent) = fragmented(diff);
    let expected = read_all(&mut img, &parent);
    let size_before = f.len().unwrap();
    let start = f.op_count();
    let mut backing = |off: u64, buf: &mut [u8]| -> std::io::Result<()> {
        buf.copy_from_slice(&parent[off as usize..][..buf.len()]);
        Ok(())
    };
    let backing: Option<vhd::compact::BackingReader<'_>> = diff.then_some(&mut backing);
    let report = img.compact(mode, backing, &mut |_| {}).unwrap();
    assert!(report.blocks_moved > 0, "{report:?}");
    if mode == CompactMode::Full {
        assert!(report.blocks_released >= 12, "{report:?}");
    }
    assert_eq!(read_all(&mut img, &parent), expected);
    drop(img);
    let end = f.op_count();
    assert!(f.len().unwrap() < size_before, "file did not shrink");
    let r = check_file(&f, path).unwrap();
    assert!(r.is_clean(), "{r:?}");
    let survivors = Survivors::matrix(0);
    for cut in start..=end {
        for (name, s) in survivors {
            let what = format!("cut after op {cut} of {start}..{end}, survivors {name}");
            let state = f.crash_after_op(cut, s);
            let report = check_file(&state, path).unwrap();
            assert!(report.corruptions.is_empty(), "{what}: {report:?}");
            let mut ro = VhdImage::open_file(state.clone(), path, OpenMode::ReadOnly)
                .unwrap_or_else(|e| panic!("{what}: {e}"));
            assert!(
                read_all(&mut ro, &parent) == expected,
                "{what}: content changed"
            );
        }
    }
    // Compaction interrupted anywhere can be run again and finishes the job.
    for cut in (start..=end).step_by(7) {
        let state = f.crash_after_op(cut, Survivors::None);
        let mut rw = VhdImage::open_file(state.clone(), path, OpenMode::ReadWrite).unwrap();
        rw.compact(CompactMode::Quick, None, &mut |_| {}).unwrap();
        assert!(
            read_all(&mut rw, &parent) == expected,
            "rerun after cut {cut}"
        );
        drop(rw);
        let r = check_file(&state, path).unwrap();
        assert!(r.corruptions.is_empty(), "rerun after cut {cut}: {r:?}");
    }
}

#[test]
fn full_compaction_of_a_dynamic_vhd_keeps_content_at_every_power_cut() {
    run(false, CompactMode::Full);
}

#[test]
fn quick_compaction_of_a_dynamic_vhd_closes_discarded_holes_at_every_power_cut() {
    run(false, CompactMode::Quick);
}

#[test]
fn full_compaction_of_a_differencing_vhd_drops_blocks_equal_to_the_parent() {
    run(true, CompactMode::Full);
}

#[test]
fn full_compaction_releases_zero_blocks_and_leaves_a_clean_minimal_file() {
    let (f, mut img, parent) = fragmented(false);
    let expected = read_all(&mut img, &parent);
    let r = img.compact(CompactMode::Full, None, &mut |_| {}).unwrap();
    // 48 blocks written: 12 of zeros, 12 equal to the (zero) parent, 7 discarded.
    let live = img.allocated_blocks() as u64;
    assert_eq!(r.file_size_after, f.len().unwrap());
    assert_eq!(read_all(&mut img, &parent), expected);
    // Minimal: metadata plus the live blocks, nothing more than alignment padding.
    let per_block = BLOCK as u64 + 4096;
    assert!(
        r.file_size_after <= 1536 + 512 + 4096 + live * per_block + 512,
        "{r:?} with {live} live blocks"
    );
    drop(img);
    assert!(check_file(&f, Path::new("c.vhd")).unwrap().is_clean());
}

#[test]
fn compacting_a_fixed_vhd_is_refused() {
    let f = CrashFile::new();
    let opts = CreateOptions {
        size: 1 << 20,
        vhd_type: vhd::VhdType::Fixed,
        ..Default::default()
    };
    let mut img = VhdImage::create_in(f, Path::new("f.vhd"), &opts, None).unwrap();
    let e = img
        .compact(CompactMode::Full, None, &mut |_| {})
        .unwrap_err();
    assert!(e.to_string().contains("fixed"), "{e}");
}
