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
    let mut child = VhdxImage::open_file(cf.clone(), Path::new(CP), OpenMode::ReadWrite).unwrap();
    let mut parent = VhdxImage::open_file(pf.clone(), Path::new(PP), OpenMode::ReadWrite).unwrap();
    let (c0, p0) = (cf.op_count(), pf.op_count());
    let r = merge_into(&mut child, &mut parent, &mut |_| {}).unwrap();
    assert!(
        r.bytes_zeroed >= 1 << 20 && r.bytes_copied > 1 << 20,
        "{r:?}"
    );
    assert!(flat(&mut parent) == expected);
    std::mem::forget((child, parent)); // power cut right after
    let (c1, p1) = (cf.op_count(), pf.op_count());
    assert!(c1 > c0 && p1 > p0);
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
    // The child's locator update comes first; the parent is untouched meanwhile.
    for cut in c0..=c1 {
        for (name, s) in survivors {
            let what = format!("cut after child op {cut} of {c0}..{c1}, survivors {name}");
            verify(
                cf.crash_after_op(cut, s),
                pf.crash_after_op(p0, Survivors::All),
                &expected,
                cut % 2 == 0,
                &what,
            );
        }
    }
    for cut in p0..=p1 {
        for (name, s) in survivors {
            let what = format!("cut after parent op {cut} of {p0}..{p1}, survivors {name}");
            verify(
                cf.crash_after_op(c1, Survivors::All),
                pf.crash_after_op(cut, s),
                &expected,
                cut % 3 == 0,
                &what,
            );
        }
    }
}
