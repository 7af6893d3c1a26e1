//! Partition tables: MBR (primary and logical partitions through the EBR chain) and GPT.
//!
//! ```text
//!   LBA 0   MBR: 4 slots ─┬─ primary  (type ≠ 0)              → p1..p4 (slot number)
//!                         ├─ extended (0x05/0x0F/0x85) → EBR ─→ EBR ─→ …   (chain)
//!                         │        each EBR: slot 0 = logical → p5, p6, …
//!                         │                  slot 1 = next EBR (relative to the extended start)
//!                         └─ protective (0xEE) → GPT
//!   LBA 1   GPT header (backup at the last LBA) → entry array → p<index + 1>
//! ```
//!
//! Numbering follows Linux (`/dev/sdaN`): MBR primaries by slot (1–4, gaps kept), logical
//! partitions from 5 in chain order, GPT entries by their index in the array plus one. Extended
//! containers are not partitions of their own.
//!
//! Invariants (the table is untrusted input):
//! - Every offset and size is computed with checked arithmetic; a partition reaching past the
//!   end of the disk, an EBR outside the disk, a loop in the EBR chain, more than
//!   [`MAX_LOGICAL`] logical partitions, a GPT entry array larger than [`MAX_GPT_ARRAY`] or a GPT
//!   whose headers both fail their checks is a [`PartitionError`], never a panic or an endless
//!   loop. Every loop is bounded by a constant.
//! - A GPT header is only used when its signature, size, CRC-32, own LBA and entry-array CRC-32
//!   all check out; the backup header is tried when the primary fails.
//! - Reads never reach past the disk: the reader is only asked for ranges inside `size`.
//! - A disk without the `55 AA` signature, or whose first sector is not a partition table (boot
//!   flags other than 0x00/0x80, as a bare FAT/NTFS volume has), has no partitions: that is
//!   `Ok`, with an empty list.

use std::collections::HashSet;

use uuid::Uuid;

/// Most logical partitions followed in an EBR chain (Linux allows 256 partitions in all).
pub const MAX_LOGICAL: usize = 252;
/// Largest GPT partition entry array read, in bytes (the spec's minimum is 16 KiB; 4 MiB is far
/// beyond any real table).
pub const MAX_GPT_ARRAY: u64 = 4 << 20;

/// The MBR boot signature at byte 510.
const MBR_SIGNATURE: [u8; 2] = [0x55, 0xAA];
/// Partition type of a GPT protective MBR entry.
const TYPE_GPT_PROTECTIVE: u8 = 0xEE;
/// Partition types of extended (container) partitions: CHS, LBA and Linux extended.
const TYPES_EXTENDED: [u8; 3] = [0x05, 0x0F, 0x85];
/// `"EFI PART"`.
const GPT_SIGNATURE: &[u8; 8] = b"EFI PART";
/// Smallest valid GPT header.
const GPT_HEADER_MIN: u32 = 92;
/// Smallest GPT partition entry.
const GPT_ENTRY_MIN: u32 = 128;

/// What kind of table a disk holds.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TableKind {
    /// No partition table (blank disk, bare file system, or no `55 AA` signature).
    None,
    /// An MBR (DOS) table, possibly with logical partitions.
    Mbr,
    /// A GUID partition table.
    Gpt,
}

/// Where a partition came from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum PartitionKind {
    /// An MBR partition.
    Mbr {
        /// The partition type byte (0x83 Linux, 0x07 NTFS, ...).
        type_id: u8,
        /// True for a logical partition inside an extended one.
        logical: bool,
    },
    /// A GPT partition.
    Gpt {
        /// Partition type GUID.
        type_guid: Uuid,
        /// Unique partition GUID.
        unique_guid: Uuid,
        /// Partition name (UTF-16LE in the entry, up to 36 code units).
        name: String,
    },
}

/// One partition: a byte range of the disk.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Partition {
    /// Linux-style partition number (1-based); the file is called `p<number>`.
    pub number: u32,
    /// First byte on the disk.
    pub offset: u64,
    /// Length in bytes (never 0; `offset + size` never exceeds the disk size).
    pub size: u64,
    /// Table entry details.
    pub kind: PartitionKind,
}

/// A parsed partition table.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PartitionTable {
    /// The kind of table found.
    pub kind: TableKind,
    /// The sector size the table's LBAs are counted in.
    pub sector_size: u32,
    /// The partitions, ordered by number.
    pub partitions: Vec<Partition>,
}

/// Errors of partition table parsing.
#[derive(Debug, thiserror::Error)]
pub enum PartitionError {
    /// Reading the disk failed.
    #[error("partition table: read of {len} bytes at offset {offset}: {source}")]
    Read {
        /// Byte offset of the read.
        offset: u64,
        /// Length of the read.
        len: usize,
        /// What the disk reported.
        source: crate::Error,
    },
    /// A partition reaches past the end of the disk, or its numbers overflow.
    #[error(
        "{table} partition {number}: sectors {first}+{count} (sector size {sector_size}) reach \
         past the end of the disk ({disk_size} bytes)"
    )]
    OutOfRange {
        /// `"MBR"` or `"GPT"`.
        table: &'static str,
        /// Partition number.
        number: u32,
        /// First sector.
        first: u64,
        /// Number of sectors.
        count: u64,
        /// Sector size in bytes.
        sector_size: u32,
        /// Size of the disk in bytes.
        disk_size: u64,
    },
    /// A GPT entry whose last LBA is before its first.
    #[error("GPT partition {number}: last LBA {last} is before first LBA {first}")]
    GptEntryReversed {
        /// Partition number.
        number: u32,
        /// First LBA.
        first: u64,
        /// Last LBA (inclusive).
        last: u64,
    },
    /// An extended boot record lies outside the disk or lacks its signature.
    #[error("MBR: extended boot record at byte {offset}: {what}")]
    BadEbr {
        /// Byte offset of the EBR.
        offset: u64,
        /// What is wrong.
        what: &'static str,
    },
    /// The EBR chain comes back to an EBR already visited.
    #[error("MBR: the extended boot record chain loops back to byte {offset}")]
    EbrLoop {
        /// Byte offset of the EBR seen twice.
        offset: u64,
    },
    /// The EBR chain holds more logical partitions than [`MAX_LOGICAL`].
    #[error("MBR: more than {limit} logical partitions in the extended boot record chain")]
    TooManyLogical {
        /// The bound that was hit.
        limit: usize,
    },
    /// Neither GPT header is usable.
    #[error("GPT: no valid header (primary: {primary}; backup: {backup})")]
    NoValidGpt {
        /// Why the primary header was rejected.
        primary: String,
        /// Why the backup header was rejected.
        backup: String,
    },
}

/// Result alias of this module.
pub type Result<T, E = PartitionError> = std::result::Result<T, E>;

/// Reads the partition table of a disk of `size` bytes with logical sectors of `sector_size`
/// bytes through `read` (which fills the whole buffer from the given byte offset, or fails).
pub fn scan(
    size: u64,
    sector_size: u32,
    mut read: impl FnMut(&mut [u8], u64) -> crate::Result<()>,
) -> Result<PartitionTable> {
    let mut reader = Reader {
        size,
        read: &mut read,
    };
    let none = PartitionTable {
        kind: TableKind::None,
        sector_size,
        partitions: Vec::new(),
    };
    let Some(mbr) = reader.read(0, 512)? else {
        return Ok(none);
    };
    if mbr[510..512] != MBR_SIGNATURE {
        return Ok(none);
    }
    let slots: Vec<MbrEntry> = (0..4).map(|i| MbrEntry::parse(&mbr, i)).collect();
    if slots.iter().any(|e| e.status != 0 && e.status != 0x80) {
        // A boot sector of a bare file system, not a partition table.
        return Ok(none);
    }
    if slots.iter().any(|e| e.type_id == TYPE_GPT_PROTECTIVE) {
        return scan_gpt(&mut reader, sector_size);
    }
    scan_mbr(&mut reader, sector_size, &slots)
}

/// Reads the partition table of `disk`.
pub fn scan_disk(disk: &mut dyn crate::Disk) -> Result<PartitionTable> {
    let size = disk.size();
    let sector_size = disk.logical_sector_size();
    scan(size, sector_size, |buf, off| disk.read_at(buf, off))
}

/// Bounded reads from the disk.
struct Reader<'a> {
    size: u64,
    read: &'a mut dyn FnMut(&mut [u8], u64) -> crate::Result<()>,
}

impl Reader<'_> {
    /// `len` bytes at `offset`, or `None` if the range is not inside the disk.
    fn read(&mut self, offset: u64, len: usize) -> Result<Option<Vec<u8>>> {
        match offset.checked_add(len as u64) {
            Some(end) if end <= self.size => {}
            _ => return Ok(None),
        }
        let mut buf = vec![0u8; len];
        (self.read)(&mut buf, offset).map_err(|source| PartitionError::Read {
            offset,
            len,
            source,
        })?;
        Ok(Some(buf))
    }
}

/// One 16-byte MBR/EBR slot.
#[derive(Debug, Clone, Copy)]
struct MbrEntry {
    status: u8,
    type_id: u8,
    lba_start: u32,
    sectors: u32,
}

impl MbrEntry {
    /// Slot `i` (0..4) of a 512-byte boot record.
    fn parse(sector: &[u8], i: usize) -> MbrEntry {
        let e = &sector[446 + 16 * i..446 + 16 * (i + 1)];
        MbrEntry {
            status: e[0],
            type_id: e[4],
            lba_start: u32::from_le_bytes([e[8], e[9], e[10], e[11]]),
            sectors: u32::from_le_bytes([e[12], e[13], e[14], e[15]]),
        }
    }

    fn is_used(&self) -> bool {
        self.type_id != 0 && self.sectors != 0
    }

    fn is_extended(&self) -> bool {
        TYPES_EXTENDED.contains(&self.type_id)
    }
}

/// Byte range of `count` sectors from sector `first`, checked against the disk.
fn byte_range(
    table: &'static str,
    number: u32,
    first: u64,
    count: u64,
    sector_size: u32,
    disk_size: u64,
) -> Result<(u64, u64)> {
    let ss = u64::from(sector_size);
    let range = first
        .checked_mul(ss)
        .zip(count.checked_mul(ss))
        .filter(|&(o, l)| o.checked_add(l).is_some_and(|end| end <= disk_size));
    range.ok_or(PartitionError::OutOfRange {
        table,
        number,
        first,
        count,
        sector_size,
        disk_size,
    })
}

fn scan_mbr(
    reader: &mut Reader<'_>,
    sector_size: u32,
    slots: &[MbrEntry],
) -> Result<PartitionTable> {
    let mut partitions = Vec::new();
    let mut extended = None;
    for (i, e) in slots.iter().enumerate() {
        if !e.is_used() {
            continue;
        }
        let number = i as u32 + 1;
        if e.is_extended() {
            // Linux follows the first extended partition only.
            if extended.is_none() {
                byte_range(
                    "MBR",
                    number,
                    e.lba_start.into(),
                    e.sectors.into(),
                    sector_size,
                    reader.size,
                )?;
                extended = Some(u64::from(e.lba_start));
            }
            continue;
        }
        let (offset, size) = byte_range(
            "MBR",
            number,
            e.lba_start.into(),
            e.sectors.into(),
            sector_size,
            reader.size,
        )?;
        partitions.push(Partition {
            number,
            offset,
            size,
            kind: PartitionKind::Mbr {
                type_id: e.type_id,
                logical: false,
            },
        });
    }
    if let Some(ext_start) = extended {
        scan_ebr_chain(reader, sector_size, ext_start, &mut partitions)?;
    }
    Ok(PartitionTable {
        kind: TableKind::Mbr,
        sector_size,
        partitions,
    })
}

/// Follows the EBR chain of the extended partition starting at sector `ext_start`.
fn scan_ebr_chain(
    reader: &mut Reader<'_>,
    sector_size: u32,
    ext_start: u64,
    out: &mut Vec<Partition>,
) -> Result<()> {
    let ss = u64::from(sector_size);
    let mut seen = HashSet::new();
    let mut ebr = ext_start;
    let mut number = 5u32;
    // Bounded: each pass either adds a logical partition, or ends the chain; every EBR is
    // visited at most once and the pass count is capped.
    for _ in 0..=MAX_LOGICAL {
        let offset = ebr.checked_mul(ss).ok_or(PartitionError::BadEbr {
            offset: u64::MAX,
            what: "offset overflows",
        })?;
        if !seen.insert(offset) {
            return Err(PartitionError::EbrLoop { offset });
        }
        let Some(sector) = reader.read(offset, 512)? else {
            return Err(PartitionError::BadEbr {
                offset,
                what: "lies outside the disk",
            });
        };
        if sector[510..512] != MBR_SIGNATURE {
            return Err(PartitionError::BadEbr {
                offset,
                what: "has no 55 AA signature",
            });
        }
        let logical = MbrEntry::parse(&sector, 0);
        let next = MbrEntry::parse(&sector, 1);
        if logical.is_used() {
            if number as usize >= MAX_LOGICAL + 5 {
                return Err(PartitionError::TooManyLogical { limit: MAX_LOGICAL });
            }
            let first = ebr + u64::from(logical.lba_start);
            let (offset, size) = byte_range(
                "MBR",
                number,
                first,
                logical.sectors.into(),
                sector_size,
                reader.size,
            )?;
            out.push(Partition {
                number,
                offset,
                size,
                kind: PartitionKind::Mbr {
                    type_id: logical.type_id,
                    logical: true,
                },
            });
            number += 1;
        }
        if !next.is_extended() || next.lba_start == 0 {
            return Ok(());
        }
        ebr = ext_start + u64::from(next.lba_start);
    }
    Err(PartitionError::TooManyLogical { limit: MAX_LOGICAL })
}

/// A GPT header's fields that matter here.
#[derive(Debug, Clone, Copy)]
struct GptHeader {
    entries_lba: u64,
    entry_count: u32,
    entry_size: u32,
    entries_crc: u32,
}

/// Finds a valid GPT (primary, then backup), trying the disk's sector size first and the other
/// common one (512/4096) next: a table written through a tool that assumed 512-byte sectors is
/// still found on a 4K disk.
fn scan_gpt(reader: &mut Reader<'_>, sector_size: u32) -> Result<PartitionTable> {
    let other = if sector_size == 4096 { 512 } else { 4096 };
    let mut first_failure = None;
    for ss in [sector_size, other] {
        match find_gpt_header(reader, ss)? {
            Ok((header, _)) => return read_gpt_entries(reader, ss, header),
            Err(why) => {
                first_failure.get_or_insert(why);
            }
        }
    }
    let (primary, backup) = first_failure.unwrap_or_default();
    Err(PartitionError::NoValidGpt { primary, backup })
}

/// The first valid header (primary at LBA 1, else backup at the last LBA) with sectors of `ss`
/// bytes, or why both were rejected.
#[allow(clippy::type_complexity)]
fn find_gpt_header(
    reader: &mut Reader<'_>,
    ss: u32,
) -> Result<Result<(GptHeader, u64), (String, String)>> {
    let primary = match check_gpt_header(reader, ss, 1)? {
        Ok(h) => return Ok(Ok((h, 1))),
        Err(why) => why,
    };
    let last = (reader.size / u64::from(ss)).saturating_sub(1);
    let backup = if last > 1 {
        match check_gpt_header(reader, ss, last)? {
            Ok(h) => return Ok(Ok((h, last))),
            Err(why) => why,
        }
    } else {
        "disk too small".to_string()
    };
    Ok(Err((
        format!("sector size {ss}: {primary}"),
        format!("sector size {ss}: {backup}"),
    )))
}

/// The header at `lba` if every check passes, else why not.
fn check_gpt_header(
    reader: &mut Reader<'_>,
    ss: u32,
    lba: u64,
) -> Result<Result<GptHeader, String>> {
    let ss64 = u64::from(ss);
    let Some(offset) = lba.checked_mul(ss64) else {
        return Ok(Err(format!("LBA {lba} overflows")));
    };
    let Some(sector) = reader.read(offset, ss as usize)? else {
        return Ok(Err(format!("LBA {lba} is outside the disk")));
    };
    if &sector[0..8] != GPT_SIGNATURE {
        return Ok(Err(format!("no \"EFI PART\" signature at LBA {lba}")));
    }
    let u32_at = |o: usize| u32::from_le_bytes(sector[o..o + 4].try_into().expect("4 bytes"));
    let u64_at = |o: usize| u64::from_le_bytes(sector[o..o + 8].try_into().expect("8 bytes"));
    let header_size = u32_at(12);
    if !(GPT_HEADER_MIN..=ss).contains(&header_size) {
        return Ok(Err(format!("header size {header_size} out of range")));
    }
    let stored_crc = u32_at(16);
    let mut hdr = sector[..header_size as usize].to_vec();
    hdr[16..20].fill(0);
    if crc32fast::hash(&hdr) != stored_crc {
        return Ok(Err(format!("header CRC mismatch at LBA {lba}")));
    }
    if u64_at(24) != lba {
        return Ok(Err(format!(
            "header at LBA {lba} says it is at LBA {}",
            u64_at(24)
        )));
    }
    let header = GptHeader {
        entries_lba: u64_at(72),
        entry_count: u32_at(80),
        entry_size: u32_at(84),
        entries_crc: u32_at(88),
    };
    if header.entry_size < GPT_ENTRY_MIN || header.entry_size % 8 != 0 {
        return Ok(Err(format!("entry size {} invalid", header.entry_size)));
    }
    let array = u64::from(header.entry_count) * u64::from(header.entry_size);
    if array > MAX_GPT_ARRAY {
        return Ok(Err(format!(
            "entry array of {array} bytes is larger than {MAX_GPT_ARRAY}"
        )));
    }
    let Some(array_off) = header.entries_lba.checked_mul(ss64) else {
        return Ok(Err("entry array LBA overflows".to_string()));
    };
    // The array is at most MAX_GPT_ARRAY bytes, so it fits in memory and in usize.
    let Some(entries) = reader.read(array_off, array as usize)? else {
        return Ok(Err(format!(
            "entry array at LBA {} reaches past the disk",
            header.entries_lba
        )));
    };
    if crc32fast::hash(&entries) != header.entries_crc {
        return Ok(Err("entry array CRC mismatch".to_string()));
    }
    Ok(Ok(header))
}

/// The used entries of a checked header's array as partitions.
fn read_gpt_entries(reader: &mut Reader<'_>, ss: u32, header: GptHeader) -> Result<PartitionTable> {
    let array = u64::from(header.entry_count) * u64::from(header.entry_size);
    // Checked in check_gpt_header: inside the disk and at most MAX_GPT_ARRAY bytes.
    let entries = reader
        .read(header.entries_lba * u64::from(ss), array as usize)?
        .unwrap_or_default();
    let mut partitions = Vec::new();
    for (i, e) in entries.chunks_exact(header.entry_size as usize).enumerate() {
        let type_guid = guid(&e[0..16]);
        if type_guid.is_nil() {
            continue;
        }
        let number = i as u32 + 1;
        let first = u64::from_le_bytes(e[32..40].try_into().expect("8 bytes"));
        let last = u64::from_le_bytes(e[40..48].try_into().expect("8 bytes"));
        if last < first {
            return Err(PartitionError::GptEntryReversed {
                number,
                first,
                last,
            });
        }
        let count = last - first + 1;
        let (offset, size) = byte_range("GPT", number, first, count, ss, reader.size)?;
        let name_units: Vec<u16> = e[56..128]
            .chunks_exact(2)
            .map(|c| u16::from_le_bytes([c[0], c[1]]))
            .take_while(|&u| u != 0)
            .collect();
        partitions.push(Partition {
            number,
            offset,
            size,
            kind: PartitionKind::Gpt {
                type_guid,
                unique_guid: guid(&e[16..32]),
                name: String::from_utf16_lossy(&name_units),
            },
        });
    }
    Ok(PartitionTable {
        kind: TableKind::Gpt,
        sector_size: ss,
        partitions,
    })
}

/// A GUID in GPT's mixed-endian byte order.
fn guid(b: &[u8]) -> Uuid {
    let bytes: [u8; 16] = b.try_into().expect("16 bytes");
    Uuid::from_bytes_le(bytes)
}

#[cfg(test)]
mod tests {
    use super::*;

    const SS: u64 = 512;

    /// An in-memory disk.
    fn scan_mem(disk: &[u8], ss: u32) -> Result<PartitionTable> {
        scan(disk.len() as u64, ss, |buf, off| {
            let start = off as usize;
            buf.copy_from_slice(&disk[start..start + buf.len()]);
            Ok(())
        })
    }

    fn put_entry(disk: &mut [u8], sector: u64, slot: usize, type_id: u8, start: u32, len: u32) {
        let base = (sector * SS) as usize + 446 + 16 * slot;
        disk[base + 4] = type_id;
        disk[base + 8..base + 12].copy_from_slice(&start.to_le_bytes());
        disk[base + 12..base + 16].copy_from_slice(&len.to_le_bytes());
        let sig = (sector * SS) as usize + 510;
        disk[sig..sig + 2].copy_from_slice(&MBR_SIGNATURE);
    }

    fn ranges(t: &PartitionTable) -> Vec<(u32, u64, u64)> {
        t.partitions
            .iter()
            .map(|p| (p.number, p.offset, p.size))
            .collect()
    }

    #[test]
    fn blank_disk_has_no_table() {
        let disk = vec![0u8; 1 << 20];
        let t = scan_mem(&disk, 512).unwrap();
        assert_eq!(t.kind, TableKind::None);
        assert!(t.partitions.is_empty());
    }

    #[test]
    fn disk_smaller_than_a_sector_has_no_table() {
        let t = scan_mem(&[0u8; 100], 512).unwrap();
        assert_eq!(t.kind, TableKind::None);
    }

    #[test]
    fn boot_sector_with_bad_status_bytes_is_not_a_table() {
        let mut disk = vec![0u8; 1 << 20];
        put_entry(&mut disk, 0, 0, 0x83, 2048, 100);
        disk[446] = 0x29; // FAT boot code noise where the status byte would be
        assert_eq!(scan_mem(&disk, 512).unwrap().kind, TableKind::None);
    }

    #[test]
    fn mbr_primaries_keep_slot_numbers() {
        let mut disk = vec![0u8; 4 << 20];
        put_entry(&mut disk, 0, 0, 0x83, 2048, 1024);
        put_entry(&mut disk, 0, 2, 0x07, 4096, 2048);
        let t = scan_mem(&disk, 512).unwrap();
        assert_eq!(t.kind, TableKind::Mbr);
        assert_eq!(
            ranges(&t),
            vec![(1, 2048 * SS, 1024 * SS), (3, 4096 * SS, 2048 * SS)]
        );
    }

    #[test]
    fn mbr_logical_partitions_follow_the_ebr_chain() {
        let mut disk = vec![0u8; 8 << 20];
        put_entry(&mut disk, 0, 0, 0x83, 2048, 2048);
        put_entry(&mut disk, 0, 1, 0x05, 4096, 8192);
        // EBR 1 at 4096: logical at +2048, next EBR at ext+4096.
        put_entry(&mut disk, 4096, 0, 0x83, 2048, 1024);
        put_entry(&mut disk, 4096, 1, 0x05, 4096, 4096);
        // EBR 2 at 8192: logical at +2048, end of chain.
        put_entry(&mut disk, 8192, 0, 0x82, 2048, 2048);
        let t = scan_mem(&disk, 512).unwrap();
        assert_eq!(
            ranges(&t),
            vec![
                (1, 2048 * SS, 2048 * SS),
                (5, 6144 * SS, 1024 * SS),
                (6, 10240 * SS, 2048 * SS)
            ]
        );
        assert_eq!(
            t.partitions[1].kind,
            PartitionKind::Mbr {
                type_id: 0x83,
                logical: true
            }
        );
    }

    #[test]
    fn ebr_loop_is_an_error() {
        let mut disk = vec![0u8; 8 << 20];
        put_entry(&mut disk, 0, 0, 0x05, 2048, 8192);
        put_entry(&mut disk, 2048, 0, 0x83, 100, 10);
        // Next EBR points back at the first one.
        put_entry(&mut disk, 2048, 1, 0x05, 0x0000_0000, 100);
        let t = scan_mem(&disk, 512).unwrap();
        assert_eq!(t.partitions.len(), 1, "lba_start 0 ends the chain");
        put_entry(&mut disk, 2048, 1, 0x05, 4096, 100);
        put_entry(&mut disk, 6144, 0, 0x83, 100, 10);
        // EBR 2 (at 2048 + 4096) names itself as the next EBR.
        put_entry(&mut disk, 6144, 1, 0x05, 4096, 100);
        assert!(matches!(
            scan_mem(&disk, 512),
            Err(PartitionError::EbrLoop { .. })
        ));
    }

    #[test]
    fn ebr_outside_the_disk_or_unsigned_is_an_error() {
        let mut disk = vec![0u8; 2 << 20];
        put_entry(&mut disk, 0, 0, 0x05, 2048, 100);
        put_entry(&mut disk, 2048, 0, 0x83, 1, 10);
        put_entry(&mut disk, 2048, 1, 0x05, 0x00FF_FFFF, 10);
        assert!(matches!(
            scan_mem(&disk, 512),
            Err(PartitionError::OutOfRange { .. }) | Err(PartitionError::BadEbr { .. })
        ));
        let mut disk = vec![0u8; 2 << 20];
        put_entry(&mut disk, 0, 0, 0x05, 2048, 100);
        assert!(matches!(
            scan_mem(&disk, 512),
            Err(PartitionError::BadEbr { .. })
        ));
    }

    #[test]
    fn partition_past_the_end_is_an_error() {
        let mut disk = vec![0u8; 1 << 20];
        put_entry(&mut disk, 0, 0, 0x83, 2000, 100);
        assert!(matches!(
            scan_mem(&disk, 512),
            Err(PartitionError::OutOfRange { number: 1, .. })
        ));
        put_entry(&mut disk, 0, 0, 0x83, u32::MAX, u32::MAX);
        assert!(matches!(
            scan_mem(&disk, 512),
            Err(PartitionError::OutOfRange { .. })
        ));
    }

    #[test]
    fn long_ebr_chain_is_bounded() {
        // 300 EBRs one sector apart, each with a 1-sector logical partition.
        let mut disk = vec![0u8; 2 << 20];
        put_entry(&mut disk, 0, 0, 0x05, 1, 3000);
        for k in 0..300u32 {
            let ebr = 1 + u64::from(k) * 2;
            put_entry(&mut disk, ebr, 0, 0x83, 1, 1);
            put_entry(&mut disk, ebr, 1, 0x05, (k + 1) * 2, 2);
        }
        assert!(matches!(
            scan_mem(&disk, 512),
            Err(PartitionError::TooManyLogical { .. })
        ));
    }

    /// A disk with a protective MBR and a GPT (primary and backup) holding `parts`
    /// `(first_lba, last_lba, name)` with sectors of `ss` bytes.
    fn gpt_disk(size: u64, ss: u64, parts: &[(u64, u64, &str)]) -> Vec<u8> {
        let mut disk = vec![0u8; size as usize];
        put_entry(&mut disk, 0, 0, TYPE_GPT_PROTECTIVE, 1, u32::MAX);
        let count = 128u32;
        let mut array = vec![0u8; count as usize * 128];
        let linux = Uuid::parse_str("0FC63DAF-8483-4772-8E79-3D69D8477DE4").unwrap();
        for (i, &(first, last, name)) in parts.iter().enumerate() {
            let e = &mut array[i * 128..(i + 1) * 128];
            e[0..16].copy_from_slice(&linux.to_bytes_le());
            e[16..32].copy_from_slice(&Uuid::from_u128(i as u128 + 1).to_bytes_le());
            e[32..40].copy_from_slice(&first.to_le_bytes());
            e[40..48].copy_from_slice(&last.to_le_bytes());
            for (j, u) in name.encode_utf16().enumerate() {
                e[56 + 2 * j..58 + 2 * j].copy_from_slice(&u.to_le_bytes());
            }
        }
        let last_lba = size / ss - 1;
        let array_sectors = (array.len() as u64).div_ceil(ss);
        for (my, alt, entries) in [(1, last_lba, 2), (last_lba, 1, last_lba - array_sectors)] {
            let mut h = vec![0u8; 92];
            h[0..8].copy_from_slice(GPT_SIGNATURE);
            h[8..12].copy_from_slice(&0x0001_0000u32.to_le_bytes());
            h[12..16].copy_from_slice(&92u32.to_le_bytes());
            h[24..32].copy_from_slice(&my.to_le_bytes());
            h[32..40].copy_from_slice(&alt.to_le_bytes());
            h[72..80].copy_from_slice(&entries.to_le_bytes());
            h[80..84].copy_from_slice(&count.to_le_bytes());
            h[84..88].copy_from_slice(&128u32.to_le_bytes());
            h[88..92].copy_from_slice(&crc32fast::hash(&array).to_le_bytes());
            let crc = crc32fast::hash(&h);
            h[16..20].copy_from_slice(&crc.to_le_bytes());
            let ho = (my * ss) as usize;
            disk[ho..ho + 92].copy_from_slice(&h);
            let ao = (entries * ss) as usize;
            disk[ao..ao + array.len()].copy_from_slice(&array);
        }
        disk
    }

    #[test]
    fn gpt_partitions_are_read_with_names() {
        let disk = gpt_disk(8 << 20, 512, &[(2048, 4095, "boot"), (4096, 12287, "root")]);
        let t = scan_mem(&disk, 512).unwrap();
        assert_eq!(t.kind, TableKind::Gpt);
        assert_eq!(
            ranges(&t),
            vec![(1, 2048 * SS, 2048 * SS), (2, 4096 * SS, 8192 * SS)]
        );
        let PartitionKind::Gpt { name, .. } = &t.partitions[1].kind else {
            panic!("not gpt")
        };
        assert_eq!(name, "root");
    }

    #[test]
    fn gpt_with_4k_sectors_is_found_on_a_512_disk_and_the_other_way() {
        let disk = gpt_disk(16 << 20, 4096, &[(256, 511, "a")]);
        let t = scan_mem(&disk, 512).unwrap();
        assert_eq!(t.sector_size, 4096);
        assert_eq!(ranges(&t), vec![(1, 256 * 4096, 256 * 4096)]);
        let t = scan_mem(&disk, 4096).unwrap();
        assert_eq!(ranges(&t), vec![(1, 256 * 4096, 256 * 4096)]);
    }

    #[test]
    fn corrupt_primary_gpt_falls_back_to_the_backup() {
        let mut disk = gpt_disk(8 << 20, 512, &[(2048, 4095, "x")]);
        disk[512 + 40] ^= 0xFF; // primary header CRC now wrong
        let t = scan_mem(&disk, 512).unwrap();
        assert_eq!(ranges(&t), vec![(1, 2048 * SS, 2048 * SS)]);
        let last = disk.len() - 512;
        disk[last + 40] ^= 0xFF;
        assert!(matches!(
            scan_mem(&disk, 512),
            Err(PartitionError::NoValidGpt { .. })
        ));
    }

    #[test]
    fn gpt_entry_past_the_end_or_reversed_is_an_error() {
        let disk = gpt_disk(8 << 20, 512, &[(2048, 1 << 40, "big")]);
        assert!(matches!(
            scan_mem(&disk, 512),
            Err(PartitionError::OutOfRange { .. })
        ));
        let disk = gpt_disk(8 << 20, 512, &[(4096, 2048, "rev")]);
        assert!(matches!(
            scan_mem(&disk, 512),
            Err(PartitionError::GptEntryReversed { .. })
        ));
        let disk = gpt_disk(8 << 20, 512, &[(u64::MAX - 1, u64::MAX, "wrap")]);
        assert!(matches!(
            scan_mem(&disk, 512),
            Err(PartitionError::OutOfRange { .. })
        ));
    }

    #[test]
    fn huge_gpt_entry_array_is_refused() {
        let mut disk = gpt_disk(8 << 20, 512, &[(2048, 4095, "x")]);
        for ho in [512usize, disk.len() - 512] {
            disk[ho + 80..ho + 84].copy_from_slice(&u32::MAX.to_le_bytes());
            disk[ho + 16..ho + 20].fill(0);
            let crc = crc32fast::hash(&disk[ho..ho + 92]);
            disk[ho + 16..ho + 20].copy_from_slice(&crc.to_le_bytes());
        }
        assert!(matches!(
            scan_mem(&disk, 512),
            Err(PartitionError::NoValidGpt { .. })
        ));
    }

    #[test]
    fn read_errors_are_reported() {
        let err = scan(1 << 20, 512, |_, off| {
            Err(crate::Error::Io {
                path: "x".into(),
                op: "read",
                offset: off,
                source: std::io::Error::other("boom"),
            })
        })
        .unwrap_err();
        assert!(matches!(err, PartitionError::Read { offset: 0, .. }));
    }
}
