//! One [`Disk`] API over raw files, VHD and VHDX images, including differencing chains.
//!
//! ```text
//!        vhdtool / fuse-mount / vmm
//!                   │  Box<dyn Disk> / Chain
//!                   ▼
//!   ┌──────────────── Chain (chain.rs) ─────────────────┐
//!   │ layer 0  top image      read-write (or read-only) │  writes land here only
//!   │ layer 1  parent         always read-only          │
//!   │ ...      (≤ 64 layers, no file twice)             │
//!   └──────────────────────┬────────────────────────────┘
//!                          │  Box<dyn Layer> (layer/mod.rs: one trait, one open point)
//!        layer/raw.rs      │    layer/image.rs: VHD/VHDX through the shared format
//!        (pread/pwrite,    │    interface; the format crate resolves ranges, this crate
//!        holes)            │    moves the payload (pread/pwrite on the image file)
//!                          ▼
//!                    files on the host (or a remote store, for remote layer kinds)
//! ```
//!
//! Open with [`open`]: the format is found by content ([`probe`]), never by extension, and the
//! parents of a differencing VHD are found through its stored locators, checked by UUID and
//! opened read-only.
//!
//! Invariants:
//! - Reads and writes take any byte offset and length inside the disk; a range reaching past
//!   the end is an [`Error::OutOfRange`], never a short read or a grown file.
//! - A read-only open never opens a file with write access; a parent is never written.
//! - Format crates are trusted for metadata, not for bounds: their range answers are checked to
//!   tile the request before a byte moves.
//! - `discard` leaves the range reading as zeros, whatever the format could free.
//! - No panics on bad input: malformed images, missing parents and loops are typed errors.
//! - Every file of a chain is locked while open ([`image_io::lock`], QEMU-compatible): the top
//!   for writing unless read-only, parents for reading. Another writer is refused with
//!   [`Error::InUse`] at once, never waited for.

#![warn(missing_docs)]

mod aligned;
mod chain;
#[cfg(feature = "conformance")]
pub mod conformance;
mod disk;
pub mod engine;
mod error;
pub mod layer;
pub mod partitions;
pub mod probe;
mod shared;
pub mod virtio_blk;

pub use aligned::AlignedBuf;
pub use chain::{open, Chain, PlanStats};
pub use disk::{Disk, Format, LayerInfo, MapExtent, OpenOptions, Subformat};
pub use error::{Error, ErrorKind, Result, MAX_CHAIN_DEPTH};
pub use layer::{open as open_layer, Image, Layer, RawFile, SECTOR};
pub use shared::{SharedDisk, SharedDiskError, SharedOptions, SharedResult};
