//! `vhdtool` end to end: each verb run as a process on temporary images, checking output,
//! exit codes and files left behind; cross-checked with qemu-img where it is installed.

mod support;
use support::{code, json, ok, vhdtool};

use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};

use tempfile::TempDir;

fn vhdtool_stdin(args: &[&dyn AsRef<std::ffi::OsStr>], input: &[u8]) -> Output {
    use std::io::Write;
    let mut child = Command::new(env!("CARGO_BIN_EXE_vhdtool"))
        .args(args.iter().map(|a| a.as_ref()))
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("spawn vhdtool");
    child
        .stdin
        .take()
        .expect("stdin")
        .write_all(input)
        .expect("feed stdin");
    child.wait_with_output().expect("wait vhdtool")
}

fn stderr(o: &Output) -> String {
    String::from_utf8_lossy(&o.stderr).into_owned()
}

fn tmp() -> TempDir {
    tempfile::tempdir().expect("tempdir")
}

/// Names of the files in `dir`.
fn files(dir: &Path) -> Vec<String> {
    let mut v: Vec<String> = std::fs::read_dir(dir)
        .expect("read dir")
        .map(|e| e.expect("entry").file_name().to_string_lossy().into_owned())
        .collect();
    v.sort();
    v
}

/// A file of `len` pseudo-random bytes.
fn data_file(path: &Path, len: usize, seed: u8) -> Vec<u8> {
    let d: Vec<u8> = (0..len)
        .map(|i| ((i as u64).wrapping_mul(2654435761) >> 13) as u8 ^ seed)
        .collect();
    std::fs::write(path, &d).expect("write data file");
    d
}

/// Whether qemu-img is on PATH; a missing one is a recorded skip (a failure under CI=true).
fn has_qemu_img() -> bool {
    vhdkit_tests::tool_or_skip("qemu-img")
}

#[test]
fn create_then_info_reports_a_dynamic_vhd() {
    let d = tmp();
    let img = d.path().join("a.vhd");
    ok(&vhdtool(&[&"create", &img, &"64M"]));
    let info = json(&vhdtool(&[&"info", &"--json", &img]));
    assert_eq!(info["format"], "vhd");
    assert_eq!(info["subformat"], "dynamic");
    assert_eq!(info["virtual-size"], 64 << 20);
    assert_eq!(info["block-size"], 2 << 20);
    assert_eq!(info["logical-sector-size"], 512);
    assert_eq!(info["parent"], serde_json::Value::Null);
    assert_eq!(info["backing-chain"].as_array().map(Vec::len), Some(1));
    assert!(info["actual-size"].as_u64().is_some());
    assert!(info["uuid"].as_str().is_some());
    let text = ok(&vhdtool(&[&"info", &img]));
    assert!(
        text.contains("virtual size: 64 MiB (67108864 bytes)"),
        "{text}"
    );
}

#[test]
fn create_refuses_to_overwrite() {
    let d = tmp();
    let img = d.path().join("a.vhd");
    std::fs::write(&img, b"precious").unwrap();
    let o = vhdtool(&[&"create", &img, &"1M"]);
    assert_eq!(code(&o), 1);
    assert!(stderr(&o).starts_with("vhdtool: "), "{}", stderr(&o));
    assert!(stderr(&o).contains("already exists"), "{}", stderr(&o));
    assert_eq!(std::fs::read(&img).unwrap(), b"precious");
}

#[test]
fn create_vhdx_with_hyper_v_defaults_and_4k_sectors() {
    let d = tmp();
    let a = d.path().join("a.vhdx");
    ok(&vhdtool(&[&"create", &a, &"1G"]));
    let info = json(&vhdtool(&[&"info", &"--json", &a]));
    assert_eq!(info["format"], "vhdx");
    assert_eq!(info["subformat"], "dynamic");
    assert_eq!(info["virtual-size"], 1 << 30);
    assert_eq!(info["block-size"], 32 << 20);
    assert_eq!(info["logical-sector-size"], 512);
    assert_eq!(info["physical-sector-size"], 4096);
    // -f wins over the extension; 4K logical sectors on request.
    let b = d.path().join("b.vhd");
    ok(&vhdtool(&[
        &"create",
        &"-f",
        &"vhdx",
        &"--logical-sector-size",
        &"4096",
        &"--block-size",
        &"1M",
        &b,
        &"64M",
    ]));
    let info = json(&vhdtool(&[&"info", &"--json", &b]));
    assert_eq!(info["format"], "vhdx");
    assert_eq!(info["logical-sector-size"], 4096);
    assert_eq!(info["block-size"], 1 << 20);
    // Sector sizes are VHDX options; bad values are usage errors.
    assert_eq!(
        code(&vhdtool(&[
            &"create",
            &"--logical-sector-size",
            &"4096",
            &d.path().join("c.vhd"),
            &"1M"
        ])),
        1
    );
    assert_ne!(
        code(&vhdtool(&[
            &"create",
            &"--logical-sector-size",
            &"1000",
            &d.path().join("d.vhdx"),
            &"1M"
        ])),
        0
    );
    // A VHDX child of a VHDX parent takes the parent's format and size.
    let child = d.path().join("child.avhdx");
    ok(&vhdtool(&[&"create", &"--parent", &a, &child]));
    let info = json(&vhdtool(&[&"info", &"--json", &child]));
    assert_eq!(info["subformat"], "differencing");
    assert_eq!(info["virtual-size"], 1 << 30);
    assert_eq!(info["parent"].as_str(), Some(a.to_str().unwrap()));
    // A VHD child of a VHDX parent is refused.
    assert_eq!(
        code(&vhdtool(&[
            &"create",
            &"-f",
            &"vhd",
            &"--parent",
            &a,
            &d.path().join("x.vhd")
        ])),
        1
    );
    let mut names = files(d.path());
    names.sort();
    assert_eq!(names, vec!["a.vhdx", "b.vhd", "child.avhdx"]);
}

#[test]
fn create_fixed_and_differencing() {
    let d = tmp();
    let (base, child) = (d.path().join("base.vhd"), d.path().join("child.vhd"));
    ok(&vhdtool(&[&"create", &"--type", &"fixed", &base, &"4M"]));
    assert_eq!(std::fs::metadata(&base).unwrap().len(), (4 << 20) + 512);
    // Wrong size for a child is refused; the parent's size is used otherwise.
    let o = vhdtool(&[&"create", &"--parent", &base, &child, &"8M"]);
    assert_eq!(code(&o), 1);
    ok(&vhdtool(&[&"create", &"--parent", &base, &child]));
    let info = json(&vhdtool(&[&"info", &"--json", &child]));
    assert_eq!(info["subformat"], "differencing");
    assert_eq!(info["virtual-size"], 4 << 20);
    assert_eq!(info["parent"].as_str(), Some(base.to_str().unwrap()));
    assert_eq!(
        info["backing-chain"][1].as_str(),
        Some(base.to_str().unwrap())
    );
}

#[test]
fn write_and_read_any_byte_range() {
    let d = tmp();
    let img = d.path().join("a.vhd");
    ok(&vhdtool(&[
        &"create",
        &"--block-size",
        &"512K",
        &img,
        &"4M",
    ]));
    let input = d.path().join("in.bin");
    let data = data_file(&input, 1_000_003, 1);
    ok(&vhdtool(&[
        &"write",
        &img,
        &"--offset",
        &"777",
        &"--input",
        &input,
    ]));
    let out = vhdtool(&[&"read", &img, &"--offset", &"777", &"--length", &"1000003"]);
    assert!(out.status.success());
    assert_eq!(out.stdout, data);
    // stdin input, hex offsets.
    ok(&vhdtool_stdin(
        &[&"write", &img, &"--offset", &"0x100", &"--input", &"-"],
        b"hello",
    ));
    let out = vhdtool(&[&"read", &img, &"--offset", &"256", &"--length", &"5"]);
    assert_eq!(out.stdout, b"hello");
    // Past the end: an error, nothing written.
    let o = vhdtool(&[&"write", &img, &"--offset", &"4M", &"--input", &input]);
    assert_eq!(code(&o), 1);
    let o = vhdtool(&[&"read", &img, &"--offset", &"4095K", &"--length", &"2K"]);
    assert_eq!(code(&o), 1);
    assert!(stderr(&o).contains("past the end"), "{}", stderr(&o));
}

#[test]
fn convert_flattens_a_chain_and_compare_agrees() {
    let d = tmp();
    let (base, child) = (d.path().join("base.vhd"), d.path().join("child.vhd"));
    ok(&vhdtool(&[&"create", &base, &"8M"]));
    let input = d.path().join("in.bin");
    data_file(&input, 3 << 20, 2);
    ok(&vhdtool(&[
        &"write",
        &base,
        &"--offset",
        &"1M",
        &"--input",
        &input,
    ]));
    ok(&vhdtool(&[&"create", &"--parent", &base, &child]));
    ok(&vhdtool_stdin(
        &[&"write", &child, &"--offset", &"2000000", &"--input", &"-"],
        &[0xEE; 70_000],
    ));
    let raw = d.path().join("flat.img");
    ok(&vhdtool(&[&"convert", &child, &raw]));
    assert_eq!(std::fs::metadata(&raw).unwrap().len(), 8 << 20);
    assert_eq!(code(&vhdtool(&[&"compare", &child, &raw])), 0);
    for (name, extra) in [
        ("dyn.vhd", vec!["--block-size", "512K"]),
        ("fixed.vhd", vec!["--type", "fixed"]),
        ("sparse-fixed.vhd", vec!["--type", "fixed", "--sparse"]),
    ] {
        let out = d.path().join(name);
        let mut args: Vec<&dyn AsRef<std::ffi::OsStr>> = vec![&"convert", &"-O", &"vhd"];
        args.extend(extra.iter().map(|a| a as &dyn AsRef<std::ffi::OsStr>));
        args.push(&child);
        args.push(&out);
        ok(&vhdtool(&args));
        let o = vhdtool(&[&"compare", &out, &raw]);
        assert_eq!(code(&o), 0, "{name}: {}", ok(&o));
        assert_eq!(code(&vhdtool(&[&"check", &out])), 0, "{name} checks clean");
        if has_qemu_img() {
            let q = Command::new("qemu-img")
                .args(["compare", "-f", "vpc", "-F", "raw"])
                .arg(&out)
                .arg(&raw)
                .output()
                .unwrap();
            assert!(q.status.success(), "qemu-img compare {name}: {q:?}");
        }
    }
    // No temporary files are left behind.
    assert!(
        files(d.path()).iter().all(|f| !f.contains("tmp")),
        "{:?}",
        files(d.path())
    );
}

#[test]
fn convert_to_dynamic_leaves_zero_blocks_unallocated() {
    let d = tmp();
    let src = d.path().join("src.img");
    let f = std::fs::File::create(&src).unwrap();
    f.set_len(16 << 20).unwrap();
    drop(f);
    // Data only in the third 2 MiB block; explicit zeros written in the first.
    ok(&vhdtool_stdin(
        &[&"write", &src, &"--offset", &"4M", &"--input", &"-"],
        &[7u8; 4096],
    ));
    ok(&vhdtool_stdin(
        &[&"write", &src, &"--offset", &"0", &"--input", &"-"],
        &vec![0u8; 1 << 20],
    ));
    let out = d.path().join("out.vhd");
    ok(&vhdtool(&[&"convert", &src, &out]));
    let map = json(&vhdtool(&[&"map", &"--json", &out]));
    let data: Vec<_> = map
        .as_array()
        .unwrap()
        .iter()
        .filter(|e| e["data"] == true)
        .collect();
    assert_eq!(data.len(), 1, "{map}");
    assert_eq!(data[0]["start"], 4 << 20);
    assert!(std::fs::metadata(&out).unwrap().len() < 3 << 20);
    assert_eq!(code(&vhdtool(&[&"compare", &src, &out])), 0);
}

#[test]
fn convert_refuses_existing_destination_without_force() {
    let d = tmp();
    let src = d.path().join("src.vhd");
    ok(&vhdtool(&[&"create", &src, &"1M"]));
    let dst = d.path().join("dst.img");
    std::fs::write(&dst, b"keep me").unwrap();
    let o = vhdtool(&[&"convert", &src, &dst]);
    assert_eq!(code(&o), 1);
    assert!(stderr(&o).contains("--force"), "{}", stderr(&o));
    assert_eq!(std::fs::read(&dst).unwrap(), b"keep me");
    ok(&vhdtool(&[&"convert", &"--force", &src, &dst]));
    assert_eq!(std::fs::metadata(&dst).unwrap().len(), 1 << 20);
    assert_eq!(files(d.path()), vec!["dst.img", "src.vhd"]);
}

#[test]
fn convert_failure_leaves_no_output() {
    let d = tmp();
    let (base, child) = (d.path().join("base.vhd"), d.path().join("child.vhd"));
    ok(&vhdtool(&[&"create", &base, &"1M"]));
    ok(&vhdtool(&[&"create", &"--parent", &base, &child]));
    std::fs::remove_file(&base).unwrap();
    let o = vhdtool(&[&"convert", &child, &d.path().join("out.img")]);
    assert_eq!(code(&o), 1);
    assert!(stderr(&o).contains("not found; tried:"), "{}", stderr(&o));
    assert_eq!(files(d.path()), vec!["child.vhd"]);
}

#[test]
fn compare_reports_first_differing_byte_and_size_rules() {
    let d = tmp();
    let (a, b) = (d.path().join("a.img"), d.path().join("b.vhd"));
    let f = std::fs::File::create(&a).unwrap();
    f.set_len(2 << 20).unwrap();
    drop(f);
    ok(&vhdtool(&[&"create", &b, &"3M"]));
    // Different sizes, extra part zero: identical.
    let o = vhdtool(&[&"compare", &a, &b]);
    assert_eq!(code(&o), 0, "{}", ok(&o));
    assert!(ok(&o).contains("Images are identical."));
    ok(&vhdtool_stdin(
        &[&"write", &b, &"--offset", &"12345", &"--input", &"-"],
        b"x",
    ));
    let o = vhdtool(&[&"compare", &a, &b]);
    assert_eq!(code(&o), 1);
    assert!(ok_any(&o).contains("Content mismatch at offset 12345!"));
    // A non-zero byte in the extra part of the larger image is a mismatch too.
    ok(&vhdtool_stdin(
        &[&"write", &a, &"--offset", &"12345", &"--input", &"-"],
        b"x",
    ));
    ok(&vhdtool_stdin(
        &[&"write", &b, &"--offset", &"2500000", &"--input", &"-"],
        b"y",
    ));
    let o = vhdtool(&[&"compare", &b, &a]);
    assert_eq!(code(&o), 1);
    assert!(ok_any(&o).contains("Content mismatch at offset 2500000!"));
    // Errors exit 2.
    let o = vhdtool(&[&"compare", &a, &d.path().join("missing")]);
    assert_eq!(code(&o), 2);
}

fn ok_any(o: &Output) -> String {
    String::from_utf8_lossy(&o.stdout).into_owned()
}

#[test]
fn check_exit_codes_follow_qemu_img() {
    let d = tmp();
    let raw = d.path().join("r.img");
    std::fs::write(&raw, vec![0u8; 4096]).unwrap();
    let o = vhdtool(&[&"check", &raw]);
    assert_eq!(code(&o), 0);
    assert!(ok(&o).contains("nothing to check"));

    let (base, child) = (d.path().join("base.vhd"), d.path().join("child.vhd"));
    ok(&vhdtool(&[&"create", &base, &"1M"]));
    ok(&vhdtool(&[&"create", &"--parent", &base, &child]));
    assert_eq!(code(&vhdtool(&[&"check", &child])), 0);
    let rep = json(&vhdtool(&[&"check", &"--json", &base]));
    assert_eq!(rep["result"], "clean");

    // A missing parent is a corruption finding (2), not a failure to check (1).
    std::fs::rename(&base, d.path().join("moved.vhd")).unwrap();
    let o = vhdtool(&[&"check", &child]);
    assert_eq!(code(&o), 2, "{}", ok_any(&o));
    assert!(ok_any(&o).contains("parent link"));

    // A corrupt footer checksum: 2, repaired by --repair (0), then clean.
    let v = d.path().join("v.vhd");
    ok(&vhdtool(&[&"create", &v, &"1M"]));
    let mut bytes = std::fs::read(&v).unwrap();
    let n = bytes.len();
    bytes[n - 512 + 64] ^= 0xFF; // a checksum byte of the trailing footer
    std::fs::write(&v, &bytes).unwrap();
    assert_eq!(code(&vhdtool(&[&"check", &v])), 2);
    let o = vhdtool(&[&"check", &"--repair", &v]);
    assert_eq!(code(&o), 0, "{}", ok_any(&o));
    assert_eq!(code(&vhdtool(&[&"check", &v])), 0);

    // Not checkable at all: 1.
    let o = vhdtool(&[&"check", &d.path().join("missing.vhd")]);
    assert_eq!(code(&o), 1);
}

#[test]
fn qemu_img_made_vhdx_checks_clean_and_json_lists_the_unused_space() {
    if !vhdkit_tests::tool_or_skip("qemu-img") {
        return;
    }
    let d = tmp();
    let raw = d.path().join("src.raw");
    data_file(&raw, 3 << 20, 7);
    for (name, args) in [
        ("created.vhdx", vec!["create", "-q", "-f", "vhdx"]),
        (
            "fixed.vhdx",
            vec!["create", "-q", "-f", "vhdx", "-o", "subformat=fixed"],
        ),
        (
            "converted.vhdx",
            vec!["convert", "-f", "raw", "-O", "vhdx", "-o", "block_size=1M"],
        ),
    ] {
        let img = d.path().join(name);
        let mut q = Command::new("qemu-img");
        q.args(&args);
        if args[0] == "convert" {
            q.arg(&raw).arg(&img);
        } else {
            q.arg(&img).arg("16M");
        }
        assert!(q.status().unwrap().success(), "qemu-img {args:?}");
        let o = vhdtool(&[&"check", &img]);
        assert_eq!(code(&o), 0, "{name}: {}", ok_any(&o));
        assert!(ok(&o).contains("No errors were found"), "{name}");
        let rep = json(&vhdtool(&[&"check", &"--json", &img]));
        assert_eq!(rep["result"], "clean", "{name}: {rep}");
        assert_eq!(rep["leaks"].as_array().unwrap().len(), 0, "{name}: {rep}");
        let unused = rep["unused"].as_array().unwrap();
        assert!(
            !unused.is_empty(),
            "{name}: qemu-img keeps space free: {rep}"
        );
        let total: u64 = unused.iter().map(|u| u["length"].as_u64().unwrap()).sum();
        assert_eq!(rep["unused-bytes"].as_u64(), Some(total), "{name}");
        for u in unused {
            assert!(u["offset"].as_u64().unwrap() >= 1 << 20, "{name}: {u}");
            assert!(u["compact-releases"].is_boolean(), "{name}: {u}");
            assert!(
                u["message"].as_str().unwrap().contains("not a leak"),
                "{name}: {u}"
            );
        }
    }
    // Space appended to a written qemu-img image is a leak: exit 3, and --repair gives it back.
    let img = d.path().join("converted.vhdx");
    let before = std::fs::metadata(&img).unwrap().len();
    let f = std::fs::OpenOptions::new().write(true).open(&img).unwrap();
    f.set_len(before + (2 << 20)).unwrap();
    let o = vhdtool(&[&"check", &"--json", &img]);
    assert_eq!(code(&o), 3, "{}", ok_any(&o));
    let rep: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap();
    assert_eq!(rep["result"], "leaks");
    assert_eq!(rep["leaked-bytes"].as_u64(), Some(2 << 20));
    assert_eq!(code(&vhdtool(&[&"check", &"--repair", &img])), 0);
    assert_eq!(std::fs::metadata(&img).unwrap().len(), before);
}

#[test]
fn map_text_and_json_agree_on_data() {
    let d = tmp();
    let img = d.path().join("m.vhd");
    ok(&vhdtool(&[
        &"create",
        &"--block-size",
        &"512K",
        &img,
        &"4M",
    ]));
    ok(&vhdtool_stdin(
        &[&"write", &img, &"--offset", &"1M", &"--input", &"-"],
        &[1u8; 1000],
    ));
    let map = json(&vhdtool(&[&"map", &"--json", &img]));
    let arr = map.as_array().unwrap();
    let total: u64 = arr.iter().map(|e| e["length"].as_u64().unwrap()).sum();
    assert_eq!(total, 4 << 20);
    let data: Vec<_> = arr.iter().filter(|e| e["data"] == true).collect();
    assert_eq!(data.len(), 1);
    assert_eq!(data[0]["start"], 1 << 20);
    assert_eq!(data[0]["length"], 512 << 10);
    let text = ok(&vhdtool(&[&"map", &img]));
    let lines: Vec<&str> = text.lines().collect();
    assert_eq!(lines.len(), 2, "{text}");
    assert!(lines[1].starts_with("0x100000"), "{text}");
}

#[test]
fn inspecting_verbs_never_write() {
    let d = tmp();
    let (base, child) = (d.path().join("base.vhd"), d.path().join("child.vhd"));
    ok(&vhdtool(&[&"create", &base, &"2M"]));
    ok(&vhdtool(&[&"create", &"--parent", &base, &child]));
    ok(&vhdtool_stdin(
        &[&"write", &child, &"--offset", &"0", &"--input", &"-"],
        b"abc",
    ));
    let snapshot = |p: &PathBuf| std::fs::read(p).unwrap();
    let before = (snapshot(&base), snapshot(&child));
    ok(&vhdtool(&[&"info", &child]));
    ok(&vhdtool(&[&"info", &"--json", &child]));
    ok(&vhdtool(&[&"check", &child]));
    ok(&vhdtool(&[&"map", &child]));
    ok(&vhdtool(&[
        &"read",
        &child,
        &"--offset",
        &"0",
        &"--length",
        &"2M",
    ]));
    assert_eq!(code(&vhdtool(&[&"compare", &child, &base])), 1);
    assert!((snapshot(&base), snapshot(&child)) == before);
}

#[test]
fn bad_arguments_are_usage_errors_without_panics() {
    for args in [
        vec!["create", "x.vhd", "12Q"],
        vec!["read", "x", "--offset", "-1", "--length", "1"],
        vec!["convert", "-O", "qcow2", "a", "b"],
        vec!["nope"],
    ] {
        let o = vhdtool(
            &args
                .iter()
                .map(|a| a as &dyn AsRef<std::ffi::OsStr>)
                .collect::<Vec<_>>(),
        );
        assert_eq!(code(&o), 2, "{args:?}");
        assert!(!stderr(&o).contains("panicked"), "{args:?}");
    }
    let d = tmp();
    let junk = d.path().join("junk.vhd");
    // A file claiming to be a VHD (cookie at offset 0) but garbage otherwise.
    let mut bytes = b"conectix".to_vec();
    bytes.resize(4096, 0xAB);
    std::fs::write(&junk, &bytes).unwrap();
    for verb in ["info", "map"] {
        let o = vhdtool(&[&verb, &junk]);
        assert_eq!(code(&o), 1, "{verb}");
        assert!(!stderr(&o).contains("panicked"), "{verb}: {}", stderr(&o));
    }
}

#[test]
fn bench_through_virtio_drives_the_device_model_with_its_own_ring() {
    let d = tmp();
    let img = d.path().join("bench.vhdx");
    ok(&vhdtool(&[&"create", &img, &"64M"]));
    for (rw, engine) in [("randwrite", "sync"), ("randread", "io_uring")] {
        let report = json(&vhdtool(&[
            &"bench",
            &"--through",
            &"virtio",
            &"--rw",
            &rw,
            &"--engine",
            &engine,
            &"--runtime",
            &"0.2",
            &"--iodepth",
            &"8",
            &"--json",
            &img,
        ]));
        assert!(
            report["engine"].as_str().unwrap().contains("virtio-blk"),
            "{report}"
        );
        assert!(report["requests"].as_u64().unwrap() > 0, "{report}");
    }
    // Every write went through the device into the image's metadata.
    ok(&vhdtool(&[&"check", &img]));
    let map = json(&vhdtool(&[&"map", &"--json", &img]));
    assert!(
        map.as_array().unwrap().iter().any(|e| e["data"] == true),
        "the virtio writes allocated nothing: {map}"
    );
}
