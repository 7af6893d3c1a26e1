//! `diff_pair`: a differencing child and its parent, opened as a chain by the block backend.

use crate::bounded::BoundedFile;
use crate::input::Input;
use crate::sparse;
use crate::vhd_open::sample_ranges;
use block_backend::{Disk, Format, OpenOptions};
use image_io::format::{FormatImage, ReadSource};
use image_io::OpenMode;
use std::path::{Path, PathBuf};
use std::sync::OnceLock;

/// This process's scratch directory (in `/dev/shm` when there is one: every input is written).
fn scratch_dir() -> &'static PathBuf {
    static DIR: OnceLock<PathBuf> = OnceLock::new();
    DIR.get_or_init(|| crate::make_scratch_dir("diff"))
}

pub(crate) fn cleanup() {
    if let Some(dir) = SCRATCH_USED.get() {
        let _ = std::fs::remove_dir_all(dir);
    }
}

static SCRATCH_USED: OnceLock<PathBuf> = OnceLock::new();

/// One layer opened in memory through the format crates (behind the shared interface).
enum Mem {
    Raw(Vec<u8>),
    Image(Box<dyn FormatImage<BoundedFile>>),
}

impl Mem {
    fn open(format: Format, bytes: &[u8], path: &Path) -> Mem {
        let file = BoundedFile::read_only(bytes.to_vec());
        let opened: Result<Box<dyn FormatImage<BoundedFile>>, String> = match format {
            Format::Raw => return Mem::Raw(bytes.to_vec()),
            Format::Vhd => vhd::VhdImage::open_file(file, path, OpenMode::ReadOnly)
                .map(|i| Box::new(i) as _)
                .map_err(|e| e.to_string()),
            Format::Vhdx => vhdx::VhdxImage::open_file(file, path, OpenMode::ReadOnly)
                .map(|i| Box::new(i) as _)
                .map_err(|e| e.to_string()),
        };
        match opened {
            Ok(img) => Mem::Image(img),
            Err(e) => panic!(
                "the chain opened {} but its format crate does not: {e}",
                path.display()
            ),
        }
    }

    fn size(&self) -> u64 {
        match self {
            Mem::Raw(b) => b.len() as u64,
            Mem::Image(i) => i.virtual_size(),
        }
    }

    /// (offset, len, Some(data) | None for "zeros" | parent) pieces of a range.
    fn read(&mut self, offset: u64, len: u64) -> Vec<(u64, u64, Piece)> {
        match self {
            Mem::Raw(b) => vec![(
                offset,
                len,
                Piece::Data(b[offset as usize..(offset + len) as usize].to_vec()),
            )],
            Mem::Image(img) => {
                let extents = img
                    .resolve_read(offset, len)
                    .expect("resolve in a chain that opened");
                extents
                    .into_iter()
                    .map(|e| {
                        let piece = match e.source {
                            ReadSource::Data { file_offset } => {
                                let mut buf = vec![0u8; e.len as usize];
                                img.read_payload(&mut buf, file_offset).expect("read data");
                                Piece::Data(buf)
                            }
                            ReadSource::Zero => Piece::Zero,
                            ReadSource::Parent => Piece::Parent,
                        };
                        (e.offset, e.len, piece)
                    })
                    .collect()
            }
        }
    }
}

enum Piece {
    Data(Vec<u8>),
    Zero,
    Parent,
}

/// The bytes of `[offset, offset+len)` of the stack `layers` (top first), composed by hand: the
/// top layer that has a range supplies it; past the bottom, or past a smaller parent, zeros.
fn compose(layers: &mut [Mem], offset: u64, len: u64) -> Vec<u8> {
    let mut out = vec![0u8; len as usize];
    let Some((top, below)) = layers.split_first_mut() else {
        return out;
    };
    for (at, n, piece) in top.read(offset, len) {
        let dst = (at - offset) as usize..(at - offset + n) as usize;
        match piece {
            Piece::Data(d) => out[dst].copy_from_slice(&d),
            Piece::Zero => {}
            Piece::Parent => {
                let Some(parent_size) = below.first().map(Mem::size) else {
                    continue;
                };
                let inside = parent_size.saturating_sub(at).min(n);
                if inside > 0 {
                    let d = compose(below, at, inside);
                    out[dst.start..dst.start + inside as usize].copy_from_slice(&d);
                }
            }
        }
    }
    out
}

/// Input: a byte (bit 0: VHD or VHDX names), the child's length (u32 LE), the child, the
/// parent; each file raw or [`crate::sparse`]-encoded. Both are written as `child.<ext>` and
/// `parent.<ext>` and the child is opened read-only through `block_backend::open`, which
/// follows its parent locators.
///
/// Oracles: the chain's reads of sample ranges equal the layers composed by hand from the
/// format crates; any layer the chain opens also opens in memory; the files are unchanged.
pub fn diff_pair(data: &[u8]) {
    let mut input = Input::new(data);
    let ext = if input.u8().is_multiple_of(2) {
        "vhd"
    } else {
        "vhdx"
    };
    let child_len = input.u32() as usize;
    let child = sparse::decode(input.bytes(child_len));
    let parent = sparse::decode(input.rest());
    let dir = scratch_dir();
    let _ = SCRATCH_USED.set(dir.clone());
    let (child_path, parent_path) = (
        dir.join(format!("child.{ext}")),
        dir.join(format!("parent.{ext}")),
    );
    for stale in ["child.vhd", "parent.vhd", "child.vhdx", "parent.vhdx"] {
        let _ = std::fs::remove_file(dir.join(stale));
    }
    std::fs::write(&child_path, &child).expect("write the child");
    std::fs::write(&parent_path, &parent).expect("write the parent");

    // What `vhdtool check` runs on the child.
    match block_backend::probe::probe_path(&child_path) {
        Ok(Format::Vhd) => drop(vhd::check(&child_path)),
        Ok(Format::Vhdx) => drop(vhdx::check(&child_path)),
        _ => {}
    }
    if let Ok(mut chain) = block_backend::open(&child_path, OpenOptions::read_only()) {
        let canon = |p: &Path| std::fs::canonicalize(p).unwrap_or_else(|_| p.to_path_buf());
        let paths: Vec<PathBuf> = chain.backing_chain().iter().map(|p| canon(p)).collect();
        let expected_paths = [canon(&child_path), canon(&parent_path)];
        if paths.len() <= 2 && paths.iter().zip(&expected_paths).all(|(a, b)| a == b) {
            let mut layers: Vec<Mem> = chain
                .stack()
                .iter()
                .zip([&child, &parent])
                .map(|(layer, bytes)| Mem::open(layer.format(), bytes, layer.path()))
                .collect();
            let size = chain.size();
            assert_eq!(size, layers[0].size(), "chain and top layer sizes differ");
            for (offset, len) in sample_ranges(size) {
                let mut got = vec![0u8; len as usize];
                chain
                    .read_at(&mut got, offset)
                    .unwrap_or_else(|e| panic!("chain read {offset}+{len} failed: {e}"));
                let want = compose(&mut layers, offset, len);
                assert!(
                    got == want,
                    "chain read of {offset}+{len} differs from the layers composed by hand"
                );
            }
        }
    }
    assert!(
        std::fs::read(&child_path).is_ok_and(|b| b == child),
        "the child changed"
    );
    assert!(
        std::fs::read(&parent_path).is_ok_and(|b| b == parent),
        "the parent changed"
    );
}
