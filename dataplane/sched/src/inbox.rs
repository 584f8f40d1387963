//! The way back to the owner core: a bounded inbox per core for results of
//! its tasks that ran elsewhere (another core, another rank), and a wake
//! the server implements with an eventfd write or an IORING_OP_MSG_RING to
//! the owner's ring.
//!
//! One wake per batch: a producer wakes the owner only when it turns the
//! `pending` flag from false to true; the owner clears the flag before it
//! drains, so a result pushed after that drain wakes it again (no lost
//! wake-up; `loom_inbox_no_lost_wake` checks every interleaving).

use std::collections::VecDeque;

use crate::sync::{AtomicBool, Mutex, Ordering};

/// How a producer tells core `core` that its inbox has something. The
/// server's implementation writes the core's eventfd or sends a MSG_RING
/// CQE to its ring; it must not block.
pub trait Wake: Send + Sync {
    fn wake(&self, core: usize);

    /// Tasks were queued where any core may take them (the injector: tasks
    /// another rank sent): wake a core that can run them. Default: none
    /// (the cores look on their own).
    fn work_queued(&self) {}
}

/// A full inbox hands the value back: the producer holds it and tries again
/// later (as a backend pauses when a stream's token queue is full).
#[derive(Debug, PartialEq, Eq)]
pub struct InboxFull<R>(pub R);

#[derive(Debug)]
pub struct Inbox<R> {
    queue: Mutex<VecDeque<R>>,
    capacity: usize,
    pending: AtomicBool,
}

impl<R> Inbox<R> {
    pub fn new(capacity: usize) -> Self {
        assert!(capacity >= 1, "an inbox holds at least one result");
        Self {
            queue: Mutex::new(VecDeque::with_capacity(capacity)),
            capacity,
            pending: AtomicBool::new(false),
        }
    }

    /// Queues `value` for the owner; true when the caller must wake it.
    pub fn push(&self, value: R) -> Result<bool, InboxFull<R>> {
        {
            let mut q = self.queue.lock().expect("inbox lock poisoned");
            if q.len() >= self.capacity {
                return Err(InboxFull(value));
            }
            q.push_back(value);
        }
        Ok(!self.pending.swap(true, Ordering::AcqRel))
    }

    /// The owner's side: clears the wake flag, then takes everything queued.
    pub fn drain_into(&self, out: &mut Vec<R>) -> usize {
        self.pending.store(false, Ordering::Release);
        let mut q = self.queue.lock().expect("inbox lock poisoned");
        let n = q.len();
        out.extend(q.drain(..));
        n
    }

    /// A producer's wake is due and the owner has not drained since.
    pub fn wake_pending(&self) -> bool {
        self.pending.load(Ordering::Acquire)
    }

    pub fn capacity(&self) -> usize {
        self.capacity
    }
}

/// One inbox per core and the wake they share.
pub struct Inboxes<R, W: Wake> {
    inboxes: Vec<Inbox<R>>,
    waker: W,
}

impl<R, W: Wake> Inboxes<R, W> {
    pub fn new(cores: usize, capacity: usize, waker: W) -> Self {
        Self {
            inboxes: (0..cores).map(|_| Inbox::new(capacity)).collect(),
            waker,
        }
    }

    /// Sends `value` to core `owner` and wakes it if it was not already.
    pub fn send(&self, owner: usize, value: R) -> Result<(), InboxFull<R>> {
        if self.inboxes[owner].push(value)? {
            self.waker.wake(owner);
        }
        Ok(())
    }

    pub fn drain_into(&self, core: usize, out: &mut Vec<R>) -> usize {
        self.inboxes[core].drain_into(out)
    }

    pub fn cores(&self) -> usize {
        self.inboxes.len()
    }

    /// Core `core` has results waiting (its wake is due or on its way).
    pub fn pending(&self, core: usize) -> bool {
        self.inboxes[core].wake_pending()
    }

    pub fn waker(&self) -> &W {
        &self.waker
    }
}

#[cfg(all(test, not(cnse_loom)))]
mod tests {
    use super::*;
    use std::sync::atomic::AtomicUsize;

    struct Count(AtomicUsize);
    impl Wake for Count {
        fn wake(&self, _core: usize) {
            self.0.fetch_add(1, Ordering::Relaxed);
        }
    }

    #[test]
    fn bounded_and_one_wake_per_batch() {
        let ib = Inboxes::new(2, 2, Count(AtomicUsize::new(0)));
        ib.send(1, 10).unwrap();
        ib.send(1, 11).unwrap();
        assert_eq!(ib.send(1, 12), Err(InboxFull(12)));
        assert_eq!(ib.waker.0.load(Ordering::Relaxed), 1, "one wake for the batch");
        let mut out = Vec::new();
        assert_eq!(ib.drain_into(1, &mut out), 2);
        assert_eq!(out, vec![10, 11]);
        ib.send(1, 12).unwrap();
        assert_eq!(
            ib.waker.0.load(Ordering::Relaxed),
            2,
            "a push after the drain wakes again"
        );
        assert_eq!(ib.drain_into(0, &mut out), 0);
    }
}
