//! Resize: growing keeps the old content and reads zeros beyond it (also when the BAT must grow
//! over blocks that are in its way); shrinking drops zeros only, and refuses, naming the amount,
//! when data lies beyond the new end. `check` is clean after each.

use image_io::{CrashFile, ImageFile};
use std::path::Path;
use vhd::{check_file, CreateOptions, OpenMode, ParentInfo, ReadSource, VhdImage, VhdType};
use vhdkit_tests::pattern_at as pattern;

fn read<F: ImageFile>(img: &mut VhdImage<F>, offset: u64, len: u64) -> Vec<u8> {
    let mut out = vec![0u8; len as usize];
    for e in img.resolve_read(offset, len).unwrap() {
        let dst = &mut out[(e.offset - offset) as usize..][..e.len as usize];
        match e.source {
            ReadSource::Data { file_offset } => img.file().read_exact_at(dst, file_offset).unwrap(),
            ReadSource::Zero => dst.fill(0),
            ReadSource::Parent => dst.fill(0xEE),
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

fn image(t: VhdType, size: u64, block: u32) -> (CrashFile, VhdImage<CrashFile>) {
    let f = CrashFile::new();
    let opts = CreateOptions {
        size,
        vhd_type: t,
        block_size: block,
        ..Default::default()
    };
    let img = VhdImage::create_in(f.clone(), Path::new("r.vhd"), &opts, None).unwrap();
    (f, img)
}

fn reopen(f: &CrashFile) -> VhdImage<CrashFile> {
    let r = check_file(f, Path::new("r.vhd")).unwrap();
    assert!(r.is_clean(), "{r:?}");
    VhdImage::open_file(f.clone(), Path::new("r.vhd"), OpenMode::ReadWrite).unwrap()
}

#[test]
fn growing_a_dynamic_vhd_keeps_data_and_reads_zeros_beyond() {
    // 4 MiB in 64 KiB blocks: 64 BAT entries; 64 MiB needs 1024, so the BAT grows over the
    // first blocks, which move to the end of the file.
    let (f, mut img) = image(VhdType::Dynamic, (4 << 20) - 4096, 64 << 10);
    let data = pattern(1, (4 << 20) - 4096);
    write(&mut img, 0, &data);
    img.flush().unwrap();
    img.resize(64 << 20, &mut |_| {}).unwrap();
    assert_eq!(img.virtual_size(), 64 << 20);
    drop(img);
    let mut img = reopen(&f);
    assert_eq!(img.virtual_size(), 64 << 20);
    assert!(read(&mut img, 0, data.len() as u64) == data);
    assert!(read(&mut img, data.len() as u64, 60 << 20)
        .iter()
        .all(|&b| b == 0));
    // The grown image takes writes anywhere.
    write(&mut img, (64 << 20) - 512, &[7; 512]);
    img.flush().unwrap();
    drop(img);
    let mut img = reopen(&f);
    assert_eq!(read(&mut img, (64 << 20) - 512, 512), vec![7; 512]);
    assert!(read(&mut img, 0, data.len() as u64) == data);
}

#[test]
fn shrinking_a_dynamic_vhd_over_zeros_drops_blocks_and_file_space() {
    let (f, mut img) = image(VhdType::Dynamic, 8 << 20, 64 << 10);
    let data = pattern(2, 3 << 20);
    write(&mut img, 0, &data);
    write(&mut img, 5 << 20, &vec![0; 1 << 20]); // allocated, but zeros
    img.flush().unwrap();
    let before = f.len().unwrap();
    img.resize(3 << 20, &mut |_| {}).unwrap();
    drop(img);
    assert!(f.len().unwrap() < before - (1 << 20));
    let mut img = reopen(&f);
    assert_eq!(img.virtual_size(), 3 << 20);
    assert!(read(&mut img, 0, 3 << 20) == data);
}

#[test]
fn shrinking_over_data_is_refused_and_names_the_amount() {
    for t in [VhdType::Dynamic, VhdType::Fixed] {
        let (f, mut img) = image(t, 8 << 20, 64 << 10);
        write(&mut img, 6 << 20, &pattern(3, 8192));
        img.flush().unwrap();
        let e = img.resize(4 << 20, &mut |_| {}).unwrap_err().to_string();
        assert!(e.contains("8192 bytes of data"), "{e}");
        assert!(e.contains(&format!("offset {}", 6 << 20)), "{e}");
        drop(img);
        let mut img = reopen(&f);
        assert_eq!(img.virtual_size(), 8 << 20);
        assert_eq!(read(&mut img, 6 << 20, 8192), pattern(3, 8192));
    }
}

#[test]
fn fixed_vhd_grows_with_zeros_and_shrinks_over_zeros() {
    let (f, mut img) = image(VhdType::Fixed, 2 << 20, 64 << 10);
    let data = pattern(4, 2 << 20);
    write(&mut img, 0, &data);
    img.flush().unwrap();
    let mut filled = 0;
    img.resize(5 << 20, &mut |n| filled += n).unwrap();
    assert_eq!(filled, 3 << 20);
    drop(img);
    assert_eq!(f.len().unwrap(), (5 << 20) + 512);
    let mut img = reopen(&f);
    assert!(read(&mut img, 0, 2 << 20) == data);
    assert!(read(&mut img, 2 << 20, 3 << 20).iter().all(|&b| b == 0));
    img.resize(2 << 20, &mut |_| {}).unwrap();
    drop(img);
    assert_eq!(f.len().unwrap(), (2 << 20) + 512);
    let mut img = reopen(&f);
    assert!(read(&mut img, 0, 2 << 20) == data);
}

#[test]
fn growing_past_the_vhd_limit_is_refused() {
    let (_f, mut img) = image(VhdType::Dynamic, 1 << 20, 64 << 10);
    let e = img.resize(2041 << 30, &mut |_| {}).unwrap_err().to_string();
    assert!(e.contains("2040 GiB"), "{e}");
}

#[test]
fn growing_a_differencing_vhd_moves_its_locators_out_of_the_way() {
    let f = CrashFile::new();
    let opts = CreateOptions {
        size: 1 << 20,
        block_size: 4096,
        ..Default::default()
    };
    let info = ParentInfo {
        absolute: "/nonexistent/parent.vhd".into(),
        relative: ".\\parent.vhd".into(),
        size: 1 << 20,
        uuid: uuid::Uuid::from_u128(3),
        timestamp: 0,
    };
    let mut img = VhdImage::create_in(f.clone(), Path::new("r.vhd"), &opts, Some(&info)).unwrap();
    write(&mut img, 4096, &pattern(5, 8192));
    img.flush().unwrap();
    let before: Vec<_> = img.parent().unwrap().candidates.clone();
    img.resize(8 << 20, &mut |_| {}).unwrap();
    drop(img);
    let mut img = reopen(&f);
    assert_eq!(img.parent().unwrap().candidates, before);
    assert_eq!(read(&mut img, 4096, 8192), pattern(5, 8192));
    assert_eq!(
        read(&mut img, 0, 4096),
        vec![0xEE; 4096],
        "still from the parent"
    );
}
