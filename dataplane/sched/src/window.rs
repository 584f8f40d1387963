//! Backpressure between a task's owner and the core running it elsewhere.
//!
//! The owner's stream queue is bounded; a runner on another core cannot see
//! it. The owner grants an allowance (tokens the runner may emit in all,
//! counted from the task's start) that never lets the queue plus the tokens
//! in flight exceed its bound; a runner that reaches it pauses its work and
//! parks. A grant that finds the runner parked tells the owner to wake it.
//!
//! No lost wake-up: the runner stores `parked` and then reads the
//! allowance; the owner raises the allowance and then swaps `parked` out
//! (all sequentially consistent). Either the runner sees the new allowance
//! and does not stay parked, or the owner sees `parked` and wakes it
//! (`loom_window_no_lost_wake`).

use crate::sync::{AtomicBool, AtomicU64, Ordering};

/// No core runs the task yet.
pub const NO_RUNNER: u64 = u64::MAX;

#[derive(Debug)]
pub struct Window {
    allowed: AtomicU64,
    parked: AtomicBool,
    /// The core running the task (the owner wakes it), or [`NO_RUNNER`].
    runner: AtomicU64,
}

impl Window {
    pub(crate) fn new(allowed: u64) -> Self {
        Self {
            allowed: AtomicU64::new(allowed),
            parked: AtomicBool::new(false),
            runner: AtomicU64::new(NO_RUNNER),
        }
    }

    /// For a task that is about to be queued again (no other holder).
    pub(crate) fn reset(&self, allowed: u64) {
        self.allowed.store(allowed, Ordering::SeqCst);
        self.parked.store(false, Ordering::SeqCst);
        self.runner.store(NO_RUNNER, Ordering::SeqCst);
    }

    /// The runner, right after it claimed the task and before it checks for
    /// a cancel: the owner's cancel wakes this core.
    pub fn set_runner(&self, core: usize) {
        self.runner.store(core as u64, Ordering::SeqCst);
    }

    pub fn runner(&self) -> Option<usize> {
        match self.runner.load(Ordering::SeqCst) {
            NO_RUNNER => None,
            c => Some(c as usize),
        }
    }

    /// The runner: may the task have emitted `emitted` tokens in all?
    pub fn allows(&self, emitted: u64) -> bool {
        emitted <= self.allowed.load(Ordering::SeqCst)
    }

    /// The runner emitted `emitted` tokens and the next one is beyond the
    /// allowance: parks. True: stay paused until woken; false: the owner
    /// raised the allowance meanwhile, go on.
    pub fn park(&self, emitted: u64) -> bool {
        self.parked.store(true, Ordering::SeqCst);
        if emitted < self.allowed.load(Ordering::SeqCst) {
            // Granted meanwhile; if the owner also saw `parked`, its wake
            // finds nothing paused: harmless.
            self.parked.store(false, Ordering::SeqCst);
            return false;
        }
        true
    }

    /// The runner, woken: has the allowance moved past `emitted`?
    pub fn may_resume(&self, emitted: u64) -> bool {
        emitted < self.allowed.load(Ordering::SeqCst)
    }

    /// The owner: the runner may emit up to `allowed` tokens in all. True
    /// when the runner is parked and must be woken.
    pub fn grant(&self, allowed: u64) -> bool {
        self.allowed.fetch_max(allowed, Ordering::SeqCst);
        self.parked.swap(false, Ordering::SeqCst)
    }

    pub fn allowed(&self) -> u64 {
        self.allowed.load(Ordering::SeqCst)
    }
}
