//! Property test: random write / read / discard / flush / reopen sequences on fixed, dynamic and
//! differencing VHD and VHDX images (512- and 4096-byte sectors) behave exactly like a `Vec<u8>`.

use std::path::{Path, PathBuf};

use block_backend::{open, Chain, Disk, OpenOptions};
use proptest::prelude::*;

const SIZE: u64 = 8 << 20;
const BLOCK: u32 = 512 << 10;

#[derive(Debug, Clone)]
enum Op {
    Write { offset: u64, len: usize, seed: u8 },
    Read { offset: u64, len: usize },
    Discard { offset: u64, len: u64 },
    Flush,
    Reopen,
}

fn op() -> impl Strategy<Value = Op> {
    // Offsets near block and sector boundaries are more interesting than uniform ones.
    let offset = prop_oneof![
        0..SIZE,
        (0..SIZE / u64::from(BLOCK), -600i64..600).prop_map(|(b, d)| {
            (b * u64::from(BLOCK))
                .saturating_add_signed(d)
                .min(SIZE - 1)
        }),
    ];
    prop_oneof![
        4 => (offset.clone(), 1usize..(1 << 20) + 1000, any::<u8>())
            .prop_map(|(offset, len, seed)| Op::Write { offset, len, seed }),
        2 => (offset.clone(), 1usize..(1 << 20)).prop_map(|(offset, len)| Op::Read { offset, len }),
        1 => (offset, 1u64..(1 << 20) + 1000).prop_map(|(offset, len)| Op::Discard { offset, len }),
        1 => Just(Op::Flush),
        1 => Just(Op::Reopen),
    ]
}

/// Period of the generated data: a prime, so misplaced writes show (unless shifted by a
/// multiple of it, which the random offsets make negligible).
const PERIOD: usize = 4099;

/// Bytes for `[offset, offset + len)` written with `seed`: position dependent, built by copying
/// slices of one period so it stays fast in debug builds.
fn data(seed: u8, offset: u64, len: usize) -> Vec<u8> {
    let period = block_backend::conformance::pattern(seed, 0, PERIOD);
    let mut out = Vec::with_capacity(len);
    let mut phase = (offset % PERIOD as u64) as usize;
    while out.len() < len {
        let n = (PERIOD - phase).min(len - out.len());
        out.extend_from_slice(&period[phase..phase + n]);
        phase = 0;
    }
    out
}

#[derive(Debug, Clone, Copy, PartialEq)]
enum Kind {
    Fixed,
    Dynamic,
    Differencing,
}

/// Container format under test.
#[derive(Debug, Clone, Copy, PartialEq)]
enum Fmt {
    Vhd,
    /// VHDX with this logical sector size.
    Vhdx(u32),
}

/// Creates an image of `fmt` at `path` (dynamic unless `fixed`; differencing with a parent).
fn create_image(fmt: Fmt, path: &Path, fixed: bool, parent: Option<PathBuf>) {
    match fmt {
        Fmt::Vhd => {
            let opts = vhd::CreateOptions {
                size: SIZE,
                vhd_type: if fixed {
                    vhd::VhdType::Fixed
                } else {
                    vhd::VhdType::Dynamic
                },
                block_size: BLOCK,
                sparse: true,
                parent,
            };
            vhd::VhdImage::create(path, &opts).expect("create");
        }
        Fmt::Vhdx(lss) => {
            let opts = vhdx::CreateOptions {
                size: SIZE,
                fixed,
                block_size: Some(1 << 20),
                logical_sector_size: lss,
                sparse: true,
                parent,
                ..Default::default()
            };
            vhdx::VhdxImage::create(path, &opts)
                .expect("create")
                .close()
                .expect("close");
        }
    }
}

/// Corruptions the format's checker finds.
fn corruptions(fmt: Fmt, path: &Path) -> Vec<String> {
    match fmt {
        Fmt::Vhd => vhd::check(path)
            .expect("check")
            .corruptions
            .into_iter()
            .map(|f| f.message)
            .collect(),
        Fmt::Vhdx(_) => vhdx::check(path)
            .expect("check")
            .corruptions
            .into_iter()
            .map(|f| f.message)
            .collect(),
    }
}

/// A parent file and its bytes before the test.
type ParentSnapshot = (PathBuf, Vec<u8>);

/// Creates the disk under test in `dir`; returns its path, the initial model, and for
/// differencing disks the parent snapshot.
fn setup(dir: &Path, kind: Kind, fmt: Fmt) -> (PathBuf, Vec<u8>, Option<ParentSnapshot>) {
    let path = dir.join("disk.img");
    match kind {
        Kind::Fixed | Kind::Dynamic => {
            create_image(fmt, &path, kind == Kind::Fixed, None);
            (path, vec![0; SIZE as usize], None)
        }
        Kind::Differencing => {
            let parent = dir.join("parent.img");
            create_image(fmt, &parent, false, None);
            let mut model = vec![0; SIZE as usize];
            {
                let mut p = open(&parent, OpenOptions::read_write()).expect("open parent");
                for (o, l) in [
                    (0u64, 700_000usize),
                    (2_500_000, 1_300_000),
                    (SIZE - 5000, 5000),
                ] {
                    let d = data(0xAA, o, l);
                    p.write_at(&d, o).expect("fill parent");
                    model[o as usize..o as usize + l].copy_from_slice(&d);
                }
                p.flush().expect("flush parent");
            }
            create_image(fmt, &path, false, Some(parent.clone()));
            let bytes = std::fs::read(&parent).expect("read parent");
            (path, model, Some((parent, bytes)))
        }
    }
}

fn run(kind: Kind, fmt: Fmt, ops: &[Op]) -> Result<(), TestCaseError> {
    let dir = tempfile::tempdir().expect("tempdir");
    let (path, mut model, parent) = setup(dir.path(), kind, fmt);
    let reopen = |p: &Path| -> Chain { open(p, OpenOptions::read_write()).expect("open") };
    let mut disk = reopen(&path);
    for op in ops {
        match *op {
            Op::Write { offset, len, seed } => {
                let len = len.min((SIZE - offset) as usize);
                let d = data(seed, offset, len);
                disk.write_at(&d, offset).expect("write");
                model[offset as usize..offset as usize + len].copy_from_slice(&d);
            }
            Op::Read { offset, len } => {
                let len = len.min((SIZE - offset) as usize);
                let mut buf = vec![0; len];
                disk.read_at(&mut buf, offset).expect("read");
                prop_assert!(
                    buf[..] == model[offset as usize..offset as usize + len],
                    "read {}+{} differs from the model",
                    offset,
                    len
                );
            }
            Op::Discard { offset, len } => {
                let len = len.min(SIZE - offset);
                disk.discard(offset, len).expect("discard");
                model[offset as usize..(offset + len) as usize].fill(0);
            }
            Op::Flush => disk.flush().expect("flush"),
            Op::Reopen => {
                disk.flush().expect("flush");
                drop(disk);
                disk = reopen(&path);
            }
        }
    }
    disk.flush().expect("final flush");
    drop(disk);
    let mut disk = reopen(&path);
    let mut all = vec![0; SIZE as usize];
    disk.read_at(&mut all, 0).expect("final read");
    if all != model {
        let i = all
            .iter()
            .zip(&model)
            .position(|(a, b)| a != b)
            .unwrap_or(0);
        return Err(TestCaseError::fail(format!(
            "after reopen byte {i} reads {:#x}, model says {:#x}",
            all[i], model[i]
        )));
    }
    drop(disk);
    let report = corruptions(fmt, &path);
    prop_assert!(report.is_empty(), "image corrupt: {:?}", report);
    if let Some((p, before)) = parent {
        prop_assert!(
            std::fs::read(&p).expect("read parent") == before,
            "parent changed"
        );
    }
    Ok(())
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 64, ..ProptestConfig::default() })]

    #[test]
    fn fixed_vhd_behaves_like_a_byte_array(ops in prop::collection::vec(op(), 1..24)) {
        run(Kind::Fixed, Fmt::Vhd, &ops)?;
    }

    #[test]
    fn dynamic_vhd_behaves_like_a_byte_array(ops in prop::collection::vec(op(), 1..24)) {
        run(Kind::Dynamic, Fmt::Vhd, &ops)?;
    }

    #[test]
    fn differencing_vhd_behaves_like_a_byte_array(ops in prop::collection::vec(op(), 1..24)) {
        run(Kind::Differencing, Fmt::Vhd, &ops)?;
    }

    #[test]
    fn fixed_vhdx_behaves_like_a_byte_array(ops in prop::collection::vec(op(), 1..24)) {
        run(Kind::Fixed, Fmt::Vhdx(512), &ops)?;
    }

    #[test]
    fn dynamic_vhdx_behaves_like_a_byte_array(ops in prop::collection::vec(op(), 1..24)) {
        run(Kind::Dynamic, Fmt::Vhdx(512), &ops)?;
    }

    #[test]
    fn dynamic_4k_sector_vhdx_behaves_like_a_byte_array(ops in prop::collection::vec(op(), 1..24)) {
        run(Kind::Dynamic, Fmt::Vhdx(4096), &ops)?;
    }

    #[test]
    fn differencing_vhdx_behaves_like_a_byte_array(ops in prop::collection::vec(op(), 1..24)) {
        run(Kind::Differencing, Fmt::Vhdx(512), &ops)?;
    }

    #[test]
    fn differencing_4k_sector_vhdx_behaves_like_a_byte_array(ops in prop::collection::vec(op(), 1..24)) {
        run(Kind::Differencing, Fmt::Vhdx(4096), &ops)?;
    }
}
