//! The MPI mirror (feature `mpi`): one communication thread per rank
//! bridges MPI and the local scheduler. Ranks exchange load; an idle rank
//! steals half of a busy rank's queued tasks from a randomised victim;
//! tasks and results cross as rkyv messages (`crate::wire`); cancels cross too;
//! a rank silent past `dead_after` is given up (its tasks end `Lost`).
//! Design and formats: `docs/SCHEDULER.md`.
//!
//! The communication thread initialises MPI itself and is the only thread
//! that calls it (`SimpleCommunicator` is not `Sync`); the rest of the
//! process talks to it through [`Mirror`] (a bounded command channel) and
//! the scheduler's shared structures.

mod comm;
mod peers;
mod sends;
pub use crate::wire;

use std::sync::atomic::{AtomicU64, AtomicUsize};
use std::sync::mpsc::{sync_channel, Receiver, SyncSender};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::Duration;

use crate::{Inbox, Inboxes, Job, Outcome, RemoteDone, Scheduler, Wake};

pub use peers::Peers;

pub use crate::WirePayload;

#[derive(Debug, Clone)]
pub struct MirrorConfig {
    /// How often each rank sends its load to every other.
    pub exchange_interval: Duration,
    /// A rank silent for this long is given up.
    pub dead_after: Duration,
    /// A victim must have at least this many queued tasks.
    pub steal_min_queued: u32,
    /// Most tasks one steal moves.
    pub steal_batch_max: usize,
    /// Most tasks of this rank running elsewhere at once.
    pub exported_max: usize,
    /// Runner slots of this rank (the load's `free_slots` is this minus `busy`).
    pub slots: usize,
    /// Test hook (rank, pause): after its first stolen batch arrives, that
    /// rank's communication thread stops for `pause` (a hung node), so the
    /// others' dead-rank handling can be tested under mpirun.
    pub test_freeze: Option<(usize, Duration)>,
}

impl Default for MirrorConfig {
    fn default() -> Self {
        Self {
            exchange_interval: Duration::from_micros(500),
            dead_after: Duration::from_secs(5),
            steal_min_queued: 2,
            steal_batch_max: 256,
            exported_max: 4096,
            slots: 1,
            test_freeze: None,
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum MirrorError {
    #[error("MPI could not be initialised (already initialised in this process?)")]
    Init,
    #[error("the MPI communication thread is gone")]
    Gone,
    #[error("ranks {0:?} were given up: no further collective run is possible")]
    RankLost(Vec<usize>),
    #[error("spawning the MPI communication thread: {0}")]
    Spawn(std::io::Error),
}

pub(crate) enum Command {
    /// Start an epoch (after a barrier); `steal`: take part in stealing.
    Begin {
        steal: bool,
    },
    /// This rank's own tasks are all done.
    OriginDone,
    /// Answer `Quiet` once no task of this epoch is left on any rank
    /// (every rank's own tasks done, nothing in flight here).
    WaitQuiet,
    /// Wait for the end of the epoch, send `report` to rank 0; rank 0 gets
    /// every rank's report back (None for a rank given up).
    End {
        report: Vec<u8>,
    },
    Shutdown,
}

pub(crate) enum Reply {
    Begun,
    /// No new epoch: these ranks were given up (a barrier would hang).
    RankLost(Vec<usize>),
    Quiet,
    Ended {
        reports: Vec<Option<Vec<u8>>>,
        lost_ranks: Vec<usize>,
    },
}

/// The process's handle on its communication thread.
pub struct Mirror {
    pub rank: usize,
    pub ranks: usize,
    commands: SyncSender<Command>,
    replies: Receiver<Reply>,
    thread: Option<JoinHandle<()>>,
}

/// What the communication thread works with.
pub struct Parts<T, R, W: Wake> {
    pub sched: Scheduler<Job<T>>,
    /// The owners' inboxes (results of tasks that came back from a rank).
    pub local: Arc<Inboxes<Outcome<R>, W>>,
    /// Results of tasks other ranks sent here (filled by `Router`).
    pub remote: Arc<Inbox<RemoteDone<R>>>,
    /// Runners busy right now.
    pub busy: Arc<AtomicUsize>,
    pub stats: Arc<MirrorStats>,
}

/// Counters of the mirror, readable from any thread (`--stats-interval-ms`
/// lines, bench-scaling reports).
#[derive(Debug, Default)]
pub struct MirrorStats {
    /// Tasks other ranks sent here.
    pub stolen_in: AtomicU64,
    /// Tasks sent to other ranks.
    pub stolen_out: AtomicU64,
    pub steal_requests: AtomicU64,
    pub cancels_sent: AtomicU64,
    pub cancels_received: AtomicU64,
    /// Tasks that were running on a rank that was given up.
    pub lost_tasks: AtomicU64,
    /// Messages that failed to decode or to encode.
    pub bad_messages: AtomicU64,
}

/// What an epoch ended with, as seen by this rank.
#[derive(Debug)]
pub struct EpochEnd {
    /// Rank 0: each rank's report (None: the rank was given up); others: empty.
    pub reports: Vec<Option<Vec<u8>>>,
    /// Ranks given up during the run.
    pub lost_ranks: Vec<usize>,
}

impl Mirror {
    /// Starts the communication thread, which initialises MPI.
    pub fn start<T, R, W>(parts: Parts<T, R, W>, config: MirrorConfig) -> Result<Self, MirrorError>
    where
        T: WirePayload,
        R: WirePayload,
        W: Wake + 'static,
    {
        let (cmd_tx, cmd_rx) = sync_channel(4);
        let (rep_tx, rep_rx) = sync_channel(4);
        let (id_tx, id_rx) = sync_channel(1);
        let thread = std::thread::Builder::new()
            .name("mpi-comm".into())
            .spawn(move || comm::run(parts, config, cmd_rx, rep_tx, id_tx))
            .map_err(MirrorError::Spawn)?;
        let Ok(Some((rank, ranks))) = id_rx.recv() else {
            let _ = thread.join();
            return Err(MirrorError::Init);
        };
        Ok(Self {
            rank,
            ranks,
            commands: cmd_tx,
            replies: rep_rx,
            thread: Some(thread),
        })
    }

    fn call(&self, c: Command) -> Result<(), MirrorError> {
        self.commands.send(c).map_err(|_| MirrorError::Gone)
    }

    /// Every rank calls this before pushing its epoch's tasks (a barrier).
    pub fn begin(&self, steal: bool) -> Result<(), MirrorError> {
        self.call(Command::Begin { steal })?;
        match self.replies.recv() {
            Ok(Reply::Begun) => Ok(()),
            Ok(Reply::RankLost(ranks)) => Err(MirrorError::RankLost(ranks)),
            _ => Err(MirrorError::Gone),
        }
    }

    pub fn origin_done(&self) -> Result<(), MirrorError> {
        self.call(Command::OriginDone)
    }

    /// Blocks until no task of this epoch is left anywhere (after
    /// `origin_done`): the runners can stop and the report be made.
    pub fn wait_quiet(&self) -> Result<(), MirrorError> {
        self.call(Command::WaitQuiet)?;
        match self.replies.recv() {
            Ok(Reply::Quiet) => Ok(()),
            _ => Err(MirrorError::Gone),
        }
    }

    pub fn end(&self, report: Vec<u8>) -> Result<EpochEnd, MirrorError> {
        self.call(Command::End { report })?;
        match self.replies.recv() {
            Ok(Reply::Ended { reports, lost_ranks }) => Ok(EpochEnd { reports, lost_ranks }),
            _ => Err(MirrorError::Gone),
        }
    }

    /// Ends the thread (MPI is finalised there).
    pub fn shutdown(mut self) {
        let _ = self.call(Command::Shutdown);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

impl Drop for Mirror {
    fn drop(&mut self) {
        if let Some(t) = self.thread.take() {
            let _ = self.commands.send(Command::Shutdown);
            let _ = t.join();
        }
    }
}
