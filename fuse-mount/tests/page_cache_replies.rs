//! Mounts reply straight from the page cache of the image files, spliced through a pipe (any
//! disk) or from a mapping (read-only disks): the reply carries exactly what the disk reads as,
//! only single-extent ranges go this way, a reply that does not fit the pipe is refused before
//! anything is written, a reply of a writable disk keeps its bytes while the range is discarded
//! and reused, and a file truncated under the mount makes the read fall back instead of sending
//! short data or raising SIGBUS.

use std::os::fd::AsRawFd;
use std::path::Path;

use block_backend::{open, Disk, OpenOptions};
use fuse_mount::fs::{SharedDisk, SharedOptions};
use fuse_mount::spliced::ReplyPipe;

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
    // Crossing from block 1 into block 2, which one write allocated back to back in the
    // file: one run, mapped. From data into an unallocated block, or wholly unallocated:
    // never mapped.
    let (m, at) = ro
        .read_mapped(2 * MIB - 4096, 8192)
        .unwrap()
        .expect("adjacent blocks: one run");
    assert_eq!(
        m.get(at, 8192).unwrap(),
        &data[MIB as usize - 4096..MIB as usize + 4096]
    );
    assert!(ro.read_mapped(3 * MIB - 4096, 8192).unwrap().is_none());
    assert!(ro.read_mapped(5 * MIB, 4096).unwrap().is_none());
    // A writable disk is never mapped. (A mapping holds the image open, and so its lock.)
    drop(m);
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

/// Reads what `pipe` holds now (it must hold exactly `len` bytes, or this blocks).
fn drain(pipe: &ReplyPipe, len: usize) -> Vec<u8> {
    let mut out = vec![0u8; len];
    let mut got = 0;
    while got < len {
        // SAFETY: reads into the unfilled tail of a live buffer.
        let n = unsafe {
            libc::read(
                pipe.reader().as_raw_fd(),
                out[got..].as_mut_ptr().cast(),
                len - got,
            )
        };
        assert!(n > 0, "pipe ended after {got} of {len} bytes");
        got += n as usize;
    }
    out
}

#[test]
fn spliced_replies_carry_the_reply_header_and_exactly_the_disk_bytes() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("d.vhdx");
    let data = vhdx_with_data(&path);
    let ro = shared(&path, true);
    let mut pipe = ReplyPipe::new(MIB as usize).unwrap();
    let mut unique = 40u64;
    for (offset, len) in [
        (MIB, 4096usize),
        (MIB + 512, 65536),
        (MIB + 100, 3),
        (2 * MIB, 255 * 4096),
        (2 * MIB, MIB as usize),
    ] {
        unique += 2;
        if !pipe.fits(offset, len) {
            // A 1 MiB reply needs a 2 MiB pipe, which fs.pipe-max-size may not allow.
            assert!(!ro.read_spliced(offset, len, unique, &mut pipe).unwrap());
            assert!(pipe.is_empty(), "refused before writing anything");
            continue;
        }
        assert!(
            ro.read_spliced(offset, len, unique, &mut pipe).unwrap(),
            "one extent: spliced ({offset}+{len})"
        );
        let reply = drain(&pipe, 16 + len);
        assert!(pipe.is_empty(), "nothing past the reply");
        assert_eq!(reply[0..4], ((16 + len) as u32).to_ne_bytes(), "length");
        assert_eq!(reply[4..8], 0i32.to_ne_bytes(), "no error");
        assert_eq!(reply[8..16], unique.to_ne_bytes(), "request id");
        let want = &data[(offset - MIB) as usize..(offset - MIB) as usize + len];
        assert!(reply[16..] == *want, "{offset}+{len}: bytes differ");
    }
    // Unallocated (reads as zeros, no file bytes), or from data into an unallocated block.
    assert!(!ro.read_spliced(5 * MIB, 4096, 1, &mut pipe).unwrap());
    assert!(!ro.read_spliced(3 * MIB - 4096, 8192, 1, &mut pipe).unwrap());
    assert!(pipe.is_empty());
}

/// A writable disk splices too: a reply carries what was written before it, and the page
/// references it holds keep the bytes it was given even when the range is discarded and the
/// file space may go to another block right after (never another block's bytes).
#[test]
fn writable_disks_splice_what_was_written_and_a_reply_keeps_its_bytes() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("d.vhdx");
    vhdx_with_data(&path);
    let rw = shared(&path, false);
    let mine = vec![0xA1u8; MIB as usize];
    rw.write_at(&mine, MIB).unwrap();
    let mut pipe = ReplyPipe::new(MIB as usize).unwrap();
    assert!(rw.read_spliced(MIB + 4096, 8192, 3, &mut pipe).unwrap());
    assert!(drain(&pipe, 16 + 8192)[16..].iter().all(|&b| b == 0xA1));
    // A reply sits in the pipe while block 1 is discarded and a new block is written.
    assert!(rw.read_spliced(MIB, 65536, 4, &mut pipe).unwrap());
    rw.discard(MIB, MIB).unwrap();
    rw.write_at(&vec![0xB2u8; MIB as usize], 6 * MIB).unwrap();
    let reply = drain(&pipe, 16 + 65536);
    assert!(
        reply[16..].iter().all(|&b| b == 0xA1) || reply[16..].iter().all(|&b| b == 0),
        "a reply made before the discard shows its bytes or zeros, never the new block's"
    );
    let mut now = vec![1u8; 4096];
    rw.read_at(&mut now, MIB).unwrap();
    assert!(now.iter().all(|&b| b == 0), "discarded");
    // Zeros of the discarded block are not in one file extent: not spliced.
    assert!(!rw.read_spliced(MIB, 4096, 5, &mut pipe).unwrap());
    // A writable disk is still never mapped.
    assert!(rw.read_mapped(6 * MIB, 4096).unwrap().is_none());
}

#[test]
fn a_reply_larger_than_the_pipe_is_refused_before_anything_is_written() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("d.raw");
    std::fs::write(&path, vec![0x33u8; 4 * MIB as usize]).unwrap();
    let ro = shared(&path, true);
    let mut small = ReplyPipe::new(64 * 1024).unwrap();
    assert!(small.fits(0, 64 * 1024));
    assert!(!small.fits(0, MIB as usize));
    assert!(!ro.read_spliced(MIB, MIB as usize, 7, &mut small).unwrap());
    assert!(small.is_empty());
    assert!(ro.read_spliced(MIB + 1, 64 * 1024, 7, &mut small).unwrap());
    assert!(drain(&small, 16 + 64 * 1024)[16..]
        .iter()
        .all(|&b| b == 0x33));
}

#[test]
fn a_file_truncated_under_the_mount_is_not_spliced_short() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("d.raw");
    std::fs::write(&path, vec![0x5Au8; 4 * MIB as usize]).unwrap();
    let ro = shared(&path, true);
    let mut pipe = ReplyPipe::new(MIB as usize).unwrap();
    assert!(ro.read_spliced(2 * MIB, 4096, 9, &mut pipe).unwrap());
    drain(&pipe, 16 + 4096);
    std::fs::OpenOptions::new()
        .write(true)
        .open(&path)
        .unwrap()
        .set_len(2 * MIB + 1024)
        .unwrap();
    // Part of the range is gone: refused (the caller drops this pipe and reads another way,
    // which reports the error), never a reply with fewer bytes than its header says.
    assert!(!ro.read_spliced(2 * MIB, 4096, 10, &mut pipe).unwrap());
    assert!(
        !pipe.is_empty(),
        "its header went in: this pipe must not carry the next reply"
    );
    assert!(ro
        .read_spliced(MIB, 4096, 11, &mut ReplyPipe::new(MIB as usize).unwrap())
        .unwrap());
}
