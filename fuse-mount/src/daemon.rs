//! Mounting and unmounting: the daemon's life cycle.
//!
//! ```text
//!  vhdtool mount IMAGE DIR
//!    prepare: open the disk (chain), read the partition table          errors → exit 1
//!    fork ──────────────────────────────────────────────┐ (unless --foreground)
//!    parent: wait on a pipe                             child: setsid, stdio → /dev/null
//!      "OK"  → exit 0 (the mount is ready)                     block SIGTERM/SIGINT/SIGHUP
//!      "ERR …" or EOF → exit 1 with the message                mount(2) or fusermount3,
//!                                                              FUSE INIT handshake done
//!                                                              → "OK" on the pipe
//!                                                              serve on N threads until unmounted
//!                                                              sigwait thread: flush, unmount
//!                                                              destroy: flush; exit 0
//!
//!  vhdtool umount DIR
//!    /proc/self/mountinfo: DIR's source "vhdtool:<pid>:<image>" → pid
//!    fsync(DIR/disk) → Disk::flush in the daemon;  umount(2) (fusermount3 -u if not root)
//!    wait until the daemon has exited (its last flush is done, the image is closed)
//! ```
//!
//! Invariants:
//! - [`Prepared::serve`] returns (in the parent) only once the kernel has completed the FUSE
//!   handshake: the files are there and requests are queued for the daemon, not refused.
//! - Nothing runs in the child after `fork` while another thread exists: the parent checks that
//!   it is single-threaded before forking, and threads are only started in the child.
//! - SIGTERM, SIGINT and SIGHUP are blocked in every thread and taken by one `sigwait` thread,
//!   which flushes the disk and then unmounts (lazily if the mount is busy, so the signal always
//!   ends the mount; the daemon keeps serving open files until they are closed).
//! - The daemon flushes the disk when the kernel ends the session (`destroy`) and once more
//!   before exiting; `vhdtool umount` returns only after the daemon process is gone, so the image
//!   is closed and consistent when it returns.
//! - A daemon killed with SIGKILL leaves writes that were completed (`pwrite`) in the image
//!   file and everything before its last flush durable; `vhdtool umount` then still removes the
//!   dead mount.

use std::fs::{self, File};
use std::io::{self, Read, Write};
use std::os::fd::{AsFd, OwnedFd};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime};

use block_backend::{Disk, Format, OpenOptions};
use fuser::{Config, MountOption, Session, SessionACL, SessionUnmounter};
use nix::errno::Errno;
use nix::sys::signal::{SigSet, Signal};
use nix::unistd::{ForkResult, Pid};

use crate::fs::{DiskFs, FileNode, SharedDisk, SharedOptions, MAX_IO};
use crate::partitions::{self, PartitionError, PartitionTable};
use crate::spliced::ReplyPipe;

/// Prefix of the mount source (`fsname`) of every vhdtool mount: `vhdtool:<pid>:<image name>`.
pub const FSNAME_PREFIX: &str = "vhdtool:";
/// How long `unmount` waits for the daemon to finish and exit after the unmount.
pub const DAEMON_EXIT_WAIT: Duration = Duration::from_secs(120);

/// Options of a mount.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MountOptions {
    /// Open the image read-only and mount read-only (writes fail with `EROFS`).
    pub read_only: bool,
    /// Serve in this process until unmounted instead of daemonizing.
    pub foreground: bool,
    /// Let other users access the mount (`allow_other`; for non-root users it needs
    /// `user_allow_other` in /etc/fuse.conf).
    pub allow_other: bool,
    /// Threads serving requests.
    pub threads: usize,
    /// Where the daemon's warnings and errors go once it has detached (appended); without
    /// it they are discarded, as nobody reads the daemon's stderr.
    pub log: Option<PathBuf>,
}

impl Default for MountOptions {
    fn default() -> Self {
        MountOptions {
            read_only: false,
            foreground: false,
            allow_other: false,
            threads: default_threads(),
            log: None,
        }
    }
}

/// Serving threads when not told: one per CPU, at least 2 and at most 8. More threads than
/// CPUs only add wake-ups on other cores: on 2 CPUs, 4 threads read a VHDX sequentially at
/// about 485 MB/s against about 670 MB/s with 1 or 2 (medians of 6, `benches/fuse.sh` setup).
pub fn default_threads() -> usize {
    std::thread::available_parallelism()
        .map_or(2, |n| n.get())
        .clamp(2, 8)
}

/// Errors of mounting and unmounting.
#[derive(Debug, thiserror::Error)]
pub enum MountError {
    /// The image could not be opened.
    #[error(transparent)]
    Open(#[from] block_backend::Error),
    /// The mount point is missing or not a directory.
    #[error("{}: {what}", path.display())]
    MountPoint {
        /// The mount point.
        path: PathBuf,
        /// What is wrong with it.
        what: String,
    },
    /// A system call of the mount or the daemon failed.
    #[error("{op}: {source}")]
    Sys {
        /// What was being done.
        op: String,
        /// The OS error.
        source: io::Error,
    },
    /// The daemon reported an error, or died, before the mount was ready.
    #[error("{0}")]
    Daemon(String),
    /// `fork` was asked for while the process runs several threads.
    #[error("cannot daemonize: the process already runs {0} threads (use --foreground)")]
    Threaded(usize),
    /// The directory is not the mount point of a vhdtool mount.
    #[error("{}: not a vhdtool mount point", .0.display())]
    NotMounted(PathBuf),
    /// The mount is in use (open files, a loop device, a mount on top).
    #[error("{}: mount is busy (close open files, detach loop devices, unmount what is mounted on it)", .0.display())]
    Busy(PathBuf),
    /// The daemon did not exit after the unmount.
    #[error("daemon {pid} still running {secs} s after unmounting {}", dir.display())]
    DaemonStuck {
        /// The mount point.
        dir: PathBuf,
        /// The daemon's process id.
        pid: u32,
        /// How long was waited.
        secs: u64,
    },
}

impl MountError {
    fn sys(op: impl Into<String>, source: impl Into<io::Error>) -> MountError {
        MountError::Sys {
            op: op.into(),
            source: source.into(),
        }
    }
}

/// Result alias of this module.
pub type Result<T, E = MountError> = std::result::Result<T, E>;

/// An opened image with its files, ready to be mounted.
#[derive(Debug)]
pub struct Prepared {
    image: PathBuf,
    fs: DiskFs,
    table: std::result::Result<PartitionTable, PartitionError>,
}

/// Opens `image` (with its chain; read-only or read-write, as `opts.read_only` says) and reads
/// its partition table. A table that cannot be read is reported by [`Prepared::table`]; the disk
/// is still mountable. A read-only image is opened once per serving thread (parallel reads).
pub fn prepare(image: &Path, opts: &MountOptions) -> Result<Prepared> {
    let read_only = opts.read_only;
    // Absolute: the daemon changes to `/` (a remote location, an NBD URI, stays as it is).
    let image = if block_backend::layer::is_remote(image) {
        image.to_path_buf()
    } else {
        fs::canonicalize(image).map_err(|source| block_backend::Error::Io {
            path: image.to_path_buf(),
            op: "open",
            offset: 0,
            source,
        })?
    };
    let open = if read_only {
        OpenOptions::read_only()
    } else {
        OpenOptions::read_write()
    };
    let mut chain = block_backend::open(&image, open)?;
    let table = partitions::scan_disk(&mut chain);
    let time = fs::metadata(&image)
        .and_then(|m| m.modified())
        .unwrap_or_else(|_| SystemTime::now());
    let top_format = chain.layers().first().map(|l| l.format);
    let disk: Box<dyn Disk> = Box::new(chain);
    let mut readers: Vec<Box<dyn Disk>> = Vec::new();
    if read_only {
        for _ in 1..opts.threads {
            readers.push(Box::new(block_backend::open(&image, open)?));
        }
    }
    let shared = SharedDisk::with_options(
        disk,
        SharedOptions {
            // Like Hyper-V, no unmap on VHD: a dynamic VHD can only drop whole blocks from its
            // BAT, which leaves their space leaked inside the file (check exit 3) instead of
            // returning it, so hole punching is refused and the image stays leak-free.
            discard: top_format != Some(Format::Vhd),
            readers,
        },
    );
    let fs = DiskFs::new(
        shared,
        table.as_ref().ok(),
        nix::unistd::getuid().as_raw(),
        nix::unistd::getgid().as_raw(),
        time,
    );
    Ok(Prepared { image, fs, table })
}

impl Prepared {
    /// The files the mount will show, `disk` first.
    pub fn files(&self) -> Vec<FileNode> {
        self.fs.files()
    }

    /// The partition table, or why it could not be used (then only `disk` is shown).
    pub fn table(&self) -> std::result::Result<&PartitionTable, &PartitionError> {
        self.table.as_ref()
    }

    /// Mounts on `dir` and serves. With `opts.foreground` this returns when the file system is
    /// unmounted; otherwise it forks a daemon and returns as soon as the mount is ready.
    pub fn serve(self, dir: &Path, opts: &MountOptions) -> Result<()> {
        let dir = fs::canonicalize(dir).map_err(|e| MountError::MountPoint {
            path: dir.to_path_buf(),
            what: e.to_string(),
        })?;
        if !dir.is_dir() {
            return Err(MountError::MountPoint {
                path: dir,
                what: "not a directory".into(),
            });
        }
        if opts.foreground {
            return run(self, &dir, opts, None, None);
        }
        // Opened before detaching, so a bad path is reported to the caller.
        let log = match &opts.log {
            Some(path) => Some(
                fs::OpenOptions::new()
                    .create(true)
                    .append(true)
                    .open(path)
                    .map_err(|e| MountError::sys(format!("open log {}", path.display()), e))?,
            ),
            None => None,
        };
        let threads = thread_count();
        if threads > 1 {
            return Err(MountError::Threaded(threads));
        }
        // Close-on-exec: helpers the daemon runs (fusermount3) must not keep the parent waiting.
        let (ready_rd, ready_wr) = nix::unistd::pipe2(nix::fcntl::OFlag::O_CLOEXEC)
            .map_err(|e| MountError::sys("pipe", e))?;
        // SAFETY: the process has a single thread (checked just above), so the child may run
        // any code after fork: no lock can be held by a thread that does not exist in it.
        match unsafe { nix::unistd::fork() }.map_err(|e| MountError::sys("fork", e))? {
            ForkResult::Parent { .. } => {
                drop(ready_wr);
                wait_ready(ready_rd)
            }
            ForkResult::Child => {
                drop(ready_rd);
                let code = match daemon_main(self, &dir, opts, ready_wr, log) {
                    Ok(()) => 0,
                    Err(_) => 1,
                };
                std::process::exit(code);
            }
        }
    }
}

/// Number of threads of this process (1 if it cannot be told).
fn thread_count() -> usize {
    fs::read_dir("/proc/self/task").map_or(1, |d| d.count())
}

/// Parent side: the daemon's verdict.
fn wait_ready(ready: OwnedFd) -> Result<()> {
    let mut msg = String::new();
    let mut f = File::from(ready);
    f.read_to_string(&mut msg)
        .map_err(|e| MountError::sys("read the daemon's status", e))?;
    if msg.starts_with("OK") {
        return Ok(());
    }
    match msg.strip_prefix("ERR ") {
        Some(m) => Err(MountError::Daemon(m.trim_end().to_string())),
        None => Err(MountError::Daemon(
            "the mount daemon exited before the mount was ready".into(),
        )),
    }
}

/// Child side: detach, then mount and serve.
fn daemon_main(
    p: Prepared,
    dir: &Path,
    opts: &MountOptions,
    ready: OwnedFd,
    log: Option<File>,
) -> Result<()> {
    let mut ready = File::from(ready);
    let detached = (|| -> Result<()> {
        nix::unistd::setsid().map_err(|e| MountError::sys("setsid", e))?;
        nix::unistd::chdir("/").map_err(|e| MountError::sys("chdir /", e))?;
        let null = dev_null()?;
        nix::unistd::dup2_stdin(&null).map_err(|e| MountError::sys("redirect stdin", e))?;
        nix::unistd::dup2_stdout(&null).map_err(|e| MountError::sys("redirect stdout", e))?;
        Ok(())
    })();
    if let Err(e) = detached {
        let _ = write!(ready, "ERR {e}");
        return Err(e);
    }
    run(p, dir, opts, Some(ready), log)
}

fn dev_null() -> Result<File> {
    fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open("/dev/null")
        .map_err(|e| MountError::sys("open /dev/null", e))
}

/// The mount source: `vhdtool:<pid>:<image file name>`, with anything but `[A-Za-z0-9._-]` in
/// the name replaced (the source is also passed as a comma-separated mount option).
fn fsname(image: &Path) -> String {
    let name: String = image
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default()
        .chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() || matches!(c, '.' | '_' | '-') {
                c
            } else {
                '_'
            }
        })
        .collect();
    format!("{FSNAME_PREFIX}{}:{name}", std::process::id())
}

/// Mounts, reports readiness (daemon mode), serves until unmounted, flushes.
fn run(
    p: Prepared,
    dir: &Path,
    opts: &MountOptions,
    mut ready: Option<File>,
    log: Option<File>,
) -> Result<()> {
    let fail = |ready: &mut Option<File>, e: MountError| {
        if let Some(r) = ready {
            let _ = write!(r, "ERR {e}");
        }
        e
    };
    // Blocked before any thread exists, so every thread inherits the mask and only the
    // sigwait thread ever takes these signals.
    let mut signals = SigSet::empty();
    for s in [Signal::SIGTERM, Signal::SIGINT, Signal::SIGHUP] {
        signals.add(s);
    }
    if let Err(e) = signals.thread_block() {
        return Err(fail(&mut ready, MountError::sys("block signals", e)));
    }

    let image = p.image.display().to_string();
    let mut config = Config::default();
    config.mount_options = vec![
        MountOption::FSName(fsname(&p.image)),
        MountOption::Subtype("vhdtool".into()),
        MountOption::DefaultPermissions,
        MountOption::NoAtime,
        MountOption::CUSTOM(format!("max_read={}", max_read())),
    ];
    if opts.read_only {
        config.mount_options.push(MountOption::RO);
    }
    config.acl = if opts.allow_other {
        SessionACL::All
    } else {
        SessionACL::Owner
    };
    config.n_threads = Some(opts.threads.max(1));
    // One descriptor for every thread: spliced replies are written to a duplicate of it.
    config.clone_fd = false;

    let shared = p.fs.shared();
    let reply_dev = p.fs.reply_device();
    let mut session = match Session::new(p.fs, dir, &config) {
        Ok(s) => s,
        Err(e) => {
            let mut op = format!("mount {}", dir.display());
            if e.kind() == io::ErrorKind::PermissionDenied && !nix::unistd::geteuid().is_root() {
                // The pure-Rust mount opens /dev/fuse itself before it falls back to
                // fusermount3, so a 0600 /dev/fuse stops a normal user here.
                op.push_str(" (is /dev/fuse readable and writable by you? it is usually 0666)");
            }
            return Err(fail(&mut ready, MountError::sys(op, e)));
        }
    };
    if let Ok(fd) = session.as_fd().try_clone_to_owned() {
        let _ = reply_dev.set(fd);
    }
    let unmounter = session.unmount_callable();
    let watcher_disk = shared.clone();
    let watcher_dir = dir.to_path_buf();
    let spawned = std::thread::Builder::new()
        .name("vhdtool-signals".into())
        .spawn(move || on_signal(signals, watcher_disk, unmounter, watcher_dir));
    if let Err(e) = spawned {
        // Dropping the session unmounts.
        return Err(fail(
            &mut ready,
            MountError::sys("start the signal thread", e),
        ));
    }

    if let Some(mut r) = ready.take() {
        // From here on nobody reads our stderr: it goes to the log file, or to /dev/null, so
        // that a caller capturing the output of `vhdtool mount` sees its end.
        match log {
            Some(mut f) => {
                let _ = writeln!(
                    f,
                    "vhdtool mount: serving {image} on {} (pid {})",
                    dir.display(),
                    std::process::id()
                );
                let _ = nix::unistd::dup2_stderr(&f);
            }
            None => {
                if let Ok(null) = dev_null() {
                    let _ = nix::unistd::dup2_stderr(&null);
                }
            }
        }
        let _ = r.write_all(b"OK");
    }

    let served = session.run();
    // Normally closed already by `destroy`; this covers a session that ended in error.
    let closed = shared.close();
    served.map_err(|e| MountError::sys("serve", e))?;
    closed.map_err(|e| MountError::Daemon(format!("close the image: {e}")))?;
    Ok(())
}

/// The largest read request the kernel should send. 1 MiB, except where pipes cannot carry a
/// spliced 1 MiB reply (no `CAP_SYS_RESOURCE` and `fs.pipe-max-size` below 2 MiB): there it is
/// the largest reply they can carry, if that is at least 512 KiB. A 1 MiB read then takes two
/// requests, both spliced, which measured faster than one reply from a mapping of the file or
/// from a buffer (`benches/fuse.sh`).
fn max_read() -> u32 {
    match ReplyPipe::new(MAX_IO as usize).map(|p| p.max_reply()) {
        Ok(n) if (MAX_IO as usize / 2..MAX_IO as usize).contains(&n) => n as u32,
        _ => MAX_IO,
    }
}

/// The signal thread: on SIGTERM/SIGINT/SIGHUP, flush and unmount.
fn on_signal(
    signals: SigSet,
    disk: Arc<SharedDisk>,
    mut unmounter: SessionUnmounter,
    dir: PathBuf,
) {
    if signals.wait().is_err() {
        return;
    }
    if let Err(e) = disk.flush() {
        tracing::error!("flush before unmount: {e}");
    }
    match unmounter.unmount() {
        Ok(()) => {}
        Err(e) if e.raw_os_error() == Some(Errno::EBUSY as i32) => {
            // Busy: detach now; the kernel ends the session when the last user lets go.
            if let Err(e) = lazy_unmount(&dir) {
                tracing::error!("lazy unmount of {}: {e}", dir.display());
            }
        }
        Err(e) => tracing::error!("unmount {}: {e}", dir.display()),
    }
}

/// `umount -l`: as root through umount2(MNT_DETACH), otherwise `fusermount3 -u -z`.
fn lazy_unmount(dir: &Path) -> Result<()> {
    match nix::mount::umount2(dir, nix::mount::MntFlags::MNT_DETACH) {
        Ok(()) => Ok(()),
        Err(Errno::EPERM) => fusermount_unmount(dir, true),
        Err(e) => Err(MountError::sys(format!("unmount {}", dir.display()), e)),
    }
}

/// `fusermount3 -u [-z] DIR` (for non-root users).
fn fusermount_unmount(dir: &Path, lazy: bool) -> Result<()> {
    let mut cmd = Command::new("fusermount3");
    cmd.arg("-u");
    if lazy {
        cmd.arg("-z");
    }
    let out = cmd
        .arg("--")
        .arg(dir)
        .output()
        .map_err(|e| MountError::sys("run fusermount3", e))?;
    if out.status.success() {
        return Ok(());
    }
    let msg = String::from_utf8_lossy(&out.stderr);
    if msg.contains("busy") {
        return Err(MountError::Busy(dir.to_path_buf()));
    }
    Err(MountError::sys(
        format!("fusermount3 -u {}", dir.display()),
        io::Error::other(msg.trim().to_string()),
    ))
}

/// One line of `/proc/self/mountinfo`, the fields that matter here.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MountEntry {
    /// Where it is mounted.
    pub mount_point: PathBuf,
    /// File system type (`fuse`, `fuse.vhdtool`, ...).
    pub fs_type: String,
    /// Mount source (for vhdtool mounts `vhdtool:<pid>:<image name>`).
    pub source: String,
}

impl MountEntry {
    /// The daemon's process id, for a vhdtool mount.
    pub fn daemon_pid(&self) -> Option<u32> {
        let rest = self.source.strip_prefix(FSNAME_PREFIX)?;
        rest.split(':').next()?.parse().ok()
    }
}

/// Undoes mountinfo's octal escapes (`\040` for a space, ...).
fn unescape(field: &str) -> String {
    let b = field.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        if b[i] == b'\\'
            && i + 3 < b.len()
            && b[i + 1..i + 4].iter().all(|c| (b'0'..=b'7').contains(c))
        {
            let v = (b[i + 1] - b'0') as u32 * 64
                + (b[i + 2] - b'0') as u32 * 8
                + (b[i + 3] - b'0') as u32;
            out.push(v as u8);
            i += 4;
        } else {
            out.push(b[i]);
            i += 1;
        }
    }
    String::from_utf8_lossy(&out).into_owned()
}

/// Parses `/proc/self/mountinfo` text.
pub fn parse_mountinfo(text: &str) -> Vec<MountEntry> {
    text.lines()
        .filter_map(|line| {
            let (pre, post) = line.split_once(" - ")?;
            let mount_point = pre.split(' ').nth(4)?;
            let mut post = post.split(' ');
            let fs_type = post.next()?;
            let source = post.next()?;
            Some(MountEntry {
                mount_point: PathBuf::from(unescape(mount_point)),
                fs_type: unescape(fs_type),
                source: unescape(source),
            })
        })
        .collect()
}

/// The topmost mount on `dir` (absolute, normalized), if any.
pub fn find_mount(dir: &Path) -> Result<Option<MountEntry>> {
    let text = fs::read_to_string("/proc/self/mountinfo")
        .map_err(|e| MountError::sys("read /proc/self/mountinfo", e))?;
    Ok(parse_mountinfo(&text)
        .into_iter()
        .rev()
        .find(|m| m.mount_point == dir))
}

/// `dir` made absolute without touching it when it is a dead mount (where `stat` fails with
/// `ENOTCONN`); resolved through symlinks when that works.
fn mount_point_path(dir: &Path) -> Result<PathBuf> {
    if let Ok(p) = fs::canonicalize(dir) {
        return Ok(p);
    }
    let abs = std::path::absolute(dir).map_err(|e| MountError::sys("resolve the path", e))?;
    // Lexically drop `.` and resolve the parent (which is alive) through symlinks.
    let parent = abs.parent().and_then(|p| fs::canonicalize(p).ok());
    match (parent, abs.file_name()) {
        (Some(p), Some(name)) => Ok(p.join(name)),
        _ => Ok(abs),
    }
}

/// True if process `pid` exists and is not a zombie.
fn process_alive(pid: u32) -> bool {
    let Ok(raw) = i32::try_from(pid) else {
        return false;
    };
    if let Err(Errno::ESRCH) = nix::sys::signal::kill(Pid::from_raw(raw), None) {
        return false;
    }
    // A zombie (exited, not yet reaped) counts as gone.
    match fs::read_to_string(format!("/proc/{pid}/stat")) {
        Ok(stat) => stat
            .rsplit_once(')')
            .map(|(_, rest)| !rest.trim_start().starts_with(['Z', 'X']))
            .unwrap_or(true),
        Err(_) => false,
    }
}

/// What [`unmount`] did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Unmounted {
    /// The daemon flushed, the mount is gone and the daemon has exited.
    Clean,
    /// The daemon was no longer running (killed); the dead mount was removed.
    DeadDaemon,
}

/// `vhdtool umount DIR`: flush, unmount, and wait for the daemon to exit.
pub fn unmount(dir: &Path) -> Result<Unmounted> {
    let dir = mount_point_path(dir)?;
    let entry = find_mount(&dir)?.ok_or_else(|| MountError::NotMounted(dir.clone()))?;
    let pid = entry
        .daemon_pid()
        .ok_or_else(|| MountError::NotMounted(dir.clone()))?;
    let alive = process_alive(pid);
    if alive {
        // fsync on any file of the mount reaches Disk::flush in the daemon.
        if let Ok(f) = File::open(dir.join("disk")) {
            f.sync_all()
                .map_err(|e| MountError::sys(format!("flush {}", dir.display()), e))?;
        }
    }
    match nix::mount::umount(&dir) {
        Ok(()) => {}
        Err(Errno::EBUSY) => return Err(MountError::Busy(dir)),
        Err(Errno::EPERM) => fusermount_unmount(&dir, false)?,
        Err(e) => return Err(MountError::sys(format!("unmount {}", dir.display()), e)),
    }
    if !alive {
        return Ok(Unmounted::DeadDaemon);
    }
    let start = Instant::now();
    while process_alive(pid) {
        if start.elapsed() > DAEMON_EXIT_WAIT {
            return Err(MountError::DaemonStuck {
                dir,
                pid,
                secs: DAEMON_EXIT_WAIT.as_secs(),
            });
        }
        std::thread::sleep(Duration::from_millis(10));
    }
    Ok(Unmounted::Clean)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn mountinfo_lines_give_mount_point_type_and_source() {
        let text = "\
22 1 0:21 / /proc rw,nosuid - proc proc rw
95 30 0:50 / /tmp/a\\040b rw,nosuid,nodev,relatime - fuse vhdtool:4242:disk.vhdx rw,user_id=0
96 30 0:51 / /mnt rw - fuse.vhdimount vhdimount rw
";
        let m = parse_mountinfo(text);
        assert_eq!(m.len(), 3);
        assert_eq!(m[1].mount_point, PathBuf::from("/tmp/a b"));
        assert_eq!(m[1].fs_type, "fuse");
        assert_eq!(m[1].daemon_pid(), Some(4242));
        assert_eq!(m[2].daemon_pid(), None);
        assert_eq!(m[0].daemon_pid(), None);
    }

    #[test]
    fn fsname_is_safe_as_a_mount_option() {
        let n = fsname(Path::new("/x/my disk,1.vhdx"));
        assert!(n.starts_with(FSNAME_PREFIX));
        assert!(n.ends_with(":my_disk_1.vhdx"), "{n}");
        assert!(!n.contains(',') && !n.contains(' '));
        let entry = MountEntry {
            mount_point: "/m".into(),
            fs_type: "fuse".into(),
            source: n,
        };
        assert_eq!(entry.daemon_pid(), Some(std::process::id()));
    }

    #[test]
    fn unescape_handles_trailing_and_bad_escapes() {
        assert_eq!(unescape("a\\134b"), "a\\b");
        assert_eq!(unescape("a\\04"), "a\\04");
        assert_eq!(unescape("\\"), "\\");
    }

    #[test]
    fn own_process_is_alive() {
        assert!(process_alive(std::process::id()));
        assert!(!process_alive(u32::MAX));
    }

    #[test]
    fn unmount_of_a_plain_directory_is_not_mounted() {
        let d = tempfile::tempdir().unwrap();
        assert!(matches!(unmount(d.path()), Err(MountError::NotMounted(_))));
    }
}
