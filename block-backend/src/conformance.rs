//! The [`Disk`] conformance suite: one set of behaviours every disk implementation must show,
//! run for every format (raw; VHD and VHDX fixed, dynamic and differencing) and engine.
//!
//! ```text
//!   fixture (Fn() -> Box<dyn TestDisk>) ──> fresh disk in its own temp dir
//!        │
//!        ├─ each check: drive the disk, compare against the expected bytes, panic on mismatch
//!        └─ TestDisk::finish: fixture-specific postconditions (e.g. the parent file is untouched)
//! ```
//!
//! Use [`crate::disk_conformance_tests!`] to get one `#[test]` per behaviour, or [`run_all`] to
//! run them in one test. The checks panic with a message naming the behaviour, offset and
//! bytes on failure (they are test code; enable the `conformance` feature to get them).

use crate::{Disk, MapExtent};

/// A disk under test, with what the suite needs beyond the [`Disk`] trait.
pub trait TestDisk {
    /// The open disk.
    fn disk(&mut self) -> &mut dyn Disk;

    /// Closes the disk (after a flush) and opens it again from its files.
    fn reopen(&mut self);

    /// Byte at `offset` of a freshly made disk: zero unless layered over a parent with data.
    fn initial_byte(&self, _offset: u64) -> u8 {
        0
    }

    /// Allocation unit, if the format has one (write-spanning checks straddle its boundaries).
    fn block_size(&self) -> Option<u64> {
        None
    }

    /// Opens another, read-only handle on the same files, if the fixture supports it.
    fn open_read_only(&mut self) -> Option<Box<dyn Disk>> {
        None
    }

    /// Fixture-specific postconditions, checked at the end of every behaviour.
    fn finish(&mut self) {}
}

/// A maker of fresh test disks.
pub type Make<'a> = &'a dyn Fn() -> Box<dyn TestDisk>;

/// One behaviour of the suite.
pub type Check = fn(Make);

/// Every behaviour with its name, in the order [`run_all`] runs them.
pub const ALL: &[(&str, Check)] = &[
    ("size_is_reported_and_stable", size_is_reported_and_stable),
    (
        "fresh_disk_reads_initial_content",
        fresh_disk_reads_initial_content,
    ),
    ("write_then_read_back", write_then_read_back),
    (
        "unaligned_write_keeps_neighbouring_bytes",
        unaligned_write_keeps_neighbouring_bytes,
    ),
    (
        "write_spanning_block_boundaries_reads_back",
        write_spanning_block_boundaries_reads_back,
    ),
    (
        "write_at_last_byte_reads_back",
        write_at_last_byte_reads_back,
    ),
    ("read_past_end_fails", read_past_end_fails),
    (
        "write_past_end_fails_and_changes_nothing",
        write_past_end_fails_and_changes_nothing,
    ),
    ("flush_keeps_data", flush_keeps_data),
    ("discard_reads_as_zeros", discard_reads_as_zeros),
    ("reopen_keeps_writes", reopen_keeps_writes),
    (
        "map_covers_disk_and_reports_written_data",
        map_covers_disk_and_reports_written_data,
    ),
    (
        "read_only_open_refuses_writes",
        read_only_open_refuses_writes,
    ),
];

/// Runs every behaviour of the suite on fresh disks from `make`.
pub fn run_all(make: Make) {
    for (name, check) in ALL {
        eprintln!("conformance: {name}");
        check(make);
    }
}

/// Generates one `#[test]` per conformance behaviour, each calling `$make` for fresh disks.
///
/// ```text
/// mod dynamic_vhd {
///     fn make() -> Box<dyn block_backend::conformance::TestDisk> { /* ... */ }
///     block_backend::disk_conformance_tests!(make);
/// }
/// ```
#[macro_export]
macro_rules! disk_conformance_tests {
    ($make:expr) => {
        $crate::disk_conformance_tests!(@each $make;
            size_is_reported_and_stable,
            fresh_disk_reads_initial_content,
            write_then_read_back,
            unaligned_write_keeps_neighbouring_bytes,
            write_spanning_block_boundaries_reads_back,
            write_at_last_byte_reads_back,
            read_past_end_fails,
            write_past_end_fails_and_changes_nothing,
            flush_keeps_data,
            discard_reads_as_zeros,
            reopen_keeps_writes,
            map_covers_disk_and_reports_written_data,
            read_only_open_refuses_writes,
        );
    };
    (@each $make:expr; $($name:ident),* $(,)?) => {
        $(
            #[test]
            fn $name() {
                $crate::conformance::$name(&$make);
            }
        )*
    };
}

/// Deterministic non-trivial bytes for `[offset, offset + len)`, varying with `seed`.
pub fn pattern(seed: u8, offset: u64, len: usize) -> Vec<u8> {
    (0..len as u64)
        .map(|i| pattern_byte(seed, offset + i))
        .collect()
}

/// One byte of [`pattern`]; never zero, so written data is distinguishable from holes.
pub fn pattern_byte(seed: u8, offset: u64) -> u8 {
    let x = offset
        .wrapping_mul(0x9E37_79B9_7F4A_7C15)
        .wrapping_add(u64::from(seed).wrapping_mul(0x0100_0000_01B3));
    ((x >> 56) as u8) | 1
}

/// The expected content of a disk: initial bytes plus the writes the check made.
struct Model {
    bytes: Vec<u8>,
}

impl Model {
    fn fresh(t: &mut dyn TestDisk) -> Model {
        let size = t.disk().size();
        let len = usize::try_from(size).expect("conformance disks must fit in memory");
        let bytes = (0..len as u64).map(|o| t.initial_byte(o)).collect();
        Model { bytes }
    }

    fn write(&mut self, offset: u64, data: &[u8]) {
        let o = offset as usize;
        self.bytes[o..o + data.len()].copy_from_slice(data);
    }

    fn zero(&mut self, offset: u64, len: u64) {
        let o = offset as usize;
        self.bytes[o..o + len as usize].fill(0);
    }
}

/// Reads `[offset, offset + len)` and panics unless it equals the model.
fn expect_range(what: &str, d: &mut dyn Disk, model: &Model, offset: u64, len: u64) {
    let mut buf = vec![0u8; len as usize];
    d.read_at(&mut buf, offset)
        .unwrap_or_else(|e| panic!("{what}: read of {len} bytes at {offset} failed: {e}"));
    let want = &model.bytes[offset as usize..(offset + len) as usize];
    if buf == want {
        return;
    }
    if let Some(i) = buf.iter().zip(want).position(|(a, b)| a != b) {
        panic!(
            "{what}: byte at offset {} reads {:#04x}, expected {:#04x}",
            offset + i as u64,
            buf[i],
            want[i]
        );
    }
}

/// Compares the whole disk with the model.
fn expect_all(what: &str, d: &mut dyn Disk, model: &Model) {
    let size = d.size();
    let mut pos = 0;
    while pos < size {
        let n = (size - pos).min(1 << 20);
        expect_range(what, d, model, pos, n);
        pos += n;
    }
}

fn write(what: &str, d: &mut dyn Disk, model: &mut Model, offset: u64, data: &[u8]) {
    d.write_at(data, offset).unwrap_or_else(|e| {
        panic!(
            "{what}: write of {} bytes at {offset} failed: {e}",
            data.len()
        )
    });
    model.write(offset, data);
}

/// The size is positive, sector sizes are sane, and neither changes with writes or a reopen.
pub fn size_is_reported_and_stable(make: Make) {
    let mut t = make();
    let size = t.disk().size();
    assert!(size > 0, "size must be positive");
    let (logical, physical) = (
        t.disk().logical_sector_size(),
        t.disk().physical_sector_size(),
    );
    assert!(
        logical >= 512 && logical.is_power_of_two(),
        "logical sector size {logical}"
    );
    assert!(
        physical >= logical && physical.is_power_of_two(),
        "physical sector size {physical}"
    );
    t.disk().write_at(b"x", size - 1).expect("write last byte");
    assert_eq!(t.disk().size(), size, "size changed after a write");
    t.reopen();
    assert_eq!(t.disk().size(), size, "size changed after reopen");
    t.finish();
}

/// A fresh disk reads as its initial content (zeros for a standalone disk) everywhere.
pub fn fresh_disk_reads_initial_content(make: Make) {
    let mut t = make();
    let model = Model::fresh(&mut *t);
    expect_all("fresh disk", t.disk(), &model);
    t.finish();
}

/// Aligned writes read back, and the bytes around them are unchanged.
pub fn write_then_read_back(make: Make) {
    let mut t = make();
    let mut model = Model::fresh(&mut *t);
    let size = t.disk().size();
    let d = t.disk();
    write("aligned 4K", d, &mut model, 4096, &pattern(1, 4096, 4096));
    write(
        "aligned 64K",
        d,
        &mut model,
        size / 2,
        &pattern(2, size / 2, 65536),
    );
    write("first sector", d, &mut model, 0, &pattern(3, 0, 512));
    expect_range("after aligned writes", d, &model, 0, 16384);
    expect_range(
        "after aligned writes",
        d,
        &model,
        size / 2 - 4096,
        65536 + 8192,
    );
    expect_all("after aligned writes", d, &model);
    t.finish();
}

/// Writes of a few bytes inside a sector, and writes with unaligned edges, change exactly the
/// bytes written.
pub fn unaligned_write_keeps_neighbouring_bytes(make: Make) {
    let mut t = make();
    let mut model = Model::fresh(&mut *t);
    let d = t.disk();
    write(
        "3 bytes in a sector",
        d,
        &mut model,
        1000,
        &pattern(4, 1000, 3),
    );
    write(
        "crossing a sector",
        d,
        &mut model,
        511,
        &pattern(5, 511, 700),
    );
    write(
        "odd edges",
        d,
        &mut model,
        8191,
        &pattern(6, 8191, 3 * 512 + 7),
    );
    write("one byte", d, &mut model, 70_001, &[0xAB]);
    write(
        "overwrite middle",
        d,
        &mut model,
        1001,
        &pattern(7, 1001, 1),
    );
    expect_range("after unaligned writes", d, &model, 0, 16384);
    expect_range("after unaligned writes", d, &model, 65536, 8192);
    expect_all("after unaligned writes", d, &model);
    t.reopen();
    expect_all("unaligned writes after reopen", t.disk(), &model);
    t.finish();
}

/// Writes straddling one and several allocation-block boundaries read back whole.
pub fn write_spanning_block_boundaries_reads_back(make: Make) {
    let mut t = make();
    let mut model = Model::fresh(&mut *t);
    let size = t.disk().size();
    let block = t.block_size().unwrap_or(1 << 20).min(size / 4).max(512);
    let d = t.disk();
    // Across one boundary, unaligned on both sides.
    let off = block - 1000;
    write(
        "across one block boundary",
        d,
        &mut model,
        off,
        &pattern(8, off, 2000),
    );
    // Across two boundaries (covers a whole block), sector aligned.
    let off = 2 * block - 4096;
    let len = (block + 8192).min(size - off);
    write(
        "across two block boundaries",
        d,
        &mut model,
        off,
        &pattern(9, off, len as usize),
    );
    expect_range("spanning writes", d, &model, block - 4096, 8192);
    expect_all("spanning writes", d, &model);
    t.reopen();
    expect_all("spanning writes after reopen", t.disk(), &model);
    t.finish();
}

/// The very last byte (and the last partial sector, if any) can be written and read.
pub fn write_at_last_byte_reads_back(make: Make) {
    let mut t = make();
    let mut model = Model::fresh(&mut *t);
    let size = t.disk().size();
    let d = t.disk();
    write("last byte", d, &mut model, size - 1, &[0x5A]);
    write(
        "last 3000 bytes",
        d,
        &mut model,
        size - 3001,
        &pattern(10, size - 3001, 3000),
    );
    let tail = size.min(8192);
    expect_range("disk tail", d, &model, size - tail, tail);
    let mut one = [0u8; 1];
    d.read_at(&mut one, size - 1).expect("read last byte");
    assert_eq!(one[0], 0x5A, "last byte");
    t.reopen();
    expect_range(
        "disk tail after reopen",
        t.disk(),
        &model,
        size - tail,
        tail,
    );
    t.finish();
}

/// Reads reaching past the end fail; empty reads at the end succeed.
pub fn read_past_end_fails(make: Make) {
    let mut t = make();
    let size = t.disk().size();
    let d = t.disk();
    let mut two = [0u8; 2];
    assert!(
        d.read_at(&mut two, size - 1).is_err(),
        "read across the end"
    );
    assert!(d.read_at(&mut two[..1], size).is_err(), "read at the end");
    assert!(
        d.read_at(&mut two, u64::MAX - 1).is_err(),
        "read near u64::MAX"
    );
    assert!(d.read_at(&mut [], size).is_ok(), "empty read at the end");
    assert!(d.map(size - 1, 2).is_err(), "map across the end");
    t.finish();
}

/// Writes reaching past the end fail and leave the disk unchanged.
pub fn write_past_end_fails_and_changes_nothing(make: Make) {
    let mut t = make();
    let model = Model::fresh(&mut *t);
    let size = t.disk().size();
    let d = t.disk();
    assert!(
        d.write_at(&[1, 2], size - 1).is_err(),
        "write across the end"
    );
    assert!(d.write_at(&[1], size).is_err(), "write at the end");
    assert!(d.write_at(&[1], u64::MAX).is_err(), "write at u64::MAX");
    assert!(
        d.discard(size - 512, 1024).is_err(),
        "discard across the end"
    );
    let tail = size.min(8192);
    expect_range("after failed writes", d, &model, size - tail, tail);
    assert_eq!(d.size(), size, "size changed");
    t.finish();
}

/// Flush succeeds (repeatedly, also with nothing to flush) and data stays readable.
pub fn flush_keeps_data(make: Make) {
    let mut t = make();
    let mut model = Model::fresh(&mut *t);
    let d = t.disk();
    d.flush().expect("flush of a fresh disk");
    write(
        "before flush",
        d,
        &mut model,
        12288,
        &pattern(11, 12288, 5000),
    );
    d.flush().expect("flush");
    d.flush().expect("second flush");
    expect_range("after flush", d, &model, 8192, 16384);
    t.finish();
}

/// After discard the range reads as zeros and the bytes around it are unchanged.
pub fn discard_reads_as_zeros(make: Make) {
    let mut t = make();
    let mut model = Model::fresh(&mut *t);
    let size = t.disk().size();
    let block = t.block_size().unwrap_or(1 << 20).min(size / 4).max(512);
    let d = t.disk();
    let len = (3 * block).min(size);
    write("fill", d, &mut model, 0, &pattern(12, 0, len as usize));
    // A whole block, plus unaligned edges around it.
    let (o, l) = (block - 700, block + 1400);
    d.discard(o, l).expect("discard");
    model.zero(o, l);
    // A few bytes inside a sector.
    d.discard(100, 10).expect("small discard");
    model.zero(100, 10);
    // Discarding never-written space is fine too.
    d.discard(size - 4096, 4096).expect("discard tail");
    model.zero(size - 4096, 4096);
    d.discard(0, 0).expect("empty discard");
    expect_all("after discard", d, &model);
    t.reopen();
    expect_all("after discard and reopen", t.disk(), &model);
    t.finish();
}

/// Flushed writes survive closing and reopening the disk.
pub fn reopen_keeps_writes(make: Make) {
    let mut t = make();
    let mut model = Model::fresh(&mut *t);
    let size = t.disk().size();
    let d = t.disk();
    write("first", d, &mut model, 0, &pattern(13, 0, 10_000));
    write(
        "middle",
        d,
        &mut model,
        size / 3,
        &pattern(14, size / 3, 123_457),
    );
    d.flush().expect("flush");
    t.reopen();
    expect_all("after reopen", t.disk(), &model);
    write(
        "after reopen",
        t.disk(),
        &mut model,
        5000,
        &pattern(15, 5000, 20_000),
    );
    t.reopen();
    expect_all("after second reopen", t.disk(), &model);
    t.finish();
}

/// `map` tiles the disk exactly, says data where data was written, and zero runs read as zeros.
pub fn map_covers_disk_and_reports_written_data(make: Make) {
    let mut t = make();
    let mut model = Model::fresh(&mut *t);
    let size = t.disk().size();
    let d = t.disk();
    let written = [(8192u64, 4096u64), (size / 2 + 512, 3000)];
    for (i, &(o, l)) in written.iter().enumerate() {
        write(
            "for map",
            d,
            &mut model,
            o,
            &pattern(16 + i as u8, o, l as usize),
        );
    }
    let map = d.map(0, size).expect("map");
    check_tiling(&map, 0, size);
    for &(o, l) in &written {
        for e in map.iter().filter(|e| e.offset < o + l && e.end() > o) {
            assert!(
                e.data && e.depth == 0,
                "written range {o}+{l} maps to {e:?}"
            );
            assert!(e.file_offset.is_some(), "data extent without offset: {e:?}");
        }
    }
    for e in map.iter().filter(|e| e.zero && !e.data) {
        let n = e.length.min(65536);
        let mut buf = vec![0u8; n as usize];
        d.read_at(&mut buf, e.offset).expect("read zero extent");
        assert!(
            buf.iter().all(|&b| b == 0),
            "zero extent {e:?} reads non-zero"
        );
    }
    // A sub-range map is a clipped view of the whole-disk map.
    let sub = d.map(8000, 5000).expect("sub-range map");
    check_tiling(&sub, 8000, 5000);
    expect_all("after map", d, &model);
    t.finish();
}

/// A read-only handle reads the data and refuses writes and discards without changing anything.
pub fn read_only_open_refuses_writes(make: Make) {
    let mut t = make();
    let mut model = Model::fresh(&mut *t);
    let d = t.disk();
    write(
        "before read-only open",
        d,
        &mut model,
        4096,
        &pattern(20, 4096, 4096),
    );
    d.flush().expect("flush");
    let Some(mut ro) = t.open_read_only() else {
        t.finish();
        return;
    };
    assert!(ro.is_read_only(), "read-only handle says writable");
    assert!(ro.write_at(&[1], 0).is_err(), "write on read-only handle");
    assert!(ro.discard(0, 512).is_err(), "discard on read-only handle");
    ro.flush().expect("flush of a read-only handle is a no-op");
    expect_range("read-only handle", &mut *ro, &model, 0, 16384);
    drop(ro);
    expect_all("after read-only handle", t.disk(), &model);
    t.finish();
}

/// Panics unless `map` is non-empty runs, in order, covering `[offset, offset + len)` exactly.
fn check_tiling(map: &[MapExtent], offset: u64, len: u64) {
    let mut pos = offset;
    for e in map {
        assert_eq!(e.offset, pos, "map has a gap or overlap at {pos}: {map:?}");
        assert!(e.length > 0, "empty map extent {e:?}");
        pos = e.end();
    }
    assert_eq!(pos, offset + len, "map ends early: {map:?}");
    for w in map.windows(2) {
        assert!(
            !w[0].continues_with(&w[1]),
            "unmerged map extents {:?} {:?}",
            w[0],
            w[1]
        );
    }
}
