//! exFAT: a cluster is free when its bit in the allocation bitmap is clear.
//!
//! ```text
//!   sector 0: boot sector ─ volume length, FAT offset/length, cluster heap offset, cluster
//!             count, root directory cluster, volume flags (active FAT, dirty), shifts
//!   FAT: 32-bit entries, next cluster of a chain
//!   root directory (a FAT chain) ─ entry 0x81 "allocation bitmap": first cluster, length
//!     └─> bitmap: bit i = cluster i + 2 in use (LSB first)
//! ```
//!
//! With two FATs (TexFAT) the bitmap whose flag matches the active FAT is read. Refused
//! unless forced: VolumeDirty (set while mounted) or MediaFailure.

use zerocopy::little_endian::{U16, U32, U64};
use zerocopy::{FromBytes, Immutable, KnownLayout, Unaligned};

use crate::{
    clear_runs, unsafe_state, Error, FsType, Options, Result, Runs, Sink, Summary, Volume,
};

const FS: &str = "exfat";
/// `FileSystemName`.
pub const OEM_ID: &[u8; 8] = b"EXFAT   ";
/// Most clusters of the root directory read.
const MAX_ROOT_CLUSTERS: u64 = 4096;
/// Largest root directory read, bytes.
const MAX_ROOT_BYTES: u64 = 16 << 20;
/// Directory entry type of the allocation bitmap.
const ENTRY_BITMAP: u8 = 0x81;

/// The exFAT boot sector (first 120 bytes).
#[repr(C)]
#[derive(Debug, FromBytes, KnownLayout, Immutable, Unaligned)]
pub struct BootSector {
    /// Jump instruction.
    pub jump: [u8; 3],
    /// `"EXFAT   "`.
    pub fs_name: [u8; 8],
    /// Zero (where a FAT BPB would be).
    pub must_be_zero: [u8; 53],
    /// Sectors before the volume.
    pub partition_offset: U64,
    /// Volume size in sectors.
    pub volume_length: U64,
    /// First FAT, in sectors.
    pub fat_offset: U32,
    /// Sectors per FAT.
    pub fat_length: U32,
    /// First sector of the cluster heap (cluster 2).
    pub cluster_heap_offset: U32,
    /// Clusters in the heap.
    pub cluster_count: U32,
    /// First cluster of the root directory.
    pub first_cluster_of_root: U32,
    /// Serial number.
    pub volume_serial: U32,
    /// Revision.
    pub revision: U16,
    /// Bit 0 active FAT, bit 1 dirty, bit 2 media failure.
    pub volume_flags: U16,
    /// log2(bytes per sector), 9..=12.
    pub bytes_per_sector_shift: u8,
    /// log2(sectors per cluster).
    pub sectors_per_cluster_shift: u8,
    /// 1, or 2 with TexFAT.
    pub number_of_fats: u8,
    /// BIOS drive.
    pub drive_select: u8,
    /// Percent of clusters in use.
    pub percent_in_use: u8,
    /// Reserved.
    pub reserved: [u8; 7],
}
const _: () = assert!(std::mem::size_of::<BootSector>() == 120);

struct Geo {
    cluster: u64,
    fat: u64,
    heap: u64,
    clusters: u64,
}

impl Geo {
    fn cluster_offset(&self, c: u64) -> u64 {
        self.heap + (c - 2) * self.cluster
    }

    fn valid(&self, c: u64) -> bool {
        c >= 2 && c < self.clusters + 2
    }
}

/// Next cluster of a chain, `None` at its end.
fn next(vol: &mut Volume<'_>, g: &Geo, c: u64) -> Result<Option<u64>> {
    let mut e = [0u8; 4];
    vol.read(FS, "FAT entry", g.fat + c * 4, &mut e)?;
    let n = u64::from(u32::from_le_bytes(e));
    if n >= 0xFFFF_FFF8 {
        return Ok(None);
    }
    if !g.valid(n) {
        return Err(Error::corrupt(
            FS,
            format!("FAT entry of cluster {c}"),
            g.fat + c * 4,
            format!("next cluster {n:#x} is outside the cluster heap"),
        ));
    }
    Ok(Some(n))
}

/// Scans an exFAT volume; see the [module docs](self).
pub fn scan(vol: &mut Volume<'_>, opts: Options, mut sink: Sink<'_>) -> Result<Summary> {
    let mut raw = [0u8; 512];
    vol.read(FS, "boot sector", 0, &mut raw)?;
    let b = BootSector::read_from_bytes(&raw[..120])
        .map_err(|_| Error::corrupt(FS, "boot sector", 0, "short"))?;
    let bad = |what: String| Error::corrupt(FS, "boot sector", 0, what);
    if &b.fs_name != OEM_ID {
        return Err(bad("no EXFAT signature".into()));
    }
    let bs = b.bytes_per_sector_shift;
    let cs = b.sectors_per_cluster_shift;
    if !(9..=12).contains(&bs) || u32::from(bs) + u32::from(cs) > 25 {
        return Err(bad(format!("sector shift {bs}, cluster shift {cs}")));
    }
    if !matches!(b.number_of_fats, 1 | 2) {
        return Err(bad(format!("{} FATs", b.number_of_fats)));
    }
    let bps = 1u64 << bs;
    let total = b
        .volume_length
        .get()
        .checked_mul(bps)
        .filter(|&t| t <= vol.size())
        .ok_or_else(|| {
            bad(format!(
                "the file system ({} sectors) is larger than its volume ({} bytes)",
                b.volume_length.get(),
                vol.size()
            ))
        })?;
    let flags = b.volume_flags.get();
    let active = u64::from(flags & 1).min(u64::from(b.number_of_fats) - 1);
    let g = Geo {
        cluster: bps << cs,
        fat: (u64::from(b.fat_offset.get()) + active * u64::from(b.fat_length.get())) * bps,
        heap: u64::from(b.cluster_heap_offset.get()) * bps,
        clusters: u64::from(b.cluster_count.get()),
    };
    let fat_end = g.fat + u64::from(b.fat_length.get()) * bps;
    if fat_end > total
        || (g.clusters + 2) * 4 > u64::from(b.fat_length.get()) * bps
        || g.heap + g.clusters * g.cluster > total
    {
        return Err(bad(format!(
            "FAT at {} ({} sectors), heap at {} ({} clusters of {}) do not fit the volume",
            g.fat,
            b.fat_length.get(),
            g.heap,
            g.clusters,
            g.cluster
        )));
    }
    let mut warnings = Vec::new();
    if flags & 0x2 != 0 {
        unsafe_state(
            FS,
            opts,
            &mut warnings,
            "the volume is marked dirty: it is mounted, or was not cleanly unmounted; run \
             fsck.exfat first"
                .into(),
        )?;
    }
    if flags & 0x4 != 0 {
        unsafe_state(
            FS,
            opts,
            &mut warnings,
            "the volume is marked as having media failures".into(),
        )?;
    }
    // Find the allocation bitmap entry in the root directory.
    let mut c = u64::from(b.first_cluster_of_root.get());
    let mut bitmap: Option<(u64, u64)> = None;
    let mut dir = vec![0u8; g.cluster.min(MAX_ROOT_BYTES) as usize];
    let mut seen = 0u64;
    'dir: loop {
        if !g.valid(c) {
            return Err(Error::corrupt(
                FS,
                "root directory",
                g.heap,
                format!("cluster {c:#x} is outside the cluster heap"),
            ));
        }
        seen += 1;
        if seen > MAX_ROOT_CLUSTERS || seen * g.cluster > MAX_ROOT_BYTES {
            return Err(Error::unsupported(FS, "a root directory this large"));
        }
        let at = g.cluster_offset(c);
        vol.read(FS, "root directory", at, &mut dir)?;
        for e in dir.chunks_exact(32) {
            match e[0] {
                0 => break 'dir,
                ENTRY_BITMAP if u64::from(e[1] & 1) == active => {
                    let first = u64::from(u32::from_le_bytes([e[20], e[21], e[22], e[23]]));
                    let len = u64::from_le_bytes(e[24..32].try_into().unwrap_or([0; 8]));
                    bitmap = Some((first, len));
                    break 'dir;
                }
                _ => {}
            }
        }
        match next(vol, &g, c)? {
            Some(n) => c = n,
            None => break,
        }
    }
    let Some((first, len)) = bitmap else {
        return Err(Error::corrupt(
            FS,
            "root directory",
            g.cluster_offset(u64::from(b.first_cluster_of_root.get())),
            "no allocation bitmap entry",
        ));
    };
    let need = g.clusters.div_ceil(8);
    if len < need {
        return Err(Error::corrupt(
            FS,
            "allocation bitmap entry",
            0,
            format!("{len} bytes cannot cover {} clusters", g.clusters),
        ));
    }
    // Stream the bitmap cluster by cluster along its chain.
    let mut runs = Runs::new(&mut sink);
    let mut buf = vec![0u8; g.cluster as usize];
    let mut c = first;
    let mut done = 0u64; // bitmap bytes consumed
    while done < need {
        if !g.valid(c) {
            return Err(Error::corrupt(
                FS,
                "allocation bitmap",
                g.heap,
                format!("cluster {c:#x} is outside the cluster heap"),
            ));
        }
        let n = (need - done).min(g.cluster) as usize;
        vol.read(FS, "allocation bitmap", g.cluster_offset(c), &mut buf[..n])?;
        let base = done * 8;
        let bits = (g.clusters - base).min(n as u64 * 8);
        clear_runs(&buf[..n], bits, |i, k| {
            runs.push(g.cluster_offset(2 + base + i), k * g.cluster)
        });
        done += n as u64;
        if done < need {
            let mut e = [0u8; 4];
            vol.read(FS, "FAT entry", g.fat + c * 4, &mut e)?;
            c = match u64::from(u32::from_le_bytes(e)) {
                // Not chained in the FAT: contiguous (NoFatChain).
                0 => c + 1,
                n if n >= 0xFFFF_FFF8 => {
                    return Err(Error::corrupt(
                        FS,
                        "allocation bitmap",
                        g.fat + c * 4,
                        format!("its cluster chain ends after {done} of {need} bytes"),
                    ))
                }
                n => n,
            };
        }
    }
    let free = runs.finish();
    Ok(Summary {
        fs: FsType::ExFat,
        size: total,
        free,
        warnings,
    })
}
