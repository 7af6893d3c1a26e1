//! What `compact --fs` and `convert --fs` share: the free space of every file system on a
//! virtual disk, found through its partition table and each file system's allocation map
//! (crate `fs-free`).
//!
//! ```text
//!   disk ──block_backend::partitions──> p1 p2 p5 …   (or the whole disk: WSL's ext4.vhdx)
//!          each volume ──fs_free::detect──> ext4 / ntfs / fat32 / exfat / unknown (left alone)
//!                      ──fs_free::scan───> free ranges (volume-relative) ──+offset──> sink
//! ```
//!
//! Invariants: partitions may not overlap (a range free in one could be data in another);
//! anything outside a recognised file system (tables, gaps, unknown file systems, space past a
//! file system's end) is never reported free; a damaged table, a map that fails its checksum or
//! points outside its partition, or an unsafe state without `--force` stops everything before
//! a single byte is written.

use anyhow::{bail, Context, Result};
use block_backend::partitions::{self, PartitionKind, TableKind};
use fs_free::{ErrorKind, Options, Volume};
use serde::Serialize;

/// Reads virtual-disk bytes.
pub type DiskRead<'a> = &'a mut dyn FnMut(u64, &mut [u8]) -> std::io::Result<()>;

/// One volume of the disk and what its file system says.
#[derive(Debug, Clone, Serialize)]
#[serde(rename_all = "kebab-case")]
pub struct VolumeReport {
    /// Partition number (`p<N>`), or `None` for a file system on the whole disk.
    pub partition: Option<u32>,
    /// First byte on the disk.
    pub offset: u64,
    /// Size of the partition (or disk), bytes.
    pub size: u64,
    /// `ext4`, `ntfs`, `fat32`, `exfat`, …, `unknown`, or `<type> (left alone: <why>)` for a
    /// file system using what the readers do not handle; the last two are left alone.
    #[serde(rename = "type")]
    pub fs: String,
    /// Bytes the file system calls free.
    pub free: u64,
    /// Bytes of image blocks released because they lie in this volume's free space (filled in
    /// by `compact`).
    pub released: u64,
    /// Unsafe states passed over with `--force`.
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub warnings: Vec<String>,
}

impl VolumeReport {
    /// `p1`, or `disk`.
    pub fn name(&self) -> String {
        match self.partition {
            Some(n) => format!("p{n}"),
            None => "disk".into(),
        }
    }
}

/// Finds every volume's free space on a disk of `size` bytes (logical sectors of
/// `sector_size`), calling `sink(disk_offset, len)` for each free range; `force` passes over
/// unsafe states (journal to recover, dirty, hibernated) with a warning.
pub fn scan(
    size: u64,
    sector_size: u32,
    read: DiskRead<'_>,
    force: bool,
    sink: &mut dyn FnMut(u64, u64),
) -> Result<Vec<VolumeReport>> {
    // A file system on the whole disk (no table) comes first: a FAT or NTFS boot sector can
    // look like an MBR, but a GPT's protective MBR always wins.
    let table = partitions::scan(size, sector_size, |buf, off| {
        read(off, buf).map_err(|e| block_backend::Error::Io {
            path: "disk".into(),
            op: "read partition table",
            offset: off,
            source: e,
        })
    });
    let whole = {
        let mut r = |off: u64, buf: &mut [u8]| read(off, buf);
        let mut vol = Volume::new(size, &mut r);
        fs_free::detect(&mut vol).context("cannot probe the disk for a file system")?
    };
    let mut volumes: Vec<(Option<u32>, u64, u64)> = Vec::new();
    match (&table, whole) {
        (Ok(t), _) if t.kind == TableKind::Gpt => volumes.extend(
            t.partitions
                .iter()
                .map(|p| (Some(p.number), p.offset, p.size)),
        ),
        (_, Some(_)) => volumes.push((None, 0, size)),
        (Ok(t), None) if t.kind == TableKind::None => volumes.push((None, 0, size)),
        (Ok(t), None) => volumes.extend(
            t.partitions
                .iter()
                .filter(|p| {
                    !matches!(
                        p.kind,
                        PartitionKind::Mbr {
                            type_id: 0x05 | 0x0F | 0x85,
                            ..
                        }
                    )
                })
                .map(|p| (Some(p.number), p.offset, p.size)),
        ),
        (Err(e), None) => bail!("cannot read the partition table: {e}"),
    }
    let mut sorted: Vec<_> = volumes.iter().map(|v| (v.1, v.1 + v.2, v.0)).collect();
    sorted.sort_unstable();
    for w in sorted.windows(2) {
        if w[1].0 < w[0].1 {
            bail!(
                "partitions {} and {} overlap: their free space cannot be told apart from data",
                w[0].2.unwrap_or(0),
                w[1].2.unwrap_or(0)
            );
        }
    }
    let mut reports = Vec::new();
    for (number, offset, vsize) in volumes {
        let mut r = |off: u64, buf: &mut [u8]| read(offset + off, buf);
        let mut vol = Volume::new(vsize, &mut r);
        let mut report = VolumeReport {
            partition: number,
            offset,
            size: vsize,
            fs: "unknown".into(),
            free: 0,
            released: 0,
            warnings: Vec::new(),
        };
        let name = report.name();
        let fs = fs_free::detect(&mut vol)
            .with_context(|| format!("{name}: cannot probe for a file system"))?;
        if let Some(fs) = fs {
            let mut s = |o: u64, l: u64| sink(offset + o, l);
            let summary = match fs_free::scan(&mut vol, fs, Options { force }, &mut s) {
                Ok(s) => s,
                // A valid file system using what the readers do not handle: left alone, like
                // an unknown one (nothing was given to the sink before the error).
                Err(e) if e.kind() == ErrorKind::Unsupported => {
                    report.fs = format!("{fs} (left alone: {e})");
                    reports.push(report);
                    continue;
                }
                Err(e) if e.kind() == ErrorKind::Unsafe => bail!(
                    "{name} ({fs}): refusing to release its free space: {e} (--force releases \
                     it anyway, trusting the allocation map as it is)"
                ),
                Err(e) => {
                    return Err(anyhow::Error::new(e)
                        .context(format!("{name} ({fs}): cannot read the allocation map")))
                }
            };
            report.fs = fs.name().into();
            report.free = summary.free;
            report.warnings = summary.warnings;
        }
        reports.push(report);
    }
    Ok(reports)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::process::{Command, Stdio};

    const MIB: u64 = 1 << 20;

    /// The volumes and the free ranges of a disk.
    type Scanned = (Vec<VolumeReport>, Vec<(u64, u64)>);

    fn scan_bytes(disk: &[u8], force: bool) -> Result<Scanned> {
        let mut read = |off: u64, buf: &mut [u8]| {
            buf.copy_from_slice(&disk[off as usize..off as usize + buf.len()]);
            Ok(())
        };
        let mut ranges = Vec::new();
        let v = scan(disk.len() as u64, 512, &mut read, force, &mut |o, l| {
            ranges.push((o, l))
        })?;
        Ok((v, ranges))
    }

    /// An MBR with `(type, first sector, sectors)` primaries.
    fn mbr(disk: &mut [u8], parts: &[(u8, u32, u32)]) {
        for (i, &(t, first, n)) in parts.iter().enumerate() {
            let e = &mut disk[446 + 16 * i..446 + 16 * (i + 1)];
            e[4] = t;
            e[8..12].copy_from_slice(&first.to_le_bytes());
            e[12..16].copy_from_slice(&n.to_le_bytes());
        }
        disk[510] = 0x55;
        disk[511] = 0xAA;
    }

    #[test]
    fn file_system_with_an_unhandled_feature_is_left_alone() {
        if !vhdkit_tests::tool_or_skip("mke2fs") {
            return;
        }
        let dir = tempfile::tempdir().unwrap();
        let raw = dir.path().join("d.raw");
        std::fs::File::create(&raw)
            .unwrap()
            .set_len(4 * MIB)
            .unwrap();
        let mut c = Command::new("mke2fs");
        c.args(["-q", "-F", "-t", "ext2"]).arg(&raw);
        vhdkit_tests::run(c);
        let mut disk = std::fs::read(&raw).unwrap();
        disk[1024 + 0x60 + 3] |= 0x40; // an incompat feature no ext4 has (yet)
        let (v, ranges) = scan_bytes(&disk, false).unwrap();
        assert_eq!(v.len(), 1);
        // An unknown incompat feature makes it no ext2 or ext3: probed as ext4.
        assert!(v[0].fs.starts_with("ext4 (left alone: "), "{v:?}");
        assert_eq!(v[0].free, 0);
        assert!(ranges.is_empty());
    }

    #[test]
    fn overlapping_partitions_are_refused() {
        let mut disk = vec![0u8; 4 << 20];
        mbr(&mut disk, &[(0x83, 2048, 4096), (0x83, 4096, 2048)]);
        let e = scan_bytes(&disk, false).unwrap_err();
        assert!(e.to_string().contains("overlap"), "{e}");
    }

    #[test]
    fn unknown_file_systems_are_named_and_left_alone() {
        let mut disk = vec![0x5Au8; 4 << 20];
        disk[..512].fill(0);
        mbr(&mut disk, &[(0x83, 2048, 2048), (0x07, 4096, 2048)]);
        let (v, ranges) = scan_bytes(&disk, false).unwrap();
        assert_eq!(v.len(), 2);
        assert!(v.iter().all(|p| p.fs == "unknown" && p.free == 0), "{v:?}");
        assert!(ranges.is_empty());
    }

    #[test]
    fn ext4_beside_an_unknown_partition_reports_free_space_inside_it_only() {
        if !vhdkit_tests::tool_or_skip("mke2fs") || !vhdkit_tests::tool_or_skip("sfdisk") {
            return;
        }
        let dir = tempfile::tempdir().unwrap();
        let raw = dir.path().join("d.raw");
        std::fs::File::create(&raw)
            .unwrap()
            .set_len(64 * MIB)
            .unwrap();
        let mut c = Command::new("sfdisk");
        c.arg("-q").arg(&raw).stdin(Stdio::piped());
        let mut child = c.spawn().unwrap();
        std::io::Write::write_all(
            &mut child.stdin.take().unwrap(),
            b"label: gpt\nstart=2048, size=65536, type=L\nstart=67584, size=40960, type=L\n",
        )
        .unwrap();
        assert!(child.wait().unwrap().success());
        let mut c = Command::new("mke2fs");
        c.args(["-q", "-F", "-t", "ext4", "-E", "offset=1048576"])
            .arg(&raw)
            .arg("32M");
        vhdkit_tests::run(c);
        let mut disk = std::fs::read(&raw).unwrap();
        for (i, b) in disk[(33 * MIB) as usize..(53 * MIB) as usize]
            .iter_mut()
            .enumerate()
        {
            *b = (i * 7 + 3) as u8;
        }
        let (v, ranges) = scan_bytes(&disk, false).unwrap();
        assert_eq!(v.len(), 2, "{v:?}");
        assert_eq!((v[0].partition, v[0].fs.as_str()), (Some(1), "ext4"));
        assert_eq!((v[1].partition, v[1].fs.as_str()), (Some(2), "unknown"));
        assert!(v[0].free > 20 * MIB, "{v:?}");
        let total: u64 = ranges.iter().map(|r| r.1).sum();
        assert_eq!(total, v[0].free);
        assert!(ranges.iter().all(|&(o, l)| o >= MIB && o + l <= 33 * MIB));
    }
}
