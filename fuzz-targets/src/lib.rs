//! # vhdkit-fuzz-targets — the fuzz target bodies, as plain functions
//!
//! Each cargo-fuzz target in `fuzz/fuzz_targets/` is one line calling a function here, so the
//! same bodies run under libFuzzer (`cargo fuzz run <target>`) and in `cargo test`, which replays
//! every committed corpus and regression input (`fuzz/corpus/<target>/`,
//! `fuzz/regressions/<target>/`) without libFuzzer.
//!
//! ```text
//!   fuzz/fuzz_targets/<t>.rs ──┐                      ┌── fuzz/corpus/<t>/*       (minimized)
//!    (libFuzzer, nightly-ish)  ├─> vhdkit_fuzz_targets::<t>(&[u8]) <──┤
//!   tests/replay.rs ───────────┘      (this crate)    └── fuzz/regressions/<t>/* (crashes found)
//! ```
//!
//! | target         | input                                   | oracle beyond "no panic"              |
//! |----------------|-----------------------------------------|---------------------------------------|
//! | `vhd_open`     | a VHD file ([`sparse`] or raw)           | open ⇔ check finds no corruption; read-only never writes; data extents lie in the file; a write to a clean image reads back and keeps it clean |
//! | `vhdx_open`    | a VHDX file ([`sparse`] or raw)          | read-only never writes; data extents readable; a write reads back after a writable open and reopen, with no corruption |
//! | `vhdx_log`     | GUID + log region, or entries to build   | built entries replay to exactly their pages |
//! | `diff_pair`    | child + parent files (VHD or VHDX)       | the backend's chain read equals the layers composed by hand from the format crates; inputs unchanged |
//! | `write_oracle` | image kind + operations                 | every write reads back, before and after reopen; no corruption; every power cut keeps all flushed bytes |
//! | `nbd_server`   | mode byte + a client's byte stream       | the connection ends; the disk keeps its size; a read-only export is never written; the server greets first |
//! | `fs_free`      | a volume ([`sparse`] or raw): ext, NTFS, FAT, exFAT | free ranges ascending, disjoint, inside the volume, summing to `free`; forcing changes nothing a plain scan accepted |
//! | `migration_stream` | a live-migration stream (header, records)   | what decodes re-encodes to the same records; errors name the peer and an offset inside the input; state records go through the state decoder |
//! | `checkpoint_state` | flags + a checkpoint's manifest and VM state | what decodes re-encodes to the same manifest and state; errors name the folder and an offset inside the file they name |
//! | `virtio_blk`   | device config + driver operations       | used ring: popped heads only, each once, all once drained; valid statuses, OK exactly for well-formed requests; IN/OUT/DISCARD/WRITE_ZEROES/GET_ID against a flat disk model, and the reopened disk equals it; read-only never writes |
//!
//! Invariant: a target function panics only on a real bug (a panic inside the format crates, or
//! a broken oracle). Bad inputs are normal and end quietly.
#![forbid(unsafe_code)]
#![warn(missing_docs)]

mod bounded;
mod checkpoint_state;
mod diff_pair;
mod fs_free;
mod input;
mod migration_stream;
mod mutate;
mod nbd_server;
pub mod reseal;
pub mod sparse;
mod vhd_open;
mod vhdx_log;
mod vhdx_open;
mod virtio_blk;
mod write_oracle;

pub use bounded::BoundedFile;
pub use checkpoint_state::{checkpoint_parts, checkpoint_state};
pub use diff_pair::diff_pair;
pub use fs_free::fs_free;
pub use migration_stream::{migration_stream, migration_stream_seeds};
pub use mutate::mutations;
pub use nbd_server::{nbd_server, nbd_server_seeds};
pub use vhd_open::vhd_open;
pub use vhdx_log::vhdx_log;
pub use vhdx_open::vhdx_open;
pub use virtio_blk::{virtio_blk, virtio_blk_seeds};
pub use write_oracle::write_oracle;

/// A target body: takes one fuzz input, panics only on a bug.
pub type Target = fn(&[u8]);

/// Every target, by the name of its cargo-fuzz binary and corpus directory.
pub const TARGETS: &[(&str, Target)] = &[
    ("vhd_open", vhd_open),
    ("vhdx_open", vhdx_open),
    ("vhdx_log", vhdx_log),
    ("diff_pair", diff_pair),
    ("write_oracle", write_oracle),
    ("virtio_blk", virtio_blk),
    ("nbd_server", nbd_server),
    ("fs_free", fs_free),
    ("migration_stream", migration_stream),
    ("checkpoint_state", checkpoint_state),
];

/// Removes the scratch directories the file-based targets (`diff_pair`, `virtio_blk`) use in
/// this process.
pub fn cleanup() {
    diff_pair::cleanup();
    virtio_blk::cleanup();
    nbd_server::cleanup();
}

/// Creates this process's scratch directory `vhdkit-fuzz-<name>-<pid>`: in `/dev/shm` when there
/// is one (targets write every input to files), else in the temporary directory.
pub(crate) fn make_scratch_dir(name: &str) -> std::path::PathBuf {
    let shm = std::path::Path::new("/dev/shm");
    let base = if shm.is_dir() {
        shm.to_path_buf()
    } else {
        std::env::temp_dir()
    };
    let dir = base.join(format!("vhdkit-fuzz-{name}-{}", std::process::id()));
    std::fs::create_dir_all(&dir).expect("create the fuzz scratch directory");
    dir
}
