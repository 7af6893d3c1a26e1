//! Resize: growth keeps the content and reads zeros beyond (also across chunk boundaries and
//! when the BAT region must move); shrinking drops only zeros and refuses over data, naming
//! the amount; a power cut anywhere during growth leaves an image of either size with the old
//! content.

mod common;

use common::{pattern, read, write};
use image_io::{CrashFile, ImageFile, Survivors};
use std::path::Path;
use vhdx::check::check_image;
use vhdx::{CreateOptions, OpenMode, ParentInfo, VhdxImage};

fn image(size: u64, fixed: bool) -> (CrashFile, VhdxImage<CrashFile>) {
    let f = CrashFile::new();
    let opts = CreateOptions {
        size,
        fixed,
        block_size: Some(1 << 20),
        ..Default::default()
    };
    let img = VhdxImage::create_in(f.clone(), Path::new("r.vhdx"), &opts, None).unwrap();
    (f, img)
}

fn reopen(f: &CrashFile) -> VhdxImage<CrashFile> {
    let img = VhdxImage::open_file(f.clone(), Path::new("r.vhdx"), OpenMode::ReadWrite).unwrap();
    let r = check_image(&img);
    assert!(r.is_clean(), "{r:?}");
    img
}

#[test]
fn growing_past_the_bat_region_moves_the_bat_and_keeps_data() {
    // 1 MiB blocks: the 1 MiB BAT region holds 128 GiB; 200 GiB needs a new one.
    let (f, mut img) = image(16 << 20, false);
    let data = pattern(1, 3 << 20);
    write(&mut img, 5 << 20, &data);
    img.close().unwrap();
    let mut img = reopen(&f);
    let guid = img.header().data_write_guid;
    img.resize(200 << 30, &mut |_| {}).unwrap();
    assert_ne!(img.header().data_write_guid, guid, "size is user-visible");
    img.close().unwrap();
    let mut img = reopen(&f);
    assert_eq!(img.virtual_size(), 200 << 30);
    assert!(read(&mut img, 5 << 20, 3 << 20) == data);
    for at in [16 << 20, 9 << 30, 100 << 30, (200 << 30) - (1 << 20)] {
        assert!(read(&mut img, at, 1 << 20).iter().all(|&b| b == 0), "{at}");
    }
    write(&mut img, 150 << 30, &pattern(2, 4096));
    img.close().unwrap();
    let mut img = reopen(&f);
    assert_eq!(read(&mut img, 150 << 30, 4096), pattern(2, 4096));
}

#[test]
fn growing_a_partial_last_block_reads_zeros_past_the_old_end() {
    let (f, mut img) = image((4 << 20) + 4096, false);
    write(&mut img, 4 << 20, &pattern(3, 4096));
    img.resize(6 << 20, &mut |_| {}).unwrap();
    img.close().unwrap();
    let mut img = reopen(&f);
    assert_eq!(read(&mut img, 4 << 20, 4096), pattern(3, 4096));
    assert!(read(&mut img, (4 << 20) + 4096, (2 << 20) - 4096)
        .iter()
        .all(|&b| b == 0));
}

#[test]
fn shrinking_drops_blocks_past_the_end_and_refuses_over_data() {
    let (f, mut img) = image(16 << 20, false);
    write(&mut img, 0, &pattern(4, 2 << 20));
    write(&mut img, 10 << 20, &vec![0; 2 << 20]);
    write(&mut img, 14 << 20, &pattern(5, 1536));
    let e = img.resize(8 << 20, &mut |_| {}).unwrap_err().to_string();
    assert!(e.contains("1536 bytes of data"), "{e}");
    assert!(e.contains(&format!("offset {}", 14 << 20)), "{e}");
    write(&mut img, 14 << 20, &vec![0; 1536]);
    let before = f.len().unwrap();
    img.resize(8 << 20, &mut |_| {}).unwrap();
    img.close().unwrap();
    assert!(f.len().unwrap() + (3 << 20) <= before, "file shrank");
    let mut img = reopen(&f);
    assert_eq!(img.virtual_size(), 8 << 20);
    assert_eq!(read(&mut img, 0, 2 << 20), pattern(4, 2 << 20));
}

#[test]
fn fixed_vhdx_grows_with_allocated_zero_blocks_and_shrinks() {
    let (f, mut img) = image(4 << 20, true);
    write(&mut img, 0, &pattern(6, 4 << 20));
    let mut filled = 0;
    img.resize(7 << 20, &mut |n| filled += n).unwrap();
    assert_eq!(filled, 3 << 20);
    assert_eq!(img.subformat(), "fixed");
    img.close().unwrap();
    let mut img = reopen(&f);
    assert_eq!(img.allocated_blocks(), 7);
    assert!(read(&mut img, 4 << 20, 3 << 20).iter().all(|&b| b == 0));
    img.resize(4 << 20, &mut |_| {}).unwrap();
    img.close().unwrap();
    let mut img = reopen(&f);
    assert_eq!(read(&mut img, 0, 4 << 20), pattern(6, 4 << 20));
}

#[test]
fn growing_a_differencing_vhdx_shows_the_parent_then_zeros() {
    let f = CrashFile::new();
    let opts = CreateOptions {
        block_size: Some(1 << 20),
        ..Default::default()
    };
    let info = ParentInfo {
        absolute: "/nonexistent/p.vhdx".into(),
        relative: ".\\p.vhdx".into(),
        data_write_guid: uuid::Uuid::from_u128(1),
        virtual_size: 3 << 20,
        logical_sector_size: 512,
        page83: uuid::Uuid::from_u128(2),
    };
    let mut img = VhdxImage::create_in(f.clone(), Path::new("r.vhdx"), &opts, Some(&info)).unwrap();
    write(&mut img, 1 << 20, &pattern(7, 512));
    img.resize(5 << 20, &mut |_| {}).unwrap();
    img.close().unwrap();
    let mut img = reopen(&f);
    assert_eq!(read(&mut img, 1 << 20, 512), pattern(7, 512));
    // Unwritten sectors come from the parent (0xEE in these helpers), new ones too.
    assert_eq!(read(&mut img, 4 << 20, 512), vec![0xEE; 512]);
}

#[test]
fn a_power_cut_anywhere_in_a_grow_leaves_either_size_with_the_content() {
    let (f, mut img) = image(16 << 20, false);
    let data = pattern(8, 2 << 20);
    write(&mut img, 1 << 20, &data);
    img.close().unwrap();
    let mut img =
        VhdxImage::open_file(f.clone(), Path::new("r.vhdx"), OpenMode::ReadWrite).unwrap();
    let start = f.op_count();
    img.resize(130 << 30, &mut |_| {}).unwrap();
    std::mem::forget(img);
    // Every third cut keeps the run short; the moves and log entries span many operations.
    for cut in (start..=f.op_count()).step_by(3) {
        for s in [Survivors::None, Survivors::All] {
            let state = f.crash_after_op(cut, s);
            let mut ro =
                VhdxImage::open_file(state.clone(), Path::new("r.vhdx"), OpenMode::ReadOnly)
                    .unwrap_or_else(|e| panic!("cut {cut}: {e}"));
            assert!(
                [16 << 20, 130 << 30].contains(&ro.virtual_size()),
                "cut {cut}: size {}",
                ro.virtual_size()
            );
            assert!(read(&mut ro, 1 << 20, 2 << 20) == data, "cut {cut}");
            drop(ro);
            if cut % 4 == 0 {
                let rw =
                    VhdxImage::open_file(state, Path::new("r.vhdx"), OpenMode::ReadWrite).unwrap();
                assert!(check_image(&rw).corruptions.is_empty(), "cut {cut}");
            }
        }
    }
}
