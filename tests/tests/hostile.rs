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

mod support;

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

fn vhd_cases(tag: &str, name: &str, b: &[u8]) -> Vec<Case> {
    let l = v::Layout::of(b);
    let mut cases = Vec::new();
    let mut c = |n: String, bytes: Vec<u8>, e: Expect| {
        cases.push(Case::one(format!("{tag}-{n}"), name, bytes, e))
    };
    // Truncations at every structure boundary.
    let mut points = vec![
        0,
        1,
        8,
        511,
        512,
        513,
        l.len / 2,
        l.len - 512,
        l.len - 511,
        l.len - 1,
    ];
    if l.dynamic {
        points.extend([
            1023,
            1024,
            l.header + 512,
            l.header + 1024,
            l.bat,
            l.bat + 2 * l.entries,
        ]);
        points.push((l.bat + 4 * l.entries).next_multiple_of(512));
        for loc in &l.locators {
            points.extend([loc.data_offset as usize, loc.data_offset as usize + 1]);
        }
        if let Some((_, sector)) = l.first_allocated(b) {
            let at = sector as usize * 512;
            points.extend([at, at + 512, at + 512 + l.block_size as usize / 2]);
        }
    }
    for case in truncations(tag, name, b, points) {
        c(
            case.name[tag.len() + 1..].to_string(),
            case.files[0].1.clone(),
            case.expect,
        );
    }
    // Flipped bytes in every footer and header field (checksums left stale: must be noticed).
    let footer_fields = [
        0, 8, 12, 16, 24, 28, 32, 36, 40, 48, 56, 60, 64, 68, 84, 100,
    ];
    for f in footer_fields {
        // A fixed image whose footer cookie is gone is a raw file, indistinguishable from one.
        let e = if f == 0 && !l.dynamic {
            Expect::Any
        } else {
            Expect::Detected
        };
        c(format!("footer-byte-{f}-flipped"), flip(b, l.footer + f), e);
        if l.dynamic {
            c(
                format!("footer-copy-byte-{f}-flipped"),
                flip(b, f),
                Expect::Detected,
            );
        }
    }
    // Re-sealed values in every footer size/offset/type field.
    let huge64: [(&str, u64); 5] = [
        ("zero", 0),
        ("one", 1),
        ("odd", 511),
        ("max", u64::MAX),
        ("past-eof", l.len as u64 * 1000),
    ];
    for (what, val) in huge64 {
        for (field, fname) in [
            (v::F_DATA_OFFSET, "data-offset"),
            (v::F_ORIGINAL_SIZE, "original-size"),
            (v::F_CURRENT_SIZE, "current-size"),
        ] {
            c(
                format!("footer-{fname}-{what}"),
                with(b, |x| l.set_footer(x, field, &val.to_be_bytes())),
                Expect::Any,
            );
        }
    }
    for (what, val) in [
        ("zero", 0u32),
        ("max", u32::MAX),
        ("fixed", 2),
        ("dynamic", 3),
        ("differencing", 4),
        ("five", 5),
    ] {
        c(
            format!("footer-disk-type-{what}"),
            with(b, |x| l.set_footer(x, v::F_DISK_TYPE, &val.to_be_bytes())),
            Expect::Any,
        );
    }
    for (what, val) in [("zero", 0u32), ("max", u32::MAX), ("tiny", 0x0001_0101)] {
        c(
            format!("footer-geometry-{what}"),
            with(b, |x| l.set_footer(x, v::F_GEOMETRY, &val.to_be_bytes())),
            Expect::Any,
        );
    }
    if !l.dynamic {
        return cases;
    }
    let h = l.header;
    for f in [
        0, 8, 16, 24, 28, 32, 36, 40, 56, 64, 300, 576, 580, 584, 592,
    ] {
        c(
            format!("header-byte-{f}-flipped"),
            flip(b, h + f),
            Expect::Detected,
        );
    }
    for (what, val) in huge64
        .into_iter()
        .chain([("header-itself", h as u64), ("footer-copy", 0)])
    {
        c(
            format!("header-table-offset-{what}"),
            with(b, |x| {
                l.set_header(x, v::H_TABLE_OFFSET, &val.to_be_bytes())
            }),
            Expect::Any,
        );
        c(
            format!("header-data-offset-{what}"),
            with(b, |x| l.set_header(x, v::H_DATA_OFFSET, &val.to_be_bytes())),
            Expect::Any,
        );
    }
    for (what, val) in [
        ("zero", 0u32),
        ("one", 1),
        ("one-more", l.entries as u32 + 1),
        ("thousandfold", l.entries as u32 * 1000),
        ("max", u32::MAX),
    ] {
        c(
            format!("header-max-entries-{what}"),
            with(b, |x| l.set_header(x, v::H_MAX_ENTRIES, &val.to_be_bytes())),
            Expect::Any,
        );
    }
    for (what, val) in [
        ("zero", 0u32),
        ("one", 1),
        ("sector", 512),
        ("not-power-of-two", 3 << 16),
        ("2g", 1 << 31),
        ("max", u32::MAX),
        ("half", l.block_size as u32 / 2),
        ("double", l.block_size as u32 * 2),
    ] {
        c(
            format!("header-block-size-{what}"),
            with(b, |x| l.set_header(x, v::H_BLOCK_SIZE, &val.to_be_bytes())),
            Expect::Any,
        );
    }
    for (what, val) in [("zero", 0u32), ("two", 2 << 16)] {
        c(
            format!("header-version-{what}"),
            with(b, |x| l.set_header(x, v::H_VERSION, &val.to_be_bytes())),
            Expect::Any,
        );
    }
    // Malformed UTF-16 parent names: an unpaired surrogate, odd garbage, no terminator.
    for (what, bytes) in [
        ("unpaired-surrogate", vec![0xD8, 0x00, 0x00, 0x41]),
        ("lone-low-surrogate", vec![0xDC, 0x00]),
        ("all-ff", vec![0xFF; 512]),
        ("no-terminator", pattern(8, 512)),
    ] {
        c(
            format!("parent-name-{what}"),
            with(b, |x| l.set_header(x, v::H_PARENT_NAME, &bytes)),
            Expect::Any,
        );
    }
    // Parent locators: fields and data.
    for (i, loc) in l.locators.iter().enumerate() {
        let e = loc.entry_at - h;
        for (what, val) in [
            ("zero", 0u64),
            ("past-eof", l.len as u64 + 4096),
            ("max", u64::MAX),
            ("header", h as u64),
            ("odd", 1001),
        ] {
            c(
                format!("locator{i}-offset-{what}"),
                with(b, |x| l.set_header(x, e + 16, &val.to_be_bytes())),
                Expect::Any,
            );
        }
        for (what, val) in [
            ("zero", 0u32),
            ("one", 1),
            ("odd", 7),
            ("max", u32::MAX),
            ("space-plus-one", loc.space + 1),
        ] {
            c(
                format!("locator{i}-length-{what}"),
                with(b, |x| l.set_header(x, e + 8, &val.to_be_bytes())),
                Expect::Any,
            );
        }
        for (what, val) in [("zero", 0u32), ("max", u32::MAX), ("tiny", 1)] {
            c(
                format!("locator{i}-space-{what}"),
                with(b, |x| l.set_header(x, e + 4, &val.to_be_bytes())),
                Expect::Any,
            );
        }
        c(
            format!("locator{i}-code-unknown"),
            with(b, |x| l.set_header(x, e, b"XXXX")),
            Expect::Any,
        );
        let d = loc.data_offset as usize;
        c(
            format!("locator{i}-data-unpaired-surrogate"),
            with(b, |x| {
                x[d..d + 4].copy_from_slice(&[0x00, 0xD8, 0x41, 0x00])
            }),
            Expect::Any,
        );
        c(
            format!("locator{i}-data-garbage"),
            with(b, |x| {
                x[d..d + loc.length as usize].copy_from_slice(&pattern(9, loc.length as usize))
            }),
            Expect::Any,
        );
    }
    // BAT entries past EOF, over metadata, over each other.
    if let Some((i, sector)) = l.first_allocated(b) {
        let at = l.bat_entry(i);
        for (what, val, e) in [
            ("past-eof", (l.len / 512 + 100) as u32, Expect::Detected),
            ("at-the-end", (l.len / 512 - 1) as u32, Expect::Detected),
            ("max-minus-one", u32::MAX - 1, Expect::Detected),
            ("over-footer-copy", 0, Expect::Detected),
            ("over-header", (h / 512) as u32, Expect::Detected),
            ("over-bat", (l.bat / 512) as u32, Expect::Detected),
            ("misaligned", sector + 1, Expect::Any),
        ] {
            c(
                format!("bat-entry-{i}-{what}"),
                with(b, |x| x[at..at + 4].copy_from_slice(&val.to_be_bytes())),
                e,
            );
        }
        for j in 0..l.entries.min(64) {
            if j != i && v::be32(b, l.bat_entry(j)) == u32::MAX {
                let bj = l.bat_entry(j);
                c(
                    format!("bat-entries-{i}-and-{j}-overlap"),
                    with(b, |x| x[bj..bj + 4].copy_from_slice(&sector.to_be_bytes())),
                    Expect::Detected,
                );
                break;
            }
        }
        c(
            format!("bat-entry-{i}-byte-flipped"),
            flip(b, at),
            Expect::Detected,
        );
        let bitmap = sector as usize * 512;
        c("bitmap-byte-flipped".into(), flip(b, bitmap), Expect::Any);
        c(
            "bitmap-all-ones".into(),
            with(b, |x| x[bitmap..bitmap + 512].fill(0xFF)),
            Expect::Any,
        );
    }
    let last = l.bat_entry(l.entries - 1);
    c(
        "bat-last-entry-past-eof".into(),
        with(b, |x| {
            x[last..last + 4].copy_from_slice(&((l.len / 512) as u32 + 8).to_be_bytes())
        }),
        Expect::Detected,
    );
    cases
}

fn vhdx_cases(tag: &str, name: &str, b: &[u8]) -> Vec<Case> {
    let l = x::Layout::of(b);
    let mut cases = Vec::new();
    let mut c = |n: String, bytes: Vec<u8>, e: Expect| {
        cases.push(Case::one(format!("{tag}-{n}"), name, bytes, e))
    };
    let mib = 1usize << 20;
    let points = [
        0,
        7,
        8,
        (64 << 10) - 1,
        64 << 10,
        (64 << 10) + 100,
        128 << 10,
        192 << 10,
        256 << 10,
        320 << 10,
        l.log_offset,
        l.log_offset + l.log_length / 2,
        l.metadata,
        l.metadata + (64 << 10),
        l.bat,
        l.bat + 4096,
        l.bat + l.bat_len,
        4 * mib + mib / 2,
        l.len - mib,
        l.len - 1,
    ];
    for case in truncations(tag, name, b, points) {
        c(
            case.name[tag.len() + 1..].to_string(),
            case.files[0].1.clone(),
            case.expect,
        );
    }
    c("identifier-flipped".into(), flip(b, 0), Expect::Unusable);
    c(
        "creator-garbage".into(),
        with(b, |x| x[8..520].copy_from_slice(&pattern(2, 512))),
        Expect::Any,
    );
    // Header fields: one copy flipped (the other may serve), both flipped (must be noticed).
    let fields = [0, 4, 8, 16, 32, 48, 64, 66, 68, 72, 100, 4095];
    for f in fields {
        for (i, h) in x::HEADERS.iter().enumerate() {
            c(
                format!("header{i}-byte-{f}-flipped"),
                flip(b, h + f),
                Expect::Any,
            );
        }
        c(
            format!("both-headers-byte-{f}-flipped"),
            with(b, |y| x::HEADERS.iter().for_each(|h| y[h + f] ^= 0xFF)),
            Expect::Detected,
        );
    }
    let log_guid = x::guid("11111111-2222-3333-4444-555555555555");
    for (what, len) in [
        ("zero", 0u32),
        ("one", 1),
        ("sector", 4096),
        ("max", u32::MAX),
    ] {
        c(
            format!("header-log-length-{what}-with-log-guid"),
            with(b, |y| {
                l.set_header(y, x::H_LOG_GUID, &log_guid);
                l.set_header(y, x::H_LOG_LENGTH, &len.to_le_bytes());
            }),
            Expect::Any,
        );
    }
    for (what, off) in [
        ("zero", 0u64),
        ("header", 64 << 10),
        ("metadata", l.metadata as u64),
        ("past-eof", l.len as u64),
        ("max", u64::MAX - 4095),
    ] {
        c(
            format!("header-log-offset-{what}-with-log-guid"),
            with(b, |y| {
                l.set_header(y, x::H_LOG_GUID, &log_guid);
                l.set_header(y, x::H_LOG_OFFSET, &off.to_le_bytes());
            }),
            Expect::Any,
        );
    }
    for (what, val) in [("zero", 0u16), ("two", 2), ("max", u16::MAX)] {
        c(
            format!("header-version-{what}"),
            with(b, |y| l.set_header(y, x::H_VERSION, &val.to_le_bytes())),
            Expect::Any,
        );
        c(
            format!("header-log-version-{what}"),
            with(b, |y| l.set_header(y, x::H_LOG_VERSION, &val.to_le_bytes())),
            Expect::Any,
        );
    }
    c(
        "header-sequence-max".into(),
        with(b, |y| {
            l.set_header(y, x::H_SEQUENCE, &u64::MAX.to_le_bytes())
        }),
        Expect::Any,
    );
    // Region tables.
    for f in [0, 4, 8, 16, 32, 40, 44] {
        c(
            format!("region-table0-byte-{f}-flipped"),
            flip(b, x::REGIONS[0] + f),
            Expect::Any,
        );
        c(
            format!("both-region-tables-byte-{f}-flipped"),
            with(b, |y| x::REGIONS.iter().for_each(|r| y[r + f] ^= 0xFF)),
            Expect::Detected,
        );
    }
    for (what, n) in [
        ("zero", 0u32),
        ("one", 1),
        ("three", 3),
        ("2048", 2048),
        ("max", u32::MAX),
    ] {
        c(
            format!("region-count-{what}"),
            with(b, |y| l.set_regions(y, x::R_COUNT, &n.to_le_bytes())),
            Expect::Any,
        );
    }
    for (region, id) in [("bat", x::BAT_GUID), ("metadata", x::METADATA_GUID)] {
        let e = l.region_entry(b, id);
        for (what, off) in [
            ("zero", 0u64),
            ("over-log", l.log_offset as u64),
            ("over-metadata", l.metadata as u64),
            ("over-bat", l.bat as u64),
            ("past-eof", (l.len + mib) as u64),
            ("max", u64::MAX - (mib as u64 - 1)),
            ("misaligned", l.bat as u64 + 4096),
        ] {
            c(
                format!("region-{region}-offset-{what}"),
                with(b, |y| l.set_regions(y, e + 16, &off.to_le_bytes())),
                Expect::Any,
            );
        }
        for (what, len) in [
            ("zero", 0u32),
            ("one", 1),
            ("max", u32::MAX - (mib as u32 - 1)),
            ("huge", 1 << 30),
        ] {
            c(
                format!("region-{region}-length-{what}"),
                with(b, |y| l.set_regions(y, e + 24, &len.to_le_bytes())),
                Expect::Any,
            );
        }
        c(
            format!("region-{region}-unknown-required"),
            with(b, |y| l.set_regions(y, e, &[0x42; 16])),
            Expect::Unusable,
        );
    }
    // Metadata table and items (no checksum: values land as they are).
    let m = l.metadata;
    c(
        "metadata-signature-flipped".into(),
        flip(b, m),
        Expect::Unusable,
    );
    for (what, n) in [("zero", 0u16), ("2047", 2047), ("max", u16::MAX)] {
        c(
            format!("metadata-count-{what}"),
            with(b, |y| y[m + 10..m + 12].copy_from_slice(&n.to_le_bytes())),
            Expect::Any,
        );
    }
    for (i, (_, item)) in l.items.iter().enumerate() {
        let e = item.entry_at;
        for (what, val) in [
            ("zero", 0u32),
            ("table", 16),
            ("max", u32::MAX),
            ("past-region", 1 << 20),
        ] {
            c(
                format!("metadata-item{i}-offset-{what}"),
                with(b, |y| y[e + 16..e + 20].copy_from_slice(&val.to_le_bytes())),
                Expect::Any,
            );
        }
        for (what, val) in [("zero", 0u32), ("one", 1), ("max", u32::MAX)] {
            c(
                format!("metadata-item{i}-length-{what}"),
                with(b, |y| y[e + 20..e + 24].copy_from_slice(&val.to_le_bytes())),
                Expect::Any,
            );
        }
        c(
            format!("metadata-item{i}-flags-flipped"),
            flip(b, e + 24),
            Expect::Any,
        );
        c(
            format!("metadata-item{i}-id-flipped"),
            flip(b, e),
            Expect::Any,
        );
    }
    let mut item_value = |id: &str, label: &str, values: &[(&str, Vec<u8>)]| {
        if let Some(it) = l.item(id) {
            for (what, val) in values {
                c(
                    format!("{label}-{what}"),
                    with(b, |y| y[it.at..it.at + val.len()].copy_from_slice(val)),
                    Expect::Any,
                );
            }
        }
    };
    item_value(
        x::FILE_PARAMETERS,
        "block-size",
        &[
            ("zero", 0u32.to_le_bytes().to_vec()),
            ("one", 1u32.to_le_bytes().to_vec()),
            ("not-power-of-two", (3u32 << 20).to_le_bytes().to_vec()),
            ("2g", (1u32 << 31).to_le_bytes().to_vec()),
            ("max", u32::MAX.to_le_bytes().to_vec()),
        ],
    );
    item_value(
        x::VIRTUAL_DISK_SIZE,
        "virtual-size",
        &[
            ("zero", 0u64.to_le_bytes().to_vec()),
            ("one", 1u64.to_le_bytes().to_vec()),
            ("odd", 4_194_305u64.to_le_bytes().to_vec()),
            ("max", u64::MAX.to_le_bytes().to_vec()),
            ("64t-plus", ((64u64 << 40) + 4096).to_le_bytes().to_vec()),
            ("huge-aligned", (1u64 << 62).to_le_bytes().to_vec()),
            ("double", (8u64 << 20).to_le_bytes().to_vec()),
        ],
    );
    for (id, label) in [
        (x::LOGICAL_SECTOR_SIZE, "logical-sector-size"),
        (x::PHYSICAL_SECTOR_SIZE, "physical-sector-size"),
    ] {
        item_value(
            id,
            label,
            &[
                ("zero", 0u32.to_le_bytes().to_vec()),
                ("1024", 1024u32.to_le_bytes().to_vec()),
                ("max", u32::MAX.to_le_bytes().to_vec()),
            ],
        );
    }
    if let Some(it) = l.item(x::FILE_PARAMETERS) {
        c(
            "file-parameters-flags-all".into(),
            with(b, |y| y[it.at + 4..it.at + 8].fill(0xFF)),
            Expect::Any,
        );
    }
    if let Some(it) = l.item(x::PARENT_LOCATOR) {
        let p = it.at;
        for (what, n) in [("zero", 0u16), ("max", u16::MAX), ("hundred", 100)] {
            c(
                format!("parent-locator-count-{what}"),
                with(b, |y| y[p + 18..p + 20].copy_from_slice(&n.to_le_bytes())),
                Expect::Any,
            );
        }
        let entries = x::le16(b, p + 18) as usize;
        for k in 0..entries {
            let e = p + 20 + 12 * k;
            for (what, val) in [("max", u32::MAX), ("past-item", it.len as u32), ("zero", 0)] {
                c(
                    format!("parent-locator-entry{k}-key-offset-{what}"),
                    with(b, |y| y[e..e + 4].copy_from_slice(&val.to_le_bytes())),
                    Expect::Any,
                );
                c(
                    format!("parent-locator-entry{k}-value-offset-{what}"),
                    with(b, |y| y[e + 4..e + 8].copy_from_slice(&val.to_le_bytes())),
                    Expect::Any,
                );
            }
            for (what, val) in [("max", u16::MAX), ("odd", 3), ("zero", 0)] {
                c(
                    format!("parent-locator-entry{k}-key-length-{what}"),
                    with(b, |y| y[e + 8..e + 10].copy_from_slice(&val.to_le_bytes())),
                    Expect::Any,
                );
                c(
                    format!("parent-locator-entry{k}-value-length-{what}"),
                    with(b, |y| y[e + 10..e + 12].copy_from_slice(&val.to_le_bytes())),
                    Expect::Any,
                );
            }
            let vo = p + x::le32(b, e + 4) as usize;
            let vl = x::le16(b, e + 10) as usize;
            c(
                format!("parent-locator-entry{k}-value-unpaired-surrogate"),
                with(b, |y| y[vo..vo + 2].copy_from_slice(&[0x00, 0xD8])),
                Expect::Any,
            );
            c(
                format!("parent-locator-entry{k}-value-garbage"),
                with(b, |y| {
                    y[vo..vo + vl].copy_from_slice(&pattern(k as u64, vl))
                }),
                Expect::Any,
            );
        }
    }
    // BAT entries.
    let entry = |i: usize| x::le64(b, l.bat + 8 * i);
    let n_entries = 16.min(l.bat_len / 8);
    if let Some(i) = (0..n_entries).find(|&i| entry(i) & 7 == 6 || entry(i) & 7 == 7) {
        let at = l.bat + 8 * i;
        let state = entry(i) & 7;
        let set = |off_mib: u64, st: u64| {
            with(b, |y| {
                y[at..at + 8].copy_from_slice(&((off_mib << 20) | st).to_le_bytes())
            })
        };
        for (what, off, e) in [
            ("past-eof", (l.len / mib + 10) as u64, Expect::Detected),
            ("half-past-eof", (l.len / mib) as u64, Expect::Detected),
            ("max", (1u64 << 44) - 1, Expect::Detected),
            ("zero", 0, Expect::Detected),
            ("over-log", (l.log_offset / mib) as u64, Expect::Detected),
            ("over-metadata", (l.metadata / mib) as u64, Expect::Detected),
            ("over-bat", (l.bat / mib) as u64, Expect::Detected),
        ] {
            c(format!("bat-entry-{i}-{what}"), set(off, state), e);
        }
        for st in [1u64, 3, 4, 5] {
            c(
                format!("bat-entry-{i}-state-{st}"),
                with(b, |y| y[at] = (y[at] & !7) | st as u8),
                Expect::Any,
            );
        }
        if let Some(j) = (0..n_entries)
            .find(|&j| j != i && entry(j) & 7 != 6 && entry(j) & 7 != 7 && j % 4097 != 4096)
        {
            let bj = l.bat + 8 * j;
            c(
                format!("bat-entries-{i}-and-{j}-overlap"),
                with(b, |y| {
                    y[bj..bj + 8].copy_from_slice(&entry(i).to_le_bytes())
                }),
                Expect::Detected,
            );
        }
        c(
            format!("bat-entry-{i}-state-byte-flipped"),
            flip(b, at),
            Expect::Any,
        );
        c(
            format!("bat-entry-{i}-offset-byte-flipped"),
            flip(b, at + 6),
            Expect::Detected,
        );
    }
    c(
        "bat-page-garbage".into(),
        with(b, |y| {
            y[l.bat..l.bat + 4096].copy_from_slice(&pattern(77, 4096))
        }),
        Expect::Detected,
    );
    cases
}

/// A log entry (our own writer, independent of the vhdx crate) for the log-damage cases.
enum Desc {
    Data { offset: u64, page: Vec<u8> },
    Zero { offset: u64, length: u64 },
}

struct EntryFields {
    sequence: u64,
    flushed: u64,
    last: u64,
    length_override: Option<u32>,
    count_override: Option<u32>,
}

fn log_entry(guid: &[u8; 16], descs: &[Desc], f: &EntryFields) -> Vec<u8> {
    let data_count = descs
        .iter()
        .filter(|d| matches!(d, Desc::Data { .. }))
        .count();
    let len = 4096 * (1 + data_count);
    let mut e = vec![0u8; len];
    e[0..4].copy_from_slice(b"loge");
    e[8..12].copy_from_slice(&f.length_override.unwrap_or(len as u32).to_le_bytes());
    e[12..16].copy_from_slice(&0u32.to_le_bytes()); // tail: this entry (at log offset 0)
    e[16..24].copy_from_slice(&f.sequence.to_le_bytes());
    e[24..28].copy_from_slice(&f.count_override.unwrap_or(descs.len() as u32).to_le_bytes());
    e[32..48].copy_from_slice(guid);
    e[48..56].copy_from_slice(&f.flushed.to_le_bytes());
    e[56..64].copy_from_slice(&f.last.to_le_bytes());
    let mut sector = 1;
    for (i, d) in descs.iter().enumerate() {
        let at = 64 + 32 * i;
        match d {
            Desc::Zero { offset, length } => {
                e[at..at + 4].copy_from_slice(b"zero");
                e[at + 8..at + 16].copy_from_slice(&length.to_le_bytes());
                e[at + 16..at + 24].copy_from_slice(&offset.to_le_bytes());
            }
            Desc::Data { offset, page } => {
                e[at..at + 4].copy_from_slice(b"desc");
                e[at + 4..at + 8].copy_from_slice(&page[4092..4096]);
                e[at + 8..at + 16].copy_from_slice(&page[0..8]);
                e[at + 16..at + 24].copy_from_slice(&offset.to_le_bytes());
                let s = 4096 * sector;
                sector += 1;
                e[s..s + 4].copy_from_slice(b"data");
                e[s + 4..s + 8].copy_from_slice(&((f.sequence >> 32) as u32).to_le_bytes());
                e[s + 8..s + 4092].copy_from_slice(&page[8..4092]);
                e[s + 4092..s + 4096].copy_from_slice(&(f.sequence as u32).to_le_bytes());
            }
        }
        e[at + 24..at + 32].copy_from_slice(&f.sequence.to_le_bytes());
    }
    x::seal(&mut e, 0, len);
    e
}

/// A VHDX with a pending log holding `descs`, written as our writer would leave it after a
/// crash inside a flush.
fn pending_log(base: &[u8], descs: &[Desc], f: &EntryFields) -> Vec<u8> {
    let l = x::Layout::of(base);
    let guid = x::guid("AAAAAAAA-BBBB-CCCC-DDDD-EEEEEEEEEEEE");
    let mut b = base.to_vec();
    let e = log_entry(&guid, descs, f);
    let n = e.len().min(l.log_length);
    b[l.log_offset..l.log_offset + n].copy_from_slice(&e[..n]);
    l.set_header(&mut b, x::H_LOG_GUID, &guid);
    b
}

fn log_cases(b: &[u8]) -> Vec<Case> {
    let l = x::Layout::of(b);
    let len = b.len() as u64;
    let bat_page = b[l.bat..l.bat + 4096].to_vec();
    let ok = EntryFields {
        sequence: 10,
        flushed: len,
        last: len,
        length_override: None,
        count_override: None,
    };
    let mut cases = Vec::new();
    let mut c = |n: &str, bytes: Vec<u8>, e: Expect| {
        cases.push(Case::one(format!("vhdx-log-{n}"), "log.vhdx", bytes, e))
    };
    let page = |o: u64| Desc::Data {
        offset: o,
        page: pattern(o, 4096),
    };
    c(
        "replays-its-bat-page",
        pending_log(
            b,
            &[Desc::Data {
                offset: l.bat as u64,
                page: bat_page.clone(),
            }],
            &ok,
        ),
        Expect::Any,
    );
    for (what, off) in [
        ("zero", 0u64),
        ("header", 64 << 10),
        ("region-table", 192 << 10),
        ("metadata", l.metadata as u64),
        ("bat", l.bat as u64),
        ("the-log-itself", l.log_offset as u64),
        ("past-eof", len + (1 << 20)),
        ("far-past-eof", 1 << 50),
        ("max", u64::MAX - 4095),
    ] {
        c(
            &format!("data-descriptor-at-{what}"),
            pending_log(b, &[page(off)], &ok),
            Expect::Any,
        );
    }
    for (what, off, length) in [
        ("whole-file", 0u64, len),
        ("past-eof", len, 1 << 20),
        ("huge", 4 << 20, 1 << 40),
        ("max", 0, u64::MAX - 4095),
        ("bat", l.bat as u64, 4096),
    ] {
        c(
            &format!("zero-descriptor-{what}"),
            pending_log(
                b,
                &[Desc::Zero {
                    offset: off,
                    length,
                }],
                &ok,
            ),
            Expect::Any,
        );
    }
    c(
        "many-descriptors",
        pending_log(
            b,
            &(0..100)
                .map(|i| page(l.bat as u64 + 4096 * (i % 3)))
                .collect::<Vec<_>>(),
            &ok,
        ),
        Expect::Any,
    );
    for (what, fields) in [
        (
            "flushed-offset-past-eof",
            EntryFields {
                flushed: len * 4,
                ..ok
            },
        ),
        (
            "last-offset-huge",
            EntryFields {
                last: 1 << 50,
                ..ok
            },
        ),
        (
            "last-offset-max",
            EntryFields {
                last: u64::MAX,
                ..ok
            },
        ),
        ("sequence-zero", EntryFields { sequence: 0, ..ok }),
        (
            "length-max",
            EntryFields {
                length_override: Some(u32::MAX),
                ..ok
            },
        ),
        (
            "length-past-log",
            EntryFields {
                length_override: Some(l.log_length as u32 + 4096),
                ..ok
            },
        ),
        (
            "count-max",
            EntryFields {
                count_override: Some(u32::MAX),
                ..ok
            },
        ),
        (
            "count-more",
            EntryFields {
                count_override: Some(2),
                ..ok
            },
        ),
    ] {
        c(
            &format!("entry-{what}"),
            pending_log(
                b,
                &[Desc::Data {
                    offset: l.bat as u64,
                    page: bat_page.clone(),
                }],
                &fields,
            ),
            Expect::Any,
        );
    }
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

/// Replaces `from` by `to` (same length) wherever it appears in UTF-16, either byte order.
fn replace_utf16(b: &mut [u8], from: &str, to: &str) {
    assert_eq!(from.len(), to.len());
    for be in [false, true] {
        let enc = |t: &str| -> Vec<u8> {
            t.encode_utf16()
                .flat_map(|u| if be { u.to_be_bytes() } else { u.to_le_bytes() })
                .collect()
        };
        let (f, t) = (enc(from), enc(to));
        let mut k = 0;
        while k + f.len() <= b.len() {
            if b[k..k + f.len()] == f[..] {
                b[k..k + f.len()].copy_from_slice(&t);
                k += f.len();
            } else {
                k += 1;
            }
        }
    }
}

/// Writes `bytes` to `path` as a sparse file holding only the 4 KiB pages listed in `pages`
/// (the rest must be zeros).
fn write_pages(path: &Path, bytes: &[u8], pages: &[usize]) {
    use std::os::unix::fs::FileExt;
    let f = std::fs::File::create(path).unwrap();
    f.set_len(bytes.len() as u64).unwrap();
    for &k in pages {
        let page = &bytes[k * 4096..((k + 1) * 4096).min(bytes.len())];
        f.write_all_at(page, k as u64 * 4096).unwrap();
    }
}

/// Indices of the 4 KiB pages of `bytes` that are not all zeros.
fn nonzero_pages(bytes: &[u8]) -> Vec<usize> {
    (0..bytes.len().div_ceil(4096))
        .filter(|&k| {
            bytes[k * 4096..((k + 1) * 4096).min(bytes.len())]
                .iter()
                .any(|&b| b != 0)
        })
        .collect()
}

/// A chain of `n` layers in `dir`: `l0000.<ext>` holds `base`, and each `l<i>` is a child of
/// `l<i-1>`. `vhdtool create` refuses parents whose chain is already too deep, so one child is
/// created over `l0000` and copied, each copy given its own identity (VHD footer UUID / VHDX
/// DataWriteGuid), the previous layer's as its parent link, and the previous layer's name in its
/// locators. Returns the layer paths, base first.
fn chain(dir: &Path, ext: &str, base: &[u8], n: usize) -> Vec<PathBuf> {
    let name = |i: usize| format!("l{i:04}.{ext}");
    let layers: Vec<PathBuf> = (0..n).map(|i| dir.join(name(i))).collect();
    write_pages(&layers[0], base, &nonzero_pages(base));
    let template_path = dir.join(format!("template.{ext}"));
    vhdtool_ok(&[
        "create".as_ref(),
        "--parent".as_ref(),
        layers[0].as_os_str(),
        template_path.as_os_str(),
    ]);
    let template = std::fs::read(&template_path).unwrap();
    std::fs::remove_file(&template_path).unwrap();
    // Copies differ from the template only inside pages that already hold data.
    let pages = nonzero_pages(&template);
    let identity = |i: usize| -> [u8; 16] {
        let mut id = *b"vhdkit-layer\0\0\0\0";
        id[12..].copy_from_slice(&(i as u32).to_be_bytes());
        id
    };
    if ext == "vhd" {
        let l = v::Layout::of(&template);
        let mut prev: Vec<u8> = base[base.len() - 512 + v::F_UUID..][..16].to_vec();
        for (i, path) in layers.iter().enumerate().skip(1) {
            let mut b = template.clone();
            replace_utf16(&mut b[l.header..l.header + 1024], &name(0), &name(i - 1));
            for loc in &l.locators {
                let d = loc.data_offset as usize;
                replace_utf16(&mut b[d..d + loc.length as usize], &name(0), &name(i - 1));
            }
            b[l.header + v::H_PARENT_UUID..][..16].copy_from_slice(&prev);
            v::seal(&mut b, l.header, 1024, v::H_CHECKSUM);
            l.set_footer(&mut b, v::F_UUID, &identity(i));
            prev = identity(i).to_vec();
            write_pages(path, &b, &pages);
        }
    } else {
        let l = x::Layout::of(&template);
        let it = l
            .item(x::PARENT_LOCATOR)
            .expect("a child has a parent locator");
        let link_text = |g: &[u8]| -> Vec<u8> {
            x::guid_text(g)
                .encode_utf16()
                .flat_map(|u| u.to_le_bytes())
                .collect()
        };
        let base_guid =
            &base[x::HEADERS[x::Layout::of(base).current] + x::H_DATA_WRITE_GUID..][..16];
        let original = link_text(base_guid);
        let mut prev = base_guid.to_vec();
        for (i, path) in layers.iter().enumerate().skip(1) {
            let mut b = template.clone();
            replace_utf16(&mut b[it.at..it.at + it.len], &name(0), &name(i - 1));
            let item = &mut b[it.at..it.at + it.len];
            let at = item
                .windows(original.len())
                .position(|w| w == &original[..])
                .expect("the parent_linkage value");
            item[at..at + original.len()].copy_from_slice(&link_text(&prev));
            l.set_header(&mut b, x::H_DATA_WRITE_GUID, &identity(i));
            prev = identity(i).to_vec();
            write_pages(path, &b, &pages);
        }
    }
    layers
}

#[test]
fn parent_chains_that_cycle_or_run_a_thousand_deep_fail_cleanly() {
    let f = fixtures();
    let mut cases = Vec::new();
    // A child that is its own parent: the parent UUID (VHD) / DataWriteGuid (VHDX) made to match
    // its own, stored under the name its locators give.
    let vl = v::Layout::of(&f.vhd_child);
    let own = f.vhd_child[vl.footer + v::F_UUID..vl.footer + v::F_UUID + 16].to_vec();
    let selfish = with(&f.vhd_child, |b| vl.set_header(b, v::H_PARENT_UUID, &own));
    cases.push(Case::one(
        "vhd-own-parent",
        "parent.vhd",
        selfish.clone(),
        Expect::Unusable,
    ));
    // Two children that are each other's parent: copies of one child (same UUID U, parent UUID
    // set to U), one named `parent.vhd` whose locators are renamed to `parenu.vhd`, the other
    // named `parenu.vhd` whose locators still say `parent.vhd`.
    let renamed = with(&selfish, |b| {
        replace_utf16(b, "parent.vhd", "parenu.vhd");
        v::seal(b, vl.header, 1024, v::H_CHECKSUM);
    });
    cases.push(Case {
        name: "vhd-two-children-parent-each-other".into(),
        files: vec![
            ("parent.vhd".into(), renamed),
            ("parenu.vhd".into(), selfish),
        ],
        target: "parent.vhd".into(),
        expect: Expect::Unusable,
        fifos: vec![],
    });
    // VHDX: the same with DataWriteGuid set to the parent_linkage the child carries.
    let xl = x::Layout::of(&f.vhdx_child);
    let it = xl
        .item(x::PARENT_LOCATOR)
        .expect("a child has a parent locator");
    let text: String = f.vhdx_child[it.at..it.at + it.len]
        .chunks_exact(2)
        .filter_map(|c| char::from_u32(u16::from_le_bytes([c[0], c[1]]) as u32))
        .collect();
    let brace = text.find('{').expect("parent_linkage value");
    let link = x::guid(&text[brace + 1..brace + 37]);
    let selfish = with(&f.vhdx_child, |b| {
        xl.set_header(b, x::H_DATA_WRITE_GUID, &link)
    });
    cases.push(Case::one(
        "vhdx-own-parent",
        "parent.vhdx",
        selfish.clone(),
        Expect::Unusable,
    ));
    let renamed = with(&selfish, |b| replace_utf16(b, "parent.vhdx", "parenu.vhdx"));
    cases.push(Case {
        name: "vhdx-two-children-parent-each-other".into(),
        files: vec![
            ("parent.vhdx".into(), renamed),
            ("parenu.vhdx".into(), selfish),
        ],
        target: "parent.vhdx".into(),
        expect: Expect::Unusable,
        fifos: vec![],
    });
    // Parents that are FIFOs, directories or devices.
    for (ext, child, name) in [
        ("vhd", &f.vhd_child, "parent.vhd"),
        ("vhdx", &f.vhdx_child, "parent.vhdx"),
    ] {
        cases.push(Case {
            name: format!("{ext}-parent-is-a-fifo"),
            files: vec![(format!("child.{ext}"), child.clone())],
            target: format!("child.{ext}"),
            expect: Expect::Unusable,
            fifos: vec![name.into()],
        });
    }
    run_all("chains", cases);

    // 1,000 layers: too deep to open (the limit is far below), each verb fails naming the chain;
    // a chain within the limit reads the base's data through every layer.
    for (ext, base) in [("vhd", &f.vhd_dynamic), ("vhdx", &f.vhdx_parent)] {
        let dir = vhdkit_tests::fresh_scratch_dir();
        let started = std::time::Instant::now();
        let layers = chain(&dir, ext, base, 1000);
        eprintln!(
            "{ext}: 1000-layer chain made in {:.1} s",
            started.elapsed().as_secs_f64()
        );
        let top = layers.last().unwrap();
        let names: Vec<String> = layers
            .iter()
            .map(|p| p.file_name().unwrap().to_string_lossy().into_owned())
            .collect();
        // The verbs can reach the 64 layers under the top and the 41 over the base.
        let reachable: Vec<&PathBuf> = layers[..41].iter().chain(&layers[1000 - 70..]).collect();
        let before: Vec<Vec<u8>> = reachable
            .iter()
            .map(|p| std::fs::read(p).unwrap())
            .collect();
        let out = dir.join("out.raw");
        for args in [
            vec!["info".as_ref(), "--json".as_ref(), top.as_os_str()],
            vec!["check".as_ref(), top.as_os_str()],
            vec![
                "convert".as_ref(),
                "-O".as_ref(),
                "raw".as_ref(),
                top.as_os_str(),
                out.as_os_str(),
            ],
        ] {
            let o = vhdtool_bounded(&args);
            assert!(
                o.misbehaviour().is_none(),
                "{ext} 1000 deep {:?}: {:?}",
                args[0],
                o
            );
            // info describes the top file (its parent shown as not found); check and convert
            // must fail.
            if args[0] == "info" {
                assert!(
                    matches!(o.code, Some(0 | 1)),
                    "{ext} 1000 deep info exit {:?}",
                    o.code
                );
                continue;
            }
            assert!(
                matches!(o.code, Some(1 | 2)),
                "{ext} 1000 deep {:?} exit {:?}",
                args[0],
                o.code
            );
            let text = format!("{}{}", o.stdout, o.stderr);
            assert!(
                names.iter().any(|n| text.contains(n.as_str())),
                "{ext}: no file named: {text}"
            );
            assert!(
                text.contains("deep") || text.contains("chain"),
                "{ext}: no chain named: {text}"
            );
        }
        assert!(!out.exists(), "a failed convert left its output");
        let mid = &layers[40];
        let o = vhdtool_bounded(&[
            "convert".as_ref(),
            "-O".as_ref(),
            "raw".as_ref(),
            mid.as_os_str(),
            out.as_os_str(),
        ]);
        assert_eq!(
            o.code,
            Some(0),
            "{ext}: a 41-layer chain does not convert: {}",
            o.stderr
        );
        let flat = std::fs::read(&out).unwrap();
        assert_eq!(
            &flat[..4096],
            &pattern(if ext == "vhd" { 0 } else { 9 }, 4096)[..],
            "{ext}: base data not read through 40 layers"
        );
        for (p, b) in reachable.iter().zip(&before) {
            assert!(&std::fs::read(p).unwrap() == b, "{} changed", p.display());
        }
        let _ = std::fs::remove_dir_all(&dir);
    }
}
