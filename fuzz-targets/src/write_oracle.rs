//! `write_oracle`: an image created in memory, a fuzzer-chosen sequence of writes, discards,
//! flushes, reopens and reads, checked against a flat model of the disk; then power cuts at
//! fuzzer-chosen points, each checked against what the flushes promised.
//!
//! ```text
//! input: kind | size/block choice | op* | cut*
//!   op:  write (offset, length, big?, aligned?) | flush | discard | reopen | read-compare
//!   cut: operation index, survivor mask, torn write
//! model: Vec<u8> of the virtual disk (zeros, or the parent's bytes for a differencing child)
//! ```

use crate::input::{pattern, Input};
use image_io::{CrashFile, ImageFile, Survivors};
use std::path::Path;

/// Most operations taken from one input.
const MAX_OPS: usize = 32;
/// Most power cuts checked per input.
const MAX_CUTS: usize = 2;

/// Source of a resolved piece, for both formats.
enum Src {
    Data(u64),
    Zero,
    Parent,
}

/// The operations the oracle needs from an open image, over both formats.
trait Img {
    fn resolve_read(&mut self, offset: u64, len: u64) -> Result<Vec<(u64, u64, Src)>, String>;
    fn read_file(&self, buf: &mut [u8], offset: u64) -> Result<(), String>;
    fn write(&mut self, offset: u64, data: &[u8]) -> Result<(), String>;
    fn discard(&mut self, offset: u64, len: u64) -> Result<Vec<(u64, u64)>, String>;
    fn flush(&mut self) -> Result<(), String>;
    /// Corruption findings of the image as open now.
    fn corruptions(&self) -> Vec<String>;
}

impl Img for vhd::VhdImage<CrashFile> {
    fn resolve_read(&mut self, offset: u64, len: u64) -> Result<Vec<(u64, u64, Src)>, String> {
        let v = vhd::VhdImage::resolve_read(self, offset, len).map_err(|e| e.to_string())?;
        Ok(v.into_iter()
            .map(|e| {
                let s = match e.source {
                    vhd::ReadSource::Data { file_offset } => Src::Data(file_offset),
                    vhd::ReadSource::Zero => Src::Zero,
                    vhd::ReadSource::Parent => Src::Parent,
                };
                (e.offset, e.len, s)
            })
            .collect())
    }
    fn read_file(&self, buf: &mut [u8], offset: u64) -> Result<(), String> {
        self.file()
            .read_exact_at(buf, offset)
            .map_err(|e| e.to_string())
    }
    fn write(&mut self, offset: u64, data: &[u8]) -> Result<(), String> {
        let plan = self
            .resolve_write(offset, data.len() as u64)
            .map_err(|e| e.to_string())?;
        for e in &plan.extents {
            let s = (e.offset - offset) as usize;
            self.file()
                .write_all_at(&data[s..s + e.len as usize], e.file_offset)
                .map_err(|e| e.to_string())?;
        }
        self.commit_write(plan).map_err(|e| e.to_string())
    }
    fn discard(&mut self, offset: u64, len: u64) -> Result<Vec<(u64, u64)>, String> {
        vhd::VhdImage::discard(self, offset, len).map_err(|e| e.to_string())
    }
    fn flush(&mut self) -> Result<(), String> {
        vhd::VhdImage::flush(self).map_err(|e| e.to_string())
    }
    fn corruptions(&self) -> Vec<String> {
        match vhd::check_file(self.file(), self.path()) {
            Ok(r) => r.corruptions.into_iter().map(|f| f.message).collect(),
            Err(e) => vec![e.to_string()],
        }
    }
}

impl Img for vhdx::VhdxImage<CrashFile> {
    fn resolve_read(&mut self, offset: u64, len: u64) -> Result<Vec<(u64, u64, Src)>, String> {
        let v = vhdx::VhdxImage::resolve_read(self, offset, len).map_err(|e| e.to_string())?;
        Ok(v.into_iter()
            .map(|e| {
                let s = match e.source {
                    vhdx::ReadSource::Data { file_offset } => Src::Data(file_offset),
                    vhdx::ReadSource::Zero => Src::Zero,
                    vhdx::ReadSource::Parent => Src::Parent,
                };
                (e.offset, e.len, s)
            })
            .collect())
    }
    fn read_file(&self, buf: &mut [u8], offset: u64) -> Result<(), String> {
        self.read_file_at(buf, offset).map_err(|e| e.to_string())
    }
    fn write(&mut self, offset: u64, data: &[u8]) -> Result<(), String> {
        let plan = self
            .resolve_write(offset, data.len() as u64)
            .map_err(|e| e.to_string())?;
        for e in &plan.extents {
            let s = (e.offset - offset) as usize;
            self.file()
                .write_all_at(&data[s..s + e.len as usize], e.file_offset)
                .map_err(|e| e.to_string())?;
        }
        self.commit_write(plan).map_err(|e| e.to_string())
    }
    fn discard(&mut self, offset: u64, len: u64) -> Result<Vec<(u64, u64)>, String> {
        vhdx::VhdxImage::discard(self, offset, len).map_err(|e| e.to_string())
    }
    fn flush(&mut self) -> Result<(), String> {
        vhdx::VhdxImage::flush(self).map_err(|e| e.to_string())
    }
    fn corruptions(&self) -> Vec<String> {
        vhdx::check::check_image(self)
            .corruptions
            .into_iter()
            // A read-only open of a crashed image reports its pending log; the writable open
            // the oracle also makes replays it.
            .filter(|f| f.structure != "log")
            .map(|f| f.message)
            .collect()
    }
}

/// Which image the input works on.
#[derive(Debug, Clone, Copy)]
enum Kind {
    Vhd { fixed: bool, diff: bool, block: u32 },
    Vhdx { fixed: bool, diff: bool, lss: u32 },
}

impl Kind {
    fn from_input(input: &mut Input) -> (Kind, u64) {
        let k = input.u8();
        let trim = input.u8() as u64 % 16;
        let vhd_block = [4096u32, 64 << 10, 512 << 10, 2 << 20][(k as usize >> 4) % 4];
        let kind = match k % 8 {
            0 => Kind::Vhd {
                fixed: false,
                diff: false,
                block: vhd_block,
            },
            1 => Kind::Vhd {
                fixed: true,
                diff: false,
                block: vhd_block,
            },
            2 => Kind::Vhd {
                fixed: false,
                diff: true,
                block: vhd_block,
            },
            3 => Kind::Vhdx {
                fixed: false,
                diff: false,
                lss: 512,
            },
            4 => Kind::Vhdx {
                fixed: false,
                diff: false,
                lss: 4096,
            },
            5 => Kind::Vhdx {
                fixed: false,
                diff: true,
                lss: 512,
            },
            6 => Kind::Vhdx {
                fixed: false,
                diff: true,
                lss: 4096,
            },
            _ => Kind::Vhdx {
                fixed: true,
                diff: false,
                lss: 512,
            },
        };
        // Sizes that end inside a block exercise the short last block.
        let size = match kind {
            Kind::Vhd { .. } => (2 << 20) - trim * 512 * 3,
            Kind::Vhdx { lss, .. } => (3 << 20) - trim * lss as u64 * 5,
        };
        (kind, size)
    }

    fn diff(self) -> bool {
        matches!(
            self,
            Kind::Vhd { diff: true, .. } | Kind::Vhdx { diff: true, .. }
        )
    }

    fn sector(self) -> u64 {
        match self {
            Kind::Vhd { .. } => 512,
            Kind::Vhdx { lss, .. } => lss as u64,
        }
    }

    fn path(self) -> &'static Path {
        match self {
            Kind::Vhd { .. } => Path::new("oracle.vhd"),
            Kind::Vhdx { .. } => Path::new("oracle.vhdx"),
        }
    }

    fn create(self, file: CrashFile, size: u64) -> Box<dyn Img> {
        let path = self.path();
        match self {
            Kind::Vhd { fixed, diff, block } => {
                let opts = vhd::CreateOptions {
                    size,
                    vhd_type: if fixed {
                        vhd::VhdType::Fixed
                    } else {
                        vhd::VhdType::Dynamic
                    },
                    block_size: block,
                    sparse: false,
                    parent: None,
                };
                let parent = diff.then(|| vhd::ParentInfo {
                    absolute: "/nonexistent/parent.vhd".into(),
                    relative: ".\\parent.vhd".into(),
                    size,
                    uuid: uuid::Uuid::from_u128(0x1234),
                    timestamp: 0,
                });
                Box::new(
                    vhd::VhdImage::create_in(file, path, &opts, parent.as_ref())
                        .expect("create a VHD"),
                )
            }
            Kind::Vhdx { fixed, diff, lss } => {
                let opts = vhdx::CreateOptions {
                    size,
                    fixed,
                    block_size: Some(1 << 20),
                    logical_sector_size: lss,
                    physical_sector_size: 4096,
                    sparse: true,
                    parent: None,
                };
                let parent = diff.then(|| vhdx::ParentInfo {
                    absolute: "/nonexistent/parent.vhdx".into(),
                    relative: ".\\parent.vhdx".into(),
                    data_write_guid: uuid::Uuid::from_u128(0x5678),
                    virtual_size: size,
                    logical_sector_size: lss,
                    page83: uuid::Uuid::from_u128(0x9abc),
                });
                Box::new(
                    vhdx::VhdxImage::create_in(file, path, &opts, parent.as_ref())
                        .expect("create a VHDX"),
                )
            }
        }
    }

    fn open(self, file: CrashFile, writable: bool) -> Result<Box<dyn Img>, String> {
        let path = self.path();
        Ok(match self {
            Kind::Vhd { .. } => {
                let mode = if writable {
                    vhd::OpenMode::ReadWrite
                } else {
                    vhd::OpenMode::ReadOnly
                };
                Box::new(vhd::VhdImage::open_file(file, path, mode).map_err(|e| e.to_string())?)
            }
            Kind::Vhdx { .. } => {
                let mode = if writable {
                    vhdx::OpenMode::ReadWrite
                } else {
                    vhdx::OpenMode::ReadOnly
                };
                Box::new(vhdx::VhdxImage::open_file(file, path, mode).map_err(|e| e.to_string())?)
            }
        })
    }
}

/// Reads `[offset, offset+len)` through `img`, with `parent` supplying parent extents.
fn read(img: &mut dyn Img, parent: &[u8], offset: u64, len: u64, what: &str) -> Vec<u8> {
    let mut out = vec![0u8; len as usize];
    let extents = img
        .resolve_read(offset, len)
        .unwrap_or_else(|e| panic!("{what}: resolve {offset}+{len}: {e}"));
    let mut next = offset;
    for (at, n, src) in extents {
        assert_eq!(at, next, "{what}: extents do not tile {offset}+{len}");
        next += n;
        let dst = &mut out[(at - offset) as usize..(at - offset + n) as usize];
        match src {
            Src::Data(file_offset) => img
                .read_file(dst, file_offset)
                .unwrap_or_else(|e| panic!("{what}: read data at {file_offset}: {e}")),
            Src::Zero => {}
            Src::Parent => dst.copy_from_slice(&parent[at as usize..(at + n) as usize]),
        }
    }
    assert_eq!(
        next,
        offset + len,
        "{what}: extents do not cover {offset}+{len}"
    );
    out
}

/// The flat content of a differencing child's parent (made once: every input needs it).
fn parent_bytes() -> &'static [u8] {
    static PARENT: std::sync::OnceLock<Vec<u8>> = std::sync::OnceLock::new();
    PARENT.get_or_init(|| pattern(0xD1FF, 3 << 20))
}

/// A change to the disk: bytes written (zeros for a discard) and the operation index at which
/// it was issued.
struct Event {
    offset: u64,
    data: Vec<u8>,
    issued_at: usize,
}

/// A completed flush: operation indices when it started and ended.
struct Flush {
    start: usize,
    end: usize,
}

/// See the module docs. Oracles: every read equals the model, before and after reopening; a
/// clean reopen finds no corruption; after the final flush a power cut keeps everything; a
/// power cut at any chosen point leaves an image that opens read-only and read-write, shows no
/// corruption (leaks allowed), and holds at every byte either what the last completed flush
/// promised or what a write issued after it put there.
pub fn write_oracle(data: &[u8]) {
    let mut input = Input::new(data);
    let (kind, size) = Kind::from_input(&mut input);
    let sector = kind.sector();
    let parent: Vec<u8> = if kind.diff() {
        parent_bytes()[..size as usize].to_vec()
    } else {
        vec![0; size as usize]
    };
    let file = CrashFile::new();
    let mut img = kind.create(file.clone(), size);
    let created_at = file.op_count();
    let mut model = parent.clone();
    let mut events: Vec<Event> = Vec::new();
    let mut flushes: Vec<Flush> = Vec::new();

    for step in 0..MAX_OPS {
        if input.is_empty() {
            break;
        }
        let op = input.u8();
        let what = format!("{kind:?} size {size}, step {step} (op {op:#04x})");
        match op % 8 {
            0..=3 | 5 => {
                let mut offset = input.u32() as u64 % size;
                let mut len = 1 + input.u16() as u64;
                if op & 0x80 != 0 {
                    len *= 23; // up to ~1.5 MiB: spans blocks
                }
                len = len.min(size - offset);
                // Differencing images take whole sectors (the backend does read-modify-write);
                // discards are sector-aligned everywhere.
                if kind.diff() || op & 0x40 != 0 || op % 8 == 5 {
                    let end = (offset + len).next_multiple_of(sector).min(size);
                    offset = offset / sector * sector;
                    len = end - offset;
                }
                let issued_at = file.op_count();
                if op % 8 == 5 {
                    let rest = img
                        .discard(offset, len)
                        .unwrap_or_else(|e| panic!("{what}: discard {offset}+{len}: {e}"));
                    for (o, l) in rest {
                        assert!(
                            o >= offset && o + l <= offset + len,
                            "{what}: discard returned {o}+{l} outside {offset}+{len}"
                        );
                        img.write(o, &vec![0u8; l as usize])
                            .unwrap_or_else(|e| panic!("{what}: zero {o}+{l}: {e}"));
                    }
                    model[offset as usize..(offset + len) as usize].fill(0);
                    events.push(Event {
                        offset,
                        data: vec![0; len as usize],
                        issued_at,
                    });
                } else {
                    let mut bytes = model[offset as usize..(offset + len) as usize].to_vec();
                    let fresh = pattern(issued_at as u64 ^ (step as u64) << 40, bytes.len());
                    // Keep the model's bytes at the edges when the write was widened.
                    let keep = (input.u8() as usize) % 4;
                    let n = bytes.len();
                    let a = keep.min(n);
                    let b = n.saturating_sub(keep).max(a);
                    bytes[a..b].copy_from_slice(&fresh[a..b]);
                    img.write(offset, &bytes)
                        .unwrap_or_else(|e| panic!("{what}: write {offset}+{len}: {e}"));
                    model[offset as usize..(offset + len) as usize].copy_from_slice(&bytes);
                    events.push(Event {
                        offset,
                        data: bytes,
                        issued_at,
                    });
                }
            }
            4 => {
                let start = file.op_count();
                img.flush().unwrap_or_else(|e| panic!("{what}: flush: {e}"));
                flushes.push(Flush {
                    start,
                    end: file.op_count(),
                });
            }
            6 => {
                let start = file.op_count();
                img.flush()
                    .unwrap_or_else(|e| panic!("{what}: flush before reopen: {e}"));
                drop(img);
                flushes.push(Flush {
                    start,
                    end: file.op_count(),
                });
                img = kind
                    .open(file.clone(), true)
                    .unwrap_or_else(|e| panic!("{what}: reopen: {e}"));
                let c = img.corruptions();
                assert!(
                    c.is_empty(),
                    "{what}: corruption after a clean reopen: {c:?}"
                );
            }
            _ => {
                let offset = input.u32() as u64 % size;
                let len = (1 + input.u16() as u64).min(size - offset);
                let got = read(&mut *img, &parent, offset, len, &what);
                assert!(
                    got == model[offset as usize..(offset + len) as usize],
                    "{what}: read of {offset}+{len} differs from what was written"
                );
            }
        }
    }
    let start = file.op_count();
    img.flush().expect("final flush");
    flushes.push(Flush {
        start,
        end: file.op_count(),
    });
    let got = read(&mut *img, &parent, 0, size, "final read");
    assert!(
        got == model,
        "{kind:?}: the disk differs from what was written"
    );
    // The power goes out now: cuts look only at operations up to here (dropping the image
    // below may still write, as a close would, but after `total`).
    let total = file.op_count();
    drop(img);

    // Cuts: after everything (all flushed: nothing may be lost); just before the last sync of
    // the last flush with every unsynced write kept but the first (metadata on disk, the
    // payload before it not: what a missing barrier would expose); then fuzzer-chosen cuts,
    // the first inside a chosen flush (where ordering matters), the second anywhere.
    let mut cuts = vec![(total, Survivors::None)];
    if let Some(last) = flushes.last().filter(|f| f.end > f.start) {
        cuts.push((
            last.end - 1,
            Survivors::Mask {
                mask: !1,
                torn: None,
            },
        ));
    }
    for round in 0..MAX_CUTS {
        if input.is_empty() {
            break;
        }
        let pick = input.u32() as usize;
        let cut = match flushes.get(pick % flushes.len().max(1)) {
            Some(f) if round == 0 => f.start + (pick >> 8) % (f.end - f.start + 1),
            _ => created_at + pick % (total - created_at + 1),
        };
        let mask = input.u64();
        let torn = input.u8();
        cuts.push((
            cut,
            Survivors::Mask {
                mask,
                torn: (torn & 0x80 != 0).then_some(torn as usize % 64),
            },
        ));
    }
    for (cut, survivors) in cuts {
        check_cut(
            kind, size, &file, cut, survivors, &parent, &events, &flushes,
        );
    }
}

#[allow(clippy::too_many_arguments)]
fn check_cut(
    kind: Kind,
    size: u64,
    file: &CrashFile,
    cut: usize,
    survivors: Survivors,
    parent: &[u8],
    events: &[Event],
    flushes: &[Flush],
) {
    let what = format!("{kind:?} size {size}, power cut after op {cut} ({survivors:?})");
    let state = file.crash_after_op(cut, survivors);
    let mut ro = kind
        .open(state.clone(), false)
        .unwrap_or_else(|e| panic!("{what}: read-only open: {e}"));
    let c = ro.corruptions();
    assert!(c.is_empty(), "{what}: corruption: {c:?}");
    let got = read(&mut *ro, parent, 0, size, &what);
    drop(ro);
    assert_eq!(state.op_count(), 0, "{what}: a read-only open wrote");
    let mut rw = kind
        .open(state.clone(), true)
        .unwrap_or_else(|e| panic!("{what}: read-write open: {e}"));
    let c = rw.corruptions();
    assert!(
        c.is_empty(),
        "{what}: corruption after a writable open: {c:?}"
    );
    let got_rw = read(&mut *rw, parent, 0, size, &what);
    assert!(
        got == got_rw,
        "{what}: read-only and read-write opens read differently"
    );
    drop(rw);

    // What the last flush completed before the cut made durable...
    let durable_before = flushes
        .iter()
        .filter(|f| f.end <= cut)
        .map(|f| f.start)
        .max()
        .unwrap_or(0);
    let mut durable = parent.to_vec();
    for e in events.iter().filter(|e| e.issued_at < durable_before) {
        durable[e.offset as usize..e.offset as usize + e.data.len()].copy_from_slice(&e.data);
    }
    // ...and what writes issued after it may have left.
    let pending: Vec<&Event> = events
        .iter()
        .filter(|e| e.issued_at >= durable_before && e.issued_at < cut)
        .collect();
    // Sector by sector first (a fuzz build instruments every loop iteration), then byte by
    // byte where a sector differs.
    let differing = got
        .chunks(512)
        .zip(durable.chunks(512))
        .enumerate()
        .filter(|(_, (g, d))| g != d)
        .flat_map(|(s, (g, d))| {
            g.iter()
                .zip(d.iter())
                .enumerate()
                .filter(|(_, (g, d))| g != d)
                .map(move |(k, (&g, &d))| (s * 512 + k, g, d))
        });
    for (i, g, d) in differing {
        let i = i as u64;
        let explained = pending.iter().any(|e| {
            i >= e.offset
                && i < e.offset + e.data.len() as u64
                && e.data[(i - e.offset) as usize] == g
        });
        assert!(
            explained,
            "{what}: byte {i} reads {g:#04x}: neither the flushed {d:#04x} nor a later write"
        );
    }
}
