//! `vhdtool`: create, inspect, check, convert, map, compare, edit, mount and boot virtual disks
//! (raw, VHD and VHDX, differencing chains), in the manner of `qemu-img`.
//!
//! ```text
//!   argv ──clap──> Command ──> cmd::<verb>::run(args) -> Result<exit code>
//!                                  │
//!                                  ├─ block_backend::open (format probed by content, chains)
//!                                  └─ vhd::{create, check, repair}
//! ```
//!
//! Invariants:
//! - Existing files are identified by content, never by extension; extensions only choose the
//!   format of files being created.
//! - Inspecting verbs (`info`, `check` without `--repair`, `map`, `read`, `compare`) open
//!   read-only and never write.
//! - New outputs are never written over an existing file without `--force`, and appear under
//!   their name only once complete (temporary name, then rename).
//! - Every image is locked while open (QEMU-compatible OFD locks): one writer, or readers.
//! - A reader that goes away ends vhdtool quietly (SIGPIPE, like other filters), except for the
//!   long-running verbs (`boot`, `mount`, `serve`), which must flush their disks whatever stdout does.
//! - Errors print `vhdtool: <message with its causes>` on stderr; exit 1 (2 for `compare`);
//!   `check` exits 0 clean, 2 corrupt, 3 leaks only, 1 could not check.

#![warn(missing_docs)]

mod cmd;
mod progress;
mod size;

use std::process::ExitCode;

use clap::{Parser, Subcommand};

/// Command-line interface.
#[derive(Debug, Parser)]
#[command(
    name = "vhdtool",
    version,
    about = "Create, inspect, check, convert, edit, mount and boot VHD and VHDX virtual disks",
    long_about = "Create, inspect, check, convert, edit, mount and boot VHD and VHDX virtual \
                  disks (and raw images, and differencing chains of either format).\n\n\
                  An image written by one process (vhdtool, qemu) is refused to every other \
                  writer; readers need --force-share to look at it meanwhile.\n\n\
                  Existing images are recognised by content. Sizes take binary suffixes: \
                  512, 1K, 64M, 1G, 1T (1K = 1024), also 1GiB."
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

/// The verbs.
#[derive(Debug, Subcommand)]
enum Command {
    /// Measure IOPS, bandwidth and latency through the block backend's engines (like fio).
    Bench(cmd::bench::Args),
    /// Boot a Linux kernel in a minimal KVM VM with the images as virtio-blk disks.
    Boot(cmd::boot::Args),
    /// Create a new fixed, dynamic or differencing image.
    Create(cmd::create::Args),
    /// Show the format, sizes and backing chain of an image.
    Info(cmd::info::Args),
    /// Check an image's structures (and repair them with --repair).
    Check(cmd::check::Args),
    /// Copy an image (its whole chain flattened) into a new image.
    Convert(cmd::convert::Args),
    /// Write bytes of the virtual disk to stdout.
    Read(cmd::read::Args),
    /// Write bytes from a file or stdin into the virtual disk.
    Write(cmd::write::Args),
    /// Show where each range of the virtual disk is stored.
    Map(cmd::map::Args),
    /// Compare the contents of two images.
    Compare(cmd::compare::Args),
    /// Shrink a dynamic or differencing image in place (release unused blocks, close holes).
    Compact(cmd::compact::Args),
    /// Change the virtual size in place (SIZE, +SIZE or -SIZE).
    Resize(cmd::resize::Args),
    /// Commit a differencing image into its parent, then remove it.
    Merge(cmd::merge::Args),
    /// Re-link a differencing image to its parent at a new location.
    Rebase(cmd::rebase::Args),
    /// How large a converted (or new) image would be: required and fully allocated bytes.
    Measure(cmd::measure::Args),
    /// Print shell completions (bash, zsh, fish, elvish, powershell).
    Completions(cmd::completions::Args),
    /// Print the man page, or write one per verb into --dir.
    Man(cmd::completions::ManArgs),
    /// Mount the disk and its partitions as files (FUSE); returns once the mount is ready.
    Mount(cmd::mount::Args),
    /// Flush and unmount a `vhdtool mount`, waiting for its daemon to exit.
    Umount(cmd::mount::UmountArgs),
    /// Serve the image over NBD (Unix socket or TCP) until SIGINT/SIGTERM.
    Serve(cmd::serve::Args),
    /// Download an Azure page blob holding a fixed VHD (SAS URL) into any format, sparse.
    Download(cmd::download::Args),
    /// Upload an image to an Azure page blob (SAS URL) as a fixed VHD, sending only data.
    Upload(cmd::upload::Args),
    /// Control a VM started with `vhdtool boot --api-socket PATH`.
    Vm(cmd::vm::Args),
}

impl Command {
    /// Runs the verb; returns its exit code.
    fn run(&self) -> anyhow::Result<u8> {
        match self {
            Command::Bench(a) => cmd::bench::run(a),
            Command::Boot(a) => cmd::boot::run(a),
            Command::Create(a) => cmd::create::run(a),
            Command::Info(a) => cmd::info::run(a),
            Command::Check(a) => cmd::check::run(a),
            Command::Convert(a) => cmd::convert::run(a),
            Command::Read(a) => cmd::read::run(a),
            Command::Write(a) => cmd::write::run(a),
            Command::Map(a) => cmd::map::run(a),
            Command::Compare(a) => cmd::compare::run(a),
            Command::Compact(a) => cmd::compact::run(a),
            Command::Resize(a) => cmd::resize::run(a),
            Command::Merge(a) => cmd::merge::run(a),
            Command::Rebase(a) => cmd::rebase::run(a),
            Command::Measure(a) => cmd::measure::run(a),
            Command::Completions(a) => cmd::completions::run(a),
            Command::Man(a) => cmd::completions::run_man(a),
            Command::Mount(a) => cmd::mount::run(a),
            Command::Umount(a) => cmd::mount::run_umount(a),
            Command::Serve(a) => cmd::serve::run(a),
            Command::Upload(a) => cmd::upload::run(a),
            Command::Download(a) => cmd::download::run(a),
            Command::Vm(a) => cmd::vm::run(a),
        }
    }

    /// Exit code when the verb fails with an error.
    fn error_code(&self) -> u8 {
        match self {
            Command::Compare(_) => 2,
            _ => 1,
        }
    }
}

/// One line holding an error and its causes, each cause shown once (library errors often repeat
/// their source's message in their own).
fn render_error(e: &anyhow::Error) -> String {
    let mut msg = String::new();
    for cause in e.chain() {
        let text = cause.to_string();
        if text.is_empty() || msg.contains(&text) {
            continue;
        }
        if !msg.is_empty() {
            msg.push_str(": ");
        }
        msg.push_str(&text);
    }
    redact_sas(&msg)
}

/// `text` with the value of every `sig=` (a SAS signature) replaced: the layers already name
/// blobs without their query string, this is the last guard before anything reaches a terminal
/// or a CI log.
fn redact_sas(text: &str) -> String {
    let mut out = String::with_capacity(text.len());
    let mut rest = text;
    while let Some(i) = rest.find("sig=") {
        let (head, tail) = rest.split_at(i + 4);
        out.push_str(head);
        let end = tail
            .find(|c: char| c == '&' || c == '#' || c.is_whitespace() || c == '"' || c == '\'')
            .unwrap_or(tail.len());
        if end > 0 {
            out.push_str("REDACTED");
        }
        rest = &tail[end..];
    }
    out.push_str(rest);
    out
}

/// Sends what the libraries log to stderr: warnings and errors by default, more with
/// `VHDKIT_LOG=info|debug|trace` (`error` for less). The mount daemon redirects stderr to its
/// `--log` file once detached.
fn init_logging() {
    use tracing_subscriber::filter::LevelFilter;
    let level = match std::env::var("VHDKIT_LOG").as_deref() {
        Ok("error") => LevelFilter::ERROR,
        Ok("info") => LevelFilter::INFO,
        Ok("debug") => LevelFilter::DEBUG,
        Ok("trace") => LevelFilter::TRACE,
        Ok("off") => LevelFilter::OFF,
        _ => LevelFilter::WARN,
    };
    let _ = tracing_subscriber::fmt()
        .with_max_level(level)
        .with_writer(std::io::stderr)
        .with_ansi(false)
        .with_target(false)
        .try_init();
}

/// Sets SIGPIPE's disposition: default (the process ends quietly, as `head` expects of a
/// filter) or ignored (writes to a closed pipe fail with EPIPE, which the caller handles). Rust
/// starts programs with it ignored, and then `println!` panics on a closed stdout.
fn sigpipe(default: bool) {
    let action = if default {
        libc::SIG_DFL
    } else {
        libc::SIG_IGN
    };
    // SAFETY: installs a disposition (no handler function) for one signal; no memory is shared.
    unsafe {
        libc::signal(libc::SIGPIPE, action);
    }
}

fn main() -> ExitCode {
    init_logging();
    sigpipe(true);
    let cli = Cli::parse();
    if matches!(
        cli.command,
        Command::Boot(_) | Command::Mount(_) | Command::Serve(_)
    ) {
        // They run for long and own open disks: a closed stdout (or, for serve, a client's
        // socket) must not kill them unflushed (the console ignores write errors; the mount
        // daemon logs to a file; the server ends the connection).
        sigpipe(false);
    }
    match cli.command.run() {
        Ok(code) => ExitCode::from(code),
        Err(e) => {
            eprintln!("vhdtool: {}", render_error(&e));
            ExitCode::from(cli.command.error_code())
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use anyhow::Context;
    use clap::CommandFactory;

    fn parse(args: &[&str]) -> Result<Cli, clap::Error> {
        Cli::try_parse_from(std::iter::once("vhdtool").chain(args.iter().copied()))
    }

    #[test]
    fn sas_signatures_never_reach_an_error_message() {
        assert_eq!(
            redact_sas("PUT http://h/a/c/b?sv=1&sig=AbC%2B&comp=page: 403"),
            "PUT http://h/a/c/b?sv=1&sig=REDACTED&comp=page: 403"
        );
        assert_eq!(
            redact_sas("x?sig=S y sig=T"),
            "x?sig=REDACTED y sig=REDACTED"
        );
        assert_eq!(redact_sas("no signature here"), "no signature here");
        assert_eq!(redact_sas("empty sig=&a"), "empty sig=&a");
    }

    #[test]
    fn cli_definition_is_consistent() {
        Cli::command().debug_assert();
    }

    #[test]
    fn create_takes_suffixed_sizes_and_options() {
        let cli = parse(&[
            "create",
            "-f",
            "vhd",
            "--type",
            "fixed",
            "--block-size",
            "512K",
            "--sparse",
            "a.vhd",
            "64M",
        ])
        .unwrap();
        let Command::Create(a) = cli.command else {
            panic!("not create")
        };
        assert_eq!(a.size, Some(64 << 20));
        assert_eq!(a.block_size, Some(512 << 10));
        assert_eq!(a.format, Some(cmd::create::CreateFormat::Vhd));
        assert_eq!(a.disk_type, Some(cmd::DiskTypeArg::Fixed));
        assert!(a.sparse);
    }

    #[test]
    fn create_size_is_optional_for_differencing() {
        let cli = parse(&["create", "--parent", "base.vhd", "child.vhd"]).unwrap();
        let Command::Create(a) = cli.command else {
            panic!("not create")
        };
        assert_eq!(a.size, None);
        assert_eq!(a.parent.as_deref(), Some(std::path::Path::new("base.vhd")));
    }

    #[test]
    fn bad_sizes_and_formats_are_usage_errors() {
        assert!(parse(&["create", "a.vhd", "12Q"]).is_err());
        assert!(parse(&["create", "-f", "qcow2", "a.vhd", "1G"]).is_err());
        assert!(parse(&["create", "-f", "raw", "a.vhd", "1G"]).is_err());
        assert!(parse(&["create", "--type", "differencing", "a.vhd", "1G"]).is_err());
        assert!(parse(&["read", "a.vhd", "--offset", "x", "--length", "1"]).is_err());
        assert!(parse(&["read", "a.vhd", "--offset", "0"]).is_err());
        assert!(parse(&["convert", "a.vhd"]).is_err());
        assert!(parse(&["frobnicate"]).is_err());
    }

    #[test]
    fn convert_parses_output_options() {
        let cli = parse(&[
            "convert", "-O", "vhd", "--type", "dynamic", "-p", "--force", "src.img", "dst.vhd",
        ])
        .unwrap();
        let Command::Convert(a) = cli.command else {
            panic!("not convert")
        };
        assert_eq!(a.output_format, Some(cmd::ImageFormat::Vhd));
        assert!(a.progress && a.force);
    }

    #[test]
    fn read_and_write_take_offsets_with_suffixes_or_hex() {
        let cli = parse(&["read", "a.vhd", "--offset", "1M", "--length", "0x200"]).unwrap();
        let Command::Read(a) = cli.command else {
            panic!("not read")
        };
        assert_eq!((a.offset, a.length), (1 << 20, 512));
        let cli = parse(&["write", "a.vhd", "--offset", "7", "--input", "-"]).unwrap();
        let Command::Write(a) = cli.command else {
            panic!("not write")
        };
        assert_eq!(a.offset, 7);
        assert_eq!(a.input.to_str(), Some("-"));
    }

    #[test]
    fn json_flags_parse() {
        assert!(parse(&["info", "--json", "a"]).is_ok());
        assert!(parse(&["check", "--repair", "--json", "a"]).is_ok());
        assert!(parse(&["map", "--json", "a"]).is_ok());
        assert!(parse(&["compare", "a", "b"]).is_ok());
    }

    #[test]
    fn compare_errors_exit_2_others_exit_1() {
        let c = parse(&["compare", "a", "b"]).unwrap();
        assert_eq!(c.command.error_code(), 2);
        let i = parse(&["info", "a"]).unwrap();
        assert_eq!(i.command.error_code(), 1);
    }

    #[test]
    fn error_rendering_keeps_every_cause_once() {
        let io = std::io::Error::new(std::io::ErrorKind::NotFound, "No such file");
        let e = anyhow::Error::new(io).context("open a.vhd");
        assert_eq!(render_error(&e), "open a.vhd: No such file");
        let inner = anyhow::anyhow!("disk full");
        let e = Err::<(), _>(inner)
            .context("a.vhd: write at offset 0: disk full")
            .unwrap_err();
        assert_eq!(render_error(&e), "a.vhd: write at offset 0: disk full");
    }
}
