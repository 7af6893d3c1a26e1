//! `vhdtool vm status [--json] | pause | resume | shutdown [--timeout S] | checkpoint [--stop]
//! DIR | migrate [--downtime-ms N] [--max-bandwidth MIB] tcp:HOST:PORT | disk-add
//! IMAGE[,read-only] | disk-remove [--timeout S] ID|IMAGE --api-socket PATH`: control a VM
//! started with `vhdtool boot --api-socket PATH` (protocol: `vmm::api`).
//!
//! Exit status 0 when the VMM carried out the command, 1 with its reason otherwise (or when
//! the socket cannot be reached). `shutdown` returns once the VMM has stopped the guest and
//! flushed its disks; `disk-remove` once the guest ejected the disk and the VMM drained,
//! flushed and closed it (or, after --timeout, with an error: the disk stays attached);
//! `migrate` once the target runs the guest (the source VMM then exits 0),
//! or, failing, with the cause while the guest runs on at the source.

use std::path::PathBuf;
use std::time::Duration;

use anyhow::{bail, Result};
use vmm::api::{self, Command};

/// How long a quick command (status, pause, resume) may take.
const QUICK: Duration = Duration::from_secs(30);

/// Arguments of `vm`.
#[derive(Debug, clap::Args)]
pub struct Args {
    #[command(subcommand)]
    verb: Verb,
}

/// The socket of the VMM.
#[derive(Debug, clap::Args)]
struct Socket {
    /// The VMM's control socket (`vhdtool boot --api-socket PATH`).
    #[arg(long, value_name = "PATH")]
    api_socket: PathBuf,
}

#[derive(Debug, clap::Subcommand)]
enum Verb {
    /// Show the VM's state (running, paused, shutting-down), vCPUs, memory and disks.
    Status {
        #[command(flatten)]
        socket: Socket,
        /// Print the status as JSON.
        #[arg(long)]
        json: bool,
    },
    /// Stop the vCPUs (the guest's clock stands still for it).
    Pause {
        #[command(flatten)]
        socket: Socket,
    },
    /// Run a paused VM again.
    Resume {
        #[command(flatten)]
        socket: Socket,
    },
    /// Press the ACPI power button; stop the VM if it has not powered off after --timeout.
    Shutdown {
        #[command(flatten)]
        socket: Socket,
        /// Seconds the guest gets to power off.
        #[arg(long, default_value_t = 30)]
        timeout: u64,
    },
    /// Save the VM to DIR (absent or empty) and continue its disks on new differencing
    /// children; restore with `vhdtool boot --restore DIR`.
    Checkpoint {
        #[command(flatten)]
        socket: Socket,
        /// Stop the VM once saved.
        #[arg(long)]
        stop: bool,
        /// Folder of the checkpoint.
        dir: PathBuf,
    },
    /// Move the running VM live to `vhdtool boot --incoming tcp:HOST:PORT` (disks on shared
    /// storage); the guest runs on here if the migration fails.
    Migrate {
        #[command(flatten)]
        socket: Socket,
        /// Longest guest pause to aim for: pre-copy passes go on until the rest fits.
        #[arg(long, default_value_t = 50)]
        downtime_ms: u64,
        /// Send at most this many MiB per second.
        #[arg(long, value_name = "MIB")]
        max_bandwidth: Option<u64>,
        /// The target, tcp:HOST:PORT.
        to: String,
    },
    /// Hot-add IMAGE as a new disk (VMs booted with --transport pci); prints its id.
    DiskAdd {
        #[command(flatten)]
        socket: Socket,
        /// The image; `IMAGE,read-only` attaches it read-only.
        #[arg(value_name = "IMAGE[,read-only]")]
        image: String,
    },
    /// Hot-remove a disk (its id from `vm status`, or its image): the guest is asked to eject
    /// it; returns once it has and the disk is drained, flushed and closed.
    DiskRemove {
        #[command(flatten)]
        socket: Socket,
        /// Seconds the guest gets to eject it; then the removal is refused and the disk stays.
        #[arg(long, default_value_t = 30)]
        timeout: u64,
        /// Disk id or image path.
        #[arg(value_name = "ID|IMAGE")]
        disk: String,
    },
}

/// `IMAGE[,read-only]` as `(absolute path, read-only)`.
fn disk_spec(spec: &str) -> Result<(PathBuf, bool)> {
    let (path, read_only) = match spec.rsplit_once(',') {
        Some((p, "read-only")) => (p, true),
        Some((_, opt)) if !std::path::Path::new(spec).exists() => {
            bail!("{spec}: unknown disk option {opt:?} (only read-only)")
        }
        _ => (spec, false),
    };
    if path.is_empty() {
        bail!("{spec}: no image");
    }
    Ok((std::path::absolute(path)?, read_only))
}

/// Runs `vm`.
pub fn run(args: &Args) -> Result<u8> {
    let (socket, command, wait) = match &args.verb {
        Verb::Status { socket, .. } => (socket, Command::Status, QUICK),
        Verb::Pause { socket } => (socket, Command::Pause, QUICK),
        Verb::Resume { socket } => (socket, Command::Resume, QUICK),
        Verb::Shutdown { socket, timeout } => (
            socket,
            Command::Shutdown {
                timeout_s: *timeout,
            },
            // The guest's time, then the flush and the VMM's stop.
            Duration::from_secs(*timeout) + Duration::from_secs(120),
        ),
        Verb::Checkpoint { socket, stop, dir } => (
            socket,
            Command::Checkpoint {
                // The VMM may run elsewhere: give it an absolute path.
                dir: std::path::absolute(dir)?,
                stop: *stop,
            },
            Duration::from_secs(3600),
        ),
        Verb::Migrate {
            socket,
            downtime_ms,
            max_bandwidth,
            to,
        } => (
            socket,
            Command::Migrate {
                to: to.clone(),
                downtime_ms: *downtime_ms,
                max_bandwidth_mib: *max_bandwidth,
            },
            Duration::from_secs(3600),
        ),
        Verb::DiskAdd { socket, image } => {
            let (path, read_only) = disk_spec(image)?;
            (socket, Command::DiskAdd { path, read_only }, QUICK)
        }
        Verb::DiskRemove {
            socket,
            timeout,
            disk,
        } => {
            // An image path goes as an absolute one (the VMM may run elsewhere); an id as is.
            let p = std::path::Path::new(disk);
            let disk = if p.exists() {
                std::path::absolute(p)?.display().to_string()
            } else {
                disk.clone()
            };
            (
                socket,
                Command::DiskRemove {
                    disk,
                    timeout_s: *timeout,
                },
                // The guest's time, then the drain and flush.
                Duration::from_secs(*timeout) + Duration::from_secs(120),
            )
        }
    };
    let reply = api::call(&socket.api_socket, command, wait)?;
    if !reply.ok {
        bail!(
            "{}: {}",
            socket.api_socket.display(),
            reply.error.unwrap_or_else(|| "failed".into())
        );
    }
    match (&args.verb, reply.status) {
        (Verb::Status { json: true, .. }, Some(s)) => println!("{}", serde_json::to_string(&s)?),
        (Verb::Status { .. }, Some(s)) => {
            println!("state: {}", s.state);
            println!("pid: {}", s.pid);
            println!("cpus: {}", s.cpus);
            println!("memory: {} MiB", s.memory >> 20);
            for d in &s.disks {
                let ro = if d.read_only { " (read-only)" } else { "" };
                let slot = d
                    .pci_slot
                    .map_or(String::new(), |s| format!(" [PCI slot {s}]"));
                println!("{}: {}{ro}{slot}", d.id, d.path.display());
            }
        }
        (Verb::Status { .. }, None) => bail!("the VMM sent no status"),
        _ => println!("{}", reply.detail.unwrap_or_default()),
    }
    Ok(0)
}
