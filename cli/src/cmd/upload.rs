//! `vhdtool upload [--parallel N] [--resume] [--force] [-p] IMAGE URL`: IMAGE as the fixed VHD
//! `convert -O vhd --azure` writes, streamed into the page blob at URL (SAS in the query).
//!
//! ```text
//!   IMAGE chain ──map (1 GiB windows)──> data runs ──read 4 MiB aligned chunks──> non-zero
//!   4 KiB-granule runs ──(bounded queue)──> N workers: Put Page (≤ 4 MiB, Content-MD5, retried)
//!   ... all pages acknowledged ──> Put Page of the 512-byte VHD footer at the whole-MiB size
//! ```
//!
//! Invariants:
//! - Limits are checked before a byte moves: a page blob holds at most 8 TiB (data plus footer).
//! - Only non-zero ranges are sent; the blob is created all zero, so the rest reads as zeros.
//! - The footer goes last, after every data page succeeded: a blob without it is not a VHD, so an
//!   interrupted upload never looks complete.
//! - An existing blob is refused unless `--force` (replace; a page blob of exactly the right
//!   length, such as a managed disk made for direct upload, is reused with its written pages
//!   cleared, as such a blob may not be recreated) or `--resume`. The blob records the
//!   source's fingerprint (metadata `vhdkitsource`: size, map, and each layer file's length and
//!   modification time); `--resume` continues only a blob with the same fingerprint and length,
//!   skipping runs the blob's page ranges already cover (each Put Page is atomic, so a covered
//!   run was written whole), then writes the footer.
//! - Memory is bounded by the queue: (N + 3) buffers of at most 4 MiB, whatever the image size.

use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{mpsc, Mutex};
use std::time::Instant;

use anyhow::{bail, Context, Result};
use azure_blob::{
    covered, BlobError, BlobUrl, PageBlob, PageRanges, MAX_PAGE_BLOB, MAX_PAGE_WRITE,
};
use block_backend::{AlignedBuf, Chain, Disk};
use md5::{Digest, Md5};

use super::{is_zero, open_read_only, MAP_WINDOW};
use crate::progress::Progress;

/// Azure's unit of disk size: a VHD for Azure is a whole number of MiB plus its footer.
const MIB: u64 = 1 << 20;
/// Zero runs this long (aligned) are not sent.
const GRANULE: usize = 4096;
/// Blob metadata naming the source an upload was started from.
pub const SOURCE_META: &str = "vhdkitsource";

/// Arguments of `upload`.
#[derive(Debug, clap::Args)]
pub struct Args {
    #[command(flatten)]
    pub share: super::ShareArgs,
    /// Put Page requests in flight (1 to 16).
    #[arg(long, default_value_t = 8, value_parser = clap::value_parser!(u32).range(1..=16))]
    pub parallel: u32,
    /// Finish an upload of the same IMAGE to URL that was interrupted (pages already there are
    /// not sent again); starts one if the blob does not exist.
    #[arg(long, conflicts_with = "force")]
    pub resume: bool,
    /// Replace an existing blob.
    #[arg(long)]
    pub force: bool,
    /// Show progress on stderr.
    #[arg(short = 'p', long = "progress")]
    pub progress: bool,
    /// The image to upload (any format; differencing chains are flattened).
    pub image: PathBuf,
    /// The page blob's URL with a SAS token (`https://ACCOUNT.blob.core.windows.net/C/B?sv=…`).
    pub url: String,
}

/// Runs `upload`.
pub fn run(a: &Args) -> Result<u8> {
    let url = BlobUrl::parse(&a.url)?;
    let mut src = open_read_only(&a.image, a.share)?;
    let size = src.size();
    if size == 0 {
        bail!(
            "{}: the disk is empty; Azure needs at least 1 MiB",
            a.image.display()
        );
    }
    let vsize = size.div_ceil(MIB) * MIB;
    let blob_len = vsize + vhd::footer::FOOTER_SIZE as u64;
    if blob_len > MAX_PAGE_BLOB {
        bail!(
            "{}: a {size}-byte disk does not fit a page blob (at most 8 TiB including the 512-byte \
             footer): shrink the disk (vhdtool resize) first",
            a.image.display()
        );
    }
    if vsize != size {
        eprintln!(
            "vhdtool: note: virtual size {size} rounded up to {vsize} (a whole MiB), zero padded"
        );
    }
    let fingerprint = fingerprint(&mut src, size, vsize)?;
    let blob = PageBlob::new(url);
    let meta = [(SOURCE_META, fingerprint.as_str())];
    let resume = match blob.properties()? {
        None => {
            blob.create(blob_len, &meta, false)?;
            false
        }
        Some(p) if a.force && p.blob_type == "PageBlob" && p.length == blob_len => {
            // A managed disk made for direct upload: its blob exists at the size asked for and
            // may not be recreated. Written pages are cleared instead.
            reuse(&blob, blob_len, &meta)?;
            false
        }
        Some(_) if a.force => {
            blob.create(blob_len, &meta, true)?;
            false
        }
        Some(p) if a.resume => {
            if p.blob_type != "PageBlob" || p.length != blob_len || p.meta(SOURCE_META) != Some(&fingerprint) {
                bail!(
                    "{}: this blob was not started by an upload of {} (type {}, length {}, expected \
                     a page blob of {blob_len} bytes from this source); use --force to start over",
                    blob.url(),
                    a.image.display(),
                    p.blob_type,
                    p.length
                );
            }
            if footer_present(&blob, vsize)? {
                eprintln!("vhdtool: {}: the upload is already complete", blob.url());
                return Ok(0);
            }
            true
        }
        Some(_) => bail!(
            "{}: the blob exists; use --force to replace it, or --resume to finish an interrupted upload",
            blob.url()
        ),
    };
    let started = Instant::now();
    let mut progress = Progress::new(vsize, a.progress);
    let stats = send_data(
        &mut src,
        &blob,
        size,
        a.parallel as usize,
        resume,
        &mut progress,
    )?;
    let footer = vhd::Footer::new_vhdkit(
        vsize,
        vhd::DiskType::Fixed,
        uuid::Uuid::new_v4(),
        vhd::footer::vhd_timestamp_now(),
    );
    blob.put_pages(vsize, &footer.to_bytes())?;
    progress.finish();
    eprintln!(
        "vhdtool: uploaded {} bytes of data in {} Put Page requests ({} bytes already there) + footer \
         to {} in {:.2} s",
        stats.sent_bytes,
        stats.requests,
        stats.skipped_bytes,
        blob.url(),
        started.elapsed().as_secs_f64()
    );
    Ok(0)
}

/// Makes an existing page blob of the right length all zero (Clear Pages over its page
/// ranges, in 1 GiB windows) and marks it with `meta`.
fn reuse(blob: &PageBlob, blob_len: u64, meta: &[(&str, &str)]) -> Result<()> {
    let mut window = 0;
    while window < blob_len {
        let end = (window + MAP_WINDOW).min(blob_len);
        for &(s, e) in &blob.page_ranges(window, end)?.0 {
            blob.clear_pages(s, e - s)?;
        }
        window = end;
    }
    if let Err(e) = blob.set_metadata(meta) {
        eprintln!("vhdtool: warning: {e}; --resume will not recognise this upload");
    }
    Ok(())
}

/// Whether the blob's last 512 bytes hold the footer of a fixed VHD of `vsize` bytes.
fn footer_present(blob: &PageBlob, vsize: u64) -> Result<bool> {
    let mut raw = [0u8; vhd::footer::FOOTER_SIZE];
    blob.read(vsize, &mut raw)?;
    let f = vhd::Footer::parse(&raw);
    Ok(f.problems().is_empty()
        && f.disk_type() == Some(vhd::DiskType::Fixed)
        && f.current_size == vsize)
}

/// Identifies the source of an upload: sizes, the allocation map, and each layer file's length
/// and modification time, or a remote layer's location and size (MD5, hex).
fn fingerprint(src: &mut Chain, size: u64, vsize: u64) -> Result<String> {
    let mut h = Md5::new();
    h.update(b"vhdkit-upload-1");
    h.update(size.to_le_bytes());
    h.update(vsize.to_le_bytes());
    for layer in src.stack() {
        // A remote layer (an NBD export) has no file: its location and size stand for it.
        let Some(file) = layer.file() else {
            h.update(layer.path().as_os_str().as_encoded_bytes());
            h.update(layer.size().to_le_bytes());
            continue;
        };
        let m = file
            .metadata()
            .with_context(|| format!("{}: stat", layer.path().display()))?;
        h.update(m.len().to_le_bytes());
        let mtime = m
            .modified()
            .ok()
            .and_then(|t| t.duration_since(std::time::UNIX_EPOCH).ok())
            .map_or(0, |d| d.as_nanos());
        h.update(mtime.to_le_bytes());
    }
    let mut window = 0;
    while window < size {
        let wlen = (size - window).min(MAP_WINDOW);
        for e in src.map(window, wlen)? {
            h.update(e.offset.to_le_bytes());
            h.update(e.length.to_le_bytes());
            h.update([u8::from(e.data), u8::from(e.zero)]);
        }
        window += wlen;
    }
    Ok(h.finalize().iter().map(|b| format!("{b:02x}")).collect())
}

/// What the data phase did.
#[derive(Default)]
struct Stats {
    sent_bytes: u64,
    requests: u64,
    skipped_bytes: u64,
}

/// Sends every non-zero run of the source (not covered already, when resuming) with
/// `parallel` workers; returns once all are acknowledged or one failed for good.
fn send_data(
    src: &mut Chain,
    blob: &PageBlob,
    size: u64,
    parallel: usize,
    resume: bool,
    progress: &mut Progress,
) -> Result<Stats> {
    let (tx, rx) = mpsc::sync_channel::<(u64, Vec<u8>)>(1);
    let rx = Mutex::new(rx);
    let failed = AtomicBool::new(false);
    let error: Mutex<Option<BlobError>> = Mutex::new(None);
    let (sent, requests) = (AtomicU64::new(0), AtomicU64::new(0));
    let mut skipped = 0;
    let produced = std::thread::scope(|s| -> Result<()> {
        for _ in 0..parallel {
            s.spawn(|| loop {
                let job = rx.lock().map(|r| r.recv());
                let Ok(Ok((off, data))) = job else { return };
                // After a failure the queue is only drained, so the reader never blocks.
                if failed.load(Ordering::Relaxed) {
                    continue;
                }
                match blob.put_pages(off, &data) {
                    Ok(()) => {
                        sent.fetch_add(data.len() as u64, Ordering::Relaxed);
                        requests.fetch_add(1, Ordering::Relaxed);
                    }
                    Err(e) => {
                        failed.store(true, Ordering::Relaxed);
                        error
                            .lock()
                            .unwrap_or_else(|p| p.into_inner())
                            .get_or_insert(e);
                    }
                }
            });
        }
        let r = read_runs(
            src,
            blob,
            size,
            resume,
            progress,
            &failed,
            &mut skipped,
            &tx,
        );
        drop(tx);
        r
    });
    if let Some(e) = error.into_inner().unwrap_or_else(|p| p.into_inner()) {
        return Err(e.into());
    }
    produced?;
    Ok(Stats {
        sent_bytes: sent.into_inner(),
        requests: requests.into_inner(),
        skipped_bytes: skipped,
    })
}

/// The reading side of [`send_data`]: queues `(offset, bytes)` for every run to send.
#[allow(clippy::too_many_arguments)]
fn read_runs(
    src: &mut Chain,
    blob: &PageBlob,
    size: u64,
    resume: bool,
    progress: &mut Progress,
    failed: &AtomicBool,
    skipped: &mut u64,
    tx: &mpsc::SyncSender<(u64, Vec<u8>)>,
) -> Result<()> {
    let chunk = MAX_PAGE_WRITE as u64;
    let mut buf = AlignedBuf::new(MAX_PAGE_WRITE);
    let mut window = 0;
    while window < size {
        let wlen = (size - window).min(MAP_WINDOW);
        let done = if resume {
            blob.page_ranges(window, window + wlen)?
        } else {
            PageRanges::default()
        };
        for e in src.map(window, wlen)? {
            if e.zero && !e.data {
                progress.inc(e.length);
                continue;
            }
            let mut pos = e.offset;
            while pos < e.end() {
                if failed.load(Ordering::Relaxed) {
                    return Ok(());
                }
                let next = ((pos / chunk + 1) * chunk).min(e.end());
                buf.resize((next - pos) as usize);
                src.read_at(&mut buf, pos)?;
                for (s, e) in nonzero_runs(&buf, pos) {
                    if resume && covered(&done, s, e - s) {
                        *skipped += e - s;
                        continue;
                    }
                    let bytes = buf[(s - pos) as usize..(e - pos) as usize].to_vec();
                    if tx.send((s, bytes)).is_err() {
                        return Ok(());
                    }
                }
                progress.inc(next - pos);
                pos = next;
            }
        }
        window += wlen;
    }
    // The padding up to the whole MiB is zero: never sent.
    Ok(())
}

/// The runs `[start, end)` of `buf` (holding bytes from virtual `offset`) that are not made of
/// whole zero granules; granules are aligned on the disk, so runs start and end on 512 bytes
/// as long as `offset` and the buffer's end do.
fn nonzero_runs(buf: &[u8], offset: u64) -> Vec<(u64, u64)> {
    let g = GRANULE as u64;
    let end = offset + buf.len() as u64;
    let mut runs: Vec<(u64, u64)> = Vec::new();
    let mut pos = offset;
    while pos < end {
        let g_end = ((pos / g + 1) * g).min(end);
        if !is_zero(&buf[(pos - offset) as usize..(g_end - offset) as usize]) {
            match runs.last_mut() {
                Some(last) if last.1 == pos => last.1 = g_end,
                _ => runs.push((pos, g_end)),
            }
        }
        pos = g_end;
    }
    runs
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn nonzero_runs_skip_whole_zero_granules_only() {
        let mut buf = vec![0u8; 5 * GRANULE];
        buf[10] = 1;
        buf[2 * GRANULE + 4000] = 1;
        buf[3 * GRANULE] = 1;
        assert_eq!(
            nonzero_runs(&buf, 1 << 20),
            vec![
                ((1 << 20), (1 << 20) + 4096),
                ((1 << 20) + 8192, (1 << 20) + 16384)
            ]
        );
        // Granules are aligned on the disk, not on the buffer.
        let buf = vec![1u8; 1024];
        assert_eq!(nonzero_runs(&buf, 3584), vec![(3584, 4608)]);
        assert!(nonzero_runs(&[0u8; 8192], 0).is_empty());
    }
}
