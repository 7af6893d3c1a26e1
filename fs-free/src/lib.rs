//! fs-free: which bytes of a volume its file system calls free, read from the file system's own
//! allocation map, never from a mount.
//!
//! ```text
//!   read_at(offset, buf) ──> Volume (bounds: [0, size) of one partition or a whole disk)
//!                              │ detect(): boot sector / superblock signatures
//!                              ▼
//!          ext.rs    superblock → group descriptors → block bitmaps (flex_bg, 64bit,
//!                    meta_bg, bigalloc; metadata_csum checksums verified)
//!          ntfs.rs   boot sector → $MFT record 0 → record 6 ($Bitmap) runlist → bitmap
//!          fat.rs    BPB → the active FAT (FAT12/16/32): entry 0 = free cluster
//!          exfat.rs  boot sector → root directory → allocation bitmap entry → bitmap
//!                              │
//!                              ▼
//!   sink(offset, len)  free byte ranges, volume-relative, ascending, disjoint
//!   Summary { fs, size, free }   ──> FreeMap: which image blocks lie wholly in free space
//! ```
//!
//! Invariants (every byte read is untrusted input):
//! - Nothing is read outside the volume: every offset is checked against its size first, and a
//!   structure pointing outside it is an [`Error`] naming the structure and the offset.
//! - Allocations are bounded by constants (bitmaps are streamed a block or a chunk at a time;
//!   group descriptor tables, runlists and FAT chains have caps); loops are bounded.
//! - No panics: bad input is a typed [`Error`] with a stable [`ErrorKind`].
//! - Only what the allocation map calls free is reported; anything doubtful (metadata the map
//!   does not cover, space past the file system's end, an uninitialised ext4 group whose
//!   metadata cannot be placed) counts as used. Free ranges never overlap.
//! - A volume in a state where its map may be stale (ext4 journal needing recovery, a dirty or
//!   hibernated NTFS, a dirty FAT/exFAT) is [`ErrorKind::Unsafe`] unless
//!   [`Options::force`] is set; a map failing its checksum or pointing outside the volume is
//!   always an error.

#![forbid(unsafe_code)]
#![warn(missing_docs)]

mod error;
pub mod exfat;
pub mod ext;
pub mod fat;
mod freemap;
pub mod ntfs;

use std::fmt;

pub use error::{Error, ErrorKind, Result};
pub use freemap::FreeMap;

/// Reads `buf.len()` bytes at a volume-relative byte offset (the whole buffer, or an error).
pub type ReadAt<'a> = &'a mut dyn FnMut(u64, &mut [u8]) -> std::io::Result<()>;

/// A free byte range `(offset, len)`, volume-relative.
pub type Sink<'a> = &'a mut dyn FnMut(u64, u64);

/// A file system this crate reads.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FsType {
    /// ext2 (no journal).
    Ext2,
    /// ext3 (journal, no ext4-only feature).
    Ext3,
    /// ext4.
    Ext4,
    /// NTFS.
    Ntfs,
    /// FAT12.
    Fat12,
    /// FAT16.
    Fat16,
    /// FAT32.
    Fat32,
    /// exFAT.
    ExFat,
}

impl FsType {
    /// Lower-case name (`ext4`, `ntfs`, `fat32`, `exfat`).
    pub fn name(self) -> &'static str {
        match self {
            FsType::Ext2 => "ext2",
            FsType::Ext3 => "ext3",
            FsType::Ext4 => "ext4",
            FsType::Ntfs => "ntfs",
            FsType::Fat12 => "fat12",
            FsType::Fat16 => "fat16",
            FsType::Fat32 => "fat32",
            FsType::ExFat => "exfat",
        }
    }
}

impl fmt::Display for FsType {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

/// How strict a scan is.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Options {
    /// Scan a volume whose allocation map may be stale anyway (journal needing recovery, dirty
    /// flag, hibernation); the reason becomes a warning in the [`Summary`].
    pub force: bool,
}

/// What a scan found.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Summary {
    /// The file system.
    pub fs: FsType,
    /// Bytes the file system spans (from its start).
    pub size: u64,
    /// Bytes its allocation map calls free (the sum of the ranges given to the sink).
    pub free: u64,
    /// Unsafe states passed over because of [`Options::force`].
    pub warnings: Vec<String>,
}

/// One volume (a partition or a whole disk) read through a callback.
pub struct Volume<'a> {
    read: ReadAt<'a>,
    size: u64,
}

impl fmt::Debug for Volume<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Volume").field("size", &self.size).finish()
    }
}

impl<'a> Volume<'a> {
    /// A volume of `size` bytes read through `read`.
    pub fn new(size: u64, read: ReadAt<'a>) -> Volume<'a> {
        Volume { read, size }
    }

    /// Size in bytes.
    pub fn size(&self) -> u64 {
        self.size
    }

    /// Fills `buf` from `offset`; `structure` names what is read for errors.
    pub(crate) fn read(
        &mut self,
        fs: &'static str,
        structure: &str,
        offset: u64,
        buf: &mut [u8],
    ) -> Result<()> {
        let inside = offset
            .checked_add(buf.len() as u64)
            .is_some_and(|end| end <= self.size);
        if !inside {
            return Err(Error::OutsideVolume {
                fs,
                structure: structure.to_string(),
                offset,
                len: buf.len() as u64,
                volume: self.size,
            });
        }
        (self.read)(offset, buf).map_err(|source| Error::Read {
            fs,
            structure: structure.to_string(),
            offset,
            source,
        })
    }
}

/// Which file system `vol` holds, by its signatures (`None`: none this crate reads).
pub fn detect(vol: &mut Volume<'_>) -> Result<Option<FsType>> {
    if vol.size < 512 {
        return Ok(None);
    }
    let mut boot = [0u8; 512];
    vol.read("probe", "boot sector", 0, &mut boot)?;
    if &boot[3..11] == ntfs::OEM_ID {
        return Ok(Some(FsType::Ntfs));
    }
    if &boot[3..11] == exfat::OEM_ID {
        return Ok(Some(FsType::ExFat));
    }
    if let Some(t) = ext::probe(vol)? {
        return Ok(Some(t));
    }
    Ok(fat::probe(&boot))
}

/// Reports every free byte range of the file system `fs` on `vol` to `sink` (ascending,
/// disjoint) and sums them up.
pub fn scan(vol: &mut Volume<'_>, fs: FsType, opts: Options, sink: Sink<'_>) -> Result<Summary> {
    match fs {
        FsType::Ext2 | FsType::Ext3 | FsType::Ext4 => ext::scan(vol, opts, sink),
        FsType::Ntfs => ntfs::scan(vol, opts, sink),
        FsType::Fat12 | FsType::Fat16 | FsType::Fat32 => fat::scan(vol, opts, sink),
        FsType::ExFat => exfat::scan(vol, opts, sink),
    }
}

/// Records an unsafe state: an error, or a warning when forced.
pub(crate) fn unsafe_state(
    fs: &'static str,
    opts: Options,
    warnings: &mut Vec<String>,
    reason: String,
) -> Result<()> {
    if opts.force {
        warnings.push(reason);
        Ok(())
    } else {
        Err(Error::Unsafe { fs, reason })
    }
}

/// Merges adjacent free ranges before they reach the sink, and sums them.
pub(crate) struct Runs<'a, 'b> {
    sink: &'a mut Sink<'b>,
    cur: Option<(u64, u64)>,
    total: u64,
}

impl<'a, 'b> Runs<'a, 'b> {
    pub(crate) fn new(sink: &'a mut Sink<'b>) -> Self {
        Runs {
            sink,
            cur: None,
            total: 0,
        }
    }

    /// Adds `[offset, offset + len)`; ranges come in ascending order.
    pub(crate) fn push(&mut self, offset: u64, len: u64) {
        if len == 0 {
            return;
        }
        self.total += len;
        match &mut self.cur {
            Some((o, l)) if *o + *l == offset => *l += len,
            _ => {
                if let Some((o, l)) = self.cur.take() {
                    (self.sink)(o, l);
                }
                self.cur = Some((offset, len));
            }
        }
    }

    /// Flushes the last range; returns the sum.
    pub(crate) fn finish(mut self) -> u64 {
        if let Some((o, l)) = self.cur.take() {
            (self.sink)(o, l);
        }
        self.total
    }
}

/// Calls `emit(first, count)` for every run of clear bits among the first `nbits` bits of
/// `bitmap` (LSB first in each byte, as every file system here stores them).
pub(crate) fn clear_runs(bitmap: &[u8], nbits: u64, mut emit: impl FnMut(u64, u64)) {
    let nbits = nbits.min(bitmap.len() as u64 * 8);
    let mut i = 0u64;
    while i < nbits {
        let byte = bitmap[(i / 8) as usize];
        // Whole bytes at once where possible.
        if i % 8 == 0 && i + 8 <= nbits && (byte == 0xFF) {
            i += 8;
            continue;
        }
        if byte & (1 << (i % 8)) != 0 {
            i += 1;
            continue;
        }
        let start = i;
        while i < nbits {
            let b = bitmap[(i / 8) as usize];
            if i % 8 == 0 && i + 8 <= nbits && b == 0 {
                i += 8;
            } else if b & (1 << (i % 8)) == 0 {
                i += 1;
            } else {
                break;
            }
        }
        emit(start, i - start);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn runs(bitmap: &[u8], n: u64) -> Vec<(u64, u64)> {
        let mut v = Vec::new();
        clear_runs(bitmap, n, |a, b| v.push((a, b)));
        v
    }

    #[test]
    fn clear_runs_finds_runs_across_bytes_and_stops_at_nbits() {
        assert_eq!(runs(&[0xFF, 0xFF], 16), vec![]);
        assert_eq!(runs(&[0x00, 0x00], 16), vec![(0, 16)]);
        assert_eq!(runs(&[0x00, 0x00], 12), vec![(0, 12)]);
        assert_eq!(runs(&[0b1000_0001, 0x00, 0xF0], 24), vec![(1, 6), (8, 12)]);
        assert_eq!(runs(&[0x00], 100), vec![(0, 8)]);
    }

    proptest::proptest! {
        #[test]
        fn clear_runs_match_bit_by_bit(bytes in proptest::collection::vec(proptest::num::u8::ANY, 0..64), n in 0u64..600) {
            let mut want = Vec::new();
            let lim = n.min(bytes.len() as u64 * 8);
            let mut i = 0;
            while i < lim {
                if bytes[(i / 8) as usize] & (1 << (i % 8)) == 0 {
                    let s = i;
                    while i < lim && bytes[(i / 8) as usize] & (1 << (i % 8)) == 0 { i += 1; }
                    want.push((s, i - s));
                } else { i += 1; }
            }
            proptest::prop_assert_eq!(runs(&bytes, n), want);
        }
    }

    #[test]
    fn detect_finds_nothing_in_zeros_and_tiny_volumes() {
        let mut read = |_: u64, b: &mut [u8]| {
            b.fill(0);
            Ok(())
        };
        let mut v = Volume::new(1 << 20, &mut read);
        assert_eq!(detect(&mut v).unwrap(), None);
        let mut v = Volume::new(100, &mut read);
        assert_eq!(detect(&mut v).unwrap(), None);
    }
}
