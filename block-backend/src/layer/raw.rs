//! Raw layer: a plain file (or block device) whose bytes are the disk.
//!
//! ```text
//!   virtual offset  0 ............................. size
//!   file offset     0 ............................. size      (identity)
//! ```
//!
//! Invariants:
//! - `size` is the length of the file when it was opened (any length; a last partial sector is
//!   fine) and never changes through this layer.
//! - A read-only layer holds a file opened with `O_RDONLY`.
//! - `map` reports holes of sparse files (found with `SEEK_DATA`/`SEEK_HOLE`) as zero runs, so
//!   copying tools can skip them; where the file system cannot tell, everything is data.

use std::fs::File;
use std::io::{self, Seek, SeekFrom};
use std::os::unix::fs::FileExt;
use std::os::unix::io::AsRawFd;
use std::path::{Path, PathBuf};

use super::{Extent, Layer, PlannedWrite, Source};
use crate::disk::LayerInfo;
use crate::{Error, Format, Result};

/// Size of the zero buffer used to fill ranges when hole punching is not available.
const ZERO_CHUNK: usize = 1 << 20;

/// A raw disk file.
#[derive(Debug)]
pub struct RawFile {
    path: PathBuf,
    file: File,
    size: u64,
    read_only: bool,
}

impl RawFile {
    /// Opens and locks `path` as a raw disk ([`image_io::lock`]); read-only opens use
    /// `O_RDONLY`.
    pub fn open(path: &Path, mode: image_io::OpenMode) -> Result<RawFile> {
        let file = image_io::lock::open(path, mode).map_err(|e| Error::from_open(path, e))?;
        RawFile::from_file(path, file, !mode.is_writable())
    }

    /// Wraps an already opened file. `read_only` must be true if `file` lacks write access.
    pub fn from_file(path: &Path, file: File, read_only: bool) -> Result<RawFile> {
        // Seeking to the end (rather than metadata().len()) also sizes block devices.
        let size = (&file)
            .seek(SeekFrom::End(0))
            .map_err(|e| Error::io(path, "find size", 0, e))?;
        Ok(RawFile {
            path: path.to_path_buf(),
            file,
            size,
            read_only,
        })
    }

    /// True if opened without write access.
    pub fn is_read_only(&self) -> bool {
        self.read_only
    }

    /// Reads `buf.len()` bytes at `offset`; the caller has checked the range.
    fn pread(&self, buf: &mut [u8], offset: u64) -> Result<()> {
        self.file
            .read_exact_at(buf, offset)
            .map_err(|e| Error::io(&self.path, "read", offset, e))
    }

    /// Writes `buf` at `offset`; the caller has checked the range and write access.
    fn pwrite(&self, buf: &[u8], offset: u64) -> Result<()> {
        self.file
            .write_all_at(buf, offset)
            .map_err(|e| Error::io(&self.path, "write", offset, e))
    }

    /// Makes `[offset, offset + len)` read as zeros: punches a hole where the file system can,
    /// writes zeros where it cannot. The caller has checked the range and write access.
    fn zero_range(&self, offset: u64, len: u64) -> Result<()> {
        if len == 0 {
            return Ok(());
        }
        match self.punch_hole(offset, len) {
            Ok(()) => Ok(()),
            Err(e)
                if matches!(
                    e.raw_os_error(),
                    Some(libc::EOPNOTSUPP) | Some(libc::ENOSYS) | Some(libc::EINVAL)
                ) || e.kind() == io::ErrorKind::Unsupported =>
            {
                tracing::debug!(path = %self.path.display(), "hole punching unsupported: {e}; writing zeros");
                self.write_zeros(offset, len)
            }
            Err(e) => Err(Error::io(&self.path, "punch hole", offset, e)),
        }
    }

    /// `fallocate(PUNCH_HOLE | KEEP_SIZE)` over the range.
    fn punch_hole(&self, offset: u64, len: u64) -> io::Result<()> {
        let (Ok(off), Ok(length)) = (libc::off_t::try_from(offset), libc::off_t::try_from(len))
        else {
            return Err(io::Error::from_raw_os_error(libc::EINVAL));
        };
        // SAFETY: fallocate only reads its integer arguments; the descriptor is owned by
        // `self.file` and stays open for the duration of the call. No memory is passed.
        let rc = unsafe {
            libc::fallocate(
                self.file.as_raw_fd(),
                libc::FALLOC_FL_PUNCH_HOLE | libc::FALLOC_FL_KEEP_SIZE,
                off,
                length,
            )
        };
        if rc == 0 {
            Ok(())
        } else {
            Err(io::Error::last_os_error())
        }
    }

    /// Writes zeros over the range, in bounded chunks.
    fn write_zeros(&self, offset: u64, len: u64) -> Result<()> {
        let zeros = vec![0u8; ZERO_CHUNK.min(usize::try_from(len).unwrap_or(ZERO_CHUNK))];
        let mut pos = offset;
        let end = offset + len;
        while pos < end {
            let n = (end - pos).min(zeros.len() as u64) as usize;
            self.pwrite(&zeros[..n], pos)?;
            pos += n as u64;
        }
        Ok(())
    }

    /// Data and hole runs of `[offset, offset + len)`; the caller has checked the range.
    fn runs(&self, offset: u64, len: u64) -> Vec<Extent> {
        let end = offset + len;
        let run = |start: u64, stop: u64, data: bool| Extent {
            offset: start,
            len: stop - start,
            source: if data {
                Source::Data(start)
            } else {
                Source::Hole(start)
            },
        };
        let mut out = Vec::new();
        let mut pos = offset;
        while pos < end {
            let data_start = match self.seek(pos, libc::SEEK_DATA) {
                Ok(Some(d)) => d.max(pos),
                // No data at or after `pos`: the rest is a hole.
                Ok(None) => end,
                Err(_) => {
                    // The file system cannot say: report the rest as data.
                    out.push(run(pos, end, true));
                    return out;
                }
            };
            if data_start > pos {
                out.push(run(pos, data_start.min(end), false));
            }
            if data_start >= end {
                break;
            }
            let hole_start = match self.seek(data_start, libc::SEEK_HOLE) {
                Ok(Some(h)) if h > data_start => h.min(end),
                _ => end,
            };
            out.push(run(data_start, hole_start, true));
            pos = hole_start;
        }
        out
    }

    /// `lseek(fd, pos, whence)` for `SEEK_DATA`/`SEEK_HOLE`; `Ok(None)` for `ENXIO` (nothing of
    /// that kind at or after `pos`).
    fn seek(&self, pos: u64, whence: libc::c_int) -> io::Result<Option<u64>> {
        let Ok(off) = libc::off_t::try_from(pos) else {
            return Err(io::Error::from_raw_os_error(libc::EINVAL));
        };
        // SAFETY: lseek only takes integers; the descriptor is owned by `self.file` and open.
        // Moving the file position is harmless: all payload I/O here is positional.
        let r = unsafe { libc::lseek(self.file.as_raw_fd(), off, whence) };
        if r >= 0 {
            Ok(Some(r as u64))
        } else {
            let e = io::Error::last_os_error();
            if e.raw_os_error() == Some(libc::ENXIO) {
                Ok(None)
            } else {
                Err(e)
            }
        }
    }
}

impl Layer for RawFile {
    fn path(&self) -> &Path {
        &self.path
    }

    /// Disk size (file length at open).
    fn size(&self) -> u64 {
        self.size
    }

    fn format(&self) -> Format {
        Format::Raw
    }

    fn info(&self) -> LayerInfo {
        LayerInfo {
            path: self.path.clone(),
            format: Format::Raw,
            subformat: None,
            virtual_size: self.size,
            block_size: None,
            creator: None,
            uuid: None,
            parent_uuid: None,
            parent_name: None,
        }
    }

    fn sector_size(&self) -> u64 {
        1
    }

    fn is_writable(&self) -> bool {
        !self.read_only
    }

    fn file(&self) -> Option<&File> {
        Some(&self.file)
    }

    fn resolve_read(&mut self, offset: u64, len: u64) -> Result<Vec<Extent>> {
        Ok(vec![Extent {
            offset,
            len,
            source: Source::Data(offset),
        }])
    }

    fn map(&mut self, offset: u64, len: u64) -> Result<Vec<Extent>> {
        Ok(self.runs(offset, len))
    }

    fn read_payload(&mut self, buf: &mut [u8], at: u64) -> Result<()> {
        self.pread(buf, at)
    }

    fn plan_write(&mut self, offset: u64, len: u64) -> Result<Option<PlannedWrite>> {
        // The identity map: the payload goes where it is on the disk, no metadata.
        Ok(Some((vec![(offset, len, offset)], None)))
    }

    fn discard(&mut self, offset: u64, len: u64) -> Result<Vec<(u64, u64)>> {
        self.zero_range(offset, len)?;
        Ok(Vec::new())
    }

    fn flush(&mut self) -> Result<()> {
        if self.read_only {
            return Ok(());
        }
        self.file
            .sync_data()
            .map_err(|e| Error::io(&self.path, "flush", 0, e))
    }
}
