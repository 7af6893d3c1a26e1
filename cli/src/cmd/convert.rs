//! `vhdtool convert [-O raw|vhd|vhdx] [--type fixed|dynamic] [--block-size SIZE] [--sparse]
//! [--azure] [-p] [--force] SRC DST`
//!
//! ```text
//!   reader thread:  SRC chain ──map (1 GiB windows)──> data runs ──read 2 MiB aligned chunks──┐
//!                                                               (≤ 4 buffers in flight)     │
//!   main thread:    skip zero 4 KiB granules ──> write .DST.vhdkit-tmp-<pid> <──────────────┘
//!                   (writeback thread: started every 128 MiB) ──fdatasync──> link/rename to DST ──fsync dir
//! ```
//!
//! The source is read through the Disk API, so a differencing chain comes out flattened; a
//! block device (or partition) is read as a raw disk (P2V). Ranges the source map calls zero
//! are never read, and all-zero data is never written: dynamic outputs keep those blocks
//! unallocated, raw outputs keep them as holes. The output lives under a temporary name in
//! DST's directory until it is complete and synced; only then does it get its name, and the
//! directory is synced after. On any error it is removed. An existing DST is only replaced with
//! `--force`. Memory is bounded by the buffers in flight, whatever the disk size.
//!
//! DST may also be an existing NBD export (`nbd://...`, as qemu-img's `convert -n`): the
//! source's bytes are written into it, zero runs as zero writes (`NBD_CMD_WRITE_ZEROES` where
//! the server offers it), nothing is created or renamed, and the export must be at least as
//! large as the source.
//!
//! With `--fs`, the file systems on SRC are read first (as `compact --fs` reads them,
//! crate `fs-free`) into a map of wholly free granules (4 KiB, more on disks over 16 TiB);
//! their bytes are zeroed before the zero check, so free space is never written to DST.

use std::fs::File;
use std::os::fd::{AsRawFd, RawFd};
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};

use anyhow::{bail, Context, Result};
use block_backend::{AlignedBuf, Chain, Disk};

use super::{
    block_size_arg, format_from_extension, is_zero, open_read_only, vhdx_options, DiskTypeArg,
    ImageFormat, SectorArgs, CHUNK, MAP_WINDOW,
};
use crate::progress::Progress;
use crate::size::parse_size;

/// Granule of zero detection inside a chunk: zero runs this long or longer are skipped.
const ZERO_GRANULE: u64 = 4096;

/// Bytes written between two requests to start writeback of the output, so that the disk
/// writes while we copy and the final fsync finds little left to do. The requests are made by
/// a thread of their own, because one blocks while the device queue is full: made inline they
/// stalled the copy. Measured on raw→vhdx and vhdx→raw (medians of 9 interleaved runs each):
/// inline every 128 MiB 1.38 s / 1.44 s, own thread every 32 MiB 0.92 s / 1.22 s, own thread
/// every 128 MiB 0.86 s / 0.92 s (cp + sync of the same bytes: 0.95 s / 1.04 s).
const WRITEBACK_STEP: u64 = 128 << 20;

/// Arguments of `convert`.
#[derive(Debug, clap::Args)]
pub struct Args {
    #[command(flatten)]
    pub share: super::ShareArgs,
    /// Output format (default: from DST's extension, else raw).
    #[arg(short = 'O', value_enum)]
    pub output_format: Option<ImageFormat>,
    /// Disk type of VHD/VHDX output (default dynamic).
    #[arg(long = "type", value_enum)]
    pub disk_type: Option<DiskTypeArg>,
    /// Allocation block size (default: VHD 2M, VHDX 32M).
    #[arg(long, value_parser = parse_size)]
    pub block_size: Option<u64>,
    /// VHDX sector sizes.
    #[command(flatten)]
    pub sectors: SectorArgs,
    /// Fixed output: leave unwritten space sparse on the host.
    #[arg(long)]
    pub sparse: bool,
    /// For Azure: a fixed VHD whose virtual size is the source's rounded up to a whole MiB
    /// (zero padded), exact in every reader.
    #[arg(long, conflicts_with = "disk_type")]
    pub azure: bool,
    /// Show progress on stderr.
    #[arg(short = 'p', long = "progress")]
    pub progress: bool,
    /// Replace DST if it exists; with --fs, also read file systems whose map may be stale.
    #[arg(long)]
    pub force: bool,
    /// Do not copy what the file systems (ext2/3/4, NTFS, FAT, exFAT) call free: it reads as
    /// zeros in DST (and takes no space in a dynamic or sparse one).
    #[arg(long)]
    pub fs: bool,
    /// The source image (any format; differencing chains are flattened).
    pub src: PathBuf,
    /// The image to write.
    pub dst: PathBuf,
}

/// Runs `convert`.
pub fn run(a: &Args) -> Result<u8> {
    let format = a
        .output_format
        .or_else(|| a.azure.then_some(ImageFormat::Vhd))
        .or_else(|| format_from_extension(&a.dst))
        .unwrap_or(ImageFormat::Raw);
    let spec = OutputSpec {
        format,
        disk_type: a.disk_type,
        block_size: a.block_size,
        sparse: a.sparse,
        azure: a.azure,
        sectors: a.sectors,
    };
    spec.check()?;
    let remote = block_backend::layer::is_remote(&a.dst);
    if remote
        && (a.output_format.is_some_and(|f| f != ImageFormat::Raw)
            || a.disk_type.is_some()
            || a.block_size.is_some()
            || a.sparse
            || a.azure
            || a.sectors.any())
    {
        bail!("{} is an export: it takes the disk's bytes as they are (-O, --type, --block-size, --sparse, --azure and sector sizes do not apply)", a.dst.display());
    }
    if !remote && !a.force && a.dst.symlink_metadata().is_ok() {
        bail!(
            "{} already exists; use --force to replace it",
            a.dst.display()
        );
    }
    let mut src = open_read_only(&a.src, a.share)?;
    let size = src.size();
    let tmp = if remote {
        None
    } else {
        Some(TempOutput::new(&a.dst)?)
    };
    let mut sink = match &tmp {
        None => Sink::export(&a.dst, size)?,
        Some(t) => Sink::create(t.path(), size, &spec)?,
    };
    let free = if a.fs {
        Some(free_map(&mut src, size, a.force)?)
    } else {
        None
    };
    let mut progress = Progress::new(size, a.progress);
    copy(&mut src, &mut sink, size, &mut progress, free.as_ref())?;
    sink.finish()?;
    progress.finish();
    if let Some(tmp) = tmp {
        tmp.commit(&a.dst, a.force)?;
    }
    Ok(0)
}

/// How a new output image is made (the options of `convert`, and of `download`).
pub(super) struct OutputSpec {
    /// Output format.
    pub format: ImageFormat,
    /// VHD/VHDX disk type (default dynamic).
    pub disk_type: Option<DiskTypeArg>,
    /// Allocation block size (default: the format's).
    pub block_size: Option<u64>,
    /// Fixed output: leave unwritten space sparse.
    pub sparse: bool,
    /// A fixed VHD of a whole MiB.
    pub azure: bool,
    /// VHDX sector sizes.
    pub sectors: SectorArgs,
}

impl OutputSpec {
    /// Refuses option combinations that do not apply to the format.
    pub fn check(&self) -> Result<()> {
        if self.azure && self.format != ImageFormat::Vhd {
            bail!("--azure makes a fixed VHD (Azure takes no VHDX or raw); use -O vhd");
        }
        if self.format != ImageFormat::Vhdx && self.sectors.any() {
            bail!("--logical-sector-size and --physical-sector-size apply to VHDX output only");
        }
        match self.format {
            ImageFormat::Raw => {
                if self.disk_type.is_some() || self.block_size.is_some() || self.sparse {
                    bail!("--type, --block-size and --sparse apply to VHD/VHDX output only (raw output is always sparse)");
                }
            }
            ImageFormat::Vhd | ImageFormat::Vhdx => {
                let t = self.disk_type.unwrap_or(DiskTypeArg::Dynamic);
                if self.format == ImageFormat::Vhd
                    && t == DiskTypeArg::Fixed
                    && self.block_size.is_some()
                {
                    bail!("--block-size applies to dynamic VHD output only");
                }
                if t == DiskTypeArg::Dynamic && self.sparse {
                    bail!(
                        "--sparse applies to fixed output only (dynamic output is always sparse)"
                    );
                }
            }
        }
        Ok(())
    }
}

/// Most granules of the free map of `convert --fs` (16 MiB of counters).
const MAX_FREE_GRANULES: u64 = 1 << 22;

/// The free space of every file system on `src`, in granules of at least [`ZERO_GRANULE`].
fn free_map(src: &mut Chain, size: u64, force: bool) -> Result<fs_free::FreeMap> {
    let mut granule = ZERO_GRANULE;
    while size.div_ceil(granule) > MAX_FREE_GRANULES {
        granule *= 2;
    }
    let mut map = fs_free::FreeMap::new(size, granule)?;
    let sector = src.logical_sector_size();
    let mut read = |off: u64, buf: &mut [u8]| src.read_at(buf, off).map_err(std::io::Error::other);
    let volumes = super::fsfree::scan(size, sector, &mut read, force, &mut |o, l| map.add(o, l))
        .context("convert --fs")?;
    for v in &volumes {
        for w in &v.warnings {
            eprintln!("vhdtool: warning: {}: {w} (--force)", v.name());
        }
    }
    Ok(map)
}

/// Zeroes the parts of `buf` (at virtual `offset`) lying in granules `free` calls wholly free.
fn drop_free(free: &fs_free::FreeMap, buf: &mut [u8], offset: u64) {
    let g = free.block_size();
    let end = offset + buf.len() as u64;
    let mut b = offset / g;
    while b * g < end {
        if free.is_free(b) {
            let (s, e) = ((b * g).max(offset), ((b + 1) * g).min(end));
            buf[(s - offset) as usize..(e - offset) as usize].fill(0);
        }
        b += 1;
    }
}

/// Buffers in flight between the reading and the writing thread (each CHUNK bytes): bounds
/// memory at `BUFFERS * CHUNK` whatever the disk size.
const BUFFERS: usize = 4;

/// What the reading thread hands over.
enum Piece {
    /// A run `(offset, length)` the source's map calls zero, never read.
    Hole(u64, u64),
    /// Bytes read at a virtual offset.
    Data(u64, AlignedBuf),
}

/// Copies the virtual disk of `src` into `sink`, skipping zeros: one thread reads (following
/// the source's map, so holes are never read), this one detects zeros and writes, so reading
/// and writing overlap. Buffers go round between them; at most [`BUFFERS`] exist.
fn copy(
    src: &mut Chain,
    sink: &mut Sink,
    size: u64,
    progress: &mut Progress,
    free: Option<&fs_free::FreeMap>,
) -> Result<()> {
    let (full_tx, full_rx) = std::sync::mpsc::sync_channel::<Result<Piece>>(BUFFERS);
    let (free_tx, free_rx) = std::sync::mpsc::sync_channel::<AlignedBuf>(BUFFERS);
    for _ in 0..BUFFERS {
        free_tx
            .send(AlignedBuf::new(CHUNK as usize))
            .expect("receiver is alive");
    }
    let out_fd = sink.output_fd();
    let (kick_tx, kick_rx) = std::sync::mpsc::sync_channel::<()>(1);
    std::thread::scope(|scope| -> Result<()> {
        // Starting writeback can block while the device queue is full: a thread of its own
        // does it, so the copy never waits for the disk before the final flush.
        let flusher = scope.spawn(move || {
            for () in kick_rx {
                if let Some(fd) = out_fd {
                    start_writeback(fd);
                }
            }
        });
        let reader = scope.spawn(move || {
            let mut window = 0;
            while window < size {
                let wlen = (size - window).min(MAP_WINDOW);
                let map = match src.map(window, wlen) {
                    Ok(m) => m,
                    Err(e) => {
                        let _ = full_tx.send(Err(e.into()));
                        return;
                    }
                };
                for e in map {
                    if e.zero && !e.data {
                        if full_tx.send(Ok(Piece::Hole(e.offset, e.length))).is_err() {
                            return;
                        }
                        continue;
                    }
                    let mut pos = e.offset;
                    while pos < e.end() {
                        // Chunks end on CHUNK-aligned boundaries so writes line up with blocks.
                        let next = ((pos / CHUNK + 1) * CHUNK).min(e.end());
                        let Ok(mut buf) = free_rx.recv() else { return };
                        buf.resize((next - pos) as usize);
                        let r = src.read_at(&mut buf, pos).map(|()| Piece::Data(pos, buf));
                        let failed = r.is_err();
                        if full_tx.send(r.map_err(Into::into)).is_err() || failed {
                            return;
                        }
                        pos = next;
                    }
                }
                window += wlen;
            }
        });
        let mut dirty = 0;
        let result = (|| -> Result<()> {
            for item in full_rx.iter() {
                let (offset, buf) = match item? {
                    Piece::Hole(offset, len) => {
                        sink.zero(offset, len)?;
                        progress.inc(len);
                        continue;
                    }
                    Piece::Data(offset, buf) => (offset, buf),
                };
                let mut buf = buf;
                if let Some(free) = free {
                    drop_free(free, &mut buf, offset);
                }
                dirty += write_nonzero(sink, &buf, offset)?;
                if dirty >= WRITEBACK_STEP {
                    // One request pending is enough: it covers everything dirty by then.
                    let _ = kick_tx.try_send(());
                    dirty = 0;
                }
                progress.inc(buf.len() as u64);
                // The reader may have finished: a closed channel is fine.
                let _ = free_tx.send(buf);
            }
            Ok(())
        })();
        // On an error, dropping the receivers stops the reader at its next send.
        drop(full_rx);
        drop(free_tx);
        drop(kick_tx);
        reader
            .join()
            .map_err(|_| anyhow::anyhow!("the reading thread panicked"))?;
        flusher
            .join()
            .map_err(|_| anyhow::anyhow!("the writeback thread panicked"))?;
        result
    })
}

/// Writes the runs of `buf` (which holds `[offset, offset + len)`) that are not whole zero
/// granules, and hands the zero runs to [`Sink::zero`]; returns the bytes written. Granules
/// are aligned on the virtual disk, not on the buffer.
pub(super) fn write_nonzero(sink: &mut Sink, buf: &[u8], offset: u64) -> Result<u64> {
    let mut written = 0;
    let end = offset + buf.len() as u64;
    let at = |v: u64| (v - offset) as usize;
    // The current run: its start and whether it is zeros.
    let mut run: Option<(u64, bool)> = None;
    let mut pos = offset;
    while pos <= end {
        let g_end = ((pos / ZERO_GRANULE + 1) * ZERO_GRANULE).min(end);
        let zero = pos < end && is_zero(&buf[at(pos)..at(g_end)]);
        match run {
            Some((s, z)) if pos == end || z != zero => {
                if z {
                    sink.zero(s, pos - s)?;
                } else {
                    sink.write(&buf[at(s)..at(pos)], s)?;
                    written += pos - s;
                }
                run = Some((pos, zero));
            }
            None => run = Some((pos, zero)),
            _ => {}
        }
        if pos == end {
            break;
        }
        pos = g_end;
    }
    Ok(written)
}

/// Where converted bytes go.
pub(super) enum Sink {
    /// A plain sparse file.
    Raw {
        /// The output file.
        file: File,
        /// Its (temporary) path.
        path: PathBuf,
    },
    /// A fresh VHD or VHDX image.
    Image(Box<Chain>),
    /// An existing export (it may hold old data: zeros are written, not skipped).
    Export(Box<Chain>),
}

impl Sink {
    /// A new output at `path` of `size` virtual bytes, as `spec` says.
    pub(super) fn create(path: &Path, size: u64, spec: &OutputSpec) -> Result<Sink> {
        match spec.format {
            ImageFormat::Raw => Sink::raw(path, size),
            ImageFormat::Vhd => Sink::vhd(path, size, spec),
            ImageFormat::Vhdx => Sink::vhdx(path, size, spec),
        }
    }

    fn raw(path: &Path, size: u64) -> Result<Sink> {
        let file = std::fs::OpenOptions::new()
            .write(true)
            .create_new(true)
            .open(path)
            .with_context(|| format!("cannot create {}", path.display()))?;
        file.set_len(size)
            .with_context(|| format!("cannot size {} to {size} bytes", path.display()))?;
        Ok(Sink::Raw {
            file,
            path: path.to_path_buf(),
        })
    }

    fn vhd(path: &Path, size: u64, a: &OutputSpec) -> Result<Sink> {
        let t = if a.azure {
            DiskTypeArg::Fixed
        } else {
            a.disk_type.unwrap_or(DiskTypeArg::Dynamic)
        };
        // VHD sizes are whole sectors (Azure: whole MiB): the source is padded with zeros.
        let unit = if a.azure { 1 << 20 } else { 512 };
        let vsize = size.div_ceil(unit) * unit;
        if a.azure && vsize != size {
            eprintln!(
                "vhdtool: note: --azure: virtual size {size} rounded up to {vsize} (a whole MiB), zero padded"
            );
        } else if vsize != size {
            eprintln!(
                "vhdtool: warning: source size {size} is not a multiple of 512; the VHD will be {vsize} bytes (zero padded)"
            );
        }
        let mut opts = vhd::CreateOptions {
            size: vsize,
            vhd_type: t.into(),
            sparse: a.sparse,
            ..Default::default()
        };
        if let Some(b) = block_size_arg(a.block_size)? {
            opts.block_size = b;
        }
        let image = vhd::VhdImage::create(path, &opts)
            .with_context(|| format!("cannot create {}", path.display()))?;
        Sink::image(block_backend::Image::new(Box::new(image)))
    }

    fn vhdx(path: &Path, size: u64, a: &OutputSpec) -> Result<Sink> {
        let lss = u64::from(a.sectors.logical_sector_size.unwrap_or(512));
        // VHDX sizes are whole logical sectors: pad a partial last sector with zeros.
        let vsize = size.div_ceil(lss) * lss;
        if vsize != size {
            eprintln!(
                "vhdtool: warning: source size {size} is not a multiple of {lss}; the VHDX will be {vsize} bytes (zero padded)"
            );
        }
        let fixed = a.disk_type == Some(DiskTypeArg::Fixed);
        let opts = vhdx_options(vsize, fixed, a.block_size, a.sparse, a.sectors)?;
        let image = vhdx::VhdxImage::create(path, &opts)
            .with_context(|| format!("cannot create {}", path.display()))?;
        Sink::image(block_backend::Image::new(Box::new(image)))
    }

    fn export(dst: &Path, size: u64) -> Result<Sink> {
        let chain = block_backend::open(dst, block_backend::OpenOptions::read_write())
            .with_context(|| format!("cannot open {} for writing", dst.display()))?;
        if chain.size() < size {
            bail!(
                "{} holds {} bytes, less than the source's {size}",
                dst.display(),
                chain.size()
            );
        }
        Ok(Sink::Export(Box::new(chain)))
    }

    /// Makes `[offset, offset + len)` read as zeros: nothing to do on a fresh output.
    fn zero(&mut self, offset: u64, len: u64) -> Result<()> {
        match self {
            Sink::Export(d) => Ok(d.write_zeroes(offset, len)?),
            Sink::Raw { .. } | Sink::Image(_) => Ok(()),
        }
    }

    fn image(image: block_backend::Image) -> Result<Sink> {
        let mut chain = Chain::from_image(image)?;
        // Nobody sees the file before the final flush and rename: no ordering barriers needed.
        chain.set_relaxed_durability(true);
        Ok(Sink::Image(Box::new(chain)))
    }

    fn write(&mut self, buf: &[u8], offset: u64) -> Result<()> {
        match self {
            Sink::Raw { file, path } => file
                .write_all_at(buf, offset)
                .with_context(|| format!("{}: write at offset {offset}", path.display())),
            Sink::Image(d) | Sink::Export(d) => Ok(d.write_at(buf, offset)?),
        }
    }

    /// The output file's descriptor (valid as long as the sink).
    fn output_fd(&self) -> Option<RawFd> {
        match self {
            Sink::Raw { file, .. } => Some(file.as_raw_fd()),
            Sink::Image(d) | Sink::Export(d) => d.top().file().map(|f| f.as_raw_fd()),
        }
    }

    /// Makes everything durable and closes the output.
    pub(super) fn finish(self) -> Result<()> {
        match self {
            Sink::Raw { file, path } => file
                .sync_all()
                .with_context(|| format!("{}: flush", path.display())),
            Sink::Image(mut d) | Sink::Export(mut d) => Ok(d.flush()?),
        }
    }
}

/// Asks the kernel to start writing the dirty pages of `fd` back now, without waiting for them
/// (`sync_file_range(SYNC_FILE_RANGE_WRITE)`); the final flush still waits for all of it.
fn start_writeback(fd: RawFd) {
    // SAFETY: sync_file_range takes integers only. `fd` is the output's, which stays open until
    // the sink is finished, after the copy (and this call's thread) has ended. It is a hint:
    // errors are ignored.
    unsafe {
        libc::sync_file_range(fd, 0, 0, libc::SYNC_FILE_RANGE_WRITE);
    }
}

/// A temporary output path in the destination's directory, removed unless committed.
pub(super) struct TempOutput {
    path: PathBuf,
    committed: bool,
}

impl TempOutput {
    pub(super) fn new(dst: &Path) -> Result<TempOutput> {
        dst.file_name()
            .with_context(|| format!("{} is not a file name", dst.display()))?;
        let path = image_io::publish::temp_name(dst);
        // A leftover with our pid belongs to a dead process.
        let _ = std::fs::remove_file(&path);
        Ok(TempOutput {
            path,
            committed: false,
        })
    }

    pub(super) fn path(&self) -> &Path {
        &self.path
    }

    /// Moves the finished output onto `dst` (replacing it only with `force`).
    pub(super) fn commit(mut self, dst: &Path, force: bool) -> Result<()> {
        // link(2) fails if dst appeared meanwhile: never overwrite without --force.
        match image_io::publish::publish(&self.path, dst, force) {
            Ok(()) => {}
            Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => bail!(
                "{} already exists; use --force to replace it",
                dst.display()
            ),
            Err(e) => {
                return Err(e)
                    .with_context(|| format!("cannot rename output into {}", dst.display()))
            }
        }
        self.committed = true;
        Ok(())
    }
}

impl Drop for TempOutput {
    fn drop(&mut self) {
        if !self.committed {
            let _ = std::fs::remove_file(&self.path);
        }
    }
}
