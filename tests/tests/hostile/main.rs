//! Hostile input: generated damage to real and created VHD and VHDX files, each damaged file run
//! through `vhdtool info --json`, `vhdtool check` and `vhdtool convert -O raw` as processes under a
//! 4 GiB address-space limit and a 20 s timeout.
//!
//! ```text
//!  fixture (vhdtool create + write, or a real image)
//!     └─ damage: truncate at each structure boundary | flip a byte of each header/table field
//!               | re-sealed huge/zero/odd values in each size, offset and count field
//!               | BAT entries past EOF / over metadata / over each other
//!               | log entries whose descriptors point anywhere | malformed UTF-16 names
//!               | parent chains that cycle, run 1,000 deep, or lead to FIFOs and devices
//!     └─ info --json, check, convert -O raw  (each bounded)
//!     └─ verdict (below)
//! ```
//!
//! Every run must end by itself (no hang, no signal, no panic) and either succeed correctly or
//! fail with `vhdtool: <message>` naming the file and a structure. The input files must be
//! byte-identical afterwards and a failed convert must leave nothing behind. Consistency between
//! verbs: an image `check` calls clean (exit 0, or 3 for leaks only) must give `info` and
//! `convert`, and a converted disk has the size `info` reports. Some damage must be noticed:
//! a flipped byte in a checksummed header, a BAT entry past the end of the file or over
//! metadata, a parent chain that cycles or runs too deep.

#[path = "../support/mod.rs"]
mod support;

mod chains;
mod vhd;
mod vhdx;

use chains::*;
use vhd::*;
use vhdx::*;

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use support::{pattern, vhd as v, vhdtool_bounded, vhdtool_ok, vhdtool_write, vhdx as x, Outcome};

/// What a damaged image must do beyond the rules every run follows.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Expect {
    /// Succeed correctly or fail clearly.
    Any,
    /// `check` must report it (exit 2, or 1 when it cannot check at all).
    Detected,
    /// Its disk cannot be read: `convert` fails and `check` exits 1 or 2 (`info` may still
    /// describe the file, as `qemu-img info` does without opening the backing chain).
    Unusable,
}

/// One damaged set of files, run in a directory of its own.
struct Case {
    name: String,
    /// Files written into the case directory (name, bytes).
    files: Vec<(String, Vec<u8>)>,
    /// The file the verbs run on.
    target: String,
    expect: Expect,
    /// Names of FIFOs to create beside the files.
    fifos: Vec<String>,
}

impl Case {
    fn one(name: impl Into<String>, file: &str, bytes: Vec<u8>, expect: Expect) -> Case {
        Case {
            name: name.into(),
            files: vec![(file.into(), bytes)],
            target: file.into(),
            expect,
            fifos: vec![],
        }
    }
}

/// Words that name a structure in error messages.
const STRUCTURES: &[&str] = &[
    "footer",
    "header",
    "BAT",
    "bitmap",
    "locator",
    "parent",
    "log",
    "region",
    "metadata",
    "identifier",
    "signature",
    "block",
    "sector",
    "chain",
    "size",
    "file is",
    "past the end",
    "truncated",
];

/// Names of the entries of `dir`, and the bytes of those that are regular files.
fn snapshot(dir: &Path) -> BTreeMap<String, Option<Vec<u8>>> {
    std::fs::read_dir(dir)
        .unwrap()
        .flatten()
        .map(|e| {
            let name = e.file_name().to_string_lossy().into_owned();
            let bytes = (e.file_type().is_ok_and(|t| t.is_file()) && name != "converted.raw")
                .then(|| std::fs::read(e.path()).unwrap());
            (name, bytes)
        })
        .collect()
}

fn mkfifo(path: &Path) {
    let c = std::ffi::CString::new(path.as_os_str().as_encoded_bytes()).unwrap();
    // SAFETY: `c` is a valid NUL-terminated path that outlives the call.
    let rc = unsafe { libc::mkfifo(c.as_ptr(), 0o600) };
    assert_eq!(rc, 0, "mkfifo {}", path.display());
}

/// Runs the three verbs on one case; returns what went wrong (empty when all is well).
fn run_case(case: &Case, root: &Path) -> Vec<String> {
    let dir = root.join(
        case.name
            .chars()
            .map(|c| {
                if c.is_ascii_alphanumeric() || c == '-' {
                    c
                } else {
                    '_'
                }
            })
            .collect::<String>(),
    );
    std::fs::create_dir_all(&dir).unwrap();
    for (name, bytes) in &case.files {
        write_pages(&dir.join(name), bytes, &nonzero_pages(bytes));
    }
    for f in &case.fifos {
        mkfifo(&dir.join(f));
    }
    // What the directory must hold afterwards (the files as written, the FIFOs).
    let before: BTreeMap<String, Option<Vec<u8>>> = case
        .files
        .iter()
        .map(|(n, b)| (n.clone(), Some(b.clone())))
        .chain(case.fifos.iter().map(|f| (f.clone(), None)))
        .collect();
    let target = dir.join(&case.target);
    let out = dir.join("converted.raw");
    let t = target.as_os_str();
    let info = vhdtool_bounded(&[std::ffi::OsStr::new("info"), "--json".as_ref(), t]);
    let check = vhdtool_bounded(&["check".as_ref(), t]);
    let conv = vhdtool_bounded(&[
        "convert".as_ref(),
        "-O".as_ref(),
        "raw".as_ref(),
        t,
        out.as_os_str(),
    ]);

    let mut problems = Vec::new();
    let names: Vec<&str> = case
        .files
        .iter()
        .map(|(n, _)| n.as_str())
        .chain(case.fifos.iter().map(String::as_str))
        .collect();
    let clear_error = |verb: &str, o: &Outcome, problems: &mut Vec<String>| {
        let msg = o.stderr.trim();
        if !msg.starts_with("vhdtool: ") {
            problems.push(format!(
                "{verb}: failed without a `vhdtool:` message: {msg:?}"
            ));
        }
        if !names.iter().any(|n| msg.contains(n)) {
            problems.push(format!("{verb}: error does not name the file: {msg:?}"));
        }
        if !STRUCTURES.iter().any(|s| msg.contains(s)) {
            problems.push(format!("{verb}: error names no structure: {msg:?}"));
        }
    };
    for (verb, o) in [("info", &info), ("check", &check), ("convert", &conv)] {
        if let Some(m) = o.misbehaviour() {
            problems.push(format!("{verb}: {m}; stderr: {}", o.stderr.trim()));
        }
    }
    if !problems.is_empty() {
        return problems;
    }
    // info
    let mut size = None;
    match info.code {
        Some(0) => match serde_json::from_str::<serde_json::Value>(&info.stdout) {
            Ok(j) => size = j["virtual-size"].as_u64(),
            Err(e) => problems.push(format!("info: exit 0 but not JSON ({e}): {}", info.stdout)),
        },
        Some(1) => clear_error("info", &info, &mut problems),
        c => problems.push(format!("info: exit {c:?}")),
    }
    // check
    match check.code {
        Some(0 | 3) => {}
        Some(2) => {
            if !check.stdout.contains("ERROR") {
                problems.push(format!(
                    "check: exit 2 without an ERROR line: {}",
                    check.stdout
                ));
            }
        }
        Some(1) => clear_error("check", &check, &mut problems),
        c => problems.push(format!("check: exit {c:?}")),
    }
    // convert
    match conv.code {
        Some(0) => match std::fs::metadata(&out) {
            Ok(m) => {
                if let Some(s) = size {
                    if m.len() != s {
                        problems.push(format!("convert: {} bytes out, info says {s}", m.len()));
                    }
                }
            }
            Err(_) => problems.push("convert: exit 0 but no output".into()),
        },
        Some(1) => clear_error("convert", &conv, &mut problems),
        c => problems.push(format!("convert: exit {c:?}")),
    }
    // Consistency between verbs.
    if matches!(check.code, Some(0 | 3)) && (info.code != Some(0) || conv.code != Some(0)) {
        problems.push(format!(
            "check calls it usable (exit {:?}) but info exits {:?} and convert {:?}: {} {}",
            check.code,
            info.code,
            conv.code,
            info.stderr.trim(),
            conv.stderr.trim()
        ));
    }
    match case.expect {
        Expect::Any => {}
        Expect::Detected => {
            if !matches!(check.code, Some(1 | 2)) {
                problems.push(format!("check missed the damage (exit {:?})", check.code));
            }
        }
        Expect::Unusable => {
            if conv.code == Some(0) || !matches!(check.code, Some(1 | 2)) {
                problems.push(format!(
                    "expected unusable, got info {:?}, check {:?}, convert {:?}",
                    info.code, check.code, conv.code
                ));
            }
        }
    }
    // Inputs untouched; nothing left behind but a successful output.
    let mut after = snapshot(&dir);
    if conv.code == Some(0) {
        after.remove("converted.raw");
    }
    if after != before {
        let changed: Vec<&String> = after
            .keys()
            .chain(before.keys())
            .filter(|k| after.get(*k) != before.get(*k))
            .collect();
        problems.push(format!("files changed or left behind: {changed:?}"));
    }
    if problems.is_empty() {
        let _ = std::fs::remove_dir_all(&dir);
    }
    problems
}

/// Runs every case (on as many threads as there are CPUs) and fails listing every problem.
fn run_all(suite: &str, cases: Vec<Case>) {
    let root = vhdkit_tests::fresh_scratch_dir();
    let started = std::time::Instant::now();
    let n = cases.len();
    let threads = std::thread::available_parallelism()
        .map_or(2, |p| p.get())
        .min(4);
    let next = std::sync::atomic::AtomicUsize::new(0);
    let failures = std::sync::Mutex::new(Vec::new());
    std::thread::scope(|s| {
        for _ in 0..threads {
            s.spawn(|| loop {
                let i = next.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                let Some(case) = cases.get(i) else { break };
                let p = run_case(case, &root);
                if !p.is_empty() {
                    failures.lock().unwrap().push(format!(
                        "[{}] (expect {:?})\n    {}",
                        case.name,
                        case.expect,
                        p.join("\n    ")
                    ));
                }
            });
        }
    });
    let failures = failures.into_inner().unwrap();
    eprintln!(
        "{suite}: {n} cases in {:.1} s, {} failing",
        started.elapsed().as_secs_f64(),
        failures.len()
    );
    assert!(
        failures.is_empty(),
        "{suite}: {} of {n} cases fail:\n{}",
        failures.len(),
        failures.join("\n")
    );
    let _ = std::fs::remove_dir_all(&root);
}

// ---------------------------------------------------------------------------------------------
// Fixtures.

/// Created images (all small), read into memory; the directory they were made in is removed,
/// so absolute parent locators lead nowhere and parents are found beside each case's child.
struct Fixtures {
    vhd_dynamic: Vec<u8>,
    vhd_fixed: Vec<u8>,
    vhd_child: Vec<u8>,
    vhdx_dynamic: Vec<u8>,
    vhdx_4k: Vec<u8>,
    vhdx_fixed: Vec<u8>,
    vhdx_parent: Vec<u8>,
    vhdx_child: Vec<u8>,
}

fn fixtures() -> Fixtures {
    let dir = vhdkit_tests::fresh_scratch_dir();
    let p = |n: &str| dir.join(n);
    let create = |args: &[&str]| {
        let mut a: Vec<std::ffi::OsString> = vec!["create".into()];
        a.extend(args.iter().map(|s| {
            if s.contains('.') {
                p(s).into_os_string()
            } else {
                s.into()
            }
        }));
        vhdtool_ok(&a);
    };
    create(&[
        "--type",
        "dynamic",
        "--block-size",
        "64K",
        "parent.vhd",
        "2M",
    ]);
    for (at, len) in [(0, 4096), ((64 << 10) - 512, 1024), (1_500_000, 3000)] {
        vhdtool_write(&p("parent.vhd"), at, &pattern(at, len));
    }
    create(&["--type", "fixed", "fixed.vhd", "1M"]);
    vhdtool_write(&p("fixed.vhd"), 4096, &pattern(1, 4096));
    create(&["--parent", "parent.vhd", "child.vhd"]);
    for (at, len) in [(512, 1000), (1 << 20, 70_000)] {
        vhdtool_write(&p("child.vhd"), at, &pattern(at + 7, len));
    }
    create(&["-f", "vhdx", "--block-size", "1M", "parent.vhdx", "4M"]);
    for (at, len) in [(0, 4096), ((1 << 20) - 1024, 2048), (3 << 20, 5000)] {
        vhdtool_write(&p("parent.vhdx"), at, &pattern(at + 9, len));
    }
    create(&[
        "-f",
        "vhdx",
        "--block-size",
        "1M",
        "--logical-sector-size",
        "4096",
        "4k.vhdx",
        "4M",
    ]);
    vhdtool_write(&p("4k.vhdx"), 8192, &pattern(3, 8192));
    create(&[
        "-f",
        "vhdx",
        "--type",
        "fixed",
        "--block-size",
        "1M",
        "fixed.vhdx",
        "2M",
    ]);
    vhdtool_write(&p("fixed.vhdx"), 4096, &pattern(4, 4096));
    create(&[
        "--block-size",
        "1M",
        "--parent",
        "parent.vhdx",
        "child.vhdx",
    ]);
    for (at, len) in [(512, 1024), ((2 << 20) - 512, 4096)] {
        vhdtool_write(&p("child.vhdx"), at, &pattern(at + 11, len));
    }
    let read = |n: &str| std::fs::read(p(n)).unwrap();
    let f = Fixtures {
        vhd_dynamic: read("parent.vhd"),
        vhd_fixed: read("fixed.vhd"),
        vhd_child: read("child.vhd"),
        vhdx_dynamic: read("parent.vhdx"),
        vhdx_4k: read("4k.vhdx"),
        vhdx_fixed: read("fixed.vhdx"),
        vhdx_parent: read("parent.vhdx"),
        vhdx_child: read("child.vhdx"),
    };
    std::fs::remove_dir_all(&dir).unwrap();
    f
}

// ---------------------------------------------------------------------------------------------
// Damage generators. Each returns cases over one file `name` (plus `extra` files beside it, such
// as the parent of a child).

fn with(b: &[u8], f: impl FnOnce(&mut Vec<u8>)) -> Vec<u8> {
    let mut c = b.to_vec();
    f(&mut c);
    c
}

fn flip(b: &[u8], at: usize) -> Vec<u8> {
    with(b, |c| c[at] ^= 0xFF)
}

fn truncations(
    tag: &str,
    name: &str,
    b: &[u8],
    points: impl IntoIterator<Item = usize>,
) -> Vec<Case> {
    let mut pts: Vec<usize> = points.into_iter().filter(|&p| p < b.len()).collect();
    pts.sort_unstable();
    pts.dedup();
    let mut cases: Vec<Case> = pts
        .into_iter()
        .map(|p| {
            Case::one(
                format!("{tag}-truncated-at-{p}"),
                name,
                b[..p].to_vec(),
                Expect::Any,
            )
        })
        .collect();
    cases.push(Case::one(
        format!("{tag}-512-zero-bytes-appended"),
        name,
        with(b, |c| c.extend_from_slice(&[0; 512])),
        Expect::Any,
    ));
    cases.push(Case::one(
        format!("{tag}-garbage-appended"),
        name,
        with(b, |c| c.extend_from_slice(&pattern(5, 70_000))),
        Expect::Any,
    ));
    cases
}

// ---------------------------------------------------------------------------------------------
// Tests.

#[test]
fn damaged_vhd_files_fail_cleanly_or_read_correctly() {
    let f = fixtures();
    let mut cases = vhd_cases("vhd-dynamic", "disk.vhd", &f.vhd_dynamic);
    cases.extend(vhd_cases("vhd-fixed", "disk.vhd", &f.vhd_fixed));
    // A child with damage, its parent intact beside it.
    // (Every other case: the dynamic image above takes them all; the suite stays quick.)
    for mut c in vhd_cases("vhd-child", "child.vhd", &f.vhd_child)
        .into_iter()
        .step_by(2)
    {
        c.files.push(("parent.vhd".into(), f.vhd_dynamic.clone()));
        cases.push(c);
    }
    // A damaged parent under an intact child.
    for mut c in vhd_cases("vhd-parent", "parent.vhd", &f.vhd_dynamic)
        .into_iter()
        .step_by(3)
    {
        c.files.push(("child.vhd".into(), f.vhd_child.clone()));
        c.target = "child.vhd".into();
        c.expect = Expect::Any;
        cases.push(c);
    }
    run_all("vhd", cases);
}

#[test]
fn damaged_vhdx_files_fail_cleanly_or_read_correctly() {
    let f = fixtures();
    let mut cases = vhdx_cases("vhdx-dynamic", "disk.vhdx", &f.vhdx_dynamic);
    cases.extend(
        vhdx_cases("vhdx-4k", "disk.vhdx", &f.vhdx_4k)
            .into_iter()
            .step_by(4),
    );
    cases.extend(
        vhdx_cases("vhdx-fixed", "disk.vhdx", &f.vhdx_fixed)
            .into_iter()
            .step_by(4),
    );
    for mut c in vhdx_cases("vhdx-child", "child.vhdx", &f.vhdx_child)
        .into_iter()
        .step_by(2)
    {
        c.files.push(("parent.vhdx".into(), f.vhdx_parent.clone()));
        cases.push(c);
    }
    for mut c in vhdx_cases("vhdx-parent", "parent.vhdx", &f.vhdx_parent)
        .into_iter()
        .step_by(3)
    {
        c.files.push(("child.vhdx".into(), f.vhdx_child.clone()));
        c.target = "child.vhdx".into();
        c.expect = Expect::Any;
        cases.push(c);
    }
    run_all("vhdx", cases);
}

#[test]
fn vhdx_logs_pointing_anywhere_fail_cleanly_or_replay_in_memory() {
    let f = fixtures();
    run_all("vhdx log", log_cases(&f.vhdx_dynamic));
}

#[test]
fn damaged_real_images_fail_cleanly_or_read_correctly() {
    let real = [
        "go-vhd/win8.vhd",
        "go-vhd/win8-child.vhd",
        "go-vhd/win8.1-1GB.vhd",
        "go-vhd/vbox.vhd",
        "go-vhd/xapi.vhd",
        "go-vhd/qemu.vhd",
        "dfvfs/ext2.vhd.xz",
        "dfvfs/image.vhd.xz",
        "dfvfs/image-differential.vhd.xz",
        "dfvfs/fat-differential.vhd.xz",
    ];
    let Some(paths) = vhdkit_tests::images_or_skip(&real) else {
        return;
    };
    let read = |i: usize| std::fs::read(&paths[i]).unwrap();
    let mut cases = Vec::new();
    for (i, rel) in real.iter().enumerate() {
        let name = paths[i].file_name().unwrap().to_string_lossy().into_owned();
        let tag = format!("real-{}", name.replace('.', "_"));
        // One case in three per image (with ten images every kind of damage is still applied
        // many times); real images were made by other tools, and their damage must be noticed
        // as in ours.
        for (k, mut c) in vhd_cases(&tag, &name, &read(i)).into_iter().enumerate() {
            if k % 3 == i % 3 {
                // Children keep their parents beside them.
                if rel.ends_with("win8-child.vhd") {
                    c.files.push(("win8.vhd".into(), read(0)));
                }
                if rel.ends_with("image-differential.vhd.xz") {
                    c.files.push(("image.vhd".into(), read(7)));
                }
                cases.push(c);
            }
        }
    }
    run_all("real", cases);
}
