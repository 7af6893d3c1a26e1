//! Test support for vhdkit: real test images, the built `vhdtool` binary and external tools.
//!
//! The format crates use this as a dev-dependency for their own unit tests; the end-to-end tests
//! of the whole toolkit live beside it in `tests/tests/`.
//!
//! ```text
//!   $VHDKIT_TEST_IMAGES  (default <workspace>/../shared/vhd-test-images, read-only in CI)
//!      go-vhd/win8.vhd ─────────── copy ───┐
//!      dfvfs/ext2.vhd.xz ───── xz decode ──┤
//!                                          ▼
//!   target/<profile>/vhdkit-test-tmp/p<pid>-XXXXXX/{win8.vhd, ext2.vhd}   writable copies
//! ```
//!
//! Invariants:
//! - An original image is only ever opened for reading; every path handed out is a fresh,
//!   writable copy, so a test may write, repair or corrupt it freely.
//! - The copies made by one call share one directory and keep their base names (minus `.xz`), so
//!   a differencing child finds its parent beside it ([`images_or_skip`]).
//! - When the image folder is absent a test skips with a printed reason, unless images are
//!   required ([`require_images`]: `VHDKIT_REQUIRE_TEST_IMAGES=1` or `CI=true`), where it panics.
//!   A folder that is present but lacks the named file is a bug in the test: it always panics.
//! - Copies live under the cargo target directory, not `/tmp`; directories left by test processes
//!   that have exited are removed the next time a process makes a copy.
//!
//! This crate depends on no vhdkit crate (`vhd`, `vhdx`, `block-backend`, `vhdtool`): they use it
//! as a dev-dependency, and an edge back would be a dependency cycle.

pub mod azure;

use std::borrow::BorrowMut;
use std::ffi::OsStr;
use std::fs::{self, File, OpenOptions};
use std::io::{self, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::sync::{Once, OnceLock};
use std::{env, process};

/// Environment variable naming the test image folder. A relative value is taken relative to the
/// workspace root (test processes run in their own package's directory, so the cwd is no guide).
pub const IMAGES_ENV: &str = "VHDKIT_TEST_IMAGES";
/// Environment variable that, set to `1`, makes a missing image folder a test failure.
pub const REQUIRE_ENV: &str = "VHDKIT_REQUIRE_TEST_IMAGES";
/// Environment variable that overrides where [`vhdtool_bin`] finds the binary (no build then).
pub const VHDTOOL_BIN_ENV: &str = "VHDTOOL_BIN";

/// The workspace root (the directory holding the root `Cargo.toml`).
pub fn workspace_root() -> PathBuf {
    // This crate lives in <root>/tests, so its manifest directory's parent is the root.
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("vhdkit-tests lives one level below the workspace root")
        .to_path_buf()
}

/// Where the test images are configured to be, whether or not the folder exists.
pub fn configured_images_dir() -> PathBuf {
    match env::var_os(IMAGES_ENV) {
        Some(v) if !v.is_empty() => {
            let p = PathBuf::from(v);
            if p.is_relative() {
                workspace_root().join(p)
            } else {
                p
            }
        }
        _ => workspace_root().join("../shared/vhd-test-images"),
    }
}

/// The folder of real test images (`$VHDKIT_TEST_IMAGES`, default
/// `<workspace root>/../shared/vhd-test-images`), or `None` if it does not exist.
///
/// The folder may be read-only: never open anything in it for writing. Use [`image_or_skip()`] to
/// get a writable copy.
pub fn test_images_dir() -> Option<PathBuf> {
    let dir = configured_images_dir();
    if dir.is_dir() {
        Some(fs::canonicalize(&dir).unwrap_or(dir))
    } else {
        None
    }
}

fn env_flag(name: &str) -> bool {
    env::var(name)
        .map(|v| matches!(v.trim().to_ascii_lowercase().as_str(), "1" | "true" | "yes"))
        .unwrap_or(false)
}

/// True when tests that need the real images must not skip: `VHDKIT_REQUIRE_TEST_IMAGES=1` or
/// `CI=true`.
pub fn require_images() -> bool {
    env_flag(REQUIRE_ENV) || env_flag("CI")
}

/// Skip (print `reason` to stderr and return) or, when images are required, panic with it.
fn skip_or_panic(reason: &str) {
    if require_images() {
        panic!("{reason} (images are required: {REQUIRE_ENV}=1 or CI=true)");
    }
    skipped(reason);
}

/// Environment variable naming a file where every skip is recorded (`test.sh` sets it and
/// reports the skipped tests and their reasons, so a skip never passes as green unseen).
pub const SKIP_LOG_ENV: &str = "VHDKIT_SKIP_LOG";

/// Records that the running test skipped what it checks (or a part of it) because of `reason`:
/// prints `SKIP: reason` and appends `<test binary>::<test name>\t<reason>` to
/// `$VHDKIT_SKIP_LOG`. Callers decide first whether skipping is allowed ([`ci`]).
pub fn skipped(reason: &str) {
    eprintln!("SKIP: {reason}");
    let Some(log) = env::var_os(SKIP_LOG_ENV) else {
        return;
    };
    // libtest runs each test on a thread named after it.
    let test = std::thread::current()
        .name()
        .unwrap_or("<unnamed>")
        .to_string();
    let binary = env::current_exe()
        .ok()
        .and_then(|p| p.file_stem().map(|s| s.to_string_lossy().into_owned()))
        .map(|s| match s.rsplit_once('-') {
            Some((name, hash)) if hash.chars().all(|c| c.is_ascii_hexdigit()) => name.to_string(),
            _ => s,
        })
        .unwrap_or_default();
    let line = format!("{binary}::{test}\t{}\n", reason.replace(['\n', '\t'], " "));
    // One append of one short line: concurrent tests never interleave within it.
    if let Ok(mut f) = OpenOptions::new().create(true).append(true).open(log) {
        let _ = io::Write::write_all(&mut f, line.as_bytes());
    }
}

/// True under `CI=true` (or `1`): every tool and device the tests use must be there, and a test
/// that would skip fails instead.
pub fn ci() -> bool {
    env_flag("CI")
}

/// Skips the running test with `reason` ([`skipped`]), or panics with it under [`ci`].
pub fn skip_unless_ci(reason: &str) {
    if ci() {
        panic!("{reason} (CI=true requires it)");
    }
    skipped(reason);
}

/// A writable temporary copy of the test image `rel_path` (relative to [`test_images_dir`], e.g.
/// `"go-vhd/win8.vhd"` or `"dfvfs/ext2.vhd.xz"`). A `.xz` file is decompressed and the copy is
/// named without the `.xz`.
///
/// Returns `None` after printing a skip reason when the image folder is absent and images are not
/// required; panics when they are required, or when the folder exists but the file does not.
///
/// ```no_run
/// let Some(path) = vhdkit_tests::image_or_skip("go-vhd/win8.vhd") else { return };
/// assert!(path.ends_with("win8.vhd"));
/// ```
pub fn image_or_skip(rel_path: impl AsRef<Path>) -> Option<PathBuf> {
    images_or_skip(&[rel_path]).map(|mut v| v.remove(0))
}

/// Like [`image_or_skip()`] for several images copied into one directory, in the order given; use it
/// for a differencing child and its parent (`&["go-vhd/win8.vhd", "go-vhd/win8-child.vhd"]`).
/// Base names must be distinct.
pub fn images_or_skip<P: AsRef<Path>>(rel_paths: &[P]) -> Option<Vec<PathBuf>> {
    let Some(images) = test_images_dir() else {
        let names: Vec<_> = rel_paths
            .iter()
            .map(|p| p.as_ref().display().to_string())
            .collect();
        skip_or_panic(&format!(
            "test image folder {} not found (set {IMAGES_ENV}); needed {}",
            configured_images_dir().display(),
            names.join(", ")
        ));
        return None;
    };
    let dest = fresh_scratch_dir();
    Some(
        rel_paths
            .iter()
            .map(|rel| copy_image(&images.join(rel), &dest))
            .collect(),
    )
}

/// `let path = image_or_skip!("go-vhd/win8.vhd");` returns from the enclosing `()` test when the
/// image is skipped; see [`image_or_skip()`].
#[macro_export]
macro_rules! image_or_skip {
    ($rel:expr) => {
        match $crate::image_or_skip($rel) {
            ::core::option::Option::Some(path) => path,
            ::core::option::Option::None => return,
        }
    };
}

/// Copy (or xz-decode) `src` into `dest_dir`, never opening `src` for writing.
fn copy_image(src: &Path, dest_dir: &Path) -> PathBuf {
    if !src.is_file() {
        panic!(
            "test image {} does not exist although the image folder does (wrong path in the test?)",
            src.display()
        );
    }
    let name = src.file_name().expect("image path has a file name");
    let compressed = src.extension() == Some(OsStr::new("xz"));
    let out_name = if compressed {
        src.file_stem().expect("xz file has a stem")
    } else {
        name
    };
    let out = dest_dir.join(out_name);
    let input = File::open(src).unwrap_or_else(|e| panic!("open {}: {e}", src.display()));
    let mut output = OpenOptions::new()
        .write(true)
        .create_new(true)
        .open(&out)
        .unwrap_or_else(|e| panic!("create {} (duplicate base name?): {e}", out.display()));
    let copied = if compressed {
        io::copy(
            &mut xz2::read::XzDecoder::new_multi_decoder(BufReader::new(input)),
            &mut output,
        )
    } else {
        io::copy(&mut BufReader::new(input), &mut output)
    };
    if let Err(e) = copied {
        panic!("copy {} -> {}: {e}", src.display(), out.display());
    }
    out
}

/// `target/<profile>` of the running test executable (test binaries live in its `deps/`).
fn target_profile_dir() -> Option<PathBuf> {
    let exe = env::current_exe().ok()?;
    let dir = exe.parent()?;
    // Test binaries live in `<profile>/deps/`, examples (tests/examples/nested_run.rs) in
    // `<profile>/examples/`.
    if dir.file_name() == Some(OsStr::new("deps"))
        || dir.file_name() == Some(OsStr::new("examples"))
    {
        dir.parent().map(Path::to_path_buf)
    } else {
        Some(dir.to_path_buf())
    }
}

/// A new, empty directory that outlives this call (it is removed by a later test process once
/// this one has exited). Lives under `target/<profile>/vhdkit-test-tmp/`.
pub fn fresh_scratch_dir() -> PathBuf {
    static PRUNE: Once = Once::new();
    let root = target_profile_dir()
        .filter(|d| d.join("deps").is_dir() || d.join(".fingerprint").is_dir())
        .unwrap_or_else(env::temp_dir)
        .join("vhdkit-test-tmp");
    fs::create_dir_all(&root).unwrap_or_else(|e| panic!("create {}: {e}", root.display()));
    PRUNE.call_once(|| prune_exited(&root));
    tempfile::Builder::new()
        .prefix(&format!("p{}-", process::id()))
        .tempdir_in(&root)
        .unwrap_or_else(|e| panic!("create a directory in {}: {e}", root.display()))
        .keep()
}

/// Remove `p<pid>-*` directories whose process no longer runs (best effort, Linux `/proc`).
fn prune_exited(root: &Path) {
    if !Path::new("/proc/self").exists() {
        return;
    }
    let Ok(entries) = fs::read_dir(root) else {
        return;
    };
    for entry in entries.flatten() {
        let name = entry.file_name();
        let Some(pid) = name
            .to_str()
            .and_then(|n| n.strip_prefix('p'))
            .and_then(|n| n.split('-').next())
            .and_then(|p| p.parse::<u32>().ok())
        else {
            continue;
        };
        if pid != process::id() && !Path::new("/proc").join(pid.to_string()).exists() {
            let _ = fs::remove_dir_all(entry.path());
        }
    }
}

/// Path of the `vhdtool` binary for end-to-end tests.
///
/// `CARGO_BIN_EXE_vhdtool` is only set for the `vhdtool` package's own integration tests, so
/// other packages find it as `target/<profile>/vhdtool` beside the running test executable
/// (which lives in `target/<profile>/deps/`). `cargo test --workspace` builds that binary only
/// when the `vhdtool` package has integration tests, and never rebuilds it for another package's
/// tests, so on first use in a process this runs `cargo build -p vhdtool --bin vhdtool` for the
/// same profile and target directory: a no-op when fresh, and the binary is never stale.
/// Set `VHDTOOL_BIN` to use a given binary instead (no build).
pub fn vhdtool_bin() -> PathBuf {
    static BIN: OnceLock<PathBuf> = OnceLock::new();
    BIN.get_or_init(|| {
        if let Some(p) = env::var_os(VHDTOOL_BIN_ENV).filter(|p| !p.is_empty()) {
            return PathBuf::from(p);
        }
        let profile_dir = target_profile_dir().expect("cannot locate the running test executable");
        let bin = profile_dir.join(format!("vhdtool{}", env::consts::EXE_SUFFIX));
        build_vhdtool(&profile_dir);
        assert!(bin.is_file(), "{} missing after building it", bin.display());
        bin
    })
    .clone()
}

/// `cargo build -p vhdtool --bin vhdtool` into `profile_dir` (`<target dir>/<profile>`).
fn build_vhdtool(profile_dir: &Path) {
    let profile = profile_dir
        .file_name()
        .and_then(OsStr::to_str)
        .unwrap_or("debug");
    let target_dir = profile_dir.parent().expect("profile dir has a parent");
    let cargo = env::var_os("CARGO").unwrap_or_else(|| "cargo".into());
    let mut cmd = Command::new(cargo);
    cmd.arg("build")
        .arg("--quiet")
        .arg("--manifest-path")
        .arg(workspace_root().join("Cargo.toml"))
        .args(["-p", "vhdtool", "--bin", "vhdtool"])
        .arg("--target-dir")
        .arg(target_dir);
    match profile {
        "debug" => {}
        "release" => {
            cmd.arg("--release");
        }
        other => {
            cmd.args(["--profile", other]);
        }
    }
    run(&mut cmd);
}

/// A `Command` for the `vhdtool` binary ([`vhdtool_bin`]).
pub fn vhdtool() -> Command {
    Command::new(vhdtool_bin())
}

fn describe(cmd: &Command) -> String {
    let mut s = cmd.get_program().to_string_lossy().into_owned();
    for a in cmd.get_args() {
        s.push(' ');
        s.push_str(&a.to_string_lossy());
    }
    s
}

fn failure_report(what: &str, cmd: &Command, out: &Output) -> String {
    format!(
        "{what}: `{}`\nstatus: {}\n--- stdout ---\n{}\n--- stderr ---\n{}",
        describe(cmd),
        out.status,
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    )
}

/// Run `cmd` to completion capturing stdout and stderr, whatever its exit status. Panics (naming
/// the command line) only if it cannot be started.
pub fn output(mut cmd: impl BorrowMut<Command>) -> Output {
    let cmd = cmd.borrow_mut();
    cmd.output()
        .unwrap_or_else(|e| panic!("cannot run `{}`: {e}", describe(cmd)))
}

/// Run `cmd` and require success; on failure panics with the command line, exit status, stdout
/// and stderr. Accepts `Command` or `&mut Command`.
pub fn run(mut cmd: impl BorrowMut<Command>) -> Output {
    let cmd = cmd.borrow_mut();
    let out = output(&mut *cmd);
    if !out.status.success() {
        panic!("{}", failure_report("command failed", cmd, &out));
    }
    out
}

/// Run `cmd` and require exit code `code`; otherwise panics like [`run`].
pub fn run_expect_code(mut cmd: impl BorrowMut<Command>, code: i32) -> Output {
    let cmd = cmd.borrow_mut();
    let out = output(&mut *cmd);
    if out.status.code() != Some(code) {
        panic!(
            "{}",
            failure_report(&format!("expected exit code {code}"), cmd, &out)
        );
    }
    out
}

/// Reproducible pseudo-random test data: `len` bytes from `seed` (xorshift64*), none of them
/// zero, so written data never reads back equal to a hole or a dropped sector by luck.
pub fn noise(seed: u64, len: usize) -> Vec<u8> {
    let mut x = seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
    let mut out = Vec::with_capacity(len + 8);
    while out.len() < len {
        x ^= x >> 12;
        x ^= x << 25;
        x ^= x >> 27;
        out.extend_from_slice(&x.wrapping_mul(0x2545_F491_4F6C_DD1D).to_le_bytes());
    }
    out.truncate(len);
    for b in &mut out {
        if *b == 0 {
            *b = 0xA5;
        }
    }
    out
}

/// Bytes that depend only on their position (never zero): `pattern_at(start, len)[i]` is byte
/// `start + i` of one endless pattern, so a range read back from anywhere can be checked
/// against `pattern_at(offset, len)`, and different `start`s give different data.
pub fn pattern_at(start: u64, len: usize) -> Vec<u8> {
    (0..len as u64)
        .map(|i| ((start.wrapping_add(i)) % 253 * 31 % 253 + 1) as u8)
        .collect()
}

/// True if an executable called `name` is on `PATH` (or `name` is a path to one).
pub fn have_tool(name: &str) -> bool {
    fn is_executable(p: &Path) -> bool {
        use std::os::unix::fs::PermissionsExt;
        fs::metadata(p)
            .map(|m| m.is_file() && m.permissions().mode() & 0o111 != 0)
            .unwrap_or(false)
    }
    if name.contains('/') {
        return is_executable(Path::new(name));
    }
    env::var_os("PATH")
        .map(|paths| env::split_paths(&paths).any(|dir| is_executable(&dir.join(name))))
        .unwrap_or(false)
}

/// `have_tool(name)`, printing a skip reason when it is missing (or panicking under `CI=true`,
/// where `.ci/run` installs every tool the tests use).
pub fn tool_or_skip(name: &str) -> bool {
    if have_tool(name) {
        return true;
    }
    if ci() {
        panic!("required tool `{name}` not found on PATH (.ci/run should install it)");
    }
    skipped(&format!(
        "tool `{name}` not found on PATH (./setup.sh installs it)"
    ));
    false
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Read;

    #[test]
    fn workspace_root_holds_the_workspace_manifest() {
        let manifest = fs::read_to_string(workspace_root().join("Cargo.toml")).unwrap();
        assert!(manifest.contains("[workspace]"));
    }

    #[test]
    fn have_tool_finds_sh_and_not_nonsense() {
        assert!(have_tool("sh"));
        assert!(!have_tool("no-such-tool-vhdkit-xyz"));
    }

    #[test]
    fn run_reports_the_failing_command() {
        let err = std::panic::catch_unwind(|| run(Command::new("sh").args(["-c", "exit 3"])))
            .expect_err("a failing command must panic");
        let msg = err.downcast_ref::<String>().unwrap();
        assert!(
            msg.contains("sh -c exit 3") && msg.contains("exit status: 3"),
            "{msg}"
        );
        let out = run_expect_code(Command::new("sh").args(["-c", "echo hi; exit 3"]), 3);
        assert_eq!(out.stdout, b"hi\n");
    }

    #[test]
    fn xz_image_is_decompressed_into_a_writable_copy() {
        let Some(path) = image_or_skip("dfvfs/ext2.vhd.xz") else {
            return;
        };
        assert_eq!(path.file_name().unwrap(), "ext2.vhd");
        assert_eq!(fs::metadata(&path).unwrap().len(), 2_100_224);
        let mut f = OpenOptions::new()
            .read(true)
            .write(true)
            .open(&path)
            .unwrap();
        let mut tail = [0u8; 8];
        io::Seek::seek(&mut f, io::SeekFrom::End(-512)).unwrap();
        f.read_exact(&mut tail).unwrap();
        assert_eq!(&tail, b"conectix");
    }

    #[test]
    fn child_and_parent_are_copied_side_by_side() {
        let Some(paths) = images_or_skip(&["go-vhd/win8.vhd", "go-vhd/win8-child.vhd"]) else {
            return;
        };
        assert_eq!(paths[0].parent(), paths[1].parent());
        assert_eq!(fs::metadata(&paths[1]).unwrap().len(), 81_920);
        // The copy is writable even though the original may be read-only.
        fs::write(&paths[0], b"scribble").unwrap();
        let original = test_images_dir().unwrap().join("go-vhd/win8.vhd");
        assert_eq!(fs::metadata(original).unwrap().len(), 8192);
    }
}
