//! `vhdtool bench [--json] [--rw read|randread|write|randwrite] [--bs 4k] [--iodepth 32]
//! [--runtime SECS] [--engine io_uring|sync] IMAGE`
//!
//! Drives the block backend's engines like fio or `qemu-img bench`: keeps `iodepth` requests
//! in flight, each `bs` bytes at aligned offsets (sequential or from a fixed-seed xorshift
//! generator), for `runtime` seconds, and reports IOPS, bandwidth and latency percentiles.
//! Write modes write to the image (as `qemu-img bench -w` does) and flush at the end.

use std::path::PathBuf;
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use block_backend::engine::{new_engine, EngineKind, IoCompletion, IoKind, IoRequest};
use block_backend::{Disk, OpenOptions};
use serde::Serialize;

use crate::size::parse_size;

/// Access pattern.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum Rw {
    /// Sequential reads.
    Read,
    /// Random reads.
    Randread,
    /// Sequential writes.
    Write,
    /// Random writes.
    Randwrite,
}

/// Engine on the command line.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum EngineArg {
    /// io_uring (O_DIRECT where possible).
    #[value(name = "io_uring")]
    IoUring,
    /// pread/pwrite.
    Sync,
}

/// Arguments of `bench`.
#[derive(Debug, clap::Args)]
pub struct Args {
    /// Print JSON.
    #[arg(long)]
    pub json: bool,
    /// Access pattern.
    #[arg(long, value_enum, default_value = "randread")]
    pub rw: Rw,
    /// Request size.
    #[arg(long, value_parser = parse_size, default_value = "4K")]
    pub bs: u64,
    /// Requests kept in flight.
    #[arg(long, default_value_t = 32)]
    pub iodepth: usize,
    /// Seconds to run.
    #[arg(long, default_value_t = 5.0)]
    pub runtime: f64,
    /// Engine.
    #[arg(long, value_enum, default_value = "io_uring")]
    pub engine: EngineArg,
    /// The image (any format; chains included).
    pub image: PathBuf,
}

/// What `bench --json` prints.
#[derive(Debug, Serialize)]
#[serde(rename_all = "kebab-case")]
pub struct Report {
    /// Engine used, with its I/O mode.
    pub engine: String,
    /// Access pattern.
    pub rw: String,
    /// Request size.
    pub bs: u64,
    /// Requests in flight.
    pub iodepth: usize,
    /// Requests completed.
    pub requests: u64,
    /// Seconds measured.
    pub seconds: f64,
    /// Requests per second.
    pub iops: f64,
    /// Bytes per second.
    pub bandwidth: f64,
    /// Median latency in microseconds.
    pub lat_p50_us: f64,
    /// 99th percentile latency in microseconds.
    pub lat_p99_us: f64,
}

/// A heap buffer aligned for O_DIRECT.
struct Aligned {
    storage: Vec<u8>,
    start: usize,
}

impl Aligned {
    fn new(len: usize) -> Aligned {
        let storage = vec![0xA5u8; len + 4096];
        let start = storage.as_ptr().align_offset(4096);
        Aligned { storage, start }
    }
    fn ptr(&mut self) -> *mut u8 {
        self.storage[self.start..].as_mut_ptr()
    }
}

/// Runs `bench`.
pub fn run(a: &Args) -> Result<u8> {
    if a.bs == 0 || a.bs > 64 << 20 || a.iodepth == 0 || a.iodepth > 1024 || !(a.runtime > 0.0) {
        bail!("--bs must be 1..64M, --iodepth 1..1024, --runtime positive");
    }
    let write = matches!(a.rw, Rw::Write | Rw::Randwrite);
    let opts = if write {
        OpenOptions::read_write()
    } else {
        OpenOptions::read_only()
    };
    let chain = block_backend::open(&a.image, opts)
        .with_context(|| format!("cannot open {}", a.image.display()))?;
    let size = chain.size();
    let bs = a.bs;
    if size < bs {
        bail!("image of {size} bytes is smaller than one {bs}-byte request");
    }
    let slots = size / bs;
    let kind = match a.engine {
        EngineArg::IoUring => EngineKind::IoUring,
        EngineArg::Sync => EngineKind::Sync,
    };
    let mut engine = new_engine(kind, chain, a.iodepth)?;
    let mut bufs: Vec<Aligned> = (0..a.iodepth).map(|_| Aligned::new(bs as usize)).collect();
    let mut started: Vec<Instant> = vec![Instant::now(); a.iodepth];
    let mut free: Vec<usize> = (0..a.iodepth).collect();
    let mut lat: Vec<u32> = Vec::new();
    let mut rng = 0x9E37_79B9_7F4A_7C15u64;
    let mut next_seq = 0u64;
    let random = matches!(a.rw, Rw::Randread | Rw::Randwrite);
    let op = if write { IoKind::Write } else { IoKind::Read };
    let t0 = Instant::now();
    let deadline = t0 + Duration::from_secs_f64(a.runtime);
    let mut done: Vec<IoCompletion> = Vec::new();
    let mut requests = 0u64;
    loop {
        let now = Instant::now();
        if now < deadline {
            while let Some(slot) = free.pop() {
                let n = if random {
                    rng ^= rng << 13;
                    rng ^= rng >> 7;
                    rng ^= rng << 17;
                    rng % slots
                } else {
                    let n = next_seq % slots;
                    next_seq += 1;
                    n
                };
                started[slot] = Instant::now();
                let req = IoRequest {
                    tag: slot as u64,
                    kind: op,
                    offset: n * bs,
                    buf: bufs[slot].ptr(),
                    len: bs as usize,
                };
                // SAFETY: buffer `slot` is used by no other request until this one's completion
                // is reaped (the slot only returns to `free` then), and `bufs` outlives the
                // engine's use of it: every request is reaped before the loop ends.
                unsafe { engine.submit(req) }?;
            }
            engine.kick()?;
        } else if engine.in_flight() == 0 {
            break;
        }
        engine.reap(1, &mut done)?;
        for c in done.drain(..) {
            c.result
                .with_context(|| format!("request {} failed", c.tag))?;
            let slot = c.tag as usize;
            lat.push(started[slot].elapsed().as_micros().min(u32::MAX as u128) as u32);
            free.push(slot);
            requests += 1;
        }
    }
    let seconds = t0.elapsed().as_secs_f64();
    if write {
        engine.chain().flush()?;
    }
    lat.sort_unstable();
    let pct = |p: f64| -> f64 {
        lat.get(((lat.len() as f64 * p) as usize).min(lat.len().saturating_sub(1)))
            .map_or(0.0, |&v| v as f64)
    };
    let report = Report {
        engine: engine.name(),
        rw: format!("{:?}", a.rw).to_lowercase(),
        bs,
        iodepth: a.iodepth,
        requests,
        seconds,
        iops: requests as f64 / seconds,
        bandwidth: (requests * bs) as f64 / seconds,
        lat_p50_us: pct(0.50),
        lat_p99_us: pct(0.99),
    };
    if a.json {
        println!("{}", serde_json::to_string_pretty(&report)?);
    } else {
        println!(
            "{}: {} bs={} iodepth={} engine={}\n  {} requests in {:.2} s: {:.0} IOPS, {:.1} MiB/s, latency p50 {:.0} us, p99 {:.0} us",
            a.image.display(),
            report.rw,
            bs,
            a.iodepth,
            report.engine,
            requests,
            seconds,
            report.iops,
            report.bandwidth / (1 << 20) as f64,
            report.lat_p50_us,
            report.lat_p99_us
        );
    }
    Ok(0)
}
