//! The part of `compact` both formats share: closing the holes in an image file by moving the
//! blocks at its end down into them. The formats say where their structures and blocks lie,
//! where a block may start inside a free range, how to copy, and how to make a batch of moves
//! durable ([`BlockMover`]); [`close_holes`] runs the loop.
//!
//! ```text
//! free:   | used | hole | A | hole | B | C |
//! loop:   C (highest) -> lowest hole that ends at or below C's start; then B; ...
//! commit: every `batch_bytes` copied and at the end: copies synced, then the table change
//! ```
//!
//! Invariants (each move leaves a valid image with the same content, crash or not):
//! - A block is copied only into space that is free: neither a structure nor a live block, nor
//!   the old place of a block moved since the last commit (its table entry may still point
//!   there after a crash). Space a move frees joins the free map only after
//!   [`BlockMover::commit`] has made the move durable.
//! - A block only moves down: its new place ends at or below its old start. Free space a commit
//!   returns lies above every block still to move, so a block length that found no place once
//!   finds none later either, and the loop skips further blocks of that length.

use std::collections::BTreeMap;

/// Free file ranges, disjoint and not touching: start -> end.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct FreeRanges(BTreeMap<u64, u64>);

impl FreeRanges {
    /// The gaps below `end` between the `used` ranges (any order, may overlap): what no
    /// structure or block occupies, clipped to `end`.
    pub fn gaps(mut used: Vec<(u64, u64)>, end: u64) -> FreeRanges {
        used.sort_unstable();
        let mut free = FreeRanges::default();
        let mut at = 0;
        for (s, e) in used {
            if s > at {
                free.add(at, s.min(end));
            }
            at = at.max(e);
        }
        if at < end {
            free.add(at, end);
        }
        free
    }

    /// The ranges, lowest first.
    pub fn iter(&self) -> impl Iterator<Item = (u64, u64)> + '_ {
        self.0.iter().map(|(&s, &e)| (s, e))
    }

    /// Removes `[s, e)`, which must lie inside one free range (else nothing changes).
    pub fn take(&mut self, s: u64, e: u64) {
        let Some((&fs, &fe)) = self.0.range(..=s).next_back() else {
            return;
        };
        if e > fe {
            return;
        }
        self.0.remove(&fs);
        if fs < s {
            self.0.insert(fs, s);
        }
        if e < fe {
            self.0.insert(e, fe);
        }
    }

    /// Adds `[s, e)`, merging it with the ranges it touches or overlaps. Empty ranges are
    /// ignored.
    pub fn add(&mut self, mut s: u64, mut e: u64) {
        if e <= s {
            return;
        }
        if let Some((&ps, &pe)) = self.0.range(..=s).next_back() {
            if pe >= s {
                self.0.remove(&ps);
                s = ps;
                e = e.max(pe);
            }
        }
        while let Some((&ns, &ne)) = self.0.range(s..).next() {
            if ns > e {
                break;
            }
            self.0.remove(&ns);
            e = e.max(ne);
        }
        self.0.insert(s, e);
    }
}

/// A block of the file that may move.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub struct LiveBlock {
    /// Where it starts in the file.
    pub offset: u64,
    /// Bytes it occupies.
    pub len: u64,
    /// The format's name for it (a BAT index), handed back to [`BlockMover::repoint`].
    pub id: usize,
}

/// What the hole-closing loop needs from a format.
pub trait BlockMover {
    /// The format's error.
    type Error;
    /// Where a block of `len` bytes goes in the free range `[start, end)`, if it fits. The
    /// default: at `start`.
    fn place(&self, start: u64, end: u64, len: u64) -> Option<u64> {
        (start.checked_add(len)? <= end).then_some(start)
    }
    /// Reads `buf.len()` bytes of the file at `offset`.
    fn read(&mut self, buf: &mut [u8], offset: u64) -> Result<(), Self::Error>;
    /// Writes `buf` to the file at `offset`.
    fn write(&mut self, buf: &[u8], offset: u64) -> Result<(), Self::Error>;
    /// Points block `id` at its copy at `to`; durable at the next commit.
    fn repoint(&mut self, id: usize, to: u64);
    /// Makes the moves since the last commit durable: the copies first, then the table.
    fn commit(&mut self) -> Result<(), Self::Error>;
}

/// Moves blocks from the end of the file into the lowest holes of `free` until none fits,
/// committing after every `batch_bytes` copied and at the end; copies through a buffer of at
/// most `chunk` bytes. `live` lists every block (any order), `free` the space nothing uses.
/// Calls `progress` with each moved block's length; returns how many blocks moved.
pub fn close_holes<M: BlockMover>(
    mover: &mut M,
    mut live: Vec<LiveBlock>,
    mut free: FreeRanges,
    batch_bytes: u64,
    chunk: u64,
    progress: &mut dyn FnMut(u64),
) -> Result<u64, M::Error> {
    live.sort_unstable();
    let longest = live.iter().map(|b| b.len).max().unwrap_or(0);
    let mut buf = vec![0u8; chunk.min(longest) as usize];
    let mut stuck: Vec<u64> = Vec::new();
    let mut pending: Vec<(u64, u64)> = Vec::new();
    let mut batch = 0u64;
    let mut moved = 0;
    while let Some(b) = live.pop() {
        if buf.is_empty() || stuck.contains(&b.len) {
            continue;
        }
        let slot = free
            .iter()
            .take_while(|&(s, _)| s < b.offset)
            .find_map(|(s, e)| mover.place(s, e.min(b.offset), b.len));
        let Some(to) = slot else {
            stuck.push(b.len);
            continue;
        };
        free.take(to, to + b.len);
        let mut done = 0;
        while done < b.len {
            let n = (b.len - done).min(buf.len() as u64) as usize;
            mover.read(&mut buf[..n], b.offset + done)?;
            mover.write(&buf[..n], to + done)?;
            done += n as u64;
        }
        mover.repoint(b.id, to);
        pending.push((b.offset, b.offset + b.len));
        moved += 1;
        batch += b.len;
        progress(b.len);
        if batch >= batch_bytes {
            commit(mover, &mut free, &mut pending)?;
            batch = 0;
        }
    }
    commit(mover, &mut free, &mut pending)?;
    Ok(moved)
}

/// Commits the pending moves and frees their old places.
fn commit<M: BlockMover>(
    mover: &mut M,
    free: &mut FreeRanges,
    pending: &mut Vec<(u64, u64)>,
) -> Result<(), M::Error> {
    if pending.is_empty() {
        return Ok(());
    }
    mover.commit()?;
    for (s, e) in pending.drain(..) {
        free.add(s, e);
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn free_ranges_split_and_merge() {
        let mut f = FreeRanges::default();
        f.add(0, 100);
        f.take(10, 20);
        assert_eq!(f.iter().collect::<Vec<_>>(), vec![(0, 10), (20, 100)]);
        f.add(10, 20);
        assert_eq!(f.iter().collect::<Vec<_>>(), vec![(0, 100)]);
        let mut f = FreeRanges::default();
        f.add(0, 10);
        f.add(50, 60);
        f.add(20, 30);
        assert_eq!(f.iter().count(), 3);
    }

    #[test]
    fn gaps_lie_between_used_ranges_and_below_the_end() {
        let f = FreeRanges::gaps(vec![(30, 40), (0, 10), (35, 50), (90, 120)], 100);
        assert_eq!(f.iter().collect::<Vec<_>>(), vec![(10, 30), (50, 90)]);
        let f = FreeRanges::gaps(vec![(0, 10)], 64);
        assert_eq!(f.iter().collect::<Vec<_>>(), vec![(10, 64)]);
    }

    /// A file in memory whose blocks' places are a table, with a log of what happened.
    struct Mem {
        file: Vec<u8>,
        table: Vec<u64>,
        durable: Vec<u64>,
        commits: usize,
    }

    impl BlockMover for Mem {
        type Error = String;
        fn read(&mut self, buf: &mut [u8], offset: u64) -> Result<(), String> {
            let o = offset as usize;
            buf.copy_from_slice(&self.file[o..o + buf.len()]);
            Ok(())
        }
        fn write(&mut self, buf: &[u8], offset: u64) -> Result<(), String> {
            let o = offset as usize;
            self.file[o..o + buf.len()].copy_from_slice(buf);
            Ok(())
        }
        fn repoint(&mut self, id: usize, to: u64) {
            self.table[id] = to;
        }
        fn commit(&mut self) -> Result<(), String> {
            self.durable = self.table.clone();
            self.commits += 1;
            Ok(())
        }
    }

    #[test]
    fn highest_blocks_move_into_lowest_holes_with_their_bytes() {
        // | hdr 0..10 | hole 10..30 | A 30..40 | hole 40..60 | B 60..70 | C 70..80 |
        let mut m = Mem {
            file: (0..80).map(|i| i as u8).collect(),
            table: vec![30, 60, 70],
            durable: vec![],
            commits: 0,
        };
        let live: Vec<LiveBlock> = [30, 60, 70]
            .iter()
            .enumerate()
            .map(|(id, &offset)| LiveBlock {
                offset,
                len: 10,
                id,
            })
            .collect();
        let free = FreeRanges::gaps(vec![(0, 10), (30, 40), (60, 80)], 80);
        let mut seen = 0;
        // A 4-byte chunk makes every copy take several reads and writes.
        let n = close_holes(&mut m, live, free, 15, 4, &mut |b| seen += b).unwrap();
        // C went to 10, B to 20; A has no hole below it left (40..60 and the old places of
        // B and C lie above it).
        assert_eq!(n, 2);
        assert_eq!(seen, 20);
        assert_eq!(m.table, vec![30, 20, 10]);
        assert_eq!(m.durable, m.table);
        assert_eq!(&m.file[10..20], &(70..80).collect::<Vec<u8>>()[..]);
        assert_eq!(&m.file[20..30], &(60..70).collect::<Vec<u8>>()[..]);
        // 15 bytes per batch: one commit after the second move, nothing left for the end.
        assert_eq!(m.commits, 1);
    }

    #[test]
    fn a_length_that_does_not_fit_leaves_shorter_blocks_moving() {
        // | hole 0..4 | A 4..8 | hole 8..12 | C 12..16 | D 16..20 | B 20..30 (len 10) |
        let mut m = Mem {
            file: (0..30).map(|i| i as u8).collect(),
            table: vec![4, 20, 12, 16],
            durable: vec![],
            commits: 0,
        };
        let live = vec![
            LiveBlock {
                offset: 4,
                len: 4,
                id: 0,
            },
            LiveBlock {
                offset: 20,
                len: 10,
                id: 1,
            },
            LiveBlock {
                offset: 12,
                len: 4,
                id: 2,
            },
            LiveBlock {
                offset: 16,
                len: 4,
                id: 3,
            },
        ];
        let free = FreeRanges::gaps(vec![(4, 8), (12, 30)], 30);
        let n = close_holes(&mut m, live, free, 1 << 20, 1 << 20, &mut |_| {}).unwrap();
        // B fits no hole and stays; D and C, popped after it, still fill the holes; A has no
        // hole below it left.
        assert_eq!(n, 2);
        assert_eq!(m.durable, vec![4, 20, 8, 0]);
        assert_eq!(&m.file[0..4], &[16, 17, 18, 19]);
        assert_eq!(&m.file[8..12], &[12, 13, 14, 15]);
        assert_eq!(m.commits, 1);
    }
}
