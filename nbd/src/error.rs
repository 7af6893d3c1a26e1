//! Typed errors of the NBD server. Every error of a connection names its peer (`unix socket`
//! or `127.0.0.1:50122`), so a log line says which client broke what.

use std::io;

use crate::protocol::ParseError;

/// Result alias for this crate.
pub type Result<T, E = Error> = std::result::Result<T, E>;

/// Errors of the NBD server.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// Reading from or writing to a client failed (including it going away mid-message).
    #[error("{peer}: {op}: {source}")]
    Io {
        /// The client.
        peer: String,
        /// What was being done.
        op: &'static str,
        /// The OS error.
        source: io::Error,
    },
    /// A client message could not be parsed; the connection is closed.
    #[error("{peer}: bad {what}: {source}")]
    Parse {
        /// The client.
        peer: String,
        /// Which message.
        what: &'static str,
        /// What was wrong.
        source: ParseError,
    },
    /// The client broke a rule the protocol has no error reply for; the connection is closed.
    #[error("{peer}: {what}")]
    Protocol {
        /// The client.
        peer: String,
        /// What it did.
        what: String,
    },
    /// The TLS handshake or session failed.
    #[error("{peer}: TLS: {source}")]
    Tls {
        /// The client.
        peer: String,
        /// The TLS error.
        source: io::Error,
    },
    /// The TLS configuration (certificates, key) could not be loaded.
    #[error("TLS configuration: {0}")]
    TlsConfig(String),
    /// The listening socket could not be set up or accept failed.
    #[error("{addr}: {op}: {source}")]
    Listen {
        /// The address or socket path.
        addr: String,
        /// What was being done.
        op: &'static str,
        /// The OS error.
        source: io::Error,
    },
}

impl Error {
    /// True when the client simply went away (end of stream, reset, broken pipe): routine, not
    /// worth more than a debug log.
    pub fn is_disconnect(&self) -> bool {
        match self {
            Error::Io { source, .. } => matches!(
                source.kind(),
                io::ErrorKind::UnexpectedEof
                    | io::ErrorKind::ConnectionReset
                    | io::ErrorKind::BrokenPipe
                    | io::ErrorKind::ConnectionAborted
            ),
            _ => false,
        }
    }
}
