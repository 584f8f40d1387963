//! The communication thread: the only thread that calls MPI. Between
//! epochs it waits for a command; during one it polls MPI and the local
//! structures, never blocking in MPI (sends are non-blocking, receives are
//! probed first), so a slow or dead peer cannot stall it.

use std::collections::{HashMap, VecDeque};
use std::sync::atomic::Ordering;
use std::sync::mpsc::{Receiver, SyncSender, TryRecvError};
use std::time::{Duration, Instant};

use mpi::topology::SimpleCommunicator;
use mpi::traits::*;
use mpi::Threading;

use super::peers::Peers;
use super::sends::Sends;
use super::wire::{self, Msg, WireResult};
use super::{Command, MirrorConfig, Parts, Reply, WirePayload};
use crate::{CancelToken, Claimed, Job, Outcome, RemoteDone, Wake};

/// Status byte on the wire for a task the receiving rank could not queue
/// (full or closing): the origin queues it again at home.
const WIRE_REFUSED: u8 = 3;
/// Results per message, so a batch stays far below `MSG_BYTES_MAX`.
const RESULTS_PER_MSG_MAX: usize = 1024;
/// Outcomes held for full owner inboxes: past it, no message is received
/// until the owners drain (the senders' bounded sends push back in turn).
const PENDING_LOCAL_MAX: usize = 4096;
/// Results queued for other ranks: past it, the outbox is left to fill and
/// the runners that stream into it pause.
const RESULTS_OUT_MAX: usize = 8192;
/// Longest wait for rank 0's word when leaving a job with a lost rank.
const BYE_WAIT: Duration = Duration::from_secs(60);
/// Messages handled per poll before the other duties get a turn.
const RECV_PER_POLL_MAX: usize = 64;
/// Idle polls before the thread starts sleeping between polls.
const SPIN_POLLS: u32 = 64;
/// Sleep between idle polls: doubles from the first to the last while
/// nothing happens (a thread that polls on a full machine takes CPU from
/// the runners), back to the first on any progress.
const IDLE_SLEEP_FIRST: Duration = Duration::from_micros(50);
const IDLE_SLEEP_LAST: Duration = Duration::from_micros(400);

/// An outcome waiting for its owner's inbox, and the exported task it ends
/// (None for a streamed result).
type Held<T, R> = (Option<Claimed<Job<T>>>, Outcome<R>);

struct Exported<T> {
    claimed: Claimed<Job<T>>,
    to: usize,
    cancel_sent: bool,
}

struct Comm<T, R, W: Wake> {
    parts: Parts<T, R, W>,
    config: MirrorConfig,
    rank: usize,
    ranks: usize,
    epoch: u32,
    steal: bool,
    peers: Peers,
    sends: Sends,
    exported: HashMap<u64, Exported<T>>,
    imported: HashMap<(u32, u64), CancelToken>,
    results_out: Vec<Vec<WireResult>>,
    /// Outcomes waiting for a full owner inbox, in order; `Some` ends the
    /// exported task once delivered.
    pending_local: VecDeque<Held<T, R>>,
    steal_outstanding: Option<(usize, Instant)>,
    origin_done: bool,
    done_sent: bool,
    report: Option<Vec<u8>>,
    reports: Vec<Option<Vec<u8>>>,
    lost: Vec<usize>,
    scratch: Vec<RemoteDone<R>>,
}

pub(crate) fn run<T, R, W>(
    parts: Parts<T, R, W>,
    config: MirrorConfig,
    commands: Receiver<Command>,
    replies: SyncSender<Reply>,
    id: SyncSender<Option<(usize, usize)>>,
) where
    T: WirePayload,
    R: WirePayload,
    W: Wake,
{
    let Some((universe, _level)) = mpi::initialize_with_threading(Threading::Multiple) else {
        let _ = id.send(None);
        return;
    };
    let world = universe.world();
    let (rank, ranks) = (world.rank() as usize, world.size() as usize);
    let _ = id.send(Some((rank, ranks)));
    let now = Instant::now();
    let mut c = Comm {
        parts,
        config,
        rank,
        ranks,
        epoch: 0,
        steal: false,
        peers: Peers::new(rank, ranks, now),
        sends: Sends::new(ranks),
        exported: HashMap::new(),
        imported: HashMap::new(),
        results_out: (0..ranks).map(|_| Vec::new()).collect(),
        pending_local: VecDeque::new(),
        steal_outstanding: None,
        origin_done: false,
        done_sent: false,
        report: None,
        reports: vec![None; ranks],
        lost: Vec::new(),
        scratch: Vec::new(),
    };
    while let Ok(cmd) = commands.recv() {
        match cmd {
            Command::Begin { steal } => {
                if !c.lost.is_empty() {
                    // A collective with a rank given up could wait forever.
                    if replies.send(Reply::RankLost(c.lost.clone())).is_err() {
                        break;
                    }
                    continue;
                }
                world.barrier();
                c.begin(steal);
                if replies.send(Reply::Begun).is_err() {
                    break;
                }
                match c.epoch_loop(&world, &commands, &replies) {
                    Some(reply) => {
                        if replies.send(reply).is_err() {
                            break;
                        }
                    }
                    None => break,
                }
            }
            Command::OriginDone => {}
            Command::WaitQuiet => {
                if replies.send(Reply::Quiet).is_err() {
                    break;
                }
            }
            Command::End { .. } => {
                let reply = Reply::Ended {
                    reports: Vec::new(),
                    lost_ranks: c.lost.clone(),
                };
                if replies.send(reply).is_err() {
                    break;
                }
            }
            Command::Shutdown => break,
        }
    }
    if !c.lost.is_empty() {
        // MPI_Finalize waits for every rank, the lost one too: leave without
        // it. The launcher then reports the job as ended abnormally (OpenMPI's
        // mpirun: a non-zero status, and it ends the ranks still running), so
        // the others wait for rank 0, which leaves last, after its report.
        c.leave_together(&world);
        eprintln!(
            "rank {}: ranks {:?} were given up: leaving without MPI_Finalize",
            c.rank, c.lost
        );
        c.sends.abandon();
        std::mem::forget(universe);
        return;
    }
    c.sends.abandon();
    // `universe` drops here: MPI_Finalize, on this thread as MPI requires.
}

impl<T: WirePayload, R: WirePayload, W: Wake> Comm<T, R, W> {
    fn begin(&mut self, steal: bool) {
        self.epoch += 1;
        self.steal = steal;
        self.peers.reset(Instant::now());
        self.origin_done = false;
        self.done_sent = false;
        self.report = None;
        self.reports = vec![None; self.ranks];
        self.steal_outstanding = None;
    }

    /// Runs one epoch; None when the process is going away.
    fn epoch_loop(
        &mut self,
        world: &SimpleCommunicator,
        commands: &Receiver<Command>,
        replies: &SyncSender<Reply>,
    ) -> Option<Reply> {
        let mut next_exchange = Instant::now();
        let mut idle = 0u32;
        let mut ending = false;
        let mut quiet_wanted = false;
        loop {
            match commands.try_recv() {
                Ok(Command::OriginDone) => self.origin_done = true,
                Ok(Command::WaitQuiet) => quiet_wanted = true,
                Ok(Command::End { report }) => self.report = Some(report),
                Ok(Command::Begin { .. }) => {}
                Ok(Command::Shutdown) | Err(TryRecvError::Disconnected) => return None,
                Err(TryRecvError::Empty) => {}
            }
            let mut progress = self.receive(world);
            progress |= self.take_remote_results();
            progress |= self.deliver_pending_local();
            progress |= self.flush_results(world);
            self.sends.poll();
            let now = Instant::now();
            if now >= next_exchange || (self.origin_done && !self.done_sent) {
                self.exchange(world, now);
                next_exchange = now + self.config.exchange_interval;
            }
            if self.steal {
                progress |= self.maybe_steal(world, now);
            }
            if quiet_wanted && self.quiet() {
                quiet_wanted = false;
                replies.send(Reply::Quiet).ok()?;
            }
            if !ending && self.report.is_some() && self.quiet() {
                self.send_report(world);
                ending = true;
            }
            if ending {
                let live = |r: usize| !self.peers.get(r).dead;
                let reports_in = self.rank != 0 || self.peers.all_reported();
                if reports_in && self.sends.settled(live) {
                    return Some(Reply::Ended {
                        reports: std::mem::take(&mut self.reports),
                        lost_ranks: self.lost.clone(),
                    });
                }
            }
            if progress {
                idle = 0;
            } else {
                idle = idle.saturating_add(1);
                if idle > SPIN_POLLS {
                    let doublings = (idle - SPIN_POLLS).min(8);
                    std::thread::sleep((IDLE_SLEEP_FIRST * (1 << doublings)).min(IDLE_SLEEP_LAST));
                } else {
                    std::thread::yield_now();
                }
            }
        }
    }

    /// Leaving a job with a lost rank: rank 0 tells the live ranks (and
    /// waits for those sends), the others wait for that word, rank 0's loss,
    /// or `BYE_WAIT`.
    fn leave_together(&mut self, world: &SimpleCommunicator) {
        let until = Instant::now() + BYE_WAIT;
        if self.rank == 0 {
            let live: Vec<usize> = self.peers.live().collect();
            for r in live {
                self.send_msg(world, r, &Msg::Bye { epoch: self.epoch });
            }
            while Instant::now() < until && !self.sends.settled(|r| !self.peers.get(r).dead) {
                self.sends.poll();
                std::thread::sleep(IDLE_SLEEP_FIRST);
            }
            return;
        }
        while Instant::now() < until && !self.peers.get(0).dead {
            match world.any_process().immediate_matched_probe() {
                Some(probed) => {
                    let from = probed.1.source_rank();
                    let (bytes, _) = probed.matched_receive_vec::<u8>();
                    if from == 0 && matches!(wire::decode(&bytes), Ok(Msg::Bye { .. })) {
                        return;
                    }
                }
                None => std::thread::sleep(IDLE_SLEEP_LAST),
            }
        }
    }

    /// Nothing of this epoch is left anywhere this rank can see.
    fn quiet(&self) -> bool {
        self.origin_done
            && self.done_sent
            && self.peers.all_done()
            && self.exported.is_empty()
            && self.imported.is_empty()
            && self.pending_local.is_empty()
            && self.results_out.iter().all(Vec::is_empty)
    }

    fn send_msg(&mut self, world: &SimpleCommunicator, to: usize, msg: &Msg) -> bool {
        if self.peers.get(to).dead || !self.sends.can_send(to) {
            return false;
        }
        match wire::encode(msg) {
            Ok(bytes) => {
                self.sends.send(world, to, bytes);
                true
            }
            Err(e) => {
                self.parts.stats.bad_messages.fetch_add(1, Ordering::Relaxed);
                eprintln!("rank {}: message to rank {to} not sent: {e}", self.rank);
                false
            }
        }
    }

    fn receive(&mut self, world: &SimpleCommunicator) -> bool {
        let mut n = 0;
        while n < RECV_PER_POLL_MAX && self.pending_local.len() < PENDING_LOCAL_MAX {
            let Some(probed) = world.any_process().immediate_matched_probe() else {
                break;
            };
            n += 1;
            let from = probed.1.source_rank() as usize;
            let (bytes, _) = probed.matched_receive_vec::<u8>();
            let now = Instant::now();
            if from >= self.ranks || from == self.rank || self.peers.get(from).dead {
                continue;
            }
            self.peers.heard(from, now);
            match wire::decode(&bytes) {
                Ok(m) if m.epoch() == self.epoch => self.handle(world, from, m, now),
                Ok(_) => {} // an older epoch's straggler
                Err(e) => {
                    self.parts.stats.bad_messages.fetch_add(1, Ordering::Relaxed);
                    eprintln!("rank {}: bad message from rank {from}: {e}", self.rank);
                }
            }
        }
        n > 0
    }

    fn handle(&mut self, world: &SimpleCommunicator, from: usize, m: Msg, now: Instant) {
        match m {
            Msg::Load {
                queued,
                free_slots,
                done,
                ..
            } => self.peers.load(from, queued, free_slots, done, now),
            Msg::StealRequest { want, .. } => self.answer_steal(world, from, want as usize),
            Msg::Tasks { tasks, .. } => self.import(from, tasks),
            Msg::Results { results, .. } => self.results_back(from, results),
            Msg::Cancel { ids, .. } => self.cancel_imported(from, &ids),
            Msg::Report { bytes, .. } => {
                self.peers.get_mut(from).reported = true;
                self.reports[from] = Some(bytes);
            }
            Msg::Bye { .. } => {} // only looked for when leaving
        }
    }
}

mod duties;
