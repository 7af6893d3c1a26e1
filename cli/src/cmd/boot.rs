//! `vhdtool boot --kernel BZIMAGE [--initrd FILE] [--cmdline STR] [--memory SIZE] [--cpus N]
//! [--disk IMAGE[,read-only]]… [--transport pci|mmio] [--api-socket PATH]` | `vhdtool boot --restore DIR
//! [--api-socket PATH]` | `vhdtool boot --incoming tcp:HOST:PORT [--api-socket PATH]`: boot a Linux kernel in a minimal KVM VM (crate `vmm`) with the
//! images as virtio-blk disks (`/dev/vda`, `/dev/vdb`, … in order).
//!
//! The serial console is stdin/stdout (with a terminal, ^A x stops the VM). Exit status 0 when
//! the guest reboots or powers off, is stopped through the API (`vhdtool vm shutdown`) or
//! migrated away (`vhdtool vm migrate`); 1
//! with a message naming the cause when it panics, triple
//! faults, hits a KVM error, or the VMM fails. Disks are flushed before exit either way.

use std::path::PathBuf;

use anyhow::{bail, Result};

use crate::size::parse_size;

/// Arguments of `boot`.
#[derive(Debug, clap::Args)]
pub struct Args {
    /// Linux kernel (bzImage, boot protocol 2.14 or later).
    #[arg(long, required_unless_present_any = ["restore", "incoming"])]
    pub kernel: Option<PathBuf>,
    /// Initial ramdisk.
    #[arg(long)]
    pub initrd: Option<PathBuf>,
    /// Kernel command line, after the VMM's own
    /// "console=ttyS0 reboot=k panic=-1 pci=off 8250.nr_uarts=1".
    #[arg(long, default_value = "")]
    pub cmdline: String,
    /// Guest memory (binary suffixes: 512M, 2G).
    #[arg(long, default_value = "512M", value_parser = parse_size)]
    pub memory: u64,
    /// Number of vCPUs.
    #[arg(long, default_value_t = 1)]
    pub cpus: u8,
    /// A disk image (raw, VHD, VHDX, differencing), `IMAGE` or `IMAGE,read-only`; repeatable.
    #[arg(long = "disk", value_name = "IMAGE[,read-only]", value_parser = parse_disk)]
    pub disks: Vec<vmm::DiskConfig>,
    /// How the guest reaches the disks: `pci` (virtio-pci functions with MSI-X on a PCI host
    /// bridge; the guest needs `virtio_pci`; disks can be hot-added, and checkpoints and
    /// migrations carry them) or `mmio` (virtio-mmio devices in the ACPI tables, the guest
    /// needs `virtio_mmio`; for kernels built without PCI). pci is the default: it needs
    /// fewer exits per request (no interrupt-status read and acknowledge) and measured faster
    /// in benches/vmm.sh.
    #[arg(long, default_value = "pci", value_name = "pci|mmio",
          conflicts_with_all = ["restore", "incoming"])]
    pub transport: vmm::Transport,
    /// Serve the control API on this unix socket (`vhdtool vm … --api-socket PATH`).
    #[arg(long, value_name = "PATH")]
    pub api_socket: Option<PathBuf>,
    /// Continue the VM saved by `vhdtool vm checkpoint DIR` (no reboot) on new differencing
    /// children of its frozen disk layers; memory, vCPUs and disks come from DIR.
    #[arg(long, value_name = "DIR", conflicts_with_all = ["kernel", "initrd", "disks", "cmdline"])]
    pub restore: Option<PathBuf>,
    /// Receive a live migration (`vhdtool vm migrate … tcp:HOST:PORT` on the source) on
    /// `tcp:HOST:PORT` (port 0: any, printed on stderr) and run the VM; memory, vCPUs and
    /// disks (the same paths: shared storage) come in the stream.
    #[arg(long, value_name = "tcp:HOST:PORT",
          conflicts_with_all = ["kernel", "initrd", "disks", "cmdline", "restore"])]
    pub incoming: Option<String>,
}

/// `IMAGE[,read-only]` (also `,ro`).
fn parse_disk(s: &str) -> std::result::Result<vmm::DiskConfig, String> {
    let (path, read_only) = match s.rsplit_once(',') {
        Some((p, "read-only" | "ro" | "readonly")) => (p, true),
        Some((p, "")) => (p, false),
        Some((_, opt)) if !opt.contains('/') => {
            return Err(format!(
                "unknown disk option {opt:?} (only \"read-only\"); a path with a comma \
                 can be given as ./PATH,"
            ))
        }
        _ => (s, false),
    };
    if path.is_empty() {
        return Err("empty disk path".into());
    }
    Ok(vmm::DiskConfig {
        path: PathBuf::from(path),
        read_only,
    })
}

/// Runs `boot`.
pub fn run(args: &Args) -> Result<u8> {
    if let Some(w) = vmm::software_hypervisor_warning() {
        eprintln!("vhdtool: warning: {w}");
    }
    let opts = vmm::RunOptions {
        api_socket: args.api_socket.clone(),
    };
    let result = match (&args.restore, &args.incoming, &args.kernel) {
        (Some(dir), _, _) => vmm::restore(dir, &opts),
        (None, Some(uri), _) => vmm::incoming(uri, &opts),
        (None, None, Some(kernel)) => vmm::run(&boot_config(args, kernel), &opts),
        (None, None, None) => bail!("--kernel, --restore or --incoming is needed"),
    };
    match result {
        Ok(exit) => {
            eprintln!("vhdtool: {exit}; disks flushed");
            Ok(0)
        }
        Err(e) => bail!(e),
    }
}

fn boot_config(args: &Args, kernel: &std::path::Path) -> vmm::VmConfig {
    vmm::VmConfig {
        kernel: kernel.to_path_buf(),
        initrd: args.initrd.clone(),
        cmdline: args.cmdline.clone(),
        memory: args.memory,
        cpus: args.cpus,
        disks: args.disks.clone(),
        transport: args.transport,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn disks_take_a_read_only_suffix() {
        let d = parse_disk("a.vhdx").unwrap();
        assert_eq!((d.path, d.read_only), (PathBuf::from("a.vhdx"), false));
        let d = parse_disk("/x/b.vhd,read-only").unwrap();
        assert_eq!((d.path, d.read_only), (PathBuf::from("/x/b.vhd"), true));
        let d = parse_disk("c.raw,ro").unwrap();
        assert!(d.read_only);
        let d = parse_disk("./odd,name,").unwrap();
        assert_eq!((d.path, d.read_only), (PathBuf::from("./odd,name"), false));
        assert!(parse_disk("d.vhd,rw").is_err());
        assert!(parse_disk(",read-only").is_err());
    }

    #[test]
    fn transport_is_pci_unless_mmio_is_asked_for() {
        use clap::Parser;
        #[derive(clap::Parser)]
        struct Cli {
            #[command(flatten)]
            boot: Args,
        }
        let parse = |extra: &[&str]| {
            Cli::try_parse_from(["boot", "--kernel", "k"].iter().chain(extra))
                .map(|c| c.boot.transport)
        };
        assert_eq!(parse(&[]).unwrap(), vmm::Transport::Pci);
        assert_eq!(parse(&["--transport", "pci"]).unwrap(), vmm::Transport::Pci);
        assert_eq!(
            parse(&["--transport", "mmio"]).unwrap(),
            vmm::Transport::Mmio
        );
        let e = parse(&["--transport", "isa"]).err().unwrap().to_string();
        assert!(e.contains("mmio or pci"), "{e}");
        assert!(parse(&["--transport", "pci", "--restore", "d"]).is_err());
    }
}
