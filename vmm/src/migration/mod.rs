//! Live migration: `vhdtool vm migrate --api-socket PATH tcp:HOST:PORT` on the running VM
//! (the source) and `vhdtool boot --incoming tcp:HOST:PORT` (the target). Disks are on shared
//! storage: the target opens the same paths.
//!
//! ```text
//!  source (main thread of the VMM)                 target
//!  connect ─────────── header ⇄ header ──────────── accept; refuse another version
//!  Config (memory, vCPUs, cmdline, transport, disks) ─>  validate, allocate memory
//!  dirty logging on (KVM + device marks)
//!  pass 0: every non-zero page ──────── Pages ───>  write into guest memory
//!  pass i: pages dirtied since pass i-1 ─ Pages/Zero ─>
//!     … until the dirty set fits --downtime-ms at the measured bandwidth (or MAX_PASSES)
//!  pause vCPUs, stop disk workers (drain, flush)
//!  last dirty set + used rings ─── Pages/Zero ───>
//!  VM state (vmstate.bin container) ─ State ─────>  decode, check; build the VM but its
//!  close every disk (image locks released)           disks (vCPUs: CPUID checked, state set)
//!  DisksReleased ───────────────────────────────>  open the disks
//!                 <─────────────────────── Ready
//!  Go ──────────────────────────────────────────>  start vCPUs and disk workers
//!  reply ok, VMM exits 0
//! ```
//!
//! Invariants: the target opens no image before `DisksReleased` and runs nothing before `Go`;
//! the source gives the VM up only after `Ready` came and `Go` was written. Anything else
//! (the stream breaks, a peer reports `Failed`, a timeout) before that makes the source undo
//! what it did (reopen the disks, restart their workers, dirty logging off, resume) and
//! `migrate` fail naming the cause; a target that does not get `Go` exits non-zero without
//! running the guest. The only ambiguity left is a `Go` that the source wrote but the target
//! never read: then neither runs the guest, which is safe for its disks.
//!
//! Device writes into guest memory (virtio-blk read data, status bytes) bypass KVM's dirty
//! log; the devices report them ([`block_backend::virtio_blk::VirtioBlk::set_dirty_hook`]),
//! and the used rings are sent again while paused.

mod dirty;
mod source;
pub mod stream;
mod target;

pub use target::incoming;

use std::net::{SocketAddr, ToSocketAddrs};

use crate::{Error, Result};

/// `tcp:HOST:PORT` → the socket addresses it names.
pub fn parse_tcp(uri: &str) -> Result<Vec<SocketAddr>> {
    let Some(hostport) = uri.strip_prefix("tcp:") else {
        return Err(Error::Config(format!(
            "migration address {uri:?}: expected tcp:HOST:PORT"
        )));
    };
    let addrs: Vec<SocketAddr> = hostport
        .to_socket_addrs()
        .map_err(|e| Error::Config(format!("migration address {uri:?}: {e}")))?
        .collect();
    if addrs.is_empty() {
        return Err(Error::Config(format!(
            "migration address {uri:?}: the name resolves to no address"
        )));
    }
    Ok(addrs)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn migration_addresses_must_be_tcp_host_port() {
        assert_eq!(
            parse_tcp("tcp:127.0.0.1:4444").unwrap()[0],
            "127.0.0.1:4444".parse().unwrap()
        );
        assert!(parse_tcp("tcp:[::1]:5").is_ok());
        for bad in [
            "127.0.0.1:4444",
            "unix:/x",
            "tcp:nohost",
            "tcp:1.2.3.4:99999",
        ] {
            assert!(parse_tcp(bad).is_err(), "{bad}");
        }
    }
}
