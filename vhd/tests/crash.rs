//! Crash consistency of VHD writes: run a workload (allocating writes, in-block writes, writes
//! spanning blocks, a discard) on an in-memory crash-test file, cut the power after every
//! operation (none, all or some unsynced writes kept, one torn at a sector), and require that
//! every resulting file opens, shows no corruption (leaked space allowed), and holds every write
//! flushed before the cut; sectors written after the last completed flush hold old or new data.
//! Run for dynamic images and for a differencing child over a parent holding data.

use image_io::{CrashFile, ImageFile, Survivors};
use std::path::Path;
use vhd::{check_file, CreateOptions, OpenMode, ParentInfo, ReadSource, VhdImage, VhdType};
use vhdkit_tests::pattern_at as pattern;

const SIZE: u64 = 16 << 20;
const BLOCK: u32 = 1 << 20;

/// What a round expects a region to hold afterwards (`None`: zeros, i.e. discarded).
struct Round {
    offset: u64,
    data: Option<Vec<u8>>,
    len: usize,
    issued_at_op: usize,
    flushed_at_op: usize,
}

/// Reads through one layer, taking parent ranges from `parent` (a flat image of the parent).
fn read<F: ImageFile>(img: &mut VhdImage<F>, parent: &[u8], offset: u64, len: usize) -> Vec<u8> {
    let mut out = vec![0u8; len];
    for e in img.resolve_read(offset, len as u64).unwrap() {
        let at = (e.offset - offset) as usize;
        let dst = &mut out[at..at + e.len as usize];
        match e.source {
            ReadSource::Data { file_offset } => img.file().read_exact_at(dst, file_offset).unwrap(),
            ReadSource::Zero => dst.fill(0),
            ReadSource::Parent => {
                dst.copy_from_slice(&parent[e.offset as usize..(e.offset + e.len) as usize])
            }
        }
    }
    out
}

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

fn run(parent_data: Option<Vec<u8>>) {
    let path = Path::new("crash.vhd");
    let f = CrashFile::new();
    let opts = CreateOptions {
        size: SIZE,
        vhd_type: VhdType::Dynamic,
        block_size: BLOCK,
        ..Default::default()
    };
    let parent_info = parent_data.as_ref().map(|_| ParentInfo {
        absolute: "/nonexistent/parent.vhd".into(),
        relative: ".\\parent.vhd".into(),
        size: SIZE,
        uuid: uuid::Uuid::from_u128(7),
        timestamp: 0,
    });
    let mut img = VhdImage::create_in(f.clone(), path, &opts, parent_info.as_ref()).unwrap();
    let created_at_op = f.op_count();
    let flat_parent = parent_data.unwrap_or_else(|| vec![0; SIZE as usize]);
    let plan: [(u64, usize); 5] = [
        (0, 4096),
        (3 << 20, 8192),
        ((5 << 20) - 512, 1024),
        (4096, 4096),
        ((9 << 20) + 512, 3 << 20),
    ];
    let mut rounds = Vec::new();
    for (offset, len) in plan {
        let data = pattern(offset, len);
        let issued_at_op = f.op_count();
        write(&mut img, offset, &data);
        img.flush().unwrap();
        rounds.push(Round {
            offset,
            data: Some(data),
            len,
            issued_at_op,
            flushed_at_op: f.op_count(),
        });
    }
    // Discard a whole block (only unmaps in a dynamic image without parent).
    if img.parent().is_none() {
        let issued_at_op = f.op_count();
        let rest = img.discard(3 << 20, 1 << 20).unwrap();
        assert!(rest.is_empty());
        img.flush().unwrap();
        rounds.push(Round {
            offset: 3 << 20,
            data: None,
            len: 8192,
            issued_at_op,
            flushed_at_op: f.op_count(),
        });
    }
    std::mem::forget(img); // the power goes out
    assert!(
        f.op_count() - created_at_op > 20,
        "workload too small to mean anything"
    );
    for cut in created_at_op..=f.op_count() {
        for (name, s) in Survivors::matrix(0) {
            let what = format!("cut after op {cut}, survivors {name}");
            let state = f.crash_after_op(cut, s);
            let report = check_file(&state, path).unwrap();
            assert!(report.corruptions.is_empty(), "{what}: {report:?}");
            let mut img = VhdImage::open_file(state, path, OpenMode::ReadOnly)
                .unwrap_or_else(|e| panic!("{what}: {e}"));
            // Per 512-byte sector, the contents allowed after this cut: the last round flushed
            // before the cut (or the parent's bytes), plus any later round issued before it.
            let mut allowed: std::collections::BTreeMap<u64, Vec<Vec<u8>>> = Default::default();
            for r in &rounds {
                let new = r.data.clone().unwrap_or_else(|| vec![0; r.len]);
                for (k, chunk) in new.chunks(512).enumerate() {
                    let sector = r.offset / 512 + k as u64;
                    let base = (sector * 512) as usize;
                    let slot = allowed
                        .entry(sector)
                        .or_insert_with(|| vec![flat_parent[base..base + 512].to_vec()]);
                    if r.flushed_at_op <= cut {
                        *slot = vec![chunk.to_vec()];
                    } else if r.issued_at_op < cut {
                        slot.push(chunk.to_vec());
                    }
                }
            }
            for (&sector, options) in &allowed {
                let got = read(&mut img, &flat_parent, sector * 512, 512);
                assert!(options.contains(&got), "{what}: sector {sector} holds data no write put there (or lost a flushed write)");
            }
        }
    }
}

#[test]
fn every_power_cut_leaves_a_dynamic_vhd_consistent_with_all_flushed_writes() {
    run(None);
}

#[test]
fn every_power_cut_leaves_a_differencing_vhd_consistent_with_all_flushed_writes() {
    run(Some(pattern(99, SIZE as usize)));
}
