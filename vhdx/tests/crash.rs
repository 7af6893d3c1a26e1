//! Crash consistency: run a workload on an in-memory crash-test file, then cut the power after
//! every operation (keeping none, all, or some of the unsynced writes, one of them torn). Every
//! resulting file must open read-only and read-write, show no corruption, and hold every write
//! flushed before the cut; sectors written after the last completed flush hold old or new data,
//! nothing else.

mod common;

use common::{pattern, read, write};
use image_io::{CrashFile, Survivors};
use std::path::Path;
use vhdx::{check::check_image, CreateOptions, OpenMode, VhdxImage};

const SIZE: u64 = 16 << 20;

/// Creation goes through a temporary name, so cuts are only meaningful after it.
struct Workload {
    file: CrashFile,
    created_at_op: usize,
    rounds: Vec<Round>,
}

struct Round {
    offset: u64,
    data: Vec<u8>,
    flushed_at_op: usize,
}

fn workload() -> Workload {
    let path = Path::new("crash.vhdx");
    let opts = CreateOptions {
        size: SIZE,
        block_size: Some(1 << 20),
        ..Default::default()
    };
    let f = CrashFile::new();
    let mut img = VhdxImage::create_in(f.clone(), path, &opts, None).unwrap();
    let created_at_op = f.op_count();
    // Rounds write fresh regions (first-touch allocation, in-block, spanning blocks), each
    // followed by a flush.
    let plan: [(u64, usize); 6] = [
        (0, 4096),
        (3 << 20, 8192),
        ((5 << 20) - 512, 1024),
        (4096, 4096),
        ((9 << 20) + 512, 3 << 20),
        (15 << 20, 1 << 20),
    ];
    let mut rounds = Vec::new();
    for (offset, len) in plan {
        let data = pattern(offset + len as u64, len);
        write(&mut img, offset, &data);
        img.flush().unwrap();
        rounds.push(Round {
            offset,
            data,
            flushed_at_op: f.op_count(),
        });
    }
    std::mem::forget(img); // no close: the power goes out
    Workload {
        file: f,
        created_at_op,
        rounds,
    }
}

fn verify(state: CrashFile, rounds: &[Round], cut: usize, what: &str) {
    let path = Path::new("crash.vhdx");
    let before = state.contents();
    let mut ro = VhdxImage::open_file(state.clone(), path, OpenMode::ReadOnly)
        .unwrap_or_else(|e| panic!("{what}: read-only open: {e}"));
    assert_eq!(state.contents(), before, "{what}: read-only open wrote");
    let ro_view: Vec<Vec<u8>> = rounds
        .iter()
        .map(|r| read(&mut ro, r.offset, r.data.len()))
        .collect();
    drop(ro);
    let mut rw = VhdxImage::open_file(state.clone(), path, OpenMode::ReadWrite)
        .unwrap_or_else(|e| panic!("{what}: read-write open: {e}"));
    let report = check_image(&rw);
    assert!(report.corruptions.is_empty(), "{what}: {report:?}");
    for (i, r) in rounds.iter().enumerate() {
        let got = read(&mut rw, r.offset, r.data.len());
        assert_eq!(
            got, ro_view[i],
            "{what}: read-only and replayed views differ in round {i}"
        );
        if r.flushed_at_op <= cut {
            assert!(
                got == r.data,
                "{what}: round {i} was flushed before the cut but is lost"
            );
        } else {
            for (s, (g, d)) in got.chunks(512).zip(r.data.chunks(512)).enumerate() {
                assert!(
                    g == d || g.iter().all(|&b| b == 0),
                    "{what}: round {i} sector {s} holds neither old nor new data"
                );
            }
        }
    }
    rw.close().unwrap();
}

#[test]
fn every_power_cut_leaves_a_consistent_image_with_all_flushed_writes() {
    let Workload {
        file: f,
        created_at_op,
        rounds,
    } = workload();
    assert!(
        f.op_count() - created_at_op > 40,
        "workload too small to mean anything"
    );
    for cut in created_at_op..=f.op_count() {
        for (name, s) in Survivors::matrix(2) {
            verify(
                f.crash_after_op(cut, s),
                &rounds,
                cut,
                &format!("cut after op {cut}, survivors {name}"),
            );
        }
    }
}
