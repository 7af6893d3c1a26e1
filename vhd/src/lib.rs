//! # vhd — Microsoft VHD images (Virtual Hard Disk Image Format Specification, 2006)
//!
//! Reads, creates and writes fixed, dynamic and differencing VHD files, and checks and repairs
//! their structures. This crate answers "where do the bytes of virtual range X live?" and keeps
//! the metadata correct; moving payload bytes is the caller's job (see `block-backend`).
//!
//! ```text
//!  fixed:        | data ........................................ | footer |
//!  dynamic/diff: | footer copy | header | BAT | locators | bitmap+block | ... | footer |
//!                    VhdImage::resolve_read(off, len) -> [Data{file_offset} | Zero | Parent]
//!                    VhdImage::resolve_write(off, len) -> plan; payload; commit_write(plan)
//! ```
//!
//! ## Facts this crate relies on
//! - All integers are big-endian; checksums are the one's complement of the byte sum with the
//!   checksum field zeroed; timestamps count seconds from 2000-01-01 UTC.
//! - Virtual size: Virtual PC (`vpc `), Virtual Server and qemu's default (`qemu`) mean the CHS
//!   product; everyone else (Hyper-V `win `, Disk2vhd, XenServer `tap\0`, VirtualBox `vbox`)
//!   means the current-size field; a maximal geometry always means the current size.
//! - Images vhdkit creates carry creator `vhdk`, the exact size in the current-size field, and
//!   the spec geometry when it is exact, else 65535/16/255: qemu-img 7.2 and 10, libvhdi and
//!   Hyper-V then all read exactly the requested size (qemu honours a maximal geometry as
//!   "use current size"; libvhdi and Hyper-V always use it).
//! - Sector bitmaps are honoured for dynamic and differencing images (MSB first).
//! - Differencing parents are found by W2ru (relative to the child), W2ku, the deprecated
//!   ANSI locators, then the parent unicode name and its base name beside the child; the
//!   parent's footer UUID must match. Windows' zero parent timestamp is accepted.
//!
//! ## In-place edits
//! [`compact`] (release blocks, close holes, truncate), [`resize`] (grow, shrink over zeros),
//! [`merge`] (commit a child into its parent) and [`rebase`] (new parent locators) each keep
//! a valid image with the same content at every synced step; their module docs give the order.
//!
//! ## Invariants
//! - Untrusted input: every offset, length and count read from a file is bounds-checked
//!   against the file; allocations are bounded by the file's size; bad input is a typed
//!   [`Error`] naming the file, structure and offset, never a panic.
//! - Read-only opens never write. New images appear atomically (temporary name + link).
//! - Allocation order: footer at the new end (synced), payload, then at flush bitmaps and
//!   BAT after a payload sync. See [`image`].
#![forbid(unsafe_code)]
#![warn(missing_docs)]

pub mod bitmap;
pub mod check;
pub mod compact;
pub mod create;
pub mod dynamic_header;
mod error;
pub mod footer;
pub mod geometry;
pub mod image;
mod interface;
pub mod layout;
pub mod locator;
pub mod merge;
pub mod rebase;
pub mod resize;

pub use check::{check, check_file, check_with, repair, CheckReport, Finding};
pub use compact::{CompactMode, CompactReport};
pub use create::{CreateOptions, ParentInfo, VhdType};
pub use error::{Error, ErrorKind, Result};
pub use footer::{DiskType, Footer};
pub use geometry::Geometry;
pub use image::{
    Durability, OpenMode, ParentLink, ReadExtent, ReadSource, VhdImage, WriteExtent, WritePlan,
};
