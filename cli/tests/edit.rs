//! End to end: the in-place editing verbs (`compact`, `resize`, `merge`, `rebase`) and
//! `measure`, on VHD and VHDX of each type. Content before and after is compared with
//! `vhdtool compare` and, where qemu-img reads the format (VHD fixed/dynamic, 512-byte VHDX),
//! with `qemu-img compare`; `vhdtool check` must be clean after every operation.

mod support;
use support::{fails, json, ok, vhdtool};
use vhdkit_tests::noise;

use std::ffi::OsStr;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use tempfile::TempDir;

fn tmp() -> TempDir {
    tempfile::tempdir().expect("tempdir")
}

/// Whether `tool` is on PATH; a missing one is a recorded skip (a failure under CI=true).
fn have(tool: &str) -> bool {
    vhdkit_tests::tool_or_skip(tool)
}

/// Runs vhdtool with `args` and kills it with SIGKILL after `delay_ms` (if still running).
fn run_killed_after(args: &[&OsStr], delay_ms: u64) {
    let mut p = Command::new(env!("CARGO_BIN_EXE_vhdtool"))
        .args(args)
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .spawn()
        .unwrap();
    std::thread::sleep(Duration::from_millis(delay_ms));
    let _ = p.kill();
    let _ = p.wait();
}

/// `vhdtool check` exits 0 (clean).
fn assert_clean(img: &Path) {
    let o = vhdtool(&[&"check", &img]);
    assert_eq!(
        o.status.code(),
        Some(0),
        "check of {} not clean: {}",
        img.display(),
        String::from_utf8_lossy(&o.stdout)
    );
}

/// `vhdtool compare` says the same; so does `qemu-img compare` when it can read `img`.
fn assert_same(raw: &Path, img: &Path, qemu_fmt: Option<&str>) {
    ok(&vhdtool(&[&"compare", &raw, &img]));
    if let Some(fmt) = qemu_fmt.filter(|_| have("qemu-img")) {
        let o = Command::new("qemu-img")
            .args(["compare", "-f", "raw", "-F", fmt])
            .arg(raw)
            .arg(img)
            .output()
            .expect("qemu-img");
        assert!(
            o.status.success(),
            "qemu-img compare {} {}: {}{}",
            raw.display(),
            img.display(),
            String::from_utf8_lossy(&o.stdout),
            String::from_utf8_lossy(&o.stderr)
        );
    }
}

/// A 48 MiB raw disk: data, a zeroed stretch, data, and zeros at the end.
fn raw_disk(dir: &Path) -> PathBuf {
    let mut d = noise(1, 48 << 20);
    d[(8 << 20)..(20 << 20)].fill(0);
    d[(40 << 20)..].fill(0);
    let p = dir.join("disk.raw");
    std::fs::write(&p, &d).unwrap();
    p
}

fn write_raw(raw: &Path, offset: u64, data: &[u8]) {
    use std::os::unix::fs::FileExt;
    let f = std::fs::OpenOptions::new().write(true).open(raw).unwrap();
    f.write_all_at(data, offset).unwrap();
}

fn write_img(img: &Path, offset: u64, data: &[u8], dir: &Path) {
    let input = dir.join("input.bin");
    std::fs::write(&input, data).unwrap();
    ok(&vhdtool(&[
        &"write",
        &img,
        &"--offset",
        &offset.to_string(),
        &"--input",
        &input,
    ]));
}

fn file_len(p: &Path) -> u64 {
    std::fs::metadata(p).unwrap().len()
}

/// (extension, convert options, qemu-img format name)
const DYNAMIC: [(&str, &[&str], &str); 2] = [
    ("vhd", &["-O", "vhd"], "vpc"),
    ("vhdx", &["-O", "vhdx", "--block-size", "1M"], "vhdx"),
];

fn convert(raw: &Path, dst: &Path, opts: &[&str]) {
    let mut args: Vec<&dyn AsRef<std::ffi::OsStr>> = vec![&"convert"];
    for o in opts {
        args.push(o);
    }
    args.push(&raw);
    args.push(&dst);
    ok(&vhdtool(&args));
}

#[test]
fn compact_releases_zeroed_blocks_and_keeps_content() {
    for (ext, opts, qfmt) in DYNAMIC {
        let d = tmp();
        let raw = raw_disk(d.path());
        let img = d.path().join(format!("a.{ext}"));
        convert(&raw, &img, opts);
        // The guest zeroes 8 MiB of data (sdelete -z style).
        write_img(&img, 24 << 20, &vec![0; 8 << 20], d.path());
        write_raw(&raw, 24 << 20, &vec![0; 8 << 20]);
        let before = file_len(&img);
        let r = json(&vhdtool(&[&"compact", &"--json", &img]));
        assert!(r["blocks-released"].as_u64().unwrap() >= 4, "{ext}: {r}");
        let after = file_len(&img);
        assert!(after + (8 << 20) <= before, "{ext}: {before} -> {after}");
        assert_eq!(r["file-size-after"].as_u64(), Some(after));
        assert_clean(&img);
        assert_same(&raw, &img, Some(qfmt));
    }
}

#[test]
fn quick_compact_leaves_zero_data_but_reclaims_discarded_space() {
    for (ext, opts, qfmt) in DYNAMIC {
        let d = tmp();
        let raw = raw_disk(d.path());
        let img = d.path().join(format!("a.{ext}"));
        convert(&raw, &img, opts);
        write_img(&img, 24 << 20, &vec![0; 8 << 20], d.path());
        write_raw(&raw, 24 << 20, &vec![0; 8 << 20]);
        let before = file_len(&img);
        let r = json(&vhdtool(&[
            &"compact", &"--mode", &"quick", &"--json", &img,
        ]));
        assert_eq!(r["blocks-released"], 0, "{ext}: quick reads no data: {r}");
        assert_eq!(file_len(&img), before);
        assert_clean(&img);
        assert_same(&raw, &img, Some(qfmt));
    }
}

#[test]
fn compact_of_a_differencing_child_drops_blocks_equal_to_the_parent() {
    for (ext, opts, _) in DYNAMIC {
        let d = tmp();
        let raw = raw_disk(d.path());
        let base = d.path().join(format!("base.{ext}"));
        convert(&raw, &base, opts);
        let child = d.path().join(format!("child.{ext}"));
        ok(&vhdtool(&[&"create", &"--parent", &base, &child]));
        // Rewrites of data the parent already has, and one real change.
        let same: Vec<u8> = std::fs::read(&raw).unwrap()[..(6 << 20)].to_vec();
        write_img(&child, 0, &same, d.path());
        let change = noise(9, 1 << 20);
        write_img(&child, 30 << 20, &change, d.path());
        write_raw(&raw, 30 << 20, &change);
        let before = file_len(&child);
        let r = json(&vhdtool(&[&"compact", &"--json", &child]));
        assert!(r["blocks-released"].as_u64().unwrap() >= 3, "{ext}: {r}");
        assert!(file_len(&child) + (5 << 20) <= before, "{ext}");
        assert_clean(&child);
        assert_same(&raw, &child, None);
    }
}

#[test]
fn compact_refuses_fixed_and_raw_images() {
    let d = tmp();
    let raw = raw_disk(d.path());
    let fixed = d.path().join("f.vhd");
    convert(&raw, &fixed, &["-O", "vhd", "--type", "fixed"]);
    assert!(fails(&vhdtool(&[&"compact", &fixed])).contains("fixed"));
    assert!(fails(&vhdtool(&[&"compact", &raw])).contains("raw"));
}

/// Every type qemu-img can read, plus a differencing child (checked with vhdtool only).
const ALL_TYPES: [(&str, &[&str], Option<&str>); 4] = [
    ("vhd", &["-O", "vhd"], Some("vpc")),
    ("vhd", &["-O", "vhd", "--type", "fixed"], Some("vpc")),
    ("vhdx", &["-O", "vhdx", "--block-size", "1M"], Some("vhdx")),
    (
        "vhdx",
        &["-O", "vhdx", "--type", "fixed", "--block-size", "1M"],
        Some("vhdx"),
    ),
];

fn virtual_size(img: &Path) -> u64 {
    json(&vhdtool(&[&"info", &"--json", &img]))["virtual-size"]
        .as_u64()
        .unwrap()
}

#[test]
fn resize_grows_every_type_with_zeros_and_shrinks_back() {
    for (i, (ext, opts, qfmt)) in ALL_TYPES.iter().enumerate() {
        let d = tmp();
        let raw = raw_disk(d.path());
        let img = d.path().join(format!("a{i}.{ext}"));
        convert(&raw, &img, opts);
        let r = json(&vhdtool(&[&"resize", &"--json", &img, &"+16M"]));
        assert_eq!(r["new-size"], 64 << 20, "{ext} {opts:?}");
        assert_eq!(virtual_size(&img), 64 << 20);
        std::fs::OpenOptions::new()
            .write(true)
            .open(&raw)
            .unwrap()
            .set_len(64 << 20)
            .unwrap();
        assert_clean(&img);
        assert_same(&raw, &img, *qfmt);
        // Back down over zeros: the disk's last 8 MiB were zeros already.
        ok(&vhdtool(&[&"resize", &img, &"40M"]));
        assert_eq!(virtual_size(&img), 40 << 20);
        std::fs::OpenOptions::new()
            .write(true)
            .open(&raw)
            .unwrap()
            .set_len(40 << 20)
            .unwrap();
        assert_clean(&img);
        assert_same(&raw, &img, *qfmt);
    }
}

#[test]
fn resize_refuses_to_shrink_over_data_and_says_how_much() {
    for (i, (ext, opts, _)) in ALL_TYPES.iter().enumerate() {
        let d = tmp();
        let raw = raw_disk(d.path());
        let img = d.path().join(format!("a{i}.{ext}"));
        convert(&raw, &img, opts);
        let e = fails(&vhdtool(&[&"resize", &img, &"-16M"]));
        // 32..40 MiB holds data: 8 MiB of it.
        assert!(
            e.contains(&format!("{} bytes of data", 8 << 20)),
            "{ext}: {e}"
        );
        assert!(e.contains(&format!("offset {}", 32 << 20)), "{ext}: {e}");
        assert_eq!(virtual_size(&img), 48 << 20);
        assert_clean(&img);
        assert_same(&raw, &img, None);
    }
}

#[test]
fn resize_of_a_differencing_child_counts_the_parents_data() {
    for (ext, opts, _) in DYNAMIC {
        let d = tmp();
        let raw = raw_disk(d.path());
        let base = d.path().join(format!("base.{ext}"));
        convert(&raw, &base, opts);
        let child = d.path().join(format!("child.{ext}"));
        ok(&vhdtool(&[&"create", &"--parent", &base, &child]));
        let e = fails(&vhdtool(&[&"resize", &child, &"30M"]));
        assert!(e.contains("from this image or its parents"), "{ext}: {e}");
        ok(&vhdtool(&[&"resize", &child, &"+8M"]));
        std::fs::OpenOptions::new()
            .write(true)
            .open(&raw)
            .unwrap()
            .set_len(56 << 20)
            .unwrap();
        assert_clean(&child);
        assert_same(&raw, &child, None);
    }
}

#[test]
fn resize_keeps_the_format_limits() {
    let d = tmp();
    let img = d.path().join("a.vhd");
    ok(&vhdtool(&[&"create", &img, &"1G"]));
    assert!(fails(&vhdtool(&[&"resize", &img, &"2041G"])).contains("2040 GiB"));
    let x = d.path().join("a.vhdx");
    ok(&vhdtool(&[&"create", &x, &"1G"]));
    assert!(fails(&vhdtool(&[&"resize", &x, &"65T"])).contains("64 TiB"));
    assert!(fails(&vhdtool(&[&"resize", &x, &"1000"])).contains("multiple of 512"));
}

/// base (data) <- mid (changes) <- top (changes); returns (raw view of top, base, mid, top).
fn three_deep(d: &Path, ext: &str, opts: &[&str]) -> (PathBuf, PathBuf, PathBuf, PathBuf) {
    let raw = raw_disk(d);
    let base = d.join(format!("base.{ext}"));
    convert(&raw, &base, opts);
    let mid = d.join(format!("mid.{ext}"));
    ok(&vhdtool(&[&"create", &"--parent", &base, &mid]));
    let a = noise(5, 3 << 20);
    write_img(&mid, (1 << 20) + 512, &a, d);
    write_raw(&raw, (1 << 20) + 512, &a);
    let top = d.join(format!("top.{ext}"));
    ok(&vhdtool(&[&"create", &"--parent", &mid, &top]));
    let b = noise(6, 5 << 20);
    write_img(&top, 2 << 20, &b, d);
    write_raw(&raw, 2 << 20, &b);
    write_img(&top, 36 << 20, &vec![0; 1 << 20], d);
    write_raw(&raw, 36 << 20, &vec![0; 1 << 20]);
    (raw, base, mid, top)
}

#[test]
fn merge_commits_a_child_into_its_parent_and_removes_it() {
    for (ext, opts, qfmt) in DYNAMIC {
        let d = tmp();
        let (raw, base, mid, top) = three_deep(d.path(), ext, opts);
        // top into mid (a differencing parent), then mid into base (a dynamic one).
        let r = json(&vhdtool(&[&"merge", &"--json", &top]));
        assert_eq!(
            r["parent"].as_str(),
            Some(mid.to_str().unwrap()),
            "{ext}: {r}"
        );
        assert!(!top.exists(), "{ext}: child not removed");
        assert_clean(&mid);
        assert_same(&raw, &mid, None);
        ok(&vhdtool(&[&"merge", &mid]));
        assert!(!mid.exists());
        assert_clean(&base);
        assert_same(&raw, &base, Some(qfmt));
    }
}

#[test]
fn merge_into_a_fixed_parent_writes_in_place() {
    for (ext, fmt, qfmt) in [("vhd", "vhd", "vpc"), ("vhdx", "vhdx", "vhdx")] {
        let d = tmp();
        let raw = raw_disk(d.path());
        let base = d.path().join(format!("base.{ext}"));
        convert(&raw, &base, &["-O", fmt, "--type", "fixed"]);
        let child = d.path().join(format!("c.{ext}"));
        ok(&vhdtool(&[&"create", &"--parent", &base, &child]));
        let b = noise(8, 3 << 20);
        write_img(&child, 10 << 20, &b, d.path());
        write_raw(&raw, 10 << 20, &b);
        let size = file_len(&base);
        ok(&vhdtool(&[&"merge", &child]));
        assert_eq!(file_len(&base), size, "{ext}: a fixed image does not grow");
        assert_clean(&base);
        assert_same(&raw, &base, Some(qfmt));
    }
}

#[test]
fn merge_refuses_a_disk_that_is_not_differencing() {
    let d = tmp();
    let img = d.path().join("a.vhd");
    ok(&vhdtool(&[&"create", &img, &"8M"]));
    assert!(fails(&vhdtool(&[&"merge", &img])).contains("not a differencing image"));
    assert!(img.exists());
}

#[test]
fn merge_killed_at_random_points_finishes_when_run_again() {
    for (ext, opts, _) in DYNAMIC {
        let d = tmp();
        let raw = raw_disk(d.path());
        let base = d.path().join(format!("base.{ext}"));
        convert(&raw, &base, opts);
        let child = d.path().join(format!("c.{ext}"));
        ok(&vhdtool(&[&"create", &"--parent", &base, &child]));
        let b = noise(10, 24 << 20);
        write_img(&child, 12 << 20, &b, d.path());
        write_raw(&raw, 12 << 20, &b);
        // Kill the merge at a spread of moments (no timing assumption: whatever point it reached).
        for delay_ms in [1u64, 5, 15, 40, 100] {
            if !child.exists() {
                break;
            }
            run_killed_after(&[OsStr::new("merge"), child.as_os_str()], delay_ms);
            if child.exists() {
                // Interrupted: the chain still reads as before.
                ok(&vhdtool(&[&"check", &"--repair", &base]));
                assert_same(&raw, &child, None);
            }
        }
        if child.exists() {
            ok(&vhdtool(&[&"merge", &child]));
        }
        assert!(!child.exists());
        assert_clean(&base);
        assert_same(&raw, &base, None);
    }
}

#[test]
fn rebase_relinks_a_moved_parent_and_refuses_a_different_disk() {
    for (ext, opts, _) in DYNAMIC {
        let d = tmp();
        let raw = raw_disk(d.path());
        let base = d.path().join(format!("base.{ext}"));
        convert(&raw, &base, opts);
        let child = d.path().join(format!("c.{ext}"));
        ok(&vhdtool(&[&"create", &"--parent", &base, &child]));
        let b = noise(11, 1 << 20);
        write_img(&child, 4 << 20, &b, d.path());
        write_raw(&raw, 4 << 20, &b);
        // The parent moves to another directory: the chain breaks.
        std::fs::create_dir(d.path().join("store")).unwrap();
        let moved = d.path().join("store").join(format!("renamed.{ext}"));
        std::fs::rename(&base, &moved).unwrap();
        assert!(!vhdtool(&[&"compare", &raw, &child]).status.success());
        // A different disk of the same size is refused, and nothing is written.
        let other = d.path().join(format!("other.{ext}"));
        convert(&raw, &other, opts);
        let before = std::fs::read(&child).unwrap();
        let e = fails(&vhdtool(&[&"rebase", &child, &"--parent", &other]));
        assert!(e.contains("is not the parent"), "{ext}: {e}");
        assert!(
            std::fs::read(&child).unwrap() == before,
            "{ext}: refused rebase wrote"
        );
        // The real parent is accepted.
        let r = json(&vhdtool(&[
            &"rebase",
            &"--json",
            &child,
            &"--parent",
            &moved,
        ]));
        assert!(
            r["relative-path"].as_str().unwrap().contains("store"),
            "{r}"
        );
        assert_clean(&child);
        assert_same(&raw, &child, None);
        let info = json(&vhdtool(&[&"info", &"--json", &child]));
        assert_eq!(
            info["parent"].as_str(),
            Some(std::fs::canonicalize(&moved).unwrap().to_str().unwrap())
        );
        // --unsafe re-links to the other disk (same content here), for recovery.
        ok(&vhdtool(&[
            &"rebase",
            &"--unsafe",
            &child,
            &"--parent",
            &other,
        ]));
        assert_clean(&child);
        assert_same(&raw, &child, None);
    }
}

/// A sparse 100 MiB raw disk with data in two places.
fn sparse_disk(dir: &Path) -> PathBuf {
    let p = dir.join("sparse.raw");
    let f = std::fs::File::create(&p).unwrap();
    f.set_len(100 << 20).unwrap();
    drop(f);
    write_raw(&p, 10 << 20, &noise(20, 3 << 20));
    write_raw(&p, (77 << 20) + 4096, &noise(21, 1 << 20));
    p
}

#[test]
fn measure_covers_what_convert_writes() {
    let d = tmp();
    let sources = [raw_disk(d.path()), sparse_disk(d.path())];
    let outputs: [&[&str]; 6] = [
        &["-O", "vhd"],
        &["-O", "vhd", "--type", "fixed"],
        &["-O", "vhd", "--block-size", "512K"],
        &["-O", "vhdx"],
        &["-O", "vhdx", "--block-size", "1M"],
        &["-O", "vhdx", "--type", "fixed", "--block-size", "8M"],
    ];
    for (i, src) in sources.iter().enumerate() {
        for (j, opts) in outputs.iter().enumerate() {
            let mut args: Vec<&dyn AsRef<std::ffi::OsStr>> = vec![&"measure", &"--json"];
            for o in opts.iter() {
                args.push(o);
            }
            args.push(src);
            let m = json(&vhdtool(&args));
            let dst = d.path().join(format!("o{i}-{j}.img"));
            convert(src, &dst, opts);
            let written = file_len(&dst);
            let required = m["required"].as_u64().unwrap();
            assert!(
                written <= required,
                "{opts:?} {}: convert wrote {written} > required {required}",
                src.display()
            );
            assert!(required <= m["fully-allocated"].as_u64().unwrap());
        }
    }
}

#[test]
fn measure_of_a_size_matches_an_empty_and_a_full_image() {
    let d = tmp();
    for (fmt, ext) in [("vhd", "vhd"), ("vhdx", "vhdx")] {
        for t in ["dynamic", "fixed"] {
            let m = json(&vhdtool(&[
                &"measure", &"--json", &"-O", &fmt, &"--type", &t, &"--size", &"100M",
            ]));
            let img = d.path().join(format!("e-{t}.{ext}"));
            ok(&vhdtool(&[&"create", &"--type", &t, &img, &"100M"]));
            assert_eq!(m["required"].as_u64(), Some(file_len(&img)), "{fmt} {t}");
        }
    }
}

#[test]
fn azure_output_is_a_fixed_vhd_of_whole_mebibytes_exact_in_qemu() {
    let d = tmp();
    let raw = d.path().join("odd.raw");
    std::fs::write(&raw, noise(30, 3_000_000)).unwrap();
    let vhd = d.path().join("azure.vhd");
    ok(&vhdtool(&[&"convert", &"--azure", &raw, &vhd]));
    let created = d.path().join("new.vhd");
    ok(&vhdtool(&[&"create", &"--azure", &created, &"1000001"]));
    for (img, want) in [(&vhd, 3u64 << 20), (&created, 1 << 20)] {
        let info = json(&vhdtool(&[&"info", &"--json", img]));
        assert_eq!(info["subformat"], "fixed");
        assert_eq!(info["virtual-size"].as_u64(), Some(want));
        assert_eq!(file_len(img), want + 512);
        assert_clean(img);
        if have("qemu-img") {
            let o = Command::new("qemu-img")
                .args(["info", "-f", "vpc", "--output=json"])
                .arg(img)
                .output()
                .unwrap();
            let q: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap();
            assert_eq!(
                q["virtual-size"].as_u64(),
                Some(want),
                "qemu-img size of {}",
                img.display()
            );
        }
    }
    // Content: the source, zero padded to 3 MiB.
    std::fs::OpenOptions::new()
        .write(true)
        .open(&raw)
        .unwrap()
        .set_len(3 << 20)
        .unwrap();
    assert_same(&raw, &vhd, Some("vpc"));
    assert!(fails(&vhdtool(&[
        &"convert",
        &"--azure",
        &"-O",
        &"vhdx",
        &raw,
        &d.path().join("x.vhdx")
    ]))
    .contains("fixed VHD"));
}

#[test]
fn completions_and_man_pages_cover_every_verb() {
    let bash = ok(&vhdtool(&[&"completions", &"bash"]));
    for verb in ["compact", "resize", "merge", "rebase", "measure", "convert"] {
        assert!(bash.contains(verb), "bash completions lack {verb}");
    }
    assert!(ok(&vhdtool(&[&"completions", &"zsh"])).contains("#compdef vhdtool"));
    let man = ok(&vhdtool(&[&"man"]));
    assert!(
        man.contains(".TH vhdtool 1"),
        "{}",
        &man[..200.min(man.len())]
    );
    let d = tmp();
    ok(&vhdtool(&[&"man", &"--dir", &d.path()]));
    for verb in ["compact", "resize", "merge", "rebase", "measure"] {
        let page = std::fs::read_to_string(d.path().join(format!("vhdtool-{verb}.1"))).unwrap();
        assert!(page.contains(&format!(".TH vhdtool-{verb} 1")), "{verb}");
    }
}

#[test]
fn compare_reports_json_with_the_first_difference() {
    let d = tmp();
    let raw = raw_disk(d.path());
    let img = d.path().join("a.vhd");
    convert(&raw, &img, &["-O", "vhd"]);
    let v = json(&vhdtool(&[&"compare", &"--json", &raw, &img]));
    assert_eq!(v["identical"], true);
    write_img(&img, 12345, &[0xAB], d.path());
    let o = vhdtool(&[&"compare", &"--json", &raw, &img]);
    assert_eq!(o.status.code(), Some(1));
    let v: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap();
    assert_eq!(v["first-difference"], 12345);
}

/// Attaches `file` (from `offset`, `len` bytes) as a loop device; `None` when this machine
/// cannot (not root, no loop devices): the P2V test then says so and skips.
fn loop_device(file: &Path, offset: u64, len: u64) -> Option<PathBuf> {
    let o = Command::new("losetup")
        .args([
            "-f",
            "--show",
            "-r",
            "-o",
            &offset.to_string(),
            "--sizelimit",
            &len.to_string(),
        ])
        .arg(file)
        .output()
        .ok()?;
    if !o.status.success() {
        vhdkit_tests::skip_unless_ci(&format!(
            "losetup failed: {}",
            String::from_utf8_lossy(&o.stderr).trim()
        ));
        return None;
    }
    Some(PathBuf::from(String::from_utf8_lossy(&o.stdout).trim()))
}

struct Detach(PathBuf);

impl Drop for Detach {
    fn drop(&mut self) {
        let _ = Command::new("losetup").arg("-d").arg(&self.0).status();
    }
}

#[test]
fn p2v_converts_a_block_device_and_a_partition_read_as_raw() {
    let d = tmp();
    let disk = d.path().join("physical.img");
    let bytes = noise(40, 24 << 20);
    std::fs::write(&disk, &bytes).unwrap();
    let Some(whole) = loop_device(&disk, 0, 24 << 20) else {
        return;
    };
    let _w = Detach(whole.clone());
    let Some(part) = loop_device(&disk, 1 << 20, 8 << 20) else {
        return;
    };
    let _p = Detach(part.clone());
    let info = json(&vhdtool(&[&"info", &"--json", &whole]));
    assert_eq!(info["format"], "raw");
    assert_eq!(info["virtual-size"], 24 << 20);
    let m = json(&vhdtool(&[&"measure", &"--json", &"-O", &"vhdx", &whole]));
    for (src, raw, name) in [
        (&whole, disk.clone(), "disk"),
        (&part, d.path().join("part.raw"), "part"),
    ] {
        if name == "part" {
            std::fs::write(&raw, &bytes[(1 << 20)..(9 << 20)]).unwrap();
        }
        for (ext, fmt, q) in [("vhdx", "vhdx", "vhdx"), ("vhd", "vhd", "vpc")] {
            let out = d.path().join(format!("{name}.{ext}"));
            ok(&vhdtool(&[&"convert", &"-O", &fmt, src, &out]));
            assert_clean(&out);
            assert_same(&raw, &out, Some(q));
            if name == "disk" && ext == "vhdx" {
                assert!(file_len(&out) <= m["required"].as_u64().unwrap());
            }
        }
    }
}

#[test]
fn convert_syncs_its_output_before_giving_it_its_name() {
    if !have("strace") {
        return;
    }
    let d = tmp();
    let raw = raw_disk(d.path());
    for fmt in ["raw", "vhd", "vhdx"] {
        let dst = d.path().join(format!("out.{fmt}"));
        let o = Command::new("strace")
            .args([
                "-f",
                "-e",
                "trace=fsync,fdatasync,linkat,rename,renameat,renameat2",
            ])
            .arg(env!("CARGO_BIN_EXE_vhdtool"))
            .args(["convert", "-O", fmt])
            .arg(&raw)
            .arg(&dst)
            .output()
            .unwrap();
        assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
        let trace = String::from_utf8_lossy(&o.stderr);
        let name = format!("\"{}\"", dst.display());
        let lines: Vec<&str> = trace.lines().collect();
        let publish = lines
            .iter()
            .position(|l| l.contains(&name) && (l.contains("linkat") || l.contains("rename")))
            .unwrap_or_else(|| panic!("{fmt}: output never named:\n{trace}"));
        assert!(
            lines[..publish]
                .iter()
                .any(|l| l.contains("fsync(") || l.contains("fdatasync(")),
            "{fmt}: no sync before the output got its name:\n{trace}"
        );
        assert!(
            lines[publish..].iter().any(|l| l.contains("fsync(")),
            "{fmt}: directory not synced after naming:\n{trace}"
        );
    }
}

#[test]
fn compact_killed_at_random_points_keeps_content_and_finishes_when_run_again() {
    for (ext, opts, qfmt) in DYNAMIC {
        let d = tmp();
        let raw = raw_disk(d.path());
        let img = d.path().join(format!("a.{ext}"));
        convert(&raw, &img, opts);
        // Zero out scattered stretches so compaction both releases and moves blocks.
        for at in [2u64, 6, 22, 30] {
            write_img(&img, at << 20, &vec![0; 2 << 20], d.path());
            write_raw(&raw, at << 20, &vec![0; 2 << 20]);
        }
        for delay_ms in [1u64, 5, 15, 40] {
            run_killed_after(&[OsStr::new("compact"), img.as_os_str()], delay_ms);
            // Whatever point it reached, the image reads the same (a VHDX log left by the
            // kill is replayed in memory by a read-only open) and, once a pending log is
            // replayed by --repair, shows no corruption (leaks allowed).
            assert_same(&raw, &img, None);
            let o = vhdtool(&[&"check", &"--repair", &img]);
            assert!(
                matches!(o.status.code(), Some(0 | 3)),
                "{ext}: {}",
                String::from_utf8_lossy(&o.stdout)
            );
            assert_same(&raw, &img, None);
        }
        ok(&vhdtool(&[&"compact", &img]));
        assert_clean(&img);
        assert_same(&raw, &img, Some(qfmt));
    }
}
