//! Opening disks: content probing, differencing chains and their failure modes, read-only
//! behaviour, and what `map` says about each layer.

use std::path::{Path, PathBuf};

use block_backend::{open, Disk, Error, ErrorKind, Format, OpenOptions, Subformat};
use tempfile::TempDir;

const MIB: u64 = 1 << 20;

fn dynamic(path: &Path, size: u64) {
    let opts = vhd::CreateOptions {
        size,
        block_size: 512 << 10,
        ..Default::default()
    };
    vhd::VhdImage::create(path, &opts).expect("create dynamic VHD");
}

fn child(path: &Path, parent: &Path) {
    let opts = vhd::CreateOptions {
        parent: Some(parent.to_path_buf()),
        block_size: 512 << 10,
        ..Default::default()
    };
    vhd::VhdImage::create(path, &opts).expect("create differencing VHD");
}

fn tmp() -> TempDir {
    tempfile::tempdir().expect("tempdir")
}

#[test]
fn vhd_named_img_is_probed_as_vhd() {
    let d = tmp();
    let p = d.path().join("disk.img");
    dynamic(&p, 4 * MIB);
    assert_eq!(block_backend::probe::probe_path(&p).unwrap(), Format::Vhd);
    let disk = open(&p, OpenOptions::read_only()).unwrap();
    assert_eq!(disk.size(), 4 * MIB);
    assert_eq!(disk.layers()[0].subformat, Some(Subformat::Dynamic));
}

#[test]
fn plain_file_named_vhd_is_probed_as_raw() {
    let d = tmp();
    let p = d.path().join("disk.vhd");
    std::fs::write(&p, vec![7u8; 3000]).unwrap();
    let mut disk = open(&p, OpenOptions::read_only()).unwrap();
    assert_eq!(disk.layers()[0].format, Format::Raw);
    assert_eq!(disk.size(), 3000);
    let mut b = [0u8; 10];
    disk.read_at(&mut b, 2990).unwrap();
    assert_eq!(b, [7u8; 10]);
}

#[test]
fn truncated_vhdx_is_a_format_error_naming_the_file() {
    let d = tmp();
    let p = d.path().join("disk.bin");
    let mut bytes = b"vhdxfile".to_vec();
    bytes.resize(1 << 16, 0);
    std::fs::write(&p, bytes).unwrap();
    let e = open(&p, OpenOptions::read_only()).unwrap_err();
    assert_eq!(e.kind(), ErrorKind::Format);
    assert!(e.to_string().contains("disk.bin"), "{e}");
}

#[test]
fn vhdx_is_probed_by_content_whatever_its_name() {
    let d = tmp();
    let p = d.path().join("disk.bin");
    let opts = vhdx::CreateOptions {
        size: 4 * MIB,
        block_size: Some(1 << 20),
        ..Default::default()
    };
    vhdx::VhdxImage::create(&p, &opts).unwrap().close().unwrap();
    let mut disk = open(&p, OpenOptions::read_write()).unwrap();
    assert_eq!(disk.layers()[0].format, Format::Vhdx);
    assert_eq!(
        (disk.logical_sector_size(), disk.physical_sector_size()),
        (512, 4096)
    );
    disk.write_at(b"hello", 1000).unwrap();
    let mut b = [0u8; 5];
    disk.read_at(&mut b, 1000).unwrap();
    assert_eq!(&b, b"hello");
}

#[test]
fn missing_file_error_names_the_path() {
    let d = tmp();
    let p = d.path().join("nope.vhd");
    let e = open(&p, OpenOptions::read_only()).unwrap_err();
    assert_eq!(e.kind(), ErrorKind::Io);
    assert!(e.to_string().contains("nope.vhd"), "{e}");
}

#[test]
fn differencing_chain_reads_parent_data_and_lists_backing_chain() {
    let d = tmp();
    let (base, mid, top) = (
        d.path().join("base.vhd"),
        d.path().join("mid.vhd"),
        d.path().join("top.vhd"),
    );
    dynamic(&base, 4 * MIB);
    {
        let mut b = open(&base, OpenOptions::read_write()).unwrap();
        b.write_at(&[1u8; 4096], 0).unwrap();
        b.write_at(&[1u8; 4096], MIB).unwrap();
        b.flush().unwrap();
    }
    child(&mid, &base);
    {
        let mut m = open(&mid, OpenOptions::read_write()).unwrap();
        m.write_at(&[2u8; 1024], MIB + 512).unwrap();
        m.flush().unwrap();
    }
    child(&top, &mid);
    let mut t = open(&top, OpenOptions::read_write()).unwrap();
    assert_eq!(
        t.backing_chain(),
        vec![top.clone(), mid.clone(), base.clone()]
    );
    // Read-modify-write copies the whole sector [MIB + 1024, MIB + 1536) up into the top.
    t.write_at(&[3u8; 100], MIB + 1300).unwrap();

    let mut buf = vec![0u8; 4096];
    t.read_at(&mut buf, MIB).unwrap();
    assert!(buf[..512].iter().all(|&b| b == 1));
    assert!(buf[512..1300].iter().all(|&b| b == 2));
    assert!(buf[1300..1400].iter().all(|&b| b == 3));
    assert!(buf[1400..1536].iter().all(|&b| b == 2));
    assert!(buf[1536..].iter().all(|&b| b == 1));

    let map = t.map(MIB, 4096).unwrap();
    let depth_at = |off: u64| {
        map.iter()
            .find(|e| e.offset <= off && off < e.end())
            .map(|e| (e.depth, e.data))
            .unwrap()
    };
    assert_eq!(depth_at(MIB), (2, true));
    assert_eq!(depth_at(MIB + 600), (1, true));
    assert_eq!(depth_at(MIB + 1024), (0, true));
    assert_eq!(depth_at(MIB + 1535), (0, true));
    assert_eq!(depth_at(MIB + 2000), (2, true));
    // Nothing anywhere: zeros, reported at the bottom layer.
    let far = t.map(3 * MIB, 4096).unwrap();
    assert_eq!(far.len(), 1);
    assert!(!far[0].data && far[0].zero && far[0].depth == 2, "{far:?}");
}

#[test]
fn missing_parent_error_lists_every_path_tried() {
    let d = tmp();
    let (parent, c) = (d.path().join("parent.vhd"), d.path().join("child.vhd"));
    dynamic(&parent, 4 * MIB);
    child(&c, &parent);
    std::fs::remove_file(&parent).unwrap();
    let e = open(&c, OpenOptions::read_only()).unwrap_err();
    let Error::ParentNotFound { tried, .. } = &e else {
        panic!("expected ParentNotFound, got {e}");
    };
    assert!(!tried.is_empty());
    let msg = e.to_string();
    for p in tried {
        assert!(msg.contains(&p.display().to_string()), "{msg} lacks {p:?}");
    }
    assert!(e.is_chain_error());
}

#[test]
fn replaced_parent_is_a_uuid_mismatch() {
    let d = tmp();
    let (parent, c) = (d.path().join("parent.vhd"), d.path().join("child.vhd"));
    dynamic(&parent, 4 * MIB);
    child(&c, &parent);
    std::fs::remove_file(&parent).unwrap();
    dynamic(&parent, 4 * MIB);
    let e = open(&c, OpenOptions::read_only()).unwrap_err();
    assert!(matches!(e, Error::ParentMismatch { .. }), "{e}");
    assert_eq!(e.kind(), ErrorKind::ParentMismatch);
}

#[test]
fn raw_file_in_place_of_parent_is_refused() {
    let d = tmp();
    let (parent, c) = (d.path().join("parent.vhd"), d.path().join("child.vhd"));
    dynamic(&parent, 4 * MIB);
    child(&c, &parent);
    std::fs::write(&parent, vec![0u8; 4 << 20]).unwrap();
    let e = open(&c, OpenOptions::read_only()).unwrap_err();
    assert!(matches!(e, Error::ParentFormat { .. }), "{e}");
}

#[test]
fn chain_that_loops_back_is_a_cycle_error() {
    // a <- b <- c, then c is moved onto a's path: opening it finds b, whose parent is c itself.
    let d = tmp();
    let (a, b, c) = (
        d.path().join("a.vhd"),
        d.path().join("b.vhd"),
        d.path().join("c.vhd"),
    );
    dynamic(&a, 4 * MIB);
    child(&b, &a);
    child(&c, &b);
    std::fs::rename(&c, &a).unwrap();
    let e = open(&a, OpenOptions::read_only()).unwrap_err();
    assert!(matches!(e, Error::ChainCycle { .. }), "{e}");
}

#[test]
fn chain_deeper_than_the_bound_is_refused() {
    let d = tmp();
    let mut paths: Vec<PathBuf> = vec![d.path().join("l0.vhd")];
    dynamic(&paths[0], MIB);
    for i in 1..=block_backend::MAX_CHAIN_DEPTH {
        let p = d.path().join(format!("l{i}.vhd"));
        child(&p, &paths[i - 1]);
        paths.push(p);
    }
    // MAX_CHAIN_DEPTH layers open; one more is refused.
    let ok = open(
        &paths[block_backend::MAX_CHAIN_DEPTH - 1],
        OpenOptions::read_only(),
    )
    .unwrap();
    assert_eq!(ok.backing_chain().len(), block_backend::MAX_CHAIN_DEPTH);
    let e = open(
        &paths[block_backend::MAX_CHAIN_DEPTH],
        OpenOptions::read_only(),
    )
    .unwrap_err();
    assert!(matches!(e, Error::ChainTooDeep { .. }), "{e}");
}

#[test]
fn read_only_open_refuses_writes_and_leaves_files_untouched() {
    let d = tmp();
    let (parent, c) = (d.path().join("parent.vhd"), d.path().join("child.vhd"));
    dynamic(&parent, 4 * MIB);
    child(&c, &parent);
    let before = (std::fs::read(&parent).unwrap(), std::fs::read(&c).unwrap());
    {
        let mut disk = open(&c, OpenOptions::read_only()).unwrap();
        assert!(disk.is_read_only());
        let mut buf = vec![0u8; 65536];
        disk.read_at(&mut buf, 0).unwrap();
        let e = disk.write_at(&[1], 0).unwrap_err();
        assert_eq!(e.kind(), ErrorKind::ReadOnly);
        assert_eq!(
            disk.discard(0, 512).unwrap_err().kind(),
            ErrorKind::ReadOnly
        );
        disk.flush().unwrap();
        disk.map(0, 4 * MIB).unwrap();
    }
    let after = (std::fs::read(&parent).unwrap(), std::fs::read(&c).unwrap());
    assert!(before == after, "a read-only open changed a file");
}

#[test]
fn discard_of_whole_dynamic_block_unallocates_it() {
    let d = tmp();
    let p = d.path().join("d.vhd");
    dynamic(&p, 4 * MIB);
    let mut disk = open(&p, OpenOptions::read_write()).unwrap();
    disk.write_at(&vec![9u8; 2 * MIB as usize], 0).unwrap();
    disk.discard(512 << 10, 512 << 10).unwrap();
    let map = disk.map(0, 2 * MIB).unwrap();
    let hole: Vec<_> = map.iter().filter(|e| !e.data).collect();
    assert_eq!(hole.len(), 1, "{map:?}");
    assert_eq!((hole[0].offset, hole[0].length), (512 << 10, 512 << 10));
}

#[test]
fn raw_map_reports_holes_of_sparse_files() {
    let d = tmp();
    let p = d.path().join("sparse.img");
    let f = std::fs::File::create(&p).unwrap();
    f.set_len(16 * MIB).unwrap();
    drop(f);
    let mut disk = open(&p, OpenOptions::read_write()).unwrap();
    disk.write_at(&[1u8; 4096], 8 * MIB).unwrap();
    disk.flush().unwrap();
    let map = disk.map(0, 16 * MIB).unwrap();
    let data: Vec<_> = map.iter().filter(|e| e.data).collect();
    assert!(!data.is_empty());
    // Whatever granularity the file system uses, the written range is data, and the start
    // of the file (never written) is a hole on any file system that reports holes.
    assert!(data
        .iter()
        .any(|e| e.offset <= 8 * MIB && e.end() >= 8 * MIB + 4096));
    if map.len() > 1 {
        assert!(!map[0].data && map[0].zero);
    }
}

#[test]
fn leading_extent_runs_through_blocks_adjacent_in_the_file_and_stops_at_zeros_or_a_parent() {
    use std::os::unix::fs::FileExt;
    let d = tmp();
    // VHDX blocks written in order lie back to back in the file: one run across them.
    let x = d.path().join("d.vhdx");
    let opts = vhdx::CreateOptions {
        size: 8 * MIB,
        block_size: Some(MIB as u32),
        ..Default::default()
    };
    vhdx::VhdxImage::create(&x, &opts).unwrap().close().unwrap();
    let bytes: Vec<u8> = (0..3 * MIB).map(|i| (i % 251) as u8).collect();
    let mut v = open(&x, OpenOptions::read_write()).unwrap();
    v.write_at(&bytes, 0).unwrap();
    let (f, at, n) = v.leading_extent(4096, 4 * MIB).unwrap().expect("data");
    assert_eq!(
        n,
        3 * MIB - 4096,
        "through blocks 0..3, up to the unallocated block 3"
    );
    let mut got = vec![0u8; n as usize];
    f.read_exact_at(&mut got, at).unwrap();
    assert_eq!(got, bytes[4096..]);
    drop(v);

    let (base, top) = (d.path().join("base.vhd"), d.path().join("top.vhd"));
    dynamic(&base, 4 * MIB);
    let data: Vec<u8> = (0..MIB + 4096).map(|i| (i % 253) as u8).collect();
    {
        // Blocks 0, 1 and 2 (512 KiB each) allocated in that order: one run in the file.
        let mut b = open(&base, OpenOptions::read_write()).unwrap();
        b.write_at(&data, 4096).unwrap();
        b.flush().unwrap();
    }
    let mut b = open(&base, OpenOptions::read_only()).unwrap();
    let check = |file: &std::fs::File, at: u64, n: u64, from: u64| {
        let mut got = vec![0u8; n as usize];
        file.read_exact_at(&mut got, at).unwrap();
        let start = (from - 4096) as usize;
        assert_eq!(
            got,
            data[start..start + n as usize],
            "run from disk offset {from}"
        );
    };
    // A VHD puts each block's sector bitmap before its data: runs end at block boundaries.
    let (f, at, n) = b.leading_extent(4096, MIB).unwrap().expect("data");
    assert_eq!(n, 512 * 1024 - 4096, "run ends at the block boundary");
    check(f, at, n, 4096);
    // Block 2 is allocated whole (the rest of it reads from the file as zeros); the run stops
    // at its end, before the unallocated block 3.
    let (f, at, n) = b
        .leading_extent(MIB + 512 * 1024 - 4096, MIB)
        .unwrap()
        .expect("data");
    assert_eq!(n, 4096);
    let mut got = [1u8; 4096];
    f.read_exact_at(&mut got, at).unwrap();
    assert_eq!(got, [0u8; 4096]);
    let (f, at, n) = b.leading_extent(MIB, 8192).unwrap().expect("data");
    check(f, at, n, MIB);
    // Starting in an unallocated block: none.
    assert!(b.leading_extent(3 * MIB, 4096).unwrap().is_none());
    assert!(b.leading_extent(2 * MIB - 4096, 8192).unwrap().is_none());
    drop(b);
    // A child's own sector ends a run that continues in its parent.
    child(&top, &base);
    let mut t = open(&top, OpenOptions::read_write()).unwrap();
    t.write_at(&[9u8; 512], 8192).unwrap();
    let (_, _, n) = t.leading_extent(4096, 8192).unwrap().expect("parent data");
    assert_eq!(n, 4096, "parent's run stops at the child's sector");
    let (f, at, n) = t.leading_extent(8192, 4096).unwrap().expect("child data");
    assert_eq!(n, 512);
    let mut got = [0u8; 512];
    f.read_exact_at(&mut got, at).unwrap();
    assert_eq!(got, [9u8; 512]);
}
