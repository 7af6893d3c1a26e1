//! Typed errors of the block backend.
//!
//! Every error names the file it concerns and, where it makes sense, the operation and the byte
//! offset. Errors of the format crates are wrapped unchanged (their messages already carry the
//! file, the structure and the offset), so nothing is lost on the way up to the CLI.

use image_io::format::{ErrorKind as FormatErrorKind, FormatError};
use std::fmt;
use std::io;
use std::path::{Path, PathBuf};

/// Result alias for this crate.
pub type Result<T, E = Error> = std::result::Result<T, E>;

/// The deepest differencing chain [`crate::open`] follows before giving up with
/// [`Error::ChainTooDeep`].
pub const MAX_CHAIN_DEPTH: usize = 64;

/// Stable classification of an [`Error`], for callers that branch on the kind of failure.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ErrorKind {
    /// A file operation failed.
    Io,
    /// The format crate rejected the image (see [`Error::Format`] for the inner kind).
    Format,
    /// A differencing image's parent could not be found.
    ParentNotFound,
    /// A parent was found but is not the image the child was made from.
    ParentMismatch,
    /// The differencing chain loops back on itself.
    ChainCycle,
    /// The differencing chain is longer than [`MAX_CHAIN_DEPTH`].
    ChainTooDeep,
    /// A request reaches past the end of the disk.
    OutOfRange,
    /// A write was attempted on a disk opened read-only.
    ReadOnly,
    /// A valid file using something this build does not handle.
    Unsupported,
    /// Another process has an image of the chain open in a way this open cannot share.
    InUse,
}

/// Errors of the block backend.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// An I/O operation on a file failed.
    #[error("{}: {op} at offset {offset}: {source}", path.display())]
    Io {
        /// File being accessed.
        path: PathBuf,
        /// What was being done (`"read payload"`, `"open"`, ...).
        op: &'static str,
        /// Byte offset in the file.
        offset: u64,
        /// The OS error.
        source: io::Error,
    },
    /// An error of a format crate, message kept as is ([`FormatError::kind`] tells what).
    #[error(transparent)]
    Format(#[from] FormatError),
    /// Another process has the file open in a way this open cannot share (image locking).
    #[error(transparent)]
    InUse(#[from] image_io::InUse),
    /// None of the candidate paths of a differencing image's parent exists.
    #[error(
        "{}: parent image '{name}' not found; tried: {}",
        child.display(),
        PathList(tried)
    )]
    ParentNotFound {
        /// The differencing image.
        child: PathBuf,
        /// The parent name stored in the child.
        name: String,
        /// Every path that was tried, in order.
        tried: Vec<PathBuf>,
    },
    /// The parent found is not the image the child was made from.
    #[error(
        "{}: parent {} has UUID {found}, but the child expects {expected}",
        child.display(),
        parent.display()
    )]
    ParentMismatch {
        /// The differencing image.
        child: PathBuf,
        /// The parent that was opened.
        parent: PathBuf,
        /// The parent UUID stored in the child.
        expected: uuid::Uuid,
        /// The UUID of the file that was found.
        found: uuid::Uuid,
    },
    /// The parent found is of another format than the child (a VHD's parent is a VHD, a
    /// VHDX's a VHDX).
    #[error(
        "{}: parent {} is a {format} file, not a {expected}",
        child.display(),
        parent.display()
    )]
    ParentFormat {
        /// The differencing image.
        child: PathBuf,
        /// The file that was found.
        parent: PathBuf,
        /// What the parent was probed as.
        format: crate::Format,
        /// The format the child needs its parent in.
        expected: crate::Format,
    },
    /// Following parents leads back to an image already in the chain.
    #[error(
        "{}: differencing chain loops: parent {} is already in the chain",
        child.display(),
        parent.display()
    )]
    ChainCycle {
        /// The image whose parent closes the loop.
        child: PathBuf,
        /// The parent that is already in the chain.
        parent: PathBuf,
    },
    /// The chain is deeper than [`MAX_CHAIN_DEPTH`].
    #[error(
        "{}: differencing chain deeper than {limit} images",
        path.display()
    )]
    ChainTooDeep {
        /// The top image of the chain.
        path: PathBuf,
        /// The bound that was hit.
        limit: usize,
    },
    /// A request reaches past the end of the disk.
    #[error(
        "{}: {op} of {len} bytes at offset {offset} is past the end of the disk ({size} bytes)",
        path.display()
    )]
    OutOfRange {
        /// The disk (top image).
        path: PathBuf,
        /// `"read"`, `"write"`, `"discard"` or `"map"`.
        op: &'static str,
        /// Start of the request.
        offset: u64,
        /// Length of the request.
        len: u64,
        /// Size of the disk.
        size: u64,
    },
    /// A write was attempted on a disk opened read-only.
    #[error("{}: disk is open read-only, cannot {op}", path.display())]
    ReadOnly {
        /// The disk (top image).
        path: PathBuf,
        /// The refused operation.
        op: &'static str,
    },
    /// A format layer answered a query with extents that do not tile the requested range (a bug
    /// in the format crate; reported instead of trusted).
    #[error("{}: {what}", path.display())]
    Inconsistent {
        /// The image whose layer answered.
        path: PathBuf,
        /// What was wrong with the answer.
        what: String,
    },
    /// A remote layer's store (an NBD server, ...) failed, refused or misbehaved; the message
    /// names the peer, the operation and the offset.
    #[error(transparent)]
    Remote(std::io::Error),
    /// A valid file using something this build does not handle.
    #[error("{}: {what}", path.display())]
    Unsupported {
        /// The file.
        path: PathBuf,
        /// What is not supported.
        what: String,
    },
}

impl Error {
    /// The error of a failed locked open of `path` ([`image_io::lock::open`]).
    pub fn from_open(path: &std::path::Path, e: image_io::lock::OpenError) -> Error {
        match e {
            image_io::lock::OpenError::InUse(e) => Error::InUse(e),
            image_io::lock::OpenError::Io(e) => Error::io(path, "open", 0, e),
        }
    }

    /// The stable kind of this error.
    pub fn kind(&self) -> ErrorKind {
        match self {
            Error::Io { .. } | Error::Remote(_) => ErrorKind::Io,
            Error::InUse(_) => ErrorKind::InUse,
            Error::Format(e) => match e.kind() {
                FormatErrorKind::InUse => ErrorKind::InUse,
                FormatErrorKind::Io => ErrorKind::Io,
                FormatErrorKind::ReadOnly => ErrorKind::ReadOnly,
                FormatErrorKind::Unsupported => ErrorKind::Unsupported,
                _ => ErrorKind::Format,
            },
            Error::Inconsistent { .. } => ErrorKind::Format,
            Error::ParentNotFound { .. } => ErrorKind::ParentNotFound,
            Error::ParentMismatch { .. } | Error::ParentFormat { .. } => ErrorKind::ParentMismatch,
            Error::ChainCycle { .. } => ErrorKind::ChainCycle,
            Error::ChainTooDeep { .. } => ErrorKind::ChainTooDeep,
            Error::OutOfRange { .. } => ErrorKind::OutOfRange,
            Error::ReadOnly { .. } => ErrorKind::ReadOnly,
            Error::Unsupported { .. } => ErrorKind::Unsupported,
        }
    }

    /// True for errors about the linkage of a differencing chain (parent missing, wrong parent,
    /// loop, too deep) as opposed to errors about the image itself.
    pub fn is_chain_error(&self) -> bool {
        matches!(
            self.kind(),
            ErrorKind::ParentNotFound
                | ErrorKind::ParentMismatch
                | ErrorKind::ChainCycle
                | ErrorKind::ChainTooDeep
        )
    }

    /// Builds an [`Error::Io`].
    pub(crate) fn io(path: &Path, op: &'static str, offset: u64, source: io::Error) -> Self {
        Error::Io {
            path: path.to_path_buf(),
            op,
            offset,
            source,
        }
    }
}

/// Displays a list of paths as `a, b, c` (or `(none)`).
struct PathList<'a>(&'a [PathBuf]);

impl fmt::Display for PathList<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.0.is_empty() {
            return f.write_str("(no candidate paths stored)");
        }
        for (i, p) in self.0.iter().enumerate() {
            if i > 0 {
                f.write_str(", ")?;
            }
            write!(f, "{}", p.display())?;
        }
        Ok(())
    }
}

impl From<vhd::Error> for Error {
    fn from(e: vhd::Error) -> Error {
        Error::Format(e.into())
    }
}

impl From<vhdx::Error> for Error {
    fn from(e: vhdx::Error) -> Error {
        Error::Format(e.into())
    }
}
