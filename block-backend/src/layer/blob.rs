//! Azure page-blob layer: a fixed VHD in a page blob (a SAS URL, `https://…?sv=…&sig=…`) as
//! a read-only layer, the top of a read-only chain or the parent of a local child.
//!
//! ```text
//!   open: HEAD (length) ─> Get Blob of the last 512 bytes: a fixed VHD footer ─> size, identity
//!         Get Page Ranges (1 GiB windows) ─> written ranges, kept
//!   resolve_read(off, len) ─> [Data(off) over written ranges | Zero elsewhere]  (no request)
//!   read_payload(buf, at) ─> 1 MiB chunks from the cache, missing ones by one ranged Get Blob
//!                            each (a 4 KiB read fetches its whole chunk: read-ahead)
//! ```
//!
//! Invariants:
//! - Read-only: no request that changes the blob is ever sent; opening for writing fails.
//! - The cache holds at most [`CACHE_CHUNKS`] chunks of [`CHUNK`] bytes (oldest dropped first).
//! - The blob is checked to be a fixed VHD before use; the footer is never part of the disk.
//! - Errors name the blob without its SAS (the client's errors carry the URL redacted); the
//!   layer's path is that redacted URL, so messages above never show the signature either.

use std::collections::VecDeque;
use std::fs::File;
use std::path::{Path, PathBuf};

use azure_blob::{BlobError, BlobUrl, PageBlob, PageRanges};
use image_io::OpenMode;
use uuid::Uuid;

use super::{Extent, Layer, Source};
use crate::disk::LayerInfo;
use crate::{Error, Format, Result};

/// Unit of fetching and caching.
pub const CHUNK: u64 = 1 << 20;
/// Most chunks kept (64 MiB).
pub const CACHE_CHUNKS: usize = 64;
/// Span of one Get Page Ranges request.
const RANGE_WINDOW: u64 = 1 << 30;

fn remote(e: BlobError) -> Error {
    Error::Remote(std::io::Error::other(e))
}

fn refused(blob: &BlobUrl, what: String) -> Error {
    Error::Remote(std::io::Error::new(
        std::io::ErrorKind::InvalidData,
        format!("{blob}: {what}"),
    ))
}

/// Whether `location` is a blob URL (`http://` or `https://`).
pub fn is_blob_url(location: &Path) -> bool {
    location.to_str().is_some_and(BlobUrl::looks_like_url)
}

/// `location` as it may be shown to a user: a blob URL without its query string (the SAS),
/// anything else unchanged.
pub fn shown_location(location: &Path) -> PathBuf {
    match location.to_str() {
        Some(s) if BlobUrl::looks_like_url(s) => match BlobUrl::parse(s) {
            Ok(url) => PathBuf::from(url.to_string()),
            Err(_) => PathBuf::from(s.split('?').next().unwrap_or_default()),
        },
        _ => location.to_path_buf(),
    }
}

/// A fixed VHD in an Azure page blob, read-only.
pub struct BlobLayer {
    shown: PathBuf,
    blob: PageBlob,
    size: u64,
    identity: Uuid,
    written: PageRanges,
    cache: VecDeque<(u64, Vec<u8>)>,
}

impl std::fmt::Debug for BlobLayer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "BlobLayer({})", self.shown.display())
    }
}

/// The virtual size and identity of the fixed VHD in `blob`, after checking its footer.
pub fn fixed_vhd_in_blob(blob: &PageBlob) -> Result<(u64, Uuid)> {
    let url = blob.url();
    let props = blob
        .properties()
        .map_err(remote)?
        .ok_or_else(|| refused(url, "the blob does not exist".into()))?;
    let footer_size = vhd::footer::FOOTER_SIZE as u64;
    if props.blob_type != "PageBlob" || props.length < footer_size || props.length % 512 != 0 {
        return Err(refused(
            url,
            format!(
                "not a VHD page blob ({} of {} bytes; a VHD blob is a page blob of whole \
                 512-byte pages)",
                props.blob_type, props.length
            ),
        ));
    }
    let at = props.length - footer_size;
    let mut raw = [0u8; vhd::footer::FOOTER_SIZE];
    blob.read(at, &mut raw).map_err(remote)?;
    let f = vhd::Footer::parse(&raw);
    let problems = f.problems();
    if !problems.is_empty() {
        return Err(refused(
            url,
            format!("not a VHD: footer at offset {at}: {}", problems.join("; ")),
        ));
    }
    if f.disk_type() != Some(vhd::DiskType::Fixed) {
        return Err(refused(
            url,
            format!(
                "footer at offset {at}: a {:?} VHD; Azure blobs hold fixed VHDs only",
                f.disk_type()
            ),
        ));
    }
    if f.current_size > at || f.current_size % 512 != 0 {
        return Err(refused(
            url,
            format!(
                "footer at offset {at}: virtual size {} does not fit the {at} bytes before it",
                f.current_size
            ),
        ));
    }
    Ok((f.current_size, f.uuid))
}

impl BlobLayer {
    /// Opens the blob `url` names; only read-only opens are possible.
    pub fn open(url: &str, mode: OpenMode) -> Result<BlobLayer> {
        let url = BlobUrl::parse(url).map_err(remote)?;
        if mode.is_writable() {
            return Err(Error::Remote(std::io::Error::new(
                std::io::ErrorKind::PermissionDenied,
                format!(
                    "{url}: a blob is opened read-only (make a local differencing child to write)"
                ),
            )));
        }
        let shown = PathBuf::from(url.to_string());
        let blob = PageBlob::new(url);
        let (size, identity) = fixed_vhd_in_blob(&blob)?;
        let mut written = PageRanges::default();
        let mut w = 0;
        while w < size {
            let end = (w + RANGE_WINDOW).min(size);
            written.extend(blob.page_ranges(w, end).map_err(remote)?.0);
            w = end;
        }
        Ok(BlobLayer {
            shown,
            blob,
            size,
            identity,
            written,
            cache: VecDeque::new(),
        })
    }

    /// Chunk `index` (the cache's, or fetched into it).
    fn chunk(&mut self, index: u64) -> Result<&[u8]> {
        if let Some(i) = self.cache.iter().position(|(k, _)| *k == index) {
            return Ok(&self.cache[i].1);
        }
        let start = index * CHUNK;
        let len = CHUNK.min(self.size - start) as usize;
        let mut buf = vec![0u8; len];
        self.blob.read(start, &mut buf).map_err(remote)?;
        if self.cache.len() >= CACHE_CHUNKS {
            self.cache.pop_front();
        }
        self.cache.push_back((index, buf));
        Ok(&self.cache.back().expect("just pushed").1)
    }
}

impl Layer for BlobLayer {
    fn path(&self) -> &Path {
        &self.shown
    }

    fn size(&self) -> u64 {
        self.size
    }

    fn format(&self) -> Format {
        Format::Vhd
    }

    fn info(&self) -> LayerInfo {
        LayerInfo {
            path: self.shown.clone(),
            format: Format::Vhd,
            subformat: None,
            virtual_size: self.size,
            block_size: None,
            creator: None,
            uuid: Some(self.identity),
            parent_uuid: None,
            parent_name: None,
        }
    }

    fn sector_size(&self) -> u64 {
        512
    }

    fn is_writable(&self) -> bool {
        false
    }

    fn identity(&self) -> Option<Uuid> {
        Some(self.identity)
    }

    fn file(&self) -> Option<&File> {
        None
    }

    fn resolve_read(&mut self, offset: u64, len: u64) -> Result<Vec<Extent>> {
        let end = offset + len;
        let mut out = Vec::new();
        let mut pos = offset;
        let first = self.written.0.partition_point(|&(_, e)| e <= offset);
        for &(s, e) in &self.written.0[first..] {
            if pos >= end || s >= end {
                break;
            }
            if s > pos {
                out.push(Extent {
                    offset: pos,
                    len: s - pos,
                    source: Source::Zero,
                });
                pos = s;
            }
            let stop = e.min(end);
            out.push(Extent {
                offset: pos,
                len: stop - pos,
                source: Source::Data(pos),
            });
            pos = stop;
        }
        if pos < end {
            out.push(Extent {
                offset: pos,
                len: end - pos,
                source: Source::Zero,
            });
        }
        Ok(out)
    }

    fn read_payload(&mut self, buf: &mut [u8], at: u64) -> Result<()> {
        let mut done = 0;
        while done < buf.len() {
            let pos = at + done as u64;
            let chunk = self.chunk(pos / CHUNK)?;
            let from = (pos % CHUNK) as usize;
            let n = (chunk.len() - from).min(buf.len() - done);
            if n == 0 {
                return Err(Error::Inconsistent {
                    path: self.shown.clone(),
                    what: format!("read at {pos} past the disk's end"),
                });
            }
            buf[done..done + n].copy_from_slice(&chunk[from..from + n]);
            done += n;
        }
        Ok(())
    }

    fn discard(&mut self, offset: u64, len: u64) -> Result<Vec<(u64, u64)>> {
        Err(Error::Inconsistent {
            path: self.shown.clone(),
            what: format!("discard of {len} bytes at {offset} on a read-only blob"),
        })
    }

    fn flush(&mut self) -> Result<()> {
        Ok(())
    }
}
