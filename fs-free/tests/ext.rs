//! ext2/3/4 volumes made by mke2fs: the free ranges read from the block bitmaps are exactly the
//! free blocks `dumpe2fs` lists, for every layout (flex_bg, 64bit, meta_bg, 1 KiB blocks,
//! uninitialised groups, bigalloc), and damaged or unsafe volumes are refused.

use std::fs;
use std::os::unix::fs::FileExt;
use std::path::Path;
use std::process::Command;

use fs_free::{ErrorKind, FsType, Options, Volume};
use vhdkit_tests::{run, tool_or_skip};

/// Makes an ext file system in a fresh file of `mib` MiB with files from a directory, then
/// deletes every other file with debugfs.
fn make(dir: &Path, mib: u64, mkfs_args: &[&str]) -> std::path::PathBuf {
    let src = dir.join("src");
    fs::create_dir_all(&src).unwrap();
    for i in 0..24u32 {
        let data: Vec<u8> = (0..(i as usize + 1) * 150_000)
            .map(|j| (j as u32).wrapping_mul(2_654_435_761).wrapping_add(i) as u8)
            .collect();
        fs::write(src.join(format!("f{i}")), data).unwrap();
    }
    let img = dir.join("fs.img");
    let f = fs::File::create(&img).unwrap();
    f.set_len(mib << 20).unwrap();
    drop(f);
    let mut c = Command::new("mke2fs");
    c.args(["-q", "-F", "-d"])
        .arg(&src)
        .args(mkfs_args)
        .arg(&img);
    run(c);
    let rm: String = (0..24).step_by(2).map(|i| format!("rm f{i}\n")).collect();
    let cmds = dir.join("cmds");
    fs::write(&cmds, rm).unwrap();
    let mut c = Command::new("debugfs");
    c.args(["-w", "-f"]).arg(&cmds).arg(&img);
    run(c);
    img
}

/// Free ranges (in blocks) by dumpe2fs, merged.
fn dumpe2fs_free(img: &Path) -> (u64, Vec<(u64, u64)>) {
    let out = run(Command::new("dumpe2fs").arg(img));
    let text = String::from_utf8_lossy(&out.stdout);
    let mut bs = 0;
    let mut v: Vec<(u64, u64)> = Vec::new();
    for line in text.lines() {
        let l = line.trim();
        if let Some(x) = l.strip_prefix("Block size:") {
            bs = x.trim().parse().unwrap();
        }
        if !line.starts_with("  ") {
            continue;
        }
        if let Some(list) = l.strip_prefix("Free blocks: ") {
            for part in list.split(", ").filter(|p| !p.is_empty()) {
                let (a, b) = match part.split_once('-') {
                    Some((a, b)) => (a.parse::<u64>().unwrap(), b.parse::<u64>().unwrap()),
                    None => (part.parse().unwrap(), part.parse().unwrap()),
                };
                match v.last_mut() {
                    Some(last) if last.0 + last.1 == a => last.1 += b + 1 - a,
                    _ => v.push((a, b + 1 - a)),
                }
            }
        }
    }
    (bs, v)
}

/// The file system found, its free ranges and their sum.
type Scanned = (FsType, Vec<(u64, u64)>, u64);

fn scan(img: &Path, opts: Options) -> fs_free::Result<Scanned> {
    let f = fs::File::open(img).unwrap();
    let size = f.metadata().unwrap().len();
    let mut read = |off: u64, buf: &mut [u8]| f.read_exact_at(buf, off);
    let mut vol = Volume::new(size, &mut read);
    let fs = fs_free::detect(&mut vol)?.expect("a file system");
    let mut ranges: Vec<(u64, u64)> = Vec::new();
    let s = fs_free::scan(&mut vol, fs, opts, &mut |o, l| ranges.push((o, l)))?;
    assert_eq!(s.fs, fs);
    Ok((fs, ranges, s.free))
}

fn check_layout(mib: u64, args: &[&str], want: FsType) {
    check_layout_clusters(mib, args, want, 1)
}

/// As [`check_layout`] with bigalloc clusters of `cluster_blocks` blocks: dumpe2fs up to 1.47.0
/// ends each free range at the first block of its last cluster, 1.47.2 at its last block, so a
/// range that does not end on a cluster boundary is taken to its last cluster's end.
fn check_layout_clusters(mib: u64, args: &[&str], want: FsType, cluster_blocks: u64) {
    if !tool_or_skip("mke2fs") || !tool_or_skip("dumpe2fs") || !tool_or_skip("debugfs") {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let img = make(dir.path(), mib, args);
    let (bs, mut want_blocks) = dumpe2fs_free(&img);
    for r in &mut want_blocks {
        if (r.0 + r.1) % cluster_blocks != 0 {
            r.1 += cluster_blocks - 1;
        }
    }
    let (fs, ranges, free) = scan(&img, Options::default()).unwrap();
    assert_eq!(fs, want, "{args:?}");
    let got: Vec<(u64, u64)> = ranges.iter().map(|&(o, l)| (o / bs, l / bs)).collect();
    assert!(ranges.iter().all(|&(o, l)| o % bs == 0 && l % bs == 0));
    assert_eq!(got, want_blocks, "{args:?}");
    assert_eq!(free, want_blocks.iter().map(|r| r.1).sum::<u64>() * bs);
}

#[test]
fn ext4_default_layout_matches_dumpe2fs() {
    check_layout(256, &["-t", "ext4"], FsType::Ext4);
}

#[test]
fn ext4_64bit_metadata_csum_1k_blocks_matches_dumpe2fs() {
    check_layout(
        96,
        &["-t", "ext4", "-b", "1024", "-O", "64bit,metadata_csum"],
        FsType::Ext4,
    );
}

#[test]
fn ext4_without_metadata_csum_with_uninit_groups_matches_dumpe2fs() {
    check_layout(
        300,
        &["-t", "ext4", "-O", "^metadata_csum,uninit_bg"],
        FsType::Ext4,
    );
}

#[test]
fn ext4_meta_bg_matches_dumpe2fs() {
    check_layout(
        200,
        &[
            "-t",
            "ext4",
            "-O",
            "meta_bg,^resize_inode",
            "-g",
            "4096",
            "-N",
            "2048",
        ],
        FsType::Ext4,
    );
}

#[test]
fn ext4_bigalloc_matches_dumpe2fs() {
    check_layout_clusters(
        256,
        &["-t", "ext4", "-b", "4096", "-O", "bigalloc", "-C", "65536"],
        FsType::Ext4,
        16,
    );
}

#[test]
fn ext3_and_ext2_without_flex_bg_match_dumpe2fs() {
    check_layout(128, &["-t", "ext3"], FsType::Ext3);
    check_layout(128, &["-t", "ext2"], FsType::Ext2);
    check_layout(96, &["-t", "ext2", "-b", "1024"], FsType::Ext2);
}

#[test]
fn journal_needing_recovery_is_refused_unless_forced() {
    if !tool_or_skip("mke2fs") || !tool_or_skip("debugfs") {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let img = make(dir.path(), 64, &["-t", "ext4"]);
    let mut c = Command::new("debugfs");
    c.args(["-w", "-R", "feature needs_recovery"]).arg(&img);
    run(c);
    let e = scan(&img, Options::default()).unwrap_err();
    assert_eq!(e.kind(), ErrorKind::Unsafe, "{e}");
    assert!(e.to_string().contains("needs recovery"), "{e}");
    scan(&img, Options { force: true }).unwrap();
}

#[test]
fn corrupted_block_bitmap_fails_its_checksum() {
    if !tool_or_skip("mke2fs") || !tool_or_skip("dumpe2fs") {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let img = make(dir.path(), 64, &["-t", "ext4"]);
    let out = run(Command::new("dumpe2fs").arg(&img));
    let text = String::from_utf8_lossy(&out.stdout);
    // "  Block bitmap at 18 (+18), csum 0x..." of group 0
    let at: u64 = text
        .lines()
        .find_map(|l| l.trim().strip_prefix("Block bitmap at "))
        .and_then(|r| r.split_whitespace().next())
        .unwrap()
        .parse()
        .unwrap();
    let (bs, _) = dumpe2fs_free(&img);
    let f = fs::OpenOptions::new().write(true).open(&img).unwrap();
    f.write_all_at(&[0x00], at * bs + 1).unwrap();
    drop(f);
    let e = scan(&img, Options { force: true }).unwrap_err();
    assert_eq!(e.kind(), ErrorKind::Checksum, "{e}");
    assert!(e.to_string().contains("block bitmap of group 0"), "{e}");
}

#[test]
fn file_system_larger_than_its_volume_is_refused() {
    if !tool_or_skip("mke2fs") {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let img = make(dir.path(), 64, &["-t", "ext4"]);
    let f = fs::OpenOptions::new().write(true).open(&img).unwrap();
    f.set_len(32 << 20).unwrap();
    drop(f);
    let e = scan(&img, Options::default()).unwrap_err();
    assert_eq!(e.kind(), ErrorKind::Corrupt, "{e}");
    assert!(e.to_string().contains("larger than its volume"), "{e}");
}
