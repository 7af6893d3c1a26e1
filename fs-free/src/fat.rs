//! FAT12, FAT16 and FAT32: a cluster is free when its FAT entry is 0.
//!
//! ```text
//!   sector 0: boot sector + BPB ─ bytes/sector, sectors/cluster, reserved sectors, FATs,
//!             root entries (FAT12/16), total sectors, FAT size, ext flags (FAT32: active FAT)
//!   reserved sectors │ FAT 0 │ FAT 1 … │ root directory (FAT12/16) │ data: cluster 2, 3, …
//!   FAT entry n (12, 16 or 28 bits): 0 = cluster n free
//! ```
//!
//! The type comes from the cluster count, as the FAT specification defines it (< 4085 FAT12,
//! < 65525 FAT16, else FAT32). The active FAT is read (FAT32 may disable mirroring and name
//! one), streamed in bounded chunks. Refused unless forced: the volume marked dirty, in the
//! boot sector's state byte (set by Linux while mounted) or by the clean-shutdown bit of FAT
//! entry 1 (cleared by Windows while mounted).

use zerocopy::little_endian::{U16, U32};
use zerocopy::{FromBytes, Immutable, KnownLayout, Unaligned};

use crate::{unsafe_state, Error, FsType, Options, Result, Runs, Sink, Summary, Volume};

const FS: &str = "fat";
/// FAT bytes read at a time.
const CHUNK: u64 = 1 << 20;

/// The BIOS parameter block all FAT types share (bytes 0..36 of the boot sector).
#[repr(C)]
#[derive(Debug, FromBytes, KnownLayout, Immutable, Unaligned)]
pub struct Bpb {
    /// Jump instruction.
    pub jump: [u8; 3],
    /// OEM name.
    pub oem: [u8; 8],
    /// Bytes per sector (512, 1024, 2048, 4096).
    pub bytes_per_sector: U16,
    /// Sectors per cluster (a power of two).
    pub sectors_per_cluster: u8,
    /// Sectors before the first FAT.
    pub reserved_sectors: U16,
    /// Number of FATs.
    pub num_fats: u8,
    /// Root directory entries (FAT12/16; 0 on FAT32).
    pub root_entries: U16,
    /// Total sectors if below 65536, else 0.
    pub total_sectors16: U16,
    /// Media descriptor.
    pub media: u8,
    /// Sectors per FAT (FAT12/16; 0 on FAT32).
    pub fat_size16: U16,
    /// Sectors per track.
    pub sectors_per_track: U16,
    /// Heads.
    pub heads: U16,
    /// Sectors before the volume.
    pub hidden_sectors: U32,
    /// Total sectors if `total_sectors16` is 0.
    pub total_sectors32: U32,
}
const _: () = assert!(std::mem::size_of::<Bpb>() == 36);

/// The FAT32 extension of the BPB (bytes 36..90).
#[repr(C)]
#[derive(Debug, FromBytes, KnownLayout, Immutable, Unaligned)]
pub struct Fat32Ext {
    /// Sectors per FAT.
    pub fat_size32: U32,
    /// Bit 7: mirroring disabled; bits 0-3: the active FAT then.
    pub ext_flags: U16,
    /// Version.
    pub fs_version: U16,
    /// First cluster of the root directory.
    pub root_cluster: U32,
    /// Sector of the FSInfo structure.
    pub fs_info: U16,
    /// Sector of the backup boot sector.
    pub backup_boot: U16,
    /// Reserved.
    pub reserved: [u8; 12],
    /// BIOS drive number.
    pub drive: u8,
    /// Bit 0: dirty (Linux sets it while mounted).
    pub state: u8,
    /// 0x29 when the next three fields are valid.
    pub boot_signature: u8,
    /// Volume serial number.
    pub volume_id: U32,
    /// Volume label.
    pub label: [u8; 11],
    /// `"FAT32   "`.
    pub fs_type: [u8; 8],
}
const _: () = assert!(std::mem::size_of::<Fat32Ext>() == 54);

/// What the BPB says, checked.
#[derive(Debug)]
struct Layout {
    fs: FsType,
    cluster: u64,
    fat_start: u64,
    fat_bytes: u64,
    data_start: u64,
    clusters: u64,
    total_bytes: u64,
    state: u8,
}

fn layout(boot: &[u8; 512]) -> Option<Layout> {
    if boot[510..512] != [0x55, 0xAA] {
        return None;
    }
    let bpb = Bpb::read_from_bytes(&boot[..36]).ok()?;
    let ext = Fat32Ext::read_from_bytes(&boot[36..90]).ok()?;
    let bps = u64::from(bpb.bytes_per_sector.get());
    let spc = u64::from(bpb.sectors_per_cluster);
    if !matches!(bps, 512 | 1024 | 2048 | 4096) || spc == 0 || !spc.is_power_of_two() {
        return None;
    }
    let rsvd = u64::from(bpb.reserved_sectors.get());
    let nfats = u64::from(bpb.num_fats);
    if rsvd == 0 || nfats == 0 || nfats > 4 {
        return None;
    }
    let tot = match bpb.total_sectors16.get() {
        0 => u64::from(bpb.total_sectors32.get()),
        n => u64::from(n),
    };
    let fat_sz = match bpb.fat_size16.get() {
        0 => u64::from(ext.fat_size32.get()),
        n => u64::from(n),
    };
    let root_sectors = (u64::from(bpb.root_entries.get()) * 32).div_ceil(bps);
    let meta = rsvd + nfats * fat_sz + root_sectors;
    if fat_sz == 0 || tot <= meta {
        return None;
    }
    let clusters = (tot - meta) / spc;
    let fs = if clusters < 4085 {
        FsType::Fat12
    } else if clusters < 65525 {
        FsType::Fat16
    } else {
        FsType::Fat32
    };
    // The type string must agree (mkfs.vfat, Windows and mtools all write it).
    let (type_str, state) = if fs == FsType::Fat32 {
        (&boot[0x52..0x5A], ext.state)
    } else {
        (&boot[0x36..0x3E], boot[0x25])
    };
    if !type_str.starts_with(b"FAT") || (fs == FsType::Fat32) != (bpb.fat_size16.get() == 0) {
        return None;
    }
    let mut active = 0;
    if fs == FsType::Fat32 && ext.ext_flags.get() & 0x80 != 0 {
        active = u64::from(ext.ext_flags.get() & 0xF);
        if active >= nfats {
            return None;
        }
    }
    Some(Layout {
        fs,
        cluster: spc * bps,
        fat_start: (rsvd + active * fat_sz) * bps,
        fat_bytes: fat_sz * bps,
        data_start: meta * bps,
        clusters,
        total_bytes: tot * bps,
        state,
    })
}

/// The FAT type of a boot sector, if it is a valid FAT one.
pub fn probe(boot: &[u8; 512]) -> Option<FsType> {
    layout(boot).map(|l| l.fs)
}

/// Scans a FAT12/16/32 volume; see the [module docs](self).
pub fn scan(vol: &mut Volume<'_>, opts: Options, mut sink: Sink<'_>) -> Result<Summary> {
    let mut boot = [0u8; 512];
    vol.read(FS, "boot sector", 0, &mut boot)?;
    let l = layout(&boot)
        .ok_or_else(|| Error::corrupt(FS, "boot sector", 0, "not a valid FAT boot sector"))?;
    if l.total_bytes > vol.size() {
        return Err(Error::corrupt(
            FS,
            "boot sector",
            0,
            format!(
                "the file system ({} bytes) is larger than its volume ({} bytes)",
                l.total_bytes,
                vol.size()
            ),
        ));
    }
    let bits = match l.fs {
        FsType::Fat12 => 12,
        FsType::Fat16 => 16,
        _ => 32,
    };
    let entries = l.clusters + 2;
    let need = (entries * bits).div_ceil(8);
    if need > l.fat_bytes {
        return Err(Error::corrupt(
            FS,
            "boot sector",
            0,
            format!(
                "a FAT of {} bytes cannot hold {entries} entries",
                l.fat_bytes
            ),
        ));
    }
    let mut warnings = Vec::new();
    if l.state & 1 != 0 {
        unsafe_state(
            FS,
            opts,
            &mut warnings,
            "the volume is marked dirty: it is mounted, or was not cleanly unmounted; run \
             fsck.vfat first"
                .into(),
        )?;
    }
    let mut runs = Runs::new(&mut sink);
    // Chunks hold whole entries (FAT12: whole pairs of entries, 3 bytes).
    let chunk = CHUNK - CHUNK % 12;
    let mut buf = vec![0u8; chunk.min(need) as usize];
    let mut first_entry = 0u64;
    let mut pos = 0u64;
    while pos < need {
        let n = (need - pos).min(chunk) as usize;
        vol.read(FS, "FAT", l.fat_start + pos, &mut buf[..n])?;
        let count = (n as u64 * 8 / bits).min(entries - first_entry);
        for i in 0..count {
            let e = first_entry + i;
            let v = match bits {
                12 => {
                    let at = (i * 3 / 2) as usize;
                    let w = u16::from_le_bytes([buf[at], *buf.get(at + 1).unwrap_or(&0)]);
                    u32::from(if i % 2 == 0 { w & 0xFFF } else { w >> 4 })
                }
                16 => {
                    let at = (i * 2) as usize;
                    u32::from(u16::from_le_bytes([buf[at], buf[at + 1]]))
                }
                _ => {
                    let at = (i * 4) as usize;
                    u32::from_le_bytes([buf[at], buf[at + 1], buf[at + 2], buf[at + 3]])
                        & 0x0FFF_FFFF
                }
            };
            if e == 1 {
                let clean = match bits {
                    16 => v & 0x8000 != 0,
                    32 => v & 0x0800_0000 != 0,
                    _ => true,
                };
                if !clean {
                    unsafe_state(
                        FS,
                        opts,
                        &mut warnings,
                        "FAT entry 1 says the volume was not shut down cleanly (mounted in \
                         Windows, or a crash); run fsck.vfat first"
                            .into(),
                    )?;
                }
            }
            if e >= 2 && v == 0 {
                runs.push(l.data_start + (e - 2) * l.cluster, l.cluster);
            }
        }
        first_entry += count;
        pos += n as u64;
    }
    let free = runs.finish();
    Ok(Summary {
        fs: l.fs,
        size: l.total_bytes,
        free,
        warnings,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn garbage_boot_sectors_are_not_fat() {
        assert_eq!(probe(&[0u8; 512]), None);
        let mut b = [0xFFu8; 512];
        assert_eq!(probe(&b), None);
        b[510] = 0x55;
        b[511] = 0xAA;
        assert_eq!(probe(&b), None);
    }
}
