//! ext2, ext3 and ext4: free blocks from the block bitmaps of every block group.
//!
//! ```text
//!   byte 1024: superblock ─ block size, blocks per group, features, state, checksum seed
//!   block (1024 / block size) + 1: group descriptor table   (meta_bg: one descriptor block
//!                                  at the start of each meta group, after its backup superblock)
//!     descriptor g ─ block bitmap location (lo | hi << 32 under 64bit), flags, checksums
//!       └─> block bitmap: bit i = cluster i of group g in use (LSB first); 0 = free
//! ```
//!
//! flex_bg only moves bitmaps and inode tables elsewhere, which the descriptors already say;
//! bigalloc makes each bit a cluster of 2^n blocks. A group flagged `BLOCK_UNINIT` (under
//! gdt_csum or metadata_csum) has no bitmap on disk: its used blocks are its superblock backup
//! and descriptor blocks and any group's bitmaps and inode table lying in it, which are
//! counted as used here (with bigalloc the whole group counts as used).
//!
//! Checked before anything is reported: the superblock (and under metadata_csum its CRC-32C,
//! each descriptor's and each block bitmap's checksum), every bitmap and inode table lying
//! inside the file system, which lies inside the volume, and each bitmap's free count agreeing
//! with its descriptor. Refused unless forced: a journal needing recovery (`needs_recovery`,
//! set while mounted or after a crash), a file system not marked clean or marked with errors.

use zerocopy::little_endian::{U16, U32, U64};
use zerocopy::{FromBytes, Immutable, KnownLayout, Unaligned};

use crate::{clear_runs, unsafe_state, Error, FsType, Options, Result, Sink, Summary, Volume};

const FS: &str = "ext";
/// Byte offset of the superblock.
pub const SUPERBLOCK_OFFSET: u64 = 1024;
/// `s_magic`.
pub const MAGIC: u16 = 0xEF53;
/// Most block groups read (2^21 groups: 256 TiB at 4 KiB blocks).
pub const MAX_GROUPS: u64 = 1 << 21;

// s_state
const STATE_VALID: u16 = 0x1;
const STATE_ERROR: u16 = 0x2;
// s_feature_compat
const COMPAT_HAS_JOURNAL: u32 = 0x4;
const COMPAT_SPARSE_SUPER2: u32 = 0x200;
// s_feature_incompat
const INCOMPAT_COMPRESSION: u32 = 0x1;
const INCOMPAT_FILETYPE: u32 = 0x2;
const INCOMPAT_RECOVER: u32 = 0x4;
const INCOMPAT_JOURNAL_DEV: u32 = 0x8;
const INCOMPAT_META_BG: u32 = 0x10;
const INCOMPAT_64BIT: u32 = 0x80;
const INCOMPAT_CSUM_SEED: u32 = 0x2000;
/// Every incompat feature whose meaning for block allocation is known (all but compression
/// and journal devices leave the block bitmaps as they are).
const INCOMPAT_KNOWN: u32 = 0x0003_F7DF;
/// Features ext2/ext3 also have (anything else makes it ext4).
const INCOMPAT_EXT3: u32 = INCOMPAT_FILETYPE | INCOMPAT_RECOVER | INCOMPAT_META_BG;
// s_feature_ro_compat
const RO_COMPAT_SPARSE_SUPER: u32 = 0x1;
const RO_COMPAT_LARGE_FILE: u32 = 0x2;
const RO_COMPAT_BTREE_DIR: u32 = 0x4;
const RO_COMPAT_GDT_CSUM: u32 = 0x10;
const RO_COMPAT_HAS_SNAPSHOT: u32 = 0x80;
const RO_COMPAT_BIGALLOC: u32 = 0x200;
const RO_COMPAT_METADATA_CSUM: u32 = 0x400;
/// Known ro_compat features, less snapshots (whose exclude bitmaps change what is free).
const RO_COMPAT_KNOWN: u32 = 0x0001_FFFF & !RO_COMPAT_HAS_SNAPSHOT;
const RO_COMPAT_EXT3: u32 = RO_COMPAT_SPARSE_SUPER | RO_COMPAT_LARGE_FILE | RO_COMPAT_BTREE_DIR;
// bg_flags
const BG_BLOCK_UNINIT: u16 = 0x2;

/// The superblock (`struct ext4_super_block`), at byte 1024.
#[repr(C)]
#[derive(Debug, FromBytes, KnownLayout, Immutable, Unaligned)]
pub struct SuperBlock {
    /// Total inodes.
    pub inodes_count: U32,
    /// Total blocks (low 32 bits).
    pub blocks_count_lo: U32,
    /// Blocks reserved for root (low).
    pub r_blocks_count_lo: U32,
    /// Free blocks (low; not kept exact while mounted).
    pub free_blocks_count_lo: U32,
    /// Free inodes.
    pub free_inodes_count: U32,
    /// First data block: 1 for 1 KiB blocks, else 0.
    pub first_data_block: U32,
    /// Block size is 1024 << this.
    pub log_block_size: U32,
    /// Cluster size is 1024 << this (bigalloc).
    pub log_cluster_size: U32,
    /// Blocks per group.
    pub blocks_per_group: U32,
    /// Clusters per group (bits per block bitmap).
    pub clusters_per_group: U32,
    /// Inodes per group.
    pub inodes_per_group: U32,
    /// Last mount time.
    pub mtime: U32,
    /// Last write time.
    pub wtime: U32,
    /// Mounts since the last check.
    pub mnt_count: U16,
    /// Mounts allowed before a check.
    pub max_mnt_count: U16,
    /// 0xEF53.
    pub magic: U16,
    /// 1 clean, 2 errors detected, 4 orphans being recovered.
    pub state: U16,
    /// Behaviour on errors.
    pub errors: U16,
    /// Minor revision.
    pub minor_rev_level: U16,
    /// Last check time.
    pub lastcheck: U32,
    /// Maximum time between checks.
    pub checkinterval: U32,
    /// Creator OS.
    pub creator_os: U32,
    /// Revision (0 original, 1 dynamic).
    pub rev_level: U32,
    /// Default uid for reserved blocks.
    pub def_resuid: U16,
    /// Default gid for reserved blocks.
    pub def_resgid: U16,
    /// First non-reserved inode.
    pub first_ino: U32,
    /// Inode size.
    pub inode_size: U16,
    /// Group holding this superblock copy.
    pub block_group_nr: U16,
    /// Compatible features.
    pub feature_compat: U32,
    /// Incompatible features.
    pub feature_incompat: U32,
    /// Read-only compatible features.
    pub feature_ro_compat: U32,
    /// Volume UUID.
    pub uuid: [u8; 16],
    /// Volume label.
    pub volume_name: [u8; 16],
    /// Last mount point.
    pub last_mounted: [u8; 64],
    /// Compression algorithms.
    pub algorithm_usage_bitmap: U32,
    /// Blocks to preallocate for files.
    pub prealloc_blocks: u8,
    /// Blocks to preallocate for directories.
    pub prealloc_dir_blocks: u8,
    /// Descriptor blocks reserved for growth.
    pub reserved_gdt_blocks: U16,
    /// Journal UUID.
    pub journal_uuid: [u8; 16],
    /// Journal inode.
    pub journal_inum: U32,
    /// Journal device.
    pub journal_dev: U32,
    /// Head of the orphan inode list.
    pub last_orphan: U32,
    /// Directory hash seed.
    pub hash_seed: [U32; 4],
    /// Default hash version.
    pub def_hash_version: u8,
    /// Journal backup type.
    pub jnl_backup_type: u8,
    /// Group descriptor size (64bit).
    pub desc_size: U16,
    /// Default mount options.
    pub default_mount_opts: U32,
    /// First meta block group (meta_bg).
    pub first_meta_bg: U32,
    /// Creation time.
    pub mkfs_time: U32,
    /// Backup of the journal inode's blocks.
    pub jnl_blocks: [U32; 17],
    /// Total blocks (high 32 bits, 64bit).
    pub blocks_count_hi: U32,
    /// Reserved blocks (high).
    pub r_blocks_count_hi: U32,
    /// Free blocks (high).
    pub free_blocks_count_hi: U32,
    /// Smallest extra inode size.
    pub min_extra_isize: U16,
    /// Wanted extra inode size.
    pub want_extra_isize: U16,
    /// Miscellaneous flags.
    pub flags: U32,
    /// RAID stride.
    pub raid_stride: U16,
    /// MMP update interval.
    pub mmp_interval: U16,
    /// MMP block.
    pub mmp_block: U64,
    /// RAID stripe width.
    pub raid_stripe_width: U32,
    /// Groups per flex group is 2^this.
    pub log_groups_per_flex: u8,
    /// Checksum type (1 = CRC-32C).
    pub checksum_type: u8,
    /// Padding.
    pub reserved_pad: U16,
    /// Lifetime KiB written.
    pub kbytes_written: U64,
    /// Snapshot, error and quota fields this reader does not use.
    pub _middle: [u8; 0xCC],
    /// Groups holding superblock backups (sparse_super2).
    pub backup_bgs: [U32; 2],
    /// Encryption and more fields this reader does not use.
    pub _middle2: [u8; 0x1C],
    /// Checksum seed (csum_seed feature).
    pub checksum_seed: U32,
    /// Later fields and padding.
    pub _tail: [u8; 0x188],
    /// CRC-32C of the bytes before this field (metadata_csum).
    pub checksum: U32,
}
const _: () = assert!(std::mem::size_of::<SuperBlock>() == 1024);

/// A group descriptor (`struct ext4_group_desc`), 64 bytes under 64bit (32 otherwise: the high
/// halves read as zero).
#[repr(C)]
#[derive(Debug, FromBytes, KnownLayout, Immutable, Unaligned)]
pub struct GroupDesc {
    /// Block bitmap block (low).
    pub block_bitmap_lo: U32,
    /// Inode bitmap block (low).
    pub inode_bitmap_lo: U32,
    /// First inode table block (low).
    pub inode_table_lo: U32,
    /// Free blocks (low).
    pub free_blocks_count_lo: U16,
    /// Free inodes (low).
    pub free_inodes_count_lo: U16,
    /// Directories (low).
    pub used_dirs_count_lo: U16,
    /// INODE_UNINIT 1, BLOCK_UNINIT 2, INODE_ZEROED 4.
    pub flags: U16,
    /// Snapshot exclude bitmap (low).
    pub exclude_bitmap_lo: U32,
    /// Block bitmap checksum (low 16 bits).
    pub block_bitmap_csum_lo: U16,
    /// Inode bitmap checksum (low).
    pub inode_bitmap_csum_lo: U16,
    /// Unused inode table entries (low).
    pub itable_unused_lo: U16,
    /// Descriptor checksum.
    pub checksum: U16,
    /// Block bitmap block (high).
    pub block_bitmap_hi: U32,
    /// Inode bitmap block (high).
    pub inode_bitmap_hi: U32,
    /// First inode table block (high).
    pub inode_table_hi: U32,
    /// Free blocks (high).
    pub free_blocks_count_hi: U16,
    /// Free inodes (high).
    pub free_inodes_count_hi: U16,
    /// Directories (high).
    pub used_dirs_count_hi: U16,
    /// Unused inode table entries (high).
    pub itable_unused_hi: U16,
    /// Snapshot exclude bitmap (high).
    pub exclude_bitmap_hi: U32,
    /// Block bitmap checksum (high 16 bits).
    pub block_bitmap_csum_hi: U16,
    /// Inode bitmap checksum (high).
    pub inode_bitmap_csum_hi: U16,
    /// Padding.
    pub reserved: U32,
}
const _: () = assert!(std::mem::size_of::<GroupDesc>() == 64);
/// Byte offset of `checksum` in a descriptor.
const GD_CHECKSUM_AT: usize = 0x1E;

/// CRC-32C as ext4 computes it: seeded with `seed`, no final inversion.
fn crc32c_raw(seed: u32, data: &[u8]) -> u32 {
    !crc32c::crc32c_append(!seed, data)
}

/// What one descriptor says, widened.
#[derive(Debug, Clone, Copy)]
struct Group {
    block_bitmap: u64,
    inode_bitmap: u64,
    inode_table: u64,
    free: u64,
    flags: u16,
    bitmap_csum: u32,
}

/// The geometry the superblock gives, checked.
#[derive(Debug)]
struct Geometry {
    block_size: u64,
    /// Blocks per cluster (1 without bigalloc).
    ratio: u64,
    blocks_count: u64,
    first_data_block: u64,
    blocks_per_group: u64,
    clusters_per_group: u64,
    groups: u64,
    desc_size: u64,
    incompat: u32,
    ro_compat: u32,
    compat: u32,
    csum_seed: Option<u32>,
    gdt_blocks: u64,
    reserved_gdt: u64,
    first_meta_bg: u64,
    backup_bgs: [u64; 2],
    inode_table_blocks: u64,
}

/// Reads the superblock, if the magic is there.
fn read_superblock(vol: &mut Volume<'_>) -> Result<Option<Box<SuperBlock>>> {
    if vol.size() < SUPERBLOCK_OFFSET + 1024 {
        return Ok(None);
    }
    let mut raw = vec![0u8; 1024];
    vol.read(FS, "superblock", SUPERBLOCK_OFFSET, &mut raw)?;
    let sb = SuperBlock::read_from_bytes(&raw)
        .map_err(|_| Error::corrupt(FS, "superblock", SUPERBLOCK_OFFSET, "short superblock"))?;
    if sb.magic.get() != MAGIC {
        return Ok(None);
    }
    Ok(Some(Box::new(sb)))
}

/// ext2, ext3 or ext4, by the superblock's magic and features.
pub fn probe(vol: &mut Volume<'_>) -> Result<Option<FsType>> {
    let Some(sb) = read_superblock(vol)? else {
        return Ok(None);
    };
    let incompat = sb.feature_incompat.get();
    let ro = sb.feature_ro_compat.get();
    Ok(Some(
        if incompat & !INCOMPAT_EXT3 != 0 || ro & !RO_COMPAT_EXT3 != 0 {
            FsType::Ext4
        } else if sb.feature_compat.get() & COMPAT_HAS_JOURNAL != 0 {
            FsType::Ext3
        } else {
            FsType::Ext2
        },
    ))
}

fn geometry(sb: &SuperBlock, raw_sb: &[u8], vol_size: u64) -> Result<Geometry> {
    let bad = |what: String| Error::corrupt(FS, "superblock", SUPERBLOCK_OFFSET, what);
    let incompat = sb.feature_incompat.get();
    let ro_compat = sb.feature_ro_compat.get();
    let compat = sb.feature_compat.get();
    if incompat & INCOMPAT_JOURNAL_DEV != 0 {
        return Err(Error::unsupported(FS, "an external journal device"));
    }
    if incompat & INCOMPAT_COMPRESSION != 0 {
        return Err(Error::unsupported(FS, "the compression feature"));
    }
    if incompat & !INCOMPAT_KNOWN != 0 {
        return Err(Error::unsupported(
            FS,
            format!("incompatible features {:#x}", incompat & !INCOMPAT_KNOWN),
        ));
    }
    if ro_compat & !RO_COMPAT_KNOWN != 0 {
        return Err(Error::unsupported(
            FS,
            format!("read-only features {:#x}", ro_compat & !RO_COMPAT_KNOWN),
        ));
    }
    let log_bs = sb.log_block_size.get();
    if log_bs > 6 {
        return Err(bad(format!("block size 1024 << {log_bs}")));
    }
    let block_size = 1024u64 << log_bs;
    let ratio = if ro_compat & RO_COMPAT_BIGALLOC != 0 {
        let lc = sb.log_cluster_size.get();
        if lc < log_bs || lc - log_bs > 16 {
            return Err(bad(format!(
                "cluster size 1024 << {lc} with block size {block_size}"
            )));
        }
        1u64 << (lc - log_bs)
    } else {
        1
    };
    let blocks_per_group = u64::from(sb.blocks_per_group.get());
    let clusters_per_group = if ratio == 1 {
        blocks_per_group
    } else {
        u64::from(sb.clusters_per_group.get())
    };
    if clusters_per_group == 0
        || clusters_per_group > 8 * block_size
        || clusters_per_group % 8 != 0
        || blocks_per_group != clusters_per_group * ratio
    {
        return Err(bad(format!(
            "{blocks_per_group} blocks and {clusters_per_group} clusters per group with \
             {block_size}-byte blocks"
        )));
    }
    let is64 = incompat & INCOMPAT_64BIT != 0;
    let mut blocks_count = u64::from(sb.blocks_count_lo.get());
    if is64 {
        blocks_count |= u64::from(sb.blocks_count_hi.get()) << 32;
    }
    let first_data_block = u64::from(sb.first_data_block.get());
    let expected_first = if block_size == 1024 && ratio == 1 {
        1
    } else {
        0
    };
    if first_data_block != expected_first || blocks_count <= first_data_block {
        return Err(bad(format!(
            "first data block {first_data_block} of {blocks_count} blocks"
        )));
    }
    let fs_bytes = blocks_count
        .checked_mul(block_size)
        .ok_or_else(|| bad(format!("{blocks_count} blocks overflow")))?;
    if fs_bytes > vol_size {
        return Err(Error::corrupt(
            FS,
            "superblock",
            SUPERBLOCK_OFFSET,
            format!(
                "the file system ({fs_bytes} bytes) is larger than its volume ({vol_size} bytes)"
            ),
        ));
    }
    let desc_size = if is64 {
        u64::from(sb.desc_size.get())
    } else {
        32
    };
    if !(32..=1024).contains(&desc_size) || !desc_size.is_power_of_two() || desc_size > block_size {
        return Err(bad(format!("group descriptor size {desc_size}")));
    }
    let groups = (blocks_count - first_data_block).div_ceil(blocks_per_group);
    if groups > MAX_GROUPS {
        return Err(Error::unsupported(
            FS,
            format!("{groups} block groups (at most {MAX_GROUPS})"),
        ));
    }
    let csum_seed = if ro_compat & RO_COMPAT_METADATA_CSUM != 0 {
        if sb.checksum_type != 1 {
            return Err(bad(format!("checksum type {}", sb.checksum_type)));
        }
        let computed = crc32c_raw(!0, &raw_sb[..0x3FC]);
        if computed != sb.checksum.get() {
            return Err(Error::Checksum {
                fs: FS,
                structure: "superblock".into(),
                offset: SUPERBLOCK_OFFSET,
                stored: sb.checksum.get(),
                computed,
            });
        }
        Some(if incompat & INCOMPAT_CSUM_SEED != 0 {
            sb.checksum_seed.get()
        } else {
            crc32c_raw(!0, &sb.uuid)
        })
    } else {
        None
    };
    let descs_per_block = block_size / desc_size;
    let gdt_blocks = groups.div_ceil(descs_per_block);
    let first_meta_bg = if incompat & INCOMPAT_META_BG != 0 {
        u64::from(sb.first_meta_bg.get()).min(gdt_blocks)
    } else {
        gdt_blocks
    };
    let inode_table_blocks = (u64::from(sb.inodes_per_group.get())
        * u64::from(sb.inode_size.get().max(128)))
    .div_ceil(block_size);
    Ok(Geometry {
        block_size,
        ratio,
        blocks_count,
        first_data_block,
        blocks_per_group,
        clusters_per_group,
        groups,
        desc_size,
        incompat,
        ro_compat,
        compat,
        csum_seed,
        gdt_blocks,
        reserved_gdt: u64::from(sb.reserved_gdt_blocks.get()),
        first_meta_bg,
        backup_bgs: [
            u64::from(sb.backup_bgs[0].get()),
            u64::from(sb.backup_bgs[1].get()),
        ],
        inode_table_blocks,
    })
}

impl Geometry {
    fn group_first_block(&self, g: u64) -> u64 {
        self.first_data_block + g * self.blocks_per_group
    }

    fn group_blocks(&self, g: u64) -> u64 {
        (self.blocks_count - self.group_first_block(g)).min(self.blocks_per_group)
    }

    /// Whether group `g` holds a superblock copy.
    fn has_super(&self, g: u64) -> bool {
        if g == 0 {
            return true;
        }
        if self.compat & COMPAT_SPARSE_SUPER2 != 0 {
            return g == self.backup_bgs[0] || g == self.backup_bgs[1];
        }
        if self.ro_compat & RO_COMPAT_SPARSE_SUPER == 0 || g == 1 {
            return true;
        }
        // Powers of 3, 5 and 7.
        [3u64, 5, 7].iter().any(|&b| {
            let mut p = b;
            while p < g {
                p *= b;
            }
            p == g
        })
    }

    /// Block number of descriptor block `i`.
    fn desc_block(&self, i: u64) -> u64 {
        let sb_block = 1024 / self.block_size;
        if i < self.first_meta_bg {
            return sb_block + 1 + i;
        }
        let g = i * (self.block_size / self.desc_size);
        let mut at = self.group_first_block(g) + u64::from(self.has_super(g));
        if self.block_size == 1024 && g == 0 && self.first_data_block == 0 {
            at += 1;
        }
        at
    }

    /// Whether bitmaps carry checksums and uninitialised groups may skip them.
    fn uninit_allowed(&self) -> bool {
        self.ro_compat & (RO_COMPAT_GDT_CSUM | RO_COMPAT_METADATA_CSUM) != 0
    }
}

/// Reads every group descriptor, verifying metadata_csum checksums and bounds.
fn read_groups(vol: &mut Volume<'_>, geo: &Geometry) -> Result<Vec<Group>> {
    let bs = geo.block_size;
    let ds = geo.desc_size as usize;
    let per_block = bs / geo.desc_size;
    let mut groups = Vec::with_capacity(geo.groups as usize);
    let mut block = vec![0u8; bs as usize];
    for i in 0..geo.gdt_blocks {
        let b = geo.desc_block(i);
        if b >= geo.blocks_count {
            return Err(Error::corrupt(
                FS,
                format!("group descriptor block {i}"),
                b * bs,
                format!("block {b} is past the end ({} blocks)", geo.blocks_count),
            ));
        }
        vol.read(
            FS,
            &format!("group descriptor block {i}"),
            b * bs,
            &mut block,
        )?;
        for j in 0..per_block {
            let g = i * per_block + j;
            if g >= geo.groups {
                break;
            }
            let raw = &block[j as usize * ds..(j as usize + 1) * ds];
            let mut full = [0u8; 64];
            full[..ds.min(64)].copy_from_slice(&raw[..ds.min(64)]);
            let d = GroupDesc::read_from_bytes(&full)
                .map_err(|_| Error::corrupt(FS, "group descriptor", b * bs, "short descriptor"))?;
            let at = b * bs + j * geo.desc_size;
            if let Some(seed) = geo.csum_seed {
                let mut c = crc32c_raw(seed, &(g as u32).to_le_bytes());
                c = crc32c_raw(c, &raw[..GD_CHECKSUM_AT]);
                c = crc32c_raw(c, &[0, 0]);
                c = crc32c_raw(c, &raw[GD_CHECKSUM_AT + 2..]);
                let computed = c & 0xFFFF;
                if computed != u32::from(d.checksum.get()) {
                    return Err(Error::Checksum {
                        fs: FS,
                        structure: format!("group descriptor {g}"),
                        offset: at,
                        stored: u32::from(d.checksum.get()),
                        computed,
                    });
                }
            }
            let wide = ds >= 64;
            let hi32 = |v: U32| if wide { u64::from(v.get()) << 32 } else { 0 };
            let hi16 = |v: U16| if wide { u64::from(v.get()) << 16 } else { 0 };
            let mut bitmap_csum = u32::from(d.block_bitmap_csum_lo.get());
            if wide {
                bitmap_csum |= u32::from(d.block_bitmap_csum_hi.get()) << 16;
            }
            let grp = Group {
                block_bitmap: u64::from(d.block_bitmap_lo.get()) | hi32(d.block_bitmap_hi),
                inode_bitmap: u64::from(d.inode_bitmap_lo.get()) | hi32(d.inode_bitmap_hi),
                inode_table: u64::from(d.inode_table_lo.get()) | hi32(d.inode_table_hi),
                free: u64::from(d.free_blocks_count_lo.get()) | hi16(d.free_blocks_count_hi),
                flags: d.flags.get(),
                bitmap_csum,
            };
            let inside = |first: u64, n: u64| {
                first >= geo.first_data_block
                    && first.checked_add(n).is_some_and(|e| e <= geo.blocks_count)
            };
            for (what, first, n) in [
                ("block bitmap", grp.block_bitmap, 1),
                ("inode bitmap", grp.inode_bitmap, 1),
                ("inode table", grp.inode_table, geo.inode_table_blocks),
            ] {
                if !inside(first, n) {
                    return Err(Error::corrupt(
                        FS,
                        format!("group descriptor {g}"),
                        at,
                        format!(
                            "{what} at block {first} (+{n}) points outside the file system \
                             ({} blocks)",
                            geo.blocks_count
                        ),
                    ));
                }
            }
            groups.push(grp);
        }
    }
    Ok(groups)
}

/// Free clusters of an uninitialised group (`BLOCK_UNINIT`): everything but its own
/// superblock/descriptor area and the metadata of any group placed in it.
fn uninit_free(geo: &Geometry, g: u64, meta: &[(u64, u64)], emit: &mut dyn FnMut(u64, u64)) {
    let first = geo.group_first_block(g);
    let end = first + geo.group_blocks(g);
    if geo.ratio != 1 {
        return; // bigalloc: counted as used
    }
    // Superblock copy, old-style descriptor blocks and reserved descriptor blocks of a group
    // with a backup; under meta_bg, the descriptor block of the first, second and last group
    // of each meta group (past the old-style ones).
    let mut pos = first;
    if geo.has_super(g) {
        pos += 1 + geo.first_meta_bg + geo.reserved_gdt;
    }
    if geo.incompat & INCOMPAT_META_BG != 0 {
        let per_meta = geo.block_size / geo.desc_size;
        let r = g % per_meta;
        if g / per_meta >= geo.first_meta_bg && (r == 0 || r == 1 || r == per_meta - 1) {
            pos += 1;
        }
    }
    // meta: sorted, merged (first, end) block ranges of every group's bitmaps and tables.
    let start_idx = meta.partition_point(|&(_, e)| e <= pos);
    for &(m0, m1) in &meta[start_idx..] {
        if m0 >= end {
            break;
        }
        if m0 > pos {
            emit(pos, m0 - pos);
        }
        pos = pos.max(m1);
    }
    if pos < end {
        emit(pos, end - pos);
    }
}

/// Scans an ext2/3/4 file system; see the [module docs](self).
pub fn scan(vol: &mut Volume<'_>, opts: Options, sink: Sink<'_>) -> Result<Summary> {
    let mut raw = vec![0u8; 1024];
    if vol.size() < SUPERBLOCK_OFFSET + 1024 {
        return Err(Error::corrupt(
            FS,
            "superblock",
            SUPERBLOCK_OFFSET,
            "volume too small",
        ));
    }
    vol.read(FS, "superblock", SUPERBLOCK_OFFSET, &mut raw)?;
    let sb = SuperBlock::read_from_bytes(&raw)
        .map_err(|_| Error::corrupt(FS, "superblock", SUPERBLOCK_OFFSET, "short superblock"))?;
    if sb.magic.get() != MAGIC {
        return Err(Error::corrupt(
            FS,
            "superblock",
            SUPERBLOCK_OFFSET,
            format!("magic {:#x}, not {MAGIC:#x}", sb.magic.get()),
        ));
    }
    let fs = probe(vol)?.unwrap_or(FsType::Ext4);
    let geo = geometry(&sb, &raw, vol.size())?;
    let mut warnings = Vec::new();
    if geo.incompat & INCOMPAT_RECOVER != 0 {
        unsafe_state(
            FS,
            opts,
            &mut warnings,
            "the journal needs recovery (needs_recovery): the file system is mounted, or was \
             not cleanly unmounted; mount and unmount it or run e2fsck first"
                .into(),
        )?;
    }
    let state = sb.state.get();
    if state & STATE_ERROR != 0 {
        unsafe_state(
            FS,
            opts,
            &mut warnings,
            "the file system is marked as having errors; run e2fsck first".into(),
        )?;
    } else if state & STATE_VALID == 0 {
        unsafe_state(
            FS,
            opts,
            &mut warnings,
            "the file system is not marked clean: it is mounted, or was not cleanly unmounted"
                .into(),
        )?;
    }
    let groups = read_groups(vol, &geo)?;
    // Every group's bitmaps and inode table, as sorted merged block ranges.
    let mut meta: Vec<(u64, u64)> = groups
        .iter()
        .flat_map(|g| {
            [
                (g.block_bitmap, g.block_bitmap + 1),
                (g.inode_bitmap, g.inode_bitmap + 1),
                (g.inode_table, g.inode_table + geo.inode_table_blocks),
            ]
        })
        .collect();
    meta.sort_unstable();
    let mut merged: Vec<(u64, u64)> = Vec::with_capacity(meta.len());
    for (a, b) in meta {
        match merged.last_mut() {
            Some(last) if a <= last.1 => last.1 = last.1.max(b),
            _ => merged.push((a, b)),
        }
    }
    let bs = geo.block_size;
    let mut bitmap = vec![0u8; bs as usize];
    let mut free_total = 0u64;
    // Pending run, merged across groups.
    let mut run: Option<(u64, u64)> = None;
    let mut emit_blocks = |first: u64, n: u64, free_total: &mut u64| {
        *free_total += n * bs;
        match &mut run {
            Some((a, l)) if *a + *l == first => *l += n,
            _ => {
                if let Some((a, l)) = run.take() {
                    sink(a * bs, l * bs);
                }
                run = Some((first, n));
            }
        }
    };
    for (g, grp) in groups.iter().enumerate() {
        let g = g as u64;
        let first = geo.group_first_block(g);
        let nblocks = geo.group_blocks(g);
        if grp.flags & BG_BLOCK_UNINIT != 0 && geo.uninit_allowed() {
            uninit_free(&geo, g, &merged, &mut |a, n| {
                emit_blocks(a, n, &mut free_total)
            });
            continue;
        }
        let at = grp.block_bitmap * bs;
        let what = format!("block bitmap of group {g}");
        vol.read(FS, &what, at, &mut bitmap)?;
        if let Some(seed) = geo.csum_seed {
            let mut computed = crc32c_raw(seed, &bitmap[..(geo.clusters_per_group / 8) as usize]);
            if geo.desc_size < 64 {
                computed &= 0xFFFF;
            }
            if computed != grp.bitmap_csum {
                return Err(Error::Checksum {
                    fs: FS,
                    structure: what,
                    offset: at,
                    stored: grp.bitmap_csum,
                    computed,
                });
            }
        }
        let nclusters = nblocks.div_ceil(geo.ratio);
        let mut free_clusters = 0u64;
        clear_runs(&bitmap, nclusters, |c, n| {
            free_clusters += n;
            let a = first + c * geo.ratio;
            let end = (a + n * geo.ratio).min(first + nblocks);
            emit_blocks(a, end - a, &mut free_total);
        });
        if free_clusters != grp.free {
            unsafe_state(
                FS,
                opts,
                &mut warnings,
                format!(
                    "{what} at byte {at} has {free_clusters} free clusters, its descriptor says \
                     {}: run e2fsck first",
                    grp.free
                ),
            )?;
        }
    }
    if let Some((a, l)) = run {
        sink(a * bs, l * bs);
    }
    Ok(Summary {
        fs,
        size: geo.blocks_count * bs,
        free: free_total,
        warnings,
    })
}
