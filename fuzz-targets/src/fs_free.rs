//! `fs_free`: arbitrary bytes (raw or [`crate::sparse`]-encoded, so real mkfs images make small
//! inputs) as a volume, probed and scanned as every file system `fs-free` reads.
//!
//! Oracle beyond "no panic, bounded memory, no hang": `detect` is deterministic; every scan
//! that succeeds reports non-empty ranges in ascending order, disjoint, inside the volume and
//! summing to its `free`; a forced scan succeeds whenever the unforced one does, with the same
//! ranges.

use fs_free::{FsType, Options, Volume};

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

fn scan(disk: &[u8], fs: FsType, force: bool) -> Option<Vec<(u64, u64)>> {
    let mut read = |off: u64, buf: &mut [u8]| {
        buf.copy_from_slice(&disk[off as usize..off as usize + buf.len()]);
        Ok(())
    };
    let mut vol = Volume::new(disk.len() as u64, &mut read);
    let mut ranges = Vec::new();
    let s = fs_free::scan(&mut vol, fs, Options { force }, &mut |o, l| {
        ranges.push((o, l))
    })
    .ok()?;
    let mut end = 0u64;
    for &(o, l) in &ranges {
        assert!(l > 0 && o >= end, "{fs}: ranges out of order: {ranges:?}");
        end = o + l;
    }
    assert!(end <= disk.len() as u64, "{fs}: a range past the volume");
    assert_eq!(
        ranges.iter().map(|r| r.1).sum::<u64>(),
        s.free,
        "{fs}: free sum"
    );
    Some(ranges)
}

/// The target body.
pub fn fs_free(data: &[u8]) {
    let disk = crate::sparse::decode(data);
    let detect = |disk: &[u8]| {
        let mut read = |off: u64, buf: &mut [u8]| {
            buf.copy_from_slice(&disk[off as usize..off as usize + buf.len()]);
            Ok(())
        };
        let mut vol = Volume::new(disk.len() as u64, &mut read);
        fs_free::detect(&mut vol).ok().flatten()
    };
    assert_eq!(detect(&disk), detect(&disk), "detect is not deterministic");
    for fs in ALL {
        let plain = scan(&disk, fs, false);
        let forced = scan(&disk, fs, true);
        if let Some(p) = plain {
            assert_eq!(
                Some(p),
                forced,
                "{fs}: forcing changed a scan that needed no force"
            );
        }
    }
}
