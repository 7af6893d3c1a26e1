//! Interop: images written by `vhdtool` read back identically through readers nobody here wrote.
//!
//! ```text
//!   sparse raw (data at the start, a block boundary, around 1 GiB, the last MiB)
//!      │ vhdtool convert
//!      ▼
//!   out.vhd / out.vhdx ──┬── qemu-img info (virtual-size) / compare / check ── vs raw
//!                        ├── vhdiinfo (media size)
//!                        ├── vhdimount (FUSE) ── byte compare vhdiN ───────── vs raw
//!                        └── vhdtool compare ──────────────────────────────── vs raw
//! ```
//!
//! Differencing children are written with `vhdtool write`; libvhdi (which resolves the parent
//! beside the child) must see the same bytes as `vhdtool convert child flat.raw`, and the parent
//! file must not change. qemu-img is not asked about differencing VHDs: its vpc driver ignores
//! the parent.
//!
//! Every external tool goes through [`tool_or_skip`]: off CI a missing tool skips the test, in CI
//! it fails it.

use std::fs::{self, File};
use std::io::{Read, Seek, SeekFrom, Write};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::thread;
use std::time::{Duration, Instant};
use vhdkit_tests::noise as pattern;

use vhdkit_tests::{fresh_scratch_dir, have_tool, output, run, tool_or_skip, vhdtool};

const KIB: u64 = 1024;
const MIB: u64 = 1024 * KIB;
const GIB: u64 = 1024 * MIB;

/// Chunk size of every byte comparison.
const CHUNK: usize = MIB as usize;

// ---------------------------------------------------------------------------------------------
// Test data
// ---------------------------------------------------------------------------------------------

/// A sparse raw file of exactly `size` bytes holding [`pattern`] data at each `(offset, len)`.
fn make_sparse_raw(path: &Path, size: u64, extents: &[(u64, u64)]) {
    let mut f = File::create(path).unwrap_or_else(|e| panic!("create {}: {e}", path.display()));
    f.set_len(size).unwrap();
    for &(off, len) in extents {
        assert!(off + len <= size, "extent {off}+{len} past {size}");
        f.seek(SeekFrom::Start(off)).unwrap();
        f.write_all(&pattern(off, len as usize)).unwrap();
    }
    f.sync_all().unwrap();
    assert_eq!(fs::metadata(path).unwrap().len(), size);
}

/// Data in several places of a disk of `size` (at least 1 GiB + 3 MiB) bytes: the first
/// sectors, straddling the 1 MiB, 2 MiB (default VHD block) and 32 MiB (default VHDX block)
/// boundaries, an unaligned run inside a block, straddling 1 GiB, an unaligned run past 1 GiB,
/// and the whole last MiB.
fn interesting_extents(size: u64) -> Vec<(u64, u64)> {
    assert!(size >= GIB + 3 * MIB);
    vec![
        (0, 64 * KIB),
        (MIB - 4 * KIB, 8 * KIB),
        (2 * MIB - 4 * KIB, 8 * KIB),
        (5 * MIB + 123, 777),
        (32 * MIB - 4 * KIB, 8 * KIB),
        (GIB - 96 * KIB, 192 * KIB),
        (GIB + MIB + 4097, 12 * KIB),
        (size - MIB, MIB),
    ]
}

// ---------------------------------------------------------------------------------------------
// Comparisons
// ---------------------------------------------------------------------------------------------

/// Fill `buf` from `f` as far as it goes; returns the byte count (short only at end of file).
fn read_full(f: &mut File, buf: &mut [u8]) -> usize {
    let mut n = 0;
    while n < buf.len() {
        match f.read(&mut buf[n..]) {
            Ok(0) => break,
            Ok(k) => n += k,
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
            Err(e) => panic!("read: {e}"),
        }
    }
    n
}

/// `cmp a b` in Rust: same length and same bytes, read in 1 MiB chunks; names the first
/// differing offset.
fn assert_same_bytes(a: &Path, b: &Path) {
    let mut fa = File::open(a).unwrap_or_else(|e| panic!("open {}: {e}", a.display()));
    let mut fb = File::open(b).unwrap_or_else(|e| panic!("open {}: {e}", b.display()));
    let (la, lb) = (fa.metadata().unwrap().len(), fb.metadata().unwrap().len());
    assert_eq!(
        la,
        lb,
        "{} is {la} bytes, {} is {lb}",
        a.display(),
        b.display()
    );
    let mut ba = vec![0u8; CHUNK];
    let mut bb = vec![0u8; CHUNK];
    let mut pos = 0u64;
    loop {
        let na = read_full(&mut fa, &mut ba);
        let nb = read_full(&mut fb, &mut bb);
        if ba[..na] != bb[..nb] {
            let i = ba[..na]
                .iter()
                .zip(&bb[..nb])
                .position(|(x, y)| x != y)
                .unwrap_or(na.min(nb));
            panic!(
                "{} and {} differ at byte offset {} (chunk lengths {na} / {nb})",
                a.display(),
                b.display(),
                pos + i as u64
            );
        }
        if na == 0 {
            break;
        }
        pos += na as u64;
    }
    assert_eq!(pos, la, "read {pos} bytes of {la} from {}", a.display());
}

/// `qemu-img info --output=json -f <fmt> image`, parsed.
fn qemu_json(image: &Path, fmt: &str) -> serde_json::Value {
    let out = run(Command::new("qemu-img")
        .args(["info", "--output=json", "-f", fmt])
        .arg(image));
    serde_json::from_slice(&out.stdout).unwrap_or_else(|e| {
        panic!(
            "qemu-img info JSON: {e}\n{}",
            String::from_utf8_lossy(&out.stdout)
        )
    })
}

/// `qemu-img info --output=json -f <fmt>`: the image's own (top-level) `virtual-size`; the
/// nested `children` (the protocol layer) carry the host file's size under the same key.
fn qemu_virtual_size(image: &Path, fmt: &str) -> u64 {
    let v = qemu_json(image, fmt);
    v.get("virtual-size")
        .and_then(serde_json::Value::as_u64)
        .unwrap_or_else(|| panic!("no top-level virtual-size in {v}"))
}

/// `qemu-img compare -f raw -F <fmt> raw image` exits 0 ("Images are identical.").
fn assert_qemu_compare_identical(raw: &Path, image: &Path, fmt: &str) {
    run(Command::new("qemu-img")
        .args(["compare", "-f", "raw", "-F", fmt])
        .arg(raw)
        .arg(image));
}

/// The value after `key` on its `key : value` line of `vhdiinfo image`.
fn vhdiinfo_field(image: &Path, key: &str) -> String {
    let out = run(Command::new("vhdiinfo").arg(image));
    let text = String::from_utf8_lossy(&out.stdout);
    let line = text
        .lines()
        .find(|l| l.trim_start().starts_with(key))
        .unwrap_or_else(|| panic!("no `{key}` line in vhdiinfo {}:\n{text}", image.display()));
    let (_, value) = line
        .split_once(':')
        .unwrap_or_else(|| panic!("vhdiinfo line without `:`: `{line}`"));
    value.trim().to_string()
}

/// `vhdiinfo image` prints `Media size : ... (<size> bytes)`.
fn assert_vhdiinfo_size(image: &Path, size: u64) {
    let media = vhdiinfo_field(image, "Media size");
    assert!(
        media.ends_with(&format!("({size} bytes)")),
        "vhdiinfo {}: expected media size ({size} bytes), got `{media}`",
        image.display()
    );
}

/// `vhdtool compare a b` exits 0.
fn assert_vhdtool_same(a: &Path, b: &Path) {
    run(vhdtool().arg("compare").arg(a).arg(b));
}

// ---------------------------------------------------------------------------------------------
// vhdimount
// ---------------------------------------------------------------------------------------------

/// A libvhdi FUSE mount of an image; unmounted on drop, also when the test panics.
///
/// `vhdimount` exposes one file per layer of the chain: `vhdi1` is the base image and the
/// highest-numbered `vhdiN` the image that was named (for a plain image, just `vhdi1`).
struct VhdiMount {
    dir: PathBuf,
}

impl VhdiMount {
    /// Mount `image` on a fresh directory `mnt` and wait (up to ~10 s) until `vhdi1` ..
    /// `vhdi<layers>` are visible.
    fn new(image: &Path, mnt: &Path, layers: usize) -> Self {
        fs::create_dir_all(mnt).unwrap();
        // vhdimount forks into the background once the mount is up and exits 0.
        run(Command::new("vhdimount").arg(image).arg(mnt));
        let guard = VhdiMount {
            dir: mnt.to_path_buf(),
        };
        let deadline = Instant::now() + Duration::from_secs(10);
        while !(1..=layers).all(|i| guard.layer(i).is_file()) {
            assert!(
                Instant::now() < deadline,
                "vhdimount {}: {} did not show vhdi1..vhdi{layers} within 10 s",
                image.display(),
                mnt.display()
            );
            thread::sleep(Duration::from_millis(50));
        }
        guard
    }

    /// The file of layer `i` (1 = base).
    fn layer(&self, i: usize) -> PathBuf {
        self.dir.join(format!("vhdi{i}"))
    }

    /// The file names in the mount, sorted.
    fn entries(&self) -> Vec<String> {
        let mut names: Vec<String> = fs::read_dir(&self.dir)
            .unwrap()
            .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
            .collect();
        names.sort();
        names
    }
}

impl Drop for VhdiMount {
    fn drop(&mut self) {
        // Retry a little: the kernel may still hold the last file handle for a moment.
        for attempt in 0..20 {
            for (tool, args) in [
                ("fusermount3", &["-u"][..]),
                ("fusermount", &["-u"][..]),
                ("umount", &[][..]),
            ] {
                if !have_tool(tool) {
                    continue;
                }
                let out = Command::new(tool).args(args).arg(&self.dir).output();
                if matches!(out, Ok(ref o) if o.status.success()) {
                    return;
                }
            }
            thread::sleep(Duration::from_millis(50 * (attempt + 1)));
        }
        // Last resort, so a stuck mount never outlives the test process unnoticed.
        let _ = Command::new("umount").arg("-l").arg(&self.dir).output();
        eprintln!("WARNING: could not unmount {}", self.dir.display());
    }
}

/// True when every tool of `tools` is present (each missing one prints a skip, or panics in CI).
fn tools_or_skip(tools: &[&str]) -> bool {
    // Ask about each (no short circuit) so every missing tool is named.
    let present: Vec<bool> = tools.iter().map(|t| tool_or_skip(t)).collect();
    present.into_iter().all(|ok| ok)
}

// ---------------------------------------------------------------------------------------------
// VHD
// ---------------------------------------------------------------------------------------------

/// Convert a sparse 1 GiB + 3 MiB raw disk to a `disk_type` VHD and check it with qemu-img,
/// vhdiinfo, vhdimount and vhdtool itself.
fn raw_converted_to_vhd_reads_identically(disk_type: &str) {
    if !tools_or_skip(&["qemu-img", "vhdiinfo", "vhdimount"]) {
        return;
    }
    let size = GIB + 3 * MIB;
    let dir = fresh_scratch_dir();
    let raw = dir.join("disk.raw");
    let vhd = dir.join("out.vhd");
    make_sparse_raw(&raw, size, &interesting_extents(size));

    run(vhdtool()
        .args(["convert", "-O", "vhd", "--type", disk_type])
        .arg(&raw)
        .arg(&vhd));

    assert_eq!(
        qemu_virtual_size(&vhd, "vpc"),
        size,
        "qemu-img virtual-size"
    );
    assert_qemu_compare_identical(&raw, &vhd, "vpc");
    assert_vhdiinfo_size(&vhd, size);
    let expected_type = if disk_type == "fixed" {
        "Fixed"
    } else {
        "Dynamic"
    };
    assert_eq!(vhdiinfo_field(&vhd, "Disk type"), expected_type);
    {
        let mnt = VhdiMount::new(&vhd, &dir.join("mnt"), 1);
        assert_eq!(mnt.entries(), ["vhdi1"]);
        assert_same_bytes(&mnt.layer(1), &raw);
    }
    assert_vhdtool_same(&raw, &vhd);
}

#[test]
fn raw_1g_plus_3m_converted_to_dynamic_vhd_reads_identically_everywhere() {
    raw_converted_to_vhd_reads_identically("dynamic");
}

#[test]
fn raw_1g_plus_3m_converted_to_fixed_vhd_reads_identically_everywhere() {
    raw_converted_to_vhd_reads_identically("fixed");
}

/// Write `data` into `image` at `offset` through `vhdtool write --input <file>`.
fn vhdtool_write(image: &Path, offset: u64, data: &[u8], scratch: &Path) {
    let input = scratch.join(format!("write-{offset}.bin"));
    fs::write(&input, data).unwrap();
    run(vhdtool()
        .arg("write")
        .arg(image)
        .args(["--offset", &offset.to_string(), "--input"])
        .arg(&input));
}

/// `vhdtool read image --offset .. --length ..` on stdout.
fn vhdtool_read(image: &Path, offset: u64, len: usize) -> Vec<u8> {
    run(vhdtool().arg("read").arg(image).args([
        "--offset",
        &offset.to_string(),
        "--length",
        &len.to_string(),
    ]))
    .stdout
}

/// A differencing child over `parent` (already holding `parent_writes`) reads as the parent,
/// then as the parent plus the child's own writes, while the parent file never changes; libvhdi
/// sees the child exactly as `vhdtool convert` flattens it.
fn differencing_child_reads_as_parent_until_written(
    parent: &Path,
    child: &Path,
    parent_writes: &[(u64, usize)],
    child_writes: &[(u64, usize)],
) {
    let dir = parent.parent().unwrap().to_path_buf();
    for &(off, len) in parent_writes {
        vhdtool_write(parent, off, &pattern(off ^ 0xFA, len), &dir);
    }
    run(vhdtool()
        .arg("create")
        .arg("--parent")
        .arg(parent)
        .arg(child));
    assert_eq!(vhdiinfo_field(child, "Disk type"), "Differential");
    assert_vhdtool_same(parent, child);
    let parent_before = fs::read(parent).unwrap();

    for &(off, len) in child_writes {
        let data = pattern(off ^ 0xC4, len);
        vhdtool_write(child, off, &data, &dir);
        assert!(
            vhdtool_read(child, off, len) == data,
            "vhdtool read of the child at {off}+{len} does not return what was written"
        );
        // A child write never changes what the parent reads.
        let parent_view = vhdtool_read(parent, off, len);
        assert_ne!(parent_view, data, "parent at {off} reads the child's data");
    }
    // The child now differs from its parent, and the parent file is untouched byte for byte.
    let cmp = output(vhdtool().arg("compare").arg(parent).arg(child));
    assert_eq!(
        cmp.status.code(),
        Some(1),
        "vhdtool compare parent child after child writes: {cmp:?}"
    );
    assert!(
        fs::read(parent).unwrap() == parent_before,
        "parent {} changed while writing the child",
        parent.display()
    );

    let flat = dir.join("child-flat.raw");
    let parent_flat = dir.join("parent-flat.raw");
    run(vhdtool().arg("convert").arg(child).arg(&flat));
    run(vhdtool().arg("convert").arg(parent).arg(&parent_flat));
    // The flattened child holds the child writes on top of the parent's data.
    let mut expected = fs::read(&parent_flat).unwrap();
    for &(off, len) in child_writes {
        expected[off as usize..off as usize + len].copy_from_slice(&pattern(off ^ 0xC4, len));
    }
    assert!(
        fs::read(&flat).unwrap() == expected,
        "vhdtool convert of the child is not parent + child writes"
    );
    {
        // vhdimount resolves the parent beside the child: vhdi1 = parent, vhdi2 = child. The
        // child is named by its absolute path, as a user would: vhdimount keeps the part of the
        // parent locator's path after its last `\` and joins it to the child's directory, so a
        // Win32-form locator (`C:\dir\parent.vhdx`, `.\parent.vhdx`) works from anywhere.
        let mnt = VhdiMount::new(child, &dir.join("mnt"), 2);
        assert_eq!(mnt.entries(), ["vhdi1", "vhdi2"]);
        assert_same_bytes(&mnt.layer(2), &flat);
        assert_same_bytes(&mnt.layer(1), &parent_flat);
    }
    assert!(
        fs::read(parent).unwrap() == parent_before,
        "parent {} changed after reading the chain",
        parent.display()
    );
}

#[test]
fn differencing_child_reads_as_parent_until_written_and_parent_stays_identical() {
    if !tools_or_skip(&["vhdiinfo", "vhdimount"]) {
        return;
    }
    let dir = fresh_scratch_dir();
    let parent = dir.join("parent.vhd");
    let child = dir.join("child.vhd");
    run(vhdtool()
        .args(["create", "--type", "dynamic"])
        .arg(&parent)
        .arg("64M"));
    differencing_child_reads_as_parent_until_written(
        &parent,
        &child,
        &[(0, 4096), (2 * MIB - 512, 3 * 512), (40 * MIB + 7, 100_000)],
        &[
            // Unaligned, inside a parent-allocated block: a partial-sector write over parent data.
            (1000, 3000),
            // Across the first block boundary, partly over parent data.
            (2 * MIB - 1536, 4096),
            // In a block the parent never allocated.
            (20 * MIB + 512, 8192),
            // The last sectors of the disk.
            (64 * MIB - 1024, 1024),
        ],
    );
}

#[test]
fn vhdx_differencing_child_reads_as_parent_until_written_and_parent_stays_identical() {
    if !tools_or_skip(&["vhdiinfo", "vhdimount"]) {
        return;
    }
    let dir = fresh_scratch_dir();
    let parent = dir.join("parent.vhdx");
    let child = dir.join("child.vhdx");
    // 100 MiB: three full 32 MiB parent blocks and a partial fourth.
    run(vhdtool()
        .args(["create", "-f", "vhdx", "--type", "dynamic"])
        .arg(&parent)
        .arg("100M"));
    differencing_child_reads_as_parent_until_written(
        &parent,
        &child,
        &[
            (0, 4096),
            (2 * MIB - 512, 3 * 512),
            (32 * MIB - 700, 1400),
            (97 * MIB + 7, 100_000),
        ],
        &[
            // Unaligned, over parent data: the rest of each touched sector comes from the parent.
            (1001, 3000),
            // Across a child block boundary (the child's blocks may be smaller than the parent's).
            (2 * MIB - 1536, 4096),
            // Across the parent's 32 MiB block boundary.
            (32 * MIB - 300, 600),
            // Where the parent has nothing.
            (50 * MIB + 512, 8192),
            // The last sectors of the disk, in the parent's partial last block.
            (100 * MIB - 1024, 1024),
        ],
    );
}

// ---------------------------------------------------------------------------------------------
// VHDX
// ---------------------------------------------------------------------------------------------

/// How a 2 GiB raw disk is converted to VHDX.
struct VhdxCase<'a> {
    /// Extra `vhdtool convert -O vhdx` arguments.
    args: &'a [&'a str],
    /// The disk type vhdiinfo must report (`Dynamic` or `Fixed`).
    disk_type: &'a str,
    /// The logical sector size the image must report.
    logical_sector: u64,
    /// The block size qemu-img must report (`cluster-size`), when checked.
    qemu_block_size: Option<u64>,
}

/// Convert a sparse 2 GiB raw disk (data past 1 GiB too) to VHDX and check it with vhdiinfo,
/// vhdimount, vhdtool and, for 512-byte logical sectors (qemu cannot open 4 KiB-sector VHDX),
/// qemu-img info / compare / check.
fn raw_converted_to_vhdx_reads_identically(case: VhdxCase) {
    let qemu = case.logical_sector == 512;
    let tools: &[&str] = if qemu {
        &["qemu-img", "vhdiinfo", "vhdimount"]
    } else {
        &["vhdiinfo", "vhdimount"]
    };
    if !tools_or_skip(tools) {
        return;
    }
    let size = 2 * GIB;
    let dir = fresh_scratch_dir();
    let raw = dir.join("disk.raw");
    let vhdx = dir.join("out.vhdx");
    let mut extents = interesting_extents(size);
    extents.push((3 * GIB / 2 - 3 * KIB, 6 * KIB));
    make_sparse_raw(&raw, size, &extents);

    run(vhdtool()
        .args(["convert", "-O", "vhdx"])
        .args(case.args)
        .arg(&raw)
        .arg(&vhdx));

    if qemu {
        let info = qemu_json(&vhdx, "vhdx");
        assert_eq!(info["format"], "vhdx", "qemu-img format: {info}");
        assert_eq!(
            qemu_virtual_size(&vhdx, "vhdx"),
            size,
            "qemu-img virtual-size"
        );
        if let Some(block) = case.qemu_block_size {
            assert_eq!(info["cluster-size"], block, "qemu-img cluster-size: {info}");
        }
        assert_qemu_compare_identical(&raw, &vhdx, "vhdx");
        run(Command::new("qemu-img")
            .args(["check", "-f", "vhdx"])
            .arg(&vhdx));
    }
    assert_vhdiinfo_size(&vhdx, size);
    assert_eq!(vhdiinfo_field(&vhdx, "Disk type"), case.disk_type);
    assert_eq!(
        vhdiinfo_field(&vhdx, "Bytes per sector"),
        format!("{} bytes", case.logical_sector),
        "vhdiinfo logical sector size"
    );
    {
        let mnt = VhdiMount::new(&vhdx, &dir.join("mnt"), 1);
        assert_eq!(mnt.entries(), ["vhdi1"]);
        assert_same_bytes(&mnt.layer(1), &raw);
    }
    assert_vhdtool_same(&raw, &vhdx);
}

#[test]
fn raw_2g_converted_to_dynamic_vhdx_with_default_32m_blocks_reads_identically_everywhere() {
    raw_converted_to_vhdx_reads_identically(VhdxCase {
        args: &["--type", "dynamic"],
        disk_type: "Dynamic",
        logical_sector: 512,
        qemu_block_size: Some(32 * MIB),
    });
}

#[test]
fn raw_2g_converted_to_dynamic_vhdx_with_1m_blocks_reads_identically_everywhere() {
    raw_converted_to_vhdx_reads_identically(VhdxCase {
        args: &["--type", "dynamic", "--block-size", "1M"],
        disk_type: "Dynamic",
        logical_sector: 512,
        qemu_block_size: Some(MIB),
    });
}

#[test]
fn raw_2g_converted_to_fixed_vhdx_reads_identically_everywhere() {
    raw_converted_to_vhdx_reads_identically(VhdxCase {
        // --sparse: the same on-disk layout, without writing 2 GiB of zeros to the host (the
        // 1 GiB fixed VHD test covers a fully written fixed image).
        args: &["--type", "fixed", "--sparse"],
        disk_type: "Fixed",
        logical_sector: 512,
        qemu_block_size: None,
    });
}

#[test]
fn raw_2g_converted_to_vhdx_with_4k_logical_sectors_reads_identically_in_libvhdi_and_vhdtool() {
    raw_converted_to_vhdx_reads_identically(VhdxCase {
        args: &["--type", "dynamic", "--logical-sector-size", "4096"],
        disk_type: "Dynamic",
        logical_sector: 4096,
        qemu_block_size: None,
    });
}
