//! `vhdtool mount [--read-only] [--foreground] [--allow-other] IMAGE DIR` and
//! `vhdtool umount DIR`: the disk and its partitions as files, through FUSE (crate
//! `fuse-mount`).
//!
//! `mount` returns once the mount is ready (the daemon keeps serving in the background) unless
//! `--foreground`, where it serves until unmounted. A partition table that cannot be read is
//! reported on stderr and the mount goes ahead with `DIR/disk` alone.
//! `umount` flushes, unmounts and waits for the daemon to exit, so the image is closed and
//! consistent when it returns; a mount whose daemon was killed is removed too.

use std::path::PathBuf;

use anyhow::{Context, Result};

/// Arguments of `mount`.
#[derive(Debug, clap::Args)]
pub struct Args {
    /// Mount read-only (the image is opened read-only; writes fail with EROFS).
    #[arg(long)]
    pub read_only: bool,
    /// Serve in the foreground until unmounted (SIGTERM/SIGINT flush and unmount).
    #[arg(long)]
    pub foreground: bool,
    /// Let other users access the mount (non-root: needs user_allow_other in /etc/fuse.conf).
    #[arg(long)]
    pub allow_other: bool,
    /// Append the daemon's warnings and errors to FILE once it has detached (otherwise they
    /// are discarded; with --foreground they go to stderr).
    #[arg(long, value_name = "FILE")]
    pub log: Option<PathBuf>,
    /// Threads serving requests (default: one per CPU, 2 to 8).
    #[arg(long, value_parser = clap::value_parser!(u16).range(1..=64))]
    pub threads: Option<u16>,
    /// The image (raw, VHD, VHDX; differencing chains are followed).
    pub image: PathBuf,
    /// The directory to mount on; it then holds `disk`, `p1`, `p2`, ...
    pub dir: PathBuf,
}

/// Arguments of `umount`.
#[derive(Debug, clap::Args)]
pub struct UmountArgs {
    /// The mount point.
    pub dir: PathBuf,
}

/// Runs `mount`.
pub fn run(a: &Args) -> Result<u8> {
    let opts = fuse_mount::MountOptions {
        read_only: a.read_only,
        foreground: a.foreground,
        allow_other: a.allow_other,
        threads: a
            .threads
            .map_or_else(fuse_mount::daemon::default_threads, usize::from),
        log: a.log.clone(),
    };
    let prepared = fuse_mount::prepare(&a.image, &opts)
        .with_context(|| format!("open {}", a.image.display()))?;
    if let Err(e) = prepared.table() {
        eprintln!(
            "vhdtool: {}: partition table ignored, only `disk` is shown: {e}",
            a.image.display()
        );
    }
    prepared.serve(&a.dir, &opts)?;
    Ok(0)
}

/// Runs `umount`.
pub fn run_umount(a: &UmountArgs) -> Result<u8> {
    if fuse_mount::unmount(&a.dir)? == fuse_mount::Unmounted::DeadDaemon {
        eprintln!(
            "vhdtool: {}: the mount daemon was not running; removed the dead mount",
            a.dir.display()
        );
    }
    Ok(0)
}
