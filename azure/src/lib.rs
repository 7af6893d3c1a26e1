//! Azure page blobs for vhdkit: the few REST calls `vhdtool upload` and `download` need,
//! authorised by a SAS token in the blob URL (no account key ever reaches this crate).
//!
//! ```text
//!   "https://acct.blob.core.windows.net/c/disk.vhd?sv=..&sig=.."
//!        │ BlobUrl::parse (http(s), container + blob path, a SAS `sig`)
//!        ▼
//!   PageBlob ── properties (HEAD) ── create (Put Blob, PageBlob, x-ms-blob-content-length)
//!            ── put_pages (Put Page ≤ 4 MiB, Content-MD5)  ── page_ranges (Get Page Ranges)
//!            ── read (Get Blob, x-ms-range, MD5 checked)   ── set_metadata
//!        │ every call: x-ms-version, x-ms-date; retried with backoff on 408/429/5xx and
//!        ▼ transport errors; bounded timeouts, bounded response bodies
//!   BlobError: names the blob (SAS redacted), the operation, the status and service error code
//! ```
//!
//! Invariants:
//! - The SAS signature never appears in an error or log line: URLs are shown without query.
//! - Every answer is checked before use: page ranges aligned to 512 bytes, inside the blob and
//!   bounded in number; ranged reads return exactly the bytes asked for with a matching MD5.
//! - A request is retried only when repeating it cannot change the outcome (every call here is
//!   idempotent: Put Page writes the same bytes at the same place).

mod client;
mod error;
mod ranges;
mod sas;

pub use client::{PageBlob, Properties, RetryPolicy, MAX_PAGE_WRITE, PAGE};
pub use error::{BlobError, ErrorKind};
pub use ranges::{covered, PageRanges};
pub use sas::BlobUrl;

/// Largest page blob the service accepts (8 TiB).
pub const MAX_PAGE_BLOB: u64 = 8 << 40;
