//! nbd-proto: the NBD wire format, `nbd://` URIs and a blocking NBD client, shared by the
//! server (crate `nbd`) and the block backend's NBD layer (which cannot depend on the server
//! crate: the server depends on the backend).
//!
//! ```text
//!   block-backend layer/nbd.rs ──> client.rs ──> protocol.rs <── nbd (server)
//!                                     │  uri.rs (libnbd URI forms)
//!                                     │  tls.rs (rustls, nbds://)
//!                                     └─ identity.rs (what vhdtool serve says about its image)
//! ```
//!
//! Invariants: everything a peer sends is length-checked before use and no allocation is
//! sized by a peer beyond the bounds in [`protocol`]; errors name the peer.

#![warn(missing_docs)]

pub mod client;
pub mod error;
pub mod identity;
pub mod protocol;
pub mod tls;
pub mod uri;

pub use client::{Client, ExportInfo};
pub use error::ClientError;
pub use identity::ImageIdentity;
pub use uri::{Endpoint, Uri, UriError};
