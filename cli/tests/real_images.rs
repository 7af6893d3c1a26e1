//! `vhdtool` on real images made by Windows, VirtualBox, XenServer, qemu and diskpart (from
//! `VHDKIT_TEST_IMAGES`, default `../shared/vhd-test-images`). Images are copied to a temporary
//! directory first: the folder is read-only. Outside CI a missing folder skips these tests with
//! a printed reason; in CI (`CI` set) it fails them.

mod support;
use support::{code, vhdtool};

use std::io::Read;
use std::path::{Path, PathBuf};
use std::process::Command;

use tempfile::TempDir;

fn images_dir() -> Option<PathBuf> {
    let dir = std::env::var_os("VHDKIT_TEST_IMAGES")
        .map(PathBuf::from)
        .unwrap_or_else(|| {
            Path::new(env!("CARGO_MANIFEST_DIR")).join("../../shared/vhd-test-images")
        });
    if dir.is_dir() {
        return Some(dir);
    }
    vhdkit_tests::skip_unless_ci(&format!(
        "test images not found at {} (set VHDKIT_TEST_IMAGES)",
        dir.display()
    ));
    None
}

/// Copies (decompressing `.xz`) `rel` from the image folder into `dst_dir`; returns the copy.
fn fetch(images: &Path, rel: &str, dst_dir: &Path) -> PathBuf {
    let src = images.join(rel);
    let name = Path::new(rel)
        .file_name()
        .and_then(|n| n.to_str())
        .expect("file name");
    let (name, xz) = match name.strip_suffix(".xz") {
        Some(n) => (n, true),
        None => (name, false),
    };
    let dst = dst_dir.join(name);
    let raw = std::fs::read(&src).unwrap_or_else(|e| panic!("read {}: {e}", src.display()));
    let bytes = if xz {
        let mut out = Vec::new();
        xz2::read::XzDecoder::new(&raw[..])
            .read_to_end(&mut out)
            .expect("decompress");
        out
    } else {
        raw
    };
    std::fs::write(&dst, bytes).expect("write copy");
    dst
}

fn info(path: &Path) -> serde_json::Value {
    let o = vhdtool(&[&"info", &"--json", &path]);
    assert_eq!(code(&o), 0, "{}", String::from_utf8_lossy(&o.stderr));
    serde_json::from_slice(&o.stdout).expect("JSON")
}

fn tmp() -> TempDir {
    tempfile::tempdir().expect("tempdir")
}

#[test]
fn go_vhd_images_report_their_sizes_and_check_clean() {
    let Some(images) = images_dir() else { return };
    let d = tmp();
    for (name, size, creator) in [
        ("win8.vhd", 41943040u64, "win 6.3"),
        ("win8.1-1GB.vhd", 1 << 30, "win 6.3"),
        ("vbox.vhd", 41943040, "vbox 4.3"),
        ("xapi.vhd", 41943040, "tap"),
        ("qemu.vhd", 41953280, "qemu 5.3"),
    ] {
        let p = fetch(&images, &format!("go-vhd/{name}"), d.path());
        let i = info(&p);
        assert_eq!(i["format"], "vhd", "{name}");
        assert_eq!(i["subformat"], "dynamic", "{name}");
        assert_eq!(i["virtual-size"], size, "{name}");
        let c = i["creator"].as_str().unwrap_or_default().to_string();
        assert!(c.starts_with(creator), "{name}: creator {c:?}");
        assert_eq!(code(&vhdtool(&[&"check", &p])), 0, "{name} checks clean");
    }
}

#[test]
fn windows_differencing_child_finds_its_parent_beside_it() {
    let Some(images) = images_dir() else { return };
    let d = tmp();
    let parent = fetch(&images, "go-vhd/win8.vhd", d.path());
    let child = fetch(&images, "go-vhd/win8-child.vhd", d.path());
    let i = info(&child);
    assert_eq!(i["subformat"], "differencing");
    assert_eq!(i["backing-chain"].as_array().map(Vec::len), Some(2));
    assert_eq!(i["parent-uuid"], info(&parent)["uuid"]);
    assert_eq!(code(&vhdtool(&[&"check", &child])), 0);
    assert_eq!(code(&vhdtool(&[&"compare", &child, &parent])), 0);
}

#[test]
fn dfvfs_ext2_and_diskpart_ntfs_convert_to_their_file_systems() {
    let Some(images) = images_dir() else { return };
    let d = tmp();
    for (rel, size, magic_at, magic) in [
        (
            "dfvfs/ext2.vhd.xz",
            4212736u64,
            1024 + 56,
            &[0x53u8, 0xEF][..],
        ),
        (
            "vhd-crate/ntfs_fixed.vhd.xz",
            4194304,
            128 * 512 + 3,
            b"NTFS    ",
        ),
    ] {
        let img = fetch(&images, rel, d.path());
        let raw = d.path().join("out.raw");
        let _ = std::fs::remove_file(&raw);
        let o = vhdtool(&[&"convert", &img, &raw]);
        assert_eq!(code(&o), 0, "{rel}: {}", String::from_utf8_lossy(&o.stderr));
        let bytes = std::fs::read(&raw).unwrap();
        assert_eq!(bytes.len() as u64, size, "{rel}");
        assert_eq!(&bytes[magic_at..magic_at + magic.len()], magic, "{rel}");
        assert_eq!(code(&vhdtool(&[&"compare", &img, &raw])), 0, "{rel}");
        if vhdkit_tests::tool_or_skip("qemu-img") {
            let q = Command::new("qemu-img")
                .args(["compare", "-f", "vpc", "-F", "raw"])
                .arg(&img)
                .arg(&raw)
                .output()
                .expect("run qemu-img");
            assert!(q.status.success(), "{rel}: qemu-img compare: {q:?}");
        }
    }
}

#[test]
fn differencing_image_without_its_parent_checks_as_corrupt() {
    let Some(images) = images_dir() else { return };
    let d = tmp();
    let img = fetch(&images, "dfvfs/fat-differential.vhd.xz", d.path());
    let o = vhdtool(&[&"check", &img]);
    assert_eq!(code(&o), 2);
    assert!(String::from_utf8_lossy(&o.stdout).contains("not found; tried:"));
    // info still describes the image, with a warning.
    let o = vhdtool(&[&"info", &"--json", &img]);
    assert_eq!(code(&o), 0);
    assert!(String::from_utf8_lossy(&o.stderr).contains("warning"));
    let i: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap();
    assert_eq!(i["parent"], serde_json::Value::Null);
    assert_eq!(i["subformat"], "differencing");
    // Reading needs the parent: a clear error, not zeros.
    let o = vhdtool(&[&"read", &img, &"--offset", &"0", &"--length", &"512"]);
    assert_eq!(code(&o), 1);
}

#[test]
fn bad_footer_checksum_is_reported_and_repaired() {
    let Some(images) = images_dir() else { return };
    let d = tmp();
    let img = fetch(&images, "dfvfs/image.vhd.xz", d.path());
    assert_eq!(code(&vhdtool(&[&"check", &img])), 2);
    let o = vhdtool(&[&"info", &img]);
    assert_eq!(code(&o), 1);
    assert!(String::from_utf8_lossy(&o.stderr).contains("checksum"));
    assert_eq!(code(&vhdtool(&[&"check", &"--repair", &img])), 0);
    assert_eq!(info(&img)["virtual-size"], 104448);
}
