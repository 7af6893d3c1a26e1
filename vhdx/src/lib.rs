//! # vhdx — MS-VHDX images
//!
//! Reads, creates and writes fixed, dynamic and differencing VHDX images with 512- or
//! 4096-byte logical sectors; replays the metadata log (on disk, or in memory for read-only
//! opens); checks and repairs. Like the `vhd` crate it only resolves where bytes live and keeps
//! metadata right; the block backend moves payload.
//!
//! ```text
//! | ident | header x2 | region table x2 | log | metadata | BAT | payload blocks / sector bitmaps |
//!   VhdxImage::resolve_read(off, len)  -> [Data{file_offset} | Zero | Parent]
//!   VhdxImage::resolve_write(off, len) -> plan; payload writes; commit_write(plan); flush()
//! ```
//!
//! ## Facts this crate relies on
//! - Little-endian; GUIDs mixed-endian; CRC-32C over each structure with its checksum zeroed.
//! - Current header: the valid one with the larger sequence number; equal numbers are accepted
//!   (Disk2vhd). Updates go to the other slot with sequence + 1, then a sync.
//! - BAT: chunk ratio = 2^23 × logical sector size / block size; payload block `i` is entry
//!   `i + i / chunk_ratio`; the sector-bitmap entry of chunk `k` is `k × (chunk_ratio + 1) +
//!   chunk_ratio`. Offsets are in MiB; entries without data carry offset 0.
//! - Sector bitmaps: 1 MiB per chunk, one bit per logical sector, least significant bit first.
//! - Differencing children link to the parent's DataWriteGuid (`parent_linkage`).
//!
//! ## In-place edits
//! [`compact`] (ZERO/NOT_PRESENT blocks, close holes, truncate after closing the log),
//! [`resize`] (BAT region grown in place or rebuilt, size changed through the log), [`merge`]
//! (child kept linked through `parent_linkage2`) and [`rebase`] (parent locator rewritten in one
//! log entry) change metadata only through the log; their module docs give the order.
//!
//! ## Invariants
//! - Every offset, length and count from the file is checked before use; allocations are
//!   bounded by the file's size; bad input is a typed [`Error`] naming file, structure, offset.
//! - Read-only opens never write, even with a pending log. Parents are never opened writable.
//! - Metadata changes reach their homes only through the log (durable mode), after the payload
//!   they expose is synced.
#![forbid(unsafe_code)]
#![warn(missing_docs)]

pub mod check;
pub mod compact;
pub mod create;
mod edit;
mod error;
mod flush;
pub mod format;
pub mod image;
mod interface;
pub mod log;
pub mod merge;
pub mod meta;
pub mod rebase;
mod replay;
pub mod resize;

pub use check::{check, check_with, repair, CheckReport, Finding, Unused};
pub use compact::{CompactMode, CompactReport};
pub use create::{CreateOptions, ParentInfo};
pub use error::{Error, ErrorKind, Result};
pub use image::{Durability, OpenMode, ReadExtent, ReadSource, VhdxImage, WriteExtent, WritePlan};
pub use meta::{DiskParams, ParentLink};
