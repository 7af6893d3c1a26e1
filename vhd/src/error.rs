//! Typed errors. Every error that comes from bytes on disk names the file, the structure and the
//! byte offset where the problem was found.

/// Result alias for this crate.
pub type Result<T, E = Error> = std::result::Result<T, E>;

/// Stable classification of an [`Error`]: the kind every format crate shares.
pub use image_io::format::ErrorKind;

/// Errors of the `vhd` crate: the format crates' shared error ([`image_io::ImageError`]).
pub use image_io::ImageError as Error;
