//! `vhdtool upload` and `download` against Azurite (a Blob service nobody here wrote), checked
//! with Microsoft's JS SDK (`@azure/storage-blob`): it makes the containers and SAS tokens,
//! lists page ranges and downloads the blobs. Each test runs its own Azurite.

mod support;

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use support::{fails, ok, vhdtool};
use tempfile::TempDir;
use vhdkit_tests::azure::{sdk, sdk_ok, Azurite};
use vhdkit_tests::tool_or_skip;

const MIB: u64 = 1 << 20;

/// Footer bytes that differ between two writers of the same disk: timestamp (24..28),
/// checksum (64..68), unique id (68..84).
const FOOTER_VOLATILE: [std::ops::Range<usize>; 3] = [24..28, 64..68, 68..84];

fn write(img: &Path, offset: u64, data: &[u8]) {
    let f = img.with_extension("in");
    std::fs::write(&f, data).unwrap();
    ok(&vhdtool(&[
        &"write",
        &"--offset",
        &offset.to_string(),
        &"--input",
        &f,
        &img,
    ]));
}

/// The JS SDK's download of the blob at `url` into `dir/name`.
fn sdk_download(url: &str, dir: &Path, name: &str) -> PathBuf {
    let p = dir.join(name);
    sdk_ok(&["download", url, p.to_str().unwrap()]);
    p
}

/// Page ranges `[start, end)` the SDK lists.
fn sdk_ranges(url: &str) -> Vec<(u64, u64)> {
    let v: serde_json::Value = serde_json::from_str(&sdk_ok(&["ranges", url])).unwrap();
    let mut out: Vec<(u64, u64)> = Vec::new();
    for r in v.as_array().unwrap() {
        let (s, e) = (r[0].as_u64().unwrap(), r[1].as_u64().unwrap());
        match out.last_mut() {
            Some(l) if l.1 == s => l.1 = e,
            _ => out.push((s, e)),
        }
    }
    out
}

/// `vhdtool convert -O vhd --azure src` into `dir`.
fn azure_vhd(src: &Path, dir: &Path) -> PathBuf {
    let out = dir.join(format!(
        "{}.azure.vhd",
        src.file_name().unwrap().to_string_lossy()
    ));
    let _ = std::fs::remove_file(&out);
    ok(&vhdtool(&[
        &"convert", &"-O", &"vhd", &"--azure", &src, &out,
    ]));
    out
}

/// Asserts the blob's bytes equal convert's output but for the footer's volatile fields.
fn assert_same_but_footer(blob: &Path, converted: &Path) {
    let (a, b) = (
        std::fs::read(blob).unwrap(),
        std::fs::read(converted).unwrap(),
    );
    assert_eq!(a.len(), b.len(), "blob and convert output sizes");
    let data = a.len() - 512;
    assert!(
        a[..data] == b[..data],
        "data differs from convert -O vhd --azure"
    );
    let (mut fa, mut fb) = (a[data..].to_vec(), b[data..].to_vec());
    for r in FOOTER_VOLATILE {
        fa[r.clone()].fill(0);
        fb[r].fill(0);
    }
    assert_eq!(
        fa, fb,
        "footers differ beyond timestamp, checksum and unique id"
    );
}

/// Sum of the lengths of `ranges`.
fn total(ranges: &[(u64, u64)]) -> u64 {
    ranges.iter().map(|(s, e)| e - s).sum()
}

struct Setup {
    azurite: Azurite,
    dir: TempDir,
}

fn setup() -> Option<Setup> {
    let azurite = Azurite::start_or_skip()?;
    azurite.container("disks");
    Some(Setup {
        azurite,
        dir: TempDir::new().unwrap(),
    })
}

impl Setup {
    fn url(&self, blob: &str) -> String {
        self.azurite.sas_url("disks", blob, "racwd", 3600)
    }
}

/// Writes three runs of data (`4 KiB`-granule aligned lengths) and returns them.
fn fill(img: &Path, size: u64) -> Vec<(u64, u64)> {
    let runs = [
        (MIB, 300 << 10),
        (9 * MIB + 4096, 100 << 10),
        (size - 64 * 1024, 64 * 1024),
    ];
    for (i, &(o, l)) in runs.iter().enumerate() {
        write(img, o, &vhdkit_tests::noise(i as u64 + 1, l as usize));
    }
    runs.to_vec()
}

#[test]
fn uploaded_blob_is_convert_azure_output_and_holds_only_data_pages() {
    let Some(s) = setup() else { return };
    let d = s.dir.path();
    let size = 40 * MIB;
    // Sources: dynamic VHDX (32 MiB and 1 MiB blocks, 4K sectors), dynamic VHD, a
    // differencing VHDX, raw of a size that is not whole MiB.
    let mut sources: Vec<(PathBuf, Vec<(u64, u64)>)> = Vec::new();
    for (name, extra) in [
        ("d32.vhdx", &[][..]),
        (
            "d1m4k.vhdx",
            &["--block-size", "1M", "--logical-sector-size", "4096"][..],
        ),
        ("dyn.vhd", &[][..]),
    ] {
        let p = d.join(name);
        let mut args: Vec<&dyn AsRef<std::ffi::OsStr>> = vec![&"create"];
        for e in extra {
            args.push(e);
        }
        let size_s = size.to_string();
        args.push(&p);
        args.push(&size_s);
        ok(&vhdtool(&args));
        let runs = fill(&p, size);
        sources.push((p, runs));
    }
    let child = d.join("child.vhdx");
    ok(&vhdtool(&[&"create", &"--parent", &sources[0].0, &child]));
    write(&child, 20 * MIB, &vhdkit_tests::noise(9, 8192));
    let mut child_runs = sources[0].1.clone();
    child_runs.push((20 * MIB, 8192));
    sources.push((child, child_runs));
    let raw = d.join("odd.raw");
    let raw_size = 10 * MIB + 4096;
    std::fs::File::create(&raw)
        .unwrap()
        .set_len(raw_size)
        .unwrap();
    std::fs::write(&raw, {
        let mut b = vec![0u8; raw_size as usize];
        b[MIB as usize..MIB as usize + 8192].copy_from_slice(&vhdkit_tests::noise(3, 8192));
        b[(raw_size - 4096) as usize..].copy_from_slice(&vhdkit_tests::noise(4, 4096));
        b
    })
    .unwrap();
    sources.push((raw, vec![(MIB, 8192), (raw_size - 4096, 4096)]));

    for (i, (src, runs)) in sources.iter().enumerate() {
        let url = s.url(&format!("b{i}.vhd"));
        ok(&vhdtool(&[&"upload", &"--parallel", &"3", src, &url]));
        let blob = sdk_download(&url, d, &format!("b{i}.blob"));
        let converted = azure_vhd(src, d);
        assert_same_but_footer(&blob, &converted);
        let vsize = std::fs::metadata(&blob).unwrap().len() - 512;
        assert_eq!(vsize % MIB, 0, "{}: size not whole MiB", src.display());
        // Page ranges: exactly the data runs (4 KiB granules) plus the footer page.
        let ranges = sdk_ranges(&url);
        let data: u64 = runs.iter().map(|&(_, l)| l).sum();
        assert_eq!(
            total(&ranges),
            data + 512,
            "{}: page ranges {ranges:?} vs data runs {runs:?}",
            src.display()
        );
        for &(s0, e0) in &ranges {
            let inside = runs.iter().any(|&(o, l)| s0 >= o && e0 <= o + l)
                || (s0, e0) == (vsize, vsize + 512)
                || runs
                    .iter()
                    .any(|&(o, l)| s0 >= o && o + l == vsize && e0 == vsize + 512);
            assert!(inside, "{}: range {s0}-{e0} holds no data", src.display());
        }
        if tool_or_skip("qemu-img") {
            let o = Command::new("qemu-img")
                .args(["info", "-f", "vpc", "--output=json"])
                .arg(&blob)
                .output()
                .unwrap();
            let v: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap();
            assert_eq!(v["virtual-size"].as_u64(), Some(vsize), "{}", src.display());
        }
    }
}

#[test]
fn existing_blob_is_refused_unless_force() {
    let Some(s) = setup() else { return };
    let d = s.dir.path();
    let (a, b) = (d.join("a.vhdx"), d.join("b.vhdx"));
    for p in [&a, &b] {
        ok(&vhdtool(&[&"create", p, &"8M"]));
    }
    write(&a, MIB, &vhdkit_tests::noise(1, 4096));
    write(&b, 2 * MIB, &vhdkit_tests::noise(2, 8192));
    let url = s.url("x.vhd");
    ok(&vhdtool(&[&"upload", &a, &url]));
    let before = sdk_ranges(&url);
    let err = fails(&vhdtool(&[&"upload", &b, &url]));
    assert!(err.contains("exists") && err.contains("--force"), "{err}");
    assert!(
        err.contains("/disks/x.vhd") && !err.contains("sig="),
        "{err}"
    );
    assert_eq!(
        sdk_ranges(&url),
        before,
        "a refused upload changed the blob"
    );
    // --resume with another source is refused too: the blob was not started from it.
    let err = fails(&vhdtool(&[&"upload", &"--resume", &b, &url]));
    assert!(err.contains("not started by an upload"), "{err}");
    ok(&vhdtool(&[&"upload", &"--force", &b, &url]));
    assert_same_but_footer(&sdk_download(&url, d, "x.blob"), &azure_vhd(&b, d));
    assert_eq!(
        sdk_ranges(&url),
        vec![(2 * MIB, 2 * MIB + 8192), (8 * MIB, 8 * MIB + 512)]
    );
}

/// Starts `vhdtool upload ARGS` and kills it (SIGKILL) once the blob has data pages and no
/// footer; `None` if the upload finished first.
fn kill_mid_upload(src: &Path, url: &str, extra: &[&str], vsize: u64) -> Option<()> {
    let blob = azure_blob::PageBlob::new(azure_blob::BlobUrl::parse(url).unwrap());
    let mut child = Command::new(env!("CARGO_BIN_EXE_vhdtool"))
        .arg("upload")
        .args(extra)
        .args(["--parallel", "1"])
        .arg(src)
        .arg(url)
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        if child.try_wait().unwrap().is_some() {
            return None;
        }
        if let Ok(r) = blob.page_ranges(0, vsize) {
            if r.bytes() > 0 {
                child.kill().unwrap();
                child.wait().unwrap();
                let footer = blob.page_ranges(vsize, vsize + 512).unwrap();
                return (footer.bytes() == 0).then_some(());
            }
        }
        assert!(Instant::now() < deadline, "upload made no progress in 60 s");
        std::thread::sleep(Duration::from_millis(5));
    }
}

/// A dynamic VHDX of 512 MiB holding 128 x 1 MiB of data, 3 MiB apart.
fn big_source(d: &Path) -> (PathBuf, u64) {
    let p = d.join("big.vhdx");
    let size = 512 * MIB;
    ok(&vhdtool(&[&"create", &p, &size.to_string()]));
    let data: Vec<u8> = (0..128)
        .flat_map(|i| {
            let mut run = vhdkit_tests::noise(i + 10, MIB as usize);
            run.extend(std::iter::repeat_n(0u8, 3 * MIB as usize));
            run
        })
        .collect();
    write(&p, 0, &data);
    (p, size)
}

#[test]
fn killed_upload_is_no_vhd_and_resume_finishes_it_identically() {
    let Some(s) = setup() else { return };
    let d = s.dir.path();
    let (src, vsize) = big_source(d);
    let url = s.url("big.vhd");
    let mut killed = kill_mid_upload(&src, &url, &[], vsize);
    for _ in 0..3 {
        if killed.is_some() {
            break;
        }
        killed = kill_mid_upload(&src, &url, &["--force"], vsize);
    }
    assert!(
        killed.is_some(),
        "the upload always finished before it could be killed"
    );
    // Without its footer the blob is not a VHD, to us or to qemu-img.
    let out = d.join("half.vhd");
    let err = fails(&vhdtool(&[&"download", &url, &out]));
    assert!(
        err.contains("not a VHD") && err.contains("/disks/big.vhd"),
        "{err}"
    );
    assert!(!out.exists());
    let partial = sdk_download(&url, d, "half.blob");
    if tool_or_skip("qemu-img") {
        let o = Command::new("qemu-img")
            .args(["info", "-f", "vpc"])
            .arg(&partial)
            .output()
            .unwrap();
        assert!(
            !o.status.success(),
            "qemu-img took a footerless blob as a VHD"
        );
    }
    let o = vhdtool(&[&"upload", &"--resume", &src, &url]);
    ok(&o);
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(
        !err.contains("(0 bytes already there)"),
        "resume sent everything again: {err}"
    );
    assert_same_but_footer(&sdk_download(&url, d, "big.blob"), &azure_vhd(&src, d));
    assert_eq!(total(&sdk_ranges(&url)), 128 * MIB + 512);
    // Resuming a complete upload does nothing.
    let o = vhdtool(&[&"upload", &"--resume", &src, &url]);
    assert!(String::from_utf8_lossy(&o.stderr).contains("already complete"));
}

#[test]
fn download_round_trips_to_vhdx_and_raw_sparse() {
    let Some(s) = setup() else { return };
    let d = s.dir.path();
    let src = d.join("src.vhdx");
    let size = 48 * MIB;
    ok(&vhdtool(&[&"create", &src, &size.to_string()]));
    fill(&src, size);
    let url = s.url("rt.vhd");
    ok(&vhdtool(&[&"upload", &src, &url]));
    let (vhdx, raw) = (d.join("out.vhdx"), d.join("out.img"));
    ok(&vhdtool(&[&"download", &url, &vhdx]));
    ok(&vhdtool(&[&"download", &"-O", &"raw", &url, &raw]));
    ok(&vhdtool(&[&"compare", &src, &vhdx]));
    ok(&vhdtool(&[&"compare", &src, &raw]));
    if tool_or_skip("qemu-img") {
        let o = Command::new("qemu-img")
            .args(["compare", "-f", "vhdx", "-F", "vhdx"])
            .arg(&src)
            .arg(&vhdx)
            .output()
            .unwrap();
        assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stdout));
    }
    use std::os::unix::fs::MetadataExt;
    for p in [&vhdx, &raw] {
        let m = std::fs::metadata(p).unwrap();
        assert!(
            m.blocks() * 512 < 8 * MIB,
            "{} is not sparse: {} blocks",
            p.display(),
            m.blocks()
        );
    }
    // An existing output is kept unless --force.
    let err = fails(&vhdtool(&[&"download", &url, &raw]));
    assert!(err.contains("already exists"), "{err}");
}

#[test]
fn bad_sas_missing_container_and_non_vhd_blobs_fail_clearly() {
    let Some(s) = setup() else { return };
    let d = s.dir.path();
    let src = d.join("s.vhdx");
    ok(&vhdtool(&[&"create", &src, &"4M"]));
    write(&src, 0, &vhdkit_tests::noise(5, 4096));
    let az = &s.azurite;
    let cases = [
        (az.sas_url("disks", "e.vhd", "racwd", -600), "expired"),
        (az.sas_url("disks", "r.vhd", "r", 3600), "403"),
        (
            az.sas_url("nocontainer", "n.vhd", "racwd", 3600),
            "ContainerNotFound",
        ),
    ];
    for (url, want) in &cases {
        let err = fails(&vhdtool(&[&"upload", &src, url]));
        assert!(err.contains(want), "{want}: {err}");
        assert!(
            err.contains("/disks/") || err.contains("/nocontainer/"),
            "{err}"
        );
        assert!(!err.contains("sig=") && !err.contains("uploaded"), "{err}");
    }
    let bare = cases[0].0.split('?').next().unwrap().to_string();
    let err = fails(&vhdtool(&[&"upload", &src, &bare]));
    assert!(err.contains("no SAS token"), "{err}");
    // A page blob of random bytes is not a VHD: download refuses it and writes nothing.
    let junk = d.join("junk.bin");
    std::fs::write(&junk, vhdkit_tests::noise(7, MIB as usize)).unwrap();
    let url = s.url("junk.vhd");
    sdk_ok(&["upload", &url, junk.to_str().unwrap()]);
    let out = d.join("junk.vhdx");
    let err = fails(&vhdtool(&[&"download", &url, &out]));
    assert!(
        err.contains("not a VHD") && err.contains("/disks/junk.vhd"),
        "{err}"
    );
    assert!(!out.exists());
    let missing = s.url("missing.vhd");
    let err = fails(&vhdtool(&[&"download", &missing, &out]));
    assert!(err.contains("does not exist"), "{err}");
    // The SDK sees no blob where the refused uploads went.
    assert!(!sdk(&["props", &cases[1].0]).status.success());
}

#[test]
fn service_stopped_mid_upload_fails_naming_the_blob_without_footer() {
    let Some(mut s) = setup() else { return };
    let d = s.dir.path();
    let (src, vsize) = big_source(d);
    let url = s.url("cut.vhd");
    let blob = azure_blob::PageBlob::new(azure_blob::BlobUrl::parse(&url).unwrap());
    let child = Command::new(env!("CARGO_BIN_EXE_vhdtool"))
        .args(["upload", "--parallel", "1"])
        .arg(&src)
        .arg(&url)
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let deadline = Instant::now() + Duration::from_secs(60);
    while !blob.page_ranges(0, vsize).is_ok_and(|r| r.bytes() > 0) {
        assert!(Instant::now() < deadline, "no progress");
        std::thread::sleep(Duration::from_millis(5));
    }
    s.azurite.stop();
    let started = Instant::now();
    let o = child.wait_with_output().unwrap();
    let err = String::from_utf8_lossy(&o.stderr);
    if o.status.success() {
        // It finished between the check and the stop: nothing to learn from this run.
        vhdkit_tests::skipped("the upload finished before the service stopped");
        return;
    }
    assert!(
        err.contains("/disks/cut.vhd") && !err.contains("uploaded"),
        "{err}"
    );
    assert!(
        started.elapsed() < Duration::from_secs(60),
        "took {:?}",
        started.elapsed()
    );
}

#[test]
fn blob_url_reads_as_a_read_only_image() {
    let Some(s) = setup() else { return };
    let d = s.dir.path();
    let src = d.join("src.vhdx");
    let size = 24 * MIB;
    ok(&vhdtool(&[&"create", &src, &size.to_string()]));
    let runs = fill(&src, size);
    let url = s.url("ro.vhd");
    ok(&vhdtool(&[&"upload", &src, &url]));
    let before = sdk_ranges(&url);
    let info = ok(&vhdtool(&[&"info", &url]));
    assert!(
        info.contains("file format: vhd") && info.contains(&format!("({size} bytes)")),
        "{info}"
    );
    let json = ok(&vhdtool(&[&"info", &"--json", &url]));
    for shown in [&info, &json] {
        assert!(
            !shown.contains("sig=") && shown.contains("/disks/ro.vhd"),
            "info names the blob without its SAS: {shown}"
        );
    }
    ok(&vhdtool(&[&"compare", &url, &src]));
    let (o, l) = runs[1];
    let got = vhdtool(&[
        &"read",
        &url,
        &"--offset",
        &o.to_string(),
        &"--length",
        &l.to_string(),
    ]);
    ok(&got);
    assert!(
        got.stdout == vhdkit_tests::noise(2, l as usize),
        "read through the blob differs"
    );
    let map = ok(&vhdtool(&[&"map", &url]));
    assert_eq!(
        map.lines().count(),
        1 + runs.len(),
        "map lists the data runs only: {map}"
    );
    let out = d.join("from-blob.vhdx");
    ok(&vhdtool(&[&"convert", &url, &out]));
    ok(&vhdtool(&[&"compare", &out, &src]));
    if tool_or_skip("qemu-img") {
        let o = Command::new("qemu-img")
            .arg("compare")
            .arg(&src)
            .arg(&out)
            .output()
            .unwrap();
        assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stdout));
    }
    // Writing to the blob is refused, and nothing changed.
    let input = d.join("w.in");
    std::fs::write(&input, [7u8; 512]).unwrap();
    let err = fails(&vhdtool(&[
        &"write",
        &"--offset",
        &"0",
        &"--input",
        &input,
        &url,
    ]));
    assert!(err.contains("read-only") && !err.contains("sig="), "{err}");
    assert_eq!(sdk_ranges(&url), before, "the blob changed");
}

#[test]
fn local_child_over_a_blob_mounts_keeps_its_writes_local_and_the_blob_untouched() {
    let Some(s) = setup() else { return };
    let d = s.dir.path();
    let src = d.join("base.vhdx");
    let size = 24 * MIB;
    ok(&vhdtool(&[&"create", &src, &size.to_string()]));
    let runs = fill(&src, size);
    let url = s.url("base.vhd");
    ok(&vhdtool(&[&"upload", &src, &url]));
    let before = sdk_ranges(&url);
    // No extension and no -f: a child over a blob is a VHDX (only its locators hold a URI).
    let child = d.join("child");
    ok(&vhdtool(&[&"create", &"--parent", &url, &child]));
    let info = ok(&vhdtool(&[&"info", &child]));
    assert!(
        info.contains("file format: vhdx")
            && info.contains("/disks/base.vhd")
            && !info.contains("sig="),
        "{info}"
    );
    // The child reads as the blob, then takes writes over part of a data run and a hole.
    ok(&vhdtool(&[&"compare", &child, &src]));
    let (o, _) = runs[0];
    let patch = vhdkit_tests::noise(9, 3 * MIB as usize);
    write(&child, o + 4096, &patch);
    write(&src, o + 4096, &patch);
    ok(&vhdtool(&[&"compare", &child, &src]));
    ok(&vhdtool(&[&"check", &child]));
    // Mounted (writable), the child takes writes through the file system too; they stay local.
    let mnt = d.join("mnt");
    std::fs::create_dir(&mnt).unwrap();
    ok(&vhdtool(&[&"mount", &child, &mnt]));
    let through_mount = vhdkit_tests::noise(10, 64 * 1024);
    let wrote = (|| -> std::io::Result<Vec<u8>> {
        use std::io::{Read, Seek, SeekFrom, Write};
        let mut f = std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .open(mnt.join("disk"))?;
        f.seek(SeekFrom::Start(8 * MIB))?;
        f.write_all(&through_mount)?;
        f.sync_all()?;
        let mut start = vec![0u8; 4096];
        f.seek(SeekFrom::Start(o + 4096))?;
        f.read_exact(&mut start)?;
        Ok(start)
    })();
    ok(&vhdtool(&[&"umount", &mnt]));
    assert!(
        wrote.unwrap() == patch[..4096],
        "the mount reads the child's own bytes"
    );
    write(&src, 8 * MIB, &through_mount);
    ok(&vhdtool(&[&"compare", &child, &src]));
    ok(&vhdtool(&[&"check", &child]));
    assert_eq!(sdk_ranges(&url), before, "the blob changed");
    // A different blob at that URL (another upload) is refused by identity, not read.
    let other = d.join("other.vhdx");
    ok(&vhdtool(&[&"create", &other, &size.to_string()]));
    ok(&vhdtool(&[&"upload", &"--force", &other, &url]));
    let err = fails(&vhdtool(&[&"compare", &child, &src]));
    assert!(
        err.contains("base.vhd") && !err.contains("sig="),
        "a replaced parent blob must be refused: {err}"
    );
}
