//! Behaviour of images vhdkit creates and writes, and of hostile input, at the format level.

mod common;

use common::{read, scratch, write};
use std::os::unix::fs::FileExt;
use vhd::{
    check, CreateOptions, DiskType, Durability, ErrorKind, OpenMode, ReadSource, VhdImage, VhdType,
};

fn dynamic(size: u64, block: u32) -> CreateOptions {
    CreateOptions {
        size,
        vhd_type: VhdType::Dynamic,
        block_size: block,
        ..Default::default()
    }
}

#[test]
fn created_dynamic_image_reads_zeros_and_checks_clean() {
    let p = scratch().join("d.vhd");
    let mut img = VhdImage::create(&p, &dynamic((1 << 30) + (3 << 20), 2 << 20)).unwrap();
    assert_eq!(img.virtual_size(), (1 << 30) + (3 << 20));
    assert_eq!(img.disk_type(), DiskType::Dynamic);
    assert_eq!(read(&mut img, (1 << 30) - 512, 4096), vec![0; 4096]);
    drop(img);
    assert!(check(&p).unwrap().is_clean());
}

#[test]
fn create_refuses_an_existing_file_and_bad_sizes() {
    let dir = scratch();
    let p = dir.join("x.vhd");
    std::fs::write(&p, b"keep me").unwrap();
    assert!(VhdImage::create(&p, &dynamic(1 << 20, 2 << 20)).is_err());
    assert_eq!(std::fs::read(&p).unwrap(), b"keep me");
    let q = dir.join("y.vhd");
    let e = VhdImage::create(&q, &dynamic(2041 << 30, 2 << 20)).unwrap_err();
    assert!(e.to_string().contains("2040 GiB"), "{e}");
    assert!(VhdImage::create(&q, &dynamic(1000, 2 << 20)).is_err());
    assert!(VhdImage::create(&q, &dynamic(1 << 20, 3000)).is_err());
    assert!(!q.exists());
    assert_eq!(
        std::fs::read_dir(&dir).unwrap().count(),
        1,
        "temporary files left behind"
    );
}

#[test]
fn writes_spanning_blocks_persist_across_reopen() {
    let p = scratch().join("d.vhd");
    let mut img = VhdImage::create(&p, &dynamic(8 << 20, 1 << 20)).unwrap();
    let data: Vec<u8> = (0..3 << 20).map(|i| (i % 251) as u8).collect();
    write(&mut img, (1 << 20) - 512, &data);
    img.flush().unwrap();
    drop(img);
    let mut img = VhdImage::open(&p, OpenMode::ReadOnly).unwrap();
    assert_eq!(read(&mut img, (1 << 20) - 512, data.len()), data);
    assert_eq!(read(&mut img, 0, 512), vec![0; 512]);
    assert_eq!(img.allocated_blocks(), 4);
    assert!(check(&p).unwrap().is_clean(), "{:?}", check(&p).unwrap());
}

#[test]
fn allocated_block_data_is_4k_aligned_with_bitmap_just_before() {
    let p = scratch().join("d.vhd");
    let mut img = VhdImage::create(&p, &dynamic(8 << 20, 2 << 20)).unwrap();
    write(&mut img, 2 << 20, &[7u8; 512]);
    write(&mut img, 0, &[9u8; 512]);
    for e in img.resolve_read(0, 8 << 20).unwrap() {
        if let ReadSource::Data { file_offset } = e.source {
            assert_eq!(file_offset % 4096, 0, "{e:?}");
        }
    }
}

#[test]
fn fixed_image_is_fully_allocated_unless_sparse() {
    use std::os::unix::fs::MetadataExt;
    let dir = scratch();
    let full = dir.join("f.vhd");
    let o = CreateOptions {
        size: 8 << 20,
        vhd_type: VhdType::Fixed,
        ..Default::default()
    };
    let img = VhdImage::create(&full, &o).unwrap();
    assert_eq!(img.disk_type(), DiskType::Fixed);
    let m = std::fs::metadata(&full).unwrap();
    assert_eq!(m.len(), (8 << 20) + 512);
    assert!(m.blocks() * 512 >= 8 << 20);
    let sparse = dir.join("s.vhd");
    VhdImage::create(&sparse, &CreateOptions { sparse: true, ..o }).unwrap();
    assert!(std::fs::metadata(&sparse).unwrap().blocks() * 512 < 1 << 20);
}

#[test]
fn differencing_child_reads_parent_until_written_and_never_touches_parent() {
    let dir = scratch();
    let parent = dir.join("p.vhd");
    let mut p = VhdImage::create(&parent, &dynamic(4 << 20, 1 << 20)).unwrap();
    write(&mut p, 0, &[1u8; 4 << 20]);
    p.flush().unwrap();
    drop(p);
    let before = std::fs::read(&parent).unwrap();
    let child = dir.join("c.vhd");
    let opts = CreateOptions {
        parent: Some(parent.clone()),
        block_size: 1 << 20,
        ..Default::default()
    };
    let mut c = VhdImage::create(&child, &opts).unwrap();
    assert_eq!(c.disk_type(), DiskType::Differencing);
    assert_eq!(c.virtual_size(), 4 << 20);
    let link = c.parent().unwrap().clone();
    assert_eq!(
        link.uuid,
        VhdImage::open(&parent, OpenMode::ReadOnly).unwrap().uuid()
    );
    assert_eq!(
        link.candidates[0],
        std::fs::canonicalize(&dir).unwrap().join("p.vhd")
    );
    assert!(c
        .resolve_read(0, 4 << 20)
        .unwrap()
        .iter()
        .all(|e| e.source == ReadSource::Parent));
    write(&mut c, 1536, &[2u8; 1024]);
    // A partial sector not yet in the child must be written whole (the backend reads the parent).
    assert_eq!(
        c.resolve_write(100, 10).unwrap_err().kind(),
        ErrorKind::InvalidArgument
    );
    c.flush().unwrap();
    drop(c);
    let mut c = VhdImage::open(&child, OpenMode::ReadOnly).unwrap();
    let got = read(&mut c, 1024, 2048);
    assert_eq!(&got[..512], &[0xEE; 512][..], "sector 2 still from parent");
    assert_eq!(&got[512..1536], &[2u8; 1024][..]);
    assert_eq!(&got[1536..], &[0xEE; 512][..]);
    assert_eq!(std::fs::read(&parent).unwrap(), before);
    assert!(check(&child).unwrap().is_clean());
}

#[test]
fn discard_of_whole_blocks_unallocates_them() {
    let p = scratch().join("d.vhd");
    let mut img = VhdImage::create(&p, &dynamic(4 << 20, 1 << 20)).unwrap();
    write(&mut img, 0, &[5u8; 2 << 20]);
    let rest = img.discard(512, (2 << 20) - 512).unwrap();
    assert_eq!(rest, vec![(512, (1 << 20) - 512)]);
    assert_eq!(img.allocated_blocks(), 1);
    assert_eq!(read(&mut img, 1 << 20, 4096), vec![0; 4096]);
}

#[test]
fn read_only_image_refuses_writes_and_never_writes() {
    let p = scratch().join("d.vhd");
    drop(VhdImage::create(&p, &dynamic(4 << 20, 1 << 20)).unwrap());
    let before = std::fs::read(&p).unwrap();
    let mut img = VhdImage::open(&p, OpenMode::ReadOnly).unwrap();
    assert_eq!(
        img.resolve_write(0, 512).unwrap_err().kind(),
        ErrorKind::ReadOnly
    );
    img.flush().unwrap();
    drop(img);
    assert_eq!(std::fs::read(&p).unwrap(), before);
}

#[test]
fn out_of_range_requests_are_errors() {
    let p = scratch().join("d.vhd");
    let mut img = VhdImage::create(&p, &dynamic(4 << 20, 1 << 20)).unwrap();
    assert!(img.resolve_read((4 << 20) - 1, 2).is_err());
    assert!(img.resolve_write(u64::MAX, 2).is_err());
}

#[test]
fn crash_after_allocation_before_flush_leaves_an_image_that_opens() {
    // Simulate a crash: write, then copy the file as it is on disk without flushing metadata.
    let dir = scratch();
    let p = dir.join("d.vhd");
    let mut img = VhdImage::create(&p, &dynamic(8 << 20, 1 << 20)).unwrap();
    write(&mut img, 0, &[3u8; 4096]);
    img.flush().unwrap();
    write(&mut img, 3 << 20, &[4u8; 4096]);
    let snapshot = dir.join("crashed.vhd");
    std::fs::copy(&p, &snapshot).unwrap();
    std::mem::forget(img); // no flush on drop: the process "died"
    let mut c = VhdImage::open(&snapshot, OpenMode::ReadOnly).unwrap();
    assert_eq!(
        read(&mut c, 0, 4096),
        vec![3u8; 4096],
        "flushed write survives"
    );
    let r = check(&snapshot).unwrap();
    assert!(r.corruptions.is_empty(), "{r:?}");
    assert_eq!(r.exit_code(), 3, "the unreferenced block is a leak: {r:?}");
    drop(c); // a reader would refuse the repair's writable open
    let r = vhd::repair(&snapshot).unwrap();
    assert!(r.is_clean(), "{r:?}");
    let mut c = VhdImage::open(&snapshot, OpenMode::ReadOnly).unwrap();
    assert_eq!(read(&mut c, 0, 4096), vec![3u8; 4096]);
}

fn corrupt(p: &std::path::Path, at: u64, bytes: &[u8]) {
    let f = std::fs::OpenOptions::new().write(true).open(p).unwrap();
    f.write_all_at(bytes, at).unwrap();
}

fn fix_header_checksum(p: &std::path::Path) {
    let f = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open(p)
        .unwrap();
    let mut h = [0u8; 1024];
    f.read_exact_at(&mut h, 512).unwrap();
    let sum = vhd::dynamic_header::DynamicHeader::computed_checksum(&h);
    f.write_all_at(&sum.to_be_bytes(), 512 + 36).unwrap();
}

fn written_image() -> std::path::PathBuf {
    let p = scratch().join("d.vhd");
    let mut img = VhdImage::create(&p, &dynamic(8 << 20, 1 << 20)).unwrap();
    write(&mut img, 0, &[1u8; 4096]);
    write(&mut img, 1 << 20, &[1u8; 4096]);
    img.flush().unwrap();
    p
}

#[test]
fn hostile_inputs_give_typed_errors_and_leave_the_file_unchanged() {
    type Damage = fn(&std::path::Path);
    let cases: &[(&str, Damage, ErrorKind)] = &[
        (
            "truncated to 100 bytes",
            |p| {
                std::fs::OpenOptions::new()
                    .write(true)
                    .open(p)
                    .unwrap()
                    .set_len(100)
                    .unwrap()
            },
            ErrorKind::NotThisFormat,
        ),
        (
            "BAT entry past end of file",
            |p| {
                corrupt(p, 1536, &0x00FF_0000u32.to_be_bytes());
            },
            ErrorKind::Corrupt,
        ),
        (
            "overlapping BAT entries",
            |p| {
                let f = std::fs::File::open(p).unwrap();
                let mut e = [0u8; 4];
                f.read_exact_at(&mut e, 1536).unwrap();
                corrupt(p, 1540, &e);
            },
            ErrorKind::Corrupt,
        ),
        (
            "BAT entry into the header",
            |p| corrupt(p, 1536, &1u32.to_be_bytes()),
            ErrorKind::Corrupt,
        ),
        (
            "header checksum",
            |p| corrupt(p, 512 + 100, &[0xAB]),
            ErrorKind::Checksum,
        ),
        (
            "wild header offset",
            |p| {
                let f = std::fs::File::open(p).unwrap();
                let len = f.metadata().unwrap().len();
                let mut ft = [0u8; 512];
                f.read_exact_at(&mut ft, len - 512).unwrap();
                let mut footer = vhd::Footer::parse(&ft);
                footer.data_offset = 1 << 50;
                corrupt(p, len - 512, &footer.to_bytes());
                corrupt(p, 0, &footer.to_bytes());
            },
            ErrorKind::Corrupt,
        ),
        (
            "huge virtual size",
            |p| {
                let f = std::fs::File::open(p).unwrap();
                let len = f.metadata().unwrap().len();
                let mut ft = [0u8; 512];
                f.read_exact_at(&mut ft, len - 512).unwrap();
                let mut footer = vhd::Footer::parse(&ft);
                footer.current_size = u64::MAX - 511;
                corrupt(p, len - 512, &footer.to_bytes());
                corrupt(p, 0, &footer.to_bytes());
            },
            ErrorKind::Corrupt,
        ),
        (
            "huge block count",
            |p| {
                corrupt(p, 512 + 28, &u32::MAX.to_be_bytes());
                corrupt(p, 512 + 32, &(1u32 << 31).to_be_bytes());
                fix_header_checksum(p);
            },
            ErrorKind::Unsupported,
        ),
        (
            "zero block size",
            |p| {
                corrupt(p, 512 + 32, &0u32.to_be_bytes());
                fix_header_checksum(p);
            },
            ErrorKind::Corrupt,
        ),
    ];
    for (name, damage, kind) in cases {
        let p = written_image();
        damage(&p);
        let before = std::fs::read(&p).unwrap();
        let e = VhdImage::open(&p, OpenMode::ReadOnly).expect_err(name);
        assert_eq!(e.kind(), *kind, "{name}: {e}");
        assert!(
            e.to_string().contains("d.vhd"),
            "{name}: error does not name the file: {e}"
        );
        let r = check(&p);
        if *kind != ErrorKind::NotThisFormat {
            assert_eq!(r.unwrap().exit_code(), 2, "{name}");
        }
        assert_eq!(std::fs::read(&p).unwrap(), before, "{name}: input changed");
    }
}

#[test]
fn relaxed_durability_output_is_complete_after_flush() {
    let p = scratch().join("d.vhd");
    let mut img = VhdImage::create(&p, &dynamic(8 << 20, 1 << 20)).unwrap();
    img.set_durability(Durability::Relaxed);
    write(&mut img, 5 << 20, &[8u8; 8192]);
    img.flush().unwrap();
    drop(img);
    let mut img = VhdImage::open(&p, OpenMode::ReadOnly).unwrap();
    assert_eq!(read(&mut img, 5 << 20, 8192), vec![8u8; 8192]);
}
