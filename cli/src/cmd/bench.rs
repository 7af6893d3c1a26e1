//! `vhdtool bench [--json] [--rw read|randread|write|randwrite] [--bs 4k] [--iodepth 32]
//! [--batch N] [--runtime SECS] [--engine io_uring|sync] [--through virtio] IMAGE`
//!
//! Drives the block backend's engines like fio or `qemu-img bench`: keeps `iodepth` requests
//! in flight, each `bs` bytes at aligned offsets (sequential or from a fixed-seed xorshift
//! generator), for `runtime` seconds, and reports IOPS, bandwidth and latency percentiles.
//! Write modes write to the image (as `qemu-img bench -w` does) and flush at the end.
//! `--through virtio` puts the virtio-blk device model in the path: an in-process driver
//! writes descriptor chains into guest memory, the device validates and serves them.

use std::path::PathBuf;
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use block_backend::engine::{new_engine, EngineKind, IoCompletion, IoRequest};
use block_backend::{AlignedBuf, Disk, OpenOptions};
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
    /// Requests handed to the kernel per submission (like fio's `iodepth_batch_submit`, whose
    /// default is also 1: each request starts as soon as its slot frees). Larger batches spend
    /// fewer system calls per request; on a virtual disk they can lower IOPS.
    #[arg(long, default_value_t = 1, value_parser = clap::value_parser!(u32).range(1..))]
    pub batch: u32,
    /// Seconds to run.
    #[arg(long, default_value_t = 5.0)]
    pub runtime: f64,
    /// Engine.
    #[arg(long, value_enum, default_value = "io_uring")]
    pub engine: EngineArg,
    /// Measure through the virtio-blk device model (`virtio`) instead of the engine directly.
    #[arg(long, value_parser = ["virtio"])]
    pub through: Option<String>,
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
    /// Requests per submission.
    pub batch: u32,
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

/// Runs `bench`.
pub fn run(a: &Args) -> Result<u8> {
    if a.bs == 0
        || a.bs > 64 << 20
        || a.iodepth == 0
        || a.iodepth > 1024
        || !a.runtime.is_finite()
        || a.runtime <= 0.0
    {
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
    let engine = new_engine(kind, chain, a.iodepth)?;
    let run = if a.through.is_some() {
        run_virtio(a, engine, slots)?
    } else {
        run_engine(a, engine, slots)?
    };
    report(a, run)
}

/// What a run measured.
struct Run {
    engine: String,
    requests: u64,
    seconds: f64,
    lat: Vec<u32>,
}

/// Next request slot: sequential, or from a fixed-seed xorshift generator.
struct Offsets {
    random: bool,
    rng: u64,
    next: u64,
    slots: u64,
}

impl Offsets {
    fn new(a: &Args, slots: u64) -> Offsets {
        Offsets {
            random: matches!(a.rw, Rw::Randread | Rw::Randwrite),
            rng: 0x9E37_79B9_7F4A_7C15,
            next: 0,
            slots,
        }
    }
    fn next(&mut self) -> u64 {
        if self.random {
            self.rng ^= self.rng << 13;
            self.rng ^= self.rng >> 7;
            self.rng ^= self.rng << 17;
            self.rng % self.slots
        } else {
            let n = self.next % self.slots;
            self.next += 1;
            n
        }
    }
}

fn run_engine(
    a: &Args,
    mut engine: Box<dyn block_backend::engine::Engine>,
    slots: u64,
) -> Result<Run> {
    let bs = a.bs;
    let write = matches!(a.rw, Rw::Write | Rw::Randwrite);
    // Slot `i`'s buffer: with the engine while its request is in flight, back here after.
    let mut bufs: Vec<Option<AlignedBuf>> = (0..a.iodepth)
        .map(|_| {
            let mut b = AlignedBuf::new(bs as usize);
            b.fill(0xA5); // written data is not zeros, in case anything below skips those
            Some(b)
        })
        .collect();
    let mut started: Vec<Instant> = vec![Instant::now(); a.iodepth];
    let mut free: Vec<usize> = (0..a.iodepth).collect();
    let mut lat: Vec<u32> = Vec::new();
    let mut offsets = Offsets::new(a, slots);
    let t0 = Instant::now();
    let deadline = t0 + Duration::from_secs_f64(a.runtime);
    let mut done: Vec<IoCompletion> = Vec::new();
    let mut requests = 0u64;
    // Submitted but not yet handed to the kernel; `reap` hands over the rest when it waits.
    let mut queued = 0u32;
    loop {
        let now = Instant::now();
        if now < deadline {
            while let Some(slot) = free.pop() {
                let n = offsets.next();
                started[slot] = Instant::now();
                let buf = bufs[slot].take().context("slot buffer in flight")?;
                let req = if write {
                    IoRequest::write(slot as u64, n * bs, buf)
                } else {
                    IoRequest::read(slot as u64, n * bs, buf)
                };
                engine.submit(req)?;
                queued += 1;
                if queued >= a.batch {
                    engine.kick()?;
                    queued = 0;
                }
            }
        } else if engine.in_flight() == 0 {
            break;
        }
        engine.reap(1, &mut done)?;
        for c in done.drain(..) {
            c.result
                .with_context(|| format!("request {} failed", c.tag))?;
            let slot = c.tag as usize;
            bufs[slot] = c.buf.into_aligned();
            lat.push(started[slot].elapsed().as_micros().min(u32::MAX as u128) as u32);
            free.push(slot);
            requests += 1;
        }
    }
    let seconds = t0.elapsed().as_secs_f64();
    if write {
        engine.chain().flush()?;
    }
    Ok(Run {
        engine: engine.name(),
        requests,
        seconds,
        lat,
    })
}

/// Drives the virtio-blk device model with an in-process driver over guest memory: each
/// request is a three-descriptor chain (header, data, status) in its own slot.
fn run_virtio(a: &Args, engine: Box<dyn block_backend::engine::Engine>, slots: u64) -> Result<Run> {
    use block_backend::virtio_blk::{Config, VirtioBlk};
    use virtio_bindings::virtio_blk::{VIRTIO_BLK_S_OK, VIRTIO_BLK_T_IN, VIRTIO_BLK_T_OUT};
    use virtio_bindings::virtio_ring::{VRING_DESC_F_NEXT, VRING_DESC_F_WRITE};
    use virtio_queue::{Queue, QueueT};
    use vm_memory::{Address, Bytes, GuestAddress, GuestMemoryMmap};

    let bs = a.bs;
    let depth = a.iodepth.min(64);
    let write = matches!(a.rw, Rw::Write | Rw::Randwrite);
    let name = format!("{} via virtio-blk", engine.name());
    // Rings in the first MiB, headers and status bytes at 1 MiB, data 4 KiB-aligned after.
    let data_base = 2u64 << 20;
    let mem_size = data_base + depth as u64 * bs.next_multiple_of(4096);
    let mem = GuestMemoryMmap::<()>::from_ranges(&[(GuestAddress(0), mem_size as usize)])
        .context("guest memory")?;
    // A 256-entry split ring laid out as a driver would: descriptor table (16 B each), available
    // ring (flags, idx, 256 heads), used ring (flags, idx, 256 8-byte elements), each aligned.
    const RING: u16 = 256;
    let desc_table = GuestAddress(0);
    let avail = GuestAddress(u64::from(RING) * 16);
    let used_ring = GuestAddress(8192);
    let mut queue = Queue::new(RING).context("virtqueue")?;
    let halves = |a: GuestAddress| (Some(a.0 as u32), Some((a.0 >> 32) as u32));
    let (lo, hi) = halves(desc_table);
    queue.set_desc_table_address(lo, hi);
    let (lo, hi) = halves(avail);
    queue.set_avail_ring_address(lo, hi);
    let (lo, hi) = halves(used_ring);
    queue.set_used_ring_address(lo, hi);
    queue.set_ready(true);
    if !queue.is_valid(&mem) {
        bail!("the bench's virtqueue layout does not fit its guest memory");
    }
    let mut dev = VirtioBlk::new(
        vec![engine],
        mem.clone(),
        vec![queue],
        Config {
            id: "vhdtool-bench".into(),
        },
        Box::new(|_| {}),
    )?;
    dev.set_acked_features(dev.device_features());
    let hdr = |slot: usize| GuestAddress((1 << 20) + slot as u64 * 32);
    let status = |slot: usize| GuestAddress((1 << 20) + slot as u64 * 32 + 16);
    let data = |slot: usize| GuestAddress(data_base + slot as u64 * bs.next_multiple_of(4096));
    let mut offsets = Offsets::new(a, slots);
    let mut started = vec![Instant::now(); depth];
    let mut lat = Vec::new();
    let mut free: Vec<usize> = (0..depth).collect();
    let mut used_seen = 0u16;
    let mut avail_idx = 0u16;
    let mut requests = 0u64;
    let mut published = 0u32;
    let t0 = Instant::now();
    let deadline = t0 + Duration::from_secs_f64(a.runtime);
    let kind = if write {
        VIRTIO_BLK_T_OUT
    } else {
        VIRTIO_BLK_T_IN
    };
    let (n, w) = (VRING_DESC_F_NEXT as u16, VRING_DESC_F_WRITE as u16);
    let data_flags = n | if write { 0 } else { w };
    for slot in 0..depth {
        mem.write_obj(kind, hdr(slot))?;
        mem.write_obj(0u32, hdr(slot).unchecked_add(4))?;
        let first = slot as u16 * 3;
        for (i, (addr, len, flags)) in [
            (hdr(slot).0, 16, n),
            (data(slot).0, bs as u32, data_flags),
            (status(slot).0, 1, w),
        ]
        .into_iter()
        .enumerate()
        {
            let at = desc_table.unchecked_add(u64::from(first + i as u16) * 16);
            mem.write_obj(addr, at)?;
            mem.write_obj(len, at.unchecked_add(8))?;
            mem.write_obj(flags, at.unchecked_add(12))?;
            mem.write_obj(first + i as u16 + 1, at.unchecked_add(14))?;
        }
    }
    loop {
        if Instant::now() < deadline && !free.is_empty() {
            for slot in free.drain(..) {
                // The slot's descriptors and header type were written once, before the loop
                // (as a driver reusing its descriptors would): only the sector changes.
                let sector = offsets.next() * bs / 512;
                mem.write_obj(sector, hdr(slot).unchecked_add(8))?;
                let first = slot as u16 * 3;
                // Publish the chain in the available ring, which wraps.
                mem.write_obj(
                    first,
                    avail.unchecked_add(4 + u64::from(avail_idx % 256) * 2),
                )?;
                avail_idx = avail_idx.wrapping_add(1);
                mem.write_obj(avail_idx, avail.unchecked_add(2))?;
                started[slot] = Instant::now();
                // The driver notifies the device every `batch` requests.
                published += 1;
                if published >= a.batch {
                    dev.process_queue(0)?;
                    published = 0;
                }
            }
            if published > 0 {
                dev.process_queue(0)?;
                published = 0;
            }
        } else if dev.pending() == 0 {
            break;
        }
        dev.process_completions(true)?;
        let used: u16 = mem.read_obj(used_ring.unchecked_add(2))?;
        while used_seen != used {
            let id: u32 =
                mem.read_obj(used_ring.unchecked_add(4 + u64::from(used_seen % 256) * 8))?;
            let slot = (id / 3) as usize;
            if slot >= depth {
                bail!("device returned an unknown descriptor head {id}");
            }
            let s: u8 = mem.read_obj(status(slot))?;
            if u32::from(s) != VIRTIO_BLK_S_OK {
                bail!("request in slot {slot} failed with virtio status {s}");
            }
            lat.push(started[slot].elapsed().as_micros().min(u32::MAX as u128) as u32);
            free.push(slot);
            requests += 1;
            used_seen = used_seen.wrapping_add(1);
        }
    }
    let seconds = t0.elapsed().as_secs_f64();
    if write {
        dev.flush()?;
    }
    Ok(Run {
        engine: name,
        requests,
        seconds,
        lat,
    })
}

fn report(a: &Args, run: Run) -> Result<u8> {
    let Run {
        engine,
        requests,
        seconds,
        mut lat,
    } = run;
    let bs = a.bs;
    lat.sort_unstable();
    let pct = |p: f64| -> f64 {
        lat.get(((lat.len() as f64 * p) as usize).min(lat.len().saturating_sub(1)))
            .map_or(0.0, |&v| v as f64)
    };
    let report = Report {
        engine,
        rw: format!("{:?}", a.rw).to_lowercase(),
        bs,
        iodepth: a.iodepth,
        batch: a.batch,
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
            "{}: {} bs={} iodepth={} batch={} engine={}\n  {} requests in {:.2} s: {:.0} IOPS, {:.1} MiB/s, latency p50 {:.0} us, p99 {:.0} us",
            a.image.display(),
            report.rw,
            bs,
            a.iodepth,
            a.batch,
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
