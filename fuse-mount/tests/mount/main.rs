//! End to end: `vhdtool mount` / `vhdtool umount` with real tools on top.
//!
//! ```text
//!   vhdtool create ─> image ─ vhdtool mount ─> DIR/disk ── sfdisk (GPT / MBR + logicals)
//!                                              DIR/p1 ──── mkfs.ext4, mount -o loop, cp, umount
//!   vhdtool umount ─> vhdtool check / qemu-img check clean ─> remount ─> files identical, e2fsck
//!   vhdimount ──────> vhdi1 byte-identical to DIR/disk
//!   kill -9 / SIGTERM of the daemon ─> image opens, check clean (leaks allowed), fsynced data there
//! ```
//!
//! These need root and /dev/fuse (CI has both). Without them, or without a tool, a test prints
//! `SKIP:` and passes off CI, and fails under `CI=true`. Every mount (FUSE and loop) is undone by
//! a guard's `Drop`, also when the test panics; guards are declared in mount order, so the loop
//! mount on top is undone first.

use std::fs::{self, File, OpenOptions};
use std::io::{Read, Seek, SeekFrom, Write};
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::thread;
use std::time::{Duration, Instant};
use vhdkit_tests::noise as pattern;

use fuse_mount::daemon::find_mount;
use vhdkit_tests::{fresh_scratch_dir, output, run, run_expect_code, tool_or_skip, vhdtool};

/// The daemon's life (concurrency, kill -9, signals, unmounting, errors, fusermount3, logs,
/// rescans, locking).
mod daemon;

const MIB: u64 = 1 << 20;

// ---------------------------------------------------------------------------------------------
// Environment
// ---------------------------------------------------------------------------------------------

/// Root and /dev/fuse present, and every tool of `tools` on PATH; else skip (panic in CI).
fn can_run(tools: &[&str]) -> bool {
    let reason = if !nix::unistd::geteuid().is_root() {
        Some("not root")
    } else if !Path::new("/dev/fuse").exists() {
        Some("no /dev/fuse")
    } else {
        None
    };
    if let Some(r) = reason {
        vhdkit_tests::skip_unless_ci(&format!("FUSE mount test: {r}"));
        return false;
    }
    let present: Vec<bool> = tools.iter().map(|t| tool_or_skip(t)).collect();
    present.into_iter().all(|p| p)
}

/// True if loop devices can be set up here (`losetup -f` finds a free one).
fn loop_devices_work() -> bool {
    output(Command::new("losetup").arg("-f")).status.success()
}

// ---------------------------------------------------------------------------------------------
// Guards
// ---------------------------------------------------------------------------------------------

/// A `vhdtool mount`; unmounted with `vhdtool umount` on drop (lazily with `umount -l` if that
/// fails, so no test leaves a mount behind).
struct VhdMount {
    dir: PathBuf,
    mounted: bool,
}

impl VhdMount {
    fn new(image: &Path, dir: &Path, extra: &[&str]) -> VhdMount {
        fs::create_dir_all(dir).unwrap();
        run(vhdtool().arg("mount").args(extra).arg(image).arg(dir));
        VhdMount {
            dir: dir.to_path_buf(),
            mounted: true,
        }
    }

    fn file(&self, name: &str) -> PathBuf {
        self.dir.join(name)
    }

    fn names(&self) -> Vec<String> {
        let mut v: Vec<String> = fs::read_dir(&self.dir)
            .unwrap()
            .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
            .collect();
        v.sort();
        v
    }

    fn daemon_pid(&self) -> i32 {
        let dir = fs::canonicalize(&self.dir).unwrap();
        let entry = find_mount(&dir)
            .unwrap()
            .expect("mount listed in mountinfo");
        entry
            .daemon_pid()
            .expect("vhdtool mount source names the pid") as i32
    }

    /// `vhdtool umount`, required to succeed.
    fn unmount(mut self) {
        self.mounted = false;
        run(vhdtool().arg("umount").arg(&self.dir));
    }
}

impl Drop for VhdMount {
    fn drop(&mut self) {
        if !self.mounted {
            return;
        }
        if !output(vhdtool().arg("umount").arg(&self.dir))
            .status
            .success()
        {
            let _ = Command::new("umount").arg("-l").arg(&self.dir).output();
            eprintln!("WARNING: vhdtool umount {} failed", self.dir.display());
        }
    }
}

/// `mount -o loop FILE DIR`; unmounted on drop (the loop device is released with it).
struct LoopMount {
    dir: PathBuf,
    mounted: bool,
}

impl LoopMount {
    fn new(file: &Path, dir: &Path) -> LoopMount {
        fs::create_dir_all(dir).unwrap();
        run(Command::new("mount")
            .arg("-o")
            .arg("loop")
            .arg(file)
            .arg(dir));
        LoopMount {
            dir: dir.to_path_buf(),
            mounted: true,
        }
    }

    fn unmount(mut self) {
        self.mounted = false;
        run(Command::new("umount").arg(&self.dir));
    }
}

impl Drop for LoopMount {
    fn drop(&mut self) {
        if self.mounted
            && !output(Command::new("umount").arg(&self.dir))
                .status
                .success()
        {
            let _ = Command::new("umount").arg("-l").arg(&self.dir).output();
        }
    }
}

/// A vhdimount (libvhdi) mount; unmounted on drop.
struct VhdiMount {
    dir: PathBuf,
}

impl VhdiMount {
    fn new(image: &Path, dir: &Path) -> VhdiMount {
        fs::create_dir_all(dir).unwrap();
        run(Command::new("vhdimount").arg(image).arg(dir));
        let m = VhdiMount {
            dir: dir.to_path_buf(),
        };
        // vhdimount may return before its files show; a bounded wait, not a timing assertion.
        let deadline = Instant::now() + Duration::from_secs(30);
        while !m.dir.join("vhdi1").is_file() {
            assert!(Instant::now() < deadline, "vhdimount showed no vhdi1");
            thread::sleep(Duration::from_millis(20));
        }
        m
    }
}

impl Drop for VhdiMount {
    fn drop(&mut self) {
        for _ in 0..50 {
            if output(Command::new("fusermount3").arg("-u").arg(&self.dir))
                .status
                .success()
                || output(Command::new("umount").arg(&self.dir))
                    .status
                    .success()
            {
                return;
            }
            thread::sleep(Duration::from_millis(50));
        }
        let _ = Command::new("umount").arg("-l").arg(&self.dir).output();
    }
}

// ---------------------------------------------------------------------------------------------
// Data helpers
// ---------------------------------------------------------------------------------------------

fn read_at(path: &Path, offset: u64, len: usize) -> Vec<u8> {
    let f = File::open(path).unwrap_or_else(|e| panic!("open {}: {e}", path.display()));
    let mut buf = vec![0u8; len];
    f.read_exact_at(&mut buf, offset)
        .unwrap_or_else(|e| panic!("read {} at {offset}: {e}", path.display()));
    buf
}

fn write_at(path: &Path, offset: u64, data: &[u8], fsync: bool) {
    let f = OpenOptions::new()
        .write(true)
        .open(path)
        .unwrap_or_else(|e| panic!("open {} for writing: {e}", path.display()));
    f.write_all_at(data, offset)
        .unwrap_or_else(|e| panic!("write {} at {offset}: {e}", path.display()));
    if fsync {
        f.sync_all().unwrap();
    }
}

/// `vhdtool read` of the image (not through the mount).
fn vhdtool_read(image: &Path, offset: u64, len: usize) -> Vec<u8> {
    let out = run(vhdtool().arg("read").arg(image).args([
        "--offset",
        &offset.to_string(),
        "--length",
        &len.to_string(),
    ]));
    out.stdout
}

/// Compares two files chunk by chunk (they must have the same length).
fn assert_same_bytes(a: &Path, b: &Path) {
    let (mut fa, mut fb) = (File::open(a).unwrap(), File::open(b).unwrap());
    let (la, lb) = (fa.metadata().unwrap().len(), fb.metadata().unwrap().len());
    assert_eq!(la, lb, "{} and {} differ in size", a.display(), b.display());
    let mut ba = vec![0u8; MIB as usize];
    let mut bb = vec![0u8; MIB as usize];
    let mut pos = 0u64;
    while pos < la {
        let n = (la - pos).min(MIB) as usize;
        fa.read_exact(&mut ba[..n]).unwrap();
        fb.read_exact(&mut bb[..n]).unwrap();
        if ba[..n] != bb[..n] {
            let i = (0..n).find(|&i| ba[i] != bb[i]).unwrap();
            panic!(
                "{} and {} differ at byte {}",
                a.display(),
                b.display(),
                pos + i as u64
            );
        }
        pos += n as u64;
    }
}

/// Like [`assert_same_bytes`], with reads of varied sizes at unaligned offsets (a read-only
/// mount replies to each by a different path: spliced, mapped, or through a buffer).
fn assert_same_bytes_in_odd_reads(a: &Path, b: &Path) {
    let (fa, fb) = (File::open(a).unwrap(), File::open(b).unwrap());
    let len = fa.metadata().unwrap().len();
    let sizes = [
        4096usize,
        100_000,
        255 * 4096,
        512,
        MIB as usize,
        3 * 4096 + 7,
    ];
    let (mut ba, mut bb) = (vec![0u8; MIB as usize], vec![0u8; MIB as usize]);
    let mut pos = 0u64;
    for i in 0.. {
        if pos >= len {
            break;
        }
        let n = (sizes[i % sizes.len()] as u64).min(len - pos) as usize;
        fa.read_exact_at(&mut ba[..n], pos).unwrap();
        fb.read_exact_at(&mut bb[..n], pos).unwrap();
        assert!(ba[..n] == bb[..n], "{n} bytes at {pos} differ");
        pos += n as u64 + 4096 * (i as u64 % 3) + 1;
    }
}

/// Runs `sfdisk` on `disk` with `script` on stdin.
fn sfdisk(disk: &Path, script: &str) {
    let mut child = Command::new("sfdisk")
        .arg("-q")
        .arg("--no-reread")
        .arg("--no-tell-kernel")
        .arg(disk)
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .expect("run sfdisk");
    child
        .stdin
        .take()
        .unwrap()
        .write_all(script.as_bytes())
        .unwrap();
    let out = child.wait_with_output().unwrap();
    assert!(
        out.status.success(),
        "sfdisk failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

/// `(number, byte offset, byte size)` of every non-extended partition sfdisk sees on `disk`.
fn sfdisk_partitions(disk: &Path) -> Vec<(u32, u64, u64)> {
    let out = run(Command::new("sfdisk").arg("--json").arg(disk));
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    let t = &v["partitiontable"];
    let ss = t["sectorsize"].as_u64().unwrap_or(512);
    let mut parts = Vec::new();
    for p in t["partitions"].as_array().unwrap() {
        let ty = p["type"].as_str().unwrap_or_default().to_ascii_lowercase();
        if matches!(ty.as_str(), "5" | "f" | "85") {
            continue;
        }
        let node = p["node"].as_str().unwrap();
        let digits: String = node
            .chars()
            .rev()
            .take_while(char::is_ascii_digit)
            .collect::<Vec<_>>()
            .into_iter()
            .rev()
            .collect();
        parts.push((
            digits.parse().unwrap(),
            p["start"].as_u64().unwrap() * ss,
            p["size"].as_u64().unwrap() * ss,
        ));
    }
    parts
}

/// Every partition file has sfdisk's size, and its first and last sectors are the disk's bytes
/// at sfdisk's offset (checked by writing markers through the partition file).
fn assert_partition_files_match(m: &VhdMount, expected: &[(u32, u64, u64)]) {
    let mut names: Vec<String> = expected.iter().map(|p| format!("p{}", p.0)).collect();
    names.push("disk".into());
    names.sort();
    assert_eq!(m.names(), names);
    for &(n, offset, size) in expected {
        let f = m.file(&format!("p{n}"));
        assert_eq!(fs::metadata(&f).unwrap().len(), size, "size of p{n}");
        let head = pattern(u64::from(n), 512);
        let tail = pattern(u64::from(n) + 100, 512);
        write_at(&f, 0, &head, false);
        write_at(&f, size - 512, &tail, true);
        assert_eq!(read_at(&m.file("disk"), offset, 512), head, "p{n} start");
        assert_eq!(
            read_at(&m.file("disk"), offset + size - 512, 512),
            tail,
            "p{n} end"
        );
        // Reads and writes stop at the end of the partition.
        let mut file = OpenOptions::new().read(true).write(true).open(&f).unwrap();
        file.seek(SeekFrom::Start(size - 4)).unwrap();
        let mut buf = [0u8; 16];
        assert_eq!(file.read(&mut buf).unwrap(), 4);
        let err = file.write_all_at(b"x", size).unwrap_err();
        assert_eq!(
            err.raw_os_error(),
            Some(nix::libc::ENOSPC),
            "write past p{n}"
        );
    }
}

/// The files put on and expected back from the ext4 file system.
fn sample_files() -> Vec<(String, Vec<u8>)> {
    vec![
        ("one-byte".into(), vec![7]),
        ("odd-4097".into(), pattern(1, 4097)),
        ("mib-plus-3".into(), pattern(2, MIB as usize + 3)),
        ("five-mib".into(), pattern(3, 5 * MIB as usize)),
        ("text.txt".into(), b"hello from vhdkit\n".to_vec()),
    ]
}

/// Makes ext4 on `part` and puts the sample files on it (loop mount; debugfs when loop devices
/// are not available).
fn mkfs_and_fill(part: &Path, mnt: &Path) {
    run(Command::new("mkfs.ext4").args(["-q", "-F"]).arg(part));
    let files = sample_files();
    if loop_devices_work() {
        let lm = LoopMount::new(part, mnt);
        fs::create_dir_all(mnt.join("dir")).unwrap();
        for (name, data) in &files {
            fs::write(mnt.join("dir").join(name), data).unwrap();
        }
        lm.unmount();
    } else {
        eprintln!("NOTE: loop devices unavailable; ext4 round trip through debugfs");
        let staging = fresh_scratch_dir();
        run(Command::new("debugfs")
            .args(["-w", "-R", "mkdir dir"])
            .arg(part));
        for (name, data) in &files {
            let src = staging.join(name);
            fs::write(&src, data).unwrap();
            let req = format!("write {} dir/{name}", src.display());
            run(Command::new("debugfs").args(["-w", "-R", &req]).arg(part));
        }
    }
}

/// The sample files are on the ext4 of `part`, and e2fsck finds it clean.
fn assert_files_back(part: &Path, mnt: &Path) {
    let files = sample_files();
    if loop_devices_work() {
        let lm = LoopMount::new(part, mnt);
        for (name, data) in &files {
            let got = fs::read(mnt.join("dir").join(name)).unwrap();
            assert!(got == *data, "{name} differs after remount");
        }
        lm.unmount();
    } else {
        let staging = fresh_scratch_dir();
        for (name, data) in &files {
            let dst = staging.join(name);
            let req = format!("dump dir/{name} {}", dst.display());
            run(Command::new("debugfs").args(["-R", &req]).arg(part));
            assert!(fs::read(&dst).unwrap() == *data, "{name} differs");
        }
    }
    run(Command::new("e2fsck").args(["-f", "-n"]).arg(part));
}

fn vhdtool_check_clean(image: &Path) {
    run_expect_code(vhdtool().arg("check").arg(image), 0);
}

// ---------------------------------------------------------------------------------------------
// Tests
// ---------------------------------------------------------------------------------------------

#[test]
fn gpt_vhdx_ext4_round_trip_through_loop_mount() {
    if !can_run(&[
        "sfdisk",
        "mkfs.ext4",
        "e2fsck",
        "debugfs",
        "qemu-img",
        "losetup",
    ]) {
        return;
    }
    let dir = fresh_scratch_dir();
    let image = dir.join("gpt.vhdx");
    run(vhdtool().arg("create").arg(&image).arg("256M"));
    let m = VhdMount::new(&image, &dir.join("m"), &[]);
    assert_eq!(m.names(), ["disk"]);
    assert_eq!(fs::metadata(m.file("disk")).unwrap().len(), 256 * MIB);
    sfdisk(
        &m.file("disk"),
        "label: gpt\nstart=2048, size=100MiB, name=one\nsize=64MiB, name=two\n",
    );
    m.unmount();
    vhdtool_check_clean(&image);
    run(Command::new("qemu-img")
        .args(["check", "-f", "vhdx"])
        .arg(&image));

    let m = VhdMount::new(&image, &dir.join("m"), &[]);
    let expected = sfdisk_partitions(&m.file("disk"));
    assert_eq!(
        expected,
        [(1, MIB, 100 * MIB), (2, 101 * MIB, 64 * MIB)],
        "sfdisk's own view"
    );
    assert_partition_files_match(&m, &expected);
    mkfs_and_fill(&m.file("p1"), &dir.join("mnt"));
    m.unmount();
    vhdtool_check_clean(&image);
    run(Command::new("qemu-img")
        .args(["check", "-f", "vhdx"])
        .arg(&image));

    let m = VhdMount::new(&image, &dir.join("m"), &[]);
    assert_files_back(&m.file("p1"), &dir.join("mnt"));
    m.unmount();
    vhdtool_check_clean(&image);
    run(Command::new("qemu-img")
        .args(["check", "-f", "vhdx"])
        .arg(&image));
}

#[test]
fn mbr_vhd_with_logical_partitions_ext4_round_trip() {
    if !can_run(&["sfdisk", "mkfs.ext4", "e2fsck", "debugfs", "losetup"]) {
        return;
    }
    let dir = fresh_scratch_dir();
    let image = dir.join("mbr.vhd");
    run(vhdtool()
        .args(["create", "--type", "dynamic"])
        .arg(&image)
        .arg("256M"));
    let m = VhdMount::new(&image, &dir.join("m"), &[]);
    // p1 primary, p2 extended holding p5 and p6, p3 primary after it.
    let d = m.file("disk").display().to_string();
    sfdisk(
        &m.file("disk"),
        &format!(
            "label: dos\n\
             {d}1 : start=2048, size=80MiB, type=83\n\
             {d}2 : size=120MiB, type=5\n\
             {d}5 : size=40MiB, type=83\n\
             {d}6 : size=40MiB, type=83\n\
             {d}3 : size=50MiB, type=83\n"
        ),
    );
    m.unmount();
    vhdtool_check_clean(&image);

    let m = VhdMount::new(&image, &dir.join("m"), &[]);
    let expected = sfdisk_partitions(&m.file("disk"));
    let numbers: Vec<u32> = expected.iter().map(|p| p.0).collect();
    assert_eq!(numbers, [1, 3, 5, 6], "sfdisk's own view");
    assert_partition_files_match(&m, &expected);
    mkfs_and_fill(&m.file("p5"), &dir.join("mnt"));
    m.unmount();
    vhdtool_check_clean(&image);

    let m = VhdMount::new(&image, &dir.join("m"), &[]);
    assert_files_back(&m.file("p5"), &dir.join("mnt"));
    m.unmount();
    vhdtool_check_clean(&image);
}

#[test]
fn read_only_mount_refuses_writes_with_erofs_and_leaves_the_file_alone() {
    if !can_run(&["sfdisk"]) {
        return;
    }
    let dir = fresh_scratch_dir();
    let image = dir.join("ro.vhdx");
    run(vhdtool().arg("create").arg(&image).arg("64M"));
    let m = VhdMount::new(&image, &dir.join("m"), &[]);
    sfdisk(&m.file("disk"), "label: gpt\nstart=2048, size=16MiB\n");
    write_at(&m.file("disk"), 20 * MIB, &pattern(9, 4096), true);
    m.unmount();
    let before = fs::read(&image).unwrap();

    let m = VhdMount::new(&image, &dir.join("m"), &["--read-only"]);
    assert_eq!(m.names(), ["disk", "p1"]);
    for name in ["disk", "p1"] {
        for (read, write) in [(false, true), (true, true)] {
            let err = OpenOptions::new()
                .read(read)
                .write(write)
                .open(m.file(name))
                .unwrap_err();
            assert_eq!(err.raw_os_error(), Some(nix::libc::EROFS), "{name}: {err}");
        }
        let perm = fs::metadata(m.file(name)).unwrap().permissions();
        assert!(perm.readonly(), "{name} shows write permission");
    }
    assert_eq!(read_at(&m.file("disk"), 20 * MIB, 4096), pattern(9, 4096));
    m.unmount();
    assert!(
        fs::read(&image).unwrap() == before,
        "read-only mount changed the image"
    );
}

/// The bytes of `image` after a write of `data` at `offset` whose flush was cut by a power loss
/// right after the log entry was synced: the BAT update is only in the log (as a crash inside a
/// flush leaves it), so readers must replay the log to see `data`.
fn pending_log_state(image: &Path, offset: u64, data: &[u8]) -> Vec<u8> {
    use image_io::{CrashFile, ImageFile};
    let file = CrashFile::from_bytes(fs::read(image).unwrap());
    let mut img = vhdx::VhdxImage::open_file(file.clone(), image, vhdx::OpenMode::ReadWrite)
        .expect("open the VHDX");
    let plan = img.resolve_write(offset, data.len() as u64).unwrap();
    for e in &plan.extents {
        let at = (e.offset - offset) as usize;
        img.file()
            .write_all_at(&data[at..at + e.len as usize], e.file_offset)
            .unwrap();
    }
    img.commit_write(plan).unwrap();
    img.flush().unwrap();
    std::mem::forget(img);
    // The flush synced: payload, header (log opened), log entry, applied pages, header (log
    // closed). Keep the state right after the log entry.
    file.state_after_sync(file.sync_count() - 2).contents()
}

#[test]
fn dirty_vhdx_mounted_read_only_is_replayed_in_memory_only() {
    if !can_run(&[]) {
        return;
    }
    let dir = fresh_scratch_dir();
    let image = dir.join("dirty.vhdx");
    // Small blocks keep the in-memory crash simulation small.
    run(vhdtool()
        .args(["create", "--block-size", "1M"])
        .arg(&image)
        .arg("64M"));
    let data = pattern(11, 3 * MIB as usize);
    fs::write(&image, pending_log_state(&image, 5 * MIB, &data)).unwrap();
    assert_ne!(
        output(vhdtool().arg("check").arg(&image)).status.code(),
        Some(0),
        "the image should need a log replay"
    );
    let before = fs::read(&image).unwrap();
    let m = VhdMount::new(&image, &dir.join("m"), &["--read-only"]);
    assert!(read_at(&m.file("disk"), 5 * MIB, data.len()) == data);
    m.unmount();
    assert!(
        fs::read(&image).unwrap() == before,
        "the log was replayed on disk"
    );
}

/// Writes through a mounted differencing child; the parent file must not change by one byte.
fn differencing_child_written_through_mount(ext: &str) {
    if !can_run(&[]) {
        return;
    }
    let dir = fresh_scratch_dir();
    let parent = dir.join(format!("parent.{ext}"));
    let child = dir.join(format!("child.{ext}"));
    run(vhdtool()
        .args(["create", "--type", "dynamic"])
        .arg(&parent)
        .arg("64M"));
    let base = pattern(21, 6 * MIB as usize);
    write_at_image(&parent, MIB, &base);
    run(vhdtool()
        .arg("create")
        .arg("--parent")
        .arg(&parent)
        .arg(&child));
    let parent_before = fs::read(&parent).unwrap();

    let m = VhdMount::new(&child, &dir.join("m"), &[]);
    let disk = m.file("disk");
    assert!(
        read_at(&disk, MIB, base.len()) == base,
        "child reads the parent"
    );
    // Unaligned write straddling parent data and empty space.
    let new = pattern(22, 3 * MIB as usize + 777);
    write_at(&disk, 5 * MIB + 333, &new, true);
    let got = read_at(&disk, 0, 16 * MIB as usize);
    let mut model = vec![0u8; 16 * MIB as usize];
    model[MIB as usize..MIB as usize + base.len()].copy_from_slice(&base);
    let at = 5 * MIB as usize + 333;
    model[at..at + new.len()].copy_from_slice(&new);
    assert!(got == model, "merged view through the mount");
    m.unmount();

    assert!(
        fs::read(&parent).unwrap() == parent_before,
        "parent file changed"
    );
    vhdtool_check_clean(&child);
    assert!(vhdtool_read(&child, 0, model.len()) == model);
}

/// `vhdtool write` into an image.
fn write_at_image(image: &Path, offset: u64, data: &[u8]) {
    let src = fresh_scratch_dir().join("input");
    fs::write(&src, data).unwrap();
    run(vhdtool()
        .arg("write")
        .arg(image)
        .args(["--offset", &offset.to_string(), "--input"])
        .arg(&src));
}

#[test]
fn differencing_vhd_child_mounted_read_write_leaves_the_parent_byte_identical() {
    differencing_child_written_through_mount("vhd");
}

#[test]
fn differencing_vhdx_child_mounted_read_write_leaves_the_parent_byte_identical() {
    differencing_child_written_through_mount("vhdx");
}

/// DIR/disk reads exactly what vhdimount's vhdi1 and the source raw file hold.
fn disk_reads_identical_to_vhdimount(ext: &str) {
    if !can_run(&["vhdimount", "fusermount3"]) {
        return;
    }
    let dir = fresh_scratch_dir();
    let raw = dir.join("src.raw");
    let size = 96 * MIB + 3 * 512;
    {
        let f = File::create(&raw).unwrap();
        f.set_len(size).unwrap();
        for (i, &(off, len)) in [
            (0, 3 * 512),
            (MIB - 100, 200),
            (2 * MIB - 4096, 3 * MIB),
            (32 * MIB - 5000, 10_000),
            (70 * MIB + 17, MIB),
            (size - MIB, MIB),
        ]
        .iter()
        .enumerate()
        {
            f.write_all_at(&pattern(i as u64 + 30, len as usize), off)
                .unwrap();
        }
    }
    let image = dir.join(format!("img.{ext}"));
    run(vhdtool()
        .args(["convert", "--type", "dynamic"])
        .arg(&raw)
        .arg(&image));
    let ours = VhdMount::new(&image, &dir.join("ours"), &["--read-only"]);
    let theirs = VhdiMount::new(&image, &dir.join("theirs"));
    assert_same_bytes(&ours.file("disk"), &theirs.dir.join("vhdi1"));
    assert_same_bytes(&ours.file("disk"), &raw);
    assert_same_bytes_in_odd_reads(&ours.file("disk"), &raw);
    drop(theirs);
    ours.unmount();
}

#[test]
fn vhd_disk_reads_byte_identical_to_vhdimount() {
    disk_reads_identical_to_vhdimount("vhd");
}

#[test]
fn vhdx_disk_reads_byte_identical_to_vhdimount() {
    disk_reads_identical_to_vhdimount("vhdx");
}
