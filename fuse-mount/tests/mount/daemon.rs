//! The mount daemon's life: parallel readers, kill -9 and SIGTERM, busy unmounts, errors before
//! returning, hostile partition tables, non-root mounts through fusermount3, the log file,
//! partition rescans, and image locking.

use super::*;

/// Four threads reading a read-only mount at once, at random offsets and sizes (up to past the
/// 1 MiB request limit, aligned and not), each get exactly the bytes of the source: replies from
/// several serving threads share one `/dev/fuse` descriptor and never mix.
#[test]
fn concurrent_random_reads_of_a_read_only_mount_each_get_their_own_bytes() {
    if !can_run(&[]) {
        return;
    }
    let dir = fresh_scratch_dir();
    let raw = dir.join("src.raw");
    let size = 24 * MIB;
    fs::write(&raw, pattern(77, size as usize)).unwrap();
    for ext in ["vhd", "vhdx"] {
        let image = dir.join(format!("img.{ext}"));
        run(vhdtool()
            .args(["convert", "--type", "dynamic"])
            .arg(&raw)
            .arg(&image));
        let m = VhdMount::new(&image, &dir.join(format!("m-{ext}")), &["--read-only"]);
        let disk = m.file("disk");
        thread::scope(|s| {
            for seed in 0..4u64 {
                let (disk, raw) = (&disk, &raw);
                s.spawn(move || {
                    let (fa, fb) = (File::open(disk).unwrap(), File::open(raw).unwrap());
                    let mut x = seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
                    let mut next = move || {
                        x ^= x << 13;
                        x ^= x >> 7;
                        x ^= x << 17;
                        x
                    };
                    let (mut ba, mut bb) =
                        (vec![0u8; 2 * MIB as usize], vec![0u8; 2 * MIB as usize]);
                    for _ in 0..150 {
                        let sizes = [512, 4096, 65536, 1_040_384, MIB, 1_500_000];
                        let n = sizes[(next() % 6) as usize] as usize;
                        let mut off = next() % (size - n as u64);
                        if next() % 2 == 0 {
                            off -= off % 4096;
                        }
                        fa.read_exact_at(&mut ba[..n], off).unwrap();
                        fb.read_exact_at(&mut bb[..n], off).unwrap();
                        assert!(ba[..n] == bb[..n], "{ext}: {n} bytes at {off} differ");
                    }
                });
            }
        });
        m.unmount();
    }
}

/// Waits (bounded) until process `pid` is gone or a zombie.
fn wait_gone(pid: i32) {
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let state = fs::read_to_string(format!("/proc/{pid}/stat"))
            .ok()
            .and_then(|s| s.rsplit_once(')').map(|(_, r)| r.trim_start().to_string()));
        match state {
            None => return,
            Some(s) if s.starts_with('Z') || s.starts_with('X') => return,
            Some(_) => {}
        }
        assert!(Instant::now() < deadline, "process {pid} did not end");
        thread::sleep(Duration::from_millis(20));
    }
}

/// kill -9 of the daemon after fsynced and unsynced writes: the image opens and checks clean
/// (leaks allowed: exit 3), the fsynced data is there, and the image takes writes again.
fn daemon_sigkill_recovery(ext: &str) {
    if !can_run(&[]) {
        return;
    }
    let dir = fresh_scratch_dir();
    let image = dir.join(format!("kill.{ext}"));
    run(vhdtool()
        .args(["create", "--type", "dynamic"])
        .arg(&image)
        .arg("128M"));
    let m = VhdMount::new(&image, &dir.join("m"), &[]);
    let synced = pattern(41, 5 * MIB as usize + 512);
    let unsynced = pattern(42, 2 * MIB as usize);
    write_at(&m.file("disk"), 3 * MIB, &synced, true);
    write_at(&m.file("disk"), 70 * MIB, &unsynced, false);
    let pid = m.daemon_pid();
    nix::sys::signal::kill(nix::unistd::Pid::from_raw(pid), nix::sys::signal::SIGKILL).unwrap();
    wait_gone(pid);
    // Removes the dead mount.
    m.unmount();
    assert!(find_mount(&fs::canonicalize(dir.join("m")).unwrap())
        .unwrap()
        .is_none());

    let code = output(vhdtool().arg("check").arg(&image)).status.code();
    assert!(
        matches!(code, Some(0) | Some(3)),
        "check after kill -9 exited {code:?}"
    );
    assert!(
        vhdtool_read(&image, 3 * MIB, synced.len()) == synced,
        "fsynced data lost"
    );
    // Still writable, and clean afterwards.
    write_at_image(&image, 100 * MIB, b"after the crash");
    assert_eq!(vhdtool_read(&image, 100 * MIB, 15), b"after the crash");
    let code = output(vhdtool().arg("check").arg(&image)).status.code();
    assert!(matches!(code, Some(0) | Some(3)), "check exited {code:?}");
}

#[test]
fn vhdx_daemon_killed_with_sigkill_leaves_a_clean_image_with_fsynced_data() {
    daemon_sigkill_recovery("vhdx");
}

#[test]
fn vhd_daemon_killed_with_sigkill_leaves_a_clean_image_with_fsynced_data() {
    daemon_sigkill_recovery("vhd");
}

#[test]
fn sigterm_flushes_then_unmounts() {
    if !can_run(&[]) {
        return;
    }
    let dir = fresh_scratch_dir();
    let image = dir.join("term.vhdx");
    run(vhdtool().arg("create").arg(&image).arg("64M"));
    let m = VhdMount::new(&image, &dir.join("m"), &[]);
    let data = pattern(51, 3 * MIB as usize);
    write_at(&m.file("disk"), 33 * MIB, &data, false);
    let pid = m.daemon_pid();
    nix::sys::signal::kill(nix::unistd::Pid::from_raw(pid), nix::sys::signal::SIGTERM).unwrap();
    wait_gone(pid);
    let mp = fs::canonicalize(dir.join("m")).unwrap();
    assert!(find_mount(&mp).unwrap().is_none(), "still mounted");
    std::mem::forget(m); // already unmounted by the daemon itself
    vhdtool_check_clean(&image);
    assert!(vhdtool_read(&image, 33 * MIB, data.len()) == data);
}

#[test]
fn umount_of_a_busy_mount_fails_and_the_mount_keeps_serving() {
    if !can_run(&[]) {
        return;
    }
    let dir = fresh_scratch_dir();
    let image = dir.join("busy.vhd");
    run(vhdtool().arg("create").arg(&image).arg("16M"));
    let m = VhdMount::new(&image, &dir.join("m"), &[]);
    let f = File::open(m.file("disk")).unwrap();
    let out = run_expect_code(vhdtool().arg("umount").arg(&m.dir), 1);
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("busy"),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let mut buf = [1u8; 512];
    f.read_exact_at(&mut buf, 0).unwrap();
    assert_eq!(buf, [0u8; 512]);
    drop(f);
    m.unmount();
}

#[test]
fn mount_errors_are_reported_before_returning() {
    if !can_run(&[]) {
        return;
    }
    let dir = fresh_scratch_dir();
    let image = dir.join("e.vhd");
    run(vhdtool().arg("create").arg(&image).arg("16M"));
    let out = run_expect_code(
        vhdtool()
            .arg("mount")
            .arg(&image)
            .arg(dir.join("missing-dir")),
        1,
    );
    assert!(!out.stderr.is_empty());
    let out = run_expect_code(
        vhdtool().arg("mount").arg(dir.join("nope.vhd")).arg(&dir),
        1,
    );
    assert!(!out.stderr.is_empty());
    run_expect_code(vhdtool().arg("umount").arg(&dir), 1);
}

#[test]
fn hostile_partition_table_is_reported_and_only_disk_is_shown() {
    if !can_run(&[]) {
        return;
    }
    let dir = fresh_scratch_dir();
    let image = dir.join("hostile.vhd");
    run(vhdtool().arg("create").arg(&image).arg("16M"));
    // A protective MBR whose GPT does not exist.
    let mut mbr = vec![0u8; 512];
    mbr[446 + 4] = 0xEE;
    mbr[446 + 8..446 + 12].copy_from_slice(&1u32.to_le_bytes());
    mbr[446 + 12..446 + 16].copy_from_slice(&u32::MAX.to_le_bytes());
    mbr[510] = 0x55;
    mbr[511] = 0xAA;
    write_at_image(&image, 0, &mbr);
    fs::create_dir_all(dir.join("m")).unwrap();
    let out = run(vhdtool()
        .arg("mount")
        .arg(&image)
        .arg(dir.join("m"))
        .arg("--read-only"));
    let m = VhdMount {
        dir: dir.join("m"),
        mounted: true,
    };
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains("partition table ignored"), "{stderr}");
    assert_eq!(m.names(), ["disk"]);
    m.unmount();
}

/// Makes /dev/fuse usable by every user (its usual Debian mode, 0666) for the life of the guard,
/// then restores the mode it had. Some sandboxes create it 0600.
struct DevFuseMode {
    original: u32,
}

impl DevFuseMode {
    fn world_usable() -> DevFuseMode {
        use std::os::unix::fs::PermissionsExt;
        let original = fs::metadata("/dev/fuse").unwrap().permissions().mode() & 0o7777;
        fs::set_permissions("/dev/fuse", fs::Permissions::from_mode(0o666)).unwrap();
        DevFuseMode { original }
    }
}

impl Drop for DevFuseMode {
    fn drop(&mut self) {
        use std::os::unix::fs::PermissionsExt;
        let _ = fs::set_permissions("/dev/fuse", fs::Permissions::from_mode(self.original));
    }
}

#[test]
fn normal_user_mounts_and_unmounts_through_fusermount3() {
    use std::os::unix::fs::PermissionsExt;
    if !can_run(&["setpriv", "fusermount3"]) {
        return;
    }
    // Under /tmp, with a copy of the binary: the checkout (and its target/) may sit below a
    // directory other users cannot enter, such as /root.
    let tmp = tempfile::Builder::new()
        .prefix("vhdkit-user-mount-")
        .tempdir_in("/tmp")
        .unwrap();
    let dir = tmp.path().to_path_buf();
    fs::set_permissions(&dir, fs::Permissions::from_mode(0o777)).unwrap();
    let bin = dir.join("vhdtool");
    fs::copy(vhdkit_tests::vhdtool_bin(), &bin).unwrap();
    fs::set_permissions(&bin, fs::Permissions::from_mode(0o755)).unwrap();
    let image = dir.join("user.vhdx");
    run(vhdtool().arg("create").arg(&image).arg("16M"));
    fs::set_permissions(&image, fs::Permissions::from_mode(0o666)).unwrap();
    let mnt = dir.join("m");
    fs::create_dir(&mnt).unwrap();
    fs::set_permissions(&mnt, fs::Permissions::from_mode(0o777)).unwrap();
    let as_nobody = |args: &[&std::ffi::OsStr]| {
        let mut c = Command::new("setpriv");
        c.args(["--reuid=65534", "--regid=65534", "--clear-groups"])
            .args(args);
        c
    };
    let _mode = DevFuseMode::world_usable();
    run(as_nobody(&[
        bin.as_os_str(),
        "mount".as_ref(),
        image.as_os_str(),
        mnt.as_os_str(),
    ]));
    let m = VhdMount {
        dir: mnt.clone(),
        mounted: true,
    };
    let entry = find_mount(&fs::canonicalize(&mnt).unwrap())
        .unwrap()
        .unwrap();
    assert!(
        entry.fs_type == "fuse.vhdtool",
        "mounted by fusermount3: {entry:?}"
    );
    let disk = m.file("disk");
    let script = format!(
        "printf hello | dd of={} bs=1 seek=4096 conv=notrunc,fsync status=none",
        disk.display()
    );
    run(as_nobody(&["sh".as_ref(), "-c".as_ref(), script.as_ref()]));
    run(as_nobody(&[
        bin.as_os_str(),
        "umount".as_ref(),
        mnt.as_os_str(),
    ]));
    std::mem::forget(m);
    assert!(find_mount(&fs::canonicalize(&mnt).unwrap())
        .unwrap()
        .is_none());
    vhdtool_check_clean(&image);
    assert_eq!(vhdtool_read(&image, 4096, 5), b"hello");
}

/// `--log FILE` keeps what the detached daemon reports: a startup line, and the warning for a
/// read that fails (the image was truncated under a read-only mount: the reader gets EIO, the
/// daemon keeps serving, and says why in the log).
#[test]
fn the_detached_daemon_logs_to_the_log_file() {
    if !can_run(&[]) {
        return;
    }
    let dir = fresh_scratch_dir();
    let image = dir.join("log.raw");
    fs::write(&image, vec![7u8; 4 * MIB as usize]).unwrap();
    let log = dir.join("daemon.log");
    let log_arg = log.to_str().unwrap().to_string();
    let m = VhdMount::new(&image, &dir.join("m"), &["--read-only", "--log", &log_arg]);
    let f = File::open(m.file("disk")).unwrap();
    let mut buf = vec![0u8; 4096];
    f.read_exact_at(&mut buf, 3 * MIB).unwrap();
    assert!(buf.iter().all(|&b| b == 7));
    OpenOptions::new()
        .write(true)
        .open(&image)
        .unwrap()
        .set_len(MIB)
        .unwrap();
    let err = f.read_exact_at(&mut buf, 3 * MIB).unwrap_err();
    assert_eq!(err.raw_os_error(), Some(nix::libc::EIO), "{err}");
    f.read_exact_at(&mut buf, 0).unwrap();
    drop(f);
    m.unmount();
    let text = fs::read_to_string(&log).unwrap();
    assert!(text.contains("vhdtool mount: serving"), "{text}");
    assert!(
        text.contains("WARN") && text.contains("read disk at"),
        "{text}"
    );
}

/// sfdisk run on `DIR/disk` of a live mount: `p1`, `p2` appear (and later change) without a
/// remount, at sfdisk's offsets and sizes.
#[test]
fn partitions_written_through_the_mount_appear_without_a_remount() {
    if !can_run(&["sfdisk", "mkfs.ext4"]) {
        return;
    }
    let dir = fresh_scratch_dir();
    let image = dir.join("rescan.vhdx");
    run(vhdtool().arg("create").arg(&image).arg("128M"));
    let m = VhdMount::new(&image, &dir.join("m"), &[]);
    assert_eq!(m.names(), ["disk"]);
    sfdisk(
        &m.file("disk"),
        "label: gpt\nstart=2048, size=40MiB, name=one\nsize=20MiB, name=two\n",
    );
    // The kernel may cache the directory's names and sizes for up to a second.
    let wait_for = |want: &[&str]| {
        let start = Instant::now();
        while m.names() != want {
            assert!(
                start.elapsed() < Duration::from_secs(10),
                "files {:?}, expected {want:?}",
                m.names()
            );
            thread::sleep(Duration::from_millis(100));
        }
    };
    wait_for(&["disk", "p1", "p2"]);
    let expected = sfdisk_partitions(&m.file("disk"));
    assert_eq!(expected, [(1, MIB, 40 * MIB), (2, 41 * MIB, 20 * MIB)]);
    assert_partition_files_match(&m, &expected);
    run(Command::new("mkfs.ext4")
        .args(["-q", "-F"])
        .arg(m.file("p1")));
    // Rewritten with one bigger partition: p2 goes, p1 grows.
    sfdisk(
        &m.file("disk"),
        "label: gpt\nstart=2048, size=100MiB, name=big\n",
    );
    wait_for(&["disk", "p1"]);
    let start = Instant::now();
    while fs::metadata(m.file("p1")).unwrap().len() != 100 * MIB {
        assert!(
            start.elapsed() < Duration::from_secs(10),
            "p1 keeps its old size"
        );
        thread::sleep(Duration::from_millis(100));
    }
    m.unmount();
    vhdtool_check_clean(&image);
}

/// Asserts that `vhdtool ARGS` fails because the image is in use, naming it.
fn assert_in_use(args: &[&std::ffi::OsStr], image: &Path) {
    let o = output(vhdtool().args(args));
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(
        !o.status.success() && err.contains("in use") && err.contains(&*image.to_string_lossy()),
        "vhdtool {args:?} was not refused as in use: {err}"
    );
}

#[test]
fn a_mounted_image_is_refused_to_every_other_writer_and_a_read_only_mount_to_writers() {
    if !can_run(&[]) {
        return;
    }
    let dir = fresh_scratch_dir();
    let image = dir.join("held.vhdx");
    run(vhdtool().arg("create").arg(&image).arg("64M"));
    let input = dir.join("in");
    fs::write(&input, pattern(3, 4096)).unwrap();
    let i = image.as_os_str();
    let write: [&std::ffi::OsStr; 6] = [
        "write".as_ref(),
        i,
        "--offset".as_ref(),
        "0".as_ref(),
        "--input".as_ref(),
        input.as_os_str(),
    ];
    let second = dir.join("m2");
    fs::create_dir_all(&second).unwrap();

    let m = VhdMount::new(&image, &dir.join("m"), &[]);
    assert_in_use(&write, &image);
    assert_in_use(&["compact".as_ref(), i], &image);
    assert_in_use(&["info".as_ref(), i], &image);
    assert_in_use(&["mount".as_ref(), i, second.as_os_str()], &image);
    assert_in_use(
        &[
            "mount".as_ref(),
            "--read-only".as_ref(),
            i,
            second.as_os_str(),
        ],
        &image,
    );
    run(vhdtool().args(["info", "--force-share"]).arg(&image));
    m.unmount();

    // Readers share: two read-only mounts and an info, while writers stay out.
    let a = VhdMount::new(&image, &dir.join("m"), &["--read-only"]);
    let b = VhdMount::new(&image, &second, &["--read-only"]);
    run(vhdtool().arg("info").arg(&image));
    assert_in_use(&write, &image);
    assert_in_use(&["mount".as_ref(), i, dir.join("m3").as_os_str()], &image);
    a.unmount();
    b.unmount();
    // Unmounted, the image is free again.
    run(vhdtool().args(write));
}
