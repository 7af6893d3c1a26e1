//! Sector bitmaps: one bit per 512-byte sector of a block, most significant bit first, padded to
//! a multiple of 512 bytes. Set = the sector is stored in this file; clear = it reads as zeros
//! (dynamic) or comes from the parent (differencing).

/// In-memory bitmap of one block. Fully set bitmaps (the usual case) take no memory.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Bitmap {
    /// Every sector present.
    Full,
    /// Per-sector bits as on disk.
    Bits(Vec<u8>),
}

impl Bitmap {
    /// Decodes on-disk bytes for a block of `sectors` sectors.
    pub fn from_bytes(bytes: Vec<u8>, sectors: u64) -> Bitmap {
        let b = Bitmap::Bits(bytes);
        if b.all_set(0, sectors) {
            Bitmap::Full
        } else {
            b
        }
    }

    /// A bitmap with no sector present.
    pub fn empty(bytes: usize) -> Bitmap {
        Bitmap::Bits(vec![0; bytes])
    }

    /// Whether sector `s` of the block is present.
    pub fn get(&self, s: u64) -> bool {
        match self {
            Bitmap::Full => true,
            Bitmap::Bits(b) => b
                .get((s / 8) as usize)
                .is_some_and(|byte| byte & (0x80 >> (s % 8)) != 0),
        }
    }

    fn all_set(&self, from: u64, to: u64) -> bool {
        (from..to).all(|s| self.get(s))
    }

    /// Sets sectors `[from, to)`; returns whether anything changed.
    pub fn set_range(&mut self, from: u64, to: u64, sectors: u64) -> bool {
        let Bitmap::Bits(b) = self else { return false };
        let mut changed = false;
        for s in from..to {
            let (i, m) = ((s / 8) as usize, 0x80u8 >> (s % 8));
            if let Some(byte) = b.get_mut(i) {
                changed |= *byte & m == 0;
                *byte |= m;
            }
        }
        if changed && self.all_set(0, sectors) {
            *self = Bitmap::Full;
        }
        changed
    }

    /// The on-disk bytes (`len` bytes).
    pub fn to_bytes(&self, len: usize) -> Vec<u8> {
        match self {
            Bitmap::Full => vec![0xFF; len],
            Bitmap::Bits(b) => {
                let mut v = b.clone();
                v.resize(len, 0);
                v
            }
        }
    }

    /// Length of the run of sectors starting at `s` (bounded by `end`) that share `get(s)`.
    pub fn run(&self, s: u64, end: u64) -> (bool, u64) {
        let v = self.get(s);
        let mut e = s + 1;
        while e < end && self.get(e) == v {
            e += 1;
        }
        (v, e - s)
    }
}

/// Bytes of bitmap for a block of `block_size` bytes, padded to whole sectors.
pub fn bitmap_bytes(block_size: u32) -> u64 {
    let sectors = block_size as u64 / 512;
    sectors.div_ceil(8).div_ceil(512) * 512
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn most_significant_bit_is_the_first_sector() {
        let b = Bitmap::Bits(vec![0x80, 0x01]);
        assert!(b.get(0));
        assert!(!b.get(1));
        assert!(b.get(15));
    }

    #[test]
    fn setting_every_sector_collapses_to_full() {
        let mut b = Bitmap::empty(1);
        assert!(b.set_range(0, 8, 8));
        assert_eq!(b, Bitmap::Full);
        assert!(!b.set_range(0, 8, 8));
    }

    #[test]
    fn runs_split_at_changes() {
        let b = Bitmap::Bits(vec![0b1110_0000]);
        assert_eq!(b.run(0, 8), (true, 3));
        assert_eq!(b.run(3, 8), (false, 5));
    }

    #[test]
    fn two_mib_block_has_a_one_sector_bitmap() {
        assert_eq!(bitmap_bytes(2 << 20), 512);
        assert_eq!(bitmap_bytes(4096), 512);
        assert_eq!(bitmap_bytes(256 << 20), 64 << 10);
    }
}
