//! nbd: an NBD (Network Block Device) server for one virtual disk — raw, VHD, VHDX or a
//! differencing chain — as `vhdtool serve` runs it.
//!
//! ```text
//!   client (nbdinfo, nbdcopy, qemu, the kernel) ──unix/tcp──> server.rs  accept, ≤ N connections
//!                                                              │
//!                            negotiate.rs: fixed newstyle options (GO, INFO, LIST,
//!                            STRUCTURED_REPLY, SET/LIST_META_CONTEXT, STARTTLS ─> tls.rs)
//!                                                              │
//!                            transmission.rs: READ WRITE(FUA) FLUSH TRIM CACHE
//!                            WRITE_ZEROES(NO_HOLE, FAST_ZERO) BLOCK_STATUS(base:allocation)
//!                                                              │
//!                            protocol.rs: every message length-checked and parsed before use
//!                                                              ▼
//!                                  block_backend::SharedDisk (one per server, all connections)
//! ```
//!
//! Invariants:
//! - Bytes from a client are untrusted: every length is bounded before anything is allocated
//!   for it (options [`protocol::MAX_OPTION_LEN`], payloads [`protocol::MAX_PAYLOAD`]), and
//!   bad input ends in an NBD error reply or a closed connection, never a panic; other
//!   connections keep being served.
//! - The image is reached only through [`block_backend::SharedDisk`]: a differencing child
//!   takes the writes, its parents are never written, a read-only export never writes.
//! - A reply to `FLUSH` (or to a write with `FUA`) is sent only after every write completed
//!   before it, on any connection, is durable.

#![warn(missing_docs)]

pub mod error;
pub mod io;
pub mod negotiate;
pub use nbd_proto::protocol;
pub mod raw_client;
pub mod server;
pub mod tls;
pub mod transmission;

pub use error::{Error, Result};
pub use nbd_proto::ImageIdentity;
pub use server::{Export, Server, ServerConfig, Stream};
pub use tls::TlsConfig;
