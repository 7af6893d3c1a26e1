//! Which fixed-size blocks of a disk lie wholly in free space.
//!
//! ```text
//!   disk:   |  block 0  |  block 1  |  block 2  | b3 |     (last block may be short)
//!   free:      [====]     [=========][====]
//!   counts:     4/8          8/8       4/8      0/4   → only block 1 is wholly free
//! ```
//!
//! Free ranges are summed per block; ranges given to one map must be disjoint (each reader's
//! are, and partitions are checked not to overlap), so a block is wholly free exactly when its
//! sum reaches its length. Memory: four bytes a block, bounded by [`MAX_BLOCKS`].

use crate::{Error, Result};

/// Most blocks a map tracks (256 MiB of counters).
pub const MAX_BLOCKS: u64 = 1 << 26;

/// Free bytes per block of a disk.
#[derive(Debug, Clone)]
pub struct FreeMap {
    block: u64,
    size: u64,
    free: Vec<u32>,
}

impl FreeMap {
    /// A map of a disk of `size` bytes in blocks of `block` bytes (1 B ..= 4 GiB - 1).
    pub fn new(size: u64, block: u64) -> Result<FreeMap> {
        if block == 0 || block > u64::from(u32::MAX) {
            return Err(Error::unsupported(
                "free map",
                format!("block size {block}"),
            ));
        }
        let n = size.div_ceil(block);
        if n > MAX_BLOCKS {
            return Err(Error::unsupported(
                "free map",
                format!("{n} blocks of {block} bytes (at most {MAX_BLOCKS})"),
            ));
        }
        Ok(FreeMap {
            block,
            size,
            free: vec![0; n as usize],
        })
    }

    /// Block size in bytes.
    pub fn block_size(&self) -> u64 {
        self.block
    }

    /// Size of the disk in bytes.
    pub fn size(&self) -> u64 {
        self.size
    }

    /// Number of blocks.
    pub fn blocks(&self) -> u64 {
        self.free.len() as u64
    }

    /// Adds the free range `[offset, offset + len)` (clipped to the disk).
    pub fn add(&mut self, offset: u64, len: u64) {
        let end = offset.saturating_add(len).min(self.size);
        let mut pos = offset;
        while pos < end {
            let b = pos / self.block;
            let b_end = ((b + 1) * self.block).min(end);
            let c = &mut self.free[b as usize];
            // Bounded by the block length (< 2^32) for disjoint input; saturate otherwise.
            *c = c.saturating_add((b_end - pos) as u32);
            pos = b_end;
        }
    }

    /// Bytes of block `b` (the last may be short).
    fn len_of(&self, b: u64) -> u64 {
        (self.size - b * self.block).min(self.block)
    }

    /// Whether every byte of block `b` is free.
    pub fn is_free(&self, b: u64) -> bool {
        self.free
            .get(b as usize)
            .is_some_and(|&c| u64::from(c) >= self.len_of(b))
    }

    /// Indices of the wholly free blocks, ascending.
    pub fn free_blocks(&self) -> impl Iterator<Item = u64> + '_ {
        (0..self.blocks()).filter(|&b| self.is_free(b))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_wholly_covered_blocks_are_free() {
        let mut m = FreeMap::new(28, 8).unwrap();
        m.add(2, 4);
        m.add(8, 8);
        m.add(16, 4);
        m.add(24, 4);
        assert_eq!(m.free_blocks().collect::<Vec<_>>(), vec![1, 3]);
    }

    #[test]
    fn pieces_adding_up_to_a_block_make_it_free() {
        let mut m = FreeMap::new(16, 8).unwrap();
        m.add(0, 3);
        m.add(3, 5);
        m.add(10, 100);
        assert_eq!(m.free_blocks().collect::<Vec<_>>(), vec![0]);
        assert!(!m.is_free(1));
        assert!(!m.is_free(99));
    }

    #[test]
    fn huge_maps_are_refused() {
        assert!(FreeMap::new(u64::MAX, 512).is_err());
        assert!(FreeMap::new(1 << 20, 0).is_err());
    }
}
