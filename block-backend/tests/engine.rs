//! Both engines on every layer kind: random batches of non-overlapping reads and writes
//! (aligned and not, spanning blocks), flushes and discards, submitted many at a time, must
//! leave the io_uring engine's disk identical to the sync engine's and to a `Vec<u8>` model,
//! and every read must return what the model holds.

use std::path::{Path, PathBuf};

use block_backend::engine::{new_engine, Engine, EngineKind, IoCompletion, IoKind, IoRequest};
use block_backend::{open, AlignedBuf, Disk, OpenOptions};
use proptest::prelude::*;

const SIZE: u64 = 8 << 20;

#[derive(Debug, Clone, Copy)]
enum Kind {
    Raw,
    VhdDynamic,
    VhdDifferencing,
    VhdxDynamic,
    Vhdx4k,
    VhdxDifferencing,
}

fn make(kind: Kind, dir: &Path) -> PathBuf {
    let vhd = |p: &Path, parent: Option<PathBuf>| {
        let o = vhd::CreateOptions {
            size: SIZE,
            block_size: 1 << 20,
            parent,
            ..Default::default()
        };
        vhd::VhdImage::create(p, &o).unwrap();
    };
    let vhdx = |p: &Path, lss: u32, parent: Option<PathBuf>| {
        let o = vhdx::CreateOptions {
            size: SIZE,
            block_size: Some(1 << 20),
            logical_sector_size: lss,
            parent,
            ..Default::default()
        };
        vhdx::VhdxImage::create(p, &o).unwrap().close().unwrap();
    };
    let fill_parent = |p: &Path| {
        let mut d = open(p, OpenOptions::read_write()).unwrap();
        d.write_at(&vec![0x5A; 3 << 20], 1 << 20).unwrap();
        d.flush().unwrap();
    };
    let path = dir.join("disk");
    match kind {
        Kind::Raw => std::fs::File::create(&path).unwrap().set_len(SIZE).unwrap(),
        Kind::VhdDynamic => vhd(&path, None),
        Kind::VhdxDynamic => vhdx(&path, 512, None),
        Kind::Vhdx4k => vhdx(&path, 4096, None),
        Kind::VhdDifferencing => {
            let parent = dir.join("parent.vhd");
            vhd(&parent, None);
            fill_parent(&parent);
            vhd(&path, Some(parent));
        }
        Kind::VhdxDifferencing => {
            let parent = dir.join("parent.vhdx");
            vhdx(&parent, 512, None);
            fill_parent(&parent);
            vhdx(&path, 512, Some(parent));
        }
    }
    path
}

#[derive(Debug, Clone)]
enum Op {
    Write { offset: u64, len: usize, seed: u8 },
    Read { offset: u64, len: usize },
}

impl Op {
    fn range(&self) -> (u64, u64) {
        match *self {
            Op::Write { offset, len, .. } | Op::Read { offset, len } => {
                (offset, offset + len as u64)
            }
        }
    }
}

/// Batches of mutually non-overlapping operations, then an optional flush or discard.
fn batches() -> impl Strategy<Value = Vec<(Vec<Op>, u8)>> {
    let aligned = prop::bool::weighted(0.7);
    let op = (
        0..SIZE,
        1usize..(600 << 10),
        any::<u8>(),
        any::<bool>(),
        aligned,
    )
        .prop_map(|(o, l, seed, write, aligned)| {
            let (o, l) = if aligned {
                (o / 4096 * 4096, (l / 4096).max(1) * 4096)
            } else {
                (o, l)
            };
            let l = l.min((SIZE - o) as usize).max(1);
            if write {
                Op::Write {
                    offset: o,
                    len: l,
                    seed,
                }
            } else {
                Op::Read { offset: o, len: l }
            }
        });
    prop::collection::vec((prop::collection::vec(op, 1..12), 0u8..4), 1..6).prop_map(|bs| {
        bs.into_iter()
            .map(|(ops, after)| {
                let mut kept: Vec<Op> = Vec::new();
                for o in ops {
                    let (s, e) = o.range();
                    if kept.iter().all(|k| {
                        let (ks, ke) = k.range();
                        e <= ks || ke <= s
                    }) {
                        kept.push(o);
                    }
                }
                (kept, after)
            })
            .collect()
    })
}

fn data(seed: u8, offset: u64, len: usize) -> Vec<u8> {
    (0..len as u64)
        .map(|i| ((offset + i) as u8).wrapping_mul(31).wrapping_add(seed))
        .collect()
}

/// Runs the batches on `engine`, checking reads against `model`.
fn drive(
    engine: &mut dyn Engine,
    model: &mut [u8],
    batches: &[(Vec<Op>, u8)],
) -> Result<(), TestCaseError> {
    let mut done: Vec<IoCompletion> = Vec::new();
    for (ops, after) in batches {
        for (i, op) in ops.iter().enumerate() {
            let (offset, len) = match *op {
                Op::Write { offset, len, .. } | Op::Read { offset, len } => (offset, len),
            };
            let mut b = AlignedBuf::new(len);
            let req = if let Op::Write { seed, .. } = *op {
                b.copy_from_slice(&data(seed, offset, len));
                IoRequest::write(i as u64, offset, b)
            } else {
                IoRequest::read(i as u64, offset, b)
            };
            engine.submit(req).unwrap();
        }
        engine.kick().unwrap();
        while engine.in_flight() > 0 {
            engine.reap(1, &mut done).unwrap();
        }
        // Each request's buffer comes back in its completion.
        let mut bufs: Vec<Option<AlignedBuf>> = vec![None; ops.len()];
        for c in done.drain(..) {
            c.result
                .unwrap_or_else(|e| panic!("request {} failed: {e}", c.tag));
            bufs[c.tag as usize] = c.buf.into_aligned();
        }
        for (op, b) in ops.iter().zip(&bufs) {
            let b = b
                .as_deref()
                .expect("every request completed with its buffer");
            match *op {
                Op::Write { offset, len, seed } => model[offset as usize..offset as usize + len]
                    .copy_from_slice(&data(seed, offset, len)),
                Op::Read { offset, len } => prop_assert!(
                    b == &model[offset as usize..offset as usize + len],
                    "read {}+{} differs from the model",
                    offset,
                    len
                ),
            }
        }
        let special = match after {
            1 => Some(IoRequest::flush(99)),
            2 => Some(IoRequest::discard(99, 2 << 20, 1 << 20)),
            3 => Some(IoRequest::write_zeroes(99, 4096 * 3, 70000)),
            _ => None,
        };
        if let Some(req) = special {
            let (kind, offset, len) = (req.kind(), req.offset(), req.len() as usize);
            engine.submit(req).unwrap();
            while engine.in_flight() > 0 {
                engine.reap(1, &mut done).unwrap();
            }
            for c in done.drain(..) {
                c.result.unwrap();
            }
            if kind != IoKind::Flush {
                model[offset as usize..offset as usize + len].fill(0);
            }
        }
    }
    Ok(())
}

fn run(kind: Kind, batches: &[(Vec<Op>, u8)]) -> Result<(), TestCaseError> {
    let mut results = Vec::new();
    for engine_kind in [EngineKind::Sync, EngineKind::IoUring] {
        let dir = tempfile::tempdir().unwrap();
        let path = make(kind, dir.path());
        let chain = open(&path, OpenOptions::read_write()).unwrap();
        let mut model = vec![0u8; SIZE as usize];
        chain_initial(&path, &mut model);
        let mut engine = new_engine(engine_kind, chain, 32).unwrap();
        drive(engine.as_mut(), &mut model, batches)?;
        engine.chain().flush().unwrap();
        drop(engine);
        let mut disk = open(&path, OpenOptions::read_only()).unwrap();
        let mut all = vec![0u8; SIZE as usize];
        disk.read_at(&mut all, 0).unwrap();
        prop_assert!(
            all == model,
            "{:?} on {:?}: disk differs from the model",
            engine_kind,
            kind
        );
        results.push(all);
    }
    prop_assert!(results[0] == results[1]);
    Ok(())
}

/// The initial content (a differencing child shows its parent), read beside the writable open
/// (which holds the image's lock: this view shares it).
fn chain_initial(path: &Path, model: &mut [u8]) {
    let mut d = open(path, OpenOptions::read_only_force_share()).unwrap();
    d.read_at(model, 0).unwrap();
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 16, ..ProptestConfig::default() })]

    #[test]
    fn io_uring_matches_sync_on_raw(b in batches()) { run(Kind::Raw, &b)?; }

    #[test]
    fn io_uring_matches_sync_on_dynamic_vhd(b in batches()) { run(Kind::VhdDynamic, &b)?; }

    #[test]
    fn io_uring_matches_sync_on_differencing_vhd(b in batches()) { run(Kind::VhdDifferencing, &b)?; }

    #[test]
    fn io_uring_matches_sync_on_dynamic_vhdx(b in batches()) { run(Kind::VhdxDynamic, &b)?; }

    #[test]
    fn io_uring_matches_sync_on_4k_vhdx(b in batches()) { run(Kind::Vhdx4k, &b)?; }

    #[test]
    fn io_uring_matches_sync_on_differencing_vhdx(b in batches()) { run(Kind::VhdxDifferencing, &b)?; }
}

#[test]
fn io_uring_engine_reports_its_mode() {
    let dir = tempfile::tempdir().unwrap();
    let path = make(Kind::VhdxDynamic, dir.path());
    let e = new_engine(
        EngineKind::IoUring,
        open(&path, OpenOptions::read_write()).unwrap(),
        8,
    )
    .unwrap();
    assert!(e.name().starts_with("io_uring"), "{}", e.name());
}

/// Reads at adjacent offsets handed over together (a sequential reader, a guest's queue) go
/// to the kernel merged where they can; each must still get exactly its own bytes, on every
/// layer kind, with sizes aligned and not and runs longer than one merge may hold.
#[test]
fn adjacent_reads_in_one_batch_each_get_their_own_bytes() {
    let sizes = [
        4096usize, 8192, 1536, 65536, 100, 4096, 12288, 131072, 512, 7000,
    ];
    let writes: Vec<Op> = (0..SIZE)
        .step_by(256 << 10)
        .enumerate()
        .map(|(i, offset)| Op::Write {
            offset,
            len: 256 << 10,
            seed: i as u8,
        })
        .collect();
    let mut reads = Vec::new();
    let mut offset = 5 * 4096;
    for len in sizes.iter().cycle() {
        if offset >= SIZE {
            break;
        }
        let len = (*len).min((SIZE - offset) as usize);
        reads.push(Op::Read { offset, len });
        offset += len as u64;
    }
    let batches = [(reads.clone(), 0), (writes, 0), (reads, 1)];
    for kind in [
        Kind::Raw,
        Kind::VhdDynamic,
        Kind::VhdDifferencing,
        Kind::VhdxDynamic,
        Kind::Vhdx4k,
        Kind::VhdxDifferencing,
    ] {
        run(kind, &batches).unwrap_or_else(|e| panic!("{kind:?}: {e}"));
    }
}
