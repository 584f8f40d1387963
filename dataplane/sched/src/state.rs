//! A task's life as one atomic byte, so that a cancel, a steal and a
//! completion racing on the same task agree on one outcome.
//!
//! ```text
//!   Queued ──claim──► Running ──finish──► Done
//!     │                  │
//!     └─cancel─► Removed └─cancel─► Running + CANCEL flag (the runner sees it)
//! ```
//!
//! Whoever pops or steals the queue entry must `claim` it; a queued task
//! that was cancelled first stays in its deque as a tombstone and is dropped
//! unrun when popped.

use crate::sync::{Arc, AtomicU8, Ordering};
use crate::window::Window;

const QUEUED: u8 = 0;
const RUNNING: u8 = 1;
const DONE: u8 = 2;
const REMOVED: u8 = 3;
/// Set on a running (or done) task whose cancel was asked for.
const CANCEL: u8 = 0x80;
const PHASE: u8 = 0x7f;

/// Where a task is, as seen from its [`CancelToken`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Phase {
    Queued,
    Running,
    Done,
    /// Cancelled while queued: it will never run.
    Removed,
}

/// What a cancel achieved.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CancelOutcome {
    /// The task was still queued: it is removed and will never run.
    Removed,
    /// The task is running: its runner sees [`TaskState::cancel_requested`]
    /// and stops at its next check.
    Signalled,
    /// The task had already finished or been cancelled: nothing to do.
    TooLate,
}

#[derive(Debug)]
pub struct TaskState {
    word: AtomicU8,
    /// Backpressure between the owner and a runner on another core.
    pub window: Window,
}

impl TaskState {
    pub(crate) fn new() -> Arc<Self> {
        Arc::new(Self {
            word: AtomicU8::new(QUEUED),
            window: Window::new(u64::MAX),
        })
    }

    /// Makes a finished or removed task's state new again for the next
    /// task (only its last holder may: see `Core::push_reusing`).
    pub(crate) fn reset(&self, allowed: u64) {
        self.word.store(QUEUED, Ordering::SeqCst);
        self.window.reset(allowed);
    }

    /// Takes a popped or stolen entry for running. False: it was cancelled
    /// while queued (a tombstone), drop it unrun.
    pub(crate) fn claim(&self) -> bool {
        self.word
            .compare_exchange(QUEUED, RUNNING, Ordering::AcqRel, Ordering::Acquire)
            .is_ok()
    }

    /// Gives a claimed task back to the queue (it could not run where it
    /// was sent). False: a cancel reached it first.
    pub(crate) fn unclaim(&self) -> bool {
        self.word
            .compare_exchange(RUNNING, QUEUED, Ordering::AcqRel, Ordering::Acquire)
            .is_ok()
    }

    /// Marks a claimed task finished (ran to the end, or stopped after a
    /// cancel). Returns whether a cancel had been asked for.
    pub(crate) fn finish(&self) -> bool {
        let prev = self.word.fetch_update(Ordering::AcqRel, Ordering::Acquire, |w| {
            debug_assert_eq!(w & PHASE, RUNNING, "finish of a task that is not running");
            Some((w & CANCEL) | DONE)
        });
        prev.map(|w| w & CANCEL != 0).unwrap_or(false)
    }

    pub(crate) fn cancel(&self) -> CancelOutcome {
        let mut w = self.word.load(Ordering::Acquire);
        loop {
            let (next, outcome) = match w & PHASE {
                QUEUED => (REMOVED, CancelOutcome::Removed),
                RUNNING if w & CANCEL == 0 => (w | CANCEL, CancelOutcome::Signalled),
                _ => return CancelOutcome::TooLate,
            };
            match self.word.compare_exchange(w, next, Ordering::AcqRel, Ordering::Acquire) {
                Ok(_) => return outcome,
                Err(now) => w = now,
            }
        }
    }

    /// The runner's check: stop producing and finish.
    pub fn cancel_requested(&self) -> bool {
        self.word.load(Ordering::Acquire) & CANCEL != 0
    }

    pub fn phase(&self) -> Phase {
        match self.word.load(Ordering::Acquire) & PHASE {
            QUEUED => Phase::Queued,
            RUNNING => Phase::Running,
            DONE => Phase::Done,
            REMOVED => Phase::Removed,
            other => unreachable!("task state word holds only the four phases, saw {other}"),
        }
    }
}

#[cfg(all(test, not(cnse_loom)))]
mod tests {
    use super::*;

    #[test]
    fn cancel_queued_removes_and_claim_fails() {
        let s = TaskState::new();
        assert_eq!(s.cancel(), CancelOutcome::Removed);
        assert!(!s.claim());
        assert_eq!(s.phase(), Phase::Removed);
        assert_eq!(s.cancel(), CancelOutcome::TooLate);
    }

    #[test]
    fn cancel_running_signals_once_and_finish_reports_it() {
        let s = TaskState::new();
        assert!(s.claim());
        assert!(!s.claim(), "a task is claimed once");
        assert!(!s.cancel_requested());
        assert_eq!(s.cancel(), CancelOutcome::Signalled);
        assert_eq!(s.cancel(), CancelOutcome::TooLate);
        assert!(s.cancel_requested());
        assert!(s.finish());
        assert_eq!(s.phase(), Phase::Done);
    }

    #[test]
    fn cancel_after_done_is_too_late() {
        let s = TaskState::new();
        assert!(s.claim());
        assert!(!s.finish());
        assert_eq!(s.cancel(), CancelOutcome::TooLate);
    }
}
