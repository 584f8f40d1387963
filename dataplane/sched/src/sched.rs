//! The scheduler: a crossbeam-deque `Worker` per core and priority level,
//! one `Injector` per level for pushes from outside the cores (the MPI
//! communication thread, a thread without a core), and every core's
//! `Stealer`s for the others.
//!
//! A core looks for work in this order: its own deques (highest level
//! first), the injector, then the other cores' deques starting at a random
//! victim (steal-half: `steal_batch_and_pop` moves about half of the
//! victim's queue into the thief's deque).

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Instant;

use crossbeam_deque::{Injector, Steal, Stealer, Worker};

use crate::gate::{Gate, GateCounts, Refusal};
use crate::state::{CancelOutcome, TaskState};
use crate::{level_of, Config, SchedError, LEVELS};

/// A unit of work and where its results go.
#[derive(Debug)]
pub struct Task<T> {
    pub id: u64,
    /// The core whose clients wait for the results.
    pub owner: usize,
    /// From the REQUEST block (`Params::priority`): higher runs sooner.
    pub priority: u32,
    pub enqueued_at: Instant,
    pub payload: T,
}

struct Entry<T> {
    task: Task<T>,
    state: Arc<TaskState>,
}

/// The owner's handle on a pushed task: cancel it wherever it is.
#[derive(Debug, Clone)]
pub struct CancelToken {
    state: Arc<TaskState>,
    gate: Arc<Gate>,
}

impl CancelToken {
    /// A queued task is removed (it never runs); a running one is flagged
    /// for its runner.
    pub fn cancel(&self) -> CancelOutcome {
        let outcome = self.state.cancel();
        if outcome == CancelOutcome::Removed {
            self.gate.cancelled();
        }
        outcome
    }

    pub fn state(&self) -> &TaskState {
        &self.state
    }

    /// Backpressure with the task's runner.
    pub fn window(&self) -> &crate::Window {
        &self.state.window
    }
}

/// Per-core counters, readable from any thread.
#[derive(Debug, Default)]
pub struct CoreStats {
    /// Tasks this core ran (own and stolen).
    pub ran: AtomicU64,
    /// Tasks this core took from another core's deque.
    pub stolen: AtomicU64,
    /// Tasks this core took from the injector.
    pub injected: AtomicU64,
}

struct Shared<T> {
    injectors: [Injector<Entry<T>>; LEVELS],
    stealers: Vec<[Stealer<Entry<T>>; LEVELS]>,
    gate: Arc<Gate>,
    queued_max: usize,
    next_id: AtomicU64,
    stats: Vec<CoreStats>,
}

/// The handle shared by every thread: inject, cancel, close, observe.
pub struct Scheduler<T> {
    shared: Arc<Shared<T>>,
}

impl<T> Clone for Scheduler<T> {
    fn clone(&self) -> Self {
        Self {
            shared: self.shared.clone(),
        }
    }
}

/// One core's end: owned by that core's thread (crossbeam's `Worker` is
/// not `Sync`).
pub struct Core<T> {
    index: usize,
    workers: [Worker<Entry<T>>; LEVELS],
    shared: Arc<Shared<T>>,
    rng: u64,
}

/// A task taken for running. Dropping it without [`Claimed::finish`]
/// finishes it too, so a runner that unwinds does not hold up the drain.
pub struct Claimed<T> {
    pub task: Task<T>,
    /// Taken from another core's deque or the injector.
    pub stolen: bool,
    guard: RunGuard,
}

/// Finishes the task once: explicitly, or when dropped.
struct RunGuard {
    state: Arc<TaskState>,
    gate: Arc<Gate>,
    done: bool,
}

impl Drop for RunGuard {
    fn drop(&mut self) {
        if !self.done {
            self.state.finish();
            self.gate.finished();
        }
    }
}

impl<T> Claimed<T> {
    /// The runner's check between steps.
    pub fn cancel_requested(&self) -> bool {
        self.guard.state.cancel_requested()
    }

    /// Ends the task; true if a cancel reached it while it ran.
    pub fn finish(mut self) -> bool {
        self.guard.done = true;
        let cancelled = self.guard.state.finish();
        self.guard.gate.finished();
        cancelled
    }

    /// Backpressure with the task's owner.
    pub fn window(&self) -> &crate::Window {
        &self.guard.state.window
    }

    /// A token for this running task (the MPI layer keeps one per task it
    /// runs for another rank, to apply that rank's cancel).
    pub fn token(&self) -> CancelToken {
        CancelToken {
            state: self.guard.state.clone(),
            gate: self.guard.gate.clone(),
        }
    }
}

impl<T> Scheduler<T> {
    /// A scheduler and one [`Core`] per core, to be moved to their threads.
    pub fn new(config: &Config) -> Result<(Self, Vec<Core<T>>), SchedError> {
        config.check()?;
        let workers: Vec<[Worker<Entry<T>>; LEVELS]> = (0..config.cores)
            .map(|_| {
                std::array::from_fn(|_| {
                    if config.fifo {
                        Worker::new_fifo()
                    } else {
                        Worker::new_lifo()
                    }
                })
            })
            .collect();
        let stealers = workers
            .iter()
            .map(|w| std::array::from_fn(|l| w[l].stealer()))
            .collect();
        let shared = Arc::new(Shared {
            injectors: std::array::from_fn(|_| Injector::new()),
            stealers,
            gate: Arc::new(Gate::new(config.queued_max, config.entries_max())),
            queued_max: config.queued_max,
            next_id: AtomicU64::new(1),
            stats: (0..config.cores).map(|_| CoreStats::default()).collect(),
        });
        let cores = workers
            .into_iter()
            .enumerate()
            .map(|(index, workers)| Core {
                index,
                workers,
                shared: shared.clone(),
                rng: 0x9e37_79b9_7f4a_7c15 ^ (index as u64 + 1).wrapping_mul(0xbf58_476d_1ce4_e5b9),
            })
            .collect();
        Ok((Self { shared }, cores))
    }

    fn admit(&self, owner: usize, priority: u32, payload: T) -> Result<Entry<T>, (SchedError, T)> {
        self.admit_with(owner, priority, payload, None)
    }

    /// `state`: a finished task's state, reset, to carry this one (no
    /// allocation per task); None allocates a new one.
    fn admit_with(
        &self,
        owner: usize,
        priority: u32,
        payload: T,
        state: Option<Arc<TaskState>>,
    ) -> Result<Entry<T>, (SchedError, T)> {
        if owner >= self.shared.stats.len() {
            return Err((
                SchedError::NoSuchCore {
                    core: owner,
                    cores: self.shared.stats.len(),
                },
                payload,
            ));
        }
        if let Err(why) = self.shared.gate.reserve() {
            let e = match why {
                Refusal::Closed => SchedError::Closed,
                Refusal::Full => SchedError::Full {
                    queued_max: self.shared.queued_max,
                },
            };
            return Err((e, payload));
        }
        let task = Task {
            id: self.shared.next_id.fetch_add(1, Ordering::Relaxed),
            owner,
            priority,
            enqueued_at: Instant::now(),
            payload,
        };
        Ok(Entry {
            task,
            state: state.unwrap_or_else(TaskState::new),
        })
    }

    fn token(&self, e: &Entry<T>) -> (u64, CancelToken) {
        let token = CancelToken {
            state: e.state.clone(),
            gate: self.shared.gate.clone(),
        };
        (e.task.id, token)
    }

    /// Queues a task from any thread (into the injector). `Full` is the
    /// server's ERROR 429, `Closed` its 503; the payload comes back.
    pub fn inject(&self, owner: usize, priority: u32, payload: T) -> Result<(u64, CancelToken), (SchedError, T)> {
        let e = self.admit(owner, priority, payload)?;
        let out = self.token(&e);
        self.shared.injectors[level_of(priority)].push(e);
        Ok(out)
    }

    /// Takes up to `max` queued tasks for another rank (steal-half across
    /// ranks): highest level first, from the injector, then every core.
    /// They count as running here until the caller finishes each one, when
    /// the remote result came back (or the rank was given up).
    pub fn export(&self, max: usize) -> Vec<Claimed<T>> {
        let mut out = Vec::new();
        let s = &*self.shared;
        for level in (0..LEVELS).rev() {
            let sources = std::iter::once(None).chain((0..s.stealers.len()).map(Some));
            for src in sources {
                while out.len() < max {
                    let got = match src {
                        None => s.injectors[level].steal(),
                        Some(c) => s.stealers[c][level].steal(),
                    };
                    match got {
                        Steal::Success(e) => {
                            if let Some(c) = claim(s, e, true) {
                                out.push(c);
                            }
                        }
                        Steal::Retry => continue,
                        Steal::Empty => break,
                    }
                }
            }
        }
        out
    }

    /// Puts a claimed task that could not run where it went (another rank
    /// refused it) back in the injector. A task cancelled meanwhile is not
    /// queued again: it comes back to be answered as cancelled.
    pub fn requeue(&self, c: Claimed<T>) -> Result<(), Claimed<T>> {
        if !c.guard.state.unclaim() {
            return Err(c);
        }
        let Claimed { task, mut guard, .. } = c;
        guard.done = true;
        self.shared.gate.unclaimed();
        let level = level_of(task.priority);
        self.shared.injectors[level].push(Entry {
            task,
            state: guard.state.clone(),
        });
        Ok(())
    }

    pub fn queued_max(&self) -> usize {
        self.shared.queued_max
    }

    /// No more pushes (they get `Closed`); queued and running tasks go on
    /// until [`Scheduler::drained`].
    pub fn close(&self) {
        self.shared.gate.close();
    }

    pub fn drained(&self) -> bool {
        self.shared.gate.drained()
    }

    pub fn counts(&self) -> GateCounts {
        self.shared.gate.counts()
    }

    pub fn stats(&self, core: usize) -> &CoreStats {
        &self.shared.stats[core]
    }

    pub fn cores(&self) -> usize {
        self.shared.stats.len()
    }
}

fn claim<T>(s: &Shared<T>, e: Entry<T>, stolen: bool) -> Option<Claimed<T>> {
    if !e.state.claim() {
        s.gate.tombstone_dropped();
        return None;
    }
    s.gate.claimed();
    Some(Claimed {
        task: e.task,
        stolen,
        guard: RunGuard {
            state: e.state,
            gate: s.gate.clone(),
            done: false,
        },
    })
}

impl<T> Core<T> {
    pub fn index(&self) -> usize {
        self.index
    }

    pub fn scheduler(&self) -> Scheduler<T> {
        Scheduler {
            shared: self.shared.clone(),
        }
    }

    /// Queues a task on this core's own deque (the owner's fast path).
    pub fn push(&self, priority: u32, payload: T) -> Result<(u64, CancelToken), (SchedError, T)> {
        self.push_reusing(priority, payload, None, u64::MAX)
    }

    /// Queues a task on this core's own deque like [`Core::push`], carried
    /// by the state of `reuse` (the owner's token of a finished task) when
    /// nothing else holds it any more: the steady state allocates nothing
    /// per task. `allowed` starts the task's [`crate::Window`].
    pub fn push_reusing(
        &self,
        priority: u32,
        payload: T,
        reuse: Option<CancelToken>,
        allowed: u64,
    ) -> Result<(u64, CancelToken), (SchedError, T)> {
        let state = reuse.and_then(|mut t| {
            // Unique: no deque entry, runner or other token refers to it.
            Arc::get_mut(&mut t.state)?;
            t.state.reset(allowed);
            Some(t.state)
        });
        let state = state.unwrap_or_else(|| {
            let s = TaskState::new();
            s.reset(allowed);
            s
        });
        let sched = self.scheduler();
        let e = sched.admit_with(self.index, priority, payload, Some(state))?;
        let out = sched.token(&e);
        self.workers[level_of(priority)].push(e);
        Ok(out)
    }

    /// Nothing queued on this core's own deques (tombstones count as
    /// queued).
    pub fn own_is_empty(&self) -> bool {
        self.workers.iter().all(|w| w.is_empty())
    }

    /// The next task to run here: own deques, the injector, then a steal.
    /// None: nothing claimable anywhere right now.
    pub fn next_task(&mut self) -> Option<Claimed<T>> {
        for level in (0..LEVELS).rev() {
            if let Some(c) = self.next_at(level) {
                return Some(c);
            }
        }
        None
    }

    /// The next task from this core's own deques only (no injector, no
    /// steal): the "no balancing" baseline.
    pub fn next_own_task(&mut self) -> Option<Claimed<T>> {
        for level in (0..LEVELS).rev() {
            while let Some(e) = self.workers[level].pop() {
                if let Some(c) = claim(&self.shared, e, false) {
                    return Some(c);
                }
            }
        }
        None
    }

    fn next_at(&mut self, level: usize) -> Option<Claimed<T>> {
        while let Some(e) = self.workers[level].pop() {
            if let Some(c) = claim(&self.shared, e, false) {
                return Some(c);
            }
        }
        let shared = self.shared.clone();
        if let Some(c) = self.take(|w| shared.injectors[level].steal_batch_and_pop(w), level) {
            shared.stats[self.index].injected.fetch_add(1, Ordering::Relaxed);
            return Some(c);
        }
        let n = shared.stealers.len();
        let start = self.random() as usize % n;
        for k in 0..n {
            let victim = (start + k) % n;
            if victim == self.index {
                continue;
            }
            if let Some(c) = self.take(|w| shared.stealers[victim][level].steal_batch_and_pop(w), level) {
                shared.stats[self.index].stolen.fetch_add(1, Ordering::Relaxed);
                return Some(c);
            }
        }
        None
    }

    /// Runs one steal source until it is empty or yields a live task.
    fn take(&mut self, steal: impl Fn(&Worker<Entry<T>>) -> Steal<Entry<T>>, level: usize) -> Option<Claimed<T>> {
        loop {
            match steal(&self.workers[level]) {
                Steal::Success(e) => {
                    if let Some(c) = claim(&self.shared, e, true) {
                        return Some(c);
                    }
                    // A tombstone: the batch it came with is in our deque now.
                    while let Some(e) = self.workers[level].pop() {
                        if let Some(c) = claim(&self.shared, e, true) {
                            return Some(c);
                        }
                    }
                }
                Steal::Retry => continue,
                Steal::Empty => return None,
            }
        }
    }

    /// Marks a task this core ran (the runner's counter).
    pub fn count_run(&self) {
        self.shared.stats[self.index].ran.fetch_add(1, Ordering::Relaxed);
    }

    /// Shutdown: removes every task queued on this core's deques (and, from
    /// core 0, the injector's) without running it; `f` answers each one
    /// (the server's ERROR 503). Returns how many.
    pub fn evict_queued(&mut self, mut f: impl FnMut(Task<T>)) -> usize {
        let mut n = 0;
        let mut one = |e: Entry<T>, gate: &Gate| {
            if e.state.cancel() == CancelOutcome::Removed {
                gate.cancelled();
                f(e.task);
                n += 1;
            }
            gate.tombstone_dropped();
        };
        let gate = self.shared.gate.clone();
        for level in 0..LEVELS {
            while let Some(e) = self.workers[level].pop() {
                one(e, &gate);
            }
            if self.index == 0 {
                loop {
                    match self.shared.injectors[level].steal() {
                        Steal::Success(e) => one(e, &gate),
                        Steal::Retry => continue,
                        Steal::Empty => break,
                    }
                }
            }
        }
        n
    }

    fn random(&mut self) -> u64 {
        // xorshift64*: victims only need to differ between cores and turns.
        self.rng ^= self.rng >> 12;
        self.rng ^= self.rng << 25;
        self.rng ^= self.rng >> 27;
        self.rng.wrapping_mul(0x2545_f491_4f6c_dd1d)
    }
}
