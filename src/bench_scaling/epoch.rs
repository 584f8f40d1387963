//! One policy run on this rank: runner threads (one per core) push their
//! arrivals and run tasks; the main thread is every core's owner, takes
//! the outcomes from the inboxes and times each task from admission to its
//! outcome.

use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{bail, Result};
use cnse_metrics::LatencyHistogram;
use cnse_sched::{Busy, CancelOutcome, Claimed, InboxFull, Job, Router, SchedError, Status};

use super::report::RankReport;
use super::task::{index_hash, Done, Service, ServiceMode, Synthetic};
use super::world::{Shared, Unpark, World};

pub use super::world::SchedCore;

/// What this rank does in one epoch.
#[derive(Debug, Clone)]
pub struct Plan {
    /// Global task indices arriving at each core of this rank.
    pub arrivals: Vec<Vec<u64>>,
    pub task_us: u32,
    pub seed: u64,
    pub service: Service,
    pub mode: ServiceMode,
    /// Cores take work from the injector and from each other.
    pub local_steal: bool,
    /// Every N-th arrival is cancelled once all are pushed (0: none).
    pub cancel_every: u64,
    /// Largest global index + 1 (sizes the answered-once bitmap).
    pub index_end: u64,
    /// Results each task streams (the last ends it): a server task sends
    /// token batches while it runs.
    pub results_per_task: u32,
    /// Test hook (`--test-exit-rank`): the process exits once this rank
    /// has run this many tasks.
    pub exit_after_runs: Option<u64>,
}

/// The cancels of `--cancel-every` go out once this rank has run this many
/// tasks: late enough that some of the cancelled tasks were stolen by then.
const CANCEL_AFTER_RUNS: u64 = 20;

/// Counters the runner threads add to.
#[derive(Default)]
struct RunnerCounts {
    ran: AtomicU64,
    ran_hash: AtomicU64,
    busy_us: AtomicU64,
    nominal_us: AtomicU64,
    removed: AtomicU64,
    pushed_all: AtomicUsize,
}

/// Runs the epoch; returns the cores for the next one and this rank's report.
pub fn run(
    world: &World,
    shared: &Shared,
    cores: Vec<SchedCore>,
    plan: &Plan,
    steal: bool,
) -> Result<(Vec<SchedCore>, RankReport)> {
    let before = snapshot(shared);
    let counts = Arc::new(RunnerCounts::default());
    let stop = Arc::new(AtomicUsize::new(0));
    // The tasks that fit are queued before the start, as they would be
    // when a run begins with a backlog; otherwise a rank whose runner has
    // not pushed yet looks idle to the others' first steal.
    let mut pushers = Vec::with_capacity(cores.len());
    for (core, arrivals) in cores.iter().zip(plan.arrivals.iter().cloned()) {
        let mut p = Pusher {
            arrivals,
            next: 0,
            to_cancel: Vec::new(),
        };
        p.push_some(core, plan, &counts)?;
        pushers.push(p);
    }
    world.begin(steal)?;
    let t0 = Instant::now();
    let n_cores = cores.len();
    let threads: Vec<_> = cores
        .into_iter()
        .zip(pushers)
        .map(|(core, pusher)| {
            let (counts, stop, plan) = (counts.clone(), stop.clone(), plan.clone());
            let (router, busy) = (shared.router.clone(), shared.busy.clone());
            std::thread::spawn(move || runner(core, pusher, &plan, &counts, &stop, &router, &busy))
        })
        .collect();
    let mine: u64 = plan.arrivals.iter().map(|a| a.len() as u64).sum();
    let collected = collect(shared, plan, mine, &counts, n_cores);
    let finished = match &collected {
        Ok(_) => world.finish_origin(),
        Err(_) => Ok(()),
    };
    let wall = t0.elapsed();
    stop.store(1, Ordering::Release);
    let mut cores = Vec::with_capacity(threads.len());
    for t in threads {
        match t.join() {
            Ok(c) => cores.push(c?),
            Err(_) => bail!("a runner thread panicked"),
        }
    }
    let (mut report, hist) = collected?;
    finished?;
    let after = snapshot(shared);
    report.ran = counts.ran.load(Ordering::Relaxed);
    report.ran_hash = counts.ran_hash.load(Ordering::Relaxed);
    report.busy_us = counts.busy_us.load(Ordering::Relaxed);
    report.nominal_us = counts.nominal_us.load(Ordering::Relaxed);
    report.removed = counts.removed.load(Ordering::Relaxed);
    report.wall_us = wall.as_micros() as u64;
    report.arrivals = mine;
    report.rank = world.rank() as u64;
    report.local_steals = after.0 - before.0;
    let (m0, m1) = (before.1, after.1);
    report.stolen_in = m1.stolen_in - m0.stolen_in;
    report.stolen_out = m1.stolen_out - m0.stolen_out;
    report.steal_requests = m1.steal_requests - m0.steal_requests;
    report.cancels_sent = m1.cancels_sent - m0.cancels_sent;
    report.cancels_received = m1.cancels_received - m0.cancels_received;
    report.latency = hist.recorded();
    Ok((cores, report))
}

fn snapshot(shared: &Shared) -> (u64, super::world::MirrorCounts) {
    let local: u64 = (0..shared.sched.cores())
        .map(|c| shared.sched.stats(c).stolen.load(Ordering::Relaxed))
        .sum();
    (local, shared.mirror_counts())
}

/// The owner's side: every outcome of this rank's tasks, once each.
fn collect(
    shared: &Shared,
    plan: &Plan,
    mine: u64,
    counts: &RunnerCounts,
    cores: usize,
) -> Result<(RankReport, LatencyHistogram)> {
    let mut report = RankReport::default();
    let mut hist = LatencyHistogram::new();
    let mut seen = vec![false; plan.index_end as usize];
    let mut next_seq = vec![0u32; plan.index_end as usize];
    let mut out = Vec::new();
    let mut answered = 0u64;
    loop {
        let removed = counts.removed.load(Ordering::Acquire);
        let all_pushed = counts.pushed_all.load(Ordering::Acquire) == cores;
        if all_pushed && answered + removed >= mine {
            return Ok((report, hist));
        }
        let mut got = 0;
        for core in 0..cores {
            got += shared.router.local.drain_into(core, &mut out);
        }
        if got == 0 {
            std::thread::park_timeout(Duration::from_millis(1));
            continue;
        }
        let now = Instant::now();
        for o in out.drain(..) {
            if let Some(done) = &o.result {
                // One task's results arrive in order, each once.
                match next_seq.get_mut(done.index as usize) {
                    Some(n) if *n == done.seq => *n += 1,
                    _ => report.duplicates += 1,
                }
            }
            if !o.last {
                report.streamed += 1;
                continue;
            }
            answered += 1;
            report.answered += 1;
            hist.record(now.duration_since(o.enqueued_at));
            match o.status {
                Status::Cancelled => report.cancelled += 1,
                Status::Lost => report.lost += 1,
                Status::Ok => {}
            }
            let Some(done) = o.result else { continue };
            match seen.get_mut(done.index as usize) {
                Some(s) if !*s => {
                    *s = true;
                    report.outcomes += 1;
                    report.done_hash = report.done_hash.wrapping_add(index_hash(done.index));
                }
                _ => report.duplicates += 1,
            }
        }
    }
}

/// A core's arrivals, pushed while the admission bound lets them in.
struct Pusher {
    arrivals: Vec<u64>,
    next: usize,
    to_cancel: Vec<cnse_sched::CancelToken>,
}

impl Pusher {
    fn done(&self) -> bool {
        self.next >= self.arrivals.len()
    }

    fn push_some(&mut self, core: &SchedCore, plan: &Plan, counts: &RunnerCounts) -> Result<()> {
        if self.arrivals.is_empty() && self.next == 0 {
            self.next = 1; // counted once: nothing to push on this core
            counts.pushed_all.fetch_add(1, Ordering::Release);
        }
        while !self.done() {
            let i = self.arrivals[self.next];
            let job = Job::local(Synthetic::new(i, plan.seed, plan.task_us, plan.service));
            match core.push(0, job) {
                Ok((_, token)) => {
                    if plan.cancel_every > 0 && i % plan.cancel_every == plan.cancel_every - 1 {
                        self.to_cancel.push(token);
                    }
                    self.next += 1;
                    if self.done() {
                        counts.pushed_all.fetch_add(1, Ordering::Release);
                    }
                }
                Err((SchedError::Full { .. }, _)) => break,
                Err((e, _)) => return Err(e.into()),
            }
        }
        Ok(())
    }
}

/// One core: push arrivals while admitted, run what the scheduler gives.
fn runner(
    mut core: SchedCore,
    mut pusher: Pusher,
    plan: &Plan,
    counts: &RunnerCounts,
    stop: &AtomicUsize,
    router: &Router<Done, Unpark>,
    busy: &AtomicUsize,
) -> Result<SchedCore> {
    let mut cancelled = plan.cancel_every == 0;
    let mut idle = 0u32;
    loop {
        pusher.push_some(&core, plan, counts)?;
        if !cancelled && pusher.done() && counts.ran.load(Ordering::Relaxed) >= CANCEL_AFTER_RUNS {
            cancelled = true;
            for t in pusher.to_cancel.drain(..) {
                if t.cancel() == CancelOutcome::Removed {
                    counts.removed.fetch_add(1, Ordering::Release);
                }
            }
        }
        let claimed = if plan.local_steal {
            core.next_task()
        } else {
            core.next_own_task()
        };
        let Some(c) = claimed else {
            if stop.load(Ordering::Acquire) != 0 {
                return Ok(core);
            }
            idle = idle.saturating_add(1);
            if idle > 64 {
                std::thread::sleep(Duration::from_micros(20));
            } else {
                std::thread::yield_now();
            }
            continue;
        };
        idle = 0;
        busy.fetch_add(1, Ordering::Relaxed);
        let done = serve_streaming(&c, plan, router);
        busy.fetch_sub(1, Ordering::Relaxed);
        counts.ran.fetch_add(1, Ordering::Relaxed);
        counts.ran_hash.fetch_add(index_hash(done.index), Ordering::Relaxed);
        counts.busy_us.fetch_add(done.served_us as u64, Ordering::Relaxed);
        counts
            .nominal_us
            .fetch_add(c.task.payload.payload.service_us as u64, Ordering::Relaxed);
        core.count_run();
        if plan
            .exit_after_runs
            .is_some_and(|n| counts.ran.load(Ordering::Relaxed) >= n)
        {
            eprintln!("test exit: this rank's process ends now");
            std::process::exit(17);
        }
        let mut pending = (c, Some(done));
        loop {
            match router.complete(pending.0, pending.1) {
                Ok(()) => break,
                Err(Busy(c, r)) => {
                    pending = (c, r);
                    std::thread::sleep(Duration::from_micros(50));
                }
            }
        }
    }
}

/// Serves a task in `results_per_task` equal parts, streaming a result after
/// each but the last (which the caller hands over with `complete`). A cancel
/// ends it early; a full inbox pauses it.
fn serve_streaming(c: &Claimed<Job<Synthetic>>, plan: &Plan, router: &Router<Done, Unpark>) -> Done {
    let task = c.task.payload.payload;
    let parts = plan.results_per_task.max(1);
    let total = task.service_us as u64;
    let mut served_us = 0u32;
    for k in 0..parts {
        let share = total * (k as u64 + 1) / parts as u64 - total * k as u64 / parts as u64;
        let part = Synthetic {
            index: task.index,
            service_us: share as u32,
        };
        let d = part.serve(plan.mode, || c.cancel_requested());
        served_us = served_us.saturating_add(d.served_us);
        let done = Done {
            index: task.index,
            seq: k,
            served_us,
        };
        if k + 1 == parts || c.cancel_requested() {
            return done;
        }
        let mut result = done;
        while let Err(InboxFull(back)) = router.emit(c, result) {
            result = back;
            std::thread::sleep(Duration::from_micros(50));
        }
    }
    unreachable!("the loop returns at its last part")
}
