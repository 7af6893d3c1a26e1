//! The reference engine: each request runs to completion inside `submit` through the
//! [`Disk`] API.

use std::os::fd::RawFd;
use std::sync::MutexGuard;

use super::{lock_chain, Engine, IoCompletion, IoKind, IoRequest, SharedChain};
use crate::{Chain, Disk, Result};

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
        let mut chain = lock_chain(&self.chain);
        let result = match req.kind {
            IoKind::Read => {
                // SAFETY: the caller guarantees `buf` is valid for `len` bytes and unaliased
                // until the completion (Engine::submit contract).
                let buf = unsafe { std::slice::from_raw_parts_mut(req.buf, req.len) };
                chain.read_at(buf, req.offset)
            }
            IoKind::Write => {
                // SAFETY: as above; the buffer is only read.
                let buf = unsafe { std::slice::from_raw_parts(req.buf, req.len) };
                chain.write_at(buf, req.offset)
            }
            IoKind::Flush => chain.flush(),
            IoKind::Discard => chain.discard(req.offset, req.len as u64),
            IoKind::WriteZeroes => chain.write_zeroes(req.offset, req.len as u64),
        };
        drop(chain);
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
