//! The process's work-stealing scheduler as the server uses it (issue 10;
//! the scheduler itself is `cnse-sched`, docs/SCHEDULER.md).
//!
//! A REQUEST that finds its core's backend full becomes a [`ServeTask`] on
//! that core's deque. A core with a free backend slot and nothing of its
//! own queued steals; it runs the stolen task on its own backend and sends
//! the tokens back, batched per turn, to the owner core's inbox as
//! [`TaskMsg`]s, waking the owner's ring through its eventfd. Backpressure
//! crosses cores through the task's [`cnse_sched::Window`]; a cancel
//! through its [`cnse_sched::CancelToken`].
//!
//! Nothing here allocates per task or per batch in the steady state: the
//! prompt buffers travel with the task and come back with its last message,
//! task states are reused by their owner's stream slot, and token batches
//! come from a bounded pool.

use std::os::fd::{AsRawFd, OwnedFd};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Instant;

use cnse_proto::{FinishReason, Params};
use cnse_sched::{Core, Inboxes, Job, Outcome, Router, Scheduler, Wake};

mod wire;

/// A request waiting for (or running on) a backend slot, wherever it runs.
#[derive(Debug)]
pub struct ServeTask {
    /// The owner's stream slot and its generation.
    pub sslot: u32,
    pub gen: u32,
    pub params: Params,
    /// The stream's prompt and chat buffers, moved (not copied) out of its
    /// slot; they come back with the task's last message.
    pub prompt: String,
    /// Bytes at the front of `prompt` that are the session key (0: none).
    pub session_len: u16,
    pub messages: String,
    pub chat: bool,
    pub arrived: Instant,
}

/// Tokens of one task, produced in one turn of the core running it.
#[derive(Debug, Default)]
pub struct Batch {
    pub bytes: Vec<u8>,
    pub lens: Vec<u32>,
}

impl Batch {
    pub fn push(&mut self, text: &[u8]) {
        self.bytes.extend_from_slice(text);
        self.lens.push(text.len() as u32);
    }

    pub fn is_empty(&self) -> bool {
        self.lens.is_empty()
    }

    pub fn clear(&mut self) {
        self.bytes.clear();
        self.lens.clear();
    }

    /// Each token's text, in order.
    pub fn tokens(&self) -> impl Iterator<Item = &[u8]> {
        let mut at = 0usize;
        self.lens.iter().map(move |&l| {
            let t = &self.bytes[at..at + l as usize];
            at += l as usize;
            t
        })
    }
}

/// How a task's work ended, in its last message.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum TaskEnd {
    Finished(FinishReason),
    /// Finished after the backend continued the work on another model
    /// server (`Sink::failed_over`): the owner marks the stream's END.
    FinishedFailedOver(FinishReason),
    Error {
        code: u32,
        message: String,
    },
}

/// What the core running a task sends its owner.
#[derive(Debug)]
pub struct TaskMsg {
    pub sslot: u32,
    pub gen: u32,
    pub batch: Batch,
    /// In the last message: how the work ended (None when a cancel ended
    /// it: the owner had already let the stream go).
    pub end: Option<TaskEnd>,
    /// In the last message: the prompt buffers, for the owner to reuse.
    pub buffers: Option<(String, String)>,
}

pub type Task = Job<ServeTask>;
pub type Msg = Outcome<TaskMsg>;

/// Writes a worker's eventfd: its ring's read completes and the worker
/// turns (the same eventfd that wakes it for shutdown).
pub struct EventfdWake {
    fds: Vec<OwnedFd>,
    /// One flag per core that sleeps with a free backend slot, each on its
    /// own cache line (a core going to sleep and waking touches only its
    /// own): a core that queues a task wakes one of them to steal it.
    idle: Box<[IdleFlag]>,
}

#[repr(align(128))]
#[derive(Default)]
struct IdleFlag(AtomicBool);

impl EventfdWake {
    /// One descriptor per core (duplicates of the workers' wake eventfds);
    /// none for a session that runs alone (the simulator).
    pub fn new(fds: Vec<OwnedFd>) -> Self {
        let idle = (0..fds.len()).map(|_| IdleFlag::default()).collect();
        Self { fds, idle }
    }

    /// Wakes one idle core other than `from` (the first found after it, so
    /// that wakes spread).
    fn wake_idle(&self, from: usize) {
        // The queueing came before: a full fence orders it before the
        // flags are read (the sleeper fences between its flag and the
        // queue: no lost wake-up).
        std::sync::atomic::fence(Ordering::SeqCst);
        let n = self.idle.len();
        for k in 1..=n {
            let core = (from + k) % n;
            if core == from && k < n {
                continue;
            }
            let f = &self.idle[core].0;
            if f.load(Ordering::SeqCst) && f.swap(false, Ordering::SeqCst) {
                self.wake_core(core);
                return;
            }
        }
    }

    /// Wakes `core` (a cancel or a grant for a task it runs).
    pub fn wake_core(&self, core: usize) {
        if let Some(fd) = self.fds.get(core) {
            let one: u64 = 1;
            // SAFETY: writes 8 bytes from a valid u64 to an open eventfd; a
            // full counter (EAGAIN) still leaves it readable, so the wake
            // is not lost.
            unsafe { libc::write(fd.as_raw_fd(), (&one as *const u64).cast(), 8) };
        }
    }
}

impl Wake for EventfdWake {
    fn wake(&self, core: usize) {
        self.wake_core(core);
    }

    fn work_queued(&self) {
        if !self.idle.is_empty() {
            self.wake_idle(self.idle.len() - 1);
        }
    }
}

/// Batches kept for reuse, all cores together.
const POOL_MAX: usize = 4096;

/// Token batches in circulation between cores: a runner takes one, the
/// owner gives it back once its tokens are in the stream's queue.
#[derive(Default)]
pub struct BatchPool {
    free: Mutex<Vec<Batch>>,
}

impl BatchPool {
    pub fn take(&self) -> Batch {
        self.free
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .pop()
            .unwrap_or_default()
    }

    pub fn give(&self, mut b: Batch) {
        b.clear();
        let mut free = self.free.lock().unwrap_or_else(|e| e.into_inner());
        if free.len() < POOL_MAX {
            free.push(b);
        }
    }
}

/// How queued work is balanced between cores.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Balance {
    /// A core with a free backend slot and nothing of its own queued
    /// steals from the others.
    Steal,
    /// Each core runs only its own queued work (the baseline).
    Off,
}

/// What every worker shares.
pub struct Tasks {
    pub sched: Scheduler<Task>,
    pub router: Router<TaskMsg, EventfdWake>,
    pub pool: BatchPool,
    pub balance: Balance,
    /// Sequences the backends of all cores hold now (the MPI mirror's load
    /// messages: free slots = slots − busy).
    pub busy: Arc<AtomicUsize>,
}

/// Results a core's inbox holds at most before runners pause.
pub const INBOX_MAX: usize = 4096;

impl Tasks {
    /// The scheduler of `cores` cores, `queued_max` queued tasks in all.
    /// `remote_max`: results of tasks other ranks sent here that may wait
    /// for the MPI communication thread (1 without MPI: nothing fills it).
    pub fn new(
        cores: usize,
        queued_max: usize,
        balance: Balance,
        wake: EventfdWake,
        remote_max: usize,
    ) -> Result<(Arc<Tasks>, Vec<Core<Task>>), cnse_sched::SchedError> {
        let (sched, cores_v) = Scheduler::new(&cnse_sched::Config {
            cores,
            queued_max,
            fifo: true,
        })?;
        let router = Router {
            rank: 0,
            local: Arc::new(Inboxes::new(cores, INBOX_MAX, wake)),
            remote: Arc::new(cnse_sched::Inbox::new(remote_max.max(1))),
        };
        let tasks = Arc::new(Tasks {
            sched,
            router,
            pool: BatchPool::default(),
            balance,
            busy: Arc::new(AtomicUsize::new(0)),
        });
        Ok((tasks, cores_v))
    }

    /// A scheduler for one session alone (the simulator, tests).
    pub fn single(queued_max: usize) -> (Arc<Tasks>, Core<Task>) {
        let (t, mut cores) = Tasks::new(1, queued_max.max(1), Balance::Off, EventfdWake::new(Vec::new()), 1)
            .expect("a one-core scheduler with a bound >= 1 is valid");
        (t, cores.pop().expect("one core"))
    }

    pub fn wake_core(&self, core: usize) {
        self.router.local.waker().wake_core(core);
    }

    fn idle(&self, core: usize) -> Option<&AtomicBool> {
        self.router.local.waker().idle.get(core).map(|f| &f.0)
    }

    /// `core` is about to sleep with a free backend slot. True: tasks are
    /// queued meanwhile, do not sleep (the flag is cleared again). The flag
    /// is stored before the queue is read, and a pusher queues before it
    /// reads the flags: one of the two sees the other (no lost wake-up).
    pub fn going_idle(&self, core: usize) -> bool {
        if self.balance == Balance::Off {
            return false;
        }
        let Some(flag) = self.idle(core) else { return false };
        flag.store(true, Ordering::SeqCst);
        // Store then load on two locations: only a full fence orders them.
        std::sync::atomic::fence(Ordering::SeqCst);
        if self.sched.counts().live > 0 {
            flag.store(false, Ordering::Relaxed);
            return true;
        }
        false
    }

    /// `core` woke up (its flag may already have been taken by a waker).
    pub fn awake(&self, core: usize) {
        if let Some(flag) = self.idle(core) {
            if flag.load(Ordering::Relaxed) {
                flag.store(false, Ordering::Relaxed);
            }
        }
    }

    /// A task was queued on `from`: wake one idle core to steal it.
    pub fn wake_idle(&self, from: usize) {
        if self.balance == Balance::Steal {
            self.router.local.waker().wake_idle(from);
        }
    }
}
