//! The Disk conformance suite run on every layer kind: raw, VHD fixed, VHD dynamic (2 MiB and
//! 512 KiB blocks), VHDX fixed, dynamic (512- and 4096-byte sectors), and VHD and VHDX
//! differencing children over a dynamic parent holding data (whose file must stay
//! byte-identical).

use std::path::{Path, PathBuf};

use block_backend::conformance::{pattern_byte, TestDisk};
use block_backend::{open, Chain, Disk, OpenOptions};
use tempfile::TempDir;

/// Size of every test disk: 8 MiB.
const SIZE: u64 = 8 << 20;

/// A disk in its own temporary directory, reopened from `path`.
struct Fixture {
    _dir: TempDir,
    path: PathBuf,
    disk: Option<Chain>,
    block_size: Option<u64>,
    /// Differencing fixtures: the parent file and its bytes before the test.
    parent: Option<(PathBuf, Vec<u8>)>,
}

impl Fixture {
    fn boxed(dir: TempDir, path: PathBuf, block_size: Option<u64>) -> Box<dyn TestDisk> {
        let disk = open(&path, OpenOptions::read_write()).expect("open test disk");
        Box::new(Fixture {
            _dir: dir,
            path,
            disk: Some(disk),
            block_size,
            parent: None,
        })
    }
}

impl TestDisk for Fixture {
    fn disk(&mut self) -> &mut dyn Disk {
        self.disk.as_mut().expect("disk is open")
    }

    fn reopen(&mut self) {
        if let Some(mut d) = self.disk.take() {
            d.flush().expect("flush before reopen");
        }
        self.disk = Some(open(&self.path, OpenOptions::read_write()).expect("reopen"));
    }

    fn initial_byte(&self, offset: u64) -> u8 {
        if self.parent.is_some() {
            parent_byte(offset)
        } else {
            0
        }
    }

    fn block_size(&self) -> Option<u64> {
        self.block_size
    }

    fn open_read_only(&mut self) -> Option<Box<dyn Disk>> {
        Some(Box::new(
            open(&self.path, OpenOptions::read_only_force_share()).expect("read-only open"),
        ))
    }

    fn finish(&mut self) {
        if let Some((path, before)) = &self.parent {
            let after = std::fs::read(path).expect("read parent file");
            assert!(
                after == *before,
                "the parent file {} changed",
                path.display()
            );
        }
    }
}

fn make_raw() -> Box<dyn TestDisk> {
    let dir = tempfile::tempdir().expect("tempdir");
    let path = dir.path().join("disk.img");
    // Not a whole number of sectors: the last partial sector must work too.
    let f = std::fs::File::create(&path).expect("create raw file");
    f.set_len(SIZE + 100).expect("size raw file");
    Fixture::boxed(dir, path, None)
}

fn create_vhd(path: &Path, vhd_type: vhd::VhdType, block_size: u32) {
    let opts = vhd::CreateOptions {
        size: SIZE,
        vhd_type,
        block_size,
        sparse: true,
        parent: None,
    };
    vhd::VhdImage::create(path, &opts).expect("create VHD");
}

fn make_fixed() -> Box<dyn TestDisk> {
    let dir = tempfile::tempdir().expect("tempdir");
    let path = dir.path().join("fixed.vhd");
    create_vhd(&path, vhd::VhdType::Fixed, 2 << 20);
    Fixture::boxed(dir, path, None)
}

fn make_dynamic() -> Box<dyn TestDisk> {
    let dir = tempfile::tempdir().expect("tempdir");
    let path = dir.path().join("dynamic.vhd");
    create_vhd(&path, vhd::VhdType::Dynamic, 2 << 20);
    Fixture::boxed(dir, path, Some(2 << 20))
}

fn make_dynamic_512k() -> Box<dyn TestDisk> {
    let dir = tempfile::tempdir().expect("tempdir");
    let path = dir.path().join("dynamic-512k.vhd");
    create_vhd(&path, vhd::VhdType::Dynamic, 512 << 10);
    Fixture::boxed(dir, path, Some(512 << 10))
}

/// Ranges of the differencing fixture's parent that hold data (the rest reads as zeros).
const PARENT_DATA: &[(u64, u64)] = &[
    (0, 1 << 20),
    (3 * (1 << 20) + 512, 1 << 20),
    (SIZE - 4096, 4096),
];

fn parent_byte(offset: u64) -> u8 {
    if PARENT_DATA
        .iter()
        .any(|&(o, l)| offset >= o && offset < o + l)
    {
        pattern_byte(0xEE, offset)
    } else {
        0
    }
}

fn create_vhdx(path: &Path, fixed: bool, lss: u32, parent: Option<PathBuf>) {
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
        .expect("create VHDX")
        .close()
        .expect("close VHDX");
}

fn make_vhdx(name: &str, fixed: bool, lss: u32) -> Box<dyn TestDisk> {
    let dir = tempfile::tempdir().expect("tempdir");
    let path = dir.path().join(name);
    create_vhdx(&path, fixed, lss, None);
    Fixture::boxed(dir, path, (!fixed).then_some(1 << 20))
}

fn make_vhdx_fixed() -> Box<dyn TestDisk> {
    make_vhdx("fixed.vhdx", true, 512)
}

fn make_vhdx_dynamic() -> Box<dyn TestDisk> {
    make_vhdx("dynamic.vhdx", false, 512)
}

fn make_vhdx_dynamic_4k() -> Box<dyn TestDisk> {
    make_vhdx("dynamic-4k.vhdx", false, 4096)
}

fn make_differencing() -> Box<dyn TestDisk> {
    make_child(false)
}

fn make_vhdx_differencing() -> Box<dyn TestDisk> {
    make_child(true)
}

/// A differencing child over a dynamic parent filled with [`PARENT_DATA`].
fn make_child(vhdx: bool) -> Box<dyn TestDisk> {
    let dir = tempfile::tempdir().expect("tempdir");
    let ext = if vhdx { "vhdx" } else { "vhd" };
    let parent = dir.path().join(format!("parent.{ext}"));
    if vhdx {
        create_vhdx(&parent, false, 512, None);
    } else {
        create_vhd(&parent, vhd::VhdType::Dynamic, 512 << 10);
    }
    {
        let mut p = open(&parent, OpenOptions::read_write()).expect("open parent");
        for &(o, l) in PARENT_DATA {
            let data: Vec<u8> = (o..o + l).map(parent_byte).collect();
            p.write_at(&data, o).expect("fill parent");
        }
        p.flush().expect("flush parent");
    }
    let child = dir.path().join(format!("child.{ext}"));
    if vhdx {
        create_vhdx(&child, false, 512, Some(parent.clone()));
    } else {
        let opts = vhd::CreateOptions {
            block_size: 512 << 10,
            parent: Some(parent.clone()),
            ..Default::default()
        };
        vhd::VhdImage::create(&child, &opts).expect("create child");
    }
    let before = std::fs::read(&parent).expect("read parent");
    let disk = open(&child, OpenOptions::read_write()).expect("open child");
    assert_eq!(disk.backing_chain(), vec![child.clone(), parent.clone()]);
    Box::new(Fixture {
        _dir: dir,
        path: child,
        disk: Some(disk),
        block_size: Some(if vhdx { 1 << 20 } else { 512 << 10 }),
        parent: Some((parent, before)),
    })
}

mod raw {
    block_backend::disk_conformance_tests!(super::make_raw);
}

mod vhd_fixed {
    block_backend::disk_conformance_tests!(super::make_fixed);
}

mod vhd_dynamic {
    block_backend::disk_conformance_tests!(super::make_dynamic);
}

mod vhd_dynamic_512k_blocks {
    block_backend::disk_conformance_tests!(super::make_dynamic_512k);
}

mod vhd_differencing {
    block_backend::disk_conformance_tests!(super::make_differencing);
}

mod vhdx_fixed {
    block_backend::disk_conformance_tests!(super::make_vhdx_fixed);
}

mod vhdx_dynamic {
    block_backend::disk_conformance_tests!(super::make_vhdx_dynamic);
}

mod vhdx_dynamic_4k_sectors {
    block_backend::disk_conformance_tests!(super::make_vhdx_dynamic_4k);
}

mod vhdx_differencing {
    block_backend::disk_conformance_tests!(super::make_vhdx_differencing);
}
