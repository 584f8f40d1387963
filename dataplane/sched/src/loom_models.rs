//! loom models of the shared structures, on the same code the scheduler
//! runs (`sync.rs` swaps in loom's atomics):
//!
//! ```sh
//! RUSTFLAGS="--cfg cnse_loom" CARGO_TARGET_DIR=target/loom \
//!   cargo test --release -p cnse-sched --lib loom
//! ```

use loom::sync::atomic::{AtomicUsize, Ordering};

use loom::sync::Arc;
use loom::thread;

use crate::gate::{Gate, Refusal};
use crate::inbox::{Inbox, InboxFull};
use crate::state::{CancelOutcome, Phase, TaskState};

/// Cancel racing the steal that claims the task and its completion: exactly
/// one of "removed unrun" and "ran" happens, and the gate's counts agree.
#[test]
fn loom_cancel_races_claim_and_finish() {
    loom::model(|| {
        let gate = Arc::new(Gate::new(1, 2));
        gate.reserve().unwrap();
        let state = TaskState::new();
        let (g1, s1) = (gate.clone(), state.clone());
        let thief = thread::spawn(move || {
            if s1.claim() {
                g1.claimed();
                let saw_cancel = s1.finish();
                g1.finished();
                Some(saw_cancel)
            } else {
                g1.tombstone_dropped();
                None
            }
        });
        let outcome = state.cancel();
        if outcome == CancelOutcome::Removed {
            gate.cancelled();
        }
        let ran = thief.join().unwrap();
        match (outcome, ran) {
            (CancelOutcome::Removed, None) => assert_eq!(state.phase(), Phase::Removed),
            (CancelOutcome::Signalled, Some(true)) => assert_eq!(state.phase(), Phase::Done),
            (CancelOutcome::TooLate, Some(false)) => assert_eq!(state.phase(), Phase::Done),
            other => panic!("cancel and claim disagree: {other:?}"),
        }
        let c = gate.counts();
        assert_eq!((c.live, c.entries, c.running), (0, 0, 0));
    });
}

/// Two producers (a stolen task's runner, the MPI thread) racing the
/// owner's drain: after all of them, anything left in the inbox has a wake
/// pending for it (never a result with no wake on its way), and every
/// result is taken exactly once.
#[test]
fn loom_inbox_no_lost_wake() {
    loom::model(|| {
        let inbox = Arc::new(Inbox::new(2));
        let wakes = Arc::new(AtomicUsize::new(0));
        let producers: Vec<_> = (0..2)
            .map(|i| {
                let (inbox, wakes) = (inbox.clone(), wakes.clone());
                thread::spawn(move || {
                    if inbox.push(i).expect("capacity 2 holds both") {
                        wakes.fetch_add(1, Ordering::SeqCst);
                    }
                })
            })
            .collect();
        let mut got = Vec::new();
        inbox.drain_into(&mut got);
        for p in producers {
            p.join().unwrap();
        }
        let drained_first = got.len();
        if drained_first < 2 {
            assert!(inbox.wake_pending(), "a result sits in the inbox with no wake due");
            assert!(wakes.load(Ordering::SeqCst) >= 1);
        }
        inbox.drain_into(&mut got);
        got.sort();
        assert_eq!(got, vec![0, 1]);
    });
}

/// The bound holds under a racing push: one of two pushes into a one-slot
/// inbox is handed back.
#[test]
fn loom_inbox_bound() {
    loom::model(|| {
        let inbox = Arc::new(Inbox::new(1));
        let i2 = inbox.clone();
        let t = thread::spawn(move || i2.push(1u8).is_ok());
        let mine = inbox.push(2u8);
        let theirs = t.join().unwrap();
        assert!(mine.is_ok() != theirs, "exactly one fits");
        if let Err(InboxFull(v)) = mine {
            assert_eq!(v, 2);
        }
    });
}

/// Shutdown: a push racing `close` is either refused, or admitted and then
/// seen by the drain (the gate is not drained until it ran); a claim moving
/// live → running never lets the drain see zero in between.
#[test]
fn loom_shutdown_push_races_close() {
    loom::model(|| {
        let gate = Arc::new(Gate::new(4, 8));
        let g1 = gate.clone();
        let pusher = thread::spawn(move || {
            if g1.reserve().is_ok() {
                g1.claimed();
                g1.finished();
                true
            } else {
                false
            }
        });
        gate.close();
        let drained_early = gate.drained();
        let admitted = pusher.join().unwrap();
        assert!(gate.drained(), "everything admitted has ended");
        assert_eq!(gate.reserve(), Err(Refusal::Closed));
        if drained_early && admitted {
            // Only possible if the whole task ran before the check.
            assert_eq!(gate.counts().running, 0);
        }
    });
}

/// Drain sees a claimed task: a runner between claim and finish keeps the
/// gate undrained.
#[test]
fn loom_drain_waits_for_running() {
    loom::model(|| {
        let gate = Arc::new(Gate::new(2, 4));
        gate.reserve().unwrap();
        gate.close();
        let g1 = gate.clone();
        let done = Arc::new(AtomicUsize::new(0));
        let d1 = done.clone();
        let runner = thread::spawn(move || {
            g1.claimed();
            d1.store(1, Ordering::SeqCst);
            g1.finished();
        });
        if gate.drained() {
            assert_eq!(done.load(Ordering::SeqCst), 1, "drained before the task ended");
        }
        runner.join().unwrap();
        assert!(gate.drained());
    });
}

/// A task another rank refused comes home (`requeue`: running → queued)
/// while its owner cancels it: either the cancel flags it first and the
/// requeue fails (answered cancelled), or the requeue wins and the cancel
/// removes the queued task; the gate ends balanced either way.
#[test]
fn loom_requeue_races_cancel() {
    loom::model(|| {
        let gate = Arc::new(Gate::new(2, 4));
        gate.reserve().unwrap();
        let state = TaskState::new();
        assert!(state.claim());
        gate.claimed();
        let (g1, s1) = (gate.clone(), state.clone());
        let owner = thread::spawn(move || {
            let o = s1.cancel();
            if o == CancelOutcome::Removed {
                g1.cancelled();
            }
            o
        });
        let requeued = state.unclaim();
        if requeued {
            gate.unclaimed();
        }
        let outcome = owner.join().unwrap();
        if requeued {
            // The queue entry is popped later: a tombstone if removed.
            if state.claim() {
                gate.claimed();
                state.finish();
                gate.finished();
            } else {
                assert_eq!(outcome, CancelOutcome::Removed);
                gate.tombstone_dropped();
            }
        } else {
            assert_eq!(outcome, CancelOutcome::Signalled);
            assert!(state.finish(), "the runner sees the cancel");
            gate.finished();
        }
        let c = gate.counts();
        assert_eq!((c.live, c.entries, c.running), (0, 0, 0));
    });
}

/// The owner's grant racing the runner's park: a runner that stays parked
/// is always woken (the grant saw `parked`), and a runner that goes on saw
/// the new allowance. Never parked with room and no wake due.
#[test]
fn loom_window_no_lost_wake() {
    loom::model(|| {
        let w = Arc::new(crate::window::Window::new(4));
        let w2 = w.clone();
        // The runner emitted 4 tokens, the allowance: it must park.
        let runner = thread::spawn(move || w2.park(4));
        // The owner drained its queue: room for 4 more.
        let woke = w.grant(8);
        let stays_parked = runner.join().unwrap();
        if stays_parked {
            assert!(woke, "the runner parked with room granted and no wake due");
            assert!(w.may_resume(4), "woken, the runner finds room");
        }
    });
}
