//! The session layer: frames in, frames and backend calls out. It holds the
//! connection and stream tables, the admission queue and the backend, and
//! no io_uring: what it needs from sockets goes through a [`Transport`],
//! and the I/O layer (the worker's ring, or the simulator) feeds it events
//! through the `on_*` entry points. One loop turn is:
//!
//! `begin_turn(now)` → events (`on_accept`, `on_input`, `on_recv_done`,
//! `on_send_done`, `on_backend`) → `end_turn()` (backend poll, admission,
//! one send per touched connection, timeouts) → `shutdown_step` when asked.
//!
//! Stages, in the order a REQUEST meets them (docs/REQUEST_FLOW.md):
//! handshake (`frames.rs`: HELLO, the key), request checks (`frames.rs`:
//! stream id, parameters, shutdown, limits), scheduling (`schedule.rs`:
//! run now or a task on the core's deque, 429 past the bound), the backend
//! (`Backend::start`/`poll`, tokens through the `Sink` into the stream's
//! bounded queue), credit and frames back (`flush.rs`), cancel and
//! disconnect (`frames.rs`, `close_conn`), timeouts and shutdown
//! (`lifecycle.rs`), work stealing (`steal.rs`, `foreign.rs`).

use std::os::fd::RawFd;
use std::sync::Arc;
use std::time::{Duration, Instant};

use cnse_backend::Backend;
use cnse_proto::ParamLimits;

use crate::auth::AuthKey;
use crate::conn::{ConnState, RecvOp, SendOp, BACKLOG_BYTES_MAX};
use crate::stages::StageTimes;
use crate::transport::Transport;
use crate::Config;

pub(crate) mod flush;
mod foreign;
mod frames;
mod lifecycle;
mod schedule;
mod steal;
mod tables;

pub(crate) use frames::Admitted;
pub use tables::Counters;
pub(crate) use tables::{work_id, Tables};

/// How often timeouts are checked.
pub const SWEEP_INTERVAL: Duration = Duration::from_millis(100);
/// How long a connection that is being closed for a violation (or at
/// shutdown) gets to send what it has.
pub const DRAIN_TIMEOUT: Duration = Duration::from_secs(1);
/// How soon a runner tries again to hand tokens to an owner whose inbox
/// was full.
const FOREIGN_RETRY: Duration = Duration::from_millis(1);

pub struct Session<T: Transport> {
    pub(crate) io: T,
    pub(crate) tables: Tables,
    backend: Box<dyn Backend>,
    /// The process's scheduler and this core's end of it.
    tasks: Arc<crate::tasks::Tasks>,
    core: cnse_sched::Core<crate::tasks::Task>,
    /// The inbox's messages while they are handled (capacity kept).
    inbox_buf: Vec<crate::tasks::Msg>,
    /// Woken (a cancel or a window for foreign work may be waiting).
    woken: bool,
    /// The next `admit` may steal: this core was about to sleep with a
    /// free backend slot (`allow_steal`).
    steal_ok: bool,
    /// The backend's active count as last added to `Tasks::busy`.
    busy_reported: usize,
    limits: ParamLimits,
    pub(crate) auth: Option<AuthKey>,
    next_sweep: Instant,
    pub(crate) shutting_down: Option<Instant>,
    /// When the session started, as Unix seconds and on the loop's clock
    /// (`unix_now` needs no system call per request).
    pub(crate) started_unix: u64,
    started_at: Instant,
    /// Renders the Prometheus metrics of the whole process (set by the I/O
    /// layer, which sees every worker); without it, this session's own.
    pub(crate) metrics: Option<MetricsRender>,
    backend_deadline: Option<Instant>,
    /// Requests started on the backend since its last poll (`step`).
    started_since_poll: u32,
    /// Refusal and violation logs: at most `LOG_BURST` a second, the rest
    /// counted and reported with the next one logged.
    log_window: Instant,
    log_count: u32,
    log_suppressed: u64,
}

/// Writes the process's Prometheus text (see `Session::metrics`).
pub(crate) type MetricsRender = Box<dyn Fn(&mut Vec<u8>) + Send>;

/// Requests started within a turn after which the backend runs and their
/// frames are written before the turn's remaining input (`Session::step`).
const STARTS_PER_STEP: u32 = 256;

/// Refusals and violations logged per second per worker at most.
const LOG_BURST: u32 = 10;

impl<T: Transport> Session<T> {
    /// A session alone, as worker 0: its own one-core scheduler (the
    /// simulator, tests).
    pub fn new(
        cfg: Arc<Config>,
        backend: Box<dyn Backend>,
        io: T,
        now: Instant,
        conns_max: usize,
        _worker: usize,
    ) -> Self {
        let (tasks, core) = crate::tasks::Tasks::single(cfg.admission_queue_max);
        Self::with_tasks(cfg, backend, io, now, conns_max, tasks, core)
    }

    /// Worker `core.index()`'s session with `conns_max` connection slots (at
    /// most `cnse_ring::SLOT_MAX`: slots travel in ring tags), on the
    /// process's scheduler.
    pub fn with_tasks(
        cfg: Arc<Config>,
        backend: Box<dyn Backend>,
        io: T,
        now: Instant,
        conns_max: usize,
        tasks: Arc<crate::tasks::Tasks>,
        core: cnse_sched::Core<crate::tasks::Task>,
    ) -> Self {
        let worker = core.index();
        assert!(
            cnse_ring::Tag::check_slots(conns_max),
            "connection table above the tag's slot bits"
        );
        let limits = ParamLimits {
            max_tokens_limit: cfg.max_tokens_limit,
        };
        let auth = cfg.auth_key.as_ref().map(|k| AuthKey::new(k.expose()));
        Session {
            io,
            tables: Tables::new(cfg, now, conns_max, worker),
            backend,
            tasks,
            core,
            inbox_buf: Vec::with_capacity(crate::tasks::INBOX_MAX),
            woken: false,
            steal_ok: false,
            busy_reported: 0,
            limits,
            auth,
            next_sweep: now + SWEEP_INTERVAL,
            shutting_down: None,
            started_unix: std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map_or(0, |d| d.as_secs()),
            started_at: now,
            metrics: None,
            log_window: now,
            log_count: 0,
            log_suppressed: 0,
            backend_deadline: None,
            started_since_poll: 0,
        }
    }

    /// The I/O layer it drives (a benchmark's or test's transport).
    pub fn io_mut(&mut self) -> &mut T {
        &mut self.io
    }

    pub fn cfg(&self) -> &Config {
        &self.tables.cfg
    }

    pub fn counters(&self) -> Counters {
        self.tables.n
    }

    /// Unix seconds now, from the turn's clock.
    pub(crate) fn unix_now(&self) -> u64 {
        self.started_unix + self.tables.now.saturating_duration_since(self.started_at).as_secs()
    }

    /// Logs a refused request or a protocol violation, rate-limited: a
    /// misbehaving client cannot flood the log (nothing is logged per frame
    /// on the normal path).
    pub(crate) fn log_refusal(&mut self, what: &'static str, code: u32, message: &str) {
        let now = self.tables.now;
        if now.duration_since(self.log_window) >= Duration::from_secs(1) {
            self.log_window = now;
            self.log_count = 0;
        }
        if self.log_count >= LOG_BURST {
            self.log_suppressed += 1;
            return;
        }
        self.log_count += 1;
        let suppressed = std::mem::take(&mut self.log_suppressed);
        tracing::warn!(worker = self.tables.worker, code, suppressed, "{what}: {message}");
    }

    /// This worker's request metrics, with the queue and backend gauges.
    pub fn request_metrics(&self) -> crate::metrics::RequestMetrics {
        let mut m = self.tables.metrics;
        let b = self.backend.stats();
        // The scheduler is the process's: worker 0 reports its depth, so
        // that the sum over workers counts each task once.
        m.queued = if self.core.index() == 0 {
            self.admission_queue_len() as u64
        } else {
            0
        };
        m.running = b.active;
        m.servers = b.servers;
        m.servers_up = b.servers_up;
        m.spares = b.spares;
        m.backend_events = b.events;
        m
    }

    /// Work the backend holds (started, not ended or cancelled).
    pub fn backend_active(&self) -> u64 {
        self.backend.active()
    }

    /// Work the backend holds paused.
    pub fn backend_paused(&self) -> u64 {
        self.backend.stats().paused
    }

    /// Free connection and stream slots (for invariant checks).
    pub fn free_slots(&self) -> (usize, usize) {
        (
            self.tables.conn_free.len(),
            self.tables.streams.len() - self.tables.n.streams_open as usize,
        )
    }

    /// Checks the live-connection list against the table (for invariant
    /// checks): every slot in use is listed once, at its own position.
    pub fn check_live_list(&self) -> Result<(), String> {
        let t = &self.tables;
        for (pos, &slot) in t.conn_live.iter().enumerate() {
            let c = &t.conns[slot as usize];
            if c.state == ConnState::Free {
                return Err(format!("free slot {slot} in the live list"));
            }
            if c.live_pos as usize != pos {
                return Err(format!("slot {slot} listed at {pos}, thinks {}", c.live_pos));
            }
        }
        let in_use = t.conns.iter().filter(|c| c.state != ConnState::Free).count();
        if in_use != t.conn_live.len() {
            return Err(format!("{in_use} slots in use, {} listed", t.conn_live.len()));
        }
        Ok(())
    }

    /// (bytes the memory budget counts as held, the same recounted from
    /// every buffer): equal unless the accounting leaks.
    pub fn memory(&self) -> (usize, usize) {
        let conns: usize = self.tables.conns.iter().map(|c| c.held_bytes).sum();
        let prompts: usize = self
            .tables
            .streams
            .iter()
            .map(|s| s.prompt.capacity() + s.http.messages.capacity() + s.away)
            .sum();
        (self.tables.mem_held, conns + prompts)
    }

    /// Tasks queued in the process's scheduler (all cores: it is shared).
    pub fn admission_queue_len(&self) -> usize {
        self.tasks.sched.counts().live
    }

    /// This core's backend could start work now.
    pub fn has_capacity(&self) -> bool {
        self.backend.has_capacity()
    }

    /// Foreign works this core runs for other cores' streams.
    pub fn foreign_live(&self) -> usize {
        self.tables.foreign.live
    }

    /// The process's scheduler (the worker's idle protocol).
    pub fn tasks(&self) -> &Arc<crate::tasks::Tasks> {
        &self.tasks
    }

    /// The worker's eventfd fired: another core sent results, a cancel or
    /// window for work this core runs for it.
    pub fn on_wake(&mut self) {
        self.woken = true;
    }

    /// This core has a free backend slot and nothing of its own to do (it
    /// was about to sleep, or just woke from such a sleep): the next turn
    /// may steal queued work from other cores.
    pub fn allow_steal(&mut self) {
        self.steal_ok = true;
    }

    pub fn is_shutting_down(&self) -> bool {
        self.shutting_down.is_some()
    }

    /// When the session wants its next turn at the latest.
    pub fn next_deadline(&self) -> Instant {
        let d = match self.backend_deadline {
            Some(d) => d.min(self.next_sweep),
            None => self.next_sweep,
        };
        if self.tables.foreign.retry {
            // An owner's inbox was full: try again soon.
            return d.min(self.tables.now + FOREIGN_RETRY);
        }
        d
    }

    pub fn begin_turn(&mut self, now: Instant) {
        let t = &mut self.tables;
        t.now = now;
        t.now_us = cnse_backend::micros(now.saturating_duration_since(t.epoch));
    }

    /// Stage timing, if on: the I/O layer hands this turn's sends to the
    /// kernel at `now`.
    pub fn submitting(&mut self, now: Instant) {
        if let Some(st) = &mut self.tables.stages {
            st.submitted(now);
        }
    }

    /// Stage timing, if on.
    pub fn stage_times(&mut self) -> Option<&mut StageTimes> {
        self.tables.stages.as_deref_mut()
    }

    pub fn now(&self) -> Instant {
        self.tables.now
    }

    /// A new connection on `fd`: takes a slot and starts receiving, or
    /// refuses (table full, shutting down) by closing it. Returns the slot.
    pub fn on_accept(&mut self, fd: RawFd) -> Option<u32> {
        self.tables.n.accepted += 1;
        let slot = if self.shutting_down.is_none() {
            self.tables.take_conn()
        } else {
            None
        };
        let Some(slot) = slot else {
            self.io.close(fd);
            self.tables.n.rejected += 1;
            return None;
        };
        let now = self.tables.now;
        let c = &mut self.tables.conns[slot as usize];
        debug_assert_eq!(c.state, ConnState::Free);
        c.fd = fd;
        c.state = ConnState::Handshake;
        c.decoder.reset();
        c.out_fill.clear();
        c.out_flight.clear();
        c.flight_sent = 0;
        c.backlog.clear();
        c.streams.clear();
        c.fill_first_end = None;
        c.fill_ends = 0;
        c.fill_frames = 0;
        c.proto = crate::conn::Proto::Binary;
        c.features = 0;
        c.accepted = now;
        c.last_input = now;
        self.tables.n.conns_open += 1;
        self.arm_recv(slot);
        Some(slot)
    }

    /// Bytes received on a connection: frames are handled in place; what
    /// cannot be handled now (output backed up) goes to the bounded backlog.
    pub fn on_input(&mut self, slot: u32, gen: u32, data: &[u8]) {
        let c = &mut self.tables.conns[slot as usize];
        if c.gen != gen || !c.reads_input() {
            return;
        }
        c.last_input = self.tables.now;
        if c.proto == crate::conn::Proto::Http {
            return self.http_input(slot, data);
        }
        if c.backlog.is_empty() {
            let consumed = self.consume(slot, data);
            let c = &mut self.tables.conns[slot as usize];
            if consumed < data.len() && c.reads_input() {
                c.backlog.extend_from_slice(&data[consumed..]);
            }
        } else {
            // Order: what waits in the backlog comes first.
            c.backlog.extend_from_slice(data);
        }
        self.tables.account_conn(slot);
        self.maybe_cancel_recv(slot);
        if self.started_since_poll >= STARTS_PER_STEP {
            self.step();
        }
    }

    /// Mid-turn, between two connections' input: the backend runs what
    /// the turn's requests so far made due and their frames are written,
    /// so a turn of thousands of requests does not hold every request's
    /// stream record, token queue and backend work at once. At 64 × 64 on
    /// the device they no longer stayed in the cache from one phase of
    /// the turn to the next (each phase's first touch of a record was
    /// most of its time). Sends still go to the kernel with the turn's.
    fn step(&mut self) {
        self.started_since_poll = 0;
        self.backend_deadline = self.backend.poll(&mut self.io, &mut self.tables);
        self.flush_dirty();
    }

    /// A receive completion without data: `result` is 0 (EOF) or a negative
    /// errno; `more` says the multishot receive goes on.
    pub fn on_recv_done(&mut self, slot: u32, gen: u32, result: i32, more: bool) {
        let c = &mut self.tables.conns[slot as usize];
        if c.gen != gen || c.state == ConnState::Free {
            return;
        }
        if !more {
            c.recv = RecvOp::Idle;
        }
        if result == 0 || (result < 0 && result != -libc::ENOBUFS && result != -libc::ECANCELED) {
            // EOF or a receive error: the connection is over.
            return self.close_conn(slot);
        }
        if self.tables.conns[slot as usize].state == ConnState::Closing {
            self.maybe_release(slot);
        } else if !more {
            // Multishot ended (ENOBUFS, cancel, or the kernel's choice):
            // re-arm unless the backlog is holding input back.
            self.arm_recv(slot);
        }
    }

    /// The send of `slot` completed with `result` bytes or a negative errno.
    pub fn on_send_done(&mut self, slot: u32, gen: u32, result: i32) {
        let c = &mut self.tables.conns[slot as usize];
        assert_eq!(c.gen, gen, "a slot is never reused while its send is in flight");
        debug_assert_eq!(c.send, SendOp::InFlight);
        c.send = SendOp::Idle;
        if c.state == ConnState::Closing {
            self.maybe_release(slot);
            return;
        }
        if result < 0 {
            self.close_conn(slot);
            return;
        }
        c.flight_sent += result as usize;
        if c.flight_sent < c.out_flight.len() {
            self.submit_send(slot);
            return;
        }
        c.out_flight.clear();
        c.flight_sent = 0;
        self.resume_input(slot);
        self.tables.account_conn(slot);
        self.tables.mark_dirty(slot);
    }

    /// A completion of an op the backend submitted through `Io::submit`.
    pub fn on_backend(&mut self, tag: u64, result: i32, flags: u32) {
        self.backend
            .complete(tag, result, flags, &mut self.io, &mut self.tables);
    }

    /// The end of a turn: the backend runs, queued work is admitted, every
    /// touched connection gets one send, and timeouts are checked when due.
    pub fn end_turn(&mut self) {
        self.started_since_poll = 0;
        self.drain_inbox();
        if std::mem::take(&mut self.woken) {
            self.scan_foreign();
        }
        self.backend_deadline = self.backend.poll(&mut self.io, &mut self.tables);
        if self.admit() > 0 {
            // Work started after the poll: its first step (and the
            // backend's next deadline) must not wait for another turn.
            self.backend_deadline = self.backend.poll(&mut self.io, &mut self.tables);
        }
        self.flush_foreign();
        self.flush_dirty();
        let busy = self.backend.active() as usize;
        if busy != self.busy_reported {
            use std::sync::atomic::Ordering::Relaxed;
            if busy > self.busy_reported {
                self.tasks.busy.fetch_add(busy - self.busy_reported, Relaxed);
            } else {
                self.tasks.busy.fetch_sub(self.busy_reported - busy, Relaxed);
            }
            self.busy_reported = busy;
        }
        if self.tables.now >= self.next_sweep {
            self.sweep();
            self.next_sweep = self.tables.now + SWEEP_INTERVAL;
        }
    }

    fn arm_recv(&mut self, slot: u32) {
        let c = &mut self.tables.conns[slot as usize];
        if c.recv != RecvOp::Idle || !c.reads_input() || !c.backlog.is_empty() {
            return;
        }
        c.recv = RecvOp::Armed;
        let r = c.conn_ref(slot);
        self.io.recv(r);
    }

    fn maybe_cancel_recv(&mut self, slot: u32) {
        let c = &mut self.tables.conns[slot as usize];
        if c.backlog.len() >= BACKLOG_BYTES_MAX && c.recv == RecvOp::Armed {
            c.recv = RecvOp::Cancelling;
            let r = c.conn_ref(slot);
            self.io.cancel_recv(r);
        }
    }

    /// Output drained: handle the backlog, then receive again.
    fn resume_input(&mut self, slot: u32) {
        let c = &mut self.tables.conns[slot as usize];
        if !c.backlog.is_empty() {
            if !c.reads_input() {
                c.backlog.clear();
                return;
            }
            // Taken out while it is parsed; its capacity is kept.
            let mut backlog = std::mem::take(&mut c.backlog);
            let consumed = self.consume(slot, &backlog);
            backlog.drain(..consumed);
            let c = &mut self.tables.conns[slot as usize];
            if c.reads_input() {
                c.backlog = backlog;
            }
        }
        self.arm_recv(slot);
    }

    /// Peer closed, error, or timeout: cancel the streams silently and shut
    /// the socket; the slot is released once the kernel returns our ops.
    pub(crate) fn close_conn(&mut self, slot: u32) {
        match self.tables.conns[slot as usize].state {
            ConnState::Free => return,
            // Already shut: an op of ours just came back; maybe it was the last.
            ConnState::Closing => return self.maybe_release(slot),
            _ => {}
        }
        self.drop_streams(slot);
        let c = &mut self.tables.conns[slot as usize];
        c.backlog.clear();
        c.state = ConnState::Closing;
        let fd = c.fd;
        self.io.shutdown(fd);
        self.maybe_release(slot);
    }

    fn maybe_release(&mut self, slot: u32) {
        let c = &mut self.tables.conns[slot as usize];
        if c.state != ConnState::Closing || c.ops_in_flight() {
            return;
        }
        let fd = c.fd;
        c.fd = -1;
        c.gen = c.gen.wrapping_add(1);
        c.state = ConnState::Free;
        c.out_fill.clear();
        c.out_flight.clear();
        c.backlog.clear();
        c.decoder.reset();
        self.tables.account_conn(slot);
        self.io.close(fd);
        self.tables.put_conn(slot);
        self.tables.n.conns_open -= 1;
    }
}
