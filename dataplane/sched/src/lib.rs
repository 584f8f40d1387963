//! cnse-sched: the work-stealing task scheduler of cnse-dp (issue 10).
//!
//! - [`Scheduler`] / [`Core`]: a crossbeam-deque `Worker` per core and
//!   priority level, an `Injector`, the others' `Stealer`s; bounded
//!   admission ([`Config::queued_max`]; past it a push is refused with
//!   [`SchedError::Full`], the server's ERROR 429); cancellation of a queued
//!   task (removed, never run) or a running one (a flag its runner sees);
//!   `close` and drain for shutdown.
//! - [`Inboxes`]: the way back: a bounded inbox per owner core for results
//!   of its tasks that ran elsewhere, and a [`Wake`] the server implements
//!   (eventfd or IORING_OP_MSG_RING).
//! - `mpi` (feature): the mirror across MPI ranks (`docs/SCHEDULER.md`).
//!
//! The shared atomics (task state, admission gate, inbox) are built on
//! `sync.rs`, so the loom models (`--cfg cnse_loom`) check the same code.

mod gate;
mod inbox;
mod state;
mod sync;
mod window;

#[cfg(all(test, cnse_loom))]
mod loom_models;
#[cfg(not(cnse_loom))]
mod route;
#[cfg(not(cnse_loom))]
mod sched;
#[cfg(all(test, not(cnse_loom)))]
mod tests;

#[cfg(all(feature = "mpi", not(cnse_loom)))]
pub mod mpi;

pub use gate::GateCounts;
pub use inbox::{Inbox, InboxFull, Inboxes, Wake};
#[cfg(not(cnse_loom))]
pub use route::{Busy, Job, Origin, Outcome, RemoteDone, Router, Status};
#[cfg(not(cnse_loom))]
pub use sched::{CancelToken, Claimed, Core, CoreStats, Scheduler, Task};
pub use state::{CancelOutcome, Phase, TaskState};
pub use window::Window;

/// A task payload or result that can cross ranks (the `mpi` feature sends
/// these bytes inside its rkyv messages).
pub trait WirePayload: Sized + Send + 'static {
    fn encode(&self, out: &mut Vec<u8>);
    /// None for bytes this type cannot have produced.
    fn decode(bytes: &[u8]) -> Option<Self>;
}

/// Priority levels: a REQUEST's `priority` p runs at level min(p, 3);
/// higher levels are taken first. Four deques per core, not one per value.
pub const LEVELS: usize = 4;

pub fn level_of(priority: u32) -> usize {
    (priority as usize).min(LEVELS - 1)
}

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum SchedError {
    #[error("scheduler full: {queued_max} tasks already queued (admission bound)")]
    Full { queued_max: usize },
    #[error("scheduler closed: shutting down")]
    Closed,
    #[error("no core {core}: the scheduler has {cores}")]
    NoSuchCore { core: usize, cores: usize },
    #[error("bad scheduler config: {0}")]
    Config(&'static str),
}

impl SchedError {
    /// The protocol's ERROR code for a refused push: 429 when full, 503
    /// when shutting down, 500 for a caller's bug.
    pub fn code(&self) -> u32 {
        match self {
            SchedError::Full { .. } => 429,
            SchedError::Closed => 503,
            _ => 500,
        }
    }
}

/// Bounds of one scheduler.
#[derive(Debug, Clone)]
pub struct Config {
    pub cores: usize,
    /// Admission bound: queued tasks, all cores and levels together.
    pub queued_max: usize,
    /// A core takes its own queued tasks oldest first (requests waiting
    /// for a backend slot: no old request starves under load) rather than
    /// newest first (LIFO: the cache-warm order of a fork-join runtime).
    pub fifo: bool,
}

impl Config {
    /// Deque entries may exceed the queued tasks by the tombstones of
    /// cancelled ones, up to this many times `queued_max`.
    pub const TOMBSTONE_FACTOR: usize = 2;

    pub fn entries_max(&self) -> usize {
        self.queued_max * Self::TOMBSTONE_FACTOR
    }

    #[cfg_attr(cnse_loom, allow(dead_code))]
    fn check(&self) -> Result<(), SchedError> {
        if self.cores == 0 {
            return Err(SchedError::Config("cores must be >= 1"));
        }
        if self.queued_max == 0 || self.entries_max() > gate::FIELD_MAX {
            return Err(SchedError::Config("queued_max must be in 1..=1048575"));
        }
        Ok(())
    }
}
