//! Errors of the file system readers: each names the file system, the structure and the byte
//! offset (volume-relative) it concerns.

/// Stable classification of an [`Error`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ErrorKind {
    /// Reading the volume failed.
    Io,
    /// A structure is inconsistent, or points outside the volume.
    Corrupt,
    /// A structure failed its checksum.
    Checksum,
    /// A valid file system using something these readers do not handle.
    Unsupported,
    /// The allocation map may be stale (journal to recover, dirty, hibernated): refused unless
    /// forced.
    Unsafe,
}

/// An error reading a file system's allocation structures.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// The volume could not be read.
    #[error("{fs}: cannot read {structure} at byte {offset}: {source}")]
    Read {
        /// File system.
        fs: &'static str,
        /// What was read.
        structure: String,
        /// Volume-relative byte offset.
        offset: u64,
        /// The reader's error.
        source: std::io::Error,
    },
    /// A structure lies (partly) outside the volume.
    #[error(
        "{fs}: {structure} at byte {offset} ({len} bytes) lies outside the volume ({volume} bytes)"
    )]
    OutsideVolume {
        /// File system.
        fs: &'static str,
        /// The structure.
        structure: String,
        /// Volume-relative byte offset.
        offset: u64,
        /// Its length.
        len: u64,
        /// Size of the volume.
        volume: u64,
    },
    /// A structure holds impossible values.
    #[error("{fs}: {structure} at byte {offset}: {what}")]
    Corrupt {
        /// File system.
        fs: &'static str,
        /// The structure.
        structure: String,
        /// Volume-relative byte offset.
        offset: u64,
        /// What is wrong.
        what: String,
    },
    /// A structure failed its checksum.
    #[error("{fs}: {structure} at byte {offset} fails its checksum (stored {stored:#x}, computed {computed:#x})")]
    Checksum {
        /// File system.
        fs: &'static str,
        /// The structure.
        structure: String,
        /// Volume-relative byte offset.
        offset: u64,
        /// Stored checksum.
        stored: u32,
        /// Computed checksum.
        computed: u32,
    },
    /// A feature these readers do not handle.
    #[error("{fs}: {what} is not supported")]
    Unsupported {
        /// File system.
        fs: &'static str,
        /// The feature.
        what: String,
    },
    /// The allocation map may be stale.
    #[error("{fs}: {reason}")]
    Unsafe {
        /// File system.
        fs: &'static str,
        /// Why.
        reason: String,
    },
}

impl Error {
    /// The stable kind.
    pub fn kind(&self) -> ErrorKind {
        match self {
            Error::Read { .. } => ErrorKind::Io,
            Error::OutsideVolume { .. } | Error::Corrupt { .. } => ErrorKind::Corrupt,
            Error::Checksum { .. } => ErrorKind::Checksum,
            Error::Unsupported { .. } => ErrorKind::Unsupported,
            Error::Unsafe { .. } => ErrorKind::Unsafe,
        }
    }

    pub(crate) fn corrupt(
        fs: &'static str,
        structure: impl Into<String>,
        offset: u64,
        what: impl Into<String>,
    ) -> Error {
        Error::Corrupt {
            fs,
            structure: structure.into(),
            offset,
            what: what.into(),
        }
    }

    pub(crate) fn unsupported(fs: &'static str, what: impl Into<String>) -> Error {
        Error::Unsupported {
            fs,
            what: what.into(),
        }
    }
}

/// Result of this crate.
pub type Result<T, E = Error> = std::result::Result<T, E>;
