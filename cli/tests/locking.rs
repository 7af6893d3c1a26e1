//! Image locking end to end: while one process writes an image, every other writer is refused at
//! once, readers need `--force-share`, and the image is left untouched by what was refused; the
//! same between vhdtool and QEMU (qemu-io, qemu-img), whose locks ours are.
//!
//! Holders are real processes: `vhdtool write --input -` waiting on an open stdin (it has the
//! image open for writing), `vhdtool mount` (fuse-mount tests), `vhdtool boot`
//! (cli/tests/boot.rs), and `qemu-io` reading commands from a pipe.

mod support;
use support::{ok, vhdtool_args as vhdtool, vhdtool_writer, wait_for_lock_byte, Holder};

use std::ffi::OsStr;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};

/// `qemu-io` with IMG open (read-write, or read-only with `-r`), reading commands from a pipe.
fn qemu_io(img: &Path, fmt: &str, read_only: bool) -> Holder {
    let mut c = Command::new("qemu-io");
    if read_only {
        c.arg("-r");
    }
    let child = c
        .args(["-f", fmt])
        .arg(img)
        .stdin(Stdio::piped())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .expect("spawn qemu-io");
    let h = Holder(child);
    // A reader refuses others the "write" permission (byte 201), a writer holds it (101).
    wait_for_lock_byte(img, if read_only { 201 } else { 101 });
    h
}

/// Whether `o` is a refusal because the image is in use.
fn held(o: &Output) -> bool {
    !o.status.success() && String::from_utf8_lossy(&o.stderr).contains("in use")
}

/// Asserts `o` was refused at once because `img` is in use, naming it.
fn assert_refused(what: &str, o: &Output, img: &Path) {
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(!o.status.success(), "{what}: succeeded on an image in use");
    assert!(
        err.contains("in use") && err.contains(&*img.to_string_lossy()),
        "{what}: refusal does not say the image is in use: {err}"
    );
    assert!(!err.contains("panicked"), "{what}: {err}");
}

struct Images {
    _dir: tempfile::TempDir,
    dir: PathBuf,
}

impl Images {
    fn new() -> Images {
        let d = tempfile::tempdir().unwrap();
        Images {
            dir: d.path().to_path_buf(),
            _dir: d,
        }
    }

    /// A dynamic image of `name` (format by extension) holding data in its first MiB.
    fn image(&self, name: &str) -> PathBuf {
        let p = self.dir.join(name);
        ok(&vhdtool(&[
            OsStr::new("create"),
            OsStr::new("--type"),
            OsStr::new("dynamic"),
            p.as_os_str(),
            OsStr::new("64M"),
        ]));
        let data = self.dir.join(format!("{name}.data"));
        std::fs::write(&data, vec![0x5a; 1 << 20]).unwrap();
        ok(&vhdtool(&[
            OsStr::new("write"),
            p.as_os_str(),
            OsStr::new("--offset"),
            OsStr::new("0"),
            OsStr::new("--input"),
            data.as_os_str(),
        ]));
        p
    }

    /// A differencing child of `parent`.
    fn child(&self, parent: &Path, name: &str) -> PathBuf {
        let p = self.dir.join(name);
        ok(&vhdtool(&[
            OsStr::new("create"),
            OsStr::new("--parent"),
            parent.as_os_str(),
            p.as_os_str(),
        ]));
        p
    }
}

/// Every verb that writes `img` (or, for merge and rebase, its child), as argument lists.
fn writing_verbs(img: &Path, child: &Path, other: &Path) -> Vec<(&'static str, Vec<PathBufOrStr>)> {
    use PathBufOrStr::{P, S};
    let data = img.with_extension("in");
    std::fs::write(&data, [1u8; 4096]).unwrap();
    vec![
        (
            "write",
            vec![
                S("write"),
                P(img.into()),
                S("--offset"),
                S("4096"),
                S("--input"),
                P(data),
            ],
        ),
        ("compact", vec![S("compact"), P(img.into())]),
        ("resize", vec![S("resize"), P(img.into()), S("+1M")]),
        (
            "check --repair",
            vec![S("check"), S("--repair"), P(img.into())],
        ),
        (
            "bench --rw write",
            vec![
                S("bench"),
                S("--rw"),
                S("write"),
                S("--runtime"),
                S("1"),
                P(img.into()),
            ],
        ),
        (
            "merge (into the held parent)",
            vec![S("merge"), P(child.into())],
        ),
        (
            "rebase (onto the held parent)",
            vec![S("rebase"), P(other.into()), S("--parent"), P(img.into())],
        ),
    ]
}

/// Every verb that only reads `img`.
fn reading_verbs(img: &Path, dir: &Path) -> Vec<(&'static str, Vec<PathBufOrStr>)> {
    use PathBufOrStr::{P, S};
    vec![
        ("info", vec![S("info"), P(img.into())]),
        ("check", vec![S("check"), P(img.into())]),
        ("map", vec![S("map"), P(img.into())]),
        (
            "read",
            vec![
                S("read"),
                P(img.into()),
                S("--offset"),
                S("0"),
                S("--length"),
                S("512"),
            ],
        ),
        ("compare", vec![S("compare"), P(img.into()), P(img.into())]),
        (
            "convert",
            vec![S("convert"), P(img.into()), P(dir.join("out.raw"))],
        ),
        (
            "measure",
            vec![S("measure"), S("-O"), S("vhdx"), P(img.into())],
        ),
    ]
}

enum PathBufOrStr {
    P(PathBuf),
    S(&'static str),
}

impl AsRef<OsStr> for PathBufOrStr {
    fn as_ref(&self) -> &OsStr {
        match self {
            PathBufOrStr::P(p) => p.as_os_str(),
            PathBufOrStr::S(s) => OsStr::new(s),
        }
    }
}

/// While `img` is held for writing, every writing and reading verb is refused and leaves every
/// file as it was; reading verbs succeed with --force-share and warn.
fn verbs_refused_while_written<H>(t: &Images, img: &Path, hold: impl FnOnce() -> H) {
    let ext = img.extension().unwrap().to_str().unwrap();
    let child = t.child(img, &format!("child.{ext}"));
    let other_parent = t.image(&format!("other.{ext}"));
    let other = t.child(&other_parent, &format!("other-child.{ext}"));
    let files = [img.to_path_buf(), child.clone(), other.clone()];
    let _h = hold();
    let before: Vec<Vec<u8>> = files.iter().map(|f| std::fs::read(f).unwrap()).collect();
    for (what, args) in writing_verbs(img, &child, &other) {
        assert_refused(what, &vhdtool(&args), img);
    }
    for (what, args) in reading_verbs(img, &t.dir) {
        assert_refused(what, &vhdtool(&args), img);
        let mut shared: Vec<PathBufOrStr> = args;
        shared.insert(1, PathBufOrStr::S("--force-share"));
        let _ = std::fs::remove_file(t.dir.join("out.raw"));
        let o = vhdtool(&shared);
        assert!(
            o.status.success() || (what == "check" && o.status.code() == Some(3)),
            "{what} --force-share: {}",
            String::from_utf8_lossy(&o.stderr)
        );
        assert!(
            String::from_utf8_lossy(&o.stderr).contains("may be changing"),
            "{what} --force-share does not warn"
        );
    }
    // No child is made over an image being written.
    let new_child = t.dir.join(format!("new-child.{ext}"));
    let o = vhdtool(&[
        OsStr::new("create"),
        OsStr::new("--parent"),
        img.as_os_str(),
        new_child.as_os_str(),
    ]);
    assert_refused("create --parent", &o, img);
    assert!(!new_child.exists(), "create --parent left {new_child:?}");
    let after: Vec<Vec<u8>> = files.iter().map(|f| std::fs::read(f).unwrap()).collect();
    for (f, (b, a)) in files.iter().zip(before.iter().zip(&after)) {
        assert!(b == a, "{f:?} changed while its refused verbs ran");
    }
}

#[test]
fn every_verb_is_refused_while_vhdtool_writes_the_image() {
    for ext in ["vhd", "vhdx"] {
        let t = Images::new();
        let img = t.image(&format!("disk.{ext}"));
        verbs_refused_while_written(&t, &img, || vhdtool_writer(&img));
    }
}

/// `vhdtool mount IMG DIR` (returns once mounted; the daemon holds the image); unmounted on drop.
struct Mounted(PathBuf);

impl Drop for Mounted {
    fn drop(&mut self) {
        let o = vhdtool(&[OsStr::new("umount"), self.0.as_os_str()]);
        if !o.status.success() {
            let _ = Command::new("umount").arg("-l").arg(&self.0).status();
        }
    }
}

#[test]
fn every_verb_is_refused_while_vhdtool_mount_holds_the_image() {
    let root = std::process::Command::new("id")
        .arg("-u")
        .output()
        .unwrap()
        .stdout
        == b"0\n";
    if !root || !Path::new("/dev/fuse").exists() {
        vhdkit_tests::skip_unless_ci("vhdtool mount needs root and /dev/fuse");
        return;
    }
    for ext in ["vhd", "vhdx"] {
        let t = Images::new();
        let img = t.image(&format!("disk.{ext}"));
        let dir = t.dir.join("mnt");
        std::fs::create_dir_all(&dir).unwrap();
        verbs_refused_while_written(&t, &img, || {
            ok(&vhdtool(&[
                OsStr::new("mount"),
                img.as_os_str(),
                dir.as_os_str(),
            ]));
            Mounted(dir.clone())
        });
    }
}

/// `vhdtool serve --unix SOCKET IMG`: holds the image for writing; SIGTERM on drop.
struct Serving(Child);

impl Drop for Serving {
    fn drop(&mut self) {
        let _ = Command::new("kill")
            .args(["-TERM", &self.0.id().to_string()])
            .status();
        let _ = self.0.wait();
    }
}

#[test]
fn every_verb_is_refused_while_vhdtool_serve_exports_the_image() {
    for ext in ["vhd", "vhdx"] {
        let t = Images::new();
        let img = t.image(&format!("disk.{ext}"));
        let socket = t.dir.join("nbd.sock");
        verbs_refused_while_written(&t, &img, || {
            let child = Command::new(env!("CARGO_BIN_EXE_vhdtool"))
                .args([
                    OsStr::new("serve"),
                    OsStr::new("--unix"),
                    socket.as_os_str(),
                ])
                .arg(&img)
                .stdout(Stdio::null())
                .spawn()
                .expect("spawn vhdtool serve");
            wait_for_lock_byte(&img, 101);
            Serving(child)
        });
    }
}

#[test]
fn every_verb_is_refused_while_qemu_writes_the_image() {
    if !vhdkit_tests::tool_or_skip("qemu-io") {
        return;
    }
    for (ext, fmt) in [("vhd", "vpc"), ("vhdx", "vhdx")] {
        let t = Images::new();
        let img = t.image(&format!("disk.{ext}"));
        verbs_refused_while_written(&t, &img, || qemu_io(&img, fmt, false));
    }
}

#[test]
fn writers_are_refused_and_readers_welcome_while_qemu_reads_the_image() {
    if !vhdkit_tests::tool_or_skip("qemu-io") {
        return;
    }
    for (ext, fmt) in [("vhd", "vpc"), ("vhdx", "vhdx")] {
        let t = Images::new();
        let img = t.image(&format!("disk.{ext}"));
        let child = t.child(&img, &format!("child.{ext}"));
        let other_parent = t.image(&format!("other.{ext}"));
        let other = t.child(&other_parent, &format!("other-child.{ext}"));
        let _h = qemu_io(&img, fmt, true);
        let before = std::fs::read(&img).unwrap();
        // (rebase only reads the new parent: it may point a child at an image others read)
        for (what, args) in writing_verbs(&img, &child, &other) {
            if !what.starts_with("rebase") {
                assert_refused(what, &vhdtool(&args), &img);
            }
        }
        for (what, args) in reading_verbs(&img, &t.dir) {
            let _ = std::fs::remove_file(t.dir.join("out.raw"));
            let o = vhdtool(&args);
            assert!(o.status.success(), "{what} beside a reader: {o:?}");
        }
        // A child over a parent someone reads is fine to write: the parent is only read.
        ok(&vhdtool(&[
            OsStr::new("write"),
            child.as_os_str(),
            OsStr::new("--offset"),
            OsStr::new("0"),
            OsStr::new("--input"),
            t.dir.join(format!("disk.{ext}.data")).as_os_str(),
        ]));
        assert!(std::fs::read(&img).unwrap() == before, "{img:?} changed");
    }
}

#[test]
fn qemu_img_refuses_an_image_vhdtool_writes_and_reads_it_with_force_share() {
    if !vhdkit_tests::tool_or_skip("qemu-img") {
        return;
    }
    for (ext, fmt) in [("vhd", "vpc"), ("vhdx", "vhdx")] {
        let t = Images::new();
        let img = t.image(&format!("disk.{ext}"));
        let _h = vhdtool_writer(&img);
        let o = Command::new("qemu-img")
            .args(["info", "-f", fmt])
            .arg(&img)
            .output()
            .unwrap();
        let err = String::from_utf8_lossy(&o.stderr);
        assert!(
            !o.status.success() && err.contains("lock"),
            "qemu-img info: {err}"
        );
        let o = Command::new("qemu-img")
            .args(["info", "-U", "-f", fmt])
            .arg(&img)
            .output()
            .unwrap();
        assert!(o.status.success(), "qemu-img info -U: {o:?}");
        let o = Command::new("qemu-io")
            .args(["-f", fmt, "-c", "write 0 512"])
            .arg(&img)
            .output()
            .unwrap();
        let err = String::from_utf8_lossy(&o.stderr);
        assert!(
            err.contains("lock") || !o.status.success(),
            "qemu-io wrote an image vhdtool writes: {err}"
        );
    }
}

/// The reported defect: two `vhdtool write`s of 64 MiB at once into one dynamic VHDX. Never may
/// both report success with either range lost; whatever succeeded reads back, and the image
/// checks clean.
#[test]
fn two_concurrent_writers_never_both_write_one_image() {
    for ext in ["vhd", "vhdx"] {
        let t = Images::new();
        let img = t.dir.join(format!("x.{ext}"));
        ok(&vhdtool(&[
            OsStr::new("create"),
            OsStr::new("--type"),
            OsStr::new("dynamic"),
            img.as_os_str(),
            OsStr::new("4G"),
        ]));
        let a = t.dir.join("a");
        let b = t.dir.join("b");
        std::fs::write(&a, vec![0xaa; 64 << 20]).unwrap();
        std::fs::write(&b, vec![0xbb; 64 << 20]).unwrap();
        for _round in 0..3 {
            let spawn = |input: &Path, offset: &str| {
                Command::new(env!("CARGO_BIN_EXE_vhdtool"))
                    .args([OsStr::new("write"), img.as_os_str()])
                    .args(["--offset", offset, "--input"])
                    .arg(input)
                    .stdout(Stdio::null())
                    .stderr(Stdio::piped())
                    .spawn()
                    .unwrap()
            };
            let pa = spawn(&a, "0");
            let pb = spawn(&b, "1G");
            let oa = pa.wait_with_output().unwrap();
            let ob = pb.wait_with_output().unwrap();
            for (o, name) in [(&oa, "a"), (&ob, "b")] {
                if !o.status.success() {
                    assert!(held(o), "writer {name} failed otherwise: {o:?}");
                }
            }
            for (o, offset, byte) in [(&oa, 0u64, 0xaau8), (&ob, 1 << 30, 0xbb)] {
                if o.status.success() {
                    let got = vhdtool(&[
                        OsStr::new("read"),
                        img.as_os_str(),
                        OsStr::new("--offset"),
                        OsStr::new(&offset.to_string()),
                        OsStr::new("--length"),
                        OsStr::new("67108864"),
                    ]);
                    assert!(got.status.success());
                    assert!(
                        got.stdout.iter().all(|&x| x == byte),
                        "range at {offset} lost"
                    );
                }
            }
            let c = vhdtool(&[OsStr::new("check"), img.as_os_str()]);
            assert_eq!(c.status.code(), Some(0), "{c:?}");
        }
    }
}

#[test]
fn a_reader_of_the_whole_chain_keeps_the_parent_from_being_written() {
    let t = Images::new();
    let parent = t.image("base.vhdx");
    let child = t.child(&parent, "child.vhdx");
    // The writer of the child holds the parent for reading (once the chain is open: the
    // parent is locked right after the child).
    let _h = vhdtool_writer(&child);
    wait_for_lock_byte(&parent, 201);
    let o = vhdtool(&[OsStr::new("resize"), parent.as_os_str(), OsStr::new("+1M")]);
    assert_refused("resize of a parent in use", &o, &parent);
    // Reading the parent is fine beside another reader.
    ok(&vhdtool(&[OsStr::new("info"), parent.as_os_str()]));
    let mut stdin = _h.0.stdin.as_ref().unwrap();
    stdin.write_all(&[7u8; 512]).unwrap();
}
