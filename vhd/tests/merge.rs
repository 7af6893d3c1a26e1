//! Merge: the parent ends up reading as the child did; interrupted anywhere (power cut after
//! every operation on the parent, none/all/some unsynced writes kept, one torn), the chain still
//! reads the same, the parent checks without corruption, and running the merge again finishes.

use image_io::{CrashFile, ImageFile, Survivors};
use std::path::Path;
use vhd::merge::merge_into;
use vhd::{check_file, CreateOptions, OpenMode, ParentInfo, ReadSource, VhdImage};
use vhdkit_tests::pattern_at as pattern;

const SIZE: u64 = 4 << 20;
const BLOCK: u32 = 64 << 10;

fn write<F: ImageFile>(img: &mut VhdImage<F>, offset: u64, data: &[u8]) {
    let plan = img.resolve_write(offset, data.len() as u64).unwrap();
    for e in &plan.extents {
        let at = (e.offset - offset) as usize;
        img.file()
            .write_all_at(&data[at..at + e.len as usize], e.file_offset)
            .unwrap();
    }
    img.commit_write(plan).unwrap();
}

/// Reads the whole disk through `top`, asking `below` for parent ranges.
fn view<F: ImageFile>(top: &mut VhdImage<F>, below: &mut dyn FnMut(u64, &mut [u8])) -> Vec<u8> {
    let mut out = vec![0u8; SIZE as usize];
    for e in top.resolve_read(0, SIZE).unwrap() {
        let dst = &mut out[e.offset as usize..(e.offset + e.len) as usize];
        match e.source {
            ReadSource::Data { file_offset } => top.file().read_exact_at(dst, file_offset).unwrap(),
            ReadSource::Zero => dst.fill(0),
            ReadSource::Parent => below(e.offset, dst),
        }
    }
    out
}

fn flat<F: ImageFile>(img: &mut VhdImage<F>) -> Vec<u8> {
    view(img, &mut |_, d| d.fill(0))
}

fn chain<C: ImageFile, P: ImageFile>(child: &mut VhdImage<C>, parent: &mut VhdImage<P>) -> Vec<u8> {
    let p = flat(parent);
    view(child, &mut |o, d| {
        d.copy_from_slice(&p[o as usize..][..d.len()])
    })
}

#[test]
fn merge_lands_the_childs_view_in_the_parent_at_every_power_cut() {
    let (pp, cp) = (Path::new("p.vhd"), Path::new("c.vhd"));
    let opts = CreateOptions {
        size: SIZE,
        block_size: BLOCK,
        ..Default::default()
    };
    let pf = CrashFile::new();
    let mut parent = VhdImage::create_in(pf.clone(), pp, &opts, None).unwrap();
    write(&mut parent, 0, &pattern(1, 1 << 20));
    write(&mut parent, 3 << 20, &pattern(2, 512 << 10));
    parent.flush().unwrap();
    let info = ParentInfo {
        absolute: "/x/p.vhd".into(),
        relative: ".\\p.vhd".into(),
        size: SIZE,
        uuid: parent.uuid(),
        timestamp: 0,
    };
    let cf = CrashFile::new();
    let mut child = VhdImage::create_in(cf.clone(), cp, &opts, Some(&info)).unwrap();
    write(&mut child, 4096, &pattern(3, 8192)); // over parent data
    write(&mut child, (1 << 20) - 512, &pattern(4, 1024)); // across a block edge
    write(&mut child, 2 << 20, &pattern(5, 200 << 10)); // where the parent has nothing
    write(&mut child, (3 << 20) + 512, &vec![0; 4096]); // zeros over parent data
    child.flush().unwrap();
    let expected = chain(&mut child, &mut parent);
    drop(child);
    drop(parent);
    let pf_start = pf.op_count();
    let child_before = cf.contents();
    let mut child = VhdImage::open_file(cf.clone(), cp, OpenMode::ReadOnly).unwrap();
    let mut parent = VhdImage::open_file(pf.clone(), pp, OpenMode::ReadWrite).unwrap();
    let r = merge_into(&mut child, &mut parent, &mut |_| {}).unwrap();
    assert!(r.bytes_copied >= (200 << 10) + 8192, "{r:?}");
    assert!(
        flat(&mut parent) == expected,
        "parent does not read as the child did"
    );
    drop(parent);
    assert_eq!(cf.contents(), child_before, "the child was written");
    let end = pf.op_count();
    for cut in pf_start..=end {
        for (name, s) in Survivors::matrix(0) {
            let what = format!("cut after parent op {cut} of {pf_start}..{end}, survivors {name}");
            let state = pf.crash_after_op(cut, s);
            let rep = check_file(&state, pp).unwrap();
            assert!(rep.corruptions.is_empty(), "{what}: {rep:?}");
            let mut p = VhdImage::open_file(state.clone(), pp, OpenMode::ReadOnly)
                .unwrap_or_else(|e| panic!("{what}: {e}"));
            assert!(
                chain(&mut child, &mut p) == expected,
                "{what}: chain view changed"
            );
            drop(p);
            if cut % 3 == 0 {
                let mut p = VhdImage::open_file(state.clone(), pp, OpenMode::ReadWrite).unwrap();
                merge_into(&mut child, &mut p, &mut |_| {}).unwrap();
                assert!(
                    flat(&mut p) == expected,
                    "{what}: rerun did not finish the merge"
                );
            }
        }
    }
}

#[test]
fn merge_into_a_disk_that_is_not_the_parent_is_refused() {
    let opts = CreateOptions {
        size: SIZE,
        block_size: BLOCK,
        ..Default::default()
    };
    let mut other = VhdImage::create_in(CrashFile::new(), Path::new("o.vhd"), &opts, None).unwrap();
    let info = ParentInfo {
        absolute: "/x/p.vhd".into(),
        relative: ".\\p.vhd".into(),
        size: SIZE,
        uuid: uuid::Uuid::from_u128(77),
        timestamp: 0,
    };
    let mut child =
        VhdImage::create_in(CrashFile::new(), Path::new("c.vhd"), &opts, Some(&info)).unwrap();
    let e = merge_into(&mut child, &mut other, &mut |_| {})
        .unwrap_err()
        .to_string();
    assert!(e.contains("is not the parent"), "{e}");
}
