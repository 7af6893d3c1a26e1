//! Images vhdkit creates read at exactly the requested size, with the same content, in tools
//! nobody here wrote: qemu-img (`info`, `compare`, `check`) and libvhdi's `vhdiinfo`.
//! A size that is not CHS-exact (1 GiB + 3 MiB) is the case where naive writers disagree.

mod common;

use std::process::Command;
use vhd::{CreateOptions, VhdImage, VhdType};
use vhdkit_tests::pattern_at as pattern;
use vhdkit_tests::tool_or_skip;

const SIZE: u64 = (1 << 30) + (3 << 20);

/// Builds a raw file and a VHD of the given type with the same scattered content.
fn make_pair(vhd_type: VhdType) -> (std::path::PathBuf, std::path::PathBuf) {
    let dir = common::scratch();
    let raw = dir.join("disk.raw");
    let f = std::fs::File::create(&raw).unwrap();
    f.set_len(SIZE).unwrap();
    let vhd_path = dir.join("disk.vhd");
    let opts = CreateOptions {
        size: SIZE,
        vhd_type,
        sparse: true,
        ..Default::default()
    };
    let mut img = VhdImage::create(&vhd_path, &opts).unwrap();
    use std::os::unix::fs::FileExt;
    for off in [0u64, 5 << 20, (1 << 30) - 4096, SIZE - (1 << 20)] {
        let data = pattern(off, 1 << 20);
        f.write_all_at(&data, off).unwrap();
        common::write(&mut img, off, &data);
    }
    img.flush().unwrap();
    (raw, vhd_path)
}

fn qemu_virtual_size(path: &std::path::Path) -> u64 {
    let out = Command::new("qemu-img")
        .args(["info", "--output=json", "-f", "vpc"])
        .arg(path)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    v["virtual-size"]
        .as_u64()
        .expect("top-level virtual-size in qemu-img json")
}

fn check_with_tools(vhd_type: VhdType) {
    if !tool_or_skip("qemu-img") || !tool_or_skip("vhdiinfo") {
        return;
    }
    let (raw, vhd_path) = make_pair(vhd_type);
    assert_eq!(qemu_virtual_size(&vhd_path), SIZE, "qemu-img virtual size");
    let cmp = Command::new("qemu-img")
        .args(["compare", "-f", "raw", "-F", "vpc"])
        .arg(&raw)
        .arg(&vhd_path)
        .output()
        .unwrap();
    assert!(
        cmp.status.success(),
        "qemu-img compare: {}{}",
        String::from_utf8_lossy(&cmp.stdout),
        String::from_utf8_lossy(&cmp.stderr)
    );
    let info = Command::new("vhdiinfo").arg(&vhd_path).output().unwrap();
    let text = String::from_utf8_lossy(&info.stdout);
    assert!(info.status.success(), "vhdiinfo: {text}");
    assert!(
        text.contains(&format!("({SIZE} bytes)")),
        "vhdiinfo size:\n{text}"
    );
}

#[test]
fn dynamic_image_reads_identically_in_qemu_img_and_libvhdi() {
    check_with_tools(VhdType::Dynamic);
}

#[test]
fn fixed_image_reads_identically_in_qemu_img_and_libvhdi() {
    check_with_tools(VhdType::Fixed);
}
