//! `vhdtool compact --fs` end to end: real file systems made by their own tools (mke2fs through a
//! loop mount), files written and deleted, the disk converted to a dynamic VHDX with 2 MiB
//! blocks, then compacted by reading the allocation maps: the file gives back at least 90 % of
//! the deleted bytes, fsck finds nothing, every remaining file reads the same. Refusals leave
//! the image byte-identical.

mod support;
use support::{fails, json, ok, vhdtool_args as vhdtool, vhdtool_writer};

use std::ffi::OsStr;
use std::fs;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

use vhdkit_tests::{run, skip_unless_ci, tool_or_skip};

const MIB: u64 = 1 << 20;

/// Deterministic noise (xorshift), never compressible or zero.
fn noise(len: usize, seed: u64) -> Vec<u8> {
    let mut x = seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
    let mut v = Vec::with_capacity(len + 8);
    while v.len() < len {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        v.extend_from_slice(&x.to_le_bytes());
    }
    v.truncate(len);
    v
}

/// A loop device over `file` from `offset` for `len` bytes, detached on drop.
struct Loop(PathBuf);

impl Loop {
    fn attach(file: &Path, offset: u64, len: u64, read_only: bool) -> Option<Loop> {
        let mut c = Command::new("losetup");
        c.args([
            "-f",
            "--show",
            "-o",
            &offset.to_string(),
            "--sizelimit",
            &len.to_string(),
        ]);
        if read_only {
            c.arg("-r");
        }
        let o = c.arg(file).output().ok()?;
        if !o.status.success() {
            skip_unless_ci(&format!(
                "losetup failed: {}",
                String::from_utf8_lossy(&o.stderr).trim()
            ));
            return None;
        }
        Some(Loop(PathBuf::from(
            String::from_utf8_lossy(&o.stdout).trim(),
        )))
    }
}

impl Drop for Loop {
    fn drop(&mut self) {
        let _ = Command::new("losetup").arg("-d").arg(&self.0).status();
    }
}

/// A mount of a loop device, unmounted on drop.
struct Mount(PathBuf);

/// The driver that mounts a file system: the kernel's, or a FUSE one (`ntfs-3g`,
/// `mount.exfat-fuse`), for file systems the kernel here may lack.
fn driver(tool: &str) -> Option<&'static str> {
    if tool.contains("ntfs") {
        Some("ntfs-3g")
    } else if tool.contains("exfat") {
        Some("mount.exfat-fuse")
    } else {
        None
    }
}

impl Mount {
    fn with(driver: Option<&str>, dev: &Path, dir: &Path, opts: &str) -> Mount {
        fs::create_dir_all(dir).unwrap();
        let mut c = Command::new(driver.unwrap_or("mount"));
        c.args(["-o", opts]).arg(dev).arg(dir);
        run(c);
        Mount(dir.to_path_buf())
    }
}

impl Drop for Mount {
    fn drop(&mut self) {
        let _ = Command::new("umount").arg(&self.0).status();
    }
}

/// Where the file system lies on the raw disk.
#[derive(Clone, Copy)]
enum Layout {
    /// GPT, one partition from 1 MiB.
    Gpt,
    /// MBR, one primary partition from 1 MiB.
    Mbr,
    /// The whole disk (WSL's ext4.vhdx).
    Whole,
}

/// A raw disk of `size` with a file system made by `mkfs` (`mkfs` args, device appended),
/// `files` files of `file_mib` MiB written (synced: on disk) and all but every `keep_every`th deleted.
/// Returns the raw disk, the volume's offset and length, the kept files and deleted bytes.
struct Made {
    raw: PathBuf,
    offset: u64,
    len: u64,
    kept: Vec<(String, Vec<u8>)>,
    deleted: u64,
}

fn make_disk(
    dir: &Path,
    layout: Layout,
    size: u64,
    mkfs: &[&str],
    files: u64,
    file_mib: u64,
    keep_every: u64,
) -> Option<Made> {
    let raw = dir.join("disk.raw");
    fs::File::create(&raw).unwrap().set_len(size).unwrap();
    let (offset, len) = match layout {
        Layout::Whole => (0, size),
        Layout::Gpt | Layout::Mbr => {
            let label = if matches!(layout, Layout::Gpt) {
                "gpt"
            } else {
                "dos"
            };
            let sectors = (size - 2 * MIB) / 512;
            let script = format!("label: {label}\nstart=2048, size={sectors}, type=L\n");
            let mut c = Command::new("sfdisk");
            c.arg("-q").arg(&raw).stdin(Stdio::piped());
            let mut child = c.spawn().unwrap();
            use std::io::Write;
            child
                .stdin
                .take()
                .unwrap()
                .write_all(script.as_bytes())
                .unwrap();
            assert!(child.wait().unwrap().success());
            (MIB, sectors * 512)
        }
    };
    let lo = Loop::attach(&raw, offset, len, false)?;
    let mut c = Command::new(mkfs[0]);
    c.args(&mkfs[1..]).arg(&lo.0);
    run(c);
    let mnt = Mount::with(driver(mkfs[0]), &lo.0, &dir.join("mnt"), "rw");
    let mut kept = Vec::new();
    let mut deleted = 0;
    for i in 0..files {
        let data = noise((file_mib * MIB) as usize, i + 1);
        fs::write(mnt.0.join(format!("f{i}")), &data).unwrap();
        if i % keep_every == 0 {
            kept.push((format!("f{i}"), data));
        }
    }
    run(Command::new("sync"));
    for i in 0..files {
        if i % keep_every != 0 {
            fs::remove_file(mnt.0.join(format!("f{i}"))).unwrap();
            deleted += file_mib * MIB;
        }
    }
    drop(mnt);
    drop(lo);
    Some(Made {
        raw,
        offset,
        len,
        kept,
        deleted,
    })
}

/// Converts to a dynamic VHDX with 2 MiB blocks.
fn to_vhdx(raw: &Path, out: &Path) {
    ok(&vhdtool(&[
        OsStr::new("convert"),
        OsStr::new("-O"),
        OsStr::new("vhdx"),
        OsStr::new("--block-size"),
        OsStr::new("2M"),
        raw.as_os_str(),
        out.as_os_str(),
    ]));
}

/// Converts the image back to raw, runs `fsck` (args, device appended) on the volume, mounts it
/// read-only and compares every kept file.
fn verify(dir: &Path, img: &Path, m: &Made, fsck: &[&str], mount_opts: &str) {
    ok(&vhdtool(&[OsStr::new("check"), img.as_os_str()]));
    let back = dir.join("back.raw");
    let _ = fs::remove_file(&back);
    ok(&vhdtool(&[
        OsStr::new("convert"),
        OsStr::new("-O"),
        OsStr::new("raw"),
        img.as_os_str(),
        back.as_os_str(),
    ]));
    let lo = Loop::attach(&back, m.offset, m.len, true).unwrap();
    let mut c = Command::new(fsck[0]);
    c.args(&fsck[1..]).arg(&lo.0);
    run(c);
    let mnt = Mount::with(driver(fsck[0]), &lo.0, &dir.join("check"), mount_opts);
    for (name, data) in &m.kept {
        let got = fs::read(mnt.0.join(name)).unwrap();
        assert!(got == *data, "{name} changed");
    }
}

fn have_tools(tools: &[&str]) -> bool {
    tools.iter().all(|t| tool_or_skip(t))
}

/// Compacts with --fs and checks the space given back.
fn compact_gives_back(img: &Path, deleted: u64) -> serde_json::Value {
    let before = fs::metadata(img).unwrap().len();
    let v = json(&vhdtool(&[
        OsStr::new("compact"),
        OsStr::new("--fs"),
        OsStr::new("--json"),
        img.as_os_str(),
    ]));
    let after = fs::metadata(img).unwrap().len();
    assert_eq!(v["file-size-after"], after);
    assert!(
        (before - after) * 10 >= deleted * 9,
        "gave back {} of {deleted} deleted bytes: {v:#}",
        before - after
    );
    v
}

fn ext_round_trip(layout: Layout, mkfs: &[&str], want_type: &str, files: u64, file_mib: u64) {
    if !have_tools(&["losetup", "sfdisk", "mount", "mke2fs", "e2fsck"]) {
        return;
    }
    let d = tempfile::tempdir().unwrap();
    let Some(m) = make_disk(d.path(), layout, 256 * MIB, mkfs, files, file_mib, 8) else {
        return;
    };
    let img = d.path().join("disk.vhdx");
    to_vhdx(&m.raw, &img);
    let v = compact_gives_back(&img, m.deleted);
    let parts = v["partitions"].as_array().unwrap();
    assert_eq!(parts.len(), 1, "{v:#}");
    assert_eq!(parts[0]["type"], want_type);
    assert_eq!(parts[0]["offset"], m.offset);
    assert_eq!(parts[0]["size"], m.len);
    assert!(
        parts[0]["released"].as_u64().unwrap() >= m.deleted * 9 / 10,
        "{v:#}"
    );
    verify(d.path(), &img, &m, &["e2fsck", "-fn"], "ro");
}

#[test]
fn ext4_in_a_gpt_partition_of_a_dynamic_vhdx_gives_back_deleted_space() {
    ext_round_trip(Layout::Gpt, &["mkfs.ext4", "-q"], "ext4", 24, 8);
}

#[test]
fn ext4_on_the_whole_disk_wsl_layout_gives_back_deleted_space() {
    ext_round_trip(Layout::Whole, &["mkfs.ext4", "-q"], "ext4", 24, 8);
}

// ext2/3 keep each group's bitmaps and inode table at the group's start: with 1 KiB blocks
// (8 MiB groups, mke2fs's choice below 512 MiB) a quarter of the 2 MiB image blocks hold a
// bitmap, so these use 4 KiB blocks, as every ext2/3 of a real size has (fs-free's own tests
// cover 1 KiB blocks against dumpe2fs). Their block-mapped files do not start on 2 MiB
// boundaries, so each kept file pins up to two partly used image blocks: fewer, larger files.

#[test]
fn ext3_in_an_mbr_partition_gives_back_deleted_space() {
    ext_round_trip(
        Layout::Mbr,
        &["mkfs.ext3", "-q", "-b", "4096"],
        "ext3",
        12,
        16,
    );
}

#[test]
fn ext2_in_a_gpt_partition_gives_back_deleted_space() {
    ext_round_trip(
        Layout::Gpt,
        &["mkfs.ext2", "-q", "-b", "4096"],
        "ext2",
        12,
        16,
    );
}

/// mtools on the partition of a raw disk (`-i FILE@@OFFSET`): the kernel here may have no vfat.
fn mtools(tool: &str, raw: &Path, offset: u64, args: &[&OsStr]) -> std::process::Output {
    let mut c = Command::new(tool);
    let mut target = raw.as_os_str().to_os_string();
    target.push(format!("@@{offset}"));
    c.arg("-i").arg(target).args(args);
    run(c)
}

#[test]
fn fat32_in_an_mbr_partition_gives_back_deleted_space() {
    if !have_tools(&[
        "sfdisk",
        "mkfs.vfat",
        "fsck.vfat",
        "mcopy",
        "mdel",
        "losetup",
    ]) {
        return;
    }
    let d = tempfile::tempdir().unwrap();
    let raw = d.path().join("disk.raw");
    fs::File::create(&raw).unwrap().set_len(256 * MIB).unwrap();
    let sectors = (254 * MIB) / 512;
    let mut c = Command::new("sfdisk");
    c.arg("-q").arg(&raw).stdin(Stdio::piped());
    let mut child = c.spawn().unwrap();
    use std::io::Write;
    let script = format!("label: dos\nstart=2048, size={sectors}, type=c\n");
    child
        .stdin
        .take()
        .unwrap()
        .write_all(script.as_bytes())
        .unwrap();
    assert!(child.wait().unwrap().success());
    let (offset, len) = (MIB, sectors * 512);
    let Some(lo) = Loop::attach(&raw, offset, len, false) else {
        return;
    };
    let mut c = Command::new("mkfs.vfat");
    c.args(["-F", "32"]).arg(&lo.0);
    run(c);
    drop(lo);
    let (mut kept, mut deleted) = (Vec::new(), 0);
    for i in 0..12u64 {
        let data = noise((16 * MIB) as usize, i + 1);
        let p = d.path().join(format!("f{i}"));
        fs::write(&p, &data).unwrap();
        mtools(
            "mcopy",
            &raw,
            offset,
            &[p.as_os_str(), OsStr::new(&format!("::f{i}"))],
        );
        if i % 6 == 0 {
            kept.push((format!("f{i}"), data));
        }
    }
    for i in (0..12).filter(|i| i % 6 != 0) {
        mtools("mdel", &raw, offset, &[OsStr::new(&format!("::f{i}"))]);
        deleted += 16 * MIB;
    }
    let img = d.path().join("disk.vhdx");
    to_vhdx(&raw, &img);
    let v = compact_gives_back(&img, deleted);
    assert_eq!(v["partitions"][0]["type"], "fat32", "{v:#}");
    ok(&vhdtool(&[OsStr::new("check"), img.as_os_str()]));
    let back = d.path().join("back.raw");
    ok(&vhdtool(&[
        OsStr::new("convert"),
        OsStr::new("-O"),
        OsStr::new("raw"),
        img.as_os_str(),
        back.as_os_str(),
    ]));
    let lo = Loop::attach(&back, offset, len, true).unwrap();
    let mut c = Command::new("fsck.vfat");
    c.arg("-n").arg(&lo.0);
    run(c);
    drop(lo);
    for (name, data) in &kept {
        let out = d.path().join(format!("{name}.out"));
        mtools(
            "mcopy",
            &back,
            offset,
            &[OsStr::new(&format!("::{name}")), out.as_os_str()],
        );
        assert!(fs::read(&out).unwrap() == *data, "{name} changed");
    }
}

#[test]
fn exfat_in_a_gpt_partition_gives_back_deleted_space() {
    if !have_tools(&[
        "losetup",
        "sfdisk",
        "mount.exfat-fuse",
        "mkfs.exfat",
        "fsck.exfat",
    ]) {
        return;
    }
    let d = tempfile::tempdir().unwrap();
    let Some(m) = make_disk(d.path(), Layout::Gpt, 256 * MIB, &["mkfs.exfat"], 12, 16, 6) else {
        return;
    };
    let img = d.path().join("disk.vhdx");
    to_vhdx(&m.raw, &img);
    let v = compact_gives_back(&img, m.deleted);
    assert_eq!(v["partitions"][0]["type"], "exfat", "{v:#}");
    verify(d.path(), &img, &m, &["fsck.exfat", "-n"], "ro");
}

#[test]
fn ntfs_in_a_gpt_partition_gives_back_deleted_space() {
    if !have_tools(&["losetup", "sfdisk", "mkntfs", "ntfs-3g", "ntfsfix"]) {
        return;
    }
    let d = tempfile::tempdir().unwrap();
    let mkfs = ["mkntfs", "-q", "-Q", "-F"];
    let Some(m) = make_disk(d.path(), Layout::Gpt, 256 * MIB, &mkfs, 12, 16, 6) else {
        return;
    };
    let img = d.path().join("disk.vhdx");
    to_vhdx(&m.raw, &img);
    let v = compact_gives_back(&img, m.deleted);
    assert_eq!(v["partitions"][0]["type"], "ntfs", "{v:#}");
    verify(d.path(), &img, &m, &["ntfsfix", "-n"], "ro");
}

/// Sets the dirty flag of the NTFS volume at `offset` of `raw` ($Volume, MFT record 3).
fn set_ntfs_dirty(raw: &Path, offset: u64) {
    use std::os::unix::fs::FileExt;
    let f = fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open(raw)
        .unwrap();
    let mut boot = [0u8; 512];
    f.read_exact_at(&mut boot, offset).unwrap();
    let bps = u64::from(u16::from_le_bytes([boot[11], boot[12]]));
    let cluster = bps * u64::from(boot[13]);
    let mft = u64::from_le_bytes(boot[0x30..0x38].try_into().unwrap()) * cluster;
    let rec_at = offset + mft + 3 * 1024;
    let mut rec = vec![0u8; 1024];
    f.read_exact_at(&mut rec, rec_at).unwrap();
    let mut pos = usize::from(u16::from_le_bytes([rec[0x14], rec[0x15]]));
    loop {
        let kind = u32::from_le_bytes(rec[pos..pos + 4].try_into().unwrap());
        assert_ne!(kind, 0xFFFF_FFFF, "no $VOLUME_INFORMATION");
        let len = u32::from_le_bytes(rec[pos + 4..pos + 8].try_into().unwrap()) as usize;
        if kind == 0x70 {
            let voff = usize::from(u16::from_le_bytes([rec[pos + 20], rec[pos + 21]]));
            let flags_at = pos + voff + 10;
            assert!(flags_at % 512 < 510, "flags under a fixup");
            f.write_all_at(&[rec[flags_at] | 1], rec_at + flags_at as u64)
                .unwrap();
            return;
        }
        pos += len;
    }
}

#[test]
fn dirty_ntfs_is_refused_unless_forced() {
    if !have_tools(&["losetup", "sfdisk", "mkntfs", "ntfs-3g"]) {
        return;
    }
    let d = tempfile::tempdir().unwrap();
    let mkfs = ["mkntfs", "-q", "-Q", "-F"];
    let Some(m) = make_disk(d.path(), Layout::Gpt, 64 * MIB, &mkfs, 4, 2, 2) else {
        return;
    };
    set_ntfs_dirty(&m.raw, m.offset);
    let img = d.path().join("disk.vhdx");
    to_vhdx(&m.raw, &img);
    let err = refused(&img, &[], "dirty");
    assert!(err.contains("--force"), "{err}");
    ok(&vhdtool(&[
        OsStr::new("compact"),
        OsStr::new("--fs"),
        OsStr::new("--force"),
        img.as_os_str(),
    ]));
}

/// A VHDX of a small ext4 disk (whole-disk), for the refusals.
fn small_ext4(dir: &Path) -> Option<(Made, PathBuf)> {
    if !have_tools(&["losetup", "mount", "mke2fs", "debugfs"]) {
        return None;
    }
    let m = make_disk(dir, Layout::Whole, 64 * MIB, &["mkfs.ext4", "-q"], 8, 2, 4)?;
    let img = dir.join("disk.vhdx");
    Some((m, img))
}

/// Runs compact --fs and expects a refusal leaving the image byte-identical.
fn refused(img: &Path, extra: &[&str], expect: &str) -> String {
    let before = fs::read(img).unwrap();
    let mut args: Vec<&OsStr> = vec![OsStr::new("compact"), OsStr::new("--fs")];
    args.extend(extra.iter().map(OsStr::new));
    args.push(img.as_os_str());
    let err = fails(&vhdtool(&args));
    assert!(err.contains(expect), "{err}");
    assert!(!err.contains("panicked"), "{err}");
    assert!(
        fs::read(img).unwrap() == before,
        "a refused compact changed the image"
    );
    err
}

#[test]
fn journal_needing_recovery_is_refused_unless_forced() {
    let d = tempfile::tempdir().unwrap();
    let Some((m, img)) = small_ext4(d.path()) else {
        return;
    };
    let mut c = Command::new("debugfs");
    c.args(["-w", "-R", "feature needs_recovery"]).arg(&m.raw);
    run(c);
    to_vhdx(&m.raw, &img);
    let err = refused(&img, &[], "needs recovery");
    assert!(err.contains("--force"), "{err}");
    let o = vhdtool(&[
        OsStr::new("compact"),
        OsStr::new("--fs"),
        OsStr::new("--force"),
        img.as_os_str(),
    ]);
    ok(&o);
    assert!(String::from_utf8_lossy(&o.stderr).contains("warning"));
}

#[test]
fn corrupted_block_bitmap_stops_the_operation_even_forced() {
    let d = tempfile::tempdir().unwrap();
    let Some((m, img)) = small_ext4(d.path()) else {
        return;
    };
    let out = run(Command::new("dumpe2fs").arg(&m.raw));
    let text = String::from_utf8_lossy(&out.stdout);
    let field = |p: &str| -> u64 {
        text.lines()
            .find_map(|l| l.trim().strip_prefix(p))
            .and_then(|r| r.split_whitespace().next())
            .unwrap()
            .parse()
            .unwrap()
    };
    let (bs, at) = (field("Block size:"), field("Block bitmap at "));
    use std::os::unix::fs::FileExt;
    let f = fs::OpenOptions::new().write(true).open(&m.raw).unwrap();
    f.write_all_at(&[0x00], at * bs + 1).unwrap();
    drop(f);
    to_vhdx(&m.raw, &img);
    refused(&img, &["--force"], "checksum");
}

#[test]
fn image_being_written_or_mounted_is_refused() {
    let d = tempfile::tempdir().unwrap();
    let Some((m, img)) = small_ext4(d.path()) else {
        return;
    };
    to_vhdx(&m.raw, &img);
    // A `vhdtool write` still reading its stdin has the image open for writing.
    let writer = vhdtool_writer(&img);
    refused(&img, &[], "in use");
    drop(writer);
    // `vhdtool mount` (FUSE) holds it the same way while mounted.
    if !Path::new("/dev/fuse").exists() {
        skip_unless_ci("no /dev/fuse: the mounted case is not checked");
        return;
    }
    let mnt = d.path().join("fuse");
    fs::create_dir_all(&mnt).unwrap();
    ok(&vhdtool(&[
        OsStr::new("mount"),
        img.as_os_str(),
        mnt.as_os_str(),
    ]));
    let err = {
        let before = fs::read(&img);
        let o = vhdtool(&[OsStr::new("compact"), OsStr::new("--fs"), img.as_os_str()]);
        let after = fs::read(&img);
        let _ = vhdtool(&[OsStr::new("umount"), mnt.as_os_str()]);
        assert!(
            before.unwrap() == after.unwrap(),
            "image changed under a mount"
        );
        fails(&o)
    };
    assert!(err.contains("in use"), "{err}");
}

#[test]
fn convert_fs_does_not_copy_free_space() {
    if !have_tools(&["losetup", "sfdisk", "mount", "mke2fs", "e2fsck"]) {
        return;
    }
    let d = tempfile::tempdir().unwrap();
    let Some(m) = make_disk(
        d.path(),
        Layout::Gpt,
        256 * MIB,
        &["mkfs.ext4", "-q"],
        24,
        8,
        8,
    ) else {
        return;
    };
    let plain = d.path().join("plain.vhdx");
    to_vhdx(&m.raw, &plain);
    let img = d.path().join("disk.vhdx");
    ok(&vhdtool(&[
        OsStr::new("convert"),
        OsStr::new("--fs"),
        OsStr::new("-O"),
        OsStr::new("vhdx"),
        OsStr::new("--block-size"),
        OsStr::new("2M"),
        m.raw.as_os_str(),
        img.as_os_str(),
    ]));
    let (a, b) = (
        fs::metadata(&plain).unwrap().len(),
        fs::metadata(&img).unwrap().len(),
    );
    assert!(
        a - b >= m.deleted * 9 / 10,
        "plain {a}, --fs {b}, deleted {}",
        m.deleted
    );
    verify(d.path(), &img, &m, &["e2fsck", "-fn"], "ro");
}

/// A differencing child over a dynamic parent holding an ext4 (whole disk): files written and
/// most deleted through `vhdtool mount` of the child and a loop mount, then `compact --fs` of
/// the child gives the deleted space back (released blocks read as the parent's bytes in a
/// VHD child, as zeros in a VHDX one: free space either way).
fn child_round_trip(ext: &str) {
    if !have_tools(&["losetup", "mount", "mke2fs", "e2fsck"]) {
        return;
    }
    if !Path::new("/dev/fuse").exists() {
        skip_unless_ci("no /dev/fuse");
        return;
    }
    let d = tempfile::tempdir().unwrap();
    let Some(base) = make_disk(
        d.path(),
        Layout::Whole,
        192 * MIB,
        &["mkfs.ext4", "-q"],
        2,
        4,
        1,
    ) else {
        return;
    };
    let parent = d.path().join(format!("parent.{ext}"));
    ok(&vhdtool(&[
        OsStr::new("convert"),
        OsStr::new("--block-size"),
        OsStr::new("2M"),
        base.raw.as_os_str(),
        parent.as_os_str(),
    ]));
    let child = d.path().join(format!("child.{ext}"));
    ok(&vhdtool(&[
        OsStr::new("create"),
        OsStr::new("--block-size"),
        OsStr::new("2M"),
        OsStr::new("--parent"),
        parent.as_os_str(),
        child.as_os_str(),
    ]));
    let fuse = d.path().join("fuse");
    fs::create_dir_all(&fuse).unwrap();
    ok(&vhdtool(&[
        OsStr::new("mount"),
        child.as_os_str(),
        fuse.as_os_str(),
    ]));
    let mut kept = base.kept.clone();
    let mut deleted = 0;
    {
        let lo = Loop::attach(&fuse.join("disk"), 0, 192 * MIB, false).unwrap();
        let mnt = Mount::with(None, &lo.0, &d.path().join("mnt"), "rw");
        for i in 0..12u64 {
            let data = noise((8 * MIB) as usize, 100 + i);
            fs::write(mnt.0.join(format!("c{i}")), &data).unwrap();
            if i % 6 == 0 {
                kept.push((format!("c{i}"), data));
            }
        }
        run(Command::new("sync"));
        for i in (0..12u64).filter(|i| i % 6 != 0) {
            fs::remove_file(mnt.0.join(format!("c{i}"))).unwrap();
            deleted += 8 * MIB;
        }
    }
    ok(&vhdtool(&[OsStr::new("umount"), fuse.as_os_str()]));
    let v = compact_gives_back(&child, deleted);
    assert!(v["fs-blocks-released"].as_u64().unwrap() > 0, "{v:#}");
    let m = Made {
        raw: base.raw.clone(),
        offset: 0,
        len: 192 * MIB,
        kept,
        deleted,
    };
    verify(d.path(), &child, &m, &["e2fsck", "-fn"], "ro");
}

#[test]
fn differencing_vhd_child_gives_back_deleted_space() {
    child_round_trip("vhd");
}

#[test]
fn differencing_vhdx_child_gives_back_deleted_space() {
    child_round_trip("vhdx");
}
