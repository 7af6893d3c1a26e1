//! FAT and exFAT volumes made by mkfs.vfat / mkfs.exfat: FAT12/16/32 with files copied in and
//! some deleted by mtools, whose free byte count must equal the free ranges' sum, and no free
//! range may hold a kept file's bytes; a fresh exFAT's free space is its heap less what mkfs
//! used, and a dirty exFAT is refused.

use std::fs;
use std::os::unix::fs::FileExt;
use std::path::Path;
use std::process::Command;

use fs_free::{FsType, Options, Volume};
use vhdkit_tests::{run, tool_or_skip};

fn scan(img: &Path) -> (FsType, Vec<(u64, u64)>, u64) {
    let f = fs::File::open(img).unwrap();
    let size = f.metadata().unwrap().len();
    let mut read = |off: u64, buf: &mut [u8]| f.read_exact_at(buf, off);
    let mut vol = Volume::new(size, &mut read);
    let fs = fs_free::detect(&mut vol).unwrap().expect("a file system");
    let mut ranges = Vec::new();
    let s = fs_free::scan(&mut vol, fs, Options::default(), &mut |o, l| {
        ranges.push((o, l))
    })
    .unwrap();
    (fs, ranges, s.free)
}

/// Free bytes as `minfo`/`mdir` report them ("N bytes free").
fn mtools_free(img: &Path) -> u64 {
    let out = run(Command::new("mdir").args(["-i"]).arg(img).arg("::"));
    let text = String::from_utf8_lossy(&out.stdout);
    let line = text.lines().find(|l| l.contains("bytes free")).unwrap();
    line.split_whitespace()
        .take_while(|w| *w != "bytes")
        .collect::<String>()
        .parse()
        .unwrap()
}

fn fat_case(mib: u64, args: &[&str], want: FsType) {
    if !tool_or_skip("mkfs.vfat") || !tool_or_skip("mcopy") || !tool_or_skip("mdir") {
        return;
    }
    let d = tempfile::tempdir().unwrap();
    let img = d.path().join("fat.img");
    fs::File::create(&img).unwrap().set_len(mib << 20).unwrap();
    let mut c = Command::new("mkfs.vfat");
    c.args(args).arg(&img);
    run(c);
    for i in 0..6u8 {
        let p = d.path().join(format!("f{i}"));
        fs::write(&p, vec![i + 1; 300_000 * (i as usize + 1)]).unwrap();
        let mut c = Command::new("mcopy");
        c.arg("-i").arg(&img).arg(&p).arg(format!("::f{i}"));
        run(c);
    }
    for i in [1, 3] {
        let mut c = Command::new("mdel");
        c.arg("-i").arg(&img).arg(format!("::f{i}"));
        run(c);
    }
    let (fs, ranges, free) = scan(&img);
    assert_eq!(fs, want);
    assert_eq!(free, mtools_free(&img), "{args:?}");
    // No free byte holds a kept file's data (each file is one repeated byte value).
    let f = fs::File::open(&img).unwrap();
    let mut buf = vec![0u8; 4096];
    for (o, l) in ranges {
        let mut at = o;
        while at < o + l {
            let n = (o + l - at).min(4096) as usize;
            f.read_exact_at(&mut buf[..n], at).unwrap();
            assert!(
                !buf[..n].iter().any(|&b| [1, 3, 5, 6].contains(&b)),
                "kept data at {at}"
            );
            at += n as u64;
        }
    }
}

#[test]
fn fat32_free_clusters_match_mtools() {
    fat_case(64, &["-F", "32"], FsType::Fat32);
}

#[test]
fn fat16_free_clusters_match_mtools() {
    fat_case(32, &["-F", "16"], FsType::Fat16);
}

#[test]
fn fat12_free_clusters_match_mtools() {
    fat_case(8, &["-F", "12"], FsType::Fat12);
}

#[test]
fn exfat_free_clusters_cover_the_heap_minus_what_mkfs_uses() {
    if !tool_or_skip("mkfs.exfat") {
        return;
    }
    let d = tempfile::tempdir().unwrap();
    let img = d.path().join("exfat.img");
    fs::File::create(&img).unwrap().set_len(64 << 20).unwrap();
    let mut c = Command::new("mkfs.exfat");
    c.arg(&img);
    run(c);
    let (fs, ranges, free) = scan(&img);
    assert_eq!(fs, FsType::ExFat);
    // A fresh volume: everything but the bitmap, up-case table and root directory is free.
    assert!(free > 60 << 20 && free < 64 << 20, "{free}");
    assert!(!ranges.is_empty());
    // Marked dirty: refused.
    let f = fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open(&img)
        .unwrap();
    let mut flags = [0u8; 2];
    f.read_exact_at(&mut flags, 0x6A).unwrap();
    f.write_all_at(&[flags[0] | 2, flags[1]], 0x6A).unwrap();
    let size = f.metadata().unwrap().len();
    let mut read = |off: u64, buf: &mut [u8]| f.read_exact_at(buf, off);
    let mut vol = Volume::new(size, &mut read);
    let e = fs_free::scan(&mut vol, FsType::ExFat, Options::default(), &mut |_, _| {}).unwrap_err();
    assert_eq!(e.kind(), fs_free::ErrorKind::Unsafe, "{e}");
}
