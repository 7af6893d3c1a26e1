//! Hot paths: resolving a 4 KiB read through the VHD and VHDX block tables (fully allocated
//! images held in memory), and validating a virtio-blk request.

use criterion::{black_box, criterion_group, criterion_main, Criterion};
use image_io::{CrashFile, ImageFile};
use std::path::Path;
use virtio_queue::desc::split::Descriptor;
use vm_memory::{GuestAddress, GuestMemoryMmap};

const SIZE: u64 = 256 << 20;

fn vhd_image() -> vhd::VhdImage<CrashFile> {
    let opts = vhd::CreateOptions {
        size: SIZE,
        ..Default::default()
    };
    let mut img =
        vhd::VhdImage::create_in(CrashFile::new(), Path::new("b.vhd"), &opts, None).unwrap();
    img.set_durability(vhd::Durability::Relaxed);
    for block in 0..SIZE / (2 << 20) {
        let plan = img.resolve_write(block * (2 << 20), 4096).unwrap();
        for e in &plan.extents {
            img.file().write_all_at(&[1; 4096], e.file_offset).unwrap();
        }
        img.commit_write(plan).unwrap();
    }
    img
}

fn vhdx_image() -> vhdx::VhdxImage<CrashFile> {
    let opts = vhdx::CreateOptions {
        size: SIZE,
        block_size: Some(1 << 20),
        ..Default::default()
    };
    let mut img =
        vhdx::VhdxImage::create_in(CrashFile::new(), Path::new("b.vhdx"), &opts, None).unwrap();
    img.set_durability(vhdx::Durability::Relaxed);
    for block in 0..SIZE / (1 << 20) {
        let plan = img.resolve_write(block << 20, 4096).unwrap();
        img.commit_write(plan).unwrap();
    }
    img
}

fn resolve(c: &mut Criterion) {
    let mut v = vhd_image();
    let mut x = vhdx_image();
    let mut n = 0u64;
    c.bench_function("vhd resolve_read 4K", |b| {
        b.iter(|| {
            n = n
                .wrapping_mul(6364136223846793005)
                .wrapping_add(1442695040888963407);
            black_box(
                v.resolve_read((n >> 20) % (SIZE / 4096) * 4096, 4096)
                    .unwrap(),
            )
        })
    });
    c.bench_function("vhdx resolve_read 4K", |b| {
        b.iter(|| {
            n = n
                .wrapping_mul(6364136223846793005)
                .wrapping_add(1442695040888963407);
            black_box(
                x.resolve_read((n >> 20) % (SIZE / 4096) * 4096, 4096)
                    .unwrap(),
            )
        })
    });
}

fn parse(c: &mut Criterion) {
    use block_backend::virtio_blk::request::{parse, Limits};
    let mem = GuestMemoryMmap::<()>::from_ranges(&[(GuestAddress(0), 4 << 20)]).unwrap();
    let descs = [
        Descriptor::new(0x1000, 16, 1, 1),
        Descriptor::new(0x10000, 4096, 3, 2),
        Descriptor::new(0x2000, 1, 2, 0),
    ];
    let limits = Limits {
        capacity: 1 << 30,
        seg_max: 128,
        size_max: 1 << 20,
        max_discard_seg: 1,
    };
    c.bench_function("virtio-blk parse 4K read", |b| {
        b.iter(|| black_box(parse(black_box(&descs), &mem, &limits).unwrap()))
    });
}

criterion_group!(benches, resolve, parse);
criterion_main!(benches);
