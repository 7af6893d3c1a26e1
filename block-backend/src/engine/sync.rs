//! The reference engine: each request runs to completion inside `submit` through the
//! [`Disk`] API.

use std::os::fd::RawFd;
use std::sync::MutexGuard;

use super::{lock_chain, run_on_chain, Engine, IoCompletion, IoRequest, SharedChain};
use crate::{Chain, Result};

/// Runs requests synchronously.
#[derive(Debug)]
pub struct SyncEngine {
    chain: SharedChain,
    done: Vec<IoCompletion>,
}

impl SyncEngine {
    /// An engine over `chain`.
    pub fn new(chain: SharedChain) -> SyncEngine {
        SyncEngine {
            chain,
            done: Vec::new(),
        }
    }
}

impl Engine for SyncEngine {
    unsafe fn submit(&mut self, req: IoRequest) -> Result<()> {
        // SAFETY: the caller's guarantee for `req.buf` (Engine::submit contract) is the one
        // `run_on_chain` asks for.
        let result = unsafe { run_on_chain(&mut lock_chain(&self.chain), &req) };
        self.done.push(IoCompletion {
            tag: req.tag,
            result,
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
