//! The reference engine: each request runs to completion inside `submit` through the
//! [`Disk`](crate::Disk) API, under one lock of the chain. Guest memory is staged through a
//! bounce buffer (read into it, then copied out; copied in, then written), so a request of
//! many guest ranges is still one chain call: planned once, committed once.

use std::os::fd::RawFd;
use std::sync::MutexGuard;

use super::{lock_chain, run_on_chain, Engine, IoCompletion, IoRequest, SharedChain};
use crate::{AlignedBuf, Chain, Result};

/// Runs requests synchronously.
#[derive(Debug)]
pub struct SyncEngine {
    chain: SharedChain,
    done: Vec<IoCompletion>,
    /// Staging for guest memory, kept between requests.
    bounce: AlignedBuf,
}

impl SyncEngine {
    /// An engine over `chain`.
    pub fn new(chain: SharedChain) -> SyncEngine {
        SyncEngine {
            chain,
            done: Vec::new(),
            bounce: AlignedBuf::new(0),
        }
    }
}

impl Engine for SyncEngine {
    fn submit(&mut self, mut req: IoRequest) -> Result<()> {
        let result = run_on_chain(&mut lock_chain(&self.chain), &mut req, &mut self.bounce);
        self.done.push(IoCompletion {
            tag: req.tag,
            result,
            buf: req.buf,
        });
        Ok(())
    }

    fn kick(&mut self) -> Result<()> {
        Ok(())
    }

    fn reap(&mut self, _min: usize, out: &mut Vec<IoCompletion>) -> Result<()> {
        out.append(&mut self.done);
        Ok(())
    }

    fn in_flight(&self) -> usize {
        self.done.len()
    }

    fn chain(&self) -> MutexGuard<'_, Chain> {
        lock_chain(&self.chain)
    }

    fn completion_fd(&mut self) -> Result<Option<RawFd>> {
        Ok(None)
    }

    fn name(&self) -> String {
        "sync".into()
    }
}
