//! `vhdtool serve [--read-only] [--name NAME] (--unix PATH | --listen HOST:PORT)
//! [--tls-cert FILE --tls-key FILE [--tls-ca FILE]] [--max-connections N] IMAGE`: one image
//! over NBD (crate `nbd`), in the foreground.
//!
//! ```text
//!   main thread: block SIGINT/SIGTERM ─> open chain ─> bind ─> spawn signal thread ─> accept loop
//!   signal thread: sigwait ─> close the disk (flush) ─> remove the socket ─> exit 0
//! ```
//!
//! Invariants: the signals are blocked before any thread starts, so only the signal thread
//! receives them; the disk is flushed and closed before the process exits on SIGINT/SIGTERM
//! (exit 1 if that flush fails); a Unix socket path is only ever replaced when it is a socket
//! nobody listens on (left by a killed server).

use std::net::{TcpListener, ToSocketAddrs};
use std::os::unix::fs::FileTypeExt;
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use anyhow::{bail, Context, Result};
use block_backend::{Disk, Format, OpenOptions, SharedDisk, SharedOptions};

/// Extra read-only handles of a read-only export, so connections read in parallel.
const READERS: usize = 3;

/// Arguments of `serve`.
#[derive(Debug, clap::Args)]
pub struct Args {
    /// Export read-only: the image is opened read-only (never written) and clients' writes fail
    /// with EPERM.
    #[arg(long)]
    pub read_only: bool,
    /// Export name (clients asking for the default export "" get it too).
    #[arg(long, default_value = "")]
    pub name: String,
    /// Listen on this Unix socket (created; a stale socket left by a killed server is replaced).
    #[arg(long, value_name = "PATH", required_unless_present = "listen")]
    pub unix: Option<PathBuf>,
    /// Listen on TCP HOST:PORT (e.g. 127.0.0.1:10809).
    #[arg(long, value_name = "HOST:PORT", conflicts_with = "unix")]
    pub listen: Option<String>,
    /// Server certificate chain (PEM). With it, TLS is required: clients must STARTTLS before
    /// anything about the export is told.
    #[arg(long, value_name = "FILE", requires = "tls_key")]
    pub tls_cert: Option<PathBuf>,
    /// Private key of the certificate (PEM).
    #[arg(long, value_name = "FILE", requires = "tls_cert")]
    pub tls_key: Option<PathBuf>,
    /// CA certificates (PEM): clients must present a certificate signed by one of them.
    #[arg(long, value_name = "FILE", requires = "tls_cert")]
    pub tls_ca: Option<PathBuf>,
    /// Most clients served at once; more are closed on connect.
    #[arg(long, value_name = "N", default_value_t = 16,
          value_parser = clap::value_parser!(u16).range(1..=1024))]
    pub max_connections: u16,
    /// The image (raw, VHD, VHDX; differencing chains are followed, parents read-only).
    pub image: PathBuf,
}

/// Runs `serve`.
pub fn run(a: &Args) -> Result<u8> {
    let signals = block_signals()?;
    let opts = if a.read_only {
        OpenOptions::read_only()
    } else {
        OpenOptions::read_write()
    };
    let chain = block_backend::open(&a.image, opts)
        .with_context(|| format!("open {}", a.image.display()))?;
    // Like Hyper-V, no unmap on VHD: a dynamic VHD can only drop whole blocks from its BAT,
    // which leaks their space inside the file; trims are not offered and zeros are written.
    let discard = chain.layers().first().map(|l| l.format) != Some(Format::Vhd);
    // What a child stacked on this export over NBD checks its parent by.
    let description = nbd::ImageIdentity {
        format: chain.top().format().to_string(),
        identity: chain.top().identity(),
        sector: chain.logical_sector_size(),
        image: a.image.display().to_string(),
    }
    .describe();
    let mut readers: Vec<Box<dyn Disk>> = Vec::new();
    if a.read_only {
        for _ in 0..READERS {
            readers.push(Box::new(block_backend::open(&a.image, opts)?));
        }
    }
    let disk = SharedDisk::with_options(Box::new(chain), SharedOptions { discard, readers });
    let tls = match (&a.tls_cert, &a.tls_key) {
        (Some(cert), Some(key)) => Some(nbd::TlsConfig::load(cert, key, a.tls_ca.as_deref())?),
        _ => None,
    };
    let server = nbd::Server::new(nbd::ServerConfig {
        export: nbd::Export {
            name: a.name.clone(),
            description: Some(description),
            disk: disk.clone(),
        },
        tls,
        max_connections: a.max_connections.into(),
        handshake_timeout: Duration::from_secs(30),
    });
    if let Some(path) = &a.unix {
        let listener = bind_unix(path)?;
        spawn_signal_thread(signals, disk, Some(path.clone()))?;
        server.serve_unix(listener)?;
    } else if let Some(addr) = &a.listen {
        let addrs: Vec<_> = addr
            .to_socket_addrs()
            .with_context(|| format!("resolve {addr}"))?
            .collect();
        let listener =
            TcpListener::bind(&addrs[..]).with_context(|| format!("listen on {addr}"))?;
        spawn_signal_thread(signals, disk, None)?;
        server.serve_tcp(listener)?;
    }
    Ok(0)
}

/// Binds `path`, replacing a stale socket (one nobody accepts on) but nothing else.
fn bind_unix(path: &Path) -> Result<UnixListener> {
    if let Ok(m) = std::fs::symlink_metadata(path) {
        if !m.file_type().is_socket() {
            bail!("{}: exists and is not a socket", path.display());
        }
        if UnixStream::connect(path).is_ok() {
            bail!("{}: a server is already listening there", path.display());
        }
        std::fs::remove_file(path).with_context(|| format!("remove stale {}", path.display()))?;
    }
    UnixListener::bind(path).with_context(|| format!("listen on {}", path.display()))
}

/// SIGINT and SIGTERM, blocked in this thread (and so in every thread started after).
fn block_signals() -> Result<libc::sigset_t> {
    // SAFETY: sigset_t is plain data; sigemptyset initialises it before use.
    let mut set: libc::sigset_t = unsafe { std::mem::zeroed() };
    // SAFETY: `set` is a valid sigset_t owned by this frame; the signal numbers are valid.
    let rc = unsafe {
        libc::sigemptyset(&mut set);
        libc::sigaddset(&mut set, libc::SIGINT);
        libc::sigaddset(&mut set, libc::SIGTERM);
        libc::pthread_sigmask(libc::SIG_BLOCK, &set, std::ptr::null_mut())
    };
    if rc != 0 {
        bail!(
            "block SIGINT/SIGTERM: {}",
            std::io::Error::from_raw_os_error(rc)
        );
    }
    Ok(set)
}

/// Waits for SIGINT/SIGTERM, then flushes and closes the disk, removes the socket and exits
/// (0, or 1 if the flush failed).
fn spawn_signal_thread(
    set: libc::sigset_t,
    disk: Arc<SharedDisk>,
    socket: Option<PathBuf>,
) -> Result<()> {
    std::thread::Builder::new()
        .name("signals".into())
        .spawn(move || {
            let mut sig = 0;
            // SAFETY: `set` is an initialised sigset_t; `sig` is a valid out pointer.
            while unsafe { libc::sigwait(&set, &mut sig) } != 0 {}
            let code = match disk.close() {
                Ok(()) => 0,
                Err(e) => {
                    eprintln!("vhdtool: flush on exit: {e}");
                    1
                }
            };
            if let Some(p) = socket {
                let _ = std::fs::remove_file(p);
            }
            std::process::exit(code);
        })
        .context("start the signal thread")?;
    Ok(())
}
