//! Hostile input: volumes made by the real tools, then damaged byte by byte (deterministic
//! pseudo-random positions in the metadata, random values), scanned for every file system type
//! whether detected or not. Nothing may panic, and whatever is reported keeps the contract:
//! ranges ascending, disjoint, non-empty, inside the volume, summing to `free`.

use std::fs;
use std::process::Command;

use fs_free::{FsType, Options, Volume};
use vhdkit_tests::{have_tool, run};

const ALL: [FsType; 8] = [
    FsType::Ext2,
    FsType::Ext3,
    FsType::Ext4,
    FsType::Ntfs,
    FsType::Fat12,
    FsType::Fat16,
    FsType::Fat32,
    FsType::ExFat,
];

/// Scans `disk` as every type; checks the contract of whatever succeeds.
fn scan_all(disk: &[u8]) {
    for fs in ALL {
        for force in [false, true] {
            let mut read = |off: u64, buf: &mut [u8]| {
                buf.copy_from_slice(&disk[off as usize..off as usize + buf.len()]);
                Ok(())
            };
            let mut vol = Volume::new(disk.len() as u64, &mut read);
            let _ = fs_free::detect(&mut vol);
            let mut ranges: Vec<(u64, u64)> = Vec::new();
            if let Ok(s) = fs_free::scan(&mut vol, fs, Options { force }, &mut |o, l| {
                ranges.push((o, l))
            }) {
                let mut end = 0;
                for &(o, l) in &ranges {
                    assert!(l > 0 && o >= end, "{fs}: {ranges:?}");
                    end = o + l;
                }
                assert!(end <= disk.len() as u64, "{fs}: range past the volume");
                assert_eq!(ranges.iter().map(|r| r.1).sum::<u64>(), s.free, "{fs}");
            }
        }
    }
}

/// xorshift
fn rng(seed: &mut u64) -> u64 {
    *seed ^= *seed << 13;
    *seed ^= *seed >> 7;
    *seed ^= *seed << 17;
    *seed
}

fn damage(tool: &str, args: &[&str], mib: u64, hot: u64) {
    if !have_tool(tool) {
        vhdkit_tests::skip_unless_ci(&format!("{tool} not found"));
        return;
    }
    let d = tempfile::tempdir().unwrap();
    let img = d.path().join("v.img");
    fs::File::create(&img).unwrap().set_len(mib << 20).unwrap();
    let mut c = Command::new(tool);
    c.args(args).arg(&img);
    run(c);
    let clean = fs::read(&img).unwrap();
    scan_all(&clean);
    let mut seed = 0x1234_5678_9ABC_DEF1u64;
    for _ in 0..200 {
        let mut disk = clean.clone();
        for _ in 0..(1 + rng(&mut seed) % 8) {
            // Mostly the metadata at the start, sometimes anywhere.
            let span = if rng(&mut seed) % 4 == 0 {
                disk.len() as u64
            } else {
                hot
            };
            let at = (rng(&mut seed) % span) as usize;
            disk[at] = rng(&mut seed) as u8;
        }
        scan_all(&disk);
    }
}

#[test]
fn damaged_ext4_never_panics() {
    damage("mke2fs", &["-q", "-F", "-t", "ext4"], 4, 64 << 10);
}

#[test]
fn damaged_ext2_with_1k_blocks_never_panics() {
    damage(
        "mke2fs",
        &["-q", "-F", "-t", "ext2", "-b", "1024"],
        2,
        16 << 10,
    );
}

#[test]
fn damaged_fat_never_panics() {
    damage("mkfs.vfat", &["-F", "32"], 40, 64 << 10);
    damage("mkfs.vfat", &["-F", "12"], 1, 16 << 10);
}

#[test]
fn damaged_exfat_never_panics() {
    damage("mkfs.exfat", &[], 4, 1 << 20);
}

#[test]
fn damaged_ntfs_never_panics() {
    // The MFT lies past the start: damage the whole (small) volume.
    damage("mkntfs", &["-q", "-F", "-Q"], 2, 2 << 20);
}

#[test]
fn truncated_volumes_never_panic() {
    for len in [0usize, 100, 511, 512, 1500, 2048, 4096] {
        let mut disk = vec![0u8; len];
        if len >= 512 {
            disk[3..11].copy_from_slice(b"NTFS    ");
        }
        scan_all(&disk);
        if len >= 2048 {
            disk[1024 + 0x38] = 0x53;
            disk[1024 + 0x39] = 0xEF;
            scan_all(&disk);
        }
    }
}
