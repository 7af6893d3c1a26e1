//! The error every format crate returns: one vocabulary for VHD and VHDX, so that the block
//! backend, the tools and the interface ([`crate::format::FormatImage`]) handle one type.
//!
//! Invariant: every error that comes from bytes on disk names the file, the structure and the
//! byte offset where the problem was found.

use std::io;
use std::path::{Path, PathBuf};

use crate::format::{ErrorKind, FormatKind};
use crate::lock::{InUse, OpenError};

/// Errors of the format crates.
#[derive(Debug, thiserror::Error)]
pub enum ImageError {
    /// An I/O operation on the image file failed.
    #[error("{}: {op} at offset {offset}: {source}", path.display())]
    Io {
        /// File being accessed.
        path: PathBuf,
        /// What was being done (`"read footer"`, `"write BAT"`, ...).
        op: &'static str,
        /// Byte offset in the file.
        offset: u64,
        /// The OS error.
        source: io::Error,
    },
    /// The file is not an image of the format that was asked to open it.
    #[error("{}: not a {format} image: {reason}", path.display())]
    NotThisFormat {
        /// File that was probed.
        path: PathBuf,
        /// The format it is not.
        format: FormatKind,
        /// Why it was rejected.
        reason: String,
    },
    /// A checksum (VHD's one's complement sum, VHDX's CRC-32C) did not match.
    #[error(
        "{}: {structure} at offset {offset}: checksum mismatch (stored {stored:#010x}, computed {computed:#010x})",
        path.display()
    )]
    Checksum {
        /// File holding the structure.
        path: PathBuf,
        /// Structure name (`"footer"`, `"dynamic header"`, `"region table"`).
        structure: &'static str,
        /// Byte offset of the structure in the file.
        offset: u64,
        /// Checksum stored on disk.
        stored: u32,
        /// Checksum computed over the bytes.
        computed: u32,
    },
    /// A structure is inconsistent or points outside the file.
    #[error("{}: {structure} at offset {offset}: {reason}", path.display())]
    Corrupt {
        /// File holding the structure.
        path: PathBuf,
        /// Structure name.
        structure: &'static str,
        /// Byte offset of the structure (or of the bad field) in the file.
        offset: u64,
        /// What is wrong.
        reason: String,
    },
    /// A feature of a valid image that is not handled.
    #[error("{}: unsupported: {what}", path.display())]
    Unsupported {
        /// The image file.
        path: PathBuf,
        /// What is not supported.
        what: String,
    },
    /// The caller asked for something impossible.
    #[error("invalid argument: {0}")]
    InvalidArgument(String),
    /// Write on a read-only image.
    #[error("{}: image is open read-only", path.display())]
    ReadOnly {
        /// The image file.
        path: PathBuf,
    },
    /// Another process has the image open in a way this open cannot share.
    #[error(transparent)]
    InUse(#[from] InUse),
}

impl ImageError {
    /// The stable kind of this error.
    pub fn kind(&self) -> ErrorKind {
        match self {
            ImageError::Io { .. } => ErrorKind::Io,
            ImageError::NotThisFormat { .. } => ErrorKind::NotThisFormat,
            ImageError::Checksum { .. } => ErrorKind::Checksum,
            ImageError::Corrupt { .. } => ErrorKind::Corrupt,
            ImageError::Unsupported { .. } => ErrorKind::Unsupported,
            ImageError::InvalidArgument(_) => ErrorKind::InvalidArgument,
            ImageError::ReadOnly { .. } => ErrorKind::ReadOnly,
            ImageError::InUse(_) => ErrorKind::InUse,
        }
    }

    /// The error of a failed locked open of the image at `path` ([`crate::lock::open`]).
    pub fn from_open(path: &Path, e: OpenError) -> ImageError {
        match e {
            OpenError::InUse(e) => ImageError::InUse(e),
            OpenError::Io(source) => ImageError::Io {
                path: path.into(),
                op: "open",
                offset: 0,
                source,
            },
        }
    }
}
