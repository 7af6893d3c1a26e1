//! Read-only mounts reply from mappings of the image files: the mapped bytes are exactly what
//! the disk reads as, only single-extent ranges of read-only disks are mapped, and a file
//! truncated under a mapping makes the mapped read fall back instead of raising SIGBUS.

use std::path::Path;

use block_backend::{open, Disk, OpenOptions};
use fuse_mount::fs::{SharedDisk, SharedOptions};

const MIB: u64 = 1 << 20;

fn vhdx_with_data(path: &Path) -> Vec<u8> {
    vhdx::VhdxImage::create(
        path,
        &vhdx::CreateOptions {
            size: 8 * MIB,
            block_size: Some(MIB as u32),
            ..Default::default()
        },
    )
    .unwrap()
    .close()
    .unwrap();
    let data: Vec<u8> = (0..2 * MIB).map(|i| (i * 7 % 251) as u8).collect();
    let mut d = open(path, OpenOptions::read_write()).unwrap();
    d.write_at(&data, MIB).unwrap(); // blocks 1 and 2; blocks 0 and 3.. stay unallocated
    d.flush().unwrap();
    data
}

fn shared(path: &Path, read_only: bool) -> std::sync::Arc<SharedDisk> {
    let opts = if read_only {
        OpenOptions::read_only()
    } else {
        OpenOptions::read_write()
    };
    let readers = if read_only {
        vec![Box::new(open(path, opts).unwrap()) as Box<dyn Disk>]
    } else {
        Vec::new()
    };
    SharedDisk::with_options(
        Box::new(open(path, opts).unwrap()),
        SharedOptions {
            discard: false,
            readers,
        },
    )
}

#[test]
fn mapped_reads_equal_disk_reads_and_only_single_extents_of_read_only_disks_are_mapped() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("d.vhdx");
    let data = vhdx_with_data(&path);
    let ro = shared(&path, true);
    for (offset, len) in [
        (MIB, 4096usize),
        (MIB + 512, 65536),
        (2 * MIB, MIB as usize),
    ] {
        let (m, at) = ro
            .read_mapped(offset, len)
            .unwrap()
            .expect("one extent: mapped");
        let bytes = m.get(at, len).expect("in range");
        let want = &data[(offset - MIB) as usize..(offset - MIB) as usize + len];
        assert_eq!(bytes, want, "{offset}+{len}");
    }
    // Crossing from block 1 into block 2: mapped only if the two blocks are adjacent in the
    // file (then the bytes must still match). From data into an unallocated block, or wholly
    // unallocated: never mapped.
    if let Some((m, at)) = ro.read_mapped(2 * MIB - 4096, 8192).unwrap() {
        assert_eq!(
            m.get(at, 8192).unwrap(),
            &data[MIB as usize - 4096..MIB as usize + 4096]
        );
    }
    assert!(ro.read_mapped(3 * MIB - 4096, 8192).unwrap().is_none());
    assert!(ro.read_mapped(5 * MIB, 4096).unwrap().is_none());
    // A writable disk is never mapped.
    drop(ro);
    let rw = shared(&path, false);
    assert!(rw.read_mapped(MIB, 4096).unwrap().is_none());
}

#[test]
fn a_file_truncated_under_its_mapping_falls_back_instead_of_faulting() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("d.raw");
    std::fs::write(&path, vec![0x5Au8; 4 * MIB as usize]).unwrap();
    let ro = shared(&path, true);
    let (m, at) = ro.read_mapped(2 * MIB, 4096).unwrap().expect("raw: mapped");
    assert!(m.get(at, 4096).unwrap().iter().all(|&b| b == 0x5A));
    // Someone truncates the image under the mount.
    std::fs::OpenOptions::new()
        .write(true)
        .open(&path)
        .unwrap()
        .set_len(MIB)
        .unwrap();
    assert!(
        m.get(at, 4096).is_none(),
        "past the new end: no bytes, no SIGBUS"
    );
    assert!(m.get(0, 4096).is_some(), "still backed below the new end");
}
