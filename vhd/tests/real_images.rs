//! The real images in the shared test-image folder (made by Windows, Virtual PC, VirtualBox,
//! XenServer, qemu, diskpart) read as their creators meant. Copies are used; originals are never
//! opened for writing.

mod common;

use vhd::{check, repair, DiskType, ErrorKind, OpenMode, VhdImage};
use vhdkit_tests::{image_or_skip, images_or_skip};

fn open(rel: &str) -> Option<VhdImage> {
    let path = vhdkit_tests::image_or_skip(rel)?;
    Some(VhdImage::open(&path, OpenMode::ReadOnly).unwrap_or_else(|e| panic!("{rel}: {e}")))
}

#[test]
fn windows_dynamic_reads_at_current_size_not_chs() {
    let Some(img) = open("go-vhd/win8.vhd") else {
        return;
    };
    assert_eq!(img.virtual_size(), 41_943_040);
    assert_eq!(img.disk_type(), DiskType::Dynamic);
    assert_eq!(img.creator(), "win 6.3");
    assert_eq!(img.uuid().to_string()[..8], *"adb71975");
    assert_eq!(img.block_size(), Some(2 << 20));
}

#[test]
fn windows_1gib_geometry_matches_the_spec_algorithm() {
    let Some(img) = open("go-vhd/win8.1-1GB.vhd") else {
        return;
    };
    assert_eq!(img.virtual_size(), 1 << 30);
    assert_eq!(img.footer().geometry, vhd::Geometry::for_size(1 << 30));
    assert_eq!(img.footer().geometry.to_string(), "2080/16/63");
}

#[test]
fn virtualbox_image_reads_at_current_size_where_qemu_truncates() {
    let Some(img) = open("go-vhd/vbox.vhd") else {
        return;
    };
    assert_eq!(img.virtual_size(), 41_943_040);
    assert_eq!(img.footer().geometry.bytes(), 41_909_760);
}

#[test]
fn xenserver_image_reads_at_current_size() {
    let Some(img) = open("go-vhd/xapi.vhd") else {
        return;
    };
    assert_eq!(img.virtual_size(), 41_943_040);
    assert_eq!(img.footer().creator_host_os, 0);
}

#[test]
fn qemu_image_reads_at_its_chs_rounded_size() {
    let Some(img) = open("go-vhd/qemu.vhd") else {
        return;
    };
    assert_eq!(img.virtual_size(), 41_953_280);
}

#[test]
fn diskpart_fixed_ntfs_image_reads_its_boot_sector() {
    let Some(mut img) = open("vhd-crate/ntfs_fixed.vhd.xz") else {
        return;
    };
    assert_eq!(img.disk_type(), DiskType::Fixed);
    assert_eq!(img.virtual_size(), 4_194_304);
    let sector0 = common::read(&mut img, 0, 512);
    assert_eq!(&sector0[510..512], &[0x55, 0xAA]);
}

#[test]
fn qemu_dynamic_ext2_image_has_a_superblock() {
    let Some(mut img) = open("dfvfs/ext2.vhd.xz") else {
        return;
    };
    assert_eq!(img.virtual_size(), 4_212_736);
    let sb = common::read(&mut img, 1024, 1024);
    assert_eq!(&sb[56..58], &[0x53, 0xEF], "ext2 magic");
}

#[test]
fn windows_child_links_to_its_parent_by_uuid_and_locators() {
    let Some(paths) = images_or_skip(&["go-vhd/win8.vhd", "go-vhd/win8-child.vhd"]) else {
        return;
    };
    let parent = VhdImage::open(&paths[0], OpenMode::ReadOnly).unwrap();
    let child = VhdImage::open(&paths[1], OpenMode::ReadOnly).unwrap();
    assert_eq!(child.disk_type(), DiskType::Differencing);
    let link = child.parent().unwrap();
    assert_eq!(link.uuid, parent.uuid());
    assert_eq!(link.timestamp, 0);
    assert_eq!(link.unicode_name, "C:\\Users\\sergi\\Downloads\\win8.vhd");
    // W2ru ".\win8.vhd" relative to the child comes first and names the parent copy.
    assert_eq!(
        link.candidates[0],
        paths[1].parent().unwrap().join("win8.vhd")
    );
    assert!(link
        .candidates
        .iter()
        .any(|c| c.to_string_lossy().contains("sergi")));
}

#[test]
fn windows_differencing_child_without_parent_still_parses() {
    let Some(mut img) = open("dfvfs/fat-differential.vhd.xz") else {
        return;
    };
    assert_eq!(img.virtual_size(), 4 << 20);
    let link = img.parent().unwrap().clone();
    assert!(link.unicode_name.ends_with("fat-parent.vhd"));
    // Block 0 is allocated; sectors whose bit is clear come from the (absent) parent.
    let ext = img.resolve_read(0, 4 << 20).unwrap();
    assert!(ext
        .iter()
        .any(|e| matches!(e.source, vhd::ReadSource::Data { .. })));
    assert!(ext.iter().any(|e| e.source == vhd::ReadSource::Parent));
}

#[test]
fn bad_footer_checksum_fails_open_naming_the_checksum() {
    let path = image_or_skip!("dfvfs/image.vhd.xz");
    let before = std::fs::read(&path).unwrap();
    let err = VhdImage::open(&path, OpenMode::ReadOnly).unwrap_err();
    assert_eq!(err.kind(), ErrorKind::Checksum);
    let msg = err.to_string();
    assert!(msg.contains("footer") && msg.contains("checksum"), "{msg}");
    assert_eq!(
        std::fs::read(&path).unwrap(),
        before,
        "read-only open wrote to the file"
    );
}

#[test]
fn check_reports_bad_checksum_and_repair_fixes_it() {
    let path = image_or_skip!("dfvfs/image.vhd.xz");
    let before = std::fs::read(&path).unwrap();
    let r = check(&path).unwrap();
    assert_eq!(r.exit_code(), 2, "{r:?}");
    assert_eq!(
        std::fs::read(&path).unwrap(),
        before,
        "check wrote to the file"
    );
    let r = repair(&path).unwrap();
    assert_eq!(r.exit_code(), 0, "{r:?}");
    assert!(
        r.repairs.iter().any(|s| s.contains("checksum")),
        "{:?}",
        r.repairs
    );
    let img = VhdImage::open(&path, OpenMode::ReadOnly).unwrap();
    assert_eq!(img.virtual_size(), 104_448);
    // Only the checksum bytes changed (in both footer copies).
    let after = std::fs::read(&path).unwrap();
    let changed: Vec<usize> = (0..before.len())
        .filter(|&i| before[i] != after[i])
        .collect();
    assert!(
        changed.iter().all(|&i| (64..68).contains(&i)
            || (before.len() - 512 + 64..before.len() - 512 + 68).contains(&i)),
        "{changed:?}"
    );
}

#[test]
fn hand_made_child_with_two_bad_checksums_is_repaired_in_both() {
    let path = image_or_skip!("dfvfs/image-differential.vhd.xz");
    assert_eq!(check(&path).unwrap().corruptions.len(), 2);
    let r = repair(&path).unwrap();
    assert_eq!(r.exit_code(), 0, "{r:?}");
    assert_eq!(r.repairs.len(), 2, "{:?}", r.repairs);
    let img = VhdImage::open(&path, OpenMode::ReadOnly).unwrap();
    assert_eq!(img.parent().unwrap().unicode_name, "image.vhd");
}

#[test]
fn every_real_image_checks_clean() {
    for rel in [
        "go-vhd/win8.vhd",
        "go-vhd/win8.1-1GB.vhd",
        "go-vhd/win8-child.vhd",
        "go-vhd/vbox.vhd",
        "go-vhd/xapi.vhd",
        "go-vhd/qemu.vhd",
        "dfvfs/ext2.vhd.xz",
        "dfvfs/fat-differential.vhd.xz",
        "vhd-crate/ntfs_fixed.vhd.xz",
    ] {
        let Some(path) = vhdkit_tests::image_or_skip(rel) else {
            return;
        };
        let r = check(&path).unwrap();
        assert!(r.is_clean(), "{rel}: {r:?}");
    }
}
