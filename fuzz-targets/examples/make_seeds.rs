//! Rebuilds the seed inputs of every fuzz target: `fuzz/seeds.sh` runs
//! `cargo run -p vhdkit-fuzz-targets --example make_seeds -- <out dir>` (default
//! `fuzz/corpus`), which writes `<out>/<target>/seed-*`.
//!
//! Seeds come from the real images in the test image folder (`VHDKIT_TEST_IMAGES`, `.xz`
//! decompressed; skipped with a note when absent) and from images created here: VHD fixed,
//! dynamic and differencing, VHDX dynamic, fixed, 4K-sector and differencing, one with a pending
//! log, each holding some written data. Large files are [`sparse`]-encoded. UUIDs are random, so
//! a rebuild gives equivalent, not identical, seeds.

use block_backend::{Disk, OpenOptions};
use image_io::CrashFile;
use std::path::{Path, PathBuf};
use vhdkit_fuzz_targets::sparse;

fn main() {
    let out = std::env::args_os()
        .nth(1)
        .map(PathBuf::from)
        .unwrap_or_else(|| Path::new(env!("CARGO_MANIFEST_DIR")).join("../fuzz/corpus"));
    let mut seeds = Seeds { out, count: 0 };
    // `make_seeds <out> virtio_blk`: only that target's seeds (no images needed).
    if std::env::args().nth(2).as_deref() == Some("virtio_blk") {
        virtio_seeds(&mut seeds);
        eprintln!("wrote {} seeds under {}", seeds.count, seeds.out.display());
        return;
    }
    // `make_seeds <out> migration_stream`: only the migration streams.
    if std::env::args().nth(2).as_deref() == Some("migration_stream") {
        migration_seeds(&mut seeds);
        eprintln!("wrote {} seeds under {}", seeds.count, seeds.out.display());
        return;
    }
    // `make_seeds <out> nbd_server`: only the NBD client sessions.
    if std::env::args().nth(2).as_deref() == Some("nbd_server") {
        nbd_seeds(&mut seeds);
        eprintln!("wrote {} seeds under {}", seeds.count, seeds.out.display());
        return;
    }
    let work = tempdir();
    real_images(&mut seeds);
    created_vhd(&mut seeds, &work);
    created_vhdx(&mut seeds, &work);
    pairs(&mut seeds, &work);
    log_seeds(&mut seeds);
    oracle_seeds(&mut seeds);
    virtio_seeds(&mut seeds);
    nbd_seeds(&mut seeds);
    migration_seeds(&mut seeds);
    let _ = std::fs::remove_dir_all(&work);
    eprintln!("wrote {} seeds under {}", seeds.count, seeds.out.display());
}

struct Seeds {
    out: PathBuf,
    count: usize,
}

impl Seeds {
    fn put(&mut self, target: &str, name: &str, bytes: &[u8]) {
        let dir = self.out.join(target);
        std::fs::create_dir_all(&dir).expect("create the corpus directory");
        std::fs::write(dir.join(format!("seed-{name}")), bytes).expect("write a seed");
        self.count += 1;
    }

    /// A file as two seeds: raw or sparse-encoded (whichever is smaller), and sparse-encoded
    /// with the "recompute checksums" magic, so mutations of it reach past the checksums.
    fn put_file(&mut self, target: &str, name: &str, file: &[u8]) {
        let enc = sparse::encode(file);
        if enc.len() < file.len() {
            self.put(target, name, &enc);
        } else {
            self.put(target, name, file);
        }
        self.put(target, &format!("{name}-resealed"), &resealed(enc));
    }
}

fn tempdir() -> PathBuf {
    let d = std::env::temp_dir().join(format!("vhdkit-seeds-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&d);
    std::fs::create_dir_all(&d).expect("create a work directory");
    d
}

fn pattern(seed: u8, len: usize) -> Vec<u8> {
    (0..len)
        .map(|i| (i as u8).wrapping_mul(31).wrapping_add(seed) | 1)
        .collect()
}

fn read_image(path: &Path) -> Vec<u8> {
    let raw = std::fs::read(path).expect("read a test image");
    if path.extension().is_some_and(|e| e == "xz") {
        let mut out = Vec::new();
        std::io::Read::read_to_end(
            &mut xz2::read::XzDecoder::new_multi_decoder(&raw[..]),
            &mut out,
        )
        .expect("decompress a test image");
        out
    } else {
        raw
    }
}

fn real_images(seeds: &mut Seeds) {
    let Some(dir) = vhdkit_tests::test_images_dir() else {
        eprintln!("note: no test image folder; real-image seeds skipped");
        return;
    };
    for rel in [
        "go-vhd/win8.vhd",
        "go-vhd/win8.1-1GB.vhd",
        "go-vhd/win8-child.vhd",
        "go-vhd/vbox.vhd",
        "go-vhd/xapi.vhd",
        "go-vhd/qemu.vhd",
        "dfvfs/ext2.vhd.xz",
        "dfvfs/image.vhd.xz",
        "dfvfs/image-differential.vhd.xz",
        "dfvfs/fat-differential.vhd.xz",
        "vhd-crate/ntfs_fixed.vhd.xz",
        "libvhdi-fragments/file_footer.1",
    ] {
        let mut bytes = read_image(&dir.join(rel));
        if rel.contains("fixed") {
            // Keep the start of the data and the footer: a valid fixed image of zeros.
            let n = bytes.len();
            bytes[64 << 10..n - 512].fill(0);
        }
        let name = rel.replace(['/', '.'], "_");
        seeds.put_file("vhd_open", &format!("real-{name}"), &bytes);
    }
    // A child and its real parent, as a pair.
    let child = read_image(&dir.join("go-vhd/win8-child.vhd"));
    let parent = read_image(&dir.join("go-vhd/win8.vhd"));
    seeds.put("diff_pair", "real-win8-child", &pair(0, &child, &parent));
}

/// A `diff_pair` input.
fn pair(kind: u8, child: &[u8], parent: &[u8]) -> Vec<u8> {
    let (c, p) = (encode_if_large(child), encode_if_large(parent));
    let mut v = vec![kind];
    v.extend_from_slice(&(c.len() as u32).to_le_bytes());
    v.extend_from_slice(&c);
    v.extend_from_slice(&p);
    v
}

/// A pair member: always sparse-encoded with the "recompute checksums" magic.
fn encode_if_large(file: &[u8]) -> Vec<u8> {
    resealed(sparse::encode(file))
}

/// `enc` (sparse-encoded) marked to have its checksums recomputed after decoding.
fn resealed(mut enc: Vec<u8>) -> Vec<u8> {
    enc[..4].copy_from_slice(sparse::MAGIC_RESEALED);
    enc
}

/// Writes a few patterns into the disk at `path` (through the backend, as vhdtool would).
fn scribble(path: &Path, seed: u8, spots: &[(u64, usize)]) {
    let mut disk = block_backend::open(path, OpenOptions::read_write()).expect("open to write");
    for (i, &(at, len)) in spots.iter().enumerate() {
        disk.write_at(&pattern(seed.wrapping_add(i as u8), len), at)
            .expect("write");
    }
    disk.flush().expect("flush");
}

fn created_vhd(seeds: &mut Seeds, work: &Path) {
    let mk = |name: &str, size: u64, vhd_type, block_size, parent: Option<PathBuf>| {
        let path = work.join(name);
        let opts = vhd::CreateOptions {
            size,
            vhd_type,
            block_size,
            sparse: false,
            parent,
        };
        drop(vhd::VhdImage::create(&path, &opts).expect("create a VHD"));
        path
    };
    let dynamic = mk("dyn.vhd", 3 << 20, vhd::VhdType::Dynamic, 64 << 10, None);
    scribble(
        &dynamic,
        1,
        &[(0, 1024), (131_000, 2000), ((3 << 20) - 512, 512)],
    );
    let small = mk(
        "small.vhd",
        (1 << 20) + 3 * 512,
        vhd::VhdType::Dynamic,
        4096,
        None,
    );
    scribble(&small, 2, &[(512, 5000)]);
    let fixed = mk("fixed.vhd", 64 << 10, vhd::VhdType::Fixed, 2 << 20, None);
    scribble(&fixed, 3, &[(1000, 3000)]);
    let empty = mk("empty.vhd", 40 << 20, vhd::VhdType::Dynamic, 2 << 20, None);
    let child = mk(
        "child.vhd",
        0,
        vhd::VhdType::Dynamic,
        64 << 10,
        Some(dynamic.clone()),
    );
    scribble(&child, 4, &[(700, 1300), ((2 << 20) - 1024, 2048)]);
    for (name, p) in [
        ("dynamic", &dynamic),
        ("dynamic-4k-blocks", &small),
        ("fixed", &fixed),
        ("empty-40m", &empty),
        ("differencing", &child),
    ] {
        seeds.put_file(
            "vhd_open",
            &format!("created-{name}"),
            &std::fs::read(p).unwrap(),
        );
    }
}

fn created_vhdx(seeds: &mut Seeds, work: &Path) {
    let mk = |name: &str, opts: vhdx::CreateOptions| {
        let path = work.join(name);
        drop(vhdx::VhdxImage::create(&path, &opts).expect("create a VHDX"));
        path
    };
    let base = vhdx::CreateOptions {
        size: 8 << 20,
        block_size: Some(1 << 20),
        ..Default::default()
    };
    let dynamic = mk("dyn.vhdx", base.clone());
    scribble(
        &dynamic,
        5,
        &[(0, 4096), ((2 << 20) - 2048, 4096), ((8 << 20) - 512, 512)],
    );
    let k4 = mk(
        "4k.vhdx",
        vhdx::CreateOptions {
            logical_sector_size: 4096,
            ..base.clone()
        },
    );
    scribble(&k4, 6, &[(8192, 12288)]);
    let fixed = mk(
        "fixed.vhdx",
        vhdx::CreateOptions {
            size: 2 << 20,
            fixed: true,
            ..base.clone()
        },
    );
    scribble(&fixed, 7, &[(4096, 4096)]);
    let big_blocks = mk(
        "32m.vhdx",
        vhdx::CreateOptions {
            size: 100 << 20,
            block_size: None,
            ..base.clone()
        },
    );
    let child = mk(
        "child.vhdx",
        vhdx::CreateOptions {
            parent: Some(dynamic.clone()),
            block_size: Some(1 << 20),
            ..Default::default()
        },
    );
    scribble(&child, 8, &[(512, 1024), ((3 << 20) - 1024, 2048)]);
    for (name, p) in [
        ("dynamic", &dynamic),
        ("4k-sectors", &k4),
        ("fixed", &fixed),
        ("32m-blocks", &big_blocks),
        ("differencing", &child),
    ] {
        seeds.put_file(
            "vhdx_open",
            &format!("created-{name}"),
            &std::fs::read(p).unwrap(),
        );
    }
    seeds.put_file("vhdx_open", "pending-log", &pending_log_image().0);
}

/// A VHDX whose power went out after a flush: its header points at a log to replay. Also
/// returns the log GUID.
fn pending_log_image() -> (Vec<u8>, uuid::Uuid) {
    let f = CrashFile::new();
    let opts = vhdx::CreateOptions {
        size: 4 << 20,
        block_size: Some(1 << 20),
        ..Default::default()
    };
    let mut img =
        vhdx::VhdxImage::create_in(f.clone(), Path::new("log.vhdx"), &opts, None).unwrap();
    for (i, at) in [0u64, 2 << 20].into_iter().enumerate() {
        let plan = img.resolve_write(at, 4096).unwrap();
        for e in &plan.extents {
            image_io::ImageFile::write_all_at(&f, &pattern(i as u8, e.len as usize), e.file_offset)
                .unwrap();
        }
        img.commit_write(plan).unwrap();
        img.flush().unwrap();
    }
    let guid = img.header().log_guid;
    std::mem::forget(img);
    (f.contents(), guid)
}

fn pairs(seeds: &mut Seeds, work: &Path) {
    for (kind, ext) in [(0u8, "vhd"), (1, "vhdx")] {
        let dir = work.join(format!("pair-{ext}"));
        std::fs::create_dir_all(&dir).unwrap();
        let parent = dir.join(format!("parent.{ext}"));
        let child = dir.join(format!("child.{ext}"));
        if ext == "vhd" {
            let o = vhd::CreateOptions {
                size: 2 << 20,
                block_size: 64 << 10,
                ..Default::default()
            };
            drop(vhd::VhdImage::create(&parent, &o).unwrap());
            scribble(&parent, 9, &[(0, 3000), (65_000, 2000)]);
            let o = vhd::CreateOptions {
                parent: Some(parent.clone()),
                block_size: 64 << 10,
                ..Default::default()
            };
            drop(vhd::VhdImage::create(&child, &o).unwrap());
        } else {
            let o = vhdx::CreateOptions {
                size: 4 << 20,
                block_size: Some(1 << 20),
                ..Default::default()
            };
            drop(vhdx::VhdxImage::create(&parent, &o).unwrap());
            scribble(&parent, 9, &[(0, 3000), ((1 << 20) - 512, 2048)]);
            let o = vhdx::CreateOptions {
                parent: Some(parent.clone()),
                block_size: Some(1 << 20),
                ..Default::default()
            };
            drop(vhdx::VhdxImage::create(&child, &o).unwrap());
        }
        scribble(&child, 10, &[(1024, 3072), (65_000, 1000)]);
        let (c, p) = (
            std::fs::read(&child).unwrap(),
            std::fs::read(&parent).unwrap(),
        );
        seeds.put("diff_pair", &format!("{ext}-pair"), &pair(kind, &c, &p));
        // The child as its own parent: a cycle.
        seeds.put("diff_pair", &format!("{ext}-self"), &pair(kind, &c, &c));
    }
}

fn log_seeds(seeds: &mut Seeds) {
    let (image, guid) = pending_log_image();
    // Scan mode: GUID + the used start of the 1 MiB log region at 1 MiB.
    let mut v = vec![0u8];
    v.extend_from_slice(guid.as_bytes());
    v.extend_from_slice(&image[1 << 20..(1 << 20) + (32 << 10)]);
    seeds.put("vhdx_log", "scan-pending", &v);
    // Round-trip mode: a few entry plans.
    for (i, plan) in [
        &[7u8, 1, 0, 0, 0, 0, 0, 0, 0, 0, 2, 3][..],
        &[47, 40, 9, 9, 9, 9, 9, 9, 9, 9, 3, 7, 1, 2, 3, 4][..],
    ]
    .iter()
    .enumerate()
    {
        let mut v = vec![1u8];
        v.extend_from_slice(uuid::Uuid::from_u128(0xfeed + i as u128).as_bytes());
        v.extend_from_slice(plan);
        v.extend_from_slice(&pattern(i as u8, 200));
        seeds.put("vhdx_log", &format!("build-{i}"), &v);
    }
}

fn oracle_seeds(seeds: &mut Seeds) {
    // kind byte (format/type in the low 3 bits, VHD block size choice in bits 4-5), trim, ops.
    let mut x = 0x2545_f491_4f6c_dd1du64;
    let mut next = || {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        x as u8
    };
    for kind in 0..8u8 {
        for variant in 0..2u8 {
            let mut v = vec![kind | variant << 4, variant * 3];
            for _ in 0..120 {
                v.push(next());
            }
            seeds.put("write_oracle", &format!("kind{kind}-{variant}"), &v);
        }
    }
}

/// Well-formed driver sessions (the encoding is defined next to the target).
fn virtio_seeds(seeds: &mut Seeds) {
    for (name, bytes) in vhdkit_fuzz_targets::virtio_blk_seeds() {
        seeds.put("virtio_blk", &name, &bytes);
    }
}

/// Well-formed migration streams (built next to the target).
fn migration_seeds(seeds: &mut Seeds) {
    for (name, bytes) in vhdkit_fuzz_targets::migration_stream_seeds() {
        let name = name.trim_start_matches("seed-");
        seeds.put("migration_stream", name, &bytes);
    }
}

/// Well-formed NBD client sessions (the encoding is defined next to the target).
fn nbd_seeds(seeds: &mut Seeds) {
    for (name, bytes) in vhdkit_fuzz_targets::nbd_server_seeds() {
        let name = name.trim_start_matches("seed-");
        seeds.put("nbd_server", name, &bytes);
    }
}
