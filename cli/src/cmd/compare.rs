//! `vhdtool compare A B`: are two disks' contents equal? (like `qemu-img compare`)
//!
//! Exit 0 "Images are identical.", 1 "Content mismatch at offset N!" (N = first differing byte),
//! 2 on error. Images of different sizes are compared over the common part; the rest of the
//! larger one must read as zeros. Ranges both maps call zero are not read.

use std::path::PathBuf;

use anyhow::{bail, Result};
use block_backend::{AlignedBuf, Chain, Disk, MapExtent};

use super::{open_read_only, CHUNK, MAP_WINDOW};

/// Arguments of `compare`.
#[derive(Debug, clap::Args)]
pub struct Args {
    #[command(flatten)]
    pub share: super::ShareArgs,
    /// Print the result as JSON (`identical`, `size-mismatch`, `first-difference`).
    #[arg(long)]
    pub json: bool,
    /// First image.
    pub a: PathBuf,
    /// Second image.
    pub b: PathBuf,
}

/// Runs `compare`.
pub fn run(args: &Args) -> Result<u8> {
    let mut a = open_read_only(&args.a, args.share)?;
    let mut b = open_read_only(&args.b, args.share)?;
    let (sa, sb) = (a.size(), b.size());
    if sa != sb && !args.json {
        println!("Warning: Image size mismatch!");
    }
    let common = sa.min(sb);
    let mismatch = match first_difference(&mut a, &mut b, common)? {
        Some(off) => Some(off),
        None if sa > sb => first_nonzero(&mut a, common, sa)?,
        None if sb > sa => first_nonzero(&mut b, common, sb)?,
        None => None,
    };
    if args.json {
        let v = serde_json::json!({
            "identical": mismatch.is_none(),
            "size-mismatch": sa != sb,
            "first-difference": mismatch,
        });
        println!("{}", serde_json::to_string_pretty(&v)?);
        return Ok(u8::from(mismatch.is_some()));
    }
    match mismatch {
        Some(off) => {
            println!("Content mismatch at offset {off}!");
            Ok(1)
        }
        None => {
            println!("Images are identical.");
            Ok(0)
        }
    }
}

fn is_hole(e: &MapExtent) -> bool {
    e.zero && !e.data
}

/// First offset below `len` where `a` and `b` differ.
fn first_difference(a: &mut Chain, b: &mut Chain, len: u64) -> Result<Option<u64>> {
    let mut buf_a = AlignedBuf::new(CHUNK as usize);
    let mut buf_b = AlignedBuf::new(CHUNK as usize);
    let mut window = 0;
    while window < len {
        let wend = (window + MAP_WINDOW).min(len);
        let (ma, mb) = (a.map(window, wend - window)?, b.map(window, wend - window)?);
        let (mut i, mut j, mut pos) = (0, 0, window);
        while pos < wend {
            let (Some(ea), Some(eb)) = (ma.get(i), mb.get(j)) else {
                bail!("internal error: map of [{window}, {wend}) ends early at {pos}");
            };
            let seg_end = ea.end().min(eb.end()).min(wend);
            if seg_end <= pos {
                bail!("internal error: map does not advance at {pos}");
            }
            let (za, zb) = (is_hole(ea), is_hole(eb));
            if !(za && zb) {
                let mut p = pos;
                while p < seg_end {
                    let next = ((p / CHUNK + 1) * CHUNK).min(seg_end);
                    let n = (next - p) as usize;
                    let (ra, rb) = (&mut buf_a[..n], &mut buf_b[..n]);
                    if za {
                        ra.fill(0);
                    } else {
                        a.read_at(ra, p)?;
                    }
                    if zb {
                        rb.fill(0);
                    } else {
                        b.read_at(rb, p)?;
                    }
                    if ra != rb {
                        let k = ra
                            .iter()
                            .zip(rb.iter())
                            .position(|(x, y)| x != y)
                            .unwrap_or(0);
                        return Ok(Some(p + k as u64));
                    }
                    p = next;
                }
            }
            pos = seg_end;
            if ea.end() <= pos {
                i += 1;
            }
            if eb.end() <= pos {
                j += 1;
            }
        }
        window = wend;
    }
    Ok(None)
}

/// First offset in `[from, to)` of `d` that is not zero.
fn first_nonzero(d: &mut Chain, from: u64, to: u64) -> Result<Option<u64>> {
    let mut buf = AlignedBuf::new(CHUNK as usize);
    let mut window = from;
    while window < to {
        let wend = window.saturating_add(MAP_WINDOW).min(to);
        for e in d.map(window, wend - window)? {
            if is_hole(&e) {
                continue;
            }
            let mut p = e.offset;
            while p < e.end() {
                let next = ((p / CHUNK + 1) * CHUNK).min(e.end());
                let b = &mut buf[..(next - p) as usize];
                d.read_at(b, p)?;
                if let Some(k) = b.iter().position(|&x| x != 0) {
                    return Ok(Some(p + k as u64));
                }
                p = next;
            }
        }
        window = wend;
    }
    Ok(None)
}
