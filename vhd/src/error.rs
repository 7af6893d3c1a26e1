//! Typed errors. Every error that comes from bytes on disk names the file, the structure and the
//! byte offset where the problem was found.

use std::io;
use std::path::PathBuf;

/// Result alias for this crate.
pub type Result<T, E = Error> = std::result::Result<T, E>;

/// Stable classification of an [`Error`]: the kind every format crate shares.
pub use image_io::format::ErrorKind;

/// Errors of the `vhd` crate.
#[derive(Debug, thiserror::Error)]
pub enum Error {
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
    /// The file does not look like a VHD.
    #[error("{}: not a VHD image: {reason}", path.display())]
    NotVhd {
        /// File that was probed.
        path: PathBuf,
        /// Why it was rejected.
        reason: String,
    },
    /// A checksum did not match.
    #[error(
        "{}: {structure} at offset {offset}: checksum mismatch (stored {stored:#010x}, computed {computed:#010x})",
        path.display()
    )]
    Checksum {
        /// File holding the structure.
        path: PathBuf,
        /// Structure name (`"footer"`, `"dynamic header"`).
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
        /// File holding the structure.
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
    InUse(#[from] image_io::InUse),
}

impl Error {
    /// The stable kind of this error.
    pub fn kind(&self) -> ErrorKind {
        match self {
            Error::Io { .. } => ErrorKind::Io,
            Error::NotVhd { .. } => ErrorKind::NotThisFormat,
            Error::Checksum { .. } => ErrorKind::Checksum,
            Error::Corrupt { .. } => ErrorKind::Corrupt,
            Error::Unsupported { .. } => ErrorKind::Unsupported,
            Error::InvalidArgument(_) => ErrorKind::InvalidArgument,
            Error::ReadOnly { .. } => ErrorKind::ReadOnly,
            Error::InUse(_) => ErrorKind::InUse,
        }
    }
}

impl Error {
    /// The error of a failed locked open of the image at `path` ([`image_io::lock::open`]).
    pub fn from_open(path: &std::path::Path, e: image_io::lock::OpenError) -> Error {
        match e {
            image_io::lock::OpenError::InUse(e) => Error::InUse(e),
            image_io::lock::OpenError::Io(source) => Error::Io {
                path: path.into(),
                op: "open",
                offset: 0,
                source,
            },
        }
    }
}
