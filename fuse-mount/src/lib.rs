//! fuse-mount: a virtual disk (raw, VHD, VHDX, differencing chain) and each of its partitions
//! as plain files in a FUSE mount, read-write.
//!
//! ```text
//!   vhdtool mount IMAGE DIR ──> daemon.rs: prepare (open chain, scan table), fork, mount, serve
//!                                   │
//!   DIR/disk  DIR/p1  DIR/p5 …  <── fs.rs: FUSE requests (≤ 1 MiB, direct I/O, N threads)
//!                                   │          offset + partition start, bounds checked
//!                                   ▼
//!                 block_backend::Disk (one Chain behind a mutex): read_at / write_at / flush
//!                                   ▲
//!        block_backend::partitions: MBR (primaries, EBR chain of logicals) and GPT, untrusted input
//! ```
//!
//! Invariants:
//! - Every byte goes through the [`block_backend::Disk`] API: a differencing child allocates in
//!   itself and its parents are never written; a read-only mount opens the chain read-only (a
//!   dirty VHDX log is replayed in memory only) and refuses writes with `EROFS`.
//! - Files have the exact size of the disk or partition; nothing can read or write outside it.
//! - `fsync` on any file reaches [`block_backend::Disk::flush`]; unmounting (`vhdtool umount`,
//!   SIGTERM/SIGINT, `umount`) flushes before the daemon exits.
//! - A damaged partition table never stops the mount: the error is reported and only `disk` is
//!   shown. Parsing it never panics and never loops unboundedly.
//!
//! Concurrency: the [`block_backend::Disk`] trait takes `&mut self`, so one mutex guards the
//! disk; requests hold it only for the disk call itself while the kernel round trips of other
//! requests proceed on the other threads. `benches/fuse.sh` measures throughput and IOPS
//! against `vhdimount`.

pub mod daemon;
pub mod fs;
pub mod mapped;
pub mod spliced;

/// The partition table parser, now shared with `vhdtool compact --fs` in the block backend.
pub use block_backend::partitions;

pub use daemon::{prepare, unmount, MountError, MountOptions, Prepared, Unmounted};
