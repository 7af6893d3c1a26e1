//! `vhdtool download [-O raw|vhd|vhdx] [--type fixed|dynamic] [-p] [--force] URL OUT`: the
//! fixed VHD in an Azure page blob, as any output format, fetching only its written pages.
//!
//! ```text
//!   HEAD (length) ─> Get Blob of the last 512 bytes: a fixed VHD footer? ─> virtual size
//!   lister thread: Get Page Ranges (1 GiB windows) ─> 4 MiB pieces ─┐
//!   N fetch threads: Get Blob (x-ms-range, MD5 checked) <────────────┘ ─┐
//!   this thread: non-zero 4 KiB granules ─> .OUT.vhdkit-tmp-<pid> <─────┘ ─sync─> rename to OUT
//! ```
//!
//! Invariants:
//! - The blob is checked to be a fixed VHD (footer valid, size inside the blob) before OUT is
//!   created; pages outside the virtual disk (the footer) are never copied as data.
//! - OUT is written like `convert` writes it: sparse (zero granules never written), under a
//!   temporary name, synced, then renamed; an existing OUT only with `--force`.
//! - Memory is bounded: at most 2N + 1 pieces of 4 MiB are in flight.

use std::path::PathBuf;
use std::sync::{mpsc, Arc, Mutex};

use anyhow::{bail, Result};
use azure_blob::{BlobUrl, PageBlob, MAX_PAGE_WRITE};

use super::convert::{write_nonzero, OutputSpec, Sink, TempOutput};
use super::{format_from_extension, DiskTypeArg, ImageFormat, SectorArgs, MAP_WINDOW};
use crate::progress::Progress;

/// Get Blob requests in flight.
const FETCHERS: usize = 8;

/// Arguments of `download`.
#[derive(Debug, clap::Args)]
pub struct Args {
    /// Output format (default: from OUT's extension, else raw).
    #[arg(short = 'O', value_enum)]
    pub output_format: Option<ImageFormat>,
    /// Disk type of VHD/VHDX output (default dynamic).
    #[arg(long = "type", value_enum)]
    pub disk_type: Option<DiskTypeArg>,
    /// Show progress on stderr.
    #[arg(short = 'p', long = "progress")]
    pub progress: bool,
    /// Replace OUT if it exists.
    #[arg(long)]
    pub force: bool,
    /// The page blob's URL with a SAS token allowing reads.
    pub url: String,
    /// The image to write.
    pub out: PathBuf,
}

/// Runs `download`.
pub fn run(a: &Args) -> Result<u8> {
    let format = a
        .output_format
        .or_else(|| format_from_extension(&a.out))
        .unwrap_or(ImageFormat::Raw);
    let spec = OutputSpec {
        format,
        disk_type: a.disk_type,
        block_size: None,
        sparse: false,
        azure: false,
        sectors: SectorArgs {
            logical_sector_size: None,
            physical_sector_size: None,
        },
    };
    spec.check()?;
    if !a.force && a.out.symlink_metadata().is_ok() {
        bail!(
            "{} already exists; use --force to replace it",
            a.out.display()
        );
    }
    let blob = PageBlob::new(BlobUrl::parse(&a.url)?);
    // The same checks as opening the blob as a layer: a page blob holding a fixed VHD.
    let (size, _) = block_backend::layer::fixed_vhd_in_blob(&blob)?;
    let tmp = TempOutput::new(&a.out)?;
    let mut sink = Sink::create(tmp.path(), size, &spec)?;
    let mut progress = Progress::new(size, a.progress);
    fetch(&blob, size, &mut sink, &mut progress)?;
    sink.finish()?;
    progress.finish();
    tmp.commit(&a.out, a.force)?;
    Ok(0)
}

/// Copies the written pages of `[0, size)` into `sink`.
fn fetch(blob: &PageBlob, size: u64, sink: &mut Sink, progress: &mut Progress) -> Result<()> {
    let (job_tx, job_rx) = mpsc::sync_channel::<(u64, usize)>(FETCHERS);
    // Owned by the fetchers only: once they have all ended, the lister's sends fail.
    let job_rx = Arc::new(Mutex::new(job_rx));
    let (done_tx, done_rx) = mpsc::sync_channel::<Result<(u64, Vec<u8>)>>(FETCHERS);
    std::thread::scope(|s| -> Result<()> {
        let lister_done = done_tx.clone();
        s.spawn(move || {
            if let Err(e) = list(blob, size, &job_tx) {
                let _ = lister_done.send(Err(e));
            }
        });
        for _ in 0..FETCHERS {
            let done = done_tx.clone();
            let job_rx = Arc::clone(&job_rx);
            s.spawn(move || loop {
                let job = job_rx.lock().map(|r| r.recv());
                let Ok(Ok((off, len))) = job else { return };
                let mut buf = vec![0u8; len];
                let r = blob.read(off, &mut buf).map(|()| (off, buf));
                if done.send(r.map_err(Into::into)).is_err() {
                    return;
                }
            });
        }
        drop(done_tx);
        drop(job_rx);
        let mut copied = 0;
        let r = (|| -> Result<()> {
            for item in done_rx.iter() {
                let (off, buf) = item?;
                write_nonzero(sink, &buf, off)?;
                copied += buf.len() as u64;
                progress.inc(buf.len() as u64);
            }
            Ok(())
        })();
        // On an error, dropping the receiver ends the fetchers at their next send, and they
        // drop the job queue, which ends the lister.
        drop(done_rx);
        r?;
        progress.inc(size - copied);
        Ok(())
    })
}

/// Queues 4 MiB-aligned pieces of the blob's page ranges inside `[0, size)`.
fn list(blob: &PageBlob, size: u64, jobs: &mpsc::SyncSender<(u64, usize)>) -> Result<()> {
    let piece = MAX_PAGE_WRITE as u64;
    let mut window = 0;
    while window < size {
        let wlen = (size - window).min(MAP_WINDOW);
        for &(s, e) in &blob.page_ranges(window, window + wlen)?.0 {
            let mut pos = s;
            while pos < e {
                let next = ((pos / piece + 1) * piece).min(e);
                if jobs.send((pos, (next - pos) as usize)).is_err() {
                    return Ok(());
                }
                pos = next;
            }
        }
        window += wlen;
    }
    Ok(())
}
