//! The server: one export, a listening socket, one thread per connection.
//!
//! ```text
//!   Server::serve(listener) ── accept ──> connection thread (≤ max_connections at once)
//!                                            │ greeting, client flags      (handshake timeout)
//!                                            │ Negotiation::run ── STARTTLS ─> tls::accept, run again
//!                                            ▼
//!                                         Transmission::run ──> Export.disk: Arc<SharedDisk>
//!                                                                (shared by all connections)
//! ```
//!
//! Invariants:
//! - Every connection talks to the same [`SharedDisk`]: a write completed on one connection is
//!   seen by reads on every other, and a flush on any connection makes all of them durable, so
//!   `NBD_FLAG_CAN_MULTI_CONN` is advertised.
//! - A connection's failure (bad bytes, a vanished client, a TLS error) ends that connection
//!   only: it is logged with its peer and the accept loop goes on.
//! - At most `max_connections` connections are served at once; one more is closed at once.
//!   A client has [`ServerConfig::handshake_timeout`] for each read of the handshake, so idle
//!   connections cannot hold the slots forever.

use std::io::{Read, Write};
use std::net::{TcpListener, TcpStream};
use std::os::unix::net::{UnixListener, UnixStream};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use block_backend::SharedDisk;

use crate::error::{Error, Result};
use crate::io::Framed;
use crate::negotiate::{Negotiation, Outcome, Tls};
use crate::protocol::{self as p, tflag};
use crate::transmission::Transmission;

/// The one export a server offers.
#[derive(Debug)]
pub struct Export {
    /// Its name (clients asking for `""`, the default export, get it too).
    pub name: String,
    /// Shown by `NBD_OPT_LIST` and `NBD_INFO_DESCRIPTION`.
    pub description: Option<String>,
    /// The disk.
    pub disk: Arc<SharedDisk>,
}

impl Export {
    /// Size in bytes.
    pub fn size(&self) -> u64 {
        self.disk.size()
    }

    /// True if a client asking for `name` gets this export.
    pub fn matches(&self, name: &str) -> bool {
        name.is_empty() || name == self.name
    }

    /// Preferred request size (advertised with `NBD_INFO_BLOCK_SIZE`).
    pub fn preferred_block(&self) -> u32 {
        4096
    }

    /// Transmission flags.
    pub fn flags(&self, structured: bool) -> u16 {
        let mut f = tflag::HAS_FLAGS
            | tflag::SEND_FLUSH
            | tflag::SEND_FUA
            | tflag::CAN_MULTI_CONN
            | tflag::SEND_CACHE;
        if self.disk.is_read_only() {
            f |= tflag::READ_ONLY;
        } else {
            f |= tflag::SEND_WRITE_ZEROES | tflag::SEND_FAST_ZERO;
            if self.disk.supports_discard() {
                f |= tflag::SEND_TRIM;
            }
        }
        if structured {
            f |= tflag::SEND_DF;
        }
        f
    }
}

/// A connection's byte stream: a socket (or an in-memory stream in tests and the fuzzer).
pub trait Stream: Read + Write + Send {
    /// Sets (or clears) the timeout of each read.
    fn set_read_timeout(&self, t: Option<Duration>) -> std::io::Result<()>;
}

impl Stream for UnixStream {
    fn set_read_timeout(&self, t: Option<Duration>) -> std::io::Result<()> {
        UnixStream::set_read_timeout(self, t)
    }
}

impl Stream for TcpStream {
    fn set_read_timeout(&self, t: Option<Duration>) -> std::io::Result<()> {
        TcpStream::set_read_timeout(self, t)
    }
}

/// What a server serves and how.
#[derive(Debug)]
pub struct ServerConfig {
    /// The export.
    pub export: Export,
    /// TLS settings; when set, TLS is required before anything else.
    pub tls: Option<crate::tls::TlsConfig>,
    /// Most connections served at once.
    pub max_connections: usize,
    /// How long each read of the handshake may wait.
    pub handshake_timeout: Duration,
}

/// A running server's shared state.
#[derive(Debug, Clone)]
pub struct Server {
    cfg: Arc<ServerConfig>,
    active: Arc<AtomicUsize>,
    panicked: Arc<AtomicUsize>,
}

impl Server {
    /// A server for `cfg`.
    pub fn new(cfg: ServerConfig) -> Server {
        Server {
            cfg: Arc::new(cfg),
            active: Arc::new(AtomicUsize::new(0)),
            panicked: Arc::new(AtomicUsize::new(0)),
        }
    }

    /// The export.
    pub fn export(&self) -> &Export {
        &self.cfg.export
    }

    /// Connections being served now.
    pub fn active_connections(&self) -> usize {
        self.active.load(Ordering::Relaxed)
    }

    /// Connections that ended in a panic (a bug: logged, the connection closed, the others
    /// served on). Tests assert it stays 0.
    pub fn panicked_connections(&self) -> usize {
        self.panicked.load(Ordering::Relaxed)
    }

    /// Accepts connections on a Unix socket for ever.
    pub fn serve_unix(&self, listener: UnixListener) -> Result<()> {
        loop {
            match listener.accept() {
                Ok((s, _)) => self.spawn(s, "unix socket".to_string()),
                Err(e) => self.accept_failed("unix socket", e)?,
            }
        }
    }

    /// Accepts connections on a TCP socket for ever.
    pub fn serve_tcp(&self, listener: TcpListener) -> Result<()> {
        loop {
            match listener.accept() {
                Ok((s, addr)) => {
                    let _ = s.set_nodelay(true);
                    self.spawn(s, addr.to_string());
                }
                Err(e) => self.accept_failed("tcp socket", e)?,
            }
        }
    }

    fn accept_failed(&self, addr: &str, e: std::io::Error) -> Result<()> {
        // Out of descriptors or a connection reset before accept: wait a little, go on.
        if matches!(
            e.raw_os_error(),
            Some(libc::EMFILE | libc::ENFILE | libc::ENOBUFS | libc::ENOMEM)
        ) || e.kind() == std::io::ErrorKind::ConnectionAborted
            || e.kind() == std::io::ErrorKind::Interrupted
        {
            tracing::warn!("{addr}: accept: {e}");
            std::thread::sleep(Duration::from_millis(50));
            return Ok(());
        }
        Err(Error::Listen {
            addr: addr.to_string(),
            op: "accept",
            source: e,
        })
    }

    fn spawn<S: Stream + 'static>(&self, stream: S, peer: String) {
        if self.active.fetch_add(1, Ordering::SeqCst) >= self.cfg.max_connections {
            self.active.fetch_sub(1, Ordering::SeqCst);
            tracing::warn!(
                "{peer}: refused: already {} connections",
                self.cfg.max_connections
            );
            return;
        }
        let server = self.clone();
        let spawned = std::thread::Builder::new()
            .name("nbd-conn".into())
            .spawn(move || {
                // A bug in one connection must not take the others down: the disk's lock
                // survives a panic (SharedDisk takes poisoned locks over).
                let r = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
                    server.serve_connection(stream, &peer)
                }));
                server.active.fetch_sub(1, Ordering::SeqCst);
                match r {
                    Ok(Ok(())) => tracing::debug!("{peer}: disconnected"),
                    Ok(Err(e)) if e.is_disconnect() => tracing::debug!("{e}"),
                    Ok(Err(e)) => tracing::warn!("{e}"),
                    Err(_) => {
                        server.panicked.fetch_add(1, Ordering::SeqCst);
                        tracing::error!("{peer}: connection panicked (a bug); closed");
                    }
                }
            });
        if let Err(e) = spawned {
            self.active.fetch_sub(1, Ordering::SeqCst);
            tracing::warn!("cannot start a connection thread: {e}");
        }
    }

    /// Serves one connection on the calling thread until it ends.
    pub fn serve_connection<S: Stream>(&self, stream: S, peer: &str) -> Result<()> {
        let io_err = |op| {
            move |source| Error::Io {
                peer: peer.to_string(),
                op,
                source,
            }
        };
        stream
            .set_read_timeout(Some(self.cfg.handshake_timeout))
            .map_err(io_err("set timeout"))?;
        let mut io = Framed::new(stream, &[]);
        io.send(&p::greeting()).map_err(io_err("write greeting"))?;
        io.flush().map_err(io_err("write greeting"))?;
        let mut f = [0u8; 4];
        io.read_exact(&mut f).map_err(io_err("read client flags"))?;
        let client_flags = u32::from_be_bytes(f);
        if client_flags & !(p::FLAG_C_FIXED_NEWSTYLE | p::FLAG_C_NO_ZEROES) != 0 {
            return Err(Error::Protocol {
                peer: peer.to_string(),
                what: format!("unknown client flags {client_flags:#x}"),
            });
        }
        let export = &self.cfg.export;
        let Some(tls) = &self.cfg.tls else {
            let mut n = Negotiation::new(export, peer, Tls::Off, client_flags);
            return match n.run(&mut io)? {
                Outcome::Transmit(neg) => {
                    io.get_ref()
                        .set_read_timeout(None)
                        .map_err(io_err("set timeout"))?;
                    Transmission::new(io, export, peer, neg).run()
                }
                Outcome::Closed | Outcome::StartTls => Ok(()),
            };
        };
        let mut n = Negotiation::new(export, peer, Tls::Required, client_flags);
        match n.run(&mut io)? {
            Outcome::StartTls => {}
            Outcome::Closed | Outcome::Transmit(_) => return Ok(()),
        }
        let (stream, leftover) = io.into_parts().map_err(io_err("write"))?;
        let tls_stream = tls.accept(stream, &leftover, peer)?;
        let mut io = Framed::new(tls_stream, &[]);
        let mut n = Negotiation::new(export, peer, Tls::Active, client_flags);
        match n.run(&mut io)? {
            Outcome::Transmit(neg) => {
                io.get_ref()
                    .set_read_timeout(None)
                    .map_err(io_err("set timeout"))?;
                Transmission::new(io, export, peer, neg).run()
            }
            Outcome::Closed | Outcome::StartTls => Ok(()),
        }
    }
}
