//! Unused file space: what image creators leave free is information, not a leak (qemu-img's
//! images, fresh or written, check clean whatever their reserve), while space `check --repair`
//! or `compact` can give back is a leak (exit 3) that they do give back.
//!
//! The qemu-img cases assert no offsets: qemu 7.2 keeps 4 MiB after its metadata region and,
//! for fixed images, the whole preallocated area unused, but any creator may reserve other
//! amounts, which `creator_reserve_of_any_size_checks_clean` covers.

mod common;

use common::{pattern, read, write};
use std::path::{Path, PathBuf};
use std::process::Command;
use vhdkit_tests::tool_or_skip;
use vhdx::{check, repair, CompactMode, CreateOptions, OpenMode, VhdxImage};

const MIB: u64 = 1 << 20;

fn scratch() -> PathBuf {
    vhdkit_tests::fresh_scratch_dir()
}

fn run(cmd: &str, args: &[&str], paths: &[&Path]) {
    let out = Command::new(cmd).args(args).args(paths).output().unwrap();
    assert!(
        out.status.success(),
        "{cmd} {args:?} {paths:?}: {}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
}

fn len(p: &Path) -> u64 {
    std::fs::metadata(p).unwrap().len()
}

fn dynamic(size: u64, block: u64) -> CreateOptions {
    CreateOptions {
        size,
        block_size: Some(block as u32),
        ..Default::default()
    }
}

/// `vhdx::check` is clean (whatever is unused), and `repair` changes no byte of the layout.
fn assert_clean_and_kept_by_repair(p: &Path, what: &str) {
    let r = check(p).unwrap();
    assert_eq!(r.exit_code(), 0, "{what}: {r:?}");
    let before = len(p);
    let r = repair(p).unwrap();
    assert_eq!(r.exit_code(), 0, "{what}: {r:?}");
    assert!(r.repairs.is_empty(), "{what}: {r:?}");
    assert_eq!(len(p), before, "{what}: repair changed the file length");
}

#[test]
fn qemu_img_created_vhdx_checks_clean() {
    if !tool_or_skip("qemu-img") {
        return;
    }
    let dir = scratch();
    // (virtual size in MiB, -o options)
    let cases: &[(u64, &str)] = &[
        (16, ""),
        (1024, ""),
        (3072, "block_size=1M"),
        (200 << 10, ""),
        (64, "block_size=2M"),
        (16, "block_size=256M"),
        (16, "log_size=4M"),
        (40, "block_state_zero=off"),
        (100, "subformat=fixed"),
        (1024, "subformat=fixed,block_size=1M"),
        (100, "subformat=fixed,log_size=3M,block_size=32M"),
        // Blocks present from the start; the file ends with the disk, inside the last block.
        (100, "subformat=fixed,block_state_zero=off"),
    ];
    for (i, &(mib, opts)) in cases.iter().enumerate() {
        let p = dir.join(format!("q{i}.vhdx"));
        let size = format!("{}", mib * MIB);
        let mut args = vec!["create", "-q", "-f", "vhdx"];
        if !opts.is_empty() {
            args.extend(["-o", opts]);
        }
        run("qemu-img", &args, &[&p, Path::new(&size)]);
        let what = format!("qemu-img create -o {opts:?} {mib}M");
        let r = check(&p).unwrap();
        assert!(r.leaks.is_empty(), "{what}: {r:?}");
        assert!(
            r.unused.iter().all(|u| u.length >= MIB && u.offset >= MIB),
            "{what}: {r:?}"
        );
        assert_clean_and_kept_by_repair(&p, &what);
        // Written by qemu afterwards (blocks appended past the creator's reserve, or written in
        // place): still clean, and reads what qemu wrote.
        if tool_or_skip("qemu-io") {
            let last = format!("write -P 0x3c {} 4k", mib * MIB - 4096);
            run(
                "qemu-io",
                &[
                    "-f",
                    "vhdx",
                    "-c",
                    "write -P 0x5a 0 64k",
                    "-c",
                    "write -P 0xa5 5M 4k",
                    "-c",
                    &last,
                ],
                &[&p],
            );
            let what = format!("{what}, then written by qemu-io");
            assert_clean_and_kept_by_repair(&p, &what);
            let mut img = VhdxImage::open(&p, OpenMode::ReadOnly).unwrap();
            let head = read(&mut img, 0, 6 * MIB as usize);
            assert!(head[..64 << 10].iter().all(|&b| b == 0x5a), "{what}");
            assert!(
                head[5 * MIB as usize..][..4096].iter().all(|&b| b == 0xa5),
                "{what}"
            );
            assert_eq!(
                head.iter().filter(|&&b| b != 0).count(),
                (64 << 10) + 4096,
                "{what}"
            );
            let tail = read(&mut img, mib * MIB - 8192, 8192);
            assert_eq!(tail, [vec![0; 4096], vec![0x3c; 4096]].concat(), "{what}");
        }
    }
}

#[test]
fn qemu_img_converted_vhdx_checks_clean() {
    if !tool_or_skip("qemu-img") {
        return;
    }
    let dir = scratch();
    let raw = dir.join("src.raw");
    let f = std::fs::File::create(&raw).unwrap();
    f.set_len(96 * MIB).unwrap();
    for o in [0, 3 * MIB + 512, 40 * MIB, 41 * MIB, 96 * MIB - 8192] {
        std::os::unix::fs::FileExt::write_all_at(&f, &pattern(o, 8192), o).unwrap();
    }
    let zeros = dir.join("zeros.raw");
    std::fs::File::create(&zeros)
        .unwrap()
        .set_len(32 * MIB)
        .unwrap();
    for (i, opts) in [
        "",
        "block_size=1M",
        "block_size=32M",
        "subformat=fixed",
        "subformat=fixed,block_size=1M",
    ]
    .iter()
    .enumerate()
    {
        for src in [&raw, &zeros] {
            let p = dir.join(format!("c{i}.vhdx"));
            let _ = std::fs::remove_file(&p);
            let mut args = vec!["convert", "-f", "raw", "-O", "vhdx"];
            if !opts.is_empty() {
                args.extend(["-o", opts]);
            }
            run("qemu-img", &args, &[src, &p]);
            let what = format!("qemu-img convert -o {opts} {}", src.display());
            assert_clean_and_kept_by_repair(&p, &what);
            let mut img = VhdxImage::open(&p, OpenMode::ReadOnly).unwrap();
            let n = len(src) as usize;
            assert_eq!(read(&mut img, 0, n), std::fs::read(src).unwrap(), "{what}");
        }
    }
}

#[test]
fn creator_reserve_of_any_size_checks_clean() {
    // A creator that keeps 13 MiB free after its regions: fresh, and once blocks follow it.
    let p = scratch().join("r.vhdx");
    VhdxImage::create(&p, &dynamic(64 * MIB, MIB))
        .unwrap()
        .close()
        .unwrap();
    let regions_end = len(&p);
    std::fs::OpenOptions::new()
        .write(true)
        .open(&p)
        .unwrap()
        .set_len(regions_end + 13 * MIB)
        .unwrap();
    let r = check(&p).unwrap();
    assert_eq!(r.exit_code(), 0, "{r:?}");
    assert_eq!(r.unused.len(), 1, "{r:?}");
    assert_eq!(
        (r.unused[0].offset, r.unused[0].length),
        (regions_end, 13 * MIB)
    );
    assert!(r.unused[0].compact_releases, "{r:?}");
    let mut img = VhdxImage::open(&p, OpenMode::ReadWrite).unwrap();
    write(&mut img, 5 * MIB, &pattern(5, 4096));
    img.close().unwrap();
    assert_eq!(
        len(&p),
        regions_end + 14 * MIB,
        "the block went after the reserve"
    );
    let r = check(&p).unwrap();
    assert_eq!(r.exit_code(), 0, "{r:?}");
    assert_eq!(r.unused[0].length, 13 * MIB, "{r:?}");
    // compact is honest to the report: it moves the block into the reserve.
    let mut img = VhdxImage::open(&p, OpenMode::ReadWrite).unwrap();
    img.compact(CompactMode::Quick, None, &mut |_| {}).unwrap();
    img.close().unwrap();
    assert_eq!(len(&p), regions_end + MIB);
    let r = check(&p).unwrap();
    assert!(r.is_clean() && r.unused.is_empty(), "{r:?}");
}

#[test]
fn space_past_the_last_block_is_a_leak_that_repair_cuts() {
    let p = scratch().join("t.vhdx");
    let mut img = VhdxImage::create(&p, &dynamic(16 * MIB, MIB)).unwrap();
    write(&mut img, 0, &pattern(0, 3 * MIB as usize));
    img.close().unwrap();
    let used = len(&p);
    // An allocation a crash interrupted: the file grew, no BAT entry points there.
    std::fs::OpenOptions::new()
        .write(true)
        .open(&p)
        .unwrap()
        .set_len(used + 2 * MIB)
        .unwrap();
    let r = check(&p).unwrap();
    assert_eq!(r.exit_code(), 3, "{r:?}");
    assert_eq!(
        (r.leaks[0].offset, r.leaked_bytes),
        (used, 2 * MIB),
        "{r:?}"
    );
    let r = repair(&p).unwrap();
    assert_eq!(r.exit_code(), 0, "{r:?}");
    assert_eq!(r.repairs.len(), 1, "{r:?}");
    assert_eq!(len(&p), used);
}

#[test]
fn blocks_released_at_the_end_of_a_written_image_are_a_leak() {
    // Written, then every block discarded: no data block is left, but the log shows the image
    // was written, so the space past the regions is released space, not the creator's.
    let p = scratch().join("e.vhdx");
    let mut img = VhdxImage::create(&p, &dynamic(16 * MIB, MIB)).unwrap();
    let regions_end = len(&p);
    write(&mut img, 0, &pattern(0, 2 * MIB as usize));
    img.flush().unwrap();
    assert!(img.discard(0, 2 * MIB).unwrap().is_empty());
    img.close().unwrap();
    let r = check(&p).unwrap();
    assert_eq!(r.exit_code(), 3, "{r:?}");
    assert_eq!(r.leaked_bytes, 2 * MIB, "{r:?}");
    assert_eq!(repair(&p).unwrap().exit_code(), 0);
    assert_eq!(len(&p), regions_end);
}

#[test]
fn block_released_between_blocks_is_a_leak_that_compact_gives_back() {
    let p = scratch().join("h.vhdx");
    let mut img = VhdxImage::create(&p, &dynamic(16 * MIB, MIB)).unwrap();
    write(&mut img, 0, &pattern(0, 4 * MIB as usize));
    img.flush().unwrap();
    assert!(img.discard(2 * MIB, MIB).unwrap().is_empty());
    img.close().unwrap();
    let r = check(&p).unwrap();
    assert_eq!(r.exit_code(), 3, "{r:?}");
    assert_eq!(r.leaked_bytes, MIB, "{r:?}");
    assert!(r.leaks[0].message.contains("compact"), "{r:?}");
    let before = len(&p);
    let mut img = VhdxImage::open(&p, OpenMode::ReadWrite).unwrap();
    img.compact(CompactMode::Quick, None, &mut |_| {}).unwrap();
    img.close().unwrap();
    assert_eq!(len(&p), before - MIB);
    assert!(check(&p).unwrap().is_clean());
}

#[test]
fn qemu_img_image_with_space_appended_reports_a_leak() {
    if !tool_or_skip("qemu-img") || !tool_or_skip("qemu-io") {
        return;
    }
    let p = scratch().join("qa.vhdx");
    run(
        "qemu-img",
        &["create", "-q", "-f", "vhdx", "-o", "block_size=1M"],
        &[&p, Path::new("64M")],
    );
    run(
        "qemu-io",
        &["-f", "vhdx", "-c", "write -P 0x11 1M 1M"],
        &[&p],
    );
    let written = len(&p);
    std::fs::OpenOptions::new()
        .write(true)
        .open(&p)
        .unwrap()
        .set_len(written + 3 * MIB)
        .unwrap();
    let r = check(&p).unwrap();
    assert_eq!(r.exit_code(), 3, "{r:?}");
    assert_eq!(r.leaked_bytes, 3 * MIB, "{r:?}");
    assert_eq!(repair(&p).unwrap().exit_code(), 0);
    assert_eq!(len(&p), written);
}
