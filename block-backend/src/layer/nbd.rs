//! NBD layer: an export on an NBD server (`nbd://`, `nbds://`, `nbd+unix://`) as one layer of
//! a chain: the top of a chain (read, written through), or the read-only parent of a local
//! differencing child.
//!
//! ```text
//!   Chain ── resolve_read(off, len) ─> [Data(off)]        (one request, no status query)
//!         ── map(off, len) ──────────> BLOCK_STATUS base:allocation: ZERO -> Zero, else Data
//!         ── read_payload / write ──> NBD_CMD_READ / NBD_CMD_WRITE over nbd_proto::Client
//!         ── write_zeroes / discard ─> NBD_CMD_WRITE_ZEROES when the export offers it
//! ```
//!
//! Invariants:
//! - No local file: engines read and write through the layer ([`Layer::file`] is `None`).
//! - A layer opened read-only never sends a write, trim or write-zeroes command; one opened
//!   for writing refuses to open a read-only export.
//! - The identity and format of the image behind the export come only from a vhdkit server's
//!   description ([`ImageIdentity`]); another server's export is a raw disk without identity,
//!   which no VHD/VHDX child accepts as its parent.
//! - Every failure names the URI (the client's errors carry it) and is an I/O error; a silent
//!   server times out, a misbehaving one is refused ([`nbd_proto::client`]).

use std::fs::File;
use std::path::{Path, PathBuf};

use image_io::OpenMode;
use nbd_proto::protocol::{tflag, STATE_ZERO};
use nbd_proto::{Client, ClientError, ImageIdentity, Uri};
use uuid::Uuid;

use super::{Extent, Layer, Source};
use crate::disk::LayerInfo;
use crate::{Error, Format, Result};

/// Most runs one `map` call collects from the server; past that the rest is reported as data
/// (a server answering in tiny runs cannot make a map take forever).
const MAX_MAP_RUNS: usize = 1 << 20;

/// An NBD export.
#[derive(Debug)]
pub struct NbdLayer {
    location: PathBuf,
    client: Client,
    writable: bool,
    image: Option<ImageIdentity>,
}

fn remote(e: ClientError) -> Error {
    Error::Remote(e.into())
}

impl NbdLayer {
    /// Connects to the export `uri` names, for `mode`.
    pub fn open(uri: &str, mode: OpenMode) -> Result<NbdLayer> {
        let parsed = Uri::parse(uri).map_err(|e| remote(e.into()))?;
        let client = Client::connect(&parsed).map_err(remote)?;
        let writable = mode.is_writable();
        if writable && client.is_read_only() {
            return Err(Error::Remote(std::io::Error::new(
                std::io::ErrorKind::PermissionDenied,
                format!("{uri}: the export is read-only, it cannot be opened for writing"),
            )));
        }
        let image = client
            .info()
            .description
            .as_deref()
            .and_then(ImageIdentity::parse);
        Ok(NbdLayer {
            location: PathBuf::from(uri),
            client,
            writable,
            image,
        })
    }
}

impl Layer for NbdLayer {
    fn path(&self) -> &Path {
        &self.location
    }

    fn size(&self) -> u64 {
        self.client.info().size
    }

    fn format(&self) -> Format {
        match self.image.as_ref().map(|i| i.format.as_str()) {
            Some("vhd") => Format::Vhd,
            Some("vhdx") => Format::Vhdx,
            _ => Format::Raw,
        }
    }

    fn info(&self) -> LayerInfo {
        LayerInfo {
            path: self.location.clone(),
            format: self.format(),
            subformat: None,
            virtual_size: self.size(),
            block_size: None,
            creator: None,
            uuid: self.identity(),
            parent_uuid: None,
            parent_name: None,
        }
    }

    fn sector_size(&self) -> u64 {
        u64::from(self.client.info().block.0)
    }

    fn physical_sector_size(&self) -> u32 {
        self.image.as_ref().map_or(0, |i| i.sector)
    }

    fn is_writable(&self) -> bool {
        self.writable
    }

    fn identity(&self) -> Option<Uuid> {
        self.image.as_ref().and_then(|i| i.identity)
    }

    fn file(&self) -> Option<&File> {
        None
    }

    fn resolve_read(&mut self, offset: u64, len: u64) -> Result<Vec<Extent>> {
        Ok(vec![Extent {
            offset,
            len,
            source: Source::Data(offset),
        }])
    }

    fn map(&mut self, offset: u64, len: u64) -> Result<Vec<Extent>> {
        let end = offset + len;
        let mut out = Vec::new();
        let mut pos = offset;
        while pos < end && out.len() < MAX_MAP_RUNS {
            let Some(runs) = self.client.block_status(pos, end - pos).map_err(remote)? else {
                break;
            };
            for (l, flags) in runs {
                let l = l.min(end - pos);
                let source = if flags & STATE_ZERO != 0 {
                    Source::Zero
                } else {
                    Source::Data(pos)
                };
                out.push(Extent {
                    offset: pos,
                    len: l,
                    source,
                });
                pos += l;
            }
        }
        if pos < end {
            out.push(Extent {
                offset: pos,
                len: end - pos,
                source: Source::Data(pos),
            });
        }
        Ok(out)
    }

    fn read_payload(&mut self, buf: &mut [u8], at: u64) -> Result<()> {
        self.client.read(buf, at).map_err(remote)
    }

    fn write(&mut self, buf: &[u8], offset: u64) -> Result<()> {
        self.client.write(buf, offset).map_err(remote)
    }

    fn write_zeroes(&mut self, offset: u64, len: u64) -> Result<bool> {
        if !self.client.can(tflag::SEND_WRITE_ZEROES) {
            return Ok(false);
        }
        self.client.write_zeroes(offset, len).map_err(remote)?;
        Ok(true)
    }

    fn discard(&mut self, offset: u64, len: u64) -> Result<Vec<(u64, u64)>> {
        // WRITE_ZEROES (without NO_HOLE) lets the server free the range and guarantees zeros;
        // a plain TRIM would leave the contents unspecified.
        if self.write_zeroes(offset, len)? {
            Ok(Vec::new())
        } else {
            Ok(vec![(offset, len)])
        }
    }

    fn flush(&mut self) -> Result<()> {
        if !self.writable {
            return Ok(());
        }
        self.client.flush().map_err(remote)
    }
}
