//! Which pages of guest RAM can hold data, and CRC-32C across runs of zeros: what lets a
//! checkpoint, its restore and a migration's first pass cost what the guest touched, not what
//! it was given.
//!
//! Guest RAM is private anonymous memory. A page nobody wrote (or one given back with
//! MADV_DONTNEED) is neither present nor swapped in `/proc/self/pagemap` and reads as zeros;
//! such pages are never read here. A present page may still hold zeros (the shared zero page,
//! or zeros written): callers check the bytes of what is populated.
//!
//! Invariant: a page that may hold data is always reported (present or swapped); where the
//! pagemap cannot be read, every page is reported.

use std::fs::File;
use std::os::unix::fs::FileExt;

use vm_memory::{GuestMemoryBackend, GuestMemoryMmap, GuestMemoryRegion, MemoryRegionAddress};

/// Guest page size.
pub const PAGE: usize = 4096;
/// pagemap entry: page present in RAM.
const PRESENT: u64 = 1 << 63;
/// pagemap entry: page swapped out.
const SWAPPED: u64 = 1 << 62;
/// pagemap entries read at once.
const CHUNK: usize = 8192;

/// One bit per page of each region of `mem` (bit `p % 64` of word `p / 64`): set for a page
/// that may hold data.
pub type PageSet = Vec<Vec<u64>>;

/// The pages of `mem` that may hold data (see the module invariant).
pub fn populated(mem: &GuestMemoryMmap) -> PageSet {
    let pagemap = File::open("/proc/self/pagemap");
    mem.iter()
        .map(|region| {
            let pages = (region.len() / PAGE as u64) as usize;
            let host = region
                .get_host_address(MemoryRegionAddress(0))
                .map(|p| p as usize)
                .ok();
            match (&pagemap, host) {
                (Ok(f), Some(addr)) => from_pagemap(f, addr, pages).unwrap_or_else(|e| {
                    tracing::debug!("/proc/self/pagemap: {e}: every page is read");
                    every(pages)
                }),
                _ => every(pages),
            }
        })
        .collect()
}

/// Every one of `pages` pages.
pub fn every(pages: usize) -> Vec<u64> {
    let mut v = vec![u64::MAX; pages.div_ceil(64)];
    if pages % 64 != 0 {
        if let Some(last) = v.last_mut() {
            *last = (1u64 << (pages % 64)) - 1;
        }
    }
    v
}

fn from_pagemap(f: &File, addr: usize, pages: usize) -> std::io::Result<Vec<u64>> {
    let mut bits = vec![0u64; pages.div_ceil(64)];
    let mut buf = vec![0u8; CHUNK * 8];
    let first = (addr / PAGE) as u64;
    let mut p = 0usize;
    while p < pages {
        let n = CHUNK.min(pages - p);
        f.read_exact_at(&mut buf[..n * 8], (first + p as u64) * 8)?;
        for (i, e) in buf[..n * 8].chunks_exact(8).enumerate() {
            let e = u64::from_le_bytes(e.try_into().unwrap_or_default());
            if e & (PRESENT | SWAPPED) != 0 {
                bits[(p + i) / 64] |= 1 << ((p + i) % 64);
            }
        }
        p += n;
    }
    Ok(bits)
}

/// Runs `[start, end)` of set bits among the first `pages` bits of `bits`, in order.
pub fn runs(bits: &[u64], pages: usize) -> impl Iterator<Item = (usize, usize)> + '_ {
    let set = move |p: usize| bits[p / 64] & (1 << (p % 64)) != 0;
    let mut p = 0usize;
    std::iter::from_fn(move || {
        while p < pages && !set(p) {
            p = if p % 64 == 0 && bits[p / 64] == 0 {
                p + 64
            } else {
                p + 1
            };
        }
        if p >= pages {
            return None;
        }
        let start = p;
        while p < pages && set(p) {
            p += 1;
        }
        Some((start, p))
    })
}

/// `crc` extended by `len` zero bytes, in O(log len) (runs of unpopulated memory are long).
pub fn crc_append_zeros(mut crc: u32, len: u64) -> u32 {
    const ZERO: [u8; PAGE] = [0; PAGE];
    crc = crc32c::crc32c_append(crc, &ZERO[..(len % PAGE as u64) as usize]);
    let (mut pages, mut block, mut block_len) = (len / PAGE as u64, crc32c::crc32c(&ZERO), PAGE);
    while pages > 0 {
        if pages & 1 == 1 {
            crc = crc32c::crc32c_combine(crc, block, block_len);
        }
        block = crc32c::crc32c_combine(block, block, block_len);
        block_len *= 2;
        pages >>= 1;
    }
    crc
}

#[cfg(test)]
mod tests {
    use super::*;
    use vm_memory::{Bytes, GuestAddress};

    #[test]
    fn zero_runs_extend_a_crc_as_the_zero_bytes_would() {
        for len in [
            0u64,
            1,
            4095,
            4096,
            4097,
            3 * 4096 + 17,
            1 << 20,
            (5 << 20) + 4096,
        ] {
            let zeros = vec![0u8; len as usize];
            let seed = crc32c::crc32c(b"before");
            assert_eq!(
                crc_append_zeros(seed, len),
                crc32c::crc32c_append(seed, &zeros),
                "{len}"
            );
        }
    }

    #[test]
    fn only_written_pages_are_populated_in_fresh_guest_memory() {
        let mem = GuestMemoryMmap::from_ranges(&[(GuestAddress(0), 64 << 20)]).unwrap();
        for p in [3u64, 4, 5, 700, 16383] {
            mem.write_obj(0xabu8, GuestAddress(p * PAGE as u64 + 9))
                .unwrap();
        }
        let set = populated(&mem);
        let got: Vec<(usize, usize)> = runs(&set[0], 16384).collect();
        // Transparent huge pages may populate whole 2 MiB pages around a write: every written
        // page must be in a run, and far fewer pages than the whole region are.
        for p in [3usize, 4, 5, 700, 16383] {
            assert!(got.iter().any(|&(a, b)| a <= p && p < b), "{p}: {got:?}");
        }
        let total: usize = got.iter().map(|(a, b)| b - a).sum();
        assert!(total < 16384, "every page reported: {got:?}");
    }

    #[test]
    fn runs_cover_exactly_the_set_bits() {
        let mut bits = vec![0u64; 3];
        for p in [0usize, 1, 2, 63, 64, 65, 130, 191] {
            bits[p / 64] |= 1 << (p % 64);
        }
        let got: Vec<_> = runs(&bits, 192).collect();
        assert_eq!(got, vec![(0, 3), (63, 66), (130, 131), (191, 192)]);
        assert_eq!(runs(&every(70), 70).collect::<Vec<_>>(), vec![(0, 70)]);
    }
}
