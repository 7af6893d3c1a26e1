//! The VHDX metadata log: finding the active sequence to replay, and building entries to write.
//!
//! ```text
//! entry:  | header (64 B) + descriptors (32 B each) ... | data sector 4 KiB | data sector ... |
//!           126 descriptors fit in the first 4 KiB sector, 128 in each further one.
//! data descriptor + data sector = one 4 KiB page:
//!   leading 8 bytes (in the descriptor) + 4084 bytes (in the sector) + trailing 4 bytes
//! ```
//!
//! Replay finds every valid entry whose log GUID matches the header, takes the one with the
//! highest sequence number as the head, and walks back through its tail to the first entry of
//! its sequence; applying those entries in order is the replay. Entries are validated completely
//! (signatures, lengths, CRC-32C over the whole entry, descriptor and data-sector sequence
//! numbers) before anything is applied.
//!
//! Our writer keeps the log simple: an entry is written, synced, applied and synced before the
//! next one, so every entry is a sequence of its own (tail = its own offset).

use crate::format::{
    crc_with_zeroed, seal, DataDescriptor, DataSector, LogEntryHeader, ZeroDescriptor,
    CHECKSUM_OFFSET, DATA_DESC_SIGNATURE, DATA_SECTOR_SIGNATURE, LOG_ENTRY_HEADER_SIZE,
    LOG_ENTRY_SIGNATURE, ZERO_DESC_SIGNATURE,
};
use std::collections::HashMap;
use uuid::Uuid;
use zerocopy::{FromBytes, FromZeros, IntoBytes};

/// Log sector size.
pub const SECTOR: usize = 4096;
/// Descriptors in the first sector of an entry.
const FIRST_SECTOR_DESCRIPTORS: usize = 126;
/// Most pages our writer puts in one entry (one descriptor sector).
pub const MAX_PAGES_PER_ENTRY: usize = FIRST_SECTOR_DESCRIPTORS;

/// One write the replay performs.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum LogWrite {
    /// A 4 KiB page at a 4 KiB-aligned file offset.
    Page {
        /// File offset.
        offset: u64,
        /// Content.
        data: Box<[u8; SECTOR]>,
    },
    /// Zeros.
    Zero {
        /// File offset.
        offset: u64,
        /// Length (4 KiB multiple).
        length: u64,
    },
}

/// The replay a log calls for.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Replay {
    /// Writes in application order.
    pub writes: Vec<LogWrite>,
    /// The file must be at least this long afterwards.
    pub last_file_offset: u64,
    /// The file must have been at least this long when the head entry was written.
    pub flushed_file_offset: u64,
    /// Sequence number of the head entry.
    pub head_sequence: u64,
    /// Log offset just after the head entry (where the next entry goes).
    pub next_offset: u64,
}

#[derive(Debug, Clone)]
struct Entry {
    offset: u64,
    length: u64,
    tail: u64,
    sequence: u64,
    flushed_file_offset: u64,
    last_file_offset: u64,
    writes: Vec<LogWrite>,
}

fn descriptor_sectors(count: usize) -> usize {
    if count <= FIRST_SECTOR_DESCRIPTORS {
        1
    } else {
        1 + (count - FIRST_SECTOR_DESCRIPTORS).div_ceil(128)
    }
}

/// Reads `len` bytes of the circular log starting at log offset `at`.
fn circular(log: &[u8], at: u64, len: usize) -> Vec<u8> {
    let n = log.len();
    let start = at as usize % n;
    if start + len <= n {
        log[start..start + len].to_vec()
    } else {
        let mut v = log[start..].to_vec();
        let mut rest = len - (n - start);
        while rest > 0 {
            let take = rest.min(n);
            v.extend_from_slice(&log[..take]);
            rest -= take;
        }
        v
    }
}

/// Parses and fully validates the entry at log offset `at`; `None` if it is not a valid entry.
fn parse_entry(log: &[u8], at: u64, guid: Uuid) -> Option<Entry> {
    let head = circular(log, at, SECTOR);
    let (h, _) = LogEntryHeader::read_from_prefix(&head).ok()?;
    if h.signature.get() != LOG_ENTRY_SIGNATURE {
        return None;
    }
    let length = h.entry_length.get() as usize;
    let tail = h.tail.get() as u64;
    let sequence = h.sequence_number.get();
    let count = h.descriptor_count.get() as usize;
    if length == 0
        || !length.is_multiple_of(SECTOR)
        || length > log.len()
        || sequence == 0
        || !tail.is_multiple_of(SECTOR as u64)
        || tail >= log.len() as u64
    {
        return None;
    }
    if h.log_guid.get() != guid {
        return None;
    }
    let dsec = descriptor_sectors(count);
    if dsec * SECTOR > length {
        return None;
    }
    let bytes = circular(log, at, length);
    if crc_with_zeroed(&bytes, CHECKSUM_OFFSET) != h.checksum.get() {
        return None;
    }
    let (descriptors, _) =
        <[DataDescriptor]>::ref_from_prefix_with_elems(&bytes[LOG_ENTRY_HEADER_SIZE..], count)
            .ok()?;
    let mut writes = Vec::with_capacity(count);
    let mut data_index = 0usize;
    for d in descriptors {
        // Both descriptor kinds keep the file offset and sequence number at the same place.
        let offset = d.file_offset.get();
        if d.sequence_number.get() != sequence || !offset.is_multiple_of(SECTOR as u64) {
            return None;
        }
        match d.signature.get() {
            ZERO_DESC_SIGNATURE => {
                let z: ZeroDescriptor = zerocopy::transmute!(*d);
                let len = z.zero_length.get();
                if !len.is_multiple_of(SECTOR as u64) {
                    return None;
                }
                writes.push(LogWrite::Zero {
                    offset,
                    length: len,
                });
            }
            DATA_DESC_SIGNATURE => {
                let s = (dsec + data_index) * SECTOR;
                data_index += 1;
                if s + SECTOR > length {
                    return None;
                }
                let sec = DataSector::ref_from_bytes(&bytes[s..s + SECTOR]).ok()?;
                let seq = (sec.sequence_high.get() as u64) << 32 | sec.sequence_low.get() as u64;
                if sec.signature.get() != DATA_SECTOR_SIGNATURE || seq != sequence {
                    return None;
                }
                let mut page = Box::new([0u8; SECTOR]);
                page[0..8].copy_from_slice(&d.leading_bytes);
                page[8..4092].copy_from_slice(&sec.data);
                page[4092..4096].copy_from_slice(&d.trailing_bytes);
                writes.push(LogWrite::Page { offset, data: page });
            }
            _ => return None,
        }
    }
    if (dsec + data_index) * SECTOR != length {
        return None;
    }
    Some(Entry {
        offset: at,
        length: length as u64,
        tail,
        sequence,
        flushed_file_offset: h.flushed_file_offset.get(),
        last_file_offset: h.last_file_offset.get(),
        writes,
    })
}

/// Most chain steps [`find_replay`] takes before declaring the log corrupt (bounds the work a
/// hostile log can cause).
const MAX_STEPS: usize = 1 << 20;

/// Finds the active sequence of `log` (the whole log region) for `guid`. `Ok(None)` when the log
/// holds no valid entry for it (nothing to replay); `Err` when the log is too tangled to decide.
pub fn find_replay(log: &[u8], guid: Uuid) -> Result<Option<Replay>, String> {
    if log.is_empty() || !log.len().is_multiple_of(SECTOR) {
        return Ok(None);
    }
    let n = log.len() as u64;
    let entries: Vec<Entry> = (0..n)
        .step_by(SECTOR)
        .filter_map(|at| parse_entry(log, at, guid))
        .collect();
    // (end offset, sequence) -> entry: the possible predecessors of an entry.
    let by_end: HashMap<(u64, u64), &Entry> = entries
        .iter()
        .map(|e| (((e.offset + e.length) % n, e.sequence), e))
        .collect();
    // Candidate heads by descending sequence number; the first whose chain back to its tail is
    // complete (consecutive sequence numbers, contiguous in the log) is the active one.
    let mut heads: Vec<&Entry> = entries.iter().collect();
    heads.sort_by_key(|e| std::cmp::Reverse(e.sequence));
    let mut steps = 0usize;
    for head in heads {
        let mut chain = vec![head];
        let mut cur = head;
        let complete = loop {
            if cur.offset == head.tail {
                break true;
            }
            steps += 1;
            if steps > MAX_STEPS {
                return Err("log entries form too many overlapping sequences".into());
            }
            match by_end.get(&(cur.offset, cur.sequence.wrapping_sub(1))) {
                Some(p) if chain.len() < entries.len() => {
                    chain.push(p);
                    cur = p;
                }
                _ => break false,
            }
        };
        if !complete {
            continue;
        }
        chain.reverse();
        return Ok(Some(Replay {
            writes: chain
                .iter()
                .flat_map(|e| e.writes.iter().cloned())
                .collect(),
            last_file_offset: head.last_file_offset,
            flushed_file_offset: head.flushed_file_offset,
            head_sequence: head.sequence,
            next_offset: (head.offset + head.length) % n,
        }));
    }
    Ok(None)
}

/// Builds one log entry holding `pages` (file offset, 4 KiB content), at most
/// [`MAX_PAGES_PER_ENTRY`] of them. The entry's tail is its own offset.
pub fn build_entry(
    log_offset: u64,
    sequence: u64,
    guid: Uuid,
    flushed_file_offset: u64,
    last_file_offset: u64,
    pages: &[(u64, &[u8; SECTOR])],
) -> Vec<u8> {
    assert!(
        pages.len() <= MAX_PAGES_PER_ENTRY,
        "caller splits pages into entries"
    );
    let length = (1 + pages.len()) * SECTOR;
    let header = LogEntryHeader {
        signature: LOG_ENTRY_SIGNATURE.into(),
        checksum: 0.into(),
        entry_length: (length as u32).into(),
        tail: (log_offset as u32).into(),
        sequence_number: sequence.into(),
        descriptor_count: (pages.len() as u32).into(),
        reserved: 0.into(),
        log_guid: guid.into(),
        flushed_file_offset: flushed_file_offset.into(),
        last_file_offset: last_file_offset.into(),
    };
    let mut b = Vec::with_capacity(length);
    b.extend_from_slice(header.as_bytes());
    for (offset, data) in pages {
        let mut d = DataDescriptor::new_zeroed();
        d.signature = DATA_DESC_SIGNATURE.into();
        d.trailing_bytes.copy_from_slice(&data[4092..4096]);
        d.leading_bytes.copy_from_slice(&data[0..8]);
        d.file_offset = (*offset).into();
        d.sequence_number = sequence.into();
        b.extend_from_slice(d.as_bytes());
    }
    b.resize(SECTOR, 0);
    for (_, data) in pages {
        let mut sec = DataSector::new_zeroed();
        sec.signature = DATA_SECTOR_SIGNATURE.into();
        sec.sequence_high = ((sequence >> 32) as u32).into();
        sec.data.copy_from_slice(&data[8..4092]);
        sec.sequence_low = (sequence as u32).into();
        b.extend_from_slice(sec.as_bytes());
    }
    seal(&mut b, CHECKSUM_OFFSET);
    b
}

#[cfg(test)]
mod tests {
    use super::*;

    fn page(fill: u8) -> [u8; SECTOR] {
        let mut p = [fill; SECTOR];
        p[0] = 0xA0;
        p[4095] = 0x0B;
        p
    }

    fn log_with(entries: &[(u64, Vec<u8>)]) -> Vec<u8> {
        let mut log = vec![0u8; 1 << 20];
        for (at, e) in entries {
            let at = *at as usize;
            log[at..at + e.len()].copy_from_slice(e);
        }
        log
    }

    #[test]
    fn a_written_entry_replays_its_pages() {
        let g = Uuid::from_u128(9);
        let (p1, p2) = (page(1), page(2));
        let e = build_entry(
            0,
            5,
            g,
            1 << 22,
            1 << 23,
            &[(3 << 20, &p1), (3 << 20 | 4096, &p2)],
        );
        let r = find_replay(&log_with(&[(0, e)]), g).unwrap().unwrap();
        assert_eq!(r.head_sequence, 5);
        assert_eq!(r.last_file_offset, 1 << 23);
        assert_eq!(r.writes.len(), 2);
        assert_eq!(
            r.writes[1],
            LogWrite::Page {
                offset: 3 << 20 | 4096,
                data: Box::new(p2)
            }
        );
        assert_eq!(r.next_offset, 3 * 4096);
    }

    #[test]
    fn entries_with_another_guid_or_a_bad_crc_are_ignored() {
        let g = Uuid::from_u128(9);
        let p = page(1);
        let e = build_entry(0, 5, g, 0, 0, &[(0, &p)]);
        assert!(
            find_replay(&log_with(&[(0, e.clone())]), Uuid::from_u128(8))
                .unwrap()
                .is_none()
        );
        let mut bad = e;
        bad[5000] ^= 1;
        assert!(find_replay(&log_with(&[(0, bad)]), g).unwrap().is_none());
    }

    #[test]
    fn the_highest_sequence_wins_and_a_torn_newer_entry_falls_back() {
        let g = Uuid::from_u128(9);
        let (old, new) = (page(1), page(2));
        let e1 = build_entry(0, 7, g, 0, 0, &[(0, &old)]);
        let e2 = build_entry(8192, 8, g, 0, 0, &[(0, &new)]);
        let r = find_replay(&log_with(&[(0, e1.clone()), (8192, e2.clone())]), g)
            .unwrap()
            .unwrap();
        assert_eq!(r.head_sequence, 8);
        let mut torn = e2;
        torn[4096 + 100] ^= 0xFF;
        let r = find_replay(&log_with(&[(0, e1), (8192, torn)]), g)
            .unwrap()
            .unwrap();
        assert_eq!(r.head_sequence, 7);
    }

    #[test]
    fn a_sequence_is_replayed_from_its_tail() {
        let g = Uuid::from_u128(9);
        let (a, b) = (page(1), page(2));
        let e1 = build_entry(0, 3, g, 0, 0, &[(0, &a)]);
        // Second entry continues the sequence that starts at offset 0.
        let mut e2 = build_entry(8192, 4, g, 0, 0, &[(4096, &b)]);
        LogEntryHeader::mut_from_prefix(&mut e2).unwrap().0.tail = 0.into();
        seal(&mut e2, CHECKSUM_OFFSET);
        let r = find_replay(&log_with(&[(0, e1), (8192, e2)]), g)
            .unwrap()
            .unwrap();
        assert_eq!(r.writes.len(), 2);
        assert!(matches!(r.writes[0], LogWrite::Page { offset: 0, .. }));
    }

    #[test]
    fn an_entry_wrapping_the_end_of_the_log_is_read_across_it() {
        let g = Uuid::from_u128(9);
        let p = page(3);
        let e = build_entry(4096 * 255, 2, g, 0, 0, &[(0, &p)]);
        let mut log = vec![0u8; 1 << 20];
        log[4096 * 255..].copy_from_slice(&e[..4096]);
        log[..4096].copy_from_slice(&e[4096..]);
        let r = find_replay(&log, g).unwrap().unwrap();
        assert_eq!(
            r.writes,
            vec![LogWrite::Page {
                offset: 0,
                data: Box::new(p)
            }]
        );
    }
}
