//! The communication thread's duties during an epoch, one function each:
//! load exchange and dead ranks, stealing (both sides), tasks in, results
//! both ways, cancels both ways, the end-of-epoch report.

use std::sync::atomic::Ordering;
use std::time::Instant;

use mpi::topology::SimpleCommunicator;

use super::{Comm, Exported, RESULTS_OUT_MAX, RESULTS_PER_MSG_MAX, WIRE_REFUSED};
use crate::mpi::wire::{Msg, WireResult, WireTask};
use crate::mpi::WirePayload;
use crate::{CancelOutcome, Claimed, Job, Origin, Outcome, Status, Wake};

impl<T: WirePayload, R: WirePayload, W: Wake> Comm<T, R, W> {
    /// Load to every live peer (also the heartbeat), forwarded cancels,
    /// and the dead-rank check.
    pub(super) fn exchange(&mut self, world: &SimpleCommunicator, now: Instant) {
        let counts = self.parts.sched.counts();
        let busy = self.parts.busy.load(Ordering::Relaxed);
        let load = Msg::Load {
            epoch: self.epoch,
            queued: counts.live as u32,
            free_slots: self.config.slots.saturating_sub(busy) as u32,
            done: self.origin_done,
        };
        let live: Vec<usize> = self.peers.live().collect();
        let mut all_sent = true;
        for &r in &live {
            all_sent &= self.send_msg(world, r, &load);
        }
        if self.origin_done && all_sent {
            self.done_sent = true;
        }
        self.forward_cancels(world);
        for r in self.peers.newly_dead(now, self.config.dead_after) {
            self.give_up(r);
        }
    }

    /// Rank `r` stopped answering: the tasks it ran for us end `Lost`, the
    /// tasks we run for it are cancelled, and it is never a victim again.
    fn give_up(&mut self, r: usize) {
        eprintln!(
            "rank {}: rank {r} silent for {:?}, giving it up",
            self.rank, self.config.dead_after
        );
        self.lost.push(r);
        self.reports[r] = None;
        let ids: Vec<u64> = self
            .exported
            .iter()
            .filter(|(_, e)| e.to == r)
            .map(|(&id, _)| id)
            .collect();
        for id in ids {
            if let Some(e) = self.exported.remove(&id) {
                self.parts.stats.lost_tasks.fetch_add(1, Ordering::Relaxed);
                self.deliver(e.claimed, Status::Lost, None, r as u32);
            }
        }
        self.imported.retain(|&(rank, _), token| {
            if rank as usize == r {
                token.cancel();
                false
            } else {
                true
            }
        });
        self.results_out[r].clear();
        if matches!(self.steal_outstanding, Some((v, _)) if v == r) {
            self.steal_outstanding = None;
        }
    }

    /// Idle here (nothing queued, a free slot) and no steal in flight: ask
    /// a random busy peer for tasks.
    pub(super) fn maybe_steal(&mut self, world: &SimpleCommunicator, now: Instant) -> bool {
        if let Some((_, since)) = self.steal_outstanding {
            if now.duration_since(since) < self.config.dead_after {
                return false;
            }
            self.steal_outstanding = None;
        }
        let counts = self.parts.sched.counts();
        let busy = self.parts.busy.load(Ordering::Relaxed);
        if counts.live > 0 || busy >= self.config.slots || counts.closed {
            return false;
        }
        let Some(victim) = self.peers.victim(self.config.steal_min_queued) else {
            return false;
        };
        let room = self.parts.sched.queued_max().saturating_sub(counts.live);
        let want = room.min(self.config.steal_batch_max) as u32;
        if want == 0 {
            return false;
        }
        let sent = self.send_msg(
            world,
            victim,
            &Msg::StealRequest {
                epoch: self.epoch,
                want,
            },
        );
        if sent {
            self.steal_outstanding = Some((victim, now));
            self.parts.stats.steal_requests.fetch_add(1, Ordering::Relaxed);
            // Until its next load says otherwise, do not ask it again.
            self.peers.get_mut(victim).queued = 0;
        }
        sent
    }

    /// A thief asks: give it half of what is queued here (maybe nothing;
    /// the answer is always sent, so the thief's request ends).
    pub(super) fn answer_steal(&mut self, world: &SimpleCommunicator, from: usize, want: usize) {
        let live = self.parts.sched.counts().live;
        let room = self.config.exported_max.saturating_sub(self.exported.len());
        let n = if self.steal {
            want.min(live.div_ceil(2)).min(self.config.steal_batch_max).min(room)
        } else {
            0
        };
        let claimed = if n > 0 { self.parts.sched.export(n) } else { Vec::new() };
        let mut tasks = Vec::with_capacity(claimed.len());
        for c in claimed {
            let mut payload = Vec::new();
            c.task.payload.payload.encode(&mut payload);
            tasks.push(WireTask {
                id: c.task.id,
                owner: c.task.owner as u32,
                priority: c.task.priority,
                payload,
            });
            let e = Exported {
                claimed: c,
                to: from,
                cancel_sent: false,
            };
            self.exported.insert(e.claimed.task.id, e);
        }
        let count = tasks.len() as u64;
        let msg = Msg::Tasks {
            epoch: self.epoch,
            tasks,
        };
        if self.send_msg(world, from, &msg) {
            self.parts.stats.stolen_out.fetch_add(count, Ordering::Relaxed);
        } else if let Msg::Tasks { tasks, .. } = msg {
            // The thief is gone or congested: the tasks go back home.
            for t in tasks {
                if let Some(e) = self.exported.remove(&t.id) {
                    self.requeue_or_cancel(e.claimed);
                }
            }
        }
    }

    /// Tasks stolen from `from` enter the local scheduler as remote jobs.
    pub(super) fn import(&mut self, from: usize, tasks: Vec<WireTask>) {
        if matches!(self.steal_outstanding, Some((v, _)) if v == from) {
            self.steal_outstanding = None;
        }
        let cores = self.parts.sched.cores();
        let mut queued = false;
        for t in tasks {
            let Some(payload) = T::decode(&t.payload) else {
                self.parts.stats.bad_messages.fetch_add(1, Ordering::Relaxed);
                self.refuse(from, t.id);
                continue;
            };
            let job = Job {
                origin: Origin::Remote {
                    rank: from as u32,
                    id: t.id,
                },
                payload,
            };
            match self.parts.sched.inject(t.owner as usize % cores, t.priority, job) {
                Ok((_, token)) => {
                    self.imported.insert((from as u32, t.id), token);
                    self.parts.stats.stolen_in.fetch_add(1, Ordering::Relaxed);
                    queued = true;
                }
                Err(_) => self.refuse(from, t.id),
            }
        }
        if queued {
            self.parts.local.waker().work_queued();
        }
        if let Some((_, pause)) = self.config.test_freeze.filter(|&(r, _)| r == self.rank) {
            self.config.test_freeze = None;
            eprintln!("rank {}: test freeze: silent for {pause:?}", self.rank);
            std::thread::sleep(pause);
        }
    }

    fn refuse(&mut self, to: usize, id: u64) {
        self.results_out[to].push(WireResult {
            id,
            status: WIRE_REFUSED,
            payload: Vec::new(),
            last: true,
        });
    }

    /// Results of tasks this rank sent to `from`: streamed ones go on to
    /// the owner; the last one also ends the exported task.
    pub(super) fn results_back(&mut self, from: usize, results: Vec<WireResult>) {
        for w in results {
            let Some(e) = self.exported.remove(&w.id) else {
                continue; // given up already, or a duplicate
            };
            if e.to != from {
                self.exported.insert(w.id, e);
                self.parts.stats.bad_messages.fetch_add(1, Ordering::Relaxed);
                continue;
            }
            if w.status == WIRE_REFUSED {
                self.requeue_or_cancel(e.claimed);
                continue;
            }
            let status = Status::from_u8(w.status).unwrap_or(Status::Lost);
            let result = if w.payload.is_empty() {
                None
            } else {
                R::decode(&w.payload)
            };
            if w.last {
                self.deliver(e.claimed, status, result, from as u32);
            } else {
                self.stream(&e.claimed, result, from as u32);
                self.exported.insert(w.id, e);
            }
        }
    }

    fn requeue_or_cancel(&mut self, c: Claimed<Job<T>>) {
        if let Err(c) = self.parts.sched.requeue(c) {
            let rank = self.rank as u32;
            self.deliver(c, Status::Cancelled, None, rank);
        }
    }

    fn outcome(c: &Claimed<Job<T>>, status: Status, result: Option<R>, ran_on: u32, last: bool) -> Outcome<R> {
        Outcome {
            id: c.task.id,
            owner: c.task.owner,
            enqueued_at: c.task.enqueued_at,
            status,
            result,
            ran_on,
            last,
        }
    }

    fn wire_result(id: u64, status: Status, result: Option<&R>, last: bool) -> WireResult {
        let mut payload = Vec::new();
        if let Some(r) = result {
            r.encode(&mut payload);
        }
        WireResult {
            id,
            status: status as u8,
            payload,
            last,
        }
    }

    /// A streamed result of one of our exported tasks, still running there.
    fn stream(&mut self, c: &Claimed<Job<T>>, result: Option<R>, ran_on: u32) {
        match c.task.payload.origin {
            Origin::Local => {
                let o = Self::outcome(c, Status::Ok, result, ran_on, false);
                self.pending_local.push_back((None, o));
            }
            Origin::Remote { rank, id } => {
                if !self.peers.get(rank as usize).dead {
                    let w = Self::wire_result(id, Status::Ok, result.as_ref(), false);
                    self.results_out[rank as usize].push(w);
                }
            }
        }
    }

    /// The end of one of our exported tasks: to its owner core here, or on
    /// to the rank it came from (a task stolen twice).
    fn deliver(&mut self, c: Claimed<Job<T>>, status: Status, result: Option<R>, ran_on: u32) {
        match c.task.payload.origin {
            Origin::Local => {
                let o = Self::outcome(&c, status, result, ran_on, true);
                self.pending_local.push_back((Some(c), o));
            }
            Origin::Remote { rank, id } => {
                self.imported.remove(&(rank, id));
                if !self.peers.get(rank as usize).dead {
                    let w = Self::wire_result(id, status, result.as_ref(), true);
                    self.results_out[rank as usize].push(w);
                }
                c.finish();
            }
        }
    }

    /// Outcomes for the owner cores, in arrival order (one task's results
    /// must not overtake each other): stops at the first full inbox.
    pub(super) fn deliver_pending_local(&mut self) -> bool {
        let mut sent = false;
        while let Some((c, o)) = self.pending_local.pop_front() {
            match self.parts.local.send(o.owner, o) {
                Ok(()) => {
                    if let Some(c) = c {
                        c.finish();
                    }
                    sent = true;
                }
                Err(crate::InboxFull(o)) => {
                    self.pending_local.push_front((c, o));
                    break;
                }
            }
        }
        sent
    }

    /// Results the runners produced for other ranks (taken only while the
    /// per-rank batches are below their bound: a congested peer pushes back
    /// through the outbox to the runners).
    pub(super) fn take_remote_results(&mut self) -> bool {
        let queued: usize = self.results_out.iter().map(Vec::len).sum();
        if queued >= RESULTS_OUT_MAX {
            return false;
        }
        let mut buf = std::mem::take(&mut self.scratch);
        let n = self.parts.remote.drain_into(&mut buf);
        for d in buf.drain(..) {
            if d.last {
                self.imported.remove(&(d.rank, d.id));
            }
            let r = d.rank as usize;
            if r >= self.ranks || self.peers.get(r).dead {
                continue;
            }
            let w = Self::wire_result(d.id, d.status, d.result.as_ref(), d.last);
            self.results_out[r].push(w);
        }
        self.scratch = buf;
        n > 0
    }

    pub(super) fn flush_results(&mut self, world: &SimpleCommunicator) -> bool {
        let mut sent = false;
        for r in 0..self.ranks {
            while !self.results_out[r].is_empty() && self.sends.can_send(r) {
                let n = self.results_out[r].len().min(RESULTS_PER_MSG_MAX);
                let batch: Vec<WireResult> = self.results_out[r].drain(..n).collect();
                sent |= self.send_msg(
                    world,
                    r,
                    &Msg::Results {
                        epoch: self.epoch,
                        results: batch,
                    },
                );
            }
        }
        sent
    }

    /// Owners here cancelled tasks running on other ranks: tell them.
    fn forward_cancels(&mut self, world: &SimpleCommunicator) {
        let mut per_rank: Vec<Vec<u64>> = vec![Vec::new(); self.ranks];
        for (&id, e) in self.exported.iter_mut() {
            if !e.cancel_sent && e.claimed.cancel_requested() {
                e.cancel_sent = true;
                per_rank[e.to].push(id);
            }
        }
        for (r, ids) in per_rank.into_iter().enumerate() {
            if !ids.is_empty() {
                let n = ids.len() as u64;
                if self.send_msg(world, r, &Msg::Cancel { epoch: self.epoch, ids }) {
                    self.parts.stats.cancels_sent.fetch_add(n, Ordering::Relaxed);
                }
            }
        }
    }

    /// Rank `from` cancelled tasks it sent here.
    pub(super) fn cancel_imported(&mut self, from: usize, ids: &[u64]) {
        for &id in ids {
            let Some(token) = self.imported.get(&(from as u32, id)) else {
                continue; // finished already: its result is on the way
            };
            self.parts.stats.cancels_received.fetch_add(1, Ordering::Relaxed);
            let outcome = token.cancel();
            if outcome == CancelOutcome::Signalled {
                // Its runner sees the flag when woken (or at its next step).
                if let Some(core) = token.window().runner() {
                    self.parts.local.waker().wake(core);
                }
            }
            if outcome == CancelOutcome::Removed {
                // It will never run, so no runner answers for it.
                self.imported.remove(&(from as u32, id));
                self.results_out[from].push(WireResult {
                    id,
                    status: Status::Cancelled as u8,
                    payload: Vec::new(),
                    last: true,
                });
            }
        }
    }

    pub(super) fn send_report(&mut self, world: &SimpleCommunicator) {
        let report = self.report.take().unwrap_or_default();
        if self.rank == 0 {
            self.reports[0] = Some(report);
        } else {
            let msg = Msg::Report {
                epoch: self.epoch,
                bytes: report,
            };
            // Sends to rank 0 may be queued behind others; the epoch loop
            // waits until they settle.
            while !self.send_msg(world, 0, &msg) && !self.peers.get(0).dead {
                self.sends.poll();
                std::thread::yield_now();
            }
        }
    }
}
