//! Pausing the vCPUs and running jobs on parked vCPUs (state save and restore).
//!
//! ```text
//!  main thread                         vCPU thread i
//!  pause(kick) ── paused = true ──>    leaves KVM_RUN (signal kick), completes its last
//!   kicks until parked == cpus         exit (KVM_RUN with immediate_exit), parked += 1,
//!                                      waits on the condvar
//!  run_on_all(job) ── jobs[i] ──>      runs job(&mut VcpuFd), reports through the job
//!  resume() ── paused = false ──>      parked -= 1, back to KVM_RUN
//! ```
//!
//! Invariants: jobs are only queued while every vCPU is parked; `stop` wakes parked vCPUs
//! for good; waits are bounded (a vCPU that does not park within [`PARK_TIMEOUT`] is an
//! error, never a hang).

use std::sync::{Condvar, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use kvm_ioctls::VcpuFd;

use crate::{Error, Result};

/// How long `pause` waits for every vCPU to park.
pub const PARK_TIMEOUT: Duration = Duration::from_secs(5);

/// Work for one parked vCPU.
pub type VcpuJob = Box<dyn FnOnce(&mut VcpuFd) + Send>;

struct Ctl {
    paused: bool,
    stop: bool,
    parked: usize,
    jobs: Vec<Option<VcpuJob>>,
}

/// Shared between the main thread and the vCPU threads.
pub struct RunControl {
    ctl: Mutex<Ctl>,
    cv: Condvar,
    cpus: usize,
}

impl RunControl {
    /// Control for `cpus` vCPUs, running.
    pub fn new(cpus: usize) -> RunControl {
        RunControl {
            ctl: Mutex::new(Ctl {
                paused: false,
                stop: false,
                parked: 0,
                jobs: (0..cpus).map(|_| None).collect(),
            }),
            cv: Condvar::new(),
            cpus,
        }
    }

    fn lock(&self) -> MutexGuard<'_, Ctl> {
        self.ctl.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Whether the VM is paused.
    pub fn is_paused(&self) -> bool {
        self.lock().paused
    }

    /// Called by vCPU `id` between KVM_RUNs: parks while paused, running queued jobs.
    pub fn park_if_paused(&self, id: usize, vcpu: &mut VcpuFd) {
        let mut g = self.lock();
        if !g.paused || g.stop {
            return;
        }
        drop(g);
        // Complete the exit just handled (port or MMIO read data goes into the registers)
        // without running guest code, so the saved state is consistent.
        vcpu.set_kvm_immediate_exit(1);
        let _ = vcpu.run();
        vcpu.set_kvm_immediate_exit(0);
        g = self.lock();
        g.parked += 1;
        self.cv.notify_all();
        loop {
            if let Some(job) = g.jobs.get_mut(id).and_then(Option::take) {
                drop(g);
                job(vcpu);
                g = self.lock();
                continue;
            }
            if g.stop || !g.paused {
                break;
            }
            g = self.cv.wait(g).unwrap_or_else(|e| e.into_inner());
        }
        g.parked -= 1;
        self.cv.notify_all();
    }

    /// Pauses every vCPU; `kick` signals the ones still in KVM_RUN. Returns once all parked.
    pub fn pause(&self, kick: impl Fn()) -> Result<()> {
        let start = Instant::now();
        let mut g = self.lock();
        g.paused = true;
        while g.parked < self.cpus {
            if start.elapsed() > PARK_TIMEOUT {
                g.paused = false;
                self.cv.notify_all();
                return Err(Error::Setup(format!(
                    "pause: only {} of {} vCPUs stopped within {PARK_TIMEOUT:?}",
                    g.parked, self.cpus
                )));
            }
            drop(g);
            kick();
            g = self.lock();
            g = self
                .cv
                .wait_timeout(g, Duration::from_millis(10))
                .unwrap_or_else(|e| e.into_inner())
                .0;
        }
        Ok(())
    }

    /// Lets the vCPUs run again.
    pub fn resume(&self) {
        self.lock().paused = false;
        self.cv.notify_all();
    }

    /// Wakes every parked vCPU for good (the VM is stopping).
    pub fn stop(&self) {
        self.lock().stop = true;
        self.cv.notify_all();
    }

    /// Runs `job(i)` on every parked vCPU `i` and collects the results in vCPU order.
    pub fn run_on_all<T: Send + 'static>(
        &self,
        job: impl Fn(usize, &mut VcpuFd) -> T + Send + Sync + Clone + 'static,
    ) -> Result<Vec<T>> {
        let (tx, rx) = std::sync::mpsc::channel();
        {
            let mut g = self.lock();
            if !g.paused || g.parked < self.cpus {
                return Err(Error::Setup("vCPU job while the VM is not paused".into()));
            }
            for i in 0..self.cpus {
                let (tx, job) = (tx.clone(), job.clone());
                g.jobs[i] = Some(Box::new(move |v: &mut VcpuFd| {
                    let _ = tx.send((i, job(i, v)));
                }));
            }
        }
        drop(tx);
        self.cv.notify_all();
        let mut out: Vec<Option<T>> = (0..self.cpus).map(|_| None).collect();
        for _ in 0..self.cpus {
            let (i, r) = rx
                .recv_timeout(PARK_TIMEOUT)
                .map_err(|_| Error::Setup("a parked vCPU did not run its job".into()))?;
            out[i] = Some(r);
        }
        Ok(out.into_iter().flatten().collect())
    }
}
