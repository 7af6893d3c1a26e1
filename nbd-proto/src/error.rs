//! Typed errors of the NBD client. Every error names the server (its URI), so a message says
//! which peer did what.

use std::io;

use crate::uri::UriError;

/// Result alias for the client.
pub type Result<T, E = ClientError> = std::result::Result<T, E>;

/// Errors of the NBD client.
#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    /// The URI does not parse.
    #[error(transparent)]
    Uri(#[from] UriError),
    /// Connecting, reading or writing failed, or the server stayed silent too long.
    #[error("{peer}: {op}: {source}")]
    Io {
        /// The server.
        peer: String,
        /// What was being done.
        op: &'static str,
        /// The OS error (`TimedOut` for a silent server).
        source: io::Error,
    },
    /// The server broke the protocol (bad magic, a reply too long or of the wrong kind, a
    /// reply not covering what was asked); the connection cannot be trusted any more.
    #[error("{peer}: protocol error: {what}")]
    Protocol {
        /// The server.
        peer: String,
        /// What it sent.
        what: String,
    },
    /// The server refused an option of the handshake.
    #[error("{peer}: server refused {option}: {reason}")]
    Refused {
        /// The server.
        peer: String,
        /// The option.
        option: &'static str,
        /// Its reply type and message.
        reason: String,
    },
    /// The server answered a command with an error.
    #[error(
        "{peer}: {op} of {len} bytes at offset {offset} failed on the server: error {errno}{}",
        message_suffix(message)
    )]
    Command {
        /// The server.
        peer: String,
        /// The command.
        op: &'static str,
        /// Its offset.
        offset: u64,
        /// Its length.
        len: u64,
        /// The NBD error value (an errno number).
        errno: u32,
        /// The server's message, if any.
        message: String,
    },
    /// TLS could not be set up or failed.
    #[error("{peer}: TLS: {what}")]
    Tls {
        /// The server.
        peer: String,
        /// What failed.
        what: String,
    },
}

fn message_suffix(m: &str) -> String {
    if m.is_empty() {
        String::new()
    } else {
        format!(" ({m})")
    }
}

impl ClientError {
    /// The closest I/O error kind, for callers that speak `io::Error`.
    pub fn io_kind(&self) -> io::ErrorKind {
        match self {
            ClientError::Io { source, .. } => source.kind(),
            ClientError::Uri(_) => io::ErrorKind::InvalidInput,
            ClientError::Protocol { .. } => io::ErrorKind::InvalidData,
            ClientError::Refused { .. } | ClientError::Tls { .. } => {
                io::ErrorKind::ConnectionRefused
            }
            ClientError::Command { errno, .. } => match *errno {
                1 => io::ErrorKind::PermissionDenied,
                22 | 75 => io::ErrorKind::InvalidInput,
                28 => io::ErrorKind::StorageFull,
                95 => io::ErrorKind::Unsupported,
                _ => io::ErrorKind::Other,
            },
        }
    }
}

impl From<ClientError> for io::Error {
    fn from(e: ClientError) -> io::Error {
        io::Error::new(e.io_kind(), e)
    }
}
