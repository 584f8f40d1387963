//! Backpressure between a task's owner and the core running it elsewhere.
//!
//! The owner's stream queue is bounded; a runner on another core cannot see
//! it. The owner grants an allowance (tokens the runner may emit in all,
//! counted from the task's start) that never lets the queue plus the tokens
//! in flight exceed its bound; a runner that reaches it pauses its work and
//! parks. A grant that finds the runner parked tells the owner to wake it.
//!
//! No lost wake-up: the allowance and the `parked` bit share one atomic
//! word, so a park (a compare-and-swap that sets the bit only if the
//! allowance it read is used up) and a grant (which raises the allowance
//! and clears the bit in one update, reporting whether it was set) are
//! ordered one way or the other (`loom_window_no_lost_wake`).

use crate::sync::{AtomicU64, Ordering};

/// No core runs the task yet.
pub const NO_RUNNER: u64 = u64::MAX;

/// The parked bit of the window word; the allowance is the rest.
const PARKED: u64 = 1 << 63;
const ALLOWED: u64 = PARKED - 1;

#[derive(Debug)]
pub struct Window {
    /// `PARKED | allowance`.
    word: AtomicU64,
    /// The core running the task (the owner wakes it), or [`NO_RUNNER`].
    runner: AtomicU64,
}

impl Window {
    pub(crate) fn new(allowed: u64) -> Self {
        Self {
            word: AtomicU64::new(allowed.min(ALLOWED)),
            runner: AtomicU64::new(NO_RUNNER),
        }
    }

    /// For a task that is about to be queued again (no other holder).
    pub(crate) fn reset(&self, allowed: u64) {
        self.word.store(allowed.min(ALLOWED), Ordering::SeqCst);
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

    /// The runner emitted `emitted` tokens and the next one is beyond the
    /// allowance: parks. True: stay paused until woken; false: the owner
    /// raised the allowance meanwhile, go on.
    pub fn park(&self, emitted: u64) -> bool {
        self.word
            .fetch_update(Ordering::SeqCst, Ordering::SeqCst, |w| {
                (emitted >= w & ALLOWED).then_some(w | PARKED)
            })
            .is_ok()
    }

    /// The runner: may it emit another token after `emitted`?
    pub fn may_resume(&self, emitted: u64) -> bool {
        emitted < self.allowed()
    }

    /// The owner: the runner may emit up to `allowed` tokens in all. True
    /// when the runner is parked and must be woken.
    pub fn grant(&self, allowed: u64) -> bool {
        let allowed = allowed.min(ALLOWED);
        let prev = self
            .word
            .fetch_update(Ordering::SeqCst, Ordering::SeqCst, |w| Some((w & ALLOWED).max(allowed)))
            .expect("the update always applies");
        prev & PARKED != 0
    }

    pub fn allowed(&self) -> u64 {
        self.word.load(Ordering::SeqCst) & ALLOWED
    }
}
