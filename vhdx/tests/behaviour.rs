//! Behaviour of VHDX images vhdkit creates and writes: sizes, sector sizes, block interleave past
//! the first chunk, differencing, discard, read-only guarantees, hostile input.

mod common;

use common::{pattern, read, write};
use image_io::{CrashFile, ImageFile};
use vhdx::{check, CreateOptions, ErrorKind, OpenMode, ReadSource, VhdxImage};

fn scratch() -> std::path::PathBuf {
    vhdkit_tests::fresh_scratch_dir()
}

fn dynamic(size: u64, block: u32) -> CreateOptions {
    CreateOptions {
        size,
        block_size: Some(block),
        ..Default::default()
    }
}

#[test]
fn created_dynamic_image_has_hyper_v_defaults_and_reads_zeros() {
    let p = scratch().join("d.vhdx");
    let mut img = VhdxImage::create(
        &p,
        &CreateOptions {
            size: 2 << 30,
            ..Default::default()
        },
    )
    .unwrap();
    assert_eq!(img.virtual_size(), 2 << 30);
    assert_eq!(img.block_size(), 32 << 20);
    assert_eq!(
        (img.logical_sector_size(), img.physical_sector_size()),
        (512, 4096)
    );
    assert_eq!(img.subformat(), "dynamic");
    assert_eq!(read(&mut img, (2 << 30) - 4096, 4096), vec![0; 4096]);
    img.close().unwrap();
    assert!(check(&p).unwrap().is_clean());
}

#[test]
fn writes_persist_across_reopen_and_leave_the_log_clean() {
    let p = scratch().join("d.vhdx");
    let mut img = VhdxImage::create(&p, &dynamic(64 << 20, 1 << 20)).unwrap();
    let data = pattern(3 << 20, 3 << 20);
    write(&mut img, (3 << 20) - 512, &data);
    img.flush().unwrap();
    img.close().unwrap();
    let mut img = VhdxImage::open(&p, OpenMode::ReadOnly).unwrap();
    assert!(img.header().log_guid.is_nil());
    assert!(!img.replayed_log());
    assert_eq!(read(&mut img, (3 << 20) - 512, data.len()), data);
    assert_eq!(img.allocated_blocks(), 4);
    let r = check(&p).unwrap();
    assert!(r.is_clean(), "{r:?}");
}

#[test]
fn blocks_past_the_first_chunk_use_the_interleaved_bat() {
    // 1 MiB blocks, 512-byte sectors: chunk ratio 4096, so a chunk covers 4 GiB. 70 GiB spans
    // 17 chunks (and 16 sector-bitmap entries in between).
    let p = scratch().join("big.vhdx");
    let mut img = VhdxImage::create(&p, &dynamic(70 << 30, 1 << 20)).unwrap();
    let offsets = [
        0u64,
        (4 << 30) - 512,
        4 << 30,
        (64 << 30) + 12345 * 512,
        (70 << 30) - 4096,
    ];
    for &o in &offsets {
        write(
            &mut img,
            o,
            &pattern(o, 4096.min(((70u64 << 30) - o) as usize)),
        );
    }
    img.close().unwrap();
    let mut img = VhdxImage::open(&p, OpenMode::ReadOnly).unwrap();
    for &o in &offsets {
        let n = 4096.min(((70u64 << 30) - o) as usize);
        assert_eq!(read(&mut img, o, n), pattern(o, n), "offset {o}");
    }
    assert_eq!(read(&mut img, 8 << 30, 4096), vec![0; 4096]);
    // Blocks 0, 4095 and 4096 (across the chunk boundary), 65542 and the last one.
    assert_eq!(img.allocated_blocks(), 5);
}

#[test]
fn four_kib_sector_images_chunk_eight_times_larger() {
    let p = scratch().join("4k.vhdx");
    let o = CreateOptions {
        size: 40 << 30,
        block_size: Some(1 << 20),
        logical_sector_size: 4096,
        ..Default::default()
    };
    let mut img = VhdxImage::create(&p, &o).unwrap();
    assert_eq!(img.logical_sector_size(), 4096);
    // 4096-byte sectors: chunk ratio 32768 -> one chunk covers 32 GiB.
    let at = (32 << 30) + (5 << 20);
    write(&mut img, at, &pattern(at, 8192));
    img.close().unwrap();
    let mut img = VhdxImage::open(&p, OpenMode::ReadOnly).unwrap();
    assert_eq!(read(&mut img, at, 8192), pattern(at, 8192));
    assert!(VhdxImage::create(
        &scratch().join("x.vhdx"),
        &CreateOptions {
            size: 4096 * 3 + 512,
            logical_sector_size: 4096,
            ..Default::default()
        }
    )
    .is_err());
}

#[test]
fn fixed_image_is_fully_allocated_with_every_block_present() {
    use std::os::unix::fs::MetadataExt;
    let p = scratch().join("f.vhdx");
    let mut img = VhdxImage::create(
        &p,
        &CreateOptions {
            size: 8 << 20,
            fixed: true,
            block_size: Some(1 << 20),
            ..Default::default()
        },
    )
    .unwrap();
    assert_eq!(img.subformat(), "fixed");
    assert_eq!(img.allocated_blocks(), 8);
    assert!(img
        .resolve_read(0, 8 << 20)
        .unwrap()
        .iter()
        .all(|e| matches!(e.source, ReadSource::Data { .. })));
    write(&mut img, 4096, &[7u8; 512]);
    img.close().unwrap();
    assert!(std::fs::metadata(&p).unwrap().blocks() * 512 >= 8 << 20);
    assert!(check(&p).unwrap().is_clean());
}

#[test]
fn differencing_child_reads_parent_until_written_and_leaves_it_untouched() {
    let dir = scratch();
    let parent = dir.join("p.vhdx");
    let mut p = VhdxImage::create(&parent, &dynamic(16 << 20, 1 << 20)).unwrap();
    write(&mut p, 0, &[1u8; 16 << 20]);
    p.close().unwrap();
    let before = std::fs::read(&parent).unwrap();
    let child = dir.join("c.avhdx");
    let mut c = VhdxImage::create(
        &child,
        &CreateOptions {
            parent: Some(parent.clone()),
            ..Default::default()
        },
    )
    .unwrap();
    assert_eq!(c.subformat(), "differencing");
    assert_eq!(c.virtual_size(), 16 << 20);
    let link = c.parent().unwrap().clone();
    let pimg = VhdxImage::open(&parent, OpenMode::ReadOnly).unwrap();
    assert!(link.matches(pimg.header().data_write_guid));
    assert_eq!(
        link.candidates[0],
        std::fs::canonicalize(&dir).unwrap().join("p.vhdx")
    );
    drop(pimg);
    assert!(c
        .resolve_read(0, 16 << 20)
        .unwrap()
        .iter()
        .all(|e| e.source == ReadSource::Parent));
    write(&mut c, 1536, &[2u8; 1024]);
    assert_eq!(
        c.resolve_write(100, 10).unwrap_err().kind(),
        ErrorKind::InvalidArgument
    );
    c.close().unwrap();
    let mut c = VhdxImage::open(&child, OpenMode::ReadOnly).unwrap();
    let got = read(&mut c, 1024, 2048);
    assert_eq!(&got[..512], &[0xEE; 512][..]);
    assert_eq!(&got[512..1536], &[2u8; 1024][..]);
    assert_eq!(&got[1536..], &[0xEE; 512][..]);
    assert_eq!(std::fs::read(&parent).unwrap(), before, "parent changed");
    let r = check(&child).unwrap();
    assert!(r.is_clean(), "{r:?}");
}

#[test]
fn discard_of_whole_blocks_marks_them_zero() {
    let p = scratch().join("d.vhdx");
    let mut img = VhdxImage::create(&p, &dynamic(8 << 20, 1 << 20)).unwrap();
    write(&mut img, 0, &[5u8; 3 << 20]);
    let rest = img.discard(512, (2 << 20) - 512).unwrap();
    assert_eq!(rest, vec![(512, (1 << 20) - 512)]);
    assert_eq!(img.allocated_blocks(), 2);
    assert_eq!(read(&mut img, 1 << 20, 4096), vec![0; 4096]);
}

#[test]
fn read_only_open_never_writes() {
    let p = scratch().join("d.vhdx");
    VhdxImage::create(&p, &dynamic(8 << 20, 1 << 20))
        .unwrap()
        .close()
        .unwrap();
    let before = std::fs::read(&p).unwrap();
    let mut img = VhdxImage::open(&p, OpenMode::ReadOnly).unwrap();
    assert_eq!(
        img.resolve_write(0, 512).unwrap_err().kind(),
        ErrorKind::ReadOnly
    );
    img.flush().unwrap();
    drop(img);
    assert_eq!(std::fs::read(&p).unwrap(), before);
}

/// A pending log made the way a crash makes it: log entry written and synced, pages not applied.
fn image_with_pending_log() -> (CrashFile, Vec<u8>) {
    let f = CrashFile::new();
    let path = std::path::Path::new("pending.vhdx");
    let mut img = VhdxImage::create_in(f.clone(), path, &dynamic(8 << 20, 1 << 20), None).unwrap();
    let data = pattern(0, 8192);
    write(&mut img, 2 << 20, &data);
    img.flush().unwrap();
    // Now a write whose flush dies right after the log entry is synced.
    write(&mut img, 5 << 20, &data);
    let synced_log = {
        let probe = f.clone();
        let before = probe.write_count();
        img.flush().unwrap();
        let _ = before;
        probe
    };
    std::mem::forget(img);
    // Rebuild the state "log synced, apply lost": replay the history up to the log sync.
    // The flush synced: payload, header (log opened), log entry, applied pages, header (log
    // closed). Keep the state right after the log entry: applied pages lost.
    let state = synced_log.state_after_sync(synced_log.sync_count() - 2);
    (state, data)
}

#[test]
fn pending_log_is_replayed_in_memory_read_only_and_on_disk_read_write() {
    let (file, data) = image_with_pending_log();
    let before = file.contents();
    let path = std::path::Path::new("pending.vhdx");
    let mut ro = VhdxImage::open_file(file.clone(), path, OpenMode::ReadOnly).unwrap();
    assert!(ro.replayed_log());
    assert_eq!(
        read(&mut ro, 5 << 20, 8192),
        data,
        "read-only open sees the logged block"
    );
    assert_eq!(read(&mut ro, 2 << 20, 8192), data);
    drop(ro);
    assert_eq!(
        file.contents(),
        before,
        "read-only replay wrote to the file"
    );
    let mut rw = VhdxImage::open_file(file.clone(), path, OpenMode::ReadWrite).unwrap();
    assert!(rw.replayed_log());
    assert_eq!(read(&mut rw, 5 << 20, 8192), data);
    rw.close().unwrap();
    let ro = VhdxImage::open_file(file.clone(), path, OpenMode::ReadOnly).unwrap();
    assert!(!ro.replayed_log(), "log cleared after a writable replay");
    assert!(ro.header().log_guid.is_nil());
}

fn damaged(f: impl Fn(&std::path::Path)) -> std::path::PathBuf {
    let p = scratch().join("bad.vhdx");
    let mut img = VhdxImage::create(&p, &dynamic(8 << 20, 1 << 20)).unwrap();
    write(&mut img, 0, &[1u8; 4096]);
    img.close().unwrap();
    f(&p);
    p
}

fn poke(p: &std::path::Path, at: u64, bytes: &[u8]) {
    let f = std::fs::OpenOptions::new().write(true).open(p).unwrap();
    std::os::unix::fs::FileExt::write_all_at(&f, bytes, at).unwrap();
}

#[test]
fn hostile_inputs_give_typed_errors_and_leave_the_file_unchanged() {
    type Damage = fn(&std::path::Path);
    let cases: &[(&str, Damage, ErrorKind)] = &[
        (
            "truncated",
            |p| {
                std::fs::OpenOptions::new()
                    .write(true)
                    .open(p)
                    .unwrap()
                    .set_len(4096)
                    .unwrap()
            },
            ErrorKind::NotThisFormat,
        ),
        (
            "both headers damaged",
            |p| {
                poke(p, (64 << 10) + 100, &[1]);
                poke(p, (128 << 10) + 100, &[1]);
            },
            ErrorKind::Checksum,
        ),
        (
            "BAT entry past the end",
            |p| poke(p, 3 << 20, &((1u64 << 40) | 6).to_le_bytes()),
            ErrorKind::Corrupt,
        ),
        (
            "BAT entry onto the metadata region",
            |p| poke(p, 3 << 20, &((2u64 << 20) | 6).to_le_bytes()),
            ErrorKind::Corrupt,
        ),
        (
            "invalid block state",
            |p| poke(p, 3 << 20, &4u64.to_le_bytes()),
            ErrorKind::Corrupt,
        ),
        (
            "both region tables damaged",
            |p| {
                poke(p, (192 << 10) + 40, &[9]);
                poke(p, (256 << 10) + 40, &[9]);
            },
            ErrorKind::Checksum,
        ),
        (
            "metadata table signature",
            |p| poke(p, 2 << 20, b"garbage!"),
            ErrorKind::Corrupt,
        ),
    ];
    for (name, damage, kind) in cases {
        let p = damaged(damage);
        let before = std::fs::read(&p).unwrap();
        let e = VhdxImage::open(&p, OpenMode::ReadOnly).expect_err(name);
        assert_eq!(e.kind(), *kind, "{name}: {e}");
        assert!(e.to_string().contains("bad.vhdx"), "{name}: {e}");
        if *kind != ErrorKind::NotThisFormat {
            assert_eq!(check(&p).unwrap().exit_code(), 2, "{name}");
        }
        assert_eq!(std::fs::read(&p).unwrap(), before, "{name}: input changed");
    }
}

#[test]
fn one_damaged_header_falls_back_to_the_other() {
    let p = damaged(|p| poke(p, (128 << 10) + 100, &[1]));
    let mut img = VhdxImage::open(&p, OpenMode::ReadOnly).unwrap();
    assert_eq!(read(&mut img, 0, 4096), vec![1u8; 4096]);
}

#[test]
fn crash_file_states_are_used_not_just_the_real_file() {
    // Sanity: the CrashFile backed image behaves like a real one.
    let f = CrashFile::new();
    let mut img = VhdxImage::create_in(
        f.clone(),
        std::path::Path::new("m.vhdx"),
        &dynamic(4 << 20, 1 << 20),
        None,
    )
    .unwrap();
    write(&mut img, 0, &[3u8; 512]);
    img.close().unwrap();
    assert!(f.len().unwrap() > 4 << 20);
}

#[test]
fn two_identical_headers_with_equal_sequence_numbers_are_accepted() {
    // Disk2vhd writes both headers with sequence number 1 and identical content.
    let p = damaged(|p| {
        let f = std::fs::File::open(p).unwrap();
        let mut h = vec![0u8; 4096];
        std::os::unix::fs::FileExt::read_exact_at(&f, &mut h, 64 << 10).unwrap();
        let mut header = vhdx::format::Header::parse(&h);
        header.sequence_number = 1;
        let bytes = header.to_bytes();
        poke(p, 64 << 10, &bytes);
        poke(p, 128 << 10, &bytes);
    });
    let mut img = VhdxImage::open(&p, OpenMode::ReadOnly).unwrap();
    assert_eq!(img.header().sequence_number, 1);
    assert_eq!(read(&mut img, 0, 4096), vec![1u8; 4096]);
    drop(img);
    // A writable session moves on to sequence 2 in the other slot and stays readable.
    let mut img = VhdxImage::open(&p, OpenMode::ReadWrite).unwrap();
    write(&mut img, 4096, &[2u8; 512]);
    img.close().unwrap();
    let mut img = VhdxImage::open(&p, OpenMode::ReadOnly).unwrap();
    assert!(img.header().sequence_number > 1);
    assert_eq!(read(&mut img, 4096, 512), vec![2u8; 512]);
}

/// A pending log entry that zeroes 1 GiB past the end of a sparse file: a writable replay
/// punches holes (or relies on the file being extended) instead of writing zeros, so the
/// replay neither takes time nor disk space in proportion to what a hostile entry asks for.
#[test]
fn a_huge_zero_descriptor_in_the_log_is_replayed_without_writing_its_zeros() {
    use std::os::unix::fs::MetadataExt;
    let (file, _) = image_with_pending_log();
    let mut bytes = file.contents();
    let ro = VhdxImage::open_file(
        file.clone(),
        std::path::Path::new("p.vhdx"),
        OpenMode::ReadOnly,
    )
    .unwrap();
    let log_offset = ro.header().log_offset;
    drop(ro);
    // The entry at the start of the log: add one zero descriptor (first sector has room).
    let e = log_offset as usize;
    let le32 = |b: &[u8], at: usize| u32::from_le_bytes(b[at..at + 4].try_into().unwrap());
    let le64 = |b: &[u8], at: usize| u64::from_le_bytes(b[at..at + 8].try_into().unwrap());
    assert_eq!(&bytes[e..e + 4], b"loge");
    let length = le32(&bytes, e + 8) as usize;
    let sequence = le64(&bytes, e + 16);
    let count = le32(&bytes, e + 24) as usize;
    let zero_at = (bytes.len() as u64).next_multiple_of(1 << 20);
    let zero_len = 1u64 << 30;
    let d = e + 64 + 32 * count;
    bytes[d..d + 4].copy_from_slice(b"zero");
    bytes[d + 8..d + 16].copy_from_slice(&zero_len.to_le_bytes());
    bytes[d + 16..d + 24].copy_from_slice(&zero_at.to_le_bytes());
    bytes[d + 24..d + 32].copy_from_slice(&sequence.to_le_bytes());
    bytes[e + 24..e + 28].copy_from_slice(&(count as u32 + 1).to_le_bytes());
    bytes[e + 56..e + 64].copy_from_slice(&(zero_at + zero_len).to_le_bytes());
    vhdx::format::seal(&mut bytes[e..e + length], 4);

    let p = scratch().join("zero-log.vhdx");
    std::fs::write(&p, &bytes).unwrap();
    let img = VhdxImage::open(&p, OpenMode::ReadWrite).unwrap();
    assert!(img.replayed_log());
    img.close().unwrap();
    let m = std::fs::metadata(&p).unwrap();
    assert!(
        m.len() >= zero_at + zero_len,
        "file extended to the entry's last offset"
    );
    let allocated = m.blocks() * 512;
    assert!(
        allocated < 64 << 20,
        "the replay allocated {allocated} bytes for a 1 GiB zero descriptor"
    );
    assert_eq!(vhdx::check(&p).unwrap().corruptions, vec![]);
}
