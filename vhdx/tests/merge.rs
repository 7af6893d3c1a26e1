//! Merge: the parent ends up reading as the child did; a power cut after any operation (in the
//! child's locator update or in the parent; none/all/some unsynced writes kept, one torn)
//! leaves a child that still links to its parent, a chain reading the same, no corruption, and a
//! merge that a rerun completes.

mod common;

use common::{pattern, write};
use image_io::{CrashFile, ImageFile, Survivors};
use std::path::Path;
use vhdx::check::check_image;
use vhdx::merge::merge_into;
use vhdx::{CreateOptions, OpenMode, ParentInfo, ReadSource, VhdxImage};

const SIZE: u64 = 8 << 20;

/// An image file that records, after each of its operations, how many operations each of the
/// two files has done: the global order of a merge's writes across child and parent.
#[derive(Debug, Clone)]
struct Tracked {
    inner: CrashFile,
    files: (CrashFile, CrashFile),
    log: std::sync::Arc<std::sync::Mutex<Vec<(usize, usize)>>>,
}

impl Tracked {
    fn note(&self) {
        let snap = (self.files.0.op_count(), self.files.1.op_count());
        self.log.lock().unwrap().push(snap);
    }
}

impl ImageFile for Tracked {
    fn read_exact_at(&self, buf: &mut [u8], offset: u64) -> std::io::Result<()> {
        self.inner.read_exact_at(buf, offset)
    }
    fn write_all_at(&self, buf: &[u8], offset: u64) -> std::io::Result<()> {
        let r = self.inner.write_all_at(buf, offset);
        self.note();
        r
    }
    fn sync_data(&self) -> std::io::Result<()> {
        let r = self.inner.sync_data();
        self.note();
        r
    }
    fn len(&self) -> std::io::Result<u64> {
        self.inner.len()
    }
    fn set_len(&self, len: u64) -> std::io::Result<()> {
        let r = self.inner.set_len(len);
        self.note();
        r
    }
}
const CP: &str = "c.vhdx";
const PP: &str = "p.vhdx";

fn view<F: ImageFile>(top: &mut VhdxImage<F>, below: &mut dyn FnMut(u64, &mut [u8])) -> Vec<u8> {
    let mut out = vec![0u8; SIZE as usize];
    for e in top.resolve_read(0, SIZE).unwrap() {
        let dst = &mut out[e.offset as usize..(e.offset + e.len) as usize];
        match e.source {
            ReadSource::Data { file_offset } => top.read_file_at(dst, file_offset).unwrap(),
            ReadSource::Zero => dst.fill(0),
            ReadSource::Parent => below(e.offset, dst),
        }
    }
    out
}

fn flat<F: ImageFile>(img: &mut VhdxImage<F>) -> Vec<u8> {
    view(img, &mut |_, d| d.fill(0))
}

fn chain<C: ImageFile, P: ImageFile>(c: &mut VhdxImage<C>, p: &mut VhdxImage<P>) -> Vec<u8> {
    let pv = flat(p);
    view(c, &mut |o, d| {
        d.copy_from_slice(&pv[o as usize..][..d.len()])
    })
}

fn ro(f: &CrashFile, name: &str, what: &str) -> VhdxImage<CrashFile> {
    VhdxImage::open_file(f.clone(), Path::new(name), OpenMode::ReadOnly)
        .unwrap_or_else(|e| panic!("{what}: open {name}: {e}"))
}

/// Checks one crash state of (child, parent).
fn verify(c: CrashFile, p: CrashFile, expected: &[u8], rerun: bool, what: &str) {
    let mut child = ro(&c, CP, what);
    let mut parent = ro(&p, PP, what);
    let link = child.parent().unwrap().clone();
    assert!(
        link.matches(parent.header().data_write_guid),
        "{what}: the child no longer links to its parent"
    );
    assert!(
        chain(&mut child, &mut parent) == expected,
        "{what}: chain view changed"
    );
    drop((child, parent));
    for (f, n) in [(&c, CP), (&p, PP)] {
        let img = VhdxImage::open_file(f.clone(), Path::new(n), OpenMode::ReadWrite).unwrap();
        let r = check_image(&img);
        assert!(r.corruptions.is_empty(), "{what}: {n}: {r:?}");
        img.close().unwrap();
    }
    if rerun {
        let mut child = VhdxImage::open_file(c, Path::new(CP), OpenMode::ReadWrite).unwrap();
        let mut parent = VhdxImage::open_file(p, Path::new(PP), OpenMode::ReadWrite).unwrap();
        merge_into(&mut child, &mut parent, &mut |_| {})
            .unwrap_or_else(|e| panic!("{what}: rerun: {e}"));
        assert!(
            flat(&mut parent) == expected,
            "{what}: rerun did not finish"
        );
    }
}

#[test]
fn merge_lands_the_childs_view_in_the_parent_at_every_power_cut() {
    let opts = CreateOptions {
        size: SIZE,
        block_size: Some(1 << 20),
        ..Default::default()
    };
    let pf = CrashFile::new();
    let mut parent = VhdxImage::create_in(pf.clone(), Path::new(PP), &opts, None).unwrap();
    write(&mut parent, 0, &pattern(1, 3 << 20));
    write(&mut parent, 6 << 20, &pattern(2, 1 << 20));
    parent.close().unwrap();
    let parent = ro(&pf, PP, "setup");
    let info = ParentInfo {
        absolute: "/x/p.vhdx".into(),
        relative: ".\\p.vhdx".into(),
        data_write_guid: parent.header().data_write_guid,
        virtual_size: SIZE,
        logical_sector_size: 512,
        page83: parent.params().page83,
    };
    drop(parent);
    let cf = CrashFile::new();
    let mut child = VhdxImage::create_in(cf.clone(), Path::new(CP), &opts, Some(&info)).unwrap();
    write(&mut child, 4096, &pattern(3, 8192)); // over parent data
    write(&mut child, (1 << 20) - 512, &pattern(4, 1024)); // across a block edge
    write(&mut child, 4 << 20, &pattern(5, 1 << 20)); // a whole block where the parent has none
    child.discard(6 << 20, 1 << 20).unwrap(); // a ZERO block over parent data
    child.close().unwrap();
    let expected = {
        let mut c = ro(&cf, CP, "setup");
        let mut p = ro(&pf, PP, "setup");
        chain(&mut c, &mut p)
    };
    let log = std::sync::Arc::new(std::sync::Mutex::new(Vec::new()));
    let tracked = |inner: &CrashFile| Tracked {
        inner: inner.clone(),
        files: (cf.clone(), pf.clone()),
        log: log.clone(),
    };
    let mut child = VhdxImage::open_file(tracked(&cf), Path::new(CP), OpenMode::ReadWrite).unwrap();
    let mut parent =
        VhdxImage::open_file(tracked(&pf), Path::new(PP), OpenMode::ReadWrite).unwrap();
    log.lock().unwrap().clear();
    let (c0, p0) = (cf.op_count(), pf.op_count());
    let r = merge_into(&mut child, &mut parent, &mut |_| {}).unwrap();
    assert!(
        r.bytes_zeroed >= 1 << 20 && r.bytes_copied > 1 << 20,
        "{r:?}"
    );
    assert!(flat(&mut parent) == expected);
    std::mem::forget((child, parent)); // power cut right after
    let steps: Vec<(usize, usize)> = std::iter::once((c0, p0))
        .chain(log.lock().unwrap().iter().copied())
        .collect();
    assert!(
        steps.len() > 20,
        "workload too small to mean anything: {} steps",
        steps.len()
    );
    let survivors = [
        ("none", Survivors::None),
        ("all", Survivors::All),
        (
            "odd+torn",
            Survivors::Mask {
                mask: 0xAAAA_AAAA_AAAA_AAAA,
                torn: Some(1),
            },
        ),
    ];
    // A power cut hits both files at once: after global step k, each file holds its own
    // operations up to that point (unsynced ones kept or lost per the survivor pattern).
    for (k, &(c, p)) in steps.iter().enumerate() {
        for (name, s) in survivors {
            let what =
                format!("cut after step {k} (child op {c}, parent op {p}), survivors {name}");
            verify(
                cf.crash_after_op(c, s),
                pf.crash_after_op(p, s),
                &expected,
                k % 3 == 0,
                &what,
            );
        }
    }
}
