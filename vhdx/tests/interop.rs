//! VHDX images made by vhdkit read byte-identical in qemu-img (512-byte sectors) and at the right
//! size in libvhdi; VHDX images made by qemu-img read identically in vhdkit.

mod common;

use common::{pattern, read, write};
use std::path::{Path, PathBuf};
use std::process::Command;
use vhdkit_tests::tool_or_skip;
use vhdx::{CreateOptions, OpenMode, VhdxImage};

const SIZE: u64 = 2 << 30;
const OFFSETS: [u64; 5] = [
    0,
    (32 << 20) - 4096,
    700 << 20,
    (1 << 30) + 12345 * 512,
    SIZE - (1 << 20),
];

fn make_pair(opts: CreateOptions) -> (PathBuf, PathBuf) {
    let dir = vhdkit_tests::fresh_scratch_dir();
    let raw = dir.join("disk.raw");
    let f = std::fs::File::create(&raw).unwrap();
    f.set_len(SIZE).unwrap();
    let path = dir.join("disk.vhdx");
    let mut img = VhdxImage::create(
        &path,
        &CreateOptions {
            size: SIZE,
            sparse: true,
            ..opts
        },
    )
    .unwrap();
    for o in OFFSETS {
        let data = pattern(o, 1 << 20);
        std::os::unix::fs::FileExt::write_all_at(&f, &data, o).unwrap();
        write(&mut img, o, &data);
    }
    img.close().unwrap();
    (raw, path)
}

fn qemu(args: &[&str], paths: &[&Path]) -> std::process::Output {
    let out = Command::new("qemu-img")
        .args(args)
        .args(paths)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "qemu-img {args:?}: {}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    out
}

fn vhdiinfo_size(path: &Path) -> String {
    let out = Command::new("vhdiinfo").arg(path).output().unwrap();
    String::from_utf8_lossy(&out.stdout).into_owned()
}

fn qemu_case(opts: CreateOptions) {
    if !tool_or_skip("qemu-img") || !tool_or_skip("vhdiinfo") {
        return;
    }
    let (raw, vhdx) = make_pair(opts);
    let info = qemu(&["info", "--output=json", "-f", "vhdx"], &[&vhdx]);
    let v: serde_json::Value = serde_json::from_slice(&info.stdout).unwrap();
    assert_eq!(v["virtual-size"].as_u64(), Some(SIZE));
    qemu(&["check", "-f", "vhdx"], &[&vhdx]);
    qemu(&["compare", "-f", "raw", "-F", "vhdx"], &[&raw, &vhdx]);
    let text = vhdiinfo_size(&vhdx);
    assert!(
        text.contains(&format!("({SIZE} bytes)")),
        "vhdiinfo:\n{text}"
    );
}

#[test]
fn dynamic_32m_blocks_read_identically_in_qemu_img_and_libvhdi() {
    qemu_case(CreateOptions::default());
}

#[test]
fn dynamic_1m_blocks_read_identically_in_qemu_img_and_libvhdi() {
    qemu_case(CreateOptions {
        block_size: Some(1 << 20),
        ..Default::default()
    });
}

#[test]
fn fixed_image_reads_identically_in_qemu_img_and_libvhdi() {
    qemu_case(CreateOptions {
        fixed: true,
        ..Default::default()
    });
}

#[test]
fn four_kib_sector_image_reads_at_its_size_in_libvhdi() {
    if !tool_or_skip("vhdiinfo") {
        return;
    }
    let (_, vhdx) = make_pair(CreateOptions {
        logical_sector_size: 4096,
        ..Default::default()
    });
    let text = vhdiinfo_size(&vhdx);
    assert!(
        text.contains(&format!("({SIZE} bytes)")),
        "vhdiinfo:\n{text}"
    );
    assert!(text.contains("4096"), "vhdiinfo sector size:\n{text}");
}

#[test]
fn image_made_by_qemu_img_reads_identically() {
    if !tool_or_skip("qemu-img") {
        return;
    }
    let dir = vhdkit_tests::fresh_scratch_dir();
    let raw = dir.join("src.raw");
    let f = std::fs::File::create(&raw).unwrap();
    f.set_len(64 << 20).unwrap();
    for o in [0u64, 9 << 20, (64 << 20) - 8192] {
        std::os::unix::fs::FileExt::write_all_at(&f, &pattern(o, 8192), o).unwrap();
    }
    let vhdx = dir.join("q.vhdx");
    qemu(&["convert", "-f", "raw", "-O", "vhdx"], &[&raw, &vhdx]);
    let mut img = VhdxImage::open(&vhdx, OpenMode::ReadOnly).unwrap();
    assert_eq!(img.virtual_size(), 64 << 20);
    assert!(img.creator().starts_with("QEMU"), "{}", img.creator());
    assert_eq!(read(&mut img, 0, 64 << 20), std::fs::read(&raw).unwrap());
    let fixed = dir.join("qf.vhdx");
    qemu(
        &[
            "convert",
            "-f",
            "raw",
            "-O",
            "vhdx",
            "-o",
            "subformat=fixed",
        ],
        &[&raw, &fixed],
    );
    let mut img = VhdxImage::open(&fixed, OpenMode::ReadOnly).unwrap();
    assert_eq!(read(&mut img, 0, 64 << 20), std::fs::read(&raw).unwrap());
    assert!(vhdx::check(&fixed).unwrap().corruptions.is_empty());
}
