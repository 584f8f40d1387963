//! One client thread's loop: start what the schedule says is due, hand
//! frames to the kernel, turn the ring until the next due time, hand each
//! completion to its connection; then drain and tear the ring down before
//! any socket is closed or buffer freed.

use std::collections::VecDeque;
use std::sync::Barrier;
use std::time::{Duration, Instant};

use cnse_ring::{Completion, Ring};

use super::config::{LoadConfig, Mode};
use super::conn::{self, queue_send, Conn, Op};
use super::report::ThreadStats;
use super::schedule::Schedule;
use super::streams::{give_up, Ctx, Phase};
use crate::ClientError;

/// Bound on how long teardown waits for the kernel to hand back buffers.
const SHUTDOWN_WAIT: Duration = Duration::from_secs(2);

/// Whether the thread still starts requests.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Stage {
    Running,
    /// The window ended or the request bound was reached: streams in flight
    /// may finish until the drain timeout, nothing new starts.
    Draining,
}

/// Where the thread's CPU sample over the measured window stands.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum CpuSample {
    /// The window has not begun.
    Before,
    /// The thread's CPU clock (ns) when it began.
    From(u64),
    /// Taken at the window's end (or the last request's).
    Taken,
}

/// Thread `t` of a run, with `conns_n` connections.
pub(super) fn worker(
    t: usize,
    conns_n: usize,
    cfg: &LoadConfig,
    barrier: &Barrier,
) -> Result<ThreadStats, ClientError> {
    if let Some(&cpu) = cfg.cpus.get(t % cfg.cpus.len().max(1)) {
        // Pinning is an optimisation; an invalid CPU leaves the thread free.
        let _ = cnse_ring::pin_current_thread_to(cpu);
    }
    let setup = conn::setup(conns_n, cfg);
    // Every thread reaches the barrier, failed or not, so none waits forever.
    barrier.wait();
    let (ring, conns) = setup?;
    let mut driver = Driver::new(t, ring, conns, cfg);
    let result = driver.run();
    // Also after an error: the kernel lets go of every buffer before the
    // connections are dropped.
    driver.shut_down();
    result.map(|()| driver.stats)
}

struct Driver<'a> {
    cfg: &'a LoadConfig,
    ring: Ring,
    conns: Vec<Conn>,
    clock: Instant,
    phase: Phase,
    drain_end_ns: u64,
    tick_ns: u64,
    ping_payload: Box<[u8]>,
    stats: ThreadStats,
    /// Connections with a free slot, each at most once.
    ready: VecDeque<u32>,
    /// Connections with frames to send this turn, each at most once.
    dirty: Vec<u32>,
    completions: Vec<Completion>,
    schedule: Schedule,
    /// Measured requests this thread may still issue.
    quota: u64,
    stage: Stage,
    /// The window's end passed (not a request bound): the open loop's
    /// backlog is what was due before it.
    window_closed: bool,
    /// This thread's CPU clock over the measured window.
    cpu: CpuSample,
}

impl<'a> Driver<'a> {
    fn new(t: usize, ring: Ring, conns: Vec<Conn>, cfg: &'a LoadConfig) -> Self {
        let conns_n = conns.len();
        let warmup_ns = cfg.warmup.as_nanos() as u64;
        let phase = Phase {
            measure_from_ns: warmup_ns,
            end_ns: warmup_ns + cfg.duration.as_nanos() as u64,
        };
        let ping_payload: Box<[u8]> = match cfg.mode {
            Mode::Ping { payload_bytes } => (0..payload_bytes).map(|i| (i * 31 + 7) as u8).collect(),
            Mode::Generate { .. } | Mode::Http { .. } | Mode::Resp => Box::new([]),
        };
        let slots_n = (conns_n * cfg.inflight) as u64;
        // Room for a full completion queue plus what a stalled push stashed.
        let completions_max = 2 * ring.raw().params().cq_entries() as usize;
        Driver {
            cfg,
            ring,
            conns,
            clock: Instant::now(),
            phase,
            drain_end_ns: phase.end_ns + cfg.drain_timeout.as_nanos() as u64,
            tick_ns: cfg.open_loop_tick.as_nanos() as u64,
            ping_payload,
            stats: ThreadStats::default(),
            ready: VecDeque::with_capacity(conns_n),
            dirty: Vec::with_capacity(conns_n),
            completions: Vec::with_capacity(completions_max),
            schedule: Schedule::new(cfg.rate_per_s, t, cfg.threads, slots_n, warmup_ns),
            quota: cfg.requests.map_or(u64::MAX, |n| {
                let (base, rem) = (n / cfg.threads as u64, n % cfg.threads as u64);
                base + u64::from((t as u64) < rem)
            }),
            stage: Stage::Running,
            window_closed: false,
            cpu: CpuSample::Before,
        }
    }

    fn now_ns(&self) -> u64 {
        self.clock.elapsed().as_nanos() as u64
    }

    fn run(&mut self) -> Result<(), ClientError> {
        for (c, conn) in self.conns.iter_mut().enumerate() {
            conn.arm_recv(&mut self.ring, c as u32)?;
            conn.st.ready = true;
            self.ready.push_back(c as u32);
            for s in (0..self.cfg.inflight).rev() {
                conn.st.free.push(s as u32);
            }
        }
        loop {
            let now = self.now_ns();
            if self.cpu == CpuSample::Before && now >= self.phase.measure_from_ns {
                self.cpu = CpuSample::From(thread_cpu_ns());
            }
            if self.stage == Stage::Running {
                self.start_due(now);
                self.check_end(now);
            } else if !self.schedule.closed_loop() {
                // The backlog intended inside the window still goes out as
                // slots free up; nothing intended after it does.
                self.start_due(now);
            }
            for k in 0..self.dirty.len() {
                let c = self.dirty[k];
                self.conns[c as usize].flush(&mut self.ring, c)?;
            }
            self.dirty.clear();
            if self.stage == Stage::Draining && self.drained(now) {
                return Ok(());
            }
            // Sleep on the ring until a completion or the next due time; a
            // zero wait still reaps (deferred task work runs).
            let wait = Duration::from_nanos(self.wake_ns(now).saturating_sub(self.now_ns()));
            self.completions.clear();
            self.ring.turn(Some(wait), &mut self.completions)?;
            let now = self.now_ns();
            self.complete(now)?;
        }
    }

    fn start_due(&mut self, now: u64) {
        let mut ctx = Ctx {
            stats: &mut self.stats,
            ready: &mut self.ready,
            mode: &self.cfg.mode,
            ping_payload: &self.ping_payload,
            phase: self.phase,
            closed_loop: self.schedule.closed_loop(),
            stopping: false,
            quota: &mut self.quota,
            now,
        };
        self.schedule.start_due(now, &mut self.conns, &mut self.dirty, &mut ctx);
    }

    fn check_end(&mut self, now: u64) {
        if self.quota == 0 {
            // The request bound: no more starts; the window ends with the
            // last of these requests.
            self.stage = Stage::Draining;
        } else if now >= self.phase.end_ns {
            self.stage = Stage::Draining;
            self.window_closed = true;
            self.stats.window_ns = self.phase.end_ns - self.phase.measure_from_ns;
            self.take_cpu_sample();
        }
    }

    fn take_cpu_sample(&mut self) {
        if let CpuSample::From(start) = self.cpu {
            self.stats.load_cpu_ns = thread_cpu_ns().saturating_sub(start);
            self.cpu = CpuSample::Taken;
        }
    }

    /// Whether the drain is over: no stream open and (open loop) no
    /// backlog left to send, or the drain timeout. Then what is still open
    /// or unsent counts, from its intended send to now, as unanswered or
    /// unsent: every request intended inside the window is in `e2e_all`.
    fn drained(&mut self, now: u64) -> bool {
        let busy: usize = self.conns.iter().map(|c| c.st.busy).sum();
        let alive = self.conns.iter().any(|c| c.st.alive);
        let backlog = if self.window_closed && alive {
            self.schedule.unsent(self.phase.end_ns)
        } else {
            0
        };
        if (busy > 0 || backlog > 0) && now < self.drain_end_ns {
            return false;
        }
        self.stats.unfinished += busy as u64;
        for conn in &self.conns {
            if conn.st.alive {
                give_up(&conn.st, now, &mut self.stats);
            }
        }
        if self.window_closed {
            for intended in self.schedule.unsent_intended(self.phase.end_ns) {
                if intended >= self.phase.measure_from_ns {
                    self.stats.unsent += 1;
                    self.stats.e2e_unsent.record_us(now.saturating_sub(intended) / 1000);
                }
            }
        }
        if self.stats.window_ns == 0 {
            self.stats.window_ns = self.stats.last_done_ns.saturating_sub(self.phase.measure_from_ns);
        }
        self.take_cpu_sample();
        true
    }

    fn wake_ns(&self, now: u64) -> u64 {
        match self.stage {
            Stage::Running if self.cfg.busy_poll => now,
            Stage::Draining => self.drain_end_ns,
            Stage::Running if self.ready.is_empty() => self.phase.end_ns,
            Stage::Running => self.phase.end_ns.min(self.schedule.wake_ns(now, self.tick_ns)),
        }
    }

    /// Hands this turn's completions to their connections.
    fn complete(&mut self, now: u64) -> Result<(), ClientError> {
        let mut ctx = Ctx {
            stats: &mut self.stats,
            ready: &mut self.ready,
            mode: &self.cfg.mode,
            ping_payload: &self.ping_payload,
            phase: self.phase,
            closed_loop: self.schedule.closed_loop(),
            stopping: self.stage == Stage::Draining,
            quota: &mut self.quota,
            now,
        };
        for k in 0..self.completions.len() {
            let cqe = self.completions[k];
            let c = cqe.tag.slot_index();
            let conn = &mut self.conns[c as usize];
            match Op::from_code(cqe.tag.kind()) {
                Some(Op::Recv) => conn.on_recv(&mut self.ring, c, cqe.result, now, &mut ctx)?,
                Some(Op::Send) => conn.on_send(&mut self.ring, c, cqe.result, now, &mut ctx)?,
                None => unreachable!("op kind {} is never submitted", cqe.tag.kind()),
            }
            if conn.st.alive && !conn.st.out.is_empty() {
                queue_send(conn, c, &mut self.dirty);
            }
        }
        Ok(())
    }

    /// Cancels and drains every op in flight; when the kernel does not let
    /// go in time, the connections (their buffers and sockets) are leaked
    /// rather than freed under it.
    fn shut_down(&mut self) {
        self.completions.clear();
        let left = self
            .ring
            .teardown(SHUTDOWN_WAIT, &mut self.completions)
            .unwrap_or(u64::MAX);
        if left > 0 {
            std::mem::forget(std::mem::take(&mut self.conns));
        }
    }
}

/// The calling thread's CPU time (user and system), ns.
fn thread_cpu_ns() -> u64 {
    let mut ts = libc::timespec { tv_sec: 0, tv_nsec: 0 };
    // SAFETY: writes one timespec we own.
    let r = unsafe { libc::clock_gettime(libc::CLOCK_THREAD_CPUTIME_ID, &mut ts) };
    if r != 0 {
        return 0;
    }
    ts.tv_sec as u64 * 1_000_000_000 + ts.tv_nsec as u64
}
